//! An in-memory QEMU source and destination for driving a [`Session`](super::Session)
//! without sockets, in tests and fuzz targets (quinn-proto's `Pair` is the model).
//!
//! [`SimSource`] behaves as QEMU's source does where it matters for the sidecar: a page
//! leaves its dirty set when it is *written*, whether or not the bytes arrive; requests
//! are served first; after a cut it resumes with RECV_BITMAP for every block, takes dirty
//! = NOT received, forgets its previous block and sends POSTCOPY_RESUME
//! (protocol-spec/postcopy-sequence.md#sequence-recovery). [`SimDestination`] decodes what
//! reaches it and fails as QEMU's destination would on a page placed twice in postcopy
//! (EEXIST), and checks every page's content.

use std::collections::VecDeque;

use crate::wire::compose::{
    RamSections, put_discards, put_opening, put_page, put_postcopy_switch, put_zero,
};
use crate::wire::{
    Command, Event, PostcopyPhase, PreemptDecoder, RamRecord, RpDecoder, RpMessage, Step,
    StreamDecoder,
};

/// Target page size of the simulated migration.
pub const PAGE: u64 = 4096;

/// The content of page `page` of block `block`: every fifth page is a zero page.
pub fn page_content(block: usize, page: u64) -> Option<[u8; PAGE as usize]> {
    if page % 5 == 3 {
        return None;
    }
    let mut p = [0u8; PAGE as usize];
    p[..8].copy_from_slice(&page.to_le_bytes());
    p[8] = block as u8;
    p[PAGE as usize - 1] = 0xa5;
    Some(p)
}

/// A QEMU source, seen from the wire.
pub struct SimSource {
    blocks: Vec<(Vec<u8>, u64)>,
    dirty: Vec<Vec<bool>>,
    ram: RamSections,
    requests: VecDeque<(usize, u64)>,
    scan: (usize, u64),
    /// Block of the previous record on the main channel (CONTINUE).
    last_block: Option<usize>,
    rp: RpDecoder,
    rp_buf: Vec<u8>,
    bitmaps_pending: usize,
    /// RESUME_ACK values received.
    pub resume_acks: Vec<u32>,
    /// Page requests received.
    pub requests_received: u64,
    /// SHUT values received.
    pub shut: Vec<u32>,
}

impl SimSource {
    /// A source with these blocks (idstr, length in bytes, a multiple of [`PAGE`]).
    pub fn new(blocks: &[(&[u8], u64)]) -> SimSource {
        SimSource {
            dirty: blocks
                .iter()
                .map(|(_, len)| vec![true; (len / PAGE) as usize])
                .collect(),
            blocks: blocks.iter().map(|(n, l)| (n.to_vec(), *l)).collect(),
            ram: RamSections {
                section_id: 2,
                footers: true,
            },
            requests: VecDeque::new(),
            scan: (0, 0),
            last_block: None,
            rp: RpDecoder::new(),
            rp_buf: Vec::new(),
            bitmaps_pending: 0,
            resume_acks: Vec::new(),
            requests_received: 0,
            shut: Vec::new(),
        }
    }

    /// The stream from its opening to postcopy running: one precopy PART sending every
    /// `precopy_every`-th page, the discard of every page still dirty, PING(2), the package
    /// (LISTEN, PING(3), RUN) and PING(4).
    pub fn start(&mut self, precopy_every: u64) -> Vec<u8> {
        let mut out = Vec::new();
        let blocks: Vec<(&[u8], u64)> = self
            .blocks
            .iter()
            .map(|(n, l)| (n.as_slice(), *l))
            .collect();
        put_opening(&mut out, b"pc-q35-10.0", self.ram.section_id, &blocks);
        self.ram.open_part(&mut out);
        for b in 0..self.blocks.len() {
            for p in 0..self.dirty[b].len() as u64 {
                if precopy_every > 0 && p % precopy_every == 0 {
                    self.emit(&mut out, b, p);
                }
            }
        }
        self.ram.close(&mut out);
        for (b, (name, _)) in self.blocks.iter().enumerate() {
            let ranges: Vec<(u64, u64)> = self.dirty[b]
                .iter()
                .enumerate()
                .filter(|(_, d)| **d)
                .map(|(p, _)| (p as u64 * PAGE, PAGE))
                .collect();
            if !ranges.is_empty() {
                put_discards(&mut out, name, &ranges);
            }
        }
        // QEMU resets the main channel's previous block at the switch.
        self.last_block = None;
        // Device state: a FULL section, which the codec passes through unframed.
        put_postcopy_switch(&mut out, b"device state bytes");
        Command::Ping(4).encode(&mut out);
        out
    }

    fn emit(&mut self, out: &mut Vec<u8>, b: usize, p: u64) {
        self.dirty[b][p as usize] = false;
        let idstr = (self.last_block != Some(b)).then_some(self.blocks[b].0.as_slice());
        match page_content(b, p) {
            Some(data) => put_page(out, idstr, p * PAGE, &data),
            None => put_zero(out, idstr, p * PAGE),
        }
        self.last_block = Some(b);
    }

    /// A requested page sent on the preempt channel (its own CONTINUE state: the block is
    /// always named); it leaves the dirty set like any page written.
    pub fn preempt_page(&mut self, b: usize, p: u64) -> Vec<u8> {
        self.dirty[b][p as usize] = false;
        let mut out = Vec::new();
        let name = self.blocks[b].0.as_slice();
        match page_content(b, p) {
            Some(data) => put_page(&mut out, Some(name), p * PAGE, &data),
            None => put_zero(&mut out, Some(name), p * PAGE),
        }
        out
    }

    /// Whether any page is still dirty.
    pub fn has_dirty(&self) -> bool {
        self.dirty.iter().any(|d| d.iter().any(|x| *x))
    }

    /// One PART section of at most `n` pages, requested ones first (empty if none dirty).
    pub fn part(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        if !self.has_dirty() {
            return out;
        }
        self.ram.open_part(&mut out);
        let mut sent = 0;
        while sent < n {
            let next = match self.requests.pop_front() {
                Some((b, p)) if self.dirty[b][p as usize] => Some((b, p)),
                Some(_) => continue,
                None => self.next_dirty(),
            };
            let Some((b, p)) = next else { break };
            self.emit(&mut out, b, p);
            sent += 1;
        }
        self.ram.close(&mut out);
        out
    }

    fn next_dirty(&mut self) -> Option<(usize, u64)> {
        let total: usize = self.dirty.iter().map(Vec::len).sum();
        for _ in 0..total {
            let (b, p) = self.scan;
            let found = self.dirty[b][p as usize];
            self.scan = if p + 1 < self.dirty[b].len() as u64 {
                (b, p + 1)
            } else {
                ((b + 1) % self.dirty.len(), 0)
            };
            if found {
                return Some((b, p));
            }
        }
        None
    }

    /// The END section and EOF (when nothing is dirty).
    pub fn finish(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        self.ram.open_end(&mut out);
        self.ram.close(&mut out);
        out.push(0); // EOF
        out
    }

    /// The first bytes of a resume connection: RECV_BITMAP for every block.
    pub fn resume_start(&mut self) -> Vec<u8> {
        self.rp = RpDecoder::new();
        self.rp_buf.clear();
        let mut out = Vec::new();
        for (name, _) in &self.blocks {
            Command::RecvBitmap { block: name }.encode(&mut out);
        }
        self.bitmaps_pending = self.blocks.len();
        out
    }

    /// Whether every requested bitmap has come back.
    pub fn bitmaps_done(&self) -> bool {
        self.bitmaps_pending == 0
    }

    /// POSTCOPY_RESUME, after the bitmaps; the previous block is forgotten.
    pub fn resume_finish(&mut self) -> Vec<u8> {
        self.last_block = None;
        let mut out = Vec::new();
        Command::PostcopyResume.encode(&mut out);
        out
    }

    /// Return-path bytes from the sidecar. Panics on anything a QEMU source would reject
    /// (a wrong bitmap size or end mark, an unknown block, a misaligned request).
    pub fn on_return_path(&mut self, bytes: &[u8]) {
        self.rp_buf.extend_from_slice(bytes);
        let mut pos = 0;
        let mut current: Option<(usize, Vec<u8>, u64)> = None;
        while let Step::Event {
            len, event: msg, ..
        } = self.rp.next(&self.rp_buf[pos..]).expect("valid RP")
        {
            pos += len;
            match msg {
                RpMessage::ReqPagesId { start, len, block } => {
                    assert_eq!(start % PAGE, 0, "misaligned request");
                    assert_eq!(u64::from(len) % PAGE, 0);
                    let b = self.block(block);
                    assert!(
                        start + u64::from(len) <= self.blocks[b].1,
                        "request overrun: QEMU fails the migration"
                    );
                    self.requests_received += 1;
                    for p in 0..u64::from(len) / PAGE {
                        self.requests.push_back((b, start / PAGE + p));
                    }
                }
                RpMessage::ReqPages { .. } => panic!("the sidecar always names the block"),
                RpMessage::RecvBitmap { block } => {
                    current = Some((self.block(block), Vec::new(), 0));
                }
                RpMessage::BitmapSize(n) => {
                    let (b, _, size) = current.as_mut().expect("RECV_BITMAP first");
                    let nbits = self.blocks[*b].1 / PAGE;
                    assert_eq!(n, nbits.div_ceil(8).next_multiple_of(8), "bitmap size");
                    *size = n;
                }
                RpMessage::BitmapData(d) => {
                    current.as_mut().expect("size first").1.extend_from_slice(d)
                }
                RpMessage::BitmapEnd => {
                    let (b, data, size) = current.take().expect("bitmap");
                    assert_eq!(data.len() as u64, size);
                    for p in 0..self.dirty[b].len() {
                        let received = data[p / 8] & (1 << (p % 8)) != 0;
                        self.dirty[b][p] = !received;
                    }
                    self.bitmaps_pending -= 1;
                }
                RpMessage::ResumeAck(v) => self.resume_acks.push(v),
                RpMessage::Shut(v) => self.shut.push(v),
                _ => {}
            }
        }
        assert!(
            current.is_none(),
            "a bitmap split across calls is not modelled"
        );
        self.rp_buf.drain(..pos);
    }

    fn block(&self, name: &[u8]) -> usize {
        self.blocks
            .iter()
            .position(|(n, _)| n.as_slice() == name)
            .unwrap_or_else(|| panic!("unknown block {:?}", String::from_utf8_lossy(name)))
    }
}

/// A QEMU destination, seen from the wire.
pub struct SimDestination {
    dec: StreamDecoder,
    buf: Vec<u8>,
    /// Per block and page: placed (or present from precopy).
    present: Vec<Vec<bool>>,
    names: Vec<Vec<u8>>,
    /// The stream's EOF arrived.
    pub ended: bool,
    /// Pages placed in postcopy.
    pub postcopy_pages: u64,
    /// Pages placed in postcopy from the main channel, in order: (block, page, zero).
    pub placed: Vec<(usize, u64, bool)>,
    /// The preempt channel's reader: QEMU starts it at POSTCOPY_LISTEN.
    preempt: Option<PreemptDecoder>,
    /// Preempt bytes not decoded yet.
    preempt_buf: Vec<u8>,
    /// Pages placed from the preempt channel.
    pub preempt_pages: u64,
    /// The preempt channel's EOS arrived.
    pub preempt_ended: bool,
}

impl SimDestination {
    /// A destination with these blocks.
    pub fn new(blocks: &[(&[u8], u64)]) -> SimDestination {
        SimDestination {
            dec: StreamDecoder::default(),
            buf: Vec::new(),
            present: blocks
                .iter()
                .map(|(_, l)| vec![false; (l / PAGE) as usize])
                .collect(),
            names: blocks.iter().map(|(n, _)| n.to_vec()).collect(),
            ended: false,
            postcopy_pages: 0,
            placed: Vec::new(),
            preempt: None,
            preempt_buf: Vec::new(),
            preempt_pages: 0,
            preempt_ended: false,
        }
    }

    /// Bytes that reached the destination's preempt channel; read once the main channel
    /// got to POSTCOPY_LISTEN, as QEMU's preempt thread does. An error is what QEMU's
    /// preempt thread would stop on.
    pub fn feed_preempt(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.preempt_buf.extend_from_slice(bytes);
        if self.dec.phase() < PostcopyPhase::Listening {
            return Ok(());
        }
        let dec = self.preempt.get_or_insert_with(|| {
            PreemptDecoder::new(self.dec.target_page_size(), self.dec.layout().clone())
        });
        let mut pos = 0;
        loop {
            let (len, rec) = match dec.next(&self.preempt_buf[pos..]) {
                Ok(Step::Event { len, event, .. }) => (len, event),
                Ok(Step::NeedMore) => break,
                Err(e) => return Err(format!("the destination's preempt channel: {e}")),
            };
            pos += len;
            match &rec {
                RamRecord::Eos => self.preempt_ended = true,
                RamRecord::Page { header, .. } | RamRecord::Zero { header, .. } => {
                    let page = header.offset / PAGE;
                    let slot = &mut self.present[header.block][page as usize];
                    if *slot {
                        return Err(format!(
                            "EEXIST on preempt: page {page:#x} of block {} placed twice",
                            header.block
                        ));
                    }
                    match (&rec, page_content(header.block, page)) {
                        (RamRecord::Page { data, .. }, Some(e)) if **data == e[..] => {}
                        (RamRecord::Zero { .. }, None) => {}
                        _ => return Err(format!("preempt page {page:#x} has the wrong content")),
                    }
                    *slot = true;
                    self.preempt_pages += 1;
                }
                other => return Err(format!("{other:?} on the preempt channel")),
            }
        }
        self.preempt_buf.drain(..pos);
        Ok(())
    }

    /// Bytes that reached the destination; an error is what QEMU would fail with.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.buf.extend_from_slice(bytes);
        let mut pos = 0;
        loop {
            let (len, event) = match self.dec.next(&self.buf[pos..]) {
                Ok(Step::Event { len, event, .. }) => (len, event),
                Ok(Step::NeedMore) => break,
                Err(e) => return Err(format!("the destination's stream: {e}")),
            };
            let postcopy = self.dec.phase() >= PostcopyPhase::Listening;
            match &event {
                Event::Ram(rec) => {
                    if let Some(h) = rec.page_header() {
                        let page = h.offset / PAGE;
                        let slot = &mut self.present[h.block][page as usize];
                        if postcopy && *slot {
                            return Err(format!(
                                "EEXIST: page {page:#x} of block {} placed twice",
                                h.block
                            ));
                        }
                        let expected = page_content(h.block, page);
                        match (rec, expected) {
                            (RamRecord::Page { data, .. }, Some(e)) if **data == e[..] => {}
                            (RamRecord::Zero { .. }, None) => {}
                            _ => return Err(format!("page {page:#x} has the wrong content")),
                        }
                        *slot = true;
                        if postcopy {
                            self.postcopy_pages += 1;
                            self.placed.push((
                                h.block,
                                page,
                                matches!(rec, RamRecord::Zero { .. }),
                            ));
                        }
                    }
                }
                Event::Command(c @ Command::PostcopyRamDiscard { block, .. }) => {
                    let b = self
                        .names
                        .iter()
                        .position(|n| n.as_slice() == *block)
                        .ok_or("discard of an unknown block")?;
                    for (start, len) in c.discard_ranges() {
                        for p in start / PAGE..(start + len) / PAGE {
                            self.present[b][p as usize] = false;
                        }
                    }
                }
                Event::Command(Command::PostcopyAdvise(_)) => {
                    for b in &mut self.present {
                        b.fill(false);
                    }
                }
                Event::Command(Command::RecvBitmap { .. } | Command::PostcopyResume) => {
                    return Err("a held destination must never see the recovery handshake".into());
                }
                Event::Eof => self.ended = true,
                _ => {}
            }
            pos += len;
        }
        self.buf.drain(..pos);
        Ok(())
    }

    /// Pages still missing, as (block idstr, offset).
    pub fn missing(&self) -> Vec<(Vec<u8>, u64)> {
        self.present
            .iter()
            .enumerate()
            .flat_map(|(b, pages)| {
                pages
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| !**p)
                    .map(move |(p, _)| (self.names[b].clone(), p as u64 * PAGE))
            })
            .collect()
    }

    /// A page request as QEMU's fault thread would send it.
    pub fn request(&self, block: &[u8], offset: u64) -> Vec<u8> {
        let mut out = Vec::new();
        RpMessage::ReqPagesId {
            start: offset,
            len: PAGE as u32,
            block,
        }
        .encode(&mut out);
        out
    }
}
