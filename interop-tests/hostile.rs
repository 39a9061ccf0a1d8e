//! A hostile network at the sidecar's port, against real QEMUs: peers that stay silent,
//! send random bytes, a crafted opening declaring a 2^60-byte block, a block the
//! destination lacks, endless configuration subsections, an opening that never ends, and
//! connections from an address outside `--allow-from`, all before (and while) the real
//! source migrates. Each is refused with its reason and counted, nothing of theirs reaches
//! the destination, and the real postcopy migration completes with the guest intact.
//!
//! They need `scripts/setup.sh` to have run; without it they fail (never skip).

use std::net::SocketAddr;
use std::time::Duration;

use postcopy_sidecar::daemon::receive::{Listen, ReceiveOptions, receive_on};
use postcopy_sidecar::lab::{
    LabError, QemuBinary, QemuVersion, Vm, VmSpec, Workload, WorkloadMode,
};
use postcopy_sidecar::qmp::{MigrationStatus, migration_event_status};
use postcopy_sidecar::session::admission::AllowList;
use postcopy_sidecar::source::{SendOptions, send};
use postcopy_sidecar::wire::compose::put_opening;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const BOOT: Duration = Duration::from_secs(180);
const MIGRATION: Duration = Duration::from_secs(300);
const PROGRESS: Duration = Duration::from_secs(120);

fn need<T>(r: Result<T, LabError>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

/// Connects to `to` from the local address `from` (another loopback address stands for
/// another host).
async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(format!("{from}:0").parse().unwrap()).unwrap();
    s.connect(to).await.unwrap()
}

/// Sends `bytes` and keeps the connection open (returned, so the peer stays there).
async fn peer_sending(to: SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(to).await.unwrap();
    s.write_all(bytes).await.unwrap();
    s
}

/// An opening built like QEMU's, with the given block list.
fn opening(blocks: &[(&[u8], u64)]) -> Vec<u8> {
    let mut v = Vec::new();
    put_opening(&mut v, b"pc-q35-10.0", 2, blocks);
    v
}

/// Header and a configuration whose target-page-bits subsection repeats without end.
fn endless_subsections() -> Vec<u8> {
    let mut b = b"QEVM\0\0\0\x03".to_vec();
    b.push(0x07);
    b.extend_from_slice(&11u32.to_be_bytes());
    b.extend_from_slice(b"pc-q35-10.0");
    let name = b"configuration/target-page-bits";
    for _ in 0..1000 {
        b.push(0x05);
        b.push(name.len() as u8);
        b.extend_from_slice(name);
        b.extend_from_slice(&1u32.to_be_bytes());
        b.extend_from_slice(&12u32.to_be_bytes());
    }
    b
}

fn random_bytes(n: usize, mut x: u64) -> Vec<u8> {
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_peers_never_keep_the_real_source_out_10_0() {
    let dir = tempfile::Builder::new()
        .prefix("hostile-")
        .tempdir()
        .unwrap();
    let spec = VmSpec::new(need(QemuBinary::find(QemuVersion::V10_0)))
        .name("src")
        .ram_mib(256)
        .linux(Workload {
            mib: 96,
            mode: WorkloadMode::Hot,
            hot_mib: 16,
            seed: 23,
        });
    let src = need(Vm::spawn(&spec, dir.path()).await);
    need(src.wait_workload_ready(BOOT).await);
    let dst = need(
        Vm::spawn(
            &spec.destination(need(QemuBinary::find(QemuVersion::V10_0))),
            dir.path(),
        )
        .await,
    );
    let blocks = dst.qmp().ram_blocks().await.unwrap();
    let big = blocks.iter().max_by_key(|b| b.used).unwrap().name.clone();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let dst_active = dst.qmp().event_cursor();
    let sidecar = tokio::spawn(receive_on(
        listener,
        ReceiveOptions {
            preempt: true,
            allow_from: Some(AllowList::parse("127.0.0.1").unwrap()),
            handshake_timeout: Duration::from_secs(3),
            report: Some(dir.path().join("report.json")),
            ..ReceiveOptions::new(dst.spare_qmp_path(), Listen::At(addr))
        },
    ));

    // An opening that never ends is dropped at the handshake deadline.
    let mut slow = peer_sending(addr, b"QEV").await;
    let mut buf = [0u8; 16];
    let dropped = tokio::time::timeout(Duration::from_secs(30), slow.read(&mut buf)).await;
    assert!(
        matches!(dropped, Ok(Ok(0)) | Ok(Err(_))),
        "the slow peer is dropped: {dropped:?}"
    );
    // All at once, before the source: each would have been the migration before.
    let mut hostile = vec![
        TcpStream::connect(addr).await.unwrap(), // silent
        connect_from("127.0.0.2", addr).await,   // outside --allow-from
        peer_sending(
            addr,
            &[[0xffu8].as_slice(), &random_bytes(4095, 7)].concat(),
        )
        .await,
        peer_sending(addr, &[b"Q".as_slice(), &random_bytes(4095, 9)].concat()).await,
        peer_sending(addr, &opening(&[(big.as_bytes(), 1 << 60)])).await,
        peer_sending(addr, &opening(&[(b"not-a-block", 4096)])).await,
        peer_sending(addr, &endless_subsections()).await,
    ];
    let migration = tokio::spawn(async move {
        let opts = SendOptions {
            qmp: src.spare_qmp_path().to_path_buf(),
            to: addr,
            postcopy_after: Some(Duration::ZERO),
            preempt: true,
            timeout: MIGRATION,
        };
        (send(&opts).await, src)
    });
    // While it runs: another host knocks.
    dst.qmp()
        .wait_for_event_after(
            dst_active,
            |e| migration_event_status(e) == Some(MigrationStatus::Active),
            MIGRATION,
        )
        .await
        .expect("the destination starts receiving");
    hostile.push(connect_from("127.0.0.2", addr).await);

    let (sent, src) = migration.await.unwrap();
    let sent = sent.expect("source QMP");
    let report = tokio::time::timeout(MIGRATION, sidecar)
        .await
        .expect("the sidecar ends")
        .unwrap()
        .unwrap_or_else(|e| panic!("sidecar: {e}"));
    drop(hostile);
    eprintln!("{}", report.table());
    eprintln!("{:#?}", report.refused_connections);
    assert_eq!(sent.status, "completed", "{sent:?}");
    assert_eq!(report.outcome, "completed", "{:?}", report.error);
    assert!(report.timeline.run_ms.is_some(), "postcopy ran");
    assert!(
        report.postcopy.pages + report.postcopy.zero_pages > 0,
        "pages arrived in postcopy"
    );
    assert!(
        report.bytes.preempt > 0,
        "the real preempt channel carried pages"
    );

    let r = &report.refused_connections;
    let kind = |k: &str| r.by_kind.get(k).copied().unwrap_or(0);
    assert_eq!(kind("address"), 2, "{r:#?}");
    assert!(kind("handshake") >= 6, "{r:#?}");
    let said = |what: &str| r.first.iter().any(|c| c.reason.contains(what));
    for what in [
        "not in --allow-from",
        "not a migration stream",
        "exceeds the destination's",
        "does not exist at the destination",
        "repeated",
        "did not arrive in time",
    ] {
        assert!(said(what), "no refusal saying {what:?}: {r:#?}");
    }
    // The silent peer came before the source's main channel: never its preempt channel
    // (refused when the main channel came up, or for its silence if that came first).
    assert!(
        said("silent since before the source's main channel") || said("silent for"),
        "{r:#?}"
    );

    let seen = need(dst.wait_progress(0, 2, PROGRESS).await);
    assert!(seen.iter().all(|p| p.mismatches == 0), "{seen:?}");
    need(dst.check_workload_clean());
    need(src.check_workload_clean());
}
