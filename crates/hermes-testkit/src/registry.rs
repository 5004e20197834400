//! A real `docker-registry` (Debian's build of distribution v2) on a free loopback port, with its
//! storage, config and log in a temp dir. It does not configure TLS or tokens: put a
//! [`FaultProxy`](crate::FaultProxy) in front for bearer auth and faults.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::probe::{find_program, free_port, http_status};
use crate::{Error, Result};

/// How long the registry may take to answer `GET /v2/` after it was started.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often to retry with a new port when the chosen one was taken in the meantime.
const PORT_ATTEMPTS: usize = 5;

/// A running `docker-registry serve` process. Killed, reaped and its temp dir removed on `Drop`.
#[derive(Debug)]
pub struct Registry {
    child: Option<Child>,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Registry {
    /// Starts an anonymous registry (pull and push without credentials).
    pub fn start() -> Result<Registry> {
        Self::start_inner(None, None)
    }

    /// Starts a pull-through cache (distribution's `proxy` mode) of the registry at
    /// `remote_url` (`http://127.0.0.1:PORT`): a blob or manifest it does not have is fetched
    /// from the remote, stored and served. Note what distribution 2.8 does on a miss: it reads
    /// the whole blob from the remote twice (once to store, once to answer, ignoring `Range`)
    /// and once more for every request that misses while the blob is still being stored.
    pub fn start_pull_through(remote_url: &str) -> Result<Registry> {
        Self::start_inner(None, Some(remote_url))
    }

    /// Starts a registry that requires HTTP Basic credentials `user`:`password` (bcrypt htpasswd
    /// file made with `htpasswd -Bbn`, realm `basic`).
    pub fn start_with_htpasswd(user: &str, password: &str) -> Result<Registry> {
        Self::start_inner(Some((user, password)), None)
    }

    fn start_inner(credentials: Option<(&str, &str)>, proxy: Option<&str>) -> Result<Registry> {
        let program = find_program("docker-registry", "apt-get install docker-registry")?;
        let dir = tempfile::Builder::new()
            .prefix("hermes-testkit-registry-")
            .tempdir()
            .map_err(Error::os("create a temp dir for the registry"))?;
        let htpasswd = match credentials {
            Some((user, password)) => Some(write_htpasswd(dir.path(), user, password)?),
            None => None,
        };
        let log_path = dir.path().join("registry.log");
        let mut attempt = 1;
        loop {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
            let config = dir.path().join("config.yml");
            let mut yaml = config_yaml(dir.path(), addr, htpasswd.as_deref());
            if let Some(remote) = proxy {
                yaml.push_str(&format!("proxy:\n  remoteurl: {remote}\n"));
            }
            std::fs::write(&config, yaml).map_err(Error::io("write", &config))?;
            let log = File::create(&log_path).map_err(Error::io("create", &log_path))?;
            let log_err = log.try_clone().map_err(Error::io("reopen", &log_path))?;
            let mut command = Command::new(&program);
            // `REGISTRY_*` variables override the config file; the test environment must not.
            for (name, _) in std::env::vars_os() {
                if name.to_string_lossy().starts_with("REGISTRY_") {
                    command.env_remove(name);
                }
            }
            let mut child = command
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(log_err)
                .spawn()
                .map_err(Error::io("start", &program))?;
            let Err(reason) = wait_ready(&mut child, addr) else {
                return Ok(Registry {
                    child: Some(child),
                    addr,
                    dir,
                });
            };
            kill_and_reap(child);
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            if !log.contains("address already in use") || attempt == PORT_ATTEMPTS {
                return Err(Error::RegistryStart {
                    reason,
                    log_path,
                    log,
                });
            }
            attempt += 1;
        }
    }

    /// `127.0.0.1:PORT`, as used in image references.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The socket address the registry listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The temp dir holding config, log (`registry.log`), htpasswd and storage (`data/`).
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// Where the registry keeps a blob's bytes (`sha256:…`), whether it has it or not: for
    /// checking what a pull-through cache has stored.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(hex.get(..2).unwrap_or(hex))
            .join(hex)
            .join("data")
    }

    /// The registry process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills and reaps the process (idempotent). The temp dir stays until `Drop`, so a test can
    /// check what a client does when the registry is down.
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            kill_and_reap(child);
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Polls `GET /v2/` until it answers 200 or 401; otherwise says why not (the process exited or the
/// timeout passed).
fn wait_ready(child: &mut Child, addr: SocketAddr) -> Result<(), String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited with {status}"));
        }
        if let Some(200 | 401) = http_status(addr, "/v2/") {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "no answer on http://{addr}/v2/ within {READY_TIMEOUT:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn kill_and_reap(mut child: Child) {
    // Errors mean the process is already gone; either way `wait` reaps it.
    let _ = child.kill();
    let _ = child.wait();
}

fn write_htpasswd(dir: &Path, user: &str, password: &str) -> Result<PathBuf> {
    let program = find_program("htpasswd", "apt-get install apache2-utils")?;
    let output = Command::new(&program)
        .args(["-Bbn", user, password])
        .output()
        .map_err(Error::io("run", &program))?;
    if !output.status.success() {
        return Err(Error::Command {
            command: format!("htpasswd -Bbn {user} ***"),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    let path = dir.join("htpasswd");
    std::fs::write(&path, &output.stdout).map_err(Error::io("write", &path))?;
    Ok(path)
}

fn config_yaml(dir: &Path, addr: SocketAddr, htpasswd: Option<&Path>) -> String {
    let data = dir.join("data");
    let mut yaml = format!(
        "version: 0.1\n\
         log:\n  level: info\n  formatter: text\n\
         storage:\n  filesystem:\n    rootdirectory: {data}\n  delete:\n    enabled: true\n\
         http:\n  addr: {addr}\n  secret: hermes-testkit\n",
        data = data.display()
    );
    if let Some(path) = htpasswd {
        yaml.push_str(&format!(
            "auth:\n  htpasswd:\n    realm: basic\n    path: {}\n",
            path.display()
        ));
    }
    yaml
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registry_that_exits_is_reported_with_its_status() {
        let program = find_program("docker-registry", "apt-get install docker-registry").unwrap();
        let mut child = Command::new(program)
            .args(["serve", "/nonexistent/config.yml"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port().unwrap()));
        let reason = wait_ready(&mut child, addr).unwrap_err();
        assert!(reason.starts_with("exited with"), "{reason}");
    }

    #[test]
    fn config_has_loopback_addr_storage_delete_and_htpasswd() {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 5123));
        let yaml = config_yaml(Path::new("/t"), addr, Some(Path::new("/t/htpasswd")));
        for expected in [
            "addr: 127.0.0.1:5123",
            "rootdirectory: /t/data",
            "enabled: true",
            "realm: basic",
            "path: /t/htpasswd",
        ] {
            assert!(yaml.contains(expected), "missing {expected:?} in\n{yaml}");
        }
        assert!(!config_yaml(Path::new("/t"), addr, None).contains("auth:"));
    }
}
