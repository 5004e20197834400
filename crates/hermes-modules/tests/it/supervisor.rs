//! The supervisor: the `run` command as a real process, and restarts after failures.

use std::io::{BufRead, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use hermes_modules::catalog::ModuleCatalog;
use hermes_modules::directive::{Origin, parse_directives};
use hermes_modules::plan::{ModulePlan, PlanSource};
use hermes_modules::supervisor::{RunConfig, RunLock, Supervisor, Target};

use crate::support::{Proc, example_bin, signal, wait_for};

fn fast_plan(text: &str) -> ModulePlan {
    let o = Origin::Script("/test".into());
    let modules = ModuleCatalog::builtin()
        .plan(&o, &parse_directives(&o, text).unwrap())
        .unwrap();
    ModulePlan::new(
        PlanSource::Script {
            path: "/test".into(),
        },
        "test",
        modules,
    )
}

const FAST: &str = "module=mem-logger,interval_ms=50,report_interval_ms=100\n\
                    module=mem-tracer,interval_ms=50,report_interval_ms=100,window=8\n";

fn get(addr: &str, path: &str) -> Option<String> {
    let mut c = TcpStream::connect(addr).ok()?;
    write!(c, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
    let mut s = String::new();
    c.read_to_string(&mut s).ok()?;
    Some(s)
}

fn sleeper() -> Proc {
    Proc::spawn(
        Command::new("/bin/bash").args(["-c", "echo ready; read -r _"]),
        Some("ready"),
    )
    .0
}

#[test]
fn run_serves_metrics_writes_reports_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("plan.json");
    hermes_modules::plan::commit(&state, "test", fast_plan(FAST)).unwrap();
    let target = sleeper();
    let reports = dir.path().join("reports");
    let (mut run, mut out) = Proc::spawn(
        Command::new(example_bin())
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
    out.read_line(&mut first).unwrap();
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
    assert!(get(&addr, "/healthz").unwrap().ends_with("ok\n"));

    // A second supervisor of the same plan refuses to load the modules again.
    let second = Command::new(example_bin())
        .args(["run", "--metrics-addr", "127.0.0.1:0", "--state"])
        .arg(&state)
        .output()
        .unwrap();
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

    signal(run.pid(), "TERM");
    let status = wait_for(
        "the supervisor to exit after SIGTERM",
        Duration::from_secs(10),
        || run.0.try_wait().unwrap(),
    );
    assert!(status.success(), "{status:?}");
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert!(
        rest.starts_with("stopped: mem-logger:default samples="),
        "{rest}"
    );

    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(reports.join("mem-logger.json")).unwrap()).unwrap();
    assert_eq!(report["module"], "mem-logger");
    assert_eq!(report["targets"], serde_json::json!([target.pid()]));
    let procs = report["data"]["processes"].as_array().unwrap();
    assert_eq!(procs[0]["pid"], target.pid());
    assert!(procs[0]["rss_bytes"].as_u64().unwrap() > 0);
    let leftovers: Vec<_> = std::fs::read_dir(&reports)
        .unwrap()
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
fn run_lock_is_exclusive_and_stale_locks_are_taken_over() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("plan.json");
    let lock = RunLock::acquire(&state).unwrap();
    assert_eq!(
        std::fs::read_to_string(RunLock::path_for(&state)).unwrap(),
        std::process::id().to_string()
    );
    drop(lock);
    assert!(!RunLock::path_for(&state).exists(), "released on drop");
    // A live owner (another process) blocks.
    let holder = sleeper();
    std::fs::write(RunLock::path_for(&state), holder.pid().to_string()).unwrap();
    let e = RunLock::acquire(&state).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "the modules of {} are already supervised by pid {}; each module is loaded once per plan (stop that supervisor first)",
            state.display(),
            holder.pid()
        )
    );
    // A dead owner's lock is taken over.
    std::fs::write(RunLock::path_for(&state), "999999999").unwrap();
    let l = RunLock::acquire(&state).unwrap();
    assert_eq!(
        std::fs::read_to_string(RunLock::path_for(&state)).unwrap(),
        std::process::id().to_string()
    );
    drop(l);
}

#[test]
fn failing_modules_restart_with_backoff_and_recover() {
    let dir = tempfile::tempdir().unwrap();
    let target = sleeper();
    // The report directory is a file: every report write fails, so each module fails.
    let reports = dir.path().join("reports");
    std::fs::write(&reports, b"in the way").unwrap();
    let sup = Supervisor::start(RunConfig {
        plan: fast_plan(FAST),
        target: Target::Pid(target.pid()),
        metrics_addr: None,
        report_dir: reports.clone(),
        memprof_dir: dir.path().join("memprof"),
    })
    .unwrap();
    wait_for(
        "two restarts of each module",
        Duration::from_secs(10),
        || sup.status().iter().all(|s| s.restarts >= 2).then_some(()),
    );
    let st = sup.status();
    assert!(
        st[0].last_error.as_deref().unwrap().starts_with(&format!(
            "cannot write report {}",
            reports.join("mem-logger.json").display()
        )),
        "{st:?}"
    );
    assert!(
        sup.metrics_text()
            .contains("hermes_module_restarts_total{module=\"mem-logger\"}")
    );

    // Fix the cause: the modules come back by themselves.
    std::fs::remove_file(&reports).unwrap();
    wait_for("reports after recovery", Duration::from_secs(15), || {
        (reports.join("mem-logger.json").exists() && reports.join("mem-tracer.json").exists())
            .then_some(())
    });
    let before = sup.status();
    let fin = sup.stop();
    assert!(fin.iter().all(|s| s.samples >= 1), "{fin:?}");
    assert_eq!(
        before.iter().map(|s| s.restarts).collect::<Vec<_>>(),
        fin.iter().map(|s| s.restarts).collect::<Vec<_>>(),
        "no restarts after recovery"
    );
    assert!(Path::new(&reports).is_dir());
}
