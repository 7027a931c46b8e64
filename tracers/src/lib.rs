//! `libenvoy_obs_tracer.so`: an OpenTelemetry tracer (`tracer_name: opentelemetry`) for
//! Envoy 1.40's `envoy.tracers.dynamic_modules`, exporting spans over OTLP/gRPC or OTLP/HTTP.
//!
//! Thread model (Envoy 1.40 tracer ABI):
//! - `config_new` / `config_destroy` run on the main thread; the config owns the flush thread.
//! - A span lives on the worker handling its request, from `start_span` (or `spawn_child`) to
//!   `destroy`; every span hook for it runs on that thread, so spans need no locks.
//! - `finish` of a sampled span copies it into the worker's queue slot (ids, times and its
//!   tag and event arenas as they are: one lock-free push, a few memcpys); the flush thread
//!   encodes the OTLP `Span` messages into export requests.
//! - Unsampled spans keep ids only, so context still propagates at almost no cost.
use std::ffi::c_void;
use std::ptr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use envoy_obs_abi as abi;
use envoy_obs_common::config::ConfigError;
use envoy_obs_common::declare_program_init;
use envoy_obs_common::ffi::tracer::{Carrier, TraceContext, TracerHandle};
use envoy_obs_common::ffi::{self, module_buffer, View};
use envoy_obs_common::hook::{self, guard};
use envoy_obs_common::metrics::{Names, PipelineMetrics};
use envoy_obs_common::otlp::{ExportStats, OtlpExporter};
use envoy_obs_common::pipeline::{Batch, Exporter, Handle, Heartbeat, Outcome, Pipeline, PipelineConfig, Reporter};
use envoy_obs_common::stop::StopSignal;

pub mod config;
pub mod propagation;
pub mod span;

use config::{Compiled, Sampler};
use propagation::{extract, inject, parse_baggage, Carry, Outgoing, Propagator};
use span::{now_ns, Finished, Span, KIND_CLIENT, KIND_SERVER};

declare_program_init!();

/// Instrumentation scope of every exported span.
pub const SCOPE_NAME: &str = "envoy-obs.tracer";
/// Bound on the drain when Envoy destroys the config.
const SHUTDOWN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// What spans need from their config (shared with every span).
pub struct Shared {
    sampler: Option<Sampler>,
    propagators: Vec<Propagator>,
    baggage: bool,
    queue: Option<Handle>,
}

/// The tracer config object. Dropping it (config destroy, main thread) drains and joins the
/// flush thread; spans Envoy still holds keep only their config, not the thread.
pub struct Tracer {
    shared: Arc<Shared>,
    _pipeline: Option<Pipeline>,
}

/// A span as Envoy holds it: the span plus its config.
pub struct ModuleSpan {
    span: Span,
    shared: Arc<Shared>,
    /// Envoy's decision is ours to follow when it changes later (a route refresh): only with
    /// no sampler configured and no incoming decision, as Envoy's Zipkin tracer has it.
    local_decision: bool,
}

/// Encodes finished spans and sends them.
struct SpanExporter {
    otlp: OtlpExporter,
}

impl Exporter for SpanExporter {
    fn export(&mut self, batch: &Batch) -> Outcome {
        let mut o = Outcome::default();
        for rec in batch.iter() {
            // Records come from `ModuleSpan::finish`; one that does not read back is counted.
            let Some(span) = Finished::read(rec) else {
                o.failed += 1;
                continue;
            };
            let r = self.otlp.add(|out| span.encode(out));
            o.written += r.written;
            o.failed += r.failed;
        }
        o
    }
    fn flush(&mut self) -> Outcome {
        self.otlp.send_pending()
    }
    fn draining(&mut self, deadline: Instant) {
        self.otlp.set_deadline(deadline);
    }
    fn stop_signal(&self) -> Option<StopSignal> {
        Some(self.otlp.stop_signal())
    }
    fn set_heartbeat(&mut self, heartbeat: Heartbeat) {
        self.otlp.set_heartbeat(heartbeat);
    }
}

fn metrics(handle: TracerHandle, prefix: &str, stats: Arc<ExportStats>) -> Result<impl Reporter, ConfigError> {
    let names = Names {
        prefix: format!("tracer.{prefix}."),
        produced: "spans_sampled",
        written: "spans_exported",
        dropped: "spans_dropped",
        skipped: "spans_unsampled",
        failed: "spans_failed",
        rejected: "spans_rejected",
        total: Some("spans_started"),
        label: "opentelemetry tracer".into(),
    };
    PipelineMetrics::define(handle, &names, false, Some(stats)).map_err(|e| ConfigError::new("", e))
}

fn config_new_impl(handle: TracerHandle, name: &str, config: &[u8]) -> Result<Tracer, ConfigError> {
    if name != "opentelemetry" {
        return Err(ConfigError::new("tracer_name", format!("unknown tracer {name:?}; expected: opentelemetry")));
    }
    let c: Compiled = config::compile(config, &|k| std::env::var(k).ok())?;
    let stats = Arc::new(ExportStats::default());
    let reporter = metrics(handle, &c.config.stat_prefix, stats.clone())?;
    let pipeline = if ffi::is_validation_mode() {
        None
    } else {
        let cfg = PipelineConfig {
            thread_name: "obs-otlp-spans".into(),
            slots: ffi::concurrency() as usize + 1,
            queue_capacity: c.config.queue_capacity,
            flush_interval: std::time::Duration::from_millis(c.config.flush_interval_ms),
            shutdown_timeout: SHUTDOWN_TIMEOUT,
        };
        let exporter = SpanExporter { otlp: OtlpExporter::new(c.settings, SCOPE_NAME, "opentelemetry tracer", stats) };
        Some(
            Pipeline::start(cfg, exporter, reporter)
                .map_err(|e| ConfigError::new("", format!("cannot start flush thread: {e}")))?,
        )
    };
    let baggage = c.propagators.contains(&Propagator::Baggage);
    let queue = pipeline.as_ref().map(Pipeline::handle);
    Ok(Tracer {
        shared: Arc::new(Shared { sampler: c.sampler, propagators: c.propagators, baggage, queue }),
        _pipeline: pipeline,
    })
}

/// Whether Envoy's name for an HCM span says outbound traffic (`egress` or `egress <host>`).
fn is_egress(operation: &[u8]) -> bool {
    operation.strip_prefix(b"egress").is_some_and(|rest| rest.is_empty() || rest[0] == b' ')
}

/// This thread's queue slot (Envoy gives tracers no worker index): threads take slots in
/// order of first use; a slot shared by two threads stays correct (see `pipeline`).
fn slot() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local!(static SLOT: usize = NEXT.fetch_add(1, Relaxed));
    SLOT.with(|s| *s)
}

impl Tracer {
    fn start_span(&self, ctx: &TraceContext<'_>, operation: &[u8], traced: bool) -> ModuleSpan {
        let sh = &self.shared;
        let mut carry = Carry::default();
        let remote = extract(ctx, &sh.propagators, &mut carry);
        let trace_id = remote.as_ref().map_or_else(span::new_trace_id, |r| r.trace_id);
        // The incoming decision: the parent's flag, or a B3 decision that came without ids.
        let incoming = remote.as_ref().and_then(|r| r.sampled).or(carry.b3_decision);
        let sampled = match &sh.sampler {
            // Envoy's decision, and an incoming "not sampled" flag is respected (as Envoy's
            // own OpenTelemetry tracer does).
            None => traced && incoming.unwrap_or(true),
            Some(s) => s.decide(&trace_id, incoming),
        };
        // Envoy names the HCM's span `ingress`, or `egress <host>` for outbound traffic. As in
        // its OpenTelemetry tracer, an egress span is a CLIENT one (the router's children too).
        // That tracer makes it SERVER when the HCM's tracing sets `spawn_upstream_span`, which
        // the ABI does not show a tracer.
        let kind = if is_egress(operation) { KIND_CLIENT } else { KIND_SERVER };
        let parent = remote.as_ref().map_or([0; 8], |r| r.span_id);
        let mut span = Span::new(trace_id, parent, sampled, kind, now_ns(), operation);
        if let Some(r) = remote {
            span.remote_parent = true;
            span.tracestate = r.tracestate;
        }
        span.carry = carry;
        if sh.baggage {
            if let Some(b) = ctx.get(b"baggage") {
                parse_baggage(b, &mut span.baggage);
            }
        }
        ModuleSpan { span, shared: sh.clone(), local_decision: sh.sampler.is_none() && incoming.is_none() }
    }
}

impl ModuleSpan {
    fn finish(&mut self) {
        if !self.span.finish() {
            return;
        }
        let Some(p) = &self.shared.queue else { return };
        if self.span.sampled {
            let end = now_ns();
            let span = &self.span;
            p.push_with(slot(), |out| span.finished(end).write(out));
        } else {
            p.skip(slot());
        }
    }

    fn inject(&self, ctx: &mut TraceContext<'_>) {
        let s = &self.span;
        let o = Outgoing {
            trace_id: &s.trace_id,
            span_id: &s.span_id,
            parent_id: &s.parent,
            sampled: s.sampled,
            tracestate: &s.tracestate,
            baggage: &s.baggage,
            carry: s.carry,
        };
        inject(ctx, &self.shared.propagators, &o);
    }
}

// ---------------------------------------------------------------- hooks

/// # Safety
/// Called by Envoy on the main thread with valid buffers and its config handle.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_tracer_config_new(
    config_envoy_ptr: *mut c_void,
    name: abi::EB,
    config: abi::EB,
) -> *const c_void {
    // SAFETY: Envoy's buffers for this call; the handle lives until config_destroy.
    unsafe {
        let handle = TracerHandle::new(config_envoy_ptr);
        hook::config_new("on_tracer_config_new", "tracer", "tracer_config", name, config, |n, b| {
            config_new_impl(handle, n, b)
        })
    }
}

/// # Safety
/// `config_module_ptr` comes from `config_new`.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_tracer_config_destroy(config_module_ptr: *const c_void) {
    // SAFETY: Envoy destroys the pointer config_new returned, once.
    unsafe { hook::destroy::<Tracer>("on_tracer_config_destroy", config_module_ptr) }
}

/// Borrow a module span from Envoy's pointer.
///
/// # Safety
/// `p` must be a live span returned by `start_span`/`spawn_child`, used on its own thread.
unsafe fn span_mut<'a>(p: *const c_void) -> Option<&'a mut ModuleSpan> {
    // SAFETY: per the function contract; Envoy never calls two hooks of a span at once.
    unsafe { (p as *mut ModuleSpan).as_mut() }
}

/// # Safety
/// Called by Envoy on a worker with our config and the request's trace context.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_tracer_start_span(
    config_module_ptr: *const c_void,
    span_envoy_ptr: *mut c_void,
    operation: abi::EB,
    traced: bool,
    _reason: u32,
) -> *const c_void {
    guard("on_tracer_start_span", ptr::null(), || {
        // SAFETY: the config outlives the call; the context and name are valid during it.
        let (tracer, ctx, op) = unsafe {
            let Some(t) = (config_module_ptr as *const Tracer).as_ref() else { return ptr::null() };
            (t, TraceContext::new(span_envoy_ptr), View::from_envoy(operation))
        };
        Box::into_raw(Box::new(tracer.start_span(&ctx, op.bytes(), traced))) as *const c_void
    })
}

/// # Safety
/// `span` is a live module span on its thread.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_tracer_span_spawn_child(
    span: *const c_void,
    name: abi::EB,
    start_time_ns: i64,
) -> *const c_void {
    guard("on_tracer_span_spawn_child", ptr::null(), || {
        // SAFETY: live span; name valid during the call.
        let (Some(s), name) = (unsafe { span_mut(span) }, unsafe { View::from_envoy(name) }) else {
            return ptr::null();
        };
        let start = u64::try_from(start_time_ns).ok().filter(|&t| t > 0).unwrap_or_else(now_ns);
        let child =
            ModuleSpan { span: s.span.child(name.bytes(), start), shared: s.shared.clone(), local_decision: false };
        Box::into_raw(Box::new(child)) as *const c_void
    })
}

/// # Safety
/// `span` is a live module span on its thread.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_tracer_span_set_operation(span: *const c_void, operation: abi::EB) {
    guard("on_tracer_span_set_operation", (), || {
        // SAFETY: live span; buffer valid during the call.
        if let (Some(s), op) = unsafe { (span_mut(span), View::from_envoy(operation)) } {
            s.span.name = span::Name::new(op.bytes());
        }
    })
}

/// # Safety
/// `span` is a live module span on its thread.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_tracer_span_set_tag(
    span: *const c_void,
    key: abi::EB,
    value: abi::EB,
) {
    // Envoy sets ~25 tags per request at any sampling rate; an unsampled span keeps none, and
    // says so before any of the work below (a separate function, so not even its stack frame).
    // SAFETY: live span on its thread; reading a bool cannot panic.
    if unsafe { span_mut(span) }.is_some_and(|s| !s.span.sampled) {
        return;
    }
    // SAFETY: forwarded contract.
    unsafe { set_tag(span, key, value) }
}

/// `set_tag` on a sampled span.
///
/// # Safety
/// As for the hook.
#[inline(never)]
unsafe fn set_tag(span: *const c_void, key: abi::EB, value: abi::EB) {
    guard("on_tracer_span_set_tag", (), || {
        // SAFETY: live span; buffers valid during the call.
        if let (Some(s), k, v) = unsafe { (span_mut(span), View::from_envoy(key), View::from_envoy(value)) } {
            s.span.set_tag(k.bytes(), v.bytes());
        }
    })
}

/// Capacity hint; tags go into one arena that grows geometrically anyway.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_tracer_span_reserve_tags(_span: *const c_void, _count: usize) {}

/// # Safety
/// `span` is a live module span on its thread.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_tracer_span_log(
    span: *const c_void,
    timestamp_ns: i64,
    event: abi::EB,
) {
    guard("on_tracer_span_log", (), || {
        // SAFETY: live span; buffer valid during the call.
        if let (Some(s), e) = unsafe { (span_mut(span), View::from_envoy(event)) } {
            s.span.log(timestamp_ns, e.bytes());
        }
    })
}

/// # Safety
/// `span` is a live module span on its thread.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_tracer_span_finish(span: *const c_void) {
    guard("on_tracer_span_finish", (), || {
        // SAFETY: live span.
        if let Some(s) = unsafe { span_mut(span) } {
            s.finish();
        }
    })
}

/// # Safety
/// `span` is a live module span; `span_envoy_ptr` is the upstream request's context.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_tracer_span_inject_context(
    span: *const c_void,
    span_envoy_ptr: *mut c_void,
) {
    guard("on_tracer_span_inject_context", (), || {
        // SAFETY: live span; the context is valid during this call.
        if let (Some(s), mut ctx) = unsafe { (span_mut(span), TraceContext::new(span_envoy_ptr)) } {
            s.inject(&mut ctx);
        }
    })
}

/// # Safety
/// `span` is a live module span on its thread.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_tracer_span_set_sampled(span: *const c_void, sampled: bool) {
    guard("on_tracer_span_set_sampled", (), || {
        // SAFETY: live span.
        if let Some(s) = unsafe { span_mut(span) } {
            s.span.sampled = sampled;
        }
    })
}

/// True when no sampler is configured and the request brought no decision: then Envoy's
/// decision is ours, also when it changes later. An incoming "not sampled" stays so.
///
/// # Safety
/// `span` is a live module span on its thread.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_tracer_span_use_local_decision(span: *const c_void) -> bool {
    guard("on_tracer_span_use_local_decision", true, || {
        // SAFETY: live span.
        unsafe { span_mut(span) }.is_none_or(|s| s.local_decision)
    })
}

/// # Safety
/// `span` is a live module span; `out` is writable.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_tracer_span_get_baggage(
    span: *const c_void,
    key: abi::EB,
    out: *mut abi::MB,
) -> bool {
    guard("on_tracer_span_get_baggage", false, || {
        // SAFETY: live span; key valid during the call; out writable; the value points into the
        // span, which outlives the call (Envoy copies it at once).
        unsafe {
            let (Some(s), k) = (span_mut(span), View::from_envoy(key)) else { return false };
            match (s.span.baggage(k.bytes()), out.as_mut()) {
                (Some(v), Some(o)) => {
                    *o = module_buffer(v);
                    true
                }
                _ => false,
            }
        }
    })
}

/// # Safety
/// `span` is a live module span on its thread.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_tracer_span_set_baggage(
    span: *const c_void,
    key: abi::EB,
    value: abi::EB,
) {
    guard("on_tracer_span_set_baggage", (), || {
        // SAFETY: live span; buffers valid during the call.
        if let (Some(s), k, v) = unsafe { (span_mut(span), View::from_envoy(key), View::from_envoy(value)) } {
            if !k.bytes().is_empty() {
                s.span.set_baggage(k.bytes(), v.bytes());
            }
        }
    })
}

/// Writes one of the span's hex ids (kept in the span until its destroy) to `out`.
///
/// # Safety
/// `span` is a live module span; `out` is writable.
unsafe fn hex_id(hook: &'static str, span: *const c_void, out: *mut abi::MB, trace: bool) -> bool {
    guard(hook, false, || {
        // SAFETY: live span; out writable; the hex lives in the span until destroy.
        unsafe {
            match (span_mut(span), out.as_mut()) {
                (Some(s), Some(o)) => {
                    let (t, id) = s.span.hex_ids();
                    *o = module_buffer(if trace { t } else { id });
                    true
                }
                _ => false,
            }
        }
    })
}

/// Hex trace id, valid until the span's destroy.
///
/// # Safety
/// `span` is a live module span; `out` is writable.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_tracer_span_get_trace_id(
    span: *const c_void,
    out: *mut abi::MB,
) -> bool {
    // SAFETY: forwarded contract.
    unsafe { hex_id("on_tracer_span_get_trace_id", span, out, true) }
}

/// Hex span id, valid until the span's destroy.
///
/// # Safety
/// `span` is a live module span; `out` is writable.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_tracer_span_get_span_id(
    span: *const c_void,
    out: *mut abi::MB,
) -> bool {
    // SAFETY: forwarded contract.
    unsafe { hex_id("on_tracer_span_get_span_id", span, out, false) }
}

/// # Safety
/// `span` comes from `start_span`/`spawn_child` and is not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_tracer_span_destroy(span: *const c_void) {
    // SAFETY: created by Box::into_raw in start_span/spawn_child; destroyed once.
    unsafe { hook::destroy::<ModuleSpan>("on_tracer_span_destroy", span) }
}

// Compile-time check that our hooks have exactly the prototypes of our C header.
const _: () = {
    let _: unsafe extern "C" fn(*mut c_void, abi::EB, abi::EB) -> *const c_void =
        envoy_dynamic_module_on_tracer_config_new;
    let _: unsafe extern "C" fn(*const c_void, *mut c_void, abi::EB, bool, u32) -> *const c_void =
        envoy_dynamic_module_on_tracer_start_span;
    let _: unsafe extern "C" fn(*const c_void, abi::EB, i64) -> *const c_void =
        envoy_dynamic_module_on_tracer_span_spawn_child;
    let _: unsafe extern "C" fn(*const c_void, abi::EB, *mut abi::MB) -> bool =
        envoy_dynamic_module_on_tracer_span_get_baggage;
    let _: unsafe extern "C" fn(*const c_void, *mut abi::MB) -> bool = envoy_dynamic_module_on_tracer_span_get_trace_id;
};
