//! Who may become the migration's source, decided before a byte reaches the destination
//! (protocol-spec/admission.md). Pure: the carrier reads the sockets and asks.
//!
//! A fresh main connection is admitted only when its peer address is allowed and its
//! opening (file header, configuration, commands, the `ram` section's block list) decodes
//! and fits the destination's own RAM blocks; only then does the sidecar connect to the
//! destination, replaying the buffered opening. Afterwards only the admitted peer may add
//! the preempt channel or resume after a cut.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::wire::{DecoderOptions, Event, RamRecord, Step, StreamDecoder};

/// Most bytes an opening may take before its block list is complete. QEMU's opening is
/// a few hundred bytes (header, configuration, a few commands, the block list); a peer
/// that sends more without a block list is not a migration source.
pub const MAX_OPENING: usize = 256 * 1024;

/// Addresses or prefixes allowed to connect (`--allow-from`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList(Vec<IpNet>);

impl AllowList {
    /// Parses a comma-separated list of addresses and prefixes (`10.0.0.0/8,192.0.2.7`).
    pub fn parse(s: &str) -> Result<AllowList, String> {
        s.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| {
                p.parse::<IpNet>()
                    .or_else(|_| p.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("{p:?} is neither an address nor a prefix"))
            })
            .collect::<Result<Vec<_>, _>>()
            .and_then(|v| {
                if v.is_empty() {
                    Err("an empty --allow-from would refuse every source".into())
                } else {
                    Ok(AllowList(v))
                }
            })
    }

    /// Whether `ip` is in the list (an IPv4-mapped IPv6 peer counts as its IPv4 address).
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.0.iter().any(|n| n.contains(&ip))
    }
}

/// Where an opening check stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpeningVerdict {
    /// The bytes so far are a valid beginning; read more.
    NeedMore,
    /// The block list is complete and fits the destination: connect and replay.
    Admit,
    /// Not a migration this destination can take; why.
    Refuse(String),
}

/// Decodes a fresh main connection's opening, without forwarding anything, until its
/// `ram` block list is complete and checked against the destination's blocks.
pub struct OpeningCheck {
    dec: StreamDecoder,
    buf: Vec<u8>,
    pos: usize,
    mem_size_seen: bool,
    verdict: OpeningVerdict,
}

impl OpeningCheck {
    /// A check with the destination's limits in `options` (`block_limits`).
    pub fn new(options: DecoderOptions) -> Self {
        OpeningCheck {
            dec: StreamDecoder::new(options),
            buf: Vec::new(),
            pos: 0,
            mem_size_seen: false,
            verdict: OpeningVerdict::NeedMore,
        }
    }

    /// Adds bytes read from the connection and judges them.
    pub fn push(&mut self, bytes: &[u8]) -> OpeningVerdict {
        if self.verdict != OpeningVerdict::NeedMore {
            return self.verdict.clone();
        }
        self.buf.extend_from_slice(bytes);
        self.verdict = self.judge();
        self.verdict.clone()
    }

    fn judge(&mut self) -> OpeningVerdict {
        loop {
            let (len, done) = match self.dec.next(&self.buf[self.pos..]) {
                Err(e) => {
                    return OpeningVerdict::Refuse(format!("its opening does not decode: {e}"));
                }
                Ok(Step::NeedMore) => break,
                Ok(Step::Event { len, event, .. }) => {
                    let done = match event {
                        Event::Ram(RamRecord::MemSize { .. }) => {
                            self.mem_size_seen = true;
                            false
                        }
                        Event::Ram(RamRecord::Block(_)) => false,
                        // The first record after the list: every entry was checked.
                        _ => self.mem_size_seen,
                    };
                    (len, done)
                }
            };
            self.pos += len;
            if done {
                return OpeningVerdict::Admit;
            }
        }
        if self.buf.len() > MAX_OPENING {
            return OpeningVerdict::Refuse(format!(
                "no complete RAM block list in its first {MAX_OPENING} bytes"
            ));
        }
        OpeningVerdict::NeedMore
    }

    /// The bytes read so far, to be replayed to the destination once admitted.
    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }
}

/// A certificate subject: its attributes in certificate order. Names are compared as
/// sets of attribute/value pairs, so an authorisation entry matches whichever order it was
/// written in (QEMU's `tls-authz` identities are RFC 4514 strings, most specific first, as
/// GnuTLS prints them; OpenSSL prints the other way round).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistinguishedName(Vec<(String, String)>);

impl DistinguishedName {
    /// A name from its attributes in certificate order (`C`, `O`, ..., `CN`).
    pub fn from_pairs(pairs: Vec<(String, String)>) -> Self {
        DistinguishedName(
            pairs
                .into_iter()
                .map(|(t, v)| (t.to_ascii_uppercase(), v))
                .collect(),
        )
    }

    /// Parses `CN=client,O=Example\, Inc.,C=GB` (commas inside a value escaped with `\`;
    /// spaces around separators ignored).
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut cur = String::new();
        let mut chars = s.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some(n) => cur.push(n),
                    None => return Err(format!("{s:?} ends with a lone backslash")),
                },
                ',' => parts.push(std::mem::take(&mut cur)),
                c => cur.push(c),
            }
        }
        parts.push(cur);
        let mut pairs = Vec::new();
        for p in parts {
            let (t, v) = p
                .split_once('=')
                .ok_or_else(|| format!("{p:?} in {s:?} is not TYPE=value"))?;
            let (t, v) = (t.trim(), v.trim());
            if t.is_empty() || v.is_empty() {
                return Err(format!("{p:?} in {s:?} has an empty type or value"));
            }
            pairs.push((t.to_string(), v.to_string()));
        }
        // Written most specific first (RFC 4514); kept in certificate order.
        pairs.reverse();
        Ok(DistinguishedName::from_pairs(pairs))
    }

    /// Whether both names hold the same attributes, in any order.
    pub fn matches(&self, other: &DistinguishedName) -> bool {
        let mut a = self.0.clone();
        let mut b = other.0.clone();
        a.sort();
        b.sort();
        a == b
    }
}

impl std::fmt::Display for DistinguishedName {
    /// RFC 4514 order, as GnuTLS and QEMU's `tls-authz` write it (`CN=...,O=...,C=...`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (t, v)) in self.0.iter().rev().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{t}={}", v.replace(',', "\\,"))?;
        }
        Ok(())
    }
}

/// Who a connection is: its address and, with TLS, its certificate's subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerId {
    /// The peer's address.
    pub ip: IpAddr,
    /// The client certificate's subject, when TLS verified one.
    pub name: Option<DistinguishedName>,
}

impl std::fmt::Display for PeerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.name {
            Some(n) => write!(f, "{} ({n})", self.ip),
            None => write!(f, "{}", self.ip),
        }
    }
}

/// Which kind of connection is asking to join the migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Joining {
    /// The first main channel.
    FreshMain,
    /// The preempt channel.
    Preempt,
    /// A main channel resuming after a cut.
    Resume,
    /// A multifd channel.
    Multifd,
}

/// The admission policy: the allow list and, once a source is in, who it is.
#[derive(Debug, Clone, Default)]
pub struct Admission {
    allow: Option<AllowList>,
    source: Option<PeerId>,
}

impl Admission {
    /// A policy with an optional allow list.
    pub fn new(allow: Option<AllowList>) -> Self {
        Admission {
            allow,
            source: None,
        }
    }

    /// Checked at accept, before a byte is read: `Err` names why the peer is refused.
    pub fn at_accept(&self, peer: IpAddr) -> Result<(), String> {
        if let Some(a) = &self.allow
            && !a.allows(peer)
        {
            return Err(format!("{peer} is not in --allow-from"));
        }
        Ok(())
    }

    /// Checked when a connection has shown what it is: after the fresh main channel,
    /// every further channel must come from the same source: the same address and, with
    /// TLS, the same certificate name.
    pub fn joining(&self, peer: &PeerId, what: Joining) -> Result<(), String> {
        self.at_accept(peer.ip)?;
        match (what, &self.source) {
            (Joining::FreshMain, _) | (_, None) => Ok(()),
            (_, Some(s)) if s.ip == peer.ip && s.name == peer.name => Ok(()),
            (_, Some(s)) => Err(format!("it is {peer}, the source is {s}")),
        }
    }

    /// Whether `ip` is the admitted source's address: before a byte is read, the most a
    /// connection can show. Enough to prepare for it (a destination connection opened
    /// early for a resume), never to let a byte of it through.
    pub fn is_source_address(&self, ip: IpAddr) -> bool {
        self.source.as_ref().is_some_and(|s| s.ip == ip) && self.at_accept(ip).is_ok()
    }

    /// Records who the admitted source is.
    pub fn admitted(&mut self, peer: PeerId) {
        self.source.get_or_insert(peer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::BlockLimit;
    use crate::wire::compose::put_opening;

    fn options() -> DecoderOptions {
        DecoderOptions {
            block_limits: Some(
                [(
                    b"pc.ram".to_vec(),
                    BlockLimit {
                        max_length: 1 << 28,
                        page_size: 4096,
                    },
                )]
                .into(),
            ),
            ..Default::default()
        }
    }

    fn opening(len: u64) -> Vec<u8> {
        let mut v = Vec::new();
        put_opening(&mut v, b"pc-q35-10.0", 2, &[(b"pc.ram", len)]);
        v
    }

    #[test]
    fn a_fitting_opening_is_admitted_however_it_is_split() {
        let bytes = opening(1 << 28);
        for at in 1..bytes.len() {
            let mut c = OpeningCheck::new(options());
            let first = c.push(&bytes[..at]);
            // The record after the list (EOS, then a 5-byte footer) ends the check.
            if at < bytes.len() - 5 {
                assert_eq!(first, OpeningVerdict::NeedMore, "judged early at {at}");
            }
            if first == OpeningVerdict::Admit {
                assert_eq!(c.into_bytes(), &bytes[..at]);
                continue;
            }
            let v = c.push(&bytes[at..]);
            assert_eq!(v, OpeningVerdict::Admit, "split at {at}");
            assert_eq!(c.into_bytes(), bytes);
        }
    }

    #[test]
    fn a_huge_block_is_refused_before_anything_is_sized_from_it() {
        let mut c = OpeningCheck::new(options());
        match c.push(&opening(1 << 60)) {
            OpeningVerdict::Refuse(why) => assert!(why.contains("exceeds"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn random_bytes_and_endless_valid_prefixes_are_refused() {
        let mut c = OpeningCheck::new(options());
        assert!(matches!(
            c.push(&[0x51, 0x45, 0x56, 0x00]),
            OpeningVerdict::Refuse(_)
        ));
        // A header then an endless run of PING commands: valid, but never a block list.
        let mut c = OpeningCheck::new(options());
        let mut v = b"QEVM\0\0\0\x03".to_vec();
        let ping = [8u8, 0, 2, 0, 4, 0, 0, 0, 1];
        let mut verdict = c.push(&v);
        while verdict == OpeningVerdict::NeedMore {
            v.clear();
            for _ in 0..1000 {
                v.extend_from_slice(&ping);
            }
            verdict = c.push(&v);
        }
        assert!(
            matches!(&verdict, OpeningVerdict::Refuse(w) if w.contains("no complete RAM block list")),
            "{verdict:?}"
        );
    }

    #[test]
    fn the_allow_list_takes_addresses_and_prefixes() {
        let a = AllowList::parse("10.1.0.0/16, 192.0.2.7,::1").unwrap();
        assert!(a.allows("10.1.2.3".parse().unwrap()));
        assert!(a.allows("::ffff:10.1.2.3".parse().unwrap()));
        assert!(a.allows("192.0.2.7".parse().unwrap()));
        assert!(a.allows("::1".parse().unwrap()));
        assert!(!a.allows("192.0.2.8".parse().unwrap()));
        assert!(AllowList::parse("nonsense").is_err());
        assert!(AllowList::parse("").is_err());
    }

    #[test]
    fn only_the_admitted_source_adds_channels() {
        let mut p = Admission::new(None);
        let id = |ip: &str, name: Option<&str>| PeerId {
            ip: ip.parse().unwrap(),
            name: name.map(|n| DistinguishedName::parse(n).unwrap()),
        };
        let src = id("127.0.0.1", Some("CN=src,O=Lab"));
        let other = id("127.0.0.2", Some("CN=src,O=Lab"));
        let other_cert = id("127.0.0.1", Some("CN=intruder,O=Lab"));
        assert!(p.joining(&other, Joining::Preempt).is_ok(), "no source yet");
        assert!(!p.is_source_address(src.ip), "no source yet");
        p.admitted(src.clone());
        assert!(p.is_source_address(src.ip));
        assert!(!p.is_source_address(other.ip));
        assert!(p.joining(&src, Joining::Preempt).is_ok());
        assert!(p.joining(&src, Joining::Resume).is_ok());
        assert!(p.joining(&other, Joining::Preempt).is_err());
        assert!(p.joining(&other, Joining::Resume).is_err());
        let e = p.joining(&other_cert, Joining::Resume).unwrap_err();
        assert!(e.contains("CN=intruder"), "{e}");
        let strict = Admission::new(Some(AllowList::parse("127.0.0.1").unwrap()));
        assert!(strict.at_accept(other.ip).is_err());
    }

    #[test]
    fn names_match_in_either_order_and_print_like_gnutls() {
        let cert_order = DistinguishedName::from_pairs(vec![
            ("C".into(), "GB".into()),
            ("O".into(), "Example, Inc.".into()),
            ("cn".into(), "src.example".into()),
        ]);
        let rfc4514 = DistinguishedName::parse("CN=src.example,O=Example\\, Inc.,C=GB").unwrap();
        let reversed = DistinguishedName::parse("C=GB, O=Example\\, Inc., CN=src.example").unwrap();
        assert!(cert_order.matches(&rfc4514));
        assert!(cert_order.matches(&reversed));
        assert_eq!(rfc4514.to_string(), "CN=src.example,O=Example\\, Inc.,C=GB");
        assert_eq!(cert_order.to_string(), rfc4514.to_string());
        assert!(!cert_order.matches(&DistinguishedName::parse("CN=src.example,C=GB").unwrap()));
        assert!(DistinguishedName::parse("CN").is_err());
        assert!(DistinguishedName::parse("CN=a\\").is_err());
    }
}
