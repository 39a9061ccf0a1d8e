//! A libvirt "host" on this machine: Debian's libvirtd and virtlogd, started by the test in
//! a mount namespace of their own, so that two of them are two hosts to libvirt.
//!
//! Each host has private copies of `/etc/libvirt` (with its own `host_uuid`: libvirt
//! refuses to migrate to its own UUID) and of libvirt's run, state, cache and log
//! directories, bind-mounted over the real paths inside its namespace only. The host's
//! config and hooks therefore never touch the machine's `/etc/libvirt`, and a libvirtd the
//! machine runs itself is neither seen nor disturbed. Everything started here is stopped
//! by pid when the host is dropped.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use postcopy_sidecar::deploy::libvirt::hook::State;

/// Who QEMU runs as under this host's libvirtd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QemuUser {
    /// libvirt's default (Debian: libvirt-qemu).
    Default,
    /// root, through this host's private qemu.conf: postcopy needs userfaultfd, which an
    /// unprivileged QEMU only gets with the host-wide `vm.unprivileged_userfaultfd=1`.
    Root,
}

/// For hosts whose QEMU runs as libvirt-qemu: libvirtd probes QEMU with CAP_DAC_OVERRIDE,
/// so the probe sees KVM whenever /dev/kvm exists, but later finds that QEMU's user cannot
/// open it, calls the probe outdated and probes again at every lookup (a minute per domain
/// start). Debian's udev rule makes /dev/kvm root:kvm 0660 and libvirt-qemu is in kvm; on
/// a machine where /dev/kvm is root's alone, give this namespace that view of it. (Guests
/// here are TCG either way.)
const KVM_VIEW: &str = r#"if [ -c /dev/kvm ] && ! runuser -u libvirt-qemu -- test -r /dev/kvm -a -w /dev/kvm; then
	node='@ROOT@/kvm-node'
	rm -f "$node"
	mknod "$node" c "0x$(stat -c %t /dev/kvm)" "0x$(stat -c %T /dev/kvm)"
	chown root:kvm "$node"
	chmod 0660 "$node"
	mount --bind "$node" /dev/kvm
fi
"#;

/// One libvirtd + virtlogd pair in its own mount namespace.
pub struct LibvirtHost {
    /// Short name, for messages.
    pub name: String,
    /// Its directory.
    pub root: PathBuf,
    /// Its SYSCONFDIR: `sysconf/libvirt` is its `/etc/libvirt`.
    pub sysconf: PathBuf,
    /// `qemu+unix:///system?socket=...`.
    pub uri: String,
    user: QemuUser,
    pids: Vec<(String, PathBuf)>,
}

/// libvirtd probes each QEMU binary (tens of seconds under TCG on a busy machine) and
/// caches the result under /var/cache/libvirt/qemu/capabilities; every test host starts
/// with an empty cache, so the results are kept across hosts and runs here (one set per
/// QEMU user: whether KVM is usable, and so the result, depends on it). libvirtd
/// re-probes any entry it finds stale.
fn shared_capabilities(user: QemuUser) -> PathBuf {
    let tag = match user {
        QemuUser::Default => "default",
        QemuUser::Root => "root",
    };
    postcopy_sidecar::lab::cache_dir().join(format!("libvirt-capabilities-{tag}"))
}

/// Copies the `*.xml` files of `from` into `to`, each through a temporary name.
fn copy_xml_files(from: &Path, to: &Path) {
    let Ok(rd) = std::fs::read_dir(from) else {
        return;
    };
    let _ = std::fs::create_dir_all(to);
    for e in rd.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "xml") {
            let dst = to.join(e.file_name());
            let tmp = to.join(format!(".{}.tmp", e.file_name().to_string_lossy()));
            if std::fs::copy(&p, &tmp).is_ok() {
                let _ = std::fs::rename(&tmp, &dst);
            }
        }
    }
}

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {:.0}s waiting for {what}",
            timeout.as_secs_f64()
        );
        // Waiting on other processes (libvirtd, QEMU, the guest) that signal nothing we can
        // block on: look again shortly.
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn live(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rfind(')')
                .map(|i| s[i + 1..].trim_start().starts_with('Z'))
        })
        == Some(false)
}

fn read_pid(p: &Path) -> Option<i32> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

/// Sends SIGTERM, waits up to `grace`, then SIGKILL.
fn stop_pid(pid: i32, grace: Duration) {
    use nix::sys::signal::{Signal, kill};
    let p = nix::unistd::Pid::from_raw(pid);
    let _ = kill(p, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while live(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if live(pid) {
        let _ = kill(p, Signal::SIGKILL);
    }
}

fn copy_dir(from: &Path, to: &Path) {
    let st = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("cp");
    assert!(st.success(), "cp -a {} {}", from.display(), to.display());
}

impl LibvirtHost {
    /// Lays out a host in `root` (its own /etc/libvirt copy and empty state directories);
    /// nothing runs yet, so hooks can be installed before [`LibvirtHost::start`].
    pub fn prepare(root: &Path, name: &str, host_uuid: &str, user: QemuUser) -> LibvirtHost {
        assert!(
            Path::new("/usr/sbin/libvirtd").exists(),
            "libvirtd is not installed: run scripts/setup.sh"
        );
        std::fs::create_dir_all(root).unwrap();
        let sysconf = root.join("sysconf");
        std::fs::create_dir_all(&sysconf).unwrap();
        let etc = sysconf.join("libvirt");
        copy_dir(Path::new("/etc/libvirt"), &etc);
        // Hermetic: no hooks of the machine's own, and no autostarted network (both hosts
        // share the network namespace; a bridge each would clash and change the machine).
        let _ = std::fs::remove_dir_all(etc.join("hooks"));
        std::fs::create_dir_all(etc.join("hooks")).unwrap();
        let _ = std::fs::remove_dir_all(etc.join("qemu/networks/autostart"));
        let append = |file: &str, text: &str| {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(etc.join(file))
                .unwrap();
            f.write_all(text.as_bytes()).unwrap();
        };
        append(
            "libvirtd.conf",
            &format!("\n# test host {name}\nhost_uuid = \"{host_uuid}\"\n"),
        );
        if std::env::var("LIBVIRT_DEBUG").is_ok() {
            append(
                "libvirtd.conf",
                &format!(
                    "log_filters=\"1:qemu.qemu_migration 1:qemu.qemu_process 1:qemu.qemu_domainjob 4:*\"\nlog_outputs=\"1:file:{}/libvirtd.log\"\n",
                    root.display()
                ),
            );
        }
        let mut qemu_conf = String::from(
            "\n# test host: AppArmor/SELinux profiles would not know the test's paths\n\
             security_driver = \"none\"\n",
        );
        if user == QemuUser::Root {
            qemu_conf.push_str("user = \"root\"\ngroup = \"root\"\n");
        }
        append("qemu.conf", &qemu_conf);
        for d in ["run", "lib", "cache", "log"] {
            std::fs::create_dir_all(root.join(d).join("qemu")).unwrap();
        }
        let socket = root.join("run").join("libvirt-sock");
        let host = LibvirtHost {
            name: name.to_string(),
            root: root.to_path_buf(),
            sysconf,
            uri: format!("qemu+unix:///system?socket={}", socket.display()),
            user,
            pids: Vec::new(),
        };
        copy_xml_files(&shared_capabilities(user), &host.capabilities());
        host
    }

    fn capabilities(&self) -> PathBuf {
        self.root.join("cache/qemu/capabilities")
    }

    /// Takes `other`'s QEMU capabilities (probed once it started a domain), so this host
    /// need not probe again; call before [`LibvirtHost::start`].
    pub fn seed_capabilities_from(&self, other: &LibvirtHost) {
        assert_eq!(self.user, other.user, "capabilities depend on QEMU's user");
        copy_xml_files(&other.capabilities(), &self.capabilities());
    }

    /// Starts virtlogd and libvirtd in a new mount namespace and waits until libvirtd
    /// answers.
    pub fn start(&mut self) {
        let r = &self.root;
        let script = format!(
            r#"set -eu
# The mount points exist on any libvirt host; create them in case this one never ran libvirt.
mkdir -p /run/libvirt /var/lib/libvirt /var/cache/libvirt /var/log/libvirt
mount --bind '{r}/run' /run/libvirt
mount --bind '{r}/lib' /var/lib/libvirt
mount --bind '{r}/cache' /var/cache/libvirt
mount --bind '{r}/log' /var/log/libvirt
mount --bind '{r}/sysconf/libvirt' /etc/libvirt
# On a systemd host libvirtd would register both hosts' VMs with the one machined (and
# clash on names): hide systemd and the system bus, so each host stays self-contained.
for d in /run/systemd /run/dbus; do
	if [ -d "$d" ]; then mount -t tmpfs tmpfs "$d"; fi
done
{kvm}virtlogd -d -p '{r}/virtlogd.pid'
libvirtd -d -p '{r}/libvirtd.pid'
"#,
            r = r.display(),
            kvm = if self.user == QemuUser::Default {
                KVM_VIEW.replace("@ROOT@", &r.display().to_string())
            } else {
                String::new()
            },
        );
        let out = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", &script])
            .output()
            .expect("unshare");
        assert!(
            out.status.success(),
            "starting libvirt host {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        self.pids = vec![
            ("libvirtd".into(), r.join("libvirtd.pid")),
            ("virtlogd".into(), r.join("virtlogd.pid")),
        ];
        wait_for(
            &format!("libvirtd of host {} to answer", self.name),
            Duration::from_secs(60),
            || self.virsh(&["version"]).status.success().then_some(()),
        );
    }

    /// Runs `virsh -c URI ARGS`.
    pub fn virsh(&self, args: &[&str]) -> Output {
        Command::new("virsh")
            .arg("-c")
            .arg(&self.uri)
            .args(args)
            .output()
            .expect("virsh")
    }

    /// Runs virsh and returns its stdout; panics with its stderr on failure.
    pub fn virsh_ok(&self, args: &[&str]) -> String {
        let o = self.virsh(args);
        assert!(
            o.status.success(),
            "virsh {} on host {}: {}",
            args.join(" "),
            self.name,
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Names of the running domains.
    pub fn running(&self) -> Vec<String> {
        self.virsh_ok(&["list", "--name"])
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// The pid of a running domain's QEMU.
    pub fn qemu_pid(&self, domain: &str) -> Option<i32> {
        read_pid(&self.root.join("run/qemu").join(format!("{domain}.pid")))
    }

    /// The hook's `run_dir` in this host's configuration.
    pub fn sidecar_run_dir(&self) -> PathBuf {
        self.root.join("sc-run")
    }

    /// The hook's `report_dir` in this host's configuration.
    pub fn report_dir(&self) -> PathBuf {
        self.root.join("reports")
    }

    /// Writes the hook's configuration (`run_dir`, `report_dir`, the direct launcher and
    /// `extra`) and installs the hook with `postcopy-sidecar libvirt-hook install` (as
    /// `hooks/qemu`, or with `drop_in` as `hooks/qemu.d/postcopy-sidecar`).
    pub fn install_sidecar_hook(&self, extra: &str, drop_in: bool) {
        let cfg = self.sysconf.join("postcopy-sidecar/libvirt-hook.toml");
        std::fs::create_dir_all(cfg.parent().unwrap()).unwrap();
        // The direct launcher is what this machine (no systemd) can run; "auto" would pick
        // systemd on a systemd host.
        std::fs::write(
            &cfg,
            format!(
                "run_dir = \"{}\"\nreport_dir = \"{}\"\nlauncher = \"direct\"\n{extra}",
                self.sidecar_run_dir().display(),
                self.report_dir().display()
            ),
        )
        .unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_postcopy-sidecar"))
            .args(["libvirt-hook", "install", "--sysconfdir"])
            .arg(&self.sysconf)
            .args(drop_in.then_some("--drop-in"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "libvirt-hook install: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Installs `script` as the hook `hooks/qemu.d/NAME` (libvirt runs those after
    /// `hooks/qemu`).
    pub fn add_drop_in_hook(&self, name: &str, script: &str) {
        use std::os::unix::fs::PermissionsExt;
        let d = self.sysconf.join("libvirt/hooks/qemu.d");
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join(name);
        std::fs::write(&p, script).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// Adds a drop-in hook that appends `$1 $2 $3 $4` of every call to the returned file
    /// (and prints nothing, so the `migrate` filter chain is unchanged). libvirt runs it
    /// after `hooks/qemu` and before `hooks/qemu.d/postcopy-sidecar`, and stops the chain at
    /// the first hook that fails.
    pub fn record_hook_calls(&self) -> PathBuf {
        let log = self.root.join("hook-calls");
        self.add_drop_in_hook(
            "00-record",
            &format!(
                "#!/bin/sh\ncat >/dev/null\necho \"$1 $2 $3 $4\" >> '{}'\nexit 0\n",
                log.display()
            ),
        );
        log
    }
}

impl Drop for LibvirtHost {
    fn drop(&mut self) {
        if !self.pids.is_empty() {
            let list = self.virsh(&["list", "--name"]);
            for d in String::from_utf8_lossy(&list.stdout).lines() {
                if !d.trim().is_empty() {
                    let _ = self.virsh(&["destroy", d.trim()]);
                }
            }
        }
        // Sidecars the hook launched directly, by the pid and start time it recorded.
        if let Ok(rd) = std::fs::read_dir(self.sidecar_run_dir()) {
            for e in rd.flatten() {
                let state = std::fs::read_to_string(e.path().join("state.json"))
                    .ok()
                    .and_then(|t| serde_json::from_str::<State>(&t).ok());
                if let Some(s) = state.and_then(|s| s.sidecar) {
                    let _ = s.stop();
                }
            }
        }
        for (_, pidfile) in &self.pids {
            if let Some(pid) = read_pid(pidfile) {
                stop_pid(pid, Duration::from_secs(10));
            }
        }
        if !self.pids.is_empty() {
            copy_xml_files(&self.capabilities(), &shared_capabilities(self.user));
        }
        // A QEMU that libvirt did not get to stop.
        if let Ok(rd) = std::fs::read_dir(self.root.join("run/qemu")) {
            for e in rd.flatten() {
                if e.path().extension().is_some_and(|x| x == "pid")
                    && let Some(pid) = read_pid(&e.path())
                    && live(pid)
                {
                    stop_pid(pid, Duration::from_secs(5));
                }
            }
        }
    }
}
