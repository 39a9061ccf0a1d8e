//! `QEMU_VM_COMMAND` records (protocol-spec/forward-stream.md#commands): the control
//! messages of the forward stream, self-delimiting by their `be16` length.

use nom::Parser;

use super::error::{ErrorKind, PResult, fail};
use super::primitives::{bytes, counted, u8_, u16_, u32_, u64_};

/// Open newtype over the command number so unknown values survive into error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CommandCode(pub u16);

impl CommandCode {
    /// forward-stream.md#cmd-open-return-path
    pub const OPEN_RETURN_PATH: Self = Self(1);
    /// forward-stream.md#cmd-ping
    pub const PING: Self = Self(2);
    /// forward-stream.md#cmd-postcopy-advise
    pub const POSTCOPY_ADVISE: Self = Self(3);
    /// forward-stream.md#cmd-postcopy-listen
    pub const POSTCOPY_LISTEN: Self = Self(4);
    /// forward-stream.md#cmd-postcopy-run
    pub const POSTCOPY_RUN: Self = Self(5);
    /// forward-stream.md#cmd-postcopy-ram-discard
    pub const POSTCOPY_RAM_DISCARD: Self = Self(6);
    /// forward-stream.md#cmd-packaged
    pub const PACKAGED: Self = Self(7);
    /// forward-stream.md#cmd-enable-colo
    pub const ENABLE_COLO: Self = Self(8);
    /// forward-stream.md#cmd-postcopy-resume
    pub const POSTCOPY_RESUME: Self = Self(9);
    /// forward-stream.md#cmd-recv-bitmap
    pub const RECV_BITMAP: Self = Self(10);
    /// forward-stream.md#cmd-switchover-start (QEMU 10.0+, machine types ≥ 10.0)
    pub const SWITCHOVER_START: Self = Self(11);

    /// QEMU's name for the command, as used in summaries.
    pub fn name(self) -> &'static str {
        match self.0 {
            1 => "OPEN_RETURN_PATH",
            2 => "PING",
            3 => "POSTCOPY_ADVISE",
            4 => "POSTCOPY_LISTEN",
            5 => "POSTCOPY_RUN",
            6 => "POSTCOPY_RAM_DISCARD",
            7 => "PACKAGED",
            8 => "ENABLE_COLO",
            9 => "POSTCOPY_RESUME",
            10 => "RECV_BITMAP",
            11 => "SWITCHOVER_START",
            _ => "UNKNOWN",
        }
    }
}

/// Section-type byte that introduces a command (forward-stream.md#section-types).
pub const SECTION_COMMAND: u8 = 0x08;
/// Discard ranges per command: QEMU packs at most 12 (forward-stream.md#cmd-postcopy-ram-discard).
pub const MAX_DISCARD_RANGES: usize = 12;
/// Longest POSTCOPY_RAM_DISCARD payload: version, name length, 255-byte name, NUL, 12 ranges.
pub const MAX_DISCARD_LEN: u16 = 3 + 255 + 16 * MAX_DISCARD_RANGES as u16;

/// The two page sizes announced by POSTCOPY_ADVISE (forward-stream.md#cmd-postcopy-advise).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Advise {
    /// Bitwise OR of every RAM block's page size on the source.
    pub pagesize_summary: u64,
    /// The target page size (4096 on x86).
    pub target_page_size: u64,
}

/// A decoded command and its payload, borrowing from the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command<'a> {
    /// Destination opens its return path on the main channel's socket.
    OpenReturnPath,
    /// Asks for a PONG with the same value on the return path.
    Ping(u32),
    /// Announces postcopy; `None` for dirty-bitmaps-only postcopy (empty payload).
    PostcopyAdvise(Option<Advise>),
    /// Destination starts listening for pages with userfaultfd (first command in the package).
    PostcopyListen,
    /// Destination starts the VM (last command in the package).
    PostcopyRun,
    /// Pages the destination must drop before postcopy starts.
    PostcopyRamDiscard {
        /// Format version, always 0.
        version: u8,
        /// RAM block idstr.
        block: &'a [u8],
        /// `(start, length)` byte ranges within the block, big-endian pairs on the wire.
        ranges: &'a [u8],
    },
    /// A length-prefixed nested stream follows (the device-state package).
    Packaged {
        /// Bytes of the package, which follow the command outside its length.
        length: u32,
    },
    /// Enables the COLO RAM cache.
    EnableColo,
    /// Resumes a paused postcopy migration.
    PostcopyResume,
    /// Asks the destination for the received-pages bitmap of a block (recovery).
    RecvBitmap {
        /// RAM block idstr.
        block: &'a [u8],
    },
    /// Switchover begins (QEMU 10.0+).
    SwitchoverStart,
}

impl Command<'_> {
    /// The command's wire number.
    pub fn code(&self) -> CommandCode {
        match self {
            Command::OpenReturnPath => CommandCode::OPEN_RETURN_PATH,
            Command::Ping(_) => CommandCode::PING,
            Command::PostcopyAdvise(_) => CommandCode::POSTCOPY_ADVISE,
            Command::PostcopyListen => CommandCode::POSTCOPY_LISTEN,
            Command::PostcopyRun => CommandCode::POSTCOPY_RUN,
            Command::PostcopyRamDiscard { .. } => CommandCode::POSTCOPY_RAM_DISCARD,
            Command::Packaged { .. } => CommandCode::PACKAGED,
            Command::EnableColo => CommandCode::ENABLE_COLO,
            Command::PostcopyResume => CommandCode::POSTCOPY_RESUME,
            Command::RecvBitmap { .. } => CommandCode::RECV_BITMAP,
            Command::SwitchoverStart => CommandCode::SWITCHOVER_START,
        }
    }

    /// QEMU's name for the command.
    pub fn name(&self) -> &'static str {
        self.code().name()
    }

    /// Iterates the discard ranges of a POSTCOPY_RAM_DISCARD (empty for other commands).
    pub fn discard_ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let raw: &[u8] = match self {
            Command::PostcopyRamDiscard { ranges, .. } => ranges,
            _ => &[],
        };
        raw.chunks_exact(16).map(|c| {
            let start = u64::from_be_bytes(c[..8].try_into().expect("8 bytes"));
            let len = u64::from_be_bytes(c[8..].try_into().expect("8 bytes"));
            (start, len)
        })
    }

    /// Appends the whole record (`0x08 | be16 cmd | be16 len | payload`).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut payload = Vec::new();
        match self {
            Command::Ping(v) => payload.extend_from_slice(&v.to_be_bytes()),
            Command::PostcopyAdvise(Some(a)) => {
                payload.extend_from_slice(&a.pagesize_summary.to_be_bytes());
                payload.extend_from_slice(&a.target_page_size.to_be_bytes());
            }
            Command::PostcopyRamDiscard {
                version,
                block,
                ranges,
            } => {
                payload.push(*version);
                super::primitives::put_counted(&mut payload, block);
                payload.push(0);
                payload.extend_from_slice(ranges);
            }
            Command::Packaged { length } => payload.extend_from_slice(&length.to_be_bytes()),
            Command::RecvBitmap { block } => super::primitives::put_counted(&mut payload, block),
            _ => {}
        }
        out.push(SECTION_COMMAND);
        out.extend_from_slice(&self.code().0.to_be_bytes());
        let len = u16::try_from(payload.len()).expect("command payload fits be16");
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&payload);
    }
}

/// The length every QEMU writes for fixed-size commands (forward-stream.md#commands).
fn fixed_length(code: CommandCode) -> Option<u16> {
    match code {
        CommandCode::PING | CommandCode::PACKAGED => Some(4),
        CommandCode::OPEN_RETURN_PATH
        | CommandCode::POSTCOPY_LISTEN
        | CommandCode::POSTCOPY_RUN
        | CommandCode::ENABLE_COLO
        | CommandCode::POSTCOPY_RESUME
        | CommandCode::SWITCHOVER_START => Some(0),
        _ => None,
    }
}

fn fixed_len<'a>(i: &'a [u8], name: &'static str, len: u16, want: u16) -> PResult<'a, ()> {
    if len != want {
        let rule = match want {
            0 => "expected 0",
            4 => "expected 4",
            _ => "expected a fixed length",
        };
        return fail(i, ErrorKind::BadCommandLength { name, len, rule });
    }
    Ok((i, ()))
}

/// Parses a command record, starting at its `0x08` byte.
pub fn parse_command(input: &[u8]) -> PResult<'_, Command<'_>> {
    let (i, _) = u8_(input)?;
    let (i, code) = u16_(i)?;
    let (i, len) = u16_(i)?;
    let code = CommandCode(code);
    let name = code.name();
    // Length errors point at the length field (after the type byte and the command number).
    let len_field = &input[3..];
    // Reject an impossible length before waiting for that many payload bytes.
    if let Some(want) = fixed_length(code) {
        fixed_len(len_field, name, len, want)?;
    } else if code.0 == 0 || code.0 > CommandCode::SWITCHOVER_START.0 {
        return fail(&input[1..], ErrorKind::UnknownCommand(code.0));
    } else {
        let (max, rule) = match code {
            CommandCode::POSTCOPY_ADVISE => (16, "expected 0 or 16"),
            CommandCode::POSTCOPY_RAM_DISCARD => {
                (MAX_DISCARD_LEN, "over 3 + 255 + 12 ranges of 16")
            }
            _ => (256, "must be 1 + idstr length"),
        };
        if len > max {
            return fail(len_field, ErrorKind::BadCommandLength { name, len, rule });
        }
    }
    let (rest, payload) = bytes(len as usize)(i)?;
    let cmd = match code {
        CommandCode::OPEN_RETURN_PATH => Command::OpenReturnPath,
        CommandCode::PING => Command::Ping(u32_(payload)?.1),
        CommandCode::POSTCOPY_ADVISE => match len {
            0 => Command::PostcopyAdvise(None),
            16 => {
                let (p, pagesize_summary) = u64_(payload)?;
                let (_, target_page_size) = u64_(p)?;
                if !target_page_size.is_power_of_two()
                    || !(1024..=65536).contains(&target_page_size)
                {
                    return fail(
                        payload,
                        ErrorKind::BadCommandPayload {
                            name,
                            what: format!(
                                "target page size {target_page_size} is not a power of two in 1 KiB..64 KiB"
                            ),
                        },
                    );
                }
                Command::PostcopyAdvise(Some(Advise {
                    pagesize_summary,
                    target_page_size,
                }))
            }
            _ => {
                return fail(
                    len_field,
                    ErrorKind::BadCommandLength {
                        name,
                        len,
                        rule: "expected 0 or 16",
                    },
                );
            }
        },
        CommandCode::POSTCOPY_LISTEN => Command::PostcopyListen,
        CommandCode::POSTCOPY_RUN => Command::PostcopyRun,
        CommandCode::POSTCOPY_RAM_DISCARD => parse_discard(payload)?.1,
        CommandCode::PACKAGED => Command::Packaged {
            length: u32_(payload)?.1,
        },
        CommandCode::ENABLE_COLO => Command::EnableColo,
        CommandCode::POSTCOPY_RESUME => Command::PostcopyResume,
        CommandCode::RECV_BITMAP => {
            let (p, block) = match counted(payload) {
                Ok(v) => v,
                Err(_) => {
                    return fail(
                        len_field,
                        ErrorKind::BadCommandLength {
                            name,
                            len,
                            rule: "must be 1 + idstr length",
                        },
                    );
                }
            };
            if !p.is_empty() || block.is_empty() {
                return fail(
                    len_field,
                    ErrorKind::BadCommandLength {
                        name,
                        len,
                        rule: "must be 1 + idstr length",
                    },
                );
            }
            Command::RecvBitmap { block }
        }
        CommandCode::SWITCHOVER_START => Command::SwitchoverStart,
        other => return fail(&input[1..], ErrorKind::UnknownCommand(other.0)),
    };
    Ok((rest, cmd))
}

fn parse_discard(payload: &[u8]) -> PResult<'_, Command<'_>> {
    let name = "POSTCOPY_RAM_DISCARD";
    let bad = |what: String| ErrorKind::BadCommandPayload { name, what };
    let (p, version) = u8_(payload).or_else(|_| fail(payload, bad("empty payload".into())))?;
    if version != 0 {
        return fail(payload, bad(format!("version {version}, expected 0")));
    }
    let (p, block) =
        counted(p).or_else(|_| fail(p, bad("block name runs past the payload".into())))?;
    let (p, nul) = u8_(p).or_else(|_| fail(p, bad("missing name terminator".into())))?;
    if nul != 0 {
        return fail(p, bad(format!("name terminator {nul:#04x}, expected 0")));
    }
    if block.is_empty() || p.is_empty() || p.len() % 16 != 0 {
        return fail(
            p,
            bad(format!(
                "{} bytes of ranges is not a non-zero multiple of 16",
                p.len()
            )),
        );
    }
    if p.len() / 16 > MAX_DISCARD_RANGES {
        return fail(
            p,
            bad(format!(
                "{} ranges, QEMU sends at most {MAX_DISCARD_RANGES}",
                p.len() / 16
            )),
        );
    }
    let (rest, ranges) = nom::combinator::rest.parse(p)?;
    Ok((
        rest,
        Command::PostcopyRamDiscard {
            version,
            block,
            ranges,
        },
    ))
}
