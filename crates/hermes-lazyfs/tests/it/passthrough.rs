//! Fully local reads: directories listed in tar order; FUSE passthrough once a layer is fully
//! local (reads go to per-file copies without the daemon, fall back to the daemon when the
//! kernel refuses, and never mix up bytes when the layer becomes local under an open file).

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hermes_lazyfs::{
    BackgroundFetcher, Error, LayerReader, LayerState, MountHandle, MountOptions, Outcome,
    PassthroughStats, mount_with,
};

use crate::fs::require_fuse;
use crate::layer::{Built, Source, TestLayer, noise, wait_until};

/// Files in several spans, a hardlink, a small and an empty file.
fn layer() -> Built {
    TestLayer::new()
        .dir("data", 0o755)
        .file("data/a", 0o644, (0, 0), &noise(200_000, 1))
        .file("data/small", 0o444, (1000, 1000), b"hello, passthrough\n")
        .file("data/b", 0o600, (0, 0), &noise(400_000, 2))
        .hardlink("data/b-link", "data/b")
        .file("data/empty", 0o644, (0, 0), b"")
        .finish()
}

/// The regular files of `layer` and their bytes.
fn files(layer: &Built) -> Vec<(String, Vec<u8>)> {
    [
        "data/a",
        "data/small",
        "data/b",
        "data/b-link",
        "data/empty",
    ]
    .iter()
    .map(|path| {
        // A hardlink's tar entry has no bytes of its own.
        let range = layer.file_range(path.trim_end_matches("-link"));
        let bytes = layer.tar[range.start as usize..range.end as usize].to_vec();
        (path.to_string(), bytes)
    })
    .collect()
}

/// A layer mounted with `options`, its span cache in `cache`.
struct LocalMount {
    handle: Option<MountHandle>,
    root: PathBuf,
    cache: PathBuf,
    _dir: tempfile::TempDir,
}

impl LocalMount {
    fn new(layer: &Built, source: &Source, cache: Option<&Path>, options: MountOptions) -> Self {
        require_fuse();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("mnt");
        std::fs::create_dir(&root).unwrap();
        let cache = cache.map_or_else(|| dir.path().join("cache"), Path::to_owned);
        let reader = Arc::new(layer.reader(&cache, source));
        let handle = mount_with(reader, &root, options).unwrap();
        wait_until("the mount's root inode", || {
            std::fs::metadata(&root).is_ok_and(|m| m.ino() == 1)
        });
        Self {
            handle: Some(handle),
            root,
            cache,
            _dir: dir,
        }
    }

    fn handle(&self) -> &MountHandle {
        self.handle.as_ref().unwrap()
    }

    fn reader(&self) -> &Arc<LayerReader> {
        self.handle().reader()
    }

    fn stats(&self) -> PassthroughStats {
        self.handle().passthrough_stats()
    }

    /// Fetch the rest of the layer and verify it, then wait for the copier to finish.
    fn make_fully_local(&self, layer: &Built) {
        let outcome = BackgroundFetcher::start(
            Arc::clone(self.reader()),
            layer.digest.clone(),
            layer.blob.len() as u64,
        )
        .unwrap()
        .wait();
        assert!(matches!(outcome, Outcome::FullyLocal), "{outcome:?}");
        assert_eq!(self.reader().state(), LayerState::FullyLocal);
    }

    fn read(&self, path: &str) -> Vec<u8> {
        std::fs::read(self.root.join(path))
            .unwrap_or_else(|e| panic!("reading {path} through the mount: {e}"))
    }
}

impl Drop for LocalMount {
    fn drop(&mut self) {
        drop(self.handle.take());
    }
}

/// Mount options with passthrough on.
fn passthrough() -> MountOptions {
    MountOptions {
        passthrough: true,
        ..MountOptions::default()
    }
}

fn require_passthrough(stats: &PassthroughStats) {
    assert!(
        stats.negotiated,
        "the kernel did not agree to FUSE passthrough: these tests need Linux >= 6.9 with \
         CONFIG_FUSE_PASSTHROUGH ({stats:?})"
    );
}

#[test]
fn a_fully_local_layer_is_read_by_passthrough_from_private_copies() {
    let layer = layer();
    let source = layer.source();
    let m = LocalMount::new(&layer, &source, None, passthrough());
    require_passthrough(&m.stats());
    assert!(
        !m.cache.join("files").exists(),
        "nothing is copied while the layer is lazy"
    );
    m.make_fully_local(&layer);
    wait_until("every file copied", || m.stats().complete);
    // One copy per inode with bytes: the hardlink shares its target's, the empty file has none.
    assert_eq!(m.stats().files, 3, "{:?}", m.stats());

    let requests = m.reader().stats().requests;
    for (path, bytes) in files(&layer) {
        assert!(
            m.read(&path) == bytes,
            "{path}: wrong bytes through passthrough"
        );
    }
    let stats = m.stats();
    assert_eq!(
        stats.opens, 4,
        "every non-empty file opened by passthrough: {stats:?}"
    );
    assert_eq!(stats.fallback_opens, 0, "{stats:?}");
    assert!(!stats.refused, "{stats:?}");
    assert_eq!(
        m.reader().stats().requests,
        requests,
        "passthrough reads never reach the daemon's reader"
    );
    // The copies are private to the daemon whatever the layer's modes say.
    let dir = m.cache.join("files");
    let meta = std::fs::metadata(&dir).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o700, "files dir mode");
    assert_eq!(meta.uid(), 0);
    let mut copies = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        let name = entry.file_name();
        copies += 1;
        assert_eq!(
            meta.permissions().mode() & 0o7777,
            0o600,
            "{name:?} must be readable by its owner only"
        );
        assert_eq!(meta.uid(), 0, "{name:?} owner");
    }
    assert_eq!(copies, 3, "one copy per file with bytes");

    // The copies are the only copy: their bytes left the span cache, which now refuses to
    // read them rather than return the zeros of the holes.
    let data = std::fs::metadata(m.cache.join("data")).unwrap();
    let moved: u64 = files(&layer)[..3].iter().map(|(_, b)| b.len() as u64).sum();
    assert!(
        data.blocks() * 512 < layer.tar.len() as u64 - moved + 64 * 1024,
        "data still takes {} bytes on disk for a {}-byte tar of which {moved} were moved",
        data.blocks() * 512,
        layer.tar.len()
    );
    let range = layer.file_range("data/a");
    let err = m.reader().read(range.start, 10).unwrap_err();
    assert!(matches!(err, Error::MovedToCopies { .. }), "{err:?}");
}

#[test]
fn copies_of_an_earlier_run_are_reused_and_a_new_ztoc_discards_them() {
    let layer = layer();
    let source = layer.source();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    {
        let m = LocalMount::new(&layer, &source, Some(&cache), passthrough());
        m.make_fully_local(&layer);
        wait_until("every file copied", || m.stats().complete);
    }
    let copy = std::fs::read_dir(cache.join("files"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .next()
        .unwrap();
    let ino = std::fs::metadata(&copy).unwrap().ino();
    let m = LocalMount::new(&layer, &source, Some(&cache), passthrough());
    m.make_fully_local(&layer);
    wait_until("every file copied", || m.stats().complete);
    assert_eq!(
        std::fs::metadata(&copy).unwrap().ino(),
        ino,
        "the complete copies of the last run are used as they are"
    );
    for (path, bytes) in files(&layer) {
        assert!(m.read(&path) == bytes, "{path}: wrong bytes");
    }
    assert_eq!(m.stats().opens, 4, "{:?}", m.stats());
    drop(m);

    // Another layer in the same cache directory: the old copies go with the old spans.
    let other = TestLayer::new()
        .file("x", 0o644, (0, 0), b"another layer")
        .finish();
    let source = other.source();
    let m = LocalMount::new(&other, &source, Some(&cache), passthrough());
    assert!(
        !cache.join("files").exists(),
        "copies of another zTOC are removed with its spans"
    );
    m.make_fully_local(&other);
    wait_until("every file copied", || m.stats().complete);
    assert_eq!(m.read("x"), b"another layer");
}

/// A writable overlayfs mount, to hold a span cache on a stacked filesystem.
struct WritableOverlay {
    merged: PathBuf,
    _dir: tempfile::TempDir,
}

impl WritableOverlay {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let [lower, upper, work, merged] =
            ["lower", "upper", "work", "merged"].map(|d| dir.path().join(d));
        for d in [&lower, &upper, &work, &merged] {
            std::fs::create_dir(d).unwrap();
        }
        let out = std::process::Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(format!(
                "lowerdir={},upperdir={},workdir={}",
                lower.display(),
                upper.display(),
                work.display()
            ))
            .arg(&merged)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mounting overlayfs failed (needs the overlay module): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { merged, _dir: dir }
    }
}

impl Drop for WritableOverlay {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(&self.merged)
            .status();
    }
}

#[test]
fn passthrough_refused_by_the_kernel_falls_back_to_the_daemon() {
    // The kernel refuses backing files on a stacked filesystem (ELOOP): a cache on overlayfs,
    // as when the node daemon runs in a container.
    let overlay = WritableOverlay::new();
    let layer = layer();
    let source = layer.source();
    let cache = overlay.merged.join("cache");
    let m = LocalMount::new(&layer, &source, Some(&cache), passthrough());
    require_passthrough(&m.stats());
    m.make_fully_local(&layer);
    wait_until("every file copied", || m.stats().complete);
    let requests = m.reader().stats().requests;
    for _ in 0..2 {
        for (path, bytes) in files(&layer) {
            assert!(
                m.read(&path) == bytes,
                "{path}: wrong bytes after the fallback"
            );
        }
    }
    let stats = m.stats();
    assert!(stats.refused, "{stats:?}");
    assert_eq!(stats.opens, 0, "{stats:?}");
    assert_eq!(
        stats.fallback_opens, 8,
        "every open of a copied file fell back: {stats:?}"
    );
    assert_eq!(
        m.reader().stats().requests,
        requests,
        "the daemon served the reads from the copies, not from the span cache"
    );
    drop(m);
}

#[test]
fn without_passthrough_nothing_is_copied_and_the_daemon_serves_reads() {
    let layer = layer();
    let source = layer.source();
    let m = LocalMount::new(&layer, &source, None, MountOptions::default());
    m.make_fully_local(&layer);
    for (path, bytes) in files(&layer) {
        assert!(m.read(&path) == bytes, "{path}: wrong bytes");
    }
    let stats = m.stats();
    assert!(!stats.negotiated && stats.opens == 0, "{stats:?}");
    assert!(
        !m.cache.join("files").exists(),
        "no copies without passthrough"
    );
}

#[test]
fn a_file_open_while_the_layer_becomes_local_keeps_its_bytes_and_later_opens_pass_through() {
    let layer = layer();
    let source = layer.source();
    let m = LocalMount::new(&layer, &source, None, passthrough());
    require_passthrough(&m.stats());
    let expected = files(&layer)[2].1.clone(); // data/b, several spans
    let path = m.root.join("data/b");
    let mut early = std::fs::File::open(&path).unwrap();
    let mut first = vec![0; 100_000];
    early.read_exact(&mut first).unwrap();
    assert!(first == expected[..100_000]);

    m.make_fully_local(&layer);
    wait_until("every file copied", || m.stats().complete);
    // The inode is open in cached mode: the kernel would fail a passthrough open of it with
    // EIO, so this one is served by the daemon too, and both read the right bytes.
    let mut late = std::fs::File::open(&path).unwrap();
    let mut all = Vec::new();
    late.read_to_end(&mut all).unwrap();
    assert!(all == expected, "second open: wrong bytes");
    let mut rest = Vec::new();
    early.read_to_end(&mut rest).unwrap();
    assert!(
        rest == expected[100_000..],
        "first open: wrong bytes after the switch"
    );
    let stats = m.stats();
    assert_eq!((stats.opens, stats.fallback_opens), (0, 1), "{stats:?}");
    // Hardlink, same inode: still open in cached mode.
    assert!(m.read("data/b-link") == expected);
    // Other files pass through right away.
    assert!(m.read("data/a") == files(&layer)[0].1);
    assert_eq!(m.stats().opens, 1, "{:?}", m.stats());

    // Once the cached opens are released (asynchronously), the inode passes through as well.
    drop(early);
    drop(late);
    wait_until("an open of data/b by passthrough", || {
        let before = m.stats().opens;
        let bytes = std::fs::read(&path).unwrap();
        assert!(
            bytes == expected,
            "wrong bytes while switching to passthrough"
        );
        m.stats().opens > before
    });
    // Two passthrough opens at once share the inode's backing file.
    let mut one = std::fs::File::open(&path).unwrap();
    let mut two = std::fs::File::open(&path).unwrap();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    one.read_to_end(&mut a).unwrap();
    two.read_to_end(&mut b).unwrap();
    assert!(a == expected && b == expected);
}

#[test]
fn directories_list_in_tar_order_so_a_tree_walk_reads_the_layer_front_to_back() {
    // Names against their tar order, and enough of them for several readdir replies.
    let names: Vec<String> = (0..300).rev().map(|i| format!("file-{i:03}")).collect();
    let mut built = TestLayer::new().dir("d", 0o755);
    built = built
        .file("d/zeta", 0o644, (0, 0), b"z")
        .dir("d/sub", 0o755);
    for name in &names {
        built = built.file(&format!("d/{name}"), 0o644, (0, 0), name.as_bytes());
    }
    let layer = built.file("d/alpha", 0o644, (0, 0), b"a").finish();
    let source = layer.source();
    let m = LocalMount::new(&layer, &source, None, MountOptions::default());
    let listed: Vec<String> = std::fs::read_dir(m.root.join("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let mut expected = vec!["zeta".to_string(), "sub".to_string()];
    expected.extend(names.iter().cloned());
    expected.push("alpha".into());
    assert_eq!(listed, expected, "readdir order is the tar's");
    // The attributes readdirplus returned are the entries' own.
    let meta = std::fs::symlink_metadata(m.root.join("d/sub")).unwrap();
    assert!(meta.is_dir());
    assert_eq!(m.read("d/file-007"), b"file-007");
}
