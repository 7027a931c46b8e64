//! An owned copy of Envoy's stats snapshot, made on the main thread during `flush` and handed
//! to a background thread.
//!
//! Per stat, the main thread makes one ABI call (name + value) and a hash lookup: everything
//! derived from the name — tag-extracted name, tags, the Prometheus name and label text — is
//! computed once per stat name and kept in [`MetaCache`] across flushes.
use std::collections::HashMap;
use std::sync::Arc;

use envoy_obs_common::ffi::stat_sink::{Kind, Snapshot};

/// What is derived from a stat's name, once.
#[derive(Debug)]
pub struct Meta {
    /// Full name, e.g. `cluster.backend.upstream_rq_total`.
    pub name: Vec<u8>,
    /// Tag-extracted name, e.g. `cluster.upstream_rq_total`.
    pub extracted: Vec<u8>,
    /// Tags in Envoy's order.
    pub tags: Vec<(Vec<u8>, Vec<u8>)>,
    /// Prometheus metric name (`envoy_cluster_upstream_rq_total`), None when Envoy's admin
    /// would leave the metric out.
    pub prom_name: Option<String>,
    /// Prometheus label text without braces, e.g. `envoy_cluster_name="backend"`.
    pub labels: String,
}

/// One counter or gauge.
#[derive(Debug, Clone)]
pub struct Value {
    /// Its name-derived data.
    pub meta: Arc<Meta>,
    /// Cumulative value.
    pub value: u64,
    /// Counters: increase since the previous flush.
    pub delta: u64,
}

/// One text readout.
#[derive(Debug, Clone)]
pub struct Text {
    /// Its name-derived data.
    pub meta: Arc<Meta>,
    /// The text.
    pub value: Vec<u8>,
}

/// One histogram (cumulative).
#[derive(Debug, Clone)]
pub struct Hist {
    /// Its name-derived data.
    pub meta: Arc<Meta>,
    /// Samples.
    pub count: u64,
    /// Sum of samples.
    pub sum: f64,
    /// (upper bound, cumulative count).
    pub buckets: Vec<(f64, u64)>,
}

/// Everything one flush saw.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// Counters.
    pub counters: Vec<Value>,
    /// Gauges.
    pub gauges: Vec<Value>,
    /// Text readouts.
    pub texts: Vec<Text>,
    /// Histograms.
    pub histograms: Vec<Hist>,
    /// Unix ns when the snapshot was taken.
    pub time_ns: u64,
}

/// Full name -> (derived data, generation last seen).
type MetaMap = HashMap<Vec<u8>, (Arc<Meta>, u64)>;

/// Name-derived data by kind and full name, kept across flushes. Entries for stats that
/// disappeared are dropped after a flush that did not see them.
#[derive(Default)]
pub struct MetaCache {
    maps: [MetaMap; 4],
    generation: u64,
}

fn kind_index(k: Kind) -> usize {
    match k {
        Kind::Counter => 0,
        Kind::Gauge => 1,
        Kind::TextReadout => 2,
        Kind::Histogram => 3,
    }
}

impl MetaCache {
    fn get(&mut self, snap: &Snapshot<'_>, k: Kind, i: usize, name: &[u8], scratch: &mut Vec<u8>) -> Arc<Meta> {
        let gen = self.generation;
        let map = &mut self.maps[kind_index(k)];
        if let Some((m, g)) = map.get_mut(name) {
            *g = gen;
            return m.clone();
        }
        let extracted = if snap.extracted_name(k, i, scratch) { scratch.clone() } else { name.to_vec() };
        let mut tags = Vec::new();
        snap.tags(k, i, &mut tags);
        let meta = Arc::new(crate::prometheus::meta(name.to_vec(), extracted, tags));
        map.insert(name.to_vec(), (meta.clone(), gen));
        meta
    }

    /// Copies the snapshot (main thread, inside `flush`).
    pub fn read(&mut self, snap: &Snapshot<'_>, texts: bool, now_ns: u64) -> Stats {
        self.generation += 1;
        let (mut name, mut scratch, mut value) = (Vec::with_capacity(256), Vec::with_capacity(256), Vec::new());
        let mut out = Stats { time_ns: now_ns, ..Stats::default() };
        let n = snap.count(Kind::Counter);
        out.counters.reserve(n);
        for i in 0..n {
            if let Some((v, d)) = snap.counter(i, &mut name) {
                let meta = self.get(snap, Kind::Counter, i, &name, &mut scratch);
                out.counters.push(Value { meta, value: v, delta: d });
            }
        }
        let n = snap.count(Kind::Gauge);
        out.gauges.reserve(n);
        for i in 0..n {
            if let Some(v) = snap.gauge(i, &mut name) {
                let meta = self.get(snap, Kind::Gauge, i, &name, &mut scratch);
                out.gauges.push(Value { meta, value: v, delta: 0 });
            }
        }
        if texts {
            for i in 0..snap.count(Kind::TextReadout) {
                if snap.text_readout(i, &mut name, &mut value) {
                    let meta = self.get(snap, Kind::TextReadout, i, &name, &mut scratch);
                    out.texts.push(Text { meta, value: value.clone() });
                }
            }
        }
        for i in 0..snap.count(Kind::Histogram) {
            if let Some((count, sum)) = snap.histogram(i, &mut name) {
                let meta = self.get(snap, Kind::Histogram, i, &name, &mut scratch);
                let mut buckets = Vec::with_capacity(20);
                snap.histogram_buckets(i, &mut buckets);
                out.histograms.push(Hist { meta, count, sum, buckets });
            }
        }
        let gen = self.generation;
        for m in &mut self.maps {
            m.retain(|_, (_, g)| *g == gen);
        }
        out
    }
}
