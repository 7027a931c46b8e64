//! The one hook template: every `extern "C"` hook body is `hook::guard(NAME, NEUTRAL, || ..._impl(..))`.
//!
//! A panic must never unwind into Envoy (that aborts the whole proxy). `guard` catches it,
//! logs the hook's name through Envoy's logger and returns the hook's neutral value
//! (NULL config = rejected config, no-op for void hooks).
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::ffi::{self, LogLevel};

/// Runs `f`, turning a panic into `neutral` and one error line in Envoy's log.
#[inline(always)]
pub fn guard<R>(hook: &'static str, neutral: R, f: impl FnOnce() -> R) -> R {
    // AssertUnwindSafe: on panic we discard every value `f` touched except through the
    // module's own objects, which only hold plain data and atomics (no broken invariants
    // are observable: queues are lock-free and a half-built record is simply dropped).
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            ffi::log(LogLevel::Error, &format!("envoy-obs: panic in {hook}: {what}"), file!(), line!());
            neutral
        }
    }
}
