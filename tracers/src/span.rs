//! The span Envoy drives through the tracer hooks, owned by one worker thread from
//! `start_span` / `spawn_child` to `destroy`.
//!
//! A sampled span collects its tags and events in two flat byte arenas (one allocation each,
//! no per-tag `String`s); the tags go in already encoded as the OTLP `Span.attributes`
//! `KeyValue`s they become. At `finish` its fields and arenas are copied as they are into its
//! worker's queue ([`Finished`]) and the flush thread encodes the OTLP `Span` message around
//! them. An unsampled span keeps only its ids, for propagation.
use std::borrow::Cow;
use std::time::{SystemTime, UNIX_EPOCH};

use envoy_obs_common::otlp::proto;
pub use envoy_obs_common::rand::rand64;

use crate::propagation::{hex_to, is_token, set_entry, Carry, Member};

/// `Span.SpanKind` values.
pub const KIND_SERVER: u64 = 2;
/// `SPAN_KIND_CLIENT`.
pub const KIND_CLIENT: u64 = 3;

/// Wall-clock now in Unix nanoseconds.
pub fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// A non-zero random span id.
pub fn new_span_id() -> [u8; 8] {
    loop {
        let v = rand64();
        if v != 0 {
            return v.to_be_bytes();
        }
    }
}

/// A non-zero random trace id.
pub fn new_trace_id() -> [u8; 16] {
    let mut t = [0u8; 16];
    t[..8].copy_from_slice(&rand64().to_be_bytes());
    t[8..].copy_from_slice(&new_span_id());
    t
}

/// A span name, inline up to [`Name::INLINE`] bytes (Envoy's "ingress", "router <cluster>
/// egress"), so starting a span — sampled or not — allocates nothing for it.
#[derive(Clone)]
pub enum Name {
    /// Short names: length and bytes.
    Inline(u8, [u8; Name::INLINE]),
    /// Longer names.
    Heap(Box<[u8]>),
}

impl Name {
    /// Longest name kept inline.
    pub const INLINE: usize = 62;

    /// A copy of `b`.
    pub fn new(b: &[u8]) -> Name {
        if b.len() <= Self::INLINE {
            let mut a = [0; Self::INLINE];
            a[..b.len()].copy_from_slice(b);
            Name::Inline(b.len() as u8, a)
        } else {
            Name::Heap(b.into())
        }
    }

    /// The name's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Name::Inline(n, a) => &a[..*n as usize],
            Name::Heap(b) => b,
        }
    }
}

/// One span.
pub struct Span {
    /// Trace id.
    pub trace_id: [u8; 16],
    /// This span's id.
    pub span_id: [u8; 8],
    /// Parent span id; all zeros for a root.
    pub parent: [u8; 8],
    /// The parent came from the incoming request.
    pub remote_parent: bool,
    /// Sampled decision (Envoy may change it with `set_sampled`).
    pub sampled: bool,
    /// SERVER or CLIENT.
    pub kind: u64,
    /// Start, Unix ns.
    pub start_ns: u64,
    /// Operation name.
    pub name: Name,
    /// `tracestate` to pass on.
    pub tracestate: Vec<u8>,
    /// Baggage entries.
    pub baggage: Vec<Member>,
    /// Incoming headers injection must correct (inherited by children).
    pub carry: Carry,
    /// Tags as encoded `Span.attributes` entries (field 9 `KeyValue`s), in the order set.
    tags: Vec<u8>,
    /// Status ERROR, as Envoy's OpenTelemetry tracer derives it from the status tags (see
    /// [`Span::set_tag`]).
    error: bool,
    /// Key signatures (one bit each, see [`signature`]) seen once, and seen again: the flush
    /// thread compares keys only when a signature repeated.
    keys_seen: u64,
    keys_twice: u64,
    events: Vec<u8>,
    finished: bool,
    hex: [u8; 48],
    hex_ready: bool,
}

impl Span {
    /// A span; `parent` zero for a root.
    pub fn new(trace_id: [u8; 16], parent: [u8; 8], sampled: bool, kind: u64, start_ns: u64, name: &[u8]) -> Span {
        Span {
            trace_id,
            span_id: new_span_id(),
            parent,
            remote_parent: false,
            sampled,
            kind,
            start_ns,
            name: Name::new(name),
            tracestate: Vec::new(),
            baggage: Vec::new(),
            carry: Carry::default(),
            tags: Vec::new(),
            error: false,
            keys_seen: 0,
            keys_twice: 0,
            events: Vec::new(),
            finished: false,
            hex: [0; 48],
            hex_ready: false,
        }
    }

    /// A child of this span (Envoy's upstream request span).
    pub fn child(&self, name: &[u8], start_ns: u64) -> Span {
        let mut c = Span::new(self.trace_id, self.span_id, self.sampled, KIND_CLIENT, start_ns, name);
        c.tracestate.clone_from(&self.tracestate);
        c.baggage.clone_from(&self.baggage);
        c.carry = self.carry;
        c
    }

    /// Records a tag (sampled spans only; a repeated key keeps its last value), encoded as
    /// the attribute it becomes: the flush thread then copies the arena whole when it can
    /// (see [`Finished::encode`]).
    #[inline]
    pub fn set_tag(&mut self, k: &[u8], v: &[u8]) {
        // An attribute key must not be empty (OpenTelemetry; Envoy's tracer skips such a tag).
        if !self.sampled || k.is_empty() {
            return;
        }
        if self.tags.is_empty() {
            // Envoy sets a dozen tags per span, ~600 bytes in all.
            self.tags.reserve(768);
        }
        proto::kv_str(&mut self.tags, ATTRIBUTES, k, v);
        let sig = signature(k);
        // Status as Envoy's OpenTelemetry tracer sets it, tag by tag with the span's kind then
        // (OpenTelemetry's HTTP and gRPC semantic conventions): `http.status_code` makes it
        // ERROR from 500, or from 400 on a client span, and never clears it; `grpc.status_code`
        // sets it either way — ERROR for any code but OK on a client span, for Unknown,
        // DeadlineExceeded, Unimplemented, Internal, Unavailable or DataLoss on others. The
        // `error` tag alone (an upstream reset, status 0) leaves it unset.
        // (Keys compared as arrays: two words, no memcmp call.)
        if sig == STATUS_SIGNATURE || sig == GRPC_STATUS_SIGNATURE {
            let client = self.kind == KIND_CLIENT;
            match <&[u8; 16]>::try_from(k) {
                Ok(a) if a == STATUS_CODE => {
                    if let Some(code) = decimal(v) {
                        self.error |= code >= 500 || (code >= 400 && client);
                    }
                }
                Ok(a) if a == GRPC_STATUS_CODE => {
                    if let Some(code) = decimal(v) {
                        self.error = if client { code != 0 } else { matches!(code, 2 | 4 | 12 | 13 | 14 | 15) };
                    }
                }
                _ => {}
            }
        }
        let bit = 1u64 << sig;
        self.keys_twice |= self.keys_seen & bit;
        self.keys_seen |= bit;
    }

    /// Records an event (span log).
    pub fn log(&mut self, ts_ns: i64, event: &[u8]) {
        if !self.sampled {
            return;
        }
        let event = clip(event);
        proto::append(&mut self.events, [&ts_ns.to_le_bytes(), &(event.len() as u32).to_le_bytes(), event]);
    }

    /// Sets a baggage entry (propagated to children and, with the baggage propagator, upstream).
    /// A key that is not an RFC 7230 token is ignored: written out it would corrupt the header
    /// (`a=b` as a key reads back as key `a`).
    pub fn set_baggage(&mut self, k: &[u8], v: &[u8]) {
        if !is_token(k) {
            return;
        }
        set_entry(&mut self.baggage, k, v, b"");
        self.carry.baggage_modified = true;
    }

    /// A baggage value.
    pub fn baggage(&self, k: &[u8]) -> Option<&[u8]> {
        self.baggage.iter().find(|m| m.key == k).map(|m| m.value.as_slice())
    }

    /// Hex trace id (32 bytes) and span id (16 bytes), kept for the span's lifetime.
    pub fn hex_ids(&mut self) -> (&[u8], &[u8]) {
        if !self.hex_ready {
            let (t, s) = self.hex.split_at_mut(32);
            hex_to(&self.trace_id, t);
            hex_to(&self.span_id, s);
            self.hex_ready = true;
        }
        let (t, s) = self.hex.split_at(32);
        (t, s)
    }

    /// Marks the span finished; true only the first time.
    pub fn finish(&mut self) -> bool {
        !std::mem::replace(&mut self.finished, true)
    }

    /// This span as finished now (`end_ns`): what crosses to the flush thread.
    pub fn finished(&self, end_ns: u64) -> Finished<'_> {
        Finished {
            trace_id: self.trace_id,
            span_id: self.span_id,
            parent: self.parent,
            remote_parent: self.remote_parent,
            sampled: self.sampled,
            kind: self.kind,
            start_ns: self.start_ns,
            end_ns: end_ns.max(self.start_ns),
            keys_twice: self.keys_twice,
            error: self.error,
            name: self.name.as_bytes(),
            tracestate: &self.tracestate,
            tags: &self.tags,
            events: &self.events,
        }
    }

    /// Encodes the body of an OTLP `Span` message, ending at `end_ns`.
    pub fn encode(&self, end_ns: u64, out: &mut Vec<u8>) {
        self.finished(end_ns).encode(out);
    }
}

/// A finished span, borrowed: either from the live [`Span`] or from its queue record.
///
/// `finish` on the worker only copies it into the queue ([`Finished::write`]: fixed fields and
/// the tag and event arenas as they are, a few memcpys); the flush thread reads it back
/// ([`Finished::read`]) and encodes the OTLP message there ([`Finished::encode`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Finished<'a> {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    parent: [u8; 8],
    remote_parent: bool,
    sampled: bool,
    kind: u64,
    start_ns: u64,
    end_ns: u64,
    /// [`Span`]'s `keys_twice`: zero when no two tag keys can be equal.
    keys_twice: u64,
    /// [`Span`]'s `error`.
    error: bool,
    name: &'a [u8],
    tracestate: &'a [u8],
    tags: &'a [u8],
    events: &'a [u8],
}

/// The tags that set a span's status (see [`Span::set_tag`]).
const STATUS_CODE: &[u8; 16] = b"http.status_code";
const GRPC_STATUS_CODE: &[u8; 16] = b"grpc.status_code";

/// [`signature`]s of the status tags: `set_tag` compares only keys that have one of them.
const STATUS_SIGNATURE: u32 = signature(STATUS_CODE);
const GRPC_STATUS_SIGNATURE: u32 = signature(GRPC_STATUS_CODE);

/// A status code read as Envoy's tracer reads it (absl's `SimpleAtoi` into an unsigned 64-bit
/// integer: surrounding spaces and a `+` allowed); None when it is not one, which changes nothing.
fn decimal(v: &[u8]) -> Option<u64> {
    let v = v.trim_ascii();
    let v = v.strip_prefix(b"+").unwrap_or(v);
    if v.is_empty() {
        return None;
    }
    v.iter().try_fold(
        0u64,
        |n, &c| if c.is_ascii_digit() { n.checked_mul(10)?.checked_add(u64::from(c - b'0')) } else { None },
    )
}

/// `Span.attributes`.
const ATTRIBUTES: u32 = 9;

/// Bytes of a record's fixed part: ids, flags, kind, start, end, the repeated-key mask and the
/// status code.
const FIXED: usize = 16 + 8 + 8 + 1 + 1 + 8 + 8 + 8 + 4;

impl<'a> Finished<'a> {
    /// Appends the queue record: the fixed part, then name, tracestate, tags and events, each
    /// length-prefixed.
    pub fn write(&self, out: &mut Vec<u8>) {
        let mut fixed = [0u8; FIXED];
        fixed[..16].copy_from_slice(&self.trace_id);
        fixed[16..24].copy_from_slice(&self.span_id);
        fixed[24..32].copy_from_slice(&self.parent);
        fixed[32] = u8::from(self.sampled) | u8::from(self.remote_parent) << 1;
        fixed[33] = self.kind as u8;
        fixed[34..42].copy_from_slice(&self.start_ns.to_le_bytes());
        fixed[42..50].copy_from_slice(&self.end_ns.to_le_bytes());
        fixed[50..58].copy_from_slice(&self.keys_twice.to_le_bytes());
        fixed[58..62].copy_from_slice(&u32::from(self.error).to_le_bytes());
        let (name, ts, tags, ev) = (clip(self.name), clip(self.tracestate), clip(self.tags), clip(self.events));
        let len = |b: &[u8]| (b.len() as u32).to_le_bytes();
        let (nl, tl, gl, el) = (len(name), len(ts), len(tags), len(ev));
        proto::append(out, [&fixed, &nl, name, &tl, ts, &gl, tags, &el, ev]);
    }

    /// Reads a record [`Finished::write`] made; `None` if it is malformed.
    pub fn read(rec: &'a [u8]) -> Option<Finished<'a>> {
        let (fixed, mut rest) = rec.split_first_chunk::<FIXED>()?;
        let mut part = || {
            let (len, r) = rest.split_first_chunk::<4>()?;
            let n = u32::from_le_bytes(*len) as usize;
            let (v, r) = (r.get(..n)?, &r[n..]);
            rest = r;
            Some(v)
        };
        let (name, tracestate, tags, events) = (part()?, part()?, part()?, part()?);
        let u64_at = |i: usize| u64::from_le_bytes(fixed[i..i + 8].try_into().unwrap_or([0; 8]));
        let error = u32::from_le_bytes(fixed[58..62].try_into().unwrap_or([0; 4])) != 0;
        Some(Finished {
            trace_id: fixed[..16].try_into().ok()?,
            span_id: fixed[16..24].try_into().ok()?,
            parent: fixed[24..32].try_into().ok()?,
            sampled: fixed[32] & 1 != 0,
            remote_parent: fixed[32] & 2 != 0,
            kind: u64::from(fixed[33]),
            start_ns: u64_at(34),
            end_ns: u64_at(42),
            keys_twice: u64_at(50),
            error,
            name,
            tracestate,
            tags,
            events,
        })
    }

    /// Encodes the body of an OTLP `Span` message.
    pub fn encode(&self, out: &mut Vec<u8>) {
        proto::bytes(out, 1, &self.trace_id);
        proto::bytes(out, 2, &self.span_id);
        if !self.tracestate.is_empty() {
            proto::bytes(out, 3, self.tracestate);
        }
        if self.parent != [0; 8] {
            proto::bytes(out, 4, &self.parent);
        }
        proto::bytes(out, 5, &utf8(self.name));
        proto::uint(out, 6, self.kind);
        proto::fixed64(out, 7, self.start_ns);
        proto::fixed64(out, 8, self.end_ns);
        // The arena holds the attributes already encoded. Protobuf strings must be UTF-8, and
        // Envoy's tags are nearly always short ASCII: then every byte of the arena, framing
        // included, is below 0x80 (see `proto::KV_STR_SHORT`), one check spares checking each
        // key and value, and with no repeated key the arena is the attributes as they are.
        let ascii = self.tags.is_ascii();
        let twice = self.keys_twice;
        if ascii && twice == 0 {
            out.extend_from_slice(self.tags);
        } else {
            // The last value of a repeated key wins, as with an OpenTelemetry SDK's
            // SetAttribute. `set_tag` marked the key signatures it saw more than once (rare:
            // Envoy's tag keys are distinct); only a key with such a signature is compared with
            // the keys after it.
            let text = |b| if ascii { Cow::Borrowed(b) } else { utf8(b) };
            let mut rest = attributes(self.tags);
            while let Some((k, v)) = rest.next() {
                if twice != 0 && twice & 1u64 << signature(k) != 0 && rest.clone().any(|(k2, _)| k2 == k) {
                    continue;
                }
                proto::kv_str(out, ATTRIBUTES, &text(k), &text(v));
            }
        }
        let mut ev = self.events;
        while ev.len() >= 12 {
            let ts = i64::from_le_bytes(ev[..8].try_into().unwrap_or([0; 8]));
            let n = u32::from_le_bytes(ev[8..12].try_into().unwrap_or([0; 4])) as usize;
            let Some(name) = ev.get(12..12 + n) else { break };
            proto::message(out, 11, |o| {
                proto::fixed64(o, 1, ts.max(0) as u64);
                proto::bytes(o, 2, &utf8(name));
            });
            ev = &ev[12 + n..];
        }
        // flags: W3C trace flags (sampled) + "has is_remote" (0x100) + is_remote (0x200).
        let remote = if self.remote_parent { 0x300 } else { 0x100 };
        proto::fixed32(out, 16, remote | u32::from(self.sampled));
        if self.error {
            proto::message(out, 15, |o| proto::uint(o, 3, 2));
        }
    }
}

/// A cheap hash of a tag key into 0..64: its length and three of its bytes, multiplied by the
/// golden ratio (Fibonacci hashing) and the top 6 bits taken. Envoy's own tag keys (16 on a
/// server span, 9 on a client span) land on distinct values, so their spans compare no keys.
#[inline]
const fn signature(k: &[u8]) -> u32 {
    let n = k.len();
    let (first, last, mid) = if n == 0 { (0, 0, 0) } else { (k[0], k[n - 1], k[n / 2]) };
    let x = n as u32 ^ (first as u32) << 8 ^ (last as u32) << 16 ^ (mid as u32) << 24;
    x.wrapping_mul(0x9E37_79B1) >> 26
}

/// At most what a u32 length prefix can describe.
fn clip(b: &[u8]) -> &[u8] {
    &b[..b.len().min(u32::MAX as usize)]
}

/// The (key, value) of each string attribute (field 9) in `msg`: the tag arena `set_tag`
/// wrote, or an encoded `Span`. Other fields, and attributes without a string key and value,
/// are skipped; broken framing ends the iteration.
fn attributes(msg: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> + Clone {
    proto::Reader::new(msg).filter_map(|(field, f)| match (field, f) {
        (ATTRIBUTES, proto::Field::Bytes(kv)) => {
            Some((proto::get_bytes(kv, 1)?, proto::get_bytes(proto::get_bytes(kv, 2)?, 1)?))
        }
        _ => None,
    })
}

/// Protobuf strings must be UTF-8.
fn utf8(b: &[u8]) -> Cow<'_, [u8]> {
    if b.is_ascii() || std::str::from_utf8(b).is_ok() {
        Cow::Borrowed(b)
    } else {
        Cow::Owned(String::from_utf8_lossy(b).into_owned().into_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Longest value that, with a one-byte key, keeps a tag's framing one byte per length.
    const KV_MAX: usize = proto::KV_STR_SHORT - 1;

    #[test]
    fn names_of_any_length_round_trip() {
        for n in [0, 1, 7, Name::INLINE - 1, Name::INLINE, Name::INLINE + 1, 4096] {
            let b: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
            let name = Name::new(&b);
            assert_eq!(name.as_bytes(), &b[..]);
            assert_eq!(matches!(name, Name::Inline(..)), n <= Name::INLINE);
        }
    }

    #[test]
    fn ids_are_random_and_non_zero() {
        let a: Vec<[u8; 16]> = (0..1000).map(|_| new_trace_id()).collect();
        let mut b = a.clone();
        b.sort();
        b.dedup();
        assert_eq!(b.len(), 1000);
        assert!(a.iter().all(|t| *t != [0; 16]));
    }

    #[test]
    fn encode_dedupes_tags_sets_status_and_keeps_utf8_valid() {
        let mut s = Span::new([1; 16], [2; 8], true, KIND_SERVER, 10, b"ingress");
        s.set_tag(b"http.status_code", b"200");
        s.set_tag(b"http.status_code", b"503");
        s.set_tag(b"error", b"true");
        // Client spans: 4xx is an error too; `error` without a status code is not.
        let mut c = s.child(b"router", 11);
        c.set_tag(b"http.status_code", b"404");
        let is_error = |c: &Span| {
            let mut out = Vec::new();
            c.encode(12, &mut out);
            proto::get_bytes(&out, 15).is_some()
        };
        assert!(is_error(&c));
        let mut c = s.child(b"router", 11);
        c.set_tag(b"error", b"true");
        c.set_tag(b"http.status_code", b"0");
        assert!(!is_error(&c));
        s.set_tag(b"bad", b"a\xffb");
        s.log(12, b"retry");
        let mut out = Vec::new();
        s.encode(20, &mut out);
        let f: Vec<_> = proto::Reader::new(&out).collect();
        let attrs: Vec<_> = f.iter().filter(|(n, _)| *n == 9).collect();
        assert_eq!(attrs.len(), 3);
        let get = |n: u32| f.iter().find(|(k, _)| *k == n).map(|(_, v)| *v);
        assert_eq!(get(8), Some(proto::Field::Fixed64(20)));
        assert_eq!(get(6), Some(proto::Field::Varint(2)));
        let Some(proto::Field::Bytes(st)) = get(15) else { panic!("status") };
        assert_eq!(proto::get_varint(st, 3), Some(2));
        assert!(get(11).is_some());
        for (_, v) in &attrs {
            let proto::Field::Bytes(kv) = v else { panic!() };
            let val = proto::get_bytes(proto::get_bytes(kv, 2).unwrap(), 1).unwrap();
            assert!(std::str::from_utf8(val).is_ok());
            if proto::get_bytes(kv, 1) == Some(b"http.status_code") {
                assert_eq!(val, b"503");
            }
        }
    }

    #[test]
    fn the_tag_arena_is_the_attributes_byte_for_byte() {
        let tags: [(&[u8], &[u8]); 4] =
            [(b"http.method", b"GET"), (b"", b""), (b"k", &[b'v'; KV_MAX]), (b"http.status_code", b"200")];
        let mut s = Span::new([1; 16], [0; 8], true, KIND_SERVER, 1, b"x");
        let mut want = Vec::new();
        for (k, v) in tags {
            s.set_tag(k, v);
            // An empty key is no attribute (OpenTelemetry); Envoy's tracer skips it too.
            if !k.is_empty() {
                proto::kv_str(&mut want, ATTRIBUTES, k, v);
            }
        }
        assert!(s.tags.is_ascii(), "short ASCII tags: the flush thread copies the arena whole");
        let mut out = Vec::new();
        s.encode(2, &mut out);
        assert!(out.windows(want.len()).any(|w| w == want));
        // One long value: the arena's framing is no longer ASCII and each tag is written anew,
        // to the same bytes.
        s.set_tag(b"long", &[b'a'; 300]);
        proto::kv_str(&mut want, ATTRIBUTES, b"long", &[b'a'; 300]);
        assert!(!s.tags.is_ascii());
        let mut out = Vec::new();
        s.encode(2, &mut out);
        assert!(out.windows(want.len()).any(|w| w == want));
    }

    /// Envoy's OpenTelemetry `Span::setTag`, tag by tag: HTTP codes only ever set ERROR, gRPC
    /// codes set the status either way, each read with the span's kind.
    #[test]
    fn status_follows_envoys_rules_for_http_and_grpc_codes() {
        let (h, g) = (&b"http.status_code"[..], &b"grpc.status_code"[..]);
        type Tags<'a> = &'a [(&'a [u8], &'a [u8])];
        let cases: [(u64, Tags, bool); 14] = [
            (KIND_SERVER, &[(h, b"404")], false),
            (KIND_SERVER, &[(h, b"503")], true),
            (KIND_SERVER, &[(h, b"600")], true),
            (KIND_SERVER, &[(h, b"503"), (h, b"200")], true),
            (KIND_SERVER, &[(h, b"503"), (g, b"0")], false),
            (KIND_SERVER, &[(h, b"200"), (g, b"14")], true),
            (KIND_SERVER, &[(h, b"200"), (g, b"5")], false),
            (KIND_SERVER, &[(g, b"2")], true),
            (KIND_CLIENT, &[(h, b"404")], true),
            (KIND_CLIENT, &[(h, b"0")], false),
            (KIND_CLIENT, &[(h, b"200"), (g, b"5")], true),
            (KIND_CLIENT, &[(h, b"503"), (g, b"0")], false),
            (KIND_CLIENT, &[(g, b"unknown")], false),
            (KIND_CLIENT, &[(b"error", b"true")], false),
        ];
        for (kind, tags, want) in cases {
            let mut s = Span::new([1; 16], [0; 8], true, kind, 1, b"x");
            for (k, v) in tags {
                s.set_tag(k, v);
            }
            let mut out = Vec::new();
            s.encode(2, &mut out);
            assert_eq!(proto::get_bytes(&out, 15).is_some(), want, "kind {kind}, {tags:?}");
        }
    }

    #[test]
    fn status_codes_are_read_as_envoy_writes_them() {
        for (v, want) in [
            (&b"200"[..], Some(200)),
            (b"503", Some(503)),
            (b"0", Some(0)),
            (b"05", Some(5)),
            (b" +14 ", Some(14)),
            (b"", None),
            (b"5x3", None),
            (b"-1", None),
            (b"abc", None),
            // A misbehaving upstream's grpc-status: still a code that is not OK, as for Envoy.
            (b"4294967296", Some(4_294_967_296)),
            (b"18446744073709551615", Some(u64::MAX)),
            (b"18446744073709551616", None),
        ] {
            assert_eq!(decimal(v), want, "{v:?}");
        }
        assert_eq!(STATUS_SIGNATURE, signature(b"http.status_code"));
    }

    #[test]
    fn envoy_tag_keys_have_distinct_signatures() {
        let server = ["node_id", "zone", "guid:x-request-id", "http.url", "http.method", "downstream_cluster"]
            .into_iter()
            .chain(["user_agent", "http.protocol", "peer.address", "request_size", "response_size", "component"])
            .chain(["upstream_cluster", "upstream_cluster.name", "http.status_code", "response_flags"]);
        let client = ["http.protocol", "upstream_address", "peer.address", "component", "upstream_cluster"]
            .into_iter()
            .chain(["upstream_cluster.name", "http.status_code", "response_flags", "error"]);
        for keys in [server.collect::<Vec<_>>(), client.collect()] {
            let mut s = Span::new([1; 16], [0; 8], true, KIND_SERVER, 1, b"x");
            for k in &keys {
                assert!(signature(k.as_bytes()) < 64);
                s.set_tag(k.as_bytes(), b"v");
            }
            assert_eq!(s.keys_twice, 0, "{keys:?}");
        }
    }

    #[test]
    fn many_tags_dedupe_and_long_or_invalid_values_stay_valid() {
        let mut s = Span::new([1; 16], [0; 8], true, KIND_SERVER, 1, b"x");
        s.set_tag(b"dup", b"first");
        // 40 keys over 64 signature bits: some share a signature without being equal.
        for i in 0..40 {
            s.set_tag(format!("k{i}").as_bytes(), b"v");
        }
        s.set_tag(b"dup", b"last");
        // A value of 200 bytes puts a non-ASCII byte in the arena's length prefix: every key
        // and value is then checked one by one.
        s.set_tag(b"long", &[b'a'; 200]);
        s.set_tag(b"bin", b"\xc3\x28");
        let mut out = Vec::new();
        // Through the queue record, as on the flush thread (the repeated-key mask travels in it).
        let mut rec = Vec::new();
        s.finished(2).write(&mut rec);
        Finished::read(&rec).expect("reads back").encode(&mut out);
        let kvs: Vec<&[u8]> = proto::Reader::new(&out)
            .filter_map(|(n, v)| match v {
                proto::Field::Bytes(b) if n == 9 => Some(b),
                _ => None,
            })
            .collect();
        assert_eq!(kvs.len(), 43);
        let value = |k: &[u8]| {
            let kv = kvs.iter().find(|kv| proto::get_bytes(kv, 1) == Some(k)).unwrap();
            proto::get_bytes(proto::get_bytes(kv, 2).unwrap(), 1).unwrap().to_vec()
        };
        assert_eq!(value(b"dup"), b"last");
        assert_eq!(value(b"long"), [b'a'; 200]);
        assert_eq!(value(b"bin"), "\u{fffd}(".as_bytes());
        for i in 0..40 {
            assert_eq!(value(format!("k{i}").as_bytes()), b"v");
        }
    }

    fn owned_attributes(encoded: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        attributes(encoded).map(|(k, v)| (k.to_vec(), v.to_vec())).collect()
    }

    #[test]
    fn last_value_wins_for_every_key_mix() {
        // Keys from a tiny alphabet repeat often and collide in `signature`; the result must
        // equal "last value per key, in first-seen order of the surviving entries".
        let mut rng = 0x1234_5678_u64;
        let mut next = |m: u64| {
            rng = rng.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            (rng >> 33) % m
        };
        for round in 0..500 {
            let mut s = Span::new([1; 16], [0; 8], true, KIND_SERVER, 1, b"x");
            let n = next(45);
            let mut set: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
            for i in 0..n {
                let len = 1 + next(4) as usize;
                let k: Vec<u8> = (0..len).map(|_| b"ab"[next(2) as usize]).collect();
                let v = format!("{round}-{i}").into_bytes();
                s.set_tag(&k, &v);
                set.push((k, v));
            }
            let want: Vec<_> = set
                .iter()
                .enumerate()
                .filter(|(i, (k, _))| !set[i + 1..].iter().any(|(k2, _)| k2 == k))
                .map(|(_, t)| t.clone())
                .collect();
            let mut out = Vec::new();
            s.encode(2, &mut out);
            assert_eq!(owned_attributes(&out), want, "round {round}");
        }
        // Different keys with one signature are both kept.
        assert_eq!(signature(b"aXcb"), signature(b"aYcb"));
        let mut s = Span::new([1; 16], [0; 8], true, KIND_SERVER, 1, b"x");
        s.set_tag(b"aXcb", b"1");
        s.set_tag(b"aYcb", b"2");
        let mut out = Vec::new();
        s.encode(2, &mut out);
        assert_eq!(attributes(&out).count(), 2);
    }

    #[test]
    fn queue_records_read_back_exactly_and_never_panic_when_cut() {
        let mut s = Span::new([3; 16], [4; 8], true, KIND_CLIENT, 100, b"router backend egress");
        s.remote_parent = true;
        s.tracestate = b"k=v".to_vec();
        s.set_tag(b"http.status_code", b"503");
        s.log(150, b"retry");
        let f = s.finished(90); // an end before the start is clamped to the start
        let mut rec = Vec::new();
        f.write(&mut rec);
        let back = Finished::read(&rec).expect("reads back");
        assert_eq!(back, f);
        assert_eq!(back.end_ns, 100);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        back.encode(&mut a);
        s.encode(90, &mut b);
        assert_eq!(a, b);
        for cut in 0..rec.len() {
            assert!(Finished::read(&rec[..cut]).is_none(), "cut at {cut}");
        }
    }

    #[test]
    fn unsampled_spans_keep_nothing() {
        let mut s = Span::new([1; 16], [0; 8], false, KIND_SERVER, 10, b"x");
        s.set_tag(b"k", b"v");
        s.log(1, b"e");
        assert!(s.tags.is_empty() && s.events.is_empty());
        let c = s.child(b"router", 11);
        assert_eq!((c.parent, c.trace_id, c.sampled, c.kind), (s.span_id, s.trace_id, false, KIND_CLIENT));
    }
}
