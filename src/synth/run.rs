//! One run of the synthetic destination: workers touch its RAM while faults are answered
//! either by the bare `UFFDIO_COPY` loop or, over a socket pair and the real protocol, by
//! the sidecar's restore page service. Used by the fault-service benchmark and its test.

use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::fault_loop::{BareCopy, FaultClock, FaultThread};
use super::touch::{self, Pattern, TouchReport};
use super::wire::{ListenReport, destination};
use super::{PAGE, SynthRam, page_content};
use crate::figures::LatencyFigures;
use crate::restore::Snapshot;
use crate::restore::stream::{ServeKnobs, serve};

/// What the workers should do.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    /// Pages of RAM.
    pub pages: usize,
    /// Worker threads.
    pub threads: usize,
    /// Access pattern.
    pub pattern: Pattern,
    /// Touches per worker (random patterns).
    pub touches: usize,
    /// Content seed.
    pub seed: u64,
}

/// Figures of one run.
#[derive(Debug, Clone)]
pub struct RunFigures {
    /// What the workers did.
    pub touch: TouchReport,
    /// Pages served after a fault, and first fault → placement.
    pub service: LatencyFigures,
    /// Fault events read.
    pub fault_events: u64,
    /// Pages placed in all (served after faults, prefetched, background).
    pub placed: u64,
    /// Records for pages already there (must be 0).
    pub duplicates: u64,
    /// Pages whose content differs from the source's (must be 0).
    pub wrong_pages: u64,
    /// What the restore page service sent, by kind (`None` for the bare loop and echo).
    pub served: Option<crate::restore::serve::ServeFigures>,
}

impl RunFigures {
    /// Pages served after a fault, per second of the workers' run.
    pub fn faults_per_s(&self) -> f64 {
        self.service.count as f64 / self.touch.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Compares every placed page with the source's content.
fn wrong_pages(ram: &SynthRam, seed: u64) -> u64 {
    let mut want = vec![0u8; PAGE];
    let mut got = vec![0u8; PAGE];
    let mut bad = 0;
    for p in 0..ram.pages() {
        let off = (p * PAGE) as u64;
        if !crate::guard::probe::is_present(ram.memfd(), off).unwrap_or(false) {
            continue;
        }
        page_content(p, seed, &mut want);
        crate::guard::probe::read_at(ram.memfd(), off, &mut got).expect("pread");
        bad += u64::from(got != want);
    }
    bad
}

/// The bare loop: each fault answered at once by `UFFDIO_COPY` from memory.
pub fn bare(w: Workload) -> Result<RunFigures, super::SynthError> {
    let ram = Arc::new(SynthRam::new(w.pages)?);
    let clock = Arc::new(FaultClock::new(w.pages));
    let faults = FaultThread::start(ram.clone(), clock.clone(), BareCopy::new(w.seed));
    let t = touch::run(ram.clone(), w.threads, w.pattern, w.touches);
    drop(faults);
    let service = clock.latency();
    Ok(RunFigures {
        touch: t,
        placed: service.count,
        service,
        fault_events: clock.faults(),
        duplicates: 0,
        wrong_pages: wrong_pages(&ram, w.seed),
        served: None,
    })
}

/// Why a run through the page service failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Setting up.
    #[error("{0}")]
    Setup(String),
    /// The synthetic destination failed.
    #[error("{0}")]
    Listen(#[from] super::wire::ListenError),
    /// The page service failed.
    #[error("{0}")]
    Serve(#[from] crate::restore::RestoreError),
}

/// Faults answered by the restore page service serving `snapshot` (made by
/// [`super::snapshot::write`] with the same pages and seed).
pub fn through_restore(
    w: Workload,
    snapshot: Arc<Snapshot>,
    knobs: ServeKnobs,
) -> Result<RunFigures, RunError> {
    let setup = |e: &dyn std::fmt::Display| RunError::Setup(e.to_string());
    let ram = Arc::new(SynthRam::new(w.pages).map_err(|e| setup(&e))?);
    let clock = Arc::new(FaultClock::new(w.pages));
    let (ours, theirs) = UnixStream::pair().map_err(|e| setup(&e))?;
    // Small buffers on the page service's side, as `restore` sets them.
    socket2::SockRef::from(&ours)
        .set_send_buffer_size(crate::restore::RESTORE_SNDBUF)
        .map_err(|e| setup(&e))?;
    let served = Arc::new(std::sync::Mutex::new(None));
    let kept = served.clone();
    let sidecar = std::thread::Builder::new()
        .name("page-service".into())
        .spawn(move || -> Result<(), RunError> {
            let outcome = serve(
                &snapshot,
                &ours,
                knobs,
                Vec::new(),
                Duration::from_secs(600),
            )?;
            *kept.lock().unwrap_or_else(|p| p.into_inner()) = Some(outcome.served);
            Ok(())
        })
        .map_err(|e| setup(&e))?;
    // Without a background sweep, closing the return path is what ends the stream.
    let mut f = drive(
        w,
        ram,
        clock,
        theirs,
        !knobs.background,
        sidecar,
        "the page service",
    )?;
    f.served = served.lock().unwrap_or_else(|p| p.into_inner()).take();
    Ok(f)
}

/// Faults answered over the same protocol by the least a page service can do: a plain
/// thread that reads each request and writes the page from memory at once (no page store,
/// no digest check, no scheduling). The floor under any out-of-process page service on
/// this machine: what the extra hops alone cost.
pub fn through_echo(w: Workload) -> Result<RunFigures, RunError> {
    use crate::wire::compose::{RamSections, put_page};
    use crate::wire::{RpDecoder, RpMessage, Step};
    use std::io::{Read, Write};
    let setup = |e: &dyn std::fmt::Display| RunError::Setup(e.to_string());
    let ram = Arc::new(SynthRam::new(w.pages).map_err(|e| setup(&e))?);
    let clock = Arc::new(FaultClock::new(w.pages));
    let (mut ours, theirs) = UnixStream::pair().map_err(|e| setup(&e))?;
    let seed = w.seed;
    let echo = std::thread::spawn(move || -> Result<(), RunError> {
        let io = |e: std::io::Error| RunError::Setup(e.to_string());
        let mut out = Vec::new();
        crate::wire::compose::put_opening(
            &mut out,
            b"synthetic",
            2,
            &[(b"m", (w.pages * PAGE) as u64)],
        );
        ours.write_all(&out).map_err(io)?;
        let sections = RamSections {
            section_id: 2,
            footers: true,
        };
        let mut dec = RpDecoder::new();
        let (mut buf, mut chunk, mut page) = (Vec::new(), vec![0u8; 64 * 1024], vec![0u8; PAGE]);
        loop {
            let n = ours.read(&mut chunk).map_err(io)?;
            if n == 0 {
                out.clear();
                sections.open_end(&mut out);
                sections.close(&mut out);
                out.push(crate::wire::stream::SECTION_EOF);
                let _ = ours.write_all(&out);
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
            out.clear();
            let mut at = 0;
            while let Step::Event { len, event, .. } = dec
                .next(&buf[at..])
                .map_err(|e| RunError::Setup(e.to_string()))?
            {
                if let RpMessage::ReqPagesId { start, .. } = event {
                    page_content(start as usize / PAGE, seed, &mut page);
                    sections.open_part(&mut out);
                    put_page(&mut out, Some(b"m"), start, &page);
                    sections.close(&mut out);
                }
                at += len;
            }
            buf.drain(..at);
            ours.write_all(&out).map_err(io)?;
        }
    });
    drive(w, ram, clock, theirs, true, echo, "the echo server")
}

/// What every run through a page service shares: the synthetic destination on `theirs`
/// and the workers run; once the workers are done nothing more is asked (`close`: the
/// destination then closes the return path); then the page service thread (`who`) is
/// joined and the figures are taken.
fn drive(
    w: Workload,
    ram: Arc<SynthRam>,
    clock: Arc<FaultClock>,
    theirs: UnixStream,
    close: bool,
    service: std::thread::JoinHandle<Result<(), RunError>>,
    who: &str,
) -> Result<RunFigures, RunError> {
    let done = Arc::new(AtomicBool::new(false));
    let (dram, dclock, ddone) = (ram.clone(), clock.clone(), done.clone());
    let dest = std::thread::spawn(move || destination(&dram, &dclock, theirs, &ddone, close));
    let t = touch::run(ram.clone(), w.threads, w.pattern, w.touches);
    done.store(true, Ordering::Release);
    let heard: ListenReport = dest
        .join()
        .map_err(|_| RunError::Setup("the destination thread panicked".into()))??;
    service
        .join()
        .map_err(|_| RunError::Setup(format!("{who} thread panicked")))??;
    Ok(RunFigures {
        touch: t,
        service: clock.latency(),
        fault_events: clock.faults(),
        placed: heard.placed,
        duplicates: heard.already_present,
        wrong_pages: wrong_pages(&ram, w.seed),
        served: None,
    })
}
