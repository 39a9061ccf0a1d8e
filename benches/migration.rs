//! Benchmark (not a test): the same guest workload migrated with postcopy directly
//! QEMU → QEMU and through the sidecar, alternating, in one run. Prints total time,
//! downtime, page requests, the destination's vCPU blocktime and fault-latency percentiles
//! for both paths, and their ratios.
//!
//! Fault latency is measured the same way on both paths, by the destination QEMU itself:
//! its trace (`-msg timestamp=on`) stamps each fault request of its fault thread and each
//! page placement; latency = placement of the page − first request for it.
//!
//! `tot+blk` is total time plus the vCPU's blocktime. On this 2-core host the running
//! guest's vCPU (under TCG, busy whenever it is not blocked) shares the cores with both
//! migration threads, so every millisecond the guest waits less is a millisecond taken
//! from moving its RAM: total alone rewards a path that keeps the guest blocked.
//!
//! The sidecar runs on a thread of its own with its own runtime, as in its own process,
//! so the harness's readers of the destination's trace do not queue in front of its
//! tasks. `cpu ms` is this process's CPU time during the migration: the harness alone in
//! direct modes, the harness and the sidecar in the others; `side ms` is the sidecar's
//! thread alone (its whole run), or the copy relay's two threads.
//!
//! `cargo bench --bench migration` (env: BENCH_ROUNDS, default 5; BENCH_MODES, a comma
//! list of the names in [`MODES`] (sidecar: requests first, prefetch and data pages
//! first; -plain: none of them; -no-data-first, -no-prefetch: all but that one;
//! -in-order: prefetch only, the queue in stream order; -mt: on a two-worker multi-thread
//! runtime instead of the one thread the binary gives it; -multifd: precopy with four
//! multifd channels; copy-relay: no sidecar but a plain copying relay, the floor of any
//! relay on this host,
//! as QEMU 10.0 refuses postcopy beside multifd), default [`DEFAULT_MODES`]; BENCH_WORKLOAD,
//! random, hot or idle; BENCH_TLS=1 for TLS on every path: the source's
//! migration is TLS, ended either by the destination QEMU or by the sidecar;
//! BENCH_READ_AHEAD_MIB, the sidecar's read-ahead). Needs
//! `scripts/setup.sh`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// CPU time of this process (the sidecar, and the harness beside it) during the
    /// migration, ms: what the sidecar takes from the two QEMUs on a shared host.
    cpu_ms: f64,
    /// CPU time of the sidecar's own thread (its whole run, set-up included), ms: the
    /// sidecar alone, without the harness's reading of QEMU's trace.
    sidecar_cpu_ms: f64,
}

/// User + system CPU time of this process so far, ms.
fn process_cpu_ms() -> f64 {
    cpu_ms(nix::sys::resource::UsageWho::RUSAGE_SELF)
}

/// User + system CPU time of `who` so far, ms.
fn cpu_ms(who: nix::sys::resource::UsageWho) -> f64 {
    let u = nix::sys::resource::getrusage(who).expect("getrusage");
    let ms = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 * 1e3 + t.tv_usec() as f64 / 1e3;
    ms(u.user_time()) + ms(u.system_time())
}

/// The cheapest relay there is, for the floor any relay pays on this host: one blocking
/// thread per direction copying 64 KiB reads, nothing parsed. Accepts one connection on
/// `listener`, connects it to `to`, and returns both threads' CPU time (ms) at the end.
fn copy_relay_thread(
    listener: std::net::TcpListener,
    to: std::net::SocketAddr,
) -> std::thread::JoinHandle<f64> {
    use std::io::{Read, Write};
    fn pump(mut from: std::net::TcpStream, mut to: std::net::TcpStream) -> f64 {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
        cpu_ms(nix::sys::resource::UsageWho::RUSAGE_THREAD)
    }
    listener.set_nonblocking(false).unwrap();
    std::thread::spawn(move || {
        let (src, _) = listener.accept().expect("source connection");
        let dst = std::net::TcpStream::connect(to).expect("destination");
        let (s2, d2) = (src.try_clone().unwrap(), dst.try_clone().unwrap());
        let back = std::thread::spawn(move || pump(d2, s2));
        let fwd = pump(src, dst);
        fwd + back.join().expect("return path")
    })
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

async fn once(mode: Mode, tls: Option<&Tls>, load: Load) -> Sample {
    let Mode {
        through_sidecar,
        preempt,
        requests_first,
        prefetch,
        own_preempt,
        multifd,
        data_first,
        copy_relay,
        multi_thread,
        ..
    } = mode;
    let multifd = multifd.then_some(4u8);
    let dir = tempfile::tempdir().unwrap();
    let spec = VmSpec::new(QemuBinary::find(QemuVersion::V10_0).expect("run scripts/setup.sh"))
        .name("bench")
        .ram_mib(512)
        .linux(load.wl);
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
    let mut relay_floor = None;
    let sidecar = if through_sidecar {
        let opts = ReceiveOptions {
            preempt,
            requests_first,
            prefetch,
            data_first,
            own_preempt,
            multifd,
            tls: TlsOptions {
                source: tls.map(|t| SourceTls::load(t.server.path(), true, Vec::new()).unwrap()),
                ..TlsOptions::default()
            },
            read_ahead: std::env::var("BENCH_READ_AHEAD_MIB")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .map_or(postcopy_sidecar::daemon::relay::DEFAULT_READ_AHEAD, |m| {
                    m << 20
                }),
            max_queued_units: std::env::var("BENCH_QUEUED_UNITS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(postcopy_sidecar::session::MAX_QUEUED_UNITS),
            ..ReceiveOptions::new(dst.spare_qmp_path(), Listen::At(addr))
        };
        let std_listener = listener.into_std().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("sidecar".into())
            .spawn(move || {
                // The runtime's own threads add their CPU time here as they stop.
                let workers_us = Arc::new(AtomicU64::new(0));
                let acc = workers_us.clone();
                let rt = if multi_thread {
                    tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(2)
                        .on_thread_stop(move || {
                            let ms = cpu_ms(nix::sys::resource::UsageWho::RUSAGE_THREAD);
                            acc.fetch_add((ms * 1000.0) as u64, Ordering::Relaxed);
                        })
                        .enable_all()
                        .build()
                } else {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                }
                .unwrap();
                let r = rt.block_on(async move {
                    receive_on(
                        tokio::net::TcpListener::from_std(std_listener).unwrap(),
                        opts,
                    )
                    .await
                });
                rt.shutdown_timeout(Duration::from_secs(10));
                let cpu = cpu_ms(nix::sys::resource::UsageWho::RUSAGE_THREAD)
                    + workers_us.load(Ordering::Relaxed) as f64 / 1000.0;
                let _ = tx.send((r, cpu));
            })
            .unwrap();
        Some(rx)
    } else {
        let q = dst.qmp();
        let mut caps = vec![("events", true), ("return-path", true)];
        if let Some(n) = multifd {
            q.set_parameters(serde_json::json!({"multifd-channels": n}))
                .await
                .unwrap();
            caps.push(("multifd", true));
        } else {
            caps.extend([("postcopy-ram", true), ("postcopy-blocktime", true)]);
        }
        if preempt {
            caps.push(("postcopy-preempt", true));
        }
        q.set_capabilities(&caps).await.unwrap();
        if tls.is_some() {
            q.set_parameters(serde_json::json!({"tls-creds": "tls0"}))
                .await
                .unwrap();
        }
        if copy_relay {
            let behind = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let to = behind.local_addr().unwrap();
            drop(behind);
            q.migrate_incoming(&format!("tcp:{to}")).await.unwrap();
            relay_floor = Some(copy_relay_thread(listener.into_std().unwrap(), to));
        } else {
            drop(listener);
            q.migrate_incoming(&format!("tcp:{addr}")).await.unwrap();
        }
        None
    };
    let cpu0 = process_cpu_ms();
    let r = send(&SendOptions {
        qmp: src.spare_qmp_path().to_path_buf(),
        to: addr,
        postcopy_after: multifd.is_none().then_some(load.postcopy_after),
        preempt,
        multifd,
        timeout: Duration::from_secs(300),
    })
    .await
    .unwrap();
    assert_eq!(r.status, "completed", "{r:?}");
    let cpu_ms = process_cpu_ms() - cpu0;
    let mut sidecar_cpu_ms = 0.0;
    if let Some(s) = sidecar {
        let (report, cpu) = s.await.unwrap();
        let report = report.unwrap();
        assert!(report.error.is_none(), "{:?}", report.error);
        sidecar_cpu_ms = cpu;
    }
    if let Some(t) = relay_floor {
        sidecar_cpu_ms = t.join().expect("copy relay");
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
        cpu_ms,
        sidecar_cpu_ms,
    }
}

/// One way to migrate, a row of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mode {
    name: &'static str,
    through_sidecar: bool,
    /// The sidecar reads ahead and sends requested pages ahead of its queue.
    requests_first: bool,
    /// The sidecar asks for a window of pages after an in-order fault.
    prefetch: bool,
    /// The source uses postcopy-preempt.
    preempt: bool,
    /// The sidecar opens the destination's preempt channel itself (the source has none).
    own_preempt: bool,
    /// Precopy with four multifd channels instead of postcopy.
    multifd: bool,
    /// The sidecar sends queued data pages before queued zero pages.
    data_first: bool,
    /// Not the sidecar: a plain copying relay in the path (the floor of any relay).
    copy_relay: bool,
    /// The sidecar on a two-worker multi-thread runtime instead of one thread (the
    /// `postcopy-sidecar` binary's `receive` runs on one: this mode is why).
    multi_thread: bool,
}

const fn mode(name: &'static str, sidecar: bool, rf: bool, pf: bool, preempt: bool) -> Mode {
    Mode {
        name,
        through_sidecar: sidecar,
        requests_first: rf,
        prefetch: pf,
        preempt,
        own_preempt: false,
        multifd: false,
        data_first: rf,
        copy_relay: false,
        multi_thread: false,
    }
}

/// Every mode; the default run leaves out the single-means sidecar modes.
const MODES: [Mode; 14] = [
    mode("direct", false, false, false, false),
    Mode {
        copy_relay: true,
        ..mode("copy-relay", false, false, false, false)
    },
    mode("sidecar", true, true, true, false),
    Mode {
        multi_thread: true,
        ..mode("sidecar-mt", true, true, true, false)
    },
    Mode {
        data_first: false,
        ..mode("sidecar-no-data-first", true, true, true, false)
    },
    mode("sidecar-plain", true, false, false, false),
    mode("sidecar-no-prefetch", true, true, false, false),
    mode("sidecar-in-order", true, false, true, false),
    Mode {
        own_preempt: true,
        ..mode("sidecar-own-preempt", true, true, true, false)
    },
    mode("direct-preempt", false, false, false, true),
    mode("sidecar-preempt", true, true, true, true),
    mode("sidecar-preempt-plain", true, false, false, true),
    Mode {
        multifd: true,
        ..mode("direct-multifd", false, false, false, false)
    },
    Mode {
        multifd: true,
        ..mode("sidecar-multifd", true, true, true, false)
    },
];

const DEFAULT_MODES: [&str; 7] = [
    "direct",
    "sidecar",
    "sidecar-plain",
    "sidecar-own-preempt",
    "direct-preempt",
    "sidecar-preempt",
    "sidecar-preempt-plain",
];

/// Medians over rounds (total, downtime, requests, blocktime) and pooled fault-latency
/// percentiles (p50, p90, p99) with the pooled fault count.
fn row(name: &str, s: &[Sample]) -> [f64; 11] {
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
        median(s.iter().map(|x| x.cpu_ms).collect()),
        median(s.iter().map(|x| x.sidecar_cpu_ms).collect()),
        median(s.iter().map(|x| x.total_ms + x.blocktime_ms).collect()),
    ];
    println!(
        "{name:<21} {:>9.0} {:>9.0} {:>9.0} {:>10.0} {:>9.0} {:>9.0} {:>9.0} {:>8.0} {:>7.0} {:>8.0} {:>8.0}",
        v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9], v[10]
    );
    v
}

/// What the guest does, and when the migration switches to postcopy.
#[derive(Debug, Clone, Copy)]
struct Load {
    wl: Workload,
    what: &'static str,
    postcopy_after: Duration,
}

/// The guest's workload: `BENCH_WORKLOAD=random` (default: 64 MiB verified and rewritten
/// at random, with postcopy from the start so all of it travels in postcopy: thousands of
/// faults per run), `hot` (a 16 MiB hot set in 192 MiB, postcopy after 0.5 s) or `idle`
/// (64 MiB filled, then verified slowly, postcopy from the start: the vCPU mostly halts, so
/// total time is the cost of moving the RAM alone, not shared with a running guest).
fn load() -> Load {
    match std::env::var("BENCH_WORKLOAD").as_deref() {
        Ok("hot") => Load {
            wl: Workload {
                mib: 192,
                mode: WorkloadMode::Hot,
                hot_mib: 16,
                seed: 3,
            },
            what: "rewriting a 16 MiB hot set in 192 MiB, postcopy after 0.5 s",
            postcopy_after: Duration::from_millis(500),
        },
        Ok("random") | Err(_) => Load {
            wl: Workload {
                mib: 64,
                mode: WorkloadMode::Random,
                hot_mib: 1,
                seed: 3,
            },
            what: "verifying and rewriting 64 MiB at random, postcopy from the start",
            postcopy_after: Duration::ZERO,
        },
        Ok("idle") => Load {
            wl: Workload {
                mib: 64,
                mode: WorkloadMode::Idle,
                hot_mib: 1,
                seed: 3,
            },
            what: "that filled 64 MiB and then only verifies, slowly, postcopy from the start",
            postcopy_after: Duration::ZERO,
        },
        Ok(other) => panic!("BENCH_WORKLOAD={other}: expected random, hot or idle"),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let tls = std::env::var("BENCH_TLS")
        .is_ok_and(|v| v == "1")
        .then(Tls::new);
    let modes: Vec<Mode> = match std::env::var("BENCH_MODES") {
        Ok(list) => list
            .split(',')
            .map(|n| {
                *MODES
                    .iter()
                    .find(|m| m.name == n.trim())
                    .unwrap_or_else(|| panic!("BENCH_MODES: unknown mode {n:?}"))
            })
            .collect(),
        Err(_) => MODES
            .iter()
            .filter(|m| DEFAULT_MODES.contains(&m.name))
            .copied()
            .collect(),
    };
    let load = load();
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); modes.len()];
    for i in 0..rounds {
        // Alternate so drift on a busy machine hits every mode alike.
        for (m, out) in modes.iter().zip(samples.iter_mut()) {
            out.push(once(*m, tls.as_ref(), load).await);
        }
        eprintln!("round {}/{rounds} done", i + 1);
    }
    println!(
        "postcopy{} of a 512 MiB guest {}{}; medians of {rounds} rounds; fault latency pooled over rounds",
        if tls.is_some() { " over TLS" } else { "" },
        load.what,
        if modes.iter().any(|m| m.multifd) {
            " (-multifd modes: precopy with four multifd channels instead)"
        } else {
            ""
        }
    );
    println!(
        "{:<21} {:>9} {:>9} {:>9} {:>10} {:>9} {:>9} {:>9} {:>8} {:>7} {:>8} {:>8}",
        "mode",
        "total ms",
        "down ms",
        "requests",
        "blocktime",
        "p50 µs",
        "p90 µs",
        "p99 µs",
        "faults",
        "cpu ms",
        "side ms",
        "tot+blk"
    );
    let rows: Vec<[f64; 11]> = modes
        .iter()
        .zip(&samples)
        .map(|(m, s)| row(m.name, s))
        .collect();
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    // Each sidecar mode against the direct mode with the same channels (the sidecar's own
    // preempt channel also against direct preempt, what it stands in for).
    for ((m, r), ms) in modes.iter().zip(&rows).zip(&samples) {
        if !m.through_sidecar && !m.copy_relay {
            continue;
        }
        for ((b, base), bs) in modes.iter().zip(&rows).zip(&samples).filter(|((b, _), _)| {
            !b.through_sidecar
                && !b.copy_relay
                && b.multifd == m.multifd
                && (b.preempt == m.preempt || (m.own_preempt && b.preempt))
        }) {
            println!(
                "ratio {}/{}: total {:.2}x, blocktime {:.2}x, p50 {:.2}x, p90 {:.2}x, p99 {:.2}x, total+blocktime {:.2}x",
                m.name,
                b.name,
                ratio(r[0], base[0]),
                ratio(r[3], base[3]),
                ratio(r[4], base[4]),
                ratio(r[5], base[5]),
                ratio(r[6], base[6]),
                ratio(r[10], base[10])
            );
            println!(
                "  paired by round (median, min-max): total {}, blocktime {}",
                paired(ms, bs, |x| x.total_ms),
                paired(ms, bs, |x| x.blocktime_ms)
            );
        }
    }
}

/// The ratios of `a` to `b` round by round (the modes alternate, so a round's two
/// migrations ran under the same load), as "median (min-max)": on two busy cores one
/// mode's median moves by more than the ratios themselves between runs, and the spread
/// says how far a ratio can be trusted.
fn paired(a: &[Sample], b: &[Sample], f: impl Fn(&Sample) -> f64) -> String {
    let mut v: Vec<f64> = a
        .iter()
        .zip(b)
        .filter(|(_, y)| f(y) > 0.0)
        .map(|(x, y)| f(x) / f(y))
        .collect();
    if v.is_empty() {
        return "-".into();
    }
    v.sort_by(|x, y| x.total_cmp(y));
    format!(
        "{:.2}x ({:.2}-{:.2})",
        median(v.clone()),
        v[0],
        v[v.len() - 1]
    )
}
