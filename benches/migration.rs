//! Benchmark (not a test): the same guest workload migrated with postcopy directly
//! QEMU → QEMU and through the sidecar, alternating, in one run. Prints total time,
//! downtime, page requests, the destination's vCPU blocktime and fault-latency percentiles
//! for both paths, and their ratios.
//!
//! Fault latency is measured the same way on both paths, by the destination QEMU itself:
//! its trace (`-msg timestamp=on`) stamps each fault request of its fault thread and each
//! page placement; latency = placement of the page − first request for it.
//!
//! `cargo bench --bench migration` (env: BENCH_ROUNDS, default 3; BENCH_PREEMPT=1 for the
//! postcopy-preempt channel; BENCH_TLS=1 for TLS on both paths: the source's migration is
//! TLS, ended either by the destination QEMU or by the sidecar). Needs `scripts/setup.sh`.

use std::collections::HashMap;
use std::time::Duration;

use postcopy_sidecar::daemon::receive::{Listen, ReceiveOptions, TlsOptions, receive_on};
use postcopy_sidecar::daemon::tls::SourceTls;
use postcopy_sidecar::lab::{QemuBinary, QemuVersion, Vm, VmSpec, Workload, WorkloadMode};
use postcopy_sidecar::source::{SendOptions, send};

#[path = "../interop-tests/support/certs.rs"]
mod certs;

/// TLS credentials for a run: the source's client directory, the server directory the
/// destination QEMU (direct) or the sidecar uses.
struct Tls {
    client: tempfile::TempDir,
    server: tempfile::TempDir,
}

const TLS_NAME: &str = "bench.test";

impl Tls {
    fn new() -> Tls {
        let ca = certs::Ca::new("Bench CA");
        let client = tempfile::tempdir().unwrap();
        let server = tempfile::tempdir().unwrap();
        ca.write_dir(client.path(), None, Some(&ca.client("bench-source")));
        ca.write_dir(server.path(), Some(&ca.server("bench", &[TLS_NAME])), None);
        Tls { client, server }
    }
}

#[derive(Debug, Default, Clone)]
struct Sample {
    total_ms: f64,
    downtime_ms: f64,
    source_requests: f64,
    blocktime_ms: f64,
    faults: Vec<f64>,
}

fn parse_trace_time(line: &str) -> Option<(f64, &str)> {
    let (head, rest) = line.split_once(':')?;
    let (_, ts) = head.split_once('@')?;
    Some((ts.parse().ok()?, rest))
}

/// Fault latencies (µs) from the destination's trace lines.
fn fault_latencies(lines: &[String]) -> Vec<f64> {
    let mut pending: HashMap<u64, f64> = HashMap::new();
    let mut out = Vec::new();
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
    for l in lines {
        let Some((t, rest)) = parse_trace_time(l) else {
            continue;
        };
        if let Some(r) = rest.strip_prefix("postcopy_ram_fault_thread_request ") {
            if let Some(hva) = r
                .split_whitespace()
                .find_map(|w| w.strip_prefix("HVA="))
                .and_then(hex)
            {
                pending.entry(hva & !0xfff).or_insert(t);
            }
        } else if let Some(r) = rest
            .strip_prefix("postcopy_place_page host=")
            .or_else(|| rest.strip_prefix("postcopy_place_page_zero host="))
            && let Some(host) = hex(r.trim())
            && let Some(t0) = pending.remove(&(host & !0xfff))
        {
            out.push((t - t0) * 1e6);
        }
    }
    out
}

fn pct(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn median(mut v: Vec<f64>) -> f64 {
    pct(&mut v, 0.5)
}

async fn once(through_sidecar: bool, preempt: bool, tls: Option<&Tls>) -> Sample {
    let dir = tempfile::tempdir().unwrap();
    let spec = VmSpec::new(QemuBinary::find(QemuVersion::V10_0).expect("run scripts/setup.sh"))
        .name("bench")
        .ram_mib(512)
        .linux(Workload {
            mib: 192,
            mode: WorkloadMode::Hot,
            hot_mib: 16,
            seed: 3,
        });
    let dspec = spec
        .destination(QemuBinary::find(QemuVersion::V10_0).unwrap())
        .arg("-msg")
        .arg("timestamp=on")
        .arg("-trace")
        .arg("postcopy_ram_fault_thread_request")
        .arg("-trace")
        .arg("postcopy_place_page")
        .arg("-trace")
        .arg("postcopy_place_page_zero");
    let (sspec, dspec) = match tls {
        None => (spec.clone(), dspec),
        Some(t) => (
            spec.clone().arg("-object").arg(format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=client",
                t.client.path().display()
            )),
            dspec.arg("-object").arg(format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=server",
                t.server.path().display()
            )),
        ),
    };
    let src = Vm::spawn(&sspec, dir.path()).await.unwrap();
    if tls.is_some() {
        src.qmp()
            .set_parameters(serde_json::json!({"tls-creds": "tls0", "tls-hostname": TLS_NAME}))
            .await
            .unwrap();
    }
    src.wait_workload_ready(Duration::from_secs(300))
        .await
        .unwrap();
    src.wait_progress(src.serial().len(), 1, Duration::from_secs(120))
        .await
        .unwrap();
    let dst = Vm::spawn(&dspec, dir.path()).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sidecar = if through_sidecar {
        Some(tokio::spawn(receive_on(
            listener,
            ReceiveOptions {
                preempt,
                tls: TlsOptions {
                    source: tls
                        .map(|t| SourceTls::load(t.server.path(), true, Vec::new()).unwrap()),
                    ..TlsOptions::default()
                },
                ..ReceiveOptions::new(dst.spare_qmp_path(), Listen::At(addr))
            },
        )))
    } else {
        drop(listener);
        let q = dst.qmp();
        let mut caps = vec![
            ("events", true),
            ("postcopy-ram", true),
            ("return-path", true),
            ("postcopy-blocktime", true),
        ];
        if preempt {
            caps.push(("postcopy-preempt", true));
        }
        q.set_capabilities(&caps).await.unwrap();
        if tls.is_some() {
            q.set_parameters(serde_json::json!({"tls-creds": "tls0"}))
                .await
                .unwrap();
        }
        q.migrate_incoming(&format!("tcp:{addr}")).await.unwrap();
        None
    };
    let r = send(&SendOptions {
        qmp: src.spare_qmp_path().to_path_buf(),
        to: addr,
        postcopy_after: Some(Duration::from_millis(500)),
        preempt,
        timeout: Duration::from_secs(300),
    })
    .await
    .unwrap();
    assert_eq!(r.status, "completed", "{r:?}");
    if let Some(s) = sidecar {
        let report = s.await.unwrap().unwrap();
        assert!(report.error.is_none(), "{:?}", report.error);
    }
    dst.qmp()
        .wait_migration_end(Duration::from_secs(60))
        .await
        .unwrap();
    let blocktime = dst
        .qmp()
        .postcopy_blocktime_ms()
        .await
        .unwrap()
        .unwrap_or(0);
    Sample {
        total_ms: r.total_ms.unwrap_or(0) as f64,
        downtime_ms: r.downtime_ms.unwrap_or(0) as f64,
        source_requests: r.postcopy_requests.unwrap_or(0) as f64,
        blocktime_ms: blocktime as f64,
        faults: fault_latencies(&dst.stderr().lines()),
    }
}

fn row(name: &str, s: &[Sample]) -> [f64; 8] {
    let mut faults: Vec<f64> = s.iter().flat_map(|x| x.faults.iter().copied()).collect();
    let v = [
        median(s.iter().map(|x| x.total_ms).collect()),
        median(s.iter().map(|x| x.downtime_ms).collect()),
        median(s.iter().map(|x| x.source_requests).collect()),
        median(s.iter().map(|x| x.blocktime_ms).collect()),
        pct(&mut faults, 0.5),
        pct(&mut faults, 0.9),
        pct(&mut faults, 0.99),
        faults.len() as f64,
    ];
    println!(
        "{name:<10} {:>9.0} {:>9.0} {:>9.0} {:>10.0} {:>9.0} {:>9.0} {:>9.0} {:>8.0}",
        v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]
    );
    v
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let preempt = std::env::var("BENCH_PREEMPT").is_ok_and(|v| v == "1");
    let tls = std::env::var("BENCH_TLS")
        .is_ok_and(|v| v == "1")
        .then(Tls::new);
    let (mut direct, mut sidecar) = (Vec::new(), Vec::new());
    for i in 0..rounds {
        // Alternate so drift on a busy machine hits both paths alike.
        direct.push(once(false, preempt, tls.as_ref()).await);
        sidecar.push(once(true, preempt, tls.as_ref()).await);
        eprintln!("round {}/{rounds} done", i + 1);
    }
    println!(
        "postcopy{}{} of a 512 MiB guest rewriting a 16 MiB hot set in 192 MiB; medians of {rounds} rounds; fault latency pooled over rounds",
        if preempt { " with preempt" } else { "" },
        if tls.is_some() { " over TLS" } else { "" }
    );
    println!(
        "{:<10} {:>9} {:>9} {:>9} {:>10} {:>9} {:>9} {:>9} {:>8}",
        "path",
        "total ms",
        "down ms",
        "requests",
        "blocktime",
        "p50 µs",
        "p90 µs",
        "p99 µs",
        "faults"
    );
    let d = row("direct", &direct);
    let s = row("sidecar", &sidecar);
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    println!(
        "ratio sidecar/direct: total {:.2}x, blocktime {:.2}x, p50 fault latency {:.2}x ({:+.0} µs), p99 {:.2}x",
        ratio(s[0], d[0]),
        ratio(s[3], d[3]),
        ratio(s[4], d[4]),
        s[4] - d[4],
        ratio(s[6], d[6])
    );
}
