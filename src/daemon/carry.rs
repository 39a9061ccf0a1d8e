//! The carrier: accepts the source's connections for the whole migration, tells them
//! apart, connects the destination, feeds the pumps, and acts on what the session decides
//! when a source connection is lost (hold the destination, pass QEMU's recovery through,
//! or fail), on the idle rule, and on the end.
//!
//! Connections are told apart by their first byte, never by a guess: a fresh main channel
//! starts with the file magic (`Q`), a resumed one with a command (`0x08`), and a preempt
//! channel arrives once the main one is up (or, with QEMU 7.2, right after it, silent).
//! (protocol-spec/postcopy-sequence.md#sequence-hold)

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use super::receive::ReceiveError;
use super::relay::{self, Feed, PumpReport, Reader, Relay, RelayError, Writer};
use super::tls::{DestinationTls, EofAsEnd, SourceTls};
use crate::qmp::{EventCursor, IncomingAddress, MigrationStatus, Qmp};
use crate::session::admission::{
    Admission, DistinguishedName, Joining, OpeningCheck, OpeningVerdict, PeerId,
};
use crate::session::{CutDecision, LinkEvent, TimerAction};
use crate::wire::multifd::{self, MultifdInit};
use crate::wire::{Channel, DecoderOptions, PostcopyPhase};

/// Where the sidecar reaches the destination QEMU's incoming side.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// A private unix socket the sidecar chose.
    Unix(PathBuf),
    /// Where a manager made the destination listen.
    Tcp(SocketAddr),
}

impl Endpoint {
    /// Parses the display form (`unix:PATH`, `tcp:ADDR:PORT`).
    pub fn parse(s: &str) -> Option<Endpoint> {
        if let Some(p) = s.strip_prefix("unix:") {
            return Some(Endpoint::Unix(p.into()));
        }
        s.strip_prefix("tcp:")?.parse().ok().map(Endpoint::Tcp)
    }

    /// The same endpoint as QEMU reports an incoming address.
    pub fn incoming_address(&self) -> IncomingAddress {
        match self {
            Endpoint::Unix(p) => IncomingAddress::Unix(p.clone()),
            Endpoint::Tcp(a) => IncomingAddress::Tcp {
                host: a.ip().to_string(),
                port: a.port(),
            },
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// How the destination is recovered in pass-through mode after it paused.
#[derive(Debug, Clone)]
pub enum Recover {
    /// The sidecar runs `migrate-recover` itself (out of band) on a new private socket in
    /// this directory.
    Private(PathBuf),
    /// The destination's manager runs `migrate-recover`; the sidecar connects wherever the
    /// destination listens when the source comes back.
    Follow,
}

/// Socket settings for the source's connections.
#[derive(Debug, Clone, Copy)]
pub struct SourceSockets {
    /// Receive buffer (0 = the kernel's default).
    pub rcvbuf: usize,
    /// Send buffer towards the destination (0 = the kernel's default).
    pub dst_sndbuf: usize,
    /// Silence that counts as a cut; also sets TCP keepalive and `TCP_USER_TIMEOUT`.
    pub silence: Duration,
}

/// What the carrier needs.
pub struct CarryOptions {
    /// Where the destination listens first.
    pub endpoint: Endpoint,
    /// Whether the preempt channel is in use.
    pub preempt: bool,
    /// The sidecar opens the destination's preempt channel itself, right after each main
    /// connection to it, and the source must not open one
    /// (protocol-spec/postcopy-sequence.md#sequence-own-preempt).
    pub own_preempt: bool,
    /// The source opens this many multifd channels (protocol-spec/multifd.md#multifd-relay);
    /// the destination waits for all of them.
    pub multifd: Option<u8>,
    /// How a paused destination gets recovered (pass-through).
    pub recover: Recover,
    /// How long to wait for the source's first connection.
    pub accept_timeout: Duration,
    /// Socket settings.
    pub sockets: SourceSockets,
    /// The migration is being taken over from an earlier sidecar: the first source main
    /// connection is a resume.
    pub takeover: bool,
    /// Where to write what a restarted sidecar needs, once the stream reached postcopy.
    pub state_file: Option<PathBuf>,
    /// Where link events also go.
    pub link_events: Option<mpsc::UnboundedSender<LinkEvent>>,
    /// Who may become the source (allow list; the admitted source afterwards).
    pub admission: Admission,
    /// The destination's limits, for checking a fresh main connection's opening.
    pub decoder: DecoderOptions,
    /// How long a new connection may take to show what it is (its TLS handshake, its
    /// first byte, and for a fresh main channel its whole opening): a silent or slow peer
    /// is dropped after it.
    pub handshake_timeout: Duration,
    /// TLS towards the source: every connection must complete it before a byte is read.
    pub source_tls: Option<SourceTls>,
    /// TLS towards a destination that expects it (libvirt's `--tls`).
    pub destination_tls: Option<DestinationTls>,
    /// Whether a pass-through resume may connect the destination while the source's
    /// connection is still judged ([`EarlyDestination`]; see [`closes_a_recovery_safely`]).
    pub early_destination: bool,
}

/// Whether a destination of this QEMU version (`major.minor.micro`) survives a recovery
/// connection that closes before its first byte, as the sidecar's early destination
/// connection does when the peer that prompted it is refused. 10.0 pauses again (run
/// here); 7.2 dies of a segmentation fault (run here), as it would directly with any peer
/// that connects to its recovery listener and closes; 8.0–9.2 have not been run, so they
/// get the judged-first order. Unknown versions (no QMP) too.
/// (protocol-spec/postcopy-sequence.md#sequence-early-destination)
pub fn closes_a_recovery_safely(version: &str) -> bool {
    version
        .split('.')
        .next()
        .and_then(|m| m.parse::<u32>().ok())
        .is_some_and(|major| major >= 10)
}

/// How long to wait for a destination connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// QMP calls made while the destination may be blocked on guest memory.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);

/// A source connection after its first byte (or the lack of one) was seen.
enum Classified {
    /// Starts with the file magic, and its opening fits the destination: a fresh main
    /// channel, with the bytes read to check it.
    FreshMain(Vec<u8>),
    /// Starts with a command: a resumed main channel, with the bytes read to see it.
    ResumedMain(Vec<u8>),
    /// Silent while a main connection came up: a preempt channel.
    Preempt,
    /// Starts with the multifd magic's first byte: its initial packet is read next
    /// ([`read_multifd_init`]), with the bytes read so far.
    MultifdOpening(Vec<u8>),
    /// Starts with a valid multifd initial packet; the bytes read after it.
    Multifd(MultifdInit, Vec<u8>),
    /// Anything else, or silent too long.
    Refused(String),
}

fn configure_source(s: &TcpStream, o: &SourceSockets) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let sock = socket2::SockRef::from(s);
    if o.rcvbuf > 0 {
        sock.set_recv_buffer_size(o.rcvbuf)?;
    }
    // A dead peer or a silent partition ends the connection within about `silence`.
    let idle = (o.silence / 2).max(Duration::from_secs(1));
    sock.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(idle)
            .with_interval(Duration::from_secs(1))
            .with_retries(3),
    )?;
    sock.set_tcp_user_timeout(Some(o.silence))?;
    Ok(())
}

/// Cuts a connection at once: RST, so a source that still writes gets an error and
/// pauses (QEMU pauses only on a write error, protocol-spec/postcopy-sequence.md#sequence-hold).
fn cut_socket(s: &socket2::Socket) {
    let _ = s.set_linger(Some(Duration::ZERO));
    let _ = s.shutdown(std::net::Shutdown::Both);
}

fn dup<T: std::os::fd::AsFd>(s: &T) -> Option<socket2::Socket> {
    socket2::SockRef::from(s).try_clone().ok()
}

impl Classified {
    fn name(&self) -> &'static str {
        match self {
            Classified::FreshMain(_) => "fresh main",
            Classified::ResumedMain(_) => "resumed main",
            Classified::Preempt => "preempt",
            Classified::MultifdOpening(_) | Classified::Multifd(..) => "multifd",
            Classified::Refused(_) => "refused",
        }
    }
}

/// A source connection, in the clear or inside the sidecar's TLS session.
enum SourceStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl SourceStream {
    /// The halves the pumps use; a TLS reader ends like TCP when QEMU closes without
    /// `close_notify`.
    fn into_split(self) -> (Reader, Writer) {
        match self {
            SourceStream::Plain(s) => {
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
            SourceStream::Tls(s) => {
                let (r, w) = tokio::io::split(*s);
                (Box::new(EofAsEnd(r)), Box::new(w))
            }
        }
    }

    async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use tokio::io::AsyncReadExt;
        match self {
            SourceStream::Plain(s) => s.read(buf).await,
            SourceStream::Tls(s) => match s.read(buf).await {
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(0),
                other => other,
            },
        }
    }
}

/// A connection the classifier is done with.
struct Judged {
    stream: Option<SourceStream>,
    peer: SocketAddr,
    seq: u64,
    name: Option<DistinguishedName>,
    class: Classified,
    /// Which step refused it (a metrics kind), when it was refused.
    refused_at: &'static str,
}

/// How to judge a new connection.
struct Judging {
    /// The TLS server, when the source must speak TLS.
    tls: Option<SourceTls>,
    /// The main channel is up: the connection is the preempt channel (after TLS).
    expect_preempt: bool,
    main_up: watch::Receiver<bool>,
    /// Multifd channels may still come: a connection is judged by its first bytes only,
    /// never taken for the silent preempt channel because main came up meanwhile.
    multifd_pending: bool,
    check: OpeningCheck,
    timeout: Duration,
}

/// Takes a new connection through TLS (when configured), then tells what it is: the
/// preempt channel expected now, or whatever its first bytes (or their absence) say. All
/// within `timeout`; nothing is forwarded meanwhile.
async fn judge(s: TcpStream, peer: SocketAddr, seq: u64, how: Judging) -> Judged {
    let Judging {
        tls,
        expect_preempt,
        main_up,
        multifd_pending,
        check,
        timeout,
    } = how;
    let deadline = tokio::time::Instant::now() + timeout;
    let refused = |why: String, at: &'static str, name| Judged {
        stream: None,
        peer,
        seq,
        name,
        class: Classified::Refused(why),
        refused_at: at,
    };
    let (mut stream, name) = match tls {
        None => (SourceStream::Plain(s), None),
        Some(t) => match tokio::time::timeout_at(deadline, t.accept(s)).await {
            Err(_) => {
                return refused(
                    "its TLS handshake did not finish in time".into(),
                    "tls",
                    None,
                );
            }
            Ok(Err(why)) => return refused(why, "tls", None),
            Ok(Ok((s, name))) => (SourceStream::Tls(Box::new(s)), name),
        },
    };
    let class = if expect_preempt {
        Classified::Preempt
    } else {
        match classify(&mut stream, main_up, multifd_pending, deadline).await {
            Classified::FreshMain(first) => read_opening(&mut stream, check, first, deadline).await,
            Classified::MultifdOpening(first) => {
                read_multifd_init(&mut stream, first, deadline).await
            }
            other => other,
        }
    };
    Judged {
        stream: Some(stream),
        peer,
        seq,
        name,
        refused_at: "handshake",
        class,
    }
}

/// Waits for a connection's first bytes, or for a main connection to come up (unless
/// multifd channels may still come).
async fn classify(
    s: &mut SourceStream,
    mut main_up: watch::Receiver<bool>,
    multifd_pending: bool,
    deadline: tokio::time::Instant,
) -> Classified {
    let mut b = vec![0u8; 16 * 1024];
    tokio::select! {
        r = s.read(&mut b) => match r {
            Ok(0) => Classified::Refused("closed before sending anything".into()),
            Ok(n) if b[0] == b'Q' => Classified::FreshMain(b[..n].to_vec()),
            Ok(n) if b[0] == crate::wire::command::SECTION_COMMAND => Classified::ResumedMain(b[..n].to_vec()),
            Ok(n) if b[0] == (multifd::MAGIC >> 24) as u8 => Classified::MultifdOpening(b[..n].to_vec()),
            Ok(_) => Classified::Refused(format!("starts with {:#04x}, not a migration stream", b[0])),
            Err(e) => Classified::Refused(e.to_string()),
        },
        _ = main_up.wait_for(|up| *up), if !multifd_pending => Classified::Preempt,
        _ = tokio::time::sleep_until(deadline) => Classified::Refused("silent since it connected".into()),
    }
}

/// Reads a multifd channel's 64-byte initial packet (after the `first` bytes already read)
/// and checks it, within `deadline`; the bytes after it come back for the pump.
async fn read_multifd_init(
    s: &mut SourceStream,
    mut have: Vec<u8>,
    deadline: tokio::time::Instant,
) -> Classified {
    let mut chunk = vec![0u8; 4096];
    loop {
        match MultifdInit::parse(&have) {
            Ok(Some(init)) => return Classified::Multifd(init, have.split_off(multifd::INIT_LEN)),
            Ok(None) => {}
            Err((at, kind)) => {
                return Classified::Refused(format!("multifd initial packet, byte {at}: {kind}"));
            }
        }
        let n = match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Err(_) => {
                return Classified::Refused(
                    "its multifd initial packet did not arrive in time".into(),
                );
            }
            Ok(Err(e)) => {
                return Classified::Refused(format!("reading its multifd initial packet: {e}"));
            }
            Ok(Ok(0)) => {
                return Classified::Refused("closed inside its multifd initial packet".into());
            }
            Ok(Ok(n)) => n,
        };
        have.extend_from_slice(&chunk[..n]);
    }
}

/// A multifd channel that showed its initial packet, waiting for the source's main
/// channel to be admitted (a 10.x source opens its multifd channels before it writes a
/// byte on main) or being connected now.
struct MultifdChannel {
    init: MultifdInit,
    rest: Vec<u8>,
    stream: SourceStream,
    sock: Option<socket2::Socket>,
    peer: SocketAddr,
    who: PeerId,
}

/// The multifd channels of this migration: held until main is admitted, then each
/// connected to the destination after main (QEMU 7.2 takes its first connection as main).
#[derive(Default)]
struct MultifdChannels {
    /// Held before main was admitted; any peer may be among them, so they are judged
    /// only against the admitted source.
    waiting: Vec<MultifdChannel>,
    /// Channel ids connected, with the UUID they all carry.
    connected: std::collections::BTreeSet<u8>,
    uuid: Option<[u8; 16]>,
    /// The source halves, which the source never reads: kept open until the end.
    source_writers: Vec<Writer>,
}

impl MultifdChannels {
    /// Whether more channels are expected.
    fn pending(&self, expected: Option<u8>) -> bool {
        expected.is_some_and(|n| self.connected.len() < usize::from(n))
    }

    /// Judges a channel from the admitted source: the reason it may not join, if any.
    fn refusal(&self, expected: u8, init: &MultifdInit) -> Option<String> {
        if init.id >= expected {
            Some(format!(
                "multifd channel id {} but the destination expects {expected} channels",
                init.id
            ))
        } else if self.connected.contains(&init.id) {
            Some(format!("a second multifd channel {}", init.id))
        } else if self.uuid.is_some_and(|u| u != init.uuid) {
            Some("a multifd channel of another VM (its UUID differs)".into())
        } else {
            None
        }
    }
}

/// Connects one multifd channel of the admitted source to the destination and starts its
/// pump and the watcher of the destination side. Returns the sockets to cut on failure:
/// the destination's, and the source's.
async fn open_multifd(
    ch: MultifdChannel,
    channels: &mut MultifdChannels,
    endpoint: &Endpoint,
    opts: &CarryOptions,
    relay: &Arc<Relay>,
    pumps: &mut Pumps,
) -> Result<(socket2::Socket, Option<socket2::Socket>), ReceiveError> {
    let MultifdChannel {
        init,
        rest,
        stream,
        sock,
        who,
        ..
    } = ch;
    let (dr, dw, dsock) = connect_destination(
        endpoint,
        opts.sockets.dst_sndbuf,
        opts.destination_tls.as_ref(),
    )
    .await?;
    channels.connected.insert(init.id);
    channels.uuid.get_or_insert(init.uuid);
    let (r, w) = stream.into_split();
    channels.source_writers.push(w);
    let r: Reader = if rest.is_empty() {
        r
    } else {
        use tokio::io::AsyncReadExt;
        Box::new(std::io::Cursor::new(rest).chain(r))
    };
    let channel = Channel::Multifd(init.id);
    pumps
        .tasks
        .spawn(async move { ("multifd reverse", relay::watch_reverse(dr, channel).await) });
    let r2 = relay.clone();
    pumps
        .tasks
        .spawn(async move { ("multifd", relay::multifd_pump(r2, init, r, dw).await) });
    tracing::info!(source = %who, id = init.id, "multifd channel connected");
    Ok((dsock, sock))
}

/// Reads a fresh main connection's opening (after the `first` bytes already read) until
/// [`OpeningCheck`] admits or refuses it, within `deadline`. Nothing is forwarded
/// meanwhile.
async fn read_opening(
    s: &mut SourceStream,
    mut check: OpeningCheck,
    first: Vec<u8>,
    deadline: tokio::time::Instant,
) -> Classified {
    match check.push(&first) {
        OpeningVerdict::NeedMore => {}
        OpeningVerdict::Admit => return Classified::FreshMain(check.into_bytes()),
        OpeningVerdict::Refuse(why) => return Classified::Refused(why),
    }
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        let n = match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Err(_) => return Classified::Refused("its opening did not arrive in time".into()),
            Ok(Err(e)) => return Classified::Refused(format!("reading its opening: {e}")),
            Ok(Ok(0)) => return Classified::Refused("closed inside its opening".into()),
            Ok(Ok(n)) => n,
        };
        match check.push(&chunk[..n]) {
            OpeningVerdict::NeedMore => {}
            OpeningVerdict::Admit => return Classified::FreshMain(check.into_bytes()),
            OpeningVerdict::Refuse(why) => return Classified::Refused(why),
        }
    }
}

/// The halves of a destination connection, through the sidecar's own TLS session when
/// the destination expects one.
async fn destination_halves<S>(
    s: S,
    tls: Option<&DestinationTls>,
) -> std::io::Result<(Reader, Writer)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    match tls {
        None => {
            let (r, w) = tokio::io::split(s);
            Ok((Box::new(r), Box::new(w)))
        }
        Some(t) => {
            let s = t.connect(s).await?;
            let (r, w) = tokio::io::split(s);
            Ok((Box::new(EofAsEnd(r)), Box::new(w)))
        }
    }
}

async fn connect_destination(
    endpoint: &Endpoint,
    sndbuf: usize,
    tls: Option<&DestinationTls>,
) -> Result<(Reader, Writer, socket2::Socket), ReceiveError> {
    let what = format!("connecting to the destination at {endpoint}");
    let io = |source| ReceiveError::Io {
        what: what.clone(),
        source,
    };
    let connect = async {
        match endpoint {
            Endpoint::Unix(p) => {
                let s = UnixStream::connect(p).await?;
                let sock = socket2::SockRef::from(&s);
                if sndbuf > 0 {
                    sock.set_send_buffer_size(sndbuf)?;
                }
                let d = sock.try_clone()?;
                let (r, w) = match tls {
                    None => {
                        let (r, w) = s.into_split();
                        (Box::new(r) as Reader, Box::new(w) as Writer)
                    }
                    Some(_) => destination_halves(s, tls).await?,
                };
                Ok::<_, std::io::Error>((r, w, d))
            }
            Endpoint::Tcp(a) => {
                let s = TcpStream::connect(a).await?;
                s.set_nodelay(true)?;
                let sock = socket2::SockRef::from(&s);
                if sndbuf > 0 {
                    sock.set_send_buffer_size(sndbuf)?;
                }
                let d = sock.try_clone()?;
                let (r, w) = match tls {
                    None => {
                        let (r, w) = s.into_split();
                        (Box::new(r) as Reader, Box::new(w) as Writer)
                    }
                    Some(_) => destination_halves(s, tls).await?,
                };
                Ok((r, w, d))
            }
        }
    };
    tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| {
            io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer",
            ))
        })?
        .map_err(io)
}

fn endpoint_of(addr: &IncomingAddress) -> Result<Endpoint, ReceiveError> {
    super::receive::endpoint_of(addr)
}

/// Connects to a paused destination for the source's resume (pass-through), as fast as
/// possible: the source counts as recovering from its TCP connect on, and a manager may
/// check the destination at once (libvirt 9.0 fails the resume if the destination is not
/// recovering yet). The address known so far comes first: QEMU keeps its listener while
/// paused, and a manager's `migrate-recover` on the same address (libvirt, when
/// `--migrateuri` names the port) replaces it in place. Only if that is refused is the
/// destination asked, over QMP, where it listens now.
async fn reconnect_destination(
    endpoint: &mut Endpoint,
    opts: &CarryOptions,
    qmp: Option<&Qmp>,
) -> Result<(Reader, Writer, socket2::Socket), ReceiveError> {
    let tls = opts.destination_tls.as_ref();
    let first = connect_destination(endpoint, opts.sockets.dst_sndbuf, tls).await;
    let (Err(e), Recover::Follow, Some(qmp)) = (&first, &opts.recover, qmp) else {
        return first;
    };
    tracing::info!(
        "the destination no longer listens at {endpoint} ({e}); asking it where it does"
    );
    match tokio::time::timeout(QMP_TIMEOUT, qmp.incoming_address()).await {
        Ok(Ok(Some(a))) => *endpoint = endpoint_of(&a)?,
        other => {
            tracing::warn!("the destination's recovery address: {other:?}");
            return first;
        }
    }
    connect_destination(endpoint, opts.sockets.dst_sndbuf, tls).await
}

/// A destination connection opened for a resume as soon as a connection from the
/// source's address is accepted, while that connection is still being judged.
///
/// The window it closes: a source counts as recovering from its TCP connect on, and a
/// manager may check the destination at once (libvirt 9.0's resume fails if the
/// destination is still `postcopy-paused`); judging the source's first bytes first took
/// milliseconds under load (protocol-spec/postcopy-sequence.md#sequence-early-destination).
/// Nothing is sent on it until a connection is judged a resume of this migration; if the
/// connection that prompted it is refused, it is dropped, and the destination pauses again.
/// Dropping it closes the connection, or stops the attempt.
struct EarlyDestination {
    /// The accepted connection that prompted it.
    seq: u64,
    /// The connection attempt to the address known so far.
    attempt: tokio::task::JoinHandle<Result<(Reader, Writer, socket2::Socket), ReceiveError>>,
    /// Whether a resume took it.
    taken: bool,
    /// Whether the attempt has begun: until then, dropping it leaves the destination alone.
    started: Arc<AtomicBool>,
    /// Set when it is dropped unused after it began: the destination must be let pause
    /// again before it is connected for anything else (see [`settle`]).
    closed_unused: Arc<AtomicBool>,
}

impl EarlyDestination {
    fn open(
        seq: u64,
        endpoint: &Endpoint,
        opts: &CarryOptions,
        closed_unused: &Arc<AtomicBool>,
    ) -> EarlyDestination {
        let (endpoint, sndbuf, tls) = (
            endpoint.clone(),
            opts.sockets.dst_sndbuf,
            opts.destination_tls.clone(),
        );
        let started = Arc::new(AtomicBool::new(false));
        let starting = started.clone();
        EarlyDestination {
            seq,
            attempt: tokio::spawn(async move {
                starting.store(true, Ordering::Release);
                connect_destination(&endpoint, sndbuf, tls.as_ref()).await
            }),
            taken: false,
            started,
            closed_unused: closed_unused.clone(),
        }
    }

    /// The connection, or, if the early attempt failed, one made now the usual way
    /// ([`reconnect_destination`], which may ask the destination where it listens).
    async fn into_connection(
        mut self,
        endpoint: &mut Endpoint,
        opts: &CarryOptions,
        qmp: Option<&Qmp>,
    ) -> Result<(Reader, Writer, socket2::Socket), ReceiveError> {
        self.taken = true;
        let why = match (&mut self.attempt).await {
            Ok(Ok(connection)) => return Ok(connection),
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        tracing::info!("the early destination connection failed ({why}); connecting again");
        reconnect_destination(endpoint, opts, qmp).await
    }
}

impl Drop for EarlyDestination {
    fn drop(&mut self) {
        // The destination may have seen it only if the attempt began (on one thread a
        // prompt refusal often comes first).
        if !self.taken && self.started.load(Ordering::Acquire) {
            tracing::info!(
                "closing the destination connection opened early: the connection that prompted it was not let in as a resume"
            );
            self.closed_unused.store(true, Ordering::Release);
        }
        // A finished attempt's connection is dropped with the handle.
        self.attempt.abort();
    }
}

/// How long a destination may take to pause again after an early connection closed.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(2);

/// Waits until the destination has paused again after an early connection was closed
/// unused (its `postcopy-paused` after `cursor`): a 10.0 destination still in
/// `postcopy-recover` would take the next connection for a channel of the recovery it is
/// leaving. Without QMP, or if the event does not come in time (a main loop blocked on
/// guest memory sends none), the resume goes ahead and QEMU judges it.
async fn settle(qmp: Option<&Qmp>, cursor: Option<EventCursor>) {
    let (Some(qmp), Some(cursor)) = (qmp, cursor) else {
        return;
    };
    match qmp
        .wait_migration_status_after(cursor, &["postcopy-paused", "failed"], SETTLE_TIMEOUT)
        .await
    {
        Ok(s) => tracing::info!("the destination after the early connection closed: {s}"),
        Err(e) => tracing::warn!(
            "the destination did not pause again after the early connection closed ({e}); resuming anyway"
        ),
    }
}

/// The pumps' channels.
struct Pumps {
    main: Option<mpsc::Sender<Feed>>,
    rp: Option<mpsc::Sender<Reader>>,
    preempt: Option<mpsc::Sender<Feed>>,
    tasks: JoinSet<(&'static str, Result<(), RelayError>)>,
}

/// Stops the source port from taking connections: new ones are refused, not queued.
/// `--own-preempt` does this from the source's main connection until its package: a source
/// that has preempt after all connects its preempt channel before it stops the VM
/// (QEMU's `postcopy_start`, `postcopy_preempt_establish_channel`), and a refused connection
/// fails its migration right there, with the VM still running on the source; an accepted
/// one would let it go on to stop the VM and send the package.
fn close_source_port(listener: &TcpListener) {
    if let Err(e) = socket2::SockRef::from(listener).shutdown(std::net::Shutdown::Read) {
        tracing::warn!("closing the source port: {e}");
    }
}

/// Opens the source port again at the address it had: a closed listening socket cannot
/// listen again at its address (Linux gives it a new port), so it is a new socket.
fn reopen_source_port(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    sock.set_reuse_address(true)?;
    sock.bind(&addr.into())?;
    sock.listen(128)?;
    sock.set_nonblocking(true)?;
    TcpListener::from_std(sock.into())
}

/// Runs the migration's connections until the stream is complete and every pump ended.
pub async fn carry(
    mut listener: TcpListener,
    opts: CarryOptions,
    relay: Arc<Relay>,
    mut reports: mpsc::UnboundedReceiver<PumpReport>,
    qmp: Option<&Qmp>,
    mut guard_wants: Option<mpsc::UnboundedReceiver<(String, u64, u64)>>,
) -> Result<(), ReceiveError> {
    let mut pumps = Pumps {
        main: None,
        rp: None,
        preempt: None,
        tasks: JoinSet::new(),
    };
    let (main_up_tx, _) = watch::channel(false);
    let mut classifying: JoinSet<(Judged, Option<socket2::Socket>)> = JoinSet::new();
    // Accept order, to tell the source's later channels from peers that came before it.
    let mut accepted_seq: u64 = 0;
    let mut main_seq: u64 = 0;
    let mut admission = opts.admission.clone();
    let mut src_socks: Vec<socket2::Socket> = Vec::new();
    let mut dst_socks: Vec<socket2::Socket> = Vec::new();
    let mut endpoint = opts.endpoint.clone();
    let mut preempt_up = false;
    // Whether the destination's preempt connection is open (a held destination keeps it).
    let mut dst_preempt_open = false;
    let mut first_main = !opts.takeover;
    // In pass-through, a destination connection must be made for the next resume.
    let mut need_destination = opts.takeover;
    // That connection, opened while a connection from the source's address is judged.
    let mut early_destination: Option<EarlyDestination> = None;
    // An early connection was closed unused: the destination leaves `postcopy-recover`
    // again (events after this cursor), and takes no other connection until it has.
    let mut settling: Option<Option<EventCursor>> = None;
    let early_closed_unused = Arc::new(AtomicBool::new(false));
    let accept_deadline = tokio::time::Instant::now() + opts.accept_timeout;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut state_file = opts.state_file.clone();
    let mut main_done = false;
    let mut rp_done = false;
    let mut destination_closed = false;
    // The source port, closed with `--own-preempt` until the package (see
    // [`close_source_port`]).
    let port = listener.local_addr().map_err(|e| ReceiveError::Io {
        what: "reading the listening address".into(),
        source: e,
    })?;
    let mut port_closed = false;
    let mut multifd = MultifdChannels::default();
    let mut accept_backoff = super::backoff::AcceptBackoff::new(
        "source port",
        Duration::from_millis(5),
        Duration::from_millis(200),
    );
    let result: Result<(), ReceiveError> = loop {
        if early_closed_unused.swap(false, Ordering::AcqRel) {
            // Just closed: its `postcopy-paused` is still to come.
            settling = Some(qmp.map(Qmp::event_cursor));
        }
        let timeout = relay.with(|s| s.poll_timeout());
        let waiting_first = first_main && pumps.main.is_none();
        tokio::select! {
            accepted = listener.accept(), if !port_closed => {
                let (s, peer) = match accepted {
                    Ok(a) => {
                        accept_backoff.accepted();
                        a
                    }
                    Err(e) => {
                        // This pause holds the whole loop: 200 ms at most (silence rules are ≥ 1 s).
                        tokio::time::sleep(accept_backoff.failed(&e)).await;
                        continue;
                    }
                };
                accepted_seq += 1;
                let seq = accepted_seq;
                if let Err(why) = opts.admission.at_accept(peer.ip()) {
                    refuse(&relay, peer, "address", &why);
                    continue;
                }
                if let Err(e) = configure_source(&s, &opts.sockets) {
                    tracing::warn!(%peer, "configuring a source connection: {e}");
                    continue;
                }
                tracing::debug!(%peer, main_up = *main_up_tx.borrow(), preempt_up, "accepted a source connection");
                let main_up = *main_up_tx.borrow();
                let multifd_pending = multifd.pending(opts.multifd);
                // With --own-preempt a source's preempt connection is let in to be judged:
                // it fails the migration while the VM is still on the source.
                if main_up && !multifd_pending && (preempt_up || !(opts.preempt || opts.own_preempt)) {
                    refuse(&relay, peer, "extra", "the source's channels are all up");
                    continue;
                }
                if opts.early_destination
                    && need_destination
                    && !first_main
                    && !main_up
                    && early_destination.is_none()
                    && settling.is_none()
                    && admission.is_source_address(peer.ip())
                {
                    tracing::info!(%peer, destination = %endpoint, "connecting the destination while the connection is judged");
                    early_destination = Some(EarlyDestination::open(seq, &endpoint, &opts, &early_closed_unused));
                }
                // With the main channel up, this is the preempt channel (once its TLS
                // handshake, if any, is done).
                let sock = dup(&s);
                let judging = judge(s, peer, seq, Judging {
                    tls: opts.source_tls.clone(),
                    expect_preempt: main_up && !multifd_pending,
                    main_up: main_up_tx.subscribe(),
                    multifd_pending,
                    check: OpeningCheck::new(opts.decoder.clone()),
                    timeout: opts.handshake_timeout,
                });
                classifying.spawn(async move { (judging.await, sock) });
            }
            Some(done) = classifying.join_next() => {
                let Ok((judged, sock)) = done else {
                    // Whose it was is lost with the task: a resume connects again.
                    early_destination = None;
                    continue;
                };
                let Judged { stream, peer, seq, name, class, refused_at } = judged;
                let who = PeerId { ip: peer.ip(), name };
                // The destination connection this connection prompted: used if it is let in
                // as the resume, else closed (dropped) on any way out of this branch. One
                // prompted by a connection still being judged serves a resume let in first.
                let prompted = early_destination.take_if(|e| e.seq == seq);
                tracing::debug!(%peer, class = class.name(), main_up = *main_up_tx.borrow(), "classified a source connection");
                let (class, s) = match (class, stream) {
                    (Classified::Refused(why), _) => {
                        refuse(&relay, peer, refused_at, &why);
                        continue;
                    }
                    (_, None) => continue,
                    (class, Some(s)) => (class, s),
                };
                match class {
                    Classified::Refused(_) => unreachable!("handled above"),
                    Classified::MultifdOpening(_) => {
                        // judge reads every multifd opening to its end; never left half read.
                        refuse(&relay, peer, "handshake", "a multifd initial packet left unread");
                    }
                    Classified::FreshMain(_) | Classified::ResumedMain(_) if *main_up_tx.borrow() => {
                        refuse(&relay, peer, "extra", "a second main connection");
                    }
                    Classified::FreshMain(_) if !first_main => {
                        refuse(&relay, peer, "extra", "a fresh migration stream while this migration is in progress");
                    }
                    Classified::ResumedMain(_) if first_main => {
                        refuse(&relay, peer, "extra", "a resume connection with no migration to resume yet");
                    }
                    Classified::FreshMain(opening) | Classified::ResumedMain(opening) => {
                        let joining = if first_main { Joining::FreshMain } else { Joining::Resume };
                        if let Err(why) = admission.joining(&who, joining) {
                            let what = if first_main { "a main connection" } else { "a resume connection" };
                            refuse(&relay, peer, "not_the_source", &format!("{what}: {why}"));
                            continue;
                        }
                        let epoch = match relay.with(|s| s.source_main_connected(Instant::now())) {
                            Ok(_) => relay.with(|s| s.epoch()),
                            Err(e) => {
                                tracing::warn!(%peer, "refused a main connection: {e}");
                                continue;
                            }
                        };
                        for sock in src_socks.drain(..) {
                            cut_socket(&sock);
                        }
                        main_seq = seq;
                        src_socks.extend(sock);
                        let (r, w) = s.into_split();
                        // The checked opening goes first, then the rest of the connection.
                        let r: Reader = if opening.is_empty() {
                            Box::new(r)
                        } else {
                            use tokio::io::AsyncReadExt;
                            Box::new(std::io::Cursor::new(opening).chain(r))
                        };
                        relay.source.install(epoch, w).await;
                        let mut destination = None;
                        let mut own_preempt = None;
                        if first_main || need_destination {
                            let (dr, dw, dsock) = if first_main {
                                connect_destination(&endpoint, opts.sockets.dst_sndbuf, opts.destination_tls.as_ref()).await?
                            } else if let Some(early) = prompted.or_else(|| early_destination.take()) {
                                early.into_connection(&mut endpoint, &opts, qmp).await?
                            } else {
                                if let Some(cursor) = settling.take() {
                                    settle(qmp, cursor).await;
                                }
                                reconnect_destination(&mut endpoint, &opts, qmp).await?
                            };
                            settling = None;
                            dst_socks.push(dsock);
                            destination = Some(dw);
                            if opts.own_preempt {
                                // After main, on the same listener: QEMU takes connections
                                // in order, so this one is its preempt channel.
                                let (pr, pw, psock) = connect_destination(&endpoint, 0, opts.destination_tls.as_ref()).await?;
                                dst_socks.push(psock);
                                let (keep, kept) = tokio::sync::oneshot::channel();
                                pumps.tasks.spawn(async move { ("preempt reverse", relay::watch_own_preempt(pr, kept).await) });
                                own_preempt = Some(relay::OwnPreempt { writer: pw, keep });
                                tracing::info!(destination = %endpoint, "opened the destination's preempt channel");
                            }
                            if pumps.rp.is_none() {
                                let (tx, rx) = mpsc::channel(1);
                                let r2 = relay.clone();
                                pumps.tasks.spawn(async move { ("return path", relay::return_path_pump(r2, rx).await) });
                                pumps.rp = Some(tx);
                            }
                            if let Some(tx) = &pumps.rp {
                                let _ = tx.send(dr).await;
                            }
                            need_destination = false;
                        }
                        if pumps.main.is_none() {
                            let (tx, rx) = mpsc::channel(1);
                            let r2 = relay.clone();
                            pumps.tasks.spawn(async move { ("main", relay::main_pump(r2, rx).await) });
                            pumps.main = Some(tx);
                        }
                        if let Some(tx) = &pumps.main {
                            let _ = tx.send(Feed { source: r, epoch, destination, own_preempt }).await;
                        }
                        if first_main {
                            tracing::info!(source = %who, "source connected");
                            admission.admitted(who);
                            // After main, in any order: each names its id in its first packet.
                            if let Some(n) = opts.multifd {
                                for ch in std::mem::take(&mut multifd.waiting) {
                                    let refusal = match admission.joining(&ch.who, Joining::Multifd) {
                                        Err(why) => Some(("not_the_source", format!("a multifd connection: {why}"))),
                                        Ok(()) => multifd.refusal(n, &ch.init).map(|why| ("extra", why)),
                                    };
                                    match refusal {
                                        Some((kind, why)) => {
                                            refuse(&relay, ch.peer, kind, &why);
                                            if let Some(sock) = &ch.sock {
                                                cut_socket(sock);
                                            }
                                        }
                                        None => {
                                            let (d, src) = open_multifd(ch, &mut multifd, &endpoint, &opts, &relay, &mut pumps).await?;
                                            dst_socks.push(d);
                                            src_socks.extend(src);
                                        },
                                    }
                                }
                            }
                            if opts.own_preempt && relay.with(|s| s.phase()) < PostcopyPhase::Listening {
                                close_source_port(&listener);
                                port_closed = true;
                                tracing::info!("source port closed until the package: a source with preempt fails to connect it and keeps its VM");
                            }
                        } else {
                            tracing::info!(%peer, epoch, "source resumed: answering its recovery handshake");
                        }
                        first_main = false;
                        preempt_up = false;
                        main_up_tx.send_replace(true);
                    }
                    Classified::Multifd(init, rest) => {
                        let Some(n) = opts.multifd else {
                            refuse(&relay, peer, "extra", "a multifd channel, but the sidecar expects none (--multifd)");
                            continue;
                        };
                        let ch = MultifdChannel { init, rest, stream: s, sock, peer, who: who.clone() };
                        if first_main {
                            // Main is not in yet (a 10.x source connects these first).
                            if multifd.waiting.len() >= 4 * usize::from(n) {
                                refuse(&relay, peer, "extra", "too many multifd connections before the main channel");
                                continue;
                            }
                            multifd.waiting.push(ch);
                            continue;
                        }
                        if let Err(why) = admission.joining(&who, Joining::Multifd) {
                            refuse(&relay, peer, "not_the_source", &format!("a multifd connection: {why}"));
                            continue;
                        }
                        if let Some(why) = multifd.refusal(n, &init) {
                            refuse(&relay, peer, "extra", &why);
                            continue;
                        }
                        let (d, src) = open_multifd(ch, &mut multifd, &endpoint, &opts, &relay, &mut pumps).await?;
                        dst_socks.push(d);
                        src_socks.extend(src);
                    }
                    Classified::Preempt => {
                        if !(opts.preempt || opts.own_preempt) || preempt_up {
                            refuse(&relay, peer, "extra", "an extra connection");
                            continue;
                        }
                        if seq < main_seq {
                            refuse(&relay, peer, "extra", "silent since before the source's main channel");
                            continue;
                        }
                        if let Err(why) = admission.joining(&who, Joining::Preempt) {
                            refuse(&relay, peer, "not_the_source", &format!("a preempt connection: {why}"));
                            continue;
                        }
                        if opts.own_preempt {
                            // The source has preempt after all. It opens the channel before
                            // it stops the VM, so failing now leaves the VM on the source.
                            break Err(ReceiveError::Setup(
                                "the source opened a postcopy-preempt channel, but the sidecar \
                                 opens the destination's itself (--own-preempt): turn preempt off \
                                 on the source, or drop --own-preempt".into()));
                        }
                        if let Err(e) = relay.with(|s| s.source_preempt_connected()) {
                            tracing::warn!(%peer, "refused a preempt connection: {e}");
                            continue;
                        }
                        let epoch = relay.with(|s| s.epoch());
                        src_socks.extend(sock);
                        let (r, w) = s.into_split();
                        // The source never reads its preempt channel; keep the half open.
                        std::mem::forget(w);
                        let mut destination = None;
                        if !dst_preempt_open {
                            let (dr, dw, dsock) = connect_destination(&endpoint, opts.sockets.dst_sndbuf, opts.destination_tls.as_ref()).await?;
                            dst_socks.push(dsock);
                            destination = Some(dw);
                            dst_preempt_open = true;
                            pumps.tasks.spawn(async move { ("preempt reverse", relay::watch_reverse(dr, Channel::Preempt).await) });
                        }
                        if pumps.preempt.is_none() {
                            let (tx, rx) = mpsc::channel(1);
                            let r2 = relay.clone();
                            pumps.tasks.spawn(async move { ("preempt", relay::preempt_pump(r2, rx).await) });
                            pumps.preempt = Some(tx);
                        }
                        if let Some(tx) = &pumps.preempt {
                            let _ = tx.send(Feed { source: r, epoch, destination, own_preempt: None }).await;
                        }
                        preempt_up = true;
                        tracing::info!(%peer, "preempt channel connected");
                    }
                }
            }
            Some(report) = reports.recv() => {
                match report {
                    PumpReport::SourceLost { channel, cause, epoch } => {
                        if epoch != relay.with(|s| s.epoch()) {
                            continue; // a connection a resume already replaced
                        }
                        let decision = relay.with(|s| s.source_lost(channel, cause, Instant::now()));
                        match decision {
                            CutDecision::Ignore => {}
                            CutDecision::Done => {
                                if channel == Channel::Main {
                                    pumps.main = None;
                                    main_done = true;
                                } else {
                                    pumps.preempt = None;
                                }
                            }
                            CutDecision::Hold if destination_closed => {
                                break Err(ReceiveError::Setup(
                                    "the source link was lost after the destination closed its \
                                     connection: nothing to hold".into()));
                            }
                            CutDecision::Hold | CutDecision::PassThrough => {
                                main_up_tx.send_replace(false);
                                preempt_up = false;
                                relay.source.clear().await;
                                for sock in src_socks.drain(..) {
                                    cut_socket(&sock);
                                }
                                if decision == CutDecision::PassThrough {
                                    let cursor = qmp.map(Qmp::event_cursor);
                                    for sock in dst_socks.drain(..) {
                                        cut_socket(&sock);
                                    }
                                    need_destination = true;
                                    dst_preempt_open = false;
                                    if let (Recover::Private(_), Some(qmp), Some(cursor)) = (&opts.recover, qmp, cursor) {
                                        // QEMU keeps its incoming listener while paused, and
                                        // takes the next connection there as the recovery's
                                        // main channel once it has paused: wait for that
                                        // (an event: its main loop may be blocked).
                                        match qmp.wait_migration_status_after(cursor, &["postcopy-paused", "failed"], QMP_TIMEOUT).await {
                                            Ok(MigrationStatus::PostcopyPaused) => tracing::info!(destination = %endpoint, "the destination paused; it takes the source's resume there"),
                                            other => tracing::warn!("the destination after the cut: {other:?}"),
                                        }
                                    }
                                }
                            }
                            CutDecision::Fail(why) if port_closed => break Err(ReceiveError::Setup(format!(
                                "{why}; the source port was closed to a preempt channel (--own-preempt): \
                                 a source with postcopy-preempt fails this way, its VM running"))),
                            CutDecision::Fail(why) => break Err(ReceiveError::Setup(why)),
                        }
                    }
                    PumpReport::DestinationLost { channel, error } => {
                        let up = relay.with(|s| s.link_view(Instant::now()).state == "up");
                        if need_destination {
                            // Our own cut of the destination (pass-through): expected.
                        } else if channel == Channel::ReturnPath
                            && up
                            && (error.is_none()
                                // Over TLS QEMU may reset instead of closing once it has
                                // sent SHUT(0): the stream is complete at the destination.
                                || relay.with(|s| s.destination_shut()) == Some(0))
                        {
                            // The destination finished reading (it closes after its SHUT;
                            // a precopy stream's end is judged when the source closes).
                            destination_closed = true;
                            pumps.rp = None;
                        } else {
                            break Err(ReceiveError::Relay(RelayError::Io {
                                channel,
                                side: "the destination closed the connection",
                                source: error.unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "EOF")),
                            }));
                        }
                    }
                }
            }
            Some(done) = pumps.tasks.join_next(), if !pumps.tasks.is_empty() => {
                match done {
                    Ok((name, Ok(()))) => {
                        tracing::debug!(pump = name, "pump ended");
                        if name == "return path" {
                            rp_done = true;
                        }
                    }
                    Ok((name, Err(e))) => {
                        tracing::error!(pump = name, "{e}");
                        break Err(e.into());
                    }
                    Err(join) => break Err(ReceiveError::Setup(format!("a pump task failed: {join}"))),
                }
            }
            want = async { guard_wants.as_mut().expect("checked").recv().await }, if guard_wants.is_some() => {
                match want {
                    Some((block, offset, len)) => {
                        relay.with(|s| s.guard_wants(&block, offset, len, Instant::now()));
                        relay.flush_to_source().await;
                    }
                    None => guard_wants = None,
                }
            }
            _ = async {
                match timeout {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            } => {
                match relay.with(|s| s.handle_timeout(Instant::now())) {
                    Some(TimerAction::CutSource) => {
                        tracing::warn!("the source has been silent too long: cutting its connections");
                        for sock in &src_socks {
                            cut_socket(sock);
                        }
                    }
                    Some(TimerAction::GiveUp(why)) => {
                        break Err(ReceiveError::SourceGone(why));
                    }
                    None => {}
                }
            }
            _ = tokio::time::sleep_until(accept_deadline), if waiting_first => {
                break Err(ReceiveError::Setup(format!(
                    "no source connected within {:.0} s", opts.accept_timeout.as_secs_f64())));
            }
            _ = tick.tick() => {}
            // The source port opens again soon after the package passed.
            _ = tokio::time::sleep(Duration::from_millis(20)), if port_closed => {}
        }
        if port_closed && relay.with(|s| s.phase()) >= PostcopyPhase::Listening {
            // Past the package: the source is committed to no preempt channel, and a
            // resume after a cut must find the port.
            match reopen_source_port(port) {
                Ok(l) => {
                    listener = l;
                    port_closed = false;
                    tracing::info!(%port, "source port open again");
                }
                Err(e) => tracing::warn!(%port, "reopening the source port: {e}; trying again"),
            }
        }
        for ev in relay.with(|s| s.take_events()) {
            log_event(&ev, &listener);
            // Metrics first: whoever watches the events may read them at once.
            if let Some(m) = &relay.metrics {
                match &ev {
                    LinkEvent::Cut {
                        cause, decision, ..
                    } => m.cut(cause, decision),
                    LinkEvent::Recovered(r) => m.recovered(r),
                    LinkEvent::ResumeStarted { .. } => {}
                }
            }
            if let Some(tx) = &opts.link_events {
                let _ = tx.send(ev);
            }
        }
        if let Some(m) = &relay.metrics {
            m.link(&relay.with(|s| s.link_view(Instant::now())));
        }
        if let Some(path) = &state_file
            && let Some(mut state) = relay.with(|s| s.takeover_state())
        {
            state.destination = Some(endpoint.to_string());
            let json = serde_json::to_vec_pretty(&state).expect("state serialises");
            match crate::durable::write_atomically(path, &json) {
                Ok(()) => tracing::info!(path = %path.display(), "takeover state written"),
                Err(e) => tracing::warn!("writing the state file {}: {e}", path.display()),
            }
            state_file = None;
        }
        if main_done && pumps.main.is_none() && (rp_done || destination_closed) {
            pumps.preempt = None;
            break Ok(());
        }
    };
    // Whatever happened, the pumps' inputs close; a failure drops every socket so both
    // QEMUs see the break at once instead of hanging.
    pumps.main = None;
    pumps.rp = None;
    pumps.preempt = None;
    if result.is_err() {
        for s in src_socks.iter().chain(dst_socks.iter()) {
            cut_socket(s);
        }
        pumps.tasks.abort_all();
    } else {
        // Let the pumps finish their last writes.
        while let Ok(Some(_)) =
            tokio::time::timeout(Duration::from_secs(10), pumps.tasks.join_next()).await
        {}
    }
    result
}

/// Drops a connection that may not join: logged with its reason, counted in metrics and
/// in the report. The sidecar keeps listening.
fn refuse(relay: &Relay, peer: SocketAddr, kind: &'static str, why: &str) {
    tracing::warn!(%peer, kind, "refused a connection: {why}");
    if let Some(m) = &relay.metrics {
        m.refused(kind);
    }
    relay.with(|s| s.connection_refused(peer.to_string(), kind, why.to_string()));
}

fn log_event(ev: &LinkEvent, listener: &TcpListener) {
    let at = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    match ev {
        LinkEvent::Cut {
            channel,
            cause,
            decision,
        } => match decision {
            CutDecision::Hold => tracing::warn!(
                %channel, %cause,
                "source link lost in postcopy: holding the destination (its vCPUs wait for \
                 pages); resume the source with `migrate {{\"uri\": \"tcp:{at}\", \"resume\": true}}` \
                 (after `migrate-pause` if it has not noticed)"
            ),
            CutDecision::PassThrough => tracing::warn!(
                %channel, %cause,
                "source link lost in postcopy: the destination pauses too; recover both ends"
            ),
            CutDecision::Fail(why) => tracing::error!(%channel, "{why}"),
            CutDecision::Done | CutDecision::Ignore => {}
        },
        LinkEvent::ResumeStarted { conn } => tracing::info!(conn, "resume connection"),
        LinkEvent::Recovered(r) => tracing::info!(
            mode = r.mode,
            total_ms = r.total_ms,
            handshake_ms = r.handshake_ms,
            queued = r.requests_queued,
            reissued = r.requests_reissued,
            "postcopy running again"
        ),
    }
}

/// Makes a paused destination listen for the source's resume on a new private socket
/// (`migrate-recover`, out of band: its main loop may be blocked on guest memory), for a
/// takeover whose state names no endpoint.
pub async fn recover_privately(qmp: &Qmp, dir: &std::path::Path) -> Result<Endpoint, ReceiveError> {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(format!("recover-{n}.sock"));
    let status = tokio::time::timeout(QMP_TIMEOUT, qmp.migrate_status())
        .await
        .map_err(|_| ReceiveError::Qmp(crate::qmp::QmpError::Timeout("query-migrate".into())))??;
    if status != MigrationStatus::PostcopyPaused {
        return Err(ReceiveError::DestinationFailed(status.to_string()));
    }
    qmp.migrate_recover(&format!("unix:{}", path.display()), QMP_TIMEOUT)
        .await?;
    Ok(Endpoint::Unix(path))
}

#[cfg(test)]
mod tests {
    use super::closes_a_recovery_safely;

    #[test]
    fn only_versions_run_safe_get_the_early_destination_connection() {
        assert!(closes_a_recovery_safely("10.0.7"));
        assert!(closes_a_recovery_safely("11.1.0"));
        assert!(!closes_a_recovery_safely("7.2.22"), "7.2 dies of it");
        assert!(!closes_a_recovery_safely("9.2.0"), "not run");
        assert!(!closes_a_recovery_safely(""), "no QMP");
        assert!(!closes_a_recovery_safely("x.y"));
    }
}
