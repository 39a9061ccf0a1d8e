//! The interop matrix: which QEMU version pairs, channel sets and RAM layouts each feature
//! was tested on, and how it went, from the test command's own output. The cells and the
//! tests behind them are listed in `interop-tests/matrix.tsv`; a cell passes only when
//! every test behind it ran and passed, so a test that did not run shows as a failure,
//! never as a blank. Cells resting on QEMU's source (streams composed from the spec,
//! because that QEMU cannot run here) are marked as such.

use std::collections::{BTreeMap, BTreeSet, HashMap};

/// What one test did in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It ran and passed.
    Passed,
    /// It ran and failed.
    Failed,
}

/// Reads `cargo test` output: `Running <path>` names the test binary (its file stem), and
/// each `test <name> ... ok|FAILED` gives one result, keyed `<binary>::<name>`. Output a
/// test's child processes write to the shared stderr can come between a test's name and
/// its verdict, so a verdict alone on a later line counts for the test named last; a
/// `---- <name> stdout ----` block marks a failure whatever came before.
pub fn outcomes(log: &str) -> HashMap<String, Outcome> {
    let mut binary = String::new();
    let mut pending: Option<String> = None;
    let mut out = HashMap::new();
    let verdict = |s: &str| {
        if s.ends_with("FAILED") {
            Some(Outcome::Failed)
        } else if s == "ok" || s.ends_with(" ok") {
            Some(Outcome::Passed)
        } else {
            None
        }
    };
    for line in log.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("Running ") {
            // `Running unittests src/lib.rs (...)` or `Running interop-tests/x.rs (...)`.
            let mut words = rest.split_whitespace().skip_while(|w| *w == "unittests");
            let path = words.next().unwrap_or("");
            binary = std::path::Path::new(path)
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            pending = None;
            continue;
        }
        if let Some(name) = line
            .strip_prefix("---- ")
            .and_then(|r| r.strip_suffix(" stdout ----"))
        {
            out.insert(format!("{binary}::{name}"), Outcome::Failed);
            continue;
        }
        if let Some((name, result)) = line
            .strip_prefix("test ")
            .and_then(|r| r.split_once(" ..."))
        {
            let key = format!("{binary}::{}", name.trim());
            match verdict(result.trim()) {
                Some(o) => {
                    out.insert(key, o);
                    pending = None;
                }
                None => pending = Some(key),
            }
            continue;
        }
        if let Some(o) = verdict(line)
            && let Some(key) = pending.take()
        {
            out.insert(key, o);
        }
    }
    out
}

/// One line of `matrix.tsv`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cell {
    /// `binary::test`.
    pub test: String,
    /// Row: version pair, channels, RAM layout.
    pub row: (String, String, String),
    /// Column: the feature.
    pub feature: String,
    /// `run` (real QEMU) or `source` (a composed stream; no such QEMU ran).
    pub basis: String,
}

/// Parses `matrix.tsv`: tab-separated test, versions, channels, layout, feature, basis;
/// `#` starts a comment.
pub fn cells(tsv: &str) -> Result<Vec<Cell>, String> {
    let mut v = Vec::new();
    for (n, line) in tsv.lines().enumerate() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split('\t').map(str::trim).collect();
        let [test, versions, channels, layout, feature, basis] = f[..] else {
            return Err(format!(
                "matrix.tsv line {}: expected 6 tab-separated fields",
                n + 1
            ));
        };
        if basis != "run" && basis != "source" {
            return Err(format!(
                "matrix.tsv line {}: basis {basis:?}, expected run or source",
                n + 1
            ));
        }
        v.push(Cell {
            test: test.into(),
            row: (versions.into(), channels.into(), layout.into()),
            feature: feature.into(),
            basis: basis.into(),
        });
    }
    Ok(v)
}

/// The matrix as a Markdown table, and whether every cell passed.
pub fn render(cells: &[Cell], outcomes: &HashMap<String, Outcome>) -> (String, bool) {
    let features: Vec<String> = {
        let mut seen = Vec::new();
        for c in cells {
            if !seen.contains(&c.feature) {
                seen.push(c.feature.clone());
            }
        }
        seen
    };
    // (row, feature) -> (all passed, any failed, any missing, source only)
    let mut grid: BTreeMap<(String, String, String), HashMap<String, Vec<&Cell>>> = BTreeMap::new();
    for c in cells {
        grid.entry(c.row.clone())
            .or_default()
            .entry(c.feature.clone())
            .or_default()
            .push(c);
    }
    let mut all_ok = true;
    let mut missing = BTreeSet::new();
    let mut s = String::new();
    s.push_str("| versions | channels | RAM |");
    for f in &features {
        s.push_str(&format!(" {f} |"));
    }
    s.push_str("\n|---|---|---|");
    for _ in &features {
        s.push_str("---|");
    }
    s.push('\n');
    for ((versions, channels, layout), by_feature) in &grid {
        s.push_str(&format!("| {versions} | {channels} | {layout} |"));
        for f in &features {
            let cell = match by_feature.get(f) {
                None => "–".to_string(),
                Some(tests) => {
                    let mut failed = 0;
                    for t in tests {
                        match outcomes.get(&t.test) {
                            Some(Outcome::Passed) => {}
                            Some(Outcome::Failed) => failed += 1,
                            None => {
                                failed += 1;
                                missing.insert(t.test.clone());
                            }
                        }
                    }
                    let source = tests.iter().all(|t| t.basis == "source");
                    if failed > 0 {
                        all_ok = false;
                        format!("**FAIL** ({failed}/{})", tests.len())
                    } else if source {
                        "pass (source)".into()
                    } else {
                        "pass".into()
                    }
                }
            };
            s.push_str(&format!(" {cell} |"));
        }
        s.push('\n');
    }
    s.push_str(
        "\n\"pass (source)\": tested on streams composed from QEMU's source (that QEMU cannot \
         run here); \"–\": not tested.\n",
    );
    for m in &missing {
        s.push_str(&format!("did not run: {m}\n"));
    }
    (s, all_ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "\
     Running unittests src/lib.rs (target/release/deps/postcopy_sidecar-1)
test session::tests::ping_10_2 ... ok
     Running interop-tests/receive.rs (target/release/deps/receive-2)
test postcopy_10_0 ... migration completed
destination  QEMU 10.0.2
ok
test postcopy_7_2 ... ok
test multifd_7_2 ... FAILED
";

    #[test]
    fn a_cell_passes_only_when_every_test_behind_it_ran_and_passed() {
        let o = outcomes(LOG);
        assert_eq!(
            o.get("lib::session::tests::ping_10_2"),
            Some(&Outcome::Passed)
        );
        assert_eq!(o.get("receive::postcopy_7_2"), Some(&Outcome::Passed));
        assert_eq!(o.get("receive::multifd_7_2"), Some(&Outcome::Failed));
        // The verdict came on a later line, after a child process's output.
        assert_eq!(o.get("receive::postcopy_10_0"), Some(&Outcome::Passed));
        assert_eq!(o.get("receive::never_ran"), None);
        let tsv = "# comment\n\
            receive::postcopy_7_2\t7.2→7.2\tmain\t1 memfd\tpostcopy\trun\n\
            receive::multifd_7_2\t7.2→7.2\tmain + 4 multifd\t1 memfd\tmultifd\trun\n\
            receive::never_ran\t10.0→10.0\tmain\t1 memfd\tpostcopy\trun\n\
            lib::session::tests::ping_10_2\t10.2→10.2\tmain\t1 memfd\tpostcopy\tsource\n";
        let c = cells(tsv).unwrap();
        let (table, ok) = render(&c, &o);
        assert!(!ok);
        assert!(
            table.contains("| 7.2→7.2 | main | 1 memfd | pass | – |"),
            "{table}"
        );
        assert!(
            table.contains("| 7.2→7.2 | main + 4 multifd | 1 memfd | – | **FAIL** (1/1) |"),
            "{table}"
        );
        assert!(
            table.contains("| 10.2→10.2 | main | 1 memfd | pass (source) | – |"),
            "{table}"
        );
        assert!(table.contains("did not run: receive::never_ran"), "{table}");
        assert!(cells("a\tb").is_err());
    }
}
