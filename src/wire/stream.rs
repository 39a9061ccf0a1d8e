//! Framing records of the forward (main) stream other than commands and RAM records:
//! file header, configuration, section headers and footers, EOF and VMDESCRIPTION
//! (protocol-spec/forward-stream.md).

use super::error::{ErrorKind, PResult, fail, show};
use super::primitives::{bytes, counted, put_counted, u8_, u32_};

/// forward-stream.md#file-header: "QEVM".
pub const FILE_MAGIC: u32 = 0x5145_564d;
/// forward-stream.md#file-header: the only version QEMU 7.2–10.x write.
pub const FILE_VERSION: u32 = 3;

/// forward-stream.md#section-types
pub const SECTION_EOF: u8 = 0x00;
/// forward-stream.md#section-types
pub const SECTION_START: u8 = 0x01;
/// forward-stream.md#section-types
pub const SECTION_PART: u8 = 0x02;
/// forward-stream.md#section-types
pub const SECTION_END: u8 = 0x03;
/// forward-stream.md#section-types
pub const SECTION_FULL: u8 = 0x04;
/// forward-stream.md#subsections
pub const SECTION_SUBSECTION: u8 = 0x05;
/// forward-stream.md#eof-vmdesc
pub const SECTION_VMDESCRIPTION: u8 = 0x06;
/// forward-stream.md#configuration
pub const SECTION_CONFIGURATION: u8 = 0x07;
/// forward-stream.md#section-footer
pub const SECTION_FOOTER: u8 = 0x7e;

/// forward-stream.md#configuration: known subsections.
pub const SUBSECTION_TARGET_PAGE_BITS: &[u8] = b"configuration/target-page-bits";
/// forward-stream.md#configuration
pub const SUBSECTION_CAPABILITIES: &[u8] = b"configuration/capabilities";
/// forward-stream.md#configuration
pub const SUBSECTION_UUID: &[u8] = b"configuration/uuid";
/// Upper bound on the capability count we accept (QEMU has fewer than 32 capabilities).
pub const MAX_CONFIG_CAPABILITIES: u32 = 64;
/// Upper bound on the machine-name length (QEMU's names are a few dozen bytes).
pub const MAX_MACHINE_NAME: u32 = 256;

/// Kind of a section record (forward-stream.md#section-headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SectionKind {
    /// First record of an iterable device (setup).
    Start,
    /// An iteration of an iterable device.
    Part,
    /// Last record of an iterable device.
    End,
    /// The whole state of a non-iterable device.
    Full,
}

impl SectionKind {
    /// Wire byte of this kind.
    pub fn byte(self) -> u8 {
        match self {
            SectionKind::Start => SECTION_START,
            SectionKind::Part => SECTION_PART,
            SectionKind::End => SECTION_END,
            SectionKind::Full => SECTION_FULL,
        }
    }

    /// Lower-case name for summaries.
    pub fn name(self) -> &'static str {
        match self {
            SectionKind::Start => "start",
            SectionKind::Part => "part",
            SectionKind::End => "end",
            SectionKind::Full => "full",
        }
    }
}

/// A section header. START and FULL carry the device identity; PART and END only the id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SectionHeader<'a> {
    /// START / PART / END / FULL.
    pub kind: SectionKind,
    /// Id bound at START/FULL, referenced by PART/END/footer.
    pub section_id: u32,
    /// Device identity (START/FULL only).
    pub ident: Option<SectionIdent<'a>>,
}

/// Device identity in a START/FULL header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SectionIdent<'a> {
    /// Device idstr, e.g. `ram`, `timer`, `cpu`.
    pub idstr: &'a [u8],
    /// Instance of the device.
    pub instance_id: u32,
    /// vmstate version of the device.
    pub version_id: u32,
}

impl SectionHeader<'_> {
    /// Appends the header's exact wire form.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.kind.byte());
        out.extend_from_slice(&self.section_id.to_be_bytes());
        if let Some(id) = &self.ident {
            put_counted(out, id.idstr);
            out.extend_from_slice(&id.instance_id.to_be_bytes());
            out.extend_from_slice(&id.version_id.to_be_bytes());
        }
    }
}

/// Parses a section header starting at its type byte.
pub fn parse_section_header(input: &[u8]) -> PResult<'_, SectionHeader<'_>> {
    let (i, t) = u8_(input)?;
    let kind = match t {
        SECTION_START => SectionKind::Start,
        SECTION_PART => SectionKind::Part,
        SECTION_END => SectionKind::End,
        SECTION_FULL => SectionKind::Full,
        other => return fail(input, ErrorKind::UnknownSectionType(other)),
    };
    let (i, section_id) = u32_(i)?;
    if matches!(kind, SectionKind::Part | SectionKind::End) {
        return Ok((
            i,
            SectionHeader {
                kind,
                section_id,
                ident: None,
            },
        ));
    }
    let (i, idstr) = counted(i)?;
    let (i, instance_id) = u32_(i)?;
    let (i, version_id) = u32_(i)?;
    Ok((
        i,
        SectionHeader {
            kind,
            section_id,
            ident: Some(SectionIdent {
                idstr,
                instance_id,
                version_id,
            }),
        },
    ))
}

/// Parses the 8-byte file header and returns the version.
pub fn parse_file_header(input: &[u8]) -> PResult<'_, u32> {
    let (i, magic) = u32_(input)?;
    if magic != FILE_MAGIC {
        return fail(input, ErrorKind::BadMagic(magic));
    }
    let (i, version) = u32_(i)?;
    if version != FILE_VERSION {
        return fail(&input[4..], ErrorKind::UnsupportedVersion(version));
    }
    Ok((i, version))
}

/// Appends the 8-byte file header.
pub fn encode_file_header(out: &mut Vec<u8>) {
    out.extend_from_slice(&FILE_MAGIC.to_be_bytes());
    out.extend_from_slice(&FILE_VERSION.to_be_bytes());
}

/// The configuration section (forward-stream.md#configuration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Configuration<'a> {
    /// Machine type, e.g. `pc-q35-10.0`.
    pub machine: &'a [u8],
    /// Subsections in wire order.
    pub subsections: Vec<ConfigSubsection<'a>>,
}

/// A configuration subsection we know how to frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSubsection<'a> {
    /// Target page bits (variable-page targets only).
    TargetPageBits(u32),
    /// Validated capabilities that must match on both sides.
    Capabilities(Vec<&'a [u8]>),
    /// The VM's UUID (with `validate-uuid`).
    Uuid(&'a [u8]),
}

impl<'a> Configuration<'a> {
    /// Whether a validated capability (e.g. `x-ignore-shared`) is announced.
    pub fn has_capability(&self, name: &[u8]) -> bool {
        self.subsections.iter().any(|s| match s {
            ConfigSubsection::Capabilities(c) => c.contains(&name),
            _ => false,
        })
    }

    /// Appends the section's exact wire form, including its `0x07` byte.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(SECTION_CONFIGURATION);
        let n = u32::try_from(self.machine.len()).expect("machine name fits be32");
        out.extend_from_slice(&n.to_be_bytes());
        out.extend_from_slice(self.machine);
        for s in &self.subsections {
            out.push(SECTION_SUBSECTION);
            let name = match s {
                ConfigSubsection::TargetPageBits(_) => SUBSECTION_TARGET_PAGE_BITS,
                ConfigSubsection::Capabilities(_) => SUBSECTION_CAPABILITIES,
                ConfigSubsection::Uuid(_) => SUBSECTION_UUID,
            };
            put_counted(out, name);
            out.extend_from_slice(&1u32.to_be_bytes());
            match s {
                ConfigSubsection::TargetPageBits(b) => out.extend_from_slice(&b.to_be_bytes()),
                ConfigSubsection::Capabilities(caps) => {
                    let n = u32::try_from(caps.len()).expect("capability count fits be32");
                    out.extend_from_slice(&n.to_be_bytes());
                    for c in caps {
                        put_counted(out, c);
                    }
                }
                ConfigSubsection::Uuid(u) => out.extend_from_slice(u),
            }
        }
    }
}

/// Parses the configuration section starting at its `0x07` byte. Subsections follow for as
/// long as the next byte is `0x05`, so the parser needs one byte of look-ahead after the
/// section (the next record's type byte) to know it has ended.
pub fn parse_configuration(input: &[u8]) -> PResult<'_, Configuration<'_>> {
    let (i, _) = u8_(input)?;
    let (i2, n) = u32_(i)?;
    if n > MAX_MACHINE_NAME {
        return fail(
            i,
            ErrorKind::BadCommandPayload {
                name: "CONFIGURATION",
                what: format!("machine name length {n} exceeds {MAX_MACHINE_NAME}"),
            },
        );
    }
    let (mut i, machine) = bytes(n as usize)(i2)?;
    let mut subsections = Vec::new();
    loop {
        let (_, next) = u8_(i)?;
        if next != SECTION_SUBSECTION {
            break;
        }
        let (j, _) = u8_(i)?;
        let (j, name) = counted(j)?;
        let (j, version) = u32_(j)?;
        if version != 1 {
            return fail(
                i,
                ErrorKind::ConfigSubsectionVersion {
                    name: show(name),
                    version,
                },
            );
        }
        let (j, sub) = match name {
            SUBSECTION_TARGET_PAGE_BITS => {
                let (j, b) = u32_(j)?;
                (j, ConfigSubsection::TargetPageBits(b))
            }
            SUBSECTION_CAPABILITIES => {
                let (mut j, count) = u32_(j)?;
                if count > MAX_CONFIG_CAPABILITIES {
                    return fail(
                        i,
                        ErrorKind::BadCommandPayload {
                            name: "CONFIGURATION",
                            what: format!("{count} capabilities exceed {MAX_CONFIG_CAPABILITIES}"),
                        },
                    );
                }
                let mut caps = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    let (k, c) = counted(j)?;
                    caps.push(c);
                    j = k;
                }
                (j, ConfigSubsection::Capabilities(caps))
            }
            SUBSECTION_UUID => {
                let (j, u) = bytes(16)(j)?;
                (j, ConfigSubsection::Uuid(u))
            }
            other => return fail(i, ErrorKind::UnknownConfigSubsection(show(other))),
        };
        if subsections
            .iter()
            .any(|s| std::mem::discriminant(s) == std::mem::discriminant(&sub))
        {
            return fail(i, ErrorKind::DuplicateConfigSubsection(show(name)));
        }
        subsections.push(sub);
        i = j;
    }
    Ok((
        i,
        Configuration {
            machine,
            subsections,
        },
    ))
}

/// Parses a section footer (`0x7e be32 id`) starting at its marker byte.
pub fn parse_footer(input: &[u8]) -> PResult<'_, u32> {
    let (i, _) = u8_(input)?;
    u32_(i)
}

/// Appends a section footer.
pub fn encode_footer(section_id: u32, out: &mut Vec<u8>) {
    out.push(SECTION_FOOTER);
    out.extend_from_slice(&section_id.to_be_bytes());
}

/// Parses a VMDESCRIPTION header (`0x06 be32 len`) and returns the JSON length; the JSON
/// itself is streamed as data events, so its size never has to fit in memory.
pub fn parse_vmdescription_header(input: &[u8]) -> PResult<'_, u32> {
    let (i, _) = u8_(input)?;
    u32_(i)
}

/// Appends a VMDESCRIPTION header (the JSON follows as raw bytes).
pub fn encode_vmdescription_header(len: u32, out: &mut Vec<u8>) {
    out.push(SECTION_VMDESCRIPTION);
    out.extend_from_slice(&len.to_be_bytes());
}
