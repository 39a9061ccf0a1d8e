//! Time to the guest's first sign of life: a restored VM that QEMU reports as running may
//! still be stalled on its first page faults, so the report also gives the moment the
//! guest itself first printed progress. The guest's console is a file that QEMU (or a
//! console logger) appends to; this watches what is appended after the restore begins.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;

/// Which file to watch and what marks a progress line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgressWatch {
    /// The destination guest's console log (e.g. QEMU `-serial file:PATH`).
    pub log: PathBuf,
    /// A line containing this text is a progress line.
    pub marker: String,
}

/// The marker our test guest prints (interop-tests/guest-workload): the default of
/// `restore --progress-marker`.
pub const DEFAULT_MARKER: &str = "WL progress";

/// How often the log's length is checked. Appends are seen at most this late, which bounds
/// the figure's error; the cost is one `read` call per period.
pub const POLL: Duration = Duration::from_millis(1);

/// Starts watching `watch.log` from its current end; the task ends with the time of the
/// first complete line containing the marker (it runs until aborted otherwise).
pub fn start(watch: ProgressWatch) -> tokio::task::JoinHandle<Option<Instant>> {
    let from = std::fs::metadata(&watch.log).map(|m| m.len()).unwrap_or(0);
    tokio::spawn(async move { first_line(watch, from).await })
}

async fn first_line(watch: ProgressWatch, mut offset: u64) -> Option<Instant> {
    let marker = watch.marker.as_bytes();
    let mut pending: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut file = None;
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if file.is_none() {
            match tokio::fs::File::open(&watch.log).await {
                Ok(mut f) => {
                    use tokio::io::AsyncSeekExt;
                    f.seek(std::io::SeekFrom::Start(offset)).await.ok()?;
                    file = Some(f);
                }
                Err(_) => continue,
            }
        }
        let f = file.as_mut()?;
        loop {
            let n = f.read(&mut chunk).await.ok()?;
            if n == 0 {
                break;
            }
            offset += n as u64;
            pending.extend_from_slice(&chunk[..n]);
            while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                if line.windows(marker.len()).any(|w| w == marker) {
                    return Some(Instant::now());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[tokio::test]
    async fn sees_only_lines_appended_after_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        std::fs::write(&log, "WL progress old\n").unwrap();
        let task = start(ProgressWatch {
            log: log.clone(),
            marker: DEFAULT_MARKER.into(),
        });
        let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(b"booting\nWL prog").unwrap();
        f.flush().unwrap();
        let before = Instant::now();
        f.write_all(b"ress round=1\n").unwrap();
        let seen = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the line is seen")
            .unwrap()
            .expect("a time");
        assert!(seen >= before);
    }

    #[tokio::test]
    async fn a_log_that_appears_later_is_watched_from_its_start() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("late.log");
        let task = start(ProgressWatch {
            log: log.clone(),
            marker: "ready".into(),
        });
        std::fs::write(&log, "x\nready\n").unwrap();
        let seen = tokio::time::timeout(Duration::from_secs(10), task).await;
        assert!(seen.expect("seen").unwrap().is_some());
    }
}
