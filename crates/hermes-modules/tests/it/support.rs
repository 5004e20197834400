//! Test helpers: scripts, processes and the interposer library.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use hermes_modules::resolve::ResolveOptions;
use hermes_modules::script::ScriptOptions;

/// The loader script of the product description, verbatim.
pub const SEED_SCRIPT: &str = r#"#!/bin/bash
# Select modules based on cluster type
if [ "$CLUSTER_ENV" == "production" ]; then
echo "module=mem-profiler,config=prod-tunings"
elif [ "$CLUSTER_ENV" == "staging" ]; then
echo "module=mem-tracer,config=staging-tunings"
else
echo "module=mem-logger"
fi
"#;

/// Writes an executable script.
pub fn write_script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p
}

/// Resolve options for `script` that ignore the machine's /etc/hermes and set `CLUSTER_ENV`
/// (or remove it).
pub fn options(dir: &Path, script: &Path, cluster_env: Option<&str>) -> ResolveOptions {
    let mut so = ScriptOptions::default();
    match cluster_env {
        Some(v) => so.env.push(("CLUSTER_ENV".into(), v.into())),
        None => so.env_remove.push("CLUSTER_ENV".into()),
    }
    ResolveOptions {
        script: script.to_path_buf(),
        default_static_file: dir.join("no-such-modules.yaml"),
        script_options: so,
        ..ResolveOptions::default()
    }
}

/// Polls `f` every few milliseconds until it returns `Some`, or panics naming `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(2);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// A child process killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct Proc(pub Child);

impl Proc {
    /// Spawns `cmd` with piped stdin/stdout and waits for its first stdout line to equal
    /// `ready` (when given).
    pub fn spawn(cmd: &mut Command, ready: Option<&str>) -> (Self, BufReader<ChildStdout>) {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));
        let mut out = BufReader::new(child.stdout.take().unwrap());
        if let Some(r) = ready {
            let mut line = String::new();
            out.read_line(&mut line).unwrap();
            assert_eq!(line.trim(), r, "{cmd:?} did not report ready");
        }
        (Self(child), out)
    }

    /// The pid.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A program that must exist, or the test fails saying what to install.
pub fn require(program: &str, package: &str) -> PathBuf {
    let out = Command::new("/bin/sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .unwrap();
    let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        out.status.success() && !path.is_empty(),
        "`{program}` is required by this test: install {package}"
    );
    PathBuf::from(path)
}

fn target_dir() -> PathBuf {
    // .../target/debug/deps/it-HASH → .../target
    let exe = std::env::current_exe().unwrap();
    exe.ancestors().nth(3).unwrap().to_path_buf()
}

/// Builds `libhermes_memprof.so` once (in its own target dir, so the outer cargo's lock and
/// flags do not matter) and returns its path.
pub fn memprof_so() -> PathBuf {
    static SO: OnceLock<PathBuf> = OnceLock::new();
    SO.get_or_init(|| {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../hermes-memprof/Cargo.toml");
        let target = target_dir().join("memprof-it");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = Command::new(cargo)
            .args([
                "build",
                "--release",
                "-p",
                "hermes-memprof",
                "--manifest-path",
            ])
            .arg(&manifest)
            .arg("--target-dir")
            .arg(&target)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "building hermes-memprof failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let so = target.join("release/libhermes_memprof.so");
        assert!(so.exists(), "{} was not built", so.display());
        so
    })
    .clone()
}

/// Compiles a C program with `cc`.
pub fn compile_c(dir: &Path, name: &str, src: &str) -> PathBuf {
    let cc = require("cc", "gcc (apt-get install gcc)");
    let c = dir.join(format!("{name}.c"));
    std::fs::write(&c, src).unwrap();
    let bin = dir.join(name);
    let out = Command::new(cc)
        .args(["-O0", "-fno-builtin", "-pthread", "-o"])
        .arg(&bin)
        .arg(&c)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cc failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    bin
}
