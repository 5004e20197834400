//! The remote-prepare boundary: on `Prepare` of a layer that containerd is about to unpack, the
//! snapshotter asks a [`RemoteLayers`] source whether it can provide the layer's contents as an
//! already mounted directory (a lazy FUSE layer, later). This module only decides *whether* and
//! records *why not*; it does not mount anything itself.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use hermes_node_api::labels;

/// A layer containerd is about to unpack, as told by the `Prepare` labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteLayer {
    /// Name the committed snapshot will have (`containerd.io/snapshot.ref`).
    pub target: String,
    /// The compressed layer's digest (`…/cri.layer-digest`).
    pub layer_digest: String,
    /// Image reference, if containerd sent it.
    pub image_ref: Option<String>,
    /// Manifest digest, if containerd sent it.
    pub manifest_digest: Option<String>,
    /// Parent snapshot (the layers below), if any.
    pub parent: Option<String>,
    /// All labels of the `Prepare` request.
    pub labels: BTreeMap<String, String>,
}

/// Why a remote layer request was not made from the labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotRemote {
    /// No `containerd.io/snapshot.ref`: an ordinary prepare (container rootfs, `ctr`).
    NoTarget,
    /// A target but no layer digest: cannot look up an index.
    NoLayerDigest,
}

impl RemoteLayer {
    /// Reads the request from `Prepare` labels.
    pub(crate) fn from_labels(
        parent: Option<&str>,
        labels: &BTreeMap<String, String>,
    ) -> Result<Self, NotRemote> {
        let non_empty = |k: &str| labels.get(k).filter(|v| !v.is_empty()).cloned();
        let target = non_empty(labels::SNAPSHOT_REF).ok_or(NotRemote::NoTarget)?;
        let layer_digest = non_empty(labels::CRI_LAYER_DIGEST).ok_or(NotRemote::NoLayerDigest)?;
        Ok(RemoteLayer {
            target,
            layer_digest,
            image_ref: non_empty(labels::CRI_IMAGE_REF),
            manifest_digest: non_empty(labels::CRI_MANIFEST_DIGEST),
            parent: parent.map(str::to_owned),
            labels: labels.clone(),
        })
    }
}

/// Error a [`RemoteLayers`] source returns; any error means "fall back to a normal snapshot".
pub type RemoteError = Box<dyn std::error::Error + Send + Sync>;

/// A source of remotely backed (lazy) layers.
///
/// Called on a blocking thread (never on the async runtime), once per `Prepare` that carries the
/// target and layer-digest labels. Whatever it returns — `None`, an error, a directory that is
/// not one, even a panic — the snapshotter falls back to a normal snapshot that containerd
/// unpacks into, and counts the reason.
///
/// containerd may prepare the same layer concurrently (two images sharing it): the source may be
/// asked twice for one target and should hand out one mount for both (the snapshotter records
/// the first answer and drops the second).
pub trait RemoteLayers: Send + Sync + fmt::Debug {
    /// Returns the mounted, read-only directory holding the layer's unpacked contents, or `None`
    /// when this source cannot provide the layer.
    fn prepare(&self, layer: &RemoteLayer) -> Result<Option<PathBuf>, RemoteError>;

    /// containerd removed the last snapshot using `dir` (a directory this source returned):
    /// the source may unmount it and free what it holds. Called on a blocking thread.
    fn release(&self, _dir: &Path) {}
}

/// The source that never has a layer: every prepare is a normal one.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoRemoteLayers;

impl RemoteLayers for NoRemoteLayers {
    fn prepare(&self, _layer: &RemoteLayer) -> Result<Option<PathBuf>, RemoteError> {
        Ok(None)
    }
}

/// Why a `Prepare` with remote labels became a normal snapshot. Bounded: usable as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FallbackReason {
    /// The target label was there but no layer digest label.
    NoLayerDigest,
    /// The source has no such layer (`Ok(None)`).
    NotAvailable,
    /// The source returned an error.
    RemoteError,
    /// The source panicked.
    RemotePanic,
    /// The source returned a path that is not a directory.
    InvalidDir,
    /// Recording the remote snapshot in the metadata store failed.
    Store,
}

impl FallbackReason {
    /// Every reason, in a fixed order.
    pub const ALL: [FallbackReason; 6] = [
        FallbackReason::NoLayerDigest,
        FallbackReason::NotAvailable,
        FallbackReason::RemoteError,
        FallbackReason::RemotePanic,
        FallbackReason::InvalidDir,
        FallbackReason::Store,
    ];

    /// A stable snake_case name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            FallbackReason::NoLayerDigest => "no_layer_digest",
            FallbackReason::NotAvailable => "not_available",
            FallbackReason::RemoteError => "remote_error",
            FallbackReason::RemotePanic => "remote_panic",
            FallbackReason::InvalidDir => "invalid_dir",
            FallbackReason::Store => "store",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for FallbackReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Fallback counts by reason.
#[derive(Debug, Default)]
pub(crate) struct FallbackCounters([AtomicU64; FallbackReason::ALL.len()]);

impl FallbackCounters {
    pub fn count(&self, reason: FallbackReason) {
        self.0[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, reason: FallbackReason) -> u64 {
        self.0[reason.index()].load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn labels_without_target_are_not_remote() {
        let l = labels(&[(labels::CRI_LAYER_DIGEST, "sha256:aa")]);
        assert_eq!(RemoteLayer::from_labels(None, &l), Err(NotRemote::NoTarget));
    }

    #[test]
    fn target_without_digest_is_not_remote() {
        let l = labels(&[(labels::SNAPSHOT_REF, "sha256:chain")]);
        assert_eq!(
            RemoteLayer::from_labels(None, &l),
            Err(NotRemote::NoLayerDigest)
        );
    }

    #[test]
    fn cri_labels_make_a_request() {
        let l = labels(&[
            (labels::SNAPSHOT_REF, "sha256:chain"),
            (labels::CRI_LAYER_DIGEST, "sha256:layer"),
            (labels::CRI_IMAGE_REF, "reg/img:1"),
        ]);
        let r = RemoteLayer::from_labels(Some("p"), &l).expect("remote request");
        assert_eq!(r.target, "sha256:chain");
        assert_eq!(r.layer_digest, "sha256:layer");
        assert_eq!(r.image_ref.as_deref(), Some("reg/img:1"));
        assert_eq!(r.manifest_digest, None);
        assert_eq!(r.parent.as_deref(), Some("p"));
    }

    #[test]
    fn reasons_have_distinct_counter_slots() {
        let c = FallbackCounters::default();
        for (i, r) in FallbackReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
            c.count(*r);
        }
        assert!(FallbackReason::ALL.iter().all(|r| c.get(*r) == 1));
    }
}
