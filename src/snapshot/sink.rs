//! The snapshot sink: consumes a decoded postcopy stream as a destination would and keeps
//! what a restore replays (protocol-spec/snapshot.md#snapshot-capture). Free of sockets:
//! the caller feeds decoded events with their raw bytes and sends the replies it returns.
//!
//! - The *opening* (file header, configuration, OPEN_RETURN_PATH, PING, ADVISE, and the
//!   `ram` START section with its block list and footer) is kept verbatim; a stream
//!   without a return path (QEMU's `background-snapshot`) gets the three commands a
//!   postcopy restore needs inserted before its `ram` START.
//! - Pages go to the page store, the last record for a page winning.
//! - Device state is kept as a package a restore replays: a postcopy package verbatim, or
//!   a precopy completion's device sections wrapped as a source wraps them at switchover
//!   (LISTEN, the sections, PING(3), RUN).
//! - Every PING is answered with its PONG, as QEMU's destination does.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::SnapshotError;
use super::meta::{
    FORMAT_VERSION, FileDigest, OPENING_FILE, PACKAGE_FILE, SnapshotMeta, SourceInfo, StreamFacts,
};
use super::store::StoreWriter;
use crate::wire::ram::RAM_IDSTR;
use crate::wire::{Advise, Command, Event, RamRecord, RpMessage, SectionKind, StreamDecoder};

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
    /// Bytes of the package (as stored: a precopy completion's device state is wrapped).
    pub package_bytes: u64,
    /// Bytes of device state a precopy completion sent after `END ram` (0 in postcopy).
    pub device_bytes: u64,
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
    /// `END ram` seen outside a package: a precopy completion.
    ram_end_seen: bool,
    /// A precopy completion's device state: its stream offset and its bytes so far.
    device: Option<(u64, Vec<u8>)>,
    /// The stream's own ADVISE and OPEN_RETURN_PATH, and where `ram` START began in
    /// the opening (where they go when the stream has none).
    advise_seen: bool,
    return_path_seen: bool,
    ram_start_at: Option<usize>,
    eof: bool,
    figures: SinkFigures,
}

/// Device state larger than this is refused: QEMU's non-iterable devices send kilobytes
/// to a few MiB; more means a device this lazy scheme cannot keep (VFIO, say).
pub const DEVICE_STATE_LIMIT: usize = 256 << 20;

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
            ram_end_seen: false,
            device: None,
            advise_seen: false,
            return_path_seen: false,
            ram_start_at: None,
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
        let offset = self.figures.stream_bytes;
        self.figures.stream_bytes += raw.len() as u64;
        let reply = match event {
            Event::Command(Command::Ping(v)) => Some(RpMessage::Pong(*v)),
            _ => None,
        };
        if let Some((_, bytes)) = &mut self.device {
            // Opaque from here on: the decoder frames none of it (device-state.md).
            if bytes.len() + raw.len() > DEVICE_STATE_LIMIT {
                return Err(SnapshotError::Unsupported(format!(
                    "device state beyond {} MiB",
                    DEVICE_STATE_LIMIT >> 20
                )));
            }
            bytes.extend_from_slice(raw);
            return Ok(reply);
        }
        // Device state outside a package: after `END ram` in a precopy completion, right
        // after the last PART in a background snapshot (which sends no `END ram`).
        if self.opening_done
            && self.package.is_none()
            && self.package_done.is_none()
            && let Event::Section(h) = event
            && h.kind == SectionKind::Full
        {
            self.device = Some((offset, raw.to_vec()));
            return Ok(reply);
        }
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
            Event::Command(Command::Ping(_)) => Ok(()),
            Event::Command(Command::OpenReturnPath) => {
                self.return_path_seen = true;
                Ok(())
            }
            Event::Command(Command::PostcopyAdvise(Some(_))) => {
                self.advise_seen = true;
                Ok(())
            }
            Event::Section(h) if h.kind == SectionKind::Start => {
                let ident = h.ident.as_ref().expect("START has an ident");
                if ident.idstr != RAM_IDSTR {
                    return Err(unsupported_section(ident.idstr, h.kind));
                }
                self.ram_start_at = Some(self.opening.len());
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
                SectionKind::Part if Some(h.section_id) == self.ram_sid => Ok(()),
                SectionKind::End if Some(h.section_id) == self.ram_sid => {
                    if self.package_done.is_none() {
                        self.ram_end_seen = true;
                    }
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
                    if !self.ram_end_seen {
                        return Err(SnapshotError::Unsupported(
                            "EOF before the ram section's end and without a postcopy package"
                                .into(),
                        ));
                    }
                    // A precopy completion with no device sections at all.
                    self.package_done = Some(wrap_device_state(&[]));
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

    /// After a precopy completion, whether its device state is whole: the bytes decoded
    /// so far end in EOF + a VMDESCRIPTION that is QEMU's (a JSON object naming
    /// `devices`). Then the sink has ended and the source waits for our SHUT. The check is
    /// strict because it runs at every read boundary, not only at the socket's end.
    pub fn precopy_complete(&mut self, dec: &StreamDecoder) -> bool {
        let Some((start, bytes)) = &self.device else {
            return false;
        };
        if self.eof {
            return true;
        }
        let Some(tail) = dec.opaque_end() else {
            return false;
        };
        let (Some(at), Some(len)) = (tail.vmdesc_offset, tail.vmdesc_len) else {
            return false;
        };
        let Some(json_at) = (at + 5).checked_sub(*start) else {
            return false;
        };
        let json = &bytes[json_at as usize..];
        let is_qemus = json.len() == len as usize
            && serde_json::from_slice::<serde_json::Value>(json)
                .is_ok_and(|v| v.get("devices").is_some_and(|d| d.is_array()));
        let Some(device_len) = tail.eof_offset.checked_sub(*start) else {
            return false;
        };
        if !is_qemus {
            return false;
        }
        let device = &bytes[..device_len as usize];
        self.figures.device_bytes = device.len() as u64;
        self.package_done = Some(wrap_device_state(device));
        self.device = None;
        self.eof = true;
        true
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
        let mut opening = self.opening;
        if !self.advise_seen {
            // No return path in the stream (background-snapshot): a postcopy restore
            // needs the commands a postcopy source sends before its `ram` START.
            let at = self.ram_start_at.expect("opening had ram");
            let mut inserted = Vec::new();
            if !self.return_path_seen {
                Command::OpenReturnPath.encode(&mut inserted);
                Command::Ping(1).encode(&mut inserted);
            }
            Command::PostcopyAdvise(Some(Advise {
                pagesize_summary: dec.target_page_size(),
                target_page_size: dec.target_page_size(),
            }))
            .encode(&mut inserted);
            opening.splice(at..at, inserted);
        }
        let write = |name: &str, bytes: &[u8]| {
            let p = self.dir.join(name);
            crate::durable::write_new_synced(&p, bytes)
                .map_err(|e| SnapshotError::io("writing", &p, e))
        };
        write(OPENING_FILE, &opening)?;
        write(PACKAGE_FILE, &package)?;
        let mut meta = SnapshotMeta {
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
            opening: FileDigest::of(&opening),
            package: FileDigest::of(&package),
            index,
            pages_len,
            checksum: String::new(),
        };
        meta.save(&self.dir)?;
        Ok(meta)
    }
}

/// Device sections of a precopy completion wrapped as a postcopy source packages them at
/// switchover (`migration.c:postcopy_start`): LISTEN first, PING(3) and RUN last.
fn wrap_device_state(sections: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(sections.len() + 32);
    Command::PostcopyListen.encode(&mut out);
    out.extend_from_slice(sections);
    Command::Ping(3).encode(&mut out);
    Command::PostcopyRun.encode(&mut out);
    out
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::meta::{OPENING_FILE, PACKAGE_FILE};
    use crate::wire::compose::{
        RamSections, put_opening, put_page, put_timer_section_header, put_zero,
    };
    use crate::wire::stream::{SECTION_EOF, encode_footer, encode_vmdescription_header};
    use crate::wire::{DecoderOptions, Step};

    const BLOCK: &[u8] = b"m";
    const SID: u32 = 2;

    /// The commands a postcopy source sends before `ram` START, as `put_opening` writes them.
    fn postcopy_commands() -> Vec<u8> {
        let mut out = Vec::new();
        Command::OpenReturnPath.encode(&mut out);
        Command::Ping(1).encode(&mut out);
        Command::PostcopyAdvise(Some(Advise {
            pagesize_summary: 4096,
            target_page_size: 4096,
        }))
        .encode(&mut out);
        out
    }

    fn device_sections() -> Vec<u8> {
        let mut out = Vec::new();
        put_timer_section_header(&mut out);
        // Bytes that look like an EOF + VMDESCRIPTION with a JSON value, but not QEMU's.
        out.extend_from_slice(&[0, 6, 0, 0, 0, 1, b'7', 0xaa, 0x55]);
        encode_footer(3, &mut out);
        out
    }

    /// A completion without a package: `END ram` (precopy) or not (background), device
    /// sections, EOF, VMDESCRIPTION. Returns the stream, the postcopy opening it should
    /// be stored with, and the device sections.
    fn stream(return_path: bool, ram_end: bool) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let mut postcopy_opening = Vec::new();
        put_opening(
            &mut postcopy_opening,
            b"pc-q35-10.0",
            SID,
            &[(BLOCK, 0x3000)],
        );
        let mut out = if return_path {
            postcopy_opening.clone()
        } else {
            let cmds = postcopy_commands();
            let at = postcopy_opening
                .windows(cmds.len())
                .position(|w| w == cmds)
                .expect("put_opening writes the commands");
            let mut o = postcopy_opening[..at].to_vec();
            o.extend_from_slice(&postcopy_opening[at + cmds.len()..]);
            o
        };
        let s = RamSections {
            section_id: SID,
            footers: true,
        };
        s.open_part(&mut out);
        put_page(&mut out, Some(BLOCK), 0, &[1u8; 4096]);
        put_zero(&mut out, None, 0x1000);
        s.close(&mut out);
        if ram_end {
            s.open_end(&mut out);
            put_page(&mut out, Some(BLOCK), 0x2000, &[2u8; 4096]);
            s.close(&mut out);
        } else {
            s.open_part(&mut out);
            put_page(&mut out, Some(BLOCK), 0x2000, &[2u8; 4096]);
            s.close(&mut out);
        }
        let device = device_sections();
        out.extend_from_slice(&device);
        out.push(SECTION_EOF);
        let json = br#"{"page_size":4096,"devices":[{"name":"timer"}]}"#;
        encode_vmdescription_header(json.len() as u32, &mut out);
        out.extend_from_slice(json);
        (out, postcopy_opening, device)
    }

    /// Feeds `bytes` in chunks of `chunk`, as reads would deliver them; returns the
    /// offset at which the sink called the stream whole.
    fn feed(sink: &mut Sink, dec: &mut StreamDecoder, bytes: &[u8], chunk: usize) -> usize {
        let mut buf = Vec::new();
        let mut fed = 0;
        while fed < bytes.len() {
            let n = chunk.min(bytes.len() - fed);
            buf.extend_from_slice(&bytes[fed..fed + n]);
            fed += n;
            while let Step::Event { len, event, .. } = dec.next(&buf).unwrap() {
                sink.on_event(dec, &event, &buf[..len]).unwrap();
                buf.drain(..len);
                if sink.ended() {
                    break;
                }
            }
            if sink.ended() || sink.precopy_complete(dec) {
                return fed;
            }
        }
        panic!("the sink never called the stream whole");
    }

    fn check(return_path: bool, ram_end: bool) {
        let (bytes, opening, device) = stream(return_path, ram_end);
        for chunk in [1, 7, 64, 4096, bytes.len()] {
            let dir = tempfile::tempdir().unwrap();
            let mut dec = StreamDecoder::new(DecoderOptions::default());
            let mut sink = Sink::new(dir.path());
            let at = feed(&mut sink, &mut dec, &bytes, chunk);
            assert_eq!(
                at,
                bytes.len(),
                "whole only at the last byte (chunk {chunk})"
            );
            assert_eq!(sink.figures().device_bytes, device.len() as u64);
            let source = SourceInfo {
                qemu_version: "10.0.2".into(),
                machine: "pc-q35-10.0".into(),
            };
            let meta = sink.finish(&dec, source).unwrap();
            assert_eq!(meta.blocks[0].data_pages, 2);
            // Stored as a postcopy source would have sent it.
            assert_eq!(
                std::fs::read(dir.path().join(OPENING_FILE)).unwrap(),
                opening
            );
            let mut package = Vec::new();
            Command::PostcopyListen.encode(&mut package);
            package.extend_from_slice(&device);
            Command::Ping(3).encode(&mut package);
            Command::PostcopyRun.encode(&mut package);
            assert_eq!(
                std::fs::read(dir.path().join(PACKAGE_FILE)).unwrap(),
                package
            );
        }
    }

    #[test]
    fn a_precopy_completion_is_stored_as_a_postcopy_package() {
        check(true, true);
    }

    #[test]
    fn a_background_snapshot_gets_the_postcopy_opening_and_package() {
        check(false, false);
    }

    #[test]
    fn device_state_past_the_limit_is_refused() {
        let (bytes, _, device) = stream(true, true);
        let start = bytes
            .windows(device.len())
            .position(|w| w == device)
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut dec = StreamDecoder::new(DecoderOptions::default());
        let mut sink = Sink::new(dir.path());
        feed_until(&mut sink, &mut dec, &bytes[..start + device.len()]);
        // Opaque from here: 1 MiB reads until the sink refuses.
        let chunk = vec![0x11u8; 1 << 20];
        let err = (0..=DEVICE_STATE_LIMIT >> 20)
            .find_map(|_| {
                let Step::Event { len, event, .. } = dec.next(&chunk).unwrap() else {
                    panic!("opaque bytes decode");
                };
                assert_eq!(len, chunk.len());
                sink.on_event(&dec, &event, &chunk).err()
            })
            .expect("refused before the limit is passed");
        assert!(
            err.to_string().contains("device state beyond 256 MiB"),
            "{err}"
        );
    }

    fn feed_until(sink: &mut Sink, dec: &mut StreamDecoder, bytes: &[u8]) {
        let mut buf = bytes.to_vec();
        while let Step::Event { len, event, .. } = dec.next(&buf).unwrap() {
            sink.on_event(dec, &event, &buf[..len]).unwrap();
            buf.drain(..len);
        }
    }
}
