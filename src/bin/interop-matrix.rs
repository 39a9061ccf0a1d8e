//! `interop-matrix TSV LOG [OUT]`: prints the interop matrix (`postcopy_sidecar::lab::matrix`)
//! for a `cargo test` log, writes it to OUT too, and exits 1 if any cell failed or a test
//! behind a cell did not run. `scripts/test.sh` runs it after the tests.

use std::process::ExitCode;

use postcopy_sidecar::lab::matrix;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(tsv), Some(log)) = (args.first(), args.get(1)) else {
        eprintln!("usage: interop-matrix TSV LOG [OUT]");
        return ExitCode::from(2);
    };
    let read = |p: &str| std::fs::read_to_string(p).map_err(|e| format!("{p}: {e}"));
    let (tsv, log) = match (read(tsv), read(log)) {
        (Ok(t), Ok(l)) => (t, l),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let cells = match matrix::cells(&tsv) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let (table, ok) = matrix::render(&cells, &matrix::outcomes(&log));
    println!("{table}");
    if let Some(out) = args.get(2)
        && let Err(e) = std::fs::write(out, &table)
    {
        eprintln!("error: {out}: {e}");
        return ExitCode::from(2);
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
