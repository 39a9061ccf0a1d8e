//! Worker threads standing in for vCPUs: each touches pages of the synthetic RAM in a
//! pattern and blocks on every missing page, as a guest does during postcopy.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::SynthRam;

/// Which pages the workers touch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// Each worker sweeps its own contiguous share of the RAM in order.
    Sequential,
    /// Each worker touches pages picked at random over the whole RAM.
    Random {
        /// Seed of the page choice.
        seed: u64,
    },
    /// Each worker touches pages picked at random from the first `hot_pages` pages.
    Hot {
        /// Size of the hot set.
        hot_pages: usize,
        /// Seed of the page choice.
        seed: u64,
    },
}

/// What the workers did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TouchReport {
    /// Page touches made (each may or may not have faulted).
    pub touches: u64,
    /// From the first worker's start to the last worker's end.
    pub elapsed: Duration,
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Runs `threads` workers; each makes `touches` touches (for `Sequential`, its share of
/// the pages, so `touches` is ignored).
pub fn run(ram: Arc<SynthRam>, threads: usize, pattern: Pattern, touches: usize) -> TouchReport {
    let pages = ram.pages();
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let ram = ram.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                match pattern {
                    Pattern::Sequential => {
                        let share = pages.div_ceil(threads);
                        for p in t * share..((t + 1) * share).min(pages) {
                            std::hint::black_box(ram.touch(p));
                            n += 1;
                        }
                    }
                    Pattern::Random { seed } | Pattern::Hot { seed, .. } => {
                        let span = match pattern {
                            Pattern::Hot { hot_pages, .. } => hot_pages.clamp(1, pages),
                            _ => pages,
                        };
                        let mut x = seed ^ (t as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                        for _ in 0..touches {
                            let p = (xorshift(&mut x) % span as u64) as usize;
                            std::hint::black_box(ram.touch(p));
                            n += 1;
                        }
                    }
                }
                n
            })
        })
        .collect();
    let touches = handles
        .into_iter()
        .map(|h| h.join().expect("worker thread"))
        .sum();
    TouchReport {
        touches,
        elapsed: started.elapsed(),
    }
}
