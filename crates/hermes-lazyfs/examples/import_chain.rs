//! Benchmark of open-time prefetch: a generated layer of many small files (a Python
//! site-packages stand-in) read over FUSE as a chain of dependent whole-file reads, the way
//! imports read modules, from a source throttled like a registry link (one shared bandwidth,
//! a fixed latency per request). Prints the time with prefetch off, for the opened file only,
//! and with neighbours, and the ratios to off, all in one run.
//!
//! Run by `bench/import-chain.sh`; `cargo run -p hermes-lazyfs --example import_chain -- --help`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hermes_lazyfs::{LayerReader, MountOptions, OpenPrefetch, SpanCache, mount_with};
use hermes_ztoc::{BuildOptions, RangeReader};

/// A blob in memory behind a link of `rate` bytes/s shared by all requests (served in order)
/// and `latency` per request.
struct Throttled {
    blob: Arc<Vec<u8>>,
    rate: f64,
    latency: Duration,
    link_free_at: Arc<Mutex<Instant>>,
}

impl RangeReader for Throttled {
    fn read_at(&self, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
        std::thread::sleep(self.latency);
        let done = {
            let mut free = self.link_free_at.lock().unwrap();
            let start = (*free).max(Instant::now());
            *free = start + Duration::from_secs_f64(len as f64 / self.rate);
            *free
        };
        std::thread::sleep(done.saturating_duration_since(Instant::now()));
        let (start, end) = (offset as usize, (offset + len) as usize);
        self.blob
            .get(start..end)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| std::io::Error::other("range past the blob"))
    }
}

struct Args {
    packages: usize,
    files: usize,
    read_fraction: f64,
    rate_mbps: f64,
    latency_ms: u64,
    span_size: u64,
}

fn parse() -> Args {
    let mut a = Args {
        packages: 150,
        files: 20,
        read_fraction: 0.5,
        rate_mbps: 32.0,
        latency_ms: 20,
        span_size: BuildOptions::default().span_size,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    for pair in argv.chunks(2) {
        let value = pair.get(1).map(String::as_str).unwrap_or("");
        match pair[0].as_str() {
            "--packages" => a.packages = value.parse().expect("--packages N"),
            "--files" => a.files = value.parse().expect("--files N"),
            "--read-fraction" => a.read_fraction = value.parse().expect("--read-fraction F"),
            "--rate-mbps" => a.rate_mbps = value.parse().expect("--rate-mbps MB/s"),
            "--latency-ms" => a.latency_ms = value.parse().expect("--latency-ms MS"),
            "--span-size" => a.span_size = value.parse().expect("--span-size BYTES"),
            _ => {
                eprintln!(
                    "usage: import_chain [--packages 150] [--files 20] [--read-fraction 0.5] \
                     [--rate-mbps 32] [--latency-ms 20] [--span-size 4194304]"
                );
                std::process::exit(2);
            }
        }
    }
    a
}

/// xorshift, for reproducible layers and orders.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Text that compresses about as well as bytecode (3-4x).
fn module(rng: &mut Rng, len: usize) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "def ", "return ", "self", "import ", "numpy", "array", "(", ")", ":", "\n    ", "x", "y",
        "_", "0", "1", "if ", "else", "for ", "in ", "None", "class ", "axis", "dtype", "=",
    ];
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        let r = rng.next();
        if r.is_multiple_of(5) {
            out.extend_from_slice(format!("{:x}", r >> 20).as_bytes());
        } else {
            out.extend_from_slice(WORDS[(r >> 8) as usize % WORDS.len()].as_bytes());
        }
    }
    out.truncate(len);
    out
}

fn build_layer(a: &Args) -> (Vec<u8>, Vec<Vec<String>>, u64) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut tar = tar::Builder::new(Vec::new());
    let mut packages = Vec::new();
    let mut size = 0u64;
    for p in 0..a.packages {
        let mut names = Vec::new();
        for f in 0..a.files {
            let len = 2_000 + (rng.next() % 38_000) as usize;
            let name = format!("site-packages/pkg{p:03}/__pycache__/mod{f:02}.pyc");
            let mut h = tar::Header::new_ustar();
            h.set_path(&name).unwrap();
            h.set_mode(0o644);
            h.set_size(len as u64);
            h.set_cksum();
            tar.append(&h, module(&mut rng, len).as_slice()).unwrap();
            size += len as u64;
            names.push(name);
        }
        packages.push(names);
    }
    let tar = tar.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar).unwrap();
    (gz.finish().unwrap(), packages, size)
}

/// Mount a fresh cache of the layer and read the chain; returns the time and range requests.
fn run(
    blob: &Arc<Vec<u8>>,
    ztoc: &Arc<hermes_ztoc::Ztoc>,
    chain: &[PathBuf],
    a: &Args,
    prefetch: Option<OpenPrefetch>,
) -> (Duration, u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let source = Throttled {
        blob: Arc::clone(blob),
        rate: a.rate_mbps * 1e6,
        latency: Duration::from_millis(a.latency_ms),
        link_free_at: Arc::new(Mutex::new(Instant::now())),
    };
    let cache = SpanCache::open(&dir.path().join("cache"), ztoc).unwrap();
    let reader = Arc::new(LayerReader::new(Arc::clone(ztoc), source, cache));
    let options = MountOptions {
        open_prefetch: prefetch,
        ..MountOptions::default()
    };
    let handle = mount_with(Arc::clone(&reader), &mnt, options).unwrap();
    let started = Instant::now();
    for path in chain {
        // Dependent: the next import starts when this module is read.
        std::hint::black_box(std::fs::read(mnt.join(path)).unwrap());
    }
    let took = started.elapsed();
    let stats = reader.stats();
    handle.unmount().unwrap();
    (took, stats.range_requests, stats.bytes_fetched)
}

fn main() {
    let a = parse();
    let (blob, packages, size) = build_layer(&a);
    let ztoc = Arc::new(
        hermes_ztoc::build(
            blob.as_slice(),
            &BuildOptions {
                span_size: a.span_size,
                ..BuildOptions::default()
            },
        )
        .unwrap(),
    );
    // Imports jump between packages (not in tar order) and read a package's modules in turn.
    let mut rng = Rng(42);
    let mut order: Vec<usize> = (0..packages.len()).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.next() as usize % (i + 1));
    }
    let take = ((packages.len() as f64) * a.read_fraction).ceil() as usize;
    let chain: Vec<PathBuf> = order[..take]
        .iter()
        .flat_map(|&p| packages[p].iter().map(|n| Path::new(n).to_owned()))
        .collect();
    println!(
        "layer: {} files, {:.1} MB tar, {:.1} MB gzip, {} spans; chain: {} files; link {} MB/s, {} ms per request",
        packages.iter().map(Vec::len).sum::<usize>(),
        size as f64 / 1e6,
        blob.len() as f64 / 1e6,
        ztoc.span_count(),
        chain.len(),
        a.rate_mbps,
        a.latency_ms
    );
    let blob = Arc::new(blob);
    let modes = [
        ("off", None),
        (
            "file",
            Some(OpenPrefetch {
                sibling_spans: 0,
                ..OpenPrefetch::default()
            }),
        ),
        ("file+neighbours", Some(OpenPrefetch::default())),
    ];
    let mut base = None;
    for (name, prefetch) in modes {
        let (took, requests, bytes) = run(&blob, &ztoc, &chain, &a, prefetch);
        let base = *base.get_or_insert(took);
        println!(
            "prefetch {name:<16} {:>7.2} s  {requests:>5} requests  {:>6.1} MB fetched  ratio off/this {:.2}",
            took.as_secs_f64(),
            bytes as f64 / 1e6,
            base.as_secs_f64() / took.as_secs_f64()
        );
    }
}
