//! postcopy-sidecar: a sidecar that speaks QEMU's live-migration wire protocol next to a
//! stock, unpatched QEMU.
//!
//! The crate is split so that the protocol knowledge stays testable without any I/O:
//! - [`wire`]: the sans-IO codec for the forward stream, the preempt channel and the
//!   return path (pure parse/encode over byte slices);
//! - [`session`]: the I/O-free core of one carried migration: what to forward, what to ask
//!   of the source, how to survive a cut of the source link; driven in memory by tests;
//! - [`daemon`]: the I/O around it (sockets, QMP, reports, metrics);
//! - [`qmp`]: the QMP control client used to drive and observe QEMU;
//! - [`lab`]: starting real QEMUs and guests for tests, captures, benchmarks and the demo.
#![warn(missing_docs)]

pub mod capture;
pub mod daemon;
pub mod demo;
pub mod deploy;
pub mod durable;
pub mod figures;
pub mod guard;
pub mod inspect;
pub mod lab;
pub mod owned_dir;
pub mod qmp;
pub mod restore;
pub mod session;
pub mod snapshot;
pub mod source;
pub mod synth;
pub mod verify;
pub mod wire;
