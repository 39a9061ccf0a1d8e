//! Benchmark (not a test): what the session core costs per byte carried, next to the copy
//! every relay pays for the same bytes, measured in the same run.
//!
//! The core is fed real postcopy captures under `protocol-spec/captures/` ([`CAPTURES`]) the
//! way the main pump feeds it (reads of the relay's chunk size into one buffer, the queue
//! drained in the relay's write batches), with data pages first on and off. On a host
//! whose cores the two QEMUs already keep busy, every ns here is taken from the
//! migration, so this is the figure to watch when changing the queue or the decoder.
//! A composed stream of a 512 MiB guest with the migration bench's mix of data and zero
//! pages follows, which fills the queue to the bound it reaches there. Ends with one line
//! per stream and mode: `session (...): X ns/record, Y GB/s; memcpy: Z GB/s`.
//!
//! `cargo bench --bench session` (env: BENCH_QUEUED_UNITS, the queue's record bound).

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use postcopy_sidecar::daemon::relay::{DEFAULT_READ_AHEAD, READ_CHUNK, ReadBuffer};
use postcopy_sidecar::inspect::read_capture;
use postcopy_sidecar::session::{Session, SessionConfig};

/// The captures carried: a Linux guest's postcopy (mostly data pages) and an idle
/// guest's (mostly zero pages, where the cost per record shows).
const CAPTURES: [&str; 2] = ["10.0-linux-preempt", "10.0-idle-postcopy"];

/// A capture's main stream, gunzipped.
fn capture(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("protocol-spec/captures")
        .join(name)
        .join("main.fwd.gz");
    read_capture(&p).unwrap_or_else(|e| panic!("{e}"))
}

/// A composed postcopy stream of a guest of `mib` MiB sent from the start of postcopy,
/// about a quarter data pages, the rest zero pages, in address order: the mix of the
/// migration bench's guest, at its size, so the queue reaches the bound it reaches there.
fn composed(mib: u64) -> Vec<u8> {
    use postcopy_sidecar::wire::compose::{
        RamSections, put_opening, put_page, put_postcopy_switch, put_zero,
    };
    const PAGE: u64 = 4096;
    let ram = RamSections {
        section_id: 2,
        footers: true,
    };
    let mut out = Vec::new();
    put_opening(&mut out, b"pc-q35-10.0", 2, &[(b"pc.ram", mib << 20)]);
    put_postcopy_switch(&mut out, b"device state");
    let pages = (mib << 20) / PAGE;
    let mut data = [0u8; PAGE as usize];
    for part in (0..pages).collect::<Vec<_>>().chunks(1024) {
        ram.open_part(&mut out);
        for &p in part {
            let name = (p == 0).then_some(&b"pc.ram"[..]);
            if p.wrapping_mul(2654435761) % 100 < 27 {
                data[..8].copy_from_slice(&p.to_le_bytes());
                put_page(&mut out, name, p * PAGE, &data);
            } else {
                put_zero(&mut out, name, p * PAGE);
            }
        }
        ram.close(&mut out);
    }
    ram.open_end(&mut out);
    ram.close(&mut out);
    out.push(0); // EOF
    out
}

/// Carries the whole stream through a fresh session, as the main pump does: read, queue,
/// hand out. Returns the records queued (page records and other pieces) so the work
/// cannot be optimised away.
fn carry(data: &[u8], data_first: bool) -> usize {
    let now = Instant::now();
    let mut s = Session::new(
        SessionConfig {
            data_first,
            max_queued_units: std::env::var("BENCH_QUEUED_UNITS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(postcopy_sidecar::session::MAX_QUEUED_UNITS),
            ..SessionConfig::default()
        },
        now,
    );
    s.source_main_connected(now).expect("first connection");
    let epoch = s.epoch();
    // Read buffers are reused once their records are all handed out, as in the relay:
    // fresh memory would be measured as page faults, not as the core.
    let mut rb = ReadBuffer::default();
    let mut units = 0;
    for chunk in data.chunks(READ_CHUNK) {
        rb.room();
        let buf = &mut rb.cur;
        buf.extend_from_slice(chunk);
        let step = s.queue_source_main(epoch, buf, now);
        assert!(step.error.is_none(), "{:?}", step.error);
        units = units.max(s.main_queued_bytes());
        // The destination is slower than the source, as in a real migration: the queue
        // stays at its bound (what lets data pages pass zero pages) and drains in write
        // batches.
        while !s.main_wants_more(DEFAULT_READ_AHEAD) {
            black_box(s.take_main_out(64 * 1024));
        }
    }
    loop {
        let out = s.take_main_out(64 * 1024);
        if out.is_empty() {
            break;
        }
        black_box(&out);
    }
    black_box(units)
}

/// Page and other records in the stream, for the per-record figure.
fn records(data: &[u8]) -> usize {
    let mut dec = postcopy_sidecar::wire::StreamDecoder::default();
    let (mut pos, mut n) = (0, 0);
    while let Ok(postcopy_sidecar::wire::Step::Event { len, .. }) = dec.next(&data[pos..]) {
        pos += len;
        n += 1;
    }
    assert_eq!(pos, data.len(), "the capture decodes to its end");
    n
}

/// Seconds per run of `f`, the best of runs over at least `budget` (the least disturbed).
fn best(budget: Duration, mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    let mut best = f64::MAX;
    while best == f64::MAX || start.elapsed() < budget {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    best
}

fn main() {
    // `cargo test --benches` runs each bench once: keep it short there.
    let budget = if std::env::args().any(|a| a == "--bench") {
        Duration::from_secs(3)
    } else {
        Duration::from_millis(10)
    };
    let streams = CAPTURES
        .iter()
        .map(|n| (format!("capture {n}"), capture(n)))
        .chain(std::iter::once((
            "composed 512 MiB guest".to_string(),
            composed(512),
        )));
    for (name, data) in streams {
        let n = records(&data);
        let mut dst = vec![0u8; data.len()];
        let copy = best(budget, || {
            dst.copy_from_slice(black_box(&data));
            black_box(&dst);
        });
        for data_first in [true, false] {
            let t = best(budget, || {
                black_box(carry(black_box(&data), data_first));
            });
            println!(
                "{name} ({} bytes, {n} records), session (data first {}): {:.0} ns/record, {:.2} GB/s, {:.2} ms; memcpy: {:.2} GB/s, ratio {:.1}%",
                data.len(),
                if data_first { "on" } else { "off" },
                t * 1e9 / n as f64,
                data.len() as f64 / t / 1e9,
                t * 1e3,
                data.len() as f64 / copy / 1e9,
                100.0 * copy / t
            );
        }
    }
}
