//! The node daemon's [`RemoteLayers`]: finds a layer's zTOC through [`IndexSources`], mounts the
//! layer lazily in a process of its own (`hermes layer serve`, see [`crate::layer_server`]),
//! adopts or re-mounts those processes after a daemon restart, and stops them when containerd
//! removes the last snapshot of a layer.
//!
//! Layout under `dir` (one directory per layer digest): `<hex>/ztoc`, `<hex>/cache/` (span cache),
//! `<hex>/mnt/` (the mountpoint recorded in snapshot metadata, so it must never move),
//! `<hex>/state.json` (serving pid, image), `<hex>/stats.json` (written by the server),
//! `<hex>/serve.log`.

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hermes_node_api::{LayerMode, PodRef};
use hermes_oci::{Credential, Digest, PullCredentials, Reference, encode_handoff};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::cri_proxy::PullLog;
use crate::layer_server::{LayerStats, write_atomic};
use crate::pulls::PullTracker;
use crate::remote::{RemoteError, RemoteLayer, RemoteLayers};
use crate::sources::{Answer, IndexSources};
use crate::{Error, Result, Snapshots};
use hermes_node_api::NodeMode;

/// How long a lazy mount's steps took before its server started (logged with the mount).
#[derive(Debug, Clone, Copy)]
struct MountTimings {
    /// Finding and verifying the zTOC.
    find: Duration,
    /// Linking it into the layer's directory, writing the prefetch profile.
    prepare: Duration,
    ztoc_bytes: usize,
}

/// Why a layer was not mounted lazily (a bounded metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    /// No source has a zTOC for the layer.
    NoIndex,
    /// Every index source failed.
    SourceFailed,
    /// The span cache budget is used up.
    CacheFull,
    /// The lazy mount failed or timed out.
    MountFailed,
    /// The controller refused: an `Off` policy covers the image.
    Disabled,
}

impl Miss {
    /// Every reason.
    pub const ALL: [Miss; 5] = [
        Miss::NoIndex,
        Miss::SourceFailed,
        Miss::CacheFull,
        Miss::MountFailed,
        Miss::Disabled,
    ];

    /// Metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Miss::NoIndex => "no_index",
            Miss::SourceFailed => "source_failed",
            Miss::CacheFull => "cache_full",
            Miss::MountFailed => "mount_failed",
            Miss::Disabled => "disabled",
        }
    }
}

/// How to start a layer server: the program and the arguments before the per-layer ones.
#[derive(Debug, Clone)]
pub struct ServerCommand {
    /// The `hermes` executable.
    pub program: PathBuf,
    /// e.g. `layer serve --plain-http`.
    pub args: Vec<OsString>,
}

/// A layer server's stdin, for credential updates.
#[derive(Debug)]
struct CredentialFeed {
    image: Reference,
    stdin: std::process::ChildStdin,
    sent: Option<Credential>,
}

/// One line on a layer server's stdin: the credential, or `{}` for none.
fn write_credential(
    stdin: &mut std::process::ChildStdin,
    credential: Option<&Credential>,
) -> std::io::Result<()> {
    let mut line = credential
        .map(encode_handoff)
        .unwrap_or_else(|| b"{}".to_vec());
    line.push(b'\n');
    stdin.write_all(&line)?;
    stdin.flush()
}

/// Node daemon settings for lazy layers.
#[derive(Debug, Clone)]
pub struct NodeLayersOptions {
    /// Layers directory.
    pub dir: PathBuf,
    /// How layer servers are started.
    pub server: ServerCommand,
    /// Fetch the rest of each layer in the background.
    pub background: bool,
    /// How long a mount may take.
    pub mount_timeout: Duration,
    /// Budget of uncompressed layer bytes in span caches; 0: none.
    pub cache_size: u64,
    /// Record startup traces for this long after each mount (and send them to the controller).
    pub trace_window: Option<Duration>,
    /// Prefetch the controller's startup profile of each layer when mounting it.
    pub replay: bool,
    /// How long a layer served `Eager` may take to be fully local before the container starts
    /// on it lazily.
    pub eager_timeout: Duration,
    /// Pods' registry credentials by repository (from the CRI proxy): a layer server of an
    /// image with one gets it on its stdin.
    pub pull_credentials: PullCredentials,
    /// The pulls the CRI proxy saw: the pod a miss or a pull report names, when known.
    pub pull_log: PullLog,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ServedLayer {
    layer: String,
    image: String,
    pid: u32,
    uncompressed_size: u64,
    /// The policy's mode for the layer (kept so a re-mount after a restart keeps it).
    #[serde(default)]
    mode: String,
    #[serde(default)]
    fully_local_within_secs: Option<u64>,
}

/// What restart recovery did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Layers whose server was still running and mounted.
    pub adopted: usize,
    /// Layers mounted again.
    pub remounted: usize,
    /// Layers that could not be mounted again (their snapshots' reads fail).
    pub failed: usize,
}

/// Lazy layers of a node.
#[derive(Debug)]
pub struct NodeLayers {
    sources: IndexSources,
    opts: NodeLayersOptions,
    mounting: Mutex<()>,
    /// The stdin of each layer server this daemon started, with its image and the credential
    /// last written: [`Self::refresh_credentials`] writes the pods' newest one.
    feeds: Mutex<Vec<CredentialFeed>>,
    misses: [AtomicU64; Miss::ALL.len()],
    mounts: AtomicU64,
    /// How each pull's layers were provided, until reported.
    pulls: PullTracker,
}

impl NodeLayers {
    /// Lazy layers found through `sources`.
    pub fn new(sources: IndexSources, opts: NodeLayersOptions) -> Self {
        let tracing = opts.trace_window.is_some();
        Self {
            sources,
            opts,
            mounting: Mutex::new(()),
            feeds: Mutex::new(Vec::new()),
            misses: Default::default(),
            mounts: AtomicU64::new(0),
            pulls: PullTracker::new(tracing),
        }
    }

    /// The index sources.
    pub fn sources(&self) -> &IndexSources {
        &self.sources
    }

    /// Layers not mounted lazily, by reason, since start.
    pub fn miss_count(&self, miss: Miss) -> u64 {
        self.misses[miss as usize].load(Ordering::Relaxed)
    }

    /// Lazy mounts made since start (restart re-mounts included).
    pub fn mount_count(&self) -> u64 {
        self.mounts.load(Ordering::Relaxed)
    }

    /// Writes each running layer server the newest credential of its image's repository, if
    /// it changed (a pod's rotated secret came with a pull); forgets servers that exited.
    /// Servers adopted after a daemon restart have no feed: they keep what they were given.
    pub fn refresh_credentials(&self) {
        let Ok(mut feeds) = self.feeds.lock() else {
            return;
        };
        feeds.retain_mut(|feed| {
            let now = self.opts.pull_credentials.for_image(&feed.image);
            if now.is_none() || now == feed.sent {
                return true;
            }
            let alive = write_credential(&mut feed.stdin, now.as_ref()).is_ok();
            feed.sent = now;
            alive
        });
    }

    fn miss(&self, miss: Miss) {
        self.misses[miss as usize].fetch_add(1, Ordering::Relaxed);
    }

    fn layer_dir(&self, hex: &str) -> PathBuf {
        self.opts.dir.join(hex)
    }

    /// The stats of every served layer.
    pub fn stats(&self) -> Vec<LayerStats> {
        let Ok(entries) = std::fs::read_dir(&self.opts.dir) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| LayerStats::load(&e.ok()?.path().join("stats.json")))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.mounting
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The pod the layer's image was pulled for, if the CRI proxy saw the pull.
    fn pod_of(&self, layer: &RemoteLayer) -> Option<PodRef> {
        self.opts.pull_log.pod_for(layer.image_ref.as_deref()?)
    }

    /// Mounts `layer` unless it is served already. `Ok(None)`: no zTOC, or no room. Unless the
    /// layer is served, `why` says how it is provided instead and why.
    fn ensure(
        &self,
        layer: &RemoteLayer,
        why: &mut Option<(LayerMode, String)>,
    ) -> Result<Option<PathBuf>> {
        let fallback = |reason: &str| Some((LayerMode::Fallback, reason.to_owned()));
        let digest = Digest::parse(&layer.layer_digest)?;
        let dir = self.layer_dir(digest.hex());
        let mnt = dir.join("mnt");
        if served(&dir, &mnt).is_some() {
            return Ok(Some(mnt));
        }
        let Some(image) = &layer.image_ref else {
            self.miss(Miss::NoIndex);
            *why = fallback("containerd named no image for the layer");
            return Ok(None);
        };
        let pod = self.pod_of(layer);
        let started = Instant::now();
        let found = match self.sources.find(layer, pod.as_ref()) {
            Ok(Answer::Ztoc(found)) => found,
            Ok(Answer::NotIndexed) => {
                self.miss(Miss::NoIndex);
                self.sources.report_miss(layer, pod);
                *why = fallback("no zTOC for the layer");
                return Ok(None);
            }
            // Switched off on purpose: no miss to report.
            Ok(Answer::Disabled(reason)) => {
                self.miss(Miss::Disabled);
                *why = Some((LayerMode::Normal, format!("lazy starts are off: {reason}")));
                return Ok(None);
            }
            Err(e) => {
                self.miss(Miss::SourceFailed);
                self.sources.report_miss(layer, pod);
                *why = fallback(&format!(
                    "no index source answered: {}",
                    hermes_node_api::error_chain(&e)
                ));
                return Err(e);
            }
        };
        let found_at = started.elapsed();
        // The sources validated the zTOC when it was stored and verified its digest now; the
        // layer server parses it again when it opens it. Only its size is needed here.
        let size = hermes_ztoc::Ztoc::peek_uncompressed_size(&found.bytes).map_err(|source| {
            Error::Ztoc {
                layer: digest.to_string(),
                source,
            }
        })?;
        if self.opts.cache_size > 0 {
            let used: u64 = self
                .served_layers()
                .iter()
                .map(|s| s.uncompressed_size)
                .sum();
            if used + size > self.opts.cache_size {
                warn!(layer = %digest, used, size, budget = self.opts.cache_size,
                    "span cache budget used up; the layer is pulled normally");
                self.miss(Miss::CacheFull);
                *why = fallback("the span cache budget is used up");
                return Ok(None);
            }
        }
        std::fs::create_dir_all(&mnt).map_err(Error::io("create mountpoint", &mnt))?;
        let ztoc_path = dir.join("ztoc");
        // A hard link to the stored blob (no copy of a zTOC of tens of MB on the start's path);
        // a copy if the store is on another filesystem.
        if let Err(e) = self.sources.store().link_blob(&found.digest, &ztoc_path) {
            tracing::debug!(error = %e, "zTOC not linked from the store; writing a copy");
            write_atomic(&ztoc_path, &found.bytes).map_err(Error::io("write zTOC", &ztoc_path))?;
        }
        let behaviour = found.behaviour;
        if (self.opts.replay || behaviour.mode == NodeMode::Prefetch)
            && let Some(profile) = self.sources.prefetch_profile(&digest)
        {
            let path = dir.join("prefetch.json");
            write_atomic(&path, &profile).map_err(Error::io("write prefetch profile", &path))?;
        }
        let prepared_at = started.elapsed();
        let timings = MountTimings {
            find: found_at,
            prepare: prepared_at - found_at,
            ztoc_bytes: found.bytes.len(),
        };
        let served = ServedLayer {
            layer: digest.to_string(),
            image: image.clone(),
            pid: 0,
            uncompressed_size: size,
            mode: behaviour.mode.as_str().to_owned(),
            fully_local_within_secs: behaviour.fully_local_within.map(|d| d.as_secs()),
        };
        match self.start_server(&dir, served, Some(timings)) {
            Ok(()) => Ok(Some(mnt)),
            Err(e) => {
                self.miss(Miss::MountFailed);
                *why = fallback(&format!(
                    "the lazy mount failed: {}",
                    hermes_node_api::error_chain(&e)
                ));
                Err(e)
            }
        }
    }

    fn served_layers(&self) -> Vec<ServedLayer> {
        let Ok(entries) = std::fs::read_dir(&self.opts.dir) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| {
                let dir = e.ok()?.path();
                let state = read_state(&dir)?;
                served(&dir, &dir.join("mnt")).map(|_| state)
            })
            .collect()
    }

    /// Starts a layer server for the layer in `dir` and waits until its mount is up.
    /// Starts `served`'s layer server and waits for its mount; `timings` of the steps before it,
    /// for the log (none for a re-mount).
    fn start_server(
        &self,
        dir: &Path,
        mut served: ServedLayer,
        timings: Option<MountTimings>,
    ) -> Result<()> {
        let started = Instant::now();
        let mnt = dir.join("mnt");
        let fail = |message: String| Error::Mount {
            layer: served.layer.clone(),
            message,
        };
        detach_dead_mount(&mnt);
        let log_path = dir.join("serve.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(Error::io("open layer server log", &log_path))?;
        let log_len = log.metadata().map(|m| m.len()).unwrap_or(0);
        let log_err = log
            .try_clone()
            .map_err(Error::io("open layer server log", &log_path))?;
        let mut cmd = Command::new(&self.opts.server.program);
        for (key, value) in crate::layer_server::SERVER_ENV {
            if std::env::var_os(key).is_none() {
                cmd.env(key, value);
            }
        }
        cmd.args(&self.opts.server.args)
            .arg("--ztoc")
            .arg(dir.join("ztoc"))
            .arg("--image")
            .arg(&served.image)
            .arg("--layer")
            .arg(&served.layer)
            .arg("--cache")
            .arg(dir.join("cache"))
            .arg("--stats")
            .arg(dir.join("stats.json"));
        if self.opts.background {
            cmd.arg("--background");
        }
        if let Some(window) = self.opts.trace_window {
            cmd.arg("--trace-window").arg(window.as_secs().to_string());
        }
        let profile = dir.join("prefetch.json");
        if profile.exists() {
            cmd.arg("--prefetch").arg(profile);
        }
        if !served.mode.is_empty() {
            cmd.arg("--mode").arg(&served.mode);
        }
        if let Some(secs) = served.fully_local_within_secs {
            cmd.arg("--fully-local-within").arg(secs.to_string());
        }
        let image = Reference::parse(&served.image).ok();
        let credential = image
            .as_ref()
            .and_then(|r| self.opts.pull_credentials.for_image(r));
        cmd.arg("--credential-stdin")
            .arg(&mnt)
            .stdin(Stdio::piped())
            .stdout(log)
            .stderr(log_err)
            // Its own process group: signals to the daemon's group do not reach it, and it
            // outlives the daemon.
            .process_group(0);
        let mut child = cmd.spawn().map_err(|e| {
            fail(format!(
                "cannot start {}: {e}",
                self.opts.server.program.display()
            ))
        })?;
        served.pid = child.id();
        if let Some(mut stdin) = child.stdin.take() {
            // A pipe, not a file or an argument: the secret stays in memory. The server reads
            // the first line before mounting (a failed write shows as a failed mount below),
            // and later lines as the pods' secrets change.
            let _ = write_credential(&mut stdin, credential.as_ref());
            if let Some(image) = image
                && let Ok(mut feeds) = self.feeds.lock()
            {
                feeds.push(CredentialFeed {
                    image,
                    stdin,
                    sent: credential,
                });
            }
        }
        let deadline = Instant::now() + self.opts.mount_timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let tail = log_tail(&log_path, log_len);
                return Err(fail(format!("layer server exited ({status}): {tail}")));
            }
            if is_mounted(&mnt) == Some(true) {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                detach_dead_mount(&mnt);
                return Err(fail(format!(
                    "not mounted within {:?}",
                    self.opts.mount_timeout
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let state = dir.join("state.json");
        write_atomic(&state, &serde_json::to_vec(&served).unwrap_or_default())
            .map_err(Error::io("write layer state", &state))?;
        // Reap the server when it exits while the daemon runs.
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        self.mounts.fetch_add(1, Ordering::Relaxed);
        info!(layer = %served.layer, pid = served.pid, mount = %mnt.display(),
            find_ms = timings.map(|t| t.find.as_millis() as u64),
            prepare_ms = timings.map(|t| t.prepare.as_millis() as u64),
            mount_ms = started.elapsed().as_millis() as u64,
            ztoc_bytes = timings.map(|t| t.ztoc_bytes),
            "lazy layer served");
        Ok(())
    }

    /// For a layer served `Eager`: waits until it is fully local (the container starts on local
    /// data) and says whether it may be used; `false` if it broke. A layer that is not fully
    /// local within [`NodeLayersOptions::eager_timeout`] is used lazily (its fetch goes on at
    /// full speed): a start is never failed for being slow. Other modes return at once.
    fn eager_done(&self, mnt: &Path) -> bool {
        let Some(dir) = mnt.parent() else {
            return true;
        };
        if read_state(dir).is_none_or(|s| s.mode != NodeMode::Eager.as_str()) {
            return true;
        }
        let started = Instant::now();
        loop {
            let stats = LayerStats::load(&dir.join("stats.json"));
            match stats.as_ref().map(|s| s.state.as_str()) {
                Some("fully_local") => {
                    info!(mount = %mnt.display(), seconds = started.elapsed().as_secs_f64(),
                        "eager layer is fully local");
                    return true;
                }
                Some("broken") => {
                    warn!(mount = %mnt.display(), reason = ?stats.and_then(|s| s.broken_reason),
                        "eager layer broke while fetching; pulling it normally");
                    return false;
                }
                _ => {}
            }
            if started.elapsed() > self.opts.eager_timeout {
                warn!(mount = %mnt.display(), timeout = ?self.opts.eager_timeout,
                    "eager layer not fully local in time; starting on it lazily");
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// After a restart: every lazy layer that a snapshot refers to is adopted if its server
    /// still runs, and mounted again (same path) if not.
    pub fn recover(&self, snapshots: &Snapshots) -> Result<Recovery> {
        let _one_at_a_time = self.lock();
        let mut recovery = Recovery::default();
        let mut dirs: Vec<PathBuf> = snapshots
            .remote_dirs()?
            .into_iter()
            .filter_map(|d| Some(d.parent()?.to_owned()))
            .filter(|d| d.starts_with(&self.opts.dir))
            .collect();
        dirs.sort();
        dirs.dedup();
        for dir in dirs {
            let mnt = dir.join("mnt");
            if served(&dir, &mnt).is_some() {
                recovery.adopted += 1;
                continue;
            }
            let outcome = match read_state(&dir) {
                Some(state) => self.start_server(&dir, state, None),
                None => Err(Error::Mount {
                    layer: dir.display().to_string(),
                    message: "no layer state to mount it again from".into(),
                }),
            };
            match outcome {
                Ok(()) => recovery.remounted += 1,
                Err(e) => {
                    warn!(dir = %dir.display(), error = %e, "lazy layer could not be mounted again");
                    recovery.failed += 1;
                }
            }
        }
        info!(
            adopted = recovery.adopted,
            remounted = recovery.remounted,
            failed = recovery.failed,
            "lazy layers recovered"
        );
        Ok(recovery)
    }

    /// Sends every completed startup trace not sent yet to the controller. Returns how many
    /// were sent.
    pub fn report_traces(&self) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.opts.dir) else {
            return 0;
        };
        let mut sent = 0;
        for e in entries.flatten() {
            let dir = e.path();
            let marker = dir.join("trace.sent");
            if marker.exists() {
                continue;
            }
            let Some(stats) = LayerStats::load(&dir.join("stats.json")) else {
                continue;
            };
            if !stats.trace_complete {
                continue;
            }
            if !stats.trace.is_empty() {
                match self.sources.post_trace(&stats.layer, &stats.trace) {
                    Ok(()) => sent += 1,
                    Err(e) => {
                        warn!(layer = %stats.layer, error = %hermes_node_api::error_chain(&e), "startup trace not sent; will retry");
                        continue;
                    }
                }
            }
            let _ = std::fs::write(&marker, b"");
        }
        sent
    }

    /// Sends a report of every pull that is over and whose start's reads are done (see
    /// [`crate::pulls`]), naming this node and, if the CRI proxy saw the pull, the pod; in the
    /// background, best effort. Returns how many were handed to the sender.
    pub fn report_pulls(&self) -> usize {
        let due = self.pulls.take_due(Instant::now(), |layer| {
            LayerStats::load(&self.layer_dir(layer.hex()).join("stats.json"))
        });
        let count = due.len();
        for mut report in due {
            report.node = self.sources.node_name();
            report.pod = self
                .opts
                .pull_log
                .pod_for(&report.image)
                .map(PodRef::bounded);
            info!(
                image = report.image,
                layers = report.layers.len(),
                bytes_fetched = report.bytes_fetched,
                "reporting a pull"
            );
            self.sources.post_pull(report);
        }
        count
    }

    /// Stops the server of the layer mounted at `mnt` and removes its directory.
    fn stop(&self, mnt: &Path) {
        let Some(dir) = mnt.parent().filter(|d| d.starts_with(&self.opts.dir)) else {
            return;
        };
        stop_server(dir);
        if let Err(e) = std::fs::remove_dir_all(dir) {
            warn!(dir = %dir.display(), error = %e, "cannot remove lazy layer dir");
        }
    }

    /// Stops every layer server and unmounts every layer (caches are kept).
    pub fn stop_all(dir: &Path) -> usize {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        let mut stopped = 0;
        for e in entries.flatten() {
            if e.path().join("mnt").exists() {
                stop_server(&e.path());
                stopped += 1;
            }
        }
        stopped
    }
}

impl RemoteLayers for NodeLayers {
    fn prepare(&self, layer: &RemoteLayer) -> Result<Option<PathBuf>, RemoteError> {
        let mut why = None;
        let result = {
            let _one_at_a_time = self.lock();
            self.ensure(layer, &mut why)
        };
        // Outside the lock: other layers mount meanwhile.
        let result = match result {
            Ok(Some(mnt)) if !self.eager_done(&mnt) => {
                // Broken while fetching: this layer is pulled normally.
                let _one_at_a_time = self.lock();
                self.stop(&mnt);
                self.miss(Miss::MountFailed);
                why = Some((
                    LayerMode::Fallback,
                    "the layer broke while its Eager fetch ran".to_owned(),
                ));
                Ok(None)
            }
            other => other,
        };
        let (mode, reason) = match (&result, why) {
            (Ok(Some(_)), _) => (LayerMode::Lazy, None),
            (_, Some((mode, reason))) => (mode, Some(reason)),
            (Err(e), None) => (
                LayerMode::Fallback,
                Some(format!(
                    "the lazy layer failed: {}",
                    hermes_node_api::error_chain(e)
                )),
            ),
            (Ok(None), None) => (LayerMode::Fallback, Some("not available lazily".into())),
        };
        self.pulls.record(layer, mode, reason, Instant::now());
        Ok(result?)
    }

    fn release(&self, dir: &Path) {
        let _one_at_a_time = self.lock();
        self.stop(dir);
    }
}

fn read_state(dir: &Path) -> Option<ServedLayer> {
    serde_json::from_slice(&std::fs::read(dir.join("state.json")).ok()?).ok()
}

/// The layer's server pid if it runs and its mount is up.
fn served(dir: &Path, mnt: &Path) -> Option<u32> {
    let state = read_state(dir)?;
    (process_alive(state.pid) && is_mounted(mnt) == Some(true)).then_some(state.pid)
}

fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // Field 3, after the parenthesised command name, is the state; Z is a zombie.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// `Some(true)`: a live filesystem is mounted at `mnt`; `Some(false)`: a plain directory;
/// `None`: a dead mount (its server is gone: the kernel answers `ENOTCONN`, though `stat` may
/// still succeed from cached attributes) or no such directory.
fn is_mounted(mnt: &Path) -> Option<bool> {
    let here = std::fs::metadata(mnt).ok()?;
    let parent = std::fs::metadata(mnt.parent()?).ok()?;
    if here.dev() == parent.dev() {
        return Some(false);
    }
    rustix::fs::statfs(mnt).ok().map(|_| true)
}

/// A mount whose server died answers ENOTCONN: detach it so the directory can be used again.
fn detach_dead_mount(mnt: &Path) {
    if is_mounted(mnt).is_none() && mnt.parent().is_some_and(Path::exists) {
        let _ = Command::new("umount").arg("-l").arg(mnt).status();
    }
}

/// SIGTERM to the layer server, wait for its mount to go, detach it if it does not.
fn stop_server(dir: &Path) {
    let mnt = dir.join("mnt");
    if let Some(state) = read_state(dir)
        && process_alive(state.pid)
    {
        signal(state.pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while process_alive(state.pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if process_alive(state.pid) {
            signal(state.pid, rustix::process::Signal::KILL);
        }
    }
    if is_mounted(&mnt) != Some(false) {
        let _ = Command::new("umount").arg("-l").arg(&mnt).status();
    }
}

fn signal(pid: u32, sig: rustix::process::Signal) {
    if let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

fn log_tail(path: &Path, from: u64) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let start = usize::try_from(from).unwrap_or(0).min(text.len());
    let tail = String::from_utf8_lossy(&text[start..]);
    let tail = tail.trim();
    let n = tail.len().saturating_sub(600);
    let cut = (n..=tail.len())
        .find(|&i| tail.is_char_boundary(i))
        .unwrap_or(tail.len());
    tail[cut..].to_owned()
}
