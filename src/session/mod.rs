//! The I/O-free core of one migration carried by the sidecar.
//!
//! Like quinn-proto's connection, a [`Session`] is state plus methods: the daemon's pumps
//! read bytes, hand them in, and do what the answer says (forward these bytes, skip
//! those, inject these, send that to the source), and time is passed in. Every decision
//! lives here, so tests drive source ⇄ sidecar ⇄ destination in memory:
//! - which bytes reach the destination: only decoded ones, as slices of the read buffer
//!   ([`Piece::Forward`]), zero-copy;
//! - page-request takeover: every request is recorded, and only pages the stream will not
//!   bring anyway are asked of the source ([`tracker`]);
//! - the source link: a cut in postcopy is held or passed through ([`CutPolicy`]), the
//!   resumed source's recovery handshake is answered or relayed, requests are queued while
//!   the source is away and asked again when it is back, and silence counts as a cut.
//!
//! Exactly-once delivery to the destination holds across any number of cuts: a page
//! counts as delivered when its record was forwarded to a destination connection that
//! stays open, and the received bitmaps given to a resumed source say exactly that, so
//! the source resends precisely the pages that were lost in flight
//! (protocol-spec/postcopy-sequence.md#sequence-hold).

pub mod admission;
mod delta;
mod link;
pub mod outbox;
pub mod prefetch;
pub mod script;
pub mod sim;
pub mod stats;
pub mod tracker;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
pub use delta::Delta;
use link::{Cut, Link};
pub use link::{CutCause, CutDecision, CutPolicy, LinkView, Recovery};
use outbox::{Outbox, OutboxFigures, PageMark};
use prefetch::Prefetcher;
use stats::Stats;
use tracker::{Origin, PageTracker, RequestDecision};

use crate::verify::PageDigests;
use crate::verify::placement::PlacementCheck;
use crate::wire::multifd::{self, MultifdDecoder, MultifdEvent, MultifdInit};
use crate::wire::{
    Channel, Command, DecodeError, DecoderOptions, ErrorKind, Event, PageHeader, PostcopyPhase,
    PreemptDecoder, RamLayout, RamRecord, RpDecoder, RpMessage, Step, StreamDecoder,
};

/// Most bytes a prefetch adds to one request: what may queue at the source ahead of an
/// unrelated fault (protocol-spec/postcopy-sequence.md#sequence-prefetch).
pub const PREFETCH_BYTES: u64 = 32 * 4096;

/// Most bytes of queued pages sent with a fault the sidecar's queue answers: they are
/// already here, and go after every requested page.
pub const QUEUE_WINDOW_BYTES: u64 = 1 << 20;

/// Default time without a byte from the source, in postcopy, after which the link counts
/// as cut (the source may be on the far side of a silent partition).
pub const DEFAULT_SILENCE: Duration = Duration::from_secs(10);
/// How long a resume connection may take to complete its handshake.
pub const RESUME_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default time the sidecar waits for a source that went away in postcopy before it
/// hands the destination over to QEMU's own paused state.
pub const DEFAULT_AWAY_TIMEOUT: Duration = Duration::from_secs(600);

/// What the I/O layer must do when a session timer fires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimerAction {
    /// Cut the source's connections now (the idle rule, or a resume handshake that does
    /// not complete); they are reported lost with the reason the session recorded.
    CutSource,
    /// The source has been away too long: release the destination (close its
    /// connections, so QEMU pauses it and it can be recovered directly) and end.
    GiveUp(String),
}

/// Most records (pages, zero pages, moved places) the main channel's queue holds before
/// the sidecar stops reading the source: 56 bytes per record plus the index of waiting
/// pages, about 16 MiB of bookkeeping for a stream that walks memory and 40 MiB at most
/// (a source that scatters its pages, one index chunk each).
pub const MAX_QUEUED_UNITS: usize = 1 << 18;

/// How a session behaves.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// What to do when the source link breaks in postcopy.
    pub on_cut: CutPolicy,
    /// Silence on the source's main channel in postcopy that counts as a cut.
    pub silence: Duration,
    /// How long to wait for a source that went away in postcopy.
    pub away_timeout: Duration,
    /// Keep the digest of every delivered page.
    pub record_digests: bool,
    /// Queue every postcopy page for a check right after placement.
    pub check_placement: bool,
    /// Options of the main-stream decoder.
    pub decoder: DecoderOptions,
    /// Send a requested page that is queued for the destination ahead of the queue
    /// ([`outbox`]); off, the queue keeps stream order.
    pub requests_first: bool,
    /// Ask the source for a window of pages after a faulting one while the guest walks
    /// memory in order ([`prefetch`]).
    pub prefetch: bool,
    /// Send queued data pages before queued zero pages ([`outbox`],
    /// protocol-spec/postcopy-sequence.md#sequence-data-first); needs `requests_first`.
    pub data_first: bool,
    /// Most records the main channel's queue holds before the sidecar stops reading the
    /// source ([`MAX_QUEUED_UNITS`] by default).
    pub max_queued_units: usize,
    /// The sidecar opens a preempt channel to the destination itself and sends requested
    /// pages there (protocol-spec/postcopy-sequence.md#sequence-own-preempt); needs
    /// `requests_first`, a destination with `postcopy-preempt` and a source without it.
    pub own_preempt: bool,
    /// Why the destination cannot take postcopy, when it cannot (set up for precopy
    /// only): a source's POSTCOPY_ADVISE is then refused at the stream's start, while the
    /// VM still runs on the source, instead of failing after it stopped there.
    pub no_postcopy: Option<&'static str>,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            on_cut: CutPolicy::Hold,
            silence: DEFAULT_SILENCE,
            away_timeout: DEFAULT_AWAY_TIMEOUT,
            record_digests: false,
            check_placement: false,
            decoder: DecoderOptions::default(),
            requests_first: true,
            prefetch: true,
            data_first: true,
            max_queued_units: MAX_QUEUED_UNITS,
            own_preempt: false,
            no_postcopy: None,
        }
    }
}

/// What a restarted sidecar needs to take over a paused migration, which the first one
/// wrote once the stream reached postcopy (`receive --state-file`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TakeoverState {
    /// Id of the `ram` section (PART sections name it by id only).
    pub ram_section_id: u32,
    /// Target page size.
    pub target_page_size: u64,
    /// RAM blocks (idstr, used length).
    pub blocks: Vec<(String, u64)>,
    /// Whether the migration uses the preempt channel.
    pub preempt: bool,
    /// Whether the sidecar opened the destination's preempt channel itself (the source
    /// has none): a resumed destination then waits for one from the sidecar.
    #[serde(default)]
    pub own_preempt: bool,
    /// Where the first sidecar reached the destination (`unix:PATH`, `tcp:ADDR`): QEMU
    /// keeps listening there while paused.
    #[serde(default)]
    pub destination: Option<String>,
    /// Blocks whose host page is larger than a target page (idstr, host page size): no
    /// record may be moved between the records of one of their host pages. `None` in a
    /// file from an older sidecar: then the taken-over queue keeps stream order.
    #[serde(default)]
    pub huge_pages: Option<Vec<(String, u64)>>,
}

/// One step of the byte stream towards the destination's main or preempt connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Forward the next `n` bytes of the input unchanged.
    Forward(usize),
    /// Consume the next `n` bytes of the input without forwarding them (the recovery
    /// handshake that the sidecar answers itself).
    Skip(usize),
    /// Send these bytes first (they close a section the cut left open).
    Inject(Vec<u8>),
}

/// How a source multifd channel ended ([`Session::multifd_closed`]).
#[derive(Debug)]
pub enum MultifdEnd {
    /// Between packets: the destination's channel is closed the same way.
    Clean,
    /// Cut in postcopy, when multifd carries nothing more: the destination's channel is
    /// left as it is and the migration goes on.
    Lost,
    /// Cut inside a packet before postcopy: the unfinished packet never went out, and the
    /// migration fails with the VM still on the source.
    Failed(SessionError),
}

/// What the session made of bytes from a source channel.
#[derive(Debug, Default)]
pub struct SourceStep {
    /// What to do with the input, in order; forwards and skips add up to `consumed`.
    pub pieces: Vec<Piece>,
    /// Input bytes used; the rest (an incomplete record) stays buffered.
    pub consumed: usize,
    /// Counters and effects.
    pub delta: Delta,
    /// The RAM block table became known (the preempt channel can be decoded now).
    pub layout_ready: bool,
    /// The stream's EOF was decoded: the source now only waits for the destination's SHUT.
    pub ended: bool,
    /// The bytes after `consumed` do not decode; nothing from them on may be forwarded.
    pub error: Option<SessionError>,
    /// The connection these bytes came from is no longer the source's current one (a
    /// cut was already declared): nothing was used, and the connection must be dropped.
    pub stale: bool,
}

/// What the session made of bytes from the destination's return path.
#[derive(Debug, Default)]
pub struct RpStep {
    /// Input bytes used.
    pub consumed: usize,
    /// Counters and effects.
    pub delta: Delta,
    /// The bytes after `consumed` do not decode.
    pub error: Option<SessionError>,
}

/// Why the session cannot go on with a channel.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SessionError {
    /// Bytes that do not decode.
    #[error("{0}")]
    Decode(#[from] DecodeError),
    /// A resumed source sent something other than its recovery handshake, or named a
    /// block the migration does not have.
    #[error("resume connection {conn}: {what}")]
    Resume {
        /// Which source main connection (1 = the first).
        conn: u32,
        /// What was wrong.
        what: String,
    },
    /// A connection the link's state does not allow.
    #[error("{0}")]
    Link(String),
    /// A feature the source asked for that the sidecar does not carry, named.
    #[error("{0}")]
    Unsupported(&'static str),
}

/// A destination RECV_BITMAP being read (pass-through recovery).
#[derive(Debug)]
struct BitmapIn {
    block: Option<usize>,
    name: Vec<u8>,
    expected: Option<u64>,
    data: Vec<u8>,
}

/// Link-level happenings for logs and metrics.
#[derive(Debug, Clone, PartialEq)]
pub enum LinkEvent {
    /// The source link was lost; the decision says what the sidecar does about it.
    Cut {
        /// Channel whose loss was noticed.
        channel: Channel,
        /// Why.
        cause: CutCause,
        /// Held, passed through, or failed.
        decision: CutDecision,
    },
    /// A resume connection arrived.
    ResumeStarted {
        /// Which source main connection.
        conn: u32,
    },
    /// Postcopy runs again.
    Recovered(Recovery),
}

/// The state of one carried migration.
pub struct Session {
    cfg: SessionConfig,
    main: StreamDecoder,
    preempt: Option<PreemptDecoder>,
    /// One decoder per multifd channel, made once the block table is known.
    multifd: BTreeMap<u8, MultifdDecoder>,
    rp: RpDecoder,
    tracker: Option<PageTracker>,
    digests: Option<PageDigests>,
    stats: Stats,
    link: Link,
    /// Source main connections so far (1 = the first).
    conns: u32,
    /// Bytes for the source's return path, produced under `epoch`.
    to_source: Vec<u8>,
    epoch: u64,
    /// Bytes that close the section a cut left open at the destination (hold), sent
    /// before the next forwarded byte.
    close_section: Vec<u8>,
    /// The stream's EOF was forwarded.
    ended: bool,
    /// The destination's SHUT, once seen, and whether the source got it.
    shut: Option<u32>,
    shut_sent: bool,
    /// Since when the main pump waits for source bytes (the idle rule's clock).
    reading_since: Option<Instant>,
    /// The idle rule fired for this long a silence; the next loss is reported as such,
    /// and no timer fires until it is.
    silent: Option<Duration>,
    bitmap_in: Option<BitmapIn>,
    recoveries: Vec<Recovery>,
    events: Vec<LinkEvent>,
    placement: Vec<PlacementCheck>,
    layout_published: bool,
    preempt_used: bool,
    /// Decoded main-stream bytes not yet given to the destination ([`Self::queue_source_main`]).
    outbox: Outbox,
    /// Read-ahead windows around the destination's faults.
    prefetch: Prefetcher,
    /// Whether the page record decoded last answered a request (the destination's, the
    /// guard's or a prefetch).
    answered_last: bool,
    /// While set, page records of the main stream are marked in `marks` as decoded.
    marking: bool,
    /// Page records of the current step: input position, length, mark.
    marks: Vec<(usize, usize, PageMark)>,
    /// Blocks whose host page is larger than a target page, with that page size: their
    /// records assemble one host page in order on one channel, so none of them may move,
    /// and no other record may stand between two of one host page.
    huge_blocks: Vec<(usize, u64)>,
    /// The EOS that ends the sidecar's own preempt channel was given out.
    own_preempt_ended: bool,
}

impl Session {
    /// A session for a fresh migration; `now` is when the sidecar accepted the source.
    pub fn new(cfg: SessionConfig, now: Instant) -> Session {
        let main = StreamDecoder::new(cfg.decoder.clone());
        Session {
            main,
            preempt: None,
            multifd: BTreeMap::new(),
            rp: RpDecoder::new(),
            tracker: None,
            digests: None,
            stats: Stats {
                started: now,
                ..Stats::default()
            },
            link: Link::Waiting,
            conns: 0,
            to_source: Vec::new(),
            epoch: 0,
            close_section: Vec::new(),
            ended: false,
            shut: None,
            shut_sent: false,
            reading_since: None,
            silent: None,
            bitmap_in: None,
            recoveries: Vec::new(),
            events: Vec::new(),
            placement: Vec::new(),
            layout_published: false,
            preempt_used: false,
            outbox: Outbox::new(),
            prefetch: Prefetcher::new(),
            answered_last: false,
            marking: false,
            marks: Vec::new(),
            huge_blocks: Vec::new(),
            own_preempt_ended: false,
            cfg,
        }
        .with_queue_modes()
    }

    /// Whether `block`'s host page is larger than a target page.
    fn huge_block(&self, block: usize) -> bool {
        self.huge_blocks.iter().any(|(b, _)| *b == block)
    }

    /// Whether the target page at `offset` of `block` is the last of its host page (a
    /// record may stand after it).
    fn ends_host_page(&self, block: usize, offset: u64) -> bool {
        match self.huge_blocks.iter().find(|(b, _)| *b == block) {
            Some((_, ps)) => (offset + self.main.target_page_size()).is_multiple_of(*ps),
            None => true,
        }
    }

    /// Sets the queue's modes from the configuration: the own preempt channel and data
    /// pages first, both only with requests first (they move queued pages).
    fn with_queue_modes(mut self) -> Session {
        if self.cfg.own_preempt && self.cfg.requests_first {
            self.outbox.use_preempt_channel();
        }
        if self.cfg.data_first && self.cfg.requests_first {
            self.outbox.data_first();
        }
        self
    }

    /// A session that takes over a migration paused in postcopy (a restarted sidecar):
    /// the destination has paused and will be recovered through the sidecar, which rebuilds
    /// what was delivered from the destination's received bitmaps (policy pass-through).
    pub fn takeover(cfg: SessionConfig, state: &TakeoverState, now: Instant) -> Session {
        let mut layout = RamLayout::default();
        for (name, len) in &state.blocks {
            layout.announce(name.as_bytes(), *len);
        }
        // Without the host page sizes no record may move: one could land inside a huge
        // page the destination is assembling.
        let ordered = state.huge_pages.is_none();
        let mut s = Session::new(
            SessionConfig {
                on_cut: CutPolicy::PassThrough,
                requests_first: cfg.requests_first && !ordered,
                data_first: cfg.data_first && !ordered,
                ..cfg
            },
            now,
        );
        s.main = StreamDecoder::resumed(
            s.cfg.decoder.clone(),
            state.ram_section_id,
            layout,
            state.target_page_size,
        );
        for (name, ps) in state.huge_pages.iter().flatten() {
            if let Some(id) = s.main.layout().find(name.as_bytes()) {
                s.huge_blocks.push((id, *ps));
            }
        }
        s.publish_layout();
        s.stats.phase = PostcopyPhase::Running;
        s.link = Link::Away(Cut {
            at: now,
            channel: Channel::Main,
            cause: CutCause::Closed,
            policy: CutPolicy::PassThrough,
            queued: 0,
            resume_at: None,
            attempts: 0,
        });
        s.preempt_used = state.preempt;
        s
    }

    /// What a restarted sidecar would need, once the stream has reached postcopy.
    pub fn takeover_state(&self) -> Option<TakeoverState> {
        if self.main.phase() < PostcopyPhase::Listening {
            return None;
        }
        Some(TakeoverState {
            ram_section_id: self.main.ram_section_id()?,
            target_page_size: self.main.target_page_size(),
            blocks: self
                .main
                .layout()
                .blocks()
                .iter()
                .map(|b| (String::from_utf8_lossy(&b.name).into_owned(), b.used_length))
                .collect(),
            preempt: self.preempt_used,
            own_preempt: self.cfg.own_preempt,
            destination: None,
            huge_pages: Some(
                self.huge_blocks
                    .iter()
                    .filter_map(|(b, ps)| {
                        let block = self.main.layout().blocks().get(*b)?;
                        Some((String::from_utf8_lossy(&block.name).into_owned(), *ps))
                    })
                    .collect(),
            ),
        })
    }

    /// The destination's SHUT value, once it sent one (0 = it completed).
    pub fn destination_shut(&self) -> Option<u32> {
        self.shut
    }

    /// Live counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// A connection at the sidecar's port was not let in (the carrier's admission).
    pub fn connection_refused(&mut self, peer: String, kind: &str, reason: String) {
        self.stats.refused.add(peer, kind, reason);
    }

    /// The takeover state, once the block table is known.
    pub fn tracker(&self) -> Option<&PageTracker> {
        self.tracker.as_ref()
    }

    /// Digests of delivered pages, when kept.
    pub fn digests(&self) -> Option<&PageDigests> {
        self.digests.as_ref()
    }

    /// Every recovery so far.
    pub fn recoveries(&self) -> &[Recovery] {
        &self.recoveries
    }

    /// The block table and target page size, once known.
    pub fn layout(&self) -> Option<(RamLayout, u64)> {
        self.layout_published
            .then(|| (self.main.layout().clone(), self.main.target_page_size()))
    }

    /// The postcopy phase the stream reached.
    pub fn phase(&self) -> PostcopyPhase {
        self.main.phase()
    }

    /// Whether the preempt channel was used.
    pub fn preempt_used(&self) -> bool {
        self.preempt_used
    }

    /// Whether the stream's EOF was forwarded.
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// The generation of the source connection that bytes for the source belong to.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Takes the bytes for the source's return path with the connection generation they
    /// were made for; a writer of another generation must drop them (they are requests,
    /// asked again after the resume).
    pub fn take_to_source(&mut self) -> (u64, Vec<u8>) {
        (self.epoch, std::mem::take(&mut self.to_source))
    }

    /// Takes the link events since the last call.
    pub fn take_events(&mut self) -> Vec<LinkEvent> {
        std::mem::take(&mut self.events)
    }

    /// Takes the pages queued for a check after placement.
    pub fn take_placement_checks(&mut self) -> Vec<PlacementCheck> {
        std::mem::take(&mut self.placement)
    }

    /// The link as the live view, the report and metrics show it.
    pub fn link_view(&self, now: Instant) -> LinkView {
        let silent = self
            .reading_since
            .map(|t| now.saturating_duration_since(t).as_secs_f64())
            .unwrap_or(0.0);
        match &self.link {
            Link::Waiting => LinkView {
                state: "waiting",
                away_for_s: None,
                cause: None,
                silent_for_s: 0.0,
            },
            Link::Up => LinkView {
                state: "up",
                away_for_s: None,
                cause: None,
                silent_for_s: silent,
            },
            Link::Away(c) | Link::Resuming(c) => LinkView {
                state: if matches!(self.link, Link::Away(_)) {
                    "away"
                } else {
                    "resuming"
                },
                away_for_s: Some(now.saturating_duration_since(c.at).as_secs_f64()),
                cause: Some(c.cause.to_string()),
                silent_for_s: 0.0,
            },
        }
    }

    fn postcopy_running(&self) -> bool {
        self.main.phase() >= PostcopyPhase::Running && !self.ended
    }

    /// A source main connection arrived: the first one, or a resume after a cut. Fails if
    /// the link's state does not allow one (the caller drops the connection).
    pub fn source_main_connected(&mut self, now: Instant) -> Result<u32, SessionError> {
        match &self.link {
            Link::Waiting => {
                self.link = Link::Up;
            }
            Link::Away(cut) => {
                let mut cut = cut.clone();
                cut.resume_at = Some(now);
                if cut.policy == CutPolicy::PassThrough {
                    // A new destination connection goes with it: its return path starts
                    // afresh, as does its previous-block state.
                    self.rp = RpDecoder::new();
                }
                self.link = Link::Resuming(cut);
                self.events.push(LinkEvent::ResumeStarted {
                    conn: self.conns + 1,
                });
            }
            Link::Up | Link::Resuming(_) => {
                return Err(SessionError::Link(
                    "a second main connection while the source's is up".into(),
                ));
            }
        }
        self.conns += 1;
        self.epoch += 1;
        self.to_source.clear();
        self.reading_since = None;
        self.silent = None;
        Ok(self.conns)
    }

    /// A source preempt connection arrived (at the switch to postcopy, at the start with
    /// QEMU 7.2, or during a resume).
    pub fn source_preempt_connected(&mut self) -> Result<(), SessionError> {
        if matches!(self.link, Link::Away(_) | Link::Waiting) && self.conns == 0 {
            return Err(SessionError::Link(
                "a preempt connection before the main one".into(),
            ));
        }
        self.preempt_used = true;
        self.preempt = self
            .layout()
            .map(|(layout, tps)| PreemptDecoder::new(tps, layout));
        Ok(())
    }

    /// The main pump starts waiting for source bytes (after its writes completed): the
    /// idle rule counts only time spent waiting for the source, not time the destination
    /// took to accept bytes.
    pub fn source_reading(&mut self, epoch: u64, now: Instant) {
        if self.current(epoch) && self.reading_since.is_none() {
            self.reading_since = Some(now);
        }
    }

    /// When the next timer fires: the idle rule while the source is up in postcopy, the
    /// handshake deadline while it resumes, the away deadline while it is gone.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.silent.is_some() {
            return None; // a cut was asked for; its loss comes next
        }
        match &self.link {
            Link::Up if self.postcopy_running() => self.reading_since.map(|t| t + self.cfg.silence),
            Link::Resuming(c) => c.resume_at.map(|t| t + RESUME_HANDSHAKE_TIMEOUT),
            Link::Away(c) => Some(c.at + self.cfg.away_timeout),
            _ => None,
        }
    }

    /// Applies the timers at `now`.
    pub fn handle_timeout(&mut self, now: Instant) -> Option<TimerAction> {
        let due = self.poll_timeout().is_some_and(|t| now >= t);
        if !due {
            return None;
        }
        match &self.link {
            Link::Away(c) => Some(TimerAction::GiveUp(format!(
                "the source did not come back within {:.0} s of the cut ({}); the destination \
                 is released to QEMU's own postcopy-paused state: recover both ends directly \
                 (deploy/README.md, \"The sidecar died or gave up\")",
                self.cfg.away_timeout.as_secs_f64(),
                c.cause
            ))),
            Link::Up => {
                let since = self.reading_since.unwrap_or(now);
                self.silent = Some(now.saturating_duration_since(since));
                Some(TimerAction::CutSource)
            }
            Link::Resuming(_) => {
                self.silent = Some(RESUME_HANDSHAKE_TIMEOUT);
                Some(TimerAction::CutSource)
            }
            Link::Waiting => None,
        }
    }

    /// A source channel was lost (EOF, an error, or the idle rule cut it).
    pub fn source_lost(&mut self, channel: Channel, cause: CutCause, now: Instant) -> CutDecision {
        let cause = match self.silent.take() {
            Some(d) if matches!(self.link, Link::Up) => CutCause::Silent(d),
            Some(_) => CutCause::Handshake("it did not complete in time".into()),
            None => cause,
        };
        self.reading_since = None;
        let decision = match self.link.clone() {
            Link::Waiting => CutDecision::Fail(format!("the source's {channel} {cause}")),
            Link::Away(_) => CutDecision::Ignore,
            Link::Resuming(mut cut) => {
                // The resumed source broke off; QEMU 10.x goes back to postcopy-paused and
                // can resume again.
                cut.attempts += 1;
                cut.resume_at = None;
                let decision = match cut.policy {
                    CutPolicy::Hold => CutDecision::Hold,
                    CutPolicy::PassThrough => CutDecision::PassThrough,
                };
                self.enter_away(cut);
                decision
            }
            Link::Up => {
                if channel == Channel::Preempt && (self.ended || self.preempt_finished()) {
                    CutDecision::Done
                } else if self.ended {
                    if self.shut_sent
                        || self.cfg.on_cut == CutPolicy::PassThrough
                        || self.main.phase() < PostcopyPhase::Running
                    {
                        CutDecision::Done
                    } else {
                        // The destination has everything; the source still waits for its
                        // SHUT, which it gets when it resumes.
                        self.away(channel, cause.clone(), CutPolicy::Hold, now)
                    }
                } else if let Err(refusal) = self.main.can_resume() {
                    CutDecision::Fail(format!(
                        "the source's {channel} {cause}; {refusal}: the migration cannot be \
                         recovered (before postcopy the VM is still whole on the source)"
                    ))
                } else {
                    self.away(channel, cause.clone(), self.cfg.on_cut, now)
                }
            }
        };
        if decision != CutDecision::Ignore {
            self.events.push(LinkEvent::Cut {
                channel,
                cause,
                decision: decision.clone(),
            });
        }
        decision
    }

    fn preempt_finished(&self) -> bool {
        // A 7.2 source ends its preempt channel with EOS; 8.0+ just closes it at the end.
        self.preempt.as_ref().is_some_and(PreemptDecoder::ended)
    }

    fn away(
        &mut self,
        channel: Channel,
        cause: CutCause,
        policy: CutPolicy,
        now: Instant,
    ) -> CutDecision {
        if policy == CutPolicy::Hold && !self.ended {
            // The destination stays inside the section the cut interrupted. A cut that
            // comes before anything was forwarded since the last one finds the decoder
            // between sections, and the earlier close is still owed.
            let close = self.main.close_open_section();
            if !close.is_empty() {
                self.close_section = close;
            }
        }
        self.main
            .resume_after_cut()
            .expect("checked by can_resume, or past the stream's end");
        if policy == CutPolicy::PassThrough
            && let Some(t) = self.tracker.as_mut()
        {
            // The destination drops what was in flight and re-sends its own requests.
            t.clear_pending();
        }
        self.enter_away(Cut {
            at: now,
            channel,
            cause,
            policy,
            queued: 0,
            resume_at: None,
            attempts: 0,
        });
        match policy {
            CutPolicy::Hold => CutDecision::Hold,
            CutPolicy::PassThrough => CutDecision::PassThrough,
        }
    }

    fn enter_away(&mut self, cut: Cut) {
        self.preempt = None;
        self.to_source.clear();
        self.bitmap_in = None;
        self.link = Link::Away(cut);
    }

    /// Whether bytes of source connection generation `epoch` may still be used: after a
    /// cut, what an old connection still delivers belongs to a stream position the
    /// decoder has left (it was reset for the resume).
    fn current(&self, epoch: u64) -> bool {
        epoch == self.epoch && matches!(self.link, Link::Up | Link::Resuming(_))
    }

    /// Whether source connection generation `epoch` is still the one carried (no cut
    /// was declared since): a pump waiting on something else checks it.
    pub fn source_current(&self, epoch: u64) -> bool {
        self.current(epoch)
    }

    /// Bytes from the source's main connection of generation `epoch`.
    pub fn on_source_main(&mut self, epoch: u64, input: &[u8], now: Instant) -> SourceStep {
        let mut step = SourceStep {
            delta: Delta::on(Channel::Main, self.main.phase() >= PostcopyPhase::Listening),
            ..Default::default()
        };
        if !self.current(epoch) {
            step.stale = true;
            return step;
        }
        self.reading_since = None;
        let mut pos = 0;
        let mut opaque = 0u64;
        while pos < input.len() {
            let (len, event) = match self.main.next(&input[pos..]) {
                Ok(Step::Event { len, event, .. }) => (len, event),
                Ok(Step::NeedMore) => break,
                Err(e) => {
                    step.error = Some(e.into());
                    break;
                }
            };
            let action = match self.main_event(&event, len, now, &mut step) {
                Ok(a) => a,
                Err(e) => {
                    step.error = Some(e);
                    break;
                }
            };
            if let Event::Opaque(d) = &event {
                opaque += d.len() as u64;
            }
            if self.marking
                && action == Action::Forward
                && self.main.phase() >= PostcopyPhase::Listening
                && let Event::Ram(rec) = &event
                && let Some(h) = rec.page_header()
            {
                let mark = PageMark {
                    block: h.block,
                    offset: h.offset,
                    continues: h.idstr.is_none(),
                    movable: matches!(rec, RamRecord::Page { .. } | RamRecord::Zero { .. })
                        && !self.main.in_package()
                        && !self.huge_block(h.block),
                    answers: self.answered_last,
                    zero: matches!(rec, RamRecord::Zero { .. }),
                    ends_host_page: self.ends_host_page(h.block, h.offset),
                };
                self.marks.push((pos, len, mark));
            }
            pos += len;
            match action {
                Action::Forward => {
                    if !self.close_section.is_empty() {
                        step.pieces
                            .push(Piece::Inject(std::mem::take(&mut self.close_section)));
                    }
                    push_piece(&mut step.pieces, Piece::Forward(len));
                }
                Action::Skip => push_piece(&mut step.pieces, Piece::Skip(len)),
            }
        }
        step.consumed = pos;
        let forwarded: usize = step
            .pieces
            .iter()
            .map(|p| match p {
                Piece::Forward(n) => *n,
                _ => 0,
            })
            .sum();
        self.stats.channel_bytes(Channel::Main, pos as u64);
        self.stats.opaque_bytes += opaque;
        self.stats.phase = self.stats.phase.max(self.main.phase());
        step.delta.bytes = forwarded as u64;
        step.delta.channel = Some((Channel::Main, self.stats.phase >= PostcopyPhase::Listening));
        step.delta.in_flight = self.tracker.as_ref().map(PageTracker::outstanding_pages);
        step
    }

    /// Bytes from the source's main connection of generation `epoch`, like
    /// [`Self::on_source_main`], but what is to be forwarded is queued for the destination
    /// instead of returned: the consumed bytes leave `buf` (split off, not copied), and
    /// [`Self::take_main_out`] gives them out, requested pages first. The step's pieces
    /// are those that were queued.
    pub fn queue_source_main(
        &mut self,
        epoch: u64,
        buf: &mut BytesMut,
        now: Instant,
    ) -> SourceStep {
        self.marking = true;
        self.marks.clear();
        // Page records are marked from POSTCOPY_LISTEN on; bytes from before may hold
        // records the queue is not told of.
        let unmarked = self.main.phase() < PostcopyPhase::Listening;
        let step = self.on_source_main(epoch, buf, now);
        self.marking = false;
        let mut marks = std::mem::take(&mut self.marks).into_iter().peekable();
        let mut at = 0;
        let last = step.pieces.len().saturating_sub(1);
        for (i, piece) in step.pieces.iter().enumerate() {
            match piece {
                Piece::Forward(n) => {
                    let end = at + n;
                    while let Some(&(pos, len, mark)) = marks.peek().filter(|m| m.0 < end) {
                        marks.next();
                        if pos > at {
                            // What precedes a page record ends between page records only if
                            // the record may move; otherwise say no, which is always safe.
                            self.outbox.push_bytes(
                                buf.split_to(pos - at).freeze(),
                                mark.movable,
                                unmarked,
                            );
                        }
                        self.outbox.push_page(buf.split_to(len).freeze(), mark);
                        at = pos + len;
                    }
                    if end > at {
                        // A page may follow only inside a postcopy RAM section: one
                        // inserted into precopy would go before the discards.
                        let then = i == last
                            && self.main.between_pages()
                            && self.main.phase() >= PostcopyPhase::Listening;
                        self.outbox
                            .push_bytes(buf.split_to(end - at).freeze(), then, unmarked);
                        at = end;
                    }
                }
                Piece::Skip(n) => {
                    buf.advance(*n);
                    at += n;
                }
                Piece::Inject(bytes) => {
                    self.outbox
                        .push_bytes(bytes::Bytes::from(bytes.clone()), false, false)
                }
            }
        }
        step
    }

    /// The next bytes for the destination's main connection, about `max` of them:
    /// requested pages first wherever a page record may stand (see [`outbox`]).
    pub fn take_main_out(&mut self, max: usize) -> Vec<bytes::Bytes> {
        self.outbox.take(max)
    }

    /// The next records for the sidecar's own preempt connection to the destination,
    /// about `max` bytes: requested pages taken out of the main queue, each named
    /// (see [`outbox`]). Empty without [`SessionConfig::own_preempt`].
    pub fn take_preempt_out(&mut self, max: usize) -> Vec<bytes::Bytes> {
        self.outbox.take_preempt(max)
    }

    /// Whether requested pages wait for the sidecar's own preempt connection.
    pub fn preempt_out_pending(&self) -> bool {
        self.outbox.preempt_pending()
    }

    /// The EOS that ends the sidecar's own preempt channel, once: when the main stream's
    /// EOF was decoded and every page for the destination was given out. A 7.2
    /// destination's preempt thread ends only on it, and it waits for that thread before
    /// it completes; a later one takes it as a pre-7.2-style source's end.
    pub fn take_own_preempt_eos(&mut self) -> Option<bytes::Bytes> {
        if !self.cfg.own_preempt
            || self.own_preempt_ended
            || !self.ended
            || !self.outbox.is_empty()
            || self.outbox.preempt_pending()
        {
            return None;
        }
        self.own_preempt_ended = true;
        let mut eos = Vec::new();
        RamRecord::Eos.encode(&mut eos);
        Some(bytes::Bytes::from(eos))
    }

    /// Whether the sidecar's own preempt channel was given its EOS (nothing more goes
    /// there).
    pub fn own_preempt_ended(&self) -> bool {
        self.own_preempt_ended
    }

    /// Bytes queued for the destination's main connection.
    pub fn main_queued_bytes(&self) -> usize {
        self.outbox.queued_bytes()
    }

    /// Whether the main pump may read more from the source with `read_ahead` the queue's
    /// bound: below it, or below twice it while the source owes an answer to a request
    /// (what the source has buffered ahead of that answer drains into the sidecar, where
    /// the answer can pass it).
    pub fn main_wants_more(&self, read_ahead: usize) -> bool {
        // Zero-page records are a few bytes each: bounded by bytes alone, a queue of them
        // held back behind data pages could grow with the guest's RAM.
        if self.outbox.queued_units() >= self.cfg.max_queued_units {
            return false;
        }
        let queued = self.outbox.queued_bytes();
        let owed = self
            .tracker
            .as_ref()
            .is_some_and(|t| t.outstanding_pages() > 0);
        queued < read_ahead || (self.cfg.requests_first && owed && queued < 2 * read_ahead)
    }

    /// A new destination main connection replaces the one the queue was meant for: what
    /// was queued is dropped (the destination's received bitmap says what arrived).
    pub fn main_destination_changed(&mut self) {
        self.outbox.reset();
    }

    /// What the main channel's queue did.
    pub fn outbox_figures(&self) -> OutboxFigures {
        self.outbox.figures()
    }

    /// Decides about one main-stream event and applies it to the state.
    fn main_event(
        &mut self,
        event: &Event<'_>,
        len: usize,
        now: Instant,
        step: &mut SourceStep,
    ) -> Result<Action, SessionError> {
        let handshake = matches!(&self.link, Link::Resuming(c) if c.policy == CutPolicy::Hold);
        if handshake {
            return self.hold_handshake(event, now);
        }
        if self.ended {
            // A source resumed after its stream ended: the destination has it all; the
            // source only needs to finish and get its SHUT.
            if matches!(event, Event::Eof)
                && !self.shut_sent
                && let Some(v) = self.shut
            {
                RpMessage::Shut(v).encode(&mut self.to_source);
                self.shut_sent = true;
            }
            return Ok(Action::Skip);
        }
        let postcopy = self.main.phase() >= PostcopyPhase::Listening;
        match event {
            Event::Ram(rec) => {
                if let Some(h) = rec.page_header() {
                    let zero = matches!(rec, RamRecord::Zero { .. });
                    self.deliver(h.block, h.offset, zero, postcopy, len, rec, now, step);
                } else if *rec == RamRecord::Eos && !self.layout_published {
                    self.publish_layout();
                    step.layout_ready = true;
                } else if let RamRecord::Block(b) = rec
                    && b.page_size
                        .is_some_and(|ps| ps > self.main.target_page_size())
                    && let Some(id) = self.main.layout().find(b.idstr)
                    && !self.huge_block(id)
                    && let Some(ps) = b.page_size
                {
                    self.huge_blocks.push((id, ps));
                }
            }
            Event::Command(Command::PostcopyAdvise(_)) if self.cfg.no_postcopy.is_some() => {
                return Err(SessionError::Unsupported(
                    self.cfg.no_postcopy.unwrap_or_default(),
                ));
            }
            Event::Command(Command::EnableColo) => {
                // Refused before a byte of it reaches the destination: COLO sends
                // checkpoints after the stream's end, which the sidecar does not carry
                // (protocol-spec/versions.md#versions-after-10-0).
                return Err(SessionError::Unsupported(
                    "the source sent ENABLE_COLO: COLO (x-colo) checkpoints are not relayed by \
                     the sidecar; migrate without x-colo",
                ));
            }
            Event::Command(c) => {
                self.stats.command(c.name(), now, self.main.phase());
                match c {
                    Command::PostcopyRamDiscard { block, .. } => {
                        if !self.layout_published {
                            self.publish_layout();
                            step.layout_ready = true;
                        }
                        self.discard(block, c);
                    }
                    Command::PostcopyResume => {
                        // Pass-through: the destination answers; its RESUME_ACK completes
                        // the recovery (see on_destination_rp).
                    }
                    _ => {}
                }
            }
            Event::Eof => {
                self.ended = true;
                step.ended = true;
                self.stats.milestones.entry("eof").or_insert(now);
            }
            _ => {}
        }
        Ok(Action::Forward)
    }

    /// The recovery handshake of a resumed source, answered by the sidecar for a held
    /// destination (protocol-spec/postcopy-sequence.md#sequence-hold).
    fn hold_handshake(&mut self, event: &Event<'_>, now: Instant) -> Result<Action, SessionError> {
        let bad = |what: String| SessionError::Resume {
            conn: self.conns,
            what,
        };
        match event {
            Event::Command(Command::RecvBitmap { block }) => {
                let t = self
                    .tracker
                    .as_ref()
                    .ok_or_else(|| bad("RECV_BITMAP before the block table is known".into()))?;
                let b = t.block_index(block).ok_or_else(|| {
                    bad(format!(
                        "RECV_BITMAP for block {:?}, which this migration does not have",
                        String::from_utf8_lossy(block)
                    ))
                })?;
                let bitmap = t.received_bitmap(b).expect("a known block");
                RpMessage::RecvBitmap { block }.encode(&mut self.to_source);
                RpMessage::BitmapSize(bitmap.len() as u64).encode(&mut self.to_source);
                RpMessage::BitmapData(&bitmap).encode(&mut self.to_source);
                RpMessage::BitmapEnd.encode(&mut self.to_source);
                self.stats.command("RECV_BITMAP", now, self.main.phase());
                Ok(Action::Skip)
            }
            Event::Command(Command::PostcopyResume) => {
                self.stats
                    .command("POSTCOPY_RESUME", now, self.main.phase());
                if self.ended {
                    self.resumed_after_end(now);
                } else {
                    self.resumed(now);
                }
                Ok(Action::Skip)
            }
            other => Err(bad(format!(
                "expected RECV_BITMAP or POSTCOPY_RESUME, got {}",
                describe(other)
            ))),
        }
    }

    /// RESUME_ACK, then every unanswered request again (the first names its block: the
    /// source's previous requested block is not reset by a resume), then postcopy runs.
    fn resumed(&mut self, now: Instant) {
        RpMessage::ResumeAck(1).encode(&mut self.to_source);
        let mut reissued = 0;
        if let Some(t) = self.tracker.as_mut() {
            let tps = t.target_page_size();
            let names: Vec<Vec<u8>> = t
                .block_figures()
                .iter()
                .map(|b| b.name.as_bytes().to_vec())
                .collect();
            for (b, offset) in t.pending_pages() {
                RpMessage::ReqPagesId {
                    start: offset,
                    len: tps as u32,
                    block: &names[b],
                }
                .encode(&mut self.to_source);
                t.forwarded_message();
                reissued += 1;
            }
        }
        self.finish_recovery(now, reissued);
    }

    fn resumed_after_end(&mut self, now: Instant) {
        RpMessage::ResumeAck(1).encode(&mut self.to_source);
        self.finish_recovery(now, 0);
    }

    fn finish_recovery(&mut self, now: Instant, reissued: u64) {
        let Link::Resuming(cut) = std::mem::replace(&mut self.link, Link::Up) else {
            return;
        };
        let resume_at = cut.resume_at.unwrap_or(now);
        let ms = |d: Duration| d.as_millis() as u64;
        let r = Recovery {
            mode: cut.policy.name(),
            channel: cut.channel.short().to_string(),
            cause: cut.cause.to_string(),
            cut_at_ms: ms(cut.at.saturating_duration_since(self.stats.started)),
            source_gone_ms: ms(resume_at.saturating_duration_since(cut.at)),
            handshake_ms: ms(now.saturating_duration_since(resume_at)),
            total_ms: ms(now.saturating_duration_since(cut.at)),
            requests_queued: cut.queued,
            requests_reissued: reissued,
            failed_attempts: cut.attempts,
        };
        self.recoveries.push(r.clone());
        self.events.push(LinkEvent::Recovered(r));
    }

    #[allow(clippy::too_many_arguments)]
    fn deliver(
        &mut self,
        block: usize,
        offset: u64,
        zero: bool,
        postcopy: bool,
        wire_len: usize,
        rec: &RamRecord<'_>,
        now: Instant,
        step: &mut SourceStep,
    ) {
        let mut asked = false;
        self.answered_last = false;
        if let Some(t) = self.tracker.as_mut() {
            let answered = t.delivered(block, offset, zero, now);
            // A prefetched page is a guess: it waits its turn, and a fault on it promotes it.
            self.answered_last = self.cfg.requests_first
                && matches!(answered, Some((_, Origin::Destination | Origin::Guard)));
            if let Some((w, Origin::Destination)) = answered {
                asked = true;
                step.delta.served.push(w);
                self.stats.served += 1;
            }
        }
        self.stats.page(postcopy, zero, wire_len as u64);
        step.delta.page(postcopy, zero);
        if let Some(d) = self.digests.as_mut() {
            let digest = match rec {
                RamRecord::Page { data, .. } => Some(xxhash_rust::xxh3::xxh3_64(data)),
                RamRecord::Zero { .. } => Some(d.zero_digest()),
                _ => None,
            };
            if let Some(digest) = digest {
                d.record(block, offset, digest);
                if postcopy
                    && self.cfg.check_placement
                    && let Some(b) = d.blocks().get(block)
                {
                    self.placement.push(PlacementCheck {
                        block: b.name.clone(),
                        offset,
                        digest,
                        requested: asked,
                    });
                }
            }
        }
    }

    fn discard(&mut self, block: &[u8], c: &Command<'_>) {
        let Some(t) = self.tracker.as_mut() else {
            return;
        };
        let Some(b) = t.block_index(block) else {
            return;
        };
        for (start, len) in c.discard_ranges() {
            t.discarded(b, start, len);
            if let Some(d) = self.digests.as_mut() {
                d.discard(b, start, len);
            }
        }
    }

    fn publish_layout(&mut self) {
        let layout = self.main.layout().clone();
        let tps = self.main.target_page_size();
        self.tracker
            .get_or_insert_with(|| PageTracker::new(&layout, tps));
        if self.cfg.record_digests || self.cfg.check_placement {
            let blocks: Vec<(String, u64)> = layout
                .blocks()
                .iter()
                .map(|b| (String::from_utf8_lossy(&b.name).into_owned(), b.used_length))
                .collect();
            self.digests
                .get_or_insert_with(|| PageDigests::new(&blocks, tps));
        }
        self.outbox.set_block_names(
            layout.blocks().iter().map(|b| b.name.to_vec()).collect(),
            tps,
        );
        self.layout_published = true;
        if self.preempt_used && self.preempt.is_none() {
            self.preempt = Some(PreemptDecoder::new(tps, layout));
        }
    }

    /// Bytes from the source's preempt connection. Until the block table is known (QEMU
    /// 7.2 opens the channel at the very start) nothing is consumed: the caller waits for
    /// a main step with `layout_ready` and calls again.
    pub fn on_source_preempt(&mut self, epoch: u64, input: &[u8], now: Instant) -> SourceStep {
        let mut step = SourceStep {
            delta: Delta::on(Channel::Preempt, true),
            ..Default::default()
        };
        if !self.current(epoch) {
            step.stale = true;
            return step;
        }
        if self.preempt.is_none() {
            return step;
        }
        let mut pos = 0;
        while pos < input.len() {
            let dec = self.preempt.as_mut().expect("checked");
            let (len, rec) = match dec.next(&input[pos..]) {
                Ok(Step::Event { len, event, .. }) => (len, event),
                Ok(Step::NeedMore) => break,
                Err(e) => {
                    step.error = Some(e.into());
                    break;
                }
            };
            if let Some(h) = rec.page_header() {
                let (block, offset) = (h.block, h.offset);
                let zero = matches!(rec, RamRecord::Zero { .. });
                self.deliver(block, offset, zero, true, len, &rec, now, &mut step);
            }
            pos += len;
            push_piece(&mut step.pieces, Piece::Forward(len));
        }
        step.consumed = pos;
        step.delta.bytes = pos as u64;
        step.delta.in_flight = self.tracker.as_ref().map(PageTracker::outstanding_pages);
        self.stats.channel_bytes(Channel::Preempt, pos as u64);
        step
    }

    /// Bytes from multifd channel `init.id` after its initial packet (which the carrier
    /// checked before connecting the destination). Call only once [`Self::layout`] is
    /// known: a packet's pages name a block of the main stream's table. Multifd pages
    /// count as precopy pages: the source sends none after the switch to postcopy
    /// (protocol-spec/multifd.md#multifd-postcopy).
    pub fn on_source_multifd(
        &mut self,
        init: MultifdInit,
        input: &[u8],
        now: Instant,
    ) -> SourceStep {
        let ch = Channel::Multifd(init.id);
        let mut step = SourceStep {
            delta: Delta::on(ch, false),
            ..Default::default()
        };
        let Some((layout, tps)) = self.layout() else {
            return step;
        };
        let mut dec = self
            .multifd
            .remove(&init.id)
            .unwrap_or_else(|| MultifdDecoder::after_init(init, tps, layout));
        let mut pos = 0;
        while pos < input.len() {
            let (len, event) = match dec.next(&input[pos..]) {
                Ok(Step::Event { len, event, .. }) => (len, event),
                Ok(Step::NeedMore) => break,
                Err(e) => {
                    step.error = Some(e.into());
                    break;
                }
            };
            let fig = self.stats.multifd.entry(init.id).or_default();
            fig.packets += 1;
            fig.bytes += len as u64;
            if let MultifdEvent::Ram(p) = &event {
                fig.syncs += u64::from(p.is_sync());
                fig.pages += p.normal_count() as u64;
                fig.zero_pages += p.zero_count() as u64;
                if let Some(block) = p.block {
                    for (offset, data) in p.pages() {
                        let header = PageHeader {
                            offset,
                            idstr: None,
                            block,
                        };
                        let rec = RamRecord::Page { header, data };
                        self.deliver(
                            block,
                            offset,
                            false,
                            false,
                            data.len(),
                            &rec,
                            now,
                            &mut step,
                        );
                    }
                    for offset in p.zero_pages() {
                        let header = PageHeader {
                            offset,
                            idstr: None,
                            block,
                        };
                        let rec = RamRecord::Zero { header };
                        self.deliver(block, offset, true, false, 0, &rec, now, &mut step);
                    }
                }
            }
            pos += len;
            push_piece(&mut step.pieces, Piece::Forward(len));
        }
        self.multifd.insert(init.id, dec);
        step.consumed = pos;
        step.delta.bytes = pos as u64;
        self.stats.channel_bytes(ch, pos as u64);
        step
    }

    /// The destination was set up without postcopy (see [`SessionConfig::no_postcopy`]).
    pub fn refuse_postcopy(&mut self, why: &'static str) {
        self.cfg.no_postcopy = Some(why);
    }

    /// Multifd channel `init.id` is connected to the destination, its initial packet
    /// forwarded.
    pub fn multifd_connected(&mut self, init: MultifdInit) {
        let fig = self.stats.multifd.entry(init.id).or_default();
        fig.bytes += multifd::INIT_LEN as u64;
        self.stats
            .channel_bytes(Channel::Multifd(init.id), multifd::INIT_LEN as u64);
    }

    /// Judges the end of multifd channel `id`: clean only between packets.
    pub fn finish_multifd(&mut self, id: u8, rest: &[u8]) -> Result<(), SessionError> {
        match self.multifd.get_mut(&id) {
            Some(d) => d.finish(rest).map_err(Into::into),
            None if rest.is_empty() => Ok(()),
            None => Err(DecodeError {
                channel: Channel::Multifd(id),
                offset: multifd::INIT_LEN as u64,
                kind: ErrorKind::Truncated("a multifd packet"),
            }
            .into()),
        }
    }

    /// The source closed multifd channel `id` with `rest` unconsumed: what that means.
    /// Once postcopy runs, multifd carries nothing more (pages travel on main and preempt,
    /// and a resumed source opens no multifd channel: `migration.c:migration_connect`
    /// returns for a resume before `multifd_send_setup`, `[S8.x]`), so a channel that a
    /// cut ended even inside a packet is only lost; before that it fails the migration.
    pub fn multifd_closed(&mut self, id: u8, rest: &[u8]) -> MultifdEnd {
        match self.finish_multifd(id, rest) {
            Ok(()) => MultifdEnd::Clean,
            Err(_) if self.main.phase() >= PostcopyPhase::Running => MultifdEnd::Lost,
            Err(e) => MultifdEnd::Failed(e),
        }
    }

    /// Whether preempt bytes of connection generation `epoch` can be decoded now (false
    /// until the block table is known; true for a stale connection, whose bytes
    /// [`Self::on_source_preempt`] then refuses).
    pub fn preempt_ready(&self, epoch: u64) -> bool {
        self.preempt.is_some() || !self.current(epoch)
    }

    /// The source closed its main connection: judges whether the stream is complete (a
    /// precopy stream may end in device state whose EOF is recognised only from the end,
    /// protocol-spec/device-state.md#device-state-opaque). Returns true if it is.
    pub fn finish_main(&mut self, epoch: u64, rest: &[u8], now: Instant) -> bool {
        if !self.current(epoch) {
            return false;
        }
        if self.ended {
            return rest.is_empty();
        }
        if !matches!(self.link, Link::Up) {
            return false;
        }
        match self.main.clone().finish(rest) {
            Ok(_) => {
                self.ended = true;
                self.stats.milestones.entry("eof").or_insert(now);
                true
            }
            Err(_) => false,
        }
    }

    /// The source closed its preempt connection: returns whether it ended between
    /// records. Either way it is a lost link, never a fatal error: a cut lands anywhere,
    /// the unfinished record's bytes were never forwarded, and the resumed source sends
    /// the page again on a fresh connection (preempt.md#preempt-channel).
    pub fn finish_preempt(&mut self, rest: &[u8]) -> bool {
        match self.preempt.as_mut() {
            Some(d) => d.finish(rest).is_ok(),
            None => rest.is_empty(),
        }
    }

    /// Bytes from the destination's return path.
    pub fn on_destination_rp(&mut self, input: &[u8], now: Instant) -> RpStep {
        let mut step = RpStep {
            delta: Delta::on(
                Channel::ReturnPath,
                self.stats.phase >= PostcopyPhase::Listening,
            ),
            ..Default::default()
        };
        let mut pos = 0;
        while pos < input.len() {
            let (len, msg) = match self.rp.next(&input[pos..]) {
                Ok(Step::Event { len, event, .. }) => (len, event),
                Ok(Step::NeedMore) => break,
                Err(e) => {
                    step.error = Some(e.into());
                    break;
                }
            };
            let raw = &input[pos..pos + len];
            pos += len;
            match &msg {
                RpMessage::ReqPagesId { start, len, block } => {
                    let block = block.to_vec();
                    self.request(&block, *start, *len, now, &mut step.delta);
                }
                RpMessage::ReqPages { start, len } => {
                    let block = self.rp.last_block().unwrap_or_default().to_vec();
                    self.request(&block, *start, *len, now, &mut step.delta);
                }
                other => {
                    self.stats.rp_message(other.name());
                    self.control_from_destination(other, raw, now, &mut step.delta);
                }
            }
        }
        step.consumed = pos;
        self.stats.channel_bytes(Channel::ReturnPath, pos as u64);
        step.delta.bytes = pos as u64;
        step.delta.in_flight = self.tracker.as_ref().map(PageTracker::outstanding_pages);
        step
    }

    /// A return-path message other than a request.
    fn control_from_destination(
        &mut self,
        msg: &RpMessage<'_>,
        raw: &[u8],
        now: Instant,
        delta: &mut Delta,
    ) {
        match msg {
            RpMessage::Pong(2) => delta.pong2 = true,
            RpMessage::Shut(v) => {
                self.shut = Some(*v);
                if !matches!(self.link, Link::Up) {
                    return; // given to the source when it is back
                }
                self.shut_sent = true;
            }
            RpMessage::RecvBitmap { block } => {
                let b = self.tracker.as_ref().and_then(|t| t.block_index(block));
                self.bitmap_in = Some(BitmapIn {
                    block: b,
                    name: block.to_vec(),
                    expected: None,
                    data: Vec::new(),
                });
            }
            RpMessage::BitmapSize(n) => {
                if let Some(bi) = self.bitmap_in.as_mut() {
                    bi.expected = Some(*n);
                }
            }
            RpMessage::BitmapData(d) => {
                if let Some(bi) = self.bitmap_in.as_mut()
                    && (bi.data.len() + d.len()) as u64 <= bi.expected.unwrap_or(0)
                {
                    bi.data.extend_from_slice(d);
                }
            }
            RpMessage::BitmapEnd => {
                if let (Some(bi), Some(t)) = (self.bitmap_in.take(), self.tracker.as_mut()) {
                    match bi.block {
                        Some(b) => {
                            let n = t.load_received_bitmap(b, &bi.data);
                            tracing::info!(
                                block = %String::from_utf8_lossy(&bi.name),
                                received = n,
                                "rebuilt delivered pages from the destination's bitmap"
                            );
                        }
                        None => tracing::warn!(
                            block = %String::from_utf8_lossy(&bi.name),
                            "a received bitmap for a block the sidecar does not know"
                        ),
                    }
                }
            }
            RpMessage::ResumeAck(_) => {
                if let Link::Resuming(c) = &self.link
                    && c.policy == CutPolicy::PassThrough
                {
                    self.to_source.extend_from_slice(raw);
                    self.finish_recovery(now, 0);
                    return;
                }
            }
            _ => {}
        }
        if matches!(self.link, Link::Up)
            || matches!(&self.link, Link::Resuming(c) if c.policy == CutPolicy::PassThrough)
        {
            self.to_source.extend_from_slice(raw);
        }
    }

    /// A page request from the destination: recorded, and asked of the source only if
    /// the stream will not bring the page anyway. While the source is away (or its resume
    /// handshake runs) nothing is sent; the page stays pending and is asked again after
    /// the resume.
    fn request(&mut self, block: &[u8], start: u64, len: u32, now: Instant, delta: &mut Delta) {
        delta.request_messages += 1;
        let up = matches!(self.link, Link::Up);
        if let Link::Away(c) | Link::Resuming(c) = &mut self.link {
            c.queued += 1;
        }
        let Some(t) = self.tracker.as_mut() else {
            self.stats.request(now, up, 0);
            if up {
                RpMessage::ReqPagesId { start, len, block }.encode(&mut self.to_source);
            }
            return;
        };
        let checked = match t.block_index(block) {
            Some(b) => t.check_request(b, start, u64::from(len)).map(|()| b),
            None => {
                t.refused_unknown_block();
                Err(format!(
                    "block {:?} was never announced",
                    String::from_utf8_lossy(block)
                ))
            }
        };
        let b = match checked {
            Ok(b) => b,
            Err(why) => {
                let n = t.request_figures().refused_messages;
                if n.is_power_of_two() {
                    tracing::warn!(
                        refused = n,
                        "refused a page request of the destination: {why}"
                    );
                }
                return;
            }
        };
        let decisions = t.requested(b, start, u64::from(len), now);
        let mut promoted = false;
        if self.cfg.requests_first {
            for (offset, d) in &decisions {
                // False when the page already left the queue: nothing to hurry.
                promoted |=
                    *d == RequestDecision::AlreadyDelivered && self.outbox.promote(b, *offset);
            }
        }
        let forward = decisions
            .iter()
            .any(|(_, d)| *d == RequestDecision::Forward);
        for (_, d) in &decisions {
            delta.requested(*d);
        }
        // Prefetch in whole units of the request (the destination asks whole host pages;
        // a preempt source insists on multiples of them), never more than
        // PREFETCH_BYTES per request.
        let tps = t.target_page_size();
        let unit = u64::from(len);
        let aligned =
            self.cfg.prefetch && unit > 0 && unit.is_multiple_of(tps) && start.is_multiple_of(unit);
        let most = if aligned && up {
            PREFETCH_BYTES / unit
        } else {
            0
        };
        let most_queued = if aligned && self.cfg.requests_first {
            QUEUE_WINDOW_BYTES / unit
        } else {
            0
        };
        if forward && up {
            let mut ahead = 0;
            if most > 0 {
                let want = self.prefetch.on_miss(b, start / unit).min(most);
                ahead = t.claim_ahead(b, (start + unit) / tps, unit / tps, want, now);
                self.prefetch.asked(b, start / unit + 1, ahead);
            }
            t.forwarded_message();
            RpMessage::ReqPagesId {
                start,
                // At most PREFETCH_BYTES more than a request of at most PREFETCH_BYTES.
                len: (unit * (1 + ahead)) as u32,
                block,
            }
            .encode(&mut self.to_source);
        } else if promoted && most_queued > 0 {
            // A fault the sidecar's queue answers: the pages after it that are queued too
            // go with it while the guest walks in order (the source is not asked, so its
            // scan does not follow the fault as it would without the sidecar).
            let window = self.prefetch.on_miss(b, start / unit).min(most_queued);
            for page in (start + unit) / tps..(start + unit * (1 + window)) / tps {
                let _ = self.outbox.send_ahead(b, page * tps);
            }
        } else if (most > 0 || most_queued > 0)
            && let Some((first, want)) = self.prefetch.on_hit(b, start / unit)
        {
            // The guest reads into the window asked last: send what of the next window is
            // queued, and ask the source for the rest now.
            for page in first * unit / tps..(first + want.min(most_queued)) * unit / tps {
                let _ = self.outbox.send_ahead(b, page * tps);
            }
            let ahead = t.claim_ahead(b, first * unit / tps, unit / tps, want.min(most), now);
            self.prefetch.asked(b, first, ahead);
            if ahead > 0 {
                t.prefetch_message();
                RpMessage::ReqPagesId {
                    start: first * unit,
                    len: (unit * ahead) as u32,
                    block,
                }
                .encode(&mut self.to_source);
            }
        }
        self.stats
            .request(now, forward && up, decisions.len() as u64);
    }

    /// The sidecar's own guarded reader needs `len` bytes at `offset` of `block`: a target
    /// page, or a whole huge page, asked for as the destination itself asks for one
    /// (protocol-spec/guarded-access.md#guard-faults).
    pub fn guard_wants(&mut self, block: &str, offset: u64, len: u64, now: Instant) {
        let up = matches!(self.link, Link::Up);
        let Some(t) = self.tracker.as_mut() else {
            return;
        };
        let Some(b) = t.block_index(block.as_bytes()) else {
            return;
        };
        // Never past the block's end: no QEMU asks for that, and a source refuses it.
        let room = t.block_length(b).unwrap_or(0).saturating_sub(offset);
        let len = len.max(t.target_page_size()).min(room);
        if len == 0 {
            return;
        }
        if t.guard_requested(b, offset, len, now) == RequestDecision::Forward && up {
            RpMessage::ReqPagesId {
                start: offset,
                len: len as u32,
                block: block.as_bytes(),
            }
            .encode(&mut self.to_source);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Forward,
    Skip,
}

fn push_piece(pieces: &mut Vec<Piece>, p: Piece) {
    match (pieces.last_mut(), &p) {
        (Some(Piece::Forward(a)), Piece::Forward(b)) => *a += b,
        (Some(Piece::Skip(a)), Piece::Skip(b)) => *a += b,
        _ => pieces.push(p),
    }
}

fn describe(e: &Event<'_>) -> String {
    match e {
        Event::Command(c) => format!("command {}", c.name()),
        other => other.kind_name().to_string(),
    }
}

#[cfg(test)]
mod tests;
