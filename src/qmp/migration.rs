//! The QMP calls that drive a migration on either end: capabilities and parameters,
//! `migrate-incoming`, `migrate` (and its `resume` form), the switch to postcopy, the
//! out-of-band recovery calls, and waiting for the end on `MIGRATION` events (never on
//! fixed sleeps).

use std::time::Duration;

use qapi::qmp;
use serde_json::Value;

use super::{MigrationStatus, Qmp, QmpError};

/// Migration states after which nothing more happens without an operator.
pub const FINAL_STATES: &[&str] = &["completed", "failed", "cancelled", "postcopy-paused"];

/// `migrate-set-parameters` with arguments given as JSON, so parameters the 9.1 schema
/// lacks (or that 7.2 lacks) are passed exactly as named.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(transparent)]
pub struct SetParametersRaw(pub Value);

impl qapi::Command for SetParametersRaw {
    type Ok = qapi::Empty;
    const NAME: &'static str = "migrate-set-parameters";
    const ALLOW_OOB: bool = false;
}

/// `migrate` with arguments as JSON (the 9.1 schema's `migrate` has fields 7.2 rejects).
#[derive(Debug, Clone, serde::Serialize)]
#[serde(transparent)]
struct MigrateRaw(Value);

impl qapi::Command for MigrateRaw {
    type Ok = qapi::Empty;
    const NAME: &'static str = "migrate";
    const ALLOW_OOB: bool = false;
}

/// `query-migrate-parameters`, read as JSON: the set differs between 7.2 and 10.0.
#[derive(Debug, Clone, serde::Serialize)]
struct QueryParametersRaw {}

impl qapi::Command for QueryParametersRaw {
    type Ok = Value;
    const NAME: &'static str = "query-migrate-parameters";
    const ALLOW_OOB: bool = false;
}

/// `query-migrate-capabilities`, read as JSON.
#[derive(Debug, Clone, serde::Serialize)]
struct QueryCapabilitiesRaw {}

impl qapi::Command for QueryCapabilitiesRaw {
    type Ok = Value;
    const NAME: &'static str = "query-migrate-capabilities";
    const ALLOW_OOB: bool = false;
}

impl Qmp {
    /// The current state of the named migration capabilities, so a tool that changes them
    /// for one migration can put them back.
    pub async fn capabilities(&self, names: &[&str]) -> Result<Vec<(String, bool)>, QmpError> {
        // Read as JSON: 7.2 lists capabilities (`compress`, `block`) later schemas dropped.
        let all = self.execute(QueryCapabilitiesRaw {}).await?;
        let list = all
            .as_array()
            .ok_or_else(|| QmpError::Reply(format!("query-migrate-capabilities {all}")))?;
        let mut out = Vec::new();
        for name in names {
            let state = list
                .iter()
                .find(|c| c.get("capability").and_then(Value::as_str) == Some(name))
                .and_then(|c| c.get("state").and_then(Value::as_bool))
                .ok_or_else(|| QmpError::Unsupported(format!("migration capability {name}")))?;
            out.push((name.to_string(), state));
        }
        Ok(out)
    }

    /// The migration parameters as QEMU names them.
    pub async fn parameters(&self) -> Result<Value, QmpError> {
        self.execute(QueryParametersRaw {}).await
    }

    /// Sets migration capabilities by QEMU name (e.g. `postcopy-ram`).
    pub async fn set_capabilities(&self, caps: &[(&str, bool)]) -> Result<(), QmpError> {
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

    /// Sets migration parameters, given as a JSON object of QEMU names and values
    /// (`{"max-postcopy-bandwidth": 8388608}`).
    pub async fn set_parameters(&self, params: Value) -> Result<(), QmpError> {
        self.execute(SetParametersRaw(params)).await.map(|_| ())
    }

    /// Makes a destination started with `-incoming defer` listen on `uri`.
    pub async fn migrate_incoming(&self, uri: &str) -> Result<(), QmpError> {
        self.execute(qmp::migrate_incoming {
            uri: Some(uri.to_string()),
            channels: None,
            exit_on_error: None,
        })
        .await
        .map(|_| ())
    }

    /// Starts migrating this (source) VM to `uri`.
    pub async fn migrate_to(&self, uri: &str) -> Result<(), QmpError> {
        self.execute(MigrateRaw(serde_json::json!({ "uri": uri })))
            .await
            .map(|_| ())
    }

    /// Resumes a postcopy-paused (source) migration towards `uri`: QEMU reconnects there and
    /// runs the recovery handshake (protocol-spec/postcopy-sequence.md#sequence-recovery).
    pub async fn migrate_resume(&self, uri: &str) -> Result<(), QmpError> {
        self.execute(MigrateRaw(
            serde_json::json!({ "uri": uri, "resume": true }),
        ))
        .await
        .map(|_| ())
    }

    /// Makes a postcopy-paused destination listen on `uri` for the source's resume. Out
    /// of band where the monitor allows it: the destination's main loop may be blocked on
    /// guest memory that will only arrive after the recovery.
    pub async fn migrate_recover(&self, uri: &str, timeout: Duration) -> Result<(), QmpError> {
        let cmd = qmp::migrate_recover {
            uri: uri.to_string(),
        };
        if self.oob() {
            self.execute_oob(cmd, timeout).await.map(|_| ())
        } else {
            self.execute_within(cmd, timeout).await.map(|_| ())
        }
    }

    /// Pauses a postcopy migration by shutting its channels down (either end); out of band
    /// where the monitor allows it. An operator uses it on a source that cannot tell its
    /// link is gone (a silent partition), so that it can be resumed.
    pub async fn migrate_pause(&self, timeout: Duration) -> Result<(), QmpError> {
        if self.oob() {
            self.execute_oob(qmp::migrate_pause {}, timeout)
                .await
                .map(|_| ())
        } else {
            self.execute_within(qmp::migrate_pause {}, timeout)
                .await
                .map(|_| ())
        }
    }

    /// Switches a running migration to postcopy.
    pub async fn start_postcopy(&self) -> Result<(), QmpError> {
        self.execute(qmp::migrate_start_postcopy {})
            .await
            .map(|_| ())
    }

    /// The destination's own vCPU blocktime (ms), reported once the migration completed.
    pub async fn postcopy_blocktime_ms(&self) -> Result<Option<u64>, QmpError> {
        let info = self.query_migrate_json().await?;
        Ok(info.get("postcopy-blocktime").and_then(Value::as_u64))
    }

    /// The destination's own blocktime and, from QEMU 10.1, its fault latencies (see
    /// [`QemuFaultFigures`]), from one `query-migrate`.
    pub async fn postcopy_fault_figures(&self) -> Result<QemuFaultFigures, QmpError> {
        Ok(QemuFaultFigures::from_query_migrate(
            &self.query_migrate_json().await?,
        ))
    }

    /// The source's count of page requests it received.
    pub async fn postcopy_requests(&self) -> Result<Option<u64>, QmpError> {
        let info = self.query_migrate_json().await?;
        Ok(info
            .pointer("/ram/postcopy-requests")
            .and_then(Value::as_u64))
    }

    /// Waits for the migration to reach a final state ([`FINAL_STATES`]); returns it.
    pub async fn wait_migration_end(&self, timeout: Duration) -> Result<MigrationStatus, QmpError> {
        self.wait_migration_states(FINAL_STATES, timeout).await
    }

    /// Waits until the migration is in one of `states` (already, or by a later event).
    pub async fn wait_migration_states(
        &self,
        states: &[&str],
        timeout: Duration,
    ) -> Result<MigrationStatus, QmpError> {
        // Take the cursor first, then look: a change before the look is seen by the
        // query, one after it by the event.
        let cursor = self.event_cursor();
        let status = self.migrate_status().await?;
        if states.contains(&status.as_str()) {
            return Ok(status);
        }
        self.wait_migration_status_after(cursor, states, timeout)
            .await
    }
}

/// What a destination QEMU with `postcopy-blocktime` measured itself: the blocktime (all
/// versions) and the remote-fault latencies QEMU 10.1 added to `query-migrate`
/// (`qapi/migration.json`, `MigrationInfo`, "Since 10.1"; no 10.1 has run here), shown in
/// the report beside the sidecar's own fault-service figures.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct QemuFaultFigures {
    /// `postcopy-blocktime`: time all vCPUs were blocked at once, ms.
    pub blocktime_ms: Option<u64>,
    /// `postcopy-latency`: average latency of faults that needed a page request, ns.
    pub latency_ns: Option<u64>,
    /// `postcopy-latency-dist`: fault counts per bucket; bucket N holds latencies in
    /// [2^N µs, 2^(N+1) µs).
    pub latency_dist: Vec<u64>,
    /// `postcopy-vcpu-latency`: average per vCPU, ns.
    pub vcpu_latency_ns: Vec<u64>,
    /// `postcopy-non-vcpu-latency`: average of faults not taken by a vCPU (QEMU's own
    /// threads, the kernel for a syscall), ns.
    pub non_vcpu_latency_ns: Option<u64>,
}

impl QemuFaultFigures {
    /// Reads the figures from a `query-migrate` reply; absent fields stay empty.
    pub fn from_query_migrate(info: &Value) -> QemuFaultFigures {
        let list = |k: &str| {
            info.get(k)
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_u64).collect())
                .unwrap_or_default()
        };
        QemuFaultFigures {
            blocktime_ms: info.get("postcopy-blocktime").and_then(Value::as_u64),
            latency_ns: info.get("postcopy-latency").and_then(Value::as_u64),
            latency_dist: list("postcopy-latency-dist"),
            vcpu_latency_ns: list("postcopy-vcpu-latency"),
            non_vcpu_latency_ns: info
                .get("postcopy-non-vcpu-latency")
                .and_then(Value::as_u64),
        }
    }

    /// Faults counted in the distribution.
    pub fn latency_faults(&self) -> u64 {
        self.latency_dist.iter().sum()
    }

    /// The latency below which `q` of the distribution's faults fall, as the upper edge of
    /// the bucket that holds that fault, µs.
    pub fn latency_quantile_us(&self, q: f64) -> Option<u64> {
        let total = self.latency_faults();
        if total == 0 {
            return None;
        }
        let want = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (n, c) in self.latency_dist.iter().enumerate() {
            seen += c;
            if seen >= want {
                return Some(1u64 << (n + 1).min(63));
            }
        }
        None
    }
}

#[cfg(test)]
mod fault_figures_tests {
    use super::*;

    /// A 10.1 reply, built from `qapi/migration.json`'s field list (no 10.1 ran here).
    #[test]
    fn a_10_1_reply_gives_the_latencies_and_a_10_0_reply_only_the_blocktime() {
        let info = serde_json::json!({
            "status": "completed",
            "postcopy-blocktime": 41,
            "postcopy-vcpu-blocktime": [20, 41],
            "postcopy-latency": 180_000,
            "postcopy-latency-dist": [0, 0, 0, 0, 0, 0, 0, 3, 10, 5, 2],
            "postcopy-vcpu-latency": [150_000, 210_000],
            "postcopy-non-vcpu-latency": 90_000
        });
        let f = QemuFaultFigures::from_query_migrate(&info);
        assert_eq!(f.blocktime_ms, Some(41));
        assert_eq!(f.latency_ns, Some(180_000));
        assert_eq!(f.vcpu_latency_ns, [150_000, 210_000]);
        assert_eq!(f.non_vcpu_latency_ns, Some(90_000));
        assert_eq!(f.latency_faults(), 20);
        // 10 of 20 faults fall below 512 µs (bucket 8 is [256, 512)).
        assert_eq!(f.latency_quantile_us(0.5), Some(512));
        assert_eq!(f.latency_quantile_us(0.99), Some(2048));
        let old = QemuFaultFigures::from_query_migrate(&serde_json::json!({
            "status": "completed", "postcopy-blocktime": 7
        }));
        assert_eq!(old.blocktime_ms, Some(7));
        assert_eq!((old.latency_ns, old.latency_quantile_us(0.5)), (None, None));
    }
}
