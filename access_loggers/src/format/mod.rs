//! The format engine: Envoy's command operators (`%REQ(X?Y):N%`, `%START_TIME(fmt)%`, ...)
//! compiled once at config load into a plan of getter calls, rendered per record into a
//! caller-owned buffer. One engine for every logger (JSON today, OTLP bodies/attributes next).
//!
//! Rendering follows Envoy 1.40's `json_format`: a value that is exactly one operator is
//! typed (numbers as numbers, unavailable as `null`); a value mixing text and operators is a
//! string where unavailable operators print `-`; keys are emitted in sorted order.
use std::cell::Cell;

use envoy_obs_common::ffi::access_log::{
    timing as t, AddrField, Bytes, CertTime, HeaderKind, HeaderTable, MetaValue, SanField, StrField, Stream, Timing,
};

use envoy_obs_common::config::ConfigError;

pub mod escape;
mod request;
pub mod time;

use escape::{escape_into, quoted};
use request::{GrpcForm, PathSrc};
use time::TimeFormat;

/// A value an operator produced for one record.
pub enum Val<'a> {
    /// Not available (JSON `null`, text `-`).
    Null,
    /// Unsigned number.
    U(u64),
    /// Signed number.
    I(i64),
    /// Floating point number.
    F(f64),
    /// Boolean.
    B(bool),
    /// Bytes borrowed from Envoy or the plan.
    S(&'a [u8]),
    /// An IP (or other address string) and port, rendered `ip:port` / `[v6]:port`.
    Addr(&'a [u8], u32),
    /// A time, rendered with a compiled format.
    Time(i64, &'a TimeFormat),
    /// Response flags bitmask, short (`UF,URX`) or long names.
    Flags(u64, bool),
    /// Values assembled per record (SAN lists, decoded query values, UUIDs, rewritten details).
    Owned(Vec<u8>),
}

/// Short and long names of Envoy's response flags, by bit number.
pub const RESPONSE_FLAGS: [(&str, &str); 30] = [
    ("LH", "FailedLocalHealthCheck"),
    ("UH", "NoHealthyUpstream"),
    ("UT", "UpstreamRequestTimeout"),
    ("LR", "LocalReset"),
    ("UR", "UpstreamRemoteReset"),
    ("UF", "UpstreamConnectionFailure"),
    ("UC", "UpstreamConnectionTermination"),
    ("UO", "UpstreamOverflow"),
    ("NR", "NoRouteFound"),
    ("DI", "DelayInjected"),
    ("FI", "FaultInjected"),
    ("RL", "RateLimited"),
    ("UAEX", "UnauthorizedExternalService"),
    ("RLSE", "RateLimitServiceError"),
    ("DC", "DownstreamConnectionTermination"),
    ("URX", "UpstreamRetryLimitExceeded"),
    ("SI", "StreamIdleTimeout"),
    ("IH", "InvalidEnvoyRequestHeaders"),
    ("DPE", "DownstreamProtocolError"),
    ("UMSDR", "UpstreamMaxStreamDurationReached"),
    ("RFCF", "ResponseFromCacheFilter"),
    ("NFCF", "NoFilterConfigFound"),
    ("DT", "DurationTimeout"),
    ("UPE", "UpstreamProtocolError"),
    ("NC", "NoClusterFound"),
    ("OM", "OverloadManagerTerminated"),
    ("DF", "DnsResolutionFailed"),
    ("DO", "DropOverload"),
    ("DR", "DownstreamRemoteReset"),
    ("UDO", "UnconditionalDropOverload"),
];

const ACCESS_LOG_TYPES: [&str; 14] = [
    "NotSet",
    "TcpUpstreamConnected",
    "TcpPeriodic",
    "TcpConnectionEnd",
    "DownstreamStart",
    "DownstreamPeriodic",
    "DownstreamEnd",
    "UpstreamPoolReady",
    "UpstreamPeriodic",
    "UpstreamEnd",
    "DownstreamTunnelSuccessfullyEstablished",
    "UdpTunnelUpstreamConnected",
    "UdpPeriodic",
    "UdpSessionEnd",
];

/// Which part of the `traceparent` header an operator reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TraceField {
    TraceId,
    SpanId,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AddrForm {
    WithPort,
    WithoutPort,
    Port,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Num {
    BytesReceived,
    BytesSent,
    UpstreamWireSent,
    UpstreamWireReceived,
    DownstreamWireSent,
    DownstreamWireReceived,
    RequestHeadersBytes,
    ResponseHeadersBytes,
    ResponseTrailersBytes,
    ResponseCode,
    AttemptCount,
    ConnectionId,
    UpstreamConnectionId,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dur {
    Total,
    Request,
    RequestTx,
    Response,
    ResponseTx,
    PoolReady,
    /// `%DOWNSTREAM_HANDSHAKE_DURATION%`: the downstream TLS handshake's completion, from the
    /// request's start (negative on a connection that was set up before the request).
    Handshake,
    /// `%ROUNDTRIP_DURATION%`: the last downstream ack (HTTP/3), from the request's start.
    Roundtrip,
}

/// One operator, as the worker's capture reads it. Kept at 24 bytes (a [`Command`] at 32) so a
/// record's walk over the plan touches few cache lines: the worker runs ~70,000 instructions of
/// Envoy's between two records, which evict the plan, and each line it spans is fetched again
/// per record (callgrind's cache model: 18 of the capture's 25 L1 data misses a record were this
/// walk when a `Command` was 72 bytes). Large or rarely used payloads are boxed.
#[derive(Clone, Debug, PartialEq)]
#[repr(u8)]
enum Op {
    Header {
        kind: HeaderKind,
        names: Box<[Box<[u8]>]>,
    },
    /// (Boxed: only render reads the format.)
    StartTime(Box<TimeFormat>),
    Str(StrField),
    /// `%RESPONSE_CODE_DETAILS(ALLOW_WHITESPACES)%`: the details as they are.
    StrRaw(StrField),
    Num(Num),
    Dur(Dur),
    Addr(AddrField, AddrForm),
    Flags {
        long: bool,
    },
    Sans(SanField),
    Cert(CertTime, Box<TimeFormat>),
    Const(Option<Box<[u8]>>),
    AccessLogType,
    Trace(TraceField),
    /// The selected upstream host's address (`ip:port`), known even when the connect failed.
    UpstreamHost,
    /// Operators few maps use, boxed and evaluated out of line (`Command::eval_rare`): the
    /// render-side dispatch is smaller for it (callgrind, render_cost: 42 instructions a record);
    /// capture gained nothing measurable.
    Rare(Box<Rare>),
}

/// The less common operators (see [`Op::Rare`]).
#[derive(Clone, Debug, PartialEq)]
enum Rare {
    /// `%GRPC_STATUS(...)%` and `%GRPC_STATUS_NUMBER%`.
    GrpcStatus(GrpcForm),
    /// `%QUERY_PARAM(key)%`: the first value of `key` in `:path`'s query, percent-decoded.
    QueryParam(Vec<u8>),
    /// `%PATH(WQ|NQ:ORIG|PATH|ORIG_OR_PATH)%`.
    Path { strip_query: bool, src: PathSrc },
    /// `%REQ_WITHOUT_QUERY(X?Y)%`: a request header up to its first `?`.
    HeaderNoQuery(Vec<Vec<u8>>),
    /// `%EMIT_TIME%` / `%EMIT_TIME_LOCAL%`: when the record is logged.
    EmitTime(TimeFormat),
    /// `%UPSTREAM_HOST_NAME_WITHOUT_PORT%`.
    UpstreamHostNameNoPort,
    /// `%COALESCE({"operators": [...]})%`: the first operator's value that is available. An
    /// empty string counts as available, as Envoy 1.40 has it (checked on its binary; later
    /// Envoy versions pass over empty strings too).
    Coalesce(Vec<Command>),
    /// `%UNIQUE_ID%`: a random (version 4) UUID per record.
    UniqueId,
    /// `%COMMON_DURATION(START:END:PRECISION)%`: between two of the stream's time points
    /// (timing indices; 0 is the request's start), in units of `div` ns.
    CommonDur { beg: usize, end: usize, div: i64 },
    /// `%DYNAMIC_METADATA(NS:KEY:...)%`: a string, number or bool under `ns` at the dotted `path`.
    DynMeta { ns: Vec<u8>, path: Vec<u8> },
}

/// One `%COMMAND(arg):N%`.
#[derive(Clone, Debug, PartialEq)]
pub struct Command {
    op: Op,
    /// The `:N` length (values are far below 4 GiB, so a larger N acts as 2^32-1 would).
    max: Option<u32>,
}

#[derive(Clone, Debug, PartialEq)]
#[repr(u8)]
enum Part {
    Text(Vec<u8>),
    Cmd(Command),
}

/// A compiled format string.
#[derive(Clone, Debug, PartialEq)]
pub struct Template {
    parts: Vec<Part>,
}

/// Operators Envoy has but the 1.40 dynamic-module ABI cannot serve to an access logger.
const UNSERVABLE: &[&str] = &[
    "FILTER_STATE",
    "UPSTREAM_FILTER_STATE",
    "CEL",
    "METADATA",
    "CLUSTER_METADATA",
    "UPSTREAM_METADATA",
    "ROUTE_METADATA",
    "VIRTUAL_CLUSTER_NAME",
    "CUSTOM_FLAGS",
    "STREAM_INFO_REQ",
    "FILTER_CHAIN_NAME",
    "XFCC_VALUE",
    "BYTES_RETRANSMITTED",
    "PACKETS_RETRANSMITTED",
    "UPSTREAM_HEADER_BYTES_SENT",
    "UPSTREAM_HEADER_BYTES_RECEIVED",
    "DOWNSTREAM_HEADER_BYTES_SENT",
    "DOWNSTREAM_HEADER_BYTES_RECEIVED",
    "UPSTREAM_DECOMPRESSED_HEADER_BYTES_SENT",
    "UPSTREAM_DECOMPRESSED_HEADER_BYTES_RECEIVED",
    "DOWNSTREAM_DECOMPRESSED_HEADER_BYTES_SENT",
    "DOWNSTREAM_DECOMPRESSED_HEADER_BYTES_RECEIVED",
    "DOWNSTREAM_PEER_CERT",
    "UPSTREAM_PEER_CERT",
    "DOWNSTREAM_PEER_IP_SAN",
    "DOWNSTREAM_PEER_EMAIL_SAN",
    "DOWNSTREAM_PEER_OTHERNAME_SAN",
    "DOWNSTREAM_LOCAL_IP_SAN",
    "DOWNSTREAM_LOCAL_EMAIL_SAN",
    "DOWNSTREAM_LOCAL_OTHERNAME_SAN",
    "UPSTREAM_PEER_IP_SAN",
    "UPSTREAM_LOCAL_IP_SAN",
    "DOWNSTREAM_PEER_CHAIN_FINGERPRINTS_256",
    "DOWNSTREAM_PEER_CHAIN_FINGERPRINTS_1",
    "DOWNSTREAM_PEER_CHAIN_SERIALS",
];

impl Template {
    /// Compiles a format string. Errors name the offending operator.
    pub fn compile(s: &str) -> Result<Template, String> {
        let b = s.as_bytes();
        let mut parts = Vec::new();
        let mut text = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] != b'%' {
                text.push(b[i]);
                i += 1;
                continue;
            }
            // `%%` is a literal percent sign, as in Envoy's format strings.
            if b.get(i + 1) == Some(&b'%') {
                text.push(b'%');
                i += 2;
                continue;
            }
            let (cmd, next) = parse_command(s, i)?;
            if !text.is_empty() {
                parts.push(Part::Text(std::mem::take(&mut text)));
            }
            parts.push(Part::Cmd(cmd));
            i = next;
        }
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        Ok(Template { parts })
    }

    /// The command, when the template is exactly one command (rendered typed in JSON).
    pub fn single(&self) -> Option<&Command> {
        match self.parts.as_slice() {
            [Part::Cmd(c)] => Some(c),
            _ => None,
        }
    }

    /// The text, when the template has no command at all (`%%` read as `%`).
    pub fn literal(&self) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.extend_from_slice(t),
                Part::Cmd(_) => return None,
            }
        }
        Some(out)
    }

    /// Renders as text from captured values: unavailable operators print `-` (or nothing
    /// when `omit_empty`).
    pub fn write_text<'a>(&'a self, vals: &mut Decoder<'a>, omit_empty: bool, out: &mut Vec<u8>) {
        for p in &self.parts {
            match p {
                Part::Text(t) => out.extend_from_slice(t),
                Part::Cmd(c) => c.write_text(vals.next(c), omit_empty, out),
            }
        }
    }

    /// [`Template::write_text`] as the inside of a JSON string. Each value is escaped on its
    /// own, as Envoy does: a value that is not valid UTF-8 gets every byte from 0x80 up as
    /// `\u00XX`, while the text and the other values around it keep their UTF-8.
    pub fn write_json_text<'a>(
        &'a self,
        vals: &mut Decoder<'a>,
        omit_empty: bool,
        scratch: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) {
        for p in &self.parts {
            match p {
                Part::Text(t) => escape_into(t, out),
                Part::Cmd(c) => {
                    scratch.clear();
                    c.write_text(vals.next(c), omit_empty, scratch);
                    escape_into(scratch, out);
                }
            }
        }
    }

    /// The commands, in order.
    fn commands(&self) -> impl Iterator<Item = &Command> {
        self.parts.iter().filter_map(|p| match p {
            Part::Cmd(c) => Some(c),
            Part::Text(_) => None,
        })
    }
}

/// A plan's operators flattened into capture order: per record the worker walks this one
/// contiguous array rather than the plan's tree of maps and templates (fewer branches and
/// cache lines touched on a path that runs cold between requests).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Program {
    ops: Vec<Command>,
}

impl Program {
    /// Appends one command.
    pub fn push(&mut self, c: &Command) {
        self.ops.push(c.clone());
    }

    /// Appends every command of a template.
    pub fn push_template(&mut self, t: &Template) {
        self.ops.extend(t.commands().cloned());
    }

    /// Header lookups one record makes: (request, response).
    pub fn header_lookups(&self) -> (usize, usize) {
        sum_lookups(&self.ops)
    }

    /// Appends every command's captured value (worker side).
    #[inline]
    pub fn capture<S: Stream>(&self, cx: &Ctx<'_, S>, out: &mut Vec<u8>) {
        for c in &self.ops {
            c.capture(cx, out);
        }
    }
}

/// Per-record evaluation context: the stream plus lazily fetched fixed-size structs shared
/// by several operators (so a record calls `get_timing_info_v2` at most once).
pub struct Ctx<'s, S: Stream> {
    /// The stream being logged.
    pub stream: &'s S,
    /// Envoy's access_log_type for this call.
    pub log_type: u32,
    timing: Cell<Option<Timing>>,
    bytes: Cell<Option<Bytes>>,
    wire: Cell<Option<(u64, u64)>>,
    /// Header maps fetched in one call each (request, response), for plans that read them.
    bulk: BulkHeaders,
    request_headers: std::cell::RefCell<HeaderTable<'s>>,
    request_headers_fetched: Cell<bool>,
    response_headers: std::cell::RefCell<HeaderTable<'s>>,
    response_headers_fetched: Cell<bool>,
}

impl<'s, S: Stream> Ctx<'s, S> {
    /// A context for one record that looks headers up one by one.
    pub fn new(stream: &'s S, log_type: u32) -> Self {
        Self::with_bulk(stream, log_type, BulkHeaders::default())
    }

    /// A context for one record reading the header maps `bulk` names through one bulk call
    /// each instead of one lookup per operator (see [`JsonPlan::bulk_headers`]). Built in place:
    /// the context holds two inline header tables, too large to move around per record.
    #[inline(always)]
    pub fn with_bulk(stream: &'s S, log_type: u32, bulk: BulkHeaders) -> Self {
        Ctx {
            stream,
            log_type,
            timing: Cell::new(None),
            bytes: Cell::new(None),
            wire: Cell::new(None),
            bulk,
            request_headers: std::cell::RefCell::new(HeaderTable::default()),
            request_headers_fetched: Cell::new(false),
            response_headers: std::cell::RefCell::new(HeaderTable::default()),
            response_headers_fetched: Cell::new(false),
        }
    }

    /// The first value of header `name`: from the bulk-fetched map when the plan reads this
    /// map whole, else through one lookup.
    pub(crate) fn header(&self, kind: HeaderKind, name: &[u8]) -> Option<&'s [u8]> {
        let (table, fetched) = match kind {
            HeaderKind::Request if self.bulk.request => (&self.request_headers, &self.request_headers_fetched),
            HeaderKind::Response if self.bulk.response => (&self.response_headers, &self.response_headers_fetched),
            _ => return self.stream.header(kind, name),
        };
        if !fetched.replace(true) {
            self.stream.headers(kind, &mut table.borrow_mut());
        }
        table.borrow().get(name)
    }

    /// `%DURATION%` in ns: the request's whole duration, or for one still in progress
    /// (periodic and start-of-request records) its duration so far, as Envoy's
    /// `currentDuration()` gives. The `duration_ms` filter reads the same.
    pub fn duration_ns(&self) -> Option<i64> {
        let tm = self.timing();
        tm.get(t::REQUEST_COMPLETE).or_else(|| {
            let start = tm.get(t::START_TIME_UNIX_NS)?;
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).ok()?;
            Some((now.as_nanos() as i64 - start).max(0))
        })
    }

    /// Timing, fetched once.
    pub fn timing(&self) -> Timing {
        if let Some(t) = self.timing.get() {
            return t;
        }
        let t = self.stream.timing();
        self.timing.set(Some(t));
        t
    }
    fn bytes(&self) -> Bytes {
        if let Some(b) = self.bytes.get() {
            return b;
        }
        let b = self.stream.bytes();
        self.bytes.set(Some(b));
        b
    }
    fn downstream_wire(&self) -> (u64, u64) {
        if let Some(w) = self.wire.get() {
            return w;
        }
        let w = self.stream.downstream_wire_bytes();
        self.wire.set(Some(w));
        w
    }
}

fn ms(ns: i64) -> Val<'static> {
    // Envoy truncates (duration_cast<milliseconds>).
    Val::I(ns / 1_000_000)
}

/// The id `f` of a valid `traceparent`, as the lower-case hex it came in.
fn traceparent_id(v: &[u8], f: TraceField) -> Option<&[u8]> {
    envoy_obs_common::w3c::parse_traceparent(v)?;
    let v = envoy_obs_common::w3c::trim(v);
    Some(match f {
        TraceField::TraceId => &v[3..35],
        TraceField::SpanId => &v[36..52],
    })
}

impl Command {
    /// The `:N` length, if any.
    #[inline]
    fn max_len(&self) -> Option<usize> {
        self.max.map(|n| n as usize)
    }

    /// Evaluates the operator for the current record (inlined into [`Command::capture`], its
    /// only caller, so the intermediate [`Val`] folds away).
    #[inline(always)]
    pub fn eval<'a, S: Stream>(&'a self, cx: &'a Ctx<'_, S>) -> Val<'a> {
        let s = cx.stream;
        match &self.op {
            Op::Header { kind, names } => {
                for n in names {
                    let v = cx.header(*kind, n);
                    if let Some(v) = v {
                        return Val::S(v);
                    }
                }
                Val::Null
            }
            Op::StartTime(f) => match cx.timing().get(t::START_TIME_UNIX_NS) {
                Some(ns) => Val::Time(ns, f),
                None => Val::Null,
            },
            Op::StrRaw(f) => s.string(*f).map_or(Val::Null, Val::S),
            Op::Str(f) => match (f, s.string(*f)) {
                // Envoy prints an absent local reply body as "", not null.
                (StrField::LocalReplyBody, None) => Val::S(b""),
                // Envoy's formatter has these as unavailable when empty (a route without a
                // name, most often).
                (
                    StrField::RouteName
                    | StrField::UpstreamCluster
                    | StrField::RequestedServerName
                    | StrField::UpstreamTransportFailureReason
                    | StrField::DownstreamTransportFailureReason,
                    Some(b""),
                ) => Val::Null,
                // A host without a hostname (a STATIC endpoint) is named by its address.
                (StrField::UpstreamHostName, Some(b"")) => {
                    s.address(AddrField::UpstreamRemote).map_or(Val::Null, |(ip, port)| Val::Addr(ip, port))
                }
                // Envoy's formatter turns spaces into '_' in failure reasons.
                (StrField::UpstreamTransportFailureReason | StrField::DownstreamTransportFailureReason, Some(v))
                    if v.contains(&b' ') =>
                {
                    Val::Owned(v.iter().map(|&c| if c == b' ' { b'_' } else { c }).collect())
                }
                // Whitespace becomes '_' (StringUtil::replaceAllEmptySpace) unless the operator
                // says ALLOW_WHITESPACES.
                (StrField::ResponseCodeDetails, Some(v))
                    if v.iter().any(u8::is_ascii_whitespace) || v.contains(&0x0b) =>
                {
                    Val::Owned(v.iter().map(|&c| if c.is_ascii_whitespace() || c == 0x0b { b'_' } else { c }).collect())
                }
                // An SNI with characters a hostname cannot have: each one becomes '_' and the
                // whole is marked `invalid:` (StringUtil::sanitizeInvalidHostname).
                (StrField::RequestedServerName, Some(v))
                    if !v.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'.' || c == b'-') =>
                {
                    let mut o = b"invalid:".to_vec();
                    o.extend(
                        v.iter().map(|&c| if c.is_ascii_alphanumeric() || c == b'.' || c == b'-' { c } else { b'_' }),
                    );
                    Val::Owned(o)
                }
                (_, v) => v.map_or(Val::Null, Val::S),
            },
            Op::Num(n) => {
                let b = || cx.bytes();
                Val::U(match n {
                    Num::BytesReceived => b().received,
                    Num::BytesSent => b().sent,
                    Num::UpstreamWireSent => b().upstream_wire_sent,
                    Num::UpstreamWireReceived => b().upstream_wire_received,
                    Num::DownstreamWireSent => cx.downstream_wire().1,
                    Num::DownstreamWireReceived => cx.downstream_wire().0,
                    Num::RequestHeadersBytes => s.request_headers_bytes(),
                    Num::ResponseHeadersBytes => s.response_headers_bytes(),
                    Num::ResponseTrailersBytes => s.response_trailers_bytes(),
                    Num::ResponseCode => s.response_code() as u64,
                    Num::AttemptCount => s.attempt_count() as u64,
                    Num::ConnectionId => s.connection_id(),
                    Num::UpstreamConnectionId => s.upstream_connection_id(),
                })
            }
            Op::Dur(d) => {
                let tm = || cx.timing();
                let v = match d {
                    Dur::Total => cx.duration_ns(),
                    Dur::Request => tm().get(t::LAST_DOWNSTREAM_RX),
                    Dur::RequestTx => tm().get(t::LAST_UPSTREAM_TX),
                    Dur::Response => tm().get(t::FIRST_UPSTREAM_RX),
                    Dur::ResponseTx => {
                        let tm = tm();
                        match (tm.get(t::LAST_DOWNSTREAM_TX), tm.get(t::FIRST_UPSTREAM_RX)) {
                            (Some(a), Some(b)) => Some(a - b),
                            _ => None,
                        }
                    }
                    Dur::PoolReady => s.pool_ready_ns(),
                    Dur::Handshake => tm().get(t::DOWNSTREAM_HANDSHAKE_COMPLETE),
                    Dur::Roundtrip => tm().get(t::LAST_DOWNSTREAM_ACK),
                };
                v.map_or(Val::Null, ms)
            }
            // Envoy records the upstream remote address when a connection is handed over, at the
            // same time as the local one; the ABI answers from the selected host even when the
            // connection failed. Follow Envoy: no local address, no remote address.
            Op::Addr(AddrField::UpstreamRemote, _) if s.address(AddrField::UpstreamLocal).is_none() => Val::Null,
            Op::Addr(f, form) => match s.address(*f) {
                None => Val::Null,
                Some((ip, port)) => match form {
                    AddrForm::WithPort => Val::Addr(ip, port),
                    AddrForm::WithoutPort => Val::S(ip),
                    AddrForm::Port => Val::U(port as u64),
                },
            },
            Op::Flags { long } => Val::Flags(flags_of(cx), *long),
            // The ABI's upstream remote address reports the selected host (one cheap call;
            // the `upstream.address` attribute costs Envoy a string build).
            Op::UpstreamHost => {
                s.address(AddrField::UpstreamRemote).map_or(Val::Null, |(ip, port)| Val::Addr(ip, port))
            }
            Op::Sans(f) => {
                let mut v = Vec::new();
                s.sans(*f, &mut v);
                if v.is_empty() {
                    Val::Null
                } else {
                    Val::Owned(v.join(&b","[..]))
                }
            }
            // Certificates may say "valid until 9999-12-31" (RFC 5280's no-expiry date), past
            // what nanoseconds in an i64 reach (2262): such a time is unavailable, not wrapped.
            Op::Cert(c, f) => s
                .cert_time(*c)
                .and_then(|secs| secs.checked_mul(1_000_000_000))
                .map_or(Val::Null, |ns| Val::Time(ns, f)),
            Op::Const(v) => v.as_deref().map_or(Val::Null, Val::S),
            Op::AccessLogType => {
                Val::S(ACCESS_LOG_TYPES.get(cx.log_type as usize).copied().unwrap_or("NotSet").as_bytes())
            }
            Op::Trace(f) => cx
                .header(HeaderKind::Request, b"traceparent")
                .and_then(|v| traceparent_id(v, *f))
                .map_or(Val::Null, Val::S),
            Op::Rare(r) => self.eval_rare(r, cx),
        }
    }

    /// [`Command::eval`] of the less common operators, kept out of line.
    #[inline(never)]
    fn eval_rare<'a, S: Stream>(&'a self, r: &'a Rare, cx: &'a Ctx<'_, S>) -> Val<'a> {
        let s = cx.stream;
        match r {
            Rare::DynMeta { ns, path } => match s.dynamic_metadata(ns, path) {
                Some(MetaValue::Str(v)) => Val::S(v),
                Some(MetaValue::Num(n)) => Val::F(n),
                Some(MetaValue::Bool(b)) => Val::B(b),
                None => Val::Null,
            },
            // The hostname, or the host's address when it has none, without its port
            // (Envoy's HeaderUtility::stripPortFromHost).
            Rare::UpstreamHostNameNoPort => match s.string(StrField::UpstreamHostName) {
                None => Val::Null,
                Some(b"") => match s.address(AddrField::UpstreamRemote) {
                    None => Val::Null,
                    Some((ip, _)) if ip.contains(&b':') => Val::Owned([b"[", ip, b"]"].concat()),
                    Some((ip, _)) => Val::S(ip),
                },
                Some(h) => Val::S(request::strip_port(h)),
            },
            Rare::Coalesce(cmds) => {
                cmds.iter().map(|c| c.eval_capped(cx)).find(|v| !matches!(v, Val::Null)).unwrap_or(Val::Null)
            }
            Rare::UniqueId => {
                let mut b = [0u8; 16];
                envoy_obs_common::rand::fill_random(&mut b);
                Val::Owned(request::uuid4(b))
            }
            Rare::CommonDur { beg, end, div } => {
                let tm = cx.timing();
                // Index 0 holds the absolute start; the others are offsets from it.
                let point = |i: usize| if i == t::START_TIME_UNIX_NS { tm.get(i).map(|_| 0) } else { tm.get(i) };
                match (point(*beg), point(*end)) {
                    (Some(b), Some(e)) if e >= b => Val::I((e - b) / div),
                    _ => Val::Null,
                }
            }
            Rare::GrpcStatus(form) => match grpc_status(cx) {
                None => Val::Null,
                Some(code) if *form == GrpcForm::Number => Val::I(code),
                Some(code) => match request::grpc_name(code, *form) {
                    Some(name) => Val::S(name.as_bytes()),
                    None => Val::Owned(itoa::Buffer::new().format(code).as_bytes().to_vec()),
                },
            },
            Rare::QueryParam(key) => {
                match cx.header(HeaderKind::Request, b":path").and_then(|p| request::query_param(p, key)) {
                    None => Val::Null,
                    Some(std::borrow::Cow::Borrowed(v)) => Val::S(v),
                    Some(std::borrow::Cow::Owned(v)) => Val::Owned(v),
                }
            }
            Rare::Path { strip_query, src } => {
                let orig = || cx.header(HeaderKind::Request, b"x-envoy-original-path").filter(|v| !v.is_empty());
                let path = || cx.header(HeaderKind::Request, b":path");
                let v = match src {
                    PathSrc::Orig => orig(),
                    PathSrc::Path => path(),
                    PathSrc::OrigOrPath => orig().or_else(path),
                };
                // Empty is unavailable before the query is cut off (Envoy's PathFormatter): a
                // path of only a query prints as "".
                match v {
                    Some(v) if !v.is_empty() => Val::S(if *strip_query { request::strip_query(v) } else { v }),
                    _ => Val::Null,
                }
            }
            Rare::HeaderNoQuery(names) => names
                .iter()
                .find_map(|n| cx.header(HeaderKind::Request, n))
                .map_or(Val::Null, |v| Val::S(request::strip_query(v))),
            Rare::EmitTime(f) => {
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
                now.map_or(Val::Null, |d| Val::Time(d.as_nanos() as i64, f))
            }
        }
    }

    /// Evaluates as a `COALESCE` candidate: its own `max_length` applied to strings, and times
    /// and flags rendered to text now (the captured record keeps only the outer operator's
    /// rendering options).
    fn eval_capped<'a, S: Stream>(&'a self, cx: &'a Ctx<'_, S>) -> Val<'a> {
        match self.eval(cx) {
            v @ (Val::Time(..) | Val::Flags(..)) => {
                let mut out = Vec::new();
                self.write_text(v, false, &mut out);
                Val::Owned(out)
            }
            Val::S(b) => Val::S(&b[..self.max_len().map_or(b.len(), |m| m.min(b.len()))]),
            Val::Owned(mut b) => {
                b.truncate(self.max_len().unwrap_or(usize::MAX));
                Val::Owned(b)
            }
            v => v,
        }
    }

    /// Appends the JSON rendering (typed). Returns false (and writes nothing) when the value
    /// is unavailable (`null`) and `omit_empty` asks to leave such values out — as Envoy does,
    /// an empty string is a value and stays.
    pub fn write_json(&self, v: Val<'_>, omit_empty: bool, out: &mut Vec<u8>) -> bool {
        if omit_empty && matches!(v, Val::Null) {
            return false;
        }
        if let Some(max) = self.max_len() {
            if is_stringish(&v) {
                let start = out.len();
                write_text_val(&v, false, out);
                let text: Vec<u8> = out.drain(start..).take(max).collect();
                quoted(&text, out);
                return true;
            }
        }
        write_json_val(&v, out);
        true
    }

    /// Reads this command's captured value and appends its JSON: the common tags (null,
    /// numbers, plain strings) straight from the record, everything else through [`Val`].
    #[inline]
    pub fn render_json<'a>(&'a self, vals: &mut Decoder<'a>, omit_empty: bool, out: &mut Vec<u8>) -> bool {
        if self.max_len().is_none() {
            match vals.peek_tag() {
                Some(tag::NULL) => {
                    vals.pos += 1;
                    if omit_empty {
                        return false;
                    }
                    out.extend_from_slice(b"null");
                    return true;
                }
                Some(tag::U64) => {
                    if let Some(n) = vals.fixed::<8>() {
                        out.extend_from_slice(itoa::Buffer::new().format(u64::from_le_bytes(n)).as_bytes());
                        return true;
                    }
                }
                Some(tag::I64) => {
                    if let Some(n) = vals.fixed::<8>() {
                        out.extend_from_slice(itoa::Buffer::new().format(i64::from_le_bytes(n)).as_bytes());
                        return true;
                    }
                }
                Some(tag::BYTES) => {
                    if let Some(b) = vals.bytes() {
                        quoted(b, out);
                        return true;
                    }
                }
                _ => {}
            }
        }
        self.write_json(vals.next(self), omit_empty, out)
    }

    /// Appends the text rendering.
    pub fn write_text(&self, v: Val<'_>, omit_empty: bool, out: &mut Vec<u8>) {
        let start = out.len();
        write_text_val(&v, omit_empty, out);
        if let Some(max) = self.max_len() {
            // COALESCE cuts its text whatever the value's type (`c=%COALESCE(...):1%` of a 200
            // prints `c=2` in Envoy 1.40); the others cut strings only.
            let cut_any = matches!(&self.op, Op::Rare(r) if matches!(**r, Rare::Coalesce(_)));
            if (cut_any || is_stringish(&v)) && out.len() - start > max {
                out.truncate(start + max);
            }
        }
    }
}

impl Command {
    /// Evaluates the operator and appends its value in the capture encoding (worker side):
    /// raw bytes and numbers only; escaping, number and time formatting happen at render.
    #[inline]
    pub fn capture<S: Stream>(&self, cx: &Ctx<'_, S>, out: &mut Vec<u8>) {
        let v = self.eval(cx);
        let cap = |b: &[u8]| match self.max_len() {
            Some(m) if b.len() > m => m,
            _ => b.len(),
        };
        match v {
            Val::Null => out.push(tag::NULL),
            Val::U(n) => {
                out.push(tag::U64);
                out.extend_from_slice(&n.to_le_bytes());
            }
            Val::I(n) => {
                out.push(tag::I64);
                out.extend_from_slice(&n.to_le_bytes());
            }
            Val::F(f) => {
                out.push(tag::F64);
                out.extend_from_slice(&f.to_le_bytes());
            }
            Val::B(b) => out.extend_from_slice(&[tag::BOOL, b as u8]),
            Val::S(b) => put_bytes(out, &b[..cap(b)]),
            Val::Owned(b) => put_bytes(out, &b[..cap(&b)]),
            Val::Addr(ip, port) => {
                out.push(tag::ADDR);
                out.extend_from_slice(&port.to_le_bytes());
                out.extend_from_slice(&(ip.len() as u32).to_le_bytes());
                out.extend_from_slice(ip);
            }
            Val::Time(ns, _) => {
                out.push(tag::TIME);
                out.extend_from_slice(&ns.to_le_bytes());
            }
            Val::Flags(bits, _) => {
                out.push(tag::FLAGS);
                out.extend_from_slice(&bits.to_le_bytes());
            }
        }
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    // Values over 4 GiB cannot occur (Envoy caps headers far below); clamp rather than wrap.
    let b = &b[..b.len().min(u32::MAX as usize)];
    out.push(tag::BYTES);
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

/// Tags of the capture encoding.
mod tag {
    pub const NULL: u8 = 0;
    pub const U64: u8 = 1;
    pub const I64: u8 = 2;
    pub const F64: u8 = 3;
    pub const BOOL: u8 = 4;
    pub const BYTES: u8 = 5;
    pub const ADDR: u8 = 6;
    pub const TIME: u8 = 7;
    pub const FLAGS: u8 = 8;
}

/// Reads captured values back, in capture order (flush-thread side). A truncated or corrupt
/// record yields `Null`s, never a panic.
pub struct Decoder<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Decoder<'a> {
    /// A decoder over one captured record.
    pub fn new(buf: &'a [u8]) -> Self {
        Decoder { buf, pos: 0 }
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn peek_tag(&self) -> Option<u8> {
        self.buf.get(self.pos).copied()
    }

    /// Tag byte plus `N` payload bytes; consumed only when complete.
    #[inline]
    fn fixed<const N: usize>(&mut self) -> Option<[u8; N]> {
        let v: [u8; N] = self.buf.get(self.pos + 1..self.pos + 1 + N)?.try_into().ok()?;
        self.pos += 1 + N;
        Some(v)
    }

    /// Tag byte, 4-byte length and that many bytes; consumed only when complete.
    #[inline]
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len: [u8; 4] = self.buf.get(self.pos + 1..self.pos + 5)?.try_into().ok()?;
        let start = self.pos + 5;
        let b = self.buf.get(start..start.checked_add(u32::from_le_bytes(len) as usize)?)?;
        self.pos = start + b.len();
        Some(b)
    }

    /// The next value, interpreted for `cmd` (whose compiled options give time formats and
    /// flag styles).
    pub fn next(&mut self, cmd: &'a Command) -> Val<'a> {
        self.try_next(cmd).unwrap_or(Val::Null)
    }

    fn try_next(&mut self, cmd: &'a Command) -> Option<Val<'a>> {
        let t = *self.take(1)?.first()?;
        Some(match t {
            tag::NULL => Val::Null,
            tag::U64 => Val::U(self.u64()?),
            tag::I64 => Val::I(self.u64()? as i64),
            tag::F64 => Val::F(f64::from_bits(self.u64()?)),
            tag::BOOL => Val::B(self.take(1)?[0] != 0),
            tag::BYTES => {
                let n = self.u32()? as usize;
                Val::S(self.take(n)?)
            }
            tag::ADDR => {
                let port = self.u32()?;
                let n = self.u32()? as usize;
                Val::Addr(self.take(n)?, port)
            }
            tag::TIME => {
                let ns = self.u64()? as i64;
                match &cmd.op {
                    Op::StartTime(f) | Op::Cert(_, f) => Val::Time(ns, f),
                    Op::Rare(r) => match &**r {
                        Rare::EmitTime(f) => Val::Time(ns, f),
                        _ => Val::Null,
                    },
                    _ => Val::Null,
                }
            }
            tag::FLAGS => {
                let bits = self.u64()?;
                match cmd.op {
                    Op::Flags { long } => Val::Flags(bits, long),
                    _ => Val::Null,
                }
            }
            _ => {
                self.pos = self.buf.len();
                return None;
            }
        })
    }
}

fn is_stringish(v: &Val<'_>) -> bool {
    matches!(v, Val::S(_) | Val::Addr(..) | Val::Time(..) | Val::Flags(..) | Val::Owned(_))
}

fn write_addr(ip: &[u8], port: u32, out: &mut Vec<u8>) {
    let v6 = ip.contains(&b':');
    if v6 {
        out.push(b'[');
    }
    out.extend_from_slice(ip);
    if v6 {
        out.push(b']');
    }
    out.push(b':');
    out.extend_from_slice(itoa::Buffer::new().format(port).as_bytes());
}

/// Bits of the flags the router sets before the failure it then reports (a retry limit reached,
/// a retry overflow): Envoy prints flags in the order they were set (`URX,UF`); the ABI gives
/// a bitmask, so these go first and the rest follow in bit order.
const FLAGS_SET_FIRST: [usize; 2] = [15, 7];

/// Marks a captured flag set of a TCP proxy's record (a bit no response flag uses). The TCP
/// proxy sets the failure before the retry limit (`UF,URX`), so its flags print in bit order.
const FLAGS_TCP: u64 = 1 << 63;

/// The response flags of the record, marked with [`FLAGS_TCP`] when a TCP proxy logs it.
fn flags_of<S: Stream>(cx: &Ctx<'_, S>) -> u64 {
    let bits = cx.stream.response_flags() & !FLAGS_TCP;
    // ACCESS_LOG_TYPES 1..=3: TcpUpstreamConnected, TcpPeriodic, TcpConnectionEnd.
    if (1..=3).contains(&cx.log_type) {
        bits | FLAGS_TCP
    } else {
        bits
    }
}

fn write_flags(bits: u64, long: bool, out: &mut Vec<u8>) {
    let tcp = bits & FLAGS_TCP != 0;
    let bits = bits & !FLAGS_TCP;
    if bits == 0 {
        out.push(b'-');
        return;
    }
    let first: &[usize] = if tcp { &[] } else { &FLAGS_SET_FIRST };
    let order = first.iter().copied().chain((0..RESPONSE_FLAGS.len()).filter(|i| !first.contains(i)));
    let mut first = true;
    for i in order {
        if bits & (1u64 << i) != 0 {
            if !first {
                out.push(b',');
            }
            first = false;
            let (short, long_name) = RESPONSE_FLAGS[i];
            out.extend_from_slice(if long { long_name.as_bytes() } else { short.as_bytes() });
        }
    }
}

fn write_f64(f: f64, out: &mut Vec<u8>) -> bool {
    if !f.is_finite() {
        return false;
    }
    use std::io::Write;
    let _ = write!(out, "{f}");
    true
}

/// An integer literal of `json_format` as Envoy 1.40 prints it: the Struct holds it as a
/// double, written through `std::to_chars`, the shorter of its plain and scientific forms
/// (plain on a tie). So `123456` stays, but `100000` is `1e+05` and `-3000000` is `-3e+06`;
/// only numbers with five or more trailing zeros (or past 2^53) differ from plain digits.
/// (Numeric operators such as `%BYTES_SENT%` print plain digits: checked against the binary.)
pub fn json_int(n: i128, out: &mut Vec<u8>) {
    const EXACT: i128 = 1 << 53;
    if n == 0 || (n % 100_000 != 0 && n.abs() < EXACT) {
        out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
        return;
    }
    use std::io::Write;
    let f = n as f64;
    let plain = format!("{f}");
    let sci = format!("{f:e}");
    let sci = match sci.split_once('e') {
        Some((mantissa, exp)) => {
            let (sign, digits) = exp.strip_prefix('-').map_or(('+', exp), |d| ('-', d));
            format!("{mantissa}e{sign}{digits:0>2}")
        }
        None => sci,
    };
    let _ = write!(out, "{}", if sci.len() < plain.len() { sci } else { plain });
}

fn write_json_val(v: &Val<'_>, out: &mut Vec<u8>) {
    match v {
        Val::Null => out.extend_from_slice(b"null"),
        Val::U(n) => out.extend_from_slice(itoa::Buffer::new().format(*n).as_bytes()),
        Val::I(n) => out.extend_from_slice(itoa::Buffer::new().format(*n).as_bytes()),
        Val::F(f) => {
            if !write_f64(*f, out) {
                out.extend_from_slice(b"null")
            }
        }
        Val::B(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Val::S(s) => quoted(s, out),
        Val::Owned(s) => quoted(s, out),
        Val::Addr(..) | Val::Time(..) | Val::Flags(..) => {
            // Written in place; usually plain ASCII. Literal text of a time format, or a pipe
            // address, can hold bytes JSON must escape: then the text is escaped after all.
            out.push(b'"');
            let start = out.len();
            write_text_val(v, false, out);
            if !escape::is_clean(&out[start..]) {
                let text = out.split_off(start);
                escape_into(&text, out);
            }
            out.push(b'"');
        }
    }
}

fn write_text_val(v: &Val<'_>, omit_empty: bool, out: &mut Vec<u8>) {
    match v {
        Val::Null => {
            if !omit_empty {
                out.push(b'-')
            }
        }
        Val::U(n) => out.extend_from_slice(itoa::Buffer::new().format(*n).as_bytes()),
        Val::I(n) => out.extend_from_slice(itoa::Buffer::new().format(*n).as_bytes()),
        Val::F(f) => {
            if !write_f64(*f, out) && !omit_empty {
                out.push(b'-')
            }
        }
        Val::B(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Val::S(s) => out.extend_from_slice(s),
        Val::Owned(s) => out.extend_from_slice(s),
        Val::Addr(ip, port) => write_addr(ip, *port, out),
        Val::Time(ns, f) => f.write(*ns, out),
        Val::Flags(bits, long) => write_flags(*bits, *long, out),
    }
}

/// Parses the command starting at `s[i] == '%'`; returns it and the index after its closing `%`.
fn parse_command(s: &str, i: usize) -> Result<(Command, usize), String> {
    let b = s.as_bytes();
    let mut j = i + 1;
    while j < b.len() && (b[j].is_ascii_uppercase() || b[j].is_ascii_digit() || b[j] == b'_') {
        j += 1;
    }
    let name = &s[i + 1..j];
    if name.is_empty() {
        return Err(format!("invalid command at position {i} in {s:?}: expected %OPERATOR% (write a literal % as %%)"));
    }
    let mut arg = None;
    if j < b.len() && b[j] == b'(' {
        // The argument ends at the first ')' that the command's end follows (`%` or `:N%`), as
        // Envoy's non-greedy match reads it: `%START_TIME(%H (UTC))%` has the argument `%H (UTC)`.
        let ends_command = |k: usize| {
            let digits = b[k..].iter().skip(1).take_while(|c| c.is_ascii_digit()).count();
            b.get(k) == Some(&b'%') || (b.get(k) == Some(&b':') && digits > 0 && b.get(k + 1 + digits) == Some(&b'%'))
        };
        let close = (j + 1..b.len())
            .find(|&k| b[k] == b')' && ends_command(k + 1))
            .or_else(|| s[j..].find(')').map(|k| j + k))
            .ok_or_else(|| format!("%{name}(...% in {s:?}: missing ')'"))?;
        arg = Some(&s[j + 1..close]);
        j = close + 1;
    }
    let mut max_len = None;
    if j < b.len() && b[j] == b':' {
        let start = j + 1;
        let mut k = start;
        while k < b.len() && b[k].is_ascii_digit() {
            k += 1;
        }
        let n: usize = s[start..k].parse().map_err(|_| format!("%{name}%: ':N' must be a length in {s:?}"))?;
        max_len = Some(n);
        j = k;
    }
    if j >= b.len() || b[j] != b'%' {
        return Err(format!("invalid command %{name}... in {s:?}: missing closing '%'"));
    }
    Ok((command(name, arg, max_len)?, j + 1))
}

/// One operator with its argument and length, checked as Envoy checks them.
fn command(name: &str, arg: Option<&str>, max_len: Option<usize>) -> Result<Command, String> {
    // Envoy 1.40 takes a length only on these (checked on the binary: `%PROTOCOL:4%` and the
    // like reject the config).
    if max_len.is_some()
        && !matches!(
            name,
            "REQ"
                | "RESP"
                | "TRAILER"
                | "REQUEST_HEADER"
                | "RESPONSE_HEADER"
                | "RESPONSE_TRAILER"
                | "DYNAMIC_METADATA"
                | "ENVIRONMENT"
                | "QUERY_PARAM"
                | "PATH"
                | "REQ_WITHOUT_QUERY"
                | "COALESCE"
        )
    {
        return Err(format!("operator %{name}% takes no length (:N)"));
    }
    let max = max_len.map(|n| u32::try_from(n).unwrap_or(u32::MAX));
    Ok(Command { op: make_op(name, arg)?, max })
}

/// `%COALESCE(...)%`'s JSON argument (Envoy's `CoalesceFormatter::create`): `operators`, a
/// non-empty list of command names or `{"command", "param", "max_length"}` objects.
fn coalesce(arg: &str) -> Result<Op, String> {
    let err = |m: String| format!("operator %COALESCE%: {m}");
    let json: serde_json::Value =
        serde_json::from_str(arg).map_err(|e| err(format!("its argument is not JSON ({e})")))?;
    let ops = json
        .get("operators")
        .and_then(|o| o.as_array())
        .filter(|o| !o.is_empty())
        .ok_or_else(|| err("the argument needs a non-empty 'operators' list".into()))?;
    let entry = |(i, e): (usize, &serde_json::Value)| {
        let at = |m: String| err(format!("operators[{i}]: {m}"));
        match e {
            serde_json::Value::String(name) => command(name, None, None).map_err(at),
            serde_json::Value::Object(o) => {
                let name =
                    o.get("command").and_then(|c| c.as_str()).ok_or_else(|| at("needs a 'command' string".into()))?;
                let param = match o.get("param") {
                    None => None,
                    Some(p) => Some(p.as_str().ok_or_else(|| at("'param' must be a string".into()))?),
                };
                let max_len = match o.get("max_length") {
                    None => None,
                    Some(m) => Some(
                        m.as_u64()
                            .filter(|&m| m > 0)
                            .and_then(|m| usize::try_from(m).ok())
                            .ok_or_else(|| at("'max_length' must be a positive integer".into()))?,
                    ),
                };
                command(name, param.filter(|p| !p.is_empty()), max_len).map_err(at)
            }
            _ => Err(at("must be a command name or an object with a 'command'".into())),
        }
    };
    Ok(rare(Rare::Coalesce(ops.iter().enumerate().map(entry).collect::<Result<_, _>>()?)))
}

fn no_arg(name: &str, arg: Option<&str>, op: Op) -> Result<Op, String> {
    match arg {
        // `%UNIQUE_ID()%` too: Envoy takes empty parentheses as no argument.
        None | Some("") => Ok(op),
        Some(_) => Err(format!("operator %{name}% takes no argument")),
    }
}

fn header_op(name: &str, kind: HeaderKind, arg: Option<&str>) -> Result<Op, String> {
    let names = header_names(name, arg)?;
    let names = if kind == HeaderKind::Request { request_names(names) } else { names };
    Ok(Op::Header { kind, names: names.into_iter().map(Vec::into_boxed_slice).collect() })
}

/// Envoy's request header map answers `host` with `:authority` (where HTTP/1's Host header
/// lives in Envoy): the same lookup here, which also serves it from the bulk-fetched map.
fn request_names(mut names: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    for n in &mut names {
        if n == b"host" {
            *n = b":authority".to_vec();
        }
    }
    names
}

/// The `HEADER` or `HEADER?ALTERNATIVE` argument of a header operator, lower-cased. As in Envoy
/// 1.40, each name must be a valid HTTP/2 header name once lower-cased (token characters, a
/// pseudo-header's one leading `:`) or empty (`%REQ(X?)%`, `%REQ(?Y)%`: an empty name is never
/// present, so the other one decides).
fn header_names(name: &str, arg: Option<&str>) -> Result<Vec<Vec<u8>>, String> {
    let arg = arg.filter(|a| !a.is_empty()).ok_or_else(|| format!("operator %{name}(...)% needs a header name"))?;
    let names: Vec<Vec<u8>> = arg.split('?').map(|h| h.to_ascii_lowercase().into_bytes()).collect();
    if names.len() > 2 {
        return Err(format!("operator %{name}({arg})%: expected HEADER or HEADER?ALTERNATIVE"));
    }
    if let Some(bad) = names.iter().find(|n| !valid_header_name(n)) {
        return Err(format!("operator %{name}({arg})%: {:?} is not a valid header name", String::from_utf8_lossy(bad)));
    }
    Ok(names)
}

/// An HTTP/2 header name (RFC 9113: lower-case token characters, RFC 9110 5.6.2), a pseudo-header
/// with its one leading `:`, or empty.
fn valid_header_name(n: &[u8]) -> bool {
    let token = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(c);
    match n {
        [] => true,
        [b':', rest @ ..] => !rest.is_empty() && rest.iter().all(token),
        _ => n.iter().all(token),
    }
}

fn time_fmt(name: &str, arg: Option<&str>) -> Result<TimeFormat, String> {
    TimeFormat::compile(arg.filter(|a| !a.is_empty()).unwrap_or(time::DEFAULT)).map_err(|e| format!("%{name}%: {e}"))
}

/// A time format of a `_LOCAL` operator: rendered in the local zone, with Envoy's local default.
fn local_time_fmt(name: &str, arg: Option<&str>) -> Result<TimeFormat, String> {
    let f = arg.filter(|a| !a.is_empty()).unwrap_or(time::DEFAULT_LOCAL);
    Ok(TimeFormat::compile(f).map_err(|e| format!("%{name}%: {e}"))?.local())
}

fn addr_op(name: &str) -> Option<Op> {
    use AddrField::*;
    let bases = [
        ("DOWNSTREAM_REMOTE", DownstreamRemote),
        ("DOWNSTREAM_LOCAL", DownstreamLocal),
        ("DOWNSTREAM_DIRECT_REMOTE", DownstreamDirectRemote),
        ("DOWNSTREAM_DIRECT_LOCAL", DownstreamDirectLocal),
        ("UPSTREAM_REMOTE", UpstreamRemote),
        ("UPSTREAM_LOCAL", UpstreamLocal),
    ];
    for (base, f) in bases {
        if let Some(rest) = name.strip_prefix(base) {
            let form = match rest {
                "_ADDRESS" => AddrForm::WithPort,
                "_ADDRESS_WITHOUT_PORT" => AddrForm::WithoutPort,
                "_PORT" => AddrForm::Port,
                _ => continue,
            };
            return Some(Op::Addr(f, form));
        }
    }
    None
}

fn str_op(name: &str) -> Option<StrField> {
    use StrField::*;
    Some(match name {
        "PROTOCOL" => Protocol,
        "UPSTREAM_PROTOCOL" => UpstreamProtocol,
        "RESPONSE_CODE_DETAILS" => ResponseCodeDetails,
        "CONNECTION_TERMINATION_DETAILS" => ConnectionTerminationDetails,
        "ROUTE_NAME" => RouteName,
        "UPSTREAM_CLUSTER" | "UPSTREAM_CLUSTER_RAW" => UpstreamCluster,
        "UPSTREAM_HOST_NAME" => UpstreamHostName,
        "UPSTREAM_TRANSPORT_FAILURE_REASON" => UpstreamTransportFailureReason,
        "REQUESTED_SERVER_NAME" => RequestedServerName,
        "LOCAL_REPLY_BODY" => LocalReplyBody,
        "STREAM_ID" => RequestId,
        "DOWNSTREAM_TLS_VERSION" => DownstreamTlsVersion,
        "DOWNSTREAM_TLS_CIPHER" => DownstreamTlsCipher,
        "DOWNSTREAM_TLS_SESSION_ID" => DownstreamTlsSessionId,
        "DOWNSTREAM_PEER_SUBJECT" => DownstreamPeerSubject,
        "DOWNSTREAM_PEER_ISSUER" => DownstreamPeerIssuer,
        "DOWNSTREAM_PEER_SERIAL" => DownstreamPeerSerial,
        "DOWNSTREAM_PEER_FINGERPRINT_256" => DownstreamPeerCertDigest,
        "DOWNSTREAM_PEER_FINGERPRINT_1" => DownstreamPeerFingerprint1,
        "DOWNSTREAM_LOCAL_SUBJECT" => DownstreamLocalSubject,
        "DOWNSTREAM_TRANSPORT_FAILURE_REASON" => DownstreamTransportFailureReason,
        "TLS_JA3_FINGERPRINT" => Ja3Hash,
        "TLS_JA4_FINGERPRINT" => Ja4Hash,
        "UPSTREAM_TLS_VERSION" => UpstreamTlsVersion,
        "UPSTREAM_TLS_CIPHER" => UpstreamTlsCipher,
        "UPSTREAM_TLS_SESSION_ID" => UpstreamTlsSessionId,
        "UPSTREAM_PEER_SUBJECT" => UpstreamPeerSubject,
        "UPSTREAM_PEER_ISSUER" => UpstreamPeerIssuer,
        "UPSTREAM_PEER_FINGERPRINT_256" => UpstreamPeerCertDigest,
        "UPSTREAM_LOCAL_SUBJECT" => UpstreamLocalSubject,
        _ => return None,
    })
}

fn make_op(name: &str, arg: Option<&str>) -> Result<Op, String> {
    if name == "RESPONSE_CODE_DETAILS" && arg == Some("ALLOW_WHITESPACES") {
        return Ok(Op::StrRaw(StrField::ResponseCodeDetails));
    }
    if let Some(f) = str_op(name) {
        return no_arg(name, arg, Op::Str(f));
    }
    if let Some(op) = addr_op(name) {
        return no_arg(name, arg, op);
    }
    if name == "UPSTREAM_HOST" {
        return no_arg(name, arg, Op::UpstreamHost);
    }
    let num = |n| no_arg(name, arg, Op::Num(n));
    let dur = |d| no_arg(name, arg, Op::Dur(d));
    match name {
        // (The long names are Envoy's aliases of the short ones.)
        "REQ" | "REQUEST_HEADER" => header_op(name, HeaderKind::Request, arg),
        "RESP" | "RESPONSE_HEADER" => header_op(name, HeaderKind::Response, arg),
        "TRAILER" | "RESPONSE_TRAILER" => header_op(name, HeaderKind::ResponseTrailer, arg),
        "START_TIME" => Ok(Op::StartTime(Box::new(time_fmt(name, arg)?))),
        "START_TIME_LOCAL" => Ok(Op::StartTime(Box::new(local_time_fmt(name, arg)?))),
        "EMIT_TIME" => Ok(rare(Rare::EmitTime(time_fmt(name, arg)?))),
        "EMIT_TIME_LOCAL" => Ok(rare(Rare::EmitTime(local_time_fmt(name, arg)?))),
        "GRPC_STATUS" => Ok(rare(Rare::GrpcStatus(GrpcForm::parse(arg)?))),
        "GRPC_STATUS_NUMBER" => no_arg(name, arg, rare(Rare::GrpcStatus(GrpcForm::Number))),
        "QUERY_PARAM" => match arg.filter(|a| !a.is_empty()) {
            Some(key) => Ok(rare(Rare::QueryParam(key.as_bytes().to_vec()))),
            None => Err("operator %QUERY_PARAM(...)% needs a parameter name".into()),
        },
        "PATH" => {
            let (strip_query, src) = request::parse_path_arg(arg)?;
            Ok(rare(Rare::Path { strip_query, src }))
        }
        "REQ_WITHOUT_QUERY" => Ok(rare(Rare::HeaderNoQuery(request_names(header_names(name, arg)?)))),
        "RESPONSE_CODE" => num(Num::ResponseCode),
        "RESPONSE_FLAGS" => no_arg(name, arg, Op::Flags { long: false }),
        "RESPONSE_FLAGS_LONG" => no_arg(name, arg, Op::Flags { long: true }),
        "BYTES_RECEIVED" => num(Num::BytesReceived),
        "BYTES_SENT" => num(Num::BytesSent),
        "UPSTREAM_WIRE_BYTES_SENT" => num(Num::UpstreamWireSent),
        "UPSTREAM_WIRE_BYTES_RECEIVED" => num(Num::UpstreamWireReceived),
        "DOWNSTREAM_WIRE_BYTES_SENT" => num(Num::DownstreamWireSent),
        "DOWNSTREAM_WIRE_BYTES_RECEIVED" => num(Num::DownstreamWireReceived),
        "REQUEST_HEADERS_BYTES" => num(Num::RequestHeadersBytes),
        "RESPONSE_HEADERS_BYTES" => num(Num::ResponseHeadersBytes),
        "RESPONSE_TRAILERS_BYTES" => num(Num::ResponseTrailersBytes),
        "UPSTREAM_REQUEST_ATTEMPT_COUNT" => num(Num::AttemptCount),
        "CONNECTION_ID" => num(Num::ConnectionId),
        "UPSTREAM_CONNECTION_ID" => num(Num::UpstreamConnectionId),
        "DURATION" => dur(Dur::Total),
        "REQUEST_DURATION" => dur(Dur::Request),
        "REQUEST_TX_DURATION" => dur(Dur::RequestTx),
        "RESPONSE_DURATION" => dur(Dur::Response),
        "RESPONSE_TX_DURATION" => dur(Dur::ResponseTx),
        "UPSTREAM_CONNECTION_POOL_READY_DURATION" => dur(Dur::PoolReady),
        "DOWNSTREAM_HANDSHAKE_DURATION" => dur(Dur::Handshake),
        "UPSTREAM_HOST_NAME_WITHOUT_PORT" => no_arg(name, arg, rare(Rare::UpstreamHostNameNoPort)),
        "UNIQUE_ID" => no_arg(name, arg, rare(Rare::UniqueId)),
        "COALESCE" => coalesce(arg.unwrap_or("")),
        "ROUNDTRIP_DURATION" => dur(Dur::Roundtrip),
        "COMMON_DURATION" => common_duration(arg.unwrap_or("")),
        "ACCESS_LOG_TYPE" => no_arg(name, arg, Op::AccessLogType),
        "TRACE_ID" => no_arg(name, arg, Op::Trace(TraceField::TraceId)),
        "SPAN_ID" => no_arg(name, arg, Op::Trace(TraceField::SpanId)),
        "HOSTNAME" => no_arg(name, arg, Op::Const(hostname().map(Vec::into_boxed_slice))),
        "ENVIRONMENT" => {
            let var = arg.filter(|a| !a.is_empty()).ok_or("operator %ENVIRONMENT(...)% needs a variable name")?;
            // Envoy resolves it once at config load; an unset variable renders as the string "-".
            Ok(Op::Const(Some(
                std::env::var_os(var).map_or_else(|| b"-".to_vec(), |v| v.into_encoded_bytes()).into_boxed_slice(),
            )))
        }
        "DYNAMIC_METADATA" => {
            let arg = arg.unwrap_or("");
            let mut it = arg.split(':');
            let ns = it.next().unwrap_or("");
            let path: Vec<&str> = it.collect();
            if ns.is_empty() || path.is_empty() || path.iter().any(|p| p.is_empty()) {
                return Err(format!(
                    "operator %DYNAMIC_METADATA({arg})%: expected NAMESPACE:KEY[:KEY...] \
                     (whole-namespace objects cannot be read through the 1.40 ABI)"
                ));
            }
            if path.iter().any(|p| p.contains('.')) {
                return Err(format!(
                    "operator %DYNAMIC_METADATA({arg})%: a key containing '.' cannot be read through the \
                     1.40 ABI (it splits the path at dots)"
                ));
            }
            Ok(rare(Rare::DynMeta { ns: ns.as_bytes().to_vec(), path: path.join(".").into_bytes() }))
        }
        "DOWNSTREAM_PEER_URI_SAN" => no_arg(name, arg, Op::Sans(SanField::DownstreamPeerUri)),
        "DOWNSTREAM_PEER_DNS_SAN" => no_arg(name, arg, Op::Sans(SanField::DownstreamPeerDns)),
        "DOWNSTREAM_LOCAL_URI_SAN" => no_arg(name, arg, Op::Sans(SanField::DownstreamLocalUri)),
        "DOWNSTREAM_LOCAL_DNS_SAN" => no_arg(name, arg, Op::Sans(SanField::DownstreamLocalDns)),
        "UPSTREAM_PEER_URI_SAN" => no_arg(name, arg, Op::Sans(SanField::UpstreamPeerUri)),
        "UPSTREAM_PEER_DNS_SAN" => no_arg(name, arg, Op::Sans(SanField::UpstreamPeerDns)),
        "UPSTREAM_LOCAL_URI_SAN" => no_arg(name, arg, Op::Sans(SanField::UpstreamLocalUri)),
        "UPSTREAM_LOCAL_DNS_SAN" => no_arg(name, arg, Op::Sans(SanField::UpstreamLocalDns)),
        "DOWNSTREAM_PEER_CERT_V_START" => Ok(Op::Cert(CertTime::DownstreamPeerStart, Box::new(time_fmt(name, arg)?))),
        "DOWNSTREAM_PEER_CERT_V_END" => Ok(Op::Cert(CertTime::DownstreamPeerEnd, Box::new(time_fmt(name, arg)?))),
        "UPSTREAM_PEER_CERT_V_START" => Ok(Op::Cert(CertTime::UpstreamPeerStart, Box::new(time_fmt(name, arg)?))),
        "UPSTREAM_PEER_CERT_V_END" => Ok(Op::Cert(CertTime::UpstreamPeerEnd, Box::new(time_fmt(name, arg)?))),
        _ if UNSERVABLE.contains(&name) => Err(format!(
            "operator %{name}% is not supported: Envoy 1.40's dynamic-module ABI cannot serve it to an access logger"
        )),
        _ => Err(format!("unknown command operator %{name}%")),
    }
}

/// `%COMMON_DURATION(START:END[:ms|us|ns])%` with Envoy's named time points. A custom time
/// point (one a filter records under its own name) is not visible through the 1.40 ABI.
fn common_duration(arg: &str) -> Result<Op, String> {
    let parts: Vec<&str> = arg.split(':').collect();
    if !(2..=3).contains(&parts.len()) {
        return Err(format!("operator %COMMON_DURATION({arg})%: expected START:END[:PRECISION]"));
    }
    let point = |name: &str| {
        Ok(match name {
            "DS_RX_BEG" => t::START_TIME_UNIX_NS,
            "DS_RX_END" => t::LAST_DOWNSTREAM_RX,
            "US_CX_BEG" => t::UPSTREAM_CONNECT_START,
            "US_CX_END" => t::UPSTREAM_CONNECT_COMPLETE,
            "US_HS_END" => t::UPSTREAM_HANDSHAKE_COMPLETE,
            "US_RX_BODY_BEG" => t::FIRST_UPSTREAM_RX_BODY,
            "US_TX_BEG" => t::FIRST_UPSTREAM_TX,
            "US_TX_END" => t::LAST_UPSTREAM_TX,
            "US_RX_BEG" => t::FIRST_UPSTREAM_RX,
            "US_RX_END" => t::LAST_UPSTREAM_RX,
            "DS_TX_BEG" => t::FIRST_DOWNSTREAM_TX,
            "DS_TX_END" => t::LAST_DOWNSTREAM_TX,
            other => {
                return Err(format!(
                    "operator %COMMON_DURATION({arg})%: time point {other:?} is not one of DS_RX_BEG, DS_RX_END, \
                     US_CX_BEG, US_CX_END, US_HS_END, US_TX_BEG, US_TX_END, US_RX_BEG, US_RX_BODY_BEG, US_RX_END, \
                     DS_TX_BEG, DS_TX_END (a filter's custom time points cannot be read through the 1.40 ABI)"
                ))
            }
        })
    };
    let div = match parts.get(2).copied().unwrap_or("ms") {
        "ms" => 1_000_000,
        "us" => 1_000,
        "ns" => 1,
        other => return Err(format!("operator %COMMON_DURATION({arg})%: precision {other:?} is not ms, us or ns")),
    };
    Ok(rare(Rare::CommonDur { beg: point(parts[0])?, end: point(parts[1])?, div }))
}

fn rare(r: Rare) -> Op {
    Op::Rare(Box::new(r))
}

fn hostname() -> Option<Vec<u8>> {
    let mut buf = [0u8; 256];
    // SAFETY: buf is writable for its full length; gethostname NUL-terminates on success.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return None;
    }
    let end = buf.iter().position(|&c| c == 0).unwrap_or(buf.len());
    Some(buf[..end].to_vec())
}

#[derive(Clone, Debug, PartialEq)]
#[repr(u8)]
enum Node {
    /// Pre-rendered JSON (literal strings, numbers, booleans).
    Lit(Vec<u8>),
    /// A literal `null`: left out, like an unavailable value, under `omit_empty_values`.
    Null,
    Typed(Command),
    Text(Template),
    Map(Vec<(Vec<u8>, Node)>),
    /// A list, as Envoy's json_format takes one: its elements render like map values; under
    /// `omit_empty_values` unavailable elements (and emptied maps) are left out, and the list
    /// stays even when that leaves it empty.
    List(Vec<Node>),
}

/// A compiled `json_format` map.
#[derive(Clone, Debug, PartialEq)]
pub struct JsonPlan {
    root: Vec<(Vec<u8>, Node)>,
    /// `root`'s operators in the order render reads them back.
    program: Program,
    omit_empty: bool,
    bulk: BulkHeaders,
}

/// Which header maps a record fetches whole (one ABI call) rather than per operator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BulkHeaders {
    /// Request headers.
    pub request: bool,
    /// Response headers.
    pub response: bool,
}

impl BulkHeaders {
    /// The choice for a plan making `(request, response)` single header lookups per record.
    pub fn for_lookups((req, resp): (usize, usize)) -> Self {
        // Each single lookup costs Envoy a lower-cased key string (~700 instructions measured
        // with callgrind); one bulk call hands out pointers to the whole map. Response maps are
        // short, so even one lookup is dearer than the bulk call.
        BulkHeaders { request: req >= 2, response: resp >= 1 }
    }
}

impl Command {
    /// Header lookups this command makes: (request, response).
    pub fn header_lookups(&self) -> (usize, usize) {
        match &self.op {
            Op::Header { kind: HeaderKind::Request, names } => (names.len(), 0),
            Op::Header { kind: HeaderKind::Response, names } => (0, names.len()),
            Op::Trace(_) => (1, 0),
            Op::Rare(r) => match &**r {
                Rare::QueryParam(_) => (1, 0),
                Rare::HeaderNoQuery(names) => (names.len(), 0),
                Rare::Path { src: PathSrc::OrigOrPath, .. } => (2, 0),
                Rare::Path { .. } => (1, 0),
                // :path and content-type, then grpc-status (the trailers are read one by one).
                Rare::GrpcStatus(_) => (2, 1),
                Rare::Coalesce(cmds) => sum_lookups(cmds),
                _ => (0, 0),
            },
            _ => (0, 0),
        }
    }
}

fn flatten(entries: &[(Vec<u8>, Node)], program: &mut Program) {
    for (_, node) in entries {
        flatten_node(node, program);
    }
}

fn flatten_node(node: &Node, program: &mut Program) {
    match node {
        Node::Lit(_) | Node::Null => {}
        Node::Typed(c) => program.push(c),
        Node::Text(t) => program.push_template(t),
        Node::Map(m) => flatten(m, program),
        Node::List(l) => l.iter().for_each(|n| flatten_node(n, program)),
    }
}

fn compile_map(
    map: &serde_json::Map<String, serde_json::Value>,
    path: &str,
) -> Result<Vec<(Vec<u8>, Node)>, ConfigError> {
    let mut entries: Vec<(&String, &serde_json::Value)> = map.iter().collect();
    // Envoy carries json_format as a protobuf Struct, whose keys come out sorted.
    entries.sort_by(|a, b| a.0.cmp(b.0));
    let mut out = Vec::with_capacity(entries.len());
    for (k, v) in entries {
        let here = format!("{path}.{k}");
        let mut key = vec![b','];
        quoted(k.as_bytes(), &mut key);
        key.push(b':');
        out.push((key, compile_node(v, &here)?));
    }
    Ok(out)
}

fn compile_node(v: &serde_json::Value, here: &str) -> Result<Node, ConfigError> {
    Ok(match v {
        serde_json::Value::String(s) => {
            let t = Template::compile(s).map_err(|e| ConfigError::new(here, e))?;
            if let Some(c) = t.single() {
                Node::Typed(c.clone())
            } else if let Some(text) = t.literal() {
                let mut lit = Vec::new();
                quoted(&text, &mut lit);
                Node::Lit(lit)
            } else {
                Node::Text(t)
            }
        }
        serde_json::Value::Object(m) => Node::Map(compile_map(m, here)?),
        serde_json::Value::Array(items) => Node::List(
            items
                .iter()
                .enumerate()
                .map(|(i, v)| compile_node(v, &format!("{here}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        serde_json::Value::Null => Node::Null,
        serde_json::Value::Number(n) if n.as_i64().is_some() || n.as_u64().is_some() => {
            let mut lit = Vec::new();
            json_int(n.as_i64().map_or_else(|| i128::from(n.as_u64().unwrap_or(0)), i128::from), &mut lit);
            Node::Lit(lit)
        }
        other => Node::Lit(other.to_string().into_bytes()),
    })
}

impl JsonPlan {
    /// Compiles a `json_format` map; errors name the key path (`json_format.a.b`), keys
    /// containing dots or `": "` included.
    pub fn compile(
        map: &serde_json::Map<String, serde_json::Value>,
        omit_empty: bool,
    ) -> Result<JsonPlan, ConfigError> {
        let root = compile_map(map, "json_format")?;
        let mut program = Program::default();
        flatten(&root, &mut program);
        let bulk = BulkHeaders::for_lookups(program.header_lookups());
        Ok(JsonPlan { root, program, omit_empty, bulk })
    }

    /// Which header maps records of this plan fetch whole.
    pub fn bulk_headers(&self) -> BulkHeaders {
        self.bulk
    }

    /// Worker side: appends the record's operator values, in plan order, to `out`. This is
    /// all the per-record work an Envoy worker does (besides the filter and the queue push).
    #[inline]
    pub fn capture<S: Stream>(&self, cx: &Ctx<'_, S>, out: &mut Vec<u8>) {
        self.program.capture(cx, out);
    }

    /// Flush-thread side: appends one JSON object (no newline) rendered from a captured
    /// record. `scratch` is reused text space.
    pub fn render(&self, record: &[u8], scratch: &mut Vec<u8>, out: &mut Vec<u8>) {
        // One capacity check up front instead of a growth at some field (values rarely need
        // escaping, so twice the captured bytes plus the keys is nearly always enough).
        out.reserve(record.len() * 2 + 512);
        self.render_map(&self.root, &mut Decoder::new(record), scratch, out);
    }

    fn render_map<'a>(
        &'a self,
        entries: &'a [(Vec<u8>, Node)],
        vals: &mut Decoder<'a>,
        scratch: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) -> bool {
        out.push(b'{');
        let mut any = false;
        for (key, node) in entries {
            let mark = out.len();
            // Keys are stored pre-rendered as `,"key":`; the first one written drops the comma.
            out.extend_from_slice(if any { key } else { &key[1..] });
            let wrote = self.render_node(node, vals, scratch, out);
            if wrote {
                any = true;
            } else {
                out.truncate(mark);
            }
        }
        out.push(b'}');
        any
    }

    /// Writes one map value or list element; false when it is left out (`omit_empty_values`).
    fn render_node<'a>(
        &'a self,
        node: &'a Node,
        vals: &mut Decoder<'a>,
        scratch: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) -> bool {
        match node {
            Node::Null if self.omit_empty => false,
            Node::Null => {
                out.extend_from_slice(b"null");
                true
            }
            Node::Lit(l) => {
                out.extend_from_slice(l);
                true
            }
            Node::Typed(c) => c.render_json(vals, self.omit_empty, out),
            Node::Text(t) => {
                // Mixed text is always a string; with omit_empty, unavailable parts print
                // nothing instead of "-" (Envoy keeps the key even when it ends up "").
                out.push(b'"');
                t.write_json_text(vals, self.omit_empty, scratch, out);
                out.push(b'"');
                true
            }
            Node::Map(m) => self.render_map(m, vals, scratch, out) || !self.omit_empty,
            Node::List(items) => {
                out.push(b'[');
                let mut any = false;
                for item in items {
                    let mark = out.len();
                    if any {
                        out.push(b',');
                    }
                    if self.render_node(item, vals, scratch, out) {
                        any = true;
                    } else {
                        out.truncate(mark);
                    }
                }
                out.push(b']');
                true
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;

/// The gRPC status of a gRPC request (Envoy's `GrpcStatusFormatter`): the `grpc-status` of
/// the response trailers, else of the response headers, else the one the HTTP response code
/// maps to; `None` for a request that is not gRPC or has no response yet.
fn grpc_status<S: Stream>(cx: &Ctx<'_, S>) -> Option<i64> {
    let req = |n: &[u8]| cx.header(HeaderKind::Request, n);
    if !request::is_grpc_request(req(b":path"), req(b"content-type")) {
        return None;
    }
    request::parse_grpc_status(cx.header(HeaderKind::ResponseTrailer, b"grpc-status"))
        .or_else(|| request::parse_grpc_status(cx.header(HeaderKind::Response, b"grpc-status")))
        .or_else(|| match cx.stream.response_code() {
            0 => None,
            code => Some(request::http_to_grpc_status(code)),
        })
}

/// Header lookups of several commands: (request, response).
fn sum_lookups(cmds: &[Command]) -> (usize, usize) {
    cmds.iter().fold((0, 0), |a, c| {
        let (q, r) = c.header_lookups();
        (a.0 + q, a.1 + r)
    })
}
