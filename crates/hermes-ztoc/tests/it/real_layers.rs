//! Real layers: trees of installed Debian packages packed by GNU tar and compressed by the real
//! gzip and zstd tools, indexed end to end and read back file by file.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::roundtrip::check_layer;

fn require(tool: &str) {
    let ok = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    assert!(
        ok.is_ok_and(|s| s.success()),
        "{tool} is required for the real-layer tests: run scripts/install-deps.sh (apt-get install tar gzip zstd)"
    );
}

/// Files installed by a few Debian packages (`dpkg -L`), existing regular files, dirs and links.
fn package_files(packages: &[&str]) -> Vec<String> {
    let out = Command::new("dpkg")
        .arg("-L")
        .args(packages)
        .output()
        .expect("dpkg -L: is this Debian?");
    assert!(
        out.status.success(),
        "dpkg -L {packages:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut files: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('/') && l.len() > 1)
        .filter(|l| Path::new(l).symlink_metadata().is_ok())
        .map(|l| l.trim_start_matches('/').to_owned())
        .collect();
    files.sort();
    files.dedup();
    assert!(
        files.len() > 100,
        "expected a real package tree, got {} paths",
        files.len()
    );
    files
}

/// `tar -c` of the paths (relative to /), without recursing into directories.
fn gnu_tar(paths: &[String], format: &str, dir: &Path) -> Vec<u8> {
    let list = dir.join(format!("files-{format}"));
    std::fs::write(&list, paths.join("\n")).expect("file list");
    let out = Command::new("tar")
        .args([
            "-C",
            "/",
            "--no-recursion",
            &format!("--format={format}"),
            "-cf",
            "-",
            "-T",
        ])
        .arg(&list)
        .output()
        .expect("tar");
    assert!(
        out.status.success(),
        "tar failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn pipe(tool: &str, args: &[&str], input: &[u8], dir: &Path) -> Vec<u8> {
    let path = dir.join("pipe-input");
    std::fs::write(&path, input).expect("write");
    let out = Command::new(tool)
        .args(args)
        .stdin(std::fs::File::open(&path).expect("open"))
        .output()
        .expect(tool);
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn debian_package_trees_index_and_read_back() {
    for tool in ["tar", "gzip", "zstd", "dpkg"] {
        require(tool);
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let files = package_files(&["coreutils", "bash", "tar"]);
    for format in ["gnu", "posix"] {
        let tar = gnu_tar(&files, format, dir.path());
        assert!(
            tar.len() > 5 << 20,
            "{format}: layer of {} bytes is too small to be real",
            tar.len()
        );

        let gz = pipe("gzip", &["-6", "-n", "-c"], &tar, dir.path());
        let ztoc = check_layer(&tar, &gz, 1 << 20);
        assert!(
            ztoc.span_count() > 3,
            "{format}.gz: {} spans",
            ztoc.span_count()
        );

        check_layer(&tar, &tar, 1 << 20);

        // The zstd tool writes one frame: not seekable. Frames written separately and
        // concatenated (as chunked zstd writers do) are.
        let single = pipe("zstd", &["-3", "-q", "-c"], &tar, dir.path());
        assert!(matches!(
            hermes_ztoc::build(single.as_slice(), &crate::support::options(1 << 20)),
            Err(hermes_ztoc::Error::ZstdNotSeekable)
        ));
        let mut multi = Vec::new();
        for chunk in tar.chunks(2 << 20) {
            multi.extend(pipe("zstd", &["-3", "-q", "-c"], chunk, dir.path()));
        }
        check_layer(&tar, &multi, 1 << 20);
    }
}
