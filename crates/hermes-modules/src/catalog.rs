//! Built-in modules and tuning profiles, and turning directives into planned modules.
//!
//! Profiles are named settings (intervals, thresholds, sampling). The built-in table
//! ([`ModuleCatalog::builtin`]) can be overridden and extended by a profiles file
//! ([`ProfilesFile`]); a directive may override single settings (`module=mem-tracer,window=20`).

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::directive::{Directive, Origin};
use crate::error::{At, Error, Result};

/// A built-in memory module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModuleKind {
    /// Periodic RSS, PSS, swap and cgroup usage/limit per target process.
    MemLogger,
    /// Leak detection on a robust growth trend over a window.
    MemTracer,
    /// Allocation tracking from the `LD_PRELOAD` interposer, plus an smaps mapping breakdown.
    MemProfiler,
}

impl ModuleKind {
    /// Every built-in module.
    pub const ALL: [ModuleKind; 3] = [Self::MemLogger, Self::MemTracer, Self::MemProfiler];

    /// The name used in directives.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MemLogger => "mem-logger",
            Self::MemTracer => "mem-tracer",
            Self::MemProfiler => "mem-profiler",
        }
    }
}

impl fmt::Display for ModuleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ModuleKind {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        Self::ALL.into_iter().find(|m| m.as_str() == s).ok_or(())
    }
}

/// The profile used when a directive names none.
pub const DEFAULT_PROFILE: &str = "default";

/// Tuning settings of a module instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Sampling interval in milliseconds.
    pub interval_ms: u64,
    /// Number of samples the leak detector's trend window holds (at least 3).
    pub window: u32,
    /// mem-tracer alerts when the robust growth trend exceeds this many KiB per minute.
    pub growth_threshold_kib_per_min: f64,
    /// How often the JSON report is rewritten, in milliseconds.
    pub report_interval_ms: u64,
    /// Histogram sampling of the interposer: record 1 in N allocations in the size histogram
    /// (counts and live bytes are always exact). Exported as `HERMES_MEMPROF_SAMPLE_EVERY`.
    pub alloc_sample_every: u32,
    /// mem-profiler: how many of the largest mappings the smaps breakdown lists (0 = off).
    pub top_mappings: u32,
}

/// The keys a directive may override, in documentation order.
pub const SETTING_KEYS: [&str; 6] = [
    "interval_ms",
    "window",
    "growth_threshold_kib_per_min",
    "report_interval_ms",
    "alloc_sample_every",
    "top_mappings",
];

impl Profile {
    const fn new(interval_ms: u64, window: u32, threshold: f64, report_ms: u64) -> Self {
        Self {
            interval_ms,
            window,
            growth_threshold_kib_per_min: threshold,
            report_interval_ms: report_ms,
            alloc_sample_every: 1,
            top_mappings: 10,
        }
    }

    /// Sets one setting from text; `Err` carries what the value should look like.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), SetError> {
        fn pos<T: FromStr + PartialOrd + Default>(v: &str) -> Option<T> {
            v.parse().ok().filter(|x| *x > T::default())
        }
        match key {
            "interval_ms" => {
                self.interval_ms = pos(value).ok_or(SetError::Invalid("a positive integer"))?
            }
            "window" => {
                self.window = value
                    .parse()
                    .ok()
                    .filter(|w| *w >= 3)
                    .ok_or(SetError::Invalid("an integer of at least 3"))?
            }
            "growth_threshold_kib_per_min" => {
                self.growth_threshold_kib_per_min = value
                    .parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite() && *x > 0.0)
                    .ok_or(SetError::Invalid("a positive number"))?
            }
            "report_interval_ms" => {
                self.report_interval_ms =
                    pos(value).ok_or(SetError::Invalid("a positive integer"))?
            }
            "alloc_sample_every" => {
                self.alloc_sample_every =
                    pos(value).ok_or(SetError::Invalid("a positive integer"))?
            }
            "top_mappings" => {
                self.top_mappings = value
                    .parse()
                    .map_err(|_| SetError::Invalid("a non-negative integer"))?
            }
            _ => return Err(SetError::Unknown),
        }
        Ok(())
    }

    /// Checks invariants that [`Profile::set`] enforces per key.
    fn check(&self, name: &str) -> Result<()> {
        let problem = if self.interval_ms == 0 {
            "interval_ms must be positive"
        } else if self.window < 3 {
            "window must be at least 3"
        } else if !(self.growth_threshold_kib_per_min.is_finite()
            && self.growth_threshold_kib_per_min > 0.0)
        {
            "growth_threshold_kib_per_min must be a positive number"
        } else if self.report_interval_ms == 0 {
            "report_interval_ms must be positive"
        } else if self.alloc_sample_every == 0 {
            "alloc_sample_every must be positive"
        } else {
            return Ok(());
        };
        Err(Error::InvalidProfile {
            profile: name.to_owned(),
            problem: problem.to_owned(),
        })
    }
}

/// Why [`Profile::set`] refused a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetError {
    /// The key is not a setting.
    Unknown,
    /// The value is not valid; the text says what is expected.
    Invalid(&'static str),
}

/// A profile in a profiles file: any subset of settings over a base profile.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfilePatch {
    /// The profile this one starts from: the built-in of the same name if there is one, else
    /// this (default `default`).
    pub base: Option<String>,
    /// See [`Profile::interval_ms`].
    pub interval_ms: Option<u64>,
    /// See [`Profile::window`].
    pub window: Option<u32>,
    /// See [`Profile::growth_threshold_kib_per_min`].
    pub growth_threshold_kib_per_min: Option<f64>,
    /// See [`Profile::report_interval_ms`].
    pub report_interval_ms: Option<u64>,
    /// See [`Profile::alloc_sample_every`].
    pub alloc_sample_every: Option<u32>,
    /// See [`Profile::top_mappings`].
    pub top_mappings: Option<u32>,
}

/// A profiles file: `profiles: {NAME: {SETTING: VALUE, …}}`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfilesFile {
    /// Profiles by name.
    #[serde(default)]
    pub profiles: BTreeMap<String, ProfilePatch>,
}

impl ProfilesFile {
    /// Reads and parses a profiles file.
    pub fn load(path: &Path) -> Result<Self> {
        crate::yaml::load_yaml(path)
    }
}

/// A planned module instance: the module, its profile name, the directive's overrides and the
/// effective settings (so that later phases need no profile table).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlannedModule {
    /// The module.
    pub module: ModuleKind,
    /// The profile name (`default` when the directive named none).
    pub config: String,
    /// Settings the directive overrode, as written.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub overrides: BTreeMap<String, String>,
    /// The effective settings.
    pub settings: Profile,
}

impl PlannedModule {
    /// The identity under which a module is loaded once: `module:config`.
    pub fn key(&self) -> String {
        format!("{}:{}", self.module, self.config)
    }
}

/// The module catalog: the built-in modules and the tuning profiles they run with (not an OCI
/// registry).
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleCatalog {
    profiles: BTreeMap<String, Profile>,
}

impl Default for ModuleCatalog {
    fn default() -> Self {
        Self::builtin()
    }
}

impl ModuleCatalog {
    /// The built-in profile table:
    ///
    /// | profile | interval | window | growth alert | report |
    /// |---|---|---|---|---|
    /// | `default` | 5 s | 24 | 1024 KiB/min | 30 s |
    /// | `dev-tunings` | 1 s | 30 | 256 KiB/min | 10 s |
    /// | `staging-tunings` | 5 s | 36 | 512 KiB/min | 30 s |
    /// | `prod-tunings` | 15 s | 40 | 2048 KiB/min | 60 s |
    ///
    /// `prod-tunings` samples 1 in 16 allocations into the histogram; the others record all.
    pub fn builtin() -> Self {
        let mut prod = Profile::new(15_000, 40, 2048.0, 60_000);
        prod.alloc_sample_every = 16;
        let profiles = [
            (DEFAULT_PROFILE, Profile::new(5_000, 24, 1024.0, 30_000)),
            ("dev-tunings", Profile::new(1_000, 30, 256.0, 10_000)),
            ("staging-tunings", Profile::new(5_000, 36, 512.0, 30_000)),
            ("prod-tunings", prod),
        ];
        Self {
            profiles: profiles
                .into_iter()
                .map(|(n, p)| (n.to_owned(), p))
                .collect(),
        }
    }

    /// Applies a profiles file over this table.
    pub fn with_overrides(mut self, file: &ProfilesFile) -> Result<Self> {
        // Profiles may name bases defined later in the file: resolve in dependency order, and
        // reject cycles instead of looping.
        let mut pending: BTreeMap<&str, &ProfilePatch> =
            file.profiles.iter().map(|(n, p)| (n.as_str(), p)).collect();
        while !pending.is_empty() {
            let ready: Vec<&str> = pending
                .iter()
                .filter(|(name, patch)| {
                    patch
                        .base
                        .as_deref()
                        .is_none_or(|b| b == **name || !pending.contains_key(b))
                })
                .map(|(n, _)| *n)
                .collect();
            if ready.is_empty() {
                let names: Vec<&str> = pending.keys().copied().collect();
                return Err(Error::InvalidProfile {
                    profile: names.join(", "),
                    problem: "the `base` references form a cycle".to_owned(),
                });
            }
            for name in ready {
                let Some(patch) = pending.remove(name) else {
                    continue;
                };
                let base_name =
                    patch
                        .base
                        .as_deref()
                        .unwrap_or(if self.profiles.contains_key(name) {
                            name
                        } else {
                            DEFAULT_PROFILE
                        });
                let mut p =
                    self.profiles
                        .get(base_name)
                        .cloned()
                        .ok_or_else(|| Error::InvalidProfile {
                            profile: name.to_owned(),
                            problem: format!("base profile `{base_name}` does not exist"),
                        })?;
                if !crate::directive::is_valid_name(name) {
                    return Err(Error::InvalidProfile {
                        profile: name.to_owned(),
                        problem: "names use letters, digits, `.`, `_`, `-`".to_owned(),
                    });
                }
                let ProfilePatch {
                    base: _,
                    interval_ms,
                    window,
                    growth_threshold_kib_per_min,
                    report_interval_ms,
                    alloc_sample_every,
                    top_mappings,
                } = patch;
                p.interval_ms = interval_ms.unwrap_or(p.interval_ms);
                p.window = window.unwrap_or(p.window);
                p.growth_threshold_kib_per_min =
                    growth_threshold_kib_per_min.unwrap_or(p.growth_threshold_kib_per_min);
                p.report_interval_ms = report_interval_ms.unwrap_or(p.report_interval_ms);
                p.alloc_sample_every = alloc_sample_every.unwrap_or(p.alloc_sample_every);
                p.top_mappings = top_mappings.unwrap_or(p.top_mappings);
                p.check(name)?;
                self.profiles.insert(name.to_owned(), p);
            }
        }
        Ok(self)
    }

    /// A profile by name.
    pub fn profile(&self, name: &str) -> Option<&Profile> {
        self.profiles.get(name)
    }

    /// Profile names, sorted.
    pub fn profile_names(&self) -> impl Iterator<Item = &str> {
        self.profiles.keys().map(String::as_str)
    }

    /// Validates directives against the table: modules and profiles must exist, overrides must
    /// be settings with valid values, and a module requested twice must be requested the same
    /// way (it is then planned once). The result is sorted by module, so the same set of
    /// directives in any order gives the same plan.
    pub fn plan(&self, origin: &Origin, directives: &[Directive]) -> Result<Vec<PlannedModule>> {
        let mut planned: BTreeMap<ModuleKind, (&Directive, PlannedModule)> = BTreeMap::new();
        for d in directives {
            let module: ModuleKind = d.module.parse().map_err(|()| Error::UnknownModule {
                at: At::new(origin, d.line, &d.text),
                module: d.module.clone(),
                known: join(ModuleKind::ALL.iter().map(|m| m.as_str())),
            })?;
            let config = d.config.as_deref().unwrap_or(DEFAULT_PROFILE);
            let mut settings =
                self.profile(config)
                    .cloned()
                    .ok_or_else(|| Error::UnknownProfile {
                        at: At::new(origin, d.line, &d.text),
                        profile: config.to_owned(),
                        known: join(self.profile_names()),
                    })?;
            for (k, v) in &d.settings {
                settings.set(k, v).map_err(|e| match e {
                    SetError::Unknown => Error::UnknownSetting {
                        at: At::new(origin, d.line, &d.text),
                        key: k.clone(),
                        known: SETTING_KEYS.join(", "),
                    },
                    SetError::Invalid(expected) => Error::InvalidSetting {
                        at: At::new(origin, d.line, &d.text),
                        key: k.clone(),
                        value: v.clone(),
                        expected,
                    },
                })?;
            }
            let pm = PlannedModule {
                module,
                config: config.to_owned(),
                overrides: d.settings.clone(),
                settings,
            };
            if let Some((first, existing)) = planned.get(&module) {
                if *existing != pm {
                    return Err(Error::ConflictingDuplicate {
                        at: At::new(origin, d.line, &d.text),
                        first_line: first.line,
                        first_text: first.text.clone(),
                        module: module.to_string(),
                    });
                }
                continue;
            }
            planned.insert(module, (d, pm));
        }
        Ok(planned.into_values().map(|(_, pm)| pm).collect())
    }
}

fn join<'a>(names: impl Iterator<Item = &'a str>) -> String {
    names.collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directive::parse_directives;
    use std::path::PathBuf;

    fn origin() -> Origin {
        Origin::Script(PathBuf::from("/s.sh"))
    }

    fn plan(text: &str) -> Result<Vec<PlannedModule>> {
        ModuleCatalog::builtin().plan(&origin(), &parse_directives(&origin(), text)?)
    }

    #[test]
    fn builtin_profiles_exist_and_are_valid() {
        let r = ModuleCatalog::builtin();
        for name in [
            DEFAULT_PROFILE,
            "dev-tunings",
            "staging-tunings",
            "prod-tunings",
        ] {
            r.profile(name).unwrap().check(name).unwrap();
        }
        assert!(
            r.profile("prod-tunings").unwrap().interval_ms
                > r.profile("dev-tunings").unwrap().interval_ms
        );
    }

    #[test]
    fn plans_modules_with_profiles_and_overrides_sorted() {
        let p = plan("module=mem-tracer,config=staging-tunings,window=10\nmodule=mem-logger\n")
            .unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].module, ModuleKind::MemLogger);
        assert_eq!(p[0].config, "default");
        assert_eq!(p[0].key(), "mem-logger:default");
        assert_eq!(p[1].module, ModuleKind::MemTracer);
        assert_eq!(p[1].settings.window, 10);
        assert_eq!(p[1].settings.interval_ms, 5_000);
        assert_eq!(p[1].overrides.get("window").map(String::as_str), Some("10"));
    }

    #[test]
    fn identical_duplicates_are_planned_once() {
        let p =
            plan("module=mem-logger\nmodule=mem-logger,config=default\nmodule=mem-logger").unwrap();
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn unknown_module_names_line_text_and_known_modules() {
        let e = plan("module=mem-logger\n\nmodule=mem-leaker,config=prod-tunings")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "loader script /s.sh output line 3: unknown module `mem-leaker` in \
             `module=mem-leaker,config=prod-tunings` (known: mem-logger, mem-tracer, mem-profiler)"
        );
    }

    #[test]
    fn unknown_profile_names_line_text_and_known_profiles() {
        let e = plan("module=mem-tracer,config=qa-tunings")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "loader script /s.sh output line 1: unknown profile `qa-tunings` in \
             `module=mem-tracer,config=qa-tunings` (known: default, dev-tunings, prod-tunings, staging-tunings)"
        );
    }

    #[test]
    fn conflicting_duplicate_names_both_lines() {
        let e = plan(
            "module=mem-tracer,config=prod-tunings\n# x\nmodule=mem-tracer,config=dev-tunings",
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "loader script /s.sh output line 3: `module=mem-tracer,config=dev-tunings` conflicts \
             with line 1 `module=mem-tracer,config=prod-tunings`: module `mem-tracer` is requested \
             twice with different configurations"
        );
        assert!(matches!(
            plan("module=mem-tracer\nmodule=mem-tracer,window=5"),
            Err(Error::ConflictingDuplicate { ref at, first_line: 1, .. }) if at.line == 2
        ));
    }

    #[test]
    fn unknown_and_invalid_settings() {
        let e = plan("module=mem-logger,colour=blue")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("loader script /s.sh output line 1: unknown setting `colour` in `module=mem-logger,colour=blue` (known: interval_ms, window"),
            "{e}"
        );
        let e = plan("module=mem-logger,window=2").unwrap_err().to_string();
        assert_eq!(
            e,
            "loader script /s.sh output line 1: invalid value `2` for `window` in \
             `module=mem-logger,window=2`: an integer of at least 3"
        );
        assert!(matches!(
            plan("module=mem-logger,interval_ms=0"),
            Err(Error::InvalidSetting { .. })
        ));
        assert!(matches!(
            plan("module=mem-logger,growth_threshold_kib_per_min=NaN"),
            Err(Error::InvalidSetting { .. })
        ));
    }

    #[test]
    fn profiles_file_overrides_and_extends() {
        let f: ProfilesFile = serde_saphyr::from_str(
            "profiles:\n  prod-tunings:\n    interval_ms: 2000\n  team-a:\n    base: my-base\n    window: 8\n  my-base:\n    base: dev-tunings\n    top_mappings: 3\n",
        )
        .unwrap();
        let r = ModuleCatalog::builtin().with_overrides(&f).unwrap();
        let prod = r.profile("prod-tunings").unwrap();
        assert_eq!(prod.interval_ms, 2000);
        assert_eq!(prod.window, 40, "unset fields keep the built-in value");
        let a = r.profile("team-a").unwrap();
        assert_eq!((a.window, a.top_mappings, a.interval_ms), (8, 3, 1_000));
    }

    #[test]
    fn profiles_file_errors() {
        let bad = |y: &str| {
            let f: ProfilesFile = serde_saphyr::from_str(y).unwrap();
            ModuleCatalog::builtin()
                .with_overrides(&f)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            bad("profiles:\n  x:\n    base: nope\n"),
            "profile `x`: base profile `nope` does not exist"
        );
        assert_eq!(
            bad("profiles:\n  x:\n    window: 1\n"),
            "profile `x`: window must be at least 3"
        );
        assert!(bad("profiles:\n  a:\n    base: b\n  b:\n    base: a\n").contains("cycle"));
        let unknown = serde_saphyr::from_str::<ProfilesFile>("profiles:\n  x:\n    windoww: 3\n");
        assert!(unknown.unwrap_err().to_string().contains("windoww"));
    }
}
