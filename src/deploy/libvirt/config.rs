//! The hook's configuration file (TOML), `SYSCONFDIR/postcopy-sidecar/libvirt-hook.toml`.
//! The shipped, commented file is `deploy/libvirt/libvirt-hook.toml`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::daemon::receive::Listen;

/// The configuration file as shipped (all defaults, `listen` unset).
pub const SHIPPED: &str = include_str!("../../../deploy/libvirt/libvirt-hook.toml");

/// How the hook starts the sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Launcher {
    /// `systemd` when systemd runs the host (`/run/systemd/system` exists), else `direct`.
    #[default]
    Auto,
    /// Spawn `postcopy-sidecar receive` detached from the hook, output to a log file.
    Direct,
    /// `systemctl start postcopy-sidecar@DOMAIN.service`.
    Systemd,
}

/// The hook's settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Domains (by name) whose incoming migrations go through the sidecar, besides those
    /// marked in their XML (`<metadata><sidecar xmlns='urn:postcopy-sidecar:1'/>`).
    pub domains: Vec<String>,
    /// Where the sidecar listens for the source: this host's address as sources reach it,
    /// alone (the sidecar takes the port libvirt gave QEMU) or `ADDR:PORT`.
    pub listen: Option<String>,
    /// Per-domain runtime files: the monitor socket, the ready file, the hook's state.
    pub run_dir: PathBuf,
    /// One JSON report (and, launched directly, one log) per migration.
    pub report_dir: PathBuf,
    /// Seconds the `started` hook waits for the sidecar to listen before failing the
    /// migration.
    pub ready_timeout: f64,
    /// Seconds the sidecar waits for the QMP socket and for QEMU to listen.
    pub attach_timeout: f64,
    /// How the sidecar is started.
    pub launcher: Launcher,
    /// `RUST_LOG` for the sidecar.
    pub log_filter: String,
    /// The `postcopy-sidecar` binary to run; the hook's own binary when unset.
    pub binary: Option<PathBuf>,
    /// What the sidecar does when the source's link breaks in postcopy: `pass-through`
    /// (the destination pauses too, and `virsh migrate --postcopy-resume` recovers both)
    /// or `hold` (the destination never notices; resume the source QEMU itself).
    pub on_cut: String,
    /// Seconds of silence from the source in postcopy that count as a cut.
    pub silence: f64,
    /// Seconds the sidecar waits for a source that went away in postcopy.
    pub away_timeout: f64,
    /// The host's QEMU TLS credentials (libvirt's `migrate_tls_x509_cert_dir`): with
    /// `virsh migrate --tls` the sidecar answers the source and reaches QEMU with them.
    pub tls_creds: PathBuf,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            domains: Vec::new(),
            listen: None,
            run_dir: PathBuf::from("/run/postcopy-sidecar"),
            report_dir: PathBuf::from("/var/lib/postcopy-sidecar/reports"),
            ready_timeout: 60.0,
            attach_timeout: 60.0,
            launcher: Launcher::Auto,
            log_filter: "info".into(),
            binary: None,
            on_cut: "pass-through".into(),
            silence: 10.0,
            away_timeout: 600.0,
            tls_creds: PathBuf::from(crate::daemon::tls::LIBVIRT_QEMU_CREDS),
        }
    }
}

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Unreadable.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not valid TOML for this schema.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A value out of range.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

impl Config {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses `text` (read from `path`, named in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let c: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.message().to_string(),
        })?;
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        if let Some(l) = &c.listen {
            parse_listen(l).map_err(|e| invalid(format!("listen: {e}")))?;
        }
        if !matches!(c.on_cut.as_str(), "hold" | "pass-through") {
            return Err(invalid(format!(
                "on_cut must be \"hold\" or \"pass-through\", not {:?}",
                c.on_cut
            )));
        }
        for (name, v) in [
            ("ready_timeout", c.ready_timeout),
            ("attach_timeout", c.attach_timeout),
            ("silence", c.silence),
            ("away_timeout", c.away_timeout),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(invalid(format!(
                    "{name} must be a positive number of seconds"
                )));
            }
        }
        for (name, p) in [("run_dir", &c.run_dir), ("report_dir", &c.report_dir)] {
            if !p.is_absolute() {
                return Err(invalid(format!("{name} must be an absolute path")));
            }
        }
        Ok(c)
    }

    /// [`Config::ready_timeout`] as a duration.
    pub fn ready_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.ready_timeout)
    }
}

/// Checks a `listen` value the way `receive --listen` reads it, and refuses loopback: the
/// destination QEMU listens there (`--listen-address 127.0.0.1`) on the same port.
pub fn parse_listen(s: &str) -> Result<Listen, String> {
    let l: Listen = s.parse()?;
    let ip = match l {
        Listen::At(a) => a.ip(),
        Listen::DestinationPort(ip) => ip,
    };
    if ip.is_unspecified() {
        return Err(format!(
            "{s}: a wildcard address would clash with the destination QEMU's port; give this \
             host's address as the source reaches it"
        ));
    }
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_file_is_the_defaults() {
        let c = Config::parse(SHIPPED, Path::new("shipped")).unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn reads_a_full_file() {
        let c = Config::parse(
            "domains = [\"vm1\"]\nlisten = \"192.0.2.7\"\nlauncher = \"direct\"\n\
             run_dir = \"/tmp/r\"\nready_timeout = 5\n",
            Path::new("x"),
        )
        .unwrap();
        assert_eq!(c.domains, ["vm1"]);
        assert_eq!(c.listen.as_deref(), Some("192.0.2.7"));
        assert_eq!(c.launcher, Launcher::Direct);
        assert_eq!(c.ready_timeout(), Duration::from_secs(5));
    }

    #[test]
    fn refuses_bad_values_with_the_key() {
        let e = |t: &str| {
            Config::parse(t, Path::new("c.toml"))
                .unwrap_err()
                .to_string()
        };
        assert!(e("listen = \"0.0.0.0\"").contains("listen: 0.0.0.0: a wildcard"));
        assert!(e("listen = \"host\"").contains("listen:"));
        assert!(e("ready_timeout = 0").contains("ready_timeout must be"));
        assert!(e("run_dir = \"rel\"").contains("run_dir must be an absolute path"));
        assert!(e("lisen = \"1.2.3.4\"").contains("unknown field"));
        assert!(e("launcher = \"cron\"").contains("unknown variant"));
    }
}
