//! Open-time prefetch over real FUSE mounts: opening a file fetches its spans ahead of its
//! reads, coalesced and with bounded concurrency; reads of other files never wait behind it; a
//! span corrupted on the way is fetched again; the background fetcher treats it as a read.

use std::ops::{Range, RangeInclusive};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use hermes_lazyfs::{BackgroundFetcher, LayerState, OpenPrefetch, Outcome};

use crate::fs::Mounted;
use crate::layer::{Built, Source, TestLayer, noise, wait_until};

/// A ten-span file in one directory and, far from it in the tar, a small file in another.
fn layer() -> Built {
    TestLayer::new()
        .dir("pkg", 0o755)
        .file("pkg/big.bin", 0o644, (0, 0), &noise(640_000, 7))
        .dir("other", 0o755)
        .file("other/filler", 0o644, (0, 0), &noise(300_000, 8))
        .file("other/far.txt", 0o644, (0, 0), &noise(20_000, 9))
        .finish()
}

/// The spans of a file's bytes.
fn spans(layer: &Built, path: &str) -> RangeInclusive<u32> {
    let range = layer.file_range(path);
    layer.ztoc.span_of(range.start)..=layer.ztoc.span_of(range.end - 1)
}

/// The compressed bytes of a file's spans.
fn compressed(layer: &Built, path: &str) -> Range<u64> {
    let ids = spans(layer, path);
    let first = layer.ztoc.span(*ids.start()).unwrap();
    let last = layer.ztoc.span(*ids.end()).unwrap();
    first.compressed.start..last.compressed.end
}

fn content(layer: &Built, path: &str) -> Vec<u8> {
    layer.expect[path].content.clone()
}

/// The opened file only, in requests of at most 192 KiB (two spans of noise).
fn file_only() -> OpenPrefetch {
    OpenPrefetch {
        workers: 4,
        request_bytes: 192 << 10,
        sibling_spans: 0,
    }
}

/// Releases held reads when dropped, so a failing test unwinds instead of hanging on a thread
/// that waits for the source. Declare it after what joins such threads.
struct Release<'a>(&'a Source);

impl Drop for Release<'_> {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// Read `path` on another thread; `None` if it takes more than 10 s.
fn read_within_10s(path: PathBuf) -> Option<std::io::Result<Vec<u8>>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || tx.send(std::fs::read(path)));
    rx.recv_timeout(Duration::from_secs(10)).ok()
}

#[test]
fn opening_a_file_fetches_all_its_spans_before_it_is_read_in_bounded_concurrent_requests() {
    let layer = layer();
    let source = layer.source();
    // Slow enough that requests issued together overlap.
    source.slow(Duration::from_millis(50));
    let m = Mounted::with_prefetch(&layer, &source, 3, Some(file_only()));
    let ids = spans(&layer, "pkg/big.bin");
    let count = ids.clone().count();
    assert!(count >= 8, "the file covers {count} spans");

    let _open = std::fs::File::open(m.root.join("pkg/big.bin")).unwrap();
    wait_until("every span of the opened file cached, with no read", || {
        ids.clone().all(|id| m.reader().cache().contains(id))
    });

    let wanted = compressed(&layer, "pkg/big.bin");
    let mut log = source.log();
    log.sort_by_key(|r| r.start);
    assert!(
        log.iter()
            .all(|r| wanted.start <= r.start && r.end <= wanted.end),
        "requests {log:?} outside the file's spans {wanted:?}"
    );
    let covered = log.windows(2).all(|w| w[0].end == w[1].start)
        && log.first().map(|r| r.start) == Some(wanted.start)
        && log.last().map(|r| r.end) == Some(wanted.end);
    assert!(covered, "requests {log:?} do not tile {wanted:?}");
    assert!(
        log.len() < count,
        "{} requests for {count} spans: neighbours were not coalesced",
        log.len()
    );
    let peak = source.peak_concurrency();
    assert!(peak <= 3, "{peak} requests at once, the limit is 3");
    assert!(
        peak >= 2,
        "prefetch requests never overlapped (peak {peak})"
    );
    // A span is counted just after it is stored.
    wait_until("the prefetched spans counted", || {
        m.reader().stats().prefetch_spans_fetched == count as u64
    });

    let requests = source.requests();
    assert_eq!(
        std::fs::read(m.root.join("pkg/big.bin")).unwrap(),
        content(&layer, "pkg/big.bin")
    );
    assert_eq!(
        source.requests(),
        requests,
        "reading the prefetched file fetched again"
    );
}

#[test]
fn a_read_of_another_file_proceeds_while_an_open_time_prefetch_is_in_flight() {
    let layer = layer();
    let source = layer.source();
    assert!(spans(&layer, "pkg/big.bin").end() < spans(&layer, "other/far.txt").start());
    source.hold_range(compressed(&layer, "pkg/big.bin"));
    // Two slots: prefetch may take one, the other stays for reads.
    let m = Mounted::with_prefetch(&layer, &source, 2, Some(file_only()));
    let _release = Release(&source);

    let _open = std::fs::File::open(m.root.join("pkg/big.bin")).unwrap();
    wait_until("the prefetch's request in flight", || source.blocked() >= 1);
    let far = read_within_10s(m.root.join("other/far.txt"))
        .expect("the read of other/far.txt waited behind the prefetch of pkg/big.bin")
        .unwrap();
    assert_eq!(far, content(&layer, "other/far.txt"));
    assert_eq!(
        source.blocked(),
        1,
        "prefetch must not take more than one of the two slots"
    );

    source.release();
    assert_eq!(
        std::fs::read(m.root.join("pkg/big.bin")).unwrap(),
        content(&layer, "pkg/big.bin")
    );
}

#[test]
fn reads_of_different_files_are_served_concurrently() {
    let layer = layer();
    let source = layer.source();
    source.hold_range(compressed(&layer, "pkg/big.bin"));
    let m = Mounted::with_prefetch(&layer, &source, 4, None);
    let _release = Release(&source);

    let big = std::thread::spawn({
        let path = m.root.join("pkg/big.bin");
        move || std::fs::read(path)
    });
    wait_until("the read of pkg/big.bin waiting for its fetch", || {
        source.blocked() >= 1
    });
    let far = read_within_10s(m.root.join("other/far.txt"))
        .expect("the read of other/far.txt waited for the fetch of another file")
        .unwrap();
    assert_eq!(far, content(&layer, "other/far.txt"));

    source.release();
    assert_eq!(big.join().unwrap().unwrap(), content(&layer, "pkg/big.bin"));
}

#[test]
fn a_span_corrupted_during_open_time_prefetch_is_fetched_again_and_reads_right_bytes() {
    let layer = layer();
    let source = layer.source();
    let ids = spans(&layer, "pkg/big.bin");
    let bad = layer.ztoc.span(ids.start() + 3).unwrap();
    source.corrupt(bad.compressed.start + 100, 1);
    let m = Mounted::with_prefetch(&layer, &source, 3, Some(file_only()));

    let _open = std::fs::File::open(m.root.join("pkg/big.bin")).unwrap();
    wait_until("every span of the opened file cached", || {
        ids.clone().all(|id| m.reader().cache().contains(id))
    });
    let stats = m.reader().stats();
    assert_eq!(stats.verify_failures, 1);
    assert_eq!(m.reader().state(), LayerState::Lazy);
    assert!(
        source.log().contains(&bad.compressed),
        "span {} was not fetched again on its own: {:?}",
        bad.id,
        source.log()
    );
    assert_eq!(
        std::fs::read(m.root.join("pkg/big.bin")).unwrap(),
        content(&layer, "pkg/big.bin")
    );
}

#[test]
fn the_background_fetcher_waits_while_an_open_time_prefetch_is_in_flight() {
    let layer = layer();
    let source = layer.source();
    source.hold_range(compressed(&layer, "pkg/big.bin"));
    let m = Mounted::with_prefetch(&layer, &source, 4, Some(file_only()));
    let _open = std::fs::File::open(m.root.join("pkg/big.bin")).unwrap();
    wait_until("the prefetch's requests in flight", || {
        source.blocked() >= 1
    });

    let reader = Arc::clone(m.handle().reader());
    let fetcher = BackgroundFetcher::start(
        Arc::clone(&reader),
        layer.digest.clone(),
        layer.blob.len() as u64,
    )
    .unwrap();
    let _release = Release(&source);
    wait_until("the background fetcher paused", || {
        reader.stats().background_pauses >= 1
    });
    let requests = source.requests();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        source.requests(),
        requests,
        "the background fetcher fetched while a prefetch was in flight"
    );

    source.release();
    assert!(matches!(fetcher.wait(), Outcome::FullyLocal));
    assert_eq!(
        std::fs::read(m.root.join("pkg/big.bin")).unwrap(),
        content(&layer, "pkg/big.bin")
    );
}
