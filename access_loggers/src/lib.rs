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
use envoy_obs_common::ffi::access_log::{ConfigHandle, CounterId, GaugeId, LogStream};
use envoy_obs_common::ffi::{self, LogLevel};
use envoy_obs_common::hook::{self, guard};
use envoy_obs_common::otlp::ExportStats;
use envoy_obs_common::pipeline::{Reporter, Totals};
use envoy_obs_common::timing::{quantile, BUCKETS};
use envoy_obs_common::{declare_program_init, envoy_log};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

pub mod filter;
pub mod format;
pub mod json;
pub mod logger;
pub mod otlp;

declare_program_init!();

/// Self-metrics published from the flush thread as deltas of the pipeline totals.
struct Metrics {
    handle: ConfigHandle,
    logged: CounterId,
    written: CounterId,
    dropped: CounterId,
    filtered: CounterId,
    failed: CounterId,
    queue_depth: GaugeId,
    worker_ns: Option<(CounterId, GaugeId, GaugeId)>,
    export: Option<ExportMetrics>,
    last: Totals,
    name: String,
}

/// The OTLP logger's export counters (from the shared OTLP core).
struct ExportMetrics {
    stats: Arc<ExportStats>,
    retries: CounterId,
    rejected: CounterId,
    requests: CounterId,
    failed_requests: CounterId,
    latency_p50: GaugeId,
    latency_p99: GaugeId,
    last: [u64; 4],
}

impl Metrics {
    /// `written`/`failed` are named per logger kind: `records_written`/`write_errors` for
    /// files, `records_exported`/`records_failed` for OTLP.
    fn define(
        handle: ConfigHandle,
        logger: &str,
        prefix: &str,
        self_timing: bool,
        names: (&str, &str),
        export: Option<Arc<ExportStats>>,
    ) -> Result<Self, String> {
        let n = |s: &str| format!("access_log.{prefix}.{s}");
        let export = match export {
            Some(stats) => Some(ExportMetrics {
                stats,
                retries: handle.define_counter(&n("export_retries"))?,
                rejected: handle.define_counter(&n("records_rejected"))?,
                requests: handle.define_counter(&n("export_requests"))?,
                failed_requests: handle.define_counter(&n("export_failures"))?,
                latency_p50: handle.define_gauge(&n("export_latency_ms_p50"))?,
                latency_p99: handle.define_gauge(&n("export_latency_ms_p99"))?,
                last: [0; 4],
            }),
            None => None,
        };
        Ok(Metrics {
            handle,
            logged: handle.define_counter(&n("records_logged"))?,
            written: handle.define_counter(&n(names.0))?,
            dropped: handle.define_counter(&n("records_dropped"))?,
            filtered: handle.define_counter(&n("records_filtered"))?,
            failed: handle.define_counter(&n(names.1))?,
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
            export,
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
        h.add(self.failed, t.failed - l.failed);
        h.set(self.queue_depth, t.queue_depth);
        if let Some((total, p50, p99)) = self.worker_ns {
            h.add(total, t.busy_ns - l.busy_ns);
            h.set(p50, quantile(&t.busy_hist, 0.5));
            h.set(p99, quantile(&t.busy_hist, 0.99));
        }
        if let Some(e) = &mut self.export {
            let s = &e.stats;
            let now = [
                s.retries.load(Relaxed),
                s.rejected.load(Relaxed),
                s.requests.load(Relaxed),
                s.failed_requests.load(Relaxed),
            ];
            for ((id, n), l) in [e.retries, e.rejected, e.requests, e.failed_requests].into_iter().zip(now).zip(e.last)
            {
                h.add(id, n - l);
            }
            e.last = now;
            let mut hist = vec![0; BUCKETS];
            s.latency_us.accumulate(&mut hist);
            h.set(e.latency_p50, quantile(&hist, 0.5) / 1000);
            h.set(e.latency_p99, quantile(&hist, 0.99) / 1000);
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
    /// `logger_name: otlp`
    Otlp(otlp::OtlpLogger),
}

/// Builds a logger config. Pure except for the metric definitions and file open.
fn config_new_impl(handle: ConfigHandle, name: &str, config: &[u8]) -> Result<LoggerConfig, ConfigError> {
    let validation = ffi::is_validation_mode();
    // One slot per worker plus the main thread's logger (index == concurrency).
    let slots = ffi::concurrency() as usize + 1;
    let metric_err = |e: String| ConfigError::new("", e);
    match name {
        "json" => {
            let c = json::compile(config)?;
            let names = ("records_written", "write_errors");
            let metrics = Metrics::define(handle, name, &c.config.stat_prefix, c.config.self_timing, names, None)
                .map_err(metric_err)?;
            Ok(LoggerConfig::Json(json::start(c, validation, slots, metrics)?))
        }
        "otlp" => {
            let c = otlp::compile(config, &|k| std::env::var(k).ok())?;
            let stats = Arc::new(ExportStats::default());
            let names = ("records_exported", "records_failed");
            let metrics =
                Metrics::define(handle, name, &c.config.stat_prefix, c.config.self_timing, names, Some(stats.clone()))
                    .map_err(metric_err)?;
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
