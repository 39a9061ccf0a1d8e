//! `postcopy-sidecar snapshot`: drives a running source QEMU to migrate into the sidecar
//! over a private unix socket, switches to postcopy at once, and writes the snapshot
//! directory from the stream (protocol-spec/snapshot.md#snapshot-capture). The source ends
//! paused, as after any completed migration.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;

use super::SnapshotError;
use super::meta::{SnapshotMeta, SourceInfo};
use super::sink::{Sink, SinkFigures};
use crate::qmp::Qmp;
use crate::wire::{DecoderOptions, RpMessage, Step, StreamDecoder};

/// Options of `snapshot`.
#[derive(Debug, Clone)]
pub struct SnapshotOptions {
    /// The source QEMU's QMP socket.
    pub qmp: PathBuf,
    /// The snapshot directory to create (must not exist, or be empty).
    pub out: PathBuf,
    /// Give up after this long.
    pub timeout: Duration,
}

/// What `snapshot` did.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotReport {
    /// Where the snapshot is.
    pub dir: PathBuf,
    /// The source QEMU.
    pub source: SourceInfo,
    /// ms from `migrate` to the package's arrival (the source VM stopped then).
    pub package_ms: u64,
    /// ms from `migrate` to the snapshot being on disk.
    pub total_ms: u64,
    /// Guest RAM in bytes.
    pub ram_bytes: u64,
    /// Pages holding data (stored).
    pub data_pages: u64,
    /// Stream counts.
    pub stream: SinkFigures,
}

const READ_CHUNK: usize = 256 * 1024;

/// Takes a snapshot of the VM behind `opts.qmp`.
pub async fn snapshot(opts: &SnapshotOptions) -> Result<SnapshotReport, SnapshotError> {
    prepare_dir(&opts.out)?;
    let qmp = Qmp::connect(&opts.qmp).await?;
    let (maj, min, mic) = qmp.version().await?;
    let source = SourceInfo {
        qemu_version: format!("{maj}.{min}.{mic}"),
        machine: qmp.machine_type().await.unwrap_or_default(),
    };
    let private = tempfile::Builder::new()
        .prefix("postcopy-sidecar-snapshot-")
        .tempdir()
        .map_err(|e| net("creating the private socket directory", e))?;
    let endpoint = private.path().join("snapshot.sock");
    let listener = UnixListener::bind(&endpoint)
        .map_err(|e| net(format!("listening on {}", endpoint.display()), e))?;
    qmp.set_capabilities(&[
        ("events", true),
        ("return-path", true),
        ("postcopy-ram", true),
    ])
    .await?;
    let started = Instant::now();
    qmp.migrate_to(&format!("unix:{}", endpoint.display()))
        .await?;
    // Asked at once: the source switches at its first chance, so all device state travels
    // in the package and every page it had sent before is re-sent or discarded.
    qmp.start_postcopy().await?;
    let (sock, _) = tokio::time::timeout(opts.timeout, listener.accept())
        .await
        .map_err(|_| net("waiting for the source to connect", timed_out()))?
        .map_err(|e| net("accepting the source", e))?;
    let consumed = tokio::time::timeout(opts.timeout, consume(sock, &opts.out, source.clone()))
        .await
        .map_err(|_| net("receiving the stream", timed_out()))?;
    let (meta, figures, package_at) = match consumed {
        Ok(v) => v,
        Err(e) => {
            // Leave the source as the operator had it: a running VM, not a half-migrated one.
            let _ = qmp.execute(qapi::qmp::migrate_cancel {}).await;
            return Err(e);
        }
    };
    let status = qmp.wait_migration_end(opts.timeout).await?;
    if status != "completed" {
        let detail = qmp
            .query_migrate_json()
            .await
            .ok()
            .and_then(|v| {
                v.get("error-desc")
                    .and_then(|d| d.as_str())
                    .map(String::from)
            })
            .map(|d| format!(": {d}"))
            .unwrap_or_default();
        return Err(SnapshotError::SourceFailed {
            status: status.to_string(),
            detail,
        });
    }
    let package_ms = package_at
        .map(|t| (t - started).as_millis() as u64)
        .unwrap_or(0);
    Ok(SnapshotReport {
        dir: opts.out.clone(),
        source: meta.source.clone(),
        package_ms,
        total_ms: started.elapsed().as_millis() as u64,
        ram_bytes: meta.blocks.iter().map(|b| b.length).sum(),
        data_pages: meta.blocks.iter().map(|b| b.data_pages).sum(),
        stream: figures,
    })
}

/// Reads the whole stream into a [`Sink`], answering PINGs and sending SHUT at the end.
async fn consume(
    sock: tokio::net::UnixStream,
    dir: &std::path::Path,
    source: SourceInfo,
) -> Result<(SnapshotMeta, SinkFigures, Option<Instant>), SnapshotError> {
    let (mut rd, mut wr) = sock.into_split();
    let mut dec = StreamDecoder::new(DecoderOptions::default());
    let mut sink = Sink::new(dir);
    let mut buf = BytesMut::with_capacity(4 * READ_CHUNK);
    let mut replies = Vec::new();
    let mut package_at = None;
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
                package_at = Some(Instant::now());
            }
            buf.advance(len);
            if sink.ended() {
                break;
            }
        }
        if !replies.is_empty() {
            wr.write_all(&replies)
                .await
                .map_err(|e| net("answering on the return path", e))?;
            replies.clear();
        }
        if sink.ended() {
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
            dec.finish(&buf)?;
            return Err(SnapshotError::Unsupported(
                "the source closed the stream before EOF".into(),
            ));
        }
    }
    let figures = sink.figures().clone();
    let meta = sink.finish(&dec, source)?;
    // The source completes only once the destination shuts its return path.
    let mut shut = Vec::new();
    RpMessage::Shut(0).encode(&mut shut);
    wr.write_all(&shut)
        .await
        .map_err(|e| net("sending SHUT on the return path", e))?;
    wr.shutdown().await.ok();
    Ok((meta, figures, package_at))
}

fn prepare_dir(dir: &std::path::Path) -> Result<(), SnapshotError> {
    if dir.exists() {
        let mut entries =
            std::fs::read_dir(dir).map_err(|e| SnapshotError::io("reading", dir, e))?;
        if entries.next().is_some() {
            return Err(SnapshotError::BadMeta {
                path: dir.to_path_buf(),
                reason: "the snapshot directory exists and is not empty".into(),
            });
        }
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(|e| SnapshotError::io("creating", dir, e))
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
