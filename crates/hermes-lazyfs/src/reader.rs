//! Reads of a layer's tar bytes, served from the span cache and fetched on a miss.
//!
//! A miss fetches the request's missing spans with as few range reads as possible (neighbouring
//! spans are coalesced into one read), verifies each span against the zTOC's digest before it
//! is decoded, stores it in the cache and then answers from the cache. Concurrent readers of one
//! span wait for one fetch. A span that fails verification is fetched again, up to
//! [`VERIFY_ATTEMPTS`] fetches in all; if none verifies, the layer is marked broken and every
//! later read fails.
//!
//! While a background fetcher runs, the verified compressed bytes of the spans reads fetch are
//! also kept, in a sparse file next to the cache, until it has hashed them: it needs every
//! compressed byte for the whole-blob digest, and reading them from there instead of the
//! registry means a layer is downloaded once, however much of it was read on demand first.
//!
//! Every range read takes a slot of the reader's [`FetchLimit`] (a bound on concurrent requests
//! that several readers may share); reads take free slots first and one slot is always left to
//! them, so a read never waits behind prefetch or background requests for a slot. No lock is
//! held across a fetch: the flight table only records which spans are claimed.
//!
//! This is the pure core: no FUSE, no threads of its own. Transport retries belong to the
//! [`RangeReader`] (the registry client retries; a failed fetch here leaves the layer usable).

use std::collections::HashSet;
use std::fs::File;
use std::ops::RangeInclusive;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use hermes_ztoc::{RangeReader, Span, SpanId, Ztoc};

use crate::cache::SpanCache;
use crate::{BrokenReason, Error, Result};

/// Most compressed bytes one coalesced range read asks for.
const MAX_COALESCED_BYTES: u64 = 32 << 20;

/// Concurrent range requests of a reader whose caller sets no [`FetchLimit`].
pub const DEFAULT_FETCH_LIMIT: usize = 8;

/// How often a paused background fetcher looks whether it was told to hurry.
const HURRY_CHECK: std::time::Duration = std::time::Duration::from_millis(100);

/// Fetches of one span before a failed verification breaks the layer. Corruption in transit (a
/// proxy, a NIC, a cache on the way) is transient, and a fresh fetch cures it: with only one
/// more fetch, two corrupted answers in a row broke a layer for good under a chaos soak. A blob
/// that differs from its zTOC fails every fetch, so a few attempts bound the cost.
pub(crate) const VERIFY_ATTEMPTS: u32 = 4;

/// Where a layer stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerState {
    /// Spans are fetched on demand; some may be missing.
    Lazy,
    /// Every span is cached and the whole blob matched the layer digest.
    FullyLocal,
    /// Verification failed; every read fails.
    Broken(BrokenReason),
}

/// Counters of one layer, for metrics. Monotonic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReaderStats {
    /// Calls of [`LayerReader::read`].
    pub requests: u64,
    /// Reads answered from the cache without fetching or waiting for a fetch.
    pub cache_hits: u64,
    /// Reads that waited for another reader's fetch of a span they needed.
    pub waits: u64,
    /// Range reads issued to the source (foreground and background).
    pub range_requests: u64,
    /// Compressed bytes fetched for reads.
    pub bytes_fetched: u64,
    /// Spans fetched, verified and stored for reads.
    pub spans_fetched: u64,
    /// Compressed bytes fetched by the background fetcher.
    pub background_bytes_fetched: u64,
    /// Spans stored by the background fetcher.
    pub background_spans_fetched: u64,
    /// Span fetches whose bytes failed verification (each is fetched again, up to
    /// `VERIFY_ATTEMPTS` fetches in all).
    pub verify_failures: u64,
    /// Times the background fetcher paused because reads were fetching.
    pub background_pauses: u64,
    /// Spans fetched ahead of reads by open-time prefetch (also counted in `spans_fetched`).
    pub prefetch_spans_fetched: u64,
    /// Most range requests that were in flight at once on this reader's [`FetchLimit`].
    pub max_concurrent_requests: u64,
    /// How long [`LayerReader::read`] calls took, fetches included.
    pub read_latency: LatencyHistogram,
}

/// Upper bounds (seconds) of the read latency buckets; a last, unbounded bucket follows.
pub const READ_LATENCY_BOUNDS: [f64; 10] =
    [0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0];

/// Counts of reads per latency bucket ([`READ_LATENCY_BOUNDS`], then +Inf), not cumulative.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LatencyHistogram {
    /// Reads per bucket.
    pub buckets: [u64; READ_LATENCY_BOUNDS.len() + 1],
    /// Sum of all latencies, in microseconds.
    pub sum_micros: u64,
}

impl LatencyHistogram {
    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }
}

#[derive(Debug, Default)]
struct LatencyCounters {
    buckets: [AtomicU64; READ_LATENCY_BOUNDS.len() + 1],
    sum_micros: AtomicU64,
}

impl LatencyCounters {
    fn observe(&self, took: std::time::Duration) {
        let secs = took.as_secs_f64();
        let i = READ_LATENCY_BOUNDS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(READ_LATENCY_BOUNDS.len());
        bump(&self.buckets[i], 1);
        bump(
            &self.sum_micros,
            u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
        );
    }

    fn snapshot(&self) -> LatencyHistogram {
        LatencyHistogram {
            buckets: std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed)),
            sum_micros: self.sum_micros.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    cache_hits: AtomicU64,
    waits: AtomicU64,
    range_requests: AtomicU64,
    bytes_fetched: AtomicU64,
    spans_fetched: AtomicU64,
    background_bytes_fetched: AtomicU64,
    background_spans_fetched: AtomicU64,
    verify_failures: AtomicU64,
    background_pauses: AtomicU64,
    prefetch_spans_fetched: AtomicU64,
    read_latency: LatencyCounters,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// Who asks for a fetch: reads come first, open-time prefetch next, the background fetcher last.
/// Reads and prefetch are both foreground for the background fetcher's quiet time: a prefetch
/// is a read the container is about to make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Priority {
    Foreground,
    Prefetch,
    Background,
}

impl Priority {
    fn is_foreground(self) -> bool {
        self != Priority::Background
    }
}

/// A bound on concurrent range requests, shared by every [`LayerReader`] it is given to (a
/// clone shares the bound). Reads that wait for a slot get the next free one before prefetch
/// and background requests, and those never take the last slot, so a read waits only for
/// other reads.
#[derive(Debug, Clone)]
pub struct FetchLimit(Arc<Slots>);

#[derive(Debug)]
struct Slots {
    limit: usize,
    state: Mutex<SlotState>,
    freed: Condvar,
}

#[derive(Debug, Default)]
struct SlotState {
    busy: usize,
    /// Reads waiting for a slot: others wait while there are any.
    reads_waiting: usize,
    /// The most slots ever busy at once.
    peak: usize,
}

impl FetchLimit {
    /// At most `limit` concurrent range requests (at least one).
    pub fn new(limit: usize) -> Self {
        Self(Arc::new(Slots {
            limit: limit.max(1),
            state: Mutex::new(SlotState::default()),
            freed: Condvar::new(),
        }))
    }

    /// The bound.
    pub fn limit(&self) -> usize {
        self.0.limit
    }

    /// The most requests that were in flight at once.
    pub fn peak(&self) -> usize {
        self.lock().peak
    }

    fn lock(&self) -> MutexGuard<'_, SlotState> {
        // Every update is a counter change: consistent after a panic elsewhere.
        self.0.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wait for a slot; it is freed when the returned guard drops.
    fn acquire(&self, priority: Priority) -> Slot<'_> {
        let slots = &self.0;
        let mut state = self.lock();
        if priority == Priority::Foreground {
            state.reads_waiting += 1;
            while state.busy >= slots.limit {
                state = slots.freed.wait(state).unwrap_or_else(|e| e.into_inner());
            }
            state.reads_waiting -= 1;
        } else {
            // One slot stays free for reads (unless the bound is one).
            let cap = (slots.limit - 1).max(1);
            while state.busy >= cap || state.reads_waiting > 0 {
                state = slots.freed.wait(state).unwrap_or_else(|e| e.into_inner());
            }
        }
        state.busy += 1;
        state.peak = state.peak.max(state.busy);
        Slot(self)
    }
}

/// A busy slot of a [`FetchLimit`].
struct Slot<'a>(&'a FetchLimit);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.lock().busy -= 1;
        self.0.0.freed.notify_all();
    }
}

#[derive(Debug)]
struct Flight {
    /// Spans some thread is fetching now.
    fetching: HashSet<SpanId>,
    /// Foreground fetches (reads and open-time prefetch) in progress.
    foreground: usize,
    /// When the last foreground fetch ended; the reader's creation until one does (a layer is
    /// mounted just before its container starts reading, and a fetch that starts at mount
    /// takes the bandwidth the first reads need).
    last_foreground: std::time::Instant,
    state: LayerState,
}

/// A lazy, verified view of one layer's uncompressed tar bytes.
pub struct LayerReader {
    ztoc: Arc<Ztoc>,
    source: Box<dyn RangeReader + Send + Sync>,
    limit: FetchLimit,
    cache: SpanCache,
    /// End of the last span: reads are clamped to it.
    end: u64,
    flight: Mutex<Flight>,
    changed: Condvar,
    counters: Counters,
    trace: Mutex<Trace>,
    /// `Some` while a background fetcher wants the bytes reads fetch.
    kept: Mutex<Option<Kept>>,
}

/// File name of the kept compressed bytes, in the cache directory.
const KEPT_FILE: &str = "compressed.partial";

/// Verified compressed bytes of spans fetched by reads, at their blob offsets in a sparse
/// file, for the background fetcher's digest. Which spans it holds is known to this process
/// only, and the file is emptied when keeping starts, so nothing stale is ever used.
#[derive(Debug)]
struct Kept {
    file: File,
    spans: HashSet<SpanId>,
}

/// The spans reads touched first, in order, and the tar bytes they read, while a recording
/// window is open.
#[derive(Debug, Default)]
struct Trace {
    until: Option<std::time::Instant>,
    seen: HashSet<SpanId>,
    spans: Vec<SpanId>,
    /// Disjoint, non-adjacent tar byte ranges read: start → end.
    ranges: std::collections::BTreeMap<u64, u64>,
}

impl Trace {
    /// Add `start..end` to the ranges read, merging it with those it touches.
    fn add_range(&mut self, mut start: u64, mut end: u64) {
        if let Some((&s, &e)) = self.ranges.range(..=start).next_back()
            && e >= start
        {
            start = s;
            end = end.max(e);
        }
        let touching: Vec<u64> = self.ranges.range(start..=end).map(|(&s, _)| s).collect();
        for s in touching {
            if let Some(e) = self.ranges.remove(&s) {
                end = end.max(e);
            }
        }
        self.ranges.insert(start, end);
    }
}

/// How much of a layer the reads of a trace window read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TracedBytes {
    /// Distinct tar bytes read (through FUSE: with the kernel's readahead).
    pub uncompressed: u64,
    /// Their share of the compressed blob: for each span, the compressed bytes of the span in
    /// proportion to the part of its uncompressed bytes that were read (compression is taken
    /// as uniform within a span). What a fetch of exactly the bytes read would cost.
    pub compressed: u64,
}

impl std::fmt::Debug for LayerReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerReader")
            .field("cache", &self.cache.dir())
            .field("state", &self.state())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl LayerReader {
    /// A reader of `ztoc`'s layer that fetches missing spans from `source` (the layer blob) into
    /// `cache`.
    pub fn new<R>(ztoc: Arc<Ztoc>, source: R, cache: SpanCache) -> Self
    where
        R: RangeReader + Send + Sync + 'static,
    {
        let end = ztoc.spans().map(|s| s.uncompressed.end).max().unwrap_or(0);
        Self {
            ztoc,
            source: Box::new(source),
            limit: FetchLimit::new(DEFAULT_FETCH_LIMIT),
            cache,
            end,
            flight: Mutex::new(Flight {
                fetching: HashSet::new(),
                foreground: 0,
                last_foreground: std::time::Instant::now(),
                state: LayerState::Lazy,
            }),
            changed: Condvar::new(),
            counters: Counters::default(),
            trace: Mutex::new(Trace::default()),
            kept: Mutex::new(None),
        }
    }

    /// Bound this reader's range requests by `limit` (shared with the other readers given it)
    /// instead of its own [`DEFAULT_FETCH_LIMIT`].
    pub fn with_fetch_limit(mut self, limit: FetchLimit) -> Self {
        self.limit = limit;
        self
    }

    /// The bound on this reader's concurrent range requests.
    pub fn fetch_limit(&self) -> &FetchLimit {
        &self.limit
    }

    fn lock_kept(&self) -> MutexGuard<'_, Option<Kept>> {
        self.kept.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keep the compressed bytes reads fetch from now on, for a [`BackgroundFetcher`]'s digest,
    /// so it does not download them again. The fetcher starts keeping when it starts; call this
    /// before the layer is mounted to cover the reads before that. Best effort: if the file
    /// cannot be created, those spans are fetched again. Kept bytes go when the walk ends.
    ///
    /// [`BackgroundFetcher`]: crate::BackgroundFetcher
    pub fn keep_for_background(&self) {
        let mut kept = self.lock_kept();
        if kept.is_some() {
            return;
        }
        let path = self.cache.dir().join(KEPT_FILE);
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path);
        *kept = match opened {
            Ok(file) => Some(Kept {
                file,
                spans: HashSet::new(),
            }),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot keep fetched spans for the background digest; they will be fetched again");
                None
            }
        };
    }

    /// Stop keeping and delete what was kept (the background walk is over).
    pub(crate) fn stop_keeping(&self) {
        if self.lock_kept().take().is_some() {
            let _ = std::fs::remove_file(self.cache.dir().join(KEPT_FILE));
        }
    }

    /// Keep a span's verified compressed bytes, if a background fetcher wants them.
    fn keep(&self, span: &Span, bytes: &[u8]) {
        if let Some(kept) = self.lock_kept().as_mut()
            && kept.file.write_all_at(bytes, span.compressed.start).is_ok()
        {
            kept.spans.insert(span.id);
        }
    }

    /// The kept compressed bytes of `span`, if a read fetched them (and they read back whole).
    pub(crate) fn kept(&self, span: &Span) -> Option<Vec<u8>> {
        let guard = self.lock_kept();
        let kept = guard.as_ref().filter(|k| k.spans.contains(&span.id))?;
        let mut buf = vec![0; (span.compressed.end - span.compressed.start) as usize];
        kept.file
            .read_exact_at(&mut buf, span.compressed.start)
            .ok()?;
        Some(buf)
    }

    /// The layer's zTOC.
    pub fn ztoc(&self) -> &Arc<Ztoc> {
        &self.ztoc
    }

    /// The layer's span cache.
    pub fn cache(&self) -> &SpanCache {
        &self.cache
    }

    /// Where the layer stands.
    pub fn state(&self) -> LayerState {
        self.lock().state.clone()
    }

    /// The layer's counters so far.
    pub fn stats(&self) -> ReaderStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ReaderStats {
            requests: get(&c.requests),
            cache_hits: get(&c.cache_hits),
            waits: get(&c.waits),
            range_requests: get(&c.range_requests),
            bytes_fetched: get(&c.bytes_fetched),
            spans_fetched: get(&c.spans_fetched),
            background_bytes_fetched: get(&c.background_bytes_fetched),
            background_spans_fetched: get(&c.background_spans_fetched),
            verify_failures: get(&c.verify_failures),
            background_pauses: get(&c.background_pauses),
            prefetch_spans_fetched: get(&c.prefetch_spans_fetched),
            max_concurrent_requests: self.limit.peak() as u64,
            read_latency: c.read_latency.snapshot(),
        }
    }

    /// Read up to `len` tar bytes at `offset` (fewer at the end of the layer, none past it).
    pub fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        let started = std::time::Instant::now();
        let result = self.read_inner(offset, len);
        self.counters.read_latency.observe(started.elapsed());
        result
    }

    fn read_inner(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        bump(&self.counters.requests, 1);
        let end = offset.saturating_add(len).min(self.end);
        if offset >= end {
            self.check_usable()?;
            return Ok(Vec::new());
        }
        let spans = self.ztoc.span_of(offset)..=self.ztoc.span_of(end - 1);
        self.record(spans.clone(), offset..end);
        if !self.ensure(spans)? {
            bump(&self.counters.cache_hits, 1);
        }
        // Bounded by the request, which FUSE caps at its max read size.
        let len = usize::try_from(end - offset).map_err(|_| hermes_ztoc::Error::OutOfRange {
            start: offset,
            end,
            size: self.end,
            what: "layer",
        })?;
        self.cache.read_at(offset, len)
    }

    /// Record the spans reads touch, in first-touch order, for `window` from now (a startup
    /// trace for record-and-replay prefetch).
    pub fn start_trace(&self, window: std::time::Duration) {
        let mut t = self.trace.lock().unwrap_or_else(|p| p.into_inner());
        t.until = Some(std::time::Instant::now() + window);
    }

    /// What the reads of the trace window read so far (see [`TracedBytes`]).
    pub fn traced_bytes(&self) -> TracedBytes {
        let t = self.trace.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = TracedBytes::default();
        for (&start, &end) in &t.ranges {
            out.uncompressed += end - start;
            for id in self.ztoc.span_of(start)..=self.ztoc.span_of(end - 1) {
                let Some(span) = self.ztoc.span(id) else {
                    continue;
                };
                let (u, c) = (&span.uncompressed, &span.compressed);
                let read = end.min(u.end).saturating_sub(start.max(u.start));
                let whole = (u.end - u.start).max(1);
                out.compressed +=
                    ((u128::from(read) * u128::from(c.end - c.start)) / u128::from(whole)) as u64;
            }
        }
        out
    }

    /// The trace so far, and whether its window has closed.
    pub fn trace(&self) -> (Vec<SpanId>, bool) {
        let t = self.trace.lock().unwrap_or_else(|p| p.into_inner());
        let closed = t.until.is_none_or(|u| std::time::Instant::now() >= u);
        (t.spans.clone(), closed)
    }

    fn record(&self, spans: RangeInclusive<SpanId>, bytes: std::ops::Range<u64>) {
        let mut t = self.trace.lock().unwrap_or_else(|p| p.into_inner());
        if t.until.is_some_and(|u| std::time::Instant::now() < u) {
            t.add_range(bytes.start, bytes.end);
            for id in spans {
                if t.seen.insert(id) {
                    t.spans.push(id);
                }
            }
        }
    }

    /// Fetch `ids` (e.g. a startup profile) now, in order, in runs of neighbours; spans already
    /// cached are skipped. Ids past the layer's end are ignored.
    pub fn prefetch(&self, ids: &[SpanId]) -> Result<()> {
        let count = self.ztoc.span_count();
        for chunk in ids.chunk_by(|a, b| a.checked_add(1) == Some(*b)) {
            let (Some(&first), Some(&last)) = (chunk.first(), chunk.last()) else {
                continue;
            };
            if last >= count {
                continue;
            }
            self.ensure(first..=last)?;
        }
        Ok(())
    }

    /// Fetch the missing spans of `ids` ahead of reads (open-time prefetch), in runs of
    /// neighbours of at most `run_bytes` compressed bytes, one claimed run at a time so reads
    /// wait for no more than the run they need. Spans other threads are fetching are skipped,
    /// not waited for. Counts as foreground for the background fetcher.
    pub(crate) fn prefetch_ahead(&self, ids: RangeInclusive<SpanId>, run_bytes: u64) -> Result<()> {
        let last = *ids.end();
        if last >= self.ztoc.span_count() {
            return Ok(());
        }
        let mut next = *ids.start();
        while next <= last {
            let mut flight = self.lock();
            if let LayerState::Broken(reason) = &flight.state {
                return Err(Error::Broken(reason.clone()));
            }
            let free = |id: &SpanId| !self.cache.contains(*id) && !flight.fetching.contains(id);
            let Some(first) = (next..=last).find(free) else {
                return Ok(());
            };
            let start = self.span(first)?.compressed.start;
            let mut run = vec![first];
            for id in first + 1..=last {
                if !free(&id) || self.span(id)?.compressed.end - start > run_bytes {
                    break;
                }
                run.push(id);
            }
            next = run[run.len() - 1] + 1;
            let claim = Claim::new(self, &mut flight, run, Priority::Prefetch);
            drop(flight);
            let result = self.fetch_claimed(&claim.ids, Priority::Prefetch);
            claim.finish(result)?;
        }
        Ok(())
    }

    /// Make spans `ids` present. Returns whether this call fetched or waited.
    fn ensure(&self, ids: RangeInclusive<SpanId>) -> Result<bool> {
        let mut busy = false;
        let mut waited = false;
        let mut flight = self.lock();
        loop {
            if let LayerState::Broken(reason) = &flight.state {
                return Err(Error::Broken(reason.clone()));
            }
            let missing: Vec<SpanId> = ids.clone().filter(|&id| !self.cache.contains(id)).collect();
            if missing.is_empty() {
                return Ok(busy);
            }
            let claim: Vec<SpanId> = missing
                .into_iter()
                .filter(|id| !flight.fetching.contains(id))
                .collect();
            busy = true;
            if claim.is_empty() {
                if !waited {
                    waited = true;
                    bump(&self.counters.waits, 1);
                }
                flight = self.wait(flight);
                continue;
            }
            let claim = Claim::new(self, &mut flight, claim, Priority::Foreground);
            drop(flight);
            let result = self.fetch_claimed(&claim.ids, Priority::Foreground);
            claim.finish(result)?;
            flight = self.lock();
        }
    }

    /// Fetch spans this thread claimed, in coalesced runs of neighbours.
    fn fetch_claimed(&self, claim: &[SpanId], priority: Priority) -> Result<()> {
        let mut run: Vec<Span> = Vec::new();
        for &id in claim {
            let span = self.span(id)?;
            let extends = run.last().is_some_and(|last| {
                last.id + 1 == id
                    && span.compressed.end - run[0].compressed.start <= MAX_COALESCED_BYTES
            });
            if !extends && !run.is_empty() {
                self.fetch_run(&run, priority)?;
                run.clear();
            }
            run.push(span);
        }
        if !run.is_empty() {
            self.fetch_run(&run, priority)?;
        }
        Ok(())
    }

    /// One range read for neighbouring spans, then verify and decode each and store them.
    #[tracing::instrument(level = "debug", skip_all, fields(first = run[0].id, count = run.len()))]
    fn fetch_run(&self, run: &[Span], priority: Priority) -> Result<()> {
        let start = run[0].compressed.start;
        let end = run[run.len() - 1].compressed.end;
        let data = self.fetch(start, end - start, priority)?;
        let mut decoded = Vec::with_capacity(run.len());
        let mut result = Ok(());
        for span in run {
            let at = (span.compressed.start - start) as usize;
            let bytes = &data[at..at + (span.compressed.end - span.compressed.start) as usize];
            match self.decode(span, bytes, priority) {
                Ok(d) => decoded.push((span.clone(), d)),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        // Keep what decoded before a failure: those bytes are verified.
        self.store(&decoded, priority)?;
        result
    }

    /// Store decoded spans in the cache and count them.
    fn store(&self, spans: &[(Span, Vec<u8>)], priority: Priority) -> Result<()> {
        self.cache.store(spans)?;
        let counter = match priority {
            Priority::Foreground | Priority::Prefetch => &self.counters.spans_fetched,
            Priority::Background => &self.counters.background_spans_fetched,
        };
        bump(counter, spans.len() as u64);
        if priority == Priority::Prefetch {
            bump(&self.counters.prefetch_spans_fetched, spans.len() as u64);
        }
        Ok(())
    }

    /// Verify and decode one span; fetch it again while its bytes fail verification, up to
    /// [`VERIFY_ATTEMPTS`] fetches in all. Bytes a read fetched are kept for the background
    /// digest once verified.
    fn decode(&self, span: &Span, bytes: &[u8], priority: Priority) -> Result<Vec<u8>> {
        let mut refetched: Option<Vec<u8>> = None;
        let mut attempt = 1;
        let decoded = loop {
            let current = refetched.as_deref().unwrap_or(bytes);
            match self.ztoc.decode_span(span.id, current) {
                Err(e @ hermes_ztoc::Error::SpanDigestMismatch { .. }) => {
                    bump(&self.counters.verify_failures, 1);
                    if attempt >= VERIFY_ATTEMPTS {
                        return Err(broken(span.id, e));
                    }
                    tracing::warn!(
                        span = span.id,
                        attempt,
                        "span failed verification; fetching it again"
                    );
                    let len = span.compressed.end - span.compressed.start;
                    refetched = Some(self.fetch(span.compressed.start, len, priority)?);
                    attempt += 1;
                }
                other => {
                    let decoded = other.map_err(|e| broken(span.id, e))?;
                    if priority.is_foreground() {
                        self.keep(span, current);
                    }
                    break decoded;
                }
            }
        };
        if decoded.len() as u64 != span.uncompressed.end - span.uncompressed.start {
            return Err(Error::Broken(BrokenReason::SpanDecode {
                span: span.id,
                message: format!(
                    "decoded {} bytes, the zTOC says {}",
                    decoded.len(),
                    span.uncompressed.end - span.uncompressed.start
                ),
            }));
        }
        Ok(decoded)
    }

    /// One range read of the layer blob; a short answer is an error.
    pub(crate) fn fetch(&self, offset: u64, len: u64, priority: Priority) -> Result<Vec<u8>> {
        bump(&self.counters.range_requests, 1);
        let slot = self.limit.acquire(priority);
        let data = self.source.read_at(offset, len);
        drop(slot);
        let data = data.map_err(|source| Error::Fetch {
            offset,
            len,
            source,
        })?;
        if data.len() as u64 != len {
            return Err(Error::Fetch {
                offset,
                len,
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("got {} bytes", data.len()),
                ),
            });
        }
        let counter = match priority {
            Priority::Foreground | Priority::Prefetch => &self.counters.bytes_fetched,
            Priority::Background => &self.counters.background_bytes_fetched,
        };
        bump(counter, len);
        Ok(data)
    }

    /// Store a span whose compressed bytes the background fetcher already read, unless it is
    /// cached or being fetched by a read. Returns whether this call stored it.
    pub(crate) fn install_background(&self, span: &Span, bytes: &[u8]) -> Result<bool> {
        let mut flight = self.lock();
        if let LayerState::Broken(reason) = &flight.state {
            return Err(Error::Broken(reason.clone()));
        }
        if self.cache.contains(span.id) || flight.fetching.contains(&span.id) {
            return Ok(false);
        }
        let claim = Claim::new(self, &mut flight, vec![span.id], Priority::Background);
        drop(flight);
        let result = self
            .decode(span, bytes, Priority::Background)
            .and_then(|d| self.store(&[(span.clone(), d)], Priority::Background));
        claim.finish(result).map(|()| true)
    }

    /// Block while reads are fetching, and until they have fetched nothing for `quiet` (the
    /// background fetcher yields to them: a starting container reads in bursts, and the
    /// bandwidth between two bursts is better kept for the next), or until `stop`, or until
    /// `hurry` says to stop yielding (checked at least every [`HURRY_CHECK`]).
    pub(crate) fn wait_foreground_idle(
        &self,
        stop: &AtomicBool,
        quiet: std::time::Duration,
        hurry: &dyn Fn() -> bool,
    ) {
        let mut flight = self.lock();
        let mut paused = false;
        while !stop.load(Ordering::Relaxed) && !hurry() {
            let left = quiet.saturating_sub(flight.last_foreground.elapsed());
            if flight.foreground == 0 && left.is_zero() {
                break;
            }
            if !paused {
                paused = true;
                bump(&self.counters.background_pauses, 1);
            }
            let wait = if flight.foreground > 0 {
                HURRY_CHECK
            } else {
                left.min(HURRY_CHECK)
            };
            flight = self
                .changed
                .wait_timeout(flight, wait)
                .map_or_else(|e| e.into_inner().0, |(g, _)| g);
        }
    }

    /// How long reads (and open-time or profile prefetch) have fetched nothing: zero while one
    /// fetches; since the reader was made if none did yet.
    pub fn quiet_for(&self) -> std::time::Duration {
        let flight = self.lock();
        if flight.foreground > 0 {
            return std::time::Duration::ZERO;
        }
        flight.last_foreground.elapsed()
    }

    /// Count a span whose bytes failed verification outside [`LayerReader::read`].
    pub(crate) fn note_verify_failure(&self) {
        bump(&self.counters.verify_failures, 1);
    }

    /// Wake every waiter (used to stop the background fetcher).
    pub(crate) fn wake(&self) {
        let _flight = self.lock();
        self.changed.notify_all();
    }

    /// Wait while the layer is lazy and `stop` is unset (set it, then [`LayerReader::wake`]);
    /// returns the state then.
    pub(crate) fn wait_while_lazy(&self, stop: &AtomicBool) -> LayerState {
        let mut flight = self.lock();
        while flight.state == LayerState::Lazy && !stop.load(Ordering::Relaxed) {
            flight = self.changed.wait(flight).unwrap_or_else(|e| e.into_inner());
        }
        flight.state.clone()
    }

    /// Set the layer's state (a broken layer stays broken).
    pub(crate) fn set_state(&self, state: LayerState) {
        let mut flight = self.lock();
        self.transition(&mut flight, state);
        self.changed.notify_all();
    }

    /// Change state unless broken: a broken layer stays broken.
    fn transition(&self, flight: &mut Flight, state: LayerState) {
        if matches!(flight.state, LayerState::Broken(_)) {
            return;
        }
        if let LayerState::Broken(reason) = &state {
            tracing::error!(cache = %self.cache.dir().display(), %reason, "layer marked broken");
        }
        flight.state = state;
    }

    fn check_usable(&self) -> Result<()> {
        match self.state() {
            LayerState::Broken(reason) => Err(Error::Broken(reason)),
            _ => Ok(()),
        }
    }

    fn span(&self, id: SpanId) -> Result<Span> {
        self.ztoc
            .span(id)
            .ok_or(Error::Ztoc(hermes_ztoc::Error::Invalid {
                what: "no such span",
                index: u64::from(id),
            }))
    }

    fn lock(&self) -> MutexGuard<'_, Flight> {
        // Every update of `Flight` is a single assignment or set operation: still consistent
        // after a panic elsewhere.
        self.flight.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, Flight>) -> MutexGuard<'a, Flight> {
        self.changed.wait(guard).unwrap_or_else(|e| e.into_inner())
    }
}

/// Spans one thread is fetching. Dropping it (also on a panic) releases them and wakes the
/// readers waiting for them, who then find the spans cached or fetch them themselves.
struct Claim<'a> {
    reader: &'a LayerReader,
    ids: Vec<SpanId>,
    priority: Priority,
    broken: Option<BrokenReason>,
}

impl<'a> Claim<'a> {
    fn new(
        reader: &'a LayerReader,
        flight: &mut Flight,
        ids: Vec<SpanId>,
        priority: Priority,
    ) -> Self {
        flight.fetching.extend(ids.iter().copied());
        if priority.is_foreground() {
            flight.foreground += 1;
        }
        Self {
            reader,
            ids,
            priority,
            broken: None,
        }
    }

    /// Release the spans after the fetch ended with `result`; a broken span breaks the layer.
    fn finish(mut self, result: Result<()>) -> Result<()> {
        if let Err(Error::Broken(reason)) = &result {
            self.broken = Some(reason.clone());
        }
        result
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut flight = self.reader.lock();
        for id in &self.ids {
            flight.fetching.remove(id);
        }
        if self.priority.is_foreground() {
            flight.foreground -= 1;
            flight.last_foreground = std::time::Instant::now();
        }
        if let Some(reason) = self.broken.take() {
            self.reader
                .transition(&mut flight, LayerState::Broken(reason));
        }
        self.reader.changed.notify_all();
    }
}

/// A span that cannot be used after its (re)fetch: the layer is broken.
fn broken(span: SpanId, e: hermes_ztoc::Error) -> Error {
    Error::Broken(broken_reason(span, e))
}

/// Why span `span` cannot be used, from the zTOC's verdict on its bytes.
pub(crate) fn broken_reason(span: SpanId, e: hermes_ztoc::Error) -> BrokenReason {
    match e {
        hermes_ztoc::Error::SpanDigestMismatch {
            span,
            expected,
            actual,
        } => BrokenReason::SpanDigest {
            span,
            expected,
            actual,
        },
        other => BrokenReason::SpanDecode {
            span,
            message: other.to_string(),
        },
    }
}
