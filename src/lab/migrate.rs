//! A plain QEMU→QEMU postcopy migration over loopback, driven over QMP: the "direct
//! control" baseline (no sidecar in between) that tests and benchmarks compare against.

use std::time::{Duration, Instant};

use qapi::qmp;
use serde_json::Value;

use super::vm::Vm;
use super::{LabError, free_tcp_port};
use crate::qmp::QmpError;

/// Options of [`direct_postcopy`].
#[derive(Debug, Clone)]
pub struct DirectOptions {
    /// Also enable `postcopy-preempt` (a second channel for urgent pages).
    pub preempt: bool,
    /// Limit for the whole migration.
    pub timeout: Duration,
}

impl Default for DirectOptions {
    fn default() -> Self {
        DirectOptions {
            preempt: false,
            timeout: Duration::from_secs(300),
        }
    }
}

/// What a direct migration did.
#[derive(Debug, Clone)]
pub struct DirectReport {
    /// From `migrate` to both ends reporting `completed`.
    pub total: Duration,
    /// From `migrate` to the source reporting `postcopy-active`.
    pub to_postcopy: Duration,
    /// The source's final `query-migrate` reply.
    pub source_info: Value,
    /// The destination's final `query-migrate` reply.
    pub destination_info: Value,
}

/// Migrates `src` to `dst` (started with `-incoming defer`) on 127.0.0.1 with postcopy:
/// capabilities on both ends, `migrate-incoming`, `migrate`, then `migrate-start-postcopy`
/// as soon as the migration is active, and waits for `completed` on both ends.
pub async fn direct_postcopy(
    src: &Vm,
    dst: &Vm,
    opts: &DirectOptions,
) -> Result<DirectReport, LabError> {
    let mut caps = vec![
        ("events", true),
        ("postcopy-ram", true),
        ("return-path", true),
    ];
    if opts.preempt {
        caps.push(("postcopy-preempt", true));
    }
    src.qmp().set_capabilities(&caps).await?;
    dst.qmp().set_capabilities(&caps).await?;
    let port = free_tcp_port().map_err(|source| LabError::Io {
        what: "picking a loopback port".into(),
        source,
    })?;
    let uri = format!("tcp:127.0.0.1:{port}");
    let dst_cursor = dst.qmp().event_cursor();
    dst.qmp()
        .execute(qmp::migrate_incoming {
            uri: Some(uri.clone()),
            channels: None,
            exit_on_error: None,
        })
        .await?;

    let deadline = Instant::now() + opts.timeout;
    let left = || deadline.saturating_duration_since(Instant::now());
    let src_cursor = src.qmp().event_cursor();
    let t0 = Instant::now();
    src.qmp()
        .execute(qmp::migrate {
            uri: Some(uri),
            channels: None,
            detach: None,
            resume: None,
        })
        .await?;
    let failed =
        |end: &crate::qmp::MigrationStatus| ["failed", "cancelled"].contains(&end.as_str());
    let s = src
        .qmp()
        .wait_migration_status_after(src_cursor, &["active", "failed", "cancelled"], left())
        .await?;
    if failed(&s) {
        return Err(migration_failed(src, dst, s.as_str()).await);
    }
    src.qmp().execute(qmp::migrate_start_postcopy {}).await?;
    let s = src
        .qmp()
        .wait_migration_status_after(
            src_cursor,
            &["postcopy-active", "completed", "failed", "cancelled"],
            left(),
        )
        .await?;
    let to_postcopy = t0.elapsed();
    if failed(&s) {
        return Err(migration_failed(src, dst, s.as_str()).await);
    }
    let finals = ["completed", "failed", "cancelled"];
    let s = src
        .qmp()
        .wait_migration_status_after(src_cursor, &finals, left())
        .await?;
    let d = dst
        .qmp()
        .wait_migration_status_after(dst_cursor, &finals, left())
        .await?;
    let total = t0.elapsed();
    if s != "completed" || d != "completed" {
        return Err(migration_failed(src, dst, &format!("source {s}, destination {d}")).await);
    }
    Ok(DirectReport {
        total,
        to_postcopy,
        source_info: src.qmp().query_migrate_json().await?,
        destination_info: dst.qmp().query_migrate_json().await?,
    })
}

async fn migration_failed(src: &Vm, dst: &Vm, status: &str) -> LabError {
    let desc = |v: Result<Value, QmpError>| {
        v.ok()
            .and_then(|v| {
                v.get("error-desc")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            })
            .unwrap_or_default()
    };
    LabError::Workload(format!(
        "migration ended {status}: source says {:?}, destination says {:?}; source stderr:\n{}\ndestination stderr:\n{}",
        desc(src.qmp().query_migrate_json().await),
        desc(dst.qmp().query_migrate_json().await),
        src.stderr().tail(10),
        dst.stderr().tail(10)
    ))
}
