//! Pod starts as nodes report them (`POST /v1/pulls`, a [`PullReport`]): how a pull went as a
//! whole ([`classify`]), which pods it started ([`attribute`]), and the per-image counters with
//! the last few pods ([`StartStats`]) that `HermesImage` statuses and `hermes status` show.
//!
//! Plain functions over values: the adapters read pods and write Events; nothing here does I/O.

use std::collections::BTreeMap;

use hermes_node_api::{LayerMode, PullReport};
use hermes_oci_types::{Digest, Reference};
use serde::{Deserialize, Serialize};

/// How many pods [`StartStats::last_pods`] keeps.
pub const LAST_PODS: usize = 5;

/// How a pull went for the pods it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum StartMode {
    /// At least one layer was mounted lazily.
    Lazy,
    /// No layer was lazy and at least one was meant to be.
    Fallback,
    /// Every layer was pulled normally on purpose (an `Off` policy).
    Normal,
}

/// A pull's mode and, unless every layer was lazy, why not: the distinct layer reasons with
/// how many layers each, e.g. `2 of 3 layers pulled normally: no zTOC (2)`.
pub fn classify(report: &PullReport) -> (StartMode, Option<String>) {
    let lazy = report
        .layers
        .iter()
        .filter(|l| l.mode == LayerMode::Lazy)
        .count();
    let fallback = report.layers.iter().any(|l| l.mode == LayerMode::Fallback);
    let mode = if lazy > 0 {
        StartMode::Lazy
    } else if fallback || report.layers.is_empty() {
        StartMode::Fallback
    } else {
        StartMode::Normal
    };
    let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
    for l in report.layers.iter().filter(|l| l.mode != LayerMode::Lazy) {
        *reasons
            .entry(l.reason.as_deref().unwrap_or("no reason given"))
            .or_default() += 1;
    }
    let reason = if report.layers.is_empty() {
        Some("the node prepared no layer".to_owned())
    } else if reasons.is_empty() {
        None
    } else {
        let list: Vec<String> = reasons.iter().map(|(r, n)| format!("{r} ({n})")).collect();
        Some(format!(
            "{} of {} layers pulled normally: {}",
            report.layers.len() - lazy,
            report.layers.len(),
            list.join("; ")
        ))
    };
    (mode, reason)
}

/// A pod that may have been started by a pull: where it is scheduled and what its containers
/// run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodCandidate {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID.
    pub uid: String,
    /// The node it is scheduled on (`spec.nodeName`).
    pub node: String,
    /// The images its containers name.
    pub images: Vec<Reference>,
    /// The manifest digests its containers run (`imageID`, resolved to the platform manifest
    /// where known).
    pub digests: Vec<Digest>,
}

/// The pods `report` started. A report that names its pod started that pod (found among
/// `candidates` by namespace and name, else as the node named it). Otherwise: the pods on the
/// report's node whose containers use the image (by reference, or by digest) and for which
/// `started` says no start of the image was recorded yet. A report without a node, or whose
/// image is neither parsable nor has a manifest digest, is attributed to no pod.
pub fn attribute(
    report: &PullReport,
    candidates: &[PodCandidate],
    started: impl Fn(&PodCandidate) -> bool,
) -> Vec<PodCandidate> {
    if let Some(pod) = &report.pod {
        let known = candidates
            .iter()
            .find(|c| c.namespace == pod.namespace && c.name == pod.name);
        return vec![known.cloned().unwrap_or_else(|| PodCandidate {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            uid: pod.uid.clone(),
            node: report.node.clone().unwrap_or_default(),
            images: Vec::new(),
            digests: Vec::new(),
        })];
    }
    let Some(node) = report.node.as_deref().filter(|n| !n.is_empty()) else {
        return Vec::new();
    };
    let image = Reference::parse(&report.image).ok();
    candidates
        .iter()
        .filter(|c| c.node == node)
        .filter(|c| {
            image.as_ref().is_some_and(|i| c.images.contains(i))
                || report
                    .manifest
                    .as_ref()
                    .is_some_and(|m| c.digests.contains(m))
        })
        .filter(|c| !started(c))
        .cloned()
        .collect()
}

/// One pod's start of an image, as the image's status lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct PodStart {
    /// The pod's namespace (empty when the pull could not be attributed to a pod).
    pub namespace: String,
    /// The pod's name (empty when unknown).
    pub name: String,
    /// The node that pulled.
    pub node: String,
    /// How the pull went.
    pub mode: StartMode,
    /// Compressed bytes fetched on demand until the start's reads were done.
    pub bytes_fetched: u64,
    /// Seconds until every lazy layer was fully local, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fully_local_seconds: Option<f64>,
    /// Why not (every layer) lazy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the controller recorded it (Unix seconds).
    pub at_unix: u64,
}

impl PodStart {
    /// The start of `pod` (if known) by `report`, recorded at `at_unix`.
    pub fn new(report: &PullReport, pod: Option<&PodCandidate>, at_unix: u64) -> Self {
        let (mode, reason) = classify(report);
        Self {
            namespace: pod.map(|p| p.namespace.clone()).unwrap_or_default(),
            name: pod.map(|p| p.name.clone()).unwrap_or_default(),
            node: report.node.clone().unwrap_or_default(),
            mode,
            bytes_fetched: report.bytes_fetched,
            fully_local_seconds: report.fully_local_seconds,
            reason,
            at_unix,
        }
    }
}

/// An image's starts: counters since the controller first saw it, and the last
/// [`LAST_PODS`] pods, newest first.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct StartStats {
    /// Starts with at least one lazy layer.
    pub lazy_starts: u64,
    /// Starts that fell back to a normal pull.
    pub fallbacks: u64,
    /// The last pods started, newest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub last_pods: Vec<PodStart>,
}

impl StartStats {
    /// Count `start` and keep it first among the last pods.
    pub fn record(&mut self, start: PodStart) {
        match start.mode {
            StartMode::Lazy => self.lazy_starts += 1,
            StartMode::Fallback => self.fallbacks += 1,
            StartMode::Normal => {}
        }
        self.last_pods.insert(0, start);
        self.last_pods.truncate(LAST_PODS);
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.lazy_starts == 0 && self.fallbacks == 0 && self.last_pods.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::digest;
    use hermes_node_api::{PodRef, PullLayer};

    fn layer(n: u8, mode: LayerMode, reason: Option<&str>) -> PullLayer {
        PullLayer {
            digest: digest(n),
            mode,
            reason: reason.map(str::to_owned),
        }
    }

    fn report(layers: Vec<PullLayer>) -> PullReport {
        PullReport {
            image: "registry.test/app:1".into(),
            manifest: Some(digest(9)),
            node: Some("node-a".into()),
            pod: None,
            layers,
            bytes_fetched: 1234,
            fully_local_seconds: None,
        }
    }

    fn pod(name: &str, node: &str, image: &str, digests: &[u8]) -> PodCandidate {
        PodCandidate {
            namespace: "default".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            node: node.into(),
            images: vec![Reference::parse(image).unwrap()],
            digests: digests.iter().map(|&d| digest(d)).collect(),
        }
    }

    #[test]
    fn a_pull_is_lazy_with_any_lazy_layer_and_names_every_reason_otherwise() {
        let all_lazy = report(vec![layer(1, LayerMode::Lazy, None)]);
        assert_eq!(classify(&all_lazy), (StartMode::Lazy, None));

        let mixed = report(vec![
            layer(1, LayerMode::Fallback, Some("no zTOC")),
            layer(2, LayerMode::Lazy, None),
        ]);
        assert_eq!(
            classify(&mixed),
            (
                StartMode::Lazy,
                Some("1 of 2 layers pulled normally: no zTOC (1)".into())
            )
        );

        let fallback = report(vec![
            layer(1, LayerMode::Fallback, Some("no zTOC")),
            layer(2, LayerMode::Fallback, Some("cache full")),
            layer(3, LayerMode::Fallback, Some("no zTOC")),
        ]);
        assert_eq!(
            classify(&fallback),
            (
                StartMode::Fallback,
                Some("3 of 3 layers pulled normally: cache full (1); no zTOC (2)".into())
            )
        );

        let off = report(vec![layer(1, LayerMode::Normal, Some("policy p: Off"))]);
        assert_eq!(classify(&off).0, StartMode::Normal);
        assert_eq!(classify(&report(Vec::new())).0, StartMode::Fallback);
    }

    #[test]
    fn an_unnamed_pull_goes_to_the_nodes_pods_of_the_image_not_yet_started() {
        let r = report(vec![layer(1, LayerMode::Lazy, None)]);
        let candidates = vec![
            pod("by-ref", "node-a", "registry.test/app:1", &[]),
            // Named otherwise, but runs the manifest.
            pod("by-digest", "node-a", "registry.test/renamed:2", &[9]),
            pod("other-node", "node-b", "registry.test/app:1", &[9]),
            pod("other-image", "node-a", "registry.test/other:1", &[8]),
            pod("done", "node-a", "registry.test/app:1", &[9]),
        ];
        let got: Vec<String> = attribute(&r, &candidates, |c| c.name == "done")
            .into_iter()
            .map(|c| c.name)
            .collect();
        assert_eq!(got, ["by-ref", "by-digest"]);

        // Without a node nothing is attributed; a short reference matches its long form.
        let mut no_node = r.clone();
        no_node.node = None;
        assert!(attribute(&no_node, &candidates, |_| false).is_empty());
        let mut short = r.clone();
        short.image = "busybox".into();
        short.manifest = None;
        let busy = vec![pod("b", "node-a", "docker.io/library/busybox:latest", &[])];
        assert_eq!(attribute(&short, &busy, |_| false).len(), 1);
    }

    #[test]
    fn a_pull_naming_its_pod_starts_that_pod_only() {
        let mut r = report(vec![layer(1, LayerMode::Lazy, None)]);
        r.pod = Some(PodRef {
            namespace: "default".into(),
            name: "named".into(),
            uid: "u1".into(),
            labels: Default::default(),
        });
        let candidates = vec![
            pod("named", "node-a", "registry.test/app:1", &[9]),
            pod("sibling", "node-a", "registry.test/app:1", &[9]),
        ];
        let got = attribute(&r, &candidates, |_| false);
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].name.as_str(), got[0].uid.as_str()),
            ("named", "uid-named")
        );
        // Not among the candidates (not seen yet): as the node named it.
        let got = attribute(&r, &[], |_| false);
        assert_eq!((got[0].name.as_str(), got[0].uid.as_str()), ("named", "u1"));
    }

    #[test]
    fn counters_count_every_start_and_keep_the_last_pods_newest_first() {
        let mut stats = StartStats::default();
        assert!(stats.is_empty());
        let lazy = report(vec![layer(1, LayerMode::Lazy, None)]);
        let fallback = report(vec![layer(1, LayerMode::Fallback, Some("no zTOC"))]);
        for i in 0..7u64 {
            let r = if i % 2 == 0 { &lazy } else { &fallback };
            let p = pod(&format!("p{i}"), "node-a", "registry.test/app:1", &[]);
            stats.record(PodStart::new(r, Some(&p), 100 + i));
        }
        assert_eq!((stats.lazy_starts, stats.fallbacks), (4, 3));
        let names: Vec<&str> = stats.last_pods.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["p6", "p5", "p4", "p3", "p2"]);
        assert_eq!(stats.last_pods[1].mode, StartMode::Fallback);
        assert_eq!(
            stats.last_pods[1].reason.as_deref(),
            Some("1 of 1 layers pulled normally: no zTOC (1)")
        );
        assert_eq!(stats.last_pods[0].bytes_fetched, 1234);
        let json = serde_json::to_value(&stats).unwrap();
        assert_eq!(json["lazyStarts"], 4);
        assert_eq!(json["lastPods"][0]["node"], "node-a");
    }
}
