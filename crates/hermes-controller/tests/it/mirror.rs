//! The artifact store kept in an OCI repository of a real registry: what one replica builds,
//! another copies and serves without building; damaged copies are refused.

use hermes_controller::mirror::{Mirror, image_tag, layer_tag};
use hermes_controller::queue::LayerKey;
use hermes_controller::reconcile::Phase;
use hermes_oci::{Digest, Reference, Store};
use hermes_testkit::{Fault, FaultProxy, FaultRule, Registry};

use crate::engine::{
    MIB, blob_gets, client, container, engine_with, fast_options, policy_for, push_app, run_until,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_one_replica_publishes_another_copies_and_serves_without_building() {
    let registry = Registry::start().expect("registry");
    let pushed = push_app(&registry.host(), "ctl/ha:v1");
    let proxy = FaultProxy::start(registry.addr()).expect("proxy");
    let reference = format!("{}/ctl/ha:v1", proxy.host());
    let big = &pushed.layers[0];
    let repository = Reference::parse(&format!("{}/hermes/store", registry.host())).unwrap();
    let mirror = Mirror::new(client(), repository.clone());

    // Replica A builds and publishes.
    let a = tempfile::tempdir().expect("tempdir");
    let (mut ea, _api_a, store_a) = engine_with(a.path(), fast_options(), Some(mirror.clone()));
    ea.set_policies(policy_for(&proxy.host()), Vec::new());
    ea.set_containers(vec![container("a", &reference, &pushed.manifest_digest)]);
    run_until(&mut ea, &reference, "Ready", |r| {
        r.status.phase == Phase::Ready
    })
    .await;
    let manifest = Digest::parse(&pushed.manifest_digest).unwrap();
    let key = LayerKey {
        digest: Digest::parse(&big.digest).unwrap(),
        span_size: MIB,
    };
    let mut tags = client().tags(&repository).await.expect("tags");
    tags.sort();
    assert_eq!(tags, vec![image_tag(&manifest), layer_tag(&key)]);
    drop(ea); // A is gone (a failover)

    // Replica B starts with an empty data dir: it copies, and is Ready without reading a layer.
    let b = tempfile::tempdir().expect("tempdir");
    let store_b = Store::open(b.path().join("store")).expect("store");
    let copied = mirror.sync(&store_b).await.expect("sync");
    // The image entry carries its layer, so the layer's own entry need not be read.
    assert_eq!(
        (copied.entries, copied.layers, copied.images),
        (1, 1, 1),
        "{copied:?}"
    );
    let ztoc_a = store_a
        .ztoc_for_layer(&key.digest, MIB)
        .unwrap()
        .expect("A's zTOC");
    let ztoc_b = store_b
        .ztoc_for_layer(&key.digest, MIB)
        .unwrap()
        .expect("B's copy");
    assert_eq!(ztoc_a, ztoc_b);
    assert!(store_b.get_blob(&ztoc_b).unwrap() == store_a.get_blob(&ztoc_a).unwrap());
    assert_eq!(store_b.images().unwrap(), store_a.images().unwrap());
    assert_eq!(
        mirror.sync(&store_b).await.expect("sync").entries,
        0,
        "nothing new"
    );

    let reads_before = blob_gets(&proxy, &big.digest);
    let (mut eb, _api_b, _) = engine_with(b.path(), fast_options(), Some(mirror.clone()));
    eb.set_policies(policy_for(&proxy.host()), Vec::new());
    eb.set_containers(vec![container("b", &reference, &pushed.manifest_digest)]);
    let ready = run_until(&mut eb, &reference, "Ready", |r| {
        r.status.phase == Phase::Ready
    })
    .await;
    assert_eq!(ready.bytes_read, 0, "B built nothing");
    assert_eq!(
        blob_gets(&proxy, &big.digest),
        reads_before,
        "no layer read"
    );

    // A copy damaged in transit is refused: nothing is stored, so nothing wrong is served.
    let damaging = FaultProxy::start(registry.addr()).expect("proxy");
    damaging.push(
        FaultRule::new(format!("/blobs/{ztoc_a}"), Fault::Corrupt { at: 100 })
            .method("GET")
            .times(1000),
    );
    let through = Reference::parse(&format!("{}/hermes/store", damaging.host())).unwrap();
    let c = tempfile::tempdir().expect("tempdir");
    let store_c = Store::open(c.path()).expect("store");
    let err = Mirror::new(client(), through)
        .sync(&store_c)
        .await
        .expect_err("a damaged zTOC must not be copied");
    assert!(
        hermes_controller::chain(&err).contains("is corrupt"),
        "{}",
        hermes_controller::chain(&err)
    );
    assert!(store_c.layers().unwrap().is_empty());
    assert!(store_c.images().unwrap().is_empty());

    // Collected entries leave the repository.
    mirror.forget_image(&manifest).await.expect("forget image");
    mirror.forget_layer(&key).await.expect("forget layer");
    assert!(client().tags(&repository).await.expect("tags").is_empty());
}
