//! Encoders for the parts of a postcopy stream that the sidecar originates itself when it
//! plays the source (lazy restore, protocol-spec/snapshot.md#snapshot-restore-stream):
//! RAM PART and END sections, whole-block discards, and the package. Pure byte building;
//! every piece decodes with [`super::StreamDecoder`] (tested).

use super::command::{Command, MAX_DISCARD_RANGES};
use super::ram::{PageHeader, RamRecord};
use super::stream::{SectionHeader, SectionKind, encode_footer};

/// How RAM sections are framed in the stream being written: the `ram` section's id from
/// the replayed START section, and whether the source used footers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamSections {
    /// Section id of `ram`.
    pub section_id: u32,
    /// Whether sections end with a footer.
    pub footers: bool,
}

impl RamSections {
    /// Opens a PART section (pages follow).
    pub fn open_part(&self, out: &mut Vec<u8>) {
        self.header(SectionKind::Part, out);
    }

    /// Opens the END section (the last pages follow, then EOF after [`Self::close`]).
    pub fn open_end(&self, out: &mut Vec<u8>) {
        self.header(SectionKind::End, out);
    }

    fn header(&self, kind: SectionKind, out: &mut Vec<u8>) {
        SectionHeader {
            kind,
            section_id: self.section_id,
            ident: None,
        }
        .encode(out);
    }

    /// Ends the open section: EOS, then the footer if the stream uses them.
    pub fn close(&self, out: &mut Vec<u8>) {
        RamRecord::Eos.encode(out);
        if self.footers {
            encode_footer(self.section_id, out);
        }
    }
}

/// Appends a full-page record. `block` is the idstr, or `None` to continue the block of the
/// previous record in the same section (ram.md#ram-continue).
pub fn put_page(out: &mut Vec<u8>, block: Option<&[u8]>, offset: u64, data: &[u8]) {
    RamRecord::Page {
        header: PageHeader {
            offset,
            idstr: block,
            block: 0,
        },
        data,
    }
    .encode(out);
}

/// Appends a zero-page record.
pub fn put_zero(out: &mut Vec<u8>, block: Option<&[u8]>, offset: u64) {
    RamRecord::Zero {
        header: PageHeader {
            offset,
            idstr: block,
            block: 0,
        },
    }
    .encode(out);
}

/// Appends POSTCOPY_RAM_DISCARD commands dropping `ranges` (byte start, byte length) of
/// `block`, at most [`MAX_DISCARD_RANGES`] per command as QEMU sends them.
pub fn put_discards(out: &mut Vec<u8>, block: &[u8], ranges: &[(u64, u64)]) {
    for chunk in ranges.chunks(MAX_DISCARD_RANGES) {
        let raw: Vec<u8> = chunk
            .iter()
            .flat_map(|(s, l)| s.to_be_bytes().into_iter().chain(l.to_be_bytes()))
            .collect();
        Command::PostcopyRamDiscard {
            version: 0,
            block,
            ranges: &raw,
        }
        .encode(out);
    }
}

/// Appends a PACKAGED command and its blob.
pub fn put_package(out: &mut Vec<u8>, blob: &[u8]) {
    let length = u32::try_from(blob.len()).expect("a package is at most 4 GiB");
    Command::Packaged { length }.encode(out);
    out.extend_from_slice(blob);
}

/// Appends the switch to postcopy as a source writes it, for made-up streams (tests,
/// benches): PING(2), then the package of LISTEN, one FULL device section (id 3, `timer`)
/// whose opaque state is `device_state`, PING(3) and RUN.
pub fn put_postcopy_switch(out: &mut Vec<u8>, device_state: &[u8]) {
    Command::Ping(2).encode(out);
    let mut blob = Vec::new();
    Command::PostcopyListen.encode(&mut blob);
    put_timer_section_header(&mut blob);
    blob.extend_from_slice(device_state);
    Command::Ping(3).encode(&mut blob);
    Command::PostcopyRun.encode(&mut blob);
    put_package(out, &blob);
}

/// Appends the header of the one device section composed streams carry: FULL, id 3,
/// `timer` version 2 (its state, which has no length on the wire, follows).
pub fn put_timer_section_header(out: &mut Vec<u8>) {
    SectionHeader {
        kind: SectionKind::Full,
        section_id: 3,
        ident: Some(super::stream::SectionIdent {
            idstr: b"timer",
            instance_id: 0,
            version_id: 2,
        }),
    }
    .encode(out);
}

/// Appends a stream's opening as a postcopy source writes it, for streams the sidecar
/// makes up (synthetic snapshots, tests): file header, configuration for `machine`,
/// OPEN_RETURN_PATH, PING(1), POSTCOPY_ADVISE for 4 KiB pages, and the `ram` START
/// section (id `section_id`) announcing `blocks` (idstr, length), with EOS and footer.
pub fn put_opening(out: &mut Vec<u8>, machine: &[u8], section_id: u32, blocks: &[(&[u8], u64)]) {
    use super::stream::{SectionIdent, encode_file_header};
    use super::{Advise, BlockEntry, Configuration};
    encode_file_header(out);
    Configuration {
        machine,
        subsections: vec![],
    }
    .encode(out);
    Command::OpenReturnPath.encode(out);
    Command::Ping(1).encode(out);
    Command::PostcopyAdvise(Some(Advise {
        pagesize_summary: 4096,
        target_page_size: 4096,
    }))
    .encode(out);
    SectionHeader {
        kind: SectionKind::Start,
        section_id,
        ident: Some(SectionIdent {
            idstr: b"ram",
            instance_id: 0,
            version_id: 4,
        }),
    }
    .encode(out);
    RamRecord::MemSize {
        total: blocks.iter().map(|b| b.1).sum(),
    }
    .encode(out);
    for (idstr, used_length) in blocks {
        RamRecord::Block(BlockEntry {
            idstr,
            used_length: *used_length,
            page_size: None,
            mr_addr: None,
            mapped_ram_header: None,
        })
        .encode(out);
    }
    RamRecord::Eos.encode(out);
    encode_footer(section_id, out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Event, Step, StreamDecoder};

    #[test]
    fn composed_restore_stream_decodes() {
        let s = RamSections {
            section_id: 2,
            footers: true,
        };
        let mut out = Vec::new();
        put_opening(&mut out, b"pc-q35-10.0", 2, &[(b"m", 0x3000)]);
        put_discards(&mut out, b"m", &[(0, 0x3000)]);
        let mut blob = Vec::new();
        Command::PostcopyListen.encode(&mut blob);
        Command::Ping(3).encode(&mut blob);
        Command::PostcopyRun.encode(&mut blob);
        put_package(&mut out, &blob);
        s.open_part(&mut out);
        put_page(&mut out, Some(b"m"), 0x1000, &[7u8; 4096]);
        put_zero(&mut out, None, 0x2000);
        s.close(&mut out);
        s.open_end(&mut out);
        put_page(&mut out, Some(b"m"), 0, &[1u8; 4096]);
        s.close(&mut out);
        out.push(crate::wire::stream::SECTION_EOF);

        let mut dec = StreamDecoder::default();
        let mut at = 0;
        let mut pages = Vec::new();
        let mut names = Vec::new();
        while at < out.len() {
            match dec.next(&out[at..]).unwrap() {
                Step::Event { len, event, .. } => {
                    if let Event::Ram(r) = &event
                        && let Some(h) = r.page_header()
                    {
                        pages.push(h.offset);
                    }
                    names.push(event.kind_name());
                    at += len;
                }
                Step::NeedMore => panic!("stream cut at {at}"),
            }
        }
        assert_eq!(pages, vec![0x1000, 0x2000, 0]);
        assert_eq!(dec.finish(&[]).unwrap(), crate::wire::StreamEnd::Clean);
        assert!(names.contains(&"package-end"));
    }
}
