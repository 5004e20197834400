//! The builder: the registry and store work the controller loop hands out. Three calls, each
//! one async step with its own result:
//!
//! - [`Builder::resolve`]: a running image's manifest, reduced to what the reconciler needs;
//! - [`Builder::build_layer`]: one layer streamed once from its registry into a zTOC (or found
//!   already stored, or found not indexable, which is remembered in the store);
//! - [`Builder::finish`]: the image record and its SOCI index written to the store, after the
//!   optional push of the SOCI index to the registry.
//!
//! It decides nothing: which layers, when and how often is the reconciler's and the
//! [`BuildQueue`](crate::queue::BuildQueue)'s business. Every store write is atomic and a layer
//! whose zTOC is stored is never read again, so work interrupted at any point (a cancelled job,
//! a killed process) is resumed by doing the same calls again.

use std::collections::BTreeMap;
use std::time::Instant;

use hermes_oci::manifest::{Descriptor, LayerEncoding, Platform};
use hermes_oci::soci::SociVersion;
use hermes_oci::{
    Client, Digest, ImageRecord, IndexOptions, LayerOutcome, LayerRecord, Reference, ResolvedImage,
    Store,
};
use tracing::{info, instrument, warn};

use crate::mirror::Mirror;
use crate::policy::{Policy, Push};
use crate::queue::LayerKey;
use crate::reconcile::{LayerInfo, ManifestInfo};
use crate::{Error, Result};

/// A resolved running image.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// What the reconciler needs.
    pub info: ManifestInfo,
    /// The whole resolved image (for the SOCI index and the push).
    pub image: ResolvedImage,
}

/// What a layer build produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerResult {
    /// A zTOC is stored.
    Indexed {
        /// Its digest.
        ztoc: Digest,
        /// It was stored before; the layer was not read.
        reused: bool,
    },
    /// The layer cannot be indexed (recorded in the store, so it is not read again).
    Unindexable {
        /// Why.
        reason: String,
    },
}

/// One layer build: its result and what it cost.
#[derive(Debug)]
pub struct LayerBuild {
    /// The result.
    pub result: Result<LayerResult>,
    /// Wall time of the attempt.
    pub seconds: f64,
    /// Layer bytes read from the registry.
    pub bytes_read: u64,
}

/// Does the registry and store work (see the module docs). Cheap to clone.
#[derive(Debug, Clone)]
pub struct Builder {
    client: Client,
    store: Store,
    platform: Platform,
    build_tool_identifier: String,
    mirror: Option<Mirror>,
}

fn oci(action: &'static str, subject: impl ToString) -> impl FnOnce(hermes_oci::Error) -> Error {
    move |source| Error::Oci {
        action,
        subject: subject.to_string(),
        source: Box::new(source),
    }
}

impl Builder {
    /// A builder reading registries through `client` and writing to `store`; images are
    /// resolved for `platform`; zTOCs carry `build_tool_identifier`.
    pub fn new(
        client: Client,
        store: Store,
        platform: Platform,
        build_tool_identifier: String,
    ) -> Self {
        Self {
            client,
            store,
            platform,
            build_tool_identifier,
            mirror: None,
        }
    }

    /// The same builder publishing what it builds to a store repository (see [`crate::mirror`]).
    pub fn with_mirror(self, mirror: Mirror) -> Self {
        Self {
            mirror: Some(mirror),
            ..self
        }
    }

    /// The store repository, if there is one.
    pub fn mirror(&self) -> Option<&Mirror> {
        self.mirror.as_ref()
    }

    /// The artifact store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The same builder with other registry credentials (the Kubernetes adapter's pull secrets).
    pub fn with_credentials(&self, credentials: hermes_oci::Credentials) -> Result<Self> {
        let options = hermes_oci::ClientOptions {
            credentials,
            ..self.client.options().clone()
        };
        let client = Client::new(options).map_err(oci("configure a client for", "registries"))?;
        Ok(Self {
            client,
            ..self.clone()
        })
    }

    /// Resolve `reference` as pinned by `digest` (a pod's `imageID`: an index or a manifest)
    /// to this builder's platform.
    #[instrument(skip(self), fields(image = %reference))]
    pub async fn resolve(&self, reference: &Reference, digest: &Digest) -> Result<Resolved> {
        let pinned = Reference {
            digest: Some(digest.clone()),
            ..reference.clone()
        };
        let image = self
            .client
            .resolve(&pinned, &self.platform)
            .await
            .map_err(oci("resolve", reference))?;
        let info = ManifestInfo {
            manifest: image.fetched.digest.clone(),
            layers: image
                .manifest
                .layers
                .iter()
                .map(|l| LayerInfo {
                    digest: l.digest.clone(),
                    size: u64::try_from(l.size).unwrap_or(0),
                    media_type: l.media_type.clone(),
                })
                .collect(),
        };
        Ok(Resolved { info, image })
    }

    /// The digest `reference` points to (an index or a manifest).
    pub async fn digest_of(&self, reference: &Reference) -> Result<Digest> {
        match &reference.digest {
            Some(d) => Ok(d.clone()),
            None => Ok(self
                .client
                .get_manifest(reference)
                .await
                .map_err(oci("resolve", reference))?
                .digest),
        }
    }

    /// Build the zTOC of one layer, fetched through `reference`.
    pub async fn build_layer(
        &self,
        key: &LayerKey,
        size: u64,
        media_type: &str,
        reference: &Reference,
    ) -> LayerBuild {
        let started = Instant::now();
        let options = IndexOptions {
            platform: self.platform.clone(),
            // The reconciler already left out small layers.
            min_layer_size: 0,
            span_size: key.span_size,
            build_tool_identifier: self.build_tool_identifier.clone(),
            concurrency: 1,
        };
        let descriptor = Descriptor::new(media_type, key.digest.clone(), size);
        let indexed =
            hermes_oci::index_layer(&self.client, &self.store, reference, &options, &descriptor)
                .await
                .map_err(oci("index layer", &key.digest));
        let seconds = started.elapsed().as_secs_f64();
        let result = indexed.and_then(|record| match record.outcome {
            LayerOutcome::Indexed { ztoc, reused, .. } => Ok(LayerResult::Indexed { ztoc, reused }),
            LayerOutcome::Skipped { reason } => {
                self.store
                    .set_unindexable(&key.digest, key.span_size, &reason)
                    .map_err(oci("record as unindexable", &key.digest))?;
                Ok(LayerResult::Unindexable { reason })
            }
        });
        let bytes_read = match &result {
            Ok(LayerResult::Indexed { reused: true, .. }) | Err(_) => 0,
            Ok(_) => size,
        };
        // Published at once, so a failover mid-image loses no finished layer. Not fatal: the
        // image's own entry (see `finish`) carries the layer again.
        if let (Ok(_), Some(mirror)) = (&result, &self.mirror)
            && let Err(e) = mirror.publish_layer(&self.store, key).await
        {
            warn!(layer = %key.digest, error = %crate::chain(&e), "cannot publish a zTOC to the store repository; the image entry will carry it");
        }
        LayerBuild {
            result,
            seconds,
            bytes_read,
        }
    }

    /// Write the image record of a resolved image whose eligible layers all have a zTOC (or are
    /// unindexable), with its SOCI index; push the SOCI index first if `policy` asks.
    /// `layer_seconds` are the build times known for its layers.
    #[instrument(skip_all, fields(image = %reference, manifest = %image.fetched.digest))]
    pub async fn finish(
        &self,
        image: &ResolvedImage,
        reference: &Reference,
        policy: &Policy,
        layer_seconds: &BTreeMap<Digest, f64>,
    ) -> Result<ImageRecord> {
        let span_size = policy.span_size;
        let layers = {
            let (store, image, seconds, min) = (
                self.store.clone(),
                image.clone(),
                layer_seconds.clone(),
                policy.min_layer_size,
            );
            tokio::task::spawn_blocking(move || {
                layer_records(&store, &image, span_size, min, &seconds)
            })
            .await
            .map_err(|source| Error::Task {
                action: "assemble the image record of",
                subject: reference.to_string(),
                source,
            })??
        };
        let result = hermes_oci::assemble_index(
            &self.store,
            reference,
            image.clone(),
            span_size,
            layers,
            &self.build_tool_identifier,
        )
        .map_err(oci("store the SOCI index of", reference))?;
        let version = match policy.push {
            Push::None => None,
            Push::SociV1 => Some(SociVersion::V1),
            Push::SociV2 => Some(SociVersion::V2),
        };
        if let Some(version) = version
            && !result.soci_ztocs.is_empty()
        {
            let target = push_target(reference, &image.fetched.digest, version);
            let pushed = hermes_oci::push_soci(
                &self.client,
                &self.store,
                &result,
                version,
                &target,
                &self.build_tool_identifier,
            )
            .await
            .map_err(oci("push the SOCI index of", reference))?;
            info!(target = %target, soci_index = %pushed.soci_index, "SOCI index pushed");
        }
        let record = result.record;
        // Published before the record is stored locally: a failure leaves the image unfinished,
        // so it is retried, and never stored here but missing from the repository.
        if let Some(mirror) = &self.mirror {
            mirror.publish_image(&self.store, &record).await?;
        }
        self.store
            .put_image(&record)
            .map_err(oci("store the image record of", reference))?;
        info!("image record stored");
        Ok(record)
    }
}

/// Where a SOCI index is pushed: v2 tags `TAG-soci` (or `soci-<manifest hex prefix>` for an
/// untagged image) in the image's repository; v1 refers to the image in its repository.
pub fn push_target(reference: &Reference, manifest: &Digest, version: SociVersion) -> Reference {
    let repository = Reference {
        tag: None,
        digest: None,
        ..reference.clone()
    };
    match version {
        SociVersion::V1 => repository,
        SociVersion::V2 => {
            let tag = match &reference.tag {
                Some(tag) => format!("{tag}-soci"),
                None => format!("soci-{}", &manifest.hex()[..16]),
            };
            repository.with_tag(&tag)
        }
    }
}

/// Per-layer records of an image from what the store holds.
fn layer_records(
    store: &Store,
    image: &ResolvedImage,
    span_size: u64,
    min_layer_size: u64,
    seconds: &BTreeMap<Digest, f64>,
) -> Result<Vec<LayerRecord>> {
    let mut out = Vec::with_capacity(image.manifest.layers.len());
    for layer in &image.manifest.layers {
        let size = u64::try_from(layer.size).unwrap_or(0);
        let skipped = |reason: String| LayerOutcome::Skipped { reason };
        let outcome = if LayerEncoding::of(&layer.media_type).is_none() {
            skipped(format!(
                "media type {} is not a tar layer",
                layer.media_type
            ))
        } else if size < min_layer_size {
            skipped(format!(
                "{size} bytes is below minLayerSize ({min_layer_size})"
            ))
        } else if let Some(reason) = store
            .unindexable(&layer.digest, span_size)
            .map_err(oci("read the store for", &layer.digest))?
        {
            skipped(reason)
        } else {
            let ztoc = store
                .ztoc_for_layer(&layer.digest, span_size)
                .map_err(oci("read the store for", &layer.digest))?;
            let bytes = match &ztoc {
                Some(z) => store
                    .get_blob(z)
                    .map_err(oci("read the zTOC of", &layer.digest))?,
                None => None,
            };
            let (Some(ztoc), Some(bytes)) = (ztoc, bytes) else {
                return Err(Error::ZtocMissing {
                    layer: layer.digest.clone(),
                });
            };
            let parsed = hermes_ztoc::Ztoc::from_bytes(&bytes).map_err(|source| Error::Ztoc {
                layer: layer.digest.clone(),
                source,
            })?;
            let known = seconds.get(&layer.digest).copied();
            LayerOutcome::Indexed {
                ztoc,
                ztoc_size: bytes.len() as u64,
                spans: parsed.span_count(),
                entries: parsed.entries().len() as u64,
                seconds: known.unwrap_or(0.0),
                reused: known.is_none(),
                soci_compatible: parsed.is_soci_compatible(),
                span_size: parsed.span_size(),
            }
        };
        out.push(LayerRecord {
            digest: layer.digest.clone(),
            media_type: layer.media_type.clone(),
            size,
            outcome,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A resolved image of one gzip layer, `layer`, in no registry.
    fn one_layer_image(layer: &Digest) -> ResolvedImage {
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": Digest::of(b"{}").as_str(),
                "size": 2,
            },
            "layers": [{
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": layer.as_str(),
                "size": 100,
            }],
        });
        ResolvedImage {
            reference: Reference::parse("registry.test/app:v1").unwrap(),
            manifest: serde_json::from_value(manifest).unwrap(),
            fetched: hermes_oci::FetchedManifest {
                bytes: bytes::Bytes::new(),
                media_type: String::new(),
                digest: Digest::of(b"manifest"),
            },
            platform: None,
            index: None,
        }
    }

    #[test]
    fn a_missing_or_unreadable_stored_ztoc_is_a_typed_error_naming_the_layer() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let layer = Digest::of(b"layer");
        let image = one_layer_image(&layer);
        let span = 1 << 20;
        let records = |store: &Store| layer_records(store, &image, span, 0, &BTreeMap::new());
        match records(&store) {
            Err(Error::ZtocMissing { layer: l }) => assert_eq!(l, layer),
            other => panic!("expected ZtocMissing, got {other:?}"),
        }
        let garbage = store.put_blob(b"not a zTOC").unwrap();
        store.set_ztoc_for_layer(&layer, span, &garbage).unwrap();
        match records(&store) {
            Err(e @ Error::Ztoc { .. }) => {
                assert!(e.to_string().contains(layer.as_str()), "{e}");
            }
            other => panic!("expected Ztoc, got {other:?}"),
        }
    }

    #[test]
    fn push_targets_follow_soci_conventions() {
        let d = Digest::of(b"m");
        let tagged = Reference::parse("registry.test/app:v1").unwrap();
        assert_eq!(
            push_target(&tagged, &d, SociVersion::V2).to_string(),
            "registry.test/app:v1-soci"
        );
        assert_eq!(
            push_target(&tagged, &d, SociVersion::V1).to_string(),
            "registry.test/app"
        );
        let pinned = Reference::parse(&format!("registry.test/app@{d}")).unwrap();
        assert_eq!(
            push_target(&pinned, &d, SociVersion::V2).to_string(),
            format!("registry.test/app:soci-{}", &d.hex()[..16])
        );
    }
}
