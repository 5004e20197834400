//! Test layers: a tar built with the `tar` crate, gzipped, indexed with a small span size, and a
//! range reader over the blob that counts, corrupts, fails or holds reads on request.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use hermes_lazyfs::{LayerDigest, LayerReader, SpanCache};
use hermes_ztoc::{BuildOptions, RangeReader, Ztoc};
use sha2::{Digest, Sha256};

pub const SPAN: u64 = 64 << 10;

/// Pseudo-random bytes that gzip cannot shrink much (so spans have real compressed extents).
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// What a path should look like after unpacking.
#[derive(Debug, Clone)]
pub struct Expect {
    pub kind: char,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u64,
    pub content: Vec<u8>,
    pub link: String,
    pub rdev: (u32, u32),
    pub xattrs: Vec<(String, Vec<u8>)>,
}

impl Expect {
    fn new(kind: char, mode: u32, mtime: u64) -> Self {
        Self {
            kind,
            mode,
            uid: 0,
            gid: 0,
            mtime,
            content: Vec::new(),
            link: String::new(),
            rdev: (0, 0),
            xattrs: Vec::new(),
        }
    }
}

/// Builds a tar layer and records what each path should be.
pub struct TestLayer {
    tar: tar::Builder<Vec<u8>>,
    pub expect: BTreeMap<String, Expect>,
    clock: u64,
}

/// A built layer.
pub struct Built {
    pub tar: Vec<u8>,
    pub blob: Vec<u8>,
    pub ztoc: Arc<Ztoc>,
    pub digest: LayerDigest,
    pub expect: BTreeMap<String, Expect>,
}

impl TestLayer {
    pub fn new() -> Self {
        Self {
            tar: tar::Builder::new(Vec::new()),
            expect: BTreeMap::new(),
            clock: 1_700_000_000,
        }
    }

    fn header(&mut self, path: &str, kind: tar::EntryType, mode: u32) -> (tar::Header, u64) {
        let mut h = tar::Header::new_ustar();
        h.set_path(path).unwrap();
        h.set_entry_type(kind);
        h.set_mode(mode);
        self.clock += 17;
        h.set_mtime(self.clock);
        h.set_size(0);
        (h, self.clock)
    }

    fn append(&mut self, mut h: tar::Header, data: &[u8]) {
        h.set_cksum();
        self.tar.append(&h, data).unwrap();
    }

    /// Record `e` at `path`, replacing what was there, with implicit parents.
    fn put(&mut self, path: &str, e: Expect) {
        let mut parent = String::new();
        for part in path
            .split('/')
            .rev()
            .skip(1)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
        {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            let keep = self.expect.get(&parent).is_some_and(|e| e.kind == 'd');
            if !keep {
                self.remove(&parent.clone());
                self.expect
                    .insert(parent.clone(), Expect::new('d', 0o755, 0));
            }
        }
        let was_dir = self.expect.get(path).is_some_and(|old| old.kind == 'd');
        if !(was_dir && e.kind == 'd') {
            self.remove(path);
        }
        let xattrs = match self.expect.get(path) {
            Some(old) if was_dir && e.kind == 'd' => old
                .xattrs
                .iter()
                .filter(|(k, _)| k == "trusted.overlay.opaque")
                .cloned()
                .chain(e.xattrs.clone())
                .collect(),
            _ => e.xattrs.clone(),
        };
        self.expect.insert(path.to_owned(), Expect { xattrs, ..e });
    }

    fn remove(&mut self, path: &str) {
        let prefix = format!("{path}/");
        self.expect
            .retain(|k, _| k != path && !k.starts_with(&prefix));
    }

    pub fn dir(mut self, path: &str, mode: u32) -> Self {
        let (h, mtime) = self.header(&format!("{path}/"), tar::EntryType::Directory, mode);
        self.append(h, &[]);
        self.put(path, Expect::new('d', mode, mtime));
        self
    }

    pub fn file(self, path: &str, mode: u32, owner: (u32, u32), data: &[u8]) -> Self {
        self.file_with_xattrs(path, mode, owner, data, &[])
    }

    pub fn file_with_xattrs(
        mut self,
        path: &str,
        mode: u32,
        (uid, gid): (u32, u32),
        data: &[u8],
        xattrs: &[(&str, &[u8])],
    ) -> Self {
        if !xattrs.is_empty() {
            let records: Vec<(String, &[u8])> = xattrs
                .iter()
                .map(|(k, v)| (format!("SCHILY.xattr.{k}"), *v))
                .collect();
            self.tar
                .append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), *v)))
                .unwrap();
        }
        let (mut h, mtime) = self.header(path, tar::EntryType::Regular, mode);
        h.set_uid(u64::from(uid));
        h.set_gid(u64::from(gid));
        h.set_size(data.len() as u64);
        self.append(h, data);
        let mut e = Expect::new('-', mode, mtime);
        e.uid = uid;
        e.gid = gid;
        e.content = data.to_vec();
        e.xattrs = xattrs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.to_vec()))
            .collect();
        self.put(path, e);
        self
    }

    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        let (mut h, mtime) = self.header(path, tar::EntryType::Symlink, 0o777);
        h.set_link_name(target).unwrap();
        self.append(h, &[]);
        let mut e = Expect::new('l', 0o777, mtime);
        e.link = target.to_owned();
        self.put(path, e);
        self
    }

    pub fn hardlink(mut self, path: &str, target: &str) -> Self {
        let (mut h, _) = self.header(path, tar::EntryType::Link, 0o644);
        h.set_link_name(target).unwrap();
        self.append(h, &[]);
        let e = self.expect[target].clone();
        self.put(path, e);
        self
    }

    /// A GNU sparse file as `tar --format=posix --sparse` writes it (PAX format 1.0: the map
    /// at the start of the data, then the packed fragments): `size` bytes, data at each
    /// (offset, bytes) of `fragments`, zeros elsewhere.
    pub fn sparse_file(mut self, path: &str, size: u64, fragments: &[(u64, &[u8])]) -> Self {
        let size_text = size.to_string();
        let records = [
            ("GNU.sparse.major", "1"),
            ("GNU.sparse.minor", "0"),
            ("GNU.sparse.name", path),
            ("GNU.sparse.realsize", size_text.as_str()),
        ];
        self.tar
            .append_pax_extensions(records.iter().map(|(k, v)| (*k, v.as_bytes())))
            .unwrap();
        let mut data = format!("{}\n", fragments.len()).into_bytes();
        for (at, bytes) in fragments {
            data.extend(format!("{at}\n{}\n", bytes.len()).bytes());
        }
        data.resize(data.len().next_multiple_of(512), 0);
        let mut content = vec![0; size as usize];
        for (at, bytes) in fragments {
            data.extend_from_slice(bytes);
            content[*at as usize..*at as usize + bytes.len()].copy_from_slice(bytes);
        }
        let (mut h, mtime) = self.header(
            &format!("GNUSparseFile.0/{path}"),
            tar::EntryType::Regular,
            0o644,
        );
        h.set_size(data.len() as u64);
        self.append(h, &data);
        let mut e = Expect::new('-', 0o644, mtime);
        e.content = content;
        self.put(path, e);
        self
    }

    pub fn fifo(mut self, path: &str, mode: u32) -> Self {
        let (h, mtime) = self.header(path, tar::EntryType::Fifo, mode);
        self.append(h, &[]);
        self.put(path, Expect::new('p', mode, mtime));
        self
    }

    pub fn device(mut self, path: &str, kind: char, mode: u32, (major, minor): (u32, u32)) -> Self {
        let ty = if kind == 'c' {
            tar::EntryType::Char
        } else {
            tar::EntryType::Block
        };
        let (mut h, mtime) = self.header(path, ty, mode);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.append(h, &[]);
        let mut e = Expect::new(kind, mode, mtime);
        e.rdev = (major, minor);
        self.put(path, e);
        self
    }

    /// `dir/.wh.name`: shows as a 0/0 character device `dir/name` with mode 0.
    pub fn whiteout(mut self, dir: &str, name: &str) -> Self {
        let (mut h, mtime) =
            self.header(&format!("{dir}/.wh.{name}"), tar::EntryType::Regular, 0o644);
        h.set_uid(7);
        h.set_gid(8);
        self.append(h, &[]);
        let mut e = Expect::new('c', 0, mtime);
        e.uid = 7;
        e.gid = 8;
        self.put(&format!("{dir}/{name}"), e);
        self
    }

    /// `dir/.wh..wh..opq`: hidden; `dir` gets `trusted.overlay.opaque=y`.
    pub fn opaque(mut self, dir: &str) -> Self {
        let (h, _) = self.header(
            &format!("{dir}/.wh..wh..opq"),
            tar::EntryType::Regular,
            0o644,
        );
        self.append(h, &[]);
        let d = self.expect.get_mut(dir).expect("opaque dir must exist");
        d.xattrs.retain(|(k, _)| k != "trusted.overlay.opaque");
        d.xattrs
            .push(("trusted.overlay.opaque".into(), b"y".to_vec()));
        self
    }

    pub fn finish(self) -> Built {
        let tar = self.tar.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&tar).unwrap();
        let blob = gz.finish().unwrap();
        let options = BuildOptions {
            span_size: SPAN,
            ..BuildOptions::default()
        };
        let ztoc = hermes_ztoc::build(&blob[..], &options).unwrap();
        let digest = LayerDigest::parse(&sha256(&blob)).unwrap();
        Built {
            tar,
            blob,
            ztoc: Arc::new(ztoc),
            digest,
            expect: self.expect,
        }
    }
}

pub fn sha256(bytes: &[u8]) -> String {
    let hex: String = Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

/// A layer of a few files of noise spanning about ten 64 KiB spans.
pub fn multi_span_layer() -> Built {
    TestLayer::new()
        .dir("data", 0o755)
        .file("data/a", 0o644, (0, 0), &noise(200_000, 1))
        .file("data/small", 0o644, (0, 0), b"hello, lazy world\n")
        .file("data/b", 0o644, (0, 0), &noise(400_000, 2))
        .finish()
}

impl Built {
    /// A reader over this layer with its cache in `dir`, fetching through `source`.
    pub fn reader(&self, dir: &Path, source: &Source) -> LayerReader {
        let cache = SpanCache::open(dir, &self.ztoc).unwrap();
        LayerReader::new(Arc::clone(&self.ztoc), source.clone(), cache)
    }

    pub fn source(&self) -> Source {
        Source::new(self.blob.clone())
    }

    /// Offset and size of a regular file's bytes in the tar.
    pub fn file_range(&self, path: &str) -> Range<u64> {
        let e = self
            .ztoc
            .entries()
            .iter()
            .rev()
            .find(|e| e.name == path.as_bytes())
            .unwrap();
        e.offset..e.offset + e.size
    }
}

#[derive(Default)]
struct Faults {
    /// Blob offsets whose byte is flipped, with how many more reads to corrupt (`u64::MAX`:
    /// forever).
    corrupt: Vec<(u64, u64)>,
    /// Reads left to fail.
    fail: u64,
    /// Reads left to panic (a buggy reader).
    panic: u64,
    /// Reads wait while held.
    held: bool,
    /// Reads overlapping one of these blob ranges wait until [`Source::release`].
    held_ranges: Vec<Range<u64>>,
    /// How long every read takes (a slow registry).
    delay: Duration,
    /// Reads waiting now.
    blocked: u64,
}

/// A range reader over an in-memory blob that logs every request.
#[derive(Clone)]
pub struct Source(Arc<SourceInner>);

struct SourceInner {
    blob: Vec<u8>,
    requests: AtomicU64,
    bytes: AtomicU64,
    log: Mutex<Vec<Range<u64>>>,
    faults: Mutex<Faults>,
    changed: Condvar,
    /// Reads in progress now, and the most at once.
    in_flight: AtomicU64,
    peak: AtomicU64,
}

impl Source {
    pub fn new(blob: Vec<u8>) -> Self {
        Self(Arc::new(SourceInner {
            blob,
            requests: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            log: Mutex::new(Vec::new()),
            faults: Mutex::new(Faults::default()),
            changed: Condvar::new(),
            in_flight: AtomicU64::new(0),
            peak: AtomicU64::new(0),
        }))
    }
    pub fn requests(&self) -> u64 {
        self.0.requests.load(Ordering::SeqCst)
    }
    pub fn bytes(&self) -> u64 {
        self.0.bytes.load(Ordering::SeqCst)
    }
    pub fn log(&self) -> Vec<Range<u64>> {
        self.0.log.lock().unwrap().clone()
    }
    /// Flip the byte at blob offset `at` in the next `times` reads that cover it.
    pub fn corrupt(&self, at: u64, times: u64) {
        self.0.faults.lock().unwrap().corrupt.push((at, times));
    }
    /// Fail the next `n` reads.
    pub fn fail(&self, n: u64) {
        self.0.faults.lock().unwrap().fail = n;
    }
    /// Panic in the next `n` reads.
    pub fn panic(&self, n: u64) {
        self.0.faults.lock().unwrap().panic = n;
    }
    /// Make reads wait until [`Source::release`].
    pub fn hold(&self) {
        self.0.faults.lock().unwrap().held = true;
    }
    /// Make reads that overlap `range` (blob offsets) wait until [`Source::release`].
    pub fn hold_range(&self, range: Range<u64>) {
        self.0.faults.lock().unwrap().held_ranges.push(range);
    }
    /// Make every read take `delay`.
    pub fn slow(&self, delay: Duration) {
        self.0.faults.lock().unwrap().delay = delay;
    }
    /// The most reads that were in progress at once.
    pub fn peak_concurrency(&self) -> u64 {
        self.0.peak.load(Ordering::SeqCst)
    }
    pub fn release(&self) {
        let mut faults = self.0.faults.lock().unwrap();
        faults.held = false;
        faults.held_ranges.clear();
        drop(faults);
        self.0.changed.notify_all();
    }
    /// Reads waiting in [`Source::hold`] now.
    pub fn blocked(&self) -> u64 {
        self.0.faults.lock().unwrap().blocked
    }
}

impl RangeReader for Source {
    fn read_at(&self, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        let inner = &self.0;
        inner.requests.fetch_add(1, Ordering::SeqCst);
        inner.log.lock().unwrap().push(offset..offset + len);
        let now = inner.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        inner.peak.fetch_max(now, Ordering::SeqCst);
        let _done = InFlight(&inner.in_flight);
        let mut faults = inner.faults.lock().unwrap();
        faults.blocked += 1;
        let range = offset..offset + len;
        while faults.held
            || faults
                .held_ranges
                .iter()
                .any(|h| h.start < range.end && range.start < h.end)
        {
            faults = inner.changed.wait(faults).unwrap();
        }
        faults.blocked -= 1;
        let delay = faults.delay;
        if !delay.is_zero() {
            drop(faults);
            std::thread::sleep(delay);
            faults = inner.faults.lock().unwrap();
        }
        if faults.panic > 0 {
            faults.panic -= 1;
            drop(faults);
            panic!("injected panic in the range reader");
        }
        if faults.fail > 0 {
            faults.fail -= 1;
            return Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "injected failure",
            ));
        }
        let mut data = inner.blob.read_at(offset, len)?;
        for (at, times) in &mut faults.corrupt {
            if *times > 0 && (offset..offset + len).contains(at) {
                data[(*at - offset) as usize] ^= 0xff;
                *times = times.saturating_sub(1);
            }
        }
        inner.bytes.fetch_add(len, Ordering::SeqCst);
        Ok(data)
    }
}

/// Counts a read out of [`SourceInner::in_flight`] when it ends, however it ends.
struct InFlight<'a>(&'a AtomicU64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Poll `cond` until it holds (10 s at most).
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}
