//! Shared helpers of the codec tests: builders that assemble valid streams from the
//! codec's own encoders (and know which events the decoder must report for them), the
//! canonical synthetic streams, capture loading, a seeded RNG and decode helpers.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use postcopy_sidecar::wire::check::{self, Outcome};
use postcopy_sidecar::wire::stream::{ConfigSubsection, Configuration, SectionIdent};
use postcopy_sidecar::wire::{
    Advise, BlockEntry, BlockId, Command, DecodeError, DecoderOptions, Event, OpaqueTail,
    PageHeader, PreemptDecoder, RamLayout, RamRecord, RpDecoder, RpMessage, SectionHeader,
    SectionKind, Step, StreamDecoder, StreamEnd, coalesce,
};

/// Target page size of every synthetic stream.
pub const TPS: u64 = 4096;

/// Makes test data `'static` so that expected events can borrow it.
pub fn leak(v: Vec<u8>) -> &'static [u8] {
    Box::leak(v.into_boxed_slice())
}

/// A page of recognisable bytes.
pub fn page_bytes(seed: u8) -> &'static [u8] {
    leak(
        (0..TPS as usize)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
            .collect(),
    )
}

/// The blocks of the synthetic streams: those of the development capture (and of
/// [`check::check_layout`], which the preempt fuzz target uses).
pub fn std_blocks() -> Vec<(&'static [u8], u64)> {
    check::check_layout()
        .blocks()
        .iter()
        .map(|b| (leak(b.name.clone()), b.used_length))
        .collect()
}

/// Tracks the block table and the "previous block" of one channel, as QEMU's sender does,
/// to produce page headers with or without CONTINUE.
#[derive(Debug, Clone, Default)]
pub struct PageAddressing {
    /// Blocks in announcement order (index = [`BlockId`]).
    pub blocks: Vec<(&'static [u8], u64)>,
    /// Block of the previous page record on this channel.
    pub current: Option<BlockId>,
}

impl PageAddressing {
    /// Addressing over an already announced table.
    pub fn with_blocks(blocks: Vec<(&'static [u8], u64)>) -> Self {
        PageAddressing {
            blocks,
            current: None,
        }
    }

    /// The id of a block by name (panics on a test bug).
    pub fn id(&self, name: &[u8]) -> BlockId {
        self.blocks
            .iter()
            .position(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("test bug: block {:?} not announced", show(name)))
    }

    /// Announces (or re-announces) a block.
    pub fn announce(&mut self, name: &'static [u8], len: u64) {
        match self.blocks.iter().position(|(n, _)| *n == name) {
            Some(i) => self.blocks[i].1 = len,
            None => self.blocks.push((name, len)),
        }
    }

    /// A page header for `block` at `offset`: CONTINUE when the block is the previous one.
    pub fn header(&mut self, block: &[u8], offset: u64) -> PageHeader<'static> {
        let id = self.id(block);
        let idstr = if self.current == Some(id) {
            None
        } else {
            Some(self.blocks[id].0)
        };
        self.current = Some(id);
        PageHeader {
            offset,
            idstr,
            block: id,
        }
    }

    /// A page header that always names its block (no CONTINUE).
    pub fn named(&mut self, block: &[u8], offset: u64) -> PageHeader<'static> {
        let id = self.id(block);
        self.current = Some(id);
        PageHeader {
            offset,
            idstr: Some(self.blocks[id].0),
            block: id,
        }
    }

    /// The layout the decoder should have built.
    pub fn layout(&self) -> RamLayout {
        let mut l = RamLayout::default();
        for (n, len) in &self.blocks {
            l.announce(n, *len);
        }
        l
    }
}

fn show(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A main stream with the events the decoder must report for it.
#[derive(Debug, Clone)]
pub struct Built {
    /// The wire bytes.
    pub bytes: Vec<u8>,
    /// Events the decoder must report (pass-through data possibly split differently).
    pub expected: Vec<(u64, Event<'static>)>,
    /// Options the decoder needs for this stream.
    pub options: DecoderOptions,
    /// The verdict `finish` must give.
    pub end: StreamEnd,
}

struct PackageScope {
    len_at: usize,
    cmd_index: usize,
    body_start: usize,
    opaque_from: Option<usize>,
}

/// Assembles a main stream from the codec's encoders while recording the events the
/// decoder must report. Device state it cannot frame (after a FULL section or a non-RAM
/// START) becomes one expected [`Event::Opaque`], up to the package trailer or the end.
pub struct StreamBuilder {
    out: Vec<u8>,
    expected: Vec<(u64, Event<'static>)>,
    top_opaque_from: Option<usize>,
    package: Option<PackageScope>,
    ram_sections: HashMap<u32, bool>,
    /// Page addressing of the main channel.
    pub pages: PageAddressing,
    /// Options the decoder will need.
    pub options: DecoderOptions,
    eof_at: Option<u64>,
    vmdesc: Option<(u64, u32)>,
}

impl Default for StreamBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamBuilder {
    /// An empty stream (not even the file header).
    pub fn new() -> Self {
        StreamBuilder {
            out: Vec::new(),
            expected: Vec::new(),
            top_opaque_from: None,
            package: None,
            ram_sections: HashMap::new(),
            pages: PageAddressing::default(),
            options: DecoderOptions::default(),
            eof_at: None,
            vmdesc: None,
        }
    }

    /// Bytes so far.
    pub fn len(&self) -> usize {
        self.out.len()
    }

    /// Whether nothing was added yet.
    pub fn is_empty(&self) -> bool {
        self.out.is_empty()
    }

    fn opaque(&self) -> bool {
        match &self.package {
            Some(p) => p.opaque_from.is_some(),
            None => self.top_opaque_from.is_some(),
        }
    }

    /// Appends an event: encodes it and records it as expected (unless inside device state
    /// the decoder passes through).
    pub fn push(&mut self, ev: Event<'static>) -> &mut Self {
        let at = self.out.len();
        ev.encode(&mut self.out);
        match &ev {
            Event::Eof => self.eof_at = Some(at as u64),
            Event::VmDescription { length } => self.vmdesc = Some((at as u64, *length)),
            _ => {}
        }
        if self.opaque() {
            return self;
        }
        let mut starts_opaque = false;
        match &ev {
            Event::Section(h) => {
                let is_ram = match &h.ident {
                    Some(id) => {
                        let r = id.idstr == b"ram";
                        self.ram_sections.insert(h.section_id, r);
                        r
                    }
                    None => *self
                        .ram_sections
                        .get(&h.section_id)
                        .expect("test bug: section id never announced"),
                };
                starts_opaque = !is_ram || h.kind == SectionKind::Full;
            }
            Event::Ram(RamRecord::Block(b)) => self.pages.announce(b.idstr, b.used_length),
            _ => {}
        }
        self.expected.push((at as u64, ev));
        if starts_opaque {
            let from = Some(self.out.len());
            match &mut self.package {
                Some(p) => p.opaque_from = from,
                None => self.top_opaque_from = from,
            }
        }
        self
    }

    /// Appends raw bytes that no event describes (device state, or deliberately bad data).
    pub fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        self.out.extend_from_slice(bytes);
        self
    }

    /// `QEVM`, version 3.
    pub fn header(&mut self) -> &mut Self {
        self.push(Event::FileHeader { version: 3 })
    }

    /// The configuration section.
    pub fn config(
        &mut self,
        machine: &str,
        subsections: Vec<ConfigSubsection<'static>>,
    ) -> &mut Self {
        self.push(Event::Configuration(Configuration {
            machine: leak(machine.as_bytes().to_vec()),
            subsections,
        }))
    }

    /// A command.
    pub fn cmd(&mut self, c: Command<'static>) -> &mut Self {
        self.push(Event::Command(c))
    }

    /// A START or FULL section header.
    pub fn section(
        &mut self,
        kind: SectionKind,
        section_id: u32,
        idstr: &str,
        instance_id: u32,
        version_id: u32,
    ) -> &mut Self {
        self.push(Event::Section(SectionHeader {
            kind,
            section_id,
            ident: Some(SectionIdent {
                idstr: leak(idstr.as_bytes().to_vec()),
                instance_id,
                version_id,
            }),
        }))
    }

    /// A PART or END section header.
    pub fn resume_section(&mut self, kind: SectionKind, section_id: u32) -> &mut Self {
        self.push(Event::Section(SectionHeader {
            kind,
            section_id,
            ident: None,
        }))
    }

    /// START of `ram` (version 4) with a block list of plain entries, then EOS and a footer.
    pub fn ram_start(&mut self, section_id: u32, blocks: &[(&'static [u8], u64)]) -> &mut Self {
        let entries = blocks
            .iter()
            .map(|&(idstr, used_length)| BlockEntry {
                idstr,
                used_length,
                page_size: None,
                mr_addr: None,
                mapped_ram_header: None,
            })
            .collect();
        self.ram_start_entries(section_id, entries, true)
    }

    /// START of `ram` with these block entries, then EOS and (optionally) a footer.
    pub fn ram_start_entries(
        &mut self,
        section_id: u32,
        entries: Vec<BlockEntry<'static>>,
        footer: bool,
    ) -> &mut Self {
        self.section(SectionKind::Start, section_id, "ram", 0, 4);
        let total = entries.iter().map(|e| e.used_length).sum();
        self.ram(RamRecord::MemSize { total });
        for e in entries {
            self.ram(RamRecord::Block(e));
        }
        self.eos();
        if footer {
            self.footer(section_id);
        }
        self
    }

    /// A RAM record.
    pub fn ram(&mut self, r: RamRecord<'static>) -> &mut Self {
        self.push(Event::Ram(r))
    }

    /// A full page (CONTINUE when `block` is the previous block).
    pub fn page(&mut self, block: &[u8], offset: u64, data: &'static [u8]) -> &mut Self {
        let header = self.pages.header(block, offset);
        self.ram(RamRecord::Page { header, data })
    }

    /// A zero page.
    pub fn zero(&mut self, block: &[u8], offset: u64) -> &mut Self {
        let header = self.pages.header(block, offset);
        self.ram(RamRecord::Zero { header })
    }

    /// An XBZRLE page.
    pub fn xbzrle(&mut self, block: &[u8], offset: u64, data: &'static [u8]) -> &mut Self {
        let header = self.pages.header(block, offset);
        self.ram(RamRecord::Xbzrle { header, data })
    }

    /// A compressed page.
    pub fn compressed(&mut self, block: &[u8], offset: u64, data: &'static [u8]) -> &mut Self {
        let header = self.pages.header(block, offset);
        self.ram(RamRecord::CompressedPage { header, data })
    }

    /// RAM end of section.
    pub fn eos(&mut self) -> &mut Self {
        self.ram(RamRecord::Eos)
    }

    /// A section footer.
    pub fn footer(&mut self, section_id: u32) -> &mut Self {
        self.push(Event::Footer { section_id })
    }

    /// Opens a PACKAGED blob; its length is filled in by [`Self::package_end`].
    pub fn package_begin(&mut self) -> &mut Self {
        assert!(self.package.is_none(), "test bug: nested package");
        let cmd_index = self.expected.len();
        self.cmd(Command::Packaged { length: 0 });
        let body_start = self.out.len();
        self.package = Some(PackageScope {
            len_at: body_start - 4,
            cmd_index,
            body_start,
            opaque_from: None,
        });
        self
    }

    /// Closes the PACKAGED blob: patches its length and works out which events the decoder
    /// reports for device state that runs up to the package's trailer.
    pub fn package_end(&mut self) -> &mut Self {
        let p = self.package.take().expect("test bug: no open package");
        let end = self.out.len();
        let length = u32::try_from(end - p.body_start).expect("package fits be32");
        self.out[p.len_at..p.len_at + 4].copy_from_slice(&length.to_be_bytes());
        self.expected[p.cmd_index].1 = Event::Command(Command::Packaged { length });
        if let Some(from) = p.opaque_from {
            let region = self.out[from..end].to_vec();
            let is_run = |b: &[u8]| b == [8, 0, 5, 0, 0];
            let is_ping = |b: &[u8]| b[..5] == [8, 0, 2, 0, 4];
            let n = region.len();
            let mut trailer = Vec::new();
            // The trailer: up to two PINGs (the second from QEMU 10.2), then RUN.
            let ping_at = |at: usize| {
                (at <= n && is_ping(&region[n - at..n - at + 5])).then(|| {
                    let v = u32::from_be_bytes(region[n - at + 5..n - at + 9].try_into().unwrap());
                    (end - at, Event::Command(Command::Ping(v)))
                })
            };
            let opaque_len = if n >= 5 && is_run(&region[n - 5..]) {
                let second = ping_at(14);
                let first = second.as_ref().and_then(|_| ping_at(23));
                let pings: Vec<_> = first.into_iter().chain(second).collect();
                let len = n - 5 - 9 * pings.len();
                trailer.extend(pings);
                trailer.push((end - 5, Event::Command(Command::PostcopyRun)));
                len
            } else {
                n
            };
            if opaque_len > 0 {
                self.expected.push((
                    from as u64,
                    Event::Opaque(leak(region[..opaque_len].to_vec())),
                ));
            }
            for (at, ev) in trailer {
                self.expected.push((at as u64, ev));
            }
        }
        self.expected.push((end as u64, Event::PackageEnd));
        self
    }

    /// A FULL section of a device whose state the decoder passes through unframed.
    pub fn full_device(&mut self, section_id: u32, idstr: &str, state: &[u8]) -> &mut Self {
        self.section(SectionKind::Full, section_id, idstr, 0, 1);
        self.raw(state)
    }

    /// The EOF byte.
    pub fn eof(&mut self) -> &mut Self {
        self.push(Event::Eof)
    }

    /// VMDESCRIPTION with this JSON.
    pub fn vmdesc(&mut self, json: &[u8]) -> &mut Self {
        let length = u32::try_from(json.len()).expect("json fits be32");
        self.push(Event::VmDescription { length });
        if !json.is_empty() {
            self.push(Event::VmDescriptionData(leak(json.to_vec())));
        }
        self
    }

    /// The finished stream and its expected events.
    pub fn build(&self) -> Built {
        assert!(self.package.is_none(), "test bug: package left open");
        let mut expected = self.expected.clone();
        let end = match self.top_opaque_from {
            Some(from) => {
                if from < self.out.len() {
                    expected.push((from as u64, Event::Opaque(leak(self.out[from..].to_vec()))));
                }
                StreamEnd::OpaqueThenEof(OpaqueTail {
                    eof_offset: self.eof_at.expect("test bug: opaque stream without EOF"),
                    vmdesc_offset: self.vmdesc.map(|v| v.0),
                    vmdesc_len: self.vmdesc.map(|v| v.1),
                })
            }
            None => StreamEnd::Clean,
        };
        Built {
            bytes: self.out.clone(),
            expected,
            options: self.options.clone(),
            end,
        }
    }
}

/// Bare RAM records of a preempt channel and the records the decoder must report.
pub struct PreemptBuilder {
    /// Page addressing of this channel (its own previous block).
    pub pages: PageAddressing,
    out: Vec<u8>,
    expected: Vec<(u64, RamRecord<'static>)>,
}

impl PreemptBuilder {
    /// A channel over this block table.
    pub fn new(blocks: Vec<(&'static [u8], u64)>) -> Self {
        PreemptBuilder {
            pages: PageAddressing::with_blocks(blocks),
            out: Vec::new(),
            expected: Vec::new(),
        }
    }

    /// Appends a record.
    pub fn rec(&mut self, r: RamRecord<'static>) -> &mut Self {
        self.expected.push((self.out.len() as u64, r.clone()));
        r.encode(&mut self.out);
        self
    }

    /// A full page.
    pub fn page(&mut self, block: &[u8], offset: u64, data: &'static [u8]) -> &mut Self {
        let header = self.pages.header(block, offset);
        self.rec(RamRecord::Page { header, data })
    }

    /// A zero page.
    pub fn zero(&mut self, block: &[u8], offset: u64) -> &mut Self {
        let header = self.pages.header(block, offset);
        self.rec(RamRecord::Zero { header })
    }

    /// Bytes and expected records.
    pub fn build(&self) -> (Vec<u8>, Vec<(u64, RamRecord<'static>)>) {
        (self.out.clone(), self.expected.clone())
    }
}

/// Encodes return-path messages; returns the bytes and the messages with their offsets.
pub fn rp_stream(msgs: &[RpMessage<'static>]) -> (Vec<u8>, Vec<(u64, RpMessage<'static>)>) {
    let mut out = Vec::new();
    let mut expected = Vec::new();
    for m in msgs {
        expected.push((out.len() as u64, m.clone()));
        m.encode(&mut out);
    }
    (out, expected)
}

/// A q35 configuration with no subsections (as QEMU 10.0 sends for x86).
pub fn q35(b: &mut StreamBuilder) -> &mut StreamBuilder {
    b.config("pc-q35-10.0", vec![])
}

/// Opaque device state of a FULL section: some fields, then its footer.
pub fn device_state(section_id: u32, n: usize) -> Vec<u8> {
    let mut v: Vec<u8> = (0..n).map(|i| (i * 13 + 5) as u8).collect();
    v.push(0x7e);
    v.extend_from_slice(&section_id.to_be_bytes());
    v
}

/// The canonical postcopy stream: header, configuration, OPEN_RETURN_PATH, PING 1, ADVISE,
/// START ram with the block list, PART with PAGE/ZERO/CONTINUE records, DISCARDs, PING 2,
/// PACKAGED { LISTEN, FULL timer with opaque state, PING 3, RUN }, PING 4, postcopy PART,
/// END, EOF.
pub fn postcopy_stream() -> Built {
    let blocks = std_blocks();
    let mut b = StreamBuilder::new();
    b.header();
    q35(&mut b);
    b.cmd(Command::OpenReturnPath)
        .cmd(Command::Ping(1))
        .cmd(Command::PostcopyAdvise(Some(Advise {
            pagesize_summary: TPS,
            target_page_size: TPS,
        })));
    b.ram_start(1, &blocks);
    b.cmd(Command::SwitchoverStart);
    b.resume_section(SectionKind::Part, 1)
        .page(b"m", 0, page_bytes(1))
        .page(b"m", TPS, page_bytes(2))
        .zero(b"m", 2 * TPS)
        .zero(b"pc.bios", 0)
        .zero(b"pc.bios", TPS)
        .page(b"m", 16 * TPS, page_bytes(3))
        .eos()
        .footer(1);
    b.cmd(Command::PostcopyRamDiscard {
        version: 0,
        block: b"m",
        ranges: leak(ranges(&[(0, 2 * TPS), (16 * TPS, TPS)])),
    });
    b.cmd(Command::PostcopyRamDiscard {
        version: 0,
        block: b"pc.bios",
        ranges: leak(ranges(&[(0, 0x40000)])),
    });
    b.cmd(Command::Ping(2));
    b.package_begin()
        .cmd(Command::PostcopyListen)
        .full_device(0, "timer", &device_state(0, 40))
        .cmd(Command::Ping(3))
        .cmd(Command::PostcopyRun)
        .package_end();
    b.cmd(Command::Ping(4));
    b.resume_section(SectionKind::Part, 1)
        .zero(b"m", 3 * TPS)
        .page(b"m", 0xc0000, page_bytes(4))
        .zero(b"/rom@etc/acpi/rsdp", 0)
        .eos()
        .footer(1);
    b.resume_section(SectionKind::End, 1).eos().footer(1);
    b.eof();
    b.build()
}

/// The canonical precopy stream: ram START/PART/END (with an XBZRLE page and a multifd
/// flush), then device state passed through, then EOF and VMDESCRIPTION inside it.
pub fn precopy_stream() -> Built {
    let blocks = std_blocks();
    let mut b = StreamBuilder::new();
    b.header();
    q35(&mut b);
    b.ram_start(2, &blocks);
    b.resume_section(SectionKind::Part, 2)
        .page(b"m", 0, page_bytes(9))
        .zero(b"m", TPS)
        .xbzrle(b"m", 0, leak(vec![0x02, 0x00, 0x03, 0xaa, 0xbb, 0xcc]))
        .ram(RamRecord::MultifdFlush)
        .eos()
        .footer(2);
    b.resume_section(SectionKind::End, 2)
        .zero(b"pc.rom", 0)
        .eos()
        .footer(2);
    b.full_device(3, "timer", &device_state(3, 24));
    b.full_device(4, "cpu_common", &device_state(4, 9));
    b.eof();
    b.vmdesc(br#"{"page_size":4096,"devices":[{"name":"timer","instance_id":0}]}"#);
    b.build()
}

/// A preempt channel with CONTINUE records (and, optionally, a pre-8.0 trailing EOS).
pub fn preempt_stream(trailing_eos: bool) -> (Vec<u8>, Vec<(u64, RamRecord<'static>)>) {
    let mut p = PreemptBuilder::new(std_blocks());
    p.page(b"m", 0xc0000, page_bytes(5))
        .page(b"m", 0xc1000, page_bytes(6))
        .zero(b"m", 0xc2000)
        .page(b"pc.bios", 0x1000, page_bytes(7))
        .page(b"m", 0x10000, page_bytes(8));
    if trailing_eos {
        p.rec(RamRecord::Eos);
    }
    p.build()
}

/// Every return-path message, including RECV_BITMAP with its trailer.
pub fn rp_all() -> Vec<RpMessage<'static>> {
    vec![
        RpMessage::Pong(1),
        RpMessage::SwitchoverAck,
        RpMessage::ReqPagesId {
            start: 0xc0000,
            len: 4096,
            block: b"m",
        },
        RpMessage::ReqPages {
            start: 0xc1000,
            len: 4096,
        },
        RpMessage::Pong(3),
        RpMessage::RecvBitmap { block: b"m" },
        RpMessage::BitmapSize(16),
        RpMessage::BitmapData(leak((0..16).collect())),
        RpMessage::BitmapEnd,
        RpMessage::RecvBitmap { block: b"pc.bios" },
        RpMessage::BitmapSize(0),
        RpMessage::BitmapEnd,
        RpMessage::ResumeAck(1),
        RpMessage::Shut(0),
    ]
}

/// Big-endian `(start, length)` pairs of a DISCARD payload.
pub fn ranges(r: &[(u64, u64)]) -> Vec<u8> {
    let mut v = Vec::new();
    for (s, l) in r {
        v.extend_from_slice(&s.to_be_bytes());
        v.extend_from_slice(&l.to_be_bytes());
    }
    v
}

/// Decodes a main stream in one buffer: the events, and `finish`'s verdict (or the first
/// decode error).
pub fn decode_stream(
    bytes: &[u8],
    options: DecoderOptions,
) -> (Vec<(u64, Event<'_>)>, Result<StreamEnd, DecodeError>) {
    let mut dec = StreamDecoder::new(options);
    let mut events = Vec::new();
    let mut pos = 0;
    loop {
        match dec.next(&bytes[pos..]) {
            Ok(Step::Event { offset, len, event }) => {
                assert_eq!(offset, pos as u64);
                pos += len;
                events.push((offset, event));
            }
            Ok(Step::NeedMore) => {
                let end = dec.finish(&bytes[pos..]);
                return (events, end);
            }
            Err(e) => return (events, Err(e)),
        }
    }
}

/// The first decode error of a main stream (panics if it decodes cleanly).
pub fn stream_error(bytes: &[u8], options: DecoderOptions) -> DecodeError {
    match decode_stream(bytes, options).1 {
        Ok(end) => panic!("stream decoded cleanly ({end:?}), expected an error"),
        Err(e) => e,
    }
}

/// Decodes a preempt channel in one buffer.
pub fn decode_preempt(
    bytes: &[u8],
    tps: u64,
    layout: RamLayout,
) -> (Vec<(u64, RamRecord<'_>)>, Result<(), DecodeError>) {
    let mut dec = PreemptDecoder::new(tps, layout);
    let mut events = Vec::new();
    let mut pos = 0;
    loop {
        match dec.next(&bytes[pos..]) {
            Ok(Step::Event { offset, len, event }) => {
                pos += len;
                events.push((offset, event));
            }
            Ok(Step::NeedMore) => return (events, dec.finish(&bytes[pos..])),
            Err(e) => return (events, Err(e)),
        }
    }
}

/// Decodes a return path in one buffer.
pub fn decode_rp(bytes: &[u8]) -> (Vec<(u64, RpMessage<'_>)>, Result<(), DecodeError>) {
    let mut dec = RpDecoder::new();
    let mut events = Vec::new();
    let mut pos = 0;
    loop {
        match dec.next(&bytes[pos..]) {
            Ok(Step::Event { offset, len, event }) => {
                pos += len;
                events.push((offset, event));
            }
            Ok(Step::NeedMore) => return (events, dec.finish(&bytes[pos..])),
            Err(e) => return (events, Err(e)),
        }
    }
}

/// Asserts two coalesced event lists are equal, reporting the first difference.
pub fn assert_events_eq(got: &[(u64, String)], want: &[(u64, String)], what: &str) {
    if let Some(i) = (0..got.len().max(want.len())).find(|&i| got.get(i) != want.get(i)) {
        let cut = |e: Option<&(u64, String)>| e.map(|(o, s)| (*o, check::digest(s.clone())));
        panic!(
            "{what}: events differ at index {i} of {}/{}:\n  got:  {:?}\n  want: {:?}",
            got.len(),
            want.len(),
            cut(got.get(i)),
            cut(want.get(i))
        );
    }
}

/// Checks a built main stream: decodes to the expected events and end, re-encodes to the
/// same bytes, and gives the same outcome byte at a time and in random chunks.
pub fn assert_built(b: &Built, what: &str) {
    let (events, end) = decode_stream(&b.bytes, b.options.clone());
    let end = end.unwrap_or_else(|e| panic!("{what}: decode failed: {e}"));
    assert_events_eq(&coalesce(&events), &coalesce(&b.expected), what);
    assert_eq!(end, b.end, "{what}: end of stream");
    let mut out = Vec::new();
    for (_, e) in &events {
        e.encode(&mut out);
    }
    assert!(out == b.bytes, "{what}: re-encoding differs from the input");
    assert_chunking_invariant(
        || StreamDecoder::new(b.options.clone()),
        &b.bytes,
        0x5eed ^ b.bytes.len() as u64,
        what,
    );
}

/// Whole, byte-at-a-time and random-chunk feeding give the same outcome.
pub fn assert_chunking_invariant<D: check::ChannelDecoder>(
    make: impl Fn() -> D,
    data: &[u8],
    seed: u64,
    what: &str,
) -> Outcome {
    let whole = check::feed_whole(make(), data);
    let bytewise = check::feed_bytewise(make(), data);
    check::assert_same(&whole, &bytewise, &format!("{what}: byte at a time"));
    let mut rng = Rng::new(seed);
    let chunked = check::feed(make(), data, || rng.range(1, 64) as usize);
    check::assert_same(&whole, &chunked, &format!("{what}: random chunks"));
    whole
}

/// splitmix64: a small seeded generator, so tests need no extra dependency.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator with this seed.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
}

/// The repository's root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// One capture directory under `protocol-spec/captures/`.
#[derive(Debug)]
pub struct Capture {
    /// Directory name.
    pub name: String,
    /// Main stream.
    pub main: Vec<u8>,
    /// Return path, if captured.
    pub return_path: Option<Vec<u8>>,
    /// Preempt channels, in file-name order.
    pub preempt: Vec<(String, Vec<u8>)>,
    /// Multifd channels (`multifd{id}.fwd.gz`), in file-name order.
    pub multifd: Vec<(String, Vec<u8>)>,
    /// Decoder options from `meta.json` (`block_page_sizes`: name → bytes).
    pub options: DecoderOptions,
    /// Whether `meta.json` gave options the plain `inspect` cannot take.
    pub needs_options: bool,
}

/// Every capture directory, sorted; panics if there are none.
pub fn capture_dirs() -> Vec<PathBuf> {
    let root = repo().join("protocol-spec/captures");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", root.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    assert!(
        !dirs.is_empty(),
        "no capture directories under {}",
        root.display()
    );
    dirs
}

/// Loads one capture directory (gunzipping its files).
pub fn load_capture(dir: &Path) -> Capture {
    let read = |p: &Path| {
        postcopy_sidecar::inspect::read_capture(p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    };
    let main_path = dir.join("main.fwd.gz");
    assert!(main_path.exists(), "{} has no main.fwd.gz", dir.display());
    let rp_path = dir.join("return-path.rp.gz");
    let channels = |prefix: &str| {
        let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
            .expect("capture dir")
            .map(|e| e.expect("entry").path())
            .filter(|p| {
                let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                n.starts_with(prefix) && n.ends_with(".fwd.gz")
            })
            .map(|p| {
                (
                    p.file_name().unwrap().to_string_lossy().into_owned(),
                    read(&p),
                )
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let preempt = channels("preempt");
    let multifd = channels("multifd");
    let mut options = DecoderOptions::default();
    let meta = dir.join("meta.json");
    if meta.exists() {
        let text = std::fs::read_to_string(&meta).expect("meta.json");
        let v: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", meta.display()));
        if let Some(m) = v.get("block_page_sizes").and_then(|m| m.as_object()) {
            for (name, size) in m {
                let size = size.as_u64().expect("block_page_sizes values are integers");
                options
                    .block_page_sizes
                    .insert(name.as_bytes().to_vec(), size);
            }
        }
    }
    Capture {
        name: dir.file_name().unwrap().to_string_lossy().into_owned(),
        main: read(&main_path),
        return_path: rp_path.exists().then(|| read(&rp_path)),
        preempt,
        multifd,
        needs_options: !options.block_page_sizes.is_empty(),
        options,
    }
}

/// Every capture, loaded.
pub fn captures() -> Vec<Capture> {
    capture_dirs().iter().map(|d| load_capture(d)).collect()
}

/// The development capture's main stream.
pub fn dev_capture_main() -> Vec<u8> {
    load_capture(&repo().join("protocol-spec/captures/dev-10.0-idle-postcopy")).main
}

/// Named synthetic main streams for the fuzz seed corpus: one per construct.
pub fn corpus_streams() -> Vec<(&'static str, Vec<u8>)> {
    let blocks = std_blocks();
    let entries = |f: &dyn Fn(usize, &mut BlockEntry<'static>)| -> Vec<BlockEntry<'static>> {
        blocks
            .iter()
            .enumerate()
            .map(|(i, &(idstr, used_length))| {
                let mut e = BlockEntry {
                    idstr,
                    used_length,
                    page_size: None,
                    mr_addr: None,
                    mapped_ram_header: None,
                };
                f(i, &mut e);
                e
            })
            .collect()
    };
    let mut v = vec![
        ("synthetic-postcopy", postcopy_stream().bytes),
        ("synthetic-precopy-vmdesc", precopy_stream().bytes),
    ];

    let mut b = StreamBuilder::new();
    b.header().ram_start(1, &blocks);
    b.resume_section(SectionKind::Part, 1)
        .xbzrle(b"m", 0, leak(vec![0x10, 0x04, 1, 2, 3, 4]))
        .compressed(b"pc.bios", 0x3000, leak((0..100).collect()))
        .ram(RamRecord::MultifdFlush)
        .zero(b"pc.bios", 0x4000)
        .eos()
        .footer(1);
    b.eof().vmdesc(b"{}");
    v.push(("synthetic-xbzrle-compressed-flush", b.build().bytes));

    let mut b = StreamBuilder::new();
    b.header()
        .config(
            "pc-q35-10.0",
            vec![
                ConfigSubsection::Capabilities(vec![b"x-ignore-shared", b"mapped-ram"]),
                ConfigSubsection::Uuid(leak((0..16).collect())),
            ],
        )
        .ram_start_entries(
            1,
            entries(&|i, e| {
                e.mr_addr = Some(i as u64 * 0x100000);
                e.mapped_ram_header = Some(leak(vec![i as u8; 28]));
            }),
            true,
        )
        .eof();
    v.push(("synthetic-ignore-shared-mapped-ram-uuid", b.build().bytes));

    let mut b = StreamBuilder::new();
    b.header()
        .cmd(Command::PostcopyAdvise(Some(Advise {
            pagesize_summary: TPS | (2 << 20),
            target_page_size: TPS,
        })))
        .ram_start_entries(
            1,
            entries(&|i, e| {
                if i == 0 {
                    e.page_size = Some(2 << 20)
                }
            }),
            true,
        )
        .eof();
    v.push(("synthetic-hugepage-block-list", b.build().bytes));

    let mut b = StreamBuilder::new();
    b.header()
        .cmd(Command::RecvBitmap { block: b"m" })
        .cmd(Command::PostcopyResume)
        .cmd(Command::SwitchoverStart)
        .cmd(Command::EnableColo)
        .cmd(Command::PostcopyAdvise(None))
        .eof();
    v.push(("synthetic-recovery-commands", b.build().bytes));
    v
}
