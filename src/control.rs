//! The QMP calls that drive a migration, on both ends, built on [`crate::qmp::Qmp`]:
//! capabilities, `migrate-incoming`, `migrate`, the switch to postcopy, and waiting for the
//! end on `MIGRATION` events (never on fixed sleeps).

use std::time::Duration;

use qapi::qmp;

use crate::qmp::{Qmp, QmpError};

/// Migration states after which nothing more happens without an operator.
pub const FINAL_STATES: &[&str] = &["completed", "failed", "cancelled", "postcopy-paused"];

/// Migration-driving calls.
#[allow(async_fn_in_trait)]
pub trait MigrationControl {
    /// Sets migration capabilities by QEMU name (e.g. `postcopy-ram`).
    async fn set_capabilities(&self, caps: &[(&str, bool)]) -> Result<(), QmpError>;
    /// Makes a destination started with `-incoming defer` listen on `uri`.
    async fn migrate_incoming(&self, uri: &str) -> Result<(), QmpError>;
    /// Starts migrating this (source) VM to `uri`.
    async fn migrate_to(&self, uri: &str) -> Result<(), QmpError>;
    /// Switches a running migration to postcopy.
    async fn start_postcopy(&self) -> Result<(), QmpError>;
    /// `query-migrate`'s status as QEMU names it.
    async fn migration_status(&self) -> Result<String, QmpError>;
    /// Whether the VM runs.
    async fn is_running(&self) -> Result<bool, QmpError>;
    /// The destination's own vCPU blocktime (ms), reported once the migration completed.
    async fn postcopy_blocktime_ms(&self) -> Result<Option<u64>, QmpError>;
    /// The source's count of page requests it received.
    async fn postcopy_requests(&self) -> Result<Option<u64>, QmpError>;
    /// Waits for the migration to reach a final state; returns that state.
    async fn wait_migration_end(&self, timeout: Duration) -> Result<String, QmpError>;
}

impl MigrationControl for Qmp {
    async fn set_capabilities(&self, caps: &[(&str, bool)]) -> Result<(), QmpError> {
        let mut list = Vec::new();
        for (name, state) in caps {
            let capability = name
                .parse::<qmp::MigrationCapability>()
                .map_err(|_| QmpError::Unsupported(format!("migration capability {name}")))?;
            list.push(qmp::MigrationCapabilityStatus {
                capability,
                state: *state,
            });
        }
        self.execute(qmp::migrate_set_capabilities { capabilities: list })
            .await
            .map(|_| ())
    }

    async fn migrate_incoming(&self, uri: &str) -> Result<(), QmpError> {
        self.execute(qmp::migrate_incoming {
            uri: Some(uri.to_string()),
            channels: None,
            exit_on_error: None,
        })
        .await
        .map(|_| ())
    }

    async fn migrate_to(&self, uri: &str) -> Result<(), QmpError> {
        self.execute(qmp::migrate {
            uri: Some(uri.to_string()),
            channels: None,
            detach: None,
            resume: None,
        })
        .await
        .map(|_| ())
    }

    async fn start_postcopy(&self) -> Result<(), QmpError> {
        self.execute(qmp::migrate_start_postcopy {})
            .await
            .map(|_| ())
    }

    async fn migration_status(&self) -> Result<String, QmpError> {
        self.migrate_status().await
    }

    async fn is_running(&self) -> Result<bool, QmpError> {
        Ok(self.execute(qmp::query_status {}).await?.running)
    }

    async fn postcopy_blocktime_ms(&self) -> Result<Option<u64>, QmpError> {
        let info = self.execute(qmp::query_migrate {}).await?;
        Ok(info.postcopy_blocktime.map(u64::from))
    }

    async fn postcopy_requests(&self) -> Result<Option<u64>, QmpError> {
        let info = self.execute(qmp::query_migrate {}).await?;
        Ok(info.ram.map(|r| r.postcopy_requests as u64))
    }

    async fn wait_migration_end(&self, timeout: Duration) -> Result<String, QmpError> {
        // Subscribe first, then look: an end that happened before we subscribed is seen by
        // the query, one that happens after by the event.
        let mut events = self.subscribe();
        let status = self.migrate_status().await?;
        if FINAL_STATES.contains(&status.as_str()) {
            return Ok(status);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let ev = tokio::time::timeout_at(deadline, events.recv())
                .await
                .map_err(|_| QmpError::Timeout("the end of the migration".into()))?;
            if let Ok(qmp::Event::MIGRATION { data, .. }) = ev {
                let s = serde_json::to_value(data.status)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                if FINAL_STATES.contains(&s.as_str()) {
                    return Ok(s);
                }
            } else if ev.is_err() {
                // Lagged or closed: fall back to asking.
                let status = self.migrate_status().await?;
                if FINAL_STATES.contains(&status.as_str()) {
                    return Ok(status);
                }
            }
        }
    }
}
