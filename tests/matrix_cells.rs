//! Every test `interop-tests/matrix.tsv` puts behind a cell exists where it says (an
//! interop test file, or `lib::` for a unit test): a renamed or removed test would otherwise surface only at the end of a full
//! run, as a cell that failed for want of its test.

use std::path::Path;

#[test]
fn every_matrix_cell_names_an_existing_test() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tsv = std::fs::read_to_string(root.join("interop-tests/matrix.tsv")).unwrap();
    let mut checked = 0;
    let mut missing = Vec::new();
    for line in tsv
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let name = line.split('\t').next().unwrap();
        let (module, test) = name.rsplit_once("::").expect("path::test");
        let source = match module.split_once("::") {
            // `lib::a::b::test`: a unit test in src/a/b.rs, src/a/b/mod.rs, or inline in
            // src/a.rs or src/a/mod.rs.
            Some(("lib", path)) => {
                let path = path.replace("::", "/");
                let parent = path.rsplit_once('/').map_or("lib", |(p, _)| p).to_string();
                [
                    format!("{path}.rs"),
                    format!("{path}/mod.rs"),
                    format!("{parent}.rs"),
                    format!("{parent}/mod.rs"),
                ]
                .iter()
                .filter_map(|f| std::fs::read_to_string(root.join("src").join(f)).ok())
                .collect()
            }
            _ => std::fs::read_to_string(root.join("interop-tests").join(format!("{module}.rs")))
                .unwrap_or_default(),
        };
        checked += 1;
        if !source.contains(&format!("fn {test}()")) {
            missing.push(name.to_string());
        }
    }
    assert!(checked > 40, "only {checked} cells read");
    assert!(
        missing.is_empty(),
        "cells name tests that do not exist: {missing:#?}"
    );
}
