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

/// Every seed, minimised fuzzer find and fixed crash (`fuzz/corpus/TARGET/*`; fixed crashes
/// are committed there as `crash-*`) runs through its target's harness without a panic or an
/// abort; each target has seeds.
#[test]
fn every_corpus_input_runs_clean() {
    let mut failed = Vec::new();
    for (name, harness) in TARGETS {
        let files = inputs(&fuzz_dir().join("corpus").join(name));
        assert!(!files.is_empty(), "fuzz/corpus/{name}/ has no seeds");
        for path in files {
            let data = std::fs::read(&path).expect("read a corpus file");
            if catch_unwind(AssertUnwindSafe(|| harness(&data))).is_err() {
                failed.push(path.display().to_string());
            }
        }
    }
    assert!(failed.is_empty(), "harness panicked on: {failed:#?}");
}
