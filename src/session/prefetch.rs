//! Prefetch around a fault on a migration (protocol-spec/postcopy-sequence.md#sequence-prefetch).
//!
//! A request the sidecar passes to the source may ask for more than the faulting host
//! page: `REQ_PAGES_ID` carries a length, and the source sends every still-dirty page of
//! the range, the faulting one first. A guest that walks memory in order then faults once
//! per window instead of once per page. A guest that jumps around gains nothing from it,
//! and every extra page queues ahead of its next fault, so the window adapts like a
//! kernel's read-ahead: it opens (doubling, up to [`MAX_WINDOW`]) while faults follow the
//! range asked last, and closes at the first fault elsewhere. Whether a page may be asked
//! at all (never twice, never one already delivered) is the tracker's call; this only
//! says how far to look.

use std::collections::HashMap;

/// The widest window, in units of the destination's request (its host page). The session
/// caps what it asks of the source much lower (`PREFETCH_BYTES`): what the source queues
/// stands ahead of the guest's next unrelated fault. Pages already in the sidecar's queue
/// cost nothing to send with a fault, so that window may open this far.
pub const MAX_WINDOW: u64 = 256;

/// Where a block's last asked range ended, and the window now.
#[derive(Debug, Clone, Copy, Default)]
struct Stream {
    /// The unit right after the last range asked.
    next: u64,
    /// Units asked after the faulting one.
    window: u64,
}

/// Read-ahead state per block, in units of the destination's request length.
#[derive(Debug, Default)]
pub struct Prefetcher {
    streams: HashMap<usize, Stream>,
}

impl Prefetcher {
    /// No stream seen yet.
    pub fn new() -> Prefetcher {
        Prefetcher::default()
    }

    /// The source is about to be asked for unit `unit` of `block` (a fault the stream will
    /// not bring by itself): how many units after it to ask for as well.
    pub fn on_miss(&mut self, block: usize, unit: u64) -> u64 {
        let s = self.streams.entry(block).or_default();
        // Right after (or just beyond) the range asked last: the guest walks in order.
        let in_order = s.next > 0 && unit >= s.next && unit <= s.next + s.window;
        s.window = if in_order {
            (s.window * 2).clamp(1, MAX_WINDOW)
        } else {
            0
        };
        s.next = unit + 1 + s.window;
        s.window
    }

    /// The guest faulted on unit `unit` of `block`, which was already asked for or
    /// delivered: if it reads into the last window, the next window is asked now, before
    /// the guest gets there. Returns (first unit, units).
    pub fn on_hit(&mut self, block: usize, unit: u64) -> Option<(u64, u64)> {
        let s = self.streams.get_mut(&block)?;
        if s.window == 0 || unit >= s.next || unit + s.window < s.next {
            return None;
        }
        s.window = (s.window * 2).min(MAX_WINDOW);
        let start = s.next;
        s.next += s.window;
        Some((start, s.window))
    }

    /// Asking for the window's units stopped after `asked` of them (a page already there
    /// or asked for): the next in-order fault is expected right after those.
    pub fn asked(&mut self, block: usize, first: u64, asked: u64) {
        if let Some(s) = self.streams.get_mut(&block) {
            s.next = first + asked;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_walk_in_order_opens_the_window_and_a_jump_closes_it() {
        let mut p = Prefetcher::new();
        assert_eq!(p.on_miss(0, 100), 0, "one fault says nothing");
        assert_eq!(p.on_miss(0, 101), 1);
        // 101 and 102 were asked; the next in-order miss is at 103.
        assert_eq!(p.on_miss(0, 103), 2);
        assert_eq!(p.on_miss(0, 106), 4);
        let mut w = 4;
        let mut next = 111;
        for _ in 0..10 {
            w = p.on_miss(0, next);
            next += 1 + w;
        }
        assert_eq!(w, MAX_WINDOW);
        assert_eq!(p.on_miss(0, 5), 0, "a jump closes it");
        // Other blocks have their own stream.
        assert_eq!(p.on_miss(1, 6), 0);
        assert_eq!(p.on_miss(0, 6), 1);
    }

    #[test]
    fn a_fault_inside_the_last_window_asks_the_next_one_ahead() {
        let mut p = Prefetcher::new();
        p.on_miss(0, 10);
        assert_eq!(p.on_miss(0, 11), 1); // asked 11, 12; next 13
        assert_eq!(p.on_hit(0, 12), Some((13, 2)));
        assert_eq!(p.on_hit(0, 14), Some((15, 4)));
        assert_eq!(p.on_hit(0, 3), None, "before the window");
        assert_eq!(p.on_hit(0, 40), None, "beyond what was asked");
        assert_eq!(p.on_hit(7, 1), None, "no stream");
        // Only 1 of the 4 could be asked: the next miss in order is right after it.
        p.asked(0, 15, 1);
        assert_eq!(p.on_miss(0, 16), 8);
    }

    #[test]
    fn random_faults_never_open_the_window() {
        let mut p = Prefetcher::new();
        let mut x = 12345u64;
        for _ in 0..1000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let unit = 1000 + x % 100_000;
            let w = p.on_miss(0, unit);
            assert!(w <= 1, "a random fault may look in order by chance, once");
        }
    }
}
