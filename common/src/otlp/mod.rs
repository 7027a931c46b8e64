//! The OTLP export core shared by the three signals (logs, traces, metrics).
//!
//! - [`settings`]: the shared config keys and their resolution against the OpenTelemetry
//!   environment variables.
//! - [`proto`]: a direct protobuf writer (records are encoded from captured bytes, no message
//!   structs) and the small reader for responses.
//! - [`client`]: gRPC (tonic) and HTTP/protobuf (hyper) transports on a private
//!   current-thread tokio runtime, compression, retries.
//! - [`OtlpExporter`] (here): accumulates encoded items (log records, spans, metrics) on the
//!   flush thread, cuts requests at `max_batch_size` items or `max_request_bytes`, wraps them in
//!   the signal's `Export*ServiceRequest` with the resource and scope, sends, and counts.
//!
//! The three `Export*ServiceRequest` messages share one shape — `resource_*` = 1 holding
//! `resource` = 1 and `scope_*` = 2, which holds `scope` = 1 and the items = 2 — so one
//! assembly serves all signals.
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::ffi::LogLevel;
use crate::pipeline::{Heartbeat, Outcome};
use crate::stop::StopSignal;
use crate::timing::Histogram;

pub mod client;
pub mod proto;
pub mod settings;

pub use client::{Client, Delivery, Progress};
pub use settings::{resolve, split_config, OtlpConfig, Settings, Signal};

/// Export counters of one signal, written by the flush thread, read by its reporter.
#[derive(Default)]
pub struct ExportStats {
    /// Items the collector accepted.
    pub exported: AtomicU64,
    /// Items given up on: permanent errors, retries exhausted, partial-success rejections,
    /// items too large for one request.
    pub failed: AtomicU64,
    /// Of `failed`: items the collector rejected in a partial-success response.
    pub rejected: AtomicU64,
    /// Export attempts that were retries.
    pub retries: AtomicU64,
    /// Export requests completed (delivered or not).
    pub requests: AtomicU64,
    /// Export requests that failed.
    pub failed_requests: AtomicU64,
    /// Time from first attempt to outcome per request, in microseconds.
    pub latency_us: Histogram,
}

/// Accumulates one signal's encoded items and exports them in requests.
pub struct OtlpExporter {
    settings: Settings,
    client: Option<Client>,
    resource: Vec<u8>,
    scope: Vec<u8>,
    /// The request being built: `head` bytes of room for the envelope (resource and scope
    /// included), then the encoded items. [`OtlpExporter::request`] writes the envelope into
    /// that room, so the items are never copied.
    items: Vec<u8>,
    head: usize,
    count: usize,
    stats: Arc<ExportStats>,
    stop: StopSignal,
    label: String,
    last_warning: [Option<Instant>; WARNINGS],
    heartbeat: Option<Heartbeat>,
}

/// Largest encoded overhead of the request envelope around the items, resource and scope
/// aside: four keys and four length varints of at most 10 bytes.
const ENVELOPE: usize = 4 * 11;

impl OtlpExporter {
    /// An exporter for `settings`. `label` names it in Envoy's log (e.g. "otlp access logger").
    /// No runtime, socket or thread is created until the first send.
    pub fn new(settings: Settings, scope_name: &str, label: &str, stats: Arc<ExportStats>) -> Self {
        let mut resource = Vec::new();
        for (k, v) in &settings.resource {
            proto::kv_str(&mut resource, 1, k.as_bytes(), v.as_bytes());
        }
        let mut scope = Vec::new();
        proto::bytes(&mut scope, 1, scope_name.as_bytes());
        proto::bytes(&mut scope, 2, env!("CARGO_PKG_VERSION").as_bytes());
        let head = ENVELOPE + resource.len() + scope.len();
        OtlpExporter {
            settings,
            client: None,
            resource,
            scope,
            items: vec![0; head],
            head,
            count: 0,
            stats,
            stop: StopSignal::default(),
            label: label.to_string(),
            last_warning: [None; WARNINGS],
            heartbeat: None,
        }
    }

    /// What to beat while a send waits (retries, slow collector): see [`Heartbeat`].
    pub fn set_heartbeat(&mut self, heartbeat: Heartbeat) {
        self.heartbeat = Some(heartbeat);
    }

    /// From now on, retries stop at `deadline` (shutdown drain).
    pub fn set_deadline(&mut self, deadline: Instant) {
        self.stop.stop_by(deadline);
    }

    /// The shutdown signal this exporter obeys: another thread may set its deadline while an
    /// export is in progress here.
    pub fn stop_signal(&self) -> StopSignal {
        self.stop.clone()
    }

    /// Appends one item, encoded by `encode` as the body of the scope's item message, and
    /// sends when the request is full. Returns what any send it triggered achieved.
    pub fn add(&mut self, encode: impl FnOnce(&mut Vec<u8>)) -> Outcome {
        let at = self.items.len();
        proto::record(&mut self.items, 2, encode);
        let item_len = self.items.len() - at;
        let limit = self.settings.max_request_bytes.saturating_sub(self.head);
        let mut out = Outcome::default();
        if item_len > limit {
            // One item alone is over the collector's limit: it can never be delivered.
            self.items.truncate(at);
            self.stats.failed.fetch_add(1, Relaxed);
            out.failed += 1;
            self.warn(Warning::TooLarge, &format!("dropped one record of {item_len} bytes, over max_request_bytes"));
            return out;
        }
        if self.items.len() - self.head > limit {
            // Send what came before this item, then start the next request with it.
            let item = self.items.split_off(at);
            out = add_outcomes(out, self.send_pending());
            self.items.extend_from_slice(&item);
        }
        self.count += 1;
        if self.count >= self.settings.max_batch_size {
            out = add_outcomes(out, self.send_pending());
        }
        out
    }

    /// Sends everything accumulated (one request).
    pub fn send_pending(&mut self) -> Outcome {
        if self.count == 0 {
            return Outcome::default();
        }
        let n = self.count as u64;
        let body = self.request();
        self.count = 0;
        if self.client.is_none() {
            match Client::new(self.settings.clone()) {
                Ok(c) => self.client = Some(c),
                Err(e) => {
                    self.warn(Warning::Failed, &format!("cannot start the exporter: {e:?}"));
                    self.stats.failed.fetch_add(n, Relaxed);
                    return Outcome { written: 0, failed: n };
                }
            }
        }
        let Some(client) = self.client.as_mut() else { return Outcome { written: 0, failed: n } };
        let (stats, heartbeat, warnings, label) = (&self.stats, &self.heartbeat, &mut self.last_warning, &self.label);
        let endpoint = &self.settings.endpoint;
        let (delivery, st) = client.send(body, &self.stop, &mut |p| {
            if let Progress::Retrying { reason } = p {
                // Counted as each retry starts, so the counter moves during an outage.
                stats.retries.fetch_add(1, Relaxed);
                let msg = format!("export of {n} records to {endpoint} failed: {reason}; retrying");
                warn(warnings, label, Warning::Retrying, &msg);
            }
            if let Some(h) = heartbeat {
                h.beat();
            }
        });
        let s = &self.stats;
        s.requests.fetch_add(1, Relaxed);
        s.latency_us.record(st.elapsed.as_micros() as u64);
        match delivery {
            Delivery::Accepted { rejected, message } => {
                let rejected = rejected.min(n);
                // The collector's words, but not a megabyte of them in Envoy's log.
                let message = match message.char_indices().nth(512) {
                    Some((cut, _)) => format!("{}…", &message[..cut]),
                    None => message,
                };
                s.exported.fetch_add(n - rejected, Relaxed);
                if rejected > 0 {
                    s.failed.fetch_add(rejected, Relaxed);
                    s.rejected.fetch_add(rejected, Relaxed);
                    self.warn(Warning::Rejected, &format!("collector rejected {rejected} of {n} records: {message}"));
                } else if !message.is_empty() {
                    // A partial success that rejects nothing but says something is the
                    // collector's warning (OTLP spec), worth the operator's eye.
                    self.warn(Warning::Note, &format!("collector accepted all {n} records, with a warning: {message}"));
                }
                Outcome { written: n - rejected, failed: rejected }
            }
            Delivery::Failed(why) => {
                s.failed.fetch_add(n, Relaxed);
                s.failed_requests.fetch_add(1, Relaxed);
                self.warn(
                    Warning::Failed,
                    &format!("export of {n} records to {} failed: {why}", self.settings.endpoint),
                );
                Outcome { written: 0, failed: n }
            }
        }
    }

    /// Takes the accumulated items as an `Export*ServiceRequest`: the envelope is written into
    /// the room left before them, so they are not copied. The next request starts empty.
    fn request(&mut self) -> Bytes {
        let (res, scope, head) = (&self.resource, &self.scope, self.head);
        let field = |len: usize| 1 + proto::varint_len(len as u64) + len;
        let scoped_len = field(scope.len()) + (self.items.len() - head);
        let rs_len = field(res.len()) + field(scoped_len);
        let mut env = Vec::with_capacity(head);
        let put_head = |out: &mut Vec<u8>, f: u8, len: usize| {
            out.push((f << 3) | 2);
            proto::varint(out, len as u64);
        };
        put_head(&mut env, 1, rs_len);
        put_head(&mut env, 1, res.len());
        env.extend_from_slice(res);
        put_head(&mut env, 2, scoped_len);
        put_head(&mut env, 1, scope.len());
        env.extend_from_slice(scope);
        let start = head - env.len();
        self.items[start..head].copy_from_slice(&env);
        let mut next = Vec::with_capacity(self.items.capacity());
        next.resize(head, 0);
        Bytes::from(std::mem::replace(&mut self.items, next)).slice(start..)
    }

    fn warn(&mut self, kind: Warning, msg: &str) {
        warn(&mut self.last_warning, &self.label, kind, msg);
    }
}

/// Logs `msg` as a warning of `kind`: at most one line per kind per 10 s, so a dead collector
/// does not flood Envoy's log.
fn warn(last_warning: &mut [Option<Instant>; WARNINGS], label: &str, kind: Warning, msg: &str) {
    let now = Instant::now();
    let last = &mut last_warning[kind as usize];
    if last.is_some_and(|t| now.duration_since(t) < Duration::from_secs(10)) {
        return;
    }
    *last = Some(now);
    crate::envoy_log!(LogLevel::Warn, "envoy-obs {label}: {msg}");
}

/// Kinds of warnings, each rate-limited on its own.
#[derive(Clone, Copy)]
enum Warning {
    Failed = 0,
    Rejected = 1,
    TooLarge = 2,
    /// A partial success that rejects nothing but says something: apart from `Rejected`, so a
    /// collector chatty on every response cannot crowd out real rejections.
    Note = 3,
    /// An attempt failed and is retried: said at once, where `Failed` waits for the retries
    /// to run out (`max_elapsed_ms`).
    Retrying = 4,
}

const WARNINGS: usize = 5;

fn add_outcomes(a: Outcome, b: Outcome) -> Outcome {
    Outcome { written: a.written + b.written, failed: a.failed + b.failed }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(max_batch: usize, max_bytes: usize) -> Settings {
        let mut s = resolve(&OtlpConfig::default(), Signal::Logs, &|_| None).unwrap();
        s.max_batch_size = max_batch;
        s.max_request_bytes = max_bytes;
        s.resource = vec![("service.name".into(), "edge".into())];
        s
    }

    #[test]
    fn request_envelope_decodes() {
        let mut e = OtlpExporter::new(settings(10, 1 << 20), "envoy-obs", "test", Arc::default());
        for i in 0..3u64 {
            e.add(|o| proto::fixed64(o, 1, i));
        }
        let req = e.request();
        assert_eq!(e.items.len(), e.head, "the next request starts empty");
        let rl = proto::get_bytes(&req, 1).expect("resource_logs");
        let res = proto::get_bytes(rl, 1).expect("resource");
        let kv = proto::get_bytes(res, 1).expect("attribute");
        assert_eq!(proto::get_bytes(kv, 1), Some(&b"service.name"[..]));
        let sl = proto::get_bytes(rl, 2).expect("scope_logs");
        let scope = proto::get_bytes(sl, 1).expect("scope");
        assert_eq!(proto::get_bytes(scope, 1), Some(&b"envoy-obs"[..]));
        let items: Vec<_> = proto::Reader::new(sl).filter(|(f, _)| *f == 2).collect();
        assert_eq!(items.len(), 3);
        assert_eq!(proto::Reader::new(&req).count(), 1, "one resource_logs, nothing trailing");
    }

    #[test]
    fn oversized_items_fail_alone_and_requests_split_by_bytes() {
        // Nothing listens on port 9: sends fail fast (connection refused, retry disabled).
        let mut s = settings(1000, 1024);
        s.endpoint = "http://127.0.0.1:9".into();
        s.retry.enabled = false;
        s.timeout = Duration::from_millis(200);
        let stats = Arc::new(ExportStats::default());
        let mut e = OtlpExporter::new(s, "envoy-obs", "test", stats.clone());
        let o = e.add(|o| proto::bytes(o, 5, &[b'x'; 2000]));
        assert_eq!((o.failed, e.count), (1, 0));
        let mut failed = 0;
        for _ in 0..10 {
            failed += e.add(|o| proto::bytes(o, 5, &[b'y'; 300])).failed;
        }
        assert!(e.items.len() - e.head + e.resource.len() + e.scope.len() + ENVELOPE <= 1024);
        failed += e.send_pending().failed;
        assert_eq!(failed, 10, "every record counted once");
        assert_eq!(stats.failed.load(Relaxed), 11);
        assert!(stats.requests.load(Relaxed) >= 3, "requests cut at 1 KiB");
    }
}
