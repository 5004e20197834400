use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use hermes_fuzz::TARGETS;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// Files directly in `dir`, sorted; none when it does not exist.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| e.expect("read a corpus directory").path())
            .filter(|p| p.is_file())
            .collect(),
        Err(_) => Vec::new(),
    };
    files.sort();
    files
}

/// Runs every input of `kind` (`corpus` or `regressions`) through its target's harness and
/// names every file that panicked.
fn replay(kind: &str) -> usize {
    let mut failed = Vec::new();
    let mut count = 0;
    for (name, harness) in TARGETS {
        for path in inputs(&fuzz_dir().join(kind).join(name)) {
            let data = std::fs::read(&path).expect("read a corpus file");
            count += 1;
            if catch_unwind(AssertUnwindSafe(|| harness(&data))).is_err() {
                failed.push(path.display().to_string());
            }
        }
    }
    assert!(failed.is_empty(), "harness panicked on: {failed:#?}");
    count
}

#[test]
fn every_corpus_input_runs_clean() {
    for (name, _) in TARGETS {
        let n = inputs(&fuzz_dir().join("corpus").join(name)).len();
        assert!(n > 0, "fuzz/corpus/{name}/ has no seeds");
    }
    replay("corpus");
}

#[test]
fn every_fixed_crash_stays_fixed() {
    replay("regressions");
}
