//! Lazy restore against real QEMU and a real Linux guest: snapshot a running guest through
//! the sidecar (playing the destination), then restore it into fresh destination QEMUs
//! with the sidecar playing the source. Each restored guest must continue its workload with
//! zero mismatching words; damaged snapshots and mismatched destinations are refused
//! before a byte is sent.
//!
//! They need `scripts/setup.sh` to have run; without it they fail (never skip).

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use postcopy_sidecar::lab::{
    LabError, QemuBinary, QemuVersion, Vm, VmSpec, Workload, WorkloadMode,
};
use postcopy_sidecar::restore::progress::{DEFAULT_MARKER, ProgressWatch};
use postcopy_sidecar::restore::{RestoreOptions, RestoreReport, Snapshot, restore, restore_clones};
use postcopy_sidecar::snapshot::SnapshotError;
use postcopy_sidecar::snapshot::meta::PAGES_FILE;
use postcopy_sidecar::snapshot::take::{SnapshotOptions, SnapshotReport, snapshot};

const BOOT: Duration = Duration::from_secs(180);
const PROGRESS: Duration = Duration::from_secs(120);
const MIGRATION: Duration = Duration::from_secs(300);

fn need<T>(r: Result<T, LabError>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

fn source_spec(version: QemuVersion) -> VmSpec {
    VmSpec::new(need(QemuBinary::find(version)))
        .name("src")
        .ram_mib(256)
        .linux(Workload {
            mib: 96,
            mode: WorkloadMode::Hot,
            hot_mib: 16,
            seed: 23,
        })
}

/// Boots a guest, lets its workload run, and snapshots it into `dir/snap`.
async fn snapshot_running_guest(version: QemuVersion, dir: &Path) -> (VmSpec, Vm, SnapshotReport) {
    let spec = source_spec(version);
    let src = need(Vm::spawn(&spec, dir).await);
    need(src.wait_workload_ready(BOOT).await);
    need(src.wait_progress(src.serial().len(), 1, PROGRESS).await);
    let report = snapshot(&SnapshotOptions {
        qmp: src.spare_qmp_path().to_path_buf(),
        out: dir.join("snap"),
        timeout: MIGRATION,
    })
    .await
    .unwrap_or_else(|e| panic!("snapshot: {e}\nsource stderr:\n{}", src.stderr().tail(20)));
    eprintln!("{}", serde_json::to_string_pretty(&report).unwrap());
    // The source ends paused, as after any completed migration.
    assert_eq!(src.qmp().run_state().await.unwrap(), "postmigrate");
    need(src.check_workload_clean());
    (spec, src, report)
}

/// A fresh destination whose console is also written to `dir/NAME.console`, so the
/// restore can time the guest's first progress line.
async fn destination(spec: &VmSpec, version: QemuVersion, name: &str, dir: &Path) -> Vm {
    let d = spec
        .destination(need(QemuBinary::find(version)))
        .name(name)
        .serial_log(dir.join(format!("{name}.console")));
    need(Vm::spawn(&d, dir).await)
}

/// The restored guest runs, keeps making progress, and never saw a wrong word.
async fn assert_restored(dst: &Vm, report: &RestoreReport) {
    eprintln!("{}", serde_json::to_string_pretty(report).unwrap());
    assert_eq!(report.outcome, "completed", "{:?}", report.error);
    assert_eq!(report.migration_status, "completed");
    let t = &report.timeline;
    assert!(t.running_ms.is_some(), "no RESUME seen");
    let progress = t
        .first_progress_ms
        .expect("the guest's first progress line was timed");
    assert!(t.running_ms <= Some(progress), "{t:?}");
    assert!(t.running_ms <= t.completed_ms, "{t:?}");
    assert!(report.served.background_pages + report.served.requested_pages > 0);
    assert_eq!(dst.qmp().run_state().await.unwrap(), "running");
    let seen = need(dst.wait_progress(0, 2, PROGRESS).await);
    assert!(seen.iter().all(|p| p.mismatches == 0), "{seen:?}");
    need(dst.check_workload_clean());
}

fn opts(dst: &Vm) -> RestoreOptions {
    RestoreOptions {
        qmp: dst.spare_qmp_path().to_path_buf(),
        report: None,
        timeout: MIGRATION,
        progress: dst.spec().serial_log.clone().map(|log| ProgressWatch {
            log,
            marker: DEFAULT_MARKER.into(),
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_and_restore_a_running_guest_10_0() {
    let dir = tempfile::Builder::new().prefix("lazy-").tempdir().unwrap();
    let (spec, src, snap) = snapshot_running_guest(QemuVersion::V10_0, dir.path()).await;
    assert!(snap.data_pages > 0);
    src.kill().await;
    let snapshot = Snapshot::open(&dir.path().join("snap"), false).expect("open snapshot");
    let dst = destination(&spec, QemuVersion::V10_0, "restored", dir.path()).await;
    let report = restore(&snapshot, &opts(&dst)).await;
    assert!(
        report.requests > 0,
        "a running guest faults on missing pages"
    );
    assert_restored(&dst, &report).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_and_restore_a_running_guest_7_2() {
    let dir = tempfile::Builder::new().prefix("lazy-").tempdir().unwrap();
    let (spec, src, _) = snapshot_running_guest(QemuVersion::V7_2, dir.path()).await;
    src.kill().await;
    let snapshot = Snapshot::open(&dir.path().join("snap"), true).expect("open snapshot");
    let dst = destination(&spec, QemuVersion::V7_2, "restored", dir.path()).await;
    let report = restore(&snapshot, &opts(&dst)).await;
    assert_restored(&dst, &report).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_clones_restore_concurrently_from_one_snapshot() {
    let dir = tempfile::Builder::new().prefix("lazy-").tempdir().unwrap();
    let (spec, src, _) = snapshot_running_guest(QemuVersion::V10_0, dir.path()).await;
    src.kill().await;
    let snapshot = Arc::new(Snapshot::open(&dir.path().join("snap"), false).unwrap());
    let mut clones = Vec::new();
    for i in 0..3 {
        clones.push(destination(&spec, QemuVersion::V10_0, &format!("clone{i}"), dir.path()).await);
    }
    let reports = restore_clones(snapshot, clones.iter().map(opts).collect()).await;
    for (vm, report) in clones.iter().zip(&reports) {
        assert_restored(vm, report).await;
    }
}

/// Damaged snapshots and mismatched destinations: refused, and the destination QEMU never
/// saw a byte (its migration never started).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_snapshots_and_mismatched_destinations_are_refused() {
    let dir = tempfile::Builder::new().prefix("lazy-").tempdir().unwrap();
    let (spec, src, _) = snapshot_running_guest(QemuVersion::V10_0, dir.path()).await;
    src.kill().await;
    let snap = dir.path().join("snap");

    // A destination with more RAM than the snapshot's source.
    let bigger = spec
        .clone()
        .ram_mib(320)
        .destination(need(QemuBinary::find(QemuVersion::V10_0)))
        .name("bigger");
    let bigger = need(Vm::spawn(&bigger, dir.path()).await);
    let snapshot = Snapshot::open(&snap, false).unwrap();
    let report = restore(&snapshot, &opts(&bigger)).await;
    let err = report.error.expect("refused");
    assert!(
        err.contains(
            "RAM block m is 335544320 bytes on the destination, 268435456 in the snapshot"
        ),
        "{err}"
    );
    assert_eq!(bigger.qmp().migrate_status().await.unwrap(), "none");
    bigger.kill().await;

    // A page that fails its checksum: refused up front with --verify-pages ...
    let meta = postcopy_sidecar::snapshot::SnapshotMeta::load(&snap).unwrap();
    let store = postcopy_sidecar::snapshot::PageStore::open(&snap, &meta).unwrap();
    let (block, page) = (0..store.block_pages(0))
        .map(|p| (0usize, p))
        .find(|&(b, p)| store.kind(b, p) != postcopy_sidecar::snapshot::store::PageKind::Zero)
        .expect("a data page");
    let at = meta.blocks[block].store_offset + page * 4096 + 100;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(snap.join(PAGES_FILE))
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x5a], at).unwrap();
    match Snapshot::open(&snap, true) {
        Err(SnapshotError::PageChecksum {
            block: name,
            offset,
        }) => {
            assert_eq!(
                (name.as_str(), offset),
                (meta.blocks[block].name.as_str(), page * 4096)
            )
        }
        other => panic!("expected a page checksum error, got {:?}", other.err()),
    }
    // ... and never sent without it: the restore stops when the page is due.
    let dst = destination(&spec, QemuVersion::V10_0, "damaged", dir.path()).await;
    let lazy = Snapshot::open(&snap, false).unwrap();
    let report = restore(&lazy, &opts(&dst)).await;
    let err = report.error.expect("a damaged page ends the restore");
    assert!(err.contains("fails its checksum"), "{err}");
    dst.kill().await;
    f.write_all_at(&b, at).unwrap();

    // A damaged package and a truncated pages file are refused at open.
    let pkg = snap.join("package.bin");
    let original = std::fs::read(&pkg).unwrap();
    let mut bad = original.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 1;
    std::fs::write(&pkg, &bad).unwrap();
    assert!(matches!(
        Snapshot::open(&snap, false),
        Err(SnapshotError::FileChecksum {
            file: "package.bin",
            ..
        })
    ));
    std::fs::write(&pkg, &original).unwrap();
    f.set_len(meta.pages_len - 4096).unwrap();
    assert!(matches!(
        Snapshot::open(&snap, false),
        Err(SnapshotError::Truncated {
            file: "pages.bin",
            ..
        })
    ));
    std::fs::remove_file(snap.join("index.bin")).unwrap();
    let e = Snapshot::open(&snap, false)
        .err()
        .expect("missing index refused");
    assert!(e.to_string().contains("index.bin"), "{e}");
}
