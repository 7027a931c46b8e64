//! Sends encoded OTLP export requests over gRPC (tonic) or HTTP/1.1 (hyper), with
//! compression, per-attempt timeouts and retries with jittered exponential backoff.
//!
//! Everything runs on a private current-thread tokio runtime owned by the flush thread that
//! created the client: no Envoy thread ever waits on the network.
use std::mem::ManuallyDrop;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};

use super::proto;
use super::settings::{Compression, Protocol, Settings, TlsSettings};
use crate::stop::StopSignal;

/// Longest server-requested retry delay honoured (Retry-After, RetryInfo); longer ones are cut.
const MAX_SERVER_DELAY_S: u64 = 3600;

/// How often [`Client::send`] reports [`Progress::Waiting`] while it waits.
const TICK: Duration = Duration::from_secs(1);

/// What [`Client::send`] reports while a request takes long.
#[derive(Debug)]
pub enum Progress<'a> {
    /// A retry is about to start.
    Retrying {
        /// Why the attempt before it failed.
        reason: &'a str,
    },
    /// Still waiting, on an attempt in flight or a backoff; about once per [`TICK`].
    Waiting,
}

/// Runs `a` unless `b` finishes first (then `None`), calling `tick` every [`TICK`] meanwhile.
async fn first_of<T>(
    a: impl std::future::Future<Output = T>,
    b: impl std::future::Future<Output = ()>,
    tick: &mut dyn FnMut(),
) -> Option<T> {
    use std::future::Future;
    use std::task::Poll;
    let (mut a, mut b) = (std::pin::pin!(a), std::pin::pin!(b));
    let mut timer = std::pin::pin!(tokio::time::sleep(TICK));
    std::future::poll_fn(|cx| {
        if let Poll::Ready(v) = a.as_mut().poll(cx) {
            return Poll::Ready(Some(v));
        }
        if b.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        while timer.as_mut().poll(cx).is_ready() {
            tick();
            timer.as_mut().reset(tokio::time::Instant::now() + TICK);
        }
        Poll::Pending
    })
    .await
}

/// Sleeps `d` in steps of at most [`TICK`], calling `tick` after each; false at once when a
/// deadline that falls before its end is set (as [`StopSignal::sleep`]).
fn sleep_ticking(stop: &StopSignal, d: Duration, tick: &mut dyn FnMut()) -> bool {
    let end = Instant::now() + d;
    loop {
        if stop.deadline().is_some_and(|dl| dl <= end) {
            return false;
        }
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return true;
        }
        if !stop.sleep(left.min(TICK)) {
            return false;
        }
        tick();
    }
}

/// How one export request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// Accepted; `rejected` records were refused by the collector (partial success).
    Accepted {
        /// Records the collector reported as rejected.
        rejected: u64,
        /// The collector's explanation, if any.
        message: String,
    },
    /// Not delivered: a permanent error, or retries ran out of time.
    Failed(String),
}

/// Result of one attempt.
#[derive(Debug)]
enum Attempt {
    Done(Delivery),
    /// Retryable; the server may have said how long to wait.
    Retry {
        after: Option<Duration>,
        reason: String,
    },
}

type Https = HttpClient<HttpsConnector<HttpConnector>, Full<Bytes>>;

enum Transport {
    Grpc(Channel),
    Http(Box<Https>),
}

/// rustls client config for the HTTP transport: the CA bundle (or the system's roots) and an
/// optional client identity.
fn rustls_config(t: &TlsSettings) -> std::io::Result<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let bad = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
    let mut roots = rustls::RootCertStore::empty();
    match &t.ca_pem {
        Some(pem) => {
            // A system bundle may hold a root rustls cannot take (legacy encodings): skip it,
            // as rustls advises for large sets, and fail only when none is usable.
            let certs = CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>();
            let certs = certs.map_err(|e| bad(format!("ca_file: {e}")))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(bad("ca_file: no usable CA certificate".into()));
            }
        }
        None => {
            for c in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(c);
            }
        }
    }
    client_config(roots, t.identity.as_ref()).map_err(bad)
}

/// A rustls client config trusting `roots`, with the client certificate and key of `identity`
/// (PEM) when given. Errors name the file they concern.
fn client_config(
    roots: rustls::RootCertStore,
    identity: Option<&(Vec<u8>, Vec<u8>)>,
) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    match identity {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(cert)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("cert_file: {e}"))?;
            let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| format!("key_file: {e}"))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| e.to_string())
        }
        None => Ok(builder.with_no_client_auth()),
    }
}

/// What a PEM file of the `tls` settings must hold, checked at config load (the exporter
/// itself starts on the flush thread, where a bad file could only fail every export).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PemKind {
    /// CA certificates, at least one rustls can use.
    Ca,
    /// A certificate chain.
    Chain,
    /// A private key.
    Key,
}

/// Checks `pem` holds what `kind` asks for.
pub(crate) fn check_pem(kind: PemKind, pem: &[u8]) -> Result<(), String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    match kind {
        PemKind::Ca | PemKind::Chain => {
            let certs =
                CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>().map_err(|e| e.to_string())?;
            if certs.is_empty() {
                return Err("holds no certificate".into());
            }
            if kind == PemKind::Ca && rustls::RootCertStore::empty().add_parsable_certificates(certs).0 == 0 {
                return Err("holds no usable CA certificate".into());
            }
        }
        PemKind::Key => {
            PrivateKeyDer::from_pem_slice(pem).map_err(|e| format!("holds no private key ({e})"))?;
        }
    }
    Ok(())
}

/// Checks a client certificate and its key go together.
pub(crate) fn check_identity(cert: &[u8], key: &[u8]) -> Result<(), String> {
    // The CA part is not under test here: an empty store, not the system's.
    client_config(rustls::RootCertStore::empty(), Some(&(cert.to_vec(), key.to_vec()))).map(|_| ())
}

/// Checks `name` can be a TLS server name (a DNS name or an IP address).
pub(crate) fn check_server_name(name: &str) -> Result<(), String> {
    rustls::pki_types::ServerName::try_from(name).map(|_| ()).map_err(|e| format!("{name:?}: {e}"))
}

/// What a send cost, for the caller's counters.
#[derive(Debug, Default, Clone, Copy)]
pub struct SendStats {
    /// Attempts after the first.
    pub retries: u64,
    /// Wall time from the first attempt to the final outcome.
    pub elapsed: Duration,
}

/// An OTLP client bound to one signal's settings.
pub struct Client {
    settings: Settings,
    /// Shut down without waiting in `drop` (see there).
    rt: ManuallyDrop<tokio::runtime::Runtime>,
    transport: Transport,
    http_uri: Option<http::Uri>,
    rng: u64,
}

impl Client {
    /// Builds the runtime and the (lazily connecting) transport. Call on the thread that will
    /// send; nothing connects until the first request.
    pub fn new(settings: Settings) -> std::io::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let (transport, http_uri) = match settings.protocol {
            Protocol::Grpc => {
                let mut ep = Endpoint::from_shared(settings.endpoint.clone())
                    .map_err(std::io::Error::other)?
                    .connect_timeout(settings.timeout)
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(30))
                    .keep_alive_while_idle(false);
                if let Some(t) = &settings.tls {
                    let mut tls = ClientTlsConfig::new();
                    tls = match &t.ca_pem {
                        Some(pem) => tls.ca_certificate(Certificate::from_pem(pem)),
                        None => tls.with_native_roots(),
                    };
                    if let Some((cert, key)) = &t.identity {
                        tls = tls.identity(Identity::from_pem(cert, key));
                    }
                    if let Some(name) = &t.server_name {
                        tls = tls.domain_name(name.clone());
                    }
                    ep = ep.tls_config(tls).map_err(std::io::Error::other)?;
                }
                let _guard = rt.enter();
                (Transport::Grpc(ep.connect_lazy()), None)
            }
            Protocol::HttpProtobuf => {
                let mut conn = HttpConnector::new();
                conn.set_nodelay(true);
                conn.set_connect_timeout(Some(settings.timeout));
                conn.enforce_http(false);
                let tls = match &settings.tls {
                    Some(t) => rustls_config(t)?,
                    None => rustls_config(&TlsSettings { ca_pem: None, identity: None, server_name: None })?,
                };
                let b = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http();
                let b = match settings.tls.as_ref().and_then(|t| t.server_name.clone()) {
                    Some(name) => {
                        let name = rustls::pki_types::ServerName::try_from(name).map_err(std::io::Error::other)?;
                        b.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name))
                    }
                    None => b,
                };
                let client = HttpClient::builder(TokioExecutor::new())
                    .pool_idle_timeout(Duration::from_secs(60))
                    .build(b.enable_http1().wrap_connector(conn));
                let uri = settings.endpoint.parse().map_err(std::io::Error::other)?;
                (Transport::Http(Box::new(client)), Some(uri))
            }
        };
        let seed =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
        Ok(Client { settings, rt: ManuallyDrop::new(rt), transport, http_uri, rng: seed | 1 })
    }

    /// Sends one encoded `Export*ServiceRequest`, retrying retryable failures until
    /// `retry.max_elapsed_ms` has passed or `stop`'s deadline (shutdown) is reached — a
    /// deadline set while a request is in flight or while backing off ends it too. `progress`
    /// hears of each retry and, about once a second, that the wait goes on.
    pub fn send(
        &mut self,
        body: Bytes,
        stop: &StopSignal,
        progress: &mut dyn FnMut(Progress<'_>),
    ) -> (Delivery, SendStats) {
        let start = Instant::now();
        let retry = self.settings.retry.clone();
        let limit = start + Duration::from_millis(retry.max_elapsed_ms);
        let give_up = || stop.deadline().map_or(limit, |d| d.min(limit));
        let body = match (self.settings.protocol, self.settings.compression) {
            (Protocol::HttpProtobuf, Compression::Gzip) => gzip(&body),
            _ => body,
        };
        let mut backoff = Duration::from_millis(retry.initial_backoff_ms);
        let mut stats = SendStats::default();
        loop {
            let now = Instant::now();
            // The first attempt gets the whole timeout (only a shutdown cuts it short); retries
            // fit in what is left of `max_elapsed_ms`.
            let until = if stats.retries == 0 { stop.deadline() } else { Some(give_up()) };
            let timeout = until.map_or(self.settings.timeout, |u| {
                self.settings.timeout.min(u.saturating_duration_since(now).max(Duration::from_millis(1)))
            });
            let mut tick = || progress(Progress::Waiting);
            let attempt =
                self.guarded(|c| c.rt.block_on(first_of(c.attempt(body.clone(), timeout), stop.reached(), &mut tick)));
            let (after, reason) = match attempt {
                Some(Attempt::Done(d)) => {
                    stats.elapsed = start.elapsed();
                    return (d, stats);
                }
                Some(Attempt::Retry { after, reason }) => (after, reason),
                None => {
                    stats.elapsed = start.elapsed();
                    return (Delivery::Failed("shutdown deadline reached during the request".into()), stats);
                }
            };
            // Equal jitter: half the backoff plus a random share of the other half.
            let jittered = backoff / 2 + Duration::from_nanos(self.next_rand() % (backoff.as_nanos() as u64 / 2 + 1));
            // A server-given delay (Retry-After, RetryInfo; both capped) may extend the backoff
            // but not shorten it: a `RetryInfo` of 0 (the OTLP spec's own example) or
            // `Retry-After: 0` would otherwise retry in a tight loop for all of max_elapsed.
            let wait = after.map_or(jittered, |a| a.max(jittered));
            let in_time = Instant::now().checked_add(wait).is_some_and(|t| t < give_up());
            if !retry.enabled || !in_time || !sleep_ticking(stop, wait, &mut || progress(Progress::Waiting)) {
                stats.elapsed = start.elapsed();
                let why = if retry.enabled { "retries exhausted" } else { "retry disabled" };
                return (Delivery::Failed(format!("{reason} ({why})")), stats);
            }
            stats.retries += 1;
            progress(Progress::Retrying { reason: &reason });
            backoff = (backoff * 2).min(Duration::from_millis(retry.max_backoff_ms));
        }
    }

    /// Runs one attempt, turning a panic inside the transport into a failed delivery: tonic
    /// panics on a malformed `grpc-status-details-bin` trailer, and a panic here would end the
    /// flush thread (exports stop, queues fill, counters freeze).
    fn guarded(&self, f: impl FnOnce(&Self) -> Option<Attempt>) -> Option<Attempt> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(self))).unwrap_or_else(|_| {
            Some(Attempt::Done(Delivery::Failed("the transport failed on the collector's response (panic)".into())))
        })
    }

    fn next_rand(&mut self) -> u64 {
        // xorshift64: jitter only needs to decorrelate senders, not be unpredictable.
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }

    async fn attempt(&self, body: Bytes, timeout: Duration) -> Attempt {
        let fut = async {
            match &self.transport {
                Transport::Grpc(ch) => self.grpc(ch.clone(), body, timeout).await,
                Transport::Http(c) => self.http(c, body).await,
            }
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(a) => a,
            Err(_) => Attempt::Retry { after: None, reason: format!("timed out after {} ms", timeout.as_millis()) },
        }
    }

    async fn grpc(&self, ch: Channel, body: Bytes, timeout: Duration) -> Attempt {
        let mut grpc = tonic::client::Grpc::new(ch);
        if self.settings.compression == Compression::Gzip {
            grpc = grpc.send_compressed(CompressionEncoding::Gzip);
        }
        grpc = grpc.accept_compressed(CompressionEncoding::Gzip).max_decoding_message_size(1 << 20);
        if let Err(e) = grpc.ready().await {
            return Attempt::Retry { after: None, reason: format!("connection: {e}") };
        }
        let mut req = tonic::Request::new(body);
        req.set_timeout(timeout);
        for (k, v) in &self.settings.headers {
            if let (Ok(k), Ok(v)) = (k.parse::<tonic::metadata::MetadataKey<_>>(), v.parse()) {
                req.metadata_mut().insert(k, v);
            }
        }
        let path = http::uri::PathAndQuery::from_static(self.settings.signal.grpc_path());
        match grpc.unary(req, path, RawCodec).await {
            Ok(resp) => Attempt::Done(partial_success(resp.get_ref())),
            Err(status) if response_too_large(&status) => {
                // The collector answered with a message, which a gRPC server sends only for a
                // call that succeeded; we only refused to read more than 1 MiB of it (its
                // partial-success details are lost). Retrying would deliver the records twice.
                Attempt::Done(Delivery::Accepted { rejected: 0, message: String::new() })
            }
            Err(status) => classify_grpc(&status),
        }
    }

    async fn http(&self, c: &Https, body: Bytes) -> Attempt {
        let Some(uri) = self.http_uri.clone() else {
            return Attempt::Done(Delivery::Failed("no HTTP endpoint".into()));
        };
        let mut b = http::Request::post(uri)
            .header(http::header::CONTENT_TYPE, "application/x-protobuf")
            .header(http::header::USER_AGENT, concat!("envoy-obs/", env!("CARGO_PKG_VERSION")));
        if self.settings.compression == Compression::Gzip {
            b = b.header(http::header::CONTENT_ENCODING, "gzip");
        }
        for (k, v) in &self.settings.headers {
            b = b.header(k.as_str(), v.as_str());
        }
        let req = match b.body(Full::new(body)) {
            Ok(r) => r,
            Err(e) => return Attempt::Done(Delivery::Failed(format!("request: {e}"))),
        };
        let resp = match c.request(req).await {
            Ok(r) => r,
            Err(e) => return Attempt::Retry { after: None, reason: format!("connection: {e}") },
        };
        let status = resp.status().as_u16();
        let retry_after = resp.headers().get(http::header::RETRY_AFTER).and_then(|v| retry_after(v.as_bytes()));
        // Redirects are not followed (a POST's body is not re-sent elsewhere unasked): the
        // warning names where the collector points, so the endpoint can be corrected.
        let location = match resp.headers().get(http::header::LOCATION) {
            Some(l) if (300..400).contains(&status) => {
                format!(" (redirected to {})", String::from_utf8_lossy(l.as_bytes()))
            }
            _ => String::new(),
        };
        let body = Limited::new(resp.into_body(), 1 << 20).collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        match status {
            200..=299 => Attempt::Done(partial_success(&body)),
            429 | 502 | 503 | 504 => Attempt::Retry { after: retry_after, reason: format!("HTTP {status}") },
            _ => Attempt::Done(Delivery::Failed(format!("HTTP {status}{location}: {}", status_message(&body)))),
        }
    }
}

/// `Export*ServiceResponse.partial_success` → rejected count and message (field 1 and 2 of
/// `Export*PartialSuccess` in all three signals).
fn partial_success(resp: &[u8]) -> Delivery {
    let Some(ps) = proto::get_bytes(resp, 1) else {
        return Delivery::Accepted { rejected: 0, message: String::new() };
    };
    let rejected = proto::get_varint(ps, 1).unwrap_or(0);
    let message = proto::get_bytes(ps, 2).map(|m| String::from_utf8_lossy(m).into_owned()).unwrap_or_default();
    Delivery::Accepted { rejected, message }
}

/// The message of a `google.rpc.Status` body (OTLP/HTTP error responses), else the raw text.
fn status_message(body: &[u8]) -> String {
    let m = proto::get_bytes(body, 2).map_or_else(|| String::from_utf8_lossy(body), String::from_utf8_lossy);
    m.chars().take(200).collect()
}

/// Retryable gRPC codes per the OTLP specification; RESOURCE_EXHAUSTED only when the server
/// says when to come back (`google.rpc.RetryInfo`).
fn classify_grpc(s: &Status) -> Attempt {
    let reason = format!("gRPC {:?}: {}", s.code(), s.message());
    let after = retry_info(s.details());
    // A status tonic made from a local transport error (the connection reset or closed by
    // GOAWAY while the request was in flight: UNKNOWN or INTERNAL with the error as its source)
    // is a disconnect without a response, which the OTLP specification retries; a status the
    // server sent has no source.
    if matches!(s.code(), Code::Unknown | Code::Internal) && std::error::Error::source(s).is_some() {
        return Attempt::Retry { after, reason };
    }
    match s.code() {
        Code::Cancelled
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::OutOfRange
        | Code::Unavailable
        | Code::DataLoss => Attempt::Retry { after, reason },
        Code::ResourceExhausted if after.is_some() => Attempt::Retry { after, reason },
        _ => Attempt::Done(Delivery::Failed(reason)),
    }
}

/// The status tonic makes when a response message is over `max_decoding_message_size`.
fn response_too_large(s: &Status) -> bool {
    s.code() == Code::OutOfRange && s.message().starts_with("Error, decoded message length too large")
}

/// A `Retry-After` header (RFC 9110 10.2.3), capped: delay-seconds, or an IMF-fixdate
/// (`Wed, 21 Oct 2015 07:28:00 GMT`) taken as the time left until then.
fn retry_after(v: &[u8]) -> Option<Duration> {
    retry_after_at(v, std::time::SystemTime::now())
}

fn retry_after_at(v: &[u8], now: std::time::SystemTime) -> Option<Duration> {
    let v = std::str::from_utf8(v).ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs.min(MAX_SERVER_DELAY_S)));
    }
    let at = std::time::UNIX_EPOCH + Duration::from_secs(imf_fixdate(v)?);
    Some(at.duration_since(now).unwrap_or(Duration::ZERO).min(Duration::from_secs(MAX_SERVER_DELAY_S)))
}

/// Seconds since the epoch of an IMF-fixdate, `Sun, 06 Nov 1994 08:49:37 GMT`.
fn imf_fixdate(v: &str) -> Option<u64> {
    let f: Vec<&str> = v.split(' ').collect();
    let [_, day, month, year, time, "GMT"] = f[..] else { return None };
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let m = MONTHS.iter().position(|&x| x == month)? as i64 + 1;
    let (d, y): (i64, i64) = (day.parse().ok()?, year.parse().ok()?);
    let hms: Vec<i64> = time.split(':').map(|x| x.parse().ok()).collect::<Option<_>>()?;
    let [h, mi, sec] = hms[..] else { return None };
    if !(1..=31).contains(&d) || !(1970..=9999).contains(&y) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm), proleptic Gregorian.
    let (y, mp) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let (era, yoe) = (y.div_euclid(400), y.rem_euclid(400));
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + (153 * mp + 2) / 5 + d - 1;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + h * 3600 + mi * 60 + sec).ok()
}

/// `retry_delay` of a `google.rpc.RetryInfo` inside a `google.rpc.Status` details list.
fn retry_info(details: &[u8]) -> Option<Duration> {
    proto::Reader::new(details).find_map(|(f, v)| {
        let proto::Field::Bytes(any) = v else { return None };
        if f != 3 || proto::get_bytes(any, 1)? != b"type.googleapis.com/google.rpc.RetryInfo" {
            return None;
        }
        let delay = proto::get_bytes(proto::get_bytes(any, 2)?, 1)?;
        let secs = proto::get_varint(delay, 1).unwrap_or(0);
        let nanos = proto::get_varint(delay, 2).unwrap_or(0);
        Some(Duration::from_secs(secs.min(MAX_SERVER_DELAY_S)) + Duration::from_nanos(nanos.min(999_999_999)))
    })
}

fn gzip(b: &[u8]) -> Bytes {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::with_capacity(b.len() / 4 + 64), flate2::Compression::fast());
    // Writing into a Vec cannot fail.
    let _ = enc.write_all(b);
    Bytes::from(enc.finish().unwrap_or_default())
}

/// Passes pre-encoded protobuf through tonic's framing (and compression) untouched.
#[derive(Clone, Copy, Default)]
struct RawCodec;

struct RawEncoder;
struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

impl Drop for Client {
    /// A plain drop of the runtime would wait for its blocking tasks, and the transports run
    /// `getaddrinfo` as one: a collector named by a host name whose DNS server does not answer
    /// would hold the config's destroy (Envoy's main thread) for the resolver's whole timeout.
    /// The runtime's tasks and connections are dropped here; such a lookup ends on its own.
    fn drop(&mut self) {
        // SAFETY: taken once, here, and never used again: the struct is being dropped.
        let rt = unsafe { ManuallyDrop::take(&mut self.rt) };
        rt.shutdown_background();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::otlp::settings::resolve;
    use crate::otlp::Signal;

    /// A self-signed CA (P-256, valid to 2125), generated for this test.
    /// A client certificate, its key and another key (test data, EC P-256, self-signed).
    pub(crate) const CLIENT_CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIBlzCCAT2gAwIBAgIUK8HJp/Kgk1WZaC3Vl1cqTQ0F5K8wCgYIKoZIzj0EAwIw\nIDEeMBwGA1UEAwwVZW52b3ktb2JzIHRlc3QgY2xpZW50MCAXDTI2MTEyNTA0MDEx\nNFoYDzIxMjYxMTAxMDQwMTE0WjAgMR4wHAYDVQQDDBVlbnZveS1vYnMgdGVzdCBj\nbGllbnQwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAASnCvPZMo7pE21XEc5VmzZq\nn2yuRuBvk/gxP7ZAoAaGzHmlm8ya9ae+Mf2Gtpp9NVJvJA30fDe7/pRQChFsKxmt\no1MwUTAdBgNVHQ4EFgQUDayMdLkpIuuAQXfjMmlrvTVC7JAwHwYDVR0jBBgwFoAU\nDayMdLkpIuuAQXfjMmlrvTVC7JAwDwYDVR0TAQH/BAUwAwEB/zAKBggqhkjOPQQD\nAgNIADBFAiEA+RA4yDTQt1oIIdlzRS5OodND46dFpp0ceOrw0qJJPNgCIDfWmK/C\nkBF4Zy9KEdS44K5U2AmMMz46zQp6xoBTDLNo\n-----END CERTIFICATE-----\n";
    pub(crate) const CLIENT_KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgO7pj275q6mv4Cb/6\nf4PKMydqAf8xaGKoMR0OCKINQyuhRANCAASnCvPZMo7pE21XEc5VmzZqn2yuRuBv\nk/gxP7ZAoAaGzHmlm8ya9ae+Mf2Gtpp9NVJvJA30fDe7/pRQChFsKxmt\n-----END PRIVATE KEY-----\n";
    pub(crate) const OTHER_KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgUMlOeYlQZ12wZHGz\nWVxogE2BPkLYTXPl9irNF/V31m2hRANCAATE0Lsg7ziZ211yjmcyI3c4Qpnlb3AQ\nNW8cdwybfCG8ysBFTXPNy0On4hwq9naHdj+NPFHonFXU89hqCV0CT4YU\n-----END PRIVATE KEY-----\n";

    pub(crate) const CA: &str = "-----BEGIN CERTIFICATE-----\nMIIBjjCCATWgAwIBAgIUAy9y/ks9n3RfOPE/K9PADFVhyY8wCgYIKoZIzj0EAwIw\nHDEaMBgGA1UEAwwRZW52b3ktb2JzIHRlc3QgQ0EwIBcNMjYxMTI1MDEzMzQxWhgP\nMjEyNjExMDEwMTMzNDFaMBwxGjAYBgNVBAMMEWVudm95LW9icyB0ZXN0IENBMFkw\nEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAESUox+iWw0UnydhuiCHOD2wOiBIqRfP1n\nDCl3n6rcZLCGlvpjwX7amhFn8R0BazPmzVVoL78DTpRAatWthqh7hqNTMFEwHQYD\nVR0OBBYEFM5xzCqGRI6ul5Y9wPXybfhYvjM0MB8GA1UdIwQYMBaAFM5xzCqGRI6u\nl5Y9wPXybfhYvjM0MA8GA1UdEwEB/wQFMAMBAf8wCgYIKoZIzj0EAwIDRwAwRAIg\neCcu7iN6xff6t560/y1DKUGqQicpWUzu+zL2qSOMQeYCIAL/wvOQFuu4kNgyuOpu\np70CyD5gDr1V6ZrzOnNT4rKU\n-----END CERTIFICATE-----\n";

    #[test]
    fn a_bundle_with_an_unusable_certificate_still_loads() {
        // A certificate block rustls cannot parse beside a good one, as a system bundle may
        // hold: the good one is used. A bundle of nothing usable still fails.
        let junk = "-----BEGIN CERTIFICATE-----\nAAECAwQFBgcICQ==\n-----END CERTIFICATE-----\n";
        let tls = |pem: String| TlsSettings { ca_pem: Some(pem.into_bytes()), identity: None, server_name: None };
        assert!(rustls_config(&tls(format!("{junk}{CA}"))).is_ok());
        assert!(rustls_config(&tls(CA.to_string())).is_ok());
        assert!(rustls_config(&tls(junk.to_string())).is_err());
    }

    #[test]
    fn partial_success_is_read() {
        let mut resp = Vec::new();
        proto::message(&mut resp, 1, |o| {
            proto::uint(o, 1, 7);
            proto::bytes(o, 2, b"bad attr");
        });
        assert_eq!(partial_success(&resp), Delivery::Accepted { rejected: 7, message: "bad attr".into() });
        assert_eq!(partial_success(&[]), Delivery::Accepted { rejected: 0, message: String::new() });
    }

    /// Sends to `endpoint` with a 30 s attempt timeout and 60 s of retries, and sets the stop
    /// deadline 300 ms in from another thread: `send` must give up by then.
    fn cut_short_by_stop(endpoint: String, protocol: Protocol) -> Duration {
        let mut settings = resolve(&Default::default(), Signal::Logs, &|_| None).unwrap();
        settings.endpoint = endpoint;
        settings.protocol = protocol;
        settings.timeout = Duration::from_secs(30);
        settings.retry.max_elapsed_ms = 60_000;
        let mut c = Client::new(settings).unwrap();
        let stop = StopSignal::default();
        let s2 = stop.clone();
        let t = Instant::now();
        let setter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            s2.stop_by(Instant::now() + Duration::from_millis(100));
        });
        let (d, _) = c.send(Bytes::from_static(b"x"), &stop, &mut |_| {});
        setter.join().unwrap();
        assert!(matches!(d, Delivery::Failed(_)));
        t.elapsed()
    }

    /// A blocking task still running on the client's runtime (what a `getaddrinfo` to a DNS
    /// server that does not answer is) does not hold up dropping the client.
    #[test]
    fn dropping_the_client_does_not_wait_for_a_blocking_lookup() {
        for protocol in [Protocol::Grpc, Protocol::HttpProtobuf] {
            let mut settings = resolve(&Default::default(), Signal::Logs, &|_| None).unwrap();
            settings.endpoint = "http://collector.example:4317".into();
            settings.protocol = protocol;
            let c = Client::new(settings).unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            c.rt.spawn_blocking(move || {
                let _ = tx.send(());
                std::thread::sleep(Duration::from_secs(3));
            });
            rx.recv().unwrap();
            let t = Instant::now();
            drop(c);
            assert!(t.elapsed() < Duration::from_secs(1), "{protocol:?}: {:?}", t.elapsed());
        }
    }

    #[test]
    fn a_stop_deadline_ends_a_request_in_flight() {
        // A collector that accepts connections and never answers.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let _hold = std::thread::spawn(move || {
            let conns: Vec<_> = l.incoming().take(4).collect();
            std::thread::sleep(Duration::from_secs(5));
            drop(conns);
        });
        let url = format!("http://{addr}/v1/logs");
        let took = cut_short_by_stop(url, Protocol::HttpProtobuf);
        assert!(took < Duration::from_secs(2), "{took:?}");
    }

    #[test]
    fn a_stop_deadline_ends_the_backoff_against_a_dead_collector() {
        // A port nobody listens on: connection refused, then backoff sleeps.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let took = cut_short_by_stop(format!("http://127.0.0.1:{port}"), Protocol::Grpc);
        assert!(took < Duration::from_secs(2), "{took:?}");
    }

    /// Each retry is reported as it starts, with the failure before it, and a long backoff
    /// ticks about once a second (the pipeline publishes its counters on those).
    #[test]
    fn progress_reports_retries_and_ticks_through_a_backoff() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut settings = resolve(&Default::default(), Signal::Logs, &|_| None).unwrap();
        (settings.endpoint, settings.protocol) = (format!("http://127.0.0.1:{port}/v1/logs"), Protocol::HttpProtobuf);
        // Waits of 1–2 s, then 2–4 s: the first always fits in 2.5 s, a second never does.
        settings.retry.initial_backoff_ms = 2_000;
        settings.retry.max_backoff_ms = 4_000;
        settings.retry.max_elapsed_ms = 2_500;
        let (mut retries, mut ticks, mut reasons) = (0, 0, Vec::new());
        let (d, st) =
            Client::new(settings).unwrap().send(Bytes::from_static(b"x"), &StopSignal::default(), &mut |p| match p {
                Progress::Retrying { reason } => {
                    retries += 1;
                    reasons.push(reason.to_string());
                }
                Progress::Waiting => ticks += 1,
            });
        assert!(matches!(d, Delivery::Failed(_)), "{d:?}");
        assert_eq!((retries, st.retries), (1, 1), "{reasons:?}");
        assert!(reasons[0].starts_with("connection"), "{reasons:?}");
        assert!((1..=3).contains(&ticks), "{ticks} ticks");
    }

    /// `retry.max_elapsed_ms` bounds the retries, never the first attempt: with 0 the one
    /// attempt still gets the whole timeout (it got 1 ms, and every export failed).
    #[test]
    fn no_retry_time_still_leaves_the_first_attempt_its_timeout() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            use std::io::{Read, Write};
            let (mut s, _) = l.accept().unwrap();
            let mut buf = [0u8; 65536];
            let _ = s.read(&mut buf);
            std::thread::sleep(Duration::from_millis(50));
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").unwrap();
        });
        let mut settings = resolve(&Default::default(), Signal::Logs, &|_| None).unwrap();
        (settings.endpoint, settings.protocol) = (format!("http://{addr}/v1/logs"), Protocol::HttpProtobuf);
        settings.timeout = Duration::from_secs(5);
        settings.retry.max_elapsed_ms = 0;
        let (d, _) = Client::new(settings).unwrap().send(Bytes::from_static(b"x"), &StopSignal::default(), &mut |_| {});
        server.join().unwrap();
        assert_eq!(d, Delivery::Accepted { rejected: 0, message: String::new() });
    }

    /// A status tonic made from a transport error (a reset mid-request) is retried; the same
    /// code sent by the server is not.
    #[test]
    fn a_connection_lost_mid_request_is_retried() {
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection reset");
        let local = Status::from_error(Box::new(reset));
        assert!(matches!(classify_grpc(&local), Attempt::Retry { .. }), "{local:?}");
        for sent in [Status::internal("server bug"), Status::unknown("server says")] {
            assert!(matches!(classify_grpc(&sent), Attempt::Done(Delivery::Failed(_))), "{sent:?}");
        }
    }

    /// A panic inside the transport is a failed delivery, and the client's runtime still works
    /// afterwards.
    #[test]
    fn a_panicking_transport_fails_the_delivery_not_the_thread() {
        let settings = resolve(&Default::default(), Signal::Logs, &|_| None).unwrap();
        let c = Client::new(settings).unwrap();
        let a = c.guarded(|c| c.rt.block_on(async { panic!("malformed trailer") }));
        assert!(matches!(a, Some(Attempt::Done(Delivery::Failed(_)))));
        assert_eq!(c.rt.block_on(async { 7 }), 7);
    }

    #[test]
    fn server_delays_are_capped() {
        assert_eq!(retry_after(b" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(retry_after(b"18446744073709551615"), Some(Duration::from_secs(MAX_SERVER_DELAY_S)));
        // An HTTP date: the time left until it (0 once past), capped too.
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_445_412_450); // 2015-10-21 07:27:30 UTC
        assert_eq!(retry_after_at(b"Wed, 21 Oct 2015 07:28:00 GMT", now), Some(Duration::from_secs(30)));
        assert_eq!(retry_after_at(b"Wed, 21 Oct 2015 07:27:00 GMT", now), Some(Duration::ZERO));
        assert_eq!(
            retry_after_at(b"Thu, 22 Oct 2015 07:28:00 GMT", now),
            Some(Duration::from_secs(MAX_SERVER_DELAY_S))
        );
        assert_eq!(imf_fixdate("Sun, 06 Nov 1994 08:49:37 GMT"), Some(784_111_777));
        assert_eq!(imf_fixdate("Thu, 29 Feb 2024 00:00:00 GMT"), Some(1_709_164_800));
        for bad in
            ["Wed, 21 Oct 2015 07:28:00 UTC", "Wednesday, 21-Oct-15 07:28:00 GMT", "Wed, 21 Foo 2015 07:28:00 GMT", ""]
        {
            assert_eq!(retry_after(bad.as_bytes()), None, "{bad}");
        }
        assert_eq!(retry_after(b"-1"), None);
        // The capped delay can be added to now without overflow.
        assert!(Instant::now().checked_add(retry_after(b"99999999999").unwrap()).is_some());
    }

    #[test]
    fn retry_info_is_found_in_status_details() {
        let mut st = Vec::new();
        proto::uint(&mut st, 1, 8);
        proto::message(&mut st, 3, |o| {
            proto::bytes(o, 1, b"type.googleapis.com/google.rpc.RetryInfo");
            proto::message(o, 2, |o| {
                proto::message(o, 1, |o| {
                    proto::uint(o, 1, 2);
                    proto::uint(o, 2, 500_000_000);
                })
            });
        });
        assert_eq!(retry_info(&st), Some(Duration::from_millis(2500)));
        let s = Status::with_details(Code::ResourceExhausted, "slow down", Bytes::from(st));
        assert!(matches!(classify_grpc(&s), Attempt::Retry { after: Some(_), .. }));
        let s = Status::new(Code::ResourceExhausted, "no info");
        assert!(matches!(classify_grpc(&s), Attempt::Done(Delivery::Failed(_))));
        assert!(matches!(classify_grpc(&Status::unavailable("x")), Attempt::Retry { after: None, .. }));
        assert!(matches!(classify_grpc(&Status::invalid_argument("x")), Attempt::Done(_)));
    }

    #[test]
    fn gzip_round_trips() {
        use std::io::Read;
        let data = vec![b'a'; 10_000];
        let z = gzip(&data);
        let mut back = Vec::new();
        flate2::read::GzDecoder::new(&z[..]).read_to_end(&mut back).unwrap();
        assert_eq!(back, data);
    }
}
