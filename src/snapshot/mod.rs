//! Snapshots for lazy restore: the sidecar plays the *destination* of a precopy (or
//! background-snapshot) migration of a running source, never postcopy, so that a failure
//! leaves the VM running, and keeps what a later postcopy restore must replay
//! (protocol-spec/snapshot.md):
//! - [`meta`]: `meta.json`, the stream facts and file checksums;
//! - [`store`]: the page store, O(1) by (block, offset), zero pages not stored;
//! - [`sink`]: turns the decoded stream into a snapshot and answers the source's PINGs;
//! - [`take`]: `postcopy-sidecar snapshot`, the I/O around the sink.

pub mod meta;
pub mod sink;
pub mod store;
pub mod take;

use std::path::{Path, PathBuf};

pub use meta::SnapshotMeta;
pub use store::PageStore;

use crate::qmp::QmpError;
use crate::wire::DecodeError;

/// Why a snapshot could not be taken or used. Every variant names the file, block or
/// offset at fault.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `meta.json` is unreadable or inconsistent.
    #[error("snapshot metadata {path}: {reason}")]
    BadMeta {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A field of `meta.json` is out of bounds or inconsistent with another.
    #[error("snapshot metadata {path}: field {field}: {reason}")]
    BadField {
        /// The file.
        path: PathBuf,
        /// The field, as a JSON path (`blocks[2].length`).
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// `meta.json` differs from its own checksum: damaged or edited by hand.
    #[error("snapshot metadata {path} fails its checksum ({found}, recorded {expected})")]
    MetaChecksum {
        /// The file.
        path: PathBuf,
        /// Recorded checksum.
        expected: String,
        /// Checksum of the content found.
        found: String,
    },
    /// A file is larger than a reader holds in memory.
    #[error("snapshot file {path} is larger than {limit} bytes")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The limit.
        limit: u64,
    },
    /// A page outside the store was asked for (a caller's bug, reported, not a panic).
    #[error("page {page} of block #{block} is outside the snapshot")]
    PageOutOfRange {
        /// Block index.
        block: usize,
        /// Page number in the block.
        page: u64,
    },
    /// A file is shorter or longer than the metadata says.
    #[error(
        "snapshot file {file} is truncated or altered: {found} bytes where {expected} were recorded"
    )]
    Truncated {
        /// File name.
        file: &'static str,
        /// Length recorded.
        expected: u64,
        /// Length found.
        found: u64,
    },
    /// A file's checksum differs from the recorded one.
    #[error("snapshot file {file} fails its checksum (xxh3 {found}, recorded {expected})")]
    FileChecksum {
        /// File name.
        file: &'static str,
        /// Recorded digest.
        expected: String,
        /// Digest found.
        found: String,
    },
    /// A stored page differs from its recorded checksum.
    #[error(
        "page at offset {offset:#x} of RAM block {block} fails its checksum; the snapshot is damaged"
    )]
    PageChecksum {
        /// Block idstr.
        block: String,
        /// Byte offset in the block.
        offset: u64,
    },
    /// The source's stream ended without every page of a block.
    #[error(
        "the stream ended without {missing} page(s) of RAM block {block}, first at offset {offset:#x}"
    )]
    Incomplete {
        /// Block idstr.
        block: String,
        /// First missing page.
        offset: u64,
        /// Pages missing in the block.
        missing: u64,
    },
    /// The stream holds something a snapshot cannot keep.
    #[error("cannot snapshot this migration: {0}")]
    Unsupported(String),
    /// The source's bytes failed to decode.
    #[error("source stream: {0}")]
    Decode(#[from] DecodeError),
    /// QMP failed.
    #[error("QMP: {0}")]
    Qmp(#[from] QmpError),
    /// The source's migration did not complete.
    #[error("the source's migration ended as {status}{detail}")]
    SourceFailed {
        /// Final status.
        status: String,
        /// QEMU's error description, prefixed.
        detail: String,
    },
    /// A socket operation failed.
    #[error("{what}: {source}")]
    Net {
        /// What was being done.
        what: String,
        /// Why.
        source: std::io::Error,
    },
}

impl SnapshotError {
    /// An I/O error on `path`.
    pub fn io(what: &'static str, path: &Path, source: std::io::Error) -> SnapshotError {
        SnapshotError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    }
}
