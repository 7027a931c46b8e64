//! Bench only (`bench/access_log_bench.py`, variant `abi_floor`): a dynamic-module access logger
//! whose `log` hook makes exactly the Envoy 1.40 ABI calls that `libenvoy_obs_access_log.so`
//! makes for the benchmark's 17-field `json_format` map — both header maps fetched whole,
//! timing, bytes, protocol, response code, response flags, the upstream and downstream remote
//! addresses, the upstream cluster — and then throws the answers away. Nothing is captured,
//! queued or written, so its added cost is the least any module can add for that map through
//! this ABI: Envoy's dispatch into a module plus its getters.
//!
//! Thread model: `log` runs on the worker that ends the stream and touches only its stack and
//! one relaxed atomic store. It is not a product module: it follows none of the config rules,
//! and it talks to the raw bindings directly because it has nothing to make safe above them.
use std::ffi::c_char;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use envoy_obs_abi as abi;

/// Where the answers go, so the calls' results are used (one store per record).
static SINK: AtomicU64 = AtomicU64::new(0);
/// Any non-null pointer serves as the config and the per-thread logger.
static TOKEN: u8 = 0;
/// Header entries fetched per map at most (the benchmark's maps have 7 and 5).
const MAX_HEADERS: usize = 64;
/// `envoy_dynamic_module_type_http_header_type` values (the ABI's RequestHeader, ResponseHeader).
const REQUEST_HEADERS: u32 = 0;
const RESPONSE_HEADERS: u32 = 2;

/// Called once by Envoy when it dlopen()s this module.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
    abi::ABI_VERSION.as_ptr().cast()
}

/// Accepts any config.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_access_logger_config_new(
    _config_envoy_ptr: *mut std::ffi::c_void,
    _name: abi::envoy_dynamic_module_type_envoy_buffer,
    _config: abi::envoy_dynamic_module_type_envoy_buffer,
) -> *const std::ffi::c_void {
    (&raw const TOKEN).cast()
}

/// Nothing to free.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_access_logger_config_destroy(_config: *const std::ffi::c_void) {}

/// The same token for every thread.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_access_logger_new(
    _config: *const std::ffi::c_void,
    _logger_envoy_ptr: *mut std::ffi::c_void,
) -> *const std::ffi::c_void {
    (&raw const TOKEN).cast()
}

/// Nothing to free.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_access_logger_destroy(_logger: *const std::ffi::c_void) {}

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
    _logger: *const std::ffi::c_void,
    _log_type: u32,
) {
    use abi::*;
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
