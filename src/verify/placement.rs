//! Verification at placement, while the guest runs: every page delivered in postcopy is
//! read through the guard as soon as QEMU has placed it and compared with the digest of
//! the record that carried it (protocol-spec/guarded-access.md#guard-verify).
//!
//! Its limit: between QEMU's placement and this read the running guest may already have
//! written the page, most likely one a vCPU was waiting for. Such a mismatch is reported
//! with `requested: true`; it is not proof of corruption. A paused destination has no such
//! window, and `receive --verify` then also compares the whole RAM at the end.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use super::check::{Mismatch, VerifyReport, describe, matches};
use super::digests::Expected;
use crate::guard::GuardedRam;

/// One page to check once placed.
#[derive(Debug, Clone)]
pub struct PlacementCheck {
    /// Block idstr.
    pub block: String,
    /// Byte offset.
    pub offset: u64,
    /// Digest of the delivered record.
    pub digest: u64,
    /// Whether the destination had asked for it.
    pub requested: bool,
}

/// The checking thread; [`PlacementVerifier::finish`] returns what it found.
pub struct PlacementVerifier {
    tx: Option<mpsc::Sender<PlacementCheck>>,
    thread: Option<std::thread::JoinHandle<()>>,
    report: Arc<Mutex<VerifyReport>>,
}

impl PlacementVerifier {
    /// Starts checking pages read through `guard`.
    pub fn start(guard: Arc<GuardedRam>) -> PlacementVerifier {
        let (tx, rx) = mpsc::channel::<PlacementCheck>();
        let report = Arc::new(Mutex::new(VerifyReport {
            mode: "at-placement".into(),
            blocks: guard.blocks().into_iter().map(|(n, _)| n).collect(),
            ..Default::default()
        }));
        let out = report.clone();
        let thread = std::thread::Builder::new()
            .name("verify-placed".into())
            .spawn(move || {
                let mut page = vec![0u8; crate::guard::mapping::PAGE as usize];
                for c in rx {
                    let Some(b) = guard.block_index(&c.block) else {
                        continue; // not in a memfd: cannot be read from outside
                    };
                    if guard.read_page(b, c.offset, &mut page).is_err() {
                        break; // the migration failed: nothing more can be read
                    }
                    let (ok, found) = matches(&page, Expected::Digest(c.digest));
                    let mut r = out.lock().unwrap_or_else(|p| p.into_inner());
                    r.pages += 1;
                    if !ok {
                        r.mismatch(Mismatch {
                            block: c.block,
                            offset: c.offset,
                            expected: describe(Expected::Digest(c.digest)),
                            found: format!("{found:016x}"),
                            requested: c.requested,
                        });
                    }
                }
            })
            .expect("spawning the placement verifier");
        PlacementVerifier {
            tx: Some(tx),
            thread: Some(thread),
            report,
        }
    }

    /// Queues a page.
    pub fn check(&self, c: PlacementCheck) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(c);
        }
    }

    /// Waits for the queued checks and returns the report. Call it after the guard saw the
    /// end of the migration, so no check waits for a page that will never come.
    pub fn finish(mut self) -> VerifyReport {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.report
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
