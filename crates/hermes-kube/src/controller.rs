//! The running adapter: leader election on a `coordination.k8s.io` Lease, and while leading,
//! watches of `HermesPolicy`, pods and namespaces feeding the core's [`Engine`], whose reports
//! become `HermesImage` objects, policy status conditions and pod Events.
//!
//! Only the leader watches, builds and writes. Each term of leadership gets a fresh engine from
//! the [`EngineSetup`]; losing the lease (or shutting down) drops it, which aborts its
//! background tasks, so a replica that is no longer leader starts nothing new. A replica shutting
//! down releases the lease, so another takes over at once instead of after the lease expires.
//!
//! With a store repository ([`EngineSetup::mirror`], see `hermes_controller::mirror`) the
//! leader publishes what it builds; every replica that is not leading copies it into its own
//! store every [`EngineSetup::sync_every`] and once more before it starts leading, so a new
//! leader rebuilds nothing and every replica serves nodes the same zTOCs. Replicas that are
//! not leading also follow the HermesPolicy objects, so the node API they serve refuses images
//! an `Off` policy covers, as the leader's does.
//!
//! Pod starts: nodes report each pull (`POST /v1/pulls`) to whichever replica the Service picks;
//! only the leader takes them (the others answer 503 and the node retries), attributes each to
//! its pod (the one the node named, else the pods on the node that use the image and had no
//! start Event for it yet), publishes `HermesLazyStart`/`HermesFallback` on the pod and counts
//! it in the image's status. At most one start Event per pod and image: the pods that had one
//! are read from the cluster's Events when a term starts (so a new leader does not repeat
//! them, as long as the Events live), then kept in memory. A report no pod matches yet (the pod
//! watch lags) is retried for [`ATTRIBUTE_FOR`], then counted without a pod.
//!
//! Pull credentials: the pull secrets of the pods running images some policy wants (their own
//! `imagePullSecrets`, then their service account's) are read with `get` and merged by registry
//! (pods in namespace/name order; the first secret naming a registry wins) into the engine's
//! registry client. A cluster whose namespaces hold different credentials for one registry gets
//! the first one's for every image there.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use hermes_controller::api::{NodeApi, PullSink};
use hermes_controller::engine::Engine;
use hermes_controller::matcher::{Decision, decide};
use hermes_controller::policy::Policy;
use hermes_controller::reconcile::PolicyStatus;
use hermes_controller::starts::{PodCandidate, PodStart, attribute};
use hermes_controller::status::{ImageReport, PolicyReport};
use hermes_node_api::PullReport;
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

/// Run until `shutdown` completes: elect, lead while elected (with a new engine from `setup`
/// per term), follow while not, release the lease at the end.
pub async fn run(
    client: Client,
    setup: &EngineSetup,
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
                () = follow(&client, setup) => {}
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
            () = lead_forever(&client, setup, &options) => false,
            () = lost => {
                warn!(identity = %options.identity, "lost leadership; builds stopped");
                false
            }
            () = &mut shutdown => true,
        };
        if stop {
            break;
        }
    }
    info!(identity = %options.identity, "shutting down; releasing the lease");
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

/// Lead until cancelled; an error (API unreachable, …) is logged and the leader starts over
/// with a new engine.
async fn lead_forever(client: &Client, setup: &EngineSetup, options: &ControllerOptions) {
    loop {
        let result = match setup.engine().await {
            Ok(engine) => lead(client, engine, &setup.api, options).await,
            Err(e) => Err(Error::Engine(Box::new(e))),
        };
        if let Err(e) = result {
            warn!(error = %hermes_node_api::error_chain(&e), "controller loop failed; restarting in 5 s");
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    }
}

/// What a replica does while another leads: copy the store repository into its own store
/// every [`EngineSetup::sync_every`], and keep the node API's view of the policies and the
/// namespaces' labels current as they change (watches: a node asking this replica is told
/// what the leader would tell it). Never returns.
async fn follow(client: &Client, setup: &EngineSetup) {
    let changed = Arc::new(Notify::new());
    let mut tasks = JoinSet::new();
    let policies: Store<HermesPolicy> =
        reflect(Api::all(client.clone()), changed.clone(), &mut tasks);
    let namespaces: Store<Namespace> =
        reflect(Api::all(client.clone()), changed.clone(), &mut tasks);
    let mut next_sync = tokio::time::Instant::now();
    loop {
        if tokio::time::Instant::now() >= next_sync {
            if let Some(mirror) = &setup.mirror
                && let Err(e) = mirror.sync(&setup.store).await
            {
                warn!(error = %hermes_controller::chain(&e), "cannot copy the store repository; retrying");
            }
            next_sync = tokio::time::Instant::now() + setup.sync_every;
        }
        setup.api.set_active_policies(
            policies
                .state()
                .iter()
                .filter_map(|o| view::policy(o).ok())
                .collect(),
        );
        setup
            .api
            .set_namespace_labels(view::namespace_labels(&namespaces.state()));
        tokio::select! {
            () = changed.notified() => {}
            () = tokio::time::sleep_until(next_sync) => {}
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

/// How long the engine works between two status writes.
const WRITE_EVERY: Duration = Duration::from_millis(500);

/// Most pull reports waiting to be taken by the leader's loop; more are answered 503 (the node
/// retries, then gives up: reports are best effort).
const PULL_QUEUE: usize = 256;
/// How long a pull report waits for its pod to show up in the pod watch.
pub const ATTRIBUTE_FOR: Duration = Duration::from_secs(120);

/// Sends the node API's pull reports elsewhere again when a term of leadership ends.
struct LeadingSink(NodeApi);

impl Drop for LeadingSink {
    fn drop(&mut self) {
        self.0.set_pull_reports(PullSink::Elsewhere);
    }
}

#[instrument(skip_all, fields(identity = %options.identity))]
async fn lead(
    client: &Client,
    mut engine: Engine,
    api: &NodeApi,
    options: &ControllerOptions,
) -> Result<()> {
    let watches = Watches::start(client).await;
    let mut writer = StatusWriter::start(client, options).await?;
    let (pulls_tx, mut pulls) = tokio::sync::mpsc::channel(PULL_QUEUE);
    let mut starts = PodStarts::load(client).await;
    api.set_pull_reports(PullSink::To(pulls_tx));
    let _sink = LeadingSink(api.clone());
    let mut secrets = PullSecrets::new(client.clone());
    let mut last_sync = Instant::now();
    let mut dirty = true;
    loop {
        let policy_objects = watches.policies.state();
        let pods = watches.pods.state();
        if dirty {
            let mut valid = Vec::new();
            let mut invalid = Vec::new();
            for object in &policy_objects {
                match view::policy(object) {
                    Ok(p) => valid.push(p),
                    Err(e) => invalid.push(PolicyStatus::invalid(&object.name_any(), &e)),
                }
            }
            let namespaces = watches.namespaces.state();
            // For nodes that name the pod's namespace: selectors apply to their lookups.
            api.set_namespace_labels(view::namespace_labels(&namespaces));
            let pod_containers =
                view::cluster_containers(pods.iter().map(|p| p.as_ref()), &namespaces);
            if let Some(credentials) = secrets
                .for_wanted_images(&valid, &pod_containers, &pods)
                .await
            {
                engine
                    .set_credentials(credentials)
                    .map_err(|e| Error::Engine(Box::new(e)))?;
            }
            engine.set_containers(
                pod_containers
                    .iter()
                    .flat_map(|p| p.containers.iter().cloned())
                    .collect(),
            );
            // Events go to the pods a policy decides about, not every pod of the same image.
            writer.decided = pod_containers
                .into_iter()
                .map(|pc| PodContainers {
                    containers: pc
                        .containers
                        .iter()
                        .filter(|c| decide(&valid, c) != Decision::Unmatched)
                        .cloned()
                        .collect(),
                    ..pc
                })
                .collect();
            engine.set_policies(valid, invalid);
            dirty = false;
            last_sync = Instant::now();
        }
        // The engine reconciles first thing, then handles its background work until a watch
        // says the cluster changed or it is time to write statuses.
        tokio::select! {
            () = engine.run_for(WRITE_EVERY) => {}
            () = watches.changed.notified() => {
                dirty = true;
                // Let a burst of watch events settle into one pass.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Some(report) = pulls.recv() => starts.push(report),
        }
        starts.attribute(&mut engine, &writer, &pods).await;
        if last_sync.elapsed() >= options.resync {
            dirty = true;
        }
        let images: Vec<ImageReport> = engine.images().cloned().collect();
        writer
            .write(&engine, &images, engine.policies(), &policy_objects)
            .await?;
    }
}

/// Registry credentials from pull secrets, read with `get` only (no list or watch of Secrets)
/// and only for pods whose images a policy wants; cached for a short while.
/// (namespace, name) of an object.
type Key = (String, String);
/// A cached pull secret: when it was read, and its resourceVersion and credentials.
type CachedSecret = (Instant, Option<(String, Credentials)>);

struct PullSecrets {
    client: Client,
    secrets: BTreeMap<Key, CachedSecret>,
    accounts: BTreeMap<Key, (Instant, Option<ServiceAccount>)>,
    /// The secrets (namespace, name, resourceVersion) the engine's credentials came from.
    in_use: Vec<(String, String, String)>,
}

const SECRET_TTL: Duration = Duration::from_secs(30);

impl PullSecrets {
    fn new(client: Client) -> Self {
        Self {
            client,
            secrets: BTreeMap::new(),
            accounts: BTreeMap::new(),
            in_use: Vec::new(),
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

    /// A pull secret's resourceVersion and credentials.
    async fn secret(&mut self, namespace: &str, name: &str) -> Option<(String, Credentials)> {
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
                let version = secret.resource_version().unwrap_or_default();
                serde_json::to_vec(&secret).ok().and_then(
                    |json| match Credentials::from_pull_secret(&json, &source) {
                        Ok(c) => Some((version, c)),
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

    /// Credentials from the pull secrets of the pods running images some policy wants, merged
    /// by registry (see the module docs); `None` when the same secrets as last time apply.
    async fn for_wanted_images(
        &mut self,
        policies: &[Policy],
        pods: &[PodContainers],
        objects: &[Arc<Pod>],
    ) -> Option<Credentials> {
        let by_name: BTreeMap<(String, String), &Pod> = objects
            .iter()
            .map(|p| {
                (
                    (p.namespace().unwrap_or_default(), p.name_any()),
                    p.as_ref(),
                )
            })
            .collect();
        let mut sources: Vec<(String, String)> = Vec::new();
        for pc in pods {
            let wanted = pc
                .containers
                .iter()
                .any(|c| matches!(decide(policies, c), Decision::Apply { .. }));
            let Some(pod) = by_name.get(&(pc.namespace.clone(), pc.name.clone())) else {
                continue;
            };
            if !wanted {
                continue;
            }
            let account_name = view::service_account_name(pod);
            let account = self.account(&pc.namespace, &account_name).await;
            for name in view::pull_secret_names(pod, account.as_ref()) {
                let key = (pc.namespace.clone(), name);
                if !sources.contains(&key) {
                    sources.push(key);
                }
            }
        }
        let mut merged = Credentials::none();
        let mut in_use = Vec::new();
        // Later merges win: go backwards so the first source wins per registry.
        for (namespace, name) in sources.iter().rev() {
            if let Some((version, creds)) = self.secret(namespace, name).await {
                merged.merge(creds);
                in_use.push((namespace.clone(), name.clone(), version));
            }
        }
        in_use.sort();
        if in_use == self.in_use {
            return None;
        }
        info!(
            secrets = in_use.len(),
            "registry credentials from pull secrets changed"
        );
        self.in_use = in_use;
        Some(merged)
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
    /// Pods with the containers a policy decides about, as of the last input sync.
    decided: Vec<PodContainers>,
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
            decided: Vec::new(),
        })
    }

    async fn write(
        &mut self,
        engine: &Engine,
        images: &[ImageReport],
        policies: &[PolicyReport],
        policy_objects: &[Arc<HermesPolicy>],
    ) -> Result<()> {
        let now = now_rfc3339();
        // Pods by the digest of the image they run (resolved to its platform manifest).
        let mut pods_of: BTreeMap<Digest, Vec<PodContainers>> = BTreeMap::new();
        for pc in &self.decided {
            for c in &pc.containers {
                let Some(d) = c.digest.as_ref() else { continue };
                let key = engine.manifest_of(d).unwrap_or(d).clone();
                let list = pods_of.entry(key).or_default();
                if !list.iter().any(|p| p.uid == pc.uid) {
                    list.push(pc.clone());
                }
            }
        }
        let mut desired = Vec::new();
        for s in images {
            let name = image_object_name(&s.status.digest.to_string());
            let previous = self.written.get(&name).and_then(|(_, st)| st.as_ref());
            let before = previous.map(|p| p.phase);
            let (spec, st) = status::image(s, previous, &now);
            self.apply_image(&name, &spec, &st).await?;
            if let Some((reason, warning, note)) = status::phase_event(before, &st, &spec) {
                for pc in pods_of.get(&s.status.digest).into_iter().flatten() {
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
        for p in policies {
            let Some(object) = objects.get(&p.name) else {
                continue;
            };
            let previous = object.status.as_ref();
            let new = status::policy(&p.status, object.metadata.generation, previous, &now);
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
                .patch_status(&p.name, &self.params, &Patch::Apply(&patch))
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => {
                    return Err(Error::kube(format!("patch HermesPolicy {}/status", p.name))(e));
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
        let pod = (pod.namespace.as_str(), pod.name.as_str(), pod.uid.as_str());
        let event = (reason, warning, note, "IndexImage");
        self.publish(pod, event, Some(image_name)).await;
    }

    /// Publish `(reason, warning, note, action)` on the pod `(namespace, name, uid)`, naming
    /// the `HermesImage` `image_name` as the related object if given.
    async fn publish(
        &self,
        (namespace, name, uid): (&str, &str, &str),
        (reason, warning, note, action): (&str, bool, &str, &str),
        image_name: Option<&str>,
    ) {
        let reference = ObjectReference {
            api_version: Some("v1".to_owned()),
            kind: Some("Pod".to_owned()),
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            uid: Some(uid.to_owned()),
            ..ObjectReference::default()
        };
        let secondary = image_name.map(|image_name| ObjectReference {
            api_version: Some(HermesImage::api_version(&()).into_owned()),
            kind: Some("HermesImage".to_owned()),
            name: Some(image_name.to_owned()),
            ..ObjectReference::default()
        });
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.to_owned(),
            note: Some(note.chars().take(1000).collect()),
            action: action.to_owned(),
            secondary,
        };
        if let Err(e) = self.recorder.publish(&event, &reference).await {
            warn!(pod = %name, namespace = %namespace, error = %e, "cannot publish pod event");
        }
    }
}

/// Most pull reports waiting for their pod (older ones are counted without a pod).
const MAX_PENDING_PULLS: usize = 256;

/// Nodes' pull reports on their way to pod Events and image counters (see the module docs).
struct PodStarts {
    /// Reports not attributed yet, with when they came.
    pending: VecDeque<(Instant, PullReport)>,
    /// (pod uid, image key) of the pods that had a start Event for the image; the key is the
    /// `HermesImage` name, or the reference when the manifest is unknown.
    started: BTreeSet<(String, String)>,
}

impl PodStarts {
    /// The start Events the cluster holds, read once (a failure to read leaves the set empty:
    /// at worst a pod gets its Event again).
    async fn load(client: &Client) -> Self {
        let mut started = BTreeSet::new();
        let events: Api<k8s_openapi::api::events::v1::Event> = Api::all(client.clone());
        let mut params = ListParams::default().limit(500);
        loop {
            let page = match events.list(&params).await {
                Ok(page) => page,
                Err(e) => {
                    warn!(error = %e, "cannot list Events; pods may get a start Event again");
                    break;
                }
            };
            for e in &page.items {
                let is_start = matches!(
                    e.reason.as_deref(),
                    Some(status::REASON_LAZY_START | status::REASON_FALLBACK)
                );
                let uid = e.regarding.as_ref().and_then(|r| r.uid.clone());
                let image = e.related.as_ref().and_then(|r| r.name.clone());
                if is_start && let (Some(uid), Some(image)) = (uid, image) {
                    started.insert((uid, image));
                }
            }
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => params = params.continue_token(&token),
                None => break,
            }
        }
        Self {
            pending: VecDeque::new(),
            started,
        }
    }

    fn push(&mut self, report: PullReport) {
        if self.pending.len() >= MAX_PENDING_PULLS {
            self.pending.pop_front();
        }
        self.pending.push_back((Instant::now(), report));
    }

    /// Attribute what can be: Events on the pods, starts counted in the image reports.
    async fn attribute(&mut self, engine: &mut Engine, writer: &StatusWriter, pods: &[Arc<Pod>]) {
        if self.pending.is_empty() {
            return;
        }
        let candidates: Vec<PodCandidate> = pods
            .iter()
            .filter_map(|p| view::pod_candidate(p, |d| engine.manifest_of(d).unwrap_or(d).clone()))
            .collect();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        for (at, report) in std::mem::take(&mut self.pending) {
            let manifest = report.manifest.clone().or_else(|| {
                engine
                    .images()
                    .find(|r| r.status.reference == report.image)
                    .map(|r| r.status.digest.clone())
            });
            let image_name = manifest.as_ref().map(|m| image_object_name(m.as_str()));
            let key = image_name.clone().unwrap_or_else(|| report.image.clone());
            let found = attribute(&report, &candidates, |c| {
                self.started.contains(&(c.uid.clone(), key.clone()))
            });
            if found.is_empty() {
                if at.elapsed() < ATTRIBUTE_FOR {
                    self.pending.push_back((at, report));
                } else {
                    info!(
                        image = report.image,
                        node = report.node.as_deref().unwrap_or(""),
                        "no pod found for a pull report; counted without one"
                    );
                    if let Some(m) = &manifest {
                        engine.record_start(m, PodStart::new(&report, None, now));
                    }
                }
                continue;
            }
            let event = status::start_event(&report);
            for pod in found {
                if !self.started.insert((pod.uid.clone(), key.clone())) {
                    continue;
                }
                info!(pod = %pod.name, namespace = %pod.namespace, image = report.image,
                    node = report.node.as_deref().unwrap_or(""), "pod start reported");
                if let Some(m) = &manifest {
                    engine.record_start(m, PodStart::new(&report, Some(&pod), now));
                }
                if let Some((reason, warning, note)) = &event {
                    let who = (pod.namespace.as_str(), pod.name.as_str(), pod.uid.as_str());
                    let what = (*reason, *warning, note.as_str(), "PullImage");
                    writer.publish(who, what, image_name.as_deref()).await;
                }
            }
        }
    }
}

/// What an engine for one term of leadership is made of.
#[derive(Debug, Clone)]
pub struct EngineSetup {
    /// Engine timing and limits.
    pub options: hermes_controller::engine::EngineOptions,
    /// The artifact store.
    pub store: hermes_oci::Store,
    /// Where image reports are kept (`None`: in memory).
    pub reports: Option<std::path::PathBuf>,
    /// Registry client settings (credentials come from pull secrets later).
    pub client: hermes_oci::ClientOptions,
    /// The node API the engine publishes to (shared by every term).
    pub api: hermes_controller::api::NodeApi,
    /// The store repository the leader publishes to and every replica copies from.
    pub mirror: Option<hermes_controller::mirror::Mirror>,
    /// How often a replica that is not leading copies the store repository.
    pub sync_every: Duration,
}

impl EngineSetup {
    /// A new engine over the store, after copying what the store repository holds that the
    /// store lacks (a failure to copy fails the term: it is retried rather than rebuilding
    /// what another leader built). Nodes' misses are not fed to it: in a cluster the pod watch
    /// sees every running image.
    pub async fn engine(&self) -> hermes_controller::Result<Engine> {
        if let Some(mirror) = &self.mirror {
            mirror.sync(&self.store).await?;
        }
        let client = hermes_oci::Client::new(self.client.clone()).map_err(|source| {
            hermes_controller::Error::Oci {
                action: "configure a client for",
                subject: "registries".to_owned(),
                source: Box::new(source),
            }
        })?;
        let mut builder = hermes_controller::builder::Builder::new(
            client,
            self.store.clone(),
            hermes_oci::manifest::Platform::host(),
            hermes_ztoc::SOCI_BUILD_TOOL_IDENTIFIER.to_owned(),
        );
        if let Some(mirror) = &self.mirror {
            builder = builder.with_mirror(mirror.clone());
        }
        let book = match &self.reports {
            Some(dir) => hermes_controller::status::ReportBook::open(dir)?,
            None => hermes_controller::status::ReportBook::in_memory(),
        };
        let (_, misses) = tokio::sync::mpsc::channel(1);
        Engine::new(
            self.options.clone(),
            builder,
            self.api.clone(),
            misses,
            book,
        )
    }
}
