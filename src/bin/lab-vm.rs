//! `lab-vm`: starts one lab VM (`postcopy_sidecar::lab`) and keeps it in the foreground, so
//! a VM can live in its own process, e.g. one per container in the Docker interop runner
//! (`docker/run-interop.sh`).
//!
//! `lab-vm run` binds `DIR/NAME.qmp` (its own QMP session) and `DIR/NAME.qmp2` (free for a
//! client such as `postcopy-sidecar send` or `receive`), appends the serial console to
//! `DIR/NAME.serial.log`, waits until the VM is ready (a source: the guest workload's
//! `WL ready` and a first `WL progress` line; a destination started with `--incoming`:
//! its QMP greeting), prints one line starting with `lab-vm: NAME: READY`, then stays
//! until SIGTERM/SIGINT (kills QEMU, exits 0) or until QEMU exits (exits 1). QEMU's
//! stderr is copied to ours as it comes.
//!
//! `lab-vm probe-accel` prints `kvm` or `tcg`: what the lab's accelerator probe chose
//! with this QEMU (KVM only if our Linux guest actually boots under it).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use postcopy_sidecar::lab::{
    Accel, QemuBinary, QemuVersion, Vm, VmSpec, Workload, WorkloadMode, resolve_accel_for,
};

#[derive(Parser, Debug)]
#[command(about = "Start one lab VM and keep it in the foreground")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum, Debug, PartialEq, Eq)]
enum AccelArg {
    /// KVM if our guest boots under it here, else TCG (`POSTCOPY_SIDECAR_ACCEL` overrides).
    Auto,
    Kvm,
    Tcg,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Start a VM and stay until killed.
    Run {
        /// VM name: file names in --dir and QEMU's -name.
        #[arg(long)]
        name: String,
        /// Directory for the QMP sockets and the serial log (created).
        #[arg(long)]
        dir: PathBuf,
        /// QEMU release: 7.2, 10.0 or 11.1.
        #[arg(long)]
        qemu: String,
        /// Machine type (use the older release's versioned type across releases).
        #[arg(long, default_value = "q35")]
        machine: String,
        /// Guest RAM, MiB.
        #[arg(long, default_value_t = 256)]
        ram_mib: u64,
        /// Memory the guest workload fills and keeps verifying, MiB.
        #[arg(long, default_value_t = 96)]
        workload_mib: u64,
        /// Workload mode: seq, random, hot, idle.
        #[arg(long, default_value = "hot")]
        mode: String,
        /// Hot set in hot mode, MiB.
        #[arg(long, default_value_t = 16)]
        hot_mib: u64,
        /// Pattern seed.
        #[arg(long, default_value_t = 11)]
        seed: u64,
        /// Start as a migration destination (`-incoming defer`).
        #[arg(long)]
        incoming: bool,
        /// Accelerator.
        #[arg(long, value_enum, default_value_t = AccelArg::Auto)]
        accel: AccelArg,
        /// How long a source may take to boot and fill its memory, seconds.
        #[arg(long, default_value_t = 300.0)]
        boot_timeout: f64,
    },
    /// Print the accelerator the lab picks with this QEMU: `kvm` or `tcg`.
    ProbeAccel {
        /// QEMU release: 7.2, 10.0 or 11.1.
        #[arg(long)]
        qemu: String,
    },
}

/// A wait without a practical end (`Duration::MAX` would overflow the deadline).
const FOREVER: Duration = Duration::from_secs(365 * 24 * 3600);

fn version(s: &str) -> Result<QemuVersion, String> {
    match s {
        "7.2" => Ok(QemuVersion::V7_2),
        "11.1" => Ok(QemuVersion::V11_1),
        "10.0" => Ok(QemuVersion::V10_0),
        other => Err(format!(
            "unknown QEMU release {other:?} (7.2, 10.0 or 11.1)"
        )),
    }
}

fn accel_name(a: Accel) -> &'static str {
    match a {
        Accel::Kvm => "kvm",
        Accel::Tcg => "tcg",
        Accel::Auto => "auto",
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // Current-thread runtime: QEMU gets PR_SET_PDEATHSIG for the thread that starts it,
    // and this thread lives as long as the process.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(cli.cmd)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lab-vm: error: {e}");
            ExitCode::from(1)
        }
    }
}

async fn run(cmd: Cmd) -> Result<ExitCode, String> {
    match cmd {
        Cmd::ProbeAccel { qemu } => {
            let bin = QemuBinary::find(version(&qemu)?).map_err(|e| e.to_string())?;
            println!("{}", accel_name(resolve_accel_for(Accel::Auto, &bin).await));
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run {
            name,
            dir,
            qemu,
            machine,
            ram_mib,
            workload_mib,
            mode,
            hot_mib,
            seed,
            incoming,
            accel,
            boot_timeout,
        } => {
            let bin = QemuBinary::find(version(&qemu)?).map_err(|e| e.to_string())?;
            let line = bin.version_line().map_err(|e| e.to_string())?;
            let mode: WorkloadMode = mode.parse()?;
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let serial = dir.join(format!("{name}.serial.log"));
            // A fresh log: the runner reads it from its first line.
            let _ = std::fs::remove_file(&serial);
            let spec = VmSpec::new(bin)
                .name(name.clone())
                .ram_mib(ram_mib)
                .machine(machine.clone())
                .linux(Workload {
                    mib: workload_mib,
                    mode,
                    hot_mib,
                    seed,
                })
                .incoming_defer(incoming)
                .accel(match accel {
                    AccelArg::Auto => Accel::Auto,
                    AccelArg::Kvm => Accel::Kvm,
                    AccelArg::Tcg => Accel::Tcg,
                })
                .serial_log(&serial);
            let vm = Vm::spawn(&spec, &dir).await.map_err(|e| e.to_string())?;
            let say = |s: String| println!("lab-vm: {name}: {s}");
            say(format!(
                "{line}, accelerator {}, machine {machine}, pid {}",
                accel_name(vm.accel()),
                vm.pid()
            ));
            say(format!(
                "qmp {} (free for a client), serial {}",
                vm.spare_qmp_path().display(),
                serial.display()
            ));
            // Copy QEMU's stderr to ours as it arrives (docker logs shows it).
            let stderr = vm.stderr().clone();
            let copier = tokio::spawn(async move {
                let mut next = 0;
                while let Ok((i, l)) = stderr.wait_after(next, |_| true, FOREVER).await {
                    eprintln!("qemu: {l}");
                    next = i + 1;
                }
            });
            if incoming {
                say("READY waiting for an incoming migration (-incoming defer)".into());
            } else {
                let t = Duration::from_secs_f64(boot_timeout);
                let ready = vm.wait_workload_ready(t).await.map_err(|e| e.to_string())?;
                let p = vm
                    .wait_progress(vm.serial().len(), 1, t)
                    .await
                    .map_err(|e| e.to_string())?;
                say(format!(
                    "READY guest workload: {} MiB {} filled in {} ms, then round {} with {} mismatches",
                    ready.mib, ready.mode, ready.fill_ms, p[0].round, p[0].mismatches
                ));
            }
            let code = stay(&vm, &name).await;
            vm.kill().await;
            copier.abort();
            Ok(code)
        }
    }
}

/// Waits for SIGTERM/SIGINT (exit 0) or for QEMU to exit, seen as its console closing
/// (exit 1).
async fn stay(vm: &Vm, name: &str) -> ExitCode {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        eprintln!("lab-vm: {name}: cannot install signal handlers");
        return ExitCode::from(1);
    };
    let serial = vm.serial().clone();
    tokio::select! {
        _ = term.recv() => ExitCode::SUCCESS,
        _ = int.recv() => ExitCode::SUCCESS,
        _ = serial.wait_after(usize::MAX, |_| false, FOREVER) => {
            let status = vm
                .try_exit_status()
                .map(|s| s.to_string())
                .unwrap_or_else(|| "console closed".into());
            println!("lab-vm: {name}: QEMU exited ({status}); stderr:\n{}", vm.stderr().tail(30));
            ExitCode::from(1)
        }
    }
}
