//! `hermes index build|info` against a real registry.

use std::path::Path;
use std::process::{Command, Output};

use hermes_testkit::{Registry, TestImage};

fn hermes(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hermes"))
        .args(args)
        .env_remove("HERMES_STORE")
        .env("HOME", "/nonexistent")
        .output()
        .expect("run hermes")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn build_then_info_matches_the_layers() {
    let registry = Registry::start().expect("registry");
    let pushed = TestImage::new()
        .file("etc/motd", b"hi".to_vec())
        .layer()
        .big_file("srv/data.bin", 3)
        .push(&registry.host(), "cli/app:v1")
        .expect("push");
    let store = tempfile::tempdir().expect("tempdir");
    let s = store.path().to_str().unwrap();
    let run = hermes(&[
        "index",
        "build",
        &pushed.reference,
        "--plain-http",
        "--store",
        s,
        "--min-layer-size",
        "1MiB",
        "--span-size",
        "1MiB",
        "--json",
    ]);
    assert!(run.status.success(), "build failed: {}", text(&run.stderr));
    let progress = text(&run.stderr);
    assert!(
        progress.contains("skipped: ") && progress.contains("indexed in "),
        "per-layer lines: {progress}"
    );
    assert!(
        progress.contains("1 of 2 layers indexed"),
        "summary: {progress}"
    );

    let info = hermes(&["index", "info", &pushed.reference, "--store", s, "--json"]);
    assert!(info.status.success(), "{}", text(&info.stderr));
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).expect("json");
    assert_eq!(v["manifestDigest"], pushed.manifest_digest.as_str());
    let layers = v["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), pushed.layers.len());
    for (l, want) in layers.iter().zip(&pushed.layers) {
        assert_eq!(l["digest"], want.digest.as_str());
        assert_eq!(l["size"], want.size);
        let status = if want.size >= 1 << 20 {
            "indexed"
        } else {
            "skipped"
        };
        assert_eq!(l["outcome"]["status"], status, "{l}");
    }
    let listing = hermes(&["index", "info", s]);
    assert!(
        listing.status.success() && text(&listing.stdout).contains(&pushed.manifest_digest),
        "{}",
        text(&listing.stdout)
    );
}

fn assert_clean_failure(args: &[&str], store: &Path, expect: &str) {
    let run = hermes(args);
    assert!(!run.status.success(), "{args:?} must fail");
    let err = text(&run.stderr);
    let line = err
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line in {err}"));
    assert!(
        line.contains(expect),
        "{args:?}: expected {expect:?} in {line:?}"
    );
    assert_eq!(
        err.lines().filter(|l| l.starts_with("error")).count(),
        1,
        "one error line: {err}"
    );
    assert!(!store.exists(), "{args:?} left {} behind", store.display());
}

#[test]
fn bad_input_fails_with_one_clear_line_and_leaves_nothing() {
    let mut registry = Registry::start().expect("registry");
    let pushed = TestImage::new()
        .file("a", b"a".to_vec())
        .push(&registry.host(), "bad/app:v1")
        .expect("push");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let s = store.to_str().unwrap();
    let host = registry.host();
    assert_clean_failure(
        &[
            "index",
            "build",
            &format!("{host}/bad/nothere:v1"),
            "--plain-http",
            "--store",
            s,
        ],
        &store,
        "not found",
    );
    assert_clean_failure(
        &[
            "index",
            "build",
            &pushed.reference,
            "--plain-http",
            "--store",
            s,
            "--platform",
            "linux/arm64",
        ],
        &store,
        "no image for platform linux/arm64",
    );
    assert_clean_failure(
        &[
            "index",
            "build",
            &pushed.reference,
            "--plain-http",
            "--store",
            s,
            "--platform",
            "arm64",
        ],
        &store,
        "is not OS/ARCH",
    );
    assert_clean_failure(
        &["index", "build", "Bad Ref", "--store", s],
        &store,
        "invalid image reference",
    );
    registry.stop();
    assert_clean_failure(
        &[
            "index",
            "build",
            &pushed.reference,
            "--plain-http",
            "--store",
            s,
        ],
        &store,
        "cannot reach registry",
    );
    assert_clean_failure(
        &["index", "info", &pushed.reference, "--store", s],
        &store,
        "hermes index build",
    );
}

#[test]
fn indexing_a_manifest_under_a_second_name_keeps_the_first_indexed() {
    let registry = Registry::start().expect("registry");
    let image = TestImage::new().file("etc/motd", b"hi".to_vec());
    let first = image.push(&registry.host(), "cli/alias:v1").expect("push");
    let second = image
        .push(&registry.host(), "cli/alias:latest")
        .expect("push");
    assert_eq!(
        first.manifest_digest, second.manifest_digest,
        "one manifest under two names"
    );
    let store = tempfile::tempdir().expect("tempdir");
    let s = store.path().to_str().unwrap();
    for name in [&first.reference, &second.reference] {
        let run = hermes(&["index", "build", name, "--plain-http", "--store", s]);
        assert!(run.status.success(), "{name}: {}", text(&run.stderr));
    }
    for name in [&first.reference, &second.reference] {
        let info = hermes(&["index", "info", name, "--store", s, "--json"]);
        assert!(
            info.status.success(),
            "{name} is still indexed: {}",
            text(&info.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&info.stdout).expect("json");
        assert_eq!(v["manifestDigest"], first.manifest_digest.as_str());
    }
}
