//! Running the loader script: a shell, a timeout, closed stdin, bounded output.
//!
//! The script runs in its own process group so that a timeout or an oversized output kills the
//! script and everything it started. This module only runs the script and returns its output;
//! parsing is [`crate::directive`]'s job.

use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Default script timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default limit on the script's standard output (directives are short lines).
pub const DEFAULT_OUTPUT_LIMIT: usize = 64 * 1024;
/// How much of the script's standard error is kept (the end of it).
pub const STDERR_KEEP: usize = 16 * 1024;

/// How to run a loader script.
#[derive(Debug, Clone)]
pub struct ScriptOptions {
    /// Kill the script after this long.
    pub timeout: Duration,
    /// Kill the script when its standard output exceeds this many bytes.
    pub output_limit: usize,
    /// Variables added to the inherited environment.
    pub env: Vec<(String, String)>,
    /// Variables removed from the inherited environment.
    pub env_remove: Vec<String>,
    /// The shell; `None` picks `/bin/bash`, else `/bin/sh`.
    pub shell: Option<PathBuf>,
}

impl Default for ScriptOptions {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_TIMEOUT,
            output_limit: DEFAULT_OUTPUT_LIMIT,
            env: Vec::new(),
            env_remove: Vec::new(),
            shell: None,
        }
    }
}

/// A finished, successful script run.
#[derive(Debug, Clone)]
pub struct ScriptRun {
    /// The shell that ran the script.
    pub shell: PathBuf,
    /// Standard output (lossily decoded as UTF-8).
    pub stdout: String,
    /// The end of standard error (at most [`STDERR_KEEP`] bytes).
    pub stderr: String,
    /// Wall time.
    pub elapsed: Duration,
}

/// `/bin/bash` if it exists, else `/bin/sh`.
pub fn default_shell() -> PathBuf {
    let bash = Path::new("/bin/bash");
    if bash.exists() {
        bash.to_path_buf()
    } else {
        PathBuf::from("/bin/sh")
    }
}

enum Stdout {
    Done(Vec<u8>),
    TooLarge(Vec<u8>),
    Failed(std::io::Error),
}

/// Runs `script` with the shell and returns its output; any failure (spawn, non-zero exit,
/// signal, timeout, output over the limit) is an error carrying the end of standard error.
#[tracing::instrument(level = "debug", skip(opts), fields(script = %script.display()))]
pub fn run_script(script: &Path, opts: &ScriptOptions) -> Result<ScriptRun> {
    let shell = opts.shell.clone().unwrap_or_else(default_shell);
    let start = Instant::now();
    let deadline = start + opts.timeout;
    let mut cmd = Command::new(&shell);
    for k in &opts.env_remove {
        cmd.env_remove(k);
    }
    let mut child = cmd
        .arg(script)
        .envs(opts.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|source| Error::ScriptSpawn {
            script: script.to_path_buf(),
            shell: shell.clone(),
            source,
        })?;
    let guard = GroupGuard { pgid: child.id() };

    let (out_tx, out_rx) = mpsc::channel();
    let mut stdout = child.stdout.take();
    let limit = opts.output_limit;
    thread::spawn(move || {
        let Some(pipe) = stdout.as_mut() else {
            return;
        };
        let mut buf = Vec::new();
        let res = match pipe.take(limit as u64 + 1).read_to_end(&mut buf) {
            Ok(_) if buf.len() > limit => Stdout::TooLarge(buf),
            Ok(_) => Stdout::Done(buf),
            Err(e) => Stdout::Failed(e),
        };
        let _ = out_tx.send(res);
    });
    let (err_tx, err_rx) = mpsc::channel();
    let mut stderr = child.stderr.take();
    thread::spawn(move || {
        let mut tail = Vec::new();
        if let Some(pipe) = stderr.as_mut() {
            let mut chunk = [0u8; 4096];
            while let Ok(n @ 1..) = pipe.read(&mut chunk) {
                tail.extend_from_slice(&chunk[..n]);
                if tail.len() > 2 * STDERR_KEEP {
                    tail.drain(..tail.len() - STDERR_KEEP);
                }
            }
        }
        let keep = tail.len().saturating_sub(STDERR_KEEP);
        let _ = err_tx.send(String::from_utf8_lossy(&tail[keep..]).into_owned());
    });

    let io_err = |source| Error::ScriptIo {
        script: script.to_path_buf(),
        source,
    };
    let timeout = || Error::ScriptTimeout {
        script: script.to_path_buf(),
        timeout: opts.timeout,
    };

    let out = match out_rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        Ok(Stdout::Done(b)) => b,
        Ok(Stdout::TooLarge(b)) => {
            drop(guard);
            let _ = child.wait();
            let (line, text) = line_at(&b, limit);
            return Err(Error::ScriptOutputTooLarge {
                script: script.to_path_buf(),
                limit,
                line,
                text,
            });
        }
        Ok(Stdout::Failed(e)) => return Err(io_err(e)),
        Err(_) => {
            drop(guard);
            let _ = child.wait();
            return Err(timeout());
        }
    };
    let Some(status) = wait_until(&mut child, deadline).map_err(io_err)? else {
        drop(guard);
        let _ = child.wait();
        return Err(timeout());
    };
    // Stray background jobs of the script may still hold stderr open: do not wait past the
    // deadline for them, and take them down with the group.
    let stderr = err_rx
        .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        .unwrap_or_default();
    drop(guard);
    if !status.success() {
        return Err(Error::ScriptFailed {
            script: script.to_path_buf(),
            status: describe(status),
            stderr: stderr.trim().to_owned(),
        });
    }
    Ok(ScriptRun {
        shell,
        stdout: String::from_utf8_lossy(&out).into_owned(),
        stderr,
        elapsed: start.elapsed(),
    })
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        (None, None) => status.to_string(),
    }
}

/// The 1-based line that contains byte `at`, and its first 80 characters.
fn line_at(buf: &[u8], at: usize) -> (usize, String) {
    let at = at.min(buf.len());
    let line = buf[..at].iter().filter(|b| **b == b'\n').count() + 1;
    let start = buf[..at]
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |p| p + 1);
    let text: String = String::from_utf8_lossy(&buf[start..at])
        .chars()
        .take(80)
        .collect();
    (line, text)
}

/// Polls `child` until it exits or `deadline` passes (`Ok(None)`).
pub(crate) fn wait_until(
    child: &mut Child,
    deadline: Instant,
) -> std::io::Result<Option<ExitStatus>> {
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(Some(s));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// Kills the script's process group when dropped.
struct GroupGuard {
    pgid: u32,
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        kill_group(self.pgid);
    }
}

/// Sends SIGKILL to process group `pgid`. The group may be gone already (the script and all
/// its children exited): that is not an error, so the result is ignored.
fn kill_group(pgid: u32) {
    if let Some(pgid) = i32::try_from(pgid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_at_finds_line_and_text() {
        assert_eq!(line_at(b"a\nbb\nccc", 7), (3, "cc".to_owned()));
        assert_eq!(line_at(b"abc", 2), (1, "ab".to_owned()));
        assert_eq!(line_at(b"a\n", 2), (2, String::new()));
    }
}
