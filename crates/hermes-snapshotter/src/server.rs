//! The gRPC edge: containerd's snapshots service on a unix socket, translating requests to
//! [`Snapshots`] calls (run on blocking threads: they touch the disk and the store) and errors
//! to `tonic::Status` in one place, [`to_status`].

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use prost_types::Timestamp;
use tokio::net::UnixListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};
use tracing::{debug, info};

use crate::api::containerd::services::snapshots::v1 as pb;
use crate::api::containerd::types;
use crate::{Error, Info, Kind, Mount, Result, Snapshots};
use pb::snapshots_server::{Snapshots as SnapshotsApi, SnapshotsServer};

/// Maps a core error to the gRPC code containerd turns back into its `errdefs` errors.
fn to_status(e: Error) -> Status {
    use tonic::Code;
    let code = match &e {
        Error::AlreadyExists { .. } => Code::AlreadyExists,
        Error::NotFound { .. } => Code::NotFound,
        Error::WrongKind { .. } | Error::HasChildren { .. } => Code::FailedPrecondition,
        Error::ParentNotCommitted { .. }
        | Error::InvalidArgument { .. }
        | Error::InvalidFilter { .. }
        | Error::ImmutableField { .. } => Code::InvalidArgument,
        Error::Store { .. }
        | Error::Corrupt { .. }
        | Error::Io { .. }
        | Error::Serve(_)
        | Error::Task(_)
        | Error::Config { .. }
        | Error::Registry(_)
        | Error::Ztoc { .. }
        | Error::Controller(_)
        | Error::Mount { .. }
        | Error::Metrics { .. }
        | Error::CriConnection { .. }
        | Error::CriConnectionIo { .. } => Code::Internal,
    };
    Status::new(code, hermes_node_api::error_chain(&e))
}

#[derive(Debug)]
struct Service {
    core: Arc<Snapshots>,
}

impl Service {
    /// Runs a core call on a blocking thread.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Snapshots) -> Result<T> + Send + 'static,
    ) -> Result<T, Status> {
        let core = Arc::clone(&self.core);
        tokio::task::spawn_blocking(move || f(&core))
            .await
            .map_err(Error::Task)
            .and_then(|r| r)
            .map_err(to_status)
    }
}

fn labels(m: std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    m.into_iter().collect()
}

/// The label names a request carries, sorted and comma-separated: which labels a containerd
/// passes depends on its version and pull path, and the debug log shows it (values stay out:
/// they hold image references).
fn label_names(m: &std::collections::HashMap<String, String>) -> String {
    let mut names: Vec<&str> = m.keys().map(String::as_str).collect();
    names.sort_unstable();
    names.join(",")
}

fn mounts_pb(mounts: Vec<Mount>) -> Vec<types::Mount> {
    mounts
        .into_iter()
        .map(|m| types::Mount {
            r#type: m.fs_type,
            source: m.source,
            target: String::new(),
            options: m.options,
        })
        .collect()
}

fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

fn info_pb(i: Info) -> pb::Info {
    pb::Info {
        name: i.name,
        parent: i.parent.unwrap_or_default(),
        kind: match i.kind {
            Kind::View => pb::Kind::View,
            Kind::Active => pb::Kind::Active,
            Kind::Committed => pb::Kind::Committed,
        } as i32,
        created_at: Some(timestamp(i.created)),
        updated_at: Some(timestamp(i.updated)),
        labels: i.labels.into_iter().collect(),
    }
}

#[tonic::async_trait]
impl SnapshotsApi for Service {
    async fn prepare(
        &self,
        request: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let r = request.into_inner();
        debug!(key = %r.key, parent = %r.parent, labels = %label_names(&r.labels), "prepare");
        let mounts = self
            .run(move |c| c.prepare(&r.key, &r.parent, labels(r.labels)))
            .await?;
        Ok(Response::new(pb::PrepareSnapshotResponse {
            mounts: mounts_pb(mounts),
        }))
    }

    async fn view(
        &self,
        request: Request<pb::ViewSnapshotRequest>,
    ) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let r = request.into_inner();
        let mounts = self
            .run(move |c| c.view(&r.key, &r.parent, labels(r.labels)))
            .await?;
        Ok(Response::new(pb::ViewSnapshotResponse {
            mounts: mounts_pb(mounts),
        }))
    }

    async fn mounts(
        &self,
        request: Request<pb::MountsRequest>,
    ) -> Result<Response<pb::MountsResponse>, Status> {
        let r = request.into_inner();
        let mounts = self.run(move |c| c.mounts(&r.key)).await?;
        Ok(Response::new(pb::MountsResponse {
            mounts: mounts_pb(mounts),
        }))
    }

    async fn commit(
        &self,
        request: Request<pb::CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        self.run(move |c| c.commit(&r.name, &r.key, labels(r.labels)))
            .await?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        request: Request<pb::RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        self.run(move |c| c.remove(&r.key)).await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        request: Request<pb::StatSnapshotRequest>,
    ) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let r = request.into_inner();
        let info = self.run(move |c| c.stat(&r.key)).await?;
        Ok(Response::new(pb::StatSnapshotResponse {
            info: Some(info_pb(info)),
        }))
    }

    async fn update(
        &self,
        request: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let r = request.into_inner();
        let given = r.info.unwrap_or_default();
        let info = Info {
            name: given.name,
            parent: None,
            kind: Kind::Active,
            created: UNIX_EPOCH,
            updated: UNIX_EPOCH,
            labels: labels(given.labels),
        };
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let info = self.run(move |c| c.update(info, &paths)).await?;
        Ok(Response::new(pb::UpdateSnapshotResponse {
            info: Some(info_pb(info)),
        }))
    }

    type ListStream =
        tokio_stream::Iter<std::vec::IntoIter<Result<pb::ListSnapshotsResponse, Status>>>;

    async fn list(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let r = request.into_inner();
        let infos = self.run(move |c| c.walk(&r.filters)).await?;
        // Batches keep each message far below gRPC's default 4 MiB limit.
        let batches: Vec<_> = infos
            .chunks(100)
            .map(|chunk| {
                Ok(pb::ListSnapshotsResponse {
                    info: chunk.iter().cloned().map(info_pb).collect(),
                })
            })
            .collect();
        Ok(Response::new(tokio_stream::iter(batches)))
    }

    async fn usage(
        &self,
        request: Request<pb::UsageRequest>,
    ) -> Result<Response<pb::UsageResponse>, Status> {
        let r = request.into_inner();
        let u = self.run(move |c| c.usage(&r.key)).await?;
        Ok(Response::new(pb::UsageResponse {
            size: i64::try_from(u.size).unwrap_or(i64::MAX),
            inodes: i64::try_from(u.inodes).unwrap_or(i64::MAX),
        }))
    }

    async fn cleanup(&self, _request: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        self.run(|c| c.cleanup().map(drop)).await?;
        Ok(Response::new(()))
    }
}

/// A running server; [`ServerHandle::shutdown`] stops it gracefully, dropping it stops it too.
#[derive(Debug)]
pub struct ServerHandle {
    socket: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
}

impl ServerHandle {
    pub(crate) fn new(
        socket: PathBuf,
        stop: oneshot::Sender<()>,
        task: JoinHandle<Result<(), tonic::transport::Error>>,
    ) -> Self {
        Self {
            socket,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// The socket the server listens on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Stops accepting, lets running calls finish, and removes the socket file.
    pub async fn shutdown(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let outcome = match self.task.take() {
            Some(task) => task.await.map_err(Error::Task)?.map_err(Error::Serve),
            None => Ok(()),
        };
        let _ = std::fs::remove_file(&self.socket);
        outcome
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Serves `core` as containerd's snapshots API on the unix socket `socket` (a stale socket file
/// there is replaced). Must be called within a tokio runtime.
pub async fn serve(socket: &Path, core: Arc<Snapshots>) -> Result<ServerHandle> {
    let listener = bind(socket)?;
    let (stop, stopped) = oneshot::channel::<()>();
    let service = SnapshotsServer::new(Service { core });
    info!(socket = %socket.display(), "snapshotter listening");
    let task = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
                let _ = stopped.await;
            }),
    );
    Ok(ServerHandle::new(socket.to_owned(), stop, task))
}

/// Binds a unix socket at `socket` for root only (containerd, the kubelet), replacing a stale one.
pub(crate) fn bind(socket: &Path) -> Result<UnixListener> {
    if let Some(dir) = socket.parent().filter(|d| !d.exists()) {
        // A dir made for the socket is private; an existing one (`/run`) is left as it is.
        crate::private::private_dir(dir).map_err(Error::io("create socket dir", dir))?;
    }
    match std::fs::remove_file(socket) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(Error::io("remove stale socket", socket)(e));
        }
        _ => {}
    }
    let listener = UnixListener::bind(socket).map_err(Error::io("bind socket", socket))?;
    // Only root may talk to the socket, whatever the umask was at bind.
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .map_err(Error::io("restrict socket", socket))?;
    Ok(listener)
}

/// A snapshots API client over the unix socket `socket` (tests, tools).
pub async fn connect(
    socket: &Path,
) -> std::result::Result<
    pb::snapshots_client::SnapshotsClient<tonic::transport::Channel>,
    tonic::transport::Error,
> {
    let socket = socket.to_owned();
    let channel = tonic::transport::Endpoint::from_static("http://snapshotter.invalid")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await?;
    Ok(pb::snapshots_client::SnapshotsClient::new(channel))
}
