//! The module plan and its state file: one plan per pod, the same for every init phase.
//!
//! The first phase to finish creates the state file; it is written to a temporary sibling,
//! fsynced and then hard-linked into place, which fails if the file already exists. So the state
//! file appears complete or not at all, two phases racing cannot both create it, and a phase
//! killed mid-write leaves only a temporary file (removed by a later phase). Later phases read
//! the plan and converge on it; if their own resolution differs, the difference is reported
//! ([`PlanStatus::Drifted`]) and the stored plan stays in force, so modules are never mixed.
//! Every phase appends one line to `STATE.phases` (JSON lines) for the record.
//!
//! The plan file is never rewritten, except when it is unreadable as a plan (damaged by
//! something else), in which case it is replaced atomically and the phase says so.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::catalog::PlannedModule;
use crate::error::{Error, Result};

/// Version of the state file format.
pub const PLAN_VERSION: u32 = 1;

/// Where a plan's module list came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum PlanSource {
    /// The loader script's output.
    Script {
        /// The script.
        path: PathBuf,
    },
    /// A static configuration file.
    StaticFile {
        /// The file.
        path: PathBuf,
    },
    /// The `HERMES_MODULES` variable.
    Env,
    /// Nothing configured: no script, no static file, no variable.
    Nothing,
    /// The script failed and `onScriptError` chose the static configuration or nothing.
    ScriptFailed {
        /// The script.
        path: PathBuf,
        /// The script's error.
        error: String,
        /// What was used instead.
        fallback: Box<PlanSource>,
    },
}

/// The resolved module set, as stored in the state file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModulePlan {
    /// [`PLAN_VERSION`].
    pub version: u32,
    /// Where the modules came from.
    pub source: PlanSource,
    /// The phase that created the plan.
    pub created_by_phase: String,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_at_unix_ms: u64,
    /// The modules, sorted by module; each (module, config) once.
    pub modules: Vec<PlannedModule>,
}

impl ModulePlan {
    /// A new plan stamped with the phase and the current time.
    pub fn new(source: PlanSource, phase: &str, modules: Vec<PlannedModule>) -> Self {
        Self {
            version: PLAN_VERSION,
            source,
            created_by_phase: phase.to_owned(),
            created_at_unix_ms: now_ms(),
            modules,
        }
    }

    /// The `module:config` keys, in plan order.
    pub fn keys(&self) -> Vec<String> {
        self.modules.iter().map(PlannedModule::key).collect()
    }

    /// Reads a plan from a state file.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = fs::read(path).map_err(|source| Error::StateRead {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|source| Error::StateCorrupt {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// What a phase did with the state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "kebab-case")]
pub enum PlanStatus {
    /// This phase created the plan.
    Created,
    /// The stored plan equals this phase's resolution.
    Unchanged,
    /// This phase resolved a different module set; the stored plan stays in force.
    Drifted {
        /// Modules (`module:config`, or with changed settings) this phase would add.
        added: Vec<String>,
        /// Modules of the stored plan this phase would not have loaded.
        removed: Vec<String>,
    },
    /// The state file was not a readable plan and was replaced by this phase's.
    Replaced {
        /// Why it was unreadable.
        reason: String,
    },
}

/// The result of [`commit`]: the plan in force and how this phase related to it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlanOutcome {
    /// The phase name.
    pub phase: String,
    /// What happened.
    #[serde(flatten)]
    pub status: PlanStatus,
    /// The plan in force (the stored one).
    pub plan: ModulePlan,
}

/// Commits `fresh` (this phase's resolution) to the state file at `path` and returns the plan
/// in force. See the module docs for the protocol.
pub fn commit(path: &Path, phase: &str, fresh: ModulePlan) -> Result<PlanOutcome> {
    let write_err = |p: &Path| {
        let p = p.to_path_buf();
        move |source| Error::StateWrite { path: p, source }
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&dir).map_err(write_err(&dir))?;
    remove_stale_temps(path);
    let bytes = serde_json::to_vec_pretty(&fresh).map_err(|e| Error::StateWrite {
        path: path.to_path_buf(),
        source: std::io::Error::other(e),
    })?;

    // Bounded: each round either creates the file, reads it, or replaces a damaged one.
    let mut outcome = None;
    for _ in 0..3 {
        match ModulePlan::load(path) {
            Ok(stored) => {
                let status = compare(&stored, &fresh);
                outcome = Some(PlanOutcome {
                    phase: phase.to_owned(),
                    status,
                    plan: stored,
                });
                break;
            }
            Err(Error::StateRead { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                let tmp = write_temp(path, &bytes)?;
                let linked = fs::hard_link(&tmp, path);
                let _ = fs::remove_file(&tmp);
                match linked {
                    Ok(()) => {
                        sync_dir(&dir);
                        outcome = Some(PlanOutcome {
                            phase: phase.to_owned(),
                            status: PlanStatus::Created,
                            plan: fresh.clone(),
                        });
                        break;
                    }
                    // Another phase won the race: read its plan in the next round.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                    Err(e) => return Err(write_err(path)(e)),
                }
            }
            Err(Error::StateCorrupt { source, .. }) => {
                let tmp = write_temp(path, &bytes)?;
                fs::rename(&tmp, path).map_err(write_err(path))?;
                sync_dir(&dir);
                outcome = Some(PlanOutcome {
                    phase: phase.to_owned(),
                    status: PlanStatus::Replaced {
                        reason: source.to_string(),
                    },
                    plan: fresh.clone(),
                });
                break;
            }
            Err(e) => return Err(e),
        }
    }
    let outcome = outcome.ok_or_else(|| Error::StateWrite {
        path: path.to_path_buf(),
        source: std::io::Error::other("the state file kept changing while this phase read it"),
    })?;
    append_phase_log(path, &outcome)?;
    Ok(outcome)
}

fn compare(stored: &ModulePlan, fresh: &ModulePlan) -> PlanStatus {
    if stored.modules == fresh.modules {
        return PlanStatus::Unchanged;
    }
    let describe = |m: &PlannedModule| {
        if m.overrides.is_empty() {
            m.key()
        } else {
            let o: Vec<String> = m
                .overrides
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            format!("{} ({})", m.key(), o.join(","))
        }
    };
    let added = fresh
        .modules
        .iter()
        .filter(|m| !stored.modules.contains(m))
        .map(describe)
        .collect();
    let removed = stored
        .modules
        .iter()
        .filter(|m| !fresh.modules.contains(m))
        .map(describe)
        .collect();
    PlanStatus::Drifted { added, removed }
}

fn temp_prefix(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!(".{name}.tmp.")
}

/// Writes `bytes` to a fresh temporary sibling of `path` and fsyncs it.
fn write_temp(path: &Path, bytes: &[u8]) -> Result<PathBuf> {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tmp = path.with_file_name(format!(
        "{}{}.{nanos}",
        temp_prefix(path),
        std::process::id()
    ));
    let err = |source| Error::StateWrite {
        path: tmp.clone(),
        source,
    };
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    Ok(tmp)
}

/// Removes temporary files left by phases that died mid-write (their pid no longer exists).
fn remove_stale_temps(path: &Path) {
    let prefix = temp_prefix(path);
    let Some(dir) = path.parent() else { return };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        let pid = rest.split('.').next().unwrap_or("");
        if !pid.is_empty() && !Path::new("/proc").join(pid).exists() {
            let _ = fs::remove_file(e.path());
        }
    }
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// The phase log next to a state file.
pub fn phase_log_path(state: &Path) -> PathBuf {
    let mut s = state.as_os_str().to_owned();
    s.push(".phases");
    PathBuf::from(s)
}

/// One line of the phase log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PhaseRecord {
    /// The phase name.
    pub phase: String,
    /// `created`, `unchanged`, `drifted` or `replaced`.
    pub status: String,
    /// The process that ran the phase.
    pub pid: u32,
    /// Milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// The plan's keys in force after the phase.
    pub modules: Vec<String>,
}

fn append_phase_log(state: &Path, o: &PlanOutcome) -> Result<()> {
    let status = match o.status {
        PlanStatus::Created => "created",
        PlanStatus::Unchanged => "unchanged",
        PlanStatus::Drifted { .. } => "drifted",
        PlanStatus::Replaced { .. } => "replaced",
    };
    let rec = PhaseRecord {
        phase: o.phase.clone(),
        status: status.to_owned(),
        pid: std::process::id(),
        at_unix_ms: now_ms(),
        modules: o.plan.keys(),
    };
    let mut line = serde_json::to_vec(&rec).unwrap_or_default();
    line.push(b'\n');
    let log = phase_log_path(state);
    // One write(2) of a short line with O_APPEND: concurrent phases do not interleave.
    OpenOptions::new()
        .append(true)
        .create(true)
        .open(&log)
        .and_then(|mut f| f.write_all(&line))
        .map_err(|source| Error::StateWrite { path: log, source })
}

/// Reads the phase log (missing file → empty); unreadable lines are skipped.
pub fn read_phase_log(state: &Path) -> Vec<PhaseRecord> {
    fs::read_to_string(phase_log_path(state))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::ModuleCatalog;
    use crate::directive::{Origin, parse_directives};

    fn plan(text: &str, phase: &str) -> ModulePlan {
        let o = Origin::Script(PathBuf::from("/s"));
        let modules = ModuleCatalog::builtin()
            .plan(&o, &parse_directives(&o, text).unwrap())
            .unwrap();
        ModulePlan::new(PlanSource::Script { path: "/s".into() }, phase, modules)
    }

    #[test]
    fn first_phase_creates_later_phases_converge() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("plan.json");
        let a = commit(&state, "init-1", plan("module=mem-logger", "init-1")).unwrap();
        assert_eq!(a.status, PlanStatus::Created);
        let b = commit(&state, "init-2", plan("module=mem-logger", "init-2")).unwrap();
        assert_eq!(b.status, PlanStatus::Unchanged);
        assert_eq!(b.plan, a.plan);
        assert_eq!(b.plan.created_by_phase, "init-1");
        let log = read_phase_log(&state);
        assert_eq!(
            log.iter()
                .map(|r| (r.phase.as_str(), r.status.as_str()))
                .collect::<Vec<_>>(),
            [("init-1", "created"), ("init-2", "unchanged")]
        );
    }

    #[test]
    fn drift_is_reported_and_stored_plan_kept() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("plan.json");
        commit(&state, "a", plan("module=mem-logger", "a")).unwrap();
        let b = commit(
            &state,
            "b",
            plan("module=mem-tracer,config=staging-tunings,window=5", "b"),
        )
        .unwrap();
        assert_eq!(
            b.status,
            PlanStatus::Drifted {
                added: vec!["mem-tracer:staging-tunings (window=5)".into()],
                removed: vec!["mem-logger:default".into()],
            }
        );
        assert_eq!(b.plan.keys(), ["mem-logger:default"]);
        assert_eq!(
            ModulePlan::load(&state).unwrap().keys(),
            ["mem-logger:default"]
        );
    }

    #[test]
    fn damaged_state_is_replaced_and_stale_temps_removed() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("plan.json");
        fs::write(&state, b"{\"version\": 1, \"sour").unwrap();
        // A temp file of a dead writer (pid far above pid_max).
        let stale = dir.path().join(".plan.json.tmp.999999999.5");
        fs::write(&stale, b"{").unwrap();
        let o = commit(&state, "p", plan("module=mem-logger", "p")).unwrap();
        assert!(
            matches!(o.status, PlanStatus::Replaced { .. }),
            "{:?}",
            o.status
        );
        assert!(!stale.exists(), "stale temp file should be removed");
        assert_eq!(
            ModulePlan::load(&state).unwrap().keys(),
            ["mem-logger:default"]
        );
    }

    #[test]
    fn load_errors_name_the_file() {
        let e = ModulePlan::load(Path::new("/nonexistent/plan.json")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot read state file /nonexistent/plan.json"
        );
    }
}
