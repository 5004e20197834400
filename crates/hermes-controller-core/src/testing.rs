//! Builders of test values for this crate's and its users' tests (feature `testing`).

use std::time::{Duration, SystemTime};

use hermes_oci_types::{Digest, Reference};

use crate::matcher::RunningContainer;
use crate::policy::{Policy, parse_policies};

/// A valid digest made of the byte `n` repeated.
pub fn digest(n: u8) -> Digest {
    Digest::parse(&format!("sha256:{}", format!("{n:02x}").repeat(32))).unwrap()
}

/// `secs` seconds after the Unix epoch.
pub fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

/// Policies from `(name, extra spec lines)`.
pub fn policies(specs: &[(&str, &str)]) -> Vec<Policy> {
    let text = specs
        .iter()
        .map(|(name, spec)| {
            format!(
                "apiVersion: hermes.dev/v1alpha1\nkind: HermesPolicy\nmetadata: {{name: {name}}}\nspec:\n{spec}"
            )
        })
        .collect::<Vec<_>>()
        .join("---\n");
    parse_policies(&text, "test").unwrap()
}

/// A running container of pod `pod` in namespace `ns` (labelled `env=<ns>`, `app=<pod>`).
pub fn container(ns: &str, pod: &str, image: &str, digest: Option<&str>) -> RunningContainer {
    RunningContainer {
        namespace: ns.to_owned(),
        pod: pod.to_owned(),
        namespace_labels: [("env".to_owned(), ns.to_owned())].into(),
        pod_labels: [("app".to_owned(), pod.to_owned())].into(),
        image: Reference::parse(image).unwrap(),
        digest: digest.map(|d| Digest::parse(d).unwrap()),
    }
}
