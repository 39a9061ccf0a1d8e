//! The return path (protocol-spec/return-path.md): destination → source messages on the
//! main channel's socket, `be16 type | be16 len | payload`, with RECV_BITMAP followed by a
//! bitmap trailer outside its length. Incremental and zero-copy like the stream decoder.

use super::decoder::{Step, to_step};
use super::error::{Channel, DecodeError, ErrorKind, PResult, fail};
use super::primitives::{bytes, counted, put_counted, u16_, u32_, u64_};

/// Open newtype over the message type so unknown values survive into errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RpType(pub u16);

impl RpType {
    /// return-path.md#rp-shut
    pub const SHUT: Self = Self(1);
    /// return-path.md#rp-pong
    pub const PONG: Self = Self(2);
    /// return-path.md#rp-req-pages-id
    pub const REQ_PAGES_ID: Self = Self(3);
    /// return-path.md#rp-req-pages
    pub const REQ_PAGES: Self = Self(4);
    /// return-path.md#rp-recv-bitmap
    pub const RECV_BITMAP: Self = Self(5);
    /// return-path.md#rp-resume-ack
    pub const RESUME_ACK: Self = Self(6);
    /// return-path.md#rp-switchover-ack (QEMU 8.1+)
    pub const SWITCHOVER_ACK: Self = Self(7);

    /// QEMU's name for the message.
    pub fn name(self) -> &'static str {
        match self.0 {
            1 => "SHUT",
            2 => "PONG",
            3 => "REQ_PAGES_ID",
            4 => "REQ_PAGES",
            5 => "RECV_BITMAP",
            6 => "RESUME_ACK",
            7 => "SWITCHOVER_ACK",
            _ => "UNKNOWN",
        }
    }
}

/// return-path.md#rp-limits: the source's receive buffer.
pub const MAX_RP_LEN: u16 = 512;
/// return-path.md#rp-recv-bitmap: the mark that ends a received bitmap.
pub const RECV_BITMAP_ENDING: u64 = 0x0123_4567_89ab_cdef;
/// Largest bitmap accepted: one bit per 4 KiB page of 1 PiB of RAM.
pub const MAX_RECV_BITMAP: u64 = 1 << 35;

/// One return-path item. Bitmap trailers arrive as separate items after `RecvBitmap`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RpMessage<'a> {
    /// Destination is done; 0 = success.
    Shut(u32),
    /// Reply to a PING.
    Pong(u32),
    /// Page request naming its block.
    ReqPagesId {
        /// Byte offset within the block.
        start: u64,
        /// Bytes requested (one host page).
        len: u32,
        /// Block idstr.
        block: &'a [u8],
    },
    /// Page request for the same block as the previous REQ_PAGES_ID.
    ReqPages {
        /// Byte offset within the block.
        start: u64,
        /// Bytes requested (one host page).
        len: u32,
    },
    /// Received-pages bitmap of a block follows (recovery).
    RecvBitmap {
        /// Block idstr.
        block: &'a [u8],
    },
    /// Size of the bitmap that follows a RECV_BITMAP.
    BitmapSize(u64),
    /// A piece of the bitmap (pieces may be split differently with other chunking).
    BitmapData(&'a [u8]),
    /// The bitmap's end mark (checked).
    BitmapEnd,
    /// Reply to POSTCOPY_RESUME.
    ResumeAck(u32),
    /// Destination approves switchover.
    SwitchoverAck,
}

impl RpMessage<'_> {
    /// Name used in summaries (trailer items get their own names).
    pub fn name(&self) -> &'static str {
        match self {
            RpMessage::Shut(_) => "SHUT",
            RpMessage::Pong(_) => "PONG",
            RpMessage::ReqPagesId { .. } => "REQ_PAGES_ID",
            RpMessage::ReqPages { .. } => "REQ_PAGES",
            RpMessage::RecvBitmap { .. } => "RECV_BITMAP",
            RpMessage::BitmapSize(_) => "bitmap-size",
            RpMessage::BitmapData(_) => "bitmap-data",
            RpMessage::BitmapEnd => "bitmap-end",
            RpMessage::ResumeAck(_) => "RESUME_ACK",
            RpMessage::SwitchoverAck => "SWITCHOVER_ACK",
        }
    }

    /// Appends the exact wire form.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let framed = |out: &mut Vec<u8>, t: RpType, payload: &[u8]| {
            out.extend_from_slice(&t.0.to_be_bytes());
            out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
            out.extend_from_slice(payload);
        };
        match self {
            RpMessage::Shut(v) => framed(out, RpType::SHUT, &v.to_be_bytes()),
            RpMessage::Pong(v) => framed(out, RpType::PONG, &v.to_be_bytes()),
            RpMessage::ResumeAck(v) => framed(out, RpType::RESUME_ACK, &v.to_be_bytes()),
            RpMessage::SwitchoverAck => framed(out, RpType::SWITCHOVER_ACK, &[]),
            RpMessage::ReqPages { start, len } => {
                let mut p = start.to_be_bytes().to_vec();
                p.extend_from_slice(&len.to_be_bytes());
                framed(out, RpType::REQ_PAGES, &p);
            }
            RpMessage::ReqPagesId { start, len, block } => {
                let mut p = start.to_be_bytes().to_vec();
                p.extend_from_slice(&len.to_be_bytes());
                put_counted(&mut p, block);
                framed(out, RpType::REQ_PAGES_ID, &p);
            }
            RpMessage::RecvBitmap { block } => {
                let mut p = Vec::new();
                put_counted(&mut p, block);
                framed(out, RpType::RECV_BITMAP, &p);
            }
            RpMessage::BitmapSize(n) => out.extend_from_slice(&n.to_be_bytes()),
            RpMessage::BitmapData(d) => out.extend_from_slice(d),
            RpMessage::BitmapEnd => out.extend_from_slice(&RECV_BITMAP_ENDING.to_be_bytes()),
        }
    }
}

/// Parses one framed return-path message.
pub fn parse_rp_message(input: &[u8]) -> PResult<'_, RpMessage<'_>> {
    let (i, t) = u16_(input)?;
    let (i, len) = u16_(i)?;
    let t = RpType(t);
    let name = t.name();
    if !(1..=7).contains(&t.0) {
        return fail(input, ErrorKind::UnknownRpMessage(t.0));
    }
    if len > MAX_RP_LEN {
        return fail(
            &input[2..],
            ErrorKind::BadRpLength {
                name,
                len,
                rule: "over the 512-byte limit",
            },
        );
    }
    let bad = |rule| fail(&input[2..], ErrorKind::BadRpLength { name, len, rule });
    let (rest, p) = bytes(len as usize)(i)?;
    let msg = match t {
        RpType::SHUT | RpType::PONG | RpType::RESUME_ACK => {
            if len != 4 {
                return bad("expected 4");
            }
            let v = u32_(p)?.1;
            match t {
                RpType::SHUT => RpMessage::Shut(v),
                RpType::PONG => RpMessage::Pong(v),
                _ => RpMessage::ResumeAck(v),
            }
        }
        RpType::SWITCHOVER_ACK => {
            if len != 0 {
                return bad("expected 0");
            }
            RpMessage::SwitchoverAck
        }
        RpType::REQ_PAGES => {
            if len != 12 {
                return bad("expected 12");
            }
            let (q, start) = u64_(p)?;
            let (_, l) = u32_(q)?;
            RpMessage::ReqPages { start, len: l }
        }
        RpType::REQ_PAGES_ID => {
            if len < 14 {
                return bad("expected 13 + idstr length");
            }
            let (q, start) = u64_(p)?;
            let (q, l) = u32_(q)?;
            match counted(q) {
                Ok((&[], block)) => RpMessage::ReqPagesId {
                    start,
                    len: l,
                    block,
                },
                _ => return bad("expected 13 + idstr length"),
            }
        }
        _ => match counted(p) {
            Ok((r, block)) if r.is_empty() && !block.is_empty() => RpMessage::RecvBitmap { block },
            _ => return bad("expected 1 + idstr length"),
        },
    };
    Ok((rest, msg))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RpMode {
    Messages,
    BitmapSize,
    BitmapData { remaining: u64 },
    BitmapEnd,
}

/// Incremental return-path decoder; same calling contract as
/// [`StreamDecoder`](super::decoder::StreamDecoder).
#[derive(Debug)]
pub struct RpDecoder {
    offset: u64,
    mode: RpMode,
    last_block: Option<Vec<u8>>,
    failed: Option<DecodeError>,
}

impl Default for RpDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl RpDecoder {
    /// A decoder at the start of a return path.
    pub fn new() -> Self {
        RpDecoder {
            offset: 0,
            mode: RpMode::Messages,
            last_block: None,
            failed: None,
        }
    }

    /// Absolute offset of the next expected byte.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Block named by the last REQ_PAGES_ID, which a REQ_PAGES refers to.
    pub fn last_block(&self) -> Option<&[u8]> {
        self.last_block.as_deref()
    }

    /// Decodes the next message from `input`, which must start at [`Self::offset`].
    pub fn next<'a>(&mut self, input: &'a [u8]) -> Result<Step<RpMessage<'a>>, DecodeError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let r = match self.mode {
            RpMode::Messages => parse_rp_message(input),
            RpMode::BitmapSize => u64_(input).map(|(r, n)| (r, RpMessage::BitmapSize(n))),
            RpMode::BitmapData { remaining } => {
                if input.is_empty() {
                    Err(nom::Err::Incomplete(nom::Needed::Unknown))
                } else {
                    let n = (input.len() as u64).min(remaining) as usize;
                    Ok((&input[n..], RpMessage::BitmapData(&input[..n])))
                }
            }
            RpMode::BitmapEnd => u64_(input).and_then(|(r, v)| {
                if v == RECV_BITMAP_ENDING {
                    Ok((r, RpMessage::BitmapEnd))
                } else {
                    fail(
                        input,
                        ErrorKind::BadRecvBitmap(format!("end mark {v:#018x}")),
                    )
                }
            }),
        };
        let (mode, last_block) = (&mut self.mode, &mut self.last_block);
        match to_step(r, input, &mut self.offset, |msg| {
            apply_message(mode, last_block, msg)
        }) {
            Ok(step) => Ok(step),
            Err((at, kind)) => Err(self.poison(at, kind)),
        }
    }

    /// Judges the end of the return path: clean only between messages.
    pub fn finish(&mut self, rest: &[u8]) -> Result<(), DecodeError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match self.mode {
            RpMode::Messages if rest.is_empty() => Ok(()),
            RpMode::Messages => {
                Err(self.poison(self.offset, ErrorKind::Truncated("a return-path message")))
            }
            _ => Err(self.poison(self.offset, ErrorKind::Truncated("a received bitmap"))),
        }
    }

    fn poison(&mut self, offset: u64, kind: ErrorKind) -> DecodeError {
        let e = DecodeError {
            channel: Channel::ReturnPath,
            offset,
            kind,
        };
        self.failed = Some(e.clone());
        e
    }
}

/// Updates the decoder's state for one message (the bitmap trailer's framing, the block a
/// later REQ_PAGES refers to), or rejects it.
fn apply_message(
    mode: &mut RpMode,
    last_block: &mut Option<Vec<u8>>,
    msg: &RpMessage<'_>,
) -> Result<(), ErrorKind> {
    match msg {
        RpMessage::ReqPagesId { block, .. } => *last_block = Some(block.to_vec()),
        RpMessage::ReqPages { .. } if last_block.is_none() => {
            return Err(ErrorKind::ReqPagesWithoutBlock);
        }
        RpMessage::RecvBitmap { .. } => *mode = RpMode::BitmapSize,
        RpMessage::BitmapSize(n) => {
            if n % 8 != 0 || *n > MAX_RECV_BITMAP {
                return Err(ErrorKind::BadRecvBitmap(format!(
                    "size {n} is not a multiple of 8 up to {MAX_RECV_BITMAP}"
                )));
            }
            *mode = if *n == 0 {
                RpMode::BitmapEnd
            } else {
                RpMode::BitmapData { remaining: *n }
            };
        }
        RpMessage::BitmapData(d) => {
            if let RpMode::BitmapData { remaining } = *mode {
                let left = remaining - d.len() as u64;
                *mode = if left == 0 {
                    RpMode::BitmapEnd
                } else {
                    RpMode::BitmapData { remaining: left }
                };
            }
        }
        RpMessage::BitmapEnd => *mode = RpMode::Messages,
        _ => {}
    }
    Ok(())
}
