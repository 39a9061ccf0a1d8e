//! Smoke tests of the lab against real QEMUs: QMP on 10.0 and 7.2, the Linux guest with
//! its workload, and a direct QEMU 10.0 → 10.0 postcopy migration (no sidecar).
//!
//! They need `scripts/setup.sh` to have run; without it they fail (never skip) with a
//! message saying so. Run them one at a time on small machines:
//! `cargo test --release --test lab_smoke -- --test-threads=1`.

use std::time::{Duration, Instant};

use postcopy_sidecar::lab::{
    Accel, DirectOptions, LabError, QemuBinary, QemuVersion, Vm, VmSpec, Workload, WorkloadMode,
    direct_postcopy,
};
use postcopy_sidecar::qmp::event_name;

const BOOT: Duration = Duration::from_secs(120);
const PROGRESS: Duration = Duration::from_secs(60);

fn need<T>(r: Result<T, LabError>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

fn workdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("lab-smoke-")
        .tempdir()
        .expect("temp dir")
}

/// Guest used by the Linux tests: small enough to boot and migrate in seconds under TCG.
fn guest_spec(name: &str) -> VmSpec {
    VmSpec::new(need(QemuBinary::v10_0()))
        .name(name)
        .ram_mib(256)
        .linux(Workload {
            mib: 64,
            mode: WorkloadMode::Hot,
            hot_mib: 8,
            seed: 7,
        })
}

async fn check_firmware_vm(version: QemuVersion, machine: Option<&str>) {
    let bin = need(QemuBinary::find(version));
    let dir = workdir();
    let mut spec = VmSpec::new(bin)
        .name(format!("fw-{}", version.as_str()))
        .ram_mib(128)
        .firmware_only()
        .accel(Accel::Tcg);
    if let Some(m) = machine {
        spec = spec.machine(m);
    }
    let vm = need(Vm::spawn(&spec, dir.path()).await);
    let q = vm.qmp();

    let (major, minor, _) = q.version().await.expect("query-version");
    assert_eq!(format!("{major}.{minor}"), version.as_str());

    let blocks = q.ram_blocks().await.expect("x-query-ramblock");
    let m = blocks
        .iter()
        .find(|b| b.name == "m")
        .unwrap_or_else(|| panic!("no RAM block `m` in {blocks:?}"));
    assert_eq!(m.used, 128 << 20);
    assert_eq!(m.page_size, 4096);
    assert!(blocks.iter().any(|b| b.name == "pc.bios"), "{blocks:?}");

    let backends = q.memory_backends().await.expect("memory backends");
    assert_eq!(backends.len(), 1, "{backends:?}");
    assert_eq!(backends[0].id, "m");
    assert_eq!(backends[0].qom_type, "memory-backend-memfd");
    assert_eq!(backends[0].size, 128 << 20);
    assert!(backends[0].share);

    let expected_machine = machine.unwrap_or(version.q35_machine());
    assert_eq!(
        q.machine_type().await.expect("machine type"),
        expected_machine
    );
    assert_eq!(q.migrate_status().await.expect("query-migrate"), "none");
    assert_eq!(q.run_state().await.expect("query-status"), "running");

    // A STOP event after `stop`, seen through the cursor-based wait.
    let cursor = q.event_cursor();
    q.execute(qapi::qmp::stop {}).await.expect("stop");
    let ev = q
        .wait_for_event_after(cursor, |e| event_name(e) == "STOP", Duration::from_secs(30))
        .await
        .expect("STOP event");
    assert_eq!(event_name(&ev), "STOP");
    assert_eq!(q.run_state().await.unwrap(), "paused");
    need(vm.quit(Duration::from_secs(30)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qmp_on_qemu_10_0_firmware_vm() {
    check_firmware_vm(QemuVersion::V10_0, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qmp_on_qemu_7_2_firmware_vm() {
    check_firmware_vm(QemuVersion::V7_2, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_10_0_runs_the_7_2_machine_type() {
    check_firmware_vm(QemuVersion::V10_0, Some("pc-q35-7.2")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linux_guest_runs_the_workload() {
    let dir = workdir();
    let t0 = Instant::now();
    // With work marks every 16 MiB processed, as the restore bench counts work.
    let spec = guest_spec("boot").kernel_arg("wl.mark_mib=16");
    let vm = need(Vm::spawn(&spec, dir.path()).await);
    let ready = need(vm.wait_workload_ready(BOOT).await);
    eprintln!(
        "guest ready under {:?} in {:.1}s (fill {} ms)",
        vm.accel(),
        t0.elapsed().as_secs_f64(),
        ready.fill_ms
    );
    assert_eq!(ready.mib, 64);
    assert_eq!(ready.mode, "hot");
    let progress = need(vm.wait_progress(0, 2, PROGRESS).await);
    assert!(progress[1].pages > progress[0].pages, "{progress:?}");
    assert!(progress.iter().all(|p| p.mismatches == 0), "{progress:?}");
    let marks = need(vm.wait_marks(0, 3, PROGRESS).await);
    for (i, m) in marks.iter().enumerate() {
        assert_eq!(m.n, i as u64 + 1, "{marks:?}");
        assert!(
            m.pages >= m.n * 16 * 256,
            "a mark before its work: {marks:?}"
        );
    }
    need(vm.check_workload_clean());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_postcopy_10_0_to_10_0() {
    let dir = workdir();
    let spec = guest_spec("src");
    let src = need(Vm::spawn(&spec, dir.path()).await);
    need(src.wait_workload_ready(BOOT).await);
    need(src.wait_progress(0, 1, PROGRESS).await);

    let dst = need(Vm::spawn(&spec.destination(need(QemuBinary::v10_0())), dir.path()).await);
    assert_eq!(dst.qmp().run_state().await.unwrap(), "inmigrate");
    let dst_cursor = dst.qmp().event_cursor();

    let report = need(direct_postcopy(&src, &dst, &DirectOptions::default()).await);
    eprintln!(
        "direct postcopy: {:.2}s total, postcopy after {:.2}s; source ram: {}",
        report.total.as_secs_f64(),
        report.to_postcopy.as_secs_f64(),
        report.source_info.get("ram").cloned().unwrap_or_default()
    );
    assert_eq!(report.source_info["status"], "completed");
    assert_eq!(report.destination_info["status"], "completed");

    // The destination resumed the guest, which keeps working with no mismatch.
    dst.qmp()
        .wait_for_event_after(dst_cursor, |e| event_name(e) == "RESUME", PROGRESS)
        .await
        .expect("RESUME on the destination");
    let after = need(dst.wait_progress(0, 2, PROGRESS).await);
    assert!(after.iter().all(|p| p.mismatches == 0), "{after:?}");
    // Full verification sweeps prove every page arrived intact, not just the hot set; the
    // second one started entirely on the destination.
    let (first, _) = need(
        dst.wait_serial_after(0, |l| l.starts_with("WL sweep"), PROGRESS)
            .await,
    );
    need(
        dst.wait_serial_after(first + 1, |l| l.starts_with("WL sweep"), PROGRESS)
            .await,
    );
    need(dst.check_workload_clean());
    need(src.check_workload_clean());
    assert_eq!(src.qmp().run_state().await.unwrap(), "postmigrate");
}

/// The detection path works end to end: a bit the guest flips on purpose
/// (`wl.corrupt=1`) comes back as a `WL mismatch` line and fails the clean check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_reports_a_corrupted_word() {
    let dir = workdir();
    let spec = guest_spec("corrupt").kernel_arg("wl.corrupt=1");
    let vm = need(Vm::spawn(&spec, dir.path()).await);
    let line = need(vm.wait_serial(|l| l.starts_with("WL mismatch"), BOOT).await);
    assert!(line.contains("page=0x3 word=5"), "{line}");
    need(vm.wait_progress(0, 1, PROGRESS).await);
    let err = vm
        .check_workload_clean()
        .expect_err("a mismatch must fail the check");
    assert!(err.to_string().contains("page=0x3 word=5"), "{err}");
}

/// Cross-version direct postcopy both ways with the 7.2 machine type: the lab's two QEMUs
/// (and their firmware) are migration-compatible, which the sidecar's cross-version tests
/// build on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_postcopy_across_7_2_and_10_0() {
    for (from, to) in [
        (QemuVersion::V7_2, QemuVersion::V10_0),
        (QemuVersion::V10_0, QemuVersion::V7_2),
    ] {
        let dir = workdir();
        let spec = VmSpec::new(need(QemuBinary::find(from)))
            .name(format!("src-{}", from.as_str()))
            .machine(QemuVersion::V7_2.q35_machine())
            .ram_mib(256)
            .linux(Workload {
                mib: 64,
                mode: WorkloadMode::Seq,
                hot_mib: 8,
                seed: 3,
            });
        let src = need(Vm::spawn(&spec, dir.path()).await);
        need(src.wait_workload_ready(BOOT).await);
        let dst = need(Vm::spawn(&spec.destination(need(QemuBinary::find(to))), dir.path()).await);
        let report = need(direct_postcopy(&src, &dst, &DirectOptions::default()).await);
        eprintln!(
            "direct postcopy {} -> {}: {:.2}s",
            from.as_str(),
            to.as_str(),
            report.total.as_secs_f64()
        );
        let after = need(dst.wait_progress(0, 2, PROGRESS).await);
        assert!(after.iter().all(|p| p.mismatches == 0), "{after:?}");
        need(dst.check_workload_clean());
    }
}

/// A QEMU that refuses its command line fails `spawn` at once with QEMU's own words.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_failure_carries_qemu_stderr() {
    let dir = workdir();
    let spec = VmSpec::new(need(QemuBinary::v10_0()))
        .accel(Accel::Tcg)
        .arg("-no-such-option");
    let t0 = Instant::now();
    let err = Vm::spawn(&spec, dir.path()).await.expect_err("must fail");
    let msg = err.to_string();
    assert!(msg.contains("no-such-option"), "{msg}");
    assert!(t0.elapsed() < Duration::from_secs(30), "{msg}");
}
