//! A policy's `memoryModules`: which pods get memory modules (namespaces and a pod selector)
//! and the ConfigMap holding their loader. The controller validates and carries it; the
//! modules webhook decides per pod with [`MemoryModules::applies`] and, among several
//! policies, takes the most specific ([`MemoryModules::specificity`]).

use serde::{Deserialize, Serialize};

use crate::selector::{LabelSelector, Labels};

/// The loader ConfigMap used when a policy names none.
pub const DEFAULT_LOADER_CONFIG_MAP: &str = "hermes-module-loader";

/// `spec.memoryModules` of a `HermesPolicy`.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MemoryModules {
    /// Namespaces whose pods get the modules (every namespace when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Pods that get the modules (every pod of those namespaces when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    /// The ConfigMap with `load-sidecars.sh`, mounted at `/etc/hermes/`.
    #[serde(default = "default_loader_config_map")]
    pub loader_config_map: String,
}

fn default_loader_config_map() -> String {
    DEFAULT_LOADER_CONFIG_MAP.to_owned()
}

impl Default for MemoryModules {
    fn default() -> Self {
        Self {
            namespaces: Vec::new(),
            pod_selector: None,
            loader_config_map: default_loader_config_map(),
        }
    }
}

impl MemoryModules {
    /// Whether a pod in `namespace` with `pod_labels` gets the modules.
    pub fn applies(&self, namespace: &str, pod_labels: &Labels) -> bool {
        (self.namespaces.is_empty() || self.namespaces.iter().any(|n| n == namespace))
            && self
                .pod_selector
                .as_ref()
                .is_none_or(|s| s.matches(pod_labels))
    }

    /// How specific the choice of pods is, to order policies that all apply: naming
    /// namespaces first, then more selector requirements.
    pub fn specificity(&self) -> (bool, usize) {
        (
            !self.namespaces.is_empty(),
            self.pod_selector
                .as_ref()
                .map_or(0, LabelSelector::requirement_count),
        )
    }

    /// Why the value cannot be used, as (field below `memoryModules`, reason), or `None`.
    pub fn problem(&self) -> Option<(String, String)> {
        if let Some(i) = self.namespaces.iter().position(String::is_empty) {
            return Some((format!("namespaces[{i}]"), "must not be empty".to_owned()));
        }
        if self.loader_config_map.is_empty() {
            return Some((
                "loaderConfigMap".to_owned(),
                format!("must not be empty (default {DEFAULT_LOADER_CONFIG_MAP})"),
            ));
        }
        let (sub, reason) = self.pod_selector.as_ref()?.problem()?;
        Some((format!("podSelector.{sub}"), reason))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn modules(yaml: &str) -> MemoryModules {
        serde_saphyr::from_str(yaml).unwrap()
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn memory_modules_apply_by_namespace_and_pod_selector() {
        let serving = modules(
            "namespaces: [ml]\npodSelector:\n  matchLabels: {app: serve}\n  matchExpressions:\n    - {key: tier, operator: NotIn, values: [batch]}\nloaderConfigMap: serving-loader\n",
        );
        assert_eq!(serving.loader_config_map, "serving-loader");
        assert!(serving.applies("ml", &labels(&[("app", "serve"), ("tier", "web")])));
        assert!(!serving.applies("ml", &labels(&[("app", "serve"), ("tier", "batch")])));
        assert!(!serving.applies("default", &labels(&[("app", "serve")])));
        let all = modules("{}");
        assert_eq!(all.loader_config_map, DEFAULT_LOADER_CONFIG_MAP);
        assert!(all.applies("default", &Labels::new()));
        assert!(serving.specificity() > modules("namespaces: [ml]\n").specificity());
        assert!(modules("namespaces: [ml]\n").specificity() > all.specificity());
    }

    #[test]
    fn unknown_keys_and_operators_in_memory_modules_are_rejected() {
        let err = serde_saphyr::from_str::<MemoryModules>("podSelektor: {}\n").unwrap_err();
        assert!(err.to_string().contains("podSelektor"), "{err}");
        let err = serde_saphyr::from_str::<MemoryModules>(
            "podSelector:\n  matchExpressions: [{key: a, operator: Gt, values: [\"1\"]}]\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("Gt"), "{err}");
    }

    #[test]
    fn the_shipped_modules_example_is_a_valid_policy() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deploy/modules/policy-example.yaml"
        );
        let text = std::fs::read_to_string(path).unwrap();
        let policies = crate::policy::parse_policies(&text, path).unwrap();
        let modules = policies[0].memory_modules.as_ref().expect("memoryModules");
        assert_eq!(modules.namespaces, ["ml"]);
        assert_eq!(modules.loader_config_map, DEFAULT_LOADER_CONFIG_MAP);
        let serving = labels(&[("app.kubernetes.io/component", "serving")]);
        assert!(modules.applies("ml", &serving));
    }

    #[test]
    fn invalid_memory_modules_name_the_field() {
        let problem = |yaml| modules(yaml).problem().map(|(field, _)| field);
        assert_eq!(
            problem("namespaces: [ml, \"\"]\n").as_deref(),
            Some("namespaces[1]")
        );
        assert_eq!(
            problem("loaderConfigMap: \"\"\n").as_deref(),
            Some("loaderConfigMap")
        );
        assert_eq!(
            problem("podSelector:\n  matchExpressions: [{key: a, operator: In}]\n").as_deref(),
            Some("podSelector.matchExpressions[0].values")
        );
        assert_eq!(problem("namespaces: [ml]\n"), None);
    }
}
