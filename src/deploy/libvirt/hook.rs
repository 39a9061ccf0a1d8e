//! The hook's reaction to each libvirt event, on the destination host of a migration.
//!
//! ```text
//! migrate begin   domain XML in, edited XML out: check RAM is a shared memfd, add the
//!                 sidecar's QMP monitor, record "incoming" in RUN/DOMAIN/state.json
//! prepare begin   -
//! start begin     QEMU is about to start: make RUN/DOMAIN/qemu/ (QEMU's uid and gid) for
//!                 its monitor socket; launch `receive --follow-incoming`
//! started begin   libvirt has issued migrate-incoming and lets the source connect once the
//!                 hook exits: wait (bounded) for the sidecar's ready file
//! stopped end,    the domain went away: stop the sidecar if it still runs, and leave a
//! release end     report even for a migration it could not report itself
//! ```
//! Only domains the configuration lists or the XML marks are touched; for any other
//! domain every event is a no-op that exits 0.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::config::{Config, ConfigError, Launcher, parse_listen};
use super::launch::{
    Sidecar, SidecarArgs, spawn_direct, start_unit, systemd_private_dir, systemd_running,
};
use super::xml::{DomainXml, MemoryError, XmlError};
use crate::daemon::report::Report;
use crate::owned_dir::DirError;

/// How long a `migrate begin` record stays valid for the `start` that follows it: a
/// migration whose preparation failed must not make a later plain start launch a sidecar.
const INCOMING_VALID: Duration = Duration::from_secs(600);

/// Longest unix socket path (`sun_path` holds 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// One hook invocation: `$1`..`$4` of libvirt's call.
#[derive(Debug, Clone)]
pub struct Event {
    /// Domain name.
    pub domain: String,
    /// Operation: `migrate`, `prepare`, `start`, `started`, `stopped`, `release`, ...
    pub op: String,
    /// Sub-operation: `begin` or `end`.
    pub sub: String,
    /// Extra argument (`-` when none).
    pub extra: String,
}

/// Why the hook fails the event (and, for migrate/prepare/start/started, the migration).
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// Configuration unusable.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// Domain XML unusable.
    #[error("{0}")]
    Xml(#[from] XmlError),
    /// RAM the sidecar cannot serve.
    #[error("{0}")]
    Memory(#[from] MemoryError),
    /// No address to listen on.
    #[error(
        "domain '{0}' is marked for the sidecar but no listen address is set: set `listen` in \
         {1} (this host's address as the source reaches it), or listen='ADDR' on the domain's \
         <sidecar xmlns='urn:postcopy-sidecar:1'/> metadata element"
    )]
    NoListen(String, String),
    /// A bad per-domain listen address.
    #[error("domain '{domain}': listen='{value}' in its metadata: {message}")]
    BadListen {
        /// Domain.
        domain: String,
        /// The attribute.
        value: String,
        /// Why.
        message: String,
    },
    /// A name we cannot turn into a file name.
    #[error("domain name {0:?} cannot name a directory")]
    BadName(String),
    /// The domain XML names a monitor socket for the sidecar somewhere else than the
    /// hook's own run directory: the hook never makes, chowns or removes anything there.
    #[error(
        "domain '{domain}' names the sidecar's monitor socket {found}, but this host's is \
         {expected} (run_dir and the domain name): refusing to prepare or use it; remove the \
         postcopy-sidecar <qemu:arg> elements from the domain (virsh edit {domain})"
    )]
    ForeignMonitor {
        /// Domain.
        domain: String,
        /// The path in the XML.
        found: String,
        /// The only path the hook accepts.
        expected: String,
    },
    /// A directory the hook keeps its files in (or QEMU's monitor directory) is unsafe.
    #[error("{0}")]
    Dir(#[from] DirError),
    /// The socket path would not fit a unix socket address.
    #[error("the monitor socket path {0} is longer than 107 bytes: choose a shorter run_dir")]
    SocketPath(String),
    /// A sidecar for this domain still runs.
    #[error(
        "a sidecar for domain '{0}' is still running (an incoming migration of it is in \
         progress; its log: {1})"
    )]
    Busy(String, String),
    /// The sidecar could not be started.
    #[error("starting the sidecar: {0}")]
    Launch(std::io::Error),
    /// The sidecar did not become ready.
    #[error("{0}")]
    NotReady(String),
    /// File system work failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HookError {
    let what = what.into();
    move |source| HookError::Io { what, source }
}

/// The hook's record of one domain, `RUN/DOMAIN/state.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct State {
    /// When `migrate begin` ran (seconds since the epoch).
    pub incoming_since: u64,
    /// The launched sidecar.
    pub sidecar: Option<Sidecar>,
    /// Its report.
    pub report: Option<PathBuf>,
    /// Set once the `started` hook saw the sidecar ready.
    pub ready: bool,
    /// The sidecar's private directory (its ready and takeover files), when the hook
    /// launched one.
    #[serde(default)]
    pub sidecar_dir: Option<PathBuf>,
}

/// Where one domain's files live.
#[derive(Debug, Clone)]
pub struct DomainPaths {
    /// `RUN/DOMAIN`: root's, for the hook's state.
    pub dir: PathBuf,
    /// `RUN/DOMAIN/state.json`.
    pub state: PathBuf,
    /// `RUN/DOMAIN/sidecar.env`: the systemd unit's arguments.
    pub env: PathBuf,
    /// `RUN/DOMAIN/qemu`: QEMU's uid and gid, mode 0770, for the monitor socket and the
    /// sidecar's ready file.
    pub qemu_dir: PathBuf,
    /// `RUN/DOMAIN/qemu/qmp.sock`: the only monitor path the hook prepares or hands the
    /// sidecar, whatever a domain XML says.
    pub qmp: PathBuf,
    /// `RUN/DOMAIN/sidecar`: the directly launched sidecar's own directory (root's, mode
    /// 0700), for its ready and takeover files. A systemd unit gets its own instead
    /// ([`systemd_private_dir`]).
    pub sidecar_dir: PathBuf,
}

/// Mode of the hook's run directory and of each domain's directory: root's, traversable
/// (QEMU and a unit's user reach the monitor directory below), listable by nobody else.
const RUN_DIR_MODE: u32 = 0o711;

/// The sidecar's ready file in its private directory.
pub fn ready_file(sidecar_dir: &Path) -> PathBuf {
    sidecar_dir.join("ready")
}

/// The sidecar's takeover file in its private directory: written once the migration
/// reached postcopy, for a restarted sidecar (`receive --recover`).
pub fn takeover_file(sidecar_dir: &Path) -> PathBuf {
    sidecar_dir.join("takeover.json")
}

impl DomainPaths {
    /// The paths of `domain` under `run_dir`.
    pub fn new(run_dir: &Path, domain: &str) -> Result<DomainPaths, HookError> {
        if domain.is_empty() || domain == "." || domain == ".." || domain.contains(['/', '\0']) {
            return Err(HookError::BadName(domain.to_string()));
        }
        let dir = run_dir.join(domain);
        let qemu_dir = dir.join("qemu");
        Ok(DomainPaths {
            state: dir.join("state.json"),
            env: dir.join("sidecar.env"),
            qmp: qemu_dir.join("qmp.sock"),
            sidecar_dir: dir.join("sidecar"),
            qemu_dir,
            dir,
        })
    }

    fn load(&self) -> Option<State> {
        let text = std::fs::read_to_string(&self.state).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Makes (or checks) the run directory and the domain's: the hook's own, not links,
    /// writable by nobody else.
    fn ensure_dirs(&self) -> Result<(), HookError> {
        if let Some(run) = self.dir.parent() {
            crate::owned_dir::ensure(run, RUN_DIR_MODE)?;
        }
        crate::owned_dir::ensure(&self.dir, RUN_DIR_MODE)?;
        Ok(())
    }

    fn save(&self, s: &State) -> Result<(), HookError> {
        self.ensure_dirs()?;
        let body = serde_json::to_vec_pretty(s).expect("state serialises");
        crate::durable::write_atomically(&self.state, &body)
            .map_err(io(format!("writing {}", self.state.display())))
    }
}

/// `YYYYMMDDTHHMMSSZ` (UTC) for `t`.
pub fn utc_stamp(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A fresh `DIR/DOMAIN-STAMP.json` (with `-2`, `-3`, ... on a clash).
fn report_path(dir: &Path, domain: &str) -> PathBuf {
    let stamp = utc_stamp(SystemTime::now());
    let mut p = dir.join(format!("{domain}-{stamp}.json"));
    let mut n = 2;
    while p.exists() {
        p = dir.join(format!("{domain}-{stamp}-{n}.json"));
        n += 1;
    }
    p
}

/// Writes a failure report for a migration the sidecar could not report itself. Whatever
/// is at `path` already (the sidecar's own report, or a link planted there) is kept.
fn write_failure_report(path: &Path, error: String) -> Result<(), HookError> {
    let r = Report {
        outcome: "failed".into(),
        error: Some(error),
        ..Default::default()
    };
    let json = serde_json::to_vec_pretty(&r).expect("report serialises");
    match crate::durable::write_atomically_new(path, &json) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        other => other.map_err(io(format!("writing {}", path.display()))),
    }
}

/// What the hook needs besides the event: its configuration and its own binary.
pub struct Hook {
    /// The configuration file's path (named in messages).
    pub config_path: PathBuf,
    /// The configuration.
    pub config: Config,
    /// The sidecar binary.
    pub binary: PathBuf,
}

impl Hook {
    fn log(&self, ev: &Event, what: &str) {
        let line = format!(
            "{} {} {} {} {}: {what}\n",
            utc_stamp(SystemTime::now()),
            ev.domain,
            ev.op,
            ev.sub,
            ev.extra
        );
        if crate::owned_dir::ensure(&self.config.run_dir, RUN_DIR_MODE).is_err() {
            return;
        }
        if let Ok(mut f) =
            crate::durable::open_append_no_follow(&self.config.run_dir.join("hook.log"))
        {
            let _ = f.write_all(line.as_bytes());
        }
    }

    /// Whether the configuration or the XML marks the domain, and its listen address.
    fn carried(&self, xml: &DomainXml, domain: &str) -> Option<Option<String>> {
        let marker = xml.marker();
        let listed = self.config.domains.iter().any(|d| d == domain);
        match marker {
            Some(m) => Some(m.listen.or_else(|| self.config.listen.clone())),
            None if listed => Some(self.config.listen.clone()),
            None => None,
        }
    }

    /// Handles one event; for `migrate` the edited XML (or nothing: unchanged) goes to `out`.
    pub fn handle(&self, ev: &Event, xml_text: &str, out: &mut dyn Write) -> Result<(), HookError> {
        match (ev.op.as_str(), ev.sub.as_str()) {
            ("migrate", "begin") => self.migrate(ev, xml_text, out),
            ("start", "begin") => self.start(ev, xml_text),
            ("started", "begin") => self.started(ev),
            ("stopped", "end") | ("release", "end") => self.stopped(ev),
            _ => Ok(()),
        }
    }

    fn migrate(&self, ev: &Event, xml_text: &str, out: &mut dyn Write) -> Result<(), HookError> {
        let xml = DomainXml::parse(xml_text)?;
        let Some(listen) = self.carried(&xml, &ev.domain) else {
            return Ok(());
        };
        xml.check_memory()?;
        let listen = listen.ok_or_else(|| {
            HookError::NoListen(ev.domain.clone(), self.config_path.display().to_string())
        })?;
        parse_listen(&listen).map_err(|message| HookError::BadListen {
            domain: ev.domain.clone(),
            value: listen.clone(),
            message,
        })?;
        let paths = DomainPaths::new(&self.config.run_dir, &ev.domain)?;
        if paths.qmp.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(HookError::SocketPath(paths.qmp.display().to_string()));
        }
        if let Some(old) = paths.load() {
            // A live sidecar is another incoming migration of this domain, still running
            // (libvirt refuses the second one only after this hook): leave it alone.
            if let Some(s) = old.sidecar.as_ref().filter(|s| s.alive()) {
                return Err(HookError::Busy(ev.domain.clone(), s.log_hint()));
            }
            // One that ended without a report still gets one.
            self.retire(&old, "superseded by a new incoming migration of the domain");
        }
        paths.save(&State {
            incoming_since: now_secs(),
            ..State::default()
        })?;
        let edited = xml.with_monitor(&paths.qmp);
        if edited != xml_text {
            out.write_all(edited.as_bytes())
                .map_err(io("writing the domain XML to libvirt"))?;
        }
        self.log(
            ev,
            &format!("incoming migration; monitor {}", paths.qmp.display()),
        );
        Ok(())
    }

    fn start(&self, ev: &Event, xml_text: &str) -> Result<(), HookError> {
        let xml = DomainXml::parse(xml_text)?;
        let Some(found) = xml.monitor_path() else {
            return Ok(());
        };
        // The monitor's path comes from the run directory and the domain's name alone; a
        // path from the XML is only compared with it, never prepared or used.
        let paths = DomainPaths::new(&self.config.run_dir, &ev.domain)?;
        if found != paths.qmp {
            return Err(HookError::ForeignMonitor {
                domain: ev.domain.clone(),
                found: found.display().to_string(),
                expected: paths.qmp.display().to_string(),
            });
        }
        // Whatever launches (or not), QEMU must be able to create its monitor socket.
        paths.ensure_dirs()?;
        let qmp_uid = make_qemu_dir(&paths.qemu_dir, xml.dac_label())?;
        let _ = std::fs::remove_file(&paths.qmp);
        let Some(listen) = self.carried(&xml, &ev.domain) else {
            return Ok(());
        };
        let Some(mut state) = paths.load() else {
            return Ok(());
        };
        let fresh = now_secs().saturating_sub(state.incoming_since) < INCOMING_VALID.as_secs();
        if state.sidecar.is_some() || !fresh {
            // Not the start of the incoming migration `migrate begin` recorded.
            return Ok(());
        }
        let Some(listen) = listen else {
            return Err(HookError::NoListen(
                ev.domain.clone(),
                self.config_path.display().to_string(),
            ));
        };
        let systemd = match self.config.launcher {
            Launcher::Auto => systemd_running(),
            Launcher::Direct => false,
            Launcher::Systemd => true,
        };
        // The sidecar's files go to a directory of its own, 0700: the unit's (systemd
        // makes it for the unit's user) or, launched directly (as root), one the hook
        // makes. Its report directory: the unit's StateDirectory=, or the hook's own.
        let sidecar_dir = if systemd {
            systemd_private_dir(&ev.domain)
        } else {
            crate::owned_dir::ensure(&paths.sidecar_dir, 0o700)?;
            crate::owned_dir::ensure(&self.config.report_dir, 0o700)?;
            paths.sidecar_dir.clone()
        };
        let ready = ready_file(&sidecar_dir);
        let _ = std::fs::remove_file(&ready);
        if systemd {
            std::fs::create_dir_all(&self.config.report_dir)
                .map_err(io(format!("creating {}", self.config.report_dir.display())))?;
        }
        let report = report_path(&self.config.report_dir, &ev.domain);
        let args = SidecarArgs {
            listen,
            qmp: paths.qmp.clone(),
            qmp_uid,
            ready,
            report: report.clone(),
            attach_timeout: self.config.attach_timeout,
            state_file: takeover_file(&sidecar_dir),
            on_cut: self.config.on_cut.clone(),
            silence: self.config.silence,
            away_timeout: self.config.away_timeout,
            tls_creds: self.config.tls_creds.clone(),
        };
        let sidecar = if systemd {
            start_unit(
                &ev.domain,
                &paths.env,
                &args.env_file(&self.config.log_filter),
            )
        } else {
            spawn_direct(
                &self.binary,
                &args,
                &report.with_extension("log"),
                &self.config.log_filter,
            )
        };
        let sidecar = match sidecar {
            Ok(s) => s,
            Err(e) => {
                let _ = write_failure_report(&report, format!("the sidecar did not start: {e}"));
                return Err(HookError::Launch(e));
            }
        };
        self.log(
            ev,
            &format!("launched {sidecar:?}, report {}", report.display()),
        );
        state.sidecar = Some(sidecar);
        state.report = Some(report);
        state.sidecar_dir = Some(sidecar_dir);
        paths.save(&state)
    }

    fn started(&self, ev: &Event) -> Result<(), HookError> {
        let Ok(paths) = DomainPaths::new(&self.config.run_dir, &ev.domain) else {
            return Ok(());
        };
        let Some(mut state) = paths.load() else {
            return Ok(());
        };
        let Some(sidecar) = state.sidecar.clone() else {
            return Ok(());
        };
        if state.ready {
            return Ok(());
        }
        let ready = ready_file(state.sidecar_dir.as_ref().unwrap_or(&paths.sidecar_dir));
        match wait_ready(&ready, &sidecar, self.config.ready_timeout()) {
            Ok(listen) => {
                self.log(ev, &format!("sidecar ready, listening on {listen}"));
                state.ready = true;
                paths.save(&state)
            }
            Err(why) => {
                let _ = sidecar.stop();
                let msg = format!(
                    "the sidecar for domain '{}' did not become ready: {why} (sidecar log: {})",
                    ev.domain,
                    sidecar.log_hint()
                );
                if let Some(r) = &state.report {
                    let _ = write_failure_report(r, msg.clone());
                }
                self.log(ev, &msg);
                Err(HookError::NotReady(msg))
            }
        }
    }

    fn stopped(&self, ev: &Event) -> Result<(), HookError> {
        let Ok(paths) = DomainPaths::new(&self.config.run_dir, &ev.domain) else {
            return Ok(());
        };
        let state = paths.load();
        if let Some(state) = state.clone() {
            self.retire(
                &state,
                &format!("the domain went away (libvirt: {} {})", ev.op, ev.sub),
            );
            if ev.op == "stopped" {
                paths.save(&State {
                    sidecar: None,
                    ..state
                })?;
            }
        }
        // The domain object is gone: its monitor directory and the hook's record go too
        // (libvirt lets no other domain of that name exist meanwhile).
        if ev.op == "release" {
            // A unit's private directory outlives the unit (for a `receive --recover`).
            if let Some(d) = state.and_then(|s| s.sidecar_dir)
                && !d.starts_with(&paths.dir)
                && d.exists()
            {
                std::fs::remove_dir_all(&d).map_err(io(format!("removing {}", d.display())))?;
            }
            if paths.dir.exists() {
                std::fs::remove_dir_all(&paths.dir)
                    .map_err(io(format!("removing {}", paths.dir.display())))?;
                self.log(ev, "cleaned up");
            }
        }
        Ok(())
    }

    /// Stops the state's sidecar if it still runs, and makes sure its migration has a
    /// report.
    fn retire(&self, state: &State, why: &str) {
        let Some(sidecar) = &state.sidecar else {
            return;
        };
        let was_alive = sidecar.alive();
        let _ = sidecar.stop();
        if let Some(r) = &state.report {
            let detail = sidecar
                .last_error()
                .map(|e| format!("; the sidecar said: {e}"))
                .unwrap_or_default();
            let msg = if was_alive {
                format!("stopped before the migration ended: {why}{detail}")
            } else {
                format!("the sidecar ended without a report{detail}")
            };
            let _ = write_failure_report(r, msg);
        }
    }
}

/// Creates QEMU's monitor directory in the domain's (checked) directory, owned by QEMU's
/// uid and gid (`dac`) with mode 0770, so QEMU can create its socket and the sidecar (root,
/// or a member of QEMU's group) can reach it. Returns its owner: the uid the process
/// behind the socket must have (`--qmp-uid`).
fn make_qemu_dir(dir: &Path, dac: Option<(u32, u32)>) -> Result<u32, HookError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            return Err(io(format!("creating {}", dir.display()))(e));
        }
        _ => {}
    }
    // Its parent is the hook's own: only a link made by root could be here, but a
    // directory is what is chowned, never what a link points to.
    let meta =
        std::fs::symlink_metadata(dir).map_err(io(format!("examining {}", dir.display())))?;
    if meta.file_type().is_symlink() {
        return Err(DirError::Symlink {
            path: dir.to_path_buf(),
        }
        .into());
    }
    if !meta.is_dir() {
        return Err(DirError::NotADirectory {
            path: dir.to_path_buf(),
        }
        .into());
    }
    if let Some((uid, gid)) = dac {
        std::os::unix::fs::lchown(dir, Some(uid), Some(gid))
            .map_err(io(format!("chown {uid}:{gid} {}", dir.display())))?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o770))
        .map_err(io(format!("chmod 0770 {}", dir.display())))?;
    Ok(dac.map_or(meta.uid(), |(uid, _)| uid))
}

/// Waits until the sidecar writes its ready file (returns its listen address), it dies,
/// or `timeout` passes.
fn wait_ready(ready: &Path, sidecar: &Sidecar, timeout: Duration) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(text) = std::fs::read_to_string(ready)
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
        {
            return Ok(v["listen"].as_str().unwrap_or("?").to_string());
        }
        if !sidecar.alive() {
            return Err(match sidecar.last_error() {
                Some(e) => format!("it exited: {e}"),
                None => "it exited".to_string(),
            });
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "it did not listen within {:.0} s (ready_timeout)",
                timeout.as_secs_f64()
            ));
        }
        // The sidecar is another process and writes a file: look again shortly.
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_are_utc_civil_time() {
        let t = |s: u64| utc_stamp(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(t(0), "19700101T000000Z");
        assert_eq!(t(951_782_400), "20000229T000000Z");
        assert_eq!(t(1_798_832_604), "20270101T194324Z");
        assert_eq!(t(4_102_444_799), "20991231T235959Z");
    }

    #[test]
    fn domain_names_that_cannot_name_a_directory_are_refused() {
        for bad in ["", ".", "..", "a/b"] {
            assert!(matches!(
                DomainPaths::new(Path::new("/run/x"), bad),
                Err(HookError::BadName(_))
            ));
        }
        let p = DomainPaths::new(Path::new("/run/x"), "vm 1").unwrap();
        assert_eq!(p.qmp, Path::new("/run/x/vm 1/qemu/qmp.sock"));
    }

    fn hook(dir: &Path, cfg: &str) -> Hook {
        let text = format!(
            "run_dir = \"{}\"\nreport_dir = \"{}\"\nlauncher = \"direct\"\n{cfg}",
            dir.join("run").display(),
            dir.join("reports").display()
        );
        Hook {
            config_path: dir.join("c.toml"),
            config: Config::parse(&text, &dir.join("c.toml")).unwrap(),
            binary: PathBuf::from("/bin/false"),
        }
    }

    fn ev(domain: &str, op: &str, sub: &str) -> Event {
        Event {
            domain: domain.into(),
            op: op.into(),
            sub: sub.into(),
            extra: "-".into(),
        }
    }

    const PLAIN: &str = "<domain type='qemu'><name>vm</name></domain>";
    const MEMFD: &str = "<domain type='qemu'><name>vm</name><memoryBacking>\
        <source type='memfd'/><access mode='shared'/></memoryBacking></domain>";

    #[test]
    fn unmarked_domains_are_left_alone() {
        let d = tempfile::tempdir().unwrap();
        let h = hook(d.path(), "listen = \"192.0.2.7\"\n");
        let mut out = Vec::new();
        for (op, sub) in [
            ("migrate", "begin"),
            ("start", "begin"),
            ("started", "begin"),
        ] {
            h.handle(&ev("vm", op, sub), PLAIN, &mut out).unwrap();
        }
        assert!(out.is_empty());
        assert!(!d.path().join("run").join("vm").exists());
    }

    #[test]
    fn migrate_refuses_private_ram_and_a_missing_listen_address() {
        let d = tempfile::tempdir().unwrap();
        let h = hook(d.path(), "domains = [\"vm\"]\nlisten = \"192.0.2.7\"\n");
        let e = h
            .handle(&ev("vm", "migrate", "begin"), PLAIN, &mut Vec::new())
            .unwrap_err();
        assert!(matches!(e, HookError::Memory(_)), "{e}");
        let h = hook(d.path(), "domains = [\"vm\"]\n");
        let e = h
            .handle(&ev("vm", "migrate", "begin"), MEMFD, &mut Vec::new())
            .unwrap_err();
        assert!(e.to_string().contains("set `listen` in"), "{e}");
    }

    #[test]
    fn migrate_adds_the_monitor_and_records_the_incoming_migration() {
        let d = tempfile::tempdir().unwrap();
        let h = hook(d.path(), "domains = [\"vm\"]\nlisten = \"192.0.2.7\"\n");
        let mut out = Vec::new();
        h.handle(&ev("vm", "migrate", "begin"), MEMFD, &mut out)
            .unwrap();
        let edited = String::from_utf8(out).unwrap();
        let x = DomainXml::parse(&edited).unwrap();
        let paths = DomainPaths::new(&d.path().join("run"), "vm").unwrap();
        assert_eq!(x.monitor_path(), Some(paths.qmp.clone()));
        let s = paths.load().unwrap();
        assert!(s.sidecar.is_none() && s.incoming_since > 0);
        // Already there: the filter leaves the XML unchanged (no output).
        let mut again = Vec::new();
        h.handle(&ev("vm", "migrate", "begin"), &edited, &mut again)
            .unwrap();
        assert!(again.is_empty());
    }

    /// MEMFD with the sidecar's monitor at `path` and QEMU's DAC label, as libvirt hands
    /// it to the `start` hook.
    fn started_xml(path: &Path) -> String {
        let x = DomainXml::parse(MEMFD).unwrap().with_monitor(path);
        x.replace(
            "</domain>",
            "<seclabel type='dynamic' model='dac' relabel='yes'>\
             <label>+64055:+107</label></seclabel></domain>",
        )
    }

    #[test]
    fn a_monitor_path_outside_the_run_directory_is_refused_and_left_untouched() {
        let d = tempfile::tempdir().unwrap();
        let h = hook(d.path(), "domains = [\"vm\"]\nlisten = \"192.0.2.7\"\n");
        h.handle(&ev("vm", "migrate", "begin"), MEMFD, &mut Vec::new())
            .unwrap();
        // An XML naming a socket elsewhere: e.g. in a directory the hook would chown to
        // QEMU, or a file the hook would remove as a stale socket.
        let elsewhere = d.path().join("etc");
        std::fs::create_dir(&elsewhere).unwrap();
        let victim = elsewhere.join("qmp.sock");
        std::fs::write(&victim, b"keep").unwrap();
        let e = h
            .handle(
                &ev("vm", "start", "begin"),
                &started_xml(&victim),
                &mut Vec::new(),
            )
            .unwrap_err();
        let HookError::ForeignMonitor {
            domain,
            found,
            expected,
        } = &e
        else {
            panic!("expected ForeignMonitor, got {e}");
        };
        assert_eq!(domain, "vm");
        assert_eq!(found, &victim.display().to_string());
        let paths = DomainPaths::new(&d.path().join("run"), "vm").unwrap();
        assert_eq!(expected, &paths.qmp.display().to_string());
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            std::fs::metadata(&elsewhere).unwrap().uid(),
            0,
            "not chowned"
        );
        assert!(!paths.qemu_dir.exists(), "nothing prepared");
        // A monitor under another domain's name in the same run directory is foreign too.
        let other = DomainPaths::new(&d.path().join("run"), "other").unwrap();
        let e = h
            .handle(
                &ev("vm", "start", "begin"),
                &started_xml(&other.qmp),
                &mut Vec::new(),
            )
            .unwrap_err();
        assert!(matches!(e, HookError::ForeignMonitor { .. }), "{e}");
        assert!(!other.dir.exists());
        // Its own path passes: QEMU's directory, QEMU's uid.
        h.handle(
            &ev("vm", "start", "begin"),
            &started_xml(&paths.qmp),
            &mut Vec::new(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let m = std::fs::metadata(&paths.qemu_dir).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o777), (64055, 107, 0o770));
    }

    #[test]
    fn an_unsafe_run_directory_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let h = hook(d.path(), "domains = [\"vm\"]\nlisten = \"192.0.2.7\"\n");
        let run = d.path().join("run");
        std::fs::create_dir(&run).unwrap();
        let migrate = || {
            h.handle(&ev("vm", "migrate", "begin"), MEMFD, &mut Vec::new())
                .unwrap_err()
        };
        // World-writable: anyone could plant the domain's directory.
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = migrate();
        assert!(
            matches!(e, HookError::Dir(DirError::Writable { mode: 0o777, .. })),
            "{e}"
        );
        // Another user's.
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::chown(&run, Some(65534), None).expect("chown (tests run as root)");
        let e = migrate();
        assert!(
            matches!(
                e,
                HookError::Dir(DirError::ForeignOwner { found: 65534, .. })
            ),
            "{e}"
        );
        // A link to somewhere else.
        std::fs::remove_dir(&run).unwrap();
        let real = d.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, &run).unwrap();
        let e = migrate();
        assert!(matches!(e, HookError::Dir(DirError::Symlink { .. })), "{e}");
        assert_eq!(
            std::fs::read_dir(&real).unwrap().count(),
            0,
            "nothing written"
        );
        // A domain directory another user owns, in a sound run directory.
        std::fs::remove_file(&run).unwrap();
        std::fs::create_dir(&run).unwrap();
        std::fs::create_dir(run.join("vm")).unwrap();
        std::os::unix::fs::chown(run.join("vm"), Some(65534), None).unwrap();
        let e = migrate();
        assert!(
            matches!(
                e,
                HookError::Dir(DirError::ForeignOwner { found: 65534, .. })
            ),
            "{e}"
        );
        assert!(!run.join("vm/state.json").exists());
    }

    #[test]
    fn links_at_the_state_and_report_names_are_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        let h = hook(d.path(), "domains = [\"vm\"]\nlisten = \"192.0.2.7\"\n");
        let paths = DomainPaths::new(&d.path().join("run"), "vm").unwrap();
        std::fs::create_dir_all(&paths.dir).unwrap();
        std::os::unix::fs::symlink(&victim, &paths.state).unwrap();
        h.handle(&ev("vm", "migrate", "begin"), MEMFD, &mut Vec::new())
            .unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        let meta = std::fs::symlink_metadata(&paths.state).unwrap();
        assert!(
            meta.is_file(),
            "the link was replaced by the hook's own record"
        );
        assert!(paths.load().unwrap().incoming_since > 0);
        // A failure report never writes through a link planted at the report's name.
        let report = d.path().join("vm-20270101T000000Z.json");
        std::os::unix::fs::symlink(&victim, &report).unwrap();
        write_failure_report(&report, "x".into()).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert!(
            std::fs::symlink_metadata(&report)
                .unwrap()
                .file_type()
                .is_symlink()
        );
    }

    #[test]
    fn a_direct_sidecar_gets_a_private_directory_and_qemus_uid() {
        let d = tempfile::tempdir().unwrap();
        let mut h = hook(d.path(), "domains = [\"vm\"]\nlisten = \"192.0.2.7\"\n");
        // A stand-in that records its arguments.
        let args = d.path().join("args");
        h.binary = fake_binary(
            d.path(),
            &format!("printf '%s\\n' \"$@\" > {}\n", args.display()),
        );
        let paths = DomainPaths::new(&d.path().join("run"), "vm").unwrap();
        h.handle(&ev("vm", "migrate", "begin"), MEMFD, &mut Vec::new())
            .unwrap();
        h.handle(
            &ev("vm", "start", "begin"),
            &started_xml(&paths.qmp),
            &mut Vec::new(),
        )
        .unwrap();
        use std::os::unix::fs::MetadataExt;
        for (dir, mode) in [
            (&paths.sidecar_dir, 0o700),
            (&d.path().join("reports"), 0o700),
        ] {
            let m = std::fs::symlink_metadata(dir).unwrap();
            assert_eq!((m.uid(), m.mode() & 0o777), (0, mode), "{}", dir.display());
        }
        let state = paths.load().unwrap();
        assert_eq!(
            state.sidecar_dir.as_deref(),
            Some(paths.sidecar_dir.as_path())
        );
        let sidecar = state.sidecar.unwrap();
        let argv = wait_for_file(&args, &sidecar);
        let after = |flag: &str| {
            let i = argv.iter().position(|a| a == flag).unwrap();
            argv[i + 1].clone()
        };
        assert_eq!(after("--qmp"), paths.qmp.display().to_string());
        assert_eq!(after("--qmp-uid"), "64055");
        assert_eq!(
            after("--ready-file"),
            ready_file(&paths.sidecar_dir).display().to_string()
        );
        assert_eq!(
            after("--state-file"),
            takeover_file(&paths.sidecar_dir).display().to_string()
        );
    }

    /// The lines of `file` once the (short-lived) fake sidecar that writes it has exited.
    fn wait_for_file(file: &Path, sidecar: &Sidecar) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while sidecar.alive() {
            assert!(Instant::now() < deadline, "the fake sidecar did not exit");
            // Not our child (spawned detached): poll its /proc entry.
            std::thread::sleep(Duration::from_millis(10));
        }
        std::fs::read_to_string(file)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// An executable shell script in `dir` with `body`.
    fn fake_binary(dir: &Path, body: &str) -> PathBuf {
        let fake = dir.join("fake-sidecar");
        std::fs::write(&fake, format!("#!/bin/sh\n{body}")).unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        // Another test thread's fork may still hold our write descriptor (ETXTBSY) for a
        // moment, until its child execs.
        for _ in 0..500 {
            match std::process::Command::new(&fake).arg("--probe").output() {
                Err(e) if e.raw_os_error() == Some(nix::libc::ETXTBSY) => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => break,
            }
        }
        fake
    }

    #[test]
    fn a_running_sidecar_blocks_a_second_incoming_migration_until_release() {
        let d = tempfile::tempdir().unwrap();
        let mut h = hook(d.path(), "domains = [\"vm\"]\nlisten = \"192.0.2.7\"\n");
        h.binary = fake_binary(d.path(), "[ \"$1\" = --probe ] && exit 0\nexec sleep 30\n");
        let mut out = Vec::new();
        h.handle(&ev("vm", "migrate", "begin"), MEMFD, &mut out)
            .unwrap();
        let edited = String::from_utf8(out).unwrap();
        h.handle(&ev("vm", "start", "begin"), &edited, &mut Vec::new())
            .unwrap();
        let paths = DomainPaths::new(&d.path().join("run"), "vm").unwrap();
        let sidecar = paths.load().unwrap().sidecar.unwrap();
        assert!(sidecar.alive());
        let e = h
            .handle(&ev("vm", "migrate", "begin"), MEMFD, &mut Vec::new())
            .unwrap_err();
        assert!(matches!(e, HookError::Busy(..)), "{e}");
        assert!(
            sidecar.alive(),
            "the running migration's sidecar is left alone"
        );
        h.handle(&ev("vm", "release", "end"), &edited, &mut Vec::new())
            .unwrap();
        assert!(!sidecar.alive(), "release stops it");
        let r: Vec<_> = std::fs::read_dir(d.path().join("reports"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&r[0]).unwrap()).unwrap();
        assert!(
            r["error"]
                .as_str()
                .unwrap()
                .starts_with("stopped before the migration ended: the domain went away"),
            "{r}"
        );
    }

    #[test]
    fn a_sidecar_that_exits_fails_started_with_its_error_and_leaves_a_report() {
        let d = tempfile::tempdir().unwrap();
        // A stand-in for the binary that fails the way `receive` does.
        let fake = fake_binary(
            d.path(),
            "echo 'error: cannot listen on 192.0.2.7:1' >&2\nexit 1\n",
        );
        let mut h = hook(d.path(), "domains = [\"vm\"]\nlisten = \"192.0.2.7\"\n");
        h.binary = fake;
        let mut out = Vec::new();
        h.handle(&ev("vm", "migrate", "begin"), MEMFD, &mut out)
            .unwrap();
        let edited = String::from_utf8(out).unwrap();
        h.handle(&ev("vm", "start", "begin"), &edited, &mut Vec::new())
            .unwrap();
        let e = h
            .handle(&ev("vm", "started", "begin"), &edited, &mut Vec::new())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("did not become ready: it exited: cannot listen on 192.0.2.7:1"),
            "{e}"
        );
        let reports: Vec<_> = std::fs::read_dir(d.path().join("reports"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        assert_eq!(reports.len(), 1);
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&reports[0]).unwrap()).unwrap();
        assert_eq!(r["outcome"], "failed");
        assert!(r["error"].as_str().unwrap().contains("cannot listen"));
        h.handle(&ev("vm", "release", "end"), &edited, &mut Vec::new())
            .unwrap();
        assert!(!d.path().join("run").join("vm").exists());
    }
}
