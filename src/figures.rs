//! Figures shared by every part that times something (the relay, the guard, restore, the
//! synthetic destination), kept in a leaf module so none of them depends on another.

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latency percentiles of one kind of wait (a fault served through the sidecar, a guarded
/// read, a restore's page service), in µs.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct LatencyFigures {
    /// Requests answered.
    pub count: u64,
    /// Median, µs.
    pub p50_us: f64,
    /// 90th percentile, µs.
    pub p90_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// Worst, µs.
    pub max_us: f64,
    /// Mean, µs.
    pub mean_us: f64,
}

/// Percentiles of a histogram of µs values (all zero when it is empty).
pub fn latency_of(h: &Histogram<u64>) -> LatencyFigures {
    if h.is_empty() {
        return LatencyFigures::default();
    }
    LatencyFigures {
        count: h.len(),
        p50_us: h.value_at_quantile(0.5) as f64,
        p90_us: h.value_at_quantile(0.9) as f64,
        p99_us: h.value_at_quantile(0.99) as f64,
        max_us: h.max() as f64,
        mean_us: h.mean(),
    }
}
