//! The `ram` section payload and the preempt channel's records (protocol-spec/ram.md): a
//! sequence of records, each a `be64 offset|flags` header, an optional block idstr and a
//! body whose size the flags determine. This module parses one record at a time; the
//! per-channel state (current block, block table) lives in [`RamLayout`] and
//! [`RamChannel`], so the same code serves the main stream and the preempt channel.

use std::collections::HashMap;

use super::error::{ErrorKind, PResult, fail, show};
use super::primitives::{bytes, counted, put_counted, u8_, u16_, u32_, u64_};

/// ram.md#ram-flags: obsolete whole-page flag, never accepted by 7.2–10.x loaders.
pub const FLAG_FULL: u64 = 0x001;
/// ram.md#ram-zero
pub const FLAG_ZERO: u64 = 0x002;
/// ram.md#ram-mem-size
pub const FLAG_MEM_SIZE: u64 = 0x004;
/// ram.md#ram-page
pub const FLAG_PAGE: u64 = 0x008;
/// ram.md#ram-eos
pub const FLAG_EOS: u64 = 0x010;
/// ram.md#ram-continue
pub const FLAG_CONTINUE: u64 = 0x020;
/// ram.md#ram-xbzrle
pub const FLAG_XBZRLE: u64 = 0x040;
/// ram.md#ram-hook (RDMA only)
pub const FLAG_HOOK: u64 = 0x080;
/// ram.md#ram-compress (QEMU ≤ 9.0)
pub const FLAG_COMPRESS_PAGE: u64 = 0x100;
/// ram.md#ram-multifd-flush
pub const FLAG_MULTIFD_FLUSH: u64 = 0x200;
/// ram.md#ram-xbzrle: the only encoding byte QEMU writes.
pub const XBZRLE_ENCODING: u8 = 0x01;
/// ram.md#ram-mem-size: size of the per-block header that mapped-ram adds.
pub const MAPPED_RAM_HEADER_LEN: usize = 28;
/// The RAM section's only version (ram.md#ram-sequencing).
pub const RAM_SECTION_VERSION: u32 = 4;
/// The section idstr of RAM.
pub const RAM_IDSTR: &[u8] = b"ram";

/// zlib's compressBound, the limit QEMU 7.2 puts on a compressed page (ram.md#ram-compress).
pub fn compress_bound(n: u64) -> u64 {
    n + (n >> 12) + (n >> 14) + (n >> 25) + 13
}

/// Index of a block in the [`RamLayout`] (announcement order).
pub type BlockId = usize;

/// What the decoder knows about one RAM block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockInfo {
    /// Block idstr, e.g. `m`, `pc.ram`, `/rom@etc/acpi/tables`.
    pub name: Vec<u8>,
    /// Bytes migrated for this block.
    pub used_length: u64,
}

/// The block table announced by MEM_SIZE, shared by every channel of one migration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RamLayout {
    blocks: Vec<BlockInfo>,
    by_name: HashMap<Vec<u8>, BlockId>,
}

impl RamLayout {
    /// Adds (or, on a repeated announcement, updates) a block and returns its id.
    pub fn announce(&mut self, name: &[u8], used_length: u64) -> BlockId {
        if let Some(&id) = self.by_name.get(name) {
            self.blocks[id].used_length = used_length;
            return id;
        }
        let id = self.blocks.len();
        self.blocks.push(BlockInfo {
            name: name.to_vec(),
            used_length,
        });
        self.by_name.insert(name.to_vec(), id);
        id
    }

    /// Looks a block up by idstr.
    pub fn find(&self, name: &[u8]) -> Option<BlockId> {
        self.by_name.get(name).copied()
    }

    /// The block with this id.
    pub fn block(&self, id: BlockId) -> &BlockInfo {
        &self.blocks[id]
    }

    /// All blocks in announcement order.
    pub fn blocks(&self) -> &[BlockInfo] {
        &self.blocks
    }
}

/// Stream properties that change how MEM_SIZE entries are framed (ram.md#ram-mem-size).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockListFraming {
    /// POSTCOPY_ADVISE was seen: hugepage blocks then carry a `be64 page_size`.
    pub postcopy_advised: bool,
    /// ADVISE's page-size summary; equal to the target page size means no hugepage blocks.
    pub pagesize_summary: u64,
    /// `x-ignore-shared` in the configuration's capabilities: every entry carries `be64 mr_addr`.
    pub ignore_shared: bool,
    /// `mapped-ram` in the configuration's capabilities: a 28-byte header per entry.
    pub mapped_ram: bool,
    /// Per-block page sizes learnt out of band (x-query-ramblock), needed only for hugepages.
    pub block_page_sizes: HashMap<Vec<u8>, u64>,
    /// The destination's own blocks, when known: a block list must fit them.
    pub block_limits: Option<HashMap<Vec<u8>, BlockLimit>>,
}

/// What the destination allows a block of the source's list to be (from `x-query-ramblock`):
/// the bound that keeps a hostile block list from sizing the sidecar's tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockLimit {
    /// Most bytes the block can hold (a resizable block may grow up to this).
    pub max_length: u64,
    /// The block's page size.
    pub page_size: u64,
}

impl BlockListFraming {
    /// Checks a MEM_SIZE total against the destination's RAM.
    fn check_total(&self, total: u64) -> Result<(), ErrorKind> {
        let Some(limits) = &self.block_limits else {
            return Ok(());
        };
        let all = limits
            .values()
            .fold(0u64, |a, l| a.saturating_add(l.max_length));
        if total > all {
            return Err(ErrorKind::BlockTooLarge {
                block: "*".into(),
                length: total,
                limit: all,
            });
        }
        Ok(())
    }

    /// Checks one block entry against the destination's block of that name.
    fn check_block(
        &self,
        idstr: &[u8],
        length: u64,
        page_size: Option<u64>,
    ) -> Result<(), ErrorKind> {
        let Some(limits) = &self.block_limits else {
            return Ok(());
        };
        let Some(l) = limits.get(idstr) else {
            return Err(ErrorKind::BlockNotAtDestination(show(idstr)));
        };
        if length > l.max_length {
            return Err(ErrorKind::BlockTooLarge {
                block: show(idstr),
                length,
                limit: l.max_length,
            });
        }
        if let Some(ps) = page_size
            && ps != l.page_size
        {
            return Err(ErrorKind::BlockPageSizeMismatch {
                block: show(idstr),
                found: ps,
                expected: l.page_size,
            });
        }
        Ok(())
    }
}

/// One entry of the MEM_SIZE block list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockEntry<'a> {
    /// Block idstr.
    pub idstr: &'a [u8],
    /// Bytes migrated for this block.
    pub used_length: u64,
    /// Block page size, present for hugepage blocks under postcopy.
    pub page_size: Option<u64>,
    /// Guest physical address, present with `x-ignore-shared`.
    pub mr_addr: Option<u64>,
    /// The mapped-ram header, present with `mapped-ram`.
    pub mapped_ram_header: Option<&'a [u8]>,
}

/// Header fields common to records that address a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageHeader<'a> {
    /// Byte offset of the page within its block.
    pub offset: u64,
    /// Block idstr as sent; `None` when the CONTINUE flag reused the previous block.
    pub idstr: Option<&'a [u8]>,
    /// The block the record addresses.
    pub block: BlockId,
}

/// One record of a RAM payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RamRecord<'a> {
    /// Start of the block list; `total` is the sum of the blocks' lengths.
    MemSize {
        /// Total bytes announced.
        total: u64,
    },
    /// One block of the list.
    Block(BlockEntry<'a>),
    /// A full target page; `data` borrows the input.
    Page {
        /// Where it goes.
        header: PageHeader<'a>,
        /// The page bytes.
        data: &'a [u8],
    },
    /// A page of zeroes.
    Zero {
        /// Where it goes.
        header: PageHeader<'a>,
    },
    /// A delta-encoded page (precopy only).
    Xbzrle {
        /// Where it goes.
        header: PageHeader<'a>,
        /// The encoded delta.
        data: &'a [u8],
    },
    /// A zlib-compressed page (QEMU ≤ 9.0).
    CompressedPage {
        /// Where it goes.
        header: PageHeader<'a>,
        /// The zlib stream.
        data: &'a [u8],
    },
    /// Multifd synchronisation point.
    MultifdFlush,
    /// End of this RAM payload.
    Eos,
}

impl<'a> RamRecord<'a> {
    /// The page header, for records that address a page.
    pub fn page_header(&self) -> Option<&PageHeader<'a>> {
        match self {
            RamRecord::Page { header, .. }
            | RamRecord::Zero { header }
            | RamRecord::Xbzrle { header, .. }
            | RamRecord::CompressedPage { header, .. } => Some(header),
            _ => None,
        }
    }

    /// Appends the record's exact wire form.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let put_header = |out: &mut Vec<u8>, h: &PageHeader<'_>, flag: u64| {
            let flags = flag | if h.idstr.is_none() { FLAG_CONTINUE } else { 0 };
            out.extend_from_slice(&(h.offset | flags).to_be_bytes());
            if let Some(id) = h.idstr {
                put_counted(out, id);
            }
        };
        match self {
            RamRecord::MemSize { total } => {
                out.extend_from_slice(&(total | FLAG_MEM_SIZE).to_be_bytes())
            }
            RamRecord::Block(b) => {
                put_counted(out, b.idstr);
                out.extend_from_slice(&b.used_length.to_be_bytes());
                if let Some(p) = b.page_size {
                    out.extend_from_slice(&p.to_be_bytes());
                }
                if let Some(a) = b.mr_addr {
                    out.extend_from_slice(&a.to_be_bytes());
                }
                if let Some(h) = b.mapped_ram_header {
                    out.extend_from_slice(h);
                }
            }
            RamRecord::Page { header, data } => {
                put_header(out, header, FLAG_PAGE);
                out.extend_from_slice(data);
            }
            RamRecord::Zero { header } => {
                put_header(out, header, FLAG_ZERO);
                out.push(0);
            }
            RamRecord::Xbzrle { header, data } => {
                put_header(out, header, FLAG_XBZRLE);
                out.push(XBZRLE_ENCODING);
                let n = u16::try_from(data.len()).expect("xbzrle length fits be16");
                out.extend_from_slice(&n.to_be_bytes());
                out.extend_from_slice(data);
            }
            RamRecord::CompressedPage { header, data } => {
                put_header(out, header, FLAG_COMPRESS_PAGE);
                let n = u32::try_from(data.len()).expect("compressed length fits be32");
                out.extend_from_slice(&n.to_be_bytes());
                out.extend_from_slice(data);
            }
            RamRecord::MultifdFlush => out.extend_from_slice(&FLAG_MULTIFD_FLUSH.to_be_bytes()),
            RamRecord::Eos => out.extend_from_slice(&FLAG_EOS.to_be_bytes()),
        }
    }
}

/// Per-channel RAM parsing state: the "previous block" that CONTINUE refers to, and the
/// remaining bytes of a block list being read.
#[derive(Debug, Clone, Default)]
pub struct RamChannel {
    /// Block of the previous page record on this channel (ram.md#ram-continue).
    pub current: Option<BlockId>,
    /// Bytes of the MEM_SIZE total not yet covered by block entries.
    pub list_remaining: Option<u64>,
    /// Page records on this channel are placed by userfaultfd (postcopy listening).
    pub postcopy_listening: bool,
}

/// Where a RAM record is being parsed, which decides what records are legal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RamContext {
    /// First record of the START section: MEM_SIZE is allowed.
    SectionStart,
    /// Inside a PART/END section, or the preempt channel.
    Pages,
}

/// Parses one RAM record, updating the layout (for block lists) and the channel state.
/// `tps` is the target page size. On `Incomplete`, no state has changed.
pub fn parse_ram_record<'a>(
    input: &'a [u8],
    tps: u64,
    ctx: RamContext,
    chan: &mut RamChannel,
    layout: &mut RamLayout,
    framing: &BlockListFraming,
) -> PResult<'a, RamRecord<'a>> {
    if let Some(remaining) = chan.list_remaining {
        return parse_block_entry(input, remaining, chan, layout, framing);
    }
    let (i, word) = u64_(input)?;
    let flags = word & (tps - 1);
    let offset = word & !(tps - 1);
    let kind = flags & !FLAG_CONTINUE;
    let continued = flags & FLAG_CONTINUE != 0;
    let addresses_page = matches!(
        kind,
        FLAG_ZERO | FLAG_PAGE | FLAG_XBZRLE | FLAG_COMPRESS_PAGE
    );
    if continued && !addresses_page {
        return fail(input, ErrorKind::UnknownRamFlags(flags));
    }
    match kind {
        FLAG_EOS | FLAG_MULTIFD_FLUSH if offset != 0 => {
            fail(input, ErrorKind::UnknownRamFlags(word))
        }
        FLAG_EOS => Ok((i, RamRecord::Eos)),
        FLAG_MULTIFD_FLUSH => {
            if chan.postcopy_listening {
                return fail(input, ErrorKind::NotAllowedInPostcopy("MULTIFD_FLUSH"));
            }
            Ok((i, RamRecord::MultifdFlush))
        }
        FLAG_MEM_SIZE => {
            if ctx != RamContext::SectionStart {
                return fail(input, ErrorKind::MisplacedMemSize);
            }
            if let Err(kind) = framing.check_total(offset) {
                return fail(input, kind);
            }
            // QEMU's loader reads block entries while bytes remain: none for a zero total.
            chan.list_remaining = (offset != 0).then_some(offset);
            Ok((i, RamRecord::MemSize { total: offset }))
        }
        FLAG_HOOK => fail(input, ErrorKind::RamHook),
        _ if addresses_page => {
            parse_page_record(input, i, offset, kind, continued, tps, chan, layout)
        }
        _ => fail(input, ErrorKind::UnknownRamFlags(flags)),
    }
}

#[allow(clippy::too_many_arguments)]
fn parse_page_record<'a>(
    record: &'a [u8],
    i: &'a [u8],
    offset: u64,
    kind: u64,
    continued: bool,
    tps: u64,
    chan: &mut RamChannel,
    layout: &RamLayout,
) -> PResult<'a, RamRecord<'a>> {
    let (i, idstr, block) = if continued {
        match chan.current {
            Some(b) => (i, None, b),
            None => return fail(record, ErrorKind::ContinueWithoutBlock),
        }
    } else {
        let (rest, id) = counted(i)?;
        match layout.find(id) {
            Some(b) => (rest, Some(id), b),
            None => return fail(i, ErrorKind::UnknownRamBlock(show(id))),
        }
    };
    let info = layout.block(block);
    if offset
        .checked_add(tps)
        .is_none_or(|end| end > info.used_length)
    {
        return fail(
            record,
            ErrorKind::OffsetOutOfRange {
                block: show(&info.name),
                offset,
                length: info.used_length,
            },
        );
    }
    let header = PageHeader {
        offset,
        idstr,
        block,
    };
    let (rest, rec) = match kind {
        FLAG_PAGE => {
            let (rest, data) = bytes(tps as usize)(i)?;
            (rest, RamRecord::Page { header, data })
        }
        FLAG_ZERO => {
            let (rest, fill) = u8_(i)?;
            if fill != 0 {
                return fail(i, ErrorKind::ZeroPageFill(fill));
            }
            (rest, RamRecord::Zero { header })
        }
        FLAG_XBZRLE => {
            if chan.postcopy_listening {
                return fail(record, ErrorKind::NotAllowedInPostcopy("XBZRLE"));
            }
            let (j, enc) = u8_(i)?;
            if enc != XBZRLE_ENCODING {
                return fail(i, ErrorKind::BadXbzrle(format!("encoding byte {enc:#04x}")));
            }
            let (j, n) = u16_(j)?;
            if u64::from(n) > tps {
                return fail(
                    i,
                    ErrorKind::BadXbzrle(format!("length {n} exceeds the page size {tps}")),
                );
            }
            let (rest, data) = bytes(n as usize)(j)?;
            (rest, RamRecord::Xbzrle { header, data })
        }
        _ => {
            let (j, n) = u32_(i)?;
            let bound = compress_bound(tps);
            if u64::from(n) > bound {
                return fail(i, ErrorKind::CompressedTooLong(n, bound as u32));
            }
            let (rest, data) = bytes(n as usize)(j)?;
            (rest, RamRecord::CompressedPage { header, data })
        }
    };
    chan.current = Some(block);
    Ok((rest, rec))
}

fn parse_block_entry<'a>(
    input: &'a [u8],
    remaining: u64,
    chan: &mut RamChannel,
    layout: &mut RamLayout,
    framing: &BlockListFraming,
) -> PResult<'a, RamRecord<'a>> {
    let (i, idstr) = counted(input)?;
    let (mut i, used_length) = u64_(i)?;
    if idstr.is_empty() {
        return fail(
            input,
            ErrorKind::BlockListOverrun("empty block idstr".into()),
        );
    }
    if used_length > remaining {
        return fail(
            input,
            ErrorKind::BlockListOverrun(format!(
                "block {:?} of {used_length:#x} bytes with only {remaining:#x} left",
                show(idstr)
            )),
        );
    }
    let mut page_size = None;
    if framing.postcopy_advised && framing.pagesize_summary != 0 {
        let host = 4096u64.max(framing.pagesize_summary & framing.pagesize_summary.wrapping_neg());
        let hugepages_possible = framing.pagesize_summary != host;
        if hugepages_possible {
            match framing.block_page_sizes.get(idstr) {
                Some(&ps) if ps != host => {
                    let (j, v) = u64_(i)?;
                    i = j;
                    page_size = Some(v);
                }
                Some(_) => {}
                None => {
                    // Not told: the bytes decide (ram.md#ram-mem-size, lookahead). A page
                    // size field is one bit the ADVISE summary announces, above the host
                    // page; the next entry's idstr (a length byte, then non-zero bytes) and
                    // a record word (non-zero flag bits below the page) never are.
                    let (j, v) = u64_(i)?;
                    if v.is_power_of_two() && v > host && framing.pagesize_summary & v != 0 {
                        i = j;
                        page_size = Some(v);
                    }
                }
            }
        }
    }
    let mut mr_addr = None;
    if framing.ignore_shared {
        let (j, v) = u64_(i)?;
        i = j;
        mr_addr = Some(v);
    }
    let mut mapped_ram_header = None;
    if framing.mapped_ram {
        let (j, v) = bytes(MAPPED_RAM_HEADER_LEN)(i)?;
        i = j;
        mapped_ram_header = Some(v);
    }
    if let Err(kind) = framing.check_block(idstr, used_length, page_size) {
        return fail(input, kind);
    }
    layout.announce(idstr, used_length);
    let left = remaining - used_length;
    chan.list_remaining = if left == 0 { None } else { Some(left) };
    Ok((
        i,
        RamRecord::Block(BlockEntry {
            idstr,
            used_length,
            page_size,
            mr_addr,
            mapped_ram_header,
        }),
    ))
}
