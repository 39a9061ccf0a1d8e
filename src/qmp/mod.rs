//! QMP client used to configure, drive and observe QEMU.
//!
//! The command and event *types* come from the `qapi` crate (generated from QEMU 9.1's
//! schema); the transport is our own, because a migration depends on three things the
//! crate's client cannot do:
//! - **every call is bounded**: during postcopy the destination's main loop can block on
//!   guest memory that has not arrived, and then no in-band command is answered. A command
//!   that times out is abandoned by id; its late reply is dropped, and the session stays
//!   usable (the crate's client panics on the next command instead);
//! - **out-of-band execution** (`exec-oob`): `migrate-recover` and `migrate-pause` must
//!   run while the main loop is blocked. The session enables QMP's `oob` capability when
//!   QEMU offers it;
//! - **messages a 9.1 schema cannot type** (a status or event a newer QEMU added) must not
//!   end the session: events are kept raw ([`RawEvent`]), statuses are an open enum
//!   ([`MigrationStatus`]), and replies whose shape differs across versions are read as JSON.
//!
//! One reader task owns the socket's read half: it routes replies to their callers by id
//! and appends events to a history that waiters scan from an [`EventCursor`] taken before
//! they act, so an event that arrives before the wait starts is never missed.

mod introspect;
mod migration;
mod status;

use std::collections::{HashMap, VecDeque};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{broadcast, oneshot, watch};

pub use introspect::{
    IncomingAddress, MemoryBackend, RamBlock, parse_incoming_address, parse_ramblock_table,
};
pub use migration::{FINAL_STATES, QemuFaultFigures};
pub use status::MigrationStatus;

/// How long a command may take by default. QEMU answers in milliseconds when its main
/// loop runs; a command that takes this long is stuck behind a blocked main loop.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);
/// How long to wait for QEMU's greeting and the capability negotiation.
pub const NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest QMP line accepted (QEMU's replies are a few KiB; this bounds a hostile peer).
pub const MAX_LINE: usize = 16 << 20;

/// Why a QMP exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be reached or broke.
    #[error("QMP socket {path}: {source}")]
    Connect {
        /// Socket path.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// QEMU answered a command with an error.
    #[error("{command}: {message}")]
    Command {
        /// Command name.
        command: &'static str,
        /// QEMU's error text.
        message: String,
    },
    /// Something this QEMU does not offer.
    #[error("not supported by this QEMU: {0}")]
    Unsupported(String),
    /// A reply we could not interpret.
    #[error("unexpected reply: {0}")]
    Reply(String),
    /// Waiting for something took too long.
    #[error("timed out waiting for {0}")]
    Timeout(String),
    /// An earlier in-band command is still unanswered: QEMU's main loop is not serving
    /// QMP, so a new in-band command would only queue behind it (and fill QEMU's request
    /// queue, which would also stall out-of-band commands).
    #[error("{0}: QEMU's main loop is not answering QMP (an earlier command is still pending)")]
    Unresponsive(&'static str),
    /// The QMP session ended (QEMU quit or closed the socket).
    #[error("QMP session closed while waiting for {0}")]
    Closed(String),
    /// The process behind the socket is not who should be there: a socket planted by
    /// another user, which must not steer the migration.
    #[error(
        "QMP socket {path}: the process behind it runs as uid {found}, not as {expected} \
         (QEMU's uid): refusing to talk to it"
    )]
    Peer {
        /// Socket path.
        path: String,
        /// The peer's uid (`SO_PEERCRED`); `None` when the kernel did not tell.
        found: PeerUid,
        /// Who may be there.
        expected: PeerPolicy,
    },
}

/// A peer's uid as `SO_PEERCRED` gave it, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerUid(pub Option<u32>);

impl std::fmt::Display for PeerUid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(u) => write!(f, "{u}"),
            None => f.write_str("(unknown)"),
        }
    }
}

/// Whose process may answer on the destination's QMP socket. Checked with `SO_PEERCRED`
/// (the uid of the process that made the listening socket) before a byte is exchanged, so
/// a socket another user planted at the path cannot steer the sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerPolicy {
    /// Exactly this uid: QEMU's, as the hook knows it from the domain's DAC label
    /// (`--qmp-uid`).
    Uid(u32),
    /// The owner of the directory holding the socket (who alone may put a socket there
    /// unless the directory is shared), or this process's own uid.
    DirOwner,
}

impl std::fmt::Display for PeerPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerPolicy::Uid(u) => write!(f, "uid {u}"),
            PeerPolicy::DirOwner => f.write_str("the owner of the socket's directory or ours"),
        }
    }
}

impl PeerPolicy {
    /// `--qmp-uid` when given, else [`PeerPolicy::DirOwner`].
    pub fn from_uid(uid: Option<u32>) -> PeerPolicy {
        uid.map_or(PeerPolicy::DirOwner, PeerPolicy::Uid)
    }

    /// The uids this policy accepts for the socket at `path`.
    pub fn accepted(&self, path: &Path) -> io::Result<Vec<u32>> {
        use std::os::unix::fs::MetadataExt;
        match *self {
            PeerPolicy::Uid(u) => Ok(vec![u]),
            PeerPolicy::DirOwner => {
                let dir = match path.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p,
                    _ => Path::new("."),
                };
                let owner = std::fs::metadata(dir)?.uid();
                Ok(vec![owner, crate::owned_dir::own_uid()])
            }
        }
    }

    /// Checks the uid at the other end of `sock` (connected to `path`).
    pub fn check(&self, sock: &UnixStream, path: &Path) -> Result<(), QmpError> {
        let label = || path.display().to_string();
        let accepted = self.accepted(path).map_err(|source| QmpError::Connect {
            path: label(),
            source,
        })?;
        let found = sock.peer_cred().ok().map(|c| c.uid());
        match found {
            Some(u) if accepted.contains(&u) => Ok(()),
            _ => Err(QmpError::Peer {
                path: label(),
                found: PeerUid(found),
                expected: *self,
            }),
        }
    }
}

/// An event exactly as QEMU sent it, including those the 9.1 schema cannot type.
#[derive(Debug, Clone, PartialEq)]
pub struct RawEvent {
    /// Event name, e.g. `MIGRATION`.
    pub name: String,
    /// Its `data` member (`null` when absent).
    pub data: Value,
    /// QEMU's timestamp in microseconds since the epoch.
    pub timestamp_us: u64,
}

/// A position in the session's event history: events after it are "new".
///
/// Taken before an action and passed to [`Qmp::wait_for_event_after`] so an event that
/// arrives before the wait starts is not missed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct EventCursor(u64);

/// How many events the history keeps (events are rare; this is a safety cap).
const HISTORY_CAP: usize = 4096;

/// A reply: `Ok(return value)` or `Err(QEMU's error description)`.
type Reply = Result<Value, String>;

#[derive(Default)]
struct History {
    /// Sequence number of `events[0]`.
    base: u64,
    events: VecDeque<RawEvent>,
}

struct Inner {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Reply>>>,
    /// In-band commands abandoned after their timeout and not answered since.
    stuck: Mutex<std::collections::HashSet<u64>>,
    next_id: AtomicU64,
    history: Mutex<History>,
    /// Sequence number of the next event; waiters watch it change.
    seq: watch::Sender<u64>,
    /// Set (then `seq` poked) when the session ends, so waiters stop waiting.
    closed: AtomicBool,
    raw_events: broadcast::Sender<RawEvent>,
}

/// A negotiated QMP session.
pub struct Qmp {
    inner: Arc<Inner>,
    reader: tokio::task::JoinHandle<()>,
    label: String,
    oob: bool,
    /// The pid at the other end of the socket (`SO_PEERCRED`): QEMU's, which leads to its
    /// `/proc/PID` (memfds, maps) without trusting anything QEMU says.
    peer_pid: Option<u32>,
    /// The uid at the other end of the socket (`SO_PEERCRED`).
    peer_uid: Option<u32>,
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// The name of an event, e.g. `MIGRATION` (as QEMU spells it).
pub fn event_name(ev: &RawEvent) -> &str {
    &ev.name
}

/// The status carried by a `MIGRATION` event.
pub fn migration_event_status(ev: &RawEvent) -> Option<MigrationStatus> {
    if ev.name != "MIGRATION" {
        return None;
    }
    ev.data
        .get("status")
        .and_then(Value::as_str)
        .map(MigrationStatus::parse)
}

/// Reads QMP lines, routes replies by id and records events, until the socket ends.
async fn read_loop(mut lines: BufReader<OwnedReadHalf>, inner: Arc<Inner>) {
    let mut line = Vec::new();
    loop {
        line.clear();
        match read_bounded_line(&mut lines, &mut line).await {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                tracing::debug!("QMP stream ended: {e}");
                break;
            }
        }
        let Ok(v) = serde_json::from_slice::<Value>(&line) else {
            tracing::debug!(
                "QMP: skipping a line that is not JSON: {}",
                String::from_utf8_lossy(&line)
            );
            continue;
        };
        if let Some(name) = v.get("event").and_then(Value::as_str) {
            record_event(&inner, &v, name);
        } else if let Some(id) = v.get("id").and_then(Value::as_u64) {
            let reply = match (v.get("return"), v.get("error")) {
                (Some(r), _) => Ok(r.clone()),
                (None, Some(e)) => Err(e
                    .get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown error")
                    .to_string()),
                (None, None) => continue,
            };
            inner
                .stuck
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            let waiter = inner
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            match waiter {
                Some(tx) => {
                    let _ = tx.send(reply);
                }
                None => tracing::debug!(id, "QMP: a late reply to an abandoned command"),
            }
        }
    }
    inner.closed.store(true, Ordering::SeqCst);
    inner.seq.send_modify(|_| {});
    // Dropping the waiters' senders tells them the session is over.
    inner
        .pending
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clear();
}

/// Reads one `\n`-terminated line of at most [`MAX_LINE`] bytes; false at a clean end.
async fn read_bounded_line<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
    out: &mut Vec<u8>,
) -> io::Result<bool> {
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            return Ok(!out.is_empty());
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        if out.len() + take > MAX_LINE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a QMP line longer than {MAX_LINE} bytes"),
            ));
        }
        out.extend_from_slice(&buf[..take]);
        r.consume(take);
        if done {
            return Ok(true);
        }
    }
}

fn record_event(inner: &Inner, v: &Value, name: &str) {
    let ts = v.get("timestamp");
    let part = |k| {
        ts.and_then(|t| t.get(k))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    let ev = RawEvent {
        name: name.to_string(),
        data: v.get("data").cloned().unwrap_or(Value::Null),
        timestamp_us: part("seconds") * 1_000_000 + part("microseconds"),
    };
    {
        let mut h = inner.history.lock().unwrap_or_else(|p| p.into_inner());
        h.events.push_back(ev.clone());
        if h.events.len() > HISTORY_CAP {
            h.events.pop_front();
            h.base += 1;
        }
        inner.seq.send_replace(h.base + h.events.len() as u64);
    }
    let _ = inner.raw_events.send(ev);
}

impl Qmp {
    /// Connects to a QMP unix socket and negotiates capabilities (with `oob` when QEMU
    /// offers it).
    pub async fn connect(path: &Path) -> Result<Qmp, QmpError> {
        let sock = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        Qmp::from_stream(sock, &path.display().to_string()).await
    }

    /// Like [`Qmp::connect`], but first checks with `SO_PEERCRED` that the process behind
    /// the socket is one `policy` accepts: for the destination QEMU the sidecar carries a
    /// migration into.
    pub async fn connect_checked(path: &Path, policy: PeerPolicy) -> Result<Qmp, QmpError> {
        let sock = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        policy.check(&sock, path)?;
        Qmp::from_stream(sock, &path.display().to_string()).await
    }

    /// Negotiates over an already connected socket (`label` names it in errors), e.g. one
    /// end of a socket pair whose other end a test plays QEMU on.
    pub async fn from_stream(sock: UnixStream, label: &str) -> Result<Qmp, QmpError> {
        let cred = sock.peer_cred().ok();
        let peer_pid = cred
            .and_then(|c| c.pid())
            .and_then(|p| u32::try_from(p).ok());
        let peer_uid = cred.map(|c| c.uid());
        let (read, write) = sock.into_split();
        let mut read = BufReader::new(read);
        let err = |source| QmpError::Connect {
            path: label.to_string(),
            source,
        };
        // The greeting says whether QEMU can run commands out of band.
        let mut greeting = Vec::new();
        let got = tokio::time::timeout(
            NEGOTIATION_TIMEOUT,
            read_bounded_line(&mut read, &mut greeting),
        )
        .await
        .map_err(|_| QmpError::Timeout(format!("the QMP greeting on {label}")))?
        .map_err(err)?;
        if !got {
            return Err(err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before the QMP greeting",
            )));
        }
        let g: Value = serde_json::from_slice(&greeting)
            .map_err(|e| QmpError::Reply(format!("QMP greeting: {e}")))?;
        let caps = g
            .pointer("/QMP/capabilities")
            .and_then(Value::as_array)
            .ok_or_else(|| QmpError::Reply(format!("QMP greeting without capabilities: {g}")))?;
        let oob = caps.iter().any(|c| c.as_str() == Some("oob"));
        let (raw_events, _) = broadcast::channel(256);
        let inner = Arc::new(Inner {
            writer: tokio::sync::Mutex::new(write),
            pending: Mutex::new(HashMap::new()),
            stuck: Mutex::new(Default::default()),
            next_id: AtomicU64::new(1),
            history: Mutex::new(History::default()),
            seq: watch::channel(0).0,
            closed: AtomicBool::new(false),
            raw_events,
        });
        // The reader keeps the buffer: it may already hold bytes after the greeting.
        let reader = tokio::spawn(read_loop(read, inner.clone()));
        let qmp = Qmp {
            inner,
            reader,
            label: label.to_string(),
            oob,
            peer_pid,
            peer_uid,
        };
        qmp.execute_within(
            qapi::qmp::qmp_capabilities {
                enable: oob.then(|| vec![qapi::qmp::QMPCapability::oob]),
            },
            NEGOTIATION_TIMEOUT,
        )
        .await?;
        Ok(qmp)
    }

    /// The pid of the process at the other end of the QMP socket, when the kernel told it.
    pub fn peer_pid(&self) -> Option<u32> {
        self.peer_pid
    }

    /// The uid of the process at the other end of the QMP socket, when the kernel told it.
    pub fn peer_uid(&self) -> Option<u32> {
        self.peer_uid
    }

    /// Whether out-of-band execution is enabled on this session.
    pub fn oob(&self) -> bool {
        self.oob
    }

    /// Whether the session has ended (QEMU quit or closed the socket).
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::SeqCst)
    }

    /// Runs one command with the default timeout and returns its typed reply.
    pub async fn execute<C: qapi::Command>(&self, command: C) -> Result<C::Ok, QmpError> {
        self.execute_within(command, COMMAND_TIMEOUT).await
    }

    /// Runs one command in band, waiting at most `timeout` for its reply.
    pub async fn execute_within<C: qapi::Command>(
        &self,
        command: C,
        timeout: Duration,
    ) -> Result<C::Ok, QmpError> {
        if !self
            .inner
            .stuck
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
        {
            return Err(QmpError::Unresponsive(C::NAME));
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let line = serde_json::to_vec(&qapi::Execute::with_id(command, id))
            .map_err(|e| QmpError::Reply(format!("encoding {}: {e}", C::NAME)))?;
        self.round_trip::<C>(id, line, timeout, false).await
    }

    /// Runs one command out of band (`exec-oob`): QEMU runs it at once in its monitor
    /// thread, even while its main loop is blocked. Only commands QEMU allows out of band
    /// (`migrate-recover`, `migrate-pause`, ...), and only on a session that negotiated
    /// `oob`.
    pub async fn execute_oob<C: qapi::Command>(
        &self,
        command: C,
        timeout: Duration,
    ) -> Result<C::Ok, QmpError> {
        if !C::ALLOW_OOB {
            return Err(QmpError::Unsupported(format!(
                "{} out of band (QEMU does not allow it)",
                C::NAME
            )));
        }
        if !self.oob {
            return Err(QmpError::Unsupported(format!(
                "out-of-band execution on {} (its monitor does not offer `oob`)",
                self.label
            )));
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let line = serde_json::to_vec(&qapi::ExecuteOob::new(command, id))
            .map_err(|e| QmpError::Reply(format!("encoding {}: {e}", C::NAME)))?;
        self.round_trip::<C>(id, line, timeout, true).await
    }

    async fn round_trip<C: qapi::Command>(
        &self,
        id: u64,
        mut line: Vec<u8>,
        timeout: Duration,
        oob: bool,
    ) -> Result<C::Ok, QmpError> {
        if self.is_closed() {
            return Err(QmpError::Closed(C::NAME.to_string()));
        }
        line.push(b'\n');
        let (tx, rx) = oneshot::channel();
        self.inner
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        let exchange = async {
            self.inner
                .writer
                .lock()
                .await
                .write_all(&line)
                .await
                .map_err(|source| QmpError::Connect {
                    path: self.label.clone(),
                    source,
                })?;
            rx.await.map_err(|_| QmpError::Closed(C::NAME.to_string()))
        };
        let reply = match tokio::time::timeout(timeout, exchange).await {
            Ok(r) => r?,
            Err(_) => {
                self.inner
                    .pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                if !oob {
                    self.inner
                        .stuck
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(id);
                }
                return Err(QmpError::Timeout(format!(
                    "QEMU's reply to {} ({:.0} s)",
                    C::NAME,
                    timeout.as_secs_f64()
                )));
            }
        };
        let value = reply.map_err(|message| QmpError::Command {
            command: C::NAME,
            message,
        })?;
        serde_json::from_value(value.clone())
            .map_err(|e| QmpError::Reply(format!("{} returned {value}: {e}", C::NAME)))
    }

    /// A receiver of every event from now on.
    pub fn subscribe_raw(&self) -> broadcast::Receiver<RawEvent> {
        self.inner.raw_events.subscribe()
    }

    /// The current end of the event history: take it before acting, wait after.
    pub fn event_cursor(&self) -> EventCursor {
        let h = self.inner.history.lock().unwrap_or_else(|p| p.into_inner());
        EventCursor(h.base + h.events.len() as u64)
    }

    /// Events received after `cursor` (those still in the history).
    pub fn events_since(&self, cursor: EventCursor) -> Vec<RawEvent> {
        let h = self.inner.history.lock().unwrap_or_else(|p| p.into_inner());
        let skip = cursor.0.saturating_sub(h.base) as usize;
        h.events.iter().skip(skip).cloned().collect()
    }

    /// Waits for an event matching `pred` that arrives from now on.
    pub async fn wait_for_event(
        &self,
        pred: impl Fn(&RawEvent) -> bool,
        timeout: Duration,
    ) -> Result<RawEvent, QmpError> {
        let cursor = self.event_cursor();
        self.wait_for_event_after(cursor, pred, timeout).await
    }

    /// Waits for an event matching `pred` received after `cursor` (possibly already).
    pub async fn wait_for_event_after(
        &self,
        cursor: EventCursor,
        pred: impl Fn(&RawEvent) -> bool,
        timeout: Duration,
    ) -> Result<RawEvent, QmpError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut seq = self.inner.seq.subscribe();
        let mut next = cursor.0;
        loop {
            // Mark first, then look: an event pushed after the look still wakes us.
            seq.mark_unchanged();
            {
                let h = self.inner.history.lock().unwrap_or_else(|p| p.into_inner());
                let skip = next.saturating_sub(h.base) as usize;
                for ev in h.events.iter().skip(skip) {
                    if pred(ev) {
                        return Ok(ev.clone());
                    }
                }
                next = h.base + h.events.len() as u64;
            }
            if self.is_closed() {
                return Err(QmpError::Closed("a matching QMP event".into()));
            }
            match tokio::time::timeout_at(deadline, seq.changed()).await {
                Err(_) => return Err(QmpError::Timeout("a matching QMP event".into())),
                Ok(Err(_)) => return Err(QmpError::Closed("a matching QMP event".into())),
                Ok(Ok(())) => {}
            }
        }
    }

    /// Waits for a `MIGRATION` event after `cursor` whose status is one of `states`
    /// (e.g. `["completed", "failed"]`), returning that status.
    pub async fn wait_migration_status_after(
        &self,
        cursor: EventCursor,
        states: &[&str],
        timeout: Duration,
    ) -> Result<MigrationStatus, QmpError> {
        let ev = self
            .wait_for_event_after(
                cursor,
                |e| migration_event_status(e).is_some_and(|s| states.contains(&s.as_str())),
                timeout,
            )
            .await
            .map_err(|e| match e {
                QmpError::Timeout(_) => QmpError::Timeout(format!("MIGRATION {states:?}")),
                other => other,
            })?;
        Ok(migration_event_status(&ev).unwrap_or(MigrationStatus::None))
    }
}

#[cfg(test)]
mod tests;
