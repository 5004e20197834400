//! Real FUSE mounts of a layer: the tree, bytes, metadata and xattrs as an unpack would leave
//! them, whiteouts as overlayfs expects, minimal fetching, EIO for a broken layer, clean unmount.

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hermes_lazyfs::{
    FetchLimit, LayerReader, MountHandle, MountOptions, OpenPrefetch, mount, mount_with,
};

use crate::layer::{Built, Source, TestLayer, noise, wait_until};

/// Fail loudly when the machine cannot mount FUSE.
pub fn require_fuse() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "these tests mount FUSE: /dev/fuse is missing (load the fuse module: modprobe fuse)"
    );
    let uid = std::fs::metadata("/proc/self").map(|m| m.uid());
    assert_eq!(
        uid.ok(),
        Some(0),
        "these tests mount FUSE without fusermount: run them as root"
    );
}

fn mounted(path: &Path) -> bool {
    let target = path.to_str().unwrap();
    std::fs::read_to_string("/proc/mounts")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(target))
}

/// A mounted layer in a temp dir; unmounts first, then removes the dirs.
pub struct Mounted {
    handle: Option<MountHandle>,
    pub root: PathBuf,
    _dir: tempfile::TempDir,
}

impl Mounted {
    fn new(layer: &Built, source: &Source) -> Self {
        Self::mount_with(layer, source, mount)
    }

    /// Mounted with at most `limit` concurrent range requests and `open_prefetch`.
    pub fn with_prefetch(
        layer: &Built,
        source: &Source,
        limit: usize,
        open_prefetch: Option<OpenPrefetch>,
    ) -> Self {
        Self::mount_with(layer, source, |reader, root| {
            let reader = Arc::into_inner(reader)
                .unwrap()
                .with_fetch_limit(FetchLimit::new(limit));
            let options = MountOptions {
                open_prefetch,
                ..MountOptions::default()
            };
            mount_with(Arc::new(reader), root, options)
        })
    }

    fn mount_with(
        layer: &Built,
        source: &Source,
        mount: impl FnOnce(Arc<LayerReader>, &Path) -> hermes_lazyfs::Result<MountHandle>,
    ) -> Self {
        require_fuse();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("mnt");
        std::fs::create_dir(&root).unwrap();
        let reader = Arc::new(layer.reader(&dir.path().join("cache"), source));
        let handle = mount(reader, &root).unwrap();
        wait_until("the mount's root inode", || {
            std::fs::metadata(&root).is_ok_and(|m| m.ino() == 1)
        });
        Self {
            handle: Some(handle),
            root,
            _dir: dir,
        }
    }

    pub fn handle(&self) -> &MountHandle {
        self.handle.as_ref().unwrap()
    }

    pub fn reader(&self) -> &LayerReader {
        self.handle.as_ref().unwrap().reader()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        drop(self.handle.take());
    }
}

/// Every kind of entry a layer holds, a multi-span file, whiteouts and an opaque dir.
fn rich_layer() -> Built {
    TestLayer::new()
        .dir("etc", 0o755)
        .file("etc/hosts", 0o644, (0, 0), b"127.0.0.1 localhost\n")
        .dir("bin", 0o751)
        .file("bin/tool", 0o4755, (0, 0), &noise(10_000, 3))
        .dir("data", 0o700)
        .file("data/big.bin", 0o600, (1000, 1001), &noise(300_000, 4))
        .symlink("data/link-to-big", "big.bin")
        .symlink("data/dangling", "/nowhere/at/all")
        .hardlink("data/hard", "data/big.bin")
        .fifo("dev/fifo", 0o640)
        .device("dev/null", 'c', 0o666, (1, 3))
        .device("dev/sda1", 'b', 0o660, (8, 257))
        .file_with_xattrs(
            "attrs/file",
            0o644,
            (5, 6),
            b"with attributes",
            &[("user.color", b"blue"), ("user.bin", &[0, 1, 0xff])],
        )
        .dir("gone", 0o755)
        .whiteout("gone", "deleted")
        .dir("opq", 0o755)
        .opaque("opq")
        .file("opq/kept", 0o644, (0, 0), b"kept")
        .file("implicit/sub/file", 0o644, (0, 0), b"parents not listed")
        .file("dup", 0o644, (0, 0), b"first")
        .file("dup", 0o640, (0, 0), b"second wins")
        .dir("replaced", 0o755)
        .file("replaced/child", 0o644, (0, 0), b"gone with its dir")
        .file("replaced", 0o644, (0, 0), b"now a file")
        .file("empty", 0o644, (0, 0), b"")
        .finish()
}

fn kind_of(t: std::fs::FileType) -> char {
    match () {
        _ if t.is_dir() => 'd',
        _ if t.is_file() => '-',
        _ if t.is_symlink() => 'l',
        _ if t.is_fifo() => 'p',
        _ if t.is_char_device() => 'c',
        _ if t.is_block_device() => 'b',
        _ => '?',
    }
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let path = e.path();
        out.push(
            path.strip_prefix(root)
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned(),
        );
        if e.file_type().unwrap().is_dir() {
            walk(root, &path, out);
        }
    }
}

#[test]
fn mounted_layer_matches_what_was_put_in_the_tar() {
    let layer = rich_layer();
    let m = Mounted::new(&layer, &layer.source());

    let mut listed = Vec::new();
    walk(&m.root, &m.root, &mut listed);
    listed.sort();
    let expected: Vec<String> = layer.expect.keys().cloned().collect();
    assert_eq!(listed, expected, "tree differs");

    for (path, want) in &layer.expect {
        let p = m.root.join(path);
        let md = std::fs::symlink_metadata(&p).unwrap();
        let got_kind = kind_of(md.file_type());
        assert_eq!(got_kind, want.kind, "{path}: type");
        assert_eq!(
            md.mode() & 0o7777,
            want.mode,
            "{path}: mode {:o}",
            md.mode()
        );
        assert_eq!((md.uid(), md.gid()), (want.uid, want.gid), "{path}: owner");
        if want.mtime != 0 {
            assert_eq!(md.mtime() as u64, want.mtime, "{path}: mtime");
        }
        match want.kind {
            '-' => {
                assert_eq!(md.len(), want.content.len() as u64, "{path}: size");
                assert!(
                    std::fs::read(&p).unwrap() == want.content,
                    "{path}: bytes differ"
                );
            }
            'l' => {
                assert_eq!(
                    std::fs::read_link(&p).unwrap().to_str().unwrap(),
                    want.link,
                    "{path}"
                );
                assert_eq!(md.len(), want.link.len() as u64, "{path}: size");
            }
            'c' | 'b' => {
                let (major, minor) = want.rdev;
                let rdev = u64::from(minor & 0xff)
                    | (u64::from(major & 0xfff) << 8)
                    | (u64::from(minor & !0xff) << 12);
                assert_eq!(md.rdev(), rdev, "{path}: rdev");
            }
            _ => {}
        }
        if want.kind != 'l' {
            let mut names: Vec<String> = xattr::list(&p)
                .unwrap()
                .map(|n| n.into_string().unwrap())
                .collect();
            names.sort();
            let mut want_names: Vec<String> = want.xattrs.iter().map(|(k, _)| k.clone()).collect();
            want_names.sort();
            assert_eq!(names, want_names, "{path}: xattr names");
            for (k, v) in &want.xattrs {
                assert_eq!(
                    xattr::get(&p, k).unwrap().as_ref(),
                    Some(v),
                    "{path}: xattr {k}"
                );
            }
        }
    }

    // Hardlinks share an inode and count their links; directories count subdirectories.
    let big = std::fs::metadata(m.root.join("data/big.bin")).unwrap();
    let hard = std::fs::metadata(m.root.join("data/hard")).unwrap();
    assert_eq!(big.ino(), hard.ino());
    assert_eq!((big.nlink(), hard.nlink()), (2, 2));
    assert_eq!(
        std::fs::metadata(m.root.join("etc/hosts")).unwrap().nlink(),
        1
    );
    assert_eq!(
        std::fs::metadata(m.root.join("implicit")).unwrap().nlink(),
        3
    );
    // Whiteouts as overlayfs expects of a lower dir.
    let wh = std::fs::symlink_metadata(m.root.join("gone/deleted")).unwrap();
    assert!(wh.file_type().is_char_device() && wh.rdev() == 0);
    assert!(!m.root.join("gone/.wh.deleted").exists());
    assert!(!m.root.join("opq/.wh..wh..opq").exists());
    assert_eq!(
        xattr::get(m.root.join("opq"), "trusted.overlay.opaque")
            .unwrap()
            .as_deref(),
        Some(&b"y"[..])
    );
    // Read-only.
    let err = std::fs::OpenOptions::new()
        .write(true)
        .open(m.root.join("etc/hosts"))
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    assert!(std::fs::write(m.root.join("new"), b"x").is_err());
}

#[test]
fn ls_style_listing_shows_every_entry_with_its_type() {
    let layer = rich_layer();
    let m = Mounted::new(&layer, &layer.source());
    let listing: BTreeMap<String, char> = std::fs::read_dir(m.root.join("dev"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().into_string().unwrap(),
                kind_of(e.file_type().unwrap()),
            )
        })
        .collect();
    let want: BTreeMap<String, char> = [("fifo", 'p'), ("null", 'c'), ("sda1", 'b')]
        .into_iter()
        .map(|(n, k)| (n.to_owned(), k))
        .collect();
    assert_eq!(listing, want);
    let out = std::process::Command::new("ls")
        .arg("-lan")
        .arg(m.root.join("data"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    for needle in [
        " . ",
        " .. ",
        " big.bin",
        " hard",
        " link-to-big -> big.bin",
    ] {
        assert!(
            text.lines()
                .any(|l| l.contains(needle) || l.ends_with(needle.trim_end())),
            "ls -la lacks {needle:?}:\n{text}"
        );
    }
    let big: Vec<&str> = text
        .lines()
        .find(|l| l.ends_with(" big.bin"))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        big[..5],
        ["-rw-------", "2", "1000", "1001", "300000"],
        "{text}"
    );
}

#[test]
fn reading_one_small_file_fetches_only_its_span() {
    let layer = rich_layer();
    assert!(
        layer.ztoc.span_count() >= 4,
        "{} spans",
        layer.ztoc.span_count()
    );
    let source = layer.source();
    let m = Mounted::new(&layer, &source);
    assert_eq!(source.requests(), 0, "mounting must not fetch");
    let range = layer.file_range("attrs/file");
    let (first, last) = (
        layer.ztoc.span_of(range.start),
        layer.ztoc.span_of(range.end - 1),
    );
    assert_eq!(
        std::fs::read(m.root.join("attrs/file")).unwrap(),
        b"with attributes"
    );
    let spans: Vec<_> = (first..=last)
        .map(|i| layer.ztoc.span(i).unwrap())
        .collect();
    assert_eq!(
        source.log(),
        vec![spans[0].compressed.start..spans[spans.len() - 1].compressed.end]
    );
    assert_eq!(spans.len(), 1, "the file lies in one span");
    assert_eq!(m.reader().stats().spans_fetched, 1);
    assert!(
        source.bytes() < layer.blob.len() as u64 / 3,
        "{} bytes",
        source.bytes()
    );
}

#[test]
fn sparse_files_read_at_their_full_size_with_zeros_in_the_holes() {
    use std::os::unix::fs::FileExt;
    let (a, b) = (noise(5000, 11), noise(100_000, 12));
    let layer = TestLayer::new()
        .sparse_file("disk.img", 1 << 20, &[(4096, &a), (600_000, &b)])
        .file("after", 0o644, (0, 0), b"the entry after the sparse file\n")
        .finish();
    let source = layer.source();
    let m = Mounted::new(&layer, &source);
    let path = m.root.join("disk.img");
    let want = &layer.expect["disk.img"].content;
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20);
    // A read inside a hole needs no data at all.
    let f = std::fs::File::open(&path).unwrap();
    let mut hole = vec![1; 4096];
    f.read_exact_at(&mut hole, 200_000).unwrap();
    assert!(hole.iter().all(|&b| b == 0));
    assert_eq!(source.requests(), 0, "a hole was fetched");
    for (at, len) in [(0, 5000), (4000, 200), (9000, 600_000), (699_000, 2000)] {
        let mut got = vec![1; len];
        f.read_exact_at(&mut got, at as u64).unwrap();
        assert!(got == want[at..at + len], "bytes {at}..{}", at + len);
    }
    assert!(std::fs::read(&path).unwrap() == *want);
    assert_eq!(
        std::fs::read(m.root.join("after")).unwrap(),
        b"the entry after the sparse file\n"
    );
}

#[test]
fn reads_of_a_broken_layer_fail_with_eio() {
    let layer = rich_layer();
    let source = layer.source();
    for span in layer.ztoc.spans() {
        source.corrupt(span.compressed.end - 1, u64::MAX);
    }
    let m = Mounted::new(&layer, &source);
    let err = std::fs::read(m.root.join("data/big.bin")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(matches!(
        m.reader().state(),
        hermes_lazyfs::LayerState::Broken(_)
    ));
    // Metadata still answers: only bytes are refused.
    assert!(std::fs::metadata(m.root.join("data/big.bin")).is_ok());
}

#[test]
fn a_missing_name_is_looked_up_once_then_answered_by_the_kernel() {
    let layer = rich_layer();
    let source = layer.source();
    let m = Mounted::new(&layer, &source);
    let missing = m.root.join("no-such-module.py");
    let before = m.handle().lookups();
    for _ in 0..3 {
        let e = std::fs::symlink_metadata(&missing).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    }
    assert_eq!(
        m.handle().lookups() - before,
        1,
        "the kernel must cache the negative entry: each later stat reached the filesystem"
    );
}

#[test]
fn unmount_leaves_nothing_in_the_mount_table() {
    let layer = rich_layer();
    let source = layer.source();
    let mut m = Mounted::new(&layer, &source);
    let root = m.root.clone();
    assert!(mounted(&root), "not in /proc/mounts after mount");
    m.handle.take().unwrap().unmount().unwrap();
    assert!(!mounted(&root), "still in /proc/mounts after unmount");

    // Dropping a handle while a file is open still leaves nothing mounted.
    let m = Mounted::new(&layer, &source);
    let root = m.root.clone();
    let open = std::fs::File::open(root.join("etc/hosts")).unwrap();
    drop(m);
    assert!(!mounted(&root), "a busy mount was left behind");
    drop(open);
}

/// An overlayfs mount over lazy layers; unmounted on drop (before the layers).
struct Overlay {
    target: PathBuf,
    _dir: tempfile::TempDir,
}

impl Overlay {
    /// `lowers`: top layer first, as overlayfs takes them.
    fn new(lowers: &[&Path]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("merged");
        std::fs::create_dir(&target).unwrap();
        let lowerdir: Vec<&str> = lowers.iter().map(|p| p.to_str().unwrap()).collect();
        let out = std::process::Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(format!("lowerdir={}", lowerdir.join(":")))
            .arg(&target)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mounting overlayfs over the lazy layers failed (needs the overlay module): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { target, _dir: dir }
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(&self.target)
            .status();
    }
}

#[test]
fn overlayfs_over_lazy_layers_applies_whiteouts_and_opaque_dirs() {
    let bottom = TestLayer::new()
        .dir("gone", 0o755)
        .file("gone/deleted", 0o644, (0, 0), b"deleted above")
        .file("gone/stays", 0o644, (0, 0), b"stays")
        .dir("opq", 0o755)
        .file("opq/old", 0o644, (0, 0), b"hidden by the opaque dir above")
        .file("keep", 0o644, (0, 0), &noise(100_000, 9))
        .finish();
    let top = TestLayer::new()
        .dir("gone", 0o755)
        .whiteout("gone", "deleted")
        .dir("opq", 0o755)
        .opaque("opq")
        .file("opq/new", 0o644, (0, 0), b"new")
        .finish();
    let lower = Mounted::new(&bottom, &bottom.source());
    let upper = Mounted::new(&top, &top.source());
    let overlay = Overlay::new(&[&upper.root, &lower.root]);
    let merged = &overlay.target.clone();
    let names = |dir: &str| {
        let mut names: Vec<String> = std::fs::read_dir(merged.join(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    };
    assert_eq!(names("gone"), ["stays"]);
    assert_eq!(names("opq"), ["new"]);
    assert!(!merged.join("gone/deleted").exists());
    assert_eq!(std::fs::read(merged.join("opq/new")).unwrap(), b"new");
    assert!(std::fs::read(merged.join("keep")).unwrap() == bottom.expect["keep"].content);
    drop(overlay);
    assert!(!mounted(merged), "overlay left mounted");
}

/// Runs `program` as `nobody` (uid and gid 65534, no supplementary groups) and returns what it
/// printed.
fn run_as_nobody(program: &Path) -> String {
    use std::os::unix::process::CommandExt;
    let out = std::process::Command::new(program)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap_or_else(|e| panic!("run {} as nobody: {e}", program.display()));
    assert!(out.status.success(), "{}: {out:?}", program.display());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Regression: a user on the node ran a layer's setuid-root binary straight from the lazy mount
/// and got euid 0. The mount is `nosuid,nodev` now; containers, which see the layer through
/// overlayfs, keep their setuid binaries and device nodes.
#[test]
fn setuid_binaries_and_devices_grant_nothing_from_the_mount_but_work_in_an_overlay() {
    use std::os::unix::fs::PermissionsExt;
    // `id` prints `euid=0(root)` when it runs with an effective uid other than its real one.
    let id = std::fs::read("/usr/bin/id").expect("coreutils' id");
    let layer = TestLayer::new()
        .dir("bin", 0o755)
        .file("bin/id", 0o4755, (0, 0), &id)
        .dir("dev", 0o755)
        .device("dev/null", 'c', 0o666, (1, 3))
        .finish();
    let m = Mounted::new(&layer, &layer.source());
    // Let `nobody` reach the mount (the node's own root keeps others out; see hermes-snapshotter).
    let dir = m.root.parent().unwrap().to_owned();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();

    let direct = run_as_nobody(&m.root.join("bin/id"));
    assert!(direct.contains("uid=65534"), "id printed {direct:?}");
    assert!(
        !direct.contains("euid=0"),
        "a setuid binary on the lazy mount raised privileges: {direct:?}"
    );
    let opened = std::fs::OpenOptions::new()
        .write(true)
        .open(m.root.join("dev/null"));
    assert_eq!(
        opened.map_err(|e| e.kind()).err(),
        Some(std::io::ErrorKind::PermissionDenied),
        "a device node on the lazy mount opened"
    );

    // overlayfs needs two lower layers when it has no upper one.
    let empty = tempfile::tempdir().unwrap();
    let overlay = Overlay::new(&[empty.path(), &m.root]);
    let merged = overlay.target.parent().unwrap();
    std::fs::set_permissions(merged, std::fs::Permissions::from_mode(0o755)).unwrap();
    let contained = run_as_nobody(&overlay.target.join("bin/id"));
    assert!(
        contained.contains("euid=0"),
        "a container's setuid binary stopped working: {contained:?}"
    );
    std::fs::OpenOptions::new()
        .write(true)
        .open(overlay.target.join("dev/null"))
        .expect("a container's device node opens");
}
