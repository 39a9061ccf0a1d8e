//! Self-consistency checks of the decoders, shared by the fuzz targets (`fuzz/`) and the
//! tests that replay the fuzz corpus and the captures.
//!
//! Two properties hold for any input, valid or not:
//! - chunking does not matter: feeding the bytes in any pieces gives the same events (after
//!   merging pass-through pieces, see [`coalesce`]), the same error at the same offset and
//!   the same end-of-stream verdict;
//! - every event re-encodes to exactly the bytes it was decoded from, so the events of a
//!   decode cover the consumed input byte for byte.
//!
//! [`feed`] drives a decoder the way a relay does: it keeps a buffer, appends the next
//! chunk, calls `next` until `NeedMore`, then drops the consumed bytes. The checks panic
//! on a violation, which is what a fuzz target wants.

use std::hash::{DefaultHasher, Hash, Hasher};

use super::decoder::{Event, Step, StreamDecoder, coalesce};
use super::error::{Channel, DecodeError};
use super::multifd::{MultifdDecoder, MultifdEvent};
use super::preempt::PreemptDecoder;
use super::ram::{RamLayout, RamRecord};
use super::return_path::{RpDecoder, RpMessage};

/// The common shape of the channel decoders, as [`feed`] drives them.
pub trait ChannelDecoder {
    /// The decoded item, borrowing the input.
    type Event<'a>;

    /// Decodes the next event from `input` (see [`StreamDecoder::next`]).
    fn next_event<'a>(&mut self, input: &'a [u8]) -> Result<Step<Self::Event<'a>>, DecodeError>;

    /// Judges the end of input; `Ok` carries a description of the clean end.
    fn finish_input(&mut self, rest: &[u8]) -> Result<String, DecodeError>;

    /// Appends the exact bytes the event was decoded from.
    fn encode_event(event: &Self::Event<'_>, out: &mut Vec<u8>);

    /// Data passed through in pieces whose size depends on chunking: kind and bytes.
    fn passthrough<'e, 'b: 'e>(event: &'e Self::Event<'b>) -> Option<(&'static str, &'e [u8])>;

    /// Describes an event that is not pass-through data.
    fn describe(offset: u64, event: &Self::Event<'_>) -> String;

    /// Describes a merged run of pass-through pieces.
    fn describe_run(offset: u64, kind: &'static str, data: &[u8]) -> String;
}

impl ChannelDecoder for StreamDecoder {
    type Event<'a> = Event<'a>;

    fn next_event<'a>(&mut self, input: &'a [u8]) -> Result<Step<Event<'a>>, DecodeError> {
        self.next(input)
    }

    fn finish_input(&mut self, rest: &[u8]) -> Result<String, DecodeError> {
        self.finish(rest).map(|end| format!("{end:?}"))
    }

    fn encode_event(event: &Event<'_>, out: &mut Vec<u8>) {
        event.encode(out)
    }

    fn passthrough<'e, 'b: 'e>(event: &'e Event<'b>) -> Option<(&'static str, &'e [u8])> {
        match event {
            Event::Opaque(d) => Some(("opaque", d)),
            Event::VmDescriptionData(d) => Some(("vmdesc", d)),
            _ => None,
        }
    }

    fn describe(offset: u64, event: &Event<'_>) -> String {
        coalesce(&[(offset, event.clone())]).remove(0).1
    }

    fn describe_run(offset: u64, kind: &'static str, data: &[u8]) -> String {
        let event = match kind {
            "vmdesc" => Event::VmDescriptionData(data),
            _ => Event::Opaque(data),
        };
        coalesce(&[(offset, event)]).remove(0).1
    }
}

impl ChannelDecoder for PreemptDecoder {
    type Event<'a> = RamRecord<'a>;

    fn next_event<'a>(&mut self, input: &'a [u8]) -> Result<Step<RamRecord<'a>>, DecodeError> {
        self.next(input)
    }

    fn finish_input(&mut self, rest: &[u8]) -> Result<String, DecodeError> {
        self.finish(rest).map(|()| "end".to_string())
    }

    fn encode_event(event: &RamRecord<'_>, out: &mut Vec<u8>) {
        event.encode(out)
    }

    fn passthrough<'e, 'b: 'e>(_: &'e RamRecord<'b>) -> Option<(&'static str, &'e [u8])> {
        None
    }

    fn describe(_: u64, event: &RamRecord<'_>) -> String {
        format!("{event:?}")
    }

    fn describe_run(_: u64, kind: &'static str, data: &[u8]) -> String {
        format!("{kind}:{}", hex(data))
    }
}

impl ChannelDecoder for MultifdDecoder {
    type Event<'a> = MultifdEvent<'a>;

    fn next_event<'a>(&mut self, input: &'a [u8]) -> Result<Step<MultifdEvent<'a>>, DecodeError> {
        self.next(input)
    }

    fn finish_input(&mut self, rest: &[u8]) -> Result<String, DecodeError> {
        self.finish(rest).map(|()| "end".to_string())
    }

    fn encode_event(event: &MultifdEvent<'_>, out: &mut Vec<u8>) {
        event.encode(out)
    }

    fn passthrough<'e, 'b: 'e>(_: &'e MultifdEvent<'b>) -> Option<(&'static str, &'e [u8])> {
        None
    }

    fn describe(_: u64, event: &MultifdEvent<'_>) -> String {
        match event {
            MultifdEvent::Init(i) => format!("{i:?}"),
            MultifdEvent::Ram(p) => format!(
                "ram flags={:#x} num={} block={:?} pages={:?} zeros={:?} data={:016x}",
                p.flags,
                p.packet_num,
                p.block,
                p.pages().map(|(o, _)| o).collect::<Vec<_>>(),
                p.zero_pages().collect::<Vec<_>>(),
                xxhash_rust::xxh3::xxh3_64(
                    &p.pages()
                        .flat_map(|(_, d)| d.iter().copied())
                        .collect::<Vec<_>>()
                )
            ),
            MultifdEvent::DeviceState {
                idstr,
                instance_id,
                data,
                ..
            } => format!("device {} {instance_id} {}", hex(idstr), hex(data)),
        }
    }

    fn describe_run(_: u64, kind: &'static str, data: &[u8]) -> String {
        format!("{kind}:{}", hex(data))
    }
}

impl ChannelDecoder for RpDecoder {
    type Event<'a> = RpMessage<'a>;

    fn next_event<'a>(&mut self, input: &'a [u8]) -> Result<Step<RpMessage<'a>>, DecodeError> {
        self.next(input)
    }

    fn finish_input(&mut self, rest: &[u8]) -> Result<String, DecodeError> {
        self.finish(rest).map(|()| "end".to_string())
    }

    fn encode_event(event: &RpMessage<'_>, out: &mut Vec<u8>) {
        event.encode(out)
    }

    fn passthrough<'e, 'b: 'e>(event: &'e RpMessage<'b>) -> Option<(&'static str, &'e [u8])> {
        match event {
            RpMessage::BitmapData(d) => Some(("bitmap", d)),
            _ => None,
        }
    }

    fn describe(_: u64, event: &RpMessage<'_>) -> String {
        format!("{event:?}")
    }

    fn describe_run(_: u64, kind: &'static str, data: &[u8]) -> String {
        format!("{kind}:{}", hex(data))
    }
}

/// What a decoder made of one input, in a form that compares across chunkings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Events with their offsets, pass-through pieces merged; descriptions longer than
    /// [`DIGEST_OVER`] bytes are shortened to a prefix, their length and a hash.
    pub events: Vec<(u64, String)>,
    /// Bytes covered by the events.
    pub consumed: u64,
    /// The error that stopped decoding, if one did.
    pub error: Option<DecodeError>,
    /// The end-of-input verdict, when no error stopped decoding first.
    pub end: Option<Result<String, DecodeError>>,
}

impl Outcome {
    /// The error that ended decoding: from `next`, or else from `finish`.
    pub fn first_error(&self) -> Option<&DecodeError> {
        self.error
            .as_ref()
            .or_else(|| self.end.as_ref().and_then(|e| e.as_ref().err()))
    }
}

/// Descriptions longer than this are digested in an [`Outcome`].
pub const DIGEST_OVER: usize = 512;

/// Drives `dec` over `data` in chunks whose sizes `chunk` picks (clamped to 1..=rest),
/// checking on the way that event offsets are contiguous and that each event re-encodes
/// to exactly the bytes it covers (panics otherwise).
pub fn feed<D: ChannelDecoder>(
    mut dec: D,
    data: &[u8],
    mut chunk: impl FnMut() -> usize,
) -> Outcome {
    let mut buf: Vec<u8> = Vec::new();
    let mut start = 0usize;
    let mut fed = 0usize;
    let mut consumed = 0u64;
    let mut runs = Runs::default();
    let mut scratch = Vec::new();
    let mut empty_events = 0u32;
    let mut error = None;
    'feeding: loop {
        loop {
            match dec.next_event(&buf[start..]) {
                Ok(Step::Event { offset, len, event }) => {
                    assert_eq!(offset, consumed, "event offset is not contiguous");
                    assert!(
                        len <= buf.len() - start,
                        "event at {offset} covers {len} bytes, more than the {} buffered",
                        buf.len() - start
                    );
                    scratch.clear();
                    D::encode_event(&event, &mut scratch);
                    if scratch[..] != buf[start..start + len] {
                        panic!(
                            "event at offset {offset} ({} bytes) re-encodes to {} different bytes: {}",
                            len,
                            scratch.len(),
                            digest(D::describe(offset, &event))
                        );
                    }
                    runs.push::<D>(offset, &event);
                    empty_events = if len == 0 { empty_events + 1 } else { 0 };
                    assert!(
                        empty_events < 4,
                        "decoder loops on empty events at {offset}"
                    );
                    start += len;
                    consumed += len as u64;
                }
                Ok(Step::NeedMore) => break,
                Err(e) => {
                    error = Some(e);
                    break 'feeding;
                }
            }
        }
        if fed == data.len() {
            break;
        }
        buf.drain(..start);
        start = 0;
        let n = chunk().clamp(1, data.len() - fed);
        buf.extend_from_slice(&data[fed..fed + n]);
        fed += n;
    }
    let end = error.is_none().then(|| dec.finish_input(&buf[start..]));
    Outcome {
        events: runs.finish::<D>(),
        consumed,
        error,
        end,
    }
}

/// Feeds `data` in one piece.
pub fn feed_whole<D: ChannelDecoder>(dec: D, data: &[u8]) -> Outcome {
    feed(dec, data, || data.len())
}

/// Feeds `data` in two pieces, split at `at`.
pub fn feed_split<D: ChannelDecoder>(dec: D, data: &[u8], at: usize) -> Outcome {
    let mut first = true;
    feed(dec, data, move || {
        if std::mem::take(&mut first) {
            at
        } else {
            usize::MAX
        }
    })
}

/// Feeds `data` one byte at a time.
pub fn feed_bytewise<D: ChannelDecoder>(dec: D, data: &[u8]) -> Outcome {
    feed(dec, data, || 1)
}

/// Target page size of the block layout the preempt checks use.
pub const CHECK_PAGE_SIZE: u64 = 4096;

/// The block layout the preempt checks use: the blocks of a q35 guest with 128 MiB of RAM
/// (as in the development capture), so that real preempt records decode.
pub fn check_layout() -> RamLayout {
    let mut layout = RamLayout::default();
    for (name, len) in [
        (&b"m"[..], 128u64 << 20),
        (b"/rom@etc/acpi/tables", 128 << 10),
        (b"pc.bios", 256 << 10),
        (b"pc.rom", 128 << 10),
        (b"/rom@etc/table-loader", 4 << 10),
        (b"/rom@etc/acpi/rsdp", 4 << 10),
    ] {
        layout.announce(name, len);
    }
    layout
}

/// Where [`roundtrip_check`] splits `data`: a point derived from its first byte.
pub fn split_point(data: &[u8]) -> usize {
    data.first()
        .map_or(0, |&b| usize::from(b) * data.len() / 256)
}

/// The fuzz property for one channel: `data` decoded whole and decoded in two pieces
/// (split at a point derived from the first byte) give the same outcome, and every event
/// re-encodes to the bytes it covers. Returns the whole-input outcome.
pub fn roundtrip_check(channel: Channel, data: &[u8]) -> Outcome {
    let at = split_point(data);
    let (whole, split) = match channel {
        Channel::Main => (
            feed_whole(StreamDecoder::default(), data),
            feed_split(StreamDecoder::default(), data, at),
        ),
        Channel::Preempt => {
            let dec = || PreemptDecoder::new(CHECK_PAGE_SIZE, check_layout());
            (feed_whole(dec(), data), feed_split(dec(), data, at))
        }
        Channel::Multifd(_) => {
            let dec = || MultifdDecoder::new(CHECK_PAGE_SIZE, check_layout());
            (feed_whole(dec(), data), feed_split(dec(), data, at))
        }
        Channel::ReturnPath => (
            feed_whole(RpDecoder::new(), data),
            feed_split(RpDecoder::new(), data, at),
        ),
    };
    assert_same(&whole, &split, &format!("{channel} split at {at}"));
    whole
}

/// Panics with a readable report (the first differing event, not whole lists) unless the
/// two outcomes are equal.
pub fn assert_same(a: &Outcome, b: &Outcome, what: &str) {
    if a == b {
        return;
    }
    if let Some(i) =
        (0..a.events.len().max(b.events.len())).find(|&i| a.events.get(i) != b.events.get(i))
    {
        panic!(
            "{what}: events differ at index {i}:\n  left:  {:?}\n  right: {:?}\n(left has {} events, right {})",
            a.events.get(i),
            b.events.get(i),
            a.events.len(),
            b.events.len()
        );
    }
    panic!(
        "{what}: outcomes differ after identical events:\n  left:  consumed {} error {:?} end {:?}\n  right: consumed {} error {:?} end {:?}",
        a.consumed, a.error, a.end, b.consumed, b.error, b.end
    );
}

/// Merges adjacent pass-through pieces as they arrive, so that the events of a long input
/// need not be held (they borrow a buffer that [`feed`] drains).
#[derive(Default)]
struct Runs {
    done: Vec<(u64, String)>,
    pending: Option<(u64, &'static str, Vec<u8>)>,
}

impl Runs {
    fn push<D: ChannelDecoder>(&mut self, offset: u64, event: &D::Event<'_>) {
        match D::passthrough(event) {
            Some((kind, data)) => match &mut self.pending {
                Some((_, k, buf)) if *k == kind => buf.extend_from_slice(data),
                _ => {
                    self.flush::<D>();
                    self.pending = Some((offset, kind, data.to_vec()));
                }
            },
            None => {
                self.flush::<D>();
                self.done.push((offset, digest(D::describe(offset, event))));
            }
        }
    }

    fn flush<D: ChannelDecoder>(&mut self) {
        if let Some((offset, kind, data)) = self.pending.take() {
            self.done
                .push((offset, digest(D::describe_run(offset, kind, &data))));
        }
    }

    fn finish<D: ChannelDecoder>(mut self) -> Vec<(u64, String)> {
        self.flush::<D>();
        self.done
    }
}

/// Shortens a long description to a prefix, its length and a hash.
pub fn digest(s: String) -> String {
    if s.len() <= DIGEST_OVER {
        return s;
    }
    let mut h = DefaultHasher::new();
    s.hash(&mut h);
    let cut = (0..=120)
        .rev()
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(0);
    format!(
        "{}… [{} bytes, hash {:016x}]",
        &s[..cut],
        s.len(),
        h.finish()
    )
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
