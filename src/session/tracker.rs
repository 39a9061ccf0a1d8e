//! Page-request takeover state, kept free of I/O and clocks (time is passed in) so that
//! every decision can be tested in memory.
//!
//! It answers one question for each page the destination asks for: will the stream bring
//! it anyway (already delivered, or already requested and not yet arrived), or must the
//! request go on to the source? QEMU's source answers a request only for pages that are
//! still dirty and never sends a page twice (protocol-spec/postcopy-sequence.md#sequence-page-flow),
//! so the tracker mirrors the source's view: a page is *delivered* once a PAGE or ZERO
//! record for it has been forwarded after the last discard of its range.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::figures::{LatencyFigures, latency_of};

use crate::wire::RamLayout;

/// What to do with one page of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestDecision {
    /// Not delivered and not asked for yet: ask the source.
    Forward,
    /// Already asked for and not yet arrived: the earlier request will bring it.
    AlreadyRequested,
    /// Already forwarded to the destination (in flight to it): nothing to ask.
    AlreadyDelivered,
}

/// Who asked for a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The destination QEMU (a vCPU or a device touched a missing page).
    Destination,
    /// The sidecar's own guarded reader (protocol-spec/guarded-access.md#guard-faults).
    Guard,
    /// The sidecar asked ahead of the guest (protocol-spec/postcopy-sequence.md#sequence-prefetch).
    Prefetch,
}

/// Figures for one RAM block.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct BlockFigures {
    /// Block idstr.
    pub name: String,
    /// Used length in bytes.
    pub length: u64,
    /// Full pages forwarded.
    pub pages: u64,
    /// Zero pages forwarded.
    pub zero_pages: u64,
    /// Target pages the destination asked for.
    pub requested_pages: u64,
    /// Target pages whose request went on to the source.
    pub forwarded_pages: u64,
}

struct BlockState {
    figures: BlockFigures,
    delivered: Vec<u64>,
    /// page index → time and origin of the first unanswered request.
    pending: super::outbox::PageMap<u64, (Instant, Origin)>,
}

impl BlockState {
    fn bit(&self, page: u64) -> bool {
        self.delivered
            .get((page / 64) as usize)
            .is_some_and(|w| w & (1 << (page % 64)) != 0)
    }

    fn set(&mut self, page: u64, on: bool) {
        if let Some(w) = self.delivered.get_mut((page / 64) as usize) {
            if on {
                *w |= 1 << (page % 64);
            } else {
                *w &= !(1 << (page % 64));
            }
        }
    }
}

/// Request counts.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct RequestFigures {
    /// REQ_PAGES / REQ_PAGES_ID messages received from the destination.
    pub messages: u64,
    /// Target pages those messages asked for.
    pub pages: u64,
    /// Request messages sent on to the source.
    pub forwarded_messages: u64,
    /// Target pages asked of the source.
    pub forwarded_pages: u64,
    /// Pages not asked again because an earlier request was still outstanding.
    pub deduplicated_pages: u64,
    /// Pages not asked because they had already been forwarded to the destination.
    pub already_delivered_pages: u64,
    /// Requests still unanswered at the end.
    pub outstanding_pages: u64,
    /// Request messages refused: outside every block, or of a block the stream never
    /// announced. No QEMU sends one; none is passed on.
    pub refused_messages: u64,
    /// Pages forwarded without being remembered, because [`MAX_PENDING_PAGES`] requests
    /// were already waiting (no dedup or latency for them; exactly-once is unaffected).
    pub untracked_pages: u64,
    /// Pages the sidecar's guarded reader needed (not counted above).
    pub guard_pages: u64,
    /// Request messages sent to the source on the guarded reader's behalf (not counted in
    /// `forwarded_messages`).
    pub guard_forwarded_messages: u64,
    /// Pages asked of the source ahead of the guest, around its faults.
    pub prefetched_pages: u64,
    /// Request messages that only asked ahead (the guest read into the last window).
    pub prefetch_messages: u64,
    /// Destination requests for a page that was asked ahead and had not arrived yet.
    pub prefetch_in_flight_pages: u64,
}

/// Most unanswered requests remembered at once. A real destination has a few per vCPU
/// (and per blocked syscall); the cap bounds what a flood of requests can make the sidecar
/// hold.
pub const MAX_PENDING_PAGES: u64 = 1 << 16;

/// The takeover state of one migration.
pub struct PageTracker {
    tps: u64,
    blocks: Vec<BlockState>,
    requests: RequestFigures,
    latency: Histogram<u64>,
}

impl PageTracker {
    /// A tracker for this block table and target page size.
    pub fn new(layout: &RamLayout, tps: u64) -> Self {
        let blocks = layout
            .blocks()
            .iter()
            .map(|b| {
                let pages = b.used_length.div_ceil(tps);
                BlockState {
                    figures: BlockFigures {
                        name: String::from_utf8_lossy(&b.name).into_owned(),
                        length: b.used_length,
                        ..Default::default()
                    },
                    delivered: vec![0; pages.div_ceil(64) as usize],
                    pending: Default::default(),
                }
            })
            .collect();
        PageTracker {
            tps,
            blocks,
            requests: RequestFigures::default(),
            latency: Histogram::new_with_bounds(1, 3_600_000_000, 3)
                .expect("valid histogram bounds"),
        }
    }

    /// Target page size.
    pub fn target_page_size(&self) -> u64 {
        self.tps
    }

    /// Index of a block by name.
    pub fn block_index(&self, name: &[u8]) -> Option<usize> {
        self.blocks
            .iter()
            .position(|b| b.figures.name.as_bytes() == name)
    }

    /// A page (full or zero) was forwarded to the destination at `now`. Returns the
    /// service latency and who asked if a request was waiting for it; the destination's
    /// requests feed the fault-service histogram.
    pub fn delivered(
        &mut self,
        block: usize,
        offset: u64,
        zero: bool,
        now: Instant,
    ) -> Option<(Duration, Origin)> {
        let b = self.blocks.get_mut(block)?;
        let page = offset / self.tps;
        if zero {
            b.figures.zero_pages += 1;
        } else {
            b.figures.pages += 1;
        }
        b.set(page, true);
        let (asked, origin) = b.pending.remove(&page)?;
        let waited = now.saturating_duration_since(asked);
        if origin == Origin::Destination {
            let _ = self.latency.record((waited.as_micros() as u64).max(1));
        }
        Some((waited, origin))
    }

    /// The destination will drop these pages (POSTCOPY_RAM_DISCARD): they must be sent again.
    pub fn discarded(&mut self, block: usize, start: u64, len: u64) {
        let tps = self.tps;
        if let Some(b) = self.blocks.get_mut(block) {
            let first = start / tps;
            let last = (start + len).div_ceil(tps);
            for p in first..last {
                b.set(p, false);
            }
        }
    }

    /// The destination asked for `len` bytes at `start` of `block` at `now`. Returns the
    /// pages (as `(offset, decision)`) so the caller can forward the ones that need it.
    pub fn requested(
        &mut self,
        block: usize,
        start: u64,
        len: u64,
        now: Instant,
    ) -> Vec<(u64, RequestDecision)> {
        let tps = self.tps;
        self.requests.messages += 1;
        let mut pending = self.outstanding_pages();
        let Some(b) = self.blocks.get_mut(block) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let first = start / tps;
        let last = start.saturating_add(len.max(1)).div_ceil(tps);
        for p in first..last {
            self.requests.pages += 1;
            b.figures.requested_pages += 1;
            let d = if b.bit(p) {
                self.requests.already_delivered_pages += 1;
                RequestDecision::AlreadyDelivered
            } else {
                match b.pending.entry(p) {
                    std::collections::hash_map::Entry::Occupied(mut o) => {
                        // The guard or a prefetch asked first: the vCPU's wait starts now.
                        match o.get().1 {
                            Origin::Guard => *o.get_mut() = (now, Origin::Destination),
                            Origin::Prefetch => {
                                self.requests.prefetch_in_flight_pages += 1;
                                *o.get_mut() = (now, Origin::Destination);
                            }
                            Origin::Destination => {}
                        }
                        self.requests.deduplicated_pages += 1;
                        RequestDecision::AlreadyRequested
                    }
                    std::collections::hash_map::Entry::Vacant(_)
                        if pending >= MAX_PENDING_PAGES =>
                    {
                        self.requests.untracked_pages += 1;
                        self.requests.forwarded_pages += 1;
                        RequestDecision::Forward
                    }
                    std::collections::hash_map::Entry::Vacant(v) => {
                        pending += 1;
                        v.insert((now, Origin::Destination));
                        b.figures.forwarded_pages += 1;
                        self.requests.forwarded_pages += 1;
                        RequestDecision::Forward
                    }
                }
            };
            out.push((p * tps, d));
        }
        out
    }

    /// Checks a request against its block's bounds, with checked arithmetic: a request
    /// outside every block comes from no QEMU and is not passed on.
    pub fn check_request(&mut self, block: usize, start: u64, len: u64) -> Result<(), String> {
        let Some(b) = self.blocks.get(block) else {
            self.requests.refused_messages += 1;
            return Err(format!("block index {block} does not exist"));
        };
        let length = b.figures.length;
        match start.checked_add(len.max(1)) {
            Some(end) if end <= length => Ok(()),
            _ => {
                self.requests.refused_messages += 1;
                Err(format!(
                    "{len:#x} bytes at {start:#x} are outside block {:?} ({length:#x} bytes)",
                    b.figures.name
                ))
            }
        }
    }

    /// Counts a refused request of a block the tracker does not know.
    pub fn refused_unknown_block(&mut self) {
        self.requests.refused_messages += 1;
    }

    /// Counts one request message sent on to the source.
    pub fn forwarded_message(&mut self) {
        self.requests.forwarded_messages += 1;
    }

    /// The sidecar's guarded reader needs `len` bytes at `start` of `block` (one target
    /// page, or a whole huge page of a hugepage block): whether they must be asked of the
    /// source, that is whether any of their target pages is neither delivered nor already
    /// asked for. Those are remembered as asked; one message is counted. Counted apart
    /// from the destination's requests.
    pub fn guard_requested(
        &mut self,
        block: usize,
        start: u64,
        len: u64,
        now: Instant,
    ) -> RequestDecision {
        let tps = self.tps;
        let Some(b) = self.blocks.get_mut(block) else {
            return RequestDecision::AlreadyDelivered;
        };
        let (first, last) = (start / tps, start.saturating_add(len.max(1)).div_ceil(tps));
        let mut decision = RequestDecision::AlreadyDelivered;
        for page in first..last {
            self.requests.guard_pages += 1;
            if b.bit(page) {
                continue;
            }
            match b.pending.entry(page) {
                std::collections::hash_map::Entry::Occupied(_) => {
                    if decision == RequestDecision::AlreadyDelivered {
                        decision = RequestDecision::AlreadyRequested;
                    }
                }
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert((now, Origin::Guard));
                    decision = RequestDecision::Forward;
                }
            }
        }
        if decision == RequestDecision::Forward {
            self.requests.guard_forwarded_messages += 1;
        }
        decision
    }

    /// Claims up to `max_units` units of `unit_pages` target pages each, from target page
    /// `first` of `block` on, to be asked of the source ahead of the guest. Stops at the
    /// first unit with a page already delivered or asked for, at the block's end, or when
    /// the pending cap is reached, so no page is ever asked twice. Returns the units
    /// claimed.
    pub fn claim_ahead(
        &mut self,
        block: usize,
        first: u64,
        unit_pages: u64,
        max_units: u64,
        now: Instant,
    ) -> u64 {
        let unit_pages = unit_pages.max(1);
        let room = MAX_PENDING_PAGES.saturating_sub(self.outstanding_pages()) / unit_pages;
        let Some(b) = self.blocks.get_mut(block) else {
            return 0;
        };
        let pages = b.figures.length.div_ceil(self.tps);
        let mut units = 0;
        while units < max_units.min(room) {
            let start = first + units * unit_pages;
            let end = start + unit_pages;
            if end > pages || (start..end).any(|p| b.bit(p) || b.pending.contains_key(&p)) {
                break;
            }
            for p in start..end {
                b.pending.insert(p, (now, Origin::Prefetch));
            }
            units += 1;
        }
        self.requests.prefetched_pages += units * unit_pages;
        units
    }

    /// Counts a request message that only asked ahead.
    pub fn prefetch_message(&mut self) {
        self.requests.prefetch_messages += 1;
    }

    /// Every page asked for and not delivered yet, oldest request first: what must be asked
    /// again of a source that resumes after a cut.
    pub fn pending_pages(&self) -> Vec<(usize, u64)> {
        let mut all: Vec<(Instant, usize, u64)> = self
            .blocks
            .iter()
            .enumerate()
            .flat_map(|(b, st)| {
                st.pending
                    .iter()
                    .map(move |(page, (at, _))| (*at, b, *page))
            })
            .collect();
        all.sort_unstable();
        all.into_iter()
            .map(|(_, b, page)| (b, page * self.tps))
            .collect()
    }

    /// Forgets every outstanding request (a destination that paused re-sends its own after
    /// the recovery); the pages stay requestable.
    pub fn clear_pending(&mut self) {
        for b in &mut self.blocks {
            b.pending.clear();
        }
    }

    /// The block's delivered pages in the form of QEMU's received bitmap
    /// (protocol-spec/return-path.md#rp-recv-bitmap): one bit per target page of the
    /// block's length, bit i in byte i/8 from the least significant bit, the byte count
    /// rounded up to a multiple of 8. A page counts as received once it was forwarded to a
    /// destination whose connection stays open, so this is exact for a held destination.
    pub fn received_bitmap(&self, block: usize) -> Option<Vec<u8>> {
        let b = self.blocks.get(block)?;
        let nbits = b.figures.length / self.tps;
        let size = nbits.div_ceil(8).next_multiple_of(8) as usize;
        let mut out: Vec<u8> = b.delivered.iter().flat_map(|w| w.to_le_bytes()).collect();
        out.resize(size, 0);
        // Bits past the block's last page are never set.
        if !nbits.is_multiple_of(8)
            && let Some(last) = out.get_mut((nbits / 8) as usize)
        {
            *last &= (1u8 << (nbits % 8)) - 1;
        }
        for byte in out.iter_mut().skip(nbits.div_ceil(8) as usize) {
            *byte = 0;
        }
        Some(out)
    }

    /// Replaces the block's delivered pages with a destination's received bitmap (the
    /// destination is the authority after it paused and dropped what was in flight).
    /// Returns the pages marked received.
    pub fn load_received_bitmap(&mut self, block: usize, bitmap: &[u8]) -> u64 {
        let Some(b) = self.blocks.get_mut(block) else {
            return 0;
        };
        let pages = (b.delivered.len() * 64) as u64;
        let mut received = 0;
        for word in &mut b.delivered {
            *word = 0;
        }
        for (i, byte) in bitmap.iter().enumerate() {
            for bit in 0..8 {
                let page = (i * 8 + bit) as u64;
                if page < pages && byte & (1 << bit) != 0 {
                    b.set(page, true);
                    received += 1;
                }
            }
        }
        received
    }

    /// Pages asked of the source and not delivered yet.
    pub fn outstanding_pages(&self) -> u64 {
        self.blocks.iter().map(|b| b.pending.len() as u64).sum()
    }

    /// Request counts so far.
    pub fn request_figures(&self) -> RequestFigures {
        let mut r = self.requests.clone();
        r.outstanding_pages = self.outstanding_pages();
        r
    }

    /// Latency percentiles so far.
    pub fn latency_figures(&self) -> LatencyFigures {
        latency_of(&self.latency)
    }

    /// Bytes of block `block`, as the stream announced it.
    pub fn block_length(&self, block: usize) -> Option<u64> {
        self.blocks.get(block).map(|b| b.figures.length)
    }

    /// Per-block figures.
    pub fn block_figures(&self) -> Vec<BlockFigures> {
        self.blocks.iter().map(|b| b.figures.clone()).collect()
    }

    /// The raw latency histogram (µs), for exporters.
    pub fn latency_histogram(&self) -> &Histogram<u64> {
        &self.latency
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> RamLayout {
        let mut l = RamLayout::default();
        l.announce(b"m", 64 * 4096);
        l.announce(b"pc.bios", 4 * 4096);
        l
    }

    #[test]
    fn requests_outside_their_block_are_refused_with_checked_arithmetic() {
        let mut t = PageTracker::new(&layout(), 4096);
        assert!(t.check_request(0, 63 * 4096, 4096).is_ok());
        assert!(t.check_request(0, 64 * 4096, 4096).is_err());
        assert!(t.check_request(0, 63 * 4096, 8192).is_err());
        assert!(t.check_request(0, u64::MAX - 10, 4096).is_err());
        assert!(t.check_request(7, 0, 4096).is_err());
        assert_eq!(t.request_figures().refused_messages, 4);
    }

    #[test]
    fn a_flood_of_requests_is_remembered_only_up_to_the_cap() {
        let mut l = RamLayout::default();
        l.announce(b"big", 2 * MAX_PENDING_PAGES * 4096);
        let mut t = PageTracker::new(&l, 4096);
        let t0 = Instant::now();
        for p in 0..MAX_PENDING_PAGES + 10 {
            assert_eq!(
                t.requested(0, p * 4096, 4096, t0),
                vec![(p * 4096, RequestDecision::Forward)]
            );
        }
        let r = t.request_figures();
        assert_eq!(r.outstanding_pages, MAX_PENDING_PAGES);
        assert_eq!(r.untracked_pages, 10);
        // Delivery of an untracked page is still recorded, so it is never sent twice.
        t.delivered(0, (MAX_PENDING_PAGES + 5) * 4096, false, t0);
        assert_eq!(
            t.requested(0, (MAX_PENDING_PAGES + 5) * 4096, 4096, t0),
            vec![(
                (MAX_PENDING_PAGES + 5) * 4096,
                RequestDecision::AlreadyDelivered
            )]
        );
    }

    #[test]
    fn first_request_goes_to_the_source_and_duplicates_do_not() {
        let mut t = PageTracker::new(&layout(), 4096);
        let t0 = Instant::now();
        assert_eq!(
            t.requested(0, 0x3000, 4096, t0),
            vec![(0x3000, RequestDecision::Forward)]
        );
        assert_eq!(
            t.requested(0, 0x3000, 4096, t0),
            vec![(0x3000, RequestDecision::AlreadyRequested)]
        );
        let waited = t.delivered(0, 0x3000, false, t0 + Duration::from_micros(250));
        assert_eq!(
            waited,
            Some((Duration::from_micros(250), Origin::Destination))
        );
        assert_eq!(
            t.requested(0, 0x3000, 4096, t0),
            vec![(0x3000, RequestDecision::AlreadyDelivered)]
        );
        let r = t.request_figures();
        assert_eq!(
            (
                r.messages,
                r.pages,
                r.forwarded_pages,
                r.deduplicated_pages,
                r.already_delivered_pages
            ),
            (3, 3, 1, 1, 1)
        );
        assert_eq!(t.latency_figures().count, 1);
    }

    #[test]
    fn guard_requests_are_deduplicated_with_the_destinations_and_counted_apart() {
        let mut t = PageTracker::new(&layout(), 4096);
        let t0 = Instant::now();
        assert_eq!(
            t.guard_requested(0, 0x5000, 4096, t0),
            RequestDecision::Forward
        );
        assert_eq!(
            t.guard_requested(0, 0x5000, 4096, t0),
            RequestDecision::AlreadyRequested
        );
        // The destination then faults on it: no second message, and its wait is timed.
        assert_eq!(
            t.requested(0, 0x5000, 4096, t0 + Duration::from_micros(10)),
            vec![(0x5000, RequestDecision::AlreadyRequested)]
        );
        let (_, origin) = t
            .delivered(0, 0x5000, false, t0 + Duration::from_micros(30))
            .unwrap();
        assert_eq!(origin, Origin::Destination);
        assert_eq!(
            t.guard_requested(0, 0x5000, 4096, t0),
            RequestDecision::AlreadyDelivered
        );
        let r = t.request_figures();
        assert_eq!((r.guard_pages, r.guard_forwarded_messages), (3, 1));
        assert_eq!((r.messages, r.forwarded_messages), (1, 0));
        assert_eq!(t.latency_figures().count, 1);
    }

    #[test]
    fn a_guard_request_of_a_huge_page_asks_once_for_what_is_missing() {
        let mut t = PageTracker::new(&layout(), 4096);
        let t0 = Instant::now();
        t.delivered(0, 0x2000, false, t0);
        assert_eq!(
            t.guard_requested(0, 0, 0x4000, t0),
            RequestDecision::Forward,
            "three of four pages missing"
        );
        assert_eq!(
            t.guard_requested(0, 0, 0x4000, t0),
            RequestDecision::AlreadyRequested
        );
        let r = t.request_figures();
        assert_eq!((r.guard_pages, r.guard_forwarded_messages), (8, 1));
        assert_eq!(r.outstanding_pages, 3);
    }

    #[test]
    fn discard_makes_a_delivered_page_requestable_again() {
        let mut t = PageTracker::new(&layout(), 4096);
        let now = Instant::now();
        t.delivered(1, 0x1000, true, now);
        t.discarded(1, 0, 4 * 4096);
        assert_eq!(
            t.requested(1, 0x1000, 4096, now),
            vec![(0x1000, RequestDecision::Forward)]
        );
        assert_eq!(t.block_figures()[1].zero_pages, 1);
    }

    #[test]
    fn a_host_page_request_covers_every_target_page() {
        let mut t = PageTracker::new(&layout(), 4096);
        let d = t.requested(0, 0x8000, 0x4000, Instant::now());
        assert_eq!(d.len(), 4);
        assert!(d.iter().all(|(_, d)| *d == RequestDecision::Forward));
        assert_eq!(t.request_figures().outstanding_pages, 4);
    }
}
