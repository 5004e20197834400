//! The core's containerd semantics, without a server.

use std::collections::BTreeMap;
use std::sync::Arc;

use hermes_node_api::labels;
use hermes_snapshotter::{Error, FallbackReason, Kind, NoRemoteLayers};

use crate::support::{Answer, Double, core};

fn no_labels() -> BTreeMap<String, String> {
    BTreeMap::new()
}

fn l(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn prepare_without_parent_is_a_writable_bind_and_view_of_one_parent_a_readonly_bind() {
    let (_d, s) = core(Arc::new(NoRemoteLayers));
    let m = s.prepare("a", "", no_labels()).unwrap();
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].fs_type, "bind");
    assert_eq!(m[0].options, ["rw", "rbind"]);
    assert!(m[0].source.ends_with("/fs"), "{m:?}");
    s.commit("base", "a", no_labels()).unwrap();

    let v = s.view("v", "base", no_labels()).unwrap();
    assert_eq!(v[0].fs_type, "bind");
    assert_eq!(v[0].options, ["ro", "rbind"]);
    assert_eq!(
        v[0].source, m[0].source,
        "a view of one layer binds that layer"
    );
    assert_eq!(s.stat("v").unwrap().kind, Kind::View);
}

#[test]
fn active_on_a_chain_is_an_overlay_with_nearest_lower_first() {
    let (_d, s) = core(Arc::new(NoRemoteLayers));
    let mut lowers = Vec::new();
    let mut parent = String::new();
    for i in 0..3 {
        let m = s.prepare(&format!("k{i}"), &parent, no_labels()).unwrap();
        let upper = m[0]
            .options
            .iter()
            .find_map(|o| o.strip_prefix("upperdir="))
            .map(str::to_owned)
            .unwrap_or_else(|| m[0].source.clone());
        lowers.insert(0, upper);
        s.commit(&format!("l{i}"), &format!("k{i}"), no_labels())
            .unwrap();
        parent = format!("l{i}");
    }
    let m = s.prepare("top", "l2", no_labels()).unwrap();
    assert_eq!(m[0].fs_type, "overlay");
    let lowerdir = m[0]
        .options
        .iter()
        .find_map(|o| o.strip_prefix("lowerdir="))
        .expect("lowerdir option");
    assert_eq!(lowerdir, lowers.join(":"));
    assert!(m[0].options.iter().any(|o| o.starts_with("workdir=")));
    assert_eq!(
        s.mounts("top").unwrap(),
        m,
        "Mounts repeats Prepare's answer"
    );

    let v = s.view("v", "l2", no_labels()).unwrap();
    assert_eq!(v[0].fs_type, "overlay");
    assert!(
        !v[0].options.iter().any(|o| o.starts_with("upperdir=")),
        "{v:?}"
    );
}

#[test]
fn errors_follow_containerd() {
    let (_d, s) = core(Arc::new(NoRemoteLayers));
    s.prepare("a", "", no_labels()).unwrap();
    assert!(matches!(
        s.prepare("a", "", no_labels()),
        Err(Error::AlreadyExists { .. })
    ));
    assert!(matches!(
        s.prepare("b", "nope", no_labels()),
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        s.prepare("b", "a", no_labels()),
        Err(Error::ParentNotCommitted { .. })
    ));
    assert!(matches!(s.stat("nope"), Err(Error::NotFound { .. })));
    assert!(matches!(
        s.commit("x", "nope", no_labels()),
        Err(Error::NotFound { .. })
    ));

    s.commit("base", "a", no_labels()).unwrap();
    assert!(
        matches!(s.stat("a"), Err(Error::NotFound { .. })),
        "commit renames the key"
    );
    assert!(matches!(s.mounts("base"), Err(Error::WrongKind { .. })));
    s.view("v", "base", no_labels()).unwrap();
    assert!(matches!(
        s.commit("x", "v", no_labels()),
        Err(Error::WrongKind { .. })
    ));
    s.prepare("c", "base", no_labels()).unwrap();
    assert!(matches!(
        s.commit("base", "c", no_labels()),
        Err(Error::AlreadyExists { .. })
    ));

    assert!(matches!(s.remove("base"), Err(Error::HasChildren { .. })));
    s.remove("v").unwrap();
    s.remove("c").unwrap();
    s.remove("base").unwrap();
    assert!(s.walk(&[]).unwrap().is_empty());
}

#[test]
fn remove_deletes_the_dir_and_cleanup_removes_orphans() {
    let (_d, s) = core(Arc::new(NoRemoteLayers));
    let m = s.prepare("a", "", no_labels()).unwrap();
    let fs_dir = std::path::PathBuf::from(&m[0].source);
    let snap_dir = fs_dir.parent().unwrap().to_owned();
    assert!(fs_dir.is_dir());
    s.remove("a").unwrap();
    assert!(!snap_dir.exists(), "{} left behind", snap_dir.display());

    let orphan = s.root().join("snapshots/999");
    std::fs::create_dir_all(orphan.join("fs")).unwrap();
    s.prepare("b", "", no_labels()).unwrap();
    assert_eq!(s.cleanup().unwrap(), 1);
    assert!(!orphan.exists());
    assert!(s.mounts("b").is_ok(), "cleanup keeps live snapshots");
}

#[test]
fn update_labels_and_walk_with_label_filters() {
    let (_d, s) = core(Arc::new(NoRemoteLayers));
    s.prepare("a", "", l(&[("team", "x"), ("keep", "1")]))
        .unwrap();
    s.prepare("b", "", l(&[("team", "y")])).unwrap();

    let mut info = s.stat("a").unwrap();
    info.labels = l(&[("team", "z")]);
    let updated = s
        .update(info.clone(), &["labels.team".into(), "labels.keep".into()])
        .unwrap();
    assert_eq!(updated.labels, l(&[("team", "z")]), "set one, deleted one");
    assert!(updated.updated >= updated.created);
    assert!(matches!(
        s.update(info, &["parent".into()]),
        Err(Error::ImmutableField { .. })
    ));

    let names = |f: &[&str]| {
        let f: Vec<String> = f.iter().map(|s| s.to_string()).collect();
        let mut n: Vec<String> = s.walk(&f).unwrap().into_iter().map(|i| i.name).collect();
        n.sort();
        n
    };
    assert_eq!(names(&[]), ["a", "b"]);
    assert_eq!(names(&[r#"labels."team"==z"#]), ["a"]);
    assert_eq!(
        names(&[r#"labels.team==y"#, "name==a"]),
        ["a", "b"],
        "filters are OR-ed"
    );
    assert_eq!(names(&["kind==active,labels.team!=z"]), ["b"]);
    assert!(matches!(
        s.walk(&["labels.team~=z".into()]),
        Err(Error::InvalidFilter { .. })
    ));
}

#[test]
fn usage_counts_the_upper_dir_and_is_frozen_at_commit() {
    let (_d, s) = core(Arc::new(NoRemoteLayers));
    let m = s.prepare("a", "", no_labels()).unwrap();
    let empty = s.usage("a").unwrap();
    std::fs::write(format!("{}/big", m[0].source), vec![7u8; 256 * 1024]).unwrap();
    std::fs::create_dir(format!("{}/d", m[0].source)).unwrap();
    let full = s.usage("a").unwrap();
    assert_eq!(full.inodes, empty.inodes + 2, "{empty:?} -> {full:?}");
    assert!(
        full.size >= empty.size + 256 * 1024,
        "{empty:?} -> {full:?}"
    );
    s.commit("c", "a", no_labels()).unwrap();
    assert_eq!(s.usage("c").unwrap(), full);
}

#[test]
fn metadata_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    {
        let s = hermes_snapshotter::Snapshots::open(&root, Arc::new(NoRemoteLayers)).unwrap();
        s.prepare("a", "", l(&[("x", "1")])).unwrap();
        s.commit("base", "a", no_labels()).unwrap();
        s.prepare("b", "base", no_labels()).unwrap();
    }
    let s = hermes_snapshotter::Snapshots::open(&root, Arc::new(NoRemoteLayers)).unwrap();
    assert_eq!(s.stat("base").unwrap().kind, Kind::Committed);
    assert_eq!(s.stat("b").unwrap().parent.as_deref(), Some("base"));
    let m = s.prepare("c", "base", no_labels()).unwrap();
    let b = s.mounts("b").unwrap();
    assert_ne!(m, b, "ids are not reused after reopen");
}

#[test]
fn remote_prepare_commits_the_target_and_answers_already_exists() {
    let layer = tempfile::tempdir().unwrap();
    let double = Double::new(Answer::Dir(layer.path().to_owned()));
    let (_d, s) = core(double.clone());
    let labels = l(&[
        (labels::SNAPSHOT_REF, "sha256:chain1"),
        (labels::CRI_LAYER_DIGEST, "sha256:l1"),
    ]);
    let err = s.prepare("extract-1", "", labels.clone()).unwrap_err();
    assert!(
        matches!(&err, Error::AlreadyExists { key } if key == "sha256:chain1"),
        "{err:?}"
    );
    let info = s.stat("sha256:chain1").unwrap();
    assert_eq!(info.kind, Kind::Committed);
    assert_eq!(info.labels, labels);
    assert!(matches!(s.stat("extract-1"), Err(Error::NotFound { .. })));
    assert_eq!(double.asked().len(), 1);
    assert_eq!(double.asked()[0].layer_digest, "sha256:l1");

    // A second prepare for the same target is answered without asking again.
    let err = s.prepare("extract-2", "", labels).unwrap_err();
    assert!(matches!(err, Error::AlreadyExists { .. }));
    assert_eq!(double.asked().len(), 1);

    // A child's lowerdir is the remote directory itself.
    let m = s.prepare("rootfs", "sha256:chain1", no_labels()).unwrap();
    assert!(
        m[0].options
            .contains(&format!("lowerdir={}", layer.path().display())),
        "{m:?}"
    );
}

#[test]
fn every_remote_failure_falls_back_to_an_active_snapshot_and_is_counted() {
    let not_a_dir = tempfile::NamedTempFile::new().unwrap();
    let cases = [
        (Answer::Nothing, FallbackReason::NotAvailable),
        (Answer::Fail, FallbackReason::RemoteError),
        (Answer::Panic, FallbackReason::RemotePanic),
        (
            Answer::Dir(not_a_dir.path().to_owned()),
            FallbackReason::InvalidDir,
        ),
    ];
    for (answer, reason) in cases {
        let (_d, s) = core(Double::new(answer.clone()));
        let labels = l(&[
            (labels::SNAPSHOT_REF, "sha256:c"),
            (labels::CRI_LAYER_DIGEST, "sha256:l"),
        ]);
        let m = s
            .prepare("extract", "", labels)
            .unwrap_or_else(|e| panic!("{answer:?}: {e}"));
        assert_eq!(m[0].fs_type, "bind", "{answer:?}");
        assert_eq!(s.stat("extract").unwrap().kind, Kind::Active, "{answer:?}");
        assert!(
            s.stat("sha256:c").is_err(),
            "{answer:?}: no target committed"
        );
        for r in FallbackReason::ALL {
            assert_eq!(
                s.fallback_count(r),
                u64::from(r == reason),
                "{answer:?}: {r}"
            );
        }
    }
}

#[test]
fn target_without_layer_digest_falls_back_without_asking() {
    let double = Double::new(Answer::Fail);
    let (_d, s) = core(double.clone());
    s.prepare("extract", "", l(&[(labels::SNAPSHOT_REF, "sha256:c")]))
        .unwrap();
    assert!(double.asked().is_empty());
    assert_eq!(s.fallback_count(FallbackReason::NoLayerDigest), 1);
}

#[test]
fn concurrent_prepares_of_one_key_create_it_exactly_once() {
    let (_d, s) = core(Arc::new(NoRemoteLayers));
    let results: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|_| scope.spawn(|| s.prepare("same", "", no_labels())))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let exists = results
        .iter()
        .filter(|r| matches!(r, Err(Error::AlreadyExists { .. })))
        .count();
    assert_eq!((ok, exists), (1, 7), "{results:?}");
    let dirs = std::fs::read_dir(s.root().join("snapshots"))
        .unwrap()
        .count();
    assert_eq!(dirs, 1, "losing prepares leave no directories behind");
}

#[test]
fn concurrent_remote_prepares_of_one_layer_all_answer_already_exists() {
    let layer = tempfile::tempdir().unwrap();
    let (_d, s) = core(Double::new(Answer::Dir(layer.path().to_owned())));
    let labels = l(&[
        (labels::SNAPSHOT_REF, "sha256:c"),
        (labels::CRI_LAYER_DIGEST, "sha256:l"),
    ]);
    let results: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let (s, labels) = (&s, labels.clone());
                scope.spawn(move || s.prepare(&format!("extract-{i}"), "", labels))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(
        results
            .iter()
            .all(|r| matches!(r, Err(Error::AlreadyExists { key }) if key == "sha256:c")),
        "{results:?}"
    );
    assert_eq!(
        s.walk(&[]).unwrap().len(),
        1,
        "one committed target, no active leftovers"
    );
    assert!(
        FallbackReason::ALL
            .iter()
            .all(|r| s.fallback_count(*r) == 0)
    );
}
