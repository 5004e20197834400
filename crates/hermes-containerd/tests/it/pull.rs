//! `pull` into a real containerd through its built-in overlayfs snapshotter (the normal path,
//! no Hermes): what `ctr run` needs is there and survives garbage collection.

use std::time::Duration;

use hermes_containerd::api::containerd::services::leases::v1 as leases;
use hermes_containerd::{Containerd, LayerOutcome, Platform, PullOptions, pull};
use hermes_oci::{Client, ClientOptions, Reference};
use hermes_testkit::{Registry, busybox_image};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pulled_image_runs_with_ctr_and_survives_garbage_collection() {
    let registry = Registry::start().unwrap();
    let image = busybox_image()
        .unwrap()
        .layer()
        .file("etc/motd", "pulled by hermes-containerd\n")
        .layer()
        .whiteout("bin/ls")
        .entrypoint(&["/bin/cat", "/etc/motd"])
        .push(&registry.host(), "pulled:v1")
        .unwrap();
    let containerd = hermes_testkit::Containerd::builder().start().unwrap();
    let client = Containerd::connect(containerd.address(), "default")
        .await
        .unwrap();
    let oci = Client::new(ClientOptions {
        plain_http: true,
        ..ClientOptions::default()
    })
    .unwrap();
    let reference = Reference::parse(&image.reference).unwrap();
    let options = PullOptions {
        snapshotter: "overlayfs".into(),
        platform: Platform::parse("linux/amd64").unwrap(),
    };
    let mut seen = Vec::new();
    let report = pull(&client, &oci, &reference, &options, |l| {
        seen.push(l.clone())
    })
    .await
    .unwrap_or_else(|e| panic!("pull: {e:?}\ncontainerd log:\n{}", containerd.log()));
    assert_eq!(report.layers, seen);
    assert_eq!(report.name, image.reference);
    assert_eq!(report.manifest_digest, image.manifest_digest);
    assert_eq!(report.config_digest, image.config_digest);
    let outcomes: Vec<_> = report.layers.iter().map(|l| l.outcome).collect();
    assert_eq!(outcomes, vec![LayerOutcome::Unpacked; 3]);

    // Force a synchronous garbage collection: everything the image needs must be referenced.
    client
        .create_lease("gc-trigger", Duration::from_secs(60))
        .await
        .unwrap();
    client
        .leases()
        .delete(leases::DeleteRequest {
            id: "gc-trigger".into(),
            sync: true,
        })
        .await
        .unwrap();
    let snapshots = containerd.ctr(&["snapshots", "ls"]).unwrap();
    assert!(snapshots.contains(&report.chain_id), "{snapshots}");
    let content = containerd.ctr(&["content", "ls"]).unwrap();
    for layer in &image.layers {
        assert!(content.contains(&layer.digest), "{content}");
        let labels = client.content_labels(&layer.digest).await.unwrap().unwrap();
        assert_eq!(
            labels.get("containerd.io/uncompressed"),
            Some(&layer.diff_id),
            "{labels:?}"
        );
    }

    let out = containerd
        .ctr(&["run", "--rm", &image.reference, "pulled-1"])
        .unwrap_or_else(|e| panic!("{e:?}\ncontainerd log:\n{}", containerd.log()));
    assert_eq!(out, "pulled by hermes-containerd\n");

    // Pulling again finds every layer in place.
    let again = pull(&client, &oci, &reference, &options, |_| {})
        .await
        .unwrap();
    let outcomes: Vec<_> = again.layers.iter().map(|l| l.outcome).collect();
    assert_eq!(outcomes, vec![LayerOutcome::Present; 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_of_a_missing_image_names_it_and_leaves_no_lease() {
    let registry = Registry::start().unwrap();
    let containerd = hermes_testkit::Containerd::builder().start().unwrap();
    let client = Containerd::connect(containerd.address(), "default")
        .await
        .unwrap();
    let oci = Client::new(ClientOptions {
        plain_http: true,
        ..ClientOptions::default()
    })
    .unwrap();
    let reference = Reference::parse(&format!("{}/nothing:here", registry.host())).unwrap();
    let options = PullOptions {
        snapshotter: "overlayfs".into(),
        platform: Platform::host(),
    };
    let err = pull(&client, &oci, &reference, &options, |_| {})
        .await
        .unwrap_err();
    assert!(err.to_string().contains("nothing:here"), "{err}");
    let leases = containerd.ctr(&["leases", "ls", "-q"]).unwrap();
    assert_eq!(leases.trim(), "", "leases left: {leases}");
}
