//! The relay pumps carry real captured bytes unchanged through in-memory pipes, around
//! the session (with data pages first on, the same pages each once, reordered), and the
//! return path drops requests for pages the stream already delivered.

use std::sync::Arc;
use std::time::Instant;

use postcopy_sidecar::daemon::relay::{
    Feed, OwnPreempt, PumpReport, Relay, main_pump, return_path_pump,
};
use postcopy_sidecar::inspect::read_capture;
use postcopy_sidecar::session::{CutDecision, Session, SessionConfig};
use postcopy_sidecar::wire::{RpDecoder, RpMessage, Step};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

fn capture(name: &str) -> Vec<u8> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("protocol-spec/captures/dev-10.0-idle-postcopy")
        .join(name);
    read_capture(&p).expect("capture present")
}

/// A relay with its first source main connection accepted, keeping stream order when
/// nothing is asked for: data pages first off, so bytes pass unchanged.
fn relay() -> (Arc<Relay>, mpsc::UnboundedReceiver<PumpReport>) {
    relay_with(false)
}

/// A relay with data pages first on or off.
fn relay_with(data_first: bool) -> (Arc<Relay>, mpsc::UnboundedReceiver<PumpReport>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let r = Arc::new(Relay::new(
        Session::new(
            SessionConfig {
                data_first,
                ..SessionConfig::default()
            },
            Instant::now(),
        ),
        None,
        tx,
    ));
    r.with(|s| s.source_main_connected(Instant::now())).unwrap();
    (r, rx)
}

/// The main pump fed with its first source connection and a destination connection:
/// the source's write end, the destination's read end, the feed (closing it ends the
/// pump) and the pump.
async fn start_main_pump(
    relay: &Arc<Relay>,
) -> (
    tokio::io::DuplexStream,
    tokio::io::DuplexStream,
    mpsc::Sender<Feed>,
    tokio::task::JoinHandle<Result<(), postcopy_sidecar::daemon::relay::RelayError>>,
) {
    let (src_w, src_r) = tokio::io::duplex(64 * 1024);
    let (dst_w, dst_r) = tokio::io::duplex(64 * 1024);
    let (feed, feeds) = mpsc::channel(1);
    let pump = tokio::spawn(main_pump(relay.clone(), feeds));
    feed.send(Feed {
        source: Box::new(src_r),
        epoch: 1,
        destination: Some(Box::new(dst_w)),
        own_preempt: None,
    })
    .await
    .unwrap();
    (src_w, dst_r, feed, pump)
}

/// Carries `stream` from a source pipe to a destination pipe through the main pump, as
/// the carrier would, and returns what reached the destination. `before_close` runs once
/// the destination has every byte and before the source closes (a QEMU source closes
/// only after the destination's SHUT came back).
async fn through_main_pump(
    relay: &Arc<Relay>,
    reports: &mut mpsc::UnboundedReceiver<PumpReport>,
    stream: Vec<u8>,
    before_close: impl std::future::Future<Output = ()>,
) -> Vec<u8> {
    let (mut src_w, mut dst_r, feed, pump) = start_main_pump(relay).await;
    let len = stream.len();
    let feeder = tokio::spawn(async move {
        // Odd chunk sizes so records straddle reads.
        for c in stream.chunks(7919) {
            src_w.write_all(c).await.unwrap();
        }
        src_w
    });
    let mut out = vec![0u8; len];
    dst_r.read_exact(&mut out).await.unwrap();
    let src_w = feeder.await.unwrap();
    before_close.await;
    drop(src_w);
    // The source closed after its EOF: the session calls that done, and the carrier
    // closes the pump's input.
    loop {
        match reports.recv().await.unwrap() {
            PumpReport::SourceLost { channel, cause, .. } => {
                let d = relay.with(|s| s.source_lost(channel, cause, Instant::now()));
                assert_eq!(d, CutDecision::Done);
                break;
            }
            // The destination's close after its SHUT (the return path's pump).
            PumpReport::DestinationLost { error: None, .. } => {}
            other => panic!("{other:?}"),
        }
    }
    drop(feed);
    pump.await.unwrap().unwrap();
    let mut rest = Vec::new();
    dst_r.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    out
}

/// Every page record of a main stream, in order: (block, offset, zero, its bytes' hash).
fn pages_of(stream: &[u8]) -> Vec<(usize, u64, bool, u64)> {
    use postcopy_sidecar::wire::{DecoderOptions, Event, RamRecord, StreamDecoder};
    use std::hash::{Hash, Hasher};
    let mut dec = StreamDecoder::new(DecoderOptions::default());
    let mut pos = 0;
    let mut pages = Vec::new();
    while let Step::Event { len, event, .. } = dec.next(&stream[pos..]).unwrap() {
        if let Event::Ram(rec) = &event
            && let Some(h) = rec.page_header()
        {
            // The content, not the header: a moved record may have its block named.
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            if let RamRecord::Page { data, .. } = rec {
                data.hash(&mut hasher);
            }
            pages.push((
                h.block,
                h.offset,
                matches!(rec, RamRecord::Zero { .. }),
                hasher.finish(),
            ));
        }
        pos += len;
    }
    assert_eq!(pos, stream.len(), "the whole stream decodes");
    dec.finish(&stream[pos..]).unwrap();
    pages
}

/// With data pages first and a destination that reads nothing until the source has sent
/// everything, the captured stream reaches it reordered: the same pages, each once, data
/// pages ahead of the zero pages they were queued with.
#[tokio::test]
async fn with_data_first_a_slow_destination_gets_every_page_once_data_pages_first() {
    let main = capture("main.fwd.gz");
    let (relay, mut reports) = relay_with(true);
    let (mut src_w, mut dst_r, feed, pump) = start_main_pump(&relay).await;
    // The whole capture fits in the read-ahead: the source's writes complete while the
    // destination reads nothing.
    src_w.write_all(&main).await.unwrap();
    let reader = tokio::spawn(async move {
        let mut out = Vec::new();
        dst_r.read_to_end(&mut out).await.unwrap();
        out
    });
    drop(src_w);
    // The source's close (this test has no return path, so no SHUT: the session would
    // hold it); the pump ends once its input is closed and its queue written.
    match reports.recv().await.unwrap() {
        PumpReport::SourceLost { .. } => {}
        other => panic!("{other:?}"),
    }
    assert!(relay.with(|s| s.ended()), "the whole stream was decoded");
    drop(feed);
    pump.await.unwrap().unwrap();
    let out = reader.await.unwrap();
    let (sent, got) = (pages_of(&main), pages_of(&out));
    let mut a = sent.clone();
    let mut b = got.clone();
    a.sort();
    b.sort();
    assert_eq!(a, b, "the same pages with the same content, each once");
    assert_ne!(sent, got, "the order changed");
    let moved = relay.with(|s| s.outbox_figures().data_first_pages);
    assert!(moved > 0, "data pages overtook zero pages");
}

#[tokio::test]
async fn main_stream_is_forwarded_byte_for_byte_and_requests_for_delivered_pages_are_dropped() {
    let main = capture("main.fwd.gz");
    let rp = capture("return-path.rp.gz");
    let (relay, mut reports) = relay();
    // The return path: installed towards a source pipe, fed from a destination pipe, run
    // once the stream reached the destination and before the source closes.
    let (s_w, mut s_r) = tokio::io::duplex(4096);
    relay.source.install(1, Box::new(s_w)).await;
    let r2 = relay.clone();
    let out = through_main_pump(&relay, &mut reports, main.clone(), async move {
        let (mut d_w, d_r) = tokio::io::duplex(4096);
        let (feed, feeds) = mpsc::channel(1);
        let rp_pump = tokio::spawn(return_path_pump(r2.clone(), feeds));
        feed.send(Box::new(d_r)).await.unwrap();
        d_w.write_all(&rp).await.unwrap();
        drop(d_w);
        drop(feed);
        rp_pump.await.unwrap().unwrap();
    })
    .await;
    assert_eq!(out, main);
    assert!(relay.with(|s| s.ended()));
    relay.source.clear().await;
    let mut to_src = Vec::new();
    s_r.read_to_end(&mut to_src).await.unwrap();

    let mut dec = RpDecoder::new();
    let mut names = Vec::new();
    let mut pos = 0;
    while let Step::Event { len, event, .. } = dec.next(&to_src[pos..]).unwrap() {
        pos += len;
        names.push(match event {
            RpMessage::Pong(v) => format!("PONG {v}"),
            other => other.name().to_string(),
        });
    }
    assert_eq!(names, ["PONG 1", "PONG 2", "PONG 4", "PONG 3", "SHUT"]);
    let r = relay.with(|s| s.tracker().unwrap().request_figures());
    assert_eq!(
        (r.messages, r.already_delivered_pages, r.forwarded_pages),
        (1, 1, 0)
    );
}

/// A precopy page and the discard that drops it again, in one read: the discard wins, so
/// the destination's later request for that page is forwarded, not dropped as delivered.
#[tokio::test]
async fn a_discard_after_a_page_in_the_same_read_leaves_the_page_missing() {
    use postcopy_sidecar::wire::compose::{RamSections, put_discards, put_opening, put_page};
    let mut stream = Vec::new();
    put_opening(&mut stream, b"pc", 2, &[(b"m", 1 << 20)]);
    let ram = RamSections {
        section_id: 2,
        footers: true,
    };
    ram.open_part(&mut stream);
    put_page(&mut stream, Some(b"m"), 0x3000, &[7u8; 4096]);
    put_page(&mut stream, None, 0x4000, &[8u8; 4096]);
    ram.close(&mut stream);
    put_discards(&mut stream, b"m", &[(0x3000, 0x1000)]);
    stream.push(0x00); // EOF

    let (relay, mut reports) = relay();
    let out = through_main_pump(&relay, &mut reports, stream.clone(), async {}).await;
    assert_eq!(out, stream, "forwarded unchanged");

    let mut rp = Vec::new();
    for start in [0x3000u64, 0x4000] {
        RpMessage::ReqPagesId {
            start,
            len: 4096,
            block: b"m",
        }
        .encode(&mut rp);
    }
    let step = relay.with(|s| s.on_destination_rp(&rp, Instant::now()));
    assert!(step.error.is_none());
    let r = relay.with(|s| s.tracker().unwrap().request_figures());
    assert_eq!(
        (r.forwarded_pages, r.already_delivered_pages),
        (1, 1),
        "0x3000 was discarded after delivery, 0x4000 was not"
    );
}

/// With its own preempt connection to the destination, the main pump ends that channel
/// with EOS once the stream ended, and hands the connection over instead of closing it
/// (a 7.2 destination's preempt thread ends only on EOS; a closed socket would break the
/// destination's loader).
#[tokio::test]
async fn an_own_preempt_channel_ends_with_eos_and_is_handed_over_open() {
    let main = capture("main.fwd.gz");
    let (tx, mut reports) = mpsc::unbounded_channel();
    let relay = Arc::new(Relay::new(
        Session::new(
            SessionConfig {
                own_preempt: true,
                // Stream order when nothing is asked for, so main passes unchanged.
                data_first: false,
                ..SessionConfig::default()
            },
            Instant::now(),
        ),
        None,
        tx,
    ));
    relay
        .with(|s| s.source_main_connected(Instant::now()))
        .unwrap();
    let (mut src_w, src_r) = tokio::io::duplex(64 * 1024);
    let (dst_w, mut dst_r) = tokio::io::duplex(64 * 1024);
    let (pre_w, mut pre_r) = tokio::io::duplex(4096);
    let (keep, kept) = tokio::sync::oneshot::channel();
    let (feed, feeds) = mpsc::channel(1);
    let pump = tokio::spawn(main_pump(relay.clone(), feeds));
    feed.send(Feed {
        source: Box::new(src_r),
        epoch: 1,
        destination: Some(Box::new(dst_w)),
        own_preempt: Some(OwnPreempt {
            writer: Box::new(pre_w),
            keep,
        }),
    })
    .await
    .unwrap();
    let len = main.len();
    let stream = main.clone();
    let feeder = tokio::spawn(async move {
        src_w.write_all(&stream).await.unwrap();
        src_w
    });
    let mut out = vec![0u8; len];
    dst_r.read_exact(&mut out).await.unwrap();
    assert!(out == main, "nothing asked for: main unchanged");
    // The destination's return path up to its SHUT, then the source closes.
    let (s_w, _s_r) = tokio::io::duplex(64 * 1024);
    relay.source.install(1, Box::new(s_w)).await;
    let (mut d_w, d_r) = tokio::io::duplex(4096);
    let (rp_feed, rp_feeds) = mpsc::channel(1);
    let rp_pump = tokio::spawn(return_path_pump(relay.clone(), rp_feeds));
    rp_feed.send(Box::new(d_r)).await.unwrap();
    d_w.write_all(&capture("return-path.rp.gz")).await.unwrap();
    drop(d_w);
    drop(rp_feed);
    rp_pump.await.unwrap().unwrap();
    drop(feeder.await.unwrap());
    loop {
        match reports.recv().await.unwrap() {
            PumpReport::SourceLost { channel, cause, .. } => {
                let d = relay.with(|s| s.source_lost(channel, cause, Instant::now()));
                assert_eq!(d, CutDecision::Done);
                break;
            }
            PumpReport::DestinationLost { error: None, .. } => {}
            other => panic!("{other:?}"),
        }
    }
    drop(feed);
    pump.await.unwrap().unwrap();
    let mut eos = [0u8; 8];
    pre_r.read_exact(&mut eos).await.unwrap();
    assert_eq!(u64::from_be_bytes(eos), 0x10, "EOS");
    assert!(relay.with(|s| s.own_preempt_ended()));
    // Handed over, still open: nothing more, and no end of stream yet.
    let _writer = kept.await.expect("the pump handed its preempt writer over");
    let mut more = [0u8; 1];
    let read =
        tokio::time::timeout(std::time::Duration::from_millis(100), pre_r.read(&mut more)).await;
    assert!(read.is_err(), "the preempt connection stays open: {read:?}");
}
