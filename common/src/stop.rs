//! A shutdown deadline shared between the thread that stops an exporter (Envoy's main thread,
//! in `config_destroy`) and the thread doing the exporting: once it is set, every retry,
//! back-off and request in flight ends by it, so the stopping thread can always join.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Cloneable handle to one deadline; unset until [`StopSignal::stop_by`].
#[derive(Clone, Debug)]
pub struct StopSignal(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    base: Instant,
    /// Nanoseconds after `base`, plus one; 0 = no deadline yet.
    at: AtomicU64,
}

impl Default for StopSignal {
    fn default() -> Self {
        StopSignal(Arc::new(Inner { base: Instant::now(), at: AtomicU64::new(0) }))
    }
}

impl StopSignal {
    /// Everything must be over by `deadline` (an earlier deadline already set stays).
    pub fn stop_by(&self, deadline: Instant) {
        let ns = deadline.saturating_duration_since(self.0.base).as_nanos().min(u64::MAX as u128 - 1) as u64 + 1;
        self.0.at.fetch_min(ns, Ordering::AcqRel);
        // fetch_min on 0 ("unset") keeps 0: replace it.
        let _ = self.0.at.compare_exchange(0, ns, Ordering::AcqRel, Ordering::Acquire);
    }

    /// The deadline, once set.
    pub fn deadline(&self) -> Option<Instant> {
        match self.0.at.load(Ordering::Acquire) {
            0 => None,
            ns => Some(self.0.base + Duration::from_nanos(ns - 1)),
        }
    }

    /// Sleeps `d` unless a deadline that falls before its end is set (before or during the
    /// sleep): then returns false at once — whatever was to follow the sleep would not be
    /// allowed to run anyway.
    pub fn sleep(&self, d: Duration) -> bool {
        let wake = Instant::now() + d;
        loop {
            let now = Instant::now();
            if self.deadline().is_some_and(|dl| dl <= wake) {
                return false;
            }
            if now >= wake {
                return true;
            }
            // Re-read the deadline at least every 50 ms.
            std::thread::sleep((wake - now).min(Duration::from_millis(50)));
        }
    }

    /// Resolves at the deadline (polls for it every 20 ms until it is set): race a request
    /// against this to cut it short.
    pub async fn reached(&self) {
        loop {
            match self.deadline() {
                Some(d) => return tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
                None => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
}

/// Joins `thread` if it ends by `deadline`; otherwise leaves it detached and returns false. For
/// Envoy's main thread stopping a background thread: nothing may hold it up past a deadline.
pub fn join_by(thread: std::thread::JoinHandle<()>, deadline: Instant) -> bool {
    while !thread.is_finished() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = thread.join();
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_earliest_deadline_wins() {
        let s = StopSignal::default();
        assert_eq!(s.deadline(), None);
        let now = Instant::now();
        s.stop_by(now + Duration::from_secs(10));
        s.stop_by(now + Duration::from_secs(20));
        let d = s.deadline().unwrap();
        assert!(d >= now + Duration::from_millis(9_999) && d <= now + Duration::from_secs(10));
        s.stop_by(now + Duration::from_secs(1));
        assert!(s.deadline().unwrap() <= now + Duration::from_secs(1));
        let c = s.clone();
        assert_eq!(c.deadline(), s.deadline());
    }

    #[test]
    fn join_by_waits_only_until_the_deadline() {
        let quick = std::thread::spawn(|| std::thread::sleep(Duration::from_millis(20)));
        assert!(join_by(quick, Instant::now() + Duration::from_secs(5)));
        let slow = std::thread::spawn(|| std::thread::sleep(Duration::from_secs(2)));
        let t = Instant::now();
        assert!(!join_by(slow, t + Duration::from_millis(100)));
        let took = t.elapsed();
        assert!(took >= Duration::from_millis(100) && took < Duration::from_secs(1), "{took:?}");
    }

    #[test]
    fn sleep_gives_up_when_a_deadline_falls_before_its_end() {
        let s = StopSignal::default();
        let t = Instant::now();
        assert!(s.sleep(Duration::from_millis(30)));
        assert!(t.elapsed() >= Duration::from_millis(30));
        let s2 = s.clone();
        let setter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            s2.stop_by(Instant::now() + Duration::from_secs(5));
        });
        let t = Instant::now();
        assert!(!s.sleep(Duration::from_secs(30)));
        let took = t.elapsed();
        assert!(took >= Duration::from_millis(100) && took < Duration::from_secs(1), "{took:?}");
        setter.join().unwrap();
    }
}
