use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::*;

const QEMU_10: &str = "              Block Name    PSize              Offset               Used              Total                HVA  RO\n                       m    4 KiB  0x0000000000000000 0x0000000008000000 0x0000000008000000 0x00007fee2bfff000  rw\n    /rom@etc/acpi/tables    4 KiB  0x0000000008080000 0x0000000000020000 0x0000000000200000 0x00007fee79200000  ro\n";
const QEMU_7_2: &str = "              Block Name    PSize              Offset               Used              Total\n                       m    4 KiB  0x0000000000000000 0x0000000008000000 0x0000000008000000\n                 pc.bios    4 KiB  0x0000000008000000 0x0000000000040000 0x0000000000040000\n";

#[test]
fn incoming_address_from_query_migrate() {
    let v: Value = serde_json::from_str(
        r#"{"status":"setup","socket-address":[{"port":"49152","host":"127.0.0.1","type":"inet"}]}"#,
    )
    .unwrap();
    let a = parse_incoming_address(&v).unwrap();
    assert_eq!(
        a,
        IncomingAddress::Tcp {
            host: "127.0.0.1".into(),
            port: 49152
        }
    );
    assert_eq!(a.to_string(), "tcp:127.0.0.1:49152");
    let u: Value =
        serde_json::from_str(r#"{"socket-address":[{"type":"unix","path":"/r/m.sock"}]}"#).unwrap();
    assert_eq!(
        parse_incoming_address(&u),
        Some(IncomingAddress::Unix("/r/m.sock".into()))
    );
    assert_eq!(parse_incoming_address(&serde_json::json!({})), None);
}

#[test]
fn ramblock_table_of_qemu_10() {
    let b = parse_ramblock_table(QEMU_10).unwrap();
    assert_eq!(
        b[0],
        RamBlock {
            name: "m".into(),
            page_size: 4096,
            offset: 0,
            used: 0x800_0000,
            total: 0x800_0000,
            hva: Some(0x7fee_2bff_f000),
        }
    );
    assert_eq!(b[1].name, "/rom@etc/acpi/tables");
    assert_eq!(b[1].offset, 0x808_0000);
    assert_eq!(b[1].total, 0x20_0000);
}

#[test]
fn ramblock_table_of_qemu_7_2() {
    let b = parse_ramblock_table(QEMU_7_2).unwrap();
    assert_eq!(b.len(), 2);
    assert_eq!(b[1].name, "pc.bios");
    assert_eq!(b[1].offset, 0x800_0000);
    assert_eq!(b[1].used, 0x4_0000);
    assert_eq!(b[1].hva, None);
}

#[test]
fn ramblock_table_rejects_garbage() {
    assert!(parse_ramblock_table("hdr\nm 4 KiB zz 0x1 0x1\n").is_err());
    assert!(parse_ramblock_table("hdr\nm 4 KiB\n").is_err());
}

/// Plays QEMU on the other end of a socket pair: greets (offering `oob`), answers
/// commands, sends an event the 9.1 schema does not know before answering
/// `query-version`, never answers `query-status` (a blocked main loop) and records
/// every line it received.
async fn fake_qemu(sock: UnixStream, seen: tokio::sync::mpsc::UnboundedSender<Value>) {
    let (r, mut w) = sock.into_split();
    let mut lines = BufReader::new(r).lines();
    let greeting = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 10}, "package": ""}, "capabilities": ["oob"]}}"#;
    w.write_all(format!("{greeting}\n").as_bytes())
        .await
        .unwrap();
    while let Ok(Some(line)) = lines.next_line().await {
        let v: Value = serde_json::from_str(&line).unwrap();
        let _ = seen.send(v.clone());
        let id = v["id"].clone();
        let name = v["execute"]
            .as_str()
            .or_else(|| v["exec-oob"].as_str())
            .unwrap()
            .to_string();
        let mut out = String::new();
        let ret = match name.as_str() {
            "query-status" => continue,
            "query-version" => {
                out.push_str(r#"{"event": "MIGRATION", "data": {"status": "postcopy-device"}, "timestamp": {"seconds": 1, "microseconds": 2}}"#);
                out.push('\n');
                out.push_str(
                    r#"{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 3}}"#,
                );
                out.push('\n');
                serde_json::json!({"qemu": {"major": 10, "minor": 0, "micro": 0}, "package": ""})
            }
            "migrate-recover" => serde_json::json!({}),
            "migrate-start-postcopy" => {
                out.push_str(&serde_json::json!({"error": {"class": "GenericError", "desc": "not now"}, "id": id}).to_string());
                out.push('\n');
                w.write_all(out.as_bytes()).await.unwrap();
                continue;
            }
            _ => serde_json::json!({}),
        };
        out.push_str(&serde_json::json!({"return": ret, "id": id}).to_string());
        out.push('\n');
        w.write_all(out.as_bytes()).await.unwrap();
    }
}

async fn session() -> (Qmp, tokio::sync::mpsc::UnboundedReceiver<Value>) {
    let (a, b) = UnixStream::pair().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(fake_qemu(b, tx));
    (Qmp::from_stream(a, "pair").await.unwrap(), rx)
}

#[tokio::test]
async fn negotiates_oob_and_unknown_statuses_do_not_end_the_session() {
    let (q, mut seen) = session().await;
    let first = seen.recv().await.unwrap();
    assert_eq!(first["execute"], "qmp_capabilities");
    assert_eq!(first["arguments"]["enable"], serde_json::json!(["oob"]));
    assert!(q.oob());
    let cursor = q.event_cursor();
    assert_eq!(q.version().await.unwrap(), (10, 0, 0));
    let st = q
        .wait_migration_status_after(cursor, &["postcopy-device"], Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(st, MigrationStatus::PostcopyDevice);
    let stop = q
        .wait_for_event_after(cursor, |e| event_name(e) == "STOP", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(stop.timestamp_us, 1_000_003);
    assert_eq!(q.events_since(cursor).len(), 2);
    assert_eq!(q.version().await.unwrap(), (10, 0, 0));
}

#[tokio::test]
async fn a_stuck_main_loop_times_out_in_band_but_out_of_band_commands_still_run() {
    let (q, mut seen) = session().await;
    let e = q
        .execute_within(qapi::qmp::query_status {}, Duration::from_millis(100))
        .await
        .unwrap_err();
    assert!(matches!(e, QmpError::Timeout(_)), "{e}");
    // Further in-band commands fail fast instead of queueing behind the stuck one.
    let e = q.version().await.unwrap_err();
    assert!(matches!(e, QmpError::Unresponsive("query-version")), "{e}");
    // Out of band goes through, as exec-oob.
    q.migrate_recover("unix:/tmp/x.sock", Duration::from_secs(5))
        .await
        .unwrap();
    let mut lines = Vec::new();
    while let Ok(v) = seen.try_recv() {
        lines.push(v);
    }
    let recover = lines
        .iter()
        .find(|v| v["exec-oob"] == "migrate-recover")
        .unwrap();
    assert_eq!(recover["arguments"]["uri"], "unix:/tmp/x.sock");
    assert!(recover["id"].is_u64());
}

#[tokio::test]
async fn qemu_errors_are_typed_with_the_command_name() {
    let (q, _seen) = session().await;
    let e = q.start_postcopy().await.unwrap_err();
    match e {
        QmpError::Command { command, message } => {
            assert_eq!(command, "migrate-start-postcopy");
            assert_eq!(message, "not now");
        }
        other => panic!("{other}"),
    }
    // A command that QEMU does not allow out of band is refused before it is sent.
    let e = q
        .execute_oob(qapi::qmp::query_status {}, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(matches!(e, QmpError::Unsupported(_)), "{e}");
}

#[tokio::test]
async fn a_qmp_socket_planted_by_another_user_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    // A directory anyone may put a socket in (like /tmp), owned by root.
    let shared = d.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = shared.join("qmp.sock");
    let fake = crate::lab::planted::PlantedSocket::listen(65534, &path).unwrap();
    // Default policy: the directory's owner (root) or our own uid; nobody planted it.
    let e = Qmp::connect_checked(&path, PeerPolicy::DirOwner)
        .await
        .err()
        .expect("a planted socket must be refused");
    assert!(
        matches!(
            e,
            QmpError::Peer {
                found: PeerUid(Some(65534)),
                expected: PeerPolicy::DirOwner,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("runs as uid 65534"), "{e}");
    // Told that QEMU runs as uid 65534 (--qmp-uid), the same socket passes the check.
    let sock = tokio::net::UnixStream::connect(&path).await.unwrap();
    PeerPolicy::Uid(65534).check(&sock, &path).unwrap();
    drop(fake);
}

#[tokio::test]
async fn a_qmp_socket_of_another_uid_than_qemus_is_refused_even_from_root() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("qmp.sock");
    // Made by this (root) process; QEMU is said to run as libvirt's uid.
    let _listener = tokio::net::UnixListener::bind(&path).unwrap();
    let e = Qmp::connect_checked(&path, PeerPolicy::Uid(64055))
        .await
        .err()
        .expect("a socket of the wrong uid must be refused");
    assert!(
        matches!(
            e,
            QmpError::Peer {
                found: PeerUid(Some(0)),
                expected: PeerPolicy::Uid(64055),
                ..
            }
        ),
        "{e}"
    );
    // The default policy accepts it: root owns the directory.
    let sock = tokio::net::UnixStream::connect(&path).await.unwrap();
    PeerPolicy::DirOwner.check(&sock, &path).unwrap();
}
