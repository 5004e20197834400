//! Static configuration: the `modules.yaml` file and the `HERMES_MODULES` variable.
//!
//! ```yaml
//! onScriptError: static        # fail (default) | static | none
//! modules:
//!   - module: mem-logger
//!   - module: mem-tracer
//!     config: staging-tunings
//!     settings: { window: 20 }
//! profiles:                    # same shape as a profiles file
//!   staging-tunings: { interval_ms: 2000 }
//! ```
//!
//! Unknown keys are rejected with the key, line and column.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::Deserialize;

use crate::catalog::ProfilePatch;
use crate::directive::Directive;
use crate::error::Result;

/// Default location of the static configuration file.
pub const DEFAULT_STATIC_PATH: &str = "/etc/hermes/modules.yaml";

/// What to do when the loader script exists but fails (non-zero exit, timeout, bad output).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnScriptError {
    /// Fail the phase with the script's error (the default: a broken script is visible).
    #[default]
    Fail,
    /// Log the error and use the static configuration instead.
    Static,
    /// Log the error and load no modules.
    None,
}

impl fmt::Display for OnScriptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Fail => "fail",
            Self::Static => "static",
            Self::None => "none",
        })
    }
}

/// A scalar setting value in YAML (`window: 20` or `window: "20"`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Scalar {
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// A string.
    Str(String),
}

impl fmt::Display for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Int(i) => write!(f, "{i}"),
            Self::Float(x) => write!(f, "{x}"),
            Self::Bool(b) => write!(f, "{b}"),
            Self::Str(s) => f.write_str(s),
        }
    }
}

/// One module in the static file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticModule {
    /// The module name.
    pub module: String,
    /// The tuning profile.
    #[serde(default)]
    pub config: Option<String>,
    /// Setting overrides.
    #[serde(default)]
    pub settings: BTreeMap<String, Scalar>,
}

/// The static configuration file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StaticConfig {
    /// Policy when the script fails.
    #[serde(default)]
    pub on_script_error: Option<OnScriptError>,
    /// Modules to load when there is no script.
    #[serde(default)]
    pub modules: Vec<StaticModule>,
    /// Profile overrides and additions.
    #[serde(default)]
    pub profiles: BTreeMap<String, ProfilePatch>,
}

impl StaticConfig {
    /// Reads and parses a static configuration file.
    pub fn load(path: &Path) -> Result<Self> {
        crate::yaml::load_yaml(path)
    }

    /// The modules as directives, numbered by their position in the list.
    pub fn directives(&self) -> Vec<Directive> {
        self.modules
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let settings: BTreeMap<String, String> = m
                    .settings
                    .iter()
                    .map(|(k, v)| (k.clone(), v.to_string()))
                    .collect();
                let mut text = format!("module={}", m.module);
                if let Some(c) = &m.config {
                    text.push_str(&format!(",config={c}"));
                }
                for (k, v) in &settings {
                    text.push_str(&format!(",{k}={v}"));
                }
                Directive {
                    line: i + 1,
                    text,
                    module: m.module.clone(),
                    config: m.config.clone(),
                    settings,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_file_and_converts_to_directives() {
        let c: StaticConfig = serde_saphyr::from_str(
            "onScriptError: static\nmodules:\n  - module: mem-logger\n  - module: mem-tracer\n    config: staging-tunings\n    settings: {window: 20, growth_threshold_kib_per_min: 1.5}\nprofiles:\n  staging-tunings: {interval_ms: 2000}\n",
        )
        .unwrap();
        assert_eq!(c.on_script_error, Some(OnScriptError::Static));
        let ds = c.directives();
        assert_eq!(ds.len(), 2);
        assert_eq!(ds[1].line, 2);
        assert_eq!(
            ds[1].text,
            "module=mem-tracer,config=staging-tunings,growth_threshold_kib_per_min=1.5,window=20"
        );
        assert_eq!(c.profiles["staging-tunings"].interval_ms, Some(2000));
    }

    #[test]
    fn unknown_keys_and_bad_policy_are_rejected_with_position() {
        let e = serde_saphyr::from_str::<StaticConfig>("modules: []\nonScriptErorr: fail\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("onScriptErorr"), "{e}");
        assert!(e.contains('2'), "error should name line 2: {e}");
        let e = serde_saphyr::from_str::<StaticConfig>("onScriptError: retry\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("retry"), "{e}");
    }

    #[test]
    fn load_names_the_file() {
        let e = StaticConfig::load(Path::new("/nonexistent/modules.yaml")).unwrap_err();
        assert_eq!(e.to_string(), "cannot read /nonexistent/modules.yaml");
    }
}
