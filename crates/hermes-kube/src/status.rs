//! The core's statuses as Kubernetes status objects, as plain functions: an [`ImageStatus`]
//! becomes a `HermesImage` spec and status, a [`PolicyStatus`] a `HermesPolicy` status whose
//! conditions keep their `lastTransitionTime` while their status does not change, and a phase
//! change of an image becomes the pod Event to publish (`HermesIndexReady`/`HermesIndexFailed`),
//! and a node's pull report the pod's start Event (`HermesLazyStart`/`HermesFallback`).

use hermes_controller::reconcile::{LayerState, Phase, PolicyStatus};
use hermes_controller::starts::{StartMode, classify};
use hermes_controller::status::ImageReport;
use hermes_node_api::{LayerMode, PullReport};

use crate::crd::{
    Condition, HermesImageSpec, HermesImageStatus, HermesPolicyStatus, ImageLayer, ImagePhase,
};

/// Event reason when an image a pod runs is indexed.
pub const REASON_READY: &str = "HermesIndexReady";
/// Event reason when indexing an image a pod runs failed.
pub const REASON_FAILED: &str = "HermesIndexFailed";
/// Event reason when a node started a pod's image lazily.
pub const REASON_LAZY_START: &str = "HermesLazyStart";
/// Event reason when a node pulled a pod's image normally although it was meant to be lazy.
pub const REASON_FALLBACK: &str = "HermesFallback";

/// The phase as the CRD spells it.
pub fn phase(p: Phase) -> ImagePhase {
    match p {
        Phase::Pending => ImagePhase::Pending,
        Phase::Building => ImagePhase::Building,
        Phase::Ready => ImagePhase::Ready,
        Phase::Failed => ImagePhase::Failed,
        Phase::Skipped => ImagePhase::Skipped,
    }
}

/// `HermesImage` spec and status for an image report. `previous` is the status last written,
/// whose `readyTime` is kept while the image stays `Ready`; `now` is RFC 3339.
pub fn image(
    report: &ImageReport,
    previous: Option<&HermesImageStatus>,
    now: &str,
) -> (HermesImageSpec, HermesImageStatus) {
    let s = &report.status;
    let spec = HermesImageSpec {
        image: s.reference.clone(),
        digest: s.digest.to_string(),
        policy: s.policy.clone(),
    };
    let layers: Vec<ImageLayer> = s
        .layers
        .iter()
        .map(|l| {
            let (state, reason) = match &l.state {
                LayerState::Indexed => ("Indexed", None),
                LayerState::Skipped { reason } => ("Skipped", Some(reason.clone())),
                LayerState::Pending => ("Pending", None),
                LayerState::Queued => ("Queued", None),
                LayerState::Building { attempt } => {
                    ("Building", Some(format!("attempt {attempt}")))
                }
                LayerState::Retrying {
                    failures,
                    last_error,
                } => (
                    "Retrying",
                    Some(format!("{failures} failed attempts, last: {last_error}")),
                ),
                LayerState::Failed { reason } => ("Failed", Some(reason.clone())),
            };
            ImageLayer {
                digest: l.digest.to_string(),
                size: l.size,
                state: state.to_owned(),
                reason,
            }
        })
        .collect();
    let indexed = layers.iter().filter(|l| l.state == "Indexed").count();
    let phase = phase(s.phase);
    let ready_time = (phase == ImagePhase::Ready).then(|| {
        previous
            .filter(|p| p.phase == ImagePhase::Ready)
            .and_then(|p| p.ready_time.clone())
            .unwrap_or_else(|| now.to_owned())
    });
    let status = HermesImageStatus {
        phase,
        reason: s.reason.clone(),
        pods: s.pods,
        indexed_layers: u32::try_from(indexed).unwrap_or(u32::MAX),
        layers,
        ready_time,
        // Whole milliseconds, so an unchanged report compares equal after a round trip.
        build_seconds: (report.build_seconds * 1000.0).round() / 1000.0,
        bytes_read: report.bytes_read,
        last_error: report.last_error.clone(),
        starts: report.starts.clone(),
    };
    (spec, status)
}

/// `HermesPolicy` status for a core policy status of the spec at `generation`; conditions whose
/// status is unchanged since `previous` keep their transition time.
pub fn policy(
    s: &PolicyStatus,
    generation: Option<i64>,
    previous: Option<&HermesPolicyStatus>,
    now: &str,
) -> HermesPolicyStatus {
    let conditions = s
        .conditions
        .iter()
        .map(|c| {
            let since = previous
                .and_then(|p| p.conditions.iter().find(|o| o.type_ == c.kind))
                .filter(|o| o.status == c.status)
                .map(|o| o.last_transition_time.clone());
            Condition {
                type_: c.kind.clone(),
                status: c.status.clone(),
                reason: c.reason.clone(),
                message: c.message.clone(),
                last_transition_time: since.unwrap_or_else(|| now.to_owned()),
                observed_generation: generation,
            }
        })
        .collect();
    HermesPolicyStatus {
        observed_generation: generation,
        matched_images: s.matched_images,
        ready_images: s.ready_images,
        conditions,
    }
}

/// The pod Event for an image whose phase went from `before` (`None`: not seen before) to
/// `after`: `(reason, warning, note)`. Only entering `Ready` or `Failed` is an event.
pub fn phase_event(
    before: Option<ImagePhase>,
    after: &HermesImageStatus,
    spec: &HermesImageSpec,
) -> Option<(&'static str, bool, String)> {
    if before == Some(after.phase) {
        return None;
    }
    match after.phase {
        ImagePhase::Ready => Some((
            REASON_READY,
            false,
            format!(
                "image {} ({}) is indexed for lazy loading: {} of {} layers (policy {})",
                spec.image,
                spec.digest,
                after.indexed_layers,
                after.layers.len(),
                spec.policy
            ),
        )),
        ImagePhase::Failed => Some((
            REASON_FAILED,
            true,
            format!(
                "indexing image {} failed (policy {}); retried later: {}",
                spec.image,
                spec.policy,
                after.reason.as_deref().unwrap_or("unknown error")
            ),
        )),
        _ => None,
    }
}

/// The pod Event for a node's pull of `report`: `(reason, warning, note)`; `None` for a pull
/// that was normal on purpose (an `Off` policy: nothing to say per pod).
pub fn start_event(report: &PullReport) -> Option<(&'static str, bool, String)> {
    let (mode, reason) = classify(report);
    let node = report.node.as_deref().unwrap_or("a node");
    match mode {
        StartMode::Lazy => {
            let lazy = report
                .layers
                .iter()
                .filter(|l| l.mode == LayerMode::Lazy)
                .count();
            let mut note = format!(
                "image {} started lazily on {node}: {} bytes fetched on demand until the \
                 start's reads were done; {lazy} of {} layers lazy",
                report.image,
                report.bytes_fetched,
                report.layers.len()
            );
            if let Some(s) = report.fully_local_seconds {
                note.push_str(&format!("; fully local after {s:.1} s"));
            }
            if let Some(r) = reason {
                note.push_str(&format!(" ({r})"));
            }
            Some((REASON_LAZY_START, false, note))
        }
        StartMode::Fallback => Some((
            REASON_FALLBACK,
            true,
            format!(
                "image {} was pulled normally on {node}, not lazily: {}",
                report.image,
                reason.as_deref().unwrap_or("no reason given")
            ),
        )),
        StartMode::Normal => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hermes_controller::reconcile::{Condition as CoreCondition, ImageStatus, LayerStatus};
    use hermes_oci::Digest;

    fn digest(c: char) -> Digest {
        Digest::parse(&format!("sha256:{}", c.to_string().repeat(64))).unwrap()
    }

    fn core_image(phase: Phase) -> ImageReport {
        let status = ImageStatus {
            digest: digest('a'),
            reference: "registry.test/app:v1".to_owned(),
            policy: "web".to_owned(),
            phase,
            reason: (phase == Phase::Failed).then(|| "registry unreachable".to_owned()),
            pods: 2,
            layers: vec![
                LayerStatus {
                    digest: digest('b'),
                    size: 20 << 20,
                    state: LayerState::Indexed,
                },
                LayerStatus {
                    digest: digest('c'),
                    size: 100,
                    state: LayerState::Skipped {
                        reason: "100 bytes is below minLayerSize (10485760)".to_owned(),
                    },
                },
            ],
        };
        ImageReport {
            status,
            build_seconds: 1.23456,
            bytes_read: 20 << 20,
            last_error: None,
            updated_at_unix: 0,
            starts: Default::default(),
        }
    }

    #[test]
    fn start_events_name_bytes_for_lazy_starts_and_the_reason_for_fallbacks() {
        let layer = |mode, reason: Option<&str>| hermes_node_api::PullLayer {
            digest: digest('b'),
            mode,
            reason: reason.map(str::to_owned),
        };
        let mut report = PullReport {
            image: "r.test/app:1".into(),
            manifest: None,
            node: Some("node-1".into()),
            pod: None,
            layers: vec![layer(LayerMode::Lazy, None)],
            bytes_fetched: 4096,
            fully_local_seconds: Some(2.5),
        };
        let (reason, warning, note) = start_event(&report).unwrap();
        assert_eq!((reason, warning), (REASON_LAZY_START, false));
        assert!(note.contains("4096 bytes fetched on demand"), "{note}");
        assert!(note.contains("fully local after 2.5 s"), "{note}");
        report.layers = vec![layer(LayerMode::Fallback, Some("no zTOC for the layer"))];
        let (reason, warning, note) = start_event(&report).unwrap();
        assert_eq!((reason, warning), (REASON_FALLBACK, true));
        assert!(
            note.ends_with("1 of 1 layers pulled normally: no zTOC for the layer (1)"),
            "{note}"
        );
        report.layers = vec![layer(LayerMode::Normal, Some("policy p has mode Off"))];
        assert_eq!(start_event(&report), None);
    }

    #[test]
    fn image_status_keeps_ready_time_while_ready() {
        let (spec, first) = image(&core_image(Phase::Ready), None, "T1");
        assert_eq!(spec.digest, digest('a').to_string());
        assert_eq!(first.phase, ImagePhase::Ready);
        assert_eq!(first.indexed_layers, 1);
        assert_eq!(first.layers[1].state, "Skipped");
        assert_eq!(first.ready_time.as_deref(), Some("T1"));
        assert_eq!((first.build_seconds, first.bytes_read), (1.235, 20 << 20));
        let (_, again) = image(&core_image(Phase::Ready), Some(&first), "T2");
        assert_eq!(again.ready_time.as_deref(), Some("T1"));
        let (_, building) = image(&core_image(Phase::Building), Some(&first), "T3");
        assert_eq!(building.ready_time, None);
        let (_, ready) = image(&core_image(Phase::Ready), Some(&building), "T4");
        assert_eq!(ready.ready_time.as_deref(), Some("T4"));
    }

    #[test]
    fn events_only_when_entering_ready_or_failed() {
        let (spec, ready) = image(&core_image(Phase::Ready), None, "T");
        let (_, failed) = image(&core_image(Phase::Failed), None, "T");
        let (_, building) = image(&core_image(Phase::Building), None, "T");
        let (reason, warning, note) = phase_event(None, &ready, &spec).unwrap();
        assert_eq!((reason, warning), (REASON_READY, false));
        assert!(note.contains("1 of 2 layers"), "{note}");
        assert!(phase_event(Some(ImagePhase::Ready), &ready, &spec).is_none());
        let (reason, warning, note) =
            phase_event(Some(ImagePhase::Building), &failed, &spec).unwrap();
        assert_eq!((reason, warning), (REASON_FAILED, true));
        assert!(note.contains("registry unreachable"), "{note}");
        assert!(phase_event(Some(ImagePhase::Pending), &building, &spec).is_none());
    }

    #[test]
    fn policy_conditions_keep_transition_time_until_status_changes() {
        let core = |ready: &str| PolicyStatus {
            name: "web".to_owned(),
            matched_images: 1,
            ready_images: u32::from(ready == "True"),
            conditions: vec![
                CoreCondition {
                    kind: "Valid".to_owned(),
                    status: "True".to_owned(),
                    reason: "Valid".to_owned(),
                    message: "spec accepted".to_owned(),
                },
                CoreCondition {
                    kind: "Ready".to_owned(),
                    status: ready.to_owned(),
                    reason: "X".to_owned(),
                    message: String::new(),
                },
            ],
        };
        let first = policy(&core("False"), Some(1), None, "T1");
        assert_eq!(first.observed_generation, Some(1));
        let second = policy(&core("True"), Some(2), Some(&first), "T2");
        assert_eq!(second.conditions[0].last_transition_time, "T1");
        assert_eq!(second.conditions[1].last_transition_time, "T2");
        assert_eq!(second.conditions[1].observed_generation, Some(2));
        assert_eq!(second.ready_images, 1);
    }
}
