//! Benchmark (not a test): the sidecar's page service against the bare `UFFDIO_COPY` fault
//! loop, on the synthetic destination, in one run (issue: fault-service benchmark).
//!
//! - **bare**: the destination's fault thread answers each fault at once with
//!   `UFFDIO_COPY` from memory: what this machine can do at best;
//! - **service**: the fault thread asks for the page with `REQ_PAGES_ID` over a socket;
//!   the sidecar's restore page service reads it from a page store (checked against its
//!   digest) and sends it as a RAM record; the destination's listen thread decodes it and
//!   places it with `UFFDIO_COPY` — the whole path of a fault in a lazy restore, with
//!   prefetch and background sweep off, so every page is one fault served;
//! - **echo**: the least any page service can do over the same protocol — a plain thread
//!   that answers each request from memory at once. Its gap to *bare* is what the extra
//!   hop costs by itself (one more wake-up each way per fault); the gap between *service*
//!   and *echo* is the sidecar's own work;
//! - **service+prefetch**: the same with the restore defaults (7 pages prefetched after
//!   each request, background sweep): fewer faults, so compare touch time, not faults/s.
//!
//! Rounds alternate the modes; medians are printed. Figures: faults served per second of
//! the workers' run, and fault → placement latency (µs) measured on the destination.
//!
//! `cargo bench --bench fault_service` (env: BENCH_ROUNDS, default 5; BENCH_PAGES, default
//! 65536 = 256 MiB; BENCH_CASES, workloads whose names contain one of these, e.g. `random`).

use std::sync::Arc;

use postcopy_sidecar::restore::Snapshot;
use postcopy_sidecar::restore::stream::ServeKnobs;
use postcopy_sidecar::synth::run::{RunFigures, Workload, bare, through_echo, through_restore};
use postcopy_sidecar::synth::snapshot;
use postcopy_sidecar::synth::touch::Pattern;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

struct Row {
    name: String,
    bare: Vec<RunFigures>,
    echo: Vec<RunFigures>,
    service: Vec<RunFigures>,
    prefetch: Vec<RunFigures>,
}

fn check(f: &RunFigures, what: &str) {
    assert_eq!(f.wrong_pages, 0, "{what}: wrong pages");
    assert_eq!(f.duplicates, 0, "{what}: pages sent twice");
}

fn main() {
    let rounds = env("BENCH_ROUNDS", 5);
    let pages = env("BENCH_PAGES", 65536);
    let seed = 42;
    let dir = tempfile::Builder::new()
        .prefix("bench-fault-service-")
        .tempdir()
        .unwrap();
    snapshot::write(dir.path(), pages, seed).unwrap();
    let snap = Arc::new(Snapshot::open(dir.path(), true).unwrap());
    let cases = [
        ("sequential, 1 worker", 1, Pattern::Sequential, pages),
        ("sequential, 4 workers", 4, Pattern::Sequential, pages),
        (
            "random, 4 workers",
            4,
            Pattern::Random { seed: 1 },
            pages / 4,
        ),
        (
            "hot set 1/16, 4 workers",
            4,
            Pattern::Hot {
                hot_pages: pages / 16,
                seed: 2,
            },
            pages / 4,
        ),
    ];
    // BENCH_CASES: run only the workloads whose names contain one of these (comma-separated).
    let only = std::env::var("BENCH_CASES").unwrap_or_default();
    let wanted = |name: &str| only.is_empty() || only.split(',').any(|w| name.contains(w.trim()));
    let mut rows = Vec::new();
    for (name, threads, pattern, touches) in cases.into_iter().filter(|c| wanted(c.0)) {
        let w = Workload {
            pages,
            threads,
            pattern,
            touches,
            seed,
        };
        let mut row = Row {
            name: name.into(),
            bare: Vec::new(),
            echo: Vec::new(),
            service: Vec::new(),
            prefetch: Vec::new(),
        };
        for _ in 0..rounds {
            let b = bare(w).expect("bare loop");
            check(&b, "bare");
            row.bare.push(b);
            let e = through_echo(w).expect("echo");
            check(&e, "echo");
            row.echo.push(e);
            let pure = ServeKnobs {
                prefetch: 0,
                background: false,
                working_set: false,
                sweep_rate: None,
            };
            let s = through_restore(w, snap.clone(), pure).expect("page service");
            check(&s, "service");
            row.service.push(s);
            let p = through_restore(w, snap.clone(), ServeKnobs::default()).expect("prefetch");
            check(&p, "service+prefetch");
            row.prefetch.push(p);
        }
        eprintln!("{name}: done");
        rows.push(row);
    }
    println!(
        "fault service on the synthetic destination, {pages} pages ({} MiB), medians of {rounds} rounds",
        (pages * 4096) >> 20
    );
    println!(
        "{:<24} | {:>9} {:>9} {:>9} {:>6} {:>6} | {:>7} {:>7} {:>7} | {:>7} {:>7} | {:>8} {:>8} {:>8}",
        "workload",
        "bare f/s",
        "echo f/s",
        "svc f/s",
        "s/bare",
        "s/echo",
        "bare µs",
        "echo µs",
        "svc µs",
        "b p99",
        "s p99",
        "bare ms",
        "svc ms",
        "+pref ms"
    );
    for r in &rows {
        let fps = |v: &[RunFigures]| median(v.iter().map(|f| f.faults_per_s()).collect());
        let mean = |v: &[RunFigures]| median(v.iter().map(|f| f.service.mean_us).collect());
        let p99 = |v: &[RunFigures]| median(v.iter().map(|f| f.service.p99_us).collect());
        let ms = |v: &[RunFigures]| {
            median(
                v.iter()
                    .map(|f| f.touch.elapsed.as_secs_f64() * 1000.0)
                    .collect(),
            )
        };
        let (b, e, s) = (fps(&r.bare), fps(&r.echo), fps(&r.service));
        println!(
            "{:<24} | {:>9.0} {:>9.0} {:>9.0} {:>5.0}% {:>5.0}% | {:>7.1} {:>7.1} {:>7.1} | {:>7.0} {:>7.0} | {:>8.1} {:>8.1} {:>8.1}",
            r.name,
            b,
            e,
            s,
            100.0 * s / b,
            100.0 * s / e,
            mean(&r.bare),
            mean(&r.echo),
            mean(&r.service),
            p99(&r.bare),
            p99(&r.service),
            ms(&r.bare),
            ms(&r.service),
            ms(&r.prefetch),
        );
    }
    println!(
        "s/bare, s/echo = service faults/s over bare / echo faults/s (target: s/bare >= 70%); µs = fault -> placement, mean; ms = time for the workers to finish"
    );
}
