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

thread_local! {
    /// Bytes from the kernel's generator, taken 512 at a time, and how many are used.
    static POOL: std::cell::RefCell<([u8; 512], usize)> = const { std::cell::RefCell::new(([0; 512], 512)) };
}

/// Fills `out` with bytes from the kernel's generator (`getrandom`), batched per thread so a
/// record costs no system call, as Envoy's generator batches `RAND_bytes`. For ids that must
/// not collide across threads and processes (UUIDs); falls back to [`rand64`] if the kernel
/// has none to give.
pub fn fill_random(out: &mut [u8]) {
    POOL.with(|p| {
        let Ok(mut p) = p.try_borrow_mut() else { return fill_fast(out) };
        let (buf, used) = &mut *p;
        for o in out.iter_mut() {
            if *used == buf.len() {
                // SAFETY: getrandom writes at most buf.len() bytes into the valid buffer.
                let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n != buf.len() as isize {
                    fill_fast(buf);
                }
                *used = 0;
            }
            *o = buf[*used];
            *used += 1;
        }
    })
}

fn fill_fast(out: &mut [u8]) {
    for c in out.chunks_mut(8) {
        c.copy_from_slice(&rand64().to_ne_bytes()[..c.len()]);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn random_fill_spans_refills_and_differs() {
        let (mut a, mut b) = ([0u8; 300], [0u8; 300]);
        super::fill_random(&mut a);
        super::fill_random(&mut b); // crosses the 512-byte refill
        assert_ne!(a, b);
        assert!(a.iter().any(|&x| x != 0) && b.iter().any(|&x| x != 0));
    }
}
