//! `libenvoy_obs_stats_sink.so`: stat sinks (`sink_name: prometheus | otlp`).
//!
//! Status: the foundation only. The module loads, validates its (so far empty) config and
//! exports every required hook of Envoy 1.40's stat-sink kind; `flush` and
//! `on_histogram_complete` do nothing yet. The Prometheus endpoint and OTLP push come with the
//! stats-sink issue.
//!
//! Thread model: config hooks and `flush` on the main thread; `on_histogram_complete` on
//! whichever thread records a histogram sample (must stay lock-free; it is a no-op).
use std::ffi::c_void;

use envoy_obs_abi as abi;
use envoy_obs_common::config::{parse, ConfigError};
use envoy_obs_common::declare_program_init;
use envoy_obs_common::hook;
use serde::Deserialize;

declare_program_init!();

/// `sink_config`; keys arrive with the stats-sink issue. Unknown keys are rejected.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {}

/// The sink config object.
pub struct Sink;

fn config_new_impl(name: &str, config: &[u8]) -> Result<Sink, ConfigError> {
    if !matches!(name, "prometheus" | "otlp") {
        return Err(ConfigError::new("sink_name", format!("unknown sink {name:?}; expected: prometheus, otlp")));
    }
    let _: SinkConfig = parse(config)?;
    Ok(Sink)
}

/// # Safety
/// Called by Envoy on the main thread with valid buffers.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_stat_sink_config_new(
    _config_envoy_ptr: *mut c_void,
    name: abi::EB,
    config: abi::EB,
) -> *const c_void {
    // SAFETY: Envoy's buffers for this call.
    unsafe { hook::config_new("on_stat_sink_config_new", "stats sink", "sink_config", name, config, config_new_impl) }
}

/// # Safety
/// `config_module_ptr` comes from `config_new`.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_stat_sink_config_destroy(config_module_ptr: *const c_void) {
    // SAFETY: Envoy destroys the pointer config_new returned, once.
    unsafe { hook::destroy::<Sink>("on_stat_sink_config_destroy", config_module_ptr) }
}

/// Main-thread flush: nothing to do yet.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_stat_sink_flush(_config: *const c_void, _snapshot: *mut c_void) {}

/// Called for every histogram sample on any thread: must stay lock-free and cheap.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_stat_sink_on_histogram_complete(
    _config: *const c_void,
    _name: abi::EB,
    _value: u64,
) {
}

#[cfg(test)]
mod tests {
    #[test]
    fn config_is_checked() {
        assert!(super::config_new_impl("prometheus", b"{}").is_ok());
        assert_eq!(super::config_new_impl("otlp", br#"{"x":1}"#).err().unwrap().field, "x");
        assert_eq!(super::config_new_impl("statsd", b"").err().unwrap().field, "sink_name");
    }
}
