//! Replays the committed fuzz seed corpus (`fuzz/corpus/<target>/`) through the fuzz
//! targets' own check, so `cargo test` exercises it without cargo-fuzz: decoded whole and
//! split in two, and byte at a time, every input gives the same outcome, and its events
//! re-encode to the bytes they cover.
//!
//! `seed_corpus_matches_its_generator` checks that the named seeds are exactly what the
//! captures and synthetic builders produce; with `REGENERATE_FUZZ_SEEDS=1` it rewrites them.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use postcopy_sidecar::wire::check::{self, CHECK_PAGE_SIZE, check_layout, roundtrip_check};
use postcopy_sidecar::wire::multifd::{FLAG_SYNC, MultifdInit, compose as mf};
use postcopy_sidecar::wire::{
    Channel, ErrorKind, MultifdDecoder, PreemptDecoder, RpDecoder, StreamDecoder,
};

/// Largest seed file: the fuzzers work on small inputs.
const MAX_SEED: usize = 64 << 10;

const TARGETS: [(&str, Channel); 4] = [
    ("stream_decoder", Channel::Main),
    ("return_path_decoder", Channel::ReturnPath),
    ("preempt_decoder", Channel::Preempt),
    ("multifd_decoder", Channel::Multifd(0)),
];

fn corpus_dir(target: &str) -> PathBuf {
    repo().join("fuzz/corpus").join(target)
}

fn corpus_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| e.expect("entry").path())
        .filter(|p| {
            p.is_file()
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    files.sort();
    files
}

#[test]
fn seed_corpus_replays_cleanly() {
    for (target, channel) in TARGETS {
        let dir = corpus_dir(target);
        let files = corpus_files(&dir);
        assert!(!files.is_empty(), "{} has no seed inputs", dir.display());
        for f in files {
            let data = std::fs::read(&f).expect("seed file");
            let what = f.display().to_string();
            assert!(data.len() <= MAX_SEED, "{what}: over 64 KiB");
            let whole = roundtrip_check(channel, &data);
            let bytewise = match channel {
                Channel::Main => check::feed_bytewise(StreamDecoder::default(), &data),
                Channel::ReturnPath => check::feed_bytewise(RpDecoder::new(), &data),
                Channel::Preempt => check::feed_bytewise(
                    PreemptDecoder::new(CHECK_PAGE_SIZE, check_layout()),
                    &data,
                ),
                Channel::Multifd(_) => check::feed_bytewise(
                    MultifdDecoder::new(CHECK_PAGE_SIZE, check_layout()),
                    &data,
                ),
            };
            check::assert_same(&whole, &bytewise, &format!("{what}: byte at a time"));
        }
    }
}

/// The named seeds decode as they should: whole synthetic streams and captures without
/// error, capture heads only as truncated, `bad-*` with an error. Inputs the fuzzer added
/// (named by their hash) are only replayed.
#[test]
fn named_seeds_decode_as_expected() {
    let mut named = 0;
    for (target, channel) in TARGETS {
        for f in corpus_files(&corpus_dir(target)) {
            let name = f.file_name().unwrap().to_string_lossy().into_owned();
            if !(name.starts_with("synthetic-")
                || name.starts_with("capture-")
                || name.starts_with("bad-"))
            {
                continue;
            }
            named += 1;
            let data = std::fs::read(&f).expect("seed file");
            let o = roundtrip_check(channel, &data);
            let e = o.first_error();
            if name.starts_with("bad-") {
                assert!(e.is_some(), "{name} decodes cleanly");
            } else if name.contains("-head-") {
                assert!(
                    e.is_some_and(|e| matches!(e.kind, ErrorKind::Truncated(_))),
                    "{name}: {e:?}"
                );
            } else {
                assert_eq!(e, None, "{name}");
            }
        }
    }
    assert!(named >= 15, "only {named} named seeds");
}

fn write_seed(target: &str, name: &str, data: &[u8]) {
    assert!(data.len() <= MAX_SEED, "{name}: {} bytes", data.len());
    let dir = corpus_dir(target);
    if std::env::var_os("REGENERATE_FUZZ_SEEDS").is_some() {
        std::fs::create_dir_all(&dir).expect("corpus dir");
        std::fs::write(dir.join(name), data).expect("write seed");
        return;
    }
    let committed = std::fs::read(dir.join(name)).unwrap_or_else(|e| {
        panic!("seed {target}/{name} missing ({e}); regenerate with REGENERATE_FUZZ_SEEDS=1")
    });
    assert!(
        committed == data,
        "seed {target}/{name} differs from its generator; regenerate with REGENERATE_FUZZ_SEEDS=1"
    );
}

#[test]
fn seed_corpus_matches_its_generator() {
    let dev = load_capture(&repo().join("protocol-spec/captures/dev-10.0-idle-postcopy"));
    write_seed(
        "stream_decoder",
        "capture-dev-10.0-idle-postcopy-head-4k",
        &dev.main[..4096],
    );
    write_seed(
        "stream_decoder",
        "capture-dev-10.0-idle-postcopy-head-64k",
        &dev.main[..MAX_SEED],
    );
    for (name, bytes) in corpus_streams() {
        write_seed("stream_decoder", name, &bytes);
    }
    // A bad stream, so the fuzzer starts from an error path too.
    let mut bad = postcopy_stream().bytes;
    bad.truncate(200);
    bad.extend_from_slice(&[8, 0, 12, 0, 0]);
    write_seed("stream_decoder", "bad-unknown-command", &bad);

    let rp = dev.return_path.expect("return path");
    write_seed("return_path_decoder", "capture-dev-10.0-idle-postcopy", &rp);
    write_seed(
        "return_path_decoder",
        "synthetic-every-message",
        &rp_stream(&rp_all()).0,
    );
    let bitmap: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
    let (big, _) = rp_stream(&[
        postcopy_sidecar::wire::RpMessage::RecvBitmap { block: b"pc.bios" },
        postcopy_sidecar::wire::RpMessage::BitmapSize(bitmap.len() as u64),
        postcopy_sidecar::wire::RpMessage::BitmapData(leak(bitmap)),
        postcopy_sidecar::wire::RpMessage::BitmapEnd,
        postcopy_sidecar::wire::RpMessage::Shut(0),
    ]);
    write_seed("return_path_decoder", "synthetic-recv-bitmap-4k", &big);

    write_seed(
        "preempt_decoder",
        "synthetic-continue",
        &preempt_stream(false).0,
    );
    write_seed(
        "preempt_decoder",
        "synthetic-trailing-eos",
        &preempt_stream(true).0,
    );
    let mut p = PreemptBuilder::new(std_blocks());
    for i in 0..64 {
        let block: &[u8] = if i % 9 == 0 { b"pc.rom" } else { b"m" };
        p.zero(block, (i % 32) * 0x1000);
    }
    write_seed("preempt_decoder", "synthetic-zero-pages", &p.build().0);

    // A multifd channel as 10.x sends it: its initial packet, the setup sync, pages and
    // zero pages of two blocks, a sync point; and 7.2's sync packet that carries pages.
    let ps = CHECK_PAGE_SIZE as usize;
    let mut m = Vec::new();
    MultifdInit {
        uuid: [0; 16],
        id: 1,
    }
    .encode(&mut m);
    mf::put_sync(&mut m, ps, 0);
    let pages: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i + 1; ps]).collect();
    let refs: Vec<(u64, &[u8])> = pages
        .iter()
        .enumerate()
        .map(|(i, p)| (i as u64 * 0x1000, p.as_slice()))
        .collect();
    mf::put_ram_packet(&mut m, ps, 0, 1, b"m", &refs, &[0x10000, 0x20000]);
    mf::put_ram_packet(&mut m, ps, 0, 2, b"pc.rom", &refs[..2], &[]);
    mf::put_sync(&mut m, ps, 3);
    write_seed("multifd_decoder", "synthetic-10-pages-and-syncs", &m);
    let mut m72 = Vec::new();
    MultifdInit {
        uuid: [9; 16],
        id: 0,
    }
    .encode(&mut m72);
    mf::put_ram_packet(&mut m72, ps, FLAG_SYNC, 7, b"m", &refs[..3], &[]);
    write_seed("multifd_decoder", "synthetic-7.2-sync-with-pages", &m72);
    let mut bad = m.clone();
    bad[64 + 1344 + 8 + 3] |= 0x02; // zlib on the first packet with pages
    bad.truncate(64 + 1344 * 2 + 5 * ps);
    write_seed("multifd_decoder", "bad-compressed-zlib", &bad);
}
