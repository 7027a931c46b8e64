//! Bench only: the least a dynamic module can cost Envoy 1.40 for what the benchmarks ask of
//! ours, so that bench/README.md can say how much of a cost is the ABI's own price.
//!
//! - Access logger (`bench/access_log_bench.py`, variant `abi_floor`): the `log` hook makes
//!   exactly the ABI calls that `libenvoy_obs_access_log.so` makes for the benchmark's 17-field
//!   `json_format` map — both header maps fetched whole, timing, bytes, protocol, response code,
//!   response flags, the upstream and downstream remote addresses, the upstream cluster — and
//!   throws the answers away: nothing is captured, queued or written.
//! - Access logger `queue` (variant `floor_queue`): the same calls through our safe FFI
//!   (`LogStream`), their values copied into our per-worker queue (`Pipeline`) as one
//!   hand-written record of the 17 fields, which a flush thread drops. That is what a capture
//!   with no format plan costs: ours minus this is the price of the generic plan.
//! - Tracer (`bench/tracer_bench.py`, variant `abifloor_0`): the propagation a tracer cannot do
//!   without — `start_span` reads `traceparent`, `inject_context` writes one with fresh ids — and
//!   nothing else: every span is one static token, tags, events and finishes are dropped, nothing
//!   is exported.
//!
//! Thread model: the floor's hooks run on Envoy's workers and touch only their stack and one
//! relaxed atomic store; `queue` is our pipeline's model (one producer per worker, one flush
//! thread). This is not a product module: it follows none of the config rules, and the floor
//! talks to the raw bindings directly because it has nothing to make safe above them.
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use envoy_obs_abi as abi;
use envoy_obs_common::ffi::access_log::{AddrField, HeaderKind, HeaderTable, LogStream, StrField, Stream};
use envoy_obs_common::ffi::{envoy_bytes, module_buffer};
use envoy_obs_common::pipeline::{Batch, Exporter, Outcome, Pipeline, PipelineConfig, Producer};
use envoy_obs_common::rand::rand64;
use envoy_obs_common::w3c::hex_to;

/// Where the answers go, so the calls' results are used (one store per record).
static SINK: AtomicU64 = AtomicU64::new(0);
/// Any non-null pointer serves as the config and the per-thread logger.
static TOKEN: u8 = 0;
/// Header entries fetched per map at most (the benchmark's maps have 7 and 5).
const MAX_HEADERS: usize = 64;
/// `envoy_dynamic_module_type_http_header_type` values (the ABI's RequestHeader, ResponseHeader).
const REQUEST_HEADERS: u32 = 0;
const RESPONSE_HEADERS: u32 = 2;

// The ABI version, and the module pinned: `queue` has a flush thread.
envoy_obs_common::declare_program_init!();

/// Accepts any config: logger `queue` gets a pipeline (none under `--mode validate`), any other
/// name the floor's token.
///
/// # Safety
/// Called by Envoy on the main thread with a valid name buffer.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_access_logger_config_new(
    _config_envoy_ptr: *mut std::ffi::c_void,
    name: abi::envoy_dynamic_module_type_envoy_buffer,
    _config: abi::envoy_dynamic_module_type_envoy_buffer,
) -> *const std::ffi::c_void {
    // SAFETY: Envoy's name buffer is valid during the call (a null one reads as empty).
    let name = unsafe { envoy_bytes(name) };
    if name != b"queue" || envoy_obs_common::ffi::is_validation_mode() {
        return (&raw const TOKEN).cast();
    }
    let cfg = PipelineConfig {
        thread_name: "obs-floor-queue".into(),
        slots: envoy_obs_common::ffi::concurrency() as usize + 1,
        queue_capacity: 16_384,
        flush_interval: std::time::Duration::from_secs(1),
        shutdown_timeout: std::time::Duration::from_secs(5),
    };
    match Pipeline::start(cfg, Drop_, ()) {
        Ok(p) => Box::into_raw(Box::new(p)).cast_const().cast(),
        Err(_) => std::ptr::null(),
    }
}

/// Frees a `queue` pipeline (draining it).
///
/// # Safety
/// `config` comes from `config_new` and is not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_access_logger_config_destroy(config: *const std::ffi::c_void) {
    if config != (&raw const TOKEN).cast() {
        // SAFETY: made by Box::into_raw in config_new.
        drop(unsafe { Box::from_raw(config.cast::<Pipeline>().cast_mut()) });
    }
}

/// The floor's token, or for `queue` this worker's producer.
///
/// # Safety
/// `config` comes from `config_new`; `logger_envoy_ptr` is this thread's logger context.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_access_logger_new(
    config: *const std::ffi::c_void,
    logger_envoy_ptr: *mut std::ffi::c_void,
) -> *const std::ffi::c_void {
    if config == (&raw const TOKEN).cast() {
        return (&raw const TOKEN).cast();
    }
    // SAFETY: a live pipeline (config outlives its loggers); get_worker_index is valid here.
    let (p, worker) = unsafe { (&*config.cast::<Pipeline>(), LogStream::worker_index(logger_envoy_ptr)) };
    Box::into_raw(Box::new(p.producer(worker as usize))).cast_const().cast()
}

/// Drops every batch: the flush thread of `queue`.
struct Drop_;

impl Exporter for Drop_ {
    fn export(&mut self, batch: &Batch) -> Outcome {
        Outcome { written: batch.len() as u64, failed: 0 }
    }
}

/// The 17 fields as one hand-written record: the values the plan would capture, without it.
fn capture(s: &LogStream<'_>, out: &mut Vec<u8>) {
    fn put(out: &mut Vec<u8>, b: &[u8]) {
        out.extend_from_slice(&(b.len() as u32).to_le_bytes());
        out.extend_from_slice(b);
    }
    let t = s.timing();
    out.extend_from_slice(&t.get(0).unwrap_or(-1).to_le_bytes());
    out.extend_from_slice(&t.get(17).unwrap_or(-1).to_le_bytes());
    let b = s.bytes();
    out.extend_from_slice(&b.received.to_le_bytes());
    out.extend_from_slice(&b.sent.to_le_bytes());
    let mut req = HeaderTable::default();
    s.headers(HeaderKind::Request, &mut req);
    put(out, req.get(b":method").unwrap_or_default());
    put(out, req.get(b"x-envoy-original-path").or_else(|| req.get(b":path")).unwrap_or_default());
    for n in [&b"x-forwarded-for"[..], b"user-agent", b"x-request-id", b":authority"] {
        put(out, req.get(n).unwrap_or_default());
    }
    let mut resp = HeaderTable::default();
    s.headers(HeaderKind::Response, &mut resp);
    put(out, resp.get(b"x-envoy-upstream-service-time").unwrap_or_default());
    put(out, s.string(StrField::Protocol).unwrap_or_default());
    out.extend_from_slice(&s.response_code().to_le_bytes());
    out.extend_from_slice(&s.response_flags().to_le_bytes());
    for f in [AddrField::UpstreamRemote, AddrField::DownstreamRemote] {
        let (ip, port) = s.address(f).unwrap_or_default();
        put(out, ip);
        out.extend_from_slice(&port.to_le_bytes());
    }
    put(out, s.string(StrField::UpstreamCluster).unwrap_or_default());
}

/// Frees a `queue` producer (the floor's token: nothing).
///
/// # Safety
/// `logger` comes from `logger_new` on this thread and is not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_access_logger_destroy(logger: *const std::ffi::c_void) {
    if logger != (&raw const TOKEN).cast() {
        // SAFETY: made by Box::into_raw in logger_new, on this thread.
        drop(unsafe { Box::from_raw(logger.cast::<Producer>().cast_mut()) });
    }
}

fn header_map(l: *mut std::ffi::c_void, kind: u32) -> u64 {
    // SAFETY: `l` is the live log context of the current `log` call.
    let n = unsafe { abi::envoy_dynamic_module_callback_access_logger_get_headers_size(l, kind) };
    if n == 0 || n > MAX_HEADERS {
        return n as u64;
    }
    let mut buf = [const { MaybeUninit::<abi::envoy_dynamic_module_type_envoy_http_header>::uninit() }; MAX_HEADERS];
    // SAFETY: `buf` has room for the `n` entries Envoy writes; `l` is live.
    let ok = unsafe { abi::envoy_dynamic_module_callback_access_logger_get_headers(l, kind, buf.as_mut_ptr().cast()) };
    n as u64 + ok as u64
}

fn string(l: *mut std::ffi::c_void, getter: unsafe extern "C" fn(*mut std::ffi::c_void, *mut abi::EB) -> bool) -> u64 {
    let mut b = abi::EB { ptr: std::ptr::null(), length: 0 };
    // SAFETY: `l` is live; `b` is a valid out-parameter.
    unsafe { getter(l, &mut b) };
    b.length as u64
}

fn address(
    l: *mut std::ffi::c_void,
    getter: unsafe extern "C" fn(*mut std::ffi::c_void, *mut abi::EB, *mut u32) -> bool,
) -> u64 {
    let mut b = abi::EB { ptr: std::ptr::null(), length: 0 };
    let mut port = 0u32;
    // SAFETY: `l` is live; `b` and `port` are valid out-parameters.
    unsafe { getter(l, &mut b, &mut port) };
    b.length as u64 + u64::from(port)
}

/// The ABI calls of the 17-field map, in the order our JSON logger makes them.
///
/// # Safety
/// Called by Envoy inside a stream's access-log phase, with that stream's live log context.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_access_logger_log(
    l: *mut std::ffi::c_void,
    logger: *const std::ffi::c_void,
    _log_type: u32,
) {
    use abi::*;
    if logger != (&raw const TOKEN).cast() {
        // SAFETY: this thread's producer; `l` is live for the call.
        let (p, s) = unsafe { (&*logger.cast::<Producer>(), LogStream::new(l)) };
        p.push_with(|out| capture(&s, out));
        return;
    }
    let mut timing = MaybeUninit::<envoy_dynamic_module_type_timing_info_v2>::uninit();
    let mut bytes = MaybeUninit::<envoy_dynamic_module_type_bytes_info>::uninit();
    // SAFETY: `l` is live; Envoy fills both structs whole.
    let (t, b) = unsafe {
        envoy_dynamic_module_callback_access_logger_get_timing_info_v2(l, timing.as_mut_ptr());
        envoy_dynamic_module_callback_access_logger_get_bytes_info(l, bytes.as_mut_ptr());
        (timing.assume_init(), bytes.assume_init())
    };
    let mut acc = t.value[0] as u64 ^ t.value[17] as u64 ^ b.bytes_received ^ b.bytes_sent;
    acc += header_map(l, REQUEST_HEADERS);
    acc += string(l, envoy_dynamic_module_callback_access_logger_get_protocol);
    // SAFETY: `l` is live.
    acc += unsafe {
        u64::from(envoy_dynamic_module_callback_access_logger_get_response_code(l))
            ^ envoy_dynamic_module_callback_access_logger_get_response_flags(l)
    };
    acc += header_map(l, RESPONSE_HEADERS);
    acc += address(l, envoy_dynamic_module_callback_access_logger_get_upstream_remote_address);
    acc += string(l, envoy_dynamic_module_callback_access_logger_get_upstream_cluster);
    acc += address(l, envoy_dynamic_module_callback_access_logger_get_downstream_remote_address);
    SINK.store(acc, Relaxed);
}

/// Any config, one token for every span.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_tracer_config_new(
    _config_envoy_ptr: *mut std::ffi::c_void,
    _name: abi::EB,
    _config: abi::EB,
) -> *const std::ffi::c_void {
    (&raw const TOKEN).cast()
}

/// Nothing to free.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_tracer_config_destroy(_config: *const std::ffi::c_void) {}

/// Reads the incoming `traceparent`, as any tracer continuing W3C traces must.
///
/// # Safety
/// Called by Envoy on a worker with the request's trace context.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_tracer_start_span(
    _config: *const std::ffi::c_void,
    span_envoy_ptr: *mut std::ffi::c_void,
    _operation: abi::EB,
    traced: bool,
    _reason: u32,
) -> *const std::ffi::c_void {
    let mut v = abi::EB { ptr: std::ptr::null(), length: 0 };
    // SAFETY: the trace context is valid during this hook; `v` is a valid out-parameter.
    unsafe {
        abi::envoy_dynamic_module_callback_tracer_get_trace_context_value(
            span_envoy_ptr,
            module_buffer(b"traceparent"),
            &mut v,
        )
    };
    SINK.store(v.length as u64 + traced as u64, Relaxed);
    (&raw const TOKEN).cast()
}

/// Writes an unsampled `traceparent` with fresh ids for the upstream, as any propagating tracer
/// must. Fresh per request, not one fixed value: over HTTP/2 Envoy's HPACK encoder would index a
/// value that repeats and send it as a one-byte reference, while every real trace context is
/// new and costs a Huffman-coded literal (about 2,000 of Envoy's instructions a request).
///
/// # Safety
/// Called by Envoy with the upstream request's trace context.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_tracer_span_inject_context(
    _span: *const std::ffi::c_void,
    span_envoy_ptr: *mut std::ffi::c_void,
) {
    // Trace id (16 bytes) then span id (8), random.
    let mut ids = [0u8; 24];
    for w in ids.chunks_exact_mut(8) {
        w.copy_from_slice(&rand64().to_be_bytes());
    }
    let mut tp = *b"00-00000000000000000000000000000000-0000000000000000-00";
    hex_to(&ids[..16], &mut tp[3..35]);
    hex_to(&ids[16..], &mut tp[36..52]);
    // SAFETY: the trace context is valid during this hook; Envoy copies both buffers.
    unsafe {
        abi::envoy_dynamic_module_callback_tracer_set_trace_context_value(
            span_envoy_ptr,
            module_buffer(b"traceparent"),
            module_buffer(&tp),
        )
    };
}

/// The same token.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_tracer_span_spawn_child(
    _span: *const std::ffi::c_void,
    _name: abi::EB,
    _start_time_ns: i64,
) -> *const std::ffi::c_void {
    (&raw const TOKEN).cast()
}

/// Dropped.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_tracer_span_set_operation(_span: *const std::ffi::c_void, _op: abi::EB) {}

/// Dropped.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_tracer_span_set_tag(
    _span: *const std::ffi::c_void,
    _k: abi::EB,
    _v: abi::EB,
) {
}

/// Dropped.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_tracer_span_log(_span: *const std::ffi::c_void, _ts: i64, _event: abi::EB) {}

/// Dropped.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_tracer_span_finish(_span: *const std::ffi::c_void) {}

/// Dropped.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_tracer_span_set_sampled(_span: *const std::ffi::c_void, _sampled: bool) {}

/// Envoy's decision stands.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_tracer_span_use_local_decision(_span: *const std::ffi::c_void) -> bool {
    true
}

/// No baggage.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_tracer_span_get_baggage(
    _span: *const std::ffi::c_void,
    _key: abi::EB,
    _out: *mut abi::MB,
) -> bool {
    false
}

/// Dropped.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_tracer_span_set_baggage(
    _span: *const std::ffi::c_void,
    _k: abi::EB,
    _v: abi::EB,
) {
}

/// No id.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_tracer_span_get_trace_id(
    _span: *const std::ffi::c_void,
    _out: *mut abi::MB,
) -> bool {
    false
}

/// No id.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_tracer_span_get_span_id(
    _span: *const std::ffi::c_void,
    _out: *mut abi::MB,
) -> bool {
    false
}

/// Nothing to free.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_tracer_span_destroy(_span: *const std::ffi::c_void) {}
