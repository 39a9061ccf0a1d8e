//! What a QEMU says about itself over QMP: version, machine, run state, migration status
//! and capabilities, RAM blocks and memory backends, and where it listens for a migration.
//! Replies whose shape differs between QEMU versions are read as JSON, not as the 9.1
//! schema's types.

use serde::Serialize;
use serde_json::Value;

use super::{MigrationStatus, Qmp, QmpError};
use qapi::qmp;

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

impl Qmp {
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

    /// `query-migrate`'s status (`none` when no migration ran).
    pub async fn migrate_status(&self) -> Result<MigrationStatus, QmpError> {
        let v = self.query_migrate_json().await?;
        Ok(MigrationStatus::parse(
            v.get("status").and_then(Value::as_str).unwrap_or("none"),
        ))
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

    /// The address a destination listens on after `migrate-incoming` (or
    /// `migrate-recover`), if it listens yet.
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

    /// Whether the VM runs.
    pub async fn is_running(&self) -> Result<bool, QmpError> {
        let v = self.execute(QueryStatusRaw {}).await?;
        Ok(v.get("running").and_then(Value::as_bool).unwrap_or(false))
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
