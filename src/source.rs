//! `postcopy-sidecar send`: drives a stock source QEMU over QMP to migrate with postcopy to
//! an address (normally the sidecar's), for tests, benchmarks and the demo. Operators can
//! do the same with plain QMP or `virsh migrate` (see the README).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use qapi::qmp;
use serde::Serialize;

use crate::qmp::{PeerPolicy, Qmp, QmpError};

/// Options of `send`.
#[derive(Debug, Clone)]
pub struct SendOptions {
    /// The source QEMU's QMP socket.
    pub qmp: PathBuf,
    /// Where to migrate to.
    pub to: SocketAddr,
    /// Switch to postcopy this long after `migrate`; `None` stays in precopy.
    pub postcopy_after: Option<Duration>,
    /// Use the postcopy-preempt channel.
    pub preempt: bool,
    /// Migrate with multifd and this many channels, uncompressed.
    pub multifd: Option<u8>,
    /// Give up waiting for the end after this long.
    pub timeout: Duration,
}

/// What the source reported at the end.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct SendReport {
    /// Final migration status.
    pub status: String,
    /// `total-time`, ms.
    pub total_ms: Option<i64>,
    /// `downtime`, ms.
    pub downtime_ms: Option<i64>,
    /// Page requests the source received (`ram.postcopy-requests`).
    pub postcopy_requests: Option<u64>,
    /// Bytes sent after the switch to postcopy (`ram.postcopy-bytes`).
    pub postcopy_bytes: Option<u64>,
    /// Full pages sent (`ram.normal`).
    pub normal_pages: Option<u64>,
    /// Zero pages sent (`ram.duplicate`).
    pub zero_pages: Option<u64>,
    /// `error-desc`, when failed.
    pub error: Option<String>,
}

/// Capabilities the source needs for postcopy through the sidecar.
pub fn source_capabilities(postcopy: bool, preempt: bool) -> Vec<(&'static str, bool)> {
    let mut caps = vec![("return-path", true), ("events", true)];
    if postcopy {
        caps.push(("postcopy-ram", true));
    }
    if preempt {
        caps.push(("postcopy-preempt", true));
    }
    caps
}

/// Runs the migration from the source's side and waits for its end.
pub async fn send(opts: &SendOptions) -> Result<SendReport, QmpError> {
    // The operator's own QEMU: its socket sits in a directory of its uid.
    let qmp = Qmp::connect_checked(&opts.qmp, PeerPolicy::DirOwner).await?;
    let mut caps = source_capabilities(opts.postcopy_after.is_some(), opts.preempt);
    if let Some(n) = opts.multifd {
        let mut params = serde_json::json!({ "multifd-channels": n });
        if qmp.parameters().await?.get("multifd-compression").is_some() {
            params["multifd-compression"] = "none".into();
        }
        qmp.set_parameters(params).await?;
        caps.push(("multifd", true));
    }
    qmp.set_capabilities(&caps).await?;
    qmp.migrate_to(&format!("tcp:{}", opts.to)).await?;
    if let Some(after) = opts.postcopy_after {
        // A user-chosen delay (like virsh's --timeout), not a synchronisation.
        tokio::time::sleep(after).await;
        let status = qmp.migrate_status().await?;
        if !crate::qmp::FINAL_STATES.contains(&status.as_str()) {
            qmp.start_postcopy().await?;
        }
    }
    let status = qmp.wait_migration_end(opts.timeout).await?;
    let info = qmp.execute(qmp::query_migrate {}).await?;
    let ram = info.ram.as_ref();
    Ok(SendReport {
        status: status.to_string(),
        total_ms: info.total_time,
        downtime_ms: info.downtime,
        postcopy_requests: ram.map(|r| r.postcopy_requests as u64),
        postcopy_bytes: ram.map(|r| r.postcopy_bytes),
        normal_pages: ram.map(|r| r.normal as u64),
        zero_pages: ram.map(|r| r.duplicate as u64),
        error: info.error_desc,
    })
}
