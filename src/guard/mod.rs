//! Guarded access to the destination's shared guest RAM (protocol-spec/guarded-access.md).
//!
//! The destination QEMU keeps guest RAM in a memfd shared with `share=on`, so the sidecar
//! can map it. Reading a page that has not arrived yet would allocate a zero page in the
//! file and break the migration, so the sidecar's mapping is registered with its own
//! userfaultfd: a read of a missing page by any thread (or any syscall) blocks, the page is
//! asked of the source ahead of other requests, and the reader is woken once QEMU placed it.
//!
//! - [`probe`]: non-allocating presence checks and hole reads on a memfd;
//! - [`discover`]: finding QEMU's process and the memfd behind each RAM block;
//! - [`mapping`]: the guarded mapping and its fault thread.

pub mod discover;
pub mod mapping;
pub mod probe;

pub use discover::{DiscoverError, RamFile};
pub use mapping::{GuardError, GuardFigures, GuardedRam, Phase};
