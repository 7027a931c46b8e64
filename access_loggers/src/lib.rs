//! `libenvoy_obs_access_log.so`: Envoy access loggers (`logger_name: json`).
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
use envoy_obs_common::ffi::access_log::{ConfigHandle, CounterId, GaugeId, LogStream};
use envoy_obs_common::ffi::{self, LogLevel};
use envoy_obs_common::hook::{self, guard};
use envoy_obs_common::pipeline::{Reporter, Totals};
use envoy_obs_common::timing::quantile;
use envoy_obs_common::{declare_program_init, envoy_log};

pub mod filter;
pub mod format;
pub mod json;

declare_program_init!();

/// Self-metrics published from the flush thread as deltas of the pipeline totals.
struct Metrics {
    handle: ConfigHandle,
    logged: CounterId,
    written: CounterId,
    dropped: CounterId,
    filtered: CounterId,
    write_errors: CounterId,
    queue_depth: GaugeId,
    worker_ns: Option<(CounterId, GaugeId, GaugeId)>,
    last: Totals,
    name: String,
}

impl Metrics {
    fn define(handle: ConfigHandle, logger: &str, prefix: &str, self_timing: bool) -> Result<Self, String> {
        let n = |s: &str| format!("access_log.{prefix}.{s}");
        Ok(Metrics {
            handle,
            logged: handle.define_counter(&n("records_logged"))?,
            written: handle.define_counter(&n("records_written"))?,
            dropped: handle.define_counter(&n("records_dropped"))?,
            filtered: handle.define_counter(&n("records_filtered"))?,
            write_errors: handle.define_counter(&n("write_errors"))?,
            queue_depth: handle.define_gauge(&n("queue_depth"))?,
            worker_ns: if self_timing {
                Some((
                    handle.define_counter(&n("worker_ns"))?,
                    handle.define_gauge(&n("worker_ns_p50"))?,
                    handle.define_gauge(&n("worker_ns_p99"))?,
                ))
            } else {
                None
            },
            last: Totals::default(),
            name: logger.to_string(),
        })
    }
}

impl Reporter for Metrics {
    fn report(&mut self, t: &Totals) {
        let l = &self.last;
        let h = self.handle;
        h.add(self.logged, (t.queued + t.dropped) - (l.queued + l.dropped));
        h.add(self.written, t.written - l.written);
        h.add(self.dropped, t.dropped - l.dropped);
        h.add(self.filtered, t.skipped - l.skipped);
        h.add(self.write_errors, t.failed - l.failed);
        h.set(self.queue_depth, t.queue_depth);
        if let Some((total, p50, p99)) = self.worker_ns {
            h.add(total, t.busy_ns - l.busy_ns);
            h.set(p50, quantile(&t.busy_hist, 0.5));
            h.set(p99, quantile(&t.busy_hist, 0.99));
        }
        if l.dropped == 0 && t.dropped > 0 {
            envoy_log!(
                LogLevel::Warn,
                "envoy-obs {} access logger: queue full, dropping new records (see records_dropped; raise queue_capacity)",
                self.name
            );
        }
        self.last = t.clone();
    }
}

/// What Envoy's config pointer points at.
pub enum LoggerConfig {
    /// `logger_name: json`
    Json(json::JsonLogger),
}

/// Builds a logger config. Pure except for the metric definitions and file open.
fn config_new_impl(handle: ConfigHandle, name: &str, config: &[u8]) -> Result<LoggerConfig, ConfigError> {
    match name {
        "json" => {
            let compiled = json::compile(config)?;
            let metrics = Metrics::define(handle, name, &compiled.config.stat_prefix, compiled.config.self_timing)
                .map_err(|e| ConfigError::new("", e))?;
            let validation = ffi::is_validation_mode();
            // One slot per worker plus the main thread's logger (index == concurrency).
            let slots = ffi::concurrency() as usize + 1;
            Ok(LoggerConfig::Json(json::JsonLogger::start(compiled, validation, slots, metrics)?))
        }
        other => Err(ConfigError::new("logger_name", format!("unknown logger {other:?}; expected one of: json"))),
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
    Json(json::ThreadLogger),
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
