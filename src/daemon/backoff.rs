//! Pacing of a listener's accept loop after `accept` fails. An error about one pending
//! connection (it was reset before it was taken) is no reason to wait; an error about the
//! process (out of file descriptors, buffers or memory) repeats at once if retried at once,
//! so the loop would spin a core and flood the log while the cause lasts. Here the pause
//! doubles from a short first one up to a cap, and the log says the first failure of a run
//! (warn), the rest at debug, and when accepting works again.

use std::io;
use std::time::Duration;

/// The accept loop's back-off state: one per listener.
#[derive(Debug)]
pub struct AcceptBackoff {
    /// What the listener is, for the log (`metrics endpoint`, `source port`).
    what: &'static str,
    first: Duration,
    max: Duration,
    next: Duration,
    /// Failures since the last successful accept that called for a pause.
    failures: u64,
}

impl AcceptBackoff {
    /// A back-off whose pauses go `first`, 2·`first`, … up to `max`.
    pub fn new(what: &'static str, first: Duration, max: Duration) -> AcceptBackoff {
        AcceptBackoff {
            what,
            first,
            max,
            next: first,
            failures: 0,
        }
    }

    /// The default pacing: 5 ms doubling up to 1 s, so a lasting EMFILE costs about one
    /// accept a second, and a passing one delays the next connection by milliseconds.
    pub fn standard(what: &'static str) -> AcceptBackoff {
        AcceptBackoff::new(what, Duration::from_millis(5), Duration::from_secs(1))
    }

    /// Call after `accept` failed with `e`: how long to wait before accepting again
    /// (zero for an error about the one connection only).
    pub fn failed(&mut self, e: &io::Error) -> Duration {
        if about_one_connection(e) {
            tracing::debug!(
                listener = self.what,
                "accept: {e} (one connection; going on)"
            );
            return Duration::ZERO;
        }
        self.failures += 1;
        let pause = self.next;
        if self.failures == 1 {
            tracing::warn!(
                listener = self.what,
                "accept failed: {e}; retrying with pauses growing to {:?}",
                self.max
            );
        } else {
            tracing::debug!(
                listener = self.what,
                failures = self.failures,
                ?pause,
                "accept failed again: {e}"
            );
        }
        self.next = (self.next * 2).min(self.max);
        pause
    }

    /// Call after `accept` succeeded: the next failure starts from the first pause again.
    pub fn accepted(&mut self) {
        if self.failures > 0 {
            tracing::info!(
                listener = self.what,
                failures = self.failures,
                "accepting again after failed accepts"
            );
        }
        self.failures = 0;
        self.next = self.first;
    }

    /// Failures in the current run (0 once accepting works again).
    pub fn failures(&self) -> u64 {
        self.failures
    }
}

/// Errors that concern only the connection `accept` was taking (it went away before it
/// was taken), after which the next `accept` may well succeed at once.
fn about_one_connection(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted)
        || e.raw_os_error() == Some(nix::errno::Errno::EPROTO as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn emfile() -> io::Error {
        io::Error::from_raw_os_error(nix::errno::Errno::EMFILE as i32)
    }

    #[test]
    fn pauses_double_up_to_the_cap_and_start_over_after_an_accept() {
        let ms = Duration::from_millis;
        let mut b = AcceptBackoff::new("test", ms(5), ms(40));
        let pauses: Vec<_> = (0..6).map(|_| b.failed(&emfile())).collect();
        assert_eq!(pauses, [ms(5), ms(10), ms(20), ms(40), ms(40), ms(40)]);
        assert_eq!(b.failures(), 6);
        b.accepted();
        assert_eq!(b.failures(), 0);
        assert_eq!(b.failed(&emfile()), ms(5));
    }

    #[test]
    fn an_error_about_one_connection_needs_no_pause() {
        let mut b = AcceptBackoff::standard("test");
        b.failed(&emfile());
        let aborted = io::Error::from(io::ErrorKind::ConnectionAborted);
        assert_eq!(b.failed(&aborted), Duration::ZERO);
        // …and does not reset the run of resource failures either.
        assert_eq!(b.failures(), 1);
        assert_eq!(b.failed(&emfile()), Duration::from_millis(10));
    }
}
