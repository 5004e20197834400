//! A real kube-apiserver v1.20 (with etcd) on loopback in a temp dir, started through the
//! project's `scripts/kube-apiserver.sh run` (which builds the binaries once and caches them).
//! Killed with its etcd and the temp dir removed on `Drop`; the script also exits by itself when
//! the test process is gone.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{await_condition, conditions};

/// How long the first start may take: it builds kube-apiserver from source (5-8 minutes on two
/// idle cores, more under load).
const FIRST_START_TIMEOUT: Duration = Duration::from_secs(30 * 60);

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("the crate lives in crates/hermes-kube")
        .to_path_buf()
}

/// The script's bin directory (building kube-apiserver and kubectl on first use).
pub fn bin_dir() -> PathBuf {
    let out = Command::new("bash")
        .arg(repo_root().join("scripts/kube-apiserver.sh"))
        .arg("build")
        .stderr(Stdio::inherit())
        .output()
        .expect("run bash scripts/kube-apiserver.sh build");
    assert!(
        out.status.success(),
        "scripts/kube-apiserver.sh build failed; run it by hand (as root, it installs golang-1.19-go, etcd-server and friends with apt) to see why"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    PathBuf::from(text.lines().last().unwrap_or_default().trim())
}

pub fn kubectl() -> PathBuf {
    bin_dir().join("kubectl")
}

#[derive(Debug)]
pub struct ApiServer {
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl ApiServer {
    pub fn start() -> ApiServer {
        let dir = tempfile::Builder::new()
            .prefix("hermes-kube-apiserver-")
            .tempdir()
            .expect("temp dir");
        let mut child = Command::new("bash")
            .arg(repo_root().join("scripts/kube-apiserver.sh"))
            .arg("run")
            .arg(dir.path())
            .arg("--parent-pid")
            .arg(std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .spawn()
            .expect("spawn bash scripts/kube-apiserver.sh run");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let server = ApiServer {
            child: Some(child),
            dir,
        };
        let deadline = Instant::now() + FIRST_START_TIMEOUT;
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) if line.trim() == "ready" => break,
                Ok(_) => {}
                Err(_) => panic!(
                    "kube-apiserver did not start (see the script's messages above; logs in {}). \
                     Prerequisites: run `bash scripts/kube-apiserver.sh deps` as root",
                    server.dir.path().display()
                ),
            }
        }
        server
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// A client with the admin's rights (`system:masters`).
    pub async fn client(&self) -> kube::Client {
        client_from(&self.kubeconfig(), None).await
    }

    /// `kubectl ARGS` against this server; (success, stdout + stderr).
    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> (bool, String) {
        let mut cmd = Command::new(kubectl());
        cmd.arg("--kubeconfig")
            .arg(self.kubeconfig())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            });
        let mut child = cmd.spawn().expect("spawn kubectl");
        if let Some(text) = stdin {
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(text.as_bytes())
                .expect("write kubectl stdin");
        }
        let out = child.wait_with_output().expect("kubectl");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// Install the Hermes CRDs and wait until both are Established.
    pub async fn install_crds(&self, client: &kube::Client) {
        let api: Api<CustomResourceDefinition> = Api::all(client.clone());
        for crd in hermes_kube::crd::crds() {
            let name = crd.metadata.name.clone().expect("crd name");
            api.create(&PostParams::default(), &crd)
                .await
                .unwrap_or_else(|e| panic!("create CRD {name}: {e}"));
            tokio::time::timeout(
                Duration::from_secs(30),
                await_condition(api.clone(), &name, conditions::is_crd_established()),
            )
            .await
            .unwrap_or_else(|_| panic!("CRD {name} not Established within 30 s"))
            .expect("watch CRD");
        }
    }
}

/// A client from a kubeconfig, optionally impersonating `user` (the admin may).
pub async fn client_from(kubeconfig: &Path, user: Option<&str>) -> kube::Client {
    let kubeconfig = Kubeconfig::read_from(kubeconfig).expect("read kubeconfig");
    let mut config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .expect("kubeconfig");
    config.auth_info.impersonate = user.map(str::to_owned);
    kube::Client::try_from(config).expect("client")
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // TERM lets the script stop kube-apiserver and etcd; KILL the group if it hangs.
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", child.id())])
            .status();
        let _ = child.wait();
    }
}

use std::os::unix::process::CommandExt as _;
