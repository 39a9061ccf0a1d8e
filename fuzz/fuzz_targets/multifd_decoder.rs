//! Fuzzes a multifd channel (MultifdDecoder, over the block layout of
//! `check::check_layout`): the input is decoded whole and split in two at a point derived
//! from its first byte; both must give the same events, error and end verdict, and every
//! event must re-encode to exactly the bytes it was decoded from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postcopy_sidecar::wire::Channel;
use postcopy_sidecar::wire::check::roundtrip_check;

fuzz_target!(|data: &[u8]| {
    roundtrip_check(Channel::Multifd(0), data);
});
