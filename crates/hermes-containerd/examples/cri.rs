//! A minimal kubelet for scripts (`bench/chaos.py`): one container start through containerd's
//! CRI, as a kubelet drives it, and its outcome as one JSON line on stdout.
//!
//! `cri --address SOCK start --image REF --pod NAME --log-dir DIR [-- COMMAND…]`: `PullImage`,
//! `RunPodSandbox` (host network), `CreateContainer`, `StartContainer`, wait for the exit, read
//! the log, remove the pod. Prints `ok`, the step that failed and its error if one did, the
//! container's exit code and output lines, and seconds from the pull's start to: the pull's
//! end (`pulled_s`), `StartContainer`'s return (`created_s`), the process start (`running_s`)
//! and exit (`exited_s`) as the runtime recorded them. Exits 0 whenever it could print that.
//!
//! `cri --address SOCK remove-image REF`: `RemoveImage`, as a kubelet's image GC does.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use clap::{Parser, Subcommand};
use hermes_containerd::{ContainerState, Cri, log_lines};
use hermes_node_api::error_chain;
use serde_json::{Value, json};

#[derive(Debug, Parser)]
struct Args {
    /// containerd's socket (CRI is served on it).
    #[arg(long)]
    address: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start one container in its own host-network pod, wait for its exit, remove the pod.
    Start {
        /// The image.
        #[arg(long)]
        image: String,
        /// The pod's name (unique among running pods).
        #[arg(long)]
        pod: String,
        /// Where the container's log is written.
        #[arg(long)]
        log_dir: PathBuf,
        /// Give up waiting for the exit after this many seconds.
        #[arg(long, default_value_t = 300)]
        timeout_secs: u64,
        /// The command [default: the image's entrypoint].
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Remove an image.
    RemoveImage {
        /// Reference or image ID.
        image: String,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cri: cannot start a tokio runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let answer = runtime.block_on(async {
        let cri = match Cri::connect(&args.address).await {
            Ok(cri) => cri,
            Err(error) => return failed("connect", error_chain(&error), json!({})),
        };
        match args.command {
            Command::Start {
                image,
                pod,
                log_dir,
                timeout_secs,
                command,
            } => {
                let command: Vec<&str> = command.iter().map(String::as_str).collect();
                start(&cri, &image, &pod, &log_dir, &command, timeout_secs).await
            }
            Command::RemoveImage { image } => match cri.remove_image(&image).await {
                Ok(()) => json!({ "ok": true }),
                Err(error) => failed("RemoveImage", error_chain(&error), json!({})),
            },
        }
    });
    println!("{answer}");
    ExitCode::SUCCESS
}

fn failed(step: &str, error: String, mut so_far: Value) -> Value {
    so_far["ok"] = json!(false);
    so_far["failed_step"] = json!(step);
    so_far["error"] = json!(error);
    so_far
}

/// Seconds from `t0` to `t`, negative if `t` is earlier.
fn since(t0: SystemTime, t: SystemTime) -> f64 {
    match t.duration_since(t0) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

async fn start(
    cri: &Cri,
    image: &str,
    pod_name: &str,
    log_dir: &std::path::Path,
    command: &[&str],
    timeout_secs: u64,
) -> Value {
    let t0 = SystemTime::now();
    let mut out = json!({});
    if let Err(error) = cri.pull_image(image).await {
        return failed("PullImage", error_chain(&error), out);
    }
    out["pulled_s"] = json!(since(t0, SystemTime::now()));
    let pod = match cri.run_host_network_pod(pod_name, "chaos", log_dir).await {
        Ok(pod) => pod,
        Err(error) => return failed("RunPodSandbox", error_chain(&error), out),
    };
    let outcome = run_in(cri, &pod, image, command, timeout_secs, t0, &mut out).await;
    let log = std::fs::read_to_string(Cri::log_path(&pod, "app")).unwrap_or_default();
    out["lines"] = json!(log_lines(&log));
    if let Err(error) = cri.remove_pod(&pod).await {
        out["cleanup_error"] = json!(error_chain(&error));
    }
    match outcome {
        Ok(()) => {
            out["ok"] = json!(true);
            out
        }
        Err((step, error)) => failed(step, error, out),
    }
}

/// Creates, starts and waits for the container; fills in its times and exit code.
async fn run_in(
    cri: &Cri,
    pod: &hermes_containerd::Pod,
    image: &str,
    command: &[&str],
    timeout_secs: u64,
    t0: SystemTime,
    out: &mut Value,
) -> Result<(), (&'static str, String)> {
    let id = cri
        .start_container(pod, "app", image, command)
        .await
        .map_err(|e| ("CreateContainer/StartContainer", error_chain(&e)))?;
    out["created_s"] = json!(since(t0, SystemTime::now()));
    let deadline = Instant::now() + Duration::from_secs(timeout_secs);
    loop {
        let status = cri
            .container_status(&id)
            .await
            .map_err(|e| ("ContainerStatus", error_chain(&e)))?;
        if let Some(t) = status.started_at {
            out["running_s"] = json!(since(t0, t));
        }
        if let ContainerState::Exited(code) = status.state {
            out["exit_code"] = json!(code);
            if let Some(t) = status.finished_at {
                out["exited_s"] = json!(since(t0, t));
            }
            if !status.reason.is_empty() || !status.message.is_empty() {
                out["reason"] = json!(format!("{} {}", status.reason, status.message));
            }
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err((
                "wait",
                format!("still {:?} after {timeout_secs}s", status.state),
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
