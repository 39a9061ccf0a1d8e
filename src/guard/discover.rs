//! Finding the destination QEMU's guest-RAM memfds from outside, without trusting QEMU:
//! which process it is (the one holding its QMP listening socket), which of its file
//! descriptors are memfds, and which memfd backs which RAM block
//! (protocol-spec/guarded-access.md#guard-discovery).
//!
//! - QEMU 10.0 prints each block's host address (`x-query-ramblock`, HVA); the mapping
//!   at that address in `/proc/PID/maps` names the memfd's inode.
//! - QEMU 7.2 prints no address; a memory backend's block is then matched by size among
//!   the memfds, and two equal candidates are an error rather than a guess.
//!
//! Opening `/proc/PID/fd/N` needs ptrace-read access to QEMU and access to the directory,
//! which is mode 0500 of QEMU's uid: the same uid, or `CAP_SYS_PTRACE` together with
//! `CAP_DAC_READ_SEARCH` (measured with a libvirt-started QEMU); the error says so.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::probe::Presence;
use crate::qmp::{MemoryBackend, RamBlock};

/// One guest-RAM block backed by a memfd, opened in the sidecar.
#[derive(Debug)]
pub struct RamFile {
    /// Block idstr (the backend id).
    pub block: String,
    /// Bytes the block uses (what migrates).
    pub length: u64,
    /// The memfd, opened through `/proc/PID/fd/N` (read-write, see `open`).
    pub file: File,
    /// The path it was opened by.
    pub path: PathBuf,
    /// The block's page size: 4 KiB, or a huge page size for a hugetlbfs memfd, which the
    /// guard then faults, asks for and wakes as a whole.
    pub page_size: u64,
    /// How to ask whether a page is there without allocating it.
    pub presence: Presence,
}

/// Why the memfds could not be found or opened.
#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    /// No process holds the QMP socket.
    #[error(
        "cannot find the QEMU process behind {qmp}: no process holds its listening socket (is /proc mounted and is QEMU in this pid namespace?)"
    )]
    NoProcess {
        /// The QMP socket.
        qmp: PathBuf,
    },
    /// Reading `/proc` failed.
    #[error("reading {path}: {source}")]
    Proc {
        /// What was read.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Access denied: the sidecar lacks the privilege.
    #[error(
        "opening {path}: {source}; to open QEMU's guest-RAM memfd (and, for hugepage RAM, its pagemap) the sidecar needs ptrace-read access to QEMU (pid {pid}, uid {uid}) and access to its /proc/PID/fd: run it as uid {uid}, or give it CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH"
    )]
    Privilege {
        /// What was opened.
        path: PathBuf,
        /// QEMU's pid.
        pid: u32,
        /// QEMU's uid.
        uid: u32,
        /// The denial.
        source: std::io::Error,
    },
    /// A memfd backend has no matching memfd in QEMU.
    #[error("RAM block {block}: no memfd of QEMU (pid {pid}) matches it ({detail})")]
    NotFound {
        /// Block idstr.
        block: String,
        /// QEMU's pid.
        pid: u32,
        /// What was looked for.
        detail: String,
    },
    /// A block whose page size is not a power of two of at least 4 KiB.
    #[error("RAM block {block} reports a {page_size}-byte page size, which no memfd has")]
    PageSize {
        /// Block idstr.
        block: String,
        /// Its page size.
        page_size: u64,
    },
    /// QEMU does not map a hugepage block's memfd, so its pages cannot be looked for.
    #[error(
        "RAM block {block}: QEMU (pid {pid}) does not map its hugetlbfs memfd; the guard finds a huge page's presence in QEMU's mapping"
    )]
    Unmapped {
        /// Block idstr.
        block: String,
        /// QEMU's pid.
        pid: u32,
    },
    /// Several memfds match (QEMU 7.2, equal sizes).
    #[error(
        "RAM block {block}: {count} memfds of QEMU have its size and QEMU 7.2 does not say which is which; give each backend a distinct size or use QEMU 10.0"
    )]
    Ambiguous {
        /// Block idstr.
        block: String,
        /// Candidates.
        count: usize,
    },
}

fn proc_err(path: &Path) -> impl FnOnce(std::io::Error) -> DiscoverError + '_ {
    move |source| DiscoverError::Proc {
        path: path.to_path_buf(),
        source,
    }
}

/// Inode of the listening unix socket bound at `path`, from `/proc/net/unix`.
fn listening_inode(path: &Path) -> Result<Option<u64>, DiscoverError> {
    let table = Path::new("/proc/net/unix");
    let text = std::fs::read_to_string(table).map_err(proc_err(table))?;
    let want = path.to_string_lossy();
    // Columns: Num RefCount Protocol Flags Type St Inode Path; flag 0x10000 = listening.
    Ok(text.lines().skip(1).find_map(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        let listening = u64::from_str_radix(cols.get(3)?, 16).ok()? & 0x10000 != 0;
        (listening && *cols.get(7)? == want).then(|| cols.get(6)?.parse().ok())?
    }))
}

/// Whether process `pid` has socket `inode` open.
fn holds_socket(pid: u32, inode: u64) -> bool {
    let want = format!("socket:[{inode}]");
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten().any(|e| {
                std::fs::read_link(e.path())
                    .map(|l| l.as_os_str() == want.as_str())
                    .unwrap_or(false)
            })
        })
        .unwrap_or(false)
}

/// The pid of the QEMU serving the QMP socket at `qmp`. `hint` (the socket peer's pid) is
/// tried first; it is QEMU's when QEMU created the socket itself, but the pid of whoever
/// called `listen()` when QEMU inherited a listening socket, so it is checked.
pub fn qemu_pid(qmp: &Path, hint: Option<u32>) -> Result<u32, DiscoverError> {
    let qmp = std::fs::canonicalize(qmp).unwrap_or_else(|_| qmp.to_path_buf());
    let inode =
        listening_inode(&qmp)?.ok_or_else(|| DiscoverError::NoProcess { qmp: qmp.clone() })?;
    if let Some(p) = hint.filter(|&p| holds_socket(p, inode)) {
        return Ok(p);
    }
    let procs = Path::new("/proc");
    let entries = std::fs::read_dir(procs).map_err(proc_err(procs))?;
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|&p| p != std::process::id() && holds_socket(p, inode))
        .ok_or(DiscoverError::NoProcess { qmp })
}

/// A memfd file descriptor of QEMU.
#[derive(Debug, Clone)]
struct Memfd {
    fd_path: PathBuf,
    inode: u64,
    size: u64,
}

fn memfds(pid: u32) -> Result<Vec<Memfd>, DiscoverError> {
    let dir = PathBuf::from(format!("/proc/{pid}/fd"));
    let entries = std::fs::read_dir(&dir).map_err(proc_err(&dir))?;
    let mut out = Vec::new();
    for e in entries.flatten() {
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        if !target.to_string_lossy().starts_with("/memfd:") {
            continue;
        }
        // stat through the magic link reaches the memfd itself.
        let Ok(meta) = std::fs::metadata(e.path()) else {
            continue;
        };
        out.push(Memfd {
            fd_path: e.path(),
            inode: meta.ino(),
            size: meta.len(),
        });
    }
    Ok(out)
}

/// Start address → inode of QEMU's shared memfd mappings.
fn memfd_mappings(pid: u32) -> Result<HashMap<u64, u64>, DiscoverError> {
    let path = PathBuf::from(format!("/proc/{pid}/maps"));
    let text = std::fs::read_to_string(&path).map_err(proc_err(&path))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            if !cols.get(5)?.starts_with("/memfd:") {
                return None;
            }
            let start = u64::from_str_radix(cols[0].split('-').next()?, 16).ok()?;
            Some((start, cols.get(4)?.parse().ok()?))
        })
        .collect())
}

/// Opens QEMU's memfd read-write: the kernel lets userfaultfd guard only shared mappings
/// that could be made writable (`VM_MAYWRITE`), although the sidecar maps it read-only and
/// never writes to it.
fn open(m: &Memfd, pid: u32) -> Result<File, DiscoverError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&m.fd_path)
        .map_err(|source| denied(&m.fd_path, pid, source))
}

/// A failed open of QEMU's `/proc/PID/...`: a privilege error names what would grant it.
fn denied(path: &Path, pid: u32, source: std::io::Error) -> DiscoverError {
    if matches!(source.kind(), std::io::ErrorKind::PermissionDenied)
        || source.raw_os_error() == Some(nix::libc::EPERM)
    {
        let uid = std::fs::metadata(format!("/proc/{pid}"))
            .map(|m| m.uid())
            .unwrap_or(u32::MAX);
        DiscoverError::Privilege {
            path: path.to_path_buf(),
            pid,
            uid,
            source,
        }
    } else {
        DiscoverError::Proc {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Opens the memfd behind every memfd-backed block of QEMU `pid`. Blocks without a memfd
/// backend (ROMs, firmware) are not returned: they live in QEMU's private memory.
pub fn ram_files(
    pid: u32,
    blocks: &[RamBlock],
    backends: &[MemoryBackend],
) -> Result<Vec<RamFile>, DiscoverError> {
    let fds = memfds(pid)?;
    let maps = memfd_mappings(pid)?;
    let mut claimed: Vec<u64> = Vec::new();
    let mut out = Vec::new();
    for backend in backends
        .iter()
        .filter(|b| b.qom_type == "memory-backend-memfd")
    {
        let Some(block) = blocks.iter().find(|b| b.name == backend.id) else {
            continue;
        };
        if block.page_size < 4096 || !block.page_size.is_power_of_two() {
            return Err(DiscoverError::PageSize {
                block: block.name.clone(),
                page_size: block.page_size,
            });
        }
        let found = match block.hva {
            Some(hva) => {
                let inode = maps.get(&hva).copied();
                fds.iter()
                    .find(|m| Some(m.inode) == inode)
                    .cloned()
                    .ok_or_else(|| DiscoverError::NotFound {
                        block: block.name.clone(),
                        pid,
                        detail: format!("a memfd mapped at {hva:#x}"),
                    })?
            }
            None => {
                let candidates: Vec<&Memfd> = fds
                    .iter()
                    .filter(|m| m.size == block.total && !claimed.contains(&m.inode))
                    .collect();
                match candidates.as_slice() {
                    [one] => (*one).clone(),
                    [] => {
                        return Err(DiscoverError::NotFound {
                            block: block.name.clone(),
                            pid,
                            detail: format!("a memfd of {} bytes", block.total),
                        });
                    }
                    many => {
                        return Err(DiscoverError::Ambiguous {
                            block: block.name.clone(),
                            count: many.len(),
                        });
                    }
                }
            }
        };
        claimed.push(found.inode);
        let presence = if block.page_size == 4096 {
            Presence::PageCache
        } else {
            // hugetlbfs answers SEEK_DATA everywhere: look in QEMU's own mapping instead
            // (protocol-spec/guarded-access.md#guard-hugepages).
            let hva = block
                .hva
                .or_else(|| {
                    maps.iter()
                        .filter(|(_, ino)| **ino == found.inode)
                        .map(|(start, _)| *start)
                        .min()
                })
                .ok_or_else(|| DiscoverError::Unmapped {
                    block: block.name.clone(),
                    pid,
                })?;
            let path = PathBuf::from(format!("/proc/{pid}/pagemap"));
            Presence::qemu_mapping(pid, hva).map_err(|source| denied(&path, pid, source))?
        };
        out.push(RamFile {
            block: block.name.clone(),
            length: block.used,
            file: open(&found, pid)?,
            path: found.fd_path.clone(),
            page_size: block.page_size,
            presence,
        });
    }
    Ok(out)
}
