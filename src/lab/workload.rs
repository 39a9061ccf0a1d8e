//! The guest workload's parameters (kernel command line) and its `WL ...` console lines.
//!
//! The workload is `interop-tests/guest-workload`, the guest's `/init`. It fills `mib` MiB
//! with a pattern every page of which can be verified, then rewrites and verifies pages
//! forever, printing progress. A page lost or made stale by a migration shows up as
//! `WL mismatch` lines and a non-zero `mismatches=` count.

use std::collections::HashMap;

/// How the workload touches its memory after the initial fill.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WorkloadMode {
    /// Sweep all pages in order: verify, then rewrite with the next generation.
    Seq,
    /// Verify-and-rewrite pages picked at random.
    Random,
    /// Rewrite a hot set of `hot_mib` repeatedly, with a full verification sweep every ~3 s.
    Hot,
    /// Fill once, then only verify, slowly (a guest that dirties almost nothing).
    Idle,
}

impl WorkloadMode {
    /// The `wl.mode=` spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkloadMode::Seq => "seq",
            WorkloadMode::Random => "random",
            WorkloadMode::Hot => "hot",
            WorkloadMode::Idle => "idle",
        }
    }
}

impl std::str::FromStr for WorkloadMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "seq" => WorkloadMode::Seq,
            "random" => WorkloadMode::Random,
            "hot" => WorkloadMode::Hot,
            "idle" => WorkloadMode::Idle,
            _ => return Err(format!("unknown workload mode {s:?} (seq|random|hot|idle)")),
        })
    }
}

/// Parameters of the guest workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workload {
    /// MiB of guest memory the workload owns (must fit in the VM's RAM with the kernel).
    pub mib: u64,
    /// Access pattern.
    pub mode: WorkloadMode,
    /// Size of the hot set in `Hot` mode.
    pub hot_mib: u64,
    /// Pattern seed (a host-side reader needs it to verify pages).
    pub seed: u64,
}

impl Default for Workload {
    /// 64 MiB, hot mode with an 8 MiB hot set: runs in seconds under TCG and keeps
    /// dirtying pages during a migration.
    fn default() -> Self {
        Workload {
            mib: 64,
            mode: WorkloadMode::Hot,
            hot_mib: 8,
            seed: 1,
        }
    }
}

impl Workload {
    /// The `wl.*` kernel command line words.
    pub fn cmdline(&self) -> String {
        format!(
            "wl.mib={} wl.mode={} wl.hot_mib={} wl.seed={}",
            self.mib,
            self.mode.as_str(),
            self.hot_mib,
            self.seed
        )
    }
}

/// `WL ready ...`: the fill is done and the access loop starts.
#[derive(Debug, Clone, PartialEq)]
pub struct WlReady {
    /// MiB filled.
    pub mib: u64,
    /// Mode name.
    pub mode: String,
    /// Time the fill took (guest clock).
    pub fill_ms: u64,
}

/// `WL progress ...`, printed about every 0.5 s of guest time.
#[derive(Debug, Clone, PartialEq)]
pub struct WlProgress {
    /// Completed passes (sweeps, hot rounds, ...).
    pub round: u64,
    /// Pages rewritten since the fill.
    pub pages: u64,
    /// Pages verified since the fill.
    pub verified: u64,
    /// Mismatching words found so far (cumulative).
    pub mismatches: u64,
    /// MiB/s processed since the previous progress line.
    pub mbps: f64,
    /// Guest milliseconds since `/init` started.
    pub t_ms: u64,
}

/// `WL mark ...` (with `wl.mark_mib=N`): another N MiB of pages processed. Work, not time:
/// the guest's clock runs on while a vCPU waits for a page, so only a count of work shows
/// what waiting for pages cost (a timed progress line comes on time regardless).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WlMark {
    /// Marks since the fill (1, 2, ...).
    pub n: u64,
    /// Pages processed (rewritten + verified) since the fill.
    pub pages: u64,
    /// Guest milliseconds since `/init` started.
    pub t_ms: u64,
}

/// `WL mismatch ...`: one word that did not hold its expected value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WlMismatch {
    /// Page index within the workload's buffer.
    pub page: u64,
    /// Word index within the page (0 = header).
    pub word: u64,
    /// Expected value.
    pub expected: u64,
    /// Value found.
    pub got: u64,
}

/// One parsed `WL ...` line.
#[derive(Debug, Clone, PartialEq)]
pub enum WlLine {
    /// `WL boot`: `/init` started and read its parameters.
    Boot,
    /// `WL ready`.
    Ready(WlReady),
    /// `WL progress`.
    Progress(WlProgress),
    /// `WL mark`.
    Mark(WlMark),
    /// `WL mismatch`.
    Mismatch(WlMismatch),
    /// `WL sweep`: a full verification pass ended with this many new mismatches.
    Sweep {
        /// Mismatches found by this sweep.
        mismatches: u64,
    },
    /// `WL fatal`: the workload stopped.
    Fatal(String),
    /// A `WL` line of another kind (e.g. `WL warn`).
    Other(String),
}

fn fields(rest: &str) -> HashMap<&str, &str> {
    rest.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .collect()
}

fn num(f: &HashMap<&str, &str>, k: &str) -> Option<u64> {
    let v = f.get(k)?;
    match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => v.parse().ok(),
    }
}

/// Parses a console line; `None` when it is not a `WL` line (kernel messages, ...) or a
/// known kind lacks a field (e.g. a line cut by a concurrent kernel message).
pub fn parse_wl_line(line: &str) -> Option<WlLine> {
    let rest = line.trim().strip_prefix("WL ")?;
    let (kind, rest) = rest.split_once(' ').unwrap_or((rest, ""));
    let f = fields(rest);
    Some(match kind {
        "boot" => WlLine::Boot,
        "ready" => WlLine::Ready(WlReady {
            mib: num(&f, "mib")?,
            mode: f.get("mode")?.to_string(),
            fill_ms: num(&f, "fill_ms")?,
        }),
        "progress" => WlLine::Progress(WlProgress {
            round: num(&f, "round")?,
            pages: num(&f, "pages")?,
            verified: num(&f, "verified")?,
            mismatches: num(&f, "mismatches")?,
            mbps: f.get("mbps")?.parse().ok()?,
            t_ms: num(&f, "t_ms").unwrap_or(0),
        }),
        "mark" => WlLine::Mark(WlMark {
            n: num(&f, "n")?,
            pages: num(&f, "pages")?,
            t_ms: num(&f, "t_ms")?,
        }),
        "mismatch" => WlLine::Mismatch(WlMismatch {
            page: num(&f, "page")?,
            word: num(&f, "word")?,
            expected: num(&f, "expected")?,
            got: num(&f, "got")?,
        }),
        "sweep" => WlLine::Sweep {
            mismatches: num(&f, "mismatches")?,
        },
        "fatal" => WlLine::Fatal(rest.to_string()),
        _ => WlLine::Other(rest.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_workload_lines() {
        assert_eq!(
            parse_wl_line("WL ready mib=64 mode=hot hot_mib=8 seed=1 pages=16384 fill_ms=49"),
            Some(WlLine::Ready(WlReady {
                mib: 64,
                mode: "hot".into(),
                fill_ms: 49
            }))
        );
        let p = parse_wl_line(
            "WL progress round=56 pages=115424 verified=115424 mismatches=0 mbps=1803.4 t_ms=727\r",
        );
        assert_eq!(
            p,
            Some(WlLine::Progress(WlProgress {
                round: 56,
                pages: 115424,
                verified: 115424,
                mismatches: 0,
                mbps: 1803.4,
                t_ms: 727
            }))
        );
        assert_eq!(
            parse_wl_line(
                "WL mismatch page=0x1f word=3 expected=0x00000000000000ff got=0x0000000000000000"
            ),
            Some(WlLine::Mismatch(WlMismatch {
                page: 0x1f,
                word: 3,
                expected: 0xff,
                got: 0
            }))
        );
        assert_eq!(
            parse_wl_line("WL fatal cannot allocate 64 MiB"),
            Some(WlLine::Fatal("cannot allocate 64 MiB".into()))
        );
        assert_eq!(parse_wl_line("[    0.000000] Linux version"), None);
        assert_eq!(parse_wl_line("WL progress round=1"), None);
        assert_eq!(
            parse_wl_line("WL mark n=2 pages=32768 t_ms=5120\r"),
            Some(WlLine::Mark(WlMark {
                n: 2,
                pages: 32768,
                t_ms: 5120
            }))
        );
        assert_eq!(parse_wl_line("WL mark n=2"), None);
    }

    #[test]
    fn cmdline_round_trips_the_mode() {
        let w = Workload {
            mode: WorkloadMode::Seq,
            ..Workload::default()
        };
        assert_eq!(w.cmdline(), "wl.mib=64 wl.mode=seq wl.hot_mib=8 wl.seed=1");
        assert_eq!("random".parse::<WorkloadMode>(), Ok(WorkloadMode::Random));
    }
}
