//! The webhook's patch builder: real AdmissionReview v1 JSON in, the patch applied to the pod.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use hermes_kube::webhook::server;
use hermes_kube::webhook::{
    INJECTED_ANNOTATION, INSTALLER_NAME, InjectConfig, SUPERVISOR_NAME, SidecarMode, review,
};

fn cfg() -> InjectConfig {
    InjectConfig {
        image: "registry.example/hermes:0.1.0".into(),
        loader_config_map: "hermes-module-loader".into(),
        metrics_port: 9477,
        sidecar: SidecarMode::Native,
    }
}

fn admission_review(pod: Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": { "group": "", "version": "v1", "kind": "Pod" },
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "requestKind": { "group": "", "version": "v1", "kind": "Pod" },
            "requestResource": { "group": "", "version": "v1", "resource": "pods" },
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": { "username": "system:serviceaccount:kube-system:replicaset-controller" },
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": { "apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions" }
        }
    })
}

fn b64decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("bad base64 byte {c}"),
    };
    let mut out = Vec::new();
    for chunk in s.as_bytes().chunks(4) {
        let pad = chunk.iter().filter(|c| **c == b'=').count();
        let n = chunk
            .iter()
            .filter(|c| **c != b'=')
            .fold(0u32, |n, c| (n << 6) | u32::from(val(*c)))
            << (6 * pad);
        out.extend_from_slice(&n.to_be_bytes()[1..4 - pad]);
    }
    out
}

/// Applies RFC 6902 `add` / `replace` operations (all the builder emits).
fn apply(doc: &mut Value, patch: &[Value]) {
    for op in patch {
        let path = op["path"].as_str().unwrap();
        let (parent, last) = path.rsplit_once('/').unwrap();
        let last = last.replace("~1", "/").replace("~0", "~");
        let target = doc
            .pointer_mut(parent)
            .unwrap_or_else(|| panic!("no parent for {path}"));
        let value = op["value"].clone();
        match (op["op"].as_str().unwrap(), target) {
            ("add", Value::Array(a)) if last == "-" => a.push(value),
            ("add", Value::Object(o)) => {
                o.insert(last, value);
            }
            ("replace", Value::Object(o)) => {
                assert!(o.contains_key(&last), "replace of missing {path}");
                o.insert(last, value);
            }
            (other, t) => panic!("unsupported op {other} on {t}"),
        }
    }
}

fn patch_of(response: &Value) -> Option<Vec<Value>> {
    let p = response["response"]["patch"].as_str()?;
    assert_eq!(response["response"]["patchType"], "JSONPatch");
    Some(serde_json::from_slice(&b64decode(p)).unwrap())
}

fn bare_pod() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "generateName": "web-", "namespace": "shop", "labels": { "app": "web" } },
        "spec": { "containers": [{ "name": "web", "image": "nginx:1.27" }] }
    })
}

#[test]
fn injects_into_a_bare_pod_and_is_idempotent() {
    let mut pod = bare_pod();
    let resp = review(&admission_review(pod.clone()), &cfg());
    assert_eq!(resp["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(resp["kind"], "AdmissionReview");
    assert_eq!(
        resp["response"]["uid"],
        "705ab4f5-6393-11e8-b7cc-42010a800002"
    );
    assert_eq!(resp["response"]["allowed"], true);
    let patch = patch_of(&resp).expect("a patch for a bare pod");
    apply(&mut pod, &patch);

    assert_eq!(
        pod["metadata"]["annotations"][INJECTED_ANNOTATION],
        "injected"
    );
    assert_eq!(pod["spec"]["shareProcessNamespace"], true);
    let inits = pod["spec"]["initContainers"].as_array().unwrap();
    assert_eq!(inits.len(), 2);
    assert_eq!(inits[0]["name"], INSTALLER_NAME);
    assert_eq!(inits[0]["args"][1], "resolve");
    assert!(
        inits[0].get("restartPolicy").is_none(),
        "the installer runs to completion"
    );
    assert_eq!(inits[1]["name"], SUPERVISOR_NAME);
    assert_eq!(
        inits[1]["restartPolicy"], "Always",
        "the supervisor is a native sidecar"
    );
    assert_eq!(inits[1]["args"][1], "run");
    let vols: Vec<&str> = pod["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(vols, ["hermes-module-loader", "hermes-module-state"]);
    assert_eq!(
        pod["spec"]["volumes"][0]["configMap"]["name"],
        "hermes-module-loader"
    );
    assert_eq!(inits[0]["volumeMounts"][0]["mountPath"], "/etc/hermes");
    assert_eq!(
        pod["spec"]["containers"],
        bare_pod()["spec"]["containers"],
        "app containers untouched"
    );

    // Reinvocation on the injected pod: allowed, no patch.
    let again = review(&admission_review(pod.clone()), &cfg());
    assert_eq!(again["response"]["allowed"], true);
    assert!(patch_of(&again).is_none(), "{again}");
}

#[test]
fn appends_to_existing_init_containers_volumes_and_annotations() {
    let mut pod = bare_pod();
    pod["metadata"]["annotations"] = json!({ "team": "payments" });
    pod["spec"]["initContainers"] = json!([{ "name": "migrate", "image": "migrate:1" }]);
    pod["spec"]["volumes"] = json!([{ "name": "data", "emptyDir": {} }]);
    pod["spec"]["shareProcessNamespace"] = json!(false);
    let patch = patch_of(&review(&admission_review(pod.clone()), &cfg())).unwrap();
    apply(&mut pod, &patch);
    assert_eq!(pod["metadata"]["annotations"]["team"], "payments");
    assert_eq!(
        pod["metadata"]["annotations"][INJECTED_ANNOTATION],
        "injected"
    );
    let names: Vec<&str> = pod["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["migrate", INSTALLER_NAME, SUPERVISOR_NAME]);
    assert_eq!(pod["spec"]["volumes"].as_array().unwrap().len(), 3);
    assert_eq!(pod["spec"]["shareProcessNamespace"], true);
}

#[test]
fn non_pods_and_empty_requests_are_allowed_unchanged() {
    let mut r = admission_review(json!({ "kind": "Deployment" }));
    r["request"]["kind"]["kind"] = json!("Deployment");
    let resp = review(&r, &cfg());
    assert_eq!(resp["response"]["allowed"], true);
    assert!(patch_of(&resp).is_none());
    let resp = review(&json!({}), &cfg());
    assert_eq!(resp["response"]["allowed"], true);
    assert!(patch_of(&resp).is_none());
}

/// A self-signed certificate for 127.0.0.1 made with the real openssl tool.
fn self_signed(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=hermes-webhook",
        ])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl is required for the webhook TLS test: apt-get install openssl");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

/// POST over HTTPS with the real curl client, trusting only our certificate.
fn curl(cert: &std::path::Path, url: &str, body: Option<&Value>) -> (u16, Vec<u8>) {
    try_curl(cert, url, body).unwrap_or_else(|e| panic!("curl {url}: {e}"))
}

/// [`curl`], with curl's complaint as the error when it gets no answer.
fn try_curl(
    cert: &std::path::Path,
    url: &str,
    body: Option<&Value>,
) -> Result<(u16, Vec<u8>), String> {
    let mut cmd = std::process::Command::new("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "10",
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
        "--cacert",
    ])
    .arg(cert);
    if let Some(b) = body {
        cmd.args([
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            &b.to_string(),
        ]);
    }
    let out = cmd
        .arg(url)
        .output()
        .expect("curl is required for the webhook TLS test: apt-get install curl");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = out.stdout;
    let split = text.iter().rposition(|&b| b == b'\n').expect("status line");
    let status = String::from_utf8_lossy(&text[split + 1..])
        .trim()
        .parse()
        .expect("status");
    Ok((status, text[..split].to_vec()))
}

/// The webhook over TLS in `dir`, with one policy (`policies/shop.yaml`) that injects pods
/// labelled `app: cart` in namespace `shop`; the server and its certificate.
fn start_webhook(
    dir: &std::path::Path,
    header_timeout: Duration,
) -> (server::WebhookServer, PathBuf) {
    let (cert, key) = self_signed(dir);
    let policies = dir.join("policies");
    std::fs::create_dir(&policies).expect("mkdir");
    std::fs::write(
        policies.join("shop.yaml"),
        "apiVersion: hermes.dev/v1alpha1\nkind: HermesPolicy\nmetadata:\n  name: shop-memory\nspec:\n  images: [\"registry.example/shop/*\"]\n  memoryModules:\n    namespaces: [shop]\n    podSelector:\n      matchLabels: {app: cart}\n    loaderConfigMap: shop-loader\n",
    )
    .expect("policy");
    let server = server::start(server::WebhookConfig {
        listen: "127.0.0.1:0".into(),
        cert: cert.clone(),
        key,
        policies,
        image: "registry.example/hermes:0.1.0".into(),
        metrics_port: 9477,
        sidecar: SidecarMode::Native,
        header_timeout,
        max_connections: server::DEFAULT_MAX_CONNECTIONS,
    })
    .expect("webhook");
    (server, cert)
}

#[test]
fn https_webhook_injects_only_pods_a_policy_selects() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, cert) = start_webhook(dir.path(), server::DEFAULT_HEADER_TIMEOUT);
    let policies = dir.path().join("policies");
    let base = format!("https://{}", server.addr());
    assert_eq!(curl(&cert, &format!("{base}/healthz"), None).0, 200);

    let mut pod = bare_pod();
    pod["metadata"]["labels"] = json!({"app": "cart"});
    let (status, body) = curl(
        &cert,
        &format!("{base}/mutate"),
        Some(&admission_review(pod.clone())),
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let response: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(
        response["response"]["uid"],
        "705ab4f5-6393-11e8-b7cc-42010a800002"
    );
    let patch = patch_of(&response).expect("selected pod gets a patch");
    let mut patched = pod.clone();
    apply(&mut patched, &patch);
    let volumes = patched["spec"]["volumes"].to_string();
    assert!(
        volumes.contains("shop-loader"),
        "the policy's loader ConfigMap is mounted: {volumes}"
    );
    assert!(
        patched["spec"]["initContainers"]
            .to_string()
            .contains(INSTALLER_NAME)
    );

    // Not selected: other labels, or a policy switched off → allowed unchanged.
    let mut other = bare_pod();
    other["metadata"]["labels"] = json!({"app": "search"});
    let (_, body) = curl(
        &cert,
        &format!("{base}/mutate"),
        Some(&admission_review(other)),
    );
    let response: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(response["response"]["allowed"], true);
    assert!(patch_of(&response).is_none(), "unselected pod is unchanged");
    let text = std::fs::read_to_string(policies.join("shop.yaml")).expect("read");
    std::fs::write(
        policies.join("shop.yaml"),
        text.replace("spec:\n", "spec:\n  mode: \"Off\"\n"),
    )
    .expect("kill switch");
    let (_, body) = curl(
        &cert,
        &format!("{base}/mutate"),
        Some(&admission_review(pod)),
    );
    assert!(
        patch_of(&serde_json::from_slice(&body).expect("json")).is_none(),
        "mode Off injects nothing"
    );

    // A body that is JSON but not a review is allowed, never a crash; unknown paths are 404.
    let (status, _) = curl(&cert, &format!("{base}/mutate"), Some(&json!("garbage")));
    assert_eq!(status, 200, "a JSON string is still answered (allowed)");
    assert_eq!(curl(&cert, &format!("{base}/nope"), None).0, 404);
}

/// Whether the server still holds `conn` open (it has neither closed nor reset it).
fn still_open(conn: &TcpStream) -> bool {
    conn.set_nonblocking(true).expect("nonblocking");
    let open =
        matches!(conn.peek(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
    conn.set_nonblocking(false).expect("blocking");
    open
}

#[test]
fn idle_connections_beyond_the_cap_do_not_starve_reviews() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A header timeout far beyond the test: only making room, not timeouts, can let a review in.
    let (server, cert) = start_webhook(dir.path(), Duration::from_secs(600));
    let idle: Vec<TcpStream> = (0..200)
        .map(|_| TcpStream::connect(server.addr()).expect("connect"))
        .collect();
    let mut pod = bare_pod();
    pod["metadata"]["labels"] = json!({"app": "cart"});
    let url = format!("https://{}/mutate", server.addr());
    let started = Instant::now();
    let (status, body) = loop {
        match try_curl(&cert, &url, Some(&admission_review(pod.clone()))) {
            Ok(answer) => break answer,
            Err(e) => assert!(
                started.elapsed() < Duration::from_secs(60),
                "no review answered within 60 s while 200 idle connections are open: {e}"
            ),
        }
    };
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let response: Value = serde_json::from_slice(&body).expect("json");
    assert!(
        patch_of(&response).is_some(),
        "the selected pod is injected"
    );
    // It got in while the idle clients still held the server's connections (the oldest idle
    // ones were closed to make room), not after they timed out or were all dropped.
    let open = idle.iter().filter(|c| still_open(c)).count();
    assert!(
        open >= server::DEFAULT_MAX_CONNECTIONS / 2,
        "answered after {:?} with only {open} of 200 idle connections still open",
        started.elapsed()
    );
}

#[test]
fn a_client_dripping_its_handshake_is_closed_after_the_header_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, cert) = start_webhook(dir.path(), Duration::from_millis(500));
    let mut conn = TcpStream::connect(server.addr()).expect("connect");
    // A TLS handshake record of 16 KiB, sent one byte per read timeout below: each byte comes
    // well within any per-read timeout, the whole never arrives.
    conn.write_all(&[0x16, 0x03, 0x01, 0x40, 0x00])
        .expect("record header");
    conn.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("read timeout");
    let started = Instant::now();
    loop {
        if conn.write_all(&[0]).is_err() {
            break;
        }
        match conn.read(&mut [0u8; 64]) {
            Ok(_) => break,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "a client dripping its handshake was still connected after 30 s (header timeout 500 ms)"
        );
    }
    // The server is still there for others.
    let (status, _) = curl(&cert, &format!("https://{}/healthz", server.addr()), None);
    assert_eq!(status, 200);
}
