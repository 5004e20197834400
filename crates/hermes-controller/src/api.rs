//! The node API (design.md §3) over HTTP/1.1 with axum: nodes fetch zTOCs and image status
//! and report misses.
//!
//! - `GET /v1/layers/{layer-digest}/ztoc[?image=REF&manifest=DIGEST]` → zTOC bytes from the
//!   [`Store`], with `Docker-Content-Digest`; 404 if none (span sizes tried in the configured
//!   order). `If-None-Match: "DIGEST"` answers 304 when that is still the zTOC, so a node can
//!   check a copy it keeps. When an `Off` policy matches the image (see
//!   [`off_for_node`](crate::matcher::off_for_node)) or the controller skipped the manifest for
//!   one, the answer is 404 with a `Hermes-Disabled` header giving the reason: the node must
//!   not start the image lazily, whatever copy it has;
//! - `GET /v1/images/{manifest-digest}` → the image's [`ImageReport`] (as the controller loop last
//!   published it), else its stored record; 404 if neither;
//! - `GET /v1/images` → every image report; `GET /v1/policies` → every policy's status (also
//!   of policies that failed validation, with the reason);
//! - `POST /v1/misses` → `{"image": REF, "digest"?: DIGEST, "node"?: NAME}`, handed to the
//!   controller loop through a bounded channel (202; 503 when the channel is full);
//! - `POST /v1/traces` → a [`TraceReport`] of startup reads (202);
//!   `GET /v1/layers/{layer-digest}/prefetch` → the merged [`PrefetchProfile`](crate::prefetch::PrefetchProfile), 404 if none;
//! - `GET /healthz`, `GET /readyz` (503 until [`NodeApi::set_ready`]), `GET /metrics`.
//!
//! `/v1/*` needs `Authorization: Bearer TOKEN` when a token is configured. Health and metrics
//! do not. TLS with [`serve_tls`] (see [`crate::tls`]). Each layer's recent traces are saved
//! under the store's directory (`profiles/<layer hex>.json`) and read back by [`NodeApi::new`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hermes_oci::{Digest, Reference, Store};
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::matcher::off_for_node;
use crate::policy::Policy;
use crate::prefetch::{ProfileBook, TraceReport};
use crate::reconcile::Phase;
use crate::status::{ImageReport, PolicyReport};

/// A node's report that it started an image without an index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Miss {
    /// The image reference the node started.
    pub image: String,
    /// Its manifest digest, if the node knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<Digest>,
    /// The reporting node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// How a layer build ended (a bounded metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
pub enum BuildOutcome {
    /// A zTOC was stored.
    Indexed,
    /// The layer cannot be indexed (recorded as skipped).
    Skipped,
    /// The attempt failed.
    Failed,
    /// The job was cancelled.
    Cancelled,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BuildLabels {
    outcome: BuildOutcome,
}

/// Counters and gauges the API and the controller loop update.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// zTOCs served.
    pub artifacts_served: Counter,
    /// zTOC requests answered 404.
    pub artifacts_missing: Counter,
    /// zTOC requests refused because an `Off` policy matches the image.
    pub artifacts_refused: Counter,
    /// Misses accepted from nodes.
    pub misses: Counter,
    /// Images in the build queue (set by the controller loop).
    pub queue_depth: Gauge,
    builds: Family<BuildLabels, Counter>,
    build_seconds: Histogram,
    bytes_read: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            artifacts_served: Counter::default(),
            artifacts_missing: Counter::default(),
            artifacts_refused: Counter::default(),
            misses: Counter::default(),
            queue_depth: Gauge::default(),
            builds: Family::default(),
            // 0.5 s … ~34 min
            build_seconds: Histogram::new(exponential_buckets(0.5, 2.0, 13)),
            bytes_read: Counter::default(),
        }
    }
}

impl Metrics {
    /// Count a finished layer build: its outcome, how long it took, bytes read from the
    /// registry.
    pub fn record_build(&self, outcome: BuildOutcome, seconds: f64, bytes_read: u64) {
        self.builds.get_or_create(&BuildLabels { outcome }).inc();
        self.build_seconds.observe(seconds);
        self.bytes_read.inc_by(bytes_read);
    }

    fn register(&self, registry: &mut Registry) {
        registry.register(
            "hermes_controller_artifacts_served",
            "zTOCs served to nodes",
            self.artifacts_served.clone(),
        );
        registry.register(
            "hermes_controller_artifacts_missing",
            "zTOC requests for layers without one",
            self.artifacts_missing.clone(),
        );
        registry.register(
            "hermes_controller_artifacts_refused",
            "zTOC requests refused because an Off policy matches the image",
            self.artifacts_refused.clone(),
        );
        registry.register(
            "hermes_controller_misses",
            "images nodes started without an index",
            self.misses.clone(),
        );
        registry.register(
            "hermes_controller_queue_depth",
            "images waiting in the build queue",
            self.queue_depth.clone(),
        );
        registry.register(
            "hermes_controller_builds",
            "layer builds by outcome",
            self.builds.clone(),
        );
        registry.register(
            "hermes_controller_build_seconds",
            "time per layer build",
            self.build_seconds.clone(),
        );
        registry.register(
            "hermes_controller_bytes_read",
            "layer bytes read from registries",
            self.bytes_read.clone(),
        );
    }
}

/// The node API's shared state; cheap to clone.
#[derive(Debug, Clone)]
pub struct NodeApi {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Store,
    token: Option<String>,
    span_sizes: RwLock<Vec<u64>>,
    images: RwLock<BTreeMap<Digest, ImageReport>>,
    policies: RwLock<Vec<PolicyReport>>,
    /// The valid policies, for refusing images an `Off` policy matches.
    active: RwLock<Vec<Policy>>,
    misses: mpsc::Sender<Miss>,
    profiles: RwLock<ProfileBook>,
    /// Held while a trace report is added and saved, so saves happen in the order of the
    /// additions and never share the temp file.
    saving: tokio::sync::Mutex<()>,
    ready: AtomicBool,
    metrics: Metrics,
    registry: Registry,
}

/// Every way a request can fail, converted to HTTP in one place.
#[derive(Debug)]
enum ApiError {
    BadDigest(String),
    BadBody(String),
    NotFound(&'static str),
    /// An `Off` policy forbids lazy starts of the image; the reason.
    Disabled(String),
    Unauthorized,
    Busy,
    Store(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let disabled = match &self {
            Self::Disabled(reason) => Some(reason.clone()),
            _ => None,
        };
        let (status, message) = match self {
            Self::BadDigest(d) => (
                StatusCode::BAD_REQUEST,
                format!("{d:?} is not a digest (sha256:<64 hex>)"),
            ),
            Self::BadBody(e) => (StatusCode::BAD_REQUEST, format!("bad request body: {e}")),
            Self::NotFound(what) => (StatusCode::NOT_FOUND, format!("no {what}")),
            Self::Disabled(reason) => (StatusCode::NOT_FOUND, reason),
            Self::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "a bearer token is required".to_owned(),
            ),
            Self::Busy => (
                StatusCode::SERVICE_UNAVAILABLE,
                "too many pending misses; retry later".to_owned(),
            ),
            Self::Store(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("store: {e}")),
        };
        let mut response =
            (status, axum::Json(serde_json::json!({ "error": message }))).into_response();
        if let Some(reason) = disabled
            && let Ok(value) = HeaderValue::from_str(reason.as_str())
        {
            response.headers_mut().insert(DISABLED_HEADER, value);
        }
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// The header of a zTOC answer that forbids a lazy start (its value says why).
pub const DISABLED_HEADER: header::HeaderName = header::HeaderName::from_static("hermes-disabled");

fn parse_digest(text: &str) -> Result<Digest, ApiError> {
    Digest::parse(text).map_err(|_| ApiError::BadDigest(text.to_owned()))
}

/// Byte comparison whose time does not depend on where the first difference is.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl NodeApi {
    /// An API over `store`; `token` (if any) guards `/v1/*`; zTOCs are looked up for each of
    /// `span_sizes` in order; accepted misses go to `misses`.
    pub fn new(
        store: Store,
        token: Option<String>,
        span_sizes: Vec<u64>,
        misses: mpsc::Sender<Miss>,
    ) -> Self {
        let metrics = Metrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let profiles = load_profiles(&profiles_dir(&store));
        Self {
            inner: Arc::new(Inner {
                store,
                token,
                span_sizes: RwLock::new(span_sizes),
                images: RwLock::new(BTreeMap::new()),
                policies: RwLock::new(Vec::new()),
                active: RwLock::new(Vec::new()),
                misses,
                profiles: RwLock::new(profiles),
                saving: tokio::sync::Mutex::new(()),
                ready: AtomicBool::new(false),
                metrics,
                registry,
            }),
        }
    }

    /// Mark the controller ready (or not) for `/readyz`.
    pub fn set_ready(&self, ready: bool) {
        self.inner.ready.store(ready, Ordering::Relaxed);
    }

    /// Publish the image reports.
    pub fn set_images(&self, reports: impl IntoIterator<Item = ImageReport>) {
        let map = reports
            .into_iter()
            .map(|r| (r.status.digest.clone(), r))
            .collect();
        *self.inner.images.write().unwrap_or_else(|e| e.into_inner()) = map;
    }

    /// Publish the policy statuses.
    pub fn set_policies(&self, policies: Vec<PolicyReport>) {
        *self
            .inner
            .policies
            .write()
            .unwrap_or_else(|e| e.into_inner()) = policies;
    }

    /// Set the valid policies: images an `Off` policy matches are refused to nodes.
    pub fn set_active_policies(&self, policies: Vec<Policy>) {
        *self.inner.active.write().unwrap_or_else(|e| e.into_inner()) = policies;
    }

    /// Why nodes must not start `image` (resolved to `manifest`) lazily, if they must not.
    fn refusal(&self, image: Option<&Reference>, manifest: Option<&Digest>) -> Option<String> {
        if let Some(image) = image {
            let active = self.inner.active.read().unwrap_or_else(|e| e.into_inner());
            if let Some(policy) = off_for_node(&active, image, manifest) {
                return Some(format!("policy {} has mode Off", policy.name));
            }
        }
        // The controller saw the image running under an Off policy (one with selectors too).
        let images = self.inner.images.read().unwrap_or_else(|e| e.into_inner());
        let report = images.get(manifest?)?;
        (report.status.phase == Phase::Skipped)
            .then(|| report.status.reason.clone().unwrap_or_default())
    }

    /// Set the span sizes zTOCs are looked up with (those of the current policies).
    pub fn set_span_sizes(&self, span_sizes: Vec<u64>) {
        *self
            .inner
            .span_sizes
            .write()
            .unwrap_or_else(|e| e.into_inner()) = span_sizes;
    }

    /// The metrics in the OpenMetrics text format, as `GET /metrics` serves them.
    pub fn metrics_text(&self) -> String {
        let mut text = String::new();
        let _ = encode(&mut text, &self.inner.registry);
        text
    }

    /// The API's metrics, for the controller loop to update.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The routes.
    pub fn router(&self) -> Router {
        let v1 = Router::new()
            .route("/v1/layers/{digest}/ztoc", get(get_ztoc))
            .route("/v1/images", get(list_images))
            .route("/v1/images/{digest}", get(get_image))
            .route("/v1/policies", get(list_policies))
            .route("/v1/layers/{digest}/prefetch", get(get_prefetch))
            .route("/v1/misses", post(post_miss))
            .route("/v1/traces", post(post_traces))
            .route_layer(middleware::from_fn_with_state(self.clone(), require_token));
        Router::new()
            .merge(v1)
            .route("/healthz", get(|| async { "ok" }))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .with_state(self.clone())
    }
}

async fn require_token(
    State(api): State<NodeApi>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if let Some(token) = &api.inner.token {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| same_secret(g.as_bytes(), token.as_bytes())) {
            return Err(ApiError::Unauthorized);
        }
    }
    Ok(next.run(request).await)
}

/// What a node may say about the image a layer belongs to.
#[derive(Debug, Default, Deserialize)]
struct ZtocQuery {
    image: Option<String>,
    manifest: Option<String>,
}

async fn get_ztoc(
    State(api): State<NodeApi>,
    Path(digest): Path<String>,
    Query(query): Query<ZtocQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let layer = parse_digest(&digest)?;
    let manifest = query.manifest.as_deref().map(parse_digest).transpose()?;
    // An unparsable image name cannot match a policy; it is not an error of the request.
    let image = query
        .image
        .as_deref()
        .and_then(|i| Reference::parse(i).ok());
    if let Some(reason) = api.refusal(image.as_ref(), manifest.as_ref()) {
        api.inner.metrics.artifacts_refused.inc();
        return Err(ApiError::Disabled(reason));
    }
    let spans = api
        .inner
        .span_sizes
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let store = api.inner.store.clone();
    let found = tokio::task::spawn_blocking(move || -> hermes_oci::Result<_> {
        for span in spans {
            if let Some(ztoc) = store.ztoc_for_layer(&layer, span)?
                && let Some(bytes) = store.get_blob(&ztoc)?
            {
                return Ok(Some((ztoc, bytes)));
            }
        }
        Ok(None)
    })
    .await
    .map_err(|e| ApiError::Store(e.to_string()))?
    .map_err(|e| ApiError::Store(e.to_string()))?;
    let Some((ztoc, bytes)) = found else {
        api.inner.metrics.artifacts_missing.inc();
        return Err(ApiError::NotFound("zTOC for this layer"));
    };
    api.inner.metrics.artifacts_served.inc();
    let etag = format!("\"{ztoc}\"");
    if headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == etag.as_bytes())
    {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
    }
    Ok((
        [
            (header::ETAG, etag),
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (
                header::HeaderName::from_static("docker-content-digest"),
                ztoc.to_string(),
            ),
        ],
        Body::from(bytes),
    )
        .into_response())
}

async fn get_image(
    State(api): State<NodeApi>,
    Path(digest): Path<String>,
) -> Result<Response, ApiError> {
    let manifest = parse_digest(&digest)?;
    let status = api
        .inner
        .images
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(&manifest)
        .cloned();
    if let Some(status) = status {
        return Ok(axum::Json(status).into_response());
    }
    let store = api.inner.store.clone();
    let record = tokio::task::spawn_blocking(move || store.images())
        .await
        .map_err(|e| ApiError::Store(e.to_string()))?
        .map_err(|e| ApiError::Store(e.to_string()))?
        .into_iter()
        .find(|r| r.manifest_digest == manifest);
    match record {
        Some(record) => Ok(axum::Json(record).into_response()),
        None => Err(ApiError::NotFound("status for this image")),
    }
}

async fn list_images(State(api): State<NodeApi>) -> axum::Json<Vec<ImageReport>> {
    let images = api.inner.images.read().unwrap_or_else(|e| e.into_inner());
    axum::Json(images.values().cloned().collect())
}

async fn list_policies(State(api): State<NodeApi>) -> axum::Json<Vec<PolicyReport>> {
    let policies = api.inner.policies.read().unwrap_or_else(|e| e.into_inner());
    axum::Json(policies.clone())
}

async fn post_miss(
    State(api): State<NodeApi>,
    body: axum::body::Bytes,
) -> Result<StatusCode, ApiError> {
    let miss: Miss = serde_json::from_slice(&body).map_err(|e| ApiError::BadBody(e.to_string()))?;
    Reference::parse(&miss.image).map_err(|e| ApiError::BadBody(e.to_string()))?;
    api.inner
        .misses
        .try_send(miss)
        .map_err(|_| ApiError::Busy)?;
    api.inner.metrics.misses.inc();
    Ok(StatusCode::ACCEPTED)
}

/// Where the layers' recent traces are saved.
fn profiles_dir(store: &Store) -> std::path::PathBuf {
    store.root().join("profiles")
}

/// Saved traces: `{"traces": [[span, …], …]}` per layer.
#[derive(Debug, Default, Serialize, Deserialize)]
struct SavedTraces {
    traces: Vec<Vec<u32>>,
}

/// The traces saved in `dir` (unreadable files are skipped with a warning).
fn load_profiles(dir: &std::path::Path) -> ProfileBook {
    let mut book = ProfileBook::default();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return book;
    };
    for path in entries.flatten().map(|e| e.path()) {
        let layer = path
            .file_stem()
            .and_then(|s| s.to_str())
            .and_then(|hex| Digest::parse(&format!("sha256:{hex}")).ok());
        let saved = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<SavedTraces>(&b).ok());
        match (layer, saved) {
            (Some(layer), Some(saved)) => book.restore(layer, saved.traces),
            _ if path.extension().is_some_and(|e| e == "json") => {
                tracing::warn!(path = %path.display(), "unreadable saved traces; ignored");
            }
            _ => {}
        }
    }
    book
}

/// Save `traces` of `layer` atomically (temp file, rename).
fn save_traces(
    dir: &std::path::Path,
    layer: &Digest,
    traces: Vec<Vec<u32>>,
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("{}.json", layer.hex()));
    let tmp = dir.join(format!(".{}.tmp", layer.hex()));
    std::fs::write(
        &tmp,
        serde_json::to_vec(&SavedTraces { traces }).unwrap_or_default(),
    )?;
    std::fs::rename(&tmp, &path)
}

async fn post_traces(
    State(api): State<NodeApi>,
    body: axum::body::Bytes,
) -> Result<StatusCode, ApiError> {
    let report: TraceReport =
        serde_json::from_slice(&body).map_err(|e| ApiError::BadBody(e.to_string()))?;
    let layers: Vec<Digest> = report.layers.keys().cloned().collect();
    let _saving = api.inner.saving.lock().await;
    let saved: Vec<(Digest, Vec<Vec<u32>>)> = {
        let mut book = api
            .inner
            .profiles
            .write()
            .unwrap_or_else(|e| e.into_inner());
        book.add(report);
        layers
            .into_iter()
            .map(|l| {
                let traces = book.traces(&l);
                (l, traces)
            })
            .collect()
    };
    let dir = profiles_dir(&api.inner.store);
    tokio::task::spawn_blocking(move || {
        for (layer, traces) in saved {
            if let Err(e) = save_traces(&dir, &layer, traces) {
                tracing::warn!(%layer, error = %e, "cannot save startup traces; they last until a restart");
            }
        }
    })
    .await
    .map_err(|e| ApiError::Store(e.to_string()))?;
    Ok(StatusCode::ACCEPTED)
}

async fn get_prefetch(
    State(api): State<NodeApi>,
    Path(digest): Path<String>,
) -> Result<Response, ApiError> {
    let layer = parse_digest(&digest)?;
    let profile = api
        .inner
        .profiles
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .profile(&layer);
    profile
        .map(|p| axum::Json(p).into_response())
        .ok_or(ApiError::NotFound("prefetch profile for this layer"))
}

async fn readyz(State(api): State<NodeApi>) -> (StatusCode, &'static str) {
    if api.inner.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

async fn metrics(State(api): State<NodeApi>) -> Result<Response, ApiError> {
    let text = api.metrics_text();
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

/// Serve `api` over TLS on `listener` until `shutdown` completes.
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    tls: std::sync::Arc<rustls::ServerConfig>,
    api: NodeApi,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(crate::tls::TlsListener::new(listener, tls), api.router())
        .with_graceful_shutdown(shutdown)
        .await
}

/// Serve `api` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    api: NodeApi,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, api.router())
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Server {
        addr: std::net::SocketAddr,
        api: NodeApi,
        misses: mpsc::Receiver<Miss>,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        _dir: tempfile::TempDir,
        store: Store,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            if let Some(stop) = self.stop.take() {
                let _ = stop.send(());
            }
        }
    }

    async fn start(token: Option<&str>) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (tx, rx) = mpsc::channel(1);
        let api = NodeApi::new(
            store.clone(),
            token.map(str::to_owned),
            vec![1 << 20, 4 << 20],
            tx,
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        tokio::spawn(serve(listener, api.clone(), async {
            let _ = stopped.await;
        }));
        Server {
            addr,
            api,
            misses: rx,
            stop: Some(stop),
            _dir: dir,
            store,
        }
    }

    struct Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.body).into_owned()
        }
    }

    /// One HTTP/1.1 request over a real TCP connection.
    async fn request(
        s: &Server,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: &str,
    ) -> Reply {
        let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        request_with(s, method, path, &auth, body).await
    }

    /// [`request`] with extra header lines (each ending in CRLF).
    async fn request_with(s: &Server, method: &str, path: &str, extra: &str, body: &str) -> Reply {
        let mut conn = tokio::net::TcpStream::connect(s.addr).await.unwrap();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: test\r\n{extra}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        conn.write_all(req.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        conn.read_to_end(&mut raw).await.unwrap();
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("response head");
        let head = String::from_utf8_lossy(&raw[..split]).into_owned();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(": "))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let mut body = raw[split + 4..].to_vec();
        if headers
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v == "chunked")
        {
            body = dechunk(&body);
        }
        Reply {
            status,
            headers,
            body,
        }
    }

    fn dechunk(mut raw: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let line_end = raw.windows(2).position(|w| w == b"\r\n").unwrap();
            let size =
                usize::from_str_radix(std::str::from_utf8(&raw[..line_end]).unwrap(), 16).unwrap();
            if size == 0 {
                return out;
            }
            out.extend_from_slice(&raw[line_end + 2..line_end + 2 + size]);
            raw = &raw[line_end + 4 + size..];
        }
    }

    const LAYER: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

    #[tokio::test]
    async fn a_kept_ztoc_is_confirmed_with_304_and_off_policies_refuse_the_image() {
        let s = start(None).await;
        let layer = Digest::parse(LAYER).unwrap();
        let ztoc = s.store.put_blob(b"ztoc bytes").unwrap();
        s.store.set_ztoc_for_layer(&layer, 4 << 20, &ztoc).unwrap();
        let url = format!("/v1/layers/{LAYER}/ztoc?image=ghcr.io%2Facme%2Fweb%3A1");

        // The copy a node keeps is confirmed without sending it again; a stale one is replaced.
        let same = request_with(
            &s,
            "GET",
            &url,
            &format!("If-None-Match: \"{ztoc}\"\r\n"),
            "",
        )
        .await;
        assert_eq!(same.status, 304, "{}", same.text());
        assert!(same.body.is_empty());
        let stale = format!("If-None-Match: \"{}\"\r\n", Digest::of(b"old"));
        let newer = request_with(&s, "GET", &url, &stale, "").await;
        assert_eq!(newer.status, 200);
        assert_eq!(newer.body, b"ztoc bytes");

        // An Off policy for the image: refused with the reason, even with a copy on the node.
        let policies = crate::matcher::tests::policies(&[
            ("apps", "  images: [\"ghcr.io/acme/**\"]\n"),
            (
                "stop-web",
                "  images: [\"ghcr.io/acme/web\"]\n  mode: Off\n",
            ),
        ]);
        s.api.set_active_policies(policies);
        for extra in ["", &format!("If-None-Match: \"{ztoc}\"\r\n")] {
            let refused = request_with(&s, "GET", &url, extra, "").await;
            assert_eq!(refused.status, 404);
            assert_eq!(
                refused.header("hermes-disabled"),
                Some("policy stop-web has mode Off")
            );
            assert!(refused.text().contains("stop-web"), "{}", refused.text());
        }
        // Other images, and requests that do not name one, are served as before.
        let other = format!("/v1/layers/{LAYER}/ztoc?image=ghcr.io%2Facme%2Fapi");
        assert_eq!(request(&s, "GET", &other, None, "").await.status, 200);
        let plain = request(&s, "GET", &format!("/v1/layers/{LAYER}/ztoc"), None, "").await;
        assert_eq!(plain.status, 200);
        assert_eq!(plain.header("hermes-disabled"), None);
        let metrics = request(&s, "GET", "/metrics", None, "").await.text();
        assert!(
            metrics.contains("hermes_controller_artifacts_refused_total 2"),
            "{metrics}"
        );
        let bad = request(&s, "GET", &format!("{url}&manifest=nope"), None, "").await;
        assert_eq!(bad.status, 400, "{}", bad.text());
    }

    #[tokio::test]
    async fn ztoc_is_served_with_its_digest_and_404_when_absent() {
        let s = start(None).await;
        let url = format!("/v1/layers/{LAYER}/ztoc");
        let missing = request(&s, "GET", &url, None, "").await;
        assert_eq!(missing.status, 404, "{}", missing.text());

        let layer = Digest::parse(LAYER).unwrap();
        let ztoc = s.store.put_blob(b"ztoc bytes").unwrap();
        s.store.set_ztoc_for_layer(&layer, 4 << 20, &ztoc).unwrap();
        let r = request(&s, "GET", &url, None, "").await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.body, b"ztoc bytes");
        assert_eq!(r.header("docker-content-digest"), Some(ztoc.as_str()));

        let bad = request(&s, "GET", "/v1/layers/sha256:xyz/ztoc", None, "").await;
        assert_eq!(bad.status, 400, "{}", bad.text());

        let m = request(&s, "GET", "/metrics", None, "").await;
        assert!(
            m.text()
                .contains("hermes_controller_artifacts_served_total 1"),
            "{}",
            m.text()
        );
        assert!(
            m.text()
                .contains("hermes_controller_artifacts_missing_total 1"),
            "{}",
            m.text()
        );
    }

    #[tokio::test]
    async fn bearer_token_guards_v1_but_not_health() {
        let s = start(Some("s3cret")).await;
        let url = format!("/v1/layers/{LAYER}/ztoc");
        for token in [None, Some("wrong"), Some("s3cre")] {
            let r = request(&s, "GET", &url, token, "").await;
            assert_eq!(r.status, 401, "token {token:?}");
            assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        }
        assert_eq!(
            request(&s, "GET", &url, Some("s3cret"), "").await.status,
            404
        );
        assert_eq!(request(&s, "GET", "/healthz", None, "").await.status, 200);
        assert_eq!(request(&s, "GET", "/readyz", None, "").await.status, 503);
        s.api.set_ready(true);
        assert_eq!(request(&s, "GET", "/readyz", None, "").await.status, 200);
    }

    #[tokio::test]
    async fn image_status_comes_from_the_reconciler_then_the_store() {
        let s = start(None).await;
        let manifest = Digest::parse(LAYER).unwrap();
        let url = format!("/v1/images/{manifest}");
        assert_eq!(request(&s, "GET", &url, None, "").await.status, 404);
        s.store
            .put_image(&hermes_oci::ImageRecord {
                reference: "registry.test/app:v1".into(),
                aliases: Vec::new(),
                manifest_digest: manifest.clone(),
                platform: None,
                span_size: 4 << 20,
                layers: Vec::new(),
                soci_index: None,
                built_at_unix: 7,
            })
            .unwrap();
        let r = request(&s, "GET", &url, None, "").await;
        assert_eq!(r.status, 200, "{}", r.text());
        let json: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(json["builtAtUnix"], 7);
        s.api.set_images([ImageReport {
            status: crate::reconcile::ImageStatus {
                digest: manifest.clone(),
                reference: "registry.test/app:v1".into(),
                policy: "acme".into(),
                phase: crate::reconcile::Phase::Building,
                reason: None,
                pods: 3,
                layers: Vec::new(),
            },
            build_seconds: 1.5,
            bytes_read: 42,
            last_error: None,
            updated_at_unix: 9,
        }]);
        let json: serde_json::Value =
            serde_json::from_slice(&request(&s, "GET", &url, None, "").await.body).unwrap();
        assert_eq!(
            (json["phase"].as_str(), json["pods"].as_u64()),
            (Some("Building"), Some(3))
        );
        assert_eq!(json["bytesRead"], 42);
        let list: serde_json::Value =
            serde_json::from_slice(&request(&s, "GET", "/v1/images", None, "").await.body).unwrap();
        assert_eq!(list[0]["digest"], manifest.as_str());

        let invalid = crate::reconcile::PolicyStatus::invalid(
            "broken",
            &crate::Error::InvalidPolicy {
                policy: "broken".into(),
                field: "spec.mode".into(),
                reason: "unknown".into(),
            },
        );
        s.api.set_policies(vec![PolicyReport {
            name: "broken".into(),
            status: invalid,
        }]);
        let r = request(&s, "GET", "/v1/policies", None, "").await;
        let json: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(json[0]["name"], "broken");
        assert_eq!(json[0]["conditions"][0]["status"], "False");
    }

    #[tokio::test]
    async fn misses_are_validated_and_handed_over_with_backpressure() {
        let mut s = start(None).await;
        let ok = r#"{"image":"registry.test/app:v1","node":"n1"}"#;
        assert_eq!(
            request(&s, "POST", "/v1/misses", None, ok).await.status,
            202
        );
        let busy = request(&s, "POST", "/v1/misses", None, ok).await;
        assert_eq!(busy.status, 503, "channel of 1 is full: {}", busy.text());
        let got = s.misses.recv().await.unwrap();
        assert_eq!(
            (got.image.as_str(), got.node.as_deref()),
            ("registry.test/app:v1", Some("n1"))
        );
        for bad in [r#"{"image":"UPPER"}"#, r#"{"img":"a"}"#, "not json"] {
            let r = request(&s, "POST", "/v1/misses", None, bad).await;
            assert_eq!(r.status, 400, "{bad}: {}", r.text());
        }
        let m = request(&s, "GET", "/metrics", None, "").await;
        assert!(
            m.text().contains("hermes_controller_misses_total 1"),
            "{}",
            m.text()
        );
    }

    #[tokio::test]
    async fn build_metrics_are_exported_with_bounded_labels() {
        let s = start(None).await;
        let metrics = s.api.metrics();
        metrics.record_build(BuildOutcome::Indexed, 3.0, 1000);
        metrics.record_build(BuildOutcome::Failed, 0.2, 24);
        metrics.record_build(BuildOutcome::Indexed, 1.0, 0);
        metrics.queue_depth.set(4);
        let text = request(&s, "GET", "/metrics", None, "").await.text();
        for line in [
            "hermes_controller_builds_total{outcome=\"Indexed\"} 2",
            "hermes_controller_builds_total{outcome=\"Failed\"} 1",
            "hermes_controller_bytes_read_total 1024",
            "hermes_controller_build_seconds_count 3",
            "hermes_controller_queue_depth 4",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
    }

    #[tokio::test]
    async fn traces_are_merged_into_a_prefetch_profile() {
        let s = start(Some("t")).await;
        let url = format!("/v1/layers/{LAYER}/prefetch");
        assert_eq!(request(&s, "GET", &url, Some("t"), "").await.status, 404);
        for spans in ["[4,2]", "[2,9]"] {
            let body = format!(r#"{{"node":"n1","layers":{{"{LAYER}":{spans}}}}}"#);
            let r = request(&s, "POST", "/v1/traces", Some("t"), &body).await;
            assert_eq!(r.status, 202, "{}", r.text());
        }
        assert_eq!(
            request(&s, "POST", "/v1/traces", None, "{}").await.status,
            401
        );
        let bad = request(&s, "POST", "/v1/traces", Some("t"), r#"{"layers":5}"#).await;
        assert_eq!(bad.status, 400);
        let r = request(&s, "GET", &url, Some("t"), "").await;
        assert_eq!(r.status, 200, "{}", r.text());
        let json: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(json["spans"], serde_json::json!([2, 4, 9]));
        assert_eq!(json["traces"], 2);

        // A restarted controller over the same store serves the same profile.
        let (tx, _rx) = mpsc::channel(1);
        let again = NodeApi::new(s.store.clone(), None, vec![4 << 20], tx);
        let layer = Digest::parse(LAYER).unwrap();
        let profile = again
            .inner
            .profiles
            .read()
            .unwrap()
            .profile(&layer)
            .expect("profile after a restart");
        assert_eq!((profile.spans, profile.traces), (vec![2, 4, 9], 2));
    }
}
