//! `Engine` end to end over a real registry and store.

use std::io::Cursor;
use std::time::{Duration, Instant};

use hermes_controller::api::NodeApi;
use hermes_controller::builder::Builder;
use hermes_controller::engine::{Engine, EngineOptions};
use hermes_controller::matcher::RunningContainer;
use hermes_controller::mirror::Mirror;
use hermes_controller::policy::{Policy, parse_policies};
use hermes_controller::queue::QueueOptions;
use hermes_controller::reconcile::{LayerState, Phase, ReconcileOptions};
use hermes_controller::status::{ImageReport, ReportBook};
use hermes_oci::manifest::Platform;
use hermes_oci::{Client, ClientOptions, Digest, Reference, RetryPolicy, Store};
use hermes_testkit::{Fault, FaultProxy, FaultRule, PushedImage, Registry, TestImage};
use tokio::sync::mpsc;

pub(crate) const MIB: u64 = 1 << 20;

fn policy(name: &str, spec: &str) -> Vec<Policy> {
    let text = format!(
        "apiVersion: hermes.dev/v1alpha1\nkind: HermesPolicy\nmetadata: {{name: {name}}}\nspec:\n{spec}"
    );
    parse_policies(&text, "test").expect("valid policy")
}

/// The test policy for everything under `host`: 1 MiB minimum layer size and spans.
pub(crate) fn policy_for(host: &str) -> Vec<Policy> {
    policy_indexing("test", host, "minLayerSize: 1Mi, spanSize: 1Mi")
}

/// Policy `name` for everything under `host`, with `index` settings (flow-style YAML).
fn policy_indexing(name: &str, host: &str, index: &str) -> Vec<Policy> {
    policy(
        name,
        &format!("  images: [\"{host}/**\"]\n  index: {{{index}}}\n"),
    )
}

pub(crate) fn container(pod: &str, image: &str, digest: &str) -> RunningContainer {
    RunningContainer {
        namespace: "default".into(),
        pod: pod.into(),
        namespace_labels: Default::default(),
        pod_labels: Default::default(),
        image: Reference::parse(image).expect("reference"),
        digest: Some(Digest::parse(digest).expect("digest")),
    }
}

pub(crate) fn client() -> Client {
    Client::new(ClientOptions {
        plain_http: true,
        retry: RetryPolicy {
            max_attempts: 2,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
            max_retry_after: Duration::from_secs(1),
        },
        ..ClientOptions::default()
    })
    .expect("client")
}

pub(crate) fn fast_options() -> EngineOptions {
    EngineOptions {
        queue: QueueOptions {
            max_concurrent: 2,
            max_attempts: 2,
            backoff_base: Duration::from_millis(100),
            backoff_cap: Duration::from_millis(400),
        },
        reconcile: ReconcileOptions {
            gc_grace: Duration::from_secs(3600),
            retry_failed_after: Duration::from_millis(500),
        },
        ..EngineOptions::default()
    }
}

/// An engine over a store in `dir`, with the node API (not served).
fn engine(dir: &std::path::Path, options: EngineOptions) -> (Engine, NodeApi, Store) {
    engine_with(dir, options, None)
}

/// [`engine`], publishing to a store repository if `mirror` is given.
pub(crate) fn engine_with(
    dir: &std::path::Path,
    options: EngineOptions,
    mirror: Option<Mirror>,
) -> (Engine, NodeApi, Store) {
    let store = Store::open(dir.join("store")).expect("store");
    let (tx, rx) = mpsc::channel(16);
    let api = NodeApi::new(store.clone(), None, vec![MIB], tx);
    let mut builder = Builder::new(
        client(),
        store.clone(),
        Platform::parse("linux/amd64").expect("platform"),
        hermes_ztoc::SOCI_BUILD_TOOL_IDENTIFIER.to_owned(),
    );
    if let Some(mirror) = mirror {
        builder = builder.with_mirror(mirror);
    }
    let book = ReportBook::open(dir.join("status")).expect("report book");
    let engine = Engine::new(options, builder, api.clone(), rx, book).expect("engine");
    (engine, api, store)
}

pub(crate) fn report<'a>(engine: &'a Engine, reference: &str) -> Option<&'a ImageReport> {
    engine.images().find(|r| r.status.reference == reference)
}

/// Run the engine until `done` holds for the report of `reference` (fails after 60 s).
pub(crate) async fn run_until(
    engine: &mut Engine,
    reference: &str,
    what: &str,
    done: impl Fn(&ImageReport) -> bool,
) -> ImageReport {
    let started = Instant::now();
    loop {
        engine.run_for(Duration::from_millis(50)).await;
        if let Some(r) = report(engine, reference)
            && done(r)
        {
            return r.clone();
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{reference} never got {what}; last report: {:#?}",
            report(engine, reference)
        );
    }
}

/// An image with one 4 MiB-file layer (about 2 MiB gzipped) and one tiny layer.
pub(crate) fn push_app(host: &str, repo: &str) -> PushedImage {
    TestImage::new()
        .big_file("srv/model.bin", 4)
        .layer()
        .file("etc/motd", b"hello".to_vec())
        .push(host, repo)
        .expect("push the test image")
}

pub(crate) fn blob_gets(proxy: &FaultProxy, digest: &str) -> usize {
    proxy
        .log()
        .iter()
        .filter(|r| r.method == "GET" && r.path.ends_with(&format!("/blobs/{digest}")))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_image_is_indexed_once_and_a_restart_reuses_the_store() {
    let registry = Registry::start().expect("registry");
    let pushed = push_app(&registry.host(), "ctl/app:v1");
    let proxy = FaultProxy::start(registry.addr()).expect("proxy");
    let reference = format!("{}/ctl/app:v1", proxy.host());
    let big = &pushed.layers[0];
    let dir = tempfile::tempdir().expect("tempdir");

    let (mut e, api, store) = engine(dir.path(), fast_options());
    e.set_policies(policy_for(&proxy.host()), Vec::new());
    e.set_containers(vec![
        container("a", &reference, &pushed.manifest_digest),
        container("b", &reference, &pushed.manifest_digest),
    ]);
    let ready = run_until(&mut e, &reference, "Ready", |r| {
        r.status.phase == Phase::Ready
    })
    .await;
    assert_eq!(ready.status.pods, 2);
    assert_eq!(ready.status.digest.as_str(), pushed.manifest_digest);
    assert_eq!(ready.status.layers[0].state, LayerState::Indexed);
    assert!(
        matches!(&ready.status.layers[1].state, LayerState::Skipped { reason } if reason.contains("minLayerSize")),
        "{:?}",
        ready.status.layers[1]
    );
    assert_eq!(ready.bytes_read, big.size, "the big layer was read once");
    assert!(ready.build_seconds > 0.0);
    assert_eq!(ready.last_error, None);

    // The stored zTOC is exactly what building over the layer blob gives.
    let layer = Digest::parse(&big.digest).unwrap();
    let ztoc = store
        .ztoc_for_layer(&layer, MIB)
        .unwrap()
        .expect("zTOC stored");
    let blob = client()
        .get_blob(&Reference::parse(&reference).unwrap(), &layer, big.size)
        .await
        .expect("layer blob");
    let expected = hermes_ztoc::build(
        Cursor::new(blob.to_vec()),
        &hermes_ztoc::BuildOptions {
            span_size: MIB,
            ..hermes_ztoc::BuildOptions::default()
        },
    )
    .expect("reference zTOC");
    assert_eq!(store.get_blob(&ztoc).unwrap().unwrap(), expected.to_bytes());
    let record = store
        .images()
        .unwrap()
        .into_iter()
        .find(|r| r.manifest_digest.as_str() == pushed.manifest_digest)
        .expect("image record");
    assert!(record.soci_index.is_some());
    assert_eq!(
        blob_gets(&proxy, &big.digest),
        2,
        "one build plus this test's read"
    );
    drop(e);
    drop(api);

    // A new engine over the same data dir: Ready without reading any layer.
    let (mut e, _api, _store) = engine(dir.path(), fast_options());
    let before = report(&e, &reference)
        .expect("report survives the restart")
        .clone();
    assert_eq!(before.status.phase, Phase::Ready);
    e.set_policies(policy_for(&proxy.host()), Vec::new());
    e.set_containers(vec![container("a", &reference, &pushed.manifest_digest)]);
    let again = run_until(&mut e, &reference, "Ready with 1 pod", |r| {
        r.status.phase == Phase::Ready && r.status.pods == 1
    })
    .await;
    assert_eq!(again.bytes_read, big.size, "statistics carried over");
    assert_eq!(blob_gets(&proxy, &big.digest), 2, "no layer read again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_past_the_build_limits_is_not_indexable_and_the_image_is_ready() {
    // 1,100 nested directories: a 28 KB layer whose names (each repeats all its parents) would
    // make a zTOC fifty times its size; 10,000 made 193 MiB.
    let registry = Registry::start().expect("registry");
    let mut image = TestImage::new().big_file("srv/model.bin", 2).layer();
    let mut path = String::from("d");
    for _ in 0..1100 {
        image = image.dir(&path);
        path.push_str("/d");
    }
    let pushed = image
        .push(&registry.host(), "ctl/deep:v1")
        .expect("push the test image");
    let reference = format!("{}/ctl/deep:v1", registry.host());
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut e, api, store) = engine(dir.path(), fast_options());
    // The controller builds whatever runs, down to the minimum layer size (measured compressed).
    e.set_policies(
        policy_indexing("tiny", &registry.host(), "minLayerSize: 1Ki, spanSize: 1Mi"),
        Vec::new(),
    );
    e.set_containers(vec![container("a", &reference, &pushed.manifest_digest)]);
    let ready = run_until(&mut e, &reference, "Ready", |r| {
        r.status.phase == Phase::Ready
    })
    .await;
    assert_eq!(ready.status.layers[0].state, LayerState::Indexed);
    assert!(
        matches!(&ready.status.layers[1].state, LayerState::Skipped { reason }
            if reason.starts_with("not indexable: ") && reason.ends_with("is more than 1024 directories deep")),
        "{:?}",
        ready.status.layers[1]
    );
    assert_eq!(ready.last_error, None);
    let deep = Digest::parse(&pushed.layers[1].digest).unwrap();
    let recorded = store.unindexable(&deep, MIB).unwrap();
    assert!(
        recorded
            .as_deref()
            .is_some_and(|r| r.starts_with("not indexable: ")),
        "recorded, so it is not read again: {recorded:?}"
    );
    // Nodes find no zTOC and pull the layer normally.
    let answer = http(&api, "GET", &format!("/v1/layers/{deep}/ztoc"), "").await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifacts_nobody_needs_are_collected_after_the_grace_period() {
    let registry = Registry::start().expect("registry");
    let pushed = push_app(&registry.host(), "ctl/gc:v1");
    let reference = format!("{}/ctl/gc:v1", registry.host());
    let dir = tempfile::tempdir().expect("tempdir");
    let mut options = fast_options();
    options.reconcile.gc_grace = Duration::from_millis(300);
    options.sweep_every = Duration::ZERO;
    options.sweep_min_age = Duration::ZERO;
    let (mut e, _api, store) = engine(dir.path(), options);
    e.set_policies(policy_for(&registry.host()), Vec::new());
    e.set_containers(vec![container("a", &reference, &pushed.manifest_digest)]);
    run_until(&mut e, &reference, "Ready", |r| {
        r.status.phase == Phase::Ready
    })
    .await;
    assert_eq!(store.layers().unwrap().len(), 1);

    e.set_containers(Vec::new());
    let kept = run_until(&mut e, &reference, "a not-running report", |r| {
        r.status.pods == 0
    })
    .await;
    assert_eq!(
        kept.status.phase,
        Phase::Ready,
        "kept within the grace period"
    );
    let started = Instant::now();
    while report(&e, &reference).is_some() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "never collected"
        );
        e.run_for(Duration::from_millis(100)).await;
    }
    assert!(store.images().unwrap().is_empty(), "record collected");
    assert!(store.layers().unwrap().is_empty(), "zTOC entry collected");
    e.run_for(Duration::from_millis(50)).await;
    let blobs = std::fs::read_dir(store.root().join("blobs/sha256"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(blobs, 0, "zTOC and SOCI index blobs swept");
    assert!(
        std::fs::read_dir(dir.path().join("status"))
            .unwrap()
            .next()
            .is_none(),
        "report file deleted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_registry_fails_with_the_reason_and_is_retried() {
    // Nothing listens on port 1.
    let reference = "127.0.0.1:1/ctl/app:v1";
    let digest = format!("sha256:{}", "ab".repeat(32));
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut e, _api, store) = engine(dir.path(), fast_options());
    e.set_policies(policy_for("127.0.0.1:1"), Vec::new());
    e.set_containers(vec![container("a", reference, &digest)]);
    let failed = run_until(&mut e, reference, "Failed", |r| {
        r.status.phase == Phase::Failed
    })
    .await;
    let reason = failed.status.reason.clone().unwrap_or_default();
    assert!(
        reason.contains("cannot reach registry 127.0.0.1:1"),
        "{reason}"
    );
    assert_eq!(failed.last_error.as_deref(), Some(reason.as_str()));
    run_until(&mut e, reference, "a retry", |r| {
        r.status
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("(3 attempts"))
    })
    .await;
    assert!(store.images().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_layer_is_retried_with_backoff_then_failed_then_built_once_it_works() {
    let registry = Registry::start().expect("registry");
    let pushed = push_app(&registry.host(), "ctl/flaky:v1");
    let proxy = FaultProxy::start(registry.addr()).expect("proxy");
    let reference = format!("{}/ctl/flaky:v1", proxy.host());
    let big = pushed.layers[0].digest.clone();
    proxy.push(FaultRule::new(format!("/blobs/{big}"), Fault::Status(404)).times(1000));
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut e, _api, _store) = engine(dir.path(), fast_options());
    e.set_policies(policy_for(&proxy.host()), Vec::new());
    e.set_containers(vec![container("a", &reference, &pushed.manifest_digest)]);
    let failed = run_until(&mut e, &reference, "Failed", |r| {
        r.status.phase == Phase::Failed
    })
    .await;
    let reason = failed.status.reason.unwrap_or_default();
    assert!(
        reason.contains(&format!("layer {big} failed after 2 attempts"))
            && reason.contains("not found"),
        "{reason}"
    );
    assert_eq!(blob_gets(&proxy, &big), 2, "max_attempts = 2");
    proxy.clear_faults();
    let ready = run_until(&mut e, &reference, "Ready", |r| {
        r.status.phase == Phase::Ready
    })
    .await;
    assert_eq!(ready.last_error, None);
    assert_eq!(blob_gets(&proxy, &big), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_the_policy_off_cancels_the_running_build() {
    let registry = Registry::start().expect("registry");
    let pushed = push_app(&registry.host(), "ctl/slow:v1");
    let proxy = FaultProxy::start(registry.addr()).expect("proxy");
    // About 2 MiB at 100 KiB/s: the build takes ~20 s unless cancelled.
    proxy.set_bandwidth(Some(100 << 10));
    let reference = format!("{}/ctl/slow:v1", proxy.host());
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut e, api, store) = engine(dir.path(), fast_options());
    e.set_policies(policy_for(&proxy.host()), Vec::new());
    e.set_containers(vec![container("a", &reference, &pushed.manifest_digest)]);
    run_until(&mut e, &reference, "a running build", |r| {
        matches!(
            r.status.layers.first().map(|l| &l.state),
            Some(LayerState::Building { .. })
        )
    })
    .await;
    let mut off = policy_for(&proxy.host());
    off.extend(policy(
        "stop",
        &format!("  images: [\"{}/ctl/slow\"]\n  mode: Off\n", proxy.host()),
    ));
    e.set_policies(off, Vec::new());
    let started = Instant::now();
    let skipped = run_until(&mut e, &reference, "Skipped", |r| {
        r.status.phase == Phase::Skipped
    })
    .await;
    assert_eq!(
        skipped.status.reason.as_deref(),
        Some("policy stop has mode Off")
    );
    while e.queue().running() > 0 {
        e.run_for(Duration::from_millis(50)).await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "cancelled, not finished"
    );
    assert!(
        store.layers().unwrap().is_empty(),
        "nothing stored for the layer"
    );
    let metrics = metrics_text(&api).await;
    assert!(
        metrics.contains("hermes_controller_builds_total{outcome=\"Cancelled\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nodes_miss_is_indexed_and_the_soci_index_pushed_as_the_policy_asks() {
    let registry = Registry::start().expect("registry");
    let pushed = push_app(&registry.host(), "ctl/missed:v1");
    let reference = format!("{}/ctl/missed:v1", registry.host());
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut e, api, _store) = engine(dir.path(), fast_options());
    e.set_policies(
        policy_indexing(
            "push",
            &registry.host(),
            "minLayerSize: 1Mi, spanSize: 1Mi, push: SociV2",
        ),
        Vec::new(),
    );
    // No container runs it: a node reports that it started the image without an index.
    let body = format!(r#"{{"image":"{reference}","node":"n1"}}"#);
    let answer = http(&api, "POST", "/v1/misses", &body).await;
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
    let ready = run_until(&mut e, &reference, "Ready", |r| {
        r.status.phase == Phase::Ready
    })
    .await;
    assert_eq!(ready.status.digest.as_str(), pushed.manifest_digest);
    assert_eq!(ready.status.pods, 1, "the miss counts as one user");
    // SOCI v2: an image index tagged v1-soci binds the image and its SOCI index.
    let soci = client()
        .get_manifest(&Reference::parse(&format!("{reference}-soci")).unwrap())
        .await
        .expect("the v1-soci tag was pushed");
    assert_eq!(soci.media_type, "application/vnd.oci.image.index.v1+json");
    let index: serde_json::Value = serde_json::from_slice(&soci.bytes).unwrap();
    assert!(
        index["manifests"].as_array().is_some_and(|m| m
            .iter()
            .any(|d| d["annotations"].to_string().contains("soci"))),
        "{index}"
    );
}

/// A host the test controls: counts connections and answers each with 404.
struct CountingHost {
    addr: std::net::SocketAddr,
    connections: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    server: tokio::task::JoinHandle<()>,
}

impl CountingHost {
    async fn start() -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = connections.clone();
        let server = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let _ = conn.read(&mut [0u8; 4096]).await;
                    let _ = conn
                        .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .await;
                });
            }
        });
        Self {
            addr,
            connections,
            server,
        }
    }

    fn host(&self) -> String {
        self.addr.to_string()
    }

    fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for CountingHost {
    fn drop(&mut self) {
        self.server.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_for_an_image_no_policy_selects_makes_no_request_to_its_host() {
    let unselected = CountingHost::start().await;
    let selected = CountingHost::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut e, api, _store) = engine(dir.path(), fast_options());
    e.set_policies(policy_for(&selected.host()), Vec::new());
    for host in [&unselected, &selected] {
        let body = format!(r#"{{"image":"{}/app:v1","node":"n1"}}"#, host.host());
        let answer = http(&api, "POST", "/v1/misses", &body).await;
        assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
    }
    // Until both misses are handled: the selected image's host is asked for its manifest, the
    // other miss is counted as refused.
    let refused = "hermes_controller_misses_refused_total{reason=\"Unselected\"} 1";
    let started = Instant::now();
    while selected.connections() == 0 || !metrics_text(&api).await.contains(refused) {
        e.run_for(Duration::from_millis(50)).await;
        assert_eq!(
            unselected.connections(),
            0,
            "the controller contacted the host of an image no policy selects"
        );
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "misses not handled after 60 s: {} connections to the selected host; metrics:\n{}",
            selected.connections(),
            metrics_text(&api).await
        );
    }
    assert_eq!(unselected.connections(), 0);
}

/// One request to the API over a real TCP connection; the whole answer as text.
async fn http(api: &NodeApi, method: &str, path: &str, body: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(hermes_controller::api::serve(
        listener,
        api.clone(),
        async {
            let _ = stopped.await;
        },
    ));
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).await.unwrap();
    let _ = stop.send(());
    String::from_utf8_lossy(&raw).into_owned()
}

/// The API's `/metrics`.
async fn metrics_text(api: &NodeApi) -> String {
    http(api, "GET", "/metrics", "").await
}
