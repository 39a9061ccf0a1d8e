//! The data path: async pumps that carry each channel between the source and the
//! destination while decoding it. Only bytes that decoded cleanly are forwarded, and they
//! are forwarded as slices of the read buffer (`BytesMut::split_to`), never copied in user
//! space. Page requests on the return path go through the [`PageTracker`].
//!
//! The pumps are generic over `AsyncRead`/`AsyncWrite`, so tests drive them with in-memory
//! pipes and real captures, without QEMU.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use super::stats::Stats;
use super::tracker::{Origin, PageTracker, RequestDecision};
use crate::guard::{GuardedRam, Phase};
use crate::verify::PageDigests;
use crate::verify::placement::{PlacementCheck, PlacementVerifier};
use crate::wire::{
    Channel, Command, DecodeError, Event, PostcopyPhase, PreemptDecoder, RamLayout, RamRecord,
    RpDecoder, RpMessage, Step, StreamDecoder, StreamEnd,
};

/// Read size per socket read: small enough that bulk pages never pile up in the sidecar
/// ahead of an urgent one (reference: head-of-line blocking behind a relay's buffers).
pub const READ_CHUNK: usize = 64 * 1024;

/// Why a channel stopped carrying data.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Bytes that do not decode; nothing from the bad record on was forwarded.
    #[error("{0}")]
    Decode(#[from] DecodeError),
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
    #[error("destination sent {0} unexpected bytes on the preempt channel")]
    UnexpectedPreemptData(usize),
}

/// State shared by the pumps of one migration.
pub struct Shared {
    /// Takeover state; created once the RAM block list is known.
    pub tracker: Mutex<Option<PageTracker>>,
    /// Byte and page counters.
    pub stats: Mutex<Stats>,
    /// Block table and target page size, published when the block list is complete
    /// (the preempt channel waits for it before decoding).
    pub layout: watch::Sender<Option<(RamLayout, u64)>>,
    /// The guarded mapping of the destination's RAM, when the receiver guards it: told
    /// about PONG(2) and poked when pages arrive.
    pub guard: OnceLock<Arc<GuardedRam>>,
    /// Whether to keep digests of delivered pages (set before the pumps start).
    pub record_digests: AtomicBool,
    /// Digests of delivered pages; created with the tracker when `record_digests` is set.
    pub digests: Mutex<Option<PageDigests>>,
    /// Checks of postcopy pages right after placement.
    pub placement: Mutex<Option<PlacementVerifier>>,
    /// Prometheus metrics, when served (`--metrics`).
    pub metrics: OnceLock<Arc<super::metrics::Metrics>>,
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            tracker: Mutex::new(None),
            stats: Mutex::new(Stats::default()),
            layout: watch::Sender::new(None),
            guard: OnceLock::new(),
            record_digests: AtomicBool::new(false),
            digests: Mutex::new(None),
            placement: Mutex::new(None),
            metrics: OnceLock::new(),
        }
    }
}

impl Shared {
    fn recording(&self) -> bool {
        self.record_digests.load(Ordering::Relaxed)
    }
}

fn io_err(channel: Channel, side: &'static str) -> impl FnOnce(std::io::Error) -> RelayError {
    move |source| RelayError::Io {
        channel,
        side,
        source,
    }
}

/// Reads at most [`READ_CHUNK`] more bytes from the source into `buf`; 0 means end.
async fn read_more<R: AsyncRead + Unpin>(
    src: &mut R,
    buf: &mut BytesMut,
    ch: Channel,
) -> Result<usize, RelayError> {
    if buf.capacity() - buf.len() < READ_CHUNK {
        buf.reserve(4 * READ_CHUNK);
    }
    let mut limited = (&mut *src).take(READ_CHUNK as u64);
    limited
        .read_buf(buf)
        .await
        .map_err(io_err(ch, "reading from the source"))
}

/// Sends the first `consumed` (decoded) bytes of `buf` to the destination as a slice of
/// the read buffer, without copying them.
async fn forward_decoded<W: AsyncWrite + Unpin>(
    dst: &mut W,
    buf: &mut BytesMut,
    consumed: usize,
    ch: Channel,
) -> Result<(), RelayError> {
    if consumed > 0 {
        let out = buf.split_to(consumed).freeze();
        dst.write_all(&out)
            .await
            .map_err(io_err(ch, "writing to the destination"))?;
    }
    Ok(())
}

/// A page seen in the stream, applied to the tracker in one batch per read.
#[derive(Clone, Copy)]
struct Delivery {
    block: usize,
    offset: u64,
    zero: bool,
    postcopy: bool,
    wire_len: usize,
    /// xxh3 of a PAGE record's data, when recording digests.
    digest: Option<u64>,
}

/// The digest of a page record's data, if digests are kept (ZERO records get theirs from
/// the digest table).
fn digest_of(shared: &Shared, rec: &RamRecord<'_>) -> Option<u64> {
    match rec {
        RamRecord::Page { data, .. } if shared.recording() => {
            Some(xxhash_rust::xxh3::xxh3_64(data))
        }
        _ => None,
    }
}

/// Carries the main channel from the source (`src`) to the destination (`dst`), decoding
/// every record. Returns how the stream ended.
pub async fn forward_main<R, W>(
    mut src: R,
    mut dst: W,
    shared: Arc<Shared>,
) -> Result<StreamEnd, RelayError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let ch = Channel::Main;
    let mut dec = StreamDecoder::default();
    let mut buf = BytesMut::with_capacity(4 * READ_CHUNK);
    let mut deliveries = Vec::new();
    loop {
        let n = read_more(&mut src, &mut buf, ch).await?;
        if n == 0 {
            let end = dec.finish(&buf)?;
            dst.shutdown()
                .await
                .map_err(io_err(ch, "closing towards the destination"))?;
            return Ok(end);
        }
        let mut consumed = 0;
        let mut opaque = 0u64;
        let mut ram_bytes_layout_ready = false;
        loop {
            let step = dec.next(&buf[consumed..]);
            let (len, event) = match step {
                Ok(Step::Event { len, event, .. }) => (len, event),
                Ok(Step::NeedMore) => break,
                Err(e) => {
                    // Forward (and count) what decoded before the bad record, then stop.
                    account(
                        &shared,
                        &deliveries,
                        Instant::now(),
                        Channel::Main,
                        consumed,
                        opaque,
                        dec.phase(),
                    );
                    let good = buf.split_to(consumed).freeze();
                    let _ = dst.write_all(&good).await;
                    return Err(e.into());
                }
            };
            consumed += len;
            let postcopy = dec.phase() >= PostcopyPhase::Listening;
            match &event {
                Event::Ram(rec) => {
                    if let Some(h) = rec.page_header() {
                        deliveries.push(Delivery {
                            block: h.block,
                            offset: h.offset,
                            zero: matches!(rec, RamRecord::Zero { .. }),
                            postcopy,
                            wire_len: len,
                            digest: digest_of(&shared, rec),
                        });
                    } else if *rec == RamRecord::Eos && shared.layout.borrow().is_none() {
                        ram_bytes_layout_ready = true;
                    }
                }
                Event::Command(c) => {
                    if matches!(c, Command::PostcopyRamDiscard { .. }) && !deliveries.is_empty() {
                        // Pages before a discard must be entered before it, or the discard
                        // would be undone by the batch (its bytes are counted with the read).
                        account(
                            &shared,
                            &deliveries,
                            Instant::now(),
                            Channel::Main,
                            0,
                            0,
                            dec.phase(),
                        );
                        deliveries.clear();
                    }
                    apply_command(&shared, &dec, c)
                }
                Event::Opaque(d) => opaque += d.len() as u64,
                _ => {}
            }
            if ram_bytes_layout_ready {
                ram_bytes_layout_ready = false;
                publish_layout(&shared, &dec);
            }
        }
        let now = Instant::now();
        account(
            &shared,
            &deliveries,
            now,
            Channel::Main,
            consumed,
            opaque,
            dec.phase(),
        );
        deliveries.clear();
        forward_decoded(&mut dst, &mut buf, consumed, ch).await?;
    }
}

fn publish_layout(shared: &Shared, dec: &StreamDecoder) {
    let layout = dec.layout().clone();
    let tps = dec.target_page_size();
    shared
        .tracker
        .lock()
        .expect("tracker lock")
        .get_or_insert_with(|| PageTracker::new(&layout, tps));
    if shared.recording() {
        let blocks: Vec<(String, u64)> = layout
            .blocks()
            .iter()
            .map(|b| (String::from_utf8_lossy(&b.name).into_owned(), b.used_length))
            .collect();
        shared
            .digests
            .lock()
            .expect("digests lock")
            .get_or_insert_with(|| PageDigests::new(&blocks, tps));
    }
    shared.layout.send_replace(Some((layout, tps)));
}

fn apply_command(shared: &Shared, dec: &StreamDecoder, c: &Command<'_>) {
    let mut stats = shared.stats.lock().expect("stats lock");
    stats.command(c.name(), Instant::now(), dec.phase());
    drop(stats);
    if let Command::PostcopyRamDiscard { block, .. } = c {
        let mut tr = shared.tracker.lock().expect("tracker lock");
        if tr.is_none() {
            drop(tr);
            publish_layout(shared, dec);
            tr = shared.tracker.lock().expect("tracker lock");
        }
        if let Some(t) = tr.as_mut()
            && let Some(b) = t.block_index(block)
        {
            let mut digests = shared.digests.lock().expect("digests lock");
            for (start, len) in c.discard_ranges() {
                t.discarded(b, start, len);
                if let Some(d) = digests.as_mut() {
                    d.discard(b, start, len);
                }
            }
        }
    }
}

fn account(
    shared: &Shared,
    deliveries: &[Delivery],
    now: Instant,
    channel: Channel,
    bytes: usize,
    opaque: u64,
    phase: PostcopyPhase,
) {
    let mut latencies = Vec::new();
    // Per delivery: whether the destination had asked for it.
    let mut asked = Vec::with_capacity(deliveries.len());
    if !deliveries.is_empty() {
        let mut tr = shared.tracker.lock().expect("tracker lock");
        if let Some(t) = tr.as_mut() {
            for d in deliveries {
                let answered = t.delivered(d.block, d.offset, d.zero, now);
                asked.push(matches!(answered, Some((_, Origin::Destination))));
                if let Some((w, Origin::Destination)) = answered {
                    latencies.push(w);
                }
            }
        }
        if let (Some(m), Some(t)) = (shared.metrics.get(), tr.as_ref()) {
            m.in_flight.set(t.outstanding_pages() as i64);
        }
        drop(tr);
        if shared.recording() {
            record_digests(shared, deliveries, &asked);
        }
        if let Some(g) = shared.guard.get() {
            g.poke();
        }
    }
    let mut s = shared.stats.lock().expect("stats lock");
    s.channel_bytes(channel, bytes as u64);
    s.opaque_bytes += opaque;
    s.phase = s.phase.max(phase);
    for d in deliveries {
        s.page(d.postcopy, d.zero, d.wire_len as u64);
    }
    s.served += latencies.len() as u64;
    let postcopy = channel == Channel::Preempt || s.phase >= PostcopyPhase::Listening;
    drop(s);
    if let Some(m) = shared.metrics.get() {
        m.add_bytes(channel, postcopy, bytes as u64);
        for d in deliveries {
            m.add_page(channel, d.postcopy, d.zero);
        }
        for w in &latencies {
            m.observe_service(*w);
        }
    }
}

/// Enters delivered pages into the digest table and queues postcopy pages for checking
/// once placed.
fn record_digests(shared: &Shared, deliveries: &[Delivery], asked: &[bool]) {
    let mut digests = shared.digests.lock().expect("digests lock");
    let Some(table) = digests.as_mut() else {
        return;
    };
    let placement = shared.placement.lock().expect("placement lock");
    for (i, d) in deliveries.iter().enumerate() {
        let digest = if d.zero {
            table.zero_digest()
        } else {
            match d.digest {
                Some(h) => h,
                None => continue,
            }
        };
        table.record(d.block, d.offset, digest);
        if let (true, Some(p)) = (d.postcopy, placement.as_ref())
            && let Some(b) = table.blocks().get(d.block)
        {
            p.check(PlacementCheck {
                block: b.name.clone(),
                offset: d.offset,
                digest,
                requested: asked.get(i).copied().unwrap_or(false),
            });
        }
    }
}

/// Carries a preempt channel from the source to the destination. It waits for the main
/// channel's block table before decoding (QEMU 7.2 opens this channel at the very start).
pub async fn forward_preempt<R, W>(
    mut src: R,
    mut dst: W,
    shared: Arc<Shared>,
) -> Result<(), RelayError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let ch = Channel::Preempt;
    let mut buf = BytesMut::with_capacity(4 * READ_CHUNK);
    let mut dec: Option<PreemptDecoder> = None;
    let mut layout_rx = shared.layout.subscribe();
    let mut deliveries = Vec::new();
    loop {
        let n = read_more(&mut src, &mut buf, ch).await?;
        if n == 0 && buf.is_empty() {
            dst.shutdown()
                .await
                .map_err(io_err(ch, "closing towards the destination"))?;
            return Ok(());
        }
        if dec.is_none() {
            // Bytes before the block table is known: wait for it, then decode.
            let ready = layout_rx
                .wait_for(Option::is_some)
                .await
                .map(|v| v.clone())
                .ok()
                .flatten();
            if let Some((layout, tps)) = ready {
                dec = Some(PreemptDecoder::new(tps, layout));
            }
        }
        let Some(d) = dec.as_mut() else {
            continue;
        };
        let mut consumed = 0;
        let mut failure = None;
        loop {
            match d.next(&buf[consumed..]) {
                Ok(Step::Event { len, event, .. }) => {
                    consumed += len;
                    if let Some(h) = event.page_header() {
                        deliveries.push(Delivery {
                            block: h.block,
                            offset: h.offset,
                            zero: matches!(event, RamRecord::Zero { .. }),
                            postcopy: true,
                            wire_len: len,
                            digest: digest_of(&shared, &event),
                        });
                    }
                }
                Ok(Step::NeedMore) => break,
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        account(
            &shared,
            &deliveries,
            Instant::now(),
            ch,
            consumed,
            0,
            PostcopyPhase::None,
        );
        deliveries.clear();
        if let Some(e) = failure {
            // Forward (and count) what decoded before the bad record, then stop.
            let _ = forward_decoded(&mut dst, &mut buf, consumed, ch).await;
            return Err(e.into());
        }
        forward_decoded(&mut dst, &mut buf, consumed, ch).await?;
        if n == 0 {
            d.finish(&buf)?;
            dst.shutdown()
                .await
                .map_err(io_err(ch, "closing towards the destination"))?;
            return Ok(());
        }
    }
}

/// Drains the destination side of a preempt connection, which QEMU never writes to; it
/// only closes it at the end.
pub async fn drain_preempt_reverse<R, W>(mut from_dst: R, mut to_src: W) -> Result<(), RelayError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut b = [0u8; 512];
    let n = from_dst
        .read(&mut b)
        .await
        .map_err(io_err(Channel::Preempt, "reading from the destination"))?;
    if n > 0 {
        return Err(RelayError::UnexpectedPreemptData(n));
    }
    let _ = to_src.shutdown().await;
    Ok(())
}

/// Carries the return path from the destination to the source, taking over page requests:
/// each one is recorded, and only pages the stream will not bring anyway are asked of the
/// source, always in the REQ_PAGES_ID form (the two legs' "previous block" differ once
/// the sidecar drops a request; protocol-spec/return-path.md#rp-req-pages).
///
/// Pages the sidecar's own guarded reader needs arrive on `guard_wants` as (guard block
/// index, offset); they are asked of the source at once, ahead of the destination's
/// requests still being read (protocol-spec/guarded-access.md#guard-faults).
pub async fn relay_return_path<R, W>(
    mut from_dst: R,
    mut to_src: W,
    shared: Arc<Shared>,
    mut guard_wants: Option<tokio::sync::mpsc::UnboundedReceiver<(usize, u64)>>,
) -> Result<(), RelayError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let ch = Channel::ReturnPath;
    let mut dec = RpDecoder::new();
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut out = Vec::with_capacity(4096);
    loop {
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(16 * 1024);
        }
        let n = tokio::select! {
            biased;
            want = async { guard_wants.as_mut().expect("guarded").recv().await },
                if guard_wants.is_some() =>
            {
                match want {
                    Some((block, offset)) => ask_for_guard(&shared, block, offset, &mut out),
                    None => guard_wants = None,
                }
                if !out.is_empty() {
                    to_src
                        .write_all(&out)
                        .await
                        .map_err(io_err(ch, "writing to the source"))?;
                    out.clear();
                }
                continue;
            }
            n = from_dst.read_buf(&mut buf) => n,
        }
        .map_err(io_err(ch, "reading from the destination"))?;
        if n == 0 {
            dec.finish(&buf)?;
            to_src
                .shutdown()
                .await
                .map_err(io_err(ch, "closing towards the source"))?;
            return Ok(());
        }
        let now = Instant::now();
        let mut consumed = 0;
        let mut received = 0u64;
        loop {
            let (len, msg) = match dec.next(&buf[consumed..]) {
                Ok(Step::Event { len, event, .. }) => (len, event),
                Ok(Step::NeedMore) => break,
                Err(e) => {
                    let _ = to_src.write_all(&out).await;
                    return Err(e.into());
                }
            };
            let raw = &buf[consumed..consumed + len];
            consumed += len;
            received += len as u64;
            let request = match &msg {
                RpMessage::ReqPagesId { start, len, block } => Some((*start, *len, block.to_vec())),
                RpMessage::ReqPages { start, len } => {
                    Some((*start, *len, dec.last_block().unwrap_or_default().to_vec()))
                }
                _ => None,
            };
            let Some((start, len, block)) = request else {
                if let (RpMessage::Pong(2), Some(g)) = (&msg, shared.guard.get()) {
                    // The destination loaded everything before the switch to postcopy.
                    g.set_phase(Phase::Postcopy);
                }
                shared
                    .stats
                    .lock()
                    .expect("stats lock")
                    .rp_message(msg.name());
                out.extend_from_slice(raw);
                continue;
            };
            if forward_request(&shared, &block, start, len, now) {
                RpMessage::ReqPagesId {
                    start,
                    len,
                    block: &block,
                }
                .encode(&mut out);
            }
        }
        buf.advance_to(consumed);
        let postcopy = {
            let mut stats = shared.stats.lock().expect("stats lock");
            stats.channel_bytes(ch, received);
            stats.phase >= PostcopyPhase::Listening
        };
        if let Some(m) = shared.metrics.get() {
            m.add_bytes(ch, postcopy, received);
        }
        if !out.is_empty() {
            to_src
                .write_all(&out)
                .await
                .map_err(io_err(ch, "writing to the source"))?;
            out.clear();
        }
    }
}

/// Asks the source for a page the guarded reader needs, unless the stream brings it anyway.
fn ask_for_guard(shared: &Shared, guard_block: usize, offset: u64, out: &mut Vec<u8>) {
    let Some(g) = shared.guard.get() else {
        return;
    };
    let Some((name, _)) = g.blocks().into_iter().nth(guard_block) else {
        return;
    };
    let mut tr = shared.tracker.lock().expect("tracker lock");
    let Some(t) = tr.as_mut() else {
        return;
    };
    let Some(b) = t.block_index(name.as_bytes()) else {
        return;
    };
    let tps = t.target_page_size();
    if t.guard_requested(b, offset, Instant::now()) == RequestDecision::Forward {
        RpMessage::ReqPagesId {
            start: offset,
            len: tps as u32,
            block: name.as_bytes(),
        }
        .encode(out);
    }
}

/// Records a request and says whether it must go on to the source.
fn forward_request(shared: &Shared, block: &[u8], start: u64, len: u32, now: Instant) -> bool {
    let mut tr = shared.tracker.lock().expect("tracker lock");
    let Some(t) = tr.as_mut() else {
        return true;
    };
    let Some(b) = t.block_index(block) else {
        return true;
    };
    let decisions = t.requested(b, start, u64::from(len), now);
    let forward = decisions
        .iter()
        .any(|(_, d)| *d == RequestDecision::Forward);
    if forward {
        t.forwarded_message();
    }
    if let Some(m) = shared.metrics.get() {
        use super::metrics::RequestOutcome;
        m.request_messages.inc();
        for (_, d) in &decisions {
            m.add_requested(
                match d {
                    RequestDecision::Forward => RequestOutcome::Forwarded,
                    RequestDecision::AlreadyRequested => RequestOutcome::Deduplicated,
                    RequestDecision::AlreadyDelivered => RequestOutcome::AlreadyDelivered,
                },
                1,
            );
        }
        m.in_flight.set(t.outstanding_pages() as i64);
    }
    drop(tr);
    shared
        .stats
        .lock()
        .expect("stats lock")
        .request(now, forward, decisions.len() as u64);
    forward
}

trait AdvanceTo {
    fn advance_to(&mut self, n: usize);
}

impl AdvanceTo for BytesMut {
    fn advance_to(&mut self, n: usize) {
        let _ = self.split_to(n);
    }
}
