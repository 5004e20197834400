//! `hermes kube …` against a real kube-apiserver v1.20 (the Kubernetes adapter's test helper,
//! shared by path): the CRDs it prints install; of two `hermes kube controller` processes one
//! takes the lease, the other takes over when the leader is killed (SIGKILL), and SIGTERM stops
//! a replica and releases the lease.

use std::process::{Child, Command, Stdio};
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

fn start_replica(server: &ApiServer, identity: &str, data: &std::path::Path) -> Child {
    Command::new(BIN)
        .args([
            "kube",
            "controller",
            "--lease-namespace=hermes-system",
            "--lease-duration=4",
            "--lease-grace=2",
            "--listen=127.0.0.1:0",
        ])
        .arg(format!("--identity={identity}"))
        .arg("--data")
        .arg(data)
        .env("KUBECONFIG", server.kubeconfig())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start hermes kube controller")
}

fn wait_for_holder(server: &ApiServer, replicas: &mut [(&str, Child)], want: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let holder = lease_holder(server);
        if want.contains(&holder.as_str()) {
            return holder;
        }
        for (name, child) in replicas.iter_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("replica {name} exited early: {status}");
            }
        }
        assert!(
            Instant::now() < deadline,
            "no replica of {want:?} took the lease within 30 s (holder {holder:?})"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn signal(child: &Child, signal: &str) {
    let _ = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status();
}

#[test]
fn kube_controller_replicas_fail_over_on_kill_and_release_the_lease_on_sigterm() {
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

    let data = [
        tempfile::tempdir().expect("data dir"),
        tempfile::tempdir().expect("data dir"),
    ];
    let mut replicas = vec![
        (
            "replica-a",
            start_replica(&server, "replica-a", data[0].path()),
        ),
        (
            "replica-b",
            start_replica(&server, "replica-b", data[1].path()),
        ),
    ];
    let leader = wait_for_holder(&server, &mut replicas, &["replica-a", "replica-b"]);
    let index = replicas
        .iter()
        .position(|(n, _)| *n == leader)
        .expect("leader");
    let (_, mut killed) = replicas.remove(index);
    let killed_at = Instant::now();
    signal(&killed, "-KILL");
    let _ = killed.wait();
    let survivor = replicas[0].0;
    wait_for_holder(&server, &mut replicas, &[survivor]);
    let takeover = killed_at.elapsed();
    eprintln!("replica {survivor} took over {takeover:?} after {leader} was killed (lease 4 s)");
    assert!(takeover < Duration::from_secs(15), "{takeover:?}");

    let (_, mut child) = replicas.remove(0);
    let stopped_at = Instant::now();
    signal(&child, "-TERM");
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
