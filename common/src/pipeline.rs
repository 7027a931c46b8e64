//! Per-worker bounded queues feeding one flush thread per config object.
//!
//! Records are byte strings (each signal's own compact encoding). Per Envoy thread there is
//! one slot holding:
//! - a **partial batch**: the worker appends records to it, length-prefixed, in one growing
//!   buffer it keeps warm in its own cache. The batch sits in a lock-free `AtomicCell` the
//!   worker swaps out and back per record; the flush thread can steal it (one swap) on its
//!   timer, so a quiet worker's last records are still written within `flush_interval`;
//! - a bounded lock-free queue of **full batches** (crossbeam `ArrayQueue`). A batch is
//!   handed over when it reaches `batch_records` records or `BATCH_BYTES`; so cross-thread
//!   traffic is per batch, not per record.
//!
//! Bounds and drops: each slot holds at most `queue_capacity` records in full batches plus
//! one partial batch. When the queue is full the partial batch stops growing at its batch
//! size (records or bytes) and **new records are dropped and counted** — queued records are
//! never discarded.
//!
//! One named flush thread (nice +10: it yields to Envoy's workers) exports full batches when
//! several are waiting (one wake message per threshold crossing, not per record), steals and
//! exports partial batches every `flush_interval`, on an explicit [`Pipeline::flush`] and on
//! shutdown. Control messages carry their own reply channel; every wait has a timeout.
//! Shutdown drains everything, bounded by `shutdown_timeout`, then joins the thread — when it
//! is asked for on the thread that started the pipeline (Envoy's main thread). Envoy destroys a
//! config on a worker when that worker drops the last reference to it (a listener update): the
//! worker then only tells the flush thread to finish, which drains within the same bound and
//! ends on its own, reporting nothing more into Envoy.
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};
use crossbeam_queue::ArrayQueue;
use crossbeam_utils::atomic::AtomicCell;
use crossbeam_utils::CachePadded;

use crate::stop::StopSignal;
use crate::timing::{Histogram, BUCKETS};

/// A batch is handed to the flush thread at this many bytes even if it has fewer records.
pub const BATCH_BYTES: usize = 32 * 1024;
/// Records per batch at most.
pub const BATCH_RECORDS: usize = 64;
/// Batches larger than this are not kept for reuse (one huge record must not pin memory).
const MAX_POOLED_BATCH: usize = 4 * BATCH_BYTES;

/// Length-prefixed records in one buffer.
#[derive(Debug, Default)]
pub struct Batch {
    data: Vec<u8>,
    records: usize,
}

impl Batch {
    /// Number of records.
    pub fn len(&self) -> usize {
        self.records
    }
    /// True when there are no records.
    pub fn is_empty(&self) -> bool {
        self.records == 0
    }
    /// Appends one record produced by `f` (which writes the record's bytes into the buffer).
    pub fn append(&mut self, f: impl FnOnce(&mut Vec<u8>)) {
        let at = self.data.len();
        self.data.extend_from_slice(&[0; 4]);
        f(&mut self.data);
        let n = (self.data.len() - at - 4).min(u32::MAX as usize) as u32;
        self.data[at..at + 4].copy_from_slice(&n.to_le_bytes());
        self.records += 1;
    }
    /// The records, in order.
    pub fn iter(&self) -> BatchIter<'_> {
        BatchIter { data: &self.data }
    }
    fn clear(&mut self) {
        self.data.clear();
        self.records = 0;
    }
}

/// Iterator over a batch's records.
pub struct BatchIter<'a> {
    data: &'a [u8],
}

impl<'a> Iterator for BatchIter<'a> {
    type Item = &'a [u8];
    fn next(&mut self) -> Option<&'a [u8]> {
        let (len, rest) = self.data.split_first_chunk::<4>()?;
        let n = (u32::from_le_bytes(*len) as usize).min(rest.len());
        let (rec, rest) = rest.split_at(n);
        self.data = rest;
        Some(rec)
    }
}

/// What an export or flush achieved, in records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Records that reached their destination.
    pub written: u64,
    /// Records given up on (write error, rejected by the peer, retries exhausted).
    pub failed: u64,
}

/// The destination of one signal. Called only from the flush thread, never concurrently.
pub trait Exporter: Send + 'static {
    /// Takes the records of one batch. May buffer them; what it reports here and from
    /// `flush` must add up to every record it was given.
    fn export(&mut self, batch: &Batch) -> Outcome;
    /// Pushes out anything buffered; called after every drain and on timer ticks, so also
    /// the place for periodic upkeep (e.g. log rotation).
    fn flush(&mut self) -> Outcome {
        Outcome::default()
    }
    /// Shutdown has begun: the drain must be over by `deadline` (exporters that wait on the
    /// network cut their retries short).
    fn draining(&mut self, _deadline: Instant) {}
    /// Last call before the thread exits.
    fn shutdown(&mut self) {}
    /// The signal this exporter's waits obey (network exporters): shutdown sets its deadline
    /// from the stopping thread at once, so an export stuck in retries ends in time for the
    /// thread to be joined.
    fn stop_signal(&self) -> Option<StopSignal> {
        None
    }
    /// Takes the pipeline's [`Heartbeat`] (once, before the first export): exporters whose
    /// calls can run long (network retries) beat it while they wait.
    fn set_heartbeat(&mut self, _heartbeat: Heartbeat) {}
}

/// Publishes the pipeline's counters from inside a long exporter call. An OTLP export that
/// retries against a dead collector holds the flush thread for up to `max_elapsed_ms`, and
/// without this the counters (records logged and dropped, queue depth) would freeze for that
/// long — just when an operator watches them. Beats more often than once a second are
/// ignored. Only for the flush thread's own exporter calls.
#[derive(Clone)]
pub struct Heartbeat(Arc<dyn Fn() + Send + Sync>);

impl Heartbeat {
    /// Publishes the counters now, unless they were published less than a second ago.
    pub fn beat(&self) {
        (self.0)()
    }
}

impl std::fmt::Debug for Heartbeat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Heartbeat")
    }
}

/// Cumulative counts, as seen by the flush thread after each cycle.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Records accepted into a queue.
    pub queued: u64,
    /// Records dropped because their worker's queue was full.
    pub dropped: u64,
    /// Records the producer chose not to produce (filters, sampling).
    pub skipped: u64,
    /// Records the exporter delivered.
    pub written: u64,
    /// Records the exporter gave up on.
    pub failed: u64,
    /// Records waiting in full batches right now (partial batches not included).
    pub queue_depth: u64,
    /// Nanoseconds producers reported spending on records ([`Producer::record_busy_ns`]).
    pub busy_ns: u64,
    /// Distribution of those per-record nanoseconds (see [`crate::timing::quantile`]).
    pub busy_hist: Vec<u64>,
}

/// Receives [`Totals`] after every flush cycle (self-metrics). Runs on the flush thread.
pub trait Reporter: Send + 'static {
    /// Publishes the totals (implementations keep the previous value to compute deltas).
    fn report(&mut self, totals: &Totals);
    /// What to undo when reports end (the pipeline stopped, or a config destroyed on a worker):
    /// run then, on the stopping thread, while the config's handle is still valid.
    fn retire(&self) -> Option<Box<dyn FnOnce() + Send>> {
        None
    }
}

impl Reporter for () {
    fn report(&mut self, _: &Totals) {}
}

/// Sizing and timing of a pipeline.
#[derive(Clone, Debug)]
pub struct PipelineConfig {
    /// Flush thread name (shown in `top -H`, gdb, /proc).
    pub thread_name: String,
    /// Number of producer slots: Envoy's concurrency + 1 (the main thread's logger).
    pub slots: usize,
    /// Records each slot may hold in full batches.
    pub queue_capacity: usize,
    /// Longest time a record waits before it is exported.
    pub flush_interval: Duration,
    /// Bound on the drain at shutdown.
    pub shutdown_timeout: Duration,
}

struct Slot {
    partial: AtomicCell<Option<Box<Batch>>>,
    full: ArrayQueue<Box<Batch>>,
    /// Records in `full` (batches are cut by bytes too, so not `full.len() * batch_records`).
    waiting: AtomicU64,
    produced: AtomicU64,
    dropped: AtomicU64,
    skipped: AtomicU64,
    busy_ns: AtomicU64,
    busy_hist: Histogram,
}

struct Shared {
    slots: Box<[CachePadded<Slot>]>,
    pool: ArrayQueue<Box<Batch>>,
    batch_records: usize,
    wake_at: usize,
    wake_pending: AtomicBool,
    /// Set by a detached stop: the flush thread finishes even if the message did not get in.
    closing: AtomicBool,
    ctl: Sender<Ctl>,
    /// False once a shutdown gave up waiting for the flush thread: the reporter (which calls
    /// into Envoy with the config's handle) must not run after Envoy freed that config.
    may_report: std::sync::Mutex<bool>,
    /// The reporter's [`Reporter::retire`], run when reports are barred.
    retire: std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

enum Ctl {
    Wake,
    Flush(Sender<()>),
    Shutdown(Sender<()>),
}

/// The producer side held by one Envoy thread's logger/tracer object.
pub struct Producer {
    shared: Arc<Shared>,
    slot: usize,
}

impl Producer {
    /// Appends one record written by `f`, or — when this worker's queue is full — drops it
    /// (counted) without calling `f`. Returns whether the record was accepted.
    #[inline]
    pub fn push_with(&self, f: impl FnOnce(&mut Vec<u8>)) -> bool {
        push_on(&self.shared, self.slot, f)
    }

    /// Counts a record this producer decided not to produce (filtered or sampled out).
    #[inline]
    pub fn skip(&self) {
        self.shared.slots[self.slot].skipped.fetch_add(1, Relaxed);
    }

    /// Records producer-side time spent on one record (self-timing, when enabled).
    #[inline]
    pub fn record_busy_ns(&self, ns: u64) {
        let slot = &self.shared.slots[self.slot];
        slot.busy_ns.fetch_add(ns, Relaxed);
        slot.busy_hist.record(ns);
    }
}

#[inline]
fn push_on(sh: &Shared, slot: usize, f: impl FnOnce(&mut Vec<u8>)) -> bool {
    let slot = &sh.slots[slot];
    let mut batch = slot.partial.swap(None).unwrap_or_else(|| sh.pool.pop().unwrap_or_default());
    if batch.records >= sh.batch_records || batch.data.len() >= BATCH_BYTES {
        // The queue was full when this batch filled up (by records or by bytes): try again,
        // else drop the newest — a parked batch never grows past its limits.
        match enqueue(slot, batch) {
            Ok(()) => batch = sh.pool.pop().unwrap_or_default(),
            Err(b) => {
                put_back(slot, b);
                slot.dropped.fetch_add(1, Relaxed);
                return false;
            }
        }
    }
    batch.append(f);
    slot.produced.fetch_add(1, Relaxed);
    if batch.records >= sh.batch_records || batch.data.len() >= BATCH_BYTES {
        match enqueue(slot, batch) {
            Ok(()) => {
                if slot.full.len() >= sh.wake_at && !sh.wake_pending.swap(true, Relaxed) {
                    // One message per threshold crossing; a full channel means a wake is
                    // already on its way.
                    let _ = sh.ctl.try_send(Ctl::Wake);
                }
                return true;
            }
            Err(b) => batch = b,
        }
    }
    put_back(slot, batch);
    true
}

/// Queues a full batch, keeping the slot's count of waiting records (counted before the push
/// so the flush thread's pop never sees it negative).
#[inline]
fn enqueue(slot: &Slot, batch: Box<Batch>) -> Result<(), Box<Batch>> {
    let n = batch.records as u64;
    slot.waiting.fetch_add(n, Relaxed);
    slot.full.push(batch).inspect_err(|_| {
        slot.waiting.fetch_sub(n, Relaxed);
    })
}

/// Parks `batch` as the slot's partial batch. When two threads share a slot, another one may
/// have parked its own meanwhile: that one is queued whole (or, with the queue full, its
/// records are moved from produced to dropped) — never lost uncounted.
#[inline]
fn put_back(slot: &Slot, batch: Box<Batch>) {
    if let Some(other) = slot.partial.swap(Some(batch)) {
        if let Err(b) = enqueue(slot, other) {
            let n = b.records as u64;
            slot.produced.fetch_sub(n, Relaxed);
            slot.dropped.fetch_add(n, Relaxed);
        }
    }
}

/// See [`Pipeline::handle`].
#[derive(Clone)]
pub struct Handle {
    shared: Arc<Shared>,
}

impl Handle {
    /// [`Producer::push_with`] on slot `slot` (wrapped into range).
    #[inline]
    pub fn push_with(&self, slot: usize, f: impl FnOnce(&mut Vec<u8>)) -> bool {
        push_on(&self.shared, slot % self.shared.slots.len(), f)
    }

    /// [`Producer::skip`] on slot `slot` (wrapped into range).
    #[inline]
    pub fn skip(&self, slot: usize) {
        self.shared.slots[slot % self.shared.slots.len()].skipped.fetch_add(1, Relaxed);
    }
}

/// One flush thread and its per-worker queues.
pub struct Pipeline {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    shutdown_timeout: Duration,
    stop: Option<StopSignal>,
    /// The thread that started the pipeline: only it waits for the flush thread at shutdown.
    owner: std::thread::ThreadId,
}

impl Pipeline {
    /// Starts the flush thread.
    pub fn start<E: Exporter, P: Reporter>(cfg: PipelineConfig, mut exporter: E, reporter: P) -> std::io::Result<Self> {
        let slots = cfg.slots.max(1);
        let cap = cfg.queue_capacity.max(1);
        let batch_records = cap.min(BATCH_RECORDS);
        let batches = cap.div_ceil(batch_records).max(1);
        let (tx, rx) = bounded(64);
        let shared = Arc::new(Shared {
            slots: (0..slots)
                .map(|_| {
                    CachePadded::new(Slot {
                        partial: AtomicCell::new(None),
                        full: ArrayQueue::new(batches),
                        waiting: AtomicU64::new(0),
                        produced: AtomicU64::new(0),
                        dropped: AtomicU64::new(0),
                        skipped: AtomicU64::new(0),
                        busy_ns: AtomicU64::new(0),
                        busy_hist: Histogram::default(),
                    })
                })
                .collect(),
            pool: ArrayQueue::new((slots * 16).max(32)),
            batch_records,
            // Wake after ~512 records (or half the queue, if smaller) so a batch's memory is
            // reused while still warm and the queue never runs near full under steady load.
            wake_at: (512 / batch_records).clamp(1, batches.div_ceil(2).max(1)),
            wake_pending: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            ctl: tx,
            may_report: std::sync::Mutex::new(true),
            retire: std::sync::Mutex::new(reporter.retire()),
        });
        let stop = exporter.stop_signal();
        let published =
            Arc::new(std::sync::Mutex::new(Published { reporter, totals: Totals::default(), panics: 0, at: None }));
        exporter.set_heartbeat(heartbeat(shared.clone(), published.clone()));
        let worker = FlushWorker {
            shared: shared.clone(),
            rx,
            exporter,
            published,
            interval: cfg.flush_interval.max(Duration::from_millis(1)),
            drain_budget: cfg.shutdown_timeout,
            stop: stop.clone(),
            panics: 0,
        };
        let thread = std::thread::Builder::new().name(cfg.thread_name).spawn(move || worker.run())?;
        let owner = std::thread::current().id();
        Ok(Pipeline { shared, thread: Some(thread), shutdown_timeout: cfg.shutdown_timeout, stop, owner })
    }

    /// A producer bound to `worker`'s slot. Indices past the last slot wrap around: every
    /// operation on a slot is atomic, so sharing one is safe, just no longer contention-free.
    pub fn producer(&self, worker: usize) -> Producer {
        Producer { shared: self.shared.clone(), slot: worker % self.shared.slots.len() }
    }

    /// A producer side for callers that pick a slot per call rather than holding a
    /// [`Producer`] per thread. It does not keep the flush thread alive: records pushed after
    /// the pipeline is dropped are never exported.
    pub fn handle(&self) -> Handle {
        Handle { shared: self.shared.clone() }
    }

    /// Asks the flush thread to export everything produced so far; waits up to `timeout`.
    pub fn flush(&self, timeout: Duration) -> bool {
        let (tx, rx) = bounded(1);
        if self.shared.ctl.send_timeout(Ctl::Flush(tx), timeout).is_err() {
            return false;
        }
        rx.recv_timeout(timeout).is_ok()
    }

    /// Drains the queues (bounded by `shutdown_timeout`, which also cuts short an export in
    /// progress) and joins the flush thread. Returns false if the thread did not finish in
    /// time: it is then left detached and never reports again. On another thread than the one
    /// that started the pipeline it does not wait (see the module docs) and returns false.
    pub fn shutdown(mut self) -> bool {
        self.stop()
    }

    /// Waits for a report in progress, then bars any later one.
    fn bar_reports(&self) {
        if let Ok(mut may) = self.shared.may_report.lock() {
            *may = false;
            if let Some(retire) = self.shared.retire.lock().ok().and_then(|mut r| r.take()) {
                retire();
            }
        }
    }

    fn stop(&mut self) -> bool {
        let Some(thread) = self.thread.take() else { return true };
        let start = Instant::now();
        if let Some(stop) = &self.stop {
            stop.stop_by(start + self.shutdown_timeout);
        }
        if std::thread::current().id() != self.owner {
            // An Envoy worker (it serves other connections) or a thread we do not know: no
            // waiting here. The config's Envoy handle goes away with this call, so reports end
            // now (after one in progress); the flush thread drains by the deadline and exits.
            self.bar_reports();
            self.shared.closing.store(true, Relaxed);
            let (tx, _) = bounded(1);
            let _ = self.shared.ctl.try_send(Ctl::Shutdown(tx));
            drop(thread);
            return false;
        }
        let (tx, rx) = bounded(1);
        let grace = self.shutdown_timeout + Duration::from_secs(1);
        let sent = self.shared.ctl.send_timeout(Ctl::Shutdown(tx), grace).is_ok();
        let left = grace.saturating_sub(start.elapsed());
        let name = thread.thread().name().unwrap_or("?").to_string();
        // After its reply the thread only drops its exporter: bounded too (see `join_by`).
        if sent && rx.recv_timeout(left).is_ok() && crate::stop::join_by(thread, start + grace) {
            // Joined after its last report: what that report left in gauges shared with other
            // configs (records the drain deadline cut off) goes too.
            self.bar_reports();
            return true;
        }
        self.bar_reports();
        crate::envoy_log!(
            crate::ffi::LogLevel::Warn,
            "envoy-obs: flush thread {name} did not stop within {} ms; left behind, it no longer reports",
            grace.as_millis()
        );
        false
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Nice value of flush threads: background work yields to Envoy's request-serving threads
/// when they compete for a core (waking the flusher then does not preempt a worker in the
/// middle of a request), yet still gets a share large enough to keep the queues drained.
pub const FLUSH_THREAD_NICE: i32 = 10;

fn lower_own_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid and setpriority on the calling thread have no memory-safety effects;
    // on Linux the nice value is per thread, so only this flush thread is affected.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, FLUSH_THREAD_NICE);
    }
}

/// Runs exporter code on the flush thread: a panic there must not end the thread (queues would
/// fill and every later record count as dropped, with nobody saying why). Logged while few,
/// then at every power of two.
fn caught<T>(panics: &mut u64, what: &str, f: impl FnOnce() -> T) -> Option<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(v) => Some(v),
        Err(e) => {
            *panics += 1;
            if panics.is_power_of_two() {
                let msg = e.downcast_ref::<&str>().copied().or_else(|| e.downcast_ref::<String>().map(String::as_str));
                crate::envoy_log!(
                    crate::ffi::LogLevel::Error,
                    "envoy-obs: {} panicked in {what} ({} so far): {}; its records count as failed",
                    std::thread::current().name().unwrap_or("flush thread"),
                    panics,
                    msg.unwrap_or("(no message)")
                );
            }
            None
        }
    }
}

struct FlushWorker<E, P> {
    shared: Arc<Shared>,
    rx: Receiver<Ctl>,
    exporter: E,
    /// The reporter and the totals, shared with the exporter's [`Heartbeat`] (same thread).
    published: Arc<std::sync::Mutex<Published<P>>>,
    interval: Duration,
    drain_budget: Duration,
    stop: Option<StopSignal>,
    /// Panics caught in the exporter (each logged while few, then every power of 2).
    panics: u64,
}

/// What the flush thread reports, and to whom.
struct Published<P> {
    reporter: P,
    totals: Totals,
    /// Panics caught in the reporter.
    panics: u64,
    /// When the totals were last published.
    at: Option<Instant>,
}

fn heartbeat<P: Reporter>(shared: Arc<Shared>, published: Arc<std::sync::Mutex<Published<P>>>) -> Heartbeat {
    Heartbeat(Arc::new(move || {
        // `try_lock`: a beat from inside a report (none does that) must not deadlock.
        if let Ok(mut p) = published.try_lock() {
            if p.at.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                publish(&shared, &mut p);
            }
        }
    }))
}

/// Reads the producers' counters into the totals and hands them to the reporter (unless
/// reports were barred: the config's Envoy handle is gone).
fn publish<P: Reporter>(shared: &Shared, p: &mut Published<P>) {
    let (mut produced, mut dropped, mut skipped, mut depth, mut busy) = (0, 0, 0, 0, 0);
    let mut hist = std::mem::take(&mut p.totals.busy_hist);
    hist.clear();
    hist.resize(BUCKETS, 0);
    for s in shared.slots.iter() {
        produced += s.produced.load(Relaxed);
        dropped += s.dropped.load(Relaxed);
        skipped += s.skipped.load(Relaxed);
        busy += s.busy_ns.load(Relaxed);
        s.busy_hist.accumulate(&mut hist);
        depth += s.waiting.load(Relaxed);
    }
    let t = &mut p.totals;
    t.queued = produced;
    t.dropped = dropped;
    t.skipped = skipped;
    t.queue_depth = depth;
    t.busy_ns = busy;
    t.busy_hist = hist;
    p.at = Some(Instant::now());
    if let Ok(may) = shared.may_report.lock() {
        if *may {
            let Published { reporter, totals, panics, .. } = p;
            caught(panics, "report", || reporter.report(totals));
        }
    }
}

impl<E: Exporter, P: Reporter> FlushWorker<E, P> {
    fn run(mut self) {
        lower_own_priority();
        let mut next = Instant::now() + self.interval;
        loop {
            if self.shared.closing.load(Relaxed) {
                self.finish();
                return;
            }
            let wait = next.saturating_duration_since(Instant::now());
            let msg = if wait.is_zero() { Err(RecvTimeoutError::Timeout) } else { self.rx.recv_timeout(wait) };
            match msg {
                Ok(Ctl::Wake) => {
                    self.shared.wake_pending.store(false, Relaxed);
                    self.drain(false);
                }
                Ok(Ctl::Flush(reply)) => {
                    self.drain(true);
                    // Counters are published before the reply: a flushed pipeline's stats agree.
                    self.report();
                    let _ = reply.send(());
                    continue;
                }
                Ok(Ctl::Shutdown(reply)) => {
                    self.finish();
                    let _ = reply.send(());
                    return;
                }
                Err(RecvTimeoutError::Timeout) => {
                    self.drain(true);
                    next = Instant::now() + self.interval;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.finish();
                    return;
                }
            }
            self.report();
        }
    }

    fn finish(&mut self) {
        let mut deadline = Instant::now() + self.drain_budget;
        if let Some(d) = self.stop.as_ref().and_then(StopSignal::deadline) {
            deadline = deadline.min(d);
        }
        self.exporter.draining(deadline);
        while self.drain(true) > 0 && Instant::now() < deadline {}
        self.exporter.shutdown();
        self.report();
    }

    /// One pass over every slot: the full batches waiting when the pass reached it and, with
    /// `partials`, the partial batch too. A producer that never stops cannot pin the thread
    /// here. Returns records exported.
    fn drain(&mut self, partials: bool) -> usize {
        let mut taken = 0;
        for i in 0..self.shared.slots.len() {
            let mut n = self.shared.slots[i].full.len();
            while n > 0 {
                let Some(b) = self.shared.slots[i].full.pop() else { break };
                self.shared.slots[i].waiting.fetch_sub(b.records as u64, Relaxed);
                n -= 1;
                taken += self.export(b);
            }
            if partials {
                if let Some(b) = self.shared.slots[i].partial.swap(None) {
                    taken += self.export(b);
                }
            }
        }
        let o = caught(&mut self.panics, "flush", || self.exporter.flush()).unwrap_or_default();
        self.add(o);
        taken
    }

    fn export(&mut self, mut b: Box<Batch>) -> usize {
        let n = b.records;
        if n > 0 {
            let o = caught(&mut self.panics, "export", || self.exporter.export(&b))
                .unwrap_or(Outcome { written: 0, failed: n as u64 });
            self.add(o);
        }
        if b.data.capacity() <= MAX_POOLED_BATCH {
            b.clear();
            let _ = self.shared.pool.push(b);
        }
        n
    }

    fn add(&mut self, o: Outcome) {
        if let Ok(mut p) = self.published.lock() {
            p.totals.written += o.written;
            p.totals.failed += o.failed;
        }
    }

    fn report(&mut self) {
        if let Ok(mut p) = self.published.lock() {
            publish(&self.shared, &mut p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn rec(v: u32) -> impl FnOnce(&mut Vec<u8>) {
        move |b: &mut Vec<u8>| b.extend_from_slice(&v.to_le_bytes())
    }

    /// The u32 of each 4-byte record (`u32::MAX` for records of other sizes).
    fn values(b: &Batch) -> Vec<u32> {
        b.iter().map(|r| r.try_into().map_or(u32::MAX, u32::from_le_bytes)).collect()
    }

    #[derive(Clone, Default)]
    struct Mem(Arc<Mutex<Vec<u32>>>);
    impl Exporter for Mem {
        fn export(&mut self, batch: &Batch) -> Outcome {
            self.0.lock().unwrap().extend(values(batch));
            Outcome { written: batch.len() as u64, failed: 0 }
        }
    }

    /// Blocks inside `export` until released: lets a test fill queues deterministically.
    struct Gated {
        started: Sender<()>,
        release: Receiver<()>,
        out: Mem,
    }
    impl Exporter for Gated {
        fn export(&mut self, batch: &Batch) -> Outcome {
            let _ = self.started.send(());
            let _ = self.release.recv_timeout(Duration::from_secs(10));
            self.out.export(batch)
        }
    }

    #[derive(Clone, Default)]
    struct Rec(Arc<Mutex<Totals>>);
    impl Reporter for Rec {
        fn report(&mut self, t: &Totals) {
            *self.0.lock().unwrap() = t.clone();
        }
    }

    fn cfg(cap: usize, interval_ms: u64) -> PipelineConfig {
        PipelineConfig {
            thread_name: "test-flush".into(),
            slots: 3,
            queue_capacity: cap,
            flush_interval: Duration::from_millis(interval_ms),
            shutdown_timeout: Duration::from_secs(5),
        }
    }

    fn poll_until(deadline: Duration, mut f: impl FnMut() -> bool) -> bool {
        let end = Instant::now() + deadline;
        while Instant::now() < end {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        f()
    }

    /// Beats its heartbeat from inside a blocked export, as the OTLP client does while it
    /// retries.
    struct Beating {
        heartbeat: Option<Heartbeat>,
        started: Sender<()>,
        release: Receiver<()>,
    }
    impl Exporter for Beating {
        fn export(&mut self, batch: &Batch) -> Outcome {
            if let Some(h) = &self.heartbeat {
                h.beat();
            }
            let _ = self.started.send(());
            let _ = self.release.recv_timeout(Duration::from_secs(10));
            Outcome { written: batch.len() as u64, failed: 0 }
        }
        fn set_heartbeat(&mut self, heartbeat: Heartbeat) {
            self.heartbeat = Some(heartbeat);
        }
    }

    #[test]
    fn an_export_that_waits_still_publishes_the_counters() {
        let (started_tx, started) = bounded(16);
        let (release, release_rx) = bounded(16);
        let exporter = Beating { heartbeat: None, started: started_tx, release: release_rx };
        let rec_totals = Rec::default();
        let p = Pipeline::start(cfg(1 << 10, 200), exporter, rec_totals.clone()).unwrap();
        let prod = p.producer(0);
        for i in 0..5 {
            prod.push_with(rec(i));
        }
        // The timer exports the partial batch: the export now blocks, after one beat.
        started.recv_timeout(Duration::from_secs(10)).unwrap();
        let t = rec_totals.0.lock().unwrap().clone();
        assert_eq!((t.queued, t.written), (5, 0), "published from inside the export: {t:?}");
        release.send(()).unwrap();
        assert!(p.flush(Duration::from_secs(10)));
        let t = rec_totals.0.lock().unwrap().clone();
        assert_eq!((t.queued, t.written), (5, 5), "{t:?}");
    }

    #[test]
    fn threads_sharing_a_slot_lose_nothing_uncounted() {
        let out = Mem::default();
        let rec_totals = Rec::default();
        let p = Pipeline::start(cfg(1 << 20, 20), out.clone(), rec_totals.clone()).unwrap();
        let h = p.handle();
        std::thread::scope(|s| {
            for t in 0..4u32 {
                let p = &h;
                s.spawn(move || {
                    for i in 0..20_000u32 {
                        p.push_with(7, rec(t * 100_000 + i));
                    }
                });
            }
        });
        assert!(p.flush(Duration::from_secs(10)));
        let t = rec_totals.0.lock().unwrap().clone();
        let mut got = out.0.lock().unwrap().clone();
        got.sort_unstable();
        got.dedup();
        assert_eq!(got.len() as u64, t.written, "no duplicates");
        assert_eq!(t.written + t.dropped, 80_000, "{t:?}");
        assert_eq!(t.queued, t.written);
    }

    #[test]
    fn partial_batch_cell_is_lock_free() {
        // crossbeam falls back to a global striped lock for cells it cannot swap atomically;
        // the worker's per-record swap must never take a lock.
        assert!(AtomicCell::<Option<Box<Batch>>>::is_lock_free());
    }

    #[test]
    fn batch_framing_round_trips_and_tolerates_garbage() {
        let mut b = Batch::default();
        b.append(|v| v.extend_from_slice(b"abc"));
        b.append(|_| {});
        b.append(|v| v.extend_from_slice(&[0xff; 70_000]));
        let got: Vec<usize> = b.iter().map(|r| r.len()).collect();
        assert_eq!(got, vec![3, 0, 70_000]);
        let torn = BatchIter { data: &b.data[..11] };
        assert_eq!(torn.map(|r| r.len()).collect::<Vec<_>>(), vec![3, 0]);
    }

    /// An exporter that panics on batches holding a 13: the flush thread carries on.
    #[derive(Clone, Default)]
    struct Brittle(Mem);
    impl Exporter for Brittle {
        fn export(&mut self, batch: &Batch) -> Outcome {
            assert!(!values(batch).contains(&13), "unlucky batch");
            self.0.export(batch)
        }
    }

    #[test]
    fn a_panicking_export_counts_its_batch_failed_and_the_thread_goes_on() {
        let out = Brittle::default();
        let totals = Rec::default();
        let p = Pipeline::start(cfg(1000, 60_000), out.clone(), totals.clone()).unwrap();
        let w = p.producer(0);
        for i in 10..20 {
            assert!(w.push_with(rec(i)));
        }
        assert!(p.flush(Duration::from_secs(5)));
        for i in 100..110 {
            assert!(w.push_with(rec(i)));
        }
        assert!(p.flush(Duration::from_secs(5)));
        let t = totals.0.lock().unwrap().clone();
        assert_eq!((t.queued, t.written, t.failed), (20, 10, 10), "{t:?}");
        assert_eq!(*out.0 .0.lock().unwrap(), (100..110).collect::<Vec<_>>());
        assert!(p.shutdown());
    }

    #[test]
    fn shutdown_drains_everything_in_order_per_worker() {
        let mem = Mem::default();
        let p = Pipeline::start(cfg(1000, 60_000), mem.clone(), ()).unwrap();
        let (a, b) = (p.producer(0), p.producer(1));
        for i in 0..300 {
            assert!(a.push_with(rec(i)));
            assert!(b.push_with(rec(1000 + i)));
        }
        assert!(p.shutdown());
        let got = mem.0.lock().unwrap().clone();
        assert_eq!(got.len(), 600);
        let from_a: Vec<u32> = got.iter().copied().filter(|v| *v < 1000).collect();
        assert_eq!(from_a, (0..300).collect::<Vec<_>>());
    }

    #[test]
    fn interval_flush_steals_a_quiet_workers_partial_batch() {
        let mem = Mem::default();
        let p = Pipeline::start(cfg(1000, 20), mem.clone(), ()).unwrap();
        p.producer(0).push_with(rec(7));
        assert!(poll_until(Duration::from_secs(5), || mem.0.lock().unwrap().len() == 1));
        // The worker keeps going after the steal.
        p.producer(0).push_with(rec(8));
        assert!(poll_until(Duration::from_secs(5), || mem.0.lock().unwrap().clone() == vec![7, 8]));
    }

    #[test]
    fn waiting_batches_wake_the_flusher_before_the_interval() {
        let mem = Mem::default();
        let p = Pipeline::start(cfg(8, 600_000), mem.clone(), ()).unwrap();
        let w = p.producer(2);
        for i in 0..8 {
            w.push_with(rec(i));
        }
        assert!(poll_until(Duration::from_secs(5), || mem.0.lock().unwrap().len() >= 4));
    }

    #[test]
    fn with_the_queue_full_a_parked_batch_stops_at_its_byte_limit_too() {
        let (started_tx, started_rx) = bounded(16);
        let (release_tx, release_rx) = bounded(16);
        let out = Mem::default();
        let gated = Gated { started: started_tx, release: release_rx, out: out.clone() };
        // capacity 64: one batch of up to 64 records / 32 KiB queued at most.
        let p = Pipeline::start(cfg(64, 600_000), gated, ()).unwrap();
        let w = p.producer(0);
        let big = |b: &mut Vec<u8>| b.resize(b.len() + 40_000, b'x');
        assert!(w.push_with(big));
        started_rx.recv_timeout(Duration::from_secs(5)).expect("export started");
        // Exporting one; then one queued, one parked (over 32 KiB), the rest dropped: memory
        // stays at a few batches however large the records.
        let accepted = (0..10).filter(|_| w.push_with(big)).count();
        assert_eq!(accepted, 2);
        let slot = &p.shared.slots[0];
        assert_eq!(slot.dropped.load(Relaxed), 8);
        for _ in 0..8 {
            let _ = release_tx.send(());
        }
        assert!(p.shutdown());
        assert_eq!(out.0.lock().unwrap().len(), 3, "the exported, the queued and the parked batch");
    }

    #[test]
    fn full_queue_drops_newest_and_counts_it() {
        let (started_tx, started_rx) = bounded(16);
        let (release_tx, release_rx) = bounded(16);
        let out = Mem::default();
        let rec_totals = Rec::default();
        let gated = Gated { started: started_tx, release: release_rx, out: out.clone() };
        // capacity 4: batches of 4 records, one full batch queued at most, plus the partial.
        let p = Pipeline::start(cfg(4, 600_000), gated, rec_totals.clone()).unwrap();
        let w = p.producer(0);
        for i in 0..4 {
            assert!(w.push_with(rec(i)));
        }
        started_rx.recv_timeout(Duration::from_secs(5)).expect("export started");
        // Flusher is blocked exporting [0..4). Next batch fills the queue, then the partial.
        let accepted: Vec<u32> = (4..30).filter(|&i| w.push_with(rec(i))).collect();
        assert_eq!(accepted, (4..12).collect::<Vec<_>>(), "queue (4) + partial (4) accepted");
        for _ in 0..8 {
            let _ = release_tx.send(());
        }
        assert!(p.shutdown());
        assert_eq!(out.0.lock().unwrap().clone(), (0..12).collect::<Vec<_>>(), "oldest kept, newest dropped");
        let t = rec_totals.0.lock().unwrap().clone();
        assert_eq!((t.queued, t.dropped, t.written), (12, 18, 12));
    }

    #[test]
    fn explicit_flush_replies() {
        let mem = Mem::default();
        let p = Pipeline::start(cfg(100, 600_000), mem.clone(), ()).unwrap();
        p.producer(1).push_with(rec(1));
        assert!(p.flush(Duration::from_secs(5)));
        assert_eq!(mem.0.lock().unwrap().len(), 1);
    }

    #[test]
    fn concurrent_producers_and_steals_lose_nothing() {
        let mem = Mem::default();
        let p = Arc::new(Pipeline::start(cfg(100_000, 1), mem.clone(), ()).unwrap());
        let threads: Vec<_> = (0..3)
            .map(|t| {
                let prod = p.producer(t);
                std::thread::spawn(move || {
                    for i in 0..20_000u32 {
                        assert!(prod.push_with(rec(t as u32 * 100_000 + i)));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let p = Arc::try_unwrap(p).ok().unwrap();
        assert!(p.shutdown());
        let mut got = mem.0.lock().unwrap().clone();
        assert_eq!(got.len(), 60_000);
        got.sort();
        got.dedup();
        assert_eq!(got.len(), 60_000);
    }

    /// An exporter whose export waits like a network exporter retrying a dead collector: up
    /// to `block` per batch, cut short only by its stop signal when `obeys`.
    struct Stuck {
        stop: StopSignal,
        obeys: bool,
        block: Duration,
        started: Arc<AtomicBool>,
        exported: Arc<AtomicU64>,
    }
    impl Exporter for Stuck {
        fn export(&mut self, batch: &Batch) -> Outcome {
            self.started.store(true, Relaxed);
            let delivered = if self.obeys {
                self.stop.sleep(self.block)
            } else {
                std::thread::sleep(self.block);
                true
            };
            self.exported.fetch_add(batch.len() as u64, Relaxed);
            if delivered {
                Outcome { written: batch.len() as u64, failed: 0 }
            } else {
                Outcome { written: 0, failed: batch.len() as u64 }
            }
        }
        fn stop_signal(&self) -> Option<StopSignal> {
            Some(self.stop.clone())
        }
    }

    #[derive(Clone, Default)]
    struct CountReports(Arc<AtomicU64>);
    impl Reporter for CountReports {
        fn report(&mut self, _: &Totals) {
            self.0.fetch_add(1, Relaxed);
        }
        /// Marks the retirement with a large count, so a test can see it ran.
        fn retire(&self) -> Option<Box<dyn FnOnce() + Send>> {
            let n = self.0.clone();
            Some(Box::new(move || {
                n.fetch_add(1_000_000, Relaxed);
            }))
        }
    }

    fn stuck_pipeline(obeys: bool, block: Duration) -> (Pipeline, Arc<AtomicU64>, CountReports) {
        let exported = Arc::new(AtomicU64::new(0));
        let started = Arc::new(AtomicBool::new(false));
        let stuck =
            Stuck { stop: StopSignal::default(), obeys, block, started: started.clone(), exported: exported.clone() };
        let reports = CountReports::default();
        let c = PipelineConfig { shutdown_timeout: Duration::from_millis(300), ..cfg(1000, 10) };
        let p = Pipeline::start(c, stuck, reports.clone()).unwrap();
        p.producer(0).push_with(rec(1));
        // The flush thread picks the record up on its 10 ms timer and blocks in export.
        let t = Instant::now();
        while !started.load(Relaxed) && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(started.load(Relaxed));
        (p, exported, reports)
    }

    #[test]
    fn shutdown_cuts_short_an_export_stuck_in_retries() {
        // Without the stop signal this export would block for 60 s.
        let (p, exported, _) = stuck_pipeline(true, Duration::from_secs(60));
        let t = Instant::now();
        assert!(p.shutdown(), "the flush thread was joined");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert_eq!(exported.load(Relaxed), 1);
    }

    #[test]
    fn a_flush_thread_left_behind_never_reports_again() {
        // An exporter that ignores the signal outlives the grace period (300 ms + 1 s).
        let (p, _, reports) = stuck_pipeline(false, Duration::from_millis(2500));
        let t = Instant::now();
        assert!(!p.shutdown(), "the thread could not be joined in time");
        assert!(t.elapsed() < Duration::from_millis(2000));
        let after = reports.0.load(Relaxed);
        // The thread finishes its export, drains and exits: none of that may reach Envoy.
        std::thread::sleep(Duration::from_millis(2500));
        assert_eq!(reports.0.load(Relaxed), after);
    }

    /// Envoy destroys a config on the worker that drops its last reference: stopping there
    /// must not wait for an export, yet the flush thread still ends by the deadline, and it
    /// reports nothing once the config is gone.
    #[test]
    fn a_stop_on_another_thread_does_not_wait() {
        let (p, exported, reports) = stuck_pipeline(true, Duration::from_secs(60));
        let t = Instant::now();
        let detached = std::thread::spawn(move || p.shutdown()).join().unwrap();
        assert!(!detached && t.elapsed() < Duration::from_millis(100), "{:?}", t.elapsed());
        let after = reports.0.load(Relaxed);
        assert!(after >= 1_000_000, "the reporter's retirement ran when reports were barred");
        // 300 ms shutdown deadline: the export is cut short, and the thread drains and exits
        // (dropping its exporter, the other holder of `exported`).
        let t = Instant::now();
        while Arc::strong_count(&exported) > 1 {
            assert!(t.elapsed() < Duration::from_secs(5), "the flush thread did not end");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(exported.load(Relaxed), 1);
        assert_eq!(reports.0.load(Relaxed), after);
    }

    #[test]
    fn queue_depth_counts_records_in_batches_cut_by_bytes() {
        struct Sink;
        impl Exporter for Sink {
            fn export(&mut self, batch: &Batch) -> Outcome {
                Outcome { written: batch.len() as u64, failed: 0 }
            }
        }
        let rec_totals = Rec::default();
        let p = Pipeline::start(cfg(1000, 600_000), Sink, rec_totals.clone()).unwrap();
        let prod = p.producer(0);
        // 40 KB records: every batch is cut at one record, far below 64 records per batch.
        for _ in 0..5 {
            assert!(prod.push_with(|b| b.resize(b.len() + 40_000, b'x')));
        }
        assert_eq!(p.shared.slots[0].full.len(), 5);
        assert_eq!(p.shared.slots[0].waiting.load(Relaxed), 5);
        assert!(p.flush(Duration::from_secs(5)));
        assert_eq!(p.shared.slots[0].waiting.load(Relaxed), 0);
        assert_eq!(rec_totals.0.lock().unwrap().queue_depth, 0);
        assert_eq!(rec_totals.0.lock().unwrap().written, 5);
    }
}
