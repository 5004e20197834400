//! The build queue: which layers to index next, deduplicated across images.
//!
//! Images come in as [`ImageRequest`]s (one per manifest digest, however many pods run it) with
//! the layers that still need a zTOC. The queue hands out **layer** jobs: a layer shared by two
//! images (a common base) is built once, and both images wait on it; an image is done when the
//! last layer it waits on is. Concurrency is bounded; the next job is the ready layer wanted by
//! the most running pods. A failed layer is retried with exponential backoff up to a cap; after
//! the last attempt the images waiting on it fail (the reconciler re-enqueues them later).
//! Images no longer wanted are dropped, and their running jobs reported for cancellation.
//!
//! Time is a value passed in (`now`); the queue never reads a clock, never sleeps and does no
//! I/O. It does not know what is in the store: the reconciler only enqueues missing layers.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use hermes_oci_types::{Digest, Reference};

/// A zTOC to build: zTOCs are keyed by layer digest and span size.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LayerKey {
    /// The (compressed) layer digest.
    pub digest: Digest,
    /// The span size the zTOC is built with.
    pub span_size: u64,
}

/// A layer of an image request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerSpec {
    /// Layer digest.
    pub digest: Digest,
    /// Compressed size in bytes.
    pub size: u64,
}

/// An image that needs layers indexed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRequest {
    /// The platform manifest digest (the queue's image identity).
    pub manifest: Digest,
    /// Where to fetch the layers from.
    pub reference: Reference,
    /// The policy that wants it.
    pub policy: String,
    /// Span size from the policy.
    pub span_size: u64,
    /// The layers that still need a zTOC.
    pub layers: Vec<LayerSpec>,
    /// Running pods using the image (the priority).
    pub pods: u32,
}

/// Limits of the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueOptions {
    /// Layer builds running at once.
    pub max_concurrent: usize,
    /// Attempts per layer before its images fail.
    pub max_attempts: u32,
    /// Wait after the first failure; doubled after each further one.
    pub backoff_base: Duration,
    /// Longest wait between attempts.
    pub backoff_cap: Duration,
}

impl Default for QueueOptions {
    fn default() -> Self {
        Self {
            max_concurrent: 2,
            max_attempts: 5,
            backoff_base: Duration::from_secs(5),
            backoff_cap: Duration::from_secs(300),
        }
    }
}

impl QueueOptions {
    /// The wait after the `failures`-th failure (1-based).
    pub fn backoff(&self, failures: u32) -> Duration {
        let factor = 1u32
            .checked_shl(failures.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.backoff_base
            .checked_mul(factor)
            .map_or(self.backoff_cap, |d| d.min(self.backoff_cap))
    }
}

/// Identifies one handed-out job, so a late report from a cancelled worker is never taken
/// for the result of a newer attempt at the same layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JobId(pub u64);

/// A layer build handed to a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerJob {
    /// Report the result with this id ([`BuildQueue::finish`]).
    pub id: JobId,
    /// What to build.
    pub key: LayerKey,
    /// Compressed size.
    pub size: u64,
    /// An image reference the layer can be fetched through (of the waiting image with the
    /// most pods).
    pub reference: Reference,
    /// 1 for the first attempt.
    pub attempt: u32,
}

/// Where a layer is in the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerProgress {
    /// Waiting for a worker.
    Queued,
    /// Failed before; waiting until `not_before` for the next attempt.
    Retrying {
        /// Failed attempts so far.
        failures: u32,
        /// Earliest next attempt.
        not_before: SystemTime,
        /// Why the last attempt failed.
        last_error: String,
    },
    /// A worker builds it.
    Building {
        /// Attempt number (1-based).
        attempt: u32,
    },
    /// No image wants it any more; its worker was told to stop.
    Cancelling,
}

/// Why an image failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFailure {
    /// The layer that could not be built.
    pub layer: Digest,
    /// The last error.
    pub error: String,
    /// Attempts made.
    pub attempts: u32,
    /// When it failed.
    pub at: SystemTime,
}

/// What a finished job changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueEvent {
    /// All layers the image waited on are built.
    ImageDone {
        /// The image.
        manifest: Digest,
    },
    /// A layer of the image failed for good.
    ImageFailed {
        /// The image.
        manifest: Digest,
        /// Why.
        failure: ImageFailure,
    },
    /// A running job no image waits on any more: stop it.
    CancelLayer {
        /// The job's layer.
        key: LayerKey,
        /// The job.
        job: JobId,
    },
}

/// A queued image, as the reconciler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageProgress {
    /// The policy that wanted it.
    pub policy: String,
    /// Pods counted for priority.
    pub pods: u32,
    /// Layers still pending, with their progress.
    pub layers: Vec<(LayerKey, LayerProgress)>,
}

#[derive(Debug, Clone)]
struct ImageEntry {
    reference: Reference,
    policy: String,
    pods: u32,
    pending: BTreeSet<LayerKey>,
}

#[derive(Debug, Clone)]
enum LayerState {
    Waiting {
        failures: u32,
        not_before: Option<SystemTime>,
        last_error: Option<String>,
    },
    Running {
        attempt: u32,
        job: JobId,
    },
    Cancelling {
        job: JobId,
    },
}

#[derive(Debug, Clone)]
struct LayerEntry {
    size: u64,
    state: LayerState,
    waiters: BTreeSet<Digest>,
}

/// The build queue (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct BuildQueue {
    options: QueueOptions,
    images: BTreeMap<Digest, ImageEntry>,
    layers: BTreeMap<LayerKey, LayerEntry>,
    failed: BTreeMap<Digest, ImageFailure>,
    /// Jobs handed out and not reported yet (running or being cancelled).
    jobs: BTreeMap<JobId, LayerKey>,
    /// Cancelled jobs whose layer was queued again meanwhile: they still hold a worker.
    orphans: BTreeSet<JobId>,
    next_id: u64,
}

impl BuildQueue {
    /// An empty queue.
    pub fn new(options: QueueOptions) -> Self {
        Self {
            options,
            ..Self::default()
        }
    }

    /// The queue's limits.
    pub fn options(&self) -> &QueueOptions {
        &self.options
    }

    /// Queue an image. Returns true if it was new; an image already queued only gets its pod
    /// count updated. An image with no layers to build is not queued. Clears an earlier failure.
    pub fn enqueue(&mut self, request: ImageRequest) -> bool {
        if let Some(entry) = self.images.get_mut(&request.manifest) {
            entry.pods = request.pods;
            return false;
        }
        self.failed.remove(&request.manifest);
        if request.layers.is_empty() {
            return false;
        }
        let mut pending = BTreeSet::new();
        for layer in request.layers {
            let key = LayerKey {
                digest: layer.digest,
                span_size: request.span_size,
            };
            let entry = self
                .layers
                .entry(key.clone())
                .or_insert_with(|| LayerEntry {
                    size: layer.size,
                    state: LayerState::Waiting {
                        failures: 0,
                        not_before: None,
                        last_error: None,
                    },
                    waiters: BTreeSet::new(),
                });
            if let LayerState::Cancelling { job } = entry.state {
                // Wanted again while its old job is stopping: queue a fresh build; the old
                // job keeps its worker until it reports.
                self.orphans.insert(job);
                entry.state = LayerState::Waiting {
                    failures: 0,
                    not_before: None,
                    last_error: None,
                };
            }
            entry.waiters.insert(request.manifest.clone());
            pending.insert(key);
        }
        self.images.insert(
            request.manifest,
            ImageEntry {
                reference: request.reference,
                policy: request.policy,
                pods: request.pods,
                pending,
            },
        );
        true
    }

    /// Update how many pods run an image (its priority).
    pub fn set_pods(&mut self, manifest: &Digest, pods: u32) {
        if let Some(entry) = self.images.get_mut(manifest) {
            entry.pods = pods;
        }
    }

    /// Jobs running (including ones being cancelled, which still hold a worker).
    pub fn running(&self) -> usize {
        self.jobs.len()
    }

    /// Images queued.
    pub fn image_count(&self) -> usize {
        self.images.len()
    }

    /// Layers queued, running or retrying.
    pub fn layer_count(&self) -> usize {
        self.layers.len()
    }

    fn priority(&self, layer: &LayerEntry) -> u64 {
        layer
            .waiters
            .iter()
            .filter_map(|m| self.images.get(m))
            .map(|i| u64::from(i.pods))
            .sum()
    }

    /// The next layer to build, if a worker is free and a layer is due. Highest priority first
    /// (pods summed over the images waiting on the layer), then the lowest digest.
    pub fn next_job(&mut self, now: SystemTime) -> Option<LayerJob> {
        if self.running() >= self.options.max_concurrent {
            return None;
        }
        let (key, failures) = self
            .layers
            .iter()
            .filter_map(|(key, l)| match &l.state {
                LayerState::Waiting {
                    failures,
                    not_before,
                    ..
                } if not_before.is_none_or(|t| t <= now) => {
                    Some((std::cmp::Reverse(self.priority(l)), key, *failures))
                }
                _ => None,
            })
            .min()
            .map(|(_, key, failures)| (key.clone(), failures))?;
        let entry = self.layers.get_mut(&key)?;
        let attempt = failures + 1;
        self.next_id += 1;
        let id = JobId(self.next_id);
        entry.state = LayerState::Running { attempt, job: id };
        let source = entry
            .waiters
            .iter()
            .filter_map(|m| {
                self.images
                    .get(m)
                    .map(|i| (std::cmp::Reverse(i.pods), m, i))
            })
            .min_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)))
            .map(|(_, _, i)| i.reference.clone())?;
        self.jobs.insert(id, key.clone());
        Some(LayerJob {
            id,
            key,
            size: entry.size,
            reference: source,
            attempt,
        })
    }

    /// When the earliest retry becomes due, if any layer is waiting for one.
    pub fn next_retry(&self) -> Option<SystemTime> {
        self.layers
            .values()
            .filter_map(|l| match l.state {
                LayerState::Waiting { not_before, .. } => not_before,
                _ => None,
            })
            .min()
    }

    /// A worker finished job `id`: `Ok` when the zTOC is stored, `Err(reason)` otherwise.
    /// Reports of unknown or cancelled jobs only free their worker.
    pub fn finish(
        &mut self,
        id: JobId,
        result: Result<(), String>,
        now: SystemTime,
    ) -> Vec<QueueEvent> {
        let mut events = Vec::new();
        let Some(key) = self.jobs.remove(&id) else {
            return events;
        };
        if self.orphans.remove(&id) {
            return events;
        }
        let key = &key;
        let Some(entry) = self.layers.get_mut(key) else {
            return events;
        };
        let attempt = match entry.state {
            LayerState::Running { attempt, job } if job == id => attempt,
            LayerState::Cancelling { job } if job == id => {
                self.layers.remove(key);
                return events;
            }
            _ => return events,
        };
        match result {
            Ok(()) => {
                let waiters = self
                    .layers
                    .remove(key)
                    .map(|l| l.waiters)
                    .unwrap_or_default();
                for manifest in waiters {
                    let done = self.images.get_mut(&manifest).is_some_and(|image| {
                        image.pending.remove(key);
                        image.pending.is_empty()
                    });
                    if done {
                        self.images.remove(&manifest);
                        events.push(QueueEvent::ImageDone { manifest });
                    }
                }
            }
            Err(error) if attempt < self.options.max_attempts => {
                entry.state = LayerState::Waiting {
                    failures: attempt,
                    not_before: Some(now + self.options.backoff(attempt)),
                    last_error: Some(error),
                };
            }
            Err(error) => {
                let waiters = self
                    .layers
                    .remove(key)
                    .map(|l| l.waiters)
                    .unwrap_or_default();
                for manifest in waiters {
                    let failure = ImageFailure {
                        layer: key.digest.clone(),
                        error: error.clone(),
                        attempts: attempt,
                        at: now,
                    };
                    events.extend(self.drop_image(&manifest));
                    self.failed.insert(manifest.clone(), failure.clone());
                    events.push(QueueEvent::ImageFailed { manifest, failure });
                }
            }
        }
        events
    }

    /// Remove an image; returns cancellations for running jobs nobody else waits on.
    fn drop_image(&mut self, manifest: &Digest) -> Vec<QueueEvent> {
        let mut events = Vec::new();
        let Some(image) = self.images.remove(manifest) else {
            return events;
        };
        for key in image.pending {
            let Some(layer) = self.layers.get_mut(&key) else {
                continue;
            };
            layer.waiters.remove(manifest);
            if !layer.waiters.is_empty() {
                continue;
            }
            match layer.state {
                LayerState::Running { job, .. } => {
                    layer.state = LayerState::Cancelling { job };
                    events.push(QueueEvent::CancelLayer { key, job });
                }
                LayerState::Waiting { .. } => {
                    self.layers.remove(&key);
                }
                LayerState::Cancelling { .. } => {}
            }
        }
        events
    }

    /// Drop every queued image `wanted` rejects (policy deleted or switched off, no pod runs
    /// it). Returns the running jobs to cancel (as [`QueueEvent::CancelLayer`]).
    pub fn retain(&mut self, wanted: impl Fn(&Digest) -> bool) -> Vec<QueueEvent> {
        let unwanted: Vec<Digest> = self.images.keys().filter(|m| !wanted(m)).cloned().collect();
        self.failed.retain(|m, _| wanted(m));
        unwanted.iter().flat_map(|m| self.drop_image(m)).collect()
    }

    /// Forget an image's failure (so the next reconcile may enqueue it again).
    pub fn clear_failure(&mut self, manifest: &Digest) {
        self.failed.remove(manifest);
    }

    /// Manifest digests of the queued images.
    pub fn images(&self) -> impl Iterator<Item = &Digest> {
        self.images.keys()
    }

    /// Whether the image is queued.
    pub fn contains(&self, manifest: &Digest) -> bool {
        self.images.contains_key(manifest)
    }

    /// Progress of a queued image.
    pub fn image(&self, manifest: &Digest) -> Option<ImageProgress> {
        let image = self.images.get(manifest)?;
        Some(ImageProgress {
            policy: image.policy.clone(),
            pods: image.pods,
            layers: image
                .pending
                .iter()
                .filter_map(|k| self.layer(k).map(|p| (k.clone(), p)))
                .collect(),
        })
    }

    /// The job building (or being cancelled for) a layer.
    pub fn running_job(&self, key: &LayerKey) -> Option<JobId> {
        match self.layers.get(key)?.state {
            LayerState::Running { job, .. } | LayerState::Cancelling { job } => Some(job),
            LayerState::Waiting { .. } => None,
        }
    }

    /// Progress of a queued layer.
    pub fn layer(&self, key: &LayerKey) -> Option<LayerProgress> {
        Some(match &self.layers.get(key)?.state {
            LayerState::Waiting {
                failures,
                not_before,
                last_error,
            } => match (not_before, last_error) {
                (Some(t), Some(e)) => LayerProgress::Retrying {
                    failures: *failures,
                    not_before: *t,
                    last_error: e.clone(),
                },
                _ => LayerProgress::Queued,
            },
            LayerState::Running { attempt, .. } => LayerProgress::Building { attempt: *attempt },
            LayerState::Cancelling { .. } => LayerProgress::Cancelling,
        })
    }

    /// Why an image failed for good, if it did (until it is enqueued again).
    pub fn failure(&self, manifest: &Digest) -> Option<&ImageFailure> {
        self.failed.get(manifest)
    }

    /// Images that failed for good.
    pub fn failures(&self) -> impl Iterator<Item = (&Digest, &ImageFailure)> {
        self.failed.iter()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) use crate::testing::{at, digest};

    const SPAN: u64 = 4 << 20;

    fn request(manifest: u8, layers: &[u8], pods: u32) -> ImageRequest {
        ImageRequest {
            manifest: digest(manifest),
            reference: Reference::parse(&format!("registry.test/img{manifest}:v1")).unwrap(),
            policy: "p".to_owned(),
            span_size: SPAN,
            layers: layers
                .iter()
                .map(|&l| LayerSpec {
                    digest: digest(l),
                    size: 100 + u64::from(l),
                })
                .collect(),
            pods,
        }
    }

    fn key(l: u8) -> LayerKey {
        LayerKey {
            digest: digest(l),
            span_size: SPAN,
        }
    }

    /// Report the running job of layer `l`.
    fn done(q: &mut BuildQueue, l: u8, result: Result<(), String>, t: u64) -> Vec<QueueEvent> {
        let id = q.running_job(&key(l)).expect("the layer has a running job");
        q.finish(id, result, at(t))
    }

    fn queue(max_concurrent: usize) -> BuildQueue {
        BuildQueue::new(QueueOptions {
            max_concurrent,
            max_attempts: 3,
            backoff_base: Duration::from_secs(10),
            backoff_cap: Duration::from_secs(25),
        })
    }

    fn drain(q: &mut BuildQueue, now: SystemTime) -> Vec<u8> {
        std::iter::from_fn(|| q.next_job(now))
            .map(|j| j.key.digest.hex().as_bytes()[1] - b'0')
            .collect()
    }

    #[test]
    fn shared_layers_are_built_once_and_release_every_waiting_image() {
        let mut q = queue(10);
        assert!(q.enqueue(request(1, &[1, 2, 3], 1)));
        assert!(q.enqueue(request(2, &[1, 2, 4], 1)));
        assert!(!q.enqueue(request(1, &[1, 2, 3], 5)), "same manifest twice");
        assert_eq!(q.image_count(), 2);
        assert_eq!(q.layer_count(), 4);
        let jobs: Vec<LayerJob> = std::iter::from_fn(|| q.next_job(at(0))).collect();
        assert_eq!(jobs.len(), 4, "each layer handed out once: {jobs:?}");
        assert!(done(&mut q, 1, Ok(()), 1).is_empty());
        assert!(done(&mut q, 2, Ok(()), 1).is_empty());
        assert_eq!(
            done(&mut q, 3, Ok(()), 2),
            vec![QueueEvent::ImageDone {
                manifest: digest(1)
            }]
        );
        assert_eq!(
            done(&mut q, 4, Ok(()), 2),
            vec![QueueEvent::ImageDone {
                manifest: digest(2)
            }]
        );
        assert_eq!((q.image_count(), q.layer_count(), q.running()), (0, 0, 0));
    }

    #[test]
    fn concurrency_is_bounded_and_priority_follows_pods() {
        let mut q = queue(2);
        q.enqueue(request(1, &[1], 1));
        q.enqueue(request(2, &[2], 7));
        q.enqueue(request(3, &[3], 3));
        q.enqueue(request(4, &[4, 1], 3)); // layer 1 now counts 1 + 3 = 4 pods
        assert_eq!(
            drain(&mut q, at(0)),
            vec![2, 1],
            "two at most, most pods first"
        );
        assert_eq!(q.running(), 2);
        done(&mut q, 2, Ok(()), 1);
        // Layer 3 and 4 both have 3 pods: the lower digest goes first.
        assert_eq!(drain(&mut q, at(1)), vec![3]);
        q.set_pods(&digest(4), 50);
        done(&mut q, 3, Ok(()), 2);
        assert_eq!(drain(&mut q, at(2)), vec![4]);
    }

    #[test]
    fn job_source_is_the_waiting_image_with_most_pods() {
        let mut q = queue(1);
        q.enqueue(request(1, &[9], 1));
        q.enqueue(request(2, &[9], 4));
        let job = q.next_job(at(0)).unwrap();
        assert_eq!(job.reference.to_string(), "registry.test/img2:v1");
        assert_eq!((job.attempt, job.size), (1, 109));
    }

    #[test]
    fn failures_back_off_exponentially_up_to_the_cap_then_fail_the_images() {
        let mut q = queue(4);
        q.enqueue(request(1, &[1, 2], 1));
        q.enqueue(request(2, &[1], 1));
        assert_eq!(drain(&mut q, at(0)).len(), 2);
        assert!(done(&mut q, 1, Err("503".into()), 100).is_empty());
        assert_eq!(
            q.layer(&key(1)),
            Some(LayerProgress::Retrying {
                failures: 1,
                not_before: at(110),
                last_error: "503".into()
            })
        );
        assert_eq!(q.next_retry(), Some(at(110)));
        assert_eq!(q.next_job(at(109)), None, "not before the backoff");
        let job = q.next_job(at(110)).unwrap();
        assert_eq!((job.key.clone(), job.attempt), (key(1), 2));
        done(&mut q, 1, Err("503".into()), 200);
        assert_eq!(q.next_job(at(219)), None);
        assert_eq!(
            q.next_job(at(220)).unwrap().attempt,
            3,
            "20 s = 10 s doubled"
        );
        let job2 = q.running_job(&key(2)).unwrap();
        let events = done(&mut q, 1, Err("unreachable".into()), 300);
        // Image 1 also waited on layer 2, still running: nobody else wants it.
        let failure = |m| QueueEvent::ImageFailed {
            manifest: digest(m),
            failure: ImageFailure {
                layer: digest(1),
                error: "unreachable".into(),
                attempts: 3,
                at: at(300),
            },
        };
        assert_eq!(
            events,
            vec![
                QueueEvent::CancelLayer {
                    key: key(2),
                    job: job2
                },
                failure(1),
                failure(2)
            ]
        );
        assert_eq!(q.failure(&digest(2)).unwrap().error, "unreachable");
        assert!(
            done(&mut q, 2, Ok(()), 301).is_empty(),
            "cancelled job ends quietly"
        );
        assert_eq!((q.image_count(), q.layer_count(), q.running()), (0, 0, 0));
        // Enqueueing again clears the failure and starts from attempt 1.
        q.enqueue(request(2, &[1], 1));
        assert_eq!(q.failure(&digest(2)), None);
        assert_eq!(q.next_job(at(302)).unwrap().attempt, 1);
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let o = QueueOptions {
            backoff_base: Duration::from_secs(10),
            backoff_cap: Duration::from_secs(25),
            ..QueueOptions::default()
        };
        let waits: Vec<u64> = [1, 2, 3, 40, u32::MAX]
            .map(|n| o.backoff(n).as_secs())
            .to_vec();
        assert_eq!(waits, vec![10, 20, 25, 25, 25]);
    }

    #[test]
    fn unwanted_images_are_dropped_and_their_running_jobs_cancelled() {
        let mut q = queue(1);
        q.enqueue(request(1, &[1, 2], 5));
        q.enqueue(request(2, &[2, 3], 1));
        assert_eq!(drain(&mut q, at(0)), vec![2]);
        // Image 1's policy was switched off: layer 1 is dropped, layer 2 still serves image 2.
        assert!(q.retain(|m| *m != digest(1)).is_empty());
        assert_eq!(q.layer(&key(1)), None);
        assert_eq!(
            q.layer(&key(2)),
            Some(LayerProgress::Building { attempt: 1 })
        );
        // Now image 2 goes too: its running layer is reported, queued one dropped.
        let job2 = q.running_job(&key(2)).unwrap();
        assert_eq!(
            q.retain(|_| false),
            vec![QueueEvent::CancelLayer {
                key: key(2),
                job: job2
            }]
        );
        assert_eq!(q.layer(&key(3)), None);
        assert_eq!(
            q.running(),
            1,
            "the cancelled job holds its worker until it ends"
        );
        assert_eq!(q.next_job(at(1)), None);
        done(&mut q, 2, Err("cancelled".into()), 2);
        assert_eq!(q.running(), 0);
        assert_eq!(
            q.failures().count(),
            0,
            "a cancelled image is not a failure"
        );
    }

    #[test]
    fn an_image_wanted_again_while_its_job_is_cancelling_is_rebuilt() {
        let mut q = queue(2);
        q.enqueue(request(1, &[1], 1));
        q.next_job(at(0)).unwrap();
        q.retain(|_| false);
        q.enqueue(request(1, &[1], 1));
        assert_eq!(q.layer(&key(1)), Some(LayerProgress::Queued));
        let progress = q.image(&digest(1)).unwrap();
        assert_eq!(progress.layers, vec![(key(1), LayerProgress::Queued)]);
        assert_eq!(q.next_job(at(1)).unwrap().attempt, 1);
    }

    #[test]
    fn a_late_report_from_a_cancelled_job_is_not_taken_for_the_new_attempt() {
        let mut q = queue(1);
        q.enqueue(request(1, &[1], 1));
        let old = q.next_job(at(0)).unwrap();
        q.retain(|_| false);
        q.enqueue(request(1, &[1], 1));
        assert_eq!(
            q.next_job(at(1)),
            None,
            "the old job still holds the only worker"
        );
        assert!(q.finish(old.id, Err("cancelled".into()), at(2)).is_empty());
        let new = q.next_job(at(3)).unwrap();
        assert_ne!(new.id, old.id);
        assert!(
            q.finish(old.id, Err("cancelled".into()), at(4)).is_empty(),
            "reported twice"
        );
        assert_eq!(
            q.layer(&key(1)),
            Some(LayerProgress::Building { attempt: 1 })
        );
        assert_eq!(
            q.finish(new.id, Ok(()), at(5)),
            vec![QueueEvent::ImageDone {
                manifest: digest(1)
            }]
        );
        assert_eq!(q.running(), 0);
    }

    #[test]
    fn an_image_with_nothing_to_build_is_not_queued() {
        let mut q = queue(2);
        assert!(!q.enqueue(request(1, &[], 1)));
        assert!(!q.contains(&digest(1)));
        assert_eq!(q.next_job(at(0)), None);
    }
}
