//! SOCI index artifacts (spec §3): the index manifest (v1 with a subject, v2 bound by an image
//! index) and the v2 conversion of an image, all encoded exactly as soci's Go code does.

use std::collections::BTreeMap;

use crate::manifest::{Descriptor, Index, Manifest, Platform, media, to_go_json};
use crate::{Digest, ResolvedImage};

/// The config blob of every SOCI index: `{}`.
pub const EMPTY_CONFIG: &[u8] = b"{}";

/// Annotation keys.
pub mod annotation {
    /// On the index manifest.
    pub const BUILD_TOOL_IDENTIFIER: &str = "com.amazon.soci.build-tool-identifier";
    /// On zTOC descriptors.
    pub const LAYER_DIGEST: &str = "com.amazon.soci.image-layer-digest";
    /// On zTOC descriptors.
    pub const LAYER_MEDIA_TYPE: &str = "com.amazon.soci.image-layer-mediaType";
    /// On zTOC descriptors.
    pub const SPAN_SIZE: &str = "com.amazon.soci.span-size";
    /// On the converted image manifest (v2).
    pub const INDEX_DIGEST: &str = "com.amazon.soci.index-digest";
    /// On the SOCI descriptor in the image index (v2).
    pub const IMAGE_MANIFEST_DIGEST: &str = "com.amazon.soci.image-manifest-digest";
}

/// Which SOCI index form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SociVersion {
    /// v1: the index manifest has a `subject` and is found through referrers.
    V1,
    /// v2: the image manifest is annotated and bound with the index by an image index.
    V2,
}

impl SociVersion {
    /// The artifact type (`config.mediaType`).
    pub fn artifact_type(self) -> &'static str {
        match self {
            Self::V1 => media::SOCI_INDEX_V1,
            Self::V2 => media::SOCI_INDEX_V2,
        }
    }
}

/// One zTOC to list in an index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZtocRef {
    /// zTOC blob digest.
    pub ztoc: Digest,
    /// zTOC blob size.
    pub size: u64,
    /// The image layer it indexes.
    pub layer: Digest,
    /// That layer's media type.
    pub layer_media_type: String,
    /// Span size it was built with.
    pub span_size: u64,
}

/// The SOCI index manifest's bytes (Go JSON). zTOCs in image-layer order.
pub fn index_manifest(
    version: SociVersion,
    ztocs: &[ZtocRef],
    build_tool_identifier: &str,
    subject: Option<Descriptor>,
) -> Vec<u8> {
    let layers = ztocs
        .iter()
        .map(|z| {
            let mut d = Descriptor::new(media::OCTET_STREAM, z.ztoc.clone(), z.size);
            d.annotations = Some(BTreeMap::from([
                (annotation::LAYER_DIGEST.to_owned(), z.layer.to_string()),
                (
                    annotation::LAYER_MEDIA_TYPE.to_owned(),
                    z.layer_media_type.clone(),
                ),
                (annotation::SPAN_SIZE.to_owned(), z.span_size.to_string()),
            ]));
            d
        })
        .collect();
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(media::OCI_MANIFEST.to_owned()),
        artifact_type: None,
        config: Descriptor::new(
            version.artifact_type(),
            Digest::of(EMPTY_CONFIG),
            EMPTY_CONFIG.len() as u64,
        ),
        layers,
        subject: if version == SociVersion::V1 {
            subject
        } else {
            None
        },
        annotations: Some(BTreeMap::from([(
            annotation::BUILD_TOOL_IDENTIFIER.to_owned(),
            build_tool_identifier.to_owned(),
        )])),
    };
    to_go_json(&manifest)
}

/// A v2 SOCI-enabled image: the annotated image manifest and the image index binding it to the
/// SOCI index.
#[derive(Debug, Clone)]
pub struct ConvertedImage {
    /// The image manifest with `com.amazon.soci.index-digest` (Go JSON).
    pub manifest: Vec<u8>,
    /// Its digest.
    pub manifest_digest: Digest,
    /// The OCI image index (Go JSON).
    pub index: Vec<u8>,
}

/// Convert an image to a SOCI v2 image (spec §3.4) given its SOCI index manifest.
/// `platform` is the image's platform (from the index entry or the image config).
pub fn convert_v2(
    image: &ResolvedImage,
    soci_index: &Digest,
    soci_index_size: u64,
    platform: &Platform,
) -> ConvertedImage {
    let mut manifest = image.manifest.clone();
    manifest.media_type = Some(media::OCI_MANIFEST.to_owned());
    manifest.config.media_type = media::OCI_CONFIG.to_owned();
    manifest
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(annotation::INDEX_DIGEST.to_owned(), soci_index.to_string());
    let manifest_bytes = to_go_json(&manifest);
    let manifest_digest = Digest::of(&manifest_bytes);

    let mut image_desc = Descriptor::new(
        media::OCI_MANIFEST,
        manifest_digest.clone(),
        manifest_bytes.len() as u64,
    );
    image_desc.annotations = manifest.annotations.clone();

    let mut index = image
        .index
        .as_ref()
        .and_then(|f| serde_json::from_slice::<Index>(&f.bytes).ok())
        .unwrap_or(Index {
            schema_version: 2,
            media_type: None,
            artifact_type: None,
            manifests: Vec::new(),
            subject: None,
            annotations: None,
        });
    index.media_type = Some(media::OCI_INDEX.to_owned());
    match index
        .manifests
        .iter_mut()
        .find(|d| d.digest == image.fetched.digest)
    {
        Some(d) => {
            d.digest = image_desc.digest.clone();
            d.size = image_desc.size;
            d.media_type = image_desc.media_type.clone();
            d.annotations = image_desc.annotations.clone();
        }
        None => {
            image_desc.platform = Some(platform.clone());
            index.manifests.push(image_desc);
        }
    }
    // Replace an earlier SOCI index for the same platform.
    index.manifests.retain(|d| {
        !(d.artifact_type.as_deref() == Some(media::SOCI_INDEX_V2)
            && d.platform.as_ref() == Some(platform))
    });
    let mut soci = Descriptor::new(media::OCI_MANIFEST, soci_index.clone(), soci_index_size);
    soci.annotations = Some(BTreeMap::from([(
        annotation::IMAGE_MANIFEST_DIGEST.to_owned(),
        manifest_digest.to_string(),
    )]));
    soci.platform = Some(platform.clone());
    soci.artifact_type = Some(media::SOCI_INDEX_V2.to_owned());
    index.manifests.push(soci);
    ConvertedImage {
        manifest: manifest_bytes,
        manifest_digest,
        index: to_go_json(&index),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_manifest_matches_the_spec_example() {
        let layer = Digest::of(b"layer");
        let ztoc = Digest::of(b"ztoc");
        let json = index_manifest(
            SociVersion::V2,
            &[ZtocRef {
                ztoc: ztoc.clone(),
                size: 123,
                layer: layer.clone(),
                layer_media_type: media::OCI_LAYER_GZIP.into(),
                span_size: 4194304,
            }],
            "AWS SOCI CLI v0.2",
            None,
        );
        let expected = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.amazon.soci.index.v2+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2}},"layers":[{{"mediaType":"application/octet-stream","digest":"{ztoc}","size":123,"annotations":{{"com.amazon.soci.image-layer-digest":"{layer}","com.amazon.soci.image-layer-mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","com.amazon.soci.span-size":"4194304"}}}}],"annotations":{{"com.amazon.soci.build-tool-identifier":"AWS SOCI CLI v0.2"}}}}"#
        );
        assert_eq!(String::from_utf8(json.clone()).unwrap(), expected);
        // The snapshotter re-encodes what it fetched and requires identical bytes (spec §3.2).
        let decoded: Manifest = serde_json::from_slice(&json).unwrap();
        assert_eq!(to_go_json(&decoded), json);
    }

    #[test]
    fn v1_has_a_subject_and_v2_does_not() {
        let subject = Descriptor::new(media::OCI_MANIFEST, Digest::of(b"m"), 10);
        let v1: Manifest = serde_json::from_slice(&index_manifest(
            SociVersion::V1,
            &[],
            "x",
            Some(subject.clone()),
        ))
        .unwrap();
        assert_eq!(v1.subject, Some(subject.clone()));
        assert_eq!(v1.config.media_type, media::SOCI_INDEX_V1);
        let v2: Manifest =
            serde_json::from_slice(&index_manifest(SociVersion::V2, &[], "x", Some(subject)))
                .unwrap();
        assert_eq!(v2.subject, None);
    }
}
