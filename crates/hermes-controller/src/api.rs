//! The node API (design.md §3) over HTTP/1.1 with axum: nodes fetch zTOCs and image status
//! and report misses.
//!
//! - `GET /v1/layers/{layer-digest}/ztoc[?image=REF&manifest=DIGEST]` → zTOC bytes from the
//!   [`Store`], with `Docker-Content-Digest`; 404 if none (span sizes tried in the configured
//!   order). `If-None-Match: "DIGEST"` answers 304 when that is still the zTOC, so a node can
//!   check a copy it keeps. When an `Off` policy matches the image (see
//!   [`off_for_node`](crate::matcher::off_for_node)) or the controller skipped the manifest for
//!   one, the answer is 404 with a `Hermes-Disabled` header giving the reason: the node must
//!   not start the image lazily, whatever copy it has. Otherwise the answer (200 or 304)
//!   says how to serve the layer, from the policy that applies to the image
//!   ([`for_node`](crate::matcher::for_node)): `Hermes-Mode` (`Prefetch`, `Eager`; none for
//!   `Lazy`) and `Hermes-Fully-Local-Within` (seconds);
//! - `GET /v1/images/{manifest-digest}` → the image's [`ImageReport`] (as the controller loop last
//!   published it), else its stored record; 404 if neither;
//! - `GET /v1/images` → every image report; `GET /v1/policies` → every policy's status (also
//!   of policies that failed validation, with the reason);
//! - `POST /v1/misses` → `{"image": REF, "digest"?: DIGEST, "node"?: NAME}`, handed to the
//!   controller loop through a bounded channel (202; 503 when the channel is full);
//! - `POST /v1/pulls` → a [`PullReport`] of how a node's pull went, handed to the adapter
//!   that turns it into pod Events and image counters through a bounded channel (202; 503
//!   when the channel is full or another replica takes them; 202 and dropped when nothing
//!   does: see [`PullSink`]);
//! - `POST /v1/traces` → a [`TraceReport`] of startup reads (202);
//!   `GET /v1/layers/{layer-digest}/prefetch` → the merged [`PrefetchProfile`](hermes_node_api::PrefetchProfile), 404 if none;
//! - `GET /healthz`, `GET /readyz` (503 until [`NodeApi::set_ready`]), `GET /metrics`.
//!
//! The paths, bodies and header rules are the contract's ([`hermes_node_api`]), which the
//! node's client shares. `/v1/*` needs `Authorization: Bearer TOKEN` when a token is configured. Health and metrics
//! do not. TLS with [`serve_tls`] (see [`crate::tls`]). Each layer's recent traces are saved
//! under the store's directory (`profiles/<layer hex>.json`) and read back by [`NodeApi::new`].
//!
//! Even a token holder costs bounded memory, disk and time: bodies are capped
//! ([`MAX_MISS_BODY`], [`MAX_PULL_BODY`], [`MAX_TRACE_BODY`]: 413), names too ([`MAX_IMAGE_LEN`],
//! [`MAX_NODE_NAME_LEN`], [`MAX_LAYERS_PER_REPORT`], [`MAX_POD_LABELS`], [`MAX_REASON_LEN`]: 400), the traces kept (in memory and on disk)
//! by [`ProfileLimits`], the misses kept by the engine; a connection must send each request
//! head within [`ApiLimits::header_read_timeout`] (also the longest idle time between
//! requests) and is closed when nothing moves for [`ApiLimits::idle_timeout`].

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hermes_node_api::{
    CONTENT_DIGEST_HEADER, LayerBehaviour, MAX_POD_LABELS, MAX_PULL_BODY, MAX_REASON_LEN, NodeMode,
    PodRef, TraceReport, ZtocQuery, decode_labels, disabled_header_value, etag, not_modified,
    paths,
};
use hermes_oci::{Digest, Reference, Store};
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;

use crate::matcher::{NodeDecision, NodePod, decide_for_node};
use crate::policy::{Mode, Policy};
use crate::prefetch::{KeptTrace, ProfileBook, ProfileLimits};
use crate::reconcile::Phase;
use crate::status::{ImageReport, PolicyReport};

// The contract's wire types and bounds, where the controller's users have always found them.
pub use hermes_node_api::{
    MAX_IMAGE_LEN, MAX_LAYERS_PER_REPORT, MAX_MISS_BODY, MAX_NODE_NAME_LEN, MAX_TRACE_BODY, Miss,
    PullReport,
};

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

/// Why a node's miss was not counted (a bounded metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
pub enum MissRefusal {
    /// No policy selects the image: it is neither resolved nor kept.
    Unselected,
    /// The engine's table of misses is full.
    TableFull,
    /// Too many misses are being resolved already.
    ResolvesBusy,
    /// The channel to the controller loop is full (answered 503).
    QueueFull,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RefusalLabels {
    reason: MissRefusal,
}

/// Where a replica's node API hands the pull reports it accepts.
#[derive(Debug, Clone, Default)]
pub enum PullSink {
    /// Nothing takes them: answered 202 and dropped.
    #[default]
    Drop,
    /// Another replica (the leader) takes them: answered 503 with `Connection: close`, so the
    /// node's retry opens a new connection, which the Service may send to the leader.
    Elsewhere,
    /// This channel takes them (503 when it is full).
    To(mpsc::Sender<PullReport>),
}

/// Default of [`ApiLimits::header_read_timeout`].
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of [`ApiLimits::idle_timeout`].
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The node API's configurable bounds; the defaults are the `DEFAULT_*` and `MAX_*` constants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiLimits {
    /// Time a connection has to send a request head, counted from when the server waits for
    /// one: so also the longest a kept-alive connection stays open between requests.
    pub header_read_timeout: Duration,
    /// A connection on which no byte moves either way for this long is closed (a stalled
    /// upload, a client that stopped reading its answer).
    pub idle_timeout: Duration,
    /// What the startup traces keep, in memory and under `profiles/`.
    pub profiles: ProfileLimits,
}

impl Default for ApiLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            profiles: ProfileLimits::default(),
        }
    }
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
    /// Pull reports accepted from nodes.
    pub pull_reports: Counter,
    /// Images in the build queue (set by the controller loop).
    pub queue_depth: Gauge,
    misses_refused: Family<RefusalLabels, Counter>,
    profile_spans: Gauge,
    profile_evictions: Counter,
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
            pull_reports: Counter::default(),
            queue_depth: Gauge::default(),
            misses_refused: Family::default(),
            profile_spans: Gauge::default(),
            profile_evictions: Counter::default(),
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

    /// Count a miss that was not counted as a running container, by why.
    pub fn refuse_miss(&self, reason: MissRefusal) {
        self.misses_refused
            .get_or_create(&RefusalLabels { reason })
            .inc();
    }

    fn register(&self, registry: &mut Registry) {
        // One line per metric: name, help text, field.
        macro_rules! register {
            ($($name:literal, $help:literal, $field:ident;)*) => {
                $(registry.register($name, $help, self.$field.clone());)*
            };
        }
        register! {
            "hermes_controller_artifacts_served", "zTOCs served to nodes", artifacts_served;
            "hermes_controller_artifacts_missing", "zTOC requests for layers without one", artifacts_missing;
            "hermes_controller_artifacts_refused", "zTOC requests refused because an Off policy matches the image", artifacts_refused;
            "hermes_controller_misses", "images nodes started without an index", misses;
            "hermes_controller_pull_reports", "pull reports accepted from nodes", pull_reports;
            "hermes_controller_misses_refused", "misses not counted, by reason", misses_refused;
            "hermes_controller_profile_spans", "span indices kept from startup traces", profile_spans;
            "hermes_controller_profile_evictions", "startup traces dropped for a node's quota or a full profile book", profile_evictions;
            "hermes_controller_queue_depth", "images waiting in the build queue", queue_depth;
            "hermes_controller_builds", "layer builds by outcome", builds;
            "hermes_controller_build_seconds", "time per layer build", build_seconds;
            "hermes_controller_bytes_read", "layer bytes read from registries", bytes_read;
        }
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
    limits: ApiLimits,
    span_sizes: RwLock<Vec<u64>>,
    images: RwLock<BTreeMap<Digest, ImageReport>>,
    policies: RwLock<Vec<PolicyReport>>,
    /// The valid policies, for refusing images an `Off` policy matches.
    active: RwLock<Vec<Policy>>,
    /// Namespaces' labels, for the selectors of lookups that name the pod's namespace.
    namespaces: RwLock<BTreeMap<String, crate::selector::Labels>>,
    misses: mpsc::Sender<Miss>,
    /// Where pull reports go.
    pulls: RwLock<PullSink>,
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
    BadQuery(String),
    /// A body over its limit: the request and the limit.
    TooLarge(&'static str, usize),
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
            Self::BadQuery(e) => (StatusCode::BAD_REQUEST, format!("bad query: {e}")),
            Self::TooLarge(what, limit) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("{what} bodies are at most {limit} bytes"),
            ),
            Self::NotFound(what) => (StatusCode::NOT_FOUND, format!("no {what}")),
            Self::Disabled(reason) => (StatusCode::NOT_FOUND, reason),
            Self::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "a bearer token is required".to_owned(),
            ),
            Self::Busy => (
                StatusCode::SERVICE_UNAVAILABLE,
                "too many pending reports; retry later".to_owned(),
            ),
            Self::Store(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("store: {e}")),
        };
        let mut response =
            (status, axum::Json(serde_json::json!({ "error": message }))).into_response();
        if let Some(reason) = disabled {
            // Always a valid value: a refusal never loses its header.
            let value = HeaderValue::from_str(&disabled_header_value(&reason))
                .unwrap_or(HeaderValue::from_static("disabled"));
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
pub const DISABLED_HEADER: header::HeaderName =
    header::HeaderName::from_static(hermes_node_api::DISABLED_HEADER);

fn parse_digest(text: &str) -> Result<Digest, ApiError> {
    Digest::parse(text).map_err(|_| ApiError::BadDigest(text.to_owned()))
}

/// Byte comparison whose time does not depend on where the first difference is.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl NodeApi {
    /// An API over `store`; `token` (if any) guards `/v1/*`; zTOCs are looked up for each of
    /// `span_sizes` in order; accepted misses go to `misses`. With the default [`ApiLimits`].
    pub fn new(
        store: Store,
        token: Option<String>,
        span_sizes: Vec<u64>,
        misses: mpsc::Sender<Miss>,
    ) -> Self {
        Self::with_limits(store, token, span_sizes, misses, ApiLimits::default())
    }

    /// [`NodeApi::new`] within `limits`.
    pub fn with_limits(
        store: Store,
        token: Option<String>,
        span_sizes: Vec<u64>,
        misses: mpsc::Sender<Miss>,
        limits: ApiLimits,
    ) -> Self {
        let metrics = Metrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let profiles = load_profiles(&profiles_dir(&store), limits.profiles);
        metrics
            .profile_spans
            .set(i64::try_from(profiles.span_count()).unwrap_or(i64::MAX));
        Self {
            inner: Arc::new(Inner {
                store,
                token,
                limits,
                span_sizes: RwLock::new(span_sizes),
                images: RwLock::new(BTreeMap::new()),
                policies: RwLock::new(Vec::new()),
                active: RwLock::new(Vec::new()),
                namespaces: RwLock::new(BTreeMap::new()),
                misses,
                pulls: RwLock::new(PullSink::Drop),
                profiles: RwLock::new(profiles),
                saving: tokio::sync::Mutex::new(()),
                ready: AtomicBool::new(false),
                metrics,
                registry,
            }),
        }
    }

    /// Where accepted pull reports go from now on (at first: [`PullSink::Drop`]).
    pub fn set_pull_reports(&self, sink: PullSink) {
        *self.inner.pulls.write().unwrap_or_else(|e| e.into_inner()) = sink;
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

    /// Set the namespaces' labels (the Kubernetes controller keeps them current), for lookups
    /// that name the pod's namespace.
    pub fn set_namespace_labels(&self, namespaces: BTreeMap<String, crate::selector::Labels>) {
        *self
            .inner
            .namespaces
            .write()
            .unwrap_or_else(|e| e.into_inner()) = namespaces;
    }

    /// What a node pulling `image` (resolved to `manifest`) for `pod`, if it says, is told: why
    /// it must not start the image lazily, or how to serve its layers.
    fn decide(
        &self,
        image: Option<&Reference>,
        manifest: Option<&Digest>,
        pod: Option<(String, crate::selector::Labels)>,
    ) -> Result<LayerBehaviour, String> {
        if let Some(image) = image {
            let pod = pod.map(|(namespace, pod_labels)| NodePod {
                namespace_labels: self
                    .inner
                    .namespaces
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&namespace)
                    .cloned()
                    .unwrap_or_default(),
                namespace,
                pod_labels,
            });
            let active = self.inner.active.read().unwrap_or_else(|e| e.into_inner());
            match decide_for_node(&active, image, manifest, pod.as_ref()) {
                NodeDecision::Refuse(policy) => {
                    return Err(match &pod {
                        Some(pod) => format!(
                            "policy {} has mode Off for this pod in namespace {}",
                            policy.name, pod.namespace
                        ),
                        None => format!("policy {} has mode Off", policy.name),
                    });
                }
                NodeDecision::Follow(policy) => {
                    let behaviour = LayerBehaviour {
                        mode: match policy.mode {
                            Mode::Prefetch => NodeMode::Prefetch,
                            Mode::Eager => NodeMode::Eager,
                            // Off is refused above.
                            Mode::Lazy | Mode::Off => NodeMode::Lazy,
                        },
                        fully_local_within: policy.fully_local_within,
                    };
                    if pod.is_some() {
                        return Ok(behaviour);
                    }
                    return self.skipped(manifest).map_or(Ok(behaviour), Err);
                }
                // The pod's own decision stands: an image skipped for other pods' Off policy
                // is not refused to this one.
                NodeDecision::Defaults if pod.is_some() => return Ok(LayerBehaviour::default()),
                NodeDecision::Defaults => {}
            }
        }
        self.skipped(manifest)
            .map_or(Ok(LayerBehaviour::default()), Err)
    }

    /// Why the controller skipped the image, if it did: it saw it running under an `Off`
    /// policy (one with selectors too).
    fn skipped(&self, manifest: Option<&Digest>) -> Option<String> {
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
            .route(paths::ZTOC, get(get_ztoc))
            .route(paths::IMAGES, get(list_images))
            .route(paths::IMAGE, get(get_image))
            .route(paths::POLICIES, get(list_policies))
            .route(paths::PREFETCH, get(get_prefetch))
            .route(
                paths::MISSES,
                post(post_miss).layer(DefaultBodyLimit::max(MAX_MISS_BODY)),
            )
            .route(
                paths::PULLS,
                post(post_pull).layer(DefaultBodyLimit::max(MAX_PULL_BODY)),
            )
            .route(
                paths::TRACES,
                post(post_traces).layer(DefaultBodyLimit::max(MAX_TRACE_BODY)),
            )
            .route_layer(middleware::from_fn_with_state(self.clone(), require_token));
        Router::new()
            .merge(v1)
            .route(paths::HEALTHZ, get(|| async { "ok" }))
            .route(paths::READYZ, get(readyz))
            .route(paths::METRICS, get(metrics))
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
    let pod = match &query.namespace {
        Some(namespace) => {
            let labels = query.labels.as_deref().unwrap_or_default();
            let labels = decode_labels(labels).ok_or_else(|| {
                ApiError::BadQuery(format!("labels {labels:?} are not key=value,…"))
            })?;
            Some((namespace.clone(), labels))
        }
        None => None,
    };
    let behaviour = match api.decide(image.as_ref(), manifest.as_ref(), pod) {
        Ok(behaviour) => behaviour,
        Err(reason) => {
            api.inner.metrics.artifacts_refused.inc();
            return Err(ApiError::Disabled(reason));
        }
    };
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
        // The policy holds wherever the node finds an index (its store, the registry).
        let mut response = ApiError::NotFound("zTOC for this layer").into_response();
        add_behaviour(&mut response, &behaviour);
        return Ok(response);
    };
    api.inner.metrics.artifacts_served.inc();
    let etag = etag(&ztoc);
    let mut response = if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| not_modified(v, &ztoc))
    {
        (StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response()
    } else {
        (
            [
                (header::ETAG, etag),
                (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
                (
                    header::HeaderName::from_static(CONTENT_DIGEST_HEADER),
                    ztoc.to_string(),
                ),
            ],
            Body::from(bytes),
        )
            .into_response()
    };
    add_behaviour(&mut response, &behaviour);
    Ok(response)
}

/// The headers that tell a node how to serve the layer.
fn add_behaviour(response: &mut Response, behaviour: &LayerBehaviour) {
    for (name, value) in behaviour.headers() {
        if let Ok(value) = HeaderValue::from_str(&value) {
            response
                .headers_mut()
                .insert(header::HeaderName::from_static(name), value);
        }
    }
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

/// The body, or 413 naming `what` and its limit when it is larger.
fn body_within(
    body: Result<Bytes, BytesRejection>,
    what: &'static str,
    limit: usize,
) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge(what, limit)
        } else {
            ApiError::BadBody(rejection.body_text())
        }
    })
}

/// 400 when `value` (the `field` of a request) is longer than `limit` bytes.
fn within(field: &str, value: &str, limit: usize) -> Result<(), ApiError> {
    if value.len() > limit {
        return Err(ApiError::BadBody(format!(
            "{field} is {} bytes long; at most {limit} are allowed",
            value.len()
        )));
    }
    Ok(())
}

async fn post_miss(
    State(api): State<NodeApi>,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, ApiError> {
    let body = body_within(body, "miss", MAX_MISS_BODY)?;
    let miss: Miss = serde_json::from_slice(&body).map_err(|e| ApiError::BadBody(e.to_string()))?;
    started_within(&miss.image, miss.node.as_deref(), miss.pod.as_ref())?;
    if api.inner.misses.try_send(miss).is_err() {
        api.inner.metrics.refuse_miss(MissRefusal::QueueFull);
        return Err(ApiError::Busy);
    }
    api.inner.metrics.misses.inc();
    Ok(StatusCode::ACCEPTED)
}

/// 400 unless a node's report of a start names a parsable image, and its node and pod (if
/// any) are within their bounds.
fn started_within(image: &str, node: Option<&str>, pod: Option<&PodRef>) -> Result<(), ApiError> {
    within("image", image, MAX_IMAGE_LEN)?;
    within("node", node.unwrap_or_default(), MAX_NODE_NAME_LEN)?;
    Reference::parse(image).map_err(|e| ApiError::BadBody(e.to_string()))?;
    match pod {
        Some(pod) => pod_within(pod),
        None => Ok(()),
    }
}

/// 400 when a pod's names or labels are beyond their bounds.
fn pod_within(pod: &PodRef) -> Result<(), ApiError> {
    within("pod namespace", &pod.namespace, MAX_NODE_NAME_LEN)?;
    within("pod name", &pod.name, MAX_NODE_NAME_LEN)?;
    within("pod uid", &pod.uid, MAX_NODE_NAME_LEN)?;
    if pod.labels.len() > MAX_POD_LABELS {
        return Err(ApiError::BadBody(format!(
            "the pod has {} labels; at most {MAX_POD_LABELS} are allowed",
            pod.labels.len()
        )));
    }
    Ok(())
}

async fn post_pull(
    State(api): State<NodeApi>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_within(body, "pull report", MAX_PULL_BODY)?;
    let report: PullReport =
        serde_json::from_slice(&body).map_err(|e| ApiError::BadBody(e.to_string()))?;
    started_within(&report.image, report.node.as_deref(), report.pod.as_ref())?;
    if report.layers.len() > MAX_LAYERS_PER_REPORT {
        return Err(ApiError::BadBody(format!(
            "{} layers; at most {MAX_LAYERS_PER_REPORT} are allowed",
            report.layers.len()
        )));
    }
    for layer in &report.layers {
        within(
            "layer reason",
            layer.reason.as_deref().unwrap_or_default(),
            MAX_REASON_LEN,
        )?;
    }
    let sink = api
        .inner
        .pulls
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    match sink {
        PullSink::Drop => {}
        PullSink::Elsewhere => {
            let mut answer = ApiError::Busy.into_response();
            answer
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return Ok(answer);
        }
        PullSink::To(pulls) => {
            if pulls.try_send(report).is_err() {
                return Err(ApiError::Busy);
            }
        }
    }
    api.inner.metrics.pull_reports.inc();
    Ok(StatusCode::ACCEPTED.into_response())
}

/// Where the layers' recent traces are saved.
fn profiles_dir(store: &Store) -> std::path::PathBuf {
    store.root().join("profiles")
}

/// A layer's saved traces: `{"traces": [{"seq": N, "node": NAME, "spans": [span, …]}, …]}`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct SavedTraces {
    traces: Vec<SavedTrace>,
}

/// One saved trace; files written before traces had a node and an order hold bare span lists.
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
enum SavedTrace {
    Kept(KeptTrace),
    Spans(Vec<u32>),
}

/// Largest saved file read back: all a layer may keep, as JSON (11 bytes a span at most, plus
/// each trace's node name and fields).
fn saved_file_limit(limits: &ProfileLimits) -> u64 {
    let per_trace = limits.spans_per_trace * 11 + MAX_NODE_NAME_LEN + 64;
    u64::try_from(limits.traces_per_layer.saturating_mul(per_trace)).unwrap_or(u64::MAX)
}

/// The traces saved in `dir`, within `limits` (unreadable or oversized files are skipped with a
/// warning). Files holding more than the limits keep are rewritten, or deleted when nothing of
/// them is kept.
fn load_profiles(dir: &std::path::Path, limits: ProfileLimits) -> ProfileBook {
    let mut book = ProfileBook::new(limits);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return book;
    };
    let mut saved = Vec::new();
    let mut counts = BTreeMap::new();
    for path in entries.flatten().map(|e| e.path()) {
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let layer = path
            .file_stem()
            .and_then(|s| s.to_str())
            .and_then(|hex| Digest::parse(&format!("sha256:{hex}")).ok());
        let small = std::fs::metadata(&path).is_ok_and(|m| m.len() <= saved_file_limit(&limits));
        let traces = small
            .then(|| std::fs::read(&path).ok())
            .flatten()
            .and_then(|b| serde_json::from_slice::<SavedTraces>(&b).ok());
        let (Some(layer), Some(traces)) = (layer, traces) else {
            tracing::warn!(path = %path.display(), "unreadable or oversized saved traces; ignored");
            continue;
        };
        counts.insert(layer.clone(), traces.traces.len());
        saved.extend(traces.traces.into_iter().map(|t| {
            let trace = match t {
                SavedTrace::Kept(kept) => kept,
                SavedTrace::Spans(spans) => KeptTrace {
                    seq: 0,
                    node: String::new(),
                    spans,
                },
            };
            (layer.clone(), trace)
        }));
    }
    book.restore(saved);
    for (layer, count) in counts {
        let kept = book.traces(&layer);
        if kept.len() != count
            && let Err(e) = save_traces(dir, &layer, kept)
        {
            tracing::warn!(%layer, error = %e, "cannot rewrite saved traces within the limits");
        }
    }
    book
}

/// Save `traces` of `layer` atomically (temp file, rename); with none, delete its file.
fn save_traces(
    dir: &std::path::Path,
    layer: &Digest,
    traces: Vec<KeptTrace>,
) -> std::io::Result<()> {
    let path = dir.join(format!("{}.json", layer.hex()));
    if traces.is_empty() {
        return match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
    }
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{}.tmp", layer.hex()));
    let saved = SavedTraces {
        traces: traces.into_iter().map(SavedTrace::Kept).collect(),
    };
    std::fs::write(&tmp, serde_json::to_vec(&saved).unwrap_or_default())?;
    std::fs::rename(&tmp, &path)
}

async fn post_traces(
    State(api): State<NodeApi>,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, ApiError> {
    let body = body_within(body, "trace report", MAX_TRACE_BODY)?;
    let report: TraceReport =
        serde_json::from_slice(&body).map_err(|e| ApiError::BadBody(e.to_string()))?;
    within(
        "node",
        report.node.as_deref().unwrap_or_default(),
        MAX_NODE_NAME_LEN,
    )?;
    if report.layers.len() > MAX_LAYERS_PER_REPORT {
        return Err(ApiError::BadBody(format!(
            "a report names {} layers; at most {MAX_LAYERS_PER_REPORT} are allowed",
            report.layers.len()
        )));
    }
    let _saving = api.inner.saving.lock().await;
    let (saved, evicted, spans): (Vec<(Digest, Vec<KeptTrace>)>, usize, usize) = {
        let mut book = api
            .inner
            .profiles
            .write()
            .unwrap_or_else(|e| e.into_inner());
        let added = book.add(report);
        let saved = added
            .changed
            .into_iter()
            .map(|l| {
                let traces = book.traces(&l);
                (l, traces)
            })
            .collect();
        (saved, added.evicted, book.span_count())
    };
    let metrics = &api.inner.metrics;
    metrics
        .profile_spans
        .set(i64::try_from(spans).unwrap_or(i64::MAX));
    if evicted > 0 {
        metrics.profile_evictions.inc_by(evicted as u64);
        tracing::debug!(
            evicted,
            "startup traces dropped for a node's quota or a full book"
        );
    }
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
    serve_on(crate::tls::TlsListener::new(listener, tls), api, shutdown).await;
    Ok(())
}

/// Serve `api` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    api: NodeApi,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_on(listener, api, shutdown).await;
    Ok(())
}

/// The accept loop (axum's own `serve` has no timeouts): hyper serves each connection with
/// the header read timeout, [`IdleIo`] closes it when nothing moves. On shutdown, connections
/// answer the request they have (idle ones close at once) and the loop waits for them.
async fn serve_on<L: axum::serve::Listener>(
    mut listener: L,
    api: NodeApi,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let router = api.router();
    let limits = api.inner.limits;
    // Dropped to tell connections to finish.
    let (stopping, stop) = tokio::sync::watch::channel(());
    let mut connections = tokio::task::JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let io = tokio::select! {
            (io, _) = listener.accept() => io,
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let mut stop = stop.clone();
        connections.spawn(async move {
            let io = hyper_util::rt::TokioIo::new(IdleIo::new(io, limits.idle_timeout));
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout);
            let mut connection = std::pin::pin!(http.serve_connection(io, service));
            let served = tokio::select! {
                served = connection.as_mut() => served,
                _ = stop.changed() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = served {
                tracing::debug!(error = %e, "node API connection ended");
            }
        });
    }
    drop(stopping);
    while connections.join_next().await.is_some() {}
}

/// A connection that fails once no byte has moved either way for `idle`.
struct IdleIo<I> {
    io: I,
    idle: Duration,
    last_progress: tokio::time::Instant,
    /// Fires at `last_progress + idle` as of when it was last set; moved on lazily, so
    /// progress costs no timer update.
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl<I> IdleIo<I> {
    fn new(io: I, idle: Duration) -> Self {
        let now = tokio::time::Instant::now();
        Self {
            io,
            idle,
            last_progress: now,
            timer: Box::pin(tokio::time::sleep_until(now + idle)),
        }
    }

    /// On a pending read or write: fail when the connection has been idle too long, else
    /// make sure this task is woken when it will have been.
    fn poll_idle<T>(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<T>> {
        loop {
            let due = self.last_progress + self.idle;
            if self.timer.deadline() != due {
                self.timer.as_mut().reset(due);
            }
            match self.timer.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(())
                    if self.last_progress + self.idle <= tokio::time::Instant::now() =>
                {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "connection idle for too long",
                    )));
                }
                Poll::Ready(()) => {}
            }
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for IdleIo<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Pending => this.poll_idle(cx),
            ready => {
                if buf.filled().len() > before {
                    this.last_progress = tokio::time::Instant::now();
                }
                ready
            }
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for IdleIo<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_write(cx, buf) {
            Poll::Pending => this.poll_idle(cx),
            ready => {
                if matches!(ready, Poll::Ready(Ok(n)) if n > 0) {
                    this.last_progress = tokio::time::Instant::now();
                }
                ready
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_flush(cx) {
            Poll::Pending => this.poll_idle(cx),
            ready => ready,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_shutdown(cx) {
            Poll::Pending => this.poll_idle(cx),
            ready => ready,
        }
    }
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
        start_with(token, ApiLimits::default()).await
    }

    async fn start_with(token: Option<&str>, limits: ApiLimits) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (tx, rx) = mpsc::channel(1);
        let api = NodeApi::with_limits(
            store.clone(),
            token.map(str::to_owned),
            vec![1 << 20, 4 << 20],
            tx,
            limits,
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
        let policies = hermes_controller_core::testing::policies(&[
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
    async fn a_ztoc_answer_says_the_mode_and_deadline_of_the_policy_that_applies() {
        let s = start(None).await;
        let layer = Digest::parse(LAYER).unwrap();
        let ztoc = s.store.put_blob(b"ztoc bytes").unwrap();
        s.store.set_ztoc_for_layer(&layer, 4 << 20, &ztoc).unwrap();
        s.api
            .set_active_policies(hermes_controller_core::testing::policies(&[
                ("apps", "  images: [\"ghcr.io/acme/**\"]\n"),
                (
                    "eager-ml",
                    "  images: [\"ghcr.io/acme/ml\"]\n  mode: Eager\n  fullyLocalWithin: 2m\n",
                ),
            ]));
        let url = |image: &str| format!("/v1/layers/{LAYER}/ztoc?image={image}");
        let kept = format!("If-None-Match: \"{ztoc}\"\r\n");
        for extra in ["", kept.as_str()] {
            let ml = request_with(&s, "GET", &url("ghcr.io%2Facme%2Fml%3A3"), extra, "").await;
            assert!(ml.status == 200 || ml.status == 304, "{}", ml.text());
            assert_eq!(ml.header("hermes-mode"), Some("Eager"));
            assert_eq!(ml.header("hermes-fully-local-within"), Some("120"));
            // The broad policy is Lazy with no deadline: nothing to say.
            let api = request_with(&s, "GET", &url("ghcr.io%2Facme%2Fapi"), extra, "").await;
            assert_eq!(api.header("hermes-mode"), None);
            assert_eq!(api.header("hermes-fully-local-within"), None);
        }
        let plain = request(&s, "GET", &format!("/v1/layers/{LAYER}/ztoc"), None, "").await;
        assert_eq!(plain.status, 200);
        assert_eq!(plain.header("hermes-mode"), None);
        // A node that names the pod: selectors apply. An Off policy for one namespace refuses
        // there only; a policy for labelled pods applies to them.
        s.api
            .set_active_policies(hermes_controller_core::testing::policies(&[
                ("apps", "  images: [\"ghcr.io/acme/**\"]\n"),
                (
                    "off-batch",
                    "  images: [\"ghcr.io/acme/**\"]\n  mode: Off\n  namespaceSelector: {matchLabels: {team: batch}}\n",
                ),
                (
                    "eager-ml",
                    "  images: [\"ghcr.io/acme/ml\"]\n  mode: Eager\n  podSelector: {matchLabels: {app: train}}\n",
                ),
            ]));
        s.api.set_namespace_labels(
            [(
                "jobs".to_owned(),
                [("team".to_owned(), "batch".to_owned())].into(),
            )]
            .into(),
        );
        let ml = url("ghcr.io%2Facme%2Fml%3A3");
        let in_jobs = request(
            &s,
            "GET",
            &format!("{ml}&namespace=jobs&labels=app%3Dtrain"),
            None,
            "",
        )
        .await;
        assert_eq!(in_jobs.status, 404);
        assert_eq!(
            in_jobs.header("hermes-disabled"),
            Some("policy off-batch has mode Off for this pod in namespace jobs")
        );
        let train = request(
            &s,
            "GET",
            &format!("{ml}&namespace=shop&labels=app%3Dtrain"),
            None,
            "",
        )
        .await;
        assert_eq!(train.status, 200);
        assert_eq!(train.header("hermes-mode"), Some("Eager"));
        let unlabelled = request(&s, "GET", &format!("{ml}&namespace=shop"), None, "").await;
        assert_eq!(unlabelled.status, 200);
        assert_eq!(unlabelled.header("hermes-mode"), None);
        let bad = request(
            &s,
            "GET",
            &format!("{ml}&namespace=shop&labels=nope"),
            None,
            "",
        )
        .await;
        assert_eq!(bad.status, 400, "{}", bad.text());
        // Without the pod, neither selector policy applies.
        let anyone = request(&s, "GET", &ml, None, "").await;
        assert_eq!((anyone.status, anyone.header("hermes-mode")), (200, None));

        // No zTOC here: the policy still holds for one the node finds elsewhere.
        let other = format!(
            "/v1/layers/sha256:{}/ztoc?image=ghcr.io%2Facme%2Fml&namespace=a&labels=app%3Dtrain",
            "2".repeat(64)
        );
        let missing = request(&s, "GET", &other, None, "").await;
        assert_eq!(missing.status, 404);
        assert_eq!(missing.header("hermes-mode"), Some("Eager"));
        assert_eq!(missing.header("hermes-disabled"), None);
    }

    #[tokio::test]
    async fn a_refusal_whose_reason_is_no_valid_header_value_still_carries_the_header() {
        let s = start(None).await;
        // The controller has the zTOC: only the refusal keeps it from the node.
        let ztoc = s.store.put_blob(b"ztoc bytes").unwrap();
        let layer = Digest::parse(LAYER).unwrap();
        s.store.set_ztoc_for_layer(&layer, 4 << 20, &ztoc).unwrap();
        let manifest = Digest::of(b"manifest");
        s.api.set_images([ImageReport {
            status: crate::reconcile::ImageStatus {
                digest: manifest.clone(),
                reference: "registry.test/app:v1".into(),
                policy: "stop".into(),
                phase: Phase::Skipped,
                reason: Some("policy stop\nhas mode Off (é)".into()),
                pods: 1,
                layers: Vec::new(),
            },
            build_seconds: 0.0,
            bytes_read: 0,
            last_error: None,
            updated_at_unix: 0,
            starts: Default::default(),
        }]);
        // Without the header a node would take the 404 for "no zTOC here" and start the image
        // lazily from its own copy, against the Off policy.
        let url = format!("/v1/layers/{LAYER}/ztoc?manifest={}", manifest.as_str());
        let refused = request(&s, "GET", &url, None, "").await;
        assert_eq!(refused.status, 404, "{}", refused.text());
        assert_eq!(
            refused.header("hermes-disabled"),
            Some("policy stop?has mode Off (?)")
        );
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
            starts: Default::default(),
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
            &hermes_controller_core::Error::InvalidPolicy {
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

    fn pull_report(layers: usize, reason: &str) -> PullReport {
        PullReport {
            image: "registry.test/app:v1".into(),
            manifest: Some(Digest::of(b"manifest")),
            node: Some("n1".into()),
            pod: None,
            layers: (0..layers)
                .map(|i| hermes_node_api::PullLayer {
                    digest: Digest::of(&[i as u8]),
                    mode: hermes_node_api::LayerMode::Fallback,
                    reason: Some(reason.to_owned()),
                })
                .collect(),
            bytes_fetched: 0,
            fully_local_seconds: None,
        }
    }

    #[tokio::test]
    async fn pull_reports_from_the_typed_client_reach_the_adapter_within_bounds() {
        let s = start(Some("secret")).await;
        let client = hermes_node_api::Client::new(
            &format!("http://{}", s.addr),
            hermes_node_api::ClientOptions {
                token: Some("secret".into()),
                ..Default::default()
            },
        )
        .unwrap();
        let report = pull_report(2, "no zTOC");
        // No adapter takes them yet: accepted and dropped.
        client.post_pull(&report).await.unwrap();
        let (tx, mut rx) = mpsc::channel(1);
        s.api.set_pull_reports(PullSink::To(tx));
        client.post_pull(&report).await.unwrap();
        assert_eq!(rx.recv().await.unwrap(), report);
        client.post_pull(&report).await.unwrap();
        let full = client.post_pull(&report).await.unwrap_err();
        assert!(
            matches!(&full, hermes_node_api::client::Error::Status { status, .. } if status.as_u16() == 503),
            "{full}"
        );
        let _ = rx.recv().await;
        for (bad, want) in [
            (pull_report(MAX_LAYERS_PER_REPORT + 1, "x"), 400),
            (pull_report(1, &"r".repeat(MAX_REASON_LEN + 1)), 400),
        ] {
            match client.post_pull(&bad).await {
                Err(hermes_node_api::client::Error::Status { status, .. }) => {
                    assert_eq!(status.as_u16(), want)
                }
                other => panic!("expected {want}, got {other:?}"),
            }
        }
        let huge = format!(
            r#"{{"image":"registry.test/app:v1","layers":[],"bytesFetched":0,"node":"{}"}}"#,
            "n".repeat(MAX_PULL_BODY)
        );
        let r = request(&s, "POST", "/v1/pulls", Some("secret"), &huge).await;
        assert_eq!(r.status, 413, "{}", r.text());
        assert!(rx.try_recv().is_err(), "nothing refused was handed over");
        // A replica that is not leading sends the node elsewhere, on a new connection.
        s.api.set_pull_reports(PullSink::Elsewhere);
        let body = serde_json::to_string(&report).unwrap();
        let r = request(&s, "POST", "/v1/pulls", Some("secret"), &body).await;
        assert_eq!((r.status, r.header("connection")), (503, Some("close")));
        let unauthorized = hermes_node_api::Client::new(
            &format!("http://{}", s.addr),
            hermes_node_api::ClientOptions::default(),
        )
        .unwrap();
        assert!(matches!(
            unauthorized.post_pull(&report).await,
            Err(hermes_node_api::client::Error::Unauthorized { .. })
        ));
        let m = request(&s, "GET", "/metrics", None, "").await;
        assert!(
            m.text().contains("hermes_controller_pull_reports_total 3"),
            "{}",
            m.text()
        );
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

    #[tokio::test]
    async fn misses_with_huge_names_are_refused_before_they_are_kept() {
        let mut s = start(None).await;
        // The hardening report's miss: a 1.5 MB node name (300 of them took 678 MB).
        let huge = format!(
            r#"{{"image":"registry.test/app:v1","node":"{}"}}"#,
            "n".repeat(1_500_000)
        );
        let r = request(&s, "POST", "/v1/misses", None, &huge).await;
        assert_eq!(r.status, 413, "{}", r.text());
        assert!(
            r.text().contains(&format!("at most {MAX_MISS_BODY} bytes")),
            "{}",
            r.text()
        );
        // Under the body limit, a field over its own limit is named.
        let long_node = format!(
            r#"{{"image":"registry.test/app:v1","node":"{}"}}"#,
            "n".repeat(300)
        );
        let r = request(&s, "POST", "/v1/misses", None, &long_node).await;
        assert_eq!(r.status, 400, "{}", r.text());
        assert!(
            r.text().contains("node is 300 bytes long; at most 253"),
            "{}",
            r.text()
        );
        let long_image = format!(r#"{{"image":"registry.test/{}:v1"}}"#, "a".repeat(600));
        let r = request(&s, "POST", "/v1/misses", None, &long_image).await;
        assert_eq!(r.status, 400, "{}", r.text());
        assert!(r.text().contains("image is 617 bytes long"), "{}", r.text());
        assert!(s.misses.try_recv().is_err(), "nothing was handed over");
        let longest = "n".repeat(MAX_NODE_NAME_LEN);
        let ok = format!(r#"{{"image":"registry.test/app:v1","node":"{longest}"}}"#);
        assert_eq!(
            request(&s, "POST", "/v1/misses", None, &ok).await.status,
            202
        );
    }

    /// Small limits, so the test floods them with a few requests.
    fn small_profile_limits() -> ApiLimits {
        ApiLimits {
            profiles: ProfileLimits {
                traces_per_layer: 4,
                spans_per_trace: 8,
                layers: 6,
                spans: 40,
                spans_per_node: 24,
            },
            ..ApiLimits::default()
        }
    }

    fn layer_digest(i: usize) -> Digest {
        Digest::parse(&format!("sha256:{i:064x}")).unwrap()
    }

    /// Total size and count of the saved trace files.
    fn saved_profiles(store: &Store) -> (u64, usize) {
        let files: Vec<u64> = std::fs::read_dir(profiles_dir(store))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .collect()
            })
            .unwrap_or_default();
        (files.iter().sum(), files.len())
    }

    #[tokio::test]
    async fn trace_posts_keep_bounded_memory_and_disk_with_a_quota_per_node() {
        let limits = small_profile_limits();
        let s = start_with(None, limits).await;
        let post = |node: &str, layer: usize, spans: &str| {
            format!(
                r#"{{"node":"{node}","layers":{{"{}":{spans}}}}}"#,
                layer_digest(layer)
            )
        };
        let r = request(&s, "POST", "/v1/traces", None, &post("quiet", 0, "[1,2,3]")).await;
        assert_eq!(r.status, 202, "{}", r.text());
        // One node floods: many layers, the longest traces (cut to 8 spans).
        for layer in 1..=150 {
            let body = post("flood", layer, "[1,2,3,4,5,6,7,8,9,10,11,12]");
            let r = request(&s, "POST", "/v1/traces", None, &body).await;
            assert_eq!(r.status, 202, "{}", r.text());
        }
        let (spans, layers) = {
            let book = s.api.inner.profiles.read().unwrap();
            (book.span_count(), book.layer_count())
        };
        assert!(
            spans <= 40 && layers <= 6,
            "{spans} spans in {layers} layers kept"
        );
        // The flooding node pushed out only its own traces: the quiet node's is still served.
        let quiet = request(
            &s,
            "GET",
            &format!("/v1/layers/{}/prefetch", layer_digest(0)),
            None,
            "",
        )
        .await;
        assert_eq!(quiet.status, 200, "{}", quiet.text());
        // On disk: one file per kept layer, each at most a layer's worth.
        let (bytes, files) = saved_profiles(&s.store);
        assert_eq!(files, layers, "a file per kept layer");
        assert!(
            bytes <= 6 * saved_file_limit(&limits.profiles),
            "{bytes} bytes saved"
        );
        let metrics = request(&s, "GET", "/metrics", None, "").await.text();
        assert!(
            metrics.contains(&format!("hermes_controller_profile_spans {spans}")),
            "{metrics}"
        );
        // 150 traces of 8 spans, 3 fit the node's quota of 24.
        assert!(
            metrics.contains("hermes_controller_profile_evictions_total 147"),
            "{metrics}"
        );
        // Too many layers in one report, or a long node name: refused with the reason.
        let many: BTreeMap<String, Vec<u32>> = (0..=MAX_LAYERS_PER_REPORT)
            .map(|i| (layer_digest(1000 + i).to_string(), vec![1]))
            .collect();
        let body = serde_json::json!({ "layers": many }).to_string();
        let r = request(&s, "POST", "/v1/traces", None, &body).await;
        assert_eq!(r.status, 400, "{}", r.text());
        assert!(r.text().contains("at most 128"), "{}", r.text());
        let r = request(
            &s,
            "POST",
            "/v1/traces",
            None,
            &post(&"n".repeat(254), 0, "[1]"),
        )
        .await;
        assert_eq!(r.status, 400, "{}", r.text());

        // A restart with smaller limits keeps the most recent traces and rewrites the files.
        let (tx, _rx) = mpsc::channel(1);
        let mut smaller = limits;
        smaller.profiles.layers = 2;
        let again = NodeApi::with_limits(s.store.clone(), None, vec![4 << 20], tx, smaller);
        let book = again.inner.profiles.read().unwrap();
        assert_eq!(book.layer_count(), 2);
        assert!(
            book.profile(&layer_digest(150)).is_some(),
            "the newest layer is kept"
        );
        assert_eq!(
            saved_profiles(&s.store).1,
            2,
            "files of dropped layers are deleted"
        );
    }

    /// Reads until the server closes `conn` (true), or fails after 30 s. While reading, `drip`
    /// (if any) is sent a byte at a time, one per 50 ms read timeout.
    async fn closed_by_server(conn: &mut tokio::net::TcpStream, drip: &[u8]) -> bool {
        let started = std::time::Instant::now();
        let mut drip = drip.iter();
        let mut buf = [0u8; 1024];
        while started.elapsed() < Duration::from_secs(30) {
            if let Some(byte) = drip.next()
                && conn.write_all(&[*byte]).await.is_err()
            {
                return true;
            }
            // End of stream or a reset; an answer (or nothing yet) means still open.
            if let Ok(Ok(0) | Err(_)) =
                tokio::time::timeout(Duration::from_millis(50), conn.read(&mut buf)).await
            {
                return true;
            }
        }
        false
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slow_and_idle_connections_are_closed_while_requests_are_answered() {
        let s = start_with(
            None,
            ApiLimits {
                header_read_timeout: Duration::from_millis(300),
                idle_timeout: Duration::from_millis(300),
                ..ApiLimits::default()
            },
        )
        .await;
        let connect = || tokio::net::TcpStream::connect(s.addr);
        let mut silent = Vec::new();
        for _ in 0..100 {
            silent.push(connect().await.unwrap());
        }
        // A head, a byte per 50 ms: slower than the header timeout allows in all.
        let mut dripping = connect().await.unwrap();
        // A body announced and never finished.
        let mut stalled = connect().await.unwrap();
        stalled
            .write_all(
                b"POST /v1/misses HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{\"image\"",
            )
            .await
            .unwrap();
        // Kept alive after an answer, then idle.
        let mut kept_alive = connect().await.unwrap();
        kept_alive
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();

        // Others are answered meanwhile.
        let r = request(&s, "GET", "/healthz", None, "").await;
        assert_eq!(r.status, 200);

        let head = b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
        assert!(
            closed_by_server(&mut dripping, head).await,
            "a dripped head is not cut off"
        );
        assert!(
            closed_by_server(&mut stalled, b"").await,
            "a stalled body is not cut off"
        );
        assert!(
            closed_by_server(&mut kept_alive, b"").await,
            "an idle kept-alive connection stays"
        );
        for conn in &mut silent {
            assert!(
                closed_by_server(conn, b"").await,
                "a silent connection stays open"
            );
        }
        let r = request(&s, "GET", "/healthz", None, "").await;
        assert_eq!(r.status, 200);
    }
}
