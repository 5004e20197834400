//! A content-addressed store on local disk: `blobs/sha256/<hex>` written atomically (temp file,
//! fsync, rename), a zTOC index keyed by (layer digest, span size), and per-image records.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Digest, Error, Result};

/// The store directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

fn io_err<'a>(path: &'a Path, action: &'static str) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Store {
        path: path.display().to_string(),
        action,
        source,
    }
}

impl Store {
    /// A store at `root`. Nothing is created until the first write, so a failed run leaves
    /// nothing behind.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        Ok(Self { root: root.into() })
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.hex())
    }

    /// Write `bytes` to `path` atomically: readers see the old content or the whole new one.
    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        let tmp = self.root.join("tmp").join(format!(
            "{}.{}.{:?}",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("blob"),
            std::process::id(),
            std::thread::current().id()
        ));
        let result = (|| {
            fs::create_dir_all(self.root.join("tmp"))?;
            let mut f = File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent)?;
            }
            fs::rename(&tmp, path)?;
            if let Some(parent) = path.parent() {
                File::open(parent)?.sync_all()?;
            }
            Ok(())
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map_err(io_err(path, "write atomically"))
    }

    /// Store a blob; returns its digest. Idempotent.
    pub fn put_blob(&self, bytes: &[u8]) -> Result<Digest> {
        let digest = Digest::of(bytes);
        let path = self.blob_path(&digest);
        if !path.exists() {
            self.write_atomic(&path, bytes)?;
        }
        Ok(digest)
    }

    /// A stored blob, verified against its digest (`None` if absent or damaged).
    pub fn get_blob(&self, digest: &Digest) -> Result<Option<Vec<u8>>> {
        let path = self.blob_path(digest);
        match fs::read(&path) {
            Ok(bytes) if Digest::of(&bytes) == *digest => Ok(Some(bytes)),
            Ok(_) => {
                tracing::warn!(path = %path.display(), "stored blob is damaged; ignoring it");
                Ok(None)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path, "read blob")(e)),
        }
    }

    /// Whether a blob is stored.
    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).exists()
    }

    fn layer_path(&self, layer: &Digest, span_size: u64) -> PathBuf {
        self.root
            .join("layers")
            .join(layer.hex())
            .join(format!("ztoc-{span_size}"))
    }

    /// The zTOC stored for a layer and span size.
    pub fn ztoc_for_layer(&self, layer: &Digest, span_size: u64) -> Result<Option<Digest>> {
        let path = self.layer_path(layer, span_size);
        match fs::read_to_string(&path) {
            Ok(s) => {
                let d = Digest::parse(s.trim())?;
                Ok(self.has_blob(&d).then_some(d))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path, "read layer record")(e)),
        }
    }

    /// Any stored zTOC for a layer (the smallest span size first), e.g. for a node that did not
    /// choose the span size.
    pub fn any_ztoc_for_layer(&self, layer: &Digest) -> Result<Option<Digest>> {
        let dir = self.root.join("layers").join(layer.hex());
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&dir, "list layer records")(e)),
        };
        let mut spans: Vec<u64> = entries
            .filter_map(|e| {
                e.ok()?
                    .file_name()
                    .to_str()?
                    .strip_prefix("ztoc-")?
                    .parse()
                    .ok()
            })
            .collect();
        spans.sort_unstable();
        for span in spans {
            if let Some(d) = self.ztoc_for_layer(layer, span)? {
                return Ok(Some(d));
            }
        }
        Ok(None)
    }

    /// Record the zTOC built for a layer and span size (the zTOC blob must be stored first).
    pub fn set_ztoc_for_layer(&self, layer: &Digest, span_size: u64, ztoc: &Digest) -> Result<()> {
        self.write_atomic(&self.layer_path(layer, span_size), ztoc.as_str().as_bytes())
    }

    /// Save an image record under its manifest digest.
    pub fn put_image(&self, record: &ImageRecord) -> Result<()> {
        let path = self
            .root
            .join("images")
            .join(format!("{}.json", record.manifest_digest.hex()));
        let json = serde_json::to_vec_pretty(record).unwrap_or_default();
        self.write_atomic(&path, &json)
    }

    /// All image records, newest first.
    pub fn images(&self) -> Result<Vec<ImageRecord>> {
        let dir = self.root.join("images");
        let mut out = Vec::new();
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io_err(&dir, "list images")(e)),
        };
        for entry in entries {
            let path = entry.map_err(io_err(&dir, "list images"))?.path();
            if path.extension().is_some_and(|e| e == "json")
                && let Ok(bytes) = fs::read(&path)
                && let Ok(record) = serde_json::from_slice::<ImageRecord>(&bytes)
            {
                out.push(record);
            }
        }
        out.sort_by_key(|r| std::cmp::Reverse(r.built_at_unix));
        Ok(out)
    }
}

/// What an index build found for one image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageRecord {
    /// The reference as given.
    pub reference: String,
    /// The platform-specific manifest digest.
    pub manifest_digest: Digest,
    /// Platform, when chosen from an index.
    pub platform: Option<String>,
    /// Span size used.
    pub span_size: u64,
    /// Per layer, in image order.
    pub layers: Vec<LayerRecord>,
    /// The SOCI index manifest built for the image (v2 form), if any layer was indexed.
    pub soci_index: Option<Digest>,
    /// When (Unix seconds).
    pub built_at_unix: u64,
}

/// One layer's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LayerRecord {
    /// Layer digest.
    pub digest: Digest,
    /// Layer media type.
    pub media_type: String,
    /// Compressed size.
    pub size: u64,
    /// Indexed or skipped.
    pub outcome: LayerOutcome,
}

/// Whether and how a layer was indexed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "status")]
pub enum LayerOutcome {
    /// A zTOC exists.
    Indexed {
        /// zTOC digest.
        ztoc: Digest,
        /// zTOC size.
        ztoc_size: u64,
        /// Spans.
        spans: u32,
        /// Tar entries.
        entries: u64,
        /// Build time (0 when reused).
        seconds: f64,
        /// True if an earlier build was reused (the layer was not read).
        reused: bool,
        /// False for zstd zTOCs (Hermes-only).
        soci_compatible: bool,
    },
    /// No zTOC, and why.
    Skipped {
        /// Human-readable reason.
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_and_layer_records_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let d = store.put_blob(b"hello").unwrap();
        assert_eq!(store.get_blob(&d).unwrap().as_deref(), Some(&b"hello"[..]));
        let layer = Digest::of(b"layer");
        assert_eq!(store.ztoc_for_layer(&layer, 4096).unwrap(), None);
        store.set_ztoc_for_layer(&layer, 4096, &d).unwrap();
        assert_eq!(store.ztoc_for_layer(&layer, 4096).unwrap(), Some(d.clone()));
        assert_eq!(
            store.ztoc_for_layer(&layer, 8192).unwrap(),
            None,
            "span size is part of the key"
        );
        // A damaged blob is not served.
        fs::write(dir.path().join("blobs/sha256").join(d.hex()), b"jello").unwrap();
        assert_eq!(store.get_blob(&d).unwrap(), None);
        assert!(
            fs::read_dir(dir.path().join("tmp"))
                .unwrap()
                .next()
                .is_none(),
            "no temp files left"
        );
    }
}
