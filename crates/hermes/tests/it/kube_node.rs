//! Hermes in a real single-node Kubernetes cluster (`scripts/kube.sh`: etcd, API server,
//! controller-manager, scheduler, a kubelet on containerd 1.6, a bridge pod network), installed
//! from `deploy/` the way a user would, and driven with kubectl only: the controller sees pods
//! through the real pod watch, the kubelet's second start of an indexed image is lazy, each start
//! shows on its pod (`HermesFallback` with the reason, `HermesLazyStart` with the bytes fetched,
//! in `kubectl describe pod`) and in the image's counters, the node service restarts and
//! upgrades under a running lazy pod, and `mode: "Off"` turns it all off.
//! The memory-module webhook, installed from `deploy/modules/`, injects the installer into a
//! selected pod; its modules load once, also when the kubelet re-runs the pod's init. Through
//! the node's CRI image-service proxy, a pod whose image needs its `imagePullSecrets` starts
//! lazily, also after the password is rotated, and the password stays off the node.
//!
//! One cluster per scenario (starting one takes most of a minute; one at a time per machine, so
//! the tests take turns); `kube.sh down` runs on every exit, failures included. A missing part
//! fails the test with what to install.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hermes_testkit::{PushedImage, Registry, busybox_image};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::cri_proxy;
use crate::node::{metric, require_root};

/// Files of the data layer the lazy pod reads one by one (across node restarts).
const DATA_FILES: usize = 6;
/// Size of each data file: one default span, so each read fetches new bytes.
const DATA_FILE_BYTES: usize = 4 << 20;
/// What the pods of the test image print first.
const MESSAGE: &str = "hello from a kubelet";

/// `kube.sh` runs one cluster per machine: the tests here take turns.
fn one_cluster_at_a_time() -> MutexGuard<'static, ()> {
    static CLUSTER: Mutex<()> = Mutex::new(());
    CLUSTER.lock().unwrap_or_else(|e| e.into_inner())
}

/// A cluster of its own for one test, started once no other test here runs one. The turn is
/// held until the cluster is down: bind both (`let (_turn, kube) = …`), which drops `kube` first.
fn new_cluster() -> (MutexGuard<'static, ()>, Kube) {
    new_cluster_with(&[], &[])
}

/// [`new_cluster`] with more `kube.sh up` options (`--cri-proxy`) and environment (which the
/// node daemon inherits: `RUST_LOG`).
fn new_cluster_with(options: &[&str], env: &[(&str, &str)]) -> (MutexGuard<'static, ()>, Kube) {
    require_root();
    let turn = one_cluster_at_a_time();
    let dir = tempfile::Builder::new()
        .prefix("hermes-kube-")
        .tempdir()
        .expect("temp dir");
    let kube = Kube::up(dir.path(), options, env);
    // `kube.sh down` removes the dir (or HERMES_KUBE_KEEP keeps it).
    let _ = dir.keep();
    (turn, kube)
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A cluster started by `kube.sh up`, brought down by `kube.sh down` on drop.
struct Kube {
    dir: PathBuf,
    kubectl: PathBuf,
    kubeconfig: PathBuf,
    registry: String,
    metrics: String,
    containerd: PathBuf,
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

impl Kube {
    fn up(dir: &Path, options: &[&str], env: &[(&str, &str)]) -> Kube {
        let script = repo_root().join("scripts/kube.sh");
        let out = run(Command::new("bash")
            .arg(&script)
            .arg("up")
            .arg(dir)
            .arg("--hermes")
            .arg(env!("CARGO_BIN_EXE_hermes"))
            .arg("--no-background-fetch")
            .args(options)
            .envs(env.iter().copied()));
        if !out.status.success() {
            let logs = tail_logs(dir);
            let _ = run(Command::new("bash").arg(&script).arg("down").arg(dir));
            panic!(
                "scripts/kube.sh up failed ({}):\n{}\n{}\n{logs}",
                out.status,
                text(&out.stdout),
                text(&out.stderr)
            );
        }
        let env = std::fs::read_to_string(dir.join("env")).expect("kube.sh writes DIR/env");
        let var = |name: &str| -> String {
            env.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}=")))
                .unwrap_or_else(|| panic!("{name} missing from DIR/env:\n{env}"))
                .to_owned()
        };
        Kube {
            dir: dir.to_owned(),
            kubectl: var("KUBECTL").into(),
            kubeconfig: var("KUBECONFIG").into(),
            registry: var("REGISTRY"),
            metrics: var("NODE_METRICS"),
            containerd: var("CONTAINERD_ADDRESS").into(),
        }
    }

    fn kubectl_output(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = Command::new(&self.kubectl);
        cmd.arg("--kubeconfig").arg(&self.kubeconfig).args(args);
        match stdin {
            None => run(&mut cmd),
            Some(input) => {
                use std::io::Write;
                let mut child = cmd
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("start kubectl");
                child
                    .stdin
                    .take()
                    .expect("stdin")
                    .write_all(input.as_bytes())
                    .expect("write to kubectl");
                child.wait_with_output().expect("kubectl")
            }
        }
    }

    /// `kubectl ARGS`; a failure fails the test with kubectl's output and the cluster's logs.
    fn kubectl(&self, args: &[&str]) -> String {
        let out = self.kubectl_output(args, None);
        if !out.status.success() {
            panic!(
                "kubectl {} failed: {}\n{}",
                args.join(" "),
                text(&out.stderr),
                self.diagnostics()
            );
        }
        text(&out.stdout)
    }

    fn apply(&self, yaml: &str) {
        let out = self.kubectl_output(&["apply", "-f", "-"], Some(yaml));
        assert!(
            out.status.success(),
            "kubectl apply failed: {}\n{yaml}",
            text(&out.stderr)
        );
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        serde_json::from_str(&self.kubectl(&all)).expect("kubectl -o json")
    }

    /// Polls `check` until it returns a value; fails with `what` and the logs after `secs`.
    fn wait<T>(&self, what: &str, secs: u64, mut check: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(v) = check() {
                return v;
            }
            if Instant::now() > deadline {
                panic!("{what}: not within {secs} s\n{}", self.diagnostics());
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn ctr(&self, args: &[&str]) -> String {
        let out = run(Command::new("ctr")
            .arg("--address")
            .arg(&self.containerd)
            .args(["-n", "k8s.io"])
            .args(args));
        assert!(
            out.status.success(),
            "ctr {} failed: {}",
            args.join(" "),
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    fn node_metrics(&self) -> String {
        let out = run(Command::new("curl").args(["-fsS", &self.metrics]));
        assert!(
            out.status.success(),
            "node metrics at {}: {}",
            self.metrics,
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// The registry's log so far (one line per request, with the bytes it wrote).
    fn registry_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("logs/registry.log")).unwrap_or_default()
    }

    fn diagnostics(&self) -> String {
        let pods = self.kubectl_output(&["get", "pods", "-A", "-o", "wide"], None);
        let events = self.kubectl_output(&["get", "events", "-A"], None);
        format!(
            "pods:\n{}\nevents:\n{}\n{}",
            text(&pods.stdout),
            text(&events.stdout),
            tail_logs(&self.dir)
        )
    }

    /// Creates a pod of `image` in `default` and waits until it runs and has printed its first
    /// line; returns that line.
    fn start_pod(&self, name: &str, image: &str) -> String {
        self.start_pod_with_secret(name, image, None)
    }

    /// [`Kube::start_pod`], with the Secret `pull_secret` as the pod's `imagePullSecrets`.
    fn start_pod_with_secret(&self, name: &str, image: &str, pull_secret: Option<&str>) -> String {
        self.start_pod_full("default", name, image, pull_secret)
    }

    /// [`Kube::start_pod`] in `namespace`.
    fn start_pod_in(&self, namespace: &str, name: &str, image: &str) -> String {
        self.start_pod_full(namespace, name, image, None)
    }

    fn start_pod_full(
        &self,
        namespace: &str,
        name: &str,
        image: &str,
        pull_secret: Option<&str>,
    ) -> String {
        let secrets = pull_secret.map_or(String::new(), |s| {
            format!("  imagePullSecrets: [{{name: {s}}}]\n")
        });
        self.apply(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {namespace}}}\n\
             spec:\n  restartPolicy: Never\n  terminationGracePeriodSeconds: 0\n{secrets}  \
             containers:\n    - {{name: app, image: \"{image}\", imagePullPolicy: IfNotPresent}}\n"
        ));
        self.wait(
            &format!("pod {namespace}/{name} prints its first line"),
            120,
            || {
                let pod = self.json(&["-n", namespace, "get", "pod", name]);
                let phase = pod["status"]["phase"].as_str().unwrap_or("");
                assert!(
                    phase != "Failed" && phase != "Succeeded",
                    "pod {name} ended: {pod:#}"
                );
                if phase != "Running" {
                    return None;
                }
                let out = self.kubectl_output(&["-n", namespace, "logs", name], None);
                let log = text(&out.stdout);
                log.lines().next().map(str::to_owned)
            },
        )
    }

    fn delete_pod(&self, name: &str) {
        self.delete_pod_in("default", name);
    }

    fn delete_pod_in(&self, namespace: &str, name: &str) {
        self.kubectl(&[
            "-n",
            namespace,
            "delete",
            "pod",
            name,
            "--grace-period=0",
            "--force",
            "--wait=true",
        ]);
    }

    /// `sha256sum PATH` inside the pod's container.
    fn sha256_in_pod(&self, pod: &str, path: &str) -> String {
        let out = self.kubectl(&["-n", "default", "exec", pod, "--", "sha256sum", path]);
        out.split_whitespace().next().unwrap_or_default().to_owned()
    }

    /// Committed snapshots in Hermes (what an image's layers leave on the node).
    fn committed_snapshots(&self) -> BTreeSet<String> {
        self.ctr(&["snapshots", "--snapshotter", "hermes", "ls"])
            .lines()
            .skip(1)
            .filter(|l| l.split_whitespace().nth(2) == Some("Committed"))
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect()
    }

    /// Removes every reference to the image from containerd (what `crictl rmi` does) and waits
    /// until its layer snapshots are gone, so the next pod pulls it again.
    fn remove_image(&self, image: &PushedImage, layer_snapshots: &BTreeSet<String>) {
        let refs = self.ctr(&["images", "ls", "-q"]);
        let repo = image
            .reference
            .rsplit_once(':')
            .map_or(image.reference.as_str(), |(repo, _)| repo);
        let mine: Vec<&str> = refs
            .lines()
            .filter(|r| r.starts_with(repo) || *r == image.config_digest)
            .collect();
        assert!(
            !mine.is_empty(),
            "the node has no reference to {repo}: {refs}"
        );
        let mut args = vec!["images", "rm", "--sync"];
        args.extend(mine.iter().copied());
        self.ctr(&args);
        self.wait("the image's layer snapshots removed", 90, || {
            let now = self.committed_snapshots();
            layer_snapshots.is_disjoint(&now).then_some(())
        });
    }
}

impl Kube {
    fn down(&self) -> Output {
        run(Command::new("bash")
            .arg(repo_root().join("scripts/kube.sh"))
            .arg("down")
            .arg(&self.dir))
    }

    /// `kube.sh down`, then what it must leave: no process and no mount of the cluster, no log
    /// of its pods under /var/log/pods, no state dir.
    fn down_and_check(self, pod_uids: &[String]) {
        let dir = self.dir.clone();
        let out = self.down();
        // Down already: no second `down` from Drop.
        std::mem::forget(self);
        assert!(out.status.success(), "kube.sh down: {}", text(&out.stderr));
        let needle = dir.to_string_lossy().into_owned();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let left: Vec<&str> = mounts.lines().filter(|l| l.contains(&needle)).collect();
        assert!(left.is_empty(), "mounts left by kube.sh down: {left:#?}");
        let mut procs = Vec::new();
        for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(&needle) {
                procs.push(cmdline);
            }
        }
        assert!(
            procs.is_empty(),
            "processes left by kube.sh down: {procs:#?}"
        );
        let logs: Vec<String> = std::fs::read_dir("/var/log/pods")
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|name| pod_uids.iter().any(|uid| name.ends_with(uid.as_str())))
                    .collect()
            })
            .unwrap_or_default();
        assert!(logs.is_empty(), "pod logs left by kube.sh down: {logs:?}");
        assert!(!dir.exists(), "{} left by kube.sh down", dir.display());
    }

    fn pod_uid(&self, name: &str) -> String {
        self.pod_uid_in("default", name)
    }

    fn pod_uid_in(&self, namespace: &str, name: &str) -> String {
        let pod = self.json(&["-n", namespace, "get", "pod", name]);
        pod["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

impl Drop for Kube {
    fn drop(&mut self) {
        // For a person debugging a failure: keep the cluster (`scripts/kube.sh down DIR` later).
        if std::env::var_os("HERMES_KUBE_KEEP").is_some() {
            eprintln!(
                "HERMES_KUBE_KEEP: cluster left running in {}",
                self.dir.display()
            );
            return;
        }
        let out = self.down();
        if !out.status.success() {
            eprintln!("kube.sh down failed: {}", text(&out.stderr));
        }
    }
}

fn tail_logs(dir: &Path) -> String {
    let mut out = String::new();
    for name in ["hermes-node", "containerd", "kubelet"] {
        let log = std::fs::read_to_string(dir.join("logs").join(format!("{name}.log")))
            .unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(30)..].join("\n");
        out.push_str(&format!("--- {name} log (tail):\n{tail}\n"));
    }
    out
}

/// Deterministic, incompressible content for data file `i`.
fn data_file(i: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ (i as u64 + 1);
    let mut out = Vec::with_capacity(DATA_FILE_BYTES);
    while out.len() < DATA_FILE_BYTES {
        // xorshift64*
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(DATA_FILE_BYTES);
    out
}

fn hex_sha256(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The test image: busybox, a message, three big layers and a layer of data files.
fn push_test_image(registry: &str) -> PushedImage {
    let mut image = busybox_image()
        .expect("busybox image")
        .symlink("bin/sha256sum", "busybox")
        .layer()
        .file("etc/message", format!("{MESSAGE}\n"))
        .big_layer(8)
        .big_layer(8)
        .big_layer(8)
        .layer();
    for i in 0..DATA_FILES {
        image = image.file(&format!("data/f{i}"), data_file(i));
    }
    image
        .entrypoint(&["/bin/sh", "-c", "cat /etc/message; exec sleep 1000000"])
        .push(registry, "kube/lazy:v1")
        .expect("push the test image")
}

/// Compressed bytes of `image`'s layers the registry sent, in log lines after `from`.
fn registry_layer_bytes(log: &str, from: usize, image: &PushedImage) -> u64 {
    log[from.min(log.len())..]
        .lines()
        .filter(|l| l.contains("response completed") && l.contains("http.request.method=GET"))
        .filter(|l| image.layers.iter().any(|layer| l.contains(&layer.digest)))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|f| f.strip_prefix("http.response.written="))
                .and_then(|n| n.trim_matches('"').parse::<u64>().ok())
        })
        .sum()
}

fn hermes_image<'a>(list: &'a Value, repo: &str) -> Option<&'a Value> {
    list["items"].as_array()?.iter().find(|i| {
        i["spec"]["image"]
            .as_str()
            .is_some_and(|s| s.starts_with(repo))
    })
}

#[test]
fn deploy_on_a_real_kubelet_indexes_a_running_image_and_starts_the_next_pod_lazily() {
    let (_turn, kube) = new_cluster();

    // Installed from deploy/: both controller replicas ready, one of them leading.
    kube.wait("both controller replicas ready", 120, || {
        let d = kube.json(&[
            "-n",
            "hermes-system",
            "get",
            "deployment",
            "hermes-controller",
        ]);
        (d["status"]["readyReplicas"] == 2).then_some(())
    });
    let holder = kube.wait("a controller replica holds the Lease", 60, || {
        let lease = kube.json(&["-n", "hermes-system", "get", "lease", "hermes-controller"]);
        lease["spec"]["holderIdentity"].as_str().map(str::to_owned)
    });
    assert!(holder.starts_with("hermes-controller-"), "{holder}");

    let image = push_test_image(&kube.registry);
    let repo = format!("{}/kube/lazy", kube.registry);
    let total: u64 = image.layers.iter().map(|l| l.size).sum();
    // Every layer indexed (minLayerSize 0): containerd 1.6's unpacker, on the first layer a
    // snapshotter does not mount remotely, fetches that layer and every later one in full, lazy
    // or not, so one small unindexed layer (here the 107-byte /etc/message) before the big ones
    // would make the start fetch the whole image.
    let policy = |mode: &str| {
        format!(
            "apiVersion: hermes.dev/v1alpha1\nkind: HermesPolicy\nmetadata: {{name: kube-lazy}}\n\
             spec:\n  images: [\"{repo}:*\"]\n  mode: \"{mode}\"\n  index: {{minLayerSize: \"0\"}}\n"
        )
    };
    kube.apply(&policy("Lazy"));

    // A first pod runs through the normal path; the controller sees it through the pod watch.
    let before = kube.committed_snapshots();
    assert_eq!(kube.start_pod("first", &image.reference), MESSAGE);
    let mut pod_uids = vec![kube.pod_uid("first")];
    let layer_snapshots: BTreeSet<String> = kube
        .committed_snapshots()
        .difference(&before)
        .cloned()
        .collect();
    assert_eq!(
        kube.node_metrics()
            .lines()
            .filter(|l| l.starts_with("hermes_node_lazy_mounts_total"))
            .map(|l| l
                .rsplit(' ')
                .next()
                .unwrap_or("")
                .parse::<f64>()
                .unwrap_or(0.0))
            .sum::<f64>(),
        0.0,
        "nothing is indexed yet: the first pod starts the normal way"
    );
    let indexed = kube.wait("the HermesImage goes Ready", 180, || {
        let list = kube.json(&["get", "hermesimages"]);
        let img = hermes_image(&list, &repo)?;
        (img["status"]["phase"] == "Ready").then(|| img.clone())
    });
    assert_eq!(indexed["spec"]["digest"], image.manifest_digest.as_str());
    let indexed_layers = indexed["status"]["indexedLayers"].as_u64().unwrap_or(0);
    assert!(indexed_layers >= 4, "{indexed:#}");
    kube.wait("the pod's HermesIndexReady event", 60, || {
        let events = kube.json(&[
            "-n",
            "default",
            "get",
            "events",
            "--field-selector",
            "involvedObject.name=first",
        ]);
        events["items"]
            .as_array()?
            .iter()
            .any(|e| e["reason"] == "HermesIndexReady")
            .then_some(())
    });

    // Nothing was indexed when the first pod started: the node's pull report becomes the pod's
    // HermesFallback, with the reason, and a fallback in the image's counters.
    let describe_first = kube.wait("the first pod's HermesFallback event", 90, || {
        let out = kube.kubectl(&["-n", "default", "describe", "pod", "first"]);
        out.contains("HermesFallback").then_some(out)
    });
    assert!(
        describe_first.contains("no zTOC for the layer"),
        "the fallback's reason in kubectl describe pod:\n{describe_first}"
    );
    assert!(
        !describe_first.contains("HermesLazyStart"),
        "{describe_first}"
    );

    // The image leaves the node; a second pod starts lazily.
    kube.delete_pod("first");
    kube.remove_image(&image, &layer_snapshots);
    let lazy_before = metric(&kube.node_metrics(), "hermes_node_lazy_mounts_total", &[]);
    let log_from = kube.registry_log().len();
    let started = Instant::now();
    assert_eq!(kube.start_pod("second", &image.reference), MESSAGE);
    pod_uids.push(kube.pod_uid("second"));
    let start_secs = started.elapsed().as_secs_f64();
    let fetched = registry_layer_bytes(&kube.registry_log(), log_from, &image);
    let m = kube.node_metrics();
    let lazy = metric(&m, "hermes_node_lazy_mounts_total", &[]) - lazy_before;
    eprintln!(
        "lazy start through the kubelet: {lazy} lazy mounts, {fetched} of {total} compressed bytes \
         from the registry ({:.1}%), first line after {start_secs:.1} s",
        100.0 * fetched as f64 / total as f64
    );
    assert_eq!(
        lazy, indexed_layers as f64,
        "every indexed layer mounted lazily:\n{m}"
    );
    assert!(
        fetched * 10 < total,
        "fetched {fetched} of {total} compressed bytes"
    );
    // Once the start's reads are done (the node's 10 s trace window), the pod gets its
    // HermesLazyStart with the bytes fetched, and the image counts one lazy start, one fallback.
    let describe_second = kube.wait("the second pod's HermesLazyStart event", 90, || {
        let out = kube.kubectl(&["-n", "default", "describe", "pod", "second"]);
        out.contains("HermesLazyStart").then_some(out)
    });
    let reported: u64 = describe_second
        .split_once(" bytes fetched on demand")
        .and_then(|(before, _)| before.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no bytes in the event:\n{describe_second}"));
    eprintln!("HermesLazyStart reports {reported} bytes fetched on demand");
    assert!(
        reported > 0 && reported * 10 < total,
        "{reported} of {total} bytes:\n{describe_second}"
    );
    assert!(
        !describe_second.contains("HermesFallback"),
        "{describe_second}"
    );
    let starts = kube.wait("the HermesImage counts both starts", 60, || {
        let list = kube.json(&["get", "hermesimages"]);
        let starts = hermes_image(&list, &repo)?["status"]["starts"].clone();
        (starts["lazyStarts"] == 1 && starts["fallbacks"] == 1).then_some(starts)
    });
    let last: Vec<(&str, &str)> = starts["lastPods"]
        .as_array()
        .expect("lastPods")
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or(""),
                p["mode"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        last,
        [("second", "Lazy"), ("first", "Fallback")],
        "{starts:#}"
    );
    assert_eq!(starts["lastPods"][0]["node"], "hermes-kube", "{starts:#}");
    assert_eq!(
        starts["lastPods"][0]["bytesFetched"], reported,
        "{starts:#}"
    );

    // The node service restarts, then upgrades, under the lazy pod: files it never read before
    // still read right.
    let mut next = 0;
    let mut read_next = |kube: &Kube, count: usize| {
        for _ in 0..count {
            let path = format!("/data/f{next}");
            assert_eq!(
                kube.sha256_in_pod("second", &path),
                hex_sha256(&data_file(next)),
                "{path} in the lazily started pod"
            );
            next += 1;
        }
    };
    read_next(&kube, 1);
    let restart = run(Command::new("bash")
        .arg(repo_root().join("scripts/kube.sh"))
        .arg("node-restart")
        .arg(&kube.dir));
    assert!(
        restart.status.success(),
        "node-restart: {}",
        text(&restart.stderr)
    );
    read_next(&kube, 2);
    // A new build: a different file (the test has one build; any change of bytes makes it new).
    let upgrade_dir = tempfile::tempdir().expect("temp dir");
    let new_build = upgrade_dir.path().join("hermes");
    std::fs::copy(env!("CARGO_BIN_EXE_hermes"), &new_build).expect("copy hermes");
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&new_build)
            .expect("open the copy");
        f.write_all(b"hermes-upgrade-marker").expect("append");
    }
    let upgrade = run(Command::new("bash")
        .arg(repo_root().join("scripts/kube.sh"))
        .arg("node-upgrade")
        .arg(&kube.dir)
        .arg(&new_build));
    assert!(
        upgrade.status.success(),
        "node-upgrade: {}",
        text(&upgrade.stderr)
    );
    let installed = std::fs::read(kube.dir.join("node/bin/hermes")).expect("installed binary");
    assert!(
        installed.ends_with(b"hermes-upgrade-marker"),
        "the new build is installed"
    );
    read_next(&kube, DATA_FILES - 3);
    let pod = kube.json(&["-n", "default", "get", "pod", "second"]);
    assert_eq!(pod["status"]["phase"], "Running", "{pod:#}");
    assert_eq!(
        pod["status"]["containerStatuses"][0]["restartCount"], 0,
        "{pod:#}"
    );
    // Both new daemons found the lazy layers' servers alive (the supervisor signalled only the
    // daemon, as KillMode=process does) and adopted them instead of mounting them again.
    let node_log =
        std::fs::read_to_string(kube.dir.join("logs/hermes-node.log")).unwrap_or_default();
    let adopted = format!("lazy layers adopted {indexed_layers}, re-mounted 0, failed 0");
    assert_eq!(
        node_log.matches(&adopted).count(),
        2,
        "a restart and an upgrade each adopt every lazy layer:\n{node_log}"
    );

    // The kill switch: the next pod of the image is pulled the normal way.
    kube.apply(&policy("Off"));
    kube.wait("the controller has seen the policy change", 60, || {
        let p = kube.json(&["get", "hermespolicy", "kube-lazy"]);
        (p["status"]["observedGeneration"] == p["metadata"]["generation"]).then_some(())
    });
    kube.delete_pod("second");
    kube.remove_image(&image, &layer_snapshots);
    let lazy_before = metric(&kube.node_metrics(), "hermes_node_lazy_mounts_total", &[]);
    let log_from = kube.registry_log().len();
    assert_eq!(kube.start_pod("third", &image.reference), MESSAGE);
    pod_uids.push(kube.pod_uid("third"));
    let fetched = registry_layer_bytes(&kube.registry_log(), log_from, &image);
    let m = kube.node_metrics();
    assert_eq!(
        metric(&m, "hermes_node_lazy_mounts_total", &[]),
        lazy_before,
        "no lazy mount with mode Off:\n{m}"
    );
    assert!(
        fetched >= total,
        "mode Off pulls the whole image: {fetched} of {total} bytes"
    );
    // `down` leaves nothing behind, with the controller's pods still running.
    kube.down_and_check(&pod_uids);
}

/// The pods' pull secret (kubernetes.io/dockerconfigjson) in `default`.
const PULL_SECRET: &str = "private-registry";

/// busybox, a layer with `message`, and an 8 MiB layer the pod never reads, pushed to the
/// htpasswd registry with `password`; the pod prints the message and keeps running.
fn push_private_image(
    registry: &Registry,
    repo: &str,
    message: &str,
    password: &str,
) -> PushedImage {
    busybox_image()
        .expect("busybox image")
        .layer()
        .file("etc/message", format!("{message}\n"))
        .big_layer(8)
        .entrypoint(&["/bin/sh", "-c", "cat /etc/message; exec sleep 1000000"])
        .push_with_creds(&registry.host(), repo, cri_proxy::USER, password)
        .expect("push the private image")
}

impl Kube {
    /// containerd reaches `host` over plain HTTP (its `hosts.toml`, read on every pull); it
    /// gets no credential for it: those come with each pull.
    fn plain_http_registry(&self, host: &str) {
        let dir = self.dir.join("containerd/certs.d").join(host);
        std::fs::create_dir_all(&dir).expect("certs.d dir");
        std::fs::write(
            dir.join("hosts.toml"),
            format!(
                "server = \"http://{host}\"\n[host.\"http://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
            ),
        )
        .expect("write hosts.toml");
    }

    /// Creates or updates the pull secret for `host` with `password`.
    fn apply_pull_secret(&self, host: &str, password: &str) {
        use base64::Engine;
        let auth = base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{password}", cri_proxy::USER));
        let config = serde_json::json!({"auths": {host: {"auth": auth}}});
        let secret = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": PULL_SECRET, "namespace": "default"},
            "type": "kubernetes.io/dockerconfigjson",
            "stringData": {".dockerconfigjson": config.to_string()},
        });
        self.apply(&secret.to_string());
    }

    /// Starts pod `name` of the private `image` with the pull secret, waits for `message`, and
    /// checks that it started lazily: `min_lazy` more lazy mounts, and of the 8 MiB layer it never reads, less
    /// than a tenth came from `registry`. Returns the lazy mounts it added.
    fn start_private_pod_lazily(
        &self,
        name: &str,
        image: &PushedImage,
        message: &str,
        registry: &Registry,
        min_lazy: f64,
    ) -> f64 {
        let lazy_before = metric(&self.node_metrics(), "hermes_node_lazy_mounts_total", &[]);
        let log_path = registry.root().join("registry.log");
        let log_from = std::fs::read_to_string(&log_path).unwrap_or_default().len();
        assert_eq!(
            self.start_pod_with_secret(name, &image.reference, Some(PULL_SECRET)),
            message
        );
        let m = self.node_metrics();
        let lazy = metric(&m, "hermes_node_lazy_mounts_total", &[]) - lazy_before;
        let big = image.layers.last().expect("layers");
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let fetched_big = registry_layer_bytes(
            &log,
            log_from,
            &PushedImage {
                layers: vec![big.clone()],
                ..image.clone()
            },
        );
        eprintln!(
            "{name}: {lazy} lazy mounts, {fetched_big} of the unread layer's {} bytes fetched",
            big.size
        );
        assert!(
            lazy >= min_lazy,
            "{name}: {lazy} lazy mounts, expected at least {min_lazy}:\n{m}\n{}",
            self.diagnostics()
        );
        assert!(
            fetched_big * 10 < big.size,
            "{name}: the unread layer was fetched ({fetched_big} of {} bytes): not lazy",
            big.size
        );
        let node_log =
            std::fs::read_to_string(self.dir.join("logs/hermes-node.log")).unwrap_or_default();
        assert!(
            node_log.contains(&format!(r#"pod="default/{name}""#)),
            "the kubelet's pull of {name} went through the CRI proxy:\n{node_log}"
        );
        lazy
    }
}

/// Issue 15's first "must show", on kubelet v1.20 (whose gRPC client sends the socket path as
/// `:authority`: the proxy's HTTP/2 front makes that acceptable).
#[test]
fn a_pod_with_image_pull_secrets_starts_lazily_through_the_cri_proxy_also_after_a_rotation() {
    let registry = Registry::start_with_htpasswd(cri_proxy::USER, cri_proxy::PASSWORD)
        .expect("htpasswd registry");
    // The proxy logs each pull with its pod at info.
    let (_turn, kube) = new_cluster_with(
        &["--cri-proxy"],
        &[("RUST_LOG", "warn,hermes_snapshotter::cri_proxy=info")],
    );
    kube.plain_http_registry(&registry.host());
    // Indexed into the node's own zTOC store with a docker config of the test's: the node has
    // none, and the controller has no credential for this registry.
    let secrets = tempfile::tempdir().expect("secrets dir");
    let store = kube.dir.join("node/root/ztocs");
    let v1 = push_private_image(&registry, "private/app:v1", "private", cri_proxy::PASSWORD);
    let config = cri_proxy::docker_config(secrets.path(), &registry, cri_proxy::PASSWORD);
    cri_proxy::index_private(&v1.reference, &config, &store);

    kube.apply_pull_secret(&registry.host(), cri_proxy::PASSWORD);
    // The message layer and the unread one are new to the node whatever else it holds.
    kube.start_private_pod_lazily("private-1", &v1, "private", &registry, 2.0);

    // The password changes in the registry and in the Secret; a new image pushed with it.
    let htpasswd = Command::new("htpasswd")
        .args(["-Bbn", cri_proxy::USER, cri_proxy::ROTATED])
        .output()
        .expect("htpasswd (apt-get install apache2-utils)");
    assert!(htpasswd.status.success());
    std::fs::write(registry.root().join("htpasswd"), &htpasswd.stdout).expect("rotate");
    kube.wait("the registry refuses the old password", 30, || {
        let out = run(Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-u"])
            .arg(format!("{}:{}", cri_proxy::USER, cri_proxy::PASSWORD))
            .arg(format!("{}/v2/", registry.url())));
        (text(&out.stdout) == "401").then_some(())
    });
    kube.apply_pull_secret(&registry.host(), cri_proxy::ROTATED);
    let v2 = push_private_image(&registry, "private/app:v2", "rotated", cri_proxy::ROTATED);
    let config = cri_proxy::docker_config(secrets.path(), &registry, cri_proxy::ROTATED);
    cri_proxy::index_private(&v2.reference, &config, &store);
    // v2 shares the unread layer with v1 (served once per node): its message layer is new, and
    // the pod reads it from the registry with the rotated password.
    kube.start_private_pod_lazily("private-2", &v2, "rotated", &registry, 1.0);

    // Neither password anywhere on the node: its whole dir (root, config, sockets' dir), the
    // cluster's logs (the node daemon's, its layer servers' under the root, containerd's, the
    // kubelet's), its metrics.
    let metrics = kube.node_metrics();
    for password in [cri_proxy::PASSWORD, cri_proxy::ROTATED] {
        for dir in [kube.dir.join("node"), kube.dir.join("logs")] {
            assert_eq!(
                cri_proxy::files_containing(&dir, password),
                Vec::<PathBuf>::new(),
                "files holding a password"
            );
        }
        assert!(!metrics.contains(password), "a password in the metrics");
    }
    let pod_uids = vec![kube.pod_uid("private-1"), kube.pod_uid("private-2")];
    kube.down_and_check(&pod_uids);
}

#[test]
fn an_off_policy_for_one_namespace_pulls_normally_there_and_lazily_elsewhere() {
    // Through the CRI proxy the node knows each pull's pod, and names its namespace and labels
    // when it asks the controller: the policies' selectors apply at the node.
    let (_turn, kube) = new_cluster_with(&["--cri-proxy"], &[]);
    let image = push_test_image(&kube.registry);
    // Indexed into the node's own store: the controller has no zTOC, only the policies.
    crate::node::index(&image.reference, &kube.dir.join("node/root/ztocs"));
    let repo = image.reference.rsplit_once(':').expect("tag").0.to_owned();
    kube.apply(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: batch, labels: {{team: batch}}}}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, labels: {{team: shop}}}}\n---\n\
         apiVersion: hermes.dev/v1alpha1\nkind: HermesPolicy\nmetadata: {{name: apps}}\n\
         spec:\n  images: [\"{repo}:*\"]\n  index: {{minLayerSize: \"0\"}}\n---\n\
         apiVersion: hermes.dev/v1alpha1\nkind: HermesPolicy\nmetadata: {{name: off-for-batch}}\n\
         spec:\n  images: [\"{repo}:*\"]\n  mode: \"Off\"\n  \
         namespaceSelector: {{matchLabels: {{team: batch}}}}\n"
    ));
    // The controller's node API sees both policies and the namespaces' labels once its loop ran.
    let valid = |p: &Value| {
        p["status"]["conditions"].as_array().is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Valid" && c["status"] == "True")
        })
    };
    let until = std::time::Instant::now() + std::time::Duration::from_secs(240);
    loop {
        let list = kube.json(&["get", "hermespolicies"]);
        let items = list["items"].as_array().cloned().unwrap_or_default();
        let mine = |name: &str| {
            items
                .iter()
                .any(|p| p["metadata"]["name"] == name && valid(p))
        };
        // (The cluster also has deploy/'s example policy.)
        if mine("apps") && mine("off-for-batch") {
            break;
        }
        assert!(
            std::time::Instant::now() < until,
            "the controller did not validate both policies in 240 s: {}\n{}\n{}",
            kube.kubectl(&["get", "hermespolicies"]),
            kube.kubectl(&[
                "-n",
                "hermes-system",
                "logs",
                "-l",
                "app.kubernetes.io/name=hermes-controller",
                "--tail=40"
            ]),
            kube.diagnostics()
        );
        std::thread::sleep(std::time::Duration::from_secs(1));
    }

    let lazy = || metric(&kube.node_metrics(), "hermes_node_lazy_mounts_total", &[]);
    let refused = || {
        metric(
            &kube.node_metrics(),
            "hermes_node_lazy_misses_total",
            &["reason=\"disabled\""],
        )
    };
    let (lazy_before, refused_before) = (lazy(), refused());
    assert_eq!(
        kube.start_pod_in("batch", "nightly", &image.reference),
        MESSAGE
    );
    assert_eq!(
        lazy(),
        lazy_before,
        "a pod in the Off namespace started lazily"
    );
    assert!(
        refused() > refused_before,
        "the controller did not refuse the batch pod's layers: {}",
        kube.diagnostics()
    );

    // The same image elsewhere, pulled again: lazily.
    kube.delete_pod_in("batch", "nightly");
    let snapshots = kube.committed_snapshots();
    kube.remove_image(&image, &snapshots);
    let lazy_before = lazy();
    assert_eq!(kube.start_pod_in("shop", "web", &image.reference), MESSAGE);
    assert!(
        lazy() >= lazy_before + 4.0,
        "the shop pod did not start lazily: {} -> {}\n{}",
        lazy_before,
        lazy(),
        kube.diagnostics()
    );
    let pod_uids = vec![kube.pod_uid_in("shop", "web")];
    kube.down_and_check(&pod_uids);
}

/// The pod the memory-module test starts: in `ml`, selected by deploy/modules/policy-example.yaml.
const MODULES_POD: &str = "serving";
const INSTALLER: &str = "hermes-modules-install";
const SUPERVISOR: &str = "hermes-modules-supervisor";

impl Kube {
    /// `kubectl -n ml exec serving -c CONTAINER -- ARGS`.
    fn exec_ml(&self, container: &str, args: &[&str]) -> String {
        let mut all = vec!["-n", "ml", "exec", MODULES_POD, "-c", container, "--"];
        all.extend(args);
        self.kubectl(&all)
    }

    /// The supervisor's view of the pod's state volume: the plan file and its phase record.
    fn module_state(&self) -> (String, Vec<Value>) {
        let plan = self.exec_ml(SUPERVISOR, &["busybox", "cat", "/var/run/hermes/plan.json"]);
        let phases = self
            .exec_ml(
                SUPERVISOR,
                &["busybox", "cat", "/var/run/hermes/plan.json.phases"],
            )
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("phase line {l:?}: {e}")))
            .collect();
        (plan, phases)
    }

    /// `hermes_module_up` samples of the supervisor's /metrics: (labels, value).
    fn modules_up(&self) -> Vec<(String, f64)> {
        self.exec_ml(
            SUPERVISOR,
            &["busybox", "wget", "-qO-", "http://127.0.0.1:9477/metrics"],
        )
        .lines()
        .filter_map(|l| l.strip_prefix("hermes_module_up"))
        .filter_map(|l| {
            let (labels, value) = l.rsplit_once(' ')?;
            Some((labels.to_owned(), value.parse().ok()?))
        })
        .collect()
    }

    /// Waits until the supervisor reports `module` up; returns every `hermes_module_up` sample.
    fn wait_module_up(&self, what: &str, module: &str) -> Vec<(String, f64)> {
        self.wait(what, 60, || {
            let up = self.modules_up();
            up.iter()
                .any(|(labels, v)| labels.contains(module) && *v == 1.0)
                .then_some(up)
        })
    }

    /// Processes in the pod (one PID namespace) whose command line contains `needle`.
    fn pod_processes(&self, needle: &str) -> Vec<String> {
        // /proc, not `ps`: busybox's ps cuts long command lines.
        let script = "for d in /proc/[0-9]*; do tr '\\0' ' ' < $d/cmdline 2>/dev/null; echo; done";
        self.exec_ml(SUPERVISOR, &["busybox", "sh", "-c", script])
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_owned)
            .collect()
    }

    /// The pod is running with every container ready; returns it.
    fn modules_pod_ready(&self) -> Option<Value> {
        let pod = self.json(&["-n", "ml", "get", "pod", MODULES_POD]);
        let statuses = pod["status"]["containerStatuses"].as_array()?;
        (pod["status"]["phase"] == "Running"
            && !statuses.is_empty()
            && statuses.iter().all(|c| c["ready"] == true))
        .then_some(pod)
    }
}

fn names(list: &Value) -> Vec<String> {
    list.as_array()
        .map(|cs| {
            cs.iter()
                .filter_map(|c| c["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn memory_modules_through_the_webhook_load_once_when_the_kubelet_reruns_init() {
    let (_turn, kube) = new_cluster();

    // Installed as deploy/README.md says: the webhook's TLS, policies and caBundle by
    // deploy/modules/install.sh, then `kubectl apply -f deploy/modules/`.
    let modules = repo_root().join("deploy/modules");
    kube.kubectl(&["create", "namespace", "ml"]);
    let install = run(Command::new("bash")
        .arg(modules.join("install.sh"))
        .arg("--kubeconfig")
        .arg(&kube.kubeconfig)
        .arg("--policy")
        .arg(modules.join("policy-example.yaml"))
        .arg("--wait")
        .env("PATH", path_with(&kube.kubectl)));
    assert!(
        install.status.success(),
        "deploy/modules/install.sh: {}\n{}",
        text(&install.stderr),
        kube.diagnostics()
    );
    kube.kubectl(&["apply", "-f", &modules.to_string_lossy()]);
    let webhook = kube.json(&[
        "get",
        "mutatingwebhookconfiguration",
        "hermes-memory-modules",
    ]);
    assert!(
        webhook["webhooks"][0]["clientConfig"]["caBundle"]
            .as_str()
            .is_some_and(|b| !b.is_empty()),
        "re-applying deploy/modules keeps the caBundle: {webhook:#}"
    );

    let app = busybox_image()
        .expect("busybox image")
        .entrypoint(&["/bin/sh", "-c", "echo app up; exec sleep 1000000"])
        .push(&kube.registry, "kube/serving:v1")
        .expect("push the app image");
    let pod_yaml = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {MODULES_POD}\n  namespace: ml\n  \
         labels: {{app.kubernetes.io/component: serving}}\n\
         spec:\n  terminationGracePeriodSeconds: 0\n  \
         containers:\n    - name: app\n      image: \"{}\"\n      \
         env: [{{name: CLUSTER_ENV, value: staging}}]\n",
        app.reference
    );
    // The webhook answers once its Service routes to it: until then the API server lets pods
    // through unchanged (failurePolicy Ignore), so ask with a server-side dry run first.
    kube.wait("the webhook patches a selected pod (dry run)", 90, || {
        let out = kube.kubectl_output(
            &["create", "--dry-run=server", "-o", "json", "-f", "-"],
            Some(&pod_yaml),
        );
        let pod: Value = serde_json::from_slice(&out.stdout).ok()?;
        pod["metadata"]["annotations"]["hermes.dev/memory-modules"]
            .is_string()
            .then_some(())
    });
    kube.apply(&pod_yaml);

    // The patch, for a v1.20 API server: the installer as the only init container, the
    // supervisor beside the app (a native sidecar would hold the pod in its init phase).
    let pod = kube.json(&["-n", "ml", "get", "pod", MODULES_POD]);
    assert_eq!(
        names(&pod["spec"]["initContainers"]),
        [INSTALLER],
        "{pod:#}"
    );
    assert_eq!(
        names(&pod["spec"]["containers"]),
        ["app", SUPERVISOR],
        "{pod:#}"
    );
    assert_eq!(pod["spec"]["shareProcessNamespace"], true);
    let pod_uid = pod["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    kube.wait("the injected pod runs, every container ready", 120, || {
        kube.modules_pod_ready()
    });
    let app_log = kube.kubectl(&["-n", "ml", "logs", MODULES_POD, "-c", "app"]);
    assert_eq!(app_log.lines().next(), Some("app up"), "{app_log}");

    // The init step ran the ConfigMap's load-sidecars.sh with the pod's CLUSTER_ENV=staging.
    let installed = kube.kubectl(&["-n", "ml", "logs", MODULES_POD, "-c", INSTALLER]);
    assert!(
        installed.contains(
            "plan created (created by phase pod-init, source: script /etc/hermes/load-sidecars.sh)"
        ) && installed.contains("  mem-tracer:staging-tunings\n"),
        "installer log: {installed}"
    );
    let (plan, phases) = kube.module_state();
    let planned: Value = serde_json::from_str(&plan).expect("plan.json");
    let keys = |plan: &Value| -> Vec<String> {
        plan["modules"]
            .as_array()
            .map(|ms| {
                ms.iter()
                    .map(|m| {
                        format!(
                            "{}:{}",
                            m["module"].as_str().unwrap_or("?"),
                            m["config"].as_str().unwrap_or("?")
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(keys(&planned), ["mem-tracer:staging-tunings"], "{plan}");
    assert_eq!(phases.len(), 1, "{phases:#?}");

    // The chosen module runs beside the app, in the supervisor.
    let up = kube.wait_module_up("the supervisor reports mem-tracer up", "mem-tracer");
    assert_eq!(up.len(), 1, "only the planned module: {up:?}");
    assert_eq!(kube.pod_processes("modules run").len(), 1);

    // The kubelet re-runs init: the pod's sandbox dies (its pause process killed), the kubelet
    // makes a new one and runs the installer again, then the app and the supervisor.
    let sandboxes = kube.ctr(&[
        "containers",
        "ls",
        "-q",
        &format!(
            "labels.\"io.kubernetes.pod.uid\"=={pod_uid},labels.\"io.cri-containerd.kind\"==sandbox"
        ),
    ]);
    let sandbox = sandboxes
        .lines()
        .next()
        .unwrap_or_else(|| panic!("no sandbox of pod {pod_uid} in containerd: {sandboxes:?}"));
    kube.ctr(&["tasks", "kill", "-s", "SIGKILL", sandbox]);
    let pod = kube.wait("the kubelet restarts the pod in a new sandbox", 120, || {
        let pod = kube.modules_pod_ready()?;
        let app_restarts = pod["status"]["containerStatuses"]
            .as_array()?
            .iter()
            .find(|c| c["name"] == "app")?["restartCount"]
            .as_u64()?;
        (app_restarts >= 1).then_some(pod)
    });
    let (plan_after, phases) = kube.wait("the re-run installer recorded its phase", 60, || {
        let (plan, phases) = kube.module_state();
        (phases.len() >= 2).then_some((plan, phases))
    });
    assert_eq!(
        phases.len(),
        2,
        "init ran twice, no more: {phases:#?}\n{pod:#}"
    );
    let installed = kube.kubectl(&["-n", "ml", "logs", MODULES_POD, "-c", INSTALLER]);
    assert!(
        installed.contains("phase pod-init: plan unchanged (created by phase pod-init"),
        "the second init converges on the stored plan: {installed}"
    );
    // Exactly once: the same plan, one supervisor, the one module up.
    assert_eq!(plan_after, plan, "the plan file is never rewritten");
    let up = kube.wait_module_up("the new supervisor reports mem-tracer up", "mem-tracer");
    assert_eq!(up.len(), 1, "the module loads once, not twice: {up:?}");
    let supervisors = kube.pod_processes("modules run");
    assert_eq!(
        supervisors.len(),
        1,
        "one supervisor in the pod: {supervisors:#?}"
    );

    kube.down_and_check(&[pod_uid]);
}

/// PATH with kubectl's directory first (deploy/modules/install.sh calls `kubectl`).
fn path_with(kubectl: &Path) -> std::ffi::OsString {
    let mut dirs = vec![kubectl.parent().unwrap_or(Path::new("/")).to_owned()];
    dirs.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    std::env::join_paths(dirs).expect("PATH")
}
