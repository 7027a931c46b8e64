//! Safe views for the tracer kind: the trace context Envoy lends to `start_span` and
//! `inject_context`, and the tracer config handle for metrics.
use std::ffi::c_void;
use std::marker::PhantomData;

use envoy_obs_abi as abi;

use super::{empty_eb, envoy_bytes, module_buffer};
use crate::metrics::{CounterId, GaugeId, Metrics};

/// Read access to a trace context (the request headers), valid during one hook (`'a`).
pub trait Carrier {
    /// The value of header `key` (lower-case), if present.
    fn get(&self, key: &[u8]) -> Option<&[u8]>;
    /// Sets header `key` to `value` (Envoy copies both).
    fn set(&mut self, key: &[u8], value: &[u8]);
    /// Removes header `key` (every value).
    fn remove(&mut self, key: &[u8]);
}

/// Envoy's trace context behind a `span_envoy_ptr`, valid only inside the hook that received
/// it (`start_span`: the incoming request headers; `inject_context`: the upstream request's).
pub struct TraceContext<'a> {
    ptr: abi::TS,
    _hook: PhantomData<&'a ()>,
}

impl TraceContext<'_> {
    /// Wraps the pointer passed into the current hook.
    ///
    /// # Safety
    /// `ptr` must be the `span_envoy_ptr` of the running `start_span` / `inject_context` call,
    /// and the view must not outlive it.
    pub unsafe fn new(ptr: *mut c_void) -> Self {
        TraceContext { ptr, _hook: PhantomData }
    }
}

impl Carrier for TraceContext<'_> {
    fn get(&self, key: &[u8]) -> Option<&[u8]> {
        let mut out = empty_eb();
        // SAFETY: valid context pointer during the hook; the key outlives the call; the value
        // points into Envoy's header map, unchanged until the hook returns.
        unsafe {
            if abi::envoy_dynamic_module_callback_tracer_get_trace_context_value(self.ptr, module_buffer(key), &mut out)
            {
                Some(envoy_bytes(out))
            } else {
                None
            }
        }
    }

    fn remove(&mut self, key: &[u8]) {
        // SAFETY: valid context pointer during the hook; the key outlives the call.
        unsafe { abi::envoy_dynamic_module_callback_tracer_remove_trace_context_value(self.ptr, module_buffer(key)) }
    }

    fn set(&mut self, key: &[u8], value: &[u8]) {
        // SAFETY: valid context pointer during the hook; Envoy copies key and value.
        unsafe {
            abi::envoy_dynamic_module_callback_tracer_set_trace_context_value(
                self.ptr,
                module_buffer(key),
                module_buffer(value),
            )
        }
    }
}

/// The tracer config handle Envoy gave `config_new`; metric calls take it. Lives until
/// `on_tracer_config_destroy`.
#[derive(Clone, Copy, Debug)]
pub struct TracerHandle(*mut c_void);

// SAFETY: an opaque token; Envoy's metric callbacks are thread-safe (atomic stats, id table
// frozen after config_new) and we use it only while the config object that owns it lives.
unsafe impl Send for TracerHandle {}
// SAFETY: see Send.
unsafe impl Sync for TracerHandle {}

impl TracerHandle {
    /// Wraps the `config_envoy_ptr` passed to `on_tracer_config_new`.
    ///
    /// # Safety
    /// `ptr` must be that pointer; the handle must not be used after config destroy.
    pub unsafe fn new(ptr: *mut c_void) -> Self {
        TracerHandle(ptr)
    }
}

fn result(r: u32, what: &str, name: &str, id: usize) -> Result<usize, String> {
    if r == 0 {
        Ok(id)
    } else {
        Err(format!("defining {what} {name} failed (result {r})"))
    }
}

impl Metrics for TracerHandle {
    fn define_counter(&self, name: &str) -> Result<CounterId, String> {
        let mut id = 0usize;
        // SAFETY: valid handle during config_new; no labels (NULL, 0); name outlives the call.
        let r = unsafe {
            abi::envoy_dynamic_module_callback_tracer_define_counter(
                self.0,
                module_buffer(name.as_bytes()),
                std::ptr::null_mut(),
                0,
                &mut id,
            )
        };
        result(r, "counter", name, id).map(CounterId)
    }

    fn define_gauge(&self, name: &str) -> Result<GaugeId, String> {
        let mut id = 0usize;
        // SAFETY: as for define_counter.
        let r = unsafe {
            abi::envoy_dynamic_module_callback_tracer_define_gauge(
                self.0,
                module_buffer(name.as_bytes()),
                std::ptr::null_mut(),
                0,
                &mut id,
            )
        };
        result(r, "gauge", name, id).map(GaugeId)
    }

    fn add(&self, id: CounterId, v: u64) {
        if v > 0 {
            // SAFETY: valid handle; unknown ids are rejected by Envoy, not UB; no labels.
            unsafe {
                abi::envoy_dynamic_module_callback_tracer_increment_counter(self.0, id.0, std::ptr::null_mut(), 0, v)
            };
        }
    }

    fn set(&self, id: GaugeId, v: u64) {
        // SAFETY: as for add.
        unsafe { abi::envoy_dynamic_module_callback_tracer_set_gauge(self.0, id.0, std::ptr::null_mut(), 0, v) };
    }
}
