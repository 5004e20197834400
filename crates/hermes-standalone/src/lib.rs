//! The standalone adapter (no Kubernetes): policies from a directory of `HermesPolicy` YAML,
//! running containers from a local containerd, artifacts and reports under a data directory,
//! and the node API on a TCP listener — the [`Engine`] in between.
//!
//! - [`PolicyDir`] rereads the directory when a file is added, removed or changed (polled:
//!   names, sizes and modification times). Each `*.yaml`/`*.yml` file may hold several
//!   documents; a file that does not parse or validate contributes no policy and is reported
//!   (`Valid=False` with the reason, on `GET /v1/policies` and in the log) while the other
//!   files keep working.
//! - [`ContainerSource`] is the one thing the loop needs from a runtime;
//!   [`ContainerdSource`] lists running tasks of chosen containerd namespaces (all by default).
//!   A container's namespace is its pod's (`io.kubernetes.pod.namespace` label, set by CRI) or
//!   else its containerd namespace; its pod is `io.kubernetes.pod.name` or else its ID; its
//!   labels are its pod labels; the namespace's only label is `kubernetes.io/metadata.name`.
//!
//! Data directory: `store/` (the artifact store) and `status/images/` (image reports).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use hermes_containerd::Containerd;
use hermes_oci::{Reference, Store};
use tokio::sync::mpsc;
use tracing::{info, warn};

use hermes_controller::PolicyError;
use hermes_controller::api::NodeApi;
use hermes_controller::builder::Builder;
use hermes_controller::engine::{Engine, EngineOptions};
use hermes_controller::matcher::RunningContainer;
use hermes_controller::policy::{DEFAULT_SPAN_SIZE, Policy, parse_policies};
use hermes_controller::reconcile::PolicyStatus;
use hermes_controller::server::NodeApiServer;
use hermes_controller::status::ReportBook;
use hermes_controller::{Error, Result};

/// Label CRI puts on containers with their pod's name.
pub const POD_NAME_LABEL: &str = "io.kubernetes.pod.name";
/// Label CRI puts on containers with their pod's namespace.
pub const POD_NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
/// The label every Kubernetes namespace carries with its name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Valid policies and the statuses of invalid ones, from named YAML texts (file name, text),
/// in the order given. Pure.
pub fn load_policy_texts(files: &[(String, String)]) -> (Vec<Policy>, Vec<PolicyStatus>) {
    let mut valid: Vec<Policy> = Vec::new();
    let mut invalid = Vec::new();
    let mut names = BTreeSet::new();
    for (file, text) in files {
        match parse_policies(text, file) {
            Ok(policies) => {
                for policy in policies {
                    if names.insert(policy.name.clone()) {
                        valid.push(policy);
                    } else {
                        let error = PolicyError::DuplicatePolicy {
                            policy: policy.name.clone(),
                        };
                        invalid.push(PolicyStatus::invalid(&policy.name, &error));
                    }
                }
            }
            Err(error) => {
                let name = match &error {
                    PolicyError::InvalidPolicy { policy, .. }
                    | PolicyError::DuplicatePolicy { policy } => policy.clone(),
                    _ => file.clone(),
                };
                invalid.push(PolicyStatus::invalid(&name, &error));
            }
        }
    }
    (valid, invalid)
}

/// A directory of policy files, reread when it changes (see the module docs).
#[derive(Debug)]
pub struct PolicyDir {
    dir: PathBuf,
    seen: Option<BTreeMap<String, (SystemTime, u64)>>,
    valid: Vec<Policy>,
    invalid: Vec<PolicyStatus>,
}

impl PolicyDir {
    /// The policies in `dir` (read on the first [`PolicyDir::poll`]).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            seen: None,
            valid: Vec::new(),
            invalid: Vec::new(),
        }
    }

    fn policy_files(&self) -> Result<BTreeMap<String, (SystemTime, u64)>> {
        let io = |action| {
            let path = self.dir.display().to_string();
            move |source| Error::Io {
                action,
                path,
                source,
            }
        };
        let mut files = BTreeMap::new();
        for entry in fs::read_dir(&self.dir).map_err(io("list policies in"))? {
            let entry = entry.map_err(io("list policies in"))?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if name.starts_with('.') || !(name.ends_with(".yaml") || name.ends_with(".yml")) {
                continue;
            }
            // Follows symlinks (a mounted ConfigMap's files are symlinks).
            let Ok(meta) = fs::metadata(entry.path()) else {
                continue;
            };
            if meta.is_file() {
                let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                files.insert(name, (modified, meta.len()));
            }
        }
        Ok(files)
    }

    /// Reread the directory if a policy file was added, removed or changed since the last
    /// call (always on the first). Returns whether it was reread.
    pub fn poll(&mut self) -> Result<bool> {
        let files = self.policy_files()?;
        if self.seen.as_ref() == Some(&files) {
            return Ok(false);
        }
        let mut texts = Vec::with_capacity(files.len());
        for name in files.keys() {
            let path = self.dir.join(name);
            match fs::read_to_string(&path) {
                Ok(text) => texts.push((name.clone(), text)),
                // Removed since listed: the next poll sees it gone.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(Error::Io {
                        action: "read policy file",
                        path: path.display().to_string(),
                        source,
                    });
                }
            }
        }
        let (valid, invalid) = load_policy_texts(&texts);
        for status in &invalid {
            let message = status.conditions.first().map_or("", |c| c.message.as_str());
            warn!(policy = status.name, reason = message, "policy rejected");
        }
        info!(
            dir = %self.dir.display(),
            valid = valid.len(),
            invalid = invalid.len(),
            "policies loaded"
        );
        self.valid = valid;
        self.invalid = invalid;
        self.seen = Some(files);
        Ok(true)
    }

    /// Valid policies.
    pub fn valid(&self) -> &[Policy] {
        &self.valid
    }

    /// Statuses of the policies that were rejected.
    pub fn invalid(&self) -> &[PolicyStatus] {
        &self.invalid
    }
}

/// Error of a [`ContainerSource`].
pub type SourceError = Box<dyn std::error::Error + Send + Sync>;

/// Where the standalone controller learns which containers run.
pub trait ContainerSource: Send {
    /// The containers running now.
    fn running(
        &mut self,
    ) -> impl Future<Output = std::result::Result<Vec<RunningContainer>, SourceError>> + Send;
}

/// Running containers of a local containerd.
#[derive(Debug)]
pub struct ContainerdSource {
    socket: PathBuf,
    namespaces: Vec<String>,
    connection: Option<Containerd>,
}

impl ContainerdSource {
    /// Containers of `namespaces` (every namespace when empty) of the containerd at `socket`.
    /// Connects on first use and again after an error.
    pub fn new(socket: impl Into<PathBuf>, namespaces: Vec<String>) -> Self {
        Self {
            socket: socket.into(),
            namespaces,
            connection: None,
        }
    }

    async fn list(&mut self) -> std::result::Result<Vec<RunningContainer>, SourceError> {
        let connection = match &self.connection {
            Some(c) => c.clone(),
            None => {
                let c = Containerd::connect(&self.socket, "default").await?;
                self.connection = Some(c.clone());
                c
            }
        };
        let namespaces = if self.namespaces.is_empty() {
            connection.list_namespaces().await?
        } else {
            self.namespaces.clone()
        };
        let mut out = Vec::new();
        for namespace in namespaces {
            let listed = connection
                .in_namespace(&namespace)?
                .list_running_containers()
                .await?;
            out.extend(listed.into_iter().filter_map(|c| container(&namespace, c)));
        }
        Ok(out)
    }
}

impl ContainerSource for ContainerdSource {
    async fn running(&mut self) -> std::result::Result<Vec<RunningContainer>, SourceError> {
        let listed = self.list().await;
        if listed.is_err() {
            self.connection = None;
        }
        listed
    }
}

/// A containerd container as the matcher sees it; `None` without a usable image.
fn container(namespace: &str, c: hermes_containerd::RunningContainer) -> Option<RunningContainer> {
    let image = Reference::parse(&c.image_name).ok()?;
    let digest = c
        .target_digest
        .as_deref()
        .and_then(|d| hermes_oci::Digest::parse(d).ok());
    let pod_namespace = c
        .labels
        .get(POD_NAMESPACE_LABEL)
        .cloned()
        .unwrap_or_else(|| namespace.to_owned());
    let pod = c.labels.get(POD_NAME_LABEL).cloned().unwrap_or(c.id);
    Some(RunningContainer {
        namespace_labels: [(NAMESPACE_NAME_LABEL.to_owned(), pod_namespace.clone())].into(),
        namespace: pod_namespace,
        pod,
        pod_labels: c.labels.into_iter().collect(),
        image,
        digest,
    })
}

/// What the standalone controller needs.
#[derive(Debug)]
pub struct Config {
    /// The policy directory.
    pub policies: PathBuf,
    /// The data directory (`store/`, `status/`).
    pub data: PathBuf,
    /// The node API's socket, token and TLS.
    pub server: NodeApiServer,
    /// The containerd socket whose running containers are watched.
    pub containerd: PathBuf,
    /// containerd namespaces to watch (every namespace when empty).
    pub namespaces: Vec<String>,
    /// Registry client for resolving and building.
    pub client: hermes_oci::Client,
    /// Platform images are indexed for.
    pub platform: hermes_oci::manifest::Platform,
    /// Build tool identifier in zTOCs and SOCI indexes.
    pub build_tool_identifier: String,
    /// Timing and limits.
    pub engine: EngineOptions,
    /// How often policies and containers are polled.
    pub poll_interval: Duration,
    /// A store repository to publish to, and to copy from at start (see
    /// [`hermes_controller::mirror`]).
    pub mirror: Option<hermes_controller::mirror::Mirror>,
}

/// The artifact store under a data directory.
pub fn store_dir(data: &Path) -> PathBuf {
    data.join("store")
}

/// The image reports under a data directory.
pub fn reports_dir(data: &Path) -> PathBuf {
    data.join("status/images")
}

/// Run the standalone controller, watching the containers of `config.containerd`, until
/// `shutdown` completes.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let source = ContainerdSource::new(&config.containerd, config.namespaces.clone());
    run_with(config, source, shutdown).await
}

/// Run the standalone controller with the running containers of `source` until `shutdown`
/// completes.
pub async fn run_with(
    config: Config,
    mut source: impl ContainerSource,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let store = Store::open(store_dir(&config.data)).map_err(|source| Error::Oci {
        action: "open the store in",
        subject: config.data.display().to_string(),
        source: Box::new(source),
    })?;
    let book = ReportBook::open(reports_dir(&config.data))?;
    let (misses_tx, misses_rx) = mpsc::channel(256);
    let node_api = NodeApi::new(
        store.clone(),
        config.server.token().map(str::to_owned),
        vec![DEFAULT_SPAN_SIZE],
        misses_tx,
    );
    let mut builder = Builder::new(
        config.client,
        store.clone(),
        config.platform,
        config.build_tool_identifier,
    );
    if let Some(mirror) = config.mirror {
        // A new data dir starts with everything published before: nothing is built twice. A
        // repository that cannot be read does not keep the controller down: it builds instead.
        if let Err(e) = mirror.sync(&store).await {
            tracing::warn!(repository = %mirror.repository(), error = %hermes_controller::chain(&e),
                "cannot copy the store repository; what is missing is built again");
        }
        builder = builder.with_mirror(mirror);
    }
    // Nodes' pull reports count as starts of their image (with the pod a node names: no pod
    // watch here to attribute them).
    let (pulls_tx, mut pulls) = mpsc::channel(256);
    node_api.set_pull_reports(hermes_controller::api::PullSink::To(pulls_tx));
    let mut engine = Engine::new(config.engine, builder, node_api.clone(), misses_rx, book)?;
    let (stop_server, server_stopped) = tokio::sync::oneshot::channel::<()>();
    let addr = config.server.local_addr().ok();
    let stopped = async {
        let _ = server_stopped.await;
    };
    let server = tokio::spawn(config.server.serve(node_api.clone(), stopped));
    info!(listen = ?addr, policies = %config.policies.display(), data = %config.data.display(), "standalone controller started");

    let mut policies = PolicyDir::new(&config.policies);
    let mut last_source_error: Option<String> = None;
    let mut last_policy_error: Option<String> = None;
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        match policies.poll() {
            Ok(true) => {
                engine.set_policies(policies.valid().to_vec(), policies.invalid().to_vec());
                last_policy_error = None;
            }
            Ok(false) => {}
            Err(e) => {
                let text = hermes_controller::chain(&e);
                if last_policy_error.as_ref() != Some(&text) {
                    warn!(
                        error = text,
                        "cannot read the policy directory; keeping the policies read before"
                    );
                    last_policy_error = Some(text);
                }
            }
        }
        match source.running().await {
            Ok(containers) => {
                engine.set_containers(containers);
                if last_source_error.take().is_some() {
                    info!("listing running containers works again");
                }
            }
            Err(e) => {
                let text = e.to_string();
                if last_source_error.as_ref() != Some(&text) {
                    warn!(
                        error = text,
                        "cannot list running containers; keeping the last list"
                    );
                    last_source_error = Some(text);
                }
            }
        }
        // Serving artifacts does not depend on the container runtime answering.
        node_api.set_ready(true);
        tokio::select! {
            () = engine.run_for(config.poll_interval) => {}
            Some(report) = pulls.recv() => record_start(&mut engine, &report),
            () = &mut shutdown => break,
        }
    }
    info!("standalone controller stopping");
    let _ = stop_server.send(());
    let _ = server.await;
    Ok(())
}

/// Count a node's pull as a start of its image, of the pod the node named if any.
fn record_start(engine: &mut Engine, report: &hermes_controller::api::PullReport) {
    let Some(manifest) = &report.manifest else {
        return;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let pod = hermes_controller::starts::attribute(report, &[], |_| false);
    let start = hermes_controller::starts::PodStart::new(report, pod.first(), now);
    engine.record_start(manifest, start);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(name: &str, spec: &str) -> String {
        format!(
            "apiVersion: hermes.dev/v1alpha1\nkind: HermesPolicy\nmetadata: {{name: {name}}}\nspec:\n{spec}"
        )
    }

    #[test]
    fn invalid_files_are_reported_and_valid_ones_kept() {
        let files = vec![
            ("a.yaml".to_owned(), doc("good", "  images: [\"**\"]\n")),
            (
                "b.yaml".to_owned(),
                doc("bad-glob", "  images: [\"ghcr.io/a**\"]\n"),
            ),
            (
                "c.yaml".to_owned(),
                doc("bad-mode", "  images: [a]\n  mode: Fast\n"),
            ),
            (
                "d.yaml".to_owned(),
                doc("negative", "  images: [a]\n  index: {minLayerSize: -1}\n"),
            ),
            ("e.yaml".to_owned(), doc("good", "  images: [b]\n")),
        ];
        let (valid, invalid) = load_policy_texts(&files);
        assert_eq!(
            valid.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
            ["good"]
        );
        let reasons: Vec<(String, String)> = invalid
            .iter()
            .map(|s| (s.name.clone(), s.conditions[0].message.clone()))
            .collect();
        assert_eq!(reasons.len(), 4, "{reasons:#?}");
        assert_eq!(reasons[0].0, "bad-glob");
        assert!(reasons[0].1.contains("spec.images[0]"), "{reasons:?}");
        assert_eq!(reasons[1].0, "c.yaml", "unparsable: named by its file");
        assert!(reasons[1].1.contains("Fast"), "{reasons:?}");
        assert_eq!(reasons[2].0, "negative");
        assert!(reasons[2].1.contains("negative"), "{reasons:?}");
        assert_eq!(reasons[3].0, "good");
        assert!(reasons[3].1.contains("defined twice"), "{reasons:?}");
        for s in &invalid {
            assert_eq!(
                (
                    s.conditions[0].kind.as_str(),
                    s.conditions[0].status.as_str()
                ),
                ("Valid", "False")
            );
        }
    }

    #[test]
    fn a_policy_dir_is_reread_only_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let mut policies = PolicyDir::new(dir.path());
        assert!(policies.poll().unwrap(), "the first poll reads");
        assert!(policies.valid().is_empty());
        assert!(!policies.poll().unwrap());
        fs::write(dir.path().join("p.yaml"), doc("p", "  images: [a]\n")).unwrap();
        fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        fs::write(dir.path().join(".hidden.yaml"), "ignored: [").unwrap();
        assert!(policies.poll().unwrap());
        assert_eq!(policies.valid().len(), 1);
        assert!(!policies.poll().unwrap());
        fs::write(dir.path().join("p.yaml"), doc("p", "  images: [a, bb]\n")).unwrap();
        assert!(policies.poll().unwrap(), "the size changed");
        assert_eq!(policies.valid()[0].images.len(), 2);
        fs::remove_file(dir.path().join("p.yaml")).unwrap();
        assert!(policies.poll().unwrap());
        assert!(policies.valid().is_empty());
        assert!(PolicyDir::new(dir.path().join("missing")).poll().is_err());
    }

    #[test]
    fn containerd_containers_map_to_pods() {
        let c = hermes_containerd::RunningContainer {
            id: "c1".into(),
            image_name: "registry.test/app:v1".into(),
            target_digest: Some(format!("sha256:{}", "1".repeat(64))),
            manifest_digest: None,
            snapshotter: "overlayfs".into(),
            pid: 7,
            labels: [
                (POD_NAME_LABEL.to_owned(), "web-0".to_owned()),
                (POD_NAMESPACE_LABEL.to_owned(), "prod".to_owned()),
                ("app".to_owned(), "web".to_owned()),
            ]
            .into(),
        };
        let mapped = container("k8s.io", c.clone()).unwrap();
        assert_eq!(
            (mapped.namespace.as_str(), mapped.pod.as_str()),
            ("prod", "web-0")
        );
        assert_eq!(
            mapped.pod_labels.get("app").map(String::as_str),
            Some("web")
        );
        assert_eq!(
            mapped
                .namespace_labels
                .get(NAMESPACE_NAME_LABEL)
                .map(String::as_str),
            Some("prod")
        );
        assert!(mapped.digest.is_some());
        let plain = hermes_containerd::RunningContainer {
            labels: BTreeMap::new(),
            ..c.clone()
        };
        let mapped = container("default", plain).unwrap();
        assert_eq!(
            (mapped.namespace.as_str(), mapped.pod.as_str()),
            ("default", "c1")
        );
        let no_image = hermes_containerd::RunningContainer {
            image_name: String::new(),
            ..c
        };
        assert!(container("default", no_image).is_none());
    }
}
