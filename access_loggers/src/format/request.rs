//! Values Envoy's formatter derives from the request and response headers rather than reading
//! them as they are: `%GRPC_STATUS%`, `%QUERY_PARAM%`, `%PATH%` and `%REQ_WITHOUT_QUERY%`. Each
//! follows Envoy 1.40's code (cited per function) and is checked against its binary in
//! tests/test_json_parity.py.

use std::borrow::Cow;

use envoy_obs_common::w3c::{percent_decode, HEX};

/// How `%GRPC_STATUS(...)%` prints a code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrpcForm {
    /// `OK`, `NotFound`, … (the default, `CAMEL_STRING`).
    Camel,
    /// `OK`, `NOT_FOUND`, … (`SNAKE_STRING`).
    Snake,
    /// The number (`NUMBER`, and `%GRPC_STATUS_NUMBER%`).
    Number,
}

impl GrpcForm {
    /// The argument of `%GRPC_STATUS(...)%`, as Envoy's `GrpcStatusFormatter::parseFormat`.
    pub fn parse(arg: Option<&str>) -> Result<GrpcForm, String> {
        match arg.unwrap_or("") {
            "" | "CAMEL_STRING" => Ok(GrpcForm::Camel),
            "SNAKE_STRING" => Ok(GrpcForm::Snake),
            "NUMBER" => Ok(GrpcForm::Number),
            other => {
                Err(format!("operator %GRPC_STATUS({other})%: only CAMEL_STRING, SNAKE_STRING or NUMBER are allowed"))
            }
        }
    }
}

/// Names of the well-known codes 0..=16 (Envoy's `grpcStatusToString`).
const CAMEL: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

/// The same codes as absl's `StatusCodeToString` names them (note `CANCELLED`).
const SNAKE: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// The name of `code` in `form`'s table, `None` for a code outside it (Envoy then prints the
/// number as a string).
pub fn grpc_name(code: i64, form: GrpcForm) -> Option<&'static str> {
    // Envoy casts to absl::StatusCode (an int) for the snake names: the low 32 bits count.
    let code = if form == GrpcForm::Snake { i64::from(code as i32) } else { code };
    let i = usize::try_from(code).ok()?;
    match form {
        GrpcForm::Camel => CAMEL.get(i).copied(),
        GrpcForm::Snake => SNAKE.get(i).copied(),
        GrpcForm::Number => None,
    }
}

/// Whether the request is gRPC (Envoy's `Grpc::Common::isGrpcRequestHeaders`): it has a
/// `:path`, and its content type is `application/grpc` exactly or `application/grpc+…`
/// (so `application/grpc-web` is not).
pub fn is_grpc_request(path: Option<&[u8]>, content_type: Option<&[u8]>) -> bool {
    const GRPC: &[u8] = b"application/grpc";
    path.is_some()
        && content_type.is_some_and(|ct| ct.starts_with(GRPC) && (ct.len() == GRPC.len() || ct[GRPC.len()] == b'+'))
}

/// A `grpc-status` value as Envoy reads it (`Grpc::Common::getGrpcStatus` with user-defined
/// codes allowed): absent or empty → `None`; a base-10 `u64` (absl's `SimpleAtoi`: spaces
/// around it and a `+` allowed) → that number; anything else → -1 (`InvalidCode`).
pub fn parse_grpc_status(v: Option<&[u8]>) -> Option<i64> {
    let v = v.filter(|v| !v.is_empty())?;
    let t = v.trim_ascii();
    let t = t.strip_prefix(b"+").unwrap_or(t);
    if t.is_empty() || !t.iter().all(u8::is_ascii_digit) {
        return Some(-1);
    }
    // Out of u64 range is a failed parse; a u64 above i64::MAX wraps as Envoy's cast does.
    Some(std::str::from_utf8(t).ok().and_then(|s| s.parse::<u64>().ok()).map_or(-1, |n| n as i64))
}

/// The gRPC status an HTTP response code maps to (Envoy's `Grpc::Utility::httpToGrpcStatus`).
pub fn http_to_grpc_status(code: u32) -> i64 {
    match code {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    }
}

/// The part of a path before its query (Envoy's `stripQueryString`: up to the first `?`).
pub fn strip_query(path: &[u8]) -> &[u8] {
    path.iter().position(|&c| c == b'?').map_or(path, |i| &path[..i])
}

/// The first value of query parameter `key` in `path` (Envoy's
/// `QueryParamsMulti::parseAndDecodeQueryString` then `getFirstValue`): the query starts
/// after the first `?` and splits on `&`; each piece splits at its first `=` (none: the value
/// is empty); names and values are percent-decoded (`%XX` with two hex digits only; `+`
/// stays). Names compare after decoding.
pub fn query_param<'a>(path: &'a [u8], key: &[u8]) -> Option<Cow<'a, [u8]>> {
    let q = &path[path.iter().position(|&c| c == b'?')? + 1..];
    for piece in q.split(|&c| c == b'&') {
        let (name, value) = match piece.iter().position(|&c| c == b'=') {
            Some(i) => (&piece[..i], &piece[i + 1..]),
            None => (piece, &b""[..]),
        };
        if percent_decode(name).as_ref() == key {
            return Some(percent_decode(value));
        }
    }
    None
}

/// Where `%PATH(...)%` reads the path from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathSrc {
    /// `x-envoy-original-path` only (`ORIG`).
    Orig,
    /// `:path` only (`PATH`).
    Path,
    /// The original path when it is set and not empty, else `:path` (`ORIG_OR_PATH`, the
    /// default).
    OrigOrPath,
}

/// The arguments of `%PATH(WQ|NQ:ORIG|PATH|ORIG_OR_PATH)%` (Envoy's `PathFormatter::create`):
/// whether to strip the query, and where to read. Tokens past the second are ignored, as
/// Envoy's `parseSubcommand` does.
pub fn parse_path_arg(arg: Option<&str>) -> Result<(bool, PathSrc), String> {
    let mut it = arg.unwrap_or("").split(':');
    let strip = match it.next().unwrap_or("") {
        "" | "WQ" => false,
        "NQ" => true,
        other => return Err(format!("operator %PATH%: invalid option '{other}', only 'WQ'/'NQ' are allowed")),
    };
    let src = match it.next().unwrap_or("") {
        "" | "ORIG_OR_PATH" => PathSrc::OrigOrPath,
        "ORIG" => PathSrc::Orig,
        "PATH" => PathSrc::Path,
        other => {
            return Err(format!(
                "operator %PATH%: invalid option '{other}', only 'ORIG'/'PATH'/'ORIG_OR_PATH' are allowed"
            ))
        }
    };
    Ok((strip, src))
}

/// A host without its port (Envoy's `HeaderUtility::getPortStart`): up to the last `:`
/// unless that `:` sits inside an IPv6 literal's brackets.
pub fn strip_port(host: &[u8]) -> &[u8] {
    match host.iter().rposition(|&c| c == b':') {
        Some(i) if host.iter().rposition(|&c| c == b']').is_none_or(|j| j < i) => &host[..i],
        _ => host,
    }
}

/// A version 4 UUID from 16 random bytes, in the 8-4-4-4-12 lower-case form Envoy prints.
pub fn uuid4(mut b: [u8; 16]) -> Vec<u8> {
    b[6] = (b[6] & 0x0f) | 0x40; // version 4
    b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
    let mut out = Vec::with_capacity(36);
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out.push(b'-');
        }
        out.push(HEX[(byte >> 4) as usize]);
        out.push(HEX[(byte & 15) as usize]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_status_values_parse_as_envoy_reads_them() {
        assert_eq!(parse_grpc_status(None), None);
        assert_eq!(parse_grpc_status(Some(b"")), None);
        assert_eq!(parse_grpc_status(Some(b"0")), Some(0));
        assert_eq!(parse_grpc_status(Some(b"14")), Some(14));
        assert_eq!(parse_grpc_status(Some(b"99")), Some(99));
        assert_eq!(parse_grpc_status(Some(b" +5 ")), Some(5));
        assert_eq!(parse_grpc_status(Some(b"abc")), Some(-1));
        assert_eq!(parse_grpc_status(Some(b"-5")), Some(-1));
        assert_eq!(parse_grpc_status(Some(b"1x")), Some(-1));
        assert_eq!(parse_grpc_status(Some(b"99999999999999999999999")), Some(-1));
        assert_eq!(grpc_name(1, GrpcForm::Camel), Some("Canceled"));
        assert_eq!(grpc_name(1, GrpcForm::Snake), Some("CANCELLED"));
        assert_eq!(grpc_name(16, GrpcForm::Snake), Some("UNAUTHENTICATED"));
        assert_eq!(grpc_name(17, GrpcForm::Camel), None);
        assert_eq!(grpc_name(-1, GrpcForm::Camel), None);
        assert_eq!(grpc_name(4_294_967_297, GrpcForm::Snake), Some("CANCELLED"));
        assert_eq!(grpc_name(4_294_967_297, GrpcForm::Camel), None);
        assert!(is_grpc_request(Some(b"/a"), Some(b"application/grpc")));
        assert!(is_grpc_request(Some(b"/a"), Some(b"application/grpc+proto")));
        assert!(!is_grpc_request(Some(b"/a"), Some(b"application/grpc-web")));
        assert!(!is_grpc_request(None, Some(b"application/grpc")));
        assert!(!is_grpc_request(Some(b"/a"), None));
        assert_eq!(http_to_grpc_status(200), 2);
        assert_eq!(http_to_grpc_status(503), 14);
        assert_eq!(http_to_grpc_status(404), 12);
    }

    #[test]
    fn query_params_decode_as_envoy_does() {
        let p: &[u8] = b"/p?a=1&b=2&a=3&c=&d&e=x%20y+z&%61%26=amp&bad=%zz%4&f=a=b";
        let q = |k: &[u8]| query_param(p, k).map(|v| String::from_utf8(v.into_owned()).unwrap());
        assert_eq!(q(b"a").as_deref(), Some("1"));
        assert_eq!(q(b"c").as_deref(), Some(""));
        assert_eq!(q(b"d").as_deref(), Some(""));
        assert_eq!(q(b"e").as_deref(), Some("x y+z"));
        assert_eq!(q(b"a&").as_deref(), Some("amp"));
        assert_eq!(q(b"bad").as_deref(), Some("%zz%4"));
        assert_eq!(q(b"f").as_deref(), Some("a=b"));
        assert_eq!(q(b"z"), None);
        assert_eq!(query_param(b"/p", b"a"), None);
        assert_eq!(query_param(b"/p?", b"a"), None);
        assert!(matches!(query_param(b"/p?a=1", b"a"), Some(Cow::Borrowed(_))));
        assert_eq!(strip_query(b"/a/b?x=1?y"), b"/a/b");
        assert_eq!(strip_query(b"/a#f"), b"/a#f");
        assert_eq!(percent_decode(b"%41%4a%"), Cow::<[u8]>::Owned(b"AJ%".to_vec()));
    }

    #[test]
    fn ports_strip_and_uuids_have_their_shape() {
        assert_eq!(strip_port(b"example.com:443"), b"example.com");
        assert_eq!(strip_port(b"example.com"), b"example.com");
        assert_eq!(strip_port(b"10.0.0.1:80"), b"10.0.0.1");
        assert_eq!(strip_port(b"[::1]:80"), b"[::1]");
        assert_eq!(strip_port(b"[::1]"), b"[::1]");
        let u = String::from_utf8(uuid4([[0xff; 8], [0; 8]].concat().try_into().unwrap())).unwrap();
        assert_eq!(u, "ffffffff-ffff-4fff-8000-000000000000");
        let b = [0x0123_4567_89ab_cdef_u64.to_be_bytes(), 0xfedc_ba98_7654_3210_u64.to_be_bytes()].concat();
        let u = String::from_utf8(uuid4(b.try_into().unwrap())).unwrap();
        assert_eq!(u, "01234567-89ab-4def-bedc-ba9876543210");
    }

    #[test]
    fn path_arguments_follow_envoy() {
        assert_eq!(parse_path_arg(None), Ok((false, PathSrc::OrigOrPath)));
        assert_eq!(parse_path_arg(Some("NQ")), Ok((true, PathSrc::OrigOrPath)));
        assert_eq!(parse_path_arg(Some("WQ:ORIG")), Ok((false, PathSrc::Orig)));
        assert_eq!(parse_path_arg(Some("NQ:PATH:extra")), Ok((true, PathSrc::Path)));
        assert!(parse_path_arg(Some("nq")).unwrap_err().contains("'nq'"));
        assert!(parse_path_arg(Some("WQ:X")).unwrap_err().contains("'X'"));
    }
}
