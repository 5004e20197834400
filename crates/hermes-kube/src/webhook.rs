//! The admission webhook's pure core: an `AdmissionReview` v1 request in, the review response
//! with a JSON patch out, injecting the installer into a pod.
//!
//! The patch adds, to a pod not yet injected: the installer init container (`modules resolve`),
//! the supervisor as a native sidecar (an init container with `restartPolicy: Always`, running
//! `modules run --all-processes`), `shareProcessNamespace: true`, the loader ConfigMap mounted
//! at `/etc/hermes/`, a shared `emptyDir` state volume, and a marker annotation. A pod that
//! already has the marker or the installer container gets an empty patch, so the webhook is
//! idempotent (reinvocation, retries).
//!
//! Which pods a policy selects is [`selector`]; the HTTPS server that answers the API server is
//! [`server`]. This module is the pure patch builder.

use serde_json::{Value, json};

pub mod selector;
pub mod server;

/// Annotation that marks an injected pod.
pub const INJECTED_ANNOTATION: &str = "hermes.dev/memory-modules";
/// Name of the installer init container.
pub const INSTALLER_NAME: &str = "hermes-modules-install";
/// Name of the supervisor sidecar.
pub const SUPERVISOR_NAME: &str = "hermes-modules-supervisor";
/// Name of the loader ConfigMap volume.
pub const LOADER_VOLUME: &str = "hermes-module-loader";
/// Name of the shared state volume.
pub const STATE_VOLUME: &str = "hermes-module-state";
/// Where the state volume is mounted.
pub const STATE_DIR: &str = "/var/run/hermes";

/// What to inject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectConfig {
    /// The Hermes image (the `hermes` binary is its entrypoint).
    pub image: String,
    /// The ConfigMap holding `load-sidecars.sh` (and optionally `modules.yaml`).
    pub loader_config_map: String,
    /// The supervisor's metrics port.
    pub metrics_port: u16,
}

/// Builds the `AdmissionReview` response for a request. Requests without a pod object are
/// allowed unchanged.
pub fn review(request: &Value, cfg: &InjectConfig) -> Value {
    let req = &request["request"];
    let uid = req["uid"].clone();
    let patch = if req["kind"]["kind"] == "Pod" && req["object"].is_object() {
        pod_patch(&req["object"], cfg)
    } else {
        Vec::new()
    };
    let mut response = json!({ "uid": uid, "allowed": true });
    if !patch.is_empty() {
        let bytes = serde_json::to_vec(&Value::Array(patch)).unwrap_or_default();
        response["patchType"] = json!("JSONPatch");
        response["patch"] = json!(base64(&bytes));
    }
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": response,
    })
}

/// The `AdmissionReview` response that allows a request unchanged (no policy applies, or the
/// webhook cannot decide: Hermes must never be the reason a pod fails to start).
pub fn allow(request: &Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": { "uid": request["request"]["uid"].clone(), "allowed": true },
    })
}

/// Whether a pod already carries the injection.
pub fn is_injected(pod: &Value) -> bool {
    let has_installer = pod["spec"]["initContainers"]
        .as_array()
        .is_some_and(|cs| cs.iter().any(|c| c["name"] == INSTALLER_NAME));
    has_installer || !pod["metadata"]["annotations"][INJECTED_ANNOTATION].is_null()
}

/// The JSON patch (RFC 6902 operations) that injects the installer into `pod`; empty when the
/// pod is already injected.
pub fn pod_patch(pod: &Value, cfg: &InjectConfig) -> Vec<Value> {
    if is_injected(pod) {
        return Vec::new();
    }
    let state_file = format!("{STATE_DIR}/plan.json");
    let mounts = json!([
        { "name": LOADER_VOLUME, "mountPath": "/etc/hermes", "readOnly": true },
        { "name": STATE_VOLUME, "mountPath": STATE_DIR },
    ]);
    let downward = json!([
        { "name": "HERMES_POD_NAME", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } },
        { "name": "HERMES_NAMESPACE", "valueFrom": { "fieldRef": { "fieldPath": "metadata.namespace" } } },
        { "name": "HERMES_NODE_NAME", "valueFrom": { "fieldRef": { "fieldPath": "spec.nodeName" } } },
    ]);
    let installer = json!({
        "name": INSTALLER_NAME,
        "image": cfg.image,
        "args": ["modules", "resolve", "--state", state_file, "--phase", "pod-init"],
        "env": downward,
        "volumeMounts": mounts,
    });
    let supervisor = json!({
        "name": SUPERVISOR_NAME,
        "image": cfg.image,
        "restartPolicy": "Always",
        "args": [
            "modules", "run", "--state", state_file, "--all-processes",
            "--metrics-addr", format!("0.0.0.0:{}", cfg.metrics_port),
            "--report-dir", format!("{STATE_DIR}/reports"),
            "--memprof-dir", format!("{STATE_DIR}/memprof"),
        ],
        "env": downward,
        "ports": [{ "name": "hermes-metrics", "containerPort": cfg.metrics_port }],
        "volumeMounts": mounts,
    });
    let volumes = [
        json!({ "name": LOADER_VOLUME, "configMap": { "name": cfg.loader_config_map, "optional": true } }),
        json!({ "name": STATE_VOLUME, "emptyDir": {} }),
    ];

    let mut ops = Vec::new();
    if pod["metadata"]["annotations"].is_object() {
        ops.push(json!({
            "op": "add",
            "path": format!("/metadata/annotations/{}", escape_pointer(INJECTED_ANNOTATION)),
            "value": "injected",
        }));
    } else {
        ops.push(json!({
            "op": "add",
            "path": "/metadata/annotations",
            "value": { INJECTED_ANNOTATION: "injected" },
        }));
    }
    append(&mut ops, pod, "initContainers", [installer, supervisor]);
    append(&mut ops, pod, "volumes", volumes);
    let op = if pod["spec"]["shareProcessNamespace"].is_null() {
        "add"
    } else {
        "replace"
    };
    ops.push(json!({ "op": op, "path": "/spec/shareProcessNamespace", "value": true }));
    ops
}

/// Appends items to `/spec/FIELD`, creating the array when absent.
fn append<const N: usize>(ops: &mut Vec<Value>, pod: &Value, field: &str, items: [Value; N]) {
    if pod["spec"][field].is_array() {
        for item in items {
            ops.push(json!({ "op": "add", "path": format!("/spec/{field}/-"), "value": item }));
        }
    } else {
        ops.push(json!({ "op": "add", "path": format!("/spec/{field}"), "value": items.to_vec() }));
    }
}

/// Escapes a JSON-pointer reference token (RFC 6901).
fn escape_pointer(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

/// Standard base64 with padding (the `patch` field is `[]byte` in Go's JSON).
fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(A[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o, "{i}");
        }
    }

    #[test]
    fn pointer_escaping() {
        assert_eq!(
            escape_pointer("hermes.dev/memory-modules"),
            "hermes.dev~1memory-modules"
        );
        assert_eq!(escape_pointer("a~b"), "a~0b");
    }
}
