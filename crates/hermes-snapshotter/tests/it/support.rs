//! Test harness: temp roots, a served snapshotter with a connected client, real mounts
//! unmounted on drop, and `RemoteLayers` test doubles.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use hermes_snapshotter::api::containerd::services::snapshots::v1::snapshots_client::SnapshotsClient;
use hermes_snapshotter::api::containerd::types::Mount;
use hermes_snapshotter::{RemoteError, RemoteLayer, RemoteLayers, ServerHandle, Snapshots, serve};
use tempfile::TempDir;
use tonic::transport::Channel;

/// Fails the test unless we run as root with overlayfs available (mounts are real).
pub fn require_root_and_overlay() {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("?");
    assert_eq!(uid, "0", "these tests mount overlayfs: run them as root");
    let fss = std::fs::read_to_string("/proc/filesystems").expect("read /proc/filesystems");
    assert!(
        fss.lines().any(|l| l.trim_end().ends_with("overlay")),
        "overlayfs is not available: `modprobe overlay` (or use a kernel with overlayfs)"
    );
}

/// A remote source that records what it was asked and answers with `answer`.
#[derive(Debug)]
pub struct Double {
    pub answer: Answer,
    pub asked: Mutex<Vec<RemoteLayer>>,
}

/// What a [`Double`] answers.
#[derive(Debug, Clone)]
pub enum Answer {
    Dir(PathBuf),
    Nothing,
    Fail,
    Panic,
}

impl Double {
    pub fn new(answer: Answer) -> Arc<Self> {
        Arc::new(Double {
            answer,
            asked: Mutex::new(Vec::new()),
        })
    }

    pub fn asked(&self) -> Vec<RemoteLayer> {
        self.asked.lock().unwrap().clone()
    }
}

impl RemoteLayers for Double {
    fn prepare(&self, layer: &RemoteLayer) -> Result<Option<PathBuf>, RemoteError> {
        self.asked.lock().unwrap().push(layer.clone());
        match &self.answer {
            Answer::Dir(d) => Ok(Some(d.clone())),
            Answer::Nothing => Ok(None),
            Answer::Fail => Err("index source unreachable".into()),
            Answer::Panic => panic!("test double panics on purpose"),
        }
    }
}

/// A snapshotter core in a temp root.
pub fn core(remote: Arc<dyn RemoteLayers>) -> (TempDir, Arc<Snapshots>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let core = Snapshots::open(dir.path().join("root"), remote).expect("open snapshotter");
    (dir, Arc::new(core))
}

/// A served snapshotter and a client connected over its unix socket.
pub struct Served {
    pub dir: TempDir,
    pub core: Arc<Snapshots>,
    pub server: Option<ServerHandle>,
    pub client: SnapshotsClient<Channel>,
}

impl Served {
    pub async fn start(remote: Arc<dyn RemoteLayers>) -> Self {
        let (dir, core) = core(remote);
        let socket = dir.path().join("run/snapshotter.sock");
        let server = serve(&socket, Arc::clone(&core)).await.expect("serve");
        let client = connect(&socket).await;
        Served {
            dir,
            core,
            server: Some(server),
            client,
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("run/snapshotter.sock")
    }
}

/// A snapshots client over a unix socket.
pub async fn connect(socket: &Path) -> SnapshotsClient<Channel> {
    try_connect(socket)
        .await
        .expect("connect to snapshotter socket")
}

pub use hermes_snapshotter::connect as try_connect;

pub fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A real mount of containerd `Mount`s at a temp target; unmounted on drop.
pub struct Mounted {
    target: PathBuf,
    _dir: TempDir,
}

impl Mounted {
    pub fn new(mounts: &[Mount]) -> Self {
        assert_eq!(mounts.len(), 1, "expected one mount, got {mounts:?}");
        let m = &mounts[0];
        let dir = tempfile::tempdir().expect("temp dir");
        let target = dir.path().join("rootfs");
        std::fs::create_dir(&target).expect("create mount target");
        let mut cmd = Command::new("mount");
        if m.r#type != "bind" {
            cmd.args(["-t", &m.r#type]);
        }
        cmd.args(["-o", &m.options.join(",")])
            .arg(&m.source)
            .arg(&target);
        let out = cmd.output().expect("run mount(8): install util-linux");
        assert!(
            out.status.success(),
            "mount {m:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Mounted { target, _dir: dir }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.target.join(rel)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-R").arg(&self.target).status();
    }
}
