//! Typed decode errors: every rejection names *what* was wrong and *where* (channel and
//! absolute byte offset), so an operator can find the byte in a capture.

use std::fmt;

/// Which of the migration's byte streams an error or event belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Channel {
    /// Source → destination main channel (header, sections, commands).
    Main,
    /// Source → destination postcopy-preempt channel (bare RAM records).
    Preempt,
    /// Destination → source return path (on the main channel's socket).
    ReturnPath,
    /// Source → destination multifd channel with this id (multifd.md#multifd-channels).
    Multifd(u8),
}

impl Channel {
    /// The serialised name (`main`, `preempt`, `return-path`), for reports and labels.
    pub fn short(self) -> &'static str {
        match self {
            Channel::Main => "main",
            Channel::Preempt => "preempt",
            Channel::ReturnPath => "return-path",
            Channel::Multifd(_) => "multifd",
        }
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Channel::Main => f.write_str("main stream"),
            Channel::Preempt => f.write_str("preempt channel"),
            Channel::ReturnPath => f.write_str("return path"),
            Channel::Multifd(id) => write!(f, "multifd channel {id}"),
        }
    }
}

/// What was wrong with the bytes. Each variant is a rule from `protocol-spec/`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ErrorKind {
    /// The stream ended inside a record (or before the stream's natural end).
    #[error("stream ends inside {0}")]
    Truncated(&'static str),
    /// First four bytes are not "QEVM" (forward-stream.md#file-header).
    #[error("bad file magic {0:#010x}, expected 0x5145564d (\"QEVM\")")]
    BadMagic(u32),
    /// Only version 3 is spoken by QEMU 7.2–10.x (forward-stream.md#file-header).
    #[error("unsupported stream version {0}, expected 3")]
    UnsupportedVersion(u32),
    /// A byte where a section type was expected is not one (forward-stream.md#section-types).
    #[error("unknown section type byte {0:#04x}")]
    UnknownSectionType(u8),
    /// CONFIGURATION may only follow the file header.
    #[error("configuration section outside the stream opening")]
    MisplacedConfiguration,
    /// A configuration subsection we cannot frame (forward-stream.md#configuration).
    #[error("unknown configuration subsection {0:?}")]
    UnknownConfigSubsection(String),
    /// A configuration subsection whose version we do not know.
    #[error("configuration subsection {name:?} has version {version}, expected 1")]
    ConfigSubsectionVersion {
        /// Subsection name.
        name: String,
        /// Version found.
        version: u32,
    },
    /// PART/END/footer refers to a section id that no START/FULL announced.
    #[error("section id {0} was never announced by a START or FULL section")]
    UnknownSectionId(u32),
    /// A footer's id differs from its section's (forward-stream.md#section-footer).
    #[error("section footer id {found} does not match section {expected}")]
    FooterMismatch {
        /// Id of the section being closed.
        expected: u32,
        /// Id in the footer.
        found: u32,
    },
    /// The `ram` section must be version 4 (ram.md#ram-sequencing).
    #[error("ram section version {0}, expected 4")]
    RamVersion(u32),
    /// Command number outside 1..=11 (forward-stream.md#commands).
    #[error("unknown command {0}")]
    UnknownCommand(u16),
    /// A command's length field disagrees with its fixed or self-described size.
    #[error("command {name} has length {len}, {rule}")]
    BadCommandLength {
        /// Command name.
        name: &'static str,
        /// Length on the wire.
        len: u16,
        /// The rule it breaks.
        rule: &'static str,
    },
    /// A command payload field is invalid.
    #[error("command {name}: {what}")]
    BadCommandPayload {
        /// Command name.
        name: &'static str,
        /// What is wrong.
        what: String,
    },
    /// PACKAGED inside a package (forward-stream.md#cmd-packaged).
    #[error("package inside a package")]
    NestedPackage,
    /// A record inside a package runs past the package's end.
    #[error("record crosses the end of its package")]
    CrossesPackageEnd,
    /// A postcopy command arrived in a phase where QEMU rejects it.
    #[error("{command} not allowed in postcopy phase {phase}")]
    PhaseViolation {
        /// The command.
        command: &'static str,
        /// The phase the stream was in.
        phase: &'static str,
    },
    /// A subsection byte at the top level of the stream.
    #[error("subsection marker outside a device section")]
    StraySubsection,
    /// EOF inside a package: no QEMU version sends one there.
    #[error("EOF inside a package")]
    EofInPackage,
    /// Bytes after the stream's end (EOF, VMDESCRIPTION, or preempt EOS).
    #[error("unexpected byte {0:#04x} after the end of the stream")]
    TrailingData(u8),
    /// A RAM record header carries a flag combination no QEMU sends (ram.md#ram-flags).
    #[error("unknown RAM flag combination {0:#x}")]
    UnknownRamFlags(u64),
    /// RDMA hook records cannot be framed from the stream (ram.md#ram-hook).
    #[error("RAM_SAVE_FLAG_HOOK (RDMA) is not supported")]
    RamHook,
    /// MEM_SIZE outside the START of the ram section.
    #[error("MEM_SIZE block list outside the ram START section")]
    MisplacedMemSize,
    /// The block list does not add up to its announced total (ram.md#ram-mem-size).
    #[error("block list overruns its announced total: {0}")]
    BlockListOverrun(String),
    /// A block the destination does not have (ram.md#ram-mem-size): QEMU's loader would
    /// refuse it too, after it had started; the sidecar refuses it before.
    #[error("RAM block {0:?} does not exist at the destination")]
    BlockNotAtDestination(String),
    /// A block longer than the destination's block can ever be, or a total larger than
    /// all of the destination's RAM (the 2^60-byte block list of a hostile peer).
    #[error("RAM block {block:?} of {length:#x} bytes exceeds the destination's {limit:#x}")]
    BlockTooLarge {
        /// Block name (`*` for the block list's total).
        block: String,
        /// Bytes announced.
        length: u64,
        /// The destination's limit.
        limit: u64,
    },
    /// A block's page size differs from the destination's block.
    #[error(
        "RAM block {block:?} announces page size {found:#x}, the destination's is {expected:#x}"
    )]
    BlockPageSizeMismatch {
        /// Block name.
        block: String,
        /// Announced.
        found: u64,
        /// The destination's.
        expected: u64,
    },
    /// A configuration subsection repeated: QEMU sends each at most once, and a repeat is
    /// the start of an endless list.
    #[error("configuration subsection {0:?} repeated")]
    DuplicateConfigSubsection(String),
    /// A page record names a block the block list never announced.
    #[error("RAM block {0:?} was never announced")]
    UnknownRamBlock(String),
    /// CONTINUE with no earlier block on this channel (ram.md#ram-continue).
    #[error("CONTINUE flag with no previous block on this channel")]
    ContinueWithoutBlock,
    /// A multifd packet that does not start with 0x11223344 (multifd.md#multifd-packet).
    #[error("bad multifd magic {0:#010x}, expected 0x11223344")]
    MultifdMagic(u32),
    /// Only multifd version 1 exists (QEMU 7.2–10.2).
    #[error("multifd packet version {0}, expected 1")]
    MultifdVersion(u32),
    /// Header flags outside sync, compression and device state.
    #[error("unknown multifd flags {0:#x}")]
    MultifdFlags(u32),
    /// Compressed multifd pages: a compressor's state spans packets, so they cannot be
    /// checked one by one.
    #[error("multifd pages compressed with {0}: only uncompressed multifd is relayed")]
    MultifdCompressed(&'static str),
    /// A multifd header whose fields contradict each other.
    #[error("malformed multifd packet: {0}")]
    MultifdMalformed(&'static str),
    /// A page offset at or past the end of its block.
    #[error("page offset {offset:#x} is past the end of block {block:?} (length {length:#x})")]
    OffsetOutOfRange {
        /// Block name.
        block: String,
        /// Offset in the record.
        offset: u64,
        /// Block used length.
        length: u64,
    },
    /// A zero page whose fill byte is not 0 (ram.md#ram-zero).
    #[error("zero page with fill byte {0:#04x}")]
    ZeroPageFill(u8),
    /// XBZRLE record with a bad encoding byte or length (ram.md#ram-xbzrle).
    #[error("XBZRLE record: {0}")]
    BadXbzrle(String),
    /// Compressed page length over compressBound (ram.md#ram-compress).
    #[error("compressed page length {0} exceeds the bound {1}")]
    CompressedTooLong(u32, u32),
    /// A record type that is not allowed once postcopy is running (ram.md#ram-sequencing).
    #[error("{0} record is not allowed while postcopy is listening")]
    NotAllowedInPostcopy(&'static str),
    /// Return-path message type outside 1..=7 (return-path.md#rp-framing).
    #[error("unknown return-path message type {0}")]
    UnknownRpMessage(u16),
    /// Return-path message length over QEMU's 512-byte buffer (return-path.md#rp-limits).
    #[error("return-path message {name} has length {len}: {rule}")]
    BadRpLength {
        /// Message name.
        name: &'static str,
        /// Length on the wire.
        len: u16,
        /// The rule it breaks.
        rule: &'static str,
    },
    /// REQ_PAGES with no earlier REQ_PAGES_ID (return-path.md#rp-req-pages).
    #[error("REQ_PAGES with no previous REQ_PAGES_ID naming a block")]
    ReqPagesWithoutBlock,
    /// RECV_BITMAP trailer is malformed (return-path.md#rp-recv-bitmap).
    #[error("received-bitmap trailer: {0}")]
    BadRecvBitmap(String),
    /// A parser primitive failed in an unexpected way.
    #[error("malformed record ({0:?})")]
    Malformed(nom::error::ErrorKind),
}

/// A decode failure: the channel, the absolute byte offset of the offending field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{channel} at offset {offset}: {kind}")]
pub struct DecodeError {
    /// The stream the bytes came from.
    pub channel: Channel,
    /// Absolute offset (from the channel's first byte) of the offending field.
    pub offset: u64,
    /// What was wrong.
    pub kind: ErrorKind,
}

/// nom error carrying our [`ErrorKind`] and the input position where it was raised, so
/// the decoder can turn it into an absolute offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireError<'a> {
    /// Input remaining where the error was raised.
    pub input: &'a [u8],
    /// What was wrong.
    pub kind: ErrorKind,
}

impl<'a> nom::error::ParseError<&'a [u8]> for WireError<'a> {
    fn from_error_kind(input: &'a [u8], kind: nom::error::ErrorKind) -> Self {
        WireError {
            input,
            kind: ErrorKind::Malformed(kind),
        }
    }

    fn append(_: &'a [u8], _: nom::error::ErrorKind, other: Self) -> Self {
        other
    }
}

/// Result of one of our nom parsers.
pub type PResult<'a, T> = nom::IResult<&'a [u8], T, WireError<'a>>;

/// Fails a parse at `input` with a protocol error (never recoverable by more bytes).
pub fn fail<T>(input: &[u8], kind: ErrorKind) -> PResult<'_, T> {
    Err(nom::Err::Failure(WireError { input, kind }))
}

/// Shows an idstr for an error message; idstrs are bytes on the wire, usually ASCII.
pub fn show(idstr: &[u8]) -> String {
    String::from_utf8_lossy(idstr).into_owned()
}

impl ErrorKind {
    /// The variant's name in snake_case (e.g. `unknown_section_type`): a stable label for
    /// metrics, which must not carry the variant's data.
    pub fn name(&self) -> &'static str {
        match self {
            ErrorKind::Truncated(..) => "truncated",
            ErrorKind::BadMagic(..) => "bad_magic",
            ErrorKind::UnsupportedVersion(..) => "unsupported_version",
            ErrorKind::UnknownSectionType(..) => "unknown_section_type",
            ErrorKind::MisplacedConfiguration => "misplaced_configuration",
            ErrorKind::UnknownConfigSubsection(..) => "unknown_config_subsection",
            ErrorKind::ConfigSubsectionVersion { .. } => "config_subsection_version",
            ErrorKind::UnknownSectionId(..) => "unknown_section_id",
            ErrorKind::FooterMismatch { .. } => "footer_mismatch",
            ErrorKind::RamVersion(..) => "ram_version",
            ErrorKind::UnknownCommand(..) => "unknown_command",
            ErrorKind::BadCommandLength { .. } => "bad_command_length",
            ErrorKind::BadCommandPayload { .. } => "bad_command_payload",
            ErrorKind::NestedPackage => "nested_package",
            ErrorKind::CrossesPackageEnd => "crosses_package_end",
            ErrorKind::PhaseViolation { .. } => "phase_violation",
            ErrorKind::StraySubsection => "stray_subsection",
            ErrorKind::EofInPackage => "eof_in_package",
            ErrorKind::TrailingData(..) => "trailing_data",
            ErrorKind::UnknownRamFlags(..) => "unknown_ram_flags",
            ErrorKind::RamHook => "ram_hook",
            ErrorKind::MisplacedMemSize => "misplaced_mem_size",
            ErrorKind::BlockListOverrun(..) => "block_list_overrun",
            ErrorKind::BlockNotAtDestination(..) => "block_not_at_destination",
            ErrorKind::BlockTooLarge { .. } => "block_too_large",
            ErrorKind::BlockPageSizeMismatch { .. } => "block_page_size_mismatch",
            ErrorKind::DuplicateConfigSubsection(..) => "duplicate_config_subsection",
            ErrorKind::UnknownRamBlock(..) => "unknown_ram_block",
            ErrorKind::ContinueWithoutBlock => "continue_without_block",
            ErrorKind::MultifdMagic(..) => "multifd_magic",
            ErrorKind::MultifdVersion(..) => "multifd_version",
            ErrorKind::MultifdFlags(..) => "multifd_flags",
            ErrorKind::MultifdCompressed(..) => "multifd_compressed",
            ErrorKind::MultifdMalformed(..) => "multifd_malformed",
            ErrorKind::OffsetOutOfRange { .. } => "offset_out_of_range",
            ErrorKind::ZeroPageFill(..) => "zero_page_fill",
            ErrorKind::BadXbzrle(..) => "bad_xbzrle",
            ErrorKind::CompressedTooLong(..) => "compressed_too_long",
            ErrorKind::NotAllowedInPostcopy(..) => "not_allowed_in_postcopy",
            ErrorKind::UnknownRpMessage(..) => "unknown_rp_message",
            ErrorKind::BadRpLength { .. } => "bad_rp_length",
            ErrorKind::ReqPagesWithoutBlock => "req_pages_without_block",
            ErrorKind::BadRecvBitmap(..) => "bad_recv_bitmap",
            ErrorKind::Malformed(..) => "malformed",
        }
    }
}
