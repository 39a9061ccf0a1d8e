//! Counters of one migration as the sidecar carries it, by channel and by phase; read by
//! the live view and turned into the final report.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;

use crate::wire::{Channel, PostcopyPhase};

/// Pages and bytes of one phase.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct PhaseFigures {
    /// Full pages forwarded.
    pub pages: u64,
    /// Zero pages forwarded.
    pub zero_pages: u64,
    /// Wire bytes of those RAM records.
    pub bytes: u64,
}

/// Bytes per channel direction.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ChannelBytes {
    /// Main channel, source → destination.
    pub main: u64,
    /// Preempt channel(s), source → destination.
    pub preempt: u64,
    /// Return path, destination → source (as received from the destination).
    pub return_path: u64,
    /// Multifd channels, source → destination, together.
    pub multifd: u64,
}

/// Live counters.
#[derive(Debug, Clone)]
pub struct Stats {
    /// When the sidecar started.
    pub started: Instant,
    /// Furthest postcopy phase seen.
    pub phase: PostcopyPhase,
    /// Pages before POSTCOPY_LISTEN.
    pub precopy: PhaseFigures,
    /// Pages from POSTCOPY_LISTEN on (main and preempt channels).
    pub postcopy: PhaseFigures,
    /// Device-state bytes passed through unframed.
    pub opaque_bytes: u64,
    /// Bytes by channel.
    pub bytes: ChannelBytes,
    /// Commands by name.
    pub commands: BTreeMap<String, u64>,
    /// Return-path messages other than requests, by name.
    pub rp_messages: BTreeMap<String, u64>,
    /// Time of the first POSTCOPY_ADVISE / LISTEN / RUN and of EOF.
    pub milestones: BTreeMap<&'static str, Instant>,
    /// Request messages from the destination.
    pub requests: u64,
    /// Requests sent on to the source.
    pub requests_forwarded: u64,
    /// Requests answered by a page the sidecar handed to the destination.
    pub served: u64,
    /// Times of recent requests, for a faults/s rate.
    pub recent_requests: std::collections::VecDeque<Instant>,
    /// Connections that were not let in.
    pub refused: RefusedConnections,
    /// Per multifd channel id: what it carried.
    pub multifd: BTreeMap<u8, MultifdFigures>,
}

/// What one multifd channel carried (protocol-spec/multifd.md#multifd-packet).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MultifdFigures {
    /// Packets, sync points included.
    pub packets: u64,
    /// Sync points: each is a barrier the destination waits on across all channels.
    pub syncs: u64,
    /// Pages with data.
    pub pages: u64,
    /// Zero pages (named by offset only; QEMU 10.0+).
    pub zero_pages: u64,
    /// Bytes, the initial packet included.
    pub bytes: u64,
}

/// Connections refused at the sidecar's port: the count by kind, and the first few
/// with peer and reason (a flood must not grow the report without bound).
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct RefusedConnections {
    /// All refused connections.
    pub total: u64,
    /// By kind: `address`, `handshake`, `extra`, `not_the_source`.
    pub by_kind: BTreeMap<String, u64>,
    /// The first [`RefusedConnections::KEPT`], in order.
    pub first: Vec<RefusedConnection>,
}

/// One refused connection.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RefusedConnection {
    /// Peer address.
    pub peer: String,
    /// Kind of refusal.
    pub kind: String,
    /// Why, in words.
    pub reason: String,
}

impl RefusedConnections {
    /// How many refusals the report lists one by one.
    pub const KEPT: usize = 32;

    /// Records one refusal.
    pub fn add(&mut self, peer: String, kind: &str, reason: String) {
        self.total += 1;
        *self.by_kind.entry(kind.to_string()).or_default() += 1;
        if self.first.len() < Self::KEPT {
            self.first.push(RefusedConnection {
                peer,
                kind: kind.to_string(),
                reason,
            });
        }
    }
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            started: Instant::now(),
            phase: PostcopyPhase::None,
            precopy: PhaseFigures::default(),
            postcopy: PhaseFigures::default(),
            opaque_bytes: 0,
            bytes: ChannelBytes::default(),
            commands: BTreeMap::new(),
            rp_messages: BTreeMap::new(),
            milestones: BTreeMap::new(),
            requests: 0,
            requests_forwarded: 0,
            served: 0,
            recent_requests: std::collections::VecDeque::new(),
            refused: RefusedConnections::default(),
            multifd: BTreeMap::new(),
        }
    }
}

impl Stats {
    /// Counts bytes carried on a channel.
    pub fn channel_bytes(&mut self, ch: Channel, n: u64) {
        match ch {
            Channel::Main => self.bytes.main += n,
            Channel::Preempt => self.bytes.preempt += n,
            Channel::ReturnPath => self.bytes.return_path += n,
            Channel::Multifd(_) => self.bytes.multifd += n,
        }
    }

    /// Counts a forwarded page record.
    pub fn page(&mut self, postcopy: bool, zero: bool, wire_len: u64) {
        let f = if postcopy {
            &mut self.postcopy
        } else {
            &mut self.precopy
        };
        if zero {
            f.zero_pages += 1;
        } else {
            f.pages += 1;
        }
        f.bytes += wire_len;
    }

    /// Counts a command and notes postcopy milestones.
    pub fn command(&mut self, name: &str, now: Instant, phase: PostcopyPhase) {
        *self.commands.entry(name.to_string()).or_default() += 1;
        let key = match name {
            "POSTCOPY_ADVISE" => Some("advise"),
            "POSTCOPY_LISTEN" => Some("listen"),
            "POSTCOPY_RUN" => Some("run"),
            _ => None,
        };
        if let Some(k) = key {
            self.milestones.entry(k).or_insert(now);
        }
        self.phase = self.phase.max(phase);
    }

    /// Counts a non-request return-path message.
    pub fn rp_message(&mut self, name: &str) {
        *self.rp_messages.entry(name.to_string()).or_default() += 1;
    }

    /// Counts a request message.
    pub fn request(&mut self, now: Instant, forwarded: bool, _pages: u64) {
        self.requests += 1;
        if forwarded {
            self.requests_forwarded += 1;
        }
        self.recent_requests.push_back(now);
        while self
            .recent_requests
            .front()
            .is_some_and(|t| now.duration_since(*t).as_secs_f64() > 1.0)
        {
            self.recent_requests.pop_front();
        }
    }

    /// Requests in the last second.
    pub fn faults_per_second(&self) -> usize {
        let now = Instant::now();
        self.recent_requests
            .iter()
            .filter(|t| now.duration_since(**t).as_secs_f64() <= 1.0)
            .count()
    }
}
