//! TLS through the sidecar, against real QEMUs with `tls-creds-x509`: a source QEMU whose
//! migration is TLS (`endpoint=client`) migrates through the sidecar's TLS server, on
//! QEMU 7.2 and 10.0, with and without the preempt channel; impostors at the port first
//! (a plain peer, a certificate from another CA, an expired one, a name not allowed) are
//! refused with their reasons while the real migration completes with the guest intact;
//! and a destination that itself expects TLS (what libvirt's `--tls` sets up) is reached
//! through the sidecar's own TLS client.
//!
//! They need `scripts/setup.sh` to have run; without it they fail (never skip).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use postcopy_sidecar::daemon::receive::{Incoming, Listen, ReceiveOptions, TlsOptions, receive_on};
use postcopy_sidecar::daemon::report::Report;
use postcopy_sidecar::daemon::tls::SourceTls;
use postcopy_sidecar::lab::{
    LabError, QemuBinary, QemuVersion, Vm, VmSpec, Workload, WorkloadMode,
};
use postcopy_sidecar::session::admission::DistinguishedName;
use postcopy_sidecar::source::{SendOptions, SendReport, send};
use postcopy_sidecar::wire::compose::put_opening;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[path = "support/certs.rs"]
mod certs;
use certs::{Ca, Leaf};

const BOOT: Duration = Duration::from_secs(180);
const MIGRATION: Duration = Duration::from_secs(300);
const PROGRESS: Duration = Duration::from_secs(120);
/// The name the source checks the sidecar's certificate against (`tls-hostname`).
const SIDECAR_NAME: &str = "sidecar.test";
/// The source's certificate subject, as QEMU's `tls-authz` would list it.
const SOURCE_DN: &str = "CN=source.test,O=Lab";

fn need<T>(r: Result<T, LabError>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

/// Everyone's credentials for one test.
struct Creds {
    ca: Ca,
    /// The source QEMU's client directory.
    source: std::path::PathBuf,
    /// The sidecar's server directory.
    sidecar: std::path::PathBuf,
}

fn creds(dir: &Path) -> Creds {
    let ca = Ca::new("Lab CA");
    let source = dir.join("source-creds");
    let sidecar = dir.join("sidecar-creds");
    ca.write_dir(&source, None, Some(&ca.client("source.test")));
    ca.write_dir(
        &sidecar,
        Some(&ca.server("sidecar", &[SIDECAR_NAME, "127.0.0.1"])),
        None,
    );
    Creds {
        ca,
        source,
        sidecar,
    }
}

/// A source VM whose migration runs over TLS with the credentials in `creds`.
async fn tls_source(version: QemuVersion, dir: &Path, creds: &Path, seed: u64) -> (Vm, VmSpec) {
    let spec = VmSpec::new(need(QemuBinary::find(version)))
        .name("src")
        .ram_mib(256)
        .linux(Workload {
            mib: 96,
            mode: WorkloadMode::Hot,
            hot_mib: 16,
            seed,
        });
    let src = need(
        Vm::spawn(
            &spec.clone().arg("-object").arg(format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=client",
                creds.display()
            )),
            dir,
        )
        .await,
    );
    need(src.wait_workload_ready(BOOT).await);
    src.qmp()
        .set_parameters(serde_json::json!({"tls-creds": "tls0", "tls-hostname": SIDECAR_NAME}))
        .await
        .expect("the source takes its TLS parameters");
    (src, spec)
}

/// A TLS client with `leaf` (signed by whoever) that trusts `ca`, trying to become the
/// source: it sends a valid opening once its handshake is through. Returns the reason
/// the sidecar gave it, as this client saw it.
async fn impostor(to: SocketAddr, trust: &Ca, leaf: &Leaf) -> String {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(trust.pem().as_bytes()).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(
        vec![CertificateDer::from_pem_slice(leaf.cert.as_bytes()).unwrap()],
        PrivateKeyDer::from_pem_slice(leaf.key.as_bytes()).unwrap(),
    )
    .unwrap();
    let tcp = TcpStream::connect(to).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut s = match connector
        .connect(ServerName::try_from(SIDECAR_NAME).unwrap(), tcp)
        .await
    {
        Ok(s) => s,
        Err(e) => return format!("handshake: {e}"),
    };
    let mut opening = Vec::new();
    put_opening(&mut opening, b"pc-q35-10.0", 2, &[(b"pc.ram", 256 << 20)]);
    let _ = s.write_all(&opening).await;
    let _ = s.flush().await;
    let mut b = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(30), s.read(&mut b)).await {
        Ok(Ok(0)) => "closed".into(),
        Ok(Ok(n)) => format!("answered {n} bytes"),
        Ok(Err(e)) => format!("error: {e}"),
        Err(_) => "no answer in 30 s".into(),
    }
}

async fn migrate(src: &Vm, to: SocketAddr, preempt: bool) -> SendReport {
    send(&SendOptions {
        qmp: src.spare_qmp_path().to_path_buf(),
        to,
        postcopy_after: Some(Duration::ZERO),
        preempt,
        multifd: None,
        timeout: MIGRATION,
    })
    .await
    .expect("source QMP")
}

fn check_postcopy(report: &Report, sent: &SendReport, preempt: bool) {
    eprintln!("{}", report.table());
    assert_eq!(sent.status, "completed", "{sent:?}");
    assert_eq!(report.outcome, "completed", "{:?}", report.error);
    assert!(report.timeline.run_ms.is_some(), "postcopy ran");
    assert!(
        report.postcopy.pages + report.postcopy.zero_pages > 0,
        "pages arrived in postcopy"
    );
    if preempt {
        assert!(
            report.bytes.preempt > 0,
            "the preempt channel carried pages"
        );
    }
}

/// A TLS source migrates through the sidecar's TLS server; with `impostors`, four peers
/// try first and are refused.
async fn tls_through_the_sidecar(
    src_v: QemuVersion,
    dst_v: QemuVersion,
    preempt: bool,
    impostors: bool,
) {
    let dir = tempfile::Builder::new().prefix("tls-").tempdir().unwrap();
    let c = creds(dir.path());
    let (src, spec) = tls_source(src_v, dir.path(), &c.source, 31).await;
    let dst = need(Vm::spawn(&spec.destination(need(QemuBinary::find(dst_v))), dir.path()).await);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = SourceTls::load(
        &c.sidecar,
        true,
        vec![DistinguishedName::parse(SOURCE_DN).unwrap()],
    )
    .unwrap();
    let sidecar = tokio::spawn(receive_on(
        listener,
        ReceiveOptions {
            preempt,
            handshake_timeout: Duration::from_secs(5),
            tls: TlsOptions {
                source: Some(tls),
                ..TlsOptions::default()
            },
            ..ReceiveOptions::new(dst.spare_qmp_path(), Listen::At(addr))
        },
    ));

    let mut seen_by_impostors = Vec::new();
    if impostors {
        // A plain peer with a valid opening: it was the migration before TLS.
        let mut plain = TcpStream::connect(addr).await.unwrap();
        let mut opening = Vec::new();
        put_opening(&mut opening, b"pc-q35-10.0", 2, &[(b"pc.ram", 256 << 20)]);
        plain.write_all(&opening).await.unwrap();
        let other_ca = Ca::new("Other CA");
        seen_by_impostors.push(impostor(addr, &c.ca, &other_ca.client("source.test")).await);
        seen_by_impostors.push(impostor(addr, &c.ca, &c.ca.expired_client("source.test")).await);
        seen_by_impostors.push(impostor(addr, &c.ca, &c.ca.client("intruder.test")).await);
        let mut b = [0u8; 16];
        let plain_end = tokio::time::timeout(Duration::from_secs(30), plain.read(&mut b)).await;
        assert!(
            matches!(plain_end, Ok(Ok(_)) | Ok(Err(_))),
            "the plain peer is dropped: {plain_end:?}"
        );
    }
    eprintln!("impostors saw: {seen_by_impostors:#?}");

    let sent = migrate(&src, addr, preempt).await;
    let report = tokio::time::timeout(MIGRATION, sidecar)
        .await
        .expect("the sidecar ends")
        .unwrap()
        .unwrap_or_else(|e| panic!("sidecar: {e}\nsource: {sent:?}"));
    check_postcopy(&report, &sent, preempt);
    if impostors {
        let r = &report.refused_connections;
        eprintln!("{r:#?}");
        assert_eq!(r.by_kind.get("tls").copied(), Some(4), "{r:#?}");
        let said = |what: &str| r.first.iter().any(|c| c.reason.contains(what));
        for what in [
            // rustls's words for each failure.
            "TLS handshake failed: received corrupt message",
            "UnknownIssuer",
            "xpired",
            "CN=intruder.test,O=Lab is not allowed",
        ] {
            assert!(said(what), "no refusal saying {what:?}: {r:#?}");
        }
    } else {
        assert_eq!(
            report.refused_connections.total, 0,
            "{:#?}",
            report.refused_connections
        );
    }
    let seen = need(dst.wait_progress(0, 2, PROGRESS).await);
    assert!(seen.iter().all(|p| p.mismatches == 0), "{seen:?}");
    need(dst.check_workload_clean());
    need(src.check_workload_clean());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_source_with_preempt_10_0_impostors_refused() {
    tls_through_the_sidecar(QemuVersion::V10_0, QemuVersion::V10_0, true, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_source_without_preempt_10_0() {
    tls_through_the_sidecar(QemuVersion::V10_0, QemuVersion::V10_0, false, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_source_with_preempt_7_2() {
    tls_through_the_sidecar(QemuVersion::V7_2, QemuVersion::V7_2, true, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_source_without_preempt_7_2() {
    tls_through_the_sidecar(QemuVersion::V7_2, QemuVersion::V7_2, false, false).await;
}

/// The destination expects TLS itself (libvirt's `--tls`: its `tls-creds` parameter is
/// set, with the host's credentials): the sidecar, following the destination's manager,
/// answers the source with the host's server credentials and reaches the destination
/// with the host's client credentials, on both channels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_destination_reached_with_the_hosts_client_credentials_10_0() {
    let dir = tempfile::Builder::new()
        .prefix("tls-dst-")
        .tempdir()
        .unwrap();
    let c = creds(dir.path());
    // The host's QEMU credentials, as libvirt keeps them in /etc/pki/qemu: one server
    // certificate for the host's name, one client certificate.
    let host = dir.path().join("host-creds");
    c.ca.write_dir(
        &host,
        Some(&c.ca.server("dst-host", &[SIDECAR_NAME, "127.0.0.1"])),
        Some(&c.ca.client("dst-host")),
    );
    let (src, spec) = tls_source(QemuVersion::V10_0, dir.path(), &c.source, 37).await;
    let dspec = spec
        .destination(need(QemuBinary::find(QemuVersion::V10_0)))
        .arg("-object")
        .arg(format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=server",
            host.display()
        ));
    let dst = need(Vm::spawn(&dspec, dir.path()).await);
    let port = need(
        postcopy_sidecar::lab::free_tcp_port().map_err(|source| LabError::Io {
            what: "choosing a port".into(),
            source,
        }),
    );
    // The manager's part: capabilities, TLS, then listen.
    let q = dst.qmp();
    q.set_capabilities(&[
        ("postcopy-ram", true),
        ("return-path", true),
        ("postcopy-preempt", true),
    ])
    .await
    .unwrap();
    q.set_parameters(serde_json::json!({"tls-creds": "tls0"}))
        .await
        .unwrap();
    q.migrate_incoming(&format!("tcp:127.0.0.1:{port}"))
        .await
        .unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sidecar = tokio::spawn(receive_on(
        listener,
        ReceiveOptions {
            incoming: Incoming::Follow,
            preempt: true,
            tls: TlsOptions {
                host_creds: host.clone(),
                ..TlsOptions::default()
            },
            ..ReceiveOptions::new(dst.spare_qmp_path(), Listen::At(addr))
        },
    ));
    let sent = migrate(&src, addr, true).await;
    let report = tokio::time::timeout(MIGRATION, sidecar)
        .await
        .expect("the sidecar ends")
        .unwrap()
        .unwrap_or_else(|e| panic!("sidecar: {e}\nsource: {sent:?}"));
    check_postcopy(&report, &sent, true);
    let seen = need(dst.wait_progress(0, 2, PROGRESS).await);
    assert!(seen.iter().all(|p| p.mismatches == 0), "{seen:?}");
    need(dst.check_workload_clean());
    need(src.check_workload_clean());
}

/// `--own-preempt` cannot order the TLS handshakes of main and preempt at a destination
/// that expects TLS, so it is refused, before the destination is made to listen with
/// preempt on (it would then wait for a preempt channel nobody opens).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_preempt_is_refused_for_a_tls_destination_before_it_listens_10_0() {
    let dir = tempfile::Builder::new()
        .prefix("tls-own-")
        .tempdir()
        .unwrap();
    let c = creds(dir.path());
    let host = dir.path().join("host-creds");
    c.ca.write_dir(
        &host,
        Some(&c.ca.server("dst-host", &[SIDECAR_NAME, "127.0.0.1"])),
        Some(&c.ca.client("dst-host")),
    );
    let spec = VmSpec::new(need(QemuBinary::find(QemuVersion::V10_0)))
        .name("dst")
        .ram_mib(128)
        .firmware_only()
        .arg("-object")
        .arg(format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=server",
            host.display()
        ));
    let dst = need(
        Vm::spawn(
            &spec.destination(need(QemuBinary::find(QemuVersion::V10_0))),
            dir.path(),
        )
        .await,
    );
    dst.qmp()
        .set_parameters(serde_json::json!({"tls-creds": "tls0"}))
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let r = receive_on(
        listener,
        ReceiveOptions {
            own_preempt: true,
            tls: TlsOptions {
                host_creds: host.clone(),
                ..TlsOptions::default()
            },
            ..ReceiveOptions::new(dst.spare_qmp_path(), Listen::At(addr))
        },
    )
    .await;
    let e = r.expect_err("refused").to_string();
    assert!(e.contains("--own-preempt") && e.contains("TLS"), "{e}");
    assert_eq!(
        dst.qmp().incoming_address().await.unwrap(),
        None,
        "the destination was never made to listen"
    );
    assert!(
        !dst.qmp().capability("postcopy-preempt").await.unwrap(),
        "nor given preempt"
    );
}

/// Multifd over TLS (protocol-spec/multifd.md#multifd-relay): every one of the four
/// channels does its own TLS handshake with the sidecar, which tells them apart by their
/// first packet inside TLS and relays them in precopy; the guest runs clean afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_source_with_multifd_10_0() {
    let dir = tempfile::Builder::new().prefix("tls-").tempdir().unwrap();
    let c = creds(dir.path());
    let (src, spec) = tls_source(QemuVersion::V10_0, dir.path(), &c.source, 41).await;
    let dst = need(
        Vm::spawn(
            &spec.destination(need(QemuBinary::find(QemuVersion::V10_0))),
            dir.path(),
        )
        .await,
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = SourceTls::load(
        &c.sidecar,
        true,
        vec![DistinguishedName::parse(SOURCE_DN).unwrap()],
    )
    .unwrap();
    let sidecar = tokio::spawn(receive_on(
        listener,
        ReceiveOptions {
            multifd: Some(4),
            tls: TlsOptions {
                source: Some(tls),
                ..TlsOptions::default()
            },
            ..ReceiveOptions::new(dst.spare_qmp_path(), Listen::At(addr))
        },
    ));
    let sent = send(&SendOptions {
        qmp: src.spare_qmp_path().to_path_buf(),
        to: addr,
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
        .unwrap_or_else(|e| panic!("sidecar: {e}\nsource: {sent:?}"));
    eprintln!("{}", report.table());
    assert_eq!(sent.status, "completed", "{sent:?}");
    assert_eq!(report.outcome, "completed", "{:?}", report.error);
    assert_eq!(report.multifd.len(), 4, "{:?}", report.multifd);
    assert!(
        report.multifd.values().all(|f| f.pages > 0),
        "{:?}",
        report.multifd
    );
    assert_eq!(
        report.refused_connections.total, 0,
        "{:#?}",
        report.refused_connections
    );
    let seen = need(dst.wait_progress(0, 2, PROGRESS).await);
    assert!(seen.iter().all(|p| p.mismatches == 0), "{seen:?}");
    need(dst.check_workload_clean());
    need(src.check_workload_clean());
}
