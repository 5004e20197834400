//! Connecting to containerd over its unix socket, the per-call metadata it expects (namespace,
//! lease), typed service clients, and the small typed queries built on them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tonic::metadata::AsciiMetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::Platform;
use crate::api::containerd::services::containers::v1 as containers;
use crate::api::containerd::services::content::v1 as content;
use crate::api::containerd::services::diff::v1 as diff;
use crate::api::containerd::services::images::v1 as images;
use crate::api::containerd::services::leases::v1 as leases;
use crate::api::containerd::services::namespaces::v1 as namespaces;
use crate::api::containerd::services::snapshots::v1 as snapshots;
use crate::api::containerd::services::tasks::v1 as tasks;
use crate::api::containerd::services::version::v1 as version;
use crate::api::containerd::types::Descriptor;
use crate::api::containerd::v1::types::Status as TaskStatus;
use crate::platform::manifest_for_platform;
use crate::{Error, Result};

/// gRPC metadata key naming the containerd namespace of a call.
pub const NAMESPACE_HEADER: &str = "containerd-namespace";
/// gRPC metadata key naming the lease that protects what a call creates from garbage collection.
pub const LEASE_HEADER: &str = "containerd-lease";

/// Media types of image indexes (OCI and Docker manifest lists).
const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
/// Largest image index read when resolving a manifest digest.
const MAX_INDEX_BYTES: u64 = 4 << 20;

/// Opens a gRPC channel to a unix socket (containerd's, or any other gRPC server's, e.g. the CRI
/// endpoint, which containerd 1.6 serves on the same socket).
pub async fn connect_unix(socket: impl AsRef<Path>) -> Result<Channel> {
    let socket = socket.as_ref().to_owned();
    let path = socket.clone();
    // The URI is a placeholder: the connector below ignores it and dials the socket.
    Endpoint::from_static("http://containerd.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|source| Error::Connect { socket, source })
}

/// The metadata containerd reads from every call: the namespace, and the lease if one is set.
#[derive(Debug, Clone)]
pub struct Metadata {
    namespace: AsciiMetadataValue,
    lease: Option<AsciiMetadataValue>,
}

impl Metadata {
    /// Metadata for `namespace` without a lease.
    pub fn new(namespace: &str) -> Result<Metadata> {
        Ok(Metadata {
            namespace: ascii("namespace", namespace)?,
            lease: None,
        })
    }

    /// The same metadata with `lease` set.
    pub fn with_lease(&self, lease: &str) -> Result<Metadata> {
        Ok(Metadata {
            namespace: self.namespace.clone(),
            lease: Some(ascii("lease", lease)?),
        })
    }
}

fn ascii(what: &'static str, value: &str) -> Result<AsciiMetadataValue> {
    let invalid = || Error::InvalidMetadata {
        what,
        value: value.to_owned(),
    };
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid());
    }
    value.parse().map_err(|_| invalid())
}

impl Interceptor for Metadata {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let metadata = request.metadata_mut();
        metadata.insert(NAMESPACE_HEADER, self.namespace.clone());
        if let Some(lease) = &self.lease {
            metadata.insert(LEASE_HEADER, lease.clone());
        }
        Ok(request)
    }
}

/// The transport every typed client uses: the channel with [`Metadata`] added to each call.
pub type Service = InterceptedService<Channel, Metadata>;

/// A connection to containerd in one namespace (and optionally under one lease).
///
/// Cloning is cheap (the channel is shared). The typed clients it hands out send the namespace
/// and lease with every call.
#[derive(Debug, Clone)]
pub struct Containerd {
    channel: Channel,
    metadata: Metadata,
    namespace: String,
    socket: PathBuf,
}

/// containerd's version, as its version service reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    /// Release, e.g. `1.6.20~ds1`.
    pub version: String,
    /// Source revision.
    pub revision: String,
}

/// A container whose task is running, with the image it was created from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningContainer {
    /// The container ID.
    pub id: String,
    /// The image name the container was created from (as in containerd's image store), empty if
    /// none was recorded.
    pub image_name: String,
    /// Digest of the image record's target (a manifest or an index), if the image is still known.
    pub target_digest: Option<String>,
    /// Digest of the image manifest for this host's platform: the target itself if it is a
    /// manifest, else the index entry for the host platform. `None` if unknown.
    pub manifest_digest: Option<String>,
    /// The snapshotter holding the container's rootfs.
    pub snapshotter: String,
    /// The task's init process ID.
    pub pid: u32,
    /// The container's labels (CRI sets pod name and namespace here).
    pub labels: BTreeMap<String, String>,
}

macro_rules! client {
    ($(#[$doc:meta])* $name:ident, $($client:ident)::+) => {
        $(#[$doc])*
        pub fn $name(&self) -> $($client)::+<Service> {
            $($client)::+::with_interceptor(self.channel.clone(), self.metadata.clone())
        }
    };
}

impl Containerd {
    /// Connects to containerd's socket; calls go to `namespace`.
    pub async fn connect(socket: impl AsRef<Path>, namespace: &str) -> Result<Containerd> {
        let metadata = Metadata::new(namespace)?;
        let socket = socket.as_ref().to_owned();
        let channel = connect_unix(&socket).await?;
        Ok(Containerd {
            channel,
            metadata,
            namespace: namespace.to_owned(),
            socket,
        })
    }

    /// The namespace calls go to.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The socket this connection was made to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The raw channel, for clients of other services on the same socket (e.g. CRI).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// The same connection, calling into another namespace (no lease).
    pub fn in_namespace(&self, namespace: &str) -> Result<Containerd> {
        Ok(Containerd {
            channel: self.channel.clone(),
            metadata: Metadata::new(namespace)?,
            namespace: namespace.to_owned(),
            socket: self.socket.clone(),
        })
    }

    /// The same connection with every call made under `lease`, so that what the calls create
    /// (content, snapshots) is not garbage-collected before it is referenced.
    pub fn with_lease(&self, lease: &str) -> Result<Containerd> {
        Ok(Containerd {
            metadata: self.metadata.with_lease(lease)?,
            ..self.clone()
        })
    }

    client!(
        /// The containers service.
        containers, containers::containers_client::ContainersClient
    );
    client!(
        /// The content store service.
        content, content::content_client::ContentClient
    );
    client!(
        /// The diff (apply/compare) service.
        diff, diff::diff_client::DiffClient
    );
    client!(
        /// The images service.
        images, images::images_client::ImagesClient
    );
    client!(
        /// The leases service.
        leases, leases::leases_client::LeasesClient
    );
    client!(
        /// The namespaces service.
        namespaces, namespaces::namespaces_client::NamespacesClient
    );
    client!(
        /// The snapshots service (all snapshotters; each request names one).
        snapshots, snapshots::snapshots_client::SnapshotsClient
    );
    client!(
        /// The tasks service.
        tasks, tasks::tasks_client::TasksClient
    );
    client!(
        /// The version service.
        version_client, version::version_client::VersionClient
    );

    /// containerd's version.
    pub async fn version(&self) -> Result<Version> {
        let v = self
            .version_client()
            .version(())
            .await
            .map_err(Error::rpc("version.Version"))?
            .into_inner();
        Ok(Version {
            version: v.version,
            revision: v.revision,
        })
    }

    /// The names of all namespaces.
    pub async fn list_namespaces(&self) -> Result<Vec<String>> {
        let list = self
            .namespaces()
            .list(namespaces::ListNamespacesRequest {
                filter: String::new(),
            })
            .await
            .map_err(Error::rpc("namespaces.List"))?
            .into_inner();
        Ok(list.namespaces.into_iter().map(|n| n.name).collect())
    }

    /// The containers of this namespace whose task is running, each with its image's manifest
    /// digest for this host's platform (resolved through the images and content services).
    /// A container or image that disappears while this runs is left out or left unresolved.
    pub async fn list_running_containers(&self) -> Result<Vec<RunningContainer>> {
        let tasks = self
            .tasks()
            .list(tasks::ListTasksRequest {
                filter: String::new(),
            })
            .await
            .map_err(Error::rpc("tasks.List"))?
            .into_inner()
            .tasks;
        let mut running = Vec::new();
        for task in tasks {
            if task.status != TaskStatus::Running as i32 {
                continue;
            }
            // containerd 1.6 leaves `container_id` empty in listings; a task's `id` is its
            // container's.
            let container_id = if task.container_id.is_empty() {
                task.id.clone()
            } else {
                task.container_id.clone()
            };
            let got = self
                .containers()
                .get(containers::GetContainerRequest { id: container_id })
                .await
                .map_err(Error::rpc("containers.Get"));
            let container = match got {
                Ok(r) => r.into_inner().container,
                Err(e) if e.is_not_found() => None,
                Err(e) => return Err(e),
            };
            let Some(container) = container else {
                continue;
            };
            let target = self.image_target(&container.image).await?;
            let manifest_digest = match &target {
                Some(t) => self.manifest_digest(t, &Platform::host()).await?,
                None => None,
            };
            running.push(RunningContainer {
                id: container.id,
                image_name: container.image,
                target_digest: target.map(|t| t.digest),
                manifest_digest,
                snapshotter: container.snapshotter,
                pid: task.pid,
                labels: container.labels.into_iter().collect(),
            });
        }
        running.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(running)
    }

    /// The target descriptor of image record `name`, or `None` if there is no such image.
    pub async fn image_target(&self, name: &str) -> Result<Option<Descriptor>> {
        if name.is_empty() {
            return Ok(None);
        }
        let got = self
            .images()
            .get(images::GetImageRequest {
                name: name.to_owned(),
            })
            .await
            .map_err(Error::rpc("images.Get"));
        match got {
            Ok(r) => Ok(r.into_inner().image.and_then(|i| i.target)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The manifest digest for `platform` behind an image target: the target itself if it is a
    /// manifest, the matching entry if it is an index. `None` if the index has no such platform
    /// or is not in the content store.
    pub async fn manifest_digest(
        &self,
        target: &Descriptor,
        platform: &Platform,
    ) -> Result<Option<String>> {
        if !INDEX_TYPES.contains(&target.media_type.as_str()) {
            return Ok(Some(target.digest.clone()));
        }
        let index = match self.read_content(&target.digest, MAX_INDEX_BYTES).await {
            Ok(bytes) => bytes,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e),
        };
        manifest_for_platform(&index, &target.digest, platform)
    }

    /// Reads a whole blob from the content store, refusing blobs larger than `limit` bytes.
    pub async fn read_content(&self, digest: &str, limit: u64) -> Result<Vec<u8>> {
        let info = self
            .content()
            .info(content::InfoRequest {
                digest: digest.to_owned(),
            })
            .await
            .map_err(Error::rpc("content.Info"))?
            .into_inner()
            .info;
        let size = info.map_or(0, |i| i.size);
        if u64::try_from(size).map_or(true, |s| s > limit) {
            return Err(Error::TooLarge {
                digest: digest.to_owned(),
                limit,
            });
        }
        let mut stream = self
            .content()
            .read(content::ReadContentRequest {
                digest: digest.to_owned(),
                offset: 0,
                size: 0,
            })
            .await
            .map_err(Error::rpc("content.Read"))?
            .into_inner();
        let mut data = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        while let Some(chunk) = stream.message().await.map_err(Error::rpc("content.Read"))? {
            data.extend_from_slice(&chunk.data);
            if data.len() as u64 > limit {
                return Err(Error::TooLarge {
                    digest: digest.to_owned(),
                    limit,
                });
            }
        }
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_carries_namespace_and_lease() {
        let mut m = Metadata::new("k8s.io")
            .unwrap()
            .with_lease("hermes-pull-1")
            .unwrap();
        let request = m.call(tonic::Request::new(())).unwrap();
        let md = request.metadata();
        assert_eq!(md.get(NAMESPACE_HEADER).unwrap(), "k8s.io");
        assert_eq!(md.get(LEASE_HEADER).unwrap(), "hermes-pull-1");
        let mut plain = Metadata::new("default").unwrap();
        let request = plain.call(tonic::Request::new(())).unwrap();
        assert!(request.metadata().get(LEASE_HEADER).is_none());
    }

    #[test]
    fn namespaces_must_be_sendable_as_metadata() {
        for bad in ["", "bad\nname", "naïve"] {
            let err = Metadata::new(bad).unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::InvalidMetadata {
                        what: "namespace",
                        ..
                    }
                ),
                "{bad:?}"
            );
        }
    }
}
