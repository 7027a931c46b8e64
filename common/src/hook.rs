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

/// The body of every `on_*_config_new` hook: decodes the name and config buffers, builds the
/// config with `build`, and hands Envoy a boxed pointer — or writes the error (which names the
/// field) to Envoy's log and returns NULL, so Envoy rejects the config. `what` names the kind
/// (`access logger`), `field` the config field (`logger_config`) in that log line.
///
/// # Safety
/// `name` and `config` must be the buffers Envoy passed to the hook (valid for its duration).
pub unsafe fn config_new<T>(
    hook: &'static str,
    what: &str,
    field: &str,
    name: envoy_obs_abi::EB,
    config: envoy_obs_abi::EB,
    build: impl FnOnce(&str, &[u8]) -> Result<T, crate::config::ConfigError>,
) -> *const std::ffi::c_void {
    guard(hook, std::ptr::null(), || {
        // SAFETY: forwarded contract: Envoy's buffers, valid while the hook runs.
        let (name, config) = unsafe { (ffi::View::from_envoy(name), ffi::View::from_envoy(config)) };
        let name = name.lossy();
        match build(&name, config.bytes()) {
            Ok(c) => Box::into_raw(Box::new(c)) as *const std::ffi::c_void,
            Err(e) => {
                ffi::log(
                    LogLevel::Error,
                    &format!("envoy-obs {what} {name:?}: invalid {field}: {e}"),
                    file!(),
                    line!(),
                );
                std::ptr::null()
            }
        }
    })
}

/// The body of every destroy hook: drops what [`config_new`] (or another `Box::into_raw`)
/// handed to Envoy.
///
/// # Safety
/// `ptr` must be NULL or come from `Box::<T>::into_raw`, and must not be used afterwards.
pub unsafe fn destroy<T>(hook: &'static str, ptr: *const std::ffi::c_void) {
    guard(hook, (), || {
        if !ptr.is_null() {
            // SAFETY: per contract, a pointer from Box::<T>::into_raw, destroyed exactly once.
            drop(unsafe { Box::from_raw(ptr as *mut T) });
        }
    })
}
