//! Image references: `[registry/]repository[:tag][@digest]`, with Docker Hub defaults.

use std::fmt;

use crate::{Digest, Error, Result};

/// Docker Hub's name in references.
pub const DOCKER_HUB: &str = "docker.io";

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// Registry host[:port] as written (`docker.io` for Docker Hub).
    pub registry: String,
    /// Repository path (`library/ubuntu` for `ubuntu` on Docker Hub).
    pub repository: String,
    /// Tag, if any (`latest` when neither tag nor digest is given).
    pub tag: Option<String>,
    /// Digest, if pinned.
    pub digest: Option<Digest>,
}

impl Reference {
    /// Parse a reference the way docker and containerd do.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |what| Error::InvalidReference {
            reference: s.to_owned(),
            what,
        };
        if s.is_empty() || s.contains(char::is_whitespace) {
            return Err(bad("empty or contains whitespace"));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((rest, d)) => (
                rest,
                Some(Digest::parse(d).map_err(|_| bad("the digest after @ is not sha256:<hex>"))?),
            ),
            None => (s, None),
        };
        let (registry, path) = match rest.split_once('/') {
            Some((first, path)) if first.contains(['.', ':']) || first == "localhost" => {
                (first.to_owned(), path)
            }
            _ => (DOCKER_HUB.to_owned(), rest),
        };
        // A tag is after the last ':' that follows the last '/'.
        let (repo, tag) = match path.rfind(':') {
            Some(i) if !path[i..].contains('/') => (&path[..i], Some(path[i + 1..].to_owned())),
            _ => (path, None),
        };
        if repo.is_empty() || repo.starts_with('/') || repo.ends_with('/') || repo.contains("//") {
            return Err(bad("missing or malformed repository"));
        }
        if !repo
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._-/".contains(&c))
        {
            return Err(bad(
                "repository names are lower-case letters, digits and . _ - /",
            ));
        }
        if let Some(t) = &tag
            && (t.is_empty()
                || t.len() > 128
                || !t
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c)))
        {
            return Err(bad("tags are up to 128 letters, digits and . _ -"));
        }
        let repository = if registry == DOCKER_HUB && !repo.contains('/') {
            format!("library/{repo}")
        } else {
            repo.to_owned()
        };
        let tag = if tag.is_none() && digest.is_none() {
            Some("latest".to_owned())
        } else {
            tag
        };
        Ok(Self {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The host to talk to (`registry-1.docker.io` for Docker Hub).
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            "registry-1.docker.io"
        } else {
            &self.registry
        }
    }

    /// What to put after `/manifests/`: the digest if pinned, else the tag.
    pub fn manifest_ref(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".to_owned(),
        }
    }

    /// The same repository with another tag (and no digest).
    pub fn with_tag(&self, tag: &str) -> Self {
        Self {
            tag: Some(tag.to_owned()),
            digest: None,
            ..self.clone()
        }
    }

    /// The same repository pinned to a digest (keeping the tag for display).
    pub fn with_digest(&self, digest: Digest) -> Self {
        Self {
            digest: Some(digest),
            ..self.clone()
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_like_docker() {
        let r = Reference::parse("ubuntu").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("docker.io", "library/ubuntu", Some("latest"))
        );
        assert_eq!(r.api_host(), "registry-1.docker.io");
        let r = Reference::parse("localhost:5000/ml/serve:v1.2").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("localhost:5000", "ml/serve", Some("v1.2"))
        );
        let d = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";
        let r = Reference::parse(&format!("127.0.0.1:5000/a@{d}")).unwrap();
        assert_eq!((r.tag.as_deref(), r.manifest_ref()), (None, d.to_owned()));
        assert_eq!(r.to_string(), format!("127.0.0.1:5000/a@{d}"));
        assert!(Reference::parse("UPPER/case").is_err());
        assert!(Reference::parse("a:b:c").is_err());
        assert!(Reference::parse("host.io/").is_err());
        assert!(Reference::parse("x@sha256:12").is_err());
    }
}
