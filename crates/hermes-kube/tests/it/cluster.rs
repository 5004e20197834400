//! A test cluster: a real API server with the Hermes CRDs, and helpers to create what a kubelet
//! and users would (namespaces, pods with running containers, pull secrets) and to run
//! controller replicas.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use hermes_controller::api::NodeApi;
use hermes_controller::engine::EngineOptions;
use hermes_controller::queue::QueueOptions;
use hermes_controller::reconcile::ReconcileOptions;
use hermes_kube::controller::{self, ControllerOptions, EngineSetup};
use hermes_kube::crd::{HermesImage, HermesPolicy};
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, ServiceAccount};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::sync::oneshot;

use crate::apiserver::ApiServer;

pub const LEASE_NAMESPACE: &str = "hermes-system";
/// The controller's service account from deploy/kubernetes/rbac.yaml: replicas in these tests
/// run with exactly the rights the manifests give.
pub const CONTROLLER_USER: &str = "system:serviceaccount:hermes-system:hermes-controller";

pub struct Cluster {
    pub server: ApiServer,
    pub client: kube::Client,
}

impl Cluster {
    /// An API server with the CRDs installed and the controller's namespace created.
    pub async fn start() -> Cluster {
        let server = ApiServer::start();
        let client = server.client().await;
        server.install_crds(&client).await;
        let cluster = Cluster { server, client };
        cluster.namespace(LEASE_NAMESPACE, &[]).await;
        let rbac = crate::apiserver::repo_root().join("deploy/kubernetes/rbac.yaml");
        let (ok, out) = cluster
            .server
            .kubectl(&["apply", "-f", rbac.to_str().expect("utf-8 path")], None);
        assert!(ok, "apply deploy/kubernetes/rbac.yaml: {out}");
        cluster
    }

    /// A client with the controller's rights only.
    pub async fn controller_client(&self) -> kube::Client {
        crate::apiserver::client_from(&self.server.kubeconfig(), Some(CONTROLLER_USER)).await
    }

    pub async fn namespace(&self, name: &str, labels: &[(&str, &str)]) {
        let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        let ns: Namespace = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels}
        }))
        .unwrap();
        Api::<Namespace>::all(self.client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
    }

    /// Apply a HermesPolicy from YAML (what `kubectl apply` would send), returning the API's answer.
    pub async fn apply_policy(&self, yaml: &str) -> Result<HermesPolicy, kube::Error> {
        let object: serde_json::Value = serde_saphyr::from_str(yaml).expect("policy YAML");
        let name = object["metadata"]["name"]
            .as_str()
            .expect("name")
            .to_owned();
        Api::<HermesPolicy>::all(self.client.clone())
            .patch(
                &name,
                &PatchParams::apply("test").force(),
                &Patch::Apply(&object),
            )
            .await
    }

    /// A docker-config pull secret for `registry` and a service account listing it.
    pub async fn pull_secret(&self, ns: &str, name: &str, registry: &str, user: &str, pass: &str) {
        let config = json!({"auths": {registry: {"username": user, "password": pass}}});
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns},
            "type": "kubernetes.io/dockerconfigjson",
            "stringData": {".dockerconfigjson": config.to_string()}
        }))
        .unwrap();
        Api::<Secret>::namespaced(self.client.clone(), ns)
            .create(&PostParams::default(), &secret)
            .await
            .expect("create secret");
    }

    pub async fn service_account(&self, ns: &str, name: &str, pull_secrets: &[&str]) {
        let refs: Vec<_> = pull_secrets.iter().map(|n| json!({"name": n})).collect();
        let sa: ServiceAccount = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns},
            "imagePullSecrets": refs
        }))
        .unwrap();
        Api::<ServiceAccount>::namespaced(self.client.clone(), ns)
            .create(&PostParams::default(), &sa)
            .await
            .expect("create service account");
    }

    /// A pod running one container of `image`, whose status (as a kubelet would report it
    /// through the status subresource) says it runs with `image_id`.
    pub async fn running_pod(
        &self,
        ns: &str,
        name: &str,
        image: &str,
        image_id: &str,
        service_account: Option<&str>,
    ) -> Pod {
        let mut spec = json!({"containers": [{"name": "app", "image": image}]});
        if let Some(sa) = service_account {
            spec["serviceAccountName"] = json!(sa);
        }
        self.start_pod(ns, name, image, image_id, spec).await
    }

    /// Like [`Cluster::running_pod`], with the pod's own `imagePullSecrets`.
    pub async fn running_pod_with_pull_secret(
        &self,
        ns: &str,
        name: &str,
        image: &str,
        image_id: &str,
        pull_secret: &str,
    ) -> Pod {
        let spec = json!({
            "containers": [{"name": "app", "image": image}],
            "imagePullSecrets": [{"name": pull_secret}]
        });
        self.start_pod(ns, name, image, image_id, spec).await
    }

    async fn start_pod(
        &self,
        ns: &str,
        name: &str,
        image: &str,
        image_id: &str,
        spec: serde_json::Value,
    ) -> Pod {
        let api = Api::<Pod>::namespaced(self.client.clone(), ns);
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
            "spec": spec
        }))
        .unwrap();
        api.create(&PostParams::default(), &pod)
            .await
            .unwrap_or_else(|e| panic!("create pod {ns}/{name}: {e}"));
        let status = json!({"status": {
            "phase": "Running",
            "containerStatuses": [{
                "name": "app",
                "image": image,
                "imageID": image_id,
                "ready": true,
                "restartCount": 0,
                "started": true,
                "state": {"running": {"startedAt": "2024-01-01T00:00:00Z"}}
            }]
        }});
        api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .unwrap_or_else(|e| panic!("set status of pod {ns}/{name}: {e}"))
    }

    pub async fn image(&self, digest: &str) -> Option<HermesImage> {
        Api::<HermesImage>::all(self.client.clone())
            .get_opt(&digest.replace(':', "-"))
            .await
            .expect("get HermesImage")
    }

    /// Events about a pod (core/v1 view of events.k8s.io/v1 Events): (reason, message).
    pub async fn pod_events(&self, ns: &str, pod: &str) -> Vec<(String, String)> {
        let api = Api::<k8s_openapi::api::events::v1::Event>::namespaced(self.client.clone(), ns);
        api.list(&Default::default())
            .await
            .expect("list events")
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(pod))
            .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
            .collect()
    }

    pub async fn lease_holder(&self) -> Option<String> {
        let api = Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(
            self.client.clone(),
            LEASE_NAMESPACE,
        );
        api.get_opt("hermes-controller")
            .await
            .expect("get lease")
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity)
            .filter(|h| !h.is_empty())
    }
}

/// Options for a test replica: short lease and resync so the tests run in seconds.
pub fn replica_options(identity: String) -> ControllerOptions {
    ControllerOptions {
        identity,
        lease_namespace: LEASE_NAMESPACE.to_owned(),
        lease_duration: Duration::from_secs(4),
        lease_grace: Duration::from_secs(2),
        resync: Duration::from_secs(1),
        ..ControllerOptions::default()
    }
}

/// How a test replica builds: plain-HTTP registries, quick retries.
pub fn engine_setup(store_dir: &std::path::Path) -> EngineSetup {
    let store = hermes_oci::Store::open(store_dir).expect("store");
    let (misses, _) = tokio::sync::mpsc::channel(1);
    EngineSetup {
        options: EngineOptions {
            queue: QueueOptions {
                max_attempts: 2,
                backoff_base: Duration::from_millis(200),
                backoff_cap: Duration::from_secs(1),
                ..QueueOptions::default()
            },
            reconcile: ReconcileOptions {
                retry_failed_after: Duration::from_secs(2),
                ..ReconcileOptions::default()
            },
            ..EngineOptions::default()
        },
        api: NodeApi::new(store.clone(), None, vec![64 << 10], misses),
        store,
        reports: None,
        client: hermes_oci::ClientOptions {
            plain_http: true,
            retry: hermes_oci::RetryPolicy {
                max_attempts: 2,
                ..hermes_oci::RetryPolicy::default()
            },
            ..hermes_oci::ClientOptions::default()
        },
        mirror: None,
        sync_every: Duration::from_secs(1),
    }
}

/// A controller replica on the current runtime; stopped gracefully on `stop` (or drop).
pub struct Replica {
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<hermes_kube::Result<()>>>,
}

impl Replica {
    pub fn spawn(client: kube::Client, identity: &str, store_dir: &std::path::Path) -> Replica {
        let (tx, rx) = oneshot::channel::<()>();
        let identity_owned = identity.to_owned();
        let setup = engine_setup(store_dir);
        let task = tokio::spawn(async move {
            controller::run(
                client,
                &setup,
                replica_options(identity_owned),
                async move {
                    let _ = rx.await;
                },
            )
            .await
        });
        Replica {
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Graceful shutdown: stop builds, release the lease; the run's result.
    pub async fn stop(mut self) -> hermes_kube::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = self.task.take().expect("running");
        tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("replica stops within 20 s")
            .expect("replica task")
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Poll `check` every 100 ms until it returns `Some`, or panic with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
