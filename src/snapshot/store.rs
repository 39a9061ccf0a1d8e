//! The page store: `pages.bin` holds every block at a fixed offset, so any page is one
//! `pread` at `block.store_offset + offset` (O(1), shareable read-only by any number of
//! restores through the page cache); zero pages are holes and cost no disk. `index.bin`
//! holds an xxh3-64 per page, so every page is checked before it is sent
//! (protocol-spec/snapshot.md#snapshot-layout).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use xxhash_rust::xxh3::xxh3_64;

use super::SnapshotError;
use super::meta::{BlockMeta, FileDigest, INDEX_FILE, META_FILE, PAGES_FILE, SnapshotMeta};

/// Blocks start on 2 MiB boundaries in `pages.bin`, so a hugepage-backed block could be
/// mapped straight from the file later.
pub const BLOCK_ALIGN: u64 = 2 << 20;

/// xxh3-64 of a page of zeroes of `page_size` bytes: the index value of a zero page.
/// Computed once per page size and streamed, so a 1 GiB page costs no 1 GiB buffer.
pub fn zero_page_hash(page_size: u64) -> u64 {
    static CACHE: [OnceLock<u64>; 64] = [const { OnceLock::new() }; 64];
    let compute = || {
        let zeroes = [0u8; 64 << 10];
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        let mut left = page_size;
        while left > 0 {
            let n = left.min(zeroes.len() as u64);
            h.update(&zeroes[..n as usize]);
            left -= n;
        }
        h.digest()
    };
    if page_size.is_power_of_two() {
        *CACHE[page_size.trailing_zeros() as usize].get_or_init(compute)
    } else {
        compute()
    }
}

/// What the index says about one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageKind {
    /// All zeroes: nothing stored.
    Zero,
    /// Data with this checksum.
    Data(u64),
}

/// Builds a page store while a migration stream arrives. The last record for a page wins,
/// as on a destination QEMU (a page re-sent after the guest dirtied it replaces the old).
pub struct StoreWriter {
    dir: PathBuf,
    pages: File,
    page_size: u64,
    zero_hash: u64,
    blocks: Vec<BlockMeta>,
    /// First index slot of each block.
    first_slot: Vec<usize>,
    index: Vec<u64>,
    received: Vec<bool>,
}

impl StoreWriter {
    /// Creates `pages.bin` in `dir` for `blocks` (name, length) in stream order.
    pub fn create(
        dir: &Path,
        blocks: &[(String, u64)],
        page_size: u64,
    ) -> Result<StoreWriter, SnapshotError> {
        let path = dir.join(PAGES_FILE);
        let pages = File::create(&path).map_err(|e| SnapshotError::io("creating", &path, e))?;
        let mut offset = 0;
        let mut metas = Vec::new();
        let mut first_slot = Vec::new();
        let mut slots = 0usize;
        for (name, length) in blocks {
            if length % page_size != 0 {
                return Err(SnapshotError::Unsupported(format!(
                    "RAM block {name} has length {length}, not a multiple of the {page_size}-byte page"
                )));
            }
            metas.push(BlockMeta {
                name: name.clone(),
                length: *length,
                store_offset: offset,
                data_pages: 0,
            });
            first_slot.push(slots);
            slots += (length / page_size) as usize;
            offset += length.div_ceil(BLOCK_ALIGN) * BLOCK_ALIGN;
        }
        pages
            .set_len(offset)
            .map_err(|e| SnapshotError::io("sizing", &path, e))?;
        let zero_hash = zero_page_hash(page_size);
        Ok(StoreWriter {
            dir: dir.to_path_buf(),
            pages,
            page_size,
            zero_hash,
            blocks: metas,
            first_slot,
            index: vec![zero_hash; slots],
            received: vec![false; slots],
        })
    }

    fn slot(&self, block: usize, offset: u64) -> Result<usize, SnapshotError> {
        let b = self.blocks.get(block).ok_or_else(|| {
            SnapshotError::Unsupported(format!("page for unknown block #{block}"))
        })?;
        if !offset.is_multiple_of(self.page_size) || offset >= b.length {
            return Err(SnapshotError::Unsupported(format!(
                "page at offset {offset:#x} outside block {} ({} bytes) or unaligned",
                b.name, b.length
            )));
        }
        Ok(self.first_slot[block] + (offset / self.page_size) as usize)
    }

    /// Stores a full page.
    pub fn put_page(
        &mut self,
        block: usize,
        offset: u64,
        data: &[u8],
    ) -> Result<(), SnapshotError> {
        if data.iter().all(|&b| b == 0) {
            return self.put_zero(block, offset);
        }
        let slot = self.slot(block, offset)?;
        let at = self.blocks[block].store_offset + offset;
        self.pages
            .write_all_at(data, at)
            .map_err(|e| SnapshotError::io("writing a page to", &self.dir.join(PAGES_FILE), e))?;
        self.index[slot] = xxh3_64(data);
        self.received[slot] = true;
        Ok(())
    }

    /// Records a zero page, punching out data a previous record for the page stored.
    pub fn put_zero(&mut self, block: usize, offset: u64) -> Result<(), SnapshotError> {
        let slot = self.slot(block, offset)?;
        if self.index[slot] != self.zero_hash {
            let at = self.blocks[block].store_offset + offset;
            nix::fcntl::fallocate(
                &self.pages,
                nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                    | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
                at as i64,
                self.page_size as i64,
            )
            .map_err(|e| {
                SnapshotError::io(
                    "punching a zero page into",
                    &self.dir.join(PAGES_FILE),
                    e.into(),
                )
            })?;
        }
        self.index[slot] = self.zero_hash;
        self.received[slot] = true;
        Ok(())
    }

    /// Checks that every page of every block arrived, writes `index.bin` and syncs both
    /// files. Returns the blocks (with their data-page counts) and the index digest.
    pub fn finish(mut self) -> Result<(Vec<BlockMeta>, FileDigest, u64), SnapshotError> {
        for (i, b) in self.blocks.iter().enumerate() {
            let first = self.first_slot[i];
            let n = (b.length / self.page_size) as usize;
            if let Some(missing) = self.received[first..first + n].iter().position(|r| !r) {
                let count = self.received[first..first + n]
                    .iter()
                    .filter(|r| !**r)
                    .count();
                return Err(SnapshotError::Incomplete {
                    block: b.name.clone(),
                    offset: missing as u64 * self.page_size,
                    missing: count as u64,
                });
            }
        }
        for (i, b) in self.blocks.iter_mut().enumerate() {
            let first = self.first_slot[i];
            let n = (b.length / self.page_size) as usize;
            b.data_pages = self.index[first..first + n]
                .iter()
                .filter(|&&h| h != self.zero_hash)
                .count() as u64;
        }
        let bytes: Vec<u8> = self.index.iter().flat_map(|h| h.to_le_bytes()).collect();
        let path = self.dir.join(INDEX_FILE);
        crate::durable::write_new_synced(&path, &bytes)
            .map_err(|e| SnapshotError::io("writing", &path, e))?;
        let pages_path = self.dir.join(PAGES_FILE);
        self.pages
            .sync_all()
            .map_err(|e| SnapshotError::io("syncing", &pages_path, e))?;
        let len = self
            .pages
            .metadata()
            .map_err(|e| SnapshotError::io("reading the size of", &pages_path, e))?
            .len();
        Ok((self.blocks, FileDigest::of(&bytes), len))
    }
}

/// A page store opened for reading. Cheap to share behind an `Arc`: reads are positional
/// and need no lock.
///
/// Nothing of the directory is mapped: a file truncated or rewritten under a running
/// restore gives a typed error on the next read (or is not seen at all), never a SIGBUS
/// that would kill every restore and clone of the process.
pub struct PageStore {
    dir: PathBuf,
    pages: File,
    pages_len: u64,
    page_size: u64,
    zero_hash: u64,
    blocks: Vec<BlockMeta>,
    first_slot: Vec<u64>,
    /// `index.bin`, read and checked against its digest at open: what is used is what was
    /// checked, whatever happens to the file afterwards (8 bytes per page: 2 MiB per GiB of
    /// 4 KiB-page RAM, shared by every restore of the snapshot).
    index: Box<[u8]>,
}

impl PageStore {
    /// Opens the store of a snapshot whose `meta.json` was loaded: checks the metadata's
    /// bounds, reads the index (refused unless its length and digest are the recorded
    /// ones) and checks the pages file's length (a truncated snapshot is refused here).
    pub fn open(dir: &Path, meta: &SnapshotMeta) -> Result<PageStore, SnapshotError> {
        meta.validate(&dir.join(META_FILE))?;
        let index = super::meta::read_checked(dir, INDEX_FILE, &meta.index)?;
        let page_size = meta.stream.target_page_size;
        let pages_path = dir.join(PAGES_FILE);
        let pages =
            File::open(&pages_path).map_err(|e| SnapshotError::io("opening", &pages_path, e))?;
        let len = pages
            .metadata()
            .map_err(|e| SnapshotError::io("reading the size of", &pages_path, e))?
            .len();
        if len != meta.pages_len {
            return Err(SnapshotError::Truncated {
                file: PAGES_FILE,
                expected: meta.pages_len,
                found: len,
            });
        }
        let mut first_slot = Vec::with_capacity(meta.blocks.len());
        let mut slots = 0u64;
        for b in &meta.blocks {
            first_slot.push(slots);
            slots += b.length / page_size; // bounded by validate
        }
        Ok(PageStore {
            dir: dir.to_path_buf(),
            pages,
            pages_len: len,
            page_size,
            zero_hash: zero_page_hash(page_size),
            blocks: meta.blocks.clone(),
            first_slot,
            index: index.into_boxed_slice(),
        })
    }

    /// The target page size.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Blocks in stream order.
    pub fn blocks(&self) -> &[BlockMeta] {
        &self.blocks
    }

    /// Pages in block `block` (in range).
    pub fn block_pages(&self, block: usize) -> u64 {
        self.blocks[block].length / self.page_size
    }

    fn check_range(&self, block: usize, page: u64) -> Result<(), SnapshotError> {
        match self.blocks.get(block) {
            Some(b) if page < b.length / self.page_size => Ok(()),
            _ => Err(SnapshotError::PageOutOfRange { block, page }),
        }
    }

    /// The index entry of page `page` of `block` (both in range: the page server checks
    /// every request against the blocks first).
    pub fn kind(&self, block: usize, page: u64) -> PageKind {
        let at = ((self.first_slot[block] + page) * 8) as usize;
        let entry: [u8; 8] = self.index[at..at + 8].try_into().expect("8 bytes");
        let h = u64::from_le_bytes(entry);
        if h == self.zero_hash {
            PageKind::Zero
        } else {
            PageKind::Data(h)
        }
    }

    /// Reads a page into `out` (one page long) and checks it against the index, so a
    /// damaged page is never sent. A page outside the store, or a pages file shortened
    /// since it was opened, is a typed error.
    pub fn read(&self, block: usize, page: u64, out: &mut [u8]) -> Result<(), SnapshotError> {
        self.check_range(block, page)?;
        if out.len() as u64 != self.page_size {
            return Err(SnapshotError::Unsupported(format!(
                "a read of {} bytes from a store of {}-byte pages",
                out.len(),
                self.page_size
            )));
        }
        let b = &self.blocks[block];
        let offset = page * self.page_size;
        match self.kind(block, page) {
            PageKind::Zero => {
                out.fill(0);
                Ok(())
            }
            PageKind::Data(want) => {
                if let Err(e) = self.pages.read_exact_at(out, b.store_offset + offset) {
                    if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        let found = self.pages.metadata().map(|m| m.len()).unwrap_or(0);
                        return Err(SnapshotError::Truncated {
                            file: PAGES_FILE,
                            expected: self.pages_len,
                            found,
                        });
                    }
                    let path = self.dir.join(PAGES_FILE);
                    return Err(SnapshotError::io("reading a page from", &path, e));
                }
                if xxh3_64(out) != want {
                    return Err(SnapshotError::PageChecksum {
                        block: b.name.clone(),
                        offset,
                    });
                }
                Ok(())
            }
        }
    }

    /// Reads and checks every data page; returns how many were checked.
    pub fn verify_all(&self) -> Result<u64, SnapshotError> {
        let mut buf = Vec::new();
        let mut n = 0;
        for block in 0..self.blocks.len() {
            for page in 0..self.block_pages(block) {
                if let PageKind::Data(_) = self.kind(block, page) {
                    buf.resize(self.page_size as usize, 0);
                    self.read(block, page, &mut buf)?;
                    n += 1;
                }
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::meta::{SourceInfo, StreamFacts};

    fn meta_for(blocks: Vec<BlockMeta>, index: FileDigest, pages_len: u64) -> SnapshotMeta {
        SnapshotMeta {
            format: crate::snapshot::meta::FORMAT_VERSION,
            created_unix: 0,
            source: SourceInfo::default(),
            stream: StreamFacts {
                ram_section_id: 1,
                section_footers: true,
                switchover_start: false,
                target_page_size: 4096,
            },
            blocks,
            opening: FileDigest::of(b""),
            package: FileDigest::of(b""),
            index,
            pages_len,
            checksum: String::new(),
        }
    }

    #[test]
    fn last_record_wins_and_zero_pages_are_holes() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = StoreWriter::create(
            dir.path(),
            &[("m".into(), 4 * 4096), ("rom".into(), 4096)],
            4096,
        )
        .unwrap();
        w.put_page(0, 0, &[1u8; 4096]).unwrap();
        w.put_page(0, 4096, &[2u8; 4096]).unwrap();
        w.put_zero(0, 4096).unwrap(); // dirtied to zero later
        w.put_zero(0, 2 * 4096).unwrap();
        w.put_page(0, 3 * 4096, &[0u8; 4096]).unwrap(); // a zero-filled PAGE is a zero page
        w.put_page(1, 0, &[9u8; 4096]).unwrap();
        let (blocks, index, len) = w.finish().unwrap();
        assert_eq!(blocks[0].data_pages, 1);
        assert_eq!(blocks[1].store_offset, BLOCK_ALIGN);
        let store = PageStore::open(dir.path(), &meta_for(blocks, index, len)).unwrap();
        let mut buf = vec![0u8; 4096];
        store.read(0, 0, &mut buf).unwrap();
        assert_eq!(buf, vec![1u8; 4096]);
        assert_eq!(store.kind(0, 1), PageKind::Zero);
        store.read(1, 0, &mut buf).unwrap();
        assert_eq!(buf, vec![9u8; 4096]);
        assert_eq!(store.verify_all().unwrap(), 2);
    }

    #[test]
    fn a_missing_page_fails_the_capture_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = StoreWriter::create(dir.path(), &[("m".into(), 2 * 4096)], 4096).unwrap();
        w.put_zero(0, 0).unwrap();
        match w.finish() {
            Err(SnapshotError::Incomplete {
                block,
                offset,
                missing,
            }) => assert_eq!((block.as_str(), offset, missing), ("m", 4096, 1)),
            other => panic!("{:?}", other.map(|_| ())),
        }
    }

    #[test]
    fn a_corrupted_page_is_refused_with_its_place() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = StoreWriter::create(dir.path(), &[("m".into(), 2 * 4096)], 4096).unwrap();
        w.put_page(0, 0, &[1u8; 4096]).unwrap();
        w.put_page(0, 4096, &[3u8; 4096]).unwrap();
        let (blocks, index, len) = w.finish().unwrap();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join(PAGES_FILE))
            .unwrap();
        f.write_all_at(&[0xff], 4096 + 17).unwrap();
        let store = PageStore::open(dir.path(), &meta_for(blocks, index, len)).unwrap();
        let mut buf = vec![0u8; 4096];
        store.read(0, 0, &mut buf).unwrap();
        match store.read(0, 1, &mut buf) {
            Err(SnapshotError::PageChecksum { block, offset }) => {
                assert_eq!((block.as_str(), offset), ("m", 4096))
            }
            other => panic!("{other:?}"),
        }
        assert!(store.verify_all().is_err());
    }
}
