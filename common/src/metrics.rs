//! Self-metrics in Envoy's stats, the same way for every module kind: a [`Metrics`] handle
//! (one per kind's ABI) and [`PipelineMetrics`], the reporter that publishes a pipeline's
//! totals and, for OTLP signals, the export counters, as deltas from the flush thread.
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use crate::envoy_log;
use crate::ffi::LogLevel;
use crate::otlp::ExportStats;
use crate::pipeline::{Reporter, Totals};
use crate::timing::{quantile, BUCKETS};

/// A counter defined at config load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CounterId(pub(crate) usize);
/// A gauge defined at config load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GaugeId(pub(crate) usize);

/// Envoy's metric callbacks of one module kind. Define only in `config_new`; `add` / `set`
/// are thread-safe.
pub trait Metrics: Copy + Send + Sync + 'static {
    /// Defines a counter; Envoy prefixes the name with the module's `metrics_namespace`.
    fn define_counter(&self, name: &str) -> Result<CounterId, String>;
    /// Defines a gauge.
    fn define_gauge(&self, name: &str) -> Result<GaugeId, String>;
    /// Adds `v` to a counter.
    fn add(&self, id: CounterId, v: u64);
    /// Sets a gauge.
    fn set(&self, id: GaugeId, v: u64);
}

/// Counter names of one pipeline, under `prefix` (e.g. `access_log.json.`).
pub struct Names<'a> {
    /// Prefix of every name, ending in a dot.
    pub prefix: String,
    /// Records produced (queued + dropped).
    pub produced: &'a str,
    /// Records delivered.
    pub written: &'a str,
    /// Records dropped because the queue was full.
    pub dropped: &'a str,
    /// Records skipped by the producer (filters, sampling).
    pub skipped: &'a str,
    /// Records the exporter gave up on.
    pub failed: &'a str,
    /// Of those, records the collector rejected (OTLP partial success).
    pub rejected: &'a str,
    /// If set: produced + skipped (e.g. spans started, sampled or not).
    pub total: Option<&'a str>,
    /// What to call the records in log lines ("access logger", "tracer").
    pub label: String,
}

struct ExportIds {
    stats: Arc<ExportStats>,
    ids: [CounterId; 4],
    latency_p50: GaugeId,
    latency_p99: GaugeId,
    last: [u64; 4],
}

/// Publishes [`Totals`] (and export counters) as Envoy stats; runs on the flush thread.
pub struct PipelineMetrics<M: Metrics> {
    m: M,
    counters: [CounterId; 5],
    total: Option<CounterId>,
    queue_depth: GaugeId,
    worker_ns: Option<(CounterId, GaugeId, GaugeId)>,
    export: Option<ExportIds>,
    last: Totals,
    /// Highest (queued + dropped) and (queued + dropped + skipped) published so far.
    seen: [u64; 2],
    label: String,
}

impl<M: Metrics> PipelineMetrics<M> {
    /// Defines the counters. `self_timing` adds `worker_ns` (+ p50/p99 gauges); `export`
    /// adds the rejected counter, `export_requests`, `export_failures`, `export_retries` and
    /// the export latency gauges.
    pub fn define(m: M, n: &Names<'_>, self_timing: bool, export: Option<Arc<ExportStats>>) -> Result<Self, String> {
        let p = |s: &str| format!("{}{s}", n.prefix);
        let c = |s: &str| m.define_counter(&p(s));
        let g = |s: &str| m.define_gauge(&p(s));
        let export = match export {
            Some(stats) => Some(ExportIds {
                stats,
                ids: [c("export_retries")?, c(n.rejected)?, c("export_requests")?, c("export_failures")?],
                latency_p50: g("export_latency_ms_p50")?,
                latency_p99: g("export_latency_ms_p99")?,
                last: [0; 4],
            }),
            None => None,
        };
        Ok(PipelineMetrics {
            m,
            counters: [c(n.produced)?, c(n.written)?, c(n.dropped)?, c(n.skipped)?, c(n.failed)?],
            total: n.total.map(c).transpose()?,
            queue_depth: g("queue_depth")?,
            worker_ns: if self_timing {
                Some((c("worker_ns")?, g("worker_ns_p50")?, g("worker_ns_p99")?))
            } else {
                None
            },
            export,
            last: Totals::default(),
            seen: [0; 2],
            label: n.label.clone(),
        })
    }
}

impl<M: Metrics> Reporter for PipelineMetrics<M> {
    fn report(&mut self, t: &Totals) {
        let (l, m) = (&self.last, self.m);
        let [produced, written, dropped, skipped, failed] = self.counters;
        // queued + dropped only grows, but two separate loads may catch a shared slot moving
        // records from queued to dropped half-way: count against the highest sum seen.
        let accepted = t.queued + t.dropped;
        m.add(produced, accepted.saturating_sub(self.seen[0]));
        self.seen[0] = self.seen[0].max(accepted);
        m.add(written, t.written - l.written);
        m.add(dropped, t.dropped - l.dropped);
        m.add(skipped, t.skipped - l.skipped);
        m.add(failed, t.failed - l.failed);
        if let Some(total) = self.total {
            let all = accepted + t.skipped;
            m.add(total, all.saturating_sub(self.seen[1]));
            self.seen[1] = self.seen[1].max(all);
        }
        m.set(self.queue_depth, t.queue_depth);
        if let Some((total, p50, p99)) = self.worker_ns {
            m.add(total, t.busy_ns - l.busy_ns);
            m.set(p50, quantile(&t.busy_hist, 0.5));
            m.set(p99, quantile(&t.busy_hist, 0.99));
        }
        if let Some(e) = &mut self.export {
            let s = &e.stats;
            let now = [
                s.retries.load(Relaxed),
                s.rejected.load(Relaxed),
                s.requests.load(Relaxed),
                s.failed_requests.load(Relaxed),
            ];
            for ((id, n), l) in e.ids.into_iter().zip(now).zip(e.last) {
                m.add(id, n - l);
            }
            e.last = now;
            let mut hist = vec![0; BUCKETS];
            s.latency_us.accumulate(&mut hist);
            m.set(e.latency_p50, quantile(&hist, 0.5) / 1000);
            m.set(e.latency_p99, quantile(&hist, 0.99) / 1000);
        }
        if l.dropped == 0 && t.dropped > 0 {
            envoy_log!(
                LogLevel::Warn,
                "envoy-obs {}: queue full, dropping new records (see the dropped counter; raise queue_capacity)",
                self.label
            );
        }
        self.last = t.clone();
    }
}
