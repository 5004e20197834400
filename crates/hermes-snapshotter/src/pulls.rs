//! Per-pull reports for the controller (`POST /v1/pulls`): as containerd prepares an image's
//! layers, [`PullTracker`] keeps how each was provided (lazy, normal on purpose, or a fallback
//! with its reason); once the pull is over and the start's reads are done it hands out a
//! [`PullReport`] with the bytes the lazy layers fetched on demand and, if they got there, how
//! long they took to be fully local.
//!
//! When a pull is over: containerd's `cri.image-layers` label lists the layer being prepared and
//! the ones after it, so the layer whose list has one entry is the last; a pull whose last layer
//! never came (containerd had the others, the label was cut) is over [`QUIET`] after its last
//! prepare. When the start's reads are done: each lazy layer's startup trace window has closed
//! (or the layer is fully local); without trace windows, [`START_WINDOW`] after the last
//! prepare. A pull is reported [`MAX_WAIT`] after its first prepare at the latest.
//!
//! Bounded: at most [`MAX_PENDING`] pulls and [`MAX_LAYERS_PER_REPORT`] layers each are kept;
//! further ones are dropped (reports are best effort). What it does not do: send anything
//! (the daemon does, off the start's path) or know the pod (the CRI proxy's pull log does).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hermes_node_api::{
    LayerMode, MAX_LAYERS_PER_REPORT, MAX_REASON_LEN, PullLayer, PullReport, labels,
};
use hermes_oci::Digest;

use crate::layer_server::LayerStats;
use crate::remote::RemoteLayer;

/// A pull whose last layer never came is over this long after its last prepare.
pub const QUIET: Duration = Duration::from_secs(30);
/// Without trace windows, the start's reads are taken as done this long after the last prepare.
pub const START_WINDOW: Duration = Duration::from_secs(10);
/// A pull is reported at the latest this long after its first prepare.
pub const MAX_WAIT: Duration = Duration::from_secs(180);
/// Most pulls kept at once.
pub const MAX_PENDING: usize = 64;

#[derive(Debug, Clone)]
struct Pending {
    image: String,
    manifest: Option<Digest>,
    layers: Vec<PullLayer>,
    first: Instant,
    last: Instant,
    last_layer_seen: bool,
}

/// The pulls under way on this node (see the module docs).
#[derive(Debug)]
pub struct PullTracker {
    /// Whether layer servers record startup traces (their window closing ends a start).
    tracing: bool,
    pending: Mutex<BTreeMap<String, Pending>>,
}

fn bounded_reason(reason: String) -> String {
    if reason.len() <= MAX_REASON_LEN {
        return reason;
    }
    let cut = (0..=MAX_REASON_LEN)
        .rev()
        .find(|&i| reason.is_char_boundary(i))
        .unwrap_or(0);
    reason[..cut].to_owned()
}

impl PullTracker {
    /// A tracker; `tracing`: layer servers record startup traces.
    pub fn new(tracing: bool) -> Self {
        Self {
            tracing,
            pending: Mutex::new(BTreeMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Pending>> {
        self.pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Keep how `layer` was provided, at `now`. A layer without an image reference or a
    /// parsable digest is not reported.
    pub fn record(
        &self,
        layer: &RemoteLayer,
        mode: LayerMode,
        reason: Option<String>,
        now: Instant,
    ) {
        let (Some(image), Ok(digest)) = (&layer.image_ref, Digest::parse(&layer.layer_digest))
        else {
            return;
        };
        let manifest = layer
            .manifest_digest
            .as_deref()
            .and_then(|d| Digest::parse(d).ok());
        let key = manifest
            .as_ref()
            .map_or_else(|| image.clone(), |m| m.to_string());
        let last_layer = layer
            .labels
            .get(labels::CRI_IMAGE_LAYERS)
            .is_some_and(|list| !list.is_empty() && !list.contains(','));
        let mut pending = self.lock();
        if !pending.contains_key(&key) && pending.len() >= MAX_PENDING {
            return;
        }
        let pull = pending.entry(key).or_insert_with(|| Pending {
            image: image.clone(),
            manifest,
            layers: Vec::new(),
            first: now,
            last: now,
            last_layer_seen: false,
        });
        pull.last = now;
        pull.last_layer_seen |= last_layer;
        let entry = PullLayer {
            digest,
            mode,
            reason: reason.map(bounded_reason),
        };
        let room = pull.layers.len() < MAX_LAYERS_PER_REPORT;
        match pull.layers.iter_mut().find(|l| l.digest == entry.digest) {
            Some(kept) => *kept = entry,
            None if room => pull.layers.push(entry),
            None => {}
        }
    }

    /// The pulls that are over and whose start's reads are done at `now`, as reports without
    /// node or pod (the sender adds them); they are forgotten. `stats` gives a lazy layer's
    /// served stats.
    pub fn take_due(
        &self,
        now: Instant,
        stats: impl Fn(&Digest) -> Option<LayerStats>,
    ) -> Vec<PullReport> {
        let mut pending = self.lock();
        let mut due = Vec::new();
        pending.retain(|_, pull| match self.report_if_due(pull, now, &stats) {
            Some(report) => {
                due.push(report);
                false
            }
            None => true,
        });
        due
    }

    fn report_if_due(
        &self,
        pull: &Pending,
        now: Instant,
        stats: &impl Fn(&Digest) -> Option<LayerStats>,
    ) -> Option<PullReport> {
        let overdue = now.duration_since(pull.first) >= MAX_WAIT;
        let over = pull.last_layer_seen || now.duration_since(pull.last) >= QUIET;
        let lazy: Vec<Option<LayerStats>> = pull
            .layers
            .iter()
            .filter(|l| l.mode == LayerMode::Lazy)
            .map(|l| stats(&l.digest))
            .collect();
        let reads_done = lazy.iter().all(|s| match s {
            Some(s) if s.trace_complete || s.state == "fully_local" => true,
            _ => !self.tracing && now.duration_since(pull.last) >= START_WINDOW,
        });
        if !(overdue || (over && reads_done)) {
            return None;
        }
        let bytes_fetched = lazy.iter().flatten().map(|s| s.bytes_on_demand).sum();
        let fully_local_seconds = if lazy.is_empty() {
            None
        } else {
            lazy.iter()
                .map(|s| s.as_ref().and_then(|s| s.fully_local_seconds))
                .try_fold(0.0f64, |max, s| s.map(|s| max.max(s)))
        };
        Some(PullReport {
            image: pull.image.clone(),
            manifest: pull.manifest.clone(),
            node: None,
            pod: None,
            layers: pull.layers.clone(),
            bytes_fetched,
            fully_local_seconds,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u8) -> String {
        format!("sha256:{}", format!("{n:02x}").repeat(32))
    }

    /// Layer `n` of a three-layer image (1, 2, 3), as containerd prepares it.
    fn layer(n: u8) -> RemoteLayer {
        let rest: Vec<String> = (n..=3).map(digest).collect();
        RemoteLayer {
            target: format!("extract-{n}"),
            layer_digest: digest(n),
            image_ref: Some("registry.test/app:1".into()),
            manifest_digest: Some(digest(9)),
            parent: None,
            labels: [(labels::CRI_IMAGE_LAYERS.to_owned(), rest.join(","))].into(),
        }
    }

    fn stats(bytes: u64, trace_complete: bool, fully_local: Option<f64>) -> LayerStats {
        LayerStats {
            bytes_on_demand: bytes,
            trace_complete,
            fully_local_seconds: fully_local,
            state: if fully_local.is_some() {
                "fully_local"
            } else {
                "lazy"
            }
            .into(),
            ..LayerStats::default()
        }
    }

    #[test]
    fn a_lazy_pull_is_reported_once_its_last_layer_came_and_its_reads_are_done() {
        let t0 = Instant::now();
        let pulls = PullTracker::new(true);
        pulls.record(&layer(1), LayerMode::Lazy, None, t0);
        pulls.record(&layer(2), LayerMode::Lazy, None, t0);
        // Not over: layer 3 has not come.
        assert!(
            pulls
                .take_due(t0, |_| Some(stats(5, true, None)))
                .is_empty()
        );
        pulls.record(&layer(3), LayerMode::Fallback, Some("no zTOC".into()), t0);
        // Over, but one lazy layer's start is still reading.
        let reading = |d: &Digest| Some(stats(100, d.as_str() != digest(2), None));
        assert!(pulls.take_due(t0, reading).is_empty());
        let done = |d: &Digest| Some(stats(100, true, (d.as_str() == digest(1)).then_some(2.0)));
        let reports = pulls.take_due(t0 + Duration::from_secs(10), done);
        assert_eq!(reports.len(), 1);
        let r = &reports[0];
        assert_eq!(r.bytes_fetched, 200, "the two lazy layers' bytes");
        assert_eq!(r.fully_local_seconds, None, "layer 2 is not fully local");
        let modes: Vec<LayerMode> = r.layers.iter().map(|l| l.mode).collect();
        assert_eq!(
            modes,
            [LayerMode::Lazy, LayerMode::Lazy, LayerMode::Fallback]
        );
        assert_eq!(r.layers[2].reason.as_deref(), Some("no zTOC"));
        assert_eq!(
            r.manifest.as_ref().map(Digest::as_str),
            Some(digest(9).as_str())
        );
        assert!(
            pulls.take_due(t0 + MAX_WAIT, done).is_empty(),
            "reported once"
        );

        // Every lazy layer fully local: the slowest one's time.
        pulls.record(&layer(3), LayerMode::Lazy, None, t0);
        let local = |_: &Digest| Some(stats(1, false, Some(3.5)));
        assert_eq!(pulls.take_due(t0, local)[0].fully_local_seconds, Some(3.5));
    }

    #[test]
    fn a_fallback_pull_without_its_last_layer_is_reported_after_a_quiet_time() {
        let t0 = Instant::now();
        let pulls = PullTracker::new(true);
        pulls.record(&layer(1), LayerMode::Fallback, Some("no zTOC".into()), t0);
        assert!(pulls.take_due(t0 + QUIET / 2, |_| None).is_empty());
        let r = pulls.take_due(t0 + QUIET, |_| None);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].bytes_fetched, 0);

        // A lazy layer whose stats never show: reported at the latest after MAX_WAIT.
        pulls.record(&layer(3), LayerMode::Lazy, None, t0);
        assert!(pulls.take_due(t0 + QUIET, |_| None).is_empty());
        assert_eq!(pulls.take_due(t0 + MAX_WAIT, |_| None).len(), 1);

        // Without trace windows, the start's reads are done START_WINDOW after the last prepare.
        let untraced = PullTracker::new(false);
        untraced.record(&layer(3), LayerMode::Lazy, None, t0);
        assert!(
            untraced
                .take_due(t0, |_| Some(stats(1, false, None)))
                .is_empty()
        );
        assert_eq!(
            untraced
                .take_due(t0 + START_WINDOW, |_| Some(stats(1, false, None)))
                .len(),
            1
        );
    }

    #[test]
    fn pending_pulls_layers_and_reasons_are_bounded() {
        let t0 = Instant::now();
        let pulls = PullTracker::new(true);
        for i in 0..(MAX_PENDING + 10) {
            let mut l = layer(1);
            l.manifest_digest = None;
            l.image_ref = Some(format!("registry.test/app{i}:1"));
            pulls.record(
                &l,
                LayerMode::Fallback,
                Some("é".repeat(MAX_REASON_LEN)),
                t0,
            );
        }
        let reports = pulls.take_due(t0 + QUIET, |_| None);
        assert_eq!(reports.len(), MAX_PENDING);
        let reason = reports[0].layers[0].reason.as_deref().unwrap_or_default();
        assert!(reason.len() <= MAX_REASON_LEN && !reason.is_empty());

        for n in 0..=200u16 {
            let mut l = layer(1);
            l.layer_digest = format!("sha256:{n:064x}");
            pulls.record(&l, LayerMode::Lazy, None, t0);
        }
        let reports = pulls.take_due(t0 + MAX_WAIT, |_| None);
        assert_eq!(reports[0].layers.len(), MAX_LAYERS_PER_REPORT);
    }
}
