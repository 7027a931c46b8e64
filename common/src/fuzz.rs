//! A tiny deterministic input mutator for the bounded fuzz runs the crates' unit tests do on
//! stable Rust (no cargo-fuzz): seeds are mutated by inserting, deleting, replacing and
//! duplicating bytes drawn from an alphabet that favours the grammar's special characters.

/// Deterministic xorshift-driven mutator.
pub struct Mutator {
    state: u64,
    alphabet: &'static [u8],
}

impl Mutator {
    /// A mutator with a fixed `seed` (a failure reproduces) over `alphabet`.
    pub fn new(seed: u64, alphabet: &'static [u8]) -> Self {
        Mutator { state: seed | 1, alphabet }
    }

    fn next(&mut self) -> u64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state
    }

    /// A number below `n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// 1–4 random edits of `s`.
    pub fn mutate(&mut self, s: &mut Vec<u8>) {
        for _ in 0..1 + self.below(4) {
            let at = self.below(s.len() + 1);
            let c = self.alphabet[self.below(self.alphabet.len())];
            match self.below(4) {
                0 => s.insert(at, c),
                1 if !s.is_empty() => {
                    s.remove(at.min(s.len() - 1));
                }
                2 if !s.is_empty() => {
                    let i = at.min(s.len() - 1);
                    s[i] = c;
                }
                _ => {
                    let end = (at + self.below(12)).min(s.len());
                    let chunk = s[at..end].to_vec();
                    s.splice(at..at, chunk);
                }
            }
        }
    }

    /// Iterations of a fuzz loop: `FUZZ_ITERS`, else `default`.
    pub fn iterations(default: usize) -> usize {
        std::env::var("FUZZ_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
    }
}
