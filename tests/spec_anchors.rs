//! Every spec reference in the code, the interop tests and the benchmarks
//! (`file.md#anchor`) points at an anchor that exists in `protocol-spec/`, so citations
//! cannot rot silently.

use std::path::Path;

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn every_spec_reference_in_the_code_resolves() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in ["src", "interop-tests", "benches"] {
        rust_files(&root.join(dir), &mut files);
    }
    let mut checked = 0;
    let mut missing = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for (i, _) in text.match_indices(".md#") {
            let start = text[..i]
                .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
                .map_or(0, |s| s + 1);
            let end = text[i + 4..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                .map_or(text.len(), |e| i + 4 + e);
            let (file, anchor) = (&text[start..i + 3], &text[i + 4..end]);
            let spec =
                std::fs::read_to_string(root.join("protocol-spec").join(file)).unwrap_or_default();
            checked += 1;
            if !spec.contains(&format!("id=\"{anchor}\"")) {
                missing.push(format!("{}: {file}#{anchor}", f.display()));
            }
        }
    }
    assert!(checked > 50, "only {checked} references found");
    assert!(
        missing.is_empty(),
        "unresolved spec references:\n{}",
        missing.join("\n")
    );
}
