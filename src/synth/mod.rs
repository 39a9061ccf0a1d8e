//! A synthetic postcopy destination, for tests and benchmarks without QEMU: guest RAM in
//! a memfd registered with userfaultfd (missing mode on shmem, as QEMU registers its
//! shared RAM), worker threads standing in for vCPUs that touch pages in a pattern, and a
//! fault thread that turns faults into page requests and places arriving pages with
//! `UFFDIO_COPY` exactly once, as QEMU's destination does
//! (`postcopy-ram.c:postcopy_ram_fault_thread`, `postcopy_place_page`).
//!
//! - [`SynthRam`]: the memory, its userfaultfd, placement;
//! - [`touch`]: the workers and their access patterns;
//! - [`fault_loop`]: the fault thread, generic over how a fault is answered;
//! - [`wire`]: answering faults over the real wire protocol (REQ_PAGES_ID out, RAM
//!   records in), so a sidecar page service can sit on the other end;
//! - [`snapshot`]: a made-up snapshot for the restore page service to serve;
//! - [`run`]: one run, answered by the bare loop or through the page service.

pub mod fault_loop;
pub mod run;
pub mod snapshot;
pub mod touch;
pub mod wire;

use std::fs::File;
use std::num::NonZeroUsize;
use std::os::fd::AsFd;

use userfaultfd::{FeatureFlags, Uffd, UffdBuilder};

/// Page size of the synthetic RAM.
pub const PAGE: usize = 4096;

/// What a placement found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// The page was missing and is now filled; its waiters are woken.
    Placed,
    /// The page was already there (QEMU's destination would stop on this: EEXIST).
    AlreadyPresent,
}

/// Why the synthetic RAM could not be set up or a page placed.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    /// Creating or mapping the memfd failed.
    #[error("synthetic RAM: {0}")]
    Setup(String),
    /// `UFFDIO_COPY` failed.
    #[error("placing page {offset:#x}: {reason}")]
    Place {
        /// Offset.
        offset: u64,
        /// Why.
        reason: String,
    },
}

/// Guest RAM of the synthetic destination.
pub struct SynthRam {
    file: File,
    base: usize,
    len: usize,
    /// Its page size: [`PAGE`], or 2 MiB for hugepage RAM ([`SynthRam::hugetlb`]).
    page: usize,
    uffd: Uffd,
}

impl SynthRam {
    /// `pages` pages of RAM, all missing, registered with a new userfaultfd.
    pub fn new(pages: usize) -> Result<SynthRam, SynthError> {
        SynthRam::with_pages(pages, PAGE)
    }

    /// `pages` 2 MiB huge pages of RAM in a hugetlbfs memfd, as QEMU's
    /// `memory-backend-memfd,hugetlb=on`: a fault and a placement are a whole huge page.
    /// The host needs that many free hugepages.
    pub fn hugetlb(pages: usize) -> Result<SynthRam, SynthError> {
        SynthRam::with_pages(pages, 2 << 20)
    }

    fn with_pages(pages: usize, page: usize) -> Result<SynthRam, SynthError> {
        let setup = |what: &str, e: String| SynthError::Setup(format!("{what}: {e}"));
        let mut flags = nix::sys::memfd::MFdFlags::MFD_CLOEXEC;
        let mut features = FeatureFlags::MISSING_SHMEM;
        if page > PAGE {
            flags |= nix::sys::memfd::MFdFlags::MFD_HUGETLB;
            features |= FeatureFlags::MISSING_HUGETLBFS;
        }
        let fd = nix::sys::memfd::memfd_create(c"synthetic-guest-ram", flags)
            .map_err(|e| setup("memfd_create", e.to_string()))?;
        let file = File::from(fd);
        let len = pages * page;
        file.set_len(len as u64)
            .map_err(|e| setup("sizing the memfd", e.to_string()))?;
        let nz = NonZeroUsize::new(len).ok_or_else(|| setup("size", "no pages".into()))?;
        // SAFETY: a new shared mapping of our own memfd, unmapped in Drop.
        let base = unsafe {
            nix::sys::mman::mmap(
                None,
                nz,
                nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
                nix::sys::mman::MapFlags::MAP_SHARED,
                file.as_fd(),
                0,
            )
        }
        .map_err(|e| setup("mmap", e.to_string()))?
        .as_ptr() as usize;
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .require_features(features)
            .create()
            .map_err(|e| setup("userfaultfd", e.to_string()))?;
        uffd.register(base as *mut _, len)
            .map_err(|e| setup("UFFDIO_REGISTER", e.to_string()))?;
        Ok(SynthRam {
            file,
            base,
            len,
            page,
            uffd,
        })
    }

    /// Number of pages.
    pub fn pages(&self) -> usize {
        self.len / self.page
    }

    /// Where this "QEMU" maps its RAM: what the guard reads presence from on hugepage RAM.
    pub fn base(&self) -> usize {
        self.base
    }

    /// The memfd (what a sidecar would open through `/proc/PID/fd`).
    pub fn memfd(&self) -> &File {
        &self.file
    }

    /// The destination's own userfaultfd.
    pub fn uffd(&self) -> &Uffd {
        &self.uffd
    }

    /// Byte offset of a faulting address, page aligned; `None` outside the RAM.
    pub fn offset_of(&self, addr: usize) -> Option<u64> {
        (addr >= self.base && addr < self.base + self.len)
            .then(|| ((addr - self.base) / self.page * self.page) as u64)
    }

    /// Reads the first byte of page `page` as a vCPU would: a missing page blocks the caller
    /// until it is placed.
    pub fn touch(&self, page: usize) -> u8 {
        assert!(page < self.pages(), "page {page} outside the synthetic RAM");
        // SAFETY: inside our live mapping; volatile, since placement writes it from the
        // kernel behind our back.
        unsafe { std::ptr::read_volatile((self.base + page * self.page) as *const u8) }
    }

    /// Places `data` (one page) at `offset` with `UFFDIO_COPY` and wakes its waiters.
    pub fn place(&self, offset: u64, data: &[u8]) -> Result<Placement, SynthError> {
        let page = self.page;
        assert_eq!(data.len(), page);
        let dst = (self.base + offset as usize) as *mut std::ffi::c_void;
        loop {
            // SAFETY: `data` is one readable page; `dst` is a page of our registered range.
            let r = unsafe { self.uffd.copy(data.as_ptr().cast(), dst, page, true) };
            return match r {
                Ok(_) => Ok(Placement::Placed),
                Err(userfaultfd::Error::CopyFailed(e)) if e as i32 == nix::libc::EEXIST => {
                    // Someone else placed it; make sure nobody still sleeps on it.
                    let _ = self.uffd.wake(dst, page);
                    Ok(Placement::AlreadyPresent)
                }
                // EAGAIN (the crate reports it as a partial copy, bytecodealliance/
                // userfaultfd-rs#91): the mm changed under the copy; try again.
                Err(userfaultfd::Error::PartiallyCopied(_)) => continue,
                Err(e) => Err(SynthError::Place {
                    offset,
                    reason: e.to_string(),
                }),
            };
        }
    }
}

impl Drop for SynthRam {
    fn drop(&mut self) {
        let _ = self.uffd.unregister(self.base as *mut _, self.len);
        if let Some(p) = std::ptr::NonNull::new(self.base as *mut std::ffi::c_void) {
            // SAFETY: our own mapping; nothing uses it after drop.
            let _ = unsafe { nix::sys::mman::munmap(p, self.len) };
        }
    }
}

/// The content the synthetic source holds for page `page`: distinct per page and seed, so
/// a wrong or stale page is always caught.
pub fn page_content(page: usize, seed: u64, out: &mut [u8]) {
    let mut x = (page as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed;
    for chunk in out.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
}
