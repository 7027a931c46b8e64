//! W3C Trace Context `traceparent`, read the same way by every module: the tracer continuing a
//! trace, the OTLP access logger's record ids and the JSON logger's `%TRACE_ID%`/`%SPAN_ID%`;
//! and the percent-decoding of baggage values and query parameters.

/// Lower-case hex digits by value.
pub const HEX: &[u8; 16] = b"0123456789abcdef";

/// Lower-case hex of `b` into the first `2 * b.len()` bytes of `out`.
pub fn hex_to(b: &[u8], out: &mut [u8]) {
    for (&x, o) in b.iter().zip(out.chunks_exact_mut(2)) {
        o[0] = HEX[(x >> 4) as usize];
        o[1] = HEX[(x & 15) as usize];
    }
}

/// `N` bytes from `2 * N` hex digits (either case; callers that need lower case check it).
pub fn unhex<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let v = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = (v(s[2 * i])? << 4) | v(s[2 * i + 1])?;
    }
    Some(out)
}

/// Lenient percent-decoding: each `%` followed by two hex digits becomes that byte, anything
/// else stays as it is (`+` too). It is how Envoy's `PercentEncoding::decode` reads query
/// parameters and how W3C Baggage values are read. Borrows when there is nothing to decode.
pub fn percent_decode(s: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if !s.contains(&b'%') {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' {
            if let Some([b]) = s.get(i + 1..i + 3).and_then(unhex::<1>) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(s[i]);
        i += 1;
    }
    std::borrow::Cow::Owned(out)
}

/// `b` without leading and trailing ASCII whitespace.
pub fn trim(b: &[u8]) -> &[u8] {
    let s = b.iter().position(|c| !c.is_ascii_whitespace()).unwrap_or(b.len());
    let e = b.iter().rposition(|c| !c.is_ascii_whitespace()).map_or(s, |i| i + 1);
    &b[s..e]
}

/// A `traceparent` value (surrounding whitespace allowed): version 00, or a later version read
/// as 00 (its first four fields, then a `-` or the end). Lower-case hex only; version `ff` and
/// all-zero ids are invalid. Returns (trace id, parent span id, flags).
pub fn parse_traceparent(v: &[u8]) -> Option<([u8; 16], [u8; 8], u8)> {
    let v = trim(v);
    if v.len() < 55 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    if v[..55].iter().any(u8::is_ascii_uppercase) {
        return None;
    }
    let ver = unhex::<1>(&v[..2])?[0];
    if ver == 0xff || (ver == 0 && v.len() != 55) || (v.len() > 55 && v[55] != b'-') {
        return None;
    }
    let trace = unhex::<16>(&v[3..35])?;
    let span = unhex::<8>(&v[36..52])?;
    let flags = unhex::<1>(&v[53..55])?[0];
    if trace == [0; 16] || span == [0; 8] {
        return None;
    }
    Some((trace, span, flags))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_rules() {
        let (t, s, f) = parse_traceparent(TP.as_bytes()).unwrap();
        assert_eq!((t[0], t[15], s[0], s[7], f), (0x4b, 0x36, 0x00, 0xb7, 1));
        assert_eq!(parse_traceparent(format!(" {TP}\t").as_bytes()), parse_traceparent(TP.as_bytes()));
        assert!(parse_traceparent(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra").is_some());
        assert!(parse_traceparent(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").is_some());
        for bad in [
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01extra",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00F067AA0BA902B7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473z-00f067aa0ba902b7-01",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-+0f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "",
            "garbage",
            "\u{ff}\u{fe}",
        ] {
            assert!(parse_traceparent(bad.as_bytes()).is_none(), "{bad}");
        }
    }

    #[test]
    fn hex_and_trim() {
        assert_eq!(unhex::<2>(b"0aFf"), Some([0x0a, 0xff]));
        assert_eq!(unhex::<1>(b"+a"), None);
        assert_eq!(unhex::<1>(b"abc"), None);
        assert_eq!(trim(b" \t x y \r\n"), b"x y");
        assert_eq!(trim(b"   "), b"");
    }
}
