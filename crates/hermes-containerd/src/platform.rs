//! Choosing a platform's manifest from an image index: a pure function over the index's bytes,
//! with hermes-oci's index type and platform matching.

use hermes_oci::manifest::{Index, Platform, media};

use crate::{Error, Result};

/// The digest of the first image manifest in an image index (OCI index or Docker manifest list)
/// for `platform`, or `None` if it has none. `digest` names the index in errors.
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
        .filter(|m| {
            m.artifact_type.is_none()
                && matches!(
                    m.media_type.as_str(),
                    media::OCI_MANIFEST | media::DOCKER_MANIFEST
                )
        })
        .find(|m| m.platform.as_ref().is_some_and(|p| platform.matches(p)))
        .map(|m| m.digest.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const INDEX: &str = r#"{"schemaVersion":2,"manifests":[
        {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","size":1,
         "platform":{"os":"linux","architecture":"arm64","variant":"v8"}},
        {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb","size":1,
         "artifactType":"application/vnd.example","platform":{"os":"linux","architecture":"amd64"}},
        {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc","size":1,
         "platform":{"os":"linux","architecture":"amd64"}}]}"#;

    fn pick(p: &str) -> Option<String> {
        manifest_for_platform(INDEX.as_bytes(), "sha256:ii", &Platform::parse(p).unwrap())
            .unwrap()
            .map(|d| d[7..8].to_owned())
    }

    #[test]
    fn picks_the_image_manifest_of_the_wanted_platform() {
        assert_eq!(pick("linux/amd64").as_deref(), Some("c"));
        assert_eq!(pick("linux/arm64").as_deref(), Some("a"));
        assert_eq!(pick("linux/arm64/v8").as_deref(), Some("a"));
        assert_eq!(pick("linux/arm64/v7"), None);
        assert_eq!(pick("windows/amd64"), None);
    }

    #[test]
    fn a_broken_index_is_an_error_naming_it() {
        let err = manifest_for_platform(b"{", "sha256:ii", &Platform::host()).unwrap_err();
        assert_eq!(err.to_string(), "cannot parse image index sha256:ii");
    }
}
