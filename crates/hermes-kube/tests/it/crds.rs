//! The CRDs: the committed YAML is what the Rust types generate, the API server accepts and
//! establishes them, and its OpenAPI validation rejects malformed policies.

use std::time::Duration;

use hermes_kube::crd::{HermesPolicy, crds_yaml};
use kube::api::Api;

use crate::apiserver::repo_root;
use crate::cluster::{Cluster, eventually};

/// Files that must hold exactly the generated CRDs. `HERMES_REGENERATE_CRDS=1` rewrites them.
const GENERATED: &[&str] = &[
    "deploy/crds/hermes.dev.yaml",
    "deploy/helm/hermes/crds/hermes.dev.yaml",
];

#[test]
fn committed_crds_are_what_the_types_generate() {
    let generated = crds_yaml().expect("generate CRDs");
    for rel in GENERATED {
        let path = repo_root().join(rel);
        if std::env::var_os("HERMES_REGENERATE_CRDS").is_some() {
            std::fs::write(&path, &generated).expect("write CRDs");
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == generated,
            "{rel} differs from what crates/hermes-kube/src/crd.rs generates; regenerate with \
             `HERMES_REGENERATE_CRDS=1 cargo test -p hermes-kube committed_crds` \
             (or `hermes kube crds > {rel}`)"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crds_establish_and_reject_malformed_policies() {
    let cluster = Cluster::start().await;
    let doc = |spec: &str| {
        format!(
            "apiVersion: hermes.dev/v1alpha1\nkind: HermesPolicy\nmetadata: {{name: p}}\nspec:\n{spec}"
        )
    };
    // (spec, what the API server's message must name)
    let rejected: &[(&str, &str)] = &[
        ("  images: []\n", "spec.images"),
        ("  images: [a]\n  mode: Fast\n", "spec.mode"),
        (
            "  images: [a]\n  index: {minLayerSize: -1}\n",
            "spec.index.minLayerSize",
        ),
        (
            "  images: [a]\n  index: {spanSize: \"-4Mi\"}\n",
            "spec.index.spanSize",
        ),
        (
            "  images: [a]\n  index: {spanSize: 4Xi}\n",
            "spec.index.spanSize",
        ),
        ("  images: [a]\n  index: {push: Soci}\n", "spec.index.push"),
        (
            "  images: [a]\n  fullyLocalWithin: soon\n",
            "spec.fullyLocalWithin",
        ),
        (
            "  images: [a]\n  prefetch: {window: 5x}\n",
            "spec.prefetch.window",
        ),
        (
            "  images: [a]\n  podSelector: {matchExpressions: [{key: a, operator: Near}]}\n",
            "spec.podSelector.matchExpressions",
        ),
        (
            "  images: [a]\n  memoryModules: {podSelector: {matchExpressions: [{key: a, operator: Near}]}}\n",
            "spec.memoryModules.podSelector.matchExpressions",
        ),
        (
            "  images: [a]\n  memoryModules: {namespaces: [\"\"]}\n",
            "spec.memoryModules.namespaces",
        ),
        (
            "  images: [a]\n  memoryModules: {loaderConfigMap: 7}\n",
            "spec.memoryModules.loaderConfigMap",
        ),
        ("  mode: Lazy\n", "spec.images"),
    ];
    for (spec, field) in rejected {
        match cluster.apply_policy(&doc(spec)).await {
            Err(kube::Error::Api(e)) => {
                assert_eq!(e.code, 422, "{spec:?}: {e:?}");
                assert!(
                    e.message.contains(field),
                    "{spec:?}: message does not name {field}: {}",
                    e.message
                );
            }
            other => panic!("{spec:?}: expected a 422 naming {field}, got {other:?}"),
        }
    }
    // Well-formed but semantically wrong (a glob the core refuses) is stored: the controller
    // reports it through a status condition (tests in controller.rs).
    let stored = cluster
        .apply_policy(&doc(
            "  images: [\"ghcr.io/a**\"]\n  index: {minLayerSize: 1Mi, spanSize: 65536}\n",
        ))
        .await
        .expect("well-formed policy accepted");
    assert_eq!(stored.spec.policy.images, vec!["ghcr.io/a**".to_owned()]);
    // Defaults are filled in by the API server from the schema.
    assert_eq!(
        stored.spec.policy.mode,
        hermes_controller::policy::Mode::Lazy
    );
    assert_eq!(
        stored.spec.policy.index.push,
        hermes_controller::policy::Push::None
    );
    // memoryModules is typed: its loader's default is filled in too.
    let modules = cluster
        .apply_policy(&doc("  images: [a]\n  memoryModules: {namespaces: [ml]}\n"))
        .await
        .expect("well-formed memoryModules accepted");
    assert_eq!(
        modules
            .spec
            .policy
            .memory_modules
            .map(|m| m.loader_config_map),
        Some(hermes_controller::modules::DEFAULT_LOADER_CONFIG_MAP.to_owned())
    );
    // Printer columns are served.
    let (ok, table) = cluster.server.kubectl(&["get", "hermespolicies"], None);
    assert!(ok, "{table}");
    for column in ["NAME", "MODE", "VALID", "MATCHED", "READY", "AGE"] {
        assert!(table.contains(column), "no {column} column: {table}");
    }
    let (ok, table) = cluster.server.kubectl(&["get", "hermesimages"], None);
    assert!(ok, "{table}");
    // Short names are registered.
    let api: Api<HermesPolicy> = Api::all(cluster.client.clone());
    eventually(Duration::from_secs(10), "policy p listed", || async {
        api.get_opt("p").await.ok().flatten()
    })
    .await;
    let (ok, out) = cluster
        .server
        .kubectl(&["get", "hpol", "p", "-o", "name"], None);
    assert!(ok && out.contains("hermespolicy.hermes.dev/p"), "{out}");
}
