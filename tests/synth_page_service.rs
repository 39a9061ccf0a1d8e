//! The restore page service against the synthetic destination (no QEMU): every fault is
//! answered over the real protocol, each page placed exactly once with the source's
//! content, with and without prefetch and background sweep; and the bare loop the
//! benchmark compares with is correct too.

use std::sync::Arc;

use postcopy_sidecar::restore::Snapshot;
use postcopy_sidecar::restore::stream::ServeKnobs;
use postcopy_sidecar::synth::run::{Workload, bare, through_echo, through_restore};
use postcopy_sidecar::synth::snapshot;
use postcopy_sidecar::synth::touch::Pattern;

const PAGES: usize = 2048;
const SEED: u64 = 77;

fn snap(dir: &tempfile::TempDir) -> Arc<Snapshot> {
    snapshot::write(dir.path(), PAGES, SEED).unwrap();
    Arc::new(Snapshot::open(dir.path(), true).unwrap())
}

fn workload(threads: usize, pattern: Pattern) -> Workload {
    Workload {
        pages: PAGES,
        threads,
        pattern,
        touches: PAGES,
        seed: SEED,
    }
}

#[test]
fn the_bare_loop_places_every_touched_page_correctly() {
    let f = bare(workload(2, Pattern::Sequential)).unwrap();
    assert_eq!(f.service.count, PAGES as u64);
    assert_eq!(f.wrong_pages, 0);
}

#[test]
fn the_echo_floor_answers_every_fault_correctly() {
    let f = through_echo(workload(4, Pattern::Random { seed: 4 })).unwrap();
    assert_eq!((f.duplicates, f.wrong_pages), (0, 0));
    assert_eq!(f.placed, f.service.count);
}

#[test]
fn pure_fault_service_answers_every_fault_once_with_the_right_page() {
    let dir = tempfile::tempdir().unwrap();
    let knobs = ServeKnobs {
        prefetch: 0,
        background: false,
        working_set: false,
        sweep_rate: None,
    };
    for (threads, pattern) in [
        (1, Pattern::Sequential),
        (4, Pattern::Random { seed: 3 }),
        (
            2,
            Pattern::Hot {
                hot_pages: 64,
                seed: 5,
            },
        ),
    ] {
        let f = through_restore(workload(threads, pattern), snap(&dir), knobs).unwrap();
        assert_eq!(f.duplicates, 0, "{pattern:?}: a page was sent twice");
        assert_eq!(f.wrong_pages, 0, "{pattern:?}");
        assert_eq!(
            f.placed, f.service.count,
            "{pattern:?}: only faulted pages are sent"
        );
        if pattern == Pattern::Sequential {
            assert_eq!(f.placed, PAGES as u64);
        }
        std::fs::remove_dir_all(dir.path()).ok();
        std::fs::create_dir_all(dir.path()).unwrap();
    }
}

#[test]
fn with_prefetch_and_background_every_page_arrives_once() {
    let dir = tempfile::tempdir().unwrap();
    let f = through_restore(
        workload(2, Pattern::Random { seed: 9 }),
        snap(&dir),
        ServeKnobs::default(),
    )
    .unwrap();
    assert_eq!(
        f.placed, PAGES as u64,
        "the background sweep sends every page"
    );
    assert_eq!(f.duplicates, 0);
    assert_eq!(f.wrong_pages, 0);
}

/// A paced sweep (`restore --sweep-rate`) still brings every page exactly once, while
/// the guest's faults are served at once, not at the sweep's pace; and it does keep to
/// its rate: the pages it swept took at least their share of time.
#[test]
fn a_paced_sweep_delivers_every_page_once_and_keeps_to_its_rate() {
    let dir = tempfile::tempdir().unwrap();
    // 8 MiB of RAM at 16 MiB/s: a sweep of its own would take half a second.
    let rate = 16u64 << 20;
    let t0 = std::time::Instant::now();
    let f = through_restore(
        workload(2, Pattern::Random { seed: 21 }),
        snap(&dir),
        ServeKnobs {
            working_set: false,
            sweep_rate: Some(rate),
            ..ServeKnobs::default()
        },
    )
    .unwrap();
    let took = t0.elapsed();
    let s = f.served.expect("the service's figures");
    assert_eq!(
        (f.placed, f.duplicates, f.wrong_pages),
        (PAGES as u64, 0, 0),
        "{s:?}"
    );
    assert!(s.requested_pages > 0, "faults were served: {s:?}");
    assert!(s.background_pages > 0, "the sweep ran: {s:?}");
    let floor =
        std::time::Duration::from_secs_f64((s.background_pages - 1) as f64 * 4096.0 / rate as f64);
    assert!(
        took >= floor,
        "{} swept pages in {took:?}, faster than {rate} B/s allows ({floor:?})",
        s.background_pages
    );
}

/// A restore that records the snapshot's working set holds its sweep while the guest keeps
/// asking (protocol-spec/snapshot.md#snapshot-working-set): a worker walking every page in
/// order gets each one by its own request or the prefetch window after it, never from the
/// sweep, so the record holds every page it touched. Without recording, the sweep runs
/// from the start and brings pages ahead of the worker.
#[test]
fn a_recording_restore_holds_its_sweep_while_the_guest_keeps_asking() {
    let dir = tempfile::tempdir().unwrap();
    let f = through_restore(
        workload(1, Pattern::Sequential),
        snap(&dir),
        ServeKnobs::default(),
    )
    .unwrap();
    let s = f.served.expect("the service's figures");
    assert_eq!(s.background_pages, 0, "the sweep waited: {s:?}");
    assert_eq!(
        s.requested_pages + s.prefetched_pages,
        PAGES as u64,
        "{s:?}"
    );
    assert_eq!(
        (f.placed, f.duplicates, f.wrong_pages),
        (PAGES as u64, 0, 0)
    );

    let dir = tempfile::tempdir().unwrap();
    let g = through_restore(
        workload(1, Pattern::Sequential),
        snap(&dir),
        ServeKnobs {
            working_set: false,
            ..ServeKnobs::default()
        },
    )
    .unwrap();
    let s = g.served.expect("the service's figures");
    assert!(
        s.background_pages > 0,
        "not recording, the sweep ran: {s:?}"
    );
    assert_eq!(
        (g.placed, g.duplicates, g.wrong_pages),
        (PAGES as u64, 0, 0)
    );
}

/// Serves a snapshot to a destination socket that never reads nor asks, with or
/// without a background sweep, until the service gives up; returns its error and how
/// long it took, against a `timeout` of 300 ms.
fn serve_a_dead_destination(background: bool) -> (String, std::time::Duration) {
    use postcopy_sidecar::restore::stream::serve;
    let dir = tempfile::tempdir().unwrap();
    let s = snap(&dir);
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let knobs = ServeKnobs {
        prefetch: 0,
        background,
        working_set: false,
        sweep_rate: None,
    };
    let t0 = std::time::Instant::now();
    let e = serve(&s, &ours, knobs, Vec::new(), DEAD_TIMEOUT).expect_err("a dead destination");
    let took = t0.elapsed();
    drop(theirs);
    (e.to_string(), took)
}

const DEAD_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(300);

/// A destination that falls silent (its return path open, nothing asked, nothing left to
/// sweep) is given up on after the timeout, never before it, with the reason named.
#[test]
fn a_silent_destination_is_given_up_on_after_the_timeout_not_before() {
    let (e, took) = serve_a_dead_destination(false);
    assert!(e.contains("waiting for the destination to finish"), "{e}");
    assert!(took >= DEAD_TIMEOUT, "gave up after {took:?}");
}

/// A destination that stops reading (its socket full, the sweep still going) is given up
/// on too: a page service never blocks forever on a stuck destination.
#[test]
fn a_destination_that_stops_reading_is_given_up_on_after_the_timeout() {
    let (e, took) = serve_a_dead_destination(true);
    assert!(e.contains("writing to the destination"), "{e}");
    assert!(e.contains("timed out"), "{e}");
    assert!(took >= DEAD_TIMEOUT, "gave up after {took:?}");
}
