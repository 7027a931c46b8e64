//! The FFI seam. Raw pointers from Envoy stop here: above this module code sees borrowed
//! views that cannot outlive the hook that produced them, plain enums mapped from C integers,
//! and `Copy` metric-handle newtypes.
use envoy_obs_abi as abi;
use std::ffi::c_void;

pub mod access_log;
pub mod stat_sink;
pub mod tracer;

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
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
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

/// Envoy's two log callbacks, looked up in the process once instead of linked directly, so
/// code that may log (the flush thread's exporters) also runs in unit tests outside Envoy,
/// where the lines go to stderr.
struct LogFns {
    enabled: EnabledFn,
    log: LogFn,
}
type EnabledFn = unsafe extern "C" fn(u32) -> bool;
type LogFn = unsafe extern "C" fn(u32, abi::MB, abi::MB, u32);

fn log_fns() -> Option<&'static LogFns> {
    static FNS: std::sync::OnceLock<Option<LogFns>> = std::sync::OnceLock::new();
    FNS.get_or_init(|| {
        // SAFETY: dlsym with RTLD_DEFAULT and NUL-terminated names; the symbols, when Envoy
        // exports them, have the prototypes of our header (checked by the conformance test).
        unsafe {
            let e = libc::dlsym(libc::RTLD_DEFAULT, c"envoy_dynamic_module_callback_log_enabled".as_ptr());
            let l = libc::dlsym(libc::RTLD_DEFAULT, c"envoy_dynamic_module_callback_log_v2".as_ptr());
            if e.is_null() || l.is_null() {
                return None;
            }
            Some(LogFns {
                enabled: std::mem::transmute::<*mut c_void, EnabledFn>(e),
                log: std::mem::transmute::<*mut c_void, LogFn>(l),
            })
        }
    })
    .as_ref()
}

/// Whether Envoy's `dynamic_modules` logger would print `level` (outside Envoy: warnings and up).
#[inline]
pub fn log_enabled(level: LogLevel) -> bool {
    match log_fns() {
        // SAFETY: plain value call; Envoy documents it callable from any thread.
        Some(f) => unsafe { (f.enabled)(level as u32) },
        None => level >= LogLevel::Warn,
    }
}

/// Writes one line to Envoy's log (component `dynamic_modules`), tagged with our source location.
pub fn log(level: LogLevel, message: &str, file: &'static str, line: u32) {
    match log_fns() {
        // SAFETY: both buffers are valid for the duration of the call; Envoy copies them.
        Some(f) => unsafe {
            (f.log)(level as u32, module_buffer(message.as_bytes()), module_buffer(file.as_bytes()), line)
        },
        None => eprintln!("[{level:?}] {file}:{line}: {message}"),
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
