//! What crosses the wire: request and response bodies, the query of a zTOC lookup, the headers
//! and their rules, and the bounds both sides hold a body to.

use std::collections::BTreeMap;
use std::time::Duration;

use hermes_oci_types::Digest;
use serde::{Deserialize, Serialize};

/// Largest zTOC a node reads (from the controller or a registry). zTOCs grow with a layer's
/// files and spans (a 32 KiB window per span): a 10 GiB layer with a million files stays well
/// below this.
pub const MAX_ZTOC_SIZE: u64 = 256 << 20;
/// Largest startup prefetch profile a node reads (span ids: a few KiB in practice).
pub const MAX_PROFILE_SIZE: u64 = 16 << 20;
/// Largest list of image or policy reports a client reads.
pub const MAX_REPORTS_SIZE: u64 = 64 << 20;
/// Most bytes of an error answer a client reads to show it.
pub const MAX_ERROR_BODY: u64 = 4 << 10;
/// Longest image reference a miss may name: a 255-character name (the distribution spec's
/// limit, registry included), a 128-character tag and a digest fit.
pub const MAX_IMAGE_LEN: usize = 512;
/// Longest node name in a miss or a trace report (a Kubernetes node name is a DNS subdomain).
pub const MAX_NODE_NAME_LEN: usize = 253;
/// Largest `POST /v1/misses` body: room for a pod with [`MAX_POD_LABELS`] labels of
/// Kubernetes' longest keys and values.
pub const MAX_MISS_BODY: usize = 16 << 10;
/// Most pod labels a miss or a pull report carries (a node sends the first ones by key).
pub const MAX_POD_LABELS: usize = 32;
/// Largest `POST /v1/pulls` body: a [`PullReport`] of [`MAX_LAYERS_PER_REPORT`] layers with
/// their reasons and a pod with its labels.
pub const MAX_PULL_BODY: usize = 64 << 10;
/// Longest reason a pull report gives for a layer not started lazily.
pub const MAX_REASON_LEN: usize = 256;
/// Largest `POST /v1/traces` body: one trace of the most spans the controller keeps (65 536)
/// fits.
pub const MAX_TRACE_BODY: usize = 2 << 20;
/// Most layers in one trace report (overlayfs stacks at most 128 layers).
pub const MAX_LAYERS_PER_REPORT: usize = 128;

/// Header of a 404 zTOC answer that forbids a lazy start of the image; its value says why.
/// The node must then not start the image lazily, whatever copy of the zTOC it keeps.
pub const DISABLED_HEADER: &str = "hermes-disabled";
/// Header of a zTOC answer: the zTOC's digest, which the node checks the body against.
pub const CONTENT_DIGEST_HEADER: &str = "docker-content-digest";

/// Header of a zTOC answer (200 or 304): what the node does with the layer, as the policy
/// that selects the image says ([`NodeMode`]). Absent: `Lazy`.
pub const MODE_HEADER: &str = "hermes-mode";
/// Header of a zTOC answer (200 or 304): whole seconds within which the node makes the layer
/// fully local (the policy's `fullyLocalWithin`). Absent: no deadline.
pub const FULLY_LOCAL_WITHIN_HEADER: &str = "hermes-fully-local-within";
/// Longest `fullyLocalWithin` a node honours (30 days); a longer value is no deadline.
pub const MAX_FULLY_LOCAL_WITHIN: Duration = Duration::from_secs(30 * 24 * 3600);

/// What a node does with an indexed layer (a policy's `mode`, `Off` aside: an `Off` image gets
/// no zTOC at all).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum NodeMode {
    /// Start lazily; fetch the rest in the background, yielding to reads.
    #[default]
    Lazy,
    /// Start lazily with the recorded startup profile, then fetch the rest at full speed.
    Prefetch,
    /// Fetch the whole layer before the container starts, with parallel range requests and
    /// the spans decoded in parallel from their checkpoints.
    Eager,
}

impl NodeMode {
    /// The header value (the policy's spelling).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Lazy => "Lazy",
            Self::Prefetch => "Prefetch",
            Self::Eager => "Eager",
        }
    }

    /// A header value; `None` for a mode this node does not know.
    pub fn parse(value: &str) -> Option<Self> {
        [Self::Lazy, Self::Prefetch, Self::Eager]
            .into_iter()
            .find(|m| m.as_str().eq_ignore_ascii_case(value.trim()))
    }
}

/// How a node serves one indexed layer, from the headers of its zTOC answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LayerBehaviour {
    /// The mode.
    pub mode: NodeMode,
    /// Make the layer fully local within this long after it is mounted.
    pub fully_local_within: Option<Duration>,
}

impl LayerBehaviour {
    /// The headers that say this (none for the default).
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut headers = Vec::new();
        if self.mode != NodeMode::Lazy {
            headers.push((MODE_HEADER, self.mode.as_str().to_owned()));
        }
        if let Some(within) = self.fully_local_within {
            // Whole seconds, rounded up: a deadline is never made shorter than asked.
            let secs = within.as_secs() + u64::from(within.subsec_nanos() > 0);
            headers.push((FULLY_LOCAL_WITHIN_HEADER, secs.to_string()));
        }
        headers
    }

    /// Read from an answer's headers (`header(name)` is the value of `name`). What a node
    /// cannot read leaves the default: an unknown mode (from a newer controller) is `Lazy`,
    /// a deadline that is not a number of seconds up to [`MAX_FULLY_LOCAL_WITHIN`] is none.
    pub fn from_headers<'a>(header: impl Fn(&str) -> Option<&'a str>) -> Self {
        Self {
            mode: header(MODE_HEADER)
                .and_then(NodeMode::parse)
                .unwrap_or_default(),
            fully_local_within: header(FULLY_LOCAL_WITHIN_HEADER)
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs)
                .filter(|d| *d <= MAX_FULLY_LOCAL_WITHIN),
        }
    }
}

/// A node's report that it started an image without an index (`POST /v1/misses`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Miss {
    /// The image reference the node started.
    pub image: String,
    /// Its manifest digest, if the node knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<Digest>,
    /// The reporting node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The pod the image was pulled for, when the node knows it (its CRI proxy saw the pull):
    /// its namespace and labels let `namespaceSelector`/`podSelector` policies match the miss.
    /// Left out when unknown, so a controller that predates it still takes the miss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
}

/// A pod as a node knows it from the kubelet's `PullImage` (`sandbox_config` metadata).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID, when known.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
    /// Labels (at most [`MAX_POD_LABELS`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl PodRef {
    /// The pod with at most [`MAX_POD_LABELS`] labels (the first ones by key), as it is sent.
    pub fn bounded(mut self) -> Self {
        if self.labels.len() > MAX_POD_LABELS {
            self.labels = std::mem::take(&mut self.labels)
                .into_iter()
                .take(MAX_POD_LABELS)
                .collect();
        }
        self
    }
}

/// How a layer of a pull was provided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LayerMode {
    /// Mounted lazily: containerd fetched and unpacked nothing.
    Lazy,
    /// Pulled normally on purpose (an `Off` policy).
    Normal,
    /// Meant to be lazy but pulled normally; the layer's reason says why.
    Fallback,
}

/// One layer of a [`PullReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PullLayer {
    /// The compressed layer's digest.
    pub digest: Digest,
    /// How it was provided.
    pub mode: LayerMode,
    /// Why it was not lazy (at most [`MAX_REASON_LEN`] characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A node's account of one image pull (`POST /v1/pulls`), sent once the start's reads are done
/// (the startup trace window closed), best effort.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PullReport {
    /// The image reference, as containerd named it.
    pub image: String,
    /// Its manifest digest, when containerd said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<Digest>,
    /// The reporting node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The pod pulled for, when the node knows it; else the controller attributes the pull.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
    /// The layers containerd prepared, in order (at most [`MAX_LAYERS_PER_REPORT`]).
    pub layers: Vec<PullLayer>,
    /// Compressed bytes the lazy layers fetched from the registry for reads, until the start's
    /// reads were done.
    pub bytes_fetched: u64,
    /// Seconds from the first lazy mount until every lazy layer was fully local, if they were
    /// by the time of the report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fully_local_seconds: Option<f64>,
}

/// One node's startup reads (`POST /v1/traces`): per layer, span indices in the order they
/// were first read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TraceReport {
    /// Reporting node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Layer digest → span indices in read order.
    pub layers: BTreeMap<Digest, Vec<u32>>,
}

/// The merged startup profile of a layer (`GET /v1/layers/{digest}/prefetch`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PrefetchProfile {
    /// The layer.
    pub layer: Digest,
    /// Spans to prefetch, most important first.
    pub spans: Vec<u32>,
    /// How many traces were merged.
    pub traces: usize,
}

/// What a node says about the image a layer belongs to when it asks for the layer's zTOC, so
/// the controller can refuse the image. Both are optional: a lookup without them is answered
/// from the layer alone.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZtocQuery {
    /// The image reference, as containerd names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The image's manifest digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<String>,
    /// The namespace of the pod the image is pulled for, when the node knows it (from its CRI
    /// proxy): policies' selectors then apply to the lookup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// That pod's labels, as [`encode_labels`] writes them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<String>,
}

/// Most labels a zTOC lookup carries; a pod with more is looked up with the first ones.
pub const MAX_QUERY_LABELS: usize = 64;
/// Longest encoded label list a zTOC lookup carries.
pub const MAX_QUERY_LABELS_LEN: usize = 4 << 10;

/// A pod's labels for [`ZtocQuery::labels`]: `key=value` pairs joined by `,` (neither may
/// appear in a Kubernetes label key or value), at most [`MAX_QUERY_LABELS`] and
/// [`MAX_QUERY_LABELS_LEN`] bytes; labels that could not be read back are left out.
pub fn encode_labels(labels: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    for (key, value) in labels
        .iter()
        .filter(|(k, v)| !k.is_empty() && !format!("{k}{v}").contains([',', '=']))
        .take(MAX_QUERY_LABELS)
    {
        let pair = format!("{key}={value}");
        if out.len() + pair.len() + 1 > MAX_QUERY_LABELS_LEN {
            break;
        }
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(&pair);
    }
    out
}

/// The labels of [`ZtocQuery::labels`]; `None` if the text is over the bounds or a pair is not
/// `key=value`.
pub fn decode_labels(text: &str) -> Option<BTreeMap<String, String>> {
    if text.len() > MAX_QUERY_LABELS_LEN {
        return None;
    }
    let mut labels = BTreeMap::new();
    for pair in text.split(',').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=')?;
        if key.is_empty() || labels.len() == MAX_QUERY_LABELS {
            return None;
        }
        labels.insert(key.to_owned(), value.to_owned());
    }
    Some(labels)
}

/// The `ETag` of a zTOC answer, and the `If-None-Match` value of a node naming the copy it
/// keeps: the zTOC's digest, quoted.
pub fn etag(ztoc: &Digest) -> String {
    format!("\"{ztoc}\"")
}

/// Whether an `If-None-Match` header value names `current`, so the answer is 304 and the node
/// keeps its copy. The value is a comma-separated list of entity tags, compared weakly (a
/// `W/` prefix is ignored), or `*`; a zTOC's tag is its digest, so equal tags are equal bytes.
pub fn not_modified(if_none_match: &str, current: &Digest) -> bool {
    let want = etag(current);
    if_none_match
        .split(',')
        .map(str::trim)
        .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == want)
}

/// A refusal reason as a [`DISABLED_HEADER`] value: what is not printable ASCII (a line
/// break, a non-ASCII name) becomes `?`, so any reason makes a valid header and a refusal
/// never loses its header.
pub fn disabled_header_value(reason: &str) -> String {
    reason
        .chars()
        .map(|c| {
            if c == ' ' || c.is_ascii_graphic() {
                c
            } else {
                '?'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_labels_survive_a_lookup_query_and_hostile_ones_are_refused() {
        let labels: BTreeMap<String, String> = [
            ("app".to_owned(), "web".to_owned()),
            ("hermes.dev/tier".to_owned(), "".to_owned()),
            ("bad,key".to_owned(), "x".to_owned()),
        ]
        .into();
        let text = encode_labels(&labels);
        assert_eq!(text, "app=web,hermes.dev/tier=");
        let back = decode_labels(&text).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back["app"], "web");
        assert_eq!(decode_labels(""), Some(BTreeMap::new()));
        assert_eq!(decode_labels("novalue"), None);
        assert_eq!(decode_labels("=x"), None);
        assert_eq!(decode_labels(&"a=b,".repeat(2000)), None);
        let many: BTreeMap<String, String> = (0..100)
            .map(|i| (format!("k{i}"), "v".to_owned()))
            .collect();
        assert_eq!(
            decode_labels(&encode_labels(&many)).unwrap().len(),
            MAX_QUERY_LABELS
        );
    }

    #[test]
    fn a_layer_behaviour_survives_its_headers_and_bad_values_fall_back_to_lazy() {
        let find = |headers: &[(&'static str, String)], name: &str| {
            headers
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.clone())
        };
        for behaviour in [
            LayerBehaviour::default(),
            LayerBehaviour {
                mode: NodeMode::Eager,
                fully_local_within: None,
            },
            LayerBehaviour {
                mode: NodeMode::Prefetch,
                fully_local_within: Some(Duration::from_secs(60)),
            },
        ] {
            let headers = behaviour.headers();
            let values: Vec<(String, Option<String>)> = [MODE_HEADER, FULLY_LOCAL_WITHIN_HEADER]
                .iter()
                .map(|n| (n.to_string(), find(&headers, n)))
                .collect();
            let read = LayerBehaviour::from_headers(|name| {
                values
                    .iter()
                    .find(|(n, _)| n == name)
                    .and_then(|(_, v)| v.as_deref())
            });
            assert_eq!(read, behaviour);
        }
        assert!(LayerBehaviour::default().headers().is_empty());
        // A fraction of a second is rounded up, never down to an earlier deadline.
        let half = LayerBehaviour {
            fully_local_within: Some(Duration::from_millis(1500)),
            ..Default::default()
        };
        assert_eq!(
            find(&half.headers(), FULLY_LOCAL_WITHIN_HEADER).as_deref(),
            Some("2")
        );
        let bad = |mode: &'static str, within: &'static str| {
            LayerBehaviour::from_headers(move |name| match name {
                MODE_HEADER => Some(mode),
                FULLY_LOCAL_WITHIN_HEADER => Some(within),
                _ => None,
            })
        };
        assert_eq!(bad("Teleport", "soon"), LayerBehaviour::default());
        assert_eq!(bad("eager", "-5").mode, NodeMode::Eager);
        assert_eq!(bad("Lazy", "99999999999").fully_local_within, None);
    }

    #[test]
    fn if_none_match_names_the_kept_ztoc_by_its_quoted_digest() {
        let current = Digest::of(b"ztoc");
        let old = Digest::of(b"old");
        assert_eq!(etag(&current), format!("\"{current}\""));
        assert!(not_modified(&etag(&current), &current));
        assert!(!not_modified(&etag(&old), &current));
        assert!(not_modified(
            &format!("{}, {}", etag(&old), etag(&current)),
            &current
        ));
        assert!(not_modified(&format!("W/{}", etag(&current)), &current));
        assert!(not_modified("*", &current));
        // Unquoted, or only a prefix of the digest: not the same zTOC.
        assert!(!not_modified(current.as_str(), &current));
        assert!(!not_modified(
            &format!("\"{}\"", &current.as_str()[..20]),
            &current
        ));
        assert!(!not_modified("", &current));
    }

    #[test]
    fn any_refusal_reason_makes_a_valid_header_value() {
        assert_eq!(
            disabled_header_value("policy stop has mode Off"),
            "policy stop has mode Off"
        );
        let odd = disabled_header_value("line\nbreak\ttab é\u{7f}");
        assert_eq!(odd, "line?break?tab ??");
        assert!(odd.bytes().all(|b| b == b' ' || b.is_ascii_graphic()));
        assert_eq!(disabled_header_value(""), "");
    }

    #[test]
    fn wire_bodies_have_digest_keys_and_reject_unknown_fields() {
        let d = Digest::of(b"layer");
        let report: TraceReport =
            serde_json::from_str(&format!(r#"{{"node":"n1","layers":{{"{d}":[3,1]}}}}"#))
                .expect("report");
        assert_eq!(report.layers[&d], vec![3, 1]);
        assert!(serde_json::from_str::<TraceReport>(r#"{"layers":{"sha256:x":[1]}}"#).is_err());
        assert!(serde_json::from_str::<TraceReport>(r#"{"layers":{},"x":1}"#).is_err());

        let miss = Miss {
            image: "r/x:1".into(),
            digest: None,
            node: Some("n1".into()),
            pod: None,
        };
        assert_eq!(
            serde_json::to_string(&miss).expect("json"),
            r#"{"image":"r/x:1","node":"n1"}"#
        );
        assert!(serde_json::from_str::<Miss>(r#"{"image":"r/x:1","digest":"nope"}"#).is_err());
        assert!(serde_json::from_str::<Miss>(r#"{"image":"r/x:1","extra":1}"#).is_err());

        // A profile from a newer controller with more fields still reads.
        let profile: PrefetchProfile = serde_json::from_str(&format!(
            r#"{{"layer":"{d}","spans":[2,0],"traces":3,"later":true}}"#
        ))
        .expect("profile");
        assert_eq!(profile.spans, vec![2, 0]);
    }

    #[test]
    fn a_pull_report_round_trips_and_caps_pod_labels() {
        let d = Digest::of(b"layer");
        let report = PullReport {
            image: "r/x:1".into(),
            manifest: Some(Digest::of(b"m")),
            node: Some("n1".into()),
            pod: Some(
                PodRef {
                    namespace: "ns".into(),
                    name: "web".into(),
                    uid: String::new(),
                    labels: (0..40).map(|i| (format!("k{i:02}"), "v".into())).collect(),
                }
                .bounded(),
            ),
            layers: vec![PullLayer {
                digest: d.clone(),
                mode: LayerMode::Fallback,
                reason: Some("no zTOC".into()),
            }],
            bytes_fetched: 7,
            fully_local_seconds: None,
        };
        let pod = report.pod.as_ref().expect("pod");
        assert_eq!(pod.labels.len(), MAX_POD_LABELS);
        assert!(pod.labels.contains_key("k00") && !pod.labels.contains_key("k39"));
        let json = serde_json::to_string(&report).expect("json");
        assert!(json.contains(r#""mode":"Fallback""#), "{json}");
        assert!(json.contains(r#""bytesFetched":7"#), "{json}");
        assert_eq!(
            serde_json::from_str::<PullReport>(&json).expect("back"),
            report
        );
        // A miss with its pod; one without reads as before.
        let miss: Miss = serde_json::from_str(
            r#"{"image":"r/x:1","pod":{"namespace":"ns","name":"web","labels":{"app":"web"}}}"#,
        )
        .expect("miss");
        assert_eq!(miss.pod.expect("pod").labels["app"], "web");
    }
}
