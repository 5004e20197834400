//! A real containerd (with the system's runc) in a temp dir: its own root, state, socket and
//! config, optionally with the Hermes snapshotter declared as a proxy plugin and the CRI plugin set
//! up the way `containerd-cri-here.md` found to work on these machines (plain-HTTP local registry,
//! sandbox image from it, `restrict_oom_score_adj`, snapshot labels passed to remote snapshotters).
//!
//! Two containerds, chosen per test with [`Flavour`]: the system's 1.6 (Debian bookworm's, config
//! version 2) and 2.x (Debian's 2.1.9 binaries that `scripts/containerd2.sh fetch` caches, config
//! version 3, its directory first on the `PATH` of the containerd process so that it starts its
//! own shim). Asking for 2.x when it is not fetched is an error saying how to fetch it.
//!
//! Teardown (`Drop`) removes every task it can through `ctr`, kills what is left of its shims and
//! their containers, stops containerd, unmounts everything under its dir and removes the dir.
//! It does not start the snapshotter: tests start theirs and pass its socket.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::TestImage;
use crate::probe::find_program;
use crate::{Error, Result};

/// How long containerd may take to answer on its socket.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Log line the CRI plugin writes right before it starts serving.
const CRI_READY_LINE: &str = "Start streaming server";
/// Name of the proxy snapshotter (`[proxy_plugins.hermes]`).
pub const PROXY_SNAPSHOTTER: &str = "hermes";
const INSTALL: &str = "apt-get install containerd runc";
/// Overrides where the containerd 2.x binaries are (a directory with `containerd`,
/// `containerd-shim-runc-v2` and `ctr`).
pub const CONTAINERD2_BIN_ENV: &str = "HERMES_CONTAINERD2_BIN";
/// The script that fetches containerd 2.x and prints its directory (`bin`).
const CONTAINERD2_SCRIPT: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/containerd2.sh");
/// The runtime handler [`ContainerdBuilder::hermes_runtime_handler`] declares.
pub const HERMES_RUNTIME_HANDLER: &str = "hermes";

/// Which containerd a test runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Flavour {
    /// The system's containerd 1.6 (Debian bookworm's 1.6.20), config version 2.
    #[default]
    V1_6,
    /// containerd 2.x (Debian's 2.1.9 from `scripts/containerd2.sh`), config version 3.
    V2,
}

impl Flavour {
    /// Both, oldest first.
    pub const ALL: [Flavour; 2] = [Flavour::V1_6, Flavour::V2];

    /// `1.6` or `2`, as tests and benchmarks name them.
    pub fn name(self) -> &'static str {
        match self {
            Flavour::V1_6 => "1.6",
            Flavour::V2 => "2",
        }
    }
}

impl std::fmt::Display for Flavour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "containerd {}", self.name())
    }
}

/// How the CRI plugin of containerd 2.x pulls, and so how the snapshot labels reach a remote
/// snapshotter (containerd 1.6 has only [`CriPull::Local`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CriPull {
    /// CRI's own pull with `disable_snapshot_annotations = false` (containerd 2.1 falls back to
    /// it from the transfer service when it sees that setting).
    #[default]
    Local,
    /// The transfer service (2.1's default): snapshot annotations stay disabled in CRI, the
    /// transfer service unpacks into the CRI snapshotter (`unpack_config`) and the proxy plugin
    /// exports `enable_remote_snapshot_annotations`.
    Transfer,
}

/// Options for [`Containerd`]; start with [`Containerd::builder`].
#[derive(Debug, Clone, Default)]
pub struct ContainerdBuilder {
    proxy_snapshotter: Option<PathBuf>,
    registry_hosts: Vec<String>,
    sandbox_image: Option<String>,
    cri_snapshotter: Option<String>,
    flavour: Flavour,
    cri_pull: CriPull,
    hermes_runtime_handler: bool,
    deploy_snippet: Option<String>,
    no_annotation_export: bool,
}

impl ContainerdBuilder {
    /// Declares a snapshotter serving containerd's snapshots API on `socket` as
    /// `[proxy_plugins.hermes]` (named [`PROXY_SNAPSHOTTER`]).
    pub fn proxy_snapshotter(mut self, socket: impl Into<PathBuf>) -> Self {
        self.proxy_snapshotter = Some(socket.into());
        self
    }

    /// Lets containerd's CRI plugin (and `ctr --hosts-dir`, see [`Containerd::hosts_dir`]) pull
    /// from the plain-HTTP registry at `host` (`127.0.0.1:PORT`).
    pub fn registry_host(mut self, host: &str) -> Self {
        self.registry_hosts.push(host.to_owned());
        self
    }

    /// Enables the CRI plugin with `sandbox_image` (a reference in a local registry, e.g. one
    /// pushed from [`sandbox_image`]; also give its registry to [`Self::registry_host`]).
    pub fn cri(mut self, sandbox_image: &str) -> Self {
        self.sandbox_image = Some(sandbox_image.to_owned());
        self
    }

    /// The snapshotter the CRI plugin unpacks into; default [`PROXY_SNAPSHOTTER`] when a proxy
    /// snapshotter is declared, else `overlayfs`.
    pub fn cri_snapshotter(mut self, name: &str) -> Self {
        self.cri_snapshotter = Some(name.to_owned());
        self
    }

    /// Which containerd to start (default: the system's 1.6).
    pub fn flavour(mut self, flavour: Flavour) -> Self {
        self.flavour = flavour;
        self
    }

    /// How CRI pulls on containerd 2.x (default [`CriPull::Local`]); 1.6 refuses
    /// [`CriPull::Transfer`].
    pub fn cri_pull(mut self, pull: CriPull) -> Self {
        self.cri_pull = pull;
        self
    }

    /// Declares a CRI runtime handler named [`HERMES_RUNTIME_HANDLER`] (runc, like the default
    /// one) whose snapshotter is [`PROXY_SNAPSHOTTER`], so that pods asking for it use Hermes
    /// while the others use the CRI snapshotter. containerd 2.x only (1.6 refuses).
    pub fn hermes_runtime_handler(mut self) -> Self {
        self.hermes_runtime_handler = true;
        self
    }

    /// Leaves out the proxy plugin's `enable_remote_snapshot_annotations` export on containerd
    /// 2.x (declared by default), to show what the transfer service passes without it.
    pub fn without_annotation_export(mut self) -> Self {
        self.no_annotation_export = true;
        self
    }

    /// Configures containerd 2.x from `snippet`, a version 3 config as a user merges it (proxy
    /// plugin, CRI snapshotter and labels, runtimes) instead of the settings the other options
    /// generate; the testkit adds only what is about this machine and this temp dir: root, state,
    /// sockets, the sandbox image, registry hosts, CNI dirs, the stream server and
    /// `restrict_oom_score_adj`. Needs [`Self::cri`]; 1.6 refuses.
    pub fn deploy_snippet(mut self, snippet: &str) -> Self {
        self.deploy_snippet = Some(snippet.to_owned());
        self
    }

    /// Writes the config and starts containerd; returns once it answers (and, with CRI, once the
    /// CRI plugin is serving).
    pub fn start(self) -> Result<Containerd> {
        Containerd::start_with(self)
    }
}

/// A running containerd in a temp dir. Torn down on `Drop` (see the module docs).
#[derive(Debug)]
pub struct Containerd {
    child: Option<Child>,
    address: PathBuf,
    log_path: PathBuf,
    hosts_dir: PathBuf,
    ctr: PathBuf,
    flavour: Flavour,
    version: String,
    dir: Option<tempfile::TempDir>,
}

/// Where a flavour's programs are.
#[derive(Debug)]
struct Programs {
    containerd: PathBuf,
    ctr: PathBuf,
    /// Put first on containerd's `PATH` (2.x: its own shim).
    path_first: Option<PathBuf>,
}

impl Programs {
    fn find(flavour: Flavour) -> Result<Programs> {
        find_program("runc", INSTALL)?;
        match flavour {
            Flavour::V1_6 => {
                let containerd = find_program("containerd", INSTALL)?;
                let ctr = find_program("ctr", INSTALL)?;
                find_program("containerd-shim-runc-v2", INSTALL)?;
                Ok(Programs {
                    containerd,
                    ctr,
                    path_first: None,
                })
            }
            Flavour::V2 => Programs::find_v2_in(&containerd2_bin()?),
        }
    }

    fn find_v2_in(dir: &Path) -> Result<Programs> {
        for program in ["containerd", "containerd-shim-runc-v2", "ctr"] {
            if !dir.join(program).is_file() {
                return Err(Error::Containerd2Missing {
                    reason: format!("{} has no {program}", dir.display()),
                });
            }
        }
        Ok(Programs {
            containerd: dir.join("containerd"),
            ctr: dir.join("ctr"),
            path_first: Some(dir.to_owned()),
        })
    }
}

/// The containerd 2.x directory: [`CONTAINERD2_BIN_ENV`], else what `scripts/containerd2.sh bin`
/// prints.
fn containerd2_bin() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os(CONTAINERD2_BIN_ENV).filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    let output = Command::new("bash")
        .arg(CONTAINERD2_SCRIPT)
        .arg("bin")
        .stdin(Stdio::null())
        .output()
        .map_err(Error::io("run", Path::new(CONTAINERD2_SCRIPT)))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    match stdout.lines().next().map(str::trim) {
        Some(dir) if output.status.success() && !dir.is_empty() => Ok(PathBuf::from(dir)),
        _ => Err(Error::Containerd2Missing {
            reason: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        }),
    }
}

/// The version `containerd --version` prints (`1.6.20`, `2.1.9`): its third word without a
/// leading `v` and without Debian's `~ds1`/`+ds1`/`+unknown` suffix.
fn parse_version(output: &str) -> Option<String> {
    let word = output.split_whitespace().nth(2)?;
    let word = word.strip_prefix('v').unwrap_or(word);
    let end = word.find(['~', '+', '-']).unwrap_or(word.len());
    Some(word[..end].to_owned()).filter(|v| !v.is_empty())
}

impl Containerd {
    /// Options: proxy snapshotter, registries, CRI.
    pub fn builder() -> ContainerdBuilder {
        ContainerdBuilder::default()
    }

    fn start_with(options: ContainerdBuilder) -> Result<Containerd> {
        if options.flavour == Flavour::V1_6 {
            let refused = if options.cri_pull == CriPull::Transfer {
                Some("CRI pulls through the transfer service")
            } else if options.hermes_runtime_handler {
                Some("per-runtime-handler snapshotters")
            } else if options.deploy_snippet.is_some() {
                Some("version 3 config")
            } else {
                None
            };
            if let Some(feature) = refused {
                return Err(Error::Unsupported {
                    feature,
                    flavour: options.flavour.to_string(),
                });
            }
        }
        let programs = Programs::find(options.flavour)?;
        let version_output = Command::new(&programs.containerd)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .map_err(Error::io("run", &programs.containerd))?;
        let version_text = String::from_utf8_lossy(&version_output.stdout);
        let version = parse_version(&version_text).ok_or_else(|| Error::Command {
            command: format!("{} --version", programs.containerd.display()),
            status: version_output.status,
            stderr: format!("no version in {version_text:?}"),
        })?;
        let dir = tempfile::Builder::new()
            .prefix("hermes-testkit-containerd-")
            .tempdir()
            .map_err(Error::os("create a temp dir for containerd"))?;
        let log_path = dir.path().join("containerd.log");
        let address = dir.path().join("containerd.sock");
        let hosts_dir = dir.path().join("certs.d");
        for host in &options.registry_hosts {
            let host_dir = hosts_dir.join(host);
            std::fs::create_dir_all(&host_dir).map_err(Error::io("create", &host_dir))?;
            let path = host_dir.join("hosts.toml");
            std::fs::write(&path, hosts_toml(host)).map_err(Error::io("write", &path))?;
        }
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            config_toml(dir.path(), &address, &hosts_dir, &options),
        )
        .map_err(Error::io("write", &config))?;
        if !running_as_root() {
            return Err(Error::ContainerdStart {
                reason: "containerd needs root: run the tests as root".into(),
                log_path,
                log: String::new(),
            });
        }
        let log = File::create(&log_path).map_err(Error::io("create", &log_path))?;
        let mut command = Command::new(&programs.containerd);
        command
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(first) = &programs.path_first {
            let path = std::env::var_os("PATH").unwrap_or_default();
            let joined = std::env::join_paths(
                std::iter::once(first.clone()).chain(std::env::split_paths(&path)),
            )
            .map_err(|_| Error::Containerd2Missing {
                reason: format!("{} cannot go on PATH", first.display()),
            })?;
            command.env("PATH", joined);
        }
        let child = command
            .spawn()
            .map_err(Error::io("start", &programs.containerd))?;
        let mut containerd = Containerd {
            child: Some(child),
            address,
            log_path,
            hosts_dir,
            ctr: programs.ctr,
            flavour: options.flavour,
            version,
            dir: Some(dir),
        };
        if let Err(reason) = containerd.wait_ready(options.sandbox_image.is_some()) {
            return Err(Error::ContainerdStart {
                reason,
                log_path: containerd.log_path.clone(),
                log: containerd.log(),
            });
        }
        Ok(containerd)
    }

    fn wait_ready(&mut self, cri: bool) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!("exited with {status}"));
            }
            let answers = self.ctr(&["version"]).is_ok();
            if answers && (!cri || self.log().contains(CRI_READY_LINE)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("not ready within {READY_TIMEOUT:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Which containerd this is.
    pub fn flavour(&self) -> Flavour {
        self.flavour
    }

    /// The version it reports (`1.6.20`, `2.1.9`).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// containerd's gRPC socket (also the CRI endpoint when CRI is on).
    pub fn address(&self) -> &Path {
        &self.address
    }

    /// The temp dir holding root (`root/`), state (`state/`), config, log and `certs.d/`.
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().map_or(Path::new(""), |d| d.path())
    }

    /// The registry hosts dir (`ctr pull --hosts-dir DIR`, CRI's `config_path`).
    pub fn hosts_dir(&self) -> &Path {
        &self.hosts_dir
    }

    /// containerd's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// containerd's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Runs `ctr --address SOCK ARGS…` and returns its stdout; a failure carries its stderr.
    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        let output = Command::new(&self.ctr)
            .arg("--address")
            .arg(&self.address)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(Error::io("run", &self.ctr))?;
        if !output.status.success() {
            return Err(Error::Command {
                command: format!("ctr {}", args.join(" ")),
                status: output.status,
                stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Removes every task (`ctr tasks rm -f`) in every namespace.
    fn remove_tasks(&self) {
        let Ok(namespaces) = self.ctr(&["namespaces", "ls", "-q"]) else {
            return;
        };
        for ns in namespaces.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let Ok(tasks) = self.ctr(&["-n", ns, "tasks", "ls", "-q"]) else {
                continue;
            };
            for task in tasks.lines().map(str::trim).filter(|l| !l.is_empty()) {
                let _ = self.ctr(&["-n", ns, "tasks", "rm", "-f", task]);
            }
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.remove_tasks();
        kill_shims(&self.address);
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(dir) = self.dir.take() {
            unmount_under(dir.path());
            // TempDir's drop removes what is left.
        }
    }
}

/// A plain-HTTP `hosts.toml` for `host` (containerd's registry hosts format).
fn hosts_toml(host: &str) -> String {
    format!(
        "server = \"http://{host}\"\n\n[host.\"http://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
    )
}

fn config_toml(
    dir: &Path,
    address: &Path,
    hosts_dir: &Path,
    options: &ContainerdBuilder,
) -> String {
    if let (Flavour::V2, Some(snippet), Some(sandbox)) = (
        options.flavour,
        &options.deploy_snippet,
        &options.sandbox_image,
    ) {
        return config_from_snippet(dir, address, hosts_dir, sandbox, snippet);
    }
    let mut config = match options.flavour {
        Flavour::V1_6 => config_v2(dir, address, hosts_dir, options),
        Flavour::V2 => config_v3(dir, address, hosts_dir, options),
    };
    if let Some(socket) = &options.proxy_snapshotter {
        config.push_str(&format!(
            "[proxy_plugins.{PROXY_SNAPSHOTTER}]\n  type = \"snapshot\"\n  address = \"{}\"\n",
            socket.display()
        ));
        if options.flavour == Flavour::V2 && !options.no_annotation_export {
            // Without it the transfer service gives a proxy snapshotter no image labels.
            config.push_str(&format!(
                "[proxy_plugins.{PROXY_SNAPSHOTTER}.exports]\n  enable_remote_snapshot_annotations = \"true\"\n"
            ));
        }
    }
    config
}

/// The snapshotter CRI unpacks into: the one asked for, else the proxy if declared, else
/// `overlayfs`.
fn cri_snapshotter(options: &ContainerdBuilder) -> String {
    options.cri_snapshotter.clone().unwrap_or_else(|| {
        if options.proxy_snapshotter.is_some() {
            PROXY_SNAPSHOTTER.to_owned()
        } else {
            "overlayfs".to_owned()
        }
    })
}

/// The part of both config versions that does not depend on the version.
fn config_common(dir: &Path, address: &Path, version: u8, disabled: &[&str]) -> String {
    let disabled = if disabled.is_empty() {
        String::new()
    } else {
        let list: Vec<String> = disabled.iter().map(|p| format!("\"{p}\"")).collect();
        format!("disabled_plugins = [{}]\n", list.join(", "))
    };
    format!(
        "version = {version}\n{}{disabled}{}",
        config_dirs(dir),
        config_sockets(dir, address)
    )
}

/// The top-level keys: where containerd keeps its data.
fn config_dirs(dir: &Path) -> String {
    let d = dir.display();
    format!("root = \"{d}/root\"\nstate = \"{d}/state\"\n")
}

/// The tables every config has: sockets and the `opt` dir in the temp dir.
fn config_sockets(dir: &Path, address: &Path) -> String {
    format!(
        r#"[grpc]
  address = "{addr}"
[ttrpc]
  address = "{addr}.ttrpc"
[debug]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
"#,
        d = dir.display(),
        addr = address.display(),
    )
}

/// containerd 1.6: config version 2, CRI in `io.containerd.grpc.v1.cri`.
fn config_v2(dir: &Path, address: &Path, hosts_dir: &Path, options: &ContainerdBuilder) -> String {
    let Some(sandbox) = &options.sandbox_image else {
        return config_common(dir, address, 2, &["io.containerd.grpc.v1.cri"]);
    };
    let mut config = config_common(dir, address, 2, &[]);
    let d = dir.display();
    config.push_str(&format!(
        r#"[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox}"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "{snapshotter}"
  disable_snapshot_annotations = false
[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "{d}/cni/bin"
  conf_dir = "{d}/cni/net.d"
[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "{hosts}"
"#,
        snapshotter = cri_snapshotter(options),
        hosts = hosts_dir.display(),
    ));
    config
}

/// containerd 2.x: config version 3, CRI split into `io.containerd.cri.v1.images` (pulls),
/// `io.containerd.cri.v1.runtime` (sandboxes, containers) and `io.containerd.grpc.v1.cri` (the
/// server).
fn config_v3(dir: &Path, address: &Path, hosts_dir: &Path, options: &ContainerdBuilder) -> String {
    let Some(sandbox) = &options.sandbox_image else {
        return config_common(
            dir,
            address,
            3,
            &[
                "io.containerd.grpc.v1.cri",
                "io.containerd.cri.v1.images",
                "io.containerd.cri.v1.runtime",
            ],
        );
    };
    let mut config = config_common(dir, address, 3, &[]);
    let d = dir.display();
    let snapshotter = cri_snapshotter(options);
    let annotations = match options.cri_pull {
        // containerd 2.1 takes this setting as the sign of a remote snapshotter and pulls
        // through CRI's own (local) pull, which passes the labels.
        CriPull::Local => "  disable_snapshot_annotations = false\n",
        CriPull::Transfer => "",
    };
    config.push_str(&format!(
        r#"[plugins."io.containerd.cri.v1.images"]
  snapshotter = "{snapshotter}"
{annotations}[plugins."io.containerd.cri.v1.images".pinned_images]
  sandbox = "{sandbox}"
[plugins."io.containerd.cri.v1.images".registry]
  config_path = "{hosts}"
[plugins."io.containerd.cri.v1.runtime"]
  restrict_oom_score_adj = true
[plugins."io.containerd.cri.v1.runtime".cni]
  bin_dirs = ["{d}/cni/bin"]
  conf_dir = "{d}/cni/net.d"
[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"#,
        hosts = hosts_dir.display(),
    ));
    if options.cri_pull == CriPull::Transfer {
        config.push_str(&format!(
            r#"[[plugins."io.containerd.transfer.v1.local".unpack_config]]
  platform = "linux"
  snapshotter = "{snapshotter}"
"#
        ));
    }
    if options.hermes_runtime_handler {
        // The runtime's snapshotter serves its containers; CRI's image service pulls for the
        // handler into the snapshotter its `runtime_platforms` entry names (without it, a pull
        // for the handler goes to the default snapshotter and containerd unpacks the image
        // again, without the labels, when the container is created).
        config.push_str(&format!(
            r#"[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.{HERMES_RUNTIME_HANDLER}]
  runtime_type = "io.containerd.runc.v2"
  snapshotter = "{PROXY_SNAPSHOTTER}"
[plugins."io.containerd.cri.v1.images".runtime_platforms.{HERMES_RUNTIME_HANDLER}]
  platform = "linux/{arch}"
  snapshotter = "{PROXY_SNAPSHOTTER}"
"#,
            arch = oci_arch(),
        ));
    }
    config
}

/// A user's version 3 `snippet` with this machine's and this temp dir's settings added: the
/// top-level keys right after its `version` line (before any table), the tables at the end.
fn config_from_snippet(
    dir: &Path,
    address: &Path,
    hosts_dir: &Path,
    sandbox: &str,
    snippet: &str,
) -> String {
    let top = config_dirs(dir);
    let mut config = String::new();
    let mut placed = false;
    for line in snippet.lines() {
        config.push_str(line);
        config.push('\n');
        if !placed && line.trim_start().starts_with("version") {
            config.push_str(&top);
            placed = true;
        }
    }
    if !placed {
        config.insert_str(0, &format!("version = 3\n{top}"));
    }
    let d = dir.display();
    config.push_str(&config_sockets(dir, address));
    config.push_str(&format!(
        r#"[plugins."io.containerd.cri.v1.images".pinned_images]
  sandbox = "{sandbox}"
[plugins."io.containerd.cri.v1.images".registry]
  config_path = "{hosts}"
[plugins."io.containerd.cri.v1.runtime".cni]
  bin_dirs = ["{d}/cni/bin"]
  conf_dir = "{d}/cni/net.d"
[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"#,
        hosts = hosts_dir.display(),
    ));
    // A table may not be defined twice: add the key to the snippet's runtime table if it has one.
    let runtime_table = [
        "[plugins.'io.containerd.cri.v1.runtime']",
        "[plugins.\"io.containerd.cri.v1.runtime\"]",
    ];
    match runtime_table.iter().find(|t| config.contains(*t)) {
        Some(table) => {
            config = config.replacen(
                table,
                &format!("{table}\n  restrict_oom_score_adj = true"),
                1,
            )
        }
        None => config.push_str(
            "[plugins.\"io.containerd.cri.v1.runtime\"]\n  restrict_oom_score_adj = true\n",
        ),
    }
    config
}

/// This machine's architecture as OCI platforms name it.
fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// Kills (SIGKILL) the shims serving this containerd (their command line names its socket) and
/// their direct children (container init processes; killing a PID namespace's init ends it).
fn kill_shims(address: &Path) {
    let needle = address.to_string_lossy().into_owned();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    let mut all: Vec<(u32, u32, String)> = Vec::new();
    for entry in procs.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // `pid (comm) state ppid …`; comm may contain spaces, so parse after the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        all.push((pid, ppid, cmdline));
    }
    let shims: Vec<u32> = all
        .iter()
        .filter(|(_, _, cmd)| cmd.contains("containerd-shim") && cmd.contains(&needle))
        .map(|(pid, _, _)| *pid)
        .collect();
    let children = all
        .iter()
        .filter(|(_, ppid, _)| shims.contains(ppid))
        .map(|(pid, _, _)| *pid);
    let victims: Vec<String> = children
        .chain(shims.iter().copied())
        .map(|p| p.to_string())
        .collect();
    if !victims.is_empty() {
        let _ = Command::new("kill")
            .arg("-KILL")
            .args(&victims)
            .stderr(Stdio::null())
            .status();
    }
}

/// Unmounts every mount point under `dir`, deepest first (lazily if busy).
fn unmount_under(dir: &Path) {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let prefix = dir.to_string_lossy().into_owned();
    let mut points: Vec<String> = mountinfo
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(unescape_mountinfo)
        .filter(|p| p.starts_with(&prefix))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    points.dedup();
    for point in points {
        let ok = Command::new("umount")
            .arg(&point)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&point)
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(Ok(digits)) = bytes.get(i + 1..i + 4).map(std::str::from_utf8)
            && let Ok(v) = u8::from_str_radix(digits, 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The host's static busybox (`/bin/busybox` from Debian's `busybox-static`).
pub fn busybox() -> Result<Vec<u8>> {
    let path = find_program("busybox", "apt-get install busybox-static")?;
    let data = std::fs::read(&path).map_err(Error::io("read", &path))?;
    // A dynamically linked busybox (Debian's `busybox` package) would not run in an image
    // without its libraries.
    if !is_static_elf(&data) {
        return Err(Error::MissingProgram {
            program: "busybox (statically linked)",
            install: "apt-get install busybox-static",
        });
    }
    Ok(data)
}

/// An ELF without a `PT_INTERP` program header is statically linked.
fn is_static_elf(data: &[u8]) -> bool {
    let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u64_at = |o: usize| {
        data.get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    if !data.starts_with(b"\x7fELF\x02\x01") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..usize::from(phnum)).all(|i| {
        let off = usize::try_from(phoff).unwrap_or(usize::MAX) + i * usize::from(phentsize);
        data.get(off..off + 4) != Some(&3u32.to_le_bytes()[..])
    })
}

/// A one-layer image with a static busybox at `/bin/busybox` and `/bin/sh`, `/bin/sleep`,
/// `/bin/cat`, `/bin/echo`, `/bin/ls` linked to it. Add layers and an entrypoint to taste.
pub fn busybox_image() -> Result<TestImage> {
    let mut image = TestImage::new()
        .dir("bin")
        .executable("bin/busybox", busybox()?);
    for applet in ["sh", "sleep", "cat", "echo", "ls"] {
        image = image.symlink(&format!("bin/{applet}"), "busybox");
    }
    Ok(image)
}

/// A pod sandbox ("pause") image: busybox sleeping for a day.
pub fn sandbox_image() -> Result<TestImage> {
    Ok(busybox_image()?.entrypoint(&["/bin/sleep", "86400"]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo(r"/tmp/a\040b"), "/tmp/a b");
        assert_eq!(unescape_mountinfo(r"/tmp/plain"), "/tmp/plain");
        assert_eq!(unescape_mountinfo(r"/tmp/end\04"), r"/tmp/end\04");
    }

    #[test]
    fn cri_config_has_the_settings_this_machine_needs() {
        let options = Containerd::builder()
            .proxy_snapshotter("/run/hermes.sock")
            .registry_host("127.0.0.1:5000")
            .cri("127.0.0.1:5000/pause:1");
        let toml = config_toml(
            Path::new("/d"),
            Path::new("/d/c.sock"),
            Path::new("/d/certs.d"),
            &options,
        );
        for needle in [
            "restrict_oom_score_adj = true",
            "sandbox_image = \"127.0.0.1:5000/pause:1\"",
            "snapshotter = \"hermes\"",
            "disable_snapshot_annotations = false",
            "config_path = \"/d/certs.d\"",
            "[proxy_plugins.hermes]",
            "address = \"/run/hermes.sock\"",
        ] {
            assert!(toml.contains(needle), "{needle} missing in:\n{toml}");
        }
        assert!(!toml.contains("disabled_plugins"), "{toml}");
        let plain = config_toml(
            Path::new("/d"),
            Path::new("/d/c.sock"),
            Path::new("/d/certs.d"),
            &Containerd::builder(),
        );
        assert!(plain.contains("disabled_plugins = [\"io.containerd.grpc.v1.cri\"]"));
        assert!(!plain.contains("proxy_plugins"));
    }

    fn v3(options: ContainerdBuilder) -> String {
        config_toml(
            Path::new("/d"),
            Path::new("/d/c.sock"),
            Path::new("/d/certs.d"),
            &options.flavour(Flavour::V2),
        )
    }

    #[test]
    fn containerd_2_gets_a_version_3_config_with_the_cri_settings_moved() {
        let toml = v3(Containerd::builder()
            .proxy_snapshotter("/run/hermes.sock")
            .registry_host("127.0.0.1:5000")
            .cri("127.0.0.1:5000/pause:1"));
        for needle in [
            "version = 3\n",
            "[plugins.\"io.containerd.cri.v1.images\"]\n  snapshotter = \"hermes\"\n  disable_snapshot_annotations = false\n",
            "[plugins.\"io.containerd.cri.v1.images\".pinned_images]\n  sandbox = \"127.0.0.1:5000/pause:1\"",
            "[plugins.\"io.containerd.cri.v1.images\".registry]\n  config_path = \"/d/certs.d\"",
            "[plugins.\"io.containerd.cri.v1.runtime\"]\n  restrict_oom_score_adj = true",
            "[proxy_plugins.hermes.exports]\n  enable_remote_snapshot_annotations = \"true\"",
        ] {
            assert!(toml.contains(needle), "{needle} missing in:\n{toml}");
        }
        for old in ["sandbox_image", "version = 2", "unpack_config", "runtimes."] {
            assert!(!toml.contains(old), "{old} in:\n{toml}");
        }
        let plain = v3(Containerd::builder());
        assert!(plain.contains("\"io.containerd.cri.v1.images\""), "{plain}");
        assert!(plain.starts_with("version = 3\n"), "{plain}");
    }

    #[test]
    fn the_transfer_pull_keeps_annotations_off_and_unpacks_into_the_cri_snapshotter() {
        let toml = v3(Containerd::builder()
            .proxy_snapshotter("/run/hermes.sock")
            .cri("127.0.0.1:5000/pause:1")
            .cri_pull(CriPull::Transfer));
        assert!(!toml.contains("disable_snapshot_annotations"), "{toml}");
        assert!(
            toml.contains("[[plugins.\"io.containerd.transfer.v1.local\".unpack_config]]\n  platform = \"linux\"\n  snapshotter = \"hermes\""),
            "{toml}"
        );
    }

    #[test]
    fn the_hermes_runtime_handler_uses_hermes_while_the_default_stays_overlayfs() {
        let toml = v3(Containerd::builder()
            .proxy_snapshotter("/run/hermes.sock")
            .cri("127.0.0.1:5000/pause:1")
            .cri_snapshotter("overlayfs")
            .hermes_runtime_handler());
        assert!(toml.contains("snapshotter = \"overlayfs\""), "{toml}");
        assert!(
            toml.contains("[plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.hermes]\n  runtime_type = \"io.containerd.runc.v2\"\n  snapshotter = \"hermes\""),
            "{toml}"
        );
        assert!(
            toml.contains("[plugins.\"io.containerd.cri.v1.images\".runtime_platforms.hermes]\n  platform = \"linux/"),
            "pulls for the handler need their own snapshotter too:\n{toml}"
        );
    }

    #[test]
    fn a_deploy_snippet_gets_this_machines_settings_around_it() {
        let snippet = "# comment\nversion = 3\n[proxy_plugins.hermes]\n  type = \"snapshot\"\n[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.hermes]\n  snapshotter = \"hermes\"\n";
        let toml = config_toml(
            Path::new("/d"),
            Path::new("/d/c.sock"),
            Path::new("/d/certs.d"),
            &Containerd::builder()
                .flavour(Flavour::V2)
                .cri("127.0.0.1:5000/pause:1")
                .deploy_snippet(snippet),
        );
        assert!(
            toml.starts_with("# comment\nversion = 3\nroot = \"/d/root\"\nstate = \"/d/state\"\n[proxy_plugins.hermes]"),
            "{toml}"
        );
        assert_eq!(toml.matches("[proxy_plugins.hermes]").count(), 1, "{toml}");
        assert_eq!(
            toml.matches("restrict_oom_score_adj = true").count(),
            1,
            "{toml}"
        );
        assert!(
            toml.contains("sandbox = \"127.0.0.1:5000/pause:1\""),
            "{toml}"
        );
        assert!(toml.contains("[grpc]\n  address = \"/d/c.sock\""), "{toml}");
        let with_runtime_table = config_toml(
            Path::new("/d"),
            Path::new("/d/c.sock"),
            Path::new("/d/certs.d"),
            &Containerd::builder()
                .flavour(Flavour::V2)
                .cri("127.0.0.1:5000/pause:1")
                .deploy_snippet("version = 3\n[plugins.'io.containerd.cri.v1.runtime']\n  x = 1\n"),
        );
        assert!(
            with_runtime_table.contains(
                "[plugins.'io.containerd.cri.v1.runtime']\n  restrict_oom_score_adj = true\n  x = 1"
            ),
            "a table defined once:\n{with_runtime_table}"
        );
    }

    #[test]
    fn containerd_1_6_refuses_what_only_2_has() {
        for builder in [
            Containerd::builder().cri_pull(CriPull::Transfer),
            Containerd::builder().hermes_runtime_handler(),
            Containerd::builder().deploy_snippet("version = 3\n"),
        ] {
            let error = builder.start().expect_err("1.6 cannot");
            assert!(matches!(error, Error::Unsupported { .. }), "{error}");
            assert!(error.to_string().contains("use containerd 2"), "{error}");
        }
    }

    #[test]
    fn versions_are_read_from_debian_and_upstream_builds() {
        let debian = "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3";
        assert_eq!(parse_version(debian).as_deref(), Some("1.6.20"));
        let unpacked = "containerd github.com/containerd/containerd/v2 2.1.9+unknown ";
        assert_eq!(parse_version(unpacked).as_deref(), Some("2.1.9"));
        let upstream = "containerd github.com/containerd/containerd/v2 v2.2.0 abcdef";
        assert_eq!(parse_version(upstream).as_deref(), Some("2.2.0"));
        assert_eq!(parse_version("containerd"), None);
    }

    #[test]
    fn a_missing_containerd_2_fails_saying_how_to_fetch_it() {
        // Not through the environment (tests run in parallel): the check the override goes to.
        let error = Programs::find_v2_in(Path::new("/nonexistent/containerd2")).unwrap_err();
        assert!(
            error.to_string().contains("scripts/containerd2.sh fetch"),
            "{error}"
        );
    }

    /// Both containerds start and say which they are (the 2.x one from the cache: fetched by
    /// `scripts/install-deps.sh`).
    #[test]
    fn both_flavours_start_and_report_their_version() {
        for flavour in Flavour::ALL {
            let containerd = Containerd::builder()
                .flavour(flavour)
                .start()
                .unwrap_or_else(|e| panic!("{flavour}: {e:?}"));
            let want = match flavour {
                Flavour::V1_6 => "1.6.",
                Flavour::V2 => "2.",
            };
            assert!(
                containerd.version().starts_with(want),
                "{flavour} reports {}",
                containerd.version()
            );
            let server = containerd.ctr(&["version"]).expect("ctr version");
            assert!(
                server.contains(containerd.version()),
                "{flavour}: ctr version says\n{server}"
            );
        }
    }

    #[test]
    fn hosts_toml_points_at_plain_http() {
        let text = hosts_toml("127.0.0.1:5000");
        assert!(
            text.starts_with("server = \"http://127.0.0.1:5000\""),
            "{text}"
        );
        assert!(text.contains("[host.\"http://127.0.0.1:5000\"]"), "{text}");
    }

    #[test]
    fn the_static_check_tells_static_from_dynamic_elves() {
        assert!(!is_static_elf(b"not an elf"));
        let ls = std::fs::read("/bin/ls").unwrap();
        assert!(
            !is_static_elf(&ls),
            "/bin/ls is dynamically linked on Debian"
        );
    }
}
