//! `postcopy-sidecar demo`: the main job on an embedded default. Boots a small local VM
//! running our guest workload, starts a destination QEMU, migrates the VM with postcopy
//! through the sidecar (live view on a terminal), prints the report, and shows the guest
//! carrying on at the destination with its memory check intact.

use std::time::{Duration, Instant};

use crate::daemon::receive::{Listen, ReceiveOptions, receive_on};
use crate::daemon::report::Report;
use crate::lab::{LabError, QemuBinary, QemuVersion, Vm, VmSpec, Workload, WorkloadMode};
use crate::source::{SendOptions, send};

/// Options of the demo.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Guest RAM, MiB.
    pub ram_mib: u64,
    /// Memory the guest workload fills and keeps verifying, MiB.
    pub workload_mib: u64,
    /// Use the postcopy-preempt channel.
    pub preempt: bool,
    /// Show the live view.
    pub live: bool,
}

/// Why the demo failed.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// Starting or watching a VM failed.
    #[error("{0}")]
    Lab(#[from] LabError),
    /// The migration failed.
    #[error("migration: {0}")]
    Migration(String),
}

fn say(s: impl AsRef<str>) {
    eprintln!("demo: {}", s.as_ref());
}

/// Runs the demo; returns the sidecar's report.
pub async fn demo(opts: DemoOptions) -> Result<Report, DemoError> {
    let dir = tempfile::Builder::new()
        .prefix("postcopy-sidecar-demo-")
        .tempdir()
        .map_err(|source| LabError::Io {
            what: "creating the demo directory".into(),
            source,
        })?;
    let spec = VmSpec::new(QemuBinary::find(QemuVersion::V10_0)?)
        .name("demo-src")
        .ram_mib(opts.ram_mib)
        .linux(Workload {
            mib: opts.workload_mib,
            mode: WorkloadMode::Hot,
            hot_mib: 16,
            seed: 42,
        });
    let t0 = Instant::now();
    say(format!(
        "booting the source VM ({} MiB, Linux guest filling and verifying {} MiB)",
        opts.ram_mib, opts.workload_mib
    ));
    let src = Vm::spawn(&spec, dir.path()).await?;
    let ready = src.wait_workload_ready(Duration::from_secs(300)).await?;
    say(format!(
        "guest ready after {:.1}s under {:?}: {} MiB filled in {} ms",
        t0.elapsed().as_secs_f64(),
        src.accel(),
        ready.mib,
        ready.fill_ms
    ));
    src.wait_progress(src.serial().len(), 1, Duration::from_secs(120))
        .await?;
    let dst = Vm::spawn(
        &spec.destination(QemuBinary::find(QemuVersion::V10_0)?),
        dir.path(),
    )
    .await?;
    say("destination QEMU waiting (-incoming defer); starting the sidecar");

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|source| LabError::Io {
            what: "binding the sidecar's port".into(),
            source,
        })?;
    let addr = listener.local_addr().expect("bound address");
    let sidecar = tokio::spawn(receive_on(
        listener,
        ReceiveOptions {
            preempt: opts.preempt,
            report: Some(dir.path().join("report.json")),
            live: opts.live,
            ..ReceiveOptions::new(dst.spare_qmp_path(), Listen::At(addr))
        },
    ));
    say(format!(
        "migrating to the sidecar at {addr}, switching to postcopy after 0.5 s"
    ));
    let source = send(&SendOptions {
        qmp: src.spare_qmp_path().to_path_buf(),
        to: addr,
        postcopy_after: Some(Duration::from_millis(500)),
        preempt: opts.preempt,
        multifd: None,
        timeout: Duration::from_secs(600),
    })
    .await
    .map_err(|e| DemoError::Migration(format!("source QMP: {e}")))?;
    let report = sidecar
        .await
        .map_err(|e| DemoError::Migration(e.to_string()))?
        .map_err(|e| DemoError::Migration(e.to_string()))?;
    println!("{}", report.table());
    if let Some(e) = &report.error {
        return Err(DemoError::Migration(e.clone()));
    }
    say(format!(
        "source: {} in {} ms, downtime {} ms, {} page requests received",
        source.status,
        source.total_ms.unwrap_or(0),
        source.downtime_ms.unwrap_or(0),
        source.postcopy_requests.unwrap_or(0)
    ));
    let progress = dst.wait_progress(0, 2, Duration::from_secs(120)).await?;
    for p in &progress {
        say(format!(
            "guest on the destination: round {}, {} pages verified, {} mismatches",
            p.round, p.verified, p.mismatches
        ));
    }
    dst.check_workload_clean()?;
    say("the guest runs on the destination with its memory intact");
    Ok(report)
}
