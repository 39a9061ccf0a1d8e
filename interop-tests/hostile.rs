//! A hostile network at the sidecar's port, against real QEMUs: peers that stay silent,
//! send random bytes, a crafted opening declaring a 2^60-byte block, a block the
//! destination lacks, endless configuration subsections, an opening that never ends, and
//! connections from an address outside `--allow-from`, all before (and while) the real
//! source migrates, and slow-loris clients at the metrics endpoint beside it. Each is
//! refused with its reason and counted, nothing of theirs reaches the destination, and the
//! real postcopy migration completes with the guest intact. A flood of page requests on
//! the return path (a compromised destination side) is bounded and never reaches the
//! source. Forged multifd channels are refused; a corrupt multifd packet fails the
//! migration with the VM still on the source.
//!
//! They need `scripts/setup.sh` to have run; without it they fail (never skip).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use postcopy_sidecar::daemon::metrics::{EndpointLimitLabels, Metrics};
use postcopy_sidecar::daemon::metrics_endpoint::{EndpointLimits, serve};

use postcopy_sidecar::daemon::receive::{Listen, ReceiveOptions, receive_on};
use postcopy_sidecar::lab::{
    LabError, QemuBinary, QemuVersion, Vm, VmSpec, Workload, WorkloadMode,
};
use postcopy_sidecar::qmp::{MigrationStatus, migration_event_status};
use postcopy_sidecar::session::admission::AllowList;
use postcopy_sidecar::source::{SendOptions, send};
use postcopy_sidecar::wire::MultifdInit;
use postcopy_sidecar::wire::compose::put_opening;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const BOOT: Duration = Duration::from_secs(180);
const MIGRATION: Duration = Duration::from_secs(300);
const PROGRESS: Duration = Duration::from_secs(120);

fn need<T>(r: Result<T, LabError>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

/// Waits until `cond` holds, polling a counter another thread updates (never a fixed
/// sleep as the thing waited for).
async fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "never happened: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn header_timeouts(m: &Metrics) -> u64 {
    m.endpoint_timed_out
        .get_or_create(&EndpointLimitLabels { limit: "header" })
        .get()
}

/// One `GET /metrics` (closing): the status and the body.
async fn scrape(addr: SocketAddr) -> (u16, String) {
    let mut s = peer_sending(
        addr,
        b"GET /metrics HTTP/1.1\r\nHost: sidecar\r\nConnection: close\r\n\r\n",
    )
    .await;
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut all))
        .await
        .expect("the endpoint answers")
        .expect("read");
    let text = String::from_utf8_lossy(&all).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned());
    (status, body.unwrap_or_default())
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
    let metrics = Arc::new(Metrics::new());
    let endpoint = serve(
        "127.0.0.1:0".parse().unwrap(),
        metrics.clone(),
        EndpointLimits {
            header_timeout: Duration::from_secs(2),
            ..EndpointLimits::default()
        },
    )
    .expect("metrics endpoint");
    let sidecar = tokio::spawn(receive_on(
        listener,
        ReceiveOptions {
            metrics: Some(metrics.clone()),
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
            multifd: None,
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
    // And the metrics endpoint beside it: slow-loris clients take every slot, more knock.
    let maddr = endpoint.addr();
    let mut lorises = Vec::new();
    for _ in 0..16 {
        lorises.push(peer_sending(maddr, b"GET /metrics HTTP/1.1\r\nHost: sidecar\r\n").await);
    }
    wait_for("16 open metrics connections", || {
        metrics.endpoint_open.get() >= 16
    })
    .await;
    // Past the cap: refused at once (before any request is read, so none is sent).
    let mut over = TcpStream::connect(maddr).await.unwrap();
    let mut said = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), over.read_to_end(&mut said))
        .await
        .expect("refused at once")
        .expect("read");
    assert!(said.starts_with(b"HTTP/1.1 503 "), "{said:?}");
    for _ in 0..200 {
        hostile.push(TcpStream::connect(maddr).await.unwrap());
    }
    wait_for("every slow-loris dropped at the header timeout", || {
        header_timeouts(&metrics) >= 16
    })
    .await;
    let (status, body) = scrape(maddr).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("postcopy_sidecar_bytes_total"), "{body}");
    assert!(
        metrics.endpoint_refused.get() >= 1,
        "the refused scrape was counted"
    );

    let (sent, src) = migration.await.unwrap();
    let sent = sent.expect("source QMP");
    let report = tokio::time::timeout(MIGRATION, sidecar)
        .await
        .expect("the sidecar ends")
        .unwrap()
        .unwrap_or_else(|e| panic!("sidecar: {e}"));
    drop(hostile);
    drop(lorises);
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

/// What the return-path interposer injected.
#[derive(Debug, Default, Clone, Copy)]
struct Flood {
    /// Requests inside the block the destination named (the source may serve them).
    valid: u64,
    /// Requests no QEMU sends: an unknown block, outside the block, overflowing.
    invalid: u64,
}

/// The flood injected after the destination's first named request for `block` (`length`
/// bytes long): `valid` single pages at random offsets, then 2000 each of five invalid
/// kinds, then the trigger's own block named again, so the destination's later unnamed
/// requests still mean the block they meant.
fn request_flood(block: &[u8], length: u64, valid: u64) -> (Vec<u8>, Flood) {
    use postcopy_sidecar::wire::RpMessage;
    let mut out = Vec::new();
    let pages = length / 4096;
    for (i, r) in random_bytes(valid as usize * 8, 41).chunks(8).enumerate() {
        let page = u64::from_le_bytes(r.try_into().unwrap()) % pages;
        let start = page * 4096;
        if i % 2 == 0 {
            RpMessage::ReqPagesId {
                start,
                len: 4096,
                block,
            }
            .encode(&mut out);
        } else {
            RpMessage::ReqPages { start, len: 4096 }.encode(&mut out);
        }
    }
    let mut invalid = 0;
    for i in 0..2000u64 {
        let bad = [
            RpMessage::ReqPagesId {
                start: i * 4096,
                len: 4096,
                block: b"evil-block",
            },
            RpMessage::ReqPagesId {
                start: length + i * 4096,
                len: 4096,
                block,
            },
            RpMessage::ReqPagesId {
                start: 0,
                len: u32::MAX,
                block,
            },
            RpMessage::ReqPagesId {
                start: u64::MAX - 4095 - i,
                len: 8192,
                block,
            },
            // After a named request for the right block: past its end, unnamed.
            RpMessage::ReqPages {
                start: length - 4096 + i,
                len: 8192,
            },
        ];
        for m in bad {
            m.encode(&mut out);
            invalid += 1;
        }
    }
    RpMessage::ReqPagesId {
        start: 0,
        len: 4096,
        block,
    }
    .encode(&mut out);
    (
        out,
        Flood {
            valid: valid + 1,
            invalid,
        },
    )
}

/// Stands between the sidecar and the destination QEMU's unix socket (renamed to
/// `real`): relays both directions, and on the first connection, right after the
/// destination's first named page request, injects [`request_flood`] into the return path
/// at that message boundary, as a compromised destination side would.
async fn interpose_return_path(
    at: &std::path::Path,
    real: std::path::PathBuf,
    lengths: std::collections::HashMap<Vec<u8>, u64>,
) -> tokio::sync::watch::Receiver<Option<Flood>> {
    use postcopy_sidecar::wire::{RpDecoder, RpMessage, Step};
    let listener = tokio::net::UnixListener::bind(at).unwrap();
    let (tx, rx) = tokio::sync::watch::channel(None);
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((sidecar, _)) = listener.accept().await {
            let dst = tokio::net::UnixStream::connect(&real).await.unwrap();
            let (mut sr, mut sw) = sidecar.into_split();
            let (mut dr, mut dw) = dst.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut sr, &mut dw).await;
                let _ = dw.shutdown().await;
            });
            let inject = std::mem::take(&mut first);
            let (tx, lengths) = (tx.clone(), lengths.clone());
            tokio::spawn(async move {
                let mut dec = RpDecoder::new();
                let mut held = Vec::new();
                let mut buf = vec![0u8; 64 * 1024];
                let mut pending = inject;
                loop {
                    let n = match dr.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if !pending {
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        continue;
                    }
                    held.extend_from_slice(&buf[..n]);
                    let mut pos = 0;
                    let mut flood = None;
                    while let Ok(Step::Event { len, event, .. }) = dec.next(&held[pos..]) {
                        pos += len;
                        if let RpMessage::ReqPagesId { block, .. } = event
                            && let Some(&length) = lengths.get(block)
                        {
                            flood = Some(request_flood(block, length, 50_000));
                            break;
                        }
                    }
                    if sw.write_all(&held[..pos]).await.is_err() {
                        break;
                    }
                    held.drain(..pos);
                    if let Some((bytes, what)) = flood {
                        if sw.write_all(&bytes).await.is_err() {
                            break;
                        }
                        pending = false;
                        tx.send_replace(Some(what));
                        if sw.write_all(&held).await.is_err() {
                            break;
                        }
                        held.clear();
                    }
                }
                let _ = sw.shutdown().await;
            });
        }
    });
    rx
}

/// A flood of page requests on the return path, as from a compromised destination side:
/// 50 000 requests at random pages and 10 000 that no QEMU sends (an unknown block, past
/// the end, `u32::MAX` bytes, offsets that overflow). The invalid ones are counted and
/// dropped, never reaching the source (which would fail the migration on them, pausing a
/// VM in postcopy); the sidecar's memory stays bounded by its cap of remembered pages; the
/// migration completes with the guest intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_flood_on_the_return_path_is_bounded_and_never_reaches_the_source_10_0() {
    use postcopy_sidecar::daemon::receive::Incoming;
    let dir = tempfile::Builder::new().prefix("flood-").tempdir().unwrap();
    let spec = VmSpec::new(need(QemuBinary::find(QemuVersion::V10_0)))
        .name("src")
        .ram_mib(256)
        .linux(Workload {
            mib: 96,
            mode: WorkloadMode::Hot,
            hot_mib: 16,
            seed: 31,
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
    let lengths = blocks
        .iter()
        .map(|b| (b.name.as_bytes().to_vec(), b.used))
        .collect();

    // The test plays the manager: the destination listens on a unix socket, which is then
    // renamed so that the interposer answers at the address QEMU reports.
    let q = dst.qmp();
    q.set_capabilities(&[("postcopy-ram", true), ("return-path", true)])
        .await
        .unwrap();
    let at = dir.path().join("incoming.sock");
    q.migrate_incoming(&format!("unix:{}", at.display()))
        .await
        .unwrap();
    let real = dir.path().join("incoming.real.sock");
    std::fs::rename(&at, &real).unwrap();
    let injected = interpose_return_path(&at, real, lengths).await;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sidecar = tokio::spawn(receive_on(
        listener,
        ReceiveOptions {
            incoming: Incoming::Follow,
            report: Some(dir.path().join("report.json")),
            ..ReceiveOptions::new(dst.spare_qmp_path(), Listen::At(addr))
        },
    ));
    let sent = send(&SendOptions {
        qmp: src.spare_qmp_path().to_path_buf(),
        to: addr,
        postcopy_after: Some(Duration::ZERO),
        preempt: false,
        multifd: None,
        timeout: MIGRATION,
    })
    .await
    .expect("source QMP");
    let report = tokio::time::timeout(MIGRATION, sidecar)
        .await
        .expect("the sidecar ends")
        .unwrap()
        .unwrap_or_else(|e| panic!("sidecar: {e}"));
    eprintln!("{}", report.table());
    eprintln!("{:#?}", report.requests);
    let flood = injected
        .borrow()
        .expect("the destination asked for a page, and the flood followed it");
    assert_eq!(sent.status, "completed", "{sent:?}");
    assert_eq!(report.outcome, "completed", "{:?}", report.error);
    assert!(report.timeline.run_ms.is_some(), "postcopy ran");
    let r = &report.requests;
    // Counted apart: the refused ones (only the injected ones, all of them) and the rest.
    assert_eq!(r.refused_messages, flood.invalid, "{r:#?}");
    assert!(
        r.messages > flood.valid,
        "the flood and the real requests: {r:#?}"
    );
    // Every valid page was asked of the source at most once.
    assert_eq!(
        r.forwarded_pages + r.deduplicated_pages + r.already_delivered_pages,
        r.pages,
        "{r:#?}"
    );

    let seen = need(dst.wait_progress(0, 2, PROGRESS).await);
    assert!(seen.iter().all(|p| p.mismatches == 0), "{seen:?}");
    need(dst.check_workload_clean());
    need(src.check_workload_clean());
}

/// A running 10.0 guest (`seed` for its workload) and a destination waiting for it.
async fn multifd_pair(seed: u64) -> (tempfile::TempDir, Vm, Vm) {
    let dir = tempfile::Builder::new()
        .prefix("hostile-multifd-")
        .tempdir()
        .unwrap();
    let spec = VmSpec::new(need(QemuBinary::find(QemuVersion::V10_0)))
        .name("src")
        .ram_mib(256)
        .linux(Workload {
            mib: 64,
            mode: WorkloadMode::Hot,
            hot_mib: 16,
            seed,
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
    (dir, src, dst)
}

/// A multifd initial packet (protocol-spec/multifd.md#multifd-init) for channel `id`.
fn multifd_init(id: u8) -> Vec<u8> {
    let mut v = Vec::new();
    MultifdInit { uuid: [0; 16], id }.encode(&mut v);
    v
}

/// Forged multifd channels (protocol-spec/multifd.md#multifd-relay), before and while a
/// real 10.0 source migrates with four: one from another host, one with a bad magic, one
/// naming a channel the destination does not expect, one whose initial packet never ends,
/// and, once the real channels are up, a second channel 1 from the source's own address
/// (refused unread: every channel is up).
/// Each is refused with its reason; the destination gets main and the four real channels
/// only, and the migration completes with the guest intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_multifd_channels_never_reach_the_destination_10_0() {
    let (dir, src, dst) = multifd_pair(29).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let dst_active = dst.qmp().event_cursor();
    let sidecar = tokio::spawn(receive_on(
        listener,
        ReceiveOptions {
            multifd: Some(4),
            handshake_timeout: Duration::from_secs(3),
            report: Some(dir.path().join("report.json")),
            ..ReceiveOptions::new(dst.spare_qmp_path(), Listen::At(addr))
        },
    ));
    // An initial packet that never ends is dropped at the handshake deadline.
    let mut slow = peer_sending(addr, &multifd_init(3)[..30]).await;
    let mut buf = [0u8; 16];
    let dropped = tokio::time::timeout(Duration::from_secs(30), slow.read(&mut buf)).await;
    assert!(
        matches!(dropped, Ok(Ok(0)) | Ok(Err(_))),
        "the slow peer is dropped: {dropped:?}"
    );
    let mut other_host = connect_from("127.0.0.2", addr).await;
    other_host.write_all(&multifd_init(0)).await.unwrap();
    let mut bad_magic = multifd_init(2);
    bad_magic[3] = 0x45;
    let mut hostile = vec![
        other_host,
        peer_sending(addr, &bad_magic).await,
        peer_sending(addr, &multifd_init(9)).await,
    ];
    let migration = tokio::spawn(async move {
        let opts = SendOptions {
            qmp: src.spare_qmp_path().to_path_buf(),
            to: addr,
            postcopy_after: None,
            preempt: false,
            multifd: Some(4),
            timeout: MIGRATION,
        };
        (send(&opts).await, src)
    });
    dst.qmp()
        .wait_for_event_after(
            dst_active,
            |e| migration_event_status(e) == Some(MigrationStatus::Active),
            MIGRATION,
        )
        .await
        .expect("the destination starts receiving");
    // The destination is active only once it has main and all four channels.
    hostile.push(peer_sending(addr, &multifd_init(1)).await);

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
    assert_eq!(report.multifd.len(), 4, "{:?}", report.multifd);
    let r = &report.refused_connections;
    let said = |what: &str| r.first.iter().any(|c| c.reason.contains(what));
    for what in [
        "the source is 127.0.0.1",
        "bad multifd magic",
        "multifd channel id 9",
        "multifd initial packet did not arrive in time",
        "the source's channels are all up",
    ] {
        assert!(said(what), "no refusal saying {what:?}: {r:#?}");
    }
    let seen = need(dst.wait_progress(0, 2, PROGRESS).await);
    assert!(seen.iter().all(|p| p.mismatches == 0), "{seen:?}");
    need(dst.check_workload_clean());
    need(src.check_workload_clean());
}

/// Relays every connection from its own port to `to`, and on the first multifd channel
/// turns the magic of its second packet (right after the 64-byte initial packet and the
/// 1344-byte setup sync packet) into garbage, as a corrupting network would.
async fn corrupting_forwarder(to: SocketAddr) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut corrupted = false;
        loop {
            let Ok((inbound, _)) = l.accept().await else {
                return;
            };
            let outbound = TcpStream::connect(to).await.unwrap();
            let (mut ir, mut iw) = inbound.into_split();
            let (mut or, mut ow) = outbound.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut or, &mut iw).await;
            });
            let mut first = [0u8; 1];
            if ir.read_exact(&mut first).await.is_err() {
                continue;
            }
            let spoil = first[0] == 0x11 && !std::mem::replace(&mut corrupted, true);
            tokio::spawn(async move {
                let mut pos = 1u64;
                let mut buf = vec![0u8; 64 << 10];
                if ow.write_all(&first).await.is_err() {
                    return;
                }
                loop {
                    let n = match ir.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let target = 64 + 1344;
                    if spoil && (pos..pos + n as u64).contains(&target) {
                        buf[(target - pos) as usize] ^= 0xff;
                    }
                    pos += n as u64;
                    if ow.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = ow.shutdown().await;
            });
        }
    });
    at
}

/// A multifd packet that does not decode (protocol-spec/multifd.md#multifd-relay) fails
/// the precopy migration with its channel and offset, before a byte of it reaches the
/// destination, and the VM keeps running on the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_multifd_packet_fails_the_migration_and_the_vm_stays_on_the_source_10_0() {
    let (_dir, src, dst) = multifd_pair(31).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sidecar = tokio::spawn(receive_on(
        listener,
        ReceiveOptions {
            multifd: Some(4),
            ..ReceiveOptions::new(dst.spare_qmp_path(), Listen::At(addr))
        },
    ));
    let via = corrupting_forwarder(addr).await;
    let sent = send(&SendOptions {
        qmp: src.spare_qmp_path().to_path_buf(),
        to: via,
        postcopy_after: None,
        preempt: false,
        multifd: Some(4),
        timeout: MIGRATION,
    })
    .await
    .expect("source QMP");
    let report = tokio::time::timeout(MIGRATION, sidecar)
        .await
        .expect("the sidecar ends")
        .unwrap()
        .unwrap_or_else(|e| panic!("sidecar: {e}"));
    assert_eq!(report.outcome, "failed");
    let err = report.error.clone().unwrap_or_default();
    // The corrupted channel (the first to connect: any id, 10.x connects them at once)
    // passed its setup sync and nothing after it.
    let id: u8 = err
        .split("multifd channel ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no channel named: {err}"));
    assert_eq!(
        report.multifd.get(&id).map(|f| f.bytes),
        Some(1408),
        "{:?}",
        report.multifd
    );
    assert!(
        err.contains("multifd channel")
            && err.contains("offset 1408")
            && err.contains("bad multifd magic"),
        "{err}"
    );
    assert_eq!(sent.status, "failed", "{sent:?}");
    assert_eq!(src.qmp().run_state().await.unwrap(), "running");
    let from = src.serial().len();
    let seen = need(src.wait_progress(from, 2, PROGRESS).await);
    assert!(seen.iter().all(|p| p.mismatches == 0), "{seen:?}");
}
