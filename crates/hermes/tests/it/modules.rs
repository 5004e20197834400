//! `hermes modules` is wired to the installer: the seed's loader script through the main binary,
//! init phases as separate (and killed) processes, the supervisor as a process stopped by
//! SIGTERM, and the admission review and webhook commands.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use hermes_modules::plan::{ModulePlan, phase_log_path, read_phase_log};

const SEED_SCRIPT: &str = r#"#!/bin/bash
# Select modules based on cluster type
if [ "$CLUSTER_ENV" == "production" ]; then
  echo "module=mem-profiler,config=prod-tunings"
elif [ "$CLUSTER_ENV" == "staging" ]; then
  echo "module=mem-tracer,config=staging-tunings"
else
  echo "module=mem-logger"
fi
"#;

/// `hermes modules`, to which a test adds the subcommand and its flags.
fn hermes_modules_cmd() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hermes"));
    c.arg("modules");
    c
}

/// Writes a loader script.
fn write_script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).expect("script");
    p
}

/// Polls `f` until it returns `Some`, or panics naming `what` after `timeout`.
fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Some(v) => return v,
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            None => panic!("timed out after {timeout:?} waiting for {what}"),
        }
    }
}

/// `hermes modules resolve --json` of `script` into `state` as phase `phase`.
fn resolve_cmd(script: &Path, state: &Path, phase: &str) -> Command {
    let mut c = hermes_modules_cmd();
    c.args(["resolve", "--json", "--phase", phase, "--script"])
        .arg(script)
        .arg("--state")
        .arg(state)
        .env("CLUSTER_ENV", "production")
        .env_remove("HERMES_MODULES")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

#[test]
fn resolve_runs_the_loader_script_per_environment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = dir.path().join("load-sidecars.sh");
    std::fs::write(&script, SEED_SCRIPT).expect("script");
    for (env, module, config) in [
        ("production", "mem-profiler", "prod-tunings"),
        ("staging", "mem-tracer", "staging-tunings"),
        ("", "mem-logger", "default"),
    ] {
        let state = dir.path().join(format!("state-{module}.json"));
        let out = hermes_modules_cmd()
            .args(["resolve", "--json", "--script"])
            .arg(&script)
            .arg("--state")
            .arg(&state)
            .env("CLUSTER_ENV", env)
            .output()
            .expect("run hermes");
        assert!(
            out.status.success(),
            "{env}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        let modules = v["plan"]["modules"].as_array().expect("modules");
        assert_eq!(modules.len(), 1, "{env}: {v}");
        assert_eq!(modules[0]["module"], module, "{env}");
        assert_eq!(modules[0]["config"], config, "{env}");
    }
}

#[test]
fn interleaved_phase_processes_agree_and_one_creates() {
    let dir = tempfile::tempdir().unwrap();
    // Each phase sleeps a different time inside the script, so that phases overlap.
    let script = write_script(
        dir.path(),
        "s.sh",
        "sleep 0.0$((RANDOM % 9))\necho module=mem-profiler,config=prod-tunings\necho module=mem-logger\n",
    );
    let state = dir.path().join("plan.json");
    let children: Vec<_> = (0..6)
        .map(|i| {
            resolve_cmd(&script, &state, &format!("p{i}"))
                .spawn()
                .unwrap()
        })
        .collect();
    let mut created = 0;
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let status = v["status"].as_str().unwrap();
        assert!(matches!(status, "created" | "unchanged"), "{v}");
        created += usize::from(status == "created");
        let modules: Vec<String> = v["plan"]["modules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                format!(
                    "{}:{}",
                    m["module"].as_str().unwrap(),
                    m["config"].as_str().unwrap()
                )
            })
            .collect();
        assert_eq!(modules, ["mem-logger:default", "mem-profiler:prod-tunings"]);
    }
    assert_eq!(created, 1, "exactly one phase creates the plan");
    assert_eq!(read_phase_log(&state).len(), 6);
}

#[test]
fn killed_phases_leave_no_partial_state_and_later_phases_converge() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("started");
    let script = write_script(
        dir.path(),
        "s.sh",
        &format!(
            "touch {}\nsleep 0.2\necho module=mem-profiler,config=prod-tunings\n",
            marker.display()
        ),
    );
    let state = dir.path().join("plan.json");

    // 1. A phase killed while its script runs: nothing is written.
    let mut c = resolve_cmd(&script, &state, "killed").spawn().unwrap();
    wait_for("the script to start", Duration::from_secs(10), || {
        marker.exists().then_some(())
    });
    c.kill().unwrap();
    c.wait().unwrap();
    assert!(
        !state.exists(),
        "a killed phase must not leave a state file"
    );

    // 2. Phases killed at staggered moments, some possibly while writing.
    for round in 0..4u64 {
        let mut c = resolve_cmd(&script, &state, &format!("racer{round}"))
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(180 + round * 15));
        let _ = c.kill();
        let _ = c.wait();
        if state.exists() {
            ModulePlan::load(&state).expect("the state file is always a whole plan");
        }
    }
    // A writer that died mid-write (a pid that cannot exist) left a partial temp file.
    let partial = dir.path().join(".plan.json.tmp.999999999.42");
    std::fs::write(&partial, b"{\"version\":1,\"sou").unwrap();

    // 3. Three later phases converge on one plan.
    let mut plans = Vec::new();
    for phase in ["init-1", "init-2", "init-3"] {
        let out = resolve_cmd(&script, &state, phase).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        plans.push(v["plan"].clone());
    }
    assert!(plans.windows(2).all(|w| w[0] == w[1]), "{plans:?}");
    assert_eq!(
        ModulePlan::load(&state).unwrap().keys(),
        ["mem-profiler:prod-tunings"]
    );
    assert!(
        !partial.exists(),
        "the dead writer's temp file is cleaned up"
    );
    assert!(phase_log_path(&state).exists());
}

#[test]
fn resolve_command_reports_drift_with_exit_code_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let script = write_script(dir.path(), "load-sidecars.sh", SEED_SCRIPT);
    let state = dir.path().join("plan.json");
    let out = resolve_cmd(&script, &state, "a").output().unwrap();
    assert!(out.status.success());
    let mut c = resolve_cmd(&script, &state, "b");
    c.env("CLUSTER_ENV", "staging").arg("--fail-on-drift");
    let out = c.output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "drifted");
    assert_eq!(
        v["added"],
        serde_json::json!(["mem-tracer:staging-tunings"])
    );
}

#[test]
fn resolve_command_prints_the_plan_for_people() {
    let dir = tempfile::tempdir().unwrap();
    let script = write_script(dir.path(), "load-sidecars.sh", SEED_SCRIPT);
    let state = dir.path().join("plan.json");
    let text = |phase: &str| {
        let mut c = hermes_modules_cmd();
        c.args(["resolve", "--phase", phase, "--script"])
            .arg(&script)
            .arg("--state")
            .arg(&state)
            .env("CLUSTER_ENV", "staging");
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(
        text("init"),
        format!(
            "phase init: plan created (created by phase init, source: script {})\n  mem-tracer:staging-tunings\n",
            script.display()
        )
    );
    assert!(text("again").starts_with("phase again: plan unchanged (created by phase init"));
}

#[test]
fn script_path_comes_from_hermes_module_script() {
    let dir = tempfile::tempdir().unwrap();
    let script = write_script(
        dir.path(),
        "custom.sh",
        "echo module=mem-logger,config=dev-tunings\n",
    );
    let state = dir.path().join("plan.json");
    let out = hermes_modules_cmd()
        .args(["resolve", "--json", "--state"])
        .arg(&state)
        .env("HERMES_MODULE_SCRIPT", &script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["plan"]["source"]["path"], script.display().to_string());
    assert_eq!(v["plan"]["modules"][0]["config"], "dev-tunings");
}

/// A child process killed (SIGKILL) and reaped on drop.
struct Proc(Child);

impl Proc {
    /// Spawns `cmd` with piped stdin and stdout; waits for a first stdout line `ready` if given.
    fn spawn(cmd: &mut Command, ready: Option<&str>) -> (Self, BufReader<ChildStdout>) {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        if let Some(r) = ready {
            let mut line = String::new();
            out.read_line(&mut line).expect("first line");
            assert_eq!(line.trim(), r, "{cmd:?} did not report ready");
        }
        (Self(child), out)
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn get(addr: &str, path: &str) -> Option<String> {
    let mut c = TcpStream::connect(addr).ok()?;
    write!(c, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
    let mut s = String::new();
    c.read_to_string(&mut s).ok()?;
    Some(s)
}

#[test]
fn run_serves_metrics_writes_reports_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The plan as a pod gets it: `resolve` (fast sampling for the test), then `run`.
    let script = write_script(
        dir.path(),
        "fast.sh",
        "echo module=mem-logger,interval_ms=50,report_interval_ms=100\n\
         echo module=mem-tracer,interval_ms=50,report_interval_ms=100,window=8\n",
    );
    let state = dir.path().join("plan.json");
    let out = resolve_cmd(&script, &state, "init")
        .output()
        .expect("resolve");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (target, _target_out) = Proc::spawn(
        Command::new("/bin/bash").args(["-c", "echo ready; read -r _"]),
        Some("ready"),
    );
    let reports = dir.path().join("reports");
    let (mut run, mut out) = Proc::spawn(
        hermes_modules_cmd()
            .args([
                "run",
                "--metrics-addr",
                "127.0.0.1:0",
                "--target-pid",
                &target.pid().to_string(),
            ])
            .arg("--state")
            .arg(&state)
            .arg("--report-dir")
            .arg(&reports)
            .arg("--memprof-dir")
            .arg(dir.path().join("memprof"))
            .stderr(Stdio::inherit()),
        None,
    );
    let mut first = String::new();
    out.read_line(&mut first).expect("first line");
    let addr = first
        .strip_prefix("metrics on http://")
        .and_then(|r| r.split_once("/metrics"))
        .map(|(a, _)| a.to_owned())
        .unwrap_or_else(|| panic!("unexpected first line {first:?}"));
    assert!(
        first.contains("modules: mem-logger:default, mem-tracer:default"),
        "{first}"
    );

    let rss_line = format!("hermes_mem_rss_bytes{{pid=\"{}\"}}", target.pid());
    let body = wait_for(
        "metrics with the target's RSS",
        Duration::from_secs(10),
        || {
            get(&addr, "/metrics")
                .filter(|b| b.contains(&rss_line) && b.contains("hermes_mem_leak_alerts_total"))
        },
    );
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    assert!(
        body.contains("hermes_module_up{module=\"mem-logger\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("# TYPE hermes_module_restarts_total counter"),
        "{body}"
    );
    assert!(get(&addr, "/healthz").expect("healthz").ends_with("ok\n"));

    // A second supervisor of the same plan refuses to load the modules again.
    let second = hermes_modules_cmd()
        .args(["run", "--metrics-addr", "127.0.0.1:0", "--state"])
        .arg(&state)
        .output()
        .expect("second run");
    assert_eq!(second.status.code(), Some(1));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains(&format!("already supervised by pid {}", run.pid())),
        "{err}"
    );

    for m in ["mem-logger", "mem-tracer"] {
        wait_for("a report", Duration::from_secs(10), || {
            reports.join(format!("{m}.json")).exists().then_some(())
        });
    }

    let pid = i32::try_from(run.pid())
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .expect("a pid");
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
    let status = wait_for(
        "the supervisor to exit after SIGTERM",
        Duration::from_secs(10),
        || run.0.try_wait().expect("try_wait"),
    );
    assert!(status.success(), "{status:?}");
    let mut rest = String::new();
    out.read_to_string(&mut rest).expect("rest");
    assert!(
        rest.starts_with("stopped: mem-logger:default samples="),
        "{rest}"
    );

    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(reports.join("mem-logger.json")).expect("report"))
            .expect("json");
    assert_eq!(report["module"], "mem-logger");
    assert_eq!(report["targets"], serde_json::json!([target.pid()]));
    let procs = report["data"]["processes"].as_array().expect("processes");
    assert_eq!(procs[0]["pid"], target.pid());
    assert!(procs[0]["rss_bytes"].as_u64().expect("rss") > 0);
    let leftovers: Vec<_> = std::fs::read_dir(&reports)
        .expect("reports")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        leftovers.len(),
        2,
        "only the two reports, no temp files: {leftovers:?}"
    );
}

#[test]
fn review_command_answers_from_stdin() {
    let request = serde_json::json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": { "group": "", "version": "v1", "kind": "Pod" },
            "namespace": "shop",
            "operation": "CREATE",
            "object": {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": { "generateName": "web-", "namespace": "shop" },
                "spec": { "containers": [{ "name": "web", "image": "nginx:1.27" }] }
            }
        }
    });
    let mut c = hermes_modules_cmd()
        .args(["review", "--image", "hermes:test"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let body = serde_json::to_vec(&request).expect("json");
    c.stdin
        .take()
        .expect("stdin")
        .write_all(&body)
        .expect("write");
    let out = c.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json answer");
    // The patch builder's own tests check the patch; here: the flags reach it (the image, the
    // default loader ConfigMap and metrics port) and its answer is printed unchanged.
    let expected = hermes_kube::webhook::review(
        &request,
        &hermes_kube::webhook::InjectConfig {
            image: "hermes:test".into(),
            loader_config_map: "hermes-module-loader".into(),
            metrics_port: 9477,
            sidecar: hermes_kube::webhook::SidecarMode::Native,
        },
    );
    assert!(expected["response"]["patch"].is_string(), "{expected}");
    assert_eq!(answer, expected);

    let bad = hermes_modules_cmd()
        .args(["review", "--image", "x"])
        .stdin(Stdio::null())
        .output()
        .expect("run");
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&bad.stderr).starts_with(
            "error: cannot read an AdmissionReview JSON document from stdin: EOF while parsing"
        ),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

#[test]
fn webhook_command_serves_https_and_prints_its_address() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = crate::controller::self_signed(dir.path());
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).expect("mkdir");
    let (_server, mut out) = Proc::spawn(
        hermes_modules_cmd()
            .args(WEBHOOK_ARGS)
            .args(["--sidecar-mode", "native"])
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key)
            .arg("--policies")
            .arg(&policies)
            .stderr(Stdio::inherit()),
        None,
    );
    let mut addr = String::new();
    out.read_line(&mut addr).expect("address line");
    let url = format!("https://{}/healthz", addr.trim());
    let curl = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg("--cacert")
        .arg(&cert)
        .arg(&url)
        .output()
        .expect("curl is required for the webhook TLS test: apt-get install curl");
    assert_eq!(
        String::from_utf8_lossy(&curl.stdout),
        "200",
        "GET {url}: {}",
        String::from_utf8_lossy(&curl.stderr)
    );
}

/// `hermes modules webhook` on a free port, injecting `hermes:test`.
const WEBHOOK_ARGS: [&str; 5] = [
    "webhook",
    "--listen",
    "127.0.0.1:0",
    "--image",
    "hermes:test",
];

/// `--sidecar-mode auto` (the default) needs the API server's version: with no cluster to ask,
/// the webhook does not start and says what to pass instead.
#[test]
fn webhook_sidecar_mode_auto_without_a_cluster_fails_naming_the_flag() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = hermes_modules_cmd()
        .args(WEBHOOK_ARGS)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .env("KUBECONFIG", dir.path().join("no-kubeconfig"))
        .env("HOME", dir.path())
        .stdin(Stdio::null())
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with(
            "error: --sidecar-mode auto: cannot tell whether the cluster has native sidecars: "
        ),
        "{stderr}"
    );
}
