//! Choosing between KVM and TCG.
//!
//! `/dev/kvm` existing does not mean KVM works: under nested virtualization a Linux guest
//! can hang early in boot. So `Accel::Auto` boots the real guest under KVM once per
//! process and keeps KVM only if the workload's first line shows up quickly.

use std::time::Duration;

use tokio::sync::OnceCell;

use super::qemu::{GuestImage, QemuBinary};
use super::vm::{Vm, VmSpec};
use super::workload::{Workload, WorkloadMode};

/// Which accelerator QEMU runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Accel {
    /// KVM if it boots our guest here, otherwise TCG (decided once per process).
    /// `POSTCOPY_SIDECAR_ACCEL=kvm|tcg` skips the probe.
    #[default]
    Auto,
    /// Hardware virtualization.
    Kvm,
    /// Software emulation: slow but works everywhere.
    Tcg,
}

/// How long the KVM probe waits for the guest's first workload line. A working KVM gets
/// there in about a second; TCG needs a few, so waiting longer would not pay off.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

static DECISION: OnceCell<Accel> = OnceCell::const_new();

/// Resolves `Auto` to `Kvm` or `Tcg` (probing with QEMU 10.0 on first use); other values
/// pass through.
pub async fn resolve_accel(accel: Accel) -> Accel {
    match accel {
        Accel::Auto => *DECISION.get_or_init(|| decide(None)).await,
        other => other,
    }
}

/// Like [`resolve_accel`], but a probe (if this is the first use) boots `binary`, the QEMU
/// about to be started, so a machine with only one of the two releases (a container
/// image) probes with what it has.
pub async fn resolve_accel_for(accel: Accel, binary: &QemuBinary) -> Accel {
    match accel {
        Accel::Auto => *DECISION.get_or_init(|| decide(Some(binary))).await,
        other => other,
    }
}

async fn decide(binary: Option<&QemuBinary>) -> Accel {
    match std::env::var("POSTCOPY_SIDECAR_ACCEL").as_deref() {
        Ok("kvm") => return Accel::Kvm,
        Ok("tcg") => return Accel::Tcg,
        _ => {}
    }
    let a = probe(binary).await;
    tracing::info!(accel = ?a, "accelerator chosen");
    a
}

async fn probe(binary: Option<&QemuBinary>) -> Accel {
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !usable {
        return Accel::Tcg;
    }
    let bin = match binary {
        Some(b) => Ok(b.clone()),
        None => QemuBinary::v10_0(),
    };
    let (Ok(bin), Ok(_)) = (bin, GuestImage::find()) else {
        tracing::warn!("no QEMU or guest image to probe KVM with; using TCG");
        return Accel::Tcg;
    };
    let Ok(dir) = tempfile::Builder::new().prefix("kvm-probe-").tempdir() else {
        return Accel::Tcg;
    };
    let spec = VmSpec::new(bin)
        .name("kvm-probe")
        .ram_mib(128)
        .linux(Workload {
            mib: 4,
            mode: WorkloadMode::Idle,
            hot_mib: 1,
            seed: 1,
        })
        .accel(Accel::Kvm);
    // Boxed: spawning resolves the accelerator, which may probe, which spawns.
    let vm = match Box::pin(Vm::spawn(&spec, dir.path())).await {
        Ok(vm) => vm,
        Err(e) => {
            tracing::info!("KVM probe VM did not start: {e}");
            return Accel::Tcg;
        }
    };
    let ok = vm
        .wait_serial(|l| l.starts_with("WL "), PROBE_TIMEOUT)
        .await
        .is_ok();
    vm.kill().await;
    if ok { Accel::Kvm } else { Accel::Tcg }
}
