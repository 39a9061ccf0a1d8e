//! `libvirt-hook install` / `uninstall`: put the hook, its configuration and the systemd
//! unit in place under a system configuration directory (`/etc`, or a private one for
//! tests).

use std::path::{Path, PathBuf};

use super::config::{Config, SHIPPED};

/// The hook file as shipped, before its paths are filled in.
pub const HOOK_TEMPLATE: &str = include_str!("../../../deploy/libvirt/qemu");
/// The systemd unit as shipped, before its paths are filled in.
pub const UNIT_TEMPLATE: &str = include_str!("../../../deploy/systemd/postcopy-sidecar@.service");
/// A line only our hook file has.
const HOOK_MARK: &str = "# postcopy-sidecar libvirt hook, installed by";
/// The unit's file name.
pub const UNIT_FILE: &str = "postcopy-sidecar@.service";

/// What to install.
#[derive(Debug, Clone)]
pub struct InstallOptions {
    /// The system configuration directory (`/etc`).
    pub sysconfdir: PathBuf,
    /// The `postcopy-sidecar` binary the hook runs.
    pub binary: PathBuf,
    /// Install as `hooks/qemu.d/postcopy-sidecar` (libvirt 6.5+), next to an existing
    /// `hooks/qemu`, instead of as `hooks/qemu`.
    pub drop_in: bool,
    /// Replace a `hooks/qemu` that is not ours.
    pub force: bool,
}

/// Why installing failed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// Another hook is in the way.
    #[error(
        "{0} exists and is not postcopy-sidecar's hook: install with --drop-in (as \
         hooks/qemu.d/postcopy-sidecar, run after it by libvirt 6.5+), or --force to replace it"
    )]
    ForeignHook(PathBuf),
    /// The existing configuration does not parse.
    #[error("{0}")]
    Config(#[from] super::config::ConfigError),
    /// File system work failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> InstallError {
    let what = what.into();
    move |source| InstallError::Io { what, source }
}

/// The installed paths under `sysconfdir`.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The hook file.
    pub hook: PathBuf,
    /// The configuration file.
    pub config: PathBuf,
    /// The systemd unit.
    pub unit: PathBuf,
}

impl Layout {
    /// Where install puts things.
    pub fn new(sysconfdir: &Path, drop_in: bool) -> Layout {
        let hooks = sysconfdir.join("libvirt").join("hooks");
        Layout {
            hook: if drop_in {
                hooks.join("qemu.d").join("postcopy-sidecar")
            } else {
                hooks.join("qemu")
            },
            config: sysconfdir
                .join("postcopy-sidecar")
                .join("libvirt-hook.toml"),
            unit: sysconfdir.join("systemd").join("system").join(UNIT_FILE),
        }
    }
}

/// `s` quoted for sh.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The hook file for `binary` and `config`.
pub fn hook_file(binary: &Path, config: &Path) -> String {
    HOOK_TEMPLATE
        .replace("@BINARY@", &sh_quote(&binary.to_string_lossy()))
        .replace("@CONFIG@", &sh_quote(&config.to_string_lossy()))
}

/// The unit file for `binary` and the configuration's directories.
pub fn unit_file(binary: &Path, config: &Config) -> String {
    let report = config.report_dir.to_string_lossy();
    // systemd creates a StateDirectory= for the unit's (dynamic) user on every start, 0700;
    // the sidecar refuses a report directory that is not its own, which another report
    // directory cannot be for a dynamic user.
    let rule = match report.strip_prefix("/var/lib/") {
        Some(rel) => format!("StateDirectory={rel}\nStateDirectoryMode=0700"),
        None => format!(
            "# {report} is not under /var/lib: the unit's dynamic user cannot own it, and the\n\
             # sidecar refuses to write its report there. Set report_dir under /var/lib/.\n\
             ReadWritePaths={report}"
        ),
    };
    let quote = |s: &str| {
        if s.contains(char::is_whitespace) {
            format!("\"{s}\"")
        } else {
            s.to_string()
        }
    };
    UNIT_TEMPLATE
        .replace("@BINARY@", &quote(&binary.to_string_lossy()))
        .replace("@RUN_DIR@", &config.run_dir.to_string_lossy())
        .replace("@REPORT_DIR_RULE@", &rule)
}

fn write_file(path: &Path, body: &str, mode: u32) -> Result<(), InstallError> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(io(format!("creating {}", d.display())))?;
    }
    crate::durable::write_atomically_with_mode(path, body.as_bytes(), mode)
        .map_err(io(format!("writing {}", path.display())))
}

fn is_ours(path: &Path) -> bool {
    std::fs::read_to_string(path).is_ok_and(|t| t.contains(HOOK_MARK))
}

/// Installs the hook, the configuration (kept when it exists) and the unit; returns one
/// line per thing done.
pub fn install(o: &InstallOptions) -> Result<Vec<String>, InstallError> {
    let l = Layout::new(&o.sysconfdir, o.drop_in);
    let mut done = Vec::new();
    if l.hook.exists() && !is_ours(&l.hook) && !o.force {
        return Err(InstallError::ForeignHook(l.hook));
    }
    let config = if l.config.exists() {
        done.push(format!(
            "kept the existing configuration {}",
            l.config.display()
        ));
        Config::load(&l.config)?
    } else {
        write_file(&l.config, SHIPPED, 0o644)?;
        done.push(format!(
            "installed the configuration {}",
            l.config.display()
        ));
        Config::default()
    };
    write_file(&l.hook, &hook_file(&o.binary, &l.config), 0o755)?;
    done.push(format!("installed the hook {}", l.hook.display()));
    write_file(&l.unit, &unit_file(&o.binary, &config), 0o644)?;
    done.push(format!("installed the systemd unit {}", l.unit.display()));
    if config.listen.is_none() {
        done.push(format!(
            "next: set `listen` (this host's address as sources reach it) in {}",
            l.config.display()
        ));
    }
    done.push("next: restart libvirtd, which looks for hooks only when it starts".into());
    Ok(done)
}

/// Removes the hook and the unit if they are ours; the configuration and the reports stay.
pub fn uninstall(sysconfdir: &Path, drop_in: bool) -> Result<Vec<String>, InstallError> {
    let l = Layout::new(sysconfdir, drop_in);
    let mut done = Vec::new();
    if is_ours(&l.hook) {
        std::fs::remove_file(&l.hook).map_err(io(format!("removing {}", l.hook.display())))?;
        done.push(format!("removed {}", l.hook.display()));
    } else if l.hook.exists() {
        done.push(format!("left {} alone: not ours", l.hook.display()));
    }
    if l.unit.exists() {
        std::fs::remove_file(&l.unit).map_err(io(format!("removing {}", l.unit.display())))?;
        done.push(format!("removed {}", l.unit.display()));
    }
    done.push(format!("kept {} and the reports", l.config.display()));
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(root: &Path) -> InstallOptions {
        InstallOptions {
            sysconfdir: root.to_path_buf(),
            binary: PathBuf::from("/opt/p s/postcopy-sidecar"),
            drop_in: false,
            force: false,
        }
    }

    #[test]
    fn installs_keeps_the_config_and_refuses_a_foreign_hook() {
        let d = tempfile::tempdir().unwrap();
        let l = Layout::new(d.path(), false);
        install(&opts(d.path())).unwrap();
        let hook = std::fs::read_to_string(&l.hook).unwrap();
        assert!(
            hook.contains("BINARY='/opt/p s/postcopy-sidecar'\n"),
            "{hook}"
        );
        assert!(hook.contains(&format!("CONFIG='{}'\n", l.config.display())));
        assert_eq!(std::fs::read_to_string(&l.config).unwrap(), SHIPPED);
        let unit = std::fs::read_to_string(&l.unit).unwrap();
        assert!(unit.contains("ExecStart=\"/opt/p s/postcopy-sidecar\" receive --follow-incoming"));
        assert!(unit.contains("EnvironmentFile=/run/postcopy-sidecar/%I/sidecar.env\n"));
        assert!(
            unit.contains("StateDirectory=postcopy-sidecar/reports\nStateDirectoryMode=0700\n")
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode(&l.hook), mode(&l.unit)), (0o755, 0o644));
        for placeholder in ["@BINARY@", "@RUN_DIR@", "@REPORT_DIR_RULE@"] {
            assert!(
                !unit.contains(placeholder),
                "{placeholder} left in:\n{unit}"
            );
        }

        // An operator's edit survives a reinstall.
        std::fs::write(&l.config, "listen = \"192.0.2.7\"\n").unwrap();
        let done = install(&opts(d.path())).unwrap();
        assert!(done[0].starts_with("kept the existing configuration"));
        assert_eq!(
            std::fs::read_to_string(&l.config).unwrap(),
            "listen = \"192.0.2.7\"\n"
        );

        std::fs::write(&l.hook, "#!/bin/sh\nexit 0\n").unwrap();
        assert!(matches!(
            install(&opts(d.path())),
            Err(InstallError::ForeignHook(_))
        ));
        let drop_in = InstallOptions {
            drop_in: true,
            ..opts(d.path())
        };
        install(&drop_in).unwrap();
        assert!(is_ours(&Layout::new(d.path(), true).hook));
        let done = uninstall(d.path(), false).unwrap();
        assert!(done[0].contains("not ours"), "{done:?}");
        assert!(l.hook.exists());
        uninstall(d.path(), true).unwrap();
        assert!(!Layout::new(d.path(), true).hook.exists());
    }
}
