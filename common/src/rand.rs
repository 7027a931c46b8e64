//! A fast per-thread random source for ids and sampling (not for secrets).
use std::cell::Cell;

thread_local! {
    static RNG: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most b.len() bytes into the valid buffer.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    let s = u64::from_ne_bytes(b);
    if n == 8 && s != 0 {
        s
    } else {
        // No getrandom: time and this thread's stack address still differ per thread.
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        now ^ ((&b as *const [u8; 8] as u64) << 16)
    }
}

/// A random u64 (wyrand, per thread): ids must be unique, not secret.
#[inline]
pub fn rand64() -> u64 {
    RNG.with(|s| {
        let x = s.get().wrapping_add(0xa076_1d64_78bd_642f);
        s.set(x);
        let t = u128::from(x) * u128::from(x ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) as u64) ^ (t as u64)
    })
}
