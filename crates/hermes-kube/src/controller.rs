//! The running adapter: leader election on a `coordination.k8s.io` Lease, and while leading,
//! watches of `HermesPolicy`, pods and namespaces feeding an [`Engine`], whose reports become
//! `HermesImage` objects, policy status conditions and pod Events.
//!
//! Only the leader watches, builds and writes: a replica that loses the lease (or is told to
//! shut down) stops its engine — every build task ended — before it does anything else, and a
//! replica shutting down releases the lease so another takes over at once instead of after the
//! lease expires.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use hermes_controller::matcher::{Decision, decide};
use hermes_controller::policy::Policy;
use hermes_controller::reconcile::PolicyStatus;
use hermes_oci::{Credentials, Digest};
use k8s_openapi::api::core::v1::{Namespace, ObjectReference, Pod, Secret, ServiceAccount};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use kube_lease_manager::LeaseManagerBuilder;
use serde_json::json;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tracing::{debug, info, instrument, warn};

use crate::crd::{
    HermesImage, HermesImageSpec, HermesImageStatus, HermesPolicy, image_object_name,
    managed_labels,
};
use crate::engine::{ClusterState, Engine, Report};
use crate::view::{self, PodContainers};
use crate::{Error, Result, status};

/// How the adapter runs.
#[derive(Debug, Clone)]
pub struct ControllerOptions {
    /// This replica's identity in the Lease (the pod name in a Deployment).
    pub identity: String,
    /// Namespace of the Lease.
    pub lease_namespace: String,
    /// Name of the Lease.
    pub lease_name: String,
    /// How long a lease is valid after its last renewal; a killed leader is replaced after this.
    pub lease_duration: Duration,
    /// How long before expiry the leader renews.
    pub lease_grace: Duration,
    /// A pass runs at least this often (retries and time-based decisions need no event).
    pub resync: Duration,
    /// Field manager for server-side apply.
    pub field_manager: String,
}

impl Default for ControllerOptions {
    fn default() -> Self {
        Self {
            identity: "hermes-controller".to_owned(),
            lease_namespace: "hermes-system".to_owned(),
            lease_name: "hermes-controller".to_owned(),
            lease_duration: Duration::from_secs(15),
            lease_grace: Duration::from_secs(5),
            resync: Duration::from_secs(30),
            field_manager: "hermes-controller".to_owned(),
        }
    }
}

/// Run until `shutdown` completes: elect, lead while elected, stop the engine and release the
/// lease at the end.
pub async fn run<E: Engine>(
    client: Client,
    mut engine: E,
    options: ControllerOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let lease_error = |source| Error::Lease {
        namespace: options.lease_namespace.clone(),
        name: options.lease_name.clone(),
        source: Box::new(source),
    };
    let manager = LeaseManagerBuilder::new(client.clone(), &options.lease_name)
        .with_namespace(&options.lease_namespace)
        .with_identity(&options.identity)
        .with_duration(options.lease_duration.as_secs().max(1))
        .with_grace(options.lease_grace.as_secs().max(1))
        .with_field_manager(format!("{}-lease", options.field_manager))
        .build()
        .await
        .map_err(lease_error)?;
    let (mut leader, lease_task) = manager.watch().await;
    tokio::pin!(shutdown);
    info!(identity = %options.identity, lease = %options.lease_name, "waiting for leadership");
    loop {
        if !*leader.borrow_and_update() {
            tokio::select! {
                () = &mut shutdown => break,
                changed = leader.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    continue;
                }
            }
        }
        info!(identity = %options.identity, "leading");
        let lost = async {
            while leader.changed().await.is_ok() {
                if !*leader.borrow_and_update() {
                    return;
                }
            }
        };
        let stop = tokio::select! {
            () = lead_forever(&client, &mut engine, &options) => false,
            () = lost => {
                warn!(identity = %options.identity, "lost leadership; stopping builds");
                false
            }
            () = &mut shutdown => true,
        };
        engine.stop().await;
        if stop {
            break;
        }
    }
    info!(identity = %options.identity, "shutting down; releasing the lease");
    engine.stop().await;
    drop(leader);
    match lease_task.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(lease_error(e)),
        Err(e) => {
            warn!(error = %e, "lease task ended abnormally");
            Ok(())
        }
    }
}

/// Lead until cancelled; an error (API unreachable, …) is logged and the leader starts over.
async fn lead_forever<E: Engine>(client: &Client, engine: &mut E, options: &ControllerOptions) {
    loop {
        if let Err(e) = lead(client, engine, options).await {
            warn!(error = %crate::error_chain(&e), "controller loop failed; restarting in 5 s");
            engine.stop().await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    }
}

/// Reflectors over the objects the adapter reads, and a notification on every change.
struct Watches {
    policies: Store<HermesPolicy>,
    pods: Store<Pod>,
    namespaces: Store<Namespace>,
    changed: Arc<Notify>,
    _tasks: JoinSet<()>,
}

fn reflect<K>(api: Api<K>, changed: Arc<Notify>, tasks: &mut JoinSet<()>) -> Store<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, watcher::Config::default()))
        .default_backoff()
        .touched_objects();
    tasks.spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            if let Err(e) = event {
                debug!(error = %e, "watch error (retried)");
            }
            changed.notify_one();
        }
    });
    reader
}

impl Watches {
    async fn start(client: &Client) -> Self {
        let changed = Arc::new(Notify::new());
        let mut tasks = JoinSet::new();
        let policies = reflect(Api::all(client.clone()), changed.clone(), &mut tasks);
        let pods = reflect(Api::all(client.clone()), changed.clone(), &mut tasks);
        let namespaces = reflect(Api::all(client.clone()), changed.clone(), &mut tasks);
        for ready in [
            policies.wait_until_ready().await,
            pods.wait_until_ready().await,
            namespaces.wait_until_ready().await,
        ] {
            if let Err(e) = ready {
                warn!(error = %e, "a watch ended before its first list");
            }
        }
        Self {
            policies,
            pods,
            namespaces,
            changed,
            _tasks: tasks,
        }
    }
}

#[instrument(skip_all, fields(identity = %options.identity))]
async fn lead<E: Engine>(
    client: &Client,
    engine: &mut E,
    options: &ControllerOptions,
) -> Result<()> {
    let watches = Watches::start(client).await;
    let mut writer = StatusWriter::start(client, options).await?;
    let mut secrets = PullSecrets::new(client.clone());
    let engine_changed = engine.changed();
    loop {
        let policy_objects = watches.policies.state();
        let mut valid = Vec::new();
        let mut invalid = Vec::new();
        for object in &policy_objects {
            match view::policy(object) {
                Ok(p) => valid.push(p),
                Err(e) => invalid.push(PolicyStatus::invalid(&object.name_any(), &e)),
            }
        }
        let pods = watches.pods.state();
        let pod_containers =
            view::cluster_containers(pods.iter().map(|p| p.as_ref()), &watches.namespaces.state());
        let credentials = secrets
            .for_wanted_images(&valid, &pod_containers, &pods)
            .await;
        // Events go to the pods a policy decides about, not every pod running the same image.
        let decided: Vec<PodContainers> = pod_containers
            .iter()
            .map(|pc| PodContainers {
                containers: pc
                    .containers
                    .iter()
                    .filter(|c| decide(&valid, c) != Decision::Unmatched)
                    .cloned()
                    .collect(),
                ..pc.clone()
            })
            .collect();
        let state = ClusterState {
            policies: valid,
            containers: pod_containers
                .iter()
                .flat_map(|p| p.containers.iter().cloned())
                .collect(),
            credentials,
        };
        let report = engine.reconcile(state).await;
        writer
            .write(&report, &invalid, &policy_objects, &decided)
            .await?;
        tokio::select! {
            () = watches.changed.notified() => {}
            () = engine_changed.notified() => {}
            () = tokio::time::sleep(options.resync) => {}
        }
        // Let a burst of watch events settle into one pass.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Registry credentials from pull secrets, read with `get` only (no list or watch of Secrets)
/// and only for pods whose images a policy wants; cached for a short while.
struct PullSecrets {
    client: Client,
    secrets: BTreeMap<(String, String), (Instant, Option<Credentials>)>,
    accounts: BTreeMap<(String, String), (Instant, Option<ServiceAccount>)>,
}

const SECRET_TTL: Duration = Duration::from_secs(30);

impl PullSecrets {
    fn new(client: Client) -> Self {
        Self {
            client,
            secrets: BTreeMap::new(),
            accounts: BTreeMap::new(),
        }
    }

    async fn account(&mut self, namespace: &str, name: &str) -> Option<ServiceAccount> {
        let key = (namespace.to_owned(), name.to_owned());
        if let Some((at, sa)) = self.accounts.get(&key)
            && at.elapsed() < SECRET_TTL
        {
            return sa.clone();
        }
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), namespace);
        let sa = match api.get_opt(name).await {
            Ok(sa) => sa,
            Err(e) => {
                warn!(namespace, name, error = %e, "cannot read service account for its pull secrets");
                None
            }
        };
        self.accounts.insert(key, (Instant::now(), sa.clone()));
        sa
    }

    async fn secret(&mut self, namespace: &str, name: &str) -> Option<Credentials> {
        let key = (namespace.to_owned(), name.to_owned());
        if let Some((at, creds)) = self.secrets.get(&key)
            && at.elapsed() < SECRET_TTL
        {
            return creds.clone();
        }
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let creds = match api.get_opt(name).await {
            Ok(Some(secret)) => {
                let source = format!("secret {namespace}/{name}");
                serde_json::to_vec(&secret).ok().and_then(
                    |json| match Credentials::from_pull_secret(&json, &source) {
                        Ok(c) => Some(c),
                        Err(e) => {
                            warn!(error = %e, "pull secret ignored");
                            None
                        }
                    },
                )
            }
            Ok(None) => {
                warn!(namespace, name, "pull secret not found");
                None
            }
            Err(e) => {
                warn!(namespace, name, error = %e, "cannot read pull secret");
                None
            }
        };
        self.secrets.insert(key, (Instant::now(), creds.clone()));
        creds
    }

    /// Credentials by container digest, from the pull secrets of the pods running images some
    /// policy wants (pods of one image: the first pod's secrets win per registry).
    async fn for_wanted_images(
        &mut self,
        policies: &[Policy],
        pods: &[PodContainers],
        objects: &[Arc<Pod>],
    ) -> BTreeMap<Digest, Credentials> {
        let by_name: BTreeMap<(String, String), &Pod> = objects
            .iter()
            .map(|p| {
                (
                    (p.namespace().unwrap_or_default(), p.name_any()),
                    p.as_ref(),
                )
            })
            .collect();
        let mut out: BTreeMap<Digest, Credentials> = BTreeMap::new();
        for pc in pods {
            let wanted: Vec<&Digest> = pc
                .containers
                .iter()
                .filter(|c| matches!(decide(policies, c), Decision::Apply { .. }))
                .filter_map(|c| c.digest.as_ref())
                .collect();
            if wanted.is_empty() {
                continue;
            }
            let Some(pod) = by_name.get(&(pc.namespace.clone(), pc.name.clone())) else {
                continue;
            };
            let account_name = view::service_account_name(pod);
            let account = self.account(&pc.namespace, &account_name).await;
            let mut creds = Credentials::none();
            for name in view::pull_secret_names(pod, account.as_ref()).iter().rev() {
                if let Some(c) = self.secret(&pc.namespace, name).await {
                    creds.merge(c);
                }
            }
            for digest in wanted {
                let entry = out.entry(digest.clone()).or_default();
                let mut merged = creds.clone();
                merged.merge(entry.clone());
                *entry = merged;
            }
        }
        out
    }
}

/// Writes what the engine reported, only what changed: `HermesImage` objects (created, updated,
/// deleted when no pod runs the image), policy statuses and pod Events.
struct StatusWriter {
    images: Api<HermesImage>,
    policies: Api<HermesPolicy>,
    recorder: Recorder,
    params: PatchParams,
    /// What the cluster holds, as last read or written.
    written: BTreeMap<String, (HermesImageSpec, Option<HermesImageStatus>)>,
}

fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .map_or_else(
            |_| k8s_openapi::jiff::Timestamp::now().to_string(),
            |t| t.to_string(),
        )
}

impl StatusWriter {
    async fn start(client: &Client, options: &ControllerOptions) -> Result<Self> {
        let images: Api<HermesImage> = Api::all(client.clone());
        let selector = managed_labels()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let existing = images
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(Error::kube("list HermesImages"))?;
        let written = existing
            .items
            .into_iter()
            .map(|i| (i.name_any(), (i.spec, i.status)))
            .collect();
        let reporter = Reporter {
            controller: options.field_manager.clone(),
            instance: Some(options.identity.clone()),
        };
        Ok(Self {
            images,
            policies: Api::all(client.clone()),
            recorder: Recorder::new(client.clone(), reporter),
            params: PatchParams::apply(&options.field_manager).force(),
            written,
        })
    }

    async fn write(
        &mut self,
        report: &Report,
        invalid: &[PolicyStatus],
        policy_objects: &[Arc<HermesPolicy>],
        pods: &[PodContainers],
    ) -> Result<()> {
        let now = now_rfc3339();
        // Pods by the image status digest they run.
        let mut pods_of: BTreeMap<&Digest, Vec<&PodContainers>> = BTreeMap::new();
        for pc in pods {
            for c in &pc.containers {
                let Some(d) = c.digest.as_ref() else { continue };
                let key = report.resolved.get(d).unwrap_or(d);
                let list = pods_of.entry(key).or_default();
                if !list.iter().any(|p| p.uid == pc.uid) {
                    list.push(pc);
                }
            }
        }
        let mut desired = Vec::new();
        for s in &report.images {
            let name = image_object_name(&s.digest.to_string());
            let previous = self.written.get(&name).and_then(|(_, st)| st.as_ref());
            let before = previous.map(|p| p.phase);
            let (spec, st) = status::image(s, previous, &now);
            self.apply_image(&name, &spec, &st).await?;
            if let Some((reason, warning, note)) = status::phase_event(before, &st, &spec) {
                for pc in pods_of.get(&s.digest).into_iter().flatten() {
                    self.pod_event(pc, reason, warning, &note, &name).await;
                }
            }
            desired.push(name);
        }
        let stale: Vec<String> = self
            .written
            .keys()
            .filter(|n| !desired.contains(n))
            .cloned()
            .collect();
        for name in stale {
            info!(image = %name, "no pod runs the image any more; deleting its HermesImage");
            match self.images.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(Error::kube(format!("delete HermesImage {name}"))(e)),
            }
            self.written.remove(&name);
        }
        let objects: BTreeMap<String, &HermesPolicy> = policy_objects
            .iter()
            .map(|p| (p.name_any(), p.as_ref()))
            .collect();
        for s in report.policies.iter().chain(invalid) {
            let Some(object) = objects.get(&s.name) else {
                continue;
            };
            let previous = object.status.as_ref();
            let new = status::policy(s, object.metadata.generation, previous, &now);
            if previous == Some(&new) {
                continue;
            }
            let patch = json!({
                "apiVersion": "hermes.dev/v1alpha1",
                "kind": "HermesPolicy",
                "status": new,
            });
            match self
                .policies
                .patch_status(&s.name, &self.params, &Patch::Apply(&patch))
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => {
                    return Err(Error::kube(format!("patch HermesPolicy {}/status", s.name))(e));
                }
            }
        }
        Ok(())
    }

    async fn apply_image(
        &mut self,
        name: &str,
        spec: &HermesImageSpec,
        st: &HermesImageStatus,
    ) -> Result<()> {
        let (old_spec, old_status) = match self.written.get(name) {
            Some((s, st)) => (Some(s), st.as_ref()),
            None => (None, None),
        };
        if old_spec != Some(spec) {
            let object = json!({
                "apiVersion": "hermes.dev/v1alpha1",
                "kind": "HermesImage",
                "metadata": {"name": name, "labels": managed_labels()},
                "spec": spec,
            });
            self.images
                .patch(name, &self.params, &Patch::Apply(&object))
                .await
                .map_err(Error::kube(format!("apply HermesImage {name}")))?;
        }
        if old_status != Some(st) {
            let patch = json!({
                "apiVersion": "hermes.dev/v1alpha1",
                "kind": "HermesImage",
                "status": st,
            });
            self.images
                .patch_status(name, &self.params, &Patch::Apply(&patch))
                .await
                .map_err(Error::kube(format!("patch HermesImage {name}/status")))?;
        }
        self.written
            .insert(name.to_owned(), (spec.clone(), Some(st.clone())));
        Ok(())
    }

    async fn pod_event(
        &self,
        pod: &PodContainers,
        reason: &str,
        warning: bool,
        note: &str,
        image_name: &str,
    ) {
        let reference = ObjectReference {
            api_version: Some("v1".to_owned()),
            kind: Some("Pod".to_owned()),
            name: Some(pod.name.clone()),
            namespace: Some(pod.namespace.clone()),
            uid: Some(pod.uid.clone()),
            ..ObjectReference::default()
        };
        let secondary = ObjectReference {
            api_version: Some(HermesImage::api_version(&()).into_owned()),
            kind: Some("HermesImage".to_owned()),
            name: Some(image_name.to_owned()),
            ..ObjectReference::default()
        };
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.to_owned(),
            note: Some(note.chars().take(1000).collect()),
            action: "IndexImage".to_owned(),
            secondary: Some(secondary),
        };
        if let Err(e) = self.recorder.publish(&event, &reference).await {
            warn!(pod = %pod.name, namespace = %pod.namespace, error = %e, "cannot publish pod event");
        }
    }
}
