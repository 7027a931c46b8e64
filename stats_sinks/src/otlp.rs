//! `sink_name: otlp` — Envoy's stats as OTLP metrics, with the semantics of Envoy's built-in
//! `envoy.stat_sinks.open_telemetry`: counters as monotonic sums, gauges as gauges,
//! histograms as explicit-bucket histograms with Envoy's bounds, cumulative or delta.
//!
//! The main thread's `flush` copies the snapshot (shared with the Prometheus sink) and hands it
//! to the sink's exporter thread, which encodes and sends it with the shared OTLP core. Only
//! the newest snapshot waits: while an export is slow, a newer snapshot replaces a waiting one.
//! Deltas are computed by the exporter against the last snapshot it exported, so a replaced
//! snapshot loses no counts.
//!
//! Like Envoy's sinks it skips unused stats, approximated from values (the ABI has no "used"
//! flag): counters that never counted and histograms without samples are left out; all gauges
//! are sent (Envoy's sink also sends used gauges whose value is 0).
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Deserialize;

use envoy_obs_common::config::{parse, ConfigError};
use envoy_obs_common::otlp::{self, proto, ExportStats, OtlpConfig, OtlpExporter, Settings, Signal};
use envoy_obs_common::stop::StopSignal;

use crate::snapshot::{Meta, Stats};

fn yes() -> bool {
    true
}

/// The sink's own keys (the OTLP keys sit beside them).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtlpSinkConfig {
    /// Counters as deltas since the previous export (default: cumulative).
    #[serde(default)]
    pub report_counters_as_deltas: bool,
    /// Histograms as deltas since the previous export (default: cumulative).
    #[serde(default)]
    pub report_histograms_as_deltas: bool,
    /// Stat tags as data-point attributes.
    #[serde(default = "yes")]
    pub emit_tags_as_attributes: bool,
    /// Metric names without the tag values (`cluster.upstream_rq_total`).
    #[serde(default = "yes")]
    pub use_tag_extracted_name: bool,
    /// Prepended to every metric name, followed by a dot.
    #[serde(default)]
    pub prefix: String,
}

/// Everything checked at config load.
pub struct Compiled {
    /// The sink's own keys.
    pub config: OtlpSinkConfig,
    /// OTLP settings.
    pub settings: Settings,
}

/// Metric points per request when `max_batch_size` is not set.
const DEFAULT_POINTS_PER_REQUEST: usize = 8192;
/// Bound on Envoy's shutdown wait for this sink: the export in progress and one last export.
const SHUTDOWN_EXPORT: Duration = Duration::from_secs(5);

/// Parses and validates the config.
pub fn compile(bytes: &[u8], env: &dyn Fn(&str) -> Option<String>) -> Result<Compiled, ConfigError> {
    let (otlp_part, rest) = otlp::split_config(bytes)?;
    let otlp_cfg: OtlpConfig = parse(&otlp_part)?;
    let config: OtlpSinkConfig = parse(&rest)?;
    let mut settings = otlp::resolve(&otlp_cfg, Signal::Metrics, env)?;
    if otlp_cfg.max_batch_size.is_none() {
        settings.max_batch_size = DEFAULT_POINTS_PER_REQUEST;
    }
    if config.prefix.contains(char::is_whitespace) {
        return Err(ConfigError::new("prefix", "must not contain spaces"));
    }
    Ok(Compiled { config, settings })
}

/// Export counters, published as sink gauges on the main thread.
#[derive(Default)]
pub struct SinkStats {
    /// Snapshots exported (completely delivered).
    pub exports_ok: AtomicU64,
    /// Snapshots with at least one failed request.
    pub exports_failed: AtomicU64,
    /// Snapshots replaced by a newer one before they were exported.
    pub snapshots_skipped: AtomicU64,
}

struct Inbox {
    next: Mutex<Option<Arc<Stats>>>,
    cv: Condvar,
    stop: AtomicBool,
}

/// The exporter thread; dropping it exports what is waiting (bounded) and joins.
pub struct OtlpSink {
    inbox: Arc<Inbox>,
    thread: Option<JoinHandle<()>>,
    /// Counters for the health gauges.
    pub stats: Arc<SinkStats>,
    stop: StopSignal,
}

impl OtlpSink {
    /// Starts the exporter thread (nothing connects until the first export).
    pub fn start(c: Compiled, export_stats: Arc<ExportStats>) -> Result<OtlpSink, ConfigError> {
        let inbox = Arc::new(Inbox { next: Mutex::new(None), cv: Condvar::new(), stop: AtomicBool::new(false) });
        let stats = Arc::new(SinkStats::default());
        let mut w = Worker {
            exporter: OtlpExporter::new(c.settings, "envoy-obs.stats_sink", "otlp stats sink", export_stats.clone()),
            export_stats,
            config: c.config,
            start_ns: crate::now_ns(),
            last: None,
            stats: stats.clone(),
        };
        let stop = w.exporter.stop_signal();
        let ib = inbox.clone();
        let thread = std::thread::Builder::new()
            .name("obs-otlp-metrics".into())
            .spawn(move || w.run(&ib))
            .map_err(|e| ConfigError::new("", format!("cannot start the exporter thread: {e}")))?;
        Ok(OtlpSink { inbox, thread: Some(thread), stats, stop })
    }

    /// Hands over a snapshot (main thread): replaces one still waiting.
    pub fn publish(&self, s: Stats) {
        // The slot holds plain data: a panic elsewhere while holding it leaves nothing broken.
        let mut n = self.inbox.next.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if n.replace(Arc::new(s)).is_some() {
            self.stats.snapshots_skipped.fetch_add(1, Relaxed);
        }
        self.inbox.cv.notify_one();
    }
}

impl Drop for OtlpSink {
    fn drop(&mut self) {
        // An export in progress (a dead collector: retries for up to `retry.max_elapsed_ms`)
        // ends by this deadline, and so does the last export below.
        self.stop.stop_by(Instant::now() + SHUTDOWN_EXPORT);
        self.inbox.stop.store(true, Relaxed);
        self.inbox.cv.notify_one();
        if let Some(t) = self.thread.take() {
            if !envoy_obs_common::stop::join_by(t, Instant::now() + SHUTDOWN_EXPORT + Duration::from_secs(1)) {
                envoy_obs_common::envoy_log!(
                    envoy_obs_common::ffi::LogLevel::Warn,
                    "envoy-obs: OTLP metrics thread did not stop in time; left behind"
                );
            }
        }
    }
}

/// Cumulative values last exported, by full name, for deltas; with each series' cumulative
/// start time.
#[derive(Default)]
struct Last {
    time_ns: u64,
    /// (value, start)
    counters: HashMap<Vec<u8>, (u64, u64)>,
    /// (count, sum, per-bucket counts, start)
    histograms: HashMap<Vec<u8>, (u64, f64, Vec<u64>, u64)>,
}

impl Last {
    /// The cumulative start time of a series (OTLP metrics data model, CUMULATIVE): the sink's
    /// start on the first export; for a series first seen later, or one that was reset since
    /// (`reset`: a stat re-created, `/reset_counters`), the previous export's time — the
    /// spec's "new fixed start time following the last reported measurement"; else what it was.
    fn start(last: Option<&Last>, sink_start: u64, prev: Option<(u64, u64)>, reset: bool) -> u64 {
        match (last, prev) {
            (None, _) => sink_start,
            (Some(l), None) => l.time_ns,
            (Some(l), Some(_)) if reset => l.time_ns,
            (Some(_), Some((_, start))) => start,
        }
    }
}

struct Worker {
    exporter: OtlpExporter,
    export_stats: Arc<ExportStats>,
    config: OtlpSinkConfig,
    start_ns: u64,
    last: Option<Last>,
    stats: Arc<SinkStats>,
}

impl Worker {
    fn run(&mut self, inbox: &Inbox) {
        loop {
            let next = {
                let mut g = inbox.next.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                while g.is_none() && !inbox.stop.load(Relaxed) {
                    g = match inbox.cv.wait_timeout(g, Duration::from_millis(500)) {
                        Ok((g, _)) => g,
                        Err(poisoned) => poisoned.into_inner().0,
                    };
                }
                g.take()
            };
            // Stopping: one last export, bounded by the deadline Drop set before asking.
            let stopping = inbox.stop.load(Relaxed);
            if let Some(s) = next {
                // A panic in one export must not end the thread: later snapshots would only
                // pile up as skipped. It counts as a failed export.
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.export(&s))).is_err() {
                    self.stats.exports_failed.fetch_add(1, Relaxed);
                }
            }
            if stopping {
                return;
            }
        }
    }

    fn export(&mut self, s: &Stats) {
        let failed_before = self.export_stats.failed.load(Relaxed);
        let c = &self.config;
        let (cum_start, delta_start) = (self.start_ns, self.last.as_ref().map_or(self.start_ns, |l| l.time_ns));
        let mut next = Last { time_ns: s.time_ns, ..Last::default() };
        let mut name = String::new();
        // Envoy's sinks export only stats marked "used"; the 1.40 ABI does not expose the flag, so:
        // counters that ever counted (cumulative > 0), histograms with samples, and every gauge.
        let last = self.last.as_ref();
        for v in s.counters.iter().filter(|v| v.value > 0) {
            let prev = last.and_then(|l| l.counters.get(&v.meta.name).copied());
            // Reset since the last export: it went down, or Envoy counted more since its last
            // flush than the value rose since our last export.
            let reset = prev.is_some_and(|(p, _)| v.value < p || v.value - p < v.delta);
            let series_start = Last::start(last, cum_start, prev, reset);
            next.counters.insert(v.meta.name.clone(), (v.value, series_start));
            // The increase since the last export; at least Envoy's own latched increase since
            // its last flush, which also counts what came before a reset within the interval.
            let (value, start) = if c.report_counters_as_deltas {
                (delta(v.value, prev.map_or(0, |p| p.0)).max(v.delta), delta_start)
            } else {
                (v.value, series_start)
            };
            // As Envoy 1.40's sink (checked against it): with deltas, a counter that did not
            // move is not sent.
            if c.report_counters_as_deltas && value == 0 {
                continue;
            }
            metric_name(c, &v.meta, &mut name);
            let temporality = if c.report_counters_as_deltas { 1 } else { 2 };
            self.exporter.add(|o| {
                proto::bytes(o, 1, name.as_bytes());
                proto::message(o, 7, |o| {
                    proto::message(o, 1, |o| number_point(o, c, &v.meta, start, s.time_ns, value as i64));
                    proto::uint(o, 2, temporality);
                    proto::uint(o, 3, 1);
                });
            });
        }
        for v in &s.gauges {
            metric_name(c, &v.meta, &mut name);
            self.exporter.add(|o| {
                proto::bytes(o, 1, name.as_bytes());
                proto::message(o, 5, |o| {
                    proto::message(o, 1, |o| number_point(o, c, &v.meta, 0, s.time_ns, v.value as i64))
                });
            });
        }
        for h in s.histograms.iter().filter(|h| h.count > 0) {
            let mut counts: Vec<u64> = Vec::with_capacity(h.buckets.len() + 1);
            let mut below = 0;
            for &(_, cum) in &h.buckets {
                counts.push(cum.saturating_sub(below));
                below = cum;
            }
            counts.push(h.count.saturating_sub(below));
            let (mut count, mut sum, mut per_bucket) = (h.count, h.sum, counts.clone());
            let prev = last.and_then(|l| l.histograms.get(&h.meta.name));
            let series_start =
                Last::start(last, cum_start, prev.map(|p| (p.0, p.3)), prev.is_some_and(|p| h.count < p.0));
            let mut start = series_start;
            if c.report_histograms_as_deltas {
                start = delta_start;
                // A histogram with fewer samples than last time was re-created: all of it is new
                // (as for counters, see `delta`).
                if let Some((pc, ps, pb, _)) = prev.filter(|p| p.0 <= h.count) {
                    count -= pc;
                    sum -= ps;
                    for (b, p) in per_bucket.iter_mut().zip(pb) {
                        *b = b.saturating_sub(*p);
                    }
                }
            }
            next.histograms.insert(h.meta.name.clone(), (h.count, h.sum, counts, series_start));
            if c.report_histograms_as_deltas && count == 0 {
                continue;
            }
            metric_name(c, &h.meta, &mut name);
            let temporality = if c.report_histograms_as_deltas { 1 } else { 2 };
            self.exporter.add(|o| {
                proto::bytes(o, 1, name.as_bytes());
                proto::message(o, 9, |o| {
                    proto::message(o, 1, |o| {
                        attributes(o, c, &h.meta, 9);
                        proto::fixed64(o, 2, start);
                        proto::fixed64(o, 3, s.time_ns);
                        proto::fixed64(o, 4, count);
                        proto::double(o, 5, sum);
                        proto::message(o, 6, |o| per_bucket.iter().for_each(|b| o.extend_from_slice(&b.to_le_bytes())));
                        proto::message(o, 7, |o| {
                            h.buckets.iter().for_each(|(le, _)| o.extend_from_slice(&le.to_bits().to_le_bytes()))
                        });
                    });
                    proto::uint(o, 2, temporality);
                });
            });
        }
        self.exporter.send_pending();
        self.last = Some(next);
        if self.export_stats.failed.load(Relaxed) == failed_before {
            self.stats.exports_ok.fetch_add(1, Relaxed);
        } else {
            self.stats.exports_failed.fetch_add(1, Relaxed);
        }
    }
}

/// The change of a cumulative count since the last export. A count below the last one belongs
/// to a stat that was re-created (a cluster removed and added back by CDS): all of it is new, as
/// Envoy's own per-flush delta counts it.
fn delta(now: u64, prev: u64) -> u64 {
    if now < prev {
        now
    } else {
        now - prev
    }
}

fn metric_name(c: &OtlpSinkConfig, m: &Meta, out: &mut String) {
    out.clear();
    if !c.prefix.is_empty() {
        out.push_str(&c.prefix);
        out.push('.');
    }
    let n = if c.use_tag_extracted_name { &m.extracted } else { &m.name };
    out.push_str(&String::from_utf8_lossy(n));
}

fn attributes(o: &mut Vec<u8>, c: &OtlpSinkConfig, m: &Meta, field: u32) {
    if c.emit_tags_as_attributes {
        for (k, v) in &m.tags {
            proto::kv_str(o, field, &utf8(k), &utf8(v));
        }
    }
}

fn number_point(o: &mut Vec<u8>, c: &OtlpSinkConfig, m: &Meta, start: u64, time: u64, v: i64) {
    attributes(o, c, m, 7);
    if start > 0 {
        proto::fixed64(o, 2, start);
    }
    proto::fixed64(o, 3, time);
    // as_int is sfixed64 (wire type 1).
    proto::fixed64(o, 6, v as u64);
}

fn utf8(b: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    match String::from_utf8_lossy(b) {
        std::borrow::Cow::Borrowed(_) => std::borrow::Cow::Borrowed(b),
        std::borrow::Cow::Owned(s) => std::borrow::Cow::Owned(s.into_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recreated_stat_counts_from_zero() {
        assert_eq!(delta(140, 100), 40);
        assert_eq!(delta(100, 100), 0);
        // Removed at 100 and added back: 40 new events, not 0 (saturating) nor a wrap.
        assert_eq!(delta(40, 100), 40);
    }

    #[test]
    fn config_defaults_and_errors() {
        let c = compile(b"{}", &|_| None).unwrap();
        assert!(c.config.emit_tags_as_attributes && c.config.use_tag_extracted_name);
        assert!(!c.config.report_counters_as_deltas);
        assert_eq!(c.settings.max_batch_size, DEFAULT_POINTS_PER_REQUEST);
        assert_eq!(
            compile(br#"{"report_counters_as_deltas":"yes"}"#, &|_| None).err().unwrap().field,
            "report_counters_as_deltas"
        );
        assert_eq!(compile(br#"{"protocol":"smtp"}"#, &|_| None).err().unwrap().field, "protocol");
        assert_eq!(compile(br#"{"bogus":1}"#, &|_| None).err().unwrap().field, "bogus");
    }
}
