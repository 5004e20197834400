//! An HTTP/1.1 reverse proxy for reliability tests: it forwards every request to an upstream
//! (normally a [`Registry`](crate::Registry)), streaming bodies both ways, and applies queued
//! [`FaultRule`]s, seeded [`RandomFaults`] (for soak runs), a bandwidth cap and, optionally, a
//! bearer-token auth front (token endpoint, `WWW-Authenticate` challenges) in front of an
//! anonymous upstream.
//!
//! It runs its own single-threaded tokio runtime on its own thread, so sync and async tests can use
//! it alike. It does not pool upstream connections (one per request) and does not speak TLS.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use sha2::{Digest as _, Sha256};
use tokio::sync::{mpsc, oneshot};

use crate::{Error, Result};

/// The `service` named in bearer challenges and expected on the token endpoint.
const SERVICE: &str = "hermes-testkit";
/// After a cut-off body's last bytes are handed over, how long to let them reach the socket before
/// the connection is closed.
const FLUSH_GRACE: Duration = Duration::from_millis(100);

/// What to do to a matching request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Forward, send the response head and the first N body bytes, then close the connection.
    DropAfter(u64),
    /// Close the connection with a TCP RST, without sending any response.
    Reset,
    /// Wait this long, then handle the request normally.
    Stall(Duration),
    /// Answer with this status and an empty body, without forwarding.
    Status(u16),
    /// Answer 429 with `Retry-After: retry_after_secs`, without forwarding.
    TooManyRequests {
        /// The `Retry-After` value in seconds.
        retry_after_secs: u64,
    },
    /// Forward keeping the upstream `Content-Length`, but send only N body bytes, then close.
    Truncate(u64),
    /// Forward, flipping every bit of the body byte at this offset (no-op if the body is shorter).
    Corrupt {
        /// Offset in the response body.
        at: u64,
    },
    /// Forward without the `Range` header, like a registry that ignores ranges (answers 200 with the
    /// whole blob).
    IgnoreRange,
    /// Answer `307 Temporary Redirect` to the same path and query on the upstream itself, like a
    /// registry that sends blob reads to a storage backend.
    Redirect,
}

impl Fault {
    /// A short name of the fault's kind (`drop`, `reset`, `stall`, `status`, `429`, `truncate`,
    /// `corrupt`, `ignore_range`, `redirect`), for counts and reports.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::DropAfter(_) => "drop",
            Fault::Reset => "reset",
            Fault::Stall(_) => "stall",
            Fault::Status(_) => "status",
            Fault::TooManyRequests { .. } => "429",
            Fault::Truncate(_) => "truncate",
            Fault::Corrupt { .. } => "corrupt",
            Fault::IgnoreRange => "ignore_range",
            Fault::Redirect => "redirect",
        }
    }
}

/// A fault applied to the next `times` requests that match `method` (any if `None`) and whose path
/// contains `path_contains`. Rules are consulted in the order they were pushed; the first matching
/// rule with uses left wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultRule {
    /// HTTP method to match (case-insensitive), or any.
    pub method: Option<String>,
    /// Substring the request path must contain (`""` matches every path).
    pub path_contains: String,
    /// What to do.
    pub fault: Fault,
    /// How many matching requests get the fault.
    pub times: u32,
}

impl FaultRule {
    /// A rule for the next request of any method whose path contains `path_contains`.
    pub fn new(path_contains: impl Into<String>, fault: Fault) -> FaultRule {
        FaultRule {
            method: None,
            path_contains: path_contains.into(),
            fault,
            times: 1,
        }
    }

    /// Restricts the rule to one method.
    pub fn method(mut self, method: impl Into<String>) -> FaultRule {
        self.method = Some(method.into());
        self
    }

    /// Applies the rule to the next `times` matching requests instead of one.
    pub fn times(mut self, times: u32) -> FaultRule {
        self.times = times;
        self
    }

    fn matches(&self, method: &str, path: &str) -> bool {
        self.times > 0
            && self
                .method
                .as_deref()
                .is_none_or(|m| m.eq_ignore_ascii_case(method))
            && path.contains(&self.path_contains)
    }
}

/// Faults at random, for soak runs: each request that matches `method` and `path_contains` gets,
/// with probability `rate`, one fault drawn from a generator seeded with `seed`: a drop or a
/// truncation after a random number of body bytes, a reset, a stall of up to `max_stall`, a 500,
/// 502 or 503, a 429 with `Retry-After: 1`, or one corrupted byte. Offsets are drawn within the
/// requested range's length (1 KiB without a `Range` header, which covers manifests). Queued
/// [`FaultRule`]s come first. The same seed draws the same sequence of faults; which request gets
/// which depends on the order concurrent requests arrive in.
#[derive(Debug, Clone, PartialEq)]
pub struct RandomFaults {
    /// Seed of the generator.
    pub seed: u64,
    /// Probability, 0 to 1, that a matching request gets a fault.
    pub rate: f64,
    /// HTTP method to match (case-insensitive), or any.
    pub method: Option<String>,
    /// Substring the request path must contain (`""` matches every path).
    pub path_contains: String,
    /// Longest stall.
    pub max_stall: Duration,
}

impl RandomFaults {
    /// Faults on `rate` of all requests, stalls of up to 2 s.
    pub fn new(seed: u64, rate: f64) -> RandomFaults {
        RandomFaults {
            seed,
            rate,
            method: None,
            path_contains: String::new(),
            max_stall: Duration::from_secs(2),
        }
    }

    /// Only requests whose path contains `path_contains`.
    pub fn path_contains(mut self, path_contains: impl Into<String>) -> RandomFaults {
        self.path_contains = path_contains.into();
        self
    }

    /// Only requests with this method.
    pub fn method(mut self, method: impl Into<String>) -> RandomFaults {
        self.method = Some(method.into());
        self
    }

    /// Stalls last up to `max_stall`.
    pub fn max_stall(mut self, max_stall: Duration) -> RandomFaults {
        self.max_stall = max_stall;
        self
    }

    fn matches(&self, method: &str, path: &str) -> bool {
        self.method
            .as_deref()
            .is_none_or(|m| m.eq_ignore_ascii_case(method))
            && path.contains(&self.path_contains)
    }
}

/// [`RandomFaults`] with their generator.
#[derive(Debug)]
struct RandomState {
    config: RandomFaults,
    rng: fastrand::Rng,
}

impl RandomState {
    fn new(config: RandomFaults) -> RandomState {
        let rng = fastrand::Rng::with_seed(config.seed);
        RandomState { config, rng }
    }

    /// The fault for a request, if it gets one; `body_len` is the expected body length.
    fn draw(&mut self, method: &str, path: &str, body_len: u64) -> Option<Fault> {
        if !self.config.matches(method, path) || self.rng.f64() >= self.config.rate {
            return None;
        }
        let rng = &mut self.rng;
        let len = body_len.max(1);
        Some(match rng.u8(0..7) {
            0 => Fault::DropAfter(rng.u64(0..len)),
            1 => Fault::Reset,
            2 => {
                let max = u64::try_from(self.config.max_stall.as_millis()).unwrap_or(u64::MAX);
                Fault::Stall(Duration::from_millis(rng.u64(0..=max)))
            }
            3 => Fault::Status([500, 502, 503][rng.usize(0..3)]),
            4 => Fault::TooManyRequests {
                retry_after_secs: 1,
            },
            5 => Fault::Truncate(rng.u64(0..len)),
            _ => Fault::Corrupt {
                at: rng.u64(0..len),
            },
        })
    }
}

/// The length of a `bytes=A-B` range, or 1 KiB (a manifest's size) without one.
fn expected_body_len(range: Option<&str>) -> u64 {
    range
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split_once('-'))
        .and_then(|(a, b)| Some(b.parse::<u64>().ok()?.checked_sub(a.parse().ok()?)? + 1))
        .unwrap_or(1024)
}

/// One request the proxy saw, with the status it answered (0 when it answered nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedRequest {
    /// HTTP method.
    pub method: String,
    /// Request path, without the query.
    pub path: String,
    /// The `Range` header, if any.
    pub range: Option<String>,
    /// Status sent to the client; 0 for [`Fault::Reset`].
    pub status: u16,
    /// The fault injected, if any.
    pub fault: Option<Fault>,
}

/// A running fault-injecting proxy. Stops its thread (closing all connections) on `Drop`.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct Shared {
    upstream: SocketAddr,
    host: String,
    auth: Option<BearerAuth>,
    state: Mutex<State>,
    tokens_issued: AtomicU64,
    /// Body bytes of `GET …/blobs/…` answers handed to clients.
    blob_bytes: AtomicU64,
}

#[derive(Debug)]
struct BearerAuth {
    user: String,
    password: String,
    ttl: Duration,
}

#[derive(Debug, Default)]
struct State {
    rules: VecDeque<FaultRule>,
    random: Option<RandomState>,
    log: Vec<LoggedRequest>,
    bucket: Option<TokenBucket>,
    /// Issued bearer tokens and when each expires.
    tokens: HashMap<String, Instant>,
}

impl FaultProxy {
    /// Starts a proxy on a free loopback port that forwards to `upstream`.
    pub fn start(upstream: SocketAddr) -> Result<FaultProxy> {
        Self::start_inner(upstream, None)
    }

    /// Starts a proxy that plays a bearer-token registry in front of an anonymous `upstream`:
    /// `/v2/…` requests need `Authorization: Bearer TOKEN` with an unexpired token from
    /// `GET /token` (HTTP Basic `user`:`password`), otherwise they get a 401 challenge. Authorized
    /// requests are forwarded without the `Authorization` header. Tokens live `token_ttl`.
    pub fn start_with_bearer_auth(
        upstream: SocketAddr,
        user: &str,
        password: &str,
        token_ttl: Duration,
    ) -> Result<FaultProxy> {
        let auth = BearerAuth {
            user: user.to_owned(),
            password: password.to_owned(),
            ttl: token_ttl,
        };
        Self::start_inner(upstream, Some(auth))
    }

    fn start_inner(upstream: SocketAddr, auth: Option<BearerAuth>) -> Result<FaultProxy> {
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .map_err(Error::os("bind the proxy's loopback port"))?;
        let addr = listener
            .local_addr()
            .map_err(Error::os("read the proxy's port"))?;
        listener
            .set_nonblocking(true)
            .map_err(Error::os("make the proxy's listener non-blocking"))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(Error::os("build the proxy's tokio runtime"))?;
        let shared = Arc::new(Shared {
            upstream,
            host: addr.to_string(),
            auth,
            state: Mutex::default(),
            tokens_issued: AtomicU64::new(0),
            blob_bytes: AtomicU64::new(0),
        });
        let (shutdown, stop) = oneshot::channel();
        let serving = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("testkit-proxy-{}", addr.port()))
            .spawn(move || runtime.block_on(serve(listener, serving, stop)))
            .map_err(Error::os("spawn the proxy thread"))?;
        Ok(FaultProxy {
            addr,
            shared,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// `127.0.0.1:PORT`, to use as the registry host in image references.
    pub fn host(&self) -> String {
        self.shared.host.clone()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The proxy's socket address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Queues a fault rule (FIFO among matching rules).
    pub fn push(&self, rule: FaultRule) {
        if rule.times > 0 {
            self.shared.state().rules.push_back(rule);
        }
    }

    /// Drops all queued fault rules.
    pub fn clear_faults(&self) {
        self.shared.state().rules.clear();
    }

    /// Injects faults at random from now on (`None`: stops). Setting them again restarts the
    /// generator from the seed.
    pub fn set_random_faults(&self, faults: Option<RandomFaults>) {
        self.shared.state().random = faults.map(RandomState::new);
    }

    /// Caps response body bytes per second over all connections together (`None`: no cap).
    pub fn set_bandwidth(&self, bytes_per_sec: Option<u64>) {
        self.shared.state().bucket = bytes_per_sec.map(TokenBucket::new);
    }

    /// The requests seen so far, in the order their responses were decided.
    pub fn log(&self) -> Vec<LoggedRequest> {
        self.shared.state().log.clone()
    }

    /// The requests seen so far, forgetting them (none is lost between reading and clearing).
    pub fn take_log(&self) -> Vec<LoggedRequest> {
        std::mem::take(&mut self.shared.state().log)
    }

    /// Forgets the logged requests.
    pub fn clear_log(&self) {
        self.shared.state().log.clear();
    }

    /// How many bearer tokens the token endpoint has issued.
    pub fn tokens_issued(&self) -> u64 {
        self.shared.tokens_issued.load(Ordering::SeqCst)
    }

    /// Body bytes of blob reads (`GET …/blobs/…`) sent to clients so far: what the upstream
    /// registry served through this proxy.
    pub fn blob_bytes_sent(&self) -> u64 {
        self.shared.blob_bytes.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn take_fault(&self, method: &str, path: &str, range: Option<&str>) -> Option<Fault> {
        let mut state = self.state();
        let Some(index) = state
            .rules
            .iter()
            .position(|rule| rule.matches(method, path))
        else {
            let body_len = expected_body_len(range);
            return state.random.as_mut()?.draw(method, path, body_len);
        };
        let rule = &mut state.rules[index];
        rule.times -= 1;
        let fault = rule.fault.clone();
        if rule.times == 0 {
            state.rules.remove(index);
        }
        Some(fault)
    }
}

/// Accepts connections until told to stop; dropping the runtime afterwards ends every connection.
async fn serve(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    mut stop: oneshot::Receiver<()>,
) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        return;
    };
    loop {
        tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let Ok((stream, resetter)) = split_for_reset(stream) else { continue };
                let shared = Arc::clone(&shared);
                tokio::spawn(async move {
                    let resetter = Arc::new(resetter);
                    let service = hyper::service::service_fn(move |request| {
                        handle(request, Arc::clone(&shared), Arc::clone(&resetter))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        }
    }
}

/// Returns the stream plus a second handle on the same socket, with which a [`Fault::Reset`] sets
/// `SO_LINGER` to zero so that closing the connection sends a TCP RST instead of a FIN. The handle
/// lives as long as the connection's service, so the socket is closed after hyper lets go of it.
fn split_for_reset(
    stream: tokio::net::TcpStream,
) -> std::io::Result<(tokio::net::TcpStream, tokio::net::TcpStream)> {
    let stream = stream.into_std()?;
    let handle = stream.try_clone()?;
    Ok((
        tokio::net::TcpStream::from_std(stream)?,
        tokio::net::TcpStream::from_std(handle)?,
    ))
}

type ProxyBody = BoxBody<Bytes, std::io::Error>;

/// Handles one request. An `Err` makes hyper close the connection without a response.
async fn handle(
    request: Request<Incoming>,
    shared: Arc<Shared>,
    resetter: Arc<tokio::net::TcpStream>,
) -> Result<Response<ProxyBody>, std::io::Error> {
    let method = request.method().as_str().to_owned();
    let path = request.uri().path().to_owned();
    let range = request
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let fault = shared.take_fault(&method, &path, range.as_deref());
    let log = |status: u16| {
        let entry = LoggedRequest {
            method: method.clone(),
            path: path.clone(),
            range: range.clone(),
            status,
            fault: fault.clone(),
        };
        shared.state().log.push(entry);
    };

    match fault {
        Some(Fault::Reset) => {
            log(0);
            let _ = resetter.set_zero_linger();
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "injected reset",
            ));
        }
        Some(Fault::Status(code)) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            log(status.as_u16());
            return Ok(simple(status, HeaderMap::new(), Bytes::new()));
        }
        Some(Fault::TooManyRequests { retry_after_secs }) => {
            log(429);
            let mut headers = HeaderMap::new();
            headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
            return Ok(simple(StatusCode::TOO_MANY_REQUESTS, headers, Bytes::new()));
        }
        Some(Fault::Redirect) => {
            log(307);
            let target = request
                .uri()
                .path_and_query()
                .map_or(path.as_str(), |pq| pq.as_str());
            let mut headers = HeaderMap::new();
            if let Ok(location) =
                HeaderValue::from_str(&format!("http://{}{target}", shared.upstream))
            {
                headers.insert(header::LOCATION, location);
            }
            return Ok(simple(
                StatusCode::TEMPORARY_REDIRECT,
                headers,
                Bytes::new(),
            ));
        }
        Some(Fault::Stall(delay)) => tokio::time::sleep(delay).await,
        _ => {}
    }

    let mut request = request;
    if fault == Some(Fault::IgnoreRange) {
        request.headers_mut().remove(header::RANGE);
    }

    if let Some(auth) = &shared.auth {
        if path == "/token" {
            let response = token_response(&shared, auth, request.headers());
            log(response.status().as_u16());
            return Ok(response);
        }
        if path == "/v2" || path.starts_with("/v2/") {
            if !has_valid_token(&shared, request.headers()) {
                log(401);
                return Ok(challenge(&shared.host, &method, &path));
            }
            request.headers_mut().remove(header::AUTHORIZATION);
        }
    }

    let upstream = match forward(request, shared.upstream).await {
        Ok(response) => response,
        Err(error) => {
            log(502);
            let body = Bytes::from(format!(
                "hermes-testkit proxy: upstream {}: {error}\n",
                shared.upstream
            ));
            return Ok(simple(StatusCode::BAD_GATEWAY, HeaderMap::new(), body));
        }
    };
    log(upstream.status().as_u16());
    let (mut parts, body) = upstream.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let shaping = Shaping {
        cut_after: match fault {
            Some(Fault::DropAfter(n) | Fault::Truncate(n)) => Some(n),
            _ => None,
        },
        corrupt_at: match fault {
            Some(Fault::Corrupt { at }) => Some(at),
            _ => None,
        },
    };
    let blob = method == "GET" && path.contains("/blobs/");
    Ok(Response::from_parts(
        parts,
        shape_body(body, shaping, blob, shared),
    ))
}

/// Forwards a request on a fresh upstream connection.
async fn forward(
    request: Request<Incoming>,
    upstream: SocketAddr,
) -> Result<Response<Incoming>, Box<dyn std::error::Error + Send + Sync>> {
    let stream = tokio::net::TcpStream::connect(upstream).await?;
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let (mut parts, body) = request.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::EXPECT);
    Ok(sender
        .send_request(Request::from_parts(parts, body))
        .await?)
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::TE,
        header::TRAILER,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

fn simple(status: StatusCode, headers: HeaderMap, body: Bytes) -> Response<ProxyBody> {
    let mut response = Response::new(
        Full::new(body)
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// What to do to a forwarded response body.
#[derive(Debug, Clone, Copy)]
struct Shaping {
    /// Send only this many bytes, then close the connection.
    cut_after: Option<u64>,
    /// Flip the byte at this offset.
    corrupt_at: Option<u64>,
}

/// A response body fed by a pump task through a small channel (so the pump sees backpressure).
#[derive(Debug)]
struct ChannelBody {
    chunks: mpsc::Receiver<std::io::Result<Bytes>>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::io::Result<Frame<Bytes>>>> {
        self.chunks
            .poll_recv(cx)
            .map(|chunk| chunk.map(|chunk| chunk.map(Frame::data)))
    }
}

/// Streams `body` to the client through the fault shaping and the bandwidth cap.
fn shape_body(mut body: Incoming, shaping: Shaping, blob: bool, shared: Arc<Shared>) -> ProxyBody {
    let (tx, chunks) = mpsc::channel(4);
    tokio::spawn(async move {
        let mut offset = 0u64;
        while let Some(frame) = body.frame().await {
            let mut data = match frame.map(Frame::into_data) {
                Ok(Ok(data)) => data,
                Ok(Err(_trailers)) => continue,
                Err(error) => {
                    let _ = tx.send(Err(std::io::Error::other(error))).await;
                    return;
                }
            };
            let end = offset + data.len() as u64;
            if let Some(at) = shaping.corrupt_at.filter(|at| (offset..end).contains(at)) {
                let mut bytes = BytesMut::from(data);
                bytes[(at - offset) as usize] ^= 0xff;
                data = bytes.freeze();
            }
            let cut = shaping.cut_after.filter(|&limit| end > limit);
            if let Some(limit) = cut {
                data.truncate(limit.saturating_sub(offset) as usize);
            }
            offset = end;
            let sent = data.len() as u64;
            if !send_throttled(&tx, data, &shared).await {
                return;
            }
            if blob {
                shared.blob_bytes.fetch_add(sent, Ordering::SeqCst);
            }
            if cut.is_some() {
                // Let hyper flush what it has, then make it abort the connection.
                tokio::time::sleep(FLUSH_GRACE).await;
                let _ = tx
                    .send(Err(std::io::Error::other("injected connection drop")))
                    .await;
                return;
            }
        }
    });
    ChannelBody { chunks }.boxed()
}

/// Sends `data` in bucket-sized pieces, waiting for bandwidth tokens. False when the client is gone.
async fn send_throttled(
    tx: &mpsc::Sender<std::io::Result<Bytes>>,
    mut data: Bytes,
    shared: &Shared,
) -> bool {
    while !data.is_empty() {
        let piece = match shared.state().bucket.as_ref() {
            Some(bucket) => data.split_to(bucket.piece().min(data.len())),
            None => std::mem::take(&mut data),
        };
        acquire(shared, piece.len()).await;
        if tx.send(Ok(piece)).await.is_err() {
            return false;
        }
    }
    true
}

/// Waits until the shared bucket (if any) has `bytes` tokens and takes them.
async fn acquire(shared: &Shared, bytes: usize) {
    loop {
        let wait = match shared.state().bucket.as_mut() {
            None => return,
            Some(bucket) => match bucket.take(bytes as f64) {
                None => return,
                Some(wait) => wait,
            },
        };
        tokio::time::sleep(wait).await;
    }
}

/// Bandwidth cap: `rate` tokens (bytes) per second, burst of one piece.
#[derive(Debug)]
struct TokenBucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    refilled: Instant,
}

impl TokenBucket {
    fn new(bytes_per_sec: u64) -> TokenBucket {
        let rate = bytes_per_sec.max(1) as f64;
        let capacity = (rate / 20.0).clamp(1.0, 16384.0).floor();
        TokenBucket {
            rate,
            capacity,
            tokens: capacity,
            refilled: Instant::now(),
        }
    }

    /// Bytes to send at once: small enough that the cap is smooth at 50 ms granularity.
    fn piece(&self) -> usize {
        self.capacity as usize
    }

    /// Takes `n` tokens, or says how long to wait until there are enough.
    fn take(&mut self, n: f64) -> Option<Duration> {
        let now = Instant::now();
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity.max(n));
        self.refilled = now;
        if self.tokens >= n {
            self.tokens -= n;
            None
        } else {
            Some(Duration::from_secs_f64((n - self.tokens) / self.rate))
        }
    }
}

/// The repository named in a `/v2/NAME/(manifests|blobs|tags|referrers)/…` path.
fn repository(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v2/")?;
    ["/manifests/", "/blobs/", "/tags/", "/referrers/"]
        .iter()
        .filter_map(|marker| rest.find(marker))
        .min()
        .map(|end| &rest[..end])
}

fn challenge(host: &str, method: &str, path: &str) -> Response<ProxyBody> {
    let mut value = format!("Bearer realm=\"http://{host}/token\",service=\"{SERVICE}\"");
    if let Some(repo) = repository(path) {
        let actions = if method == "GET" || method == "HEAD" {
            "pull"
        } else {
            "pull,push"
        };
        value.push_str(&format!(",scope=\"repository:{repo}:{actions}\""));
    }
    let mut headers = HeaderMap::new();
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.insert(header::WWW_AUTHENTICATE, value);
    }
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let body =
        r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required","detail":null}]}"#;
    simple(
        StatusCode::UNAUTHORIZED,
        headers,
        Bytes::from_static(body.as_bytes()),
    )
}

fn has_valid_token(shared: &Shared, headers: &HeaderMap) -> bool {
    let Some(token) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    shared
        .state()
        .tokens
        .get(token.trim())
        .is_some_and(|expires| *expires > Instant::now())
}

fn token_response(shared: &Shared, auth: &BearerAuth, headers: &HeaderMap) -> Response<ProxyBody> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|v| {
            base64::engine::general_purpose::STANDARD
                .decode(v.trim())
                .ok()
        });
    let expected = format!("{}:{}", auth.user, auth.password);
    if presented.as_deref() != Some(expected.as_bytes()) {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"hermes-testkit\""),
        );
        let body = Bytes::from_static(
            br#"{"errors":[{"code":"UNAUTHORIZED","message":"invalid credentials"}]}"#,
        );
        return simple(StatusCode::UNAUTHORIZED, headers, body);
    }
    let serial = shared.tokens_issued.fetch_add(1, Ordering::SeqCst);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let token: String = Sha256::digest(format!("{}/{serial}/{nanos}", shared.host))
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    shared
        .state()
        .tokens
        .insert(token.clone(), Instant::now() + auth.ttl);
    let body = serde_json::json!({
        "token": token,
        "access_token": token,
        "expires_in": auth.ttl.as_secs_f64().ceil().max(1.0) as u64,
    });
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    simple(StatusCode::OK, headers, Bytes::from(body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_is_parsed_from_distribution_paths() {
        assert_eq!(
            repository("/v2/library/alpine/manifests/latest"),
            Some("library/alpine")
        );
        assert_eq!(repository("/v2/a/blobs/uploads/123"), Some("a"));
        assert_eq!(repository("/v2/a/b/tags/list"), Some("a/b"));
        assert_eq!(repository("/v2/"), None);
    }

    #[test]
    fn rules_match_method_and_path() {
        let rule = FaultRule::new("/blobs/", Fault::Reset).method("get");
        assert!(rule.matches("GET", "/v2/r/blobs/sha256:00"));
        assert!(!rule.matches("HEAD", "/v2/r/blobs/sha256:00"));
        assert!(!rule.matches("GET", "/v2/r/manifests/latest"));
        assert!(!rule.times(0).matches("GET", "/v2/r/blobs/sha256:00"));
    }

    fn draws(config: RandomFaults, n: usize, body_len: u64) -> Vec<Option<Fault>> {
        let mut state = RandomState::new(config);
        (0..n)
            .map(|_| state.draw("GET", "/v2/r/blobs/sha256:00", body_len))
            .collect()
    }

    #[test]
    fn random_faults_replay_from_their_seed() {
        let a = draws(RandomFaults::new(7, 0.5), 500, 4096);
        assert_eq!(a, draws(RandomFaults::new(7, 0.5), 500, 4096));
        assert_ne!(a, draws(RandomFaults::new(8, 0.5), 500, 4096));
    }

    #[test]
    fn random_faults_hit_at_their_rate_with_every_kind_within_bounds() {
        let max_stall = Duration::from_millis(300);
        let drawn = draws(RandomFaults::new(1, 0.3).max_stall(max_stall), 10_000, 4096);
        let faults: Vec<&Fault> = drawn.iter().flatten().collect();
        assert!(
            (2700..3300).contains(&faults.len()),
            "{} faults in 10000 requests at rate 0.3",
            faults.len()
        );
        let mut kinds: Vec<&str> = faults.iter().map(|f| f.kind()).collect();
        kinds.sort_unstable();
        kinds.dedup();
        assert_eq!(
            kinds,
            [
                "429", "corrupt", "drop", "reset", "stall", "status", "truncate"
            ]
        );
        for fault in faults {
            match fault {
                Fault::DropAfter(n) | Fault::Truncate(n) | Fault::Corrupt { at: n } => {
                    assert!(*n < 4096, "{fault:?} is past the body")
                }
                Fault::Stall(d) => assert!(*d <= max_stall, "{fault:?}"),
                Fault::Status(code) => assert!([500, 502, 503].contains(code), "{fault:?}"),
                _ => {}
            }
        }
    }

    #[test]
    fn random_faults_only_hit_matching_requests() {
        let mut state = RandomState::new(
            RandomFaults::new(3, 1.0)
                .path_contains("/blobs/")
                .method("GET"),
        );
        assert!(state.draw("GET", "/v2/r/blobs/sha256:00", 10).is_some());
        assert_eq!(state.draw("HEAD", "/v2/r/blobs/sha256:00", 10), None);
        assert_eq!(state.draw("GET", "/v2/r/manifests/v1", 10), None);
        let mut never = RandomState::new(RandomFaults::new(3, 0.0));
        assert!((0..1000).all(|_| never.draw("GET", "/", 10).is_none()));
    }

    #[test]
    fn expected_body_len_is_the_range_length_or_a_manifest_size() {
        assert_eq!(expected_body_len(Some("bytes=100-199")), 100);
        assert_eq!(expected_body_len(Some("bytes=5-5")), 1);
        assert_eq!(expected_body_len(Some("bytes=100-")), 1024);
        assert_eq!(expected_body_len(Some("bytes=9-1")), 1024);
        assert_eq!(expected_body_len(None), 1024);
    }

    #[test]
    fn token_bucket_makes_callers_wait_at_the_rate() {
        let mut bucket = TokenBucket::new(1000);
        assert_eq!(bucket.take(50.0), None, "a full bucket pays out its burst");
        let wait = bucket
            .take(50.0)
            .expect("an empty bucket makes the caller wait");
        assert!(
            wait > Duration::from_millis(30) && wait <= Duration::from_millis(50),
            "waited {wait:?}"
        );
    }
}
