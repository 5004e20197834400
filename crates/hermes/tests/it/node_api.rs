//! The node's index sources (`hermes-snapshotter`) against the controller's own node API
//! (`hermes-controller`): the two sides of the `hermes-node-api` contract together, with a
//! token, an `Off` policy and misses. Each side is also tested alone against the contract.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use hermes_controller::api::{Miss, NodeApi};
use hermes_oci::{Digest, Store};
use hermes_snapshotter::RemoteLayer;
use hermes_snapshotter::config::ControllerConfig;
use hermes_snapshotter::sources::{Answer, IndexSources, Lookup, Source};
use hermes_testkit::{PushedImage, Registry, TestImage};

use crate::node::index;

/// The controller's node API (hermes-controller's own server) over a zTOC store, on a port.
pub(crate) struct Controller {
    pub(crate) url: String,
    pub(crate) api: NodeApi,
    /// Misses the API accepted.
    pub(crate) misses: Mutex<tokio::sync::mpsc::Receiver<Miss>>,
    /// Pull reports the API accepted.
    pub(crate) pulls: Mutex<tokio::sync::mpsc::Receiver<hermes_node_api::PullReport>>,
    /// Multi-threaded, so the node's sources can `block_on` its handle from the test thread.
    pub(crate) runtime: tokio::runtime::Runtime,
}

impl Controller {
    /// Without a token.
    pub(crate) fn start(store: &Path) -> Controller {
        Self::start_with(store, None)
    }

    /// Guarding `/v1/*` with `token`, if any.
    pub(crate) fn start_with(store: &Path, token: Option<&str>) -> Controller {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let (tx, misses) = tokio::sync::mpsc::channel(16);
        let api = NodeApi::new(
            Store::open(store).expect("store"),
            token.map(str::to_owned),
            vec![256 << 10],
            tx,
        );
        let (tx, pulls) = tokio::sync::mpsc::channel(16);
        api.set_pull_reports(hermes_controller::api::PullSink::To(tx));
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        runtime.spawn(hermes_controller::api::serve(
            listener,
            api.clone(),
            std::future::pending(),
        ));
        Controller {
            url,
            api,
            misses: Mutex::new(misses),
            pulls: Mutex::new(pulls),
            runtime,
        }
    }

    /// `GET path` → (status, body).
    pub(crate) fn get(&self, path: &str) -> (u16, String) {
        let addr = self.url.trim_start_matches("http://").to_owned();
        let mut s = std::net::TcpStream::connect(addr).expect("controller");
        use std::io::Write;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read");
        let status = out
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    }

    /// The node's sources asking this controller with `token`, over a store in `dir`.
    fn node(&self, dir: &Path, token: &str) -> IndexSources {
        let file = dir.join("token");
        std::fs::write(&file, format!("{token}\n")).expect("token");
        let mut config = ControllerConfig::new(self.url.clone());
        config.token_file = Some(file);
        let store = Store::open(dir.join("node")).expect("store");
        IndexSources::new(store, Some(&config), None, self.runtime.handle().clone())
            .expect("sources")
    }

    /// The next miss, if one arrives within `wait`.
    fn next_miss(&self, wait: Duration) -> Option<Miss> {
        let mut misses = self.misses.lock().unwrap_or_else(|p| p.into_inner());
        self.runtime
            .block_on(async { tokio::time::timeout(wait, misses.recv()).await })
            .ok()
            .flatten()
    }
}

/// What containerd's labels say about `layer` of `image`.
fn remote(image: &PushedImage, layer: &str) -> RemoteLayer {
    RemoteLayer {
        target: "sha256:chain".into(),
        layer_digest: layer.into(),
        image_ref: Some(image.reference.clone()),
        manifest_digest: Some(image.manifest_digest.clone()),
        parent: None,
        labels: BTreeMap::new(),
    }
}

#[test]
fn a_ztoc_comes_from_the_controller_once_then_from_the_local_store() {
    let registry = Registry::start().expect("registry");
    let pushed = TestImage::new()
        .file("srv/app.py", b"print('hi')\n".to_vec())
        .big_file("srv/model.bin", 2)
        .push(&registry.host(), "src/ctrl:v1")
        .expect("push");
    let dir = tempfile::tempdir().expect("tempdir");
    index(&pushed.reference, &dir.path().join("controller"));
    let controller = Controller::start_with(&dir.path().join("controller"), Some("s3cret"));
    let sources = controller.node(dir.path(), "s3cret");

    let l = &pushed.layers[0];
    let want = Store::open(dir.path().join("controller"))
        .expect("store")
        .any_ztoc_for_layer(&Digest::parse(&l.digest).unwrap())
        .unwrap()
        .expect("controller has the zTOC");
    let lookup = || {
        sources
            .find(&remote(&pushed, &l.digest), None)
            .expect("lookup")
    };
    let found = lookup().into_ztoc().expect("found");
    assert_eq!((found.source, &found.digest), (Source::Controller, &want));
    let again = lookup().into_ztoc().expect("found");
    assert_eq!((again.source, &again.digest), (Source::Local, &want));
    assert_eq!(sources.counters().get(Source::Controller, Lookup::Found), 1);

    // The controller is the authority: once an Off policy covers the image, the copy the node
    // keeps is not used either.
    let host = registry.host();
    let off = hermes_controller::policy::parse_policies(
        &format!(
            "apiVersion: hermes.dev/v1alpha1\nkind: HermesPolicy\nmetadata: {{name: stop}}\n\
             spec:\n  images: [\"{host}/src/**\"]\n  mode: Off\n"
        ),
        "test",
    )
    .expect("policy");
    controller.api.set_active_policies(off);
    match lookup() {
        Answer::Disabled(reason) => assert_eq!(reason, "policy stop has mode Off"),
        other => panic!("an Off policy must refuse the image: {other:?}"),
    }
    assert_eq!(
        sources.counters().get(Source::Controller, Lookup::Refused),
        1
    );
    // Off for one namespace only: a lookup naming a pod there is refused, one naming a pod
    // elsewhere or no pod is answered.
    let batch_only = hermes_controller::policy::parse_policies(
        &format!(
            "apiVersion: hermes.dev/v1alpha1\nkind: HermesPolicy\nmetadata: {{name: stop-batch}}\n\
             spec:\n  images: [\"{host}/src/**\"]\n  mode: Off\n  \
             namespaceSelector: {{matchLabels: {{team: batch}}}}\n"
        ),
        "test",
    )
    .expect("policy");
    controller.api.set_active_policies(batch_only);
    controller.api.set_namespace_labels(
        [(
            "jobs".to_owned(),
            [("team".to_owned(), "batch".to_owned())].into(),
        )]
        .into(),
    );
    let in_namespace = |namespace: &str| hermes_node_api::PodRef {
        namespace: namespace.to_owned(),
        name: "p".to_owned(),
        ..Default::default()
    };
    let layer = remote(&pushed, &l.digest);
    assert!(matches!(
        sources
            .find(&layer, Some(&in_namespace("jobs")))
            .expect("lookup"),
        Answer::Disabled(_)
    ));
    assert!(matches!(
        sources
            .find(&layer, Some(&in_namespace("shop")))
            .expect("lookup"),
        Answer::Ztoc(_)
    ));
    assert!(matches!(lookup(), Answer::Ztoc(_)));
    controller.api.set_active_policies(Vec::new());

    // A layer the controller does not know: not found, and the image is reported once, with
    // its pod when the node knows it.
    let unknown = remote(&pushed, Digest::of(b"x").as_str());
    assert!(matches!(
        sources.find(&unknown, None).expect("lookup"),
        Answer::NotIndexed
    ));
    let pod = hermes_node_api::PodRef {
        namespace: "team".into(),
        name: "web-1".into(),
        uid: "u1".into(),
        labels: [("app".to_owned(), "web".to_owned())].into(),
    };
    sources.report_miss(&unknown, Some(pod.clone()));
    sources.report_miss(&unknown, None);
    let miss = controller
        .next_miss(Duration::from_secs(10))
        .expect("a miss arrives");
    assert_eq!(miss.image, pushed.reference);
    assert_eq!(
        miss.pod,
        Some(pod),
        "the namespace and labels reach the controller"
    );
    assert_eq!(
        miss.digest.as_ref().map(Digest::as_str),
        Some(pushed.manifest_digest.as_str())
    );
    assert!(
        controller.next_miss(Duration::from_millis(300)).is_none(),
        "a second miss for the same image was reported"
    );
}

#[test]
fn a_wrong_token_is_a_failed_lookup_not_a_missing_ztoc() {
    let dir = tempfile::tempdir().expect("tempdir");
    let controller = Controller::start_with(&dir.path().join("controller"), Some("right"));
    let sources = controller.node(dir.path(), "wrong");
    let image = PushedImage {
        reference: "127.0.0.1:1/x:y".into(),
        manifest_digest: Digest::of(b"m").to_string(),
        config_digest: String::new(),
        os: String::new(),
        architecture: String::new(),
        layers: Vec::new(),
    };
    let err = sources
        .find(&remote(&image, Digest::of(b"layer").as_str()), None)
        .expect_err("unauthorised");
    let chain = hermes_node_api::error_chain(&err);
    assert!(chain.contains("401"), "{chain}");
    assert_eq!(
        sources.counters().get(Source::Controller, Lookup::Failed),
        1
    );
}
