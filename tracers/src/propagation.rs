//! Trace-context propagation: W3C `traceparent`/`tracestate`, W3C `baggage`, B3 single
//! (`b3`) and B3 multi (`x-b3-*`) headers. Parsing never panics; malformed input is ignored,
//! as the specifications require.
use envoy_obs_common::ffi::tracer::Carrier;
pub use envoy_obs_common::w3c::hex_to;
pub use envoy_obs_common::w3c::parse_traceparent;
use envoy_obs_common::w3c::{trim, unhex, HEX};

/// A propagation format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Propagator {
    /// W3C Trace Context (`traceparent`, `tracestate`).
    Tracecontext,
    /// W3C Baggage (`baggage`).
    Baggage,
    /// B3 single header (`b3`).
    B3,
    /// B3 multiple headers (`x-b3-traceid`, `x-b3-spanid`, `x-b3-sampled`, ...).
    B3multi,
}

impl Propagator {
    /// Parses an `OTEL_PROPAGATORS` item.
    pub fn from_name(s: &str) -> Option<Self> {
        Some(match s.trim() {
            "tracecontext" => Propagator::Tracecontext,
            "baggage" => Propagator::Baggage,
            "b3" => Propagator::B3,
            "b3multi" => Propagator::B3multi,
            _ => return None,
        })
    }
}

/// An incoming span context.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Remote {
    /// Trace id.
    pub trace_id: [u8; 16],
    /// The remote parent's span id.
    pub span_id: [u8; 8],
    /// Its sampled flag (None: the format said nothing, e.g. B3 without `x-b3-sampled`).
    pub sampled: Option<bool>,
    /// `tracestate` to pass on (W3C only).
    pub tracestate: Vec<u8>,
    /// B3's debug flag (`x-b3-flags: 1` / `d` in `b3`) was set.
    pub debug: bool,
}

/// What the incoming request carries that injection must correct rather than overwrite
/// (the router's upstream headers are the downstream request's, so whatever injection does
/// not replace goes upstream as it came in).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Carry {
    /// A `tracestate` came that belongs to no W3C trace we continue (its `traceparent` was
    /// missing or did not parse, the context came from B3, or the list itself is invalid): it
    /// must not travel with ours.
    pub stale_tracestate: bool,
    /// B3 debug was set (`d` in `b3`, `x-b3-flags: 1`): it implies sampled and is passed on
    /// while the decision is sampled.
    pub b3_debug: bool,
    /// A B3 sampling decision that came without trace ids (`b3: 0`, `X-B3-Sampled: 1` alone):
    /// the client's decision for the trace we start.
    pub b3_decision: Option<bool>,
    /// Baggage was changed through `set_baggage`: the `baggage` header is rewritten.
    pub baggage_modified: bool,
    /// The request carried B3 multi headers (`X-B3-TraceId`, or `X-B3-Sampled`/`X-B3-Flags`
    /// without a single header): with only the single-header propagator they must go, or the
    /// next hop would read the client's ids and decision beside ours.
    pub b3_multi_seen: bool,
}

/// `hex(trace_id)-hex(span_id)` followed by `tail` and padding: the common core of
/// `traceparent` and `b3`, built on the stack.
fn ids_header(prefix: &[u8], o: &Outgoing<'_>, tail: &[u8]) -> ([u8; 64], usize) {
    let mut b = [0u8; 64];
    let p = prefix.len();
    b[..p].copy_from_slice(prefix);
    hex_to(o.trace_id, &mut b[p..p + 32]);
    b[p + 32] = b'-';
    hex_to(o.span_id, &mut b[p + 33..p + 49]);
    b[p + 49..p + 49 + tail.len()].copy_from_slice(tail);
    (b, p + 49 + tail.len())
}

/// B3 trace ids are 16 or 32 hex digits; 64-bit ids are left-padded with zeros.
fn b3_trace_id(s: &[u8]) -> Option<[u8; 16]> {
    match s.len() {
        32 => unhex::<16>(s),
        16 => {
            let low = unhex::<8>(s)?;
            let mut t = [0u8; 16];
            t[8..].copy_from_slice(&low);
            Some(t)
        }
        _ => None,
    }
    .filter(|t| *t != [0; 16])
}

/// `X-B3-Sampled`: `1`/`0` (and the `true`/`false` of old Zipkin clients).
fn b3_sampled(s: &[u8]) -> Option<bool> {
    match s {
        b"1" | b"true" => Some(true),
        b"0" | b"false" => Some(false),
        _ => None,
    }
}

/// What a `b3` header says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum B3 {
    /// A context: `{trace}-{span}[-{1|0|d}[-{parent}]]`.
    Context(Remote),
    /// A decision without ids: `0` (deny), `1` (accept) or `d` (debug).
    Decision { sampled: bool, debug: bool },
}

/// The B3 single header (openzipkin/b3-propagation): `{trace}-{span}[-{sampling}[-{parent}]]`,
/// sampling one of `1`, `0`, `d` (debug, which implies sampled); or a lone sampling state.
pub fn parse_b3(v: &[u8]) -> Option<B3> {
    let v = trim(v);
    match v {
        b"0" => return Some(B3::Decision { sampled: false, debug: false }),
        b"1" => return Some(B3::Decision { sampled: true, debug: false }),
        b"d" => return Some(B3::Decision { sampled: true, debug: true }),
        _ => {}
    }
    let mut it = v.split(|&c| c == b'-');
    let trace = b3_trace_id(it.next()?)?;
    let span = unhex::<8>(it.next()?).filter(|s| *s != [0; 8])?;
    let (sampled, debug) = match it.next() {
        None => (None, false),
        Some(b"1") => (Some(true), false),
        Some(b"0") => (Some(false), false),
        Some(b"d") => (Some(true), true),
        Some(_) => return None,
    };
    if let Some(parent) = it.next() {
        unhex::<8>(parent)?;
    }
    if it.next().is_some() {
        return None;
    }
    Some(B3::Context(Remote { trace_id: trace, span_id: span, sampled, tracestate: Vec::new(), debug }))
}

/// B3 in either encoding, the single header first (the OpenTelemetry B3 propagator reads both
/// whichever it injects). A decision without ids goes to `carry`.
fn extract_b3<C: Carrier>(c: &C, carry: &mut Carry) -> Option<Remote> {
    if let Some(single) = c.get(b"b3").and_then(parse_b3) {
        // The single header wins; multi ids beside it are stale (one lookup finds them).
        carry.b3_multi_seen = c.get(b"x-b3-traceid").is_some();
        match single {
            B3::Context(r) => return Some(r),
            B3::Decision { sampled, debug } => {
                (carry.b3_decision, carry.b3_debug) = (Some(sampled), debug);
                return None;
            }
        }
    }
    let flags = c.get(b"x-b3-flags");
    let flags_debug = flags.map(trim) == Some(b"1");
    let Some(trace) = c.get(b"x-b3-traceid") else {
        // Sampling state alone.
        let sampled_header = c.get(b"x-b3-sampled");
        carry.b3_multi_seen = sampled_header.is_some() || flags.is_some();
        let sampled = sampled_header.map(trim).and_then(b3_sampled);
        let debug = flags_debug;
        if sampled.is_some() || debug {
            (carry.b3_decision, carry.b3_debug) = (Some(debug || sampled == Some(true)), debug);
        }
        return None;
    };
    carry.b3_multi_seen = true;
    let trace = b3_trace_id(trim(trace))?;
    let span = unhex::<8>(trim(c.get(b"x-b3-spanid")?)).filter(|s| *s != [0; 8])?;
    let debug = flags_debug;
    let sampled = if debug { Some(true) } else { c.get(b"x-b3-sampled").map(trim).and_then(b3_sampled) };
    Some(Remote { trace_id: trace, span_id: span, sampled, tracestate: Vec::new(), debug })
}

/// W3C Trace Context `tracestate` (section 3.3): at most 32 list members, each `key=value`
/// with the spec's key and value grammar, no key twice. Anything else is invalid, and an invalid
/// header is discarded whole.
pub fn valid_tracestate(v: &[u8]) -> bool {
    let key_char = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'-' | b'*' | b'/');
    let valid_key = |k: &[u8]| match k.iter().position(|&c| c == b'@') {
        None => k.len() <= 256 && k.first().is_some_and(u8::is_ascii_lowercase) && k.iter().all(|&c| key_char(c)),
        Some(at) => {
            let (tenant, system) = (&k[..at], &k[at + 1..]);
            (1..=241).contains(&tenant.len())
                && tenant[0].is_ascii_lowercase() | tenant[0].is_ascii_digit()
                && tenant.iter().all(|&c| key_char(c))
                && (1..=14).contains(&system.len())
                && system[0].is_ascii_lowercase()
                && system.iter().all(|&c| key_char(c))
        }
    };
    // chr = %x20 / nblk-chr, nblk-chr = %x21-2B / %x2D-3C / %x3E-7E; the last one non-blank.
    let valid_value = |v: &[u8]| {
        (1..=256).contains(&v.len())
            && v.iter().all(|&c| (0x20..=0x7e).contains(&c) && c != b',' && c != b'=')
            && v[v.len() - 1] != b' '
    };
    // Runs on the worker for every request with a tracestate: the keys seen go on the stack.
    let mut keys: [&[u8]; 32] = [&[]; 32];
    let mut n = 0;
    for member in v.split(|&c| c == b',') {
        let m = trim(member);
        if m.is_empty() {
            continue;
        }
        let Some(eq) = m.iter().position(|&c| c == b'=') else { return false };
        let (k, val) = (&m[..eq], &m[eq + 1..]);
        if !valid_key(k) || !valid_value(val) || n == keys.len() || keys[..n].contains(&k) {
            return false;
        }
        keys[n] = k;
        n += 1;
    }
    true
}

/// Extracts an incoming context with the first propagator (in configured order) that finds
/// a valid one. A B3 decision without ids is left in `carry` (and ends the search: the client
/// decided); so is a `tracestate` that must not travel with the trace we continue or start.
pub fn extract<C: Carrier>(c: &C, props: &[Propagator], carry: &mut Carry) -> Option<Remote> {
    let (mut b3_read, mut from_w3c) = (false, false);
    let mut found = None;
    for p in props {
        found = match p {
            Propagator::Tracecontext => c.get(b"traceparent").and_then(parse_traceparent).map(|(t, s, f)| {
                from_w3c = true;
                let tracestate = match c.get(b"tracestate").map(trim) {
                    Some(ts) if valid_tracestate(ts) => ts.to_vec(),
                    Some(_) => {
                        carry.stale_tracestate = true;
                        Vec::new()
                    }
                    None => Vec::new(),
                };
                Remote { trace_id: t, span_id: s, sampled: Some(f & 1 == 1), tracestate, debug: false }
            }),
            Propagator::B3 | Propagator::B3multi if !b3_read => {
                b3_read = true;
                extract_b3(c, carry)
            }
            Propagator::B3 | Propagator::B3multi | Propagator::Baggage => None,
        };
        if let Some(r) = &found {
            carry.b3_debug = r.debug;
            break;
        }
        if carry.b3_decision.is_some() {
            break;
        }
    }
    // A context found before B3 was read (a traceparent first): with the b3 propagator alone
    // the client's multi headers must still go, so look for them.
    if !b3_read && props.contains(&Propagator::B3) && !props.contains(&Propagator::B3multi) {
        carry.b3_multi_seen = c.get(b"x-b3-traceid").is_some() || c.get(b"x-b3-sampled").is_some();
    }
    // A tracestate that did not come with the traceparent we continue belongs to another trace
    // (W3C: discarded when the traceparent is missing or invalid).
    if !from_w3c && props.contains(&Propagator::Tracecontext) {
        carry.stale_tracestate = c.get(b"tracestate").is_some();
    }
    found
}

/// One W3C baggage list member.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Member {
    /// Key (an RFC 7230 token).
    pub key: Vec<u8>,
    /// Value, percent-decoded.
    pub value: Vec<u8>,
    /// Properties as they came (`;prop=x;flag`), passed on with the member.
    pub props: Vec<u8>,
}

/// W3C Baggage limits: members and bytes a list carries.
const BAGGAGE_MEMBERS: usize = 64;
const BAGGAGE_BYTES: usize = 8192;

/// An RFC 7230 token (what a baggage key must be).
pub fn is_token(k: &[u8]) -> bool {
    !k.is_empty() && k.iter().all(|&c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c))
}

/// W3C baggage members, values percent-decoded, properties kept as they came. A member whose key
/// is not a token is skipped; a key seen again replaces the earlier value.
pub fn parse_baggage(v: &[u8], out: &mut Vec<Member>) {
    for item in v.split(|&c| c == b',') {
        let (member, props) = match item.iter().position(|&c| c == b';') {
            Some(i) => (&item[..i], trim(&item[i..])),
            None => (item, &[][..]),
        };
        let Some(eq) = member.iter().position(|&c| c == b'=') else { continue };
        let (k, val) = (trim(&member[..eq]), trim(&member[eq + 1..]));
        if !is_token(k) || out.len() >= BAGGAGE_MEMBERS {
            continue;
        }
        set_entry(out, k, &envoy_obs_common::w3c::percent_decode(val), props);
    }
}

/// Sets `k` (replacing an existing member's value and properties).
pub fn set_entry(list: &mut Vec<Member>, k: &[u8], v: &[u8], props: &[u8]) {
    match list.iter_mut().find(|m| m.key == k) {
        Some(m) => (m.value, m.props) = (v.to_vec(), props.to_vec()),
        None => list.push(Member { key: k.to_vec(), value: v.to_vec(), props: props.to_vec() }),
    }
}

/// Serialises baggage: values percent-encoded where the W3C grammar requires it, properties
/// as they came; members that would take the list past 8192 bytes are left out (W3C limits).
pub fn format_baggage(list: &[Member], out: &mut Vec<u8>) {
    let start = out.len();
    for m in list {
        let at = out.len();
        if at > start {
            out.push(b',');
        }
        out.extend_from_slice(&m.key);
        out.push(b'=');
        for &c in &m.value {
            let plain = c.is_ascii_graphic() && !matches!(c, b'"' | b',' | b';' | b'\\' | b'%');
            if plain {
                out.push(c);
            } else {
                out.extend_from_slice(&[
                    b'%',
                    HEX[(c >> 4) as usize].to_ascii_uppercase(),
                    HEX[(c & 15) as usize].to_ascii_uppercase(),
                ]);
            }
        }
        out.extend_from_slice(&m.props);
        if out.len() - start > BAGGAGE_BYTES {
            out.truncate(at);
        }
    }
}

/// What a span injects.
pub struct Outgoing<'a> {
    /// Trace id.
    pub trace_id: &'a [u8; 16],
    /// The span's own id (the parent of the next hop).
    pub span_id: &'a [u8; 8],
    /// Its parent's id (zero for a root): B3's `x-b3-parentspanid`.
    pub parent_id: &'a [u8; 8],
    /// Sampled decision.
    pub sampled: bool,
    /// `tracestate` to pass on.
    pub tracestate: &'a [u8],
    /// Baggage to pass on.
    pub baggage: &'a [Member],
    /// What the incoming headers left that needs correcting.
    pub carry: Carry,
}

/// Writes the headers of every configured propagator.
pub fn inject<C: Carrier>(c: &mut C, props: &[Propagator], o: &Outgoing<'_>) {
    for p in props {
        match p {
            Propagator::Tracecontext => {
                let (b, n) = ids_header(b"00-", o, if o.sampled { b"-01" } else { b"-00" });
                c.set(b"traceparent", &b[..n]);
                if !o.tracestate.is_empty() {
                    c.set(b"tracestate", o.tracestate);
                } else if o.carry.stale_tracestate {
                    c.remove(b"tracestate");
                }
            }
            Propagator::B3 => {
                let debug = o.carry.b3_debug && o.sampled;
                let (b, n) = ids_header(
                    b"",
                    o,
                    if debug {
                        b"-d"
                    } else if o.sampled {
                        b"-1"
                    } else {
                        b"-0"
                    },
                );
                c.set(b"b3", &b[..n]);
                if o.carry.b3_multi_seen && !props.contains(&Propagator::B3multi) {
                    for h in
                        [&b"x-b3-traceid"[..], b"x-b3-spanid", b"x-b3-parentspanid", b"x-b3-sampled", b"x-b3-flags"]
                    {
                        c.remove(h);
                    }
                }
            }
            Propagator::B3multi => {
                // The single header wins over these upstream (B3 spec): one that came in must
                // not ride along beside ours unless we write it too.
                if !props.contains(&Propagator::B3) {
                    c.remove(b"b3");
                }
                let (mut t, mut s) = ([0u8; 32], [0u8; 16]);
                hex_to(o.trace_id, &mut t);
                hex_to(o.span_id, &mut s);
                c.set(b"x-b3-traceid", &t);
                c.set(b"x-b3-spanid", &s);
                // Debug implies an accept decision: `X-B3-Flags: 1` instead of `X-B3-Sampled`.
                // Whatever of these the request brought and we do not write must go.
                if o.carry.b3_debug && o.sampled {
                    c.set(b"x-b3-flags", b"1");
                    c.remove(b"x-b3-sampled");
                } else {
                    c.set(b"x-b3-sampled", if o.sampled { b"1" } else { b"0" });
                    c.remove(b"x-b3-flags");
                }
                if *o.parent_id != [0; 8] {
                    let mut p = [0u8; 16];
                    hex_to(o.parent_id, &mut p);
                    c.set(b"x-b3-parentspanid", &p);
                } else {
                    c.remove(b"x-b3-parentspanid");
                }
            }
            Propagator::Baggage => {
                // Unchanged baggage is left as it came (properties and all) where the request
                // carries it already; written from the span where it does not (a fresh map).
                if !o.baggage.is_empty() && (o.carry.baggage_modified || c.get(b"baggage").is_none()) {
                    let mut v = Vec::new();
                    format_baggage(o.baggage, &mut v);
                    c.set(b"baggage", &v);
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[derive(Default)]
    pub struct Map(pub BTreeMap<Vec<u8>, Vec<u8>>);
    impl Carrier for Map {
        fn get(&self, k: &[u8]) -> Option<&[u8]> {
            self.0.get(k).map(Vec::as_slice)
        }
        fn remove(&mut self, k: &[u8]) {
            self.0.remove(k);
        }
        fn set(&mut self, k: &[u8], v: &[u8]) {
            self.0.insert(k.to_vec(), v.to_vec());
        }
    }
    pub fn map(pairs: &[(&str, &str)]) -> Map {
        Map(pairs.iter().map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec())).collect())
    }

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn every_byte_is_hexed_as_format_does() {
        let all: Vec<u8> = (0..=255).collect();
        let mut out = vec![0u8; 512];
        hex_to(&all, &mut out);
        let want: String = all.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(out, want.as_bytes());
    }

    #[test]
    fn b3_single_and_multi() {
        let ctx = |v: &[u8]| match parse_b3(v) {
            Some(B3::Context(r)) => Some(r),
            _ => None,
        };
        let r = ctx(b"80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90").unwrap();
        assert_eq!((r.trace_id[0], r.span_id[0], r.sampled, r.debug), (0x80, 0xe4, Some(true), false));
        let r = ctx(b"64fe8b2a57d3eff7-e457b5a2e4d86bd1").unwrap();
        assert_eq!((&r.trace_id[..8], r.trace_id[8], r.sampled), (&[0u8; 8][..], 0x64, None));
        let r = ctx(b"80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-d").unwrap();
        assert_eq!((r.sampled, r.debug), (Some(true), true));
        assert_eq!(parse_b3(b" 0 "), Some(B3::Decision { sampled: false, debug: false }));
        assert_eq!(parse_b3(b"d"), Some(B3::Decision { sampled: true, debug: true }));
        for bad in [
            "x-y",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-true",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-zz",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90-x",
            "2",
        ] {
            assert_eq!(parse_b3(bad.as_bytes()), None, "{bad}");
        }
        // Either B3 propagator reads both encodings (OpenTelemetry's B3 extract).
        let c = map(&[
            ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
            ("x-b3-spanid", "e457b5a2e4d86bd1"),
            ("x-b3-sampled", "0"),
        ]);
        for b3 in [Propagator::B3, Propagator::B3multi] {
            let r = extract(&c, &[Propagator::Tracecontext, b3], &mut Carry::default()).unwrap();
            assert_eq!((r.trace_id[0], r.sampled), (0x80, Some(false)));
        }
        let single = map(&[
            ("b3", "a0f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"),
            ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
            ("x-b3-spanid", "e457b5a2e4d86bd1"),
        ]);
        let r = extract(&single, &[Propagator::B3multi], &mut Carry::default()).unwrap();
        assert_eq!(r.trace_id[0], 0xa0, "the single header takes precedence");
    }

    /// A sampling decision without ids (`b3: 0`, `X-B3-Sampled` or `X-B3-Flags` alone) is the
    /// client's decision for the trace we start: it stops the search and lands in `carry`.
    #[test]
    fn b3_decisions_without_ids() {
        let props = [Propagator::B3, Propagator::Tracecontext];
        for (headers, decision, debug) in [
            (&[("b3", "0")][..], Some(false), false),
            (&[("b3", "d")][..], Some(true), true),
            (&[("x-b3-sampled", "0")][..], Some(false), false),
            (&[("x-b3-sampled", "1")][..], Some(true), false),
            (&[("x-b3-flags", "1")][..], Some(true), true),
            (&[("x-b3-spanid", "e457b5a2e4d86bd1")][..], None, false),
        ] {
            let mut carry = Carry::default();
            let mut h = headers.to_vec();
            h.push(("traceparent", TP));
            // A decision ends the search; without one the traceparent after B3 is continued.
            let r = extract(&map(&h), &props, &mut carry);
            assert_eq!(r.is_none(), decision.is_some(), "{headers:?}");
            assert_eq!((carry.b3_decision, carry.b3_debug), (decision, debug), "{headers:?}");
        }
    }

    #[test]
    fn first_propagator_wins_and_tracestate_rides_along() {
        let c = map(&[
            ("traceparent", TP),
            ("tracestate", " vendor=x "),
            ("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-0"),
        ]);
        let r = extract(&c, &[Propagator::Tracecontext, Propagator::B3], &mut Carry::default()).unwrap();
        assert_eq!((r.sampled, r.tracestate.as_slice()), (Some(true), &b"vendor=x"[..]));
        let r = extract(&c, &[Propagator::B3, Propagator::Tracecontext], &mut Carry::default()).unwrap();
        assert_eq!(r.sampled, Some(false));
    }

    /// A root span's outgoing context with nothing to correct.
    const OUT: Outgoing<'static> = Outgoing {
        trace_id: &[0x11; 16],
        span_id: &[0x22; 8],
        parent_id: &[0; 8],
        sampled: false,
        tracestate: b"",
        baggage: &[],
        carry: Carry {
            stale_tracestate: false,
            b3_debug: false,
            b3_decision: None,
            baggage_modified: false,
            b3_multi_seen: false,
        },
    };

    #[test]
    fn inject_writes_every_format() {
        let mut c = Map::default();
        let bag = vec![Member { key: b"user".to_vec(), value: b"a b,c".to_vec(), props: Vec::new() }];
        let o = Outgoing { tracestate: b"k=v", baggage: &bag, ..OUT };
        inject(&mut c, &[Propagator::Tracecontext, Propagator::Baggage, Propagator::B3, Propagator::B3multi], &o);
        let g = |k: &str| String::from_utf8(c.0[k.as_bytes()].clone()).unwrap();
        assert_eq!(g("traceparent"), format!("00-{}-{}-00", "11".repeat(16), "22".repeat(8)));
        assert_eq!(g("tracestate"), "k=v");
        assert_eq!(g("b3"), format!("{}-{}-0", "11".repeat(16), "22".repeat(8)));
        assert_eq!((g("x-b3-spanid"), g("x-b3-sampled")), ("22".repeat(8), "0".to_string()));
        assert_eq!(g("baggage"), "user=a%20b%2Cc");
        assert_eq!(g("x-b3-traceid"), "11".repeat(16));
        let mut back = Vec::new();
        parse_baggage(g("baggage").as_bytes(), &mut back);
        assert_eq!(back, bag);
        let o = Outgoing { sampled: true, tracestate: b"", baggage: &[], ..o };
        let mut c = Map::default();
        inject(&mut c, &[Propagator::Tracecontext, Propagator::Baggage, Propagator::B3], &o);
        let g = |k: &str| String::from_utf8(c.0[k.as_bytes()].clone()).unwrap();
        assert_eq!(g("traceparent"), format!("00-{}-{}-01", "11".repeat(16), "22".repeat(8)));
        assert_eq!(g("b3"), format!("{}-{}-1", "11".repeat(16), "22".repeat(8)));
        assert_eq!(c.0.len(), 2, "no tracestate or baggage when there is none");
    }

    #[test]
    fn injection_corrects_what_the_incoming_headers_leave_behind() {
        // A traceparent that does not parse (upper-case hex) with its tracestate: a new trace
        // starts, and the old tracestate must not travel with it.
        let incoming =
            [("traceparent", "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01"), ("tracestate", "congo=x")];
        let mut c = map(&incoming);
        let mut carry = Carry::default();
        assert!(extract(&c, &[Propagator::Tracecontext], &mut carry).is_none());
        assert!(carry.stale_tracestate);
        let o = Outgoing { parent_id: &[0x33; 8], sampled: true, carry, ..OUT };
        inject(&mut c, &[Propagator::Tracecontext], &o);
        assert!(!c.0.contains_key(&b"tracestate"[..]));
        // No traceparent at all (W3C: a tracestate without its traceparent is discarded), a
        // context taken from B3, or an invalid list: the tracestate goes.
        for (headers, props) in [
            (&[("tracestate", "a=b")][..], &[Propagator::Tracecontext][..]),
            (
                &[
                    ("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"),
                    ("traceparent", TP),
                    ("tracestate", "a=b"),
                ][..],
                &[Propagator::B3, Propagator::Tracecontext][..],
            ),
            (&[("traceparent", TP), ("tracestate", "a=1,a=2")][..], &[Propagator::Tracecontext][..]),
        ] {
            let mut carry = Carry::default();
            let r = extract(&map(headers), props, &mut carry);
            assert!(carry.stale_tracestate && r.is_none_or(|r| r.tracestate.is_empty()), "{headers:?}");
        }
        let mut carry = Carry::default();
        extract(&map(&[("traceparent", TP), ("tracestate", "a=b")]), &[Propagator::Tracecontext], &mut carry);
        assert!(!carry.stale_tracestate);

        // B3 multi: the parent id is ours, and an incoming debug flag goes with a sampled-out
        // decision.
        let incoming = [
            ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
            ("x-b3-spanid", "e457b5a2e4d86bd1"),
            ("x-b3-parentspanid", "05e3ac9a4f6e3b90"),
            ("x-b3-flags", "1"),
        ];
        let mut c = map(&incoming);
        let mut carry = Carry::default();
        let r = extract(&c, &[Propagator::B3multi], &mut carry).unwrap();
        assert_eq!((r.sampled, carry.b3_debug), (Some(true), true));
        inject(&mut c, &[Propagator::B3multi], &Outgoing { sampled: false, carry, ..o });
        assert_eq!(c.0[&b"x-b3-parentspanid"[..]], "33".repeat(8).into_bytes());
        assert_eq!(c.0[&b"x-b3-sampled"[..]], b"0".to_vec());
        assert!(!c.0.contains_key(&b"x-b3-flags"[..]));
        // Debug and sampled: the flag, and no X-B3-Sampled beside it (debug implies accept).
        let mut c = map(&incoming);
        c.0.insert(b"x-b3-sampled".to_vec(), b"1".to_vec());
        inject(&mut c, &[Propagator::B3multi], &Outgoing { sampled: true, carry, ..o });
        assert_eq!(c.0[&b"x-b3-flags"[..]], b"1".to_vec());
        assert!(!c.0.contains_key(&b"x-b3-sampled"[..]));
        let mut c = map(&[]);
        inject(&mut c, &[Propagator::B3], &Outgoing { sampled: true, carry, ..o });
        assert!(c.0[&b"b3"[..]].ends_with(b"-d"), "debug goes on in the single header too");
        // A root span (no parent): an incoming parent id is not passed on with our new ids.
        let mut c = map(&incoming);
        inject(&mut c, &[Propagator::B3multi], &Outgoing { sampled: true, carry: Carry::default(), ..OUT });
        assert!(!c.0.contains_key(&b"x-b3-parentspanid"[..]));
        assert!(!c.0.contains_key(&b"x-b3-flags"[..]));

        // With b3multi alone, an incoming single header goes: it would win over ours upstream.
        let single = [("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1")];
        let mut c = map(&single);
        inject(&mut c, &[Propagator::B3multi], &Outgoing { sampled: true, carry: Carry::default(), ..OUT });
        assert!(!c.0.contains_key(&b"b3"[..]) && c.0.contains_key(&b"x-b3-spanid"[..]));
        let mut c = map(&single);
        inject(
            &mut c,
            &[Propagator::B3multi, Propagator::B3],
            &Outgoing { sampled: true, carry: Carry::default(), ..OUT },
        );
        assert!(c.0[&b"b3"[..]].starts_with(&c.0[&b"x-b3-traceid"[..]]), "both written, both ours");

        // With b3 alone, the client's multi headers go: the next hop reading them would take
        // the client's span as parent and its decision beside ours. Also beside a single
        // header, and a decision alone; headers the client did not send are not touched.
        let multi = [&incoming[..], &[("x-b3-sampled", "1")]].concat();
        let with_single = [&multi[..], &single[..]].concat();
        for headers in [&multi[..], &with_single[..], &[("x-b3-sampled", "1")][..], &[("x-b3-flags", "1")][..]] {
            let mut c = map(headers);
            let mut carry = Carry::default();
            extract(&c, &[Propagator::B3], &mut carry);
            assert!(carry.b3_multi_seen, "{headers:?}");
            inject(&mut c, &[Propagator::B3], &Outgoing { sampled: false, carry, ..OUT });
            assert_eq!(c.0.keys().collect::<Vec<_>>(), [&b"b3"[..]], "{headers:?}");
        }
        let mut carry = Carry::default();
        extract(&map(&single), &[Propagator::B3], &mut carry);
        assert!(!carry.b3_multi_seen);
        // The same with a traceparent continued before B3 is read.
        let with_tp = [&multi[..], &[("traceparent", TP)]].concat();
        let props = [Propagator::Tracecontext, Propagator::B3];
        let mut c = map(&with_tp);
        let mut carry = Carry::default();
        assert!(extract(&c, &props, &mut carry).is_some_and(|r| r.trace_id[0] == 0x4b));
        inject(&mut c, &props, &Outgoing { sampled: false, carry, ..OUT });
        assert!(!c.0.keys().any(|k| k.starts_with(b"x-b3-")), "{:?}", c.0.keys());

        // Baggage: left as it came (properties, member count) unless set_baggage changed it;
        // written where the request has none.
        let raw = "a=1;prop=x,b=2";
        let mut bag = Vec::new();
        parse_baggage(raw.as_bytes(), &mut bag);
        let mut c = map(&[("baggage", raw)]);
        inject(&mut c, &[Propagator::Baggage], &Outgoing { baggage: &bag, ..o });
        assert_eq!(c.0[&b"baggage"[..]], raw.as_bytes());
        let mut c = Map::default();
        inject(&mut c, &[Propagator::Baggage], &Outgoing { baggage: &bag, ..o });
        assert_eq!(c.0[&b"baggage"[..]], raw.as_bytes());
        // Changed through set_baggage: rewritten, every other member's properties kept (W3C:
        // members are propagated with their metadata).
        set_entry(&mut bag, b"c", b"x y", b"");
        let modified = Carry { baggage_modified: true, ..Carry::default() };
        let mut c = map(&[("baggage", raw)]);
        inject(&mut c, &[Propagator::Baggage], &Outgoing { baggage: &bag, carry: modified, ..o });
        assert_eq!(c.0[&b"baggage"[..]], b"a=1;prop=x,b=2,c=x%20y".to_vec());
    }

    /// W3C Trace Context 3.3 (the cases of the W3C test suite's tracestate tests).
    #[test]
    fn tracestate_grammar() {
        let long_value = format!("k={}", "v".repeat(256));
        let members_32 = (0..32).map(|i| format!("k{i}=v")).collect::<Vec<_>>().join(",");
        let members_33 = format!("{members_32},k32=v");
        for ok in [
            "foo=1",
            "foo=1,bar=2",
            " foo=1 ,\tbar=2",
            "foo=1,,bar=2",
            "t61rcwkgmze@vendor=x",
            "a_-*/0=1",
            long_value.as_str(),
            &members_32,
        ] {
            assert!(valid_tracestate(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "foo=1,foo=2",
            "FOO=1",
            "foo",
            "foo=",
            "foo=bar=baz",
            "1foo=1",
            "@vendor=1",
            "t@=1",
            "foo=a\x01",
            "foo=a\x7f",
            &members_33,
        ] {
            assert!(!valid_tracestate(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn baggage_parsing_is_lenient() {
        let mut out = Vec::new();
        parse_baggage(b"a=1, b = 2;prop=x,bad, =3,a=4,a b=5,k\"=6", &mut out);
        let m = |k: &[u8], v: &[u8], p: &[u8]| Member { key: k.to_vec(), value: v.to_vec(), props: p.to_vec() };
        assert_eq!(out, vec![m(b"a", b"4", b""), m(b"b", b"2", b";prop=x")], "keys must be tokens");
    }

    /// W3C Baggage limit: at most 8192 bytes go out (64 members of 200 bytes do not fit).
    #[test]
    fn baggage_limits() {
        let mut bag = Vec::new();
        for i in 0..64 {
            set_entry(&mut bag, format!("k{i}").as_bytes(), &[b'v'; 200], b"");
        }
        let mut out = Vec::new();
        format_baggage(&bag, &mut out);
        assert!(out.len() <= 8192 && out.len() > 8000, "{}", out.len());
        assert!(!out.ends_with(b","));
        let mut back = Vec::new();
        parse_baggage(&out, &mut back);
        assert_eq!(back.len(), out.split(|&c| c == b',').count());
    }
}

#[cfg(test)]
mod fuzz {
    use super::tests::map;
    use super::*;

    /// Bounded fuzz on stable: mutated headers never panic the parsers.
    #[test]
    fn header_parsers_never_panic() {
        let seeds = [
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90",
            "a=1;p=2,b=%41%zz,=,c",
        ];
        let alphabet = b"0123456789abcdefABCDEF-=;,% \xff\x00";
        let mut x = 0x1234_5678_9abc_def1u64;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as usize
        };
        for i in 0..50_000 {
            let mut s = seeds[i % seeds.len()].as_bytes().to_vec();
            for _ in 0..1 + rnd() % 4 {
                let at = rnd() % (s.len() + 1);
                if rnd() % 2 == 0 || s.is_empty() {
                    s.insert(at, alphabet[rnd() % alphabet.len()]);
                } else {
                    s.remove(at.min(s.len() - 1));
                }
            }
            let _ = parse_traceparent(&s);
            let _ = parse_b3(&s);
            let _ = valid_tracestate(&s);
            let mut out = Vec::new();
            parse_baggage(&s, &mut out);
            let v = String::from_utf8_lossy(&s).into_owned();
            let c = map(&[("traceparent", &v), ("b3", &v), ("x-b3-traceid", &v), ("x-b3-spanid", &v), ("baggage", &v)]);
            let _ =
                extract(&c, &[Propagator::Tracecontext, Propagator::B3, Propagator::B3multi], &mut Carry::default());
        }
    }
}
