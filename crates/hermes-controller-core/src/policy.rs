//! The `HermesPolicy` model (`hermes.dev/v1alpha1`): the spec as written ([`PolicySpec`], what
//! the CRD and the YAML files hold) and the validated form the matcher and reconciler use
//! ([`Policy`]).
//!
//! YAML is read with unknown keys rejected (the error names the key and line); values serde
//! cannot judge — globs, sizes, durations, selectors — are checked by [`Policy::from_spec`],
//! whose errors name the field (`spec.index.spanSize`). `metadata` keeps only `name`; other
//! metadata (labels, annotations) is accepted and ignored.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::modules::MemoryModules;
use crate::pattern::ImagePattern;
use crate::selector::LabelSelector;
use crate::{Error, Result};

/// `apiVersion` of policy documents.
pub const API_VERSION: &str = "hermes.dev/v1alpha1";
/// `kind` of policy documents.
pub const KIND: &str = "HermesPolicy";
/// Layers smaller than this are not indexed unless a policy says otherwise (10 MiB).
pub const DEFAULT_MIN_LAYER_SIZE: u64 = hermes_oci_types::DEFAULT_MIN_LAYER_SIZE;
/// Default smallest span size (512 KiB; large layers get larger spans).
pub const DEFAULT_SPAN_SIZE: u64 = hermes_oci_types::DEFAULT_INDEX_SPAN_SIZE;
/// Default length of the recorded startup window when `prefetch.record` is on.
pub const DEFAULT_PREFETCH_WINDOW: Duration = Duration::from_secs(30);

/// A whole policy document as it appears in YAML.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyDocument {
    /// Must be [`API_VERSION`].
    pub api_version: String,
    /// Must be [`KIND`].
    pub kind: String,
    /// Object metadata; only the name is used.
    pub metadata: Metadata,
    /// The spec.
    pub spec: PolicySpec,
    /// A status written back by a controller (ignored on input).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
}

/// Object metadata (other keys are accepted and ignored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    /// The policy's name (cluster-scoped, unique).
    pub name: String,
}

/// `spec` of a `HermesPolicy`, as written.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicySpec {
    /// Image globs over `registry/repo[:tag]` and digest pins `[pattern@]sha256:<hex>`
    /// (see [`crate::pattern`]). At least one; `**` selects every image.
    pub images: Vec<String>,
    /// Namespaces whose pods the policy applies to (all when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Pods it applies to (all when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    /// What nodes do with matching images.
    #[serde(default)]
    pub mode: Mode,
    /// How images are indexed.
    #[serde(default)]
    pub index: IndexSpec,
    /// Startup prefetch recording.
    #[serde(default)]
    pub prefetch: PrefetchSpec,
    /// Fetch the whole layer in the background within this duration (Go syntax: `90s`, `5m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fully_local_within: Option<String>,
    /// Memory modules: which pods get them and their loader (read by the modules webhook).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_modules: Option<MemoryModules>,
}

/// What nodes do with a matching image.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub enum Mode {
    /// Start lazily, fetch on demand.
    #[default]
    Lazy,
    /// Start lazily and prefetch the recorded startup profile.
    Prefetch,
    /// Start lazily and fetch the whole image in the background at once.
    Eager,
    /// The kill switch: no index building and no lazy starts for matching images.
    Off,
}

/// Index build settings.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IndexSpec {
    /// Layers smaller than this are not indexed (bytes, or a quantity like `10Mi`).
    #[serde(default = "default_min_layer_size")]
    pub min_layer_size: Quantity,
    /// Smallest uncompressed bytes per span (bytes, or a quantity like `512Ki`); layers over
    /// about 256 MiB get larger spans so their zTOC stays near 128 MiB or less.
    #[serde(default = "default_span_size")]
    pub span_size: Quantity,
    /// Whether and how to push a SOCI index to the image's registry.
    #[serde(default)]
    pub push: Push,
}

impl Default for IndexSpec {
    fn default() -> Self {
        Self {
            min_layer_size: default_min_layer_size(),
            span_size: default_span_size(),
            push: Push::default(),
        }
    }
}

fn default_min_layer_size() -> Quantity {
    Quantity::Bytes(DEFAULT_MIN_LAYER_SIZE as i64)
}

fn default_span_size() -> Quantity {
    Quantity::Bytes(DEFAULT_SPAN_SIZE as i64)
}

/// A byte count written as an integer or a Kubernetes-style quantity (`512Ki`, `10Mi`, `1G`).
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Quantity {
    /// A plain integer.
    Bytes(i64),
    /// A quantity string.
    Text(String),
}

impl Quantity {
    /// The number of bytes, or why the value is unusable.
    pub fn bytes(&self) -> Result<u64, String> {
        match self {
            Self::Bytes(n) => {
                u64::try_from(*n).map_err(|_| format!("{n} is negative; sizes are >= 0 bytes"))
            }
            Self::Text(s) => parse_quantity(s),
        }
    }
}

fn parse_quantity(s: &str) -> Result<u64, String> {
    let s = s.trim();
    if s.starts_with('-') {
        return Err(format!("{s:?} is negative; sizes are >= 0 bytes"));
    }
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, suffix) = s.split_at(split);
    let unit: u64 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        _ => {
            return Err(format!(
                "{s:?} is not a size: write bytes or a number with Ki, Mi, Gi, k, M or G"
            ));
        }
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
        .ok_or_else(|| {
            format!("{s:?} is not a size: write bytes or a number with Ki, Mi, Gi, k, M or G")
        })
}

/// Whether to push a SOCI index to the registry.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Push {
    /// Keep artifacts in the controller's store only.
    #[default]
    None,
    /// Push a SOCI index v2 (annotated image manifest and image index).
    SociV2,
    /// Push a SOCI index v1 (referrers).
    SociV1,
}

/// Startup prefetch recording.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PrefetchSpec {
    /// Record startup reads on nodes and merge them into a prefetch profile.
    #[serde(default)]
    pub record: bool,
    /// How long after start reads count as startup (Go syntax; default `30s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
}

/// A validated policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// `metadata.name`.
    pub name: String,
    /// The mode.
    pub mode: Mode,
    /// Compiled `spec.images`.
    pub images: Vec<ImagePattern>,
    /// `spec.namespaceSelector`.
    pub namespace_selector: Option<LabelSelector>,
    /// `spec.podSelector`.
    pub pod_selector: Option<LabelSelector>,
    /// `spec.index.minLayerSize` in bytes.
    pub min_layer_size: u64,
    /// `spec.index.spanSize` in bytes.
    pub span_size: u64,
    /// `spec.index.push`.
    pub push: Push,
    /// `spec.prefetch.record`.
    pub prefetch_record: bool,
    /// `spec.prefetch.window`, defaulted.
    pub prefetch_window: Duration,
    /// `spec.fullyLocalWithin`.
    pub fully_local_within: Option<Duration>,
    /// `spec.memoryModules`.
    pub memory_modules: Option<MemoryModules>,
}

impl Policy {
    /// Validate a spec; the error names the first field that is wrong.
    pub fn from_spec(name: &str, spec: &PolicySpec) -> Result<Self> {
        let invalid = |field: &str, reason: String| Error::InvalidPolicy {
            policy: name.to_owned(),
            field: field.to_owned(),
            reason,
        };
        if let Some(reason) = name_problem(name) {
            return Err(invalid("metadata.name", reason));
        }
        if spec.images.is_empty() {
            return Err(invalid(
                "spec.images",
                "list at least one image pattern (\"**\" selects every image)".to_owned(),
            ));
        }
        let images = spec
            .images
            .iter()
            .enumerate()
            .map(|(i, text)| {
                ImagePattern::parse(text).map_err(|r| invalid(&format!("spec.images[{i}]"), r))
            })
            .collect::<Result<Vec<_>>>()?;
        for (field, selector) in [
            ("spec.namespaceSelector", &spec.namespace_selector),
            ("spec.podSelector", &spec.pod_selector),
        ] {
            if let Some((sub, reason)) = selector.as_ref().and_then(LabelSelector::problem) {
                return Err(invalid(&format!("{field}.{sub}"), reason));
            }
        }
        if let Some((sub, reason)) = spec
            .memory_modules
            .as_ref()
            .and_then(MemoryModules::problem)
        {
            return Err(invalid(&format!("spec.memoryModules.{sub}"), reason));
        }
        let min_layer_size = spec
            .index
            .min_layer_size
            .bytes()
            .map_err(|r| invalid("spec.index.minLayerSize", r))?;
        let span_size = spec
            .index
            .span_size
            .bytes()
            .map_err(|r| invalid("spec.index.spanSize", r))?;
        if span_size < 64 << 10 {
            return Err(invalid(
                "spec.index.spanSize",
                format!("{span_size} bytes is too small; use at least 64Ki (default 512Ki)"),
            ));
        }
        let duration = |field: &str, text: &Option<String>| {
            text.as_deref()
                .map(|t| parse_duration(t).map_err(|r| invalid(field, r)))
                .transpose()
        };
        let prefetch_window = duration("spec.prefetch.window", &spec.prefetch.window)?
            .unwrap_or(DEFAULT_PREFETCH_WINDOW);
        let fully_local_within = duration("spec.fullyLocalWithin", &spec.fully_local_within)?;
        Ok(Self {
            name: name.to_owned(),
            mode: spec.mode,
            images,
            namespace_selector: spec.namespace_selector.clone(),
            pod_selector: spec.pod_selector.clone(),
            min_layer_size,
            span_size,
            push: spec.index.push,
            prefetch_record: spec.prefetch.record,
            prefetch_window,
            fully_local_within,
            memory_modules: spec.memory_modules.clone(),
        })
    }
}

/// Kubernetes object names: a DNS-1123 subdomain.
fn name_problem(name: &str) -> Option<String> {
    let ok_chars = name
        .bytes()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.');
    let ok_ends = name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    (name.is_empty() || name.len() > 253 || !ok_chars || !ok_ends).then(|| {
        format!("{name:?} is not a valid name: lower-case letters, digits, '-' and '.', starting and ending alphanumeric")
    })
}

/// Parse a Go duration (`300ms`, `90s`, `5m`, `1h30m`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?} is not a duration: write e.g. 500ms, 90s, 5m or 1h30m");
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = text;
    let mut total = Duration::ZERO;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let part = match &rest[..unit_len] {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            _ => return Err(bad()),
        };
        total = total.saturating_add(part);
        rest = &rest[unit_len..];
    }
    Ok(total)
}

/// Parse every `HermesPolicy` document in `text` (YAML, documents separated by `---`) and
/// validate them. `source_name` appears in errors. Names must be unique within the text.
pub fn parse_policies(text: &str, source_name: &str) -> Result<Vec<Policy>> {
    let docs: Vec<PolicyDocument> =
        serde_saphyr::from_multiple(text).map_err(|source| Error::Parse {
            source_name: source_name.to_owned(),
            source: Box::new(source),
        })?;
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(docs.len());
    for (i, doc) in docs.into_iter().enumerate() {
        if doc.api_version != API_VERSION || doc.kind != KIND {
            return Err(Error::WrongKind {
                source_name: source_name.to_owned(),
                document: i,
                api_version: doc.api_version,
                kind: doc.kind,
            });
        }
        if !seen.insert(doc.metadata.name.clone()) {
            return Err(Error::DuplicatePolicy {
                policy: doc.metadata.name,
            });
        }
        out.push(Policy::from_spec(&doc.metadata.name, &doc.spec)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
apiVersion: hermes.dev/v1alpha1
kind: HermesPolicy
metadata:
  name: web
  labels: {team: platform}
spec:
  images: ["ghcr.io/acme/**", "nginx:1.*"]
  namespaceSelector:
    matchLabels: {env: prod}
  podSelector:
    matchExpressions:
      - {key: tier, operator: In, values: [web]}
  mode: Prefetch
  index:
    minLayerSize: 1Mi
    spanSize: 2097152
    push: SociV2
  prefetch:
    record: true
    window: 1m30s
  fullyLocalWithin: 10m
  memoryModules:
    namespaces: [prod]
---
apiVersion: hermes.dev/v1alpha1
kind: HermesPolicy
metadata: {name: minimal}
spec:
  images: ["**"]
"#;

    #[test]
    fn full_and_minimal_documents_parse_with_defaults() {
        let p = parse_policies(FULL, "test.yaml").unwrap();
        assert_eq!(p.len(), 2);
        let web = &p[0];
        assert_eq!(web.name, "web");
        assert_eq!(web.mode, Mode::Prefetch);
        assert_eq!(web.images.len(), 2);
        assert_eq!(web.min_layer_size, 1 << 20);
        assert_eq!(web.span_size, 2 << 20);
        assert_eq!(web.push, Push::SociV2);
        assert!(web.prefetch_record);
        assert_eq!(web.prefetch_window, Duration::from_secs(90));
        assert_eq!(web.fully_local_within, Some(Duration::from_secs(600)));
        assert_eq!(
            web.namespace_selector.as_ref().unwrap().match_labels["env"],
            "prod"
        );
        assert_eq!(
            web.memory_modules,
            Some(MemoryModules {
                namespaces: vec!["prod".to_owned()],
                ..MemoryModules::default()
            })
        );
        let min = &p[1];
        assert_eq!(min.mode, Mode::Lazy);
        assert_eq!(min.min_layer_size, 10 << 20);
        assert_eq!(min.span_size, 512 << 10);
        assert_eq!(min.push, Push::None);
        assert!(!min.prefetch_record);
        assert_eq!(min.prefetch_window, DEFAULT_PREFETCH_WINDOW);
        assert_eq!(min.fully_local_within, None);
        assert_eq!(min.namespace_selector, None);
    }

    fn doc(spec: &str) -> String {
        format!(
            "apiVersion: hermes.dev/v1alpha1\nkind: HermesPolicy\nmetadata: {{name: p}}\nspec:\n{spec}"
        )
    }

    #[test]
    fn yaml_errors_name_the_key() {
        let cases: &[(&str, &str)] = &[
            ("  images: [a]\n  imagez: [b]\n", "imagez"),
            ("  images: [a]\n  mode: Fast\n", "Fast"),
            ("  images: [a]\n  index: {spansize: 1}\n", "spansize"),
            ("  images: [a]\n  index: {push: Soci}\n", "Soci"),
            ("  mode: Lazy\n", "images"),
        ];
        for (spec, expected) in cases {
            let err = parse_policies(&doc(spec), "p.yaml").unwrap_err();
            let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
            assert!(chain.contains(expected), "{spec:?}: {chain}");
            assert!(chain.contains("p.yaml"), "{chain}");
        }
    }

    #[test]
    fn validation_errors_name_the_field() {
        let cases: &[(&str, &str, &str)] = &[
            ("  images: []\n", "spec.images", "at least one"),
            (
                "  images: [\"ghcr.io/a**\"]\n",
                "spec.images[0]",
                "whole path segment",
            ),
            ("  images: [a, \"B\"]\n", "spec.images[1]", "lower-case"),
            (
                "  images: [a]\n  index: {minLayerSize: -1}\n",
                "spec.index.minLayerSize",
                "negative",
            ),
            (
                "  images: [a]\n  index: {spanSize: \"-4Mi\"}\n",
                "spec.index.spanSize",
                "negative",
            ),
            (
                "  images: [a]\n  index: {spanSize: 4Xi}\n",
                "spec.index.spanSize",
                "not a size",
            ),
            (
                "  images: [a]\n  index: {spanSize: 100}\n",
                "spec.index.spanSize",
                "too small",
            ),
            (
                "  images: [a]\n  fullyLocalWithin: soon\n",
                "spec.fullyLocalWithin",
                "not a duration",
            ),
            (
                "  images: [a]\n  prefetch: {window: 5x}\n",
                "spec.prefetch.window",
                "not a duration",
            ),
            (
                "  images: [a]\n  podSelector: {matchExpressions: [{key: a, operator: In}]}\n",
                "spec.podSelector.matchExpressions[0].values",
                "at least one value",
            ),
        ];
        for (spec, field, reason) in cases {
            match parse_policies(&doc(spec), "p.yaml") {
                Err(Error::InvalidPolicy {
                    field: f,
                    reason: r,
                    ..
                }) => {
                    assert_eq!(f, *field, "{spec:?}");
                    assert!(r.contains(reason), "{spec:?}: {r}");
                }
                other => panic!("{spec:?}: expected InvalidPolicy at {field}, got {other:?}"),
            }
        }
    }

    #[test]
    fn wrong_kind_bad_name_and_duplicates_are_rejected() {
        let other = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\nspec: {images: [a]}\n";
        assert!(matches!(
            parse_policies(other, "x"),
            Err(Error::WrongKind { document: 0, .. })
        ));
        let bad_name = doc("  images: [a]\n").replace("name: p", "name: Bad_Name");
        assert!(matches!(
            parse_policies(&bad_name, "x"),
            Err(Error::InvalidPolicy { field, .. }) if field == "metadata.name"
        ));
        let twice = format!(
            "{}\n---\n{}",
            doc("  images: [a]\n"),
            doc("  images: [b]\n")
        );
        assert!(matches!(
            parse_policies(&twice, "x"),
            Err(Error::DuplicatePolicy { policy }) if policy == "p"
        ));
    }

    #[test]
    fn durations_and_quantities() {
        for (text, secs_ms) in [
            ("0", 0),
            ("500ms", 500),
            ("90s", 90_000),
            ("1h30m", 5_400_000),
        ] {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_millis(secs_ms)),
                "{text}"
            );
        }
        for bad in ["", "5", "m", "1d", "-1s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        for (text, bytes) in [
            ("0", 0),
            ("512Ki", 512 << 10),
            ("10Mi", 10 << 20),
            ("1G", 1_000_000_000),
        ] {
            assert_eq!(Quantity::Text(text.to_owned()).bytes(), Ok(bytes), "{text}");
        }
        assert!(Quantity::Bytes(-5).bytes().is_err());
        assert!(Quantity::Text("99999999999Gi".to_owned()).bytes().is_err());
    }

    #[test]
    fn spec_round_trips_through_json() {
        let p = parse_policies(FULL, "x").unwrap();
        assert_eq!(p[0].name, "web");
        let docs: Vec<PolicyDocument> = serde_saphyr::from_multiple(FULL).unwrap();
        let json = serde_json::to_string(&docs[0].spec).unwrap();
        let back: PolicySpec = serde_json::from_str(&json).unwrap();
        assert_eq!(back, docs[0].spec);
        assert!(json.contains("\"namespaceSelector\""), "{json}");
    }
}
