//! The subset of containerd's filter syntax that `List` (`Walk`) supports.
//!
//! A filter is a comma-separated conjunction of terms; several filters are OR-ed by the caller.
//! A term is `FIELD`, `FIELD==VALUE` or `FIELD!=VALUE`, with FIELD one of `name`, `parent`,
//! `kind`, `labels.KEY` or `labels."KEY"` and VALUE bare or double-quoted. Regular-expression
//! matching (`~=`) and other containerd operators are refused with an error rather than ignored.

use crate::{Error, Info, Result};

/// One parsed filter: all terms must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Filter(Vec<Term>);

#[derive(Debug, Clone, PartialEq, Eq)]
struct Term {
    field: Field,
    cond: Cond,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Field {
    Name,
    Parent,
    Kind,
    Label(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Cond {
    Present,
    Eq(String),
    Ne(String),
}

impl Filter {
    /// Parses one filter string.
    pub fn parse(src: &str) -> Result<Self> {
        let bad = |reason| Error::InvalidFilter {
            filter: src.to_owned(),
            reason,
        };
        let mut p = Parser {
            s: src.as_bytes(),
            i: 0,
        };
        let mut terms = Vec::new();
        loop {
            p.skip_ws();
            let head = p.ident().ok_or_else(|| bad("expected a field name"))?;
            let field = match head.as_str() {
                "name" => Field::Name,
                "parent" => Field::Parent,
                "kind" => Field::Kind,
                "labels" => {
                    if !p.eat(b'.') {
                        return Err(bad("expected labels.KEY"));
                    }
                    let key = if p.peek() == Some(b'"') {
                        p.quoted()
                            .ok_or_else(|| bad("unterminated quoted label key"))?
                    } else {
                        p.ident().ok_or_else(|| bad("expected a label key"))?
                    };
                    Field::Label(key)
                }
                _ => return Err(bad("unknown field; use name, parent, kind or labels.KEY")),
            };
            p.skip_ws();
            let cond = if p.eat_str("==") {
                Cond::Eq(p.value().ok_or_else(|| bad("bad value"))?)
            } else if p.eat_str("!=") {
                Cond::Ne(p.value().ok_or_else(|| bad("bad value"))?)
            } else if p.peek().is_none() || p.peek() == Some(b',') {
                Cond::Present
            } else {
                return Err(bad("unsupported operator; only == and != are supported"));
            };
            terms.push(Term { field, cond });
            p.skip_ws();
            match p.peek() {
                None => break,
                Some(b',') => p.i += 1,
                Some(_) => return Err(bad("expected , between terms")),
            }
        }
        Ok(Filter(terms))
    }

    /// Whether `info` satisfies every term.
    pub fn matches(&self, info: &Info) -> bool {
        self.0.iter().all(|t| {
            let value: Option<&str> = match &t.field {
                Field::Name => Some(&info.name),
                // containerd's view: a snapshot without a parent has parent "".
                Field::Parent => Some(info.parent.as_deref().unwrap_or("")),
                Field::Kind => Some(info.kind.as_str()),
                Field::Label(k) => info.labels.get(k).map(String::as_str),
            };
            let eq = |v: &str, want: &str| match t.field {
                Field::Kind => v.eq_ignore_ascii_case(want),
                _ => v == want,
            };
            match &t.cond {
                Cond::Present => value.is_some(),
                Cond::Eq(want) => value.is_some_and(|v| eq(v, want)),
                Cond::Ne(want) => !eq(value.unwrap_or(""), want),
            }
        })
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn eat(&mut self, c: u8) -> bool {
        let hit = self.peek() == Some(c);
        self.i += usize::from(hit);
        hit
    }

    fn eat_str(&mut self, t: &str) -> bool {
        let hit = self.s[self.i..].starts_with(t.as_bytes());
        if hit {
            self.i += t.len();
        }
        hit
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(|c| c.is_ascii_whitespace()) {
            self.i += 1;
        }
    }

    /// A bare field or label key: letters, digits, `_`, `-`, `/`.
    fn ident(&mut self) -> Option<String> {
        let start = self.i;
        while self
            .peek()
            .is_some_and(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'/'))
        {
            self.i += 1;
        }
        (self.i > start).then(|| String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
    }

    /// A double-quoted string with `\"` and `\\` escapes.
    fn quoted(&mut self) -> Option<String> {
        if !self.eat(b'"') {
            return None;
        }
        let mut out = Vec::new();
        loop {
            match self.peek()? {
                b'"' => {
                    self.i += 1;
                    return String::from_utf8(out).ok();
                }
                b'\\' => {
                    self.i += 1;
                    out.push(self.peek()?);
                    self.i += 1;
                }
                c => {
                    out.push(c);
                    self.i += 1;
                }
            }
        }
    }

    /// A quoted value, or a bare one running to the next `,`.
    fn value(&mut self) -> Option<String> {
        self.skip_ws();
        if self.peek() == Some(b'"') {
            return self.quoted();
        }
        let start = self.i;
        while self.peek().is_some_and(|c| c != b',') {
            self.i += 1;
        }
        let v = std::str::from_utf8(&self.s[start..self.i]).ok()?.trim();
        (!v.is_empty()).then(|| v.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::SystemTime;

    use super::*;
    use crate::Kind;

    fn info(name: &str, labels: &[(&str, &str)]) -> Info {
        Info {
            name: name.into(),
            parent: None,
            kind: Kind::Committed,
            created: SystemTime::UNIX_EPOCH,
            updated: SystemTime::UNIX_EPOCH,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
        }
    }

    #[test]
    fn quoted_label_key_equality() {
        let f = Filter::parse(r#"labels."containerd.io/snapshot.ref"==sha256:abc"#).unwrap();
        assert!(f.matches(&info("a", &[("containerd.io/snapshot.ref", "sha256:abc")])));
        assert!(!f.matches(&info("a", &[("containerd.io/snapshot.ref", "sha256:abd")])));
        assert!(!f.matches(&info("a", &[])));
    }

    #[test]
    fn conjunction_presence_kind_and_not_equal() {
        let f = Filter::parse(r#"kind==committed, labels.team, name!="b""#).unwrap();
        assert!(f.matches(&info("a", &[("team", "x")])));
        assert!(!f.matches(&info("b", &[("team", "x")])));
        assert!(!f.matches(&info("a", &[])));
    }

    /// containerd's metadata layer looks up a remote base layer with `parent==""` after the
    /// snapshotter answered `Prepare` with AlreadyExists.
    #[test]
    fn an_empty_parent_matches_a_snapshot_without_parent() {
        let f =
            Filter::parse(r#"labels."containerd.io/snapshot.ref"==sha256:abc,parent=="""#).unwrap();
        assert!(f.matches(&info("a", &[("containerd.io/snapshot.ref", "sha256:abc")])));
        let mut child = info("b", &[("containerd.io/snapshot.ref", "sha256:abc")]);
        child.parent = Some("a".into());
        assert!(!f.matches(&child));
    }

    #[test]
    fn unsupported_syntax_is_an_error_not_a_match_all() {
        for bad in [r#"labels.a~=x"#, "size==1", "labels", "name=a", ""] {
            let err = Filter::parse(bad).unwrap_err();
            assert!(
                matches!(err, Error::InvalidFilter { .. }),
                "{bad:?} gave {err:?}"
            );
        }
    }
}
