//! `receive --metrics` through the real binary: the endpoint is up before the sidecar
//! attaches, and a migration that fails before it begins (no QMP socket) is counted as
//! failed, so an alert on failed migrations sees it.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One GET of `/metrics`, or `None` while nothing listens.
fn scrape(port: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(body)
}

#[test]
fn a_migration_that_fails_before_it_begins_is_counted_as_failed() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_postcopy-sidecar"))
        .args(["receive", "--quiet", "--listen", "127.0.0.1:0"])
        .arg("--qmp")
        .arg(dir.path().join("no-such.qmp"))
        .args(["--attach-timeout", "1", "--metrics"])
        .arg(format!("127.0.0.1:{port}"))
        // Long enough for any scrape below; the test stops the process itself.
        .args(["--metrics-linger", "120"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running postcopy-sidecar");
    let deadline = Instant::now() + Duration::from_secs(60);
    let failed = r#"postcopy_sidecar_migrations_total{outcome="failed"} 1"#;
    let mut last = None;
    while Instant::now() < deadline {
        last = scrape(port);
        if last.as_deref().is_some_and(|b| b.contains(failed)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50)); // polling an endpoint, not a wait for time
    }
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let body = last.expect("the metrics endpoint answered");
    assert!(body.contains(failed), "{body}");
    assert!(
        body.contains("# TYPE postcopy_sidecar_fault_service_seconds histogram"),
        "{body}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no-such.qmp"), "{stderr}");
}
