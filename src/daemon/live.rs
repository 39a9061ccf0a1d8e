//! The live view on a terminal: phase, bytes, pages and faults/s, refreshed a few times a
//! second from the shared counters while the migration runs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use super::relay::Relay;
use crate::session::Session;

/// A running live view; [`LiveView::finish`] clears it before the report prints.
pub struct LiveView {
    bar: ProgressBar,
    task: tokio::task::JoinHandle<()>,
}

impl LiveView {
    /// Starts refreshing from the relay's session every 250 ms.
    pub fn start(relay: Arc<Relay>) -> LiveView {
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
                .expect("valid template"),
        );
        bar.enable_steady_tick(Duration::from_millis(120));
        let b = bar.clone();
        let task = tokio::spawn(async move {
            loop {
                b.set_message(relay.with(|s| line(s)));
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
        LiveView { bar, task }
    }

    /// Stops the view and leaves its last line on screen.
    pub fn finish(self) {
        self.task.abort();
        self.bar.finish();
    }
}

/// One status line from the session's counters.
pub fn line(session: &Session) -> String {
    let s = session.stats();
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let v = session.link_view(Instant::now());
    let link = match (v.state, v.away_for_s, &v.cause) {
        ("up", _, _) if v.silent_for_s >= 2.0 => {
            format!("source silent {:.0} s", v.silent_for_s)
        }
        (state, Some(away), Some(cause)) => format!("source {state} {away:.0} s ({cause})"),
        (state, _, _) => format!("source {state}"),
    };
    format!(
        "{link}  phase {:<10} main {:>8.1} MiB  preempt {:>7.1} MiB  pages {:>8} (+{} zero)  faults {:>6} ({}/s)  served {}  recoveries {}",
        s.phase.name(),
        mib(s.bytes.main),
        mib(s.bytes.preempt),
        s.precopy.pages + s.postcopy.pages,
        s.precopy.zero_pages + s.postcopy.zero_pages,
        s.requests,
        s.faults_per_second(),
        s.served,
        session.recoveries().len(),
    )
}
