//! How `receive` fails, against real QEMUs: clearly, promptly, naming what went wrong, and
//! without forwarding bytes it could not decode.
//!
//! They need `scripts/setup.sh` to have run; without it they fail (never skip).

use std::time::Duration;

use postcopy_sidecar::daemon::receive::{Listen, ReceiveError, ReceiveOptions, receive_on};
use postcopy_sidecar::daemon::report::Report;
use postcopy_sidecar::lab::{
    LabError, QemuBinary, QemuVersion, Vm, VmSpec, Workload, WorkloadMode,
};
use postcopy_sidecar::qmp::{event_name, migration_event_status};
use postcopy_sidecar::source::{SendOptions, send};
use tokio::io::AsyncWriteExt;

const LIMIT: Duration = Duration::from_secs(240);

fn need<T>(r: Result<T, LabError>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

fn spec() -> VmSpec {
    VmSpec::new(need(QemuBinary::find(QemuVersion::V10_0)))
        .name("src")
        .ram_mib(256)
        .linux(Workload {
            mib: 96,
            mode: WorkloadMode::Hot,
            hot_mib: 16,
            seed: 5,
        })
}

fn options(dst: &Vm, addr: std::net::SocketAddr) -> ReceiveOptions {
    ReceiveOptions::new(dst.spare_qmp_path(), Listen::At(addr))
}

async fn start_sidecar(
    dst: &Vm,
) -> (
    std::net::SocketAddr,
    tokio::task::JoinHandle<Result<Report, ReceiveError>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (addr, tokio::spawn(receive_on(listener, options(dst, addr))))
}

/// Starts the source side of the migration in the background.
fn start_send(
    src: &Vm,
    to: std::net::SocketAddr,
    postcopy_after: Option<Duration>,
) -> tokio::task::JoinHandle<
    Result<postcopy_sidecar::source::SendReport, postcopy_sidecar::qmp::QmpError>,
> {
    let opts = SendOptions {
        qmp: src.spare_qmp_path().to_path_buf(),
        to,
        postcopy_after,
        preempt: false,
        multifd: None,
        timeout: LIMIT,
    };
    tokio::spawn(async move { send(&opts).await })
}

async fn finished(
    h: tokio::task::JoinHandle<Result<Report, ReceiveError>>,
) -> Result<Report, ReceiveError> {
    tokio::time::timeout(LIMIT, h)
        .await
        .expect("the sidecar ends by itself")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ram_backend_that_is_not_a_shared_memfd_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let dspec = spec()
        .firmware_only()
        .destination(need(QemuBinary::find(QemuVersion::V10_0)))
        .arg("-object")
        .arg("memory-backend-ram,id=scratch,size=16M");
    let dst = need(Vm::spawn(&dspec, dir.path()).await);
    let (_, h) = start_sidecar(&dst).await;
    let err = finished(h).await.expect_err("must refuse");
    let msg = err.to_string();
    assert!(
        matches!(err, ReceiveError::UnsupportedBackend { .. }),
        "{msg}"
    );
    assert!(
        msg.contains("'scratch'") && msg.contains("memory-backend-ram"),
        "{msg}"
    );
    assert!(
        msg.contains("memory-backend-memfd") && msg.contains("share=on"),
        "the fix must be named: {msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_that_do_not_decode_end_the_migration_with_their_offset() {
    let dir = tempfile::tempdir().unwrap();
    let dst = need(
        Vm::spawn(
            &spec()
                .firmware_only()
                .destination(need(QemuBinary::find(QemuVersion::V10_0))),
            dir.path(),
        )
        .await,
    );
    let (addr, h) = start_sidecar(&dst).await;
    // An opening that fits the destination's RAM blocks (so it is admitted and the
    // destination connected), then a section type no QEMU sends.
    let blocks = dst.qmp().ram_blocks().await.unwrap();
    let list: Vec<(&[u8], u64)> = blocks.iter().map(|b| (b.name.as_bytes(), b.used)).collect();
    let mut bytes = Vec::new();
    postcopy_sidecar::wire::compose::put_opening(&mut bytes, b"pc-q35-10.0", 2, &list);
    let good = bytes.len() as u64;
    bytes.push(0x42);
    bytes.extend_from_slice(&[0u8; 64]);
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(&bytes).await.unwrap();
    let report = finished(h).await.expect("a report");
    let e = report.error.clone().expect("an error");
    assert!(
        e.contains(&format!("main stream at offset {good}"))
            && e.contains("unknown section type byte 0x42"),
        "{e}"
    );
    assert_eq!(report.outcome, "failed");
    // Only the decoded bytes reached the destination.
    assert_eq!(report.bytes.main, good, "{report:?}");
}

/// A source that dies for good: the sidecar holds the destination for its away timeout,
/// then releases it to QEMU's own postcopy-paused state (recoverable, not failed) and ends
/// with an error saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_dies_in_postcopy_ends_the_sidecar_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let src = need(Vm::spawn(&spec(), dir.path()).await);
    need(src.wait_workload_ready(LIMIT).await);
    let dst = need(
        Vm::spawn(
            &spec().destination(need(QemuBinary::find(QemuVersion::V10_0))),
            dir.path(),
        )
        .await,
    );
    let resumed = dst.qmp().event_cursor();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let h = tokio::spawn(receive_on(
        listener,
        ReceiveOptions {
            away_timeout: Duration::from_secs(5),
            ..options(&dst, addr)
        },
    ));
    let sender = start_send(&src, addr, Some(Duration::ZERO));
    // Once the destination runs (POSTCOPY_RUN), the source holds pages it alone has.
    dst.qmp()
        .wait_for_event_after(resumed, |e| event_name(e) == "RESUME", LIMIT)
        .await
        .expect("destination resumes in postcopy");
    let released = dst.qmp().event_cursor();
    src.kill().await;
    let report = finished(h).await.expect("a report");
    let e = report.error.clone().expect("an error");
    assert!(e.contains("did not come back within 5 s"), "{e}");
    assert_eq!(report.outcome, "failed");
    assert_eq!(report.link.as_ref().map(|l| l.state), Some("away"));
    // Released, not failed: QEMU's own recovery could still take it from here. Read from
    // the MIGRATION event, which QEMU writes from its incoming thread: under TCG a vCPU
    // waiting on a missing page can hold the main loop, so query-migrate may not answer.
    let st = dst
        .qmp()
        .wait_for_event_after(
            released,
            |e| migration_event_status(e).is_some_and(|s| s == "postcopy-paused" || s == "failed"),
            LIMIT,
        )
        .await
        .expect("destination leaves postcopy-active");
    assert_eq!(
        migration_event_status(&st),
        Some(postcopy_sidecar::qmp::MigrationStatus::PostcopyPaused)
    );
    sender.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_exits_ends_the_sidecar_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let src = need(Vm::spawn(&spec(), dir.path()).await);
    need(src.wait_workload_ready(LIMIT).await);
    let dst = need(
        Vm::spawn(
            &spec().destination(need(QemuBinary::find(QemuVersion::V10_0))),
            dir.path(),
        )
        .await,
    );
    let active = dst.qmp().event_cursor();
    let (addr, h) = start_sidecar(&dst).await;
    // Precopy only: the source keeps streaming until the destination goes away.
    let sender = start_send(&src, addr, None);
    // Kill the destination once pages are flowing into it.
    dst.qmp()
        .wait_for_event_after(
            active,
            |e| migration_event_status(e).is_some_and(|s| s == "active"),
            LIMIT,
        )
        .await
        .expect("destination migration active");
    dst.kill().await;
    let report = finished(h).await;
    let msg = match report {
        Ok(r) => r.error.expect("an error"),
        Err(e) => e.to_string(),
    };
    assert!(!msg.is_empty());
    eprintln!("sidecar said: {msg}");
    let status = sender.await.unwrap().expect("source QMP");
    assert_ne!(status.status, "completed");
}

/// `--own-preempt` promises the destination a preempt channel from the sidecar; a source
/// that has preempt after all connects its own before it stops the VM. The sidecar's port
/// is closed then, so that connection is refused and the source fails the migration right
/// there: the VM never leaves the source, and both ends say why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_with_preempt_fails_an_own_preempt_migration_before_the_switch() {
    let dir = tempfile::tempdir().unwrap();
    let src = need(Vm::spawn(&spec(), dir.path()).await);
    need(src.wait_workload_ready(LIMIT).await);
    let dst = need(
        Vm::spawn(
            &spec().destination(need(QemuBinary::find(QemuVersion::V10_0))),
            dir.path(),
        )
        .await,
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let h = tokio::spawn(receive_on(
        listener,
        ReceiveOptions {
            own_preempt: true,
            ..options(&dst, addr)
        },
    ));
    let sent = send(&SendOptions {
        qmp: src.spare_qmp_path().to_path_buf(),
        to: addr,
        postcopy_after: Some(Duration::ZERO),
        preempt: true,
        multifd: None,
        timeout: LIMIT,
    })
    .await
    .expect("source QMP");
    let report = finished(h).await.expect("a report");
    let e = report.error.clone().expect("an error");
    assert!(
        e.contains("before the destination ran the VM")
            && e.contains("closed to a preempt channel (--own-preempt)"),
        "{e}"
    );
    // QEMU's words: its (preempt) connection was refused, before it stopped the VM.
    assert_eq!(sent.status, "failed", "{sent:?}");
    assert!(
        sent.error
            .as_deref()
            .is_some_and(|e| e.contains("Connection refused")),
        "{sent:?}"
    );
    assert_eq!(
        report.timeline.run_ms, None,
        "the destination never ran the VM"
    );
    // The guest goes on on the source, intact.
    assert!(src.qmp().is_running().await.unwrap(), "the source VM runs");
    let seen = need(src.wait_progress(src.serial().len(), 1, LIMIT).await);
    assert!(seen.iter().all(|p| p.mismatches == 0), "{seen:?}");
}
