//! The mutating admission webhook's HTTPS server: `POST /mutate` with an `AdmissionReview` v1,
//! `GET /healthz`. For pods that a HermesPolicy's `memoryModules` selects it answers with the
//! injection patch ([`crate::webhook`]); anything else, and any internal failure, is allowed
//! unchanged (the webhook fails open). Policies are re-read from their directory on every review,
//! so a changed ConfigMap applies without a restart.
//!
//! A deliberately small HTTP/1.1 server on std threads and rustls: one request per connection,
//! bounded header and body sizes, and at most [`WebhookConfig::max_connections`] connections.
//! Clients that send nothing cannot starve reviews: a connection has
//! [`WebhookConfig::header_timeout`] for its TLS handshake and request head (and as long again
//! for the body), measured from its start rather than per read, so dripping bytes does not keep
//! it open; and when every slot is taken, a new connection closes the oldest one whose request
//! has not fully arrived yet. The API server's connection, which sends its review right away,
//! gets a slot even while idle clients hold all of them (with `failurePolicy: Ignore` a starved
//! webhook would let pods start without their modules).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;
use tracing::{debug, info, warn};

use crate::error::{Error, Result};
use crate::webhook::selector::{ModulesPolicy, load_policies, select};
use crate::webhook::{InjectConfig, SidecarMode, allow, review};

const MAX_HEADER: usize = 16 << 10;
const MAX_BODY: usize = 8 << 20;
/// Default of [`WebhookConfig::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;
/// Default of [`WebhookConfig::header_timeout`]: the API server sends its review at once and
/// waits 10 s at most for the answer (the webhook's default `timeoutSeconds`).
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for the client to take each part of the answer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the webhook serves.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Address to listen on (`0.0.0.0:8443`; port 0 picks one).
    pub listen: String,
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// Directory of HermesPolicy YAML.
    pub policies: PathBuf,
    /// The Hermes image for injected containers.
    pub image: String,
    /// The supervisor's metrics port.
    pub metrics_port: u16,
    /// How the supervisor is injected ([`detect_sidecar_mode`] for the cluster's own).
    pub sidecar: SidecarMode,
    /// Time a connection has from being accepted to the end of its request head, TLS
    /// handshake included; the body must then arrive within the same time again.
    pub header_timeout: Duration,
    /// Connections served at once. Beyond it a new connection closes the oldest one still
    /// waiting for its request, or is refused if every one is being answered.
    pub max_connections: usize,
}

/// A running webhook; stops on drop.
#[derive(Debug)]
pub struct WebhookServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl WebhookServer {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Block until the server stops (it runs until the process ends).
    pub fn wait(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for WebhookServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr); // wake the accept loop
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn tls_config(cfg: &WebhookConfig) -> Result<Arc<rustls::ServerConfig>> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tls_err = |what, path: &PathBuf| {
        let path = path.clone();
        move |e: Box<dyn std::error::Error + Send + Sync>| Error::Tls {
            what,
            path,
            source: e,
        }
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cfg.cert)
        .map_err(|e| tls_err("certificate", &cfg.cert)(Box::new(e)))?
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| tls_err("certificate", &cfg.cert)(Box::new(e)))?;
    if certs.is_empty() {
        return Err(tls_err("certificate", &cfg.cert)(
            "no CERTIFICATE block in the file".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&cfg.key)
        .map_err(|e| tls_err("key", &cfg.key)(Box::new(e)))?;
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| tls_err("key", &cfg.key)(Box::new(e)))?;
    Ok(Arc::new(config))
}

/// Start serving on a background thread.
pub fn start(cfg: WebhookConfig) -> Result<WebhookServer> {
    let tls = tls_config(&cfg)?;
    let listener = TcpListener::bind(&cfg.listen).map_err(|source| Error::WebhookBind {
        addr: cfg.listen.clone(),
        source,
    })?;
    let addr = listener.local_addr().map_err(|source| Error::WebhookBind {
        addr: cfg.listen.clone(),
        source,
    })?;
    let stop = Arc::new(AtomicBool::new(false));
    let slots = Arc::new(Slots::new(cfg.max_connections));
    let cfg = Arc::new(cfg);
    let stop2 = stop.clone();
    let thread = std::thread::Builder::new()
        .name("hermes-webhook".into())
        .spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let Ok(handle_to_close) = conn.try_clone() else {
                    warn!("cannot keep track of a webhook connection; connection refused");
                    continue;
                };
                // Dropped when refused: the API server retries or fails open (failurePolicy).
                let Some(slot) = slots.take(handle_to_close) else {
                    warn!("every webhook connection is busy answering; connection refused");
                    continue;
                };
                let (tls, cfg, slots) = (tls.clone(), cfg.clone(), slots.clone());
                let spawned = std::thread::Builder::new()
                    .name("hermes-webhook-conn".into())
                    .spawn(move || {
                        if let Err(e) = handle(conn, tls, &cfg, || slots.mark_busy(slot)) {
                            debug!("webhook connection: {e}");
                        }
                        slots.release(slot);
                    });
                if spawned.is_err() {
                    warn!("cannot start a webhook connection thread");
                }
            }
        })
        .map_err(|source| Error::WebhookBind {
            addr: addr.to_string(),
            source,
        })?;
    info!(%addr, "admission webhook listening");
    Ok(WebhookServer {
        addr,
        stop,
        thread: Some(thread),
    })
}

/// The connections being served, oldest first, and whether each still waits for its request.
#[derive(Debug)]
struct Slots {
    max: usize,
    inner: Mutex<SlotTable>,
}

#[derive(Debug, Default)]
struct SlotTable {
    next: u64,
    /// Slot number (in order of acceptance) → the connection, to close it when shed.
    open: BTreeMap<u64, Slot>,
}

#[derive(Debug)]
struct Slot {
    conn: TcpStream,
    waiting: bool,
}

impl Slots {
    fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            inner: Mutex::new(SlotTable::default()),
        }
    }

    /// A slot for the connection `conn` is a handle of; when all are taken, the oldest
    /// connection still waiting for its request is closed to make room. `None` when every
    /// connection is being answered.
    fn take(&self, conn: TcpStream) -> Option<u64> {
        let mut table = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if table.open.len() >= self.max {
            let oldest_waiting = table
                .open
                .iter()
                .find(|(_, slot)| slot.waiting)
                .map(|(id, _)| *id)?;
            if let Some(shed) = table.open.remove(&oldest_waiting) {
                // Its thread's read fails now and the thread ends.
                let _ = shed.conn.shutdown(Shutdown::Both);
                debug!(
                    "webhook connections full: closed the oldest one still waiting for its request"
                );
            }
        }
        let id = table.next;
        table.next += 1;
        table.open.insert(
            id,
            Slot {
                conn,
                waiting: true,
            },
        );
        Some(id)
    }

    /// The connection's request has arrived: it is no longer shed for newcomers.
    fn mark_busy(&self, id: u64) {
        let mut table = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = table.open.get_mut(&id) {
            slot.waiting = false;
        }
    }

    fn release(&self, id: u64) {
        let mut table = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        table.open.remove(&id);
    }
}

/// A socket whose reads must all be done by a deadline: a per-read timeout would let a client
/// that drips a byte now and then hold its connection for ever.
#[derive(Debug)]
struct DeadlineSocket {
    tcp: TcpStream,
    deadline: Instant,
}

impl Read for DeadlineSocket {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the request did not arrive in time",
            ));
        }
        self.tcp.set_read_timeout(Some(left))?;
        self.tcp.read(buf)
    }
}

impl Write for DeadlineSocket {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.tcp.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.tcp.flush()
    }
}

fn handle(
    conn: TcpStream,
    tls: Arc<rustls::ServerConfig>,
    cfg: &WebhookConfig,
    request_arrived: impl FnOnce(),
) -> std::io::Result<()> {
    conn.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let socket = DeadlineSocket {
        tcp: conn,
        deadline: Instant::now() + cfg.header_timeout,
    };
    let session = rustls::ServerConnection::new(tls).map_err(std::io::Error::other)?;
    let mut stream = BufReader::new(rustls::StreamOwned::new(session, socket));
    let (method, path, length) = read_head(&mut stream)?;
    let mutate_request = method == "POST" && (path == "/mutate" || path.starts_with("/mutate?"));
    let body = if mutate_request && length <= MAX_BODY {
        stream.get_mut().sock.deadline = Instant::now() + cfg.header_timeout;
        // Grown as bytes arrive, not allocated from the length the client claims.
        let mut body = Vec::new();
        (&mut stream).take(length as u64).read_to_end(&mut body)?;
        if body.len() < length {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Some(body)
    } else {
        None
    };
    request_arrived();
    let (status, body) = match (method.as_str(), body) {
        ("GET", _) if path == "/healthz" => (200, b"ok\n".to_vec()),
        (_, Some(body)) => match serde_json::from_slice::<Value>(&body) {
            Ok(request) => (
                200,
                serde_json::to_vec(&mutate(&request, cfg)).unwrap_or_default(),
            ),
            Err(e) => (400, format!("not an AdmissionReview: {e}\n").into_bytes()),
        },
        _ if mutate_request => (413, b"request body too large\n".to_vec()),
        _ => (404, b"not found\n".to_vec()),
    };
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        413 => "Payload Too Large",
        _ => "Not Found",
    };
    let content_type = if status == 200 && path.starts_with("/mutate") {
        "application/json"
    } else {
        "text/plain"
    };
    let mut out = stream.into_inner();
    write!(
        out,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    out.write_all(&body)?;
    out.flush()?;
    out.conn.send_close_notify();
    let _ = out.flush();
    Ok(())
}

/// Request line and `Content-Length`; header size bounded.
fn read_head(r: &mut impl BufRead) -> std::io::Result<(String, String, usize)> {
    let mut line = String::new();
    let mut total = 0;
    let mut request_line = String::new();
    let mut length = 0usize;
    loop {
        line.clear();
        // A line without an end must not grow past the limit either.
        let n = r
            .by_ref()
            .take((MAX_HEADER + 1 - total) as u64)
            .read_line(&mut line)?;
        total += n;
        if n == 0 || total > MAX_HEADER {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "bad or oversized request head",
            ));
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if request_line.is_empty() {
            request_line = l.to_owned();
        } else if let Some((k, v)) = l.split_once(':')
            && k.trim().eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse().map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, "bad Content-Length")
            })?;
        }
    }
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_owned();
    let path = parts.next().unwrap_or_default().to_owned();
    Ok((method, path, length))
}

/// Decide one review: inject for a pod a policy selects, allow anything else unchanged.
pub fn mutate(request: &Value, cfg: &WebhookConfig) -> Value {
    if request["request"]["kind"]["kind"] != "Pod" {
        return allow(request);
    }
    let policies = match load_policies(&cfg.policies) {
        Ok(p) => p,
        Err(e) => {
            warn!("policies unreadable, allowing the pod unchanged: {e}");
            return allow(request);
        }
    };
    let inject = InjectConfig {
        image: cfg.image.clone(),
        loader_config_map: String::new(),
        metrics_port: cfg.metrics_port,
        sidecar: cfg.sidecar,
    };
    mutate_with_policies(request, &policies, &inject)
}

/// [`mutate`] with the policies already read: the whole decision for one `AdmissionReview`
/// request, with no I/O, so it can be tested and fuzzed on hostile reviews. `inject` says what
/// to inject; its loader ConfigMap is replaced by the selecting policy's.
pub fn mutate_with_policies(
    request: &Value,
    policies: &[ModulesPolicy],
    inject: &InjectConfig,
) -> Value {
    let req = &request["request"];
    if req["kind"]["kind"] != "Pod" {
        return allow(request);
    }
    let namespace = req["namespace"]
        .as_str()
        .or_else(|| req["object"]["metadata"]["namespace"].as_str())
        .unwrap_or("default");
    match select(policies, namespace, &req["object"]) {
        None => allow(request),
        Some(policy) => {
            info!(policy = %policy.name, namespace, "injecting memory modules");
            review(
                request,
                &InjectConfig {
                    loader_config_map: policy.modules.loader_config_map.clone(),
                    ..inject.clone()
                },
            )
        }
    }
}

/// The sidecar mode for the cluster the webhook runs in: the API server's `/version`, asked once
/// through the in-cluster configuration (or `KUBECONFIG`). Every authenticated identity may read
/// `/version` (the default `system:public-info-viewer` role), so no RBAC rule is needed.
pub async fn detect_sidecar_mode() -> Result<SidecarMode> {
    let client = kube::Client::try_default()
        .await
        .map_err(Error::kube("connect to the API server to read its version"))?;
    let info = client
        .apiserver_version()
        .await
        .map_err(Error::kube("GET /version"))?;
    let mode = SidecarMode::for_server_version(&info.major, &info.minor).ok_or_else(|| {
        Error::ServerVersion {
            major: info.major.clone(),
            minor: info.minor.clone(),
        }
    })?;
    info!(version = %info.git_version, ?mode, "sidecar mode chosen from the API server's version");
    Ok(mode)
}
