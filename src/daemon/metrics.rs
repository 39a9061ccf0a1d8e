//! Prometheus metrics of `receive` (`--metrics ADDR:PORT`), in the OpenMetrics text
//! format that Prometheus scrapes: bytes and pages by channel and phase, page requests by
//! what the sidecar did with them, requests in flight, fault-service latency, migrations
//! by outcome, and decode errors by kind. Updated on the data path next to the counters
//! of the report, so a scrape and the final report agree. Served by
//! [`super::metrics_endpoint`].

use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use prometheus_client::metrics::gauge::Gauge as FloatGauge;
use std::sync::atomic::AtomicU64;

use crate::session::tracker::RequestDecision;
use crate::session::{CutCause, CutDecision, Delta, LinkView, Recovery};
use crate::wire::Channel;

/// Label values in Prometheus' snake_case convention (the derive would write `Main`).
macro_rules! label_values {
    ($t:ty { $($v:ident => $s:literal),+ $(,)? }) => {
        impl $t {
            /// The label value.
            pub fn as_str(&self) -> &'static str {
                match self { $(Self::$v => $s),+ }
            }
        }
        impl EncodeLabelValue for $t {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                EncodeLabelValue::encode(&self.as_str(), encoder)
            }
        }
    };
}

label_values!(PhaseLabel { Precopy => "precopy", Postcopy => "postcopy" });
label_values!(ChannelLabel { Main => "main", Preempt => "preempt", ReturnPath => "return_path", Multifd => "multifd" });
label_values!(PageKind { Page => "page", Zero => "zero" });
label_values!(RequestDecision {
    Forward => "forwarded",
    AlreadyRequested => "deduplicated",
    AlreadyDelivered => "already_delivered",
});

/// Migration phase as a label.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum PhaseLabel {
    /// Before POSTCOPY_LISTEN.
    Precopy,
    /// From POSTCOPY_LISTEN on.
    Postcopy,
}

/// Channel as a label.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ChannelLabel {
    /// Source → destination main stream.
    Main,
    /// Postcopy-preempt channel.
    Preempt,
    /// Destination → source return path.
    ReturnPath,
    /// The multifd channels, together.
    Multifd,
}

impl From<Channel> for ChannelLabel {
    fn from(c: Channel) -> Self {
        match c {
            Channel::Main => ChannelLabel::Main,
            Channel::Preempt => ChannelLabel::Preempt,
            Channel::ReturnPath => ChannelLabel::ReturnPath,
            Channel::Multifd(_) => ChannelLabel::Multifd,
        }
    }
}

/// Labels of the byte counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    /// Channel.
    pub channel: ChannelLabel,
    /// Phase.
    pub phase: PhaseLabel,
}

/// What a page record was.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum PageKind {
    /// A full page.
    Page,
    /// A zero page.
    Zero,
}

/// Labels of the page counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PageLabels {
    /// Channel.
    pub channel: ChannelLabel,
    /// Phase.
    pub phase: PhaseLabel,
    /// Full or zero page.
    pub kind: PageKind,
}

/// Labels of the request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// What the sidecar did with the page.
    pub outcome: RequestDecision,
}

/// Labels of the cut counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CutLabels {
    /// `closed`, `failed`, `silent` or `handshake`.
    pub cause: &'static str,
    /// What the sidecar did: `hold`, `pass_through`, `failed`, `done`.
    pub decision: &'static str,
}

/// Labels of the recovery counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RecoveryLabels {
    /// `hold` or `pass_through`.
    pub mode: &'static str,
}

/// Labels of the migration counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `completed` or `failed`.
    pub outcome: String,
}

/// Labels of the decode-error counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecodeErrorLabels {
    /// Channel.
    pub channel: ChannelLabel,
    /// The error's kind (`ErrorKind` of the codec).
    pub kind: &'static str,
}

/// The metric families of one sidecar process.
pub struct Metrics {
    registry: Registry,
    /// Bytes carried.
    pub bytes: Family<BytesLabels, Counter>,
    /// Page records forwarded.
    pub pages: Family<PageLabels, Counter>,
    /// Target pages the destination asked for, by outcome.
    pub requested_pages: Family<RequestLabels, Counter>,
    /// Request messages from the destination.
    pub request_messages: Counter,
    /// Pages asked of the source and not yet delivered.
    pub in_flight: Gauge,
    /// Fault service: first request → page forwarded to the destination, seconds.
    pub fault_service: Histogram,
    /// Migrations carried, by outcome.
    pub migrations: Family<OutcomeLabels, Counter>,
    /// Bytes that did not decode, by channel and kind.
    pub decode_errors: Family<DecodeErrorLabels, Counter>,
    /// 1 while a source is connected and carrying, 0 otherwise.
    pub source_link_up: Gauge,
    /// While the source is connected: seconds it has been silent (the idle rule's clock).
    pub source_silent_seconds: FloatGauge<f64, AtomicU64>,
    /// While the source is away after a cut: seconds since the cut.
    pub source_away_seconds: FloatGauge<f64, AtomicU64>,
    /// Cuts of the source link, by cause and what the sidecar did.
    pub source_cuts: Family<CutLabels, Counter>,
    /// Recoveries completed, by mode.
    pub recoveries: Family<RecoveryLabels, Counter>,
    /// Cut → postcopy running again, seconds.
    pub recovery_seconds: Histogram,
    /// Connections refused at the sidecar's port, by kind.
    pub refused_connections: Family<RefusedLabels, Counter>,
    /// Connections to this metrics endpoint closed at once: it had its maximum open.
    pub endpoint_refused: Counter,
    /// Connections to this metrics endpoint closed by one of its time limits, by limit.
    pub endpoint_timed_out: Family<EndpointLimitLabels, Counter>,
    /// Connections to this metrics endpoint open now.
    pub endpoint_open: Gauge,
    /// Failed accepts of the metrics endpoint (out of file descriptors and the like).
    pub endpoint_accept_errors: Counter,
}

/// Labels of the metrics endpoint's time-out counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLimitLabels {
    /// `header` (no complete request in time), `idle` (nothing moved), `deadline`
    /// (the connection's whole lifetime).
    pub limit: &'static str,
}

/// Labels of the refused-connection counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    /// `address` (not in --allow-from), `handshake` (silent, not a migration, or an
    /// opening that does not fit the destination), `extra`, `not_the_source`.
    pub kind: &'static str,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Registers every family under the prefix `postcopy_sidecar`.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("postcopy_sidecar");
        let bytes = Family::<BytesLabels, Counter>::default();
        registry.register(
            "bytes",
            "Bytes carried, by channel and phase",
            bytes.clone(),
        );
        let pages = Family::<PageLabels, Counter>::default();
        registry.register(
            "pages",
            "Page records forwarded to the destination, by channel, phase and kind",
            pages.clone(),
        );
        let requested_pages = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requested_pages",
            "Target pages the destination asked for, by what the sidecar did",
            requested_pages.clone(),
        );
        let request_messages = Counter::default();
        registry.register(
            "request_messages",
            "Page request messages from the destination",
            request_messages.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "requests_in_flight",
            "Pages asked of the source and not yet delivered",
            in_flight.clone(),
        );
        // 10 µs .. ~5 s in factors of 2.
        let fault_service = Histogram::new(exponential_buckets(1e-5, 2.0, 20));
        registry.register(
            "fault_service_seconds",
            "From the destination's first request for a page to the page forwarded to it",
            fault_service.clone(),
        );
        let migrations = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "migrations",
            "Migrations carried, by outcome",
            migrations.clone(),
        );
        let decode_errors = Family::<DecodeErrorLabels, Counter>::default();
        registry.register(
            "decode_errors",
            "Bytes that did not decode (the migration stops there), by channel and kind",
            decode_errors.clone(),
        );
        let source_link_up = Gauge::default();
        registry.register(
            "source_link_up",
            "1 while a source is connected and carrying the migration",
            source_link_up.clone(),
        );
        let source_silent_seconds = FloatGauge::<f64, AtomicU64>::default();
        registry.register(
            "source_silent_seconds",
            "Seconds the connected source has sent nothing while the sidecar waited",
            source_silent_seconds.clone(),
        );
        let source_away_seconds = FloatGauge::<f64, AtomicU64>::default();
        registry.register(
            "source_away_seconds",
            "Seconds since the source link was cut, while the source is away",
            source_away_seconds.clone(),
        );
        let source_cuts = Family::<CutLabels, Counter>::default();
        registry.register(
            "source_cuts",
            "Cuts of the source link, by cause and what the sidecar did",
            source_cuts.clone(),
        );
        let recoveries = Family::<RecoveryLabels, Counter>::default();
        registry.register(
            "recoveries",
            "Recoveries after a cut of the source link, by mode",
            recoveries.clone(),
        );
        // 10 ms .. ~1.5 h in factors of 2.
        let recovery_seconds = Histogram::new(exponential_buckets(0.01, 2.0, 20));
        registry.register(
            "recovery_seconds",
            "From a cut of the source link to postcopy running again",
            recovery_seconds.clone(),
        );
        let refused_connections = Family::<RefusedLabels, Counter>::default();
        registry.register(
            "refused_connections",
            "Connections refused at the sidecar's port before reaching the destination, by kind",
            refused_connections.clone(),
        );
        let endpoint_refused = Counter::default();
        registry.register(
            "metrics_connections_refused",
            "Connections to this metrics endpoint closed at once because it had its maximum open",
            endpoint_refused.clone(),
        );
        let endpoint_timed_out = Family::<EndpointLimitLabels, Counter>::default();
        registry.register(
            "metrics_connections_timed_out",
            "Connections to this metrics endpoint closed by a time limit, by limit",
            endpoint_timed_out.clone(),
        );
        let endpoint_open = Gauge::default();
        registry.register(
            "metrics_connections_open",
            "Connections to this metrics endpoint open now",
            endpoint_open.clone(),
        );
        let endpoint_accept_errors = Counter::default();
        registry.register(
            "metrics_accept_errors",
            "Failed accepts of this metrics endpoint (e.g. out of file descriptors)",
            endpoint_accept_errors.clone(),
        );
        Metrics {
            registry,
            refused_connections,
            endpoint_refused,
            endpoint_timed_out,
            endpoint_open,
            endpoint_accept_errors,
            source_link_up,
            source_silent_seconds,
            source_away_seconds,
            source_cuts,
            recoveries,
            recovery_seconds,
            bytes,
            pages,
            requested_pages,
            request_messages,
            in_flight,
            fault_service,
            migrations,
            decode_errors,
        }
    }

    /// The text exposition (OpenMetrics).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Counts a migration that ended `outcome` (`completed` or `failed`), including one
    /// that failed before it began (no QMP, no destination): alerts must see those too.
    pub fn migration_ended(&self, outcome: &str) {
        self.migrations
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// Counts bytes on a channel.
    pub fn add_bytes(&self, channel: Channel, postcopy: bool, n: u64) {
        self.bytes
            .get_or_create(&BytesLabels {
                channel: channel.into(),
                phase: phase(postcopy),
            })
            .inc_by(n);
    }

    /// Counts a forwarded page record.
    pub fn add_page(&self, channel: Channel, postcopy: bool, zero: bool) {
        self.pages
            .get_or_create(&PageLabels {
                channel: channel.into(),
                phase: phase(postcopy),
                kind: if zero { PageKind::Zero } else { PageKind::Page },
            })
            .inc();
    }

    /// Applies the counters of one session step.
    pub fn apply(&self, d: &Delta) {
        let Some((channel, postcopy)) = d.channel else {
            return;
        };
        if d.bytes > 0 {
            self.add_bytes(channel, postcopy, d.bytes);
        }
        for (post, kinds) in d.pages.iter().enumerate() {
            for (zero, n) in kinds.iter().enumerate() {
                if *n > 0 {
                    self.pages
                        .get_or_create(&PageLabels {
                            channel: channel.into(),
                            phase: phase(post == 1),
                            kind: if zero == 1 {
                                PageKind::Zero
                            } else {
                                PageKind::Page
                            },
                        })
                        .inc_by(*n);
                }
            }
        }
        for (decision, n) in &d.requested {
            self.add_requested(*decision, *n);
        }
        if d.request_messages > 0 {
            self.request_messages.inc_by(d.request_messages);
        }
        for w in &d.served {
            self.observe_service(*w);
        }
        if let Some(n) = d.in_flight {
            self.in_flight.set(n as i64);
        }
    }

    /// Shows the source link's state.
    pub fn link(&self, v: &LinkView) {
        self.source_link_up.set(i64::from(v.state == "up"));
        self.source_silent_seconds.set(v.silent_for_s);
        self.source_away_seconds.set(v.away_for_s.unwrap_or(0.0));
    }

    /// Counts a connection to the metrics endpoint closed by one of its time limits.
    pub fn endpoint_timed_out(&self, limit: &'static str) {
        self.endpoint_timed_out
            .get_or_create(&EndpointLimitLabels { limit })
            .inc();
    }

    /// Counts a connection refused at the sidecar's port.
    pub fn refused(&self, kind: &'static str) {
        self.refused_connections
            .get_or_create(&RefusedLabels { kind })
            .inc();
    }

    /// Counts a cut of the source link.
    pub fn cut(&self, cause: &CutCause, decision: &CutDecision) {
        self.source_cuts
            .get_or_create(&CutLabels {
                cause: match cause {
                    CutCause::Closed => "closed",
                    CutCause::Failed(_) => "failed",
                    CutCause::Silent(_) => "silent",
                    CutCause::Handshake(_) => "handshake",
                },
                decision: match decision {
                    CutDecision::Hold => "hold",
                    CutDecision::PassThrough => "pass_through",
                    CutDecision::Fail(_) => "failed",
                    CutDecision::Done | CutDecision::Ignore => "done",
                },
            })
            .inc();
    }

    /// Cuts counted so far with this cause (`closed`, `failed`, `silent`, `handshake`),
    /// whatever the sidecar did about them.
    pub fn cuts_with_cause(&self, cause: &'static str) -> u64 {
        ["hold", "pass_through", "failed", "done"]
            .into_iter()
            .map(|decision| {
                self.source_cuts
                    .get_or_create(&CutLabels { cause, decision })
                    .get()
            })
            .sum()
    }

    /// Counts a completed recovery.
    pub fn recovered(&self, r: &Recovery) {
        self.recoveries
            .get_or_create(&RecoveryLabels {
                mode: if r.mode == "hold" {
                    "hold"
                } else {
                    "pass_through"
                },
            })
            .inc();
        self.recovery_seconds.observe(r.total_ms as f64 / 1000.0);
    }

    /// Counts requested pages by what the sidecar did with them.
    pub fn add_requested(&self, outcome: RequestDecision, pages: u64) {
        self.requested_pages
            .get_or_create(&RequestLabels { outcome })
            .inc_by(pages);
    }

    /// Records a fault's service time.
    pub fn observe_service(&self, waited: Duration) {
        self.fault_service.observe(waited.as_secs_f64());
    }
}

fn phase(postcopy: bool) -> PhaseLabel {
    if postcopy {
        PhaseLabel::Postcopy
    } else {
        PhaseLabel::Precopy
    }
}
