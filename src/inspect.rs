//! `postcopy-sidecar inspect`: decodes a captured migration (main stream, optional return
//! path, preempt and multifd channels) into a timeline and a summary, like QEMU's
//! `analyze-migration.py` but for both directions. It reuses the live decoders unchanged,
//! so a capture that inspects cleanly is one the daemon would have carried.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use serde::Serialize;

use crate::wire::{
    Command, DecodeError, Event, MultifdDecoder, MultifdEvent, PreemptDecoder, RamLayout,
    RamRecord, RpDecoder, RpMessage, Step, StreamDecoder, StreamEnd,
};

/// Errors reading a capture file (decode errors are part of the report instead).
#[derive(Debug, thiserror::Error)]
pub enum ReadCaptureError {
    /// The file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Reads a capture, transparently gunzipping it when it starts with the gzip magic.
pub fn read_capture(path: &Path) -> Result<Vec<u8>, ReadCaptureError> {
    let io = |source| ReadCaptureError::Io {
        path: path.display().to_string(),
        source,
    };
    let raw = std::fs::read(path).map_err(io)?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::with_capacity(raw.len() * 4);
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(io)?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// One RAM block as announced by MEM_SIZE.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BlockSummary {
    /// Block idstr.
    pub name: String,
    /// Used length in bytes.
    pub length: u64,
}

/// RAM figures over all forward channels.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct RamSummary {
    /// Blocks announced.
    pub blocks: Vec<BlockSummary>,
    /// Full pages (main and preempt channels).
    pub pages: u64,
    /// Zero pages.
    pub zero_pages: u64,
    /// XBZRLE-encoded pages.
    pub xbzrle_pages: u64,
    /// zlib-compressed pages (QEMU ≤ 9.0).
    pub compressed_pages: u64,
    /// Full pages that came on the preempt channel.
    pub preempt_pages: u64,
    /// Full pages that came on multifd channels.
    pub multifd_pages: u64,
    /// Wire bytes of all RAM records, headers included.
    pub bytes: u64,
}

/// Return-path figures.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ReturnPathSummary {
    /// Messages by name.
    pub messages: BTreeMap<String, u64>,
    /// Target pages asked for by REQ_PAGES / REQ_PAGES_ID.
    pub requested_pages: u64,
    /// Bytes on the return path.
    pub bytes: u64,
}

/// One multifd channel (protocol-spec/multifd.md).
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct MultifdSummary {
    /// Channel id from its initial packet.
    pub id: Option<u8>,
    /// Bytes of the channel.
    pub bytes: u64,
    /// Packets after the initial one.
    pub packets: u64,
    /// Sync points.
    pub syncs: u64,
    /// Full pages.
    pub pages: u64,
    /// Zero pages (offsets only).
    pub zero_pages: u64,
    /// Device-state packets.
    pub device_state_packets: u64,
}

/// Offsets of the postcopy milestones in the main stream.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct PostcopySummary {
    /// POSTCOPY_ADVISE.
    pub advise: Option<u64>,
    /// POSTCOPY_LISTEN.
    pub listen: Option<u64>,
    /// POSTCOPY_RUN.
    pub run: Option<u64>,
    /// POSTCOPY_RAM_DISCARD commands.
    pub discards: u64,
    /// Offset and length of the PACKAGED blob.
    pub package: Option<(u64, u32)>,
}

/// Where decoding failed.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ErrorSummary {
    /// Channel name.
    pub channel: String,
    /// Absolute offset in that channel.
    pub offset: u64,
    /// What was wrong.
    pub message: String,
}

impl From<&DecodeError> for ErrorSummary {
    fn from(e: &DecodeError) -> Self {
        ErrorSummary {
            channel: e.channel.to_string(),
            offset: e.offset,
            message: e.kind.to_string(),
        }
    }
}

/// The JSON summary printed by `inspect --json`.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Summary {
    /// Bytes of the main stream.
    pub stream_bytes: u64,
    /// Machine type from the configuration section.
    pub machine: Option<String>,
    /// Section records by kind.
    pub sections: BTreeMap<String, u64>,
    /// Commands by name.
    pub commands: BTreeMap<String, u64>,
    /// RAM figures.
    pub ram: RamSummary,
    /// Device-state bytes passed through unframed.
    pub opaque_bytes: u64,
    /// Return path, when given.
    pub return_path: Option<ReturnPathSummary>,
    /// Multifd channels, in the order given.
    pub multifd: Vec<MultifdSummary>,
    /// Postcopy milestones, or null for a precopy stream.
    pub postcopy: Option<PostcopySummary>,
    /// How the stream ended ("eof", "opaque-then-eof").
    pub end: Option<String>,
    /// The first decode error, or null.
    pub error: Option<ErrorSummary>,
}

/// Timeline and summary of a capture.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Human-readable lines in stream order, channel by channel.
    pub timeline: Vec<String>,
    /// Machine-readable figures.
    pub summary: Summary,
}

#[derive(Default)]
struct RamRun {
    line: usize,
    pages: u64,
    zero: u64,
    other: u64,
}

/// Decodes the main stream, then each preempt channel, each multifd channel, then the
/// return path.
pub fn inspect(
    main: &[u8],
    return_path: Option<&[u8]>,
    preempt: &[Vec<u8>],
    multifd: &[Vec<u8>],
) -> Report {
    let mut r = Report::default();
    let s = &mut r.summary;
    s.stream_bytes = main.len() as u64;
    let mut dec = StreamDecoder::default();
    let mut pos = 0usize;
    let mut run: Option<RamRun> = None;
    let mut postcopy: Option<PostcopySummary> = None;
    let flush = |run: &mut Option<RamRun>, tl: &mut Vec<String>| {
        if let Some(x) = run.take() {
            let label = std::mem::take(&mut tl[x.line]);
            tl[x.line] = format!(
                "{label}: {} pages, {} zero pages{}",
                x.pages,
                x.zero,
                if x.other > 0 {
                    format!(", {} other records", x.other)
                } else {
                    String::new()
                }
            );
        }
    };
    loop {
        let step = match dec.next(&main[pos..]) {
            Ok(s) => s,
            Err(e) => {
                s.error = Some((&e).into());
                break;
            }
        };
        let Step::Event { offset, len, event } = step else {
            break;
        };
        pos += len;
        let tl = &mut r.timeline;
        match &event {
            Event::FileHeader { version } => {
                tl.push(format!("main@{offset}: file header, version {version}"))
            }
            Event::Configuration(c) => {
                let m = String::from_utf8_lossy(c.machine).into_owned();
                tl.push(format!(
                    "main@{offset}: configuration, machine {m}, {} subsections",
                    c.subsections.len()
                ));
                s.machine = Some(m);
            }
            Event::Section(h) => {
                flush(&mut run, tl);
                *s.sections.entry(h.kind.name().to_string()).or_default() += 1;
                let name = dec
                    .section_name(h.section_id)
                    .map(|n| String::from_utf8_lossy(n).into_owned())
                    .unwrap_or_default();
                let label = match &h.ident {
                    Some(id) => format!(
                        "main@{offset}: {} section {} '{name}' instance {} version {}",
                        h.kind.name().to_uppercase(),
                        h.section_id,
                        id.instance_id,
                        id.version_id
                    ),
                    None => format!(
                        "main@{offset}: {} section {} '{name}'",
                        h.kind.name().to_uppercase(),
                        h.section_id
                    ),
                };
                if dec.is_opaque() {
                    tl.push(format!(
                        "{label}: device state follows, passed through unframed"
                    ));
                } else {
                    tl.push(label);
                    run = Some(RamRun {
                        line: tl.len() - 1,
                        ..Default::default()
                    });
                }
            }
            Event::Footer { .. } => {}
            Event::Ram(rec) => {
                count_ram(&mut s.ram, rec, len, false);
                if let Some(x) = run.as_mut() {
                    match rec {
                        RamRecord::Page { .. } => x.pages += 1,
                        RamRecord::Zero { .. } => x.zero += 1,
                        RamRecord::Block(b) => tl.push(format!(
                            "main@{offset}:   block '{}' length {:#x}",
                            String::from_utf8_lossy(b.idstr),
                            b.used_length
                        )),
                        RamRecord::Eos | RamRecord::MemSize { .. } => {}
                        _ => x.other += 1,
                    }
                }
            }
            Event::Command(c) => {
                flush(&mut run, tl);
                *s.commands.entry(c.name().to_string()).or_default() += 1;
                let pc = || PostcopySummary::default();
                match c {
                    Command::PostcopyAdvise(_) => {
                        postcopy.get_or_insert_with(pc).advise = Some(offset)
                    }
                    Command::PostcopyListen => {
                        postcopy.get_or_insert_with(pc).listen = Some(offset)
                    }
                    Command::PostcopyRun => postcopy.get_or_insert_with(pc).run = Some(offset),
                    Command::PostcopyRamDiscard { .. } => {
                        postcopy.get_or_insert_with(pc).discards += 1
                    }
                    Command::Packaged { length } => {
                        postcopy.get_or_insert_with(pc).package = Some((offset, *length))
                    }
                    _ => {}
                }
                tl.push(format!("main@{offset}: {}", describe_command(c)));
            }
            Event::PackageEnd => tl.push(format!("main@{offset}: end of package")),
            Event::Opaque(d) => s.opaque_bytes += d.len() as u64,
            Event::Eof => {
                flush(&mut run, tl);
                tl.push(format!("main@{offset}: EOF"));
            }
            Event::VmDescription { length } => tl.push(format!(
                "main@{offset}: VMDESCRIPTION, {length} bytes of JSON"
            )),
            Event::VmDescriptionData(_) => {}
        }
    }
    flush(&mut run, &mut r.timeline);
    if s.error.is_none() {
        match dec.finish(&main[pos..]) {
            Ok(StreamEnd::Clean) => s.end = Some("eof".into()),
            Ok(StreamEnd::OpaqueThenEof(t)) => {
                r.timeline.push(format!(
                    "main@{}: EOF (found after opaque device state), VMDESCRIPTION {} bytes",
                    t.eof_offset,
                    t.vmdesc_len.unwrap_or(0)
                ));
                s.end = Some("opaque-then-eof".into());
            }
            Err(e) => s.error = Some((&e).into()),
        }
    }
    s.ram.blocks = blocks(dec.layout());
    s.postcopy = postcopy;
    let tps = dec.target_page_size();
    for (n, ch) in preempt.iter().enumerate() {
        inspect_preempt(&mut r, n, ch, tps, dec.layout().clone());
    }
    for ch in multifd {
        inspect_multifd(&mut r, ch, tps, dec.layout().clone());
    }
    if let Some(rp) = return_path {
        inspect_return_path(&mut r, rp, tps);
    }
    r
}

fn blocks(layout: &RamLayout) -> Vec<BlockSummary> {
    layout
        .blocks()
        .iter()
        .map(|b| BlockSummary {
            name: String::from_utf8_lossy(&b.name).into_owned(),
            length: b.used_length,
        })
        .collect()
}

fn count_ram(s: &mut RamSummary, rec: &RamRecord<'_>, len: usize, preempt: bool) {
    s.bytes += len as u64;
    match rec {
        RamRecord::Page { .. } => {
            s.pages += 1;
            if preempt {
                s.preempt_pages += 1;
            }
        }
        RamRecord::Zero { .. } => s.zero_pages += 1,
        RamRecord::Xbzrle { .. } => s.xbzrle_pages += 1,
        RamRecord::CompressedPage { .. } => s.compressed_pages += 1,
        _ => {}
    }
}

fn inspect_preempt(r: &mut Report, n: usize, ch: &[u8], tps: u64, layout: RamLayout) {
    let mut dec = PreemptDecoder::new(tps, layout);
    let mut pos = 0;
    let (mut pages, mut zero) = (0u64, 0u64);
    loop {
        match dec.next(&ch[pos..]) {
            Ok(Step::Event { len, event, .. }) => {
                pos += len;
                match &event {
                    RamRecord::Page { .. } => pages += 1,
                    RamRecord::Zero { .. } => zero += 1,
                    _ => {}
                }
                count_ram(&mut r.summary.ram, &event, len, true);
            }
            Ok(Step::NeedMore) => {
                if let Err(e) = dec.finish(&ch[pos..]) {
                    r.summary.error.get_or_insert((&e).into());
                }
                break;
            }
            Err(e) => {
                r.summary.error.get_or_insert((&e).into());
                break;
            }
        }
    }
    r.timeline.push(format!(
        "preempt#{n}: {} bytes, {pages} pages, {zero} zero pages",
        ch.len()
    ));
}

fn inspect_multifd(r: &mut Report, ch: &[u8], tps: u64, layout: RamLayout) {
    let mut dec = MultifdDecoder::new(tps, layout);
    let mut m = MultifdSummary {
        bytes: ch.len() as u64,
        ..Default::default()
    };
    let mut pos = 0;
    loop {
        match dec.next(&ch[pos..]) {
            Ok(Step::Event { len, event, .. }) => {
                pos += len;
                match &event {
                    MultifdEvent::Init(i) => m.id = Some(i.id),
                    MultifdEvent::Ram(p) => {
                        m.packets += 1;
                        m.syncs += u64::from(p.is_sync());
                        m.pages += p.normal_count() as u64;
                        m.zero_pages += p.zero_count() as u64;
                        let ram = &mut r.summary.ram;
                        ram.pages += p.normal_count() as u64;
                        ram.multifd_pages += p.normal_count() as u64;
                        ram.zero_pages += p.zero_count() as u64;
                        ram.bytes += len as u64;
                    }
                    MultifdEvent::DeviceState { .. } => {
                        m.packets += 1;
                        m.device_state_packets += 1;
                    }
                }
            }
            Ok(Step::NeedMore) => {
                if let Err(e) = dec.finish(&ch[pos..]) {
                    r.summary.error.get_or_insert((&e).into());
                }
                break;
            }
            Err(e) => {
                r.summary.error.get_or_insert((&e).into());
                break;
            }
        }
    }
    r.timeline.push(format!(
        "multifd#{}: {} bytes, {} packets, {} sync points, {} pages, {} zero pages",
        m.id.map_or("?".into(), |i| i.to_string()),
        m.bytes,
        m.packets,
        m.syncs,
        m.pages,
        m.zero_pages
    ));
    r.summary.multifd.push(m);
}

fn inspect_return_path(r: &mut Report, rp: &[u8], tps: u64) {
    let mut s = ReturnPathSummary {
        bytes: rp.len() as u64,
        ..Default::default()
    };
    let mut dec = RpDecoder::new();
    let mut pos = 0;
    let mut reqs_shown = 0;
    loop {
        match dec.next(&rp[pos..]) {
            Ok(Step::Event { offset, len, event }) => {
                pos += len;
                *s.messages.entry(event.name().to_string()).or_default() += 1;
                let line = match &event {
                    RpMessage::ReqPagesId { start, len, block } => {
                        s.requested_pages += u64::from(*len).div_ceil(tps);
                        reqs_shown += 1;
                        (reqs_shown <= 50).then(|| {
                            format!(
                                "REQ_PAGES_ID '{}' {start:#x}+{len:#x}",
                                String::from_utf8_lossy(block)
                            )
                        })
                    }
                    RpMessage::ReqPages { start, len } => {
                        s.requested_pages += u64::from(*len).div_ceil(tps);
                        reqs_shown += 1;
                        (reqs_shown <= 50).then(|| format!("REQ_PAGES {start:#x}+{len:#x}"))
                    }
                    RpMessage::BitmapData(_) => None,
                    other => Some(format!("{other:?}")),
                };
                if let Some(l) = line {
                    r.timeline.push(format!("rp@{offset}: {l}"));
                }
            }
            Ok(Step::NeedMore) => {
                if let Err(e) = dec.finish(&rp[pos..]) {
                    r.summary.error.get_or_insert((&e).into());
                }
                break;
            }
            Err(e) => {
                r.summary.error.get_or_insert((&e).into());
                break;
            }
        }
    }
    if reqs_shown > 50 {
        r.timeline.push(format!(
            "rp: ... {} more page requests not shown",
            reqs_shown - 50
        ));
    }
    r.summary.return_path = Some(s);
}

/// One-line description of a command for the timeline.
pub fn describe_command(c: &Command<'_>) -> String {
    match c {
        Command::Ping(v) => format!("PING {v}"),
        Command::PostcopyAdvise(Some(a)) => format!(
            "POSTCOPY_ADVISE page-size summary {:#x}, target page size {:#x}",
            a.pagesize_summary, a.target_page_size
        ),
        Command::PostcopyRamDiscard { block, .. } => format!(
            "POSTCOPY_RAM_DISCARD '{}' {} ranges",
            String::from_utf8_lossy(block),
            c.discard_ranges().count()
        ),
        Command::Packaged { length } => format!("PACKAGED {length} bytes"),
        Command::RecvBitmap { block } => {
            format!("RECV_BITMAP '{}'", String::from_utf8_lossy(block))
        }
        other => other.name().to_string(),
    }
}
