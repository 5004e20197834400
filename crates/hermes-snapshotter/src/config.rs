//! The node daemon's configuration: a TOML or YAML file (by extension), every key optional with a
//! default that works on a node set up by `deploy/`, unknown keys rejected. Command-line flags
//! override the file (the binary applies them).

use std::io::Read as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::{Error, Result};

/// Where the node daemon keeps its state by default.
pub const DEFAULT_ROOT: &str = "/var/lib/hermes/node";
/// The snapshots socket containerd's `proxy_plugins.hermes` points at.
pub const DEFAULT_SOCKET: &str = "/run/hermes/snapshotter.sock";
/// The largest config file read; a real one is well under a KiB.
pub const MAX_CONFIG_SIZE: u64 = 1 << 20;

/// Reads a small text file whole, refusing one longer than `limit` bytes after reading no more
/// than `limit + 1` (so `/dev/zero` or a log given by mistake costs nothing).
pub(crate) fn read_small_file(path: &Path, limit: u64, op: &'static str) -> Result<String> {
    let fail = |source| Error::io(op, path)(source);
    let file = std::fs::File::open(path).map_err(fail)?;
    let mut bytes = Vec::new();
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(fail)?;
    if bytes.len() as u64 > limit {
        return Err(fail(std::io::Error::new(
            std::io::ErrorKind::FileTooLarge,
            format!("larger than {limit} bytes: is it the right file?"),
        )));
    }
    String::from_utf8(bytes)
        .map_err(|e| fail(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
}

/// The largest bearer-token file read; a real token is well under a KiB.
pub const MAX_TOKEN_FILE_SIZE: u64 = 64 << 10;

/// Reads the node API's bearer token from `path` the one way every Hermes command does (the
/// node, `hermes controller`, `hermes kube controller`, `hermes status`): at most
/// [`MAX_TOKEN_FILE_SIZE`] bytes, surrounding white space trimmed, an empty token refused.
pub fn read_token_file(path: &Path) -> Result<String> {
    let text = read_small_file(path, MAX_TOKEN_FILE_SIZE, "read token file")?;
    let token = text.trim();
    if token.is_empty() {
        return Err(Error::io("read token file", path)(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the file is empty: put the token in it",
        )));
    }
    Ok(token.to_owned())
}

/// Node daemon settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// State root: snapshot metadata and layers, zTOCs, span caches, mounts.
    pub root: PathBuf,
    /// The snapshots API socket.
    pub socket: PathBuf,
    /// The controller's node API, if any.
    pub controller: Option<ControllerConfig>,
    /// Also look for SOCI indexes (v2 image indexes and v1 referrers) in the image's registry.
    pub soci_from_registry: bool,
    /// Talk plain HTTP to registries (local, insecure registries only).
    pub plain_http: bool,
    /// Docker `config.json` with registry credentials [default: `$DOCKER_CONFIG/config.json` or
    /// `~/.docker/config.json` when present].
    pub docker_config: Option<PathBuf>,
    /// containerd's registry host configuration directory (its `config_path`): mirrors in
    /// `<dir>/<registry>/hosts.toml` serve lazy reads first [default:
    /// `/etc/containerd/certs.d` when it exists; `""` turns mirrors off].
    pub registry_config_path: Option<PathBuf>,
    /// Address of the Prometheus `/metrics` endpoint; none: no endpoint.
    pub metrics: Option<SocketAddr>,
    /// Disk budget of all span caches, e.g. `50GiB`. A new lazy layer that would not fit falls
    /// back to a normal pull (reason `cache_full`); 0 means no limit.
    #[serde(deserialize_with = "de_size")]
    pub cache_size: u64,
    /// Fetch every layer's remaining spans in the background after it is mounted.
    pub background_fetch: bool,
    /// How long a lazy mount may take before the layer falls back (seconds).
    pub mount_timeout_secs: u64,
    /// How long a layer whose policy says `Eager` may take to be fully local before its
    /// container starts on it lazily (seconds).
    pub eager_timeout_secs: u64,
    /// Record-and-replay: with a controller, record the spans read during this many seconds
    /// after a layer is mounted and send them (`POST /v1/traces`); mounts prefetch the
    /// controller's merged profile first. 0 disables both.
    pub trace_window_secs: u64,
    /// Serve the CRI image service here, for the kubelet's `--image-service-endpoint`: pulls
    /// pass through to `containerd` and bring the pods' registry credentials to lazy layers.
    pub cri_proxy: Option<PathBuf>,
    /// containerd's socket, where the CRI proxy forwards.
    pub containerd: PathBuf,
    /// This node's name in reports to the controller (the Kubernetes node name, which pull
    /// reports are attributed to pods by) [default: the kernel's host name].
    pub node_name: Option<String>,
}

/// How to reach the controller.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerConfig {
    /// Base URL, e.g. `http://hermes-controller.hermes-system:8080`.
    pub url: String,
    /// File holding the bearer token (a mounted Secret).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Per-request timeout in milliseconds: a slow controller must not slow a pull down.
    #[serde(default = "default_controller_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_controller_timeout_ms() -> u64 {
    2000
}

impl ControllerConfig {
    /// A controller at `url` with the default timeout and no token.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            token_file: None,
            timeout_ms: default_controller_timeout_ms(),
        }
    }

    /// The per-request timeout.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            root: PathBuf::from(DEFAULT_ROOT),
            socket: PathBuf::from(DEFAULT_SOCKET),
            controller: None,
            soci_from_registry: false,
            plain_http: false,
            docker_config: None,
            registry_config_path: None,
            metrics: None,
            cache_size: 0,
            background_fetch: true,
            mount_timeout_secs: 10,
            eager_timeout_secs: 600,
            trace_window_secs: 10,
            cri_proxy: None,
            containerd: crate::cri_proxy::default_containerd_socket(),
            node_name: None,
        }
    }
}

impl NodeConfig {
    /// Reads a config file: `.toml`, or `.yaml`/`.yml`, of at most [`MAX_CONFIG_SIZE`] bytes.
    pub fn load(path: &Path) -> Result<Self> {
        let text = read_small_file(path, MAX_CONFIG_SIZE, "read config")?;
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        match ext {
            "toml" => Self::from_toml(&text),
            "yaml" | "yml" => Self::from_yaml(&text),
            _ => Err(Error::Config {
                path: path.to_owned(),
                message: "unknown config format: name the file *.toml, *.yaml or *.yml".into(),
            }),
        }
        .map_err(|e| match e {
            Error::Config { message, .. } => Error::Config {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    /// Parses TOML.
    pub fn from_toml(text: &str) -> Result<Self> {
        let config: Self = toml::from_str(text).map_err(|e| Error::Config {
            path: PathBuf::new(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        config.validate()
    }

    /// Parses YAML.
    pub fn from_yaml(text: &str) -> Result<Self> {
        let config: Self = serde_saphyr::from_str(text).map_err(|e| Error::Config {
            path: PathBuf::new(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        config.validate()
    }

    fn validate(self) -> Result<Self> {
        let bad = |message: String| Error::Config {
            path: PathBuf::new(),
            message,
        };
        if let Some(c) = &self.controller {
            if !(c.url.starts_with("http://") || c.url.starts_with("https://")) {
                return Err(bad(format!(
                    "controller.url {:?} must start with http:// or https://",
                    c.url
                )));
            }
            if c.timeout_ms == 0 {
                return Err(bad("controller.timeout_ms must be greater than 0".into()));
            }
        }
        if self.mount_timeout_secs == 0 {
            return Err(bad("mount_timeout_secs must be greater than 0".into()));
        }
        if !self.root.is_absolute() {
            return Err(bad(format!(
                "root {} must be an absolute path",
                self.root.display()
            )));
        }
        Ok(self)
    }

    /// The mount timeout.
    pub fn mount_timeout(&self) -> Duration {
        Duration::from_secs(self.mount_timeout_secs)
    }

    /// [`Self::eager_timeout_secs`].
    pub fn eager_timeout(&self) -> Duration {
        Duration::from_secs(self.eager_timeout_secs)
    }
}

/// `"50GiB"`, `"512MiB"`, `"1G"`, or a plain number of bytes.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 50GiB, 512MiB, 1000000)"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KB" => 1_000,
        "Ki" | "KiB" => 1 << 10,
        "M" | "MB" => 1_000_000,
        "Mi" | "MiB" => 1 << 20,
        "G" | "GB" => 1_000_000_000,
        "Gi" | "GiB" => 1 << 30,
        "T" | "TB" => 1_000_000_000_000,
        "Ti" | "TiB" => 1 << 40,
        other => return Err(format!("unknown size unit {other:?} in {s:?}")),
    };
    if n < 0.0 || !n.is_finite() {
        return Err(format!("{s:?} is not a size"));
    }
    Ok((n * mult as f64) as u64)
}

fn de_size<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    match Size::deserialize(d)? {
        Size::Bytes(n) => Ok(n),
        Size::Text(s) => parse_size(&s).map_err(serde::de::Error::custom),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_trimmed_and_an_empty_or_endless_token_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "  s3cret\n").unwrap();
        assert_eq!(read_token_file(&path).unwrap(), "s3cret");

        std::fs::write(&path, " \n").unwrap();
        let err = read_token_file(&path).unwrap_err().to_string();
        assert!(err.contains("read token file"), "{err}");
        let Error::Io { source, .. } = read_token_file(&path).unwrap_err() else {
            panic!("not an I/O error")
        };
        assert_eq!(source.kind(), std::io::ErrorKind::InvalidData, "{source}");

        let Error::Io { source, .. } = read_token_file(Path::new("/dev/zero")).unwrap_err() else {
            panic!("not an I/O error")
        };
        assert_eq!(source.kind(), std::io::ErrorKind::FileTooLarge, "{source}");
    }

    #[test]
    fn empty_file_gives_the_defaults() {
        assert_eq!(NodeConfig::from_toml("").unwrap(), NodeConfig::default());
        assert_eq!(NodeConfig::from_yaml("{}").unwrap(), NodeConfig::default());
    }

    #[test]
    fn toml_and_yaml_say_the_same() {
        let toml = r#"
root = "/data/hermes"
socket = "/run/h.sock"
soci_from_registry = true
plain_http = true
registry_config_path = "/etc/containerd/certs.d"
metrics = "127.0.0.1:9465"
cache_size = "2GiB"
background_fetch = false

[controller]
url = "http://ctrl:8080"
token_file = "/etc/hermes/token"
"#;
        let yaml = r#"
root: /data/hermes
socket: /run/h.sock
soci_from_registry: true
plain_http: true
registry_config_path: /etc/containerd/certs.d
metrics: 127.0.0.1:9465
cache_size: 2GiB
background_fetch: false
controller:
  url: http://ctrl:8080
  token_file: /etc/hermes/token
"#;
        let a = NodeConfig::from_toml(toml).unwrap();
        let b = NodeConfig::from_yaml(yaml).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.root, PathBuf::from("/data/hermes"));
        assert_eq!(a.cache_size, 2 << 30);
        assert_eq!(
            a.registry_config_path.as_deref(),
            Some(Path::new("/etc/containerd/certs.d"))
        );
        assert!(!a.background_fetch);
        let c = a.controller.unwrap();
        assert_eq!(c.url, "http://ctrl:8080");
        assert_eq!(c.timeout(), Duration::from_secs(2));
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err = NodeConfig::from_toml("root = \"/x\"\ncontroler = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("controler"), "{err}");
        assert!(err.contains("line 2"), "{err}");
        let err = NodeConfig::from_yaml("root: /x\nsoci_from_regsitry: true\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("soci_from_regsitry"), "{err}");
    }

    #[test]
    fn bad_values_are_rejected_with_the_key() {
        for (text, key) in [
            ("[controller]\nurl = \"ctrl:8080\"", "controller.url"),
            ("root = \"relative/dir\"", "root"),
            ("mount_timeout_secs = 0", "mount_timeout_secs"),
            ("cache_size = \"12 parsecs\"", "parsecs"),
        ] {
            let err = NodeConfig::from_toml(text).unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn an_endless_or_huge_config_file_is_refused_after_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("node.toml");
        // Valid TOML (comments), only too long to be a config.
        let line = "# padding\n";
        let text = line.repeat(MAX_CONFIG_SIZE as usize / line.len() + 1);
        std::fs::write(&big, text).unwrap();
        for path in [big.as_path(), Path::new("/dev/zero")] {
            let err = NodeConfig::load(path).expect_err("too large");
            let Error::Io { op, source, .. } = &err else {
                panic!("{}: expected an I/O error, got {err:?}", path.display())
            };
            assert_eq!(*op, "read config");
            assert_eq!(source.kind(), std::io::ErrorKind::FileTooLarge, "{source}");
            assert!(
                source.to_string().contains(&MAX_CONFIG_SIZE.to_string()),
                "{source}"
            );
        }
        let small = dir.path().join("small.toml");
        std::fs::write(&small, "# just a comment\n").unwrap();
        assert_eq!(NodeConfig::load(&small).unwrap(), NodeConfig::default());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1000"), Ok(1000));
        assert_eq!(parse_size("4MiB"), Ok(4 << 20));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("2G"), Ok(2_000_000_000));
        assert!(parse_size("-1").is_err());
        assert!(parse_size("lots").is_err());
    }
}

#[cfg(test)]
mod deploy_example {
    #[test]
    fn the_documented_example_config_parses() {
        let text = include_str!("../../../deploy/containerd/node.toml");
        let c = super::NodeConfig::from_toml(text).expect("deploy/containerd/node.toml");
        assert_eq!(c.cache_size, 50 << 30);
        assert!(c.controller.is_some());
    }
}
