//! Module directives: the loader script's output language and the `HERMES_MODULES` short form.
//!
//! A directive line is `module=NAME[,config=PROFILE][,KEY=VALUE…]`. Blank lines and lines starting
//! with `#` are ignored; whitespace around the line, each field, each key and each value is
//! trimmed. This module checks syntax only: whether a module or profile exists is decided by
//! [`crate::catalog::ModuleCatalog`].

use std::collections::BTreeMap;

use crate::error::{At, Error, Result, SyntaxProblem};
// Where directives come from is part of every error's location, so it lives with the errors.
pub use crate::error::Origin;

/// One parsed directive: a module, an optional tuning profile and setting overrides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Directive {
    /// 1-based line (or entry) number in its origin.
    pub line: usize,
    /// The trimmed text, for messages.
    pub text: String,
    /// The module name as written.
    pub module: String,
    /// The tuning profile, if given.
    pub config: Option<String>,
    /// Other `KEY=VALUE` fields, in key order.
    pub settings: BTreeMap<String, String>,
}

/// Whether `s` is a valid module, profile or key name.
pub fn is_valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Parses a whole script output (or any directive text).
pub fn parse_directives(origin: &Origin, text: &str) -> Result<Vec<Directive>> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        if let Some(d) = parse_line(origin, i + 1, raw)? {
            out.push(d);
        }
    }
    Ok(out)
}

/// Parses one line; `Ok(None)` for blank lines and comments.
pub fn parse_line(origin: &Origin, line: usize, raw: &str) -> Result<Option<Directive>> {
    let text = raw.trim();
    if text.is_empty() || text.starts_with('#') {
        return Ok(None);
    }
    let bad = |problem| Error::Malformed {
        at: At::new(origin, line, text),
        problem,
    };
    let mut module = None;
    let mut config = None;
    let mut settings = BTreeMap::new();
    for (idx, field) in text.split(',').map(str::trim).enumerate() {
        let Some((k, v)) = field.split_once('=') else {
            return Err(bad(if idx == 0 {
                SyntaxProblem::MissingModule
            } else {
                SyntaxProblem::NotKeyValue {
                    field: field.to_owned(),
                }
            }));
        };
        let (k, v) = (k.trim(), v.trim());
        if k.is_empty() || v.is_empty() {
            return Err(bad(SyntaxProblem::Empty {
                field: field.to_owned(),
            }));
        }
        if !is_valid_name(k) {
            return Err(bad(SyntaxProblem::BadName { name: k.to_owned() }));
        }
        match (idx, k) {
            (0, "module") => {
                if !is_valid_name(v) {
                    return Err(bad(SyntaxProblem::BadName { name: v.to_owned() }));
                }
                module = Some(v.to_owned());
            }
            (0, _) => return Err(bad(SyntaxProblem::MissingModule)),
            (_, "module") => return Err(bad(SyntaxProblem::ModuleTwice)),
            (_, "config") => {
                if config.is_some() {
                    return Err(bad(SyntaxProblem::DuplicateKey { key: k.to_owned() }));
                }
                if !is_valid_name(v) {
                    return Err(bad(SyntaxProblem::BadName { name: v.to_owned() }));
                }
                config = Some(v.to_owned());
            }
            _ => {
                if settings.insert(k.to_owned(), v.to_owned()).is_some() {
                    return Err(bad(SyntaxProblem::DuplicateKey { key: k.to_owned() }));
                }
            }
        }
    }
    let module = module.ok_or_else(|| bad(SyntaxProblem::MissingModule))?;
    Ok(Some(Directive {
        line,
        text: text.to_owned(),
        module,
        config,
        settings,
    }))
}

/// Parses `HERMES_MODULES`: comma-separated `NAME[:PROFILE]` entries, numbered from 1.
/// Empty entries (`a,,b`, a trailing comma) are errors, as they are usually typos.
pub fn parse_modules_env(value: &str) -> Result<Vec<Directive>> {
    let origin = Origin::EnvVar;
    if value.trim().is_empty() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for (i, entry) in value.split(',').enumerate() {
        let text = entry.trim();
        let bad = |problem| Error::Malformed {
            at: At::new(&origin, i + 1, text),
            problem,
        };
        let (module, config) = match text.split_once(':') {
            Some((m, c)) => (m.trim(), Some(c.trim())),
            None => (text, None),
        };
        if module.is_empty() || config.is_some_and(str::is_empty) {
            return Err(bad(SyntaxProblem::Empty {
                field: text.to_owned(),
            }));
        }
        for name in std::iter::once(module).chain(config) {
            if !is_valid_name(name) {
                return Err(bad(SyntaxProblem::BadName {
                    name: name.to_owned(),
                }));
            }
        }
        out.push(Directive {
            line: i + 1,
            text: text.to_owned(),
            module: module.to_owned(),
            config: config.map(str::to_owned),
            settings: BTreeMap::new(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn script() -> Origin {
        Origin::Script(PathBuf::from("/etc/hermes/load-sidecars.sh"))
    }

    fn err(text: &str) -> String {
        parse_directives(&script(), text)
            .expect_err("expected a parse error")
            .to_string()
    }

    #[test]
    fn parses_module_config_and_settings_with_trimming() {
        let ds = parse_directives(
            &script(),
            "\n  # a comment\n module = mem-tracer , config= staging-tunings ,window=12 \n\n",
        )
        .unwrap();
        assert_eq!(ds.len(), 1);
        let d = &ds[0];
        assert_eq!(d.line, 3);
        assert_eq!(d.module, "mem-tracer");
        assert_eq!(d.config.as_deref(), Some("staging-tunings"));
        assert_eq!(d.settings.get("window").map(String::as_str), Some("12"));
        assert_eq!(
            d.text,
            "module = mem-tracer , config= staging-tunings ,window=12"
        );
    }

    #[test]
    fn plain_module_has_no_config() {
        let ds = parse_directives(&script(), "module=mem-logger\r\nmodule=mem-tracer\n").unwrap();
        assert_eq!(ds.len(), 2);
        assert_eq!(ds[0].config, None);
        assert!(ds[0].settings.is_empty());
        assert_eq!(ds[1].line, 2);
    }

    #[test]
    fn only_comments_and_blanks_is_empty() {
        assert!(
            parse_directives(&script(), "# nothing\n\n   \n\t#x\n")
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn missing_module_field_names_line_and_text() {
        assert_eq!(
            err("module=mem-logger\nconfig=prod-tunings"),
            "loader script /etc/hermes/load-sidecars.sh output line 2: malformed directive \
             `config=prod-tunings`: expected `module=NAME` as the first field"
        );
        assert!(err("hello world").contains("line 1: malformed directive `hello world`"));
    }

    #[test]
    fn field_without_equals_is_rejected() {
        let e = err("module=mem-logger,verbose");
        assert!(
            e.ends_with("line 1: malformed directive `module=mem-logger,verbose`: field `verbose` is not KEY=VALUE"),
            "{e}"
        );
    }

    #[test]
    fn empty_value_and_trailing_comma_are_rejected() {
        assert!(err("module=").contains("field `module=` has an empty key or value"));
        assert!(err("module=mem-logger,").contains("field `` is not KEY=VALUE"));
        assert!(err("module=mem-logger,config=").contains("field `config=` has an empty key"));
        assert!(err("module=mem-logger,=3").contains("field `=3` has an empty key"));
    }

    #[test]
    fn duplicate_keys_and_second_module_are_rejected() {
        assert!(
            err("module=mem-logger,config=a,config=b")
                .contains("key `config` appears more than once")
        );
        assert!(err("module=mem-logger,window=1,window=2").contains("key `window` appears"));
        assert!(
            err("module=mem-logger,module=mem-tracer")
                .contains("`module=` may appear only once, as the first field")
        );
    }

    #[test]
    fn bad_names_are_rejected() {
        assert!(err("module=mem logger").contains("`mem logger` is not a valid name"));
        assert!(err("module=mem-logger,config=a/b").contains("`a/b` is not a valid name"));
        assert!(err("module=x,we ird=1").contains("`we ird` is not a valid name"));
    }

    #[test]
    fn env_short_form() {
        let ds = parse_modules_env("mem-logger, mem-tracer:staging-tunings").unwrap();
        assert_eq!(ds.len(), 2);
        assert_eq!(ds[0].module, "mem-logger");
        assert_eq!(ds[0].config, None);
        assert_eq!(ds[1].module, "mem-tracer");
        assert_eq!(ds[1].config.as_deref(), Some("staging-tunings"));
        assert_eq!(ds[1].line, 2);
        assert!(parse_modules_env("  ").unwrap().is_empty());
    }

    #[test]
    fn env_short_form_errors_name_the_entry() {
        let e = parse_modules_env("mem-logger,,mem-tracer")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "HERMES_MODULES entry line 2: malformed directive ``: field `` has an empty key or value"
        );
        let e = parse_modules_env("mem-tracer:").unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("`mem-tracer:`"), "{e}");
        let e = parse_modules_env("mem tracer").unwrap_err().to_string();
        assert!(e.contains("`mem tracer` is not a valid name"), "{e}");
    }
}
