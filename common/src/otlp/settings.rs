//! OTLP exporter settings: the config keys every OTLP signal shares, resolved against the
//! OpenTelemetry environment variables (explicit config wins over the environment, the
//! signal-specific variable over the generic one).
use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::client::{check_identity, check_pem, check_server_name, PemKind};
use crate::config::ConfigError;

/// Which OTLP signal an exporter carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// Log records (`/v1/logs`).
    Logs,
    /// Spans (`/v1/traces`).
    Traces,
    /// Metric points (`/v1/metrics`).
    Metrics,
}

impl Signal {
    /// Path of the OTLP/HTTP endpoint.
    pub fn http_path(self) -> &'static str {
        match self {
            Signal::Logs => "/v1/logs",
            Signal::Traces => "/v1/traces",
            Signal::Metrics => "/v1/metrics",
        }
    }
    /// Path of the OTLP/gRPC method.
    pub fn grpc_path(self) -> &'static str {
        match self {
            Signal::Logs => "/opentelemetry.proto.collector.logs.v1.LogsService/Export",
            Signal::Traces => "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
            Signal::Metrics => "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
        }
    }
    /// The signal's part of the `OTEL_EXPORTER_OTLP_<SIGNAL>_*` variables.
    pub fn env_name(self) -> &'static str {
        match self {
            Signal::Logs => "LOGS",
            Signal::Traces => "TRACES",
            Signal::Metrics => "METRICS",
        }
    }
}

/// Wire protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum Protocol {
    /// OTLP/gRPC (default port 4317).
    #[serde(rename = "grpc")]
    Grpc,
    /// OTLP/HTTP with protobuf bodies (default port 4318).
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

/// Request body compression.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Uncompressed.
    None,
    /// gzip (`Content-Encoding: gzip` / `grpc-encoding: gzip`).
    Gzip,
}

/// `retry` block.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Retry retryable failures at all.
    pub enabled: bool,
    /// First backoff (jittered, doubled per attempt).
    pub initial_backoff_ms: u64,
    /// Cap on one backoff.
    pub max_backoff_ms: u64,
    /// Give up on a request once this much time has passed since its first attempt.
    pub max_elapsed_ms: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig { enabled: true, initial_backoff_ms: 500, max_backoff_ms: 5_000, max_elapsed_ms: 30_000 }
    }
}

/// The OTLP keys of a signal's config (they sit at the top level beside the signal's own keys).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtlpConfig {
    /// Collector URL, e.g. `http://otel-collector:4317`. Absent: `OTEL_EXPORTER_OTLP_*_ENDPOINT`.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// `grpc` (default) or `http/protobuf`.
    #[serde(default)]
    pub protocol: Option<Protocol>,
    /// Extra request headers / gRPC metadata (e.g. `authorization`).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// `none` (default) or `gzip`.
    #[serde(default)]
    pub compression: Option<Compression>,
    /// Deadline of one export attempt.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Records (log records, spans, data points) per export request at most.
    #[serde(default)]
    pub max_batch_size: Option<u64>,
    /// Encoded request size limit; a request is sent before it would grow past it.
    #[serde(default)]
    pub max_request_bytes: Option<u64>,
    /// Retry policy for retryable failures.
    #[serde(default)]
    pub retry: Option<RetryConfig>,
    /// Resource attributes (over `OTEL_RESOURCE_ATTRIBUTES` and `OTEL_SERVICE_NAME`).
    #[serde(default)]
    pub resource_attributes: BTreeMap<String, String>,
    /// TLS to the collector (with an `https://` endpoint).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

/// `tls` block. Files are read at config load; PEM format.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// CA bundle to verify the collector with (default: the system's roots;
    /// `OTEL_EXPORTER_OTLP_CERTIFICATE`).
    #[serde(default)]
    pub ca_file: Option<String>,
    /// Client certificate chain for mTLS (`OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE`).
    #[serde(default)]
    pub cert_file: Option<String>,
    /// Client private key for mTLS (`OTEL_EXPORTER_OTLP_CLIENT_KEY`).
    #[serde(default)]
    pub key_file: Option<String>,
    /// Name to verify the collector's certificate against (default: the endpoint's host).
    #[serde(default)]
    pub server_name: Option<String>,
}

/// Resolved TLS material.
#[derive(Clone, Debug)]
pub struct TlsSettings {
    /// CA bundle (PEM); None = the system's roots.
    pub ca_pem: Option<Vec<u8>>,
    /// Client certificate chain and key (PEM) for mTLS.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// Name to verify, if not the endpoint's host.
    pub server_name: Option<String>,
}

/// The top-level keys that belong to [`OtlpConfig`].
pub const OTLP_KEYS: &[&str] = &[
    "endpoint",
    "protocol",
    "headers",
    "compression",
    "timeout_ms",
    "max_batch_size",
    "max_request_bytes",
    "retry",
    "resource_attributes",
    "tls",
];

/// Default per-attempt timeout.
pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;
/// Longest per-attempt timeout (also what `OTEL_EXPORTER_OTLP_TIMEOUT=0`, "no limit", gives).
pub const MAX_TIMEOUT_MS: u64 = 600_000;
/// Default records per request.
pub const DEFAULT_MAX_BATCH_SIZE: u64 = 512;
/// Default request size limit: the gRPC default max receive size of collectors (4 MiB).
pub const DEFAULT_MAX_REQUEST_BYTES: u64 = 4 * 1024 * 1024;

/// Splits a signal's config object into its OTLP keys and the rest, so each half can be
/// parsed with `deny_unknown_fields` and every error still names its top-level field.
pub fn split_config(bytes: &[u8]) -> Result<(Vec<u8>, Vec<u8>), ConfigError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| ConfigError::new("", "config is not valid UTF-8 (expected a JSON object)"))?;
    let text = if text.trim().is_empty() { "{}" } else { text };
    crate::config::reject_duplicate_keys(text)?;
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| ConfigError::new("", format!("config is not JSON: {e}")))?;
    let serde_json::Value::Object(map) = v else {
        return Err(ConfigError::new("", "config must be a JSON object"));
    };
    let (otlp, rest): (serde_json::Map<_, _>, serde_json::Map<_, _>) =
        map.into_iter().partition(|(k, _)| OTLP_KEYS.contains(&k.as_str()));
    let enc = |m| serde_json::to_vec(&serde_json::Value::Object(m)).unwrap_or_default();
    Ok((enc(otlp), enc(rest)))
}

/// Resolved, validated exporter settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The signal.
    pub signal: Signal,
    /// Wire protocol.
    pub protocol: Protocol,
    /// For gRPC the authority URL (`http://host:port`); for HTTP the full URL with path.
    pub endpoint: String,
    /// Request headers / metadata, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// Body compression.
    pub compression: Compression,
    /// Per-attempt timeout.
    pub timeout: Duration,
    /// Records per request at most.
    pub max_batch_size: usize,
    /// Encoded request bytes at most.
    pub max_request_bytes: usize,
    /// Retry policy.
    pub retry: RetryConfig,
    /// Resource attributes, sorted by key.
    pub resource: Vec<(String, String)>,
    /// TLS, for `https://` endpoints.
    pub tls: Option<TlsSettings>,
}

/// Resolves `cfg` for `signal` against the environment read through `env`
/// (`std::env::var` in production, a map in tests).
pub fn resolve(
    cfg: &OtlpConfig,
    signal: Signal,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Settings, ConfigError> {
    let s = signal.env_name();
    let env_nonempty = |k: &str| env(k).filter(|v| !v.trim().is_empty());
    let sig_env = |suffix: &str| env_nonempty(&format!("OTEL_EXPORTER_OTLP_{s}_{suffix}"));
    let gen_env = |suffix: &str| env_nonempty(&format!("OTEL_EXPORTER_OTLP_{suffix}"));
    // An environment variable we cannot use is ignored with a warning, as the OpenTelemetry
    // spec asks (the same variables configure every SDK in the process's environment); a bad
    // value in our own config still rejects it.
    let ignore =
        |var: &str, why: String| crate::envoy_log!(crate::ffi::LogLevel::Warn, "envoy-obs: ignoring {var}: {why}");
    // The first usable value of the signal's variable, then the generic one: an unusable
    // signal-specific value falls back to a usable generic one, not to the default.
    fn layered<T>(
        vars: [String; 2],
        env: &dyn Fn(&str) -> Option<String>,
        ignore: &dyn Fn(&str, String),
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Option<T> {
        vars.into_iter().find_map(|var| {
            let v = env(&var)?;
            parse(v.trim()).map_err(|why| ignore(&var, why)).ok()
        })
    }
    let vars = |suffix: &str| [format!("OTEL_EXPORTER_OTLP_{s}_{suffix}"), format!("OTEL_EXPORTER_OTLP_{suffix}")];

    let protocol = match cfg.protocol {
        Some(p) => p,
        None => {
            let known = |v: &str| match v {
                "grpc" => Ok(Protocol::Grpc),
                "http/protobuf" => Ok(Protocol::HttpProtobuf),
                "http/json" => {
                    // The same port and path as protobuf, which collectors take there too.
                    ignore("OTEL_EXPORTER_OTLP_*PROTOCOL", "http/json is not supported; using http/protobuf".into());
                    Ok(Protocol::HttpProtobuf)
                }
                other => Err(format!("{other:?} is not supported (grpc or http/protobuf)")),
            };
            layered(vars("PROTOCOL"), &env_nonempty, &ignore, known).unwrap_or(Protocol::Grpc)
        }
    };

    // The signal's path goes after the URL's path, before any query (`http://gw:4318/?t=x`).
    let join_path = |base: &str| -> String {
        let (b, query) = base.split_once('?').map_or((base, None), |(b, q)| (b, Some(q)));
        let b = b.trim_end_matches('/');
        match query {
            Some(q) => format!("{b}{}?{q}", signal.http_path()),
            None => format!("{b}{}", signal.http_path()),
        }
    };
    let default_endpoint = |protocol| match protocol {
        Protocol::Grpc => "http://localhost:4317".to_string(),
        Protocol::HttpProtobuf => join_path("http://localhost:4318"),
    };
    // (The endpoint, and the variable it came from.)
    let (endpoint, from_var) = if let Some(e) = &cfg.endpoint {
        let e = e.trim().to_string();
        let e = match protocol {
            Protocol::Grpc => e,
            // Like the signal-specific variable, a URL with a path is used as given; a bare
            // `http://host:port` gets the signal's path.
            Protocol::HttpProtobuf if has_path(&e) => e,
            Protocol::HttpProtobuf => join_path(&e),
        };
        (e, None)
    } else if let Some(e) = sig_env("ENDPOINT") {
        (e.trim().to_string(), Some(format!("OTEL_EXPORTER_OTLP_{s}_ENDPOINT")))
    } else if let Some(e) = gen_env("ENDPOINT") {
        let e = match protocol {
            Protocol::Grpc => e.trim().to_string(),
            Protocol::HttpProtobuf => join_path(e.trim()),
        };
        (e, Some("OTEL_EXPORTER_OTLP_ENDPOINT".to_string()))
    } else {
        (default_endpoint(protocol), None)
    };
    // A gRPC endpoint may come without a scheme (`collector:4317`, the form gRPC clients take):
    // TLS unless OTEL_EXPORTER_OTLP_[<SIGNAL>_]INSECURE is true (OTLP exporter spec, `insecure`).
    let host_port = |e: &str| e.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
    let endpoint = if protocol == Protocol::Grpc && !endpoint.contains("://") && host_port(&endpoint) {
        let insecure = sig_env("INSECURE").or_else(|| gen_env("INSECURE"));
        let plain = insecure.as_deref().map(str::trim).is_some_and(|v| v.eq_ignore_ascii_case("true"));
        format!("{}://{endpoint}", if plain { "http" } else { "https" })
    } else {
        endpoint
    };
    // An endpoint from the environment that this protocol cannot use (a gRPC endpoint with a
    // path, e.g. an HTTP URL while the protocol is left at grpc) is ignored like any other
    // unusable variable; one in our own config rejects it.
    let endpoint = match (check_endpoint(&endpoint, protocol), from_var) {
        (Ok(()), _) => endpoint,
        (Err(e), Some(var)) => {
            ignore(&var, format!("{}; using {}", e.message, default_endpoint(protocol)));
            default_endpoint(protocol)
        }
        (Err(e), None) => return Err(e),
    };
    let tls = resolve_tls(cfg.tls.as_ref(), &endpoint, &sig_env, &gen_env)?;

    // Headers come whole from the most specific source that has any — config `headers`, else
    // the signal's variable, else the generic one — never merged: a more specific setting
    // overrides a less specific one (OTLP exporter spec), and a token meant for one backend
    // must not ride along to another configured more specifically.
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    if cfg.headers.is_empty() {
        let sig_var = format!("OTEL_EXPORTER_OTLP_{s}_HEADERS");
        let found = [sig_var.as_str(), "OTEL_EXPORTER_OTLP_HEADERS"]
            .into_iter()
            .find_map(|var| env_nonempty(var).map(|v| (var, v)));
        if let Some((var, v)) = found {
            // Every header checked as one from our config would be; an unusable one (a
            // non-ASCII value, say) makes the variable ignored whole rather than the config
            // rejected.
            let list = parse_kv_list(&v).and_then(|list| {
                let list: Vec<_> = list.into_iter().map(|(k, v)| (k.to_ascii_lowercase(), v)).collect();
                list.iter().try_for_each(|(k, v)| check_header(k, v).map_err(|m| format!("header {k:?}: {m}")))?;
                Ok(list)
            });
            match list {
                Ok(list) => headers.extend(list),
                Err(m) => ignore(var, m),
            }
        }
    }
    for (k, v) in &cfg.headers {
        // Header names are case-insensitive: two spellings of one would keep either value.
        if headers.insert(k.to_ascii_lowercase(), v.clone()).is_some() {
            return Err(ConfigError::new(format!("headers.{k}"), "given twice (header names ignore case)"));
        }
    }
    for (k, v) in &headers {
        check_header(k, v).map_err(|m| ConfigError::new(format!("headers.{k}"), m))?;
    }

    let compression = match cfg.compression {
        Some(c) => c,
        None => {
            let known = |v: &str| match v {
                "none" => Ok(Compression::None),
                "gzip" => Ok(Compression::Gzip),
                other => Err(format!("{other:?} is not gzip or none")),
            };
            layered(vars("COMPRESSION"), &env_nonempty, &ignore, known).unwrap_or(Compression::None)
        }
    };

    let timeout_ms = match cfg.timeout_ms {
        Some(t) => t,
        None => {
            let ms = |v: &str| v.parse::<u64>().map_err(|_| format!("{v:?} is not milliseconds"));
            match layered(vars("TIMEOUT"), &env_nonempty, &ignore, ms) {
                // 0 means no limit (OpenTelemetry's timeout convention): the longest we allow.
                Some(0) => MAX_TIMEOUT_MS,
                Some(t) => t.min(MAX_TIMEOUT_MS),
                None => DEFAULT_TIMEOUT_MS,
            }
        }
    };
    if !(1..=MAX_TIMEOUT_MS).contains(&timeout_ms) {
        return Err(ConfigError::new("timeout_ms", format!("must be between 1 and {MAX_TIMEOUT_MS}")));
    }
    let max_batch_size = cfg.max_batch_size.unwrap_or(DEFAULT_MAX_BATCH_SIZE);
    if !(1..=1_000_000).contains(&max_batch_size) {
        return Err(ConfigError::new("max_batch_size", "must be between 1 and 1000000"));
    }
    let max_request_bytes = cfg.max_request_bytes.unwrap_or(DEFAULT_MAX_REQUEST_BYTES);
    if !(1024..=(256 << 20)).contains(&max_request_bytes) {
        return Err(ConfigError::new("max_request_bytes", "must be between 1024 and 268435456"));
    }
    let retry = cfg.retry.clone().unwrap_or_default();
    if retry.initial_backoff_ms == 0 || retry.initial_backoff_ms > 60_000 {
        return Err(ConfigError::new("retry.initial_backoff_ms", "must be between 1 and 60000"));
    }
    if retry.max_backoff_ms < retry.initial_backoff_ms || retry.max_backoff_ms > 300_000 {
        return Err(ConfigError::new("retry.max_backoff_ms", "must be between initial_backoff_ms and 300000"));
    }
    if retry.max_elapsed_ms > 3_600_000 {
        return Err(ConfigError::new("retry.max_elapsed_ms", "must be at most 3600000"));
    }

    let mut resource: BTreeMap<String, String> = BTreeMap::new();
    if let Some(v) = env_nonempty("OTEL_RESOURCE_ATTRIBUTES") {
        // A value that does not decode is discarded whole (OpenTelemetry resource SDK spec).
        match parse_kv_list(&v) {
            Ok(list) => resource.extend(list),
            Err(m) => ignore("OTEL_RESOURCE_ATTRIBUTES", m),
        }
    }
    if let Some(v) = env_nonempty("OTEL_SERVICE_NAME") {
        resource.insert("service.name".into(), v.trim().to_string());
    }
    for (k, v) in &cfg.resource_attributes {
        if k.is_empty() {
            return Err(ConfigError::new("resource_attributes", "keys must not be empty"));
        }
        resource.insert(k.clone(), v.clone());
    }

    Ok(Settings {
        signal,
        protocol,
        endpoint,
        headers: headers.into_iter().collect(),
        compression,
        timeout: Duration::from_millis(timeout_ms),
        max_batch_size: max_batch_size as usize,
        max_request_bytes: max_request_bytes as usize,
        retry,
        resource: resource.into_iter().collect(),
        tls,
    })
}

fn resolve_tls(
    cfg: Option<&TlsConfig>,
    endpoint: &str,
    sig_env: &dyn Fn(&str) -> Option<String>,
    gen_env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<TlsSettings>, ConfigError> {
    let https = endpoint.starts_with("https://");
    if !https {
        if cfg.is_some() {
            return Err(ConfigError::new("tls", "needs an https:// endpoint"));
        }
        return Ok(None);
    }
    let env = |s: &str| sig_env(s).or_else(|| gen_env(s));
    let c = cfg.cloned().unwrap_or_default();
    let read = |field: &str, path: &str| -> Result<Vec<u8>, ConfigError> {
        let b = std::fs::read(path)
            .map_err(|e| ConfigError::new(format!("tls.{field}"), format!("cannot read {path}: {e}")))?;
        if !b.windows(11).any(|w| w == b"-----BEGIN ") {
            return Err(ConfigError::new(format!("tls.{field}"), format!("{path} is not PEM")));
        }
        let kind = match field {
            "ca_file" => PemKind::Ca,
            "cert_file" => PemKind::Chain,
            _ => PemKind::Key,
        };
        check_pem(kind, &b).map_err(|e| ConfigError::new(format!("tls.{field}"), format!("{path}: {e}")))?;
        Ok(b)
    };
    // A file named by an environment variable (set for the applications' SDKs too, maybe not
    // mounted here) that cannot be used is ignored with a warning, like any other unusable
    // OTEL_* variable; one named in our own config rejects it.
    let ignore = |var: &str, e: ConfigError| {
        crate::envoy_log!(crate::ffi::LogLevel::Warn, "envoy-obs: ignoring OTEL_EXPORTER_OTLP_*{var}: {}", e.message)
    };
    let ca_pem = match c.ca_file {
        Some(p) => Some(read("ca_file", &p)?),
        // The signal's variable, then the generic one: the first file that can be used.
        None => [sig_env("CERTIFICATE"), gen_env("CERTIFICATE")]
            .into_iter()
            .flatten()
            .find_map(|p| read("ca_file", &p).map_err(|e| ignore("CERTIFICATE", e)).ok()),
    };
    let pair = |cert: &str, key: &str| -> Result<(Vec<u8>, Vec<u8>), ConfigError> {
        let (c, k) = (read("cert_file", cert)?, read("key_file", key)?);
        check_identity(&c, &k).map_err(|e| ConfigError::new("tls.key_file", format!("{key} with {cert}: {e}")))?;
        Ok((c, k))
    };
    if let Some(name) = &c.server_name {
        check_server_name(name).map_err(|e| ConfigError::new("tls.server_name", e))?;
    }
    let identity = match (c.cert_file, c.key_file) {
        (Some(cert), Some(key)) => Some(pair(&cert, &key)?),
        (Some(_), None) => return Err(ConfigError::new("tls.key_file", "required with cert_file")),
        (None, Some(_)) => return Err(ConfigError::new("tls.cert_file", "required with key_file")),
        (None, None) => match (env("CLIENT_CERTIFICATE"), env("CLIENT_KEY")) {
            (Some(cert), Some(key)) => match pair(&cert, &key) {
                Ok(p) => Some(p),
                Err(e) => {
                    ignore("CLIENT_CERTIFICATE/CLIENT_KEY", e);
                    None
                }
            },
            (None, None) => None,
            _ => {
                let e = ConfigError::new("tls", "a client certificate needs its key, and a key its certificate");
                ignore("CLIENT_CERTIFICATE/CLIENT_KEY", e);
                None
            }
        },
    };
    Ok(Some(TlsSettings { ca_pem, identity, server_name: c.server_name }))
}

fn has_path(url: &str) -> bool {
    url.parse::<http::Uri>().map(|u| !matches!(u.path(), "" | "/")).unwrap_or(false)
}

fn check_endpoint(e: &str, protocol: Protocol) -> Result<(), ConfigError> {
    let bad = |m: String| Err(ConfigError::new("endpoint", m));
    let uri: http::Uri = match e.parse() {
        Ok(u) => u,
        Err(err) => return bad(format!("{e:?} is not a URL: {err}")),
    };
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {}
        _ => return bad(format!("{e:?} must start with http:// or https://")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return bad(format!("{e:?} has no host"));
    }
    // `http::Uri` takes any digits as a port (and `:99999` then means the scheme's default).
    let host_port = uri.authority().map(|a| a.as_str().rsplit('@').next().unwrap_or_default());
    let port = host_port.and_then(|h| h.rsplit_once(':')).map(|(_, p)| p).filter(|p| !p.ends_with(']'));
    if let Some(p) = port {
        if !p.parse::<u16>().is_ok_and(|p| p > 0) {
            return bad(format!("{e:?}: port {p:?} is not between 1 and 65535"));
        }
    }
    if protocol == Protocol::Grpc && !matches!(uri.path(), "" | "/") {
        return bad(format!("{e:?}: a gRPC endpoint is host and port only, without a path"));
    }
    Ok(())
}

fn check_header(k: &str, v: &str) -> Result<(), String> {
    if http::HeaderName::from_bytes(k.as_bytes()).is_err() || k.starts_with(':') {
        return Err(format!("{k:?} is not a valid header name"));
    }
    if k.ends_with("-bin") {
        return Err("binary (-bin) metadata is not supported".into());
    }
    // The exporter's own framing: a second content-length or host would corrupt the request.
    let lower = k.to_ascii_lowercase();
    if matches!(
        lower.as_str(),
        "content-length"
            | "content-type"
            | "content-encoding"
            | "host"
            | "te"
            | "connection"
            | "transfer-encoding"
            | "upgrade"
            | "keep-alive"
            | "proxy-connection"
    ) || lower.starts_with("grpc-")
    {
        return Err(format!("{k:?} is set by the exporter itself"));
    }
    // (Stricter than an HTTP header value, which may carry obs-text: gRPC metadata is ASCII,
    // and a value it cannot take would be left out of every request without a word.)
    if !v.bytes().all(|c| c == b'\t' || (0x20..0x7f).contains(&c)) {
        return Err("value must be printable ASCII".into());
    }
    Ok(())
}

/// Parses the W3C-baggage-like `k1=v1,k2=v2` lists of `OTEL_EXPORTER_OTLP_HEADERS` and
/// `OTEL_RESOURCE_ATTRIBUTES` (keys and values percent-decoded, whitespace around items
/// ignored).
pub fn parse_kv_list(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for item in s.split(',') {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let Some((k, v)) = item.split_once('=') else {
            return Err(format!("{item:?} is not key=value"));
        };
        let k = k.trim();
        if k.is_empty() {
            return Err(format!("{item:?} has an empty key"));
        }
        out.push((percent_decode(k)?, percent_decode(v.trim())?));
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                Some(v) => out.push(v),
                None => return Err(format!("bad percent-escape in {s:?}")),
            }
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} decodes to invalid UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    fn cfg(json: &str) -> OtlpConfig {
        crate::config::parse(json.as_bytes()).unwrap()
    }

    #[test]
    fn defaults_follow_the_otlp_spec() {
        let s = resolve(&cfg("{}"), Signal::Logs, &env(&[])).unwrap();
        assert_eq!((s.protocol, s.endpoint.as_str()), (Protocol::Grpc, "http://localhost:4317"));
        let s = resolve(&cfg(r#"{"protocol":"http/protobuf"}"#), Signal::Traces, &env(&[])).unwrap();
        assert_eq!(s.endpoint, "http://localhost:4318/v1/traces");
        assert_eq!((s.compression, s.timeout, s.max_batch_size), (Compression::None, Duration::from_secs(10), 512));
    }

    #[test]
    fn environment_is_used_and_config_wins() {
        let e = env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://gen:4318/"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "Authorization=Bearer%20abc, x-a = 1"),
            ("OTEL_EXPORTER_OTLP_LOGS_HEADERS", "x-a=2"),
            ("OTEL_SERVICE_NAME", "edge"),
            ("OTEL_RESOURCE_ATTRIBUTES", "service.name=ignored,deployment.environment=prod"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
        ]);
        let s = resolve(&cfg("{}"), Signal::Logs, &e).unwrap();
        assert_eq!(s.endpoint, "http://gen:4318/v1/logs");
        assert_eq!(s.compression, Compression::Gzip);
        assert_eq!(s.headers, vec![("x-a".into(), "2".into())], "the signal's headers replace the generic ones");
        let generic_only = env(&[("OTEL_EXPORTER_OTLP_HEADERS", "Authorization=Bearer%20abc, x-a = 1")]);
        let g = resolve(&cfg("{}"), Signal::Logs, &generic_only).unwrap();
        assert_eq!(g.headers, vec![("authorization".into(), "Bearer abc".into()), ("x-a".into(), "1".into())]);
        assert_eq!(
            s.resource,
            vec![("deployment.environment".into(), "prod".into()), ("service.name".into(), "edge".into())]
        );
        let s = resolve(
            &cfg(r#"{"endpoint":"http://cfg:4317","protocol":"grpc","headers":{"x-a":"3"},
                "resource_attributes":{"service.name":"mine"}}"#),
            Signal::Logs,
            &e,
        )
        .unwrap();
        assert_eq!((s.protocol, s.endpoint.as_str()), (Protocol::Grpc, "http://cfg:4317"));
        assert_eq!(s.headers, vec![("x-a".into(), "3".into())], "config headers replace the environment's");
        assert!(s.resource.contains(&("service.name".into(), "mine".into())));
        // gRPC endpoints without a scheme: TLS unless INSECURE says otherwise.
        let bare = env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317")]);
        assert_eq!(resolve(&cfg("{}"), Signal::Logs, &bare).unwrap().endpoint, "https://collector:4317");
        let plain =
            env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317"), ("OTEL_EXPORTER_OTLP_LOGS_INSECURE", "true")]);
        assert_eq!(resolve(&cfg("{}"), Signal::Logs, &plain).unwrap().endpoint, "http://collector:4317");
        assert_eq!(resolve(&cfg(r#"{"endpoint":"c:4317"}"#), Signal::Logs, &bare).unwrap().endpoint, "https://c:4317");
        assert_eq!(resolve(&cfg(r#"{"endpoint":"nope"}"#), Signal::Logs, &bare).unwrap_err().field, "endpoint");
        let sig = env(&[("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", "http://sig:9999/custom")]);
        let s = resolve(&cfg(r#"{"protocol":"http/protobuf"}"#), Signal::Logs, &sig).unwrap();
        assert_eq!(s.endpoint, "http://sig:9999/custom", "the signal-specific URL is used as is");
    }

    #[test]
    fn bad_values_name_their_field() {
        let cases = [
            (r#"{"endpoint":"not a url"}"#, "endpoint"),
            (r#"{"endpoint":"ftp://x:1"}"#, "endpoint"),
            (r#"{"endpoint":"http://x:4317","tls":{}}"#, "tls"),
            (r#"{"endpoint":"https://x:4317","tls":{"ca_file":"/nonexistent"}}"#, "tls.ca_file"),
            (r#"{"endpoint":"https://x:4317","tls":{"ca_file":"/etc/hostname"}}"#, "tls.ca_file"),
            (r#"{"endpoint":"https://x:4317","tls":{"cert_file":"/etc/hostname"}}"#, "tls.key_file"),
            (r#"{"endpoint":"http://x:4317/v1/logs"}"#, "endpoint"),
            (r#"{"headers":{"bad header":"v"}}"#, "headers.bad header"),
            (r#"{"headers":{"x":"line\nbreak"}}"#, "headers.x"),
            (r#"{"timeout_ms":0}"#, "timeout_ms"),
            (r#"{"max_batch_size":0}"#, "max_batch_size"),
            (r#"{"max_request_bytes":10}"#, "max_request_bytes"),
            (r#"{"retry":{"initial_backoff_ms":0}}"#, "retry.initial_backoff_ms"),
            (r#"{"retry":{"initial_backoff_ms":100,"max_backoff_ms":10}}"#, "retry.max_backoff_ms"),
        ];
        for (json, field) in cases {
            let e = resolve(&cfg(json), Signal::Logs, &env(&[])).unwrap_err();
            assert_eq!(e.field, field, "{json}: {e}");
        }
        let e = crate::config::parse::<OtlpConfig>(br#"{"protocol":"http/json"}"#).unwrap_err();
        assert_eq!(e.field, "protocol");
        let e = crate::config::parse::<OtlpConfig>(br#"{"max_batch_size":-5}"#).unwrap_err();
        assert_eq!(e.field, "max_batch_size");
    }

    /// The environment is shared with every SDK in the process: a value we cannot use is
    /// ignored with a warning (OpenTelemetry spec), never a rejected config; timeout 0 means no
    /// limit; resource attribute keys are percent-decoded too.
    #[test]
    fn unusable_environment_values_are_ignored() {
        let e = env(&[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "thrift"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "zstd"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "-5"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "a=%zz"),
            ("OTEL_RESOURCE_ATTRIBUTES", "team=a%zz,x=1"),
        ]);
        let s = resolve(&cfg("{}"), Signal::Logs, &e).unwrap();
        assert_eq!(
            (s.protocol, s.compression, s.timeout),
            (Protocol::Grpc, Compression::None, Duration::from_secs(10))
        );
        // An unusable signal-specific value falls back to a usable generic one, not to the
        // default; http/json goes as http/protobuf (same port and path), not gRPC to port 4318.
        let e = env(&[
            ("OTEL_EXPORTER_OTLP_LOGS_PROTOCOL", "thrift"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ("OTEL_EXPORTER_OTLP_LOGS_COMPRESSION", "zstd"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
            ("OTEL_EXPORTER_OTLP_LOGS_TIMEOUT", "soon"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://gw:4318/?token=x"),
        ]);
        let s = resolve(&cfg("{}"), Signal::Logs, &e).unwrap();
        assert_eq!(
            (s.protocol, s.compression, s.timeout),
            (Protocol::HttpProtobuf, Compression::Gzip, Duration::from_millis(2500))
        );
        assert_eq!(s.endpoint, "http://gw:4318/v1/logs?token=x", "the signal's path goes before the query");
        assert!(s.headers.is_empty() && s.resource.is_empty(), "{s:?}");
        let e = env(&[("OTEL_EXPORTER_OTLP_TIMEOUT", "0"), ("OTEL_RESOURCE_ATTRIBUTES", "my%2Ckey=v%2C1")]);
        let s = resolve(&cfg("{}"), Signal::Logs, &e).unwrap();
        assert_eq!(s.timeout, Duration::from_millis(MAX_TIMEOUT_MS));
        assert_eq!(s.resource, vec![("my,key".into(), "v,1".into())]);
        // A header value that decodes to non-ASCII, and an HTTP URL left to the default
        // protocol (gRPC takes no path): ignored, not a rejected config.
        let e = env(&[
            ("OTEL_EXPORTER_OTLP_HEADERS", "x=caf%C3%A9,y=1"),
            ("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", "http://c:4318/v1/logs"),
        ]);
        let s = resolve(&cfg("{}"), Signal::Logs, &e).unwrap();
        assert!(s.headers.is_empty(), "{s:?}");
        assert_eq!((s.protocol, s.endpoint.as_str()), (Protocol::Grpc, "http://localhost:4317"));
        // The same values in our own config still reject it, naming the field.
        let bad = resolve(&cfg(r#"{"endpoint":"http://c:4318/v1/logs"}"#), Signal::Logs, &env(&[]));
        assert_eq!(bad.unwrap_err().field, "endpoint");
        let bad = resolve(&cfg(r#"{"headers":{"x":"café"}}"#), Signal::Logs, &env(&[]));
        assert_eq!(bad.unwrap_err().field, "headers.x");
    }

    #[test]
    fn tls_files_from_the_environment_are_ignored_when_unusable() {
        let dir = std::env::temp_dir().join(format!("envoy-obs-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pem = dir.join("ca.pem");
        std::fs::write(&pem, crate::otlp::client::tests::CA).unwrap();
        let pem = pem.to_str().unwrap();
        let https = r#"{"endpoint":"https://c:4317"}"#;
        // Named by a variable but not mounted here, or a key without its certificate: ignored.
        for vars in [
            &[("OTEL_EXPORTER_OTLP_CERTIFICATE", "/nonexistent/ca.pem")][..],
            &[("OTEL_EXPORTER_OTLP_CLIENT_KEY", pem)][..],
            &[("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", pem), ("OTEL_EXPORTER_OTLP_CLIENT_KEY", "/nonexistent")][..],
        ] {
            let s = resolve(&cfg(https), Signal::Logs, &env(vars)).unwrap_or_else(|e| panic!("{vars:?}: {e}"));
            let t = s.tls.unwrap();
            assert!(t.ca_pem.is_none() && t.identity.is_none(), "{vars:?}");
        }
        // A usable one is used; the same file in our own config, missing, rejects it.
        let s = resolve(
            &cfg(https),
            Signal::Logs,
            // An unusable signal-specific file falls back to the generic variable's.
            &env(&[("OTEL_EXPORTER_OTLP_LOGS_CERTIFICATE", "/x"), ("OTEL_EXPORTER_OTLP_CERTIFICATE", pem)]),
        )
        .unwrap();
        assert!(s.tls.unwrap().ca_pem.is_some());
        let bad =
            resolve(&cfg(r#"{"endpoint":"https://c:4317","tls":{"ca_file":"/nonexistent"}}"#), Signal::Logs, &env(&[]));
        assert_eq!(bad.unwrap_err().field, "tls.ca_file");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// What the exporter would only find out on its thread (failing every export) is checked
    /// at load: PEM that parses, a key that goes with its certificate, a server name.
    #[test]
    fn tls_files_and_names_are_checked_at_load() {
        use crate::otlp::client::tests::{CA, CLIENT_CERT, CLIENT_KEY, OTHER_KEY};
        let dir = std::env::temp_dir().join(format!("envoy-obs-tls-load-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            p.to_str().unwrap().to_string()
        };
        let (ca, cert, key, other) =
            (file("ca.pem", CA), file("c.pem", CLIENT_CERT), file("k.pem", CLIENT_KEY), file("o.pem", OTHER_KEY));
        let junk = file("junk.pem", "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n");
        let tls = |t: String| {
            resolve(&cfg(&format!(r#"{{"endpoint":"https://c:4317","tls":{t}}}"#)), Signal::Logs, &env(&[]))
        };
        let ok = tls(format!(
            r#"{{"ca_file":"{ca}","cert_file":"{cert}","key_file":"{key}","server_name":"collector.internal"}}"#
        ));
        assert!(ok.is_ok_and(|s| s.tls.is_some_and(|t| t.identity.is_some())));
        for (t, field) in [
            (format!(r#"{{"ca_file":"{junk}"}}"#), "tls.ca_file"),
            (format!(r#"{{"ca_file":"{key}"}}"#), "tls.ca_file"),
            (format!(r#"{{"cert_file":"{cert}","key_file":"{cert}"}}"#), "tls.key_file"),
            (format!(r#"{{"cert_file":"{key}","key_file":"{key}"}}"#), "tls.cert_file"),
            (format!(r#"{{"cert_file":"{cert}","key_file":"{other}"}}"#), "tls.key_file"),
            (r#"{"server_name":""}"#.to_string(), "tls.server_name"),
            (r#"{"server_name":"bad name"}"#.to_string(), "tls.server_name"),
        ] {
            let e = tls(t.clone()).err().unwrap_or_else(|| panic!("{t} accepted"));
            assert_eq!(e.field, field, "{t}: {e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn endpoint_ports_and_reserved_headers_are_refused() {
        for e in ["http://c:99999", "http://c:0", "https://c:65536/v1/logs", "http://u:p@c:70000"] {
            let r =
                resolve(&cfg(&format!(r#"{{"endpoint":"{e}","protocol":"http/protobuf"}}"#)), Signal::Logs, &env(&[]));
            assert_eq!(r.err().map(|e| e.field), Some("endpoint".into()), "{e}");
        }
        for e in ["http://c:65535", "http://[::1]:4318", "http://[::1]", "http://u:p@c:4318"] {
            let r =
                resolve(&cfg(&format!(r#"{{"endpoint":"{e}","protocol":"http/protobuf"}}"#)), Signal::Logs, &env(&[]));
            assert!(r.is_ok(), "{e}: {:?}", r.err());
        }
        let twice = resolve(&cfg(r#"{"headers":{"Authorization":"a","authorization":"b"}}"#), Signal::Logs, &env(&[]));
        assert!(twice.is_err_and(|e| e.field.starts_with("headers.") && e.message.contains("twice")));
        for h in ["content-length", "Content-Type", "host", "te", "connection", "transfer-encoding", "grpc-timeout"] {
            let r = resolve(&cfg(&format!(r#"{{"headers":{{"{h}":"x"}}}}"#)), Signal::Logs, &env(&[]));
            assert_eq!(r.err().map(|e| e.field), Some(format!("headers.{}", h.to_lowercase())), "{h}");
        }
    }

    #[test]
    fn split_keeps_each_half_strict() {
        let (otlp, rest) = split_config(br#"{"endpoint":"http://a:1","body":"%PROTOCOL%","retry":{}}"#).unwrap();
        let o: serde_json::Value = serde_json::from_slice(&otlp).unwrap();
        let r: serde_json::Value = serde_json::from_slice(&rest).unwrap();
        assert_eq!(o, serde_json::json!({"endpoint":"http://a:1","retry":{}}));
        assert_eq!(r, serde_json::json!({"body":"%PROTOCOL%"}));
        assert!(split_config(b"[1]").is_err());
    }
}
