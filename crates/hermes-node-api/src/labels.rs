//! containerd label names Hermes reads and writes, in one place: the CRI labels a remote
//! snapshotter gets on `Prepare` (which layer of which image is being unpacked), the content
//! and garbage-collection labels a pull sets. The names are containerd's; a typo in one would
//! silently turn lazy starts or garbage collection off, so nobody spells them twice.

/// Snapshot label: the name the snapshot gets once the layer is unpacked (its chain ID).
pub const SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";
/// CRI snapshot label: the image reference being pulled.
pub const CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
/// CRI snapshot label: the image manifest digest.
pub const CRI_MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";
/// CRI snapshot label: the digest of the compressed layer blob.
pub const CRI_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
/// CRI snapshot label: this and the following layers' digests, comma-separated, as many as fit.
pub const CRI_IMAGE_LAYERS: &str = "containerd.io/snapshot/cri.image-layers";
/// Content label: the diff ID of a layer blob once it has been applied.
pub const UNCOMPRESSED: &str = "containerd.io/uncompressed";
/// Lease label: the time (RFC 3339) after which containerd's GC may remove the lease.
pub const GC_EXPIRE: &str = "containerd.io/gc.expire";
/// Content label of a manifest: keeps the image config from garbage collection.
pub const GC_REF_CONTENT_CONFIG: &str = "containerd.io/gc.ref.content.config";

/// Content label of a manifest: keeps its `i`th layer blob from garbage collection.
pub fn gc_ref_content_layer(i: usize) -> String {
    format!("containerd.io/gc.ref.content.l.{i}")
}

/// Content label of an index: keeps its `i`th manifest from garbage collection.
pub fn gc_ref_content_manifest(i: usize) -> String {
    format!("containerd.io/gc.ref.content.m.{i}")
}

/// Content label of a config: keeps the top snapshot of `snapshotter` from garbage collection.
pub fn gc_ref_snapshot(snapshotter: &str) -> String {
    format!("containerd.io/gc.ref.snapshot.{snapshotter}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexed_gc_labels_follow_containerds_scheme() {
        assert_eq!(gc_ref_content_layer(2), "containerd.io/gc.ref.content.l.2");
        assert_eq!(
            gc_ref_content_manifest(0),
            "containerd.io/gc.ref.content.m.0"
        );
        assert_eq!(
            gc_ref_snapshot("hermes"),
            "containerd.io/gc.ref.snapshot.hermes"
        );
    }
}
