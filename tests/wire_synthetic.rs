//! Streams built from the codec's own encoders, one per protocol construct: each must
//! decode to exactly the events it was built from, re-encode to identical bytes, and give
//! the same outcome when fed one byte at a time or in random chunks.

mod common;

use common::*;
use postcopy_sidecar::wire::stream::ConfigSubsection;
use postcopy_sidecar::wire::{
    Advise, BlockEntry, Command, DecoderOptions, Event, PostcopyPhase, PreemptDecoder, RamLayout,
    RamRecord, RpDecoder, RpMessage, SectionKind, Step, StreamDecoder, StreamEnd,
};

fn plain_entries(blocks: &[(&'static [u8], u64)]) -> Vec<BlockEntry<'static>> {
    blocks
        .iter()
        .map(|&(idstr, used_length)| BlockEntry {
            idstr,
            used_length,
            page_size: None,
            mr_addr: None,
            mapped_ram_header: None,
        })
        .collect()
}

fn layout_of(blocks: &[(&'static [u8], u64)]) -> RamLayout {
    let mut l = RamLayout::default();
    for (n, len) in blocks {
        l.announce(n, *len);
    }
    l
}

fn assert_preempt(bytes: &[u8], expected: &[(u64, RamRecord<'static>)], layout: RamLayout) {
    let (events, end) = decode_preempt(bytes, TPS, layout.clone());
    end.expect("preempt channel ends cleanly");
    assert_eq!(events, expected);
    let mut out = Vec::new();
    for (_, e) in &events {
        e.encode(&mut out);
    }
    assert_eq!(out, bytes);
    assert_chunking_invariant(
        || PreemptDecoder::new(TPS, layout.clone()),
        bytes,
        7,
        "preempt",
    );
}

fn assert_rp(bytes: &[u8], expected: &[(u64, RpMessage<'static>)]) {
    let (events, end) = decode_rp(bytes);
    end.expect("return path ends cleanly");
    assert_eq!(events, expected);
    let mut out = Vec::new();
    for (_, e) in &events {
        e.encode(&mut out);
    }
    assert_eq!(out, bytes);
    assert_chunking_invariant(RpDecoder::new, bytes, 11, "return path");
}

#[test]
fn precopy_eof_and_vmdescription_after_opaque_device_state() {
    let b = precopy_stream();
    assert!(matches!(b.end, StreamEnd::OpaqueThenEof(_)));
    assert_built(&b, "precopy");
    let (events, _) = decode_stream(&b.bytes, DecoderOptions::default());
    assert!(matches!(events.last(), Some((_, Event::Opaque(_)))));
    assert!(
        events
            .iter()
            .any(|(_, e)| matches!(e, Event::Ram(RamRecord::Xbzrle { .. })))
    );
    assert!(
        events
            .iter()
            .any(|(_, e)| matches!(e, Event::Ram(RamRecord::MultifdFlush)))
    );
}

#[test]
fn precopy_clean_eof_with_vmdescription() {
    let mut b = StreamBuilder::new();
    b.header();
    q35(&mut b);
    b.ram_start(1, &std_blocks());
    b.resume_section(SectionKind::End, 1)
        .page(b"pc.rom", 0x1000, page_bytes(1))
        .eos()
        .footer(1);
    b.eof().vmdesc(br#"{"devices":[]}"#);
    let built = b.build();
    assert_eq!(built.end, StreamEnd::Clean);
    assert_built(&built, "precopy with vmdesc");

    let mut b = StreamBuilder::new();
    b.header().eof().vmdesc(b"");
    assert_built(&b.build(), "empty vmdesc");
}

#[test]
fn postcopy_with_package_and_trailer() {
    let b = postcopy_stream();
    assert_eq!(b.end, StreamEnd::Clean);
    assert_built(&b, "postcopy");

    let mut dec = StreamDecoder::default();
    let mut pos = 0;
    let mut names = Vec::new();
    while let Ok(Step::Event { len, event, .. }) = dec.next(&b.bytes[pos..]) {
        pos += len;
        if let Event::Command(c) = &event {
            names.push(c.name());
        }
        if matches!(event, Event::PackageEnd) {
            assert!(!dec.in_package());
            assert_eq!(dec.phase(), PostcopyPhase::Running);
        }
    }
    assert_eq!(pos, b.bytes.len());
    assert_eq!(dec.phase(), PostcopyPhase::Ended);
    assert_eq!(
        names,
        [
            "OPEN_RETURN_PATH",
            "PING",
            "POSTCOPY_ADVISE",
            "SWITCHOVER_START",
            "POSTCOPY_RAM_DISCARD",
            "POSTCOPY_RAM_DISCARD",
            "PING",
            "PACKAGED",
            "POSTCOPY_LISTEN",
            "PING",
            "POSTCOPY_RUN",
            "PING"
        ]
    );
    assert_eq!(dec.layout().blocks().len(), 6);
}

/// Package trailers: RUN alone, device state that hides the trailer entirely (then
/// nothing after the device state is decoded inside the package), PING + RUN, and the
/// two PINGs of QEMU 10.2+.
#[test]
fn package_trailer_variants() {
    for variant in 0..4 {
        let mut b = StreamBuilder::new();
        b.header()
            .cmd(Command::PostcopyAdvise(Some(Advise {
                pagesize_summary: TPS,
                target_page_size: TPS,
            })))
            .package_begin()
            .cmd(Command::PostcopyListen)
            .full_device(0, "timer", &device_state(0, 3));
        match variant {
            0 => b.cmd(Command::PostcopyRun),
            1 => b.raw(&[1, 2, 3]),
            2 => b.cmd(Command::Ping(7)).cmd(Command::PostcopyRun),
            // QEMU 10.2+: PING(3), PING(0x42), RUN (versions.md#versions-after-10-0).
            _ => b
                .cmd(Command::Ping(3))
                .cmd(Command::Ping(0x42))
                .cmd(Command::PostcopyRun),
        };
        b.package_end().eof();
        let built = b.build();
        if variant == 1 {
            // Without a RUN at the package's end nothing after the device state is framed.
            assert!(
                !built
                    .expected
                    .iter()
                    .any(|(_, e)| matches!(e, Event::Command(Command::PostcopyRun)))
            );
        }
        assert_built(&built, &format!("package trailer variant {variant}"));
    }
}

#[test]
fn xbzrle_and_compressed_pages() {
    let mut b = StreamBuilder::new();
    b.header();
    b.ram_start(1, &std_blocks());
    b.resume_section(SectionKind::Part, 1)
        .page(b"m", 0, page_bytes(1))
        .xbzrle(b"m", 0, leak(vec![0x10, 0x04, 1, 2, 3, 4]))
        .xbzrle(b"pc.bios", 0x2000, leak(vec![]))
        .compressed(b"m", 0x3000, leak((0..100).collect()))
        .compressed(b"m", 0x4000, leak(vec![0x78; 4097]))
        .eos()
        .footer(1);
    b.eof();
    assert_built(&b.build(), "xbzrle and compressed");
}

#[test]
fn multifd_flush_records() {
    let blocks = std_blocks();
    let mut b = StreamBuilder::new();
    b.header().section(SectionKind::Start, 1, "ram", 0, 4);
    b.ram(RamRecord::MemSize {
        total: blocks.iter().map(|b| b.1).sum(),
    });
    for e in plain_entries(&blocks) {
        b.ram(RamRecord::Block(e));
    }
    b.ram(RamRecord::MultifdFlush).eos().footer(1);
    b.resume_section(SectionKind::Part, 1)
        .zero(b"m", 0)
        .ram(RamRecord::MultifdFlush)
        .eos()
        .footer(1);
    b.eof();
    assert_built(&b.build(), "multifd flush");
}

/// A zero MEM_SIZE total announces no blocks (QEMU's loader reads entries while bytes
/// remain), so the next record is a normal one.
#[test]
fn mem_size_zero_total_has_no_entries() {
    let mut b = StreamBuilder::new();
    b.header().ram_start(1, &[]);
    b.eof();
    assert_built(&b.build(), "empty block list");
}

#[test]
fn mem_size_with_hugepage_page_size() {
    let huge = 2 << 20;
    let blocks = std_blocks();
    let mut entries = plain_entries(&blocks);
    entries[0].page_size = Some(huge);
    let mut b = StreamBuilder::new();
    for (n, _) in &blocks {
        let ps = if *n == b"m" { huge } else { TPS };
        b.options.block_page_sizes.insert(n.to_vec(), ps);
    }
    b.header()
        .cmd(Command::PostcopyAdvise(Some(Advise {
            pagesize_summary: TPS | huge,
            target_page_size: TPS,
        })))
        .ram_start_entries(1, entries, true);
    b.resume_section(SectionKind::Part, 1)
        .page(b"m", huge, page_bytes(3))
        .eos()
        .footer(1);
    b.eof();
    let built = b.build();
    assert_built(&built, "hugepage block list");
    let (events, _) = decode_stream(&built.bytes, built.options.clone());
    let sizes: Vec<Option<u64>> = events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::Ram(RamRecord::Block(b)) => Some(b.page_size),
            _ => None,
        })
        .collect();
    assert_eq!(sizes[0], Some(huge));
    assert!(sizes[1..].iter().all(Option::is_none));
}

#[test]
fn mem_size_with_mr_addr_under_x_ignore_shared() {
    let blocks = std_blocks();
    let mut entries = plain_entries(&blocks);
    for (i, e) in entries.iter_mut().enumerate() {
        e.mr_addr = Some(0xfffc_0000 - i as u64 * 0x10_0000);
    }
    let mut b = StreamBuilder::new();
    b.header().config(
        "pc-q35-10.0",
        vec![ConfigSubsection::Capabilities(vec![b"x-ignore-shared"])],
    );
    b.ram_start_entries(1, entries, true).eof();
    assert_built(&b.build(), "x-ignore-shared");
}

#[test]
fn mem_size_with_mapped_ram_header() {
    let blocks = std_blocks();
    let mut entries = plain_entries(&blocks);
    for (i, e) in entries.iter_mut().enumerate() {
        e.mapped_ram_header = Some(leak((0..28).map(|j| (i * 28 + j) as u8).collect()));
    }
    let mut b = StreamBuilder::new();
    b.header().config(
        "pc-q35-10.0",
        vec![ConfigSubsection::Capabilities(vec![
            b"mapped-ram",
            b"x-ignore-shared",
        ])],
    );
    for (i, e) in entries.iter_mut().enumerate() {
        e.mr_addr = Some(i as u64 * 0x1000);
    }
    b.ram_start_entries(1, entries, true).eof();
    assert_built(&b.build(), "mapped-ram");
}

#[test]
fn configuration_subsections_including_uuid() {
    let mut b = StreamBuilder::new();
    b.header().config(
        "virt-10.0",
        vec![
            ConfigSubsection::TargetPageBits(12),
            ConfigSubsection::Capabilities(vec![]),
            ConfigSubsection::Uuid(leak((0..16).collect())),
        ],
    );
    b.ram_start(1, &std_blocks()).eof();
    assert_built(&b.build(), "uuid");
}

#[test]
fn section_footers_present_and_absent() {
    let blocks = std_blocks();
    for footers in [true, false] {
        let mut b = StreamBuilder::new();
        b.header();
        b.ram_start_entries(1, plain_entries(&blocks), footers);
        b.resume_section(SectionKind::Part, 1).zero(b"m", 0).eos();
        if footers {
            b.footer(1);
        }
        b.resume_section(SectionKind::End, 1).eos();
        if footers {
            b.footer(1);
        }
        b.eof();
        assert_built(&b.build(), &format!("footers {footers}"));
    }
}

/// A non-RAM iterable device (START of another idstr) is passed through like FULL state.
#[test]
fn non_ram_iterable_section_is_opaque() {
    let mut b = StreamBuilder::new();
    b.header().ram_start(1, &std_blocks());
    b.section(SectionKind::Start, 2, "dirty-bitmap", 0, 1)
        .raw(&[0, 0, 0, 4, 0x7e, 0, 0, 0, 2]);
    b.eof().vmdesc(b"{}");
    let built = b.build();
    assert!(matches!(built.end, StreamEnd::OpaqueThenEof(_)));
    assert_built(&built, "dirty-bitmap section");
}

#[test]
fn advise_without_page_sizes() {
    let mut b = StreamBuilder::new();
    b.header()
        .cmd(Command::PostcopyAdvise(None))
        .ram_start(1, &std_blocks())
        .eof();
    assert_built(&b.build(), "dirty-bitmaps-only advise");
}

#[test]
fn recovery_and_other_commands() {
    let mut b = StreamBuilder::new();
    b.header();
    b.cmd(Command::RecvBitmap { block: b"m" })
        .cmd(Command::RecvBitmap {
            block: b"/rom@etc/acpi/tables",
        })
        .cmd(Command::PostcopyResume)
        .cmd(Command::Ping(0xffff_ffff))
        .cmd(Command::SwitchoverStart)
        .cmd(Command::EnableColo)
        .cmd(Command::OpenReturnPath)
        .eof();
    assert_built(&b.build(), "recovery commands");
}

#[test]
fn preempt_channel_with_continue() {
    let (bytes, expected) = preempt_stream(false);
    assert!(
        expected
            .iter()
            .any(|(_, r)| r.page_header().is_some_and(|h| h.idstr.is_none()))
    );
    assert_preempt(&bytes, &expected, layout_of(&std_blocks()));
}

#[test]
fn preempt_channel_with_trailing_eos() {
    let (bytes, expected) = preempt_stream(true);
    assert_eq!(expected.last().unwrap().1, RamRecord::Eos);
    assert_preempt(&bytes, &expected, layout_of(&std_blocks()));
}

/// A preempt channel decoded with the layout and page size the main stream announced.
#[test]
fn preempt_channel_with_main_stream_layout() {
    let main = postcopy_stream();
    let mut dec = StreamDecoder::default();
    let mut pos = 0;
    while let Ok(Step::Event { len, .. }) = dec.next(&main.bytes[pos..]) {
        pos += len;
    }
    let (bytes, expected) = preempt_stream(false);
    assert_eq!(dec.target_page_size(), TPS);
    assert_preempt(&bytes, &expected, dec.layout().clone());
}

#[test]
fn return_path_every_message() {
    let msgs = rp_all();
    let (bytes, expected) = rp_stream(&msgs);
    for t in 1..=7u16 {
        assert!(
            expected
                .iter()
                .any(|(o, _)| bytes[*o as usize..*o as usize + 2] == t.to_be_bytes()),
            "message type {t} missing"
        );
    }
    assert_rp(&bytes, &expected);
}

#[test]
fn return_path_large_bitmap_streams_in_pieces() {
    let bitmap: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
    let msgs = vec![
        RpMessage::RecvBitmap { block: b"m" },
        RpMessage::BitmapSize(bitmap.len() as u64),
        RpMessage::BitmapData(leak(bitmap)),
        RpMessage::BitmapEnd,
        RpMessage::Shut(0),
    ];
    let (bytes, expected) = rp_stream(&msgs);
    assert_rp(&bytes, &expected);
}
