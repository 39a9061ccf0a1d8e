//! Starting, watching and stopping one sidecar: spawned directly (detached from the hook,
//! its pid recorded) or as the systemd unit `postcopy-sidecar@DOMAIN.service`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How long a stopped sidecar gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Where systemd makes each unit's private directory (`RuntimeDirectory=` of the unit,
/// owned by its dynamic user, mode 0700): the sidecar's ready and takeover files.
pub const SYSTEMD_PRIVATE_ROOT: &str = "/run/postcopy-sidecar-private";

/// What `receive` is started with.
#[derive(Debug, Clone)]
pub struct SidecarArgs {
    /// `--listen`.
    pub listen: String,
    /// `--qmp`.
    pub qmp: PathBuf,
    /// `--qmp-uid`: QEMU's uid, the only one that may answer on `qmp`.
    pub qmp_uid: u32,
    /// `--ready-file`.
    pub ready: PathBuf,
    /// `--report`.
    pub report: PathBuf,
    /// `--attach-timeout`, seconds.
    pub attach_timeout: f64,
    /// `--state-file`: what a restarted sidecar (`--recover`) needs to take over.
    pub state_file: PathBuf,
    /// `--on-cut`: `hold` or `pass-through`.
    pub on_cut: String,
    /// `--silence`, seconds.
    pub silence: f64,
    /// `--away-timeout`, seconds.
    pub away_timeout: f64,
    /// `--destination-tls-creds`: used when the destination expects TLS.
    pub tls_creds: PathBuf,
}

impl SidecarArgs {
    /// The `receive` command line after the binary.
    pub fn argv(&self) -> Vec<std::ffi::OsString> {
        let mut v: Vec<std::ffi::OsString> = Vec::new();
        for s in ["receive", "--follow-incoming", "--quiet", "--listen"] {
            v.push(s.into());
        }
        v.push(self.listen.clone().into());
        v.push("--qmp".into());
        v.push(self.qmp.clone().into());
        v.push("--qmp-uid".into());
        v.push(self.qmp_uid.to_string().into());
        v.push("--ready-file".into());
        v.push(self.ready.clone().into());
        v.push("--report".into());
        v.push(self.report.clone().into());
        v.push("--attach-timeout".into());
        v.push(self.attach_timeout.to_string().into());
        v.push("--state-file".into());
        v.push(self.state_file.clone().into());
        v.push("--on-cut".into());
        v.push(self.on_cut.clone().into());
        v.push("--silence".into());
        v.push(self.silence.to_string().into());
        v.push("--away-timeout".into());
        v.push(self.away_timeout.to_string().into());
        v.push("--destination-tls-creds".into());
        v.push(self.tls_creds.clone().into());
        v
    }

    /// The unit's environment file: one variable per argument (the unit passes each as
    /// `${VAR}`, one word, whatever it contains).
    pub fn env_file(&self, log_filter: &str) -> String {
        let q = |s: &str| {
            let mut o = String::from("\"");
            for c in s.chars() {
                if matches!(c, '"' | '\\' | '$' | '`') {
                    o.push('\\');
                }
                o.push(c);
            }
            o.push('"');
            o
        };
        format!(
            "LISTEN={}\nQMP={}\nQMP_UID={}\nREADY={}\nREPORT={}\nATTACH_TIMEOUT={}\n\
             STATE_FILE={}\nON_CUT={}\nSILENCE={}\nAWAY_TIMEOUT={}\nTLS_CREDS={}\nRUST_LOG={}\nNO_COLOR=1\n",
            q(&self.listen),
            q(&self.qmp.to_string_lossy()),
            self.qmp_uid,
            q(&self.ready.to_string_lossy()),
            q(&self.report.to_string_lossy()),
            self.attach_timeout,
            q(&self.state_file.to_string_lossy()),
            q(&self.on_cut),
            self.silence,
            self.away_timeout,
            q(&self.tls_creds.to_string_lossy()),
            q(log_filter)
        )
    }
}

/// A launched sidecar, as recorded in the domain's state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sidecar {
    /// Spawned by the hook.
    Direct {
        /// Its pid.
        pid: u32,
        /// Its start time (`/proc/PID/stat` field 22), so a reused pid is never signalled.
        start_time: u64,
        /// Its stdout and stderr.
        log: PathBuf,
    },
    /// A systemd unit.
    Systemd {
        /// `postcopy-sidecar@DOMAIN.service`.
        unit: String,
    },
}

/// The unit name for `domain`, escaped as `systemd-escape` does.
pub fn unit_name(domain: &str) -> String {
    format!("postcopy-sidecar@{}.service", unit_instance(domain))
}

/// The private directory systemd makes for `domain`'s unit (`%i` is the escaped
/// instance name, which holds no `/` and no space).
pub fn systemd_private_dir(domain: &str) -> PathBuf {
    Path::new(SYSTEMD_PRIVATE_ROOT).join(unit_instance(domain))
}

/// `domain` escaped as `systemd-escape` does: the unit's instance name.
fn unit_instance(domain: &str) -> String {
    let mut s = String::new();
    for (i, b) in domain.bytes().enumerate() {
        match b {
            b'/' => s.push('-'),
            b'.' if i == 0 => s.push_str("\\x2e"),
            b if b.is_ascii_alphanumeric() || b == b':' || b == b'_' || b == b'.' => {
                s.push(b as char)
            }
            b => s.push_str(&format!("\\x{b:02x}")),
        }
    }
    s
}

/// Whether systemd runs this host (`sd_booted()`).
pub fn systemd_running() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

fn systemctl(args: &[&str]) -> std::io::Result<std::process::Output> {
    Command::new("systemctl")
        .args(args)
        .stdin(Stdio::null())
        .output()
}

/// Spawns `binary receive ...` detached from the hook: its own process group, stdin from
/// /dev/null, stdout and stderr appended to `log`. libvirt waits for the hook's stdout and
/// stderr to close, so the sidecar must hold neither.
pub fn spawn_direct(
    binary: &Path,
    args: &SidecarArgs,
    log: &Path,
    log_filter: &str,
) -> std::io::Result<Sidecar> {
    use std::os::unix::process::CommandExt;
    let out = crate::durable::open_append_no_follow(log)?;
    let child = Command::new(binary)
        .args(args.argv())
        .env("RUST_LOG", log_filter)
        // A log file, not a terminal.
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0)
        .spawn()?;
    let pid = child.id();
    // Not waited for: the hook exits at once and the sidecar is re-parented.
    drop(child);
    // Already gone (it failed at once): 0 matches no live process, so the `started` hook
    // finds it dead and reports the error from its log.
    let start_time = start_time(pid).unwrap_or(0);
    Ok(Sidecar::Direct {
        pid,
        start_time,
        log: log.to_path_buf(),
    })
}

/// Writes the unit's environment file and starts the unit.
pub fn start_unit(domain: &str, env_path: &Path, env: &str) -> std::io::Result<Sidecar> {
    crate::durable::write_atomically(env_path, env.as_bytes())?;
    let unit = unit_name(domain);
    let out = systemctl(&["start", &unit])?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "systemctl start {unit}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(Sidecar::Systemd { unit })
}

/// `/proc/PID/stat` start time of a live (not zombie) process.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); field 22 (starttime) is fields[19].
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

impl Sidecar {
    /// Whether the sidecar still runs.
    pub fn alive(&self) -> bool {
        match self {
            Sidecar::Direct {
                pid, start_time: t, ..
            } => start_time(*pid) == Some(*t),
            Sidecar::Systemd { unit } => systemctl(&["is-active", "--quiet", unit])
                .map(|o| o.status.success())
                .unwrap_or(false),
        }
    }

    /// Where its output went, to quote in an error.
    pub fn log_hint(&self) -> String {
        match self {
            Sidecar::Direct { log, .. } => log.display().to_string(),
            Sidecar::Systemd { unit } => format!("journalctl -u {unit}"),
        }
    }

    /// The last `error: ...` line the sidecar printed (direct launches only).
    pub fn last_error(&self) -> Option<String> {
        let Sidecar::Direct { log, .. } = self else {
            return None;
        };
        let text = std::fs::read_to_string(log).ok()?;
        text.lines()
            .rev()
            .find_map(|l| l.strip_prefix("error: ").map(str::to_string))
    }

    /// Stops the sidecar if it still runs: SIGTERM, then SIGKILL after a grace period
    /// (direct), or `systemctl stop`.
    pub fn stop(&self) -> std::io::Result<()> {
        match self {
            Sidecar::Direct { pid, .. } => {
                use nix::sys::signal::{Signal, kill};
                let p = nix::unistd::Pid::from_raw(*pid as i32);
                if !self.alive() {
                    return Ok(());
                }
                let _ = kill(p, Signal::SIGTERM);
                let deadline = Instant::now() + STOP_GRACE;
                while self.alive() {
                    if Instant::now() >= deadline {
                        let _ = kill(p, Signal::SIGKILL);
                        break;
                    }
                    // Not our child (re-parented), so there is nothing to wait on.
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(())
            }
            Sidecar::Systemd { unit } => {
                let out = systemctl(&["stop", unit])?;
                if out.status.success() {
                    Ok(())
                } else {
                    Err(std::io::Error::other(format!(
                        "systemctl stop {unit}: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    )))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_names_are_escaped_like_systemd_escape() {
        assert_eq!(unit_name("t1"), "postcopy-sidecar@t1.service");
        assert_eq!(unit_name("my-vm.a"), "postcopy-sidecar@my\\x2dvm.a.service");
        assert_eq!(unit_name(".x y"), "postcopy-sidecar@\\x2ex\\x20y.service");
        assert_eq!(
            systemd_private_dir("a b/c"),
            Path::new("/run/postcopy-sidecar-private/a\\x20b-c")
        );
    }

    #[test]
    fn env_file_quotes_every_value() {
        let a = SidecarArgs {
            listen: "192.0.2.7".into(),
            qmp: "/run/p/a \"b\"/qemu/qmp.sock".into(),
            qmp_uid: 64055,
            ready: "/run/p/x/qemu/ready".into(),
            report: "/var/lib/p/$x.json".into(),
            attach_timeout: 60.0,
            state_file: "/run/p/x/qemu/takeover.json".into(),
            on_cut: "pass-through".into(),
            silence: 10.0,
            away_timeout: 600.0,
            tls_creds: "/etc/pki/qemu".into(),
        };
        let env = a.env_file("info");
        assert!(env.contains("ON_CUT=\"pass-through\"\n"), "{env}");
        assert!(env.contains("AWAY_TIMEOUT=600\n"), "{env}");
        // Every variable the unit's ExecStart uses is in the file.
        let unit = include_str!("../../../deploy/systemd/postcopy-sidecar@.service");
        let exec = unit.lines().find(|l| l.starts_with("ExecStart=")).unwrap();
        for var in exec.split("${").skip(1) {
            let name = var.split('}').next().unwrap();
            assert!(
                env.contains(&format!("\n{name}=")) || env.starts_with(&format!("{name}=")),
                "{name} missing:\n{env}"
            );
        }
        assert!(
            env.contains("QMP=\"/run/p/a \\\"b\\\"/qemu/qmp.sock\"\n"),
            "{env}"
        );
        assert!(env.contains("REPORT=\"/var/lib/p/\\$x.json\"\n"), "{env}");
        assert!(env.contains("ATTACH_TIMEOUT=60\n"), "{env}");
        assert!(env.contains("QMP_UID=64055\n"), "{env}");
    }

    #[test]
    fn a_direct_sidecar_is_recognised_by_pid_and_start_time() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        let s = Sidecar::Direct {
            pid,
            start_time: start_time(pid).unwrap(),
            log: log.clone(),
        };
        assert!(s.alive());
        let reused = Sidecar::Direct {
            pid,
            start_time: start_time(pid).unwrap() + 1,
            log,
        };
        assert!(!reused.alive(), "a different start time is another process");
        reused.stop().unwrap();
        assert!(
            s.alive(),
            "stop() leaves a process it does not recognise alone"
        );
        s.stop().unwrap();
        // Our own child: it is a zombie until reaped, and a zombie counts as gone.
        assert!(!s.alive());
        let mut child = child;
        let _ = child.wait();
    }
}
