//! The FUSE edge: a read-only filesystem over a layer's [`Tree`] and [`LayerReader`].
//!
//! It only translates: names and attributes come from the tree, file bytes from the reader, and
//! every reader error becomes `EIO` in [`errno`]. Opening a regular file also queues its spans
//! (and some of its neighbours') for [open-time prefetch](crate::OpenPrefetch). Mounting uses fuser's own mount code (no
//! libfuse, no fusermount: the node daemon runs as root).

use std::collections::HashSet;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, LockOwner, MountOption, OpenAccMode, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request, SessionACL,
};

use crate::prefetch::{self, Prefetcher};
use crate::tree::{Kind, Node, Tree};
use crate::{Error, LayerReader, OpenPrefetch, Result};

/// A layer never changes: the kernel may cache names and attributes for long.
const TTL: Duration = Duration::from_secs(3600);
const BLOCK: u32 = 4096;
/// FUSE request threads per mount: reads of different spans proceed in parallel.
const THREADS: usize = 4;
/// Most files of a directory looked at to pick the neighbours of an opened file.
const MAX_SIBLINGS: usize = 256;

/// Map a reader error to the errno a process sees. The one place this happens.
fn errno(e: &Error) -> Errno {
    tracing::warn!(error = %e, "lazy layer read failed");
    Errno::EIO
}

struct LazyFs {
    tree: Tree,
    reader: Arc<LayerReader>,
    prefetch: Option<Prefetcher>,
    /// Directories whose files were queued as neighbours already (once per mount is enough:
    /// what they fetched stays cached).
    siblings_queued: Mutex<HashSet<u64>>,
    /// Lookup requests answered, shared with the [`MountHandle`].
    lookups: Arc<AtomicU64>,
}

impl LazyFs {
    fn node(&self, ino: INodeNo) -> std::result::Result<&Node, Errno> {
        self.tree.get(ino.0).ok_or(Errno::ENOENT)
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

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.node(ino) {
            Ok(_) if flags.acc_mode() != OpenAccMode::O_RDONLY => reply.error(Errno::EROFS),
            Ok(node) if node.kind == Kind::Dir => reply.error(Errno::EISDIR),
            Ok(node) => {
                if node.kind == Kind::File {
                    self.prefetch_on_open(node);
                }
                reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE)
            }
            Err(e) => reply.error(e),
        }
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
        match node.read(&self.reader, offset, len) {
            Ok(bytes) => reply.data(&bytes),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let dir = match self.node(ino) {
            Ok(node) if node.kind == Kind::Dir => node,
            Ok(_) => return reply.error(Errno::ENOTDIR),
            Err(e) => return reply.error(e),
        };
        let dots = [
            (ino.0, FileType::Directory, &b"."[..]),
            (dir.parent, FileType::Directory, &b".."[..]),
        ];
        let children = dir.children.iter().filter_map(|(name, &child)| {
            let node = self.tree.get(child)?;
            Some((child, file_type(node.kind), name.as_slice()))
        });
        for (i, (child, kind, name)) in dots.into_iter().chain(children).enumerate() {
            if (i as u64) < offset {
                continue;
            }
            if reply.add(INodeNo(child), i as u64 + 1, kind, OsStr::from_bytes(name)) {
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
    lookups: Arc<AtomicU64>,
}

/// Mount `reader`'s layer read-only at `mountpoint` (an existing directory), fetching only what
/// reads ask for; see [`mount_with`]. Open-time prefetch is not the default: measured on an
/// import chain of small files (`bench/results/import-chain.md`) it gained nothing at the
/// controller's default 4 MiB spans and 1.10-1.15x at 1 MiB spans, while it fetches whole files
/// that a workload may only open.
pub fn mount(reader: Arc<LayerReader>, mountpoint: &Path) -> Result<MountHandle> {
    mount_with(reader, mountpoint, None)
}

/// Mount `reader`'s layer read-only at `mountpoint` (an existing directory). Every user may
/// read it (`allow_other`, which overlayfs needs); the kernel checks permissions against the
/// layer's modes. The mount is `nosuid,nodev`: a setuid binary run from the layer itself grants
/// nothing and its device nodes open nothing. Containers are unaffected: they run the layer
/// through an overlayfs mount, whose own flags govern setuid and device files.
///
/// `open_prefetch` fetches an opened file's spans (and its neighbours') ahead of its reads;
/// `None` fetches only what reads ask for.
pub fn mount_with(
    reader: Arc<LayerReader>,
    mountpoint: &Path,
    open_prefetch: Option<OpenPrefetch>,
) -> Result<MountHandle> {
    let mount_err = |source| Error::Mount {
        path: mountpoint.to_owned(),
        source,
    };
    let tree = Tree::build(reader.ztoc())?;
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
    let prefetch = open_prefetch
        .map(|options| Prefetcher::start(Arc::clone(&reader), options))
        .transpose()?;
    let lookups = Arc::new(AtomicU64::new(0));
    let fs = LazyFs {
        tree,
        reader: Arc::clone(&reader),
        prefetch,
        siblings_queued: Mutex::new(HashSet::new()),
        lookups: Arc::clone(&lookups),
    };
    let session = fuser::spawn_mount(fs, mountpoint, &config).map_err(mount_err)?;
    let mut handle = MountHandle {
        session: Some(session),
        mountpoint: mountpoint.to_owned(),
        dev: 0,
        reader,
        lookups,
    };
    // The INIT handshake is done: this stat is answered by the new filesystem.
    handle.dev = std::fs::metadata(mountpoint).map_err(mount_err)?.dev();
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
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        session.umount_and_join().map_err(|source| Error::Unmount {
            path: self.mountpoint.clone(),
            source,
        })
    }
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
