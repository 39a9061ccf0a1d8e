//! Every real capture under `protocol-spec/captures/` (main stream, preempt channels,
//! return path) must decode completely, re-encode byte for byte, decode identically in
//! random chunks and one byte at a time, and inspect without error. Fails when there is
//! no capture at all.

mod common;

use common::*;
use postcopy_sidecar::inspect;
use postcopy_sidecar::wire::check::{self, ChannelDecoder};
use postcopy_sidecar::wire::{
    MultifdDecoder, PreemptDecoder, RamLayout, RpDecoder, Step, StreamDecoder,
};

/// Byte-at-a-time feeding covers this much of each stream.
const BYTEWISE_LIMIT: usize = 2 << 20;
/// Random chunk sizes are drawn from 1..=CHUNK_MAX.
const CHUNK_MAX: u64 = 9000;

/// Decodes the main stream completely; returns the page size and layout the preempt
/// channels need.
fn decode_main(c: &Capture) -> (u64, RamLayout) {
    let mut dec = StreamDecoder::new(c.options.clone());
    let mut pos = 0;
    let mut out = Vec::with_capacity(c.main.len());
    loop {
        match dec.next(&c.main[pos..]) {
            Ok(Step::Event { offset, len, event }) => {
                assert_eq!(offset, pos as u64, "{}: offsets are contiguous", c.name);
                event.encode(&mut out);
                pos += len;
            }
            Ok(Step::NeedMore) => break,
            Err(e) => panic!("{}: main stream: {e}", c.name),
        }
    }
    assert_eq!(pos, c.main.len(), "{}: main stream not consumed", c.name);
    dec.finish(&c.main[pos..])
        .unwrap_or_else(|e| panic!("{}: main stream end: {e}", c.name));
    assert!(
        out == c.main,
        "{}: re-encoded main stream differs from the capture",
        c.name
    );
    (dec.target_page_size(), dec.layout().clone())
}

/// Decodes a side channel completely and checks its re-encoding.
fn decode_side<D: ChannelDecoder>(dec: D, data: &[u8], what: &str) {
    let o = check::feed_whole(dec, data);
    assert_eq!(o.error, None, "{what}");
    assert_eq!(o.end, Some(Ok("end".to_string())), "{what}");
    assert_eq!(o.consumed, data.len() as u64, "{what}: not consumed");
}

#[test]
fn captures_decode_completely_and_reencode_byte_for_byte() {
    for c in captures() {
        let (tps, layout) = decode_main(&c);
        assert!(!layout.blocks().is_empty(), "{}: no RAM blocks", c.name);
        for (name, data) in &c.preempt {
            decode_side(
                PreemptDecoder::new(tps, layout.clone()),
                data,
                &format!("{}/{name}", c.name),
            );
        }
        if let Some(rp) = &c.return_path {
            decode_side(RpDecoder::new(), rp, &format!("{}/return path", c.name));
        }
    }
}

/// Whole, seeded random chunks of 1..=9000 bytes, and (over the first 2 MiB) one byte at a
/// time: identical outcomes after coalescing.
fn assert_chunkings<D: ChannelDecoder>(make: impl Fn() -> D, data: &[u8], seed: u64, what: &str) {
    let whole = check::feed_whole(make(), data);
    assert_eq!(whole.consumed, data.len() as u64, "{what}: not consumed");
    let mut rng = Rng::new(seed);
    let chunked = check::feed(make(), data, || rng.range(1, CHUNK_MAX) as usize);
    check::assert_same(&whole, &chunked, &format!("{what}: random chunks"));

    let head = &data[..data.len().min(BYTEWISE_LIMIT)];
    let head_whole = if head.len() == data.len() {
        whole
    } else {
        check::feed_whole(make(), head)
    };
    let bytewise = check::feed_bytewise(make(), head);
    check::assert_same(&head_whole, &bytewise, &format!("{what}: byte at a time"));
}

#[test]
fn captures_decode_identically_in_any_chunking() {
    for (i, c) in captures().into_iter().enumerate() {
        let seed = 0xc0ffee + i as u64;
        assert_chunkings(
            || StreamDecoder::new(c.options.clone()),
            &c.main,
            seed,
            &format!("{}/main", c.name),
        );
        let (tps, layout) = decode_main(&c);
        for (name, data) in &c.preempt {
            assert_chunkings(
                || PreemptDecoder::new(tps, layout.clone()),
                data,
                seed,
                &format!("{}/{name}", c.name),
            );
        }
        for (name, data) in &c.multifd {
            assert_chunkings(
                || MultifdDecoder::new(tps, layout.clone()),
                data,
                seed,
                &format!("{}/{name}", c.name),
            );
        }
        if let Some(rp) = &c.return_path {
            assert_chunkings(RpDecoder::new, rp, seed, &format!("{}/return path", c.name));
        }
    }
}

#[test]
fn captures_inspect_without_error() {
    for c in captures() {
        if c.needs_options {
            // `inspect` cannot be told block page sizes; the decode tests cover this one.
            continue;
        }
        let preempt: Vec<Vec<u8>> = c.preempt.iter().map(|(_, d)| d.clone()).collect();
        let multifd: Vec<Vec<u8>> = c.multifd.iter().map(|(_, d)| d.clone()).collect();
        let r = inspect::inspect(&c.main, c.return_path.as_deref(), &preempt, &multifd);
        assert_eq!(r.summary.error, None, "{}: inspect error", c.name);
        assert!(r.summary.end.is_some(), "{}: no end of stream", c.name);
        assert_eq!(r.summary.stream_bytes, c.main.len() as u64);
        assert!(!r.timeline.is_empty());
        assert_eq!(
            r.summary.return_path.is_some(),
            c.return_path.is_some(),
            "{}",
            c.name
        );
    }
}

/// The development capture: the facts the other tests rely on.
#[test]
fn dev_capture_is_a_postcopy_migration() {
    let main = dev_capture_main();
    let r = inspect::inspect(&main, None, &[], &[]);
    let pc = r.summary.postcopy.expect("postcopy milestones");
    assert!(pc.advise.is_some() && pc.listen.is_some() && pc.run.is_some());
    assert!(pc.package.is_some());
    assert_eq!(r.summary.end.as_deref(), Some("eof"));
}

/// The multifd captures (protocol-spec/multifd.md#multifd-runs): four channels, each
/// named by its id, one sync packet per channel per sync point, no full page on main;
/// 10.0 sends zero pages as multifd offsets, 7.2 as ZERO records on main.
#[test]
fn multifd_captures_carry_every_full_page_on_their_channels() {
    for (name, zero_on_multifd) in [("10.0-idle-multifd", true), ("7.2-idle-multifd", false)] {
        let c = load_capture(&repo().join("protocol-spec/captures").join(name));
        let multifd: Vec<Vec<u8>> = c.multifd.iter().map(|(_, d)| d.clone()).collect();
        assert_eq!(multifd.len(), 4, "{name}");
        let without = inspect::inspect(&c.main, None, &[], &[]);
        assert_eq!(without.summary.ram.pages, 0, "{name}: a full page on main");
        let r = inspect::inspect(&c.main, c.return_path.as_deref(), &[], &multifd);
        assert_eq!(r.summary.error, None, "{name}");
        let m = &r.summary.multifd;
        assert_eq!(
            m.iter().map(|x| x.id).collect::<Vec<_>>(),
            [Some(0), Some(1), Some(2), Some(3)],
            "{name}: files named by channel id"
        );
        assert!(
            m.iter().all(|x| x.syncs > 0 && x.syncs == m[0].syncs),
            "{name}: {m:?}"
        );
        assert_eq!(r.summary.ram.multifd_pages, r.summary.ram.pages, "{name}");
        assert!(r.summary.ram.multifd_pages > 0, "{name}");
        let zeros: u64 = m.iter().map(|x| x.zero_pages).sum();
        assert_eq!(zeros > 0, zero_on_multifd, "{name}: {m:?}");
        assert_eq!(
            without.summary.ram.zero_pages > 0,
            !zero_on_multifd,
            "{name}"
        );
    }
}

/// The QEMU 11.1 captures (protocol-spec/versions.md#versions-after-10-0), the 10.2 switch
/// seen on the wire: the package ends PING(3), PING(0x42), POSTCOPY_RUN, and the return
/// path carries PONG(0x42) before SHUT; with multifd and postcopy together, two channels
/// opened beside main.
#[test]
fn captures_of_11_1_show_the_10_2_package_ping() {
    use postcopy_sidecar::wire::{Command, Event, RpMessage};
    for (name, channels) in [("11.1-idle-postcopy", 0), ("11.1-idle-multifd-postcopy", 2)] {
        let c = load_capture(&repo().join("protocol-spec/captures").join(name));
        assert_eq!(c.multifd.len(), channels, "{name}");
        let mut dec = StreamDecoder::new(c.options.clone());
        let (mut pos, mut in_package) = (0, Vec::new());
        while let Ok(Step::Event { len, event, .. }) = dec.next(&c.main[pos..]) {
            pos += len;
            if dec.in_package()
                && let Event::Command(cmd) = &event
            {
                in_package.push(
                    cmd.name().to_string()
                        + &match cmd {
                            Command::Ping(v) => format!("({v:#x})"),
                            _ => String::new(),
                        },
                );
            }
        }
        assert_eq!(
            in_package[in_package.len() - 3..],
            ["PING(0x3)", "PING(0x42)", "POSTCOPY_RUN"],
            "{name}: {in_package:?}"
        );
        let rp = c.return_path.as_ref().expect("return path");
        let mut d = RpDecoder::new();
        let (mut at, mut pongs) = (0, Vec::new());
        while let Ok(Step::Event { len, event, .. }) = d.next(&rp[at..]) {
            at += len;
            if let RpMessage::Pong(v) = event {
                pongs.push(v);
            }
        }
        assert!(pongs.contains(&0x42), "{name}: {pongs:?}");
    }
}
