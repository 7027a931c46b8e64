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
pub mod rand;
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
            $crate::pin_module(envoy_dynamic_module_on_program_init);
            $crate::envoy_obs_abi::ABI_VERSION.as_ptr().cast()
        }
    };
}

/// Keeps the module holding `f` loaded until the process exits, as Envoy's `do_not_close`
/// would. Envoy dlclose()s a module when its last config goes, and a flush thread may then
/// still be finishing its drain (a config destroyed on a worker does not wait for it, see
/// [`pipeline`]): unmapping its code under it would crash Envoy.
pub fn pin_module(f: extern "C" fn() -> *const std::ffi::c_char) {
    // SAFETY: dladdr only reads the loader's tables into `info`; dlopen with RTLD_NOLOAD on an
    // object already loaded returns one more reference to it (kept on purpose) and marks it
    // RTLD_NODELETE. `dli_fname` is a NUL-terminated string owned by the loader.
    unsafe {
        let mut info: libc::Dl_info = std::mem::zeroed();
        if libc::dladdr(f as *const std::ffi::c_void, &mut info) != 0 && !info.dli_fname.is_null() {
            libc::dlopen(info.dli_fname, libc::RTLD_LAZY | libc::RTLD_NOLOAD | libc::RTLD_NODELETE);
        }
    }
}

#[doc(hidden)]
pub use envoy_obs_abi;
