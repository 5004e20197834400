//! A kubelet's container start through containerd's CRI (`PullImage`, `RunPodSandbox` with host
//! network, `CreateContainer`, `StartContainer`) with `hermes node` as containerd's snapshotter,
//! on containerd 1.6 and 2.x: an indexed image starts from lazy layers having fetched a small part
//! of its bytes; an image without an index, and an indexed one whose index source is down, start
//! the normal way; after `kill -9` of the node a new container starts. On 2.x only: the labels
//! each CRI pull path gives the snapshotter, a runtime handler with its own snapshotter, and the
//! version 3 snippets in `deploy/containerd/` as users merge them.

use std::path::Path;
use std::time::{Duration, Instant};

use hermes_containerd::{ContainerState, Cri, log_lines};
use hermes_node_api::labels::{
    CRI_IMAGE_LAYERS, CRI_IMAGE_REF, CRI_LAYER_DIGEST, CRI_MANIFEST_DIGEST, SNAPSHOT_REF,
};
use hermes_node_api::{LayerMode, PullReport};
use hermes_testkit::{
    Containerd, ContainerdBuilder, CriPull, FaultProxy, Flavour, HERMES_RUNTIME_HANDLER,
    PushedImage, Registry, busybox_image, sandbox_image,
};

use crate::node::{Node, free_port, index, metric, require_root};
use crate::node_api::Controller;
use crate::pull::message_image;

/// A registry with the sandbox image, a `hermes node` and a CRI-enabled containerd using it.
pub(crate) struct Cluster {
    // Dropped in this order: containerd (tasks, mounts) before the node (lazy layers).
    pub(crate) containerd: Containerd,
    pub(crate) node: Node,
    logs: tempfile::TempDir,
}

impl Cluster {
    pub(crate) fn start(
        flavour: Flavour,
        dir: &Path,
        registry: &Registry,
        extra_hosts: &[&str],
        node_args: &[&str],
    ) -> Self {
        Self::start_with(dir, registry, node_args, |mut builder| {
            for host in extra_hosts {
                builder = builder.registry_host(host);
            }
            builder.flavour(flavour)
        })
    }

    /// A cluster whose containerd options `configure` completes (flavour, pull path, handlers).
    fn start_with(
        dir: &Path,
        registry: &Registry,
        node_args: &[&str],
        configure: impl FnOnce(ContainerdBuilder) -> ContainerdBuilder,
    ) -> Self {
        let sandbox = sandbox_image()
            .expect("sandbox image")
            .push(&registry.host(), "pause:v1")
            .expect("push sandbox image");
        let node = Node::start(dir, node_args);
        let builder = Containerd::builder()
            .proxy_snapshotter(&node.socket)
            .registry_host(&registry.host())
            .cri(&sandbox.reference);
        let containerd = configure(builder).start().expect("containerd with CRI");
        Cluster {
            containerd,
            node,
            logs: tempfile::tempdir().expect("log dir"),
        }
    }

    pub(crate) fn diagnostics(&self) -> String {
        format!(
            "containerd log:\n{}\nnode logs:\n{}",
            self.containerd.log(),
            self.node.logs()
        )
    }

    /// A kubelet's start of one container running the image's entrypoint; returns its log
    /// lines once it has exited with 0.
    async fn run(&self, image: &str, pod: &str) -> Vec<String> {
        self.run_with_handler(image, pod, "").await
    }

    /// [`Self::run`] for a pod whose runtime handler is `handler` (empty: the default).
    async fn run_with_handler(&self, image: &str, pod: &str, handler: &str) -> Vec<String> {
        let cri = Cri::connect(self.containerd.address())
            .await
            .expect("connect to CRI")
            .with_runtime_handler(handler);
        let fail = |what: &str, e: hermes_containerd::Error| -> ! {
            panic!("{what}: {e:?}\n{}", self.diagnostics())
        };
        cri.pull_image(image)
            .await
            .unwrap_or_else(|e| fail("PullImage", e));
        self.run_pulled(image, pod, handler).await
    }

    /// [`Self::run_with_handler`] of an image pulled already (by a kubelet with credentials).
    pub(crate) async fn run_pulled(&self, image: &str, pod: &str, handler: &str) -> Vec<String> {
        let cri = Cri::connect(self.containerd.address())
            .await
            .expect("connect to CRI")
            .with_runtime_handler(handler);
        let fail = |what: &str, e: hermes_containerd::Error| -> ! {
            panic!("{what}: {e:?}\n{}", self.diagnostics())
        };
        // A log directory per pod: the container is named `app` in each.
        let logs = self.logs.path().join(pod);
        std::fs::create_dir_all(&logs).expect("pod log dir");
        let sandbox = cri
            .run_host_network_pod(pod, "default", &logs)
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

/// busybox, a small layer with `message` and three 8 MiB layers it never reads; prints the
/// message.
fn lazy_image(registry: &Registry, repo: &str, message: &str) -> PushedImage {
    busybox_image()
        .expect("busybox image")
        .layer()
        .file("etc/message", format!("{message}\n"))
        .big_layer(8)
        .big_layer(8)
        .big_layer(8)
        .entrypoint(&["/bin/cat", "/etc/message"])
        .push(&registry.host(), repo)
        .expect("push")
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

on_each_containerd! {
async fn an_indexed_image_starts_through_cri_having_fetched_under_a_tenth_of_its_bytes(flavour) {
    require_root();
    let registry = Registry::start().expect("registry");
    let proxy = FaultProxy::start(registry.addr()).expect("proxy");
    let mut image = lazy_image(&registry, "cri/lazy:v1", "started lazily");
    let dir = tempfile::tempdir().expect("tempdir");
    index(&image.reference, &dir.path().join("node/ztocs"));
    let cluster = Cluster::start(
        flavour,
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
        "containerd {}: fetched {fetched} of {total} compressed bytes ({:.1}%)",
        cluster.containerd.version(),
        100.0 * fetched as f64 / total as f64
    );
    assert!(
        fetched * 10 < total,
        "fetched {fetched} of {total} compressed bytes"
    );
}
}

/// The next pull report the controller got (fails after `secs`).
fn next_pull_report(controller: &Controller, secs: u64, logs: &dyn Fn() -> String) -> PullReport {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Ok(report) = controller.pulls.lock().expect("pulls").try_recv() {
            return report;
        }
        assert!(
            Instant::now() < deadline,
            "no pull report in {secs} s\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn each_cri_pull_is_reported_with_its_lazy_layers_and_bytes_or_its_fallback_reason() {
    require_root();
    let registry = Registry::start().expect("registry");
    let lazy = lazy_image(&registry, "cri/reported:v1", "reported lazily");
    let plain = message_image(&registry, "cri/unindexed:v1", "reported normally");
    let dir = tempfile::tempdir().expect("tempdir");
    let ctrl_store = dir.path().join("controller");
    index(&lazy.reference, &ctrl_store);
    let controller = Controller::start(&ctrl_store);
    let cluster = Cluster::start(
        Flavour::V1_6,
        dir.path(),
        &registry,
        &[],
        &[
            "--plain-http",
            "--no-background-fetch",
            "--trace-window",
            "1",
            "--controller",
            &controller.url,
        ],
    );
    let logs = || cluster.diagnostics();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");

    assert_eq!(
        rt.block_on(cluster.run(&lazy.reference, "lazy")),
        vec!["reported lazily"]
    );
    let report = next_pull_report(&controller, 60, &logs);
    assert_eq!(report.image, lazy.reference);
    assert_eq!(
        report.manifest.as_ref().map(|d| d.to_string()),
        Some(lazy.manifest_digest.clone())
    );
    assert!(
        report.node.as_deref().is_some_and(|n| !n.is_empty()),
        "{report:?}"
    );
    assert_eq!(report.layers.len(), lazy.layers.len(), "{report:?}");
    assert!(
        report
            .layers
            .iter()
            .all(|l| l.mode == LayerMode::Lazy && l.reason.is_none()),
        "{report:?}"
    );
    let total: u64 = lazy.layers.iter().map(|l| l.size).sum();
    assert!(
        report.bytes_fetched > 0 && report.bytes_fetched * 10 < total,
        "the start's reads fetched {} of {total} bytes",
        report.bytes_fetched
    );

    assert_eq!(
        rt.block_on(cluster.run(&plain.reference, "plain")),
        vec!["reported normally"]
    );
    let report = next_pull_report(&controller, 60, &logs);
    assert_eq!(report.image, plain.reference);
    assert!(!report.layers.is_empty());
    for layer in &report.layers {
        assert_eq!(layer.mode, LayerMode::Fallback, "{report:?}");
        assert_eq!(
            layer.reason.as_deref(),
            Some("no zTOC for the layer"),
            "{report:?}"
        );
    }
    assert_eq!(report.bytes_fetched, 0);
    drop(cluster);
    drop(controller.runtime);
}

on_each_containerd! {
async fn an_image_without_an_index_starts_through_cri_the_normal_way(flavour) {
    require_root();
    let registry = Registry::start().expect("registry");
    let image = message_image(&registry, "cri/plain:v1", "started normally");
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = Cluster::start(flavour, dir.path(), &registry, &[], &["--plain-http"]);
    assert_eq!(
        cluster.run(&image.reference, "plain").await,
        vec!["started normally"]
    );
    let m = cluster.node.metrics();
    assert_eq!(metric(&m, "hermes_node_lazy_mounts_total", &[]), 0.0, "{m}");
}
}

on_each_containerd! {
async fn an_indexed_image_starts_through_cri_when_the_index_source_is_down(flavour) {
    require_root();
    let registry = Registry::start().expect("registry");
    let image = message_image(&registry, "cri/down:v1", "started without the index source");
    let dir = tempfile::tempdir().expect("tempdir");
    // The controller that holds the zTOCs is unreachable (nothing listens on its port).
    let controller = format!("http://127.0.0.1:{}", free_port());
    let cluster = Cluster::start(
        flavour,
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
}

on_each_containerd! {
async fn after_kill_9_of_the_node_a_new_container_of_a_lazy_image_starts_through_cri(flavour) {
    require_root();
    let registry = Registry::start().expect("registry");
    let image = lazy_image(&registry, "cri/again:v1", "started again");
    let dir = tempfile::tempdir().expect("tempdir");
    index(&image.reference, &dir.path().join("node/ztocs"));
    let mut cluster = Cluster::start(
        flavour,
        dir.path(),
        &registry,
        &[],
        &["--plain-http", "--no-background-fetch"],
    );
    assert_eq!(cluster.run(&image.reference, "first").await, vec!["started again"]);
    let layers = image.layers.len();
    assert_eq!(
        metric(&cluster.node.metrics(), "hermes_node_lazy_mounts_total", &[]),
        layers as f64
    );

    // The daemon dies and comes back: its layers are adopted, and containerd (which kept its
    // snapshots) starts a second pod of the image on them.
    cluster.node.kill9();
    cluster.node.spawn();
    cluster
        .node
        .wait_log(&format!("adopted {layers}, re-mounted 0, failed 0"));
    // containerd 1.6's gRPC client backs off after the connection broke and fails calls fast
    // meanwhile (a kubelet retries); wait until it reaches the snapshotter again.
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(e) = cluster
        .containerd
        .ctr(&["-n", "k8s.io", "snapshots", "--snapshotter", "hermes", "ls"])
    {
        assert!(Instant::now() < deadline, "containerd never reconnected: {e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(cluster.run(&image.reference, "second").await, vec!["started again"]);
    let m = cluster.node.metrics();
    assert_eq!(
        metric(&m, "hermes_node_fallbacks_total", &[]),
        0.0,
        "nothing fell back after the restart:\n{m}"
    );
}
}

/// The label names of the Prepare calls the node got for `image`'s layers (those naming a
/// target snapshot), checked to be the same for every layer.
fn layer_prepare_labels(node: &Node, layers: usize) -> Vec<String> {
    let prepares: Vec<Vec<String>> = node
        .prepare_labels()
        .into_iter()
        .filter(|names| names.iter().any(|n| n == SNAPSHOT_REF))
        .collect();
    assert!(
        prepares.len() >= layers,
        "{} layer prepares for {layers} layers:\n{}",
        prepares.len(),
        node.logs()
    );
    let first = prepares[0].clone();
    for names in &prepares {
        assert_eq!(names, &first, "layers got different labels");
    }
    first
}

/// Pulls and runs an indexed image through CRI on containerd 2.x with the pull path `pull`;
/// returns the label names each layer's Prepare carried, having checked that every layer was
/// mounted lazily.
async fn labels_of_a_cri_pull_on_containerd_2(pull: CriPull, repo: &str) -> Vec<String> {
    let (names, lazy, layers) = cri_pull_on_containerd_2(repo, |b| b.cri_pull(pull)).await;
    assert_eq!(lazy, layers, "every layer lazy through the {pull:?} pull");
    names
}

/// Pulls and runs an indexed image through CRI on containerd 2.x configured by `configure`;
/// returns the label names each layer's Prepare carried, the lazy mounts and the layer count.
async fn cri_pull_on_containerd_2(
    repo: &str,
    configure: impl FnOnce(ContainerdBuilder) -> ContainerdBuilder,
) -> (Vec<String>, f64, f64) {
    require_root();
    let registry = Registry::start().expect("registry");
    let image = lazy_image(&registry, repo, "labelled");
    let dir = tempfile::tempdir().expect("tempdir");
    index(&image.reference, &dir.path().join("node/ztocs"));
    let cluster = Cluster::start_with(
        dir.path(),
        &registry,
        &["--plain-http", "--no-background-fetch"],
        |b| configure(b.flavour(Flavour::V2)),
    );
    assert_eq!(
        cluster.run(&image.reference, "labels").await,
        vec!["labelled"]
    );
    let names = layer_prepare_labels(&cluster.node, image.layers.len());
    eprintln!(
        "containerd {} ({repo}): the snapshotter got {}",
        cluster.containerd.version(),
        names.join(", ")
    );
    let lazy = metric(
        &cluster.node.metrics(),
        "hermes_node_lazy_mounts_total",
        &[],
    );
    (names, lazy, image.layers.len() as f64)
}

/// The labels CRI's remote-snapshotter handler sets (containerd's `snapshotters` package):
/// Hermes needs the target ref and the layer digest; it uses the image ref and manifest digest
/// for the registry and the index lookup.
const CRI_LAYER_LABELS: [&str; 5] = [
    SNAPSHOT_REF,
    CRI_IMAGE_LAYERS,
    CRI_IMAGE_REF,
    CRI_LAYER_DIGEST,
    CRI_MANIFEST_DIGEST,
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_2_cri_local_pull_gives_the_snapshotter_the_cri_layer_labels() {
    let names = labels_of_a_cri_pull_on_containerd_2(CriPull::Local, "cri/local:v1").await;
    for label in CRI_LAYER_LABELS {
        assert!(
            names.iter().any(|n| n == label),
            "{label} missing: {names:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_2_cri_transfer_pull_gives_the_snapshotter_the_cri_layer_labels() {
    let names = labels_of_a_cri_pull_on_containerd_2(CriPull::Transfer, "cri/transfer:v1").await;
    for label in CRI_LAYER_LABELS {
        assert!(
            names.iter().any(|n| n == label),
            "{label} missing: {names:?}"
        );
    }
}

/// Why the proxy plugin exports `enable_remote_snapshot_annotations`: without it the transfer
/// service gives the snapshotter only the target ref, and no layer can be mounted lazily.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_2_cri_transfer_pull_without_the_export_gives_only_the_target_ref() {
    let (names, lazy, _) = cri_pull_on_containerd_2("cri/no-export:v1", |b| {
        b.cri_pull(CriPull::Transfer).without_annotation_export()
    })
    .await;
    assert_eq!(names, vec![SNAPSHOT_REF.to_owned()]);
    assert_eq!(lazy, 0.0, "nothing lazy without the layer labels");
}

/// A `RuntimeClass` opts pods into Hermes on containerd 2.x: the runtime handler `hermes` has
/// `snapshotter = "hermes"` while CRI's default stays overlayfs. The same image starts lazily in
/// a pod of that handler and is unpacked normally for a pod of the default one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_2_runtime_handler_hermes_starts_lazily_while_the_default_handler_unpacks() {
    require_root();
    let registry = Registry::start().expect("registry");
    let proxy = FaultProxy::start(registry.addr()).expect("proxy");
    let mut image = lazy_image(&registry, "cri/handler:v1", "one image, two handlers");
    let dir = tempfile::tempdir().expect("tempdir");
    index(&image.reference, &dir.path().join("node/ztocs"));
    let cluster = Cluster::start_with(
        dir.path(),
        &registry,
        &["--plain-http", "--no-background-fetch"],
        |b| {
            b.flavour(Flavour::V2)
                .registry_host(&proxy.host())
                .cri_snapshotter("overlayfs")
                .hermes_runtime_handler()
        },
    );
    image.reference = image.reference.replace(&registry.host(), &proxy.host());
    proxy.clear_log();
    let layers = image.layers.len() as f64;

    assert_eq!(
        cluster
            .run_with_handler(&image.reference, "opted-in", HERMES_RUNTIME_HANDLER)
            .await,
        vec!["one image, two handlers"]
    );
    let m = cluster.node.metrics();
    assert_eq!(
        metric(&m, "hermes_node_lazy_mounts_total", &[]),
        layers,
        "the hermes handler's pod starts from lazy layers:\n{m}\n{}",
        cluster.diagnostics()
    );
    let fetched = layer_bytes_fetched(&proxy, &image);
    let total: u64 = image.layers.iter().map(|l| l.size).sum();
    assert!(
        fetched * 10 < total,
        "fetched {fetched} of {total} compressed bytes"
    );

    assert_eq!(
        cluster.run(&image.reference, "default").await,
        vec!["one image, two handlers"]
    );
    let m = cluster.node.metrics();
    assert_eq!(
        metric(&m, "hermes_node_lazy_mounts_total", &[]),
        layers,
        "the default handler's pod does not use Hermes:\n{m}"
    );
    // containerd unpacked every layer into overlayfs: it downloaded them whole.
    let overlay = cluster
        .containerd
        .ctr(&[
            "-n",
            "k8s.io",
            "snapshots",
            "--snapshotter",
            "overlayfs",
            "ls",
        ])
        .expect("ctr snapshots ls");
    let committed = overlay.lines().filter(|l| l.contains("Committed")).count();
    assert!(
        committed >= image.layers.len(),
        "overlayfs holds the image's layers:\n{overlay}"
    );
    assert!(
        layer_bytes_fetched(&proxy, &image) >= total,
        "the normal unpack downloaded the layers"
    );
}

/// `deploy/containerd/NAME` with the node's socket in place of the deployed one.
fn deploy_snippet(name: &str, node: &Path) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy/containerd")
        .join(name);
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    assert!(
        text.contains(DEPLOYED_SOCKET),
        "{name} names {DEPLOYED_SOCKET}"
    );
    text.replace(DEPLOYED_SOCKET, &node.display().to_string())
}

/// Where `deploy/containerd/hermes-node.service` serves the snapshotter.
const DEPLOYED_SOCKET: &str = "/run/hermes/snapshotter.sock";

/// The containerd 2.x snippets users merge, as they are: with `config-v3-global.toml` an indexed
/// image starts lazily through CRI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_config_v3_global_starts_an_indexed_image_lazily_on_containerd_2() {
    require_root();
    let registry = Registry::start().expect("registry");
    let image = lazy_image(&registry, "cri/deploy-global:v1", "deployed globally");
    let dir = tempfile::tempdir().expect("tempdir");
    index(&image.reference, &dir.path().join("node/ztocs"));
    let socket = dir.path().join("hermes.sock");
    let cluster = Cluster::start_with(
        dir.path(),
        &registry,
        &["--plain-http", "--no-background-fetch"],
        |b| {
            b.flavour(Flavour::V2)
                .deploy_snippet(&deploy_snippet("config-v3-global.toml", &socket))
        },
    );
    assert_eq!(
        cluster.run(&image.reference, "global").await,
        vec!["deployed globally"]
    );
    let m = cluster.node.metrics();
    assert_eq!(
        metric(&m, "hermes_node_lazy_mounts_total", &[]),
        image.layers.len() as f64,
        "{m}\n{}",
        cluster.diagnostics()
    );
}

/// With `config-v3-runtime-handler.toml` the default handler unpacks into overlayfs and a pod of
/// the `hermes` handler (annotated as the snippet says) starts lazily.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_config_v3_runtime_handler_opts_in_only_the_hermes_handler_on_containerd_2() {
    require_root();
    let registry = Registry::start().expect("registry");
    let lazy = lazy_image(&registry, "cri/deploy-handler:v1", "opted in");
    let plain = lazy_image(&registry, "cri/deploy-default:v1", "not opted in");
    let dir = tempfile::tempdir().expect("tempdir");
    index(&lazy.reference, &dir.path().join("node/ztocs"));
    index(&plain.reference, &dir.path().join("node/ztocs"));
    let socket = dir.path().join("hermes.sock");
    let mut snippet = deploy_snippet("config-v3-runtime-handler.toml", &socket);
    if std::env::consts::ARCH == "aarch64" {
        snippet = snippet.replace("linux/amd64", "linux/arm64");
    }
    let cluster = Cluster::start_with(
        dir.path(),
        &registry,
        &["--plain-http", "--no-background-fetch"],
        |b| b.flavour(Flavour::V2).deploy_snippet(&snippet),
    );
    assert_eq!(
        cluster.run(&plain.reference, "default").await,
        vec!["not opted in"]
    );
    let m = cluster.node.metrics();
    assert_eq!(
        metric(&m, "hermes_node_lazy_mounts_total", &[]),
        0.0,
        "an indexed image of a default pod stays on overlayfs:\n{m}"
    );
    assert_eq!(
        cluster
            .run_with_handler(&lazy.reference, "opted-in", HERMES_RUNTIME_HANDLER)
            .await,
        vec!["opted in"]
    );
    let m = cluster.node.metrics();
    assert_eq!(
        metric(&m, "hermes_node_lazy_mounts_total", &[]),
        lazy.layers.len() as f64,
        "{m}\n{}",
        cluster.diagnostics()
    );
}
