//! The supervisor: its run lock, and restarts after failures. (The `run` command as a real
//! process stopped by SIGTERM: the `hermes` binary's tests.)

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use hermes_modules::catalog::ModuleCatalog;
use hermes_modules::directive::{Origin, parse_directives};
use hermes_modules::plan::{ModulePlan, PlanSource};
use hermes_modules::supervisor::{RunConfig, RunLock, Supervisor, Target};

use crate::support::{Proc, wait_for};

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

fn sleeper() -> Proc {
    Proc::spawn(
        Command::new("/bin/bash").args(["-c", "echo ready; read -r _"]),
        Some("ready"),
    )
    .0
}

#[test]
fn run_lock_is_exclusive_and_released_on_drop() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("plan.json");
    let lock = RunLock::acquire(&state).unwrap();
    assert_eq!(
        std::fs::read_to_string(RunLock::path_for(&state)).unwrap(),
        std::process::id().to_string()
    );
    // A second supervisor (here: a second open of the lock file) is refused, naming the owner.
    let e = RunLock::acquire(&state).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "the modules of {} are already supervised by pid {}; each module is loaded once per plan (stop that supervisor first)",
            state.display(),
            std::process::id()
        )
    );
    drop(lock);
    let again = RunLock::acquire(&state).expect("released on drop");
    drop(again);
}

/// The kubelet re-runs a pod's init in a new sandbox, a new PID namespace: the lock file left by
/// the killed supervisor names a pid that is now some other live process of the pod. The lock
/// used to count that as a running supervisor and refuse, so the pod's modules never loaded.
#[test]
fn a_stale_lock_naming_a_live_pid_from_an_old_sandbox_does_not_block() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("plan.json");
    let unrelated = sleeper();
    std::fs::write(RunLock::path_for(&state), unrelated.pid().to_string()).unwrap();
    let lock = RunLock::acquire(&state).expect("a lock nobody holds is free");
    assert_eq!(
        std::fs::read_to_string(RunLock::path_for(&state)).unwrap(),
        std::process::id().to_string()
    );
    drop(lock);
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
