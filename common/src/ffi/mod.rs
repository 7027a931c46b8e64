//! The FFI seam. Raw pointers from Envoy stop here: above this module code sees borrowed
//! views that cannot outlive the hook that produced them, plain enums mapped from C integers,
//! and `Copy` metric-handle newtypes.
use envoy_obs_abi as abi;

pub mod access_log;

/// Bytes owned by Envoy, borrowed for the duration of a hook (`'a`).
///
/// # Safety
/// `b` must be `{NULL, 0}` or point at `b.length` readable bytes that stay valid for `'a`.
#[inline]
pub unsafe fn envoy_bytes<'a>(b: abi::EB) -> &'a [u8] {
    if b.ptr.is_null() || b.length == 0 {
        &[]
    } else {
        // SAFETY: non-null and `length` bytes readable for 'a, per this function's contract.
        unsafe { std::slice::from_raw_parts(b.ptr.cast::<u8>(), b.length) }
    }
}

/// A module-owned buffer pointing at `s` (valid while `s` is borrowed).
#[inline]
pub fn module_buffer(s: &[u8]) -> abi::MB {
    abi::MB { ptr: s.as_ptr().cast(), length: s.len() }
}

/// An empty Envoy buffer, for out-parameters.
#[inline]
pub(crate) fn empty_eb() -> abi::EB {
    abi::EB { ptr: std::ptr::null(), length: 0 }
}

/// A borrowed byte view tied to a hook's lifetime: what hooks hand to `_impl` functions.
#[derive(Clone, Copy)]
pub struct View<'a> {
    bytes: &'a [u8],
}

impl<'a> View<'a> {
    /// Wraps an Envoy buffer passed into a hook.
    ///
    /// # Safety
    /// Same as [`envoy_bytes`].
    pub unsafe fn from_envoy(b: abi::EB) -> Self {
        // SAFETY: forwarded contract.
        View { bytes: unsafe { envoy_bytes(b) } }
    }
    /// The raw bytes.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }
    /// Lossy UTF-8 text: invalid sequences become U+FFFD, never a panic.
    pub fn lossy(&self) -> std::borrow::Cow<'a, str> {
        String::from_utf8_lossy(self.bytes)
    }
}

/// Envoy's log levels (spdlog numbering).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum LogLevel {
    /// trace
    Trace = 0,
    /// debug
    Debug = 1,
    /// info
    Info = 2,
    /// warning
    Warn = 3,
    /// error
    Error = 4,
    /// critical
    Critical = 5,
}

/// Whether Envoy's `dynamic_modules` logger would print `level`.
#[inline]
pub fn log_enabled(level: LogLevel) -> bool {
    // SAFETY: plain value call; Envoy documents it callable from any thread.
    unsafe { abi::envoy_dynamic_module_callback_log_enabled(level as u32) }
}

/// Writes one line to Envoy's log (component `dynamic_modules`), tagged with our source location.
pub fn log(level: LogLevel, message: &str, file: &'static str, line: u32) {
    // SAFETY: both buffers are valid for the duration of the call; Envoy copies them.
    unsafe {
        abi::envoy_dynamic_module_callback_log_v2(
            level as u32,
            module_buffer(message.as_bytes()),
            module_buffer(file.as_bytes()),
            line,
        )
    }
}

/// Logs through Envoy when the level is enabled; formats nothing otherwise.
#[macro_export]
macro_rules! envoy_log {
    ($level:expr, $($arg:tt)*) => {{
        let level = $level;
        if $crate::ffi::log_enabled(level) {
            $crate::ffi::log(level, &format!($($arg)*), file!(), line!());
        }
    }};
}

/// `true` under `envoy --mode validate`. Main thread only (config hooks).
pub fn is_validation_mode() -> bool {
    // SAFETY: called from config_new hooks, which run on the main thread as required.
    unsafe { abi::envoy_dynamic_module_callback_is_validation_mode() }
}

/// Envoy's worker count (`--concurrency`). Main thread only (config hooks).
pub fn concurrency() -> u32 {
    // SAFETY: called from config_new hooks, which run on the main thread as required.
    unsafe { abi::envoy_dynamic_module_callback_get_concurrency() }
}
