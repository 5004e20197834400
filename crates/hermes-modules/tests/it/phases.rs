//! Multi-step init: repeated phases converge on one plan, a changed resolution is reported as
//! drift. (Phases as separate, interleaved and killed processes: the `hermes` binary's tests.)

use hermes_modules::plan::{ModulePlan, PlanStatus, read_phase_log};
use hermes_modules::resolve::resolve_phase;

use crate::support::{SEED_SCRIPT, options, write_script};

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
