//! The synthetic destination's fault thread: reads the userfaultfd, asks once per missing
//! page (later faults on the same page wait for the same placement, as QEMU's fault thread
//! does with its receivedmap and requested-page tree), and times each page from its first
//! fault to its placement.

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use userfaultfd::{Event, EventBuffer};

use super::{PAGE, SynthRam};
use crate::figures::{LatencyFigures, latency_of};

/// How a first fault on a page is answered.
pub trait FaultHandler: Send {
    /// Page at `offset` faulted for the first time: arrange for it to be placed (now, or
    /// later by another thread through [`FaultClock::placed`]).
    fn on_fault(&mut self, ram: &SynthRam, clock: &FaultClock, offset: u64);
}

/// First-fault times and fault service latency, shared by the fault thread and whoever
/// places pages.
pub struct FaultClock {
    t0: Instant,
    /// ns since `t0` of each page's first fault, +1 (0 = never faulted).
    first_fault: Vec<AtomicU64>,
    latency: Mutex<Histogram<u64>>,
    faults: AtomicU64,
}

impl FaultClock {
    /// A clock for `pages` pages.
    pub fn new(pages: usize) -> FaultClock {
        FaultClock {
            t0: Instant::now(),
            first_fault: (0..pages).map(|_| AtomicU64::new(0)).collect(),
            latency: Mutex::new(Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("bounds")),
            faults: AtomicU64::new(0),
        }
    }

    /// Notes a fault; true if it is the page's first.
    pub fn fault(&self, page: usize) -> bool {
        self.faults.fetch_add(1, Ordering::Relaxed);
        let now = self.t0.elapsed().as_nanos() as u64 + 1;
        self.first_fault[page]
            .compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Page at `offset` was placed now: records its service time if it had faulted.
    pub fn placed(&self, offset: u64) {
        let page = (offset as usize) / PAGE;
        let Some(at) = self.first_fault.get(page) else {
            return;
        };
        let t = at.load(Ordering::Acquire);
        if t == 0 {
            return;
        }
        let now = self.t0.elapsed().as_nanos() as u64 + 1;
        let us = now.saturating_sub(t) / 1000;
        let mut h = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        let _ = h.record(us.max(1));
    }

    /// Fault events read (including repeated faults on one page).
    pub fn faults(&self) -> u64 {
        self.faults.load(Ordering::Relaxed)
    }

    /// First fault → placement, µs.
    pub fn latency(&self) -> LatencyFigures {
        latency_of(&self.latency.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// A running fault thread; stops when dropped.
pub struct FaultThread {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl FaultThread {
    /// Starts the fault thread for `ram`, answering with `handler`.
    pub fn start<H: FaultHandler + 'static>(
        ram: Arc<SynthRam>,
        clock: Arc<FaultClock>,
        mut handler: H,
    ) -> FaultThread {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("synth-faults".into())
            .spawn(move || {
                let mut buf = EventBuffer::new(64);
                while !flag.load(Ordering::Relaxed) {
                    {
                        use nix::poll::{PollFd, PollFlags};
                        let mut fds = [PollFd::new(ram.uffd().as_fd(), PollFlags::POLLIN)];
                        let ts = nix::sys::time::TimeSpec::from_duration(Duration::from_millis(10));
                        let _ = nix::poll::ppoll(&mut fds, Some(ts), None);
                    }
                    let Ok(events) = ram.uffd().read_events(&mut buf) else {
                        continue;
                    };
                    let faults: Vec<u64> = events
                        .flatten()
                        .filter_map(|e| match e {
                            Event::Pagefault { addr, .. } => ram.offset_of(addr as usize),
                            _ => None,
                        })
                        .collect();
                    for offset in faults {
                        if clock.fault(offset as usize / PAGE) {
                            handler.on_fault(&ram, &clock, offset);
                        }
                    }
                }
            })
            .expect("spawning the fault thread");
        FaultThread {
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for FaultThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The bare loop: answers every fault at once with `UFFDIO_COPY` from an in-memory image.
/// What a page service can at best approach on this machine.
pub struct BareCopy {
    seed: u64,
    page: Vec<u8>,
}

impl BareCopy {
    /// Pages hold [`super::page_content`] for `seed`.
    pub fn new(seed: u64) -> BareCopy {
        BareCopy {
            seed,
            page: vec![0u8; PAGE],
        }
    }
}

impl FaultHandler for BareCopy {
    fn on_fault(&mut self, ram: &SynthRam, clock: &FaultClock, offset: u64) {
        super::page_content(offset as usize / PAGE, self.seed, &mut self.page);
        if ram.place(offset, &self.page).is_ok() {
            clock.placed(offset);
        }
    }
}
