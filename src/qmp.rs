//! QMP client used to configure and observe QEMU, on the `qapi` crate's tokio client.
//!
//! One background task polls the QMP stream: that polling also delivers command replies
//! (a `qapi` design), and it fans events out on a broadcast channel so several waiters can
//! watch for `MIGRATION`, `RESUME` or `STOP` at once. A message the 9.1-era schema cannot
//! decode (a newer QEMU's event) is logged and skipped instead of ending the session.

use std::io;
use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use qapi::futures::{QapiService, QmpStreamTokio};
use qapi::qmp;
use tokio::io::WriteHalf;
use tokio::net::UnixStream;
use tokio::sync::broadcast;

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
}

type Writer = QmpStreamTokio<WriteHalf<UnixStream>>;

/// A negotiated QMP session.
pub struct Qmp {
    service: QapiService<Writer>,
    events: broadcast::Sender<qmp::Event>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One row of `x-query-ramblock`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamBlock {
    /// Block idstr.
    pub name: String,
    /// Page size of the block (host page or hugepage size).
    pub page_size: u64,
    /// Bytes in use (what migrates).
    pub used: u64,
    /// Bytes reserved.
    pub total: u64,
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

impl Qmp {
    /// Connects to a QMP unix socket and negotiates capabilities.
    pub async fn connect(path: &Path) -> Result<Qmp, QmpError> {
        let err = |source| QmpError::Connect {
            path: path.display().to_string(),
            source,
        };
        let stream = QmpStreamTokio::open_uds(path)
            .await
            .map_err(err)?
            .negotiate()
            .await
            .map_err(err)?;
        let (service, mut events) = stream.into_parts();
        let (tx, _) = broadcast::channel(256);
        let sender = tx.clone();
        let task = tokio::spawn(async move {
            while let Some(ev) = events.next().await {
                match ev {
                    Ok(e) => {
                        let _ = sender.send(e);
                    }
                    Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                        tracing::debug!("skipping a QMP message the schema does not know: {e}");
                    }
                    Err(e) => {
                        tracing::debug!("QMP stream ended: {e}");
                        break;
                    }
                }
            }
        });
        Ok(Qmp {
            service,
            events: tx,
            task,
        })
    }

    /// Runs one command and returns its typed reply.
    pub async fn execute<C>(&self, command: C) -> Result<C::Ok, QmpError>
    where
        C: qapi::Command,
        Writer: futures::Sink<qapi::Execute<C, u32>, Error = io::Error> + Unpin,
    {
        self.service
            .execute(command)
            .await
            .map_err(|e| QmpError::Command {
                command: C::NAME,
                message: e.to_string(),
            })
    }

    /// A receiver of every event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<qmp::Event> {
        self.events.subscribe()
    }

    /// Waits for an event matching `pred`, subscribed from the moment of the call.
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
                    return Err(QmpError::Reply(format!(
                        "QMP session closed while waiting for {what}"
                    )));
                }
            }
        }
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

    /// `query-migrate`'s status, as QEMU spells it (`none` when no migration ran).
    pub async fn migrate_status(&self) -> Result<String, QmpError> {
        let info = self.execute(qmp::query_migrate {}).await?;
        Ok(info
            .status
            .and_then(|s| serde_json::to_value(s).ok())
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_else(|| "none".into()))
    }

    /// The machine type, e.g. `pc-q35-10.0` (from the machine object's QOM type).
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
        let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
        let unit = match cols[2] {
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
            used: hex(cols[4]).ok_or_else(bad)?,
            total: hex(cols[5]).ok_or_else(bad)?,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ramblock_table_of_qemu_10() {
        let t = "              Block Name    PSize              Offset               Used              Total                HVA  RO\n                       m    4 KiB  0x0000000000000000 0x0000000010000000 0x0000000010000000 0x00007f0000000000  rw\n";
        let b = parse_ramblock_table(t).unwrap();
        assert_eq!(
            b,
            vec![RamBlock {
                name: "m".into(),
                page_size: 4096,
                used: 0x1000_0000,
                total: 0x1000_0000
            }]
        );
    }
}
