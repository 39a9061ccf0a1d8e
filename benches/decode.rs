//! Decode throughput of the main-stream decoder on the largest real capture under
//! `protocol-spec/captures/`, next to a plain memcpy of the same bytes (the floor any
//! relay pays), measured in the same run. Ends with one line comparing the two:
//! `decode: X GB/s, memcpy: Y GB/s, ratio Z%`.
//!
//! `cargo bench --bench decode`

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use postcopy_sidecar::inspect::read_capture;
use postcopy_sidecar::wire::{Step, StreamDecoder};

/// The largest capture's main stream (by compressed size), gunzipped once.
fn largest_capture() -> (String, Vec<u8>) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("protocol-spec/captures");
    let best = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", root.display()))
        .filter_map(|e| {
            let p = e.ok()?.path().join("main.fwd.gz");
            let len = std::fs::metadata(&p).ok()?.len();
            Some((len, p))
        })
        .max()
        .unwrap_or_else(|| panic!("no capture under {}", root.display()))
        .1;
    let data = read_capture(&best).unwrap_or_else(|e| panic!("{e}"));
    let name = best
        .parent()
        .and_then(|d| d.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    (name, data)
}

/// Decodes the whole stream the way a relay does (one buffer, event by event); returns
/// the number of events so the work cannot be optimised away.
fn decode(data: &[u8]) -> usize {
    let mut dec = StreamDecoder::default();
    let mut pos = 0;
    let mut events = 0;
    loop {
        match dec.next(&data[pos..]) {
            Ok(Step::Event { len, event, .. }) => {
                black_box(&event);
                pos += len;
                events += 1;
            }
            Ok(Step::NeedMore) => break,
            Err(e) => panic!("capture does not decode: {e}"),
        }
    }
    dec.finish(&data[pos..]).expect("capture ends cleanly");
    events
}

fn memcpy(src: &[u8], dst: &mut [u8]) {
    dst.copy_from_slice(black_box(src));
    black_box(dst);
}

/// Bytes per second of `f` over at least `budget` of wall time.
fn rate(bytes: usize, budget: Duration, mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    let mut n = 0u64;
    while n == 0 || start.elapsed() < budget {
        f();
        n += 1;
    }
    (bytes as f64 * n as f64) / start.elapsed().as_secs_f64()
}

fn main() {
    let (name, data) = largest_capture();
    let mut dst = vec![0u8; data.len()];
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    {
        let mut g = c.benchmark_group(format!("main-stream/{name}"));
        g.throughput(Throughput::Bytes(data.len() as u64));
        g.bench_function("decode", |b| b.iter(|| decode(black_box(&data))));
        g.bench_function("memcpy", |b| b.iter(|| memcpy(&data, &mut dst)));
        g.finish();
    }
    c.final_summary();

    // Criterion runs each function once in test mode (`cargo test --benches`): keep the
    // comparison short there.
    let benching = std::env::args().any(|a| a == "--bench");
    let budget = if benching {
        Duration::from_secs(1)
    } else {
        Duration::from_millis(10)
    };
    let d = rate(data.len(), budget, || {
        black_box(decode(black_box(&data)));
    });
    let m = rate(data.len(), budget, || memcpy(&data, &mut dst));
    println!(
        "capture {name} ({} bytes, {} events): decode: {:.2} GB/s, memcpy: {:.2} GB/s, ratio {:.1}%",
        data.len(),
        decode(&data),
        d / 1e9,
        m / 1e9,
        100.0 * d / m
    );
}
