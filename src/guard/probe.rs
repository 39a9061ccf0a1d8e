//! Non-allocating questions about a shared memfd: is a page there, and what does it hold?
//!
//! The destination's guest RAM is a shmem file. For shmem, a page is *missing* until
//! something puts it in the page cache; QEMU's postcopy places pages there with
//! `UFFDIO_COPY`. A read *fault* through any `MAP_SHARED` mapping of a missing page
//! allocates a zero page in the file (QEMU's later placement then fails with EEXIST and the
//! migration stops), but these two calls answer without allocating, which the tests below
//! check on the running kernel:
//! - `lseek(SEEK_DATA)` at a page's offset returns that offset exactly when the page is in
//!   the page cache;
//! - `pread` of a hole returns zeroes and leaves the hole.
//!
//! A page appears in the page cache only after `UFFDIO_COPY` has filled it, so "present"
//! also means "complete" for postcopy placements (protocol-spec/guarded-access.md#guard-presence).
//!
//! A hugetlbfs memfd has no `SEEK_DATA` of its own (it answers "data" everywhere), so for
//! hugepage RAM [`Presence::QemuMapping`] asks instead whether QEMU's own mapping maps the
//! huge page, from QEMU's `/proc/PID/pagemap`: QEMU places a huge page with `UFFDIO_COPY`
//! into that mapping, its precopy loader writes through it, and a discard punches the
//! page out of the file and every mapping (protocol-spec/guarded-access.md#guard-hugepages).

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;

use nix::errno::Errno;
use nix::unistd::{Whence, lseek};

/// Whether the page at byte `offset` (page aligned) of `file` is in its page cache.
pub fn is_present(file: &File, offset: u64) -> std::io::Result<bool> {
    match lseek(file.as_fd(), offset as i64, Whence::SeekData) {
        Ok(at) => Ok(at as u64 == offset),
        // ENXIO: no data at or after `offset`.
        Err(Errno::ENXIO) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// How the guard asks whether a page of one block is there without allocating it.
#[derive(Debug)]
pub enum Presence {
    /// A shmem memfd: `SEEK_DATA` on the file answers from its page cache.
    PageCache,
    /// A hugetlbfs memfd: whether QEMU's mapping of the file at `hva` maps the page.
    QemuMapping {
        /// QEMU's `/proc/PID/pagemap`, opened once (it needs the same ptrace-read
        /// access as QEMU's `/proc/PID/fd`).
        pagemap: File,
        /// Where QEMU maps the block's file (its host virtual address).
        hva: u64,
    },
}

/// Bit 63 of a pagemap entry: the page is present in that process's page tables.
const PAGEMAP_PRESENT: u64 = 1 << 63;

impl Presence {
    /// Presence from QEMU `pid`'s mapping of the block at `hva`.
    pub fn qemu_mapping(pid: u32, hva: u64) -> std::io::Result<Presence> {
        Ok(Presence::QemuMapping {
            pagemap: File::open(format!("/proc/{pid}/pagemap"))?,
            hva,
        })
    }

    /// Whether the page at byte `offset` (page aligned) of `file` is there.
    pub fn is_present(&self, file: &File, offset: u64) -> std::io::Result<bool> {
        match self {
            Presence::PageCache => is_present(file, offset),
            Presence::QemuMapping { pagemap, hva } => {
                // One 8-byte entry per 4 KiB of virtual address space, whatever the page
                // size; a huge page sets it for each of its 4 KiB parts.
                let mut entry = [0u8; 8];
                pagemap.read_exact_at(&mut entry, (hva + offset) / 4096 * 8)?;
                Ok(u64::from_ne_bytes(entry) & PAGEMAP_PRESENT != 0)
            }
        }
    }
}

/// Reads `out.len()` bytes at `offset` with `pread`: a hole reads as zeroes and stays a
/// hole. Only call it where zeroes are the right answer for a hole (after the migration
/// ended); while pages are in flight a hole is *not* a zero page.
pub fn read_at(file: &File, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
    file.read_exact_at(out, offset)
}

/// Bytes of `file` that are allocated (from `st_blocks`), for checking that nothing
/// allocated pages that must stay holes.
pub fn allocated_bytes(file: &File) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(file.metadata()?.blocks() * 512)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: usize = 4096;

    fn memfd(pages: usize) -> File {
        let fd =
            nix::sys::memfd::memfd_create(c"probe-test", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
                .unwrap();
        let f = File::from(fd);
        f.set_len((pages * PAGE) as u64).unwrap();
        f
    }

    #[test]
    fn seek_data_tells_placed_pages_from_holes_without_allocating() {
        let f = memfd(8);
        assert!(!is_present(&f, 0).unwrap());
        assert!(!is_present(&f, 3 * PAGE as u64).unwrap());
        f.write_all_at(&[7u8; PAGE], 3 * PAGE as u64).unwrap();
        assert!(is_present(&f, 3 * PAGE as u64).unwrap());
        assert!(
            !is_present(&f, 2 * PAGE as u64).unwrap(),
            "a hole before data"
        );
        assert!(
            !is_present(&f, 4 * PAGE as u64).unwrap(),
            "a hole after data"
        );
        assert_eq!(allocated_bytes(&f).unwrap(), PAGE as u64);
    }

    #[test]
    fn pread_of_a_hole_reads_zeroes_and_leaves_the_hole() {
        let f = memfd(4);
        let mut buf = vec![1u8; PAGE];
        read_at(&f, PAGE as u64, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        assert!(!is_present(&f, PAGE as u64).unwrap());
        assert_eq!(allocated_bytes(&f).unwrap(), 0);
    }

    /// Hugetlbfs: `SEEK_DATA` cannot tell a huge page from a hole, the owner's pagemap
    /// can, and neither the pagemap nor a `pread` of the hole allocates it.
    #[test]
    fn hugetlb_pages_are_told_apart_by_the_owners_pagemap_without_allocating() {
        const HUGE: usize = 2 << 20;
        crate::lab::reserve_hugepages(2).expect("two free 2 MiB hugepages (as root)");
        let fd = nix::sys::memfd::memfd_create(
            c"probe-huge",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC | nix::sys::memfd::MFdFlags::MFD_HUGETLB,
        )
        .unwrap();
        let f = File::from(fd);
        f.set_len(2 * HUGE as u64).unwrap();
        let len = std::num::NonZeroUsize::new(2 * HUGE).unwrap();
        // SAFETY: a fresh shared mapping of our own memfd (the "QEMU" side), unmapped below.
        let map = unsafe {
            nix::sys::mman::mmap(
                None,
                len,
                nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
                nix::sys::mman::MapFlags::MAP_SHARED,
                &f,
                0,
            )
            .unwrap()
        };
        // SAFETY: inside the mapping: the owner writes its first huge page.
        unsafe { std::ptr::write_volatile(map.as_ptr().cast::<u8>().add(5), 9) };
        assert!(
            is_present(&f, HUGE as u64).unwrap(),
            "hugetlbfs answers SEEK_DATA for a hole too (what this oracle replaces)"
        );
        let p = Presence::qemu_mapping(std::process::id(), map.as_ptr() as u64).unwrap();
        assert!(p.is_present(&f, 0).unwrap());
        assert!(
            p.is_present(&f, 77 * PAGE as u64).unwrap(),
            "inside the huge page"
        );
        assert!(
            !p.is_present(&f, HUGE as u64).unwrap(),
            "the second is a hole"
        );
        let mut buf = vec![1u8; PAGE];
        read_at(&f, HUGE as u64, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        assert!(
            !p.is_present(&f, HUGE as u64).unwrap(),
            "pread left the hole"
        );
        assert_eq!(allocated_bytes(&f).unwrap(), HUGE as u64);
        // SAFETY: the mapping made above.
        unsafe { nix::sys::mman::munmap(map, 2 * HUGE).unwrap() };
    }

    /// The hazard itself: a read fault through a shared mapping allocates the page.
    #[test]
    fn a_read_fault_through_a_shared_mapping_allocates_the_page() {
        let f = memfd(4);
        let len = std::num::NonZeroUsize::new(4 * PAGE).unwrap();
        // SAFETY: a fresh shared mapping of our own memfd, unmapped below.
        let map = unsafe {
            nix::sys::mman::mmap(
                None,
                len,
                nix::sys::mman::ProtFlags::PROT_READ,
                nix::sys::mman::MapFlags::MAP_SHARED,
                &f,
                0,
            )
            .unwrap()
        };
        // SAFETY: inside the mapping.
        let v = unsafe { std::ptr::read_volatile(map.as_ptr().cast::<u8>().add(2 * PAGE)) };
        assert_eq!(v, 0);
        assert!(
            is_present(&f, 2 * PAGE as u64).unwrap(),
            "the read fault allocated the page"
        );
        // SAFETY: the mapping made above.
        unsafe { nix::sys::mman::munmap(map, 4 * PAGE).unwrap() };
    }
}
