//! From cluster objects to the core's inputs, as plain functions: pods with running containers
//! become [`RunningContainer`]s (image as the pod spec names it, digest from the container
//! status' `imageID`), `HermesPolicy` objects become validated [`Policy`]s or an invalid status,
//! and a pod's pull secrets are named (its own `imagePullSecrets`, then its service account's).

use std::collections::BTreeMap;

use hermes_controller::matcher::RunningContainer;
use hermes_controller::policy::Policy;
use hermes_controller::selector::Labels;
use hermes_controller::starts::PodCandidate;
use hermes_oci::{Digest, Reference};
use k8s_openapi::api::core::v1::{ContainerStatus, Namespace, Pod, ServiceAccount};
use kube::ResourceExt;

use crate::crd::HermesPolicy;

/// A pod's running containers, with the pod's identity kept for Events and credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodContainers {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `metadata.uid`.
    pub uid: String,
    /// One entry per running container (init containers included while they run).
    pub containers: Vec<RunningContainer>,
}

/// The digest part of a container status' `imageID`: `docker.io/library/nginx@sha256:…`,
/// `docker-pullable://nginx@sha256:…` and a bare `sha256:…` repo digest all give `sha256:…`.
/// `None` when it names no manifest (empty, or not a sha256 digest).
pub fn image_id_digest(image_id: &str) -> Option<Digest> {
    let digest = image_id.rsplit('@').next().unwrap_or(image_id);
    if !image_id.contains('@') && !image_id.starts_with("sha256:") {
        return None;
    }
    Digest::parse(digest).ok()
}

/// The running containers of a pod. Containers whose image reference does not parse are left
/// out (the runtime accepted it, but the controller could not fetch it anyway); a container
/// whose `imageID` names no digest is kept with `digest: None` (the reconciler waits for it).
pub fn running_containers(pod: &Pod, namespace_labels: &Labels) -> PodContainers {
    let namespace = pod.namespace().unwrap_or_default();
    let name = pod.name_any();
    let spec_images: BTreeMap<&str, &str> = pod
        .spec
        .iter()
        .flat_map(|s| {
            s.containers
                .iter()
                .chain(s.init_containers.iter().flatten())
        })
        .filter_map(|c| Some((c.name.as_str(), c.image.as_deref()?)))
        .collect();
    let statuses: Vec<&ContainerStatus> = container_statuses(pod)
        .filter(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
        .collect();
    let containers = statuses
        .into_iter()
        .filter_map(|status| {
            let text = spec_images
                .get(status.name.as_str())
                .copied()
                .unwrap_or(status.image.as_str());
            let image = Reference::parse(text).ok()?;
            Some(RunningContainer {
                namespace: namespace.clone(),
                pod: name.clone(),
                namespace_labels: namespace_labels.clone(),
                pod_labels: pod.labels().clone(),
                image,
                digest: image_id_digest(&status.image_id),
            })
        })
        .collect();
    PodContainers {
        namespace,
        name,
        uid: pod.uid().unwrap_or_default(),
        containers,
    }
}

/// Each namespace's labels, by name.
pub fn namespace_labels(namespaces: &[std::sync::Arc<Namespace>]) -> BTreeMap<String, Labels> {
    namespaces
        .iter()
        .map(|ns| (ns.name_any(), ns.labels().clone()))
        .collect()
}

/// Running containers of every pod, with namespace labels looked up in `namespaces`.
pub fn cluster_containers<'a>(
    pods: impl IntoIterator<Item = &'a Pod>,
    namespaces: &[std::sync::Arc<Namespace>],
) -> Vec<PodContainers> {
    let labels = namespace_labels(namespaces);
    let empty = Labels::new();
    let mut out: Vec<PodContainers> = pods
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none() || has_running(p))
        .map(|p| {
            let ns = p.namespace().unwrap_or_default();
            running_containers(p, labels.get(&ns).unwrap_or(&empty))
        })
        .filter(|p| !p.containers.is_empty())
        .collect();
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    out
}

/// The statuses of a pod's containers, init containers last.
fn container_statuses(pod: &Pod) -> impl Iterator<Item = &ContainerStatus> {
    pod.status.iter().flat_map(|s| {
        s.container_statuses
            .iter()
            .flatten()
            .chain(s.init_container_statuses.iter().flatten())
    })
}

/// A pod as a pull's possible starter: its node (`spec.nodeName`), the images its containers
/// name and the digests they run (`imageID`, through `manifest_of` to the platform manifest).
/// `None` for a pod not scheduled yet.
pub fn pod_candidate(pod: &Pod, manifest_of: impl Fn(&Digest) -> Digest) -> Option<PodCandidate> {
    let spec = pod.spec.as_ref()?;
    let node = spec.node_name.clone().filter(|n| !n.is_empty())?;
    let images = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .filter_map(|c| Reference::parse(c.image.as_deref()?).ok())
        .collect();
    let digests = container_statuses(pod)
        .filter_map(|c| image_id_digest(&c.image_id))
        .map(|d| manifest_of(&d))
        .collect();
    Some(PodCandidate {
        namespace: pod.namespace().unwrap_or_default(),
        name: pod.name_any(),
        uid: pod.uid().unwrap_or_default(),
        node,
        images,
        digests,
    })
}

fn has_running(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .is_some_and(|c| {
            c.iter()
                .any(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
        })
}

/// Names of the Secrets whose registry credentials apply to a pod's images: the pod's own
/// `imagePullSecrets` first, then its service account's (the kubelet's order), deduplicated.
pub fn pull_secret_names(pod: &Pod, service_account: Option<&ServiceAccount>) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    let own = pod
        .spec
        .as_ref()
        .and_then(|s| s.image_pull_secrets.as_ref())
        .into_iter()
        .flatten();
    let from_sa = service_account
        .and_then(|sa| sa.image_pull_secrets.as_ref())
        .into_iter()
        .flatten();
    for reference in own.chain(from_sa) {
        if !reference.name.is_empty() && !names.contains(&reference.name) {
            names.push(reference.name.clone());
        }
    }
    names
}

/// The service account a pod runs as (`default` when unset).
pub fn service_account_name(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".to_owned())
}

/// A policy object as the core sees it: validated, or the error saying which field is wrong.
pub fn policy(object: &HermesPolicy) -> Result<Policy, hermes_controller::PolicyError> {
    Policy::from_spec(&object.name_any(), &object.spec.policy)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).unwrap()
    }

    /// The shape of a pod as the API server returns it once the kubelet reported its containers
    /// (fields trimmed to what the adapter reads).
    fn web_pod() -> Pod {
        pod(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "web-1", "namespace": "prod", "uid": "u1", "labels": {"app": "web"}},
            "spec": {
                "containers": [
                    {"name": "app", "image": "registry.test:5000/acme/web:v1"},
                    {"name": "sidecar", "image": "busybox"},
                    {"name": "waiting", "image": "registry.test:5000/acme/other:v2"}
                ],
                "initContainers": [{"name": "init", "image": "registry.test:5000/acme/init:v1"}],
                "imagePullSecrets": [{"name": "regcred"}, {"name": "shared"}],
                "serviceAccountName": "builder",
                "nodeName": "node-1"
            },
            "status": {
                "phase": "Running",
                "containerStatuses": [
                    {"name": "app", "image": "registry.test:5000/acme/web:v1", "ready": true, "restartCount": 0,
                     "imageID": "registry.test:5000/acme/web@sha256:1111111111111111111111111111111111111111111111111111111111111111",
                     "state": {"running": {"startedAt": "2024-01-01T00:00:00Z"}}},
                    {"name": "sidecar", "image": "docker.io/library/busybox:latest", "ready": true, "restartCount": 0,
                     "imageID": "docker-pullable://busybox@sha256:2222222222222222222222222222222222222222222222222222222222222222",
                     "state": {"running": {"startedAt": "2024-01-01T00:00:00Z"}}},
                    {"name": "waiting", "image": "registry.test:5000/acme/other:v2", "ready": false, "restartCount": 0,
                     "imageID": "",
                     "state": {"waiting": {"reason": "ContainerCreating"}}}
                ],
                "initContainerStatuses": [
                    {"name": "init", "image": "registry.test:5000/acme/init:v1", "ready": false, "restartCount": 0,
                     "imageID": "registry.test:5000/acme/init@sha256:3333333333333333333333333333333333333333333333333333333333333333",
                     "state": {"terminated": {"exitCode": 0}}}
                ]
            }
        }))
    }

    #[test]
    fn a_scheduled_pod_is_a_start_candidate_with_its_node_images_and_manifests() {
        let pod = web_pod();
        let manifest = Digest::of(b"platform manifest");
        let c = pod_candidate(&pod, |_| manifest.clone()).expect("scheduled");
        assert_eq!(c.node, "node-1");
        assert!(!c.images.is_empty());
        assert!(c.digests.iter().all(|d| *d == manifest) && !c.digests.is_empty());
        let mut unscheduled = pod.clone();
        unscheduled.spec.as_mut().unwrap().node_name = None;
        assert!(pod_candidate(&unscheduled, |d| d.clone()).is_none());
    }

    #[test]
    fn only_running_containers_count_with_their_image_id_digest() {
        let labels = Labels::from([("env".to_owned(), "prod".to_owned())]);
        let p = running_containers(&web_pod(), &labels);
        assert_eq!(
            (p.namespace.as_str(), p.name.as_str(), p.uid.as_str()),
            ("prod", "web-1", "u1")
        );
        let got: Vec<(String, Option<String>)> = p
            .containers
            .iter()
            .map(|c| {
                (
                    c.image.to_string(),
                    c.digest.as_ref().map(|d| d.to_string()),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "registry.test:5000/acme/web:v1".to_owned(),
                    Some(format!("sha256:{}", "1".repeat(64)))
                ),
                (
                    "docker.io/library/busybox:latest".to_owned(),
                    Some(format!("sha256:{}", "2".repeat(64)))
                ),
            ]
        );
        assert_eq!(p.containers[0].namespace_labels, labels);
        assert_eq!(p.containers[0].pod_labels["app"], "web");
    }

    #[test]
    fn image_ids_of_every_runtime_shape() {
        let d = format!("sha256:{}", "a".repeat(64));
        for id in [
            format!("docker.io/library/nginx@{d}"),
            format!("docker-pullable://nginx@{d}"),
            d.clone(),
        ] {
            assert_eq!(
                image_id_digest(&id).map(|x| x.to_string()),
                Some(d.clone()),
                "{id}"
            );
        }
        for id in ["", "nginx:1", "docker://sha256:zz", "x@md5:abc"] {
            assert_eq!(image_id_digest(id), None, "{id}");
        }
    }

    #[test]
    fn pull_secrets_pod_first_then_service_account() {
        let sa: ServiceAccount = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "builder", "namespace": "prod"},
            "imagePullSecrets": [{"name": "shared"}, {"name": "sa-cred"}]
        }))
        .unwrap();
        let p = web_pod();
        assert_eq!(service_account_name(&p), "builder");
        assert_eq!(
            pull_secret_names(&p, Some(&sa)),
            vec!["regcred", "shared", "sa-cred"]
        );
        assert_eq!(pull_secret_names(&p, None), vec!["regcred", "shared"]);
        let bare = pod(serde_json::json!({"metadata": {"name": "x"}, "spec": {"containers": []}}));
        assert_eq!(service_account_name(&bare), "default");
        assert!(pull_secret_names(&bare, None).is_empty());
    }

    #[test]
    fn terminating_pods_without_running_containers_are_left_out() {
        let mut p = web_pod();
        p.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        ));
        assert_eq!(cluster_containers([&p], &[]).len(), 1);
        if let Some(status) = p.status.as_mut() {
            status.container_statuses = None;
        }
        assert!(cluster_containers([&p], &[]).is_empty());
    }
}
