//! Orchestration of `receive`: attach to the destination QEMU over QMP, check and
//! configure it, make it listen on a private endpoint, hand the connections to the
//! carrier ([`super::carry`]), wait for the end, and report.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;

use super::carry::{self, CarryOptions, Endpoint, Recover, SourceSockets};
use super::live::LiveView;
use super::relay::{Relay, RelayError};
use super::report::{DestinationInfo, Report, VerifyFigures};
use crate::guard::{DiscoverError, GuardError, GuardedRam, Phase, discover};
use crate::qmp::{IncomingAddress, MigrationStatus, PeerPolicy, Qmp, QmpError};
use crate::session::admission::{Admission, AllowList};
use crate::session::{CutPolicy, Session, SessionConfig, TakeoverState};
use crate::verify::placement::PlacementVerifier;
use crate::wire::{BlockLimit, DecoderOptions};

/// Where `receive` hands its guarded mapping to the caller once it made it (tests and
/// embedders read guest RAM through it during the migration).
pub type GuardSlot = Arc<std::sync::OnceLock<Arc<GuardedRam>>>;

/// Where the sidecar listens for the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    /// This address and port.
    At(SocketAddr),
    /// This address, on the port the destination QEMU listens on. With a manager that
    /// chooses the port (libvirt's `--migrateuri tcp://DEST:PORT --listen-address
    /// 127.0.0.1`), the sidecar cannot know it before the destination listens.
    DestinationPort(IpAddr),
}

impl std::str::FromStr for Listen {
    type Err = String;
    /// `ADDR:PORT` (`[v6]:PORT`), or a bare address for [`Listen::DestinationPort`].
    fn from_str(s: &str) -> Result<Listen, String> {
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(Listen::At(a));
        }
        let bare = s.trim_start_matches('[').trim_end_matches(']');
        bare.parse::<IpAddr>()
            .map(Listen::DestinationPort)
            .map_err(|_| format!("{s:?} is neither ADDR:PORT nor an IP address"))
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::At(a) => write!(f, "{a}"),
            Listen::DestinationPort(ip) => write!(f, "{ip} (destination's port)"),
        }
    }
}

/// Who makes the destination QEMU listen for the migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Incoming {
    /// The sidecar: it sets the capabilities and makes the destination listen on a
    /// private unix socket that only the sidecar knows, so nothing can bypass it.
    #[default]
    Private,
    /// A manager such as libvirt, which sets the capabilities and issues
    /// `migrate-incoming` itself. The sidecar follows those settings: it waits until the
    /// destination listens, connects there, uses preempt only if the destination has it,
    /// and adds only capabilities that change nothing on the wire (`events`,
    /// `postcopy-blocktime`).
    Follow,
}

/// Options of `receive`.
#[derive(Debug, Clone)]
pub struct ReceiveOptions {
    /// The destination QEMU's QMP socket.
    pub qmp: PathBuf,
    /// The uid QEMU runs as: only a process of that uid may answer on [`Self::qmp`]
    /// (`SO_PEERCRED`). `None`: the owner of the socket's directory, or the sidecar's uid.
    pub qmp_uid: Option<u32>,
    /// Where the source connects.
    pub listen: Listen,
    /// Who makes the destination listen.
    pub incoming: Incoming,
    /// How long to wait for the QMP socket to appear and (with [`Incoming::Follow`]) for
    /// the destination to listen: a hook may start the sidecar before QEMU runs.
    pub attach_timeout: Duration,
    /// Once the sidecar listens, write this file (JSON: listen address, destination
    /// address, pid), so a supervisor knows the source may connect.
    pub ready_file: Option<PathBuf>,
    /// Use the postcopy-preempt channel (with [`Incoming::Private`]; with
    /// [`Incoming::Follow`] the destination's capability decides).
    pub preempt: bool,
    /// Send a requested page that is already queued for the destination ahead of the
    /// queue (protocol-spec/postcopy-sequence.md#sequence-requests-first).
    pub requests_first: bool,
    /// Ask the source for a window of pages after a fault while the guest walks memory in
    /// order (protocol-spec/postcopy-sequence.md#sequence-prefetch).
    pub prefetch: bool,
    /// Send queued data pages before queued zero pages
    /// (protocol-spec/postcopy-sequence.md#sequence-data-first).
    pub data_first: bool,
    /// Open the destination's preempt channel from the sidecar (the source has no
    /// preempt) and send requested pages there, ahead of main
    /// (protocol-spec/postcopy-sequence.md#sequence-own-preempt). Private incoming only.
    pub own_preempt: bool,
    /// The source migrates with `multifd` and this many channels
    /// (protocol-spec/multifd.md#multifd-relay): with the private incoming mode the sidecar
    /// turns multifd on at the destination; following a manager, the destination's own
    /// settings decide and this is ignored.
    pub multifd: Option<u8>,
    /// How many bytes of the main stream the sidecar reads ahead of the destination.
    pub read_ahead: usize,
    /// Most records the read-ahead queue holds ([`crate::session::MAX_QUEUED_UNITS`] by
    /// default): with data pages first, zero pages wait there, and their bookkeeping is
    /// what the sidecar's CPU spends per record.
    pub max_queued_units: usize,
    /// Write the JSON report here.
    pub report: Option<PathBuf>,
    /// Show the live view (on a terminal).
    pub live: bool,
    /// The destination was started with `-S`: do not require it to run at the end.
    pub allow_paused: bool,
    /// Map the destination's RAM under the sidecar's own userfaultfd
    /// (protocol-spec/guarded-access.md#guard-faults); implied by `verify` and `guard_slot`.
    pub guard: bool,
    /// Check every postcopy page right after QEMU placed it, and, when the destination is
    /// paused at the end, compare its whole RAM with what the stream delivered.
    pub verify: bool,
    /// Write the digests of the delivered pages here, for `postcopy-sidecar verify`.
    pub digests: Option<PathBuf>,
    /// Receives the guarded mapping once it exists.
    pub guard_slot: Option<GuardSlot>,
    /// Prometheus metrics to update (served by [`super::metrics::serve`]).
    pub metrics: Option<Arc<super::metrics::Metrics>>,
    /// What to do when the source link breaks in postcopy; `None` takes the default of
    /// the incoming mode: hold in private mode, pass-through when following a manager.
    pub on_cut: Option<CutPolicy>,
    /// Silence from the source in postcopy that counts as a cut.
    pub silence: Duration,
    /// How long to wait for a source that went away in postcopy before releasing the
    /// destination to QEMU's own paused state.
    pub away_timeout: Duration,
    /// How long to wait for the source's first connection.
    pub accept_timeout: Duration,
    /// Write what a restarted sidecar needs to take the migration over here, once the
    /// stream reached postcopy.
    pub state_file: Option<PathBuf>,
    /// Take over a migration paused in postcopy (its first sidecar died): read
    /// `state_file`, make the destination listen again, accept the source's resume.
    pub takeover: bool,
    /// Receives every cut and recovery of the source link as it happens (a supervisor or a
    /// test watching the link).
    pub link_events: Option<tokio::sync::mpsc::UnboundedSender<crate::session::LinkEvent>>,
    /// Only these addresses may connect (`--allow-from`); anyone, if unset.
    pub allow_from: Option<AllowList>,
    /// How long a new connection may take to show it is the source (its opening).
    pub handshake_timeout: Duration,
    /// TLS on both sides.
    pub tls: TlsOptions,
}

/// TLS settings (protocol-spec/tls.md).
#[derive(Debug, Clone)]
pub struct TlsOptions {
    /// The sidecar's server credentials towards the source (`--tls-creds`). Unset, and the
    /// destination expects TLS, the host's QEMU credentials in `host_creds` are used, as
    /// the destination QEMU itself would have.
    pub source: Option<super::tls::SourceTls>,
    /// The host's QEMU credentials directory (libvirt's `migrate_tls_x509_cert_dir`), used
    /// when the destination QEMU expects TLS (its `tls-creds` parameter is set).
    pub host_creds: PathBuf,
    /// The name the destination's certificate must carry; by default the first name in
    /// `host_creds/server-cert.pem`.
    pub destination_name: Option<String>,
}

impl Default for TlsOptions {
    fn default() -> Self {
        TlsOptions {
            source: None,
            host_creds: super::tls::LIBVIRT_QEMU_CREDS.into(),
            destination_name: None,
        }
    }
}

/// Default for [`ReceiveOptions::handshake_timeout`]: QEMU sends its opening at once.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long `receive` waits by default for QMP and (following a manager) for the
/// destination to listen.
pub const ATTACH_TIMEOUT: Duration = Duration::from_secs(60);

impl ReceiveOptions {
    /// Options for destination `qmp` and source-facing `listen`, everything else at its
    /// default: private incoming socket, no preempt, no report, no live view.
    pub fn new(qmp: impl Into<PathBuf>, listen: Listen) -> ReceiveOptions {
        ReceiveOptions {
            qmp: qmp.into(),
            qmp_uid: None,
            listen,
            incoming: Incoming::Private,
            attach_timeout: ATTACH_TIMEOUT,
            ready_file: None,
            preempt: false,
            requests_first: true,
            prefetch: true,
            data_first: true,
            own_preempt: false,
            multifd: None,
            read_ahead: crate::daemon::relay::DEFAULT_READ_AHEAD,
            max_queued_units: crate::session::MAX_QUEUED_UNITS,
            report: None,
            live: false,
            allow_paused: false,
            guard: false,
            verify: false,
            digests: None,
            guard_slot: None,
            metrics: None,
            on_cut: None,
            silence: crate::session::DEFAULT_SILENCE,
            away_timeout: crate::session::DEFAULT_AWAY_TIMEOUT,
            accept_timeout: ACCEPT_TIMEOUT,
            state_file: None,
            takeover: false,
            link_events: None,
            allow_from: None,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            tls: TlsOptions::default(),
        }
    }

    /// Who may answer on the destination's QMP socket.
    pub fn peer_policy(&self) -> PeerPolicy {
        PeerPolicy::from_uid(self.qmp_uid)
    }

    /// The cut policy in force.
    pub fn cut_policy(&self) -> CutPolicy {
        self.on_cut.unwrap_or(match self.incoming {
            Incoming::Private => CutPolicy::Hold,
            Incoming::Follow => CutPolicy::PassThrough,
        })
    }
}

/// How long `receive` waits for the source's first connection by default.
pub const ACCEPT_TIMEOUT: Duration = Duration::from_secs(600);

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
    /// The options contradict each other or the destination's setup.
    #[error("{0}")]
    Setup(String),
    /// TLS credentials that cannot be used.
    #[error("{0}")]
    Tls(#[from] super::tls::TlsError),
    /// The destination's RAM could not be found or opened.
    #[error("{0}")]
    Discover(#[from] DiscoverError),
    /// The destination's RAM could not be guarded.
    #[error("{0}")]
    Guard(#[from] GuardError),
    /// Verification found pages that differ from what the stream delivered.
    #[error(
        "{count} page(s) of the destination differ from what the stream delivered; first: block {block} offset {offset:#x}"
    )]
    Mismatch {
        /// Pages that differ.
        count: u64,
        /// First block.
        block: String,
        /// First offset.
        offset: u64,
    },
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
    /// The source went away in postcopy and did not come back in time.
    #[error("{0}")]
    SourceGone(String),
    /// A directory for the ready, state, report or digest file is not the sidecar's own.
    #[error("{0}")]
    Dir(#[from] crate::owned_dir::DirError),
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

/// The bounds a source's block list must fit: the destination's own blocks.
pub fn block_limits(blocks: &[crate::qmp::RamBlock]) -> HashMap<Vec<u8>, BlockLimit> {
    blocks
        .iter()
        .map(|b| {
            (
                b.name.as_bytes().to_vec(),
                BlockLimit {
                    max_length: b.total.max(b.used),
                    page_size: b.page_size,
                },
            )
        })
        .collect()
}

/// Runs one migration through the sidecar and returns its report (also written/printed).
pub async fn receive(opts: ReceiveOptions) -> Result<Report, ReceiveError> {
    run(None, opts).await
}

/// Like [`receive`], on a listener the caller already bound (so a test or a supervisor can
/// hand the address to the source before the sidecar runs, without a race).
pub async fn receive_on(
    listener: TcpListener,
    opts: ReceiveOptions,
) -> Result<Report, ReceiveError> {
    run(Some(listener), opts).await
}

/// Connects to QMP, retrying while the socket does not exist or refuses (QEMU not started
/// yet) until `timeout`; other errors end at once.
async fn attach(path: &Path, peer: PeerPolicy, timeout: Duration) -> Result<Qmp, ReceiveError> {
    let deadline = Instant::now() + timeout;
    loop {
        match Qmp::connect_checked(path, peer).await {
            Ok(q) => return Ok(q),
            Err(QmpError::Connect { source, .. })
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) && Instant::now() < deadline =>
            {
                // Waiting for another program (QEMU) to create a socket: there is no event
                // to wait on, so look again shortly.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Waits until the destination listens after a manager's `migrate-incoming`.
async fn wait_incoming(qmp: &Qmp, timeout: Duration) -> Result<IncomingAddress, ReceiveError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(a) = qmp.incoming_address().await? {
            return Ok(a);
        }
        if Instant::now() >= deadline {
            return Err(ReceiveError::Setup(format!(
                "the destination did not start listening for the migration within {:.0} s \
                 (with --follow-incoming, its manager must issue migrate-incoming)",
                timeout.as_secs_f64()
            )));
        }
        // QEMU emits no event when it starts listening: ask again shortly.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The address to connect to for a destination listening on `addr`.
pub(crate) fn endpoint_of(addr: &IncomingAddress) -> Result<Endpoint, ReceiveError> {
    match addr {
        IncomingAddress::Unix(p) => Ok(Endpoint::Unix(p.clone())),
        IncomingAddress::Tcp { host, port } => {
            let ip: IpAddr = host.parse().map_err(|_| {
                ReceiveError::Setup(format!(
                    "the destination listens on {addr}; the sidecar needs a numeric address \
                     (give the manager a listen address such as 127.0.0.1)"
                ))
            })?;
            // A wildcard listener is reached on loopback.
            let ip = match ip {
                IpAddr::V4(v) if v.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(v) if v.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
                other => other,
            };
            Ok(Endpoint::Tcp(SocketAddr::new(ip, *port)))
        }
    }
}

/// Decides TLS on each side: towards the source as configured, towards the destination
/// when it expects TLS (its `tls-creds` parameter is set, as libvirt's `--tls` does). Then
/// the source speaks TLS too, so without `--tls-creds` the sidecar answers it with the
/// host's QEMU server credentials, like the destination would have.
async fn tls_ends(
    tls: &TlsOptions,
    qmp: Option<&Qmp>,
) -> Result<
    (
        Option<super::tls::SourceTls>,
        Option<super::tls::DestinationTls>,
    ),
    ReceiveError,
> {
    let expects = match qmp {
        Some(q) => {
            let p = tokio::time::timeout(Duration::from_secs(10), q.parameters())
                .await
                .map_err(|_| QmpError::Timeout("query-migrate-parameters".into()))??;
            p.get("tls-creds")
                .and_then(|v| v.as_str())
                .is_some_and(|c| !c.is_empty())
        }
        None => false,
    };
    if !expects {
        return Ok((tls.source.clone(), None));
    }
    let dir = &tls.host_creds;
    tracing::info!(creds = %dir.display(), "the destination expects TLS: the sidecar connects with the host's QEMU client credentials");
    let dest = super::tls::DestinationTls::load(dir, tls.destination_name.as_deref())?;
    let source = match &tls.source {
        Some(s) => s.clone(),
        None => super::tls::SourceTls::load(dir, true, Vec::new())?,
    };
    Ok((Some(source), Some(dest)))
}

/// Binds the sidecar's listener; explains the clash when the destination took the port.
async fn bind(
    listen: Listen,
    endpoint: &Endpoint,
    dest: &IncomingAddress,
) -> Result<TcpListener, ReceiveError> {
    let addr = match (listen, endpoint) {
        (Listen::At(a), _) => a,
        (Listen::DestinationPort(ip), Endpoint::Tcp(d)) => SocketAddr::new(ip, d.port()),
        (Listen::DestinationPort(_), Endpoint::Unix(_)) => {
            return Err(ReceiveError::Setup(format!(
                "--listen without a port takes the destination's port, but it listens on {dest}"
            )));
        }
    };
    TcpListener::bind(addr).await.map_err(|source| {
        if source.kind() == std::io::ErrorKind::AddrInUse {
            ReceiveError::Setup(format!(
                "cannot listen on {addr}: the address is in use; the destination QEMU listens \
                 on {dest}, so the sidecar needs its own address (with libvirt: \
                 --listen-address 127.0.0.1 for QEMU, --migrateuri tcp://SIDECAR_ADDR:PORT \
                 for the source)"
            ))
        } else {
            ReceiveError::Io {
                what: format!("listening on {addr}"),
                source,
            }
        }
    })
}

/// Writes the ready file atomically (temporary name, then rename).
fn write_ready(path: &Path, listen: SocketAddr, endpoint: &Endpoint) -> Result<(), ReceiveError> {
    let body = serde_json::json!({
        "listen": listen.to_string(),
        "destination": endpoint.to_string(),
        "pid": std::process::id(),
    });
    crate::durable::write_atomically(path, format!("{body}\n").as_bytes())
        .map_err(io(format!("writing the ready file {}", path.display())))
}

/// How long a takeover waits for the destination's QMP: a paused destination's main
/// loop may be blocked on guest memory, and then a new QMP session cannot even negotiate.
/// Kept short: a blocked main loop also keeps QEMU 10.0 from accepting the recovery
/// connection, so every second counts (protocol-spec/postcopy-sequence.md#sequence-takeover).
const TAKEOVER_QMP: Duration = Duration::from_secs(3);

/// Attaches to the destination's QMP: required for a fresh migration, best effort for a
/// takeover (which can do without it).
async fn attach_for(opts: &ReceiveOptions) -> Result<Option<Qmp>, ReceiveError> {
    if !opts.takeover {
        return attach(&opts.qmp, opts.peer_policy(), opts.attach_timeout)
            .await
            .map(Some);
    }
    // One attempt: the destination runs already.
    match tokio::time::timeout(
        TAKEOVER_QMP,
        Qmp::connect_checked(&opts.qmp, opts.peer_policy()),
    )
    .await
    {
        Ok(Ok(q)) => Ok(Some(q)),
        outcome => {
            let why = match outcome {
                Ok(Err(e)) => e.to_string(),
                Ok(Ok(_)) => unreachable!(),
                _ => "no answer (its main loop may be blocked on guest memory)".into(),
            };
            tracing::warn!(
                "destination QMP unavailable ({why}): taking over through the destination's \
                 original incoming socket, without QMP"
            );
            Ok(None)
        }
    }
}

/// What the destination says about itself (best effort without QMP).
async fn destination_info(qmp: Option<&Qmp>) -> Result<DestinationInfo, ReceiveError> {
    let Some(qmp) = qmp else {
        return Ok(DestinationInfo::default());
    };
    let (maj, min, mic) = qmp.version().await?;
    Ok(DestinationInfo {
        qemu_version: format!("{maj}.{min}.{mic}"),
        machine: qmp.machine_type().await.unwrap_or_default(),
        ..Default::default()
    })
}

async fn run(listener: Option<TcpListener>, opts: ReceiveOptions) -> Result<Report, ReceiveError> {
    // Before anything else: a file of ours must not land in a directory another user can
    // plant links or files in.
    for file in [
        &opts.ready_file,
        &opts.state_file,
        &opts.report,
        &opts.digests,
    ]
    .into_iter()
    .flatten()
    {
        crate::owned_dir::check_parent_of(file)?;
    }
    let takeover = if opts.takeover {
        Some(read_takeover(&opts)?)
    } else {
        None
    };
    // The sidecar's own preempt channel is a promise to the destination, made before it
    // listens; takeover keeps the first sidecar's promise.
    let own_preempt = match &takeover {
        Some(state) => state.own_preempt,
        None => opts.own_preempt,
    };
    if opts.own_preempt && takeover.is_none() {
        check_own_preempt(&opts)?;
    }
    let qmp = attach_for(&opts).await?;
    let mut dest = destination_info(qmp.as_ref()).await?;
    if takeover.is_none()
        && let Some(q) = &qmp
    {
        check_backends(q).await?;
    }
    tracing::info!(version = %dest.qemu_version, machine = %dest.machine, "destination attached");

    // The destination's blocks bound every block list a source may announce.
    let decoder = match (&takeover, &qmp) {
        (None, Some(q)) => {
            let blocks = q.ram_blocks().await?;
            DecoderOptions {
                // A hugepage block's MEM_SIZE entry carries its page size, which only the
                // block's own page size tells apart from the next entry
                // (protocol-spec/ram.md#ram-mem-size); source and destination must agree.
                block_page_sizes: blocks
                    .iter()
                    .map(|b| (b.name.as_bytes().to_vec(), b.page_size))
                    .collect(),
                block_limits: Some(block_limits(&blocks)),
            }
        }
        _ => DecoderOptions::default(),
    };
    let policy = opts.cut_policy();
    let cfg = SessionConfig {
        decoder: decoder.clone(),
        on_cut: policy,
        silence: opts.silence,
        away_timeout: opts.away_timeout,
        record_digests: opts.verify || opts.digests.is_some(),
        check_placement: opts.verify,
        requests_first: opts.requests_first,
        prefetch: opts.prefetch,
        data_first: opts.data_first,
        max_queued_units: opts.max_queued_units.max(1),
        own_preempt,
        // Set below once the destination's capabilities are known.
        no_postcopy: None,
    };
    let session = match &takeover {
        Some(state) => Session::takeover(cfg, state, Instant::now()),
        None => Session::new(cfg, Instant::now()),
    };
    let (reports_tx, reports) = tokio::sync::mpsc::unbounded_channel();
    let mut relay = Relay::new(session, opts.metrics.clone(), reports_tx);
    // Reading ahead only pays when requested pages can pass what was read ahead; in
    // stream order a deep queue would only stand between a requested page and the guest.
    relay.read_ahead = if opts.requests_first {
        opts.read_ahead.max(super::relay::READ_CHUNK)
    } else {
        super::relay::READ_CHUNK
    };
    let relay = Arc::new(relay);
    // Registered before anything reaches the destination, so no read of the sidecar's can
    // ever allocate a page that the stream has yet to bring.
    let guard_wants = match (&qmp, opts.guard || opts.verify || opts.guard_slot.is_some()) {
        (_, false) => None,
        (Some(q), true) if takeover.is_none() => Some(start_guard(q, &opts, &relay).await?),
        _ => {
            return Err(ReceiveError::Setup(
                "guarded reads (--verify, --guard) cannot join a migration already in postcopy"
                    .into(),
            ));
        }
    };

    // Kept alive until the end: it holds the private sockets. Not removed when the
    // sidecar is killed, so a restarted one finds the destination's socket there.
    let private = tempfile::Builder::new()
        .prefix("postcopy-sidecar-")
        .tempdir()
        .map_err(io(
            "creating the private directory for the destination endpoint",
        ))?;
    let mut no_postcopy = None;
    let (endpoint, dest_addr, preempt, multifd) = match (&takeover, &qmp, opts.incoming) {
        (Some(state), _, _) => {
            let e = takeover_endpoint(state, qmp.as_ref(), private.path()).await?;
            (e.clone(), e.incoming_address(), state.preempt, None)
        }
        (None, None, _) => unreachable!("QMP is required without --recover"),
        (None, Some(qmp), Incoming::Private) => {
            let path = private.path().join("incoming.sock");
            // `events` makes QEMU emit MIGRATION events, which the end-of-migration wait
            // relies on.
            let mut caps = vec![
                ("events", true),
                ("postcopy-ram", true),
                ("return-path", true),
                ("postcopy-blocktime", true),
            ];
            if opts.preempt || own_preempt {
                caps.push(("postcopy-preempt", true));
            }
            // Before the destination listens with preempt on, waiting for a channel the
            // sidecar could not open.
            if own_preempt && tls_ends(&opts.tls, Some(qmp)).await?.1.is_some() {
                return Err(own_preempt_tls());
            }
            match opts.multifd {
                None => qmp.set_capabilities(&caps).await?,
                Some(n) => {
                    let postcopy =
                        multifd_postcopy_allowed(&dest.qemu_version, opts.preempt || own_preempt)?;
                    no_postcopy =
                        set_multifd(qmp, &mut caps, n, postcopy, opts.preempt || own_preempt)
                            .await?;
                }
            }
            qmp.migrate_incoming(&format!("unix:{}", path.display()))
                .await?;
            let addr = IncomingAddress::Unix(path.clone());
            (Endpoint::Unix(path), addr, opts.preempt, opts.multifd)
        }
        (None, Some(qmp), Incoming::Follow) => {
            let addr = wait_incoming(qmp, opts.attach_timeout).await?;
            let endpoint = endpoint_of(&addr)?;
            let preempt = qmp.capability("postcopy-preempt").await?;
            if opts.preempt && !preempt {
                tracing::warn!(
                    "--preempt given, but the destination's manager did not enable \
                     postcopy-preempt: following the destination (no preempt channel)"
                );
            }
            // Nothing reaches the destination but through the sidecar, so these land
            // before the stream does; neither changes a byte on the wire.
            if let Err(e) = qmp
                .set_capabilities(&[("events", true), ("postcopy-blocktime", true)])
                .await
            {
                tracing::warn!("could not enable events/postcopy-blocktime: {e}");
            }
            let multifd = followed_multifd(qmp).await?;
            if multifd.is_some()
                && !multifd_postcopy_allowed(&dest.qemu_version, false)?
                && qmp.capability("postcopy-ram").await?
            {
                // The manager's choice would lose the VM after the switch (directly too):
                // refused where the VM is still safe on the source.
                tracing::warn!(
                    "the destination's manager set multifd and postcopy on a QEMU 7.2 destination, which aborts after such a migration: a source's postcopy will be refused at its start"
                );
                no_postcopy = Some(NO_POSTCOPY_7_2);
            }
            tracing::info!(destination = %addr, preempt, ?multifd, "following the destination's manager");
            (endpoint, addr, preempt, multifd)
        }
    };
    if let Some(why) = no_postcopy {
        relay.with(|s| s.refuse_postcopy(why));
    }
    let listener = match listener {
        Some(l) => l,
        None => bind(opts.listen, &endpoint, &dest_addr).await?,
    };
    let listen = listener
        .local_addr()
        .map_err(io("reading the listening address"))?;
    if let Some(p) = &opts.ready_file {
        write_ready(p, listen, &endpoint)?;
    }
    tracing::info!(%listen, %endpoint, on_cut = policy.name(), "waiting for the source");

    let (source_tls, destination_tls) = tls_ends(&opts.tls, qmp.as_ref()).await?;
    if own_preempt && destination_tls.is_some() {
        // Checked before the destination listens too; a takeover lands here.
        return Err(own_preempt_tls());
    }
    let live = opts.live.then(|| LiveView::start(relay.clone()));
    let carried = carry::carry(
        listener,
        CarryOptions {
            endpoint,
            preempt,
            own_preempt,
            multifd,
            recover: match opts.incoming {
                Incoming::Private => Recover::Private(private.path().to_path_buf()),
                Incoming::Follow => Recover::Follow,
            },
            accept_timeout: opts.accept_timeout,
            sockets: SourceSockets {
                rcvbuf: buffer_size("POSTCOPY_SIDECAR_SOURCE_RCVBUF", SOURCE_RCVBUF),
                dst_sndbuf: buffer_size("POSTCOPY_SIDECAR_DESTINATION_SNDBUF", DESTINATION_SNDBUF),
                silence: opts.silence,
            },
            takeover: takeover.is_some(),
            state_file: opts.state_file.clone(),
            link_events: opts.link_events.clone(),
            admission: Admission::new(opts.allow_from.clone()),
            decoder,
            handshake_timeout: opts.handshake_timeout,
            source_tls,
            destination_tls,
            early_destination: super::carry::closes_a_recovery_safely(&dest.qemu_version),
        },
        relay.clone(),
        reports,
        qmp.as_ref(),
        guard_wants,
    )
    .await;
    if let Some(l) = live {
        l.finish();
    }
    // Waits for the destination to report the end of the migration (the stream is
    // complete, so this is QEMU finishing up: bounded).
    let result = match (carried, &qmp) {
        (Ok(()), Some(qmp)) => match qmp.wait_migration_end(Duration::from_secs(120)).await {
            Ok(MigrationStatus::Completed) => Ok(()),
            Ok(s) => Err(ReceiveError::DestinationFailed(s.to_string())),
            Err(e) => Err(e.into()),
        },
        // Without QMP the stream itself says it: the destination sent SHUT(0) after the
        // stream's EOF.
        (Ok(()), None) => match relay.with(|s| s.destination_shut()) {
            Some(0) => Ok(()),
            other => Err(ReceiveError::DestinationFailed(format!(
                "unknown (no QMP; the destination's SHUT was {other:?})"
            ))),
        },
        (Err(e), _) => Err(e),
    };

    // A destination whose postcopy broke can have its main loop stuck behind a vCPU that
    // waits for a page that will never come; its QMP then stops answering. Every call
    // here is bounded.
    let final_state = tokio::time::timeout(Duration::from_secs(5), async {
        let Some(qmp) = &qmp else {
            let shut_ok = relay.with(|s| s.destination_shut()) == Some(0);
            return (
                if shut_ok {
                    "completed"
                } else {
                    "unknown (no QMP)"
                }
                .to_string(),
                shut_ok,
                None,
            );
        };
        let status = qmp
            .migrate_status()
            .await
            .map(|s| s.to_string())
            .unwrap_or_else(|_| "unknown".into());
        let running = qmp.is_running().await.unwrap_or(false);
        let faults = qmp.postcopy_fault_figures().await.ok();
        (status, running, faults)
    })
    .await;
    let (status, running, faults) =
        final_state.unwrap_or_else(|_| ("unknown (QMP did not answer)".into(), false, None));
    dest.running = running;
    dest.postcopy_blocktime_ms = faults.as_ref().and_then(|f| f.blocktime_ms);
    dest.qemu_faults = faults.filter(|f| f.latency_ns.is_some());
    dest.migration_status = status.clone();
    let (guard, verify) = finish_guard(&relay, &opts, &status, running);
    let mismatch = verify
        .as_ref()
        .and_then(|v| v.exact.as_ref())
        .and_then(|r| {
            r.listed.first().map(|m| ReceiveError::Mismatch {
                count: r.mismatches,
                block: m.block.clone(),
                offset: m.offset,
            })
        });
    if let (
        Some(m),
        Err(ReceiveError::Relay(RelayError::Session(crate::session::SessionError::Decode(e)))),
    ) = (&opts.metrics, &result)
    {
        m.decode_errors
            .get_or_create(&super::metrics::DecodeErrorLabels {
                channel: e.channel.into(),
                kind: e.kind.name(),
            })
            .inc();
    }
    let error = match result {
        Err(e) => Some(e.to_string()),
        Ok(()) if mismatch.is_some() => mismatch.map(|m| m.to_string()),
        Ok(()) if status != "completed" => {
            Some(ReceiveError::DestinationFailed(status).to_string())
        }
        // A manager decides when its VM runs (libvirt resumes the destination itself).
        Ok(()) if !dest.running && !opts.allow_paused && opts.incoming == Incoming::Private => {
            Some("destination VM is not running after the migration".to_string())
        }
        Ok(()) => None,
    };
    let mut report = relay.with(|s| Report::build(s, dest, preempt, error, Instant::now()));
    report.guard = guard;
    report.verify = verify;
    if let Some(p) = &opts.report {
        // A report that cannot be written fails the run; the caller counts it as failed.
        write_report(p, &report)?;
    }
    if let Some(m) = &opts.metrics {
        m.migration_ended(&report.outcome);
    }
    Ok(report)
}

/// Where a taking-over sidecar reaches the paused destination: QEMU keeps its incoming
/// listener open while paused and takes a new connection there as the recovery's main
/// channel (protocol-spec/postcopy-sequence.md#sequence-takeover), so the first sidecar's
/// endpoint works without QMP. Without one in the state file, QMP's `migrate-recover`
/// (out of band) makes the destination listen on a new private socket.
async fn takeover_endpoint(
    state: &TakeoverState,
    qmp: Option<&Qmp>,
    private: &Path,
) -> Result<Endpoint, ReceiveError> {
    if let Some(d) = &state.destination {
        return Endpoint::parse(d).ok_or_else(|| {
            ReceiveError::Setup(format!(
                "the state file's destination {d:?} is not an endpoint"
            ))
        });
    }
    match qmp {
        Some(q) => carry::recover_privately(q, private).await,
        None => Err(ReceiveError::Setup(
            "the state file names no destination endpoint and the destination's QMP does not \
             answer: recover the migration directly (deploy/README.md)"
                .into(),
        )),
    }
}

/// Why a destination of this QEMU version must not take postcopy beside multifd, if it
/// must not: 7.2 allows the pair but its destination aborts at the end
/// (protocol-spec/multifd.md#multifd-runs), and 8.1 to 10.0 refuse it themselves.
const NO_POSTCOPY_7_2: &str = "the source asked for postcopy (POSTCOPY_ADVISE) beside \
     multifd, which a QEMU 7.2 destination cannot finish (it aborts in cleanup after the \
     migration completed): turn postcopy-ram off on the source";
/// The same for a destination that refused the pair itself.
const NO_POSTCOPY_REFUSED: &str = "the source asked for postcopy (POSTCOPY_ADVISE) beside \
     multifd, which this destination QEMU refuses: turn postcopy-ram off on the source";

/// Whether postcopy may be offered beside multifd on a destination of `version`.
fn multifd_postcopy_allowed(version: &str, preempt: bool) -> Result<bool, ReceiveError> {
    let major: u32 = version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    if major < 8 && preempt {
        return Err(ReceiveError::Setup(
            "--multifd with preempt: QEMU 7.2 takes every connection after main as multifd".into(),
        ));
    }
    Ok(major >= 8)
}

/// Turns multifd on at a private destination with `n` channels and uncompressed pages,
/// beside `caps`. Postcopy stays on only where the destination takes it beside multifd
/// (`postcopy`, and QEMU itself: 10.0 refuses the pair, 10.2 allows it,
/// protocol-spec/multifd.md#multifd-postcopy); otherwise the destination is set up for
/// precopy only, unless the preempt channel was asked for, which needs postcopy. Returns
/// why a source's postcopy must be refused, when it must.
async fn set_multifd(
    qmp: &Qmp,
    caps: &mut Vec<(&'static str, bool)>,
    n: u8,
    postcopy: bool,
    preempt: bool,
) -> Result<Option<&'static str>, ReceiveError> {
    if n == 0 {
        return Err(ReceiveError::Setup(
            "--multifd: at least one channel".into(),
        ));
    }
    let mut params = serde_json::json!({ "multifd-channels": n });
    if qmp.parameters().await?.get("multifd-compression").is_some() {
        params["multifd-compression"] = "none".into();
    }
    qmp.set_parameters(params).await?;
    caps.push(("multifd", true));
    let why = if postcopy {
        let Err(e) = qmp.set_capabilities(caps).await else {
            return Ok(None);
        };
        if preempt {
            return Err(ReceiveError::Setup(format!(
                "the destination refuses multifd with postcopy-preempt: {e}"
            )));
        }
        tracing::warn!("the destination refuses multifd with postcopy ({e}): precopy only");
        NO_POSTCOPY_REFUSED
    } else {
        tracing::warn!(
            "a QEMU 7.2 destination aborts after a multifd+postcopy migration: precopy only"
        );
        NO_POSTCOPY_7_2
    };
    caps.retain(|(c, _)| !c.starts_with("postcopy-"));
    qmp.set_capabilities(caps).await?;
    Ok(Some(why))
}

/// The multifd channels a manager's destination waits for, if it has multifd on; refuses
/// compressed multifd, which the sidecar cannot check packet by packet.
async fn followed_multifd(qmp: &Qmp) -> Result<Option<u8>, ReceiveError> {
    if !qmp.capability("multifd").await? {
        return Ok(None);
    }
    let params = qmp.parameters().await?;
    let compression = params
        .get("multifd-compression")
        .and_then(serde_json::Value::as_str)
        .unwrap_or("none");
    if compression != "none" {
        return Err(ReceiveError::Setup(format!(
            "the destination expects multifd compressed with {compression}: the sidecar relays              uncompressed multifd only"
        )));
    }
    let n = params
        .get("multifd-channels")
        .and_then(serde_json::Value::as_u64)
        .and_then(|n| u8::try_from(n).ok())
        .unwrap_or(2);
    Ok(Some(n))
}

/// Refuses `--own-preempt` where it cannot work: the sidecar must set the destination's
/// capability before it listens, requested pages must pass the queue to reach the channel,
/// and a source with preempt opens its own.
fn check_own_preempt(opts: &ReceiveOptions) -> Result<(), ReceiveError> {
    let why = if opts.incoming != Incoming::Private {
        "it needs the private incoming mode: the sidecar turns postcopy-preempt on before the \
         destination listens"
    } else if opts.preempt {
        "--preempt says the source opens the preempt channel itself"
    } else if !opts.requests_first {
        "it sends queued pages ahead, which --no-requests-first turns off"
    } else if opts.multifd.is_some() {
        "with multifd the destination takes its preempt channel only after every multifd \
         channel, which the sidecar does not order yet"
    } else {
        return Ok(());
    };
    Err(ReceiveError::Setup(format!("--own-preempt: {why}")))
}

/// QEMU finishes the TLS handshakes of main and preempt in any order, and must take main
/// first: not supported yet.
fn own_preempt_tls() -> ReceiveError {
    ReceiveError::Setup(
        "--own-preempt does not work with a destination that expects TLS yet".into(),
    )
}

/// Reads the state a first sidecar left for a takeover.
fn read_takeover(opts: &ReceiveOptions) -> Result<TakeoverState, ReceiveError> {
    let path = opts.state_file.as_ref().ok_or_else(|| {
        ReceiveError::Setup("--recover needs --state-file: the file the first sidecar wrote".into())
    })?;
    let text = std::fs::read(path).map_err(io(format!("reading {}", path.display())))?;
    serde_json::from_slice(&text).map_err(|e| {
        ReceiveError::Setup(format!(
            "{} is not a sidecar state file: {e}",
            path.display()
        ))
    })
}

/// Finds and guards the destination's memfds; returns the channel of pages the guard wants
/// asked of the source.
async fn start_guard(
    qmp: &Qmp,
    opts: &ReceiveOptions,
    relay: &Arc<Relay>,
) -> Result<tokio::sync::mpsc::UnboundedReceiver<(String, u64, u64)>, ReceiveError> {
    let pid = discover::qemu_pid(&opts.qmp, qmp.peer_pid())?;
    let files = discover::ram_files(pid, &qmp.ram_blocks().await?, &qmp.memory_backends().await?)?;
    let names: Vec<&str> = files.iter().map(|f| f.block.as_str()).collect();
    tracing::info!(pid, blocks = ?names, "guarding the destination's RAM");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let block_names: Vec<String> = files.iter().map(|f| f.block.clone()).collect();
    let guard = Arc::new(GuardedRam::new(
        files,
        Box::new(move |block, offset, len| {
            if let Some(name) = block_names.get(block) {
                let _ = tx.send((name.clone(), offset, len));
            }
        }),
    )?);
    let _ = relay.guard.set(guard.clone());
    if opts.verify {
        *relay.placement.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(PlacementVerifier::start(guard.clone()));
    }
    if let Some(slot) = &opts.guard_slot {
        let _ = slot.set(guard);
    }
    Ok(rx)
}

/// Tells the guard how the migration ended, collects the verification, and writes the
/// digests.
fn finish_guard(
    relay: &Relay,
    opts: &ReceiveOptions,
    status: &str,
    running: bool,
) -> (Option<crate::guard::GuardFigures>, Option<VerifyFigures>) {
    let guard = relay.guard.get();
    if let Some(g) = guard {
        g.set_phase(if status == "completed" {
            Phase::Ended
        } else {
            Phase::Failed(format!("the destination's migration is {status}"))
        });
    }
    let at_placement = relay
        .placement
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .map(PlacementVerifier::finish);
    let digests = relay.with(|s| s.digests().cloned());
    if let (Some(path), Some(d)) = (&opts.digests, &digests)
        && let Err(e) = d.save(path)
    {
        tracing::warn!("{e}");
    }
    let verify = opts.verify.then(|| {
        let mut v = VerifyFigures {
            at_placement,
            exact: None,
            note: String::new(),
        };
        match (guard, &digests) {
            (Some(g), Some(d)) if status == "completed" && !running => {
                let blocks = g.blocks();
                let read = |name: &str, offset: u64, buf: &mut [u8]| {
                    let b = g.block_index(name).expect("a guarded block");
                    g.read_page(b, offset, buf)
                        .map_err(|e| std::io::Error::other(e.to_string()))
                };
                match crate::verify::check::check_with(d, &blocks, read) {
                    Ok(r) => v.exact = Some(r),
                    Err(e) => v.note = format!("the exact check failed: {e}"),
                }
            }
            _ if running => {
                v.note = "the destination runs: its guest may rewrite pages, so only the \
                          at-placement check applies"
                    .into()
            }
            _ => v.note = format!("no exact check: the migration is {status}"),
        }
        v
    });
    (guard.map(|g| g.figures()), verify)
}

fn write_report(path: &Path, report: &Report) -> Result<(), ReceiveError> {
    let json = serde_json::to_vec_pretty(report).expect("report serialises");
    crate::durable::write_atomically(path, &json)
        .map_err(io(format!("writing the report to {}", path.display())))
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
