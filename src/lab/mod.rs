//! Real QEMU processes and guests for tests, captures, benchmarks and the demo.
//!
//! Everything here waits on something observable (a QMP event, a serial line, a socket
//! appearing) instead of sleeping for a guessed time, so the same code is fast on an idle
//! machine and still correct on two busy cores under TCG.
//!
//! - [`QemuBinary`]: the two QEMUs we test against (system 10.0, extracted 7.2);
//! - [`VmSpec`] / [`Vm`]: build a command line, start QEMU, talk QMP, read the serial console;
//! - [`workload`]: parameters of the guest workload and a parser for its `WL ...` lines;
//! - [`direct_postcopy`]: a plain QEMU→QEMU postcopy migration driven over QMP, the
//!   "direct control" baseline the sidecar is compared with;
//! - [`link::Link`]: a loopback forwarder that tests cut or freeze (a broken network);
//! - [`matrix`]: the interop matrix the test command prints from its own output.
//!
//! Files come from `scripts/setup.sh` (QEMU 7.2, guest kernel, initramfs) under the cache
//! directory, `.cache/` at the repository root unless `POSTCOPY_SIDECAR_CACHE` says otherwise.

mod accel;
pub mod link;
pub mod matrix;
mod migrate;
pub mod planted;
mod qemu;
mod serial;
mod vm;
pub mod workload;

use std::path::PathBuf;

pub use accel::{Accel, resolve_accel, resolve_accel_for};
pub use migrate::{DirectOptions, DirectReport, direct_postcopy};
pub use qemu::{GuestImage, QemuBinary, QemuVersion};
pub use serial::{SerialLog, WaitEnd};
pub use vm::{Guest, RamLayout, Vm, VmSpec, reserve_hugepages};
pub use workload::{
    WlLine, WlMark, WlMismatch, WlProgress, WlReady, Workload, WorkloadMode, parse_wl_line,
};

use crate::qmp::QmpError;

/// What to tell a user whose machine lacks the lab's files.
pub const SETUP_HINT: &str =
    "run `sudo scripts/setup.sh` (installs QEMU 10.0 and 7.2, the guest kernel and initramfs)";

/// Why a lab operation failed. Messages carry enough context (QEMU's stderr, the last
/// serial lines) to diagnose a failed test from its output alone.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A file the lab needs is not there.
    #[error("{what} not found at {path}: {hint}", hint = SETUP_HINT)]
    Missing {
        /// What is missing.
        what: String,
        /// Where it was looked for.
        path: PathBuf,
    },
    /// QEMU could not be started.
    #[error("starting {binary}: {source}")]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// QEMU exited while we waited on it.
    #[error("QEMU `{name}` exited ({status}); stderr:\n{stderr}")]
    Exited {
        /// The VM's name.
        name: String,
        /// Its exit status, as text.
        status: String,
        /// The end of its stderr.
        stderr: String,
    },
    /// Something did not happen in time.
    #[error("timed out after {secs:.0}s waiting for {what}; {context}")]
    Timeout {
        /// What we waited for.
        what: String,
        /// How long we waited.
        secs: f64,
        /// Recent serial lines and stderr.
        context: String,
    },
    /// A QMP exchange failed.
    #[error("QMP: {0}")]
    Qmp(#[from] QmpError),
    /// A local I/O step failed.
    #[error("{what}: {source}")]
    Io {
        /// The step.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// The guest workload reported a problem (mismatch, fatal error).
    #[error("guest workload: {0}")]
    Workload(String),
}

/// The lab's cache directory (QEMU 7.2, guest kernel, initramfs).
///
/// `POSTCOPY_SIDECAR_CACHE` overrides it; the default is `.cache/` at the repository root,
/// which is where `scripts/setup.sh` puts things.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("POSTCOPY_SIDECAR_CACHE") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.cache")),
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read it, close).
///
/// For QEMU's `migrate-incoming tcp:127.0.0.1:PORT`, which must bind the port itself.
pub fn free_tcp_port() -> std::io::Result<u16> {
    Ok(loopback_listener()?.local_addr()?.port())
}

/// A listener on 127.0.0.1 with a kernel-chosen port, for code that accepts itself.
pub fn loopback_listener() -> std::io::Result<std::net::TcpListener> {
    std::net::TcpListener::bind(("127.0.0.1", 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_port_is_usable() {
        let p = free_tcp_port().unwrap();
        assert_ne!(p, 0);
        std::net::TcpListener::bind(("127.0.0.1", p)).unwrap();
    }
}
