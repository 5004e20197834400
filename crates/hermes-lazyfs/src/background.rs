//! The background fetcher: makes a layer fully local and checks its whole digest.
//!
//! One low-priority thread per layer walks the blob front to back in span-sized range reads,
//! pausing whenever reads are fetching and until they have been quiet for [`QUIET`] (counted from
//! the reader's creation before the first read: a mount comes just before its container reads,
//! and a walk begun at mount would slow the first reads down). It hashes
//! every compressed byte in order, verifies each span against the zTOC before using it,
//! stores spans that are not cached yet, and when the
//! walk is done compares the blob's digest and size with the layer's: a match marks the layer
//! [`LayerState::FullyLocal`] (and is remembered in the cache for the next process). The digest
//! is over compressed bytes and the cache holds decoded ones, so spans reads fetched are hashed
//! from the compressed bytes the reader kept for this (see [`crate::reader`]); only a span whose
//! kept bytes are gone (another process fetched it) is downloaded again.
//!
//! Bytes between spans (the gzip header) are covered by no span digest, only by the layer's: a
//! mismatch may be such a byte corrupted in transit, so the blob is hashed again from fresh
//! fetches, up to [`DIGEST_PASSES`] passes in all, before the layer is marked
//! [`LayerState::Broken`]. A span that fails verification is fetched again, up to
//! `VERIFY_ATTEMPTS` fetches, as reads do.
//!
//! How it walks is its [`Pace`], which may change while it runs: gently (one span at a time,
//! yielding to reads; the default, for a lazy start) or at full speed (several range requests
//! at once and the spans decoded in parallel, each from its own checkpoint, never pausing: the
//! policy modes `Eager` and `Prefetch`, and a `fullyLocalWithin` deadline coming near). Either
//! way every compressed byte is hashed in blob order, so a faster walk checks the same digest.
//!
//! It does not prefetch by a recorded profile or bound concurrency across layers: the node
//! daemon schedules fetchers.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::reader::{LayerReader, LayerState, Priority, VERIFY_ATTEMPTS, broken_reason};
use crate::{BrokenReason, Error, Result};

/// Attempts per range read before the fetcher gives up for this run (the layer stays lazy).
const ATTEMPTS: u32 = 3;

/// Passes over the whole blob before a digest mismatch breaks the layer: the first hashes what
/// reads kept, the others fetch everything again (a byte no span digest covers may have been
/// corrupted on the way; a blob that is not the layer fails every pass).
pub(crate) const DIGEST_PASSES: u32 = 3;

/// How long reads must have fetched nothing before the background fetcher goes on: it would
/// otherwise take half the bandwidth between two bursts of a starting container's reads. 2 s,
/// not 500 ms: an import-heavy start (the quickstart's numpy/pandas image, 32 MB/s, release
/// build, idle machine) pauses longer than 500 ms between bursts, and background spans fetched
/// then slowed the next reads: ready 4.41–4.44 s at 500 ms, 3.90–3.98 s at 1 s, 3.66–3.69 s at
/// 2 s, 3.62–3.72 s at 3–5 s, fully local 8.2 / 7.7 / 9.2 / 10.2–12.2 s
/// (`bench/results/first-start.md`); the quick image's start is the same at 500 ms and 2 s.
pub const QUIET: Duration = Duration::from_secs(2);

/// Range requests a fetcher at full speed keeps in flight, unless told otherwise: enough to
/// fill a link whose registry (or the object storage behind it) limits each connection, and
/// two spans decoding per core on small nodes.
pub const DEFAULT_FAST_PARALLEL: usize = 4;

/// How a [`BackgroundFetcher`] walks: shared with whoever may change it while it runs (a clone
/// shares the pace). Gentle (the default): one span at a time, after reads have been quiet for
/// [`QUIET`]. Fast: up to `parallel` spans in flight, fetched, verified and decoded on their own
/// threads, with no pause for reads (reads still get the [`crate::FetchLimit`] slot kept for them).
#[derive(Debug, Clone)]
pub struct Pace(Arc<PaceState>);

#[derive(Debug)]
struct PaceState {
    /// Spans in flight at full speed; 0 while gentle.
    fast: AtomicUsize,
}

impl Default for Pace {
    fn default() -> Self {
        Self::gentle()
    }
}

impl Pace {
    /// One span at a time, yielding to reads.
    pub fn gentle() -> Self {
        Self(Arc::new(PaceState {
            fast: AtomicUsize::new(0),
        }))
    }

    /// `parallel` spans at once (at least one), never pausing.
    pub fn fast(parallel: usize) -> Self {
        let pace = Self::gentle();
        pace.speed_up(parallel);
        pace
    }

    /// From now on, `parallel` spans at once (at least one), never pausing.
    pub fn speed_up(&self, parallel: usize) {
        self.0.fast.store(parallel.max(1), Ordering::Relaxed);
    }

    /// Whether the walk goes at full speed.
    pub fn is_fast(&self) -> bool {
        self.in_flight().is_some()
    }

    /// Spans in flight at full speed; `None` while gentle.
    fn in_flight(&self) -> Option<usize> {
        match self.0.fast.load(Ordering::Relaxed) {
            0 => None,
            n => Some(n),
        }
    }
}

/// A layer blob's digest, `sha256:<64 lowercase hex>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LayerDigest(String);

impl LayerDigest {
    /// Parse `sha256:<64 lowercase hex>`.
    pub fn parse(s: &str) -> Result<Self> {
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| Error::InvalidDigest(s.to_owned()))?;
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(Error::InvalidDigest(s.to_owned()));
        }
        Ok(Self(s.to_owned()))
    }

    /// The digest as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for LayerDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// How a background run ended.
#[derive(Debug)]
pub enum Outcome {
    /// The layer is fully local and its digest matched.
    FullyLocal,
    /// The layer was marked broken (by this run or earlier).
    Broken(BrokenReason),
    /// Stopped before the end; the layer stays lazy.
    Stopped,
    /// The source failed repeatedly; the layer stays lazy and a later run may finish it.
    Failed(Error),
}

/// A running background fetch of one layer. Dropping it stops the thread and waits for it.
#[derive(Debug)]
pub struct BackgroundFetcher {
    reader: Arc<LayerReader>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Outcome>>,
}

impl BackgroundFetcher {
    /// Start fetching the rest of `reader`'s layer, whose blob has `digest` and `size` bytes,
    /// gently.
    pub fn start(reader: Arc<LayerReader>, digest: LayerDigest, size: u64) -> Result<Self> {
        Self::start_paced(reader, digest, size, Pace::gentle())
    }

    /// [`Self::start`] at `pace` (which the caller may change while it runs).
    pub fn start_paced(
        reader: Arc<LayerReader>,
        digest: LayerDigest,
        size: u64,
        pace: Pace,
    ) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("hermes-bg-fetch".into())
            .spawn({
                let reader = Arc::clone(&reader);
                let stop = Arc::clone(&stop);
                move || run(&reader, &digest, size, &stop, &pace)
            })
            .map_err(|source| Error::Thread {
                what: "background fetch",
                source,
            })?;
        Ok(Self {
            reader,
            stop,
            thread: Some(thread),
        })
    }

    /// Wait for the run to end.
    pub fn wait(mut self) -> Outcome {
        self.join()
    }

    /// Stop the run at the next span and wait for it.
    pub fn stop(mut self) -> Outcome {
        self.stop.store(true, Ordering::Relaxed);
        self.reader.wake();
        self.join()
    }

    fn join(&mut self) -> Outcome {
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(outcome)) => outcome,
            Some(Err(_)) => Outcome::Failed(Error::Thread {
                what: "background fetch",
                source: std::io::Error::other("the thread panicked"),
            }),
            None => Outcome::Stopped,
        }
    }
}

impl Drop for BackgroundFetcher {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop.store(true, Ordering::Relaxed);
            self.reader.wake();
            self.join();
        }
    }
}

/// The walk, with the reader keeping the bytes reads fetch for it while it lasts.
fn run(
    reader: &LayerReader,
    digest: &LayerDigest,
    size: u64,
    stop: &AtomicBool,
    pace: &Pace,
) -> Outcome {
    reader.keep_for_background();
    let outcome = walk(reader, digest, size, stop, pace);
    reader.stop_keeping();
    outcome
}

#[tracing::instrument(level = "info", skip(reader, stop, pace), fields(cache = %reader.cache().dir().display()))]
fn walk(
    reader: &LayerReader,
    digest: &LayerDigest,
    size: u64,
    stop: &AtomicBool,
    pace: &Pace,
) -> Outcome {
    if let LayerState::Broken(reason) = reader.state() {
        return Outcome::Broken(reason);
    }
    let cache = reader.cache();
    if cache.is_complete() && cache.verified_digest().as_deref() == Some(digest.as_str()) {
        reader.set_state(LayerState::FullyLocal);
        tracing::info!("layer already fully local");
        return Outcome::FullyLocal;
    }
    let mut pass = 1;
    let (actual, pos) = loop {
        let (actual, pos) = match hash_pass(reader, stop, pass == 1, pace) {
            Ok(hashed) => hashed,
            Err(outcome) => return outcome,
        };
        if (actual == digest.as_str() && pos == size) || pass >= DIGEST_PASSES {
            break (actual, pos);
        }
        tracing::warn!(
            pass,
            %actual,
            bytes = pos,
            "the blob does not match the layer digest; hashing it again from fresh fetches"
        );
        pass += 1;
    };
    if actual == digest.as_str() && pos == size {
        if let Err(e) = reader.cache().mark_verified(digest.as_str()) {
            tracing::warn!(error = %e, "could not record the verified layer; it is checked again next time");
        }
        reader.set_state(LayerState::FullyLocal);
        tracing::info!(bytes = pos, "layer is fully local");
        Outcome::FullyLocal
    } else {
        let reason = BrokenReason::LayerDigest {
            expected: digest.to_string(),
            actual,
            expected_size: size,
            actual_size: pos,
        };
        reader.set_state(LayerState::Broken(reason.clone()));
        Outcome::Broken(reason)
    }
}

/// One walk over every span: fetch (or, with `use_kept`, take what reads kept), verify, store
/// what is not cached, and hash every compressed byte in order. Spans are fetched, verified
/// and stored on their own threads, as many at once as the pace allows, and hashed here in
/// blob order as they complete. Returns the blob's digest and how many bytes were hashed; the
/// error is how the walk ends.
fn hash_pass(
    reader: &LayerReader,
    stop: &AtomicBool,
    use_kept: bool,
    pace: &Pace,
) -> std::result::Result<(String, u64), Outcome> {
    let ztoc = Arc::clone(reader.ztoc());
    // Spans of a gzip layer may share a byte, and bytes before the first span (the gzip
    // header) belong to none: each span's piece starts where the previous one ended (or at
    // its own start, if that is earlier).
    let mut pieces = Vec::new();
    let mut end = 0u64;
    for span in ztoc.spans() {
        let start = end.min(span.compressed.start);
        end = span.compressed.end;
        pieces.push((start, span));
    }
    let mut hasher = Sha256::new();
    let mut pos = 0u64;
    std::thread::scope(|scope| -> std::result::Result<(), Outcome> {
        let mut pieces = pieces.into_iter();
        let mut in_flight = VecDeque::new();
        loop {
            while in_flight.len() < pace.in_flight().unwrap_or(1) {
                if !pace.is_fast() {
                    reader.wait_foreground_idle(stop, QUIET, &|| pace.is_fast());
                }
                if stop.load(Ordering::Relaxed) {
                    return Err(Outcome::Stopped);
                }
                if let LayerState::Broken(reason) = reader.state() {
                    return Err(Outcome::Broken(reason));
                }
                let Some((start, span)) = pieces.next() else {
                    break;
                };
                let piece = std::thread::Builder::new()
                    .name("hermes-bg-span".into())
                    .spawn_scoped(scope, move || {
                        fetch_piece(reader, start, &span, stop, use_kept)
                    })
                    .map_err(|source| {
                        Outcome::Failed(Error::Thread {
                            what: "background span fetch",
                            source,
                        })
                    })?;
                in_flight.push_back((start, piece));
            }
            // Those still in flight finish (the scope waits for them) whatever happens here.
            let Some((start, piece)) = in_flight.pop_front() else {
                return Ok(());
            };
            let (data, span_end) = piece.join().map_err(|_| {
                Outcome::Failed(Error::Thread {
                    what: "background span fetch",
                    source: std::io::Error::other("the thread panicked"),
                })
            })??;
            hasher.update(&data[(pos - start) as usize..]);
            pos = span_end;
        }
    })?;
    Ok((
        format!("sha256:{}", crate::cache::hex(&hasher.finalize())),
        pos,
    ))
}

/// The blob's bytes `start..span.compressed.end`, verified, with the span stored in the cache
/// unless it is there already; and where they end.
fn fetch_piece(
    reader: &LayerReader,
    start: u64,
    span: &hermes_ztoc::Span,
    stop: &AtomicBool,
    use_kept: bool,
) -> std::result::Result<(Vec<u8>, u64), Outcome> {
    let data = match reader.kept(span).filter(|_| use_kept) {
        // A read fetched (and verified) the span: only bytes between spans that no span
        // holds, if any, come from the registry.
        Some(kept) if start < span.compressed.start => {
            let mut data = reader
                .fetch(start, span.compressed.start - start, Priority::Background)
                .map_err(Outcome::Failed)?;
            data.extend_from_slice(&kept);
            data
        }
        Some(kept) => kept,
        None => fetch_until_verified(reader, start, span, stop)?,
    };
    let at = (span.compressed.start - start) as usize;
    match reader.install_background(span, &data[at..]) {
        Ok(_) => Ok((data, span.compressed.end)),
        Err(Error::Broken(reason)) => Err(Outcome::Broken(reason)),
        Err(e) => Err(Outcome::Failed(e)),
    }
}

/// [`fetch_verified`] until the span verifies, up to `VERIFY_ATTEMPTS` fetches; if none does,
/// the layer is broken. The error is how the walk ends.
fn fetch_until_verified(
    reader: &LayerReader,
    start: u64,
    span: &hermes_ztoc::Span,
    stop: &AtomicBool,
) -> std::result::Result<Vec<u8>, Outcome> {
    let mut attempt = 1;
    loop {
        match fetch_verified(reader, start, span, stop) {
            Ok(Ok(data)) => return Ok(data),
            Ok(Err(e)) if attempt >= VERIFY_ATTEMPTS => {
                let reason = broken_reason(span.id, e);
                reader.set_state(LayerState::Broken(reason.clone()));
                return Err(Outcome::Broken(reason));
            }
            Ok(Err(_)) => tracing::warn!(
                span = span.id,
                attempt,
                "span failed verification; fetching it again"
            ),
            Err(e) => return Err(Outcome::Failed(e)),
        }
        attempt += 1;
    }
}

/// Read blob bytes `start..span.compressed.end` (retrying transport errors) and verify the
/// span's part. The outer error is the transport's, the inner one the verification's.
fn fetch_verified(
    reader: &LayerReader,
    start: u64,
    span: &hermes_ztoc::Span,
    stop: &AtomicBool,
) -> Result<std::result::Result<Vec<u8>, hermes_ztoc::Error>> {
    let mut attempt = 1;
    let data = loop {
        match reader.fetch(start, span.compressed.end - start, Priority::Background) {
            Ok(data) => break data,
            Err(e) if attempt >= ATTEMPTS || stop.load(Ordering::Relaxed) => return Err(e),
            Err(e) => {
                tracing::debug!(error = %e, attempt, "background range read failed; retrying");
                std::thread::sleep(Duration::from_millis(100 << attempt));
                attempt += 1;
            }
        }
    };
    let at = (span.compressed.start - start) as usize;
    match reader.ztoc().verify_span(span, &data[at..]) {
        Ok(()) => Ok(Ok(data)),
        Err(e) => {
            reader.note_verify_failure();
            Ok(Err(e))
        }
    }
}
