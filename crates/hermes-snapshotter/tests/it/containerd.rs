//! With the real containerd (Debian's package): the snapshotter as a proxy plugin, driven by `ctr`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hermes_snapshotter::{Kind, NoRemoteLayers};

use crate::support::Served;

/// A containerd with a temp root, state and socket, using our socket as `proxy_plugins.hermes`.
/// Killed on drop.
struct Containerd {
    child: Child,
    address: PathBuf,
    log: PathBuf,
}

impl Containerd {
    fn start(dir: &Path, snapshotter_socket: &Path) -> Self {
        for bin in ["containerd", "ctr"] {
            let found = Command::new(bin).arg("--version").output().is_ok();
            assert!(found, "`{bin}` not found: apt-get install containerd");
        }
        let address = dir.join("containerd.sock");
        let config = dir.join("config.toml");
        let d = dir.display();
        std::fs::write(
            &config,
            format!(
                r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{addr}"
[ttrpc]
  address = "{addr}.ttrpc"
[debug]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[proxy_plugins.hermes]
  type = "snapshot"
  address = "{snap}"
"#,
                addr = address.display(),
                snap = snapshotter_socket.display()
            ),
        )
        .expect("write containerd config");
        let log = dir.join("containerd.log");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("create containerd log"))
            .spawn()
            .expect("start containerd");
        let c = Containerd {
            child,
            address,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while c.ctr(&["version"]).is_err() {
            assert!(
                Instant::now() < deadline,
                "containerd did not answer within 30 s; log:\n{}",
                c.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        c
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `ctr --address SOCK ARGS…`; stdout on success, stderr otherwise.
    fn ctr(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("ctr")
            .arg("--address")
            .arg(&self.address)
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    fn snapshots(&self, args: &[&str]) -> String {
        let mut all = vec!["snapshots", "--snapshotter", "hermes"];
        all.extend_from_slice(args);
        self.ctr(&all).unwrap_or_else(|e| {
            panic!(
                "ctr {all:?} failed: {e}\ncontainerd log:\n{}",
                self.log_text()
            )
        })
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctr_prepares_commits_and_lists_through_the_proxy_plugin() {
    let served = Served::start(Arc::new(NoRemoteLayers)).await;
    let socket = served.socket();
    let dir = tempfile::tempdir().expect("temp dir");
    let dir_path = dir.path().to_owned();
    let core = Arc::clone(&served.core);
    // containerd and ctr are blocking processes; the server keeps running on the runtime.
    tokio::task::spawn_blocking(move || {
        let c = Containerd::start(&dir_path, &socket);
        c.snapshots(&["prepare", "base-key"]);
        c.snapshots(&["commit", "base", "base-key"]);
        c.snapshots(&["prepare", "rootfs", "base"]);
        let ls = c.snapshots(&["ls"]);
        let rows: Vec<Vec<&str>> = ls
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().collect())
            .collect();
        let row = |name: &str| rows.iter().find(|r| r.first() == Some(&name)).cloned();
        assert_eq!(row("base"), Some(vec!["base", "Committed"]), "ls:\n{ls}");
        assert_eq!(
            row("rootfs"),
            Some(vec!["rootfs", "base", "Active"]),
            "ls:\n{ls}"
        );

        // containerd asked our snapshotter: the backend keys carry its namespace prefix.
        let ours = core.walk(&[]).expect("walk");
        let active: Vec<_> = ours.iter().filter(|i| i.kind == Kind::Active).collect();
        assert_eq!(active.len(), 1, "{ours:?}");
        assert!(active[0].name.starts_with("default/"), "{ours:?}");
        let mounts = c.snapshots(&["mounts", "/tmp/target", "rootfs"]);
        assert!(mounts.contains("lowerdir="), "mounts: {mounts}");
        assert!(
            mounts.contains(&core.root().display().to_string()),
            "mounts: {mounts}"
        );
    })
    .await
    .expect("containerd test thread");
}
