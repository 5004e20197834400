//! `hermes layer mount`: a layer read lazily from a real registry through FUSE.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use hermes_testkit::{FaultProxy, Registry, TestImage};

#[test]
fn a_mounted_layer_reads_lazily_from_the_registry() {
    let registry = Registry::start().expect("registry");
    let proxy = FaultProxy::start(registry.addr()).expect("proxy");
    let pushed = TestImage::new()
        .file("etc/app.conf", b"threads = 4\n".to_vec())
        .big_file("models/weights.bin", 8)
        .push(&registry.host(), "lazy/app:v1")
        .expect("push");
    let image = format!("{}/lazy/app:v1", proxy.host());
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, cache, mnt) = (
        dir.path().join("store"),
        dir.path().join("cache"),
        dir.path().join("mnt"),
    );
    std::fs::create_dir(&mnt).expect("mnt");
    let hermes = env!("CARGO_BIN_EXE_hermes");
    let built = Command::new(hermes)
        .args([
            "index",
            "build",
            &image,
            "--plain-http",
            "--min-layer-size",
            "0",
            "--span-size",
            "256KiB",
            "--store",
        ])
        .arg(&store)
        .output()
        .expect("index build");
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    proxy.clear_log();

    let mut child = Command::new(hermes)
        .args(["layer", "mount", &image])
        .arg(&mnt)
        .arg("--store")
        .arg(&store)
        .arg("--cache")
        .arg(&cache)
        .arg("--plain-http")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mount");
    let mut first = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut first)
        .expect("read");
    assert!(
        first.starts_with("mounted "),
        "{first:?} (is /dev/fuse there and are we root?)"
    );

    let layer = pushed
        .layers
        .iter()
        .find(|l| l.files.contains_key("models/weights.bin"))
        .expect("layer");
    let conf = std::fs::read(mnt.join("etc/app.conf")).expect("read a small file");
    assert_eq!(conf, layer.files["etc/app.conf"]);
    let blob_gets: Vec<_> = proxy
        .log()
        .into_iter()
        .filter(|l| l.path.contains("/blobs/"))
        .collect();
    assert!(
        !blob_gets.is_empty() && blob_gets.iter().all(|l| l.range.is_some()),
        "only range reads: {blob_gets:?}"
    );
    let weights = std::fs::read(mnt.join("models/weights.bin")).expect("read the big file");
    assert!(
        weights == layer.files["models/weights.bin"],
        "big file differs"
    );

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let status = child.wait().expect("wait");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("stderr");
    assert!(status.success(), "clean exit on SIGTERM: {stderr}");
    assert!(stderr.contains("unmounted; fetched"), "{stderr}");
    let mounts = std::fs::read_to_string("/proc/mounts").expect("mounts");
    assert!(
        !mounts.contains(mnt.to_str().expect("utf8")),
        "mount left behind"
    );
}
