//! `libenvoy_obs_tracer.so`: OpenTelemetry tracer (`tracer_name: opentelemetry`).
//!
//! Status: the foundation only. The module loads, validates its (so far empty) config and
//! exports every hook of Envoy 1.40's tracer kind; `start_span` returns NULL, which makes
//! Envoy use a no-op span. The span model, propagation, samplers and OTLP export come with the
//! tracer issue.
//!
//! Thread model: config hooks on the main thread; span hooks on the worker that owns the
//! request (never called here while `start_span` returns NULL).
use std::ffi::c_void;
use std::ptr;

use envoy_obs_abi as abi;
use envoy_obs_common::config::{parse, ConfigError};
use envoy_obs_common::declare_program_init;
use envoy_obs_common::hook;
use serde::Deserialize;

declare_program_init!();

/// `tracer_config`; keys arrive with the tracer issue. Unknown keys are rejected.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracerConfig {}

/// The tracer config object.
pub struct Tracer;

fn config_new_impl(name: &str, config: &[u8]) -> Result<Tracer, ConfigError> {
    if name != "opentelemetry" {
        return Err(ConfigError::new("tracer_name", format!("unknown tracer {name:?}; expected: opentelemetry")));
    }
    let _: TracerConfig = parse(config)?;
    Ok(Tracer)
}

/// # Safety
/// Called by Envoy on the main thread with valid buffers.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_tracer_config_new(
    _config_envoy_ptr: *mut c_void,
    name: abi::EB,
    config: abi::EB,
) -> *const c_void {
    // SAFETY: Envoy's buffers for this call.
    unsafe { hook::config_new("on_tracer_config_new", "tracer", "tracer_config", name, config, config_new_impl) }
}

/// # Safety
/// `config_module_ptr` comes from `config_new`.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_tracer_config_destroy(config_module_ptr: *const c_void) {
    // SAFETY: Envoy destroys the pointer config_new returned, once.
    unsafe { hook::destroy::<Tracer>("on_tracer_config_destroy", config_module_ptr) }
}

/// Returns NULL: Envoy then uses its no-op span for the request.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_tracer_start_span(
    _config: *const c_void,
    _span_envoy_ptr: *mut c_void,
    _operation: abi::EB,
    _traced: bool,
    _reason: u32,
) -> *const c_void {
    ptr::null()
}

// The remaining span hooks are required symbols; with no module spans they are never called.
macro_rules! noop_hooks {
    ($($name:ident($($arg:ident: $ty:ty),*) -> $ret:ty = $val:expr;)*) => {$(
        #[doc = concat!("Required tracer hook `", stringify!($name), "`; inert until spans exist.")]
        #[no_mangle]
        pub extern "C" fn $name($($arg: $ty),*) -> $ret { $(let _ = $arg;)* $val }
    )*};
}

noop_hooks! {
    envoy_dynamic_module_on_tracer_span_set_operation(span: *const c_void, op: abi::EB) -> () = ();
    envoy_dynamic_module_on_tracer_span_set_tag(span: *const c_void, k: abi::EB, v: abi::EB) -> () = ();
    envoy_dynamic_module_on_tracer_span_log(span: *const c_void, ts: i64, ev: abi::EB) -> () = ();
    envoy_dynamic_module_on_tracer_span_finish(span: *const c_void) -> () = ();
    envoy_dynamic_module_on_tracer_span_inject_context(span: *const c_void, env: *mut c_void) -> () = ();
    envoy_dynamic_module_on_tracer_span_spawn_child(span: *const c_void, n: abi::EB, ts: i64) -> *const c_void = ptr::null();
    envoy_dynamic_module_on_tracer_span_set_sampled(span: *const c_void, s: bool) -> () = ();
    envoy_dynamic_module_on_tracer_span_use_local_decision(span: *const c_void) -> bool = true;
    envoy_dynamic_module_on_tracer_span_get_baggage(span: *const c_void, k: abi::EB, out: *mut abi::MB) -> bool = false;
    envoy_dynamic_module_on_tracer_span_set_baggage(span: *const c_void, k: abi::EB, v: abi::EB) -> () = ();
    envoy_dynamic_module_on_tracer_span_get_trace_id(span: *const c_void, out: *mut abi::MB) -> bool = false;
    envoy_dynamic_module_on_tracer_span_get_span_id(span: *const c_void, out: *mut abi::MB) -> bool = false;
    envoy_dynamic_module_on_tracer_span_destroy(span: *const c_void) -> () = ();
}

#[cfg(test)]
mod tests {
    #[test]
    fn config_is_checked() {
        assert!(super::config_new_impl("opentelemetry", b"{}").is_ok());
        assert!(super::config_new_impl("opentelemetry", b"").is_ok());
        assert_eq!(super::config_new_impl("opentelemetry", br#"{"x":1}"#).err().unwrap().field, "x");
        assert_eq!(super::config_new_impl("zipkin", b"{}").err().unwrap().field, "tracer_name");
    }
}
