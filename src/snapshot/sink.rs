//! The snapshot sink: consumes a decoded postcopy stream as a destination would and keeps
//! what a restore replays (protocol-spec/snapshot.md#snapshot-capture). Free of sockets:
//! the caller feeds decoded events with their raw bytes and sends the replies it returns.
//!
//! - The *opening* (file header, configuration, OPEN_RETURN_PATH, PING, ADVISE, and the
//!   `ram` START section with its block list and footer) is kept verbatim.
//! - Pages go to the page store, the last record for a page winning.
//! - The package's blob is kept verbatim.
//! - Every PING is answered with its PONG, as QEMU's destination does.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::SnapshotError;
use super::meta::{
    FORMAT_VERSION, FileDigest, OPENING_FILE, PACKAGE_FILE, SnapshotMeta, SourceInfo, StreamFacts,
};
use super::store::StoreWriter;
use crate::wire::ram::RAM_IDSTR;
use crate::wire::{Command, Event, RamRecord, RpMessage, SectionKind, StreamDecoder};

/// Counts of what the sink received.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct SinkFigures {
    /// Full-page records received (re-sent pages counted each time).
    pub page_records: u64,
    /// Zero-page records received.
    pub zero_records: u64,
    /// Discard commands received (their pages are re-sent later by the source).
    pub discards: u64,
    /// Bytes of the opening.
    pub opening_bytes: u64,
    /// Bytes of the package.
    pub package_bytes: u64,
    /// Bytes of the whole stream.
    pub stream_bytes: u64,
}

/// Builds a snapshot directory from a migration stream.
pub struct Sink {
    dir: PathBuf,
    opening: Vec<u8>,
    opening_done: bool,
    ram_sid: Option<u32>,
    /// Current section and whether it is `ram`'s START.
    in_ram_start: bool,
    start_eos_seen: bool,
    section_footers: bool,
    switchover_start: bool,
    store: Option<StoreWriter>,
    package: Option<(u32, Vec<u8>)>,
    package_done: Option<Vec<u8>>,
    eof: bool,
    figures: SinkFigures,
}

impl Sink {
    /// A sink writing into `dir` (which must exist).
    pub fn new(dir: &Path) -> Sink {
        Sink {
            dir: dir.to_path_buf(),
            opening: Vec::new(),
            opening_done: false,
            ram_sid: None,
            in_ram_start: false,
            start_eos_seen: false,
            section_footers: false,
            switchover_start: false,
            store: None,
            package: None,
            package_done: None,
            eof: false,
            figures: SinkFigures::default(),
        }
    }

    /// Whether the stream's EOF was consumed.
    pub fn ended(&self) -> bool {
        self.eof
    }

    /// What was received so far.
    pub fn figures(&self) -> &SinkFigures {
        &self.figures
    }

    /// Takes one event with the raw bytes it was decoded from; returns the return-path
    /// reply it calls for, if any.
    pub fn on_event(
        &mut self,
        dec: &StreamDecoder,
        event: &Event<'_>,
        raw: &[u8],
    ) -> Result<Option<RpMessage<'static>>, SnapshotError> {
        self.figures.stream_bytes += raw.len() as u64;
        let reply = match event {
            Event::Command(Command::Ping(v)) => Some(RpMessage::Pong(*v)),
            _ => None,
        };
        if let Some((_, blob)) = &mut self.package {
            if let Event::PackageEnd = event {
                let (want, blob) = self.package.take().expect("in package");
                if blob.len() as u64 != u64::from(want) {
                    return Err(SnapshotError::Unsupported(format!(
                        "package of {want} bytes ended after {}",
                        blob.len()
                    )));
                }
                self.figures.package_bytes = blob.len() as u64;
                self.package_done = Some(blob);
            } else {
                blob.extend_from_slice(raw);
            }
            return Ok(reply);
        }
        if !self.opening_done {
            let closes_here = self.start_eos_seen;
            if closes_here {
                self.opening_done = true;
                if let Event::Footer { .. } = event {
                    self.section_footers = true;
                    self.opening.extend_from_slice(raw);
                    self.figures.opening_bytes = self.opening.len() as u64;
                    self.start_store(dec)?;
                    return Ok(reply);
                }
                self.figures.opening_bytes = self.opening.len() as u64;
                self.start_store(dec)?;
            } else {
                self.opening_event(event)?;
                self.opening.extend_from_slice(raw);
                return Ok(reply);
            }
        }
        self.stream_event(event)?;
        Ok(reply)
    }

    /// Events before the end of the `ram` START section.
    fn opening_event(&mut self, event: &Event<'_>) -> Result<(), SnapshotError> {
        match event {
            Event::FileHeader { .. } | Event::Configuration(_) | Event::Footer { .. } => Ok(()),
            Event::Command(Command::OpenReturnPath | Command::Ping(_)) => Ok(()),
            Event::Command(Command::PostcopyAdvise(Some(_))) => Ok(()),
            Event::Section(h) if h.kind == SectionKind::Start => {
                let ident = h.ident.as_ref().expect("START has an ident");
                if ident.idstr != RAM_IDSTR {
                    return Err(unsupported_section(ident.idstr, h.kind));
                }
                self.ram_sid = Some(h.section_id);
                self.in_ram_start = true;
                Ok(())
            }
            Event::Ram(RamRecord::Eos) if self.in_ram_start => {
                self.start_eos_seen = true;
                Ok(())
            }
            Event::Ram(RamRecord::MemSize { .. } | RamRecord::Block(_)) => Ok(()),
            Event::Ram(RamRecord::MultifdFlush) => Err(SnapshotError::Unsupported(
                "multifd is on; a snapshot needs the plain main channel".into(),
            )),
            Event::Command(Command::PostcopyAdvise(None)) => Err(SnapshotError::Unsupported(
                "the source advised postcopy for dirty bitmaps only; enable postcopy-ram".into(),
            )),
            other => Err(SnapshotError::Unsupported(format!(
                "{} before the ram section's block list (is postcopy-ram enabled on the source?)",
                describe(other)
            ))),
        }
    }

    /// Events after the opening, outside the package.
    fn stream_event(&mut self, event: &Event<'_>) -> Result<(), SnapshotError> {
        match event {
            Event::Section(h) => match h.kind {
                SectionKind::Part | SectionKind::End if Some(h.section_id) == self.ram_sid => {
                    Ok(())
                }
                _ => Err(match &h.ident {
                    Some(ident) => unsupported_section(ident.idstr, h.kind),
                    None => SnapshotError::Unsupported(format!(
                        "{} section {} is not ram's",
                        h.kind.name(),
                        h.section_id
                    )),
                }),
            },
            Event::Footer { .. } => Ok(()),
            Event::Ram(r) => self.ram_record(r),
            Event::Command(c) => match c {
                Command::Ping(_) => Ok(()),
                Command::PostcopyRamDiscard { .. } => {
                    self.figures.discards += 1;
                    Ok(())
                }
                Command::SwitchoverStart => {
                    self.switchover_start = true;
                    Ok(())
                }
                Command::Packaged { length } => {
                    if self.package_done.is_some() {
                        return Err(SnapshotError::Unsupported("a second package".into()));
                    }
                    self.package = Some((*length, Vec::with_capacity(*length as usize)));
                    Ok(())
                }
                other => Err(SnapshotError::Unsupported(format!(
                    "command {} in the stream",
                    other.name()
                ))),
            },
            Event::Eof => {
                if self.package_done.is_none() {
                    return Err(SnapshotError::Unsupported(
                        "the source completed in precopy, without a postcopy package".into(),
                    ));
                }
                self.eof = true;
                Ok(())
            }
            other => Err(SnapshotError::Unsupported(format!(
                "{} outside the postcopy package (the source completed in precopy?)",
                describe(other)
            ))),
        }
    }

    fn ram_record(&mut self, r: &RamRecord<'_>) -> Result<(), SnapshotError> {
        let store = self.store.as_mut().expect("store exists after the opening");
        match r {
            RamRecord::Page { header, data } => {
                self.figures.page_records += 1;
                store.put_page(header.block, header.offset, data)
            }
            RamRecord::Zero { header } => {
                self.figures.zero_records += 1;
                store.put_zero(header.block, header.offset)
            }
            RamRecord::Eos | RamRecord::MultifdFlush => Ok(()),
            RamRecord::Xbzrle { .. } | RamRecord::CompressedPage { .. } => {
                Err(SnapshotError::Unsupported(
                    "XBZRLE or compressed pages; disable xbzrle and compress on the source".into(),
                ))
            }
            RamRecord::MemSize { .. } | RamRecord::Block(_) => {
                Err(SnapshotError::Unsupported("a second RAM block list".into()))
            }
        }
    }

    fn start_store(&mut self, dec: &StreamDecoder) -> Result<(), SnapshotError> {
        let blocks: Vec<(String, u64)> = dec
            .layout()
            .blocks()
            .iter()
            .map(|b| (String::from_utf8_lossy(&b.name).into_owned(), b.used_length))
            .collect();
        if blocks.is_empty() {
            return Err(SnapshotError::Unsupported(
                "the source announced no RAM blocks".into(),
            ));
        }
        self.store = Some(StoreWriter::create(
            &self.dir,
            &blocks,
            dec.target_page_size(),
        )?);
        Ok(())
    }

    /// Completes the snapshot after EOF: checks every page arrived, writes the files and
    /// `meta.json`, and returns the metadata.
    pub fn finish(
        self,
        dec: &StreamDecoder,
        source: SourceInfo,
    ) -> Result<SnapshotMeta, SnapshotError> {
        if !self.eof {
            return Err(SnapshotError::Unsupported(
                "the stream ended before its EOF".into(),
            ));
        }
        let package = self.package_done.expect("EOF checked the package");
        let store = self.store.expect("EOF after the opening");
        let (blocks, index, pages_len) = store.finish()?;
        let write = |name: &str, bytes: &[u8]| {
            let p = self.dir.join(name);
            std::fs::write(&p, bytes).map_err(|e| SnapshotError::io("writing", &p, e))
        };
        write(OPENING_FILE, &self.opening)?;
        write(PACKAGE_FILE, &package)?;
        let meta = SnapshotMeta {
            format: FORMAT_VERSION,
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            source,
            stream: StreamFacts {
                ram_section_id: self.ram_sid.expect("opening had ram"),
                section_footers: self.section_footers,
                switchover_start: self.switchover_start,
                target_page_size: dec.target_page_size(),
            },
            blocks,
            opening: FileDigest::of(&self.opening),
            package: FileDigest::of(&package),
            index,
            pages_len,
        };
        meta.save(&self.dir)?;
        Ok(meta)
    }
}

fn unsupported_section(idstr: &[u8], kind: SectionKind) -> SnapshotError {
    SnapshotError::Unsupported(format!(
        "{} section for device {} outside the postcopy package: only RAM may be iterable \
         (block migration, dirty bitmaps and VFIO cannot be snapshotted lazily)",
        kind.name(),
        String::from_utf8_lossy(idstr)
    ))
}

fn describe(event: &Event<'_>) -> String {
    match event {
        Event::Command(c) => format!("command {}", c.name()),
        Event::Ram(_) => "a RAM record".into(),
        other => other.kind_name().to_string(),
    }
}
