//! Sans-IO codec for QEMU's migration protocol, specified in `protocol-spec/`.
//!
//! Pure parse/encode over byte slices: no sockets, no async, no clocks. Four incremental
//! decoders cover the byte streams of a migration:
//! - [`StreamDecoder`]: the main channel (file header, configuration, sections, RAM
//!   records, commands, the device-state package, EOF, VMDESCRIPTION);
//! - [`PreemptDecoder`]: the postcopy-preempt channel (bare RAM records);
//! - [`RpDecoder`]: the return path (PONGs, page requests, received bitmaps, ...);
//! - [`MultifdDecoder`]: a multifd channel (its initial packet, then page packets).
//!
//! Each decoder borrows the caller's buffer and returns one event at a time with its
//! absolute offset and length; every event re-encodes to exactly the bytes it came from.

pub mod check;
pub mod command;
pub mod compose;
pub mod decoder;
pub mod error;
pub mod multifd;
pub mod preempt;
pub mod primitives;
pub mod ram;
pub mod return_path;
pub mod stream;

pub use command::{Advise, Command, CommandCode};
pub use decoder::{
    DecoderOptions, Event, OpaqueTail, PostcopyPhase, ResumeRefusal, Step, StreamDecoder,
    StreamEnd, coalesce,
};
pub use error::{Channel, DecodeError, ErrorKind};
pub use multifd::{MultifdDecoder, MultifdEvent, MultifdInit};
pub use preempt::PreemptDecoder;
pub use ram::{BlockEntry, BlockId, BlockLimit, PageHeader, RamLayout, RamRecord};
pub use return_path::{RpDecoder, RpMessage, RpType};
pub use stream::{Configuration, SectionHeader, SectionKind};
