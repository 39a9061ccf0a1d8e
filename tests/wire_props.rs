//! Property tests: generated sequences of valid RAM records, commands and return-path
//! messages survive encode → decode → encode unchanged (same events, same bytes, in any
//! chunking), and arbitrary or mutated bytes never make a decoder panic or disagree with
//! itself across chunkings.

mod common;

use common::*;
use postcopy_sidecar::wire::check::{self, ChannelDecoder};
use postcopy_sidecar::wire::{
    Advise, Channel, Command, RamRecord, RpDecoder, RpMessage, SectionKind, StreamDecoder, coalesce,
};
use proptest::prelude::*;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        ..ProptestConfig::default()
    }
}

/// Whole decode equals the expected events and re-encodes to the same bytes; random
/// chunks (sizes from `seed`) give the same outcome.
fn assert_roundtrip(b: &Built, seed: u64) {
    let (events, end) = decode_stream(&b.bytes, b.options.clone());
    let end = end.unwrap_or_else(|e| panic!("decode failed: {e}"));
    assert_events_eq(
        &coalesce(&events),
        &coalesce(&b.expected),
        "generated stream",
    );
    assert_eq!(end, b.end);
    let mut out = Vec::new();
    for (_, e) in &events {
        e.encode(&mut out);
    }
    assert!(out == b.bytes, "re-encoding differs");
    assert_chunks(|| StreamDecoder::new(b.options.clone()), &b.bytes, seed);
}

fn assert_chunks<D: ChannelDecoder>(make: impl Fn() -> D, data: &[u8], seed: u64) {
    let whole = check::feed_whole(make(), data);
    let mut rng = common::Rng::new(seed);
    let max = rng.range(1, 5000);
    let chunked = check::feed(make(), data, || rng.range(1, max) as usize);
    check::assert_same(&whole, &chunked, "random chunks");
}

// ---------------------------------------------------------------------------------------
// RAM records

#[derive(Debug, Clone)]
enum Rec {
    Page {
        block: usize,
        page: u64,
        seed: u8,
    },
    Zero {
        block: usize,
        page: u64,
    },
    Xbzrle {
        block: usize,
        page: u64,
        data: Vec<u8>,
    },
    Compressed {
        block: usize,
        page: u64,
        data: Vec<u8>,
    },
    Flush,
}

fn rec(precopy: bool) -> impl Strategy<Value = (Rec, bool)> {
    let block = 0..std_blocks().len();
    let page = any::<u64>();
    let any_rec = prop_oneof![
        4 => (block.clone(), page, any::<u8>())
            .prop_map(|(block, page, seed)| Rec::Page { block, page, seed }),
        6 => (block.clone(), page).prop_map(|(block, page)| Rec::Zero { block, page }),
        2 => (block.clone(), page, proptest::collection::vec(any::<u8>(), 0..300))
            .prop_map(|(block, page, data)| Rec::Xbzrle { block, page, data }),
        2 => (block, page, proptest::collection::vec(any::<u8>(), 0..600))
            .prop_map(|(block, page, data)| Rec::Compressed { block, page, data }),
        1 => Just(Rec::Flush),
    ];
    // `named` forces the idstr even when CONTINUE would do.
    (any_rec, any::<bool>()).prop_filter(
        "postcopy forbids XBZRLE and multifd flushes",
        move |(r, _)| precopy || !matches!(r, Rec::Xbzrle { .. } | Rec::Flush),
    )
}

fn push_rec(b: &mut StreamBuilder, r: &Rec, named: bool) {
    let blocks = std_blocks();
    let addr = |b: &mut StreamBuilder, block: usize, page: u64| {
        let (name, len) = blocks[block];
        let offset = (page % (len / TPS)) * TPS;
        if named {
            b.pages.named(name, offset)
        } else {
            b.pages.header(name, offset)
        }
    };
    match r {
        Rec::Page { block, page, seed } => {
            let header = addr(b, *block, *page);
            b.ram(RamRecord::Page {
                header,
                data: page_bytes(*seed),
            })
        }
        Rec::Zero { block, page } => {
            let header = addr(b, *block, *page);
            b.ram(RamRecord::Zero { header })
        }
        Rec::Xbzrle { block, page, data } => {
            let header = addr(b, *block, *page);
            b.ram(RamRecord::Xbzrle {
                header,
                data: leak(data.clone()),
            })
        }
        Rec::Compressed { block, page, data } => {
            let header = addr(b, *block, *page);
            b.ram(RamRecord::CompressedPage {
                header,
                data: leak(data.clone()),
            })
        }
        Rec::Flush => b.ram(RamRecord::MultifdFlush),
    };
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn ram_records_roundtrip(
        parts in proptest::collection::vec(proptest::collection::vec(rec(true), 0..12), 1..4),
        footers in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let mut b = StreamBuilder::new();
        b.header();
        q35(&mut b);
        b.ram_start_entries(1, std_blocks().iter().map(|&(idstr, used_length)| postcopy_sidecar::wire::BlockEntry {
            idstr, used_length, page_size: None, mr_addr: None, mapped_ram_header: None,
        }).collect(), footers);
        for (i, part) in parts.iter().enumerate() {
            let kind = if i + 1 == parts.len() { SectionKind::End } else { SectionKind::Part };
            b.resume_section(kind, 1);
            for (r, named) in part {
                push_rec(&mut b, r, *named);
            }
            b.eos();
            if footers {
                b.footer(1);
            }
        }
        b.eof();
        assert_roundtrip(&b.build(), seed);
    }
}

// ---------------------------------------------------------------------------------------
// commands

fn neutral_command() -> impl Strategy<Value = Command<'static>> {
    prop_oneof![
        any::<u32>().prop_map(Command::Ping),
        Just(Command::OpenReturnPath),
        Just(Command::SwitchoverStart),
        Just(Command::EnableColo),
        Just(Command::PostcopyResume),
        proptest::collection::vec(any::<u8>(), 1..=255)
            .prop_map(|n| Command::RecvBitmap { block: leak(n) }),
    ]
}

#[derive(Debug, Clone)]
struct Postcopy {
    advise: bool,
    discards: Vec<(usize, Vec<(u64, u64)>)>,
    device: Option<Vec<u8>>,
    ping: u32,
    pages: Vec<(Rec, bool)>,
}

fn postcopy() -> impl Strategy<Value = Postcopy> {
    let discard = (
        0..std_blocks().len(),
        proptest::collection::vec((any::<u64>(), 1u64..64), 1..=12),
    );
    (
        any::<bool>(),
        proptest::collection::vec(discard, 0..4),
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..200)),
        any::<u32>(),
        proptest::collection::vec(rec(false), 0..8),
    )
        .prop_map(|(advise, discards, device, ping, pages)| Postcopy {
            advise,
            discards,
            device,
            ping,
            pages,
        })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn commands_roundtrip(
        before in proptest::collection::vec(neutral_command(), 0..8),
        pc in proptest::option::of(postcopy()),
        after in proptest::collection::vec(neutral_command(), 0..4),
        seed in any::<u64>(),
    ) {
        let blocks = std_blocks();
        let mut b = StreamBuilder::new();
        b.header();
        if let Some(pc) = &pc {
            let advise = pc.advise.then_some(Advise { pagesize_summary: TPS, target_page_size: TPS });
            b.cmd(Command::PostcopyAdvise(advise));
        }
        b.ram_start(1, &blocks);
        for c in before {
            b.cmd(c);
        }
        if let Some(pc) = &pc {
            for (block, rs) in &pc.discards {
                let (name, len) = blocks[*block];
                let pages = len / TPS;
                let r: Vec<(u64, u64)> = rs
                    .iter()
                    .map(|&(start, n)| {
                        let s = start % pages;
                        (s * TPS, n.min(pages - s) * TPS)
                    })
                    .collect();
                b.cmd(Command::PostcopyRamDiscard { version: 0, block: name, ranges: leak(ranges(&r)) });
            }
            b.package_begin().cmd(Command::PostcopyListen);
            if let Some(state) = &pc.device {
                b.full_device(0, "timer", state);
            }
            b.cmd(Command::Ping(pc.ping)).cmd(Command::PostcopyRun).package_end();
            b.resume_section(SectionKind::Part, 1);
            for (r, named) in &pc.pages {
                push_rec(&mut b, r, *named);
            }
            b.eos().footer(1);
        }
        for c in after {
            b.cmd(c);
        }
        b.eof();
        assert_roundtrip(&b.build(), seed);
    }
}

// ---------------------------------------------------------------------------------------
// return path

fn rp_message() -> impl Strategy<Value = Vec<RpMessage<'static>>> {
    let block = proptest::collection::vec(any::<u8>(), 1..=255).prop_map(leak);
    prop_oneof![
        any::<u32>().prop_map(|v| vec![RpMessage::Shut(v)]),
        any::<u32>().prop_map(|v| vec![RpMessage::Pong(v)]),
        any::<u32>().prop_map(|v| vec![RpMessage::ResumeAck(v)]),
        Just(vec![RpMessage::SwitchoverAck]),
        (any::<u64>(), any::<u32>(), block.clone())
            .prop_map(|(start, len, block)| vec![RpMessage::ReqPagesId { start, len, block }]),
        (any::<u64>(), any::<u32>())
            .prop_map(|(start, len)| vec![RpMessage::ReqPages { start, len }]),
        (block, proptest::collection::vec(any::<u64>(), 0..40)).prop_map(|(block, words)| {
            let data: Vec<u8> = words.iter().flat_map(|w| w.to_be_bytes()).collect();
            let mut v = vec![
                RpMessage::RecvBitmap { block },
                RpMessage::BitmapSize(data.len() as u64),
            ];
            if !data.is_empty() {
                v.push(RpMessage::BitmapData(leak(data)));
            }
            v.push(RpMessage::BitmapEnd);
            v
        }),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn return_path_roundtrip(
        groups in proptest::collection::vec(rp_message(), 0..16),
        seed in any::<u64>(),
    ) {
        // REQ_PAGES needs an earlier REQ_PAGES_ID: name a block first where none was.
        let mut msgs = Vec::new();
        let mut named = false;
        for g in groups {
            for m in g {
                if let RpMessage::ReqPages { start, len } = m
                    && !named
                {
                    msgs.push(RpMessage::ReqPagesId { start, len, block: b"m" });
                }
                named |= matches!(m, RpMessage::ReqPagesId { .. } | RpMessage::ReqPages { .. });
                msgs.push(m);
            }
        }
        let (bytes, expected) = rp_stream(&msgs);
        let (events, end) = decode_rp(&bytes);
        prop_assert_eq!(end, Ok(()));
        prop_assert_eq!(&events, &expected);
        let mut out = Vec::new();
        for (_, e) in &events {
            e.encode(&mut out);
        }
        prop_assert_eq!(&out, &bytes);
        assert_chunks(RpDecoder::new, &bytes, seed);
    }
}

// ---------------------------------------------------------------------------------------
// arbitrary and mutated input

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
        for channel in [Channel::Main, Channel::Preempt, Channel::ReturnPath] {
            check::roundtrip_check(channel, &data);
        }
        // Behind a valid file header the main decoder gets further.
        let mut v = b"QEVM\0\0\0\x03".to_vec();
        v.extend_from_slice(&data);
        check::roundtrip_check(Channel::Main, &v);
    }

    #[test]
    fn mutated_streams_never_panic(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
        which in 0..4usize,
    ) {
        let (mut data, channel) = match which {
            0 => (postcopy_stream().bytes, Channel::Main),
            1 => (precopy_stream().bytes, Channel::Main),
            2 => (preempt_stream(true).0, Channel::Preempt),
            _ => (rp_stream(&rp_all()).0, Channel::ReturnPath),
        };
        for (i, byte) in edits {
            let at = i.index(data.len());
            data[at] = byte;
        }
        let n = cut.index(data.len() + 1);
        check::roundtrip_check(channel, &data[..n]);
    }
}
