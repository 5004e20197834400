//! containerd's registry host configuration: a `config_path` directory (usually
//! `/etc/containerd/certs.d`) with one directory per registry holding a `hosts.toml` (or, in
//! Docker's older layout, only certificate files), and `_default` for every other registry.
//! This is how clusters name their registry mirrors (Spegel, Dragonfly, a pull-through cache):
//! reading the same files lets the node's lazy reads use the mirrors containerd's pulls use.
//!
//! The parsing follows containerd's `remotes/docker/config/hosts.go`: `[host."URL"]` entries are
//! tried in the order the file names them and the top-level `server` (the registry itself when
//! absent) last; `capabilities` default to all three; `ca`, `client` and header values take a
//! string or a list; relative certificate paths are relative to the host directory;
//! `override_path` keeps the URL path as the API root instead of appending `/v2`. Like
//! containerd, unknown keys are ignored (they are reported, so a typo shows), and an unknown
//! capability or a value of the wrong type makes the file invalid.
//!
//! Pure values and file reads only; the client turns [`HostConfig`]s into endpoints.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{Error, Result};

/// containerd's usual `config_path`.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/containerd/certs.d";

/// The largest `hosts.toml`, certificate or key file read; real ones are a few KiB.
pub(crate) const MAX_HOSTS_FILE: u64 = 1 << 20;

/// Reads a small file whole, refusing one longer than `limit` after reading at most
/// `limit + 1` bytes (a path to `/dev/zero` by mistake costs nothing).
pub(crate) fn read_capped(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(limit.saturating_add(1))
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::FileTooLarge,
            format!("larger than {limit} bytes"),
        ));
    }
    Ok(bytes)
}

/// What a host may be used for (containerd's `capabilities`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Fetch blobs and manifests by digest.
    pub pull: bool,
    /// Resolve a tag to a digest.
    pub resolve: bool,
    /// Push.
    pub push: bool,
}

impl Capabilities {
    /// Every capability: containerd's default when `capabilities` is absent.
    pub const ALL: Self = Self {
        pull: true,
        resolve: true,
        push: true,
    };
}

/// Where a host is: scheme, `host[:port]` and the API root path (`/v2` unless overridden).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostUrl {
    /// `http` or `https`.
    pub scheme: String,
    /// `host[:port]`, without any user information.
    pub host: String,
    /// API root, e.g. `/v2`; requests append `/<repository>/blobs/<digest>`.
    pub path: String,
}

/// One host of a registry's configuration, as containerd reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostConfig {
    /// The host; `None` for the top-level entry without `server`: the registry itself.
    pub url: Option<HostUrl>,
    /// What it may be used for.
    pub capabilities: Capabilities,
    /// CA certificate files trusted in addition to the system's.
    pub ca: Vec<PathBuf>,
    /// Client certificate and key files; no key file: the key is in the certificate file.
    pub client: Vec<(PathBuf, Option<PathBuf>)>,
    /// Skip verifying the server's certificate (`skip_verify`).
    pub skip_verify: Option<bool>,
    /// Extra request headers, name and values.
    pub header: Vec<(String, Vec<String>)>,
    /// Connect timeout (`dial_timeout`).
    pub dial_timeout: Option<Duration>,
}

impl HostConfig {
    /// The registry itself with containerd's defaults.
    pub(crate) fn origin() -> Self {
        Self {
            url: None,
            capabilities: Capabilities::ALL,
            ca: Vec::new(),
            client: Vec::new(),
            skip_verify: None,
            header: Vec::new(),
            dial_timeout: None,
        }
    }

    /// Whether TLS settings or a dial timeout need a connection pool of their own.
    pub fn needs_own_client(&self) -> bool {
        !self.ca.is_empty()
            || !self.client.is_empty()
            || self.skip_verify.is_some()
            || self.dial_timeout.is_some()
    }
}

/// A registry's hosts parsed from a `hosts.toml`, and the keys containerd would ignore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostsFile {
    /// Mirrors in file order, then the top-level entry (the server) last.
    pub hosts: Vec<HostConfig>,
    /// Keys that mean nothing to containerd (`host."x".capabilitie`), dotted.
    pub ignored_keys: Vec<String>,
}

/// Parses a `hosts.toml`; relative certificate paths are taken relative to `dir`. The error is
/// a message naming the key.
pub fn parse_hosts_toml(text: &str, dir: &Path) -> std::result::Result<HostsFile, String> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let message = e.to_string();
        message.trim_end().to_owned()
    })?;
    let mut ignored = Vec::new();
    let mut hosts = Vec::new();
    if let Some(host) = table.get("host") {
        let toml::Value::Table(entries) = host else {
            return Err("`host` must be a table of [host.\"URL\"] entries".into());
        };
        // Document order (the `toml` crate's `preserve_order`): containerd tries them in it.
        for (url, value) in entries {
            let toml::Value::Table(entry) = value else {
                return Err(format!("host.{url:?} must be a table"));
            };
            let url = parse_server(url, entry)?;
            let prefix = format!("host.{:?}", url.host);
            hosts.push(parse_entry(Some(url), entry, dir, &prefix, &mut ignored)?);
        }
    }
    let server = match table.get("server") {
        None => None,
        Some(toml::Value::String(s)) if s.is_empty() => None,
        Some(toml::Value::String(s)) => Some(parse_server(s, &table)?),
        Some(_) => return Err("`server` must be a string".into()),
    };
    let mut root = table.clone();
    root.remove("host");
    root.remove("server");
    hosts.push(parse_entry(server, &root, dir, "", &mut ignored)?);
    Ok(HostsFile {
        hosts,
        ignored_keys: ignored,
    })
}

fn parse_server(server: &str, entry: &toml::Table) -> std::result::Result<HostUrl, String> {
    let override_path = match entry.get("override_path") {
        None => false,
        Some(toml::Value::Boolean(b)) => *b,
        Some(_) => return Err(format!("override_path of {server:?} must be true or false")),
    };
    // containerd prefixes `https://` to anything not starting with `http`, which turns
    // `ftp://x` into the host `ftp:`; naming the scheme is clearer.
    let full = if server.contains("://") {
        server.to_owned()
    } else {
        format!("https://{server}")
    };
    let (scheme, rest) = full
        .split_once("://")
        .ok_or_else(|| format!("server {server:?} is not a URL"))?;
    if scheme != "http" && scheme != "https" {
        return Err(format!(
            "server {server:?}: scheme {scheme:?} is neither http nor https"
        ));
    }
    let (authority, path) = match rest.find(['/', '?', '#']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    // Credentials never travel in a URL: drop any user information.
    let host = authority.rsplit('@').next().unwrap_or(authority);
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(format!("server {server:?} has no host"));
    }
    let path = path.split(['?', '#']).next().unwrap_or("");
    let mut path = clean_path(path);
    if !override_path && !path.ends_with("/v2") {
        path.push_str("/v2");
    }
    Ok(HostUrl {
        scheme: scheme.to_owned(),
        host: host.to_owned(),
        path,
    })
}

/// `path.Clean` for the URL paths that occur: no empty or `.` segments, no trailing slash,
/// `..` resolved; the root is the empty string (requests add `/v2/...` or the rest).
fn clean_path(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    parts.iter().map(|p| format!("/{p}")).collect()
}

fn parse_entry(
    url: Option<HostUrl>,
    entry: &toml::Table,
    dir: &Path,
    prefix: &str,
    ignored: &mut Vec<String>,
) -> std::result::Result<HostConfig, String> {
    let key = |k: &str| {
        if prefix.is_empty() {
            k.to_owned()
        } else {
            format!("{prefix}.{k}")
        }
    };
    let mut host = HostConfig {
        url,
        ..HostConfig::origin()
    };
    for (name, value) in entry {
        match name.as_str() {
            "capabilities" => {
                let list = strings(value)
                    .ok_or_else(|| format!("{} must be a list of strings", key("capabilities")))?;
                if !list.is_empty() {
                    host.capabilities = Capabilities {
                        pull: false,
                        resolve: false,
                        push: false,
                    };
                }
                for c in list {
                    match c.to_ascii_lowercase().as_str() {
                        "pull" => host.capabilities.pull = true,
                        "resolve" => host.capabilities.resolve = true,
                        "push" => host.capabilities.push = true,
                        other => {
                            return Err(format!(
                                "{}: unknown capability {other:?} (pull, resolve or push)",
                                key("capabilities")
                            ));
                        }
                    }
                }
            }
            "ca" => {
                let list = strings(value)
                    .ok_or_else(|| format!("{} must be a path or a list of paths", key("ca")))?;
                host.ca = list.iter().map(|p| absolute(p, dir)).collect();
            }
            "client" => host.client = client_pairs(value, dir).map_err(|m| key(&m))?,
            "skip_verify" => match value {
                toml::Value::Boolean(b) => host.skip_verify = Some(*b),
                _ => return Err(format!("{} must be true or false", key("skip_verify"))),
            },
            "header" => {
                let toml::Value::Table(headers) = value else {
                    return Err(format!("{} must be a table", key("header")));
                };
                for (name, values) in headers {
                    let values = strings(values).ok_or_else(|| {
                        format!("{}.{name} must be a string or a list", key("header"))
                    })?;
                    host.header.push((name.clone(), values));
                }
            }
            "dial_timeout" => {
                let toml::Value::String(s) = value else {
                    return Err(format!("{} must be a duration string", key("dial_timeout")));
                };
                host.dial_timeout =
                    Some(parse_go_duration(s).ok_or_else(|| {
                        format!("{}: {s:?} is not a duration", key("dial_timeout"))
                    })?);
            }
            // Read with the URL.
            "override_path" => {}
            other => ignored.push(key(other)),
        }
    }
    Ok(host)
}

/// A string or a list of strings.
fn strings(value: &toml::Value) -> Option<Vec<String>> {
    match value {
        toml::Value::String(s) => Some(vec![s.clone()]),
        toml::Value::Array(items) => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => None,
    }
}

/// `client`: a file, a list of files (each with its key inside), or `[cert, key]` pairs
/// (an empty key: in the certificate file).
fn client_pairs(
    value: &toml::Value,
    dir: &Path,
) -> std::result::Result<Vec<(PathBuf, Option<PathBuf>)>, String> {
    let single = |p: &str| (absolute(p, dir), None);
    match value {
        toml::Value::String(s) => Ok(vec![single(s)]),
        toml::Value::Array(items) => items
            .iter()
            .map(|item| match item {
                toml::Value::String(s) => Ok(single(s)),
                toml::Value::Array(pair) => match pair.as_slice() {
                    [toml::Value::String(cert), toml::Value::String(key)] => Ok((
                        absolute(cert, dir),
                        (!key.is_empty()).then(|| absolute(key, dir)),
                    )),
                    _ => Err("client: a pair must be [\"cert\", \"key\"]".to_owned()),
                },
                _ => Err("client: entries must be paths or [cert, key] pairs".to_owned()),
            })
            .collect(),
        _ => Err("client must be a path or a list".into()),
    }
}

fn absolute(p: &str, dir: &Path) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_owned()
    } else {
        dir.join(p)
    }
}

/// Go's `time.ParseDuration` for what a config holds: `500ms`, `3s`, `1m30s`, `1.5s`.
fn parse_go_duration(s: &str) -> Option<Duration> {
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..n].parse().ok()?;
        rest = &rest[n..];
        let u = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..u] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[u..];
        total += Duration::try_from_secs_f64(number * unit).ok()?;
    }
    Some(total)
}

/// The directory names containerd looks in for a registry, in order: `host_port_` for
/// `host:port`, then the name itself, then `_default`.
pub fn host_dir_names(registry: &str) -> Vec<String> {
    let mut names = Vec::new();
    if let Some(i) = registry.rfind(':').filter(|&i| i > 0) {
        names.push(format!("{}_{}_", &registry[..i], &registry[i + 1..]));
    }
    names.push(registry.to_owned());
    names.push("_default".to_owned());
    names
}

/// The registry host configuration directory (`config_path`), or none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistryHosts {
    config_path: Option<PathBuf>,
}

impl RegistryHosts {
    /// No configuration: every registry is only itself.
    pub fn none() -> Self {
        Self::default()
    }

    /// Hosts configured under `config_path` (containerd's `config_path`).
    pub fn from_dir(config_path: impl Into<PathBuf>) -> Self {
        Self {
            config_path: Some(config_path.into()),
        }
    }

    /// containerd's usual directory when it exists, else none.
    pub fn system_default() -> Self {
        let dir = Path::new(DEFAULT_CONFIG_PATH);
        if dir.is_dir() {
            Self::from_dir(dir)
        } else {
            Self::none()
        }
    }

    /// The configured directory.
    pub fn config_path(&self) -> Option<&Path> {
        self.config_path.as_deref()
    }

    /// The host directory containerd would use for `registry` (as in the image reference:
    /// `docker.io`, `localhost:5000`), if any.
    pub fn host_dir(&self, registry: &str) -> Option<PathBuf> {
        let root = self.config_path.as_ref()?;
        host_dir_names(registry)
            .into_iter()
            .map(|name| root.join(name))
            .find(|p| p.is_dir())
    }

    /// The hosts for `registry` in the order to try them; the last one is the server (`url:
    /// None`: the registry itself). Without a host directory: the registry alone. A directory
    /// without `hosts.toml` gives the registry with Docker-layout certificates (`*.crt` CAs,
    /// `*.cert` + `*.key` client pairs).
    pub fn load(&self, registry: &str) -> Result<HostsFile> {
        let Some(dir) = self.host_dir(registry) else {
            return Ok(HostsFile {
                hosts: vec![HostConfig::origin()],
                ignored_keys: Vec::new(),
            });
        };
        let path = dir.join("hosts.toml");
        let io = |source| Error::HostsConfig {
            path: path.clone(),
            message: format!("cannot read it: {source}"),
        };
        let text = match read_capped(&path, MAX_HOSTS_FILE) {
            Ok(bytes) => String::from_utf8(bytes).map_err(|_| Error::HostsConfig {
                path: path.clone(),
                message: "not UTF-8".into(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io(e)),
        };
        if text.is_empty() {
            return Ok(HostsFile {
                hosts: vec![cert_files(&dir).map_err(|source| Error::HostsConfig {
                    path: dir.clone(),
                    message: format!("cannot list certificates: {source}"),
                })?],
                ignored_keys: Vec::new(),
            });
        }
        parse_hosts_toml(&text, &dir).map_err(|message| Error::HostsConfig { path, message })
    }
}

/// Docker's `certs.d` layout: `*.crt` are CAs, `*.cert` client certificates with the `*.key`
/// of the same name.
fn cert_files(dir: &Path) -> std::io::Result<HostConfig> {
    let mut host = HostConfig::origin();
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| !t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    for name in names {
        if name.ends_with(".crt") {
            host.ca.push(dir.join(&name));
        } else if let Some(stem) = name.strip_suffix(".cert") {
            let key = dir.join(format!("{stem}.key"));
            let key = key.is_file().then_some(key);
            host.client.push((dir.join(&name), key));
        }
    }
    Ok(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> HostsFile {
        parse_hosts_toml(text, Path::new("/etc/containerd/certs.d/docker.io")).expect(text)
    }

    fn url(scheme: &str, host: &str, path: &str) -> Option<HostUrl> {
        Some(HostUrl {
            scheme: scheme.into(),
            host: host.into(),
            path: path.into(),
        })
    }

    #[test]
    fn containerd_documented_example_parses_in_file_order() {
        let f = parse(
            r#"
server = "https://registry-1.docker.io"

[host."https://public-mirror.example.com"]
  capabilities = ["pull"]
[host."https://docker-mirror.internal"]
  capabilities = ["pull", "resolve"]
  ca = "docker-mirror.crt"
  client = [["/etc/certs/client.cert", "/etc/certs/client.key"],["/etc/certs/client.pem", ""]]
  skip_verify = true
  dial_timeout = "1m30s"
  [host."https://docker-mirror.internal".header]
    x-custom-2 = ["value1", "value2"]
[host."http://a-mirror:5000/custom/api"]
  override_path = true
  header = { x-one = "1" }
"#,
        );
        assert!(f.ignored_keys.is_empty(), "{:?}", f.ignored_keys);
        let h = &f.hosts;
        assert_eq!(h.len(), 4);
        assert_eq!(h[0].url, url("https", "public-mirror.example.com", "/v2"));
        assert_eq!(
            h[0].capabilities,
            Capabilities {
                pull: true,
                resolve: false,
                push: false
            }
        );
        assert_eq!(h[1].url, url("https", "docker-mirror.internal", "/v2"));
        assert!(h[1].capabilities.pull && h[1].capabilities.resolve && !h[1].capabilities.push);
        assert_eq!(
            h[1].ca,
            vec![PathBuf::from(
                "/etc/containerd/certs.d/docker.io/docker-mirror.crt"
            )]
        );
        assert_eq!(
            h[1].client,
            vec![
                (
                    PathBuf::from("/etc/certs/client.cert"),
                    Some(PathBuf::from("/etc/certs/client.key"))
                ),
                (PathBuf::from("/etc/certs/client.pem"), None),
            ]
        );
        assert_eq!(h[1].skip_verify, Some(true));
        assert_eq!(h[1].dial_timeout, Some(Duration::from_secs(90)));
        assert_eq!(
            h[1].header,
            vec![("x-custom-2".into(), vec!["value1".into(), "value2".into()])]
        );
        assert!(h[1].needs_own_client());
        assert_eq!(h[2].url, url("http", "a-mirror:5000", "/custom/api"));
        assert_eq!(h[2].capabilities, Capabilities::ALL);
        assert_eq!(h[2].header, vec![("x-one".into(), vec!["1".into()])]);
        assert!(!h[2].needs_own_client());
        assert_eq!(h[3].url, url("https", "registry-1.docker.io", "/v2"));
        assert_eq!(h[3].capabilities, Capabilities::ALL);
    }

    #[test]
    fn order_is_the_files_not_the_alphabets() {
        let f =
            parse("[host.\"http://zeta:1\"]\n[host.\"http://alpha:2\"]\n[host.\"http://mid:3\"]\n");
        let names: Vec<_> = f
            .hosts
            .iter()
            .map(|h| h.url.as_ref().map(|u| u.host.as_str()))
            .collect();
        assert_eq!(
            names,
            [Some("zeta:1"), Some("alpha:2"), Some("mid:3"), None],
            "mirrors in file order, then the registry itself"
        );
    }

    #[test]
    fn server_forms_and_paths() {
        for (server, expected) in [
            ("registry.example", url("https", "registry.example", "/v2")),
            (
                "http://127.0.0.1:5000",
                url("http", "127.0.0.1:5000", "/v2"),
            ),
            (
                "https://registry-1.docker.io/v2",
                url("https", "registry-1.docker.io", "/v2"),
            ),
            (
                "https://user:secret@mirror.example/cache/",
                url("https", "mirror.example", "/cache/v2"),
            ),
            (
                "https://mirror.example//a/./b/../c",
                url("https", "mirror.example", "/a/c/v2"),
            ),
        ] {
            let f = parse(&format!("server = {server:?}"));
            assert_eq!(f.hosts.len(), 1, "{server}");
            assert_eq!(f.hosts[0].url, expected, "{server}");
        }
        let f = parse("server = \"https://r.example/api\"\noverride_path = true\n");
        assert_eq!(f.hosts[0].url, url("https", "r.example", "/api"));
    }

    #[test]
    fn empty_or_serverless_file_keeps_the_registry_last() {
        let f = parse("");
        assert_eq!(f.hosts, vec![HostConfig::origin()]);
        let f = parse("ca = \"root.pem\"\n[host.\"http://m:1\"]\ncapabilities = [\"pull\"]\n");
        assert_eq!(f.hosts.len(), 2);
        assert_eq!(f.hosts[1].url, None);
        assert_eq!(
            f.hosts[1].ca,
            vec![PathBuf::from("/etc/containerd/certs.d/docker.io/root.pem")]
        );
    }

    #[test]
    fn client_and_ca_forms() {
        let f = parse("ca = [\"/a.pem\", \"b.pem\"]\nclient = \"c.pem\"\n");
        assert_eq!(
            f.hosts[0].ca,
            vec![
                PathBuf::from("/a.pem"),
                PathBuf::from("/etc/containerd/certs.d/docker.io/b.pem")
            ]
        );
        assert_eq!(
            f.hosts[0].client,
            vec![(
                PathBuf::from("/etc/containerd/certs.d/docker.io/c.pem"),
                None
            )]
        );
        let f = parse("client = [\"/x.pem\", \"/y.pem\"]\n");
        assert_eq!(f.hosts[0].client.len(), 2);
    }

    #[test]
    fn unknown_keys_are_ignored_and_reported_like_containerd() {
        let f = parse("servr = \"x\"\n[host.\"http://m:1\"]\ncapabilites = [\"pull\"]\n");
        assert_eq!(f.ignored_keys, ["host.\"m:1\".capabilites", "servr"]);
        assert_eq!(
            f.hosts[0].capabilities,
            Capabilities::ALL,
            "the misspelt key did not apply"
        );
    }

    #[test]
    fn invalid_values_are_errors_naming_the_key() {
        for (text, needle) in [
            (
                "[host.\"http://m:1\"]\ncapabilities = [\"pull\", \"fly\"]",
                "fly",
            ),
            (
                "[host.\"http://m:1\"]\nskip_verify = \"yes\"",
                "skip_verify",
            ),
            ("ca = 3", "ca"),
            ("client = [[\"a\"]]", "client"),
            ("[header]\nx = 1", "header.x"),
            ("dial_timeout = \"soon\"", "dial_timeout"),
            ("server = \"ftp://x\"", "ftp"),
            ("server = 5", "server"),
            ("host = 1", "host"),
            ("[host", "line 1"),
        ] {
            let err = parse_hosts_toml(text, Path::new("/d")).expect_err(text);
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_go_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_go_duration("1h2m3s"), Some(Duration::from_secs(3723)));
        assert_eq!(parse_go_duration("3"), None);
        assert_eq!(parse_go_duration(""), None);
    }

    #[test]
    fn host_directories_are_looked_up_like_containerd() {
        assert_eq!(
            host_dir_names("localhost:5000"),
            ["localhost_5000_", "localhost:5000", "_default"]
        );
        assert_eq!(host_dir_names("docker.io"), ["docker.io", "_default"]);

        let root = tempfile::tempdir().unwrap();
        let hosts = RegistryHosts::from_dir(root.path());
        assert_eq!(hosts.host_dir("r.example:5000"), None);
        let loaded = hosts.load("r.example:5000").unwrap();
        assert_eq!(loaded.hosts, vec![HostConfig::origin()]);

        std::fs::create_dir(root.path().join("_default")).unwrap();
        std::fs::write(
            root.path().join("_default/hosts.toml"),
            "[host.\"http://default-mirror:1\"]\n",
        )
        .unwrap();
        std::fs::create_dir(root.path().join("r.example:5000")).unwrap();
        std::fs::create_dir(root.path().join("r.example_5000_")).unwrap();
        std::fs::write(
            root.path().join("r.example_5000_/hosts.toml"),
            "[host.\"http://port-mirror:2\"]\n",
        )
        .unwrap();
        let host_of = |registry: &str| {
            hosts.load(registry).unwrap().hosts[0]
                .url
                .as_ref()
                .map(|u| u.host.clone())
        };
        assert_eq!(host_of("r.example:5000").as_deref(), Some("port-mirror:2"));
        assert_eq!(
            host_of("other.example").as_deref(),
            Some("default-mirror:1")
        );

        // A directory without hosts.toml: Docker's certificate layout for the registry.
        let docker = root.path().join("docker.io");
        std::fs::create_dir(&docker).unwrap();
        for f in [
            "ca.crt",
            "client.cert",
            "client.key",
            "other.cert",
            "notes.txt",
        ] {
            std::fs::write(docker.join(f), "x").unwrap();
        }
        let h = &hosts.load("docker.io").unwrap().hosts;
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].url, None);
        assert_eq!(h[0].ca, vec![docker.join("ca.crt")]);
        assert_eq!(
            h[0].client,
            vec![
                (docker.join("client.cert"), Some(docker.join("client.key"))),
                (docker.join("other.cert"), None)
            ]
        );

        std::fs::write(root.path().join("_default/hosts.toml"), "[host").unwrap();
        let err = hosts.load("other.example").unwrap_err().to_string();
        assert!(err.contains("_default/hosts.toml"), "{err}");
    }
}
