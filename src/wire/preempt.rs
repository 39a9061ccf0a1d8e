//! The postcopy-preempt channel (protocol-spec/preempt.md#preempt-channel): bare RAM
//! records with no stream header and no sections, carrying the pages the destination asked
//! for. It keeps its own "previous block" for CONTINUE, separate from the main channel's.

use super::decoder::{Step, to_step};
use super::error::{Channel, DecodeError, ErrorKind};
use super::ram::{
    BlockListFraming, RamChannel, RamContext, RamLayout, RamRecord, parse_ram_record,
};

/// Incremental decoder of one preempt channel; same calling contract as
/// [`StreamDecoder`](super::decoder::StreamDecoder).
#[derive(Debug)]
pub struct PreemptDecoder {
    offset: u64,
    tps: u64,
    layout: RamLayout,
    chan: RamChannel,
    ended: bool,
    failed: Option<DecodeError>,
}

impl PreemptDecoder {
    /// A decoder for a preempt channel of a stream with this target page size and block
    /// table (both learnt from the main stream before the channel carries pages).
    pub fn new(target_page_size: u64, layout: RamLayout) -> Self {
        PreemptDecoder {
            offset: 0,
            tps: target_page_size,
            layout,
            chan: RamChannel {
                postcopy_listening: true,
                ..Default::default()
            },
            ended: false,
            failed: None,
        }
    }

    /// Replaces the block table (when the main stream announces it after this was made).
    pub fn set_layout(&mut self, layout: RamLayout) {
        self.layout = layout;
    }

    /// Whether the channel ended with EOS (sources before 8.0 end it so).
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Absolute offset of the next expected byte.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Decodes the next record from `input`, which must start at [`Self::offset`].
    pub fn next<'a>(&mut self, input: &'a [u8]) -> Result<Step<RamRecord<'a>>, DecodeError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.ended {
            return match input.first() {
                None => Ok(Step::NeedMore),
                Some(&b) => Err(self.poison(self.offset, ErrorKind::TrailingData(b))),
            };
        }
        let framing = BlockListFraming::default();
        let r = parse_ram_record(
            input,
            self.tps,
            RamContext::Pages,
            &mut self.chan,
            &mut self.layout,
            &framing,
        );
        // Pre-8.0 sources end the channel with EOS (preempt.md#preempt-channel).
        let ended = &mut self.ended;
        match to_step(r, input, &mut self.offset, |rec| {
            *ended = *rec == RamRecord::Eos;
            Ok(())
        }) {
            Ok(step) => Ok(step),
            Err((at, kind)) => Err(self.poison(at, kind)),
        }
    }

    /// Judges the end of the channel: clean only between records.
    pub fn finish(&mut self, rest: &[u8]) -> Result<(), DecodeError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if rest.is_empty() {
            Ok(())
        } else {
            Err(self.poison(
                self.offset,
                ErrorKind::Truncated("a preempt-channel RAM record"),
            ))
        }
    }

    fn poison(&mut self, offset: u64, kind: ErrorKind) -> DecodeError {
        let e = DecodeError {
            channel: Channel::Preempt,
            offset,
            kind,
        };
        self.failed = Some(e.clone());
        e
    }
}
