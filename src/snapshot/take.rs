//! `postcopy-sidecar snapshot`: drives a running source QEMU to migrate into the sidecar
//! over a private unix socket and writes the snapshot directory from the stream
//! (protocol-spec/snapshot.md#snapshot-capture).
//!
//! A snapshot must never cost the VM, so the source never enters postcopy: in postcopy a
//! failure (disk full, a killed sidecar, bad bytes) leaves it `postcopy-paused` with the VM
//! stopped, and QEMU refuses to cancel. Instead:
//! - [`SnapshotMode::Precopy`] (default): the VM runs while RAM streams, pauses for the
//!   final pass, and the source completes only when the snapshot is durably on disk (it
//!   waits for our SHUT on the return path). Any failure before that drops the socket, the
//!   source's migration fails, and QEMU restarts the VM itself.
//! - [`SnapshotMode::Background`]: QEMU's `background-snapshot`: the VM pauses only while
//!   device state is saved, and keeps running through the RAM transfer and any failure.
//!
//! The snapshot is built in `DIR.partial` (locked, so two runs never share it) and renamed
//! to `DIR` once every file and the directory are synced: `DIR` is whole or absent.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use serde::Serialize;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::net::unix::OwnedWriteHalf;

use super::SnapshotError;
use super::meta::SourceInfo;
use super::sink::{Sink, SinkFigures};
use crate::qmp::{PeerPolicy, Qmp, RawEvent, event_name};
use crate::wire::{DecoderOptions, RpMessage, Step, StreamDecoder};

/// How the source streams its RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SnapshotMode {
    /// Precopy with a return path: the snapshot is the VM at the end of the transfer.
    Precopy,
    /// QEMU's background-snapshot: the snapshot is the VM at the start; it keeps running.
    Background,
}

impl std::str::FromStr for SnapshotMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "precopy" => Ok(SnapshotMode::Precopy),
            "background" => Ok(SnapshotMode::Background),
            other => Err(format!(
                "unknown snapshot mode {other:?} (precopy or background)"
            )),
        }
    }
}

/// Options of `snapshot`.
#[derive(Debug, Clone)]
pub struct SnapshotOptions {
    /// The source QEMU's QMP socket.
    pub qmp: PathBuf,
    /// The uid QEMU runs as: only a process of that uid may answer on [`Self::qmp`]
    /// (`SO_PEERCRED`). `None`: the owner of the socket's directory, or our own uid.
    pub qmp_uid: Option<u32>,
    /// The snapshot directory to create (must not exist, or be empty).
    pub out: PathBuf,
    /// Give up after this long (the source's VM keeps running).
    pub timeout: Duration,
    /// How the source streams its RAM.
    pub mode: SnapshotMode,
    /// Leave the source paused after a successful snapshot (to move the VM rather than
    /// checkpoint it); otherwise it ends in the run state it had.
    pub stop_after: bool,
}

/// What `snapshot` did.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotReport {
    /// Where the snapshot is.
    pub dir: PathBuf,
    /// How it was taken.
    pub mode: SnapshotMode,
    /// The source QEMU.
    pub source: SourceInfo,
    /// ms from `migrate` to the device state's arrival (the snapshot's point in time for
    /// precopy, its end for background).
    pub device_state_ms: u64,
    /// ms from `migrate` to the snapshot being on disk.
    pub total_ms: u64,
    /// ms the VM was paused by the snapshot (QEMU's STOP→RESUME), counted to the end if it
    /// was left paused.
    pub vm_paused_ms: u64,
    /// The source's run state afterwards.
    pub source_after: String,
    /// Guest RAM in bytes.
    pub ram_bytes: u64,
    /// Pages holding data (stored).
    pub data_pages: u64,
    /// Stream counts.
    pub stream: SinkFigures,
    /// Why this snapshot may not hold the VM's RAM exactly, if a known source defect
    /// applies ([`source_caveat`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caveat: Option<&'static str>,
}

const READ_CHUNK: usize = 256 * 1024;
/// Capabilities a snapshot sets on the source, put back afterwards.
const CAPABILITIES: &[&str] = &[
    "events",
    "return-path",
    "postcopy-ram",
    "background-snapshot",
];
/// A local snapshot is not throttled to QEMU's WAN default of 128 MiB/s.
const MAX_BANDWIDTH: u64 = 64 << 30;

/// Takes a snapshot of the VM behind `opts.qmp`. On any error the source's VM runs as it
/// did before, and neither `DIR` nor `DIR.partial` is left behind.
pub async fn snapshot(opts: &SnapshotOptions) -> Result<SnapshotReport, SnapshotError> {
    let partial = PartialDir::create(&opts.out)?;
    let qmp = Qmp::connect_checked(&opts.qmp, PeerPolicy::from_uid(opts.qmp_uid)).await?;
    let saved = Saved::read(&qmp).await?;
    let result = take(&qmp, opts, &partial).await;
    saved.restore(&qmp).await;
    match result {
        Ok(report) => Ok(report),
        Err(e) => {
            partial.remove();
            Err(e)
        }
    }
}

/// Why a snapshot of a source QEMU `(major, minor)` in `mode` may not be the VM's RAM,
/// if we know a reason: QEMU 7.2 ends a precopy migration with a few pages it never sent
/// again after their last write, measured here with no sidecar involved
/// (protocol-spec/versions.md#versions-7-2-source-stale-pages). A background snapshot does
/// not depend on its dirty tracking. Versions between 7.2 and 10.0 were not measured.
pub fn source_caveat(version: (u64, u64), mode: SnapshotMode) -> Option<&'static str> {
    (version == (7, 2) && mode == SnapshotMode::Precopy).then_some(
        "QEMU 7.2 leaves a few pages stale at the end of a precopy migration \
         (protocol-spec/versions.md#versions-7-2-source-stale-pages): this snapshot may hold \
         them and a restored guest may fail; --mode background avoids it",
    )
}

async fn take(
    qmp: &Qmp,
    opts: &SnapshotOptions,
    partial: &PartialDir,
) -> Result<SnapshotReport, SnapshotError> {
    let (maj, min, mic) = qmp.version().await?;
    let source = SourceInfo {
        qemu_version: format!("{maj}.{min}.{mic}"),
        machine: qmp.machine_type().await.unwrap_or_default(),
    };
    let caveat = source_caveat((maj, min), opts.mode);
    if let Some(why) = caveat {
        tracing::warn!(source = %source.qemu_version, "{why}");
    }
    let was_running = qmp.is_running().await?;
    let blocks = qmp.ram_blocks().await?;
    // A hugepage block's MEM_SIZE entry carries its page size; only the block's own page
    // size lets the decoder frame it (protocol-spec/ram.md#ram-mem-size).
    let decoder = DecoderOptions {
        block_page_sizes: blocks
            .iter()
            .map(|b| (b.name.as_bytes().to_vec(), b.page_size))
            .collect(),
        ..Default::default()
    };
    if opts.mode == SnapshotMode::Background {
        // Without a return path the stream lacks ADVISE, and its block list carries no
        // page sizes; the opening the sink makes up is right for base pages only.
        if let Some(b) = blocks.iter().find(|b| b.page_size != 4096) {
            return Err(SnapshotError::Unsupported(format!(
                "RAM block {} has {}-byte pages; background snapshots need 4 KiB pages \
                 (use --mode precopy)",
                b.name, b.page_size
            )));
        }
    }
    let private = tempfile::Builder::new()
        .prefix("postcopy-sidecar-snapshot-")
        .tempdir()
        .map_err(|e| net("creating the private socket directory", e))?;
    let endpoint = private.path().join("snapshot.sock");
    let listener = UnixListener::bind(&endpoint)
        .map_err(|e| net(format!("listening on {}", endpoint.display()), e))?;
    let precopy = opts.mode == SnapshotMode::Precopy;
    qmp.set_capabilities(&[
        ("events", true),
        ("return-path", precopy),
        ("postcopy-ram", precopy),
        ("background-snapshot", !precopy),
    ])
    .await?;
    qmp.set_parameters(serde_json::json!({ "max-bandwidth": MAX_BANDWIDTH }))
        .await?;
    let events = qmp.event_cursor();
    let started = Instant::now();
    qmp.migrate_to(&format!("unix:{}", endpoint.display()))
        .await?;
    let deadline = tokio::time::Instant::now() + opts.timeout;
    let received = async {
        let (sock, _) = listener
            .accept()
            .await
            .map_err(|e| net("accepting the source", e))?;
        consume(sock, &partial.path, precopy, decoder).await
    };
    let (sink, dec, wr, device_at) = match tokio::time::timeout_at(deadline, received).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => return Err(give_back(qmp, e).await),
        Err(_) => return Err(give_back(qmp, net("receiving the stream", timed_out())).await),
    };
    let figures = sink.figures().clone();
    let meta = match sink
        .finish(&dec, source)
        .and_then(|m| partial.commit().map(|_| m))
    {
        Ok(m) => m,
        Err(e) => {
            // Closing the return path without SHUT fails the source's migration.
            drop(wr);
            return Err(give_back(qmp, e).await);
        }
    };
    // The snapshot is whole on disk: only now may the source complete.
    if let Some(mut wr) = wr {
        let mut shut = Vec::new();
        RpMessage::Shut(0).encode(&mut shut);
        // A source gone by now changes nothing: every byte of the snapshot arrived.
        let _ = wr.write_all(&shut).await;
        let _ = wr.shutdown().await;
    }
    let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
    let status = qmp
        .wait_migration_end(remaining.max(Duration::from_secs(5)))
        .await;
    match status {
        Ok(s) if s == "completed" => {}
        Ok(s) => {
            tracing::warn!(status = %s, "the snapshot is whole, but the source's migration ended otherwise");
        }
        Err(e) => {
            tracing::warn!(error = %e, "the snapshot is whole; the source's end was not seen")
        }
    }
    if was_running && !opts.stop_after && !qmp.is_running().await.unwrap_or(true) {
        // A completed precopy leaves the VM in postmigrate; a checkpoint continues it.
        qmp.execute(qapi::qmp::cont {}).await?;
    }
    let source_after = qmp
        .run_state()
        .await
        .unwrap_or_else(|e| format!("unknown ({e})"));
    let vm_paused_ms = paused_ms(&qmp.events_since(events), now_us());
    Ok(SnapshotReport {
        dir: opts.out.clone(),
        mode: opts.mode,
        source: meta.source.clone(),
        device_state_ms: (device_at - started).as_millis() as u64,
        total_ms: started.elapsed().as_millis() as u64,
        vm_paused_ms,
        source_after,
        ram_bytes: meta.blocks.iter().map(|b| b.length).sum(),
        data_pages: meta.blocks.iter().map(|b| b.data_pages).sum(),
        stream: figures,
        caveat,
    })
}

/// After a failure: makes sure the source's migration ends and its VM runs as before.
/// The socket is closed by now, so a precopy source fails its migration and restarts the
/// VM itself; one still streaming is cancelled.
async fn give_back(qmp: &Qmp, e: SnapshotError) -> SnapshotError {
    let _ = qmp.execute(qapi::qmp::migrate_cancel {}).await;
    match qmp.wait_migration_end(Duration::from_secs(30)).await {
        Ok(status) => {
            tracing::info!(%status, "the source's migration ended after a failed snapshot")
        }
        Err(err) => {
            tracing::warn!(error = %err, "the source's migration did not end after a failed snapshot")
        }
    }
    e
}

/// Sums QEMU's STOP→RESUME intervals (by QEMU's own timestamps, wall clock µs); a STOP
/// not followed by RESUME counts until `now_us` (the VM was left paused).
fn paused_ms(events: &[RawEvent], now_us: u64) -> u64 {
    let mut total_us = 0u64;
    let mut stopped_at: Option<u64> = None;
    for e in events {
        match event_name(e) {
            "STOP" => {
                stopped_at.get_or_insert(e.timestamp_us);
            }
            "RESUME" => {
                if let Some(at) = stopped_at.take() {
                    total_us += e.timestamp_us.saturating_sub(at);
                }
            }
            _ => {}
        }
    }
    if let Some(at) = stopped_at {
        total_us += now_us.saturating_sub(at);
    }
    total_us / 1000
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// What the snapshot changes on the source, put back afterwards.
struct Saved {
    capabilities: Vec<(String, bool)>,
    max_bandwidth: Option<u64>,
}

impl Saved {
    async fn read(qmp: &Qmp) -> Result<Saved, SnapshotError> {
        Ok(Saved {
            capabilities: qmp.capabilities(CAPABILITIES).await?,
            max_bandwidth: qmp
                .parameters()
                .await?
                .get("max-bandwidth")
                .and_then(Value::as_u64),
        })
    }

    /// Best effort, bounded: an operator's settings matter less than the VM.
    async fn restore(&self, qmp: &Qmp) {
        // QEMU checks capabilities as a set: clear ours first, then set theirs.
        let caps: Vec<(&str, bool)> = self
            .capabilities
            .iter()
            .map(|(n, s)| (n.as_str(), *s))
            .collect();
        let cleared: Vec<(&str, bool)> = caps.iter().map(|(n, _)| (*n, false)).collect();
        let ok = qmp.set_capabilities(&cleared).await.is_ok()
            && qmp.set_capabilities(&caps).await.is_ok();
        if !ok {
            tracing::warn!("could not put the source's migration capabilities back");
        }
        if let Some(bw) = self.max_bandwidth {
            let _ = qmp
                .set_parameters(serde_json::json!({ "max-bandwidth": bw }))
                .await;
        }
    }
}

/// `DIR.partial`, exclusively ours for the run (an advisory lock on the directory), renamed
/// to `DIR` only when whole.
struct PartialDir {
    out: PathBuf,
    path: PathBuf,
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl PartialDir {
    fn create(out: &Path) -> Result<PartialDir, SnapshotError> {
        if out.exists() {
            let mut entries =
                std::fs::read_dir(out).map_err(|e| SnapshotError::io("reading", out, e))?;
            if entries.next().is_some() {
                return Err(SnapshotError::BadMeta {
                    path: out.to_path_buf(),
                    reason: "the snapshot directory exists and is not empty".into(),
                });
            }
        }
        let mut name = out
            .file_name()
            .ok_or_else(|| SnapshotError::BadMeta {
                path: out.to_path_buf(),
                reason: "the snapshot path has no directory name".into(),
            })?
            .to_os_string();
        name.push(".partial");
        let path = out.with_file_name(name);
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| SnapshotError::io("creating", parent, e))?;
        }
        match std::fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(SnapshotError::io("creating", &path, e)),
        }
        let dir = std::fs::File::open(&path).map_err(|e| SnapshotError::io("opening", &path, e))?;
        let lock = nix::fcntl::Flock::lock(dir, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| {
                SnapshotError::io(
                    "locking (is another snapshot into the same directory running?)",
                    &path,
                    e.into(),
                )
            })?;
        // Ours now: whatever is inside was left by a run that died.
        clear_dir(&path)?;
        Ok(PartialDir {
            out: out.to_path_buf(),
            path,
            _lock: lock,
        })
    }

    /// Syncs the directory and renames it into place (an empty `DIR` is replaced).
    fn commit(&self) -> Result<(), SnapshotError> {
        crate::durable::sync_dir(&self.path)
            .map_err(|e| SnapshotError::io("syncing", &self.path, e))?;
        std::fs::rename(&self.path, &self.out)
            .map_err(|e| SnapshotError::io("renaming into place", &self.out, e))?;
        let parent = self
            .out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        crate::durable::sync_dir(parent).map_err(|e| SnapshotError::io("syncing", parent, e))
    }

    fn remove(&self) {
        if self.path.exists()
            && let Err(e) = std::fs::remove_dir_all(&self.path)
        {
            tracing::warn!(path = %self.path.display(), error = %e, "could not remove the partial snapshot");
        }
    }
}

fn clear_dir(dir: &Path) -> Result<(), SnapshotError> {
    for entry in std::fs::read_dir(dir).map_err(|e| SnapshotError::io("reading", dir, e))? {
        let p = entry
            .map_err(|e| SnapshotError::io("reading", dir, e))?
            .path();
        let removed = if p.is_dir() && !p.is_symlink() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        removed.map_err(|e| SnapshotError::io("removing a stale file", &p, e))?;
    }
    Ok(())
}

/// Reads the stream into a [`Sink`] until it is whole, answering PINGs. Returns the
/// return path's write half (precopy), on which the caller sends SHUT once the snapshot is
/// on disk, and when the device state arrived.
async fn consume(
    sock: tokio::net::UnixStream,
    dir: &Path,
    mut return_path: bool,
    decoder: DecoderOptions,
) -> Result<(Sink, StreamDecoder, Option<OwnedWriteHalf>, Instant), SnapshotError> {
    let (mut rd, mut wr) = sock.into_split();
    let mut dec = StreamDecoder::new(decoder);
    let mut sink = Sink::new(dir);
    let mut buf = BytesMut::with_capacity(4 * READ_CHUNK);
    let mut replies = Vec::new();
    let mut device_at = None;
    loop {
        loop {
            let step = dec.next(&buf)?;
            let Step::Event { len, event, .. } = step else {
                break;
            };
            if let Some(reply) = sink.on_event(&dec, &event, &buf[..len])? {
                reply.encode(&mut replies);
            }
            if matches!(event, crate::wire::Event::PackageEnd) {
                device_at = Some(Instant::now());
            }
            buf.advance(len);
            if sink.ended() {
                break;
            }
        }
        if !replies.is_empty() && return_path {
            wr.write_all(&replies)
                .await
                .map_err(|e| net("answering on the return path", e))?;
            replies.clear();
        }
        if sink.ended() || sink.precopy_complete(&dec) {
            break;
        }
        if buf.capacity() - buf.len() < READ_CHUNK {
            buf.reserve(4 * READ_CHUNK);
        }
        let n = (&mut rd)
            .take(READ_CHUNK as u64)
            .read_buf(&mut buf)
            .await
            .map_err(|e| net("reading the source's stream", e))?;
        if n == 0 {
            // A source without a return path (background-snapshot) closes at its end.
            dec.finish(&buf)?;
            return_path = false;
            if sink.ended() || sink.precopy_complete(&dec) {
                break;
            }
            return Err(SnapshotError::Unsupported(
                "the source closed the stream before its end".into(),
            ));
        }
    }
    // Precopy: the device state is the last thing to arrive.
    let device_at = device_at.unwrap_or_else(Instant::now);
    Ok((sink, dec, return_path.then_some(wr), device_at))
}

fn net(what: impl Into<String>, source: std::io::Error) -> SnapshotError {
    SnapshotError::Net {
        what: what.into(),
        source,
    }
}

fn timed_out() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_precopy_snapshot_of_7_2_carries_the_stale_page_caveat() {
        assert!(source_caveat((7, 2), SnapshotMode::Precopy).is_some());
        assert_eq!(source_caveat((7, 2), SnapshotMode::Background), None);
        assert_eq!(source_caveat((10, 0), SnapshotMode::Precopy), None);
        assert_eq!(source_caveat((11, 1), SnapshotMode::Precopy), None);
    }

    fn ev(name: &str, us: u64) -> RawEvent {
        RawEvent {
            name: name.into(),
            data: Value::Null,
            timestamp_us: us,
        }
    }

    #[test]
    fn paused_time_sums_stop_to_resume_and_counts_an_open_pause_to_now() {
        let events = [
            ev("MIGRATION", 10),
            ev("STOP", 1_000),
            ev("RESUME", 9_000),
            ev("STOP", 20_000),
        ];
        assert_eq!(paused_ms(&events[..3], 50_000), 8);
        assert_eq!(paused_ms(&events, 50_000), 38);
        assert_eq!(paused_ms(&[], 50_000), 0);
    }
}
