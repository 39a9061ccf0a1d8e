//! Digests of the pages a migration stream delivered: for every target page of every RAM
//! block, the xxh3-64 of the last PAGE or ZERO record forwarded for it after its last
//! discard. What the destination's RAM must hold once the migration is over and the guest
//! has not run (protocol-spec/guarded-access.md#guard-verify).
//!
//! File layout (`receive --digests FILE`, read by `verify`): one JSON line (format, page
//! size, blocks with name and length), then per block one state byte per page (0 = no
//! record, 1 = delivered) followed by one little-endian u64 digest per page.

use std::io::{BufRead, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

/// Format version of the digest file.
pub const FORMAT: u32 = 1;

/// Why a digest file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum DigestFileError {
    /// I/O on the file.
    #[error("digest file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Not a digest file of this format.
    #[error("digest file {path}: {reason}")]
    Bad {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// One block's digests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDigests {
    /// Block idstr.
    pub name: String,
    /// Used length in bytes.
    pub length: u64,
    delivered: Vec<bool>,
    hash: Vec<u64>,
}

/// What is known about one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    /// No record reached the destination after the page's last discard: after ADVISE
    /// discarded all RAM it must read as zeroes.
    Nothing,
    /// The last record delivered had this digest.
    Digest(u64),
}

/// Digests of a whole migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageDigests {
    page_size: u64,
    zero: u64,
    blocks: Vec<BlockDigests>,
}

#[derive(Serialize, Deserialize)]
struct Header {
    format: u32,
    page_size: u64,
    blocks: Vec<(String, u64)>,
}

impl PageDigests {
    /// Empty digests for `blocks` (name, used length) in stream order.
    pub fn new(blocks: &[(String, u64)], page_size: u64) -> PageDigests {
        PageDigests {
            page_size,
            zero: xxh3_64(&vec![0u8; page_size as usize]),
            blocks: blocks
                .iter()
                .map(|(name, length)| {
                    let pages = length.div_ceil(page_size) as usize;
                    BlockDigests {
                        name: name.clone(),
                        length: *length,
                        delivered: vec![false; pages],
                        hash: vec![0; pages],
                    }
                })
                .collect(),
        }
    }

    /// Target page size.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// The digest of a zero page.
    pub fn zero_digest(&self) -> u64 {
        self.zero
    }

    /// Blocks in stream order.
    pub fn blocks(&self) -> &[BlockDigests] {
        &self.blocks
    }

    /// Index of the block named `name`.
    pub fn block_index(&self, name: &str) -> Option<usize> {
        self.blocks.iter().position(|b| b.name == name)
    }

    fn slot(&mut self, block: usize, offset: u64) -> Option<usize> {
        let ps = self.page_size;
        let b = self.blocks.get(block)?;
        let i = (offset / ps) as usize;
        (i < b.delivered.len()).then_some(i)
    }

    /// A PAGE record for (`block`, `offset`) was forwarded: returns its digest.
    pub fn page(&mut self, block: usize, offset: u64, data: &[u8]) -> Option<u64> {
        let h = xxh3_64(data);
        let i = self.slot(block, offset)?;
        let b = &mut self.blocks[block];
        b.delivered[i] = true;
        b.hash[i] = h;
        Some(h)
    }

    /// A record whose digest the caller already computed was forwarded.
    pub fn record(&mut self, block: usize, offset: u64, digest: u64) {
        if let Some(i) = self.slot(block, offset) {
            let b = &mut self.blocks[block];
            b.delivered[i] = true;
            b.hash[i] = digest;
        }
    }

    /// A ZERO record was forwarded.
    pub fn zero(&mut self, block: usize, offset: u64) -> Option<u64> {
        let z = self.zero;
        let i = self.slot(block, offset)?;
        let b = &mut self.blocks[block];
        b.delivered[i] = true;
        b.hash[i] = z;
        Some(z)
    }

    /// The destination drops these bytes (POSTCOPY_RAM_DISCARD); a record must follow.
    pub fn discard(&mut self, block: usize, start: u64, len: u64) {
        let ps = self.page_size;
        if let Some(b) = self.blocks.get_mut(block) {
            let first = (start / ps) as usize;
            let last = ((start + len).div_ceil(ps) as usize).min(b.delivered.len());
            for i in first..last {
                b.delivered[i] = false;
            }
        }
    }

    /// What page `page` of `block` must hold.
    pub fn expected(&self, block: usize, page: u64) -> Expected {
        let b = &self.blocks[block];
        let i = page as usize;
        if b.delivered[i] {
            Expected::Digest(b.hash[i])
        } else {
            Expected::Nothing
        }
    }

    /// Writes the digest file.
    pub fn save(&self, path: &Path) -> Result<(), DigestFileError> {
        let io = |source| DigestFileError::Io {
            path: path.display().to_string(),
            source,
        };
        let header = Header {
            format: FORMAT,
            page_size: self.page_size,
            blocks: self
                .blocks
                .iter()
                .map(|b| (b.name.clone(), b.length))
                .collect(),
        };
        // Whole or absent, like every file the sidecar leaves (crate::durable).
        let (tmp, f) = crate::durable::create_temporary(path).map_err(io)?;
        let mut w = std::io::BufWriter::new(f);
        serde_json::to_writer(&mut w, &header).map_err(|e| io(e.into()))?;
        w.write_all(b"\n").map_err(io)?;
        for b in &self.blocks {
            let states: Vec<u8> = b.delivered.iter().map(|&d| u8::from(d)).collect();
            w.write_all(&states).map_err(io)?;
            for h in &b.hash {
                w.write_all(&h.to_le_bytes()).map_err(io)?;
            }
        }
        let f = match w.into_inner() {
            Ok(f) => f,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(io(e.into_error()));
            }
        };
        crate::durable::commit_temporary(&tmp, f, path).map_err(io)
    }

    /// Reads a digest file written by [`PageDigests::save`].
    pub fn load(path: &Path) -> Result<PageDigests, DigestFileError> {
        let name = path.display().to_string();
        let io = |source| DigestFileError::Io {
            path: name.clone(),
            source,
        };
        let bad = |reason: String| DigestFileError::Bad {
            path: name.clone(),
            reason,
        };
        let f = std::fs::File::open(path).map_err(io)?;
        let mut r = std::io::BufReader::new(f);
        let mut line = String::new();
        r.read_line(&mut line).map_err(io)?;
        let header: Header =
            serde_json::from_str(&line).map_err(|e| bad(format!("header: {e}")))?;
        if header.format != FORMAT {
            return Err(bad(format!(
                "format {} (this sidecar reads {FORMAT})",
                header.format
            )));
        }
        if header.page_size == 0 || !header.page_size.is_power_of_two() {
            return Err(bad(format!("page size {}", header.page_size)));
        }
        let mut d = PageDigests::new(&header.blocks, header.page_size);
        for b in &mut d.blocks {
            let n = b.delivered.len();
            let mut states = vec![0u8; n];
            std::io::Read::read_exact(&mut r, &mut states)
                .map_err(|_| bad(format!("truncated in block {}", b.name)))?;
            let mut raw = vec![0u8; n * 8];
            std::io::Read::read_exact(&mut r, &mut raw)
                .map_err(|_| bad(format!("truncated in block {}", b.name)))?;
            for (i, s) in states.iter().enumerate() {
                b.delivered[i] = match s {
                    0 => false,
                    1 => true,
                    other => return Err(bad(format!("page state {other} in block {}", b.name))),
                };
                b.hash[i] = u64::from_le_bytes(raw[i * 8..i * 8 + 8].try_into().expect("8"));
            }
        }
        let mut rest = Vec::new();
        std::io::Read::read_to_end(&mut r, &mut rest).map_err(io)?;
        if !rest.is_empty() {
            return Err(bad(format!("{} bytes after the last block", rest.len())));
        }
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_record_wins_discards_forget_and_the_file_round_trips() {
        let mut d = PageDigests::new(&[("m".into(), 4 * 4096), ("rom".into(), 4096)], 4096);
        let a = d.page(0, 0, &[1u8; 4096]).unwrap();
        d.page(0, 4096, &[2u8; 4096]).unwrap();
        let b = d.page(0, 4096, &[3u8; 4096]).unwrap();
        d.zero(0, 2 * 4096).unwrap();
        d.discard(0, 2 * 4096, 4096);
        d.page(1, 0, &[9u8; 4096]).unwrap();
        assert_eq!(d.expected(0, 0), Expected::Digest(a));
        assert_eq!(d.expected(0, 1), Expected::Digest(b));
        assert_eq!(d.expected(0, 2), Expected::Nothing);
        assert_eq!(d.expected(0, 3), Expected::Nothing);
        assert_eq!(d.page(0, 4 * 4096, &[0u8; 4096]), None, "outside the block");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d");
        d.save(&p).unwrap();
        assert_eq!(PageDigests::load(&p).unwrap(), d);
        let mut raw = std::fs::read(&p).unwrap();
        raw.pop();
        std::fs::write(&p, &raw).unwrap();
        assert!(matches!(
            PageDigests::load(&p),
            Err(DigestFileError::Bad { .. })
        ));
    }
}
