//! The synthetic destination speaking the real protocol, as QEMU's destination does: it
//! asks for each missing page with `REQ_PAGES_ID` on the return path
//! (`postcopy-ram.c:postcopy_request_page`), decodes the incoming stream, places each
//! PAGE or ZERO record with `UFFDIO_COPY`, answers every PING with a PONG, and shuts the
//! return path after EOF (`savevm.c:postcopy_ram_listen_thread`). One connection carries
//! both directions, like QEMU's main channel and its return path.

use super::fault_loop::FaultClock;
use super::{PAGE, Placement, SynthRam};
use crate::wire::{Command, Event, RamRecord, RpMessage, Step, StreamDecoder};
use std::io::Write;
use std::os::unix::net::UnixStream;

/// Name of the synthetic RAM block on the wire.
pub const BLOCK: &[u8] = b"m";

/// What the listen thread saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ListenReport {
    /// Pages placed.
    pub placed: u64,
    /// Records for pages that were already there (a real destination would fail).
    pub already_present: u64,
    /// PINGs answered.
    pub pongs: u64,
    /// Whether the stream ended with EOF.
    pub eof: bool,
}

/// Why the listen thread stopped early.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// The socket failed.
    #[error("synthetic destination stream: {0}")]
    Io(#[from] std::io::Error),
    /// The stream did not decode.
    #[error("synthetic destination stream: {0}")]
    Decode(#[from] crate::wire::DecodeError),
    /// A page could not be placed.
    #[error("{0}")]
    Place(#[from] super::SynthError),
}

/// The destination's thread: reads faults from `ram`'s userfaultfd and asks for each
/// missing page once (`REQ_PAGES_ID`), and reads the stream from `stream`, placing every
/// PAGE and ZERO record with `UFFDIO_COPY` and answering PINGs, until EOF (then SHUT).
/// One thread does both, so a fault costs the destination one wake-up per direction.
/// `stop_asking` is set when the workers are done: the thread then closes its side of the
/// return path if `close_when_done`, which ends a stream that only serves requests.
pub fn destination(
    ram: &SynthRam,
    clock: &FaultClock,
    stream: UnixStream,
    stop_asking: &std::sync::atomic::AtomicBool,
    close_when_done: bool,
) -> Result<ListenReport, ListenError> {
    use nix::poll::{PollFd, PollFlags};
    use std::os::fd::AsFd;
    use std::sync::atomic::Ordering;
    let mut stream = stream;
    stream.set_nonblocking(true)?;
    let mut dec = StreamDecoder::default();
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
    let mut report = ListenReport::default();
    let zero = vec![0u8; PAGE];
    let mut out = Vec::new();
    let mut events = userfaultfd::EventBuffer::new(64);
    let mut closed = false;
    loop {
        if !closed && close_when_done && stop_asking.load(Ordering::Acquire) {
            let _ = stream.shutdown(std::net::Shutdown::Write);
            closed = true;
        }
        {
            let mut fds = [
                PollFd::new(ram.uffd().as_fd(), PollFlags::POLLIN),
                PollFd::new(stream.as_fd(), PollFlags::POLLIN),
            ];
            let ts = nix::sys::time::TimeSpec::from_duration(std::time::Duration::from_millis(5));
            let _ = nix::poll::ppoll(&mut fds, Some(ts), None);
        }
        // Faults first: asking early is what shortens a vCPU's wait.
        if let Ok(iter) = ram.uffd().read_events(&mut events) {
            for ev in iter.flatten() {
                if let userfaultfd::Event::Pagefault { addr, .. } = ev
                    && let Some(offset) = ram.offset_of(addr as usize)
                    && clock.fault(offset as usize / PAGE)
                    && !closed
                {
                    RpMessage::ReqPagesId {
                        start: offset,
                        len: PAGE as u32,
                        block: BLOCK,
                    }
                    .encode(&mut out);
                }
            }
        }
        // Then the stream: read all there is, place what decoded.
        let mut eof_read = false;
        loop {
            if buf.capacity() - buf.len() < 64 * 1024 {
                buf.reserve(256 * 1024);
            }
            let spare = buf.spare_capacity_mut();
            // SAFETY: `read` writes at most `spare.len()` bytes into the spare capacity and
            // we only grow the length by what it reports.
            let n = unsafe {
                nix::libc::read(
                    std::os::fd::AsRawFd::as_raw_fd(&stream),
                    spare.as_mut_ptr().cast(),
                    spare.len(),
                )
            };
            if n > 0 {
                // SAFETY: `n` bytes were just initialised by `read`.
                unsafe { buf.set_len(buf.len() + n as usize) };
                continue;
            }
            if n == 0 {
                eof_read = true;
            } else {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::WouldBlock {
                    return Err(e.into());
                }
            }
            break;
        }
        let mut at = 0;
        while let Step::Event { len, event, .. } = dec.next(&buf[at..])? {
            let placed = match &event {
                Event::Ram(RamRecord::Page { header, data }) => Some((header.offset, *data)),
                Event::Ram(RamRecord::Zero { header }) => Some((header.offset, &zero[..])),
                Event::Command(Command::Ping(v)) => {
                    RpMessage::Pong(*v).encode(&mut out);
                    report.pongs += 1;
                    None
                }
                Event::Eof => {
                    report.eof = true;
                    None
                }
                _ => None,
            };
            if let Some((offset, data)) = placed {
                match ram.place(offset, data)? {
                    Placement::Placed => report.placed += 1,
                    Placement::AlreadyPresent => report.already_present += 1,
                }
                clock.placed(offset);
            }
            at += len;
        }
        buf.drain(..at);
        if report.eof {
            RpMessage::Shut(0).encode(&mut out);
        }
        if !out.is_empty() && !closed {
            stream.set_nonblocking(false)?;
            let sent = stream.write_all(&out);
            stream.set_nonblocking(true)?;
            // After EOF the peer may have stopped reading; the SHUT is then moot.
            if !report.eof {
                sent?;
            }
        }
        out.clear();
        if report.eof {
            return Ok(report);
        }
        if eof_read {
            dec.finish(&buf)?;
            return Ok(report);
        }
    }
}
