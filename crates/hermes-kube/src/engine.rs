//! The seam between the Kubernetes edge and whatever decides and builds: the adapter hands an
//! [`Engine`] the cluster as the core sees it ([`ClusterState`]) and gets statuses back
//! ([`Report`]); the engine resolves, queues and builds on its own tasks and says when it has
//! news ([`Engine::changed`]).
//!
//! [`IndexerEngine`] is the engine used until the controller crate's builder worker is wired
//! in: per wanted image it runs `hermes_oci::build_index` once (the store reuses zTOCs of
//! shared layers), with the pull credentials of the pods running it, and retries failures
//! after a delay. Deciding *which* images are wanted is the core's matcher.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hermes_controller::matcher::{Decision, RunningContainer, decide};
use hermes_controller::policy::{Mode, Policy};
use hermes_controller::reconcile::{
    Condition, ImageStatus, LayerState, LayerStatus, Phase, PolicyStatus,
};
use hermes_oci::{
    Client, ClientOptions, Credentials, Digest, IndexOptions, LayerOutcome, Reference, Store,
};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tracing::{info, warn};

/// What the cluster shows, for one pass.
#[derive(Debug, Clone, Default)]
pub struct ClusterState {
    /// Valid policies.
    pub policies: Vec<Policy>,
    /// Running containers.
    pub containers: Vec<RunningContainer>,
    /// Registry credentials from the pull secrets of the pods running each image, by the
    /// containers' digest (`imageID`). Only images some policy wants have an entry.
    pub credentials: BTreeMap<Digest, Credentials>,
}

/// What an engine reports after a pass.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// One status per running image a policy decides about (`HermesImage`s).
    pub images: Vec<ImageStatus>,
    /// One status per valid policy.
    pub policies: Vec<PolicyStatus>,
    /// Container digest (`imageID`) → the image status' digest, where they differ (an index
    /// digest resolved to its platform manifest). Used to find the pods of an image.
    pub resolved: BTreeMap<Digest, Digest>,
}

/// Decides about and builds running images (see the module docs).
pub trait Engine: Send + 'static {
    /// Take the cluster's state, start or stop work accordingly and report statuses.
    fn reconcile(&mut self, state: ClusterState) -> impl Future<Output = Report> + Send;
    /// Notified when work in progress changed something worth a new pass.
    fn changed(&self) -> Arc<Notify>;
    /// Stop all work (leadership lost, shutdown) and wait until no build runs any more.
    fn stop(&mut self) -> impl Future<Output = ()> + Send;
}

/// Settings of [`IndexerEngine`].
#[derive(Debug, Clone)]
pub struct IndexerOptions {
    /// Registries spoken to over plain HTTP (`host:port`), e.g. an in-cluster registry.
    pub plain_http: bool,
    /// How long a failed image waits before it is built again.
    pub retry_after: Duration,
    /// Images built at once.
    pub concurrency: usize,
}

impl Default for IndexerOptions {
    fn default() -> Self {
        Self {
            plain_http: false,
            retry_after: Duration::from_secs(60),
            concurrency: 2,
        }
    }
}

#[derive(Debug, Clone)]
enum Progress {
    Building,
    Done(Vec<LayerStatus>),
    Failed { error: String, at: Instant },
}

/// The interim engine (see the module docs).
#[derive(Debug)]
pub struct IndexerEngine {
    store: Store,
    options: IndexerOptions,
    progress: Arc<Mutex<BTreeMap<(Digest, u64), Progress>>>,
    tasks: JoinSet<()>,
    changed: Arc<Notify>,
}

impl IndexerEngine {
    /// An engine writing to `store`.
    pub fn new(store: Store, options: IndexerOptions) -> Self {
        Self {
            store,
            options,
            progress: Arc::default(),
            tasks: JoinSet::new(),
            changed: Arc::new(Notify::new()),
        }
    }

    fn start(&mut self, digest: Digest, reference: Reference, policy: &Policy, creds: Credentials) {
        let key = (digest.clone(), policy.span_size);
        if let Ok(mut p) = self.progress.lock() {
            p.insert(key.clone(), Progress::Building);
        }
        let client = Client::new(ClientOptions {
            plain_http: self.options.plain_http,
            credentials: creds,
            ..ClientOptions::default()
        });
        let options = IndexOptions {
            min_layer_size: policy.min_layer_size,
            span_size: policy.span_size,
            ..IndexOptions::default()
        };
        let (store, progress, changed) = (
            self.store.clone(),
            self.progress.clone(),
            self.changed.clone(),
        );
        let pinned = reference.with_digest(digest);
        self.tasks.spawn(async move {
            let result = match client {
                Ok(client) => hermes_oci::build_index(&client, &store, &pinned, &options, &|_| {})
                    .await
                    .map(|r| r.record),
                Err(e) => Err(e),
            };
            let outcome = match result {
                Ok(record) => {
                    info!(image = %pinned, "indexed");
                    Progress::Done(record.layers.iter().map(layer_status).collect())
                }
                Err(e) => {
                    let error = crate::error_chain(&e);
                    warn!(image = %pinned, %error, "index build failed");
                    Progress::Failed {
                        error,
                        at: Instant::now(),
                    }
                }
            };
            if let Ok(mut p) = progress.lock() {
                p.insert(key, outcome);
            }
            changed.notify_one();
        });
    }
}

fn layer_status(l: &hermes_oci::LayerRecord) -> LayerStatus {
    LayerStatus {
        digest: l.digest.clone(),
        size: l.size,
        state: match &l.outcome {
            LayerOutcome::Indexed { .. } => LayerState::Indexed,
            LayerOutcome::Skipped { reason } => LayerState::Skipped {
                reason: reason.clone(),
            },
        },
    }
}

impl Engine for IndexerEngine {
    async fn reconcile(&mut self, state: ClusterState) -> Report {
        while self.tasks.try_join_next().is_some() {}
        // Group running containers by digest; the most specific policy over all its pods wins.
        struct Group<'a> {
            reference: &'a Reference,
            pods: BTreeSet<(&'a str, &'a str)>,
            policy: Option<&'a Policy>,
            off: Option<&'a Policy>,
        }
        let mut sorted: Vec<&RunningContainer> = state.containers.iter().collect();
        sorted.sort_by(|a, b| (&a.namespace, &a.pod).cmp(&(&b.namespace, &b.pod)));
        let mut groups: BTreeMap<&Digest, Group<'_>> = BTreeMap::new();
        for c in sorted {
            let Some(digest) = &c.digest else { continue };
            let decision = decide(&state.policies, c);
            let g = groups.entry(digest).or_insert_with(|| Group {
                reference: &c.image,
                pods: BTreeSet::new(),
                policy: None,
                off: None,
            });
            match decision {
                Decision::Unmatched => continue,
                Decision::Off { policy } => g.off = g.off.or(Some(policy)),
                Decision::Apply { policy, .. } => g.policy = g.policy.or(Some(policy)),
            }
            g.pods.insert((&c.namespace, &c.pod));
        }
        let mut images = Vec::new();
        let mut starts = Vec::new();
        let progress = self.progress.lock().map(|p| p.clone()).unwrap_or_default();
        for (digest, g) in &groups {
            if g.pods.is_empty() {
                continue;
            }
            let pods = u32::try_from(g.pods.len()).unwrap_or(u32::MAX);
            let mut status = ImageStatus {
                digest: (*digest).clone(),
                reference: g.reference.to_string(),
                policy: String::new(),
                phase: Phase::Pending,
                reason: None,
                pods,
                layers: Vec::new(),
            };
            let Some(policy) = g.policy.filter(|p| p.mode != Mode::Off) else {
                let off = g.off.map_or("", |p| p.name.as_str());
                status.policy = off.to_owned();
                status.phase = Phase::Skipped;
                status.reason = Some(format!("policy {off} has mode Off"));
                images.push(status);
                continue;
            };
            status.policy = policy.name.clone();
            match progress.get(&((*digest).clone(), policy.span_size)) {
                None => {
                    status.reason = Some("queued".to_owned());
                    starts.push(((*digest).clone(), g.reference.clone(), policy.clone()));
                }
                Some(Progress::Building) => {
                    status.phase = Phase::Building;
                    status.reason = Some("indexing layers".to_owned());
                }
                Some(Progress::Done(layers)) => {
                    status.phase = Phase::Ready;
                    status.layers = layers.clone();
                }
                Some(Progress::Failed { error, at }) => {
                    if at.elapsed() >= self.options.retry_after {
                        status.phase = Phase::Pending;
                        status.reason = Some(format!("retrying after: {error}"));
                        starts.push(((*digest).clone(), g.reference.clone(), policy.clone()));
                    } else {
                        status.phase = Phase::Failed;
                        status.reason = Some(error.clone());
                    }
                }
            }
            images.push(status);
        }
        for (digest, reference, policy) in starts {
            if self.tasks.len() >= self.options.concurrency.max(1) {
                break;
            }
            let creds = state.credentials.get(&digest).cloned().unwrap_or_default();
            self.start(digest.clone(), reference, &policy, creds);
            if let Some(s) = images.iter_mut().find(|s| s.digest == digest) {
                s.phase = Phase::Building;
                s.reason = Some("indexing layers".to_owned());
            }
        }
        let policies = state
            .policies
            .iter()
            .map(|p| policy_status(p, &images))
            .collect();
        Report {
            images,
            policies,
            resolved: BTreeMap::new(),
        }
    }

    fn changed(&self) -> Arc<Notify> {
        self.changed.clone()
    }

    async fn stop(&mut self) {
        self.tasks.shutdown().await;
        if let Ok(mut p) = self.progress.lock() {
            p.retain(|_, v| !matches!(v, Progress::Building));
        }
    }
}

fn condition(kind: &str, ok: bool, reason: &str, message: String) -> Condition {
    Condition {
        kind: kind.to_owned(),
        status: if ok { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message,
    }
}

fn policy_status(p: &Policy, images: &[ImageStatus]) -> PolicyStatus {
    let mine: Vec<&ImageStatus> = images.iter().filter(|i| i.policy == p.name).collect();
    let count =
        |phase| u32::try_from(mine.iter().filter(|i| i.phase == phase).count()).unwrap_or(0);
    let matched = u32::try_from(mine.len()).unwrap_or(u32::MAX);
    let (ready, failed) = (count(Phase::Ready), count(Phase::Failed));
    let ready_condition = if p.mode == Mode::Off {
        condition(
            "Ready",
            true,
            "Off",
            format!("kill switch: {matched} running images not indexed"),
        )
    } else if failed > 0 {
        condition(
            "Ready",
            false,
            "BuildFailed",
            format!("{failed} of {matched} images failed to index"),
        )
    } else if ready < matched {
        condition(
            "Ready",
            false,
            "Indexing",
            format!("{ready} of {matched} images indexed"),
        )
    } else if matched == 0 {
        condition(
            "Ready",
            true,
            "NoRunningImages",
            "no running image matches".to_owned(),
        )
    } else {
        condition(
            "Ready",
            true,
            "Indexed",
            format!("all {matched} images indexed"),
        )
    };
    PolicyStatus {
        name: p.name.clone(),
        matched_images: matched,
        ready_images: ready,
        conditions: vec![
            condition("Valid", true, "Valid", "spec accepted".to_owned()),
            ready_condition,
        ],
    }
}
