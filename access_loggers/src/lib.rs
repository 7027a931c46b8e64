//! `libenvoy_obs_access_log.so`: Envoy access loggers (`logger_name: json`, `logger_name: otlp`).
//!
//! Thread model (Envoy 1.40 access-logger ABI):
//! - `config_new` / `config_destroy` run on the main thread. The config owns the flush thread.
//! - `on_access_logger_new` runs once per Envoy thread (each worker and the main thread) and
//!   returns a per-thread logger bound to that worker's queue; `log` and `destroy` for it run
//!   on that same thread, so it needs no synchronisation.
//! - `log` does only reads through the ABI and a copy of what they return into this worker's
//!   batch (the JSON is rendered later, on the flush thread).
use std::ffi::c_void;
use std::ptr;

use envoy_obs_abi as abi;
use envoy_obs_common::config::ConfigError;
use envoy_obs_common::declare_program_init;
use envoy_obs_common::ffi;
use envoy_obs_common::ffi::access_log::{ConfigHandle, LogStream};
use envoy_obs_common::hook::{self, guard};
use envoy_obs_common::metrics::{Names, PipelineMetrics};
use envoy_obs_common::otlp::ExportStats;
use std::sync::Arc;

pub mod filter;
pub mod format;
pub mod json;
pub mod logger;
pub mod otlp;

#[cfg(test)]
mod fuzz;

declare_program_init!();

fn metrics(
    handle: ConfigHandle,
    name: &str,
    prefix: &str,
    self_timing: bool,
    (written, failed): (&str, &str),
    export: Option<Arc<ExportStats>>,
) -> Result<PipelineMetrics<ConfigHandle>, ConfigError> {
    let names = Names {
        prefix: format!("access_log.{prefix}."),
        produced: "records_logged",
        written,
        dropped: "records_dropped",
        skipped: "records_filtered",
        failed,
        rejected: "records_rejected",
        total: None,
        label: format!("{name} access logger"),
    };
    PipelineMetrics::define(handle, &names, self_timing, export).map_err(|e| ConfigError::new("", e))
}

/// What Envoy's config pointer points at.
pub enum LoggerConfig {
    /// `logger_name: json`
    Json(json::JsonLogger),
    /// `logger_name: otlp`
    Otlp(otlp::OtlpLogger),
}

/// Builds a logger config. Pure except for the metric definitions and file open.
fn config_new_impl(handle: ConfigHandle, name: &str, config: &[u8]) -> Result<LoggerConfig, ConfigError> {
    let validation = ffi::is_validation_mode();
    // One slot per worker plus the main thread's logger (index == concurrency).
    let slots = ffi::concurrency() as usize + 1;
    match name {
        "json" => {
            let c = json::compile(config)?;
            let names = ("records_written", "write_errors");
            let metrics = metrics(handle, name, &c.config.stat_prefix, c.config.self_timing, names, None)?;
            Ok(LoggerConfig::Json(json::start(c, validation, slots, metrics)?))
        }
        "otlp" => {
            let c = otlp::compile(config, &|k| std::env::var(k).ok())?;
            let stats = Arc::new(ExportStats::default());
            let names = ("records_exported", "records_failed");
            let metrics =
                metrics(handle, name, &c.config.stat_prefix, c.config.self_timing, names, Some(stats.clone()))?;
            Ok(LoggerConfig::Otlp(otlp::start(c, validation, slots, stats, metrics)?))
        }
        other => Err(ConfigError::new("logger_name", format!("unknown logger {other:?}; expected one of: json, otlp"))),
    }
}

/// # Safety
/// Called by Envoy on the main thread with a valid config handle and buffers.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_access_logger_config_new(
    config_envoy_ptr: *mut c_void,
    name: abi::EB,
    config: abi::EB,
) -> *const c_void {
    // SAFETY: Envoy's buffers for this call; the handle lives until config_destroy.
    unsafe {
        let handle = ConfigHandle::new(config_envoy_ptr);
        hook::config_new("on_access_logger_config_new", "access logger", "logger_config", name, config, |n, b| {
            config_new_impl(handle, n, b)
        })
    }
}

/// # Safety
/// `config_module_ptr` must come from `config_new` and not be used afterwards.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_access_logger_config_destroy(config_module_ptr: *const c_void) {
    // SAFETY: Envoy destroys the pointer config_new returned, once, after every per-thread
    // logger is gone; dropping it drains and joins the flush thread.
    unsafe { hook::destroy::<LoggerConfig>("on_access_logger_config_destroy", config_module_ptr) }
}

/// Per-thread logger object.
pub enum ThreadLogger {
    /// JSON
    Json(logger::ThreadLogger<format::JsonPlan>),
    /// OTLP
    Otlp(logger::ThreadLogger<otlp::OtlpPlan>),
}

/// # Safety
/// Called by Envoy on each thread with our config pointer and that thread's logger context.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_access_logger_new(
    config_module_ptr: *const c_void,
    logger_envoy_ptr: *mut c_void,
) -> *const c_void {
    guard("on_access_logger_new", ptr::null(), || {
        if config_module_ptr.is_null() {
            return ptr::null();
        }
        // SAFETY: the config outlives every per-thread logger (Envoy's destroy order).
        let config = unsafe { &*(config_module_ptr as *const LoggerConfig) };
        // SAFETY: Envoy's logger context for this thread; get_worker_index is valid outside log.
        let index = unsafe { LogStream::worker_index(logger_envoy_ptr) } as usize;
        let tl = match config {
            LoggerConfig::Json(j) => ThreadLogger::Json(j.thread_logger(index)),
            LoggerConfig::Otlp(o) => ThreadLogger::Otlp(o.thread_logger(index)),
        };
        Box::into_raw(Box::new(tl)) as *const c_void
    })
}

/// # Safety
/// Called by Envoy inside a stream's access-log phase on the logger's own thread.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_access_logger_log(
    logger_envoy_ptr: *mut c_void,
    logger_module_ptr: *const c_void,
    log_type: u32,
) {
    guard("on_access_logger_log", (), || {
        if logger_module_ptr.is_null() {
            return;
        }
        // SAFETY: created in on_access_logger_new for this thread and alive until destroy;
        // the stream view is valid for the duration of this hook only.
        let (tl, stream) = unsafe { (&*(logger_module_ptr as *const ThreadLogger), LogStream::new(logger_envoy_ptr)) };
        match tl {
            ThreadLogger::Json(j) => j.log(&stream, log_type),
            ThreadLogger::Otlp(o) => o.log(&stream, log_type),
        }
    })
}

/// # Safety
/// `logger_module_ptr` must come from `on_access_logger_new` and not be used afterwards.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_access_logger_destroy(logger_module_ptr: *const c_void) {
    // SAFETY: created by Box::into_raw in on_access_logger_new; destroyed once, on its thread.
    unsafe { hook::destroy::<ThreadLogger>("on_access_logger_destroy", logger_module_ptr) }
}

// Compile-time check that our hooks have exactly the prototypes of our C header.
const _: () = {
    let _: unsafe extern "C" fn(*mut c_void, abi::EB, abi::EB) -> *const c_void =
        envoy_dynamic_module_on_access_logger_config_new;
    let _: unsafe extern "C" fn(*const c_void) = envoy_dynamic_module_on_access_logger_config_destroy;
    let _: unsafe extern "C" fn(*const c_void, *mut c_void) -> *const c_void =
        envoy_dynamic_module_on_access_logger_new;
    let _: unsafe extern "C" fn(*mut c_void, *const c_void, u32) = envoy_dynamic_module_on_access_logger_log;
    let _: unsafe extern "C" fn(*const c_void) = envoy_dynamic_module_on_access_logger_destroy;
};
