//! Fuzzes reading a snapshot directory, which is untrusted: the input becomes `meta.json`
//! and the data files in a scratch directory, then `Snapshot::open` runs (with and without
//! verifying every page) and, when it accepts the directory, every page is read. Nothing
//! may panic, overflow or exhaust memory: every refusal is a typed `SnapshotError`.
//!
//! Input: a mode byte, then length-prefixed parts. In raw mode (odd byte) the first part is
//! `meta.json` verbatim; otherwise the metadata is built from the input's numbers and saved
//! with a correct checksum, so the bounds behind the checksum are reached too.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use postcopy_sidecar::restore::Snapshot;
use postcopy_sidecar::snapshot::meta::{
    BlockMeta, FORMAT_VERSION, FileDigest, INDEX_FILE, META_FILE, OPENING_FILE, PACKAGE_FILE,
    PAGES_FILE, SnapshotMeta, SourceInfo, StreamFacts,
};

/// Reads the input front to back; zeroes once it is exhausted.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn u8(&mut self) -> u8 {
        let (b, rest) = self.0.split_first().map_or((0, &[][..]), |(b, r)| (*b, r));
        self.0 = rest;
        b
    }

    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(std::array::from_fn(|_| self.u8()))
    }

    /// A part of up to 255 (or, with a second length byte, 65535) bytes.
    fn part(&mut self) -> &'a [u8] {
        let n = usize::from(self.u8()) | usize::from(self.u8()) << 8;
        let n = n.min(self.0.len());
        let (p, rest) = self.0.split_at(n);
        self.0 = rest;
        p
    }

    /// A length: small multiples of `unit` mostly, any u64 sometimes.
    fn length(&mut self, unit: u64) -> u64 {
        match self.u8() % 4 {
            0 => self.u64(),
            _ => u64::from(self.u8()).wrapping_mul(unit),
        }
    }
}

fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("snapshot_open.{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("scratch directory");
        d
    })
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::write(dir.join(name), bytes).expect("scratch write");
}

fuzz_target!(|data: &[u8]| {
    let dir = scratch();
    for name in [META_FILE, OPENING_FILE, PACKAGE_FILE, INDEX_FILE, PAGES_FILE] {
        let _ = std::fs::remove_file(dir.join(name));
    }
    let mut input = Input(data);
    let mode = input.u8();
    let opening = input.part();
    let package = input.part();
    let index = input.part();
    let pages = input.part();
    write(dir, OPENING_FILE, opening);
    write(dir, PACKAGE_FILE, package);
    write(dir, INDEX_FILE, index);
    write(dir, PAGES_FILE, pages);
    if mode & 1 == 1 {
        write(dir, META_FILE, input.part());
    } else {
        let tps = 1u64 << (input.u8() % 40);
        let nblocks = usize::from(input.u8() % 4);
        let mut blocks = Vec::new();
        let mut at = 0u64;
        for i in 0..nblocks {
            let length = input.length(tps);
            let store_offset = match input.u8() % 3 {
                0 => input.u64(),
                _ => at,
            };
            at = store_offset.wrapping_add(length);
            let name = if input.u8() % 8 == 0 {
                String::from_utf8_lossy(input.part()).into_owned()
            } else {
                format!("b{i}")
            };
            blocks.push(BlockMeta {
                name,
                length,
                store_offset,
                data_pages: u64::from(input.u8()),
            });
        }
        let flags = input.u8();
        let digest = |bytes: &[u8], lie: bool, with: u64| {
            let mut d = FileDigest::of(bytes);
            if lie {
                d.len = with;
            }
            d
        };
        let lie = input.u64();
        let pages_len = if flags & 8 != 0 { input.u64() } else { pages.len() as u64 };
        if flags & 16 != 0 && pages_len <= 1 << 32 {
            // A sparse pages file of the claimed length: reads reach past the input.
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join(PAGES_FILE))
                .expect("pages file");
            let _ = f.set_len(pages_len);
        }
        let mut meta = SnapshotMeta {
            format: if flags & 32 != 0 { u32::from(input.u8()) } else { FORMAT_VERSION },
            created_unix: 0,
            source: SourceInfo::default(),
            stream: StreamFacts {
                ram_section_id: 2,
                section_footers: true,
                switchover_start: false,
                target_page_size: tps,
            },
            blocks,
            opening: digest(opening, flags & 1 != 0, lie),
            package: digest(package, flags & 2 != 0, lie),
            index: digest(index, flags & 4 != 0, lie),
            pages_len,
            checksum: String::new(),
        };
        meta.save(dir).expect("scratch meta");
        if flags & 64 != 0 {
            // A damaged byte after the checksum was computed.
            let path = dir.join(META_FILE);
            let mut text = std::fs::read(&path).expect("meta");
            let at = usize::from(input.u8()) % text.len();
            text[at] ^= input.u8() | 1;
            write(dir, META_FILE, &text);
        }
    }
    for verify in [false, true] {
        let Ok(snapshot) = Snapshot::open(dir, verify) else {
            continue;
        };
        let store = &snapshot.store;
        let _ = snapshot.prologue();
        // Pages of up to 1 MiB are read one by one (a 1 GiB page would only test malloc).
        if store.page_size() > 1 << 20 {
            continue;
        }
        let mut buf = vec![0u8; store.page_size() as usize];
        let mut reads = 0;
        for b in 0..store.blocks().len() {
            for p in 0..store.block_pages(b).min(64) {
                let _ = store.read(b, p, &mut buf);
                reads += 1;
            }
            let _ = store.read(b, store.block_pages(b), &mut buf);
        }
        assert!(reads <= 4 * 64);
        let _ = store.read(store.blocks().len(), 0, &mut buf);
    }
});
