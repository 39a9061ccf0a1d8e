//! The live view on a terminal: phase, bytes, pages and faults/s, refreshed a few times a
//! second from the shared counters while the migration runs.

use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use super::relay::Shared;

/// A running live view; [`LiveView::finish`] clears it before the report prints.
pub struct LiveView {
    bar: ProgressBar,
    task: tokio::task::JoinHandle<()>,
}

impl LiveView {
    /// Starts refreshing from `shared` every 250 ms.
    pub fn start(shared: Arc<Shared>) -> LiveView {
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
                .expect("valid template"),
        );
        bar.enable_steady_tick(Duration::from_millis(120));
        let b = bar.clone();
        let task = tokio::spawn(async move {
            loop {
                b.set_message(line(&shared));
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

/// One status line from the shared counters.
pub fn line(shared: &Shared) -> String {
    let s = shared.stats.lock().expect("stats lock");
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    format!(
        "phase {:<10} main {:>8.1} MiB  preempt {:>7.1} MiB  pages {:>8} (+{} zero)  faults {:>6} ({}/s)  served {}",
        s.phase.name(),
        mib(s.bytes.main),
        mib(s.bytes.preempt),
        s.precopy.pages + s.postcopy.pages,
        s.precopy.zero_pages + s.postcopy.zero_pages,
        s.requests,
        s.faults_per_second(),
        s.served,
    )
}
