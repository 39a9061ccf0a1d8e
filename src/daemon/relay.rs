//! The data path's I/O: pumps that read a channel, hand the bytes to the [`Session`] and
//! do what it says. Nothing here decides anything: the pumps only read, write and report
//! that a connection ended; the carrier ([`super::carry`]) decides what to do about it.
//!
//! Bytes reach the destination as slices of the read buffer (`BytesMut::split_to`),
//! never copied in user space. A pump outlives the source connection it reads: after a
//! cut it waits for the next one (a resumed source), keeping the destination's
//! connection, which is what lets a held destination never notice.
//!
//! The main channel's pump reads the source ahead, up to [`Relay::read_ahead`] bytes queued
//! in the session (twice that while the source owes an answer to a request), and gives the
//! destination what the session hands out, requested pages first
//! (protocol-spec/postcopy-sequence.md#sequence-requests-first). With a preempt connection
//! of the sidecar's own to the destination (`--own-preempt`), the same pump writes the
//! requested pages there, ahead of everything on main, and ends that channel with EOS
//! (postcopy-sequence.md#sequence-own-preempt).

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use std::collections::VecDeque;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use super::metrics::Metrics;
use crate::guard::{GuardedRam, Phase};
use crate::session::{CutCause, Delta, MultifdEnd, Piece, Session, SessionError};
use crate::verify::placement::PlacementVerifier;
use crate::wire::{Channel, MultifdInit, PostcopyPhase};

/// Read size per socket read: small enough that bulk pages never pile up in the sidecar
/// ahead of an urgent one (reference: head-of-line blocking behind a relay's buffers).
pub const READ_CHUNK: usize = 64 * 1024;

/// What the main channel reads ahead of the destination by default: enough to take the
/// source's socket buffers and a burst of bulk pages, so a requested page is often in
/// the sidecar already; small next to any guest it carries.
pub const DEFAULT_READ_AHEAD: usize = 32 << 20;

/// Bytes the main pump takes from the queue at once: what a promoted page may find ahead
/// of it in the pump's hands.
const WRITE_BATCH: usize = 64 * 1024;

/// A readable half of a connection.
pub type Reader = Box<dyn AsyncRead + Send + Unpin>;
/// A writable half of a connection.
pub type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// Why a channel stopped carrying data.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Bytes that do not decode, or a resume the session refused; nothing from the bad
    /// record on was forwarded.
    #[error("{0}")]
    Session(#[from] SessionError),
    /// A socket failed.
    #[error("{channel} {side}: {source}")]
    Io {
        /// Channel.
        channel: Channel,
        /// "reading from the source" etc.
        side: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// The destination sent bytes on a channel where it never sends any.
    #[error("destination sent {bytes} unexpected bytes on the {channel}")]
    UnexpectedDestinationData {
        /// The channel (preempt or multifd).
        channel: Channel,
        /// How many bytes one read returned.
        bytes: usize,
    },
}

/// What a pump tells the carrier.
#[derive(Debug)]
pub enum PumpReport {
    /// A source connection (of generation `epoch`) ended or failed.
    SourceLost {
        /// Its channel.
        channel: Channel,
        /// Why.
        cause: CutCause,
        /// The source connection generation it belonged to.
        epoch: u64,
    },
    /// A destination connection ended or failed.
    DestinationLost {
        /// Its channel.
        channel: Channel,
        /// Why (`None`: a clean close).
        error: Option<std::io::Error>,
    },
}

/// The source's return path: the write half of its current main connection, tagged with
/// its generation so that bytes made for an earlier connection are never sent on a later
/// one (they are requests, which the session asks again after a resume).
#[derive(Default)]
pub struct SourceTx {
    w: tokio::sync::Mutex<Option<(u64, Writer)>>,
}

impl SourceTx {
    /// Makes `w` the return path of source connection generation `epoch`.
    pub async fn install(&self, epoch: u64, w: Writer) {
        *self.w.lock().await = Some((epoch, w));
    }

    /// Forgets the current return path (the source link was cut).
    pub async fn clear(&self) {
        *self.w.lock().await = None;
    }
}

/// What the pumps of one migration share.
pub struct Relay {
    /// The I/O-free core.
    pub session: Mutex<Session>,
    /// Where bytes for the source go.
    pub source: SourceTx,
    /// Prometheus metrics, when served.
    pub metrics: Option<Arc<Metrics>>,
    /// The guarded mapping of the destination's RAM, when the receiver guards it.
    pub guard: OnceLock<Arc<GuardedRam>>,
    /// Checks of postcopy pages right after placement.
    pub placement: Mutex<Option<PlacementVerifier>>,
    /// Becomes true once the RAM block table is known (the preempt channel waits for it).
    pub layout_ready: watch::Sender<bool>,
    /// Pumps' reports to the carrier.
    pub reports: mpsc::UnboundedSender<PumpReport>,
    /// Main-stream bytes the reader may queue ahead of the destination.
    pub read_ahead: usize,
    /// Woken when a request promoted a queued page, so the main pump writes it on its own
    /// preempt connection at once instead of after its current main batch.
    pub promoted: tokio::sync::Notify,
}

impl Relay {
    /// A relay around `session`; pump reports go to `reports`.
    pub fn new(
        session: Session,
        metrics: Option<Arc<Metrics>>,
        reports: mpsc::UnboundedSender<PumpReport>,
    ) -> Relay {
        Relay {
            session: Mutex::new(session),
            source: SourceTx::default(),
            metrics,
            guard: OnceLock::new(),
            placement: Mutex::new(None),
            layout_ready: watch::Sender::new(false),
            reports,
            read_ahead: DEFAULT_READ_AHEAD,
            promoted: tokio::sync::Notify::new(),
        }
    }

    /// Runs `f` on the session.
    pub fn with<T>(&self, f: impl FnOnce(&mut Session) -> T) -> T {
        f(&mut self.session.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Sends what the session has for the source, on the source's current connection if
    /// it is of the generation the bytes were made for. Taking and writing happen under
    /// the writer's lock, so the source gets them in the order the session made them.
    pub async fn flush_to_source(&self) {
        // Every step that may have promoted a queued page ends here: the main pump writes
        // it on its own preempt connection at once.
        if self.with(|s| s.preempt_out_pending()) {
            self.promoted.notify_one();
        }
        let mut w = self.source.w.lock().await;
        let (epoch, bytes) = self.with(Session::take_to_source);
        if bytes.is_empty() {
            return;
        }
        // Flushed too: a TLS writer may keep the tail of a write in its session buffer
        // when the socket was full, and the source would wait for it forever.
        if let Some((e, writer)) = w.as_mut()
            && *e == epoch
            && (writer.write_all(&bytes).await.is_err() || writer.flush().await.is_err())
        {
            // The source's reading pump sees the same broken socket and reports it.
            *w = None;
        }
    }

    /// Passes a step's counters to metrics and its effects to the guard and verifier.
    pub fn apply(&self, delta: &Delta) {
        if let Some(g) = self.guard.get() {
            if delta.pong2 {
                // The destination loaded everything before the switch to postcopy.
                g.set_phase(Phase::Postcopy);
            }
            if delta.delivered {
                g.poke();
            }
        }
        let checks = self.with(Session::take_placement_checks);
        if !checks.is_empty()
            && let Some(p) = self
                .placement
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
        {
            for c in checks {
                p.check(c);
            }
        }
        if let Some(m) = &self.metrics {
            m.apply(delta);
        }
    }

    fn report(&self, r: PumpReport) {
        let _ = self.reports.send(r);
    }
}

fn io_err(channel: Channel, side: &'static str) -> impl FnOnce(std::io::Error) -> RelayError {
    move |source| RelayError::Io {
        channel,
        side,
        source,
    }
}

/// Size of one read buffer of the main pump.
const READ_BUFFER: usize = 1 << 20;

/// Most spare read buffers kept for reuse: enough for what the queue may hold.
const SPARE_BUFFERS: usize = 80;

/// The main pump's read buffer. Queued records are slices of it, so a buffer stays alive
/// until its last queued record was written. Reading goes on in a spare buffer whose
/// records are all written, and only allocates when none is free: fresh memory costs a
/// page fault per page read, which on a busy host is felt in the total time.
/// Public so `cargo bench --bench session` feeds the session core as the relay does.
#[derive(Default)]
pub struct ReadBuffer {
    /// The buffer reads go into: the session takes its records off the front.
    pub cur: BytesMut,
    spares: Vec<BytesMut>,
}

impl ReadBuffer {
    /// Makes room for one more read of up to [`READ_CHUNK`] bytes, keeping the bytes not
    /// yet consumed.
    pub fn room(&mut self) {
        if self.cur.capacity() - self.cur.len() >= READ_CHUNK || self.cur.try_reclaim(READ_CHUNK) {
            return;
        }
        // A spare whose records are all written again owns its whole allocation.
        let mut next = match self
            .spares
            .iter_mut()
            .position(|b| b.try_reclaim(READ_BUFFER))
        {
            Some(i) => self.spares.swap_remove(i),
            None => BytesMut::with_capacity(READ_BUFFER),
        };
        // The unconsumed tail is at most an incomplete record.
        next.extend_from_slice(&self.cur);
        let mut old = std::mem::replace(&mut self.cur, next);
        old.clear();
        if self.spares.len() < SPARE_BUFFERS {
            self.spares.push(old);
        }
    }
}

/// Reads at most [`READ_CHUNK`] more bytes into `buf`; 0 means end.
async fn read_more(src: &mut Reader, buf: &mut BytesMut) -> std::io::Result<usize> {
    if buf.capacity() - buf.len() < READ_CHUNK {
        buf.reserve(4 * READ_CHUNK);
    }
    let mut limited = (&mut *src).take(READ_CHUNK as u64);
    limited.read_buf(buf).await
}

/// Applies a step's pieces: forwards slices of `buf`, skips, injects.
async fn apply_pieces(
    dst: &mut Writer,
    buf: &mut BytesMut,
    pieces: Vec<Piece>,
    ch: Channel,
) -> Result<(), RelayError> {
    for p in pieces {
        match p {
            Piece::Forward(n) => {
                let out = buf.split_to(n).freeze();
                dst.write_all(&out)
                    .await
                    .map_err(io_err(ch, "writing to the destination"))?;
            }
            Piece::Skip(n) => buf.advance(n),
            Piece::Inject(bytes) => dst
                .write_all(&bytes)
                .await
                .map_err(io_err(ch, "writing to the destination"))?,
        }
    }
    // A TLS writer may keep the tail of a write in its session buffer when the socket
    // was full (tokio-rustls returns the bytes taken, not the bytes sent): without a
    // flush the stream's last records could wait there forever. A no-op on plain sockets.
    dst.flush()
        .await
        .map_err(io_err(ch, "writing to the destination"))
}

/// A source connection handed to a pump, with a new destination connection when the
/// destination's changed too (a pass-through recovery, or the first connection).
pub struct Feed {
    /// The source connection's readable half.
    pub source: Reader,
    /// Its generation.
    pub epoch: u64,
    /// A new destination connection to write to, if it changed.
    pub destination: Option<Writer>,
    /// With it, a new preempt connection of the sidecar's own to the destination.
    pub own_preempt: Option<OwnPreempt>,
}

/// The write half of a preempt connection the sidecar opened to the destination itself,
/// and where the pump hands it once the channel ended with EOS: the watcher of the
/// connection's read half keeps it open until the destination closes the connection
/// (closing it first would break the destination's preempt thread, and with it main).
pub struct OwnPreempt {
    /// Where requested pages are written.
    pub writer: Writer,
    /// Takes the writer after EOS; see [`watch_own_preempt`].
    pub keep: tokio::sync::oneshot::Sender<Writer>,
}

/// How a pump's source connection ended.
enum Ended {
    /// The connection is gone; wait for the next.
    Lost,
    /// A fatal error.
    Fatal(RelayError),
}

/// Carries the main channel: for each source main connection fed to it (the first, then
/// one per resume) it reads ahead into the session's queue, and it writes what the session
/// hands out to the destination's connection, which outlives source connections. One task
/// does both, waiting on whichever can go on (a hand-off between two tasks per batch costs
/// more than the batch on a busy host). Ends when the carrier closes `feeds` (the stream is
/// complete) and the queue is written, shutting the destination's side down.
pub async fn main_pump(
    relay: Arc<Relay>,
    mut feeds: mpsc::Receiver<Feed>,
) -> Result<(), RelayError> {
    let ch = Channel::Main;
    let mut dst: Option<Writer> = None;
    // The sidecar's own preempt connection, and what was taken for it and is being written.
    let mut pre: Option<OwnPreempt> = None;
    let mut pout: VecDeque<Bytes> = VecDeque::new();
    let mut src: Option<(Reader, u64)> = None;
    let mut rb = ReadBuffer::default();
    // Taken from the session's queue and being written.
    let mut out: VecDeque<Bytes> = VecDeque::new();
    let mut unflushed = false;
    let mut fatal: Option<RelayError> = None;
    let mut ended = false;
    loop {
        if pout.is_empty() && pre.is_some() && fatal.is_none() {
            relay.with(|s| {
                pout.extend(s.take_preempt_out(WRITE_BATCH));
                if pout.is_empty()
                    && let Some(eos) = s.take_own_preempt_eos()
                {
                    pout.push_back(eos);
                }
            });
        }
        // Requested pages go out before anything else, whole: the preempt connection
        // carries a few pages at a time, so its socket buffer is seldom full.
        if !pout.is_empty()
            && let Some(p) = pre.as_mut()
        {
            // One vectored write for the lot where the socket takes it: the destination's
            // preempt thread then wakes once for whole records, not once per piece.
            let written = async {
                while !pout.is_empty() {
                    match write_opt(Some(&mut p.writer), &pout).await? {
                        0 => return Err(std::io::ErrorKind::WriteZero.into()),
                        n => advance(&mut pout, n),
                    }
                }
                p.writer.flush().await
            }
            .await;
            if let Err(e) = written {
                own_preempt_lost(&relay, &mut pre, &mut pout, e);
            }
            continue;
        }
        if out.is_empty() && dst.is_some() {
            out.extend(relay.with(|s| s.take_main_out(WRITE_BATCH)));
            // That may have been the stream's last bytes: the own preempt channel's EOS
            // goes out before them. An 8.0+ destination shuts that connection down as
            // soon as it has read main's EOF (`postcopy_ram_incoming_cleanup`), so an EOS
            // written after them may meet a closed socket (EPIPE).
            if pout.is_empty()
                && pre.is_some()
                && fatal.is_none()
                && let Some(eos) = relay.with(|s| s.take_own_preempt_eos())
            {
                pout.push_back(eos);
                continue;
            }
        }
        if out.is_empty()
            && unflushed
            && let Some(d) = dst.as_mut()
        {
            // A TLS writer may keep the tail of a write in its session buffer when the
            // socket was full (tokio-rustls returns the bytes taken, not the bytes sent):
            // without a flush the stream's last records could wait there forever.
            unflushed = false;
            if let Err(e) = d.flush().await {
                destination_lost(&relay, &mut dst, &mut out, e);
            }
        }
        // A source connection whose cut was declared meanwhile (on the other channel, or by
        // the idle rule) is done with.
        if let Some((_, epoch)) = &src
            && !relay.with(|s| s.source_current(*epoch))
        {
            src = None;
            rb.cur.clear();
        }
        let drained = out.is_empty()
            && pout.is_empty()
            && (dst.is_none() || relay.with(|s| s.main_queued_bytes()) == 0)
            && (pre.is_none() || fatal.is_some() || relay.with(|s| s.own_preempt_ended()));
        if (ended || fatal.is_some()) && drained {
            break;
        }
        let can_read = fatal.is_none()
            && match &src {
                Some((_, epoch)) => relay.with(|s| {
                    let more = s.main_wants_more(relay.read_ahead);
                    if more {
                        s.source_reading(*epoch, Instant::now());
                    }
                    more
                }),
                None => false,
            };
        let writing = dst.is_some() && !out.is_empty();
        tokio::select! {
            // A request promoted a queued page: write it on the preempt connection now.
            _ = relay.promoted.notified(), if pre.is_some() => {}
            feed = feeds.recv(), if !ended && fatal.is_none() => match feed {
                None => {
                    ended = true;
                    src = None;
                }
                Some(f) => {
                    if let Some(d) = f.destination {
                        // A new destination connection (pass-through recovery, or the
                        // first): what was queued for an earlier one is dropped; the
                        // destination's received bitmap says what arrived.
                        relay.with(Session::main_destination_changed);
                        out.clear();
                        pout.clear();
                        unflushed = false;
                        dst = Some(d);
                        pre = f.own_preempt;
                    }
                    rb.cur.clear();
                    src = Some((f.source, f.epoch));
                }
            },
            n = read_opt(src.as_mut().map(|(r, _)| r), &mut rb, can_read), if can_read => {
                let epoch = src.as_ref().map_or(0, |(_, e)| *e);
                match n {
                    Err(e) => {
                        relay.report(PumpReport::SourceLost {
                            channel: ch,
                            cause: CutCause::Failed(e.to_string()),
                            epoch,
                        });
                        src = None;
                    }
                    Ok(0) => {
                        relay.with(|s| s.finish_main(epoch, &rb.cur, Instant::now()));
                        relay.report(PumpReport::SourceLost {
                            channel: ch,
                            cause: CutCause::Closed,
                            epoch,
                        });
                        src = None;
                    }
                    Ok(_) => {
                        let step =
                            relay.with(|s| s.queue_source_main(epoch, &mut rb.cur, Instant::now()));
                        if step.stale {
                            src = None;
                            rb.cur.clear();
                        }
                        if step.layout_ready {
                            relay.layout_ready.send_replace(true);
                        }
                        relay.apply(&step.delta);
                        relay.flush_to_source().await;
                        if let Some(e) = step.error {
                            // What decoded before the error still reaches the destination.
                            fatal = Some(e.into());
                            src = None;
                        }
                    }
                }
            },
            w = write_opt(dst.as_mut(), &out), if writing => match w {
                Ok(0) => destination_lost(&relay, &mut dst, &mut out, std::io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    unflushed = true;
                    advance(&mut out, n);
                    if let Some(g) = relay.guard.get() {
                        g.poke();
                    }
                }
                Err(e) => destination_lost(&relay, &mut dst, &mut out, e),
            },
            else => break,
        }
    }
    if let Some(mut d) = dst {
        let _ = d.shutdown().await;
    }
    if let Some(p) = pre {
        // Never closed from here: the watcher holds it until the destination closes it.
        let _ = p.keep.send(p.writer);
    }
    match fatal {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Drops the first `n` bytes of `out`, which were written.
fn advance(out: &mut VecDeque<Bytes>, mut n: usize) {
    while n > 0 {
        let Some(front) = out.front_mut() else { break };
        let k = n.min(front.len());
        front.advance(k);
        n -= k;
        if front.is_empty() {
            out.pop_front();
        }
    }
}

/// The sidecar's own preempt connection failed: reported (the carrier ends the migration
/// for it: the destination's loader stops on a broken preempt channel too).
fn own_preempt_lost(
    relay: &Relay,
    pre: &mut Option<OwnPreempt>,
    pout: &mut VecDeque<Bytes>,
    e: std::io::Error,
) {
    relay.report(PumpReport::DestinationLost {
        channel: Channel::Preempt,
        error: Some(e),
    });
    *pre = None;
    pout.clear();
}

/// The destination's main connection failed: reported, and nothing more is written to it.
fn destination_lost(
    relay: &Relay,
    dst: &mut Option<Writer>,
    out: &mut VecDeque<Bytes>,
    e: std::io::Error,
) {
    relay.report(PumpReport::DestinationLost {
        channel: Channel::Main,
        error: Some(e),
    });
    *dst = None;
    out.clear();
}

/// Reads from `src` into `rb` (making room first if the read is `wanted`), or never
/// completes without a source.
async fn read_opt(
    src: Option<&mut Reader>,
    rb: &mut ReadBuffer,
    wanted: bool,
) -> std::io::Result<usize> {
    match src {
        Some(r) if wanted => {
            rb.room();
            read_more(r, &mut rb.cur).await
        }
        _ => std::future::pending().await,
    }
}

/// Writes what it can of `out` to `dst` in one call, several buffers at once where the
/// writer can; never completes without a destination.
async fn write_opt(dst: Option<&mut Writer>, out: &VecDeque<Bytes>) -> std::io::Result<usize> {
    let Some(d) = dst else {
        return std::future::pending().await;
    };
    let slices: Vec<std::io::IoSlice<'_>> = out
        .iter()
        .take(64)
        .map(|b| std::io::IoSlice::new(b))
        .collect();
    d.write_vectored(&slices).await
}

/// Carries the preempt channel, like [`main_pump`]. Bytes wait until the block table is
/// known (QEMU 7.2 opens this channel at the very start).
pub async fn preempt_pump(
    relay: Arc<Relay>,
    mut feeds: mpsc::Receiver<Feed>,
) -> Result<(), RelayError> {
    let mut dst: Option<Writer> = None;
    while let Some(feed) = feeds.recv().await {
        if let Some(d) = feed.destination {
            dst = Some(d);
        }
        let Some(d) = dst.as_mut() else {
            continue;
        };
        match carry_preempt(&relay, feed.source, feed.epoch, d).await {
            Ended::Lost => {}
            Ended::Fatal(e) => return Err(e),
        }
    }
    if let Some(mut d) = dst {
        let _ = d.shutdown().await;
    }
    Ok(())
}

async fn carry_preempt(relay: &Arc<Relay>, mut src: Reader, epoch: u64, dst: &mut Writer) -> Ended {
    let ch = Channel::Preempt;
    let mut buf = BytesMut::with_capacity(4 * READ_CHUNK);
    let mut layout = relay.layout_ready.subscribe();
    loop {
        let n = match read_more(&mut src, &mut buf).await {
            Ok(n) => n,
            Err(e) => {
                relay.report(PumpReport::SourceLost {
                    channel: ch,
                    cause: CutCause::Failed(e.to_string()),
                    epoch,
                });
                return Ended::Lost;
            }
        };
        if !relay.with(|s| s.preempt_ready(epoch)) {
            // Bytes before the block table is known: wait for it, then decode.
            if layout.wait_for(|ready| *ready).await.is_err() {
                return Ended::Lost;
            }
        }
        let step = relay.with(|s| s.on_source_preempt(epoch, &buf, Instant::now()));
        if step.stale {
            return Ended::Lost;
        }
        let error = step.error;
        let delta = step.delta;
        if let Err(e) = apply_pieces(dst, &mut buf, step.pieces, ch).await {
            relay.report(PumpReport::DestinationLost {
                channel: ch,
                error: match e {
                    RelayError::Io { source, .. } => Some(source),
                    _ => None,
                },
            });
            return Ended::Lost;
        }
        relay.apply(&delta);
        relay.flush_to_source().await;
        if let Some(e) = error {
            return Ended::Fatal(e.into());
        }
        if n == 0 {
            if !relay.with(|s| s.finish_preempt(&buf)) {
                tracing::debug!(
                    unfinished = buf.len(),
                    "preempt channel closed inside a record; its bytes were held back"
                );
            }
            relay.report(PumpReport::SourceLost {
                channel: ch,
                cause: CutCause::Closed,
                epoch,
            });
            return Ended::Lost;
        }
    }
}

/// Carries the return path from the destination to the source, through the session's
/// page-request takeover. A new destination connection (pass-through recovery) is fed to
/// it; it ends when the carrier closes `feeds`.
pub async fn return_path_pump(
    relay: Arc<Relay>,
    mut feeds: mpsc::Receiver<Reader>,
) -> Result<(), RelayError> {
    while let Some(mut from_dst) = feeds.recv().await {
        let mut buf = BytesMut::with_capacity(16 * 1024);
        loop {
            if buf.capacity() - buf.len() < 4096 {
                buf.reserve(16 * 1024);
            }
            let n = match from_dst.read_buf(&mut buf).await {
                Ok(0) => {
                    relay.report(PumpReport::DestinationLost {
                        channel: Channel::ReturnPath,
                        error: None,
                    });
                    break;
                }
                Ok(n) => n,
                Err(e) => {
                    relay.report(PumpReport::DestinationLost {
                        channel: Channel::ReturnPath,
                        error: Some(e),
                    });
                    break;
                }
            };
            let _ = n;
            let step = relay.with(|s| s.on_destination_rp(&buf, Instant::now()));
            buf.advance(step.consumed);
            relay.apply(&step.delta);
            relay.flush_to_source().await;
            if let Some(e) = step.error {
                return Err(e.into());
            }
        }
    }
    Ok(())
}

/// Watches the read half of the sidecar's own preempt connection to the destination like
/// [`watch_reverse`], and keeps the write half the main pump hands over after EOS
/// open until the destination closes the connection.
pub async fn watch_own_preempt(
    from_dst: Reader,
    writer: tokio::sync::oneshot::Receiver<Writer>,
) -> Result<(), RelayError> {
    let r = watch_reverse(from_dst, Channel::Preempt).await;
    // A writer handed over (or on its way) closes only now.
    drop(writer);
    r
}

/// Watches the destination side of a preempt or multifd connection, which QEMU never
/// writes to; it only closes it at the end.
pub async fn watch_reverse(mut from_dst: Reader, channel: Channel) -> Result<(), RelayError> {
    let mut b = [0u8; 512];
    let n = from_dst
        .read(&mut b)
        .await
        .map_err(io_err(channel, "reading from the destination"))?;
    if n > 0 {
        return Err(RelayError::UnexpectedDestinationData { channel, bytes: n });
    }
    Ok(())
}

/// Carries one multifd channel (protocol-spec/multifd.md#multifd-relay) from the source
/// to its own destination connection: the initial packet the carrier checked, then whole
/// packets as the session validates them, never a byte of one that does not decode.
/// Packets wait for the main stream's block table (QEMU 7.2 sends the first sync point
/// before main's EOS). A source connection lost before postcopy fails the migration,
/// which leaves the VM on the source; after the switch multifd carries nothing, and the
/// main channel's cut rule decides (the destination side is left open).
pub async fn multifd_pump(
    relay: Arc<Relay>,
    init: MultifdInit,
    mut src: Reader,
    mut dst: Writer,
) -> Result<(), RelayError> {
    let ch = Channel::Multifd(init.id);
    let mut opening = Vec::with_capacity(crate::wire::multifd::INIT_LEN);
    init.encode(&mut opening);
    dst.write_all(&opening)
        .await
        .map_err(io_err(ch, "writing to the destination"))?;
    relay.with(|s| s.multifd_connected(init));
    let mut buf = BytesMut::with_capacity(4 * READ_CHUNK);
    let mut layout = relay.layout_ready.subscribe();
    loop {
        let n = match read_more(&mut src, &mut buf).await {
            Ok(n) => n,
            Err(e) if relay.with(|s| s.phase()) >= PostcopyPhase::Running => {
                tracing::warn!(channel = %ch, "lost in postcopy ({e}); main's cut rule decides");
                std::mem::forget(dst);
                return Ok(());
            }
            Err(e) => return Err(io_err(ch, "reading from the source")(e)),
        };
        if relay.with(|s| s.layout().is_none()) && layout.wait_for(|ready| *ready).await.is_err() {
            return Ok(());
        }
        let step = relay.with(|s| s.on_source_multifd(init, &buf, Instant::now()));
        apply_pieces(&mut dst, &mut buf, step.pieces, ch).await?;
        relay.apply(&step.delta);
        relay.flush_to_source().await;
        if let Some(e) = step.error {
            return Err(e.into());
        }
        if n == 0 {
            return match relay.with(|s| s.multifd_closed(init.id, &buf)) {
                MultifdEnd::Clean => {
                    let _ = dst.shutdown().await;
                    Ok(())
                }
                MultifdEnd::Lost => {
                    tracing::warn!(channel = %ch, unfinished = buf.len(), "closed in postcopy inside a packet; nothing of it was forwarded");
                    std::mem::forget(dst);
                    Ok(())
                }
                MultifdEnd::Failed(e) => Err(e.into()),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use tokio::io::AsyncReadExt;

    use super::*;

    /// A TLS client writer and server reader over an in-memory pipe far smaller than what
    /// is written, so the last write finds the pipe full.
    async fn tls_pair() -> (Writer, Reader) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["dst.test".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(cert.der().to_vec()))
            .unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let (a, b) = tokio::io::duplex(4096);
        let connect = tokio_rustls::TlsConnector::from(Arc::new(client))
            .connect(ServerName::try_from("dst.test").unwrap(), a);
        let accept = tokio_rustls::TlsAcceptor::from(Arc::new(server)).accept(b);
        let (c, s) = tokio::join!(connect, accept);
        (Box::new(c.unwrap()), Box::new(s.unwrap()))
    }

    #[test]
    fn read_buffers_are_reused_once_their_records_are_written() {
        let mut rb = ReadBuffer::default();
        rb.room();
        let first = rb.cur.as_ptr();
        rb.cur.extend_from_slice(&vec![1u8; READ_BUFFER - 10]);
        // A queued record still holds most of the buffer; 10 bytes are an incomplete one.
        let queued = rb.cur.split_to(READ_BUFFER - 20).freeze();
        rb.room();
        assert_eq!(&rb.cur[..], &[1u8; 10], "the incomplete record moves along");
        assert_ne!(
            rb.cur.as_ptr(),
            first,
            "a buffer with queued records is not reused"
        );
        drop(queued);
        // This buffer fills too; by then the first one's records were all written.
        let n = rb.cur.capacity() - rb.cur.len() - 5;
        rb.cur.extend_from_slice(&vec![2u8; n]);
        let written = rb.cur.split_to(rb.cur.len() - 5);
        rb.room();
        assert_eq!(
            rb.cur.as_ptr(),
            first,
            "the first buffer is reused, not a new one"
        );
        assert_eq!(&rb.cur[..], &[2u8; 5]);
        drop(written);
    }

    #[tokio::test]
    async fn every_forwarded_byte_leaves_a_tls_writer() {
        let (mut w, mut r) = tls_pair().await;
        const N: usize = 256 * 1024;
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; N];
            r.read_exact(&mut got).await.map(|_| got)
        });
        let data: Vec<u8> = (0..N).map(|i| (i % 251) as u8).collect();
        let mut buf = BytesMut::from(&data[..]);
        apply_pieces(&mut w, &mut buf, vec![Piece::Forward(N)], Channel::Main)
            .await
            .unwrap();
        // Nothing else is written: what apply_pieces left buffered would never arrive.
        let got = tokio::time::timeout(std::time::Duration::from_secs(10), reader)
            .await
            .expect("every byte arrives without another write")
            .unwrap()
            .unwrap();
        assert!(got == data);
    }
}
