//! The controller loop shared by the standalone and Kubernetes adapters: it feeds the
//! reconciler, carries out its actions with the [`Builder`] on background tasks, and publishes
//! statuses through a [`Publisher`] (the node API) and to the [`ReportBook`].
//!
//! An adapter gives the [`Engine`] its policies ([`Engine::set_policies`]) and running
//! containers ([`Engine::set_containers`]) whenever it learns of changes, and drives it with
//! [`Engine::run_for`]: each pass reconciles, then the engine waits for a task to finish, a
//! node's miss, a retry to fall due or the period to end. Everything else is here:
//!
//! - `Resolve` → a resolve task; a failure is retried with the queue's backoff and shows the
//!   image `Failed` with the reason meanwhile;
//! - `Enqueue`/`SetPods`/`Cancel` → the [`BuildQueue`]; its jobs → layer build tasks (at most
//!   `max_concurrent`), cancelled through a channel when no image wants them any more;
//! - `Finish` → record (and push) task, retried with backoff on failure;
//! - `CollectImage`/`CollectZtoc` → deletes in the store, then a periodic sweep of blobs
//!   nothing refers to.
//!
//! Nodes' misses (`POST /v1/misses`) count as running containers for `miss_ttl`, at most
//! `max_misses` of them ([`MissTable`]). A miss names an image on any host: only images a
//! policy selects ([`selects_miss`]) are resolved or kept, decided before any network I/O, and
//! at most [`MAX_MISS_RESOLVES`] misses are resolved at once. Refused misses are counted in
//! `hermes_controller_misses_refused_total` by reason.
//!
//! The engine keeps nothing durable of its own: the store and the report book are the state,
//! so a restarted engine resolves the running images again and builds only what is missing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use hermes_oci::{Digest, ImageRecord, LayerArtifact, Reference, ResolvedImage, Store};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::api::{BuildOutcome, Miss, MissRefusal};
use crate::builder::{Builder, LayerBuild, LayerResult, Resolved};
use crate::error::chain;
use crate::matcher::{RunningContainer, selects_miss};
use crate::mirror::Collected;
use crate::misses::{DEFAULT_MAX_MISSES, MissTable, Recorded};
use crate::policy::{DEFAULT_SPAN_SIZE, Policy};
use crate::publish::Publisher;
use crate::queue::{BuildQueue, JobId, LayerKey, QueueEvent, QueueOptions};
use crate::reconcile::{
    Action, GcMemory, ImageStatus, Inputs, ManifestInfo, Phase, PolicyStatus, ReconcileOptions,
    StoreContents, reconcile,
};
use crate::status::{PolicyReport, ReportBook};
use crate::{Error, Result};
use hermes_node_api::PodRef;

/// Timing and limits of the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineOptions {
    /// Build concurrency, attempts and backoff (also used for resolve and finish retries).
    pub queue: QueueOptions,
    /// Garbage collection grace and the retry of failed images.
    pub reconcile: ReconcileOptions,
    /// How often the store is rescanned and swept.
    pub sweep_every: Duration,
    /// Blobs nothing refers to are swept once this old (a build writes its blob first).
    pub sweep_min_age: Duration,
    /// How long a node's miss counts as a running container.
    pub miss_ttl: Duration,
    /// Most (image, node) misses counted at once; further ones are refused until some expire.
    pub max_misses: usize,
}

/// Most misses resolved (a manifest request to the registry) at once; further misses without a
/// digest are refused meanwhile (nodes report again on their next start).
pub const MAX_MISS_RESOLVES: usize = 8;

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            queue: QueueOptions::default(),
            reconcile: ReconcileOptions::default(),
            sweep_every: Duration::from_secs(300),
            sweep_min_age: Duration::from_secs(3600),
            miss_ttl: Duration::from_secs(3600),
            max_misses: DEFAULT_MAX_MISSES,
        }
    }
}

/// Work running on a background task.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Task {
    Resolve(Digest),
    Build(JobId, LayerKey),
    Finish(Digest),
    Miss(String, String),
}

impl Task {
    /// What the task does and to what, for its error if it panics.
    fn describe(&self) -> (&'static str, String) {
        match self {
            Task::Resolve(digest) => ("resolve", digest.to_string()),
            Task::Build(_, key) => ("index layer", key.digest.to_string()),
            Task::Finish(manifest) => ("finish image", manifest.to_string()),
            Task::Miss(image, node) => ("resolve the miss of", format!("{image} on node {node}")),
        }
    }
}

/// What a background task reports.
#[derive(Debug)]
enum Event {
    Resolved(Digest, Result<Box<Resolved>>),
    Built(JobId, LayerKey, LayerBuild),
    Finished(Digest, Result<ImageRecord>),
    MissResolved(String, String, Option<PodRef>, Result<Digest>),
}

/// A resolve or finish that failed: retried after the queue's backoff.
#[derive(Debug, Clone)]
struct EdgeFailure {
    failures: u32,
    not_before: SystemTime,
    error: String,
}

/// The controller loop (see the module docs).
#[derive(Debug)]
pub struct Engine {
    options: EngineOptions,
    builder: Builder,
    publisher: Box<dyn Publisher>,
    misses_rx: mpsc::Receiver<Miss>,
    misses_open: bool,
    book: ReportBook,
    queue: BuildQueue,
    gc: GcMemory,
    policies: Vec<Policy>,
    invalid: Vec<PolicyStatus>,
    policy_statuses: Vec<PolicyReport>,
    containers: Vec<RunningContainer>,
    misses: MissTable,
    /// Whether the last miss was refused because the table is full (warned about once).
    misses_full: bool,
    manifests: BTreeMap<Digest, ManifestInfo>,
    resolved: BTreeMap<Digest, Arc<ResolvedImage>>,
    contents: StoreContents,
    last_sweep: Option<Instant>,
    failures: BTreeMap<Task, EdgeFailure>,
    tasks: JoinSet<Event>,
    running: HashMap<tokio::task::Id, Task>,
    busy: BTreeSet<Task>,
    cancels: BTreeMap<JobId, oneshot::Sender<()>>,
    layer_seconds: BTreeMap<Digest, f64>,
}

fn store_err(
    action: &'static str,
    subject: impl ToString,
) -> impl FnOnce(hermes_oci::Error) -> Error {
    move |source| Error::Oci {
        action,
        subject: subject.to_string(),
        source: Box::new(source),
    }
}

/// What the store holds, as the reconciler needs it.
pub fn store_contents(store: &Store) -> Result<StoreContents> {
    let mut contents = StoreContents::default();
    for entry in store
        .layers()
        .map_err(store_err("list", store.root().display()))?
    {
        let key = LayerKey {
            digest: entry.layer,
            span_size: entry.span_size,
        };
        match entry.artifact {
            LayerArtifact::Ztoc(_) => {
                contents.ztocs.insert(key);
            }
            LayerArtifact::Unindexable(reason) => {
                contents.unindexable.insert(key, reason);
            }
        }
    }
    for record in store
        .images()
        .map_err(store_err("list", store.root().display()))?
    {
        contents
            .images
            .insert(record.manifest_digest.clone(), record);
    }
    Ok(contents)
}

impl Engine {
    /// An engine building into `builder`'s store, publishing to `publisher` (the node API,
    /// whose misses arrive on `misses`) and keeping reports in `book`. Reads the store once.
    pub fn new(
        options: EngineOptions,
        builder: Builder,
        publisher: impl Publisher + 'static,
        misses: mpsc::Receiver<Miss>,
        book: ReportBook,
    ) -> Result<Self> {
        let contents = store_contents(builder.store())?;
        publisher.images(book.reports().cloned().collect());
        Ok(Self {
            queue: BuildQueue::new(options.queue.clone()),
            builder,
            publisher: Box::new(publisher),
            misses_rx: misses,
            misses_open: true,
            book,
            gc: GcMemory::default(),
            policies: Vec::new(),
            invalid: Vec::new(),
            policy_statuses: Vec::new(),
            containers: Vec::new(),
            misses: MissTable::new(options.max_misses, options.miss_ttl),
            misses_full: false,
            manifests: BTreeMap::new(),
            resolved: BTreeMap::new(),
            contents,
            last_sweep: None,
            failures: BTreeMap::new(),
            tasks: JoinSet::new(),
            running: HashMap::new(),
            busy: BTreeSet::new(),
            cancels: BTreeMap::new(),
            layer_seconds: BTreeMap::new(),
            options,
        })
    }

    /// Replace the policies: the valid ones, and the statuses of those that failed validation.
    pub fn set_policies(&mut self, valid: Vec<Policy>, invalid: Vec<PolicyStatus>) {
        self.policies = valid;
        self.invalid = invalid;
        let mut spans: Vec<u64> = vec![DEFAULT_SPAN_SIZE];
        for p in &self.policies {
            if !spans.contains(&p.span_size) {
                spans.push(p.span_size);
            }
        }
        self.publisher.span_sizes(spans);
        self.publisher.active_policies(self.policies.clone());
    }

    /// Replace the running containers.
    pub fn set_containers(&mut self, containers: Vec<RunningContainer>) {
        self.containers = containers;
    }

    /// Use these registry credentials for resolves and builds started from now on.
    pub fn set_credentials(&mut self, credentials: hermes_oci::Credentials) -> Result<()> {
        self.builder = self.builder.with_credentials(credentials)?;
        Ok(())
    }

    /// The platform manifest a running container's digest (`imageID`) resolved to, if it has.
    pub fn manifest_of(&self, container_digest: &Digest) -> Option<&Digest> {
        self.manifests.get(container_digest).map(|m| &m.manifest)
    }

    /// Image reports, by digest.
    pub fn images(&self) -> impl Iterator<Item = &crate::status::ImageReport> {
        self.book.reports()
    }

    /// Count a pod's start of the image `manifest` (from a node's pull report) in its report,
    /// which the node API then shows.
    pub fn record_start(&mut self, manifest: &Digest, start: crate::starts::PodStart) {
        if let Err(e) = self.book.record_start(manifest, start) {
            warn!(error = %chain(&e), "cannot write image reports");
        }
        self.publisher
            .images(self.book.reports().cloned().collect());
    }

    /// Policy statuses (valid and invalid), by name, as of the last pass.
    pub fn policies(&self) -> &[PolicyReport] {
        &self.policy_statuses
    }

    /// The build queue.
    pub fn queue(&self) -> &BuildQueue {
        &self.queue
    }

    /// Reconcile, then handle events until `period` has passed (reconciling after each).
    pub async fn run_for(&mut self, period: Duration) {
        let deadline = tokio::time::Instant::now() + period;
        loop {
            self.reconcile_now();
            let wake = self
                .next_due()
                .and_then(|t| t.duration_since(SystemTime::now()).ok())
                .map_or(deadline, |d| {
                    // Past-due work is picked up by the pass right after waking.
                    (tokio::time::Instant::now() + d + Duration::from_millis(5)).min(deadline)
                });
            tokio::select! {
                joined = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    if let Some(joined) = joined {
                        self.joined(joined);
                    }
                }
                miss = self.misses_rx.recv(), if self.misses_open => match miss {
                    Some(miss) => self.on_miss(miss),
                    None => self.misses_open = false,
                },
                () = tokio::time::sleep_until(wake) => {
                    if tokio::time::Instant::now() >= deadline {
                        return;
                    }
                }
            }
        }
    }

    /// The earliest time a retry falls due.
    fn next_due(&self) -> Option<SystemTime> {
        self.failures
            .values()
            .map(|f| f.not_before)
            .chain(self.queue.next_retry())
            .min()
    }

    /// One reconcile pass and the actions it decides.
    pub fn reconcile_now(&mut self) {
        let now = SystemTime::now();
        self.maybe_sweep();
        self.misses.expire(now);
        let mut containers = self.containers.clone();
        containers.extend(self.misses.containers().cloned());
        // Manifests of images nobody runs any more are resolved again if they come back.
        let live: BTreeSet<&Digest> = containers
            .iter()
            .filter_map(|c| c.digest.as_ref())
            .collect();
        self.manifests.retain(|d, _| live.contains(d));
        let platform: BTreeSet<Digest> = self
            .manifests
            .values()
            .map(|m| m.manifest.clone())
            .collect();
        self.resolved.retain(|d, _| platform.contains(d));

        let outcome = reconcile(&Inputs {
            policies: &self.policies,
            containers: &containers,
            manifests: &self.manifests,
            store: &self.contents,
            queue: &self.queue,
            gc: &self.gc,
            options: &self.options.reconcile,
            now,
        });
        self.gc = outcome.gc;
        for action in outcome.actions {
            self.apply(action, now);
        }
        self.start_jobs(now);
        self.publish(outcome.images, outcome.policies, now);
    }

    fn due(&self, task: &Task, now: SystemTime) -> bool {
        !self.busy.contains(task) && self.failures.get(task).is_none_or(|f| f.not_before <= now)
    }

    fn apply(&mut self, action: Action, now: SystemTime) {
        match action {
            Action::Resolve { reference, digest } => {
                let task = Task::Resolve(digest.clone());
                if self.due(&task, now) {
                    let builder = self.builder.clone();
                    self.spawn(task, async move {
                        let result = builder.resolve(&reference, &digest).await.map(Box::new);
                        Event::Resolved(digest, result)
                    });
                }
            }
            Action::Enqueue(request) => {
                debug!(manifest = %request.manifest, layers = request.layers.len(), "queued");
                self.queue.enqueue(request);
            }
            Action::SetPods { manifest, pods } => self.queue.set_pods(&manifest, pods),
            Action::Finish {
                manifest,
                reference,
                policy,
            } => {
                let task = Task::Finish(manifest.clone());
                let (Some(image), Some(policy)) = (
                    self.resolved.get(&manifest).cloned(),
                    self.policies.iter().find(|p| p.name == policy).cloned(),
                ) else {
                    return;
                };
                if self.due(&task, now) {
                    let builder = self.builder.clone();
                    let seconds = self.layer_seconds.clone();
                    self.spawn(task, async move {
                        let result = builder.finish(&image, &reference, &policy, &seconds).await;
                        Event::Finished(manifest, result)
                    });
                }
            }
            Action::Cancel { manifest } => {
                info!(%manifest, "no policy wants the image any more: build cancelled");
                let events = self.queue.retain(|m| *m != manifest);
                self.queue_events(events);
            }
            Action::CollectImage { manifest } => {
                info!(%manifest, "collecting the record of an image nobody needs");
                let deleted = self.builder.store().delete_image(&manifest);
                match deleted {
                    Ok(()) => {
                        if let Some(mirror) = self.builder.mirror() {
                            mirror.forget_in_background(Collected::Image(manifest.clone()));
                        }
                        self.contents.images.remove(&manifest);
                        if let Err(e) = self.book.remove(&manifest) {
                            warn!(error = %chain(&e), "cannot delete an image report");
                        }
                    }
                    Err(e) => warn!(%manifest, error = %chain(&e), "cannot delete an image record"),
                }
            }
            Action::CollectZtoc { key } => {
                info!(layer = %key.digest, span_size = key.span_size, "collecting a zTOC nobody needs");
                match self
                    .builder
                    .store()
                    .delete_layer(&key.digest, key.span_size)
                {
                    Ok(()) => {
                        if let Some(mirror) = self.builder.mirror() {
                            mirror.forget_in_background(Collected::Layer(key.clone()));
                        }
                        self.contents.ztocs.remove(&key);
                        self.contents.unindexable.remove(&key);
                    }
                    Err(e) => {
                        warn!(layer = %key.digest, error = %chain(&e), "cannot delete a zTOC")
                    }
                }
            }
        }
    }

    fn spawn(
        &mut self,
        task: Task,
        work: impl std::future::Future<Output = Event> + Send + 'static,
    ) {
        let handle = self.tasks.spawn(work);
        self.running.insert(handle.id(), task.clone());
        self.busy.insert(task);
    }

    fn start_jobs(&mut self, now: SystemTime) {
        while let Some(job) = self.queue.next_job(now) {
            let media_type = self
                .manifests
                .values()
                .flat_map(|m| &m.layers)
                .find(|l| l.digest == job.key.digest)
                .map(|l| l.media_type.clone())
                .unwrap_or_default();
            let (cancel, cancelled) = oneshot::channel::<()>();
            self.cancels.insert(job.id, cancel);
            let builder = self.builder.clone();
            info!(layer = %job.key.digest, size = job.size, attempt = job.attempt, image = %job.reference, "building a zTOC");
            let (id, key) = (job.id, job.key.clone());
            self.spawn(Task::Build(id, key.clone()), async move {
                let build = tokio::select! {
                    build = builder.build_layer(&job.key, job.size, &media_type, &job.reference) => build,
                    _ = cancelled => LayerBuild {
                        result: Err(Error::Cancelled),
                        seconds: 0.0,
                        bytes_read: 0,
                    },
                };
                Event::Built(id, key, build)
            });
        }
    }

    fn joined(
        &mut self,
        joined: std::result::Result<(tokio::task::Id, Event), tokio::task::JoinError>,
    ) {
        let event = match joined {
            Ok((id, event)) => {
                if let Some(task) = self.running.remove(&id) {
                    self.busy.remove(&task);
                }
                event
            }
            Err(e) => {
                let Some(task) = self.running.remove(&e.id()) else {
                    return;
                };
                self.busy.remove(&task);
                let (action, subject) = task.describe();
                let failed = move || Error::Task {
                    action,
                    subject,
                    source: e,
                };
                match task.clone() {
                    Task::Resolve(d) => Event::Resolved(d, Err(failed())),
                    Task::Build(job, key) => Event::Built(
                        job,
                        key,
                        LayerBuild {
                            result: Err(failed()),
                            seconds: 0.0,
                            bytes_read: 0,
                        },
                    ),
                    Task::Finish(d) => Event::Finished(d, Err(failed())),
                    Task::Miss(image, node) => {
                        Event::MissResolved(image, node, None, Err(failed()))
                    }
                }
            }
        };
        self.on_event(event);
    }

    fn fail(&mut self, task: Task, error: String) {
        let failures = self.failures.get(&task).map_or(0, |f| f.failures) + 1;
        let wait = self.options.queue.backoff(failures);
        self.failures.insert(
            task,
            EdgeFailure {
                failures,
                not_before: SystemTime::now() + wait,
                error,
            },
        );
    }

    fn on_event(&mut self, event: Event) {
        let now = SystemTime::now();
        match event {
            Event::Resolved(digest, Ok(resolved)) => {
                debug!(%digest, manifest = %resolved.info.manifest, "resolved");
                self.failures.remove(&Task::Resolve(digest.clone()));
                self.resolved
                    .insert(resolved.info.manifest.clone(), Arc::new(resolved.image));
                self.manifests.insert(digest, resolved.info);
            }
            Event::Resolved(digest, Err(e)) => {
                let error = chain(&e);
                warn!(%digest, error, "cannot resolve a running image; retrying later");
                self.book.note_error(&digest, &error);
                self.fail(Task::Resolve(digest), error);
            }
            Event::Built(job, key, build) => self.on_built(job, key, build, now),
            Event::Finished(manifest, Ok(record)) => {
                self.failures.remove(&Task::Finish(manifest.clone()));
                self.contents.images.insert(manifest, record);
            }
            Event::Finished(manifest, Err(e)) => {
                let error = chain(&e);
                warn!(%manifest, error, "cannot finish an image; retrying later");
                self.book.note_error(&manifest, &error);
                self.fail(Task::Finish(manifest), error);
            }
            Event::MissResolved(image, node, pod, Ok(digest)) => {
                if let Ok(reference) = Reference::parse(&image) {
                    self.keep_miss(reference, &node, digest, pod.as_ref(), now);
                }
            }
            Event::MissResolved(image, node, _, Err(e)) => {
                warn!(image, node, error = %chain(&e), "cannot resolve an image a node reported");
            }
        }
    }

    fn on_built(&mut self, job: JobId, key: LayerKey, build: LayerBuild, now: SystemTime) {
        self.cancels.remove(&job);
        let (outcome, result) = match &build.result {
            Ok(LayerResult::Indexed { ztoc, reused }) => {
                info!(layer = %key.digest, %ztoc, reused, seconds = build.seconds, "zTOC stored");
                self.contents.ztocs.insert(key.clone());
                if !reused {
                    self.layer_seconds.insert(key.digest.clone(), build.seconds);
                }
                (BuildOutcome::Indexed, Ok(()))
            }
            Ok(LayerResult::Unindexable { reason }) => {
                info!(layer = %key.digest, reason, "layer cannot be indexed");
                self.contents
                    .unindexable
                    .insert(key.clone(), reason.clone());
                (BuildOutcome::Skipped, Ok(()))
            }
            Err(Error::Cancelled) => (BuildOutcome::Cancelled, Err("cancelled".to_owned())),
            Err(e) => {
                let error = chain(e);
                warn!(layer = %key.digest, error, "layer build failed");
                (BuildOutcome::Failed, Err(error))
            }
        };
        self.publisher
            .build_finished(outcome, build.seconds, build.bytes_read);
        self.book.record_layer(
            &key.digest,
            build.seconds,
            build.bytes_read,
            result
                .as_ref()
                .err()
                .map(String::as_str)
                .filter(|_| outcome == BuildOutcome::Failed),
        );
        let events = self.queue.finish(job, result, now);
        self.queue_events(events);
    }

    fn queue_events(&mut self, events: Vec<QueueEvent>) {
        for event in events {
            match event {
                QueueEvent::ImageDone { manifest } => debug!(%manifest, "all layers built"),
                QueueEvent::ImageFailed { manifest, failure } => {
                    warn!(%manifest, layer = %failure.layer, attempts = failure.attempts, error = failure.error, "image failed");
                    self.book.note_error(&manifest, &failure.error);
                }
                QueueEvent::CancelLayer { key, job } => {
                    debug!(layer = %key.digest, "cancelling a build");
                    if let Some(cancel) = self.cancels.remove(&job) {
                        let _ = cancel.send(());
                    }
                }
            }
        }
    }

    fn on_miss(&mut self, miss: Miss) {
        let node = miss.node.unwrap_or_default();
        let Ok(reference) = Reference::parse(&miss.image) else {
            return;
        };
        if let Some(digest) = miss.digest {
            self.keep_miss(
                reference,
                &node,
                digest,
                miss.pod.as_ref(),
                SystemTime::now(),
            );
            return;
        }
        // Before any request: a miss may name any host, and only what a policy selects is
        // fetched.
        if !selects_miss(&self.policies, &reference, None, miss.pod.as_ref()) {
            debug!(
                image = miss.image,
                node, "miss for an image no policy selects; ignored"
            );
            self.publisher.miss_refused(MissRefusal::Unselected);
            return;
        }
        let task = Task::Miss(miss.image.clone(), node.clone());
        if self.busy.contains(&task) {
            return;
        }
        let resolving = self
            .busy
            .iter()
            .filter(|t| matches!(t, Task::Miss(..)))
            .count();
        if resolving >= MAX_MISS_RESOLVES {
            debug!(
                image = miss.image,
                node, "too many misses being resolved; ignored"
            );
            self.publisher.miss_refused(MissRefusal::ResolvesBusy);
            return;
        }
        let builder = self.builder.clone();
        let (image, pod) = (miss.image, miss.pod);
        self.spawn(task, async move {
            let result = builder.digest_of(&reference).await;
            Event::MissResolved(image, node, pod, result)
        });
    }

    /// Count `node`'s miss of `image` as a running container, if a policy selects it and the
    /// table has room.
    fn keep_miss(
        &mut self,
        image: Reference,
        node: &str,
        digest: Digest,
        pod: Option<&PodRef>,
        now: SystemTime,
    ) {
        if !selects_miss(&self.policies, &image, Some(&digest), pod) {
            debug!(%image, node, "miss for an image no policy selects; ignored");
            self.publisher.miss_refused(MissRefusal::Unselected);
            return;
        }
        let full = self.misses.record(image, node, digest, pod, now) == Recorded::Full;
        if full {
            self.publisher.miss_refused(MissRefusal::TableFull);
            if !self.misses_full {
                warn!(
                    max_misses = self.options.max_misses,
                    "too many misses reported: further ones are not counted until older ones expire"
                );
            }
        }
        self.misses_full = full;
    }

    /// Statuses of unresolvable or unfinishable images say so; then reports, API, metrics.
    fn publish(
        &mut self,
        mut images: Vec<ImageStatus>,
        policies: Vec<PolicyStatus>,
        now: SystemTime,
    ) {
        for status in &mut images {
            let resolve = self.failures.get(&Task::Resolve(status.digest.clone()));
            let finish = self.failures.get(&Task::Finish(status.digest.clone()));
            let (what, failure) = match (resolve, finish) {
                (Some(f), _) if status.layers.is_empty() && status.phase == Phase::Pending => {
                    ("cannot resolve the manifest", f)
                }
                (_, Some(f)) if status.phase == Phase::Building => ("cannot finish the image", f),
                _ => continue,
            };
            // No countdown in the text: the report changes only when something happens.
            status.phase = Phase::Failed;
            status.reason = Some(format!(
                "{what} ({} attempts, retrying with backoff): {}",
                failure.failures, failure.error
            ));
        }
        let recorded: BTreeSet<Digest> = self.contents.images.keys().cloned().collect();
        match self.book.update(images, &recorded, now) {
            Ok(changes) => {
                for c in changes {
                    let from = c.from.map_or("new".to_owned(), |p| format!("{p:?}"));
                    match c.to {
                        Phase::Failed => {
                            warn!(image = c.reference, digest = %c.digest, from, reason = c.reason.as_deref().unwrap_or(""), "image Failed")
                        }
                        to => {
                            info!(image = c.reference, digest = %c.digest, from, to = ?to, reason = c.reason.as_deref().unwrap_or(""), "image phase")
                        }
                    }
                }
            }
            Err(e) => warn!(error = %chain(&e), "cannot write image reports"),
        }
        self.publisher
            .images(self.book.reports().cloned().collect());
        let mut reports: Vec<PolicyReport> = policies
            .into_iter()
            .chain(self.invalid.iter().cloned())
            .map(|status| PolicyReport {
                name: status.name.clone(),
                status,
            })
            .collect();
        reports.sort_by(|a, b| a.name.cmp(&b.name));
        self.publisher.policies(reports.clone());
        self.policy_statuses = reports;
        self.publisher.queue_depth(self.queue.image_count());
    }

    /// Every `sweep_every`: sweep the store of unreferenced blobs and temp files, and reread
    /// it (it may have been changed by others, e.g. `hermes index build`).
    fn maybe_sweep(&mut self) {
        if self
            .last_sweep
            .is_some_and(|t| t.elapsed() < self.options.sweep_every)
        {
            return;
        }
        self.last_sweep = Some(Instant::now());
        let store = self.builder.store();
        match store.sweep(self.options.sweep_min_age) {
            Ok(s) if s.blobs + s.temp_files > 0 => {
                info!(
                    blobs = s.blobs,
                    bytes = s.bytes,
                    temp_files = s.temp_files,
                    "store swept"
                );
            }
            Ok(_) => {}
            Err(e) => warn!(error = %chain(&e), "cannot sweep the store"),
        }
        match store_contents(store) {
            Ok(contents) => self.contents = contents,
            Err(e) => warn!(error = %chain(&e), "cannot read the store"),
        }
    }
}
