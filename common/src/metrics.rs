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
    /// Moves this config's share of a gauge from `from` to `to`. Envoy hands every config
    /// defining the same name the same gauge (listeners sharing a `stat_prefix`, the old and new
    /// config during an update): adding and taking away makes it their sum, where `set` would
    /// make it whichever wrote last. Without increment callbacks (the tracer's ABI), a set.
    fn shift(&self, id: GaugeId, from: u64, to: u64) {
        let _ = from;
        self.set(id, to);
    }
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
    /// This config's share of the shared `queue_depth` gauge (shared with [`Reporter::retire`]).
    depth: Arc<std::sync::atomic::AtomicU64>,
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
            depth: Default::default(),
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
        m.shift(self.queue_depth, self.depth.swap(t.queue_depth, Relaxed), t.queue_depth);
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

    /// Takes this config's share out of `queue_depth` when its reports end early (a config
    /// destroyed on a worker): the gauge other configs share must not keep it.
    fn retire(&self) -> Option<Box<dyn FnOnce() + Send>> {
        let (m, id, depth) = (self.m, self.queue_depth, self.depth.clone());
        Some(Box::new(move || m.shift(id, depth.swap(0, Relaxed), 0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;

    /// Envoy's side: one gauge per name, whoever defines it.
    #[derive(Clone, Copy)]
    struct Shared(&'static Mutex<(Vec<String>, HashMap<usize, i64>)>);
    impl Metrics for Shared {
        fn define_counter(&self, name: &str) -> Result<CounterId, String> {
            Ok(CounterId(self.id(name)))
        }
        fn define_gauge(&self, name: &str) -> Result<GaugeId, String> {
            Ok(GaugeId(self.id(name)))
        }
        fn add(&self, _: CounterId, _: u64) {}
        fn set(&self, id: GaugeId, v: u64) {
            self.0.lock().unwrap().1.insert(id.0, v as i64);
        }
        fn shift(&self, id: GaugeId, from: u64, to: u64) {
            *self.0.lock().unwrap().1.entry(id.0).or_default() += to as i64 - from as i64;
        }
    }
    impl Shared {
        fn id(&self, name: &str) -> usize {
            let mut g = self.0.lock().unwrap();
            match g.0.iter().position(|n| n == name) {
                Some(i) => i,
                None => {
                    g.0.push(name.to_string());
                    g.0.len() - 1
                }
            }
        }
        fn gauge(&self, name: &str) -> i64 {
            let id = self.id(name);
            self.0.lock().unwrap().1.get(&id).copied().unwrap_or(0)
        }
    }

    #[test]
    fn configs_sharing_a_prefix_add_up_their_queue_depth() {
        let m = Shared(Box::leak(Box::default()));
        let names = || Names {
            prefix: "access_log.json.".into(),
            produced: "records_logged",
            written: "records_written",
            dropped: "records_dropped",
            skipped: "records_filtered",
            failed: "write_errors",
            rejected: "records_rejected",
            total: None,
            label: "json".into(),
        };
        let (mut a, mut b) = (
            PipelineMetrics::define(m, &names(), false, None).unwrap(),
            PipelineMetrics::define(m, &names(), false, None).unwrap(),
        );
        let depth = |d| Totals { queue_depth: d, ..Totals::default() };
        a.report(&depth(5));
        b.report(&depth(3));
        assert_eq!(m.gauge("access_log.json.queue_depth"), 8);
        a.report(&depth(0));
        b.report(&depth(4));
        assert_eq!(m.gauge("access_log.json.queue_depth"), 4, "each config moves only its own share");
        // A config destroyed on a worker reports no more: its share is taken out then.
        a.report(&depth(2));
        b.retire().unwrap()();
        assert_eq!(m.gauge("access_log.json.queue_depth"), 2);
    }
}
