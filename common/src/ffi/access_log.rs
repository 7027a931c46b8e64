//! Access-logger side of the seam: [`LogStream`], a view of the stream being logged that is
//! only constructible inside `on_access_logger_log`, the [`Stream`] trait the format engine is
//! written against (so tests drive it with a fake), and the config-scoped metric handles.
use std::ffi::c_void;
use std::marker::PhantomData;

use envoy_obs_abi as abi;

use super::{empty_eb, envoy_bytes, module_buffer};
use crate::metrics::{CounterId, GaugeId, Metrics};

/// Which header map to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderKind {
    /// Request headers, pseudo-headers (`:path`, `:method`, `:authority`) included.
    Request,
    /// Response headers.
    Response,
    /// Response trailers.
    ResponseTrailer,
}

impl HeaderKind {
    fn abi(self) -> u32 {
        match self {
            HeaderKind::Request => 0,
            HeaderKind::Response => 2,
            HeaderKind::ResponseTrailer => 3,
        }
    }
}

/// String-valued stream properties (each one ABI getter).
#[allow(missing_docs)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StrField {
    Protocol,
    RequestId,
    ResponseCodeDetails,
    RouteName,
    LocalReplyBody,
    ConnectionTerminationDetails,
    RequestedServerName,
    UpstreamCluster,
    UpstreamHostName,
    UpstreamProtocol,
    UpstreamTransportFailureReason,
    DownstreamTlsVersion,
    DownstreamTlsCipher,
    DownstreamTlsSessionId,
    DownstreamPeerSubject,
    DownstreamPeerIssuer,
    DownstreamPeerSerial,
    DownstreamPeerCertDigest,
    DownstreamPeerFingerprint1,
    DownstreamLocalSubject,
    DownstreamTransportFailureReason,
    Ja3Hash,
    Ja4Hash,
    UpstreamTlsVersion,
    UpstreamTlsCipher,
    UpstreamTlsSessionId,
    UpstreamPeerSubject,
    UpstreamPeerIssuer,
    UpstreamPeerCertDigest,
    UpstreamLocalSubject,
}

/// Address-valued stream properties.
#[allow(missing_docs)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddrField {
    DownstreamRemote,
    DownstreamLocal,
    DownstreamDirectRemote,
    DownstreamDirectLocal,
    UpstreamRemote,
    UpstreamLocal,
}

/// Certificate SAN lists.
#[allow(missing_docs)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SanField {
    DownstreamPeerUri,
    DownstreamPeerDns,
    DownstreamLocalUri,
    DownstreamLocalDns,
    UpstreamPeerUri,
    UpstreamPeerDns,
    UpstreamLocalUri,
    UpstreamLocalDns,
}

/// Certificate validity bounds (epoch seconds).
#[allow(missing_docs)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertTime {
    DownstreamPeerStart,
    DownstreamPeerEnd,
    UpstreamPeerStart,
    UpstreamPeerEnd,
}

type RawHeader = abi::envoy_dynamic_module_type_envoy_http_header;
const INLINE_HEADERS: usize = 32;

/// A header map snapshot: up to 32 entries without allocating, more in a spill vector.
/// Entries borrow Envoy's (or a test's) memory for `'s`.
pub struct HeaderTable<'s> {
    inline: [std::mem::MaybeUninit<RawHeader>; INLINE_HEADERS],
    len: usize,
    spill: Vec<RawHeader>,
    _borrow: PhantomData<&'s [u8]>,
}

impl Default for HeaderTable<'_> {
    fn default() -> Self {
        HeaderTable {
            inline: [const { std::mem::MaybeUninit::uninit() }; INLINE_HEADERS],
            len: 0,
            spill: Vec::new(),
            _borrow: PhantomData,
        }
    }
}

impl<'s> HeaderTable<'s> {
    /// Adds one header.
    pub fn push(&mut self, key: &'s [u8], value: &'s [u8]) {
        let h = RawHeader {
            key_ptr: key.as_ptr().cast(),
            key_length: key.len(),
            value_ptr: value.as_ptr().cast(),
            value_length: value.len(),
        };
        if self.spill.is_empty() && self.len < INLINE_HEADERS {
            self.inline[self.len].write(h);
            self.len += 1;
        } else {
            self.spill_all();
            self.spill.push(h);
        }
    }

    fn spill_all(&mut self) {
        if self.spill.is_empty() {
            // SAFETY: the first `len` inline entries are initialised.
            self.spill.extend(self.inline[..self.len].iter().map(|h| unsafe { h.assume_init() }));
            self.len = 0;
        }
    }

    /// Room for `n` more raw entries, for Envoy to fill; see [`Self::commit_raw`].
    fn reserve_raw(&mut self, n: usize) -> *mut RawHeader {
        if self.spill.is_empty() && self.len + n <= INLINE_HEADERS {
            self.inline[self.len..].as_mut_ptr().cast()
        } else {
            self.spill_all();
            self.spill.reserve(n);
            // SAFETY: reserve guarantees capacity for `n` more elements past `len`.
            unsafe { self.spill.as_mut_ptr().add(self.spill.len()) }
        }
    }

    /// # Safety
    /// The `n` entries at the pointer from the last `reserve_raw(n)` are initialised and point
    /// at memory valid for `'s`.
    unsafe fn commit_raw(&mut self, n: usize) {
        if self.spill.is_empty() && self.len + n <= INLINE_HEADERS {
            self.len += n;
        } else {
            // SAFETY: per contract, the reserved tail is initialised.
            unsafe { self.spill.set_len(self.spill.len() + n) };
        }
    }

    fn entries(&self) -> &[RawHeader] {
        if self.spill.is_empty() {
            // SAFETY: the first `len` inline entries are initialised; MaybeUninit<T> has T's layout.
            unsafe { std::slice::from_raw_parts(self.inline.as_ptr().cast(), self.len) }
        } else {
            &self.spill
        }
    }

    /// The first value of `name` (lower-case, as Envoy stores keys).
    #[inline]
    pub fn get(&self, name: &[u8]) -> Option<&'s [u8]> {
        for h in self.entries() {
            if h.key_length == name.len() {
                // SAFETY: entries point at memory valid for 's (push/commit_raw contracts).
                let (k, v) = unsafe {
                    (
                        envoy_bytes(abi::EB { ptr: h.key_ptr, length: h.key_length }),
                        envoy_bytes(abi::EB { ptr: h.value_ptr, length: h.value_length }),
                    )
                };
                if k == name {
                    return Some(v);
                }
            }
        }
        None
    }

    /// Number of headers.
    pub fn len(&self) -> usize {
        self.entries().len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Indices into [`Timing::ns`] (the 1.40 `timing_info_v2` layout).
#[allow(missing_docs)]
pub mod timing {
    pub const START_TIME_UNIX_NS: usize = 0;
    pub const DOWNSTREAM_HANDSHAKE_COMPLETE: usize = 3;
    pub const LAST_DOWNSTREAM_RX: usize = 5;
    pub const UPSTREAM_CONNECT_START: usize = 6;
    pub const UPSTREAM_CONNECT_COMPLETE: usize = 7;
    pub const UPSTREAM_HANDSHAKE_COMPLETE: usize = 8;
    pub const FIRST_UPSTREAM_TX: usize = 9;
    pub const LAST_UPSTREAM_TX: usize = 10;
    pub const FIRST_UPSTREAM_RX: usize = 11;
    pub const FIRST_UPSTREAM_RX_BODY: usize = 12;
    pub const LAST_UPSTREAM_RX: usize = 13;
    pub const FIRST_DOWNSTREAM_TX: usize = 14;
    pub const LAST_DOWNSTREAM_TX: usize = 15;
    pub const LAST_DOWNSTREAM_ACK: usize = 16;
    pub const REQUEST_COMPLETE: usize = 17;
}

/// Request timing: `ns[0]` is the absolute start (Unix ns); the others are offsets from it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timing {
    /// Values, valid where `has` is set.
    pub ns: [i64; 19],
    /// Availability flags (negative offsets can be valid).
    pub has: [bool; 19],
}

impl Timing {
    /// The value at `i`, when Envoy recorded it.
    #[inline]
    pub fn get(&self, i: usize) -> Option<i64> {
        if self.has[i] {
            Some(self.ns[i])
        } else {
            None
        }
    }
}

/// Body byte counts and upstream wire bytes (one ABI call).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bytes {
    /// Downstream request body bytes.
    pub received: u64,
    /// Downstream response body bytes.
    pub sent: u64,
    /// Upstream wire bytes received.
    pub upstream_wire_received: u64,
    /// Upstream wire bytes sent.
    pub upstream_wire_sent: u64,
}

/// A typed dynamic-metadata value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MetaValue<'a> {
    /// string
    Str(&'a [u8]),
    /// number
    Num(f64),
    /// bool
    Bool(bool),
}

/// What the format engine may read about the stream being logged. Implemented by
/// [`LogStream`] for real Envoy and by fakes in tests. Slices borrow from `self`.
#[allow(missing_docs)]
pub trait Stream {
    /// First value of header `name` (lower-case).
    fn header(&self, kind: HeaderKind, name: &[u8]) -> Option<&[u8]>;
    /// Every header of the map, in order, appended to `out`. One ABI call for the whole map:
    /// cheaper than several `header` lookups, each of which costs Envoy a key copy.
    fn headers<'s>(&'s self, kind: HeaderKind, out: &mut HeaderTable<'s>);
    fn response_code(&self) -> u32;
    fn attempt_count(&self) -> u32;
    /// Bit `n` set = response flag `n` (Envoy's numbering).
    fn response_flags(&self) -> u64;
    fn connection_id(&self) -> u64;
    fn upstream_connection_id(&self) -> u64;
    fn request_headers_bytes(&self) -> u64;
    fn response_headers_bytes(&self) -> u64;
    fn response_trailers_bytes(&self) -> u64;
    fn timing(&self) -> Timing;
    fn bytes(&self) -> Bytes;
    /// Downstream wire bytes (received, sent).
    fn downstream_wire_bytes(&self) -> (u64, u64);
    fn pool_ready_ns(&self) -> Option<i64>;
    fn string(&self, f: StrField) -> Option<&[u8]>;
    fn address(&self, f: AddrField) -> Option<(&[u8], u32)>;
    /// Appends every SAN of the list to `out`.
    fn sans<'s>(&'s self, f: SanField, out: &mut Vec<&'s [u8]>);
    fn cert_time(&self, f: CertTime) -> Option<i64>;
    fn dynamic_metadata(&self, ns: &[u8], path: &[u8]) -> Option<MetaValue<'_>>;
    fn is_health_check(&self) -> bool;
}

/// The stream Envoy is logging, valid only inside `on_access_logger_log` (`'a`).
pub struct LogStream<'a> {
    ptr: abi::AL,
    _hook: PhantomData<&'a ()>,
}

impl LogStream<'_> {
    /// # Safety
    /// `ptr` must be the `logger_envoy_ptr` of the `on_access_logger_log` call in progress, and
    /// the view must not outlive that call.
    pub unsafe fn new(ptr: *mut c_void) -> Self {
        LogStream { ptr, _hook: PhantomData }
    }

    /// Worker index of this thread's logger (workers 0..N-1, main thread N). Safe at any time.
    ///
    /// # Safety
    /// `ptr` must be a `logger_envoy_ptr` Envoy passed to `on_access_logger_new` or `_log`.
    pub unsafe fn worker_index(ptr: *mut c_void) -> u32 {
        // SAFETY: per contract; Envoy documents this getter as safe outside `log`.
        unsafe { abi::envoy_dynamic_module_callback_access_logger_get_worker_index(ptr) }
    }

    #[inline]
    fn str_getter(&self, f: unsafe extern "C" fn(abi::AL, *mut abi::EB) -> bool) -> Option<&[u8]> {
        let mut out = empty_eb();
        // SAFETY: `self.ptr` is the live log context (constructor contract); `out` is a valid
        // out-pointer; the returned memory lives until the hook returns, which bounds `&self`.
        unsafe {
            if f(self.ptr, &mut out) {
                Some(envoy_bytes(out))
            } else {
                None
            }
        }
    }
}

type SanFns = (unsafe extern "C" fn(abi::AL) -> usize, unsafe extern "C" fn(abi::AL, *mut abi::EB) -> bool);

impl Stream for LogStream<'_> {
    #[inline]
    fn header(&self, kind: HeaderKind, name: &[u8]) -> Option<&[u8]> {
        let mut out = empty_eb();
        // SAFETY: live log context; `name` outlives the call; `out` valid; NULL count allowed.
        unsafe {
            if abi::envoy_dynamic_module_callback_access_logger_get_header_value(
                self.ptr,
                kind.abi(),
                module_buffer(name),
                &mut out,
                0,
                std::ptr::null_mut(),
            ) {
                Some(envoy_bytes(out))
            } else {
                None
            }
        }
    }
    fn headers<'s>(&'s self, kind: HeaderKind, out: &mut HeaderTable<'s>) {
        // SAFETY: live log context.
        let n = unsafe { abi::envoy_dynamic_module_callback_access_logger_get_headers_size(self.ptr, kind.abi()) };
        if n == 0 {
            return;
        }
        let buf = out.reserve_raw(n);
        // SAFETY: `buf` has room for exactly `n` entries as the ABI requires; the pointers Envoy
        // writes stay valid until the hook returns, which bounds `'s`.
        if unsafe { abi::envoy_dynamic_module_callback_access_logger_get_headers(self.ptr, kind.abi(), buf) } {
            // SAFETY: Envoy initialised all `n` entries.
            unsafe { out.commit_raw(n) };
        }
    }
    fn response_code(&self) -> u32 {
        // SAFETY: live log context.
        unsafe { abi::envoy_dynamic_module_callback_access_logger_get_response_code(self.ptr) }
    }
    fn attempt_count(&self) -> u32 {
        // SAFETY: live log context.
        unsafe { abi::envoy_dynamic_module_callback_access_logger_get_attempt_count(self.ptr) }
    }
    fn response_flags(&self) -> u64 {
        // SAFETY: live log context.
        unsafe { abi::envoy_dynamic_module_callback_access_logger_get_response_flags(self.ptr) }
    }
    fn connection_id(&self) -> u64 {
        // SAFETY: live log context.
        unsafe { abi::envoy_dynamic_module_callback_access_logger_get_connection_id(self.ptr) }
    }
    fn upstream_connection_id(&self) -> u64 {
        // SAFETY: live log context.
        unsafe { abi::envoy_dynamic_module_callback_access_logger_get_upstream_connection_id(self.ptr) }
    }
    fn request_headers_bytes(&self) -> u64 {
        // SAFETY: live log context.
        unsafe { abi::envoy_dynamic_module_callback_access_logger_get_request_headers_bytes(self.ptr) }
    }
    fn response_headers_bytes(&self) -> u64 {
        // SAFETY: live log context.
        unsafe { abi::envoy_dynamic_module_callback_access_logger_get_response_headers_bytes(self.ptr) }
    }
    fn response_trailers_bytes(&self) -> u64 {
        // SAFETY: live log context.
        unsafe { abi::envoy_dynamic_module_callback_access_logger_get_response_trailers_bytes(self.ptr) }
    }
    fn timing(&self) -> Timing {
        let mut t = abi::envoy_dynamic_module_type_timing_info_v2::default();
        // SAFETY: live log context; `t` is a correctly sized (176 B, checked by bindgen layout
        // tests) out-struct.
        unsafe { abi::envoy_dynamic_module_callback_access_logger_get_timing_info_v2(self.ptr, &mut t) };
        Timing { ns: t.value, has: t.has }
    }
    fn bytes(&self) -> Bytes {
        let mut b = abi::envoy_dynamic_module_type_bytes_info::default();
        // SAFETY: live log context; correctly sized out-struct.
        unsafe { abi::envoy_dynamic_module_callback_access_logger_get_bytes_info(self.ptr, &mut b) };
        Bytes {
            received: b.bytes_received,
            sent: b.bytes_sent,
            upstream_wire_received: b.wire_bytes_received,
            upstream_wire_sent: b.wire_bytes_sent,
        }
    }
    fn downstream_wire_bytes(&self) -> (u64, u64) {
        let mut w = abi::envoy_dynamic_module_type_downstream_wire_bytes::default();
        // SAFETY: live log context; correctly sized out-struct.
        unsafe { abi::envoy_dynamic_module_callback_access_logger_get_downstream_wire_bytes(self.ptr, &mut w) };
        (w.wire_bytes_received, w.wire_bytes_sent)
    }
    fn pool_ready_ns(&self) -> Option<i64> {
        // SAFETY: live log context.
        let v =
            unsafe { abi::envoy_dynamic_module_callback_access_logger_get_upstream_pool_ready_duration_ns(self.ptr) };
        (v >= 0).then_some(v)
    }
    fn string(&self, f: StrField) -> Option<&[u8]> {
        use abi::*;
        use StrField::*;
        let getter: unsafe extern "C" fn(AL, *mut EB) -> bool = match f {
            Protocol => envoy_dynamic_module_callback_access_logger_get_protocol,
            RequestId => envoy_dynamic_module_callback_access_logger_get_request_id,
            ResponseCodeDetails => envoy_dynamic_module_callback_access_logger_get_response_code_details,
            RouteName => envoy_dynamic_module_callback_access_logger_get_route_name,
            LocalReplyBody => envoy_dynamic_module_callback_access_logger_get_local_reply_body,
            ConnectionTerminationDetails => {
                envoy_dynamic_module_callback_access_logger_get_connection_termination_details
            }
            RequestedServerName => envoy_dynamic_module_callback_access_logger_get_requested_server_name,
            UpstreamCluster => envoy_dynamic_module_callback_access_logger_get_upstream_cluster,
            UpstreamHostName => envoy_dynamic_module_callback_access_logger_get_upstream_host,
            UpstreamProtocol => envoy_dynamic_module_callback_access_logger_get_upstream_protocol,
            UpstreamTransportFailureReason => {
                envoy_dynamic_module_callback_access_logger_get_upstream_transport_failure_reason
            }
            DownstreamTlsVersion => envoy_dynamic_module_callback_access_logger_get_downstream_tls_version,
            DownstreamTlsCipher => envoy_dynamic_module_callback_access_logger_get_downstream_tls_cipher,
            DownstreamTlsSessionId => envoy_dynamic_module_callback_access_logger_get_downstream_tls_session_id,
            DownstreamPeerSubject => envoy_dynamic_module_callback_access_logger_get_downstream_peer_subject,
            DownstreamPeerIssuer => envoy_dynamic_module_callback_access_logger_get_downstream_peer_issuer,
            DownstreamPeerSerial => envoy_dynamic_module_callback_access_logger_get_downstream_peer_serial,
            DownstreamPeerCertDigest => envoy_dynamic_module_callback_access_logger_get_downstream_peer_cert_digest,
            DownstreamPeerFingerprint1 => envoy_dynamic_module_callback_access_logger_get_downstream_peer_fingerprint_1,
            DownstreamLocalSubject => envoy_dynamic_module_callback_access_logger_get_downstream_local_subject,
            DownstreamTransportFailureReason => {
                envoy_dynamic_module_callback_access_logger_get_downstream_transport_failure_reason
            }
            Ja3Hash => envoy_dynamic_module_callback_access_logger_get_ja3_hash,
            Ja4Hash => envoy_dynamic_module_callback_access_logger_get_ja4_hash,
            UpstreamTlsVersion => envoy_dynamic_module_callback_access_logger_get_upstream_tls_version,
            UpstreamTlsCipher => envoy_dynamic_module_callback_access_logger_get_upstream_tls_cipher,
            UpstreamTlsSessionId => envoy_dynamic_module_callback_access_logger_get_upstream_tls_session_id,
            UpstreamPeerSubject => envoy_dynamic_module_callback_access_logger_get_upstream_peer_subject,
            UpstreamPeerIssuer => envoy_dynamic_module_callback_access_logger_get_upstream_peer_issuer,
            UpstreamPeerCertDigest => envoy_dynamic_module_callback_access_logger_get_upstream_peer_cert_digest,
            UpstreamLocalSubject => envoy_dynamic_module_callback_access_logger_get_upstream_local_subject,
        };
        self.str_getter(getter)
    }
    fn address(&self, f: AddrField) -> Option<(&[u8], u32)> {
        use abi::*;
        let getter: unsafe extern "C" fn(AL, *mut EB, *mut u32) -> bool = match f {
            AddrField::DownstreamRemote => envoy_dynamic_module_callback_access_logger_get_downstream_remote_address,
            AddrField::DownstreamLocal => envoy_dynamic_module_callback_access_logger_get_downstream_local_address,
            AddrField::DownstreamDirectRemote => {
                envoy_dynamic_module_callback_access_logger_get_downstream_direct_remote_address
            }
            AddrField::DownstreamDirectLocal => {
                envoy_dynamic_module_callback_access_logger_get_downstream_direct_local_address
            }
            AddrField::UpstreamRemote => envoy_dynamic_module_callback_access_logger_get_upstream_remote_address,
            AddrField::UpstreamLocal => envoy_dynamic_module_callback_access_logger_get_upstream_local_address,
        };
        let mut out = empty_eb();
        let mut port = 0u32;
        // SAFETY: live log context; valid out-pointers; memory lives until the hook returns.
        unsafe {
            if getter(self.ptr, &mut out, &mut port) {
                Some((envoy_bytes(out), port))
            } else {
                None
            }
        }
    }
    fn sans<'s>(&'s self, f: SanField, out: &mut Vec<&'s [u8]>) {
        use abi::*;
        let (size, get): SanFns = match f {
            SanField::DownstreamPeerUri => (
                envoy_dynamic_module_callback_access_logger_get_downstream_peer_uri_san_size,
                envoy_dynamic_module_callback_access_logger_get_downstream_peer_uri_san,
            ),
            SanField::DownstreamPeerDns => (
                envoy_dynamic_module_callback_access_logger_get_downstream_peer_dns_san_size,
                envoy_dynamic_module_callback_access_logger_get_downstream_peer_dns_san,
            ),
            SanField::DownstreamLocalUri => (
                envoy_dynamic_module_callback_access_logger_get_downstream_local_uri_san_size,
                envoy_dynamic_module_callback_access_logger_get_downstream_local_uri_san,
            ),
            SanField::DownstreamLocalDns => (
                envoy_dynamic_module_callback_access_logger_get_downstream_local_dns_san_size,
                envoy_dynamic_module_callback_access_logger_get_downstream_local_dns_san,
            ),
            SanField::UpstreamPeerUri => (
                envoy_dynamic_module_callback_access_logger_get_upstream_peer_uri_san_size,
                envoy_dynamic_module_callback_access_logger_get_upstream_peer_uri_san,
            ),
            SanField::UpstreamPeerDns => (
                envoy_dynamic_module_callback_access_logger_get_upstream_peer_dns_san_size,
                envoy_dynamic_module_callback_access_logger_get_upstream_peer_dns_san,
            ),
            SanField::UpstreamLocalUri => (
                envoy_dynamic_module_callback_access_logger_get_upstream_local_uri_san_size,
                envoy_dynamic_module_callback_access_logger_get_upstream_local_uri_san,
            ),
            SanField::UpstreamLocalDns => (
                envoy_dynamic_module_callback_access_logger_get_upstream_local_dns_san_size,
                envoy_dynamic_module_callback_access_logger_get_upstream_local_dns_san,
            ),
        };
        // SAFETY: live log context; the array has exactly `n` elements as the ABI requires.
        unsafe {
            let n = size(self.ptr);
            if n == 0 {
                return;
            }
            let mut bufs = vec![empty_eb(); n];
            if get(self.ptr, bufs.as_mut_ptr()) {
                out.extend(bufs.into_iter().map(|b| envoy_bytes(b)));
            }
        }
    }
    fn cert_time(&self, f: CertTime) -> Option<i64> {
        use abi::*;
        // SAFETY: live log context.
        let v = unsafe {
            match f {
                CertTime::DownstreamPeerStart => {
                    envoy_dynamic_module_callback_access_logger_get_downstream_peer_cert_v_start(self.ptr)
                }
                CertTime::DownstreamPeerEnd => {
                    envoy_dynamic_module_callback_access_logger_get_downstream_peer_cert_v_end(self.ptr)
                }
                CertTime::UpstreamPeerStart => {
                    envoy_dynamic_module_callback_access_logger_get_upstream_peer_cert_v_start(self.ptr)
                }
                CertTime::UpstreamPeerEnd => {
                    envoy_dynamic_module_callback_access_logger_get_upstream_peer_cert_v_end(self.ptr)
                }
            }
        };
        (v > 0).then_some(v)
    }
    fn dynamic_metadata(&self, ns: &[u8], path: &[u8]) -> Option<MetaValue<'_>> {
        let (ns, path) = (module_buffer(ns), module_buffer(path));
        // SAFETY: live log context; key buffers outlive the calls; out-pointers valid.
        unsafe {
            let mut s = empty_eb();
            if abi::envoy_dynamic_module_callback_access_logger_get_dynamic_metadata(self.ptr, ns, path, &mut s) {
                return Some(MetaValue::Str(envoy_bytes(s)));
            }
            let mut n = 0f64;
            if abi::envoy_dynamic_module_callback_access_logger_get_dynamic_metadata_number(self.ptr, ns, path, &mut n)
            {
                return Some(MetaValue::Num(n));
            }
            let mut b = false;
            if abi::envoy_dynamic_module_callback_access_logger_get_dynamic_metadata_bool(self.ptr, ns, path, &mut b) {
                return Some(MetaValue::Bool(b));
            }
        }
        None
    }
    fn is_health_check(&self) -> bool {
        // SAFETY: live log context.
        unsafe { abi::envoy_dynamic_module_callback_access_logger_is_health_check(self.ptr) }
    }
}

/// The access-logger config handle Envoy gave `config_new`; every metric call takes it.
/// It lives until `on_access_logger_config_destroy`.
#[derive(Clone, Copy, Debug)]
pub struct ConfigHandle(*mut c_void);

// SAFETY: the handle is an opaque token; Envoy's metric callbacks on it are thread-safe
// (stats are atomics; the id table is frozen after config_new), and we only use it while the
// config object that owns it is alive (flush threads are joined in config_destroy).
unsafe impl Send for ConfigHandle {}
// SAFETY: see Send.
unsafe impl Sync for ConfigHandle {}

impl ConfigHandle {
    /// Wraps the `config_envoy_ptr` passed to `on_access_logger_config_new`.
    ///
    /// # Safety
    /// `ptr` must be that pointer; the handle must not be used after config destroy.
    pub unsafe fn new(ptr: *mut c_void) -> Self {
        ConfigHandle(ptr)
    }
}

impl Metrics for ConfigHandle {
    fn define_counter(&self, name: &str) -> Result<CounterId, String> {
        let mut id = 0usize;
        // SAFETY: valid handle during config_new; name outlives the call.
        let r = unsafe {
            abi::envoy_dynamic_module_callback_access_logger_config_define_counter(
                self.0,
                module_buffer(name.as_bytes()),
                &mut id,
            )
        };
        if r == 0 {
            Ok(CounterId(id))
        } else {
            Err(format!("defining counter {name} failed (result {r})"))
        }
    }

    fn define_gauge(&self, name: &str) -> Result<GaugeId, String> {
        let mut id = 0usize;
        // SAFETY: valid handle during config_new; name outlives the call.
        let r = unsafe {
            abi::envoy_dynamic_module_callback_access_logger_config_define_gauge(
                self.0,
                module_buffer(name.as_bytes()),
                &mut id,
            )
        };
        if r == 0 {
            Ok(GaugeId(id))
        } else {
            Err(format!("defining gauge {name} failed (result {r})"))
        }
    }

    fn add(&self, id: CounterId, v: u64) {
        if v > 0 {
            // SAFETY: valid handle (see type docs); unknown ids are rejected by Envoy, not UB.
            unsafe { abi::envoy_dynamic_module_callback_access_logger_increment_counter(self.0, id.0, v) };
        }
    }

    fn set(&self, id: GaugeId, v: u64) {
        // SAFETY: as for `add`.
        unsafe { abi::envoy_dynamic_module_callback_access_logger_set_gauge(self.0, id.0, v) };
    }

    fn shift(&self, id: GaugeId, from: u64, to: u64) {
        // SAFETY: as for `add`.
        unsafe {
            if to > from {
                abi::envoy_dynamic_module_callback_access_logger_increment_gauge(self.0, id.0, to - from);
            } else if from > to {
                abi::envoy_dynamic_module_callback_access_logger_decrement_gauge(self.0, id.0, from - to);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::HeaderTable;

    #[test]
    fn header_table_spills_past_the_inline_capacity() {
        let keys: Vec<String> = (0..40).map(|i| format!("x-h{i}")).collect();
        let mut t = HeaderTable::default();
        for k in &keys {
            t.push(k.as_bytes(), k.as_bytes());
        }
        assert_eq!(t.len(), 40);
        assert_eq!(t.get(b"x-h0"), Some(&b"x-h0"[..]));
        assert_eq!(t.get(b"x-h39"), Some(&b"x-h39"[..]));
        assert_eq!(t.get(b"x-h40"), None);
        let raw = t.reserve_raw(2);
        // SAFETY: two initialised entries are written into the reserved tail before the commit.
        unsafe {
            for i in 0..2 {
                raw.add(i).write(super::RawHeader {
                    key_ptr: b"k".as_ptr().cast(),
                    key_length: 1,
                    value_ptr: b"v".as_ptr().cast(),
                    value_length: 1,
                });
            }
            t.commit_raw(2);
        }
        assert_eq!((t.len(), t.get(b"k")), (42, Some(&b"v"[..])));
    }
}
