//! A snapshot directory made up from [`super::page_content`], for running the restore
//! page service against the synthetic destination: one RAM block `m`, every page data,
//! and a package with nothing but LISTEN, PING(3) and RUN.

use std::path::Path;

use super::{PAGE, page_content};
use crate::snapshot::SnapshotError;
use crate::snapshot::meta::{
    FORMAT_VERSION, FileDigest, OPENING_FILE, PACKAGE_FILE, SnapshotMeta, SourceInfo, StreamFacts,
};
use crate::snapshot::store::StoreWriter;
use crate::wire::Command;
use crate::wire::compose::put_opening;

/// Section id the synthetic stream gives `ram`.
const RAM_SECTION: u32 = 2;

/// Writes a snapshot of `pages` pages of block `m` (content from `seed`) into `dir`.
pub fn write(dir: &Path, pages: usize, seed: u64) -> Result<SnapshotMeta, SnapshotError> {
    let length = (pages * PAGE) as u64;
    let mut opening = Vec::new();
    put_opening(&mut opening, b"synthetic", RAM_SECTION, &[(b"m", length)]);
    let mut package = Vec::new();
    Command::PostcopyListen.encode(&mut package);
    Command::Ping(3).encode(&mut package);
    Command::PostcopyRun.encode(&mut package);
    let mut store = StoreWriter::create(dir, &[("m".into(), length)], PAGE as u64)?;
    let mut page = vec![0u8; PAGE];
    for p in 0..pages {
        page_content(p, seed, &mut page);
        store.put_page(0, (p * PAGE) as u64, &page)?;
    }
    let (blocks, index, pages_len) = store.finish()?;
    for (name, bytes) in [(OPENING_FILE, &opening), (PACKAGE_FILE, &package)] {
        let path = dir.join(name);
        std::fs::write(&path, bytes).map_err(|e| SnapshotError::io("writing", &path, e))?;
    }
    let mut meta = SnapshotMeta {
        format: FORMAT_VERSION,
        created_unix: 0,
        source: SourceInfo {
            qemu_version: "synthetic".into(),
            machine: String::new(),
        },
        stream: StreamFacts {
            ram_section_id: RAM_SECTION,
            section_footers: true,
            switchover_start: false,
            target_page_size: PAGE as u64,
        },
        blocks,
        opening: FileDigest::of(&opening),
        package: FileDigest::of(&package),
        index,
        pages_len,
        checksum: String::new(),
    };
    meta.save(dir)?;
    Ok(meta)
}
