//! Verifying that the destination holds what the stream delivered
//! (protocol-spec/guarded-access.md#guard-verify):
//! - [`digests`]: the per-page digests the receiver records while forwarding;
//! - [`check`]: comparing a destination's RAM with them;
//! - [`placement`]: checking each postcopy page right after QEMU placed it;
//! - [`command`]: `postcopy-sidecar verify`.

pub mod check;
pub mod command;
pub mod digests;
pub mod placement;

pub use check::{Mismatch, VerifyReport};
pub use digests::PageDigests;
