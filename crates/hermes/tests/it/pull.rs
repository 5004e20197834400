//! `hermes pull` into a real containerd (1.6 and 2.x) whose `hermes` proxy snapshotter is a real
//! `hermes node`, then `ctr run --snapshotter hermes`: indexed layers are mounted lazily, the
//! others unpacked by containerd, and the container runs either way.

use std::path::Path;
use std::process::Command;

use hermes_testkit::{Containerd, Flavour, PushedImage, Registry, busybox_image};

use crate::node::{Node, index, require_root};

const HERMES: &str = env!("CARGO_BIN_EXE_hermes");

/// A small runnable image: busybox, a layer with the message, a few MiB of data it never reads;
/// it prints the message.
pub(crate) fn message_image(registry: &Registry, repo: &str, message: &str) -> PushedImage {
    message_image_running(registry, repo, message, &["/bin/cat", "/etc/message"])
}

/// [`message_image`] with another entrypoint.
pub(crate) fn message_image_running(
    registry: &Registry,
    repo: &str,
    message: &str,
    entrypoint: &[&str],
) -> PushedImage {
    busybox_image()
        .expect("busybox image")
        .layer()
        .file("etc/message", format!("{message}\n"))
        .big_layer(6)
        .big_layer(6)
        .entrypoint(entrypoint)
        .push(&registry.host(), repo)
        .expect("push")
}

/// `hermes pull` as a user runs it; returns stdout.
pub(crate) fn hermes_pull(containerd: &Containerd, image: &str) -> String {
    let out = Command::new(HERMES)
        .arg("pull")
        .arg("--address")
        .arg(containerd.address())
        .args(["--plain-http", image])
        .output()
        .expect("run hermes pull");
    assert!(
        out.status.success(),
        "hermes pull failed: {}\ncontainerd log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        containerd.log()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn start(flavour: Flavour, dir: &Path, registry: &Registry) -> (Node, Containerd) {
    let node = Node::start(dir, &["--plain-http"]);
    let containerd = Containerd::builder()
        .flavour(flavour)
        .proxy_snapshotter(&node.socket)
        .registry_host(&registry.host())
        .start()
        .expect("containerd");
    (node, containerd)
}

/// `ctr run --rm` of `image` as container `id` (runc keeps its state per namespace, not per
/// containerd: tests running at the same time need distinct IDs).
fn ctr_run(containerd: &Containerd, node: &Node, image: &str, id: &str) -> String {
    containerd
        .ctr(&["run", "--rm", "--snapshotter", "hermes", image, id])
        .unwrap_or_else(|e| {
            panic!(
                "ctr run: {e:?}\ncontainerd log:\n{}\nnode logs:\n{}",
                containerd.log(),
                node.logs()
            )
        })
}

on_each_containerd! {
fn hermes_pull_then_ctr_run_starts_an_indexed_image_from_lazy_layers(flavour) {
    require_root();
    let registry = Registry::start().expect("registry");
    let image = message_image(&registry, "pull/lazy:v1", "hello from lazy layers");
    let dir = tempfile::tempdir().expect("tempdir");
    index(&image.reference, &dir.path().join("node/ztocs"));
    let (node, containerd) = start(flavour, dir.path(), &registry);

    let out = hermes_pull(&containerd, &image.reference);
    assert!(
        out.contains("4 layers: 4 lazy, 0 unpacked"),
        "hermes pull said:\n{out}\nnode logs:\n{}",
        node.logs()
    );
    assert_eq!(out.matches(" lazy\n").count(), 4, "{out}");
    assert_eq!(
        ctr_run(&containerd, &node, &image.reference, &format!("lazy-{}", flavour.name())),
        "hello from lazy layers\n"
    );
    // Nothing was downloaded into containerd: the layer blobs are not in its content store.
    let content = containerd
        .ctr(&["content", "ls", "-q"])
        .expect("content ls");
    let stored: Vec<&str> = content.lines().map(str::trim).collect();
    for layer in &image.layers {
        assert!(!stored.contains(&layer.digest.as_str()), "{content}");
    }
    assert!(
        stored.contains(&image.manifest_digest.as_str()),
        "{content}"
    );
}
}

on_each_containerd! {
fn an_image_without_a_ztoc_is_unpacked_by_containerd_and_runs(flavour) {
    require_root();
    let registry = Registry::start().expect("registry");
    let image = message_image(&registry, "pull/plain:v1", "hello from the normal path");
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, containerd) = start(flavour, dir.path(), &registry);

    let out = hermes_pull(&containerd, &image.reference);
    assert!(out.contains("4 layers: 0 lazy, 4 unpacked"), "{out}");
    assert_eq!(
        ctr_run(&containerd, &node, &image.reference, &format!("plain-{}", flavour.name())),
        "hello from the normal path\n"
    );
    // A second pull finds everything in place.
    let again = hermes_pull(&containerd, &image.reference);
    assert!(again.contains("4 already present"), "{again}");
}
}
