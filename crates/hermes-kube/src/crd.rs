//! The custom resources: `HermesPolicy` (written by platform teams) and `HermesImage` (written
//! by the controller, one per running image), group `hermes.dev`, version `v1alpha1`, both
//! cluster-scoped.
//!
//! The policy spec *is* the core's [`PolicySpec`] (flattened into the CRD's spec), so the YAML
//! files of standalone mode and the cluster objects are one format. Its JSON Schema comes from
//! the Rust types; [`tighten`] then adds what a Kubernetes v1.20 API server can check with
//! plain OpenAPI keywords (no CEL): enums, `minItems`, patterns for sizes and durations,
//! `x-kubernetes-int-or-string` for sizes, non-negative integers. What OpenAPI cannot express
//! (glob syntax, span size floor for quantity strings, selector operators with values) is
//! judged by [`hermes_controller::policy::Policy::from_spec`] and reported as a status condition.

use std::collections::BTreeMap;

use hermes_controller::policy::PolicySpec;
use hermes_controller::starts::StartStats;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// API group of the Hermes resources.
pub const GROUP: &str = "hermes.dev";
/// API version of the Hermes resources.
pub const VERSION: &str = "v1alpha1";

/// Sizes: a non-negative integer of bytes or a quantity string with a binary or decimal suffix.
const SIZE_PATTERN: &str = "^[0-9]+(Ki|Mi|Gi|k|M|G)?$";
/// Go durations as the policy parser accepts them (`0`, `500ms`, `90s`, `1h30m`).
const DURATION_PATTERN: &str = "^(0|([0-9]+(ms|s|m|h))+)$";

/// `HermesPolicy.spec`: which running images to index and how nodes load them.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "hermes.dev",
    version = "v1alpha1",
    kind = "HermesPolicy",
    plural = "hermespolicies",
    shortname = "hpol",
    status = "HermesPolicyStatus",
    doc = "Which running images Hermes indexes for lazy loading, and how nodes load them.",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"Valid","type":"string","jsonPath":".status.conditions[?(@.type==\"Valid\")].status"}"#,
    printcolumn = r#"{"name":"Matched","type":"integer","jsonPath":".status.matchedImages"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.readyImages"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[schemars(transform = tighten)]
pub struct HermesPolicySpec {
    /// The policy as the core reads it (also the format of standalone mode's YAML files).
    #[serde(flatten)]
    pub policy: PolicySpec,
}

/// `HermesPolicy.status`, written by the leading controller.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HermesPolicyStatus {
    /// `metadata.generation` of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Running images this policy decides about.
    pub matched_images: u32,
    /// Of those, how many are indexed.
    pub ready_images: u32,
    /// `Valid` (the spec was accepted, or why not) and `Ready` (every matched image indexed).
    pub conditions: Vec<Condition>,
}

/// A status condition, shaped like `metav1.Condition`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Valid` or `Ready`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// A CamelCase reason.
    pub reason: String,
    /// For people: what is wrong and where (the field path for an invalid spec).
    pub message: String,
    /// When `status` last changed (RFC 3339).
    pub last_transition_time: String,
    /// `metadata.generation` the condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// `HermesImage.spec`: one running image, by platform manifest digest (the object's name is the
/// digest with `:` replaced by `-`).
#[derive(CustomResource, Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "hermes.dev",
    version = "v1alpha1",
    kind = "HermesImage",
    plural = "hermesimages",
    shortname = "himg",
    status = "HermesImageStatus",
    doc = "An image that runs in the cluster and a HermesPolicy wants indexed (written by the controller).",
    printcolumn = r#"{"name":"Image","type":"string","jsonPath":".spec.image"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Pods","type":"integer","jsonPath":".status.pods"}"#,
    printcolumn = r#"{"name":"Policy","type":"string","jsonPath":".spec.policy"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","priority":1,"jsonPath":".status.reason"}"#,
    printcolumn = r#"{"name":"Lazy","type":"integer","priority":1,"jsonPath":".status.starts.lazyStarts"}"#,
    printcolumn = r#"{"name":"Fallbacks","type":"integer","priority":1,"jsonPath":".status.starts.fallbacks"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct HermesImageSpec {
    /// The image reference as the first pod (by namespace and name) names it.
    pub image: String,
    /// The platform manifest digest once resolved; the pods' `imageID` before.
    #[schemars(regex(pattern = r"^sha256:[0-9a-f]{64}$"))]
    pub digest: String,
    /// The policy that decides about the image.
    pub policy: String,
}

/// Phase of a `HermesImage`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
pub enum ImagePhase {
    /// Known, not built yet (or its manifest is being resolved).
    Pending,
    /// Layers are being indexed.
    Building,
    /// Every eligible layer has a zTOC.
    Ready,
    /// A layer failed to index (retried later).
    Failed,
    /// Not indexed on purpose (`mode: Off`).
    Skipped,
}

/// `HermesImage.status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HermesImageStatus {
    /// The phase.
    pub phase: ImagePhase,
    /// Why it is in this phase (for everything but `Ready`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Running pods using the image.
    pub pods: u32,
    /// Layers with a zTOC.
    pub indexed_layers: u32,
    /// Per layer, in image order (empty until the manifest is resolved).
    pub layers: Vec<ImageLayer>,
    /// When the image last became `Ready` (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_time: Option<String>,
    /// Seconds spent building its layers (every attempt).
    pub build_seconds: f64,
    /// Layer bytes read from the registry for it.
    pub bytes_read: u64,
    /// The last error seen while resolving or building it; cleared once `Ready`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Its pods' starts as nodes reported them: lazy starts, fallbacks, the last pods.
    #[serde(default, skip_serializing_if = "StartStats::is_empty")]
    pub starts: StartStats,
}

/// One layer of a `HermesImage`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageLayer {
    /// Layer digest.
    pub digest: String,
    /// Compressed size in bytes.
    pub size: u64,
    /// `Indexed`, `Skipped`, `Pending`, `Queued`, `Building`, `Retrying` or `Failed`.
    pub state: String,
    /// Why it is skipped or failing; the attempt while building.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The two CRDs, as the API server takes them.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![HermesPolicy::crd(), HermesImage::crd()]
}

/// The CRDs as one multi-document YAML file (what `deploy/crds/hermes.dev.yaml` holds).
pub fn crds_yaml() -> Result<String, crate::Error> {
    let yaml = serde_saphyr::to_string_multiple(&crds()).map_err(|e| crate::Error::Yaml {
        what: "the CRDs".to_owned(),
        reason: e.to_string(),
    })?;
    Ok(format!(
        "# Generated from the Rust types in crates/hermes-kube/src/crd.rs: do not edit.\n\
         # Regenerate with `hermes crds > deploy/crds/hermes.dev.yaml`.\n---\n{yaml}"
    ))
}

/// Add the OpenAPI checks the derived schema of [`PolicySpec`] cannot carry (see the module docs).
fn tighten(schema: &mut schemars::Schema) {
    let Some(props) = schema.get_mut("properties").and_then(Value::as_object_mut) else {
        return;
    };
    if let Some(images) = props.get_mut("images").and_then(Value::as_object_mut) {
        images.insert("minItems".into(), json!(1));
        images.insert("items".into(), json!({"type": "string", "minLength": 1}));
        images.insert(
            "description".into(),
            json!(
                "Image globs over registry/repo[:tag] (`*` within a path segment, `**` across \
                 segments) and digest pins [pattern@]sha256:<hex>. At least one; \"**\" selects \
                 every image."
            ),
        );
    }
    for key in ["namespaceSelector", "podSelector"] {
        if let Some(selector) = props.get_mut(key) {
            *selector = label_selector(selector.get("description"));
        }
    }
    if let Some(window) = props
        .get_mut("prefetch")
        .and_then(|p| p.pointer_mut("/properties/window"))
    {
        set_pattern(window, DURATION_PATTERN);
    }
    if let Some(within) = props.get_mut("fullyLocalWithin") {
        set_pattern(within, DURATION_PATTERN);
    }
    if let Some(index) = props
        .get_mut("index")
        .and_then(|i| i.get_mut("properties"))
        .and_then(Value::as_object_mut)
    {
        for key in ["minLayerSize", "spanSize"] {
            if let Some(size) = index.get_mut(key) {
                let description = size.get("description").cloned();
                let default = size.get("default").cloned();
                // `pattern` applies to strings and `minimum` to integers only.
                let mut replaced = json!({
                    "x-kubernetes-int-or-string": true,
                    "pattern": SIZE_PATTERN,
                    "minimum": 0,
                });
                if let Some(map) = replaced.as_object_mut() {
                    map.extend(description.map(|d| ("description".to_owned(), d)));
                    map.extend(default.map(|d| ("default".to_owned(), d)));
                }
                *size = replaced;
            }
        }
    }
    if let Some(modules) = props
        .get_mut("memoryModules")
        .and_then(|m| m.get_mut("properties"))
        .and_then(Value::as_object_mut)
    {
        if let Some(selector) = modules.get_mut("podSelector") {
            *selector = label_selector(selector.get("description"));
        }
        if let Some(Value::Object(namespaces)) = modules.get_mut("namespaces") {
            namespaces.insert("items".into(), json!({"type": "string", "minLength": 1}));
        }
        if let Some(Value::Object(loader)) = modules.get_mut("loaderConfigMap") {
            loader.insert("minLength".into(), json!(1));
        }
    }
}

fn set_pattern(schema: &mut Value, pattern: &str) {
    if let Some(map) = schema.as_object_mut() {
        map.insert("pattern".to_owned(), json!(pattern));
    }
}

/// `metav1.LabelSelector` with its operators as an enum.
fn label_selector(description: Option<&Value>) -> Value {
    let mut selector = json!({
        "type": "object",
        "properties": {
            "matchLabels": {
                "type": "object",
                "additionalProperties": {"type": "string"},
                "description": "Labels that must be present with exactly these values.",
            },
            "matchExpressions": {
                "type": "array",
                "description": "Set-based requirements; all must hold.",
                "items": {
                    "type": "object",
                    "required": ["key", "operator"],
                    "properties": {
                        "key": {"type": "string", "minLength": 1},
                        "operator": {"type": "string", "enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                        "values": {"type": "array", "items": {"type": "string"}},
                    },
                },
            },
        },
    });
    if let (Some(map), Some(d)) = (selector.as_object_mut(), description) {
        map.insert("description".to_owned(), d.clone());
    }
    selector
}

/// The name of the `HermesImage` for a digest (`sha256:ab…` → `sha256-ab…`).
pub fn image_object_name(digest: &str) -> String {
    digest.replace(':', "-")
}

/// Labels the controller puts on every `HermesImage` it writes.
pub fn managed_labels() -> BTreeMap<String, String> {
    BTreeMap::from([(
        "app.kubernetes.io/managed-by".to_owned(),
        "hermes-controller".to_owned(),
    )])
}
