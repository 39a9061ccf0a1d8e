//! The main channel's queue towards the destination, requested pages first
//! (protocol-spec/postcopy-sequence.md#sequence-requests-first).
//!
//! Without preempt, a page the destination asks for travels behind every bulk page that
//! is already on its way, and a relay adds its own buffers to that line. The sidecar turns
//! this around: it reads the source ahead into this bounded queue, so the source's socket
//! drains into the sidecar, and feeds the destination only as fast as it reads. When the
//! destination asks for a page that is queued here, that page goes out next, at the first
//! place where a page record may stand (between two page records of a RAM section),
//! instead of behind the queue.
//!
//! With a preempt channel of the sidecar's own towards the destination
//! ([`Outbox::use_preempt_channel`], protocol-spec/postcopy-sequence.md#sequence-own-preempt),
//! promoted pages leave by [`Outbox::take_preempt`] instead, each record named (the
//! destination keeps a previous block per channel), and the main channel only skips
//! their places: nothing on main waits for a place where a page may stand.
//!
//! Data pages before zero pages ([`Outbox::data_first`],
//! protocol-spec/postcopy-sequence.md#sequence-data-first): most of a guest's RAM is zero
//! pages, and the destination places each with an ioctl of its own, so in stream order
//! the pages the guest needs wait behind thousands of zero pages. With the queue full
//! (the destination slower than the source) data pages go out first, from anywhere in
//! the queue, and zero pages follow in order once no data page is queued. A zero page
//! the guest asks for is promoted like any other.
//!
//! Exactly once: a promoted page leaves its place in the queue, a page that is not
//! promoted leaves in stream order, and a promoted page never goes out later than its own
//! place. A page record that relied on CONTINUE (the block of the record before it) gets
//! its block name written out whenever the record the destination saw last was of another
//! block, so every record is read against the block it means. Only records that were
//! decoded whole are queued; nothing here parses bytes.

use std::collections::{HashMap, VecDeque};

use bytes::{Bytes, BytesMut};

use crate::wire::primitives::put_counted;
use crate::wire::ram::FLAG_CONTINUE;

/// A hash map for per-page bookkeeping. Every queued page makes an entry, so hashing
/// is felt per byte carried: foldhash is several times cheaper than std's SipHash, and
/// still seeded per map at random, so a peer cannot choose colliding keys ahead of time.
pub(crate) type PageMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Pages per [`WaitingPages`] chunk.
const CHUNK_PAGES: u64 = 16;

/// Sixteen neighbouring pages of one block in [`WaitingPages`]: which are waiting, which
/// of those wait in `ahead` too, and each one's sequence number (its low 32 bits: the
/// queue never holds 2^32 units, see [`WaitingPages`]).
#[derive(Debug, Default)]
struct Chunk {
    present: u16,
    ahead: u16,
    seqs: [u32; CHUNK_PAGES as usize],
}

/// Movable pages still queued at their place, by (block, page): a hash map of chunks of
/// [`CHUNK_PAGES`] neighbouring pages. Every page the stream brings is inserted once and
/// removed once, and with data pages first the queue holds up to
/// [`super::MAX_QUEUED_UNITS`] zero pages: a hash map of single pages missed the cache on
/// every insert and removal (133 ms against 89 for a B-tree, `cargo bench --bench
/// session`, composed 512 MiB guest), and the B-tree's inserts, searches and removals
/// were about a fifth of the sidecar thread's samples in the migration bench's profile,
/// while the stream's neighbours fall into one chunk here. At most one chunk per queued
/// page (a source scattering its pages), 16 times fewer for a stream that walks memory.
///
/// Sequence numbers are kept as their low 32 bits and compared or widened against the
/// queue's first one: every entry is a unit still queued, and the queue holds far fewer
/// than 2^32 units ([`Outbox::push_page`] makes pages past that unmovable).
#[derive(Debug, Default)]
struct WaitingPages {
    chunks: PageMap<(usize, u64), Chunk>,
    /// log2 of the page size the index counts in (the target page size), once known:
    /// until then no page is indexed, so none is movable.
    page_shift: Option<u32>,
}

impl WaitingPages {
    /// The chunk key and the slot of a page; `None` for an offset that is not on a page
    /// boundary, or before the page size is known (such a record is never moved).
    fn slot(&self, block: usize, offset: u64) -> Option<((usize, u64), usize)> {
        let shift = self.page_shift?;
        if offset & ((1u64 << shift) - 1) != 0 {
            return None;
        }
        let page = offset >> shift;
        Some(((block, page / CHUNK_PAGES), (page % CHUNK_PAGES) as usize))
    }

    /// Records a page queued at `seq`, unless it is waiting already (then false).
    fn insert(&mut self, block: usize, offset: u64, seq: u64) -> bool {
        let Some((key, i)) = self.slot(block, offset) else {
            return false;
        };
        let c = self.chunks.entry(key).or_default();
        if c.present & (1 << i) != 0 {
            return false;
        }
        c.present |= 1 << i;
        c.seqs[i] = seq as u32;
        true
    }

    /// Whether the page is waiting.
    fn contains(&self, block: usize, offset: u64) -> bool {
        self.slot(block, offset)
            .and_then(|(key, i)| self.chunks.get(&key).map(|c| c.present & (1 << i) != 0))
            .unwrap_or(false)
    }

    /// Takes the page out, returning its full sequence number (`first_seq`: the queue's
    /// first unit, at or before every waiting one).
    fn remove(&mut self, block: usize, offset: u64, first_seq: u64) -> Option<u64> {
        let (key, i) = self.slot(block, offset)?;
        let c = self.chunks.get_mut(&key)?;
        if c.present & (1 << i) == 0 {
            return None;
        }
        let seq = first_seq + u64::from(c.seqs[i].wrapping_sub(first_seq as u32));
        self.clear(key, i);
        Some(seq)
    }

    /// Takes the page out if it waits as the unit `seq` (not as a later duplicate).
    fn remove_if_at(&mut self, block: usize, offset: u64, seq: u64) {
        let Some((key, i)) = self.slot(block, offset) else {
            return;
        };
        if self
            .chunks
            .get(&key)
            .is_some_and(|c| c.present & (1 << i) != 0 && c.seqs[i] == seq as u32)
        {
            self.clear(key, i);
        }
    }

    fn clear(&mut self, key: (usize, u64), i: usize) {
        if let Some(c) = self.chunks.get_mut(&key) {
            c.present &= !(1 << i);
            c.ahead &= !(1 << i);
            if c.present == 0 {
                self.chunks.remove(&key);
            }
        }
    }

    /// Marks a waiting page as waiting in `ahead` too, returning its full sequence
    /// number; `None` if it is not waiting or was marked before.
    fn mark_ahead(&mut self, block: usize, offset: u64, first_seq: u64) -> Option<u64> {
        let (key, i) = self.slot(block, offset)?;
        let c = self.chunks.get_mut(&key)?;
        if c.present & (1 << i) == 0 || c.ahead & (1 << i) != 0 {
            return None;
        }
        c.ahead |= 1 << i;
        Some(first_seq + u64::from(c.seqs[i].wrapping_sub(first_seq as u32)))
    }
}

/// Most units the queue may hold with its pages still movable (see [`WaitingPages`]).
const MOVABLE_UNITS: usize = 1 << 31;

/// A page record's place in the stream, as the decoder saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageMark {
    /// Index of the record's block in the block table.
    pub block: usize,
    /// Byte offset of the page in its block.
    pub offset: u64,
    /// Whether the record carries no block name (CONTINUE: the block of the record before).
    pub continues: bool,
    /// Whether the record may be sent ahead of its place: a full or zero page between
    /// two page records of a RAM section, outside the package.
    pub movable: bool,
    /// Whether a request was waiting for it (the source's answer): it goes ahead of the
    /// queue as soon as it is queued.
    pub answers: bool,
    /// Whether it is a zero-page record (no data).
    pub zero: bool,
    /// Whether it is the last target page of its host page: only then may another record
    /// follow it (the destination assembles a huge page from consecutive records).
    pub ends_host_page: bool,
}

/// Records and pieces shorter than this are copied into the queue's own small buffers: a
/// zero-page record or a section's framing waiting at its place must not hold a whole
/// read buffer of the relay's alive. With data pages first, zero pages and the framing
/// between them wait while the data pages around them leave: before framing was copied
/// too, the composed 512 MiB stream of `cargo bench --bench session` kept every read
/// buffer of the stream alive to its end (146 MB, each page of it faulted in fresh).
const SMALL_RECORD: usize = 256;

/// Size of each buffer that small records are copied into.
const ARENA: usize = 64 * 1024;

/// Pieces shorter than this are copied together into one piece on the way out, so a run
/// of zero-page records leaves in one write, not one vector element each.
const COALESCE: usize = 256;

/// One queued piece of the stream.
#[derive(Debug)]
enum Unit {
    /// Stream bytes that go out unchanged; afterwards the stream stands between page
    /// records (a page may be inserted) if `then_between_pages`. `unmarked_pages`: they
    /// may hold page records the queue was not told of (before postcopy), which leave the
    /// destination's previous block unknown.
    Bytes {
        bytes: Bytes,
        then_between_pages: bool,
        unmarked_pages: bool,
    },
    /// One page record.
    Page { bytes: Bytes, mark: PageMark },
    /// A page that was sent ahead of its place.
    Moved,
}

/// What the queue did, for the report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct OutboxFigures {
    /// Requested pages sent ahead of queued bulk.
    pub promoted_pages: u64,
    /// Queued pages sent ahead with a requested one (the window after it).
    pub window_pages: u64,
    /// Page records whose block name was written out because an earlier record moved.
    pub named_records: u64,
    /// Most bytes queued at once.
    pub peak_queued_bytes: u64,
    /// Promoted and window pages that left on the sidecar's own preempt channel.
    pub preempt_pages: u64,
    /// Data pages sent ahead of queued zero pages ([`Outbox::data_first`]).
    pub data_first_pages: u64,
}

/// The queue of decoded main-stream bytes not yet written to the destination.
#[derive(Debug, Default)]
pub struct Outbox {
    units: VecDeque<Unit>,
    /// Sequence number of `units[0]`.
    first_seq: u64,
    /// Movable pages still queued at their place, by (block, page): their sequence
    /// number, and whether they already wait in `ahead`.
    waiting: WaitingPages,
    /// Promoted pages, in the order they were asked for.
    urgent: VecDeque<u64>,
    /// Pages sent with a promoted one (the window after it while the guest walks memory in
    /// order): after every urgent page, before the stream's order.
    ahead: VecDeque<u64>,
    queued_bytes: usize,
    /// Block of the last page record given out; `None` when not known.
    last_block: Option<usize>,
    /// Whether the bytes given out so far end between two page records.
    between_pages: bool,
    /// Block names, to write out a name a moved record's neighbour relied on.
    names: Vec<Vec<u8>>,
    /// Promoted pages leave on the destination's preempt channel, not on main.
    preempt: bool,
    /// Data pages queued, for [`Self::data_first`]: after the promoted ones and before the
    /// stream's order.
    data: VecDeque<u64>,
    /// Data pages go out before zero pages.
    data_first: bool,
    /// Where small records are copied (see [`SMALL_RECORD`]).
    arena: BytesMut,
    figures: OutboxFigures,
}

impl Outbox {
    /// An empty queue.
    pub fn new() -> Outbox {
        Outbox::default()
    }

    /// Learns the block names (the block table), needed to name a record, and the target
    /// page size the stream's offsets count in. Until then no page is movable.
    pub fn set_block_names(&mut self, names: Vec<Vec<u8>>, target_page_size: u64) {
        self.names = names;
        // QEMU's target page sizes are powers of two (the decoder refuses others); a
        // page size the index cannot count in leaves every page unmovable.
        self.waiting.page_shift = target_page_size
            .is_power_of_two()
            .then(|| target_page_size.trailing_zeros());
    }

    /// Sends promoted pages on a preempt channel ([`Self::take_preempt`]) from now on
    /// instead of inserting them into main: a requested page then never waits for the
    /// main channel's socket buffers or for a place where a page may stand.
    pub fn use_preempt_channel(&mut self) {
        self.preempt = true;
    }

    /// Sends queued data pages before queued zero pages from now on (see the module's
    /// documentation): the pages with content the guest is likely to need reach the
    /// destination first, and zero pages follow when no data page is queued.
    pub fn data_first(&mut self) {
        self.data_first = true;
    }

    /// A copy of a small record in the queue's own buffers.
    fn small_copy(&mut self, bytes: &[u8]) -> Bytes {
        if self.arena.capacity() - self.arena.len() < bytes.len() {
            self.arena = BytesMut::with_capacity(ARENA);
        }
        self.arena.extend_from_slice(bytes);
        self.arena.split().freeze()
    }

    /// Queues stream bytes that go out as they are. `then_between_pages`: after them a
    /// page record may be inserted (a postcopy RAM section stands open, outside the
    /// package); `unmarked_pages`: they may hold page records not queued as pages.
    pub fn push_bytes(&mut self, mut bytes: Bytes, then_between_pages: bool, unmarked_pages: bool) {
        if bytes.is_empty() {
            return;
        }
        // A section's header or footer waiting between zero pages must not keep its read
        // buffer alive either (see [`SMALL_RECORD`]).
        if bytes.len() < SMALL_RECORD {
            bytes = self.small_copy(&bytes);
        }
        self.queued_bytes += bytes.len();
        self.units.push_back(Unit::Bytes {
            bytes,
            then_between_pages,
            unmarked_pages,
        });
        self.note_peak();
    }

    /// Queues one page record. A movable record of a block without a known name is
    /// queued as unmovable: it could not be named if its neighbour moved; so is one the
    /// index of waiting pages cannot hold (off a page boundary, or a queue of 2^31 units).
    pub fn push_page(&mut self, mut bytes: Bytes, mut mark: PageMark) {
        if mark.block >= self.names.len()
            || self.units.len() >= MOVABLE_UNITS
            || self.waiting.slot(mark.block, mark.offset).is_none()
        {
            mark.movable = false;
        }
        if bytes.len() < SMALL_RECORD {
            bytes = self.small_copy(&bytes);
        }
        self.queued_bytes += bytes.len();
        let seq = self.first_seq + self.units.len() as u64;
        if mark.movable {
            // A page appears once in a stream while it is queued; if a source sent it
            // again, the later record must not be moved ahead of the earlier.
            if mark.answers {
                if !self.waiting.contains(mark.block, mark.offset) {
                    self.urgent.push_back(seq);
                }
            } else if self.waiting.insert(mark.block, mark.offset, seq)
                && self.data_first
                && !mark.zero
            {
                self.data.push_back(seq);
            }
        }
        self.units.push_back(Unit::Page { bytes, mark });
        self.note_peak();
    }

    fn note_peak(&mut self) {
        self.figures.peak_queued_bytes =
            self.figures.peak_queued_bytes.max(self.queued_bytes as u64);
    }

    /// The destination asked for this page: if it is queued and movable, it goes out
    /// next. Returns whether it was promoted.
    #[must_use = "false: not queued (never, or already given out)"]
    pub fn promote(&mut self, block: usize, offset: u64) -> bool {
        match self.waiting.remove(block, offset, self.first_seq) {
            Some(seq) => {
                // If it waited in `ahead` too, the later of the two turns finds it gone.
                self.urgent.push_back(seq);
                true
            }
            None => false,
        }
    }

    /// Sends this page, if it is queued and movable, after the promoted ones and before
    /// the stream's order (a page the guest is about to touch). Returns whether it was
    /// queued for that.
    pub fn send_ahead(&mut self, block: usize, offset: u64) -> bool {
        match self.waiting.mark_ahead(block, offset, self.first_seq) {
            Some(seq) => {
                self.ahead.push_back(seq);
                true
            }
            None => false,
        }
    }

    /// The next promoted page still at its place: urgent ones first, then the windows.
    fn pop_promoted(&mut self) -> Option<(Bytes, PageMark, bool)> {
        if let Some((bytes, mark)) = self.pop_lane(Lane::Urgent) {
            return Some((bytes, mark, true));
        }
        self.pop_lane(Lane::Ahead).map(|(b, m)| (b, m, false))
    }

    /// The next page of `lane` still at its place, taken out of the queue.
    fn pop_lane(&mut self, lane: Lane) -> Option<(Bytes, PageMark)> {
        loop {
            let seq = match lane {
                Lane::Urgent => self.urgent.pop_front()?,
                Lane::Ahead => self.ahead.pop_front()?,
                Lane::Data => self.data.pop_front()?,
            };
            // A page given out since (in stream order, or on an earlier turn) is gone.
            let Some(i) = seq.checked_sub(self.first_seq) else {
                continue;
            };
            let Some(unit @ Unit::Page { .. }) = self.units.get_mut(i as usize) else {
                continue;
            };
            let Unit::Page { bytes, mark } = std::mem::replace(unit, Unit::Moved) else {
                continue;
            };
            self.waiting.remove_if_at(mark.block, mark.offset, seq);
            return Some((bytes, mark));
        }
    }

    /// Bytes queued and not yet given out.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// Records and other pieces queued, with the places of pages already sent ahead.
    pub fn queued_units(&self) -> usize {
        self.units.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.units.is_empty()
    }

    /// What the queue did so far.
    pub fn figures(&self) -> OutboxFigures {
        self.figures
    }

    /// Forgets everything queued: the destination connection it was meant for is gone,
    /// and a new one starts a new stream (pass-through recovery; the destination's own
    /// received bitmap then says what arrived).
    pub fn reset(&mut self) {
        let names = std::mem::take(&mut self.names);
        let figures = self.figures;
        let (preempt, data_first) = (self.preempt, self.data_first);
        let page_shift = self.waiting.page_shift;
        *self = Outbox::default();
        self.names = names;
        self.waiting.page_shift = page_shift;
        self.figures = figures;
        self.preempt = preempt;
        self.data_first = data_first;
    }

    /// Gives out the next bytes for the destination, about `max` of them (at least one
    /// unit when any is queued), promoted pages first wherever a page may stand.
    pub fn take(&mut self, max: usize) -> Vec<Bytes> {
        let mut out = Out::default();
        let mut n = 0;
        while n < max {
            if !self.preempt
                && self.between_pages
                && let Some((bytes, mark, urgent)) = self.pop_promoted()
            {
                if urgent {
                    self.figures.promoted_pages += 1;
                } else {
                    self.figures.window_pages += 1;
                }
                n += self.give_page(bytes, mark, &mut out);
                continue;
            }
            // Places of pages sent ahead leave the front as soon as they reach it.
            while matches!(self.units.front(), Some(Unit::Moved)) {
                self.units.pop_front();
                self.first_seq += 1;
            }
            if self.between_pages
                && let Some((bytes, mark)) = self.pop_lane(Lane::Data)
            {
                // Only a page that overtakes an older record counts; the stream's own
                // next page is just that.
                if self
                    .units
                    .front()
                    .is_some_and(|u| !matches!(u, Unit::Moved))
                {
                    self.figures.data_first_pages += 1;
                }
                n += self.give_page(bytes, mark, &mut out);
                continue;
            }
            let Some(unit) = self.units.pop_front() else {
                break;
            };
            self.first_seq += 1;
            match unit {
                Unit::Moved => {}
                Unit::Bytes {
                    bytes,
                    then_between_pages,
                    unmarked_pages,
                } => {
                    self.queued_bytes -= bytes.len();
                    n += bytes.len();
                    self.between_pages = then_between_pages;
                    if unmarked_pages {
                        self.last_block = None;
                    }
                    out.push(bytes);
                }
                Unit::Page { bytes, mark } => {
                    // Waiting, or promoted with no place for it before its own: it goes
                    // here, and a turn it may still have in `urgent` or `ahead` finds it
                    // gone.
                    self.waiting
                        .remove_if_at(mark.block, mark.offset, self.first_seq - 1);
                    n += self.give_page(bytes, mark, &mut out);
                }
            }
        }
        out.finish()
    }

    /// Gives out the promoted pages for the preempt channel, about `max` bytes (at least
    /// one page when any is promoted), urgent ones first, each record named. Empty unless
    /// [`Self::use_preempt_channel`] was called.
    pub fn take_preempt(&mut self, max: usize) -> Vec<Bytes> {
        let mut out = Vec::new();
        let mut n = 0;
        while self.preempt && n < max {
            let Some((bytes, mark, urgent)) = self.pop_promoted() else {
                break;
            };
            if urgent {
                self.figures.promoted_pages += 1;
            } else {
                self.figures.window_pages += 1;
            }
            self.figures.preempt_pages += 1;
            self.queued_bytes -= bytes.len();
            // Movable records are of named blocks only (`push_page`).
            match self.names.get(mark.block) {
                Some(name) if mark.continues && bytes.len() >= 8 => {
                    let (head, len) = named_head(&bytes, name);
                    out.push(head);
                    out.push(bytes.slice(8..));
                    n += len;
                }
                _ => {
                    n += bytes.len();
                    out.push(bytes);
                }
            }
        }
        out
    }

    /// Whether promoted pages wait for the preempt channel.
    pub fn preempt_pending(&self) -> bool {
        self.preempt && !(self.urgent.is_empty() && self.ahead.is_empty())
    }

    /// Gives out one page record, naming its block if the record relied on a block the
    /// destination did not see last.
    fn give_page(&mut self, bytes: Bytes, mark: PageMark, out: &mut Out) -> usize {
        self.queued_bytes -= bytes.len();
        let len;
        // Only a block with a known name can be named; such records never move, and
        // nothing moved ahead of them could be of another block before the names were known.
        let name = self.names.get(mark.block).filter(|_| bytes.len() >= 8);
        if mark.continues
            && self.last_block != Some(mark.block)
            && let Some(name) = name
        {
            let (head, n) = named_head(&bytes, name);
            len = n;
            out.push(head);
            out.push(bytes.slice(8..));
            self.figures.named_records += 1;
        } else {
            len = bytes.len();
            out.push(bytes);
        }
        self.last_block = Some(mark.block);
        self.between_pages = mark.ends_host_page;
        len
    }
}

/// Which queue of page turns.
#[derive(Clone, Copy)]
enum Lane {
    /// Requested pages.
    Urgent,
    /// Windows sent with a requested page.
    Ahead,
    /// Data pages, ahead of zero pages.
    Data,
}

/// What [`Outbox::take`] gives out: pieces in order, small neighbours copied into one
/// (see [`COALESCE`]).
#[derive(Default)]
struct Out {
    pieces: Vec<Bytes>,
    small: BytesMut,
}

impl Out {
    fn push(&mut self, bytes: Bytes) {
        if bytes.len() < COALESCE {
            self.small.extend_from_slice(&bytes);
            return;
        }
        self.flush_small();
        self.pieces.push(bytes);
    }

    fn flush_small(&mut self) {
        if !self.small.is_empty() {
            self.pieces.push(self.small.split().freeze());
        }
    }

    fn finish(mut self) -> Vec<Bytes> {
        self.flush_small();
        self.pieces
    }
}

/// The header word of the page record `record` (at least 8 bytes) without CONTINUE and
/// followed by `name`, and the length of the named record.
fn named_head(record: &Bytes, name: &[u8]) -> (Bytes, usize) {
    let mut head = Vec::with_capacity(8 + 1 + name.len());
    let word = u64::from_be_bytes(record[..8].try_into().expect("8 bytes checked"));
    head.extend_from_slice(&(word & !FLAG_CONTINUE).to_be_bytes());
    put_counted(&mut head, name);
    let len = head.len() + record.len() - 8;
    (Bytes::from(head), len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::ram::{PageHeader, RamRecord};

    fn page(block: Option<&[u8]>, offset: u64, fill: u8) -> Bytes {
        let mut v = Vec::new();
        RamRecord::Page {
            header: PageHeader {
                offset,
                idstr: block,
                block: 0,
            },
            data: &[fill; 4096],
        }
        .encode(&mut v);
        Bytes::from(v)
    }

    fn mark(block: usize, offset: u64, continues: bool) -> PageMark {
        PageMark {
            block,
            offset,
            continues,
            movable: true,
            answers: false,
            zero: false,
            ends_host_page: true,
        }
    }

    fn zero(block: Option<&[u8]>, offset: u64) -> Bytes {
        let mut v = Vec::new();
        RamRecord::Zero {
            header: PageHeader {
                offset,
                idstr: block,
                block: 0,
            },
        }
        .encode(&mut v);
        Bytes::from(v)
    }

    fn zero_mark(offset: u64) -> PageMark {
        PageMark {
            zero: true,
            ..mark(0, offset, true)
        }
    }

    /// A section of `pages` pages, every `every`-th a data page and the rest zero pages,
    /// each record naming its block (so moving one never changes its bytes), as the queue
    /// holds it; and the records by offset.
    fn mixed(o: &mut Outbox, pages: u64, every: u64) -> Vec<(u64, Bytes)> {
        o.push_bytes(Bytes::from_static(b"\x03\0\0\0\x02"), true, false);
        let mut recs = Vec::new();
        for p in 0..pages {
            let off = p * 4096;
            let first = Some(&b"pc.ram"[..]);
            if p % every == every - 1 {
                let b = page(first, off, p as u8);
                o.push_page(b.clone(), mark(0, off, first.is_none()));
                recs.push((off, b));
            } else {
                let b = zero(first, off);
                o.push_page(
                    b.clone(),
                    PageMark {
                        continues: first.is_none(),
                        ..zero_mark(off)
                    },
                );
                recs.push((off, b));
            }
        }
        recs
    }

    /// Splits what the destination reads back into the records it was made of, by the
    /// records' own bytes.
    fn order_of(out: &[u8], recs: &[(u64, Bytes)]) -> Vec<u64> {
        let mut at = 5;
        let mut seen = Vec::new();
        while at < out.len() {
            let (off, r) = recs
                .iter()
                .find(|(_, r)| out[at..].starts_with(r))
                .expect("every piece is a whole record");
            seen.push(*off);
            at += r.len();
        }
        seen
    }

    fn flat(v: Vec<Bytes>) -> Vec<u8> {
        cat(&v)
    }

    /// The bytes of `parts`, one after the other.
    fn cat(parts: &[Bytes]) -> Vec<u8> {
        parts.iter().flat_map(|b| b.iter().copied()).collect()
    }

    fn outbox() -> Outbox {
        let mut o = Outbox::new();
        o.set_block_names(vec![b"pc.ram".to_vec(), b"other".to_vec()], 4096);
        o
    }

    #[test]
    fn data_first_sends_data_pages_before_queued_zero_pages_each_once() {
        let mut o = outbox();
        o.data_first();
        let recs = mixed(&mut o, 64, 8);
        let out = flat(o.take(usize::MAX));
        assert_eq!(
            &out[..5],
            b"\x03\0\0\0\x02",
            "the section's head stays first"
        );
        let seen = order_of(&out, &recs);
        let data: Vec<u64> = (0..64).filter(|p| p % 8 == 7).map(|p| p * 4096).collect();
        let zeros: Vec<u64> = (0..64).filter(|p| p % 8 != 7).map(|p| p * 4096).collect();
        assert_eq!(&seen[..data.len()], &data[..], "data pages first, in order");
        assert_eq!(&seen[data.len()..], &zeros[..], "then zero pages, in order");
        assert_eq!(o.figures().data_first_pages, data.len() as u64);
        assert!(o.is_empty());
        assert_eq!(o.queued_bytes(), 0);
    }

    #[test]
    fn nothing_moves_between_the_records_of_one_huge_page() {
        let mut o = outbox();
        o.data_first();
        o.push_bytes(Bytes::from_static(b"\x03\0\0\0\x02"), false, false);
        // Four target pages of one host page of block 0 (huge: never movable), then a
        // data page of block 1 that would otherwise go first, and a request for it.
        let mut recs = Vec::new();
        for p in 0..4u64 {
            let b = page(Some(b"pc.ram"), p * 4096, p as u8);
            o.push_page(
                b.clone(),
                PageMark {
                    movable: false,
                    ends_host_page: p == 3,
                    ..mark(0, p * 4096, false)
                },
            );
            recs.push((p * 4096, b));
        }
        let other = page(Some(b"other"), 1 << 20, 9);
        o.push_page(other.clone(), mark(1, 1 << 20, false));
        recs.push((1 << 20, other));
        assert!(o.promote(1, 1 << 20));
        let seen = order_of(&flat(o.take(usize::MAX)), &recs);
        assert_eq!(seen, vec![0, 4096, 8192, 12288, 1 << 20]);
    }

    #[test]
    fn without_data_first_zero_pages_keep_their_place() {
        let mut o = outbox();
        let recs = mixed(&mut o, 32, 4);
        let seen = order_of(&flat(o.take(usize::MAX)), &recs);
        assert_eq!(seen, (0..32).map(|p| p * 4096).collect::<Vec<_>>());
        assert_eq!(o.figures().data_first_pages, 0);
    }

    #[test]
    fn a_requested_zero_page_passes_the_data_pages() {
        let mut o = outbox();
        o.data_first();
        let recs = mixed(&mut o, 16, 4);
        assert!(o.promote(0, 9 * 4096), "a queued zero page");
        let seen = order_of(&flat(o.take(usize::MAX)), &recs);
        assert_eq!(seen[0], 9 * 4096, "{seen:?}");
        assert_eq!(seen[1], 3 * 4096, "then the data pages: {seen:?}");
        let mut sorted = seen.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 16, "every page once: {seen:?}");
    }

    #[test]
    fn a_run_of_zero_pages_leaves_as_one_piece() {
        let mut o = outbox();
        let recs = mixed(&mut o, 100, 1000);
        let pieces = o.take(usize::MAX);
        assert_eq!(
            pieces.len(),
            1,
            "a section head and 100 zero records coalesce"
        );
        assert_eq!(order_of(&pieces[0], &recs).len(), 100);
    }

    #[test]
    fn a_queued_zero_page_does_not_keep_the_read_buffer_alive() {
        let mut o = outbox();
        o.data_first();
        let mut buf = BytesMut::with_capacity(1 << 20);
        buf.extend_from_slice(&zero(Some(b"pc.ram"), 0));
        buf.extend_from_slice(&[0u8; 4096]);
        let rec = buf.split_to(zero(Some(b"pc.ram"), 0).len()).freeze();
        o.push_page(rec, zero_mark(0));
        buf.clear();
        assert!(
            buf.try_reclaim(1 << 20),
            "the read buffer is the relay's again while the zero page waits"
        );
        assert!(!o.is_empty());
    }

    #[test]
    fn queued_section_framing_does_not_keep_the_read_buffer_alive() {
        let mut o = outbox();
        o.data_first();
        let mut buf = BytesMut::with_capacity(1 << 20);
        buf.extend_from_slice(&[0x10, 0, 0, 0, 2]);
        buf.extend_from_slice(&[0u8; 4096]);
        o.push_bytes(buf.split_to(5).freeze(), true, false);
        buf.clear();
        assert!(
            buf.try_reclaim(1 << 20),
            "the read buffer is the relay's again while the section header waits"
        );
        assert_eq!(flat(o.take(1 << 20)), [0x10, 0, 0, 0, 2]);
    }

    #[test]
    fn pages_are_movable_only_once_the_page_size_is_known_and_on_its_boundaries() {
        let mut o = Outbox::new();
        o.push_page(page(Some(b"pc.ram"), 0, 1), mark(0, 0, false));
        assert!(!o.promote(0, 0), "no block table yet");
        o.set_block_names(vec![b"pc.ram".to_vec()], 4096);
        o.push_page(page(Some(b"pc.ram"), 0x1800, 2), mark(0, 0x1800, false));
        assert!(!o.promote(0, 0x1800), "off a page boundary");
        o.push_page(page(Some(b"pc.ram"), 0x3000, 3), mark(0, 0x3000, false));
        assert!(o.promote(0, 0x3000));
        o.reset();
        o.push_page(page(Some(b"pc.ram"), 0x4000, 4), mark(0, 0x4000, false));
        assert!(o.promote(0, 0x4000), "the page size outlives a reset");
    }

    #[test]
    fn waiting_pages_keep_full_sequence_numbers_across_a_32_bit_wrap() {
        let mut w = WaitingPages {
            page_shift: Some(12),
            ..WaitingPages::default()
        };
        let first = (1u64 << 32) - 2;
        assert!(w.insert(0, 0x1000, first + 1));
        assert!(w.insert(0, 0x2000, first + 3), "past 2^32");
        assert!(w.insert(1, 0x1000, first + 4), "another block, same page");
        assert!(!w.insert(0, 0x2000, first + 5), "a duplicate stays out");
        assert_eq!(w.mark_ahead(0, 0x2000, first), Some(first + 3));
        assert_eq!(w.mark_ahead(0, 0x2000, first), None, "marked once");
        w.remove_if_at(0, 0x1000, first + 2);
        assert!(
            w.contains(0, 0x1000),
            "another unit's number removes nothing"
        );
        w.remove_if_at(0, 0x1000, first + 1);
        assert!(!w.contains(0, 0x1000));
        assert_eq!(w.remove(0, 0x2000, first + 2), Some(first + 3));
        assert_eq!(w.remove(1, 0x1000, first + 2), Some(first + 4));
        assert!(w.chunks.is_empty(), "empty chunks are dropped");
    }

    #[test]
    fn without_requests_bytes_leave_unchanged_and_in_order() {
        let mut o = outbox();
        let head = Bytes::from_static(b"\x03\0\0\0\x02");
        o.push_bytes(head.clone(), true, false);
        let a = page(Some(b"pc.ram"), 0, 1);
        let b = page(None, 4096, 2);
        o.push_page(a.clone(), mark(0, 0, false));
        o.push_page(b.clone(), mark(0, 4096, true));
        let want: Vec<u8> = cat(&[head, a, b]);
        assert_eq!(flat(o.take(usize::MAX)), want);
        assert!(o.is_empty());
        assert_eq!(o.queued_bytes(), 0);
        assert_eq!(o.figures().named_records, 0);
    }

    #[test]
    fn a_requested_page_goes_next_and_its_neighbour_gets_a_name_only_when_needed() {
        let mut o = outbox();
        o.push_bytes(Bytes::from_static(b"\x03\0\0\0\x02"), true, false);
        o.push_page(page(Some(b"pc.ram"), 0, 1), mark(0, 0, false));
        o.push_page(page(None, 4096, 2), mark(0, 4096, true));
        // Block 1 continues, block 0 again by CONTINUE after it.
        o.push_page(page(Some(b"other"), 0, 3), mark(1, 0, false));
        o.push_page(page(None, 8192, 4), mark(1, 8192, true));
        o.push_page(page(Some(b"pc.ram"), 8192, 5), mark(0, 8192, false));
        // Nothing given out yet: the stream stands nowhere, so a promoted page waits for
        // the first place where a page may stand.
        assert!(o.promote(1, 8192));
        assert!(!o.promote(1, 8192), "promoted once");
        let first = o.take(1);
        assert_eq!(first.len(), 1, "the section header, alone");
        // Now between pages: the promoted record goes next, and it continued block 1
        // while the destination has seen no record yet: it is named.
        let got = flat(o.take(4096));
        assert_eq!(got, page(Some(b"other"), 8192, 4).to_vec());
        // Then the stream resumes: block 0's first record carries its name already; the
        // CONTINUE record after it follows block 0 as the destination last saw.
        assert_eq!(
            flat(o.take(2 * 4096)),
            cat(&[page(Some(b"pc.ram"), 0, 1), page(None, 4096, 2)])
        );
        assert_eq!(flat(o.take(4096)), page(Some(b"other"), 0, 3).to_vec());
        // The moved record's place is skipped; the last record is named already.
        assert_eq!(flat(o.take(4096)), page(Some(b"pc.ram"), 8192, 5).to_vec());
        assert!(o.is_empty());
        assert_eq!(o.queued_bytes(), 0);
        let f = o.figures();
        assert_eq!(f.promoted_pages, 1);
        assert_eq!(f.named_records, 1);
    }

    #[test]
    fn a_continue_record_after_a_moved_page_of_another_block_is_named() {
        let mut o = outbox();
        o.push_bytes(Bytes::from_static(b"H"), true, false);
        o.push_page(page(Some(b"pc.ram"), 0, 1), mark(0, 0, false));
        o.push_page(page(None, 4096, 2), mark(0, 4096, true));
        o.push_page(page(Some(b"other"), 0, 3), mark(1, 0, false));
        let _ = o.take(1 + 4096 + 8);
        // pc.ram 0 is out; the destination last saw block 0. Block 1's page jumps ahead.
        assert!(o.promote(1, 0));
        let got = flat(o.take(usize::MAX));
        let want: Vec<u8> = cat(&[page(Some(b"other"), 0, 3), page(Some(b"pc.ram"), 4096, 2)]);
        assert_eq!(got, want);
        assert_eq!(o.figures().named_records, 1);
    }

    #[test]
    fn a_page_promoted_where_none_may_stand_goes_at_its_own_place() {
        let mut o = outbox();
        o.push_bytes(Bytes::from_static(b"H"), false, false);
        o.push_page(page(Some(b"pc.ram"), 0, 1), mark(0, 0, false));
        assert!(o.promote(0, 0));
        let got = flat(o.take(usize::MAX));
        let want: Vec<u8> = cat(&[Bytes::from_static(b"H"), page(Some(b"pc.ram"), 0, 1)]);
        assert_eq!(got, want, "given out once, at its place");
        assert!(o.is_empty());
        assert!(o.take(usize::MAX).is_empty());
    }

    #[test]
    fn a_page_that_answers_a_request_goes_ahead_as_soon_as_it_is_queued() {
        let mut o = outbox();
        o.push_bytes(Bytes::from_static(b"H"), true, false);
        o.push_page(page(Some(b"pc.ram"), 0, 1), mark(0, 0, false));
        o.push_page(page(None, 4096, 2), mark(0, 4096, true));
        let _ = o.take(1);
        o.push_page(
            page(Some(b"pc.ram"), 8192, 3),
            PageMark {
                answers: true,
                ..mark(0, 8192, false)
            },
        );
        assert!(!o.promote(0, 8192), "already on its way ahead");
        let got = flat(o.take(usize::MAX));
        let want: Vec<u8> = cat(&[
            page(Some(b"pc.ram"), 8192, 3),
            page(Some(b"pc.ram"), 0, 1),
            page(None, 4096, 2),
        ]);
        assert_eq!(got, want);
        assert_eq!(o.figures().promoted_pages, 1);
        assert!(o.is_empty());
    }

    #[test]
    fn window_pages_go_after_requested_ones_and_before_the_stream() {
        let mut o = outbox();
        o.push_bytes(Bytes::from_static(b"H"), true, false);
        for p in 0..6u64 {
            let name: Option<&[u8]> = (p == 0).then_some(b"pc.ram");
            o.push_page(page(name, p * 4096, p as u8), mark(0, p * 4096, p > 0));
        }
        let _ = o.take(1);
        assert!(o.send_ahead(0, 3 * 4096));
        assert!(!o.send_ahead(0, 3 * 4096), "once");
        assert!(o.send_ahead(0, 4 * 4096));
        assert!(o.promote(0, 5 * 4096));
        // A window page that a request then names becomes urgent.
        assert!(o.promote(0, 4 * 4096));
        let got = flat(o.take(usize::MAX));
        let want: Vec<u8> = cat(&[
            page(Some(b"pc.ram"), 5 * 4096, 5),
            page(None, 4 * 4096, 4),
            page(None, 3 * 4096, 3),
            page(Some(b"pc.ram"), 0, 0),
            page(None, 4096, 1),
            page(None, 2 * 4096, 2),
        ]);
        assert!(
            got == want,
            "each page once, requested first, then the window"
        );
        let f = o.figures();
        assert_eq!((f.promoted_pages, f.window_pages), (2, 1));
        assert_eq!(
            f.named_records, 1,
            "only page 5, the first out, relied on CONTINUE"
        );
        assert!(o.is_empty());
    }

    #[test]
    fn after_records_the_queue_was_not_told_of_a_continue_record_is_named() {
        let mut o = outbox();
        o.push_page(page(Some(b"pc.ram"), 0, 1), mark(0, 0, false));
        // Precopy bytes holding a record of another block.
        o.push_bytes(page(Some(b"other"), 0, 9), false, true);
        o.push_page(page(None, 4096, 2), mark(0, 4096, true));
        let got = flat(o.take(usize::MAX));
        let want = cat(&[
            page(Some(b"pc.ram"), 0, 1),
            page(Some(b"other"), 0, 9),
            page(Some(b"pc.ram"), 4096, 2),
        ]);
        assert!(got == want, "the CONTINUE record after them is named");
        assert_eq!(o.figures().named_records, 1);
    }

    #[test]
    fn unmovable_and_unknown_pages_are_never_promoted() {
        let mut o = outbox();
        o.push_page(
            page(Some(b"pc.ram"), 0, 1),
            PageMark {
                movable: false,
                ..mark(0, 0, false)
            },
        );
        o.push_page(page(Some(b"x"), 0, 1), mark(7, 0, false));
        assert!(!o.promote(0, 0));
        assert!(!o.promote(7, 0));
        assert!(!o.promote(0, 4096), "never queued");
    }

    #[test]
    fn reset_forgets_the_queue_but_keeps_names_and_figures() {
        let mut o = outbox();
        o.push_bytes(Bytes::from_static(b"H"), true, false);
        o.push_page(page(Some(b"pc.ram"), 0, 1), mark(0, 0, false));
        let _ = o.take(1);
        assert!(o.promote(0, 0));
        let _ = o.take(usize::MAX);
        o.push_page(page(None, 4096, 1), mark(0, 4096, true));
        o.reset();
        assert!(o.is_empty());
        assert_eq!(o.queued_bytes(), 0);
        assert_eq!(o.figures().promoted_pages, 1);
        // After a reset nothing is known of the destination's last block: a CONTINUE
        // record is named.
        o.push_page(page(None, 4096, 1), mark(0, 4096, true));
        assert_eq!(
            flat(o.take(usize::MAX)),
            page(Some(b"pc.ram"), 4096, 1).to_vec()
        );
    }

    #[test]
    fn with_a_preempt_channel_promoted_pages_leave_there_named_and_main_skips_them() {
        let mut o = outbox();
        o.use_preempt_channel();
        o.push_bytes(Bytes::from_static(b"H"), true, false);
        o.push_page(page(Some(b"pc.ram"), 0, 1), mark(0, 0, false));
        o.push_page(page(None, 4096, 2), mark(0, 4096, true));
        o.push_page(page(Some(b"other"), 0, 3), mark(1, 0, false));
        o.push_page(page(None, 4096, 4), mark(1, 4096, true));
        // Promoted before main gave out anything: no place on main is needed.
        assert!(o.promote(0, 4096));
        assert!(o.send_ahead(1, 4096));
        assert!(o.preempt_pending());
        let pre = flat(o.take_preempt(usize::MAX));
        let want = cat(&[
            page(Some(b"pc.ram"), 4096, 2),
            page(Some(b"other"), 4096, 4),
        ]);
        assert!(pre == want, "each record named, urgent first");
        assert!(!o.preempt_pending());
        assert!(o.take_preempt(usize::MAX).is_empty());
        let main = flat(o.take(usize::MAX));
        let want = cat(&[
            Bytes::from_static(b"H"),
            page(Some(b"pc.ram"), 0, 1),
            page(Some(b"other"), 0, 3),
        ]);
        assert!(main == want, "main skips the moved places");
        let f = o.figures();
        assert_eq!(
            (f.promoted_pages, f.window_pages, f.preempt_pages),
            (1, 1, 2)
        );
        assert_eq!(o.queued_bytes(), 0);
        assert!(o.is_empty());
    }

    #[test]
    fn a_preempt_channel_survives_a_reset() {
        let mut o = outbox();
        o.use_preempt_channel();
        o.push_page(page(Some(b"pc.ram"), 0, 1), mark(0, 0, false));
        assert!(o.promote(0, 0));
        o.reset();
        assert!(!o.preempt_pending(), "pending promotions are dropped");
        o.push_page(page(Some(b"pc.ram"), 0, 1), mark(0, 0, false));
        assert!(o.promote(0, 0));
        assert_eq!(
            flat(o.take_preempt(usize::MAX)),
            page(Some(b"pc.ram"), 0, 1).to_vec()
        );
        assert!(o.take(usize::MAX).is_empty(), "main skips the moved page");
    }

    #[test]
    fn a_promoted_page_that_main_reaches_first_leaves_on_main_once() {
        let mut o = outbox();
        o.use_preempt_channel();
        o.push_page(page(Some(b"pc.ram"), 0, 1), mark(0, 0, false));
        assert!(o.promote(0, 0));
        assert_eq!(
            flat(o.take(usize::MAX)),
            page(Some(b"pc.ram"), 0, 1).to_vec()
        );
        assert!(o.take_preempt(usize::MAX).is_empty(), "given out once");
    }
}
