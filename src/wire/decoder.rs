//! Incremental, sans-IO decoder of the main (forward) stream.
//!
//! The caller owns the bytes: it passes whatever it has buffered to [`StreamDecoder::next`],
//! which either returns one event that borrows from that buffer (page payloads are never
//! copied) together with the number of bytes it covers, or asks for more bytes. The caller
//! then drops exactly those bytes from the front of its buffer (forwarding them, if it is
//! a relay) and calls again. Feeding one byte at a time yields the same events as one big
//! buffer, except that pass-through data (opaque device state, VMDESCRIPTION JSON) may be
//! split into differently sized pieces; [`coalesce`] merges them for comparison.
//!
//! The decoder keeps only what the protocol needs: section ids → idstrs, the RAM block
//! table and current block, the target page size, the package boundary and the postcopy
//! phase. Memory is bounded by the largest record (a command ≤ 64 KiB + 5, a page ≤ 64 KiB,
//! the configuration) plus a 1 MiB window used to recognise a precopy stream's end.

use std::collections::HashMap;

use super::command::{Command, SECTION_COMMAND, parse_command};
use super::error::{Channel, DecodeError, ErrorKind, PResult, WireError, fail, show};
use super::ram::{
    BlockLimit, BlockListFraming, RAM_IDSTR, RAM_SECTION_VERSION, RamChannel, RamContext,
    RamLayout, RamRecord, parse_ram_record,
};
use super::stream::{
    self, Configuration, SECTION_CONFIGURATION, SECTION_EOF, SECTION_FOOTER, SECTION_SUBSECTION,
    SECTION_VMDESCRIPTION, SectionHeader, SectionKind,
};

/// Default target page size (x86); POSTCOPY_ADVISE overrides it when present.
pub const DEFAULT_TARGET_PAGE_SIZE: u64 = 4096;
/// Most distinct section ids the decoder will remember (QEMU registers a few hundred).
pub const MAX_SECTIONS: usize = 65_536;
/// Size of the window kept to recognise EOF + VMDESCRIPTION after opaque device state.
pub const TAIL_WINDOW: usize = 1 << 20;
/// Bytes of the longest fixed package trailer: PING(3), then (QEMU 10.2+) PING(0x42),
/// 9 bytes each, then POSTCOPY_RUN (5 bytes).
pub const PACKAGE_TRAILER_LEN: u64 = 23;

/// One decoded item of the main stream. Data-carrying variants borrow from the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<'a> {
    /// Magic and version.
    FileHeader {
        /// Stream version (3).
        version: u32,
    },
    /// The configuration section.
    Configuration(Configuration<'a>),
    /// A section header.
    Section(SectionHeader<'a>),
    /// A section footer.
    Footer {
        /// Id of the section it closes.
        section_id: u32,
    },
    /// A record of the `ram` section's payload.
    Ram(RamRecord<'a>),
    /// A command.
    Command(Command<'a>),
    /// The end of a PACKAGED blob (covers no bytes).
    PackageEnd,
    /// Device state the protocol does not frame, passed through unvalidated
    /// (protocol-spec/device-state.md#device-state-opaque).
    Opaque(&'a [u8]),
    /// End of the stream's sections.
    Eof,
    /// VMDESCRIPTION header; the JSON follows as [`Event::VmDescriptionData`].
    VmDescription {
        /// Length of the JSON.
        length: u32,
    },
    /// A piece of the VMDESCRIPTION JSON.
    VmDescriptionData(&'a [u8]),
}

impl Event<'_> {
    /// Appends the exact bytes this event was decoded from.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Event::FileHeader { .. } => stream::encode_file_header(out),
            Event::Configuration(c) => c.encode(out),
            Event::Section(h) => h.encode(out),
            Event::Footer { section_id } => stream::encode_footer(*section_id, out),
            Event::Ram(r) => r.encode(out),
            Event::Command(c) => c.encode(out),
            Event::PackageEnd => {}
            Event::Opaque(d) | Event::VmDescriptionData(d) => out.extend_from_slice(d),
            Event::Eof => out.push(SECTION_EOF),
            Event::VmDescription { length } => stream::encode_vmdescription_header(*length, out),
        }
    }

    /// Short name of the event kind, for timelines and counters.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Event::FileHeader { .. } => "file-header",
            Event::Configuration(_) => "configuration",
            Event::Section(_) => "section",
            Event::Footer { .. } => "footer",
            Event::Ram(_) => "ram",
            Event::Command(_) => "command",
            Event::PackageEnd => "package-end",
            Event::Opaque(_) => "opaque",
            Event::Eof => "eof",
            Event::VmDescription { .. } => "vmdescription",
            Event::VmDescriptionData(_) => "vmdescription-data",
        }
    }
}

/// Result of one decode call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step<E> {
    /// An event covering `len` bytes starting at absolute `offset`; the caller must drop
    /// exactly `len` bytes from the front of its buffer before the next call.
    Event {
        /// Absolute offset of the event's first byte in its channel.
        offset: u64,
        /// Bytes covered.
        len: usize,
        /// The event.
        event: E,
    },
    /// The buffered bytes end inside a record: read more and call again.
    NeedMore,
}

/// Destination-side postcopy phase as the stream drives it (postcopy-sequence.md#sequence-overview).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PostcopyPhase {
    /// No POSTCOPY_ADVISE yet: a precopy stream so far.
    None,
    /// POSTCOPY_ADVISE seen.
    Advised,
    /// POSTCOPY_RAM_DISCARD seen.
    Discarding,
    /// POSTCOPY_LISTEN seen: pages are now placed with userfaultfd.
    Listening,
    /// POSTCOPY_RUN seen: the destination VM runs.
    Running,
    /// EOF after postcopy.
    Ended,
}

impl PostcopyPhase {
    /// Name used in errors and reports.
    pub fn name(self) -> &'static str {
        match self {
            PostcopyPhase::None => "none",
            PostcopyPhase::Advised => "advised",
            PostcopyPhase::Discarding => "discarding",
            PostcopyPhase::Listening => "listening",
            PostcopyPhase::Running => "running",
            PostcopyPhase::Ended => "ended",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Header,
    Opening,
    Records,
    RamPayload { section_id: u32, first: bool },
    AfterRam { section_id: u32 },
    Opaque,
    PackageOpaque { hold_from: u64 },
    AfterEof,
    VmDesc { remaining: u32 },
    Done,
}

#[derive(Debug, Clone, Copy)]
struct Package {
    end: u64,
}

/// How a precopy stream that ended in opaque device state was recognised to end.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OpaqueTail {
    /// Offset of the EOF byte.
    pub eof_offset: u64,
    /// Offset of the VMDESCRIPTION record, if one followed.
    pub vmdesc_offset: Option<u64>,
    /// Length of its JSON.
    pub vmdesc_len: Option<u32>,
}

/// How the stream ended, as judged by [`StreamDecoder::finish`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEnd {
    /// EOF (and VMDESCRIPTION, if any) was decoded.
    Clean,
    /// The stream ended in opaque device state whose last bytes are exactly EOF +
    /// VMDESCRIPTION (length and JSON checked).
    OpaqueThenEof(OpaqueTail),
}

/// Options that the stream alone cannot tell the decoder.
#[derive(Debug, Clone, Default)]
pub struct DecoderOptions {
    /// Page size of each RAM block (from `x-query-ramblock`); only needed when the source
    /// has hugepage-backed blocks (protocol-spec/ram.md#ram-mem-size).
    pub block_page_sizes: HashMap<Vec<u8>, u64>,
    /// The destination's RAM blocks (from `x-query-ramblock`): a block list that does not
    /// fit them is refused before anything is sized from it.
    pub block_limits: Option<HashMap<Vec<u8>, BlockLimit>>,
}

/// Incremental decoder of the main stream. See the module docs for the calling contract.
/// Cloning snapshots the decoder (e.g. to judge a stream's end without consuming it).
#[derive(Debug, Clone)]
pub struct StreamDecoder {
    offset: u64,
    mode: Mode,
    tps: u64,
    layout: RamLayout,
    framing: BlockListFraming,
    sections: HashMap<u32, Vec<u8>>,
    ram: RamChannel,
    package: Option<Package>,
    phase: PostcopyPhase,
    failed: Option<DecodeError>,
    tail: Vec<u8>,
    tail_start: u64,
    opaque_from: Option<u64>,
    /// Whether sections of this stream end with a footer (`send-section-footer`), once
    /// the first `ram` section after its EOS showed it.
    footers: Option<bool>,
}

/// Why a stream cannot be continued on a new connection after a cut
/// ([`StreamDecoder::resume_after_cut`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResumeRefusal {
    /// The cut came before the destination ran the VM (before POSTCOPY_RUN): QEMU fails
    /// such a migration instead of pausing it.
    #[error("the stream was cut in phase '{0}', before the destination ran the VM")]
    NotRunning(&'static str),
    /// The cut came inside the device-state package.
    #[error("the stream was cut inside the device-state package")]
    InPackage,
    /// The stream had become opaque (a non-RAM iterable device such as `dirty-bitmap`),
    /// so the point where the cut left the destination cannot be known.
    #[error("the stream was cut in device state the codec does not frame")]
    Opaque,
}

enum Parsed<'a> {
    Event(Event<'a>, usize),
    /// A state change that consumed nothing; loop.
    Again,
}

impl Default for StreamDecoder {
    fn default() -> Self {
        Self::new(DecoderOptions::default())
    }
}

impl StreamDecoder {
    /// A decoder for a fresh migration stream (starting with the file header).
    pub fn new(options: DecoderOptions) -> Self {
        StreamDecoder {
            offset: 0,
            mode: Mode::Header,
            tps: DEFAULT_TARGET_PAGE_SIZE,
            layout: RamLayout::default(),
            framing: BlockListFraming {
                block_page_sizes: options.block_page_sizes,
                block_limits: options.block_limits,
                ..Default::default()
            },
            sections: HashMap::new(),
            ram: RamChannel::default(),
            package: None,
            phase: PostcopyPhase::None,
            failed: None,
            tail: Vec::new(),
            tail_start: 0,
            opaque_from: None,
            footers: None,
        }
    }

    /// A decoder for the stream of a migration that is already in postcopy and whose
    /// opening it never saw (a restarted sidecar taking over a paused migration): the
    /// `ram` section's id, the block table and the target page size come from elsewhere
    /// (the state the first sidecar wrote), and decoding starts at a section boundary of
    /// a resumed connection (protocol-spec/postcopy-sequence.md#sequence-recovery).
    pub fn resumed(
        options: DecoderOptions,
        ram_section_id: u32,
        layout: RamLayout,
        target_page_size: u64,
    ) -> Self {
        let mut d = Self::new(options);
        d.mode = Mode::Records;
        d.layout = layout;
        d.tps = target_page_size;
        d.sections.insert(ram_section_id, RAM_IDSTR.to_vec());
        d.phase = PostcopyPhase::Running;
        d.ram.postcopy_listening = true;
        d.framing.postcopy_advised = true;
        d
    }

    /// Id of the `ram` section, once START announced it.
    pub fn ram_section_id(&self) -> Option<u32> {
        self.sections
            .iter()
            .find(|(_, name)| name.as_slice() == RAM_IDSTR)
            .map(|(id, _)| *id)
    }

    /// The bytes that end a `ram` section the stream left open, exactly as the source
    /// would have ended it: EOS, then the footer if this stream uses footers. Empty when
    /// the decoder stands between sections.
    ///
    /// After a cut in postcopy, a destination whose connection the sidecar keeps open is
    /// still inside that section; a resumed source starts a new one
    /// (protocol-spec/postcopy-sequence.md#sequence-hold).
    pub fn close_open_section(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self.mode {
            Mode::RamPayload { section_id, .. } => {
                RamRecord::Eos.encode(&mut out);
                if self.footers != Some(false) {
                    stream::encode_footer(section_id, &mut out);
                }
            }
            Mode::AfterRam { section_id } if self.footers != Some(false) => {
                stream::encode_footer(section_id, &mut out);
            }
            _ => {}
        }
        out
    }

    /// Whether this stream could continue on a new connection after a cut now (see
    /// [`Self::resume_after_cut`]).
    pub fn can_resume(&self) -> Result<(), ResumeRefusal> {
        // A package whose last byte was decoded is whole at the destination (its RUN ran)
        // even if the read ended before the decoder reported its end.
        if self.package.is_some_and(|p| p.end != self.offset) {
            return Err(ResumeRefusal::InPackage);
        }
        if self.phase < PostcopyPhase::Running {
            return Err(ResumeRefusal::NotRunning(self.phase.name()));
        }
        if matches!(self.mode, Mode::Opaque | Mode::PackageOpaque { .. }) {
            return Err(ResumeRefusal::Opaque);
        }
        Ok(())
    }

    /// Continues this stream on a new connection after a cut: a resumed source sends no
    /// header, starts at a section boundary, and has forgotten its previous block
    /// (protocol-spec/postcopy-sequence.md#sequence-recovery). Offsets restart at 0 for
    /// the new connection. Bytes of a record the cut interrupted were never decoded, so
    /// they are simply not part of the continued stream.
    pub fn resume_after_cut(&mut self) -> Result<(), ResumeRefusal> {
        self.can_resume()?;
        // Only a whole package can remain; the resumed stream's offsets restart at 0, so
        // its end would never be reached.
        self.package = None;
        // Mid-section, or past an EOF the source will send again after a resume that
        // finds nothing left to send.
        self.mode = Mode::Records;
        self.ram.current = None;
        self.offset = 0;
        self.failed = None;
        Ok(())
    }

    /// Absolute offset of the next byte the decoder expects.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The postcopy phase reached so far.
    pub fn phase(&self) -> PostcopyPhase {
        self.phase
    }

    /// The RAM block table announced so far.
    pub fn layout(&self) -> &RamLayout {
        &self.layout
    }

    /// The target page size in force (4096 unless ADVISE said otherwise).
    pub fn target_page_size(&self) -> u64 {
        self.tps
    }

    /// Idstr of a section id announced by START/FULL.
    pub fn section_name(&self, id: u32) -> Option<&[u8]> {
        self.sections.get(&id).map(Vec::as_slice)
    }

    /// Whether the decoder is inside a PACKAGED blob.
    pub fn in_package(&self) -> bool {
        self.package.is_some()
    }

    /// Whether the stream stands between two page records of a RAM PART or END section,
    /// outside any package: the one kind of place where a page record may be inserted
    /// without changing what the rest of the stream means (ram.md#ram-continue).
    pub fn between_pages(&self) -> bool {
        matches!(self.mode, Mode::RamPayload { first: false, .. }) && self.package.is_none()
    }

    /// Whether the decoder has given up framing and passes device state through
    /// (protocol-spec/device-state.md#device-state-opaque).
    pub fn is_opaque(&self) -> bool {
        matches!(self.mode, Mode::Opaque | Mode::PackageOpaque { .. })
    }

    /// Decodes the next event from `input`, which must start at [`Self::offset`].
    pub fn next<'a>(&mut self, input: &'a [u8]) -> Result<Step<Event<'a>>, DecodeError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        loop {
            let limit = match self.package {
                Some(p) => (p.end - self.offset).min(input.len() as u64) as usize,
                None => input.len(),
            };
            let inp = &input[..limit];
            let package_left = self.package.map(|p| p.end - self.offset);
            match self.parse(inp) {
                Ok((_, Parsed::Again)) => continue,
                Ok((_, Parsed::Event(event, len))) => {
                    let offset = self.offset;
                    self.offset += len as u64;
                    return Ok(Step::Event { offset, len, event });
                }
                Err(nom::Err::Incomplete(_)) => {
                    if package_left.is_some_and(|left| inp.len() as u64 >= left) {
                        return Err(self.poison(self.offset, ErrorKind::CrossesPackageEnd));
                    }
                    return Ok(Step::NeedMore);
                }
                Err(nom::Err::Error(e) | nom::Err::Failure(e)) => {
                    let at = self.offset + error_position(inp, e.input) as u64;
                    return Err(self.poison(at, e.kind));
                }
            }
        }
    }

    /// Judges the end of the stream; `rest` are the bytes left unconsumed.
    pub fn finish(&mut self, rest: &[u8]) -> Result<StreamEnd, DecodeError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let truncated = |what| ErrorKind::Truncated(what);
        let kind = if self.package.is_some() {
            truncated("a PACKAGED blob")
        } else {
            match self.mode {
                Mode::AfterEof | Mode::Done if rest.is_empty() => return Ok(StreamEnd::Clean),
                Mode::Opaque if rest.is_empty() => match self.recognise_tail() {
                    Some(t) => return Ok(StreamEnd::OpaqueThenEof(t)),
                    None => {
                        truncated("opaque device state with no recognisable EOF + VMDESCRIPTION")
                    }
                },
                Mode::Header => truncated("the file header"),
                Mode::VmDesc { .. } => truncated("the VMDESCRIPTION JSON"),
                Mode::RamPayload { .. } => truncated("a ram section"),
                _ if !rest.is_empty() => truncated("a record"),
                _ => truncated("the stream before its EOF"),
            }
        };
        Err(self.poison(self.offset, kind))
    }

    /// How the stream would end if it ended here: `Some` when everything decoded so far
    /// ends in opaque device state followed by exactly EOF + VMDESCRIPTION. A precopy
    /// source with a return path keeps its socket open until the destination's SHUT, so a
    /// consumer that must answer SHUT asks this instead of waiting for the socket's end.
    pub fn opaque_end(&self) -> Option<OpaqueTail> {
        if self.failed.is_some() || self.package.is_some() || !matches!(self.mode, Mode::Opaque) {
            return None;
        }
        self.recognise_tail()
    }

    fn poison(&mut self, offset: u64, kind: ErrorKind) -> DecodeError {
        let e = DecodeError {
            channel: Channel::Main,
            offset,
            kind,
        };
        self.failed = Some(e.clone());
        e
    }

    fn parse<'a>(&mut self, inp: &'a [u8]) -> PResult<'a, Parsed<'a>> {
        let done =
            |rest: &'a [u8], ev: Event<'a>| Ok((rest, Parsed::Event(ev, inp.len() - rest.len())));
        match self.mode {
            Mode::Header => {
                let (rest, version) = stream::parse_file_header(inp)?;
                self.mode = Mode::Opening;
                done(rest, Event::FileHeader { version })
            }
            Mode::Opening => {
                let (_, t) = super::primitives::u8_(inp)?;
                if t != SECTION_CONFIGURATION {
                    self.mode = Mode::Records;
                    return Ok((inp, Parsed::Again));
                }
                let (rest, cfg) = stream::parse_configuration(inp)?;
                self.framing.ignore_shared = cfg.has_capability(b"x-ignore-shared");
                self.framing.mapped_ram = cfg.has_capability(b"mapped-ram");
                self.mode = Mode::Records;
                done(rest, Event::Configuration(cfg))
            }
            Mode::Records => self.parse_record(inp),
            Mode::RamPayload { section_id, first } => {
                let ctx = if first {
                    RamContext::SectionStart
                } else {
                    RamContext::Pages
                };
                let (rest, rec) = parse_ram_record(
                    inp,
                    self.tps,
                    ctx,
                    &mut self.ram,
                    &mut self.layout,
                    &self.framing,
                )?;
                self.mode = if rec == RamRecord::Eos {
                    Mode::AfterRam { section_id }
                } else {
                    Mode::RamPayload {
                        section_id,
                        first: false,
                    }
                };
                done(rest, Event::Ram(rec))
            }
            Mode::AfterRam { section_id } => {
                if self.package.is_some_and(|p| p.end == self.offset) {
                    self.mode = Mode::Records;
                    return Ok((inp, Parsed::Again));
                }
                let (_, t) = super::primitives::u8_(inp)?;
                if t != SECTION_FOOTER {
                    self.footers.get_or_insert(false);
                    self.mode = Mode::Records;
                    return Ok((inp, Parsed::Again));
                }
                self.footers = Some(true);
                let (rest, id) = stream::parse_footer(inp)?;
                if id != section_id {
                    return fail(
                        &inp[1..],
                        ErrorKind::FooterMismatch {
                            expected: section_id,
                            found: id,
                        },
                    );
                }
                self.mode = Mode::Records;
                done(rest, Event::Footer { section_id })
            }
            Mode::Opaque => {
                if inp.is_empty() {
                    return Err(nom::Err::Incomplete(nom::Needed::Unknown));
                }
                self.remember_tail(inp);
                done(&inp[inp.len()..], Event::Opaque(inp))
            }
            Mode::PackageOpaque { hold_from } => self.parse_package_opaque(inp, hold_from),
            Mode::AfterEof => {
                let (_, t) = super::primitives::u8_(inp)?;
                if t != SECTION_VMDESCRIPTION {
                    return fail(inp, ErrorKind::TrailingData(t));
                }
                let (rest, length) = stream::parse_vmdescription_header(inp)?;
                self.mode = if length == 0 {
                    Mode::Done
                } else {
                    Mode::VmDesc { remaining: length }
                };
                done(rest, Event::VmDescription { length })
            }
            Mode::VmDesc { remaining } => {
                if inp.is_empty() {
                    return Err(nom::Err::Incomplete(nom::Needed::Unknown));
                }
                let n = inp.len().min(remaining as usize);
                let left = remaining - n as u32;
                self.mode = if left == 0 {
                    Mode::Done
                } else {
                    Mode::VmDesc { remaining: left }
                };
                done(&inp[n..], Event::VmDescriptionData(&inp[..n]))
            }
            Mode::Done => {
                let (_, t) = super::primitives::u8_(inp)?;
                fail(inp, ErrorKind::TrailingData(t))
            }
        }
    }

    fn parse_record<'a>(&mut self, inp: &'a [u8]) -> PResult<'a, Parsed<'a>> {
        let done =
            |rest: &'a [u8], ev: Event<'a>| Ok((rest, Parsed::Event(ev, inp.len() - rest.len())));
        if let Some(p) = self.package
            && p.end == self.offset
        {
            self.package = None;
            return Ok((inp, Parsed::Event(Event::PackageEnd, 0)));
        }
        let (_, t) = super::primitives::u8_(inp)?;
        match t {
            SECTION_EOF => {
                if self.package.is_some() {
                    return fail(inp, ErrorKind::EofInPackage);
                }
                if self.phase == PostcopyPhase::Running {
                    self.phase = PostcopyPhase::Ended;
                }
                self.mode = Mode::AfterEof;
                done(&inp[1..], Event::Eof)
            }
            stream::SECTION_START
            | stream::SECTION_PART
            | stream::SECTION_END
            | stream::SECTION_FULL => {
                let (rest, h) = stream::parse_section_header(inp)?;
                let is_ram = match &h.ident {
                    Some(id) => {
                        let is_ram = id.idstr == RAM_IDSTR;
                        if is_ram && id.version_id != RAM_SECTION_VERSION {
                            return fail(inp, ErrorKind::RamVersion(id.version_id));
                        }
                        if !self.sections.contains_key(&h.section_id)
                            && self.sections.len() >= MAX_SECTIONS
                        {
                            return fail(
                                inp,
                                ErrorKind::BadCommandPayload {
                                    name: "SECTION",
                                    what: format!("more than {MAX_SECTIONS} section ids"),
                                },
                            );
                        }
                        self.sections.insert(h.section_id, id.idstr.to_vec());
                        is_ram
                    }
                    None => match self.sections.get(&h.section_id) {
                        Some(name) => name == RAM_IDSTR,
                        None => return fail(&inp[1..], ErrorKind::UnknownSectionId(h.section_id)),
                    },
                };
                let end = self.offset + (inp.len() - rest.len()) as u64;
                if is_ram && h.kind != SectionKind::Full {
                    self.mode = Mode::RamPayload {
                        section_id: h.section_id,
                        first: h.kind == SectionKind::Start,
                    };
                } else {
                    self.enter_opaque(end);
                }
                done(rest, Event::Section(h))
            }
            SECTION_COMMAND => {
                let (rest, cmd) = parse_command(inp)?;
                self.apply_command(inp, &cmd)?;
                if let Command::Packaged { length } = cmd {
                    let end = self.offset + (inp.len() - rest.len()) as u64;
                    self.package = Some(Package {
                        end: end + u64::from(length),
                    });
                }
                done(rest, Event::Command(cmd))
            }
            SECTION_SUBSECTION => fail(inp, ErrorKind::StraySubsection),
            SECTION_CONFIGURATION => fail(inp, ErrorKind::MisplacedConfiguration),
            other => fail(inp, ErrorKind::UnknownSectionType(other)),
        }
    }

    /// Validates a command against the postcopy phase and applies its effect on state.
    fn apply_command<'a>(
        &mut self,
        inp: &'a [u8],
        cmd: &Command<'_>,
    ) -> Result<(), nom::Err<WireError<'a>>> {
        let phase = self.phase;
        let violation = |command| {
            fail::<()>(
                inp,
                ErrorKind::PhaseViolation {
                    command,
                    phase: phase.name(),
                },
            )
        };
        match cmd {
            Command::PostcopyAdvise(advise) => {
                if phase != PostcopyPhase::None {
                    violation("POSTCOPY_ADVISE")?;
                }
                self.phase = PostcopyPhase::Advised;
                if let Some(a) = advise {
                    self.framing.postcopy_advised = true;
                    self.framing.pagesize_summary = a.pagesize_summary;
                    self.tps = a.target_page_size;
                }
            }
            Command::PostcopyRamDiscard { block, .. } => {
                if !matches!(phase, PostcopyPhase::Advised | PostcopyPhase::Discarding) {
                    violation("POSTCOPY_RAM_DISCARD")?;
                }
                let Some(id) = self.layout.find(block) else {
                    return fail::<()>(inp, ErrorKind::UnknownRamBlock(show(block)))
                        .map(|_: (&[u8], ())| ());
                };
                let length = self.layout.block(id).used_length;
                for (start, len) in cmd.discard_ranges() {
                    if start.checked_add(len).is_none_or(|end| end > length) {
                        return fail::<()>(
                            inp,
                            ErrorKind::OffsetOutOfRange {
                                block: show(block),
                                offset: start,
                                length,
                            },
                        )
                        .map(|_: (&[u8], ())| ());
                    }
                }
                self.phase = PostcopyPhase::Discarding;
            }
            Command::PostcopyListen => {
                if !matches!(phase, PostcopyPhase::Advised | PostcopyPhase::Discarding) {
                    violation("POSTCOPY_LISTEN")?;
                }
                self.phase = PostcopyPhase::Listening;
                self.ram.postcopy_listening = true;
            }
            Command::PostcopyRun => {
                if phase != PostcopyPhase::Listening {
                    violation("POSTCOPY_RUN")?;
                }
                self.phase = PostcopyPhase::Running;
            }
            Command::Packaged { .. } if self.package.is_some() => {
                return fail::<()>(inp, ErrorKind::NestedPackage).map(|_: (&[u8], ())| ());
            }
            _ => {}
        }
        Ok(())
    }

    fn enter_opaque(&mut self, at: u64) {
        self.opaque_from = Some(at);
        match self.package {
            Some(p) => {
                let hold = (p.end - at).min(PACKAGE_TRAILER_LEN);
                self.mode = Mode::PackageOpaque {
                    hold_from: p.end - hold,
                };
            }
            None => self.mode = Mode::Opaque,
        }
    }

    /// Inside a package, device state runs up to the package's fixed trailer (up to two
    /// PINGs, then POSTCOPY_RUN), which is recognised by its exact encoding at the
    /// package's end (protocol-spec/device-state.md#device-state-opaque).
    fn parse_package_opaque<'a>(
        &mut self,
        inp: &'a [u8],
        hold_from: u64,
    ) -> PResult<'a, Parsed<'a>> {
        let end = self.package.map(|p| p.end).unwrap_or(hold_from);
        if self.offset < hold_from {
            if inp.is_empty() {
                return Err(nom::Err::Incomplete(nom::Needed::Unknown));
            }
            let n = inp.len().min((hold_from - self.offset) as usize);
            return Ok((&inp[n..], Parsed::Event(Event::Opaque(&inp[..n]), n)));
        }
        let hold = (end - hold_from) as usize;
        if inp.len() < hold {
            return Err(nom::Err::Incomplete(nom::Needed::new(hold - inp.len())));
        }
        let t = &inp[..hold];
        let is_run = |b: &[u8]| b == [SECTION_COMMAND, 0, 5, 0, 0];
        let is_ping = |b: &[u8]| b[..5] == [SECTION_COMMAND, 0, 2, 0, 4];
        // The trailer's longest form that the held bytes end with: PING PING RUN (10.2+),
        // PING RUN, or RUN alone (bitmap-only postcopy).
        let ends_run = hold >= 5 && is_run(&t[hold - 5..]);
        let pings = if !ends_run {
            0
        } else if hold >= 23 && is_ping(&t[hold - 23..]) && is_ping(&t[hold - 14..]) {
            2
        } else if hold >= 14 && is_ping(&t[hold - 14..]) {
            1
        } else {
            0
        };
        let opaque_len = if ends_run { hold - 5 - 9 * pings } else { hold };
        self.mode = Mode::Records;
        if opaque_len == 0 {
            return Ok((inp, Parsed::Again));
        }
        Ok((
            &inp[opaque_len..],
            Parsed::Event(Event::Opaque(&t[..opaque_len]), opaque_len),
        ))
    }

    fn remember_tail(&mut self, data: &[u8]) {
        if data.len() >= TAIL_WINDOW {
            self.tail.clear();
            self.tail
                .extend_from_slice(&data[data.len() - TAIL_WINDOW..]);
            self.tail_start = self.offset + (data.len() - TAIL_WINDOW) as u64;
            return;
        }
        let overflow = (self.tail.len() + data.len()).saturating_sub(TAIL_WINDOW);
        if overflow > 0 {
            self.tail.drain(..overflow);
            self.tail_start += overflow as u64;
        }
        if self.tail.is_empty() {
            self.tail_start = self.offset;
        }
        self.tail.extend_from_slice(data);
    }

    /// Finds `EOF, 0x06, be32 len, <len bytes of JSON>` ending exactly at the stream's end.
    fn recognise_tail(&self) -> Option<OpaqueTail> {
        let t = &self.tail;
        let from = self.opaque_from.unwrap_or(0).max(self.tail_start);
        let skip = (from - self.tail_start) as usize;
        // Scan candidate VMDESCRIPTION starts from the end: the JSON is the last thing.
        for start in (skip + 1..t.len().saturating_sub(4)).rev() {
            if t[start] != SECTION_VMDESCRIPTION || t[start - 1] != SECTION_EOF {
                continue;
            }
            let len = u32::from_be_bytes(t[start + 1..start + 5].try_into().ok()?);
            if start + 5 + len as usize != t.len() {
                continue;
            }
            let json = &t[start + 5..];
            if serde_json::from_slice::<serde_json::Value>(json).is_ok() {
                return Some(OpaqueTail {
                    eof_offset: self.tail_start + start as u64 - 1,
                    vmdesc_offset: Some(self.tail_start + start as u64),
                    vmdesc_len: Some(len),
                });
            }
        }
        None
    }
}

/// Position within `inp` of the slice a parser failed at. Errors may be raised on a
/// sub-slice that is not a suffix of the input (e.g. a command's payload), so the
/// position comes from the slice's address, not from its remaining length.
/// Turns one parser result of a single-record decoder (preempt channel, return path) into a
/// [`Step`]: `on_event` validates or applies the record before the offset advances.
pub(crate) fn to_step<'a, T>(
    r: PResult<'a, T>,
    input: &'a [u8],
    offset: &mut u64,
    on_event: impl FnOnce(&T) -> Result<(), ErrorKind>,
) -> Result<Step<T>, (u64, ErrorKind)> {
    match r {
        Ok((rest, event)) => {
            on_event(&event).map_err(|kind| (*offset, kind))?;
            let len = input.len() - rest.len();
            let at = *offset;
            *offset += len as u64;
            Ok(Step::Event {
                offset: at,
                len,
                event,
            })
        }
        Err(nom::Err::Incomplete(_)) => Ok(Step::NeedMore),
        Err(nom::Err::Error(e) | nom::Err::Failure(e)) => {
            Err((*offset + error_position(input, e.input) as u64, e.kind))
        }
    }
}

fn error_position(inp: &[u8], at: &[u8]) -> usize {
    let base = inp.as_ptr() as usize;
    match (at.as_ptr() as usize).checked_sub(base) {
        Some(pos) if pos <= inp.len() => pos,
        _ => inp.len() - at.len().min(inp.len()),
    }
}

/// Merges adjacent pass-through pieces (opaque, VMDESCRIPTION JSON) so that event lists
/// from differently chunked inputs compare equal. Returns owned copies for comparison.
pub fn coalesce(events: &[(u64, Event<'_>)]) -> Vec<(u64, String)> {
    let mut out: Vec<(u64, String)> = Vec::new();
    let mut pending: Option<(u64, &'static str, Vec<u8>)> = None;
    for (off, ev) in events {
        let piece = match ev {
            Event::Opaque(d) => Some(("opaque", *d)),
            Event::VmDescriptionData(d) => Some(("vmdesc", *d)),
            _ => None,
        };
        match (piece, &mut pending) {
            (Some((k, d)), Some((_, pk, buf))) if *pk == k => buf.extend_from_slice(d),
            (Some((k, d)), _) => {
                if let Some((o, k, b)) = pending.take() {
                    out.push((o, format!("{k}:{}", hex(&b))));
                }
                pending = Some((*off, k, d.to_vec()));
            }
            (None, _) => {
                if let Some((o, k, b)) = pending.take() {
                    out.push((o, format!("{k}:{}", hex(&b))));
                }
                out.push((*off, format!("{ev:?}")));
            }
        }
    }
    if let Some((o, k, b)) = pending.take() {
        out.push((o, format!("{k}:{}", hex(&b))));
    }
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
