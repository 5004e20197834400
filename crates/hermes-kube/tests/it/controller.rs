//! The adapter end to end: policies and pods in a real API server, a real registry with a
//! password, the controller indexing what runs, and what it writes back.

use std::time::Duration;

use hermes_kube::crd::{HermesPolicy, ImagePhase};
use hermes_testkit::{Registry, TestImage};
use kube::api::Api;

use crate::cluster::{Cluster, Replica, eventually};

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_pods_get_their_images_indexed_with_statuses_and_events() {
    let registry = Registry::start_with_htpasswd("puller", "s3cret").expect("registry");
    let host = registry.host();
    // A second registry whose password only a pod's own imagePullSecrets carry.
    let batch_registry = Registry::start_with_htpasswd("batcher", "0ther").expect("registry");
    let batch_host = batch_registry.host();
    let batch = TestImage::new()
        .file("job", vec![5u8; 100 << 10])
        .push_with_creds(&batch_host, "jobs/batch:v1", "batcher", "0ther")
        .expect("push batch");
    let app = TestImage::new()
        .file("app/bin", vec![7u8; 300 << 10])
        .layer()
        .file("app/data", vec![9u8; 200 << 10])
        .push_with_creds(&host, "acme/app:v1", "puller", "s3cret")
        .expect("push app");
    let other = TestImage::new()
        .file("x", vec![1u8; 1000])
        .push_with_creds(&host, "other/tool:v1", "puller", "s3cret")
        .expect("push other");

    let cluster = Cluster::start().await;
    cluster.namespace("prod", &[("env", "prod")]).await;
    cluster.namespace("dev", &[("env", "dev")]).await;
    cluster
        .pull_secret("prod", "regcred", &host, "puller", "s3cret")
        .await;
    // Credentials reach the controller through the pod's service account.
    cluster.service_account("prod", "app", &["regcred"]).await;
    cluster
        .pull_secret("prod", "batchcred", &batch_host, "batcher", "0ther")
        .await;

    cluster
        .apply_policy(&format!(
            "apiVersion: hermes.dev/v1alpha1\nkind: HermesPolicy\nmetadata: {{name: acme}}\nspec:\n  \
             images: [\"{host}/acme/**\", \"{batch_host}/**\"]\n  namespaceSelector: {{matchLabels: {{env: prod}}}}\n  \
             index: {{minLayerSize: 0, spanSize: 64Ki}}\n"
        ))
        .await
        .expect("apply policy acme");
    cluster
        .apply_policy(
            "apiVersion: hermes.dev/v1alpha1\nkind: HermesPolicy\nmetadata: {name: broken}\nspec:\n  \
             images: [\"ghcr.io/a**\"]\n",
        )
        .await
        .expect("apply policy broken");
    cluster
        .apply_policy(
            "apiVersion: hermes.dev/v1alpha1\nkind: HermesPolicy\nmetadata: {name: unreachable}\nspec:\n  \
             images: [\"127.0.0.1:9/**\"]\n  index: {minLayerSize: 0}\n",
        )
        .await
        .expect("apply policy unreachable");

    let app_ref = format!("{host}/acme/app:v1");
    let app_id = format!("{host}/acme/app@{}", app.manifest_digest);
    cluster
        .running_pod("prod", "web-1", &app_ref, &app_id, Some("app"))
        .await;
    cluster
        .running_pod("prod", "web-2", &app_ref, &app_id, Some("app"))
        .await;
    // Credentials through the pod's own imagePullSecrets (no service account).
    let batch_ref = format!("{batch_host}/jobs/batch:v1");
    let batch_id = format!("{batch_host}/jobs/batch@{}", batch.manifest_digest);
    cluster
        .running_pod_with_pull_secret("prod", "batch", &batch_ref, &batch_id, "batchcred")
        .await;
    // Same image in a namespace the policy does not select, and an image no policy matches.
    cluster
        .running_pod("dev", "web-dev", &app_ref, &app_id, None)
        .await;
    let other_ref = format!("{host}/other/tool:v1");
    let other_id = format!("{host}/other/tool@{}", other.manifest_digest);
    cluster
        .running_pod("prod", "tool", &other_ref, &other_id, Some("app"))
        .await;
    // An image on a registry nobody answers at.
    let gone_digest = format!("sha256:{}", "e".repeat(64));
    cluster
        .running_pod(
            "prod",
            "gone",
            "127.0.0.1:9/x/y:1",
            &format!("127.0.0.1:9/x/y@{gone_digest}"),
            None,
        )
        .await;

    let store = tempfile::tempdir().expect("store dir");
    let replica = Replica::spawn(cluster.controller_client().await, "replica-a", store.path());

    let image = eventually(WAIT, "HermesImage of acme/app Ready", || async {
        cluster.image(&app.manifest_digest).await.filter(|i| {
            i.status
                .as_ref()
                .is_some_and(|s| s.phase == ImagePhase::Ready)
        })
    })
    .await;
    assert_eq!(image.spec.image, app_ref);
    assert_eq!(image.spec.policy, "acme");
    let status = image.status.expect("status");
    assert_eq!(
        status.pods, 2,
        "web-1 and web-2 (web-dev is in a namespace the policy does not select)"
    );
    assert_eq!(status.layers.len(), app.layers.len());
    assert_eq!(
        status.indexed_layers as usize,
        app.layers.len(),
        "{status:?}"
    );
    assert!(status.ready_time.is_some());
    eventually(WAIT, "HermesImage of jobs/batch Ready", || async {
        cluster.image(&batch.manifest_digest).await.filter(|i| {
            i.status
                .as_ref()
                .is_some_and(|s| s.phase == ImagePhase::Ready)
        })
    })
    .await;
    assert!(status.bytes_read > 0, "{status:?}");
    assert_eq!(status.last_error, None);
    // The zTOCs are in the controller's store, keyed by layer digest.
    let oci_store = hermes_oci::Store::open(store.path()).expect("store");
    for layer in &app.layers {
        let digest = hermes_oci::Digest::parse(&layer.digest).expect("digest");
        assert!(
            oci_store
                .ztoc_for_layer(&digest, 64 << 10)
                .expect("store")
                .is_some(),
            "no zTOC for {}",
            layer.digest
        );
    }

    for pod in ["web-1", "web-2"] {
        let events = eventually(WAIT, "HermesIndexReady event", || async {
            let e = cluster.pod_events("prod", pod).await;
            e.iter().any(|(r, _)| r == "HermesIndexReady").then_some(e)
        })
        .await;
        let (_, note) = events
            .iter()
            .find(|(r, _)| r == "HermesIndexReady")
            .expect("event");
        assert!(
            note.contains(&app_ref) && note.contains("policy acme"),
            "{note}"
        );
    }
    assert!(cluster.pod_events("dev", "web-dev").await.is_empty());
    assert!(
        cluster.image(&other.manifest_digest).await.is_none(),
        "no policy matches other/tool"
    );

    // Unreachable registry: Failed with the reason, an event on the pod, and retried.
    let failed = eventually(
        WAIT,
        "HermesImage of the unreachable image Failed",
        || async {
            cluster.image(&gone_digest).await.filter(|i| {
                i.status
                    .as_ref()
                    .is_some_and(|s| s.phase == ImagePhase::Failed)
            })
        },
    )
    .await;
    let reason = failed.status.and_then(|s| s.reason).unwrap_or_default();
    assert!(
        reason.contains("127.0.0.1:9"),
        "reason names the registry: {reason}"
    );
    let events = eventually(WAIT, "HermesIndexFailed event", || async {
        let e = cluster.pod_events("prod", "gone").await;
        e.iter().any(|(r, _)| r == "HermesIndexFailed").then_some(e)
    })
    .await;
    assert!(
        events.iter().any(|(_, n)| n.contains("127.0.0.1:9")),
        "{events:?}"
    );
    // Retried: the attempt count in the reason goes up.
    let attempts = |reason: &str| -> u32 {
        reason
            .split_once(" attempts")
            .and_then(|(before, _)| before.rsplit('(').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let first = attempts(&reason);
    eventually(WAIT, "the failed image retried", || async {
        let reason = cluster.image(&gone_digest).await?.status?.reason?;
        (attempts(&reason) > first).then_some(())
    })
    .await;

    // Policy statuses: counts and conditions, and the invalid one says which field and why.
    let policies: Api<HermesPolicy> = Api::all(cluster.client.clone());
    let acme = eventually(WAIT, "policy acme Ready", || async {
        policies.get("acme").await.ok().filter(|p| {
            p.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            })
        })
    })
    .await;
    let s = acme.status.expect("status");
    assert_eq!((s.matched_images, s.ready_images), (2, 2));
    assert_eq!(s.observed_generation, acme.metadata.generation);
    let broken = eventually(WAIT, "policy broken marked invalid", || async {
        policies
            .get("broken")
            .await
            .ok()
            .filter(|p| p.status.is_some())
    })
    .await;
    let valid = broken
        .status
        .expect("status")
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Valid")
        .expect("Valid condition");
    assert_eq!(
        (valid.status.as_str(), valid.reason.as_str()),
        ("False", "InvalidSpec")
    );
    assert!(
        valid.message.contains("spec.images[0]") && valid.message.contains("whole path segment"),
        "the condition says which field and why: {}",
        valid.message
    );
    let (ok, table) = cluster.server.kubectl(&["get", "hpol", "broken"], None);
    assert!(
        ok && table.contains("False"),
        "the Valid column shows False: {table}"
    );

    // No pod runs the image any more: its HermesImage stays (with its artifacts, until garbage
    // collection) and says so.
    let pods: Api<k8s_openapi::api::core::v1::Pod> =
        Api::namespaced(cluster.client.clone(), "prod");
    for pod in ["web-1", "web-2"] {
        pods.delete(pod, &kube::api::DeleteParams::default().grace_period(0))
            .await
            .expect("delete pod");
    }
    let idle = eventually(WAIT, "HermesImage without pods", || async {
        cluster
            .image(&app.manifest_digest)
            .await
            .and_then(|i| i.status)
            .filter(|s| s.pods == 0)
    })
    .await;
    assert_eq!(idle.phase, ImagePhase::Ready);
    assert!(
        idle.reason
            .as_deref()
            .unwrap_or("")
            .contains("no running container"),
        "{idle:?}"
    );

    replica.stop().await.expect("graceful stop");
    assert_eq!(
        cluster.lease_holder().await,
        None,
        "the lease is released on shutdown"
    );
}
