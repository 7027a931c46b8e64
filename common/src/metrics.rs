//! Self-metrics in Envoy's stats, the same way for every module kind: a [`Metrics`] handle
//! (one per kind's ABI) and [`PipelineMetrics`], the reporter that publishes a pipeline's
//! totals and, for OTLP signals, the export counters, as deltas from the flush thread.
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    latency: Window,
}

/// How long each half of a [`Window`] lasts.
const WINDOW: Duration = Duration::from_secs(60);

/// The recent part of a cumulative histogram: what was added over the last one to two
/// [`WINDOW`]s. Quantile gauges read it, so they follow what happens now — over the whole
/// process lifetime a p99 would hardly move in an outage after a week of uptime.
struct Window {
    /// The histogram when the previous and the current window began.
    starts: [Vec<u64>; 2],
    began: Instant,
}

impl Window {
    fn new() -> Self {
        Window { starts: [vec![0; BUCKETS], vec![0; BUCKETS]], began: Instant::now() }
    }

    /// p50 and p99 of what `cumulative` gained over the last one to two windows (0 when
    /// nothing did).
    fn quantiles(&mut self, cumulative: &[u64]) -> (u64, u64) {
        if self.began.elapsed() >= WINDOW {
            self.starts.swap(0, 1);
            self.starts[1].clear();
            self.starts[1].extend_from_slice(cumulative);
            self.began = Instant::now();
        }
        let recent: Vec<u64> = cumulative.iter().zip(&self.starts[0]).map(|(c, s)| c.saturating_sub(*s)).collect();
        (quantile(&recent, 0.5), quantile(&recent, 0.99))
    }
}

/// Publishes [`Totals`] (and export counters) as Envoy stats; runs on the flush thread.
pub struct PipelineMetrics<M: Metrics> {
    m: M,
    counters: [CounterId; 5],
    total: Option<CounterId>,
    queue_depth: GaugeId,
    worker_ns: Option<(CounterId, GaugeId, GaugeId)>,
    busy: Window,
    export: Option<ExportIds>,
    last: Totals,
    /// This config's share of the shared `queue_depth` gauge (shared with [`Reporter::retire`]).
    depth: Arc<std::sync::atomic::AtomicU64>,
    /// Highest (queued + dropped) and (queued + dropped + skipped) published so far.
    seen: [u64; 2],
    label: String,
    /// When drops were last logged, and the dropped count then.
    warned: Option<(Instant, u64)>,
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
                latency: Window::new(),
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
            busy: Window::new(),
            export,
            last: Totals::default(),
            depth: Default::default(),
            seen: [0; 2],
            label: n.label.clone(),
            warned: None,
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
            let (q50, q99) = self.busy.quantiles(&t.busy_hist);
            m.set(p50, q50);
            m.set(p99, q99);
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
            let (q50, q99) = e.latency.quantiles(&hist);
            m.set(e.latency_p50, q50 / 1000);
            m.set(e.latency_p99, q99 / 1000);
        }
        // Each overload is logged (at most once a minute), not just the first of a lifetime.
        let since = self.warned.map_or(0, |w| w.1);
        if t.dropped > since && self.warned.is_none_or(|w| w.0.elapsed() >= WINDOW) {
            envoy_log!(
                LogLevel::Warn,
                "envoy-obs {}: queue full, {} new records dropped{} (see the dropped counter; raise queue_capacity)",
                self.label,
                t.dropped - since,
                if self.warned.is_some() { " since the last warning" } else { "" }
            );
            self.warned = Some((Instant::now(), t.dropped));
        }
        self.last = t.clone();
    }

    /// Takes this config's share out of `queue_depth` when its reports end early (a config
    /// destroyed on a worker): the gauge other configs share must not keep it.
    fn retire(&self) -> Option<Box<dyn FnOnce() + Send>> {
        let (m, id, depth) = (self.m, self.queue_depth, self.depth.clone());
        // Quantile gauges are set, not summed: a config gone must not leave its last ones.
        let quantiles: Vec<GaugeId> = self
            .worker_ns
            .iter()
            .flat_map(|w| [w.1, w.2])
            .chain(self.export.iter().flat_map(|e| [e.latency_p50, e.latency_p99]))
            .collect();
        Some(Box::new(move || {
            m.shift(id, depth.swap(0, Relaxed), 0);
            for g in quantiles {
                m.set(g, 0);
            }
        }))
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

    /// Quantile gauges follow the last one to two minutes, not the process's lifetime: a week
    /// of fast exports does not hide an outage's slow ones.
    #[test]
    fn quantiles_cover_the_recent_window_only() {
        use crate::timing::{bucket_floor, bucket_of};
        let mut hist = vec![0u64; BUCKETS];
        hist[bucket_of(1_000)] = 1_000_000; // a long history of 1 ms
        let mut w = Window::new();
        assert_eq!(w.quantiles(&hist).1, bucket_floor(bucket_of(1_000)));
        // A minute on: the window rolls; what came before the previous start drops out after
        // the next roll.
        w.began -= WINDOW;
        hist[bucket_of(30_000_000)] += 50; // 30 s exports during an outage
        w.quantiles(&hist);
        w.began -= WINDOW;
        hist[bucket_of(30_000_000)] += 50;
        let (p50, p99) = w.quantiles(&hist);
        assert!(p50 >= 20_000_000 && p99 >= 20_000_000, "{p50} {p99}");
        // Nothing new for two windows: 0, not the last value.
        w.began -= WINDOW;
        w.quantiles(&hist);
        w.began -= WINDOW;
        assert_eq!(w.quantiles(&hist), (0, 0));
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
