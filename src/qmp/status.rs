//! QEMU's `MigrationStatus` as an open enum: the `qapi` crate's closed enum (QEMU 9.1's
//! schema) cannot hold a status that a newer QEMU adds (10.2's `postcopy-device`, 11.x's
//! `failing`), and a status it cannot hold must never end a session that a migration
//! depends on.

use std::fmt;

/// A migration's status as `query-migrate` and the `MIGRATION` event report it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum MigrationStatus {
    /// No migration has run.
    None,
    /// Setting up.
    Setup,
    /// Being cancelled.
    Cancelling,
    /// Cancelled.
    Cancelled,
    /// Precopy running.
    Active,
    /// Postcopy running.
    PostcopyActive,
    /// Postcopy paused after a broken channel; waits for recovery.
    PostcopyPaused,
    /// Source (9.1+): `migrate` with `resume` is connecting.
    PostcopyRecoverSetup,
    /// The recovery handshake is running.
    PostcopyRecover,
    /// 10.2+: device state is being switched over in postcopy.
    PostcopyDevice,
    /// Finished.
    Completed,
    /// 11.x: failed, with its cleanup still running; `failed` follows
    /// (protocol-spec/versions.md#versions-after-10-0).
    Failing,
    /// Failed.
    Failed,
    /// COLO mode.
    Colo,
    /// Source paused before switchover (`pause-before-switchover`).
    PreSwitchover,
    /// Source saving device state at switchover.
    Device,
    /// Waiting for a device unplug (failover).
    WaitUnplug,
    /// A status this sidecar does not know, as QEMU spelled it.
    Other(String),
}

impl MigrationStatus {
    /// Parses QEMU's spelling; unknown values are kept as [`MigrationStatus::Other`].
    pub fn parse(s: &str) -> MigrationStatus {
        use MigrationStatus::*;
        match s {
            "none" => None,
            "setup" => Setup,
            "cancelling" => Cancelling,
            "cancelled" => Cancelled,
            "active" => Active,
            "postcopy-active" => PostcopyActive,
            "postcopy-paused" => PostcopyPaused,
            "postcopy-recover-setup" => PostcopyRecoverSetup,
            "postcopy-recover" => PostcopyRecover,
            "postcopy-device" => PostcopyDevice,
            "completed" => Completed,
            "failing" => Failing,
            "failed" => Failed,
            "colo" => Colo,
            "pre-switchover" => PreSwitchover,
            "device" => Device,
            "wait-unplug" => WaitUnplug,
            other => Other(other.to_string()),
        }
    }

    /// QEMU's spelling.
    pub fn as_str(&self) -> &str {
        use MigrationStatus::*;
        match self {
            None => "none",
            Setup => "setup",
            Cancelling => "cancelling",
            Cancelled => "cancelled",
            Active => "active",
            PostcopyActive => "postcopy-active",
            PostcopyPaused => "postcopy-paused",
            PostcopyRecoverSetup => "postcopy-recover-setup",
            PostcopyRecover => "postcopy-recover",
            PostcopyDevice => "postcopy-device",
            Completed => "completed",
            Failing => "failing",
            Failed => "failed",
            Colo => "colo",
            PreSwitchover => "pre-switchover",
            Device => "device",
            WaitUnplug => "wait-unplug",
            Other(s) => s,
        }
    }

    /// A state in which nothing more happens without an operator or a recovery:
    /// completed, failed, cancelled, or postcopy paused.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            MigrationStatus::Completed
                | MigrationStatus::Failed
                | MigrationStatus::Cancelled
                | MigrationStatus::PostcopyPaused
        )
    }

    /// The VM's state is split between the two hosts (postcopy has begun and not ended):
    /// losing the migration now loses the VM unless it is recovered.
    pub fn is_postcopy(&self) -> bool {
        matches!(
            self,
            MigrationStatus::PostcopyActive
                | MigrationStatus::PostcopyPaused
                | MigrationStatus::PostcopyRecoverSetup
                | MigrationStatus::PostcopyRecover
                | MigrationStatus::PostcopyDevice
        )
    }
}

impl fmt::Display for MigrationStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for MigrationStatus {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(MigrationStatus::parse(s))
    }
}

impl PartialEq<&str> for MigrationStatus {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_known_spelling_round_trips_and_unknown_ones_survive() {
        for s in [
            "none",
            "setup",
            "cancelling",
            "cancelled",
            "active",
            "postcopy-active",
            "postcopy-paused",
            "postcopy-recover-setup",
            "postcopy-recover",
            "postcopy-device",
            "completed",
            "failing",
            "failed",
            "colo",
            "pre-switchover",
            "device",
            "wait-unplug",
        ] {
            let st = MigrationStatus::parse(s);
            assert!(!matches!(st, MigrationStatus::Other(_)), "{s}");
            assert_eq!(st.as_str(), s);
        }
        let future = MigrationStatus::parse("postcopy-something-new");
        assert_eq!(
            future,
            MigrationStatus::Other("postcopy-something-new".into())
        );
        assert_eq!(future.to_string(), "postcopy-something-new");
        assert!(!future.is_final());
        assert!(MigrationStatus::PostcopyPaused.is_final());
        assert!(MigrationStatus::PostcopyDevice.is_postcopy());
        assert!(!MigrationStatus::Failing.is_final(), "failed follows");
    }
}
