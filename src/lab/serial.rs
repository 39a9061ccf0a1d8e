//! Line buffers fed by a QEMU's serial console (and its stderr), with waits on them.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::watch;

/// Why a wait on a [`SerialLog`] ended without a match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitEnd {
    /// The deadline passed.
    Timeout,
    /// The producer closed (QEMU exited) and no line matched.
    Closed,
}

struct Inner {
    lines: Mutex<Vec<String>>,
    /// Number of lines so far; waiters watch it.
    count: watch::Sender<usize>,
    closed: AtomicBool,
    log: Option<Mutex<std::fs::File>>,
}

/// All lines a stream produced so far, kept in memory (and optionally appended to a file),
/// shared between the reader task and any number of waiters.
///
/// Line numbers are stable indices into the log: take [`SerialLog::len`] before an action
/// and wait with [`SerialLog::wait_after`] to see only what came after it.
#[derive(Clone)]
pub struct SerialLog {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SerialLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialLog")
            .field("lines", &self.len())
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl SerialLog {
    /// An empty log; with `log_file`, every line is also appended there (for humans).
    pub fn new(log_file: Option<&Path>) -> std::io::Result<SerialLog> {
        let log = match log_file {
            Some(p) => Some(Mutex::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            )),
            None => None,
        };
        Ok(SerialLog {
            inner: Arc::new(Inner {
                lines: Mutex::new(Vec::new()),
                count: watch::channel(0).0,
                closed: AtomicBool::new(false),
                log,
            }),
        })
    }

    /// Appends one line (without its line ending) and wakes waiters.
    pub fn push(&self, line: String) {
        if let Some(f) = &self.inner.log {
            let mut f = f.lock().unwrap_or_else(|p| p.into_inner());
            let _ = writeln!(f, "{line}");
        }
        let mut lines = self.inner.lines.lock().unwrap_or_else(|p| p.into_inner());
        lines.push(line);
        self.inner.count.send_replace(lines.len());
    }

    /// Marks the producer as gone (EOF) and wakes waiters so they fail fast.
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        self.inner.count.send_modify(|_| {});
    }

    /// Whether the producer is gone.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::SeqCst)
    }

    /// Number of lines so far (the cursor for [`SerialLog::wait_after`]).
    pub fn len(&self) -> usize {
        self.inner
            .lines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Whether no line arrived yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy of all lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.inner
            .lines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Lines from index `from` on.
    pub fn lines_from(&self, from: usize) -> Vec<String> {
        let l = self.inner.lines.lock().unwrap_or_else(|p| p.into_inner());
        l.get(from..).map(<[String]>::to_vec).unwrap_or_default()
    }

    /// The last `n` lines joined, for error messages.
    pub fn tail(&self, n: usize) -> String {
        let l = self.inner.lines.lock().unwrap_or_else(|p| p.into_inner());
        l[l.len().saturating_sub(n)..].join("\n")
    }

    /// The last `n` lines that say why a guest died, joined: its workload's own lines, a
    /// user-space panic or abort message, the kernel's verdict. A dying guest's tail is
    /// its kernel's stack dump, which hides the line that explains it.
    pub fn last_words(&self, n: usize) -> String {
        const TELLING: [&str; 6] = [
            "WL ",
            "panicked",
            "***",
            "Kernel panic",
            "segfault",
            "traps:",
        ];
        let l = self.inner.lines.lock().unwrap_or_else(|p| p.into_inner());
        let telling: Vec<&str> = l
            .iter()
            .filter(|line| TELLING.iter().any(|t| line.contains(t)))
            .map(String::as_str)
            .collect();
        telling[telling.len().saturating_sub(n)..].join("\n")
    }

    /// Waits for the first line at index `from` or later that matches `pred`; returns its
    /// index and text.
    pub async fn wait_after(
        &self,
        from: usize,
        pred: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Result<(usize, String), WaitEnd> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut rx = self.inner.count.subscribe();
        let mut next = from;
        loop {
            // Mark first, then look: a line pushed after the look still wakes us.
            rx.mark_unchanged();
            {
                let l = self.inner.lines.lock().unwrap_or_else(|p| p.into_inner());
                while next < l.len() {
                    if pred(&l[next]) {
                        return Ok((next, l[next].clone()));
                    }
                    next += 1;
                }
            }
            if self.is_closed() {
                return Err(WaitEnd::Closed);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Err(_) => return Err(WaitEnd::Timeout),
                Ok(Err(_)) => return Err(WaitEnd::Closed),
                Ok(Ok(())) => {}
            }
        }
    }

    /// Spawns a task that reads `reader` line by line into this log until EOF, then closes
    /// the log. Serial consoles end lines with `\r\n`; both are stripped.
    pub fn spawn_reader<R>(&self, reader: R) -> tokio::task::JoinHandle<()>
    where
        R: AsyncRead + Unpin + Send + 'static,
    {
        let log = self.clone();
        tokio::spawn(async move {
            let mut r = BufReader::new(reader);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        while matches!(buf.last(), Some(b'\n' | b'\r')) {
                            buf.pop();
                        }
                        log.push(String::from_utf8_lossy(&buf).into_owned());
                    }
                }
            }
            log.close();
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_see_past_and_future_lines() {
        let log = SerialLog::new(None).unwrap();
        log.push("a".into());
        let l2 = log.clone();
        let t =
            tokio::spawn(
                async move { l2.wait_after(1, |l| l == "c", Duration::from_secs(5)).await },
            );
        log.push("b".into());
        log.push("c".into());
        assert_eq!(t.await.unwrap(), Ok((2, "c".to_string())));
        assert_eq!(
            log.wait_after(0, |l| l == "a", Duration::from_secs(1))
                .await,
            Ok((0, "a".into()))
        );
        assert_eq!(
            log.wait_after(1, |l| l == "a", Duration::from_millis(10))
                .await,
            Err(WaitEnd::Timeout)
        );
        log.close();
        assert_eq!(
            log.wait_after(0, |l| l == "zz", Duration::from_secs(5))
                .await,
            Err(WaitEnd::Closed)
        );
    }

    #[test]
    fn last_words_skip_the_stack_dump() {
        let log = SerialLog::new(None).unwrap();
        for l in [
            "WL progress round=3 mismatches=0",
            "thread 'main' panicked at src/main.rs:9:5:",
            "[ 3.55] Kernel panic - not syncing: Attempted to kill init!",
            "[ 3.55] Call Trace:",
            "[ 3.55]  dump_stack_lvl+0x44/0x5c",
        ] {
            log.push(l.into());
        }
        assert_eq!(
            log.last_words(2),
            "thread 'main' panicked at src/main.rs:9:5:\n\
             [ 3.55] Kernel panic - not syncing: Attempted to kill init!"
        );
    }

    #[tokio::test]
    async fn reader_strips_crlf_and_closes() {
        let log = SerialLog::new(None).unwrap();
        let data: &[u8] = b"one\r\ntwo\nthree";
        log.spawn_reader(data).await.unwrap();
        assert_eq!(log.lines(), vec!["one", "two", "three"]);
        assert!(log.is_closed());
    }
}
