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
    LabError, QemuBinary, QemuVersion, RamLayout, Vm, VmSpec, Workload, WorkloadMode,
    reserve_hugepages,
};
use postcopy_sidecar::qmp::migration_event_status;
use postcopy_sidecar::restore::progress::{DEFAULT_MARKER, ProgressWatch};
use postcopy_sidecar::restore::{RestoreOptions, RestoreReport, Snapshot, restore, restore_clones};
use postcopy_sidecar::snapshot::SnapshotError;
use postcopy_sidecar::snapshot::meta::PAGES_FILE;
use postcopy_sidecar::snapshot::take::{SnapshotMode, SnapshotOptions, SnapshotReport, snapshot};

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

/// Boots a guest and lets its workload run.
async fn running_guest(version: QemuVersion, dir: &Path) -> (VmSpec, Vm) {
    let spec = source_spec(version);
    let src = need(Vm::spawn(&spec, dir).await);
    need(src.wait_workload_ready(BOOT).await);
    need(src.wait_progress(src.serial().len(), 1, PROGRESS).await);
    (spec, src)
}

fn snapshot_options(src: &Vm, out: &Path, mode: SnapshotMode, stop_after: bool) -> SnapshotOptions {
    SnapshotOptions {
        qmp: src.spare_qmp_path().to_path_buf(),
        qmp_uid: None,
        out: out.to_path_buf(),
        timeout: MIGRATION,
        mode,
        stop_after,
    }
}

/// Boots a guest, lets its workload run, and snapshots it into `dir/snap`, leaving it
/// paused at the snapshot's point (the VM is moved, not checkpointed).
async fn snapshot_running_guest(version: QemuVersion, dir: &Path) -> (VmSpec, Vm, SnapshotReport) {
    let (spec, src) = running_guest(version, dir).await;
    let report = snapshot(&snapshot_options(
        &src,
        &dir.join("snap"),
        SnapshotMode::Precopy,
        true,
    ))
    .await
    .unwrap_or_else(|e| panic!("snapshot: {e}\nsource stderr:\n{}", src.stderr().tail(20)));
    eprintln!("{}", serde_json::to_string_pretty(&report).unwrap());
    // Asked to stop after: paused since the final pass, as after any completed migration.
    assert_eq!(src.qmp().run_state().await.unwrap(), "postmigrate");
    assert_eq!(report.source_after, "postmigrate");
    assert!(report.vm_paused_ms > 0, "{report:?}");
    // Precopy: the device state came as sections after END ram, wrapped for the restore.
    assert!(report.stream.device_bytes > 0, "{report:?}");
    assert!(!dir.join("snap.partial").exists());
    need(src.check_workload_clean());
    (spec, src, report)
}

/// Asserts the source's VM runs and its workload goes on with zero mismatches.
async fn assert_source_runs_on(src: &Vm) {
    assert_eq!(src.qmp().run_state().await.unwrap(), "running");
    let seen = need(src.wait_progress(src.serial().len(), 2, PROGRESS).await);
    assert!(seen.iter().all(|p| p.mismatches == 0), "{seen:?}");
    need(src.check_workload_clean());
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
    assert_eq!(
        report.outcome,
        "completed",
        "{:?}; the destination QEMU said:\n{}",
        report.error,
        dst.stderr().tail(30)
    );
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
        qmp_uid: None,
        report: None,
        timeout: MIGRATION,
        progress: dst.spec().serial_log.clone().map(|log| ProgressWatch {
            log,
            marker: DEFAULT_MARKER.into(),
        }),
        working_set: true,
        sweep_rate: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_and_restore_a_running_guest_10_0() {
    let dir = tempfile::Builder::new().prefix("lazy-").tempdir().unwrap();
    let (spec, src, snap) = snapshot_running_guest(QemuVersion::V10_0, dir.path()).await;
    assert!(snap.data_pages > 0);
    assert_eq!(
        snap.caveat, None,
        "no known defect of a 10.0 source applies"
    );
    src.kill().await;
    let snapshot = Snapshot::open(&dir.path().join("snap"), false).expect("open snapshot");
    let dst = destination(&spec, QemuVersion::V10_0, "restored", dir.path()).await;
    let report = restore(&snapshot, &opts(&dst)).await;
    assert!(
        report.requests > 0,
        "a running guest faults on missing pages"
    );
    assert_restored(&dst, &report).await;
    // The first restore recorded what its guest asked for ...
    let recorded = report
        .working_set_recorded
        .expect("the first restore records the working set");
    assert!(recorded > 0);
    assert_eq!(report.working_set_replayed, None);
    dst.kill().await;

    // ... and the next restore of the snapshot streams it first.
    let snapshot = Snapshot::open(&dir.path().join("snap"), false).expect("open snapshot");
    assert_eq!(
        snapshot.working_set.as_ref().map(|s| s.len() as u64),
        Some(recorded)
    );
    let again = destination(&spec, QemuVersion::V10_0, "again", dir.path()).await;
    let replayed = restore(&snapshot, &opts(&again)).await;
    assert_restored(&again, &replayed).await;
    assert_eq!(replayed.working_set_replayed, Some(recorded));
    assert_eq!(
        replayed.working_set_recorded, None,
        "the first record stays"
    );
    assert!(
        replayed.served.working_set_pages > 0,
        "{:?}",
        replayed.served
    );
    // Without it (--no-working-set): nothing replayed, nothing recorded.
    again.kill().await;
    let plain = destination(&spec, QemuVersion::V10_0, "plain", dir.path()).await;
    let mut o = opts(&plain);
    o.working_set = false;
    let r = restore(&snapshot, &o).await;
    assert_restored(&plain, &r).await;
    assert_eq!(
        (r.working_set_replayed, r.working_set_recorded),
        (None, None)
    );
    assert_eq!(r.served.working_set_pages, 0);
    eprintln!(
        "remote faults: {} without a working set, {} recording it, {} replaying it; \
         first progress {:?}, {:?}, {:?} ms",
        r.requests,
        report.requests,
        replayed.requests,
        r.timeline.first_progress_ms,
        report.timeline.first_progress_ms,
        replayed.timeline.first_progress_ms
    );
}

/// A precopy snapshot of a 7.2 guest is taken whole, and its report carries the caveat
/// of 7.2's stale pages (protocol-spec/versions.md#versions-7-2-source-stale-pages).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_precopy_snapshot_of_7_2_is_taken_with_its_caveat() {
    let dir = tempfile::Builder::new().prefix("lazy-").tempdir().unwrap();
    let (_, _, report) = snapshot_running_guest(QemuVersion::V7_2, dir.path()).await;
    assert!(report.source.qemu_version.starts_with("7.2"), "{report:?}");
    assert!(report.caveat.is_some(), "{report:?}");
    let snapshot = Snapshot::open(&dir.path().join("snap"), true).expect("open snapshot");
    assert!(snapshot.meta.blocks.iter().any(|b| b.data_pages > 0));
}

/// QEMU 11.1 at both ends: the sidecar snapshots an 11.1 guest and restores it into an
/// 11.1 destination, playing a source for a release it was not written against.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_and_restore_a_running_guest_11_1() {
    let dir = tempfile::Builder::new().prefix("lazy-").tempdir().unwrap();
    let (spec, src, _) = snapshot_running_guest(QemuVersion::V11_1, dir.path()).await;
    src.kill().await;
    let snapshot = Snapshot::open(&dir.path().join("snap"), true).expect("open snapshot");
    assert!(
        snapshot.meta.source.qemu_version.starts_with("11.1"),
        "{:?}",
        snapshot.meta.source
    );
    let dst = destination(&spec, QemuVersion::V11_1, "restored", dir.path()).await;
    let report = restore(&snapshot, &opts(&dst)).await;
    assert_restored(&dst, &report).await;
}

/// Three clones from one snapshot at once, each sweep paced as for a store they share
/// (`--sweep-rate`): every clone runs clean, and each sweep kept to its rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_clones_restore_concurrently_from_one_snapshot() {
    const RATE: u64 = 64 << 20;
    let dir = tempfile::Builder::new().prefix("lazy-").tempdir().unwrap();
    let (spec, src, _) = snapshot_running_guest(QemuVersion::V10_0, dir.path()).await;
    src.kill().await;
    let snapshot = Arc::new(Snapshot::open(&dir.path().join("snap"), false).unwrap());
    let mut clones = Vec::new();
    for i in 0..3 {
        clones.push(destination(&spec, QemuVersion::V10_0, &format!("clone{i}"), dir.path()).await);
    }
    let paced = |vm: &Vm| RestoreOptions {
        sweep_rate: Some(RATE),
        ..opts(vm)
    };
    let reports = restore_clones(snapshot, clones.iter().map(paced).collect()).await;
    for (vm, report) in clones.iter().zip(&reports) {
        assert_restored(vm, report).await;
        let t = &report.timeline;
        let sweep_ms = t.all_sent_ms.unwrap() - t.package_sent_ms.unwrap();
        let floor_ms = report.served.background_pages.saturating_sub(1) * 4096 * 1000 / RATE;
        assert!(
            report.served.background_pages > 0 && sweep_ms >= floor_ms,
            "{} pages swept in {sweep_ms} ms, faster than {RATE} B/s allows ({floor_ms} ms)",
            report.served.background_pages
        );
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

/// QEMU's background-snapshot: the VM pauses only while its device state is saved and
/// runs through the whole RAM transfer; the snapshot restores like any other.
async fn background_snapshot_keeps_the_vm_running_and_restores(v: QemuVersion) {
    let dir = tempfile::Builder::new().prefix("lazy-").tempdir().unwrap();
    let (spec, src) = running_guest(v, dir.path()).await;
    let stops = src.qmp().event_cursor();
    let report = snapshot(&snapshot_options(
        &src,
        &dir.path().join("snap"),
        SnapshotMode::Background,
        false,
    ))
    .await
    .unwrap_or_else(|e| panic!("snapshot: {e}\nsource stderr:\n{}", src.stderr().tail(20)));
    eprintln!("{}", serde_json::to_string_pretty(&report).unwrap());
    assert_eq!(report.source_after, "running");
    // One short pause for the device state, never the whole transfer.
    let events = src.qmp().events_since(stops);
    let stops_seen = events.iter().filter(|e| e.name == "STOP").count();
    assert_eq!(stops_seen, 1, "{events:?}");
    assert!(report.vm_paused_ms < report.total_ms, "{report:?}");
    assert!(report.stream.device_bytes > 0, "{report:?}");
    assert_source_runs_on(&src).await;
    src.kill().await;
    let snapshot = Snapshot::open(&dir.path().join("snap"), true).expect("open snapshot");
    let dst = destination(&spec, v, "restored", dir.path()).await;
    let report = restore(&snapshot, &opts(&dst)).await;
    assert!(
        report.requests > 0,
        "a running guest faults on missing pages"
    );
    assert_restored(&dst, &report).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_background_snapshot_keeps_the_vm_running_and_restores_10_0() {
    background_snapshot_keeps_the_vm_running_and_restores(QemuVersion::V10_0).await;
}

/// QEMU 7.2 is snapshotted in the background: a precopy snapshot of it would hold the
/// pages its source leaves stale (protocol-spec/versions.md#versions-7-2-source-stale-pages),
/// which the restore would faithfully give back to a guest that may then die.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_background_snapshot_keeps_the_vm_running_and_restores_7_2() {
    background_snapshot_keeps_the_vm_running_and_restores(QemuVersion::V7_2).await;
}

/// Unmounts a tmpfs the test mounted.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .expect("mount")
            .success();
        assert!(ok, "mounting a tmpfs at {} (needs root)", at.display());
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// A disk that fills up mid-snapshot: a clear error naming the file, the VM never stops
/// for good (QEMU restarts it when its migration fails), nothing is left on the disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_the_snapshot_and_the_vm_runs_on_10_0() {
    let dir = tempfile::Builder::new().prefix("lazy-").tempdir().unwrap();
    let (_, src) = running_guest(QemuVersion::V10_0, dir.path()).await;
    let small = Tmpfs::mount(&dir.path().join("small"), "8m");
    let out = small.0.join("snap");
    let ended = src.qmp().event_cursor();
    let err = snapshot(&snapshot_options(&src, &out, SnapshotMode::Precopy, false))
        .await
        .expect_err("8 MiB cannot hold the guest's pages");
    let msg = err.to_string();
    eprintln!("snapshot said: {msg}");
    assert!(msg.contains("No space left on device"), "{msg}");
    assert!(msg.contains("pages.bin"), "{msg}");
    let failed = src
        .qmp()
        .wait_for_event_after(
            ended,
            |e| migration_event_status(e).is_some_and(|s| s == "failed" || s == "cancelled"),
            PROGRESS,
        )
        .await
        .expect("the source's migration fails");
    eprintln!("source: {failed:?}");
    assert!(!out.exists() && !small.0.join("snap.partial").exists());
    assert_source_runs_on(&src).await;
}

/// A snapshot process killed mid-stream: the source's migration fails and its VM runs on;
/// a second run into the same directory clears the dead run's partial directory and
/// succeeds, leaving the VM running (a checkpoint).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_snapshot_leaves_the_vm_running_and_a_rerun_succeeds_10_0() {
    let dir = tempfile::Builder::new().prefix("lazy-").tempdir().unwrap();
    let (_, src) = running_guest(QemuVersion::V10_0, dir.path()).await;
    let out = dir.path().join("snap");
    let partial = dir.path().join("snap.partial");
    let active = src.qmp().event_cursor();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_postcopy-sidecar"))
        .arg("snapshot")
        .arg("--qmp")
        .arg(src.spare_qmp_path())
        .arg("--out")
        .arg(&out)
        .spawn()
        .expect("start the snapshot");
    src.qmp()
        .wait_for_event_after(
            active,
            |e| migration_event_status(e).is_some_and(|s| s == "active"),
            PROGRESS,
        )
        .await
        .expect("the snapshot's migration starts");
    // Pages are being stored: the page store exists once the opening was received.
    let deadline = std::time::Instant::now() + PROGRESS;
    while !partial.join(PAGES_FILE).exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "no page store appeared"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the snapshot ended early"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ended = src.qmp().event_cursor();
    child.kill().unwrap();
    child.wait().unwrap();
    src.qmp()
        .wait_for_event_after(
            ended,
            |e| migration_event_status(e).is_some_and(|s| s == "failed" || s == "cancelled"),
            PROGRESS,
        )
        .await
        .expect("the source's migration fails once the sidecar is gone");
    assert!(!out.exists(), "a dead run never leaves a snapshot behind");
    assert_source_runs_on(&src).await;

    let report = snapshot(&snapshot_options(&src, &out, SnapshotMode::Precopy, false))
        .await
        .unwrap_or_else(|e| panic!("rerun: {e}"));
    eprintln!("{}", serde_json::to_string_pretty(&report).unwrap());
    assert_eq!(report.source_after, "running");
    assert!(!partial.exists());
    Snapshot::open(&out, true).expect("the rerun's snapshot opens and verifies");
    assert_source_runs_on(&src).await;
}

/// Snapshot and lazy restore of a guest whose RAM is on two memfd backends (one per NUMA
/// node), then of one on 2 MiB hugepages, then of one on the `pc` machine: every block is
/// captured and served, a fault on a huge page is answered with the whole huge page, and
/// the restored guest runs clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_and_restore_two_numa_nodes_hugepage_ram_and_the_pc_machine_10_0() {
    for (layout, machine) in [
        (RamLayout::TwoNodes, "q35"),
        (RamLayout::Hugepages2M, "q35"),
        (RamLayout::Single, "pc"),
    ] {
        if layout == RamLayout::Hugepages2M {
            reserve_hugepages(256).expect("reserving 2 MiB hugepages (as root)");
        }
        let dir = tempfile::Builder::new().prefix("lazy-").tempdir().unwrap();
        let spec = source_spec(QemuVersion::V10_0)
            .ram_layout(layout)
            .machine(machine);
        let src = need(Vm::spawn(&spec, dir.path()).await);
        need(src.wait_workload_ready(BOOT).await);
        need(src.wait_progress(src.serial().len(), 1, PROGRESS).await);
        let snap = snapshot(&snapshot_options(
            &src,
            &dir.path().join("snap"),
            SnapshotMode::Precopy,
            true,
        ))
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{}: snapshot: {e}\n{}",
                layout.name(),
                src.stderr().tail(20)
            )
        });
        assert!(snap.data_pages > 0, "{}", layout.name());
        need(src.check_workload_clean());
        src.kill().await;
        let snapshot = Snapshot::open(&dir.path().join("snap"), false).expect("open snapshot");
        let dst = destination(&spec, QemuVersion::V10_0, "restored", dir.path()).await;
        let blocks = dst.qmp().ram_blocks().await.expect("QMP");
        let want = if layout == RamLayout::Hugepages2M {
            2 << 20
        } else {
            4096
        };
        assert!(
            blocks
                .iter()
                .filter(|b| b.name.starts_with('m'))
                .all(|b| b.page_size == want),
            "{}: {blocks:?}",
            layout.name()
        );
        let report = restore(&snapshot, &opts(&dst)).await;
        assert!(
            report.requests > 0,
            "{}: the guest faulted: {report:?}\n{}",
            layout.name(),
            dst.stderr().tail(20)
        );
        assert_restored(&dst, &report).await;
        dst.kill().await;
    }
}
