//! A client-side image pull into containerd, done the way containerd's own unpacker does it when
//! CRI pulls, so that a remote snapshotter (Hermes) gets the same labels and the same chance to
//! provide layers lazily:
//!
//! 1. resolve the manifest for the platform from the registry (hermes-oci);
//! 2. under a lease, write the index (if any), manifest and config into containerd's content store
//!    with the GC reference labels containerd's fetch handlers set;
//! 3. per layer, in order: `Prepare("extract-… CHAINID", parent, CRI labels)` on the snapshotter;
//!    `AlreadyExists` means the snapshotter provided the layer (lazy); otherwise fetch the blob into
//!    the content store, `diff.Apply` it onto the mounts, check the diff ID, `Commit` under the
//!    chain ID and label the blob `containerd.io/uncompressed` (the extract key is removed on any
//!    failure);
//! 4. label the config `containerd.io/gc.ref.snapshot.SNAPSHOTTER=TOP-CHAINID` and create or update
//!    the image record, then drop the lease: from now on the image record keeps it all alive.
//!
//! The containerd calls are `hermes-containerd`'s typed operations and the registry calls
//! `hermes-oci`'s client; this module is the flow that joins them, so that the containerd client
//! fetches nothing from a registry itself. Not here: pushing, non-OCI/Docker-v2 manifests
//! (schema 1), progress bars (`pull_cmd` prints one line per layer).

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use hermes_containerd::api::containerd::types::{Descriptor, Mount};
use hermes_containerd::{BlobRef, Chunks, Containerd, Platform};
use hermes_node_api::labels;
use hermes_oci::manifest::Manifest;
use hermes_oci::{BlobStream, Digest, Reference};
use serde::Deserialize;
use tracing::{debug, info};

/// containerd's limit on a label's key plus value, in bytes.
const MAX_LABEL_BYTES: usize = 4096;
/// How long a pull's lease lives if the pull dies before removing it.
const LEASE_EXPIRY: Duration = Duration::from_secs(3600);

/// What to pull into.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// The snapshotter to unpack into (`hermes`).
    pub snapshotter: String,
    /// The platform to pick from an image index.
    pub platform: Platform,
}

/// How a layer ended up in the snapshotter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerOutcome {
    /// The snapshotter provided it (answered `Prepare` with `AlreadyExists`): nothing downloaded.
    Lazy,
    /// Downloaded into the content store and unpacked by containerd.
    Unpacked,
    /// Its chain was already there (shared with an image pulled before).
    Present,
}

impl LayerOutcome {
    /// `lazy`, `unpacked` or `present`.
    pub fn as_str(self) -> &'static str {
        match self {
            LayerOutcome::Lazy => "lazy",
            LayerOutcome::Unpacked => "unpacked",
            LayerOutcome::Present => "present",
        }
    }
}

/// One layer's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerReport {
    /// Position in the manifest, base first.
    pub index: usize,
    /// The compressed blob's digest.
    pub digest: String,
    /// The compressed blob's size.
    pub size: u64,
    /// The snapshot's name (chain ID).
    pub chain_id: String,
    /// What happened.
    pub outcome: LayerOutcome,
}

/// The result of a pull.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullReport {
    /// The image record's name (`registry/repository:tag`).
    pub name: String,
    /// The image record's target (the index if the reference named one, else the manifest).
    pub target_digest: String,
    /// The platform's manifest.
    pub manifest_digest: String,
    /// The config blob.
    pub config_digest: String,
    /// The top layer's chain ID (the container rootfs parent).
    pub chain_id: String,
    /// Per layer, base first.
    pub layers: Vec<LayerReport>,
}

/// Pulls `reference` from its registry into containerd (see the module docs). `progress` is
/// called once per layer as it is done.
pub async fn pull(
    containerd: &Containerd,
    registry: &hermes_oci::Client,
    reference: &Reference,
    options: &PullOptions,
    mut progress: impl FnMut(&LayerReport),
) -> Result<PullReport> {
    let resolved = registry
        .resolve(reference, &options.platform)
        .await
        .with_context(|| format!("registry: cannot resolve {reference}"))?;
    let manifest = &resolved.manifest;
    let config = registry
        .get_config(reference, &manifest.config)
        .await
        .with_context(|| format!("registry: cannot fetch config {}", manifest.config.digest))?;
    let diff_ids = diff_ids(&config, manifest)?;
    let chains = chain_ids(&diff_ids);

    let lease_id = format!("hermes-pull-{}", unique());
    let lease = containerd.create_lease(&lease_id, LEASE_EXPIRY).await?;
    let leased = containerd.with_lease(&lease)?;
    let result = Pull {
        c: &leased,
        registry,
        reference,
        options,
    }
    .run(&resolved, &config, &diff_ids, &chains, &mut progress)
    .await;
    // The image record (or nothing, on failure) holds what the lease protected.
    if let Err(e) = containerd.delete_lease(&lease).await {
        debug!("could not delete lease {lease}: {e}");
    }
    result
}

struct Pull<'a> {
    c: &'a Containerd,
    registry: &'a hermes_oci::Client,
    reference: &'a Reference,
    options: &'a PullOptions,
}

impl Pull<'_> {
    async fn run(
        &self,
        resolved: &hermes_oci::ResolvedImage,
        config: &Bytes,
        diff_ids: &[String],
        chains: &[String],
        progress: &mut impl FnMut(&LayerReport),
    ) -> Result<PullReport> {
        let manifest = &resolved.manifest;
        let manifest_digest = resolved.fetched.digest.to_string();
        self.store(&manifest.config.digest, config.clone(), HashMap::new())
            .await?;
        self.store(
            &resolved.fetched.digest,
            resolved.fetched.bytes.clone(),
            manifest_gc_labels(manifest),
        )
        .await?;
        let target = match &resolved.index {
            Some(index) => {
                let parsed: hermes_oci::manifest::Index = serde_json::from_slice(&index.bytes)
                    .with_context(|| format!("cannot parse image index {}", index.digest))?;
                let labels = parsed
                    .manifests
                    .iter()
                    .enumerate()
                    .map(|(i, m)| (labels::gc_ref_content_manifest(i), m.digest.to_string()))
                    .collect();
                self.store(&index.digest, index.bytes.clone(), labels)
                    .await?;
                descriptor(&index.media_type, &index.digest, index.bytes.len() as u64)
            }
            None => descriptor(
                &resolved.fetched.media_type,
                &resolved.fetched.digest,
                resolved.fetched.bytes.len() as u64,
            ),
        };

        let mut layers = Vec::new();
        for (i, layer) in manifest.layers.iter().enumerate() {
            let parent = if i == 0 { "" } else { chains[i - 1].as_str() };
            let labels = snapshot_labels(
                &self.reference.to_string(),
                &manifest_digest,
                manifest,
                i,
                &chains[i],
            );
            let outcome = self
                .layer(layer, &diff_ids[i], parent, &chains[i], labels)
                .await?;
            let report = LayerReport {
                index: i,
                digest: layer.digest.to_string(),
                size: u64::try_from(layer.size).unwrap_or(0),
                chain_id: chains[i].clone(),
                outcome,
            };
            info!(layer = %report.digest, outcome = outcome.as_str(), "layer done");
            progress(&report);
            layers.push(report);
        }

        let top = chains.last().cloned().unwrap_or_default();
        let sn = &self.options.snapshotter;
        let config_digest = manifest.config.digest.to_string();
        if !top.is_empty() {
            self.c
                .set_content_labels(
                    &config_digest,
                    HashMap::from([(labels::gc_ref_snapshot(sn), top.clone())]),
                )
                .await?;
        }
        let name = self.reference.to_string();
        let target_digest = target.digest.clone();
        self.c.put_image(&name, target, HashMap::new()).await?;
        Ok(PullReport {
            name,
            target_digest,
            manifest_digest,
            config_digest,
            chain_id: top,
            layers,
        })
    }

    /// Writes an in-memory blob (manifest, index, config) into the content store.
    async fn store(
        &self,
        digest: &Digest,
        bytes: Bytes,
        labels: HashMap<String, String>,
    ) -> Result<()> {
        let blob = BlobRef {
            digest: digest.as_str(),
            size: bytes.len() as u64,
            labels,
        };
        self.c
            .write_content(&ingest_ref(digest), blob, Some(bytes))
            .await?;
        Ok(())
    }

    /// One layer, as containerd's unpacker does it.
    async fn layer(
        &self,
        layer: &hermes_oci::manifest::Descriptor,
        diff_id: &str,
        parent: &str,
        chain: &str,
        labels: HashMap<String, String>,
    ) -> Result<LayerOutcome> {
        let sn = &self.options.snapshotter;
        if self.c.snapshot_exists(sn, chain).await? {
            return Ok(LayerOutcome::Present);
        }
        let mut attempt = 0;
        let (key, mounts) = loop {
            attempt += 1;
            let key = format!("extract-{} {chain}", unique());
            match self
                .c
                .prepare_snapshot(sn, &key, parent, labels.clone())
                .await
            {
                Ok(mounts) => break (key, mounts),
                Err(e) if e.is_already_exists() => {
                    // The snapshotter committed the chain itself (a lazy layer), or a key clash.
                    if self.c.snapshot_exists(sn, chain).await? {
                        return Ok(LayerOutcome::Lazy);
                    }
                    if attempt == 3 {
                        return Err(e.into());
                    }
                }
                Err(e) => return Err(e.into()),
            }
        };
        let unpacked = self
            .unpack(layer, diff_id, chain, &key, mounts, labels)
            .await;
        match unpacked {
            Ok(outcome) => Ok(outcome),
            Err(e) => {
                if let Err(re) = self.c.remove_snapshot(sn, &key).await {
                    debug!("could not remove extraction snapshot {key:?}: {re}");
                }
                Err(e)
            }
        }
    }

    async fn unpack(
        &self,
        layer: &hermes_oci::manifest::Descriptor,
        diff_id: &str,
        chain: &str,
        key: &str,
        mounts: Vec<Mount>,
        labels: HashMap<String, String>,
    ) -> Result<LayerOutcome> {
        let size = u64::try_from(layer.size).unwrap_or(0);
        let blob = BlobRef {
            digest: layer.digest.as_str(),
            size,
            labels: HashMap::new(),
        };
        let stream = self
            .registry
            .blob_stream(self.reference, &layer.digest, size);
        self.c
            .write_content(
                &ingest_ref(&layer.digest),
                blob,
                RegistryChunks(stream, &layer.digest),
            )
            .await?;
        let applied = self
            .c
            .apply_layer(descriptor(&layer.media_type, &layer.digest, size), mounts)
            .await?;
        if applied != diff_id {
            bail!(
                "layer {} unpacked to {applied}, but the image config says {diff_id}",
                layer.digest
            );
        }
        let sn = &self.options.snapshotter;
        match self.c.commit_snapshot(sn, chain, key, labels).await {
            Ok(()) => {}
            Err(e) if e.is_already_exists() => {
                // Another pull committed the same chain meanwhile: ours is not needed.
                self.c.remove_snapshot(sn, key).await?;
                return Ok(LayerOutcome::Present);
            }
            Err(e) => return Err(e.into()),
        }
        self.c
            .set_content_labels(
                layer.digest.as_str(),
                HashMap::from([(labels::UNCOMPRESSED.to_owned(), applied)]),
            )
            .await?;
        Ok(LayerOutcome::Unpacked)
    }
}

/// A registry blob download as content-write chunks.
struct RegistryChunks<'a>(BlobStream, &'a Digest);

impl Chunks for RegistryChunks<'_> {
    async fn next_chunk(&mut self) -> Option<hermes_containerd::Result<Bytes>> {
        let digest = self.1;
        self.0.next().await.map(|r| {
            r.map_err(|source| {
                let failed = anyhow::Error::new(source)
                    .context(format!("registry: cannot fetch layer {digest}"));
                hermes_containerd::Error::Source(failed.into())
            })
        })
    }
}

fn descriptor(media_type: &str, digest: &Digest, size: u64) -> Descriptor {
    Descriptor {
        media_type: media_type.to_owned(),
        digest: digest.to_string(),
        size: i64::try_from(size).unwrap_or(i64::MAX),
        annotations: HashMap::new(),
    }
}

fn ingest_ref(digest: &Digest) -> String {
    format!("hermes-pull-{digest}")
}

/// A short string unique enough for lease IDs and extract keys (like containerd's `uniquePart`).
fn unique() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{nanos}-{}-{n}", std::process::id())
}

#[derive(Deserialize)]
struct ImageConfig {
    rootfs: RootFs,
}

#[derive(Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// The config's diff IDs, one per manifest layer.
pub fn diff_ids(config: &[u8], manifest: &Manifest) -> Result<Vec<String>> {
    let parsed: ImageConfig = serde_json::from_slice(config)
        .with_context(|| format!("cannot parse image config {}", manifest.config.digest))?;
    if parsed.rootfs.diff_ids.len() != manifest.layers.len() {
        bail!(
            "the image has {} layers but its config lists {} diff IDs",
            manifest.layers.len(),
            parsed.rootfs.diff_ids.len()
        );
    }
    Ok(parsed.rootfs.diff_ids)
}

/// Chain IDs of an image's layers (OCI image spec): the first is the first diff ID, each next
/// one is `sha256(previous + " " + diff_id)`.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut chains: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff_id in diff_ids {
        let next = match chains.last() {
            None => diff_id.clone(),
            Some(prev) => Digest::of(format!("{prev} {diff_id}").as_bytes()).to_string(),
        };
        chains.push(next);
    }
    chains
}

/// The labels containerd's unpacker passes to `Prepare` when CRI pulls: the target chain ID and
/// CRI's image reference, manifest digest, layer digest and following layers.
pub fn snapshot_labels(
    image_ref: &str,
    manifest_digest: &str,
    manifest: &Manifest,
    layer: usize,
    chain: &str,
) -> HashMap<String, String> {
    let mut layers = String::new();
    for l in manifest.layers.iter().skip(layer) {
        let item = if layers.is_empty() {
            l.digest.to_string()
        } else {
            format!(",{}", l.digest)
        };
        if labels::CRI_IMAGE_LAYERS.len() + layers.len() + item.len() > MAX_LABEL_BYTES {
            break;
        }
        layers.push_str(&item);
    }
    let digest = manifest
        .layers
        .get(layer)
        .map(|l| l.digest.to_string())
        .unwrap_or_default();
    HashMap::from([
        (labels::SNAPSHOT_REF.to_owned(), chain.to_owned()),
        (labels::CRI_IMAGE_REF.to_owned(), image_ref.to_owned()),
        (
            labels::CRI_MANIFEST_DIGEST.to_owned(),
            manifest_digest.to_owned(),
        ),
        (labels::CRI_LAYER_DIGEST.to_owned(), digest),
        (labels::CRI_IMAGE_LAYERS.to_owned(), layers),
    ])
}

/// The GC reference labels containerd's fetch handlers put on a manifest: its config and every
/// layer (missing blobs, e.g. lazy layers, are simply not followed).
pub fn manifest_gc_labels(manifest: &Manifest) -> HashMap<String, String> {
    let mut labels = HashMap::from([(
        labels::GC_REF_CONTENT_CONFIG.to_owned(),
        manifest.config.digest.to_string(),
    )]);
    for (i, layer) in manifest.layers.iter().enumerate() {
        labels.insert(labels::gc_ref_content_layer(i), layer.digest.to_string());
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "sha256:ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb";
    const B: &str = "sha256:3e23e8160039594a33894f6564e1b1348bbd7a0088d42c4acb73eeaed59c009d";
    const C: &str = "sha256:2e7d2c03a9507ae265ecf5b5356885a53393a2029d241394997265a1a25aefc6";

    fn manifest(layers: usize) -> Manifest {
        let layer = |i: usize| {
            format!(
                r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:{:064x}","size":{i}}}"#,
                i + 1
            )
        };
        let json = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{A}","size":2}},"layers":[{}]}}"#,
            (0..layers).map(layer).collect::<Vec<_>>().join(",")
        );
        serde_json::from_str(&json).unwrap()
    }

    #[test]
    fn chain_ids_follow_the_image_spec() {
        // sha256("A B"), then sha256("AB C"), computed with sha256sum.
        assert_eq!(
            chain_ids(&[A.into(), B.into(), C.into()]),
            vec![
                A.to_owned(),
                "sha256:51c0c8ace48498d6f5fee6b0592cc06f2da0f3cbe09c5a34a97dce85c3889676".into(),
                "sha256:2fce7f8ce91bcf0a1428b36e1024639fdbd9469eea762dba98aa749631885106".into(),
            ]
        );
        assert!(chain_ids(&[]).is_empty());
    }

    #[test]
    fn snapshot_labels_are_cri_s_with_the_following_layers() {
        let m = manifest(3);
        let labels = snapshot_labels("r/x:1", "sha256:mm", &m, 1, "sha256:chain");
        assert_eq!(labels[labels::SNAPSHOT_REF], "sha256:chain");
        assert_eq!(labels[labels::CRI_IMAGE_REF], "r/x:1");
        assert_eq!(labels[labels::CRI_MANIFEST_DIGEST], "sha256:mm");
        assert_eq!(
            labels[labels::CRI_LAYER_DIGEST],
            m.layers[1].digest.to_string()
        );
        assert_eq!(
            labels[labels::CRI_IMAGE_LAYERS],
            format!("{},{}", m.layers[1].digest, m.layers[2].digest)
        );
    }

    #[test]
    fn the_image_layers_label_stops_before_containerd_s_size_limit() {
        let m = manifest(100);
        let labels = snapshot_labels("r/x:1", "sha256:mm", &m, 0, "c");
        let value = &labels[labels::CRI_IMAGE_LAYERS];
        assert!(labels::CRI_IMAGE_LAYERS.len() + value.len() <= 4096);
        let n = value.split(',').count();
        // 71 bytes per digest plus a comma: as many as fit, and not one more.
        assert_eq!(n, (4096 - labels::CRI_IMAGE_LAYERS.len() + 1) / 72);
    }

    #[test]
    fn manifests_reference_their_config_and_layers_for_the_gc() {
        let m = manifest(2);
        let labels = manifest_gc_labels(&m);
        assert_eq!(labels["containerd.io/gc.ref.content.config"], A);
        assert_eq!(
            labels["containerd.io/gc.ref.content.l.1"],
            m.layers[1].digest.to_string()
        );
        assert_eq!(labels.len(), 3);
    }

    #[test]
    fn a_config_must_list_one_diff_id_per_layer() {
        let m = manifest(2);
        let config = format!(r#"{{"rootfs":{{"type":"layers","diff_ids":["{A}"]}}}}"#);
        let err = diff_ids(config.as_bytes(), &m).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the image has 2 layers but its config lists 1 diff IDs"
        );
        let config = format!(r#"{{"rootfs":{{"type":"layers","diff_ids":["{A}","{B}"]}}}}"#);
        assert_eq!(diff_ids(config.as_bytes(), &m).unwrap(), vec![A, B]);
    }
}

/// The flow against a real containerd (its built-in overlayfs snapshotter: the normal path, no
/// Hermes) and a real registry: what `ctr run` needs is there and survives garbage collection.
#[cfg(test)]
mod with_containerd {
    use std::time::Duration;

    use hermes_containerd::api::containerd::services::leases::v1 as leases;
    use hermes_containerd::{Containerd, Platform};
    use hermes_oci::{Client, ClientOptions, Reference};
    use hermes_testkit::{Registry, busybox_image};

    use super::{LayerOutcome, PullOptions, pull};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pulled_image_runs_with_ctr_and_survives_garbage_collection() {
        let registry = Registry::start().unwrap();
        let image = busybox_image()
            .unwrap()
            .layer()
            .file("etc/motd", "pulled by hermes pull\n")
            .layer()
            .whiteout("bin/ls")
            .entrypoint(&["/bin/cat", "/etc/motd"])
            .push(&registry.host(), "pulled:v1")
            .unwrap();
        let containerd = hermes_testkit::Containerd::builder().start().unwrap();
        let client = Containerd::connect(containerd.address(), "default")
            .await
            .unwrap();
        let oci = Client::new(ClientOptions {
            plain_http: true,
            ..ClientOptions::default()
        })
        .unwrap();
        let reference = Reference::parse(&image.reference).unwrap();
        let options = PullOptions {
            snapshotter: "overlayfs".into(),
            platform: Platform::parse("linux/amd64").unwrap(),
        };
        let mut seen = Vec::new();
        let report = pull(&client, &oci, &reference, &options, |l| {
            seen.push(l.clone())
        })
        .await
        .unwrap_or_else(|e| panic!("pull: {e:?}\ncontainerd log:\n{}", containerd.log()));
        assert_eq!(report.layers, seen);
        assert_eq!(report.name, image.reference);
        assert_eq!(report.manifest_digest, image.manifest_digest);
        assert_eq!(report.config_digest, image.config_digest);
        let outcomes: Vec<_> = report.layers.iter().map(|l| l.outcome).collect();
        assert_eq!(outcomes, vec![LayerOutcome::Unpacked; 3]);

        // Force a synchronous garbage collection: everything the image needs must be referenced.
        client
            .create_lease("gc-trigger", Duration::from_secs(60))
            .await
            .unwrap();
        client
            .leases()
            .delete(leases::DeleteRequest {
                id: "gc-trigger".into(),
                sync: true,
            })
            .await
            .unwrap();
        let snapshots = containerd.ctr(&["snapshots", "ls"]).unwrap();
        assert!(snapshots.contains(&report.chain_id), "{snapshots}");
        let content = containerd.ctr(&["content", "ls"]).unwrap();
        for layer in &image.layers {
            assert!(content.contains(&layer.digest), "{content}");
            let labels = client.content_labels(&layer.digest).await.unwrap().unwrap();
            assert_eq!(
                labels.get("containerd.io/uncompressed"),
                Some(&layer.diff_id),
                "{labels:?}"
            );
        }

        let out = containerd
            .ctr(&["run", "--rm", &image.reference, "pulled-1"])
            .unwrap_or_else(|e| panic!("{e:?}\ncontainerd log:\n{}", containerd.log()));
        assert_eq!(out, "pulled by hermes pull\n");

        // Pulling again finds every layer in place.
        let again = pull(&client, &oci, &reference, &options, |_| {})
            .await
            .unwrap();
        let outcomes: Vec<_> = again.layers.iter().map(|l| l.outcome).collect();
        assert_eq!(outcomes, vec![LayerOutcome::Present; 3]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pull_of_a_missing_image_names_it_and_leaves_no_lease() {
        let registry = Registry::start().unwrap();
        let containerd = hermes_testkit::Containerd::builder().start().unwrap();
        let client = Containerd::connect(containerd.address(), "default")
            .await
            .unwrap();
        let oci = Client::new(ClientOptions {
            plain_http: true,
            ..ClientOptions::default()
        })
        .unwrap();
        let reference = Reference::parse(&format!("{}/nothing:here", registry.host())).unwrap();
        let options = PullOptions {
            snapshotter: "overlayfs".into(),
            platform: Platform::host(),
        };
        let err = pull(&client, &oci, &reference, &options, |_| {})
            .await
            .unwrap_err();
        assert!(err.to_string().contains("nothing:here"), "{err}");
        let leases = containerd.ctr(&["leases", "ls", "-q"]).unwrap();
        assert_eq!(leases.trim(), "", "leases left: {leases}");
    }
}
