//! JSON string escaping that always yields valid JSON: a value that is not valid UTF-8 has each
//! byte from 0x80 up written as `\u00XX` (as Envoy's JSON formatter does), control
//! characters become `\uXXXX` (or their short escapes), quotes and backslashes are escaped.

use envoy_obs_common::w3c::HEX;

const fn build_table() -> [u8; 256] {
    // 0 = copy, b'u' = \u00XX, other = short escape letter.
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 0x20 {
        t[i] = b'u';
        i += 1;
    }
    t[b'\n' as usize] = b'n';
    t[b'\r' as usize] = b'r';
    t[b'\t' as usize] = b't';
    t[0x08] = b'b';
    t[0x0c] = b'f';
    t[b'"' as usize] = b'"';
    t[b'\\' as usize] = b'\\';
    t
}
static ESCAPE: [u8; 256] = build_table();

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// Whether any of the 8 bytes in `w` is a control character, `"` or `\\`: SWAR tests that
/// look at a whole word per step (bytes >= 0x80, i.e. UTF-8, never match).
#[inline(always)]
fn needs_escape(w: u64) -> bool {
    let zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGHS;
    let ctrl = w.wrapping_sub(ONES * 0x20) & !w & HIGHS;
    (ctrl | zero(w ^ (ONES * b'"' as u64)) | zero(w ^ (ONES * b'\\' as u64))) != 0
}

/// Bit `k` set when byte `k` of the 16 at `p` is a control character, `"` or `\\` — or, with
/// `NON_ASCII`, also >= 0x80.
///
/// # Safety
/// `p` points at 16 readable bytes (any alignment).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn sse_hits<const NON_ASCII: bool>(p: *const u8) -> u32 {
    use core::arch::x86_64::*;
    // SAFETY: per the contract; SSE2 is part of the x86-64 baseline.
    unsafe {
        let v = _mm_loadu_si128(p.cast());
        let ctl = _mm_set1_epi8(0x1f);
        let is_ctl = _mm_cmpeq_epi8(_mm_max_epu8(v, ctl), ctl);
        let q = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'"' as i8));
        let b = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'\\' as i8));
        let m = _mm_movemask_epi8(_mm_or_si128(is_ctl, _mm_or_si128(q, b))) as u32;
        if NON_ASCII {
            m | _mm_movemask_epi8(v) as u32
        } else {
            m
        }
    }
}

/// Length of the prefix of `s` that needs no escaping: 16 bytes per step with SSE2 (part of
/// the x86-64 baseline), 8 with SWAR elsewhere, then byte by byte.
#[inline(always)]
fn clean_prefix(s: &[u8]) -> usize {
    let mut i = 0;
    #[cfg(target_arch = "x86_64")]
    while i + 16 <= s.len() {
        // SAFETY: i + 16 <= len.
        let m = unsafe { sse_hits::<false>(s.as_ptr().add(i)) };
        if m != 0 {
            return i + m.trailing_zeros() as usize;
        }
        i += 16;
    }
    while i + 8 <= s.len() {
        let w = u64::from_le_bytes(s[i..i + 8].try_into().unwrap_or([0; 8]));
        if needs_escape(w) {
            break;
        }
        i += 8;
    }
    i + s[i..].iter().position(|&b| ESCAPE[b as usize] != 0).unwrap_or(s.len() - i)
}

/// Length of the prefix of `s` that is ASCII and needs no escaping: the common case (header
/// values, addresses, names) in one pass, 16 bytes per step — short strings through a
/// space-padded copy, the tail of longer ones through an overlapping last load.
#[inline]
fn plain_prefix(s: &[u8]) -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        let n = s.len();
        if n < 16 {
            let mut pad = [b' '; 16];
            pad[..n].copy_from_slice(s);
            // SAFETY: `pad` is 16 bytes.
            let m = unsafe { sse_hits::<true>(pad.as_ptr()) };
            return if m == 0 { n } else { m.trailing_zeros() as usize };
        }
        let mut i = 0;
        while i + 16 <= n {
            // SAFETY: i + 16 <= n.
            let m = unsafe { sse_hits::<true>(s.as_ptr().add(i)) };
            if m != 0 {
                return i + m.trailing_zeros() as usize;
            }
            i += 16;
        }
        if i == n {
            return n;
        }
        // The last 16 bytes (overlapping checked ones, which are clean): n >= 16.
        // SAFETY: n - 16 + 16 == n.
        let m = unsafe { sse_hits::<true>(s.as_ptr().add(n - 16)) };
        if m == 0 {
            n
        } else {
            n - 16 + m.trailing_zeros() as usize
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let ascii = s.iter().position(|b| !b.is_ascii()).unwrap_or(s.len());
        clean_prefix(&s[..ascii])
    }
}

/// True when `s` is ASCII and needs no JSON escaping.
#[inline]
pub fn is_clean(s: &[u8]) -> bool {
    plain_prefix(s) == s.len()
}

/// Appends `s` (valid UTF-8) escaped, without quotes.
#[inline]
fn escape_str(s: &[u8], out: &mut Vec<u8>) {
    let mut pos = 0;
    loop {
        let n = clean_prefix(&s[pos..]);
        out.extend_from_slice(&s[pos..pos + n]);
        pos += n;
        let Some(&b) = s.get(pos) else { return };
        let e = ESCAPE[b as usize];
        if e == b'u' {
            push_u00(b, out);
        } else {
            out.extend_from_slice(&[b'\\', e]);
        }
        pos += 1;
    }
}

/// Appends arbitrary bytes escaped, without quotes.
#[inline]
pub fn escape_into(s: &[u8], out: &mut Vec<u8>) {
    let plain = plain_prefix(s);
    if plain == s.len() {
        return out.extend_from_slice(s);
    }
    // Header values and most stream properties are ASCII: skip UTF-8 validation for them.
    if s[plain..].is_ascii() {
        out.extend_from_slice(&s[..plain]);
        return escape_str(&s[plain..], out);
    }
    match std::str::from_utf8(s) {
        Ok(_) => escape_str(s, out),
        Err(_) => escape_bytes(s, out),
    }
}

/// Appends arbitrary bytes as a quoted JSON string.
/// `\u00XX` for byte `b`.
#[inline]
fn push_u00(b: u8, out: &mut Vec<u8>) {
    out.extend_from_slice(&[b'\\', b'u', b'0', b'0', HEX[(b >> 4) as usize], HEX[(b & 0xf) as usize]]);
}

/// A string that is not valid UTF-8, as Envoy 1.40's JSON formatter writes it (checked on the
/// binary): every byte from 0x80 up becomes `\u00XX` (the byte read as Latin-1), valid
/// sequences in it included; the rest is escaped as usual.
#[cold]
fn escape_bytes(s: &[u8], out: &mut Vec<u8>) {
    for chunk in s.split_inclusive(|&b| b >= 0x80) {
        match chunk.split_last() {
            Some((&b, head)) if b >= 0x80 => {
                escape_str(head, out);
                push_u00(b, out);
            }
            _ => escape_str(chunk, out),
        }
    }
}

#[inline]
pub fn quoted(s: &[u8], out: &mut Vec<u8>) {
    out.push(b'"');
    escape_into(s, out);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_prefix_matches_the_table() {
        for len in [1usize, 7, 8, 15, 16, 17, 31, 33, 64] {
            for pos in 0..len {
                for b in 0..=255u8 {
                    let mut s = vec![b'a'; len];
                    s[pos] = b;
                    let expect = if ESCAPE[b as usize] != 0 { pos } else { len };
                    assert_eq!(clean_prefix(&s), expect, "byte {b:#x} at {pos} of {len}");
                }
            }
        }
    }

    #[test]
    fn plain_prefix_stops_at_the_first_escape_or_non_ascii_byte() {
        for len in [0usize, 1, 7, 15, 16, 17, 31, 32, 33, 47, 100] {
            assert_eq!(plain_prefix(&vec![b'a'; len]), len);
            for pos in 0..len {
                for b in 0..=255u8 {
                    let mut s = vec![b'a'; len];
                    s[pos] = b;
                    let expect = if ESCAPE[b as usize] != 0 || b >= 0x80 { pos } else { len };
                    assert_eq!(plain_prefix(&s), expect, "byte {b:#x} at {pos} of {len}");
                }
            }
        }
    }

    #[test]
    fn swar_matches_the_table() {
        for b in 0..=255u8 {
            for pos in 0..8 {
                let mut w = [b'a'; 8];
                w[pos] = b;
                assert_eq!(needs_escape(u64::from_le_bytes(w)), ESCAPE[b as usize] != 0, "byte {b:#x} at {pos}");
            }
        }
    }

    #[test]
    fn hostile_bytes_give_valid_json() {
        let cases: Vec<&[u8]> =
            vec![b"plain", b"q\"b\\s", b"\x00\x01\x1f\x7f\n\t", b"bad\xff\xfeutf8\xc3", "é€😀".as_bytes()];
        for c in cases {
            let mut out = Vec::new();
            quoted(c, &mut out);
            let v: serde_json::Value = serde_json::from_slice(&out).expect("valid JSON");
            let s = v.as_str().unwrap();
            match std::str::from_utf8(c) {
                Ok(text) => assert_eq!(s, text),
                // Envoy's rule for invalid UTF-8: each byte is one Latin-1 character.
                Err(_) => assert_eq!(s, c.iter().map(|&b| b as char).collect::<String>()),
            }
        }
        // As Envoy 1.40 prints them (its file logger with json_format, same bytes).
        for (bytes, envoy) in [
            (&b"caf\xe9"[..], r#""caf\u00e9""#),
            (b"\xc3\xa9\xff", r#""\u00c3\u00a9\u00ff""#),
            (b"\xf0\x9f\x98\x80x\xff", r#""\u00f0\u009f\u0098\u0080x\u00ff""#),
            (b"\xe2\x82", r#""\u00e2\u0082""#),
            ("é€".as_bytes(), "\"é€\""),
        ] {
            let mut out = Vec::new();
            quoted(bytes, &mut out);
            assert_eq!(String::from_utf8(out).unwrap(), envoy);
        }
    }
}
