//! `hermes ztoc build|info|ls|extract` on soci's reference layers.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn hermes(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hermes"))
        .args(args)
        .output()
        .expect("run hermes")
}

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../hermes-ztoc/tests/data/soci")
        .join(name)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn build_writes_socis_bytes_and_info_describes_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("gnu.ztoc");
    let layer = data("gnu.tar.gz");
    let run = hermes(&[
        "ztoc",
        "build",
        layer.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--span-size",
        "64KiB",
    ]);
    assert!(run.status.success(), "build failed: {}", text(&run.stderr));
    let golden = std::fs::read(data("gnu.tar.gz.65536.ztoc")).expect("golden");
    assert!(
        std::fs::read(&out).expect("output") == golden,
        "hermes ztoc build differs from soci's zTOC"
    );
    // The digest is hashed as the zTOC streams out: it must be the written file's.
    let written = {
        use sha2::Digest;
        let hash = sha2::Sha256::digest(std::fs::read(&out).expect("output"));
        format!(
            "sha256:{}",
            hash.iter().map(|b| format!("{b:02x}")).collect::<String>()
        )
    };
    assert_eq!(text(&run.stdout).trim(), written, "prints the zTOC digest");
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .expect("dir")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        left,
        [std::ffi::OsString::from("gnu.ztoc")],
        "only the zTOC is left"
    );

    let info = hermes(&["ztoc", "info", "--json", out.to_str().unwrap()]);
    assert!(info.status.success(), "{}", text(&info.stderr));
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).expect("json");
    assert_eq!(v["version"], "0.9");
    assert_eq!(v["compression"], "gzip");
    assert_eq!(v["spanSize"], 65536);
    assert_eq!(
        v["compressedArchiveSize"],
        std::fs::metadata(&layer).unwrap().len()
    );
    assert_eq!(
        v["spanCount"],
        v["spanCount"]
            .as_u64()
            .filter(|&n| n > 10)
            .expect("many spans")
    );
}

#[test]
fn ls_lists_like_tar_and_extract_reads_few_bytes() {
    let ztoc = data("pax.tar.gz.65536.ztoc");
    let layer = data("pax.tar.gz");
    let ls = hermes(&["ztoc", "ls", ztoc.to_str().unwrap()]);
    assert!(ls.status.success(), "{}", text(&ls.stderr));
    let listing = text(&ls.stdout);
    let first_file = listing
        .lines()
        .find(|l| l.starts_with("-rw"))
        .and_then(|l| l.split_whitespace().last())
        .expect("a regular file in the listing")
        .to_owned();
    assert!(
        listing.lines().any(|l| l.starts_with('d')),
        "directories listed"
    );

    let want = Command::new("tar")
        .args(["-xzOf", layer.to_str().unwrap(), &first_file])
        .output()
        .expect("tar");
    assert!(
        want.status.success(),
        "tar -x {first_file}: {}",
        text(&want.stderr)
    );
    let got = hermes(&[
        "ztoc",
        "extract",
        ztoc.to_str().unwrap(),
        layer.to_str().unwrap(),
        &first_file,
    ]);
    assert!(got.status.success(), "{}", text(&got.stderr));
    assert!(
        got.stdout == want.stdout,
        "extracted bytes differ from tar's"
    );
    let note = text(&got.stderr);
    let read: u64 = note
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("bytes read reported");
    assert!(
        read < std::fs::metadata(&layer).unwrap().len() / 4,
        "read {read} bytes: {note}"
    );
}

#[test]
fn errors_are_clear() {
    let dir = tempfile::tempdir().expect("tempdir");
    let junk = dir.path().join("junk");
    std::fs::write(&junk, b"not a ztoc at all").expect("write");
    let run = hermes(&["ztoc", "info", junk.to_str().unwrap()]);
    assert!(!run.status.success());
    assert!(
        text(&run.stderr).contains("is not a usable zTOC"),
        "{}",
        text(&run.stderr)
    );

    let ztoc = data("pax.tar.gz.65536.ztoc");
    let wrong_layer = data("gnu.tar.gz");
    let run = hermes(&[
        "ztoc",
        "extract",
        ztoc.to_str().unwrap(),
        wrong_layer.to_str().unwrap(),
        "x",
    ]);
    assert!(!run.status.success());
    assert!(
        text(&run.stderr).contains("wrong layer"),
        "{}",
        text(&run.stderr)
    );

    let run = hermes(&["ztoc", "build", "--span-size", "4 parsecs", "x"]);
    assert!(!run.status.success());
    assert!(
        text(&run.stderr).contains("unknown size unit"),
        "{}",
        text(&run.stderr)
    );
}

#[test]
fn a_failed_build_leaves_no_output_and_no_temp_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let layer = std::fs::read(data("gnu.tar.gz")).expect("layer");
    let cut = dir.path().join("cut.tar.gz");
    std::fs::write(&cut, &layer[..layer.len() / 2]).expect("write");
    let out = dir.path().join("cut.ztoc");
    let run = hermes(&[
        "ztoc",
        "build",
        cut.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--span-size",
        "64KiB",
    ]);
    assert!(!run.status.success());
    assert!(
        text(&run.stderr).contains("cannot index layer") && text(&run.stderr).contains("truncated"),
        "{}",
        text(&run.stderr)
    );
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .expect("dir")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        left,
        [std::ffi::OsString::from("cut.tar.gz")],
        "nothing but the layer is left"
    );
}
