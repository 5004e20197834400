//! Where the node daemon finds a layer's zTOC, in order: the node's own zTOC store (zTOCs fetched
//! before), the controller's node API (`GET /v1/layers/{digest}/ztoc`), and, when enabled, SOCI
//! indexes in the image's registry (v2: the manifest's `com.amazon.soci.index-digest`
//! annotation; v1: referrers of the manifest). Whatever is fetched is checked (digest, then a
//! full parse) and kept in the local store, so a restart or a second image with the layer
//! downloads nothing again.
//!
//! With a controller, the controller decides: every lookup asks it (naming the image, and the
//! copy kept locally, which it confirms with a 304), and when it answers that an `Off` policy
//! covers the image ([`Answer::Disabled`]) the layer is not started lazily, whatever copy the
//! node has. A controller that is down does not stop lazy starts: the local copy is used.
//!
//! Sources that are down answer slowly at worst: every controller request has a short timeout
//! and any failure only means "no zTOC from here". Bodies are read up to a cap
//! ([`MAX_ZTOC_SIZE`], [`MAX_PROFILE_SIZE`]): a broken or hostile source costs bounded memory.
//! Images without a zTOC are reported to the controller (`POST /v1/misses`, once per manifest)
//! so a policy can have them indexed. The controller is spoken to through the node-API
//! contract's client ([`hermes_node_api::Client`]).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use hermes_node_api::{
    ClientOptions, LayerBehaviour, Miss, PodRef, PullReport, TraceReport, ZtocAnswer, ZtocQuery,
    encode_labels, error_chain,
};
use hermes_oci::manifest::{Manifest, media};
use hermes_oci::soci::annotation;
use hermes_oci::{Client, Digest, Reference, Store};

use tokio::runtime::Handle;
use tracing::{debug, info, warn};

use crate::config::{ControllerConfig, read_token_file};
use crate::{Error, RemoteLayer, Result};

pub use hermes_node_api::{MAX_PROFILE_SIZE, MAX_ZTOC_SIZE};

/// Attempts to send one pull report (a controller replica that is not leading answers 503;
/// the next attempt's new connection may reach the leader).
pub const PULL_REPORT_ATTEMPTS: u32 = 8;
/// Most pull reports being sent at once.
pub const MAX_PULL_REPORTS_IN_FLIGHT: usize = 16;

/// Where a zTOC came from (a bounded metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// The node's own store.
    Local,
    /// The controller's node API.
    Controller,
    /// A SOCI index in the image's registry.
    Registry,
}

impl Source {
    /// Every source, in lookup order.
    pub const ALL: [Source; 3] = [Source::Local, Source::Controller, Source::Registry];

    /// Metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Local => "local",
            Source::Controller => "controller",
            Source::Registry => "registry",
        }
    }
}

/// Lookup counters by source and outcome.
#[derive(Debug, Default)]
pub struct LookupCounters {
    counts: [[AtomicU64; Lookup::ALL.len()]; Source::ALL.len()],
}

/// How a lookup in one source ended (a bounded metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// The source had a zTOC.
    Found,
    /// The source answered that it has none.
    NotFound,
    /// The source failed (down, timeout, bad answer).
    Failed,
    /// The controller refused: an `Off` policy covers the image.
    Refused,
}

impl Lookup {
    /// Every outcome.
    pub const ALL: [Lookup; 4] = [
        Lookup::Found,
        Lookup::NotFound,
        Lookup::Failed,
        Lookup::Refused,
    ];

    /// Metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Lookup::Found => "found",
            Lookup::NotFound => "not_found",
            Lookup::Failed => "failed",
            Lookup::Refused => "refused",
        }
    }
}

impl LookupCounters {
    fn count(&self, source: Source, lookup: Lookup) {
        self.counts[source as usize][lookup as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// How often `source` answered `lookup`.
    pub fn get(&self, source: Source, lookup: Lookup) -> u64 {
        self.counts[source as usize][lookup as usize].load(Ordering::Relaxed)
    }
}

/// A zTOC found for a layer, stored locally.
#[derive(Debug, Clone)]
pub struct FoundZtoc {
    /// Its digest in the local store.
    pub digest: Digest,
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// Where it came from.
    pub source: Source,
    /// How to serve the layer, as the controller said (the defaults from other sources, or
    /// when the controller could not be asked).
    pub behaviour: LayerBehaviour,
}

/// What the sources say about a layer.
#[derive(Debug)]
pub enum Answer {
    /// A zTOC, stored locally.
    Ztoc(FoundZtoc),
    /// No source has one (and at least one answered).
    NotIndexed,
    /// The controller forbids a lazy start of the image; why.
    Disabled(String),
}

impl Answer {
    /// The zTOC, if one was found.
    pub fn into_ztoc(self) -> Option<FoundZtoc> {
        match self {
            Self::Ztoc(found) => Some(found),
            Self::NotIndexed | Self::Disabled(_) => None,
        }
    }
}

/// The index sources of a node.
#[derive(Debug)]
pub struct IndexSources {
    store: Store,
    controller: Option<hermes_node_api::Client>,
    registry: Option<Client>,
    runtime: Handle,
    node: String,
    /// SOCI index manifests by image manifest digest (`None`: the image has none).
    soci_indexes: Mutex<HashMap<Digest, Option<Manifest>>>,
    /// Manifests already reported as misses.
    reported: Mutex<HashSet<String>>,
    /// Pull reports being sent.
    pulls_in_flight: Arc<AtomicUsize>,
    counters: LookupCounters,
}

impl IndexSources {
    /// Sources backed by the local `store`; `controller` and a `registry` client for SOCI
    /// lookups are optional. `runtime` runs the requests (callers are blocking threads).
    pub fn new(
        store: Store,
        controller: Option<&ControllerConfig>,
        registry: Option<Client>,
        runtime: Handle,
    ) -> Result<Self> {
        let controller = match controller {
            Some(c) => {
                let options = ClientOptions {
                    token: c.token_file.as_deref().map(read_token_file).transpose()?,
                    timeout: c.timeout(),
                    ca_pem: None,
                };
                Some(hermes_node_api::Client::new(&c.url, options)?)
            }
            None => None,
        };
        let node = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default();
        Ok(Self {
            store,
            controller,
            registry,
            runtime,
            node,
            soci_indexes: Mutex::new(HashMap::new()),
            reported: Mutex::new(HashSet::new()),
            pulls_in_flight: Arc::default(),
            counters: LookupCounters::default(),
        })
    }

    /// The same sources, naming this node `name` in reports (instead of the host name).
    pub fn with_node_name(mut self, name: &str) -> Self {
        name.trim().clone_into(&mut self.node);
        self
    }

    /// Lookup counters, for metrics.
    pub fn counters(&self) -> &LookupCounters {
        &self.counters
    }

    /// The local zTOC store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The zTOC for `layer`, from the first source that has one (see the module docs), for
    /// `pod` if the node knows it (the controller then applies policies' selectors to it).
    /// Errors only when every source that was asked failed and there is no local copy.
    pub fn find(&self, layer: &RemoteLayer, pod: Option<&PodRef>) -> Result<Answer> {
        let digest = Digest::parse(&layer.layer_digest)?;
        let local = self.local(&digest)?;
        // What the controller says of the image holds whichever source has the zTOC.
        let mut behaviour = LayerBehaviour::default();
        let mut last_err = None;
        let mut answered = false;
        if self.controller.is_some() {
            let kept = local.as_ref().map(|f| &f.digest);
            match self.ask_controller(layer, &digest, kept, pod) {
                Ok(ZtocAnswer::Disabled(reason)) => {
                    self.counters.count(Source::Controller, Lookup::Refused);
                    info!(layer = %digest, %reason, "the controller refuses a lazy start");
                    return Ok(Answer::Disabled(reason));
                }
                Ok(ZtocAnswer::Ztoc(bytes, behaviour)) => {
                    self.counters.count(Source::Controller, Lookup::Found);
                    return self
                        .keep(&digest, bytes, Source::Controller)
                        .map(|found| Answer::Ztoc(FoundZtoc { behaviour, ..found }));
                }
                // Confirmed: counted below as found locally.
                Ok(ZtocAnswer::Same(said)) => behaviour = said,
                Ok(ZtocAnswer::NotFound(said)) => {
                    behaviour = said;
                    answered = true;
                    debug!(layer = %digest, "controller has no zTOC");
                    self.counters.count(Source::Controller, Lookup::NotFound);
                }
                Err(e) => {
                    self.counters.count(Source::Controller, Lookup::Failed);
                    warn!(layer = %digest, error = %error_chain(&e), "controller lookup failed");
                    last_err = Some(e);
                }
            }
        }
        if let Some(found) = local {
            self.counters.count(Source::Local, Lookup::Found);
            return Ok(Answer::Ztoc(FoundZtoc { behaviour, ..found }));
        }
        self.counters.count(Source::Local, Lookup::NotFound);
        if self.registry.is_some() {
            match self.ask_registry(layer, &digest) {
                Ok(Some(bytes)) => {
                    self.counters.count(Source::Registry, Lookup::Found);
                    return self
                        .keep(&digest, bytes, Source::Registry)
                        .map(|found| Answer::Ztoc(FoundZtoc { behaviour, ..found }));
                }
                Ok(None) => {
                    answered = true;
                    self.counters.count(Source::Registry, Lookup::NotFound);
                }
                Err(e) => {
                    self.counters.count(Source::Registry, Lookup::Failed);
                    warn!(layer = %digest, error = %error_chain(&e), "registry SOCI lookup failed");
                    last_err = Some(e);
                }
            }
        }
        match last_err {
            Some(e) if !answered => Err(e),
            _ => Ok(Answer::NotIndexed),
        }
    }

    fn local(&self, layer: &Digest) -> Result<Option<FoundZtoc>> {
        let Some(digest) = self.store.any_ztoc_for_layer(layer)? else {
            return Ok(None);
        };
        let Some(bytes) = self.store.get_blob(&digest)? else {
            return Ok(None);
        };
        Ok(Some(FoundZtoc {
            digest,
            bytes,
            source: Source::Local,
            behaviour: LayerBehaviour::default(),
        }))
    }

    /// Checks a fetched zTOC (it must parse) and stores it for the layer.
    fn keep(&self, layer: &Digest, bytes: Vec<u8>, source: Source) -> Result<FoundZtoc> {
        let ztoc = hermes_ztoc::Ztoc::from_bytes(&bytes).map_err(|source| Error::Ztoc {
            layer: layer.to_string(),
            source,
        })?;
        let digest = self.store.put_blob(&bytes)?;
        self.store
            .set_ztoc_for_layer(layer, ztoc.span_size(), &digest)?;
        info!(%layer, ztoc = %digest, source = source.as_str(), "zTOC fetched");
        Ok(FoundZtoc {
            digest,
            bytes,
            source,
            behaviour: LayerBehaviour::default(),
        })
    }

    /// Asks the controller for `layer`'s zTOC, naming the image and the pod's namespace and
    /// labels (so it can refuse it or give its mode) and the copy `kept` locally, if any (so it
    /// can confirm it without sending it).
    fn ask_controller(
        &self,
        remote: &RemoteLayer,
        layer: &Digest,
        kept: Option<&Digest>,
        pod: Option<&PodRef>,
    ) -> Result<ZtocAnswer> {
        let Some(c) = &self.controller else {
            return Ok(ZtocAnswer::NotFound(LayerBehaviour::default()));
        };
        let query = ZtocQuery {
            image: remote.image_ref.clone(),
            manifest: remote.manifest_digest.clone(),
            labels: pod.map(|p| encode_labels(&p.labels)),
            namespace: pod.map(|p| p.namespace.clone()),
        };
        Ok(self.runtime.block_on(c.ztoc(layer, &query, kept))?)
    }

    fn ask_registry(&self, layer: &RemoteLayer, digest: &Digest) -> Result<Option<Vec<u8>>> {
        let Some(client) = &self.registry else {
            return Ok(None);
        };
        let (Some(image), Some(manifest)) = (&layer.image_ref, &layer.manifest_digest) else {
            return Ok(None);
        };
        let reference = Reference::parse(image)?;
        let manifest = Digest::parse(manifest)?;
        let index = self.soci_index(client, &reference, &manifest)?;
        let Some(index) = index else {
            return Ok(None);
        };
        let Some(entry) = index.layers.iter().find(|d| {
            d.annotations
                .as_ref()
                .and_then(|a| a.get(annotation::LAYER_DIGEST))
                .is_some_and(|l| l == digest.as_str())
        }) else {
            return Ok(None);
        };
        let size = u64::try_from(entry.size).unwrap_or(0);
        if size > MAX_ZTOC_SIZE {
            return Err(Error::Registry(hermes_oci::Error::TooLarge {
                what: "SOCI zTOC",
                url: reference.with_digest(entry.digest.clone()).to_string(),
                limit: MAX_ZTOC_SIZE,
            }));
        }
        let bytes = self
            .runtime
            .block_on(client.get_blob(&reference, &entry.digest, size))?;
        Ok(Some(bytes.to_vec()))
    }

    /// The SOCI index manifest of an image, cached per manifest digest.
    fn soci_index(
        &self,
        client: &Client,
        reference: &Reference,
        manifest: &Digest,
    ) -> Result<Option<Manifest>> {
        if let Some(known) = self.lock_indexes().get(manifest) {
            return Ok(known.clone());
        }
        let found = self.runtime.block_on(async {
            let image = client
                .get_manifest(&reference.with_digest(manifest.clone()))
                .await?;
            let image: Option<Manifest> = serde_json::from_slice(&image.bytes).ok();
            let v2 = image
                .as_ref()
                .and_then(|m| m.annotations.as_ref())
                .and_then(|a| a.get(annotation::INDEX_DIGEST))
                .and_then(|d| Digest::parse(d).ok());
            let index_digest = match v2 {
                Some(d) => Some(d),
                None => client
                    .referrers(reference, manifest, media::SOCI_INDEX_V1)
                    .await?
                    .into_iter()
                    .next()
                    .map(|d| d.digest),
            };
            let Some(index_digest) = index_digest else {
                return Ok::<_, hermes_oci::Error>(None);
            };
            let index = client
                .get_manifest(&reference.with_digest(index_digest))
                .await?;
            Ok(serde_json::from_slice::<Manifest>(&index.bytes).ok())
        })?;
        self.lock_indexes().insert(manifest.clone(), found.clone());
        Ok(found)
    }

    fn lock_indexes(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Option<Manifest>>> {
        self.soci_indexes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The controller's merged startup profile of a layer (its JSON, as the layer server
    /// reads it), if it has one.
    pub fn prefetch_profile(&self, layer: &Digest) -> Option<Vec<u8>> {
        let c = self.controller.as_ref()?;
        match self.runtime.block_on(c.prefetch_profile(layer)) {
            Ok(profile) => profile.and_then(|p| serde_json::to_vec(&p).ok()),
            Err(e) => {
                debug!(%layer, error = %error_chain(&e), "no prefetch profile");
                None
            }
        }
    }

    /// Sends a layer's startup trace (span ids in first-read order) to the controller.
    pub fn post_trace(&self, layer: &str, spans: &[u32]) -> Result<()> {
        let Some(c) = &self.controller else {
            return Ok(());
        };
        let report = TraceReport {
            node: self.node_name(),
            layers: [(Digest::parse(layer)?, spans.to_vec())].into(),
        };
        Ok(self.runtime.block_on(c.post_trace(&report))?)
    }

    /// This node's name for reports (none if the hostname is unknown).
    pub fn node_name(&self) -> Option<String> {
        (!self.node.is_empty()).then(|| self.node.clone())
    }

    /// Tells the controller, once per manifest, that an image started without an index. Does
    /// not wait for the answer.
    pub fn report_miss(&self, layer: &RemoteLayer, pod: Option<PodRef>) {
        let Some(c) = &self.controller else {
            return;
        };
        let Some(image) = &layer.image_ref else {
            return;
        };
        let key = layer
            .manifest_digest
            .clone()
            .unwrap_or_else(|| image.clone());
        {
            let mut reported = self
                .reported
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if !reported.insert(key) {
                return;
            }
        }
        // A manifest label that is no digest is left out: the controller resolves the image
        // by its reference then.
        let miss = Miss {
            image: image.clone(),
            digest: layer
                .manifest_digest
                .as_deref()
                .and_then(|d| Digest::parse(d).ok()),
            node: self.node_name(),
            pod: pod.map(PodRef::bounded),
        };
        let c = c.clone();
        self.runtime.spawn(async move {
            match c.post_miss(&miss).await {
                Ok(()) => debug!(image = miss.image, "miss reported"),
                Err(e) => debug!(image = miss.image, error = %error_chain(&e), "miss not reported"),
            }
        });
    }

    /// Sends a pull report to the controller in the background, off the start's path: each
    /// attempt has the client's deadline; a controller that is busy, down or not leading (503)
    /// is tried again [`PULL_REPORT_ATTEMPTS`] times with growing pauses, then the report is
    /// dropped. At most [`MAX_PULL_REPORTS_IN_FLIGHT`] are under way; more are dropped.
    pub fn post_pull(&self, report: PullReport) {
        let Some(c) = &self.controller else {
            return;
        };
        if self.pulls_in_flight.fetch_add(1, Ordering::Relaxed) >= MAX_PULL_REPORTS_IN_FLIGHT {
            self.pulls_in_flight.fetch_sub(1, Ordering::Relaxed);
            debug!(
                image = report.image,
                "too many pull reports under way; dropped"
            );
            return;
        }
        let (c, in_flight) = (c.clone(), self.pulls_in_flight.clone());
        self.runtime.spawn(async move {
            let mut pause = std::time::Duration::from_millis(500);
            for attempt in 1..=PULL_REPORT_ATTEMPTS {
                match c.post_pull(&report).await {
                    Ok(()) => {
                        debug!(image = report.image, "pull reported");
                        break;
                    }
                    Err(e) => {
                        let retry = match &e {
                            hermes_node_api::client::Error::Request { .. } => true,
                            hermes_node_api::client::Error::Status { status, .. } => {
                                status.is_server_error()
                            }
                            _ => false,
                        };
                        if !retry || attempt == PULL_REPORT_ATTEMPTS {
                            debug!(image = report.image, error = %error_chain(&e), "pull not reported");
                            break;
                        }
                    }
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(8));
            }
            in_flight.fetch_sub(1, Ordering::Relaxed);
        });
    }
}
