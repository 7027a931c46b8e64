//! Shared core of the envoy-obs pack: everything the three module kinds have in common.
//!
//! Data path, one direction only:
//! Envoy hook -> [`ffi`] safe view -> record -> [`pipeline`] per-worker queue -> flush thread ->
//! [`export`] exporter -> wire/file.
//!
//! Thread model:
//! - Hooks run on Envoy's main thread (config load/destroy) or on its workers (per-request
//!   hooks). Worker-side code here is lock-free: per worker, a batch being filled (an atomic
//!   cell) and a bounded `ArrayQueue` of full batches, relaxed counters in per-worker cache
//!   lines, no syscalls on the common path.
//! - Each config object owns one named flush thread ([`pipeline::Pipeline`]) that drains the
//!   queues and calls its [`pipeline::Exporter`]; it is joined (with a bounded drain) when
//!   Envoy destroys the config.
//! - Under `envoy --mode validate` no thread is started and nothing is opened for writing.
#![deny(missing_docs)]

pub mod config;
pub mod export;
pub mod ffi;
pub mod fuzz;
pub mod hook;
pub mod metrics;
pub mod otlp;
pub mod pipeline;
pub mod stop;
pub mod timing;
pub mod w3c;

/// Exports `envoy_dynamic_module_on_program_init` returning the ABI version Envoy 1.40.0
/// expects. Each cdylib calls this once at its crate root.
#[macro_export]
macro_rules! declare_program_init {
    () => {
        /// Called once by Envoy when it dlopen()s this module.
        #[no_mangle]
        pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const ::std::ffi::c_char {
            $crate::envoy_obs_abi::ABI_VERSION.as_ptr().cast()
        }
    };
}

#[doc(hidden)]
pub use envoy_obs_abi;
