//! `tracer_config` of `tracer_name: opentelemetry`: the tracer's own keys (service name,
//! sampler, propagators, queues) beside the shared OTLP keys (endpoint, protocol, …).
use serde::Deserialize;

use envoy_obs_common::config::{lenient_f64, parse, ConfigError};
use envoy_obs_common::otlp::{self, OtlpConfig, Settings, Signal};

use crate::propagation::Propagator;

/// Default `flush_interval_ms`.
pub const DEFAULT_FLUSH_INTERVAL_MS: u64 = 1000;
/// Default per-worker `queue_capacity`, in spans.
pub const DEFAULT_QUEUE_CAPACITY: usize = 8192;
/// Service name when neither config nor environment gives one (Envoy's own default).
pub const DEFAULT_SERVICE_NAME: &str = "unknown_service:envoy";

fn default_flush() -> u64 {
    DEFAULT_FLUSH_INTERVAL_MS
}
fn default_capacity() -> usize {
    DEFAULT_QUEUE_CAPACITY
}
fn default_prefix() -> String {
    "otel".into()
}

/// The tracer's own keys.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracerConfig {
    /// `service.name` of every span (over `OTEL_SERVICE_NAME` and `resource_attributes`).
    #[serde(default)]
    pub service_name: Option<String>,
    /// Absent: follow Envoy's decision (`random_sampling`, `x-envoy-force-trace`, …), and an
    /// incoming not-sampled flag.
    #[serde(default)]
    pub sampler: Option<SamplerSpec>,
    /// Absent: `OTEL_PROPAGATORS`, else `[tracecontext, baggage]`.
    #[serde(default)]
    pub propagators: Option<Vec<Propagator>>,
    /// Longest a finished span waits before it is exported.
    #[serde(default = "default_flush")]
    pub flush_interval_ms: u64,
    /// Per-worker queue size in spans; when full, new spans are dropped and counted.
    #[serde(default = "default_capacity")]
    pub queue_capacity: usize,
    /// Middle part of the metric names: `tracer.<stat_prefix>.spans_*`.
    #[serde(default = "default_prefix")]
    pub stat_prefix: String,
}

/// `sampler` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplerSpec {
    /// Which sampler.
    #[serde(rename = "type")]
    pub kind: SamplerKind,
    /// `trace_id_ratio`: the fraction of traces to sample, 0..=1.
    #[serde(default, deserialize_with = "opt_f64")]
    pub ratio: Option<f64>,
    /// `parent_based`: the sampler for spans without a parent (default `always_on`).
    #[serde(default)]
    pub root: Option<Box<SamplerSpec>>,
}

fn opt_f64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    lenient_f64(d).map(Some)
}

/// Sampler kinds (OpenTelemetry names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SamplerKind {
    /// Sample everything.
    AlwaysOn,
    /// Sample nothing (context is still propagated).
    AlwaysOff,
    /// Sample a fixed fraction of traces, decided on the trace id.
    TraceIdRatio,
    /// Follow the parent's sampled flag; `root` decides for new traces.
    ParentBased,
}

/// A compiled sampler.
#[derive(Debug, Clone, PartialEq)]
pub enum Sampler {
    /// Yes.
    AlwaysOn,
    /// No.
    AlwaysOff,
    /// Yes when the trace id's last 8 bytes, shifted right by one, are below this threshold
    /// (`ratio` x 2^63): the test of the OpenTelemetry SDKs (Go's and Rust's
    /// `TraceIdRatioBased`), so services sample the same traces at the same ratio.
    Ratio(u64),
    /// The parent's flag when there is one, else the root sampler.
    ParentBased(Box<Sampler>),
}

impl Sampler {
    fn compile(s: &SamplerSpec, field: &str) -> Result<Sampler, ConfigError> {
        let ratio_only = |ok: bool| -> Result<(), ConfigError> {
            if !ok && s.ratio.is_some() {
                return Err(ConfigError::new(format!("{field}.ratio"), "only for type trace_id_ratio"));
            }
            Ok(())
        };
        Ok(match s.kind {
            SamplerKind::AlwaysOn | SamplerKind::AlwaysOff | SamplerKind::ParentBased => {
                ratio_only(false)?;
                if s.root.is_some() && s.kind != SamplerKind::ParentBased {
                    return Err(ConfigError::new(format!("{field}.root"), "only for type parent_based"));
                }
                match s.kind {
                    SamplerKind::AlwaysOn => Sampler::AlwaysOn,
                    SamplerKind::AlwaysOff => Sampler::AlwaysOff,
                    _ => Sampler::ParentBased(Box::new(match &s.root {
                        Some(r) => Sampler::compile(r, &format!("{field}.root"))?,
                        None => Sampler::AlwaysOn,
                    })),
                }
            }
            SamplerKind::TraceIdRatio => {
                if s.root.is_some() {
                    return Err(ConfigError::new(format!("{field}.root"), "only for type parent_based"));
                }
                let r =
                    s.ratio.ok_or_else(|| ConfigError::new(format!("{field}.ratio"), "required for trace_id_ratio"))?;
                if !(0.0..=1.0).contains(&r) || r.is_nan() {
                    return Err(ConfigError::new(format!("{field}.ratio"), format!("{r} is not between 0 and 1")));
                }
                Sampler::Ratio((r * (1u64 << 63) as f64) as u64)
            }
        })
    }

    /// The decision for a span of `trace_id` whose parent (if any) had `parent_sampled`.
    pub fn decide(&self, trace_id: &[u8; 16], parent_sampled: Option<bool>) -> bool {
        match self {
            Sampler::AlwaysOn => true,
            Sampler::AlwaysOff => false,
            Sampler::Ratio(t) => {
                let low = u64::from_be_bytes(trace_id[8..].try_into().unwrap_or([0; 8]));
                (low >> 1) < *t
            }
            Sampler::ParentBased(root) => match parent_sampled {
                Some(s) => s,
                None => root.decide(trace_id, None),
            },
        }
    }
}

/// Everything checked at config load.
#[derive(Debug)]
pub struct Compiled {
    /// The tracer's own keys.
    pub config: TracerConfig,
    /// OTLP settings, resource attributes including `service.name`.
    pub settings: Settings,
    /// `None`: follow Envoy.
    pub sampler: Option<Sampler>,
    /// Propagators in extraction order.
    pub propagators: Vec<Propagator>,
}

/// Parses and validates the config, the environment read through `env`.
pub fn compile(bytes: &[u8], env: &dyn Fn(&str) -> Option<String>) -> Result<Compiled, ConfigError> {
    let (otlp_part, rest) = otlp::split_config(bytes)?;
    let otlp_cfg: OtlpConfig = parse(&otlp_part)?;
    let config: TracerConfig = parse(&rest)?;
    if !(1..=60_000).contains(&config.flush_interval_ms) {
        return Err(ConfigError::new("flush_interval_ms", "must be between 1 and 60000"));
    }
    if !(1..=1_048_576).contains(&config.queue_capacity) {
        return Err(ConfigError::new("queue_capacity", "must be between 1 and 1048576"));
    }
    let p = &config.stat_prefix;
    if p.is_empty() || !p.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_') {
        return Err(ConfigError::new("stat_prefix", "must be non-empty [a-z0-9_]"));
    }
    let mut settings = otlp::resolve(&otlp_cfg, Signal::Traces, env)?;
    let service = match &config.service_name {
        Some(s) if s.trim().is_empty() => return Err(ConfigError::new("service_name", "must not be empty")),
        Some(s) => Some(s.clone()),
        None if settings.resource.iter().any(|(k, _)| k == "service.name") => None,
        None => Some(DEFAULT_SERVICE_NAME.to_string()),
    };
    if let Some(s) = service {
        settings.resource.retain(|(k, _)| k != "service.name");
        settings.resource.push(("service.name".into(), s));
    }
    for (k, v) in [
        ("telemetry.sdk.name", "envoy-obs"),
        ("telemetry.sdk.language", "rust"),
        ("telemetry.sdk.version", env!("CARGO_PKG_VERSION")),
    ] {
        if !settings.resource.iter().any(|(key, _)| key == k) {
            settings.resource.push((k.into(), v.into()));
        }
    }
    settings.resource.sort();
    let sampler = config.sampler.as_ref().map(|s| Sampler::compile(s, "sampler")).transpose()?;
    let propagators = match &config.propagators {
        Some(p) => p.clone(),
        None => match env("OTEL_PROPAGATORS").filter(|v| !v.trim().is_empty()) {
            Some(v) if v.trim().eq_ignore_ascii_case("none") => Vec::new(),
            // The OpenTelemetry environment spec: names match without regard to case, and a
            // value this tracer does not know (one meant for the applications' SDKs, `xray`)
            // is ignored with a warning rather than failing the config.
            Some(v) => v
                .split(',')
                .filter_map(|s| {
                    let p = Propagator::from_name(&s.trim().to_ascii_lowercase());
                    if p.is_none() {
                        envoy_obs_common::envoy_log!(
                            envoy_obs_common::ffi::LogLevel::Warn,
                            "envoy-obs: OTEL_PROPAGATORS: ignoring {:?}, not one of tracecontext, baggage, b3, b3multi",
                            s.trim()
                        );
                    }
                    p
                })
                .fold(Vec::new(), |mut v, p| {
                    if !v.contains(&p) {
                        v.push(p);
                    }
                    v
                }),
            None => vec![Propagator::Tracecontext, Propagator::Baggage],
        },
    };
    Ok(Compiled { config, settings, sampler, propagators })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn defaults() {
        let c = compile(b"{}", &no_env).unwrap();
        assert_eq!(c.sampler, None);
        assert_eq!(c.propagators, vec![Propagator::Tracecontext, Propagator::Baggage]);
        assert!(c.settings.resource.contains(&("service.name".into(), DEFAULT_SERVICE_NAME.into())));
        assert_eq!(c.settings.endpoint, "http://localhost:4317");
    }

    #[test]
    fn service_name_precedence() {
        let env = |k: &str| (k == "OTEL_SERVICE_NAME").then(|| "from-env".to_string());
        let name = |c: &Compiled| c.settings.resource.iter().find(|(k, _)| k == "service.name").unwrap().1.clone();
        assert_eq!(name(&compile(b"{}", &env).unwrap()), "from-env");
        assert_eq!(name(&compile(br#"{"service_name":"cfg"}"#, &env).unwrap()), "cfg");
        let c = compile(br#"{"resource_attributes":{"service.name":"res"}}"#, &env).unwrap();
        assert_eq!(name(&c), "res");
    }

    #[test]
    fn samplers() {
        let c =
            compile(br#"{"sampler":{"type":"parent_based","root":{"type":"trace_id_ratio","ratio":"0.25"}}}"#, &no_env)
                .unwrap();
        let s = c.sampler.unwrap();
        assert!(s.decide(&[0xff; 16], Some(true)));
        assert!(!s.decide(&[0; 16], Some(false)));
        // Ratio over many pseudo-random ids.
        let mut x = 0x9e3779b97f4a7c15u64;
        let mut yes = 0;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut id = [0u8; 16];
            id[8..].copy_from_slice(&x.to_be_bytes());
            yes += s.decide(&id, None) as u32;
        }
        assert!((24_000..26_000).contains(&yes), "{yes}");
        // The SDKs' test, (last 8 bytes >> 1) < ratio x 2^63, on ids either side of the bound:
        // services that sample at the same ratio keep the same traces.
        let id = |low: u64| {
            let mut id = [0u8; 16];
            id[8..].copy_from_slice(&low.to_be_bytes());
            id
        };
        assert!(s.decide(&id(0x3fff_ffff_ffff_ffff), None), "0x1fff.. < 2^61");
        assert!(s.decide(&id(0x3fff_ffff_ffff_fffe), None));
        assert!(!s.decide(&id(0x4000_0000_0000_0000), None));
        assert!(!s.decide(&id(0xbfff_ffff_ffff_ffff), None), "the top bit counts");
    }

    #[test]
    fn fuzzed_configs_never_panic() {
        let seeds: [&[u8]; 3] = [
            br#"{"sampler":{"type":"parent_based","root":{"type":"trace_id_ratio","ratio":0.25}},"propagators":["b3"]}"#,
            br#"{"service_name":"x","endpoint":"https://h:1","tls":{"ca_file":"/x"},"retry":{"max_elapsed_ms":1}}"#,
            br#"{"headers":{"a":"b"},"max_batch_size":1,"queue_capacity":1,"stat_prefix":"a_1"}"#,
        ];
        let mut m = envoy_obs_common::fuzz::Mutator::new(7, b"{}[]\":,.0123456789-eE abtrueflsn_/\\\xff");
        for i in 0..envoy_obs_common::fuzz::Mutator::iterations(20_000) {
            let mut s = seeds[i % seeds.len()].to_vec();
            m.mutate(&mut s);
            let _ = compile(&s, &no_env);
        }
    }

    #[test]
    fn bad_config_names_the_field() {
        let cases = [
            (r#"{"sampler":{"type":"sometimes"}}"#, "sampler.type"),
            (r#"{"sampler":{"type":"trace_id_ratio","ratio":1.5}}"#, "sampler.ratio"),
            (r#"{"sampler":{"type":"trace_id_ratio"}}"#, "sampler.ratio"),
            (r#"{"sampler":{"type":"always_on","ratio":0.5}}"#, "sampler.ratio"),
            (
                r#"{"sampler":{"type":"parent_based","root":{"type":"trace_id_ratio","ratio":-1}}}"#,
                "sampler.root.ratio",
            ),
            (r#"{"propagators":["jaeger"]}"#, "propagators"),
            (r#"{"endpoint":"nope"}"#, "endpoint"),
            (r#"{"service_name":""}"#, "service_name"),
            (r#"{"bogus":true}"#, "bogus"),
        ];
        for (json, field) in cases {
            let e = compile(json.as_bytes(), &no_env).err().unwrap_or_else(|| panic!("{json} accepted"));
            assert!(e.field.starts_with(field), "{json}: {e}");
        }
        // From the environment (set for the applications' SDKs too): case does not matter, an
        // unknown name is ignored with a warning, as the OpenTelemetry environment spec asks.
        let env = |k: &str| (k == "OTEL_PROPAGATORS").then(|| "TraceContext,xray, B3Multi,tracecontext".to_string());
        assert_eq!(compile(b"{}", &env).unwrap().propagators, vec![Propagator::Tracecontext, Propagator::B3multi]);
    }
}
