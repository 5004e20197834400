//! `hermes node --cri-proxy`: the kubelet's image service endpoint in front of containerd 1.6
//! (CRI v1alpha2, as kubelet v1.20 speaks it, and v1). A private image (htpasswd registry)
//! pulled with the pod's credential through the proxy starts lazily on a node that has no
//! credentials of its own; the same kind of image pulled past the proxy falls back to a normal
//! pull and still starts; after the password is rotated, an image pulled with the new one is
//! lazy again; and the password is in no file under the node's root, no log and no metric.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine;
use hermes_containerd::api::runtime::v1 as cri;
use hermes_testkit::{Flavour, PushedImage, Registry, busybox_image};

use crate::cri::Cluster;
use crate::node::{metric, require_root};

const HERMES: &str = env!("CARGO_BIN_EXE_hermes");
pub(crate) const USER: &str = "puller";
// Distinctive, so that finding them anywhere is a leak and nothing else.
pub(crate) const PASSWORD: &str = "pw-before-rotation-5c1e7a";
pub(crate) const ROTATED: &str = "pw-after-rotation-93fd02";

/// busybox and a small layer with `message` plus an 8 MiB one it never reads, pushed with
/// the registry's credential; prints the message.
fn private_image(registry: &Registry, repo: &str, message: &str, password: &str) -> PushedImage {
    busybox_image()
        .expect("busybox image")
        .layer()
        .file("etc/message", format!("{message}\n"))
        .big_layer(8)
        .entrypoint(&["/bin/cat", "/etc/message"])
        .push_with_creds(&registry.host(), repo, USER, password)
        .expect("push")
}

/// A docker config with `password` for the registry, in `dir` (the test's, not the node's).
pub(crate) fn docker_config(dir: &Path, registry: &Registry, password: &str) -> PathBuf {
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{password}"));
    let path = dir.join(format!("config-{password}.json"));
    let json = serde_json::json!({"auths": {registry.host(): {"auth": auth}}});
    std::fs::write(&path, json.to_string()).expect("write docker config");
    path
}

/// `hermes index build` of a private image into the node's local store, with `config`.
pub(crate) fn index_private(image: &str, config: &Path, store: &Path) {
    let out = Command::new(HERMES)
        .args([
            "index",
            "build",
            image,
            "--plain-http",
            "--min-layer-size",
            "0",
        ])
        .args(["--span-size", "256KiB", "--docker-config"])
        .arg(config)
        .arg("--store")
        .arg(store)
        .output()
        .expect("hermes index build");
    assert!(
        out.status.success(),
        "index build: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A kubelet's `PullImage` for pod `pod` with `password`, in CRI `version` (`v1alpha2`, `v1`)
/// on `socket`; returns the image ref the runtime answered.
async fn pull(socket: &Path, version: &str, image: &str, pod: &str, password: &str) -> String {
    try_pull(socket, version, image, pod, password)
        .await
        .unwrap_or_else(|e| panic!("PullImage {image} on {}: {e:?}", socket.display()))
}

/// [`pull`], returning the runtime's error.
async fn try_pull(
    socket: &Path,
    version: &str,
    image: &str,
    pod: &str,
    password: &str,
) -> Result<String, tonic::Status> {
    let channel = hermes_containerd::connect_unix(socket)
        .await
        .expect("connect to the CRI socket");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("CRI socket ready");
    let request = cri::PullImageRequest {
        image: Some(cri::ImageSpec {
            image: image.to_owned(),
            ..Default::default()
        }),
        auth: Some(cri::AuthConfig {
            username: USER.into(),
            password: password.into(),
            ..Default::default()
        }),
        sandbox_config: Some(cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: pod.into(),
                uid: format!("uid-{pod}"),
                namespace: "private".into(),
                attempt: 0,
            }),
            ..Default::default()
        }),
    };
    let path = format!("/runtime.{version}.ImageService/PullImage");
    let answer: tonic::Response<cri::PullImageResponse> = grpc
        .unary(
            tonic::Request::new(request),
            path.parse().expect("method path"),
            tonic_prost::ProstCodec::default(),
        )
        .await?;
    Ok(answer.into_inner().image_ref)
}

/// Files under `dir` (not crossing into other file systems: lazy layers and overlay mounts
/// are served from the registry, not stored) whose bytes contain `needle`.
pub(crate) fn files_containing(dir: &Path, needle: &str) -> Vec<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(dir).expect("stat").dev();
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.dev() != dev {
                continue;
            }
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file()
                && let Ok(bytes) = std::fs::read(&path)
                && bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
            {
                found.push(path);
            }
        }
    }
    found
}

/// The layers of `images` above the stack they share with `unpacked` (an image unpacked
/// normally before: a snapshot is a layer on its parents), by digest (the node serves each
/// layer once, whatever image it came with).
fn lazy_layers(images: &[&PushedImage], unpacked: &PushedImage) -> BTreeSet<String> {
    images
        .iter()
        .flat_map(|image| {
            let shared = image
                .layers
                .iter()
                .zip(&unpacked.layers)
                .take_while(|(l, o)| l.digest == o.digest)
                .count();
            image.layers[shared..].iter().map(|l| l.digest.clone())
        })
        .collect()
}

/// Reads every file of lazy layer `digest`'s mount (bytes not fetched yet come from the
/// registry now, with the layer server's credential).
fn read_lazy_layer(node_root: &Path, digest: &str) -> std::io::Result<u64> {
    let hex = digest.trim_start_matches("sha256:");
    let mut total = 0;
    let mut stack = vec![node_root.join("layers").join(hex).join("mnt")];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.is_file() {
                total += std::fs::read(&path)?.len() as u64;
            }
        }
    }
    Ok(total)
}

fn lazy_mounts(cluster: &Cluster) -> f64 {
    metric(
        &cluster.node.metrics(),
        "hermes_node_lazy_mounts_total",
        &[],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_image_pulled_through_the_cri_proxy_starts_lazily_also_after_a_password_rotation()
{
    require_root();
    let registry = Registry::start_with_htpasswd(USER, PASSWORD).expect("registry");
    let secrets = tempfile::tempdir().expect("secrets dir");
    let config = docker_config(secrets.path(), &registry, PASSWORD);
    let direct = private_image(
        &registry,
        "private/direct:v1",
        "pulled past the proxy",
        PASSWORD,
    );
    let proxied = private_image(&registry, "private/app:v1", "started lazily", PASSWORD);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("node/ztocs");
    index_private(&direct.reference, &config, &store);
    index_private(&proxied.reference, &config, &store);
    // The proxy forwards to this path; it points at containerd once containerd is up.
    let containerd_link = dir.path().join("containerd.sock");
    let proxy_socket = dir.path().join("cri-proxy.sock");
    let proxy_arg = proxy_socket.to_str().expect("utf-8 path").to_owned();
    let containerd_arg = containerd_link.to_str().expect("utf-8 path").to_owned();
    // The sandbox (pause) image comes from a public registry, as it would on a real node.
    let public = Registry::start().expect("registry");
    let mut cluster = Cluster::start(
        Flavour::V1_6,
        dir.path(),
        &public,
        &[&registry.host()],
        &[
            "--plain-http",
            "--no-background-fetch",
            "--cri-proxy",
            &proxy_arg,
            "--containerd",
            &containerd_arg,
        ],
    );
    std::os::unix::fs::symlink(cluster.containerd.address(), &containerd_link).expect("symlink");
    assert_eq!(lazy_mounts(&cluster), 0.0);

    // Past the proxy (a kubelet pointed at containerd): the node has no credential, so the
    // layers fall back to a normal pull, and the container still starts.
    pull(
        cluster.containerd.address(),
        "v1alpha2",
        &direct.reference,
        "direct",
        PASSWORD,
    )
    .await;
    assert_eq!(
        cluster.run_pulled(&direct.reference, "direct", "").await,
        vec!["pulled past the proxy"]
    );
    assert_eq!(lazy_mounts(&cluster), 0.0, "{}", cluster.diagnostics());

    // Through the proxy, in the kubelet's v1alpha2: the pod's credential reaches the lazy layers.
    let image_ref = pull(
        &proxy_socket,
        "v1alpha2",
        &proxied.reference,
        "app",
        PASSWORD,
    )
    .await;
    assert!(image_ref.starts_with("sha256:"), "{image_ref}");
    assert_eq!(
        cluster.run_pulled(&proxied.reference, "app", "").await,
        vec!["started lazily"]
    );
    // busybox's layers were unpacked by the first pull; the new ones are lazy.
    let proxied_layers = lazy_layers(&[&proxied], &direct);
    assert!(!proxied_layers.is_empty());
    assert_eq!(
        lazy_mounts(&cluster),
        proxied_layers.len() as f64,
        "{}",
        cluster.diagnostics()
    );
    let node_log = cluster.node.logs();
    assert!(
        node_log.contains("CRI pull") && node_log.contains(r#"pod="private/app""#),
        "the proxy logs each pull with its pod:\n{node_log}"
    );

    // The password changes in the registry and in the pod's secret.
    let htpasswd = Command::new("htpasswd")
        .args(["-Bbn", USER, ROTATED])
        .output()
        .expect("htpasswd");
    assert!(htpasswd.status.success());
    std::fs::write(registry.root().join("htpasswd"), &htpasswd.stdout).expect("rotate");
    let old = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-u"])
        .arg(format!("{USER}:{PASSWORD}"))
        .arg(format!("{}/v2/", registry.url()))
        .output()
        .expect("curl");
    assert_eq!(
        String::from_utf8_lossy(&old.stdout),
        "401",
        "the registry still takes the old password"
    );
    let rotated = private_image(&registry, "private/app:v2", "started lazily again", ROTATED);
    let config = docker_config(secrets.path(), &registry, ROTATED);
    index_private(&rotated.reference, &config, &store);
    pull(&proxy_socket, "v1", &rotated.reference, "app-2", ROTATED).await;
    assert_eq!(
        cluster.run_pulled(&rotated.reference, "app-2", "").await,
        vec!["started lazily again"]
    );
    let all_layers = lazy_layers(&[&proxied, &rotated], &direct);
    assert!(all_layers.len() > proxied_layers.len());
    assert_eq!(
        lazy_mounts(&cluster),
        all_layers.len() as f64,
        "{}",
        cluster.diagnostics()
    );
    // The 8 MiB layer both tags share was mounted for v1, before the rotation, and never read:
    // its server reads it now with the rotated password, which v2's pull handed it.
    let big = proxied.layers.last().expect("layers");
    let read = read_lazy_layer(&dir.path().join("node"), &big.digest).unwrap_or_else(|e| {
        panic!(
            "read the lazy layer after the rotation: {e}\n{}",
            cluster.diagnostics()
        )
    });
    assert!(read >= 8 << 20, "read {read} bytes");

    // Neither password anywhere the node writes: its root, its logs (node.log and the layer
    // servers' logs under the root), its metrics.
    let metrics = cluster.node.metrics();
    for password in [PASSWORD, ROTATED] {
        assert_eq!(
            files_containing(dir.path(), password),
            Vec::<PathBuf>::new(),
            "files holding a password"
        );
        assert!(!metrics.contains(password));
        assert!(!cluster.node.logs().contains(password));
    }

    // The daemon down: the kubelet's image endpoint refuses connections (its pulls fail and
    // are retried with back-off); back up, the same pull goes through once containerd, which
    // backs off too, reaches its snapshotter again (a kubelet retries meanwhile).
    cluster.node.kill9();
    assert!(
        hermes_containerd::connect_unix(&proxy_socket)
            .await
            .is_err(),
        "the proxy socket answers with the daemon down"
    );
    cluster.node.spawn();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while hermes_containerd::connect_unix(&proxy_socket)
        .await
        .is_err()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the proxy never came back"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    while let Err(e) = try_pull(
        &proxy_socket,
        "v1alpha2",
        &rotated.reference,
        "app-3",
        ROTATED,
    )
    .await
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no pull after the restart: {e:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}
