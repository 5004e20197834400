//! Kubernetes label selectors (`matchLabels` and `matchExpressions`), as `metav1.LabelSelector`
//! defines them: all requirements must hold, and an empty selector selects everything.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Labels of a namespace or pod.
pub type Labels = BTreeMap<String, String>;

/// A Kubernetes label selector.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    /// Labels that must be present with exactly these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: Labels,
    /// Set-based requirements.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelRequirement>,
}

/// One `matchExpressions` entry.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelRequirement {
    /// The label key.
    pub key: String,
    /// How the label is compared.
    pub operator: Operator,
    /// Values for `In` and `NotIn`; must be empty for `Exists` and `DoesNotExist`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

/// A `matchExpressions` operator.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Operator {
    /// The label is present with one of the values.
    In,
    /// The label is absent or has none of the values.
    NotIn,
    /// The label is present.
    Exists,
    /// The label is absent.
    DoesNotExist,
}

impl LabelSelector {
    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }

    /// How many requirements the selector has (the matcher's tie-breaker: more is more specific).
    pub fn requirement_count(&self) -> usize {
        self.match_labels.len() + self.match_expressions.len()
    }

    /// Why the selector cannot be used, as (field below the selector, reason), or `None`.
    pub fn problem(&self) -> Option<(String, String)> {
        for (i, r) in self.match_expressions.iter().enumerate() {
            let field = || format!("matchExpressions[{i}]");
            if r.key.is_empty() {
                return Some((format!("{}.key", field()), "must not be empty".to_owned()));
            }
            let needs_values = matches!(r.operator, Operator::In | Operator::NotIn);
            if needs_values && r.values.is_empty() {
                return Some((
                    format!("{}.values", field()),
                    format!("{:?} needs at least one value", r.operator),
                ));
            }
            if !needs_values && !r.values.is_empty() {
                return Some((
                    format!("{}.values", field()),
                    format!("{:?} takes no values", r.operator),
                ));
            }
        }
        None
    }
}

impl LabelRequirement {
    fn matches(&self, labels: &Labels) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            Operator::In => value.is_some_and(|v| self.values.contains(v)),
            Operator::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn req(key: &str, operator: Operator, values: &[&str]) -> LabelRequirement {
        LabelRequirement {
            key: key.to_owned(),
            operator,
            values: values.iter().map(|v| (*v).to_owned()).collect(),
        }
    }

    #[test]
    fn empty_selector_selects_everything() {
        assert!(LabelSelector::default().matches(&Labels::new()));
        assert!(LabelSelector::default().matches(&labels(&[("a", "b")])));
    }

    #[test]
    fn operators_follow_kubernetes_semantics() {
        let l = labels(&[("tier", "web"), ("env", "prod")]);
        let cases = [
            (req("tier", Operator::In, &["web", "api"]), true),
            (req("tier", Operator::In, &["api"]), false),
            (req("missing", Operator::In, &["x"]), false),
            (req("tier", Operator::NotIn, &["api"]), true),
            (req("tier", Operator::NotIn, &["web"]), false),
            (req("missing", Operator::NotIn, &["x"]), true),
            (req("env", Operator::Exists, &[]), true),
            (req("missing", Operator::Exists, &[]), false),
            (req("missing", Operator::DoesNotExist, &[]), true),
            (req("env", Operator::DoesNotExist, &[]), false),
        ];
        for (r, expected) in cases {
            let s = LabelSelector {
                match_expressions: vec![r.clone()],
                ..Default::default()
            };
            assert_eq!(s.matches(&l), expected, "{r:?} on {l:?}");
        }
    }

    #[test]
    fn match_labels_and_expressions_must_all_hold() {
        let s = LabelSelector {
            match_labels: labels(&[("env", "prod")]),
            match_expressions: vec![req("tier", Operator::Exists, &[])],
        };
        assert!(s.matches(&labels(&[("env", "prod"), ("tier", "x")])));
        assert!(!s.matches(&labels(&[("env", "prod")])));
        assert!(!s.matches(&labels(&[("env", "dev"), ("tier", "x")])));
        assert_eq!(s.requirement_count(), 2);
    }

    #[test]
    fn problems_name_the_expression() {
        let s = LabelSelector {
            match_expressions: vec![req("a", Operator::Exists, &[]), req("b", Operator::In, &[])],
            ..Default::default()
        };
        assert_eq!(
            s.problem(),
            Some((
                "matchExpressions[1].values".to_owned(),
                "In needs at least one value".to_owned()
            ))
        );
        let s = LabelSelector {
            match_expressions: vec![req("a", Operator::Exists, &["x"])],
            ..Default::default()
        };
        assert_eq!(
            s.problem().map(|p| p.0).as_deref(),
            Some("matchExpressions[0].values")
        );
    }
}
