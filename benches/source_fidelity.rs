//! Measurement (not a test): does a stock QEMU source deliver its guest's final RAM?
//! (protocol-spec/versions.md#versions-7-2-source-stale-pages)
//!
//! Direct migrations, no sidecar anywhere: a Linux guest rewrites memory on the source,
//! the destination stays paused (`-S`, so nothing on it writes), and after both ends
//! report `completed` every page of the two RAM memfds is compared. The source is stopped
//! then, so a page that differs is one whose last content never reached the destination.
//! Precopy, precopy over 4 multifd channels, and postcopy switched at once (the paused
//! destination never faults, so the source pushes every page after the switch). Two
//! migrations run at once, as the interop suite runs its tests on 2 cores; the figures
//! are how many runs left stale pages, and how many pages each.
//!
//! Why it exists: a guest that died after a QEMU 7.2 migration through the sidecar looked
//! like a byte lost on the sidecar's path; this shows the same loss with no sidecar, from
//! a 7.2 source only, and lets anyone measure another QEMU the same way.
//!
//! `cargo bench --bench source_fidelity` (env: BENCH_ROUNDS, default 4).

use std::os::unix::fs::FileExt;
use std::time::Duration;

use postcopy_sidecar::guard::discover;
use postcopy_sidecar::lab::{
    LabError, QemuBinary, QemuVersion, Vm, VmSpec, Workload, WorkloadMode, free_tcp_port,
};

const BOOT: Duration = Duration::from_secs(180);
const MIGRATION: Duration = Duration::from_secs(300);
const RAM_MIB: u64 = 256;

/// How the migration moves RAM.
#[derive(Clone, Copy, PartialEq)]
enum How {
    Precopy,
    /// Precopy over 4 multifd channels.
    Multifd,
    /// Postcopy from the first moment the migration is active: the paused destination
    /// never faults, so the source pushes every page after the switch.
    Postcopy,
}

#[derive(Clone, Copy)]
struct Pair {
    src: QemuVersion,
    dst: QemuVersion,
    how: How,
}

impl Pair {
    fn name(&self) -> String {
        let how = match self.how {
            How::Precopy => "precopy",
            How::Multifd => "precopy, multifd 4",
            How::Postcopy => "postcopy",
        };
        format!("{} → {}, {how}", self.src.as_str(), self.dst.as_str())
    }
}

fn need<T>(r: Result<T, LabError>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

/// The guest's RAM memfd of `vm` (one memfd backend).
async fn ram(vm: &Vm) -> std::fs::File {
    let q = vm.qmp();
    let blocks = q.ram_blocks().await.expect("query the RAM blocks");
    let backends = q.memory_backends().await.expect("query the backends");
    let mut files = discover::ram_files(vm.pid(), &blocks, &backends).expect("the RAM memfd");
    files.remove(0).file
}

/// One direct precopy migration; returns how many pages differ afterwards.
async fn stale_pages(p: Pair) -> usize {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut spec = VmSpec::new(need(QemuBinary::find(p.src)))
        .name("src")
        .ram_mib(RAM_MIB)
        .linux(Workload {
            mib: 96,
            mode: WorkloadMode::Hot,
            hot_mib: 16,
            seed: 11,
        });
    if p.src != p.dst {
        spec = spec.machine(QemuVersion::V7_2.q35_machine());
    }
    let dspec = spec.destination(need(QemuBinary::find(p.dst))).paused(true);
    let src = need(Vm::spawn(&spec, dir.path()).await);
    need(src.wait_workload_ready(BOOT).await);
    need(src.wait_progress(src.serial().len(), 1, BOOT).await);
    let dst = need(Vm::spawn(&dspec, dir.path()).await);
    let mut caps = vec![("events", true)];
    match p.how {
        How::Precopy => {}
        How::Multifd => caps.push(("multifd", true)),
        How::Postcopy => caps.extend([("postcopy-ram", true), ("return-path", true)]),
    }
    for vm in [&src, &dst] {
        vm.qmp()
            .set_capabilities(&caps)
            .await
            .expect("capabilities");
        if p.how == How::Multifd {
            vm.qmp()
                .set_parameters(serde_json::json!({ "multifd-channels": 4 }))
                .await
                .expect("parameters");
        }
    }
    let uri = format!("tcp:127.0.0.1:{}", free_tcp_port().expect("a port"));
    let (sc, dc) = (src.qmp().event_cursor(), dst.qmp().event_cursor());
    dst.qmp()
        .migrate_incoming(&uri)
        .await
        .expect("migrate-incoming");
    src.qmp().migrate_to(&uri).await.expect("migrate");
    if p.how == How::Postcopy {
        src.qmp()
            .wait_migration_status_after(sc, &["active"], MIGRATION)
            .await
            .expect("the migration starts");
        src.qmp()
            .execute(qapi::qmp::migrate_start_postcopy {})
            .await
            .expect("migrate-start-postcopy");
    }
    for (vm, c) in [(&src, sc), (&dst, dc)] {
        let s = vm
            .qmp()
            .wait_migration_status_after(c, &["completed", "failed", "cancelled"], MIGRATION)
            .await
            .expect("the migration ends");
        assert_eq!(s.as_str(), "completed", "{}", p.name());
    }
    // Stopped: `postmigrate` after precopy, still `finish-migrate` after postcopy.
    let state = src.qmp().run_state().await.expect("QMP");
    assert!(
        ["postmigrate", "finish-migrate"].contains(&state.as_str()),
        "the source is {state}"
    );
    let (a, b) = (ram(&src).await, ram(&dst).await);
    let (mut x, mut y) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut stale = 0;
    for off in (0..RAM_MIB << 20).step_by(1 << 20) {
        a.read_exact_at(&mut x, off).expect("read the source");
        b.read_exact_at(&mut y, off).expect("read the destination");
        stale += x
            .chunks(4096)
            .zip(y.chunks(4096))
            .filter(|(s, d)| s != d)
            .count();
    }
    stale
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let (v7, v10) = (QemuVersion::V7_2, QemuVersion::V10_0);
    let pair = |src, dst, how| Pair { src, dst, how };
    let pairs = [
        pair(v7, v7, How::Precopy),
        pair(v7, v7, How::Multifd),
        pair(v7, v7, How::Postcopy),
        pair(v7, v10, How::Precopy),
        pair(v10, v7, How::Precopy),
        pair(v10, v10, How::Precopy),
        pair(v10, v10, How::Multifd),
        pair(v10, v10, How::Postcopy),
    ];
    println!("| source → destination | runs with stale pages | stale pages per run |");
    println!("|---|---|---|");
    for p in pairs {
        let mut counts = Vec::new();
        for _ in 0..rounds {
            let (one, two) = tokio::join!(stale_pages(p), stale_pages(p));
            counts.extend([one, two]);
        }
        let hit: Vec<_> = counts.iter().filter(|&&n| n > 0).collect();
        println!(
            "| {} | {} of {} | {:?} |",
            p.name(),
            hit.len(),
            counts.len(),
            counts
        );
    }
}
