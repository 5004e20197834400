//! The CRI image-service proxy: the kubelet's `--image-service-endpoint`, forwarding every
//! `ImageService` call to containerd's socket unchanged, byte for byte. From each `PullImage` it
//! learns the image, the pod (the sandbox config's metadata and labels) and the pod's registry
//! credential (`AuthConfig`, from its `imagePullSecrets`): the credential goes to the shared
//! in-memory [`PullCredentials`] (lazy range reads of that image use it), the pod to the
//! [`PullLog`].
//!
//! Both CRI versions are served (`runtime.v1alpha2`, which kubelets up to 1.25 speak, and
//! `runtime.v1`): their image-service messages are the same on the wire, so one decoder (the v1
//! types) reads `PullImage` from either, and everything else is never decoded at all. The
//! proxy does not depend on the node daemon's snapshotter or lazy layers: if those fail, pulls
//! still go through. It is not a CRI runtime service: the kubelet keeps talking to containerd
//! for pods and containers.
//!
//! Every connection passes through an HTTP/2 front (`h2_front`) that replaces an `:authority`
//! the HTTP/2 server would reject (the socket path kubelets before 1.26 send) with `localhost`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::{Buf, BufMut, Bytes};
use hermes_containerd_api::runtime::v1 as cri;
use hermes_oci::{PullCredentials, Reference, credential_from_auth_fields};
use prost::Message;
use tokio::sync::oneshot;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::server::NamedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::{Result, ServerHandle};

mod h2_front;

/// Largest CRI message either way, the kubelet's own limit (16 MiB): a `ListImages` answer
/// on a node with many images is large.
const MAX_MESSAGE_SIZE: usize = 16 << 20;

/// How many pulls the [`PullLog`] keeps.
const PULL_LOG_LEN: usize = 256;

/// The pod a kubelet pulled for (from `PullImageRequest.sandbox_config`), as the node API's
/// reports carry it.
pub use hermes_node_api::PodRef;

/// How long after a pull its pod is taken as the one the pulled image's layers start for.
const POD_OF_PULL_FOR: std::time::Duration = std::time::Duration::from_secs(600);

/// One `PullImage` the proxy saw. Holds no credential, only whether one came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pull {
    /// The image as the kubelet asked for it.
    pub image: String,
    /// The pod, if the kubelet said (it always does; other CRI clients may not).
    pub pod: Option<PodRef>,
    /// Whether the request carried a registry credential.
    pub with_credential: bool,
    /// The runtime's answer (the image ID), once the pull succeeded.
    pub image_ref: Option<String>,
    /// When the request came.
    pub at: SystemTime,
}

/// The last pulls, newest last; shared and cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct PullLog {
    pulls: Arc<Mutex<VecDeque<Pull>>>,
}

impl PullLog {
    fn push(&self, pull: Pull) {
        if let Ok(mut pulls) = self.pulls.lock() {
            if pulls.len() == PULL_LOG_LEN {
                pulls.pop_front();
            }
            pulls.push_back(pull);
        }
    }

    /// Record the runtime's answer to `pull` (logged when it came).
    fn resolve(&self, pull: &Pull, image_ref: String) {
        if let Ok(mut pulls) = self.pulls.lock()
            && let Some(p) = pulls
                .iter_mut()
                .rev()
                .find(|p| p.at == pull.at && p.image == pull.image)
        {
            p.image_ref = Some(image_ref);
        }
    }

    /// The pod of the newest recent pull of `image` (the reference as containerd names the
    /// image, compared with the one the kubelet asked for), if the kubelet said.
    pub fn pod_for(&self, image: &str) -> Option<PodRef> {
        let wanted = Reference::parse(image).ok();
        let pulls = self.pulls.lock().ok()?;
        pulls
            .iter()
            .rev()
            .filter(|p| p.at.elapsed().is_ok_and(|age| age < POD_OF_PULL_FOR))
            .filter(|p| {
                p.image == image
                    || wanted
                        .as_ref()
                        .is_some_and(|w| Reference::parse(&p.image).ok().as_ref() == Some(w))
            })
            .find_map(|p| p.pod.clone())
    }

    /// The pulls kept, oldest first.
    pub fn pulls(&self) -> Vec<Pull> {
        self.pulls
            .lock()
            .map(|p| p.iter().cloned().collect())
            .unwrap_or_default()
    }
}

/// What a `PullImage` request tells the node, read from its bytes.
fn read_pull(request: &[u8], credentials: &PullCredentials) -> Option<Pull> {
    let request = cri::PullImageRequest::decode(request).ok()?;
    let image = request.image.map(|i| i.image).unwrap_or_default();
    let credential = request.auth.as_ref().and_then(|a| {
        credential_from_auth_fields(&a.username, &a.password, &a.auth, &a.identity_token)
    });
    let with_credential = credential.is_some();
    match Reference::parse(&image) {
        // Every pull refreshes (or, without a secret, forgets) the repository's credential.
        Ok(reference) => credentials.set(&reference, credential),
        Err(e) => warn!(%image, error = %e, "CRI pull of an image reference Hermes cannot parse"),
    }
    let pod = request.sandbox_config.map(|c| {
        let meta = c.metadata.unwrap_or_default();
        PodRef {
            namespace: meta.namespace,
            name: meta.name,
            uid: meta.uid,
            labels: c.labels.into_iter().collect(),
        }
    });
    Some(Pull {
        image,
        pod,
        with_credential,
        image_ref: None,
        at: SystemTime::now(),
    })
}

/// Called after a pull updated [`PullCredentials`] (the node daemon hands the new credential
/// to the image's running layer servers).
#[derive(Clone)]
pub struct OnCredentials(pub Arc<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for OnCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnCredentials")
    }
}

/// The image service proxy: forwards to containerd, learns from pulls.
#[derive(Debug, Clone)]
pub struct ImageProxy {
    upstream: Channel,
    credentials: PullCredentials,
    pulls: PullLog,
    on_credentials: Option<OnCredentials>,
}

impl ImageProxy {
    /// A proxy to the CRI on `containerd` (connected on first use, so containerd may start
    /// later), recording credentials in `credentials` and pulls in `pulls`.
    pub fn new(containerd: &Path, credentials: PullCredentials, pulls: PullLog) -> Self {
        let socket = containerd.to_owned();
        let upstream = Endpoint::from_static("http://containerd.invalid")
            .connect_with_connector_lazy(tower::service_fn(move |_: tonic::transport::Uri| {
                let socket = socket.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(socket).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                }
            }));
        Self {
            upstream,
            credentials,
            pulls,
            on_credentials: None,
        }
    }

    /// Calls `hook` after every pull that carried a credential.
    pub fn on_credentials(mut self, hook: OnCredentials) -> Self {
        self.on_credentials = Some(hook);
        self
    }

    /// Forwards one call (`path`: `/runtime.v1alpha2.ImageService/PullImage`) as it came.
    async fn forward(
        &self,
        path: &str,
        request: Request<Bytes>,
    ) -> Result<Response<Bytes>, Status> {
        let is_pull = path.ends_with("/PullImage");
        let pull = if is_pull {
            read_pull(request.get_ref(), &self.credentials)
        } else {
            None
        };
        if let Some(p) = &pull {
            let pod = p
                .pod
                .as_ref()
                .map(|p| format!("{}/{}", p.namespace, p.name));
            info!(image = %p.image, pod = pod.as_deref().unwrap_or("-"),
                with_credential = p.with_credential, "CRI pull");
            if let (true, Some(hook)) = (p.with_credential, &self.on_credentials) {
                let hook = hook.0.clone();
                // Writes to layer servers' pipes: off the async threads.
                let _ = tokio::task::spawn_blocking(move || hook()).await;
            }
        }
        // Logged before containerd pulls: the snapshotter's lookups during the pull name the pod.
        if let Some(p) = &pull {
            self.pulls.push(p.clone());
        }
        let path = path
            .parse::<tonic::codegen::http::uri::PathAndQuery>()
            .map_err(|_| Status::unimplemented(format!("not a gRPC method path: {path}")))?;
        let mut grpc = tonic::client::Grpc::new(self.upstream.clone())
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE);
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(format!("containerd's CRI is not reachable: {e}")))?;
        let (metadata, extensions, body) = request.into_parts();
        let answer = grpc
            .unary(
                Request::from_parts(metadata, extensions, body),
                path,
                RawCodec,
            )
            .await;
        if let (Some(p), Ok(r)) = (&pull, &answer)
            && let Ok(r) = cri::PullImageResponse::decode(r.get_ref().clone())
        {
            self.pulls.resolve(p, r.image_ref);
        }
        answer
    }
}

/// A CRI version the proxy serves, by its gRPC service name.
pub trait CriVersion: Send + Sync + 'static {
    /// `runtime.v1alpha2.ImageService` or `runtime.v1.ImageService`.
    const NAME: &'static str;
}

/// CRI `runtime.v1alpha2` (kubelets up to 1.25; containerd 1.x).
#[derive(Debug)]
pub enum V1alpha2 {}
impl CriVersion for V1alpha2 {
    const NAME: &'static str = "runtime.v1alpha2.ImageService";
}

/// CRI `runtime.v1`.
#[derive(Debug)]
pub enum V1 {}
impl CriVersion for V1 {
    const NAME: &'static str = "runtime.v1.ImageService";
}

/// The proxy as the tonic service of one CRI version.
#[derive(Debug)]
pub struct ImageService<V> {
    proxy: ImageProxy,
    version: PhantomData<V>,
}

impl<V> Clone for ImageService<V> {
    fn clone(&self) -> Self {
        Self {
            proxy: self.proxy.clone(),
            version: PhantomData,
        }
    }
}

impl<V: CriVersion> ImageService<V> {
    /// `proxy`, served as version `V`.
    pub fn new(proxy: ImageProxy) -> Self {
        Self {
            proxy,
            version: PhantomData,
        }
    }
}

impl<V: CriVersion> NamedService for ImageService<V> {
    const NAME: &'static str = V::NAME;
}

/// One unary call to forward on `path`.
struct Call {
    proxy: ImageProxy,
    path: String,
}

impl tonic::server::UnaryService<Bytes> for Call {
    type Response = Bytes;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Response<Bytes>, Status>> + Send>,
    >;

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let (proxy, path) = (self.proxy.clone(), self.path.clone());
        Box::pin(async move { proxy.forward(&path, request).await })
    }
}

impl<V: CriVersion> tower::Service<tonic::codegen::http::Request<tonic::body::Body>>
    for ImageService<V>
{
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Infallible>> + Send>,
    >;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: tonic::codegen::http::Request<tonic::body::Body>) -> Self::Future {
        let call = Call {
            proxy: self.proxy.clone(),
            path: request.uri().path().to_owned(),
        };
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(RawCodec)
                .max_decoding_message_size(MAX_MESSAGE_SIZE)
                .max_encoding_message_size(MAX_MESSAGE_SIZE);
            Ok(grpc.unary(call, request).await)
        })
    }
}

/// The in-memory pipe between a connection's front and the gRPC server: a few frames.
const PIPE_BUFFER: usize = 64 * 1024;

/// Serves `proxy` (both CRI versions) on the unix socket `socket`, for root only.
pub async fn serve_cri_proxy(socket: &Path, proxy: ImageProxy) -> Result<ServerHandle> {
    let listener = crate::server::bind(socket)?;
    let (stop, stopped) = oneshot::channel::<()>();
    info!(socket = %socket.display(), "CRI image service proxy listening");
    // Each connection goes through the HTTP/2 front (see `h2_front`): the gRPC server gets the
    // other end of an in-memory pipe.
    let incoming = UnixListenerStream::new(listener).map(|accepted| {
        accepted.map(|client| {
            let (front_end, server_end) = tokio::io::duplex(PIPE_BUFFER);
            tokio::spawn(h2_front::front(client, front_end));
            server_end
        })
    });
    let task = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ImageService::<V1alpha2>::new(proxy.clone()))
            .add_service(ImageService::<V1>::new(proxy))
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            }),
    );
    Ok(ServerHandle::new(socket.to_owned(), stop, task))
}

/// The default containerd socket the proxy forwards to.
pub fn default_containerd_socket() -> PathBuf {
    PathBuf::from("/run/containerd/containerd.sock")
}

/// Messages as opaque bytes: the proxy forwards what it gets without decoding it.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pull_request(auth: Option<cri::AuthConfig>) -> Vec<u8> {
        cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: "reg:5000/team/app:v1".into(),
                ..Default::default()
            }),
            auth,
            sandbox_config: Some(cri::PodSandboxConfig {
                metadata: Some(cri::PodSandboxMetadata {
                    name: "web-1".into(),
                    uid: "u-1".into(),
                    namespace: "shop".into(),
                    attempt: 0,
                }),
                labels: [("app".to_owned(), "web".to_owned())].into(),
                ..Default::default()
            }),
        }
        .encode_to_vec()
    }

    #[test]
    fn a_pull_yields_pod_and_refreshes_or_forgets_the_credential() {
        let creds = PullCredentials::new();
        let auth = |password: &str| cri::AuthConfig {
            username: "puller".into(),
            password: password.into(),
            ..Default::default()
        };
        let image = Reference::parse("reg:5000/team/app:v1").unwrap();
        let pull = read_pull(&pull_request(Some(auth("one"))), &creds).unwrap();
        assert_eq!(pull.image, "reg:5000/team/app:v1");
        assert!(pull.with_credential);
        let pod = pull.pod.unwrap();
        assert_eq!(
            (pod.namespace.as_str(), pod.name.as_str()),
            ("shop", "web-1")
        );
        assert_eq!(pod.uid, "u-1");
        assert_eq!(pod.labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(
            creds.for_image(&image),
            credential_from_auth_fields("puller", "one", "", "")
        );
        read_pull(&pull_request(Some(auth("two"))), &creds).unwrap();
        assert_eq!(
            creds.for_image(&image),
            credential_from_auth_fields("puller", "two", "", "")
        );
        let pull = read_pull(&pull_request(None), &creds).unwrap();
        assert!(!pull.with_credential);
        assert_eq!(creds.for_image(&image), None);
    }

    #[test]
    fn the_pod_of_an_image_is_that_of_its_newest_pull_by_normalized_reference() {
        let log = PullLog::default();
        let pull = |image: &str, ns: &str| Pull {
            image: image.to_owned(),
            pod: Some(PodRef {
                namespace: ns.to_owned(),
                ..Default::default()
            }),
            with_credential: false,
            image_ref: None,
            at: SystemTime::now(),
        };
        log.push(pull("busybox", "first"));
        log.push(pull("registry.test/app:v1", "other"));
        log.push(pull("docker.io/library/busybox:latest", "second"));
        assert_eq!(
            log.pod_for("docker.io/library/busybox:latest")
                .unwrap()
                .namespace,
            "second"
        );
        assert_eq!(log.pod_for("registry.test/app:v2"), None);
    }

    #[test]
    fn a_pull_that_does_not_decode_is_still_forwarded_untouched() {
        assert_eq!(read_pull(b"\xff\xff\xff", &PullCredentials::new()), None);
    }
}
