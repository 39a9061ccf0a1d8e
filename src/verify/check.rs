//! Comparing the destination's guest RAM with the digests of what the stream delivered
//! (protocol-spec/guarded-access.md#guard-verify).

use serde::Serialize;
use xxhash_rust::xxh3::xxh3_64;

use super::digests::{Expected, PageDigests};
use crate::guard::RamFile;
use crate::guard::probe;

/// How many mismatches a report lists by place (all are counted).
pub const LISTED_MISMATCHES: usize = 64;

/// One page that does not hold what the stream delivered.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Mismatch {
    /// Block idstr.
    pub block: String,
    /// Byte offset in the block.
    pub offset: u64,
    /// The delivered page's xxh3 (hex), or `zero page` when no record arrived after the
    /// page's last discard.
    pub expected: String,
    /// xxh3 of what the destination holds (hex).
    pub found: String,
    /// Whether the destination had asked for the page (a vCPU was waiting for it, so a
    /// running guest may have written it at once). Only meaningful at placement.
    pub requested: bool,
}

/// The outcome of a verification.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct VerifyReport {
    /// `exact` (the guest could not write: the whole RAM compared after the migration) or
    /// `at-placement` (each postcopy page read right after QEMU placed it, guest running).
    pub mode: String,
    /// Blocks compared.
    pub blocks: Vec<String>,
    /// Blocks that could not be read from outside, with the reason.
    pub skipped: Vec<(String, String)>,
    /// Pages compared.
    pub pages: u64,
    /// Pages that differ.
    pub mismatches: u64,
    /// The first [`LISTED_MISMATCHES`] of them.
    pub listed: Vec<Mismatch>,
}

impl VerifyReport {
    /// Counts a mismatch and lists it if there is room.
    pub fn mismatch(&mut self, m: Mismatch) {
        self.mismatches += 1;
        if self.listed.len() < LISTED_MISMATCHES {
            self.listed.push(m);
        }
    }

    /// One line per listed mismatch, for people.
    pub fn lines(&self) -> Vec<String> {
        let mut v = vec![format!(
            "verify ({}): {} pages of {} compared, {} mismatching",
            self.mode,
            self.pages,
            self.blocks.join(", "),
            self.mismatches
        )];
        for (b, why) in &self.skipped {
            v.push(format!("  not checked: block {b}: {why}"));
        }
        for m in &self.listed {
            v.push(format!(
                "  mismatch: block {} offset {:#x}: expected {}, found {}{}",
                m.block,
                m.offset,
                m.expected,
                m.found,
                if m.requested {
                    " (requested by the destination)"
                } else {
                    ""
                }
            ));
        }
        v
    }
}

/// Why verification could not run.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// Reading the destination's memory failed.
    #[error("reading page {offset:#x} of block {block}: {source}")]
    Read {
        /// Block.
        block: String,
        /// Offset.
        offset: u64,
        /// Why.
        source: std::io::Error,
    },
    /// The destination's blocks do not match the digests.
    #[error("the destination's RAM does not match the digests: {0}")]
    Layout(String),
}

/// Expected digest as text.
pub fn describe(e: Expected) -> String {
    match e {
        Expected::Nothing => "zero page".into(),
        Expected::Digest(h) => format!("{h:016x}"),
    }
}

/// Whether `page` (its bytes) matches `expected`.
pub fn matches(page: &[u8], expected: Expected) -> (bool, u64) {
    let h = xxh3_64(page);
    let ok = match expected {
        Expected::Nothing => page.iter().all(|&b| b == 0),
        Expected::Digest(d) => d == h,
    };
    (ok, h)
}

/// Compares every page of every memfd block with `digests`, reading with `pread` (valid
/// only once the migration is over: a hole is then a zero page). Blocks named in the
/// digests without a memfd are listed as skipped.
pub fn check_files(files: &[RamFile], digests: &PageDigests) -> Result<VerifyReport, VerifyError> {
    let available: Vec<(String, u64)> = files.iter().map(|f| (f.block.clone(), f.length)).collect();
    check_with(digests, &available, |block, offset, buf| {
        let f = files
            .iter()
            .find(|f| f.block == block)
            .expect("an available block");
        probe::read_at(&f.file, offset, buf)
    })
}

/// Compares every page of the `available` blocks (name, length) with `digests`, reading
/// each page with `read(block, offset, buf)`.
pub fn check_with(
    digests: &PageDigests,
    available: &[(String, u64)],
    mut read: impl FnMut(&str, u64, &mut [u8]) -> std::io::Result<()>,
) -> Result<VerifyReport, VerifyError> {
    let ps = digests.page_size();
    let mut report = VerifyReport {
        mode: "exact".into(),
        ..Default::default()
    };
    let mut buf = vec![0u8; ps as usize];
    for (bi, b) in digests.blocks().iter().enumerate() {
        let Some((_, length)) = available.iter().find(|(n, _)| *n == b.name) else {
            report.skipped.push((
                b.name.clone(),
                "not in a memfd (QEMU's private memory)".into(),
            ));
            continue;
        };
        if *length != b.length {
            return Err(VerifyError::Layout(format!(
                "block {} is {} bytes on the destination, {} in the digests",
                b.name, length, b.length
            )));
        }
        report.blocks.push(b.name.clone());
        for page in 0..b.length / ps {
            let offset = page * ps;
            read(&b.name, offset, &mut buf).map_err(|source| VerifyError::Read {
                block: b.name.clone(),
                offset,
                source,
            })?;
            report.pages += 1;
            let expected = digests.expected(bi, page);
            let (ok, found) = matches(&buf, expected);
            if !ok {
                report.mismatch(Mismatch {
                    block: b.name.clone(),
                    offset,
                    expected: describe(expected),
                    found: format!("{found:016x}"),
                    requested: false,
                });
            }
        }
    }
    Ok(report)
}
