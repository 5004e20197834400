//! The artifact store as an OCI repository, for several controller replicas (design.md §3).
//!
//! The leader publishes what it builds to a repository in a registry (typically the cluster's
//! own); every replica copies what it lacks from there into its local [`Store`], which is then
//! a cache. A new leader copies before it reconciles, so it rebuilds nothing a previous leader
//! published, and the replicas that are not leading keep their copies fresh so they serve the
//! same zTOCs to nodes.
//!
//! What is published, as OCI image manifests whose config is an [`Entry`] (JSON, media type
//! [`ENTRY_MEDIA_TYPE`]) and whose layers are the zTOC blobs it names (so the registry's own
//! garbage collection keeps them as long as the tag exists):
//! - each built layer as soon as it is built, tagged `layer-<layer hex>-<span size>`: the zTOC,
//!   or why the layer cannot be indexed. A leader that dies mid-image loses none of its
//!   finished layers;
//! - each finished image, tagged `image-<manifest hex>`: the image record and its layers'
//!   entries.
//!
//! Garbage collection deletes the tags of what the local store drops (best effort: a registry
//! that refuses deletes keeps them, which wastes space but is never wrong).

use std::collections::BTreeSet;

use bytes::Bytes;
use hermes_oci::manifest::{Descriptor, Manifest, media, to_go_json};
use hermes_oci::{Client, Digest, ImageRecord, Reference, Store};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::queue::LayerKey;
use crate::{Error, Result};

/// Media type of an [`Entry`] (the config blob of a published manifest).
pub const ENTRY_MEDIA_TYPE: &str = "application/vnd.hermes.store.entry.v1+json";
/// Artifact type of the published manifests.
pub const ARTIFACT_TYPE: &str = "application/vnd.hermes.store.v1";

/// What one published manifest says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Entry {
    /// The image record (image entries only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<ImageRecord>,
    /// Layer entries.
    pub layers: Vec<LayerEntry>,
}

/// One (layer, span size) of the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LayerEntry {
    /// The layer digest.
    pub layer: Digest,
    /// The span size.
    pub span_size: u64,
    /// Its zTOC (one of the manifest's layers)…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ztoc: Option<Digest>,
    /// …or why it cannot be indexed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unindexable: Option<String>,
}

/// What [`Mirror::sync`] copied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncSummary {
    /// Published entries read.
    pub entries: usize,
    /// Layer entries written to the local store.
    pub layers: usize,
    /// Image records written to the local store.
    pub images: usize,
    /// zTOC bytes downloaded.
    pub bytes: u64,
}

/// The tag of a layer entry.
pub fn layer_tag(key: &LayerKey) -> String {
    format!("layer-{}-{}", key.digest.hex(), key.span_size)
}

/// The tag of an image entry.
pub fn image_tag(manifest: &Digest) -> String {
    format!("image-{}", manifest.hex())
}

/// What a tag names, if it is one of ours.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Tagged {
    Layer(LayerKey),
    Image(Digest),
}

fn parse_tag(tag: &str) -> Option<Tagged> {
    if let Some(rest) = tag.strip_prefix("image-") {
        return Digest::parse(&format!("sha256:{rest}"))
            .ok()
            .map(Tagged::Image);
    }
    let (hex, span) = tag.strip_prefix("layer-")?.split_once('-')?;
    Some(Tagged::Layer(LayerKey {
        digest: Digest::parse(&format!("sha256:{hex}")).ok()?,
        span_size: span.parse().ok()?,
    }))
}

fn oci(action: &'static str, subject: impl ToString) -> impl FnOnce(hermes_oci::Error) -> Error {
    move |source| Error::Oci {
        action,
        subject: subject.to_string(),
        source: Box::new(source),
    }
}

/// A repository holding a copy of the artifact store.
#[derive(Debug, Clone)]
pub struct Mirror {
    client: Client,
    repository: Reference,
}

impl Mirror {
    /// The store published to `repository` (`registry/name`; a tag or digest in it is
    /// ignored) with `client`'s credentials.
    pub fn new(client: Client, repository: Reference) -> Self {
        Self { client, repository }
    }

    /// The repository.
    pub fn repository(&self) -> &Reference {
        &self.repository
    }

    fn at(&self, tag: &str) -> Reference {
        self.repository.with_tag(tag)
    }

    /// What the local store holds for `key`, as an entry.
    fn layer_entry(store: &Store, key: &LayerKey) -> Result<Option<LayerEntry>> {
        let subject = &key.digest;
        let ztoc = store
            .ztoc_for_layer(&key.digest, key.span_size)
            .map_err(oci("read the store entry of", subject))?;
        let unindexable = match ztoc {
            Some(_) => None,
            None => store
                .unindexable(&key.digest, key.span_size)
                .map_err(oci("read the store entry of", subject))?,
        };
        Ok(
            (ztoc.is_some() || unindexable.is_some()).then(|| LayerEntry {
                layer: key.digest.clone(),
                span_size: key.span_size,
                ztoc,
                unindexable,
            }),
        )
    }

    /// Push the zTOC blobs of `layers` and a manifest naming them under `tag`.
    async fn publish(&self, store: &Store, tag: &str, entry: &Entry) -> Result<Digest> {
        let target = self.at(tag);
        let mut blobs = Vec::new();
        for ztoc in entry.layers.iter().filter_map(|l| l.ztoc.as_ref()) {
            if blobs.iter().any(|d: &Descriptor| d.digest == *ztoc) {
                continue;
            }
            let bytes = store
                .get_blob(ztoc)
                .map_err(oci("read the zTOC", ztoc))?
                .ok_or_else(|| Error::Oci {
                    action: "publish",
                    subject: ztoc.to_string(),
                    source: Box::new(hermes_oci::Error::NotFound {
                        what: "zTOC blob in the local store",
                        name: ztoc.to_string(),
                        registry: String::new(),
                        repository: store.root().display().to_string(),
                    }),
                })?;
            let size = bytes.len() as u64;
            self.client
                .push_blob(&target, Bytes::from(bytes), None)
                .await
                .map_err(oci("push a zTOC to", &target))?;
            blobs.push(Descriptor::new(media::OCTET_STREAM, ztoc.clone(), size));
        }
        let config = Bytes::from(serde_json::to_vec(entry).unwrap_or_default());
        let config_digest = self
            .client
            .push_blob(&target, config.clone(), None)
            .await
            .map_err(oci("push a store entry to", &target))?;
        let manifest = Manifest {
            schema_version: 2,
            media_type: Some(media::OCI_MANIFEST.to_owned()),
            artifact_type: Some(ARTIFACT_TYPE.to_owned()),
            config: Descriptor::new(ENTRY_MEDIA_TYPE, config_digest, config.len() as u64),
            layers: blobs,
            subject: None,
            annotations: None,
        };
        let digest = self
            .client
            .push_manifest(
                &target,
                tag,
                Bytes::from(to_go_json(&manifest)),
                media::OCI_MANIFEST,
            )
            .await
            .map_err(oci("publish", &target))?;
        debug!(%target, %digest, "published");
        Ok(digest)
    }

    /// Publish what the local store holds for one built layer.
    pub async fn publish_layer(&self, store: &Store, key: &LayerKey) -> Result<()> {
        let Some(layer) = Self::layer_entry(store, key)? else {
            return Ok(());
        };
        let entry = Entry {
            record: None,
            layers: vec![layer],
        };
        self.publish(store, &layer_tag(key), &entry).await?;
        Ok(())
    }

    /// Publish a finished image: its record and its layers' entries.
    pub async fn publish_image(&self, store: &Store, record: &ImageRecord) -> Result<()> {
        let mut layers = Vec::new();
        for l in &record.layers {
            let key = LayerKey {
                digest: l.digest.clone(),
                span_size: record.span_size,
            };
            layers.extend(Self::layer_entry(store, &key)?);
        }
        let entry = Entry {
            record: Some(record.clone()),
            layers,
        };
        self.publish(store, &image_tag(&record.manifest_digest), &entry)
            .await?;
        info!(manifest = %record.manifest_digest, repository = %self.repository, "image published to the store repository");
        Ok(())
    }

    /// Copy into `store` every published entry it lacks: zTOC blobs (verified), then layer
    /// entries, then image records, so a copy cut short is consistent.
    pub async fn sync(&self, store: &Store) -> Result<SyncSummary> {
        let tags = self
            .client
            .tags(&self.repository)
            .await
            .map_err(oci("list the tags of", &self.repository))?;
        let have_images: BTreeSet<Digest> = store
            .images()
            .map_err(oci("list the store of", store.root().display()))?
            .into_iter()
            .map(|r| r.manifest_digest)
            .collect();
        let mut summary = SyncSummary::default();
        for tag in tags {
            let wanted = match parse_tag(&tag) {
                Some(Tagged::Image(manifest)) => !have_images.contains(&manifest),
                Some(Tagged::Layer(key)) => Self::layer_entry(store, &key)?.is_none(),
                None => false,
            };
            if wanted {
                self.copy(store, &tag, &mut summary).await?;
            }
        }
        if summary.entries > 0 {
            info!(repository = %self.repository, entries = summary.entries, layers = summary.layers,
                images = summary.images, bytes = summary.bytes, "copied from the store repository");
        }
        Ok(summary)
    }

    async fn copy(&self, store: &Store, tag: &str, summary: &mut SyncSummary) -> Result<()> {
        let at = self.at(tag);
        let fetched = self
            .client
            .get_manifest(&at)
            .await
            .map_err(oci("read", &at))?;
        let manifest: Manifest = serde_json::from_slice(&fetched.bytes).map_err(|e| {
            oci("read", &at)(hermes_oci::Error::MalformedManifest {
                digest: fetched.digest.clone(),
                source: e,
            })
        })?;
        if manifest.config.media_type != ENTRY_MEDIA_TYPE {
            debug!(%at, "not a store entry; ignored");
            return Ok(());
        }
        let config = self
            .client
            .get_config(&at, &manifest.config)
            .await
            .map_err(oci("read the entry of", &at))?;
        let entry: Entry = serde_json::from_slice(&config).map_err(|e| Error::Oci {
            action: "read the entry of",
            subject: at.to_string(),
            source: Box::new(hermes_oci::Error::MalformedManifest {
                digest: manifest.config.digest.clone(),
                source: e,
            }),
        })?;
        summary.entries += 1;
        for layer in &entry.layers {
            if let Some(ztoc) = &layer.ztoc {
                let Some(listed) = manifest.layers.iter().find(|d| d.digest == *ztoc) else {
                    return Err(Error::Oci {
                        action: "read the entry of",
                        subject: at.to_string(),
                        source: Box::new(hermes_oci::Error::NotFound {
                            what: "zTOC named by the entry among the manifest's layers",
                            name: ztoc.to_string(),
                            registry: self.repository.registry.clone(),
                            repository: self.repository.repository.clone(),
                        }),
                    });
                };
                if !store.has_blob(ztoc) {
                    // get_blob checks the digest and the size: a damaged copy is an error,
                    // never stored.
                    let size = u64::try_from(listed.size).unwrap_or(0);
                    let bytes = self
                        .client
                        .get_blob(&at, ztoc, size)
                        .await
                        .map_err(oci("download the zTOC", ztoc))?;
                    summary.bytes += bytes.len() as u64;
                    store
                        .put_blob(&bytes)
                        .map_err(oci("store the zTOC", ztoc))?;
                }
                store
                    .set_ztoc_for_layer(&layer.layer, layer.span_size, ztoc)
                    .map_err(oci("store the entry of", &layer.layer))?;
            } else if let Some(reason) = &layer.unindexable {
                store
                    .set_unindexable(&layer.layer, layer.span_size, reason)
                    .map_err(oci("store the entry of", &layer.layer))?;
            }
            summary.layers += 1;
        }
        if let Some(record) = &entry.record {
            store
                .put_image(record)
                .map_err(oci("store the record of", &record.manifest_digest))?;
            summary.images += 1;
        }
        Ok(())
    }

    /// Delete the published entry under `tag`, if there is one.
    async fn forget(&self, tag: &str) -> Result<()> {
        let at = self.at(tag);
        let digest = match self.client.get_manifest(&at).await {
            Ok(m) => m.digest,
            Err(hermes_oci::Error::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(oci("look up", &at)(e)),
        };
        self.client
            .delete_manifest(&self.repository, &digest)
            .await
            .map_err(oci("delete", &at))?;
        Ok(())
    }

    /// Delete a collected image's entry.
    pub async fn forget_image(&self, manifest: &Digest) -> Result<()> {
        self.forget(&image_tag(manifest)).await
    }

    /// Delete a collected layer's entry.
    pub async fn forget_layer(&self, key: &LayerKey) -> Result<()> {
        self.forget(&layer_tag(key)).await
    }

    /// [`Mirror::forget_image`] or [`Mirror::forget_layer`] on a task of its own (garbage
    /// collection does not wait for the registry); a failure is logged.
    pub fn forget_in_background(&self, collected: Collected) {
        let mirror = self.clone();
        tokio::spawn(async move {
            let (tag, what) = match &collected {
                Collected::Image(manifest) => (image_tag(manifest), "image"),
                Collected::Layer(key) => (layer_tag(key), "zTOC"),
            };
            if let Err(e) = mirror.forget(&tag).await {
                warn!(%tag, error = %crate::chain(&e), "cannot delete a collected {what} from the store repository");
            }
        });
    }
}

/// What garbage collection removed from the local store.
#[derive(Debug, Clone)]
pub enum Collected {
    /// An image record.
    Image(Digest),
    /// A layer's zTOC (or unindexable marker).
    Layer(LayerKey),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_name_what_they_hold_and_others_are_ignored() {
        let digest = Digest::of(b"layer");
        let key = LayerKey {
            digest: digest.clone(),
            span_size: 4 << 20,
        };
        assert_eq!(
            parse_tag(&layer_tag(&key)),
            Some(Tagged::Layer(key.clone()))
        );
        assert!(
            layer_tag(&key).len() <= 128,
            "OCI tags are at most 128 characters"
        );
        assert_eq!(parse_tag(&image_tag(&digest)), Some(Tagged::Image(digest)));
        for other in ["latest", "image-xyz", "layer-abc-1", "layer-", "sha256-abc"] {
            assert_eq!(parse_tag(other), None, "{other}");
        }
    }
}
