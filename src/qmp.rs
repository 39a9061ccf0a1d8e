//! QMP client used to configure and observe QEMU, on the `qapi` crate's tokio client.
//!
//! The `qapi` crate is generated from QEMU 9.1's schema, while we drive QEMU 7.2 and 10.0.
//! Two consequences shape this module:
//! - a message the 9.1 schema cannot decode (an event a newer QEMU added, a changed enum)
//!   would make `qapi`'s framed reader fail and then end the whole session. So a small
//!   task sits between the socket and `qapi`: it forwards only the lines the schema decodes
//!   and publishes every event, decodable or not, as a [`RawEvent`];
//! - replies whose typed form may differ between versions (`query-migrate`) are also
//!   available as raw JSON through our own [`qapi::Command`] impls.
//!
//! One background task polls `qapi`'s event stream: that polling also delivers command
//! replies (a `qapi` design), and it fans typed events out on a broadcast channel and into
//! a short history, so a test can take a [`EventCursor`] before acting and wait for the
//! event afterwards without racing it.

use std::collections::VecDeque;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use qapi::futures::{QapiService, QmpStreamTokio};
use qapi::qmp;
use serde::Serialize;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, DuplexStream};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{broadcast, watch};

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
    /// QEMU answered a command with an error, or the session broke mid-command.
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
    /// The QMP session ended (QEMU quit or closed the socket).
    #[error("QMP session closed while waiting for {0}")]
    Closed(String),
}

type Writer = QmpStreamTokio<OwnedWriteHalf>;

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

#[derive(Default)]
struct History {
    /// Sequence number of `events[0]`.
    base: u64,
    events: VecDeque<qmp::Event>,
}

struct Shared {
    history: Mutex<History>,
    /// Sequence number of the next event; waiters watch it change.
    seq: watch::Sender<u64>,
    /// Set (then `seq` poked) when the session ends, so waiters stop waiting.
    closed: AtomicBool,
}

/// A negotiated QMP session.
pub struct Qmp {
    service: QapiService<Writer>,
    events: broadcast::Sender<qmp::Event>,
    raw_events: broadcast::Sender<RawEvent>,
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The pid at the other end of the socket (`SO_PEERCRED`): QEMU's, which leads to its
    /// `/proc/PID` (memfds, maps) without trusting anything QEMU says.
    peer_pid: Option<u32>,
    /// Set once a command failed in transport or was abandoned: the `qapi` client keeps
    /// that command's reply slot, and the next command would panic on it ("duplicate
    /// command id"), so the session refuses further commands instead.
    broken: std::sync::atomic::AtomicBool,
}

/// Marks the session broken if a command future is dropped before its reply.
struct InFlight<'a>(&'a std::sync::atomic::AtomicBool, bool);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.1 {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

impl Drop for Qmp {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// One row of `x-query-ramblock`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamBlock {
    /// Block idstr (what the migration stream names it).
    pub name: String,
    /// Page size of the block (host page or hugepage size).
    pub page_size: u64,
    /// Offset of the block in QEMU's ram_addr space.
    pub offset: u64,
    /// Bytes in use (what migrates).
    pub used: u64,
    /// Bytes reserved (a resizable block may grow up to this).
    pub total: u64,
    /// Where the block is mapped in QEMU (QEMU 10.0 prints it; 7.2 does not), which ties a
    /// block to its memfd through `/proc/PID/maps`.
    pub hva: Option<u64>,
}

/// A memory backend object and its sharing mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryBackend {
    /// Object id (also the RAM block idstr of machine memory).
    pub id: String,
    /// QOM type, e.g. `memory-backend-memfd`.
    pub qom_type: String,
    /// Size in bytes.
    pub size: u64,
    /// `share=on`.
    pub share: bool,
}

/// Defines a command whose reply we take as raw JSON, for replies the 9.1 schema may not
/// type across QEMU versions.
macro_rules! raw_command {
    ($(#[$m:meta])* $ty:ident, $name:literal) => {
        $(#[$m])*
        #[derive(Debug, Clone, Default, Serialize)]
        pub struct $ty {}

        impl qapi::Command for $ty {
            type Ok = Value;
            const NAME: &'static str = $name;
            const ALLOW_OOB: bool = false;
        }

        impl qmp::QmpCommand for $ty {}
    };
}

raw_command!(
    /// `query-migrate` with its reply as raw JSON (robust to per-version stat fields).
    QueryMigrateRaw,
    "query-migrate"
);
raw_command!(
    /// `query-status` with its reply as raw JSON (run states differ across versions).
    QueryStatusRaw,
    "query-status"
);
raw_command!(
    /// `query-migrate-capabilities` as raw JSON: 7.2 lists capabilities (`compress`,
    /// `block`) that the 9.1 schema no longer knows.
    QueryMigrateCapabilitiesRaw,
    "query-migrate-capabilities"
);

/// Where a destination QEMU listens for an incoming migration (`query-migrate`'s
/// `socket-address`), as the sidecar can connect to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IncomingAddress {
    /// `{"type": "inet", "host": .., "port": ..}`.
    Tcp {
        /// Host as QEMU reports it (may be `0.0.0.0` or `::`).
        host: String,
        /// Port.
        port: u16,
    },
    /// `{"type": "unix", "path": ..}`.
    Unix(std::path::PathBuf),
}

impl std::fmt::Display for IncomingAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IncomingAddress::Tcp { host, port } if host.contains(':') => {
                write!(f, "tcp:[{host}]:{port}")
            }
            IncomingAddress::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            IncomingAddress::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Reads the first usable entry of `query-migrate`'s `socket-address` list.
pub fn parse_incoming_address(info: &Value) -> Option<IncomingAddress> {
    let list = info.get("socket-address")?.as_array()?;
    list.iter().find_map(|a| match a.get("type")?.as_str()? {
        "inet" => Some(IncomingAddress::Tcp {
            host: a.get("host")?.as_str()?.to_string(),
            port: a.get("port")?.as_str()?.parse().ok()?,
        }),
        "unix" => Some(IncomingAddress::Unix(a.get("path")?.as_str()?.into())),
        _ => None,
    })
}

/// The name of a typed event, e.g. `MIGRATION` (as QEMU spells it).
pub fn event_name(ev: &qmp::Event) -> String {
    serde_json::to_value(ev)
        .ok()
        .and_then(|v| v.get("event").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_default()
}

/// The status carried by a `MIGRATION` event, as QEMU spells it (`completed`, ...).
pub fn migration_event_status(ev: &qmp::Event) -> Option<String> {
    match ev {
        qmp::Event::MIGRATION { data, .. } => enum_name(&data.status),
        _ => None,
    }
}

/// A `qapi` enum value as QEMU spells it.
fn enum_name<T: Serialize>(v: &T) -> Option<String> {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
}

/// Copies QMP lines from the socket to `qapi`'s reader, dropping those the schema cannot
/// decode (they would end `qapi`'s session), and publishes every event raw.
async fn filter_lines(
    read: tokio::net::unix::OwnedReadHalf,
    mut to_qapi: DuplexStream,
    raw: broadcast::Sender<RawEvent>,
) {
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            tracing::debug!("QMP: skipping a line that is not JSON: {line}");
            continue;
        };
        if let Some(name) = v.get("event").and_then(Value::as_str) {
            let ts = v.get("timestamp");
            let part = |k| {
                ts.and_then(|t| t.get(k))
                    .and_then(Value::as_u64)
                    .unwrap_or(0)
            };
            let _ = raw.send(RawEvent {
                name: name.to_string(),
                data: v.get("data").cloned().unwrap_or(Value::Null),
                timestamp_us: part("seconds") * 1_000_000 + part("microseconds"),
            });
        }
        let greeting = v.get("QMP").is_some();
        if !greeting && serde_json::from_value::<qmp::QmpMessageAny>(v).is_err() {
            tracing::debug!("QMP: the 9.1 schema cannot decode {line}; published raw only");
            continue;
        }
        let mut bytes = line.into_bytes();
        bytes.push(b'\n');
        if to_qapi.write_all(&bytes).await.is_err() {
            break;
        }
    }
    // Dropping `to_qapi` gives qapi's reader EOF, which ends the session cleanly.
}

impl Qmp {
    /// Connects to a QMP unix socket and negotiates capabilities.
    pub async fn connect(path: &Path) -> Result<Qmp, QmpError> {
        let sock = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        Qmp::from_stream(sock, &path.display().to_string()).await
    }

    /// Negotiates over an already connected socket (`label` names it in errors), e.g. one
    /// end of a socket pair whose other end a test plays QEMU on.
    pub async fn from_stream(sock: UnixStream, label: &str) -> Result<Qmp, QmpError> {
        let err = |source| QmpError::Connect {
            path: label.to_string(),
            source,
        };
        let peer_pid = sock
            .peer_cred()
            .ok()
            .and_then(|c| c.pid())
            .and_then(|p| u32::try_from(p).ok());
        let (read, write) = sock.into_split();
        let (raw_tx, _) = broadcast::channel(256);
        let (to_qapi, from_filter) = tokio::io::duplex(1 << 16);
        let filter = tokio::spawn(filter_lines(read, to_qapi, raw_tx.clone()));
        let negotiated = async {
            QmpStreamTokio::open_split(from_filter, write)
                .await?
                .negotiate()
                .await
        };
        let stream = match negotiated.await {
            Ok(s) => s,
            Err(e) => {
                filter.abort();
                return Err(err(e));
            }
        };
        let (service, mut events) = stream.into_parts();
        let (tx, _) = broadcast::channel(256);
        let shared = Arc::new(Shared {
            history: Mutex::new(History::default()),
            seq: watch::channel(0).0,
            closed: AtomicBool::new(false),
        });
        let (sender, sh) = (tx.clone(), shared.clone());
        let poller = tokio::spawn(async move {
            while let Some(ev) = events.next().await {
                match ev {
                    Ok(e) => {
                        {
                            let mut h = sh.history.lock().unwrap_or_else(|p| p.into_inner());
                            h.events.push_back(e.clone());
                            if h.events.len() > HISTORY_CAP {
                                h.events.pop_front();
                                h.base += 1;
                            }
                            sh.seq.send_replace(h.base + h.events.len() as u64);
                        }
                        let _ = sender.send(e);
                    }
                    Err(e) => {
                        tracing::debug!("QMP stream ended: {e}");
                        break;
                    }
                }
            }
            // Tell every waiter the session is over.
            sh.closed.store(true, Ordering::SeqCst);
            sh.seq.send_modify(|_| {});
        });
        Ok(Qmp {
            service,
            events: tx,
            raw_events: raw_tx,
            shared,
            tasks: vec![filter, poller],
            peer_pid,
            broken: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The pid of the process at the other end of the QMP socket, when the kernel told it.
    pub fn peer_pid(&self) -> Option<u32> {
        self.peer_pid
    }

    /// Runs one command and returns its typed reply.
    pub async fn execute<C>(&self, command: C) -> Result<C::Ok, QmpError>
    where
        C: qapi::Command,
        Writer: futures::Sink<qapi::Execute<C, u32>, Error = io::Error> + Unpin,
    {
        if self.broken.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(QmpError::Closed(format!(
                "{}: the QMP session broke earlier",
                C::NAME
            )));
        }
        let mut guard = InFlight(&self.broken, false);
        let r = self.service.execute(command).await;
        // A reply from QEMU (success or QEMU's own error) completes the exchange; a
        // transport failure leaves qapi's slot behind, so the session is done.
        guard.1 = !matches!(r, Err(qapi::ExecuteError::Io(_)));
        drop(guard);
        r.map_err(|e| QmpError::Command {
            command: C::NAME,
            message: e.to_string(),
        })
    }

    /// A receiver of every typed event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<qmp::Event> {
        self.events.subscribe()
    }

    /// A receiver of every event from now on, raw (also those the schema cannot type).
    pub fn subscribe_raw(&self) -> broadcast::Receiver<RawEvent> {
        self.raw_events.subscribe()
    }

    /// The current end of the event history: take it before acting, wait after.
    pub fn event_cursor(&self) -> EventCursor {
        let h = self
            .shared
            .history
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        EventCursor(h.base + h.events.len() as u64)
    }

    /// Typed events received after `cursor` (those still in the history).
    pub fn events_since(&self, cursor: EventCursor) -> Vec<qmp::Event> {
        let h = self
            .shared
            .history
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let skip = cursor.0.saturating_sub(h.base) as usize;
        h.events.iter().skip(skip).cloned().collect()
    }

    /// Waits for an event matching `pred` that arrives from now on.
    pub async fn wait_for_event(
        &self,
        pred: impl Fn(&qmp::Event) -> bool,
        timeout: Duration,
    ) -> Result<qmp::Event, QmpError> {
        let cursor = self.event_cursor();
        self.wait_for_event_after(cursor, pred, timeout).await
    }

    /// Waits for an event matching `pred` received after `cursor` (possibly already).
    pub async fn wait_for_event_after(
        &self,
        cursor: EventCursor,
        pred: impl Fn(&qmp::Event) -> bool,
        timeout: Duration,
    ) -> Result<qmp::Event, QmpError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut seq = self.shared.seq.subscribe();
        let mut next = cursor.0;
        loop {
            // Mark first, then look: an event pushed after the look still wakes us.
            seq.mark_unchanged();
            {
                let h = self
                    .shared
                    .history
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                let skip = next.saturating_sub(h.base) as usize;
                for ev in h.events.iter().skip(skip) {
                    if pred(ev) {
                        return Ok(ev.clone());
                    }
                }
                next = h.base + h.events.len() as u64;
            }
            if self.shared.closed.load(Ordering::SeqCst) {
                return Err(QmpError::Closed("a matching QMP event".into()));
            }
            match tokio::time::timeout_at(deadline, seq.changed()).await {
                Err(_) => return Err(QmpError::Timeout("a matching QMP event".into())),
                Ok(Err(_)) => return Err(QmpError::Closed("a matching QMP event".into())),
                Ok(Ok(())) => {}
            }
        }
    }

    /// Waits on an already-subscribed receiver for an event matching `pred`.
    pub async fn wait_event(
        &self,
        mut rx: broadcast::Receiver<qmp::Event>,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&qmp::Event) -> bool,
    ) -> Result<qmp::Event, QmpError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Err(_) => return Err(QmpError::Timeout(what.to_string())),
                Ok(Ok(ev)) if pred(&ev) => return Ok(ev),
                Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
                Ok(Err(broadcast::error::RecvError::Closed)) => {
                    return Err(QmpError::Closed(what.to_string()));
                }
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
    ) -> Result<String, QmpError> {
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
        Ok(migration_event_status(&ev).unwrap_or_default())
    }

    /// QEMU's version as (major, minor, micro).
    pub async fn version(&self) -> Result<(u64, u64, u64), QmpError> {
        let v = self.execute(qmp::query_version {}).await?;
        Ok((
            v.qemu.major as u64,
            v.qemu.minor as u64,
            v.qemu.micro as u64,
        ))
    }

    /// `query-migrate`'s reply as raw JSON (all stats of this QEMU, typed or not).
    pub async fn query_migrate_json(&self) -> Result<Value, QmpError> {
        self.execute(QueryMigrateRaw {}).await
    }

    /// `query-migrate`'s status, as QEMU spells it (`none` when no migration ran).
    pub async fn migrate_status(&self) -> Result<String, QmpError> {
        let v = self.query_migrate_json().await?;
        Ok(v.get("status")
            .and_then(Value::as_str)
            .unwrap_or("none")
            .to_string())
    }

    /// Migration capabilities and their states, by QEMU name.
    pub async fn migration_capabilities(&self) -> Result<Vec<(String, bool)>, QmpError> {
        let v = self.execute(QueryMigrateCapabilitiesRaw {}).await?;
        let list = v
            .as_array()
            .ok_or_else(|| QmpError::Reply(format!("query-migrate-capabilities {v}")))?;
        Ok(list
            .iter()
            .filter_map(|c| {
                Some((
                    c.get("capability")?.as_str()?.to_string(),
                    c.get("state")?.as_bool()?,
                ))
            })
            .collect())
    }

    /// Whether capability `name` is on (false when this QEMU does not have it).
    pub async fn capability(&self, name: &str) -> Result<bool, QmpError> {
        Ok(self
            .migration_capabilities()
            .await?
            .iter()
            .any(|(n, on)| n == name && *on))
    }

    /// The address a destination listens on after `migrate-incoming`, if it listens yet.
    pub async fn incoming_address(&self) -> Result<Option<IncomingAddress>, QmpError> {
        Ok(parse_incoming_address(&self.query_migrate_json().await?))
    }

    /// The run state (`running`, `paused`, `inmigrate`, `postmigrate`, ...).
    pub async fn run_state(&self) -> Result<String, QmpError> {
        let v = self.execute(QueryStatusRaw {}).await?;
        v.get("status")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| QmpError::Reply(format!("query-status {v}")))
    }

    /// The machine type, e.g. `pc-q35-10.0`, with aliases such as `q35` resolved.
    ///
    /// Taken from the QOM type of `/machine` (`pc-q35-10.0-machine`): it works the same on
    /// 7.2 and 10.0, unlike `query-machines`, which has no "current" flag in either.
    pub async fn machine_type(&self) -> Result<String, QmpError> {
        let v = self
            .execute(qmp::qom_get {
                path: "/machine".into(),
                property: "type".into(),
            })
            .await?;
        let t = v
            .as_str()
            .ok_or_else(|| QmpError::Reply(format!("machine type {v}")))?;
        Ok(t.strip_suffix("-machine").unwrap_or(t).to_string())
    }

    /// RAM blocks from `x-query-ramblock` (QEMU 7.2 prints fewer columns than 10.0).
    pub async fn ram_blocks(&self) -> Result<Vec<RamBlock>, QmpError> {
        let text = self
            .execute(qmp::x_query_ramblock {})
            .await?
            .human_readable_text;
        parse_ramblock_table(&text)
    }

    /// Memory backend objects with their QOM type, size and sharing.
    ///
    /// The type comes from `qom-list /objects` (`child<memory-backend-memfd>`), since
    /// `query-memdev` does not say which kind of backend it is.
    pub async fn memory_backends(&self) -> Result<Vec<MemoryBackend>, QmpError> {
        let props = self
            .execute(qmp::qom_list {
                path: "/objects".into(),
            })
            .await?;
        let memdevs = self.execute(qmp::query_memdev {}).await?;
        let mut out = Vec::new();
        for p in props {
            let Some(kind) = p
                .type_
                .strip_prefix("child<")
                .and_then(|t| t.strip_suffix('>'))
            else {
                continue;
            };
            if !kind.starts_with("memory-backend") {
                continue;
            }
            let dev = memdevs
                .iter()
                .find(|m| m.id.as_deref() == Some(p.name.as_str()));
            out.push(MemoryBackend {
                id: p.name.clone(),
                qom_type: kind.to_string(),
                size: dev.map(|d| d.size).unwrap_or(0),
                share: dev.map(|d| d.share).unwrap_or(false),
            });
        }
        Ok(out)
    }
}

/// Parses `x-query-ramblock`'s table: a header line, then one row per block:
/// `name  4 KiB  offset  used  total [HVA RO]` (QEMU 7.2 stops after `total`).
///
/// Block names never contain spaces (they are QOM paths and ids), so whitespace splits.
pub fn parse_ramblock_table(text: &str) -> Result<Vec<RamBlock>, QmpError> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.is_empty() {
            continue;
        }
        let bad = || QmpError::Reply(format!("x-query-ramblock row {line:?}"));
        if cols.len() < 6 {
            return Err(bad());
        }
        let hex = |s: &str| {
            s.strip_prefix("0x")
                .and_then(|h| u64::from_str_radix(h, 16).ok())
        };
        let unit: u64 = match cols[2] {
            "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            _ => return Err(bad()),
        };
        let n: u64 = cols[1].parse().map_err(|_| bad())?;
        out.push(RamBlock {
            name: cols[0].to_string(),
            page_size: n * unit,
            offset: hex(cols[3]).ok_or_else(bad)?,
            used: hex(cols[4]).ok_or_else(bad)?,
            total: hex(cols[5]).ok_or_else(bad)?,
            hva: cols.get(6).and_then(|c| hex(c)),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
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
            serde_json::from_str(r#"{"socket-address":[{"type":"unix","path":"/r/m.sock"}]}"#)
                .unwrap();
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

    /// Plays QEMU on the other end of a socket pair: greets, answers commands, and sends
    /// an event the 9.1 schema does not know before answering `query-version`.
    async fn fake_qemu(sock: UnixStream) {
        let (r, mut w) = sock.into_split();
        let mut lines = BufReader::new(r).lines();
        let greeting = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 10}, "package": ""}, "capabilities": ["oob"]}}"#;
        w.write_all(format!("{greeting}\n").as_bytes())
            .await
            .unwrap();
        while let Ok(Some(line)) = lines.next_line().await {
            let v: Value = serde_json::from_str(&line).unwrap();
            let id = v["id"].clone();
            let mut out = String::new();
            let ret = match v["execute"].as_str().unwrap() {
                "query-version" => {
                    out.push_str(r#"{"event": "FUTURE_THING", "data": {"x": 1}, "timestamp": {"seconds": 1, "microseconds": 2}}"#);
                    out.push('\n');
                    out.push_str(
                        r#"{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 3}}"#,
                    );
                    out.push('\n');
                    serde_json::json!({"qemu": {"major": 10, "minor": 0, "micro": 0}, "package": ""})
                }
                _ => serde_json::json!({}),
            };
            out.push_str(&serde_json::json!({"return": ret, "id": id}).to_string());
            out.push('\n');
            w.write_all(out.as_bytes()).await.unwrap();
        }
    }

    #[tokio::test]
    async fn unknown_events_do_not_end_the_session() {
        let (a, b) = UnixStream::pair().unwrap();
        tokio::spawn(fake_qemu(b));
        let q = Qmp::from_stream(a, "pair").await.unwrap();
        let cursor = q.event_cursor();
        let mut raw = q.subscribe_raw();
        assert_eq!(q.version().await.unwrap(), (10, 0, 0));
        let first = raw.recv().await.unwrap();
        assert_eq!(first.name, "FUTURE_THING");
        assert_eq!(first.data["x"], 1);
        assert_eq!(first.timestamp_us, 1_000_002);
        let stop = q
            .wait_for_event_after(cursor, |e| event_name(e) == "STOP", Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(event_name(&stop), "STOP");
        // The session still works after the unknown event.
        assert_eq!(q.version().await.unwrap(), (10, 0, 0));
        assert_eq!(q.events_since(cursor).len(), 2);
    }

    #[test]
    fn ramblock_table_rejects_garbage() {
        assert!(parse_ramblock_table("hdr\nm 4 KiB zz 0x1 0x1\n").is_err());
        assert!(parse_ramblock_table("hdr\nm 4 KiB\n").is_err());
    }
}
