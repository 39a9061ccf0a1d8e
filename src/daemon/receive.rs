//! Orchestration of `receive`: attach to the destination QEMU over QMP, check and
//! configure it, make it listen on a private endpoint, accept the source's connections,
//! run the pumps, wait for the end, and report.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::task::JoinSet;

use super::live::LiveView;
use super::relay::{self, RelayError, Shared};
use super::report::{DestinationInfo, Report};
use crate::control::MigrationControl;
use crate::qmp::{Qmp, QmpError};

/// Options of `receive`.
#[derive(Debug, Clone)]
pub struct ReceiveOptions {
    /// The destination QEMU's QMP socket.
    pub qmp: PathBuf,
    /// Where the source connects.
    pub listen: SocketAddr,
    /// Use the postcopy-preempt channel.
    pub preempt: bool,
    /// Write the JSON report here.
    pub report: Option<PathBuf>,
    /// Show the live view (on a terminal).
    pub live: bool,
    /// The destination was started with `-S`: do not require it to run at the end.
    pub allow_paused: bool,
}

/// Why `receive` could not carry the migration.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// QMP failed.
    #[error("destination QMP: {0}")]
    Qmp(#[from] QmpError),
    /// A RAM backend the sidecar cannot serve.
    #[error(
        "RAM backend '{id}' is {kind}{share}; postcopy through the sidecar needs guest RAM in a shared memfd: start QEMU with `-object memory-backend-memfd,id={id},size=...,share=on -machine memory-backend={id}` (libvirt: <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>)"
    )]
    UnsupportedBackend {
        /// Backend id.
        id: String,
        /// Its QOM type.
        kind: String,
        /// ", share=off" when that is the problem.
        share: &'static str,
    },
    /// Guest RAM without any memory backend (legacy `-m`).
    #[error(
        "guest RAM block '{0}' has no memory backend (legacy -m); start QEMU with `-object memory-backend-memfd,id=m,size=...,share=on -machine memory-backend=m`"
    )]
    LegacyRam(String),
    /// Local socket setup failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// A channel failed.
    #[error("{0}")]
    Relay(#[from] RelayError),
    /// The destination reported failure.
    #[error("destination migration ended in state '{0}'")]
    DestinationFailed(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ReceiveError {
    let what = what.into();
    move |source| ReceiveError::Io { what, source }
}

/// Checks that every guest-RAM backend is a shared memfd (the sidecar's guarded reads and
/// QEMU's own shared-memory postcopy rely on it).
pub async fn check_backends(qmp: &Qmp) -> Result<(), ReceiveError> {
    let backends = qmp.memory_backends().await?;
    for b in &backends {
        let memfd = b.qom_type == "memory-backend-memfd";
        if !memfd || !b.share {
            return Err(ReceiveError::UnsupportedBackend {
                id: b.id.clone(),
                kind: b.qom_type.clone(),
                share: if memfd { ", share=off" } else { "" },
            });
        }
    }
    let blocks = qmp.ram_blocks().await?;
    for blk in blocks {
        if blk.name == "pc.ram" && backends.is_empty() {
            return Err(ReceiveError::LegacyRam(blk.name));
        }
    }
    Ok(())
}

/// Runs one migration through the sidecar and returns its report (also written/printed).
pub async fn receive(opts: ReceiveOptions) -> Result<Report, ReceiveError> {
    let listener = TcpListener::bind(opts.listen)
        .await
        .map_err(io(format!("listening on {}", opts.listen)))?;
    receive_on(listener, opts).await
}

/// Like [`receive`], on a listener the caller already bound (so a test or a supervisor can
/// hand the address to the source before the sidecar runs, without a race).
pub async fn receive_on(
    listener: TcpListener,
    opts: ReceiveOptions,
) -> Result<Report, ReceiveError> {
    let qmp = Qmp::connect(&opts.qmp).await?;
    let (maj, min, mic) = qmp.version().await?;
    let mut dest = DestinationInfo {
        qemu_version: format!("{maj}.{min}.{mic}"),
        machine: qmp.machine_type().await.unwrap_or_default(),
        ..Default::default()
    };
    check_backends(&qmp).await?;
    tracing::info!(version = %dest.qemu_version, machine = %dest.machine, "destination attached");

    let private = tempfile::Builder::new()
        .prefix("postcopy-sidecar-")
        .tempdir()
        .map_err(io(
            "creating the private directory for the destination endpoint",
        ))?;
    let endpoint = private.path().join("incoming.sock");
    // `events` makes QEMU emit MIGRATION events, which the end-of-migration wait relies on.
    let mut caps = vec![
        ("events", true),
        ("postcopy-ram", true),
        ("return-path", true),
        ("postcopy-blocktime", true),
    ];
    if opts.preempt {
        caps.push(("postcopy-preempt", true));
    }
    qmp.set_capabilities(&caps).await?;
    qmp.migrate_incoming(&format!("unix:{}", endpoint.display()))
        .await?;
    let listen = listener
        .local_addr()
        .map_err(io("reading the listening address"))?;
    tracing::info!(%listen, endpoint = %endpoint.display(), "waiting for the source");

    let shared = Arc::new(Shared::default());
    let live = opts.live.then(|| LiveView::start(shared.clone()));
    let result = carry(&listener, &endpoint, opts.preempt, shared.clone(), &qmp).await;
    if let Some(l) = live {
        l.finish();
    }

    // A destination whose postcopy broke can have its main loop stuck behind a vCPU that
    // waits for a page that will never come; its QMP then stops answering. Ask once, briefly,
    // and never use the session after a timeout: the `qapi` client cannot take a new
    // command while an abandoned one is pending.
    let final_state = tokio::time::timeout(Duration::from_secs(5), async {
        let status = qmp
            .migrate_status()
            .await
            .unwrap_or_else(|_| "unknown".into());
        let running = qmp.is_running().await.unwrap_or(false);
        let blocktime = qmp.postcopy_blocktime_ms().await.ok().flatten();
        (status, running, blocktime)
    })
    .await;
    let (status, running, blocktime) =
        final_state.unwrap_or_else(|_| ("unknown (QMP did not answer)".into(), false, None));
    dest.running = running;
    dest.postcopy_blocktime_ms = blocktime;
    dest.migration_status = status.clone();
    let error = match result {
        Err(e) => Some(e.to_string()),
        Ok(()) if status != "completed" => {
            Some(ReceiveError::DestinationFailed(status).to_string())
        }
        Ok(()) if !dest.running && !opts.allow_paused => {
            Some("destination VM is not running after the migration".to_string())
        }
        Ok(()) => None,
    };
    let stats = shared.stats.lock().expect("stats lock").clone();
    let tracker = shared.tracker.lock().expect("tracker lock");
    let report = Report::build(&stats, tracker.as_ref(), dest, opts.preempt, error);
    drop(tracker);
    if let Some(p) = &opts.report {
        write_report(p, &report)?;
    }
    Ok(report)
}

fn write_report(path: &Path, report: &Report) -> Result<(), ReceiveError> {
    let json = serde_json::to_vec_pretty(report).expect("report serialises");
    std::fs::write(path, json).map_err(io(format!("writing the report to {}", path.display())))
}

/// Receive buffer of a source connection. Bulk pages queued in the sidecar's socket
/// buffers delay an urgent page behind them (head-of-line blocking), so the buffers are
/// kept small; loopback and LAN round trips are short enough for full speed.
pub const SOURCE_RCVBUF: usize = 256 * 1024;
/// Send buffer towards the destination QEMU, small for the same reason.
pub const DESTINATION_SNDBUF: usize = 64 * 1024;

/// A buffer size, overridable through the environment for experiments (0 = kernel default).
fn buffer_size(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn accept(listener: &TcpListener) -> Result<TcpStream, ReceiveError> {
    let (s, peer) = listener
        .accept()
        .await
        .map_err(io("accepting the source"))?;
    s.set_nodelay(true).map_err(io("setting TCP_NODELAY"))?;
    let rcvbuf = buffer_size("POSTCOPY_SIDECAR_SOURCE_RCVBUF", SOURCE_RCVBUF);
    if rcvbuf > 0 {
        socket2::SockRef::from(&s)
            .set_recv_buffer_size(rcvbuf)
            .map_err(io("setting the source socket's receive buffer"))?;
    }
    tracing::info!(%peer, "source connected");
    Ok(s)
}

async fn connect_destination(endpoint: &Path) -> Result<UnixStream, ReceiveError> {
    let s = UnixStream::connect(endpoint).await.map_err(io(format!(
        "connecting to the destination at {}",
        endpoint.display()
    )))?;
    let sndbuf = buffer_size("POSTCOPY_SIDECAR_DESTINATION_SNDBUF", DESTINATION_SNDBUF);
    if sndbuf > 0 {
        socket2::SockRef::from(&s)
            .set_send_buffer_size(sndbuf)
            .map_err(io("setting the destination socket's send buffer"))?;
    }
    Ok(s)
}

/// Accepts the source's channels in order and connects each to the destination in the same
/// order (protocol-spec/preempt.md#preempt-channel), then waits for every pump and for the
/// destination to report the end of the migration. The preempt connection is awaited
/// alongside the main channel: a migration that completes in precopy never opens it.
async fn carry(
    listener: &TcpListener,
    endpoint: &Path,
    preempt: bool,
    shared: Arc<Shared>,
    qmp: &Qmp,
) -> Result<(), ReceiveError> {
    let src = accept(listener).await?;
    shared.stats.lock().expect("stats lock").started = std::time::Instant::now();
    let dst = connect_destination(endpoint).await?;
    let (src_r, src_w) = src.into_split();
    let (dst_r, dst_w) = dst.into_split();
    let mut pumps: JoinSet<Result<(), RelayError>> = JoinSet::new();
    let sh = shared.clone();
    pumps.spawn(async move { relay::forward_main(src_r, dst_w, sh).await.map(|_| ()) });
    pumps.spawn(relay::relay_return_path(dst_r, src_w, shared.clone()));
    let mut want_preempt = preempt;
    let result = loop {
        tokio::select! {
            second = accept(listener), if want_preempt => {
                want_preempt = false;
                let src2 = second?;
                let dst2 = connect_destination(endpoint).await?;
                tracing::info!("preempt channel connected");
                let (s_r, s_w) = src2.into_split();
                let (d_r, d_w) = dst2.into_split();
                pumps.spawn(relay::forward_preempt(s_r, d_w, shared.clone()));
                pumps.spawn(relay::drain_preempt_reverse(d_r, s_w));
            }
            done = pumps.join_next() => match done {
                None => break Ok(()),
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(e))) => break Err(e),
                Some(Err(join)) => break Err(RelayError::Io {
                    channel: crate::wire::Channel::Main,
                    side: "pump task",
                    source: std::io::Error::other(join.to_string()),
                }),
            }
        }
    };
    // The first pump to fail ends the migration: aborting the others drops every socket,
    // so both QEMUs see the break at once instead of hanging.
    pumps.abort_all();
    result?;
    let status = qmp.wait_migration_end(Duration::from_secs(120)).await?;
    if status != "completed" {
        return Err(ReceiveError::DestinationFailed(status));
    }
    Ok(())
}
