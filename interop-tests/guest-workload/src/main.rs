//! The test guest's `/init`: allocates `wl.mib` MiB, fills it with a verifiable pattern and
//! then keeps rewriting and verifying it, printing one machine-readable `WL ...` line per
//! event on the console. A migration that loses, reorders or duplicates a page shows up as a
//! `WL mismatch` line, which is what the interop tests look for.
//!
//! Parameters come from the kernel command line (`/proc/cmdline`):
//! `wl.mib=64 wl.mode=seq|random|hot|idle wl.hot_mib=8 wl.seed=1`, plus `wl.corrupt=1`
//! (self-test: flip one bit after the fill, to prove mismatches get reported) and
//! `wl.mark_mib=N` (a `WL mark` line per N MiB of pages processed: work, not time).
//! Run outside a VM (not PID 1), the same `wl.*` words are taken from the arguments.
//!
//! # Page format (4 KiB pages, 512 little-endian u64 words)
//!
//! A reader that knows only `seed` can verify any page on its own:
//! - word 0, the header: `0x57 << 56 | (page_index & 0xFF_FFFF) << 32 | generation` where
//!   `generation` is a u32 starting at 1 (0 never occurs, so a zero page never verifies);
//! - word `i` in 1..512: `base + i * K` (wrapping), where `K = 0x9E37_79B9_7F4A_7C15` and
//!   `base = mix(seed ^ mix(page_index << 32 | generation))`, `mix` being splitmix64's
//!   finalizer.
//!
//! So every word is a function of (seed, global word index, generation). The guest itself
//! also remembers the generation it last wrote to each page, so it also catches a page that
//! is self-consistent but stale (an older generation), the typical postcopy bug.

use std::ffi::CString;
use std::io::Write;
use std::os::raw::{c_char, c_int, c_ulong, c_void};
use std::time::{Duration, Instant};

unsafe extern "C" {
    fn mount(
        source: *const c_char,
        target: *const c_char,
        fstype: *const c_char,
        flags: c_ulong,
        data: *const c_void,
    ) -> c_int;
    fn dup2(old: c_int, new: c_int) -> c_int;
    fn getpid() -> c_int;
}

const PAGE: usize = 4096;
const WORDS: usize = PAGE / 8;
const MAGIC: u64 = 0x57;
const K: u64 = 0x9E37_79B9_7F4A_7C15;
/// How often a progress line is printed (guest time).
const REPORT: Duration = Duration::from_millis(500);
/// Pages processed between two looks at the clock.
const CHUNK: usize = 16;
/// Mismatch lines printed at most (all are still counted).
const MAX_MISMATCH_LINES: u64 = 100;

/// splitmix64's finalizer: a cheap bijective mixer.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn header(page: usize, generation: u32) -> u64 {
    MAGIC << 56 | ((page as u64) & 0xFF_FFFF) << 32 | generation as u64
}

fn base(seed: u64, page: usize, generation: u32) -> u64 {
    mix(seed ^ mix((page as u64) << 32 | generation as u64))
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Seq,
    Random,
    Hot,
    Idle,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Seq => "seq",
            Mode::Random => "random",
            Mode::Hot => "hot",
            Mode::Idle => "idle",
        }
    }
}

struct Params {
    mib: usize,
    mode: Mode,
    hot_mib: usize,
    seed: u64,
    /// Self-test: flip one bit after the fill so the detection path can be tested.
    corrupt: bool,
    /// Print `WL mark` each time this many more MiB have been processed (0: never): a
    /// measure of work done, where `WL progress` follows the clock (which runs on while a
    /// vCPU waits for a page, so a timed line cannot show what waiting cost).
    mark_mib: usize,
}

fn parse_params(words: &str) -> Result<Params, String> {
    let mut p = Params {
        mib: 64,
        mode: Mode::Hot,
        hot_mib: 8,
        seed: 1,
        corrupt: false,
        mark_mib: 0,
    };
    for w in words.split_whitespace() {
        let Some((k, v)) = w.split_once('=') else {
            continue;
        };
        let num = |v: &str| v.parse::<u64>().map_err(|_| format!("bad {k}={v}"));
        match k {
            "wl.mib" => p.mib = num(v)? as usize,
            "wl.hot_mib" => p.hot_mib = num(v)? as usize,
            "wl.seed" => p.seed = num(v)?,
            "wl.corrupt" => p.corrupt = num(v)? != 0,
            "wl.mark_mib" => p.mark_mib = num(v)? as usize,
            "wl.mode" => {
                p.mode = match v {
                    "seq" => Mode::Seq,
                    "random" => Mode::Random,
                    "hot" => Mode::Hot,
                    "idle" => Mode::Idle,
                    _ => return Err(format!("bad wl.mode={v}")),
                }
            }
            _ => {}
        }
    }
    if p.mib == 0 {
        return Err("wl.mib must be > 0".into());
    }
    p.hot_mib = p.hot_mib.clamp(1, p.mib);
    Ok(p)
}

/// Prints one line; console errors are ignored (there is nobody to tell).
macro_rules! out {
    ($($t:tt)*) => {{
        let mut o = std::io::stdout().lock();
        let _ = writeln!(o, $($t)*);
        let _ = o.flush();
    }};
}

/// PID 1 must never exit: report and park forever.
fn fatal(msg: &str) -> ! {
    out!("WL fatal {msg}");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn mount_fs(fstype: &str, target: &str) {
    let _ = std::fs::create_dir_all(target);
    let (src, tgt, ty) = (
        CString::new(fstype).unwrap_or_default(),
        CString::new(target).unwrap_or_default(),
        CString::new(fstype).unwrap_or_default(),
    );
    // SAFETY: valid NUL-terminated strings, no data argument.
    let rc = unsafe { mount(src.as_ptr(), tgt.as_ptr(), ty.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        // EBUSY: already mounted (e.g. the kernel's own devtmpfs automount).
        if e.raw_os_error() != Some(16) {
            out!("WL warn mount {target}: {e}");
        }
    }
}

/// Mounts what PID 1 needs and makes sure stdout reaches the console even when the
/// initramfs lacked a `/dev/console` node at boot.
fn init_system() {
    mount_fs("proc", "/proc");
    mount_fs("sysfs", "/sys");
    mount_fs("devtmpfs", "/dev");
    if std::fs::metadata("/proc/self/fd/1").is_err()
        && let Ok(f) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/console")
    {
        use std::os::fd::IntoRawFd;
        let fd = f.into_raw_fd();
        // SAFETY: plain descriptor duplication onto stdio.
        unsafe {
            dup2(fd, 0);
            dup2(fd, 1);
            dup2(fd, 2);
        }
    }
}

struct Workload {
    seed: u64,
    mem: &'static mut [u64],
    gens: Vec<u32>,
    pages: usize,
    mismatches: u64,
    printed: u64,
    rewritten: u64,
    verified: u64,
}

impl Workload {
    fn new(p: &Params) -> Workload {
        let pages = p.mib * 256;
        let bytes = pages * PAGE;
        let layout = std::alloc::Layout::from_size_align(bytes, PAGE)
            .unwrap_or_else(|_| fatal("bad allocation size"));
        // SAFETY: non-zero size; page-aligned so each pattern page is one guest page.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) } as *mut u64;
        if ptr.is_null() {
            fatal(&format!("cannot allocate {} MiB", p.mib));
        }
        // SAFETY: freshly allocated, exclusively owned for the life of PID 1.
        let mem = unsafe { std::slice::from_raw_parts_mut(ptr, pages * WORDS) };
        let mut gens = Vec::new();
        if gens.try_reserve_exact(pages).is_err() {
            fatal("cannot allocate the generation table");
        }
        gens.resize(pages, 0);
        Workload {
            seed: p.seed,
            mem,
            gens,
            pages,
            mismatches: 0,
            printed: 0,
            rewritten: 0,
            verified: 0,
        }
    }

    fn write(&mut self, page: usize) {
        let g = match self.gens[page].wrapping_add(1) {
            0 => 1,
            g => g,
        };
        self.gens[page] = g;
        let p = &mut self.mem[page * WORDS..(page + 1) * WORDS];
        p[0] = header(page, g);
        let mut v = base(self.seed, page, g);
        for w in p.iter_mut().skip(1) {
            v = v.wrapping_add(K);
            *w = v;
        }
    }

    fn mismatch(&mut self, page: usize, word: usize, expected: u64, got: u64) {
        self.mismatches += 1;
        if self.printed < MAX_MISMATCH_LINES {
            self.printed += 1;
            out!(
                "WL mismatch page={page:#x} word={word} expected={expected:#018x} got={got:#018x}"
            );
        }
    }

    fn verify(&mut self, page: usize) {
        self.verified += 1;
        let g = self.gens[page];
        let start = page * WORDS;
        let h = header(page, g);
        if self.mem[start] != h {
            let got = self.mem[start];
            self.mismatch(page, 0, h, got);
        }
        let mut v = base(self.seed, page, g);
        for w in 1..WORDS {
            v = v.wrapping_add(K);
            let got = self.mem[start + w];
            if got != v {
                self.mismatch(page, w, v, got);
            }
        }
    }

    fn touch(&mut self, page: usize) {
        self.verify(page);
        self.write(page);
        self.rewritten += 1;
    }
}

struct Reporter {
    start: Instant,
    last: Instant,
    last_pages: u64,
    round: u64,
    /// Pages per `WL mark` (0: off).
    mark_pages: u64,
    /// Processed pages at which the next mark is due.
    next_mark: u64,
    marks: u64,
}

impl Reporter {
    /// A reporter from now on, with a mark every `mark_mib` MiB processed (0: none).
    fn new(start: Instant, mark_mib: usize) -> Reporter {
        let mark_pages = mark_mib as u64 * 256;
        Reporter {
            start,
            last: Instant::now(),
            last_pages: 0,
            round: 0,
            mark_pages,
            next_mark: mark_pages,
            marks: 0,
        }
    }

    fn due(&self) -> bool {
        self.last.elapsed() >= REPORT
    }

    fn report(&mut self, wl: &Workload) {
        let now = Instant::now();
        let done = wl.rewritten + wl.verified;
        let secs = now.duration_since(self.last).as_secs_f64().max(1e-9);
        let mbps = (done - self.last_pages) as f64 * PAGE as f64 / secs / (1 << 20) as f64;
        out!(
            "WL progress round={} pages={} verified={} mismatches={} mbps={:.1} t_ms={}",
            self.round,
            wl.rewritten,
            wl.verified,
            wl.mismatches,
            mbps,
            now.duration_since(self.start).as_millis()
        );
        self.last = now;
        self.last_pages = done;
    }

    fn maybe(&mut self, wl: &Workload) {
        if self.due() {
            self.report(wl);
        }
        let done = wl.rewritten + wl.verified;
        if let Some(n) = self.mark_due(done) {
            out!(
                "WL mark n={n} pages={done} t_ms={}",
                self.start.elapsed().as_millis()
            );
        }
    }

    /// The number of the mark due now that `done` pages have been processed, if one is.
    fn mark_due(&mut self, done: u64) -> Option<u64> {
        if self.mark_pages == 0 || done < self.next_mark {
            return None;
        }
        self.marks += 1;
        self.next_mark = (done / self.mark_pages + 1) * self.mark_pages;
        Some(self.marks)
    }
}

/// Verifies every page once (no rewrite), reporting as it goes.
fn full_sweep(wl: &mut Workload, rep: &mut Reporter, pause: Option<Duration>) {
    let before = wl.mismatches;
    let mut page = 0;
    while page < wl.pages {
        let end = (page + CHUNK).min(wl.pages);
        for p in page..end {
            wl.verify(p);
        }
        page = end;
        rep.maybe(wl);
        if let Some(d) = pause {
            std::thread::sleep(d);
        }
    }
    out!(
        "WL sweep pages={} mismatches={} t_ms={}",
        wl.pages,
        wl.mismatches - before,
        rep.start.elapsed().as_millis()
    );
}

fn run(p: Params, start: Instant) -> ! {
    let mut wl = Workload::new(&p);
    let t = Instant::now();
    for page in 0..wl.pages {
        wl.write(page);
    }
    let fill_ms = t.elapsed().as_millis();
    if p.corrupt {
        // Page 3 is in every mode's first pass (and in any hot set).
        let (page, word) = (3.min(wl.pages - 1), 5);
        wl.mem[page * WORDS + word] ^= 1;
        out!("WL corrupted page={page:#x} word={word}");
    }
    out!(
        "WL ready mib={} mode={} hot_mib={} seed={} pages={} fill_ms={}",
        p.mib,
        p.mode.name(),
        p.hot_mib,
        p.seed,
        wl.pages,
        fill_ms
    );
    let mut rep = Reporter::new(start, p.mark_mib);
    let mut rng = mix(p.seed ^ 0x5EED) | 1;
    let hot_pages = (p.hot_mib * 256).min(wl.pages);
    let mut last_full = Instant::now();
    loop {
        match p.mode {
            Mode::Seq => {
                let mut page = 0;
                while page < wl.pages {
                    let end = (page + CHUNK).min(wl.pages);
                    for q in page..end {
                        wl.touch(q);
                    }
                    page = end;
                    rep.maybe(&wl);
                }
            }
            Mode::Random => {
                for _ in 0..wl.pages.div_ceil(CHUNK) {
                    for _ in 0..CHUNK {
                        // xorshift64
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        wl.touch((rng % wl.pages as u64) as usize);
                    }
                    rep.maybe(&wl);
                }
            }
            Mode::Hot => {
                let mut page = 0;
                while page < hot_pages {
                    let end = (page + CHUNK).min(hot_pages);
                    for q in page..end {
                        wl.touch(q);
                    }
                    page = end;
                    rep.maybe(&wl);
                }
                if last_full.elapsed() >= Duration::from_secs(3) {
                    full_sweep(&mut wl, &mut rep, None);
                    last_full = Instant::now();
                }
            }
            Mode::Idle => full_sweep(&mut wl, &mut rep, Some(Duration::from_millis(20))),
        }
        rep.round += 1;
    }
}

fn main() {
    let start = Instant::now();
    // SAFETY: getpid has no preconditions.
    let pid1 = unsafe { getpid() } == 1;
    let words = if pid1 {
        init_system();
        match std::fs::read_to_string("/proc/cmdline") {
            Ok(s) => s,
            Err(e) => fatal(&format!("reading /proc/cmdline: {e}")),
        }
    } else {
        std::env::args().skip(1).collect::<Vec<_>>().join(" ")
    };
    let params = match parse_params(&words) {
        Ok(p) => p,
        Err(e) => fatal(&e),
    };
    out!(
        "WL boot pid1={} mib={} mode={} hot_mib={} seed={}",
        pid1,
        params.mib,
        params.mode.name(),
        params.hot_mib,
        params.seed
    );
    run(params, start)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> Workload {
        Workload::new(&parse_params("wl.mib=1 wl.seed=9").unwrap())
    }

    #[test]
    fn a_mark_falls_due_once_per_unit_of_work() {
        let p = parse_params("wl.mib=4 wl.mark_mib=1").unwrap();
        let mut rep = Reporter::new(Instant::now(), p.mark_mib);
        assert_eq!(rep.mark_due(255), None);
        assert_eq!(rep.mark_due(256), Some(1));
        assert_eq!(rep.mark_due(300), None);
        // A step over two units gives one mark, and the next is due at the next unit.
        assert_eq!(rep.mark_due(1000), Some(2));
        assert_eq!(rep.mark_due(1023), None);
        assert_eq!(rep.mark_due(1024), Some(3));
        let mut off = Reporter {
            mark_pages: 0,
            next_mark: 0,
            ..rep
        };
        assert_eq!(off.mark_due(1 << 30), None);
    }

    #[test]
    fn fresh_pages_verify() {
        let mut wl = small();
        for p in 0..wl.pages {
            wl.write(p);
        }
        for p in 0..wl.pages {
            wl.touch(p);
            wl.verify(p);
        }
        assert_eq!(wl.mismatches, 0);
    }

    #[test]
    fn stale_and_zero_pages_are_caught() {
        let mut wl = small();
        wl.write(1);
        let old: Vec<u64> = wl.mem[WORDS..2 * WORDS].to_vec();
        wl.write(1);
        wl.mem[WORDS..2 * WORDS].copy_from_slice(&old); // a page from one generation ago
        wl.verify(1);
        assert_eq!(wl.mismatches, WORDS as u64);
        wl.write(2);
        wl.mem[2 * WORDS..3 * WORDS].fill(0);
        let before = wl.mismatches;
        wl.verify(2);
        assert_eq!(wl.mismatches - before, WORDS as u64);
    }

    #[test]
    fn a_reader_needs_only_the_seed() {
        let mut wl = small();
        wl.write(5);
        wl.write(5);
        let page = &wl.mem[5 * WORDS..6 * WORDS];
        let g = (page[0] & 0xFFFF_FFFF) as u32;
        let idx = ((page[0] >> 32) & 0xFF_FFFF) as usize;
        assert_eq!(page[0] >> 56, MAGIC);
        assert_eq!((idx, g), (5, 2));
        let b = base(9, idx, g);
        for (i, w) in page.iter().enumerate().skip(1) {
            assert_eq!(*w, b.wrapping_add(K.wrapping_mul(i as u64)));
        }
    }
}
