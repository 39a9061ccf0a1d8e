//! The sidecar's own view of the destination's guest RAM: each memfd mapped shared and
//! read-only, and registered with the sidecar's own userfaultfd (missing mode on shmem)
//! before postcopy begins (protocol-spec/guarded-access.md#guard-faults).
//!
//! A read of a page that is not in the memfd's page cache, by any thread of the sidecar or
//! by the kernel on its behalf (a syscall copying from the mapping), becomes a fault on
//! the sidecar's userfaultfd instead of allocating a zero page. The guard thread then:
//! 1. waits, while the destination is still in precopy, until the destination has passed
//!    PONG(2): until then QEMU may be half way through a plain-store precopy write, or
//!    still hold a precopy copy of a page whose discard is in flight to it, so a present
//!    page is not final. [`GuardedRam::read_page`] therefore waits for that point before it
//!    touches the mapping at all, present page or not;
//! 2. asks for the page through [`PageWanted`] (the return path the sidecar took over,
//!    ahead of the destination's own requests) if it is missing in postcopy;
//! 3. looks until QEMU has placed it (`UFFDIO_COPY` fills a page before it enters the page
//!    cache, so present means complete) and wakes the reader, whose retried fault then maps
//!    QEMU's page. It looks with `SEEK_DATA` on a shmem memfd, and in QEMU's own mapping
//!    on a hugetlbfs one ([`probe::Presence`]).
//!
//! On hugepage RAM the unit of all this is the block's huge page: a fault anywhere in it
//! waits for the whole page, which is asked for whole, as the destination asks for it.
//!
//! Nothing here ever places a page into the memfd. When the migration ends, or fails,
//! readers still waiting are given a private zero page over their address (a fresh
//! anonymous mapping, never the memfd) and woken: after a completed migration a page that
//! was never placed is a zero page; after a failure [`GuardedRam::read_page`] reports it.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::mman::{MapFlags, ProtFlags};
use serde::Serialize;
use userfaultfd::{Event, FeatureFlags, Uffd, UffdBuilder};

use super::discover::RamFile;
use super::probe;
use crate::figures::LatencyFigures;

/// Target page size of the guarded mapping (x86 guests on 4 KiB host pages).
pub const PAGE: u64 = 4096;

/// How often waiting pages are checked for placement. QEMU's placement cannot be waited
/// on from outside, so the guard looks; 50 µs keeps the added latency small next to a
/// fault's round trip to the source.
pub const PLACEMENT_POLL: Duration = Duration::from_micros(50);

/// Called by the guard thread with (block index, byte offset, length) of a page it needs
/// that the stream has not brought (a whole huge page on hugepage RAM): the receiver asks
/// the source for it.
pub type PageWanted = Box<dyn Fn(usize, u64, u64) + Send + Sync>;

/// Why guarded access failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GuardError {
    /// Creating the userfaultfd failed.
    #[error(
        "creating the sidecar's userfaultfd: {0}; the sidecar needs read-write access to /dev/userfaultfd, or CAP_SYS_PTRACE, or vm.unprivileged_userfaultfd=1"
    )]
    Userfaultfd(String),
    /// Mapping or registering a block failed.
    #[error("guarding RAM block {block}: {what}: {reason}")]
    Map {
        /// Block idstr.
        block: String,
        /// What was being done.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// The migration failed while the page was awaited; it was never read.
    #[error(
        "page {offset:#x} of RAM block {block} was awaited when the migration failed ({reason}); it was not read"
    )]
    Failed {
        /// Block idstr.
        block: String,
        /// Offset.
        offset: u64,
        /// The failure.
        reason: String,
    },
    /// A block index or offset outside the guarded blocks.
    #[error("no guarded page {offset:#x} in block #{block}")]
    OutOfRange {
        /// Block index.
        block: usize,
        /// Offset.
        offset: u64,
    },
    /// Reading through `pread` failed.
    #[error("reading page {offset:#x} of RAM block {block}: {reason}")]
    Read {
        /// Block idstr.
        block: String,
        /// Offset.
        offset: u64,
        /// Why.
        reason: String,
    },
}

/// Where the destination's migration is, as far as guarded reads care.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Before PONG(2): pages may be half written by QEMU's precopy loader; reads wait.
    Precopy,
    /// Postcopy placements are atomic: a present page is complete, a missing one is asked.
    Postcopy,
    /// The migration completed: every page is final, holes are zero pages.
    Ended,
    /// The migration failed: waiting reads fail.
    Failed(String),
}

/// What the guard did.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct GuardFigures {
    /// Faults on the sidecar's userfaultfd.
    pub faults: u64,
    /// Pages asked of the source on the guard's behalf.
    pub requested: u64,
    /// Readers woken after QEMU placed their page.
    pub woken: u64,
    /// Readers given a private zero page when the migration ended or failed.
    pub resolved_at_end: u64,
    /// Fault → wake, µs.
    pub wait: LatencyFigures,
}

struct Block {
    name: String,
    file: File,
    length: u64,
    base: usize,
    map_len: usize,
    /// Faults, requests, wakes and zero overlays are in units of this.
    page_size: u64,
    presence: probe::Presence,
}

#[derive(Clone, Copy)]
struct Waiter {
    since: Instant,
    requested: bool,
}

struct State {
    phase: Phase,
    waiting: HashMap<(usize, u64), Waiter>,
    /// Pages covered by a private zero page (see the module comment).
    overlaid: HashSet<(usize, u64)>,
    figures: GuardFigures,
    wait: Histogram<u64>,
}

struct Inner {
    uffd: Uffd,
    blocks: Vec<Block>,
    state: Mutex<State>,
    /// Signalled on every phase change: readers wait on it while in precopy.
    phase_changed: Condvar,
    poke: EventFd,
    stop: AtomicBool,
    wanted: PageWanted,
}

/// The destination's memfd-backed RAM, mapped and guarded (see the module comment).
pub struct GuardedRam {
    inner: Arc<Inner>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl GuardedRam {
    /// Maps and registers every file; `wanted` is called for pages to ask of the source.
    pub fn new(files: Vec<RamFile>, wanted: PageWanted) -> Result<GuardedRam, GuardError> {
        let mut features = FeatureFlags::MISSING_SHMEM;
        if files.iter().any(|f| f.page_size > PAGE) {
            features |= FeatureFlags::MISSING_HUGETLBFS;
        }
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            // Kernel-mode faults too: a syscall reading the mapping must block, not fail.
            .user_mode_only(false)
            .require_features(features)
            .create()
            .map_err(|e| GuardError::Userfaultfd(e.to_string()))?;
        let mut blocks = Vec::new();
        for f in files {
            let page_size = f.page_size.max(PAGE);
            let map_len = f.length.div_ceil(page_size) * page_size;
            let err = |what, reason: String| GuardError::Map {
                block: f.block.clone(),
                what,
                reason,
            };
            let len = NonZeroUsize::new(map_len as usize)
                .ok_or_else(|| err("mapping", "the block is empty".into()))?;
            // SAFETY: a new shared read-only mapping of the memfd; we never write through it
            // and unmap it only in Drop, after the guard thread stopped.
            let base = unsafe {
                nix::sys::mman::mmap(
                    None,
                    len,
                    ProtFlags::PROT_READ,
                    MapFlags::MAP_SHARED | MapFlags::MAP_NORESERVE,
                    &f.file,
                    0,
                )
            }
            .map_err(|e| err("mapping", e.to_string()))?;
            let base = base.as_ptr() as usize;
            let block = Block {
                name: f.block.clone(),
                file: f.file,
                length: f.length,
                base,
                map_len: map_len as usize,
                page_size,
                presence: f.presence,
            };
            if let Err(e) = uffd.register(base as *mut _, map_len as usize) {
                // SAFETY: the mapping made just above.
                unsafe { unmap(&block) };
                return Err(err("registering with userfaultfd", format!("{e:?}")));
            }
            blocks.push(block);
        }
        let poke = EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
            .map_err(|e| GuardError::Userfaultfd(format!("eventfd: {e}")))?;
        let inner = Arc::new(Inner {
            uffd,
            blocks,
            state: Mutex::new(State {
                phase: Phase::Precopy,
                waiting: HashMap::new(),
                overlaid: HashSet::new(),
                figures: GuardFigures::default(),
                wait: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("histogram bounds"),
            }),
            phase_changed: Condvar::new(),
            poke,
            stop: AtomicBool::new(false),
            wanted,
        });
        let worker = inner.clone();
        let thread = std::thread::Builder::new()
            .name("guard-faults".into())
            .spawn(move || worker.run())
            .map_err(|e| GuardError::Userfaultfd(format!("starting the fault thread: {e}")))?;
        Ok(GuardedRam {
            inner,
            thread: Some(thread),
        })
    }

    /// Guarded blocks: (idstr, length).
    pub fn blocks(&self) -> Vec<(String, u64)> {
        self.inner
            .blocks
            .iter()
            .map(|b| (b.name.clone(), b.length))
            .collect()
    }

    /// Index of the guarded block named `name`.
    pub fn block_index(&self, name: &str) -> Option<usize> {
        self.inner.blocks.iter().position(|b| b.name == name)
    }

    /// Moves to `phase` (the receiver tells the guard what the stream showed).
    pub fn set_phase(&self, phase: Phase) {
        let mut st = self.inner.lock();
        let next = match (&st.phase, phase) {
            // Never back: ended or failed is final.
            (Phase::Ended | Phase::Failed(_), _) => return,
            (_, p) => p,
        };
        st.phase = next;
        drop(st);
        self.inner.phase_changed.notify_all();
        self.inner.poke();
    }

    /// Blocks until the destination has left precopy and returns the phase it is in.
    ///
    /// Until PONG(2) the destination may still hold a precopy copy of a page that the
    /// source has discarded since (the discard is still in flight to QEMU), or be half way
    /// through writing one: a present page is not yet final, so nothing may read one.
    pub fn wait_past_precopy(&self) -> Phase {
        let st = self.inner.lock();
        let st = self
            .inner
            .phase_changed
            .wait_while(st, |s| s.phase == Phase::Precopy)
            .unwrap_or_else(|p| p.into_inner());
        st.phase.clone()
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.inner.lock().phase.clone()
    }

    /// Tells the guard that pages arrived, so it looks for placements at once.
    pub fn poke(&self) {
        self.inner.poke();
    }

    /// Reads one page (`offset` page aligned) of guarded block `block` into `out` (one page
    /// long). A missing page blocks the caller in the kernel until QEMU placed it (see the
    /// module comment); after the migration ended the page is read with `pread`.
    pub fn read_page(&self, block: usize, offset: u64, out: &mut [u8]) -> Result<(), GuardError> {
        let b = self
            .inner
            .blocks
            .get(block)
            .filter(|b| offset.is_multiple_of(PAGE) && offset < b.length)
            .ok_or(GuardError::OutOfRange { block, offset })?;
        let out = &mut out[..PAGE as usize];
        let phase = self.wait_past_precopy();
        if let Phase::Failed(reason) = phase {
            return Err(GuardError::Failed {
                block: b.name.clone(),
                offset,
                reason,
            });
        }
        if phase == Phase::Ended {
            return probe::read_at(&b.file, offset, out).map_err(|e| GuardError::Read {
                block: b.name.clone(),
                offset,
                reason: e.to_string(),
            });
        }
        // SAFETY: `base + offset .. + PAGE` lies inside this block's live mapping (checked
        // above; unmapped only in Drop, which needs `&mut self`). Volatile word reads:
        // another process writes this memory.
        unsafe {
            let src = (b.base as *const u64).add((offset / 8) as usize);
            for (i, chunk) in out.chunks_exact_mut(8).enumerate() {
                chunk.copy_from_slice(&std::ptr::read_volatile(src.add(i)).to_ne_bytes());
            }
        }
        let st = self.inner.lock();
        if st.overlaid.contains(&(block, offset))
            && let Phase::Failed(reason) = &st.phase
        {
            return Err(GuardError::Failed {
                block: b.name.clone(),
                offset,
                reason: reason.clone(),
            });
        }
        Ok(())
    }

    /// The guarded mapping of block `block` (address, length), for handing guarded memory
    /// to a syscall (e.g. a `write` to a socket): the kernel's own reads of a missing page
    /// wait on the guard like any other. Reading it directly is the caller's `unsafe`, and
    /// only after [`GuardedRam::wait_past_precopy`]: before that a present page may be stale.
    pub fn mapped(&self, block: usize) -> Option<(*const u8, usize)> {
        self.inner
            .blocks
            .get(block)
            .map(|b| (b.base as *const u8, b.length as usize))
    }

    /// What the guard did so far.
    pub fn figures(&self) -> GuardFigures {
        let st = self.inner.lock();
        let mut f = st.figures.clone();
        f.wait = crate::figures::latency_of(&st.wait);
        f
    }
}

impl Drop for GuardedRam {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        self.inner.poke();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Nobody may be left blocked on a mapping we remove: resolve them first.
        let mut st = self.inner.lock();
        if !matches!(st.phase, Phase::Ended | Phase::Failed(_)) {
            st.phase = Phase::Failed("the guard was stopped".into());
            self.inner.phase_changed.notify_all();
        }
        self.inner.resolve_all(&mut st);
        drop(st);
        for b in &self.inner.blocks {
            let _ = self.inner.uffd.unregister(b.base as *mut _, b.map_len);
            // SAFETY: the block's own mapping; no reader can be inside it any more (all
            // waiters were resolved and read_page borrows self).
            unsafe { unmap(b) };
        }
    }
}

/// # Safety
/// `b.base .. + b.map_len` must be a mapping this module made and nobody uses any more.
unsafe fn unmap(b: &Block) {
    if let Some(p) = std::ptr::NonNull::new(b.base as *mut std::ffi::c_void) {
        // SAFETY: guaranteed by the caller.
        let _ = unsafe { nix::sys::mman::munmap(p, b.map_len) };
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn poke(&self) {
        let _ = self.poke.write(1);
    }

    /// Whether QEMU has placed the page at `offset` of `block` (an error counts as not yet:
    /// the reader waits, nothing is allocated).
    fn is_present(&self, block: usize, offset: u64) -> bool {
        let b = &self.blocks[block];
        b.presence.is_present(&b.file, offset).unwrap_or(false)
    }

    fn locate(&self, addr: usize) -> Option<(usize, u64)> {
        self.blocks.iter().enumerate().find_map(|(i, b)| {
            (addr >= b.base && addr < b.base + b.map_len)
                .then(|| (i, ((addr - b.base) as u64) / b.page_size * b.page_size))
        })
    }

    fn wake(&self, block: usize, offset: u64) {
        let b = &self.blocks[block];
        let _ = self
            .uffd
            .wake((b.base + offset as usize) as *mut _, b.page_size as usize);
    }

    /// Covers a waiting page (a whole huge page on hugepage RAM) with a private zero page
    /// and wakes its reader.
    fn resolve(&self, st: &mut State, block: usize, offset: u64) {
        let b = &self.blocks[block];
        let addr = b.base + offset as usize;
        // SAFETY: replaces one page of our own mapping with a private anonymous page; the
        // memfd is not touched. MAP_FIXED over our own range is what we intend.
        let mapped = unsafe {
            nix::sys::mman::mmap_anonymous(
                NonZeroUsize::new(addr),
                NonZeroUsize::new(b.page_size as usize).expect("page"),
                ProtFlags::PROT_READ,
                MapFlags::MAP_PRIVATE | MapFlags::MAP_FIXED,
            )
        };
        if mapped.is_ok() {
            st.overlaid.insert((block, offset));
        }
        st.figures.resolved_at_end += 1;
        self.wake(block, offset);
    }

    /// At the end: a waiting page that QEMU placed is woken as usual; one that is still a
    /// hole gets a private zero page (the right content after a completed migration; after
    /// a failure the reader is told).
    fn resolve_all(&self, st: &mut State) {
        let failed = matches!(st.phase, Phase::Failed(_));
        let waiting: Vec<(usize, u64)> = st.waiting.drain().map(|(k, _)| k).collect();
        for (block, offset) in waiting {
            let present = !failed && self.is_present(block, offset);
            if present {
                st.figures.woken += 1;
                self.wake(block, offset);
            } else {
                self.resolve(st, block, offset);
            }
        }
    }

    fn run(self: Arc<Self>) {
        let mut events = userfaultfd::EventBuffer::new(64);
        loop {
            let waiting = !self.lock().waiting.is_empty();
            {
                use nix::poll::{PollFd, PollFlags};
                let mut fds = [
                    PollFd::new(self.uffd.as_fd(), PollFlags::POLLIN),
                    PollFd::new(self.poke.as_fd(), PollFlags::POLLIN),
                ];
                let timeout = if waiting {
                    PLACEMENT_POLL
                } else {
                    Duration::from_millis(100)
                };
                let ts = nix::sys::time::TimeSpec::from_duration(timeout);
                let _ = nix::poll::ppoll(&mut fds, Some(ts), None);
            }
            let _ = self.poke.read();
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            let mut st = self.lock();
            // New faults.
            if let Ok(iter) = self.uffd.read_events(&mut events) {
                for ev in iter.flatten() {
                    if let Event::Pagefault { addr, .. } = ev
                        && let Some(page) = self.locate(addr as usize)
                    {
                        st.figures.faults += 1;
                        st.waiting.entry(page).or_insert(Waiter {
                            since: Instant::now(),
                            requested: false,
                        });
                    }
                }
            }
            match st.phase.clone() {
                Phase::Ended | Phase::Failed(_) => {
                    self.resolve_all(&mut st);
                    continue;
                }
                Phase::Precopy => continue,
                Phase::Postcopy => {}
            }
            let now = Instant::now();
            let pages: Vec<((usize, u64), Waiter)> =
                st.waiting.iter().map(|(k, w)| (*k, *w)).collect();
            for ((block, offset), w) in pages {
                let present = self.is_present(block, offset);
                if present {
                    st.waiting.remove(&(block, offset));
                    let us = now.saturating_duration_since(w.since).as_micros() as u64;
                    let _ = st.wait.record(us.max(1));
                    st.figures.woken += 1;
                    self.wake(block, offset);
                } else if !w.requested {
                    if let Some(x) = st.waiting.get_mut(&(block, offset)) {
                        x.requested = true;
                    }
                    st.figures.requested += 1;
                    (self.wanted)(block, offset, self.blocks[block].page_size);
                }
            }
        }
    }
}

impl std::fmt::Debug for GuardedRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardedRam")
            .field("blocks", &self.blocks())
            .field("uffd", &self.inner.uffd.as_raw_fd())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::{SynthRam, page_content};
    use std::sync::mpsc;

    const P: usize = PAGE as usize;
    const HUGE: usize = 2 << 20;
    const WAIT: Duration = Duration::from_secs(10);

    /// A synthetic destination ("QEMU") and the guard over its memfd; requests go to `rx`.
    type Wanted = mpsc::Receiver<(usize, u64, u64)>;

    fn setup(pages: usize) -> (Arc<SynthRam>, Arc<GuardedRam>, Wanted) {
        let ram = Arc::new(SynthRam::new(pages).unwrap());
        let file = RamFile {
            block: "m".into(),
            length: (pages * P) as u64,
            file: ram.memfd().try_clone().unwrap(),
            path: "/proc/self/fd/x".into(),
            page_size: PAGE,
            presence: probe::Presence::PageCache,
        };
        guard_over(ram, file)
    }

    /// A synthetic "QEMU" on 2 MiB hugetlb pages, and the guard over it, which looks for
    /// placements in that "QEMU"'s mapping (this process's pagemap).
    fn setup_huge(pages: usize) -> (Arc<SynthRam>, Arc<GuardedRam>, Wanted) {
        crate::lab::reserve_hugepages(pages as u64).expect("free 2 MiB hugepages (as root)");
        let ram = Arc::new(SynthRam::hugetlb(pages).unwrap());
        let file = RamFile {
            block: "m".into(),
            length: (pages * HUGE) as u64,
            file: ram.memfd().try_clone().unwrap(),
            path: "/proc/self/fd/x".into(),
            page_size: HUGE as u64,
            presence: probe::Presence::qemu_mapping(std::process::id(), ram.base() as u64).unwrap(),
        };
        guard_over(ram, file)
    }

    fn guard_over(ram: Arc<SynthRam>, file: RamFile) -> (Arc<SynthRam>, Arc<GuardedRam>, Wanted) {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let guard = GuardedRam::new(
            vec![file],
            Box::new(move |b, off, len| {
                let _ = tx.lock().unwrap().send((b, off, len));
            }),
        )
        .unwrap();
        (ram, Arc::new(guard), rx)
    }

    fn reader(
        g: &Arc<GuardedRam>,
        offset: u64,
    ) -> std::thread::JoinHandle<Result<Vec<u8>, GuardError>> {
        let g = g.clone();
        std::thread::spawn(move || {
            let mut out = vec![0u8; P];
            g.read_page(0, offset, &mut out).map(|_| out)
        })
    }

    fn content(page: usize) -> Vec<u8> {
        let mut v = vec![0u8; P];
        page_content(page, 9, &mut v);
        v
    }

    /// Waits until `cond` holds (it is made true by another thread).
    fn eventually(cond: impl Fn() -> bool) {
        let deadline = Instant::now() + WAIT;
        while !cond() {
            assert!(Instant::now() < deadline, "condition never held");
            std::thread::yield_now();
        }
    }

    #[test]
    fn a_missing_page_is_asked_for_and_read_once_placed_without_allocating() {
        let (ram, g, rx) = setup(16);
        g.set_phase(Phase::Postcopy);
        let r = reader(&g, 5 * PAGE);
        assert_eq!(rx.recv_timeout(WAIT).unwrap(), (0, 5 * PAGE, PAGE));
        assert!(!r.is_finished(), "the reader waits for the page");
        assert_eq!(
            probe::allocated_bytes(ram.memfd()).unwrap(),
            0,
            "nothing allocated"
        );
        ram.place(5 * PAGE, &content(5)).unwrap();
        assert_eq!(r.join().unwrap().unwrap(), content(5));
        assert_eq!(probe::allocated_bytes(ram.memfd()).unwrap(), PAGE);
        let f = g.figures();
        assert_eq!((f.requested, f.woken), (1, 1));
        assert!(f.faults >= 1);
    }

    #[test]
    fn two_readers_of_one_page_cost_one_request() {
        let (ram, g, rx) = setup(8);
        g.set_phase(Phase::Postcopy);
        let a = reader(&g, 2 * PAGE);
        let b = reader(&g, 2 * PAGE);
        assert_eq!(rx.recv_timeout(WAIT).unwrap(), (0, 2 * PAGE, PAGE));
        eventually(|| g.figures().faults >= 2);
        ram.place(2 * PAGE, &content(2)).unwrap();
        assert_eq!(a.join().unwrap().unwrap(), content(2));
        assert_eq!(b.join().unwrap().unwrap(), content(2));
        assert!(rx.try_recv().is_err(), "a second request was sent");
    }

    #[test]
    fn in_precopy_a_read_waits_for_postcopy_even_if_the_page_is_there() {
        let (ram, g, rx) = setup(8);
        // Present before the read: in a real migration its discard may still be in flight.
        ram.place(3 * PAGE, &content(3)).unwrap();
        let r = reader(&g, 3 * PAGE);
        // A negative check: a correct reader stays blocked however long we look.
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !r.is_finished(),
            "precopy pages may be stale or half written: no read yet"
        );
        assert_eq!(
            g.figures().faults,
            0,
            "the read waited before touching memory"
        );
        g.set_phase(Phase::Postcopy);
        assert_eq!(r.join().unwrap().unwrap(), content(3));
        assert!(rx.try_recv().is_err(), "a present page needs no request");
    }

    #[test]
    fn a_syscall_reading_the_mapping_waits_like_a_thread() {
        let (ram, g, rx) = setup(8);
        g.set_phase(Phase::Postcopy);
        let (pr, pw) = nix::unistd::pipe().unwrap();
        let g2 = g.clone();
        let writer = std::thread::spawn(move || {
            let (base, _) = g2.mapped(0).unwrap();
            // SAFETY: one page inside the guarded mapping, which outlives this thread.
            let page = unsafe { std::slice::from_raw_parts(base.add(4 * P), P) };
            nix::unistd::write(&pw, page).unwrap()
        });
        assert_eq!(rx.recv_timeout(WAIT).unwrap(), (0, 4 * PAGE, PAGE));
        ram.place(4 * PAGE, &content(4)).unwrap();
        assert_eq!(writer.join().unwrap(), P);
        let mut got = vec![0u8; P];
        let mut at = 0;
        while at < P {
            at += nix::unistd::read(&pr, &mut got[at..]).unwrap();
        }
        assert_eq!(got, content(4));
    }

    #[test]
    fn at_the_end_a_page_never_placed_reads_as_zero_without_allocating() {
        let (ram, g, rx) = setup(8);
        g.set_phase(Phase::Postcopy);
        let r = reader(&g, 6 * PAGE);
        assert_eq!(rx.recv_timeout(WAIT).unwrap(), (0, 6 * PAGE, PAGE));
        g.set_phase(Phase::Ended);
        assert_eq!(r.join().unwrap().unwrap(), vec![0u8; P]);
        assert_eq!(probe::allocated_bytes(ram.memfd()).unwrap(), 0);
        // After the end, reads use pread: still no allocation.
        let mut out = vec![1u8; P];
        g.read_page(0, 7 * PAGE, &mut out).unwrap();
        assert_eq!(out, vec![0u8; P]);
        assert_eq!(probe::allocated_bytes(ram.memfd()).unwrap(), 0);
    }

    #[test]
    fn a_failed_migration_fails_the_waiting_read() {
        let (_ram, g, rx) = setup(8);
        g.set_phase(Phase::Postcopy);
        let r = reader(&g, PAGE);
        assert_eq!(rx.recv_timeout(WAIT).unwrap(), (0, PAGE, PAGE));
        g.set_phase(Phase::Failed("source gone".into()));
        match r.join().unwrap() {
            Err(GuardError::Failed {
                block,
                offset,
                reason,
            }) => {
                assert_eq!(
                    (block.as_str(), offset, reason.as_str()),
                    ("m", PAGE, "source gone")
                )
            }
            other => panic!("{other:?}"),
        }
    }

    /// Hugepage RAM: a read anywhere in a missing huge page asks for the whole huge page,
    /// allocates nothing, and returns QEMU's data once the huge page is placed; after the
    /// end a never-placed huge page reads as zeroes, still without allocating.
    #[test]
    fn a_missing_huge_page_is_asked_for_whole_and_read_once_placed_without_allocating() {
        let (ram, g, rx) = setup_huge(2);
        g.set_phase(Phase::Postcopy);
        let at = HUGE as u64 + 7 * PAGE;
        let r = reader(&g, at);
        assert_eq!(
            rx.recv_timeout(WAIT).unwrap(),
            (0, HUGE as u64, HUGE as u64)
        );
        assert!(!r.is_finished(), "the reader waits for the huge page");
        assert_eq!(probe::allocated_bytes(ram.memfd()).unwrap(), 0);
        let mut huge = vec![0u8; HUGE];
        for (i, p) in huge.chunks_exact_mut(P).enumerate() {
            page_content(HUGE / P + i, 9, p);
        }
        ram.place(HUGE as u64, &huge).unwrap();
        assert_eq!(r.join().unwrap().unwrap(), content(HUGE / P + 7));
        assert_eq!(probe::allocated_bytes(ram.memfd()).unwrap(), HUGE as u64);
        let f = g.figures();
        assert_eq!((f.requested, f.woken), (1, 1));
        // A page of the first huge page, still missing when the migration ends.
        let r = reader(&g, 3 * PAGE);
        assert_eq!(rx.recv_timeout(WAIT).unwrap(), (0, 0, HUGE as u64));
        g.set_phase(Phase::Ended);
        assert_eq!(r.join().unwrap().unwrap(), vec![0u8; P]);
        let mut out = vec![1u8; P];
        g.read_page(0, 5 * PAGE, &mut out).unwrap();
        assert_eq!(out, vec![0u8; P]);
        assert_eq!(
            probe::allocated_bytes(ram.memfd()).unwrap(),
            HUGE as u64,
            "the never-placed huge page stayed a hole"
        );
    }
}
