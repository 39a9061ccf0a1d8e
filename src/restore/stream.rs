//! The restore stream over a unix socket: the prologue, then requested pages ahead of
//! a background sweep, then the end (protocol-spec/snapshot.md#snapshot-restore-stream).
//! `restore` runs it over the unix socket of a destination QEMU; the fault-service
//! benchmark runs it over a socket pair to the synthetic destination. It blocks, on a
//! thread of its own (see [`serve`]).

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use hdrhistogram::Histogram;

use super::serve::{PREFETCH_PAGES, PageServer, RequestError, ServeError, ServeFigures};
use super::working_set::WorkingSet;
use super::{BACKGROUND_BATCH, RECORD_HOLD, RECORD_QUIET, RestoreError, Snapshot, net, timed_out};
use crate::wire::compose::RamSections;
use crate::wire::{RpDecoder, RpMessage, Step};

/// How pages are scheduled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeKnobs {
    /// Pages sent after each requested page.
    pub prefetch: u64,
    /// Sweep the pages nobody asked for in the background. Without it only requested
    /// pages are sent, and the stream ends once the destination closes its return path
    /// (benchmarks of the fault service alone).
    pub background: bool,
    /// Stream the snapshot's recorded working set ahead of the sweep when it has one,
    /// and record the guest's requests ([`ServeOutcome::recorded`]) when it has none.
    pub working_set: bool,
    /// Most bytes per second of page data the sweep reads and sends; `None`: as fast
    /// as the destination takes them. Many clones restored from one store at once
    /// would otherwise each take all of its bandwidth for pages nobody asked for yet, and
    /// their guests' faults would queue behind that. Requested pages, their prefetch
    /// windows and the recorded working set are never held back: a guest waits on them
    /// (protocol-spec/snapshot.md#snapshot-sweep-rate).
    pub sweep_rate: Option<u64>,
}

impl Default for ServeKnobs {
    fn default() -> Self {
        ServeKnobs {
            prefetch: PREFETCH_PAGES,
            background: true,
            working_set: true,
            sweep_rate: None,
        }
    }
}

/// What the stream did.
#[derive(Debug)]
pub struct ServeOutcome {
    /// Prologue written.
    pub package_sent: Instant,
    /// Last data page written (background sweep done).
    pub all_sent: Option<Instant>,
    /// PONG(3): the destination loaded the device state.
    pub pong3: Option<Instant>,
    /// The destination's SHUT value.
    pub shut: Option<u32>,
    /// Request messages received.
    pub requests: u64,
    /// Request → page written, µs, for requests that sent a page.
    pub latency: Histogram<u64>,
    /// Pages sent.
    pub served: ServeFigures,
    /// Bytes written.
    pub bytes_sent: u64,
    /// The pages the guest asked for, in order, when the snapshot had no working set yet.
    pub recorded: Option<WorkingSet>,
}

/// The sweep's pace: pages it may have sent by a given time at `rate` bytes per second
/// since `since`. Pure arithmetic over the instants it is given, so it is tested without
/// a clock.
#[derive(Debug, Clone, Copy)]
struct Pace {
    /// Target pages per second.
    pages_per_s: f64,
    since: Instant,
    swept: u64,
}

impl Pace {
    fn new(rate: u64, page_bytes: u64, since: Instant) -> Pace {
        Pace {
            pages_per_s: (rate as f64 / page_bytes.max(1) as f64).max(1.0),
            since,
            swept: 0,
        }
    }

    /// Sweep pages that may go out at `now` (at least one page's worth must have
    /// accrued: the sweep never runs ahead of its rate).
    fn allowed(&self, now: Instant) -> usize {
        let due =
            (now.saturating_duration_since(self.since).as_secs_f64() * self.pages_per_s) as u64;
        due.saturating_sub(self.swept) as usize
    }

    /// When the next sweep page may go out (a microsecond late rather than a rounding
    /// early, so a wait until then always finds it allowed).
    fn next_at(&self) -> Instant {
        self.since
            + Duration::from_secs_f64((self.swept + 1) as f64 / self.pages_per_s)
            + Duration::from_micros(1)
    }

    fn swept(&mut self, pages: u64) {
        self.swept += pages;
    }
}

/// A page request as the return-path reader hands it to the writer.
struct Request {
    block: usize,
    start: u64,
    len: u64,
    at: Instant,
}

/// Writes the restore stream of `snapshot` to `sock` and serves the requests read from it
/// until the destination shuts its return path. Blocks: run it on a thread of its own.
///
/// One thread does both directions, and sleeps in a plain blocking `read` when it has
/// nothing to send: a fault then costs the service one `read` and one `write`, as few
/// system calls as the least any page service can do (the fault-service benchmark's echo
/// thread). An async loop costs one `epoll_wait` more per fault, which on two busy cores
/// was felt (service 91–99 % of echo). A request never waits for a hand-over between tasks
/// either. (Spinning for the next request instead of sleeping was measured on 2 cores and
/// made faults slower: the spinning thread takes the core the destination needs.)
///
/// A destination silent for `timeout` while the service waits, or not reading for
/// `timeout` while it writes, ends the stream with a timeout error.
pub fn serve(
    snapshot: &Snapshot,
    sock: &UnixStream,
    knobs: ServeKnobs,
    host_pages: Vec<u64>,
    timeout: Duration,
) -> Result<ServeOutcome, RestoreError> {
    let mut server = PageServer::new(
        snapshot.store.clone(),
        RamSections {
            section_id: snapshot.meta.stream.ram_section_id,
            footers: snapshot.meta.stream.section_footers,
        },
    )
    .with_prefetch(knobs.prefetch)
    .with_host_pages(host_pages);
    if knobs.working_set {
        server = match &snapshot.working_set {
            Some(set) => server.with_working_set(set.clone()),
            None => server.recording(),
        };
    }
    let names: Vec<Vec<u8>> = snapshot
        .meta
        .blocks
        .iter()
        .map(|b| b.name.clone().into_bytes())
        .collect();
    let mut rp = ReturnPath::new(names);
    let mut link = Link::new(sock, timeout)?;

    let prologue = snapshot.prologue();
    link.write(&prologue)
        .map_err(|e| net("sending the prologue", e))?;
    let mut out = Vec::with_capacity(256 * 1024);
    let mut o = ServeOutcome {
        package_sent: Instant::now(),
        all_sent: None,
        pong3: None,
        shut: None,
        requests: 0,
        latency: Histogram::<u64>::new(3).expect("histogram"),
        served: ServeFigures::default(),
        bytes_sent: prologue.len() as u64,
        recorded: None,
    };
    let mut more = knobs.background;
    // The sweep counts the store's (target) pages.
    let page_bytes = snapshot.store.page_size();
    let mut pace = knobs
        .sweep_rate
        .map(|r| Pace::new(r, page_bytes, o.package_sent));
    // The sweep is behind its pace: wait for requests until this instant.
    let mut paced_until: Option<Instant> = None;
    let mut ended = false;
    let mut rp_open = true;
    let mut requests = Vec::new();
    // When each request served in this batch arrived (kept across batches: no allocation
    // per fault).
    let mut served_at = Vec::new();
    // Recording: the sweep waits while the guest keeps asking (see RECORD_QUIET), until
    // the hold's end at the latest.
    let hold_end = server.is_recording().then(|| o.package_sent + RECORD_HOLD);
    let mut last_request = o.package_sent;
    loop {
        rp.decode(&mut requests, &mut o)?;
        if o.shut.is_some() {
            rp_open = false;
        }
        // Requests first, all of them, then one background batch.
        if !requests.is_empty() {
            last_request = Instant::now();
            for r in requests.drain(..) {
                o.requests += 1;
                if server.serve_request(r.block, r.start, r.len, &mut out)? > 0 {
                    served_at.push(r.at);
                }
            }
            link.send(&mut out, &mut o.bytes_sent)?;
            let now = Instant::now();
            for at in served_at.drain(..) {
                let us = (now - at).as_micros() as u64;
                o.latency.record(us.max(1)).ok();
            }
            continue;
        }
        let now = Instant::now();
        let holding =
            rp_open && hold_end.is_some_and(|end| now < end && now < last_request + RECORD_QUIET);
        if paced_until.is_some_and(|t| t <= now) {
            paced_until = None;
        }
        if more && !holding && paced_until.is_none() {
            // Whatever the destination has sent by now goes first, without waiting.
            if rp_open {
                match link.read_now(&mut rp.buf) {
                    Ok(0) => rp_open = false,
                    Ok(_) => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(net("reading the destination's return path", e)),
                }
            }
            let allowed = pace.as_ref().map_or(usize::MAX, |p| p.allowed(now));
            let swept = server.figures().background_pages;
            more = server.background_paced(BACKGROUND_BATCH, allowed, &mut out)?;
            if let Some(p) = pace.as_mut() {
                p.swept(server.figures().background_pages - swept);
                if more && out.is_empty() {
                    // Nothing of the working set left and the sweep at its pace.
                    paced_until = Some(p.next_at());
                }
            }
            link.send(&mut out, &mut o.bytes_sent)?;
            if !more {
                o.all_sent = Some(Instant::now());
                server.finish(&mut out);
                ended = true;
                link.send(&mut out, &mut o.bytes_sent)?;
            }
            continue;
        }
        if !rp_open {
            if let Some(t) = paced_until {
                // Nothing more will be asked for; the sweep goes on at its pace.
                std::thread::sleep(t.saturating_duration_since(now));
                continue;
            }
            break;
        }
        // Nothing to send: sleep until the destination speaks (or, holding the sweep,
        // until the guest has been quiet long enough).
        let wait = match (hold_end, paced_until) {
            (Some(end), _) if holding => (last_request + RECORD_QUIET)
                .min(end)
                .saturating_duration_since(now),
            (_, Some(t)) => t.saturating_duration_since(now),
            _ => timeout,
        };
        match link.read_waiting(&mut rp.buf, wait) {
            Ok(0) => rp_open = false,
            Ok(_) => {}
            Err(e) if is_timeout(&e) => {
                if !holding && paced_until.is_none() {
                    return Err(net("waiting for the destination to finish", timed_out()));
                }
            }
            Err(e) => return Err(net("reading the destination's return path", e)),
        }
    }
    if !ended {
        server.finish(&mut out);
        // The destination may be gone already (no background: it closed first).
        let _ = link.send(&mut out, &mut o.bytes_sent);
    }
    rp.finish()?;
    o.served = server.figures().clone();
    o.recorded = server.take_recorded();
    Ok(o)
}

/// Whether a blocking socket call ended on its `SO_RCVTIMEO`/`SO_SNDTIMEO`.
fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// The service's socket, blocking, with its receive timeout set only when it changes
/// (a `setsockopt` per wait would cost a system call per fault).
struct Link<'a> {
    sock: &'a UnixStream,
    read_timeout: Duration,
    scratch: Box<[u8]>,
}

impl<'a> Link<'a> {
    fn new(sock: &'a UnixStream, timeout: Duration) -> Result<Link<'a>, RestoreError> {
        let set = |e| net("setting the socket's timeouts", e);
        sock.set_nonblocking(false).map_err(set)?;
        let timeout = timeout.max(Duration::from_millis(1));
        sock.set_read_timeout(Some(timeout)).map_err(set)?;
        sock.set_write_timeout(Some(timeout)).map_err(set)?;
        Ok(Link {
            sock,
            read_timeout: timeout,
            scratch: vec![0u8; 16 * 1024].into_boxed_slice(),
        })
    }

    /// Writes all of `bytes`; a destination that takes none for the timeout is an error.
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        (&mut &*self.sock).write_all(bytes).map_err(
            |e| {
                if is_timeout(&e) { timed_out() } else { e }
            },
        )
    }

    /// Writes and clears `out`, counting it.
    fn send(&mut self, out: &mut Vec<u8>, sent: &mut u64) -> Result<(), RestoreError> {
        if out.is_empty() {
            return Ok(());
        }
        self.write(out)
            .map_err(|e| net("writing to the destination", e))?;
        *sent += out.len() as u64;
        out.clear();
        Ok(())
    }

    /// Appends what the destination has sent by now to `buf`, without waiting
    /// (`WouldBlock` when nothing is there).
    fn read_now(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        let n = nix::sys::socket::recv(
            self.sock.as_raw_fd(),
            &mut self.scratch,
            nix::sys::socket::MsgFlags::MSG_DONTWAIT,
        )
        .map_err(std::io::Error::from)?;
        buf.extend_from_slice(&self.scratch[..n]);
        Ok(n)
    }

    /// Appends to `buf` what the destination sends next, waiting at most `wait`.
    fn read_waiting(&mut self, buf: &mut BytesMut, wait: Duration) -> std::io::Result<usize> {
        let wait = wait.max(Duration::from_millis(1));
        if wait != self.read_timeout {
            self.sock.set_read_timeout(Some(wait))?;
            self.read_timeout = wait;
        }
        let n = loop {
            match (&mut &*self.sock).read(&mut self.scratch) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                r => break r?,
            }
        };
        buf.extend_from_slice(&self.scratch[..n]);
        Ok(n)
    }
}

/// The return path as `serve` reads it: bytes not decoded yet, and the block of the last
/// request (for `REQ_PAGES`, which names none).
struct ReturnPath {
    dec: RpDecoder,
    buf: BytesMut,
    names: Vec<Vec<u8>>,
    block: Option<usize>,
}

impl ReturnPath {
    fn new(names: Vec<Vec<u8>>) -> ReturnPath {
        ReturnPath {
            dec: RpDecoder::new(),
            buf: BytesMut::with_capacity(16 * 1024),
            names,
            block: None,
        }
    }

    /// Decodes every complete message: requests into `requests`, PONG(3) and SHUT into
    /// the outcome.
    fn decode(
        &mut self,
        requests: &mut Vec<Request>,
        o: &mut ServeOutcome,
    ) -> Result<(), RestoreError> {
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(16 * 1024);
        }
        while let Step::Event { len, event, .. } = self.dec.next(&self.buf)? {
            let now = Instant::now();
            match event {
                RpMessage::ReqPagesId { start, len, block } => {
                    let b = self.names.iter().position(|n| n == block).ok_or_else(|| {
                        ServeError::Request(RequestError::UnknownBlock(
                            String::from_utf8_lossy(block).into(),
                        ))
                    })?;
                    self.block = Some(b);
                    requests.push(Request {
                        block: b,
                        start,
                        len: len.into(),
                        at: now,
                    });
                }
                RpMessage::ReqPages { start, len } => {
                    let b = self.block.ok_or_else(|| {
                        net(
                            "the destination's first request named no block",
                            std::io::Error::from(std::io::ErrorKind::InvalidData),
                        )
                    })?;
                    requests.push(Request {
                        block: b,
                        start,
                        len: len.into(),
                        at: now,
                    });
                }
                RpMessage::Pong(3) => o.pong3 = Some(now),
                RpMessage::Shut(v) => o.shut = Some(v),
                _ => {}
            }
            self.buf.advance(len);
        }
        Ok(())
    }

    /// The return path ended: a message cut short is an error.
    fn finish(&mut self) -> Result<(), RestoreError> {
        self.dec.finish(&self.buf)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pace_allows_what_its_rate_accrued_and_no_more() {
        let t0 = Instant::now();
        // 4 MiB/s: 1024 pages a second, one per ~977 µs.
        let mut p = Pace::new(4 << 20, 4096, t0);
        assert_eq!(p.allowed(t0), 0, "nothing before time passed");
        assert_eq!(p.allowed(t0 + Duration::from_millis(500)), 512);
        p.swept(512);
        assert_eq!(p.allowed(t0 + Duration::from_millis(500)), 0);
        let next = p.next_at();
        assert!(next > t0 + Duration::from_millis(500), "{next:?}");
        assert!(next <= t0 + Duration::from_millis(502), "{next:?}");
        assert_eq!(p.allowed(next), 1);
        // A sweep that went past its allowance (a host page is never split) waits
        // for its rate to catch up.
        p.swept(600);
        assert_eq!(p.allowed(t0 + Duration::from_secs(1)), 0);
        assert_eq!(p.allowed(t0 + Duration::from_millis(1100)), 14);
    }

    #[test]
    fn a_pace_too_slow_for_a_page_still_moves() {
        let t0 = Instant::now();
        let p = Pace::new(1, 4096, t0);
        assert_eq!(p.allowed(t0 + Duration::from_secs(1)), 1);
    }
}
