//! Which policy applies to a running container.
//!
//! A policy matches a container when one of its image patterns matches the container's image
//! (and resolved digest) and its namespace and pod selectors match. Among matching policies:
//!
//! 1. any policy with `mode: Off` wins (the kill switch beats everything for the images it
//!    matches, however specific the others are);
//! 2. otherwise the most specific wins, compared by [`Specificity`]: a digest pin beats an exact
//!    image, which beats a glob; among globs a longer literal prefix wins; then more selector
//!    requirements; then the policy name in ascending order, so the answer never depends on the
//!    order policies were listed in.

use std::cmp::Reverse;

use hermes_node_api::PodRef;
use hermes_oci_types::{Digest, Reference};

use crate::pattern::ImagePattern;
use crate::policy::{Mode, Policy};
use crate::selector::{LabelSelector, Labels};

/// A container seen running, as the matcher needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningContainer {
    /// The pod's namespace (empty in standalone mode without namespaces).
    pub namespace: String,
    /// The pod's name (used to count pods per image).
    pub pod: String,
    /// Labels of the namespace.
    pub namespace_labels: Labels,
    /// Labels of the pod.
    pub pod_labels: Labels,
    /// The image as the pod spec names it.
    pub image: Reference,
    /// The digest the runtime resolved it to (`imageID`), once known.
    pub digest: Option<Digest>,
}

/// How specific a policy's match is; greater is more specific.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Specificity {
    /// The matching pattern pins a digest.
    pub pinned: bool,
    /// The matching pattern has no wildcard.
    pub exact: bool,
    /// Length of the pattern's literal prefix (normalised).
    pub literal_prefix: usize,
    /// Requirements in the namespace and pod selectors.
    pub selectors: usize,
}

/// The matcher's answer for one container.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision<'p> {
    /// No policy matches: the image is left alone.
    Unmatched,
    /// An `Off` policy matches: no index, no lazy start.
    Off {
        /// The (most specific) `Off` policy.
        policy: &'p Policy,
    },
    /// This policy applies.
    Apply {
        /// The winning policy.
        policy: &'p Policy,
        /// Its pattern that matched best.
        pattern: &'p ImagePattern,
        /// How specific the match is.
        specificity: Specificity,
    },
}

impl<'p> Decision<'p> {
    /// The policy decided on, if any.
    pub fn policy(&self) -> Option<&'p Policy> {
        match *self {
            Self::Unmatched => None,
            Self::Off { policy } | Self::Apply { policy, .. } => Some(policy),
        }
    }
}

/// How specifically `policy` matches `container`, or `None` if it does not.
pub fn match_policy<'p>(
    policy: &'p Policy,
    container: &RunningContainer,
) -> Option<(&'p ImagePattern, Specificity)> {
    let selects =
        |s: &Option<LabelSelector>, labels: &Labels| s.as_ref().is_none_or(|s| s.matches(labels));
    if !selects(&policy.namespace_selector, &container.namespace_labels)
        || !selects(&policy.pod_selector, &container.pod_labels)
    {
        return None;
    }
    let selectors = [&policy.namespace_selector, &policy.pod_selector]
        .into_iter()
        .flatten()
        .map(LabelSelector::requirement_count)
        .sum();
    policy
        .images
        .iter()
        .filter(|p| p.matches(&container.image, container.digest.as_ref()))
        .map(|p| {
            (
                p,
                Specificity {
                    pinned: p.digest().is_some(),
                    exact: p.is_exact(),
                    literal_prefix: p.literal_prefix_len(),
                    selectors,
                },
            )
        })
        .max_by_key(|(p, s)| (*s, Reverse(p.normalized())))
}

/// The policy that applies to `container`.
pub fn decide<'p>(policies: &'p [Policy], container: &RunningContainer) -> Decision<'p> {
    let best = |off: bool| {
        policies
            .iter()
            .filter(|p| (p.mode == Mode::Off) == off)
            .filter_map(|p| match_policy(p, container).map(|(pat, s)| (p, pat, s)))
            .max_by_key(|(p, _, s)| (*s, Reverse(p.name.as_str())))
    };
    if let Some((policy, _, _)) = best(true) {
        return Decision::Off { policy };
    }
    match best(false) {
        Some((policy, pattern, specificity)) => Decision::Apply {
            policy,
            pattern,
            specificity,
        },
        None => Decision::Unmatched,
    }
}

/// The `Off` policy that forbids nodes to start `image` (resolved to `manifest`) lazily, if
/// any. A node asking for a zTOC knows the image but neither the pod nor its namespace, so only
/// `Off` policies without selectors apply here; one with selectors still stops the builds of
/// the images it matches. Ties go to the first name, so the answer is deterministic.
pub fn off_for_node<'p>(
    policies: &'p [Policy],
    image: &Reference,
    manifest: Option<&Digest>,
) -> Option<&'p Policy> {
    policies
        .iter()
        .filter(|p| p.mode == Mode::Off)
        .filter(|p| p.namespace_selector.is_none() && p.pod_selector.is_none())
        .filter(|p| p.images.iter().any(|pat| pat.matches(image, manifest)))
        .min_by(|a, b| a.name.cmp(&b.name))
}

/// The policy whose `mode` and `fullyLocalWithin` a node serving `image` (resolved to
/// `manifest`) follows, if one applies. As for a miss, a zTOC lookup comes with no pod, so
/// it is the policy that applies to an unlabelled pod of the image; `Off` policies refuse the
/// lookup before this is asked ([`off_for_node`]).
pub fn for_node<'p>(
    policies: &'p [Policy],
    image: &Reference,
    manifest: Option<&Digest>,
) -> Option<&'p Policy> {
    match decide(policies, &unlabelled(image, manifest)) {
        Decision::Apply { policy, .. } => Some(policy),
        Decision::Off { .. } | Decision::Unmatched => None,
    }
}

/// The pod a node pulls an image for, when it knows it (from its CRI proxy).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodePod {
    /// Its namespace.
    pub namespace: String,
    /// The namespace's labels (as the controller knows them; none if it does not).
    pub namespace_labels: Labels,
    /// Its labels.
    pub pod_labels: Labels,
}

/// What the controller tells a node that asks for a layer of an image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NodeDecision<'p> {
    /// This `Off` policy forbids a lazy start.
    Refuse(&'p Policy),
    /// Serve the layer as this policy says (its mode and `fullyLocalWithin`).
    Follow(&'p Policy),
    /// No policy speaks of it: the node's defaults.
    Defaults,
}

/// The decision for a node pulling `image` (resolved to `manifest`) for `pod`. With the pod,
/// every policy's selectors apply, as to a running container ([`decide`]); without it, only
/// `Off` policies without selectors refuse ([`off_for_node`]) and the mode is that of the
/// policy for an unlabelled pod ([`for_node`]).
pub fn decide_for_node<'p>(
    policies: &'p [Policy],
    image: &Reference,
    manifest: Option<&Digest>,
    pod: Option<&NodePod>,
) -> NodeDecision<'p> {
    let Some(pod) = pod else {
        if let Some(off) = off_for_node(policies, image, manifest) {
            return NodeDecision::Refuse(off);
        }
        return for_node(policies, image, manifest)
            .map_or(NodeDecision::Defaults, NodeDecision::Follow);
    };
    let container = RunningContainer {
        namespace: pod.namespace.clone(),
        namespace_labels: pod.namespace_labels.clone(),
        pod_labels: pod.pod_labels.clone(),
        ..unlabelled(image, manifest)
    };
    match decide(policies, &container) {
        Decision::Off { policy } => NodeDecision::Refuse(policy),
        Decision::Apply { policy, .. } => NodeDecision::Follow(policy),
        Decision::Unmatched => NodeDecision::Defaults,
    }
}

/// A pod with no labels in no namespace running `image`: what a node's request stands for.
fn unlabelled(image: &Reference, digest: Option<&Digest>) -> RunningContainer {
    RunningContainer {
        namespace: String::new(),
        pod: String::new(),
        namespace_labels: Labels::default(),
        pod_labels: Labels::default(),
        image: image.clone(),
        digest: digest.cloned(),
    }
}

/// The label Kubernetes puts on every namespace, naming it: the one namespace label a node
/// knows for a miss.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// A node's miss as a running container: of the pod the node named (its namespace, with
/// [`NAMESPACE_NAME_LABEL`] as the namespace's only label, and its labels), else of no pod.
pub fn miss_container(
    image: &Reference,
    digest: Option<&Digest>,
    pod: Option<&PodRef>,
    pod_name: &str,
) -> RunningContainer {
    let namespace = pod.map(|p| p.namespace.clone()).unwrap_or_default();
    RunningContainer {
        namespace_labels: pod
            .map(|_| [(NAMESPACE_NAME_LABEL.to_owned(), namespace.clone())].into())
            .unwrap_or_default(),
        namespace,
        pod: pod_name.to_owned(),
        pod_labels: pod.map(|p| p.labels.clone()).unwrap_or_default(),
        image: image.clone(),
        digest: digest.cloned(),
    }
}

/// Whether a node's miss for `image` (resolved to `digest`, if the node knows it) can lead to
/// a build: a policy that is not `Off` selects it. A miss that names its pod is matched with
/// the pod's namespace and labels ([`miss_container`]); without one, as in the reconciler only
/// policies whose selectors accept an unlabelled pod count. Without a digest, a pinned pattern
/// counts when the rest of it matches: the digest, then resolved from the registry the policy
/// names, decides. The engine asks this before any network I/O for a miss, since a miss may
/// name any host.
pub fn selects_miss(
    policies: &[Policy],
    image: &Reference,
    digest: Option<&Digest>,
    pod: Option<&PodRef>,
) -> bool {
    let miss = miss_container(image, digest, pod, "");
    match decide(policies, &miss) {
        Decision::Apply { .. } => true,
        Decision::Off { .. } => false,
        Decision::Unmatched => {
            digest.is_none()
                && policies.iter().filter(|p| p.mode != Mode::Off).any(|p| {
                    p.images.iter().filter_map(ImagePattern::digest).any(|pin| {
                        let pinned = RunningContainer {
                            digest: Some(pin.clone()),
                            ..miss.clone()
                        };
                        match_policy(p, &pinned).is_some()
                    })
                })
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const PIN: &str =
        "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    pub(crate) use crate::testing::{container, policies};

    fn winner(policies: &[Policy], c: &RunningContainer) -> String {
        match decide(policies, c) {
            Decision::Unmatched => "-".to_owned(),
            Decision::Off { policy } => format!("off:{}", policy.name),
            Decision::Apply { policy, .. } => policy.name.clone(),
        }
    }

    #[test]
    fn most_specific_policy_wins() {
        let ps = policies(&[
            ("all", "  images: [\"**\"]\n"),
            ("acme", "  images: [\"ghcr.io/acme/**\"]\n"),
            ("acme-api", "  images: [\"ghcr.io/acme/api*\"]\n"),
            ("exact", "  images: [\"ghcr.io/acme/api-v2:1.0\"]\n"),
            (
                "pinned",
                &format!("  images: [\"ghcr.io/acme/**@{PIN}\"]\n"),
            ),
            (
                "prod-acme",
                "  images: [\"ghcr.io/acme/**\"]\n  namespaceSelector: {matchLabels: {env: prod}}\n",
            ),
        ]);
        let cases: &[(&str, &str, Option<&str>, &str)] = &[
            ("dev", "quay.io/x/y", None, "all"),
            ("dev", "ghcr.io/acme/web", None, "acme"),
            ("prod", "ghcr.io/acme/web", None, "prod-acme"),
            ("prod", "ghcr.io/acme/api", None, "acme-api"),
            ("dev", "ghcr.io/acme/api-v2:1.0", None, "exact"),
            ("dev", "ghcr.io/acme/api-v2:1.1", None, "acme-api"),
            ("dev", "ghcr.io/acme/api-v2:1.0", Some(PIN), "pinned"),
            ("dev", "ghcr.io/acme/web", Some(PIN), "pinned"),
        ];
        for (ns, image, digest, expected) in cases {
            let c = container(ns, "p", image, *digest);
            assert_eq!(winner(&ps, &c), *expected, "{ns} {image} {digest:?}");
        }
    }

    #[test]
    fn nodes_are_refused_images_an_off_policy_without_selectors_matches() {
        let ps = policies(&[
            ("lazy", "  images: [\"ghcr.io/acme/**\"]\n"),
            (
                "stop-web",
                "  images: [\"ghcr.io/acme/web\"]\n  mode: Off\n",
            ),
            (
                "a-stop-too",
                "  images: [\"ghcr.io/acme/web:*\"]\n  mode: Off\n",
            ),
            (
                "stop-dev",
                "  images: [\"ghcr.io/acme/api\"]\n  mode: Off\n  namespaceSelector: {matchLabels: {env: dev}}\n",
            ),
            (
                "stop-pinned",
                &format!("  images: [\"ghcr.io/acme/db@{PIN}\"]\n  mode: Off\n"),
            ),
        ]);
        let off = |image: &str, manifest: Option<&str>| {
            let manifest = manifest.map(|d| Digest::parse(d).unwrap());
            off_for_node(&ps, &Reference::parse(image).unwrap(), manifest.as_ref())
                .map(|p| p.name.clone())
        };
        // Two Off policies match: the first name wins, whatever the order they were given in.
        assert_eq!(
            off("ghcr.io/acme/web:1", None).as_deref(),
            Some("a-stop-too")
        );
        let reversed: Vec<Policy> = ps.iter().rev().cloned().collect();
        let web = Reference::parse("ghcr.io/acme/web:1").unwrap();
        assert_eq!(
            off_for_node(&reversed, &web, None).map(|p| p.name.as_str()),
            Some("a-stop-too")
        );
        // A selector-limited Off policy cannot be judged without the pod: not applied here.
        assert_eq!(off("ghcr.io/acme/api", None), None);
        // A digest pin applies to the manifest the node resolved, not to other versions.
        assert_eq!(
            off("ghcr.io/acme/db:1", Some(PIN)).as_deref(),
            Some("stop-pinned")
        );
        assert_eq!(off("ghcr.io/acme/db:1", None), None);
        assert_eq!(off("ghcr.io/acme/other", None), None);
    }

    #[test]
    fn a_node_that_knows_the_pod_gets_the_policy_its_namespace_and_labels_select() {
        let ps = policies(&[
            ("apps", "  images: [\"ghcr.io/acme/**\"]\n"),
            (
                "off-for-batch",
                "  images: [\"ghcr.io/acme/**\"]\n  mode: Off\n  namespaceSelector: {matchLabels: {team: batch}}\n",
            ),
            (
                "eager-web",
                "  images: [\"ghcr.io/acme/web\"]\n  mode: Eager\n  podSelector: {matchLabels: {app: web}}\n",
            ),
        ]);
        let web = Reference::parse("ghcr.io/acme/web:1").unwrap();
        let pod = |ns: &str, team: &str, app: &str| NodePod {
            namespace: ns.to_owned(),
            namespace_labels: [("team".to_owned(), team.to_owned())].into(),
            pod_labels: [("app".to_owned(), app.to_owned())].into(),
        };
        let name = |d: NodeDecision<'_>| match d {
            NodeDecision::Refuse(p) => format!("refuse {}", p.name),
            NodeDecision::Follow(p) => format!("follow {}", p.name),
            NodeDecision::Defaults => "defaults".to_owned(),
        };
        let for_pod = |p: Option<&NodePod>| name(decide_for_node(&ps, &web, None, p));
        assert_eq!(
            for_pod(Some(&pod("jobs", "batch", "web"))),
            "refuse off-for-batch"
        );
        assert_eq!(
            for_pod(Some(&pod("shop", "front", "web"))),
            "follow eager-web"
        );
        assert_eq!(for_pod(Some(&pod("shop", "front", "api"))), "follow apps");
        // Without the pod, the selector policies cannot apply: neither the Off nor the Eager.
        assert_eq!(for_pod(None), "follow apps");
        let other = Reference::parse("quay.io/x/y:1").unwrap();
        assert_eq!(
            name(decide_for_node(
                &ps,
                &other,
                None,
                Some(&pod("a", "b", "c"))
            )),
            "defaults"
        );
    }

    #[test]
    fn a_node_follows_the_most_specific_policy_that_applies_to_an_unlabelled_pod() {
        let ps = policies(&[
            ("apps", "  images: [\"ghcr.io/acme/**\"]\n"),
            (
                "eager-ml",
                "  images: [\"ghcr.io/acme/ml\"]\n  mode: Eager\n  fullyLocalWithin: 90s\n",
            ),
            (
                "labelled",
                "  images: [\"ghcr.io/acme/web\"]\n  mode: Prefetch\n  podSelector: {matchLabels: {app: x}}\n",
            ),
            ("stop-db", "  images: [\"ghcr.io/acme/db\"]\n  mode: Off\n"),
        ]);
        let name = |image: &str| {
            for_node(&ps, &Reference::parse(image).unwrap(), None).map(|p| p.name.clone())
        };
        assert_eq!(name("ghcr.io/acme/ml:2").as_deref(), Some("eager-ml"));
        let ml = for_node(&ps, &Reference::parse("ghcr.io/acme/ml:2").unwrap(), None).unwrap();
        assert_eq!(ml.mode, Mode::Eager);
        assert_eq!(
            ml.fully_local_within,
            Some(std::time::Duration::from_secs(90))
        );
        // A selector the request cannot satisfy: the broader policy applies.
        assert_eq!(name("ghcr.io/acme/web:1").as_deref(), Some("apps"));
        assert_eq!(
            name("ghcr.io/acme/db:1"),
            None,
            "Off is a refusal, not a mode"
        );
        assert_eq!(name("quay.io/other/app:1"), None);
    }

    #[test]
    fn misses_are_selected_only_by_policies_that_would_build_them() {
        let ps = policies(&[
            ("apps", "  images: [\"ghcr.io/acme/**\"]\n"),
            (
                "stop-web",
                "  images: [\"ghcr.io/acme/web\"]\n  mode: Off\n",
            ),
            (
                "labelled",
                "  images: [\"quay.io/team/**\"]\n  podSelector: {matchLabels: {app: x}}\n",
            ),
            (
                "pinned",
                &format!("  images: [\"docker.io/library/db@{PIN}\"]\n"),
            ),
        ]);
        let selects = |image: &str, digest: Option<&str>| {
            let digest = digest.map(|d| Digest::parse(d).unwrap());
            selects_miss(
                &ps,
                &Reference::parse(image).unwrap(),
                digest.as_ref(),
                None,
            )
        };
        assert!(selects("ghcr.io/acme/api:1", None));
        // Any host a node names is no reason to contact it.
        assert!(!selects("attacker.test:8080/acme/api:1", None));
        assert!(!selects("ghcr.io/acme/web:1", None), "Off builds nothing");
        assert!(
            !selects("quay.io/team/app:1", None),
            "a miss without its pod has no pod labels"
        );
        // A miss naming its pod is matched with the pod's labels and namespace.
        let pod = |ns: &str, app: &str| PodRef {
            namespace: ns.into(),
            name: "p".into(),
            uid: String::new(),
            labels: [("app".to_owned(), app.to_owned())].into(),
        };
        let image = Reference::parse("quay.io/team/app:1").unwrap();
        assert!(selects_miss(&ps, &image, None, Some(&pod("ns", "x"))));
        assert!(!selects_miss(&ps, &image, None, Some(&pod("ns", "y"))));
        let by_namespace = policies(&[(
            "team-ns",
            "  images: [\"quay.io/team/**\"]\n  namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: team}}\n",
        )]);
        assert!(selects_miss(
            &by_namespace,
            &image,
            None,
            Some(&pod("team", "y"))
        ));
        assert!(!selects_miss(
            &by_namespace,
            &image,
            None,
            Some(&pod("other", "y"))
        ));
        assert!(!selects_miss(&by_namespace, &image, None, None));
        // A pin: resolving its repository is fine; once resolved, the digest decides.
        assert!(selects("db:1", None));
        assert!(selects("db:1", Some(PIN)));
        assert!(!selects(
            "db:1",
            Some(&format!("sha256:{}", "b".repeat(64)))
        ));
        assert!(!selects("other:1", None));
    }

    #[test]
    fn off_is_a_kill_switch_for_the_images_it_matches() {
        let ps = policies(&[
            (
                "pinned",
                &format!("  images: [\"ghcr.io/acme/api@{PIN}\"]\n"),
            ),
            ("off-acme", "  images: [\"ghcr.io/acme/**\"]\n  mode: Off\n"),
            (
                "off-dev",
                "  images: [\"**\"]\n  mode: Off\n  namespaceSelector: {matchLabels: {env: dev}}\n",
            ),
            ("all", "  images: [\"**\"]\n"),
        ]);
        let cases: &[(&str, &str, Option<&str>, &str)] = &[
            ("prod", "ghcr.io/acme/api", Some(PIN), "off:off-acme"),
            ("prod", "quay.io/x/y", None, "all"),
            ("dev", "quay.io/x/y", None, "off:off-dev"),
            ("dev", "ghcr.io/acme/api", None, "off:off-acme"),
        ];
        for (ns, image, digest, expected) in cases {
            let c = container(ns, "p", image, *digest);
            assert_eq!(winner(&ps, &c), *expected, "{ns} {image}");
        }
    }

    #[test]
    fn selectors_filter_and_break_ties() {
        let ps = policies(&[
            ("b-plain", "  images: [\"nginx\"]\n"),
            ("a-plain", "  images: [\"nginx\"]\n"),
            (
                "web-pods",
                "  images: [\"nginx\"]\n  podSelector: {matchExpressions: [{key: app, operator: In, values: [web]}]}\n",
            ),
        ]);
        assert_eq!(
            winner(&ps, &container("x", "web", "nginx:1", None)),
            "web-pods"
        );
        // Equal specificity: the name decides, whatever the order in the list.
        assert_eq!(
            winner(&ps, &container("x", "api", "nginx:1", None)),
            "a-plain"
        );
        let mut reversed = ps.clone();
        reversed.reverse();
        assert_eq!(
            winner(&reversed, &container("x", "api", "nginx:1", None)),
            "a-plain"
        );
        assert_eq!(winner(&ps, &container("x", "api", "redis", None)), "-");
    }

    #[test]
    fn specificity_orders_pin_exact_prefix_selectors() {
        let s = |pinned, exact, literal_prefix, selectors| Specificity {
            pinned,
            exact,
            literal_prefix,
            selectors,
        };
        assert!(s(true, false, 0, 0) > s(false, true, 99, 9));
        assert!(s(false, true, 1, 0) > s(false, false, 99, 9));
        assert!(s(false, false, 10, 0) > s(false, false, 9, 9));
        assert!(s(false, false, 10, 1) > s(false, false, 10, 0));
    }
}
