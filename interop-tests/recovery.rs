//! The fault suite: the source link is broken during postcopy, between real QEMUs running
//! a real Linux guest, and the migration must come back every time with the guest's
//! memory intact.
//!
//! The link between the source QEMU and the sidecar is a loopback forwarder that resets
//! its connections (`shutdown()` with zero linger) or freezes (a silent partition). The
//! source is resumed the ordinary way, `migrate` with `resume: true` to the same address.
//! Every wait is on a QMP event, a serial line or a byte count, never a fixed sleep.
//!
//! They need `scripts/setup.sh` to have run; without it they fail (never skip).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use postcopy_sidecar::daemon::metrics::Metrics;
use postcopy_sidecar::daemon::receive::{Listen, ReceiveError, ReceiveOptions, receive_on};
use postcopy_sidecar::daemon::report::Report;
use postcopy_sidecar::lab::SerialLog;
use postcopy_sidecar::lab::link::Link;
use postcopy_sidecar::lab::{
    LabError, QemuBinary, QemuVersion, Vm, VmSpec, Workload, WorkloadMode,
};
use postcopy_sidecar::qmp::{EventCursor, MigrationStatus, migration_event_status};
use postcopy_sidecar::session::{CutCause, CutPolicy, LinkEvent};

const BOOT: Duration = Duration::from_secs(180);
const PROGRESS: Duration = Duration::from_secs(120);
const STEP: Duration = Duration::from_secs(120);
/// Keeps postcopy running long enough for every cut: the guest's ~140 MB of non-zero
/// memory at this rate take well over 10 s.
const POSTCOPY_BANDWIDTH: u64 = 8 << 20;

fn need<T>(r: Result<T, LabError>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

/// The sidecar's log in the test's output (shown for a failing test).
fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "postcopy_sidecar=info".into()),
        )
        .with_test_writer()
        .try_init();
}

struct Rig {
    src: Vm,
    dst: Vm,
    link: Link,
    /// What the sidecar says about the link, as it happens.
    events: tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<LinkEvent>>,
    _dir: tempfile::TempDir,
    preempt: bool,
    dst_cursor: EventCursor,
    /// The sidecar's source port itself, behind the link.
    port: SocketAddr,
}

/// A source running the guest workload and a destination waiting for it.
async fn vms(version: QemuVersion, preempt: bool) -> (Vm, Vm, tempfile::TempDir) {
    logs();
    let dir = tempfile::Builder::new()
        .prefix("recovery-")
        .tempdir()
        .unwrap();
    let spec = VmSpec::new(need(QemuBinary::find(version)))
        .name("src")
        .ram_mib(256)
        .linux(Workload {
            mib: 96,
            mode: WorkloadMode::Hot,
            hot_mib: 16,
            seed: 29,
        });
    let src = need(Vm::spawn(&spec, dir.path()).await);
    need(src.wait_workload_ready(BOOT).await);
    need(src.wait_progress(src.serial().len(), 1, PROGRESS).await);
    let dst = need(
        Vm::spawn(
            &spec.destination(need(QemuBinary::find(version))),
            dir.path(),
        )
        .await,
    );
    let _ = preempt;
    (src, dst, dir)
}

/// Starts postcopy from `src` to `to`, and returns once the destination runs the VM
/// (its RESUME event: the package's POSTCOPY_RUN was processed).
async fn start_postcopy(
    src: &Vm,
    dst: &Vm,
    to: SocketAddr,
    preempt: bool,
    dst_cursor: EventCursor,
) {
    start_postcopy_after(src, dst, to, preempt, dst_cursor, 0).await
}

/// Like [`start_postcopy`], switching only once the source began precopy pass
/// `passes + 1`: the pages the guest kernel needs to take an interrupt are then on the
/// destination. A paused QEMU 10.0 destination under TCG whose vCPU takes an interrupt on
/// a missing page blocks its main loop, which must accept the recovery connection
/// (protocol-spec/postcopy-sequence.md#sequence-takeover).
async fn start_postcopy_after(
    src: &Vm,
    dst: &Vm,
    to: SocketAddr,
    preempt: bool,
    dst_cursor: EventCursor,
    passes: u64,
) {
    let q = src.qmp();
    let mut caps = vec![
        ("events", true),
        ("postcopy-ram", true),
        ("return-path", true),
    ];
    if preempt {
        caps.push(("postcopy-preempt", true));
    }
    q.set_capabilities(&caps).await.unwrap();
    // A tiny downtime limit keeps precopy from converging on its own: the switch to
    // postcopy is always ours.
    q.set_parameters(serde_json::json!({
        "max-postcopy-bandwidth": POSTCOPY_BANDWIDTH,
        "downtime-limit": 1,
    }))
    .await
    .unwrap();
    let cursor = q.event_cursor();
    q.migrate_to(&format!("tcp:{to}")).await.unwrap();
    let s = q
        .wait_migration_status_after(cursor, &["active", "failed"], STEP)
        .await
        .unwrap();
    assert_eq!(s, MigrationStatus::Active);
    if passes > 0 {
        q.wait_for_event_after(
            cursor,
            |e| e.name == "MIGRATION_PASS" && e.data["pass"].as_u64() > Some(passes),
            STEP,
        )
        .await
        .expect("precopy passes");
    }
    q.start_postcopy().await.unwrap();
    let s = q
        .wait_migration_status_after(cursor, &["postcopy-active", "failed", "completed"], STEP)
        .await
        .unwrap();
    assert_eq!(
        s,
        MigrationStatus::PostcopyActive,
        "the migration entered postcopy"
    );
    dst.qmp()
        .wait_for_event_after(dst_cursor, |e| e.name == "RESUME", STEP)
        .await
        .expect("the destination runs the VM");
}

impl Rig {
    /// Source, destination, a sidecar in this process, and a breakable link in front of it.
    async fn start(
        version: QemuVersion,
        preempt: bool,
        tune: impl FnOnce(ReceiveOptions) -> ReceiveOptions,
    ) -> (Rig, tokio::task::JoinHandle<Result<Report, ReceiveError>>) {
        let (src, dst, dir) = vms(version, preempt).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (events_tx, events) = tokio::sync::mpsc::unbounded_channel();
        let opts = tune(ReceiveOptions {
            preempt,
            report: Some(dir.path().join("report.json")),
            link_events: Some(events_tx),
            ..ReceiveOptions::new(dst.spare_qmp_path(), Listen::At(addr))
        });
        let sidecar = tokio::spawn(receive_on(listener, opts));
        let link = Link::start(addr).await.unwrap();
        let dst_cursor = dst.qmp().event_cursor();
        (
            Rig {
                src,
                dst,
                link,
                events: tokio::sync::Mutex::new(events),
                _dir: dir,
                preempt,
                dst_cursor,
                port: addr,
            },
            sidecar,
        )
    }

    /// [`Self::start`] with `--on-cut pass-through`, no preempt: the destination pauses
    /// with the source at a cut.
    async fn pass_through(
        version: QemuVersion,
    ) -> (Rig, tokio::task::JoinHandle<Result<Report, ReceiveError>>) {
        Rig::start(version, false, |o| ReceiveOptions {
            on_cut: Some(CutPolicy::PassThrough),
            ..o
        })
        .await
    }

    /// Pass-through: stops the destination's vCPUs (see
    /// pass_through_relays_the_recovery_of_7_2), cuts the link and waits until both ends
    /// have paused; returns the destination's event cursor from then on.
    async fn cut_until_both_paused(&self) -> EventCursor {
        stop_destination_vcpus(&self.dst).await;
        let dq = self.dst.qmp();
        let before_cut = dq.event_cursor();
        self.cut_until_paused(Link::cut, false).await;
        let s = dq
            .wait_migration_status_after(before_cut, &["postcopy-paused", "failed"], STEP)
            .await
            .expect("the destination pauses with the source");
        assert_eq!(s, MigrationStatus::PostcopyPaused);
        dq.event_cursor()
    }

    /// A peer at the sidecar's own port that sends `first_bytes` and must be refused: the
    /// sidecar closes the connection without a byte.
    async fn impostor(&self, first_bytes: &[u8]) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut impostor = tokio::net::TcpStream::connect(self.port).await.unwrap();
        impostor.write_all(first_bytes).await.unwrap();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(STEP, impostor.read_to_end(&mut rest)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "the sidecar refuses the impostor: {read:?}, {rest:?}"
        );
    }

    async fn postcopy(&self) {
        start_postcopy(
            &self.src,
            &self.dst,
            self.link.addr(),
            self.preempt,
            self.dst_cursor,
        )
        .await;
    }

    /// Waits for `bytes` more to cross the link: the cut then falls at a later point of
    /// the postcopy stream. Fails the test if postcopy ended first.
    async fn advance(&self, bytes: u64) {
        let target = self.link.forwarded() + bytes;
        assert!(
            self.link.wait_forwarded(target, STEP).await,
            "the stream stopped before {target} bytes"
        );
        let st = self.src.qmp().migrate_status().await.unwrap();
        assert_eq!(
            st,
            MigrationStatus::PostcopyActive,
            "still in postcopy for the next cut (lower the bandwidth if not)"
        );
    }

    /// Breaks the link with `cut`, waits for the source to pause, resumes it to the same
    /// address, and returns the time from the cut until the source is postcopy-active.
    async fn cut_and_resume(&self, cut: impl FnOnce(&Link)) -> Duration {
        self.cut_and_resume_as(cut, false).await
    }

    /// Like [`Self::cut_and_resume`]; with `operator_pause`, once the sidecar has seen the
    /// cut, a source that has not noticed it gets `migrate-pause`, as an operator does
    /// (QEMU 10.0 does not notice a reset of its preempt channel alone, with or without
    /// the sidecar: protocol-spec/postcopy-sequence.md#sequence-hold).
    async fn cut_and_resume_as(&self, cut: impl FnOnce(&Link), operator_pause: bool) -> Duration {
        let t0 = Instant::now();
        self.cut_until_paused(cut, operator_pause).await;
        self.resume_source(self.link.addr()).await;
        t0.elapsed()
    }

    /// Breaks the link with `cut` and waits for the source to pause (see
    /// [`Self::cut_and_resume_as`] for `operator_pause`).
    async fn cut_until_paused(&self, cut: impl FnOnce(&Link), operator_pause: bool) {
        let q = self.src.qmp();
        let cursor = q.event_cursor();
        cut(&self.link);
        if operator_pause {
            let mut ev = self.events.lock().await;
            loop {
                match tokio::time::timeout(STEP, ev.recv()).await {
                    Ok(Some(LinkEvent::Cut { .. })) => break,
                    Ok(Some(_)) => {}
                    other => panic!("the sidecar never saw the cut: {other:?}"),
                }
            }
            if q.migrate_status().await.unwrap() == MigrationStatus::PostcopyActive {
                // Refused if the source paused meanwhile: that is fine too.
                let _ = q.migrate_pause(Duration::from_secs(10)).await;
            }
        }
        let s = q
            .wait_migration_status_after(cursor, &["postcopy-paused", "failed", "completed"], STEP)
            .await
            .unwrap_or_else(|e| {
                let info = tokio::task::block_in_place(|| {
                    tokio::runtime::Handle::current().block_on(q.query_migrate_json())
                });
                panic!(
                    "the source after the cut: {e}; query-migrate {info:?}; its stderr:\n{}",
                    self.src.stderr().tail(20)
                )
            });
        assert_eq!(
            s,
            MigrationStatus::PostcopyPaused,
            "the source paused after the cut"
        );
    }

    async fn resume_source(&self, to: SocketAddr) {
        let q = self.src.qmp();
        let cursor = q.event_cursor();
        q.migrate_resume(&format!("tcp:{to}")).await.unwrap();
        let s = q
            .wait_migration_status_after(cursor, &["postcopy-active", "failed", "completed"], STEP)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "the resumed source: {e}; its events {:?}; its stderr:\n{}",
                    q.events_since(cursor),
                    self.src.stderr().tail(20)
                )
            });
        assert_ne!(s, MigrationStatus::Failed, "the resumed source failed");
    }

    /// Waits for both ends to complete and checks the guest: it runs on the destination,
    /// makes progress, and has never seen a wrong word.
    async fn finish(
        &self,
        sidecar: tokio::task::JoinHandle<Result<Report, ReceiveError>>,
    ) -> Report {
        let report = tokio::time::timeout(Duration::from_secs(600), sidecar)
            .await
            .expect("the sidecar finishes")
            .expect("sidecar task")
            .unwrap_or_else(|e| panic!("sidecar: {e}"));
        eprintln!("{}", report.table());
        assert_eq!(
            report.outcome,
            "completed",
            "{:?}\ndestination stderr:\n{}\nsource stderr:\n{}",
            report.error,
            self.dst.stderr().tail(15),
            self.src.stderr().tail(15)
        );
        let s = self
            .src
            .qmp()
            .wait_migration_states(&["completed", "failed"], STEP)
            .await
            .unwrap();
        assert_eq!(s, MigrationStatus::Completed);
        self.guest_intact().await;
        report
    }

    async fn guest_intact(&self) {
        let seen = need(self.dst.wait_progress(0, 2, PROGRESS).await);
        assert!(seen.iter().all(|p| p.mismatches == 0), "{seen:?}");
        need(self.dst.check_workload_clean());
        need(self.src.check_workload_clean());
    }

    /// The destination's migration states since the rig started.
    fn destination_states(&self) -> Vec<MigrationStatus> {
        self.dst
            .qmp()
            .events_since(self.dst_cursor)
            .iter()
            .filter_map(migration_event_status)
            .collect()
    }
}

/// For each recovery after the cursors, how long after the source reported
/// `postcopy-recover` (on its TCP connect) the destination did (once it has the connection),
/// in µs, from QEMU's own event timestamps: the window in which a manager that checks the
/// destination as soon as the source recovers (libvirt 9.0's resume) finds it still paused.
fn recovery_gaps_us(
    src: &Vm,
    src_cursor: EventCursor,
    dst: &Vm,
    dst_cursor: EventCursor,
) -> Vec<i64> {
    let recovers = |vm: &Vm, cursor| -> Vec<i64> {
        vm.qmp()
            .events_since(cursor)
            .iter()
            .filter(|e| migration_event_status(e) == Some(MigrationStatus::PostcopyRecover))
            .map(|e| e.timestamp_us as i64)
            .collect()
    };
    let (s, d) = (recovers(src, src_cursor), recovers(dst, dst_cursor));
    s.iter().zip(&d).map(|(s, d)| d - s).collect()
}

fn percentiles(mut v: Vec<Duration>) -> String {
    v.sort();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize].as_millis();
    format!(
        "{} recoveries: p50 {} ms, p90 {} ms, max {} ms",
        v.len(),
        at(0.5),
        at(0.9),
        at(1.0)
    )
}

/// Twenty resets of the source link in one migration, at different points of postcopy:
/// the destination never notices (it never leaves postcopy-active), every recovery is
/// answered by the sidecar, and the guest's memory is intact.
async fn twenty_cuts_held(version: QemuVersion, preempt: bool) {
    let (rig, sidecar) = Rig::start(version, preempt, |o| o).await;
    rig.postcopy().await;
    let mut times = Vec::new();
    for i in 0..20u64 {
        // The first cut comes right after the switch, the others spread over postcopy.
        let step = if i == 0 {
            64 << 10
        } else {
            (3 << 20) + (i % 4) * (512 << 10)
        };
        rig.advance(step).await;
        times.push(rig.cut_and_resume(Link::cut).await);
    }
    let report = rig.finish(sidecar).await;
    eprintln!("cut → source postcopy-active again: {}", percentiles(times));
    assert_eq!(report.recoveries.len(), 20, "{:?}", report.recoveries);
    assert!(report.recoveries.iter().all(|r| r.mode == "hold"));
    let states = rig.destination_states();
    assert!(
        !states.contains(&MigrationStatus::PostcopyPaused),
        "the held destination paused: {states:?}"
    );
    assert!(report.postcopy.pages > 0, "postcopy pages were carried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_resets_of_the_source_link_are_held_10_0() {
    twenty_cuts_held(QemuVersion::V10_0, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_resets_of_the_source_link_are_held_with_preempt_10_0() {
    twenty_cuts_held(QemuVersion::V10_0, true).await;
}

/// Five cuts, each held and resumed, on `version`: the destination never pauses.
async fn five_cuts_held(version: QemuVersion, preempt: bool) {
    let (rig, sidecar) = Rig::start(version, preempt, |o| o).await;
    rig.postcopy().await;
    let mut times = Vec::new();
    for _ in 0..5 {
        rig.advance(256 * 1024).await;
        times.push(rig.cut_and_resume(Link::cut).await);
    }
    let report = rig.finish(sidecar).await;
    eprintln!("{}: {}", version.as_str(), percentiles(times));
    assert_eq!(report.recoveries.len(), 5);
    assert!(
        !rig.destination_states()
            .contains(&MigrationStatus::PostcopyPaused)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_of_the_source_link_are_held_7_2() {
    five_cuts_held(QemuVersion::V7_2, false).await;
}

/// QEMU 11.1 with preempt: held cuts and resumes of a 10.2+ source, whose resume
/// handshake the sidecar answers as for 10.0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_of_the_source_link_are_held_with_preempt_11_1() {
    five_cuts_held(QemuVersion::V11_1, true).await;
}

/// Only the preempt connection breaks: QEMU's source pauses as a whole, the sidecar holds
/// the destination, and the resumed source reconnects both channels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_of_the_preempt_channel_alone_is_held_10_0() {
    let (rig, sidecar) = Rig::start(QemuVersion::V10_0, true, |o| o).await;
    rig.postcopy().await;
    for _ in 0..3 {
        rig.advance(256 * 1024).await;
        // The newest connection is the current preempt channel (it follows its main).
        let preempt = rig.link.accepted();
        rig.cut_and_resume_as(|l| assert!(l.cut_connection(preempt)), true)
            .await;
    }
    let report = rig.finish(sidecar).await;
    assert_eq!(report.recoveries.len(), 3);
    assert!(
        report
            .recoveries
            .iter()
            .all(|r| r.channel == "preempt" || r.channel == "main")
    );
    assert!(
        !rig.destination_states()
            .contains(&MigrationStatus::PostcopyPaused)
    );
}

/// A silent partition: the link freezes, the sidecar's idle rule notices within its
/// silence time, says so in its metrics and report, and the operator pauses the source
/// (which cannot tell) and resumes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_partition_is_seen_and_recovered_10_0() {
    let metrics = Arc::new(Metrics::new());
    let m = metrics.clone();
    let (events, mut link_events) = tokio::sync::mpsc::unbounded_channel();
    let (rig, sidecar) = Rig::start(QemuVersion::V10_0, false, move |o| ReceiveOptions {
        silence: Duration::from_secs(3),
        metrics: Some(m),
        link_events: Some(events),
        ..o
    })
    .await;
    rig.postcopy().await;
    rig.advance(256 * 1024).await;
    let frozen_at = Instant::now();
    rig.link.freeze();
    // The sidecar's own verdict, as it happens.
    loop {
        match tokio::time::timeout(Duration::from_secs(30), link_events.recv()).await {
            Ok(Some(LinkEvent::Cut {
                cause: CutCause::Silent(d),
                ..
            })) => {
                assert!(d >= Duration::from_secs(3), "{d:?}");
                break;
            }
            Ok(Some(_)) => {}
            other => panic!("the idle rule never fired: {other:?}"),
        }
    }
    assert_eq!(metrics.cuts_with_cause("silent"), 1);
    let detected = frozen_at.elapsed();
    eprintln!("silence detected after {} ms", detected.as_millis());
    assert!(detected >= Duration::from_secs(2), "{detected:?}");
    // The operator's part: the source still believes it is connected.
    let q = rig.src.qmp();
    assert_eq!(
        q.migrate_status().await.unwrap(),
        MigrationStatus::PostcopyActive
    );
    let cursor = q.event_cursor();
    q.migrate_pause(Duration::from_secs(10)).await.unwrap();
    q.wait_migration_status_after(cursor, &["postcopy-paused"], STEP)
        .await
        .unwrap();
    rig.link.thaw();
    rig.resume_source(rig.link.addr()).await;
    let report = rig.finish(sidecar).await;
    assert_eq!(report.recoveries.len(), 1);
    assert!(
        report.recoveries[0].cause.contains("silent"),
        "{:?}",
        report.recoveries[0]
    );
    assert!(
        !rig.destination_states()
            .contains(&MigrationStatus::PostcopyPaused)
    );
}

/// Pass-through in private mode: the destination pauses with the source, the sidecar
/// makes it listen again (migrate-recover, out of band) and relays QEMU's own handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pass_through_lets_the_destination_pause_and_relays_its_recovery_10_0() {
    let (rig, sidecar) = Rig::pass_through(QemuVersion::V10_0).await;
    rig.postcopy().await;
    let cursors = (rig.src.qmp().event_cursor(), rig.dst.qmp().event_cursor());
    // vCPUs stopped across each cut: see pass_through_relays_the_recovery_of_7_2 (10.0
    // deadlocked the same way here once in a few runs, a cut 4 ms after a recovery).
    for _ in 0..3 {
        rig.advance(256 * 1024).await;
        stop_destination_vcpus(&rig.dst).await;
        rig.cut_and_resume(Link::cut).await;
        cont_destination(&rig.dst).await;
    }
    let gaps = recovery_gaps_us(&rig.src, cursors.0, &rig.dst, cursors.1);
    eprintln!("the destination recovered this long after the source (µs): {gaps:?}");
    assert_eq!(gaps.len(), 3, "both ends reported each recovery");
    let report = rig.finish(sidecar).await;
    assert_eq!(report.recoveries.len(), 3);
    assert!(report.recoveries.iter().all(|r| r.mode == "pass-through"));
    let states = rig.destination_states();
    let paused = states
        .iter()
        .filter(|s| **s == MigrationStatus::PostcopyPaused)
        .count();
    assert_eq!(paused, 3, "the destination paused at every cut: {states:?}");
}

/// Pass-through with QEMU 7.2 at both ends (no `postcopy-recover-setup` state, and a
/// source that would wedge on a broken handshake): QEMU's own recovery, relayed.
///
/// The destination's vCPUs are stopped across each cut: under TCG a 7.2 vCPU that takes an
/// interrupt reads the guest's IDT holding QEMU's big lock, and when that page has not
/// arrived the paused destination's main loop can never accept the resume connection (seen
/// here: the vCPU in `do_interrupt_all` → `x86_cpu_tlb_fill`, the main thread waiting for the
/// lock). A direct 7.2 recovery deadlocks the same way; hold mode, where the destination never
/// pauses, does not (`resets_of_the_source_link_are_held_7_2` runs with the vCPUs going).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pass_through_relays_the_recovery_of_7_2() {
    let (rig, sidecar) = Rig::pass_through(QemuVersion::V7_2).await;
    rig.postcopy().await;
    for _ in 0..2 {
        rig.advance(256 * 1024).await;
        stop_destination_vcpus(&rig.dst).await;
        rig.cut_and_resume(Link::cut).await;
        cont_destination(&rig.dst).await;
    }
    let report = rig.finish(sidecar).await;
    assert_eq!(report.recoveries.len(), 2);
    assert!(report.recoveries.iter().all(|r| r.mode == "pass-through"));
}

/// A peer at the source's address (loopback: every peer here) at the sidecar's port while
/// a pass-through cut waits for the source's resume. To a 10.0 destination the sidecar
/// connects as soon as it accepts such a connection, so the destination recovers as early
/// as a direct one would (protocol-spec/postcopy-sequence.md#sequence-early-destination);
/// when the peer turns out not to be a resume, that connection is closed and the
/// destination must pause again and take the real resume later. A 7.2 destination dies of
/// such a connection (run here), so to it the sidecar connects only for a judged resume:
/// it must stay paused, untouched, while the impostor is judged.
async fn an_impostor_at_the_resume_port(version: QemuVersion) {
    let (rig, sidecar) = Rig::pass_through(version).await;
    rig.postcopy().await;
    rig.advance(256 * 1024).await;
    let before_impostor = rig.cut_until_both_paused().await;
    let dq = rig.dst.qmp();
    // A fresh migration stream: refused while this migration is in progress.
    rig.impostor(&[b'Q', b'E', b'V', b'M', 0, 0, 0, 3]).await;
    let early = version == QemuVersion::V10_0;
    if early {
        let s = dq
            .wait_migration_status_after(before_impostor, &["postcopy-paused", "failed"], STEP)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "the destination pauses again once the early connection closes: {e}; its stderr:\n{}",
                    rig.dst.stderr().tail(20)
                )
            });
        assert_eq!(s, MigrationStatus::PostcopyPaused);
    }
    let flap: Vec<_> = dq
        .events_since(before_impostor)
        .iter()
        .filter_map(migration_event_status)
        .collect();
    eprintln!("the destination while the impostor was judged: {flap:?}");
    if early {
        assert_eq!(
            flap,
            [
                MigrationStatus::PostcopyRecover,
                MigrationStatus::PostcopyPaused
            ],
            "the sidecar connected the destination before judging the peer, then let it pause"
        );
    } else {
        assert_eq!(
            dq.migrate_status().await.unwrap(),
            MigrationStatus::PostcopyPaused
        );
        assert!(flap.is_empty(), "the destination was left alone: {flap:?}");
    }
    rig.resume_source(rig.link.addr()).await;
    cont_destination(&rig.dst).await;
    let report = rig.finish(sidecar).await;
    assert_eq!(report.recoveries.len(), 1);
    assert!(report.recoveries.iter().all(|r| r.mode == "pass-through"));
}

/// The same with an impostor that is refused at its first byte, and the source's resume
/// right behind it, three times: the destination connection the impostor prompted closes,
/// and the destination must have paused again before the resume's own connection reaches
/// it (one still leaving `postcopy-recover` would meet it mid-way): its states go
/// recover, paused, recover, active — or, where the refusal came before the early
/// connection began, straight recover, active.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impostor_refused_right_before_the_resume_lets_the_destination_pause_first_10_0() {
    let (rig, sidecar) = Rig::pass_through(QemuVersion::V10_0).await;
    rig.postcopy().await;
    let mut flaps = 0;
    for _ in 0..3 {
        rig.advance(256 * 1024).await;
        let before_impostor = rig.cut_until_both_paused().await;
        let dq = rig.dst.qmp();
        rig.impostor(&[0xff]).await;
        rig.resume_source(rig.link.addr()).await;
        cont_destination(&rig.dst).await;
        let events: Vec<_> = dq
            .events_since(before_impostor)
            .into_iter()
            .filter_map(|e| migration_event_status(&e).map(|s| (s, e.timestamp_us)))
            .collect();
        let states: Vec<_> = events.iter().map(|(s, _)| s.clone()).collect();
        let since_first: Vec<_> = events.iter().map(|(_, t)| t - events[0].1).collect();
        eprintln!(
            "the destination from the impostor to the resume: {states:?} at {since_first:?} µs"
        );
        use MigrationStatus::{PostcopyActive, PostcopyPaused, PostcopyRecover};
        if states
            == [
                PostcopyRecover,
                PostcopyPaused,
                PostcopyRecover,
                PostcopyActive,
            ]
        {
            flaps += 1;
        } else {
            assert_eq!(states, [PostcopyRecover, PostcopyActive]);
        }
    }
    assert!(
        flaps > 0,
        "no impostor's early connection reached the destination"
    );
    let report = rig.finish(sidecar).await;
    assert_eq!(report.recoveries.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impostor_at_the_resume_port_costs_the_paused_destination_nothing_10_0() {
    an_impostor_at_the_resume_port(QemuVersion::V10_0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impostor_at_the_resume_port_leaves_a_paused_7_2_destination_alone() {
    an_impostor_at_the_resume_port(QemuVersion::V7_2).await;
}

/// The sidecar's own preempt channel to the destination (the source has none,
/// protocol-spec/postcopy-sequence.md#sequence-own-preempt) through held cuts: the
/// destination never pauses, and its preempt connection outlives every source connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_are_held_with_the_sidecars_own_preempt_channel_10_0() {
    let (rig, sidecar) = Rig::start(QemuVersion::V10_0, false, |o| ReceiveOptions {
        own_preempt: true,
        ..o
    })
    .await;
    rig.postcopy().await;
    for _ in 0..5 {
        rig.advance(512 * 1024).await;
        rig.cut_and_resume(Link::cut).await;
    }
    let report = rig.finish(sidecar).await;
    own_preempt_was_used(&rig).await;
    assert_eq!(report.recoveries.len(), 5);
    assert!(report.recoveries.iter().all(|r| r.mode == "hold"));
    assert!(
        !rig.destination_states()
            .contains(&MigrationStatus::PostcopyPaused)
    );
}

/// Pass-through with the sidecar's own preempt channel: at each cut the destination pauses
/// and drops both its connections; its recovery waits for a new preempt connection, which
/// only the sidecar makes (10.0 blocks in POSTCOPY_RESUME without it, 7.2 never starts).
async fn pass_through_with_own_preempt(version: QemuVersion) {
    let (rig, sidecar) = Rig::start(version, false, |o| ReceiveOptions {
        on_cut: Some(CutPolicy::PassThrough),
        own_preempt: true,
        ..o
    })
    .await;
    rig.postcopy().await;
    for _ in 0..2 {
        rig.advance(256 * 1024).await;
        // See pass_through_relays_the_recovery_of_7_2.
        stop_destination_vcpus(&rig.dst).await;
        rig.cut_and_resume(Link::cut).await;
        cont_destination(&rig.dst).await;
    }
    let report = rig.finish(sidecar).await;
    own_preempt_was_used(&rig).await;
    assert_eq!(report.recoveries.len(), 2);
    assert!(report.recoveries.iter().all(|r| r.mode == "pass-through"));
    if version == QemuVersion::V10_0 {
        let paused = rig
            .destination_states()
            .iter()
            .filter(|s| **s == MigrationStatus::PostcopyPaused)
            .count();
        assert_eq!(paused, 2, "the destination paused at every cut");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pass_through_reopens_the_sidecars_own_preempt_channel_10_0() {
    pass_through_with_own_preempt(QemuVersion::V10_0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pass_through_reopens_the_sidecars_own_preempt_channel_7_2() {
    pass_through_with_own_preempt(QemuVersion::V7_2).await;
}

/// The destination ran with postcopy-preempt while the source had none: the channel it
/// waited for (before it loaded the package) was the sidecar's.
async fn own_preempt_was_used(rig: &Rig) {
    let cap = "postcopy-preempt";
    assert!(
        rig.dst.qmp().capability(cap).await.unwrap(),
        "the destination has postcopy-preempt"
    );
    assert!(
        !rig.src.qmp().capability(cap).await.unwrap(),
        "the source has no postcopy-preempt"
    );
}

/// The sidecar as its own process, so that it can be killed; its log lines are read like
/// a serial console, to wait on what it says.
struct SidecarProcess {
    child: tokio::process::Child,
    log: SerialLog,
}

impl SidecarProcess {
    fn start(qmp: &Path, listen: SocketAddr, state: &Path, extra: &[&str]) -> Self {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_postcopy-sidecar"))
            .env("RUST_LOG", "info")
            .args(["receive", "--quiet", "--qmp"])
            .arg(qmp)
            .arg("--listen")
            .arg(listen.to_string())
            .arg("--state-file")
            .arg(state)
            .args(extra)
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("starting the sidecar");
        let log = SerialLog::new(None).unwrap();
        log.spawn_reader(child.stderr.take().unwrap());
        SidecarProcess { child, log }
    }

    /// Waits for a log line containing `what`.
    async fn said(&self, what: &str) {
        if let Err(e) = self
            .log
            .wait_after(0, |l| l.contains(what), Duration::from_secs(120))
            .await
        {
            panic!(
                "the sidecar never said {what:?} ({e:?}):\n{}",
                self.log.tail(30)
            );
        }
    }

    fn kill(&mut self) {
        // SIGKILL: no cleanup of any kind.
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    async fn wait(mut self) -> (std::process::ExitStatus, String) {
        let st = tokio::time::timeout(Duration::from_secs(300), self.child.wait())
            .await
            .expect("the sidecar ends")
            .unwrap();
        (st, self.log.tail(40))
    }
}

/// Stops the destination's vCPUs before the sidecar is killed. Under TCG a vCPU delivers
/// interrupts holding QEMU's big lock; on a page that has not arrived it then blocks that
/// lock, and QEMU 10.0's main loop, which must accept the recovery connection of a paused
/// destination, freezes with it (protocol-spec/postcopy-sequence.md#sequence-takeover).
/// Stopped vCPUs take no interrupt. Under KVM vCPUs fault without the lock.
async fn stop_destination_vcpus(dst: &Vm) {
    dst.qmp()
        .execute_within(qapi::qmp::stop {}, STEP)
        .await
        .expect("stop");
}

/// Runs the destination's vCPUs again after the recovery.
async fn cont_destination(dst: &Vm) {
    dst.qmp()
        .execute_within(qapi::qmp::cont {}, STEP)
        .await
        .expect("cont");
}

/// Waits for the `MIGRATION` event of a pause after `cursor`: an event, not a query, as a
/// paused destination's main loop (which answers queries) may be blocked on guest memory.
async fn wait_paused(vm: &Vm, cursor: EventCursor, who: &str) {
    let s = vm
        .qmp()
        .wait_migration_status_after(cursor, &["postcopy-paused", "failed", "completed"], STEP)
        .await
        .unwrap_or_else(|e| panic!("the {who}: {e}; its stderr:\n{}", vm.stderr().tail(20)));
    assert_eq!(s, MigrationStatus::PostcopyPaused, "the {who} paused");
}

/// Kills the sidecar mid-postcopy: both QEMUs pause, and they recover directly, with the
/// procedure of deploy/README.md ("The sidecar died").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_sidecar_leaves_both_ends_recoverable_directly_10_0() {
    let (src, dst, dir) = vms(QemuVersion::V10_0, false).await;
    let port = free_port();
    let listen: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let state = dir.path().join("sidecar.state");
    let mut sidecar = SidecarProcess::start(dst.spare_qmp_path(), listen, &state, &[]);
    sidecar.said("waiting for the source").await;
    let dst_cursor = dst.qmp().event_cursor();
    start_postcopy_after(&src, &dst, listen, false, dst_cursor, 1).await;
    stop_destination_vcpus(&dst).await;
    let (sc, dc) = (src.qmp().event_cursor(), dst.qmp().event_cursor());
    sidecar.kill();
    wait_paused(&src, sc, "source").await;
    wait_paused(&dst, dc, "destination").await;
    recover_directly(&src, &dst).await;
}

/// The operator's procedure of deploy/README.md ("The sidecar died") on two paused ends:
/// the destination listens (out of band), the source resumes to it, both complete; then
/// the destination's vCPUs run again and the guest's memory is checked.
async fn recover_directly(src: &Vm, dst: &Vm) {
    let direct = format!("tcp:127.0.0.1:{}", free_port());
    dst.qmp()
        .migrate_recover(&direct, Duration::from_secs(10))
        .await
        .unwrap();
    src.qmp().migrate_resume(&direct).await.unwrap();
    for (vm, who) in [(src, "source"), (dst, "destination")] {
        let s = vm
            .qmp()
            .wait_migration_states(&["completed", "failed"], Duration::from_secs(300))
            .await
            .unwrap();
        assert_eq!(s, MigrationStatus::Completed, "{who}");
    }
    cont_destination(dst).await;
    let seen = need(dst.wait_progress(0, 2, PROGRESS).await);
    assert!(seen.iter().all(|p| p.mismatches == 0), "{seen:?}");
    need(dst.check_workload_clean());
}

/// A forwarder in front of the sidecar that decodes the source's main stream and, when
/// told, puts `record` into it at the next point between sections (never inside a
/// record, the RAM section or the package): a construct the sidecar's codec does not
/// know, arriving after the destination runs. Other connections are relayed untouched.
struct Injector {
    addr: SocketAddr,
    inject: tokio::sync::watch::Sender<Option<Vec<u8>>>,
    /// Main-stream offset at which the record went in, once it did.
    injected_at: tokio::sync::watch::Receiver<Option<u64>>,
}

impl Injector {
    async fn start(target: SocketAddr) -> Injector {
        use postcopy_sidecar::wire::{DecoderOptions, Step, StreamDecoder};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (inject, inject_rx) = tokio::sync::watch::channel(None::<Vec<u8>>);
        let (at_tx, injected_at) = tokio::sync::watch::channel(None);
        tokio::spawn(async move {
            let mut first = true;
            while let Ok((client, _)) = listener.accept().await {
                let up = tokio::net::TcpStream::connect(target).await.unwrap();
                let (mut cr, mut cw) = client.into_split();
                let (mut ur, mut uw) = up.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut ur, &mut cw).await;
                    let _ = cw.shutdown().await;
                });
                if !std::mem::take(&mut first) {
                    tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut cr, &mut uw).await;
                        let _ = uw.shutdown().await;
                    });
                    continue;
                }
                let (mut rx, at_tx) = (inject_rx.clone(), at_tx.clone());
                tokio::spawn(async move {
                    let mut dec = StreamDecoder::new(DecoderOptions::default());
                    let mut held: Vec<u8> = Vec::new();
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut done = false;
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if done {
                            if uw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                            continue;
                        }
                        held.extend_from_slice(&buf[..n]);
                        let mut pos = 0;
                        let record = rx.borrow_and_update().clone();
                        loop {
                            if let Some(r) = &record
                                && dec.close_open_section().is_empty()
                                && !dec.in_package()
                                && dec.offset() > 0
                            {
                                let _ = uw.write_all(&held[..pos]).await;
                                let _ = uw.write_all(r).await;
                                at_tx.send_replace(Some(dec.offset()));
                                done = true;
                                break;
                            }
                            match dec.next(&held[pos..]) {
                                Ok(Step::Event { len, .. }) => pos += len,
                                _ => break,
                            }
                        }
                        if done {
                            if uw.write_all(&held[pos..]).await.is_err() {
                                break;
                            }
                            held.clear();
                            continue;
                        }
                        if uw.write_all(&held[..pos]).await.is_err() {
                            break;
                        }
                        held.drain(..pos);
                    }
                    let _ = uw.shutdown().await;
                });
            }
        });
        Injector {
            addr,
            inject,
            injected_at,
        }
    }
}

/// An unknown command arrives in the source's stream after the destination runs the
/// guest (protocol-spec/admission.md, "After the destination runs"): the sidecar forwards
/// nothing of it, ends with an error naming it and its offset, both QEMUs pause (nothing
/// is lost: the destination holds what it received, the source the rest), and the
/// operator's direct recovery completes the migration with the guest intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_record_in_live_postcopy_pauses_both_ends_for_a_direct_recovery_10_0() {
    let (src, dst, dir) = vms(QemuVersion::V10_0, false).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sidecar = tokio::spawn(receive_on(
        listener,
        ReceiveOptions {
            report: Some(dir.path().join("report.json")),
            ..ReceiveOptions::new(dst.spare_qmp_path(), Listen::At(addr))
        },
    ));
    let mut injector = Injector::start(addr).await;
    let dst_cursor = dst.qmp().event_cursor();
    start_postcopy_after(&src, &dst, injector.addr, false, dst_cursor, 1).await;
    stop_destination_vcpus(&dst).await;
    let (sc, dc) = (src.qmp().event_cursor(), dst.qmp().event_cursor());
    // QEMU_VM_COMMAND (0x08), command 0x42 (no QEMU has it), 4 bytes of data.
    let record = [0x08, 0x00, 0x42, 0x00, 0x04, 1, 2, 3, 4].to_vec();
    injector.inject.send_replace(Some(record));
    let at = tokio::time::timeout(STEP, injector.injected_at.wait_for(Option::is_some))
        .await
        .expect("the record went into the stream")
        .unwrap()
        .unwrap();
    let report = match tokio::time::timeout(STEP, sidecar).await {
        Ok(Ok(Ok(report))) => report,
        other => panic!("the sidecar ends with a report: {other:?}"),
    };
    let e = report.error.clone().expect("an error");
    eprintln!("{}\n{e}", report.table());
    assert_eq!(report.outcome, "failed");
    assert!(
        (e.contains(&format!("main stream at offset {at}"))
            || e.contains(&format!("main stream at offset {}", at + 1)))
            && e.contains("unknown command 66"),
        "the error names the record and where it was: {e}"
    );
    assert!(
        report.timeline.run_ms.is_some(),
        "the destination ran first"
    );
    wait_paused(&src, sc, "source").await;
    wait_paused(&dst, dc, "destination").await;
    recover_directly(&src, &dst).await;
}

/// Kills the sidecar mid-postcopy and starts a new one with --recover: it reaches the
/// paused destination where the first one did (QEMU keeps that listener while paused) and
/// carries the source's resume to its address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_sidecar_takes_over_a_paused_migration_10_0() {
    takeover(true, false).await;
}

/// A restarted sidecar keeps the first one's promise of a preempt channel
/// (`--own-preempt`): the resumed destination waits for one that the source never opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_sidecar_reopens_its_own_preempt_channel_10_0() {
    takeover(true, true).await;
}

/// The same when the destination's QMP cannot be used (a paused destination's main loop
/// may be blocked on guest memory, and a new QMP session then cannot even negotiate):
/// the takeover needs nothing but the state file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_sidecar_takes_over_without_qmp_10_0() {
    takeover(false, false).await;
}

async fn takeover(with_qmp: bool, own_preempt: bool) {
    let (src, dst, dir) = vms(QemuVersion::V10_0, false).await;
    let port = free_port();
    let listen: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let state = dir.path().join("sidecar.state");
    let first_args: &[&str] = if own_preempt { &["--own-preempt"] } else { &[] };
    let mut first = SidecarProcess::start(dst.spare_qmp_path(), listen, &state, first_args);
    first.said("waiting for the source").await;
    let dst_cursor = dst.qmp().event_cursor();
    start_postcopy_after(&src, &dst, listen, false, dst_cursor, 1).await;
    // The state file is written once the stream reaches postcopy.
    first.said("takeover state written").await;
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    assert_eq!(written["own_preempt"], own_preempt, "{written}");
    stop_destination_vcpus(&dst).await;
    let (sc, dc) = (src.qmp().event_cursor(), dst.qmp().event_cursor());
    first.kill();
    wait_paused(&src, sc, "source").await;
    wait_paused(&dst, dc, "destination").await;
    let report = dir.path().join("second.json");
    let no_qmp = dir.path().join("no-such.qmp");
    let second = SidecarProcess::start(
        if with_qmp {
            dst.spare_qmp_path()
        } else {
            &no_qmp
        },
        listen,
        &state,
        &[
            "--recover",
            "--allow-paused",
            "--report",
            report.to_str().unwrap(),
        ],
    );
    if !with_qmp {
        second.said("destination QMP unavailable").await;
    }
    second.said("waiting for the source").await;
    let cursor = src.qmp().event_cursor();
    src.qmp()
        .migrate_resume(&format!("tcp:{listen}"))
        .await
        .unwrap();
    let s = src
        .qmp()
        .wait_migration_status_after(cursor, &["completed", "failed"], Duration::from_secs(300))
        .await
        .unwrap_or_else(|e| {
            panic!(
                "the resumed source: {e}; source events {:?}\nsidecar log:\n{}\ndestination stderr:\n{}",
                src.qmp().events_since(cursor),
                second.log.tail(30),
                dst.stderr().tail(10)
            )
        });
    if s != MigrationStatus::Completed {
        // The sidecar's last words may come a moment after the source's verdict.
        let _ = second
            .log
            .wait_after(
                0,
                |l| l.contains("migration failed"),
                Duration::from_secs(10),
            )
            .await;
        panic!(
            "the resumed source: {s:?}; source events {:?}\nsource stderr:\n{}\nsidecar log:\n{}\ndestination stderr:\n{}",
            src.qmp().events_since(cursor),
            src.stderr().tail(10),
            second.log.tail(40),
            dst.stderr().tail(40)
        );
    }
    if own_preempt {
        // The resumed destination waited for a preempt connection only a sidecar makes.
        second
            .said("opened the destination's preempt channel")
            .await;
    }
    let (status, log) = second.wait().await;
    cont_destination(&dst).await;
    assert!(status.success(), "second sidecar: {status}\n{log}");
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(r["recoveries"].as_array().unwrap().len(), 1, "{r}");
    let seen = need(dst.wait_progress(0, 2, PROGRESS).await);
    assert!(seen.iter().all(|p| p.mismatches == 0), "{seen:?}");
    need(dst.check_workload_clean());
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
