//! Cheap self-timing for the worker hot path (opt-in `self_timing` configs).
//!
//! `clock_gettime` costs over 100 ns per call on some VMs, which would distort what it
//! measures; the TSC is read in a few ns. [`CycleClock`] calibrates TSC ticks to nanoseconds
//! once at config load. [`Histogram`] is a lock-free log-linear histogram (8 sub-buckets per
//! power of two, ~6% resolution) so medians can be reported without storing samples.
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// Converts TSC ticks (or, off x86-64, nanoseconds) to nanoseconds.
#[derive(Clone, Copy, Debug)]
pub struct CycleClock {
    ns_per_tick: f64,
}

impl CycleClock {
    /// Calibrates against the monotonic clock for `window` (blocking; call at config load).
    pub fn calibrate(window: Duration) -> Self {
        let (t0, c0) = (Instant::now(), Self::now());
        while t0.elapsed() < window {
            std::hint::spin_loop();
        }
        let (ns, ticks) = (t0.elapsed().as_nanos() as f64, Self::now().wrapping_sub(c0) as f64);
        CycleClock { ns_per_tick: if ticks > 0.0 { ns / ticks } else { 1.0 } }
    }

    /// Current tick count.
    #[inline(always)]
    pub fn now() -> u64 {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: RDTSC has no memory effects and exists on every x86-64 CPU.
            unsafe { core::arch::x86_64::_rdtsc() }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            use std::sync::OnceLock;
            static START: OnceLock<Instant> = OnceLock::new();
            START.get_or_init(Instant::now).elapsed().as_nanos() as u64
        }
    }

    /// Nanoseconds between two tick readings.
    #[inline(always)]
    pub fn ns_between(&self, start: u64, end: u64) -> u64 {
        (end.wrapping_sub(start) as f64 * self.ns_per_tick) as u64
    }
}

/// Number of buckets: values up to 2^(BUCKETS/8) ns (about 4 s).
pub const BUCKETS: usize = 256;
const SUB: u32 = 8;

/// Lock-free histogram of nanosecond values.
pub struct Histogram {
    buckets: Box<[AtomicU64]>,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram { buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect() }
    }
}

/// Bucket index of `v`: exact below 8, then 8 sub-buckets per power of two.
#[inline]
pub fn bucket_of(v: u64) -> usize {
    if v < SUB as u64 {
        return v as usize;
    }
    let log = 63 - v.leading_zeros(); // >= 3
    let sub = ((v >> (log - 3)) & (SUB as u64 - 1)) as u32;
    (((log - 2) * SUB + sub) as usize).min(BUCKETS - 1)
}

/// Smallest value that falls in bucket `b`.
pub fn bucket_floor(b: usize) -> u64 {
    if b < SUB as usize {
        return b as u64;
    }
    let log = (b as u32 / SUB) + 2;
    let sub = b as u64 % SUB as u64;
    (1u64 << log) | (sub << (log - 3))
}

impl Histogram {
    /// Adds one value.
    #[inline]
    pub fn record(&self, v: u64) {
        self.buckets[bucket_of(v)].fetch_add(1, Relaxed);
    }

    /// Adds this histogram's counts into `into`.
    pub fn accumulate(&self, into: &mut [u64]) {
        for (i, b) in self.buckets.iter().enumerate() {
            into[i] += b.load(Relaxed);
        }
    }
}

/// The value below which a fraction `q` of the counted values fall (bucket floor), or 0.
pub fn quantile(counts: &[u64], q: f64) -> u64 {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return 0;
    }
    let rank = ((total as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, c) in counts.iter().enumerate() {
        seen += c;
        if seen >= rank {
            return bucket_floor(i);
        }
    }
    bucket_floor(counts.len() - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_tight() {
        let mut last = 0;
        for v in [0u64, 1, 7, 8, 9, 15, 16, 100, 1000, 1234, 65_535, 1 << 30] {
            let b = bucket_of(v);
            assert!(b >= last);
            last = b;
            let lo = bucket_floor(b);
            assert!(lo <= v && v - lo <= v / 8 + 1, "{v} -> [{lo}..]");
        }
    }

    #[test]
    fn quantiles() {
        let h = Histogram::default();
        for v in 1..=1000u64 {
            h.record(v);
        }
        let mut c = vec![0; BUCKETS];
        h.accumulate(&mut c);
        let p50 = quantile(&c, 0.5);
        assert!((440..=500).contains(&p50), "{p50}");
        assert!(quantile(&c, 0.99) >= 880);
    }

    #[test]
    fn clock_calibrates_to_something_sane() {
        let c = CycleClock::calibrate(Duration::from_millis(20));
        let t0 = CycleClock::now();
        std::thread::sleep(Duration::from_millis(10));
        let ns = c.ns_between(t0, CycleClock::now());
        assert!((9_000_000..200_000_000).contains(&ns), "{ns}");
    }
}
