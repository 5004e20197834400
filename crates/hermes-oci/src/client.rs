//! The OCI distribution client: authentication, retries, manifests, range reads, resumable
//! blob streams and pushes. Async (tokio + reqwest); request shaping and decisions are small
//! pure functions so they can be tested without a server.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf as _, Bytes, BytesMut};
use reqwest::header::{
    ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, HeaderMap, HeaderName,
    HeaderValue, LOCATION, RANGE, RETRY_AFTER, WWW_AUTHENTICATE,
};
use reqwest::{Method, Response, StatusCode};
use tracing::{debug, warn};

use crate::auth::{Challenge, Credential, Credentials, Token, TokenResponse};
use crate::hosts::{HostConfig, RegistryHosts};
use crate::manifest::{Descriptor, Index, Manifest, Platform, media};
use crate::pull_credentials::PullCredentials;
use crate::{Digest, Error, Hasher, Reference, Result};

/// How hard to retry transient failures (connection drops, 5xx, 429).
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts per request, the first included.
    pub max_attempts: u32,
    /// First backoff; doubles each retry.
    pub initial_backoff: Duration,
    /// Backoff ceiling.
    pub max_backoff: Duration,
    /// Longest `Retry-After` honoured; longer ones give up.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 6,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
            max_retry_after: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// Backoff before retry number `retry` (1-based), honouring `Retry-After` when given.
    pub fn delay(&self, retry: u32, retry_after: Option<Duration>) -> Option<Duration> {
        if let Some(after) = retry_after {
            return (after <= self.max_retry_after).then_some(after);
        }
        let exp = self
            .initial_backoff
            .saturating_mul(1 << retry.saturating_sub(1).min(16));
        Some(exp.min(self.max_backoff))
    }
}

/// How long one request may take in all: connecting, authenticating, every retry and its
/// backoff, and reading the body. That is `floor` plus the time the most bytes the request may
/// return take at `min_bytes_per_sec`.
///
/// Why this shape: [`ClientOptions::read_timeout`] only catches a server that stops sending; one
/// that trickles a byte now and then never trips it and would hold a build or a FUSE read
/// forever. A fixed deadline would either cut big blobs off on slow links or let small requests
/// hang for as long as the biggest one may take; scaling with the bytes asked bounds both. The
/// defaults (60 s + 256 KiB/s) let a manifest (at most 4 MiB) take 76 s, a 4 MiB span 76 s and a
/// 1 GiB layer about 69 minutes: slower than that is treated as a broken registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    /// Time every request gets, whatever its size (connection set-up, tokens, retries).
    pub floor: Duration,
    /// The slowest average transfer rate tolerated.
    pub min_bytes_per_sec: u64,
}

impl Default for Deadline {
    fn default() -> Self {
        Self {
            floor: Duration::from_secs(60),
            min_bytes_per_sec: 256 << 10,
        }
    }
}

impl Deadline {
    /// The deadline of a request that returns (or sends) at most `bytes`.
    pub fn for_bytes(&self, bytes: u64) -> Duration {
        let transfer = bytes.saturating_mul(1000) / self.min_bytes_per_sec.max(1);
        self.floor.saturating_add(Duration::from_millis(transfer))
    }
}

/// containerd's (and distribution's) limit on a manifest: 4 MiB.
pub const DEFAULT_MAX_METADATA_SIZE: u64 = 4 << 20;

/// How much of an error response's body is read, to show in the error.
const ERROR_BODY_PREFIX: u64 = 4 << 10;

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Talk plain HTTP instead of HTTPS (local and insecure registries).
    pub plain_http: bool,
    /// Credentials by registry.
    pub credentials: Credentials,
    /// Credentials by repository learned at run time (a pod's pull secrets); they win over
    /// `credentials`.
    pub pull_credentials: PullCredentials,
    /// Retry policy.
    pub retry: RetryPolicy,
    /// Longest wait for the next bytes of a response before the connection counts as dropped
    /// (the stall timeout; a dropped connection is retried or resumed).
    pub read_timeout: Duration,
    /// Overall deadline of each request, retries included.
    pub deadline: Deadline,
    /// Largest manifest, image index, image config, referrers list, tag list page and token
    /// response read into memory; a longer body is an [`Error::TooLarge`]. A repository's whole
    /// tag list may be 16 times this.
    pub max_metadata_size: u64,
    /// Blobs larger than this are uploaded in chunks (PATCH) rather than in one PUT.
    pub upload_chunk_size: usize,
    /// containerd's registry host configuration (`hosts.toml` mirrors): blob reads try a
    /// registry's mirrors in order before the registry itself.
    pub registry_hosts: RegistryHosts,
    /// The deadline of one blob read from a mirror. Shorter than [`ClientOptions::deadline`]:
    /// a slow mirror should hand over to the next host, not hold a read.
    pub mirror_deadline: Deadline,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            plain_http: false,
            credentials: Credentials::none(),
            pull_credentials: PullCredentials::default(),
            retry: RetryPolicy::default(),
            read_timeout: Duration::from_secs(30),
            deadline: Deadline::default(),
            max_metadata_size: DEFAULT_MAX_METADATA_SIZE,
            upload_chunk_size: 16 << 20,
            registry_hosts: RegistryHosts::none(),
            mirror_deadline: Deadline {
                floor: Duration::from_secs(10),
                min_bytes_per_sec: 1 << 20,
            },
        }
    }
}

/// A manifest as fetched.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    /// The exact bytes.
    pub bytes: Bytes,
    /// `Content-Type` (or the body's `mediaType`).
    pub media_type: String,
    /// Digest of the bytes.
    pub digest: Digest,
}

/// An image reference resolved to one platform's manifest.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    /// What was asked for.
    pub reference: Reference,
    /// The platform-specific manifest.
    pub manifest: Manifest,
    /// Its bytes, media type and digest.
    pub fetched: FetchedManifest,
    /// Platform chosen from an index (from the config otherwise unknown).
    pub platform: Option<Platform>,
    /// The index or manifest list the reference pointed at, if any.
    pub index: Option<FetchedManifest>,
}

/// A registry client; cheap to clone (shared connection pool and token cache).
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    http: reqwest::Client,
    options: ClientOptions,
    /// Bearer tokens by (registry, scope); `Basic` auth marked by registry.
    tokens: Mutex<HashMap<(String, String), Token>>,
    basic: Mutex<HashMap<String, bool>>,
    /// Blob hosts by registry name, loaded once from the host configuration.
    endpoints: Mutex<HashMap<String, Arc<[Arc<Endpoint>]>>>,
    /// Counters by host name, shared by every registry that uses the host.
    counters: Mutex<BTreeMap<String, Arc<HostCounters>>>,
    /// Mirrors that served wrong bytes of a blob: not asked for it again.
    distrusted: Mutex<HashSet<(String, Digest)>>,
    /// Mirrors that answered a range read of a blob with the whole blob, and until when they
    /// are left alone for it (see [`MIRROR_FILL_WAIT`]).
    filling: Mutex<HashMap<(String, Digest), Instant>>,
}

/// How long a mirror that answered a range read with the whole blob is not asked for that blob
/// again. A pull-through cache does that on a miss (distribution 2.8 streams the blob from the
/// registry to answer, and again to store it): reading up to our slice would pull a prefix of
/// the blob through the registry for every read until the mirror has stored it. Instead the
/// read hangs up at once and goes to the next host, and the mirror is asked again after this
/// long, when it has usually stored the blob and answers ranges.
const MIRROR_FILL_WAIT: Duration = Duration::from_secs(10);

/// The most (mirror, blob) pairs remembered as distrusted or filling.
const MAX_HOST_BLOB_MARKS: usize = 4096;

/// One host blobs are read from: a mirror or the registry itself, as configured.
#[derive(Debug)]
struct Endpoint {
    /// `host[:port]`: the key of credentials, tokens and counters.
    name: String,
    /// `scheme://host[:port]` and the API root (`/v2` unless `override_path`).
    base: String,
    /// A `[host."…"]` entry (not the registry's `server`).
    mirror: bool,
    /// The `ns` query parameter a mirror gets, naming the registry (as containerd sends it).
    ns: Option<String>,
    http: reqwest::Client,
    headers: Vec<(HeaderName, HeaderValue)>,
    counters: Arc<HostCounters>,
}

/// Per-host request counters.
#[derive(Debug, Default)]
struct HostCounters {
    requests: AtomicU64,
    bytes: AtomicU64,
    failures: AtomicU64,
}

/// What one registry host has served this process: requests sent, blob bytes received and
/// failures (errors, timeouts, 404s, bytes that failed verification). The host is a name from
/// the configuration, never a URL with credentials: fit for a metric label.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HostStats {
    /// `host[:port]`.
    pub host: String,
    /// HTTP requests sent (every attempt).
    pub requests: u64,
    /// Blob bytes received.
    pub bytes: u64,
    /// Reads that failed at this host (and went to the next one, or failed).
    pub failures: u64,
}

/// One request as data, so it can be re-sent on retry and after authentication.
#[derive(Debug, Clone)]
struct Req {
    method: Method,
    registry: String,
    repository: String,
    /// Path starting with `/v2/` or an absolute URL (upload locations).
    target: String,
    headers: Vec<(reqwest::header::HeaderName, String)>,
    body: Option<Bytes>,
    push: bool,
    /// The host to send it to; `None`: the registry as the reference names it.
    endpoint: Option<Arc<Endpoint>>,
}

impl Req {
    fn new(method: Method, r: &Reference, target: String) -> Self {
        Self {
            method,
            registry: r.api_host().to_owned(),
            repository: r.repository.clone(),
            target,
            headers: Vec::new(),
            body: None,
            push: false,
            endpoint: None,
        }
    }

    /// The request sent to `endpoint` instead of the registry's default address.
    fn via(mut self, endpoint: &Arc<Endpoint>) -> Self {
        self.registry = endpoint.name.clone();
        self.endpoint = Some(endpoint.clone());
        self
    }

    fn header(mut self, name: reqwest::header::HeaderName, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    fn scope(&self) -> String {
        format!(
            "repository:{}:{}",
            self.repository,
            if self.push { "pull,push" } else { "pull" }
        )
    }
}

/// Percent-encoding for a URL query value (everything but unreserved characters).
pub fn encode_query(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Parse `Retry-After` seconds (HTTP dates are treated as "unknown").
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

fn is_retryable_status(s: StatusCode) -> bool {
    s == StatusCode::TOO_MANY_REQUESTS || matches!(s.as_u16(), 500 | 502 | 503 | 504)
}

/// One request's retry budget, shared by every step that can fail transiently (sending, reading
/// the body, resuming a stream), so one request makes at most [`RetryPolicy::max_attempts`]
/// attempts in all.
#[derive(Debug, Default)]
struct Retries {
    /// Failed attempts so far.
    failures: u32,
    /// The registry has answered once: from then on a refused connection is a drop to retry,
    /// not a registry that is down.
    connected: bool,
}

impl Retries {
    /// Counts a failed attempt and waits its backoff, or gives up when the budget is spent.
    async fn failed(
        &mut self,
        policy: &RetryPolicy,
        registry: &str,
        failure: String,
        retry_after: Option<Duration>,
    ) -> Result<()> {
        self.failures += 1;
        match policy.delay(self.failures, retry_after) {
            Some(d) if self.failures < policy.max_attempts => {
                warn!(
                    registry,
                    attempt = self.failures,
                    "retrying in {d:?}: {failure}"
                );
                tokio::time::sleep(d).await;
                Ok(())
            }
            _ => Err(Error::RetriesExhausted {
                registry: registry.to_owned(),
                attempts: self.failures,
                last: failure,
            }),
        }
    }
}

/// Reads a response body chunk by chunk: drops its first `skip` bytes, keeps the next `keep` and
/// stops as soon as it has them, leaving the rest unread. Returns the kept bytes (fewer if the
/// body ended first) and whether bytes beyond them arrived; with `probe_end` it reads on until it
/// knows, so that "exactly `keep` bytes" and "more" are told apart.
async fn read_part(
    resp: &mut Response,
    mut skip: u64,
    keep: u64,
    probe_end: bool,
    what: &'static str,
) -> Result<(Bytes, bool)> {
    // Bounded by `keep`, which the caller chose: never by what the server announces alone.
    let announced = resp.content_length().unwrap_or(0).saturating_sub(skip);
    let mut out = BytesMut::with_capacity(keep.min(announced) as usize);
    loop {
        if out.len() as u64 == keep && !probe_end {
            return Ok((out.freeze(), false));
        }
        let mut chunk = match resp.chunk().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => return Ok((out.freeze(), false)),
            Err(source) => {
                return Err(Error::Body {
                    what,
                    url: resp.url().to_string(),
                    source,
                });
            }
        };
        if skip > 0 {
            let n = skip.min(chunk.len() as u64);
            skip -= n;
            chunk.advance(n as usize);
        }
        let room = (keep - out.len() as u64) as usize;
        if chunk.len() > room {
            out.extend_from_slice(&chunk[..room]);
            return Ok((out.freeze(), true));
        }
        out.extend_from_slice(&chunk);
    }
}

/// Reads a whole response body of at most `limit` bytes. A longer body, announced or sent, is an
/// [`Error::TooLarge`] naming `what` and the URL as soon as that shows, so a hostile server costs
/// at most `limit` bytes of memory whatever it sends. Time is not bounded here: run it within a
/// deadline.
pub async fn read_body(mut resp: Response, limit: u64, what: &'static str) -> Result<Bytes> {
    let too_large = |resp: &Response| Error::TooLarge {
        what,
        url: resp.url().to_string(),
        limit,
    };
    if resp.content_length().is_some_and(|n| n > limit) {
        return Err(too_large(&resp));
    }
    match read_part(&mut resp, 0, limit, true, what).await? {
        (_, true) => Err(too_large(&resp)),
        (body, false) => Ok(body),
    }
}

impl Client {
    /// A client with these options. Installs the ring crypto provider for rustls once.
    pub fn new(options: ClientOptions) -> Result<Self> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .user_agent(concat!("hermes/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(options.read_timeout)
            .build()
            .map_err(Error::Client)?;
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                options,
                tokens: Mutex::new(HashMap::new()),
                basic: Mutex::new(HashMap::new()),
                endpoints: Mutex::new(HashMap::new()),
                counters: Mutex::new(BTreeMap::new()),
                distrusted: Mutex::new(HashSet::new()),
                filling: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The options in use.
    pub fn options(&self) -> &ClientOptions {
        &self.inner.options
    }

    fn base(&self, registry: &str) -> String {
        let scheme = if self.inner.options.plain_http {
            "http"
        } else {
            "https"
        };
        format!("{scheme}://{registry}")
    }

    fn url(&self, req: &Req) -> String {
        if req.target.starts_with("http://") || req.target.starts_with("https://") {
            return req.target.clone();
        }
        match &req.endpoint {
            Some(ep) => {
                let rest = req.target.strip_prefix("/v2").unwrap_or(&req.target);
                let mut url = format!("{}{rest}", ep.base);
                if let Some(ns) = &ep.ns {
                    let sep = if url.contains('?') { '&' } else { '?' };
                    url.push_str(&format!("{sep}ns={}", encode_query(ns)));
                }
                url
            }
            None => format!("{}{}", self.base(&req.registry), req.target),
        }
    }

    /// The retry policy of a request: a mirror gets one attempt, then the next host is asked.
    fn policy(&self, req: &Req) -> RetryPolicy {
        match &req.endpoint {
            Some(ep) if ep.mirror => RetryPolicy {
                max_attempts: 1,
                ..self.inner.options.retry.clone()
            },
            _ => self.inner.options.retry.clone(),
        }
    }

    /// The deadline of a request: mirrors have their own.
    fn deadline(&self, req: &Req) -> Deadline {
        match &req.endpoint {
            Some(ep) if ep.mirror => self.inner.options.mirror_deadline,
            _ => self.inner.options.deadline,
        }
    }

    /// The credential for a request: a pull secret for its repository first, then the
    /// registry's static one.
    fn credential(&self, req: &Req) -> Option<Credential> {
        let options = &self.inner.options;
        options
            .pull_credentials
            .get(&req.registry, &req.repository)
            .or_else(|| options.credentials.get(&req.registry).cloned())
    }

    fn auth_header(&self, req: &Req) -> Option<String> {
        let key = (req.registry.clone(), req.scope());
        if let Some(t) = self.inner.tokens.lock().ok()?.get(&key)
            && t.expires > Instant::now()
        {
            return Some(format!("Bearer {}", t.value));
        }
        if self
            .inner
            .basic
            .lock()
            .ok()?
            .get(&req.registry)
            .copied()
            .unwrap_or(false)
        {
            return self.credential(req)?.basic_header();
        }
        None
    }

    /// Answer a 401 challenge: fetch a token or switch to Basic. `Ok(false)` when there is
    /// nothing more we can try.
    async fn authenticate(&self, req: &Req, challenge: Option<&str>) -> Result<bool> {
        let credential = self.credential(req);
        match challenge.and_then(Challenge::parse) {
            Some(Challenge::Basic { .. }) => {
                if credential
                    .as_ref()
                    .and_then(Credential::basic_header)
                    .is_none()
                {
                    return Ok(false);
                }
                if let Ok(mut basic) = self.inner.basic.lock() {
                    let already = basic.insert(req.registry.clone(), true).unwrap_or(false);
                    return Ok(!already);
                }
                Ok(false)
            }
            Some(Challenge::Bearer { realm, service, .. }) => {
                let scope = req.scope();
                let mut url = format!(
                    "{realm}{}scope={}",
                    if realm.contains('?') { '&' } else { '?' },
                    encode_query(&scope)
                );
                if let Some(s) = &service {
                    url.push_str(&format!("&service={}", encode_query(s)));
                }
                let request = match &credential {
                    Some(Credential::IdentityToken(token)) => {
                        let body = format!(
                            "grant_type=refresh_token&client_id=hermes&refresh_token={}&scope={}{}",
                            encode_query(token),
                            encode_query(&scope),
                            service
                                .as_deref()
                                .map(|s| format!("&service={}", encode_query(s)))
                                .unwrap_or_default()
                        );
                        self.inner
                            .http
                            .post(&realm)
                            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                            .body(body)
                    }
                    Some(c @ Credential::Basic { .. }) => self
                        .inner
                        .http
                        .get(&url)
                        .header(AUTHORIZATION, c.basic_header().unwrap_or_default()),
                    None => self.inner.http.get(&url),
                };
                let resp = request.send().await.map_err(|source| Error::Unreachable {
                    registry: realm.clone(),
                    source,
                })?;
                if !resp.status().is_success() {
                    debug!(status = %resp.status(), %realm, "token endpoint refused");
                    return Ok(false);
                }
                let body =
                    read_body(resp, self.inner.options.max_metadata_size, "token response").await?;
                let token = serde_json::from_slice::<TokenResponse>(&body)
                    .ok()
                    .and_then(|t| t.into_token(Instant::now()));
                let Some(token) = token else { return Ok(false) };
                if let Ok(mut tokens) = self.inner.tokens.lock() {
                    tokens.insert((req.registry.clone(), scope), token);
                }
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Runs `work`, one request's whole exchange, within the deadline of a request that moves
    /// at most `bytes`.
    async fn within<T>(
        &self,
        what: &'static str,
        req: &Req,
        bytes: u64,
        work: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let after = self.deadline(req).for_bytes(bytes);
        tokio::time::timeout(after, work).await.unwrap_or_else(|_| {
            Err(Error::DeadlineExceeded {
                what,
                url: self.url(req),
                after,
            })
        })
    }

    /// Send with authentication and retries, within the deadline for its request body. Returns
    /// any non-retryable response (the caller interprets 404 and friends; reading its body is
    /// the caller's, under a deadline of its own); 401/403 after authenticating become
    /// [`Error::Unauthorized`].
    async fn send(&self, req: &Req) -> Result<Response> {
        let bytes = req.body.as_ref().map_or(0, |b| b.len() as u64);
        let mut retries = Retries::default();
        self.within("response", req, bytes, self.send_counted(req, &mut retries))
            .await
    }

    /// [`Client::send`] spending the caller's retry budget and under the caller's deadline.
    async fn send_counted(&self, req: &Req, retries: &mut Retries) -> Result<Response> {
        let mut authenticated = false;
        loop {
            let http = req
                .endpoint
                .as_ref()
                .map_or(&self.inner.http, |ep| &ep.http);
            let mut builder = http.request(req.method.clone(), self.url(req));
            if let Some(ep) = &req.endpoint {
                ep.counters.requests.fetch_add(1, Ordering::Relaxed);
                for (k, v) in &ep.headers {
                    builder = builder.header(k, v);
                }
            }
            for (k, v) in &req.headers {
                builder = builder.header(k, v);
            }
            if let Some(auth) = self.auth_header(req) {
                builder = builder.header(AUTHORIZATION, auth);
            }
            if let Some(body) = &req.body {
                builder = builder.body(body.clone());
            } else if req.method == Method::PUT
                || req.method == Method::POST
                || req.method == Method::PATCH
            {
                builder = builder.header(CONTENT_LENGTH, "0");
            }
            let (failure, wait) = match builder.send().await {
                Ok(resp) => {
                    retries.connected = true;
                    let status = resp.status();
                    if status == StatusCode::UNAUTHORIZED && !authenticated {
                        authenticated = true;
                        let challenge = resp
                            .headers()
                            .get(WWW_AUTHENTICATE)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned);
                        // Authenticating is not a failed attempt.
                        if self.authenticate(req, challenge.as_deref()).await? {
                            continue;
                        }
                    }
                    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                        return Err(Error::Unauthorized {
                            registry: req.registry.clone(),
                            repository: req.repository.clone(),
                            status: status.as_u16(),
                            action: if req.push { "push" } else { "pull" },
                        });
                    }
                    if !is_retryable_status(status) {
                        return Ok(resp);
                    }
                    let after = retry_after(resp.headers());
                    (format!("{status} for {} {}", req.method, req.target), after)
                }
                // A registry that never answered is down or misnamed: fail fast. Drops after a
                // successful exchange are transient and retried.
                Err(e) if e.is_connect() && !retries.connected => {
                    return Err(Error::Unreachable {
                        registry: req.registry.clone(),
                        source: e,
                    });
                }
                Err(e) => (e.to_string(), None),
            };
            retries
                .failed(&self.policy(req), &req.registry, failure, wait)
                .await?;
        }
    }

    /// An unexpected answer as an error, with the start of its body (registry error JSON). At
    /// most a few KiB are read, for at most the deadline's floor.
    async fn status_error(&self, req: &Req, mut resp: Response) -> Error {
        let status = resp.status().as_u16();
        let prefix = read_part(&mut resp, 0, ERROR_BODY_PREFIX, false, "error response");
        let body = match tokio::time::timeout(self.inner.options.deadline.floor, prefix).await {
            Ok(Ok((bytes, _))) => String::from_utf8_lossy(&bytes).into_owned(),
            _ => String::new(),
        };
        Error::Status {
            registry: req.registry.clone(),
            method: req.method.to_string(),
            path: req.target.clone(),
            status,
            body: body.chars().take(300).collect(),
        }
    }

    /// Fetch a manifest or index by tag or digest; a digest reference is verified. At most
    /// [`ClientOptions::max_metadata_size`] bytes are read.
    pub async fn get_manifest(&self, r: &Reference) -> Result<FetchedManifest> {
        let req = Req::new(
            Method::GET,
            r,
            format!("/v2/{}/manifests/{}", r.repository, r.manifest_ref()),
        )
        .header(ACCEPT, media::MANIFEST_ACCEPT);
        let limit = self.inner.options.max_metadata_size;
        self.within("manifest", &req, limit, self.fetch_manifest(r, &req))
            .await
    }

    async fn fetch_manifest(&self, r: &Reference, req: &Req) -> Result<FetchedManifest> {
        let resp = self.send_counted(req, &mut Retries::default()).await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Err(Error::NotFound {
                what: "manifest",
                name: r.manifest_ref(),
                registry: r.registry.clone(),
                repository: r.repository.clone(),
            });
        }
        if !resp.status().is_success() {
            return Err(self.status_error(req, resp).await);
        }
        let content_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.split(';').next().unwrap_or(s).trim().to_owned());
        let bytes = read_body(resp, self.inner.options.max_metadata_size, "manifest").await?;
        let digest = Digest::of(&bytes);
        if let Some(expected) = &r.digest
            && *expected != digest
        {
            return Err(Error::DigestMismatch {
                registry: r.registry.clone(),
                expected: expected.clone(),
                actual: digest,
            });
        }
        // The body's own mediaType wins over a generic Content-Type.
        #[derive(serde::Deserialize)]
        struct Peek {
            #[serde(rename = "mediaType")]
            media_type: Option<String>,
        }
        let declared = serde_json::from_slice::<Peek>(&bytes)
            .ok()
            .and_then(|p| p.media_type);
        let media_type = declared.or(content_type).unwrap_or_default();
        Ok(FetchedManifest {
            bytes,
            media_type,
            digest,
        })
    }

    /// Resolve a reference to one platform's image manifest.
    pub async fn resolve(&self, r: &Reference, platform: &Platform) -> Result<ResolvedImage> {
        let top = self.get_manifest(r).await?;
        let parse_manifest = |m: &FetchedManifest| -> Result<Manifest> {
            serde_json::from_slice(&m.bytes).map_err(|source| Error::MalformedManifest {
                digest: m.digest.clone(),
                source,
            })
        };
        match top.media_type.as_str() {
            media::OCI_MANIFEST | media::DOCKER_MANIFEST => {
                let manifest = parse_manifest(&top)?;
                // A single-platform image: its config says which platform it is for.
                let found = self.config_platform(r, &manifest).await?;
                if let Some(p) = &found
                    && !platform.matches(p)
                {
                    return Err(Error::PlatformNotFound {
                        reference: r.to_string(),
                        platform: platform.to_string(),
                        available: p.to_string(),
                    });
                }
                Ok(ResolvedImage {
                    reference: r.clone(),
                    manifest,
                    fetched: top,
                    platform: found,
                    index: None,
                })
            }
            media::OCI_INDEX | media::DOCKER_LIST => {
                let index: Index = serde_json::from_slice(&top.bytes).map_err(|source| {
                    Error::MalformedManifest {
                        digest: top.digest.clone(),
                        source,
                    }
                })?;
                let chosen = index
                    .manifests
                    .iter()
                    .filter(|d| {
                        d.artifact_type.is_none()
                            && matches!(
                                d.media_type.as_str(),
                                media::OCI_MANIFEST | media::DOCKER_MANIFEST
                            )
                    })
                    .find(|d| d.platform.as_ref().is_some_and(|p| platform.matches(p)));
                let Some(chosen) = chosen else {
                    let available: Vec<String> = index
                        .manifests
                        .iter()
                        .filter_map(|d| d.platform.as_ref().map(Platform::to_string))
                        .collect();
                    return Err(Error::PlatformNotFound {
                        reference: r.to_string(),
                        platform: platform.to_string(),
                        available: if available.is_empty() {
                            "none".into()
                        } else {
                            available.join(", ")
                        },
                    });
                };
                let fetched = self
                    .get_manifest(&r.with_digest(chosen.digest.clone()))
                    .await?;
                let manifest = parse_manifest(&fetched)?;
                Ok(ResolvedImage {
                    reference: r.clone(),
                    manifest,
                    fetched,
                    platform: chosen.platform.clone(),
                    index: Some(top),
                })
            }
            other => Err(Error::UnsupportedManifest {
                reference: r.to_string(),
                media_type: other.to_owned(),
            }),
        }
    }

    /// The platform recorded in an image's config blob (`None` if it records none).
    async fn config_platform(
        &self,
        r: &Reference,
        manifest: &Manifest,
    ) -> Result<Option<Platform>> {
        #[derive(serde::Deserialize)]
        struct Config {
            architecture: Option<String>,
            os: Option<String>,
            variant: Option<String>,
        }
        let bytes = self.get_config(r, &manifest.config).await?;
        let c: Config =
            serde_json::from_slice(&bytes).map_err(|source| Error::MalformedManifest {
                digest: manifest.config.digest.clone(),
                source,
            })?;
        Ok(match (c.os, c.architecture) {
            (Some(os), Some(architecture)) if !os.is_empty() && !architecture.is_empty() => {
                Some(Platform {
                    architecture,
                    os,
                    os_version: None,
                    os_features: None,
                    variant: c.variant.filter(|v| !v.is_empty()),
                    features: None,
                })
            }
            _ => None,
        })
    }

    fn blob_req(r: &Reference, digest: &Digest) -> Req {
        Req::new(
            Method::GET,
            r,
            format!("/v2/{}/blobs/{}", r.repository, digest),
        )
    }

    fn not_found_blob(r: &Reference, digest: &Digest) -> Error {
        Error::NotFound {
            what: "blob",
            name: digest.to_string(),
            registry: r.registry.clone(),
            repository: r.repository.clone(),
        }
    }

    /// Read `len` bytes at `offset` of a blob with an HTTP Range GET. A registry that ignores
    /// `Range` and sends the whole blob is detected: its answer is read only up to the wanted
    /// slice, the bytes before it discarded as they stream by. A partial answer longer than
    /// `len` is an [`Error::TooLarge`]. One retry budget covers sending and reading, and the
    /// whole read has the deadline of `len` bytes.
    ///
    /// With mirrors configured ([`ClientOptions::registry_hosts`]) the hosts with the `pull`
    /// capability are tried in order, each with its own deadline; a connection error, an error
    /// status, a 404 or a deadline hands over to the next host and finally the registry.
    /// Nothing here can verify a range (only the whole blob has a digest): use
    /// [`Client::blob_range_verified`] when the caller can.
    pub async fn blob_range(
        &self,
        r: &Reference,
        digest: &Digest,
        offset: u64,
        len: u64,
    ) -> Result<Bytes> {
        self.blob_range_verified(r, digest, offset, len, &|_| true)
            .await
    }

    /// [`Client::blob_range`] with a check of what mirrors serve: `mirrored_ok` judges the bytes
    /// a mirror returned (against a zTOC's span digests, say); when it refuses them the mirror
    /// is counted as failed, not asked for this blob again, and the next host is asked. The
    /// registry's own bytes are returned unjudged, for the caller to verify as it always does.
    pub async fn blob_range_verified(
        &self,
        r: &Reference,
        digest: &Digest,
        offset: u64,
        len: u64,
        mirrored_ok: &(dyn Fn(&[u8]) -> bool + Send + Sync),
    ) -> Result<Bytes> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        let last = offset.saturating_add(len - 1);
        let mut failed = None;
        for ep in self.blob_endpoints(r, digest) {
            let req = Self::blob_req(r, digest)
                .via(&ep)
                .header(RANGE, format!("bytes={offset}-{last}"));
            let read = self.read_range(r, digest, &req, offset, len);
            match self.within("blob range", &req, len, read).await {
                Ok(bytes) => {
                    ep.counters.bytes.fetch_add(len, Ordering::Relaxed);
                    if !ep.mirror || mirrored_ok(&bytes) {
                        return Ok(bytes);
                    }
                    ep.counters.failures.fetch_add(1, Ordering::Relaxed);
                    self.distrust(&ep, digest);
                    warn!(host = %ep.name, %digest, offset, len,
                        "mirror served bytes that fail verification; not using it for this blob");
                    failed = Some(Error::MirrorMismatch {
                        host: ep.name.clone(),
                        digest: digest.clone(),
                        offset,
                    });
                }
                Err(e) => {
                    ep.counters.failures.fetch_add(1, Ordering::Relaxed);
                    if let Error::MirrorSentWholeBlob { .. } = e {
                        debug!(host = %ep.name, %digest, "mirror is filling; trying the next host");
                        self.leave_filling(&ep, digest);
                    } else if ep.mirror {
                        warn!(host = %ep.name, %digest, error = %e, "mirror failed; trying the next host");
                    }
                    failed = Some(e);
                }
            }
        }
        Err(failed.unwrap_or_else(|| self.no_pull_host(r)))
    }

    fn no_pull_host(&self, r: &Reference) -> Error {
        Error::HostsConfig {
            path: self
                .inner
                .options
                .registry_hosts
                .host_dir(&r.registry)
                .unwrap_or_default(),
            message: format!("no host of {} has the pull capability", r.registry),
        }
    }

    /// The hosts to read `digest` of `r` from, in order: mirrors with the `pull` capability
    /// that have not served wrong bytes of it and are not filling it, then the registry (if it
    /// may be pulled from).
    fn blob_endpoints(&self, r: &Reference, digest: &Digest) -> Vec<Arc<Endpoint>> {
        let all = self.endpoints(r);
        let distrusted = self.inner.distrusted.lock().ok();
        let filling = self.inner.filling.lock().ok();
        let now = Instant::now();
        all.iter()
            .filter(|ep| {
                let key = (ep.name.clone(), digest.clone());
                !ep.mirror
                    || !(distrusted.as_ref().is_some_and(|d| d.contains(&key))
                        || filling
                            .as_ref()
                            .and_then(|f| f.get(&key))
                            .is_some_and(|until| *until > now))
            })
            .cloned()
            .collect()
    }

    fn distrust(&self, ep: &Endpoint, digest: &Digest) {
        if let Ok(mut d) = self.inner.distrusted.lock() {
            // Bounded: a process reads a bounded set of blobs from a bounded set of hosts, but
            // a runaway mirror must not grow this without end.
            if d.len() < MAX_HOST_BLOB_MARKS {
                d.insert((ep.name.clone(), digest.clone()));
            }
        }
    }

    fn leave_filling(&self, ep: &Endpoint, digest: &Digest) {
        if let Ok(mut f) = self.inner.filling.lock() {
            let now = Instant::now();
            f.retain(|_, until| *until > now);
            if f.len() < MAX_HOST_BLOB_MARKS {
                f.insert((ep.name.clone(), digest.clone()), now + MIRROR_FILL_WAIT);
            }
        }
    }

    /// The pull hosts of `r`'s registry, loaded from the host configuration once. A
    /// configuration that cannot be read leaves the registry alone (containerd does the same),
    /// loudly.
    fn endpoints(&self, r: &Reference) -> Arc<[Arc<Endpoint>]> {
        if let Some(found) = self
            .inner
            .endpoints
            .lock()
            .ok()
            .and_then(|m| m.get(&r.registry).cloned())
        {
            return found;
        }
        let hosts = match self.inner.options.registry_hosts.load(&r.registry) {
            Ok(file) => {
                if !file.ignored_keys.is_empty() {
                    warn!(registry = %r.registry, keys = ?file.ignored_keys,
                        "hosts.toml keys containerd does not know are ignored");
                }
                file.hosts
            }
            Err(e) => {
                warn!(registry = %r.registry, error = %e, "ignoring the registry host configuration");
                vec![HostConfig::origin()]
            }
        };
        // The server comes last in a hosts file; every entry before it is a `[host]` mirror.
        let server = hosts.len().saturating_sub(1);
        let endpoints: Arc<[Arc<Endpoint>]> = hosts
            .iter()
            .enumerate()
            .filter(|(_, h)| h.capabilities.pull)
            .filter_map(|(i, h)| match self.endpoint(r, h, i < server) {
                Ok(ep) => Some(Arc::new(ep)),
                Err(e) => {
                    warn!(registry = %r.registry, error = %e, "skipping a registry host");
                    None
                }
            })
            .collect();
        if !endpoints.is_empty() && endpoints.iter().any(|e| e.mirror) {
            let names: Vec<&str> = endpoints.iter().map(|e| e.name.as_str()).collect();
            debug!(registry = %r.registry, hosts = ?names, "blob hosts");
        }
        if let Ok(mut m) = self.inner.endpoints.lock() {
            m.insert(r.registry.clone(), endpoints.clone());
        }
        endpoints
    }

    fn endpoint(&self, r: &Reference, h: &HostConfig, mirror: bool) -> Result<Endpoint> {
        let (name, base) = match &h.url {
            Some(u) => (
                u.host.clone(),
                format!("{}://{}{}", u.scheme, u.host, u.path),
            ),
            None => {
                let host = r.api_host().to_owned();
                (host.clone(), format!("{}/v2", self.base(&host)))
            }
        };
        let http = if h.needs_own_client() {
            self.host_client(&name, h)?
        } else {
            self.inner.http.clone()
        };
        let mut headers = Vec::new();
        for (key, values) in &h.header {
            let Ok(key) = HeaderName::try_from(key.as_str()) else {
                warn!(host = %name, header = %key, "ignoring an invalid header name");
                continue;
            };
            for v in values {
                match HeaderValue::try_from(v.as_str()) {
                    Ok(v) => headers.push((key.clone(), v)),
                    Err(_) => {
                        warn!(host = %name, header = %key, "ignoring an invalid header value")
                    }
                }
            }
        }
        let counters = self
            .inner
            .counters
            .lock()
            .map(|mut c| c.entry(name.clone()).or_default().clone())
            .unwrap_or_default();
        Ok(Endpoint {
            ns: mirror.then(|| r.registry.clone()),
            name,
            base,
            mirror,
            http,
            headers,
            counters,
        })
    }

    /// A connection pool with a host's TLS settings and dial timeout.
    fn host_client(&self, name: &str, h: &HostConfig) -> Result<reqwest::Client> {
        let read = |path: &std::path::Path| {
            crate::hosts::read_capped(path, crate::hosts::MAX_HOSTS_FILE).map_err(|e| {
                Error::HostTls {
                    host: name.to_owned(),
                    path: path.to_owned(),
                    message: e.to_string(),
                }
            })
        };
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("hermes/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(h.dial_timeout.unwrap_or(Duration::from_secs(10)))
            .read_timeout(self.inner.options.read_timeout);
        for ca in &h.ca {
            let certs =
                reqwest::Certificate::from_pem_bundle(&read(ca)?).map_err(|e| Error::HostTls {
                    host: name.to_owned(),
                    path: ca.clone(),
                    message: e.to_string(),
                })?;
            builder = builder.tls_certs_merge(certs);
        }
        // reqwest takes one identity; containerd offers every pair and the server picks. The
        // first pair is the one used.
        if let Some((cert, key)) = h.client.first() {
            let mut pem = read(cert)?;
            if let Some(key) = key {
                pem.push(b'\n');
                pem.extend(read(key)?);
            }
            let identity = reqwest::Identity::from_pem(&pem).map_err(|e| Error::HostTls {
                host: name.to_owned(),
                path: cert.clone(),
                message: e.to_string(),
            })?;
            builder = builder.identity(identity);
        }
        if let Some(skip) = h.skip_verify {
            builder = builder.tls_danger_accept_invalid_certs(skip);
        }
        builder.build().map_err(Error::Client)
    }

    /// What each registry host has served so far, by host name.
    pub fn host_stats(&self) -> Vec<HostStats> {
        let Ok(counters) = self.inner.counters.lock() else {
            return Vec::new();
        };
        counters
            .iter()
            .map(|(host, c)| HostStats {
                host: host.clone(),
                requests: c.requests.load(Ordering::Relaxed),
                bytes: c.bytes.load(Ordering::Relaxed),
                failures: c.failures.load(Ordering::Relaxed),
            })
            .collect()
    }

    async fn read_range(
        &self,
        r: &Reference,
        digest: &Digest,
        req: &Req,
        offset: u64,
        len: u64,
    ) -> Result<Bytes> {
        const WHAT: &str = "blob range";
        let mut retries = Retries::default();
        loop {
            let mut resp = self.send_counted(req, &mut retries).await?;
            let body = match resp.status() {
                StatusCode::PARTIAL_CONTENT => read_body(resp, len, WHAT).await,
                StatusCode::OK if req.endpoint.as_ref().is_some_and(|ep| ep.mirror) => {
                    // Dropping the answer unread closes the connection.
                    return Err(Error::MirrorSentWholeBlob {
                        host: req.registry.clone(),
                        digest: digest.clone(),
                    });
                }
                StatusCode::OK => {
                    warn!(registry = %r.registry, "registry ignored Range and sends the whole blob");
                    read_part(&mut resp, offset, len, false, WHAT)
                        .await
                        .map(|(body, _)| body)
                }
                StatusCode::NOT_FOUND => return Err(Self::not_found_blob(r, digest)),
                _ => return Err(self.status_error(req, resp).await),
            };
            let failure = match body {
                Ok(body) if body.len() as u64 == len => return Ok(body),
                Ok(body) => format!("range read returned {} of {len} bytes", body.len()),
                Err(Error::Body { source, .. }) => source.to_string(),
                Err(e) => return Err(e),
            };
            retries
                .failed(&self.policy(req), &req.registry, failure, None)
                .await?;
        }
    }

    /// Fetch a whole blob of `size` bytes (its descriptor's) into memory, verified against its
    /// digest; a blob going on past `size` is an [`Error::BlobTooLong`]. Memory is bounded by
    /// `size`: take it from a descriptor only after checking it against a limit of your own (as
    /// [`Client::get_config`] does).
    pub async fn get_blob(&self, r: &Reference, digest: &Digest, size: u64) -> Result<Bytes> {
        let mut stream = self.blob_stream(r, digest, size);
        let mut out = Vec::new();
        while let Some(chunk) = stream.next().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(Bytes::from(out))
    }

    /// Fetch a blob that is read whole into memory and is small by nature (an image config),
    /// verified; one whose descriptor declares more than [`ClientOptions::max_metadata_size`] is
    /// an [`Error::TooLarge`], refused before any request.
    pub async fn get_config(&self, r: &Reference, descriptor: &Descriptor) -> Result<Bytes> {
        let limit = self.inner.options.max_metadata_size;
        let size = u64::try_from(descriptor.size).unwrap_or(0);
        if size > limit {
            return Err(Error::TooLarge {
                what: "config blob",
                url: self.url(&Self::blob_req(r, &descriptor.digest)),
                limit,
            });
        }
        self.get_blob(r, &descriptor.digest, size).await
    }

    /// Stream a whole blob of `size` bytes (its descriptor's), resuming from the last byte
    /// received after a dropped connection, and verifying size and digest (the last item is an
    /// error on mismatch, or as soon as the blob goes on past `size`). The stream has the
    /// deadline of `size` bytes, counted over the time spent waiting in [`BlobStream::next`].
    pub fn blob_stream(&self, r: &Reference, digest: &Digest, size: u64) -> BlobStream {
        BlobStream {
            client: self.clone(),
            reference: r.clone(),
            digest: digest.clone(),
            size,
            received: 0,
            hasher: Some(Hasher::new()),
            response: None,
            skip: 0,
            retries: Retries::default(),
            budget: self.inner.options.deadline.for_bytes(size),
            spent: Duration::ZERO,
            done: false,
            hosts: None,
            at: 0,
            served_by: Vec::new(),
        }
    }

    /// Whether the repository has a blob.
    pub async fn blob_exists(&self, r: &Reference, digest: &Digest) -> Result<bool> {
        let mut req = Req::new(
            Method::HEAD,
            r,
            format!("/v2/{}/blobs/{}", r.repository, digest),
        );
        req.push = true;
        let resp = self.send(&req).await?;
        Ok(resp.status().is_success())
    }

    fn location(&self, req: &Req, resp: &Response) -> Result<String> {
        let loc = resp
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if loc.is_empty() {
            return Err(Error::Status {
                registry: req.registry.clone(),
                method: req.method.to_string(),
                path: req.target.clone(),
                status: resp.status().as_u16(),
                body: "upload response has no Location header".into(),
            });
        }
        Ok(
            if loc.starts_with("http://") || loc.starts_with("https://") {
                loc.to_owned()
            } else {
                format!("{}{loc}", self.base(&req.registry))
            },
        )
    }

    /// Upload a blob unless the repository has it already: cross-repository mount from
    /// `mount_from` when given, else a monolithic PUT, or PATCH chunks for big blobs.
    pub async fn push_blob(
        &self,
        r: &Reference,
        bytes: Bytes,
        mount_from: Option<&str>,
    ) -> Result<Digest> {
        let digest = Digest::of(&bytes);
        if self.blob_exists(r, &digest).await? {
            return Ok(digest);
        }
        let mut target = format!("/v2/{}/blobs/uploads/", r.repository);
        if let Some(from) = mount_from.filter(|f| *f != r.repository) {
            target.push_str(&format!(
                "?mount={}&from={}",
                encode_query(digest.as_str()),
                encode_query(from)
            ));
        }
        let mut start = Req::new(Method::POST, r, target);
        start.push = true;
        let resp = self.send(&start).await?;
        if resp.status() == StatusCode::CREATED {
            debug!(%digest, "blob mounted");
            return Ok(digest);
        }
        if resp.status() != StatusCode::ACCEPTED {
            return Err(self.status_error(&start, resp).await);
        }
        let mut location = self.location(&start, &resp)?;
        let chunk = self.inner.options.upload_chunk_size.max(1);
        let mut offset = 0usize;
        if bytes.len() > chunk {
            while offset < bytes.len() {
                let end = (offset + chunk).min(bytes.len());
                let mut patch = Req::new(Method::PATCH, r, location.clone())
                    .header(CONTENT_TYPE, "application/octet-stream")
                    .header(CONTENT_RANGE, format!("{}-{}", offset, end - 1));
                patch.push = true;
                patch.body = Some(bytes.slice(offset..end));
                let resp = self.send(&patch).await?;
                if resp.status() != StatusCode::ACCEPTED {
                    return Err(self.status_error(&patch, resp).await);
                }
                location = self.location(&patch, &resp)?;
                offset = end;
            }
        }
        let sep = if location.contains('?') { '&' } else { '?' };
        let mut put = Req::new(
            Method::PUT,
            r,
            format!("{location}{sep}digest={}", encode_query(digest.as_str())),
        )
        .header(CONTENT_TYPE, "application/octet-stream");
        put.push = true;
        put.body = Some(bytes.slice(offset..));
        let resp = self.send(&put).await?;
        if resp.status() != StatusCode::CREATED {
            return Err(self.status_error(&put, resp).await);
        }
        Ok(digest)
    }

    /// Mount a blob of `size` bytes from another repository of the same registry; falls back to
    /// copying it (through memory).
    pub async fn push_blob_mount(
        &self,
        r: &Reference,
        digest: &Digest,
        size: u64,
        from: &str,
    ) -> Result<()> {
        let mut req = Req::new(
            Method::POST,
            r,
            format!(
                "/v2/{}/blobs/uploads/?mount={}&from={}",
                r.repository,
                encode_query(digest.as_str()),
                encode_query(from)
            ),
        );
        req.push = true;
        let resp = self.send(&req).await?;
        if resp.status() == StatusCode::CREATED {
            return Ok(());
        }
        let source = Reference {
            repository: from.to_owned(),
            ..r.clone()
        };
        let blob = self.get_blob(&source, digest, size).await?;
        self.push_blob(r, blob, None).await.map(|_| ())
    }

    /// Put a manifest or index under a tag or digest; returns its digest.
    pub async fn push_manifest(
        &self,
        r: &Reference,
        reference: &str,
        bytes: Bytes,
        media_type: &str,
    ) -> Result<Digest> {
        let digest = Digest::of(&bytes);
        let mut req = Req::new(
            Method::PUT,
            r,
            format!("/v2/{}/manifests/{reference}", r.repository),
        )
        .header(CONTENT_TYPE, media_type);
        req.push = true;
        req.body = Some(bytes);
        let resp = self.send(&req).await?;
        if !resp.status().is_success() {
            return Err(self.status_error(&req, resp).await);
        }
        Ok(digest)
    }

    /// Every tag of the repository (following the registry's `Link` pages); none if the
    /// repository does not exist yet. Each page is at most [`ClientOptions::max_metadata_size`]
    /// and the whole list at most 16 times that, each page counting at least 4 KiB (so that
    /// endless empty pages end too).
    pub async fn tags(&self, r: &Reference) -> Result<Vec<String>> {
        #[derive(serde::Deserialize)]
        struct TagList {
            #[serde(default)]
            tags: Option<Vec<String>>,
        }
        let page_limit = self.inner.options.max_metadata_size;
        let list_limit = page_limit.saturating_mul(16);
        let mut tags = Vec::new();
        let mut listed = 0u64;
        let mut target = format!("/v2/{}/tags/list?n=1000", r.repository);
        loop {
            let req = Req::new(Method::GET, r, target.clone());
            let page = self.within("tag list page", &req, page_limit, self.tag_page(&req));
            let Some((bytes, next)) = page.await? else {
                return Ok(tags);
            };
            listed = listed.saturating_add((bytes.len() as u64).max(4 << 10));
            if listed > list_limit {
                return Err(Error::TooLarge {
                    what: "tag list",
                    url: self.url(&req),
                    limit: list_limit,
                });
            }
            let page: TagList = serde_json::from_slice(&bytes).map_err(|e| Error::Status {
                registry: req.registry.clone(),
                method: "GET".into(),
                path: target.clone(),
                status: 200,
                body: format!("not a tag list: {e}"),
            })?;
            tags.extend(page.tags.unwrap_or_default());
            match next {
                Some(link) if link != target => target = link,
                _ => return Ok(tags),
            }
        }
    }

    /// One page of a tag list and the next page's target; `None` if the repository does not
    /// exist.
    async fn tag_page(&self, req: &Req) -> Result<Option<(Bytes, Option<String>)>> {
        let resp = self.send_counted(req, &mut Retries::default()).await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !resp.status().is_success() {
            return Err(self.status_error(req, resp).await);
        }
        // `Link: </v2/NAME/tags/list?n=1000&last=TAG>; rel="next"`
        let next = resp
            .headers()
            .get(reqwest::header::LINK)
            .and_then(|v| v.to_str().ok())
            .filter(|v| v.contains("rel=\"next\""))
            .and_then(|v| Some(v.split_once('<')?.1.split_once('>')?.0.to_owned()));
        let bytes = read_body(resp, self.inner.options.max_metadata_size, "tag list page").await?;
        Ok(Some((bytes, next)))
    }

    /// Delete a manifest (and so every tag pointing at it). `Ok(false)` when it did not exist;
    /// an error when the registry refuses deletes (distribution: `storage.delete.enabled`).
    pub async fn delete_manifest(&self, r: &Reference, digest: &Digest) -> Result<bool> {
        let mut req = Req::new(
            Method::DELETE,
            r,
            format!("/v2/{}/manifests/{digest}", r.repository),
        );
        req.push = true;
        let resp = self.send(&req).await?;
        match resp.status() {
            StatusCode::NOT_FOUND => Ok(false),
            s if s.is_success() => Ok(true),
            _ => Err(self.status_error(&req, resp).await),
        }
    }

    /// Referrers of a manifest with an artifact type: the referrers API, else the fallback tag
    /// `sha256-<hex>` (distribution spec).
    pub async fn referrers(
        &self,
        r: &Reference,
        subject: &Digest,
        artifact_type: &str,
    ) -> Result<Vec<Descriptor>> {
        let req = Req::new(
            Method::GET,
            r,
            format!(
                "/v2/{}/referrers/{subject}?artifactType={}",
                r.repository,
                encode_query(artifact_type)
            ),
        )
        .header(ACCEPT, media::OCI_INDEX);
        let limit = self.inner.options.max_metadata_size;
        let listed = self.within("referrers list", &req, limit, async {
            let resp = self.send_counted(&req, &mut Retries::default()).await?;
            if !resp.status().is_success() {
                return Ok(None);
            }
            read_body(resp, limit, "referrers list").await.map(Some)
        });
        let index: Option<Index> = listed
            .await?
            .and_then(|bytes| serde_json::from_slice(&bytes).ok());
        let index = match index {
            Some(index) => index,
            None => match self.get_manifest(&r.with_tag(&fallback_tag(subject))).await {
                Ok(m) => {
                    serde_json::from_slice(&m.bytes).map_err(|source| Error::MalformedManifest {
                        digest: m.digest.clone(),
                        source,
                    })?
                }
                Err(Error::NotFound { .. }) => return Ok(Vec::new()),
                Err(e) => return Err(e),
            },
        };
        Ok(index
            .manifests
            .into_iter()
            .filter(|d| d.artifact_type.as_deref() == Some(artifact_type))
            .collect())
    }

    /// Add a referrer to the fallback tag index of `subject` (for registries without the
    /// referrers API).
    pub async fn add_referrer_fallback(
        &self,
        r: &Reference,
        subject: &Digest,
        referrer: Descriptor,
    ) -> Result<()> {
        let tag = fallback_tag(subject);
        let mut index = match self.get_manifest(&r.with_tag(&tag)).await {
            Ok(m) => serde_json::from_slice::<Index>(&m.bytes).map_err(|source| {
                Error::MalformedManifest {
                    digest: m.digest,
                    source,
                }
            })?,
            Err(Error::NotFound { .. }) => Index {
                schema_version: 2,
                media_type: Some(media::OCI_INDEX.into()),
                artifact_type: None,
                manifests: Vec::new(),
                subject: None,
                annotations: None,
            },
            Err(e) => return Err(e),
        };
        if index.manifests.iter().any(|d| d.digest == referrer.digest) {
            return Ok(());
        }
        index.manifests.push(referrer);
        self.push_manifest(
            r,
            &tag,
            Bytes::from(crate::manifest::to_go_json(&index)),
            media::OCI_INDEX,
        )
        .await?;
        Ok(())
    }
}

/// The distribution spec's referrers fallback tag for a subject digest.
pub fn fallback_tag(subject: &Digest) -> String {
    format!("sha256-{}", subject.hex())
}

/// A resumable, verified blob download. Call [`BlobStream::next`] until `None`.
#[derive(Debug)]
pub struct BlobStream {
    client: Client,
    reference: Reference,
    digest: Digest,
    /// The size the descriptor declares: the stream ends there, and errors if the blob does not.
    size: u64,
    received: u64,
    hasher: Option<Hasher>,
    response: Option<Response>,
    /// Bytes to discard from a response that ignored our Range on resume.
    skip: u64,
    retries: Retries,
    /// The stream's deadline ([`Deadline::for_bytes`] of `size`), counted over the time spent
    /// in `next`: time the caller takes with the chunks is not the registry's.
    budget: Duration,
    spent: Duration,
    done: bool,
    /// The hosts to read from (mirrors, then the registry), resolved on the first read.
    hosts: Option<Vec<Arc<Endpoint>>>,
    /// The host being read from.
    at: usize,
    /// Hosts that sent bytes of this stream: distrusted if the digest does not match.
    served_by: Vec<Arc<Endpoint>>,
}

impl BlobStream {
    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// The next chunk; `None` after the last one (size and digest verified).
    pub async fn next(&mut self) -> Option<Result<Bytes>> {
        if self.done {
            return None;
        }
        let started = Instant::now();
        let left = self.budget.saturating_sub(self.spent);
        let item = match tokio::time::timeout(left, self.next_inner()).await {
            Ok(item) => item,
            Err(_) => Some(Err(Error::DeadlineExceeded {
                what: "blob",
                url: self
                    .client
                    .url(&Client::blob_req(&self.reference, &self.digest)),
                after: self.budget,
            })),
        };
        self.spent += started.elapsed();
        if matches!(item, Some(Err(_)) | None) {
            self.done = true;
            // Closes the connection of a stream that ended in an error.
            self.response = None;
        }
        item
    }

    /// The host being read from, resolving the list on first use.
    fn host(&mut self) -> Option<Arc<Endpoint>> {
        let hosts = self
            .hosts
            .get_or_insert_with(|| self.client.blob_endpoints(&self.reference, &self.digest));
        hosts.get(self.at).cloned()
    }

    /// The current host failed: hand over to the next one with a fresh retry budget, or give
    /// `error` back when it was the last.
    fn next_host(&mut self, error: Error) -> Result<()> {
        if let Some(ep) = self.host() {
            ep.counters.failures.fetch_add(1, Ordering::Relaxed);
            let more = self.hosts.as_ref().is_some_and(|h| self.at + 1 < h.len());
            if more {
                warn!(host = %ep.name, digest = %self.digest, error = %error,
                    "blob host failed; trying the next host");
                self.at += 1;
                self.retries = Retries::default();
                return Ok(());
            }
        }
        Err(error)
    }

    async fn next_inner(&mut self) -> Option<Result<Bytes>> {
        loop {
            if self.response.is_none() {
                let Some(ep) = self.host() else {
                    return Some(Err(self.client.no_pull_host(&self.reference)));
                };
                let mut req = Client::blob_req(&self.reference, &self.digest).via(&ep);
                if self.received > 0 {
                    req = req.header(RANGE, format!("bytes={}-", self.received));
                }
                let resp = match self.client.send_counted(&req, &mut self.retries).await {
                    Ok(resp) => resp,
                    Err(e) => match self.next_host(e) {
                        Ok(()) => continue,
                        Err(e) => return Some(Err(e)),
                    },
                };
                match resp.status() {
                    StatusCode::OK => self.skip = self.received,
                    StatusCode::PARTIAL_CONTENT if self.received > 0 => self.skip = 0,
                    status => {
                        let error = if status == StatusCode::NOT_FOUND {
                            Client::not_found_blob(&self.reference, &self.digest)
                        } else {
                            self.client.status_error(&req, resp).await
                        };
                        match self.next_host(error) {
                            Ok(()) => continue,
                            Err(e) => return Some(Err(e)),
                        }
                    }
                }
                if !self.served_by.iter().any(|s| Arc::ptr_eq(s, &ep)) {
                    self.served_by.push(ep);
                }
                self.response = Some(resp);
            }
            let chunk = match self.response.as_mut()?.chunk().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => {
                    self.response = None;
                    if self.received >= self.size {
                        return self.finish();
                    }
                    if let Err(e) = self.resume("connection closed early".into()).await {
                        return Some(Err(e));
                    }
                    continue;
                }
                Err(e) => {
                    self.response = None;
                    if let Err(e) = self.resume(e.to_string()).await {
                        return Some(Err(e));
                    }
                    continue;
                }
            };
            let chunk = if self.skip > 0 {
                let n = (self.skip as usize).min(chunk.len());
                self.skip -= n as u64;
                chunk.slice(n..)
            } else {
                chunk
            };
            if chunk.is_empty() {
                continue;
            }
            if self.received.saturating_add(chunk.len() as u64) > self.size {
                return Some(Err(Error::BlobTooLong {
                    registry: self.reference.registry.clone(),
                    expected: self.digest.clone(),
                    size: self.size,
                }));
            }
            self.received += chunk.len() as u64;
            if let Some(ep) = self.served_by.last() {
                ep.counters
                    .bytes
                    .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
            if let Some(h) = &mut self.hasher {
                h.update(&chunk);
            }
            return Some(Ok(chunk));
        }
    }

    /// A dropped response: spend one attempt of the host's budget, then resume there, or at
    /// the next host once the budget is spent.
    async fn resume(&mut self, failure: String) -> Result<()> {
        let failure = format!(
            "blob {} broke off after {} bytes: {failure}",
            self.digest, self.received
        );
        let Some(ep) = self.host() else {
            return Err(self.client.no_pull_host(&self.reference));
        };
        let req = Client::blob_req(&self.reference, &self.digest).via(&ep);
        let policy = self.client.policy(&req);
        match self.retries.failed(&policy, &ep.name, failure, None).await {
            Ok(()) => Ok(()),
            Err(e) => self.next_host(e),
        }
    }

    fn finish(&mut self) -> Option<Result<Bytes>> {
        let actual = self.hasher.take()?.finish();
        if actual != self.digest {
            // A mirror that sent part of it may be the one at fault: ask the others next time.
            for ep in self.served_by.iter().filter(|ep| ep.mirror) {
                ep.counters.failures.fetch_add(1, Ordering::Relaxed);
                self.client.distrust(ep, &self.digest);
            }
            return Some(Err(Error::DigestMismatch {
                registry: self.reference.registry.clone(),
                expected: self.digest.clone(),
                actual,
            }));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_honours_retry_after() {
        let p = RetryPolicy::default();
        assert_eq!(p.delay(1, None), Some(Duration::from_millis(200)));
        assert_eq!(p.delay(3, None), Some(Duration::from_millis(800)));
        assert_eq!(p.delay(30, None), Some(Duration::from_secs(5)));
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(2))),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(3600))),
            None,
            "a long Retry-After gives up"
        );
    }

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(
            encode_query("repository:a/b:pull,push"),
            "repository%3Aa%2Fb%3Apull%2Cpush"
        );
    }
}
