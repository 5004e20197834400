//! The admission webhook's pure core: an `AdmissionReview` v1 request in, the review response
//! with a JSON patch out, injecting the installer into a pod.
//!
//! The patch adds, to a pod not yet injected: the installer init container (`modules resolve`,
//! with the app container's environment, so the loader script sees e.g. the pod's
//! `CLUSTER_ENV`), the supervisor (`modules run --all-processes`), `shareProcessNamespace: true`,
//! the loader ConfigMap mounted at `/etc/hermes/`, a shared `emptyDir` state volume, and a marker
//! annotation. A pod that already has the marker or the installer container gets an empty patch,
//! so the webhook is idempotent (reinvocation, retries).
//!
//! The supervisor goes in as a native sidecar (an init container with `restartPolicy: Always`)
//! where the cluster has them, or as a regular container beside the app where it does not
//! ([`SidecarMode`]): an API server before native sidecars drops the field, and the supervisor,
//! which never exits, would then hold the pod in its init phase for ever.
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
    /// How the supervisor runs beside the app.
    pub sidecar: SidecarMode,
}

/// How the supervisor is injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SidecarMode {
    /// A native sidecar: an init container with `restartPolicy: Always`. It starts before the
    /// app and does not keep a Job's pod from completing. Kubernetes 1.29+ (1.28 with the
    /// `SidecarContainers` feature gate).
    Native,
    /// A regular container beside the app, for clusters without native sidecars. It starts
    /// with the app rather than before it, and a pod whose app exits keeps running until the
    /// supervisor is stopped, so it suits long-running pods.
    Container,
}

/// The first Kubernetes minor version (of 1.x) with native sidecars on by default.
pub const NATIVE_SIDECAR_MINOR: u32 = 29;

impl SidecarMode {
    /// The mode for an API server reporting `major` and `minor` (its `/version`: `"1"`,
    /// `"20"`, or `"28+"` on some distributions); `None` when they are not numbers.
    pub fn for_server_version(major: &str, minor: &str) -> Option<SidecarMode> {
        let number = |s: &str| -> Option<u32> {
            let digits = s.trim().trim_end_matches('+');
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            digits.parse().ok()
        };
        let (major, minor) = (number(major)?, number(minor)?);
        Some(
            if major > 1 || (major == 1 && minor >= NATIVE_SIDECAR_MINOR) {
                SidecarMode::Native
            } else {
                SidecarMode::Container
            },
        )
    }
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
    // The loader script decides from the pod's environment (`CLUSTER_ENV`): the installer gets
    // the app container's, with Hermes's own variables after it (a later duplicate wins).
    let app = &pod["spec"]["containers"][0];
    let mut installer_env = app["env"].as_array().cloned().unwrap_or_default();
    installer_env.extend(downward.as_array().cloned().unwrap_or_default());
    let mut installer = json!({
        "name": INSTALLER_NAME,
        "image": cfg.image,
        "args": ["modules", "resolve", "--state", state_file, "--phase", "pod-init"],
        "env": installer_env,
        "volumeMounts": mounts,
    });
    if app["envFrom"].is_array() {
        installer["envFrom"] = app["envFrom"].clone();
    }
    let mut supervisor = json!({
        "name": SUPERVISOR_NAME,
        "image": cfg.image,
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
    if cfg.sidecar == SidecarMode::Native {
        supervisor["restartPolicy"] = json!("Always");
    }
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
    match cfg.sidecar {
        SidecarMode::Native => append(&mut ops, pod, "initContainers", [installer, supervisor]),
        SidecarMode::Container => {
            append(&mut ops, pod, "initContainers", [installer]);
            append(&mut ops, pod, "containers", [supervisor]);
        }
    }
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

    fn cfg(sidecar: SidecarMode) -> InjectConfig {
        InjectConfig {
            image: "hermes:test".into(),
            loader_config_map: "loader".into(),
            metrics_port: 9477,
            sidecar,
        }
    }

    fn app_pod() -> Value {
        json!({
            "metadata": { "name": "p", "labels": { "app": "a" } },
            "spec": {
                "containers": [{
                    "name": "app",
                    "image": "app:1",
                    "env": [{ "name": "CLUSTER_ENV", "value": "staging" }],
                    "envFrom": [{ "configMapRef": { "name": "app-env" } }],
                }],
            },
        })
    }

    /// Applies the `add`/`replace` operations the patch builder sends (paths end in `-` to append).
    fn apply(mut pod: Value, ops: &[Value]) -> Value {
        for op in ops {
            let path = op["path"].as_str().unwrap();
            let (parent, last) = path.rsplit_once('/').unwrap();
            let target = pod.pointer_mut(parent).unwrap();
            let last = last.replace("~1", "/").replace("~0", "~");
            if last == "-" {
                target.as_array_mut().unwrap().push(op["value"].clone());
            } else {
                target[last.as_str()] = op["value"].clone();
            }
        }
        pod
    }

    fn names(list: &Value) -> Vec<&str> {
        list.as_array()
            .map(|cs| cs.iter().filter_map(|c| c["name"].as_str()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn native_mode_injects_the_supervisor_as_an_init_container_that_restarts_always() {
        let pod = apply(app_pod(), &pod_patch(&app_pod(), &cfg(SidecarMode::Native)));
        assert_eq!(
            names(&pod["spec"]["initContainers"]),
            [INSTALLER_NAME, SUPERVISOR_NAME]
        );
        assert_eq!(names(&pod["spec"]["containers"]), ["app"]);
        assert_eq!(pod["spec"]["initContainers"][1]["restartPolicy"], "Always");
        assert!(pod["spec"]["initContainers"][0]["restartPolicy"].is_null());
    }

    /// Kubernetes before native sidecars drops `restartPolicy` from an init container, so a
    /// supervisor injected that way never exits and the app never starts.
    #[test]
    fn container_mode_runs_the_supervisor_beside_the_app_not_as_an_init_container() {
        let pod = apply(
            app_pod(),
            &pod_patch(&app_pod(), &cfg(SidecarMode::Container)),
        );
        assert_eq!(names(&pod["spec"]["initContainers"]), [INSTALLER_NAME]);
        assert_eq!(names(&pod["spec"]["containers"]), ["app", SUPERVISOR_NAME]);
        let supervisor = &pod["spec"]["containers"][1];
        assert!(supervisor["restartPolicy"].is_null(), "{supervisor:#}");
        assert_eq!(supervisor["args"][1], "run");
        assert_eq!(pod["spec"]["shareProcessNamespace"], true);
        assert!(is_injected(&pod));
        assert!(pod_patch(&pod, &cfg(SidecarMode::Container)).is_empty());
    }

    #[test]
    fn the_supervisor_is_appended_to_existing_containers_and_init_containers() {
        let mut pod = app_pod();
        pod["spec"]["initContainers"] = json!([{ "name": "migrate", "image": "m" }]);
        let patched = apply(pod.clone(), &pod_patch(&pod, &cfg(SidecarMode::Container)));
        assert_eq!(
            names(&patched["spec"]["initContainers"]),
            ["migrate", INSTALLER_NAME]
        );
        assert_eq!(
            names(&patched["spec"]["containers"]),
            ["app", SUPERVISOR_NAME]
        );
    }

    #[test]
    fn the_installer_gets_the_app_containers_environment_then_hermes_own() {
        for mode in [SidecarMode::Native, SidecarMode::Container] {
            let pod = apply(app_pod(), &pod_patch(&app_pod(), &cfg(mode)));
            let installer = &pod["spec"]["initContainers"][0];
            assert_eq!(
                installer["env"][0],
                json!({ "name": "CLUSTER_ENV", "value": "staging" })
            );
            assert_eq!(
                names(&installer["env"])[1..],
                ["HERMES_POD_NAME", "HERMES_NAMESPACE", "HERMES_NODE_NAME"]
            );
            assert_eq!(
                installer["envFrom"],
                app_pod()["spec"]["containers"][0]["envFrom"]
            );
        }
        // A pod whose app has no environment: only Hermes's own, and no envFrom.
        let bare =
            json!({ "metadata": {}, "spec": { "containers": [{ "name": "app", "image": "a" }] } });
        let pod = apply(
            bare.clone(),
            &pod_patch(&bare, &cfg(SidecarMode::Container)),
        );
        let installer = &pod["spec"]["initContainers"][0];
        assert_eq!(names(&installer["env"]).len(), 3);
        assert!(installer["envFrom"].is_null());
    }

    #[test]
    fn sidecar_mode_follows_the_server_version() {
        for (major, minor, mode) in [
            ("1", "20", Some(SidecarMode::Container)),
            ("1", "28", Some(SidecarMode::Container)),
            ("1", "28+", Some(SidecarMode::Container)),
            ("1", "29", Some(SidecarMode::Native)),
            ("1", "31+", Some(SidecarMode::Native)),
            ("2", "0", Some(SidecarMode::Native)),
            ("1", "", None),
            ("1", "+", None),
            ("one", "29", None),
            ("1", "-29", None),
        ] {
            assert_eq!(
                SidecarMode::for_server_version(major, minor),
                mode,
                "{major}.{minor}"
            );
        }
    }

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
