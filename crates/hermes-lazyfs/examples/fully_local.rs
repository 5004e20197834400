//! Mounts one gzip tar layer, made fully local from a file, for `bench/fully-local.sh`: the
//! zTOC is built from the file, and the layer is mounted twice, each from its own span cache
//! that a background fetcher filled from the file and verified: once with passthrough
//! (waiting until every file's copy is in place) and once with every read served by the
//! daemon from the span cache (as before passthrough, or on a kernel without it). Prints
//! `ready` with the passthrough counters, then serves until stdin closes, and prints the
//! counters again.
//!
//! `fully_local LAYER.tar.gz CACHE_DIR PASSTHROUGH_MOUNT DAEMON_MOUNT [SPAN_SIZE]`
//! (the caches are `CACHE_DIR/passthrough` and `CACHE_DIR/daemon`)

use std::fs::File;
use std::io::{BufRead, Read};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hermes_lazyfs::{
    BackgroundFetcher, LayerDigest, LayerReader, MountOptions, Outcome, SpanCache, mount_with,
};
use hermes_ztoc::{BuildOptions, RangeReader};
use sha2::{Digest, Sha256};

/// The layer blob as a local file.
struct FileSource(File);

impl RangeReader for FileSource {
    fn read_at(&self, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0; len as usize];
        self.0.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [layer, cache, pt_mount, daemon_mount, rest @ ..] = args.as_slice() else {
        eprintln!(
            "usage: fully_local LAYER.tar.gz CACHE_DIR PASSTHROUGH_MOUNT DAEMON_MOUNT [SPAN_SIZE]"
        );
        std::process::exit(2);
    };
    let span_size = match rest.first() {
        Some(s) => s.parse()?,
        None => BuildOptions::default().span_size,
    };
    let started = Instant::now();
    let ztoc = hermes_ztoc::build(
        std::io::BufReader::new(File::open(layer)?),
        &BuildOptions {
            span_size,
            ..BuildOptions::default()
        },
    )?;
    let mut hasher = Sha256::new();
    let mut file = File::open(layer)?;
    let mut buf = vec![0; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    let hex: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let digest = LayerDigest::parse(&format!("sha256:{hex}"))?;
    let ztoc = Arc::new(ztoc);
    let fully_local = |name: &str| -> Result<Arc<LayerReader>, Box<dyn std::error::Error>> {
        let cache = SpanCache::open(&PathBuf::from(cache).join(name), &ztoc)?;
        let reader = Arc::new(LayerReader::new(
            Arc::clone(&ztoc),
            FileSource(File::open(layer)?),
            cache,
        ));
        match BackgroundFetcher::start(Arc::clone(&reader), digest.clone(), size)?.wait() {
            Outcome::FullyLocal => Ok(reader),
            other => Err(format!("the layer did not become fully local: {other:?}").into()),
        }
    };
    let pt_reader = fully_local("passthrough")?;
    let daemon_reader = fully_local("daemon")?;
    eprintln!(
        "fully local: {} entries, {} spans, {:.1} s",
        ztoc.entries().len(),
        ztoc.span_count(),
        started.elapsed().as_secs_f64()
    );

    let passthrough = mount_with(
        pt_reader,
        &PathBuf::from(pt_mount),
        MountOptions {
            passthrough: true,
            ..MountOptions::default()
        },
    )?;
    let daemon = mount_with(
        daemon_reader,
        &PathBuf::from(daemon_mount),
        MountOptions::default(),
    )?;
    let copying = Instant::now();
    while passthrough.passthrough_stats().negotiated && !passthrough.passthrough_stats().complete {
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "ready copy_seconds={:.1} {:?}",
        copying.elapsed().as_secs_f64(),
        passthrough.passthrough_stats()
    );
    // Serve until the script closes stdin.
    for _ in std::io::stdin().lock().lines() {}
    println!("passthrough {:?}", passthrough.passthrough_stats());
    println!("daemon {:?}", daemon.passthrough_stats());
    passthrough.unmount()?;
    daemon.unmount()?;
    Ok(())
}
