//! `hermes controller --standalone` and `hermes status` with real parts: Debian's
//! docker-registry, a real containerd (with runc) running containers, the controller process.
//!
//! [`StandaloneController`] starts the controller binary in a temp dir and is meant for reuse
//! (e.g. by node-daemon tests that need a controller serving zTOCs).

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use hermes_testkit::{Containerd, FaultProxy, PushedImage, Registry, TestImage, busybox_image};
use serde_json::Value;

use crate::node::{Node, metric, require_root};
use crate::pull::{hermes_pull, message_image_running};

const HERMES: &str = env!("CARGO_BIN_EXE_hermes");
const WAIT: Duration = Duration::from_secs(90);

/// A standalone controller process in a temp dir; killed on drop.
pub struct StandaloneController {
    dir: tempfile::TempDir,
    args: Vec<String>,
    child: Option<Child>,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
}

impl StandaloneController {
    /// Start a controller watching `containerd` (namespace `default`) with no policies yet,
    /// polling every 200 ms and retrying failures after 200 ms (doubling up to 1 s). `extra`
    /// flags are appended (e.g. `--concurrency 1`).
    pub fn start(containerd: &Path, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("controller temp dir");
        std::fs::create_dir(dir.path().join("policies")).expect("policy dir");
        let mut args: Vec<String> = [
            "controller",
            "--standalone",
            "--policies",
            path_str(&dir.path().join("policies")),
            "--data",
            path_str(&dir.path().join("data")),
            "--containerd",
            path_str(containerd),
            "--namespace",
            "default",
            "--plain-http",
            "--poll-interval",
            "200ms",
            "--retry-backoff",
            "200ms",
            "--retry-backoff-max",
            "1s",
            "--retry-failed-after",
            "2s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut controller = StandaloneController {
            dir,
            args,
            child: None,
            url: String::new(),
        };
        controller.spawn("127.0.0.1:0");
        controller
    }

    /// Start the process listening on `listen`; wait until it is ready.
    fn spawn(&mut self, listen: &str) {
        let mut args = self.args.clone();
        args.extend(["--listen".to_owned(), listen.to_owned()]);
        let (child, addr) = launch(&args, &self.log_path());
        self.child = Some(child);
        self.url = format!("http://{addr}");
        let started = Instant::now();
        while self.get("/readyz").0 != 200 {
            self.assert_alive();
            assert!(
                started.elapsed() < WAIT,
                "the controller never got ready:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn assert_alive(&mut self) {
        if let Some(status) = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
        {
            panic!("the controller exited with {status}:\n{}", self.log());
        }
    }

    /// Kill the process with SIGKILL (no chance to clean up).
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start it again on the same port and data dir.
    pub fn restart(&mut self) {
        let addr = self.url.trim_start_matches("http://").to_owned();
        self.spawn(&addr);
    }

    /// The policy directory.
    pub fn policies(&self) -> PathBuf {
        self.dir.path().join("policies")
    }

    /// The data dir (`store/` is the artifact store).
    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Write (or replace) a policy file.
    pub fn write_policy(&self, file: &str, yaml: &str) {
        // Written aside and renamed, so a poll never reads half a file.
        let tmp = self.dir.path().join(file);
        std::fs::write(&tmp, yaml).expect("write policy");
        std::fs::rename(&tmp, self.policies().join(file)).expect("move policy");
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("controller.log")
    }

    /// Everything the controller logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// `GET path` on the node API: (status, body).
    pub fn get(&self, path: &str) -> (u16, Vec<u8>) {
        http_get(self.url.trim_start_matches("http://"), path)
    }

    /// `hermes status --json [IMAGE]` against this controller.
    pub fn status(&self, image: Option<&str>) -> Result<Value, String> {
        let mut args = vec!["status", "--json", "--controller", &self.url];
        args.extend(image);
        let out = hermes(&args);
        if !out.status.success() {
            return Err(text(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout).expect("status JSON"))
    }

    /// Poll `hermes status --json IMAGE` until `done` holds; its report.
    pub fn wait_for(&self, image: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let started = Instant::now();
        loop {
            let last = self.status(Some(image));
            if let Ok(report) = &last
                && done(report)
            {
                return report.clone();
            }
            assert!(
                started.elapsed() < WAIT,
                "{image} never got {what}; last status: {last:#?}\ncontroller log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for StandaloneController {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Start `hermes ARGS` logging to `log` (appended); wait for its "listening on ADDR" line.
fn launch(args: &[String], log: &Path) -> (Child, String) {
    let before = std::fs::read_to_string(log).unwrap_or_default().len();
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("controller log");
    let mut child = Command::new(HERMES)
        .args(args)
        .env("RUST_LOG", "info,hermes_oci=warn")
        .env("HOME", "/nonexistent")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .expect("start hermes controller");
    let started = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(addr) = text
            .get(before..)
            .and_then(|new| new.lines().find_map(|l| l.strip_prefix("listening on ")))
        {
            return (child, addr.to_owned());
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the controller exited with {status}:\n{text}");
        }
        assert!(
            started.elapsed() < WAIT,
            "the controller never listened:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

fn hermes(args: &[&str]) -> Output {
    Command::new(HERMES)
        .args(args)
        .env_remove("HERMES_CONTROLLER")
        .env_remove("HERMES_TOKEN_FILE")
        .output()
        .expect("run hermes")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// One plain HTTP/1.1 GET: (status, body). Bodies are small here; chunked answers are decoded.
pub fn http_get(host: &str, path: &str) -> (u16, Vec<u8>) {
    let Ok(mut conn) = TcpStream::connect(host) else {
        return (0, Vec::new());
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    if conn.write_all(request.as_bytes()).is_err() {
        return (0, Vec::new());
    }
    let mut raw = Vec::new();
    let _ = conn.read_to_end(&mut raw);
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return (0, Vec::new());
    };
    let head = text(&raw[..split]);
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut body = raw[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    (status, body)
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(end) = raw.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(text(&raw[..end]).trim(), 16).unwrap_or(0);
        if size == 0 || raw.len() < end + 2 + size {
            break;
        }
        out.extend_from_slice(&raw[end + 2..end + 2 + size]);
        raw = &raw[end + 4 + size..];
    }
    out
}

fn policy(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: hermes.dev/v1alpha1\nkind: HermesPolicy\nmetadata:\n  name: {name}\nspec:\n{spec}"
    )
}

/// A busybox image sleeping forever, with a second layer holding `mib` MiB files (one per
/// entry of `files`), about half compressible.
fn sleeper(files: &[(&str, u64)]) -> TestImage {
    let mut image = busybox_image()
        .expect("busybox image (apt-get install busybox-static)")
        .entrypoint(&["/bin/sleep", "86400"]);
    for (path, mib) in files {
        image = image.layer().big_file(path, *mib);
    }
    image
}

/// Pull `image` into containerd's `default` namespace and run a container `id` from `name`
/// (a name it was tagged as, or `image` itself).
fn run_container(containerd: &Containerd, image: &str, name: &str, id: &str) {
    let ctr = |args: &[&str]| {
        containerd
            .ctr(args)
            .unwrap_or_else(|e| panic!("ctr {args:?}: {e}\ncontainerd log:\n{}", containerd.log()))
    };
    ctr(&["-n", "default", "images", "pull", "--plain-http", image]);
    if name != image {
        ctr(&["-n", "default", "images", "tag", image, name]);
    }
    ctr(&["-n", "default", "run", "-d", name, id]);
}

/// The layer blob as the registry serves it.
fn blob(registry: &Registry, repo: &str, digest: &str) -> Vec<u8> {
    let (status, body) = http_get(&registry.host(), &format!("/v2/{repo}/blobs/{digest}"));
    assert_eq!(status, 200, "GET blob {digest}");
    body
}

/// What `hermes ztoc build` makes of a layer blob.
fn ztoc_of(layer: &[u8], span_size: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    let (input, output) = (dir.path().join("layer"), dir.path().join("layer.ztoc"));
    std::fs::write(&input, layer).expect("write layer");
    let out = hermes(&[
        "ztoc",
        "build",
        path_str(&input),
        "--span-size",
        span_size,
        "-o",
        path_str(&output),
    ]);
    assert!(
        out.status.success(),
        "hermes ztoc build: {}",
        text(&out.stderr)
    );
    std::fs::read(output).expect("read zTOC")
}

fn phase(report: &Value) -> &str {
    report["phase"].as_str().unwrap_or("")
}

fn pushed(image: TestImage, registry: &Registry, repo: &str) -> PushedImage {
    image.push(&registry.host(), repo).expect("push test image")
}

on_each_containerd! {
/// The controller's containerd watch on both containerds.
fn a_running_matching_image_is_indexed_served_and_switched_off(flavour) {
    let registry = Registry::start().expect("registry");
    let containerd = Containerd::builder()
        .flavour(flavour)
        .registry_host(&registry.host())
        .start()
        .expect("containerd (apt-get install containerd runc)");
    let host = registry.host();
    let app = pushed(sleeper(&[("srv/model.bin", 4)]), &registry, "ctl/app:v1");
    let other = pushed(sleeper(&[("srv/other.bin", 4)]), &registry, "else/other:v1");
    let app_ref = format!("{host}/ctl/app:v1");
    let other_ref = format!("{host}/else/other:v1");
    // runc keeps its state per namespace, not per containerd: the IDs must differ between the
    // flavours, which run at the same time.
    let id = |name: &str| format!("{name}-{}", flavour.name());
    run_container(&containerd, &app_ref, &app_ref, &id("app"));
    run_container(&containerd, &other_ref, &other_ref, &id("other"));

    let controller = StandaloneController::start(containerd.address(), &[]);
    controller.write_policy(
        "app.yaml",
        &policy(
            "ctl-apps",
            &format!("  images: [\"{host}/ctl/**\"]\n  index:\n    minLayerSize: 1500Ki\n    spanSize: 1Mi\n"),
        ),
    );
    // Invalid policies are reported; the valid one keeps working.
    controller.write_policy(
        "glob.yaml",
        &policy("bad-glob", "  images: [\"ghcr.io/a**\"]\n"),
    );
    controller.write_policy(
        "mode.yaml",
        &policy("bad-mode", "  images: [\"**\"]\n  mode: Fast\n"),
    );
    controller.write_policy(
        "size.yaml",
        &policy(
            "negative",
            "  images: [\"**\"]\n  index: {minLayerSize: -5}\n",
        ),
    );

    let ready = controller.wait_for(&app_ref, "Ready", |r| phase(r) == "Ready");
    assert_eq!(ready["digest"], app.manifest_digest.as_str());
    assert_eq!(ready["policy"], "ctl-apps");
    assert_eq!(ready["pods"], 1);
    let layers = ready["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 2);
    assert_eq!(
        layers[0]["state"], "skipped",
        "the busybox layer is below 1500Ki: {}",
        layers[0]
    );
    assert_eq!(layers[1]["state"], "indexed", "{}", layers[1]);
    let big = &app.layers[1];
    assert_eq!(ready["bytesRead"], big.size);
    assert!(
        ready["buildSeconds"].as_f64().unwrap_or(0.0) > 0.0,
        "{ready}"
    );

    // The node API serves the zTOC `hermes ztoc build` makes for that layer.
    let (status, served) = controller.get(&format!("/v1/layers/{}/ztoc", big.digest));
    assert_eq!(status, 200);
    assert_eq!(
        served,
        ztoc_of(&blob(&registry, "ctl/app", &big.digest), "1MiB")
    );

    // The image that no policy matches is never indexed.
    let all = controller.status(None).expect("hermes status --json");
    let images = all["images"].as_array().expect("images");
    assert_eq!(images.len(), 1, "only the matching image: {all:#}");
    assert_eq!(
        controller
            .get(&format!("/v1/layers/{}/ztoc", other.layers[1].digest))
            .0,
        404
    );
    let missing = hermes(&["status", &other_ref, "--controller", &controller.url]);
    assert!(!missing.status.success());
    assert!(
        text(&missing.stderr).contains("no status for"),
        "{}",
        text(&missing.stderr)
    );

    // Each invalid policy says why, in status and in the log.
    let policies = all["policies"].as_array().expect("policies");
    let message = |name: &str| {
        let p = policies
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("no status for policy {name}: {all:#}"));
        assert_eq!(p["conditions"][0]["status"], "False", "{p}");
        p["conditions"][0]["message"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    };
    assert!(message("bad-glob").contains("spec.images[0]"));
    assert!(message("mode.yaml").contains("Fast"));
    assert!(message("negative").contains("spec.index.minLayerSize"));
    let valid = policies
        .iter()
        .find(|p| p["name"] == "ctl-apps")
        .expect("ctl-apps");
    assert_eq!(valid["conditions"][0]["status"], "True");
    assert_eq!(valid["readyImages"], 1);
    let log = controller.log();
    assert!(
        log.contains("policy rejected") && log.contains("bad-glob"),
        "{log}"
    );

    // The table lists the image and the policies.
    let table = hermes(&["status", "--controller", &controller.url]);
    assert!(table.status.success(), "{}", text(&table.stderr));
    let table = text(&table.stdout);
    assert!(
        table.contains(&app_ref) && table.contains("Ready"),
        "{table}"
    );
    assert!(
        table.contains("bad-glob") && table.contains("False"),
        "{table}"
    );

    // A policy file added later is picked up: the kill switch turns the image Skipped.
    controller.write_policy(
        "off.yaml",
        &policy(
            "stop-app",
            &format!("  images: [\"{host}/ctl/app\"]\n  mode: Off\n"),
        ),
    );
    let off = controller.wait_for(&app_ref, "Skipped", |r| phase(r) == "Skipped");
    assert_eq!(off["reason"], "policy stop-app has mode Off");
}
}

#[test]
fn unreachable_registries_fail_and_retry_and_a_killed_controller_resumes() {
    let registry = Registry::start().expect("registry");
    let containerd = Containerd::builder()
        .registry_host(&registry.host())
        .start()
        .expect("containerd (apt-get install containerd runc)");
    let proxy = FaultProxy::start(registry.addr()).expect("proxy");
    let host = registry.host();
    let app = pushed(
        sleeper(&[("srv/a.bin", 6), ("srv/b.bin", 6)]),
        &registry,
        "ctl/big:v1",
    );
    // The controller reads the registry through the proxy (the container's image is named by
    // the proxy's address), slowly: about 3 MiB per layer at 1 MiB/s.
    let app_ref = format!("{}/ctl/big:v1", proxy.host());
    run_container(&containerd, &format!("{host}/ctl/big:v1"), &app_ref, "big");
    // And another image, named by a registry that is not there.
    pushed(sleeper(&[]), &registry, "ctl/gone:v1");
    let gone_ref = "127.0.0.1:1/ctl/gone:v1";
    run_container(
        &containerd,
        &format!("{host}/ctl/gone:v1"),
        gone_ref,
        "gone",
    );
    proxy.set_bandwidth(Some(1 << 20));

    let mut controller = StandaloneController::start(containerd.address(), &["--concurrency", "1"]);
    controller.write_policy(
        "all.yaml",
        &policy(
            "all",
            "  images: [\"**\"]\n  index: {minLayerSize: 1500Ki, spanSize: 1Mi}\n",
        ),
    );

    // The unreachable registry: Failed with the reason, and retried.
    let failed = controller.wait_for(gone_ref, "Failed", |r| phase(r) == "Failed");
    let reason = failed["reason"].as_str().unwrap_or("").to_owned();
    assert!(
        reason.contains("cannot reach registry 127.0.0.1:1"),
        "{reason}"
    );
    assert_eq!(failed["lastError"].as_str(), Some(reason.as_str()));
    controller.wait_for(gone_ref, "a retry", |r| {
        r["reason"]
            .as_str()
            .is_some_and(|r| r.contains("(2 attempts"))
    });

    // Kill -9 once the first big layer's zTOC is stored, while the second one is building.
    let store = controller.data().join("store");
    let stored = |store: &Path| -> Vec<String> {
        std::fs::read_dir(store.join("layers"))
            .map(|d| {
                d.flatten()
                    .filter(|e| std::fs::read_dir(e.path()).is_ok_and(|mut f| f.next().is_some()))
                    .map(|e| format!("sha256:{}", e.file_name().to_string_lossy()))
                    .collect()
            })
            .unwrap_or_default()
    };
    let started = Instant::now();
    while stored(&store).is_empty() {
        assert!(
            started.elapsed() < WAIT,
            "no layer built:\n{}",
            controller.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let first = stored(&store);
    let (a, b) = (&app.layers[1].digest, &app.layers[2].digest);
    let second = if first[0] == *a { b } else { a };
    let gets = |digest: &str| {
        proxy
            .log()
            .iter()
            .filter(|r| r.method == "GET" && r.path.ends_with(&format!("/blobs/{digest}")))
            .count()
    };
    while gets(second) == 0 {
        assert!(
            started.elapsed() < WAIT,
            "the second layer never started:\n{}",
            controller.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let before_kill = stored(&store);
    controller.kill9();
    assert_eq!(
        before_kill.len(),
        1,
        "killed while the second layer was being read: {before_kill:?}"
    );
    assert_eq!(gets(&first[0]), 1);

    controller.restart();
    let ready = controller.wait_for(&app_ref, "Ready", |r| phase(r) == "Ready");
    let layers = ready["layers"].as_array().expect("layers");
    assert_eq!(
        layers.iter().filter(|l| l["state"] == "indexed").count(),
        2,
        "{ready}"
    );
    assert_eq!(
        gets(&first[0]),
        1,
        "the layer built before the kill is not read again"
    );
    // Both stored zTOCs are whole and right.
    for digest in [a, b] {
        let (status, served) = controller.get(&format!("/v1/layers/{digest}/ztoc"));
        assert_eq!(status, 200);
        assert_eq!(
            served,
            ztoc_of(&blob(&registry, "ctl/big", digest), "1MiB"),
            "{digest}"
        );
    }
    for entry in std::fs::read_dir(store.join("blobs/sha256")).expect("blobs") {
        let path = entry.expect("blob").path();
        let bytes = std::fs::read(&path).expect("read blob");
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        assert_eq!(
            hermes_oci::Digest::of(&bytes).hex(),
            name,
            "a stored blob is damaged"
        );
    }
    // The unreachable image is still being retried after the restart.
    controller.wait_for(gone_ref, "Failed again", |r| phase(r) == "Failed");
}

/// A self-signed server certificate for 127.0.0.1 made with the real openssl tool: (cert, key).
pub(crate) fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=hermes-controller"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        // rustls refuses a CA certificate as the server's own.
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl is required for the TLS test: apt-get install openssl");
    assert!(out.status.success(), "openssl: {}", text(&out.stderr));
    (cert, key)
}

#[test]
fn both_controller_modes_refuse_an_empty_token_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("token");
    std::fs::write(&token, " \n").expect("token file");
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).expect("policies");
    let data = dir.path().join("data");
    let standalone = [
        "controller",
        "--standalone",
        "--policies",
        path_str(&policies),
        "--data",
        path_str(&data),
        "--listen",
        "127.0.0.1:0",
        "--token-file",
        path_str(&token),
    ];
    let kube = [
        "kube",
        "controller",
        "--data",
        path_str(&data),
        "--listen",
        "127.0.0.1:0",
        "--token-file",
        path_str(&token),
    ];
    for args in [&standalone[..], &kube[..]] {
        let out = hermes(args);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{args:?} started: {stderr}");
        assert!(
            stderr.contains(path_str(&token)) && stderr.contains("empty"),
            "{args:?}: the error should name the empty token file: {stderr}"
        );
    }
}

#[test]
fn the_node_api_serves_https_and_wants_the_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = self_signed(dir.path());
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").expect("token file");
    std::fs::create_dir(dir.path().join("policies")).expect("policies");
    let args: Vec<String> = [
        "controller",
        "--standalone",
        "--policies",
        path_str(&dir.path().join("policies")),
        "--data",
        path_str(&dir.path().join("data")),
        // No containerd there: the API serves all the same.
        "--containerd",
        path_str(&dir.path().join("no-containerd.sock")),
        "--listen",
        "127.0.0.1:0",
        "--tls-cert",
        path_str(&cert),
        "--tls-key",
        path_str(&key),
        "--token-file",
        path_str(&token),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (mut child, addr) = launch(&args, &dir.path().join("controller.log"));
    let url = format!("https://{addr}");
    let status = |extra: &[&str]| {
        let mut a = vec!["status", "--json", "--controller", &url];
        a.extend(extra);
        hermes(&a)
    };
    let trusted = [
        "--tls-ca",
        path_str(&cert),
        "--token-file",
        path_str(&token),
    ];
    let started = Instant::now();
    let out = loop {
        let out = status(&trusted);
        if out.status.success() || started.elapsed() > WAIT {
            break out;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(out.status.success(), "{}", text(&out.stderr));
    let all: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(all["images"], serde_json::json!([]));

    let no_token = status(&["--tls-ca", path_str(&cert)]);
    assert!(!no_token.status.success());
    assert!(
        text(&no_token.stderr).contains("wants a bearer token"),
        "{}",
        text(&no_token.stderr)
    );
    let untrusted = status(&["--token-file", path_str(&token)]);
    assert!(!untrusted.status.success(), "an unknown CA is refused");
    let plain = hermes(&["status", "--controller", &format!("http://{addr}")]);
    assert!(!plain.status.success(), "plain HTTP on the TLS port fails");
    let _ = child.kill();
    let _ = child.wait();
}

/// A fresh node: its own `hermes node` (asking `controller`) and containerd root.
fn fresh_node(dir: &Path, registry: &Registry, controller: &str) -> (Node, Containerd) {
    let node = Node::start(dir, &["--plain-http", "--controller", controller]);
    let containerd = Containerd::builder()
        .proxy_snapshotter(&node.socket)
        .registry_host(&registry.host())
        .start()
        .expect("containerd (apt-get install containerd runc)");
    (node, containerd)
}

/// `hermes pull` then `ctr run --snapshotter hermes … cat /etc/message`: (pull's summary, output).
fn pull_and_cat(containerd: &Containerd, node: &Node, image: &str, id: &str) -> (String, String) {
    let pulled = hermes_pull(containerd, image);
    let out = containerd
        .ctr(&[
            "run",
            "--rm",
            "--snapshotter",
            "hermes",
            image,
            id,
            "/bin/cat",
            "/etc/message",
        ])
        .unwrap_or_else(|e| {
            panic!(
                "ctr run: {e:?}\ncontainerd log:\n{}\nnode logs:\n{}",
                containerd.log(),
                node.logs()
            )
        });
    (pulled, out)
}

#[test]
fn a_fresh_node_starts_the_image_lazily_from_the_controllers_artifacts_until_a_policy_says_off() {
    require_root();
    let registry = Registry::start().expect("registry");
    let host = registry.host();
    // It sleeps, so it keeps running on the watched containerd; the nodes run `cat` instead.
    let image = message_image_running(
        &registry,
        "lazy/app:v1",
        "hello from the controller's index",
        &["/bin/sleep", "86400"],
    );

    // The image runs on a first containerd, which the standalone controller watches.
    let watched = Containerd::builder()
        .registry_host(&host)
        .start()
        .expect("containerd (apt-get install containerd runc)");
    run_container(
        &watched,
        &image.reference,
        &image.reference,
        "ctl-fresh-app",
    );
    let controller = StandaloneController::start(watched.address(), &[]);
    controller.write_policy(
        "lazy.yaml",
        &policy(
            "lazy-apps",
            &format!("  images: [\"{host}/lazy/**\"]\n  index: {{minLayerSize: 1Mi}}\n"),
        ),
    );
    let ready = controller.wait_for(&image.reference, "Ready", |r| phase(r) == "Ready");
    let indexed = ready["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .filter(|l| l["state"] == "indexed")
        .count();
    assert!(indexed >= 2, "the two 6 MiB layers at least: {ready:#}");

    // A second node with an empty root: every indexed layer is mounted lazily with the
    // controller's zTOCs, and the container runs.
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, containerd) = fresh_node(&dir.path().join("b"), &registry, &controller.url);
    let (pulled, out) = pull_and_cat(&containerd, &node, &image.reference, "ctl-fresh-1");
    assert!(
        pulled.contains(&format!("{indexed} lazy")),
        "hermes pull said:\n{pulled}\nnode logs:\n{}",
        node.logs()
    );
    assert_eq!(out, "hello from the controller's index\n");
    // The node reports the start once its reads are done: `hermes status IMAGE` counts it.
    let deadline = Instant::now() + Duration::from_secs(90);
    let shown = loop {
        let status = hermes(&["status", &image.reference, "--controller", &controller.url]);
        let shown = text(&status.stdout);
        if shown.contains("starts:     1 lazy, 0 fallbacks") {
            break shown;
        }
        assert!(
            Instant::now() < deadline,
            "no start in hermes status:\n{shown}\nnode logs:\n{}",
            node.logs()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(shown.contains(": Lazy, "), "the last pods: {shown}");
    let m = node.metrics();
    assert_eq!(
        metric(&m, "hermes_node_lazy_mounts_total", &[]),
        indexed as f64,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "hermes_node_index_lookups_total",
            &["controller", "result=\"found\""]
        ),
        indexed as f64,
        "{m}"
    );

    // The kill switch: new starts fall back to a normal pull, even on the node that keeps
    // the zTOCs, and the container still runs.
    controller.write_policy(
        "off.yaml",
        &policy(
            "stop-lazy",
            &format!("  images: [\"{host}/lazy/app\"]\n  mode: Off\n"),
        ),
    );
    controller.wait_for(&image.reference, "Skipped", |r| phase(r) == "Skipped");
    let (node_c, containerd_c) = fresh_node(&dir.path().join("c"), &registry, &controller.url);
    let (pulled, out) = pull_and_cat(&containerd_c, &node_c, &image.reference, "ctl-off-1");
    assert!(pulled.contains(" 0 lazy"), "{pulled}");
    assert_eq!(out, "hello from the controller's index\n");
    let m = node_c.metrics();
    assert_eq!(metric(&m, "hermes_node_lazy_mounts_total", &[]), 0.0, "{m}");
    assert!(
        metric(&m, "hermes_node_lazy_misses_total", &["disabled"]) >= indexed as f64,
        "{m}"
    );
    assert_eq!(
        metric(&m, "hermes_node_lazy_misses_total", &["no_index"]),
        0.0,
        "a switched-off image is not reported as a miss: {m}"
    );

    // On node B the image is removed and pulled again: its kept zTOCs are not used either.
    drop(node_c);
    containerd
        .ctr(&["images", "rm", "--sync", &image.reference])
        .expect("ctr images rm");
    let (pulled, out) = pull_and_cat(&containerd, &node, &image.reference, "ctl-off-2");
    assert!(
        pulled.contains(" 0 lazy"),
        "{pulled}\nnode logs:\n{}",
        node.logs()
    );
    assert_eq!(out, "hello from the controller's index\n");
    let refused = controller
        .get("/metrics")
        .1
        .split(|b| *b == b'\n')
        .filter_map(|l| std::str::from_utf8(l).ok())
        .find(|l| l.starts_with("hermes_controller_artifacts_refused_total"))
        .map(str::to_owned)
        .unwrap_or_default();
    assert!(!refused.ends_with(" 0"), "refusals counted: {refused}");
}
