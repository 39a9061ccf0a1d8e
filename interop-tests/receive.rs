//! Migrations of a real Linux guest through the sidecar, between stock QEMUs on loopback.
//!
//! Each case asserts: the migration completed, the guest kept running on the destination
//! and reports zero mismatches afterwards, and the sidecar's count of page requests equals
//! what the destination actually sent (counted independently from the destination QEMU's
//! own `migrate_send_rp_message` trace on its stderr) and what the source received
//! (`postcopy-requests`). QEMU runs under KVM where it boots the guest, TCG otherwise.
//!
//! They need `scripts/setup.sh` to have run; without it they fail (never skip).

use std::os::unix::fs::FileExt;
use std::time::Duration;

use postcopy_sidecar::daemon::receive::{Listen, ReceiveOptions, receive_on};
use postcopy_sidecar::daemon::report::Report;
use postcopy_sidecar::lab::{
    LabError, QemuBinary, QemuVersion, RamLayout, Vm, VmSpec, Workload, WorkloadMode,
    reserve_hugepages,
};
use postcopy_sidecar::source::{SendOptions, SendReport, send};

const BOOT: Duration = Duration::from_secs(180);
const MIGRATION: Duration = Duration::from_secs(300);
const PROGRESS: Duration = Duration::from_secs(120);

fn need<T>(r: Result<T, LabError>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Precopy,
    Postcopy,
    Preempt,
    /// The source has no preempt; the sidecar opens the destination's preempt channel.
    OwnPreempt,
}

#[derive(Clone, Copy, Debug)]
struct Case {
    src: QemuVersion,
    dst: QemuVersion,
    /// Machine type when source and destination differ in version.
    machine: Option<&'static str>,
    linux: bool,
    mode: Mode,
    /// Destination started with -S: the guest cannot write, so RAM must match the source's.
    paused_destination: bool,
    /// The guest touches 64 MiB at random and postcopy starts at once: faults all over,
    /// on pages the sidecar holds and on pages the source has yet to send.
    random: bool,
    /// The source migrates with multifd and this many channels.
    multifd: Option<u8>,
    /// How guest RAM is split into memfd backends.
    layout: RamLayout,
    /// The sidecar checks placements (and with a paused destination the whole RAM).
    verify: bool,
}

impl Case {
    fn postcopy(v: QemuVersion) -> Case {
        Case {
            src: v,
            dst: v,
            machine: None,
            linux: true,
            mode: Mode::Postcopy,
            paused_destination: false,
            random: false,
            multifd: None,
            layout: RamLayout::Single,
            verify: false,
        }
    }
}

struct Outcome {
    report: Report,
    source: SendReport,
    dst_requests_sent: u64,
    /// The source's MIGRATION statuses, in order.
    source_states: Vec<String>,
    src: Vm,
    dst: Vm,
    _dir: tempfile::TempDir,
}

/// Destination requests as QEMU itself logs them: RP message types 3 (REQ_PAGES_ID) and 4.
fn requests_in_trace(vm: &Vm) -> u64 {
    vm.stderr()
        .lines()
        .iter()
        .filter(|l| {
            l.contains("migrate_send_rp_message 3:") || l.contains("migrate_send_rp_message 4:")
        })
        .count() as u64
}

async fn run(case: Case) -> Outcome {
    let dir = tempfile::Builder::new()
        .prefix("receive-")
        .tempdir()
        .expect("temp dir");
    if case.layout == RamLayout::Hugepages2M {
        // 256 MiB on each side.
        reserve_hugepages(256).expect("reserving 2 MiB hugepages (as root)");
    }
    let mut spec = VmSpec::new(need(QemuBinary::find(case.src)))
        .name("src")
        .ram_mib(256)
        .ram_layout(case.layout);
    if let Some(m) = case.machine {
        spec = spec.machine(m);
    }
    spec = if case.random {
        spec.linux(Workload {
            mib: 64,
            mode: WorkloadMode::Random,
            hot_mib: 1,
            seed: 11,
        })
    } else if case.linux {
        spec.linux(Workload {
            mib: 96,
            mode: WorkloadMode::Hot,
            hot_mib: 16,
            seed: 11,
        })
    } else {
        spec.firmware_only()
    };
    let mut dspec = spec
        .destination(need(QemuBinary::find(case.dst)))
        .paused(case.paused_destination);
    if case.dst != QemuVersion::V7_2 {
        dspec = dspec.arg("-trace").arg("migrate_send_rp_message");
    }
    if case.dst == QemuVersion::V11_1 {
        // PING values as the destination's main thread loads them (the 10.2 package PING).
        dspec = dspec.arg("-trace").arg("loadvm_process_command_ping");
    }
    let src = need(Vm::spawn(&spec, dir.path()).await);
    if case.linux {
        need(src.wait_workload_ready(BOOT).await);
        need(src.wait_progress(src.serial().len(), 1, PROGRESS).await);
    }
    let dst = need(Vm::spawn(&dspec, dir.path()).await);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().unwrap();
    let preempt = case.mode == Mode::Preempt;
    let src_events = src.qmp().event_cursor();
    let sidecar = tokio::spawn(receive_on(
        listener,
        ReceiveOptions {
            preempt,
            own_preempt: case.mode == Mode::OwnPreempt,
            multifd: case.multifd,
            verify: case.verify,
            report: Some(dir.path().join("report.json")),
            allow_paused: case.paused_destination,
            ..ReceiveOptions::new(dst.spare_qmp_path(), Listen::At(addr))
        },
    ));
    let source = send(&SendOptions {
        qmp: src.spare_qmp_path().to_path_buf(),
        to: addr,
        postcopy_after: (case.mode != Mode::Precopy).then_some(if case.random {
            Duration::ZERO
        } else {
            Duration::from_millis(500)
        }),
        preempt,
        multifd: case.multifd,
        timeout: MIGRATION,
    })
    .await
    .expect("source QMP");
    let report = tokio::time::timeout(MIGRATION, sidecar)
        .await
        .expect("sidecar finishes")
        .expect("sidecar task")
        .unwrap_or_else(|e| panic!("sidecar: {e}\nsource: {source:?}"));
    eprintln!("{}", report.table());
    assert_eq!(source.status, "completed", "source: {source:?}");
    assert_eq!(report.outcome, "completed", "{:?}", report.error);
    assert_eq!(report.destination.migration_status, "completed");
    let dst_requests_sent = requests_in_trace(&dst);
    let source_states = src
        .qmp()
        .events_since(src_events)
        .iter()
        .filter(|e| e.name == "MIGRATION")
        .filter_map(|e| e.data["status"].as_str().map(str::to_string))
        .collect();
    Outcome {
        report,
        source,
        dst_requests_sent,
        source_states,
        src,
        dst,
        _dir: dir,
    }
}

/// The guest runs on the destination, makes progress, and has never seen a wrong word.
async fn assert_guest_healthy(o: &Outcome) {
    // Every destination serial line comes after the switch: two fresh progress lines.
    let seen = need(o.dst.wait_progress(0, 2, PROGRESS).await);
    assert!(seen.iter().all(|p| p.mismatches == 0), "{seen:?}");
    need(o.dst.check_workload_clean());
    need(o.src.check_workload_clean());
}

/// The sidecar's exact check ran (the destination stayed paused) and found every page it
/// compared equal to what it delivered.
fn exact_check_clean(o: &Outcome) -> postcopy_sidecar::verify::VerifyReport {
    let exact = o
        .report
        .verify
        .clone()
        .and_then(|v| v.exact)
        .expect("an exact check: the destination is paused");
    eprintln!(
        "exact check: {} pages of {:?}, {} differ",
        exact.pages, exact.blocks, exact.mismatches
    );
    assert_eq!(exact.mismatches, 0, "{:?}", exact.listed);
    exact
}

fn assert_request_counts(o: &Outcome, dst_traced: bool) {
    let r = &o.report.requests;
    if dst_traced {
        assert_eq!(
            r.messages, o.dst_requests_sent,
            "sidecar saw {} requests, the destination sent {}",
            r.messages, o.dst_requests_sent
        );
    }
    // The source counts every request message it gets: the destination's the sidecar
    // passed on (with any prefetch window), and those that only asked ahead.
    assert_eq!(
        Some(r.forwarded_messages + r.prefetch_messages),
        o.source.postcopy_requests,
        "sidecar forwarded {} requests and {} prefetches, the source received {:?}",
        r.forwarded_messages,
        r.prefetch_messages,
        o.source.postcopy_requests
    );
    assert_eq!(
        r.pages,
        r.forwarded_pages + r.deduplicated_pages + r.already_delivered_pages
    );
    assert_eq!(r.outstanding_pages, 0, "requests never answered: {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_10_0_running_guest_through_the_sidecar() {
    let o = run(Case::postcopy(QemuVersion::V10_0)).await;
    assert!(o.report.timeline.run_ms.is_some(), "no POSTCOPY_RUN seen");
    assert!(o.report.postcopy.pages > 0);
    assert_request_counts(&o, true);
    assert_guest_healthy(&o).await;
}

/// The sidecar's queue (protocol-spec/postcopy-sequence.md#sequence-requests-first): a
/// guest touching memory at random from the start of postcopy faults on pages the sidecar
/// holds and on pages the source has yet to send; both pass the bulk queued ahead of them,
/// each page still arrives once, and the guest never sees a wrong word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requested_pages_pass_the_sidecars_queue_10_0() {
    let o = run(Case {
        random: true,
        ..Case::postcopy(QemuVersion::V10_0)
    })
    .await;
    assert!(o.report.timeline.run_ms.is_some(), "no POSTCOPY_RUN seen");
    assert_request_counts(&o, true);
    let (r, q) = (&o.report.requests, &o.report.requests_first);
    assert!(r.forwarded_messages > 0, "the guest faulted: {r:?}");
    assert!(q.promoted_pages > 0, "requested pages went ahead: {q:?}");
    assert_guest_healthy(&o).await;
}

/// The sidecar's own preempt channel (protocol-spec/postcopy-sequence.md#sequence-own-preempt):
/// a source without preempt, a destination with it, and requested pages delivered on the
/// channel the sidecar opened, while the guest faults at random from the start.
async fn own_preempt(v: QemuVersion) {
    let o = run(Case {
        random: true,
        mode: Mode::OwnPreempt,
        ..Case::postcopy(v)
    })
    .await;
    assert!(o.report.timeline.run_ms.is_some(), "no POSTCOPY_RUN seen");
    assert!(!o.report.preempt, "the source opened no preempt channel");
    assert!(
        o.dst
            .qmp()
            .capability("postcopy-preempt")
            .await
            .expect("QMP"),
        "the destination ran with postcopy-preempt"
    );
    assert_request_counts(&o, v == QemuVersion::V10_0);
    let q = &o.report.requests_first;
    assert!(
        q.preempt_pages > 0,
        "pages left on the sidecar's preempt channel: {q:?}"
    );
    assert_eq!(q.preempt_pages, q.promoted_pages + q.window_pages, "{q:?}");
    assert_guest_healthy(&o).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_preempt_channel_to_a_10_0_destination() {
    own_preempt(QemuVersion::V10_0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_preempt_channel_to_a_7_2_destination() {
    own_preempt(QemuVersion::V7_2).await;
}

/// Multifd through the sidecar (protocol-spec/multifd.md#multifd-relay): a precopy
/// migration with four channels, each connected after main, checked packet by packet and
/// relayed; every page the source sent as a full page travelled on a multifd channel.
///
/// With a 10.0 source the guest runs on afterwards and stays clean. A 7.2 source leaves a
/// few pages stale on any destination, directly as through the sidecar
/// (protocol-spec/versions.md#versions-7-2-source-stale-pages), so its guest may die
/// through no fault of the path: there the destination stays paused and the sidecar's
/// exact check proves that its RAM holds every byte the source sent, multifd pages
/// included, and nothing else.
async fn multifd_precopy(v: QemuVersion) {
    let sound_source = v != QemuVersion::V7_2;
    let o = run(Case {
        mode: Mode::Precopy,
        multifd: Some(4),
        paused_destination: !sound_source,
        verify: !sound_source,
        ..Case::postcopy(v)
    })
    .await;
    let m = &o.report.multifd;
    assert_eq!(m.keys().copied().collect::<Vec<_>>(), [0, 1, 2, 3], "{m:?}");
    assert!(m.values().all(|f| f.pages > 0 && f.syncs > 0), "{m:?}");
    let syncs = m[&0].syncs;
    assert!(
        m.values().all(|f| f.syncs == syncs),
        "one sync per channel per sync point: {m:?}"
    );
    let pages: u64 = m.values().map(|f| f.pages).sum();
    assert_eq!(pages, o.report.precopy.pages, "a full page on main: {m:?}");
    if v == QemuVersion::V10_0 {
        // 10.0 counts exactly the multifd pages in `ram.normal`; 7.2's count differed by
        // 0.3 % in a run (46686 vs 46843), so it is not compared.
        assert_eq!(
            Some(pages),
            o.source.normal_pages,
            "full pages on multifd vs the source's count: {m:?}"
        );
    }
    assert_eq!(o.report.requests.messages, 0);
    if sound_source {
        assert_guest_healthy(&o).await;
    } else {
        let exact = exact_check_clean(&o);
        assert!(exact.pages >= pages, "{exact:?}");
        need(o.src.check_workload_clean());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multifd_four_channels_10_0_precopy_through_the_sidecar() {
    multifd_precopy(QemuVersion::V10_0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multifd_four_channels_7_2_precopy_through_the_sidecar() {
    multifd_precopy(QemuVersion::V7_2).await;
}

/// A 7.2 guest running its workload (`seed`), and its spec for the destination.
async fn running_7_2_source(dir: &std::path::Path, seed: u64) -> (VmSpec, Vm) {
    let spec = VmSpec::new(need(QemuBinary::find(QemuVersion::V7_2)))
        .name("src")
        .ram_mib(256)
        .linux(Workload {
            mib: 96,
            mode: WorkloadMode::Hot,
            hot_mib: 16,
            seed,
        });
    let src = need(Vm::spawn(&spec, dir).await);
    need(src.wait_workload_ready(BOOT).await);
    (spec, src)
}

/// The sidecar refused the source's POSTCOPY_ADVISE (multifd beside postcopy on a 7.2
/// destination), the source's migration failed, and its VM runs on clean: the report.
async fn refused_at_advise(
    sidecar: tokio::task::JoinHandle<
        Result<Report, postcopy_sidecar::daemon::receive::ReceiveError>,
    >,
    source: &SendReport,
    src: &Vm,
) -> Report {
    let report = tokio::time::timeout(MIGRATION, sidecar)
        .await
        .expect("sidecar finishes")
        .expect("sidecar task")
        .unwrap_or_else(|e| panic!("sidecar: {e}"));
    assert_eq!(report.outcome, "failed");
    let err = report.error.clone().unwrap_or_default();
    assert!(
        err.contains("POSTCOPY_ADVISE") && err.contains("7.2"),
        "{err}"
    );
    assert_eq!(source.status, "failed", "{source:?}");
    assert_eq!(src.qmp().run_state().await.unwrap(), "running");
    let seen = need(src.wait_progress(src.serial().len(), 2, PROGRESS).await);
    assert!(seen.iter().all(|p| p.mismatches == 0), "{seen:?}");
    report
}

/// QEMU 7.2 lets multifd and postcopy run together, but its destination aborts in
/// cleanup after such a migration completed (a yank assertion, seen here directly QEMU to
/// QEMU too; protocol-spec/multifd.md#multifd-runs): the VM would be lost at the end. So
/// the sidecar sets a 7.2 destination up for precopy only and refuses the source's
/// POSTCOPY_ADVISE at the stream's start, while the VM runs on the source, which keeps it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multifd_with_postcopy_to_7_2_is_refused_at_advise_and_the_vm_stays_on_the_source() {
    let dir = tempfile::Builder::new()
        .prefix("receive-")
        .tempdir()
        .unwrap();
    let (spec, src) = running_7_2_source(dir.path(), 11).await;
    let dst = need(
        Vm::spawn(
            &spec.destination(need(QemuBinary::find(QemuVersion::V7_2))),
            dir.path(),
        )
        .await,
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sidecar = tokio::spawn(receive_on(
        listener,
        ReceiveOptions {
            multifd: Some(4),
            ..ReceiveOptions::new(dst.spare_qmp_path(), Listen::At(addr))
        },
    ));
    let source = send(&SendOptions {
        qmp: src.spare_qmp_path().to_path_buf(),
        to: addr,
        postcopy_after: Some(Duration::from_millis(500)),
        preempt: false,
        multifd: Some(4),
        timeout: MIGRATION,
    })
    .await
    .expect("source QMP");
    let report = refused_at_advise(sidecar, &source, &src).await;
    assert!(
        report.timeline.advise_ms.is_none(),
        "ADVISE never reached the destination"
    );
    assert!(!dst.qmp().capability("postcopy-ram").await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_preempt_10_0_running_guest_through_the_sidecar() {
    let o = run(Case {
        mode: Mode::Preempt,
        ..Case::postcopy(QemuVersion::V10_0)
    })
    .await;
    assert!(o.report.preempt);
    assert_request_counts(&o, true);
    assert_guest_healthy(&o).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn precopy_10_0_running_guest_through_the_sidecar() {
    let o = run(Case {
        mode: Mode::Precopy,
        ..Case::postcopy(QemuVersion::V10_0)
    })
    .await;
    assert!(o.report.timeline.listen_ms.is_none());
    assert!(
        o.report.opaque_bytes > 0,
        "device state should pass through as opaque"
    );
    assert_eq!(o.report.requests.messages, 0);
    assert_guest_healthy(&o).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_10_0_idle_vm_through_the_sidecar() {
    let o = run(Case {
        linux: false,
        ..Case::postcopy(QemuVersion::V10_0)
    })
    .await;
    assert_request_counts(&o, true);
    assert!(o.dst.qmp().run_state().await.unwrap() == "running");
}

/// What a 10.2+ source does around the switch, seen for real on 11.1
/// (protocol-spec/versions.md#versions-after-10-0): the package carries PING(0x42), the
/// destination loads it, its PONG reaches the source through the sidecar's return path
/// (a source that never got it would stay in `postcopy-device`), and the destination
/// reports its own fault latencies (10.1).
fn assert_10_2_switch(o: &Outcome) {
    let pinged = o
        .dst
        .stderr()
        .lines()
        .iter()
        .any(|l| l.contains("loadvm_process_command_ping") && l.contains("0x42"));
    assert!(pinged, "the destination loaded no PING(0x42)");
    let device = o.source_states.iter().position(|s| s == "postcopy-device");
    let active = o.source_states.iter().position(|s| s == "postcopy-active");
    assert!(
        matches!((device, active), (Some(d), Some(a)) if d < a),
        "the source went postcopy-device, then postcopy-active: {:?}",
        o.source_states
    );
    let q = o
        .report
        .destination
        .qemu_faults
        .as_ref()
        .expect("11.1 reports its postcopy latencies");
    assert!(q.latency_ns.is_some(), "{q:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_11_1_running_guest_through_the_sidecar() {
    let o = run(Case {
        random: true,
        ..Case::postcopy(QemuVersion::V11_1)
    })
    .await;
    assert!(o.report.postcopy.pages > 0, "pages arrived in postcopy");
    assert!(o.report.requests.messages > 0, "the guest faulted");
    assert_10_2_switch(&o);
    assert_request_counts(&o, true);
    assert_guest_healthy(&o).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_preempt_11_1_running_guest_through_the_sidecar() {
    let o = run(Case {
        mode: Mode::Preempt,
        random: true,
        ..Case::postcopy(QemuVersion::V11_1)
    })
    .await;
    assert!(o.report.preempt);
    assert_10_2_switch(&o);
    assert_request_counts(&o, true);
    assert_guest_healthy(&o).await;
}

/// Multifd and postcopy together, allowed again from 10.2
/// (protocol-spec/multifd.md#multifd-postcopy): multifd carries precopy pages, and after
/// the switch pages travel on main only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multifd_and_postcopy_11_1_through_the_sidecar() {
    let o = run(Case {
        multifd: Some(4),
        ..Case::postcopy(QemuVersion::V11_1)
    })
    .await;
    assert!(o.report.timeline.run_ms.is_some(), "no POSTCOPY_RUN seen");
    assert!(o.report.postcopy.pages > 0, "pages arrived in postcopy");
    let m = &o.report.multifd;
    assert_eq!(m.len(), 4, "{m:?}");
    assert!(
        m.values().all(|c| c.pages > 0),
        "every channel carried pages: {m:?}"
    );
    assert!(o.dst.qmp().capability("multifd").await.expect("QMP"));
    assert!(o.dst.qmp().capability("postcopy-ram").await.expect("QMP"));
    assert_10_2_switch(&o);
    assert_request_counts(&o, true);
    assert_guest_healthy(&o).await;
}

/// An upgrade: a 10.0 source to an 11.1 destination, on the 10.0 machine type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_10_0_to_11_1_running_guest_through_the_sidecar() {
    let o = run(Case {
        src: QemuVersion::V10_0,
        dst: QemuVersion::V11_1,
        machine: Some("pc-q35-10.0"),
        ..Case::postcopy(QemuVersion::V10_0)
    })
    .await;
    assert!(o.report.postcopy.pages > 0);
    assert_request_counts(&o, true);
    assert_guest_healthy(&o).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_7_2_running_guest_through_the_sidecar() {
    let o = run(Case::postcopy(QemuVersion::V7_2)).await;
    assert_request_counts(&o, false);
    assert_guest_healthy(&o).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_7_2_to_10_0_running_guest_through_the_sidecar() {
    let o = run(Case {
        src: QemuVersion::V7_2,
        dst: QemuVersion::V10_0,
        machine: Some("pc-q35-7.2"),
        ..Case::postcopy(QemuVersion::V10_0)
    })
    .await;
    assert_request_counts(&o, true);
    assert_guest_healthy(&o).await;
}

/// Finds the memfd that backs guest RAM in a QEMU process, through /proc (pread on it
/// never allocates; after a completed migration every page is present anyway).
fn guest_memfd(pid: u32) -> std::fs::File {
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).expect("/proc/PID/fd") {
        let e = e.unwrap();
        if let Ok(target) = std::fs::read_link(e.path())
            && target
                .to_string_lossy()
                .starts_with("/memfd:memory-backend-memfd")
        {
            return std::fs::File::open(e.path()).expect("open memfd");
        }
    }
    panic!("no memory-backend memfd in /proc/{pid}/fd");
}

/// Guest RAM on 2 MiB hugetlb pages (protocol-spec/ram.md#ram-mem-size: the block list
/// carries the page size): faults are whole huge pages, which the source sends as 512
/// records and the destination places at once; the sidecar never moves one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_10_0_hugepage_ram_through_the_sidecar() {
    let o = run(Case {
        layout: RamLayout::Hugepages2M,
        random: true,
        ..Case::postcopy(QemuVersion::V10_0)
    })
    .await;
    assert!(o.report.timeline.run_ms.is_some(), "no POSTCOPY_RUN seen");
    assert!(o.report.postcopy.pages > 0, "pages arrived in postcopy");
    assert!(
        o.report.requests.messages > 0,
        "the guest faulted on huge pages"
    );
    let blocks = o.dst.qmp().ram_blocks().await.expect("QMP");
    let m = blocks.iter().find(|b| b.name == "m").expect("block m");
    assert_eq!(m.page_size, 2 << 20, "the guest RAM is on 2 MiB pages");
    assert_eq!(
        o.report.requests_first.promoted_pages, 0,
        "a huge page's record moved"
    );
    assert_request_counts(&o, true);
    assert_guest_healthy(&o).await;
}

/// Two memfd backends, one per NUMA node: both blocks are carried, and with the
/// destination paused the sidecar's exact check compares both with what it delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_10_0_two_numa_nodes_through_the_sidecar_verified_exactly() {
    let o = run(Case {
        layout: RamLayout::TwoNodes,
        paused_destination: true,
        verify: true,
        ..Case::postcopy(QemuVersion::V10_0)
    })
    .await;
    for b in ["m0", "m1"] {
        let f = o.report.blocks.iter().find(|x| x.name == b);
        assert!(
            f.is_some_and(|f| f.pages > 0),
            "block {b}: {:?}",
            o.report.blocks
        );
    }
    let exact = exact_check_clean(&o);
    assert!(
        ["m0", "m1"]
            .iter()
            .all(|b| exact.blocks.iter().any(|x| x == b)),
        "{exact:?}"
    );
    assert_eq!(
        exact.pages,
        (256u64 << 20) / 4096,
        "every page of both nodes compared"
    );
    assert_request_counts(&o, true);
}

/// The `pc` (i440fx) machine with the destination paused: the sidecar's guarded exact
/// check compares the whole RAM with what it delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_10_0_pc_machine_verified_exactly() {
    let o = run(Case {
        machine: Some("pc"),
        paused_destination: true,
        verify: true,
        ..Case::postcopy(QemuVersion::V10_0)
    })
    .await;
    let exact = exact_check_clean(&o);
    assert!(exact.blocks.iter().any(|b| b == "m"), "{exact:?}");
    assert_request_counts(&o, true);
}

/// The `pc` (i440fx) machine: another block list and firmware layout, same protocol.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_10_0_pc_machine_through_the_sidecar() {
    let o = run(Case {
        machine: Some("pc"),
        random: true,
        ..Case::postcopy(QemuVersion::V10_0)
    })
    .await;
    assert!(
        o.report.destination.machine.starts_with("pc-i440fx"),
        "{:?}",
        o.report.destination
    );
    assert!(o.report.timeline.run_ms.is_some(), "no POSTCOPY_RUN seen");
    assert_request_counts(&o, true);
    assert_guest_healthy(&o).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_destination_ram_equals_source_ram_at_switchover() {
    let o = run(Case {
        paused_destination: true,
        ..Case::postcopy(QemuVersion::V10_0)
    })
    .await;
    // The source stopped at switchover and the destination never ran: byte-equal RAM.
    assert_eq!(o.src.qmp().run_state().await.unwrap(), "postmigrate");
    assert_ne!(o.dst.qmp().run_state().await.unwrap(), "running");
    let (a, b) = (guest_memfd(o.src.pid()), guest_memfd(o.dst.pid()));
    let len = 256u64 << 20;
    let mut bad = Vec::new();
    let (mut x, mut y) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    for off in (0..len).step_by(1 << 20) {
        a.read_exact_at(&mut x, off).unwrap();
        b.read_exact_at(&mut y, off).unwrap();
        if x != y {
            for p in 0..256u64 {
                let r = (p * 4096) as usize..((p + 1) * 4096) as usize;
                if x[r.clone()] != y[r] {
                    bad.push(off + p * 4096);
                }
            }
        }
    }
    assert!(
        bad.is_empty(),
        "{} pages differ, first at {:#x?}",
        bad.len(),
        &bad[..bad.len().min(8)]
    );
    assert_request_counts(&o, true);
}

/// The test plays a manager such as libvirt: it sets the destination's capabilities and
/// makes it listen on 127.0.0.1:PORT itself. The sidecar is started *before* the
/// destination QEMU exists (as a hook would start it), follows the manager's settings,
/// listens on 127.0.0.2 at the destination's port, and signals readiness through its ready
/// file; the source is sent to 127.0.0.2:PORT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_following_the_destinations_manager() {
    use postcopy_sidecar::daemon::receive::{Incoming, receive};

    let dir = tempfile::Builder::new()
        .prefix("follow-")
        .tempdir()
        .unwrap();
    let spec = VmSpec::new(need(QemuBinary::find(QemuVersion::V10_0)))
        .name("src")
        .ram_mib(256)
        .linux(Workload {
            mib: 96,
            mode: WorkloadMode::Hot,
            hot_mib: 16,
            seed: 13,
        });
    let src = need(Vm::spawn(&spec, dir.path()).await);
    need(src.wait_workload_ready(BOOT).await);
    need(src.wait_progress(src.serial().len(), 1, PROGRESS).await);

    let dspec = spec.destination(need(QemuBinary::find(QemuVersion::V10_0)));
    let spare = dir.path().join(format!("{}.qmp2", dspec.name));
    let ready = dir.path().join("sidecar.ready");
    let sidecar_addr: std::net::IpAddr = "127.0.0.2".parse().unwrap();
    let sidecar = tokio::spawn(receive(ReceiveOptions {
        incoming: Incoming::Follow,
        ready_file: Some(ready.clone()),
        report: Some(dir.path().join("report.json")),
        ..ReceiveOptions::new(&spare, Listen::DestinationPort(sidecar_addr))
    }));
    let dst = need(Vm::spawn(&dspec, dir.path()).await);
    let port = need(
        postcopy_sidecar::lab::free_tcp_port().map_err(|source| LabError::Io {
            what: "choosing a port".into(),
            source,
        }),
    );
    let q = dst.qmp();
    q.set_capabilities(&[("postcopy-ram", true), ("return-path", true)])
        .await
        .unwrap();
    q.migrate_incoming(&format!("tcp:127.0.0.1:{port}"))
        .await
        .unwrap();

    // The ready file appears once the sidecar listens; it is written by another task, so
    // look for it until a deadline.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let ready_json: serde_json::Value = loop {
        if let Ok(text) = std::fs::read_to_string(&ready) {
            break serde_json::from_str(&text).expect("ready file is JSON");
        }
        assert!(
            std::time::Instant::now() < deadline && !sidecar.is_finished(),
            "the sidecar never became ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let listen = format!("127.0.0.2:{port}");
    assert_eq!(ready_json["listen"], listen.as_str());
    assert_eq!(
        ready_json["destination"],
        format!("tcp:127.0.0.1:{port}").as_str()
    );

    let source = send(&SendOptions {
        qmp: src.spare_qmp_path().to_path_buf(),
        to: listen.parse().unwrap(),
        postcopy_after: Some(Duration::from_millis(500)),
        preempt: false,
        multifd: None,
        timeout: MIGRATION,
    })
    .await
    .expect("source QMP");
    let report = tokio::time::timeout(MIGRATION, sidecar)
        .await
        .expect("sidecar finishes")
        .expect("sidecar task")
        .unwrap_or_else(|e| panic!("sidecar: {e}\nsource: {source:?}"));
    eprintln!("{}", report.table());
    assert_eq!(source.status, "completed", "source: {source:?}");
    assert_eq!(report.outcome, "completed", "{:?}", report.error);
    assert!(
        report.postcopy.pages > 0,
        "the migration went through postcopy"
    );
    let o = Outcome {
        report,
        source,
        dst_requests_sent: 0,
        source_states: Vec::new(),
        src,
        dst,
        _dir: dir,
    };
    assert_request_counts(&o, false);
    assert_guest_healthy(&o).await;
}

/// Following a manager that set multifd and postcopy on a QEMU 7.2 destination (which
/// aborts after such a migration, QEMU to QEMU too): the sidecar refuses the source's
/// POSTCOPY_ADVISE at the stream's start, so the VM stays on the source instead of being
/// lost after the switch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn following_a_7_2_destination_with_multifd_and_postcopy_refuses_postcopy_safely() {
    use postcopy_sidecar::daemon::receive::{Incoming, receive};

    let dir = tempfile::Builder::new()
        .prefix("follow-")
        .tempdir()
        .unwrap();
    let (spec, src) = running_7_2_source(dir.path(), 17).await;
    let dspec = spec.destination(need(QemuBinary::find(QemuVersion::V7_2)));
    let spare = dir.path().join(format!("{}.qmp2", dspec.name));
    let ready = dir.path().join("sidecar.ready");
    let sidecar = tokio::spawn(receive(ReceiveOptions {
        incoming: Incoming::Follow,
        ready_file: Some(ready.clone()),
        ..ReceiveOptions::new(
            &spare,
            Listen::DestinationPort("127.0.0.2".parse().unwrap()),
        )
    }));
    let dst = need(Vm::spawn(&dspec, dir.path()).await);
    let port = postcopy_sidecar::lab::free_tcp_port().expect("a port");
    let q = dst.qmp();
    q.set_parameters(serde_json::json!({"multifd-channels": 4}))
        .await
        .unwrap();
    q.set_capabilities(&[
        ("postcopy-ram", true),
        ("return-path", true),
        ("multifd", true),
    ])
    .await
    .unwrap();
    q.migrate_incoming(&format!("tcp:127.0.0.1:{port}"))
        .await
        .unwrap();
    // The ready file is written by another task once the sidecar listens.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !ready.exists() {
        assert!(
            std::time::Instant::now() < deadline && !sidecar.is_finished(),
            "the sidecar never became ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let source = send(&SendOptions {
        qmp: src.spare_qmp_path().to_path_buf(),
        to: format!("127.0.0.2:{port}").parse().unwrap(),
        postcopy_after: Some(Duration::from_millis(500)),
        preempt: false,
        multifd: Some(4),
        timeout: MIGRATION,
    })
    .await
    .expect("source QMP");
    refused_at_advise(sidecar, &source, &src).await;
}
