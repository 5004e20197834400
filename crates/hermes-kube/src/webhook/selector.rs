//! Which pods get memory modules: the `memoryModules` part of HermesPolicy objects, read from a
//! directory of YAML (a mounted ConfigMap, or the standalone controller's policy directory), and
//! evaluated against a pod. The types and their matching are the controller's
//! ([`MemoryModules`], [`LabelSelector`](hermes_controller::selector::LabelSelector)), so the
//! webhook, the controller and the CRD schema read `memoryModules` the same way. Pure except
//! for reading the directory.

use std::path::{Path, PathBuf};

use hermes_controller::modules::MemoryModules;
use hermes_controller::selector::Labels;
use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};

/// One HermesPolicy document; only what the webhook needs is read, the rest is the controller's.
#[derive(Debug, Clone, Deserialize)]
struct PolicyDoc {
    kind: Option<String>,
    metadata: Option<Metadata>,
    spec: Option<Spec>,
}

#[derive(Debug, Clone, Deserialize)]
struct Metadata {
    name: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Spec {
    mode: Option<String>,
    memory_modules: Option<MemoryModules>,
}

/// A policy that asks for memory modules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModulesPolicy {
    /// Policy name.
    pub name: String,
    /// Its `memoryModules`.
    pub modules: MemoryModules,
}

/// Read every HermesPolicy with `memoryModules` from `*.yaml`/`*.yml` files in `dir` (one or
/// more documents per file). Policies with `mode: Off` are left out (the kill switch).
pub fn load_policies(dir: &Path) -> Result<Vec<ModulesPolicy>> {
    let entries = std::fs::read_dir(dir).map_err(|source| Error::PolicyRead {
        path: dir.to_owned(),
        source,
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).map_err(|source| Error::PolicyRead {
            path: path.clone(),
            source,
        })?;
        for doc in text
            .split("\n---")
            .filter(|d| !d.trim().trim_start_matches("---").trim().is_empty())
        {
            let doc: PolicyDoc =
                serde_saphyr::from_str(doc).map_err(|source| Error::PolicyParse {
                    path: path.clone(),
                    source: Box::new(source),
                })?;
            if doc.kind.as_deref().is_some_and(|k| k != "HermesPolicy") {
                continue;
            }
            let Some(spec) = doc.spec else { continue };
            if spec.mode.as_deref() == Some("Off") {
                continue;
            }
            if let Some(modules) = spec.memory_modules {
                let name = doc
                    .metadata
                    .and_then(|m| m.name)
                    .unwrap_or_else(|| path.display().to_string());
                out.push(ModulesPolicy { name, modules });
            }
        }
    }
    Ok(out)
}

/// The policy for a pod: the most specific that applies (namespaces given, then more selector
/// terms), ties broken by name so the choice is deterministic.
pub fn select<'a>(
    policies: &'a [ModulesPolicy],
    namespace: &str,
    pod: &Value,
) -> Option<&'a ModulesPolicy> {
    let labels: Labels = pod["metadata"]["labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned())))
                .collect()
        })
        .unwrap_or_default();
    policies
        .iter()
        .filter(|p| p.modules.applies(namespace, &labels))
        .max_by(|a, b| {
            a.modules
                .specificity()
                .cmp(&b.modules.specificity())
                .then_with(|| b.name.cmp(&a.name))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    #[test]
    fn policies_load_select_and_respect_the_kill_switch() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "a.yaml",
            "apiVersion: hermes.dev/v1alpha1\nkind: HermesPolicy\nmetadata:\n  name: all-ml\nspec:\n  images: [\"*\"]\n  memoryModules:\n    namespaces: [ml]\n",
        );
        write(
            dir.path(),
            "b.yaml",
            "kind: HermesPolicy\nmetadata:\n  name: serving\nspec:\n  memoryModules:\n    namespaces: [ml]\n    podSelector:\n      matchLabels: {app: serve}\n      matchExpressions:\n        - {key: tier, operator: NotIn, values: [batch]}\n    loaderConfigMap: serving-loader\n---\nkind: HermesPolicy\nmetadata:\n  name: off\nspec:\n  mode: \"Off\"\n  memoryModules: {}\n",
        );
        write(dir.path(), "notes.txt", "ignored");
        let policies = load_policies(dir.path()).unwrap();
        assert_eq!(
            policies.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
            ["all-ml", "serving"]
        );

        let serve = json!({"metadata": {"labels": {"app": "serve", "tier": "web"}}});
        let batch = json!({"metadata": {"labels": {"app": "serve", "tier": "batch"}}});
        assert_eq!(
            select(&policies, "ml", &serve).map(|p| p.name.as_str()),
            Some("serving"),
            "most specific wins"
        );
        assert_eq!(
            select(&policies, "ml", &serve)
                .unwrap()
                .modules
                .loader_config_map,
            "serving-loader"
        );
        assert_eq!(
            select(&policies, "ml", &batch).map(|p| p.name.as_str()),
            Some("all-ml")
        );
        assert_eq!(
            select(&policies, "default", &serve),
            None,
            "other namespaces are untouched"
        );
    }

    #[test]
    fn unknown_keys_in_memory_modules_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "p.yaml",
            "kind: HermesPolicy\nspec:\n  memoryModules:\n    podSelektor: {}\n",
        );
        let err = load_policies(dir.path()).unwrap_err();
        assert!(format!("{err:?}").contains("podSelektor"), "{err:?}");
    }

    #[test]
    fn selector_operators_follow_kubernetes_semantics_and_unknown_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let policy = |op: &str, values: &str| {
            format!(
                "kind: HermesPolicy\nmetadata:\n  name: p\nspec:\n  memoryModules:\n    podSelector:\n      matchExpressions: [{{key: a, operator: {op}, values: {values}}}]\n"
            )
        };
        let pod = json!({"metadata": {"labels": {"a": "1"}}});
        for (op, values, selected) in [
            ("In", "[\"1\", \"2\"]", true),
            ("NotIn", "[\"1\"]", false),
            ("Exists", "[]", true),
            ("DoesNotExist", "[]", false),
        ] {
            write(dir.path(), "p.yaml", &policy(op, values));
            let policies = load_policies(dir.path()).unwrap();
            assert_eq!(select(&policies, "any", &pod).is_some(), selected, "{op}");
        }
        write(dir.path(), "p.yaml", &policy("Gt", "[\"0\"]"));
        let err = load_policies(dir.path()).unwrap_err();
        assert!(format!("{err:?}").contains("Gt"), "{err:?}");
    }
}

#[cfg(test)]
mod deploy_example {
    #[test]
    fn the_shipped_example_policy_loads() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/modules");
        let policies = super::load_policies(&dir).expect("deploy/modules/*.yaml must stay valid");
        let p = policies
            .iter()
            .find(|p| p.name == "ml-serving")
            .expect("the example policy");
        assert_eq!(p.modules.namespaces, ["ml"]);
        assert_eq!(p.modules.loader_config_map, "hermes-module-loader");
    }
}
