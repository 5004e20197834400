//! The regular files of a fully local layer as files of their own, for FUSE passthrough.
//!
//! Kernel passthrough (Linux ≥ 6.9) hands a FUSE file's reads, and its mmaps, to a backing
//! file at the same offsets, so it needs one backing file per regular file; the span cache
//! holds the layer as one tar-shaped `data` file where no file starts at offset 0. Once the
//! layer is [`FullyLocal`](crate::LayerState::FullyLocal) (every span cached, the whole blob
//! checked against the layer digest), each regular file's bytes are copied out of `data` into
//! `files/<tar offset of its data, 16 hex digits>` in the cache directory: `copy_file_range`,
//! which shares the blocks instead of copying them on filesystems that can (XFS, Btrfs). A tar
//! hardlink is the same inode as its target in the tree, so it shares its file here. Copies
//! are written under a temporary name and renamed into place, so a file that an earlier
//! process handed to the kernel never changes under it; when all are written they are synced
//! (one `syncfs`) and the cache records them as complete (`copied`), so the next process
//! reuses them as they are. Without that record (a crash half way, another zTOC) they are
//! written again.
//!
//! Then the copies become the only copy: the files' ranges are punched out of `data`, so a
//! fully local layer takes its size on disk once, not twice, and the cache refuses to read
//! them from `data` from then on (the mount reads the copies, by passthrough or itself). The
//! record is written before the punching, so a crash in between loses nothing. A layer with
//! sparse tar files (rare), which are served from `data`, keeps `data` whole instead.
//!
//! The directory is `0700` and the files `0600`, owned by the daemon (root): they hold the
//! decompressed bytes of possibly private images, whatever the layer's own modes say (the
//! kernel checks those against the FUSE inode, not the backing file).
//!
//! Sparse tar files are not copied: they keep being served through the daemon. So does
//! everything while a layer is lazy.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::cache::SpanCache;
use crate::{Error, Result};

/// Subdirectory of the cache directory that holds the copies.
pub(crate) const FILES_DIR: &str = "files";

/// The copies of one layer's regular files: which exist, and where.
#[derive(Debug)]
pub(crate) struct LocalFiles {
    dir: PathBuf,
    /// The cache's `data` file.
    data: PathBuf,
    /// Whether the copies may replace the files' bytes in `data` (no sparse files).
    movable: bool,
    /// Data offset and size of every regular file that gets a copy, sorted by offset, with
    /// whether its copy is in place.
    files: Vec<(u64, u64)>,
    ready: Vec<AtomicBool>,
    copied: AtomicU64,
    complete: AtomicBool,
}

impl LocalFiles {
    /// The copies for `files` (data offset, size) of the layer in `cache`; `movable`: they may
    /// replace the files' bytes in `data`. Copies an earlier process completed are ready at
    /// once; nothing else is touched on disk until [`LocalFiles::materialize`].
    pub fn new(cache: &SpanCache, mut files: Vec<(u64, u64)>, movable: bool) -> Self {
        files.sort_unstable();
        files.dedup_by_key(|f| f.0);
        let ready = files.iter().map(|_| AtomicBool::new(false)).collect();
        let local = Self {
            dir: cache.dir().join(FILES_DIR),
            data: cache.dir().join(crate::cache::DATA_FILE),
            movable,
            files,
            ready,
            copied: AtomicU64::new(0),
            complete: AtomicBool::new(false),
        };
        if cache.files_copied().is_some() {
            local.mark_all_ready();
        }
        local
    }

    /// The copy of the file whose data starts at tar offset `offset`, if it is in place.
    pub fn get(&self, offset: u64) -> Option<PathBuf> {
        let i = self.files.binary_search_by_key(&offset, |f| f.0).ok()?;
        self.ready[i]
            .load(Ordering::Acquire)
            .then(|| self.path(offset))
    }

    /// Where the copy of the file whose data starts at tar offset `offset` is (or will be),
    /// if it gets one.
    pub fn path_of(&self, offset: u64) -> Option<PathBuf> {
        self.files
            .binary_search_by_key(&offset, |f| f.0)
            .is_ok()
            .then(|| self.path(offset))
    }

    /// Number of files that get a copy.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// Copies in place so far.
    pub fn copied(&self) -> u64 {
        self.copied.load(Ordering::Relaxed)
    }

    /// Whether every copy is in place.
    pub fn is_complete(&self) -> bool {
        self.complete.load(Ordering::Acquire)
    }

    fn path(&self, offset: u64) -> PathBuf {
        self.dir.join(format!("{offset:016x}"))
    }

    /// Copy every file out of `cache` (fully local and verified), unless an earlier process
    /// did, in tar order, then move them out of `data` if they may; each copy can be used as
    /// soon as it is in place. Returns early (`Ok`) when `stop` is set.
    pub fn materialize(&self, cache: &SpanCache, stop: &AtomicBool) -> Result<()> {
        let err = |path: &Path, what| {
            let path = path.to_owned();
            move |source| Error::Cache { path, what, source }
        };
        if self.is_complete() {
            return Ok(());
        }
        // Copies of another zTOC, or of a run that did not finish: start over.
        match fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(err(&self.dir, "removing stale copies")(e));
            }
            _ => {}
        }
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&self.dir)
            .map_err(err(&self.dir, "creating the directory"))?;
        // Whatever the umask said.
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700))
            .map_err(err(&self.dir, "restricting the directory"))?;
        let mut data = File::open(&self.data).map_err(err(&self.data, "opening"))?;
        for (i, &(offset, size)) in self.files.iter().enumerate() {
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            let target = self.path(offset);
            let tmp = target.with_extension("tmp");
            let mut out = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(err(&tmp, "creating"))?;
            data.seek(SeekFrom::Start(offset))
                .map_err(err(&self.data, "seeking"))?;
            // `io::copy` between two files is `copy_file_range` (reflinked where the
            // filesystem shares blocks), falling back to read/write.
            let n = std::io::copy(&mut (&mut data).take(size), &mut out)
                .map_err(err(&tmp, "copying into"))?;
            if n != size {
                return Err(err(&self.data, "reading")(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("{n} of {size} bytes at offset {offset}"),
                )));
            }
            drop(out);
            fs::rename(&tmp, &target).map_err(err(&target, "renaming into place"))?;
            self.ready[i].store(true, Ordering::Release);
            self.copied.fetch_add(1, Ordering::Relaxed);
        }
        // One sync for all copies, then the record that they are complete, then (and only
        // then) the bytes in `data` can go.
        rustix::fs::syncfs(&data).map_err(|e| err(&self.dir, "syncing")(e.into()))?;
        cache.record_copies(self.movable)?;
        self.complete.store(true, Ordering::Release);
        if self.movable
            && let Err(e) = cache.punch(self.files.iter().copied())
        {
            tracing::warn!(error = %e, path = %self.data.display(), "cannot free the copied bytes in the span cache; the layer takes twice its size on disk");
        }
        Ok(())
    }

    fn mark_all_ready(&self) {
        for r in &self.ready {
            r.store(true, Ordering::Release);
        }
        self.copied
            .store(self.files.len() as u64, Ordering::Relaxed);
        self.complete.store(true, Ordering::Release);
    }
}
