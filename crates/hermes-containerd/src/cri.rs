//! The Kubernetes CRI as a kubelet drives it for one container start: `PullImage`,
//! `RunPodSandbox` (host network, so no CNI plugin is needed), `CreateContainer`,
//! `StartContainer`, then status and teardown. Typed and minimal: one pod, containers with a
//! command and a log file; everything else at CRI's defaults.
//!
//! It is not a kubelet: no probes, restarts, volumes or resource limits.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tonic::transport::Channel;

use crate::api::runtime::v1 as cri;
use crate::api::runtime::v1::image_service_client::ImageServiceClient;
use crate::api::runtime::v1::runtime_service_client::RuntimeServiceClient;
use crate::{Error, Result, connect_unix};

/// A CRI endpoint (containerd 1.6 and 2.x serve it on their main socket).
#[derive(Debug, Clone)]
pub struct Cri {
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    /// The runtime handler (a `RuntimeClass`'s handler) for pulls and pods; empty: the default.
    runtime_handler: String,
}

/// The pod annotation containerd's CRI reads a pull's runtime handler from. containerd 2.1
/// reads only this (not `ImageSpec.runtime_handler`); a kubelet passes a pod's annotations in
/// the pull's sandbox config, so a pod annotated with it pulls into its handler's snapshotter.
const RUNTIME_HANDLER_ANNOTATION: &str = "io.containerd.cri.runtime-handler";

/// A running pod sandbox.
#[derive(Debug, Clone)]
pub struct Pod {
    /// The sandbox ID the runtime gave it.
    pub id: String,
    /// Where its containers' logs go.
    pub log_directory: PathBuf,
    config: cri::PodSandboxConfig,
}

/// A container's state as the runtime reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerState {
    /// Created, not started.
    Created,
    /// Running.
    Running,
    /// Exited with this code.
    Exited(i32),
    /// The runtime does not know.
    Unknown,
}

/// A container's state with the times the runtime recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerStatus {
    /// The state.
    pub state: ContainerState,
    /// When its process started, once it has.
    pub started_at: Option<SystemTime>,
    /// When its process exited, once it has.
    pub finished_at: Option<SystemTime>,
    /// The runtime's reason for the state (e.g. `Completed`, `Error`), often empty.
    pub reason: String,
    /// The runtime's message, often empty.
    pub message: String,
}

impl Cri {
    /// Connects to the CRI endpoint on `socket`.
    pub async fn connect(socket: impl AsRef<Path>) -> Result<Cri> {
        let channel = connect_unix(socket).await?;
        Ok(Cri {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
            runtime_handler: String::new(),
        })
    }

    /// The same endpoint, pulling images and running pods with runtime handler `handler`, as a
    /// kubelet does for a pod of a `RuntimeClass` with that handler, annotated with
    /// `io.containerd.cri.runtime-handler` (containerd 2.x can give a handler its own
    /// snapshotter). Pulls also carry `ImageSpec.runtime_handler`, which kubelets send with their
    /// `RuntimeClassInImageCriApi` feature gate.
    pub fn with_runtime_handler(&self, handler: &str) -> Cri {
        Cri {
            runtime_handler: handler.to_owned(),
            ..self.clone()
        }
    }

    /// The raw runtime service client, for calls this type does not wrap.
    pub fn runtime(&self) -> RuntimeServiceClient<Channel> {
        self.runtime.clone()
    }

    /// The runtime's name and version (`containerd`, `v1.6.20…`).
    pub async fn version(&self) -> Result<(String, String)> {
        let v = self
            .runtime
            .clone()
            .version(cri::VersionRequest {
                version: "v1".into(),
            })
            .await
            .map_err(Error::rpc("cri.Version"))?
            .into_inner();
        Ok((v.runtime_name, v.runtime_version))
    }

    /// Pulls `image` as a kubelet does (no credentials) and returns the image ID the runtime
    /// reports.
    pub async fn pull_image(&self, image: &str) -> Result<String> {
        let sandbox_config = (!self.runtime_handler.is_empty()).then(|| cri::PodSandboxConfig {
            annotations: HashMap::from([(
                RUNTIME_HANDLER_ANNOTATION.to_owned(),
                self.runtime_handler.clone(),
            )]),
            ..Default::default()
        });
        let pulled = self
            .images
            .clone()
            .pull_image(cri::PullImageRequest {
                image: Some(self.image_spec(image)),
                auth: None,
                sandbox_config,
            })
            .await
            .map_err(Error::rpc("cri.PullImage"))?
            .into_inner();
        Ok(pulled.image_ref)
    }

    /// Starts a pod sandbox in the node's network, PID and IPC namespaces stay per pod;
    /// container logs go under `log_directory`.
    pub async fn run_host_network_pod(
        &self,
        name: &str,
        namespace: &str,
        log_directory: &Path,
    ) -> Result<Pod> {
        let config = cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.to_owned(),
                uid: format!("{namespace}-{name}-uid"),
                namespace: namespace.to_owned(),
                attempt: 0,
            }),
            // A kubelet leaves the hostname empty for host-network pods (runc refuses to set
            // one without a private UTS namespace).
            log_directory: log_directory.display().to_string(),
            linux: Some(cri::LinuxPodSandboxConfig {
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: cri::NamespaceMode::Node as i32,
                        pid: cri::NamespaceMode::Pod as i32,
                        ipc: cri::NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let id = self
            .runtime
            .clone()
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: self.runtime_handler.clone(),
            })
            .await
            .map_err(Error::rpc("cri.RunPodSandbox"))?
            .into_inner()
            .pod_sandbox_id;
        Ok(Pod {
            id,
            log_directory: log_directory.to_owned(),
            config,
        })
    }

    /// Creates and starts container `name` of `image` in `pod`, running `command`; its log is
    /// [`Cri::log_path`]`(pod, name)`. Returns the container ID.
    pub async fn start_container(
        &self,
        pod: &Pod,
        name: &str,
        image: &str,
        command: &[&str],
    ) -> Result<String> {
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: name.to_owned(),
                attempt: 0,
            }),
            image: Some(self.image_spec(image)),
            command: command.iter().map(|c| (*c).to_owned()).collect(),
            log_path: format!("{name}.log"),
            linux: Some(cri::LinuxContainerConfig::default()),
            labels: HashMap::from([("hermes.test/container".to_owned(), name.to_owned())]),
            ..Default::default()
        };
        let id = self
            .runtime
            .clone()
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.id.clone(),
                config: Some(config),
                sandbox_config: Some(pod.config.clone()),
            })
            .await
            .map_err(Error::rpc("cri.CreateContainer"))?
            .into_inner()
            .container_id;
        self.runtime
            .clone()
            .start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .map_err(Error::rpc("cri.StartContainer"))?;
        Ok(id)
    }

    /// Where container `name` of `pod` logs (CRI's log format: `TIME STREAM TAG LINE`).
    pub fn log_path(pod: &Pod, name: &str) -> PathBuf {
        pod.log_directory.join(format!("{name}.log"))
    }

    /// The container's state.
    pub async fn container_state(&self, id: &str) -> Result<ContainerState> {
        Ok(self.container_status(id).await?.state)
    }

    /// The container's state and times.
    pub async fn container_status(&self, id: &str) -> Result<ContainerStatus> {
        let status = self
            .runtime
            .clone()
            .container_status(cri::ContainerStatusRequest {
                container_id: id.to_owned(),
                verbose: false,
            })
            .await
            .map_err(Error::rpc("cri.ContainerStatus"))?
            .into_inner()
            .status
            .ok_or_else(|| Error::Unexpected {
                call: "cri.ContainerStatus",
                reason: "no status".into(),
            })?;
        let state = match cri::ContainerState::try_from(status.state) {
            Ok(cri::ContainerState::ContainerCreated) => ContainerState::Created,
            Ok(cri::ContainerState::ContainerRunning) => ContainerState::Running,
            Ok(cri::ContainerState::ContainerExited) => ContainerState::Exited(status.exit_code),
            _ => ContainerState::Unknown,
        };
        Ok(ContainerStatus {
            state,
            started_at: time_from_nanos(status.started_at),
            finished_at: time_from_nanos(status.finished_at),
            reason: status.reason,
            message: status.message,
        })
    }

    /// Removes `image` (a reference or an image ID) as a kubelet's image GC does; containerd
    /// then deletes its content and snapshots that nothing else uses. Removing an image that is
    /// not there succeeds.
    pub async fn remove_image(&self, image: &str) -> Result<()> {
        self.images
            .clone()
            .remove_image(cri::RemoveImageRequest {
                image: Some(self.image_spec(image)),
            })
            .await
            .map_err(Error::rpc("cri.RemoveImage"))?;
        Ok(())
    }

    /// `image` for this client's runtime handler.
    fn image_spec(&self, image: &str) -> cri::ImageSpec {
        cri::ImageSpec {
            image: image.to_owned(),
            runtime_handler: self.runtime_handler.clone(),
            ..Default::default()
        }
    }

    /// Stops and removes the pod and its containers.
    pub async fn remove_pod(&self, pod: &Pod) -> Result<()> {
        self.runtime
            .clone()
            .stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: pod.id.clone(),
            })
            .await
            .map_err(Error::rpc("cri.StopPodSandbox"))?;
        self.runtime
            .clone()
            .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: pod.id.clone(),
            })
            .await
            .map_err(Error::rpc("cri.RemovePodSandbox"))?;
        Ok(())
    }
}

/// CRI's nanoseconds since the epoch; 0 means "not yet".
fn time_from_nanos(nanos: i64) -> Option<SystemTime> {
    let nanos = u64::try_from(nanos).ok().filter(|n| *n > 0)?;
    Some(UNIX_EPOCH + Duration::from_nanos(nanos))
}

/// The message lines of a CRI log file (`TIMESTAMP STREAM TAG MESSAGE` per line; partial lines,
/// tag `P`, are joined with the next).
pub fn log_lines(log: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut partial = String::new();
    for line in log.lines() {
        let mut fields = line.splitn(4, ' ');
        let (Some(_time), Some(_stream), Some(tag)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        partial.push_str(fields.next().unwrap_or(""));
        if tag != "P" {
            lines.push(std::mem::take(&mut partial));
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cri_times_of_zero_are_not_yet() {
        assert_eq!(time_from_nanos(0), None);
        assert_eq!(time_from_nanos(-5), None);
        assert_eq!(
            time_from_nanos(1_500_000_000),
            Some(UNIX_EPOCH + Duration::from_millis(1500))
        );
    }

    #[test]
    fn cri_log_lines_are_unwrapped_and_partials_joined() {
        let log = "2024-01-01T00:00:00.1Z stdout F hello\n\
                   2024-01-01T00:00:00.2Z stderr P par\n\
                   2024-01-01T00:00:00.3Z stderr F tial\n\
                   2024-01-01T00:00:00.4Z stdout F \n";
        assert_eq!(log_lines(log), vec!["hello", "partial", ""]);
    }
}
