//! A content-addressed store on local disk: `blobs/sha256/<hex>` written atomically (temp file,
//! fsync, rename), a zTOC index keyed by (layer digest, span size), markers for layers that cannot
//! be indexed, and per-image records.
//!
//! Layout: `blobs/sha256/<hex>`, `layers/<layer hex>/ztoc-<span>` (the zTOC's digest),
//! `layers/<layer hex>/unindexable-<span>` (why not), `images/<manifest hex>.json`, `tmp/`.
//!
//! Every write is atomic (a reader sees the old file or the whole new one) and every delete is
//! one `unlink`, so a process killed at any point leaves a consistent store: at worst a temp file
//! or a blob nothing refers to, both removed by [`Store::sweep`].

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::{Digest, Error, Result};
pub use hermes_oci_types::{ImageRecord, LayerOutcome, LayerRecord};

/// The store directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// What the store holds for one (layer, span size).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerArtifact {
    /// A zTOC blob.
    Ztoc(Digest),
    /// The layer cannot be indexed with this span size, and why.
    Unindexable(String),
}

/// One entry of [`Store::layers`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredLayer {
    /// The layer digest.
    pub layer: Digest,
    /// The span size the entry is for.
    pub span_size: u64,
    /// What is stored.
    pub artifact: LayerArtifact,
}

/// What [`Store::sweep`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepSummary {
    /// Blobs no layer entry or image record refers to.
    pub blobs: usize,
    /// Their bytes.
    pub bytes: u64,
    /// Temp files left by interrupted writes.
    pub temp_files: usize,
}

fn io_err<'a>(path: &'a Path, action: &'static str) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Store {
        path: path.display().to_string(),
        action,
        source,
    }
}

/// A blob being written to the store ([`Store::blob_writer`]).
#[derive(Debug)]
pub struct BlobWriter {
    store: Store,
    /// Created at the first write, so a long build that writes its blob at the end does not
    /// leave an old temp file for [`Store::sweep`] to take meanwhile.
    file: Option<std::io::BufWriter<File>>,
    hasher: crate::Hasher,
    path: PathBuf,
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file()?.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.as_mut().map_or(Ok(()), Write::flush)
    }
}

impl BlobWriter {
    fn file(&mut self) -> std::io::Result<&mut std::io::BufWriter<File>> {
        if self.file.is_none() {
            let file = File::create(&self.path)?;
            self.file = Some(std::io::BufWriter::with_capacity(256 << 10, file));
        }
        Ok(self.file.as_mut().expect("just created"))
    }

    /// Sync the bytes written and store them under their digest (a blob already stored is
    /// kept as it is).
    pub fn commit(mut self) -> Result<Digest> {
        let path = self.path.clone();
        self.file().map_err(io_err(&path, "create temp blob"))?;
        let file = self.file.take().expect("created above");
        let file = file
            .into_inner()
            .map_err(|e| io_err(&path, "write temp blob")(e.into_error()))?;
        file.sync_all().map_err(io_err(&path, "sync temp blob"))?;
        drop(file);
        let digest = std::mem::take(&mut self.hasher).finish();
        let dest = self.store.blob_path(&digest);
        if dest.exists() {
            return Ok(digest);
        }
        install(&path, &dest).map_err(io_err(&dest, "store blob"))?;
        Ok(digest)
    }
}

/// Move a synced temp file to `dest` (creating its directory) and sync the directory, so the
/// file is there whole after a crash or not at all.
fn install(tmp: &Path, dest: &Path) -> std::io::Result<()> {
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::rename(tmp, dest)?;
    if let Some(parent) = dest.parent() {
        File::open(parent)?.sync_all()?;
    }
    Ok(())
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        // Committed blobs were renamed away; anything else is an abandoned write.
        let _ = fs::remove_file(&self.path);
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
            install(&tmp, path)
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

    /// A writer for a blob too large to build in memory: bytes go to a temp file and are hashed
    /// on the way; [`BlobWriter::commit`] stores the blob under its digest. Dropped without a
    /// commit, it leaves nothing behind.
    pub fn blob_writer(&self) -> Result<BlobWriter> {
        let dir = self.tmp_dir()?;
        let path = dir.join(format!(
            "blob.{}.{:?}.{}",
            std::process::id(),
            std::thread::current().id(),
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        Ok(BlobWriter {
            store: self.clone(),
            file: None,
            hasher: crate::Hasher::new(),
            path,
        })
    }

    /// The store's directory for temporary files (created if missing), e.g. a builder's spill
    /// files.
    pub fn tmp_dir(&self) -> Result<PathBuf> {
        let dir = self.root.join("tmp");
        fs::create_dir_all(&dir).map_err(io_err(&dir, "create temp dir"))?;
        Ok(dir)
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

    /// Put a stored blob at `to` as well, as a hard link (no copy; the blob was written with a
    /// sync, and stores never rewrite a file in place). Replaces whatever `to` was. A link shares
    /// the blob's mode, so a blob that other users could read (stored by another process under
    /// a loose umask) is made private to its owner first. Fails if the blob is missing or `to`
    /// is on another filesystem: callers then write a copy.
    pub fn link_blob(&self, digest: &Digest, to: &Path) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let from = self.blob_path(digest);
        let tmp = to.with_extension("link");
        let _ = fs::remove_file(&tmp);
        let result = fs::metadata(&from)
            .and_then(|meta| {
                let mode = meta.permissions().mode() & 0o7777;
                if mode & 0o077 == 0 {
                    return Ok(());
                }
                fs::set_permissions(&from, fs::Permissions::from_mode(mode & 0o700))
            })
            .and_then(|()| fs::hard_link(&from, &tmp))
            .and_then(|()| fs::rename(&tmp, to));
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map_err(io_err(to, "link blob"))
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

    fn unindexable_path(&self, layer: &Digest, span_size: u64) -> PathBuf {
        self.root
            .join("layers")
            .join(layer.hex())
            .join(format!("unindexable-{span_size}"))
    }

    /// Record that a layer cannot be indexed with this span size (e.g. a single-frame zstd
    /// layer), so it is not read again.
    pub fn set_unindexable(&self, layer: &Digest, span_size: u64, reason: &str) -> Result<()> {
        self.write_atomic(&self.unindexable_path(layer, span_size), reason.as_bytes())
    }

    /// Why a layer cannot be indexed with this span size, if that was recorded.
    pub fn unindexable(&self, layer: &Digest, span_size: u64) -> Result<Option<String>> {
        let path = self.unindexable_path(layer, span_size);
        match fs::read_to_string(&path) {
            Ok(reason) => Ok(Some(reason)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path, "read layer marker")(e)),
        }
    }

    /// Every layer entry: zTOCs (whose blob is present) and unindexable markers, ordered by
    /// layer digest and span size.
    pub fn layers(&self) -> Result<Vec<StoredLayer>> {
        let dir = self.root.join("layers");
        let mut out = Vec::new();
        for layer_dir in read_dir_names(&dir)? {
            let Ok(layer) = Digest::parse(&format!("sha256:{layer_dir}")) else {
                continue;
            };
            let sub = dir.join(&layer_dir);
            for name in read_dir_names(&sub)? {
                if let Some(span) = name.strip_prefix("ztoc-").and_then(|s| s.parse().ok()) {
                    if let Some(ztoc) = self.ztoc_for_layer(&layer, span)? {
                        out.push(StoredLayer {
                            layer: layer.clone(),
                            span_size: span,
                            artifact: LayerArtifact::Ztoc(ztoc),
                        });
                    }
                } else if let Some(span) = name
                    .strip_prefix("unindexable-")
                    .and_then(|s| s.parse().ok())
                {
                    let path = sub.join(&name);
                    match fs::read_to_string(&path) {
                        Ok(reason) => out.push(StoredLayer {
                            layer: layer.clone(),
                            span_size: span,
                            artifact: LayerArtifact::Unindexable(reason),
                        }),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(io_err(&path, "read layer marker")(e)),
                    }
                }
            }
        }
        out.sort_by(|a, b| (&a.layer, a.span_size).cmp(&(&b.layer, b.span_size)));
        Ok(out)
    }

    /// Forget the zTOC (and any unindexable marker) of a layer and span size. The zTOC blob
    /// stays until [`Store::sweep`] finds nothing refers to it. Absent entries are fine.
    pub fn delete_layer(&self, layer: &Digest, span_size: u64) -> Result<()> {
        for path in [
            self.layer_path(layer, span_size),
            self.unindexable_path(layer, span_size),
        ] {
            remove_if_present(&path)?;
        }
        // The layer's directory goes once empty; a concurrent writer recreates it.
        let _ = fs::remove_dir(self.root.join("layers").join(layer.hex()));
        Ok(())
    }

    /// Delete an image record. Absent records are fine.
    pub fn delete_image(&self, manifest: &Digest) -> Result<()> {
        remove_if_present(&self.image_path(manifest))
    }

    /// Remove blobs that no layer entry or image record refers to, and temp files, once they are
    /// older than `min_age` (a blob is written before the entry that refers to it, so a younger
    /// one may be about to be referenced).
    pub fn sweep(&self, min_age: Duration) -> Result<SweepSummary> {
        let mut keep = std::collections::BTreeSet::new();
        for entry in self.layers()? {
            if let LayerArtifact::Ztoc(d) = entry.artifact {
                keep.insert(d);
            }
        }
        for record in self.images()? {
            keep.extend(record.soci_index.clone());
            for layer in &record.layers {
                if let LayerOutcome::Indexed { ztoc, .. } = &layer.outcome {
                    keep.insert(ztoc.clone());
                }
            }
        }
        let now = SystemTime::now();
        let old_enough = |path: &Path| {
            fs::symlink_metadata(path)
                .ok()
                .and_then(|m| m.modified().ok())
                .is_some_and(|t| now.duration_since(t).unwrap_or_default() >= min_age)
        };
        let mut summary = SweepSummary::default();
        let blobs = self.root.join("blobs/sha256");
        for name in read_dir_names(&blobs)? {
            let path = blobs.join(&name);
            let referenced =
                Digest::parse(&format!("sha256:{name}")).is_ok_and(|d| keep.contains(&d));
            if referenced || !old_enough(&path) {
                continue;
            }
            let size = fs::symlink_metadata(&path).map_or(0, |m| m.len());
            remove_if_present(&path)?;
            summary.blobs += 1;
            summary.bytes += size;
        }
        let tmp = self.root.join("tmp");
        for name in read_dir_names(&tmp)? {
            let path = tmp.join(&name);
            if old_enough(&path) {
                remove_if_present(&path)?;
                summary.temp_files += 1;
            }
        }
        Ok(summary)
    }

    fn image_path(&self, manifest: &Digest) -> PathBuf {
        self.root
            .join("images")
            .join(format!("{}.json", manifest.hex()))
    }

    /// Save an image record under its manifest digest; returns it as stored. Records are keyed
    /// by manifest, not by name: the names a stored record for the manifest has and `record`
    /// lacks are kept as its aliases, so indexing an image under a second name (another tag,
    /// registry mirror or digest reference) does not make the first one unknown.
    pub fn put_image(&self, record: &ImageRecord) -> Result<ImageRecord> {
        let mut record = record.clone();
        if let Some(stored) = self.image(&record.manifest_digest)? {
            // Oldest first: the stored aliases, then the name it was stored under.
            for name in stored.aliases.iter().chain([&stored.reference]) {
                if !record.is_named(name) {
                    record.aliases.push(name.clone());
                }
            }
        }
        let path = self.image_path(&record.manifest_digest);
        let json = serde_json::to_vec_pretty(&record).unwrap_or_default();
        self.write_atomic(&path, &json)?;
        Ok(record)
    }

    /// The record of one manifest, if stored (and readable).
    pub fn image(&self, manifest: &Digest) -> Result<Option<ImageRecord>> {
        let path = self.image_path(manifest);
        match fs::read(&path) {
            Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path, "read image record")(e)),
        }
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

/// Names in a directory (none if it does not exist).
fn read_dir_names(dir: &Path) -> Result<Vec<String>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(dir, "list directory")(e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err(dir, "list directory"))?;
        if let Some(name) = entry.file_name().to_str() {
            names.push(name.to_owned());
        }
    }
    names.sort();
    Ok(names)
}

fn remove_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(path, "delete")(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_streamed_blob_is_stored_under_its_digest_and_an_abandoned_one_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut w = store.blob_writer().unwrap();
        for chunk in [&b"hello "[..], b"streamed ", b"world"] {
            w.write_all(chunk).unwrap();
        }
        let d = w.commit().unwrap();
        assert_eq!(d, Digest::of(b"hello streamed world"));
        assert_eq!(
            store.get_blob(&d).unwrap().as_deref(),
            Some(&b"hello streamed world"[..])
        );
        // The same bytes again: the stored blob is kept.
        let mut again = store.blob_writer().unwrap();
        again.write_all(b"hello streamed world").unwrap();
        assert_eq!(again.commit().unwrap(), d);
        let mut abandoned = store.blob_writer().unwrap();
        abandoned.write_all(b"half a zTOC").unwrap();
        drop(abandoned);
        let left: Vec<_> = fs::read_dir(store.tmp_dir().unwrap())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(left.is_empty(), "temp files left: {left:?}");
        assert!(!store.has_blob(&Digest::of(b"half a zTOC")));
        // Nothing is on disk before the first write (a sweep has nothing to take), and an
        // empty blob still commits.
        let waiting = store.blob_writer().unwrap();
        assert_eq!(fs::read_dir(store.tmp_dir().unwrap()).unwrap().count(), 0);
        assert_eq!(waiting.commit().unwrap(), Digest::of(b""));
    }

    #[test]
    fn a_linked_blob_shares_the_stored_file_and_replaces_what_was_there() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("store")).unwrap();
        let d = store.put_blob(b"a zTOC").unwrap();
        // Stored by another process under umask 022.
        fs::set_permissions(store.blob_path(&d), fs::Permissions::from_mode(0o644)).unwrap();
        let to = dir.path().join("ztoc");
        fs::write(&to, b"an older zTOC").unwrap();
        store.link_blob(&d, &to).unwrap();
        assert_eq!(fs::read(&to).unwrap(), b"a zTOC");
        let stored = fs::metadata(store.blob_path(&d)).unwrap();
        assert_eq!(
            fs::metadata(&to).unwrap().ino(),
            stored.ino(),
            "a copy, not a link"
        );
        assert_eq!(
            stored.mode() & 0o7777,
            0o600,
            "the link is readable by others"
        );
        // Deleting the link leaves the store's blob.
        fs::remove_file(&to).unwrap();
        assert_eq!(store.get_blob(&d).unwrap().as_deref(), Some(&b"a zTOC"[..]));
        // A missing blob is an error, and leaves nothing at the target.
        let missing = Digest::of(b"never stored");
        assert!(store.link_blob(&missing, &to).is_err());
        assert!(!to.exists());
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "only the store is left"
        );
    }

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

    fn record(manifest: &Digest, ztoc: &Digest, soci_index: Option<Digest>) -> ImageRecord {
        ImageRecord {
            reference: "registry.test/app:v1".into(),
            aliases: Vec::new(),
            manifest_digest: manifest.clone(),
            platform: None,
            span_size: 4096,
            layers: vec![LayerRecord {
                digest: Digest::of(b"layer a"),
                media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
                size: 1,
                outcome: LayerOutcome::Indexed {
                    ztoc: ztoc.clone(),
                    ztoc_size: 1,
                    spans: 1,
                    entries: 1,
                    seconds: 0.0,
                    reused: false,
                    soci_compatible: true,
                    span_size: 4096,
                },
            }],
            soci_index,
            built_at_unix: 1,
        }
    }

    #[test]
    fn layers_are_listed_and_deleted_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            store.layers().unwrap(),
            vec![],
            "an empty store lists nothing"
        );
        let (a, b) = (Digest::of(b"layer a"), Digest::of(b"layer b"));
        let za = store.put_blob(b"ztoc a").unwrap();
        store.set_ztoc_for_layer(&a, 4096, &za).unwrap();
        store.set_ztoc_for_layer(&a, 8192, &za).unwrap();
        store
            .set_unindexable(&b, 4096, "single-frame zstd")
            .unwrap();
        assert_eq!(
            store.unindexable(&b, 4096).unwrap().as_deref(),
            Some("single-frame zstd")
        );
        assert_eq!(store.unindexable(&a, 4096).unwrap(), None);
        // A pointer to a missing blob is not listed (nothing to serve).
        store
            .set_ztoc_for_layer(&b, 8192, &Digest::of(b"gone"))
            .unwrap();
        let mut want = vec![
            StoredLayer {
                layer: a.clone(),
                span_size: 4096,
                artifact: LayerArtifact::Ztoc(za.clone()),
            },
            StoredLayer {
                layer: a.clone(),
                span_size: 8192,
                artifact: LayerArtifact::Ztoc(za.clone()),
            },
            StoredLayer {
                layer: b.clone(),
                span_size: 4096,
                artifact: LayerArtifact::Unindexable("single-frame zstd".into()),
            },
        ];
        want.sort_by(|x, y| (&x.layer, x.span_size).cmp(&(&y.layer, y.span_size)));
        assert_eq!(store.layers().unwrap(), want);

        store.delete_layer(&a, 4096).unwrap();
        store.delete_layer(&a, 4096).unwrap(); // twice is fine
        assert_eq!(store.ztoc_for_layer(&a, 4096).unwrap(), None);
        assert_eq!(store.ztoc_for_layer(&a, 8192).unwrap(), Some(za.clone()));
        store.delete_layer(&a, 8192).unwrap();
        store.delete_layer(&b, 4096).unwrap();
        store.delete_layer(&b, 8192).unwrap();
        assert_eq!(store.layers().unwrap(), vec![]);
        assert!(
            !dir.path().join("layers").join(a.hex()).exists(),
            "empty layer directories go"
        );
        assert!(store.has_blob(&za), "blobs stay until a sweep");
    }

    #[test]
    fn a_second_name_for_a_manifest_keeps_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (m, z) = (Digest::of(b"m"), Digest::of(b"z"));
        let first = record(&m, &z, None);
        assert_eq!(store.put_image(&first).unwrap(), first, "nothing to merge");
        let second = ImageRecord {
            reference: "mirror.test/app:latest".into(),
            ..first.clone()
        };
        let stored = store.put_image(&second).unwrap();
        assert_eq!(stored.reference, "mirror.test/app:latest");
        assert_eq!(stored.aliases, vec!["registry.test/app:v1".to_owned()]);
        assert_eq!(store.images().unwrap(), vec![stored.clone()]);
        // Indexing again under a known name adds nothing.
        let again = store.put_image(&first).unwrap();
        assert_eq!(again.reference, "registry.test/app:v1");
        assert_eq!(again.aliases, vec!["mirror.test/app:latest".to_owned()]);
        assert!(again.is_named("registry.test/app:v1") && again.is_named("mirror.test/app:latest"));
    }

    #[test]
    fn images_are_deleted_by_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (m1, m2) = (Digest::of(b"m1"), Digest::of(b"m2"));
        let z = Digest::of(b"z");
        store.put_image(&record(&m1, &z, None)).unwrap();
        store.put_image(&record(&m2, &z, None)).unwrap();
        store.delete_image(&m1).unwrap();
        store.delete_image(&m1).unwrap();
        let left: Vec<Digest> = store
            .images()
            .unwrap()
            .into_iter()
            .map(|r| r.manifest_digest)
            .collect();
        assert_eq!(left, vec![m2]);
    }

    #[test]
    fn sweep_removes_only_old_unreferenced_blobs_and_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let layer = Digest::of(b"layer a");
        let by_layer = store.put_blob(b"ztoc by layer entry").unwrap();
        store.set_ztoc_for_layer(&layer, 4096, &by_layer).unwrap();
        let by_record = store.put_blob(b"ztoc by image record").unwrap();
        let index = store.put_blob(b"soci index").unwrap();
        store
            .put_image(&record(&Digest::of(b"m"), &by_record, Some(index.clone())))
            .unwrap();
        let orphan = store.put_blob(b"orphan").unwrap();
        // A temp file an interrupted write left behind.
        fs::write(dir.path().join("tmp/blob.1.ThreadId(1)"), b"partial").unwrap();

        let young = store.sweep(Duration::from_secs(3600)).unwrap();
        assert_eq!(young, SweepSummary::default(), "nothing old enough yet");
        assert!(store.has_blob(&orphan));

        let swept = store.sweep(Duration::ZERO).unwrap();
        assert_eq!(
            swept,
            SweepSummary {
                blobs: 1,
                bytes: 6,
                temp_files: 1
            }
        );
        assert!(!store.has_blob(&orphan));
        for kept in [&by_layer, &by_record, &index] {
            assert!(store.get_blob(kept).unwrap().is_some(), "{kept} was kept");
        }
        // Once the layer entry is gone its zTOC is swept too.
        store.delete_layer(&layer, 4096).unwrap();
        assert_eq!(store.sweep(Duration::ZERO).unwrap().blobs, 1);
        assert!(!store.has_blob(&by_layer));
    }
}
