//! The production [`RemoteLayers`] source: a layer with a zTOC in the local artifact store is
//! mounted as a lazy FUSE filesystem (`hermes-lazyfs`) reading from the image's registry, and the
//! snapshotter commits that mount as the layer. One mount per layer digest, shared by every image
//! that has the layer. No zTOC, no image reference, or any failure → `None`/error, and the
//! snapshotter falls back to a normal unpack.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use hermes_lazyfs::{
    BackgroundFetcher, DEFAULT_FETCH_LIMIT, FetchLimit, LayerDigest, LayerReader, MountHandle,
    SpanCache,
};
use hermes_oci::{Client, Digest, Reference, RegistryRangeReader, Store};
use tracing::info;

use crate::remote::{RemoteError, RemoteLayer, RemoteLayers};

/// Lazy layers from a local zTOC store and the registry.
pub struct LazyLayers {
    store: Store,
    client: Client,
    runtime: tokio::runtime::Handle,
    root: PathBuf,
    background: bool,
    /// One bound on range requests for every layer mounted here.
    fetch_limit: FetchLimit,
    mounts: Mutex<HashMap<String, Mounted>>,
    /// Serialises mounting so two images sharing a layer never mount it twice.
    mounting: Mutex<()>,
}

struct Mounted {
    path: PathBuf,
    _handle: MountHandle,
    _background: Option<BackgroundFetcher>,
}

impl std::fmt::Debug for LazyLayers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mounted = self.mounts.lock().map(|m| m.len()).unwrap_or(0);
        f.debug_struct("LazyLayers")
            .field("root", &self.root)
            .field("mounted", &mounted)
            .finish()
    }
}

impl LazyLayers {
    /// Mounts and span caches live under `root` (`mounts/<hex>`, `cache/<hex>`). `runtime` runs
    /// the registry client; `background` also fetches each layer's remaining spans.
    pub fn new(
        store: Store,
        client: Client,
        runtime: tokio::runtime::Handle,
        root: &Path,
        background: bool,
    ) -> Self {
        Self {
            store,
            client,
            runtime,
            root: root.to_owned(),
            background,
            fetch_limit: FetchLimit::new(DEFAULT_FETCH_LIMIT),
            mounts: Mutex::new(HashMap::new()),
            mounting: Mutex::new(()),
        }
    }

    /// The lazy mount of a layer, if mounted.
    pub fn mountpoint(&self, layer_digest: &str) -> Option<PathBuf> {
        self.mounts
            .lock()
            .ok()?
            .get(layer_digest)
            .map(|m| m.path.clone())
    }

    fn mount(&self, layer: &RemoteLayer) -> Result<Option<PathBuf>, RemoteError> {
        let digest = Digest::parse(&layer.layer_digest)?;
        let Some(image_ref) = &layer.image_ref else {
            return Ok(None);
        };
        let Some(ztoc_digest) = self.store.any_ztoc_for_layer(&digest)? else {
            return Ok(None);
        };
        let Some(bytes) = self.store.get_blob(&ztoc_digest)? else {
            return Ok(None);
        };
        let ztoc = Arc::new(hermes_ztoc::Ztoc::from_bytes(&bytes)?);
        let reference = Reference::parse(image_ref)?;
        let source = RegistryRangeReader::new(
            self.client.clone(),
            reference,
            digest.clone(),
            self.runtime.clone(),
        )
        .with_span_check(ztoc.clone());
        let cache = SpanCache::open(&self.root.join("cache").join(digest.hex()), &ztoc)?;
        let size = ztoc.compressed_archive_size();
        let reader = Arc::new(
            LayerReader::new(ztoc, source, cache).with_fetch_limit(self.fetch_limit.clone()),
        );
        if self.background {
            reader.keep_for_background();
        }
        let path = self.root.join("mounts").join(digest.hex());
        std::fs::create_dir_all(&path)?;
        let handle = hermes_lazyfs::mount(reader.clone(), &path)?;
        let background = if self.background {
            Some(BackgroundFetcher::start(
                reader,
                LayerDigest::parse(digest.as_str())?,
                size,
            )?)
        } else {
            None
        };
        info!(layer = %digest, mount = %path.display(), "lazy layer mounted");
        let mut mounts = self
            .mounts
            .lock()
            .map_err(|_| "lazy mount table poisoned")?;
        mounts.insert(
            layer.layer_digest.clone(),
            Mounted {
                path: path.clone(),
                _handle: handle,
                _background: background,
            },
        );
        Ok(Some(path))
    }
}

impl RemoteLayers for LazyLayers {
    fn prepare(&self, layer: &RemoteLayer) -> Result<Option<PathBuf>, RemoteError> {
        let _one_at_a_time = self
            .mounting
            .lock()
            .map_err(|_| "lazy mount lock poisoned")?;
        if let Some(path) = self.mountpoint(&layer.layer_digest) {
            return Ok(Some(path));
        }
        self.mount(layer)
    }
}
