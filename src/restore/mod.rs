//! `postcopy-sidecar restore`: the sidecar plays the migration *source* for a fresh
//! destination QEMU (`-incoming defer`) and restores a snapshot lazily
//! (protocol-spec/snapshot.md#snapshot-restore-stream). It replays the opening, discards
//! all RAM, sends the device-state package so the VM runs at once, then serves page
//! requests from the page store ahead of a background sweep, and ends the stream.
//! Several destinations (clones) can be restored from one snapshot at once; they share
//! the page store read-only.

pub mod progress;
pub mod serve;
pub mod stream;
pub mod working_set;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::net::UnixStream;

use crate::figures::LatencyFigures;
use crate::qmp::{PeerPolicy, Qmp, QmpError};
use crate::snapshot::meta::{OPENING_FILE, PACKAGE_FILE, SnapshotMeta, read_checked};
use crate::snapshot::{PageStore, SnapshotError};
use crate::wire::compose::{put_discards, put_package};
use crate::wire::{Command, DecodeError};
use progress::ProgressWatch;
use serve::{ServeError, ServeFigures};
use stream::ServeKnobs;
use working_set::WorkingSet;

/// A snapshot opened and checked for restoring: metadata, opening and package verified
/// against their checksums, the page store's index verified and its length checked.
/// Cloning shares the page store; the page service's thread gets a clone.
#[derive(Clone)]
pub struct Snapshot {
    /// Where it lives.
    pub dir: PathBuf,
    /// `meta.json`.
    pub meta: SnapshotMeta,
    /// The page store, shared by every restore of this snapshot.
    pub store: Arc<PageStore>,
    /// The pages an earlier restore's guest needed first, in order (none yet, or a file
    /// that failed its checks: then it is ignored with a warning and recorded anew only if
    /// removed).
    pub working_set: Option<WorkingSet>,
    opening: Vec<u8>,
    package: Vec<u8>,
}

impl Snapshot {
    /// Opens `dir`. With `verify_pages`, every stored page is also read and checked now,
    /// so a damaged page is refused before any byte is sent (costs one read of the store);
    /// without it, each page is checked as it is read for sending.
    pub fn open(dir: &Path, verify_pages: bool) -> Result<Snapshot, SnapshotError> {
        let meta = SnapshotMeta::load(dir)?;
        let opening = read_checked(dir, OPENING_FILE, &meta.opening)?;
        let package = read_checked(dir, PACKAGE_FILE, &meta.package)?;
        let store = PageStore::open(dir, &meta)?;
        if verify_pages {
            store.verify_all()?;
        }
        let working_set = WorkingSet::load(dir, &store).unwrap_or_else(|e| {
            tracing::warn!("{e}: restoring without it");
            None
        });
        Ok(Snapshot {
            dir: dir.to_path_buf(),
            meta,
            store: Arc::new(store),
            working_set,
            opening,
            package,
        })
    }

    /// Everything sent before the first page: the opening, SWITCHOVER_START when the source
    /// sent it, a discard of every block, PING 2, the package, PING 4.
    pub fn prologue(&self) -> Vec<u8> {
        let mut out = self.opening.clone();
        if self.meta.stream.switchover_start {
            Command::SwitchoverStart.encode(&mut out);
        }
        for b in &self.meta.blocks {
            put_discards(&mut out, b.name.as_bytes(), &[(0, b.length)]);
        }
        Command::Ping(2).encode(&mut out);
        put_package(&mut out, &self.package);
        Command::Ping(4).encode(&mut out);
        out
    }
}

/// Options of one restore.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// The destination QEMU's QMP socket (QEMU started with `-incoming defer` and the
    /// snapshot's machine and RAM configuration).
    pub qmp: PathBuf,
    /// The uid QEMU runs as: only a process of that uid may answer on [`Self::qmp`]
    /// (`SO_PEERCRED`). `None`: the owner of the socket's directory, or our own uid.
    pub qmp_uid: Option<u32>,
    /// Write the JSON report here.
    pub report: Option<PathBuf>,
    /// Give up after this long.
    pub timeout: Duration,
    /// Watch the guest's console for its first progress line (reported as
    /// `first_progress_ms`).
    pub progress: Option<ProgressWatch>,
    /// Use the snapshot's working set (stream it first), or record one if it has none
    /// (protocol-spec/snapshot.md#snapshot-working-set).
    pub working_set: bool,
    /// Most bytes per second the background sweep sends ([`ServeKnobs::sweep_rate`]):
    /// requested pages and the working set are never held back. `None`: no limit.
    pub sweep_rate: Option<u64>,
}

/// How long the report waits, after the migration completed, for a first progress line
/// that has not appeared yet (a guest that prints nothing must not hold the restore).
pub const PROGRESS_GRACE: Duration = Duration::from_secs(30);

/// Why a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The snapshot is unusable.
    #[error("snapshot: {0}")]
    Snapshot(#[from] SnapshotError),
    /// QMP failed.
    #[error("destination QMP: {0}")]
    Qmp(#[from] QmpError),
    /// The destination is not configured like the snapshot's source.
    #[error("the destination does not match the snapshot: {0}")]
    Mismatch(String),
    /// A socket failed.
    #[error("{what}: {source}")]
    Net {
        /// What was being done.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// The destination's return path could not be decoded.
    #[error("destination return path: {0}")]
    Decode(#[from] DecodeError),
    /// Serving a page failed.
    #[error("serving pages: {0}")]
    Serve(#[from] ServeError),
    /// The destination reported failure.
    #[error("the destination's migration ended as {0}")]
    DestinationFailed(String),
}

/// Milestones in ms since the restore started (before it attached to the destination).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct RestoreTimeline {
    /// Connected to the destination's incoming socket (attach, checks and capabilities
    /// done).
    pub connected_ms: Option<u64>,
    /// Prologue (opening, discards, package) written.
    pub package_sent_ms: Option<u64>,
    /// PONG 3: the destination loaded the device state.
    pub device_state_loaded_ms: Option<u64>,
    /// QMP `RESUME` (QEMU's own timestamp): the VM runs.
    pub running_ms: Option<u64>,
    /// The guest's first progress line on its console (with a progress watch).
    pub first_progress_ms: Option<u64>,
    /// Last data page written.
    pub all_sent_ms: Option<u64>,
    /// Migration `completed` on the destination: all RAM present.
    pub completed_ms: Option<u64>,
}

/// The report of one restore.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct RestoreReport {
    /// "completed" or "failed".
    pub outcome: String,
    /// Why it failed.
    pub error: Option<String>,
    /// Destination QMP socket.
    pub destination: PathBuf,
    /// Destination's final migration status.
    pub migration_status: String,
    /// Destination's own vCPU blocktime, ms.
    pub postcopy_blocktime_ms: Option<u64>,
    /// Milestones.
    pub timeline: RestoreTimeline,
    /// Page requests received from the destination.
    pub requests: u64,
    /// What was sent.
    pub served: ServeFigures,
    /// Request → page written to the destination's socket, for requests that sent a page.
    pub latency: LatencyFigures,
    /// Bytes written to the destination.
    pub bytes_sent: u64,
    /// Pages of the snapshot's recorded working set this restore streamed first (`None`:
    /// it had none, or it was not used).
    pub working_set_replayed: Option<u64>,
    /// Pages this restore recorded as the snapshot's working set (the first restore).
    pub working_set_recorded: Option<u64>,
}

/// Send buffer towards the destination: small, so a requested page never waits behind
/// much background data (the head-of-line blocking of postcopy-latency-measured.md).
pub const RESTORE_SNDBUF: usize = 64 * 1024;
/// Data pages per background section (one section is written at a time).
pub const BACKGROUND_BATCH: usize = 16;

/// While a restore records the snapshot's working set, the background sweep waits until
/// the guest has asked for nothing for this long: a page the sweep brings before the
/// guest touches it is never asked for, so it would be missing from the record and fault
/// in every later restore.
pub const RECORD_QUIET: Duration = Duration::from_millis(300);
/// ... but no longer than this after the device state went out: the recording restore
/// pays for the record with this much of a late sweep at most.
pub const RECORD_HOLD: Duration = Duration::from_secs(5);

/// Restores `snapshot` into the destination behind `opts.qmp`.
pub async fn restore(snapshot: &Snapshot, opts: &RestoreOptions) -> RestoreReport {
    let begun = Instant::now();
    let mut report = RestoreReport {
        destination: opts.qmp.clone(),
        ..Default::default()
    };
    let result = run(snapshot, opts, begun, &mut report).await;
    match result {
        Ok(()) => report.outcome = "completed".into(),
        Err(e) => {
            report.outcome = "failed".into();
            report.error = Some(e.to_string());
        }
    }
    if let Some(p) = &opts.report {
        let json = serde_json::to_vec_pretty(&report).expect("report serialises");
        if let Err(e) = crate::durable::write_atomically(p, &json) {
            tracing::warn!(path = %p.display(), error = %e, "could not write the report");
        }
    }
    report
}

/// Checks the destination's machine type and RAM blocks against the snapshot; returns
/// each snapshot block's host page in target pages (512 for a 2 MiB hugepage block).
pub async fn check_destination(qmp: &Qmp, meta: &SnapshotMeta) -> Result<Vec<u64>, RestoreError> {
    let machine = qmp.machine_type().await?;
    if !meta.source.machine.is_empty() && machine != meta.source.machine {
        return Err(RestoreError::Mismatch(format!(
            "machine type is {machine}, the snapshot's is {}",
            meta.source.machine
        )));
    }
    let blocks = qmp.ram_blocks().await?;
    for b in &meta.blocks {
        match blocks.iter().find(|d| d.name == b.name) {
            None => {
                return Err(RestoreError::Mismatch(format!(
                    "RAM block {} ({} bytes) is missing on the destination",
                    b.name, b.length
                )));
            }
            Some(d) if d.used != b.length => {
                return Err(RestoreError::Mismatch(format!(
                    "RAM block {} is {} bytes on the destination, {} in the snapshot",
                    b.name, d.used, b.length
                )));
            }
            Some(_) => {}
        }
    }
    let tps = meta.stream.target_page_size.max(1);
    let host = meta
        .blocks
        .iter()
        .map(|b| {
            blocks
                .iter()
                .find(|d| d.name == b.name)
                .map_or(1, |d| (d.page_size / tps).max(1))
        })
        .collect();
    if let Some(extra) = blocks
        .iter()
        .find(|d| !meta.blocks.iter().any(|b| b.name == d.name))
    {
        return Err(RestoreError::Mismatch(format!(
            "the destination has RAM block {} ({} bytes) that the snapshot lacks",
            extra.name, extra.used
        )));
    }
    Ok(host)
}

async fn run(
    snapshot: &Snapshot,
    opts: &RestoreOptions,
    begun: Instant,
    report: &mut RestoreReport,
) -> Result<(), RestoreError> {
    // Milestones count from the start; RESUME is matched by QEMU's wall-clock timestamp.
    let begun_wall_us = wall_us();
    let ms = move |t: Instant| (t.saturating_duration_since(begun)).as_millis() as u64;
    let watch = opts.progress.clone().map(progress::start);
    let result = attach_and_serve(snapshot, opts, ms, begun_wall_us, report).await;
    if let Some(w) = watch {
        report.timeline.first_progress_ms = if result.is_ok() {
            match tokio::time::timeout(PROGRESS_GRACE, w).await {
                Ok(Ok(Some(t))) => Some(ms(t)),
                _ => None,
            }
        } else {
            w.abort();
            None
        };
    }
    result
}

fn wall_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

async fn attach_and_serve(
    snapshot: &Snapshot,
    opts: &RestoreOptions,
    ms: impl Fn(Instant) -> u64 + Copy,
    begun_wall_us: u64,
    report: &mut RestoreReport,
) -> Result<(), RestoreError> {
    let qmp = Qmp::connect_checked(&opts.qmp, PeerPolicy::from_uid(opts.qmp_uid)).await?;
    let host_pages = check_destination(&qmp, &snapshot.meta).await?;
    let private = tempfile::Builder::new()
        .prefix("postcopy-sidecar-restore-")
        .tempdir()
        .map_err(|e| net("creating the private socket directory", e))?;
    let endpoint = private.path().join("incoming.sock");
    qmp.set_capabilities(&[
        ("events", true),
        ("postcopy-ram", true),
        ("return-path", true),
        ("postcopy-blocktime", true),
    ])
    .await?;
    qmp.migrate_incoming(&format!("unix:{}", endpoint.display()))
        .await?;
    // RESUME (the VM runs) is found afterwards by QEMU's own timestamp.
    let mut events = qmp.subscribe_raw();
    let sock = UnixStream::connect(&endpoint)
        .await
        .map_err(|e| net(format!("connecting to {}", endpoint.display()), e))?;
    socket2::SockRef::from(&sock)
        .set_send_buffer_size(RESTORE_SNDBUF)
        .map_err(|e| net("setting the send buffer", e))?;
    report.timeline.connected_ms = Some(ms(Instant::now()));

    let knobs = ServeKnobs {
        working_set: opts.working_set,
        sweep_rate: opts.sweep_rate,
        ..ServeKnobs::default()
    };
    // The page service blocks on its socket, on a thread of its own (`stream::serve`).
    let sock = sock
        .into_std()
        .map_err(|e| net("handing the socket to the page service", e))?;
    let (snap, timeout) = (snapshot.clone(), opts.timeout);
    let served = tokio::task::spawn_blocking(move || {
        stream::serve(&snap, &sock, knobs, host_pages, timeout)
    })
    .await
    .map_err(|e| {
        net(
            "the page service's thread",
            std::io::Error::other(e.to_string()),
        )
    })??;
    report.timeline.package_sent_ms = Some(ms(served.package_sent));
    report.timeline.all_sent_ms = served.all_sent.map(ms);
    report.timeline.device_state_loaded_ms = served.pong3.map(ms);
    let status = qmp.wait_migration_end(opts.timeout).await?;
    report.timeline.completed_ms = Some(ms(Instant::now()));
    report.migration_status = status.to_string();
    report.postcopy_blocktime_ms = qmp.postcopy_blocktime_ms().await.ok().flatten();
    loop {
        match events.try_recv() {
            Ok(ev) if ev.name == "RESUME" && report.timeline.running_ms.is_none() => {
                report.timeline.running_ms =
                    Some(ev.timestamp_us.saturating_sub(begun_wall_us) / 1000);
            }
            Ok(_) | Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => {}
            Err(_) => break,
        }
    }
    report.requests = served.requests;
    report.served = served.served.clone();
    report.bytes_sent = served.bytes_sent;
    report.working_set_replayed = (snapshot.working_set.as_ref())
        .filter(|_| opts.working_set)
        .map(|s| s.len() as u64);
    if status == "completed"
        && let Some(set) = served.recorded.filter(|s| !s.is_empty())
    {
        // Another clone may have saved its own first; either serves the next restore.
        match set.save_new(&snapshot.dir) {
            Ok(true) => report.working_set_recorded = Some(set.len() as u64),
            Ok(false) => {}
            Err(e) => tracing::warn!("{e}: the next restore goes without a working set"),
        }
    }
    report.latency = crate::figures::latency_of(&served.latency);
    if status != "completed" {
        return Err(RestoreError::DestinationFailed(status.to_string()));
    }
    if served.shut != Some(0) {
        return Err(RestoreError::DestinationFailed(format!(
            "completed but its return path ended with SHUT {:?}",
            served.shut
        )));
    }
    Ok(())
}

pub(crate) fn net(what: impl Into<String>, source: std::io::Error) -> RestoreError {
    RestoreError::Net {
        what: what.into(),
        source,
    }
}

pub(crate) fn timed_out() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out")
}

/// Restores `snapshot` into several destinations at once (clones); one report each, in
/// the order of `opts`.
pub async fn restore_clones(
    snapshot: Arc<Snapshot>,
    opts: Vec<RestoreOptions>,
) -> Vec<RestoreReport> {
    let tasks: Vec<_> = opts
        .into_iter()
        .map(|o| {
            let s = snapshot.clone();
            tokio::spawn(async move { restore(&s, &o).await })
        })
        .collect();
    let mut reports = Vec::new();
    for t in tasks {
        reports.push(t.await.unwrap_or_else(|e| RestoreReport {
            outcome: "failed".into(),
            error: Some(format!("restore task: {e}")),
            ..Default::default()
        }));
    }
    reports
}

/// A snapshot directory is untrusted input: every bound of `meta.json` and of the files it
/// describes is refused with a typed error naming the file and field, and a file changed
/// under an open snapshot gives an error, not a crash.
#[cfg(test)]
mod open_tests {
    use std::os::unix::fs::FileExt;

    use super::*;
    use crate::snapshot::meta::{INDEX_FILE, META_FILE, PAGES_FILE};

    fn snapshot() -> (tempfile::TempDir, SnapshotMeta) {
        let dir = tempfile::tempdir().unwrap();
        let meta = crate::synth::snapshot::write(dir.path(), 8, 7).unwrap();
        (dir, meta)
    }

    /// Re-saves `meta` after `edit`, with a correct checksum: only the bounds can refuse it.
    fn resave(dir: &Path, meta: &SnapshotMeta, edit: impl FnOnce(&mut SnapshotMeta)) {
        let mut m = meta.clone();
        edit(&mut m);
        m.save(dir).unwrap();
    }

    fn open_err(dir: &Path) -> SnapshotError {
        match Snapshot::open(dir, true) {
            Ok(_) => panic!("a bad snapshot was opened"),
            Err(e) => e,
        }
    }

    fn assert_bad_field(e: SnapshotError, want: &str) {
        match &e {
            SnapshotError::BadField { field, path, .. } => {
                assert_eq!(field, want, "{e}");
                assert!(path.ends_with(META_FILE), "{e}");
            }
            other => panic!("expected a refusal of {want}, got {other:?}"),
        }
    }

    #[test]
    fn a_whole_snapshot_opens_and_every_page_verifies() {
        let (dir, _) = snapshot();
        let s = Snapshot::open(dir.path(), true).unwrap();
        assert_eq!(s.store.verify_all().unwrap(), 8);
    }

    #[test]
    fn meta_edited_by_hand_fails_its_checksum() {
        let (dir, _) = snapshot();
        let path = dir.path().join(META_FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        let edited = text.replacen("\"data_pages\": 8", "\"data_pages\": 7", 1);
        assert_ne!(text, edited);
        std::fs::write(&path, edited).unwrap();
        match open_err(dir.path()) {
            SnapshotError::MetaChecksum { path, .. } => assert!(path.ends_with(META_FILE)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_truncated_meta_json_is_refused() {
        let (dir, _) = snapshot();
        let path = dir.path().join(META_FILE);
        let text = std::fs::read(&path).unwrap();
        std::fs::write(&path, &text[..text.len() / 2]).unwrap();
        assert!(matches!(
            open_err(dir.path()),
            SnapshotError::BadMeta { .. }
        ));
    }

    #[test]
    fn an_older_format_is_refused_by_name() {
        let (dir, meta) = snapshot();
        resave(dir.path(), &meta, |m| m.format = 1);
        match open_err(dir.path()) {
            SnapshotError::BadMeta { reason, .. } => {
                assert!(reason.contains("format 1"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn page_sizes_qemu_never_uses_are_refused() {
        for tps in [0, 512, 2048, 3 << 12, 2 << 30, 1 << 63] {
            let (dir, meta) = snapshot();
            resave(dir.path(), &meta, |m| m.stream.target_page_size = tps);
            assert_bad_field(open_err(dir.path()), "stream.target_page_size");
        }
    }

    #[test]
    fn huge_lengths_and_offsets_are_refused_without_overflow() {
        let huge = u64::MAX - 4095; // page aligned, so only the bound can refuse it
        let (dir, meta) = snapshot();
        resave(dir.path(), &meta, |m| m.blocks[0].length = huge);
        assert_bad_field(open_err(dir.path()), "blocks[0].length");
        let (dir, meta) = snapshot();
        resave(dir.path(), &meta, |m| m.blocks[0].store_offset = huge);
        assert_bad_field(open_err(dir.path()), "blocks[0].store_offset");
        let (dir, meta) = snapshot();
        resave(dir.path(), &meta, |m| m.index.len = u64::MAX);
        assert_bad_field(open_err(dir.path()), "index.len");
        let (dir, meta) = snapshot();
        resave(dir.path(), &meta, |m| m.package.len = u64::MAX);
        assert_bad_field(open_err(dir.path()), "package.len");
        let (dir, meta) = snapshot();
        resave(dir.path(), &meta, |m| m.blocks[0].data_pages = u64::MAX);
        assert_bad_field(open_err(dir.path()), "blocks[0].data_pages");
    }

    #[test]
    fn overlapping_or_duplicate_blocks_are_refused() {
        let (dir, meta) = snapshot();
        resave(dir.path(), &meta, |m| {
            let mut b = m.blocks[0].clone();
            b.name = "rom".into();
            b.length = 4096;
            b.data_pages = 0;
            m.blocks.push(b); // same store offset as block 0
        });
        assert_bad_field(open_err(dir.path()), "blocks[1].store_offset");
        let (dir, meta) = snapshot();
        resave(dir.path(), &meta, |m| {
            let mut b = m.blocks[0].clone();
            b.store_offset = 1 << 30;
            m.blocks.push(b);
        });
        assert_bad_field(open_err(dir.path()), "blocks[1].name");
    }

    #[test]
    fn truncated_or_grown_files_are_refused_naming_them() {
        for (file, grow) in [
            (OPENING_FILE, false),
            (PACKAGE_FILE, true),
            (INDEX_FILE, false),
            (INDEX_FILE, true),
            (PAGES_FILE, false),
        ] {
            let (dir, _) = snapshot();
            let path = dir.path().join(file);
            let len = std::fs::metadata(&path).unwrap().len();
            let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            f.set_len(if grow { len + 1 } else { len - 1 }).unwrap();
            match open_err(dir.path()) {
                SnapshotError::Truncated {
                    file: named,
                    expected,
                    found,
                } => {
                    assert_eq!((named, expected), (file, len));
                    assert_eq!(found, if grow { len + 1 } else { len - 1 });
                }
                other => panic!("{file}: {other:?}"),
            }
        }
    }

    #[test]
    fn files_truncated_under_an_open_snapshot_give_errors_not_a_crash() {
        let (dir, _) = snapshot();
        let s = Snapshot::open(dir.path(), false).unwrap();
        // The index was read and checked at open: truncating it changes nothing.
        std::fs::File::create(dir.path().join(INDEX_FILE)).unwrap();
        let mut page = vec![0u8; 4096];
        s.store.read(0, 1, &mut page).unwrap();
        // A page rewritten under the open store is caught by its checksum.
        let pages = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join(PAGES_FILE))
            .unwrap();
        pages.write_all_at(&[0xee; 16], 4096 * 2).unwrap();
        assert!(matches!(
            s.store.read(0, 2, &mut page),
            Err(SnapshotError::PageChecksum { offset: 0x2000, .. })
        ));
        // The pages file truncated under the open store: a typed error, not a SIGBUS.
        pages.set_len(4096).unwrap();
        match s.store.read(0, 5, &mut page) {
            Err(SnapshotError::Truncated {
                file, found: 4096, ..
            }) => assert_eq!(file, PAGES_FILE),
            other => panic!("{other:?}"),
        }
        // And a page outside the store is an error too.
        assert!(matches!(
            s.store.read(0, 8, &mut page),
            Err(SnapshotError::PageOutOfRange { block: 0, page: 8 })
        ));
    }

    #[test]
    fn meta_json_is_written_atomically_with_its_checksum() {
        let (dir, meta) = snapshot();
        let loaded = SnapshotMeta::load(dir.path()).unwrap();
        assert_eq!(loaded.checksum, meta.computed_checksum());
        assert!(loaded.checksum.starts_with("xxh3:"));
        // Only meta.json and the data files: no temporary left behind.
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                INDEX_FILE,
                META_FILE,
                OPENING_FILE,
                PACKAGE_FILE,
                PAGES_FILE
            ]
        );
    }
}
