//! The server on a real unix socket, driven by the generated client, with real overlay mounts.

use std::fs;
use std::sync::Arc;

use hermes_node_api::labels;
use hermes_snapshotter::api::containerd::services::snapshots::v1 as pb;
use hermes_snapshotter::{FallbackReason, NoRemoteLayers};
use tonic::Code;

use crate::support::{
    Answer, Double, Mounted, Served, labels, require_root_and_overlay, try_connect,
};

fn prepare(
    key: &str,
    parent: &str,
    labels: std::collections::HashMap<String, String>,
) -> pb::PrepareSnapshotRequest {
    pb::PrepareSnapshotRequest {
        snapshotter: "hermes".into(),
        key: key.into(),
        parent: parent.into(),
        labels,
    }
}

fn commit(name: &str, key: &str) -> pb::CommitSnapshotRequest {
    pb::CommitSnapshotRequest {
        snapshotter: "hermes".into(),
        name: name.into(),
        key: key.into(),
        labels: Default::default(),
    }
}

fn stat(key: &str) -> pb::StatSnapshotRequest {
    pb::StatSnapshotRequest {
        snapshotter: "hermes".into(),
        key: key.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_layer_chain_mounts_as_the_merged_view() {
    require_root_and_overlay();
    let mut s = Served::start(Arc::new(NoRemoteLayers)).await;
    let c = &mut s.client;

    // Layer 0: a bind mount of an empty dir.
    let m = c
        .prepare(prepare("k0", "", Default::default()))
        .await
        .unwrap()
        .into_inner()
        .mounts;
    {
        let root = Mounted::new(&m);
        fs::write(root.path("base.txt"), "base").unwrap();
        fs::write(root.path("shadowed.txt"), "from layer 0").unwrap();
        fs::write(root.path("deleted.txt"), "gone later").unwrap();
        fs::create_dir(root.path("dir")).unwrap();
        fs::write(root.path("dir/a"), "a").unwrap();
    }
    c.commit(commit("l0", "k0")).await.unwrap();

    // Layers 1 and 2: overlays whose changes land in their upper dirs.
    let m = c
        .prepare(prepare("k1", "l0", Default::default()))
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(m[0].r#type, "overlay");
    {
        let root = Mounted::new(&m);
        assert_eq!(fs::read_to_string(root.path("base.txt")).unwrap(), "base");
        fs::write(root.path("shadowed.txt"), "from layer 1").unwrap();
        fs::write(root.path("dir/b"), "b").unwrap();
    }
    c.commit(commit("l1", "k1")).await.unwrap();
    let m = c
        .prepare(prepare("k2", "l1", Default::default()))
        .await
        .unwrap()
        .into_inner()
        .mounts;
    {
        let root = Mounted::new(&m);
        fs::remove_file(root.path("deleted.txt")).unwrap();
        fs::write(root.path("top.txt"), "top").unwrap();
    }
    c.commit(commit("l2", "k2")).await.unwrap();

    // The container's rootfs: an active snapshot over the three layers.
    let m = c
        .prepare(prepare("rootfs", "l2", Default::default()))
        .await
        .unwrap()
        .into_inner()
        .mounts;
    let again = c
        .mounts(pb::MountsRequest {
            snapshotter: "hermes".into(),
            key: "rootfs".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(m, again);
    let root = Mounted::new(&m);
    assert_eq!(fs::read_to_string(root.path("base.txt")).unwrap(), "base");
    assert_eq!(
        fs::read_to_string(root.path("shadowed.txt")).unwrap(),
        "from layer 1"
    );
    assert!(
        !root.path("deleted.txt").exists(),
        "layer 2's deletion hides layer 0's file"
    );
    assert_eq!(fs::read_to_string(root.path("top.txt")).unwrap(), "top");
    let mut dir: Vec<String> = fs::read_dir(root.path("dir"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    dir.sort();
    assert_eq!(dir, ["a", "b"], "directories merge across layers");
    fs::write(root.path("written-by-container"), "x").unwrap();
    let usage = c
        .usage(pb::UsageRequest {
            snapshotter: "hermes".into(),
            key: "rootfs".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(usage.inodes >= 2, "{usage:?}");

    let mut listed = Vec::new();
    let mut stream = c
        .list(pb::ListSnapshotsRequest {
            snapshotter: "hermes".into(),
            filters: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    while let Some(batch) = stream.message().await.unwrap() {
        listed.extend(batch.info.into_iter().map(|i| (i.name, i.kind)));
    }
    listed.sort();
    let committed = pb::Kind::Committed as i32;
    assert_eq!(
        listed,
        [
            ("l0".to_string(), committed),
            ("l1".to_string(), committed),
            ("l2".to_string(), committed),
            ("rootfs".to_string(), pb::Kind::Active as i32),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_prepare_answers_already_exists_and_stat_shows_the_committed_layer() {
    require_root_and_overlay();
    let layer = tempfile::tempdir().unwrap();
    fs::write(layer.path().join("lazy.txt"), "served lazily").unwrap();
    let double = Double::new(Answer::Dir(layer.path().to_owned()));
    let mut s = Served::start(double.clone()).await;
    let c = &mut s.client;

    let cri = labels(&[
        (labels::SNAPSHOT_REF, "sha256:chain-a"),
        (labels::CRI_LAYER_DIGEST, "sha256:layer-a"),
        (labels::CRI_IMAGE_REF, "127.0.0.1:5000/app:1"),
    ]);
    let status = c
        .prepare(prepare("extract-1 sha256:chain-a", "", cri))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    let info = c
        .stat(stat("sha256:chain-a"))
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(info.kind, pb::Kind::Committed as i32);
    assert_eq!(
        info.labels
            .get(labels::CRI_LAYER_DIGEST)
            .map(String::as_str),
        Some("sha256:layer-a")
    );
    assert_eq!(
        double.asked()[0].image_ref.as_deref(),
        Some("127.0.0.1:5000/app:1")
    );
    let gone = c.stat(stat("extract-1 sha256:chain-a")).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);

    // A container on the remote layer sees its files through overlayfs.
    let m = c
        .prepare(prepare("rootfs", "sha256:chain-a", Default::default()))
        .await
        .unwrap()
        .into_inner()
        .mounts;
    let root = Mounted::new(&m);
    assert_eq!(
        fs::read_to_string(root.path("lazy.txt")).unwrap(),
        "served lazily"
    );
    fs::write(root.path("new"), "x").unwrap();
    assert!(
        !layer.path().join("new").exists(),
        "the remote layer stays read-only"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_remote_source_falls_back_to_a_normal_snapshot() {
    let double = Double::new(Answer::Fail);
    let mut s = Served::start(double.clone()).await;
    let c = &mut s.client;
    let cri = labels(&[
        (labels::SNAPSHOT_REF, "sha256:chain-b"),
        (labels::CRI_LAYER_DIGEST, "sha256:layer-b"),
    ]);
    let m = c
        .prepare(prepare("extract-b", "", cri))
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(m[0].r#type, "bind");
    assert_eq!(double.asked().len(), 1);
    let info = c
        .stat(stat("extract-b"))
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(info.kind, pb::Kind::Active as i32);
    assert_eq!(
        c.stat(stat("sha256:chain-b")).await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(s.core.fallback_count(FallbackReason::RemoteError), 1);

    // containerd then unpacks and commits under the target as usual.
    c.commit(commit("sha256:chain-b", "extract-b"))
        .await
        .unwrap();
    let info = c
        .stat(stat("sha256:chain-b"))
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(info.kind, pb::Kind::Committed as i32);
}

fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Code {
    r.expect_err("expected an error status").code()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_map_to_containerd_codes() {
    let mut s = Served::start(Arc::new(NoRemoteLayers)).await;
    let c = &mut s.client;
    c.prepare(prepare("a", "", Default::default()))
        .await
        .unwrap();
    assert_eq!(
        code(c.prepare(prepare("a", "", Default::default())).await),
        Code::AlreadyExists
    );
    assert_eq!(
        code(c.prepare(prepare("b", "missing", Default::default())).await),
        Code::NotFound
    );
    assert_eq!(
        code(c.prepare(prepare("b", "a", Default::default())).await),
        Code::InvalidArgument
    );
    c.commit(commit("base", "a")).await.unwrap();
    c.prepare(prepare("child", "base", Default::default()))
        .await
        .unwrap();
    let remove = pb::RemoveSnapshotRequest {
        snapshotter: "hermes".into(),
        key: "base".into(),
    };
    assert_eq!(
        code(c.remove(remove.clone()).await),
        Code::FailedPrecondition
    );
    assert_eq!(
        code(
            c.mounts(pb::MountsRequest {
                snapshotter: "hermes".into(),
                key: "base".into()
            })
            .await
        ),
        Code::FailedPrecondition
    );
    let update = pb::UpdateSnapshotRequest {
        snapshotter: "hermes".into(),
        info: Some(pb::Info {
            name: "base".into(),
            labels: labels(&[("x", "1")]),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["labels.x".into()],
        }),
    };
    let info = c.update(update).await.unwrap().into_inner().info.unwrap();
    assert_eq!(info.labels, labels(&[("x", "1")]));
    let bad = pb::ListSnapshotsRequest {
        snapshotter: "hermes".into(),
        filters: vec!["size>1".into()],
    };
    assert_eq!(code(c.list(bad).await), Code::InvalidArgument);
    c.cleanup(pb::CleanupRequest {
        snapshotter: "hermes".into(),
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_graceful_and_removes_the_socket() {
    let mut s = Served::start(Arc::new(NoRemoteLayers)).await;
    s.client
        .prepare(prepare("a", "", Default::default()))
        .await
        .unwrap();
    let socket = s.socket();
    s.server.take().unwrap().shutdown().await.unwrap();
    assert!(!socket.exists(), "socket file left at {}", socket.display());
    assert!(
        try_connect(&socket).await.is_err(),
        "still accepting after shutdown"
    );
}
