//! The relay pumps carry real captured bytes unchanged through in-memory pipes, and the
//! return path drops requests for pages the stream already delivered.

use std::sync::Arc;

use postcopy_sidecar::daemon::relay::{Shared, forward_main, relay_return_path};
use postcopy_sidecar::inspect::read_capture;
use postcopy_sidecar::wire::{RpDecoder, RpMessage, Step, StreamEnd};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn capture(name: &str) -> Vec<u8> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("protocol-spec/captures/dev-10.0-idle-postcopy")
        .join(name);
    read_capture(&p).expect("capture present")
}

#[tokio::test]
async fn main_stream_is_forwarded_byte_for_byte_and_requests_for_delivered_pages_are_dropped() {
    let main = capture("main.fwd.gz");
    let rp = capture("return-path.rp.gz");
    let shared = Arc::new(Shared::default());

    let (mut src_w, src_r) = tokio::io::duplex(64 * 1024);
    let (dst_w, mut dst_r) = tokio::io::duplex(64 * 1024);
    let pump = tokio::spawn(forward_main(src_r, dst_w, shared.clone()));
    let feeder = tokio::spawn(async move {
        // Odd chunk sizes so records straddle reads.
        for c in main.chunks(7919) {
            src_w.write_all(c).await.unwrap();
        }
        drop(src_w);
        main
    });
    let mut out = Vec::new();
    dst_r.read_to_end(&mut out).await.unwrap();
    let main = feeder.await.unwrap();
    assert_eq!(pump.await.unwrap().unwrap(), StreamEnd::Clean);
    assert_eq!(out, main);

    let (mut d_w, d_r) = tokio::io::duplex(4096);
    let (s_w, mut s_r) = tokio::io::duplex(4096);
    let rp_pump = tokio::spawn(relay_return_path(d_r, s_w, shared.clone(), None));
    d_w.write_all(&rp).await.unwrap();
    drop(d_w);
    let mut to_src = Vec::new();
    s_r.read_to_end(&mut to_src).await.unwrap();
    rp_pump.await.unwrap().unwrap();

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
    let t = shared.tracker.lock().unwrap();
    let r = t.as_ref().unwrap().request_figures();
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

    let shared = Arc::new(Shared::default());
    let (mut src_w, src_r) = tokio::io::duplex(1 << 20);
    src_w.write_all(&stream).await.unwrap();
    drop(src_w);
    let (dst_w, mut dst_r) = tokio::io::duplex(1 << 20);
    let pump = tokio::spawn(forward_main(src_r, dst_w, shared.clone()));
    let mut out = Vec::new();
    dst_r.read_to_end(&mut out).await.unwrap();
    let _ = pump.await.unwrap();
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
    let (mut d_w, d_r) = tokio::io::duplex(4096);
    let (s_w, mut s_r) = tokio::io::duplex(4096);
    let rp_pump = tokio::spawn(relay_return_path(d_r, s_w, shared.clone(), None));
    d_w.write_all(&rp).await.unwrap();
    drop(d_w);
    let mut to_src = Vec::new();
    s_r.read_to_end(&mut to_src).await.unwrap();
    rp_pump.await.unwrap().unwrap();
    let t = shared.tracker.lock().unwrap();
    let r = t.as_ref().unwrap().request_figures();
    assert_eq!(
        (r.forwarded_pages, r.already_delivered_pages),
        (1, 1),
        "0x3000 was discarded after delivery, 0x4000 was not"
    );
}
