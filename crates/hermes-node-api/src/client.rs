//! The typed client of the node API, for the node daemon and `hermes status`. Every request has
//! the deadline of [`ClientOptions::timeout`] (connecting included) and every body it reads a
//! cap ([`MAX_ZTOC_SIZE`], [`MAX_PROFILE_SIZE`], [`MAX_REPORTS_SIZE`], [`MAX_ERROR_BODY`]): a
//! broken or hostile controller costs bounded time and memory. Error answers are read only to
//! show their first bytes.

use std::time::Duration;

use hermes_oci::Digest;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{
    CONTENT_DIGEST_HEADER, DISABLED_HEADER, LayerBehaviour, MAX_ERROR_BODY, MAX_PROFILE_SIZE,
    MAX_REPORTS_SIZE, MAX_ZTOC_SIZE, Miss, PrefetchProfile, PullReport, TraceReport, ZtocQuery,
    etag, paths,
};

/// Default of [`ClientOptions::timeout`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a node-API request failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The HTTP client could not be set up (a bad CA certificate, TLS).
    #[error("cannot set up an HTTP client for the controller at {base}")]
    Setup {
        /// The controller's base URL.
        base: String,
        /// The client error.
        #[source]
        source: reqwest::Error,
    },
    /// The request got no answer in time (controller down, refused, slow, TLS failed).
    #[error("{method} {url}: no answer")]
    Request {
        /// The request method.
        method: Method,
        /// The request URL.
        url: String,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },
    /// The controller wants a bearer token, or another one.
    #[error("{url} answered 401 Unauthorized: the bearer token is missing or wrong")]
    Unauthorized {
        /// The request URL.
        url: String,
    },
    /// The controller answered with an unexpected status.
    #[error("{url} answered {status}: {message}")]
    Status {
        /// The request URL.
        url: String,
        /// The status.
        status: StatusCode,
        /// The first bytes of the answer, as text.
        message: String,
    },
    /// The answer's body could not be read within its cap and the deadline.
    #[error("cannot read the answer of {url}")]
    Body {
        /// The request URL.
        url: String,
        /// The read error (e.g. the body is larger than its cap).
        #[source]
        source: Box<hermes_oci::Error>,
    },
    /// A zTOC's body does not have the digest its header names.
    #[error("the zTOC from {url} has digest {actual}, its header says {header}")]
    WrongDigest {
        /// The request URL.
        url: String,
        /// The body's digest.
        actual: Digest,
        /// The `Docker-Content-Digest` header.
        header: String,
    },
    /// The answer is not the JSON the contract describes.
    #[error("unexpected answer from {url}")]
    Decode {
        /// The request URL.
        url: String,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How to reach the controller.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Bearer token for `/v1/*`, if the controller wants one.
    pub token: Option<String>,
    /// Deadline of each request, from connecting to the end of its body.
    pub timeout: Duration,
    /// A PEM CA certificate to trust for an `https://` controller, besides the system's roots.
    pub ca_pem: Option<Vec<u8>>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            token: None,
            timeout: DEFAULT_TIMEOUT,
            ca_pem: None,
        }
    }
}

/// A layer's zTOC, as the controller answers a lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ZtocAnswer {
    /// The zTOC (checked against its digest header when there is one), and how to serve it.
    Ztoc(Vec<u8>, LayerBehaviour),
    /// The copy the node named is still the zTOC (304), and how to serve it.
    Same(LayerBehaviour),
    /// The controller has none (404), and how to serve a zTOC the node finds elsewhere (the
    /// policy applies to the image wherever its index comes from).
    NotFound(LayerBehaviour),
    /// A lazy start of the image is refused (404 with [`DISABLED_HEADER`]); why.
    Disabled(String),
}

/// The node API of one controller.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Client {
    /// A client of the controller at `base` (e.g. `http://hermes-controller:8080`). Installs
    /// the ring crypto provider for rustls once.
    pub fn new(base: &str, options: ClientOptions) -> Result<Self> {
        let base = base.trim_end_matches('/').to_owned();
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut http = reqwest::Client::builder()
            .timeout(options.timeout)
            .connect_timeout(options.timeout);
        let setup = |source| Error::Setup {
            base: base.clone(),
            source,
        };
        if let Some(pem) = &options.ca_pem {
            http = http.add_root_certificate(reqwest::Certificate::from_pem(pem).map_err(setup)?);
        }
        Ok(Self {
            http: http.build().map_err(setup)?,
            token: options.token,
            base,
        })
    }

    /// The controller's base URL, without a trailing `/`.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The URL of `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A request to `path`, with the bearer token if there is one.
    fn request(&self, method: Method, path: &str) -> (String, RequestBuilder) {
        let url = self.url(path);
        let mut req = self.http.request(method, &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        (url, req)
    }

    async fn send(&self, method: Method, url: &str, req: RequestBuilder) -> Result<Response> {
        req.send().await.map_err(|source| Error::Request {
            method,
            url: url.to_owned(),
            source,
        })
    }

    /// `layer`'s zTOC, naming the image in `query` (so the controller can refuse it) and the
    /// copy `kept` by the node, if any (so the controller can confirm it without sending it).
    pub async fn ztoc(
        &self,
        layer: &Digest,
        query: &ZtocQuery,
        kept: Option<&Digest>,
    ) -> Result<ZtocAnswer> {
        let (url, mut req) = self.request(Method::GET, &paths::ztoc(layer, query));
        if let Some(kept) = kept {
            req = req.header(reqwest::header::IF_NONE_MATCH, etag(kept));
        }
        let resp = self.send(Method::GET, &url, req).await?;
        let status = resp.status();
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let (digest, disabled) = (header(CONTENT_DIGEST_HEADER), header(DISABLED_HEADER));
        let behaviour =
            LayerBehaviour::from_headers(|name| resp.headers().get(name)?.to_str().ok());
        if status == StatusCode::NOT_MODIFIED && kept.is_some() {
            return Ok(ZtocAnswer::Same(behaviour));
        }
        if status == StatusCode::NOT_FOUND {
            return Ok(disabled.map_or(ZtocAnswer::NotFound(behaviour), ZtocAnswer::Disabled));
        }
        let body = success(resp, &url, MAX_ZTOC_SIZE, "zTOC").await?;
        let actual = Digest::of(&body);
        match digest {
            Some(header) if header != actual.as_str() => Err(Error::WrongDigest {
                url,
                actual,
                header,
            }),
            _ => Ok(ZtocAnswer::Ztoc(body.to_vec(), behaviour)),
        }
    }

    /// `layer`'s merged startup profile; `None` when the controller has none.
    pub async fn prefetch_profile(&self, layer: &Digest) -> Result<Option<PrefetchProfile>> {
        let (url, req) = self.request(Method::GET, &paths::prefetch(layer));
        let resp = self.send(Method::GET, &url, req).await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let body = success(resp, &url, MAX_PROFILE_SIZE, "prefetch profile").await?;
        decode(&url, &body).map(Some)
    }

    /// Reports a startup trace.
    pub async fn post_trace(&self, report: &TraceReport) -> Result<()> {
        self.post(paths::TRACES, report).await
    }

    /// Reports an image started without an index.
    pub async fn post_miss(&self, miss: &Miss) -> Result<()> {
        self.post(paths::MISSES, miss).await
    }

    /// Reports how a pull went (best effort: the caller sends it off the start's path).
    pub async fn post_pull(&self, report: &PullReport) -> Result<()> {
        self.post(paths::PULLS, report).await
    }

    /// Every image report. The report type is the controller's (`hermes_controller::status::
    /// ImageReport`), which it also keeps as `HermesImage` statuses.
    pub async fn images<R: DeserializeOwned>(&self) -> Result<Vec<R>> {
        self.get_json(paths::IMAGES).await
    }

    /// Every policy's status (`hermes_controller::status::PolicyReport`).
    pub async fn policies<R: DeserializeOwned>(&self) -> Result<Vec<R>> {
        self.get_json(paths::POLICIES).await
    }

    async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let (url, req) = self.request(Method::GET, path);
        let resp = self.send(Method::GET, &url, req).await?;
        let body = success(resp, &url, MAX_REPORTS_SIZE, "report list").await?;
        decode(&url, &body)
    }

    async fn post<T: Serialize>(&self, path: &str, body: &T) -> Result<()> {
        let (url, req) = self.request(Method::POST, path);
        // A wire type always serializes; an empty body would be refused with 400.
        let body = serde_json::to_vec(body).unwrap_or_default();
        let req = req
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        let resp = self.send(Method::POST, &url, req).await?;
        success(resp, &url, MAX_ERROR_BODY, "answer")
            .await
            .map(drop)
    }
}

/// The body of a successful answer, read up to `limit`; an error for any other status.
async fn success(
    resp: Response,
    url: &str,
    limit: u64,
    what: &'static str,
) -> Result<bytes::Bytes> {
    let status = resp.status();
    if status == StatusCode::UNAUTHORIZED {
        return Err(Error::Unauthorized {
            url: url.to_owned(),
        });
    }
    if !status.is_success() {
        let message = match hermes_oci::read_body(resp, MAX_ERROR_BODY, "error answer").await {
            Ok(body) => String::from_utf8_lossy(&body).trim().to_owned(),
            Err(_) => "(an unreadable or oversized error answer)".to_owned(),
        };
        return Err(Error::Status {
            url: url.to_owned(),
            status,
            message,
        });
    }
    hermes_oci::read_body(resp, limit, what)
        .await
        .map_err(|source| Error::Body {
            url: url.to_owned(),
            source: Box::new(source),
        })
}

fn decode<T: DeserializeOwned>(url: &str, body: &[u8]) -> Result<T> {
    serde_json::from_slice(body).map_err(|source| Error::Decode {
        url: url.to_owned(),
        source,
    })
}
