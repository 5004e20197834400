//! Resolution: script if present, else static configuration; then the plan for a phase.
//!
//! Precedence when there is no script: an explicit `--static FILE`, then `HERMES_MODULES`, then
//! `/etc/hermes/modules.yaml`, then nothing (an empty plan, which is not an error). The profile
//! table is the built-in one, overridden by the static file's `profiles:` and then by a
//! profiles file. The `onScriptError` policy comes from the flag, else the static file, else
//! `fail`; it covers every script failure including bad output.

use std::path::{Path, PathBuf};

use hermes_node_api::error_chain;

use crate::catalog::{ModuleCatalog, PlannedModule, ProfilesFile};
use crate::directive::{Origin, parse_directives, parse_modules_env};
use crate::error::Result;
use crate::plan::{self, ModulePlan, PlanOutcome, PlanSource};
use crate::script::{ScriptOptions, run_script};
use crate::static_config::{OnScriptError, StaticConfig};

/// Default loader script location.
pub const DEFAULT_SCRIPT_PATH: &str = "/etc/hermes/load-sidecars.sh";

/// Inputs of a resolution; the CLI fills them from flags and the environment.
#[derive(Debug, Clone)]
pub struct ResolveOptions {
    /// The loader script (run if it exists).
    pub script: PathBuf,
    /// An explicit static file (must exist).
    pub static_file: Option<PathBuf>,
    /// The default static file (used if it exists).
    pub default_static_file: PathBuf,
    /// A profiles file (must exist if given).
    pub profiles_file: Option<PathBuf>,
    /// The value of `HERMES_MODULES`, if set.
    pub modules_env: Option<String>,
    /// The script error policy from the command line, overriding the static file.
    pub on_script_error: Option<OnScriptError>,
    /// How to run the script (timeout, output limit, extra environment).
    pub script_options: ScriptOptions,
}

impl Default for ResolveOptions {
    fn default() -> Self {
        Self {
            script: PathBuf::from(DEFAULT_SCRIPT_PATH),
            static_file: None,
            default_static_file: PathBuf::from(crate::static_config::DEFAULT_STATIC_PATH),
            profiles_file: None,
            modules_env: None,
            on_script_error: None,
            script_options: ScriptOptions::default(),
        }
    }
}

/// A resolved module set before it meets the state file.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolution {
    /// Where the modules came from.
    pub source: PlanSource,
    /// The modules.
    pub modules: Vec<PlannedModule>,
    /// The script's standard error, if it ran (for the log).
    pub script_stderr: Option<String>,
}

/// Resolves the module set (does not touch the state file).
#[tracing::instrument(level = "info", skip_all, fields(script = %opts.script.display()))]
pub fn resolve(opts: &ResolveOptions) -> Result<Resolution> {
    let static_cfg = match &opts.static_file {
        Some(p) => Some((p.clone(), StaticConfig::load(p)?)),
        None if opts.default_static_file.exists() => Some((
            opts.default_static_file.clone(),
            StaticConfig::load(&opts.default_static_file)?,
        )),
        None => None,
    };
    let mut catalog = ModuleCatalog::builtin();
    if let Some((_, cfg)) = &static_cfg {
        catalog = catalog.with_overrides(&ProfilesFile {
            profiles: cfg.profiles.clone(),
        })?;
    }
    if let Some(p) = &opts.profiles_file {
        catalog = catalog.with_overrides(&ProfilesFile::load(p)?)?;
    }

    if opts.script.exists() {
        match from_script(&catalog, opts) {
            Ok(r) => return Ok(r),
            Err(e) => {
                let policy = opts
                    .on_script_error
                    .or(static_cfg.as_ref().and_then(|(_, c)| c.on_script_error))
                    .unwrap_or_default();
                tracing::warn!(script = %opts.script.display(), %policy, error = %e, "loader script failed");
                let fallback = match policy {
                    OnScriptError::Fail => return Err(e),
                    OnScriptError::Static => from_static(&catalog, opts, static_cfg.as_ref())?,
                    OnScriptError::None => Resolution {
                        source: PlanSource::Nothing,
                        modules: Vec::new(),
                        script_stderr: None,
                    },
                };
                return Ok(Resolution {
                    source: PlanSource::ScriptFailed {
                        path: opts.script.clone(),
                        error: error_chain(&e),
                        fallback: Box::new(fallback.source),
                    },
                    ..fallback
                });
            }
        }
    }
    from_static(&catalog, opts, static_cfg.as_ref())
}

fn from_script(catalog: &ModuleCatalog, opts: &ResolveOptions) -> Result<Resolution> {
    let run = run_script(&opts.script, &opts.script_options)?;
    if !run.stderr.trim().is_empty() {
        tracing::info!(script = %opts.script.display(), stderr = %run.stderr.trim(), "loader script stderr");
    }
    let origin = Origin::Script(opts.script.clone());
    let directives = parse_directives(&origin, &run.stdout)?;
    Ok(Resolution {
        source: PlanSource::Script {
            path: opts.script.clone(),
        },
        modules: catalog.plan(&origin, &directives)?,
        script_stderr: Some(run.stderr),
    })
}

fn from_static(
    catalog: &ModuleCatalog,
    opts: &ResolveOptions,
    static_cfg: Option<&(PathBuf, StaticConfig)>,
) -> Result<Resolution> {
    let explicit = opts.static_file.is_some();
    let (source, origin, directives) = match (static_cfg, &opts.modules_env) {
        (Some((path, cfg)), env) if explicit || env.is_none() => (
            PlanSource::StaticFile { path: path.clone() },
            Origin::StaticFile(path.clone()),
            cfg.directives(),
        ),
        (_, Some(v)) => (PlanSource::Env, Origin::EnvVar, parse_modules_env(v)?),
        (_, None) => (PlanSource::Nothing, Origin::EnvVar, Vec::new()),
    };
    Ok(Resolution {
        modules: catalog.plan(&origin, &directives)?,
        source,
        script_stderr: None,
    })
}

/// Resolves and commits to the state file for `phase` (see [`plan::commit`]).
#[tracing::instrument(level = "info", skip(opts), fields(state = %state.display()))]
pub fn resolve_phase(opts: &ResolveOptions, state: &Path, phase: &str) -> Result<PlanOutcome> {
    let r = resolve(opts)?;
    plan::commit(state, phase, ModulePlan::new(r.source, phase, r.modules))
}

/// Pod and node metadata for the script's environment, from the process environment (as the
/// Downward API sets it) with fallbacks: `HERMES_POD_NAME` (else `POD_NAME`, else `HOSTNAME`),
/// `HERMES_NAMESPACE` (else `POD_NAMESPACE`, else the service account's namespace file),
/// `HERMES_NODE_NAME` (else `NODE_NAME`) and `HERMES_POD_LABELS` (else the Downward API file
/// `/etc/podinfo/labels`). Unknown values are left unset.
pub fn pod_metadata_env(getenv: impl Fn(&str) -> Option<String>) -> Vec<(String, String)> {
    let first = |names: &[&str]| {
        names
            .iter()
            .find_map(|n| getenv(n).filter(|v| !v.is_empty()))
    };
    let file = |p: &str| {
        std::fs::read_to_string(p)
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
    };
    let values = [
        (
            "HERMES_POD_NAME",
            first(&["HERMES_POD_NAME", "POD_NAME", "HOSTNAME"]),
        ),
        (
            "HERMES_NAMESPACE",
            first(&["HERMES_NAMESPACE", "POD_NAMESPACE"])
                .or_else(|| file("/var/run/secrets/kubernetes.io/serviceaccount/namespace")),
        ),
        (
            "HERMES_NODE_NAME",
            first(&["HERMES_NODE_NAME", "NODE_NAME"]),
        ),
        (
            "HERMES_POD_LABELS",
            first(&["HERMES_POD_LABELS"]).or_else(|| file("/etc/podinfo/labels")),
        ),
    ];
    values
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k.to_owned(), v)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_prefers_hermes_names_then_fallbacks() {
        let env = |k: &str| match k {
            "POD_NAME" => Some("web-1".to_owned()),
            "HOSTNAME" => Some("host".to_owned()),
            "HERMES_NODE_NAME" => Some("node-a".to_owned()),
            "NODE_NAME" => Some("node-b".to_owned()),
            "HERMES_POD_LABELS" => Some("app=\"web\"".to_owned()),
            _ => None,
        };
        let m = pod_metadata_env(env);
        let get = |k: &str| m.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("HERMES_POD_NAME"), Some("web-1"));
        assert_eq!(get("HERMES_NODE_NAME"), Some("node-a"));
        assert_eq!(get("HERMES_POD_LABELS"), Some("app=\"web\""));
    }

    #[test]
    fn env_var_beats_default_file_but_not_explicit_static() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("modules.yaml");
        std::fs::write(&f, "modules:\n  - module: mem-profiler\n").unwrap();
        let mut o = ResolveOptions {
            script: dir.path().join("absent.sh"),
            default_static_file: f.clone(),
            modules_env: Some("mem-logger,mem-tracer:staging-tunings".into()),
            ..ResolveOptions::default()
        };
        let r = resolve(&o).unwrap();
        assert_eq!(r.source, PlanSource::Env);
        assert_eq!(
            r.modules.iter().map(PlannedModule::key).collect::<Vec<_>>(),
            ["mem-logger:default", "mem-tracer:staging-tunings"]
        );
        o.static_file = Some(f.clone());
        let r = resolve(&o).unwrap();
        assert_eq!(r.source, PlanSource::StaticFile { path: f });
        assert_eq!(r.modules[0].key(), "mem-profiler:default");
        o.static_file = None;
        o.modules_env = None;
        o.default_static_file = dir.path().join("none.yaml");
        let r = resolve(&o).unwrap();
        assert_eq!((r.source, r.modules.len()), (PlanSource::Nothing, 0));
    }

    #[test]
    fn explicit_static_file_must_exist() {
        let o = ResolveOptions {
            script: PathBuf::from("/nonexistent/x.sh"),
            static_file: Some(PathBuf::from("/nonexistent/m.yaml")),
            ..ResolveOptions::default()
        };
        assert_eq!(
            resolve(&o).unwrap_err().to_string(),
            "cannot read /nonexistent/m.yaml"
        );
    }
}
