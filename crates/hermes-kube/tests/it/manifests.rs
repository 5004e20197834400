//! The deploy manifests: kubectl accepts them (client-side validation against the server's
//! OpenAPI, then a server-side dry run through admission and the CRD schemas), and the Helm
//! chart with its default values renders exactly the plain manifests.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use crate::apiserver::repo_root;
use crate::cluster::Cluster;

/// Plain manifests the chart wraps (template file → manifest file).
const CHART_FILES: &[(&str, &str)] = &[
    ("rbac.yaml", "rbac.yaml"),
    ("controller.yaml", "controller.yaml"),
];

fn docs(text: &str, what: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(text)
        .unwrap_or_else(|e| panic!("{what} is not YAML: {e}"))
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

fn lookup<'a>(values: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(values, |v, key| v.get(key))
}

/// Render a template of the chart the way `helm template` does for the subset the chart uses:
/// `{{ .Values.x.y }}`, `{{ .Release.Namespace }}`, `{{ .Release.Name }}`,
/// `{{ .Chart.AppVersion }}`. Anything else is an error, so the chart stays within what this
/// check understands.
fn render(template: &str, values: &Value, namespace: &str, chart: &Value) -> String {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find("}}").expect("unclosed {{") + start;
        let expr = rest[start + 2..end].trim();
        let value = if let Some(path) = expr.strip_prefix(".Values.") {
            lookup(values, path).unwrap_or_else(|| panic!("values.yaml has no {path}"))
        } else if expr == ".Chart.AppVersion" {
            &chart["appVersion"]
        } else if expr == ".Release.Namespace" || expr == ".Release.Name" {
            out.push_str(namespace);
            rest = &rest[end + 2..];
            continue;
        } else {
            panic!("template expression {expr:?} is outside what the chart check renders");
        };
        match value {
            Value::String(s) => out.push_str(s),
            other => out.push_str(&other.to_string()),
        }
        rest = &rest[end + 2..];
    }
    out.push_str(rest);
    out
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn rendered_chart(namespace: &str) -> BTreeMap<String, String> {
    let chart_dir = repo_root().join("deploy/helm/hermes");
    let values: Value =
        serde_saphyr::from_str(&read(&chart_dir.join("values.yaml"))).expect("values.yaml");
    let chart: Value =
        serde_saphyr::from_str(&read(&chart_dir.join("Chart.yaml"))).expect("Chart.yaml");
    assert_eq!(chart["apiVersion"], "v2");
    assert_eq!(chart["name"], "hermes");
    CHART_FILES
        .iter()
        .map(|(template, _)| {
            let text = read(&chart_dir.join("templates").join(template));
            (
                template.to_string(),
                render(&text, &values, namespace, &chart),
            )
        })
        .collect()
}

#[test]
fn helm_chart_with_default_values_renders_the_plain_manifests() {
    let rendered = rendered_chart("hermes-system");
    let plain_dir = repo_root().join("deploy/kubernetes");
    for (template, manifest) in CHART_FILES {
        let from_chart = docs(&rendered[*template], template);
        let plain = docs(&read(&plain_dir.join(manifest)), manifest);
        assert_eq!(
            from_chart, plain,
            "templates/{template} with default values differs from deploy/kubernetes/{manifest}"
        );
    }
    let notes = read(&repo_root().join("deploy/helm/hermes/templates/NOTES.txt"));
    assert!(notes.contains("{{ .Values.nodeApi.tokenSecret }}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_pass_kubectl_client_and_server_dry_runs() {
    let cluster = Cluster::start().await;
    let root = repo_root();
    let crds = root.join("deploy/crds/hermes.dev.yaml");
    let plain = root.join("deploy/kubernetes");
    let (crds, plain) = (
        crds.to_str().expect("utf-8 path"),
        plain.to_str().expect("utf-8 path"),
    );
    for dry_run in ["--dry-run=client", "--dry-run=server"] {
        let (ok, out) = cluster.server.kubectl(
            &["apply", dry_run, "--validate=true", "-f", crds, "-f", plain],
            None,
        );
        assert!(ok, "kubectl apply {dry_run} of deploy/: {out}");
        for kind in [
            "deployment.apps/hermes-controller",
            "serviceaccount/hermes-controller",
            "service/hermes-controller",
            "clusterrole.rbac.authorization.k8s.io/hermes-controller",
            "hermespolicy.hermes.dev/acme-prod",
        ] {
            assert!(out.contains(kind), "{dry_run}: {kind} missing from: {out}");
        }
    }
    // The chart, rendered into another namespace, passes the server's checks too.
    cluster.namespace("hermes-chart", &[]).await;
    let rendered: String = rendered_chart("hermes-chart")
        .into_values()
        .collect::<Vec<_>>()
        .join("\n---\n");
    let (ok, out) = cluster.server.kubectl(
        &["apply", "--dry-run=server", "--validate=true", "-f", "-"],
        Some(&rendered),
    );
    assert!(ok, "rendered chart: {out}");
    assert!(out.contains("deployment.apps/hermes-controller"), "{out}");
    // A manifest with a schema error is caught by the same check (the check can fail).
    let broken = read(&root.join("deploy/kubernetes/controller.yaml"))
        .replace("replicas: 2", "replicas: two");
    let (ok, out) = cluster.server.kubectl(
        &["apply", "--dry-run=client", "--validate=true", "-f", "-"],
        Some(&broken),
    );
    assert!(!ok, "a broken manifest must be rejected: {out}");
}
