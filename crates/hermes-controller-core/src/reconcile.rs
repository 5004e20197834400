//! The reconciler: a function from what the controller knows to what it should do.
//!
//! Inputs ([`Inputs`]): valid policies, running containers, the manifests resolved so far
//! (layer lists), the store's contents (zTOCs by layer and span size, image records), the
//! [`BuildQueue`], what the last pass remembered about unused artifacts ([`GcMemory`]) and the
//! time. Output ([`Outcome`]): [`Action`]s for the edges to carry out, a status per image (the
//! `HermesImage` content) and per policy, and the new [`GcMemory`].
//!
//! An image is wanted when a running container's image matches a policy whose mode is not
//! `Off`; a container's image is grouped by its platform manifest digest once resolved (so
//! `nginx:1` and `nginx@sha256:…` are one image), by the pod's `imageID` before. Artifacts no
//! wanted image needs are collected once they have been unneeded for the grace period.
//!
//! Deterministic: the same inputs give the same output, in the same order.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use hermes_oci_types::{Digest, ImageRecord, LayerOutcome, Reference};
use serde::{Deserialize, Serialize};

use crate::matcher::{Decision, RunningContainer, Specificity, decide};
use crate::policy::{Mode, Policy};
use crate::queue::{BuildQueue, ImageFailure, ImageRequest, LayerKey, LayerProgress, LayerSpec};

/// A resolved platform manifest, reduced to what the reconciler needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestInfo {
    /// The platform manifest digest (may differ from the pod's `imageID`, an index digest).
    pub manifest: Digest,
    /// Layers in image order.
    pub layers: Vec<LayerInfo>,
}

/// One layer of a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    /// Layer digest.
    pub digest: Digest,
    /// Compressed size.
    pub size: u64,
    /// Media type.
    pub media_type: String,
}

/// What the artifact store holds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StoreContents {
    /// zTOCs present.
    pub ztocs: BTreeSet<LayerKey>,
    /// Layers the builder found cannot be indexed (e.g. single-frame zstd), with the reason.
    pub unindexable: BTreeMap<LayerKey, String>,
    /// Image records by manifest digest.
    pub images: BTreeMap<Digest, ImageRecord>,
}

/// When artifacts were first seen unneeded; carried from one pass to the next.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcMemory {
    /// Image records.
    pub images_unused_since: BTreeMap<Digest, SystemTime>,
    /// zTOCs.
    pub ztocs_unused_since: BTreeMap<LayerKey, SystemTime>,
}

/// Timing of the reconciler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconcileOptions {
    /// How long an artifact stays after the last image that needed it went away.
    pub gc_grace: Duration,
    /// How long a failed image stays `Failed` before it is queued again.
    pub retry_failed_after: Duration,
}

impl Default for ReconcileOptions {
    fn default() -> Self {
        Self {
            gc_grace: Duration::from_secs(24 * 3600),
            retry_failed_after: Duration::from_secs(600),
        }
    }
}

/// Everything the reconciler looks at.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    /// Valid policies.
    pub policies: &'a [Policy],
    /// Running containers.
    pub containers: &'a [RunningContainer],
    /// Resolved manifests, keyed by the containers' resolved digest (`imageID`).
    pub manifests: &'a BTreeMap<Digest, ManifestInfo>,
    /// The store.
    pub store: &'a StoreContents,
    /// The build queue.
    pub queue: &'a BuildQueue,
    /// Memory from the previous pass.
    pub gc: &'a GcMemory,
    /// Timing.
    pub options: &'a ReconcileOptions,
    /// The time of this pass.
    pub now: SystemTime,
}

/// Something for the edges to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Fetch the manifest of a running image to learn its layers.
    Resolve {
        /// The image as a pod names it.
        reference: Reference,
        /// The digest it resolved to.
        digest: Digest,
    },
    /// Queue layers of an image for building ([`BuildQueue::enqueue`]).
    Enqueue(ImageRequest),
    /// Update a queued image's priority ([`BuildQueue::set_pods`]).
    SetPods {
        /// The image.
        manifest: Digest,
        /// Pods running it.
        pods: u32,
    },
    /// Every layer is indexed or skipped: write the image record (and push per the policy).
    Finish {
        /// The image.
        manifest: Digest,
        /// Its reference.
        reference: Reference,
        /// The policy wanting it.
        policy: String,
    },
    /// Drop an image from the queue; no policy wants it ([`BuildQueue::retain`]).
    Cancel {
        /// The image.
        manifest: Digest,
    },
    /// Delete an image record (and its SOCI index) from the store.
    CollectImage {
        /// The image.
        manifest: Digest,
    },
    /// Delete a zTOC from the store.
    CollectZtoc {
        /// The zTOC.
        key: LayerKey,
    },
}

/// Phase of an image (`HermesImage.status.phase`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Phase {
    /// Known but not built yet.
    Pending,
    /// Layers being built, or the record being written.
    Building,
    /// Every eligible layer has a zTOC and the record is written.
    Ready,
    /// A layer failed; retried after a while.
    Failed,
    /// Not indexed on purpose (`mode: Off`).
    Skipped,
}

/// One layer in an image status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "state")]
pub enum LayerState {
    /// A zTOC is stored.
    Indexed,
    /// Not indexed, and why.
    Skipped {
        /// Why.
        reason: String,
    },
    /// Needs a build, not queued yet.
    Pending,
    /// Queued.
    Queued,
    /// Being built.
    Building {
        /// Attempt number.
        attempt: u32,
    },
    /// Failed, waiting for the next attempt.
    Retrying {
        /// Failed attempts.
        failures: u32,
        /// The last error.
        last_error: String,
    },
    /// Failed for good (until the image is retried).
    Failed {
        /// The last error.
        reason: String,
    },
}

/// One layer in an image status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LayerStatus {
    /// Layer digest.
    pub digest: Digest,
    /// Compressed size.
    pub size: u64,
    /// Its state.
    #[serde(flatten)]
    pub state: LayerState,
}

/// Status of one image (one `HermesImage`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageStatus {
    /// The platform manifest digest once resolved, the pod's `imageID` before.
    pub digest: Digest,
    /// The image reference (of the first pod by namespace and name).
    pub reference: String,
    /// The policy deciding about it.
    pub policy: String,
    /// Phase.
    pub phase: Phase,
    /// Why it is in this phase (for everything but `Ready`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Running pods using it.
    pub pods: u32,
    /// Per layer, in image order (empty until resolved).
    pub layers: Vec<LayerStatus>,
}

/// A Kubernetes-style status condition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Valid` or `Ready`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `True` or `False`.
    pub status: String,
    /// A CamelCase reason.
    pub reason: String,
    /// For people.
    pub message: String,
}

impl Condition {
    fn new(kind: &str, ok: bool, reason: &str, message: String) -> Self {
        Self {
            kind: kind.to_owned(),
            status: if ok { "True" } else { "False" }.to_owned(),
            reason: reason.to_owned(),
            message,
        }
    }
}

/// Status of one policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    /// `metadata.name`.
    #[serde(skip)]
    pub name: String,
    /// Running images this policy decides about.
    pub matched_images: u32,
    /// Of those, how many are `Ready`.
    pub ready_images: u32,
    /// `Valid` and `Ready`.
    pub conditions: Vec<Condition>,
}

impl PolicyStatus {
    /// The status of a policy that failed validation: `Valid=False` with the error.
    pub fn invalid(name: &str, error: &dyn std::error::Error) -> Self {
        Self {
            name: name.to_owned(),
            matched_images: 0,
            ready_images: 0,
            conditions: vec![Condition::new(
                "Valid",
                false,
                "InvalidSpec",
                crate::error::chain(error),
            )],
        }
    }
}

/// What the reconciler decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Actions, in a stable order.
    pub actions: Vec<Action>,
    /// Image statuses, by digest.
    pub images: Vec<ImageStatus>,
    /// Policy statuses, by name.
    pub policies: Vec<PolicyStatus>,
    /// Memory for the next pass.
    pub gc: GcMemory,
}

/// Running containers of one image, and the policies they match.
struct Group<'a> {
    reference: &'a Reference,
    container_digest: &'a Digest,
    info: Option<&'a ManifestInfo>,
    pods: BTreeSet<(&'a str, &'a str)>,
    best: Option<((Specificity, std::cmp::Reverse<&'a str>), &'a Policy)>,
    off: Option<&'a Policy>,
}

fn is_tar(media_type: &str) -> bool {
    media_type.contains("tar")
}

/// Run one reconcile pass: group the running containers by image (`group_by_image`), plan
/// each image (`Pass::plan_image`), cancel builds no image wants, collect what has been
/// unused for `gc_grace` (`Pass::collect_garbage`), then sum up per policy.
pub fn reconcile(inputs: &Inputs<'_>) -> Outcome {
    let groups = group_by_image(inputs.policies, inputs.containers, inputs.manifests);
    let mut pass = Pass::default();
    for (digest, group) in &groups {
        pass.plan_image(inputs, digest, group);
    }
    pass.cancel_unwanted(inputs.queue);
    let gc = pass.collect_garbage(inputs);
    let policies = policy_statuses(inputs.policies, &pass.images);
    Outcome {
        actions: pass.actions,
        images: pass.images,
        policies,
        gc,
    }
}

/// The running containers some policy matches, by image (the platform manifest once resolved,
/// else the containers' digest), each with the most specific `Apply` policy and the first
/// `Off` one. Containers are visited by namespace and pod, so the reference kept is stable.
fn group_by_image<'a>(
    policies: &'a [Policy],
    containers: &'a [RunningContainer],
    manifests: &'a BTreeMap<Digest, ManifestInfo>,
) -> BTreeMap<Digest, Group<'a>> {
    let mut sorted: Vec<&RunningContainer> = containers.iter().collect();
    sorted.sort_by(|a, b| (&a.namespace, &a.pod).cmp(&(&b.namespace, &b.pod)));

    let mut groups: BTreeMap<Digest, Group<'_>> = BTreeMap::new();
    for c in sorted {
        let Some(digest) = &c.digest else { continue };
        let decision = decide(policies, c);
        if decision == Decision::Unmatched {
            continue;
        }
        let info = manifests.get(digest);
        let key = info.map_or(digest, |i| &i.manifest).clone();
        let group = groups.entry(key).or_insert_with(|| Group {
            reference: &c.image,
            container_digest: digest,
            info,
            pods: BTreeSet::new(),
            best: None,
            off: None,
        });
        group.pods.insert((&c.namespace, &c.pod));
        match decision {
            Decision::Apply {
                policy,
                specificity,
                ..
            } => {
                let rank = (specificity, std::cmp::Reverse(policy.name.as_str()));
                if group.best.is_none_or(|(r, _)| rank > r) {
                    group.best = Some((rank, policy));
                }
            }
            Decision::Off { policy } => {
                if group.off.is_none_or(|p| policy.name < p.name) {
                    group.off = Some(policy);
                }
            }
            Decision::Unmatched => {}
        }
    }
    groups
}

/// What one pass has decided so far.
#[derive(Default)]
struct Pass {
    actions: Vec<Action>,
    images: Vec<ImageStatus>,
    /// Images some policy wants indexed: their records and builds are kept.
    wanted_images: BTreeSet<Digest>,
    /// zTOCs those images need: kept.
    wanted_ztocs: BTreeSet<LayerKey>,
}

impl Pass {
    /// The status of one running image and what to do for it: skip it (`Off`), resolve its
    /// manifest, queue its missing layers, update its pod count, or write its record.
    fn plan_image(&mut self, inputs: &Inputs<'_>, digest: &Digest, group: &Group<'_>) {
        let pods = u32::try_from(group.pods.len()).unwrap_or(u32::MAX);
        let Some((_, policy)) = group.best else {
            let off = group.off.map_or("", |p| p.name.as_str());
            self.images.push(ImageStatus {
                digest: digest.clone(),
                reference: group.reference.to_string(),
                policy: off.to_owned(),
                phase: Phase::Skipped,
                reason: Some(format!("policy {off} has mode Off")),
                pods,
                layers: Vec::new(),
            });
            return;
        };
        self.wanted_images.insert(digest.clone());
        let mut status = ImageStatus {
            digest: digest.clone(),
            reference: group.reference.to_string(),
            policy: policy.name.clone(),
            phase: Phase::Pending,
            reason: None,
            pods,
            layers: Vec::new(),
        };
        let Some(info) = group.info else {
            self.actions.push(Action::Resolve {
                reference: group.reference.clone(),
                digest: group.container_digest.clone(),
            });
            status.reason = Some("resolving the manifest".to_owned());
            self.images.push(status);
            return;
        };
        let record = inputs
            .store
            .images
            .get(digest)
            .filter(|r| r.span_size == policy.span_size);
        let failure = inputs.queue.failure(digest);
        let failure_current =
            failure.filter(|f| inputs.now < f.at + inputs.options.retry_failed_after);
        let mut missing = Vec::new();
        for layer in &info.layers {
            let state =
                self.layer_state(inputs, policy, record, failure_current, layer, &mut missing);
            status.layers.push(LayerStatus {
                digest: layer.digest.clone(),
                size: layer.size,
                state,
            });
        }
        if let Some(progress) = inputs.queue.image(digest) {
            status.phase = Phase::Building;
            if progress.pods != pods {
                self.actions.push(Action::SetPods {
                    manifest: digest.clone(),
                    pods,
                });
            }
        } else if let Some(f) = failure_current {
            status.phase = Phase::Failed;
            status.reason = Some(format!(
                "layer {} failed after {} attempts: {}",
                f.layer, f.attempts, f.error
            ));
        } else if !missing.is_empty() {
            status.reason = Some(match failure {
                Some(f) => format!("retrying after: {}", f.error),
                None => format!("{} layers to index", missing.len()),
            });
            self.actions.push(Action::Enqueue(ImageRequest {
                manifest: digest.clone(),
                reference: group.reference.clone(),
                policy: policy.name.clone(),
                span_size: policy.span_size,
                layers: missing,
                pods,
            }));
        } else if record.is_some() {
            status.phase = Phase::Ready;
        } else {
            status.phase = Phase::Building;
            status.reason = Some("writing the image record".to_owned());
            self.actions.push(Action::Finish {
                manifest: digest.clone(),
                reference: group.reference.clone(),
                policy: policy.name.clone(),
            });
        }
        self.images.push(status);
    }

    /// Where one layer of an image stands: skipped (not tar, too small, unindexable), indexed,
    /// in the queue, or missing (added to `missing`, `Failed` if the image's current failure
    /// is this layer's). Every layer that has or needs a zTOC is wanted.
    fn layer_state(
        &mut self,
        inputs: &Inputs<'_>,
        policy: &Policy,
        record: Option<&ImageRecord>,
        failure_current: Option<&ImageFailure>,
        layer: &LayerInfo,
        missing: &mut Vec<LayerSpec>,
    ) -> LayerState {
        let key = LayerKey {
            digest: layer.digest.clone(),
            span_size: policy.span_size,
        };
        let recorded_skip = record.and_then(|r| {
            r.layers.iter().find_map(|l| match &l.outcome {
                LayerOutcome::Skipped { reason } if l.digest == layer.digest => {
                    Some(reason.clone())
                }
                _ => None,
            })
        });
        if !is_tar(&layer.media_type) {
            LayerState::Skipped {
                reason: format!("media type {} is not a tar layer", layer.media_type),
            }
        } else if layer.size < policy.min_layer_size {
            LayerState::Skipped {
                reason: format!(
                    "{} bytes is below minLayerSize ({})",
                    layer.size, policy.min_layer_size
                ),
            }
        } else if let Some(reason) = inputs
            .store
            .unindexable
            .get(&key)
            .cloned()
            .or(recorded_skip)
        {
            LayerState::Skipped { reason }
        } else if inputs.store.ztocs.contains(&key) {
            self.wanted_ztocs.insert(key);
            LayerState::Indexed
        } else {
            self.wanted_ztocs.insert(key.clone());
            match inputs.queue.layer(&key) {
                Some(LayerProgress::Queued | LayerProgress::Cancelling) => LayerState::Queued,
                Some(LayerProgress::Building { attempt }) => LayerState::Building { attempt },
                Some(LayerProgress::Retrying {
                    failures,
                    last_error,
                    ..
                }) => LayerState::Retrying {
                    failures,
                    last_error,
                },
                None => {
                    missing.push(LayerSpec {
                        digest: layer.digest.clone(),
                        size: layer.size,
                    });
                    match failure_current {
                        Some(f) if f.layer == layer.digest => LayerState::Failed {
                            reason: f.error.clone(),
                        },
                        _ => LayerState::Pending,
                    }
                }
            }
        }
    }

    /// Cancel the queued builds of images no policy wants any more.
    fn cancel_unwanted(&mut self, queue: &BuildQueue) {
        for manifest in queue.images() {
            if !self.wanted_images.contains(manifest) {
                self.actions.push(Action::Cancel {
                    manifest: manifest.clone(),
                });
            }
        }
    }

    /// Collect image records and zTOCs unused for `gc_grace` (a zTOC a kept record names is
    /// kept too); remember since when the others are unused, for the next pass.
    fn collect_garbage(&mut self, inputs: &Inputs<'_>) -> GcMemory {
        let Inputs {
            store,
            gc,
            options,
            now,
            ..
        } = *inputs;
        let mut new_gc = GcMemory::default();
        let expired =
            |since: SystemTime| now.duration_since(since).unwrap_or_default() >= options.gc_grace;
        let mut kept_record_ztocs = BTreeSet::new();
        for (manifest, record) in &store.images {
            if self.wanted_images.contains(manifest) {
                continue;
            }
            let since = gc.images_unused_since.get(manifest).copied().unwrap_or(now);
            if expired(since) {
                self.actions.push(Action::CollectImage {
                    manifest: manifest.clone(),
                });
            } else {
                new_gc.images_unused_since.insert(manifest.clone(), since);
                kept_record_ztocs.extend(
                    record
                        .layers
                        .iter()
                        .filter(|l| matches!(l.outcome, LayerOutcome::Indexed { .. }))
                        .map(|l| LayerKey {
                            digest: l.digest.clone(),
                            span_size: record.span_size,
                        }),
                );
            }
        }
        for key in &store.ztocs {
            if self.wanted_ztocs.contains(key) {
                continue;
            }
            let since = gc.ztocs_unused_since.get(key).copied().unwrap_or(now);
            if expired(since) && !kept_record_ztocs.contains(key) {
                self.actions.push(Action::CollectZtoc { key: key.clone() });
            } else {
                new_gc.ztocs_unused_since.insert(key.clone(), since);
            }
        }
        new_gc
    }
}

fn policy_statuses(policies: &[Policy], images: &[ImageStatus]) -> Vec<PolicyStatus> {
    let mut out: Vec<PolicyStatus> = policies
        .iter()
        .map(|p| {
            let mine: Vec<&ImageStatus> = images.iter().filter(|i| i.policy == p.name).collect();
            let matched = u32::try_from(mine.len()).unwrap_or(u32::MAX);
            let count = |phase| {
                u32::try_from(mine.iter().filter(|i| i.phase == phase).count()).unwrap_or(u32::MAX)
            };
            let (ready, failed) = (count(Phase::Ready), count(Phase::Failed));
            let ready_condition = if p.mode == Mode::Off {
                Condition::new(
                    "Ready",
                    true,
                    "Off",
                    format!("kill switch: {matched} running images not indexed"),
                )
            } else if failed > 0 {
                Condition::new(
                    "Ready",
                    false,
                    "BuildFailed",
                    format!("{failed} of {matched} images failed to index"),
                )
            } else if ready < matched {
                Condition::new(
                    "Ready",
                    false,
                    "Indexing",
                    format!("{ready} of {matched} images indexed"),
                )
            } else if matched == 0 {
                Condition::new(
                    "Ready",
                    true,
                    "NoRunningImages",
                    "no running image matches".to_owned(),
                )
            } else {
                Condition::new(
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
                    Condition::new("Valid", true, "Valid", "spec accepted".to_owned()),
                    ready_condition,
                ],
            }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matcher::tests::{container, policies};
    use crate::queue::tests::{at, digest};
    use crate::queue::{QueueEvent, QueueOptions};
    use hermes_oci_types::LayerRecord;

    const TAR_GZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    const MIB: u64 = 1 << 20;
    const SPAN: u64 = crate::policy::DEFAULT_SPAN_SIZE;

    fn d(n: u8) -> String {
        digest(n).to_string()
    }

    fn key(n: u8) -> LayerKey {
        LayerKey {
            digest: digest(n),
            span_size: SPAN,
        }
    }

    fn info(manifest: u8, layers: &[(u8, u64, &str)]) -> ManifestInfo {
        ManifestInfo {
            manifest: digest(manifest),
            layers: layers
                .iter()
                .map(|&(l, size, media_type)| LayerInfo {
                    digest: digest(l),
                    size,
                    media_type: media_type.to_owned(),
                })
                .collect(),
        }
    }

    fn record(manifest: u8, layers: &[u8]) -> ImageRecord {
        ImageRecord {
            reference: "registry.test/app:v1".to_owned(),
            aliases: Vec::new(),
            manifest_digest: digest(manifest),
            platform: None,
            span_size: SPAN,
            layers: layers
                .iter()
                .map(|&l| LayerRecord {
                    digest: digest(l),
                    media_type: TAR_GZ.to_owned(),
                    size: 20 * MIB,
                    outcome: LayerOutcome::Indexed {
                        ztoc: digest(200 + l),
                        ztoc_size: 1,
                        spans: 1,
                        entries: 1,
                        seconds: 0.0,
                        reused: false,
                        soci_compatible: true,
                        span_size: 1 << 20,
                    },
                })
                .collect(),
            soci_index: None,
            built_at_unix: 0,
        }
    }

    /// The world of one test: inputs kept by value, reconciled at a given time.
    struct World {
        policies: Vec<Policy>,
        containers: Vec<RunningContainer>,
        manifests: BTreeMap<Digest, ManifestInfo>,
        store: StoreContents,
        queue: BuildQueue,
        gc: GcMemory,
        options: ReconcileOptions,
    }

    impl World {
        fn new(policy_specs: &[(&str, &str)]) -> Self {
            Self {
                policies: policies(policy_specs),
                containers: Vec::new(),
                manifests: BTreeMap::new(),
                store: StoreContents::default(),
                queue: BuildQueue::new(QueueOptions {
                    max_concurrent: 4,
                    max_attempts: 1,
                    ..QueueOptions::default()
                }),
                gc: GcMemory::default(),
                options: ReconcileOptions {
                    gc_grace: Duration::from_secs(100),
                    retry_failed_after: Duration::from_secs(50),
                },
            }
        }

        fn run(&mut self, pod: &str, ns: &str, image: &str, resolved: u8) {
            self.containers
                .push(container(ns, pod, image, Some(&d(resolved))));
        }

        fn reconcile(&mut self, now: u64) -> Outcome {
            let out = reconcile(&Inputs {
                policies: &self.policies,
                containers: &self.containers,
                manifests: &self.manifests,
                store: &self.store,
                queue: &self.queue,
                gc: &self.gc,
                options: &self.options,
                now: at(now),
            });
            self.gc = out.gc.clone();
            out
        }

        /// Carry out queue actions, as the edge would.
        fn apply(&mut self, out: &Outcome) {
            for a in &out.actions {
                match a {
                    Action::Enqueue(r) => {
                        self.queue.enqueue(r.clone());
                    }
                    Action::SetPods { manifest, pods } => self.queue.set_pods(manifest, *pods),
                    Action::Cancel { manifest } => {
                        let m = manifest.clone();
                        self.queue.retain(|x| *x != m);
                    }
                    _ => {}
                }
            }
        }
    }

    fn image(out: &Outcome, n: u8) -> &ImageStatus {
        out.images
            .iter()
            .find(|i| i.digest == digest(n))
            .unwrap_or_else(|| panic!("no status for image {n}: {:?}", out.images))
    }

    fn states(status: &ImageStatus) -> Vec<LayerState> {
        status.layers.iter().map(|l| l.state.clone()).collect()
    }

    #[test]
    fn unresolved_images_are_resolved_once_and_unmatched_ones_ignored() {
        let mut w = World::new(&[("acme", "  images: [\"registry.test/**\"]\n")]);
        w.run("a", "prod", "registry.test/app:v1", 1);
        w.run("b", "prod", "registry.test/app:v1", 1);
        w.run("c", "prod", "quay.io/other:v1", 2);
        let out = w.reconcile(0);
        assert_eq!(
            out.actions,
            vec![Action::Resolve {
                reference: Reference::parse("registry.test/app:v1").unwrap(),
                digest: digest(1),
            }]
        );
        assert_eq!(out.images.len(), 1, "{:?}", out.images);
        let s = image(&out, 1);
        assert_eq!(
            (s.phase, s.pods, s.policy.as_str()),
            (Phase::Pending, 2, "acme")
        );
        assert_eq!(s.reason.as_deref(), Some("resolving the manifest"));
    }

    #[test]
    fn missing_layers_are_enqueued_and_small_or_foreign_layers_skipped() {
        let mut w = World::new(&[("acme", "  images: [\"registry.test/**\"]\n")]);
        w.run("a", "prod", "registry.test/app:v1", 1);
        w.manifests.insert(
            digest(1),
            info(
                1,
                &[
                    (10, 20 * MIB, TAR_GZ),
                    (11, MIB, TAR_GZ),
                    (12, 20 * MIB, "application/vnd.example.wasm"),
                ],
            ),
        );
        let out = w.reconcile(0);
        let Action::Enqueue(req) = &out.actions[0] else {
            panic!("expected Enqueue: {:?}", out.actions)
        };
        assert_eq!(out.actions.len(), 1);
        assert_eq!(
            req.layers.iter().map(|l| &l.digest).collect::<Vec<_>>(),
            [&digest(10)]
        );
        assert_eq!(
            (req.span_size, req.pods, req.policy.as_str()),
            (SPAN, 1, "acme")
        );
        let s = image(&out, 1);
        assert_eq!(s.phase, Phase::Pending);
        let st = states(s);
        assert_eq!(st[0], LayerState::Pending);
        assert!(
            matches!(&st[1], LayerState::Skipped { reason } if reason.contains("minLayerSize"))
        );
        assert!(matches!(&st[2], LayerState::Skipped { reason } if reason.contains("not a tar")));

        // Applied: the next pass sees it building and only updates the priority.
        w.apply(&out);
        w.run("b", "dev", "registry.test/app:v1", 1);
        let out = w.reconcile(1);
        assert_eq!(
            out.actions,
            vec![Action::SetPods {
                manifest: digest(1),
                pods: 2
            }]
        );
        assert_eq!(image(&out, 1).phase, Phase::Building);
        assert_eq!(states(image(&out, 1))[0], LayerState::Queued);
        w.apply(&out);
        w.queue.next_job(at(2)).unwrap();
        let out = w.reconcile(3);
        assert!(out.actions.is_empty(), "{:?}", out.actions);
        assert_eq!(
            states(image(&out, 1))[0],
            LayerState::Building { attempt: 1 }
        );
    }

    #[test]
    fn index_and_platform_digests_of_one_image_are_one_image() {
        let mut w = World::new(&[("all", "  images: [\"**\"]\n")]);
        // Pod a's imageID is the index digest 1, pod b's the platform manifest digest 2.
        w.run("a", "prod", "registry.test/app:v1", 1);
        w.run("b", "prod", &format!("registry.test/app@{}", d(2)), 2);
        let layers = [(10, 20 * MIB, TAR_GZ)];
        w.manifests.insert(digest(1), info(2, &layers));
        w.manifests.insert(digest(2), info(2, &layers));
        let out = w.reconcile(0);
        assert_eq!(out.images.len(), 1);
        assert_eq!(image(&out, 2).pods, 2);
        assert_eq!(
            image(&out, 2).reference,
            "registry.test/app:v1",
            "first pod's reference"
        );
        assert_eq!(out.actions.len(), 1, "one Enqueue: {:?}", out.actions);
    }

    #[test]
    fn indexed_layers_without_a_record_finish_then_the_image_is_ready() {
        let mut w = World::new(&[("acme", "  images: [\"registry.test/**\"]\n")]);
        w.run("a", "prod", "registry.test/app:v1", 1);
        w.manifests.insert(
            digest(1),
            info(1, &[(10, 20 * MIB, TAR_GZ), (11, MIB, TAR_GZ)]),
        );
        w.store.ztocs.insert(key(10));
        let out = w.reconcile(0);
        assert_eq!(
            out.actions,
            vec![Action::Finish {
                manifest: digest(1),
                reference: Reference::parse("registry.test/app:v1").unwrap(),
                policy: "acme".to_owned(),
            }]
        );
        assert_eq!(image(&out, 1).phase, Phase::Building);
        w.store.images.insert(digest(1), record(1, &[10]));
        let out = w.reconcile(1);
        assert!(out.actions.is_empty(), "{:?}", out.actions);
        let s = image(&out, 1);
        assert_eq!((s.phase, s.reason.as_deref()), (Phase::Ready, None));
        assert_eq!(states(s)[0], LayerState::Indexed);
        let p = &out.policies[0];
        assert_eq!((p.matched_images, p.ready_images), (1, 1));
        assert_eq!(
            (
                p.conditions[1].kind.as_str(),
                p.conditions[1].status.as_str()
            ),
            ("Ready", "True")
        );
    }

    #[test]
    fn a_different_span_size_or_lost_ztoc_rebuilds() {
        let mut w = World::new(&[(
            "acme",
            "  images: [\"registry.test/**\"]\n  index: {spanSize: 1Mi}\n",
        )]);
        w.run("a", "prod", "registry.test/app:v1", 1);
        w.manifests
            .insert(digest(1), info(1, &[(10, 20 * MIB, TAR_GZ)]));
        w.store.ztocs.insert(key(10)); // built with the default spans
        w.store.images.insert(digest(1), record(1, &[10]));
        let out = w.reconcile(0);
        assert!(
            matches!(&out.actions[..], [Action::Enqueue(r)] if r.span_size == MIB),
            "{:?}",
            out.actions
        );
    }

    #[test]
    fn unindexable_layers_are_skipped_not_rebuilt() {
        let mut w = World::new(&[("acme", "  images: [\"registry.test/**\"]\n")]);
        w.run("a", "prod", "registry.test/app:v1", 1);
        w.manifests.insert(
            digest(1),
            info(
                1,
                &[(10, 20 * MIB, "application/vnd.oci.image.layer.v1.tar+zstd")],
            ),
        );
        w.store
            .unindexable
            .insert(key(10), "single-frame zstd is not seekable".to_owned());
        let out = w.reconcile(0);
        assert!(
            matches!(&out.actions[..], [Action::Finish { .. }]),
            "{:?}",
            out.actions
        );
        assert!(
            matches!(&states(image(&out, 1))[0], LayerState::Skipped { reason } if reason.contains("zstd"))
        );
    }

    #[test]
    fn a_failed_image_stays_failed_until_the_retry_time() {
        let mut w = World::new(&[("acme", "  images: [\"registry.test/**\"]\n")]);
        w.run("a", "prod", "registry.test/app:v1", 1);
        w.manifests
            .insert(digest(1), info(1, &[(10, 20 * MIB, TAR_GZ)]));
        let out = w.reconcile(0);
        w.apply(&out);
        let job = w.queue.next_job(at(1)).unwrap();
        let events = w
            .queue
            .finish(job.id, Err("registry unreachable".into()), at(10));
        assert!(matches!(&events[..], [QueueEvent::ImageFailed { .. }]));

        let out = w.reconcile(20);
        assert!(
            out.actions.is_empty(),
            "no retry before 10 + 50 s: {:?}",
            out.actions
        );
        let s = image(&out, 1);
        assert_eq!(s.phase, Phase::Failed);
        assert!(
            s.reason
                .as_deref()
                .unwrap()
                .contains("registry unreachable"),
            "{s:?}"
        );
        assert_eq!(
            states(s)[0],
            LayerState::Failed {
                reason: "registry unreachable".into()
            }
        );
        let p = &out.policies[0];
        assert_eq!(
            (
                p.conditions[1].status.as_str(),
                p.conditions[1].reason.as_str()
            ),
            ("False", "BuildFailed")
        );

        let out = w.reconcile(60);
        assert!(
            matches!(&out.actions[..], [Action::Enqueue(_)]),
            "{:?}",
            out.actions
        );
        let s = image(&out, 1);
        assert_eq!(s.phase, Phase::Pending);
        assert!(
            s.reason.as_deref().unwrap().starts_with("retrying after"),
            "{s:?}"
        );
    }

    #[test]
    fn switching_a_policy_off_skips_the_image_and_cancels_its_build() {
        let mut w = World::new(&[("acme", "  images: [\"registry.test/**\"]\n")]);
        w.run("a", "prod", "registry.test/app:v1", 1);
        w.manifests
            .insert(digest(1), info(1, &[(10, 20 * MIB, TAR_GZ)]));
        let out = w.reconcile(0);
        w.apply(&out);
        assert!(w.queue.contains(&digest(1)));

        w.policies = policies(&[
            ("acme", "  images: [\"registry.test/**\"]\n"),
            ("stop", "  images: [\"registry.test/app\"]\n  mode: Off\n"),
        ]);
        let out = w.reconcile(1);
        assert_eq!(
            out.actions,
            vec![Action::Cancel {
                manifest: digest(1)
            }]
        );
        let s = image(&out, 1);
        assert_eq!(s.phase, Phase::Skipped);
        assert_eq!(s.reason.as_deref(), Some("policy stop has mode Off"));
        let stop = out.policies.iter().find(|p| p.name == "stop").unwrap();
        assert_eq!(
            (stop.matched_images, stop.conditions[1].reason.as_str()),
            (1, "Off")
        );

        // Deleting every policy cancels as well.
        w.apply(&out);
        w.policies = policies(&[("acme", "  images: [\"registry.test/**\"]\n")]);
        let out = w.reconcile(2);
        w.apply(&out);
        w.policies.clear();
        assert_eq!(
            w.reconcile(3).actions,
            vec![Action::Cancel {
                manifest: digest(1)
            }]
        );
    }

    #[test]
    fn unused_artifacts_are_collected_after_the_grace_period_only() {
        let mut w = World::new(&[("acme", "  images: [\"registry.test/**\"]\n")]);
        // Image 1 runs and shares layer 10 with image 2, which no longer runs.
        w.run("a", "prod", "registry.test/app:v1", 1);
        w.manifests
            .insert(digest(1), info(1, &[(10, 20 * MIB, TAR_GZ)]));
        w.store.ztocs.extend([key(10), key(11)]);
        w.store.images.insert(digest(1), record(1, &[10]));
        w.store.images.insert(digest(2), record(2, &[10, 11]));

        let out = w.reconcile(1000);
        assert!(out.actions.is_empty(), "{:?}", out.actions);
        assert_eq!(out.gc.images_unused_since.get(&digest(2)), Some(&at(1000)));
        assert_eq!(out.gc.ztocs_unused_since.get(&key(11)), Some(&at(1000)));
        assert!(!out.gc.ztocs_unused_since.contains_key(&key(10)));

        assert!(w.reconcile(1099).actions.is_empty());
        let out = w.reconcile(1100);
        assert_eq!(
            out.actions,
            vec![
                Action::CollectImage {
                    manifest: digest(2)
                },
                Action::CollectZtoc { key: key(11) },
            ]
        );
        assert_eq!(out.gc, GcMemory::default());

        // An artifact wanted again before the grace period ends is forgotten by the GC.
        let mut w2 = World::new(&[("acme", "  images: [\"registry.test/**\"]\n")]);
        w2.store.images.insert(digest(1), record(1, &[10]));
        w2.store.ztocs.insert(key(10));
        w2.reconcile(0);
        w2.run("a", "prod", "registry.test/app:v1", 1);
        w2.manifests
            .insert(digest(1), info(1, &[(10, 20 * MIB, TAR_GZ)]));
        let out = w2.reconcile(50);
        assert_eq!(out.gc, GcMemory::default());
        w2.containers.clear();
        assert!(
            w2.reconcile(120).actions.is_empty(),
            "grace restarts at 120"
        );
    }

    #[test]
    fn the_outcome_does_not_depend_on_input_order() {
        let specs = [
            ("a", "  images: [\"registry.test/**\"]\n"),
            ("b", "  images: [\"registry.test/app*\"]\n"),
        ];
        let mut w = World::new(&specs);
        for (pod, m) in [("p1", 1), ("p2", 2), ("p3", 1), ("p4", 3)] {
            w.run(pod, "prod", &format!("registry.test/app{m}:v1"), m);
            w.manifests
                .insert(digest(m), info(m, &[(10 + m, 20 * MIB, TAR_GZ)]));
        }
        let forward = w.reconcile(0);
        w.containers.reverse();
        w.policies.reverse();
        let backward = w.reconcile(0);
        assert_eq!(forward, backward);
        assert_eq!(image(&forward, 1).policy, "b");
        assert_eq!(image(&forward, 1).pods, 2);
    }

    #[test]
    fn statuses_serialize_like_the_crd_status() {
        let s = ImageStatus {
            digest: digest(1),
            reference: "registry.test/app:v1".into(),
            policy: "acme".into(),
            phase: Phase::Ready,
            reason: None,
            pods: 1,
            layers: vec![LayerStatus {
                digest: digest(10),
                size: 5,
                state: LayerState::Skipped {
                    reason: "small".into(),
                },
            }],
        };
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["phase"], "Ready");
        assert_eq!(json["layers"][0]["state"], "skipped");
        assert_eq!(json["layers"][0]["reason"], "small");
        assert!(json.get("reason").is_none());
        let invalid = PolicyStatus::invalid(
            "p",
            &crate::Error::InvalidPolicy {
                policy: "p".into(),
                field: "spec.images[0]".into(),
                reason: "bad".into(),
            },
        );
        let json = serde_json::to_value(&invalid).unwrap();
        assert_eq!(json["conditions"][0]["type"], "Valid");
        assert_eq!(json["conditions"][0]["status"], "False");
        assert!(
            json["conditions"][0]["message"]
                .as_str()
                .unwrap()
                .contains("spec.images[0]")
        );
    }
}
