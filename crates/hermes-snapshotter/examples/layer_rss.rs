//! Memory of mounted layers: pushes 20 generated layers (1,000 to 20,000 small files each) to a
//! local registry, indexes them with `hermes index build`, starts one real per-layer server
//! (`hermes layer serve` with the node daemon's [`SERVER_ENV`](hermes_snapshotter::SERVER_ENV))
//! for each, walks every mount (stat of every
//! file, a few reads), then prints each server's resident memory, per 1,000 entries, and the
//! least-squares base and slope over all 20.
//!
//!   cargo run --release -p hermes-snapshotter --example layer_rss -- HERMES_BINARY [LAYERS]
//!
//! Root, FUSE, `docker-registry` and `skopeo` are needed (scripts/install-deps.sh).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hermes_oci::{LayerOutcome, Store};
use hermes_testkit::{Registry, TestImage};

/// One mounted layer's server; killed and unmounted on drop.
struct Server {
    child: Child,
    mountpoint: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        // The server unmounts on SIGTERM, as when the node daemon stops it.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        if mounted(&self.mountpoint) {
            let _ = Command::new("umount").arg(&self.mountpoint).status();
        }
    }
}

fn mounted(path: &Path) -> bool {
    std::fs::read_to_string("/proc/mounts")
        .map(|m| {
            m.lines()
                .any(|l| l.split(' ').nth(1) == Some(path.to_str().unwrap_or("")))
        })
        .unwrap_or(false)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Stat everything under `dir`; read the first bytes of every 97th file.
fn walk(dir: &Path, seen: &mut u64) {
    for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let meta = e.metadata().expect("stat");
        *seen += 1;
        if meta.is_dir() {
            walk(&e.path(), seen);
        } else if (*seen).is_multiple_of(97) {
            let _ = std::fs::read(e.path()).expect("read");
        }
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let hermes = PathBuf::from(
        args.next()
            .expect("usage: layer_rss HERMES_BINARY [LAYERS]"),
    );
    let layers: usize = args.next().map_or(20, |n| n.parse().expect("LAYERS"));
    let registry = Registry::start().expect("registry (docker-registry)");
    let dir = tempfile::tempdir().expect("tempdir");
    let store_dir = dir.path().join("store");

    let mut image = TestImage::new();
    for l in 0..layers {
        if l > 0 {
            image = image.layer();
        }
        let files = 1000 * (l + 1);
        for i in 0..files {
            // Paths like a real tree: a few levels of directories, names of typical length.
            let path = format!(
                "usr/lib/python3/site-packages/pkg{l}_{}/module_{}/file_{i:06}.py",
                i % 37,
                i % 11
            );
            image = image.file(&path, format!("# layer {l} file {i}\n").repeat(1 + i % 5));
        }
    }
    let pushed = image.push(&registry.host(), "rss/layers:v1").expect("push");
    let status = Command::new(&hermes)
        .args(["index", "build", &pushed.reference, "--plain-http"])
        .args(["--min-layer-size", "0", "--store"])
        .arg(&store_dir)
        .stdout(Stdio::null())
        .status()
        .expect("hermes index build");
    assert!(status.success(), "index build failed");
    let store = Store::open(&store_dir).expect("store");
    let record = store
        .images()
        .expect("images")
        .into_iter()
        .next()
        .expect("indexed");

    let mut servers = Vec::new();
    for (i, layer) in record.layers.iter().enumerate() {
        let LayerOutcome::Indexed { ztoc, entries, .. } = &layer.outcome else {
            panic!("layer {i} was not indexed");
        };
        let ztoc_file = dir.path().join(format!("{i}.ztoc"));
        let bytes = store.get_blob(ztoc).expect("store").expect("zTOC blob");
        std::fs::write(&ztoc_file, bytes).expect("write zTOC");
        let mountpoint = dir.path().join(format!("mnt{i}"));
        std::fs::create_dir(&mountpoint).expect("mkdir");
        let child = Command::new(&hermes)
            .envs(hermes_snapshotter::SERVER_ENV.iter().copied())
            .args(["layer", "serve", "--plain-http", "--ztoc"])
            .arg(&ztoc_file)
            .args([
                "--image",
                &pushed.reference,
                "--layer",
                layer.digest.as_str(),
            ])
            .arg("--cache")
            .arg(dir.path().join(format!("cache{i}")))
            .arg("--stats")
            .arg(dir.path().join(format!("stats{i}.json")))
            .arg(&mountpoint)
            .stdout(Stdio::null())
            .spawn()
            .expect("hermes layer serve");
        servers.push((
            *entries,
            Server {
                child,
                mountpoint: mountpoint.clone(),
            },
        ));
        let deadline = Instant::now() + Duration::from_secs(60);
        while !mounted(&mountpoint) {
            assert!(Instant::now() < deadline, "layer {i} never mounted");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let mut rows = Vec::new();
    for (entries, server) in &servers {
        let mounted_kib = rss_kib(server.child.id());
        let mut seen = 0;
        walk(&server.mountpoint, &mut seen);
        rows.push((*entries, seen, server.child.id(), mounted_kib));
    }
    println!(
        "| layer entries | inodes walked | RSS once mounted (MiB) | RSS after the walk (MiB) | MiB per 1,000 entries |"
    );
    println!("|---:|---:|---:|---:|---:|");
    let mut points = Vec::new();
    for (entries, seen, pid, mounted_kib) in rows {
        let mib = rss_kib(pid) as f64 / 1024.0;
        points.push((entries as f64 / 1000.0, mib));
        println!(
            "| {entries} | {seen} | {:.1} | {mib:.1} | {:.2} |",
            mounted_kib as f64 / 1024.0,
            mib / (entries as f64 / 1000.0)
        );
    }
    let n = points.len() as f64;
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let slope = points.iter().map(|(x, y)| (x - mx) * (y - my)).sum::<f64>()
        / points.iter().map(|(x, _)| (x - mx).powi(2)).sum::<f64>();
    let total: f64 = points.iter().map(|(_, y)| y).sum();
    println!(
        "\n{} servers, {total:.0} MiB in all; fit: base {:.1} MiB + {slope:.2} MiB per 1,000 entries",
        points.len(),
        my - slope * mx
    );
}
