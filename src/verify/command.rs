//! `postcopy-sidecar verify`: compares a destination QEMU's guest RAM, after its incoming
//! migration completed, with the digests `receive --digests` recorded. Exact while the VM is
//! paused (`-S`, or `stop`); a running guest changes its memory, so that needs
//! `--allow-running` and is reported as not exact.

use std::path::PathBuf;

use super::check::{VerifyError, VerifyReport, check_files};
use super::digests::{DigestFileError, PageDigests};
use crate::guard::DiscoverError;
use crate::guard::discover;
use crate::qmp::{PeerPolicy, Qmp, QmpError};

/// Options of `verify`.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// The destination QEMU's QMP socket.
    pub qmp: PathBuf,
    /// The uid QEMU runs as: only a process of that uid may answer on [`Self::qmp`]
    /// (`SO_PEERCRED`). `None`: the owner of the socket's directory, or our own uid.
    pub qmp_uid: Option<u32>,
    /// The digest file from `receive --digests`.
    pub digests: PathBuf,
    /// Compare even though the guest runs (then mismatches may be the guest's own writes).
    pub allow_running: bool,
}

/// Why `verify` could not compare.
#[derive(Debug, thiserror::Error)]
pub enum VerifyCommandError {
    /// The digest file.
    #[error("{0}")]
    Digests(#[from] DigestFileError),
    /// QMP.
    #[error("destination QMP: {0}")]
    Qmp(#[from] QmpError),
    /// Finding the memfds.
    #[error("{0}")]
    Discover(#[from] DiscoverError),
    /// The incoming migration is not over.
    #[error(
        "the destination's migration is '{0}', not completed: pages may still be missing; use `receive --verify`, which checks each page as it is placed"
    )]
    NotCompleted(String),
    /// The guest runs.
    #[error(
        "the destination VM is running and can change its memory, so a comparison is not exact: pause it (QMP `stop`, or start it with -S) or pass --allow-running"
    )]
    GuestRunning,
    /// Comparing failed.
    #[error("{0}")]
    Verify(#[from] VerifyError),
}

/// Runs the comparison.
pub async fn verify(opts: &VerifyOptions) -> Result<VerifyReport, VerifyCommandError> {
    let digests = PageDigests::load(&opts.digests)?;
    let qmp = Qmp::connect_checked(&opts.qmp, PeerPolicy::from_uid(opts.qmp_uid)).await?;
    let status = qmp.migrate_status().await?;
    if status != "completed" {
        return Err(VerifyCommandError::NotCompleted(status.to_string()));
    }
    let running = qmp.is_running().await?;
    if running && !opts.allow_running {
        return Err(VerifyCommandError::GuestRunning);
    }
    let pid = discover::qemu_pid(&opts.qmp, qmp.peer_pid())?;
    let files = discover::ram_files(pid, &qmp.ram_blocks().await?, &qmp.memory_backends().await?)?;
    let mut report = check_files(&files, &digests)?;
    if running {
        report.mode = "running guest, not exact".into();
    }
    Ok(report)
}
