//! The session driven in memory: a simulated QEMU source ⇄ the session ⇄ a simulated QEMU
//! destination, with cuts at arbitrary bytes.

use std::time::{Duration, Instant};

use bytes::BytesMut;

use super::sim::{PAGE, SimDestination, SimSource};
use super::*;
use crate::wire::RpDecoder;

const BLOCKS: &[(&[u8], u64)] = &[(b"m", 320 * PAGE), (b"pc.bios", 8 * PAGE)];

/// Source, sidecar and destination wired in memory.
struct Wire {
    s: Session,
    src: SimSource,
    dst: SimDestination,
    now: Instant,
    /// Bytes of the current source main connection the sidecar has not consumed.
    buf: Vec<u8>,
    /// Every byte that reached the destination's main connection.
    to_dst: Vec<u8>,
    /// Pieces the session returned, for inspection.
    pieces: Vec<Piece>,
    /// Queued mode (the daemon's): bytes go through the session's queue, and the
    /// destination takes at most this many bytes per chunk the sidecar reads.
    queued: Option<usize>,
    /// The read buffer in queued mode.
    qbuf: BytesMut,
}

impl Wire {
    fn new(policy: CutPolicy) -> Wire {
        let now = Instant::now();
        let mut s = Session::new(
            SessionConfig {
                on_cut: policy,
                ..Default::default()
            },
            now,
        );
        s.source_main_connected(now).unwrap();
        Wire {
            s,
            src: SimSource::new(BLOCKS),
            dst: SimDestination::new(BLOCKS),
            now,
            buf: Vec::new(),
            to_dst: Vec::new(),
            pieces: Vec::new(),
            queued: None,
            qbuf: BytesMut::new(),
        }
    }

    /// A wire in queued mode whose destination reads `drain` bytes per chunk read.
    fn queued(policy: CutPolicy, drain: usize) -> Wire {
        Wire {
            queued: Some(drain),
            ..Wire::new(policy)
        }
    }

    /// A queued wire with data pages first on or off.
    fn queued_data_first(policy: CutPolicy, drain: usize, data_first: bool) -> Wire {
        let now = Instant::now();
        let mut s = Session::new(
            SessionConfig {
                on_cut: policy,
                data_first,
                ..Default::default()
            },
            now,
        );
        s.source_main_connected(now).unwrap();
        Wire {
            s,
            ..Wire::queued(policy, drain)
        }
    }

    /// A queued wire whose sidecar opened the destination's preempt channel itself.
    fn own_preempt(policy: CutPolicy, drain: usize) -> Wire {
        let now = Instant::now();
        let mut s = Session::new(
            SessionConfig {
                on_cut: policy,
                own_preempt: true,
                ..Default::default()
            },
            now,
        );
        s.source_main_connected(now).unwrap();
        Wire {
            s,
            ..Wire::queued(policy, drain)
        }
    }

    /// The destination reads up to `max` bytes of what the session queued for it, and
    /// whatever waits for its preempt channel.
    fn drain(&mut self, max: usize) {
        for b in self.s.take_preempt_out(usize::MAX) {
            self.dst.feed_preempt(&b).unwrap();
        }
        for b in self.s.take_main_out(max) {
            self.to_dst.extend_from_slice(&b);
            self.dst.feed(&b).unwrap();
        }
    }

    fn tick(&mut self) {
        self.now += Duration::from_micros(100);
    }

    /// The sidecar reads `bytes` from the source's main connection, in chunks of `chunk`.
    fn carry(&mut self, bytes: &[u8], chunk: usize) {
        if let Some(drain) = self.queued {
            for c in bytes.chunks(chunk.max(1)) {
                self.tick();
                self.qbuf.extend_from_slice(c);
                let step = self
                    .s
                    .queue_source_main(self.s.epoch(), &mut self.qbuf, self.now);
                assert!(step.error.is_none(), "{:?}", step.error);
                self.pieces.extend(step.pieces);
                self.drain(drain);
                self.pass_to_source();
            }
            return;
        }
        for c in bytes.chunks(chunk.max(1)) {
            self.tick();
            self.buf.extend_from_slice(c);
            let step = self.s.on_source_main(self.s.epoch(), &self.buf, self.now);
            assert!(step.error.is_none(), "{:?}", step.error);
            let mut at = 0;
            for p in &step.pieces {
                match p {
                    Piece::Forward(n) => {
                        let out = &self.buf[at..at + n];
                        self.to_dst.extend_from_slice(out);
                        self.dst.feed(out).unwrap();
                        at += n;
                    }
                    Piece::Skip(n) => at += n,
                    Piece::Inject(v) => {
                        self.to_dst.extend_from_slice(v);
                        self.dst.feed(v).unwrap();
                    }
                }
            }
            assert_eq!(at, step.consumed);
            self.pieces.extend(step.pieces);
            self.buf.drain(..step.consumed);
            self.pass_to_source();
        }
    }

    fn pass_to_source(&mut self) {
        let (_, bytes) = self.s.take_to_source();
        if !bytes.is_empty() {
            self.src.on_return_path(&bytes);
        }
    }

    /// The destination faults on `n` missing pages.
    fn faults(&mut self, n: usize) {
        let missing = self.dst.missing();
        for (block, offset) in missing.iter().step_by(7).take(n) {
            let req = self.dst.request(block, *offset);
            self.tick();
            let step = self.s.on_destination_rp(&req, self.now);
            assert!(step.error.is_none());
        }
        self.pass_to_source();
    }

    /// The source link breaks: what the sidecar had not consumed is lost.
    fn cut(&mut self) -> CutDecision {
        self.buf.clear();
        self.qbuf.clear();
        self.tick();
        self.s
            .source_lost(Channel::Main, CutCause::Failed("reset".into()), self.now)
    }

    /// The source resumes to the sidecar's address and completes the handshake.
    fn resume(&mut self, chunk: usize) {
        self.tick();
        self.s.source_main_connected(self.now).unwrap();
        let start = self.src.resume_start();
        self.carry(&start, chunk);
        assert!(self.src.bitmaps_done(), "every RECV_BITMAP answered");
        let fin = self.src.resume_finish();
        self.carry(&fin, chunk);
        assert_eq!(self.src.resume_acks.last(), Some(&1));
    }

    /// Runs the postcopy phase to the end: PART sections of `per_part` pages, faults in
    /// between, then END and EOF.
    fn run_to_end(&mut self, per_part: usize, chunk: usize) {
        while self.src.has_dirty() {
            let part = self.src.part(per_part);
            self.carry(&part, chunk);
            self.faults(2);
        }
        let fin = self.src.finish();
        self.carry(&fin, chunk);
    }

    /// After the start, a long PART is read whole while the destination reads none of
    /// it; returns a page of it, queued last, that the destination lacks.
    fn queue_a_long_part(&mut self) -> (Vec<u8>, u64) {
        let start = self.src.start(4);
        self.carry(&start, 4096);
        self.drain(usize::MAX);
        let part = self.src.part(60);
        self.carry(&part, 8192);
        let queued = self.s.main_queued_bytes();
        assert!(queued > 40 * PAGE as usize, "{queued} bytes queued");
        let t = self.s.tracker().unwrap();
        self.dst
            .missing()
            .into_iter()
            .rev()
            .find(|(b, o)| {
                let i = t.block_index(b).unwrap();
                t.received_bitmap(i)
                    .is_some_and(|bm| bm[(*o / PAGE / 8) as usize] & (1 << (*o / PAGE % 8)) != 0)
            })
            .expect("a queued page the destination lacks")
    }

    fn assert_complete(&mut self) {
        // The destination reads what is still queued for it.
        self.drain(usize::MAX);
        assert_eq!(self.s.main_queued_bytes(), 0);
        assert!(self.dst.ended, "the destination saw EOF");
        if self.s.cfg.own_preempt {
            let eos = self
                .s
                .take_own_preempt_eos()
                .expect("EOS once the stream ended");
            self.dst.feed_preempt(&eos).unwrap();
            assert!(self.dst.preempt_ended);
            assert!(self.s.take_own_preempt_eos().is_none(), "EOS once");
        }
        assert_eq!(self.dst.missing(), vec![], "pages never delivered");
        assert!(self.s.ended());
    }
}

#[test]
fn a_stream_without_cuts_is_forwarded_byte_for_byte() {
    let mut w = Wire::new(CutPolicy::Hold);
    let mut all = w.src.start(3);
    while w.src.has_dirty() {
        all.extend(w.src.part(10));
    }
    all.extend(w.src.finish());
    w.carry(&all, 1000);
    assert_eq!(w.to_dst, all);
    assert!(w.pieces.iter().all(|p| matches!(p, Piece::Forward(_))));
    w.assert_complete();
    assert!(w.dst.postcopy_pages > 0);
}

#[test]
fn a_cut_mid_record_is_held_and_the_resumed_source_fills_exactly_the_gap() {
    let mut w = Wire::new(CutPolicy::Hold);
    let start = w.src.start(4);
    w.carry(&start, 4096);
    let part = w.src.part(20);
    // The sidecar gets only part of the section: the cut falls inside a page record.
    let upto = part.len() / 2 + 100;
    w.carry(&part[..upto], 777);
    assert!(!w.buf.is_empty(), "a partial record stays buffered");
    assert_eq!(w.cut(), CutDecision::Hold);
    // The destination keeps faulting while the source is away: queued, nothing sent.
    w.faults(3);
    assert_eq!(w.s.link_view(w.now).state, "away");
    w.resume(64);
    // The handshake was answered by the sidecar and skipped, and the destination got the
    // interrupted section closed before anything else.
    assert!(w.pieces.iter().any(|p| matches!(p, Piece::Skip(_))));
    w.run_to_end(16, 999);
    // The first byte after the handshake was the close of the open section.
    let inject = w
        .pieces
        .iter()
        .position(|p| matches!(p, Piece::Inject(_)))
        .expect("the open section was closed");
    assert!(
        w.pieces[..inject]
            .iter()
            .rev()
            .take_while(|p| !matches!(p, Piece::Forward(_)))
            .any(|p| matches!(p, Piece::Skip(_)))
    );
    w.assert_complete();
    let r = &w.s.recoveries()[0];
    assert_eq!(r.mode, "hold");
    assert_eq!(r.requests_queued, 3);
    assert!(r.requests_reissued >= 1);
}

#[test]
fn requests_reach_a_resumed_source_only_after_its_postcopy_resume_and_after_resume_ack() {
    let mut w = Wire::new(CutPolicy::Hold);
    let start = w.src.start(4);
    w.carry(&start, 4096);
    assert_eq!(w.cut(), CutDecision::Hold);
    w.faults(4);
    w.tick();
    w.s.source_main_connected(w.now).unwrap();
    let bitmaps = w.src.resume_start();
    w.buf.extend_from_slice(&bitmaps);
    let step = w.s.on_source_main(w.s.epoch(), &w.buf, w.now);
    w.buf.drain(..step.consumed);
    // Before POSTCOPY_RESUME only bitmaps go back: a 10.x source with preempt would
    // abort on a request now (its preempt channel is not connected yet).
    let (_, rp) = w.s.take_to_source();
    let names = rp_names(&rp);
    assert!(
        names
            .iter()
            .all(|n| n.starts_with("RECV_BITMAP") || n.starts_with("bitmap"))
    );
    w.src.on_return_path(&rp);
    let fin = w.src.resume_finish();
    w.buf.extend_from_slice(&fin);
    let step = w.s.on_source_main(w.s.epoch(), &w.buf, w.now);
    w.buf.drain(..step.consumed);
    let (_, rp) = w.s.take_to_source();
    let names = rp_names(&rp);
    assert_eq!(names[0], "RESUME_ACK");
    assert!(names[1..].iter().all(|n| n == "REQ_PAGES_ID"), "{names:?}");
    assert_eq!(names.len(), 1 + 4);
}

fn rp_names(bytes: &[u8]) -> Vec<String> {
    let mut d = RpDecoder::new();
    let mut at = 0;
    let mut out = Vec::new();
    while let crate::wire::Step::Event { len, event, .. } = d.next(&bytes[at..]).unwrap() {
        at += len;
        out.push(event.name().to_string());
    }
    out
}

/// A small deterministic generator (the tests must not depend on a seed source).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 33) as usize) % below.max(1)
    }
}

#[test]
fn twenty_cuts_at_arbitrary_bytes_lose_no_page_and_place_none_twice() {
    let _ = twenty_cuts(|_| Wire::new(CutPolicy::Hold));
}

#[test]
fn twenty_cuts_with_a_queue_and_requested_pages_first_lose_no_page_and_place_none_twice() {
    // The destination reads slower than the source sends, so requests find their pages
    // queued and cuts find a queue to hold.
    let (promoted, data_first) =
        twenty_cuts(|seed| Wire::queued(CutPolicy::Hold, 1500 + seed as usize * 700));
    assert!(promoted > 0, "requests found queued pages and moved them");
    assert!(data_first > 0, "data pages overtook queued zero pages");
}

/// Twelve seeds of a postcopy stream cut twenty times at arbitrary bytes; returns the
/// pages the queue sent ahead: requested ones, and data pages ahead of zero pages.
fn twenty_cuts(wire: impl Fn(u64) -> Wire) -> (u64, u64) {
    let (mut promoted, mut data_first) = (0, 0);
    for seed in 1..=12u64 {
        let mut rng = Lcg(seed);
        let mut w = wire(seed);
        let start = w.src.start(2 + seed % 5);
        w.carry(&start, 1 + rng.next(9000));
        let mut cuts = 0;
        while w.src.has_dirty() {
            let part = w.src.part(1 + rng.next(6));
            if cuts < 20 && rng.next(2) == 0 {
                // The sidecar receives an arbitrary prefix; the rest is lost in the cut.
                let upto = rng.next(part.len() + 1);
                w.carry(&part[..upto], 1 + rng.next(5000));
                assert_eq!(w.cut(), CutDecision::Hold);
                cuts += 1;
                w.faults(rng.next(4));
                w.resume(1 + rng.next(300));
            } else {
                w.carry(&part, 1 + rng.next(5000));
            }
            w.faults(rng.next(3));
        }
        let fin = w.src.finish();
        w.carry(&fin, 7);
        w.assert_complete();
        assert_eq!(w.s.recoveries().len(), cuts, "seed {seed}");
        assert_eq!(cuts, 20, "seed {seed}");
        assert_eq!(
            w.s.tracker().unwrap().request_figures().outstanding_pages,
            0,
            "seed {seed}"
        );
        promoted += w.s.outbox_figures().promoted_pages;
        data_first += w.s.outbox_figures().data_first_pages;
    }
    (promoted, data_first)
}

#[test]
fn twenty_cuts_with_the_sidecars_own_preempt_channel_lose_no_page_and_place_none_twice() {
    // With its own preempt channel the queue promotes onto that channel only.
    let (promoted, _) =
        twenty_cuts(|seed| Wire::own_preempt(CutPolicy::Hold, 1500 + seed as usize * 700));
    assert!(promoted > 0, "requested pages left on the preempt channel");
}

#[test]
fn with_its_own_preempt_channel_a_requested_page_overtakes_all_of_main() {
    let mut w = Wire::own_preempt(CutPolicy::Hold, 0);
    // The destination faults on a page queued last; it has read nothing of the part.
    let (block, offset) = w.queue_a_long_part();
    let req = w.dst.request(&block, offset);
    assert!(w.s.on_destination_rp(&req, w.now).error.is_none());
    assert!(w.s.preempt_out_pending());
    // Not a byte of main is read: the page arrives on preempt.
    for b in w.s.take_preempt_out(usize::MAX) {
        w.dst.feed_preempt(&b).unwrap();
    }
    assert_eq!(w.dst.preempt_pages, 1);
    assert!(!w.dst.missing().contains(&(block.clone(), offset)));
    assert!(w.s.take_own_preempt_eos().is_none(), "not before the end");
    let f = w.s.outbox_figures();
    assert_eq!((f.promoted_pages, f.preempt_pages), (1, 1));
    w.drain(usize::MAX);
    w.run_to_end(20, 3000);
    w.assert_complete();
    assert!(w.dst.preempt_pages >= 1);
}

#[test]
fn faults_in_order_open_a_prefetch_window_and_every_page_still_arrives_once() {
    // Prefetch alone: with data pages first, zero pages the walk meets may still be
    // queued behind data pages, and their faults (answered from the queue) would count.
    let mut w = Wire::queued_data_first(CutPolicy::Hold, 3000, false);
    let start = w.src.start(0);
    w.carry(&start, 4096);
    // The guest walks block m from page 100 on, faulting on what is missing; the source
    // sends small PARTs meanwhile.
    let mut page = 100u64;
    let mut faults = 0;
    while page < 300 {
        if w.dst.missing().contains(&(b"m".to_vec(), page * PAGE)) {
            let req = w.dst.request(b"m", page * PAGE);
            w.tick();
            assert!(w.s.on_destination_rp(&req, w.now).error.is_none());
            w.pass_to_source();
            faults += 1;
            let part = w.src.part(3);
            w.carry(&part, 5000);
        }
        page += 1;
    }
    let r = w.s.tracker().unwrap().request_figures();
    assert!(r.prefetched_pages > 50, "{r:?}");
    assert!(
        faults < 100,
        "{faults} faults for 200 pages walked in order"
    );
    w.run_to_end(20, 3000);
    w.assert_complete();
    assert_eq!(
        w.s.tracker().unwrap().request_figures().outstanding_pages,
        0
    );
}

#[test]
fn random_faults_ask_only_for_the_faulting_pages() {
    let mut w = Wire::queued(CutPolicy::Hold, 3000);
    let start = w.src.start(0);
    w.carry(&start, 4096);
    let mut rng = Lcg(9);
    for _ in 0..40 {
        let missing = w.dst.missing();
        let (block, offset) = &missing[rng.next(missing.len())];
        let req = w.dst.request(block, *offset);
        w.tick();
        assert!(w.s.on_destination_rp(&req, w.now).error.is_none());
        w.pass_to_source();
        let part = w.src.part(2);
        w.carry(&part, 5000);
    }
    let r = w.s.tracker().unwrap().request_figures();
    assert!(r.prefetched_pages <= 4, "{r:?}");
    w.run_to_end(20, 3000);
    w.assert_complete();
}

#[test]
fn with_a_slow_destination_queued_data_pages_overtake_zero_pages_and_each_arrives_once() {
    for data_first in [true, false] {
        let mut w = Wire::queued_data_first(CutPolicy::Hold, 0, data_first);
        let start = w.src.start(4);
        w.carry(&start, 4096);
        w.drain(usize::MAX);
        let placed_before = w.dst.placed.len();
        // A long PART is read whole while the destination reads nothing, then read.
        let part = w.src.part(60);
        w.carry(&part, 8192);
        w.drain(usize::MAX);
        let zeros: Vec<bool> = w.dst.placed[placed_before..].iter().map(|p| p.2).collect();
        assert!(zeros.len() > 40, "{} pages placed", zeros.len());
        assert!(zeros.contains(&true) && zeros.contains(&false));
        let first_zero = zeros.iter().position(|z| *z).unwrap();
        let last_data = zeros.iter().rposition(|z| !*z).unwrap();
        if data_first {
            assert!(
                last_data < first_zero,
                "every data page before any zero page"
            );
            assert!(w.s.outbox_figures().data_first_pages > 0);
        } else {
            assert!(first_zero < last_data, "stream order mixes them");
            assert_eq!(w.s.outbox_figures().data_first_pages, 0);
        }
        w.run_to_end(20, 3000);
        w.assert_complete();
    }
}

#[test]
fn the_queue_stops_reading_at_its_record_bound_though_its_bytes_are_few() {
    let now = Instant::now();
    let mut s = Session::new(
        SessionConfig {
            max_queued_units: 50,
            ..Default::default()
        },
        now,
    );
    s.source_main_connected(now).unwrap();
    let mut w = Wire {
        s,
        ..Wire::queued(CutPolicy::Hold, 0)
    };
    let start = w.src.start(4);
    w.carry(&start, 4096);
    w.drain(usize::MAX);
    assert!(w.s.main_wants_more(32 << 20));
    let part = w.src.part(60);
    w.carry(&part, 8192);
    assert!(w.s.main_queued_bytes() < 1 << 20);
    assert!(
        !w.s.main_wants_more(32 << 20),
        "60 records queued, bound 50"
    );
    w.drain(usize::MAX);
    assert!(w.s.main_wants_more(32 << 20), "drained, it reads again");
    w.run_to_end(20, 3000);
    w.assert_complete();
}

#[test]
fn a_requested_page_in_the_queue_reaches_the_destination_before_the_bulk_queued_ahead() {
    let mut w = Wire::queued(CutPolicy::Hold, 0);
    // Postcopy: a long PART is read whole while the destination reads nothing; it
    // faults on the last page queued.
    let (block, offset) = w.queue_a_long_part();
    let req = w.dst.request(&block, offset);
    let step = w.s.on_destination_rp(&req, w.now);
    assert!(step.error.is_none());
    let (_, to_source) = w.s.take_to_source();
    assert!(
        to_source.is_empty(),
        "a queued page is not asked of the source"
    );
    // The destination reads a little: past the section header, the requested page
    // comes before the bulk queued ahead of it.
    let before = w.dst.postcopy_pages;
    let first = w.s.take_main_out(1);
    for b in &first {
        w.dst.feed(b).unwrap();
    }
    let mut next = Vec::new();
    for b in w.s.take_main_out(PAGE as usize) {
        next.extend_from_slice(&b);
    }
    w.dst.feed(&next).unwrap();
    assert!(w.dst.postcopy_pages > before);
    assert!(
        !w.dst.missing().contains(&(block.clone(), offset)),
        "the requested page was among the first placed"
    );
    assert_eq!(w.s.outbox_figures().promoted_pages, 1);
    w.drain(usize::MAX);
    w.run_to_end(20, 3000);
    w.assert_complete();
}

#[test]
fn a_cut_before_the_destination_runs_the_vm_fails_the_migration() {
    let mut w = Wire::new(CutPolicy::Hold);
    let start = w.src.start(2);
    // Up to, but not including, the package: the destination never ran the VM.
    let package_at = start.len() - 200;
    w.carry(&start[..package_at], 4096);
    match w.cut() {
        CutDecision::Fail(why) => assert!(why.contains("cannot be recovered"), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_idle_rule_cuts_a_silent_source_in_postcopy_only() {
    let mut w = Wire::new(CutPolicy::Hold);
    let start = w.src.start(2);
    // In precopy the rule does not apply.
    w.carry(&start[..100], 100);
    w.s.source_reading(w.s.epoch(), w.now);
    assert_eq!(w.s.poll_timeout(), None);
    w.carry(&start[100..], 4096);
    w.s.source_reading(w.s.epoch(), w.now);
    let due = w.s.poll_timeout().expect("armed in postcopy");
    assert_eq!(due, w.now + DEFAULT_SILENCE);
    assert_eq!(w.s.handle_timeout(w.now + Duration::from_secs(1)), None);
    assert!((w.s.link_view(w.now + Duration::from_secs(4)).silent_for_s - 4.0).abs() < 0.01);
    assert_eq!(w.s.handle_timeout(due), Some(TimerAction::CutSource));
    // Disarmed until the cut is reported, so the I/O layer is not woken again and again.
    assert_eq!(w.s.poll_timeout(), None);
    let d =
        w.s.source_lost(Channel::Main, CutCause::Failed("shut down".into()), due);
    assert_eq!(d, CutDecision::Hold);
    let events = w.s.take_events();
    assert!(events.iter().any(|e| matches!(
        e,
        LinkEvent::Cut { cause: CutCause::Silent(d), .. } if *d == DEFAULT_SILENCE
    )));
    // Away: the next timer is the away deadline, and then the sidecar gives up.
    let give_up = w.s.poll_timeout().expect("armed while away");
    assert_eq!(give_up, due + DEFAULT_AWAY_TIMEOUT);
    match w.s.handle_timeout(give_up) {
        Some(TimerAction::GiveUp(why)) => assert!(why.contains("did not come back"), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_resume_naming_a_block_the_migration_does_not_have_is_refused() {
    let mut w = Wire::new(CutPolicy::Hold);
    let start = w.src.start(2);
    w.carry(&start, 4096);
    w.cut();
    w.s.source_main_connected(w.now).unwrap();
    let mut bad = Vec::new();
    Command::RecvBitmap { block: b"other" }.encode(&mut bad);
    let step = w.s.on_source_main(w.s.epoch(), &bad, w.now);
    assert!(
        matches!(&step.error, Some(SessionError::Resume { what, .. }) if what.contains("other")),
        "{:?}",
        step.error
    );
    assert_eq!(step.consumed, 0);
    // Nothing was answered: a 7.2 source is never left half-way through a handshake
    // it could not complete.
    assert!(w.s.take_to_source().1.is_empty());
}

#[test]
fn a_second_main_connection_while_the_source_is_up_is_refused() {
    let mut w = Wire::new(CutPolicy::Hold);
    assert!(matches!(
        w.s.source_main_connected(w.now),
        Err(SessionError::Link(_))
    ));
}

#[test]
fn pass_through_rebuilds_delivered_pages_from_the_destinations_bitmap() {
    let mut w = Wire::new(CutPolicy::PassThrough);
    let start = w.src.start(2);
    w.carry(&start, 4096);
    let part = w.src.part(10);
    w.carry(&part, 4096);
    w.faults(2);
    assert_eq!(w.cut(), CutDecision::PassThrough);
    assert_eq!(w.s.tracker().unwrap().outstanding_pages(), 0);
    // The source resumes: its handshake is forwarded to the (new) destination connection.
    w.s.source_main_connected(w.now).unwrap();
    let bitmaps = w.src.resume_start();
    let step = w.s.on_source_main(w.s.epoch(), &bitmaps, w.now);
    assert_eq!(step.pieces, vec![Piece::Forward(bitmaps.len())]);
    // The destination answers with what it really holds: say only page 0 of `m`.
    let mut rp = Vec::new();
    for (name, len) in BLOCKS {
        let size = (len / PAGE).div_ceil(8).next_multiple_of(8);
        let mut bits = vec![0u8; size as usize];
        if *name == b"m" {
            bits[0] = 1;
        }
        RpMessage::RecvBitmap { block: name }.encode(&mut rp);
        RpMessage::BitmapSize(size).encode(&mut rp);
        RpMessage::BitmapData(&bits).encode(&mut rp);
        RpMessage::BitmapEnd.encode(&mut rp);
    }
    let step = w.s.on_destination_rp(&rp, w.now);
    assert!(step.error.is_none());
    assert_eq!(w.s.take_to_source().1, rp, "relayed unchanged");
    // Page 0 is delivered, page 1 (sent before the cut) is not any more.
    let t = w.s.tracker().unwrap();
    assert_eq!(t.received_bitmap(0).unwrap()[0], 1);
    let mut ack = Vec::new();
    RpMessage::ResumeAck(1).encode(&mut ack);
    w.s.on_destination_rp(&ack, w.now);
    assert_eq!(w.s.recoveries().len(), 1);
    assert_eq!(w.s.recoveries()[0].mode, "pass-through");
    assert_eq!(w.s.take_to_source().1, ack);
    // A request for page 1 now goes to the source.
    let req = w.dst.request(b"m", PAGE);
    w.s.on_destination_rp(&req, w.now);
    assert_eq!(rp_names(&w.s.take_to_source().1), ["REQ_PAGES_ID"]);
}

#[test]
fn a_cut_after_the_stream_ended_gives_the_resumed_source_its_shut() {
    let mut w = Wire::new(CutPolicy::Hold);
    let start = w.src.start(2);
    w.carry(&start, 4096);
    w.run_to_end(50, 4096);
    w.assert_complete();
    // The cut comes before the destination's SHUT went back.
    assert_eq!(w.cut(), CutDecision::Hold);
    let mut shut = Vec::new();
    RpMessage::Shut(0).encode(&mut shut);
    w.s.on_destination_rp(&shut, w.now);
    assert!(
        w.s.take_to_source().1.is_empty(),
        "held for the resumed source"
    );
    w.resume(100);
    // Nothing is dirty: the source completes at once, and gets its SHUT.
    assert!(!w.src.has_dirty());
    let fin = w.src.finish();
    w.carry(&fin, 100);
    assert_eq!(w.src.shut, vec![0]);
}

/// The preempt channel's loss is seen first; the main connection of the same (cut)
/// generation still delivers bytes, which must not reach the decoder that was reset for
/// the resume.
#[test]
fn bytes_of_a_connection_cut_meanwhile_are_refused_not_decoded() {
    let mut w = Wire::new(CutPolicy::Hold);
    let start = w.src.start(3);
    w.carry(&start, 4096);
    let old = w.s.epoch();
    let part = w.src.part(8);
    let d = w.s.source_lost(Channel::Preempt, CutCause::Closed, w.now);
    assert_eq!(d, CutDecision::Hold);
    let step = w.s.on_source_main(old, &part, w.now);
    assert!(step.stale);
    assert_eq!(step.consumed, 0);
    assert!(step.error.is_none());
    // The same connection's own loss, reported later, changes nothing.
    assert_eq!(
        w.s.source_lost(Channel::Main, CutCause::Closed, w.now),
        CutDecision::Ignore
    );
    w.resume(100);
    w.run_to_end(10, 777);
    w.assert_complete();
}

/// Cuts that follow each other before the resumed source forwarded anything: the close of
/// the section the first cut left open is still owed, and sent exactly once.
#[test]
fn back_to_back_cuts_still_close_the_first_cuts_section_once() {
    let mut w = Wire::new(CutPolicy::Hold);
    let start = w.src.start(4);
    w.carry(&start, 4096);
    let part = w.src.part(10);
    w.carry(&part[..part.len() / 2], 1000);
    for _ in 0..3 {
        assert_eq!(w.cut(), CutDecision::Hold);
        w.resume(50);
    }
    w.run_to_end(10, 500);
    w.assert_complete();
    let injects = w
        .pieces
        .iter()
        .filter(|p| matches!(p, Piece::Inject(_)))
        .count();
    assert_eq!(injects, 1);
}

/// Found by the `session_logic` fuzzer: a read that ends exactly at the package's last
/// byte leaves the decoder inside the package (its end is reported on the next read), yet
/// the destination ran the package's RUN: a cut there is a postcopy cut and must be held,
/// not fail the migration.
#[test]
fn a_cut_right_after_the_packages_last_byte_is_held() {
    let mut w = Wire::new(CutPolicy::Hold);
    let start = w.src.start(2);
    let mut ping4 = Vec::new();
    Command::Ping(4).encode(&mut ping4);
    w.carry(&start[..start.len() - ping4.len()], 4096);
    assert_eq!(w.s.phase(), PostcopyPhase::Running);
    assert_eq!(w.cut(), CutDecision::Hold);
    w.resume(100);
    w.run_to_end(10, 777);
    w.assert_complete();
}

/// QEMU 10.2 puts PING(0x42) in the package after PING(3) and waits for its PONG before it
/// goes postcopy-active (10.2.2 `migration.c:postcopy_start`, QEMU_VM_PING_PACKAGED_LOADED,
/// and `migration_iteration_run`). The sidecar owns the return path: the package passes
/// unchanged and the PONG reaches the source. Composed from the spec; no 10.2 ran here.
#[test]
fn a_10_2_package_ping_passes_and_its_pong_reaches_the_source() {
    use crate::wire::compose::{put_opening, put_package};
    let mut w = Wire::new(CutPolicy::Hold);
    let mut stream = Vec::new();
    put_opening(&mut stream, b"pc-q35-10.2", 2, BLOCKS);
    Command::Ping(2).encode(&mut stream);
    let mut blob = Vec::new();
    Command::PostcopyListen.encode(&mut blob);
    Command::Ping(3).encode(&mut blob);
    Command::Ping(0x42).encode(&mut blob);
    Command::PostcopyRun.encode(&mut blob);
    put_package(&mut stream, &blob);
    w.carry(&stream, 1000);
    assert!(w.to_dst == stream, "the package passes unchanged");
    assert_eq!(w.s.phase(), PostcopyPhase::Running);
    let mut rp = Vec::new();
    for v in [2u32, 3, 0x42] {
        RpMessage::Pong(v).encode(&mut rp);
    }
    let step = w.s.on_destination_rp(&rp, w.now);
    assert!(step.error.is_none(), "{:?}", step.error);
    let (_, to_source) = w.s.take_to_source();
    let mut d = RpDecoder::new();
    let mut at = 0;
    let mut pongs = Vec::new();
    while let crate::wire::Step::Event { len, event, .. } = d.next(&to_source[at..]).unwrap() {
        at += len;
        if let RpMessage::Pong(v) = event {
            pongs.push(v);
        }
    }
    assert_eq!(pongs, [2, 3, 0x42]);
}

/// Multifd channels in memory (protocol-spec/multifd.md#multifd-relay): nothing is taken
/// before main's block table, then whole packets only, each page counted once for its
/// block, and a packet that does not decode leaves the channel with none of its bytes.
#[test]
fn multifd_packets_pass_whole_after_the_block_table_and_a_bad_one_not_at_all() {
    use crate::wire::multifd::{INIT_LEN, MultifdInit, compose as mf};
    let now = Instant::now();
    let mut s = Session::new(SessionConfig::default(), now);
    s.source_main_connected(now).unwrap();
    let init = MultifdInit {
        uuid: [0; 16],
        id: 2,
    };
    let page = vec![5u8; PAGE as usize];
    let mut chan = Vec::new();
    mf::put_sync(&mut chan, PAGE as usize, 0);
    mf::put_ram_packet(
        &mut chan,
        PAGE as usize,
        0,
        1,
        b"m",
        &[(0, &page), (PAGE, &page)],
        &[3 * PAGE],
    );
    let first = chan.len();
    // Before the block table nothing is consumed.
    let step = s.on_source_multifd(init, &chan, now);
    assert_eq!((step.consumed, step.error.is_none()), (0, true));

    let mut main = Vec::new();
    crate::wire::compose::put_opening(&mut main, b"pc-q35-10.0", 2, BLOCKS);
    let step = s.on_source_main(1, &main, now);
    assert!(step.layout_ready && step.error.is_none());
    // Half a packet waits; the rest completes it.
    let step = s.on_source_multifd(init, &chan[..first - 100], now);
    assert_eq!(step.consumed, 1344);
    let step = s.on_source_multifd(init, &chan[1344..], now);
    assert_eq!(step.consumed, first - 1344);
    assert_eq!(step.pieces, vec![Piece::Forward(first - 1344)]);
    let fig = &s.stats().multifd[&2];
    assert_eq!(
        (fig.packets, fig.syncs, fig.pages, fig.zero_pages),
        (2, 1, 2, 1)
    );
    assert_eq!(s.stats().precopy.pages, 2);

    // A page past the end of its block: refused with where, nothing of it forwarded.
    let mut bad = Vec::new();
    mf::put_ram_packet(
        &mut bad,
        PAGE as usize,
        0,
        2,
        b"pc.bios",
        &[(8 * PAGE, &page)],
        &[],
    );
    let step = s.on_source_multifd(init, &bad, now);
    assert_eq!((step.consumed, step.pieces.len()), (0, 0));
    let e = step.error.expect("refused").to_string();
    assert!(
        e.contains("multifd channel 2") && e.contains("past the end"),
        "{e}"
    );
    assert!(
        e.contains(&format!("offset {}", INIT_LEN + first + 320)),
        "{e}"
    );
    assert!(
        s.finish_multifd(2, &[]).is_err(),
        "a failed channel never ends clean"
    );
}

/// COLO (protocol-spec/versions.md#versions-after-10-0): ENABLE_COLO is refused by name,
/// and none of its bytes reach the destination.
#[test]
fn enable_colo_is_refused_by_name_before_it_is_forwarded() {
    let now = Instant::now();
    let mut s = Session::new(SessionConfig::default(), now);
    s.source_main_connected(now).unwrap();
    let mut main = Vec::new();
    crate::wire::compose::put_opening(&mut main, b"pc-q35-10.0", 2, BLOCKS);
    let opening = main.len();
    Command::EnableColo.encode(&mut main);
    let step = s.on_source_main(1, &main, now);
    assert_eq!(step.consumed, opening);
    let e = step.error.expect("refused").to_string();
    assert!(e.contains("ENABLE_COLO") && e.contains("x-colo"), "{e}");
}

/// QEMU 10.2 lets multifd and postcopy run together (protocol-spec/multifd.md#multifd-postcopy):
/// multifd carries precopy pages, then main carries the switch (discards, the package with
/// PING(0x42)). Composed from the spec, as no 10.2 runs here: a page multifd delivered
/// and nobody dirtied is answered as delivered; one discarded after it is asked of the
/// source.
#[test]
fn with_10_2_multifd_and_postcopy_a_multifd_page_counts_as_delivered_until_discarded() {
    use crate::wire::compose::{put_discards, put_opening, put_package};
    use crate::wire::multifd::{MultifdInit, compose as mf};
    let mut w = Wire::new(CutPolicy::Hold);
    let mut opening = Vec::new();
    put_opening(&mut opening, b"pc-q35-10.2", 2, BLOCKS);
    w.carry(&opening, 1000);
    let data: Vec<[u8; PAGE as usize]> = (0..8)
        .map(|p| super::sim::page_content(0, p).unwrap_or([0; PAGE as usize]))
        .collect();
    for id in 0..2u8 {
        let init = MultifdInit { uuid: [0; 16], id };
        let mut chan = Vec::new();
        mf::put_sync(&mut chan, PAGE as usize, u64::from(id));
        let pages: Vec<(u64, &[u8])> = (0..4)
            .map(|i| {
                let p = u64::from(id) * 4 + i;
                (p * PAGE, &data[p as usize][..])
            })
            .collect();
        mf::put_ram_packet(
            &mut chan,
            PAGE as usize,
            0,
            2 + u64::from(id),
            b"m",
            &pages,
            &[],
        );
        mf::put_sync(&mut chan, PAGE as usize, 4 + u64::from(id));
        let step = w.s.on_source_multifd(init, &chan, w.now);
        assert_eq!((step.consumed, step.error.is_none()), (chan.len(), true));
    }
    // The switch: page 3 was dirtied after multifd sent it.
    let mut switch = Vec::new();
    put_discards(&mut switch, b"m", &[(3 * PAGE, PAGE)]);
    Command::Ping(2).encode(&mut switch);
    let mut blob = Vec::new();
    Command::PostcopyListen.encode(&mut blob);
    Command::Ping(3).encode(&mut blob);
    Command::Ping(0x42).encode(&mut blob);
    Command::PostcopyRun.encode(&mut blob);
    put_package(&mut switch, &blob);
    w.carry(&switch, 1000);
    assert_eq!(w.s.phase(), PostcopyPhase::Running);
    let mut rp = Vec::new();
    for p in [5u64, 3] {
        RpMessage::ReqPagesId {
            start: p * PAGE,
            len: PAGE as u32,
            block: b"m",
        }
        .encode(&mut rp);
    }
    let step = w.s.on_destination_rp(&rp, w.now);
    assert!(step.error.is_none(), "{:?}", step.error);
    let r = w.s.tracker().expect("tracker").request_figures();
    assert_eq!(
        (r.already_delivered_pages, r.forwarded_pages),
        (1, 1),
        "{r:?}"
    );
    let (_, to_source) = w.s.take_to_source();
    let names = rp_names(&to_source);
    assert_eq!(
        names.iter().filter(|n| n.contains("REQ_PAGES")).count(),
        1,
        "{names:?}"
    );
}

/// A multifd channel cut inside a packet fails a precopy migration, but once postcopy
/// runs (QEMU 10.2 with both) it is only lost: multifd carries nothing more then.
#[test]
fn a_multifd_channel_cut_inside_a_packet_fails_precopy_but_not_postcopy() {
    use crate::wire::compose::{put_opening, put_package};
    use crate::wire::multifd::{MultifdInit, compose as mf};
    let mut w = Wire::new(CutPolicy::Hold);
    let mut opening = Vec::new();
    put_opening(&mut opening, b"pc-q35-10.2", 2, BLOCKS);
    w.carry(&opening, 1000);
    let page = super::sim::page_content(0, 1).unwrap();
    let mut packet = Vec::new();
    mf::put_ram_packet(
        &mut packet,
        PAGE as usize,
        0,
        1,
        b"m",
        &[(PAGE, &page[..])],
        &[],
    );
    let cut = &packet[..packet.len() / 2];
    for id in 0..2u8 {
        let init = MultifdInit { uuid: [0; 16], id };
        let step = w.s.on_source_multifd(init, cut, w.now);
        assert_eq!((step.consumed, step.error.is_none()), (0, true));
    }
    assert!(matches!(w.s.multifd_closed(0, cut), MultifdEnd::Failed(_)));
    let mut blob = Vec::new();
    Command::PostcopyListen.encode(&mut blob);
    Command::PostcopyRun.encode(&mut blob);
    let mut switch = Vec::new();
    Command::Ping(2).encode(&mut switch);
    put_package(&mut switch, &blob);
    w.carry(&switch, 1000);
    assert_eq!(w.s.phase(), PostcopyPhase::Running);
    assert!(matches!(w.s.multifd_closed(1, cut), MultifdEnd::Lost));
    assert!(
        matches!(w.s.multifd_closed(3, &[]), MultifdEnd::Clean),
        "between packets"
    );
}

/// A destination set up without postcopy (multifd on 7.2, or refused by QEMU): the
/// source's POSTCOPY_ADVISE, at the stream's start, is refused before it is forwarded.
#[test]
fn postcopy_advise_is_refused_where_the_destination_cannot_take_postcopy() {
    let now = Instant::now();
    let mut s = Session::new(SessionConfig::default(), now);
    s.refuse_postcopy("no postcopy here");
    s.source_main_connected(now).unwrap();
    let mut main = Vec::new();
    crate::wire::compose::put_opening(&mut main, b"pc-q35-7.2", 2, BLOCKS);
    let step = s.on_source_main(1, &main, now);
    let e = step.error.expect("refused").to_string();
    assert_eq!(e, "no postcopy here");
    let advise_at = main
        .windows(3)
        .position(|w| w == [8, 0, 3])
        .expect("ADVISE");
    assert_eq!(
        step.consumed, advise_at,
        "everything before ADVISE, nothing of it"
    );
}

#[test]
fn a_source_preempt_connection_cut_inside_a_record_is_a_held_cut_not_a_failure() {
    let mut w = Wire::new(CutPolicy::Hold);
    let start = w.src.start(4);
    w.carry(&start, 4096);
    w.s.source_preempt_connected().unwrap();
    let (b, p) = w
        .dst
        .missing()
        .into_iter()
        .find_map(|(block, offset)| {
            let b = BLOCKS.iter().position(|(n, _)| *n == block.as_slice())?;
            super::sim::page_content(b, offset / PAGE).map(|_| (b, offset / PAGE))
        })
        .expect("a missing page that is not a zero page");
    let rec = w.src.preempt_page(b, p);
    // The link is cut 100 bytes into the page: nothing of the record may go out.
    let epoch = w.s.epoch();
    let step = w.s.on_source_preempt(epoch, &rec[..100], w.now);
    assert!(step.error.is_none() && step.pieces.is_empty() && step.consumed == 0);
    assert!(!w.s.finish_preempt(&rec[..100]), "ended inside a record");
    w.tick();
    let d = w.s.source_lost(Channel::Preempt, CutCause::Closed, w.now);
    assert_eq!(d, CutDecision::Hold, "a cut preempt channel is held");
    // The page never arrived, so the resumed source has it dirty again and sends it on
    // its fresh preempt connection, which decodes from a clean state.
    w.resume(512);
    w.s.source_preempt_connected().unwrap();
    let rec = w.src.preempt_page(b, p);
    let step = w.s.on_source_preempt(w.s.epoch(), &rec, w.now);
    assert!(step.error.is_none(), "{:?}", step.error);
    assert_eq!(step.consumed, rec.len());
    w.dst.feed_preempt(&rec).unwrap();
    w.run_to_end(16, 999);
    w.assert_complete();
    assert_eq!(w.dst.preempt_pages, 1);
}

/// The guard asks for a whole huge page as the destination would, but never past the
/// block's end, and one message for the pages still missing.
#[test]
fn a_guard_request_is_one_message_and_stays_inside_its_block() {
    let mut w = Wire::new(CutPolicy::Hold);
    let start = w.src.start(4);
    w.carry(&start, 4096);
    let _ = w.s.take_to_source();
    w.s.guard_wants("pc.bios", 6 * PAGE, 4 * PAGE, w.now);
    let (_, rp) = w.s.take_to_source();
    let mut d = RpDecoder::new();
    match d.next(&rp).unwrap() {
        crate::wire::Step::Event {
            len,
            event:
                RpMessage::ReqPagesId {
                    start,
                    len: l,
                    block,
                },
            ..
        } => {
            assert_eq!(
                (start, u64::from(l), block),
                (6 * PAGE, 2 * PAGE, &b"pc.bios"[..])
            );
            assert_eq!(len, rp.len(), "one message");
        }
        other => panic!("{other:?}"),
    }
    w.s.guard_wants("pc.bios", 8 * PAGE, PAGE, w.now);
    assert!(w.s.take_to_source().1.is_empty(), "nothing past the end");
}

#[test]
fn a_taken_over_queue_knows_huge_pages_or_keeps_stream_order() {
    let now = Instant::now();
    let state = TakeoverState {
        ram_section_id: 2,
        target_page_size: PAGE,
        blocks: vec![("m".into(), 8 << 20)],
        preempt: false,
        own_preempt: false,
        destination: None,
        huge_pages: Some(vec![("m".into(), 2 << 20)]),
    };
    let s = Session::takeover(SessionConfig::default(), &state, now);
    assert!(s.cfg.requests_first && s.cfg.data_first);
    assert!(
        !s.ends_host_page(0, 0),
        "inside a huge page nothing may stand"
    );
    assert!(s.ends_host_page(0, (2 << 20) - PAGE));
    // A state file from a sidecar that did not write host page sizes.
    let mut json: serde_json::Value = serde_json::to_value(&state).unwrap();
    json.as_object_mut().unwrap().remove("huge_pages");
    let old: TakeoverState = serde_json::from_value(json).unwrap();
    assert_eq!(old.huge_pages, None);
    let s = Session::takeover(SessionConfig::default(), &old, now);
    assert!(
        !s.cfg.requests_first && !s.cfg.data_first,
        "without host page sizes nothing moves"
    );
}
