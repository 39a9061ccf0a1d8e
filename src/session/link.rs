//! The state of the source link, and the record of every cut and recovery.
//!
//! In postcopy the VM's memory is split between the two hosts, so the source link is the
//! VM's lifeline. The sidecar treats its loss in one of two ways
//! (protocol-spec/postcopy-sequence.md#sequence-hold):
//! - **hold**: the destination's connections stay open and it never notices; the sidecar
//!   answers the resumed source's handshake itself;
//! - **pass-through**: the destination pauses too, and QEMU's own recovery runs through
//!   the sidecar, which rebuilds its view from the destination's received bitmaps.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::wire::Channel;

/// What to do when the source link breaks after the destination runs the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CutPolicy {
    /// Keep the destination's connections open and answer the resumed source's recovery
    /// handshake from the sidecar's own record: the destination never notices.
    #[default]
    Hold,
    /// Close the destination's connections too, so it pauses, and relay QEMU's own
    /// recovery handshake both ways when its manager recovers it.
    PassThrough,
}

impl CutPolicy {
    /// Name used in reports and metrics.
    pub fn name(self) -> &'static str {
        match self {
            CutPolicy::Hold => "hold",
            CutPolicy::PassThrough => "pass-through",
        }
    }
}

/// How a source channel was lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CutCause {
    /// The source closed the connection (EOF) before the stream ended.
    Closed,
    /// The socket failed (reset, keepalive or user timeout).
    Failed(String),
    /// Nothing arrived for this long while the sidecar was ready to read.
    Silent(Duration),
    /// The resumed source broke the recovery handshake.
    Handshake(String),
}

impl std::fmt::Display for CutCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CutCause::Closed => write!(f, "closed by the source"),
            CutCause::Failed(e) => write!(f, "failed: {e}"),
            CutCause::Silent(d) => write!(f, "source silent for {:.1} s", d.as_secs_f64()),
            CutCause::Handshake(e) => write!(f, "recovery handshake broken: {e}"),
        }
    }
}

/// A cut in progress.
#[derive(Debug, Clone)]
pub(crate) struct Cut {
    pub at: Instant,
    pub channel: Channel,
    pub cause: CutCause,
    pub policy: CutPolicy,
    /// Request messages from the destination while the source was away.
    pub queued: u64,
    /// When the resume connection arrived.
    pub resume_at: Option<Instant>,
    /// Resume attempts that broke off before completing.
    pub attempts: u32,
}

/// Where the source link stands.
#[derive(Debug, Clone)]
pub(crate) enum Link {
    /// No source connection yet.
    Waiting,
    /// Carrying the migration.
    Up,
    /// The source is gone; the destination is held (policy hold) or paused (policy
    /// pass-through); waiting for a resume connection.
    Away(Cut),
    /// A resume connection arrived and its handshake runs.
    Resuming(Cut),
}

/// One cut of the source link and how the migration came back from it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Recovery {
    /// `hold` or `pass-through`.
    pub mode: &'static str,
    /// The channel whose loss was noticed first.
    pub channel: String,
    /// Why it was lost.
    pub cause: String,
    /// When, in ms since the sidecar accepted the source.
    pub cut_at_ms: u64,
    /// Cut → the resume connection arrived (the operator's or manager's part).
    pub source_gone_ms: u64,
    /// Resume connection → postcopy running again (the handshake).
    pub handshake_ms: u64,
    /// Cut → postcopy running again.
    pub total_ms: u64,
    /// Request messages the destination sent while the source was away (held mode: the
    /// faulting vCPUs simply waited).
    pub requests_queued: u64,
    /// Pages asked of the resumed source at once (every request still unanswered).
    pub requests_reissued: u64,
    /// Resume connections that broke off before this one succeeded.
    pub failed_attempts: u32,
}

/// What the I/O layer must do after a source channel was lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CutDecision {
    /// The stream was complete: nothing is lost, carry on towards the end.
    Done,
    /// Keep the destination's connections; wait for the source to resume.
    Hold,
    /// Close the destination's connections (it pauses); wait for both ends to recover.
    PassThrough,
    /// Already away: this is the other channel of the same cut.
    Ignore,
    /// The migration cannot continue; the reason says why (before postcopy, the VM is
    /// still whole on the source).
    Fail(String),
}

/// The link as the live view, the report and metrics show it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LinkView {
    /// `waiting`, `up`, `away` or `resuming`.
    pub state: &'static str,
    /// For `away` and `resuming`: since when, in s, and why.
    pub away_for_s: Option<f64>,
    /// Why the source is away.
    pub cause: Option<String>,
    /// While up: how long the source has been silent, in s (the idle rule's clock).
    pub silent_for_s: f64,
}
