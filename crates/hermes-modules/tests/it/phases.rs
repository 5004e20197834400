//! Multi-step init: repeated, interleaved and interrupted phases converge on one plan.

use std::process::{Command, Stdio};
use std::time::Duration;

use hermes_modules::plan::{ModulePlan, PlanStatus, phase_log_path, read_phase_log};
use hermes_modules::resolve::resolve_phase;

use crate::support::{SEED_SCRIPT, example_bin, options, wait_for, write_script};

#[test]
fn same_plan_after_three_phases() {
    let dir = tempfile::tempdir().unwrap();
    let script = write_script(dir.path(), "load-sidecars.sh", SEED_SCRIPT);
    let state = dir.path().join("state/plan.json");
    let o = options(dir.path(), &script, Some("staging"));
    let first = resolve_phase(&o, &state, "init-1").unwrap();
    assert_eq!(first.status, PlanStatus::Created);
    let bytes = std::fs::read(&state).unwrap();
    for phase in ["init-2", "restart"] {
        let o2 = resolve_phase(&o, &state, phase).unwrap();
        assert_eq!(o2.status, PlanStatus::Unchanged, "phase {phase}");
        assert_eq!(o2.plan, first.plan, "phase {phase}");
    }
    assert_eq!(
        std::fs::read(&state).unwrap(),
        bytes,
        "the plan file is never rewritten"
    );
    assert_eq!(first.plan.keys(), ["mem-tracer:staging-tunings"]);
    let log = read_phase_log(&state);
    assert_eq!(
        log.iter()
            .map(|r| (r.phase.as_str(), r.status.as_str()))
            .collect::<Vec<_>>(),
        [
            ("init-1", "created"),
            ("init-2", "unchanged"),
            ("restart", "unchanged")
        ]
    );
}

#[test]
fn changed_script_output_between_phases_is_reported_not_mixed() {
    let dir = tempfile::tempdir().unwrap();
    let script = write_script(dir.path(), "load-sidecars.sh", SEED_SCRIPT);
    let state = dir.path().join("plan.json");
    resolve_phase(
        &options(dir.path(), &script, Some("production")),
        &state,
        "a",
    )
    .unwrap();
    let b = resolve_phase(&options(dir.path(), &script, Some("staging")), &state, "b").unwrap();
    assert_eq!(
        b.status,
        PlanStatus::Drifted {
            added: vec!["mem-tracer:staging-tunings".into()],
            removed: vec!["mem-profiler:prod-tunings".into()],
        }
    );
    assert_eq!(
        b.plan.keys(),
        ["mem-profiler:prod-tunings"],
        "the stored plan stays in force"
    );
    assert_eq!(
        ModulePlan::load(&state).unwrap().keys(),
        ["mem-profiler:prod-tunings"]
    );
    assert_eq!(read_phase_log(&state)[1].status, "drifted");
}

fn resolve_cmd(script: &std::path::Path, state: &std::path::Path, phase: &str) -> Command {
    let mut c = Command::new(example_bin());
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
        let mut c = Command::new(example_bin());
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
    let out = Command::new(example_bin())
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
