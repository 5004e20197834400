//! Resolution with real loader scripts run by /bin/bash.

use std::path::Path;
use std::time::{Duration, Instant};

use hermes_modules::Error;
use hermes_modules::catalog::PlannedModule;
use hermes_modules::plan::PlanSource;
use hermes_modules::resolve::resolve;
use hermes_modules::static_config::OnScriptError;

use crate::support::{SEED_SCRIPT, options, wait_for, write_script};

fn keys(ms: &[PlannedModule]) -> Vec<String> {
    ms.iter().map(PlannedModule::key).collect()
}

#[test]
fn seed_script_selects_modules_by_cluster_env() {
    let dir = tempfile::tempdir().unwrap();
    let script = write_script(dir.path(), "load-sidecars.sh", SEED_SCRIPT);
    for (env, expected) in [
        (Some("production"), "mem-profiler:prod-tunings"),
        (Some("staging"), "mem-tracer:staging-tunings"),
        (None, "mem-logger:default"),
    ] {
        let r = resolve(&options(dir.path(), &script, env)).unwrap();
        assert_eq!(keys(&r.modules), [expected], "CLUSTER_ENV={env:?}");
        assert_eq!(
            r.source,
            PlanSource::Script {
                path: script.clone()
            }
        );
    }
    let prod = resolve(&options(dir.path(), &script, Some("production"))).unwrap();
    assert_eq!(
        prod.modules[0].settings.interval_ms, 15_000,
        "prod-tunings settings are planned"
    );
}

#[test]
fn script_gets_pod_metadata_closed_stdin_and_its_stderr_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let script = write_script(
        dir.path(),
        "s.sh",
        r#"
if read -r line; then echo "stdin was open" >&2; exit 9; fi
[ "$HERMES_POD_NAME" = web-1 ] && [ "$HERMES_NAMESPACE" = shop ] && [ "$HERMES_NODE_NAME" = n1 ] || exit 7
echo "selected for $HERMES_POD_NAME" >&2
echo "  module = mem-tracer , config = dev-tunings , window = 12  "
"#,
    );
    let mut o = options(dir.path(), &script, None);
    for (k, v) in [
        ("HERMES_POD_NAME", "web-1"),
        ("HERMES_NAMESPACE", "shop"),
        ("HERMES_NODE_NAME", "n1"),
    ] {
        o.script_options.env.push((k.into(), v.into()));
    }
    let r = resolve(&o).unwrap();
    assert_eq!(keys(&r.modules), ["mem-tracer:dev-tunings"]);
    assert_eq!(r.modules[0].settings.window, 12);
    assert_eq!(
        r.script_stderr.as_deref().map(str::trim),
        Some("selected for web-1")
    );
}

#[test]
fn nonzero_exit_is_an_error_with_status_and_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let script = write_script(
        dir.path(),
        "s.sh",
        "echo module=mem-logger\necho 'no cluster label on node' >&2\nexit 3\n",
    );
    let e = resolve(&options(dir.path(), &script, None)).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "loader script {} failed (exit status 3); its stderr: no cluster label on node",
            script.display()
        )
    );
}

#[test]
fn timeout_kills_the_whole_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("bg.pid");
    let script = write_script(
        dir.path(),
        "s.sh",
        &format!("sleep 30 &\necho $! > {}\nsleep 30\n", pidfile.display()),
    );
    let mut o = options(dir.path(), &script, None);
    o.script_options.timeout = Duration::from_millis(300);
    let start = Instant::now();
    let e = resolve(&o).unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
    assert!(matches!(e, Error::ScriptTimeout { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        format!(
            "loader script {} did not finish within 300ms and was killed; raise --script-timeout or fix the script",
            script.display()
        )
    );
    let bg: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    wait_for("the background job to die", Duration::from_secs(5), || {
        let stat = std::fs::read_to_string(format!("/proc/{bg}/stat")).unwrap_or_default();
        // Gone, or a zombie waiting for a reaper.
        (stat.is_empty() || stat.split_whitespace().nth(2) == Some("Z")).then_some(())
    });
}

#[test]
fn output_over_the_limit_names_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let script = write_script(dir.path(), "s.sh", "yes module=mem-logger\n");
    let mut o = options(dir.path(), &script, None);
    o.script_options.output_limit = 1024;
    let start = Instant::now();
    let e = resolve(&o).unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(5));
    // 56 lines of 18 bytes, then 16 bytes of line 57.
    assert_eq!(
        e.to_string(),
        format!(
            "loader script {} wrote more than 1024 bytes of output (at line 57: `module=mem-logge`); directives are one short line each",
            script.display()
        )
    );
}

#[test]
fn bad_script_output_names_script_line_and_text() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "echo '# header'\necho 'module=mem-logger;config=x'\n",
            "line 2: malformed directive `module=mem-logger;config=x`: `mem-logger;config=x` is not a valid name",
        ),
        (
            "echo module=mem-logger\necho\necho module=mem-sniffer\n",
            "line 3: unknown module `mem-sniffer` in `module=mem-sniffer` (known: mem-logger, mem-tracer, mem-profiler)",
        ),
        (
            "echo module=mem-tracer,config=qa\n",
            "line 1: unknown profile `qa` in `module=mem-tracer,config=qa`",
        ),
        (
            "echo module=mem-tracer,config=prod-tunings\necho module=mem-tracer,config=dev-tunings\n",
            "line 2: `module=mem-tracer,config=dev-tunings` conflicts with line 1 `module=mem-tracer,config=prod-tunings`",
        ),
    ];
    for (i, (body, expected)) in cases.into_iter().enumerate() {
        let script = write_script(dir.path(), &format!("s{i}.sh"), body);
        let e = resolve(&options(dir.path(), &script, None))
            .unwrap_err()
            .to_string();
        let prefix = format!("loader script {} output {expected}", script.display());
        assert!(e.starts_with(&prefix), "expected: {prefix}\nactual:   {e}");
    }
}

fn static_file(dir: &Path, policy: &str) -> std::path::PathBuf {
    let p = dir.join("modules.yaml");
    std::fs::write(
        &p,
        format!(
            "onScriptError: {policy}\nmodules:\n  - module: mem-logger\n    config: dev-tunings\n"
        ),
    )
    .unwrap();
    p
}

#[test]
fn on_script_error_policies() {
    let dir = tempfile::tempdir().unwrap();
    let script = write_script(dir.path(), "s.sh", "exit 1\n");
    // fail (the default, also when the static file says nothing).
    let mut o = options(dir.path(), &script, None);
    assert!(matches!(resolve(&o), Err(Error::ScriptFailed { .. })));
    // static, from the file.
    let f = static_file(dir.path(), "static");
    o.static_file = Some(f.clone());
    let r = resolve(&o).unwrap();
    assert_eq!(keys(&r.modules), ["mem-logger:dev-tunings"]);
    let PlanSource::ScriptFailed {
        path,
        error,
        fallback,
    } = &r.source
    else {
        panic!("expected ScriptFailed, got {:?}", r.source)
    };
    assert_eq!(path, &script);
    assert!(error.contains("exit status 1"), "{error}");
    assert_eq!(**fallback, PlanSource::StaticFile { path: f });
    // none, from the command line, overriding the file.
    o.on_script_error = Some(OnScriptError::None);
    let r = resolve(&o).unwrap();
    assert!(r.modules.is_empty());
    // fail, from the command line, overriding the file.
    o.on_script_error = Some(OnScriptError::Fail);
    assert!(resolve(&o).is_err());
}

#[test]
fn no_script_falls_back_to_static_config() {
    let dir = tempfile::tempdir().unwrap();
    let absent = dir.path().join("load-sidecars.sh");
    let mut o = options(dir.path(), &absent, None);
    o.default_static_file = static_file(dir.path(), "fail");
    let r = resolve(&o).unwrap();
    assert_eq!(keys(&r.modules), ["mem-logger:dev-tunings"]);
    o.modules_env = Some("mem-logger,mem-tracer:staging-tunings".into());
    let r = resolve(&o).unwrap();
    assert_eq!(r.source, PlanSource::Env);
    assert_eq!(
        keys(&r.modules),
        ["mem-logger:default", "mem-tracer:staging-tunings"]
    );
}

#[test]
fn sh_runs_scripts_when_chosen() {
    let dir = tempfile::tempdir().unwrap();
    let script = write_script(
        dir.path(),
        "s.sh",
        "[ -n \"$BASH_VERSION\" ] && exit 5\necho module=mem-logger\n",
    );
    let mut o = options(dir.path(), &script, None);
    o.script_options.shell = Some("/bin/sh".into());
    assert_eq!(keys(&resolve(&o).unwrap().modules), ["mem-logger:default"]);
}

#[test]
fn profiles_file_and_static_profiles_override_builtins() {
    let dir = tempfile::tempdir().unwrap();
    let script = write_script(
        dir.path(),
        "s.sh",
        "echo module=mem-tracer,config=qa-tunings\necho module=mem-logger,config=staging-tunings\n",
    );
    let profiles = dir.path().join("profiles.yaml");
    std::fs::write(
        &profiles,
        "profiles:\n  qa-tunings:\n    base: dev-tunings\n    window: 9\n",
    )
    .unwrap();
    let statics = dir.path().join("modules.yaml");
    std::fs::write(
        &statics,
        "profiles:\n  staging-tunings: {interval_ms: 1234}\n",
    )
    .unwrap();
    let mut o = options(dir.path(), &script, None);
    // Without the profiles file, qa-tunings does not exist.
    assert!(matches!(resolve(&o), Err(Error::UnknownProfile { .. })));
    o.profiles_file = Some(profiles);
    o.static_file = Some(statics);
    let r = resolve(&o).unwrap();
    assert_eq!(
        keys(&r.modules),
        ["mem-logger:staging-tunings", "mem-tracer:qa-tunings"]
    );
    assert_eq!(
        r.modules[0].settings.interval_ms, 1234,
        "from the static file's profiles"
    );
    assert_eq!(r.modules[1].settings.window, 9, "from the profiles file");
    assert_eq!(
        r.modules[1].settings.interval_ms, 1_000,
        "inherited from its base"
    );
}
