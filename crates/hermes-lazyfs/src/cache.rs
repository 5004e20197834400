//! The on-disk span cache of one layer.
//!
//! A directory per layer holds:
//! - `data`: a sparse file of the layer's tar bytes; each decoded span is written at its
//!   uncompressed offset, so a cached read is one `pread`;
//! - `spans`: which spans `data` holds (a bitmap behind a header naming the zTOC it belongs
//!   to), replaced atomically (temp file, fsync, rename) after the spans' bytes are synced, so
//!   a bit is only ever set for bytes that are on disk;
//! - `verified`: present once the whole blob was checked against the layer digest;
//! - `files/`, `copied`: per-file copies of a fully local layer for FUSE passthrough
//!   ([`crate::local`]); once `copied` says `moved`, `data` no longer holds the regular files'
//!   bytes (their ranges are punched out, so the layer is on disk once) and reading them from
//!   here fails instead of returning zeros.
//!
//! Durability is batched off the read path: [`SpanCache::store`] only writes the bytes and
//! marks the spans present in memory (this process reads them back from the page cache); a
//! flusher thread syncs the data, then persists a bitmap snapshot taken before that sync, at
//! most every [`FLUSH_INTERVAL`], and once more when the cache is dropped. Every store used to
//! pay `fdatasync`, a temp-file `fsync`, a rename and a directory `fsync` on the reading thread;
//! a crash now loses at most the spans of the last interval, never serves wrong bytes.
//!
//! A cache written for a different zTOC (other span layout or digests) is discarded on open.
//! Bytes are verified before they are stored; the cache trusts the local disk. It does not
//! evict or bound its size: that belongs to whoever owns the cache directories.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use hermes_ztoc::{Span, SpanId, Ztoc};
use sha2::{Digest, Sha256};

use crate::{Error, Result};

pub(crate) const DATA_FILE: &str = "data";
const BITMAP_FILE: &str = "spans";
const VERIFIED_FILE: &str = "verified";
/// `<key> moved|kept`: every per-file copy is complete and synced; `moved`: their bytes were
/// punched out of `data`.
const COPIED_FILE: &str = "copied";
const MAGIC: &[u8; 8] = b"HRMSPAN1";
const HEADER_LEN: usize = MAGIC.len() + 4 + 32;

/// Longest time a stored span waits before the flusher makes it durable.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// Decoded spans of one layer on local disk, with a persisted record of which are present.
#[derive(Debug)]
pub struct SpanCache {
    shared: Arc<Shared>,
    flusher: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    data: File,
    span_count: u32,
    key: [u8; 32],
    flush_interval: Duration,
    /// Spans whose bytes are written (in the page cache at least): what reads may use.
    present: Mutex<Vec<u8>>,
    /// What `copied` recorded: `None`, or whether the files' bytes were moved out of `data`.
    copied: Mutex<Option<bool>>,
    /// The bitmap as the file on disk has it; its lock serializes flushes.
    persisted: Mutex<Vec<u8>>,
    flush: Mutex<FlushState>,
    flush_wanted: Condvar,
}

#[derive(Debug, Default)]
struct FlushState {
    /// Spans were stored since the flusher last looked.
    dirty: bool,
    stop: bool,
}

impl SpanCache {
    /// Open (or create) the cache for `ztoc`'s layer in `dir`. Spans recorded by an earlier
    /// process are kept when the cache was written for the same zTOC, else the cache starts empty.
    pub fn open(dir: &Path, ztoc: &Ztoc) -> Result<Self> {
        Self::open_with_flush_interval(dir, ztoc, FLUSH_INTERVAL)
    }

    /// [`SpanCache::open`], with stored spans made durable at most every `interval` instead of
    /// [`FLUSH_INTERVAL`] (and on [`SpanCache::flush`] and drop).
    pub fn open_with_flush_interval(dir: &Path, ztoc: &Ztoc, interval: Duration) -> Result<Self> {
        let err = |path: &Path, what| {
            let path = path.to_owned();
            move |source| Error::Cache { path, what, source }
        };
        // Decompressed bytes of possibly private images: owner only, whatever the umask.
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(err(dir, "creating the directory"))?;
        let data_path = dir.join(DATA_FILE);
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&data_path)
            .map_err(err(&data_path, "opening"))?;
        let span_count = ztoc.span_count();
        let key = layer_key(ztoc);
        let bitmap_path = dir.join(BITMAP_FILE);
        let stored = match fs::read(&bitmap_path) {
            Ok(bytes) => Some(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(err(&bitmap_path, "reading")(e)),
        };
        let bitmap_len = (span_count as usize).div_ceil(8);
        let present = match stored {
            Some(bytes)
                if bytes.len() == HEADER_LEN + bitmap_len
                    && bytes[..HEADER_LEN] == header(span_count, &key) =>
            {
                bytes[HEADER_LEN..].to_vec()
            }
            stored => {
                if stored.is_some() {
                    tracing::warn!(dir = %dir.display(), "span cache belongs to another zTOC; starting empty");
                }
                data.set_len(0).map_err(err(&data_path, "truncating"))?;
                remove_if_present(&dir.join(VERIFIED_FILE))?;
                remove_if_present(&bitmap_path)?;
                remove_if_present(&dir.join(COPIED_FILE))?;
                remove_dir_if_present(&dir.join(crate::local::FILES_DIR))?;
                vec![0; bitmap_len]
            }
        };
        let size = ztoc.spans().map(|s| s.uncompressed.end).max().unwrap_or(0);
        let len = data.metadata().map_err(err(&data_path, "stat"))?.len();
        if len < size {
            data.set_len(size).map_err(err(&data_path, "sizing"))?;
        }
        let copied = fs::read_to_string(dir.join(COPIED_FILE))
            .ok()
            .and_then(|text| match text.trim_end().split_once(' ') {
                Some((k, "moved")) if k == hex(&key) => Some(true),
                Some((k, "kept")) if k == hex(&key) => Some(false),
                _ => None,
            });
        let shared = Arc::new(Shared {
            dir: dir.to_owned(),
            data,
            span_count,
            key,
            flush_interval: interval,
            persisted: Mutex::new(present.clone()),
            present: Mutex::new(present),
            copied: Mutex::new(copied),
            flush: Mutex::new(FlushState::default()),
            flush_wanted: Condvar::new(),
        });
        let flusher = std::thread::Builder::new()
            .name("hermes-cache-flush".into())
            .spawn({
                let shared = Arc::clone(&shared);
                move || shared.flush_loop()
            })
            .map_err(|source| Error::Thread {
                what: "span cache flush",
                source,
            })?;
        Ok(Self {
            shared,
            flusher: Some(flusher),
        })
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Number of spans of the layer.
    pub fn span_count(&self) -> u32 {
        self.shared.span_count
    }

    /// Whether span `id` is cached.
    pub fn contains(&self, id: SpanId) -> bool {
        let bitmap = self.shared.bitmap();
        bit(&bitmap, id)
    }

    /// Number of cached spans.
    pub fn present_count(&self) -> u32 {
        self.shared.bitmap().iter().map(|b| b.count_ones()).sum()
    }

    /// Whether every span is cached.
    pub fn is_complete(&self) -> bool {
        self.present_count() == self.shared.span_count
    }

    /// Read `len` cached tar bytes at `offset`. The caller checks that the spans are present.
    /// Fails once the layer's file bytes were moved to per-file copies.
    pub fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        if self.files_copied() == Some(true) {
            return Err(Error::MovedToCopies {
                path: self.shared.dir.join(DATA_FILE),
            });
        }
        let mut buf = vec![0; len];
        self.shared
            .data
            .read_exact_at(&mut buf, offset)
            .map_err(|source| Error::Cache {
                path: self.shared.dir.join(DATA_FILE),
                what: "reading",
                source,
            })?;
        Ok(buf)
    }

    /// Store verified, decoded spans and mark them present. The bytes are written, not synced:
    /// the flusher makes them durable within [`FLUSH_INTERVAL`] (see [`SpanCache::flush`]).
    pub fn store(&self, spans: &[(Span, Vec<u8>)]) -> Result<()> {
        if spans.is_empty() {
            return Ok(());
        }
        let shared = &self.shared;
        let write = |(span, decoded): &(Span, Vec<u8>)| {
            debug_assert_eq!(
                decoded.len() as u64,
                span.uncompressed.end - span.uncompressed.start
            );
            shared.data.write_all_at(decoded, span.uncompressed.start)
        };
        spans
            .iter()
            .try_for_each(write)
            .map_err(|source| Error::Cache {
                path: shared.dir.join(DATA_FILE),
                what: "writing",
                source,
            })?;
        // Marked only once written: a bit in memory always has its bytes in the page cache.
        let mut bitmap = shared.bitmap();
        for (span, _) in spans {
            if let Some(byte) = bitmap.get_mut(span.id as usize / 8) {
                *byte |= 1 << (span.id % 8);
            }
        }
        drop(bitmap);
        let mut flush = shared.lock_flush();
        flush.dirty = true;
        shared.flush_wanted.notify_all();
        Ok(())
    }

    /// Whether the per-file copies are complete (recorded by [`SpanCache::record_copies`]),
    /// and if so whether the files' bytes were moved out of `data`.
    pub(crate) fn files_copied(&self) -> Option<bool> {
        *self.shared.copied.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Record that every per-file copy is complete and synced; with `moved`, reading the
    /// files' bytes from `data` fails from now on, and the caller may punch them out.
    pub(crate) fn record_copies(&self, moved: bool) -> Result<()> {
        let word = if moved { "moved" } else { "kept" };
        let text = format!("{} {word}\n", hex(&self.shared.key));
        write_atomic(&self.shared.dir, COPIED_FILE, text.as_bytes())?;
        *self.shared.copied.lock().unwrap_or_else(|e| e.into_inner()) = Some(moved);
        Ok(())
    }

    /// Free the disk blocks of `ranges` of `data` (their bytes were moved elsewhere). Best
    /// effort: returns the error of a filesystem that cannot punch holes.
    pub(crate) fn punch(&self, ranges: impl Iterator<Item = (u64, u64)>) -> std::io::Result<()> {
        use rustix::fs::{FallocateFlags, fallocate};
        let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        for (offset, len) in ranges {
            fallocate(&self.shared.data, flags, offset, len)?;
        }
        Ok(())
    }

    /// Make every stored span durable now: sync the data, then persist the bitmap as it was
    /// before that sync (a span stored meanwhile waits for the next flush).
    pub fn flush(&self) -> Result<()> {
        self.shared.flush()
    }

    /// The layer digest recorded by [`SpanCache::mark_verified`], if any.
    pub fn verified_digest(&self) -> Option<String> {
        let text = fs::read_to_string(self.shared.dir.join(VERIFIED_FILE)).ok()?;
        let (key, digest) = text.trim_end().split_once(' ')?;
        (key == hex(&self.shared.key)).then(|| digest.to_owned())
    }

    /// Record that the complete cache was checked against the layer `digest`; what is stored
    /// is flushed first, so the record never stands for bytes that are not on disk.
    pub fn mark_verified(&self, digest: &str) -> Result<()> {
        self.flush()?;
        let text = format!("{} {digest}\n", hex(&self.shared.key));
        write_atomic(&self.shared.dir, VERIFIED_FILE, text.as_bytes())
    }
}

impl Drop for SpanCache {
    fn drop(&mut self) {
        self.shared.lock_flush().stop = true;
        self.shared.flush_wanted.notify_all();
        if let Some(flusher) = self.flusher.take() {
            let _ = flusher.join();
        }
        if let Err(e) = self.shared.flush() {
            tracing::warn!(error = %e, "could not persist the span cache; its last spans are fetched again next time");
        }
    }
}

impl Shared {
    fn bitmap(&self) -> MutexGuard<'_, Vec<u8>> {
        // Updates set bits, one at a time: a poisoned lock still holds a good bitmap.
        self.present.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_flush(&self) -> MutexGuard<'_, FlushState> {
        self.flush.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Flush when spans were stored, at most every `flush_interval`, until stopped.
    fn flush_loop(&self) {
        let mut state = self.lock_flush();
        loop {
            while !state.dirty && !state.stop {
                state = self
                    .flush_wanted
                    .wait(state)
                    .unwrap_or_else(|e| e.into_inner());
            }
            if state.stop {
                return;
            }
            // Batch what the next interval stores into this flush.
            state = self
                .flush_wanted
                .wait_timeout_while(state, self.flush_interval, |s| !s.stop)
                .map_or_else(|e| e.into_inner().0, |(g, _)| g);
            state.dirty = false;
            drop(state);
            if let Err(e) = self.flush() {
                tracing::warn!(error = %e, "could not persist the span cache; retrying at the next store");
            }
            state = self.lock_flush();
        }
    }

    fn flush(&self) -> Result<()> {
        let mut persisted = self.persisted.lock().unwrap_or_else(|e| e.into_inner());
        // Taken before the sync: every span it marks was written before the sync began.
        let snapshot = self.bitmap().clone();
        if snapshot == *persisted {
            return Ok(());
        }
        self.data.sync_data().map_err(|source| Error::Cache {
            path: self.dir.join(DATA_FILE),
            what: "syncing",
            source,
        })?;
        let mut bytes = header(self.span_count, &self.key).to_vec();
        bytes.extend_from_slice(&snapshot);
        write_atomic(&self.dir, BITMAP_FILE, &bytes)?;
        *persisted = snapshot;
        Ok(())
    }
}

fn bit(bitmap: &[u8], id: SpanId) -> bool {
    bitmap
        .get(id as usize / 8)
        .is_some_and(|b| b & (1 << (id % 8)) != 0)
}

/// Identifies the zTOC a cache was written for: span layout and digests.
fn layer_key(ztoc: &Ztoc) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(ztoc.compressed_archive_size().to_le_bytes());
    h.update(ztoc.uncompressed_archive_size().to_le_bytes());
    for span in ztoc.spans() {
        h.update(span.compressed.start.to_le_bytes());
        h.update(span.uncompressed.start.to_le_bytes());
    }
    for d in ztoc.span_digests() {
        h.update(d.as_bytes());
    }
    h.finalize().into()
}

fn header(span_count: u32, key: &[u8; 32]) -> [u8; HEADER_LEN] {
    let mut out = [0; HEADER_LEN];
    out[..8].copy_from_slice(MAGIC);
    out[8..12].copy_from_slice(&span_count.to_le_bytes());
    out[12..].copy_from_slice(key);
    out
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn remove_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::Cache {
            path: path.to_owned(),
            what: "removing",
            source: e,
        }),
        _ => Ok(()),
    }
}

fn remove_dir_if_present(path: &Path) -> Result<()> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::Cache {
            path: path.to_owned(),
            what: "removing",
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Replace `dir/name` with `bytes`: temp file, fsync, rename, fsync of the directory.
pub(crate) fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let target = dir.join(name);
    let err = |path: &Path, what| {
        let path = path.to_owned();
        move |source| Error::Cache { path, what, source }
    };
    let mut f = File::create(&tmp).map_err(err(&tmp, "creating"))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(err(&tmp, "writing"))?;
    fs::rename(&tmp, &target).map_err(err(&target, "renaming into place"))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(err(dir, "syncing the directory"))
}
