//! The typed queries against a real containerd driven by `ctr`.

use hermes_containerd::{Containerd, Error};
use hermes_testkit::{Registry, busybox_image};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_containers_are_listed_with_their_manifest_digest() {
    let registry = Registry::start().unwrap();
    let image = busybox_image()
        .unwrap()
        .entrypoint(&["/bin/sleep", "600"])
        .push(&registry.host(), "sleeper:v1")
        .unwrap();
    let containerd = hermes_testkit::Containerd::builder()
        .registry_host(&registry.host())
        .start()
        .unwrap();
    let hosts = containerd.hosts_dir().display().to_string();
    let ctr = |args: &[&str]| {
        containerd
            .ctr(args)
            .unwrap_or_else(|e| panic!("{e:?}\ncontainerd log:\n{}", containerd.log()))
    };
    ctr(&["images", "pull", "--hosts-dir", &hosts, &image.reference]);
    ctr(&[
        "run",
        "-d",
        "--label",
        "app=sleepy",
        &image.reference,
        "running-1",
    ]);
    // Created but never started: no task, not running.
    ctr(&["containers", "create", &image.reference, "created-only"]);

    let client = Containerd::connect(containerd.address(), "default")
        .await
        .unwrap();
    let version = client.version().await.unwrap();
    assert!(version.version.starts_with("1.6"), "{version:?}");
    let running = client.list_running_containers().await.unwrap();
    assert_eq!(running.len(), 1, "{running:?}");
    let c = &running[0];
    assert_eq!(c.id, "running-1");
    assert_eq!(c.image_name, image.reference);
    assert_eq!(
        c.manifest_digest.as_deref(),
        Some(image.manifest_digest.as_str())
    );
    assert_eq!(c.target_digest, c.manifest_digest);
    assert_eq!(c.snapshotter, "overlayfs");
    assert!(c.pid > 0);
    assert_eq!(c.labels.get("app").map(String::as_str), Some("sleepy"));
    assert!(
        client
            .list_namespaces()
            .await
            .unwrap()
            .contains(&"default".to_owned())
    );

    // Other namespaces see nothing.
    let other = client.in_namespace("elsewhere").unwrap();
    assert!(other.list_running_containers().await.unwrap().is_empty());
}

#[tokio::test]
async fn connecting_to_a_missing_socket_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nothing.sock");
    let err = Containerd::connect(&socket, "default").await.unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&socket.display().to_string()),
        "{err}"
    );
}
