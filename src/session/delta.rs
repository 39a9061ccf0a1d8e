//! What one call into the session changed, for the I/O layer to pass on: counters for
//! Prometheus, fault-service latencies, and the side effects that belong outside the core
//! (waking the guarded reader, telling it postcopy began).

use std::time::Duration;

use crate::session::tracker::RequestDecision;
use crate::wire::Channel;

/// Counters and effects of one call.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Delta {
    /// The channel the call carried, and whether it counts as postcopy traffic.
    pub channel: Option<(Channel, bool)>,
    /// Bytes carried.
    pub bytes: u64,
    /// Page records forwarded: `[precopy, postcopy][page, zero]`.
    pub pages: [[u64; 2]; 2],
    /// Pages the destination asked for, by what the sidecar did with them.
    pub requested: Vec<(RequestDecision, u64)>,
    /// Request messages from the destination.
    pub request_messages: u64,
    /// Fault-service latencies of requests answered by this call.
    pub served: Vec<Duration>,
    /// Requests outstanding after the call.
    pub in_flight: Option<u64>,
    /// Some page was delivered (a guarded reader waiting for it may look again).
    pub delivered: bool,
    /// The destination answered PING(2): everything it had before the switch to
    /// postcopy is final (protocol-spec/guarded-access.md#guard-faults).
    pub pong2: bool,
}

impl Delta {
    pub(crate) fn on(channel: Channel, postcopy: bool) -> Delta {
        Delta {
            channel: Some((channel, postcopy)),
            ..Default::default()
        }
    }

    pub(crate) fn page(&mut self, postcopy: bool, zero: bool) {
        self.pages[usize::from(postcopy)][usize::from(zero)] += 1;
        self.delivered = true;
    }

    pub(crate) fn requested(&mut self, d: RequestDecision) {
        match self.requested.iter_mut().find(|(k, _)| *k == d) {
            Some((_, n)) => *n += 1,
            None => self.requested.push((d, 1)),
        }
    }
}
