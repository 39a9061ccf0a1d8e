//! Which page goes next on a restore stream: requested pages first (with a short prefetch
//! window after each, since a guest touching a page soon touches its neighbours), then the
//! snapshot's recorded working set in the order the guest first needed it
//! ([`super::working_set`]), then a background sweep of the data pages nobody asked for. Never sends a page twice
//! (QEMU's destination fails on a second placement) and never sends a page that fails its
//! checksum. Pure: it fills byte buffers; the caller owns the socket and the clock.

use std::sync::Arc;

use super::working_set::{Recorder, Replay, WorkingSet};
use crate::snapshot::store::PageKind;
use crate::snapshot::{PageStore, SnapshotError};
use crate::wire::compose::{RamSections, put_page, put_zero};

/// Pages after a requested page that go with it.
pub const PREFETCH_PAGES: u64 = 7;

/// Why a page request cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The destination named a block the snapshot does not have.
    #[error("the destination asked for a page of unknown RAM block {0:?}")]
    UnknownBlock(String),
    /// The range lies outside the block.
    #[error(
        "the destination asked for {len:#x} bytes at {start:#x} of RAM block {block}, outside its {length:#x} bytes"
    )]
    OutOfRange {
        /// Block idstr.
        block: String,
        /// Requested start.
        start: u64,
        /// Requested length.
        len: u64,
        /// Block length.
        length: u64,
    },
}

/// Counts of what was sent.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ServeFigures {
    /// Data pages sent because they were requested.
    pub requested_pages: u64,
    /// Zero pages sent because they were requested.
    pub requested_zero_pages: u64,
    /// Requests for pages already sent (in flight to the destination): nothing to do.
    pub already_sent: u64,
    /// Pages sent in prefetch windows.
    pub prefetched_pages: u64,
    /// Pages sent from the recorded working set, ahead of the sweep.
    pub working_set_pages: u64,
    /// Data pages sent by the background sweep.
    pub background_pages: u64,
    /// Bytes of RAM sections written.
    pub bytes: u64,
}

/// State of one restore's page service.
pub struct PageServer {
    store: Arc<PageStore>,
    prefetch: u64,
    sections: RamSections,
    names: Vec<Vec<u8>>,
    sent: Vec<Vec<u64>>,
    /// Target pages per host page, per block (512 for a 2 MiB hugepage block): a host page
    /// always goes out whole, its target pages in order (protocol-spec/snapshot.md#snapshot-hugepages).
    host: Vec<u64>,
    cursor: (usize, u64),
    /// The working set being replayed (`None` once it is all out).
    replay: Option<Replay>,
    recorder: Option<Recorder>,
    page: Vec<u8>,
    figures: ServeFigures,
}

impl PageServer {
    /// A server for `store`, writing sections framed as `sections`.
    pub fn new(store: Arc<PageStore>, sections: RamSections) -> PageServer {
        let names = store
            .blocks()
            .iter()
            .map(|b| b.name.clone().into_bytes())
            .collect();
        let sent = (0..store.blocks().len())
            .map(|b| vec![0u64; store.block_pages(b).div_ceil(64) as usize])
            .collect();
        let page = vec![0u8; store.page_size() as usize];
        let host = vec![1; store.blocks().len()];
        PageServer {
            store,
            prefetch: PREFETCH_PAGES,
            sections,
            names,
            sent,
            host,
            cursor: (0, 0),
            replay: None,
            recorder: None,
            page,
            figures: ServeFigures::default(),
        }
    }

    /// Sends `pages` pages after each requested one instead of [`PREFETCH_PAGES`].
    pub fn with_prefetch(mut self, pages: u64) -> PageServer {
        self.prefetch = pages;
        self
    }

    /// Sends block `b`'s pages in host pages of `host[b]` target pages (from the
    /// destination's block page sizes): a destination places a huge page only once all
    /// its target pages came, one after another on one channel, and fails on any other
    /// page in between.
    pub fn with_host_pages(mut self, host: Vec<u64>) -> PageServer {
        if host.len() == self.host.len() {
            self.host = host.into_iter().map(|h| h.max(1)).collect();
        }
        self
    }

    /// The target pages of the host page holding `page`.
    fn host_range(&self, block: usize, page: u64) -> std::ops::Range<u64> {
        let h = self.host[block];
        let start = page - page % h;
        start..(start + h).min(self.store.block_pages(block))
    }

    /// Streams `set` (a working set recorded by an earlier restore) ahead of the
    /// background sweep.
    pub fn with_working_set(mut self, set: WorkingSet) -> PageServer {
        self.replay = Some(Replay::new(set));
        self
    }

    /// Records the pages the guest asks for, for [`Self::take_recorded`].
    pub fn recording(mut self) -> PageServer {
        let pages = (0..self.store.blocks().len()).map(|b| self.store.block_pages(b));
        self.recorder = Some(Recorder::new(pages));
        self
    }

    /// Whether this restore records a working set.
    pub fn is_recording(&self) -> bool {
        self.recorder.is_some()
    }

    /// The working set recorded so far (`None` when not recording).
    pub fn take_recorded(&mut self) -> Option<WorkingSet> {
        self.recorder.take().map(Recorder::into_set)
    }

    /// What was sent so far.
    pub fn figures(&self) -> &ServeFigures {
        &self.figures
    }

    /// Index of the block named `name`.
    pub fn block_index(&self, name: &[u8]) -> Result<usize, RequestError> {
        self.names
            .iter()
            .position(|n| n == name)
            .ok_or_else(|| RequestError::UnknownBlock(String::from_utf8_lossy(name).into()))
    }

    fn is_sent(&self, block: usize, page: u64) -> bool {
        self.sent[block][(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    fn mark_sent(&mut self, block: usize, page: u64) {
        self.sent[block][(page / 64) as usize] |= 1 << (page % 64);
    }

    /// Appends one page record (explicit block name on the section's first record).
    fn put(
        &mut self,
        out: &mut Vec<u8>,
        first: &mut bool,
        block: usize,
        page: u64,
    ) -> Result<bool, SnapshotError> {
        let name = if std::mem::take(first) {
            Some(self.names[block].as_slice())
        } else {
            None
        };
        let offset = page * self.store.page_size();
        let zero = match self.store.kind(block, page) {
            PageKind::Zero => {
                put_zero(out, name, offset);
                true
            }
            PageKind::Data(_) => {
                self.store.read(block, page, &mut self.page)?;
                put_page(out, name, offset, &self.page);
                false
            }
        };
        self.mark_sent(block, page);
        Ok(zero)
    }

    /// Appends one page to the PART section that starts at `mark` in `out` (opening it
    /// with the first page), naming the block again whenever it changes.
    fn put_in_section(
        &mut self,
        out: &mut Vec<u8>,
        mark: usize,
        first: &mut bool,
        last_block: &mut Option<usize>,
        block: usize,
        page: u64,
    ) -> Result<bool, SnapshotError> {
        if mark == out.len() {
            self.sections.open_part(out);
        }
        if *last_block != Some(block) {
            *first = true;
            *last_block = Some(block);
        }
        self.put(out, first, block, page)
    }

    /// Appends a PART section serving a request for `len` bytes at `start` of `block`, and
    /// the prefetch window after it. Returns how many requested pages were sent now (0 when
    /// all were already in flight).
    pub fn serve_request(
        &mut self,
        block: usize,
        start: u64,
        len: u64,
        out: &mut Vec<u8>,
    ) -> Result<u64, ServeError> {
        let ps = self.store.page_size();
        let length = self.store.blocks()[block].length;
        if start >= length || len > length - start || !start.is_multiple_of(ps) {
            return Err(ServeError::Request(RequestError::OutOfRange {
                block: String::from_utf8_lossy(&self.names[block]).into(),
                start,
                len,
                length,
            }));
        }
        let first_page = start / ps;
        let last_page = (start + len.max(1) - 1) / ps;
        if let Some(r) = self.replay.as_mut() {
            r.follow(block, first_page);
        }
        let mark = out.len();
        self.sections.open_part(out);
        let mut first = true;
        let mut served = 0;
        // Whole host pages around what was asked (a hugepage destination asks whole ones).
        let pages = self.host_range(block, first_page).start..self.host_range(block, last_page).end;
        for page in pages.clone() {
            if let Some(r) = self.recorder.as_mut() {
                r.requested(block, page);
            }
            if self.is_sent(block, page) {
                self.figures.already_sent += 1;
                continue;
            }
            if self.put(out, &mut first, block, page)? {
                self.figures.requested_zero_pages += 1;
            } else {
                self.figures.requested_pages += 1;
            }
            served += 1;
        }
        let last_page = pages.end - 1;
        // A huge page is window enough.
        let prefetch = if self.host[block] > 1 {
            0
        } else {
            self.prefetch
        };
        let end = (last_page + 1 + prefetch).min(self.store.block_pages(block));
        for page in last_page + 1..end {
            // The window is part of what the guest needed: it faulted no more there
            // because these pages came with the request.
            if let Some(r) = self.recorder.as_mut() {
                r.requested(block, page);
            }
            if !self.is_sent(block, page) {
                self.put(out, &mut first, block, page)?;
                self.figures.prefetched_pages += 1;
            }
        }
        if first {
            // Nothing to send: drop the empty section.
            out.truncate(mark);
        } else {
            self.sections.close(out);
            self.figures.bytes += (out.len() - mark) as u64;
        }
        Ok(served)
    }

    /// The next page of the working set not sent yet (`None` once it is all sent).
    fn next_of_working_set(&mut self) -> Option<(usize, u64)> {
        loop {
            let Some((block, page)) = self.replay.as_mut()?.next_page() else {
                self.replay = None;
                return None;
            };
            if !self.is_sent(block as usize, page) {
                return Some((block as usize, page));
            }
        }
    }

    /// One section of at most `max_pages` working-set pages.
    fn working_set_section(
        &mut self,
        max_pages: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), ServeError> {
        let mark = out.len();
        let mut first = true;
        let mut last_block = None;
        let mut n = 0;
        while n < max_pages {
            let Some((block, page)) = self.next_of_working_set() else {
                break;
            };
            for p in self.host_range(block, page) {
                if !self.is_sent(block, p) {
                    self.put_in_section(out, mark, &mut first, &mut last_block, block, p)?;
                    self.figures.working_set_pages += 1;
                    n += 1;
                }
            }
        }
        if out.len() > mark {
            self.sections.close(out);
            self.figures.bytes += (out.len() - mark) as u64;
        }
        Ok(())
    }

    /// Appends a PART section of up to `max_pages` data pages of the background sweep.
    /// Zero pages are skipped: the destination discarded all RAM before postcopy, so a page
    /// never placed reads as zero once the migration ends (protocol-spec/snapshot.md#snapshot-zero-pages).
    /// Returns false once the sweep is complete.
    pub fn background(&mut self, max_pages: usize, out: &mut Vec<u8>) -> Result<bool, ServeError> {
        self.background_paced(max_pages, usize::MAX, out)
    }

    /// [`Self::background`] with at most `sweep_pages` of the pages from the sweep proper:
    /// the working set is not counted, as the guest is about to wait on it (a paced
    /// restore, [`super::stream::ServeKnobs::sweep_rate`]). A host page is never split, so
    /// the sweep may pass `sweep_pages` by less than one host page.
    pub fn background_paced(
        &mut self,
        max_pages: usize,
        sweep_pages: usize,
        out: &mut Vec<u8>,
    ) -> Result<bool, ServeError> {
        // The working set first, zero pages included: the guest will touch them, and a
        // page never placed blocks it until asked for.
        let before = self.figures.working_set_pages;
        self.working_set_section(max_pages, out)?;
        let mut n = (self.figures.working_set_pages - before) as usize;
        let mark = out.len();
        let mut first = true;
        let mut last_block = None;
        let mut swept = 0;
        while n < max_pages && swept < sweep_pages {
            let (block, page) = self.cursor;
            if block >= self.names.len() {
                break;
            }
            if page >= self.store.block_pages(block) {
                self.cursor = (block + 1, 0);
                continue;
            }
            let host = self.host_range(block, page);
            self.cursor.1 = host.end;
            // A host page is sent whole or not at all; one of zeroes never.
            if self.is_sent(block, host.start)
                || host
                    .clone()
                    .all(|p| self.store.kind(block, p) == PageKind::Zero)
            {
                continue;
            }
            for p in host {
                self.put_in_section(out, mark, &mut first, &mut last_block, block, p)?;
                self.figures.background_pages += 1;
                n += 1;
                swept += 1;
            }
        }
        if out.len() > mark {
            self.sections.close(out);
            self.figures.bytes += (out.len() - mark) as u64;
        }
        Ok(self.cursor.0 < self.names.len())
    }

    /// Appends the END section and EOF that end the stream.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        self.sections.open_end(out);
        self.sections.close(out);
        out.push(crate::wire::stream::SECTION_EOF);
    }
}

/// Why serving failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A bad request from the destination.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// The store could not give a good page.
    #[error(transparent)]
    Store(#[from] SnapshotError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::meta::{FileDigest, SnapshotMeta, SourceInfo, StreamFacts};
    use crate::snapshot::store::StoreWriter;
    use crate::wire::{Event, RamRecord, Step, StreamDecoder};

    /// A server of `s` as the tests read its stream: `ram` is section 3, with footers.
    fn server(s: Arc<PageStore>) -> PageServer {
        PageServer::new(
            s,
            RamSections {
                section_id: 3,
                footers: true,
            },
        )
    }

    fn store(pages: u64, zero: &[u64]) -> (tempfile::TempDir, Arc<PageStore>) {
        let dir = tempfile::tempdir().unwrap();
        let mut w = StoreWriter::create(dir.path(), &[("m".into(), pages * 4096)], 4096).unwrap();
        for p in 0..pages {
            if zero.contains(&p) {
                w.put_zero(0, p * 4096).unwrap();
            } else {
                w.put_page(0, p * 4096, &[p as u8 + 1; 4096]).unwrap();
            }
        }
        let (blocks, index, pages_len) = w.finish().unwrap();
        let meta = SnapshotMeta {
            format: crate::snapshot::meta::FORMAT_VERSION,
            created_unix: 0,
            source: SourceInfo::default(),
            stream: StreamFacts {
                ram_section_id: 3,
                section_footers: true,
                switchover_start: false,
                target_page_size: 4096,
            },
            blocks,
            opening: FileDigest::of(b""),
            package: FileDigest::of(b""),
            index,
            pages_len,
            checksum: String::new(),
        };
        let s = PageStore::open(dir.path(), &meta).unwrap();
        (dir, Arc::new(s))
    }

    /// Offsets of the page records in RAM sections (decoded after a fake START).
    fn offsets(bytes: &[u8]) -> Vec<(u64, bool)> {
        let mut head = Vec::new();
        crate::wire::stream::encode_file_header(&mut head);
        crate::wire::Configuration {
            machine: b"pc",
            subsections: vec![],
        }
        .encode(&mut head);
        crate::wire::SectionHeader {
            kind: crate::wire::SectionKind::Start,
            section_id: 3,
            ident: Some(crate::wire::stream::SectionIdent {
                idstr: b"ram",
                instance_id: 0,
                version_id: 4,
            }),
        }
        .encode(&mut head);
        RamRecord::MemSize { total: 64 * 4096 }.encode(&mut head);
        RamRecord::Block(crate::wire::BlockEntry {
            idstr: b"m",
            used_length: 64 * 4096,
            page_size: None,
            mr_addr: None,
            mapped_ram_header: None,
        })
        .encode(&mut head);
        RamRecord::Eos.encode(&mut head);
        crate::wire::stream::encode_footer(3, &mut head);
        head.extend_from_slice(bytes);
        let mut dec = StreamDecoder::default();
        let mut at = 0;
        let mut out = Vec::new();
        while at < head.len() {
            match dec.next(&head[at..]).unwrap() {
                Step::Event { len, event, .. } => {
                    match event {
                        Event::Ram(RamRecord::Page { header, .. }) => {
                            out.push((header.offset / 4096, false))
                        }
                        Event::Ram(RamRecord::Zero { header }) => {
                            out.push((header.offset / 4096, true))
                        }
                        _ => {}
                    }
                    at += len;
                }
                Step::NeedMore => panic!("cut"),
            }
        }
        out
    }

    /// A hugepage block (here 16 target pages per host page, in a 64-page block): every
    /// host page goes out whole and in order, wherever the request fell, one of zeroes
    /// only when asked for, and never interleaved with another (a destination fails on
    /// that: "Non-same host page detected").
    #[test]
    fn host_pages_go_out_whole_and_in_order() {
        // Host page 1 (pages 16..32) is all zero; page 40 is zero inside host page 2.
        let zero: Vec<u64> = (16..32).chain([40]).collect();
        let (_d, s) = store(64, &zero);
        let mut srv = server(s).with_host_pages(vec![16]);
        let mut out = Vec::new();
        // A request in the middle of host page 2, then one for the zero host page 1.
        assert_eq!(srv.serve_request(0, 37 * 4096, 4096, &mut out).unwrap(), 16);
        assert_eq!(srv.serve_request(0, 20 * 4096, 4096, &mut out).unwrap(), 16);
        while srv.background(5, &mut out).unwrap() {}
        srv.finish(&mut out);
        let got: Vec<u64> = offsets(&out).iter().map(|p| p.0).collect();
        let want: Vec<u64> = (32..48).chain(16..32).chain(0..16).chain(48..64).collect();
        assert_eq!(got, want);
        assert!(
            offsets(&out)[8].1,
            "page 40 went as a ZERO record inside its host page"
        );
    }

    #[test]
    fn requests_first_then_background_never_twice() {
        let (_d, s) = store(64, &[3, 40]);
        let mut srv = server(s);
        let mut out = Vec::new();
        assert_eq!(srv.serve_request(0, 2 * 4096, 4096, &mut out).unwrap(), 1);
        // 2 requested, 3..=9 prefetched (3 is a zero page, sent as ZERO)
        assert_eq!(srv.serve_request(0, 5 * 4096, 4096, &mut out).unwrap(), 0);
        while srv.background(16, &mut out).unwrap() {}
        srv.finish(&mut out);
        let got = offsets(&out);
        assert_eq!(got[0], (2, false));
        assert_eq!(
            got[1..8].iter().map(|p| p.0).collect::<Vec<_>>(),
            (3..=9).collect::<Vec<_>>()
        );
        assert!(got[1].1, "page 3 is a zero page");
        let mut seen: Vec<u64> = got.iter().map(|p| p.0).collect();
        let n = seen.len();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), n, "a page was sent twice");
        // every data page sent, the untouched zero page 40 not
        assert_eq!(n, 63);
        assert!(!seen.contains(&40));
        assert_eq!(srv.figures().already_sent, 1);
    }

    #[test]
    fn a_paced_sweep_sends_the_working_set_whole_and_the_sweep_by_its_allowance() {
        let (_d, s) = store(64, &[]);
        let mut srv = server(s).with_prefetch(0).with_working_set({
            let mut rec = Recorder::new([64]);
            for p in [50, 51, 52] {
                rec.requested(0, p);
            }
            rec.into_set()
        });
        let mut out = Vec::new();
        // No sweep allowed: the working set still goes, and nothing else.
        assert!(srv.background_paced(16, 0, &mut out).unwrap());
        assert_eq!(
            offsets(&out).iter().map(|p| p.0).collect::<Vec<_>>(),
            vec![50, 51, 52]
        );
        assert_eq!(srv.figures().background_pages, 0);
        out.clear();
        assert!(srv.background_paced(16, 0, &mut out).unwrap());
        assert!(
            out.is_empty(),
            "nothing left but the sweep, and none allowed"
        );
        // Then the sweep, by its allowance.
        assert!(srv.background_paced(16, 5, &mut out).unwrap());
        assert_eq!(
            offsets(&out).iter().map(|p| p.0).collect::<Vec<_>>(),
            (0..5).collect::<Vec<_>>()
        );
        out.clear();
        while srv.background_paced(16, 7, &mut out).unwrap() {}
        let mut seen: Vec<u64> = offsets(&out).iter().map(|p| p.0).collect();
        seen.extend(0..5);
        seen.extend([50, 51, 52]);
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 64, "every page once");
    }

    #[test]
    fn bad_requests_are_typed_errors() {
        let (_d, s) = store(4, &[]);
        let mut srv = PageServer::new(
            s,
            RamSections {
                section_id: 3,
                footers: false,
            },
        );
        let mut out = Vec::new();
        assert!(matches!(
            srv.serve_request(0, 4 * 4096, 4096, &mut out),
            Err(ServeError::Request(RequestError::OutOfRange { .. }))
        ));
        assert_eq!(
            srv.block_index(b"pc.ram"),
            Err(RequestError::UnknownBlock("pc.ram".into()))
        );
        assert!(out.is_empty());
    }

    #[test]
    fn a_request_ahead_of_the_replay_moves_it_on_and_the_rest_follows() {
        let (_d, s) = store(64, &[]);
        let mut rec = Recorder::new([64]);
        for p in 0..16 {
            rec.requested(0, p);
        }
        let mut srv = server(s).with_prefetch(2).with_working_set(rec.into_set());
        let mut out = Vec::new();
        assert!(srv.background_paced(2, 0, &mut out).unwrap());
        // The guest got to page 8 before the replay: 8 and its window go now, and the
        // replay goes on after them, then back to 2..8; each page once.
        assert_eq!(srv.serve_request(0, 8 * 4096, 4096, &mut out).unwrap(), 1);
        assert!(srv.background_paced(16, 0, &mut out).unwrap());
        let got: Vec<u64> = offsets(&out).iter().map(|p| p.0).collect();
        let want: Vec<u64> = (0..2).chain(8..16).chain(2..8).collect();
        assert_eq!(got, want);
        assert_eq!(srv.figures().working_set_pages, 13);
    }

    #[test]
    fn the_working_set_goes_first_after_live_requests_and_is_recorded_again() {
        let (_d, s) = store(64, &[3, 40]);
        let mut rec = Recorder::new([64]);
        for p in [10, 3, 20, 10] {
            rec.requested(0, p);
        }
        let set = rec.into_set();
        let mut srv = server(s).with_prefetch(0).with_working_set(set).recording();
        let mut out = Vec::new();
        // A live request comes before anything of the working set.
        assert_eq!(srv.serve_request(0, 30 * 4096, 4096, &mut out).unwrap(), 1);
        assert!(srv.background(2, &mut out).unwrap());
        // The guest asks for a page the replay already sent: nothing to send.
        assert_eq!(srv.serve_request(0, 10 * 4096, 4096, &mut out).unwrap(), 0);
        while srv.background(16, &mut out).unwrap() {}
        srv.finish(&mut out);
        let got = offsets(&out);
        assert_eq!(
            &got[..4],
            &[(30, false), (10, false), (3, true), (20, false)]
        );
        let mut seen: Vec<u64> = got.iter().map(|p| p.0).collect();
        let n = seen.len();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), n, "a page was sent twice");
        // Every data page, and the zero page of the working set; not the untouched zero page.
        assert_eq!(n, 63);
        assert!(!seen.contains(&40));
        assert_eq!(srv.figures().working_set_pages, 3);
        assert_eq!(srv.figures().already_sent, 1);
        assert_eq!(srv.take_recorded().unwrap().pages(), &[(0, 30), (0, 10)]);
    }
}
