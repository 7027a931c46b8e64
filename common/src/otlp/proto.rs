//! A minimal protobuf writer and reader for the OTLP messages the pack sends and the few it
//! reads back (export responses, `google.rpc.RetryInfo`).
//!
//! Records are encoded straight from captured bytes into the wire format: no intermediate
//! message structs, no per-field allocation. Nested messages are written in place with a
//! one-byte length placeholder that is widened afterwards when the body turned out longer
//! than 127 bytes (rare for a single attribute, common only for whole records).
//!
//! Field numbers follow opentelemetry-proto v1 (`common.proto`, `resource.proto`,
//! `logs.proto`, `trace.proto`, `metrics.proto`, `collector/*/v1/*_service.proto`).

/// Wire types.
const VARINT: u32 = 0;
const FIXED64: u32 = 1;
const LEN: u32 = 2;
const FIXED32: u32 = 5;

/// Appends `v` as a base-128 varint.
#[inline]
pub fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Bytes a varint of `v` takes.
#[inline]
pub fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

#[inline]
fn key(out: &mut Vec<u8>, field: u32, wire: u32) {
    varint(out, u64::from((field << 3) | wire));
}

/// A `bytes` or `string` field (written even when empty: callers skip empty optional fields).
#[inline]
pub fn bytes(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    key(out, field, LEN);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// A `uint64` / `int64` / `enum` / `bool` field in varint encoding (negative `int64`s are
/// passed as their two's-complement `u64`, as protobuf does).
#[inline]
pub fn uint(out: &mut Vec<u8>, field: u32, v: u64) {
    key(out, field, VARINT);
    varint(out, v);
}

/// A `fixed64` field.
#[inline]
pub fn fixed64(out: &mut Vec<u8>, field: u32, v: u64) {
    key(out, field, FIXED64);
    out.extend_from_slice(&v.to_le_bytes());
}

/// A `fixed32` field.
#[inline]
pub fn fixed32(out: &mut Vec<u8>, field: u32, v: u32) {
    key(out, field, FIXED32);
    out.extend_from_slice(&v.to_le_bytes());
}

/// A `double` field.
#[inline]
pub fn double(out: &mut Vec<u8>, field: u32, v: f64) {
    key(out, field, FIXED64);
    out.extend_from_slice(&v.to_bits().to_le_bytes());
}

/// An embedded message written by `body`, length-prefixed in place.
#[inline]
pub fn message<R>(out: &mut Vec<u8>, field: u32, body: impl FnOnce(&mut Vec<u8>) -> R) -> R {
    message_in(out, field, 1, body)
}

/// An embedded message whose body is usually 128 B to 16 KiB (a whole record): the length
/// placeholder is two bytes wide, so the body is not shifted to widen it afterwards.
#[inline]
pub fn record<R>(out: &mut Vec<u8>, field: u32, body: impl FnOnce(&mut Vec<u8>) -> R) -> R {
    message_in(out, field, 2, body)
}

#[inline]
fn message_in<R>(out: &mut Vec<u8>, field: u32, width: usize, body: impl FnOnce(&mut Vec<u8>) -> R) -> R {
    key(out, field, LEN);
    let at = out.len();
    out.extend_from_slice(&[0; 2][..width]);
    let r = body(out);
    patch_len(out, at, width);
    r
}

/// Replaces the `width`-byte length placeholder at `at` with the length of everything after
/// it, as the shortest varint (the body moves only when that is not `width` bytes).
fn patch_len(out: &mut Vec<u8>, at: usize, width: usize) {
    let len = out.len() - at - width;
    if width == 1 && len < 0x80 {
        out[at] = len as u8;
        return;
    }
    let n = varint_len(len as u64);
    if n != width {
        out.splice(at..at + width, std::iter::repeat_n(0, n));
    }
    let mut v = len as u64;
    for b in &mut out[at..at + n] {
        *b = (v as u8 & 0x7f) | if v >= 0x80 { 0x80 } else { 0 };
        v >>= 7;
    }
}

/// `opentelemetry.proto.common.v1.AnyValue` fields.
pub mod any {
    /// `string_value`
    pub const STRING: u32 = 1;
    /// `bool_value`
    pub const BOOL: u32 = 2;
    /// `int_value`
    pub const INT: u32 = 3;
    /// `double_value`
    pub const DOUBLE: u32 = 4;
    /// `array_value`
    pub const ARRAY: u32 = 5;
    /// `kvlist_value`
    pub const KVLIST: u32 = 6;
}

/// Appends `parts` with one capacity check (`extend_from_slice` checks each time: for a few
/// short slices that costs as much as the copying).
#[inline]
pub fn append<const N: usize>(buf: &mut Vec<u8>, parts: [&[u8]; N]) {
    let n: usize = parts.iter().map(|p| p.len()).sum();
    buf.reserve(n);
    let mut at = buf.len();
    for p in parts {
        // SAFETY: `reserve(n)` left room for the n bytes of `parts` after the length; a
        // shared slice cannot overlap the vector's spare capacity, which nothing else borrows.
        unsafe { std::ptr::copy_nonoverlapping(p.as_ptr(), buf.as_mut_ptr().add(at), p.len()) };
        at += p.len();
    }
    // SAFETY: every byte up to `at` is initialized: the old contents, then `parts` above.
    unsafe { buf.set_len(at) };
}

/// A `KeyValue` (field `field` of the enclosing message) whose value is a string. Lengths
/// are computed up front: one reservation, no back-patching (this is the per-attribute path;
/// the tracer runs it on the worker for every tag).
#[inline]
pub fn kv_str(out: &mut Vec<u8>, field: u32, k: &[u8], v: &[u8]) {
    if field < 16 && k.len() + v.len() <= KV_STR_SHORT {
        // The usual attribute: short key, short value. Every key and length takes one byte:
        // two 4-byte headers and the two strings.
        let (any_len, kv_len) = (2 + v.len(), 6 + k.len() + v.len());
        let kv_head = [(field << 3) as u8 | LEN as u8, kv_len as u8, (1 << 3) | LEN as u8, k.len() as u8];
        let any_head = [(2 << 3) | LEN as u8, any_len as u8, ((any::STRING << 3) | LEN) as u8, v.len() as u8];
        append(out, [&kv_head, k, &any_head, v]);
        return;
    }
    kv_str_long(out, field, k, v);
}

/// Longest key plus value that [`kv_str`] writes with one-byte lengths (for a field below 16,
/// every byte of such a `KeyValue`'s framing is then below 0x80).
pub const KV_STR_SHORT: usize = 0x7f - 6;

#[inline(never)]
fn kv_str_long(out: &mut Vec<u8>, field: u32, k: &[u8], v: &[u8]) {
    let any_len = 1 + varint_len(v.len() as u64) + v.len();
    let kv_len = 1 + varint_len(k.len() as u64) + k.len() + 1 + varint_len(any_len as u64) + any_len;
    out.reserve(kv_len + 6);
    key(out, field, LEN);
    varint(out, kv_len as u64);
    out.push((1 << 3) | LEN as u8);
    varint(out, k.len() as u64);
    out.extend_from_slice(k);
    out.push((2 << 3) | LEN as u8);
    varint(out, any_len as u64);
    out.push(((any::STRING << 3) | LEN) as u8);
    varint(out, v.len() as u64);
    out.extend_from_slice(v);
}

/// A `KeyValue` whose value is written by `value` into an `AnyValue`.
pub fn kv<R>(out: &mut Vec<u8>, field: u32, k: &[u8], value: impl FnOnce(&mut Vec<u8>) -> R) -> R {
    message(out, field, |o| {
        bytes(o, 1, k);
        message(o, 2, value)
    })
}

/// Reads protobuf fields; malformed input ends the iteration (never panics).
#[derive(Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

/// One field as read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Field<'a> {
    /// Varint-encoded value.
    Varint(u64),
    /// 8-byte value.
    Fixed64(u64),
    /// Length-delimited bytes.
    Bytes(&'a [u8]),
    /// 4-byte value.
    Fixed32(u32),
}

impl<'a> Reader<'a> {
    /// A reader over one encoded message.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for i in 0..10 {
            let (&b, rest) = self.buf.split_first()?;
            self.buf = rest;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                return Some(v);
            }
        }
        None
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.buf.len() {
            return None;
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Some(a)
    }
}

impl<'a> Iterator for Reader<'a> {
    type Item = (u32, Field<'a>);
    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() {
            return None;
        }
        let k = self.varint()?;
        let field = u32::try_from(k >> 3).ok()?;
        let f = match (k & 7) as u32 {
            VARINT => Field::Varint(self.varint()?),
            FIXED64 => Field::Fixed64(u64::from_le_bytes(self.take(8)?.try_into().ok()?)),
            LEN => {
                let n = usize::try_from(self.varint()?).ok()?;
                Field::Bytes(self.take(n)?)
            }
            FIXED32 => Field::Fixed32(u32::from_le_bytes(self.take(4)?.try_into().ok()?)),
            _ => {
                self.buf = &[];
                return None;
            }
        };
        Some((field, f))
    }
}

/// The first length-delimited field `field` of a message.
pub fn get_bytes(msg: &[u8], field: u32) -> Option<&[u8]> {
    Reader::new(msg).find_map(|(f, v)| match v {
        Field::Bytes(b) if f == field => Some(b),
        _ => None,
    })
}

/// The first varint field `field` of a message.
pub fn get_varint(msg: &[u8], field: u32) -> Option<u64> {
    Reader::new(msg).find_map(|(f, v)| match v {
        Field::Varint(n) if f == field => Some(n),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip() {
        for v in [0u64, 1, 127, 128, 300, 16_383, 16_384, u32::MAX as u64, u64::MAX] {
            let mut out = Vec::new();
            varint(&mut out, v);
            assert_eq!(out.len(), varint_len(v), "{v}");
            let mut msg = Vec::new();
            uint(&mut msg, 3, v);
            assert_eq!(get_varint(&msg, 3), Some(v));
        }
    }

    #[test]
    fn nested_lengths_widen_correctly() {
        for n in [0usize, 1, 126, 127, 128, 200, 16_383, 16_384, 70_000] {
            let payload = vec![b'x'; n];
            for wide in [false, true] {
                let mut out = vec![0xAA];
                if wide {
                    record(&mut out, 5, |o| bytes(o, 1, &payload));
                } else {
                    message(&mut out, 5, |o| bytes(o, 1, &payload));
                }
                out.push(0xBB);
                let inner = get_bytes(&out[1..out.len() - 1], 5).expect("outer");
                assert_eq!(get_bytes(inner, 1).map(<[u8]>::len), Some(n));
                assert_eq!(*out.last().unwrap(), 0xBB);
                let body = 1 + varint_len(n as u64) + n;
                assert_eq!(out.len(), 1 + 1 + varint_len(body as u64) + body + 1, "shortest length varint");
            }
        }
    }

    #[test]
    fn kv_str_matches_the_nested_encoding() {
        let mut cases = vec![(vec![b'k'; 130], vec![b'v'; 20_000])];
        // Around the one-byte fast path's edge (a KeyValue of 127 bytes) and a two-byte key.
        for kl in [0, 1, 60, 119, 120, 121, 126, 127, 128] {
            for vl in [0, 1, 2, 118, 119, 120, 121, 125, 126, 127, 128, 200] {
                cases.push((vec![b'k'; kl], vec![b'v'; vl]));
            }
        }
        for (k, v) in &cases {
            for field in [1, 9, 15, 16, 17] {
                let mut fast = Vec::new();
                kv_str(&mut fast, field, k, v);
                let mut slow = Vec::new();
                kv(&mut slow, field, k, |o| bytes(o, any::STRING, v));
                assert_eq!(fast, slow, "key {} value {} field {field}", k.len(), v.len());
            }
        }
    }

    #[test]
    fn append_equals_concatenation() {
        let (mut buf, mut want) = (Vec::new(), Vec::new());
        for i in 0..300usize {
            let a = vec![i as u8; i % 7];
            let b = vec![!(i as u8); i * 13 % 101];
            append(&mut buf, [&a, &[], &b]);
            want.extend_from_slice(&a);
            want.extend_from_slice(&b);
            assert_eq!(buf, want);
        }
    }

    #[test]
    fn reader_stops_on_garbage() {
        let junk = [0xff, 0xff, 0xff, 0x0f, 0x0a, 0xff, 0x01];
        assert!(Reader::new(&junk).count() <= 2);
        assert_eq!(get_bytes(&[0x0a, 0x05, 1, 2], 1), None, "length past the end");
    }
}
