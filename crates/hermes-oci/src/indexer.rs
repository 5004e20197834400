//! Index an image from its registry: resolve the platform's manifest, stream each eligible layer
//! once into the zTOC builder (layers in parallel, memory bounded), keep zTOCs in the store keyed
//! by layer digest, and optionally push SOCI artifacts.

use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hermes_ztoc::{BuildOptions, Compression};
use tokio::sync::{Semaphore, mpsc};
use tracing::{info, instrument};

use crate::client::{Client, ResolvedImage};
use crate::manifest::{Descriptor, LayerEncoding, Platform, media};
use crate::soci::{self, SociVersion, ZtocRef};
use crate::store::{ImageRecord, LayerOutcome, LayerRecord, Store};
use crate::{Digest, Error, Reference, Result};

pub use hermes_oci_types::DEFAULT_MIN_LAYER_SIZE;

/// What to build.
#[derive(Debug, Clone)]
pub struct IndexOptions {
    /// Platform to pick from a multi-platform image.
    pub platform: Platform,
    /// Layers smaller than this (compressed) are skipped.
    pub min_layer_size: u64,
    /// Smallest zTOC span size: a large layer gets larger spans ([`span_size_for_layer`]).
    pub span_size: u64,
    /// Build tool identifier stored in zTOCs and the index.
    pub build_tool_identifier: String,
    /// Layers indexed at the same time.
    pub concurrency: usize,
}

impl Default for IndexOptions {
    fn default() -> Self {
        Self {
            platform: Platform::host(),
            min_layer_size: DEFAULT_MIN_LAYER_SIZE,
            span_size: hermes_oci_types::DEFAULT_INDEX_SPAN_SIZE,
            build_tool_identifier: hermes_ztoc::SOCI_BUILD_TOOL_IDENTIFIER.to_owned(),
            concurrency: 2,
        }
    }
}

/// Spans a layer's zTOC may have before [`span_size_for_layer`] makes them larger: each holds a
/// 32 KiB gzip window, so 4,096 spans keep a zTOC near 128 MiB, half the 256 MiB a node
/// accepts (`hermes_node_api::MAX_ZTOC_SIZE`).
pub const MAX_ESTIMATED_SPANS: u64 = 4096;

/// Uncompressed bytes per compressed byte assumed when estimating a layer's spans (real layers:
/// about 2 to 3).
pub const ASSUMED_COMPRESSION_RATIO: u64 = 4;

/// The span size a layer of `compressed_size` bytes is indexed with: `smallest`, doubled while
/// the layer would have more than [`MAX_ESTIMATED_SPANS`] spans at [`ASSUMED_COMPRESSION_RATIO`].
/// Small spans make a first start fetch fewer bytes per read; this keeps the zTOC of a large
/// layer small enough to be stored, sent to every node and accepted there. A function of the
/// request and the layer only, so the same layer is always built the same way.
pub fn span_size_for_layer(smallest: u64, compressed_size: u64) -> u64 {
    let estimated = compressed_size.saturating_mul(ASSUMED_COMPRESSION_RATIO);
    let mut span = smallest.max(1);
    while estimated / span > MAX_ESTIMATED_SPANS && span <= u64::MAX / 2 {
        span *= 2;
    }
    span
}

/// The outcome of indexing one image.
#[derive(Debug, Clone)]
pub struct IndexResult {
    /// What was stored about the image.
    pub record: ImageRecord,
    /// The resolved image.
    pub image: ResolvedImage,
    /// zTOCs usable in a SOCI index (gzip and plain tar, no sparse files), in layer order.
    pub soci_ztocs: Vec<ZtocRef>,
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Feeds a channel of chunks to a synchronous reader (the zTOC builder runs on a blocking thread).
struct ChannelReader {
    rx: mpsc::Receiver<Result<Bytes>>,
    current: Bytes,
    failure: Arc<Mutex<Option<Error>>>,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                None => return Ok(0),
                Some(Ok(chunk)) => self.current = chunk,
                Some(Err(e)) => {
                    let message = e.to_string();
                    if let Ok(mut f) = self.failure.lock() {
                        *f = Some(e);
                    }
                    return Err(std::io::Error::other(message));
                }
            }
        }
        let n = self.current.len().min(buf.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current = self.current.slice(n..);
        Ok(n)
    }
}

/// Index `reference` into `store`; `progress` is called as each layer finishes.
#[instrument(skip(client, store, reference, options, progress), fields(image = %reference))]
pub async fn build_index(
    client: &Client,
    store: &Store,
    reference: &Reference,
    options: &IndexOptions,
    progress: &(dyn Fn(&LayerRecord) + Sync),
) -> Result<IndexResult> {
    let image = client.resolve(reference, &options.platform).await?;
    info!(manifest = %image.fetched.digest, layers = image.manifest.layers.len(), "resolved");
    let semaphore = Arc::new(Semaphore::new(options.concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, layer) in image.manifest.layers.iter().cloned().enumerate() {
        let (client, store, reference, options, semaphore) = (
            client.clone(),
            store.clone(),
            reference.clone(),
            options.clone(),
            semaphore.clone(),
        );
        tasks.spawn(async move {
            let _permit = semaphore.acquire_owned().await;
            (
                i,
                index_layer(&client, &store, &reference, &options, &layer).await,
            )
        });
    }
    let mut layers: Vec<Option<LayerRecord>> = vec![None; image.manifest.layers.len()];
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        let Ok((i, result)) = joined else { continue };
        match result {
            Ok(record) => {
                progress(&record);
                layers[i] = Some(record);
            }
            Err(e) => {
                if first_error.is_none() {
                    first_error = Some(e);
                    tasks.abort_all();
                }
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    let layers: Vec<LayerRecord> = layers.into_iter().flatten().collect();
    let result = assemble_index(
        store,
        reference,
        image,
        options.span_size,
        layers,
        &options.build_tool_identifier,
    )?;
    let record = store.put_image(&result.record)?;
    Ok(IndexResult { record, ..result })
}

/// The index of an image whose layers are done: the SOCI v2 index manifest over the zTOCs
/// soci can serve, stored in `store` (none when no layer has one), and the image record, which
/// is not stored (the caller decides when: the controller publishes it first).
pub fn assemble_index(
    store: &Store,
    reference: &Reference,
    image: ResolvedImage,
    span_size: u64,
    layers: Vec<LayerRecord>,
    build_tool_identifier: &str,
) -> Result<IndexResult> {
    let soci_ztocs = soci_refs(span_size, &layers);
    let soci_index = if soci_ztocs.is_empty() {
        None
    } else {
        let bytes = soci::index_manifest(SociVersion::V2, &soci_ztocs, build_tool_identifier, None);
        Some(store.put_blob(&bytes)?)
    };
    let record = ImageRecord {
        reference: reference.to_string(),
        aliases: Vec::new(),
        manifest_digest: image.fetched.digest.clone(),
        platform: image.platform.as_ref().map(Platform::to_string),
        span_size,
        layers,
        soci_index,
        built_at_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    Ok(IndexResult {
        record,
        image,
        soci_ztocs,
    })
}

/// The SOCI index's entries: the layers with a zTOC soci can serve, each annotated with the span
/// size its zTOC was built with (`span_size` scaled per layer for records that do not say).
fn soci_refs(span_size: u64, layers: &[LayerRecord]) -> Vec<ZtocRef> {
    layers
        .iter()
        .filter_map(|l| match &l.outcome {
            LayerOutcome::Indexed {
                ztoc,
                ztoc_size,
                soci_compatible: true,
                span_size: built_with,
                ..
            } => Some(ZtocRef {
                ztoc: ztoc.clone(),
                size: *ztoc_size,
                layer: l.digest.clone(),
                layer_media_type: l.media_type.clone(),
                // What the zTOC was built with (a reused zTOC may predate today's scaling).
                span_size: if *built_with > 0 {
                    *built_with
                } else {
                    span_size_for_layer(span_size, l.size)
                },
            }),
            _ => None,
        })
        .collect()
}

fn skipped(layer: &Descriptor, reason: String) -> LayerRecord {
    LayerRecord {
        digest: layer.digest.clone(),
        media_type: layer.media_type.clone(),
        size: layer.size.max(0) as u64,
        outcome: LayerOutcome::Skipped { reason },
    }
}

/// Index one layer of `reference` into `store` (what [`build_index`] does per layer): skipped
/// when not a tar layer, below `options.min_layer_size` or not indexable (the record says why);
/// reused when a zTOC for its digest and span size is stored; otherwise streamed once from the
/// registry. A transport or digest failure is an error and stores nothing.
#[instrument(skip_all, fields(layer = %layer.digest, size = layer.size))]
pub async fn index_layer(
    client: &Client,
    store: &Store,
    reference: &Reference,
    options: &IndexOptions,
    layer: &Descriptor,
) -> Result<LayerRecord> {
    let size = layer.size.max(0) as u64;
    let Some(encoding) = LayerEncoding::of(&layer.media_type) else {
        return Ok(skipped(
            layer,
            format!(
                "media type {} is not a tar, tar+gzip or tar+zstd layer",
                layer.media_type
            ),
        ));
    };
    if size < options.min_layer_size {
        return Ok(skipped(
            layer,
            format!(
                "{size} bytes is below the minimum layer size {}",
                options.min_layer_size
            ),
        ));
    }
    if let Some(ztoc_digest) = store.ztoc_for_layer(&layer.digest, options.span_size)?
        && let Some(bytes) = store.get_blob(&ztoc_digest)?
        && let Ok(ztoc) = hermes_ztoc::Ztoc::from_bytes(&bytes)
    {
        return Ok(indexed(
            layer,
            Counts::of(&ztoc),
            ztoc_digest,
            bytes.len() as u64,
            0.0,
            true,
        ));
    }

    let started = Instant::now();
    let (tx, rx) = mpsc::channel::<Result<Bytes>>(32);
    let mut stream = client.blob_stream(reference, &layer.digest, size);
    // Aborted when this future is dropped (a cancelled build), so the stream stops and the
    // builder thread sees the end of its input.
    let feeder = AbortOnDrop(tokio::spawn(async move {
        while let Some(item) = stream.next().await {
            if tx.send(item).await.is_err() {
                break;
            }
        }
    }));
    let failure = Arc::new(Mutex::new(None));
    let reader = ChannelReader {
        rx,
        current: Bytes::new(),
        failure: failure.clone(),
    };
    let layer_span_size = span_size_for_layer(options.span_size, size);
    let build_options = BuildOptions {
        span_size: layer_span_size,
        build_tool_identifier: options.build_tool_identifier.clone(),
        compression: Some(match encoding {
            LayerEncoding::Gzip => Compression::Gzip,
            LayerEncoding::Tar => Compression::Uncompressed,
            LayerEncoding::Zstd => Compression::Zstd,
        }),
        ..BuildOptions::default()
    };
    // The zTOC streams to a temp file in the store (entries and checkpoints spill there too), so
    // indexing a layer holds the decoder's buffers, not the zTOC: small spans make large zTOCs.
    let spill = store.tmp_dir()?;
    let mut out = store.blob_writer()?;
    let built = tokio::task::spawn_blocking(move || {
        let mut reader = reader;
        let built = hermes_ztoc::build_to(&mut reader, &build_options, &spill, &mut out);
        if built.is_err() {
            // A corrupt blob often breaks decoding before its digest can be checked: read the
            // rest so a digest mismatch is reported as what it is.
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        }
        built.map(|b| (b, out))
    })
    .await;
    drop(feeder);
    // A transport or digest failure is the real cause of a build error: report it, store nothing.
    if let Some(e) = failure.lock().ok().and_then(|mut f| f.take()) {
        return Err(e);
    }
    let ztoc_err = |source| Error::Ztoc {
        layer: layer.digest.clone(),
        source,
    };
    let (built, out) = match built {
        Ok(Ok(built)) => built,
        Ok(Err(hermes_ztoc::Error::ZstdNotSeekable)) => {
            return Ok(skipped(
                layer,
                "zstd layer is a single frame: not seekable, it will be pulled normally".into(),
            ));
        }
        // Its own words: "not indexable: <which limit>".
        Ok(Err(e @ hermes_ztoc::Error::NotIndexable { .. })) => {
            return Ok(skipped(layer, e.to_string()));
        }
        // The store's disk, not the layer: an error, not a layer to skip.
        Ok(Err(e @ (hermes_ztoc::Error::Output(_) | hermes_ztoc::Error::Spill { .. }))) => {
            return Err(ztoc_err(e));
        }
        Ok(Err(e)) => return Ok(skipped(layer, format!("layer cannot be indexed: {e}"))),
        Err(join) => {
            return Err(ztoc_err(hermes_ztoc::Error::Io(std::io::Error::other(
                join,
            ))));
        }
    };
    if built.compressed_archive_size != size {
        return Err(ztoc_err(hermes_ztoc::Error::Invalid {
            what: "layer size differs from its descriptor",
            index: 0,
        }));
    }
    let ztoc_digest = out.commit()?;
    store.set_ztoc_for_layer(&layer.digest, options.span_size, &ztoc_digest)?;
    let seconds = started.elapsed().as_secs_f64();
    info!(ztoc = %ztoc_digest, spans = built.span_count, seconds, "layer indexed");
    Ok(indexed(
        layer,
        Counts {
            spans: built.span_count,
            entries: built.entries,
            soci_compatible: built.soci_compatible,
            span_size: layer_span_size,
        },
        ztoc_digest,
        built.ztoc_size,
        seconds,
        false,
    ))
}

/// What a layer record tells of its zTOC.
struct Counts {
    spans: u32,
    entries: u64,
    soci_compatible: bool,
    span_size: u64,
}

impl Counts {
    fn of(ztoc: &hermes_ztoc::Ztoc) -> Self {
        Self {
            spans: ztoc.span_count(),
            entries: ztoc.entries().len() as u64,
            soci_compatible: ztoc.is_soci_compatible(),
            span_size: ztoc.span_size(),
        }
    }
}

fn indexed(
    layer: &Descriptor,
    counts: Counts,
    digest: Digest,
    ztoc_size: u64,
    seconds: f64,
    reused: bool,
) -> LayerRecord {
    LayerRecord {
        digest: layer.digest.clone(),
        media_type: layer.media_type.clone(),
        size: layer.size.max(0) as u64,
        outcome: LayerOutcome::Indexed {
            ztoc: digest,
            ztoc_size,
            spans: counts.spans,
            entries: counts.entries,
            seconds,
            reused,
            soci_compatible: counts.soci_compatible,
            span_size: counts.span_size,
        },
    }
}

/// What a push wrote.
#[derive(Debug, Clone)]
pub struct PushSummary {
    /// The SOCI index manifest digest.
    pub soci_index: Digest,
    /// v2: the SOCI-enabled image index reference that was tagged.
    pub tagged: Option<String>,
    /// zTOC blobs uploaded.
    pub ztocs: usize,
}

/// Push SOCI artifacts for an indexed image to `target` (a repository, and for v2 a tag).
/// Hermes-only zTOCs are never included (SOCI has no zstd, and its readers would serve a sparse
/// file's packed data as the file).
pub async fn push_soci(
    client: &Client,
    store: &Store,
    result: &IndexResult,
    version: SociVersion,
    target: &Reference,
    build_tool_identifier: &str,
) -> Result<PushSummary> {
    let image = &result.image;
    let source_repo = (image.reference.registry == target.registry)
        .then_some(image.reference.repository.as_str());
    if result.soci_ztocs.is_empty() {
        return Err(Error::Ztoc {
            layer: image.fetched.digest.clone(),
            source: hermes_ztoc::Error::Invalid {
                what: "no layer of the image has a SOCI-compatible zTOC to push",
                index: 0,
            },
        });
    }
    for z in &result.soci_ztocs {
        let bytes = store.get_blob(&z.ztoc)?.ok_or_else(|| Error::Store {
            path: store.root().display().to_string(),
            action: "find a zTOC blob to push",
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        })?;
        client.push_blob(target, Bytes::from(bytes), None).await?;
    }
    client
        .push_blob(target, Bytes::from_static(soci::EMPTY_CONFIG), None)
        .await?;
    let subject = Descriptor::new(
        &image.fetched.media_type,
        image.fetched.digest.clone(),
        image.fetched.bytes.len() as u64,
    );
    let index_bytes = soci::index_manifest(
        version,
        &result.soci_ztocs,
        build_tool_identifier,
        Some(subject.clone()),
    );
    let index_digest = Digest::of(&index_bytes);
    let index_len = index_bytes.len() as u64;
    client
        .push_manifest(
            target,
            index_digest.as_str(),
            Bytes::from(index_bytes),
            media::OCI_MANIFEST,
        )
        .await?;
    match version {
        SociVersion::V1 => {
            let mut referrer =
                Descriptor::new(media::OCI_MANIFEST, index_digest.clone(), index_len);
            referrer.artifact_type = Some(media::SOCI_INDEX_V1.to_owned());
            // Registries with the referrers API index the subject themselves; others need the
            // fallback tag.
            let listed = client
                .referrers(target, &image.fetched.digest, media::SOCI_INDEX_V1)
                .await?;
            if !listed.iter().any(|d| d.digest == index_digest) {
                client
                    .add_referrer_fallback(target, &image.fetched.digest, referrer)
                    .await?;
            }
            Ok(PushSummary {
                soci_index: index_digest,
                tagged: None,
                ztocs: result.soci_ztocs.len(),
            })
        }
        SociVersion::V2 => {
            let platform = image.platform.clone().unwrap_or_else(Platform::host);
            // The image's blobs must exist in the target repository too.
            if target.repository != image.reference.repository
                || target.registry != image.reference.registry
            {
                for d in std::iter::once(&image.manifest.config).chain(&image.manifest.layers) {
                    let size = d.size.max(0) as u64;
                    if !client.blob_exists(target, &d.digest).await? {
                        if source_repo.is_some() {
                            client
                                .push_blob_mount(
                                    target,
                                    &d.digest,
                                    size,
                                    &image.reference.repository,
                                )
                                .await?;
                        } else {
                            let blob = client.get_blob(&image.reference, &d.digest, size).await?;
                            client.push_blob(target, blob, None).await?;
                        }
                    }
                }
            }
            let converted = soci::convert_v2(image, &index_digest, index_len, &platform);
            client
                .push_manifest(
                    target,
                    converted.manifest_digest.as_str(),
                    Bytes::from(converted.manifest),
                    media::OCI_MANIFEST,
                )
                .await?;
            let tag = target.tag.clone().unwrap_or_else(|| "latest".into());
            client
                .push_manifest(target, &tag, Bytes::from(converted.index), media::OCI_INDEX)
                .await?;
            Ok(PushSummary {
                soci_index: index_digest,
                tagged: Some(target.with_tag(&tag).to_string()),
                ztocs: result.soci_ztocs.len(),
            })
        }
    }
}

#[cfg(test)]
mod span_tests {
    use super::*;

    const KIB: u64 = 1 << 10;
    const MIB: u64 = 1 << 20;

    #[test]
    fn the_soci_index_names_the_span_size_each_ztoc_was_built_with() {
        let layer = |n: u8, size: u64, span_size: u64, soci_compatible: bool| LayerRecord {
            digest: Digest::of(&[n]),
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            size,
            outcome: LayerOutcome::Indexed {
                ztoc: Digest::of(&[n, n]),
                ztoc_size: 10,
                spans: 1,
                entries: 1,
                seconds: 0.0,
                reused: true,
                soci_compatible,
                span_size,
            },
        };
        let refs = soci_refs(
            512 * KIB,
            &[
                // Reused from a build at another span size: its own.
                layer(1, 2_000_000_000, 4 * MIB, true),
                // A record that does not say: the span today's scaling gives the layer.
                layer(2, 2_000_000_000, 0, true),
                layer(3, 1_000_000, 0, true),
                // Not servable by soci: not in its index.
                layer(4, 1_000_000, 512 * KIB, false),
            ],
        );
        let spans: Vec<(Digest, u64)> = refs
            .iter()
            .map(|r| (r.layer.clone(), r.span_size))
            .collect();
        assert_eq!(
            spans,
            vec![
                (Digest::of(&[1]), 4 * MIB),
                (Digest::of(&[2]), 2 * MIB),
                (Digest::of(&[3]), 512 * KIB),
            ]
        );
    }

    #[test]
    fn small_layers_keep_the_requested_span_and_large_ones_stay_near_4096_spans() {
        // A Python packages layer of 162 MB and a Debian base: the requested span.
        assert_eq!(span_size_for_layer(512 * KIB, 162_000_000), 512 * KIB);
        assert_eq!(span_size_for_layer(512 * KIB, 30_000_000), 512 * KIB);
        assert_eq!(span_size_for_layer(512 * KIB, 0), 512 * KIB);
        // A 2 GB CUDA layer: 2 MiB spans.
        assert_eq!(span_size_for_layer(512 * KIB, 2_000_000_000), 2 * MIB);
        // Never smaller than asked, and a larger request is kept.
        assert_eq!(span_size_for_layer(4 * MIB, 2_000_000_000), 4 * MIB);
        for size in [1u64, 10 * MIB, 700 * MIB, 3 << 30, 40 << 30, u64::MAX / 8] {
            let span = span_size_for_layer(512 * KIB, size);
            assert!(span >= 512 * KIB);
            assert!(
                size.saturating_mul(ASSUMED_COMPRESSION_RATIO) / span <= MAX_ESTIMATED_SPANS,
                "{size} bytes: {span}-byte spans"
            );
        }
        assert_eq!(span_size_for_layer(0, 1 << 20), 1024);
        assert!(span_size_for_layer(1, u64::MAX) > 0);
    }
}
