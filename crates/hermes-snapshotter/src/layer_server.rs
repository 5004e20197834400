//! One lazy layer served by its own process (`hermes layer serve`): the FUSE mount, its span
//! cache, the background fetch, and a stats file the node daemon reads for `/metrics`.
//!
//! Why a process per layer: a container's overlay keeps using a lazy layer for as long as it
//! runs. If the FUSE server lived inside the node daemon, a crash or `kill -9` of the daemon
//! would abort every mount and break every running container. With the mounts in their own
//! processes (their own process group, not children that die with the daemon), the daemon can
//! die and restart: it finds the mounts alive and adopts them, and running containers never
//! notice. A mount whose process died is mounted again at the same path on restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hermes_lazyfs::{
    BackgroundFetcher, DEFAULT_FAST_PARALLEL, LayerDigest, LayerReader, LayerState, Pace, QUIET,
    SpanCache,
};
use hermes_node_api::NodeMode;
use hermes_oci::{Client, Digest, HostStats, Reference, RegistryRangeReader};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::{Error, Result};

/// Environment the node gives each layer server. glibc gives every thread that allocates its
/// own malloc arena and keeps what they free: with the FUSE threads' per-request buffers that
/// grew a server by about 1 MiB per 1,000 entries walked; with one arena, by none
/// (`bench/results/layer-rss.md`). An operator's own setting wins.
pub const SERVER_ENV: &[(&str, &str)] = &[("MALLOC_ARENA_MAX", "1")];

/// What `hermes layer serve` needs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The layer's zTOC file.
    pub ztoc: PathBuf,
    /// An image that has the layer (its repository serves the blob).
    pub image: String,
    /// The layer digest.
    pub layer: String,
    /// Span cache directory (kept across restarts).
    pub cache: PathBuf,
    /// Where to mount.
    pub mountpoint: PathBuf,
    /// Stats file for the node daemon, rewritten every half second.
    pub stats: PathBuf,
    /// Fetch the rest of the layer in the background.
    pub background: bool,
    /// Record the spans reads touch during this long after mount (a startup trace).
    pub trace_window: Option<Duration>,
    /// A startup profile to prefetch first: JSON `{"spans": [ids…]}`.
    pub prefetch: Option<PathBuf>,
    /// The policy's mode: `Eager` fetches everything at full speed from the mount on;
    /// `Prefetch` does once the profile is prefetched and reads are quiet; `Lazy` yields to
    /// reads throughout (unless the deadline below comes near). Other than `Lazy`, the rest
    /// of the layer is fetched whatever `background` says.
    pub mode: NodeMode,
    /// Make the layer fully local within this long after the mount: the background fetch goes
    /// at full speed once it would not finish in time yielding to reads, and a miss is reported.
    pub fully_local_within: Option<Duration>,
}

/// A served layer's state and counters, as written to its stats file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LayerStats {
    /// Layer digest.
    pub layer: String,
    /// The serving process.
    pub pid: u32,
    /// `lazy`, `fully_local` or `broken`.
    pub state: String,
    /// Why the layer is broken, if it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broken_reason: Option<String>,
    /// Compressed bytes fetched for reads.
    pub bytes_on_demand: u64,
    /// Compressed bytes fetched in the background.
    pub bytes_background: u64,
    /// Range requests sent to the registry.
    pub range_requests: u64,
    /// Spans that failed verification.
    pub verify_failures: u64,
    /// Spans in the layer.
    pub spans: u32,
    /// Spans in the cache.
    pub spans_present: u32,
    /// Uncompressed size (the span cache's size once complete).
    pub uncompressed_size: u64,
    /// Read latency counts per bucket ([`hermes_lazyfs::READ_LATENCY_BOUNDS`], then +Inf).
    pub read_latency_buckets: Vec<u64>,
    /// Sum of read latencies (µs).
    pub read_latency_sum_micros: u64,
    /// When this process mounted the layer (Unix ms).
    pub mounted_unix_ms: u64,
    /// Seconds from mount to fully local, once it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fully_local_seconds: Option<f64>,
    /// Spans reads touched first after mount, in order (the startup trace).
    #[serde(default)]
    pub trace: Vec<u32>,
    /// The trace's window has closed.
    #[serde(default)]
    pub trace_complete: bool,
    /// Distinct tar bytes reads read during the trace window.
    #[serde(default)]
    pub trace_read_bytes: u64,
    /// Their share of the compressed blob ([`hermes_lazyfs::TracedBytes::compressed`]): what
    /// the first start needs from the registry at least.
    #[serde(default)]
    pub trace_read_compressed_bytes: u64,
    /// Spans prefetched from a startup profile.
    #[serde(default)]
    pub prefetched: u64,
    /// The mode the layer is served in (`Lazy`, `Prefetch`, `Eager`).
    #[serde(default)]
    pub mode: String,
    /// Whether the background fetch goes at full speed.
    #[serde(default)]
    pub fetching_fast: bool,
    /// The `fullyLocalWithin` deadline passed before the layer was fully local.
    #[serde(default)]
    pub fully_local_deadline_missed: bool,
    /// What each registry host (mirrors and the registry) served this layer's process.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub registry_hosts: Vec<HostStats>,
}

impl LayerStats {
    /// Reads a stats file.
    pub fn load(path: &Path) -> Option<Self> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Mounts the layer and serves it until `stop` is set or the mount goes away (unmounted by
/// someone else). `client` reads the registry; `runtime` runs it.
pub fn serve_layer(
    opts: &ServeOptions,
    client: Client,
    runtime: tokio::runtime::Handle,
    stop: &AtomicBool,
) -> Result<()> {
    let mount_err = |message: String| Error::Mount {
        layer: opts.layer.clone(),
        message,
    };
    // This process lives as long as the mount: the file's bytes are dropped once parsed, the
    // gzip windows stay in the file (read when a span is decoded), and the entries are dropped
    // once the inode table is built from them.
    let mut ztoc = hermes_ztoc::Ztoc::open(&opts.ztoc).map_err(|source| Error::Ztoc {
        layer: opts.layer.clone(),
        source,
    })?;
    let entries = ztoc.take_entries();
    let ztoc = Arc::new(ztoc);
    let digest = Digest::parse(&opts.layer)?;
    let reference = Reference::parse(&opts.image)?;
    let hosts = client.clone();
    let probe = client.clone();
    let source =
        RegistryRangeReader::new(client, reference.clone(), digest.clone(), runtime.clone())
            .with_span_check(ztoc.clone());
    let cache = SpanCache::open(&opts.cache, &ztoc).map_err(|e| mount_err(format!("{e:#}")))?;
    let reader = Arc::new(LayerReader::new(ztoc.clone(), source, cache));
    if reader.state() != LayerState::FullyLocal {
        // One byte before mounting: a registry that refuses us (no or stale credentials) makes
        // the layer fall back to a normal pull now, rather than fail the container's reads.
        runtime
            .block_on(probe.blob_range(&reference, &digest, 0, 1))
            .map_err(|e| {
                mount_err(format!(
                    "cannot read the layer from its registry: {}",
                    hermes_node_api::error_chain(&e)
                ))
            })?;
    }
    let background_wanted =
        opts.background || opts.mode != NodeMode::Lazy || opts.fully_local_within.is_some();
    if background_wanted {
        // Startup reads and prefetch come before the background fetcher: keep their bytes.
        reader.keep_for_background();
    }
    let handle = hermes_lazyfs::mount_entries(
        reader.clone(),
        &entries,
        &opts.mountpoint,
        hermes_lazyfs::MountOptions::default(),
    )
    .map_err(|e| mount_err(hermes_node_api::error_chain(&e)))?;
    drop(entries);
    let mounted = Instant::now();
    let mounted_unix_ms = unix_ms();
    let dev = std::os::unix::fs::MetadataExt::dev(
        &std::fs::metadata(&opts.mountpoint).map_err(Error::io("stat mount", &opts.mountpoint))?,
    );
    info!(layer = %digest, mount = %opts.mountpoint.display(), "serving lazy layer");
    if let Some(window) = opts.trace_window {
        reader.start_trace(window);
    }
    let prefetched = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let profile_done = Arc::new(AtomicBool::new(true));
    if let Some(spans) = opts.prefetch.as_deref().and_then(read_profile) {
        profile_done.store(false, Ordering::Relaxed);
        let (reader, done, layer) = (reader.clone(), prefetched.clone(), digest.clone());
        let finished = profile_done.clone();
        std::thread::spawn(move || {
            match reader.prefetch(&spans) {
                Ok(()) => {
                    done.store(spans.len() as u64, Ordering::Relaxed);
                    info!(%layer, spans = spans.len(), "startup profile prefetched");
                }
                Err(e) => warn!(%layer, error = %e, "prefetch failed"),
            }
            finished.store(true, Ordering::Relaxed);
        });
    }
    let pace = match opts.mode {
        NodeMode::Eager => Pace::fast(DEFAULT_FAST_PARALLEL),
        NodeMode::Lazy | NodeMode::Prefetch => Pace::gentle(),
    };
    let background = if background_wanted && reader.state() == LayerState::Lazy {
        let layer = LayerDigest::parse(digest.as_str()).map_err(|e| mount_err(e.to_string()))?;
        Some(
            BackgroundFetcher::start_paced(
                reader.clone(),
                layer,
                ztoc.compressed_archive_size(),
                pace.clone(),
            )
            .map_err(|e| mount_err(e.to_string()))?,
        )
    } else {
        None
    };
    let mut schedule = Schedule::new(
        opts.fully_local_within,
        ztoc.compressed_archive_size(),
        DEFAULT_FAST_PARALLEL,
    );
    let mut fully_local_seconds = None;
    loop {
        let state = reader.state();
        let s = reader.stats();
        if state == LayerState::Lazy && !pace.is_fast() {
            let present =
                f64::from(reader.cache().present_count()) / f64::from(ztoc.span_count().max(1));
            // The link's speed is judged by the gentle walk alone (one request after another):
            // what reads fetch is what they need, often much less than the link could carry,
            // and a layer read only a little during the start would look slow and hurry.
            let fetched = s.background_bytes_fetched;
            let profile_then_quiet = opts.mode == NodeMode::Prefetch
                && profile_done.load(Ordering::Relaxed)
                && reader.quiet_for() >= QUIET;
            if profile_then_quiet {
                info!(layer = %digest, "startup reads are done: fetching the rest at full speed");
                pace.speed_up(DEFAULT_FAST_PARALLEL);
            } else if schedule.behind(mounted.elapsed(), fetched, present) {
                info!(layer = %digest, within = ?opts.fully_local_within,
                    "fetching the rest at full speed to be fully local in time");
                pace.speed_up(DEFAULT_FAST_PARALLEL);
            }
        }
        if state == LayerState::Lazy && schedule.missed(mounted.elapsed()) {
            warn!(layer = %digest, within = ?opts.fully_local_within,
                spans_present = reader.cache().present_count(), spans = ztoc.span_count(),
                "the layer is not fully local within its policy's fullyLocalWithin");
        }
        if fully_local_seconds.is_none() && state == LayerState::FullyLocal {
            let secs = mounted.elapsed().as_secs_f64();
            fully_local_seconds = Some(secs);
            info!(layer = %digest, seconds = secs, "layer is fully local");
        }
        let traced = reader.traced_bytes();
        let stats = LayerStats {
            layer: opts.layer.clone(),
            pid: std::process::id(),
            state: match &state {
                LayerState::Lazy => "lazy".into(),
                LayerState::FullyLocal => "fully_local".into(),
                LayerState::Broken(_) => "broken".into(),
            },
            broken_reason: match &state {
                LayerState::Broken(r) => Some(format!("{r:?}")),
                _ => None,
            },
            bytes_on_demand: s.bytes_fetched,
            bytes_background: s.background_bytes_fetched,
            range_requests: s.range_requests,
            verify_failures: s.verify_failures,
            spans: ztoc.span_count(),
            spans_present: reader.cache().present_count(),
            uncompressed_size: ztoc.uncompressed_archive_size(),
            read_latency_buckets: s.read_latency.buckets.to_vec(),
            read_latency_sum_micros: s.read_latency.sum_micros,
            mounted_unix_ms,
            fully_local_seconds,
            trace: reader.trace().0,
            trace_complete: opts.trace_window.is_some() && reader.trace().1,
            trace_read_bytes: traced.uncompressed,
            trace_read_compressed_bytes: traced.compressed,
            prefetched: prefetched.load(Ordering::Relaxed),
            mode: opts.mode.as_str().to_owned(),
            fetching_fast: pace.is_fast(),
            fully_local_deadline_missed: schedule.was_missed(),
            registry_hosts: hosts.host_stats(),
        };
        if let Err(e) = write_atomic(&opts.stats, &serde_json::to_vec(&stats).unwrap_or_default()) {
            warn!(error = %e, "cannot write layer stats");
        }
        if stop.load(Ordering::SeqCst) {
            break;
        }
        match std::fs::metadata(&opts.mountpoint) {
            Ok(m) if std::os::unix::fs::MetadataExt::dev(&m) == dev => {}
            _ => {
                info!(layer = %digest, "mount is gone; exiting");
                drop(background.map(BackgroundFetcher::stop));
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    drop(background.map(BackgroundFetcher::stop));
    handle.unmount().map_err(|e| mount_err(e.to_string()))?;
    info!(layer = %digest, "unmounted");
    Ok(())
}

/// When a layer with a `fullyLocalWithin` deadline must stop yielding to reads. The gentle
/// fetch (one range request at a time, pausing for reads) keeps going while the rest can still
/// be fetched in time at full speed, taken as `parallel` times the fastest rate one request has
/// fetched at over a tick (where the link, not each connection, is the limit, full speed is no
/// faster than gentle once reads pause, so hurrying could not help anyway), with half again as
/// much time to spare; and in any case once half the time is gone.
#[derive(Debug)]
struct Schedule {
    within: Option<Duration>,
    compressed: u64,
    /// Bytes fetched and when, at the last tick.
    last: Option<(Duration, u64)>,
    /// The fastest rate seen over a tick (bytes per second).
    best_rate: f64,
    /// Range requests in flight at full speed.
    parallel: usize,
    missed: bool,
}

impl Schedule {
    fn new(within: Option<Duration>, compressed: u64, parallel: usize) -> Self {
        Self {
            within,
            compressed,
            last: None,
            best_rate: 0.0,
            parallel: parallel.max(1),
            missed: false,
        }
    }

    /// Whether to go at full speed now: `elapsed` since the mount, `fetched` bytes the gentle
    /// walk fetched in all, `present` the share of the layer local. Until the walk has run, only
    /// half the time gone hurries.
    fn behind(&mut self, elapsed: Duration, fetched: u64, present: f64) -> bool {
        let Some(within) = self.within else {
            return false;
        };
        if let Some((then, bytes)) = self.last {
            let dt = (elapsed - then).as_secs_f64();
            if dt > 0.0 {
                self.best_rate = self.best_rate.max((fetched - bytes) as f64 / dt);
            }
        }
        self.last = Some((elapsed, fetched));
        let left = within.saturating_sub(elapsed).as_secs_f64();
        let remaining = self.compressed as f64 * (1.0 - present).max(0.0);
        let fast = self.best_rate * self.parallel as f64;
        elapsed * 2 >= within || (fast > 0.0 && remaining / fast * 1.5 >= left)
    }

    /// Whether the deadline passed just now (true once).
    fn missed(&mut self, elapsed: Duration) -> bool {
        let passed = self.within.is_some_and(|w| elapsed > w);
        let first = passed && !self.missed;
        self.missed |= passed;
        first
    }

    fn was_missed(&self) -> bool {
        self.missed
    }
}

/// The spans of a prefetch profile file (`{"spans": [...]}`, as the controller serves it).
fn read_profile(path: &Path) -> Option<Vec<u32>> {
    #[derive(Deserialize)]
    struct Profile {
        spans: Vec<u32>,
    }
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice::<Profile>(&bytes)
        .ok()
        .map(|p| p.spans)
}

/// Writes `bytes` to `path` through a temp file and a rename.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_deadline_schedule_yields_while_it_can_finish_in_time_and_hurries_after() {
        // No deadline: never hurries.
        let mut none = Schedule::new(None, 1 << 30, 4);
        assert!(!none.behind(S * 1000, 0, 0.0));
        assert!(!none.missed(S * 1000));

        // 100 MB within 60 s, one request fetching 10 MB/s: 4 at once need 2.5 s, 59 s left.
        let mut s = Schedule::new(Some(S * 60), 100_000_000, 4);
        assert!(!s.behind(S, 0, 0.0));
        assert!(!s.behind(S * 2, 10_000_000, 0.1));
        // 1 GB, gently at 8 MB/s (one request): 4 at once would need 31 s at first. With half
        // again to spare it yields while (1 GB - 8 MB/s × t) / 32 MB/s × 1.5 < 60 s - t, until
        // about 21 s, then hurries (and finishes near 21 + 26 = 47 s).
        let mut big = Schedule::new(Some(S * 60), 1_000_000_000, 4);
        assert!(!big.behind(S, 0, 0.0));
        assert!(!big.behind(S * 2, 8_000_000, 0.008));
        assert!(!big.behind(S * 14, 104_000_000, 0.104));
        assert!(big.behind(S * 22, 168_000_000, 0.168));
        // At 0.5 MB/s per request, the 99.5 MB left need 50 s at full speed: hurry at once.
        let mut slow = Schedule::new(Some(S * 60), 100_000_000, 4);
        assert!(!slow.behind(S, 0, 0.0));
        assert!(slow.behind(S * 2, 500_000, 0.005));
        // A layer the start reads little of, whose walk has not run yet (no bytes): no rate,
        // so no hurry before half the time, however little reads fetched.
        let mut quiet = Schedule::new(Some(S * 60), 2_000_000_000, 4);
        assert!(!quiet.behind(S, 0, 0.0));
        assert!(!quiet.behind(S * 5, 0, 0.001));
        assert!(!quiet.behind(S * 29, 0, 0.001));
        assert!(quiet.behind(S * 30, 0, 0.001));
        // Whatever the rate, half the time gone: hurry.
        assert!(s.behind(S * 30, 10_000_000, 0.1));
        // The deadline passes once.
        assert!(!s.missed(S * 60));
        assert!(s.missed(S * 61));
        assert!(!s.missed(S * 62));
        assert!(s.was_missed());
    }
}
