//! Record filters, evaluated on the worker before anything is rendered.
//!
//! ```json
//! "filter": {"or": [{"status_code": {"ge": 500}}, {"sample": 0.01}]}
//! ```
//! keeps every 5xx and 1% of the rest. `sample` is stable per `x-request-id`: the same request
//! is kept or dropped by every logger (and every proxy) using the same fraction.
use serde::Deserialize;

use envoy_obs_common::config::ConfigError;

use envoy_obs_common::ffi::access_log::{HeaderKind, Stream};

use crate::format::{Ctx, RESPONSE_FLAGS};

/// Bounds on a number; every bound given must hold.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Cmp {
    /// equal to
    pub eq: Option<u64>,
    /// not equal to
    pub ne: Option<u64>,
    /// greater than
    pub gt: Option<u64>,
    /// greater than or equal to
    pub ge: Option<u64>,
    /// less than
    pub lt: Option<u64>,
    /// less than or equal to
    pub le: Option<u64>,
}

impl Cmp {
    fn holds(&self, v: u64) -> bool {
        self.eq.is_none_or(|b| v == b)
            && self.ne.is_none_or(|b| v != b)
            && self.gt.is_none_or(|b| v > b)
            && self.ge.is_none_or(|b| v >= b)
            && self.lt.is_none_or(|b| v < b)
            && self.le.is_none_or(|b| v <= b)
    }
    fn is_empty(&self) -> bool {
        *self == Cmp::default()
    }
}

/// The filter as written in config.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum FilterSpec {
    /// HTTP status (`%RESPONSE_CODE%`, 0 when there was none).
    StatusCode(Cmp),
    /// Total duration in ms (`%DURATION%`).
    DurationMs(Cmp),
    /// Any of these response flags (short `UF` or long `UpstreamConnectionFailure` names);
    /// an empty list means "any flag at all".
    ResponseFlags(Vec<String>),
    /// Health-check requests (`true`) or everything else (`false`).
    HealthCheck(bool),
    /// Keep this fraction (0..=1), stable per x-request-id.
    Sample(#[serde(deserialize_with = "envoy_obs_common::config::lenient_f64")] f64),
    /// All must hold.
    And(Vec<FilterSpec>),
    /// At least one must hold.
    Or(Vec<FilterSpec>),
    /// Must not hold.
    Not(Box<FilterSpec>),
}

/// A compiled filter.
#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    /// status code bounds
    Status(Cmp),
    /// duration bounds (ms)
    Duration(Cmp),
    /// response-flag mask (0 = any flag)
    Flags(u64),
    /// health-check or not
    HealthCheck(bool),
    /// keep a fraction, stable per request id (see [`Filter::keep`])
    Sample {
        /// The fraction in ten-thousandths, compared with Envoy's integer of the id.
        per_10k: f64,
        /// The fraction of the hash range, for ids that are not UUIDs.
        hash_threshold: u64,
    },
    /// all
    And(Vec<Filter>),
    /// any
    Or(Vec<Filter>),
    /// not
    Not(Box<Filter>),
}

impl FilterSpec {
    /// Validates and compiles; errors name the field path under `filter`.
    pub fn compile(&self, path: &str) -> Result<Filter, ConfigError> {
        Ok(match self {
            FilterSpec::StatusCode(c) if c.is_empty() => {
                return Err(ConfigError::new(
                    format!("{path}.status_code"),
                    "give at least one of eq, ne, gt, ge, lt, le",
                ))
            }
            FilterSpec::DurationMs(c) if c.is_empty() => {
                return Err(ConfigError::new(
                    format!("{path}.duration_ms"),
                    "give at least one of eq, ne, gt, ge, lt, le",
                ))
            }
            FilterSpec::StatusCode(c) => Filter::Status(c.clone()),
            FilterSpec::DurationMs(c) => Filter::Duration(c.clone()),
            FilterSpec::ResponseFlags(names) => {
                let mut mask = 0u64;
                for n in names {
                    let bit = RESPONSE_FLAGS.iter().position(|(s, l)| s == n || l == n).ok_or_else(|| {
                        ConfigError::new(format!("{path}.response_flags"), format!("unknown response flag {n:?}"))
                    })?;
                    mask |= 1 << bit;
                }
                Filter::Flags(mask)
            }
            FilterSpec::HealthCheck(b) => Filter::HealthCheck(*b),
            FilterSpec::Sample(f) => {
                if !(0.0..=1.0).contains(f) {
                    return Err(ConfigError::new(
                        format!("{path}.sample"),
                        format!("must be a fraction between 0 and 1, got {f}"),
                    ));
                }
                Filter::Sample {
                    per_10k: *f * 10_000.0,
                    hash_threshold: if *f >= 1.0 { u64::MAX } else { (*f * u64::MAX as f64) as u64 },
                }
            }
            FilterSpec::And(v) if v.is_empty() => {
                return Err(ConfigError::new(format!("{path}.and"), "needs at least one filter"))
            }
            FilterSpec::Or(v) if v.is_empty() => {
                return Err(ConfigError::new(format!("{path}.or"), "needs at least one filter"))
            }
            FilterSpec::And(v) => Filter::And(
                v.iter().enumerate().map(|(i, f)| f.compile(&format!("{path}.and[{i}]"))).collect::<Result<_, _>>()?,
            ),
            FilterSpec::Or(v) => Filter::Or(
                v.iter().enumerate().map(|(i, f)| f.compile(&format!("{path}.or[{i}]"))).collect::<Result<_, _>>()?,
            ),
            FilterSpec::Not(f) => Filter::Not(Box::new(f.compile(&format!("{path}.not"))?)),
        })
    }
}

/// FNV-1a followed by a 64-bit finaliser: cheap, and well spread even for UUIDs that differ
/// in a few characters.
pub fn stable_hash(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &c in b {
        h ^= c as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The integer Envoy's UUID request-id extension takes from an id: its first 8 characters as
/// hex (`toInteger`), when they are 8 hex digits.
fn uuid_integer(id: &[u8]) -> Option<u64> {
    let head = id.get(..8)?;
    head.iter().try_fold(0u64, |v, &c| Some(v << 4 | (c as char).to_digit(16)? as u64))
}

impl Filter {
    /// Whether the record is kept.
    pub fn keep<S: Stream>(&self, cx: &Ctx<'_, S>) -> bool {
        match self {
            Filter::Status(c) => c.holds(cx.stream.response_code() as u64),
            Filter::Duration(c) => match cx.duration_ns() {
                Some(ns) => c.holds((ns.max(0) / 1_000_000) as u64),
                None => false,
            },
            Filter::Flags(mask) => {
                let f = cx.stream.response_flags();
                if *mask == 0 {
                    f != 0
                } else {
                    f & mask != 0
                }
            }
            Filter::HealthCheck(b) => cx.stream.is_health_check() == *b,
            Filter::Sample { per_10k, hash_threshold } => {
                if *hash_threshold == u64::MAX {
                    return true;
                }
                // Envoy's own choice for a UUID request id: the integer of its first 8 hex digits
                // (its UUID request-id extension's `toInteger`) modulo 10,000, as the HCM's
                // `random_sampling` and a runtime filter over ten-thousandths decide — so the
                // same requests are kept as Envoy traces or logs at that rate, on every proxy
                // (the digits Envoy rewrites per hop are not among them). Other ids: a hash of
                // the whole id. Without an id (TCP proxy, `generate_request_id: false`) each
                // record is drawn on its own, as Envoy's runtime filter falls back to a random
                // value.
                match cx.header(HeaderKind::Request, b"x-request-id").filter(|id| !id.is_empty()) {
                    Some(id) => match uuid_integer(id) {
                        Some(v) => ((v % 10_000) as f64) < *per_10k,
                        None => stable_hash(id) <= *hash_threshold,
                    },
                    None => envoy_obs_common::rand::rand64() <= *hash_threshold,
                }
            }
            Filter::And(v) => v.iter().all(|f| f.keep(cx)),
            Filter::Or(v) => v.iter().any(|f| f.keep(cx)),
            Filter::Not(f) => !f.keep(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::tests::FakeStream;

    fn compile(j: serde_json::Value) -> Result<Filter, String> {
        let spec: FilterSpec = serde_json::from_value(j).map_err(|e| e.to_string())?;
        spec.compile("filter").map_err(|e| e.to_string())
    }

    #[test]
    fn five_xx_and_one_percent_of_the_rest() {
        let f = compile(serde_json::json!({"or": [{"status_code": {"ge": 500}}, {"sample": 0.01}]})).unwrap();
        let mut s = FakeStream::ok();
        let mut kept = 0;
        for i in 0..20_000 {
            s.req.insert(b"x-request-id".to_vec(), format!("{:08x}-aaaa-4bbb-8ccc-{i:012x}", i * 7919).into_bytes());
            if f.keep(&Ctx::new(&s, 6)) {
                kept += 1;
            }
        }
        assert!((140..=260).contains(&kept), "1% of 20000 = 200, kept {kept}");
        s.code = 503;
        assert!(f.keep(&Ctx::new(&s, 6)));
    }

    /// Envoy's integer of a UUID (its first 8 hex digits) modulo 10,000 against the fraction in
    /// ten-thousandths; the digits Envoy rewrites per hop (the 15th, the trace reason) do not
    /// change the choice.
    #[test]
    fn sampling_follows_envoys_request_id_integer() {
        let f = compile(serde_json::json!({"sample": 0.1})).unwrap();
        let mut s = FakeStream::ok();
        let keep = |s: &mut FakeStream, id: &str| {
            s.req.insert(b"x-request-id".to_vec(), id.as_bytes().to_vec());
            f.keep(&Ctx::new(s, 6))
        };
        // 0x000003e7 = 999 < 1000: kept; 0x000003e8 = 1000: not; 0x0000270f = 9999: not;
        // 0x00002710 = 10000 = 0 mod 10000: kept.
        assert!(keep(&mut s, "000003e7-1111-4222-8333-444455556666"));
        assert!(!keep(&mut s, "000003e8-1111-4222-8333-444455556666"));
        assert!(!keep(&mut s, "0000270f-1111-4222-8333-444455556666"));
        assert!(keep(&mut s, "00002710-1111-4222-8333-444455556666"));
        for reason in ['4', '9', 'a', 'b'] {
            assert!(keep(&mut s, &format!("000003e7-1111-{reason}222-8333-444455556666")));
        }
        assert_eq!(uuid_integer(b"DEADbeef-x"), Some(0xdead_beef));
        assert_eq!(uuid_integer(b"not-a-uuid"), None);
        assert_eq!(uuid_integer(b"abc"), None);
    }

    #[test]
    fn sampling_is_stable_per_request_id() {
        let f = compile(serde_json::json!({"sample": 0.5})).unwrap();
        let s = FakeStream::ok();
        let first = f.keep(&Ctx::new(&s, 6));
        for _ in 0..10 {
            assert_eq!(f.keep(&Ctx::new(&s, 6)), first);
        }
    }

    /// Records without an `x-request-id` (TCP proxy, `generate_request_id: false`) are each
    /// drawn on their own: a fraction keeps that fraction of them, not all or none.
    #[test]
    fn sampling_without_a_request_id_keeps_the_fraction() {
        let mut s = FakeStream::ok();
        s.req.remove(b"x-request-id".as_slice());
        for (fraction, lo, hi) in [(0.5, 4_500, 5_500), (0.95, 9_300, 9_700), (0.01, 50, 160)] {
            let f = compile(serde_json::json!({ "sample": fraction })).unwrap();
            let kept = (0..10_000).filter(|_| f.keep(&Ctx::new(&s, 6))).count();
            assert!((lo..=hi).contains(&kept), "{fraction}: kept {kept} of 10000");
        }
    }

    /// A record of a request still in progress (periodic, start of request) is filtered on its
    /// duration so far, the `%DURATION%` it renders.
    #[test]
    fn duration_of_a_request_in_progress_is_its_duration_so_far() {
        use envoy_obs_common::ffi::access_log::timing as t;
        let mut s = FakeStream::ok();
        s.timing.has[t::REQUEST_COMPLETE] = false;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as i64;
        s.timing.ns[0] = now - 2_000_000_000;
        assert!(compile(serde_json::json!({"duration_ms": {"ge": 1000}})).unwrap().keep(&Ctx::new(&s, 6)));
        assert!(!compile(serde_json::json!({"duration_ms": {"lt": 1000}})).unwrap().keep(&Ctx::new(&s, 6)));
    }

    #[test]
    fn flags_duration_health_check_not() {
        let mut s = FakeStream::ok();
        s.flags = 1 << 8; // NR
        assert!(compile(serde_json::json!({"response_flags": ["NR"]})).unwrap().keep(&Ctx::new(&s, 6)));
        assert!(compile(serde_json::json!({"response_flags": []})).unwrap().keep(&Ctx::new(&s, 6)));
        assert!(!compile(serde_json::json!({"response_flags": ["UpstreamConnectionFailure"]}))
            .unwrap()
            .keep(&Ctx::new(&s, 6)));
        assert!(compile(serde_json::json!({"duration_ms": {"lt": 3}})).unwrap().keep(&Ctx::new(&s, 6)));
        assert!(!compile(serde_json::json!({"duration_ms": {"ge": 3}})).unwrap().keep(&Ctx::new(&s, 6)));
        assert!(compile(serde_json::json!({"not": {"health_check": true}})).unwrap().keep(&Ctx::new(&s, 6)));
        s.health_check = true;
        assert!(compile(serde_json::json!({"health_check": true})).unwrap().keep(&Ctx::new(&s, 6)));
    }

    #[test]
    fn bad_filters_name_the_field() {
        assert!(compile(serde_json::json!({"sample": 2.0})).unwrap_err().contains("filter.sample"));
        assert!(compile(serde_json::json!({"status_code": {}})).unwrap_err().contains("filter.status_code"));
        assert!(compile(serde_json::json!({"or": [{"duration_ms": {}}]}))
            .unwrap_err()
            .contains("filter.or[0].duration_ms"));
        assert!(compile(serde_json::json!({"not": {"or": []}})).unwrap_err().contains("filter.not.or"));
        assert!(compile(serde_json::json!({"or": [{"response_flags": ["XX"]}]})).unwrap_err().contains("filter.or[0]"));
        assert!(compile(serde_json::json!({"bogus": 1})).is_err());
    }
}
