//! `hermes kube …` against a real kube-apiserver v1.20 (the Kubernetes adapter's test helper,
//! shared by path): the CRDs it prints install, and `hermes kube controller` takes the lease,
//! and on SIGTERM stops and releases it.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[allow(dead_code)]
#[path = "../../../hermes-kube/tests/it/apiserver.rs"]
mod apiserver;

use apiserver::ApiServer;

const BIN: &str = env!("CARGO_BIN_EXE_hermes");

fn lease_holder(server: &ApiServer) -> String {
    let (_, out) = server.kubectl(
        &[
            "-n",
            "hermes-system",
            "get",
            "lease",
            "hermes-controller",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ],
        None,
    );
    out.trim().to_owned()
}

#[test]
fn kube_controller_takes_the_lease_and_releases_it_on_sigterm() {
    let server = ApiServer::start();
    let crds = Command::new(BIN)
        .args(["kube", "crds"])
        .output()
        .expect("hermes kube crds");
    assert!(crds.status.success());
    let (ok, out) = server.kubectl(
        &["apply", "-f", "-"],
        Some(&String::from_utf8_lossy(&crds.stdout)),
    );
    assert!(ok, "apply the printed CRDs: {out}");
    assert!(out.contains("hermespolicies.hermes.dev created"), "{out}");
    let (ok, out) = server.kubectl(&["create", "namespace", "hermes-system"], None);
    assert!(ok, "{out}");

    let data = tempfile::tempdir().expect("data dir");
    let mut child = Command::new(BIN)
        .args([
            "kube",
            "controller",
            "--identity=it-replica",
            "--lease-namespace=hermes-system",
            "--lease-duration=4",
            "--lease-grace=2",
            "--listen=127.0.0.1:0",
        ])
        .arg("--data")
        .arg(data.path())
        .env("KUBECONFIG", server.kubeconfig())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start hermes kube controller");
    let deadline = Instant::now() + Duration::from_secs(30);
    while lease_holder(&server) != "it-replica" {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("hermes kube controller exited early: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "the controller did not take the lease within 30 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let stopped_at = Instant::now();
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if stopped_at.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("hermes kube controller did not stop within 20 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit after SIGTERM: {status}");
    assert_eq!(
        lease_holder(&server),
        "",
        "the lease is released on shutdown"
    );
}
