//! A snapshot's working set: the pages a restored guest asked for, in the order it first
//! asked (protocol-spec/snapshot.md#snapshot-working-set). The first restore of a snapshot
//! records it next to the snapshot; later restores (and clones) stream it first, ahead of
//! the background sweep, so the guest finds most of what it touches already placed
//! instead of waiting for a round trip per page. Live requests still come first.
//!
//! The file is untrusted input like the rest of the snapshot: a magic, a count, entries of
//! (block index, page index) and an xxh3 over all of it; every entry is checked against
//! the store's blocks, and a damaged file is refused with a typed error (the restore then
//! goes on without it).

use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::xxh3_64;

use crate::snapshot::PageStore;

/// The working set's file in the snapshot directory.
pub const WORKING_SET_FILE: &str = "working-set.bin";
const MAGIC: &[u8; 8] = b"PCSWSET1";
const ENTRY: usize = 12;

/// Why a working-set file was not used.
#[derive(Debug, thiserror::Error)]
pub enum WorkingSetError {
    /// Reading or writing it.
    #[error("working set {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// Its bytes do not describe pages of this snapshot.
    #[error("working set {path}: {reason}")]
    Bad {
        /// The file.
        path: PathBuf,
        /// What is wrong, and where.
        reason: String,
    },
}

/// Pages in the order a guest first asked for them: (block index, page index).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkingSet {
    pages: Vec<(u32, u64)>,
}

impl WorkingSet {
    /// The pages, in order.
    pub fn pages(&self) -> &[(u32, u64)] {
        &self.pages
    }

    /// How many pages it holds.
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// The file's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.pages.len() * ENTRY + 8);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(self.pages.len() as u64).to_le_bytes());
        for (b, p) in &self.pages {
            out.extend_from_slice(&b.to_le_bytes());
            out.extend_from_slice(&p.to_le_bytes());
        }
        let sum = xxh3_64(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }

    /// Parses `bytes` (read from `path`) against the blocks of `store`: the checksum, the
    /// count against the length and the store's page total, every entry inside its block,
    /// no page twice.
    pub fn decode(bytes: &[u8], path: &Path, store: &PageStore) -> Result<Self, WorkingSetError> {
        let bad = |reason: String| WorkingSetError::Bad {
            path: path.to_path_buf(),
            reason,
        };
        if bytes.len() < 24 || &bytes[..8] != MAGIC {
            return Err(bad("not a working-set file (magic)".into()));
        }
        let (body, sum) = bytes.split_at(bytes.len() - 8);
        let recorded = u64::from_le_bytes(sum.try_into().expect("8 bytes"));
        if xxh3_64(body) != recorded {
            return Err(bad("fails its checksum".into()));
        }
        let count = u64::from_le_bytes(body[8..16].try_into().expect("8 bytes"));
        let entries = &body[16..];
        let total: u64 = (0..store.blocks().len())
            .map(|b| store.block_pages(b))
            .sum();
        if count > total
            || Some(entries.len())
                != usize::try_from(count)
                    .ok()
                    .and_then(|c| c.checked_mul(ENTRY))
        {
            return Err(bad(format!(
                "{count} entries declared, {} bytes of entries, {total} pages in the snapshot",
                entries.len()
            )));
        }
        let mut seen: Vec<Vec<u64>> = (0..store.blocks().len())
            .map(|b| vec![0u64; store.block_pages(b).div_ceil(64) as usize])
            .collect();
        let mut pages = Vec::with_capacity(count as usize);
        for (i, e) in entries.chunks_exact(ENTRY).enumerate() {
            let block = u32::from_le_bytes(e[..4].try_into().expect("4 bytes"));
            let page = u64::from_le_bytes(e[4..].try_into().expect("8 bytes"));
            let Some(bits) = seen.get_mut(block as usize) else {
                return Err(bad(format!("entry {i}: block #{block} does not exist")));
            };
            if page >= store.block_pages(block as usize) {
                return Err(bad(format!(
                    "entry {i}: page {page} is outside block #{block}"
                )));
            }
            let (w, bit) = ((page / 64) as usize, 1u64 << (page % 64));
            if bits[w] & bit != 0 {
                return Err(bad(format!(
                    "entry {i}: page {page} of block #{block} repeats"
                )));
            }
            bits[w] |= bit;
            pages.push((block, page));
        }
        Ok(WorkingSet { pages })
    }

    /// Reads the working set of the snapshot in `dir`, if it has one.
    pub fn load(dir: &Path, store: &PageStore) -> Result<Option<Self>, WorkingSetError> {
        let path = dir.join(WORKING_SET_FILE);
        let io = |source| WorkingSetError::Io {
            path: path.clone(),
            source,
        };
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        let total: u64 = (0..store.blocks().len())
            .map(|b| store.block_pages(b))
            .sum();
        if !meta.is_file() || meta.len() > 24 + total.saturating_mul(ENTRY as u64) {
            return Err(WorkingSetError::Bad {
                path,
                reason: format!(
                    "not a regular file of at most {} bytes",
                    24 + total.saturating_mul(ENTRY as u64)
                ),
            });
        }
        let bytes = std::fs::read(&path).map_err(io)?;
        Self::decode(&bytes, &path, store).map(Some)
    }

    /// Saves it into `dir` unless a working set is there already (the first restore's
    /// record stays; concurrent clones do not overwrite each other). Returns whether it was
    /// written.
    pub fn save_new(&self, dir: &Path) -> Result<bool, WorkingSetError> {
        let path = dir.join(WORKING_SET_FILE);
        match crate::durable::write_atomically_new(&path, &self.encode()) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(source) => Err(WorkingSetError::Io { path, source }),
        }
    }
}

/// Records the pages a guest asks for, each once, in the order of its first request.
#[derive(Debug)]
pub struct Recorder {
    seen: Vec<Vec<u64>>,
    set: WorkingSet,
}

impl Recorder {
    /// A recorder for blocks of these page counts.
    pub fn new(block_pages: impl IntoIterator<Item = u64>) -> Recorder {
        Recorder {
            seen: block_pages
                .into_iter()
                .map(|n| vec![0u64; n.div_ceil(64) as usize])
                .collect(),
            set: WorkingSet::default(),
        }
    }

    /// The guest asked for `page` of `block` (ignored when out of range or seen before).
    pub fn requested(&mut self, block: usize, page: u64) {
        let Some(bits) = self.seen.get_mut(block) else {
            return;
        };
        let Some(w) = bits.get_mut((page / 64) as usize) else {
            return;
        };
        let bit = 1u64 << (page % 64);
        if *w & bit == 0 {
            *w |= bit;
            self.set.pages.push((block as u32, page));
        }
    }

    /// What was recorded.
    pub fn into_set(self) -> WorkingSet {
        self.set
    }
}

/// Where a restore is in replaying a working set. It follows the guest: a request for a
/// page further on in the set means the guest got there before the stream, so the replay
/// jumps on past that page (what the guest touches next, in the recorded order) and comes
/// back for the pages it skipped once the rest of the set is out. Without this a guest
/// that outruns the stream (a sweep of its whole memory, say) faults on every page the
/// stream has not reached, one prefetch window at a time.
#[derive(Debug)]
pub struct Replay {
    set: WorkingSet,
    /// Next position, and the end of the stretch being replayed.
    at: usize,
    end: usize,
    /// Stretches jumped over, in the order to come back to them.
    skipped: std::collections::VecDeque<std::ops::Range<usize>>,
    /// (block, page, position in the set), sorted, to find a requested page's position.
    positions: Vec<(u32, u64, u32)>,
}

impl Replay {
    /// A replay of `set` from its start. A set of more than 2³² pages (16 TiB of 4 KiB
    /// pages) is replayed in order only.
    pub fn new(set: WorkingSet) -> Replay {
        let mut positions: Vec<(u32, u64, u32)> = match u32::try_from(set.pages.len()) {
            Ok(_) => set
                .pages
                .iter()
                .enumerate()
                .map(|(i, &(b, p))| (b, p, i as u32))
                .collect(),
            Err(_) => Vec::new(),
        };
        positions.sort_unstable();
        Replay {
            end: set.pages.len(),
            set,
            at: 0,
            skipped: Default::default(),
            positions,
        }
    }

    /// The next page to stream (`None` once every stretch is out). The caller skips pages
    /// it already sent.
    pub fn next_page(&mut self) -> Option<(u32, u64)> {
        while self.at >= self.end {
            let r = self.skipped.pop_front()?;
            (self.at, self.end) = (r.start, r.end);
        }
        let page = self.set.pages[self.at];
        self.at += 1;
        Some(page)
    }

    /// The guest asked for `page` of `block`: if the set has it further on in the stretch
    /// being replayed, continue right after it and come back for what lies between later.
    pub fn follow(&mut self, block: usize, page: u64) {
        let Ok(block) = u32::try_from(block) else {
            return;
        };
        let Ok(i) = self
            .positions
            .binary_search_by(|&(b, p, _)| (b, p).cmp(&(block, page)))
        else {
            return;
        };
        let pos = self.positions[i].2 as usize;
        if pos < self.at || pos >= self.end {
            return;
        }
        if pos > self.at {
            self.skipped.push_back(self.at..pos);
        }
        self.at = pos + 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, PageStore) {
        let dir = tempfile::tempdir().unwrap();
        let meta = crate::synth::snapshot::write(dir.path(), 8, 7).unwrap();
        let store = PageStore::open(dir.path(), &meta).unwrap();
        (dir, store)
    }

    #[test]
    fn a_recorded_set_round_trips_through_its_file_in_order() {
        let (dir, store) = store();
        let mut r = Recorder::new((0..store.blocks().len()).map(|b| store.block_pages(b)));
        for p in [5, 1, 5, 3, 1, 0] {
            r.requested(0, p);
        }
        r.requested(9, 0); // no such block: ignored
        let set = r.into_set();
        assert_eq!(set.pages(), &[(0, 5), (0, 1), (0, 3), (0, 0)]);
        assert!(set.save_new(dir.path()).unwrap());
        // A second save (another clone) keeps the first record.
        assert!(!WorkingSet::default().save_new(dir.path()).unwrap());
        assert_eq!(WorkingSet::load(dir.path(), &store).unwrap(), Some(set));
    }

    /// The replay jumps on past a page the guest asked for and comes back for the pages
    /// it jumped over, each page once; a request behind the replay or outside the set
    /// changes nothing.
    #[test]
    fn the_replay_follows_the_guest_and_comes_back_for_what_it_skipped() {
        let mut rec = Recorder::new([100, 100]);
        for p in 0..10 {
            rec.requested(p % 2, 10 * p as u64);
        }
        let mut r = Replay::new(rec.into_set());
        assert_eq!(r.next_page(), Some((0, 0)));
        assert_eq!(r.next_page(), Some((1, 10)));
        // The guest is at the 6th page of the set already.
        r.follow(1, 50);
        // Behind the replay, or not in the set: no jump.
        r.follow(0, 0);
        r.follow(0, 1);
        assert_eq!(r.next_page(), Some((0, 60)));
        r.follow(0, 80);
        assert_eq!(r.next_page(), Some((1, 90)));
        // The skipped stretches, in order, then nothing.
        let rest: Vec<_> = std::iter::from_fn(|| r.next_page()).collect();
        assert_eq!(
            rest,
            [(0, 20), (1, 30), (0, 40), (1, 70)],
            "skipped stretches in order"
        );
        // A request inside a skipped stretch once it is being replayed jumps within it.
        let mut rec = Recorder::new([100]);
        for p in 0..6 {
            rec.requested(0, p);
        }
        let mut r = Replay::new(rec.into_set());
        r.follow(0, 4);
        assert_eq!(r.next_page(), Some((0, 5)));
        assert_eq!(r.next_page(), Some((0, 0)));
        r.follow(0, 2);
        assert_eq!(
            std::iter::from_fn(|| r.next_page()).collect::<Vec<_>>(),
            [(0, 3), (0, 1)]
        );
    }

    #[test]
    fn a_snapshot_without_one_has_none() {
        let (dir, store) = store();
        assert_eq!(WorkingSet::load(dir.path(), &store).unwrap(), None);
    }

    #[test]
    fn damaged_or_foreign_sets_are_refused_by_reason() {
        let (dir, store) = store();
        let path = dir.path().join(WORKING_SET_FILE);
        let reason = |bytes: &[u8]| match WorkingSet::decode(bytes, &path, &store) {
            Err(WorkingSetError::Bad { reason, .. }) => reason,
            other => panic!("{other:?}"),
        };
        let good = WorkingSet {
            pages: vec![(0, 1), (0, 2)],
        }
        .encode();
        let mut flipped = good.clone();
        flipped[17] ^= 1;
        assert!(reason(&flipped).contains("checksum"));
        assert!(reason(b"PCSWSET0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0").contains("magic"));
        // Valid checksums over bad contents.
        let pages = store.block_pages(0);
        for (set, want) in [
            (vec![(7, 0)], "does not exist"),
            (vec![(0, pages)], "outside block"),
            (vec![(0, 1), (0, 1)], "repeats"),
        ] {
            assert!(reason(&WorkingSet { pages: set }.encode()).contains(want));
        }
        let mut lying = WorkingSet {
            pages: vec![(0, 1)],
        }
        .encode();
        lying[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        let body = lying.len() - 8;
        let sum = xxh3_64(&lying[..body]);
        lying[body..].copy_from_slice(&sum.to_le_bytes());
        assert!(reason(&lying).contains("entries declared"));
    }
}
