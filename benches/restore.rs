//! Benchmark (not a test): eager restore by QEMU from a file migration against lazy restore
//! by the sidecar, of the same VM state, in one run.
//!
//! For each size (1 GiB RAM with 256 MiB touched, 4 GiB with 1 GiB touched): boot a guest
//! whose workload fills the touched memory, snapshot it through the sidecar (the source
//! ends paused), then save the same paused state with `migrate file:` (QEMU's own
//! snapshot). Then, alternating per round:
//! - eager: a fresh destination, `migrate-incoming file:...` (QEMU loads all RAM before the
//!   VM can run), `cont` when it completes;
//! - lazy: a fresh destination, `postcopy-sidecar restore` (the VM runs once its device
//!   state has loaded; RAM arrives on demand).
//!
//! Time to running = from the first restore action (lazy: opening the snapshot) to the
//! destination's QMP `RESUME` (QEMU's own timestamp); time to first progress = to the
//! guest's first `WL progress` line on the destination's serial; time to first work = to
//! its second `WL mark` line, when it has processed between one and two more units of
//! `BENCH_MARK_MIB` (the same work for every restore of one snapshot). The progress line
//! follows the guest's clock, which runs on while a vCPU waits for a page, so only the
//! work figure shows what waiting for pages cost the guest.
//!
//! `cargo bench --bench restore` (env: BENCH_ROUNDS, default 3; BENCH_SIZES, default
//! `1024:256,4096:1024` as RAM:touched MiB; BENCH_SWEEP_MIBPS, the lazy restores' sweep
//! rate (`restore --sweep-rate`), default none: a store as slow as a shared one, where
//! what the working set is worth shows; BENCH_MARK_MIB, the unit of work, default 64).
//! Needs `scripts/setup.sh`.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use postcopy_sidecar::lab::{QemuBinary, QemuVersion, Vm, VmSpec, Workload, WorkloadMode};
use postcopy_sidecar::qmp::Qmp;
use postcopy_sidecar::restore::{RestoreOptions, Snapshot, restore};
use postcopy_sidecar::snapshot::take::{SnapshotMode, SnapshotOptions, snapshot};

const LONG: Duration = Duration::from_secs(1200);

/// BENCH_MARK_MIB: the MiB of pages processed per `WL mark` (the guest's `wl.mark_mib`).
fn mark_mib() -> u64 {
    std::env::var("BENCH_MARK_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

/// BENCH_SWEEP_MIBPS as bytes per second.
fn sweep_rate() -> Option<u64> {
    let mib: f64 = std::env::var("BENCH_SWEEP_MIBPS").ok()?.parse().ok()?;
    Some((mib * (1u64 << 20) as f64) as u64)
}

fn wall_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    running_ms: f64,
    progress_ms: f64,
    /// To the guest's second `WL mark`: a fixed amount of work done.
    work_ms: f64,
    all_ram_ms: f64,
    /// Lazy: the destination's page requests (remote faults).
    faults: f64,
}

/// Waits for RESUME on a subscription, returning QEMU's timestamp of it (µs).
async fn resume_at(
    mut rx: tokio::sync::broadcast::Receiver<postcopy_sidecar::qmp::RawEvent>,
) -> u64 {
    loop {
        match tokio::time::timeout(LONG, rx.recv()).await.expect("RESUME") {
            Ok(ev) if ev.name == "RESUME" => return ev.timestamp_us,
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(e) => panic!("QMP events: {e}"),
        }
    }
}

/// When the guest printed its first progress line and when its second work mark.
async fn first_progress(vm: &Vm) -> (Instant, Instant) {
    let timed = async {
        vm.wait_progress(0, 1, LONG).await.expect("first progress");
        Instant::now()
    };
    let work = async {
        vm.wait_marks(0, 2, LONG).await.expect("work marks");
        Instant::now()
    };
    tokio::join!(timed, work)
}

async fn eager(spec: &VmSpec, file: &Path, dir: &Path) -> Sample {
    let dspec = spec
        .destination(QemuBinary::find(QemuVersion::V10_0).unwrap())
        .name("eager");
    let dst = Vm::spawn(&dspec, dir).await.expect("eager destination");
    let qmp: &Qmp = dst.qmp();
    qmp.set_capabilities(&[("events", true)]).await.unwrap();
    let events = qmp.subscribe_raw();
    let cursor = qmp.event_cursor();
    let t0 = Instant::now();
    let t0_wall = wall_us();
    let progress = first_progress(&dst);
    let drive = async {
        qmp.migrate_incoming(&format!("file:{}", file.display()))
            .await
            .expect("migrate-incoming");
        let status = qmp
            .wait_migration_status_after(cursor, &["completed", "failed"], LONG)
            .await
            .expect("incoming end");
        assert_eq!(status, "completed");
        let loaded = t0.elapsed();
        qmp.execute(qapi::qmp::cont {}).await.expect("cont");
        let resumed = resume_at(events).await;
        (loaded, resumed)
    };
    let ((loaded, resumed), p) = tokio::join!(drive, progress);
    let s = Sample {
        running_ms: resumed.saturating_sub(t0_wall) as f64 / 1000.0,
        progress_ms: (p.0 - t0).as_secs_f64() * 1000.0,
        work_ms: (p.1 - t0).as_secs_f64() * 1000.0,
        all_ram_ms: loaded.as_secs_f64() * 1000.0,
        faults: 0.0,
    };
    dst.check_workload_clean().expect("eager guest clean");
    dst.kill().await;
    s
}

/// A lazy restore; `working_set`: replay the snapshot's recorded working set (or record
/// one, the first time).
async fn lazy(spec: &VmSpec, snap: &Path, dir: &Path, working_set: bool) -> Sample {
    let dspec = spec
        .destination(QemuBinary::find(QemuVersion::V10_0).unwrap())
        .name("lazy");
    let dst = Vm::spawn(&dspec, dir).await.expect("lazy destination");
    let events = dst.qmp().subscribe_raw();
    let t0 = Instant::now();
    let t0_wall = wall_us();
    let progress = first_progress(&dst);
    let run = async {
        let snapshot = Arc::new(Snapshot::open(snap, false).expect("snapshot"));
        let r = restore(
            &snapshot,
            &RestoreOptions {
                qmp: dst.spare_qmp_path().to_path_buf(),
                qmp_uid: None,
                report: None,
                timeout: LONG,
                progress: None,
                working_set,
                sweep_rate: sweep_rate(),
            },
        )
        .await;
        assert_eq!(r.outcome, "completed", "{:?}", r.error);
        let t = &r.timeline;
        // Where the time to running goes, to see what grows with RAM size.
        eprintln!(
            "  lazy timeline ms: connected {:?}, package sent {:?}, device state loaded {:?}, running {:?}",
            t.connected_ms, t.package_sent_ms, t.device_state_loaded_ms, t.running_ms
        );
        (t0.elapsed(), resume_at(events).await, r.requests)
    };
    let ((all, resumed, requests), p) = tokio::join!(run, progress);
    let s = Sample {
        running_ms: resumed.saturating_sub(t0_wall) as f64 / 1000.0,
        progress_ms: (p.0 - t0).as_secs_f64() * 1000.0,
        work_ms: (p.1 - t0).as_secs_f64() * 1000.0,
        all_ram_ms: all.as_secs_f64() * 1000.0,
        faults: requests as f64,
    };
    dst.check_workload_clean().expect("lazy guest clean");
    dst.kill().await;
    s
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

struct Row {
    ram: u64,
    touched: u64,
    eager: Sample,
    lazy: Sample,
    /// Lazy, streaming the working set a first restore recorded.
    replay: Sample,
}

async fn size(ram: u64, touched: u64, rounds: usize) -> Row {
    let dir = tempfile::Builder::new()
        .prefix("bench-restore-")
        .tempdir()
        .unwrap();
    let spec = VmSpec::new(QemuBinary::find(QemuVersion::V10_0).unwrap())
        .name("src")
        .ram_mib(ram)
        .linux(Workload {
            mib: touched,
            mode: WorkloadMode::Hot,
            hot_mib: 16,
            seed: 5,
        })
        .kernel_arg(format!("wl.mark_mib={}", mark_mib()));
    let src = Vm::spawn(&spec, dir.path()).await.expect("source");
    src.wait_workload_ready(LONG).await.expect("workload ready");
    src.wait_progress(src.serial().len(), 1, LONG)
        .await
        .unwrap();
    // QEMU's own save (a file migration of the running VM), for the eager restore; then
    // the source runs on and is snapshotted by the sidecar a moment later.
    let file = dir.path().join("eager.mig");
    let q = src.qmp();
    // MIGRATION events, which the wait below is made of, need the `events` capability.
    q.set_capabilities(&[("events", true)]).await.unwrap();
    let cursor = q.event_cursor();
    q.migrate_to(&format!("file:{}", file.display()))
        .await
        .unwrap();
    let st = q
        .wait_migration_status_after(cursor, &["completed", "failed"], LONG)
        .await
        .unwrap();
    assert_eq!(st, "completed", "file migration");
    // QEMU refuses `cont` until the completed migration's cleanup has run ("Migration is
    // not finalized yet"), which follows the `completed` event a moment later.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match q.execute(qapi::qmp::cont {}).await {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline && format!("{e:?}").contains("not finalized") => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("cont after the file migration: {e:?}"),
        }
    }
    src.wait_progress(src.serial().len(), 1, LONG)
        .await
        .unwrap();
    let snap = dir.path().join("snap");
    let taken = snapshot(&SnapshotOptions {
        qmp: src.spare_qmp_path().to_path_buf(),
        qmp_uid: None,
        out: snap.clone(),
        timeout: LONG,
        mode: SnapshotMode::Precopy,
        stop_after: true,
    })
    .await
    .expect("snapshot");
    eprintln!(
        "{ram} MiB: snapshot {} ms, {} data pages; file {} MiB",
        taken.total_ms,
        taken.data_pages,
        std::fs::metadata(&file).unwrap().len() >> 20
    );
    src.kill().await;
    // The first restore with a working set records it (holding the sweep while the guest
    // asks); not counted.
    let recording = lazy(&spec, &snap, dir.path(), true).await;
    eprintln!("{ram} MiB recording restore: {recording:?}");
    let (mut e, mut l, mut w) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..rounds {
        e.push(eager(&spec, &file, dir.path()).await);
        l.push(lazy(&spec, &snap, dir.path(), false).await);
        w.push(lazy(&spec, &snap, dir.path(), true).await);
        eprintln!(
            "{ram} MiB round {}/{rounds}: eager {:?} lazy {:?} replay {:?}",
            i + 1,
            e[i],
            l[i],
            w[i]
        );
    }
    let med = |v: &[Sample]| Sample {
        running_ms: median(v.iter().map(|s| s.running_ms).collect()),
        progress_ms: median(v.iter().map(|s| s.progress_ms).collect()),
        work_ms: median(v.iter().map(|s| s.work_ms).collect()),
        all_ram_ms: median(v.iter().map(|s| s.all_ram_ms).collect()),
        faults: median(v.iter().map(|s| s.faults).collect()),
    };
    Row {
        ram,
        touched,
        eager: med(&e),
        lazy: med(&l),
        replay: med(&w),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let sizes: Vec<(u64, u64)> = std::env::var("BENCH_SIZES")
        .unwrap_or_else(|_| "1024:256,4096:1024".into())
        .split(',')
        .map(|p| {
            let (a, b) = p.split_once(':').expect("RAM:touched");
            (a.parse().unwrap(), b.parse().unwrap())
        })
        .collect();
    let mut rows = Vec::new();
    for (ram, touched) in sizes {
        rows.push(size(ram, touched, rounds).await);
    }
    println!(
        "eager (QEMU migrate-incoming from a file) vs lazy (sidecar restore{}), medians of {rounds} rounds, QEMU 10.0, TCG",
        match sweep_rate() {
            Some(r) => format!(", sweep at {} MiB/s", r >> 20),
            None => String::new(),
        }
    );
    println!(
        "{:>8} {:>8} | {:>11} {:>11} {:>7} | {:>12} {:>12} {:>7} | {:>11} {:>11}",
        "RAM MiB",
        "touched",
        "eager run",
        "lazy run",
        "ratio",
        "eager prog",
        "lazy prog",
        "ratio",
        "eager all",
        "lazy all"
    );
    for r in &rows {
        println!(
            "{:>8} {:>8} | {:>9.1}ms {:>9.1}ms {:>6.1}× | {:>10.1}ms {:>10.1}ms {:>6.1}× | {:>9.0}ms {:>9.0}ms",
            r.ram,
            r.touched,
            r.eager.running_ms,
            r.lazy.running_ms,
            r.eager.running_ms / r.lazy.running_ms.max(0.001),
            r.eager.progress_ms,
            r.lazy.progress_ms,
            r.eager.progress_ms / r.lazy.progress_ms.max(0.001),
            r.eager.all_ram_ms,
            r.lazy.all_ram_ms,
        );
    }
    println!(
        "lazy with the recorded working set vs without, same rounds: remote faults, time to the first \
         (timed) progress line, time to the first {} MiB of work",
        mark_mib()
    );
    println!(
        "{:>8} | {:>9} {:>9} {:>7} | {:>11} {:>11} {:>7} | {:>11} {:>11} {:>7}",
        "RAM MiB",
        "faults",
        "with set",
        "ratio",
        "first prog",
        "with set",
        "ratio",
        "first work",
        "with set",
        "ratio",
    );
    for r in &rows {
        println!(
            "{:>8} | {:>9.0} {:>9.0} {:>6.2}× | {:>9.1}ms {:>9.1}ms {:>6.2}× | {:>9.1}ms {:>9.1}ms {:>6.2}×",
            r.ram,
            r.lazy.faults,
            r.replay.faults,
            r.replay.faults / r.lazy.faults.max(1.0),
            r.lazy.progress_ms,
            r.replay.progress_ms,
            r.replay.progress_ms / r.lazy.progress_ms.max(0.001),
            r.lazy.work_ms,
            r.replay.work_ms,
            r.replay.work_ms / r.lazy.work_ms.max(0.001),
        );
    }
    if rows.len() > 1 {
        let (a, b) = (&rows[0], &rows[rows.len() - 1]);
        println!(
            "lazy time to running, {} MiB vs {} MiB: {:.2}× (flat = 1.0)",
            b.ram,
            a.ram,
            b.lazy.running_ms / a.lazy.running_ms.max(0.001)
        );
    }
}
