//! Bad input: truncations, bit flips and one test per protocol rule. The decoders must
//! never panic, must name what is wrong with a typed [`ErrorKind`], and must point at the
//! offending field — at the same offset however the input is chunked.

mod common;

use common::*;
use postcopy_sidecar::wire::check::{self, ChannelDecoder};
use postcopy_sidecar::wire::decoder::PACKAGE_TRAILER_LEN;
use postcopy_sidecar::wire::ram::{
    FLAG_COMPRESS_PAGE, FLAG_CONTINUE, FLAG_EOS, FLAG_FULL, FLAG_HOOK, FLAG_MEM_SIZE,
    FLAG_MULTIFD_FLUSH, FLAG_PAGE, FLAG_XBZRLE, FLAG_ZERO,
};
use postcopy_sidecar::wire::{
    Advise, Channel, Command, DecodeError, DecoderOptions, ErrorKind, Event, PreemptDecoder,
    RamRecord, RpDecoder, RpMessage, SectionKind, Step, StreamDecoder,
};

// ---------------------------------------------------------------------------------------
// helpers

/// The error a main stream fails with; fed byte at a time it must fail identically.
fn err(bytes: &[u8]) -> DecodeError {
    err_with(bytes, DecoderOptions::default())
}

fn err_with(bytes: &[u8], options: DecoderOptions) -> DecodeError {
    let e = stream_error(bytes, options.clone());
    same_error_bytewise(|| StreamDecoder::new(options.clone()), bytes, &e);
    e
}

fn same_error_bytewise<D: ChannelDecoder>(make: impl Fn() -> D, bytes: &[u8], e: &DecodeError) {
    let whole = check::feed_whole(make(), bytes);
    assert_eq!(whole.first_error(), Some(e), "feeding in one piece");
    let bytewise = check::feed_bytewise(make(), bytes);
    check::assert_same(&whole, &bytewise, "byte at a time");
}

fn rp_err(bytes: &[u8]) -> DecodeError {
    let e = decode_rp(bytes).1.expect_err("return path must fail");
    same_error_bytewise(RpDecoder::new, bytes, &e);
    e
}

fn preempt_err(bytes: &[u8]) -> DecodeError {
    let layout = check::check_layout();
    let e = decode_preempt(bytes, TPS, layout.clone())
        .1
        .expect_err("preempt channel must fail");
    same_error_bytewise(|| PreemptDecoder::new(TPS, layout.clone()), bytes, &e);
    e
}

/// A command record with an arbitrary code and payload.
fn cmd_bytes(code: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![8];
    v.extend_from_slice(&code.to_be_bytes());
    v.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// A command record whose length field says `len` whatever the payload.
fn cmd_with_len(code: u16, len: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![8];
    v.extend_from_slice(&code.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

fn word(offset: u64, flags: u64) -> [u8; 8] {
    (offset | flags).to_be_bytes()
}

fn counted(s: &[u8]) -> Vec<u8> {
    let mut v = vec![s.len() as u8];
    v.extend_from_slice(s);
    v
}

fn advise() -> Command<'static> {
    Command::PostcopyAdvise(Some(Advise {
        pagesize_summary: TPS,
        target_page_size: TPS,
    }))
}

/// Header, START ram with the standard blocks, then the header of a PART of section 1.
fn in_ram_part() -> StreamBuilder {
    let mut b = StreamBuilder::new();
    b.header().ram_start(1, &std_blocks());
    b.resume_section(SectionKind::Part, 1);
    b
}

fn header() -> StreamBuilder {
    let mut b = StreamBuilder::new();
    b.header();
    b
}

/// Bytes of a builder plus raw tail; returns the bytes and the tail's offset.
fn with_tail(b: &StreamBuilder, tail: &[u8]) -> (Vec<u8>, u64) {
    let mut bytes = b.build().bytes;
    let at = bytes.len() as u64;
    bytes.extend_from_slice(tail);
    (bytes, at)
}

// ---------------------------------------------------------------------------------------
// truncation

/// Event spans of a full decode: `(offset, len)` of every non-empty event, and the byte
/// ranges of PACKAGED blobs.
struct Spans {
    events: Vec<(u64, u64)>,
    packages: Vec<(u64, u64)>,
}

fn spans(bytes: &[u8], options: DecoderOptions) -> Spans {
    let mut dec = StreamDecoder::new(options);
    let mut pos = 0;
    let mut s = Spans {
        events: Vec::new(),
        packages: Vec::new(),
    };
    while let Ok(Step::Event { offset, len, event }) = dec.next(&bytes[pos..]) {
        pos += len;
        if let Event::Command(Command::Packaged { length }) = event {
            s.packages
                .push((pos as u64, pos as u64 + u64::from(length)));
        }
        if len > 0 {
            s.events.push((offset, len as u64));
        }
    }
    assert_eq!(pos, bytes.len());
    s
}

impl Spans {
    /// Start of the event of the full decode that holds byte `at`.
    fn start_of_event_at(&self, at: u64) -> u64 {
        let i = self.events.partition_point(|&(o, _)| o <= at);
        self.events[i - 1].0
    }

    /// The lowest offset a truncation after `n` bytes may be reported at: the start of the
    /// record holding the last byte, or, inside a package, of the record holding the byte
    /// before the 14-byte trailer the decoder holds back until the package is complete.
    fn lowest_report(&self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        let in_package = self.packages.iter().any(|&(a, b)| a < n && n < b);
        let held = if in_package { PACKAGE_TRAILER_LEN } else { 0 };
        self.start_of_event_at((n - 1).saturating_sub(held))
    }
}

fn assert_truncated(e: &DecodeError, n: u64, spans: &Spans, what: &str) {
    assert!(
        matches!(e.kind, ErrorKind::Truncated(_)),
        "{what}: prefix of {n} bytes: {e}"
    );
    assert_eq!(e.channel, Channel::Main);
    let lo = spans.lowest_report(n);
    assert!(
        (lo..=n).contains(&e.offset),
        "{what}: prefix of {n} bytes: truncation reported at {}, expected within {lo}..={n}",
        e.offset
    );
}

#[test]
fn every_prefix_of_synthetic_streams_is_truncated() {
    for (what, b) in [
        ("postcopy", postcopy_stream()),
        ("precopy", precopy_stream()),
    ] {
        let sp = spans(&b.bytes, b.options.clone());
        for n in 0..b.bytes.len() {
            let (_, end) = decode_stream(&b.bytes[..n], b.options.clone());
            let e = end.expect_err("a proper prefix never ends cleanly");
            assert_truncated(&e, n as u64, &sp, what);
        }
    }
}

/// Every prefix of the first 300 KiB of the real capture: the decoder is fed one byte at a
/// time and, at each length, a snapshot of it is asked to judge the end of the stream.
#[test]
fn every_prefix_of_the_capture_head_is_truncated() {
    let main = dev_capture_main();
    let head = &main[..main.len().min(300 << 10)];
    let sp = spans(&main, DecoderOptions::default());
    let mut dec = StreamDecoder::default();
    let mut buf: Vec<u8> = Vec::new();
    let mut start = 0;
    let mut consumed = 0u64;
    for n in 0..=head.len() {
        if n > 0 {
            buf.push(head[n - 1]);
        }
        loop {
            match dec.next(&buf[start..]) {
                Ok(Step::Event { len, .. }) => {
                    start += len;
                    consumed += len as u64;
                }
                Ok(Step::NeedMore) => break,
                Err(e) => panic!("valid prefix failed: {e}"),
            }
        }
        let e = dec
            .clone()
            .finish(&buf[start..])
            .expect_err("a proper prefix never ends cleanly");
        assert_eq!(
            e.offset, consumed,
            "truncation is reported where decoding stopped"
        );
        assert_truncated(&e, n as u64, &sp, "capture");
        if start > 1 << 16 {
            buf.drain(..start);
            start = 0;
        }
    }
}

#[test]
fn truncated_side_channels() {
    let (rp, _) = rp_stream(&rp_all());
    for n in 1..rp.len() {
        let (events, end) = decode_rp(&rp[..n]);
        let consumed: u64 = events.last().map_or(0, |(o, m)| {
            let mut v = Vec::new();
            m.encode(&mut v);
            o + v.len() as u64
        });
        match end {
            Ok(()) => {
                // Prefixes that end between messages are clean.
                assert_eq!(consumed, n as u64);
            }
            Err(e) => {
                assert!(matches!(e.kind, ErrorKind::Truncated(_)), "{e}");
                assert_eq!(e.offset, consumed);
            }
        }
    }
    let (pre, _) = preempt_stream(true);
    for n in 1..pre.len() {
        let (events, end) = decode_preempt(&pre[..n], TPS, check::check_layout());
        if let Err(e) = end {
            assert!(matches!(e.kind, ErrorKind::Truncated(_)), "{e}");
            let consumed = events.last().map_or(0, |(o, r)| {
                let mut v = Vec::new();
                r.encode(&mut v);
                o + v.len() as u64
            });
            assert_eq!(e.offset, consumed);
        }
    }
}

// ---------------------------------------------------------------------------------------
// bit flips

fn flip_all(data: &[u8], channel: Channel, flips: usize, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut v = data.to_vec();
    for _ in 0..flips {
        let bit = rng.range(0, data.len() as u64 * 8 - 1);
        let (byte, mask) = ((bit / 8) as usize, 1u8 << (bit % 8));
        v[byte] ^= mask;
        // No panic, whole == split, events re-encode to their bytes.
        let o = check::roundtrip_check(channel, &v);
        if let Some(e) = o.first_error() {
            assert_eq!(e.channel, channel);
            assert!(e.offset <= v.len() as u64);
        }
        v[byte] ^= mask;
    }
}

#[test]
fn bit_flips_in_synthetic_streams() {
    flip_all(&postcopy_stream().bytes, Channel::Main, 1500, 1);
    flip_all(&precopy_stream().bytes, Channel::Main, 500, 2);
    flip_all(&preempt_stream(true).0, Channel::Preempt, 500, 3);
    flip_all(&rp_stream(&rp_all()).0, Channel::ReturnPath, 1500, 4);
}

#[test]
fn bit_flips_in_the_capture_head() {
    let main = dev_capture_main();
    flip_all(&main[..64 << 10], Channel::Main, 400, 5);
    let rp = load_capture(&repo().join("protocol-spec/captures/dev-10.0-idle-postcopy"))
        .return_path
        .expect("return path");
    flip_all(&rp, Channel::ReturnPath, 400, 6);
}

// ---------------------------------------------------------------------------------------
// one test per rule

#[test]
fn bad_magic_and_version() {
    let e = err(b"QEVN\0\0\0\x03");
    assert!(matches!(e.kind, ErrorKind::BadMagic(0x5145_564e)));
    assert_eq!(e.offset, 0);
    let e = err(b"QEVM\0\0\0\x02");
    assert!(matches!(e.kind, ErrorKind::UnsupportedVersion(2)));
    assert_eq!(e.offset, 4);
}

#[test]
fn vmdescription_of_4_gib_is_streamed_not_buffered() {
    let (mut bytes, at) = with_tail(header().eof(), &[6, 0xff, 0xff, 0xff, 0xff]);
    bytes.extend_from_slice(&[b' '; 1 << 20]);
    // Fed in 4 KiB pieces, the decoder hands the JSON out as it arrives.
    let o = check::feed(StreamDecoder::default(), &bytes, || 4096);
    assert_eq!(o.consumed, bytes.len() as u64);
    let mut dec = StreamDecoder::default();
    let mut pos = 0;
    let mut pieces = 0;
    while let Ok(Step::Event { len, event, .. }) =
        dec.next(&bytes[pos..pos + 100.min(bytes.len() - pos)])
    {
        if len == 0 {
            break;
        }
        pos += len;
        if let Event::VmDescription { length } = event {
            assert_eq!(length, u32::MAX);
        }
        pieces += matches!(event, Event::VmDescriptionData(_)) as usize;
        if pos == bytes.len() {
            break;
        }
    }
    assert!(pieces > 1000, "JSON handed out in pieces ({pieces})");
    let e = dec.finish(&[]).expect_err("JSON is cut short");
    assert!(matches!(e.kind, ErrorKind::Truncated(_)));
    assert_eq!(e.offset, bytes.len() as u64);
    assert_eq!(at, 9);
}

#[test]
fn command_length_mismatches_point_at_the_length_field() {
    for (code, len, payload, name) in [
        (2u16, 3u16, &[1u8, 2, 3][..], "PING"),
        (1, 1, &[0][..], "OPEN_RETURN_PATH"),
        (3, 8, &[0; 8][..], "POSTCOPY_ADVISE"),
        (4, 2, &[0, 0][..], "POSTCOPY_LISTEN"),
        (5, 1, &[0][..], "POSTCOPY_RUN"),
        (7, 2, &[0, 0][..], "PACKAGED"),
        (8, 4, &[0; 4][..], "ENABLE_COLO"),
        (9, 1, &[0][..], "POSTCOPY_RESUME"),
        (10, 3, &[5, b'm', b'm'][..], "RECV_BITMAP"),
        (10, 1, &[0][..], "RECV_BITMAP"),
        (11, 4, &[0; 4][..], "SWITCHOVER_START"),
    ] {
        let (bytes, at) = with_tail(&header(), &cmd_with_len(code, len, payload));
        let e = err(&bytes);
        assert!(
            matches!(e.kind, ErrorKind::BadCommandLength { name: n, len: l, .. } if n == name && l == len),
            "{name}: {e}"
        );
        assert_eq!(e.offset, at + 3, "{name}: offset of the length field");
    }
}

/// Errors raised inside a command's payload point into the payload, at the same offset
/// whatever follows the command in the buffer.
#[test]
fn command_payload_errors_point_into_the_payload() {
    let mut payload = TPS.to_be_bytes().to_vec();
    payload.extend_from_slice(&3000u64.to_be_bytes());
    let (mut bytes, at) = with_tail(&header(), &cmd_bytes(3, &payload));
    bytes.extend_from_slice(&[0xaa; 100]);
    let e = err(&bytes);
    assert!(matches!(
        e.kind,
        ErrorKind::BadCommandPayload {
            name: "POSTCOPY_ADVISE",
            ..
        }
    ));
    assert_eq!(e.offset, at + 5);

    let mut b = header();
    b.ram_start(1, &std_blocks()).cmd(advise());
    let mut discard = vec![1];
    discard.extend(counted(b"m"));
    discard.push(0);
    discard.extend(ranges(&[(0, TPS)]));
    let (mut bytes, at) = with_tail(&b, &cmd_bytes(6, &discard));
    bytes.extend_from_slice(&[0xaa; 100]);
    let e = err(&bytes);
    assert!(matches!(
        e.kind,
        ErrorKind::BadCommandPayload {
            name: "POSTCOPY_RAM_DISCARD",
            ..
        }
    ));
    assert_eq!(e.offset, at + 5, "the version byte");

    let mut discard = vec![0];
    discard.extend(counted(b"m"));
    discard.push(0);
    discard.extend(ranges(&[(0, TPS)]));
    discard.push(0);
    let (mut bytes, at) = with_tail(&b, &cmd_bytes(6, &discard));
    bytes.extend_from_slice(&[0xaa; 100]);
    let e = err(&bytes);
    assert!(matches!(e.kind, ErrorKind::BadCommandPayload { .. }));
    assert_eq!(e.offset, at + 5 + 4, "the ranges");
}

#[test]
fn unknown_section_type_and_misplaced_records() {
    let (bytes, at) = with_tail(&header(), &[0x09]);
    let e = err(&bytes);
    assert!(matches!(e.kind, ErrorKind::UnknownSectionType(0x09)));
    assert_eq!(e.offset, at);

    let (bytes, at) = with_tail(&header(), &[0x05, 1, b'x']);
    let e = err(&bytes);
    assert!(matches!(e.kind, ErrorKind::StraySubsection));
    assert_eq!(e.offset, at);

    let mut b = header();
    b.cmd(Command::Ping(1));
    let (bytes, at) = with_tail(&b, &[0x07, 0, 0, 0, 0]);
    let e = err(&bytes);
    assert!(matches!(e.kind, ErrorKind::MisplacedConfiguration));
    assert_eq!(e.offset, at);

    let mut tail = vec![2];
    tail.extend_from_slice(&5u32.to_be_bytes());
    let (bytes, at) = with_tail(&header(), &tail);
    let e = err(&bytes);
    assert!(matches!(e.kind, ErrorKind::UnknownSectionId(5)));
    assert_eq!(e.offset, at + 1);

    let mut tail = vec![1, 0, 0, 0, 1];
    tail.extend(counted(b"ram"));
    tail.extend_from_slice(&0u32.to_be_bytes());
    tail.extend_from_slice(&3u32.to_be_bytes());
    let (bytes, at) = with_tail(&header(), &tail);
    let e = err(&bytes);
    assert!(matches!(e.kind, ErrorKind::RamVersion(3)));
    assert_eq!(e.offset, at);
}

#[test]
fn bad_configuration() {
    let mut tail = vec![7, 0, 0, 0, 1, b'x', 5];
    tail.extend(counted(b"configuration/bogus"));
    tail.extend_from_slice(&1u32.to_be_bytes());
    let (bytes, at) = with_tail(&header(), &tail);
    let e = err(&bytes);
    assert!(matches!(&e.kind, ErrorKind::UnknownConfigSubsection(n) if n == "configuration/bogus"));
    assert_eq!(e.offset, at + 6);

    let mut tail = vec![7, 0, 0, 0, 1, b'x', 5];
    tail.extend(counted(b"configuration/uuid"));
    tail.extend_from_slice(&2u32.to_be_bytes());
    let (bytes, _) = with_tail(&header(), &tail);
    assert!(matches!(
        err(&bytes).kind,
        ErrorKind::ConfigSubsectionVersion { version: 2, .. }
    ));

    let (bytes, at) = with_tail(&header(), &[7, 0, 0, 1, 1]);
    let e = err(&bytes);
    assert!(matches!(
        e.kind,
        ErrorKind::BadCommandPayload {
            name: "CONFIGURATION",
            ..
        }
    ));
    assert_eq!(e.offset, at + 1);
}

#[test]
fn unknown_command() {
    let (bytes, at) = with_tail(&header(), &cmd_bytes(12, &[]));
    let e = err(&bytes);
    assert!(matches!(e.kind, ErrorKind::UnknownCommand(12)));
    assert_eq!(e.offset, at + 1);
    let (bytes, _) = with_tail(&header(), &cmd_bytes(0, &[]));
    assert!(matches!(err(&bytes).kind, ErrorKind::UnknownCommand(0)));
}

#[test]
fn package_rules() {
    let mut b = header();
    b.cmd(advise());
    let mut tail = cmd_bytes(7, &14u32.to_be_bytes());
    let inner = tail.len();
    tail.extend(cmd_bytes(7, &0u32.to_be_bytes()));
    let (bytes, at) = with_tail(&b, &tail);
    let e = err(&bytes);
    assert!(matches!(e.kind, ErrorKind::NestedPackage));
    assert_eq!(e.offset, at + inner as u64);

    // A record running past the package's end.
    let mut tail = cmd_bytes(7, &3u32.to_be_bytes());
    let inner = tail.len();
    tail.extend(cmd_bytes(2, &[0, 0, 0, 1]));
    let (bytes, at) = with_tail(&b, &tail);
    let e = err(&bytes);
    assert!(matches!(e.kind, ErrorKind::CrossesPackageEnd), "{e}");
    assert_eq!(e.offset, at + inner as u64);

    let mut tail = cmd_bytes(7, &1u32.to_be_bytes());
    let inner = tail.len();
    tail.push(0);
    let (bytes, at) = with_tail(&b, &tail);
    let e = err(&bytes);
    assert!(matches!(e.kind, ErrorKind::EofInPackage));
    assert_eq!(e.offset, at + inner as u64);

    // A stream that ends inside the package.
    let (bytes, at) = with_tail(&b, &cmd_bytes(7, &100u32.to_be_bytes()));
    let e = err(&bytes);
    assert!(matches!(e.kind, ErrorKind::Truncated(_)));
    assert_eq!(e.offset, at + 9);
}

#[test]
fn postcopy_phase_violations() {
    let listen = cmd_bytes(4, &[]);
    let (bytes, at) = with_tail(&header(), &listen);
    let e = err(&bytes);
    assert!(matches!(
        e.kind,
        ErrorKind::PhaseViolation {
            command: "POSTCOPY_LISTEN",
            phase: "none"
        }
    ));
    assert_eq!(e.offset, at);

    let mut b = header();
    b.cmd(advise());
    let (bytes, at) = with_tail(&b, &cmd_bytes(5, &[]));
    assert!(matches!(
        err(&bytes).kind,
        ErrorKind::PhaseViolation {
            command: "POSTCOPY_RUN",
            phase: "advised"
        }
    ));
    assert_eq!(err(&bytes).offset, at);

    let mut a = Vec::new();
    advise().encode(&mut a);
    let (bytes, _) = with_tail(&b, &a);
    assert!(matches!(
        err(&bytes).kind,
        ErrorKind::PhaseViolation {
            command: "POSTCOPY_ADVISE",
            ..
        }
    ));

    let mut b = header();
    b.ram_start(1, &std_blocks())
        .cmd(advise())
        .cmd(Command::PostcopyListen);
    let discard = Command::PostcopyRamDiscard {
        version: 0,
        block: b"m",
        ranges: leak(ranges(&[(0, TPS)])),
    };
    let mut d = Vec::new();
    discard.encode(&mut d);
    let (bytes, at) = with_tail(&b, &d);
    let e = err(&bytes);
    assert!(matches!(
        e.kind,
        ErrorKind::PhaseViolation {
            command: "POSTCOPY_RAM_DISCARD",
            phase: "listening"
        }
    ));
    assert_eq!(e.offset, at);
}

#[test]
fn discard_of_unknown_block_or_past_the_block() {
    let mut b = header();
    b.ram_start(1, &std_blocks()).cmd(advise());
    for (block, r, ok_kind) in [
        (&b"nope"[..], (0, TPS), 0),
        (&b"pc.rom"[..], (0x1f000, 0x2000), 1),
        (&b"pc.rom"[..], (u64::MAX - 10, 0x2000), 1),
    ] {
        let c = Command::PostcopyRamDiscard {
            version: 0,
            block: leak(block.to_vec()),
            ranges: leak(ranges(&[r])),
        };
        let mut d = Vec::new();
        c.encode(&mut d);
        let (bytes, at) = with_tail(&b, &d);
        let e = err(&bytes);
        match ok_kind {
            0 => assert!(matches!(&e.kind, ErrorKind::UnknownRamBlock(n) if n == "nope")),
            _ => assert!(
                matches!(&e.kind, ErrorKind::OffsetOutOfRange { block, length: 0x20000, .. } if block == "pc.rom")
            ),
        }
        assert_eq!(e.offset, at);
    }
}

#[test]
fn page_for_an_unannounced_block() {
    let b = in_ram_part();
    let mut tail = word(0, FLAG_PAGE).to_vec();
    tail.extend(counted(b"nope"));
    let (bytes, at) = with_tail(&b, &tail);
    let e = err(&bytes);
    assert!(matches!(&e.kind, ErrorKind::UnknownRamBlock(n) if n == "nope"));
    assert_eq!(e.offset, at + 8, "the idstr");
}

#[test]
fn page_offset_past_the_block() {
    let b = in_ram_part();
    for flag in [FLAG_PAGE, FLAG_ZERO, FLAG_XBZRLE, FLAG_COMPRESS_PAGE] {
        let mut tail = word(0x20000, flag).to_vec();
        tail.extend(counted(b"pc.rom"));
        let (bytes, at) = with_tail(&b, &tail);
        let e = err(&bytes);
        assert!(
            matches!(&e.kind, ErrorKind::OffsetOutOfRange { block, offset: 0x20000, length: 0x20000 } if block == "pc.rom"),
            "{e}"
        );
        assert_eq!(e.offset, at, "the record header");
    }
}

#[test]
fn continue_without_a_previous_block() {
    let b = in_ram_part();
    let (bytes, at) = with_tail(&b, &word(0x1000, FLAG_PAGE | FLAG_CONTINUE));
    let e = err(&bytes);
    assert!(matches!(e.kind, ErrorKind::ContinueWithoutBlock));
    assert_eq!(e.offset, at);

    let e = preempt_err(&word(0, FLAG_ZERO | FLAG_CONTINUE));
    assert!(matches!(e.kind, ErrorKind::ContinueWithoutBlock));
    assert_eq!((e.channel, e.offset), (Channel::Preempt, 0));
}

#[test]
fn bad_ram_records() {
    let mut b = in_ram_part();
    b.zero(b"m", 0);
    type Case = (Vec<u8>, u64, fn(&ErrorKind) -> bool);
    let cases: Vec<Case> = vec![
        (
            [&word(0x1000, FLAG_ZERO | FLAG_CONTINUE)[..], &[7]].concat(),
            8,
            |k| matches!(k, ErrorKind::ZeroPageFill(7)),
        ),
        (
            [&word(0x1000, FLAG_XBZRLE | FLAG_CONTINUE)[..], &[2, 0, 0]].concat(),
            8,
            |k| matches!(k, ErrorKind::BadXbzrle(_)),
        ),
        (
            [
                &word(0x1000, FLAG_XBZRLE | FLAG_CONTINUE)[..],
                &[1, 0x10, 1],
            ]
            .concat(),
            8,
            |k| matches!(k, ErrorKind::BadXbzrle(_)),
        ),
        (
            [
                &word(0x1000, FLAG_COMPRESS_PAGE | FLAG_CONTINUE)[..],
                &5000u32.to_be_bytes(),
            ]
            .concat(),
            8,
            |k| matches!(k, ErrorKind::CompressedTooLong(5000, _)),
        ),
        (word(0, FLAG_HOOK).to_vec(), 0, |k| {
            matches!(k, ErrorKind::RamHook)
        }),
        (word(0, FLAG_FULL).to_vec(), 0, |k| {
            matches!(k, ErrorKind::UnknownRamFlags(_))
        }),
        (word(0, FLAG_EOS | FLAG_CONTINUE).to_vec(), 0, |k| {
            matches!(k, ErrorKind::UnknownRamFlags(_))
        }),
        (word(0x1000, FLAG_EOS).to_vec(), 0, |k| {
            matches!(k, ErrorKind::UnknownRamFlags(_))
        }),
        (word(0x1000, FLAG_MULTIFD_FLUSH).to_vec(), 0, |k| {
            matches!(k, ErrorKind::UnknownRamFlags(_))
        }),
        (word(0x1000, FLAG_PAGE | FLAG_ZERO).to_vec(), 0, |k| {
            matches!(k, ErrorKind::UnknownRamFlags(_))
        }),
        (word(0x8000, FLAG_MEM_SIZE).to_vec(), 0, |k| {
            matches!(k, ErrorKind::MisplacedMemSize)
        }),
    ];
    for (tail, field, kind) in cases {
        let (bytes, at) = with_tail(&b, &tail);
        let e = err(&bytes);
        assert!(kind(&e.kind), "{tail:02x?}: {e}");
        assert_eq!(e.offset, at + field, "{tail:02x?}: {e}");
    }
}

#[test]
fn block_list_rules() {
    // An entry larger than what the MEM_SIZE total has left.
    let mut b = header();
    b.section(SectionKind::Start, 1, "ram", 0, 4)
        .ram(RamRecord::MemSize { total: 0x1000 });
    let mut tail = counted(b"m");
    tail.extend_from_slice(&0x2000u64.to_be_bytes());
    let (bytes, at) = with_tail(&b, &tail);
    let e = err(&bytes);
    assert!(matches!(e.kind, ErrorKind::BlockListOverrun(_)));
    assert_eq!(e.offset, at);

    let mut tail = counted(b"");
    tail.extend_from_slice(&0x1000u64.to_be_bytes());
    let (bytes, _) = with_tail(&b, &tail);
    assert!(matches!(err(&bytes).kind, ErrorKind::BlockListOverrun(_)));

    // Hugepage RAM without the block page sizes: the bytes decide (a page size the ADVISE
    // summary announces), so the list decodes; one it does not announce is no page size,
    // and what follows does not frame.
    let mut b = header();
    b.cmd(Command::PostcopyAdvise(Some(Advise {
        pagesize_summary: TPS | (2 << 20),
        target_page_size: TPS,
    })))
    .section(SectionKind::Start, 1, "ram", 0, 4)
    .ram(RamRecord::MemSize { total: 4 << 20 });
    let mut tail = counted(b"m");
    tail.extend_from_slice(&(4u64 << 20).to_be_bytes());
    tail.extend_from_slice(&(2u64 << 20).to_be_bytes());
    let (bytes, _) = with_tail(&b, &tail);
    let mut d = StreamDecoder::default();
    let mut at = 0;
    while let Ok(Step::Event { len, .. }) = d.next(&bytes[at..]) {
        at += len;
    }
    assert_eq!(d.layout().blocks().len(), 1, "the block list decoded");
    let mut tail = counted(b"m");
    tail.extend_from_slice(&(4u64 << 20).to_be_bytes());
    tail.extend_from_slice(&(1u64 << 30).to_be_bytes());
    let (bytes, _) = with_tail(&b, &tail);
    // 1 GiB is not announced: no page size, so it is read as the next record's word,
    // whose flags are zero.
    assert_eq!(err(&bytes).kind, ErrorKind::UnknownRamFlags(0));
}

#[test]
fn records_not_allowed_in_postcopy() {
    let mut b = header();
    b.cmd(advise())
        .ram_start(1, &std_blocks())
        .cmd(Command::PostcopyListen)
        .resume_section(SectionKind::Part, 1)
        .zero(b"m", 0);
    let mut x = word(0x1000, FLAG_XBZRLE | FLAG_CONTINUE).to_vec();
    x.extend_from_slice(&[1, 0, 1, 0]);
    let (bytes, at) = with_tail(&b, &x);
    let e = err(&bytes);
    assert!(matches!(e.kind, ErrorKind::NotAllowedInPostcopy("XBZRLE")));
    assert_eq!(e.offset, at);
    let (bytes, at) = with_tail(&b, &word(0, FLAG_MULTIFD_FLUSH));
    let e = err(&bytes);
    assert!(matches!(
        e.kind,
        ErrorKind::NotAllowedInPostcopy("MULTIFD_FLUSH")
    ));
    assert_eq!(e.offset, at);
}

#[test]
fn footer_mismatch() {
    let mut b = header();
    b.ram_start_entries(1, vec![], false);
    let (bytes, at) = with_tail(&b, &[0x7e, 0, 0, 0, 2]);
    let e = err(&bytes);
    assert!(matches!(
        e.kind,
        ErrorKind::FooterMismatch {
            expected: 1,
            found: 2
        }
    ));
    assert_eq!(e.offset, at + 1, "the footer's id");
}

#[test]
fn trailing_data_after_the_end() {
    let mut b = header();
    b.eof();
    let (bytes, at) = with_tail(&b, &[1]);
    let e = err(&bytes);
    assert!(matches!(e.kind, ErrorKind::TrailingData(1)));
    assert_eq!(e.offset, at);

    b.vmdesc(b"{}");
    let (bytes, at) = with_tail(&b, &[0]);
    let e = err(&bytes);
    assert!(matches!(e.kind, ErrorKind::TrailingData(0)));
    assert_eq!(e.offset, at);

    let (mut pre, _) = preempt_stream(true);
    let at = pre.len() as u64;
    pre.push(0x42);
    let e = preempt_err(&pre);
    assert!(matches!(e.kind, ErrorKind::TrailingData(0x42)));
    assert_eq!(e.offset, at);
}

#[test]
fn return_path_rules() {
    let (mut bytes, _) = rp_stream(&[RpMessage::Pong(1)]);
    bytes.extend_from_slice(&[0, 8, 0, 0]);
    let e = rp_err(&bytes);
    assert!(matches!(e.kind, ErrorKind::UnknownRpMessage(8)));
    assert_eq!((e.channel, e.offset), (Channel::ReturnPath, 8));
    assert!(matches!(
        rp_err(&[0, 0, 0, 0]).kind,
        ErrorKind::UnknownRpMessage(0)
    ));

    let e = rp_err(&[0, 2, 2, 1]);
    assert!(matches!(e.kind, ErrorKind::BadRpLength { len: 513, .. }));
    assert_eq!(e.offset, 2, "the length field");

    for (t, len) in [
        (1u16, 3u16),
        (2, 5),
        (3, 13),
        (4, 11),
        (5, 0),
        (6, 0),
        (7, 1),
    ] {
        let mut m = t.to_be_bytes().to_vec();
        m.extend_from_slice(&len.to_be_bytes());
        m.extend(std::iter::repeat_n(1u8, len as usize));
        let e = rp_err(&m);
        assert!(
            matches!(e.kind, ErrorKind::BadRpLength { len: l, .. } if l == len),
            "type {t}: {e}"
        );
        assert_eq!(e.offset, 2);
    }
    // REQ_PAGES_ID whose idstr length disagrees with the message length.
    let mut m = vec![0, 3, 0, 14];
    m.extend_from_slice(&[0; 12]);
    m.extend_from_slice(&[5, b'm']);
    assert!(matches!(rp_err(&m).kind, ErrorKind::BadRpLength { .. }));

    let (mut bytes, _) = rp_stream(&[RpMessage::Pong(1)]);
    RpMessage::ReqPages {
        start: 0,
        len: 4096,
    }
    .encode(&mut bytes);
    let e = rp_err(&bytes);
    assert!(matches!(e.kind, ErrorKind::ReqPagesWithoutBlock));
    assert_eq!(e.offset, 8);
}

#[test]
fn received_bitmap_rules() {
    let (mut bytes, _) = rp_stream(&[
        RpMessage::RecvBitmap { block: b"m" },
        RpMessage::BitmapSize(8),
        RpMessage::BitmapData(&[0xff; 8]),
    ]);
    let at = bytes.len() as u64;
    bytes.extend_from_slice(&0x0123_4567_89ab_cdeeu64.to_be_bytes());
    let e = rp_err(&bytes);
    assert!(matches!(e.kind, ErrorKind::BadRecvBitmap(_)));
    assert_eq!(e.offset, at, "the end mark");

    let (bytes, _) = rp_stream(&[
        RpMessage::RecvBitmap { block: b"m" },
        RpMessage::BitmapSize(12),
    ]);
    let e = rp_err(&bytes);
    assert!(matches!(e.kind, ErrorKind::BadRecvBitmap(_)));
    assert_eq!(e.offset, 6, "the bitmap size");

    let (bytes, _) = rp_stream(&[
        RpMessage::RecvBitmap { block: b"m" },
        RpMessage::BitmapSize(1 << 40),
    ]);
    assert!(matches!(rp_err(&bytes).kind, ErrorKind::BadRecvBitmap(_)));

    // Cut inside the trailer: truncated, not clean.
    let (bytes, _) = rp_stream(&[
        RpMessage::RecvBitmap { block: b"m" },
        RpMessage::BitmapSize(8),
    ]);
    let e = rp_err(&bytes);
    assert!(matches!(e.kind, ErrorKind::Truncated(_)));
    assert_eq!(e.offset, bytes.len() as u64);
}

// ---------------------------------------------------------------------------------------
// the destination's blocks bound a hostile block list (issue: 2^60-byte block aborted the
// sidecar in PageTracker::new)

fn limits(blocks: &[(&[u8], u64)]) -> DecoderOptions {
    DecoderOptions {
        block_limits: Some(
            blocks
                .iter()
                .map(|(n, l)| {
                    (
                        n.to_vec(),
                        postcopy_sidecar::wire::BlockLimit {
                            max_length: *l,
                            page_size: 4096,
                        },
                    )
                })
                .collect(),
        ),
        ..Default::default()
    }
}

fn opening(blocks: &[(&[u8], u64)]) -> Vec<u8> {
    let mut out = Vec::new();
    postcopy_sidecar::wire::compose::put_opening(&mut out, b"pc-q35-10.0", 2, blocks);
    out
}

#[test]
fn a_block_list_larger_than_the_destinations_ram_is_refused_at_its_total() {
    let e = err_with(
        &opening(&[(b"pc.ram", 1 << 60)]),
        limits(&[(b"pc.ram", 1 << 28)]),
    );
    assert!(
        matches!(&e.kind, ErrorKind::BlockTooLarge { block, length, .. } if block == "*" && *length == 1 << 60),
        "{e}"
    );
}

#[test]
fn a_block_longer_than_the_destinations_is_refused() {
    let e = err_with(
        &opening(&[(b"pc.ram", 1 << 29)]),
        limits(&[(b"pc.ram", 1 << 28), (b"other", 1 << 30)]),
    );
    assert!(
        matches!(&e.kind, ErrorKind::BlockTooLarge { block, limit, .. } if block == "pc.ram" && *limit == 1 << 28),
        "{e}"
    );
}

#[test]
fn a_block_the_destination_lacks_is_refused() {
    let e = err_with(
        &opening(&[(b"stranger", 4096)]),
        limits(&[(b"pc.ram", 1 << 28)]),
    );
    assert_eq!(
        e.kind,
        ErrorKind::BlockNotAtDestination("stranger".into()),
        "{e}"
    );
}

#[test]
fn a_block_list_that_fits_the_destination_decodes() {
    let bytes = opening(&[(b"pc.ram", 1 << 28)]);
    let out = check::feed_whole(StreamDecoder::new(limits(&[(b"pc.ram", 1 << 28)])), &bytes);
    // Only the end is missing: the opening itself passed.
    assert!(
        matches!(
            out.first_error().map(|e| &e.kind),
            Some(ErrorKind::Truncated(_))
        ),
        "{:?}",
        out.first_error()
    );
}

#[test]
fn a_repeated_configuration_subsection_is_refused() {
    // header, then CONFIGURATION with target-page-bits twice.
    let mut b = b"QEVM\0\0\0\x03".to_vec();
    b.push(0x07);
    b.extend_from_slice(&4u32.to_be_bytes());
    b.extend_from_slice(b"pc-1");
    for _ in 0..2 {
        b.push(0x05);
        b.extend_from_slice(&counted(b"configuration/target-page-bits"));
        b.extend_from_slice(&1u32.to_be_bytes());
        b.extend_from_slice(&12u32.to_be_bytes());
    }
    b.push(0x08);
    let e = err(&b);
    assert_eq!(
        e.kind,
        ErrorKind::DuplicateConfigSubsection("configuration/target-page-bits".into()),
        "{e}"
    );
}
