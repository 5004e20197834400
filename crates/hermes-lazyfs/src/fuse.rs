//! The FUSE edge: a read-only filesystem over a layer's [`Tree`] and [`LayerReader`].
//!
//! It only translates: names and attributes come from the tree, file bytes from the reader, and
//! every reader error becomes `EIO` in [`errno`]. Opening a regular file also queues its spans
//! (and some of its neighbours') for [open-time prefetch](crate::OpenPrefetch). Mounting uses fuser's own mount code (no
//! libfuse, no fusermount: the node daemon runs as root).
//!
//! Once the layer is fully local and a file's [copy](crate::local) is in place, opening it
//! hands the kernel that copy as a passthrough backing file (Linux ≥ 6.9): its reads and
//! mmaps then go straight to the local disk without a round trip through this process. The
//! kernel refuses passthrough for an inode that is open in cached mode (and the reverse), so
//! each inode's opens are counted: while it has opens served by this process, new opens are
//! too, and all passthrough opens of an inode share one backing file. If the kernel refuses a
//! backing file (no passthrough negotiated, or the cache on a stacked filesystem such as
//! overlayfs), that is logged once and every later open is served by this process.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    BackgroundSession, BackingId, Config, Errno, FileAttr, FileHandle, FileType, Filesystem,
    FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner, MountOption, OpenAccMode,
    OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyXattr, Request, SessionACL,
};

use crate::local::LocalFiles;
use crate::prefetch::{self, Prefetcher};
use crate::tree::{Kind, Node, Tree};
use crate::{Error, LayerReader, LayerState, OpenPrefetch, Result};

/// A layer never changes: the kernel may cache names and attributes for long.
const TTL: Duration = Duration::from_secs(3600);
const BLOCK: u32 = 4096;
/// FUSE request threads per mount: reads of different spans proceed in parallel.
const THREADS: usize = 4;
/// Most files of a directory looked at to pick the neighbours of an opened file.
const MAX_SIBLINGS: usize = 256;
/// File handle of an open file whose reads this process serves.
const FH_DAEMON: u64 = 0;
/// File handle of an open file the kernel reads from its backing file.
const FH_PASSTHROUGH: u64 = 1;

/// Map a reader error to the errno a process sees. The one place this happens.
fn errno(e: &Error) -> Errno {
    tracing::warn!(error = %e, "lazy layer read failed");
    Errno::EIO
}

/// How to mount a layer; see [`mount_with`].
#[derive(Debug, Clone, Default)]
pub struct MountOptions {
    /// Fetch an opened file's spans (and its neighbours') ahead of its reads; `None` fetches
    /// only what reads ask for.
    pub open_prefetch: Option<OpenPrefetch>,
    /// Once the layer is fully local, copy its regular files out of the span cache and let
    /// the kernel read them directly (FUSE passthrough, Linux ≥ 6.9); `false` (the default)
    /// serves every read through this process from the span cache and copies nothing.
    ///
    /// Off by default because it was slower where it was measured
    /// (`bench/results/fully-local.md`): a cold whole-tree read costs one disk read per file
    /// from the copies, as from an unpacked tree, while the span cache keeps the layer's
    /// files packed in tar order, which the daemon reads with the readahead of one file
    /// (1.4-1.9x faster than passthrough there, and faster than the unpacked tree). What it
    /// saves is the second page-cache copy of what is read (the kernel caches the span
    /// cache's pages and the mount's) and a round trip per uncached read.
    pub passthrough: bool,
}

/// What passthrough did on one mount, for metrics. Counters are monotonic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PassthroughStats {
    /// The kernel agreed to passthrough at mount time.
    pub negotiated: bool,
    /// A backing file was refused and every later open is served by the daemon.
    pub refused: bool,
    /// Opens served by passthrough.
    pub opens: u64,
    /// Opens of a copied file served by the daemon instead (the inode was open in cached mode,
    /// or passthrough was refused).
    pub fallback_opens: u64,
    /// Regular files copied out of the span cache so far.
    pub files_copied: u64,
    /// Regular files that get a copy.
    pub files: u64,
    /// Every copy is in place.
    pub complete: bool,
}

/// Passthrough state shared by the request threads, the copier and the mount handle.
#[derive(Debug)]
struct Passthrough {
    local: LocalFiles,
    /// Whether to try passthrough at all (the option, then the kernel's answer).
    wanted: AtomicBool,
    negotiated: AtomicBool,
    /// Set on the first refused backing file.
    refused: AtomicBool,
    opens: AtomicU64,
    fallback_opens: AtomicU64,
}

impl Passthrough {
    fn stats(&self) -> PassthroughStats {
        PassthroughStats {
            negotiated: self.negotiated.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            opens: self.opens.load(Ordering::Relaxed),
            fallback_opens: self.fallback_opens.load(Ordering::Relaxed),
            files_copied: self.local.copied(),
            files: self.local.len() as u64,
            complete: self.local.is_complete(),
        }
    }
}

/// The opens of one regular file, by how they are served.
#[derive(Default)]
struct Opens {
    daemon: u32,
    passthrough: u32,
    /// Shared by every passthrough open of the inode (the kernel requires one backing file
    /// per inode); closed when the last of them is released.
    backing: Option<BackingId>,
    /// The local copy, for reads this process serves once the copies replaced `data`.
    copy: Option<Arc<std::fs::File>>,
}

struct LazyFs {
    tree: Tree,
    reader: Arc<LayerReader>,
    prefetch: Option<Prefetcher>,
    /// Directories whose files were queued as neighbours already (once per mount is enough:
    /// what they fetched stays cached).
    siblings_queued: Mutex<HashSet<u64>>,
    passthrough: Arc<Passthrough>,
    /// Open regular files by inode.
    opens: Mutex<HashMap<u64, Opens>>,
    /// Listings of open directories by file handle, fixed at `opendir`.
    listings: Mutex<HashMap<u64, Listing>>,
    next_dir_handle: AtomicU64,
    /// Lookup requests answered, shared with the [`MountHandle`].
    lookups: Arc<AtomicU64>,
}

/// A directory's entries (inode, name), in the order `readdir` returns them.
type Listing = Arc<Vec<(u64, Box<[u8]>)>>;

impl LazyFs {
    fn node(&self, ino: INodeNo) -> std::result::Result<&Node, Errno> {
        self.tree.get(ino.0).ok_or(Errno::ENOENT)
    }

    fn opens(&self) -> MutexGuard<'_, HashMap<u64, Opens>> {
        // Every update is a counter change or an assignment: consistent after a panic.
        self.opens.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The copy to read a file's bytes from, once the copies replaced them in `data` (opened
    /// once per open inode); `None` while `data` holds them.
    fn moved_copy(&self, ino: u64, node: &Node) -> Option<Result<Arc<std::fs::File>>> {
        if self.reader.cache().files_copied() != Some(true) {
            return None;
        }
        // Complete (another mount of the same cache may have made them).
        let path = self.passthrough.local.path_of(node.data_range()?.start)?;
        let mut opens = self.opens();
        let entry = opens.entry(ino).or_default();
        if let Some(file) = &entry.copy {
            return Some(Ok(Arc::clone(file)));
        }
        let opened = std::fs::File::open(&path).map_err(|source| Error::Cache {
            path,
            what: "opening the local copy",
            source,
        });
        Some(opened.map(|file| Arc::clone(entry.copy.insert(Arc::new(file)))))
    }

    /// Open a regular file: by passthrough to its copy when there is one and the kernel
    /// takes it, else served by this process.
    fn open_file(&self, ino: u64, node: &Node, reply: ReplyOpen) {
        let pt = &self.passthrough;
        let copy = node
            .data_range()
            .filter(|_| pt.wanted.load(Ordering::Relaxed))
            .and_then(|r| pt.local.get(r.start))
            .filter(|_| !matches!(self.reader.state(), LayerState::Broken(_)));
        let mut opens = self.opens();
        let entry = opens.entry(ino).or_default();
        if let Some(path) = &copy {
            if entry.daemon == 0 && !pt.refused.load(Ordering::Relaxed) && entry.backing.is_none() {
                match std::fs::File::open(path) {
                    Ok(file) => match reply.open_backing(&file) {
                        Ok(id) => entry.backing = Some(id),
                        Err(e) => {
                            if !pt.refused.swap(true, Ordering::Relaxed) {
                                tracing::warn!(error = %e, file = %path.display(), "the kernel refused a passthrough backing file; fully local reads go through the daemon");
                            }
                        }
                    },
                    Err(e) => {
                        tracing::warn!(error = %e, file = %path.display(), "cannot open the local copy; serving the file through the daemon");
                    }
                }
            }
            if let Some(id) = entry.backing.as_ref().filter(|_| entry.daemon == 0) {
                entry.passthrough += 1;
                pt.opens.fetch_add(1, Ordering::Relaxed);
                return reply.opened_passthrough(
                    FileHandle(FH_PASSTHROUGH),
                    FopenFlags::empty(),
                    id,
                );
            }
            pt.fallback_opens.fetch_add(1, Ordering::Relaxed);
        }
        entry.daemon += 1;
        drop(opens);
        if copy.is_none() {
            self.prefetch_on_open(node);
        }
        reply.opened(FileHandle(FH_DAEMON), FopenFlags::FOPEN_KEEP_CACHE)
    }

    /// Queue the spans of an opened file, then of the files after it in its directory (in tar
    /// order, then those before it) up to the neighbour budget.
    fn prefetch_on_open(&self, node: &Node) {
        let Some(prefetcher) = &self.prefetch else {
            return;
        };
        let Some(range) = node.data_range() else {
            return;
        };
        let ztoc = self.reader.ztoc();
        let spans = |r: &std::ops::Range<u64>| ztoc.span_of(r.start)..=ztoc.span_of(r.end - 1);
        let own = spans(&range);
        prefetcher.schedule(own.clone(), prefetch::Kind::File);
        let budget = prefetcher.options().sibling_spans;
        if budget == 0 {
            return;
        }
        let first_time = self
            .siblings_queued
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node.parent);
        let Some(dir) = self.tree.get(node.parent).filter(|_| first_time) else {
            return;
        };
        let mut files: Vec<_> = dir
            .children
            .values()
            .take(MAX_SIBLINGS)
            .filter_map(|&ino| self.tree.get(ino)?.data_range())
            .filter(|r| r.start != range.start)
            .collect();
        files.sort_by_key(|r| r.start);
        let split = files.partition_point(|r| r.start < range.start);
        let (before, after) = files.split_at(split);
        // Spans the neighbours add to the opened file's, counted as one hull: neighbours in tar
        // order mostly share or extend it.
        let own_len = own.end() - own.start();
        let (mut lo, mut hi) = (*own.start(), *own.end());
        for r in after.iter().chain(before.iter().rev()) {
            let s = spans(r);
            let (new_lo, new_hi) = (lo.min(*s.start()), hi.max(*s.end()));
            if new_hi - new_lo - own_len > budget {
                continue;
            }
            prefetcher.schedule(s, prefetch::Kind::Sibling);
            (lo, hi) = (new_lo, new_hi);
            if hi - lo - own_len == budget {
                break;
            }
        }
    }

    /// The entries of directory `ino`: `.`, `..`, then its children in tar order. A tree
    /// walk (`tar`, `cp -r`, `du`) then reads the files in the order their bytes lie in the
    /// span cache and in their copies, as it would read a freshly unpacked tree on disk;
    /// name order sends it back and forth across the layer.
    fn listing(&self, ino: INodeNo) -> std::result::Result<Listing, Errno> {
        let dir = match self.node(ino) {
            Ok(node) if node.kind == Kind::Dir => node,
            Ok(_) => return Err(Errno::ENOTDIR),
            Err(e) => return Err(e),
        };
        let mut children: Vec<(u64, Box<[u8]>)> = dir
            .children
            .iter()
            .map(|(name, &child)| (child, name.as_slice().into()))
            .collect();
        // Inode numbers follow the tar's order of entries.
        children.sort_unstable_by_key(|c| c.0);
        let dots = [(ino.0, b"."[..].into()), (dir.parent, b".."[..].into())];
        Ok(Arc::new(dots.into_iter().chain(children).collect()))
    }

    /// The listing of the open directory `fh` (of `ino`).
    fn open_listing(&self, ino: INodeNo, fh: FileHandle) -> std::result::Result<Listing, Errno> {
        let found = self
            .listings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&fh.0)
            .cloned();
        found.map_or_else(|| self.listing(ino), Ok)
    }

    /// The entries of `listing` from position `offset` on, each with the position of the next.
    fn entries<'a>(
        &'a self,
        listing: &'a Listing,
        offset: u64,
    ) -> impl Iterator<Item = (u64, u64, &'a Node, &'a OsStr)> {
        listing
            .iter()
            .enumerate()
            .skip(usize::try_from(offset).unwrap_or(usize::MAX))
            .filter_map(|(i, (child, name))| {
                let node = self.tree.get(*child)?;
                Some((i as u64 + 1, *child, node, OsStr::from_bytes(name)))
            })
    }

    fn attr(&self, ino: u64, node: &Node) -> FileAttr {
        FileAttr {
            ino: INodeNo(ino),
            size: node.size,
            blocks: node.size.div_ceil(512),
            atime: node.mtime,
            mtime: node.mtime,
            ctime: node.mtime,
            crtime: node.mtime,
            kind: file_type(node.kind),
            perm: node.perm,
            nlink: node.nlink,
            uid: node.uid,
            gid: node.gid,
            rdev: node.rdev,
            blksize: BLOCK,
            flags: 0,
        }
    }
}

/// The attributes of a negative entry: only the node id 0 matters to the kernel.
fn negative_entry() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: BLOCK,
        flags: 0,
    }
}

fn file_type(kind: Kind) -> FileType {
    match kind {
        Kind::Dir => FileType::Directory,
        Kind::File => FileType::RegularFile,
        Kind::Symlink => FileType::Symlink,
        Kind::Char => FileType::CharDevice,
        Kind::Block => FileType::BlockDevice,
        Kind::Fifo => FileType::NamedPipe,
    }
}

/// Answer a read from a file's local copy.
fn read_copy(file: &std::fs::File, offset: u64, len: u64, reply: ReplyData) {
    use std::os::unix::fs::FileExt;
    // Bounded by FUSE's maximum read size.
    let mut buf = vec![0; len as usize];
    let mut filled = 0;
    while filled < buf.len() {
        match file.read_at(&mut buf[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!(error = %e, "reading a local copy failed");
                return reply.error(Errno::EIO);
            }
        }
    }
    if filled < buf.len() {
        tracing::warn!(offset, len, filled, "a local copy is shorter than its file");
        return reply.error(Errno::EIO);
    }
    reply.data(&buf);
}

/// Answer an xattr request: the size when asked for it, the bytes when they fit.
fn reply_xattr(reply: ReplyXattr, size: u32, value: &[u8]) {
    if size == 0 {
        reply.size(value.len() as u32);
    } else if value.len() > size as usize {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(value);
    }
}

impl Filesystem for LazyFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.lookups.fetch_add(1, Ordering::Relaxed);
        match self.node(parent) {
            Ok(dir) if dir.kind != Kind::Dir => reply.error(Errno::ENOTDIR),
            Ok(_) => match self.tree.lookup(parent.0, name.as_bytes()) {
                Some(ino) => match self.tree.get(ino) {
                    Some(node) => reply.entry(&TTL, &self.attr(ino, node), Generation(0)),
                    None => reply.error(Errno::ENOENT),
                },
                // A negative entry (node id 0) the kernel keeps for TTL: the layer never gains
                // the name, and Python's import probes every sys.path entry for names that
                // are not there.
                None => reply.entry(&TTL, &negative_entry(), Generation(0)),
            },
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.node(ino) {
            Ok(node) => reply.attr(&TTL, &self.attr(ino.0, node)),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.node(ino) {
            Ok(node) if node.kind == Kind::Symlink => reply.data(&node.link),
            Ok(_) => reply.error(Errno::EINVAL),
            Err(e) => reply.error(e),
        }
    }

    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Names and attributes in one reply: a tree walk (`tar`, `find`, `du`) needs no
        // lookup per entry after reading its directory.
        let _ = config.add_capabilities(InitFlags::FUSE_DO_READDIRPLUS);
        let pt = &self.passthrough;
        if !pt.wanted.load(Ordering::Relaxed) {
            return Ok(());
        }
        // Depth 1: the backing files may not be on a stacked filesystem, and this one may be
        // a lower layer of overlayfs (which stacks one more).
        let negotiated = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(1).is_ok();
        pt.negotiated.store(negotiated, Ordering::Relaxed);
        if !negotiated {
            pt.wanted.store(false, Ordering::Relaxed);
            tracing::info!(
                "the kernel has no FUSE passthrough (Linux < 6.9?): fully local reads go through the daemon"
            );
        }
        Ok(())
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.node(ino) {
            Ok(_) if flags.acc_mode() != OpenAccMode::O_RDONLY => reply.error(Errno::EROFS),
            Ok(node) if node.kind == Kind::Dir => reply.error(Errno::EISDIR),
            Ok(node) if node.kind == Kind::File => self.open_file(ino.0, node, reply),
            Ok(_) => reply.opened(FileHandle(FH_DAEMON), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(e),
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let mut opens = self.opens();
        if let Some(entry) = opens.get_mut(&ino.0) {
            if fh.0 == FH_PASSTHROUGH {
                entry.passthrough = entry.passthrough.saturating_sub(1);
            } else {
                entry.daemon = entry.daemon.saturating_sub(1);
            }
            if entry.passthrough == 0 {
                entry.backing = None;
            }
            if entry.passthrough == 0 && entry.daemon == 0 {
                opens.remove(&ino.0);
            }
        }
        reply.ok();
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let node = match self.node(ino) {
            Ok(node) if node.kind == Kind::File => node,
            Ok(_) => return reply.error(Errno::EINVAL),
            Err(e) => return reply.error(e),
        };
        if offset >= node.size {
            return reply.data(&[]);
        }
        let len = u64::from(size).min(node.size - offset);
        if let Some(copy) = self.moved_copy(ino.0, node) {
            return match copy {
                Ok(file) => read_copy(&file, offset, len, reply),
                Err(e) => reply.error(errno(&e)),
            };
        }
        match node.read(&self.reader, offset, len) {
            Ok(bytes) => reply.data(&bytes),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let listing = match self.listing(ino) {
            Ok(listing) => listing,
            Err(e) => return reply.error(e),
        };
        let fh = self.next_dir_handle.fetch_add(1, Ordering::Relaxed);
        self.listings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(fh, listing);
        reply.opened(FileHandle(fh), FopenFlags::empty());
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.listings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&fh.0);
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let listing = match self.open_listing(ino, fh) {
            Ok(listing) => listing,
            Err(e) => return reply.error(e),
        };
        for (next, child, node, name) in self.entries(&listing, offset) {
            if reply.add(INodeNo(child), next, file_type(node.kind), name) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let listing = match self.open_listing(ino, fh) {
            Ok(listing) => listing,
            Err(e) => return reply.error(e),
        };
        for (next, child, node, name) in self.entries(&listing, offset) {
            let attr = self.attr(child, node);
            if reply.add(INodeNo(child), next, name, &TTL, &attr, Generation(0)) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self
            .reader
            .ztoc()
            .uncompressed_archive_size()
            .div_ceil(u64::from(BLOCK));
        reply.statfs(blocks, 0, 0, self.tree.len() as u64, 0, BLOCK, 255, BLOCK);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let node = match self.node(ino) {
            Ok(node) => node,
            Err(e) => return reply.error(e),
        };
        match node.xattrs().find(|(k, _)| *k == name.as_bytes()) {
            Some((_, value)) => reply_xattr(reply, size, value),
            None => reply.error(Errno::ENODATA),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let node = match self.node(ino) {
            Ok(node) => node,
            Err(e) => return reply.error(e),
        };
        let mut names = Vec::new();
        for (k, _) in node.xattrs() {
            names.extend_from_slice(k);
            names.push(0);
        }
        reply_xattr(reply, size, &names);
    }
}

/// A mounted lazy layer. Dropping it unmounts.
#[derive(Debug)]
pub struct MountHandle {
    session: Option<BackgroundSession>,
    mountpoint: PathBuf,
    /// The FUSE connection's device number, to abort a mount that will not unmount.
    dev: u64,
    reader: Arc<LayerReader>,
    passthrough: Arc<Passthrough>,
    /// Copies the layer's files once it is fully local; stopped on unmount.
    copier: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
    lookups: Arc<AtomicU64>,
}

/// Mount `reader`'s layer read-only at `mountpoint` (an existing directory), fetching only what
/// reads ask for; see [`mount_with`]. Open-time prefetch is not the default: measured on an
/// import chain of small files (`bench/results/import-chain.md`) it gained nothing at the
/// controller's default 4 MiB spans and 1.10-1.15x at 1 MiB spans, while it fetches whole files
/// that a workload may only open.
pub fn mount(reader: Arc<LayerReader>, mountpoint: &Path) -> Result<MountHandle> {
    mount_with(reader, mountpoint, MountOptions::default())
}

/// Mount `reader`'s layer read-only at `mountpoint` (an existing directory). Every user may
/// read it (`allow_other`, which overlayfs needs); the kernel checks permissions against the
/// layer's modes. The mount is `nosuid,nodev`: a setuid binary run from the layer itself grants
/// nothing and its device nodes open nothing. Containers are unaffected: they run the layer
/// through an overlayfs mount, whose own flags govern setuid and device files.
///
/// `options` turn on open-time prefetch and passthrough; see [`MountOptions`].
pub fn mount_with(
    reader: Arc<LayerReader>,
    mountpoint: &Path,
    options: MountOptions,
) -> Result<MountHandle> {
    let tree = Tree::build(reader.ztoc().entries())?;
    mount_tree(reader, tree, mountpoint, options)
}

/// [`mount_with`] for a reader whose zTOC had its entries moved out
/// ([`Ztoc::take_entries`](hermes_ztoc::Ztoc::take_entries)): the inode table is built from
/// `entries`, which the caller then drops, so a long-lived server keeps each name once.
pub fn mount_entries(
    reader: Arc<LayerReader>,
    entries: &[hermes_ztoc::Entry],
    mountpoint: &Path,
    options: MountOptions,
) -> Result<MountHandle> {
    mount_tree(reader, Tree::build(entries)?, mountpoint, options)
}

fn mount_tree(
    reader: Arc<LayerReader>,
    tree: Tree,
    mountpoint: &Path,
    options: MountOptions,
) -> Result<MountHandle> {
    let mount_err = |source| Error::Mount {
        path: mountpoint.to_owned(),
        source,
    };
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::RO,
        MountOption::FSName("hermes-lazyfs".into()),
        MountOption::Subtype("hermes-lazyfs".into()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
    ];
    config.acl = SessionACL::All;
    config.n_threads = Some(THREADS);
    let prefetch = options
        .open_prefetch
        .map(|options| Prefetcher::start(Arc::clone(&reader), options))
        .transpose()?;
    let files = tree
        .nodes()
        .filter_map(Node::data_range)
        .map(|r| (r.start, r.end - r.start))
        .collect();
    // Sparse files are served from `data`: a layer with any keeps it whole.
    let movable = !tree
        .nodes()
        .any(|n| n.kind == Kind::File && n.size > 0 && n.data_range().is_none());
    let passthrough = Arc::new(Passthrough {
        local: LocalFiles::new(reader.cache(), files, movable),
        wanted: AtomicBool::new(options.passthrough),
        negotiated: AtomicBool::new(false),
        refused: AtomicBool::new(false),
        opens: AtomicU64::new(0),
        fallback_opens: AtomicU64::new(0),
    });
    let lookups = Arc::new(AtomicU64::new(0));
    let fs = LazyFs {
        tree,
        reader: Arc::clone(&reader),
        prefetch,
        siblings_queued: Mutex::new(HashSet::new()),
        passthrough: Arc::clone(&passthrough),
        opens: Mutex::new(HashMap::new()),
        listings: Mutex::new(HashMap::new()),
        next_dir_handle: AtomicU64::new(1),
        lookups: Arc::clone(&lookups),
    };
    let session = fuser::spawn_mount(fs, mountpoint, &config).map_err(mount_err)?;
    let mut handle = MountHandle {
        session: Some(session),
        mountpoint: mountpoint.to_owned(),
        dev: 0,
        reader,
        passthrough,
        copier: None,
        lookups,
    };
    // The INIT handshake is done: this stat is answered by the new filesystem.
    handle.dev = std::fs::metadata(mountpoint).map_err(mount_err)?.dev();
    if handle.passthrough.wanted.load(Ordering::Relaxed) && !handle.passthrough.local.is_complete()
    {
        handle.copier = Some(start_copier(&handle.reader, &handle.passthrough)?);
    }
    tracing::info!(mountpoint = %mountpoint.display(), "lazy layer mounted");
    Ok(handle)
}

impl MountHandle {
    /// Where the layer is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The reader behind the mount.
    pub fn reader(&self) -> &Arc<LayerReader> {
        &self.reader
    }

    /// What passthrough did so far.
    pub fn passthrough_stats(&self) -> PassthroughStats {
        self.passthrough.stats()
    }

    /// Lookup requests the filesystem answered (names the kernel found in its cache, negative
    /// ones included, never arrive).
    pub fn lookups(&self) -> u64 {
        self.lookups.load(Ordering::Relaxed)
    }

    /// Unmount and wait for the request threads to end.
    pub fn unmount(mut self) -> Result<()> {
        self.unmount_inner()
    }

    fn unmount_inner(&mut self) -> Result<()> {
        if let Some((stop, thread)) = self.copier.take() {
            stop.store(true, Ordering::Relaxed);
            self.reader.wake();
            let _ = thread.join();
        }
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        session.umount_and_join().map_err(|source| Error::Unmount {
            path: self.mountpoint.clone(),
            source,
        })
    }
}

/// Start the thread that copies the layer's files once it is fully local.
fn start_copier(
    reader: &Arc<LayerReader>,
    passthrough: &Arc<Passthrough>,
) -> Result<(Arc<AtomicBool>, JoinHandle<()>)> {
    let stop = Arc::new(AtomicBool::new(false));
    let thread = std::thread::Builder::new()
        .name("hermes-copy-local".into())
        .spawn({
            let (reader, pt, stop) = (Arc::clone(reader), Arc::clone(passthrough), Arc::clone(&stop));
            move || {
                if reader.wait_while_lazy(&stop) != LayerState::FullyLocal {
                    return;
                }
                let started = std::time::Instant::now();
                match pt.local.materialize(reader.cache(), &stop) {
                    Ok(()) if pt.local.is_complete() => tracing::info!(
                        files = pt.local.copied(),
                        seconds = started.elapsed().as_secs_f64(),
                        "local copies of the layer's files in place: reads pass through"
                    ),
                    Ok(()) => {}
                    Err(e) => tracing::warn!(error = %e, "copying the layer's files failed; reads of the rest go through the daemon"),
                }
            }
        })
        .map_err(|source| Error::Thread {
            what: "local copy",
            source,
        })?;
    Ok((stop, thread))
}

impl Drop for MountHandle {
    fn drop(&mut self) {
        if let Err(e) = self.unmount_inner() {
            // Busy (a process still has a file open): abort the connection so every pending and
            // later request fails, and detach the mount so nothing is left in the mount table.
            tracing::warn!(error = %e, "unmount failed; aborting the FUSE connection and detaching");
            let minor = (self.dev & 0xff) | ((self.dev >> 12) & 0xffff_ff00);
            let abort = format!("/sys/fs/fuse/connections/{minor}/abort");
            if let Err(e) = std::fs::write(&abort, b"1") {
                tracing::warn!(error = %e, path = abort, "could not abort the FUSE connection");
            }
            match std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.mountpoint)
                .status()
            {
                Ok(status) if status.success() => {}
                other => tracing::error!(
                    mountpoint = %self.mountpoint.display(),
                    result = ?other,
                    "could not detach the lazy layer"
                ),
            }
        }
    }
}
