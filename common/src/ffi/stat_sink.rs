//! Safe views for the stat-sink kind: the stats snapshot Envoy lends to `on_stat_sink_flush`
//! (main thread, valid only during that call) and the sink's gauge/scheduler callbacks.
use std::ffi::c_void;
use std::marker::PhantomData;

use envoy_obs_abi as abi;

use super::module_buffer;

/// Which family of stats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Counters.
    Counter,
    /// Gauges.
    Gauge,
    /// Text readouts.
    TextReadout,
    /// Histograms.
    Histogram,
}

/// The snapshot passed to `on_stat_sink_flush`, valid for that call only (`'a`).
pub struct Snapshot<'a> {
    ptr: abi::SN,
    _hook: PhantomData<&'a ()>,
}

type NameFn = unsafe extern "C" fn(abi::SN, usize, *mut std::ffi::c_char, usize, *mut usize) -> bool;

/// Calls an Envoy "fill this buffer" getter, growing `buf` once if the value did not fit.
/// Returns the filled length, or None if the getter failed.
fn fill(buf: &mut Vec<u8>, mut call: impl FnMut(*mut std::ffi::c_char, usize, &mut usize) -> bool) -> Option<usize> {
    if buf.capacity() < 128 {
        buf.reserve(128);
    }
    // SAFETY (for both calls): Envoy writes at most `capacity` bytes into the spare capacity and
    // the full length into `n`; we only expose `min(n, capacity)` initialised bytes.
    let cap = buf.capacity();
    buf.clear();
    let mut n = 0usize;
    if !call(buf.as_mut_ptr().cast(), cap, &mut n) {
        return None;
    }
    if n > cap {
        buf.reserve(n);
        let cap = buf.capacity();
        if !call(buf.as_mut_ptr().cast(), cap, &mut n) || n > cap {
            return None;
        }
    }
    // SAFETY: Envoy initialised the first `n` (<= capacity) bytes.
    unsafe { buf.set_len(n) };
    Some(n)
}

impl<'a> Snapshot<'a> {
    /// Wraps the pointer passed to `on_stat_sink_flush`.
    ///
    /// # Safety
    /// `ptr` must be that call's snapshot; the view must not outlive the call.
    pub unsafe fn new(ptr: *mut c_void) -> Self {
        Snapshot { ptr, _hook: PhantomData }
    }

    /// Number of stats of a kind.
    pub fn count(&self, k: Kind) -> usize {
        use abi::*;
        // SAFETY: valid snapshot during the flush call.
        unsafe {
            match k {
                Kind::Counter => envoy_dynamic_module_callback_stat_sink_snapshot_get_counter_count(self.ptr),
                Kind::Gauge => envoy_dynamic_module_callback_stat_sink_snapshot_get_gauge_count(self.ptr),
                Kind::TextReadout => envoy_dynamic_module_callback_stat_sink_snapshot_get_text_readout_count(self.ptr),
                Kind::Histogram => envoy_dynamic_module_callback_stat_sink_snapshot_get_histogram_count(self.ptr),
            }
        }
    }

    /// Counter `i`: full name into `name`, (cumulative value, delta since the last flush).
    pub fn counter(&self, i: usize, name: &mut Vec<u8>) -> Option<(u64, u64)> {
        let (mut v, mut d) = (0u64, 0u64);
        fill(name, |b, cap, n| {
            // SAFETY: valid snapshot; buffer of `cap` bytes; out-params valid.
            unsafe {
                abi::envoy_dynamic_module_callback_stat_sink_snapshot_get_counter(
                    self.ptr, i, b, cap, n, &mut v, &mut d,
                )
            }
        })?;
        Some((v, d))
    }

    /// Gauge `i`: full name into `name`, value.
    pub fn gauge(&self, i: usize, name: &mut Vec<u8>) -> Option<u64> {
        let mut v = 0u64;
        fill(name, |b, cap, n| {
            // SAFETY: as for counter.
            unsafe { abi::envoy_dynamic_module_callback_stat_sink_snapshot_get_gauge(self.ptr, i, b, cap, n, &mut v) }
        })?;
        Some(v)
    }

    /// Text readout `i`: full name into `name`, value into `value`.
    pub fn text_readout(&self, i: usize, name: &mut Vec<u8>, value: &mut Vec<u8>) -> bool {
        // Two buffers: query both lengths first, then fill.
        let (mut nn, mut vn) = (0usize, 0usize);
        // SAFETY: length query with NULL buffers and zero capacity is allowed by the ABI.
        let ok = unsafe {
            abi::envoy_dynamic_module_callback_stat_sink_snapshot_get_text_readout(
                self.ptr,
                i,
                std::ptr::null_mut(),
                0,
                &mut nn,
                std::ptr::null_mut(),
                0,
                &mut vn,
            )
        };
        if !ok {
            return false;
        }
        name.clear();
        name.reserve(nn);
        value.clear();
        value.reserve(vn);
        // SAFETY: buffers with at least nn / vn spare bytes; Envoy writes at most those.
        unsafe {
            let ok = abi::envoy_dynamic_module_callback_stat_sink_snapshot_get_text_readout(
                self.ptr,
                i,
                name.as_mut_ptr().cast(),
                name.capacity(),
                &mut nn,
                value.as_mut_ptr().cast(),
                value.capacity(),
                &mut vn,
            );
            if !ok || nn > name.capacity() || vn > value.capacity() {
                return false;
            }
            name.set_len(nn);
            value.set_len(vn);
        }
        true
    }

    /// Histogram `i`: full name into `name`, (cumulative sample count, sum).
    pub fn histogram(&self, i: usize, name: &mut Vec<u8>) -> Option<(u64, f64)> {
        let (mut c, mut s) = (0u64, 0f64);
        fill(name, |b, cap, n| {
            // SAFETY: as for counter.
            unsafe {
                abi::envoy_dynamic_module_callback_stat_sink_snapshot_get_histogram(
                    self.ptr, i, b, cap, n, &mut c, &mut s,
                )
            }
        })?;
        Some((c, s))
    }

    /// Histogram `i`'s buckets (upper bound, cumulative count) appended to `out`.
    pub fn histogram_buckets(&self, i: usize, out: &mut Vec<(f64, u64)>) {
        // SAFETY: valid snapshot; out-params valid.
        unsafe {
            let n = abi::envoy_dynamic_module_callback_stat_sink_snapshot_get_histogram_bucket_count(self.ptr, i);
            for b in 0..n {
                let (mut le, mut c) = (0f64, 0u64);
                if abi::envoy_dynamic_module_callback_stat_sink_snapshot_get_histogram_bucket(
                    self.ptr, i, b, &mut le, &mut c,
                ) {
                    out.push((le, c));
                }
            }
        }
    }

    /// The tag-extracted name of stat `i` (e.g. `cluster.upstream_rq_total`).
    pub fn extracted_name(&self, k: Kind, i: usize, out: &mut Vec<u8>) -> bool {
        use abi::*;
        let f: NameFn = match k {
            Kind::Counter => envoy_dynamic_module_callback_stat_sink_snapshot_get_counter_tag_extracted_name,
            Kind::Gauge => envoy_dynamic_module_callback_stat_sink_snapshot_get_gauge_tag_extracted_name,
            Kind::TextReadout => envoy_dynamic_module_callback_stat_sink_snapshot_get_text_readout_tag_extracted_name,
            Kind::Histogram => envoy_dynamic_module_callback_stat_sink_snapshot_get_histogram_tag_extracted_name,
        };
        // SAFETY: valid snapshot; buffer handling in `fill`.
        fill(out, |b, cap, n| unsafe { f(self.ptr, i, b, cap, n) }).is_some()
    }

    /// Appends stat `i`'s tags as (name, value) to `out` (`scratch` is reused buffer space).
    pub fn tags(&self, k: Kind, i: usize, out: &mut Vec<(Vec<u8>, Vec<u8>)>) {
        use abi::*;
        type CountFn = unsafe extern "C" fn(abi::SN, usize, *mut usize) -> bool;
        type TagFn = unsafe extern "C" fn(
            abi::SN,
            usize,
            usize,
            *mut std::ffi::c_char,
            usize,
            *mut usize,
            *mut std::ffi::c_char,
            usize,
            *mut usize,
        ) -> bool;
        let (count, get): (CountFn, TagFn) = match k {
            Kind::Counter => (
                envoy_dynamic_module_callback_stat_sink_snapshot_get_counter_tag_count,
                envoy_dynamic_module_callback_stat_sink_snapshot_get_counter_tag,
            ),
            Kind::Gauge => (
                envoy_dynamic_module_callback_stat_sink_snapshot_get_gauge_tag_count,
                envoy_dynamic_module_callback_stat_sink_snapshot_get_gauge_tag,
            ),
            Kind::TextReadout => (
                envoy_dynamic_module_callback_stat_sink_snapshot_get_text_readout_tag_count,
                envoy_dynamic_module_callback_stat_sink_snapshot_get_text_readout_tag,
            ),
            Kind::Histogram => (
                envoy_dynamic_module_callback_stat_sink_snapshot_get_histogram_tag_count,
                envoy_dynamic_module_callback_stat_sink_snapshot_get_histogram_tag,
            ),
        };
        let mut n = 0usize;
        // SAFETY: valid snapshot; out-param valid.
        if !unsafe { count(self.ptr, i, &mut n) } {
            return;
        }
        for t in 0..n {
            let (mut kn, mut vn) = (0usize, 0usize);
            let null = std::ptr::null_mut();
            // SAFETY: length query (NULL, 0) is allowed by the ABI.
            if !unsafe { get(self.ptr, i, t, null, 0, &mut kn, null, 0, &mut vn) } {
                continue;
            }
            let (mut key, mut val) = (Vec::<u8>::with_capacity(kn), Vec::<u8>::with_capacity(vn));
            // SAFETY: buffers with kn / vn spare bytes; Envoy writes at most their capacities.
            unsafe {
                if get(
                    self.ptr,
                    i,
                    t,
                    key.as_mut_ptr().cast(),
                    key.capacity(),
                    &mut kn,
                    val.as_mut_ptr().cast(),
                    val.capacity(),
                    &mut vn,
                ) && kn <= key.capacity()
                    && vn <= val.capacity()
                {
                    key.set_len(kn);
                    val.set_len(vn);
                    out.push((key, val));
                }
            }
        }
    }
}

/// The stat-sink config handle (`config_envoy_ptr`): gauges and the main-thread scheduler.
#[derive(Clone, Copy, Debug)]
pub struct SinkHandle(*mut c_void);

// SAFETY: an opaque token. `set_gauge` is only called on the main thread (flush, scheduled,
// config_new) as the ABI requires; scheduler commits go through `Scheduler`, which is Send.
unsafe impl Send for SinkHandle {}
// SAFETY: see Send.
unsafe impl Sync for SinkHandle {}

impl SinkHandle {
    /// Wraps `config_envoy_ptr` from `on_stat_sink_config_new`.
    ///
    /// # Safety
    /// `ptr` must be that pointer, used only while the config lives.
    pub unsafe fn new(ptr: *mut c_void) -> Self {
        SinkHandle(ptr)
    }

    /// Defines a gauge (config_new only). Sink gauges are registered without a namespace prefix.
    pub fn define_gauge(&self, name: &str) -> Result<usize, String> {
        let mut id = 0;
        // SAFETY: valid handle during config_new; name outlives the call.
        let r = unsafe {
            abi::envoy_dynamic_module_callback_stat_sink_config_define_gauge(
                self.0,
                module_buffer(name.as_bytes()),
                &mut id,
            )
        };
        if r == 0 {
            Ok(id)
        } else {
            Err(format!("defining gauge {name} failed (result {r})"))
        }
    }

    /// Sets a gauge. Main thread only.
    pub fn set_gauge(&self, id: usize, v: u64) {
        // SAFETY: valid handle; called on the main thread per the type's contract.
        unsafe { abi::envoy_dynamic_module_callback_stat_sink_config_set_gauge(self.0, id, v) };
    }

    /// A cross-thread mailbox to the main thread (`on_stat_sink_config_scheduled`).
    pub fn scheduler(&self) -> Option<Scheduler> {
        // SAFETY: valid handle during config_new.
        let p = unsafe { abi::envoy_dynamic_module_callback_stat_sink_config_scheduler_new(self.0) };
        (!p.is_null()).then_some(Scheduler(p))
    }
}

/// Owned scheduler; deleted on drop (before the config is destroyed).
pub struct Scheduler(*mut c_void);

// SAFETY: `scheduler_commit` may be called from any thread (ABI §4.4).
unsafe impl Send for Scheduler {}
// SAFETY: see Send.
unsafe impl Sync for Scheduler {}

impl Scheduler {
    /// Asks Envoy to call `on_stat_sink_config_scheduled(event_id)` on the main thread.
    pub fn commit(&self, event_id: u64) {
        // SAFETY: live scheduler.
        unsafe { abi::envoy_dynamic_module_callback_stat_sink_config_scheduler_commit(self.0, event_id) };
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        // SAFETY: created by scheduler_new, deleted once.
        unsafe { abi::envoy_dynamic_module_callback_stat_sink_config_scheduler_delete(self.0) };
    }
}
