//! `receive --metrics`: the Prometheus endpoint is scraped during a real postcopy
//! migration of a running Linux guest and after it, and its figures must equal the final
//! report's; a stream that does not decode shows as a decode error and a failed migration.
//!
//! They need `scripts/setup.sh` to have run; without it they fail (never skip).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use postcopy_sidecar::daemon::metrics::Metrics;
use postcopy_sidecar::daemon::metrics_endpoint::{EndpointLimits, serve};
use postcopy_sidecar::daemon::receive::{Listen, ReceiveOptions, receive_on};
use postcopy_sidecar::lab::{
    LabError, QemuBinary, QemuVersion, Vm, VmSpec, Workload, WorkloadMode,
};
use postcopy_sidecar::source::{SendOptions, send};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BOOT: Duration = Duration::from_secs(180);
const MIGRATION: Duration = Duration::from_secs(300);
const PROGRESS: Duration = Duration::from_secs(120);

fn need<T>(r: Result<T, LabError>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

/// One scrape: `name{labels}` → value, as the exposition prints them.
type Scrape = HashMap<String, f64>;

/// GETs `/metrics` with hyper's client and parses the sample lines.
async fn scrape(addr: std::net::SocketAddr) -> Scrape {
    let sock = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(sock))
        .await
        .expect("HTTP handshake");
    tokio::spawn(conn);
    let req = hyper::Request::get("/metrics")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let res = tx.send_request(req).await.expect("GET /metrics");
    assert_eq!(res.status(), 200);
    let ct = res.headers()[hyper::header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .to_string();
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    use http_body_util::BodyExt;
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert!(text.trim_end().ends_with("# EOF"), "{text}");
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').expect("sample line");
            (k.to_string(), v.parse::<f64>().expect("sample value"))
        })
        .collect()
}

/// Sum of the samples of `name` whose labels contain every `key="value"` in `with`.
fn sum(s: &Scrape, name: &str, with: &[&str]) -> f64 {
    s.iter()
        .filter(|(k, _)| {
            let (n, labels) = k.split_once('{').unwrap_or((k, ""));
            n == name && with.iter().all(|w| labels.contains(w))
        })
        .map(|(_, v)| v)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrapes_during_a_real_migration_agree_with_the_final_report() {
    let dir = tempfile::Builder::new()
        .prefix("metrics-")
        .tempdir()
        .unwrap();
    let spec = VmSpec::new(need(QemuBinary::find(QemuVersion::V10_0)))
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
            &spec.destination(need(QemuBinary::find(QemuVersion::V10_0))),
            dir.path(),
        )
        .await,
    );

    let metrics = Arc::new(Metrics::new());
    let server = serve(
        "127.0.0.1:0".parse().unwrap(),
        metrics.clone(),
        EndpointLimits::default(),
    )
    .expect("metrics endpoint");
    let maddr = server.addr();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cursor = dst.qmp().event_cursor();
    let sidecar = tokio::spawn(receive_on(
        listener,
        ReceiveOptions {
            metrics: Some(metrics.clone()),
            ..ReceiveOptions::new(dst.spare_qmp_path(), Listen::At(addr))
        },
    ));
    let qmp = src.spare_qmp_path().to_path_buf();
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
    dst.qmp()
        .wait_migration_status_after(cursor, &["postcopy-active"], MIGRATION)
        .await
        .expect("postcopy starts");
    let during = scrape(maddr).await;
    assert!(
        sum(
            &during,
            "postcopy_sidecar_bytes_total",
            &[r#"channel="main""#]
        ) > 0.0
    );
    assert!(
        sum(
            &during,
            "postcopy_sidecar_pages_total",
            &[r#"phase="precopy""#]
        ) > 0.0
    );
    assert_eq!(sum(&during, "postcopy_sidecar_migrations_total", &[]), 0.0);

    let report = tokio::time::timeout(MIGRATION, sidecar)
        .await
        .unwrap()
        .unwrap()
        .expect("sidecar");
    assert_eq!(report.outcome, "completed", "{:?}", report.error);
    assert_eq!(source.await.unwrap().status, "completed");
    let after = scrape(maddr).await;
    server.abort();
    eprintln!("{}", report.table());

    let b = |ch: &str| {
        sum(
            &after,
            "postcopy_sidecar_bytes_total",
            &[&format!(r#"channel="{ch}""#)],
        ) as u64
    };
    assert_eq!(b("main"), report.bytes.main);
    assert_eq!(b("preempt"), report.bytes.preempt);
    assert_eq!(b("return_path"), report.bytes.return_path);
    let p = |phase: &str, kind: &str| {
        sum(
            &after,
            "postcopy_sidecar_pages_total",
            &[&format!(r#"phase="{phase}""#), &format!(r#"kind="{kind}""#)],
        ) as u64
    };
    assert_eq!(p("precopy", "page"), report.precopy.pages);
    assert_eq!(p("precopy", "zero"), report.precopy.zero_pages);
    assert_eq!(p("postcopy", "page"), report.postcopy.pages);
    assert_eq!(p("postcopy", "zero"), report.postcopy.zero_pages);
    assert!(report.postcopy.pages > 0);
    let r = &report.requests;
    assert_eq!(
        sum(&after, "postcopy_sidecar_request_messages_total", &[]) as u64,
        r.messages
    );
    let q = |o: &str| {
        sum(
            &after,
            "postcopy_sidecar_requested_pages_total",
            &[&format!(r#"outcome="{o}""#)],
        ) as u64
    };
    assert_eq!(q("forwarded"), r.forwarded_pages);
    assert_eq!(q("deduplicated"), r.deduplicated_pages);
    assert_eq!(q("already_delivered"), r.already_delivered_pages);
    assert_eq!(
        sum(&after, "postcopy_sidecar_requests_in_flight", &[]) as u64,
        r.outstanding_pages
    );
    assert_eq!(
        sum(&after, "postcopy_sidecar_fault_service_seconds_count", &[]) as u64,
        report.latency.count
    );
    assert_eq!(
        sum(
            &after,
            "postcopy_sidecar_migrations_total",
            &[r#"outcome="completed""#]
        ),
        1.0
    );
    assert_eq!(
        sum(&after, "postcopy_sidecar_decode_errors_total", &[]),
        0.0
    );
    // Counters never go back between scrapes.
    for (k, v) in &during {
        if k.contains("_total") {
            assert!(after.get(k).copied().unwrap_or(0.0) >= *v, "{k} went back");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_does_not_decode_counts_as_a_decode_error_and_a_failure() {
    let dir = tempfile::tempdir().unwrap();
    let dst = need(
        Vm::spawn(
            &VmSpec::new(need(QemuBinary::find(QemuVersion::V10_0)))
                .firmware_only()
                .destination(need(QemuBinary::find(QemuVersion::V10_0))),
            dir.path(),
        )
        .await,
    );
    let metrics = Arc::new(Metrics::new());
    let server = serve(
        "127.0.0.1:0".parse().unwrap(),
        metrics.clone(),
        EndpointLimits::default(),
    )
    .unwrap();
    let maddr = server.addr();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sidecar = tokio::spawn(receive_on(
        listener,
        ReceiveOptions {
            metrics: Some(metrics.clone()),
            ..ReceiveOptions::new(dst.spare_qmp_path(), Listen::At(addr))
        },
    ));
    // Refused at the door: never the migration, never a decode error of its.
    let mut early = tokio::net::TcpStream::connect(addr).await.unwrap();
    early.write_all(b"QEVM\x00\x00\x00\x03\x42").await.unwrap();
    let mut buf = [0u8; 1];
    let _ = tokio::time::timeout(MIGRATION, early.read(&mut buf)).await;
    // Admitted (its opening fits the destination), then bytes that do not decode.
    let blocks = dst.qmp().ram_blocks().await.unwrap();
    let list: Vec<(&[u8], u64)> = blocks.iter().map(|b| (b.name.as_bytes(), b.used)).collect();
    let mut bytes = Vec::new();
    postcopy_sidecar::wire::compose::put_opening(&mut bytes, b"pc-q35-10.0", 2, &list);
    bytes.push(0x42); // no such section type
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(&bytes).await.unwrap();
    let report = tokio::time::timeout(MIGRATION, sidecar)
        .await
        .unwrap()
        .unwrap()
        .expect("a report");
    assert_eq!(report.outcome, "failed");
    let after = scrape(maddr).await;
    server.abort();
    assert_eq!(
        sum(
            &after,
            "postcopy_sidecar_decode_errors_total",
            &[r#"channel="main""#, r#"kind="unknown_section_type""#]
        ),
        1.0,
        "{after:?}"
    );
    assert_eq!(
        sum(
            &after,
            "postcopy_sidecar_migrations_total",
            &[r#"outcome="failed""#]
        ),
        1.0
    );
    assert_eq!(
        sum(
            &after,
            "postcopy_sidecar_refused_connections_total",
            &[r#"kind="handshake""#]
        ),
        1.0,
        "{after:?}"
    );
    assert_eq!(report.refused_connections.total, 1);
}
