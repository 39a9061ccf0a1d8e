//! The final report of a carried migration: JSON for machines (`--report FILE`) and a
//! readable table for people (stdout). Built from the live [`Stats`] and the tracker.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::figures::LatencyFigures;
use crate::session::stats::{ChannelBytes, PhaseFigures};
use crate::session::tracker::{BlockFigures, PageTracker, RequestFigures};
use crate::session::{LinkView, Recovery, Session};
use crate::verify::VerifyReport;

/// What `receive --verify` found.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct VerifyFigures {
    /// Postcopy pages checked right after placement.
    pub at_placement: Option<VerifyReport>,
    /// The whole RAM compared at the end (destination paused).
    pub exact: Option<VerifyReport>,
    /// Why a check was not made.
    pub note: String,
}

/// What the destination QEMU said about itself.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct DestinationInfo {
    /// QEMU version, e.g. `10.0.2`.
    pub qemu_version: String,
    /// Machine type.
    pub machine: String,
    /// `query-migrate` status at the end.
    pub migration_status: String,
    /// Whether the VM was running at the end.
    pub running: bool,
    /// Destination's own vCPU blocktime (ms), when QEMU reports it.
    pub postcopy_blocktime_ms: Option<u64>,
    /// The destination's own fault latencies, when it reports them (QEMU 10.1+).
    pub qemu_faults: Option<crate::qmp::QemuFaultFigures>,
}

/// Milestones, in ms since the sidecar accepted the source.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Timeline {
    /// POSTCOPY_ADVISE forwarded.
    pub advise_ms: Option<u64>,
    /// POSTCOPY_LISTEN forwarded (switch to postcopy).
    pub listen_ms: Option<u64>,
    /// POSTCOPY_RUN forwarded.
    pub run_ms: Option<u64>,
    /// Migration complete.
    pub total_ms: u64,
}

/// The report of one migration.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Report {
    /// "completed", or "failed".
    pub outcome: String,
    /// Why it failed, when it did.
    pub error: Option<String>,
    /// Destination facts.
    pub destination: DestinationInfo,
    /// Milestones.
    pub timeline: Timeline,
    /// Whether the preempt channel was used.
    pub preempt: bool,
    /// Pages and bytes before POSTCOPY_LISTEN.
    pub precopy: PhaseFigures,
    /// Pages and bytes from POSTCOPY_LISTEN on.
    pub postcopy: PhaseFigures,
    /// Device-state bytes passed through unframed (protocol-spec/device-state.md).
    pub opaque_bytes: u64,
    /// Bytes by channel.
    pub bytes: ChannelBytes,
    /// What each multifd channel carried, by channel id (protocol-spec/multifd.md).
    pub multifd: BTreeMap<u8, crate::session::stats::MultifdFigures>,
    /// Commands by name.
    pub commands: BTreeMap<String, u64>,
    /// Return-path messages other than requests, by name.
    pub return_path_messages: BTreeMap<String, u64>,
    /// Page requests.
    pub requests: RequestFigures,
    /// Fault-service latency.
    pub latency: LatencyFigures,
    /// What the main channel's queue did: requested pages sent ahead of queued bulk.
    pub requests_first: crate::session::outbox::OutboxFigures,
    /// Per RAM block.
    pub blocks: Vec<BlockFigures>,
    /// What the guarded mapping did (with `--verify` or `--guard`).
    pub guard: Option<crate::guard::GuardFigures>,
    /// What verification found (with `--verify`).
    pub verify: Option<VerifyFigures>,
    /// Every cut of the source link and how the migration came back from it.
    pub recoveries: Vec<Recovery>,
    /// The source link at the end (e.g. still away, if the migration ended there).
    pub link: Option<LinkView>,
    /// Connections refused at the sidecar's port (hostile, stray or misdirected peers).
    pub refused_connections: crate::session::stats::RefusedConnections,
}

impl Report {
    /// Builds the report from the session's state.
    pub fn build(
        session: &Session,
        destination: DestinationInfo,
        preempt: bool,
        error: Option<String>,
        now: std::time::Instant,
    ) -> Report {
        let stats = session.stats();
        let tracker = session.tracker();
        let ms = |k: &str| {
            stats
                .milestones
                .get(k)
                .map(|t| t.saturating_duration_since(stats.started).as_millis() as u64)
        };
        Report {
            outcome: if error.is_none() {
                "completed"
            } else {
                "failed"
            }
            .to_string(),
            error,
            destination,
            timeline: Timeline {
                advise_ms: ms("advise"),
                listen_ms: ms("listen"),
                run_ms: ms("run"),
                total_ms: stats.started.elapsed().as_millis() as u64,
            },
            preempt,
            precopy: stats.precopy.clone(),
            postcopy: stats.postcopy.clone(),
            opaque_bytes: stats.opaque_bytes,
            bytes: stats.bytes.clone(),
            multifd: stats.multifd.clone(),
            commands: stats.commands.clone(),
            return_path_messages: stats.rp_messages.clone(),
            requests_first: session.outbox_figures(),
            requests: tracker
                .map(PageTracker::request_figures)
                .unwrap_or_default(),
            latency: tracker
                .map(PageTracker::latency_figures)
                .unwrap_or_default(),
            blocks: tracker.map(PageTracker::block_figures).unwrap_or_default(),
            guard: None,
            verify: None,
            recoveries: session.recoveries().to_vec(),
            link: Some(session.link_view(now)),
            refused_connections: stats.refused.clone(),
        }
    }

    /// The human-readable table printed at the end.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let d = &self.destination;
        let _ = writeln!(
            s,
            "migration {}{}",
            self.outcome,
            self.error
                .as_ref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        );
        let _ = writeln!(
            s,
            "destination  QEMU {} ({}), status {}, {}",
            d.qemu_version,
            d.machine,
            d.migration_status,
            if d.running { "running" } else { "not running" }
        );
        let t = &self.timeline;
        let opt = |v: Option<u64>| v.map(|x| format!("{x} ms")).unwrap_or_else(|| "-".into());
        let _ = writeln!(
            s,
            "timeline     advise {}, listen {}, run {}, total {} ms",
            opt(t.advise_ms),
            opt(t.listen_ms),
            opt(t.run_ms),
            t.total_ms
        );
        let _ = writeln!(
            s,
            "{:<12} {:>12} {:>12} {:>14}",
            "phase", "pages", "zero pages", "bytes"
        );
        for (name, f) in [("precopy", &self.precopy), ("postcopy", &self.postcopy)] {
            let _ = writeln!(
                s,
                "{:<12} {:>12} {:>12} {:>14}",
                name, f.pages, f.zero_pages, f.bytes
            );
        }
        let _ = writeln!(
            s,
            "{:<12} {:>12} {:>12} {:>14}",
            "device state", "-", "-", self.opaque_bytes
        );
        let b = &self.bytes;
        let _ = writeln!(
            s,
            "channels     main {} B, preempt {} B, return path {} B",
            b.main, b.preempt, b.return_path
        );
        if !self.multifd.is_empty() {
            let m = &self.multifd;
            let sum = |f: fn(&crate::session::stats::MultifdFigures) -> u64| {
                m.values().map(f).sum::<u64>()
            };
            let syncs: Vec<u64> = m.values().map(|f| f.syncs).collect();
            let _ = writeln!(
                s,
                "multifd      {} channels, {} B: {} pages, {} zero pages, {} packets; pages by channel {}, sync points {}",
                m.len(),
                b.multifd,
                sum(|f| f.pages),
                sum(|f| f.zero_pages),
                sum(|f| f.packets),
                m.values()
                    .map(|f| f.pages.to_string())
                    .collect::<Vec<_>>()
                    .join("/"),
                syncs
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join("/")
            );
        }
        let r = &self.requests;
        let _ = writeln!(
            s,
            "requests     {} messages for {} pages: {} asked of the source, {} already requested, {} already delivered, {} outstanding",
            r.messages,
            r.pages,
            r.forwarded_pages,
            r.deduplicated_pages,
            r.already_delivered_pages,
            r.outstanding_pages
        );
        let l = &self.latency;
        let _ = writeln!(
            s,
            "latency      {} faults served: p50 {:.0} µs, p90 {:.0} µs, p99 {:.0} µs, max {:.0} µs",
            l.count, l.p50_us, l.p90_us, l.p99_us, l.max_us
        );
        let q = &self.requests_first;
        let _ = writeln!(
            s,
            "queue        {} requested pages sent ahead of queued bulk, {} queued pages sent with them, {} data pages ahead of zero pages, peak {} KiB queued",
            q.promoted_pages,
            q.window_pages,
            q.data_first_pages,
            q.peak_queued_bytes >> 10
        );
        if q.preempt_pages > 0 {
            let _ = writeln!(
                s,
                "own preempt  {} of them on the sidecar's own preempt channel to the destination",
                q.preempt_pages
            );
        }
        if let Some(bt) = d.postcopy_blocktime_ms {
            let _ = writeln!(s, "blocktime    {bt} ms (destination's own vCPU blocktime)");
        }
        if let Some(f) = &d.qemu_faults {
            let us =
                |ns: Option<u64>| ns.map_or("-".into(), |v| format!("{:.0} µs", v as f64 / 1000.0));
            let edge = |q| {
                f.latency_quantile_us(q)
                    .map_or("-".into(), |v| format!("< {v} µs"))
            };
            let _ = writeln!(
                s,
                "QEMU latency {} remote faults: average {}, p50 {}, p99 {}; non-vCPU average {} (the destination's own figures)",
                f.latency_faults(),
                us(f.latency_ns),
                edge(0.5),
                edge(0.99),
                us(f.non_vcpu_latency_ns)
            );
        }
        for (i, r) in self.recoveries.iter().enumerate() {
            let _ = writeln!(
                s,
                "recovery {:>3} {} at {} ms, {} ({}): source away {} ms, handshake {} ms, \
                 postcopy again after {} ms; {} requests queued, {} asked again",
                i + 1,
                r.mode,
                r.cut_at_ms,
                r.channel,
                r.cause,
                r.source_gone_ms,
                r.handshake_ms,
                r.total_ms,
                r.requests_queued,
                r.requests_reissued
            );
        }
        let _ = writeln!(
            s,
            "{:<24} {:>12} {:>10} {:>10} {:>10}",
            "block", "length", "pages", "zero", "requested"
        );
        for blk in &self.blocks {
            let _ = writeln!(
                s,
                "{:<24} {:>12} {:>10} {:>10} {:>10}",
                blk.name, blk.length, blk.pages, blk.zero_pages, blk.requested_pages
            );
        }
        s
    }
}
