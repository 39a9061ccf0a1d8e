//! Starting one QEMU: its command line ([`VmSpec`]) and the running process ([`Vm`]).

use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use super::LabError;
use super::accel::{Accel, resolve_accel_for};
use super::qemu::{GuestImage, QemuBinary};
use super::serial::{SerialLog, WaitEnd};
use super::workload::{WlLine, WlMark, WlProgress, WlReady, Workload, parse_wl_line};
use crate::qmp::Qmp;

/// What runs inside the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Guest {
    /// Only the firmware (SeaBIOS, which finds nothing to boot): enough for QMP checks
    /// and for migrating RAM that nothing touches.
    Firmware,
    /// Debian's cloud kernel with our initramfs, whose `/init` runs the workload.
    Linux(Workload),
}

/// How guest RAM is laid out in memfd backends (all `share=on`, as the sidecar requires).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RamLayout {
    /// One backend, id `m`, on 4 KiB pages.
    #[default]
    Single,
    /// One backend, id `m`, on 2 MiB hugetlb pages (the host must have them reserved:
    /// [`reserve_hugepages`]).
    Hugepages2M,
    /// Two backends `m0` and `m1`, half the RAM each, one NUMA node each.
    TwoNodes,
}

impl RamLayout {
    /// A short name for tables and messages.
    pub fn name(self) -> &'static str {
        match self {
            RamLayout::Single => "1 memfd",
            RamLayout::Hugepages2M => "1 memfd, 2M hugepages",
            RamLayout::TwoNodes => "2 memfd, 2 NUMA nodes",
        }
    }
}

/// Makes sure the host has at least `pages` free 2 MiB hugepages, reserving more if it
/// must (root): hugetlb memfd backends take theirs at start-up.
pub fn reserve_hugepages(pages: u64) -> std::io::Result<()> {
    let free = |what: &str| -> std::io::Result<u64> {
        let info = std::fs::read_to_string("/proc/meminfo")?;
        Ok(info
            .lines()
            .find_map(|l| l.strip_prefix(what))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0))
    };
    let have = free("HugePages_Free:")?;
    if have >= pages {
        return Ok(());
    }
    let total = free("HugePages_Total:")?;
    std::fs::write(
        "/proc/sys/vm/nr_hugepages",
        (total + pages - have).to_string(),
    )?;
    let now = free("HugePages_Free:")?;
    if now < pages {
        return Err(std::io::Error::other(format!(
            "only {now} free 2 MiB hugepages after asking for {pages} (memory too fragmented?)"
        )));
    }
    Ok(())
}

/// A QEMU command line, built with chained setters.
///
/// Guest RAM is always in `memory-backend-memfd` objects with `share=on` ([`RamLayout`]),
/// as the sidecar requires, so every VM the lab starts is one the sidecar can serve.
#[derive(Debug, Clone, PartialEq)]
pub struct VmSpec {
    /// The QEMU to run.
    pub binary: QemuBinary,
    /// Name used for `-name`, file names and messages.
    pub name: String,
    /// Guest RAM in MiB.
    pub ram_mib: u64,
    /// Machine type (`q35` or a versioned one such as `pc-q35-7.2` across releases).
    pub machine: String,
    /// What the VM runs.
    pub guest: Guest,
    /// Start with `-incoming defer` (a migration destination, started by QMP later).
    pub incoming_defer: bool,
    /// Start with `-S` (CPUs stopped until `cont`).
    pub paused: bool,
    /// Accelerator choice.
    pub accel: Accel,
    /// Extra kernel command line words (Linux guest).
    pub kernel_args: Vec<String>,
    /// Extra QEMU arguments, appended last.
    pub extra_args: Vec<String>,
    /// Also append the serial console to this file.
    pub serial_log: Option<PathBuf>,
    /// How guest RAM is split into backends.
    pub ram_layout: RamLayout,
}

impl VmSpec {
    /// A firmware-only q35 VM with 128 MiB, accelerator chosen automatically.
    pub fn new(binary: QemuBinary) -> VmSpec {
        VmSpec {
            binary,
            name: "vm".into(),
            ram_mib: 128,
            machine: "q35".into(),
            guest: Guest::Firmware,
            incoming_defer: false,
            paused: false,
            accel: Accel::Auto,
            kernel_args: Vec::new(),
            extra_args: Vec::new(),
            serial_log: None,
            ram_layout: RamLayout::Single,
        }
    }

    /// Lays guest RAM out this way.
    pub fn ram_layout(mut self, layout: RamLayout) -> VmSpec {
        self.ram_layout = layout;
        self
    }

    /// Sets the name.
    pub fn name(mut self, name: impl Into<String>) -> VmSpec {
        self.name = name.into();
        self
    }

    /// Sets guest RAM in MiB.
    pub fn ram_mib(mut self, mib: u64) -> VmSpec {
        self.ram_mib = mib;
        self
    }

    /// Sets the machine type.
    pub fn machine(mut self, machine: impl Into<String>) -> VmSpec {
        self.machine = machine.into();
        self
    }

    /// Runs only the firmware.
    pub fn firmware_only(mut self) -> VmSpec {
        self.guest = Guest::Firmware;
        self
    }

    /// Runs the Linux guest with `workload`.
    pub fn linux(mut self, workload: Workload) -> VmSpec {
        self.guest = Guest::Linux(workload);
        self
    }

    /// Starts as a migration destination waiting for `migrate-incoming`.
    pub fn incoming_defer(mut self, on: bool) -> VmSpec {
        self.incoming_defer = on;
        self
    }

    /// Starts with CPUs stopped.
    pub fn paused(mut self, on: bool) -> VmSpec {
        self.paused = on;
        self
    }

    /// Chooses the accelerator.
    pub fn accel(mut self, accel: Accel) -> VmSpec {
        self.accel = accel;
        self
    }

    /// Adds a kernel command line word.
    pub fn kernel_arg(mut self, arg: impl Into<String>) -> VmSpec {
        self.kernel_args.push(arg.into());
        self
    }

    /// Adds a raw QEMU argument.
    pub fn arg(mut self, arg: impl Into<String>) -> VmSpec {
        self.extra_args.push(arg.into());
        self
    }

    /// Appends the serial console to `path` as well.
    pub fn serial_log(mut self, path: impl Into<PathBuf>) -> VmSpec {
        self.serial_log = Some(path.into());
        self
    }

    /// The matching migration destination: same machine, RAM, guest files and kernel
    /// command line (they shape the ROM blocks), waiting with `-incoming defer`.
    pub fn destination(&self, binary: QemuBinary) -> VmSpec {
        let mut d = self.clone();
        d.binary = binary;
        d.name = format!("{}-dst", self.name);
        d.incoming_defer = true;
        d.paused = false;
        d.serial_log = None;
        d
    }

    /// The full argument list for a resolved accelerator, with the QMP monitors on the
    /// already-listening descriptors `qmp_fds` (inherited by QEMU).
    pub fn args(&self, accel: Accel, image: Option<&GuestImage>, qmp_fds: &[i32]) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |s: String| a.push(s.into());
        push("-name".into());
        push(self.name.clone());
        for s in ["-nodefaults", "-no-user-config", "-display", "none"] {
            push(s.into());
        }
        push("-accel".into());
        push(
            match accel {
                Accel::Kvm => "kvm",
                _ => "tcg",
            }
            .into(),
        );
        push("-machine".into());
        match self.ram_layout {
            RamLayout::TwoNodes => push(self.machine.clone()),
            _ => push(format!("{},memory-backend=m", self.machine)),
        }
        push("-m".into());
        push(format!("{}M", self.ram_mib));
        match self.ram_layout {
            RamLayout::Single => {
                push("-object".into());
                push(format!(
                    "memory-backend-memfd,id=m,size={}M,share=on",
                    self.ram_mib
                ));
            }
            RamLayout::Hugepages2M => {
                push("-object".into());
                push(format!(
                    "memory-backend-memfd,id=m,size={}M,share=on,hugetlb=on,hugetlbsize=2M",
                    self.ram_mib
                ));
            }
            RamLayout::TwoNodes => {
                let half = self.ram_mib / 2;
                for (i, size) in [half, self.ram_mib - half].into_iter().enumerate() {
                    push("-object".into());
                    push(format!(
                        "memory-backend-memfd,id=m{i},size={size}M,share=on"
                    ));
                    push("-numa".into());
                    push(format!("node,nodeid={i},memdev=m{i}"));
                }
            }
        }
        for (i, fd) in qmp_fds.iter().enumerate() {
            push("-chardev".into());
            push(format!("socket,id=qmp{i},fd={fd},server=on,wait=off"));
            push("-mon".into());
            push(format!("chardev=qmp{i},mode=control"));
        }
        push("-chardev".into());
        push("stdio,id=ser0,signal=off".into());
        push("-serial".into());
        push("chardev:ser0".into());
        if let (Guest::Linux(wl), Some(img)) = (&self.guest, image) {
            push("-no-reboot".into());
            push("-kernel".into());
            a.push(img.kernel.clone().into());
            a.push("-initrd".into());
            a.push(img.initramfs.clone().into());
            let mut cmdline = format!("console=ttyS0 panic=-1 loglevel=4 {}", wl.cmdline());
            for k in &self.kernel_args {
                cmdline.push(' ');
                cmdline.push_str(k);
            }
            a.push("-append".into());
            a.push(cmdline.into());
        }
        if self.paused {
            a.push("-S".into());
        }
        if self.incoming_defer {
            a.push("-incoming".into());
            a.push("defer".into());
        }
        a.extend(self.extra_args.iter().map(OsString::from));
        a
    }
}

/// A running QEMU started by [`Vm::spawn`].
///
/// It owns the process: dropping the `Vm` kills that QEMU (by its pid, never by name).
/// The first QMP monitor is connected ([`Vm::qmp`]); a second one stays free at
/// [`Vm::spare_qmp_path`] for another client such as the sidecar daemon. The serial
/// console is QEMU's stdout, read line by line into [`Vm::serial`].
pub struct Vm {
    name: String,
    spec: VmSpec,
    accel: Accel,
    pid: u32,
    /// `None` once [`Vm::quit`] or [`Vm::kill`] took it to wait on it.
    child: Mutex<Option<tokio::process::Child>>,
    qmp: Qmp,
    qmp_path: PathBuf,
    spare_qmp_path: PathBuf,
    serial: SerialLog,
    stderr: SerialLog,
    readers: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("name", &self.name)
            .field("pid", &self.pid)
            .field("accel", &self.accel)
            .finish()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = child.as_mut() {
            let _ = c.start_kill();
        }
        for r in &self.readers {
            r.abort();
        }
    }
}

/// Binds a unix listener at `path` (replacing a stale socket) for QEMU to inherit.
fn listen_at(path: &Path) -> Result<OwnedFd, LabError> {
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path).map_err(|source| LabError::Io {
        what: format!("binding {}", path.display()),
        source,
    })?;
    Ok(OwnedFd::from(l))
}

impl Vm {
    /// Starts QEMU for `spec`, with its sockets (and nothing else) in `workdir`, and
    /// returns once QMP is negotiated.
    ///
    /// The QMP sockets are bound here and inherited by QEMU (`-chardev socket,fd=N`), so
    /// there is no window where QEMU runs but its socket is not there yet: we connect at
    /// once and QEMU's greeting arrives when its monitor is up.
    ///
    /// QEMU gets `PR_SET_PDEATHSIG`, so it dies with the *thread* that started it: call
    /// this from async code (a runtime thread), not from a short-lived `spawn_blocking`.
    pub async fn spawn(spec: &VmSpec, workdir: &Path) -> Result<Vm, LabError> {
        let accel = resolve_accel_for(spec.accel, &spec.binary).await;
        let image = match spec.guest {
            Guest::Linux(_) => Some(GuestImage::find()?),
            Guest::Firmware => None,
        };
        std::fs::create_dir_all(workdir).map_err(|source| LabError::Io {
            what: format!("creating {}", workdir.display()),
            source,
        })?;
        let qmp_path = workdir.join(format!("{}.qmp", spec.name));
        let spare_qmp_path = workdir.join(format!("{}.qmp2", spec.name));
        let fds = [listen_at(&qmp_path)?, listen_at(&spare_qmp_path)?];
        // In the child the listeners become fds 3 and 4 (dup2 clears close-on-exec).
        const FIRST_FD: i32 = 3;
        let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let targets: Vec<i32> = (0..raw.len() as i32).map(|i| FIRST_FD + i).collect();

        let mut cmd = spec.binary.command();
        cmd.args(spec.args(accel, image.as_ref(), &targets))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let raw_c = raw.clone();
        // SAFETY: only async-signal-safe calls (dup/dup2/prctl) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // Move the sources out of the way first so a source that already sits at a
                // target number is not clobbered by an earlier dup2.
                let mut tmp = Vec::with_capacity(raw_c.len());
                for &fd in &raw_c {
                    let d = nix::libc::fcntl(fd, nix::libc::F_DUPFD, 100);
                    if d < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    tmp.push(d);
                }
                for (i, &fd) in tmp.iter().enumerate() {
                    if nix::libc::dup2(fd, FIRST_FD + i as i32) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                // QEMU dies with the process that started it (a crashed test leaves none).
                nix::libc::prctl(nix::libc::PR_SET_PDEATHSIG, nix::libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| LabError::Spawn {
            binary: spec.binary.path.clone(),
            source,
        })?;
        drop(fds); // QEMU holds its copies; ours would keep the sockets alive after it dies.
        let pid = child.id().unwrap_or(0);

        let serial = SerialLog::new(spec.serial_log.as_deref()).map_err(|source| LabError::Io {
            what: "opening the serial log file".into(),
            source,
        })?;
        let stderr = SerialLog::new(None).map_err(|source| LabError::Io {
            what: "creating the stderr log".into(),
            source,
        })?;
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            readers.push(serial.spawn_reader(out));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(stderr.spawn_reader(err));
        }
        tracing::debug!(name = %spec.name, pid, ?accel, "QEMU started");

        let connect = Qmp::connect(&qmp_path);
        let qmp = match tokio::time::timeout(Duration::from_secs(60), connect).await {
            Ok(Ok(q)) => q,
            outcome => {
                let _ = child.start_kill();
                let status = child
                    .wait()
                    .await
                    .map(|s| s.to_string())
                    .unwrap_or_default();
                // Let the stderr reader drain what QEMU said before it died.
                let _ = stderr
                    .wait_after(usize::MAX, |_| false, Duration::from_secs(2))
                    .await;
                return Err(match outcome {
                    Ok(Err(e)) if !stderr.is_empty() || !status.is_empty() => LabError::Exited {
                        name: spec.name.clone(),
                        status: format!("{status}; QMP: {e}"),
                        stderr: stderr.tail(30),
                    },
                    Ok(Err(e)) => e.into(),
                    Ok(Ok(_)) | Err(_) => LabError::Timeout {
                        what: format!("the QMP greeting of `{}`", spec.name),
                        secs: 60.0,
                        context: format!("stderr:\n{}", stderr.tail(30)),
                    },
                });
            }
        };
        Ok(Vm {
            name: spec.name.clone(),
            spec: spec.clone(),
            accel,
            pid,
            child: Mutex::new(Some(child)),
            qmp,
            qmp_path,
            spare_qmp_path,
            serial,
            stderr,
            readers,
        })
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The spec it was started from.
    pub fn spec(&self) -> &VmSpec {
        &self.spec
    }

    /// The accelerator actually used (`Kvm` or `Tcg`).
    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// QEMU's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The connected QMP session.
    pub fn qmp(&self) -> &Qmp {
        &self.qmp
    }

    /// Path of the monitor [`Vm::qmp`] is connected to.
    pub fn qmp_path(&self) -> &Path {
        &self.qmp_path
    }

    /// Path of a second QMP monitor nobody uses yet (QEMU serves one client per monitor).
    pub fn spare_qmp_path(&self) -> &Path {
        &self.spare_qmp_path
    }

    /// The serial console's lines.
    pub fn serial(&self) -> &SerialLog {
        &self.serial
    }

    /// QEMU's stderr lines.
    pub fn stderr(&self) -> &SerialLog {
        &self.stderr
    }

    /// The exit status if QEMU already exited.
    pub fn try_exit_status(&self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.lock().unwrap_or_else(|p| p.into_inner());
        c.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    fn context(&self) -> String {
        format!(
            "last serial lines of `{}`:\n{}\nstderr:\n{}",
            self.name,
            self.serial.tail(15),
            self.stderr.tail(15)
        )
    }

    fn wait_error(&self, end: WaitEnd, what: &str, timeout: Duration) -> LabError {
        match end {
            WaitEnd::Timeout => LabError::Timeout {
                what: format!("{what} on `{}`", self.name),
                secs: timeout.as_secs_f64(),
                context: self.context(),
            },
            WaitEnd::Closed => LabError::Exited {
                name: self.name.clone(),
                status: self
                    .try_exit_status()
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "console closed".into()),
                stderr: format!(
                    "{}\n(while waiting for {what}; the guest's last words:\n{}\nlast serial lines:\n{})",
                    self.stderr.tail(30),
                    self.serial.last_words(20),
                    self.serial.tail(15)
                ),
            },
        }
    }

    /// Waits for a serial line (already received or future) matching `pred`.
    pub async fn wait_serial(
        &self,
        pred: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Result<String, LabError> {
        self.wait_serial_after(0, pred, timeout)
            .await
            .map(|(_, l)| l)
    }

    /// Waits for a serial line at index `from` or later matching `pred` (take the index
    /// from `vm.serial().len()` before acting); returns its index and text.
    pub async fn wait_serial_after(
        &self,
        from: usize,
        pred: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Result<(usize, String), LabError> {
        self.serial
            .wait_after(from, pred, timeout)
            .await
            .map_err(|e| self.wait_error(e, "a serial line", timeout))
    }

    /// Waits for the workload's `WL ready` line (the guest booted and filled its memory).
    pub async fn wait_workload_ready(&self, timeout: Duration) -> Result<WlReady, LabError> {
        let (_, line) = self
            .serial
            .wait_after(
                0,
                |l| matches!(parse_wl_line(l), Some(WlLine::Ready(_) | WlLine::Fatal(_))),
                timeout,
            )
            .await
            .map_err(|e| self.wait_error(e, "`WL ready`", timeout))?;
        match parse_wl_line(&line) {
            Some(WlLine::Ready(r)) => Ok(r),
            _ => Err(LabError::Workload(line)),
        }
    }

    /// Waits for `n` `WL progress` lines at serial index `from` or later and returns them.
    /// A `WL fatal` line ends the wait with an error; mismatches are returned, not judged
    /// (see [`Vm::check_workload_clean`]).
    pub async fn wait_progress(
        &self,
        from: usize,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<WlProgress>, LabError> {
        self.wait_wl_lines(from, n, timeout, "`WL progress`", |l| match l {
            WlLine::Progress(p) => Some(p),
            _ => None,
        })
        .await
    }

    /// Waits for `n` `WL mark` lines (a guest started with `wl.mark_mib=`) at serial index
    /// `from` or later: the guest has done that much more work. A `WL fatal` line ends the
    /// wait with an error.
    pub async fn wait_marks(
        &self,
        from: usize,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<WlMark>, LabError> {
        self.wait_wl_lines(from, n, timeout, "`WL mark`", |l| match l {
            WlLine::Mark(m) => Some(m),
            _ => None,
        })
        .await
    }

    /// Collects `n` workload lines that `pick` accepts, from serial index `from` on; a
    /// `WL fatal` line ends the wait with an error.
    async fn wait_wl_lines<T>(
        &self,
        from: usize,
        n: usize,
        timeout: Duration,
        what: &str,
        pick: fn(WlLine) -> Option<T>,
    ) -> Result<Vec<T>, LabError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut out = Vec::new();
        let mut next = from;
        while out.len() < n {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let (i, line) = self
                .serial
                .wait_after(
                    next,
                    |l| match parse_wl_line(l) {
                        Some(WlLine::Fatal(_)) => true,
                        Some(w) => pick(w).is_some(),
                        None => false,
                    },
                    left,
                )
                .await
                .map_err(|e| self.wait_error(e, &format!("{n} {what} lines"), timeout))?;
            match parse_wl_line(&line).and_then(pick) {
                Some(v) => out.push(v),
                None => return Err(LabError::Workload(line)),
            }
            next = i + 1;
        }
        Ok(out)
    }

    /// Fails if the workload printed any `WL mismatch` or `WL fatal` line, or its latest
    /// progress line counts mismatches.
    pub fn check_workload_clean(&self) -> Result<(), LabError> {
        let mut mismatch_lines = Vec::new();
        let mut last_count = 0;
        for l in self.serial.lines() {
            match parse_wl_line(&l) {
                Some(WlLine::Mismatch(_)) => mismatch_lines.push(l),
                Some(WlLine::Fatal(_)) => return Err(LabError::Workload(l)),
                Some(WlLine::Progress(p)) => last_count = p.mismatches,
                _ => {}
            }
        }
        if mismatch_lines.is_empty() && last_count == 0 {
            return Ok(());
        }
        let shown: Vec<_> = mismatch_lines.iter().take(10).cloned().collect();
        Err(LabError::Workload(format!(
            "`{}`: {} mismatching words ({} lines), first:\n{}",
            self.name,
            last_count,
            mismatch_lines.len(),
            shown.join("\n")
        )))
    }

    fn take_child(&self) -> Option<tokio::process::Child> {
        self.child.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Asks QEMU to quit over QMP and waits for it to exit; kills it if it does not.
    pub async fn quit(self, timeout: Duration) -> Result<(), LabError> {
        let _ = self.qmp.execute(qapi::qmp::quit {}).await;
        let Some(mut child) = self.take_child() else {
            return Ok(());
        };
        match tokio::time::timeout(timeout, child.wait()).await {
            Ok(_) => Ok(()),
            Err(_) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                Err(LabError::Timeout {
                    what: format!("`{}` to quit", self.name),
                    secs: timeout.as_secs_f64(),
                    context: self.context(),
                })
            }
        }
    }

    /// Kills QEMU now (SIGKILL to its pid) and reaps it.
    pub async fn kill(self) {
        if let Some(mut child) = self.take_child() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::QemuVersion;

    fn fake_binary() -> QemuBinary {
        QemuBinary {
            version: QemuVersion::V10_0,
            path: "/usr/bin/qemu-system-x86_64".into(),
            data_dirs: vec![],
            module_dir: None,
            lib_dirs: vec![],
        }
    }

    #[test]
    fn command_line_has_the_shared_memfd_and_monitors() {
        let spec = VmSpec::new(fake_binary())
            .name("src")
            .ram_mib(256)
            .machine("pc-q35-7.2")
            .linux(Workload::default())
            .incoming_defer(true);
        let img = GuestImage {
            kernel: "/k".into(),
            initramfs: "/i".into(),
        };
        let a: Vec<String> = spec
            .args(Accel::Tcg, Some(&img), &[3, 4])
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        let s = a.join(" ");
        assert!(s.contains("-machine pc-q35-7.2,memory-backend=m"), "{s}");
        assert!(s.contains("-m 256M -object memory-backend-memfd,id=m,size=256M,share=on"));
        assert!(s.contains("-chardev socket,id=qmp1,fd=4,server=on,wait=off"));
        assert!(s.contains("-accel tcg"));
        assert!(s.contains("-kernel /k -initrd /i -append console=ttyS0"));
        assert!(s.ends_with("-incoming defer"));
        let dst = spec.destination(fake_binary());
        assert_eq!(dst.name, "src-dst");
        assert!(dst.incoming_defer);
    }
}
