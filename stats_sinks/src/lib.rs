//! `libenvoy_obs_stats_sink.so`: stat sinks for `envoy.stat_sinks.dynamic_modules`.
//!
//! - `sink_name: prometheus`: Envoy's `/stats/prometheus` text on a metrics-only listener.
//! - `sink_name: otlp`: OTLP metrics with the semantics of Envoy's built-in OpenTelemetry sink.
//!
//! Thread model: config hooks and `flush` on the main thread (flush copies the snapshot and
//! hands it to the sink's own thread); `on_histogram_complete` on whichever thread records a
//! histogram sample: a no-op (the snapshot's cumulative histograms are used instead).
use std::ffi::c_void;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use envoy_obs_abi as abi;
use envoy_obs_common::config::ConfigError;
use envoy_obs_common::declare_program_init;
use envoy_obs_common::ffi::stat_sink::{SinkHandle, Snapshot};
use envoy_obs_common::ffi::{self};
use envoy_obs_common::hook::{self, guard};

pub mod otlp;
pub mod prometheus;
pub mod snapshot;

use prometheus::{Server, ServerStats};
use snapshot::MetaCache;

declare_program_init!();

/// Sink gauges (registered by Envoy without a namespace prefix).
struct Health {
    handle: SinkHandle,
    scrapes: usize,
    render_us: usize,
    series: usize,
    flush_us: usize,
    flushes: usize,
    flush_count: std::sync::atomic::AtomicU64,
}

/// The Prometheus sink's config object.
pub struct PromSink {
    cache: std::sync::Mutex<MetaCache>,
    texts: bool,
    server: Option<Server>,
    stats: Arc<ServerStats>,
    health: Health,
}

/// The OTLP sink's config object.
pub struct OtlpMetricsSink {
    cache: std::sync::Mutex<MetaCache>,
    sink: Option<otlp::OtlpSink>,
    export: Arc<envoy_obs_common::otlp::ExportStats>,
    handle: SinkHandle,
    gauges: [usize; 5],
}

/// What Envoy's config pointer points at.
pub enum Sink {
    /// `sink_name: prometheus`
    Prometheus(PromSink),
    /// `sink_name: otlp`
    Otlp(OtlpMetricsSink),
}

/// Unix time in nanoseconds.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

fn config_new_impl(handle: SinkHandle, name: &str, config: &[u8]) -> Result<Sink, ConfigError> {
    match name {
        "prometheus" => {
            let (cfg, opts) = prometheus::compile(config)?;
            let g =
                |n: &str| handle.define_gauge(&format!("obs_sink.prometheus.{n}")).map_err(|e| ConfigError::new("", e));
            let health = Health {
                handle,
                scrapes: g("scrapes_served")?,
                render_us: g("render_us")?,
                series: g("series")?,
                flush_us: g("flush_us")?,
                flushes: g("flushes")?,
                flush_count: Default::default(),
            };
            let stats = Arc::new(ServerStats::default());
            let texts = opts.text_readouts;
            let server = if ffi::is_validation_mode() { None } else { Some(Server::start(&cfg, opts, stats.clone())?) };
            Ok(Sink::Prometheus(PromSink { cache: Default::default(), texts, server, stats, health }))
        }
        "otlp" => {
            let c = otlp::compile(config, &|k| std::env::var(k).ok())?;
            let g = |n: &str| handle.define_gauge(&format!("obs_sink.otlp.{n}")).map_err(|e| ConfigError::new("", e));
            let gauges = [
                g("exports_ok")?,
                g("exports_failed")?,
                g("snapshots_skipped")?,
                g("points_exported")?,
                g("points_failed")?,
            ];
            let export = Arc::new(envoy_obs_common::otlp::ExportStats::default());
            let sink = if ffi::is_validation_mode() { None } else { Some(otlp::OtlpSink::start(c, export.clone())?) };
            Ok(Sink::Otlp(OtlpMetricsSink { cache: Default::default(), sink, export, handle, gauges }))
        }
        other => Err(ConfigError::new("sink_name", format!("unknown sink {other:?}; expected: prometheus, otlp"))),
    }
}

impl OtlpMetricsSink {
    fn flush(&self, snap: &Snapshot<'_>) {
        // The cache holds only data derived from names: after a panic while it was held (caught
        // by the hook) it is still usable, and flushes must not stop silently.
        if let Some(sink) = &self.sink {
            let mut cache = self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            sink.publish(cache.read(snap, false, now_ns()));
            let (s, e, h) = (&sink.stats, &self.export, self.handle);
            let [ok, failed, skipped, points, points_failed] = self.gauges;
            h.set_gauge(ok, s.exports_ok.load(Relaxed));
            h.set_gauge(failed, s.exports_failed.load(Relaxed));
            h.set_gauge(skipped, s.snapshots_skipped.load(Relaxed));
            h.set_gauge(points, e.exported.load(Relaxed));
            h.set_gauge(points_failed, e.failed.load(Relaxed));
        }
    }
}

impl PromSink {
    fn flush(&self, snap: &Snapshot<'_>) {
        let t0 = Instant::now();
        let now = now_ns();
        if let Some(server) = &self.server {
            let mut cache = self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            server.publish(cache.read(snap, self.texts, now));
        }
        let h = &self.health;
        h.handle.set_gauge(h.flush_us, t0.elapsed().as_micros() as u64);
        h.handle.set_gauge(h.scrapes, self.stats.scrapes.load(Relaxed));
        h.handle.set_gauge(h.render_us, self.stats.render_us.load(Relaxed));
        h.handle.set_gauge(h.series, self.stats.series.load(Relaxed));
        // Last: a reader that sees N flushes sees the snapshot of flush N served.
        h.handle.set_gauge(h.flushes, h.flush_count.fetch_add(1, Relaxed) + 1);
    }
}

/// # Safety
/// Called by Envoy on the main thread with valid buffers and its config handle.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_stat_sink_config_new(
    config_envoy_ptr: *mut c_void,
    name: abi::EB,
    config: abi::EB,
) -> *const c_void {
    // SAFETY: Envoy's buffers for this call; the handle lives until config_destroy.
    unsafe {
        let handle = SinkHandle::new(config_envoy_ptr);
        hook::config_new("on_stat_sink_config_new", "stats sink", "sink_config", name, config, |n, b| {
            config_new_impl(handle, n, b)
        })
    }
}

/// # Safety
/// `config_module_ptr` comes from `config_new`.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_stat_sink_config_destroy(config_module_ptr: *const c_void) {
    // SAFETY: Envoy destroys the pointer config_new returned, once; dropping it stops the server.
    unsafe { hook::destroy::<Sink>("on_stat_sink_config_destroy", config_module_ptr) }
}

/// # Safety
/// Called on the main thread with our config and a snapshot valid during the call.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_stat_sink_flush(
    config_module_ptr: *const c_void,
    snapshot: *mut c_void,
) {
    guard("on_stat_sink_flush", (), || {
        // SAFETY: the config lives until destroy; the snapshot during this call.
        let (Some(sink), snap) =
            (unsafe { (config_module_ptr as *const Sink).as_ref() }, unsafe { Snapshot::new(snapshot) })
        else {
            return;
        };
        match sink {
            Sink::Prometheus(p) => p.flush(&snap),
            Sink::Otlp(o) => o.flush(&snap),
        }
    })
}

/// Called for every histogram sample on any thread: must stay lock-free and cheap. Unused: the
/// snapshot's cumulative histograms carry the same information at flush time.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_stat_sink_on_histogram_complete(
    _config: *const c_void,
    _name: abi::EB,
    _value: u64,
) {
}
