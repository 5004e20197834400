//! `hermes modules` is wired to the installer: the seed's loader script through the main binary.

use std::process::Command;

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
        let out = Command::new(env!("CARGO_BIN_EXE_hermes"))
            .args(["modules", "resolve", "--json", "--script"])
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
