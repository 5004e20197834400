//! `hermes node`, the node daemon, as a real process: lazy layers from its zTOC store and a real
//! registry, containers' rootfs as real overlay mounts over them, `kill -9` and restart, fallback,
//! metrics.

use std::collections::HashMap;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hermes_node_api::labels::{CRI_IMAGE_REF, CRI_LAYER_DIGEST, CRI_MANIFEST_DIGEST, SNAPSHOT_REF};
use hermes_snapshotter::api::containerd::services::snapshots::v1 as pb;
use hermes_testkit::{FaultProxy, Flavour, PushedImage, Registry, SparseFormat, TestImage};

use crate::node_api::Controller;

const HERMES: &str = env!("CARGO_BIN_EXE_hermes");

pub(crate) fn require_root() {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1));
    assert_eq!(
        uid,
        Some("0"),
        "the node daemon mounts FUSE and overlayfs: run tests as root"
    );
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: load the fuse module (modprobe fuse)"
    );
}

/// Incompressible bytes, so a file spans many zTOC spans (span sizes count compressed bytes).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A `hermes node` process with its own root, socket and metrics port; stopped and everything
/// it mounted taken down on drop.
pub(crate) struct Node {
    root: PathBuf,
    pub(crate) socket: PathBuf,
    metrics: u16,
    extra: Vec<String>,
    child: Option<Child>,
    stderr: PathBuf,
}

impl Node {
    pub(crate) fn start(dir: &Path, extra: &[&str]) -> Node {
        std::fs::create_dir_all(dir).expect("node dir");
        let mut node = Node {
            root: dir.join("node"),
            socket: dir.join("hermes.sock"),
            metrics: free_port(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
            stderr: dir.join("node.log"),
        };
        node.spawn();
        node
    }

    pub(crate) fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr)
            .expect("node log");
        // Started under umask 000: what the node writes must be private whatever the umask.
        let child = Command::new("sh")
            .args(["-c", r#"umask 000 && exec "$0" "$@""#, HERMES])
            .arg("node")
            .arg("--root")
            .arg(&self.root)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--metrics")
            .arg(format!("127.0.0.1:{}", self.metrics))
            .args(&self.extra)
            // The snapshots server logs the label names of each Prepare at debug.
            .env("RUST_LOG", "info,hermes_snapshotter::server=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start hermes node");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("hermes node exited ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "node never listened:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The label names of every Prepare the daemon got, in order (its debug log says them).
    pub(crate) fn prepare_labels(&self) -> Vec<Vec<String>> {
        self.log()
            .lines()
            .filter(|l| l.contains(" prepare "))
            .filter_map(|l| l.split(" labels=").nth(1))
            .map(|names| {
                let names = names.split_whitespace().next().unwrap_or("");
                names
                    .split(',')
                    .filter(|n| !n.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .collect()
    }

    /// Waits until the daemon's log says `needle` (it may print just after its socket listens).
    pub(crate) fn wait_log(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !self.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "the node never logged {needle:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The daemon's log and every layer server's.
    pub(crate) fn logs(&self) -> String {
        let mut out = self.log();
        if let Ok(entries) = std::fs::read_dir(self.root.join("layers")) {
            for e in entries.flatten() {
                out += &format!("--- {}\n", e.path().display());
                out += &std::fs::read_to_string(e.path().join("serve.log")).unwrap_or_default();
            }
        }
        out
    }

    pub(crate) fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("kill -9");
            c.wait().expect("reap");
        }
    }

    fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub(crate) fn metrics(&self) -> String {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.metrics)).expect("metrics");
        use std::io::Write;
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read metrics");
        out
    }

    /// Polls `/metrics` until `ok` holds (layer servers report every half second).
    fn wait_metrics(&self, ok: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let m = self.metrics();
            if ok(&m) {
                return;
            }
            assert!(Instant::now() < deadline, "metrics never matched:\n{m}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn layer_pids(&self) -> Vec<u32> {
        let mut pids = Vec::new();
        for e in std::fs::read_dir(self.root.join("layers"))
            .expect("layers dir")
            .flatten()
        {
            let state: serde_json::Value = serde_json::from_slice(
                &std::fs::read(e.path().join("state.json")).expect("layer state"),
            )
            .expect("state json");
            pids.push(state["pid"].as_u64().expect("pid") as u32);
        }
        pids
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
        let _ = Command::new(HERMES)
            .args(["node", "--unmount-all", "--root"])
            .arg(&self.root)
            .status();
    }
}

/// Sum of a metric's samples whose line contains every `parts`.
pub(crate) fn metric(text: &str, name: &str, parts: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && parts.iter().all(|p| l.contains(p)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

struct Rootfs {
    path: PathBuf,
}

impl Drop for Rootfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}

/// Mount what the snapshotter answered for an active snapshot, as containerd would.
fn mount_rootfs(mounts: &[hermes_snapshotter::api::containerd::types::Mount], at: &Path) -> Rootfs {
    std::fs::create_dir_all(at).expect("rootfs dir");
    let m = &mounts[0];
    let status = Command::new("mount")
        .args(["-t", &m.r#type, &m.source, "-o", &m.options.join(",")])
        .arg(at)
        .status()
        .expect("mount");
    if !status.success() {
        for o in &m.options {
            if let Some(l) = o.strip_prefix("lowerdir=") {
                for d in l.split(':') {
                    let out = Command::new("stat").args(["-f", d]).output().unwrap();
                    eprintln!(
                        "{d}: {} {}",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    );
                    let out = Command::new("grep")
                        .args([d, "/proc/self/mountinfo"])
                        .output()
                        .unwrap();
                    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
                }
            }
        }
        panic!("mount {m:?}");
    }
    Rootfs {
        path: at.to_owned(),
    }
}

fn labels(image: &PushedImage, layer: usize, chain: &str) -> HashMap<String, String> {
    HashMap::from([
        (SNAPSHOT_REF.to_owned(), chain.to_owned()),
        (
            CRI_LAYER_DIGEST.to_owned(),
            image.layers[layer].digest.clone(),
        ),
        (CRI_IMAGE_REF.to_owned(), image.reference.clone()),
        (
            CRI_MANIFEST_DIGEST.to_owned(),
            image.manifest_digest.clone(),
        ),
    ])
}

/// Prepare every layer as containerd's unpacker does; returns how many were lazy (AlreadyExists).
async fn unpack(socket: &Path, image: &PushedImage, tag: &str) -> usize {
    let mut client = hermes_snapshotter::connect(socket).await.expect("connect");
    let mut parent = String::new();
    let mut lazy = 0;
    for i in 0..image.layers.len() {
        let chain = format!("{tag}-chain-{i}");
        let key = format!("extract-{i} {chain}");
        let r = client
            .prepare(pb::PrepareSnapshotRequest {
                snapshotter: "hermes".into(),
                key: key.clone(),
                parent: parent.clone(),
                labels: labels(image, i, &chain),
            })
            .await;
        match r {
            Err(s) if s.code() == tonic::Code::AlreadyExists => lazy += 1,
            Ok(_) => {
                // A normal pull: containerd would unpack the layer here. Our test layers are
                // small; commit it empty, it is not read below.
                client
                    .commit(pb::CommitSnapshotRequest {
                        snapshotter: "hermes".into(),
                        name: chain.clone(),
                        key,
                        labels: HashMap::new(),
                    })
                    .await
                    .expect("commit");
            }
            Err(s) => panic!("prepare layer {i}: {s}"),
        }
        parent = chain;
    }
    lazy
}

async fn container(
    socket: &Path,
    image: &PushedImage,
    tag: &str,
    name: &str,
) -> Vec<hermes_snapshotter::api::containerd::types::Mount> {
    let mut client = hermes_snapshotter::connect(socket).await.expect("connect");
    client
        .prepare(pb::PrepareSnapshotRequest {
            snapshotter: "hermes".into(),
            key: name.into(),
            parent: format!("{tag}-chain-{}", image.layers.len() - 1),
            labels: HashMap::new(),
        })
        .await
        .expect("container snapshot")
        .into_inner()
        .mounts
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

pub(crate) fn index(image: &str, store: &Path) {
    let out = Command::new(HERMES)
        .args([
            "index",
            "build",
            image,
            "--plain-http",
            "--min-layer-size",
            "0",
        ])
        .args(["--span-size", "256KiB", "--store"])
        .arg(store)
        .output()
        .expect("hermes index build");
    assert!(
        out.status.success(),
        "index build: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn lazy_layers_survive_kill_9_of_the_daemon_and_are_remounted_when_their_servers_die() {
    require_root();
    let registry = Registry::start().expect("registry");
    let pushed = TestImage::new()
        .file("app/run.sh", b"echo started\n".to_vec())
        .big_file("app/model.bin", 6)
        .layer()
        .file("etc/app.conf", b"threads = 4\n".to_vec())
        .big_file("data/table.bin", 4)
        .push(&registry.host(), "node/app:v1")
        .expect("push");
    let dir = tempfile::tempdir().expect("tempdir");
    // zTOCs in the node's own store: the local source.
    index(&pushed.reference, &dir.path().join("node/ztocs"));
    let mut node = Node::start(dir.path(), &["--plain-http", "--no-background-fetch"]);
    let rt = runtime();

    assert_eq!(
        rt.block_on(unpack(&node.socket, &pushed, "a")),
        2,
        "both layers lazy"
    );
    let rootfs = mount_rootfs(
        &rt.block_on(container(&node.socket, &pushed, "a", "c1")),
        &dir.path().join("c1"),
    );
    assert_eq!(
        std::fs::read(rootfs.path.join("app/run.sh")).unwrap(),
        b"echo started\n"
    );
    node.wait_metrics(|m| {
        metric(m, "hermes_node_fetched_bytes_total", &["on_demand"]) > 0.0
            && metric(m, "hermes_node_layers", &["state=\"lazy\""]) == 2.0
            && metric(m, "hermes_node_read_latency_seconds_count", &[]) > 0.0
    });
    // Regression: the layer servers' latency buckets were made cumulative twice (+Inf far above
    // _count). After real reads, every histogram a scraper sees must be consistent.
    let scrape = node.metrics();
    match hermes_testkit::prometheus::check_histograms(&scrape) {
        Ok(n) => assert!(n >= 1, "no histogram in the scrape:\n{scrape}"),
        Err(e) => panic!("{e}\n{scrape}"),
    }

    // The daemon dies: the running container still reads, including data never fetched.
    node.kill9();
    let model = std::fs::read(rootfs.path.join("app/model.bin")).expect("read after kill -9");
    assert!(
        model == pushed.layers[0].files["app/model.bin"],
        "wrong model bytes after kill -9 ({} read)",
        model.len()
    );

    // Back up: the layers are adopted, a new container of the image starts.
    node.spawn();
    node.wait_log("adopted 2, re-mounted 0, failed 0");
    assert_eq!(rt.block_on(unpack(&node.socket, &pushed, "a")), 2);
    let c2 = mount_rootfs(
        &rt.block_on(container(&node.socket, &pushed, "a", "c2")),
        &dir.path().join("c2"),
    );
    assert_eq!(
        std::fs::read(c2.path.join("etc/app.conf")).unwrap(),
        b"threads = 4\n"
    );
    drop(c2);
    drop(rootfs);

    // Layer servers and daemon all die: on restart the layers are mounted again, same paths.
    for pid in node.layer_pids() {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    }
    node.restart();
    node.wait_log("adopted 0, re-mounted 2, failed 0");
    let c3 = mount_rootfs(
        &rt.block_on(container(&node.socket, &pushed, "a", "c3")),
        &dir.path().join("c3"),
    );
    let table = std::fs::read(c3.path.join("data/table.bin")).expect("read after re-mount");
    assert!(
        table == pushed.layers[1].files["data/table.bin"],
        "wrong table bytes after re-mount ({} read)",
        table.len()
    );
}

#[test]
fn without_an_index_or_with_the_controller_down_layers_fall_back_quickly() {
    require_root();
    let registry = Registry::start().expect("registry");
    let pushed = TestImage::new()
        .file("bin/tool", b"#!/bin/sh\n".to_vec())
        .push(&registry.host(), "node/plain:v1")
        .expect("push");
    let dir = tempfile::tempdir().expect("tempdir");
    let closed = free_port();
    let controller = format!("http://127.0.0.1:{closed}");
    let node = Node::start(dir.path(), &["--plain-http", "--controller", &controller]);
    let rt = runtime();
    let started = Instant::now();
    assert_eq!(
        rt.block_on(unpack(&node.socket, &pushed, "p")),
        0,
        "normal pull"
    );
    let took = started.elapsed();
    let m = node.metrics();
    assert_eq!(
        metric(
            &m,
            "hermes_node_index_lookups_total",
            &["controller", "failed"]
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "hermes_node_lazy_misses_total", &["source_failed"]),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "hermes_node_fallbacks_total", &["remote_error"]),
        1.0,
        "{m}"
    );
    // The controller timeout is 2 s; a refused connection must not take anywhere near that
    // long per layer, let alone hang the pull.
    assert!(took < Duration::from_secs(10), "fallback took {took:?}");
}

/// An image pushed to a registry and read through a fault proxy, indexed, its one layer
/// mounted lazily by a node without background fetch, and a container's rootfs over it.
/// Fields drop in order: the rootfs is unmounted before the node stops.
struct LazyBehindProxy {
    rootfs: Rootfs,
    node: Node,
    proxy: FaultProxy,
    pushed: PushedImage,
    _dir: tempfile::TempDir,
    _registry: Registry,
}

impl LazyBehindProxy {
    fn start(image: TestImage, name: &str, tag: &str) -> LazyBehindProxy {
        let registry = Registry::start().expect("registry");
        let proxy = FaultProxy::start(registry.addr()).expect("proxy");
        let pushed = image.push(&registry.host(), name).expect("push");
        let image = PushedImage {
            reference: format!("{}/{name}", proxy.host()),
            ..pushed.clone()
        };
        let dir = tempfile::tempdir().expect("tempdir");
        index(&image.reference, &dir.path().join("node/ztocs"));
        let node = Node::start(dir.path(), &["--plain-http", "--no-background-fetch"]);
        let rt = runtime();
        assert_eq!(rt.block_on(unpack(&node.socket, &image, tag)), 1);
        let rootfs = mount_rootfs(
            &rt.block_on(container(&node.socket, &image, tag, "c")),
            &dir.path().join("c"),
        );
        LazyBehindProxy {
            rootfs,
            node,
            proxy,
            pushed,
            _dir: dir,
            _registry: registry,
        }
    }
}

#[test]
fn a_registry_that_dies_after_start_keeps_fetched_data_served_and_fails_missing_reads_with_eio() {
    require_root();
    let s = LazyBehindProxy::start(
        TestImage::new()
            .file("app/hot.txt", b"hot\n".to_vec())
            .file("app/cold.bin", noise(3 << 20, 7)),
        "node/dies:v1",
        "d",
    );
    assert_eq!(
        std::fs::read(s.rootfs.path.join("app/hot.txt")).unwrap(),
        b"hot\n"
    );

    // Every later request is refused, as when the registry is gone.
    s.proxy
        .push(hermes_testkit::FaultRule::new("/v2/", hermes_testkit::Fault::Reset).times(u32::MAX));
    assert_eq!(
        std::fs::read(s.rootfs.path.join("app/hot.txt")).unwrap(),
        b"hot\n",
        "cached data"
    );
    let started = Instant::now();
    let err = match std::fs::read(s.rootfs.path.join("app/cold.bin")) {
        Ok(b) => panic!(
            "read {} bytes with the registry gone:\n{}\n{:?}",
            b.len(),
            s.node.logs(),
            s.proxy.log()
        ),
        Err(e) => e,
    };
    assert_eq!(err.raw_os_error(), Some(5), "EIO, got {err}");
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn a_span_tampered_with_in_the_registry_is_never_served() {
    require_root();
    let s = LazyBehindProxy::start(
        TestImage::new()
            .file("app/weights.bin", noise(1 << 20, 1))
            .file("app/more.bin", noise(2 << 20, 2)),
        "node/tampered:v1",
        "t",
    );
    // One tampered answer: the span fails verification, is fetched again, and only the good
    // bytes are served.
    s.proxy.push(hermes_testkit::FaultRule::new(
        "/blobs/",
        hermes_testkit::Fault::Corrupt { at: 100 },
    ));
    let read = std::fs::read(s.rootfs.path.join("app/weights.bin")).expect("read after a refetch");
    assert!(
        read == s.pushed.layers[0].files["app/weights.bin"],
        "wrong bytes served ({} bytes read)",
        read.len()
    );
    // Tampered every time: the layer is broken and reads fail; wrong bytes are never served.
    s.proxy.push(
        hermes_testkit::FaultRule::new("/blobs/", hermes_testkit::Fault::Corrupt { at: 100 })
            .times(u32::MAX),
    );
    let err = std::fs::read(s.rootfs.path.join("app/more.bin"))
        .expect_err("tampered bytes are not served");
    assert_eq!(err.raw_os_error(), Some(5), "EIO, got {err}");
    s.node
        .wait_metrics(|m| metric(m, "hermes_node_verify_failures_total", &[]) >= 2.0);
}

#[test]
fn background_fetch_makes_layers_fully_local_and_removing_the_snapshot_stops_the_server() {
    require_root();
    let registry = Registry::start().expect("registry");
    let pushed = TestImage::new()
        .file("app/data.bin", noise(2 << 20, 3))
        .push(&registry.host(), "node/bg:v1")
        .expect("push");
    let dir = tempfile::tempdir().expect("tempdir");
    index(&pushed.reference, &dir.path().join("node/ztocs"));
    let node = Node::start(dir.path(), &["--plain-http"]);
    let rt = runtime();
    assert_eq!(rt.block_on(unpack(&node.socket, &pushed, "b")), 1);
    // Nothing was read, yet the whole layer arrives and is verified.
    node.wait_metrics(|m| {
        metric(m, "hermes_node_layers", &["state=\"fully_local\""]) == 1.0
            && metric(
                m,
                "hermes_node_layer_fully_local_seconds",
                &[&pushed.layers[0].digest],
            ) > 0.0
            && metric(m, "hermes_node_fetched_bytes_total", &["background"]) > 0.0
    });
    let pids = node.layer_pids();
    assert_eq!(pids.len(), 1);

    // containerd removes the image's snapshot: the layer server stops and its mount goes.
    rt.block_on(async {
        let mut client = hermes_snapshotter::connect(&node.socket)
            .await
            .expect("connect");
        client
            .remove(pb::RemoveSnapshotRequest {
                snapshotter: "hermes".into(),
                key: "b-chain-0".into(),
            })
            .await
            .expect("remove");
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{}", pids[0])).exists()
        && !std::fs::read_to_string(format!("/proc/{}/stat", pids[0]))
            .unwrap_or_default()
            .contains(") Z")
    {
        assert!(
            Instant::now() < deadline,
            "layer server {} still runs",
            pids[0]
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(node.root.to_str().unwrap()),
        "a mount under the node root is left:\n{mounts}"
    );
}

/// Regression: under `umask 000` the node's socket was 777 and `metadata.redb` 666, and under
/// the usual 022 any user could read the span caches (decompressed bytes of private images), the
/// zTOCs and the snapshot trees, and reach the lazy mounts. The root is 0700 now (an existing
/// looser root is tightened), everything under it is owner-only, the socket is 0600.
#[test]
fn the_node_root_and_socket_are_private_whatever_the_umask() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    require_root();
    let registry = Registry::start().expect("registry");
    let pushed = TestImage::new()
        .file("app/secret.bin", noise(1 << 20, 11))
        .push(&registry.host(), "node/private:v1")
        .expect("push");
    let dir = tempfile::tempdir().expect("tempdir");
    index(&pushed.reference, &dir.path().join("node/ztocs"));
    // A root an older version (or a loose umask) left readable by all.
    std::fs::set_permissions(
        dir.path().join("node"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let node = Node::start(dir.path(), &["--plain-http"]);
    let rt = runtime();
    assert_eq!(rt.block_on(unpack(&node.socket, &pushed, "p")), 1);
    node.wait_metrics(|m| metric(m, "hermes_node_layers", &["state=\"fully_local\""]) == 1.0);

    let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().mode() & 0o7777;
    assert_eq!(mode(&node.root), 0o700, "node root");
    assert_eq!(mode(&node.socket), 0o600, "snapshotter socket");
    // Regression: snapshot `fs` dirs were 0700 under the node's umask, and a container's root
    // directory is its top `fs` dir: containers running as a non-root user (the controller's
    // own pods under a kubelet) could not exec anything. They are 0755, as in containerd's
    // overlayfs snapshotter; the 0700 node root keeps other host users out.
    rt.block_on(container(&node.socket, &pushed, "p", "p-container"));
    let snapshots = node.root.join("snapshots");
    let fs_dirs: Vec<PathBuf> = std::fs::read_dir(&snapshots)
        .unwrap()
        .flatten()
        .map(|e| e.path().join("fs"))
        .filter(|p| p.exists())
        .collect();
    assert!(
        !fs_dirs.is_empty(),
        "no snapshot under {}",
        snapshots.display()
    );
    for fs_dir in &fs_dirs {
        assert_eq!(
            mode(fs_dir),
            0o755,
            "{} (a container's root dir)",
            fs_dir.display()
        );
    }
    // Everything the node and its layer servers wrote, except what the lazy mounts and snapshot
    // trees show (their modes are the layer's own) and the zTOCs this test put there with
    // `hermes index build` under its own umask: the 0700 root keeps others from reaching them.
    let out = Command::new("find")
        .arg(&node.root)
        .args([
            "-mindepth",
            "1",
            "(",
            "-name",
            "mnt",
            "-o",
            "-name",
            "ztocs",
            "-o",
            "-path",
            "*/snapshots/*/fs",
            ")",
        ])
        .args(["-prune", "-o"])
        .args(["!", "-type", "l", "-perm", "/077", "-printf", "%m %p\n"])
        .output()
        .expect("find");
    let open_to_others = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && open_to_others.is_empty(),
        "files under the node root that others can use:\n{open_to_others}"
    );
    let data = std::fs::read_dir(node.root.join("layers"))
        .unwrap()
        .flatten()
        .map(|e| e.path().join("cache/data"))
        .find(|p| p.exists())
        .expect("a span cache");
    assert!(mode(&data) & 0o077 == 0 && std::fs::metadata(&data).unwrap().uid() == 0);
    // And, as another user would try it:
    let read = Command::new("sh")
        .args([
            "-c",
            r#"exec setpriv --reuid=65534 --regid=65534 --clear-groups cat "$0""#,
        ])
        .arg(&data)
        .output()
        .expect("setpriv");
    assert!(
        !read.status.success(),
        "nobody read the span cache: {} bytes",
        read.stdout.len()
    );
}

/// Every path under `root` with its type, mode, owner, size, link target and content hash,
/// sorted: two trees are the same when these lists are equal.
fn walk(root: &Path) -> Vec<String> {
    let script = r#"cd "$1" && find . -mindepth 1 -printf '%p %y %m %U:%G %s %l\n' | sort && find . -type f -print0 | sort -z | xargs -0r sha256sum"#;
    let out = Command::new("sh")
        .args(["-c", script, "walk"])
        .arg(root)
        .output()
        .expect("walk");
    assert!(
        out.status.success(),
        "walk {}: {}",
        root.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            // Directory sizes depend on the filesystem, not on the image.
            let f: Vec<&str> = l.split(' ').collect();
            if f.get(1) == Some(&"d") {
                format!("{} d {} {}", f[0], f[2], f[3])
            } else {
                l.to_owned()
            }
        })
        .collect()
}

/// A registry and a containerd that pulls from it into its own overlayfs snapshotter.
fn registry_and_containerd(flavour: Flavour) -> (Registry, hermes_testkit::Containerd) {
    let registry = Registry::start().expect("registry");
    let containerd = hermes_testkit::Containerd::builder()
        .flavour(flavour)
        .registry_host(&registry.host())
        .start()
        .expect("containerd");
    (registry, containerd)
}

/// containerd's own pull of `pushed` (the normal path).
fn ctr_pull(
    containerd: &hermes_testkit::Containerd,
    pushed: &PushedImage,
) -> hermes_testkit::Result<String> {
    containerd.ctr(&[
        "images",
        "pull",
        "--plain-http",
        "--snapshotter",
        "overlayfs",
        &pushed.reference,
    ])
}

/// `image` pushed, then unpacked both ways: by containerd's own pull into its overlayfs
/// snapshotter, and lazily by Hermes with every layer indexed (asserted). Returns both trees as
/// [`walk`] lists them: (containerd's, lazy).
fn trees_unpacked_both_ways(
    flavour: Flavour,
    image: &TestImage,
    name: &str,
) -> (Vec<String>, Vec<String>) {
    require_root();
    let (registry, containerd) = registry_and_containerd(flavour);
    let pushed = image
        .push(&registry.host(), &format!("node/{name}:v1"))
        .expect("push");
    let dir = tempfile::tempdir().expect("tempdir");

    ctr_pull(&containerd, &pushed).expect("ctr pull");
    let mut chain = pushed.layers[0].diff_id.clone();
    for l in &pushed.layers[1..] {
        let digest = hermes_oci::Digest::of(format!("{chain} {}", l.diff_id).as_bytes());
        chain = digest.to_string();
    }
    // One call creates the view and prints its mount command: a view is not a GC root, and
    // containerd's collector (scheduled by the pull above) may remove it right after.
    let normal_root = dir.path().join("normal");
    std::fs::create_dir_all(&normal_root).unwrap();
    let mount_cmd = containerd
        .ctr(&[
            "snapshots",
            "--snapshotter",
            "overlayfs",
            "view",
            "--target",
            normal_root.to_str().unwrap(),
            &format!("{name}-view"),
            &chain,
        ])
        .expect("view");
    let status = Command::new("sh")
        .args(["-c", &mount_cmd])
        .status()
        .expect("mount normal");
    assert!(status.success(), "{mount_cmd}");
    let normal = Rootfs { path: normal_root };

    // The lazy path.
    index(&pushed.reference, &dir.path().join("node/ztocs"));
    let node = Node::start(dir.path(), &["--plain-http", "--no-background-fetch"]);
    let rt = runtime();
    assert_eq!(
        rt.block_on(unpack(&node.socket, &pushed, name)),
        pushed.layers.len(),
        "every layer is lazy:\n{}",
        node.log()
    );
    let lazy = mount_rootfs(
        &rt.block_on(container(&node.socket, &pushed, name, &format!("{name}-c"))),
        &dir.path().join("lazy"),
    );
    (walk(&normal.path), walk(&lazy.path))
}

on_each_containerd! {
fn lazy_layers_give_the_same_file_tree_as_containerds_normal_unpack(flavour) {
    let image = TestImage::new()
        .dir("etc")
        .file("etc/app.conf", b"threads = 4\n".to_vec())
        .file("etc/old.conf", b"gone in layer 2\n".to_vec())
        .executable("bin/run", b"#!/bin/sh\necho run\n".to_vec())
        .symlink("bin/start", "run")
        .dir("var/cache/pkgs")
        .file("var/cache/pkgs/a.deb", noise(300 << 10, 5))
        .big_file("models/weights.bin", 5)
        .file("empty", Vec::new())
        .layer()
        .whiteout("etc/old.conf")
        .whiteout("var/cache/pkgs")
        .file("etc/app.conf", b"threads = 8\n".to_vec())
        .file("models/extra.bin", noise(700 << 10, 6))
        .symlink("latest", "models/weights.bin");
    let (want, got) = trees_unpacked_both_ways(flavour, &image, "tree");
    assert!(
        want.iter().any(|l| l.starts_with("./latest l")),
        "{want:#?}"
    );
    assert!(
        !want
            .iter()
            .any(|l| l.contains("old.conf") || l.contains("pkgs")),
        "{want:#?}"
    );
    assert_eq!(
        got, want,
        "lazy tree (left) differs from {flavour}'s unpack (right)"
    );
}
}

on_each_containerd! {
/// Layers that earlier builds refused (falling back) or served differently from containerd:
/// root entries, a PAX global header, sparse files, files and links under symlinked directories.
fn odd_but_valid_layers_give_the_same_file_tree_as_containerds_normal_unpack(flavour) {
    let (a, b, c) = (noise(5000, 7), noise(70 << 10, 8), noise(300, 9));
    let fragments: &[(u64, &[u8])] = &[(0, &a[..]), (1 << 20, &b[..]), ((3 << 20) - 300, &c[..])];
    let image = TestImage::new()
        .global_header("4f6ad3c9e1b2b8a0e9b3f1c0d2e4f6a8b0c2d4e6")
        .root_entry("./")
        .dir("x")
        .file("x/keep", b"hidden by layer 2\n".to_vec())
        .symlink("d", "x")
        .file("d/f", b"written through the link\n".to_vec())
        .symlink("abs", "/y")
        .file("abs/f", b"absolute link target\n".to_vec())
        .symlink("up", "../../z")
        .file("up/f", b"link out of the root\n".to_vec())
        .hardlink("hl", "d/f")
        .sparse_file("sparse/v10", 3 << 20, fragments, SparseFormat::Pax10)
        .sparse_file("sparse/v01", 3 << 20, fragments, SparseFormat::Pax01)
        .sparse_file("sparse/v00", 3 << 20, fragments, SparseFormat::Pax00)
        .sparse_file(
            "sparse/hole-at-end",
            1 << 20,
            &[(4096, &a[..])],
            SparseFormat::Pax10,
        )
        .layer()
        .root_entry("/")
        .symlink("w", "x")
        .whiteout("w/keep")
        .file("w/new", b"layer 2 through its own link\n".to_vec());
    let (want, got) = trees_unpacked_both_ways(flavour, &image, "odd");
    for expected in [
        "./x/f f",
        "./y/f f",
        "./z/f f",
        "./hl f",
        "./x/new f",
        "./d l",
        "./w l",
    ] {
        assert!(
            want.iter().any(|l| l.starts_with(expected)),
            "containerd's tree has {expected}: {want:#?}"
        );
    }
    assert!(
        want.iter()
            .any(|l| l.starts_with("./sparse/v10 f 644 0:0 3145728")),
        "{want:#?}"
    );
    assert!(!want.iter().any(|l| l.contains("keep")), "{want:#?}");
    assert_eq!(
        got, want,
        "lazy tree (left) differs from {flavour}'s unpack (right)"
    );
}
}

on_each_containerd! {
/// containerd's unpacker has no case for the old GNU sparse type: its pull fails. Hermes must
/// not serve such a layer (it falls back, and the normal pull fails the same way).
fn old_gnu_sparse_files_fail_containerds_unpack_and_are_not_served_lazily(flavour) {
    require_root();
    let (registry, containerd) = registry_and_containerd(flavour);
    let pushed = TestImage::new()
        .file("a", b"plain layer\n".to_vec())
        .layer()
        .sparse_file("s", 1 << 20, &[(4096, b"data")], SparseFormat::OldGnu)
        .push(&registry.host(), "node/oldgnu:v1")
        .expect("push");
    let err = ctr_pull(&containerd, &pushed).expect_err("containerd cannot unpack type 'S'");
    assert!(
        err.to_string().contains("unhandled tar header type 83"),
        "{err}"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    index(&pushed.reference, &dir.path().join("node/ztocs"));
    let node = Node::start(dir.path(), &["--plain-http", "--no-background-fetch"]);
    assert_eq!(
        runtime().block_on(unpack(&node.socket, &pushed, "oldgnu")),
        1,
        "only the plain layer is lazy"
    );
}
}

#[test]
fn startup_reads_are_recorded_merged_by_the_controller_and_prefetched_on_the_next_node() {
    require_root();
    let registry = Registry::start().expect("registry");
    let pushed = TestImage::new()
        .file("app/start.py", b"import model\n".to_vec())
        .file("app/unused.bin", noise(2 << 20, 8))
        .file("app/model.bin", noise(1 << 20, 9))
        .push(&registry.host(), "node/replay:v1")
        .expect("push");
    let dir = tempfile::tempdir().expect("tempdir");
    let ctrl_store = dir.path().join("controller");
    index(&pushed.reference, &ctrl_store);
    let controller = Controller::start(&ctrl_store);
    let flags = [
        "--plain-http",
        "--no-background-fetch",
        "--trace-window",
        "1",
        "--controller",
        &controller.url,
    ];
    let layer = &pushed.layers[0].digest;

    // First node: the container reads its startup files; the trace goes to the controller.
    let first = Node::start(&dir.path().join("first"), &flags);
    let rt = runtime();
    assert_eq!(
        rt.block_on(unpack(&first.socket, &pushed, "r")),
        1,
        "lazy from the controller"
    );
    let rootfs = mount_rootfs(
        &rt.block_on(container(&first.socket, &pushed, "r", "c")),
        &dir.path().join("c"),
    );
    let model = std::fs::read(rootfs.path.join("app/model.bin")).expect("read model");
    assert_eq!(model.len(), 1 << 20);
    let deadline = Instant::now() + Duration::from_secs(20);
    let profile = loop {
        let (status, body) = controller.get(&format!("/v1/layers/{layer}/prefetch"));
        if status == 200 {
            break serde_json::from_str::<serde_json::Value>(&body).expect("profile json");
        }
        assert!(
            Instant::now() < deadline,
            "no profile: {status} {body}\n{}",
            first.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let spans = profile["spans"].as_array().expect("spans").len();
    assert!(spans >= 4, "a 1 MiB file at 256 KiB spans: {profile}");
    drop(rootfs);

    // A fresh node: the profile is prefetched as the layer is mounted, before any read.
    let second = Node::start(&dir.path().join("second"), &flags);
    assert_eq!(rt.block_on(unpack(&second.socket, &pushed, "r")), 1);
    let stats_path = second
        .root
        .join("layers")
        .join(layer.trim_start_matches("sha256:"))
        .join("stats.json");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let stats: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&stats_path).unwrap_or_default())
                .unwrap_or_default();
        if stats["prefetched"].as_u64() == Some(spans as u64) {
            assert!(
                stats["bytes_on_demand"].as_u64().unwrap_or(0) < (1 << 20) + (600 << 10),
                "prefetch fetched more than the profile: {stats}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "profile not prefetched: {stats}\n{}",
            second.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(controller.runtime);
}

/// A layer's stats file on `node`.
fn layer_stats(node: &Node, layer: &str) -> serde_json::Value {
    let path = node
        .root
        .join("layers")
        .join(layer.trim_start_matches("sha256:"))
        .join("stats.json");
    serde_json::from_slice(&std::fs::read(path).unwrap_or_default()).unwrap_or_default()
}

#[test]
fn policy_modes_reach_the_node_eager_is_fully_local_before_the_start_and_a_deadline_fetches_the_rest()
 {
    require_root();
    let registry = Registry::start().expect("registry");
    let host = registry.host();
    let eager = TestImage::new()
        .file("app/model.bin", noise(3 << 20, 21))
        .push(&host, "modes/eager:v1")
        .expect("push");
    let deadline = TestImage::new()
        .file("app/data.bin", noise(3 << 20, 22))
        .push(&host, "modes/deadline:v1")
        .expect("push");
    let dir = tempfile::tempdir().expect("tempdir");
    let ctrl_store = dir.path().join("controller");
    index(&eager.reference, &ctrl_store);
    index(&deadline.reference, &ctrl_store);
    let controller = Controller::start(&ctrl_store);
    controller.api.set_active_policies(
        hermes_controller::policy::parse_policies(
            &format!(
                "apiVersion: hermes.dev/v1alpha1\nkind: HermesPolicy\nmetadata: {{name: eager}}\n\
                 spec:\n  images: [\"{host}/modes/eager\"]\n  mode: Eager\n---\n\
                 apiVersion: hermes.dev/v1alpha1\nkind: HermesPolicy\nmetadata: {{name: soon}}\n\
                 spec:\n  images: [\"{host}/modes/deadline\"]\n  fullyLocalWithin: 20s\n"
            ),
            "test",
        )
        .expect("policies"),
    );
    // No background fetch on this node: whatever is fetched beyond reads, the policy asked for.
    let node = Node::start(
        dir.path(),
        &[
            "--plain-http",
            "--no-background-fetch",
            "--trace-window",
            "0",
            "--controller",
            &controller.url,
        ],
    );
    let rt = runtime();

    // Eager: when the snapshot's prepare returns (the container could start), the layer is
    // fully local, fetched by the policy's fast walk, not by reads.
    assert_eq!(
        rt.block_on(unpack(&node.socket, &eager, "e")),
        1,
        "{}",
        node.logs()
    );
    let stats = layer_stats(&node, &eager.layers[0].digest);
    assert_eq!(stats["state"], "fully_local", "{stats}\n{}", node.logs());
    assert_eq!(stats["mode"], "Eager");
    assert_eq!(stats["fetching_fast"], true);
    assert_eq!(stats["bytes_on_demand"], 0);
    assert!(
        stats["bytes_background"].as_u64().unwrap() >= 3 << 20,
        "{stats}"
    );

    // Lazy with fullyLocalWithin: mounted at once (still lazy), then fully local in time
    // although the node fetches nothing in the background by default.
    assert_eq!(rt.block_on(unpack(&node.socket, &deadline, "d")), 1);
    let stats = layer_stats(&node, &deadline.layers[0].digest);
    assert_eq!(stats["mode"], "Lazy", "{stats}");
    let until = Instant::now() + Duration::from_secs(20);
    let stats = loop {
        let stats = layer_stats(&node, &deadline.layers[0].digest);
        if stats["state"] == "fully_local" {
            break stats;
        }
        assert!(
            Instant::now() < until,
            "not fully local in 20 s: {stats}\n{}",
            node.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(stats["fully_local_deadline_missed"], false);
    assert_eq!(stats["bytes_on_demand"], 0);
    let metrics = node.metrics();
    assert_eq!(
        metric(&metrics, "hermes_node_layer_modes", &["mode=\"Eager\""]),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "hermes_node_layer_modes", &["mode=\"Lazy\""]),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "hermes_node_layers_fully_local_deadline_missed",
            &[]
        ),
        0.0
    );
    drop(node);
    drop(controller.runtime);
}

/// The metric `name{host="HOST"}` of a node's `/metrics`, 0 when absent.
fn host_metric(metrics: &str, name: &str, host: &str) -> u64 {
    let prefix = format!("{name}{{host=\"{host}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn three_node_daemons_read_through_a_pull_through_mirror_and_only_the_first_costs_the_origin() {
    require_root();
    let registry = Registry::start().expect("origin registry");
    // Counts what the origin serves; nodes name the image by this address.
    let origin = FaultProxy::start(registry.addr()).expect("counting proxy");
    let mirror = Registry::start_pull_through(&origin.url()).expect("pull-through mirror");
    let files = [
        ("app/main.py", b"print('hi')\n".to_vec()),
        ("app/a.bin", noise(2 << 20, 11)),
        ("app/b.bin", noise(1 << 20, 12)),
    ];
    let image = files.iter().fold(TestImage::new(), |i, (path, data)| {
        i.file(path, data.clone())
    });
    let pushed = image
        .push(&registry.host(), "node/mirrored:v1")
        .expect("push");
    let image = PushedImage {
        reference: format!("{}/node/mirrored:v1", origin.host()),
        ..pushed
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let hosts = dir.path().join("certs.d");
    let host_dir = hosts.join(origin.host().replace(':', "_") + "_");
    std::fs::create_dir_all(&host_dir).expect("hosts dir");
    std::fs::write(
        host_dir.join("hosts.toml"),
        format!(
            "server = \"http://{}\"\n[host.\"http://{}\"]\n  capabilities = [\"pull\"]\n",
            origin.host(),
            mirror.host()
        ),
    )
    .expect("hosts.toml");
    let hosts_arg = hosts.to_str().expect("utf-8 path").to_owned();
    let rt = runtime();
    let mut origin_bytes = Vec::new();
    for n in 0..3 {
        let node_dir = dir.path().join(format!("node{n}"));
        index(&image.reference, &node_dir.join("node/ztocs"));
        let before = origin.blob_bytes_sent();
        let node = Node::start(
            &node_dir,
            &[
                "--plain-http",
                "--no-background-fetch",
                "--registry-config-path",
                &hosts_arg,
            ],
        );
        assert_eq!(rt.block_on(unpack(&node.socket, &image, "m")), 1);
        let rootfs = mount_rootfs(
            &rt.block_on(container(&node.socket, &image, "m", "c")),
            &node_dir.join("c"),
        );
        for (path, data) in &files {
            let got = std::fs::read(rootfs.path.join(path)).expect("read");
            assert!(got == *data, "node {n}: {path} differs:\n{}", node.logs());
        }
        drop(rootfs);
        origin_bytes.push(origin.blob_bytes_sent() - before);
        // The first node finds the mirror empty: its reads go to the origin while the mirror
        // stores the blob (wait for that); the others read only through the mirror.
        let stored = mirror.blob_path(&image.layers[0].digest);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !stored.is_file() {
            assert!(
                Instant::now() < deadline,
                "the mirror never stored the layer"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        if n == 0 {
            continue;
        }
        node.wait_metrics(|m| {
            host_metric(m, "hermes_node_registry_host_bytes_total", &mirror.host()) > 0
        });
        let m = node.metrics();
        assert_eq!(
            host_metric(&m, "hermes_node_registry_host_bytes_total", &origin.host()),
            0,
            "node {n} read everything through the mirror:\n{m}"
        );
    }
    eprintln!(
        "layer {} bytes; origin blob bytes per node {origin_bytes:?}",
        image.layers[0].size
    );
    assert_eq!(
        origin_bytes[1..],
        [0, 0],
        "the second and third node cost the origin nothing"
    );
    // The first node: the mirror's fill, its own reads from the origin, and for each of its
    // reads in flight when the mirror missed, distribution 2.8's answer copied from the origin
    // (on loopback a small blob arrives whole before the hang-up is noticed).
    let layer = image.layers[0].size;
    assert!(
        origin_bytes[0] > 0 && origin_bytes[0] <= 4 * layer,
        "the first node cost the origin {} bytes of a {layer}-byte layer",
        origin_bytes[0]
    );
}
