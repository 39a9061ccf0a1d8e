//! Multifd channels (protocol-spec/multifd.md): the extra connections a source with the
//! `multifd` capability opens beside main. Each starts with a 64-byte initial packet
//! naming its channel id, then carries packets of at most 512 KiB of pages: a fixed-size
//! big-endian header (the page offsets and the block name) followed by the page bytes.
//! Main keeps the block list, device state and the sync points that order these pages.
//!
//! Only uncompressed payloads are decoded (a compressed stream spans packets, so a relay
//! would have to inflate a whole channel to check one page); compressed packets are
//! refused by name.

use super::decoder::Step;
use super::error::{Channel, DecodeError, ErrorKind};
use super::ram::{BlockId, RamLayout};

/// First four bytes of every multifd packet, and of the initial packet (multifd.md#multifd-init).
pub const MAGIC: u32 = 0x1122_3344;
/// The only version QEMU 7.2–10.2 send.
pub const VERSION: u32 = 1;
/// Length of the initial packet.
pub const INIT_LEN: usize = 64;
/// Page bytes one packet can carry (`MULTIFD_PACKET_SIZE`).
pub const PACKET_DATA: u64 = 512 * 1024;
/// Header flag: a sync point (multifd.md#multifd-sync).
pub const FLAG_SYNC: u32 = 0x01;
/// Header bits naming the compression method (one value, not a set).
pub const COMPRESSION_MASK: u32 = 0x3e;
/// Header flag: a device-state packet (QEMU 10.0+).
pub const FLAG_DEVICE_STATE: u32 = 0x40;
/// Fixed part of a RAM packet header before the offset array.
const RAM_FIXED: usize = 320;
/// A device-state packet's header.
const DEVICE_STATE_HEADER: usize = 276;
/// The name field of both headers.
const NAME_LEN: usize = 256;

/// The initial packet: which channel this connection is, and whose VM it carries (the
/// destination refuses a UUID other than its own `-uuid`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MultifdInit {
    /// The source's VM UUID (all zero without `-uuid`).
    pub uuid: [u8; 16],
    /// Channel index, 0 to `multifd-channels` − 1.
    pub id: u8,
}

impl MultifdInit {
    /// Parses the initial packet from the start of a connection: `Ok(None)` until 64
    /// bytes are there. The error names the field at fault; its offset is the field's.
    pub fn parse(input: &[u8]) -> Result<Option<MultifdInit>, (u64, ErrorKind)> {
        if input.len() >= 4 && be32(input, 0) != MAGIC {
            return Err((0, ErrorKind::MultifdMagic(be32(input, 0))));
        }
        if input.len() < INIT_LEN {
            return Ok(None);
        }
        let version = be32(input, 4);
        if version != VERSION {
            return Err((4, ErrorKind::MultifdVersion(version)));
        }
        if let Some(i) = input[25..INIT_LEN].iter().position(|&b| b != 0) {
            return Err((
                25 + i as u64,
                ErrorKind::MultifdMalformed("the initial packet's unused bytes are not zero"),
            ));
        }
        let mut uuid = [0; 16];
        uuid.copy_from_slice(&input[8..24]);
        Ok(Some(MultifdInit {
            uuid,
            id: input[24],
        }))
    }

    /// Appends the 64 wire bytes.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&MAGIC.to_be_bytes());
        out.extend_from_slice(&VERSION.to_be_bytes());
        out.extend_from_slice(&self.uuid);
        out.push(self.id);
        out.extend_from_slice(&[0; INIT_LEN - 25]);
    }
}

/// A RAM packet: pages of one block (or none, for a bare sync point).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamPacket<'a> {
    /// The header flags (sync bit; compression is always none here).
    pub flags: u32,
    /// The source's packet counter (not checked by QEMU; repeats in 7.2).
    pub packet_num: u64,
    /// The block the pages belong to; `None` when the packet has no pages.
    pub block: Option<BlockId>,
    /// Offsets (bytes into the block) of the pages whose data follows, in data order.
    offsets: &'a [u8],
    normal: usize,
    /// Zero pages: offsets only, no data (QEMU 10.0+).
    zero: usize,
    data: &'a [u8],
    page_size: usize,
    /// The packet's bytes as received (7.2 leaves stale fields that only these keep).
    raw: &'a [u8],
}

impl<'a> RamPacket<'a> {
    /// Whether this packet is a sync point (7.2 may carry pages in it too).
    pub fn is_sync(&self) -> bool {
        self.flags & FLAG_SYNC != 0
    }

    /// The pages with data, as (offset in the block, page bytes).
    pub fn pages(&self) -> impl Iterator<Item = (u64, &'a [u8])> + '_ {
        (0..self.normal).map(|i| {
            (
                be64(self.offsets, i * 8),
                &self.data[i * self.page_size..(i + 1) * self.page_size],
            )
        })
    }

    /// The zero pages' offsets.
    pub fn zero_pages(&self) -> impl Iterator<Item = u64> + '_ {
        (self.normal..self.normal + self.zero).map(|i| be64(self.offsets, i * 8))
    }

    /// How many pages carry data.
    pub fn normal_count(&self) -> usize {
        self.normal
    }

    /// How many zero pages the packet names.
    pub fn zero_count(&self) -> usize {
        self.zero
    }
}

/// One decoded unit of a multifd channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MultifdEvent<'a> {
    /// The initial packet.
    Init(MultifdInit),
    /// A RAM packet (pages, a sync point, or both).
    Ram(RamPacket<'a>),
    /// A device's state chunk (QEMU 10.0+, VFIO), passed through unread.
    DeviceState {
        /// The device's section idstr.
        idstr: &'a [u8],
        /// Its instance id.
        instance_id: u32,
        /// The opaque payload.
        data: &'a [u8],
        /// The packet's bytes as received.
        raw: &'a [u8],
    },
}

impl MultifdEvent<'_> {
    /// Appends exactly the bytes the event was decoded from.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            MultifdEvent::Init(i) => i.encode(out),
            MultifdEvent::Ram(p) => out.extend_from_slice(p.raw),
            MultifdEvent::DeviceState { raw, .. } => out.extend_from_slice(raw),
        }
    }
}

/// Incremental decoder of one multifd channel; same calling contract as
/// [`StreamDecoder`](super::decoder::StreamDecoder): each event covers whole packets, so
/// a relay forwards exactly the bytes of the events it got and nothing it could not check.
#[derive(Debug, Clone)]
pub struct MultifdDecoder {
    id: u8,
    offset: u64,
    page_size: usize,
    page_count: usize,
    layout: RamLayout,
    init_seen: bool,
    failed: Option<DecodeError>,
}

impl MultifdDecoder {
    /// A decoder for a whole channel (initial packet first), for pages of this target page
    /// size into this block table (both from the main stream).
    pub fn new(target_page_size: u64, layout: RamLayout) -> Self {
        let page_size = target_page_size.clamp(512, PACKET_DATA) as usize;
        MultifdDecoder {
            id: 0,
            offset: 0,
            page_size,
            page_count: PACKET_DATA as usize / page_size,
            layout,
            init_seen: false,
            failed: None,
        }
    }

    /// A decoder for the rest of a channel whose initial packet was already checked.
    pub fn after_init(init: MultifdInit, target_page_size: u64, layout: RamLayout) -> Self {
        MultifdDecoder {
            id: init.id,
            offset: INIT_LEN as u64,
            init_seen: true,
            ..Self::new(target_page_size, layout)
        }
    }

    /// The channel, for errors and figures.
    pub fn channel(&self) -> Channel {
        Channel::Multifd(self.id)
    }

    /// Absolute offset of the next expected byte.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Length of a RAM packet's header for this page size (1344 bytes for 4 KiB pages).
    pub fn ram_header_len(&self) -> usize {
        RAM_FIXED + 8 * self.page_count
    }

    /// Decodes the next packet from `input`, which must start at [`Self::offset`].
    pub fn next<'a>(&mut self, input: &'a [u8]) -> Result<Step<MultifdEvent<'a>>, DecodeError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let r = if self.init_seen {
            self.packet(input)
        } else {
            match MultifdInit::parse(input) {
                Ok(None) => Ok(None),
                Ok(Some(init)) => {
                    self.id = init.id;
                    self.init_seen = true;
                    Ok(Some((INIT_LEN, MultifdEvent::Init(init))))
                }
                Err(e) => Err(e),
            }
        };
        match r {
            Ok(None) => Ok(Step::NeedMore),
            Ok(Some((len, event))) => {
                let offset = self.offset;
                self.offset += len as u64;
                Ok(Step::Event { offset, len, event })
            }
            Err((at, kind)) => Err(self.poison(self.offset + at, kind)),
        }
    }

    /// Judges the end of the channel: clean only between packets, after the initial one.
    pub fn finish(&mut self, rest: &[u8]) -> Result<(), DecodeError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if rest.is_empty() && self.init_seen {
            Ok(())
        } else if !self.init_seen {
            Err(self.poison(
                self.offset,
                ErrorKind::Truncated("a multifd initial packet"),
            ))
        } else {
            Err(self.poison(self.offset, ErrorKind::Truncated("a multifd packet")))
        }
    }

    fn poison(&mut self, offset: u64, kind: ErrorKind) -> DecodeError {
        let e = DecodeError {
            channel: self.channel(),
            offset,
            kind,
        };
        self.failed = Some(e.clone());
        e
    }

    /// One packet, or `None` when `input` ends inside it.
    fn packet<'a>(&self, input: &'a [u8]) -> Parsed<'a> {
        if input.len() < 12 {
            if input.len() >= 4 && be32(input, 0) != MAGIC {
                return Err((0, ErrorKind::MultifdMagic(be32(input, 0))));
            }
            return Ok(None);
        }
        let magic = be32(input, 0);
        if magic != MAGIC {
            return Err((0, ErrorKind::MultifdMagic(magic)));
        }
        let version = be32(input, 4);
        if version != VERSION {
            return Err((4, ErrorKind::MultifdVersion(version)));
        }
        let flags = be32(input, 8);
        if flags & !(FLAG_SYNC | COMPRESSION_MASK | FLAG_DEVICE_STATE) != 0 {
            return Err((8, ErrorKind::MultifdFlags(flags)));
        }
        if flags & FLAG_DEVICE_STATE != 0 {
            self.device_state(input, flags)
        } else {
            self.ram(input, flags)
        }
    }

    fn ram<'a>(&self, input: &'a [u8], flags: u32) -> Parsed<'a> {
        let header = self.ram_header_len();
        if input.len() < header {
            return Ok(None);
        }
        let pages_alloc = be32(input, 12) as usize;
        let normal = be32(input, 16) as usize;
        let size = be32(input, 20) as usize;
        let packet_num = be64(input, 24);
        let zero = be32(input, 32) as usize;
        let malformed = |at, why| Err((at, ErrorKind::MultifdMalformed(why)));
        if pages_alloc > self.page_count {
            return malformed(12, "more pages allocated than a packet holds");
        }
        if normal + zero > pages_alloc {
            return malformed(16, "more pages than the packet allocated");
        }
        let compression = flags & COMPRESSION_MASK;
        if compression != 0 && normal + zero > 0 {
            return Err((
                8,
                ErrorKind::MultifdCompressed(compression_name(compression)),
            ));
        }
        // QEMU 7.2 leaves the previous packet's size in a packet without pages; every
        // version's receiver reads exactly the pages' bytes (multifd.md#multifd-packet).
        if normal > 0 && size != normal * self.page_size {
            return malformed(20, "payload size is not its pages' size");
        }
        let size = normal * self.page_size;
        let block = if normal + zero == 0 {
            None
        } else {
            let name = &input[64..64 + NAME_LEN];
            let Some(end) = name.iter().position(|&b| b == 0) else {
                return malformed(64, "block name without its terminating NUL");
            };
            let name = &name[..end];
            let Some(id) = self.layout.find(name) else {
                return Err((
                    64,
                    ErrorKind::UnknownRamBlock(String::from_utf8_lossy(name).into_owned()),
                ));
            };
            let length = self.layout.block(id).used_length;
            for i in 0..normal + zero {
                let at = RAM_FIXED + 8 * i;
                let offset = be64(input, at);
                if !offset.is_multiple_of(self.page_size as u64) {
                    return malformed(at as u64, "page offset not aligned to the page size");
                }
                if offset
                    .checked_add(self.page_size as u64)
                    .is_none_or(|end| end > length)
                {
                    return Err((
                        at as u64,
                        ErrorKind::OffsetOutOfRange {
                            block: String::from_utf8_lossy(name).into_owned(),
                            offset,
                            length,
                        },
                    ));
                }
            }
            Some(id)
        };
        let total = header + size;
        if input.len() < total {
            return Ok(None);
        }
        Ok(Some((
            total,
            MultifdEvent::Ram(RamPacket {
                flags,
                packet_num,
                block,
                offsets: &input[RAM_FIXED..RAM_FIXED + 8 * (normal + zero)],
                normal,
                zero,
                data: &input[header..total],
                page_size: self.page_size,
                raw: &input[..total],
            }),
        )))
    }

    fn device_state<'a>(&self, input: &'a [u8], flags: u32) -> Parsed<'a> {
        let malformed = |at, why| Err((at, ErrorKind::MultifdMalformed(why)));
        if flags & FLAG_SYNC != 0 {
            return malformed(8, "a device-state packet with the sync flag");
        }
        if flags & COMPRESSION_MASK != 0 {
            return Err((
                8,
                ErrorKind::MultifdCompressed(compression_name(flags & COMPRESSION_MASK)),
            ));
        }
        if input.len() < DEVICE_STATE_HEADER {
            return Ok(None);
        }
        let name = &input[12..12 + NAME_LEN];
        let Some(end) = name.iter().position(|&b| b == 0) else {
            return malformed(12, "device idstr without its terminating NUL");
        };
        let instance_id = be32(input, 268);
        let size = be32(input, 272) as usize;
        if size == 0 {
            return malformed(272, "an empty device-state packet");
        }
        let total = DEVICE_STATE_HEADER + size;
        if input.len() < total {
            return Ok(None);
        }
        Ok(Some((
            total,
            MultifdEvent::DeviceState {
                idstr: &name[..end],
                instance_id,
                data: &input[DEVICE_STATE_HEADER..total],
                raw: &input[..total],
            },
        )))
    }
}

/// A packet and its length, `None` when the input ends inside it, or the offending
/// field's offset (from the packet's start) and what is wrong with it.
type Parsed<'a> = Result<Option<(usize, MultifdEvent<'a>)>, (u64, ErrorKind)>;

/// QEMU's name for a compression value of the header flags.
fn compression_name(v: u32) -> &'static str {
    match v {
        0x02 => "zlib",
        0x04 => "zstd",
        0x08 => "qpl",
        0x10 => "uadk",
        0x20 => "qatzip",
        _ => "an unknown method",
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Encoders for tests and composed streams (the inverse of [`MultifdDecoder`]).
pub mod compose {
    use super::*;

    /// Appends a RAM packet of `pages` (offset, data) and `zeros` (offsets) in `block`,
    /// with a header sized for `page_size`.
    pub fn put_ram_packet(
        out: &mut Vec<u8>,
        page_size: usize,
        flags: u32,
        packet_num: u64,
        block: &[u8],
        pages: &[(u64, &[u8])],
        zeros: &[u64],
    ) {
        let page_count = PACKET_DATA as usize / page_size;
        let start = out.len();
        out.extend_from_slice(&MAGIC.to_be_bytes());
        out.extend_from_slice(&VERSION.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        let used = pages.len() + zeros.len();
        let alloc = if used == 0 { 0 } else { page_count as u32 };
        out.extend_from_slice(&alloc.to_be_bytes());
        out.extend_from_slice(&(pages.len() as u32).to_be_bytes());
        out.extend_from_slice(&((pages.len() * page_size) as u32).to_be_bytes());
        out.extend_from_slice(&packet_num.to_be_bytes());
        out.extend_from_slice(&(zeros.len() as u32).to_be_bytes());
        out.resize(start + 64, 0);
        if used > 0 {
            out.extend_from_slice(block);
        }
        out.resize(start + RAM_FIXED, 0);
        for (off, _) in pages {
            out.extend_from_slice(&off.to_be_bytes());
        }
        for off in zeros {
            out.extend_from_slice(&off.to_be_bytes());
        }
        out.resize(start + RAM_FIXED + 8 * page_count, 0);
        for (_, data) in pages {
            assert_eq!(data.len(), page_size, "whole pages only");
            out.extend_from_slice(data);
        }
    }

    /// Appends a bare sync packet (QEMU 10.x form: no pages, nothing allocated).
    pub fn put_sync(out: &mut Vec<u8>, page_size: usize, packet_num: u64) {
        put_ram_packet(out, page_size, FLAG_SYNC, packet_num, b"", &[], &[]);
    }
}

#[cfg(test)]
mod tests {
    use super::compose::*;
    use super::*;

    const PS: usize = 4096;

    fn layout() -> RamLayout {
        let mut l = RamLayout::default();
        l.announce(b"pc.ram", 1 << 20);
        l
    }

    fn channel(id: u8) -> Vec<u8> {
        let mut v = Vec::new();
        MultifdInit { uuid: [7; 16], id }.encode(&mut v);
        v
    }

    fn decode_all(d: &mut MultifdDecoder, mut b: &[u8]) -> Result<Vec<String>, DecodeError> {
        let mut out = Vec::new();
        loop {
            match d.next(b)? {
                Step::NeedMore => break,
                Step::Event { len, event, .. } => {
                    out.push(match event {
                        MultifdEvent::Init(i) => format!("init {}", i.id),
                        MultifdEvent::Ram(p) => format!(
                            "ram sync={} pages={:?} zeros={:?}",
                            p.is_sync(),
                            p.pages().map(|(o, d)| (o, d[0])).collect::<Vec<_>>(),
                            p.zero_pages().collect::<Vec<_>>()
                        ),
                        MultifdEvent::DeviceState { idstr, data, .. } => {
                            format!("device {} {}", String::from_utf8_lossy(idstr), data.len())
                        }
                    });
                    b = &b[len..];
                }
            }
        }
        d.finish(b)?;
        Ok(out)
    }

    #[test]
    fn a_channel_decodes_packet_by_packet_in_any_split() {
        let mut s = channel(3);
        put_sync(&mut s, PS, 0);
        let (a, b) = (vec![0xaa; PS], vec![0xbb; PS]);
        put_ram_packet(
            &mut s,
            PS,
            0,
            1,
            b"pc.ram",
            &[(0x2000, &a), (0x1000, &b)],
            &[0x5000],
        );
        put_ram_packet(&mut s, PS, FLAG_SYNC, 2, b"pc.ram", &[(0, &a)], &[]);
        let whole = decode_all(&mut MultifdDecoder::new(PS as u64, layout()), &s).unwrap();
        assert_eq!(
            whole,
            [
                "init 3",
                "ram sync=true pages=[] zeros=[]",
                "ram sync=false pages=[(8192, 170), (4096, 187)] zeros=[20480]",
                "ram sync=true pages=[(0, 170)] zeros=[]",
            ]
        );
        // Fed a byte at a time, the same events come out at the same offsets.
        let mut d = MultifdDecoder::new(PS as u64, layout());
        let (mut start, mut events) = (0, 0);
        for end in 1..=s.len() {
            if let Step::Event { offset, len, .. } = d.next(&s[start..end]).unwrap() {
                assert_eq!(offset, start as u64);
                start += len;
                events += 1;
            }
        }
        assert_eq!((events, start), (4, s.len()));
    }

    #[test]
    fn a_7_2_sync_packet_with_stale_name_and_offsets_is_accepted() {
        // 7.2 never clears its header: an empty packet can carry the last block name.
        let mut s = channel(0);
        put_ram_packet(&mut s, PS, 0, 1, b"pc.ram", &[(0, &[1; PS])], &[]);
        let mut sync = Vec::new();
        put_ram_packet(&mut sync, PS, FLAG_SYNC, 2, b"gone", &[(0, &[1; PS])], &[]);
        // Keep the header, drop the pages: normal = 0; the size and pages_alloc stay stale.
        sync[16..20].fill(0);
        sync.truncate(RAM_FIXED + 8 * (PACKET_DATA as usize / PS));
        s.extend_from_slice(&sync);
        let got = decode_all(&mut MultifdDecoder::new(PS as u64, layout()), &s).unwrap();
        assert_eq!(got.last().unwrap(), "ram sync=true pages=[] zeros=[]");
    }

    #[test]
    fn bad_packets_are_refused_with_what_and_where() {
        let header = RAM_FIXED + 8 * (PACKET_DATA as usize / PS);
        type Spoil = Box<dyn Fn(&mut Vec<u8>)>;
        let cases: Vec<(Spoil, u64, &str)> = vec![
            (Box::new(|p| p[0] = 0x12), 0, "magic"),
            (Box::new(|p| p[7] = 2), 4, "version"),
            (Box::new(|p| p[10] = 1), 8, "flags"),
            (Box::new(|p| p[11] |= 0x02), 8, "zlib"),
            (Box::new(|p| p[15] = 0xff), 12, "allocated"),
            (Box::new(|p| p[23] = 1), 20, "payload size"),
            (Box::new(|p| p[64] = b'x'), 64, "never announced"),
            (Box::new(|p| p[64..320].fill(b'a')), 64, "NUL"),
            (
                Box::new(|p| p[RAM_FIXED + 7] = 1),
                RAM_FIXED as u64,
                "aligned",
            ),
            (
                Box::new(|p| p[RAM_FIXED + 5] = 0x10),
                RAM_FIXED as u64,
                "past the end",
            ),
        ];
        for (spoil, at, what) in cases {
            let mut p = Vec::new();
            put_ram_packet(&mut p, PS, 0, 1, b"pc.ram", &[(0, &[1; PS])], &[]);
            assert_eq!(p.len(), header + PS);
            spoil(&mut p);
            let mut s = channel(1);
            s.extend_from_slice(&p);
            let e = decode_all(&mut MultifdDecoder::new(PS as u64, layout()), &s).unwrap_err();
            assert_eq!(e.channel, Channel::Multifd(1), "{what}");
            assert_eq!(e.offset, INIT_LEN as u64 + at, "{what}: {e}");
            assert!(e.to_string().contains(what), "{what}: {e}");
        }
    }

    #[test]
    fn an_initial_packet_is_checked_field_by_field() {
        let good = channel(2);
        assert_eq!(
            MultifdInit::parse(&good).unwrap(),
            Some(MultifdInit {
                uuid: [7; 16],
                id: 2
            })
        );
        assert_eq!(MultifdInit::parse(&good[..10]).unwrap(), None);
        assert!(matches!(
            MultifdInit::parse(b"QEVM"),
            Err((0, ErrorKind::MultifdMagic(0x5145_564d)))
        ));
        let mut v = good.clone();
        v[7] = 9;
        assert!(matches!(
            MultifdInit::parse(&v),
            Err((4, ErrorKind::MultifdVersion(9)))
        ));
        let mut v = good.clone();
        v[40] = 1;
        assert!(matches!(MultifdInit::parse(&v), Err((40, _))));
        // A channel that ends inside its first packet is truncated, not clean.
        let mut d = MultifdDecoder::new(PS as u64, layout());
        assert!(matches!(d.next(&good[..30]), Ok(Step::NeedMore)));
        assert!(d.finish(&good[..30]).is_err());
    }

    #[test]
    fn a_device_state_packet_passes_with_its_name() {
        let mut s = channel(0);
        s.extend_from_slice(&MAGIC.to_be_bytes());
        s.extend_from_slice(&VERSION.to_be_bytes());
        s.extend_from_slice(&FLAG_DEVICE_STATE.to_be_bytes());
        let mut name = b"vfio".to_vec();
        name.resize(NAME_LEN, 0);
        s.extend_from_slice(&name);
        s.extend_from_slice(&7u32.to_be_bytes());
        s.extend_from_slice(&5u32.to_be_bytes());
        s.extend_from_slice(b"hello");
        let got = decode_all(&mut MultifdDecoder::new(PS as u64, layout()), &s).unwrap();
        assert_eq!(got, ["init 0", "device vfio 5"]);
    }
}
