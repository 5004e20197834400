//! The mutating admission webhook's HTTPS server: `POST /mutate` with an `AdmissionReview` v1,
//! `GET /healthz`. For pods that a HermesPolicy's `memoryModules` selects it answers with the
//! injection patch ([`crate::webhook`]); anything else, and any internal failure, is allowed
//! unchanged (the webhook fails open). Policies are re-read from their directory on every review,
//! so a changed ConfigMap applies without a restart.
//!
//! A deliberately small HTTP/1.1 server on std threads and rustls: one request per connection,
//! bounded header and body sizes, read timeouts.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::selector::{ModulesPolicy, load_policies, select};
use crate::webhook::{InjectConfig, allow, review};

const MAX_HEADER: usize = 16 << 10;
const MAX_BODY: usize = 8 << 20;
const MAX_CONNECTIONS: usize = 64;

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
    let active = Arc::new(AtomicUsize::new(0));
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
                if active.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
                    continue; // dropped: the API server retries or fails open (failurePolicy)
                }
                active.fetch_add(1, Ordering::SeqCst);
                let (tls, cfg, active) = (tls.clone(), cfg.clone(), active.clone());
                let spawned = std::thread::Builder::new()
                    .name("hermes-webhook-conn".into())
                    .spawn(move || {
                        if let Err(e) = handle(conn, tls, &cfg) {
                            warn!("webhook connection: {e}");
                        }
                        active.fetch_sub(1, Ordering::SeqCst);
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

fn handle(
    conn: TcpStream,
    tls: Arc<rustls::ServerConfig>,
    cfg: &WebhookConfig,
) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    conn.set_write_timeout(Some(Duration::from_secs(10)))?;
    let session = rustls::ServerConnection::new(tls).map_err(std::io::Error::other)?;
    let mut stream = BufReader::new(rustls::StreamOwned::new(session, conn));
    let (method, path, length) = read_head(&mut stream)?;
    let (status, body) = match (method.as_str(), path.as_str()) {
        ("GET", "/healthz") => (200, b"ok\n".to_vec()),
        ("POST", p) if p == "/mutate" || p.starts_with("/mutate?") => {
            if length > MAX_BODY {
                (413, b"request body too large\n".to_vec())
            } else {
                let mut body = vec![0u8; length];
                stream.read_exact(&mut body)?;
                match serde_json::from_slice::<Value>(&body) {
                    Ok(request) => (
                        200,
                        serde_json::to_vec(&mutate(&request, cfg)).unwrap_or_default(),
                    ),
                    Err(e) => (400, format!("not an AdmissionReview: {e}\n").into_bytes()),
                }
            }
        }
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
        let n = r.read_line(&mut line)?;
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
    mutate_with_policies(request, &policies, &cfg.image, cfg.metrics_port)
}

/// [`mutate`] with the policies already read: the whole decision for one `AdmissionReview`
/// request, with no I/O, so it can be tested and fuzzed on hostile reviews. `image` and
/// `metrics_port` are the injected containers' image and the supervisor's metrics port.
pub fn mutate_with_policies(
    request: &Value,
    policies: &[ModulesPolicy],
    image: &str,
    metrics_port: u16,
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
                    image: image.to_owned(),
                    loader_config_map: policy.modules.loader_config_map.clone(),
                    metrics_port,
                },
            )
        }
    }
}
