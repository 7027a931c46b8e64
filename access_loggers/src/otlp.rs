//! `logger_name: otlp` — OpenTelemetry log records over OTLP/gRPC or OTLP/HTTP.
//!
//! Worker side: the same capture as the JSON logger (one compiled plan of the format engine):
//! the request start time, response code and `traceparent`, then the body's and the
//! attributes' operator values, pushed as one record on this worker's queue.
//! Flush thread: each captured record is encoded straight into an OTLP `LogRecord` (no
//! message structs), records are cut into `Export*ServiceRequest`s by count and size, and sent
//! by the shared OTLP core (`envoy_obs_common::otlp`) with retries and counters.
//!
//! Values are typed like Envoy's built-in OpenTelemetry access logger: every format string
//! becomes a `string_value` (unavailable operators print `-`). `typed_values: true` instead
//! types single-operator values (numbers as `int_value`/`double_value`, unavailable values
//! leave the attribute out).
use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Deserialize;

use envoy_obs_common::config::{parse, ConfigError};
use envoy_obs_common::ffi::access_log::Stream;
use envoy_obs_common::otlp::{self, proto, ExportStats, OtlpConfig, OtlpExporter, Settings, Signal};
use envoy_obs_common::pipeline::{Batch, Exporter, Heartbeat, Outcome, Reporter};
use envoy_obs_common::stop::StopSignal;
use envoy_obs_common::w3c::parse_traceparent;

use crate::filter::FilterSpec;
use crate::format::{BulkHeaders, Command, Ctx, Decoder, Program, Template, Val};
use crate::logger::{check_common, compile_filter, Common, Logger, Plan};

/// Default `stat_prefix`: counters are `<metrics_namespace>.access_log.otlp.*`.
pub const DEFAULT_STAT_PREFIX: &str = "otlp";
/// Instrumentation scope name on every request.
pub const SCOPE_NAME: &str = "envoy-obs.access_log";
/// Body when none is configured: Envoy's default access-log line.
pub const DEFAULT_BODY: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" \
     %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% \
     %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \
     \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\"";

fn default_prefix() -> String {
    DEFAULT_STAT_PREFIX.to_string()
}

/// The logger's own keys (the OTLP keys — endpoint, protocol, headers, … — are in
/// [`OtlpConfig`], at the same level).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtlpLoggerConfig {
    /// A format string or a map of them (nested maps allowed): the record's body.
    #[serde(default)]
    pub body: Option<serde_json::Value>,
    /// Attribute key → format string (or a nested map, or a literal number/boolean).
    #[serde(default)]
    pub attributes: serde_json::Map<String, serde_json::Value>,
    /// Which records to keep (same filters as the JSON logger).
    #[serde(default)]
    pub filter: Option<FilterSpec>,
    /// Longest a record waits in the queues before it is exported.
    #[serde(default = "crate::logger::default_flush_interval_ms")]
    pub flush_interval_ms: u64,
    /// Per-worker queue size in records; when full, new records are dropped and counted.
    #[serde(default = "crate::logger::default_queue_capacity")]
    pub queue_capacity: usize,
    /// Middle part of the self-metric names.
    #[serde(default = "default_prefix")]
    pub stat_prefix: String,
    /// Added as the resource attribute `log_name` (as Envoy's built-in logger does).
    #[serde(default)]
    pub log_name: Option<String>,
    /// Type single-operator values instead of Envoy's all-strings.
    #[serde(default)]
    pub typed_values: bool,
    /// Publish per-record worker time (see the JSON logger).
    #[serde(default)]
    pub self_timing: bool,
}

/// A compiled body or attribute value.
#[derive(Debug)]
enum Node {
    Str(Vec<u8>),
    Int(i64),
    Double(f64),
    Bool(bool),
    /// Rendered as text (`string_value`).
    Text(Template),
    /// One operator, typed (`typed_values`).
    Typed(Command),
    Map(Vec<(String, Node)>),
}

impl Node {
    fn compile(v: &serde_json::Value, path: &str, typed: bool) -> Result<Node, ConfigError> {
        Ok(match v {
            serde_json::Value::String(s) => {
                let t = Template::compile(s).map_err(|e| ConfigError::new(path, e))?;
                match (t.single(), t.literal()) {
                    (Some(c), _) if typed => Node::Typed(c.clone()),
                    (_, Some(text)) => Node::Str(text),
                    _ => Node::Text(t),
                }
            }
            serde_json::Value::Object(m) => Node::Map(compile_map(m, path, typed)?),
            serde_json::Value::Bool(b) => Node::Bool(*b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Node::Int(i),
                None => Node::Double(n.as_f64().unwrap_or(0.0)),
            },
            serde_json::Value::Null => return Err(ConfigError::new(path, "null is not a value; leave the key out")),
            serde_json::Value::Array(_) => return Err(ConfigError::new(path, "lists are not supported")),
        })
    }

    fn flatten(&self, program: &mut Program) {
        match self {
            Node::Text(t) => program.push_template(t),
            Node::Typed(c) => program.push(c),
            Node::Map(m) => m.iter().for_each(|(_, n)| n.flatten(program)),
            _ => {}
        }
    }

    /// Writes this node's `AnyValue` fields; false when the value is absent (typed null),
    /// in which case the caller drops the enclosing key.
    fn encode<'a>(&'a self, d: &mut Decoder<'a>, scratch: &mut Vec<u8>, out: &mut Vec<u8>) -> bool {
        match self {
            Node::Str(s) => proto::bytes(out, proto::any::STRING, s),
            Node::Int(i) => proto::uint(out, proto::any::INT, *i as u64),
            Node::Double(f) => proto::double(out, proto::any::DOUBLE, *f),
            Node::Bool(b) => proto::uint(out, proto::any::BOOL, u64::from(*b)),
            Node::Text(t) => {
                scratch.clear();
                t.write_text(d, false, scratch);
                proto::bytes(out, proto::any::STRING, &utf8(scratch));
            }
            Node::Typed(c) => match d.next(c) {
                Val::Null => return false,
                Val::U(n) => match i64::try_from(n) {
                    Ok(i) => proto::uint(out, proto::any::INT, i as u64),
                    Err(_) => proto::double(out, proto::any::DOUBLE, n as f64),
                },
                Val::I(i) => proto::uint(out, proto::any::INT, i as u64),
                Val::F(f) => proto::double(out, proto::any::DOUBLE, f),
                Val::B(b) => proto::uint(out, proto::any::BOOL, u64::from(b)),
                v => {
                    scratch.clear();
                    c.write_text(v, false, scratch);
                    proto::bytes(out, proto::any::STRING, &utf8(scratch));
                }
            },
            Node::Map(m) => proto::message(out, proto::any::KVLIST, |o| encode_kvs(m, 1, d, scratch, o)),
        }
        true
    }
}

fn compile_map(
    m: &serde_json::Map<String, serde_json::Value>,
    path: &str,
    typed: bool,
) -> Result<Vec<(String, Node)>, ConfigError> {
    m.iter()
        .map(|(k, v)| {
            if k.is_empty() {
                // OpenTelemetry attribute keys must be non-empty; strict consumers reject them.
                return Err(ConfigError::new(path, "keys must not be empty"));
            }
            Ok((k.clone(), Node::compile(v, &format!("{path}.{k}"), typed)?))
        })
        .collect()
}

/// Writes `KeyValue`s as field `field`, leaving out absent values.
fn encode_kvs<'a>(
    kvs: &'a [(String, Node)],
    field: u32,
    d: &mut Decoder<'a>,
    scratch: &mut Vec<u8>,
    out: &mut Vec<u8>,
) {
    for (k, n) in kvs {
        let at = out.len();
        if !proto::kv(out, field, k.as_bytes(), |o| n.encode(d, scratch, o)) {
            out.truncate(at);
        }
    }
}

/// Protobuf strings must be UTF-8: invalid sequences become U+FFFD.
fn utf8(b: &[u8]) -> Cow<'_, [u8]> {
    if b.is_ascii() || std::str::from_utf8(b).is_ok() {
        Cow::Borrowed(b)
    } else {
        Cow::Owned(String::from_utf8_lossy(b).into_owned().into_bytes())
    }
}

/// The compiled capture and encoding of one OTLP logger.
#[derive(Debug)]
pub struct OtlpPlan {
    start: Command,
    code: Command,
    traceparent: Command,
    log_type: Command,
    body: Node,
    attributes: Vec<(String, Node)>,
    /// Every operator above, in the order `encode` reads them back.
    program: Program,
    bulk: BulkHeaders,
}

fn command(s: &str) -> Command {
    // Fixed operators of our own; compile cannot fail for them.
    Template::compile(s).ok().and_then(|t| t.single().cloned()).unwrap_or_else(|| unreachable!("{s}"))
}

/// Severity from the response code: 5xx → ERROR, 4xx → WARN, else INFO; no response at all
/// is an ERROR only on a record of an HTTP stream's end (`DownstreamEnd`, `UpstreamEnd`). A
/// TCP or UDP session, or a start-of-request or periodic record, has no response code to go by:
/// UNSPECIFIED (0, no text), as Envoy's own logger sends for every record.
pub fn severity(code: u64, log_type: &[u8]) -> (u64, &'static str) {
    match code {
        0 if matches!(log_type, b"DownstreamEnd" | b"UpstreamEnd" | b"NotSet") => (17, "ERROR"),
        0 => (0, ""),
        500.. => (17, "ERROR"),
        400..=499 => (13, "WARN"),
        _ => (9, "INFO"),
    }
}

impl OtlpPlan {
    fn compile(c: &OtlpLoggerConfig) -> Result<OtlpPlan, ConfigError> {
        let body = match &c.body {
            Some(v) => Node::compile(v, "body", c.typed_values)?,
            None => Node::compile(&serde_json::Value::String(DEFAULT_BODY.into()), "body", false)?,
        };
        let attributes = compile_map(&c.attributes, "attributes", c.typed_values)?;
        let (start, code, traceparent, log_type) = (
            command("%START_TIME%"),
            command("%RESPONSE_CODE%"),
            command("%REQ(TRACEPARENT)%"),
            command("%ACCESS_LOG_TYPE%"),
        );
        let mut program = Program::default();
        for c in [&start, &code, &traceparent, &log_type] {
            program.push(c);
        }
        body.flatten(&mut program);
        attributes.iter().for_each(|(_, n)| n.flatten(&mut program));
        let bulk = BulkHeaders::for_lookups(program.header_lookups());
        Ok(OtlpPlan { start, code, traceparent, log_type, body, attributes, program, bulk })
    }

    /// Encodes one captured record as the body of a `LogRecord`.
    pub fn encode(&self, record: &[u8], observed_ns: u64, scratch: &mut Vec<u8>, out: &mut Vec<u8>) {
        let mut d = Decoder::new(record);
        if let Val::Time(ns, _) = d.next(&self.start) {
            proto::fixed64(out, 1, ns.max(0) as u64);
        }
        proto::fixed64(out, 11, observed_ns);
        let code = match d.next(&self.code) {
            Val::U(c) => c,
            _ => 0,
        };
        let traceparent = d.next(&self.traceparent);
        let log_type = match d.next(&self.log_type) {
            Val::S(t) => t,
            _ => b"NotSet",
        };
        let (num, text) = severity(code, log_type);
        proto::uint(out, 2, num);
        proto::bytes(out, 3, text.as_bytes());
        if let Val::S(tp) = traceparent {
            if let Some((trace, span, flags)) = parse_traceparent(tp) {
                proto::fixed32(out, 8, u32::from(flags));
                proto::bytes(out, 9, &trace);
                proto::bytes(out, 10, &span);
            }
        }
        let at = out.len();
        if !proto::message(out, 5, |o| self.body.encode(&mut d, scratch, o)) {
            out.truncate(at);
        }
        encode_kvs(&self.attributes, 6, &mut d, scratch, out);
    }
}

impl Plan for OtlpPlan {
    #[inline]
    fn capture<S: Stream>(&self, cx: &Ctx<'_, S>, out: &mut Vec<u8>) {
        self.program.capture(cx, out);
    }
    fn bulk_headers(&self) -> BulkHeaders {
        self.bulk
    }
}

/// Everything checked at config load.
pub struct Compiled {
    /// The logger's own keys.
    pub config: OtlpLoggerConfig,
    /// Resolved exporter settings.
    pub settings: Settings,
    plan: OtlpPlan,
    filter: Option<crate::filter::Filter>,
}

/// Parses and validates the config bytes (the environment read through `env`).
pub fn compile(bytes: &[u8], env: &dyn Fn(&str) -> Option<String>) -> Result<Compiled, ConfigError> {
    let (otlp_part, rest) = otlp::split_config(bytes)?;
    let otlp_cfg: OtlpConfig = parse(&otlp_part)?;
    let config: OtlpLoggerConfig = parse(&rest)?;
    check_common(config.flush_interval_ms, config.queue_capacity, &config.stat_prefix)?;
    let mut settings = otlp::resolve(&otlp_cfg, Signal::Logs, env)?;
    // `log_name` beats the environment, and a `log_name` in our own `resource_attributes`
    // beats it (the order Envoy's logger applies them in).
    if let Some(name) = config.log_name.as_ref().filter(|_| !otlp_cfg.resource_attributes.contains_key("log_name")) {
        settings.resource.retain(|(k, _)| k != "log_name");
        settings.resource.push(("log_name".into(), name.clone()));
        settings.resource.sort();
    }
    let plan = OtlpPlan::compile(&config)?;
    let filter = compile_filter(&config.filter)?;
    Ok(Compiled { config, settings, plan, filter })
}

/// The OTLP logger's config object.
pub type OtlpLogger = Logger<OtlpPlan>;

/// Starts the flush thread (nothing under `validation`). Export counters go to `stats`.
pub fn start<R: Reporter>(
    c: Compiled,
    validation: bool,
    slots: usize,
    stats: Arc<ExportStats>,
    reporter: R,
) -> Result<OtlpLogger, ConfigError> {
    let plan = Arc::new(c.plan);
    let exporter = (!validation).then(|| OtlpLogExporter {
        plan: plan.clone(),
        otlp: OtlpExporter::new(c.settings, SCOPE_NAME, "otlp access logger", stats),
        scratch: Vec::with_capacity(256),
    });
    let common = Common {
        thread_name: "obs-otlp-logs",
        flush_interval_ms: c.config.flush_interval_ms,
        queue_capacity: c.config.queue_capacity,
        self_timing: c.config.self_timing,
    };
    Logger::start(&common, plan, c.filter, exporter, slots, reporter)
}

/// Encodes captured records into `LogRecord`s and hands them to the OTLP core.
struct OtlpLogExporter {
    plan: Arc<OtlpPlan>,
    otlp: OtlpExporter,
    scratch: Vec<u8>,
}

impl Exporter for OtlpLogExporter {
    fn export(&mut self, batch: &Batch) -> Outcome {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        let mut total = Outcome::default();
        let (plan, scratch) = (&self.plan, &mut self.scratch);
        for record in batch.iter() {
            let o = self.otlp.add(|out| plan.encode(record, now, scratch, out));
            total.written += o.written;
            total.failed += o.failed;
        }
        if scratch.capacity() > 64 * 1024 {
            *scratch = Vec::with_capacity(256);
        }
        total
    }

    fn flush(&mut self) -> Outcome {
        self.otlp.send_pending()
    }

    fn draining(&mut self, deadline: Instant) {
        self.otlp.set_deadline(deadline);
    }

    fn stop_signal(&self) -> Option<StopSignal> {
        Some(self.otlp.stop_signal())
    }
    fn set_heartbeat(&mut self, heartbeat: Heartbeat) {
        self.otlp.set_heartbeat(heartbeat);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::tests::FakeStream;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    /// Encodes one record from a fake stream and decodes the `LogRecord` fields back.
    fn encode(cfg: serde_json::Value, s: &FakeStream) -> Vec<(u32, proto::Field<'static>)> {
        let c = compile(cfg.to_string().as_bytes(), &no_env).unwrap();
        let mut rec = Vec::new();
        c.plan.capture(&Ctx::with_bulk(s, 6, c.plan.bulk_headers()), &mut rec);
        let mut out = Vec::new();
        c.plan.encode(&rec, 42, &mut Vec::new(), &mut out);
        let out: &'static [u8] = Box::leak(out.into_boxed_slice());
        proto::Reader::new(out).collect()
    }

    fn string_value(any: &[u8]) -> Option<String> {
        proto::get_bytes(any, proto::any::STRING).map(|b| String::from_utf8(b.to_vec()).unwrap())
    }

    fn attrs(fields: &[(u32, proto::Field<'static>)]) -> Vec<(String, &'static [u8])> {
        fields
            .iter()
            .filter_map(|(f, v)| match v {
                proto::Field::Bytes(kv) if *f == 6 => Some((
                    String::from_utf8(proto::get_bytes(kv, 1).unwrap().to_vec()).unwrap(),
                    proto::get_bytes(kv, 2).unwrap(),
                )),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn record_fields_follow_envoy_typing() {
        let mut s = FakeStream::ok();
        s.req.insert(b"traceparent".to_vec(), b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_vec());
        s.req.insert(b"x-bad".to_vec(), b"a\xffb".to_vec());
        let f = encode(
            serde_json::json!({"body": "%REQ(:METHOD)% %RESPONSE_CODE%",
                "attributes": {"code": "%RESPONSE_CODE%", "missing": "%REQ(X-NONE)%", "bad": "%REQ(X-BAD)%",
                               "n": 7, "nested": {"m": "%REQ(:METHOD)%"}}}),
            &s,
        );
        let get = |n: u32| f.iter().find(|(k, _)| *k == n).map(|(_, v)| *v);
        assert_eq!(get(11), Some(proto::Field::Fixed64(42)));
        assert!(matches!(get(1), Some(proto::Field::Fixed64(t)) if t > 0));
        assert_eq!(get(2), Some(proto::Field::Varint(9)));
        assert_eq!(get(8), Some(proto::Field::Fixed32(1)));
        assert!(matches!(get(9), Some(proto::Field::Bytes(b)) if b.len() == 16));
        let Some(proto::Field::Bytes(body)) = get(5) else { panic!("body") };
        assert_eq!(string_value(body).as_deref(), Some("GET 200"));
        let a = attrs(&f);
        let val = |k: &str| a.iter().find(|(n, _)| n == k).map(|(_, v)| *v).unwrap();
        assert_eq!(string_value(val("code")).as_deref(), Some("200"), "Envoy types every value as a string");
        assert_eq!(string_value(val("missing")).as_deref(), Some("-"));
        assert_eq!(string_value(val("bad")).as_deref(), Some("a\u{fffd}b"));
        assert_eq!(proto::get_varint(val("n"), proto::any::INT), Some(7));
        assert!(proto::get_bytes(val("nested"), proto::any::KVLIST).is_some());
    }

    #[test]
    fn typed_values_type_single_operators_and_drop_absent_ones() {
        let s = FakeStream::ok();
        let f = encode(
            serde_json::json!({"typed_values": true,
                "attributes": {"code": "%RESPONSE_CODE%", "missing": "%REQ(X-NONE)%", "m": "%REQ(:METHOD)%"}}),
            &s,
        );
        let a = attrs(&f);
        assert_eq!(a.len(), 2, "absent value left out: {a:?}");
        let val = |k: &str| a.iter().find(|(n, _)| n == k).map(|(_, v)| *v).unwrap();
        assert_eq!(proto::get_varint(val("code"), proto::any::INT), Some(200));
        assert_eq!(string_value(val("m")).as_deref(), Some("GET"));
    }

    #[test]
    fn config_errors_name_the_field() {
        let cases = [
            (r#"{"protocol":"carrier-pigeon"}"#, "protocol"),
            (r#"{"endpoint":"ftp://localhost:4317"}"#, "endpoint"),
            (r#"{"max_batch_size":-1}"#, "max_batch_size"),
            (r#"{"queue_capacity":0}"#, "queue_capacity"),
            (r#"{"body":"%NOPE%"}"#, "body"),
            (r#"{"attributes":{"a":"%REQ(x%"}}"#, "attributes.a"),
            (r#"{"attributes":{"a":[1]}}"#, "attributes.a"),
            (r#"{"attributes":{"":"%PROTOCOL%"}}"#, "attributes"),
            (r#"{"body":{"a":{"":"x"}}}"#, "body.a"),
            (r#"{"bogus":1}"#, "bogus"),
            (r#"{"retry":{"max_backoff_ms":"x"}}"#, "retry.max_backoff_ms"),
            (r#"{"filter":{"status_code":{}}}"#, "filter"),
        ];
        for (json, field) in cases {
            let e = compile(json.as_bytes(), &no_env).err().unwrap_or_else(|| panic!("{json} accepted"));
            assert!(e.field.starts_with(field), "{json}: {e}");
        }
        // An attribute key holding ": " is named whole.
        let e = compile(br#"{"attributes":{"http: x":{"y":null}}}"#, &no_env).err().expect("null rejected");
        assert_eq!(
            (e.field.as_str(), e.message.as_str()),
            ("attributes.http: x.y", "null is not a value; leave the key out")
        );
    }

    /// `log_name` beats OTEL_RESOURCE_ATTRIBUTES; a `log_name` in our `resource_attributes`
    /// beats `log_name`.
    #[test]
    fn log_name_precedence() {
        let env = |k: &str| (k == "OTEL_RESOURCE_ATTRIBUTES").then(|| "log_name=from-env,team=a".to_string());
        let log_name = |c: &Compiled| c.settings.resource.iter().find(|(k, _)| k == "log_name").map(|(_, v)| v.clone());
        let c = compile(br#"{"log_name":"edge"}"#, &env).unwrap();
        assert_eq!(log_name(&c).as_deref(), Some("edge"));
        assert!(c.settings.resource.iter().any(|(k, v)| k == "team" && v == "a"));
        let c = compile(br#"{"log_name":"edge","resource_attributes":{"log_name":"explicit"}}"#, &env).unwrap();
        assert_eq!(log_name(&c).as_deref(), Some("explicit"));
        let c = compile(br#"{}"#, &env).unwrap();
        assert_eq!(log_name(&c).as_deref(), Some("from-env"));
    }

    #[test]
    fn severity_mapping() {
        let end = b"DownstreamEnd".as_slice();
        assert_eq!(severity(200, end), (9, "INFO"));
        assert_eq!(severity(404, end), (13, "WARN"));
        assert_eq!(severity(503, end), (17, "ERROR"));
        assert_eq!(severity(0, end), (17, "ERROR"), "an HTTP stream that ended without a response");
        assert_eq!(severity(0, b"UpstreamEnd"), (17, "ERROR"));
        // Nothing to go by: a TCP session, a request still in progress.
        for t in ["TcpConnectionEnd", "DownstreamStart", "DownstreamPeriodic", "UdpSessionEnd"] {
            assert_eq!(severity(0, t.as_bytes()), (0, ""), "{t}");
        }
        assert_eq!(severity(200, b"DownstreamPeriodic"), (9, "INFO"));
    }
}
