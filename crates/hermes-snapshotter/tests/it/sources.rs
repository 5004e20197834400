//! The node's index sources against real servers: a node API built from the contract
//! (`hermes-node-api`) with a token, SOCI v2 and v1 indexes pushed to a real registry, and
//! misses. The node against the controller's own server is in the `hermes` crate's tests.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use hermes_node_api::{
    CONTENT_DIGEST_HEADER, DISABLED_HEADER, Miss, PrefetchProfile, TraceReport, ZtocQuery,
    disabled_header_value, error_chain, etag, labels, not_modified, paths,
};
use hermes_oci::soci::SociVersion;
use hermes_oci::{Client, ClientOptions, Digest, IndexOptions, Reference, Store};
use hermes_snapshotter::RemoteLayer;
use hermes_snapshotter::config::ControllerConfig;
use hermes_snapshotter::sources::{Answer, IndexSources, Lookup, Source};
use hermes_testkit::{Registry, TestImage};

fn client() -> Client {
    Client::new(ClientOptions {
        plain_http: true,
        ..ClientOptions::default()
    })
    .expect("client")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn layer(image: &str, manifest: &str, digest: &str) -> RemoteLayer {
    let labels = BTreeMap::from([
        (labels::SNAPSHOT_REF.to_owned(), "sha256:chain".to_owned()),
        (labels::CRI_LAYER_DIGEST.to_owned(), digest.to_owned()),
        (labels::CRI_IMAGE_REF.to_owned(), image.to_owned()),
        (labels::CRI_MANIFEST_DIGEST.to_owned(), manifest.to_owned()),
    ]);
    RemoteLayer {
        target: "sha256:chain".into(),
        layer_digest: digest.into(),
        image_ref: Some(image.into()),
        manifest_digest: Some(manifest.into()),
        parent: None,
        labels,
    }
}

/// An image pushed to a real registry and indexed into `store`.
fn indexed(
    rt: &tokio::runtime::Runtime,
    registry: &Registry,
    repo: &str,
    store: &Store,
) -> (hermes_testkit::PushedImage, hermes_oci::IndexResult) {
    let pushed = TestImage::new()
        .file("srv/app.py", b"print('hi')\n".to_vec())
        .big_file("srv/model.bin", 2)
        .push(&registry.host(), repo)
        .expect("push");
    let reference = Reference::parse(&pushed.reference).expect("reference");
    let options = IndexOptions {
        min_layer_size: 0,
        span_size: 256 << 10,
        ..IndexOptions::default()
    };
    let result = rt
        .block_on(hermes_oci::build_index(
            &client(),
            store,
            &reference,
            &options,
            &|_| {},
        ))
        .expect("index");
    (pushed, result)
}

/// A node API built from the contract's paths, types and header rules alone: what any
/// controller must answer. (The real controller's server is tested against the node in the
/// `hermes` crate's integration tests.)
#[derive(Debug, Default)]
struct Contract {
    token: Option<String>,
    /// zTOC bytes by layer.
    ztocs: Mutex<HashMap<Digest, Vec<u8>>>,
    /// Set: every lookup is refused with this reason.
    refusal: Mutex<Option<String>>,
    /// Announce a digest the zTOC body does not have.
    wrong_digest: AtomicBool,
    /// zTOC bodies sent, and 304s answered.
    sent: AtomicUsize,
    confirmed: AtomicUsize,
    misses: Mutex<Vec<Miss>>,
    traces: Mutex<Vec<TraceReport>>,
    profiles: Mutex<HashMap<Digest, PrefetchProfile>>,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Contract {
    /// Serves the contract on a port of `rt`; its base URL.
    fn serve(self: &Arc<Self>, rt: &tokio::runtime::Runtime) -> String {
        use axum::routing::{get, post};
        let router = axum::Router::new()
            .route(paths::ZTOC, get(contract_ztoc))
            .route(paths::PREFETCH, get(contract_prefetch))
            .route(paths::MISSES, post(contract_miss))
            .route(paths::TRACES, post(contract_trace))
            .with_state(Arc::clone(self));
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        rt.spawn(async move { axum::serve(listener, router).await });
        url
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        self.token
            .as_ref()
            .is_none_or(|t| given == Some(format!("Bearer {t}").as_str()))
    }
}

type Shared = State<Arc<Contract>>;

async fn contract_ztoc(
    State(c): Shared,
    Path(layer): Path<String>,
    Query(query): Query<ZtocQuery>,
    headers: HeaderMap,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    assert!(
        query.image.is_some() && query.manifest.is_some(),
        "{query:?}"
    );
    if !c.authorized(&headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    if let Some(reason) = locked(&c.refusal).clone() {
        let value = disabled_header_value(&reason);
        return (StatusCode::NOT_FOUND, [(DISABLED_HEADER, value)]).into_response();
    }
    let layer = Digest::parse(&layer).expect("layer digest");
    let Some(bytes) = locked(&c.ztocs).get(&layer).cloned() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let digest = Digest::of(&bytes);
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| not_modified(v, &digest))
    {
        c.confirmed.fetch_add(1, Ordering::SeqCst);
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, etag(&digest))]).into_response();
    }
    let announced = if c.wrong_digest.load(Ordering::SeqCst) {
        Digest::of(b"other")
    } else {
        digest.clone()
    };
    c.sent.fetch_add(1, Ordering::SeqCst);
    (
        [
            (header::ETAG.as_str(), etag(&digest)),
            (CONTENT_DIGEST_HEADER, announced.to_string()),
        ],
        bytes,
    )
        .into_response()
}

async fn contract_prefetch(
    State(c): Shared,
    Path(layer): Path<String>,
) -> Result<axum::Json<PrefetchProfile>, StatusCode> {
    let layer = Digest::parse(&layer).map_err(|_| StatusCode::BAD_REQUEST)?;
    let profile = locked(&c.profiles).get(&layer).cloned();
    profile.map(axum::Json).ok_or(StatusCode::NOT_FOUND)
}

async fn contract_miss(State(c): Shared, axum::Json(miss): axum::Json<Miss>) -> StatusCode {
    locked(&c.misses).push(miss);
    StatusCode::ACCEPTED
}

async fn contract_trace(
    State(c): Shared,
    axum::Json(report): axum::Json<TraceReport>,
) -> StatusCode {
    locked(&c.traces).push(report);
    StatusCode::ACCEPTED
}

/// A real zTOC of a one-layer image: (layer digest, zTOC bytes).
fn a_ztoc(dir: &std::path::Path) -> (Digest, Vec<u8>) {
    let image = TestImage::new()
        .file("srv/app.py", b"print('hi')\n".to_vec())
        .write_layout(&dir.join("layout"), "v1")
        .expect("layout");
    let layer = Digest::parse(&image.layers[0].digest).expect("digest");
    let blob = dir.join("layout/blobs/sha256").join(layer.hex());
    let ztoc = hermes_ztoc::build(
        std::fs::File::open(&blob).expect("layer blob"),
        &hermes_ztoc::BuildOptions::default(),
    )
    .expect("zTOC");
    (layer, ztoc.to_bytes())
}

/// The node's sources with only a controller, over a store in `dir`.
fn node_sources(
    dir: &std::path::Path,
    controller: &ControllerConfig,
    rt: &tokio::runtime::Runtime,
) -> hermes_snapshotter::Result<IndexSources> {
    IndexSources::new(
        Store::open(dir.join("n")).expect("store"),
        Some(controller),
        None,
        rt.handle().clone(),
    )
}

/// A controller config for `url` with a token file holding `token`.
fn with_token(dir: &std::path::Path, url: &str, token: &str) -> ControllerConfig {
    let file = dir.join("token");
    std::fs::write(&file, format!("{token}\n")).expect("token");
    let mut controller = ControllerConfig::new(url);
    controller.token_file = Some(file);
    controller
}

/// Polls `ready` until it holds (a spawned request arrives), for at most 10 s.
fn poll(what: &str, ready: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !ready() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what} did not happen"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[test]
fn a_controllers_ztoc_is_kept_then_confirmed_with_304_and_a_refusal_overrides_the_copy() {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let (l, ztoc) = a_ztoc(dir.path());
    let contract = Arc::new(Contract {
        token: Some("s3cret".into()),
        ..Contract::default()
    });
    locked(&contract.ztocs).insert(l.clone(), ztoc.clone());
    let url = contract.serve(&rt);
    let sources =
        node_sources(dir.path(), &with_token(dir.path(), &url, "s3cret"), &rt).expect("sources");
    let manifest = Digest::of(b"manifest").to_string();
    let wanted = layer("registry.test/app:v1", &manifest, l.as_str());

    let found = sources
        .find(&wanted, None)
        .expect("lookup")
        .into_ztoc()
        .expect("found");
    assert_eq!(
        (found.source, &found.digest, &found.bytes),
        (Source::Controller, &Digest::of(&ztoc), &ztoc)
    );
    // The second lookup names the kept copy; the controller confirms it without sending it.
    let again = sources
        .find(&wanted, None)
        .expect("lookup")
        .into_ztoc()
        .expect("found");
    assert_eq!(
        (again.source, &again.digest),
        (Source::Local, &found.digest)
    );
    assert_eq!(
        (
            contract.sent.load(Ordering::SeqCst),
            contract.confirmed.load(Ordering::SeqCst)
        ),
        (1, 1)
    );
    assert_eq!(sources.counters().get(Source::Controller, Lookup::Found), 1);

    // A refusal wins over the kept copy.
    *locked(&contract.refusal) = Some("policy stop has mode Off".into());
    match sources.find(&wanted, None).expect("lookup") {
        Answer::Disabled(reason) => assert_eq!(reason, "policy stop has mode Off"),
        other => panic!("a refusal must disable the lazy start: {other:?}"),
    }
    assert_eq!(
        sources.counters().get(Source::Controller, Lookup::Refused),
        1
    );
    *locked(&contract.refusal) = None;

    // A layer the controller does not know: not found, and the image is reported once.
    let unknown = layer("registry.test/app:v1", &manifest, Digest::of(b"x").as_str());
    assert!(matches!(
        sources.find(&unknown, None).expect("lookup"),
        Answer::NotIndexed
    ));
    sources.report_miss(&unknown, None);
    sources.report_miss(&unknown, None);
    let other = layer(
        "registry.test/other:v1",
        &Digest::of(b"m2").to_string(),
        l.as_str(),
    );
    sources.report_miss(&other, None);
    poll("two misses", || locked(&contract.misses).len() >= 2);
    let misses = locked(&contract.misses).clone();
    let app: Vec<_> = misses
        .iter()
        .filter(|m| m.image == "registry.test/app:v1")
        .collect();
    assert_eq!(app.len(), 1, "one miss per manifest: {misses:?}");
    assert_eq!(
        app[0].digest.as_ref().map(Digest::as_str),
        Some(manifest.as_str())
    );

    // Startup traces go up as a TraceReport; the merged profile comes back.
    sources.post_trace(l.as_str(), &[3, 1]).expect("trace");
    let traces = locked(&contract.traces).clone();
    assert_eq!(traces.len(), 1);
    assert_eq!(traces[0].layers[&l], vec![3, 1]);
    assert_eq!(sources.prefetch_profile(&l), None, "no profile yet");
    locked(&contract.profiles).insert(
        l.clone(),
        PrefetchProfile {
            layer: l.clone(),
            spans: vec![2, 0],
            traces: 3,
        },
    );
    let saved: serde_json::Value =
        serde_json::from_slice(&sources.prefetch_profile(&l).expect("a profile")).expect("json");
    assert_eq!(saved["spans"], serde_json::json!([2, 0]));
}

#[test]
fn a_wrong_token_is_a_failed_lookup_not_a_missing_ztoc() {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let contract = Arc::new(Contract {
        token: Some("right".into()),
        ..Contract::default()
    });
    let url = contract.serve(&rt);
    let sources = node_sources(dir.path(), &with_token(dir.path(), &url, "wrong"), &rt).unwrap();
    let d = Digest::of(b"layer").to_string();
    let err = sources
        .find(
            &layer("127.0.0.1:1/x:y", &Digest::of(b"m").to_string(), &d),
            None,
        )
        .expect_err("unauthorised");
    let failed = sources.counters().get(Source::Controller, Lookup::Failed);
    assert!(error_chain(&err).contains("401"), "{}", error_chain(&err));
    assert_eq!(failed, 1, "a refused token is a failed lookup");
}

#[test]
fn a_ztoc_whose_body_is_not_the_digest_its_header_names_is_not_kept() {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let (l, ztoc) = a_ztoc(dir.path());
    let contract = Arc::new(Contract::default());
    locked(&contract.ztocs).insert(l.clone(), ztoc);
    contract.wrong_digest.store(true, Ordering::SeqCst);
    let url = contract.serve(&rt);
    let sources = node_sources(dir.path(), &ControllerConfig::new(url), &rt).unwrap();
    let err = sources
        .find(
            &layer(
                "registry.test/app:v1",
                &Digest::of(b"m").to_string(),
                l.as_str(),
            ),
            None,
        )
        .expect_err("a zTOC with the wrong digest");
    assert!(
        error_chain(&err).contains(Digest::of(b"other").as_str()),
        "{}",
        error_chain(&err)
    );
    assert_eq!(sources.store().any_ztoc_for_layer(&l).unwrap(), None);
}

#[test]
fn ztocs_are_found_in_soci_v2_and_v1_indexes_in_the_registry() {
    let rt = runtime();
    let registry = Registry::start().expect("registry");
    let dir = tempfile::tempdir().expect("tempdir");
    let build_store = Store::open(dir.path().join("build")).expect("store");
    for (version, repo) in [
        (SociVersion::V2, "src/v2:v1"),
        (SociVersion::V1, "src/v1:v1"),
    ] {
        let (pushed, result) = indexed(&rt, &registry, repo, &build_store);
        let target = Reference::parse(&match version {
            SociVersion::V2 => pushed.reference.replace(":v1", ":v1-soci"),
            SociVersion::V1 => pushed.reference.clone(),
        })
        .unwrap();
        rt.block_on(hermes_oci::push_soci(
            &client(),
            &build_store,
            &result,
            version,
            &target,
            hermes_ztoc::SOCI_BUILD_TOOL_IDENTIFIER,
        ))
        .expect("push soci");
        // What containerd pulls: for v2 the converted image (its manifest carries the index
        // digest), for v1 the original one.
        let (image, manifest) = match version {
            SociVersion::V2 => {
                let resolved = rt
                    .block_on(client().resolve(&target, &hermes_oci::manifest::Platform::host()))
                    .expect("resolve converted image");
                (target.to_string(), resolved.fetched.digest.to_string())
            }
            SociVersion::V1 => (pushed.reference.clone(), pushed.manifest_digest.clone()),
        };
        let sources = IndexSources::new(
            Store::open(
                dir.path()
                    .join(format!("node-{repo}").replace([':', '/'], "-")),
            )
            .unwrap(),
            None,
            Some(client()),
            rt.handle().clone(),
        )
        .unwrap();
        let l = &pushed.layers[0];
        let found = sources
            .find(&layer(&image, &manifest, &l.digest), None)
            .expect("lookup")
            .into_ztoc()
            .unwrap_or_else(|| panic!("{version:?}: no zTOC found"));
        let want = build_store
            .any_ztoc_for_layer(&Digest::parse(&l.digest).unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(
            (found.source, found.digest),
            (Source::Registry, want),
            "{version:?}"
        );
        // An image without SOCI artifacts: nothing, no error.
        let plain = TestImage::new()
            .file("a", b"a".to_vec())
            .push(
                &registry.host(),
                &format!("{}-plain:v1", repo.replace(":v1", "")),
            )
            .expect("push");
        assert!(
            sources
                .find(
                    &layer(
                        &plain.reference,
                        &plain.manifest_digest,
                        &plain.layers[0].digest
                    ),
                    None
                )
                .expect("lookup")
                .into_ztoc()
                .is_none()
        );
    }
}

/// A one-connection server that answers any request with `head` and `body`, then holds the
/// connection open without sending more until the client closes it.
fn serve_once_then_hold(head: String, body: Vec<u8>) -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    std::thread::spawn(move || {
        let Ok((mut conn, _)) = listener.accept() else {
            return;
        };
        let mut request = Vec::new();
        let mut buf = [0u8; 4096];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => request.extend_from_slice(&buf[..n]),
            }
        }
        let _ = conn.write_all(head.as_bytes());
        let _ = conn.write_all(&body);
        // Hold until the client gives up on the connection.
        while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
    });
    url
}

#[test]
fn a_controller_announcing_a_ztoc_beyond_the_cap_is_not_read() {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        1u64 << 40
    );
    let url = serve_once_then_hold(head, vec![0; 64 << 10]);
    let mut controller = ControllerConfig::new(url.clone());
    // Long enough that only the cap, not the timeout, can end the read.
    controller.timeout_ms = 60_000;
    let sources = node_sources(dir.path(), &controller, &rt).unwrap();
    let d = Digest::of(b"layer").to_string();
    let err = sources
        .find(
            &layer("127.0.0.1:1/x:y", &Digest::of(b"m").to_string(), &d),
            None,
        )
        .expect_err("too large");
    let message = error_chain(&err);
    assert!(
        message.contains(&url)
            && message.contains(&format!(
                "larger than {} bytes",
                hermes_snapshotter::sources::MAX_ZTOC_SIZE
            )),
        "{message}"
    );
    assert_eq!(
        sources.counters().get(Source::Controller, Lookup::Failed),
        1
    );
}

#[test]
fn a_token_file_beyond_the_cap_is_refused() {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("token");
    std::fs::write(&token, vec![b'a'; 1 << 20]).unwrap();
    let mut controller = ControllerConfig::new("http://127.0.0.1:1");
    controller.token_file = Some(token.clone());
    let Err(err) = node_sources(dir.path(), &controller, &rt) else {
        panic!("a 1 MiB token file was accepted")
    };
    let hermes_snapshotter::Error::Io { op, path, source } = &err else {
        panic!("expected an I/O error, got {err:?}")
    };
    assert_eq!((*op, path), ("read token file", &token));
    assert_eq!(source.kind(), std::io::ErrorKind::FileTooLarge, "{source}");
}
