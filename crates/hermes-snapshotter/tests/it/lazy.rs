//! The production remote source: a layer indexed into the local store is mounted lazily from a
//! real registry, committed by the snapshotter, and a container rootfs over it (a real overlay
//! mount) reads the layer's files.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;

use hermes_node_api::labels;
use hermes_oci::{Client, ClientOptions, IndexOptions, Reference, Store};
use hermes_snapshotter::{Error, FallbackReason, LazyLayers, Snapshots};
use hermes_testkit::{Registry, TestImage};

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[test]
fn an_indexed_layer_is_committed_as_a_lazy_mount_and_read_through_overlay() {
    crate::support::require_root_and_overlay();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let registry = Registry::start().expect("registry");
    let pushed = TestImage::new()
        .file("app/main.py", b"print('hello')\n".to_vec())
        .big_file("app/model.bin", 3)
        .layer()
        .file("etc/small.conf", b"small = true\n".to_vec())
        .push(&registry.host(), "snap/app:v1")
        .expect("push");
    let layer = pushed.layers.iter().max_by_key(|l| l.size).expect("layer");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path().join("store")).expect("store");
    let client = Client::new(ClientOptions {
        plain_http: true,
        ..ClientOptions::default()
    })
    .expect("client");
    let reference = Reference::parse(&pushed.reference).expect("reference");
    let options = IndexOptions {
        min_layer_size: 1 << 20,
        span_size: 256 << 10,
        ..IndexOptions::default()
    };
    runtime
        .block_on(hermes_oci::build_index(
            &client,
            &store,
            &reference,
            &options,
            &|_| {},
        ))
        .expect("index");

    let lazy = Arc::new(LazyLayers::new(
        store,
        client,
        runtime.handle().clone(),
        &dir.path().join("lazy"),
        false,
    ));
    let snapshots = Snapshots::open(dir.path().join("snapshots"), lazy.clone()).expect("snapshots");
    let l = labels(&[
        (labels::SNAPSHOT_REF, "sha256:chain-app"),
        (labels::CRI_LAYER_DIGEST, layer.digest.as_str()),
        (labels::CRI_IMAGE_REF, pushed.reference.as_str()),
    ]);
    let err = snapshots
        .prepare("extract-app", "", l)
        .expect_err("a lazy layer answers AlreadyExists");
    assert!(
        matches!(&err, Error::AlreadyExists { key } if key == "sha256:chain-app"),
        "{err:?}"
    );
    assert!(
        lazy.mountpoint(&layer.digest).is_some(),
        "the layer is mounted lazily"
    );

    // A layer without a zTOC falls back to a normal snapshot, counted.
    let small = pushed
        .layers
        .iter()
        .min_by_key(|l| l.size)
        .expect("small layer");
    let l = labels(&[
        (labels::SNAPSHOT_REF, "sha256:chain-small"),
        (labels::CRI_LAYER_DIGEST, small.digest.as_str()),
        (labels::CRI_IMAGE_REF, pushed.reference.as_str()),
    ]);
    snapshots
        .prepare("extract-small", "", l)
        .expect("normal snapshot");
    assert_eq!(snapshots.fallback_count(FallbackReason::NotAvailable), 1);

    // The container's rootfs: an overlay over the lazy layer, mounted for real.
    let mounts = snapshots
        .prepare("rootfs", "sha256:chain-app", BTreeMap::new())
        .expect("rootfs");
    let target = dir.path().join("rootfs");
    std::fs::create_dir(&target).expect("mkdir");
    let m = &mounts[0];
    let status = Command::new("mount")
        .args(["-t", &m.fs_type, &m.source, "-o", &m.options.join(",")])
        .arg(&target)
        .status()
        .expect("mount");
    assert!(status.success(), "mount {m:?}");
    let main = std::fs::read(target.join("app/main.py"));
    let model = std::fs::read(target.join("app/model.bin"));
    let _ = Command::new("umount").arg(&target).status();
    assert_eq!(main.expect("read main.py"), layer.files["app/main.py"]);
    assert!(
        model.expect("read model.bin") == layer.files["app/model.bin"],
        "model bytes differ"
    );
    drop(snapshots);
    drop(lazy);
    let mounts = std::fs::read_to_string("/proc/mounts").expect("mounts");
    assert!(
        !mounts.contains(dir.path().to_str().expect("utf8")),
        "mounts left behind"
    );
}
