//! A real containerd (Debian's, with runc) in a temp dir: its own root, state, socket and config,
//! optionally with the Hermes snapshotter declared as a proxy plugin and the CRI plugin set up the
//! way `containerd-cri-here.md` found to work on these machines (plain-HTTP local registry,
//! sandbox image from it, `restrict_oom_score_adj`, snapshot labels passed to remote snapshotters).
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

/// Options for [`Containerd`]; start with [`Containerd::builder`].
#[derive(Debug, Clone, Default)]
pub struct ContainerdBuilder {
    proxy_snapshotter: Option<PathBuf>,
    registry_hosts: Vec<String>,
    sandbox_image: Option<String>,
    cri_snapshotter: Option<String>,
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
    dir: Option<tempfile::TempDir>,
}

impl Containerd {
    /// Options: proxy snapshotter, registries, CRI.
    pub fn builder() -> ContainerdBuilder {
        ContainerdBuilder::default()
    }

    fn start_with(options: ContainerdBuilder) -> Result<Containerd> {
        let program = find_program("containerd", INSTALL)?;
        let ctr = find_program("ctr", INSTALL)?;
        find_program("runc", INSTALL)?;
        find_program("containerd-shim-runc-v2", INSTALL)?;
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
        let child = Command::new(&program)
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(Error::io("start", &program))?;
        let mut containerd = Containerd {
            child: Some(child),
            address,
            log_path,
            hosts_dir,
            ctr,
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
    let d = dir.display();
    let mut config = format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
{disabled}
[grpc]
  address = "{addr}"
[ttrpc]
  address = "{addr}.ttrpc"
[debug]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
"#,
        disabled = if options.sandbox_image.is_some() {
            String::new()
        } else {
            r#"disabled_plugins = ["io.containerd.grpc.v1.cri"]"#.to_owned()
        },
        addr = address.display(),
    );
    if let Some(sandbox) = &options.sandbox_image {
        let snapshotter = options.cri_snapshotter.clone().unwrap_or_else(|| {
            if options.proxy_snapshotter.is_some() {
                PROXY_SNAPSHOTTER.to_owned()
            } else {
                "overlayfs".to_owned()
            }
        });
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
            hosts = hosts_dir.display(),
        ));
    }
    if let Some(socket) = &options.proxy_snapshotter {
        config.push_str(&format!(
            "[proxy_plugins.{PROXY_SNAPSHOTTER}]\n  type = \"snapshot\"\n  address = \"{}\"\n",
            socket.display()
        ));
    }
    config
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
