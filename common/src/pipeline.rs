//! Per-worker bounded queues feeding one flush thread per config object.
//!
//! - Each Envoy worker (and the main thread) gets its own slot: a bounded lock-free
//!   `ArrayQueue` plus relaxed counters, padded to its own cache line. A push is one CAS on the
//!   worker's own queue; when the queue is full the **newest** record (the one being pushed) is
//!   dropped and counted — records already queued are never discarded.
//! - One named flush thread drains every slot into the [`Exporter`]: when a queue passes half
//!   its capacity (one wake message, not one per record), every `flush_interval`, on an
//!   explicit [`Pipeline::flush`], and on shutdown. Control messages carry their own reply
//!   channel; every wait has a timeout.
//! - Shutdown drains what is queued, bounded by `shutdown_timeout`, then joins the thread.
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};
use crossbeam_queue::ArrayQueue;
use crossbeam_utils::CachePadded;

use crate::timing::{Histogram, BUCKETS};

/// What an export or flush achieved, in records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Records that reached their destination.
    pub written: u64,
    /// Records given up on (write error, rejected by the peer, retries exhausted).
    pub failed: u64,
}

/// The destination of one signal. Called only from the flush thread, never concurrently.
pub trait Exporter<R>: Send + 'static {
    /// Sends the records in `batch`, leaving it empty.
    fn export(&mut self, batch: &mut Vec<R>) -> Outcome;
    /// Pushes out anything buffered; also the place for periodic upkeep (e.g. log rotation).
    fn flush(&mut self) -> Outcome {
        Outcome::default()
    }
    /// Last call before the thread exits.
    fn shutdown(&mut self) {}
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
    /// Nanoseconds producers reported spending on records ([`Producer::record_busy_ns`]).
    pub busy_ns: u64,
    /// Distribution of those per-record nanoseconds (see [`crate::timing::quantile`]).
    pub busy_hist: Vec<u64>,
    /// Records the exporter delivered.
    pub written: u64,
    /// Records the exporter gave up on.
    pub failed: u64,
    /// Records waiting in the queues right now.
    pub queue_depth: u64,
}

/// Receives [`Totals`] after every flush cycle (self-metrics). Runs on the flush thread.
pub trait Reporter: Send + 'static {
    /// Publishes the totals (implementations keep the previous value to compute deltas).
    fn report(&mut self, totals: &Totals);
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
    /// Capacity of each slot's queue, in records.
    pub queue_capacity: usize,
    /// Longest time a record waits in a queue before it is exported.
    pub flush_interval: Duration,
    /// Records handed to one `Exporter::export` call at most.
    pub max_batch: usize,
    /// Bound on the drain at shutdown.
    pub shutdown_timeout: Duration,
}

struct Slot<R> {
    queue: ArrayQueue<R>,
    queued: AtomicU64,
    dropped: AtomicU64,
    skipped: AtomicU64,
    busy_ns: AtomicU64,
    busy_hist: Histogram,
}

struct Shared<R> {
    slots: Box<[CachePadded<Slot<R>>]>,
    wake_at: usize,
    wake_pending: AtomicBool,
    ctl: Sender<Ctl>,
}

enum Ctl {
    Wake,
    Flush(Sender<()>),
    Shutdown(Sender<()>),
}

/// The producer side held by one Envoy thread's logger/tracer object.
pub struct Producer<R> {
    shared: Arc<Shared<R>>,
    slot: usize,
}

impl<R> Producer<R> {
    /// Queues `r` on this worker's slot, or hands it back (and counts a drop) when full.
    #[inline]
    pub fn push(&self, r: R) -> Result<(), R> {
        let slot = &self.shared.slots[self.slot];
        match slot.queue.push(r) {
            Ok(()) => {
                slot.queued.fetch_add(1, Relaxed);
                if slot.queue.len() >= self.shared.wake_at && !self.shared.wake_pending.swap(true, Relaxed) {
                    // One message per threshold crossing; a full control channel already
                    // means a wake is on its way.
                    let _ = self.shared.ctl.try_send(Ctl::Wake);
                }
                Ok(())
            }
            Err(r) => {
                slot.dropped.fetch_add(1, Relaxed);
                Err(r)
            }
        }
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

/// One flush thread and its per-worker queues.
pub struct Pipeline<R: Send + 'static> {
    shared: Arc<Shared<R>>,
    thread: Option<JoinHandle<()>>,
    shutdown_timeout: Duration,
}

impl<R: Send + 'static> Pipeline<R> {
    /// Starts the flush thread.
    pub fn start<E: Exporter<R>, P: Reporter>(cfg: PipelineConfig, exporter: E, reporter: P) -> std::io::Result<Self> {
        let slots = cfg.slots.max(1);
        let cap = cfg.queue_capacity.max(1);
        let (tx, rx) = bounded(64);
        let shared = Arc::new(Shared {
            slots: (0..slots)
                .map(|_| {
                    CachePadded::new(Slot {
                        queue: ArrayQueue::new(cap),
                        queued: AtomicU64::new(0),
                        dropped: AtomicU64::new(0),
                        skipped: AtomicU64::new(0),
                        busy_ns: AtomicU64::new(0),
                        busy_hist: Histogram::default(),
                    })
                })
                .collect(),
            // Wake the flusher after a batch worth of records (or half the queue, if smaller):
            // buffers come back to the producers' pool quickly and the queue never runs near full
            // under steady load.
            wake_at: (cap / 2).min(cfg.max_batch).max(1),
            wake_pending: AtomicBool::new(false),
            ctl: tx,
        });
        let worker = FlushWorker {
            shared: shared.clone(),
            rx,
            exporter,
            reporter,
            batch: Vec::with_capacity(cfg.max_batch.max(1)),
            max_batch: cfg.max_batch.max(1),
            interval: cfg.flush_interval.max(Duration::from_millis(1)),
            drain_budget: cfg.shutdown_timeout,
            totals: Totals::default(),
        };
        let thread = std::thread::Builder::new().name(cfg.thread_name).spawn(move || worker.run())?;
        Ok(Pipeline { shared, thread: Some(thread), shutdown_timeout: cfg.shutdown_timeout })
    }

    /// A producer bound to `worker`'s slot (indices past the last slot wrap around: the
    /// queues are multi-producer, so sharing one is safe, just less contention-free).
    pub fn producer(&self, worker: usize) -> Producer<R> {
        Producer { shared: self.shared.clone(), slot: worker % self.shared.slots.len() }
    }

    /// Asks the flush thread to export everything queued now; waits up to `timeout`.
    pub fn flush(&self, timeout: Duration) -> bool {
        let (tx, rx) = bounded(1);
        if self.shared.ctl.send_timeout(Ctl::Flush(tx), timeout).is_err() {
            return false;
        }
        rx.recv_timeout(timeout).is_ok()
    }

    /// Drains the queues (bounded by `shutdown_timeout`) and joins the flush thread.
    /// Returns false if the thread did not finish in time (it is then left detached).
    pub fn shutdown(mut self) -> bool {
        self.stop()
    }

    fn stop(&mut self) -> bool {
        let Some(thread) = self.thread.take() else {
            return true;
        };
        let (tx, rx) = bounded(1);
        let grace = self.shutdown_timeout + Duration::from_secs(1);
        let sent = self.shared.ctl.send_timeout(Ctl::Shutdown(tx), grace).is_ok();
        if sent && rx.recv_timeout(grace).is_ok() {
            let _ = thread.join();
            true
        } else {
            false
        }
    }
}

impl<R: Send + 'static> Drop for Pipeline<R> {
    fn drop(&mut self) {
        self.stop();
    }
}

struct FlushWorker<R, E, P> {
    shared: Arc<Shared<R>>,
    rx: Receiver<Ctl>,
    exporter: E,
    reporter: P,
    batch: Vec<R>,
    max_batch: usize,
    interval: Duration,
    drain_budget: Duration,
    totals: Totals,
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

impl<R: Send, E: Exporter<R>, P: Reporter> FlushWorker<R, E, P> {
    fn run(mut self) {
        lower_own_priority();
        let mut next = Instant::now() + self.interval;
        loop {
            let wait = next.saturating_duration_since(Instant::now());
            let msg = if wait.is_zero() { Err(RecvTimeoutError::Timeout) } else { self.rx.recv_timeout(wait) };
            match msg {
                Ok(Ctl::Wake) => {
                    self.shared.wake_pending.store(false, Relaxed);
                    self.drain_once();
                }
                Ok(Ctl::Flush(reply)) => {
                    self.drain_once();
                    let o = self.exporter.flush();
                    self.add(o);
                    let _ = reply.send(());
                }
                Ok(Ctl::Shutdown(reply)) => {
                    self.finish();
                    let _ = reply.send(());
                    return;
                }
                Err(RecvTimeoutError::Timeout) => {
                    self.drain_once();
                    let o = self.exporter.flush();
                    self.add(o);
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
        let deadline = Instant::now() + self.drain_budget;
        while self.drain_once() > 0 && Instant::now() < deadline {}
        let o = self.exporter.flush();
        self.add(o);
        self.exporter.shutdown();
        self.report();
    }

    /// One pass over every slot, taking at most what each held when the pass reached it, so
    /// a producer that never stops cannot pin the thread here. Returns records taken.
    fn drain_once(&mut self) -> usize {
        let mut taken = 0;
        for i in 0..self.shared.slots.len() {
            let mut n = self.shared.slots[i].queue.len();
            while n > 0 {
                let Some(r) = self.shared.slots[i].queue.pop() else {
                    break;
                };
                n -= 1;
                taken += 1;
                self.batch.push(r);
                if self.batch.len() >= self.max_batch {
                    self.export();
                }
            }
        }
        if !self.batch.is_empty() {
            self.export();
        }
        taken
    }

    fn export(&mut self) {
        let n = self.batch.len() as u64;
        let out = self.exporter.export(&mut self.batch);
        self.batch.clear();
        // An exporter that under-reports still keeps `written + failed == taken`.
        let unaccounted = n.saturating_sub(out.written + out.failed);
        self.add(Outcome { written: out.written, failed: out.failed + unaccounted });
    }

    fn add(&mut self, o: Outcome) {
        self.totals.written += o.written;
        self.totals.failed += o.failed;
    }

    fn report(&mut self) {
        let (mut queued, mut dropped, mut skipped, mut depth, mut busy) = (0, 0, 0, 0, 0);
        let mut hist = std::mem::take(&mut self.totals.busy_hist);
        hist.clear();
        hist.resize(BUCKETS, 0);
        for s in self.shared.slots.iter() {
            queued += s.queued.load(Relaxed);
            dropped += s.dropped.load(Relaxed);
            skipped += s.skipped.load(Relaxed);
            busy += s.busy_ns.load(Relaxed);
            s.busy_hist.accumulate(&mut hist);
            depth += s.queue.len() as u64;
        }
        self.totals.queued = queued;
        self.totals.dropped = dropped;
        self.totals.skipped = skipped;
        self.totals.busy_ns = busy;
        self.totals.busy_hist = hist;
        self.totals.queue_depth = depth;
        self.reporter.report(&self.totals);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Mem(Arc<Mutex<Vec<u32>>>);
    impl Exporter<u32> for Mem {
        fn export(&mut self, batch: &mut Vec<u32>) -> Outcome {
            let n = batch.len() as u64;
            self.0.lock().unwrap().append(batch);
            Outcome { written: n, failed: 0 }
        }
    }

    /// Blocks inside `export` until released: lets a test fill queues deterministically.
    struct Gated {
        started: Sender<()>,
        release: Receiver<()>,
        out: Mem,
    }
    impl Exporter<u32> for Gated {
        fn export(&mut self, batch: &mut Vec<u32>) -> Outcome {
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
            max_batch: 16,
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

    #[test]
    fn shutdown_drains_everything_in_order_per_worker() {
        let mem = Mem::default();
        let p = Pipeline::start(cfg(1000, 60_000), mem.clone(), ()).unwrap();
        let (a, b) = (p.producer(0), p.producer(1));
        for i in 0..300 {
            a.push(i).unwrap();
            b.push(1000 + i).unwrap();
        }
        assert!(p.shutdown());
        let got = mem.0.lock().unwrap().clone();
        assert_eq!(got.len(), 600);
        let from_a: Vec<u32> = got.iter().copied().filter(|v| *v < 1000).collect();
        assert_eq!(from_a, (0..300).collect::<Vec<_>>());
    }

    #[test]
    fn interval_flushes_without_size_trigger() {
        let mem = Mem::default();
        let p = Pipeline::start(cfg(1000, 20), mem.clone(), ()).unwrap();
        p.producer(0).push(7).unwrap();
        assert!(poll_until(Duration::from_secs(5), || mem.0.lock().unwrap().len() == 1));
    }

    #[test]
    fn half_full_queue_wakes_the_flusher_before_the_interval() {
        let mem = Mem::default();
        let p = Pipeline::start(cfg(8, 600_000), mem.clone(), ()).unwrap();
        let w = p.producer(2);
        for i in 0..4 {
            w.push(i).unwrap();
        }
        assert!(poll_until(Duration::from_secs(5), || mem.0.lock().unwrap().len() == 4));
    }

    #[test]
    fn full_queue_drops_newest_and_counts_it() {
        let (started_tx, started_rx) = bounded(16);
        let (release_tx, release_rx) = bounded(16);
        let out = Mem::default();
        let rec = Rec::default();
        let gated = Gated { started: started_tx, release: release_rx, out: out.clone() };
        let p = Pipeline::start(cfg(4, 600_000), gated, rec.clone()).unwrap();
        let w = p.producer(0);
        // Fill to the wake threshold; the flusher takes those 2 and blocks in export.
        w.push(0).unwrap();
        w.push(1).unwrap();
        started_rx.recv_timeout(Duration::from_secs(5)).expect("export started");
        let mut dropped = 0;
        for i in 2..20 {
            if w.push(i).is_err() {
                dropped += 1;
            }
        }
        assert_eq!(dropped, 14, "capacity 4 while the exporter is blocked");
        for _ in 0..4 {
            let _ = release_tx.send(());
        }
        assert!(p.shutdown());
        let got = out.0.lock().unwrap().clone();
        assert_eq!(got, vec![0, 1, 2, 3, 4, 5], "oldest kept, newest dropped");
        let t = rec.0.lock().unwrap().clone();
        assert_eq!(t.dropped, 14);
        assert_eq!(t.queued, 6);
        assert_eq!(t.written + t.dropped, 20);
    }

    #[test]
    fn explicit_flush_replies() {
        let mem = Mem::default();
        let p = Pipeline::start(cfg(100, 600_000), mem.clone(), ()).unwrap();
        p.producer(1).push(1).unwrap();
        assert!(p.flush(Duration::from_secs(5)));
        assert_eq!(mem.0.lock().unwrap().len(), 1);
    }
}
