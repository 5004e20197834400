//! Open-time prefetch: when a regular file is opened, fetch the spans it covers before (or
//! while) it is read, instead of one miss at a time as the reads arrive.
//!
//! A starting container reads its files in a chain of small dependent reads (a Python import
//! opens a module, reads it whole, then imports the next one), so what costs is the latency of
//! each miss, not bandwidth. Opening a file announces the reads that follow: a few worker
//! threads fetch the file's spans (in coalesced runs, several runs at once for a large file)
//! and then, with what is left, the spans of the files next to it in the same directory, which
//! a package's imports read next. Requests go through the reader's [`FetchLimit`], where reads
//! come first, so a prefetch never delays a read of another file.
//!
//! It deliberately does no verification or caching of its own (the reader does both) and keeps
//! no state across mounts. The queue is bounded; when full, new work is dropped (reads still
//! fetch what they need).
//!
//! [`FetchLimit`]: crate::FetchLimit

use std::collections::VecDeque;
use std::ops::RangeInclusive;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use hermes_ztoc::SpanId;

use crate::{Error, LayerReader, LayerState, Result};

/// Most queued prefetch jobs of each kind; beyond this new work is dropped.
const MAX_QUEUED: usize = 4096;

/// How open-time prefetch runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenPrefetch {
    /// Worker threads; each has at most one range request in flight (the reader's
    /// [`FetchLimit`](crate::FetchLimit) bounds them all together with reads).
    pub workers: usize,
    /// Most compressed bytes of one prefetch request: a larger file is fetched as several
    /// requests at once, and a read waits for at most one such request.
    pub request_bytes: u64,
    /// Spans beyond the opened file's own that may be fetched for the files next to it in its
    /// directory (0: the opened file only).
    pub sibling_spans: u32,
}

impl Default for OpenPrefetch {
    fn default() -> Self {
        Self {
            workers: 4,
            request_bytes: 4 << 20,
            sibling_spans: 4,
        }
    }
}

/// Span ranges to fetch ahead of reads, and the threads fetching them. Dropping it stops the
/// threads after their current request and waits for them.
pub(crate) struct Prefetcher {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

struct Shared {
    reader: Arc<LayerReader>,
    options: OpenPrefetch,
    queue: Mutex<Queue>,
    changed: Condvar,
}

#[derive(Default)]
struct Queue {
    /// Spans of opened files, first come first served.
    files: VecDeque<RangeInclusive<SpanId>>,
    /// Spans of their neighbours, fetched when no opened file's spans wait.
    siblings: VecDeque<RangeInclusive<SpanId>>,
    stop: bool,
}

/// Which queue a job goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// The opened file's own spans.
    File,
    /// Spans of files next to it.
    Sibling,
}

impl Prefetcher {
    /// Start `options.workers` threads prefetching for `reader`.
    pub(crate) fn start(reader: Arc<LayerReader>, options: OpenPrefetch) -> Result<Self> {
        let shared = Arc::new(Shared {
            reader,
            options,
            queue: Mutex::new(Queue::default()),
            changed: Condvar::new(),
        });
        let mut prefetcher = Self {
            shared,
            threads: Vec::new(),
        };
        for _ in 0..options.workers.max(1) {
            let shared = Arc::clone(&prefetcher.shared);
            let thread = std::thread::Builder::new()
                .name("hermes-prefetch".into())
                .spawn(move || work(&shared))
                .map_err(|source| Error::Thread {
                    what: "open-time prefetch",
                    source,
                })?;
            prefetcher.threads.push(thread);
        }
        Ok(prefetcher)
    }

    /// The options it runs with.
    pub(crate) fn options(&self) -> OpenPrefetch {
        self.shared.options
    }

    /// Queue the spans `ids` for prefetch, split into requests of at most `request_bytes`
    /// compressed bytes so that workers fetch a large file's parts at once. Cached spans are
    /// left out; nothing is queued for a layer that is fully local or broken.
    pub(crate) fn schedule(&self, ids: RangeInclusive<SpanId>, kind: Kind) {
        let reader = &self.shared.reader;
        if reader.state() != LayerState::Lazy {
            return;
        }
        let ztoc = reader.ztoc();
        let cache = reader.cache();
        let mut jobs = Vec::new();
        let mut run: Option<(SpanId, SpanId, u64)> = None;
        for id in ids {
            let Some(span) = ztoc.span(id) else { break };
            if cache.contains(id) {
                jobs.extend(run.take().map(|(a, b, _)| a..=b));
                continue;
            }
            run = match run {
                Some((a, _, start))
                    if span.compressed.end - start <= self.shared.options.request_bytes =>
                {
                    Some((a, id, start))
                }
                other => {
                    jobs.extend(other.map(|(a, b, _)| a..=b));
                    Some((id, id, span.compressed.start))
                }
            };
        }
        jobs.extend(run.map(|(a, b, _)| a..=b));
        if jobs.is_empty() {
            return;
        }
        let mut queue = self.shared.lock();
        let q = match kind {
            Kind::File => &mut queue.files,
            Kind::Sibling => &mut queue.siblings,
        };
        let room = MAX_QUEUED.saturating_sub(q.len());
        if room < jobs.len() {
            tracing::debug!(dropped = jobs.len() - room, "prefetch queue full");
        }
        q.extend(jobs.into_iter().take(room));
        self.shared.changed.notify_all();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Every update is a single push or pop: consistent after a panic elsewhere.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One worker: take the next job (opened files first) and fetch it, until stopped.
fn work(shared: &Shared) {
    loop {
        let job = {
            let mut queue = shared.lock();
            loop {
                if queue.stop {
                    return;
                }
                if let Some(job) = queue
                    .files
                    .pop_front()
                    .or_else(|| queue.siblings.pop_front())
                {
                    break job;
                }
                queue = shared
                    .changed
                    .wait(queue)
                    .unwrap_or_else(|e| e.into_inner());
            }
        };
        // A failed prefetch costs nothing but the time: the read that needs the span fetches
        // it again and reports the error. A broken layer is recorded by the reader.
        if let Err(e) = shared
            .reader
            .prefetch_ahead(job.clone(), shared.options.request_bytes)
        {
            tracing::debug!(first = job.start(), last = job.end(), error = %e, "open-time prefetch failed");
        }
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.changed.notify_all();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
