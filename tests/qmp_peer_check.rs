//! Every command that drives a QEMU over QMP checks who answers on the socket
//! (`SO_PEERCRED`) before it sends a byte: `snapshot`, `verify` and `send` refuse a socket
//! whose process does not run as `--qmp-uid` (or, without it, as the owner of the socket's
//! directory or as us). The socket here is made by this process, and QEMU is said to run
//! as another uid; nothing answers on it, so only the check can end the command at once.

use std::time::Duration;

use postcopy_sidecar::lab::planted::PlantedSocket;
use postcopy_sidecar::snapshot::take::{SnapshotMode, SnapshotOptions, snapshot};
use postcopy_sidecar::source::{SendOptions, send};
use postcopy_sidecar::verify::command::{VerifyOptions, verify};
use postcopy_sidecar::verify::digests::PageDigests;

const QEMU_UID: u32 = 64055;

/// The refusal names the uid found and the one expected.
fn refused(e: &dyn std::fmt::Display) {
    let e = e.to_string();
    let me = nix::unistd::geteuid().as_raw();
    assert!(e.contains(&format!("runs as uid {me}")), "{e}");
    assert!(e.contains(&format!("uid {QEMU_UID}")), "{e}");
}

#[tokio::test]
async fn snapshot_refuses_a_qmp_socket_of_another_uid() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("qmp.sock");
    let _listener = tokio::net::UnixListener::bind(&path).unwrap();
    let out = d.path().join("snap");
    let e = tokio::time::timeout(
        Duration::from_secs(10),
        snapshot(&SnapshotOptions {
            qmp: path,
            qmp_uid: Some(QEMU_UID),
            out: out.clone(),
            timeout: Duration::from_secs(5),
            mode: SnapshotMode::Precopy,
            stop_after: false,
        }),
    )
    .await
    .expect("refused at once, not waiting for a greeting")
    .expect_err("refused");
    refused(&e);
    assert!(!out.exists(), "nothing was created");
}

#[tokio::test]
async fn verify_refuses_a_qmp_socket_of_another_uid() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("qmp.sock");
    let _listener = tokio::net::UnixListener::bind(&path).unwrap();
    let digests = d.path().join("digests");
    PageDigests::new(&[("pc.ram".into(), 1 << 20)], 4096)
        .save(&digests)
        .unwrap();
    let e = tokio::time::timeout(
        Duration::from_secs(10),
        verify(&VerifyOptions {
            qmp: path,
            qmp_uid: Some(QEMU_UID),
            digests,
            allow_running: false,
        }),
    )
    .await
    .expect("refused at once")
    .expect_err("refused");
    refused(&e);
}

#[tokio::test]
async fn send_refuses_a_qmp_socket_planted_in_a_shared_directory() {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // A directory anyone may put a socket in (like /tmp): owned by us, but the socket is
    // made by a process of another uid.
    let shared = d.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let path = shared.join("qmp.sock");
    let planted = PlantedSocket::listen(65534, &path).unwrap();
    let e = tokio::time::timeout(
        Duration::from_secs(10),
        send(&SendOptions {
            qmp: path,
            to: "127.0.0.1:9".parse().unwrap(),
            postcopy_after: None,
            preempt: false,
            multifd: None,
            timeout: Duration::from_secs(5),
        }),
    )
    .await
    .expect("refused at once")
    .expect_err("refused");
    assert!(e.to_string().contains("runs as uid 65534"), "{e}");
    drop(planted);
}
