//! Streaming nom primitives shared by every record parser: big-endian integers and QEMU's
//! counted strings (protocol-spec/README.md, "Conventions"). Streaming means a short
//! input yields `Incomplete`, which the decoder turns into "need more bytes".

use nom::Parser;
use nom::bytes::streaming::take;
use nom::number::streaming::{be_u8, be_u16, be_u32, be_u64};

use super::error::PResult;

/// One byte.
pub fn u8_(i: &[u8]) -> PResult<'_, u8> {
    be_u8(i)
}

/// Big-endian u16.
pub fn u16_(i: &[u8]) -> PResult<'_, u16> {
    be_u16(i)
}

/// Big-endian u32.
pub fn u32_(i: &[u8]) -> PResult<'_, u32> {
    be_u32(i)
}

/// Big-endian u64.
pub fn u64_(i: &[u8]) -> PResult<'_, u64> {
    be_u64(i)
}

/// `n` raw bytes, borrowed from the input (never copied).
pub fn bytes(n: usize) -> impl Fn(&[u8]) -> PResult<'_, &[u8]> {
    move |i| take(n).parse(i)
}

/// QEMU's counted string: `u8 len` then `len` bytes, no terminator, at most 255 bytes.
pub fn counted(i: &[u8]) -> PResult<'_, &[u8]> {
    let (i, n) = be_u8(i)?;
    take(n as usize).parse(i)
}

/// Appends a counted string. Panics only on a caller bug (strings over 255 bytes are
/// unrepresentable and never produced by the decoder).
pub fn put_counted(out: &mut Vec<u8>, s: &[u8]) {
    let n = u8::try_from(s.len()).expect("counted string over 255 bytes");
    out.push(n);
    out.extend_from_slice(s);
}
