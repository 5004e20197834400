//! Image patterns from a policy's `images` list: globs over `registry/repo[:tag]` and digest pins.
//!
//! - `*` matches within one path segment (or within the tag), `**` as a whole segment matches any
//!   number of segments (including none); `**` alone matches every image.
//! - The tag is optional: without one, every tag (and a digest-only reference) matches.
//! - Names are normalised the way [`hermes_oci_types::Reference::parse`] normalises references: a first
//!   segment without `.` or `:` that is not `localhost` is a Docker Hub path (`nginx` →
//!   `docker.io/library/nginx`, `team/app` → `docker.io/team/app`). A wildcard-only first segment
//!   followed by more segments stands for the registry (`*/team/app`).
//! - A pin is `[pattern@]sha256:<hex>`: it matches the container's resolved digest (the pod's
//!   `imageID`) or the digest written in its reference, and, if given, the pattern too.

use std::fmt;

use hermes_oci_types::{DOCKER_HUB, Digest, Reference};

/// A compiled entry of `spec.images`.
#[derive(Clone, PartialEq, Eq)]
pub struct ImagePattern {
    text: String,
    normalized: String,
    segments: Vec<Segment>,
    tag: Option<String>,
    digest: Option<Digest>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// `**`: any number of segments.
    AnyDepth,
    /// A literal segment, possibly with `*`.
    Glob(String),
}

impl ImagePattern {
    /// Compile a pattern; the error says what is wrong with it.
    pub fn parse(text: &str) -> Result<Self, String> {
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err("an image pattern must not be empty".to_owned());
        }
        if trimmed.contains(char::is_whitespace) {
            return Err("an image pattern must not contain whitespace".to_owned());
        }
        let (name, digest) = if let Some(d) = trimmed.strip_prefix("sha256:").map(|_| trimmed) {
            ("**", Some(d))
        } else {
            match trimmed.split_once('@') {
                Some(("", _)) => return Err("nothing before '@'".to_owned()),
                Some((name, d)) => (name, Some(d)),
                None => (trimmed, None),
            }
        };
        let digest = digest
            .map(|d| {
                Digest::parse(d).map_err(|_| format!("{d:?} is not a digest (sha256:<64 hex>)"))
            })
            .transpose()?;
        let (path, tag) = match name.rfind(':') {
            Some(i) if !name[i..].contains('/') => (&name[..i], Some(&name[i + 1..])),
            _ => (name, None),
        };
        if let Some(tag) = tag {
            if tag.is_empty() {
                return Err("empty tag after ':'".to_owned());
            }
            if !tag
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"._-*".contains(&c))
            {
                return Err(format!(
                    "tag {tag:?}: tags are letters, digits, . _ - and the wildcard *"
                ));
            }
        }
        let mut parts: Vec<&str> = path.split('/').collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(format!("{path:?} has an empty path segment"));
        }
        for (i, p) in parts.iter().enumerate() {
            if p.contains("**") && *p != "**" {
                return Err(format!("{p:?}: '**' must be a whole path segment"));
            }
            let port_ok = i == 0 && parts.len() > 1;
            if !p.bytes().all(|c| {
                c.is_ascii_lowercase()
                    || c.is_ascii_digit()
                    || b"._-*".contains(&c)
                    || (port_ok && c == b':')
            }) {
                return Err(format!(
                    "{p:?}: names are lower-case letters, digits, . _ - and the wildcards * and **"
                ));
            }
        }
        let whole_wildcard = |p: &str| p == "*" || p == "**";
        let first_is_registry = parts.len() > 1
            && (parts[0].contains(['.', ':'])
                || parts[0] == "localhost"
                || whole_wildcard(parts[0]));
        let match_all = parts == ["**"];
        if !match_all && !first_is_registry {
            if parts.len() == 1 && parts[0] != "**" {
                parts.insert(0, "library");
            }
            parts.insert(0, DOCKER_HUB);
        }
        let mut normalized = parts.join("/");
        if let Some(tag) = tag {
            normalized = format!("{normalized}:{tag}");
        }
        if let Some(d) = &digest {
            normalized = format!("{normalized}@{d}");
        }
        Ok(Self {
            text: trimmed.to_owned(),
            normalized,
            segments: parts
                .into_iter()
                .map(|p| {
                    if p == "**" {
                        Segment::AnyDepth
                    } else {
                        Segment::Glob(p.to_owned())
                    }
                })
                .collect(),
            tag: tag.map(str::to_owned),
            digest,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The normalised form (`docker.io/library/nginx:1.*`).
    pub fn normalized(&self) -> &str {
        &self.normalized
    }

    /// The pinned digest, if this is a pin.
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// True when the name and tag have no wildcard (one repository, one tag or every tag).
    pub fn is_exact(&self) -> bool {
        !self.normalized.contains('*')
    }

    /// Characters of the normalised pattern before its first wildcard: a longer literal prefix
    /// is a more specific pattern.
    pub fn literal_prefix_len(&self) -> usize {
        self.normalized.find('*').unwrap_or(self.normalized.len())
    }

    /// Whether a container running `reference`, resolved to `resolved` (the pod's `imageID`
    /// digest, when known), matches.
    pub fn matches(&self, reference: &Reference, resolved: Option<&Digest>) -> bool {
        if let Some(pin) = &self.digest
            && resolved != Some(pin)
            && reference.digest.as_ref() != Some(pin)
        {
            return false;
        }
        if let Some(tag) = &self.tag {
            match &reference.tag {
                Some(t) if glob(tag, t) => {}
                _ => return false,
            }
        }
        let name = format!("{}/{}", reference.registry, reference.repository);
        let parts: Vec<&str> = name.split('/').collect();
        segments_match(&self.segments, &parts)
    }
}

impl fmt::Debug for ImagePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ImagePattern({})", self.normalized)
    }
}

impl fmt::Display for ImagePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

fn segments_match(pattern: &[Segment], name: &[&str]) -> bool {
    match pattern.split_first() {
        None => name.is_empty(),
        Some((Segment::AnyDepth, rest)) => {
            (0..=name.len()).any(|skip| segments_match(rest, &name[skip..]))
        }
        Some((Segment::Glob(g), rest)) => match name.split_first() {
            Some((first, tail)) => glob(g, first) && segments_match(rest, tail),
            None => false,
        },
    }
}

/// `*` matches any run of characters (the caller has already split at `/`).
fn glob(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn matches(pattern: &str, reference: &str, resolved: Option<&str>) -> bool {
        let p = ImagePattern::parse(pattern).unwrap();
        let r = Reference::parse(reference).unwrap();
        let d = resolved.map(|d| Digest::parse(d).unwrap());
        p.matches(&r, d.as_ref())
    }

    #[test]
    fn globs_match_like_the_docs_say() {
        let cases: &[(&str, &str, bool)] = &[
            ("nginx", "nginx", true),
            ("nginx", "nginx:1.27", true),
            ("nginx", "docker.io/library/nginx:1.27", true),
            ("nginx", "nginxx", false),
            ("nginx:1.*", "nginx:1.27", true),
            ("nginx:1.*", "nginx:2.0", false),
            ("nginx:1.*", &format!("nginx@{D1}"), false),
            ("library/*", "redis", true),
            ("docker.io/*", "redis", false),
            ("docker.io/**", "redis", true),
            ("team/app", "docker.io/team/app:v1", true),
            ("ghcr.io/acme/*", "ghcr.io/acme/api:v1", true),
            ("ghcr.io/acme/*", "ghcr.io/acme/team/api:v1", false),
            ("ghcr.io/acme/**", "ghcr.io/acme/team/api:v1", true),
            ("ghcr.io/acme/**", "ghcr.io/acme/api", true),
            ("ghcr.io/**/api", "ghcr.io/acme/team/api", true),
            ("ghcr.io/**/api", "ghcr.io/api", true),
            ("ghcr.io/**/api", "ghcr.io/acme/web", false),
            ("*/acme/api", "ghcr.io/acme/api", true),
            ("*/acme/api", "quay.io/acme/api", true),
            ("*/acme/api", "docker.io/acme/api", true),
            ("localhost:5000/app-*", "localhost:5000/app-web:dev", true),
            ("localhost:5000/app-*", "localhost:5001/app-web:dev", false),
            ("registry.local/a*c/x", "registry.local/abbc/x", true),
            ("registry.local/a*c/x", "registry.local/abbd/x", false),
            ("**", "quay.io/x/y/z:1", true),
            ("**:latest", "quay.io/x/y/z", true),
            ("**:latest", "quay.io/x/y/z:1", false),
        ];
        for (pattern, reference, expected) in cases {
            assert_eq!(
                matches(pattern, reference, None),
                *expected,
                "{pattern} vs {reference}"
            );
        }
    }

    #[test]
    fn pins_match_the_resolved_or_written_digest() {
        let pin = format!("ghcr.io/acme/api@{D1}");
        assert!(matches(&pin, "ghcr.io/acme/api:v1", Some(D1)));
        assert!(!matches(&pin, "ghcr.io/acme/api:v1", Some(D2)));
        assert!(!matches(&pin, "ghcr.io/acme/api:v1", None));
        assert!(matches(&pin, &format!("ghcr.io/acme/api@{D1}"), None));
        assert!(!matches(&pin, "ghcr.io/acme/web:v1", Some(D1)));
        // A bare digest pins any repository.
        assert!(matches(D1, "quay.io/x/y:1", Some(D1)));
        assert!(!matches(D1, "quay.io/x/y:1", Some(D2)));
    }

    #[test]
    fn normalisation_and_specificity_measures() {
        let cases: &[(&str, &str, bool, usize)] = &[
            ("nginx", "docker.io/library/nginx", true, 23),
            ("nginx:1.*", "docker.io/library/nginx:1.*", false, 26),
            ("team/*", "docker.io/team/*", false, 15),
            ("**", "**", false, 0),
            ("ghcr.io/acme/**", "ghcr.io/acme/**", false, 13),
        ];
        for (text, normalized, exact, prefix) in cases {
            let p = ImagePattern::parse(text).unwrap();
            assert_eq!(p.normalized(), *normalized, "{text}");
            assert_eq!(p.is_exact(), *exact, "{text}");
            assert_eq!(p.literal_prefix_len(), *prefix, "{text}");
        }
    }

    #[test]
    fn bad_patterns_say_why() {
        let cases: &[(&str, &str)] = &[
            ("", "must not be empty"),
            ("ghcr.io//x", "empty path segment"),
            ("ghcr.io/a**/x", "whole path segment"),
            ("Nginx", "lower-case"),
            ("nginx:", "empty tag"),
            ("a b", "whitespace"),
            ("nginx@sha256:abc", "is not a digest"),
            ("@sha256:abc", "nothing before"),
            ("nginx:v$1", "tags are"),
        ];
        for (text, expected) in cases {
            let err = ImagePattern::parse(text).unwrap_err();
            assert!(err.contains(expected), "{text:?}: {err}");
        }
    }

    #[test]
    fn star_glob_backtracks() {
        assert!(glob("a*b*c", "aXbYbZc"));
        assert!(!glob("a*b*c", "aXbYbZ"));
        assert!(glob("*", ""));
        assert!(glob("**", "x"));
        assert!(!glob("", "x"));
    }
}
