//! `meta.json` of a snapshot directory: everything a restore needs besides the pages, and
//! the checksums that let it refuse a damaged snapshot before it sends a byte
//! (protocol-spec/snapshot.md#snapshot-layout).

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::SnapshotError;

/// Format version written into `meta.json`; a restore refuses any other. Format 2 added
/// the `checksum` over the metadata itself.
pub const FORMAT_VERSION: u32 = 2;
/// Smallest target page size accepted (QEMU's smallest target page).
pub const MIN_PAGE_SIZE: u64 = 4 << 10;
/// Largest target page size accepted (QEMU's largest hugepage).
pub const MAX_PAGE_SIZE: u64 = 1 << 30;
/// Largest `meta.json` read: a block list is kilobytes; more is not a snapshot of ours.
pub const META_LIMIT: u64 = 1 << 20;
/// Most RAM blocks a snapshot may list (QEMU guests have a few dozen).
pub const MAX_BLOCKS: usize = 4096;
/// Longest block idstr (QEMU's `RAMBlock.idstr` is 256 bytes with its NUL).
pub const MAX_BLOCK_NAME: usize = 255;
/// Most guest RAM a snapshot may describe (1 PiB): far beyond any guest, and small enough
/// that every offset and count derived from it fits in 64 bits.
pub const MAX_TOTAL_RAM: u64 = 1 << 50;
/// Largest `opening.bin` read into memory: an opening is a header, a few commands and a
/// block list.
pub const OPENING_LIMIT: u64 = 16 << 20;
/// Largest `package.bin` read into memory: the sink's device-state limit plus the framing
/// it adds.
pub const PACKAGE_LIMIT: u64 = super::sink::DEVICE_STATE_LIMIT as u64 + 4096;
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
    /// `xxh3:` and the xxh3-64 of this metadata serialised compactly with this field
    /// empty: a damaged or hand-edited `meta.json` is refused before its numbers are used.
    pub checksum: String,
}

/// Only the format field, read first so an older format is named as such rather than as a
/// missing field.
#[derive(Deserialize)]
struct FormatOnly {
    format: u32,
}

impl SnapshotMeta {
    /// Reads and checks `meta.json` of `dir`: its size, format, checksum and every field's
    /// bounds ([`SnapshotMeta::validate`]).
    pub fn load(dir: &Path) -> Result<SnapshotMeta, SnapshotError> {
        let path = dir.join(META_FILE);
        let text = read_limited(&path, META_LIMIT)?;
        let bad = |reason: String| SnapshotError::BadMeta {
            path: path.clone(),
            reason,
        };
        let format: FormatOnly = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
        if format.format != FORMAT_VERSION {
            return Err(bad(format!(
                "format {} (this sidecar reads format {FORMAT_VERSION}; take the snapshot again)",
                format.format
            )));
        }
        let meta: SnapshotMeta = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
        let found = meta.computed_checksum();
        if meta.checksum != found {
            return Err(SnapshotError::MetaChecksum {
                path,
                expected: meta.checksum.clone(),
                found,
            });
        }
        meta.validate(&path)?;
        Ok(meta)
    }

    /// The checksum this metadata should carry.
    pub fn computed_checksum(&self) -> String {
        let mut canonical = self.clone();
        canonical.checksum = String::new();
        let bytes = serde_json::to_vec(&canonical).expect("meta serialises");
        format!("xxh3:{:016x}", xxhash_rust::xxh3::xxh3_64(&bytes))
    }

    /// Checks every field a reader computes with: the page size is one QEMU uses, blocks
    /// are named, unique, page aligned, inside the total-RAM bound and disjoint in
    /// `pages.bin`, and the file lengths are within what a reader holds in memory. All
    /// arithmetic on the fields is checked, so later uses cannot overflow.
    pub fn validate(&self, path: &Path) -> Result<(), SnapshotError> {
        let field = |field: String, reason: String| SnapshotError::BadField {
            path: path.to_path_buf(),
            field,
            reason,
        };
        let tps = self.stream.target_page_size;
        if !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&tps) || !tps.is_power_of_two() {
            return Err(field(
                "stream.target_page_size".into(),
                format!("{tps} is not a power of two from {MIN_PAGE_SIZE} to {MAX_PAGE_SIZE}"),
            ));
        }
        if self.blocks.is_empty() || self.blocks.len() > MAX_BLOCKS {
            return Err(field(
                "blocks".into(),
                format!("{} blocks (1 to {MAX_BLOCKS} expected)", self.blocks.len()),
            ));
        }
        let mut total: u64 = 0;
        let mut store_end: u64 = 0;
        let mut names = std::collections::HashSet::new();
        for (i, b) in self.blocks.iter().enumerate() {
            let at = |f: &str| format!("blocks[{i}].{f}");
            if b.name.is_empty() || b.name.len() > MAX_BLOCK_NAME {
                return Err(field(
                    at("name"),
                    format!("{} bytes (1 to {MAX_BLOCK_NAME} expected)", b.name.len()),
                ));
            }
            if !names.insert(b.name.as_str()) {
                return Err(field(at("name"), format!("{:?} appears twice", b.name)));
            }
            if !b.length.is_multiple_of(tps) {
                return Err(field(
                    at("length"),
                    format!("{} is not a multiple of the {tps}-byte page", b.length),
                ));
            }
            total = total
                .checked_add(b.length)
                .filter(|t| *t <= MAX_TOTAL_RAM)
                .ok_or_else(|| {
                    field(
                        at("length"),
                        format!("RAM beyond {MAX_TOTAL_RAM} bytes in all"),
                    )
                })?;
            if !b.store_offset.is_multiple_of(tps) || b.store_offset < store_end {
                return Err(field(
                    at("store_offset"),
                    format!(
                        "{:#x} is unaligned or overlaps the previous block (which ends at {store_end:#x})",
                        b.store_offset
                    ),
                ));
            }
            store_end = b
                .store_offset
                .checked_add(b.length)
                .filter(|e| *e <= MAX_TOTAL_RAM.saturating_mul(2))
                .ok_or_else(|| {
                    field(
                        at("store_offset"),
                        format!("{:#x} lies beyond any page store", b.store_offset),
                    )
                })?;
            if b.data_pages > b.length / tps {
                return Err(field(
                    at("data_pages"),
                    format!("{} pages in a block of {}", b.data_pages, b.length / tps),
                ));
            }
        }
        if self.pages_len < store_end {
            return Err(field(
                "pages_len".into(),
                format!(
                    "{} bytes, but the blocks end at {store_end}",
                    self.pages_len
                ),
            ));
        }
        let index_len = (total / tps) * 8; // total ≤ 2^50: no overflow
        if self.index.len != index_len {
            return Err(field(
                "index.len".into(),
                format!("{} bytes where the blocks need {index_len}", self.index.len),
            ));
        }
        for (name, digest, limit) in [
            ("opening.len", &self.opening, OPENING_LIMIT),
            ("package.len", &self.package, PACKAGE_LIMIT),
        ] {
            if digest.len > limit {
                return Err(field(
                    name.into(),
                    format!("{} bytes (at most {limit})", digest.len),
                ));
            }
        }
        Ok(())
    }

    /// Writes `meta.json` into `dir` (atomically and durably), with its checksum.
    pub fn save(&mut self, dir: &Path) -> Result<(), SnapshotError> {
        self.checksum = self.computed_checksum();
        let path = dir.join(META_FILE);
        let json = serde_json::to_vec_pretty(&*self).expect("meta serialises");
        crate::durable::write_atomically(&path, &json)
            .map_err(|e| SnapshotError::io("writing", &path, e))
    }

    /// Total target pages over all blocks (the length of the index). Bounded by
    /// [`MAX_TOTAL_RAM`] once [`SnapshotMeta::validate`] passed.
    pub fn total_pages(&self) -> u64 {
        self.blocks
            .iter()
            .map(|b| b.length / self.stream.target_page_size)
            .fold(0u64, u64::saturating_add)
    }
}

/// Reads `path` whole, refusing one of more than `limit` bytes before reading it (a
/// snapshot directory is untrusted: a huge file must not exhaust memory).
pub fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>, SnapshotError> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| SnapshotError::io("opening", path, e))?;
    let len = file
        .metadata()
        .map_err(|e| SnapshotError::io("reading the size of", path, e))?
        .len();
    if len > limit {
        return Err(SnapshotError::TooLarge {
            path: path.to_path_buf(),
            limit,
        });
    }
    let mut out = Vec::new();
    out.try_reserve_exact(len as usize).map_err(|e| {
        SnapshotError::io(
            "allocating memory for",
            path,
            std::io::Error::new(std::io::ErrorKind::OutOfMemory, e),
        )
    })?;
    // Bounded again while reading: the file may grow between the size and the read.
    file.take(limit + 1)
        .read_to_end(&mut out)
        .map_err(|e| SnapshotError::io("reading", path, e))?;
    if out.len() as u64 > limit {
        return Err(SnapshotError::TooLarge {
            path: path.to_path_buf(),
            limit,
        });
    }
    Ok(out)
}

/// Reads `file` of `dir`, which `digest` describes: refuses a length other than the
/// recorded one before reading more than it, then checks the content.
pub fn read_checked(
    dir: &Path,
    file: &'static str,
    digest: &FileDigest,
) -> Result<Vec<u8>, SnapshotError> {
    let path = dir.join(file);
    let bytes = read_limited(&path, digest.len).map_err(|e| match e {
        SnapshotError::TooLarge { .. } => SnapshotError::Truncated {
            file,
            expected: digest.len,
            found: std::fs::metadata(&path)
                .map(|m| m.len())
                .unwrap_or(u64::MAX),
        },
        other => other,
    })?;
    digest.check(file, &bytes)?;
    Ok(bytes)
}
