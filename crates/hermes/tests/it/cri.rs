//! A kubelet's container start through containerd's CRI (`PullImage`, `RunPodSandbox` with host
//! network, `CreateContainer`, `StartContainer`) with `hermes node` as containerd's snapshotter:
//! an indexed image starts from lazy layers having fetched a small part of its bytes; an image
//! without an index, and an indexed one whose index source is down, start the normal way.

use std::path::Path;
use std::time::{Duration, Instant};

use hermes_containerd::{ContainerState, Cri, log_lines};
use hermes_testkit::{Containerd, FaultProxy, PushedImage, Registry, busybox_image, sandbox_image};

use crate::node::{Node, free_port, index, metric, require_root};
use crate::pull::message_image;

/// A registry with the sandbox image, a `hermes node` and a CRI-enabled containerd using it.
struct Cluster {
    // Dropped in this order: containerd (tasks, mounts) before the node (lazy layers).
    containerd: Containerd,
    node: Node,
    logs: tempfile::TempDir,
}

impl Cluster {
    fn start(dir: &Path, registry: &Registry, extra_hosts: &[&str], node_args: &[&str]) -> Self {
        let sandbox = sandbox_image()
            .expect("sandbox image")
            .push(&registry.host(), "pause:v1")
            .expect("push sandbox image");
        let node = Node::start(dir, node_args);
        let mut builder = Containerd::builder()
            .proxy_snapshotter(&node.socket)
            .registry_host(&registry.host())
            .cri(&sandbox.reference);
        for host in extra_hosts {
            builder = builder.registry_host(host);
        }
        let containerd = builder.start().expect("containerd with CRI");
        Cluster {
            containerd,
            node,
            logs: tempfile::tempdir().expect("log dir"),
        }
    }

    fn diagnostics(&self) -> String {
        format!(
            "containerd log:\n{}\nnode logs:\n{}",
            self.containerd.log(),
            self.node.logs()
        )
    }

    /// A kubelet's start of one container running the image's entrypoint; returns its log
    /// lines once it has exited with 0.
    async fn run(&self, image: &str, pod: &str) -> Vec<String> {
        let cri = Cri::connect(self.containerd.address())
            .await
            .expect("connect to CRI");
        let fail = |what: &str, e: hermes_containerd::Error| -> ! {
            panic!("{what}: {e:?}\n{}", self.diagnostics())
        };
        cri.pull_image(image)
            .await
            .unwrap_or_else(|e| fail("PullImage", e));
        let sandbox = cri
            .run_host_network_pod(pod, "default", self.logs.path())
            .await
            .unwrap_or_else(|e| fail("RunPodSandbox", e));
        let id = cri
            .start_container(&sandbox, "app", image, &[])
            .await
            .unwrap_or_else(|e| fail("CreateContainer/StartContainer", e));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let state = cri.container_state(&id).await.expect("ContainerStatus");
            match state {
                ContainerState::Exited(0) => break,
                ContainerState::Exited(code) => panic!(
                    "the container exited with {code}; log:\n{}\n{}",
                    std::fs::read_to_string(Cri::log_path(&sandbox, "app")).unwrap_or_default(),
                    self.diagnostics()
                ),
                _ if Instant::now() > deadline => {
                    panic!("the container is still {state:?}\n{}", self.diagnostics())
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        let log = std::fs::read_to_string(Cri::log_path(&sandbox, "app")).expect("container log");
        cri.remove_pod(&sandbox).await.expect("remove pod");
        log_lines(&log)
    }
}

/// Compressed bytes of `image`'s layers that went through `proxy` (range reads and whole GETs).
fn layer_bytes_fetched(proxy: &FaultProxy, image: &PushedImage) -> u64 {
    proxy
        .log()
        .iter()
        .filter(|r| r.method == "GET" && (r.status == 200 || r.status == 206))
        .filter_map(|r| {
            let layer = image.layers.iter().find(|l| r.path.ends_with(&l.digest))?;
            Some(match r.range.as_deref().and_then(range_len) {
                Some(len) if r.status == 206 => len,
                _ => layer.size,
            })
        })
        .sum()
}

/// Length of `bytes=A-B`.
fn range_len(range: &str) -> Option<u64> {
    let (a, b) = range.strip_prefix("bytes=")?.split_once('-')?;
    Some(b.parse::<u64>().ok()? - a.parse::<u64>().ok()? + 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_indexed_image_starts_through_cri_having_fetched_under_a_tenth_of_its_bytes() {
    require_root();
    let registry = Registry::start().expect("registry");
    let proxy = FaultProxy::start(registry.addr()).expect("proxy");
    let mut image = busybox_image()
        .expect("busybox image")
        .layer()
        .file("etc/message", "started lazily\n")
        .big_layer(8)
        .big_layer(8)
        .big_layer(8)
        .entrypoint(&["/bin/cat", "/etc/message"])
        .push(&registry.host(), "cri/lazy:v1")
        .expect("push");
    let dir = tempfile::tempdir().expect("tempdir");
    index(&image.reference, &dir.path().join("node/ztocs"));
    let cluster = Cluster::start(
        dir.path(),
        &registry,
        &[&proxy.host()],
        &["--plain-http", "--no-background-fetch"],
    );
    // Through the proxy, so that every byte the node fetches is counted.
    image.reference = image.reference.replace(&registry.host(), &proxy.host());
    proxy.clear_log();

    assert_eq!(
        cluster.run(&image.reference, "lazy").await,
        vec!["started lazily"]
    );
    let fetched = layer_bytes_fetched(&proxy, &image);
    let total: u64 = image.layers.iter().map(|l| l.size).sum();
    let m = cluster.node.metrics();
    assert_eq!(
        metric(&m, "hermes_node_lazy_mounts_total", &[]),
        image.layers.len() as f64,
        "every layer mounted lazily:\n{m}"
    );
    eprintln!(
        "fetched {fetched} of {total} compressed bytes ({:.1}%)",
        100.0 * fetched as f64 / total as f64
    );
    assert!(
        fetched * 10 < total,
        "fetched {fetched} of {total} compressed bytes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_without_an_index_starts_through_cri_the_normal_way() {
    require_root();
    let registry = Registry::start().expect("registry");
    let image = message_image(&registry, "cri/plain:v1", "started normally");
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = Cluster::start(dir.path(), &registry, &[], &["--plain-http"]);
    assert_eq!(
        cluster.run(&image.reference, "plain").await,
        vec!["started normally"]
    );
    let m = cluster.node.metrics();
    assert_eq!(metric(&m, "hermes_node_lazy_mounts_total", &[]), 0.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_indexed_image_starts_through_cri_when_the_index_source_is_down() {
    require_root();
    let registry = Registry::start().expect("registry");
    let image = message_image(&registry, "cri/down:v1", "started without the index source");
    let dir = tempfile::tempdir().expect("tempdir");
    // The controller that holds the zTOCs is unreachable (nothing listens on its port).
    let controller = format!("http://127.0.0.1:{}", free_port());
    let cluster = Cluster::start(
        dir.path(),
        &registry,
        &[],
        &["--plain-http", "--controller", &controller],
    );
    assert_eq!(
        cluster.run(&image.reference, "down").await,
        vec!["started without the index source"]
    );
    let m = cluster.node.metrics();
    assert!(
        metric(
            &m,
            "hermes_node_index_lookups_total",
            &["controller", "failed"]
        ) >= 1.0,
        "{m}"
    );
    assert!(
        metric(&m, "hermes_node_fallbacks_total", &["remote_error"]) >= 1.0,
        "{m}"
    );
}
