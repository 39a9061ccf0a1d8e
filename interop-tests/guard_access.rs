//! Guarded access to the destination's shared guest RAM, against real QEMU and a real Linux
//! guest (protocol-spec/guarded-access.md):
//! - a plain read of the destination's memfd during postcopy breaks the migration (the
//!   hazard the guard exists for);
//! - the sidecar's guarded reads during the same kind of migration keep it whole, and every
//!   page they return equals the source's;
//! - `receive --verify` finds no mismatch, and `postcopy-sidecar verify` finds a page we
//!   corrupt on purpose;
//! - the at-placement check with a running guest, on QEMU 10.0 and 7.2.
//!
//! They need `scripts/setup.sh` to have run; without it they fail (never skip).

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use postcopy_sidecar::daemon::receive::{GuardSlot, Listen, ReceiveOptions, receive_on};
use postcopy_sidecar::daemon::report::Report;
use postcopy_sidecar::guard::{GuardedRam, RamFile, discover, probe};
use postcopy_sidecar::lab::{
    LabError, QemuBinary, QemuVersion, RamLayout, Vm, VmSpec, Workload, WorkloadMode,
    reserve_hugepages,
};
use postcopy_sidecar::qmp::Qmp;
use postcopy_sidecar::source::{SendOptions, SendReport, send};

const BOOT: Duration = Duration::from_secs(180);
const MIGRATION: Duration = Duration::from_secs(300);
const PROGRESS: Duration = Duration::from_secs(120);
const PAGE: u64 = 4096;

fn need<T>(r: Result<T, LabError>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

/// A source guest that has filled its memory, and a destination for it.
struct Pair {
    src: Vm,
    dst: Vm,
    dir: tempfile::TempDir,
}

async fn pair(version: QemuVersion, paused_destination: bool, mode: WorkloadMode) -> Pair {
    pair_on(version, paused_destination, mode, RamLayout::Single).await
}

async fn pair_on(
    version: QemuVersion,
    paused_destination: bool,
    mode: WorkloadMode,
    layout: RamLayout,
) -> Pair {
    let dir = tempfile::Builder::new().prefix("guard-").tempdir().unwrap();
    if layout == RamLayout::Hugepages2M {
        // 256 MiB on each side.
        reserve_hugepages(256).expect("reserving 2 MiB hugepages (as root)");
    }
    let spec = VmSpec::new(need(QemuBinary::find(version)))
        .name("src")
        .ram_mib(256)
        .ram_layout(layout)
        .linux(Workload {
            mib: 96,
            mode,
            hot_mib: 16,
            seed: 17,
        });
    let src = need(Vm::spawn(&spec, dir.path()).await);
    need(src.wait_workload_ready(BOOT).await);
    need(src.wait_progress(src.serial().len(), 1, PROGRESS).await);
    let dspec = spec
        .destination(need(QemuBinary::find(version)))
        .paused(paused_destination);
    let dst = need(Vm::spawn(&dspec, dir.path()).await);
    Pair { src, dst, dir }
}

/// Checks that the guest RAM is in the layout's blocks, on the layout's pages, so a test
/// on hugepages or two nodes cannot pass on one 4 KiB block.
async fn assert_page_size(vm: &Vm, layout: RamLayout) {
    let blocks = vm.qmp().ram_blocks().await.expect("QMP");
    let names: &[&str] = if layout == RamLayout::TwoNodes {
        &["m0", "m1"]
    } else {
        &["m"]
    };
    let want = if layout == RamLayout::Hugepages2M {
        2 << 20
    } else {
        4096
    };
    for name in names {
        let b = blocks.iter().find(|b| b.name == *name).expect("the block");
        assert_eq!(b.page_size, want, "block {name}'s page size");
    }
}

/// Caps the source's postcopy bandwidth so that pages stay missing on the destination for
/// seconds: what the reads below race against.
async fn slow_postcopy(q: &Qmp, bytes_per_s: u64) {
    q.execute(qapi::qmp::migrate_set_parameters(
        qapi::qmp::MigrateSetParameters {
            max_postcopy_bandwidth: Some(bytes_per_s),
            ..Default::default()
        },
    ))
    .await
    .expect("migrate-set-parameters");
}

/// Starts the sidecar on the destination and the migration on the source.
async fn migrate(
    p: &Pair,
    opts: impl FnOnce(ReceiveOptions) -> ReceiveOptions,
) -> (
    tokio::task::JoinHandle<Result<Report, postcopy_sidecar::daemon::receive::ReceiveError>>,
    tokio::task::JoinHandle<SendReport>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let base = ReceiveOptions {
        allow_paused: true,
        ..ReceiveOptions::new(p.dst.spare_qmp_path(), Listen::At(addr))
    };
    let sidecar = tokio::spawn(receive_on(listener, opts(base)));
    let qmp = p.src.spare_qmp_path().to_path_buf();
    let source = tokio::spawn(async move {
        send(&SendOptions {
            qmp,
            to: addr,
            postcopy_after: Some(Duration::from_millis(500)),
            preempt: false,
            multifd: None,
            timeout: MIGRATION,
        })
        .await
        .expect("source QMP")
    });
    (sidecar, source)
}

/// Waits for both ends of the migration and checks that both completed.
async fn both_completed(
    sidecar: tokio::task::JoinHandle<
        Result<Report, postcopy_sidecar::daemon::receive::ReceiveError>,
    >,
    source: tokio::task::JoinHandle<SendReport>,
) -> Report {
    let report = tokio::time::timeout(MIGRATION, sidecar)
        .await
        .unwrap()
        .unwrap()
        .expect("sidecar");
    eprintln!("{}", report.table());
    assert_eq!(report.outcome, "completed", "{:?}", report.error);
    assert_eq!(source.await.unwrap().status, "completed");
    report
}

fn memfd_of(
    vm: &Vm,
    blocks: &[postcopy_sidecar::qmp::RamBlock],
    backends: &[postcopy_sidecar::qmp::MemoryBackend],
) -> RamFile {
    let mut files = discover::ram_files(vm.pid(), blocks, backends).expect("the guest RAM memfd");
    assert_eq!(files.len(), 1, "one memfd backend");
    files.remove(0)
}

async fn ram_file(vm: &Vm) -> RamFile {
    let q = vm.qmp();
    memfd_of(
        vm,
        &q.ram_blocks().await.unwrap(),
        &q.memory_backends().await.unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_naive_read_during_postcopy_breaks_the_migration() {
    let p = pair(QemuVersion::V10_0, true, WorkloadMode::Hot).await;
    slow_postcopy(p.src.qmp(), 4 << 20).await;
    let cursor = p.dst.qmp().event_cursor();
    let (sidecar, source) = migrate(&p, |o| o).await;
    p.dst
        .qmp()
        .wait_migration_status_after(cursor, &["postcopy-active"], MIGRATION)
        .await
        .expect("postcopy starts");

    // What any process may do with a shared memfd: map it and read.
    let ram = ram_file(&p.dst).await;
    let holes: Vec<u64> = (0..ram.length / PAGE)
        .map(|i| i * PAGE)
        .filter(|&o| !probe::is_present(&ram.file, o).unwrap())
        .collect();
    assert!(holes.len() > 1000, "only {} pages missing", holes.len());
    let len = std::num::NonZeroUsize::new(ram.length as usize).unwrap();
    // SAFETY: a read-only shared mapping of the destination's memfd, unmapped below.
    let map = unsafe {
        nix::sys::mman::mmap(
            None,
            len,
            nix::sys::mman::ProtFlags::PROT_READ,
            nix::sys::mman::MapFlags::MAP_SHARED,
            &ram.file,
            0,
        )
        .unwrap()
    };
    for &o in &holes {
        // SAFETY: inside the mapping. (Some of these pages arrive between the look and
        // the read; every other read allocates a zero page in the memfd.)
        std::hint::black_box(unsafe {
            std::ptr::read_volatile(map.as_ptr().cast::<u8>().add(o as usize))
        });
    }
    // SAFETY: the mapping made above.
    unsafe { nix::sys::mman::munmap(map, ram.length as usize).unwrap() };

    // The next page the source sends for one of those addresses cannot be placed.
    let status = p
        .dst
        .qmp()
        .wait_migration_status_after(
            cursor,
            &["postcopy-paused", "failed", "completed"],
            MIGRATION,
        )
        .await
        .expect("the destination's migration ends or pauses");
    assert_ne!(
        status, "completed",
        "the naive reads did not break the migration"
    );
    let stderr = p.dst.stderr().tail(40);
    assert!(
        // EEXIST: the page was already there when QEMU placed it.
        stderr.contains("uffd_copy_page() failed") && stderr.contains("errno=17"),
        "QEMU's placement failed for another reason:\n{stderr}"
    );
    let report = tokio::time::timeout(MIGRATION, sidecar)
        .await
        .expect("the sidecar ends")
        .unwrap();
    let failed = match report {
        Ok(r) => r.error.is_some(),
        Err(_) => true,
    };
    assert!(failed, "the sidecar must report the broken migration");
    source.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guarded_reads_during_postcopy_keep_the_migration_whole_and_equal_the_source() {
    guarded_reads_during_postcopy(RamLayout::Single).await;
}

/// The same on 2 MiB hugetlb pages, where the guard faults, asks for and wakes whole huge
/// pages and looks for them in QEMU's mapping (protocol-spec/guarded-access.md#guard-hugepages).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guarded_reads_during_postcopy_on_hugepage_ram_keep_the_migration_whole_10_0() {
    let report = guarded_reads_during_postcopy(RamLayout::Hugepages2M).await;
    // Each guard request is a whole huge page of 512 target pages.
    let r = &report.requests;
    assert!(
        r.guard_pages >= 512 * r.guard_forwarded_messages,
        "{} guard pages in {} requests",
        r.guard_pages,
        r.guard_forwarded_messages
    );
}

/// Reads every page of the paused destination through the guard while postcopy runs and
/// compares each with the source's; then the exact check.
async fn guarded_reads_during_postcopy(layout: RamLayout) -> Report {
    let p = pair_on(QemuVersion::V10_0, true, WorkloadMode::Hot, layout).await;
    assert_page_size(&p.dst, layout).await;
    slow_postcopy(p.src.qmp(), 32 << 20).await;
    let src_ram = ram_file(&p.src).await;
    let cursor = p.dst.qmp().event_cursor();
    let slot: GuardSlot = Arc::default();
    let s = slot.clone();
    let (sidecar, source) = migrate(&p, move |o| ReceiveOptions {
        guard_slot: Some(s),
        verify: true,
        ..o
    })
    .await;
    p.dst
        .qmp()
        .wait_migration_status_after(cursor, &["postcopy-active"], MIGRATION)
        .await
        .expect("postcopy starts");
    let guard: Arc<GuardedRam> = slot.get().expect("the sidecar guards the RAM").clone();
    let block = guard.block_index("m").expect("block m is guarded");
    let length = guard.blocks()[block].1;

    // Read every page, last first: the source's background sweep goes the other way, so
    // many of these reads find their page missing and must have it asked for.
    let reads = tokio::task::spawn_blocking(move || {
        let (mut page, mut want) = (vec![0u8; PAGE as usize], vec![0u8; PAGE as usize]);
        let mut differ = Vec::new();
        // What each read returned, to explain a later mismatch.
        let mut seen = std::collections::HashMap::new();
        for i in (0..length / PAGE).rev() {
            let o = i * PAGE;
            guard.read_page(block, o, &mut page).expect("guarded read");
            probe::read_at(&src_ram.file, o, &mut want).unwrap();
            seen.insert(o, xxhash_rust::xxh3::xxh3_64(&page));
            if page != want {
                differ.push(o);
            }
        }
        (differ, guard.figures(), seen, src_ram)
    });
    let (differ, figures, seen, src_ram) = tokio::time::timeout(MIGRATION, reads)
        .await
        .unwrap()
        .unwrap();
    eprintln!("guard: {figures:?}");
    assert!(
        differ.is_empty(),
        "{} pages differ from the source, first {:#x?}",
        differ.len(),
        &differ[..differ.len().min(8)]
    );
    assert!(figures.faults > 0, "no read found a missing page");
    assert!(figures.requested > 0, "no page had to be asked for");

    let report = both_completed(sidecar, source).await;
    assert!(report.requests.guard_forwarded_messages > 0);
    let v = report.verify.clone().expect("verify figures");
    let exact = v.exact.expect("an exact check: the destination is paused");
    if exact.mismatches > 0 {
        // Tell a wrong record from a changed destination page: both against the source.
        let dst_ram = ram_file(&p.dst).await;
        let mut b = vec![0u8; PAGE as usize];
        for m in &exact.listed {
            let mut digest = |f: &std::fs::File| {
                probe::read_at(f, m.offset, &mut b).unwrap();
                xxhash_rust::xxh3::xxh3_64(&b)
            };
            let (src, dst) = (digest(&src_ram.file), digest(&dst_ram.file));
            eprintln!(
                "mismatch {:#x}: record {}, destination {dst:016x}, source {src:016x}, read during postcopy {:016x}",
                m.offset, m.expected, seen[&m.offset]
            );
        }
    }
    assert_eq!(exact.mismatches, 0, "{:?}", exact.listed);
    assert_eq!(exact.pages, length / PAGE);
    let placed = v.at_placement.expect("at-placement figures");
    assert_eq!(placed.mismatches, 0, "{:?}", placed.listed);
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_finds_no_mismatch_then_finds_a_page_corrupted_on_purpose() {
    let p = pair(QemuVersion::V10_0, true, WorkloadMode::Hot).await;
    let digests = p.dir.path().join("digests");
    let d = digests.clone();
    let (sidecar, source) = migrate(&p, move |o| ReceiveOptions {
        verify: true,
        digests: Some(d),
        ..o
    })
    .await;
    let report = both_completed(sidecar, source).await;
    let exact = report.verify.unwrap().exact.expect("exact check");
    assert_eq!(exact.mismatches, 0, "{:?}", exact.listed);

    let cli = env!("CARGO_BIN_EXE_postcopy-sidecar");
    let run = |args: &[&str]| {
        std::process::Command::new(cli)
            .args(args)
            .output()
            .expect("running postcopy-sidecar verify")
    };
    let qmp = p.dst.spare_qmp_path().to_str().unwrap().to_string();
    let dg = digests.to_str().unwrap().to_string();
    let ok = run(&["verify", "--qmp", &qmp, "--digests", &dg]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("0 mismatching"));

    // Corrupt one data page of the paused destination, as a bad placement would.
    let ram = ram_file(&p.dst).await;
    let victim = (0..ram.length / PAGE)
        .map(|i| i * PAGE)
        .rev()
        .find(|&o| {
            let mut b = vec![0u8; PAGE as usize];
            probe::read_at(&ram.file, o, &mut b).unwrap();
            b.iter().any(|&x| x != 0)
        })
        .expect("a data page");
    let rw = std::fs::OpenOptions::new()
        .write(true)
        .open(&ram.path)
        .unwrap();
    let mut byte = [0u8; 1];
    ram.file.read_exact_at(&mut byte, victim + 123).unwrap();
    rw.write_all_at(&[byte[0] ^ 0xff], victim + 123).unwrap();

    let bad = run(&["verify", "--qmp", &qmp, "--digests", &dg]);
    let out = String::from_utf8_lossy(&bad.stdout);
    assert_eq!(bad.status.code(), Some(1), "{out}");
    assert!(out.contains("1 mismatching"), "{out}");
    assert!(
        out.contains(&format!("mismatch: block m offset {victim:#x}")),
        "{out}"
    );
    // A running guest is refused unless asked for.
    p.dst.qmp().execute(qapi::qmp::cont {}).await.unwrap();
    let running = run(&["verify", "--qmp", &qmp, "--digests", &dg]);
    assert_eq!(running.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&running.stderr).contains("--allow-running"));
}

async fn running_guest_verified_at_placement(version: QemuVersion, layout: RamLayout) {
    // A guest that writes little after its fill: the at-placement check reads each page
    // right after QEMU placed it, and every write the guest makes in between shows as a
    // mismatch that is not corruption (protocol-spec/guarded-access.md#guard-verify).
    let p = pair_on(version, false, WorkloadMode::Idle, layout).await;
    assert_page_size(&p.dst, layout).await;
    let (sidecar, source) = migrate(&p, |o| ReceiveOptions {
        verify: true,
        allow_paused: false,
        ..o
    })
    .await;
    let report = both_completed(sidecar, source).await;
    let v = report.verify.expect("verify figures");
    assert!(v.exact.is_none(), "no exact check of a running guest");
    let placed = v.at_placement.expect("at-placement figures");
    eprintln!(
        "at placement: {} pages, {} mismatching: {:?}",
        placed.pages, placed.mismatches, placed.listed
    );
    assert!(
        placed.pages > 1000,
        "only {} postcopy pages checked",
        placed.pages
    );
    if layout == RamLayout::TwoNodes {
        assert!(
            ["m0", "m1"]
                .iter()
                .all(|b| placed.blocks.iter().any(|x| x == b)),
            "both nodes checked: {:?}",
            placed.blocks
        );
    }
    // Not zero by definition: the running guest may write a page between QEMU's placement
    // and the check. An idle guest writes few; corruption of the stream would show on
    // every page.
    assert!(
        placed.mismatches * 100 <= placed.pages,
        "{} of {} pages differ",
        placed.mismatches,
        placed.pages
    );
    let seen = need(p.dst.wait_progress(0, 2, PROGRESS).await);
    assert!(seen.iter().all(|x| x.mismatches == 0), "{seen:?}");
    need(p.dst.check_workload_clean());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_guest_verified_at_placement_10_0() {
    running_guest_verified_at_placement(QemuVersion::V10_0, RamLayout::Single).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_guest_verified_at_placement_7_2_memfd_found_by_size() {
    running_guest_verified_at_placement(QemuVersion::V7_2, RamLayout::Single).await;
}

/// Hugepage RAM with a running guest: each huge page is read through the guard as soon
/// as QEMU placed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_guest_on_hugepage_ram_verified_at_placement_10_0() {
    running_guest_verified_at_placement(QemuVersion::V10_0, RamLayout::Hugepages2M).await;
}

/// Two memfd backends (two NUMA nodes): both guarded, each placed page of either read
/// through the guard as soon as QEMU placed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_guest_on_two_numa_nodes_verified_at_placement_10_0() {
    running_guest_verified_at_placement(QemuVersion::V10_0, RamLayout::TwoNodes).await;
}

/// QEMU 7.2 prints no block address: the guard finds QEMU's mapping of the hugetlbfs memfd
/// in `/proc/PID/maps` by its inode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_guest_on_hugepage_ram_verified_at_placement_7_2() {
    running_guest_verified_at_placement(QemuVersion::V7_2, RamLayout::Hugepages2M).await;
}
