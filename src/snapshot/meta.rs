//! `meta.json` of a snapshot directory: everything a restore needs besides the pages, and
//! the checksums that let it refuse a damaged snapshot before it sends a byte
//! (protocol-spec/snapshot.md#snapshot-layout).

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::SnapshotError;

/// Format version written into `meta.json`; a restore refuses any other.
pub const FORMAT_VERSION: u32 = 1;
/// File names inside a snapshot directory.
pub const META_FILE: &str = "meta.json";
/// The stream's opening, verbatim: file header, configuration, the commands before the
/// RAM section, and the `ram` START section with its block list.
pub const OPENING_FILE: &str = "opening.bin";
/// The device-state package's blob, verbatim (LISTEN, device sections, PING, RUN).
pub const PACKAGE_FILE: &str = "package.bin";
/// One little-endian xxh3-64 per target page, blocks in `meta.blocks` order.
pub const INDEX_FILE: &str = "index.bin";
/// Page contents, sparse: block `b`'s page at `b.store_offset + offset`; zero pages are holes.
pub const PAGES_FILE: &str = "pages.bin";

/// A file of the snapshot with its length and checksum.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileDigest {
    /// Bytes.
    pub len: u64,
    /// xxh3-64 of the whole file, hex.
    pub xxh3: String,
}

impl FileDigest {
    /// Digest of bytes held in memory.
    pub fn of(bytes: &[u8]) -> FileDigest {
        FileDigest {
            len: bytes.len() as u64,
            xxh3: format!("{:016x}", xxhash_rust::xxh3::xxh3_64(bytes)),
        }
    }

    /// Checks `bytes` (read from `file`) against this digest.
    pub fn check(&self, file: &'static str, bytes: &[u8]) -> Result<(), SnapshotError> {
        if bytes.len() as u64 != self.len {
            return Err(SnapshotError::Truncated {
                file,
                expected: self.len,
                found: bytes.len() as u64,
            });
        }
        let got = FileDigest::of(bytes);
        if got.xxh3 != self.xxh3 {
            return Err(SnapshotError::FileChecksum {
                file,
                expected: self.xxh3.clone(),
                found: got.xxh3,
            });
        }
        Ok(())
    }
}

/// One RAM block as the source announced it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BlockMeta {
    /// Block idstr (e.g. `m`, `pc.bios`, `/rom@etc/acpi/tables`).
    pub name: String,
    /// `used_length` in bytes.
    pub length: u64,
    /// Where the block starts in `pages.bin`.
    pub store_offset: u64,
    /// Pages holding data (the rest are zero).
    pub data_pages: u64,
}

/// What the source QEMU was.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct SourceInfo {
    /// QEMU version, e.g. `10.0.2`.
    pub qemu_version: String,
    /// Machine type as QMP names it.
    pub machine: String,
}

/// Stream facts a restore replays.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StreamFacts {
    /// Section id the source gave `ram`: later PART/END sections must use it.
    pub ram_section_id: u32,
    /// Whether sections carry footers (the source's `send-section-footer`).
    pub section_footers: bool,
    /// Whether the source sent SWITCHOVER_START before its discards (QEMU 10.0, machine
    /// types ≥ 10.0); replayed so the destination sees the same sequence.
    pub switchover_start: bool,
    /// Target page size (from POSTCOPY_ADVISE).
    pub target_page_size: u64,
}

/// The whole `meta.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotMeta {
    /// [`FORMAT_VERSION`].
    pub format: u32,
    /// Wall-clock time of the capture (seconds since the Unix epoch).
    pub created_unix: u64,
    /// The source QEMU.
    pub source: SourceInfo,
    /// Stream facts.
    pub stream: StreamFacts,
    /// RAM blocks in stream order.
    pub blocks: Vec<BlockMeta>,
    /// `opening.bin`.
    pub opening: FileDigest,
    /// `package.bin`.
    pub package: FileDigest,
    /// `index.bin`.
    pub index: FileDigest,
    /// Length of `pages.bin` (sparse; its digest would need every page read).
    pub pages_len: u64,
}

impl SnapshotMeta {
    /// Reads and checks `meta.json` of `dir`.
    pub fn load(dir: &Path) -> Result<SnapshotMeta, SnapshotError> {
        let path = dir.join(META_FILE);
        let text = std::fs::read(&path).map_err(|e| SnapshotError::io("reading", &path, e))?;
        let meta: SnapshotMeta =
            serde_json::from_slice(&text).map_err(|e| SnapshotError::BadMeta {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        if meta.format != FORMAT_VERSION {
            return Err(SnapshotError::BadMeta {
                path,
                reason: format!(
                    "format {} (this sidecar reads format {FORMAT_VERSION})",
                    meta.format
                ),
            });
        }
        let tps = meta.stream.target_page_size;
        if tps == 0 || !tps.is_power_of_two() {
            return Err(SnapshotError::BadMeta {
                path,
                reason: format!("target page size {tps} is not a power of two"),
            });
        }
        for b in &meta.blocks {
            if b.length % tps != 0 || b.store_offset % tps != 0 {
                return Err(SnapshotError::BadMeta {
                    path,
                    reason: format!("block {} is not page aligned", b.name),
                });
            }
        }
        Ok(meta)
    }

    /// Writes `meta.json` into `dir`.
    pub fn save(&self, dir: &Path) -> Result<(), SnapshotError> {
        let path = dir.join(META_FILE);
        let json = serde_json::to_vec_pretty(self).expect("meta serialises");
        crate::durable::write_atomically(&path, &json)
            .map_err(|e| SnapshotError::io("writing", &path, e))
    }

    /// Total target pages over all blocks (the length of the index).
    pub fn total_pages(&self) -> u64 {
        self.blocks
            .iter()
            .map(|b| b.length / self.stream.target_page_size)
            .sum()
    }
}
