//! Choosing a platform's manifest from an image index: a pure function over the index's bytes,
//! matching the way containerd's default platform matcher picks one for the host.

use serde::Deserialize;

use crate::{Error, Result};

/// An OS/architecture pair, in OCI's spelling (`linux`, `amd64`, `arm64`, …).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    /// Operating system, e.g. `linux`.
    pub os: String,
    /// CPU architecture, e.g. `amd64`.
    pub architecture: String,
    /// Architecture variant (`v8`, `v7`), if any.
    pub variant: Option<String>,
}

impl Platform {
    /// The platform this process runs on.
    pub fn host() -> Platform {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            other => other,
        };
        Platform {
            os: std::env::consts::OS.to_owned(),
            architecture: architecture.to_owned(),
            variant: None,
        }
    }

    /// Parses `os/arch[/variant]` (e.g. `linux/amd64`); `None` if malformed.
    pub fn parse(text: &str) -> Option<Platform> {
        let mut parts = text.split('/');
        let os = parts.next().filter(|s| !s.is_empty())?;
        let architecture = parts.next().filter(|s| !s.is_empty())?;
        let variant = parts.next().map(str::to_owned);
        if parts.next().is_some() || variant.as_deref() == Some("") {
            return None;
        }
        Some(Platform {
            os: os.to_owned(),
            architecture: architecture.to_owned(),
            variant,
        })
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[derive(Deserialize)]
struct Index {
    #[serde(default)]
    manifests: Vec<IndexEntry>,
}

#[derive(Deserialize)]
struct IndexEntry {
    digest: String,
    platform: Option<IndexPlatform>,
}

#[derive(Deserialize)]
struct IndexPlatform {
    os: String,
    architecture: String,
    variant: Option<String>,
}

/// The digest of the first manifest in an image index (OCI index or Docker manifest list) for
/// `platform`, or `None` if it has none. A wanted variant must match; an entry without a variant
/// matches any wanted variant. `digest` names the index in errors.
pub fn manifest_for_platform(
    index_json: &[u8],
    digest: &str,
    platform: &Platform,
) -> Result<Option<String>> {
    let index: Index = serde_json::from_slice(index_json).map_err(|source| Error::Json {
        what: "image index",
        digest: digest.to_owned(),
        source,
    })?;
    Ok(index
        .manifests
        .into_iter()
        .find(|m| {
            m.platform.as_ref().is_some_and(|p| {
                p.os == platform.os
                    && p.architecture == platform.architecture
                    && match (&platform.variant, &p.variant) {
                        (Some(want), Some(have)) => want == have,
                        _ => true,
                    }
            })
        })
        .map(|m| m.digest))
}

#[cfg(test)]
mod tests {
    use super::*;

    const INDEX: &str = r#"{"schemaVersion":2,"manifests":[
        {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:aa","size":1,
         "platform":{"os":"linux","architecture":"arm64","variant":"v8"}},
        {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:bb","size":1,
         "annotations":{"vnd.docker.reference.type":"attestation-manifest"}},
        {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:cc","size":1,
         "platform":{"os":"linux","architecture":"amd64"}}]}"#;

    fn pick(p: &str) -> Option<String> {
        manifest_for_platform(INDEX.as_bytes(), "sha256:ii", &Platform::parse(p).unwrap()).unwrap()
    }

    #[test]
    fn picks_the_manifest_of_the_wanted_platform() {
        assert_eq!(pick("linux/amd64").as_deref(), Some("sha256:cc"));
        assert_eq!(pick("linux/arm64").as_deref(), Some("sha256:aa"));
        assert_eq!(pick("linux/arm64/v8").as_deref(), Some("sha256:aa"));
        assert_eq!(pick("linux/arm64/v7"), None);
        assert_eq!(pick("windows/amd64"), None);
    }

    #[test]
    fn a_broken_index_is_an_error_naming_it() {
        let err = manifest_for_platform(b"{", "sha256:ii", &Platform::host()).unwrap_err();
        assert_eq!(err.to_string(), "cannot parse image index sha256:ii");
    }

    #[test]
    fn platforms_parse_and_print() {
        let p = Platform::parse("linux/arm64/v8").unwrap();
        assert_eq!(p.to_string(), "linux/arm64/v8");
        assert_eq!(Platform::parse("linux").map(|p| p.to_string()), None);
        assert_eq!(Platform::parse("linux/").map(|p| p.to_string()), None);
        assert_eq!(Platform::parse("a/b/c/d").map(|p| p.to_string()), None);
        assert_eq!(Platform::host().os, "linux");
    }
}
