//! Finding the QEMU binaries and the guest image that `scripts/setup.sh` installs.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::{LabError, cache_dir};

/// The QEMU versions the project is tested against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QemuVersion {
    /// QEMU 10.0 from bookworm-backports, installed system-wide.
    V10_0,
    /// QEMU 7.2 from bookworm, extracted under the cache directory (not installed, so it
    /// can sit beside 10.0 for cross-version migration).
    V7_2,
    /// QEMU 11.1 from Debian's development suite, extracted with its own libraries and run
    /// by its own dynamic loader (Debian 12's glibc is too old for it): the release that
    /// brings the stream changes of 10.1-11.1 to real runs.
    V11_1,
}

impl QemuVersion {
    /// "10.0", "7.2" or "11.1".
    pub fn as_str(self) -> &'static str {
        match self {
            QemuVersion::V10_0 => "10.0",
            QemuVersion::V7_2 => "7.2",
            QemuVersion::V11_1 => "11.1",
        }
    }

    /// The versioned q35 machine type of this release (`pc-q35-10.0`, `pc-q35-7.2`): the
    /// type both ends must use when the two ends are different releases.
    pub fn q35_machine(self) -> &'static str {
        match self {
            QemuVersion::V10_0 => "pc-q35-10.0",
            QemuVersion::V7_2 => "pc-q35-7.2",
            QemuVersion::V11_1 => "pc-q35-11.1",
        }
    }
}

/// One runnable QEMU with what it needs around it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuBinary {
    /// Which release.
    pub version: QemuVersion,
    /// The `qemu-system-x86_64` executable.
    pub path: PathBuf,
    /// Firmware directories passed as `-L` (7.2 must not pick up 10.0's firmware).
    pub data_dirs: Vec<PathBuf>,
    /// `QEMU_MODULE_DIR` (7.2 loads its TCG accelerator as a module).
    pub module_dir: Option<PathBuf>,
    /// Extra `LD_LIBRARY_PATH` entries for libraries shipped beside an extracted binary.
    pub lib_dirs: Vec<PathBuf>,
}

impl QemuBinary {
    /// Locates `version`, or explains how to install it.
    ///
    /// 10.0 is `POSTCOPY_SIDECAR_QEMU10` or `/usr/bin/qemu-system-x86_64` (checked to be
    /// 10.0, once per process); 7.2 is `POSTCOPY_SIDECAR_QEMU72` (a normally installed 7.2,
    /// checked to be 7.2) or `<cache>/qemu-7.2/usr/bin/qemu-system-x86_64`; 11.1 is
    /// `<cache>/qemu-11.1/qemu-system-x86_64`, the wrapper that runs it with its loader.
    pub fn find(version: QemuVersion) -> Result<QemuBinary, LabError> {
        match version {
            QemuVersion::V10_0 => {
                let path = std::env::var_os("POSTCOPY_SIDECAR_QEMU10")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from("/usr/bin/qemu-system-x86_64"));
                if !path.is_file() {
                    return Err(LabError::Missing {
                        what: "QEMU 10.0".into(),
                        path,
                    });
                }
                static CHECKED: OnceLock<Result<(), String>> = OnceLock::new();
                let checked = CHECKED.get_or_init(|| {
                    let line = version_line(&path, &[], None)?;
                    if line.contains("version 10.0") {
                        Ok(())
                    } else {
                        Err(line)
                    }
                });
                if let Err(line) = checked {
                    return Err(LabError::Missing {
                        what: format!("QEMU 10.0 (found `{line}`)"),
                        path,
                    });
                }
                Ok(QemuBinary {
                    version,
                    path,
                    data_dirs: Vec::new(),
                    module_dir: None,
                    lib_dirs: Vec::new(),
                })
            }
            QemuVersion::V7_2 => {
                if let Some(path) = std::env::var_os("POSTCOPY_SIDECAR_QEMU72") {
                    return system_v7_2(PathBuf::from(path));
                }
                let root = cache_dir().join("qemu-7.2");
                let path = root.join("usr/bin/qemu-system-x86_64");
                if !path.is_file() {
                    return Err(LabError::Missing {
                        what: "QEMU 7.2".into(),
                        path,
                    });
                }
                let libs = root.join("usr/lib/x86_64-linux-gnu");
                let has_libs = std::fs::read_dir(&libs)
                    .map(|d| {
                        d.flatten()
                            .any(|e| e.file_name().to_string_lossy().contains(".so"))
                    })
                    .unwrap_or(false);
                Ok(QemuBinary {
                    version,
                    path,
                    data_dirs: vec![
                        root.join("usr/share/qemu"),
                        root.join("usr/share/seabios"),
                        PathBuf::from("/usr/lib/ipxe/qemu"),
                    ],
                    module_dir: Some(libs.join("qemu")),
                    lib_dirs: if has_libs { vec![libs] } else { Vec::new() },
                })
            }
            QemuVersion::V11_1 => {
                let dir = cache_dir().join("qemu-11.1");
                let path = dir.join("qemu-system-x86_64");
                let root = dir.join("root");
                if !path.is_file() || !root.join("usr/bin/qemu-system-x86_64").is_file() {
                    return Err(LabError::Missing {
                        what: "QEMU 11.1".into(),
                        path,
                    });
                }
                // The wrapper sets the loader, libraries and module dir: no LD_LIBRARY_PATH,
                // which would also reach the host's own programs.
                Ok(QemuBinary {
                    version,
                    path,
                    data_dirs: vec![root.join("usr/share/qemu"), root.join("usr/share/seabios")],
                    module_dir: None,
                    lib_dirs: Vec::new(),
                })
            }
        }
    }

    /// QEMU 10.0 (see [`QemuBinary::find`]).
    pub fn v10_0() -> Result<QemuBinary, LabError> {
        QemuBinary::find(QemuVersion::V10_0)
    }

    /// QEMU 7.2 (see [`QemuBinary::find`]).
    pub fn v7_2() -> Result<QemuBinary, LabError> {
        QemuBinary::find(QemuVersion::V7_2)
    }

    /// A command for this binary with its environment and `-L` arguments already set.
    pub fn command(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.path);
        self.apply_env(cmd.as_std_mut());
        for d in &self.data_dirs {
            cmd.arg("-L").arg(d);
        }
        cmd
    }

    fn apply_env(&self, cmd: &mut std::process::Command) {
        if let Some(m) = &self.module_dir {
            cmd.env("QEMU_MODULE_DIR", m);
        }
        if !self.lib_dirs.is_empty() {
            let mut parts: Vec<PathBuf> = self.lib_dirs.clone();
            if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
                parts.extend(std::env::split_paths(&old));
            }
            if let Ok(joined) = std::env::join_paths(parts) {
                cmd.env("LD_LIBRARY_PATH", joined);
            }
        }
    }

    /// The first line of `--version`, e.g. `QEMU emulator version 7.2.22 (Debian ...)`.
    pub fn version_line(&self) -> Result<String, LabError> {
        version_line(&self.path, &self.data_dirs, Some(self)).map_err(|e| LabError::Io {
            what: format!("{} --version", self.path.display()),
            source: std::io::Error::other(e),
        })
    }
}

/// A QEMU 7.2 installed normally at `path` (e.g. Debian 12's own package in a container
/// image): it finds its firmware and modules itself, so nothing is added around it.
fn system_v7_2(path: PathBuf) -> Result<QemuBinary, LabError> {
    if !path.is_file() {
        return Err(LabError::Missing {
            what: "QEMU 7.2 (POSTCOPY_SIDECAR_QEMU72)".into(),
            path,
        });
    }
    let line = version_line(&path, &[], None).unwrap_or_else(|e| e);
    if !line.contains("version 7.2") {
        return Err(LabError::Missing {
            what: format!("QEMU 7.2 (POSTCOPY_SIDECAR_QEMU72; found `{line}`)"),
            path,
        });
    }
    Ok(QemuBinary {
        version: QemuVersion::V7_2,
        path,
        data_dirs: Vec::new(),
        module_dir: None,
        lib_dirs: Vec::new(),
    })
}

fn version_line(
    path: &Path,
    data_dirs: &[PathBuf],
    bin: Option<&QemuBinary>,
) -> Result<String, String> {
    let mut cmd = std::process::Command::new(path);
    if let Some(b) = bin {
        b.apply_env(&mut cmd);
    }
    for d in data_dirs {
        cmd.arg("-L").arg(d);
    }
    let out = cmd
        .arg("--version")
        .output()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .to_string())
}

/// The Linux guest: Debian's cloud kernel and our initramfs whose `/init` is the workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    /// `vmlinuz`.
    pub kernel: PathBuf,
    /// `initramfs.cpio.gz` (built by `scripts/build-guest.sh`).
    pub initramfs: PathBuf,
}

impl GuestImage {
    /// Locates the image under the cache directory, or explains how to build it.
    pub fn find() -> Result<GuestImage, LabError> {
        let dir = cache_dir().join("guest");
        let img = GuestImage {
            kernel: dir.join("vmlinuz"),
            initramfs: dir.join("initramfs.cpio.gz"),
        };
        for (what, p) in [
            ("guest kernel", &img.kernel),
            ("guest initramfs", &img.initramfs),
        ] {
            if !p.is_file() {
                return Err(LabError::Missing {
                    what: what.into(),
                    path: p.clone(),
                });
            }
        }
        Ok(img)
    }
}
