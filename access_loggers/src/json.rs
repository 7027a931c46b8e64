//! `logger_name: json` — one JSON object per line, Envoy `json_format` semantics.
//!
//! Worker side (per record): filter -> capture the plan's operator values (raw bytes and
//! numbers) into a pooled buffer -> one `try_push` on this worker's queue. Flush thread:
//! render JSON lines from the captured values (escaping, number and time formatting), write
//! batches to the file, recycle buffers, reopen after rotation, publish self-metrics.
use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;

use envoy_obs_common::config::{parse, ConfigError};
use envoy_obs_common::export::file::{check_writable, open_append, LogFile};
use envoy_obs_common::ffi::access_log::Stream;
use envoy_obs_common::pipeline::{Batch, Exporter, Heartbeat, Outcome, Reporter};
use envoy_obs_common::stop::StopSignal;

use crate::filter::{Filter, FilterSpec};
use crate::format::{BulkHeaders, Ctx, JsonPlan};
use crate::logger::{check_common, compile_filter, Common, Logger, Plan};

/// Default `stat_prefix`: counters are `<metrics_namespace>.access_log.json.*`.
pub const DEFAULT_STAT_PREFIX: &str = "json";
/// Rendered bytes buffered on the flush thread before a write(2).
const WRITE_BUFFER: usize = 256 * 1024;

/// The fields written when no `json_format` is given: what Envoy's default access-log line
/// carries, as typed JSON.
pub fn default_format() -> serde_json::Map<String, serde_json::Value> {
    let j = serde_json::json!({
        "start_time": "%START_TIME%",
        "method": "%REQ(:METHOD)%",
        "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
        "protocol": "%PROTOCOL%",
        "response_code": "%RESPONSE_CODE%",
        "response_flags": "%RESPONSE_FLAGS%",
        "bytes_received": "%BYTES_RECEIVED%",
        "bytes_sent": "%BYTES_SENT%",
        "duration": "%DURATION%",
        "upstream_service_time": "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
        "x_forwarded_for": "%REQ(X-FORWARDED-FOR)%",
        "user_agent": "%REQ(USER-AGENT)%",
        "request_id": "%REQ(X-REQUEST-ID)%",
        "authority": "%REQ(:AUTHORITY)%",
        "upstream_host": "%UPSTREAM_HOST%",
    });
    match j {
        serde_json::Value::Object(m) => m,
        _ => unreachable!("literal object"),
    }
}

fn default_prefix() -> String {
    DEFAULT_STAT_PREFIX.to_string()
}

/// `logger_config` of the JSON logger.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonLoggerConfig {
    /// Output file; `/dev/stdout` and `/dev/stderr` allowed.
    pub path: String,
    /// Envoy `json_format` map; absent = [`default_format`].
    #[serde(default)]
    pub json_format: Option<serde_json::Map<String, serde_json::Value>>,
    /// Leave out keys whose value is unavailable (and maps left empty); `""` values stay, as in
    /// Envoy.
    #[serde(default)]
    pub omit_empty_values: bool,
    /// Which records to keep.
    #[serde(default)]
    pub filter: Option<FilterSpec>,
    /// Longest a record waits before it is written.
    #[serde(default = "crate::logger::default_flush_interval_ms")]
    pub flush_interval_ms: u64,
    /// Per-worker queue size in records; when full, new records are dropped and counted.
    #[serde(default = "crate::logger::default_queue_capacity")]
    pub queue_capacity: usize,
    /// Middle part of the self-metric names.
    #[serde(default = "default_prefix")]
    pub stat_prefix: String,
    /// Measure the worker-side time of every record (two TSC reads per record) and publish
    /// it: counter `worker_ns` (total) and gauges `worker_ns_p50` / `worker_ns_p99` (per record).
    /// Cost transparency for operators, and what `make bench` reads for the per-record cost.
    #[serde(default)]
    pub self_timing: bool,
}

/// Everything checked at config load, before anything is opened or started.
pub struct Compiled {
    /// Parsed config.
    pub config: JsonLoggerConfig,
    /// The render plan.
    pub plan: JsonPlan,
    /// The compiled filter.
    pub filter: Option<Filter>,
}

/// Parses and validates the config bytes; every error names its field.
pub fn compile(bytes: &[u8]) -> Result<Compiled, ConfigError> {
    let config: JsonLoggerConfig = parse(bytes)?;
    if config.path.trim().is_empty() {
        return Err(ConfigError::new("path", "must name a file, /dev/stdout or /dev/stderr"));
    }
    check_common(config.flush_interval_ms, config.queue_capacity, &config.stat_prefix)?;
    let format = config.json_format.clone().unwrap_or_else(default_format);
    if format.is_empty() {
        return Err(ConfigError::new("json_format", "must have at least one key"));
    }
    let plan = JsonPlan::compile(&format, config.omit_empty_values)?;
    let filter = compile_filter(&config.filter)?;
    Ok(Compiled { config, plan, filter })
}

/// The JSON logger's config object.
pub type JsonLogger = Logger<JsonPlan>;

/// Opens the file and starts the flush thread (under `validation`: only checks the path).
pub fn start<R: Reporter>(c: Compiled, validation: bool, slots: usize, reporter: R) -> Result<JsonLogger, ConfigError> {
    let path = PathBuf::from(&c.config.path);
    let plan = Arc::new(c.plan);
    let exporter = if validation {
        check_writable(&path).map_err(|e| ConfigError::new("path", e))?;
        None
    } else {
        let file = open_append(&path)
            .map_err(|e| ConfigError::new("path", format!("cannot open {} for appending: {e}", path.display())))?;
        Some(JsonFileExporter {
            plan: plan.clone(),
            file: LogFile::new(path, file),
            out: Vec::with_capacity(WRITE_BUFFER + 64 * 1024),
            pending: 0,
            scratch: Vec::with_capacity(256),
            stop: StopSignal::default(),
            heartbeat: None,
        })
    };
    let common = Common {
        thread_name: "obs-json-flush",
        flush_interval_ms: c.config.flush_interval_ms,
        queue_capacity: c.config.queue_capacity,
        self_timing: c.config.self_timing,
    };
    Logger::start(&common, plan, c.filter, exporter, slots, reporter)
}

impl Plan for JsonPlan {
    #[inline]
    fn capture<S: Stream>(&self, cx: &Ctx<'_, S>, out: &mut Vec<u8>) {
        JsonPlan::capture(self, cx, out)
    }
    fn bulk_headers(&self) -> BulkHeaders {
        JsonPlan::bulk_headers(self)
    }
}

/// Lines in `b`.
fn lines_in(b: &[u8]) -> u64 {
    b.iter().filter(|&&c| c == b'\n').count() as u64
}

/// Renders captured records into JSON lines and appends them to the file, one write(2) per
/// [`WRITE_BUFFER`] or per drain.
struct JsonFileExporter {
    plan: Arc<JsonPlan>,
    file: LogFile,
    out: Vec<u8>,
    pending: u64,
    scratch: Vec<u8>,
    /// Shutdown's deadline: a write waiting on a pipe nobody reads gives up by it.
    stop: StopSignal,
    heartbeat: Option<Heartbeat>,
}

impl JsonFileExporter {
    fn write_out(&mut self) -> Outcome {
        let n = std::mem::take(&mut self.pending);
        if n == 0 {
            return Outcome::default();
        }
        // One record is one line (rendering escapes every newline).
        // A pipe whose reader stalled: the counters keep being published while the write
        // waits, and the wait ends at shutdown's deadline (the rest counts as write errors).
        let (stop, heartbeat) = (&self.stop, &self.heartbeat);
        let mut waiting = || {
            if let Some(h) = heartbeat {
                h.beat();
            }
            stop.deadline().is_none_or(|d| std::time::Instant::now() < d)
        };
        let written = match self.file.write(&self.out, &mut waiting) {
            Ok(()) => n,
            Err(whole) => lines_in(&self.out[..whole]).min(n),
        };
        self.out.clear();
        if self.out.capacity() > 4 * WRITE_BUFFER {
            self.out = Vec::with_capacity(WRITE_BUFFER + 64 * 1024);
        }
        Outcome { written, failed: n - written }
    }
}

impl Exporter for JsonFileExporter {
    fn export(&mut self, batch: &Batch) -> Outcome {
        for record in batch.iter() {
            self.plan.render(record, &mut self.scratch, &mut self.out);
            self.out.push(b'\n');
        }
        self.pending += batch.len() as u64;
        if self.scratch.capacity() > 64 * 1024 {
            self.scratch = Vec::with_capacity(256);
        }
        if self.out.len() >= WRITE_BUFFER {
            self.write_out()
        } else {
            Outcome::default()
        }
    }

    fn flush(&mut self) -> Outcome {
        let o = self.write_out();
        self.file.maybe_reopen(false);
        o
    }
    fn draining(&mut self, deadline: std::time::Instant) {
        self.stop.stop_by(deadline);
    }
    fn stop_signal(&self) -> Option<StopSignal> {
        Some(self.stop.clone())
    }
    fn set_heartbeat(&mut self, heartbeat: Heartbeat) {
        self.heartbeat = Some(heartbeat);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::tests::FakeStream;
    use envoy_obs_common::pipeline::Totals;
    use std::sync::Mutex;
    use std::time::Duration;

    #[derive(Clone, Default)]
    struct Rec(Arc<Mutex<Totals>>);
    impl Reporter for Rec {
        fn report(&mut self, t: &Totals) {
            *self.0.lock().unwrap() = t.clone();
        }
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("envoy-obs-json-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d.join("access.log")
    }

    #[test]
    fn logs_lines_filters_and_counts() {
        let path = tmp("basic");
        let cfg = format!(
            r#"{{"path":"{}","json_format":{{"code":"%RESPONSE_CODE%","m":"%REQ(:METHOD)%"}},
                "filter":{{"status_code":{{"ge":500}}}}}}"#,
            path.display()
        );
        let rec = Rec::default();
        let logger = start(compile(cfg.as_bytes()).unwrap(), false, 3, rec.clone()).unwrap();
        let tl = logger.thread_logger(1);
        let mut s = FakeStream::ok();
        tl.log(&s, 6);
        s.code = 503;
        tl.log(&s, 6);
        assert!(logger.flush(Duration::from_secs(5)));
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "{\"code\":503,\"m\":\"GET\"}\n");
        drop(tl);
        drop(logger);
        let t = rec.0.lock().unwrap().clone();
        assert_eq!((t.queued, t.skipped, t.written, t.dropped), (1, 1, 1, 0));
    }

    #[test]
    fn validation_mode_opens_nothing() {
        let path = tmp("validate");
        let cfg = format!(r#"{{"path":"{}"}}"#, path.display());
        let logger = start(compile(cfg.as_bytes()).unwrap(), true, 3, ()).unwrap();
        logger.thread_logger(0).log(&FakeStream::ok(), 6);
        assert!(!path.exists());
        let bad = r#"{"path":"/nonexistent-dir-xyz/a.log"}"#;
        assert_eq!(start(compile(bad.as_bytes()).unwrap(), true, 1, ()).err().unwrap().field, "path");
    }

    #[test]
    fn bad_configs_name_their_field() {
        let cases = [
            (r#"{}"#, "path"),
            (r#"{"path":"/tmp/x","bogus":1}"#, "bogus"),
            (r#"{"path":"/tmp/x","json_format":{"a":"%NOPE%"}}"#, "json_format.a"),
            (r#"{"path":"/tmp/x","queue_capacity":0}"#, "queue_capacity"),
            (r#"{"path":"/tmp/x","queue_capacity":"big"}"#, "queue_capacity"),
            (r#"{"path":"/tmp/x","flush_interval_ms":0}"#, "flush_interval_ms"),
            (r#"{"path":"/tmp/x","filter":{"sample":7}}"#, "filter.sample"),
            (r#"{"path":"/tmp/x","json_format":{}}"#, "json_format"),
            (r#"{"path":""}"#, "path"),
            (r#"{"path":"/tmp/x","omit_empty_values":"yes"}"#, "omit_empty_values"),
            (r#"{"path":"/tmp/x","stat_prefix":"Bad Prefix"}"#, "stat_prefix"),
        ];
        for (cfg, field) in cases {
            let e = compile(cfg.as_bytes()).err().unwrap_or_else(|| panic!("accepted {cfg}"));
            assert_eq!(e.field, field, "{cfg}: {e}");
        }
    }
}
