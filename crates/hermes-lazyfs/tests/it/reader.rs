//! The reader: cache hits, coalesced misses, verification, single flight, broken layers.

use std::sync::Arc;

use hermes_lazyfs::{BrokenReason, Error, LayerReader, LayerState, SpanCache};
use hermes_ztoc::{BuildOptions, Ztoc};

use crate::layer::{SPAN, Source, multi_span_layer, noise, wait_until};

#[test]
fn reads_match_the_tar_everywhere() {
    let layer = multi_span_layer();
    let dir = tempfile::tempdir().unwrap();
    let source = layer.source();
    let reader = layer.reader(dir.path(), &source);
    let size = layer.tar.len() as u64;
    for (offset, len) in [
        (0, 512),
        (100_000, 200_000),
        (65_530, 20),
        (size - 1000, 1000),
        (size - 10, 4096),
        (0, size),
    ] {
        let end = (offset + len).min(size);
        let got = reader.read(offset, len).unwrap();
        assert!(
            got == layer.tar[offset as usize..end as usize],
            "bytes {offset}..{end} differ"
        );
    }
    assert_eq!(reader.read(size + 10, 100).unwrap(), b"");
    assert_eq!(reader.state(), LayerState::Lazy);
    assert!(
        !dir.path().join("compressed.partial").exists(),
        "without a background fetcher no compressed bytes are kept"
    );
}

#[test]
fn miss_fetches_neighbouring_spans_in_one_read_then_hits() {
    let layer = multi_span_layer();
    let dir = tempfile::tempdir().unwrap();
    let source = layer.source();
    let reader = layer.reader(dir.path(), &source);
    let (s1, s3) = (layer.ztoc.span(1).unwrap(), layer.ztoc.span(3).unwrap());
    let start = s1.uncompressed.start + 10;
    let end = s3.uncompressed.start + 10;
    let got = reader.read(start, end - start).unwrap();
    assert!(got == layer.tar[start as usize..end as usize]);
    assert_eq!(source.log(), vec![s1.compressed.start..s3.compressed.end]);
    let stats = reader.stats();
    assert_eq!(stats.spans_fetched, 3);
    assert_eq!(stats.range_requests, 1);
    assert_eq!(stats.bytes_fetched, s3.compressed.end - s1.compressed.start);
    assert_eq!(stats.cache_hits, 0);

    reader.read(start + 1, 100).unwrap();
    assert_eq!(source.requests(), 1, "a cached read must not fetch");
    assert_eq!(reader.stats().cache_hits, 1);
    assert_eq!(reader.stats().requests, 2);
}

#[test]
fn read_fetches_only_missing_spans() {
    let layer = multi_span_layer();
    let dir = tempfile::tempdir().unwrap();
    let source = layer.source();
    let reader = layer.reader(dir.path(), &source);
    let spans: Vec<_> = (0..4).map(|i| layer.ztoc.span(i).unwrap()).collect();
    reader.read(spans[1].uncompressed.start, 1).unwrap();
    reader.read(spans[2].uncompressed.start, 1).unwrap();
    let before = source.log().len();
    let (a, b) = (spans[0].uncompressed.start, spans[3].uncompressed.end);
    assert!(reader.read(a, b - a).unwrap() == layer.tar[a as usize..b as usize]);
    assert_eq!(
        source.log()[before..],
        [spans[0].compressed.clone(), spans[3].compressed.clone()]
    );
}

/// Span 2's compressed bytes come back corrupted `times` times running: the read still returns
/// the right bytes, after `times` failed verifications and as many extra fetches.
fn corrupted_in_transit(times: u64) {
    let layer = multi_span_layer();
    let dir = tempfile::tempdir().unwrap();
    let source = layer.source();
    let reader = layer.reader(dir.path(), &source);
    let span = layer.ztoc.span(2).unwrap();
    source.corrupt(span.compressed.start + 100, times);
    let (a, b) = (span.uncompressed.start, span.uncompressed.end);
    assert!(reader.read(a, b - a).unwrap() == layer.tar[a as usize..b as usize]);
    assert_eq!(source.requests(), times + 1);
    assert_eq!(reader.stats().verify_failures, times);
    assert_eq!(reader.state(), LayerState::Lazy);
}

#[test]
fn corrupt_span_is_fetched_again_once() {
    corrupted_in_transit(1);
}

#[test]
fn a_span_corrupted_in_transit_three_times_running_is_fetched_until_it_verifies() {
    // A chaos soak (bench/chaos.sh) saw two corrupted answers in a row break a layer for good:
    // the span was fetched only once more.
    corrupted_in_transit(3);
}

#[test]
fn a_span_that_never_verifies_breaks_the_layer() {
    let layer = multi_span_layer();
    let dir = tempfile::tempdir().unwrap();
    let source = layer.source();
    let reader = layer.reader(dir.path(), &source);
    reader.read(0, 10).unwrap();
    let span = layer.ztoc.span(3).unwrap();
    source.corrupt(span.compressed.start + 5, u64::MAX);
    let before = source.requests();
    let err = reader.read(span.uncompressed.start, 10).unwrap_err();
    assert!(
        matches!(err, Error::Broken(BrokenReason::SpanDigest { span: 3, .. })),
        "{err:?}"
    );
    assert!(matches!(reader.state(), LayerState::Broken(_)));
    let requests = source.requests();
    assert_eq!(requests - before, 4, "a bounded number of fetches");
    // Even cached bytes are no longer served, and nothing more is fetched.
    assert!(matches!(reader.read(0, 10), Err(Error::Broken(_))));
    assert!(matches!(
        reader.read(span.uncompressed.end, 10),
        Err(Error::Broken(_))
    ));
    assert_eq!(source.requests(), requests);
    assert_eq!(reader.stats().verify_failures, 4);
}

#[test]
fn failed_fetch_leaves_the_layer_usable() {
    let layer = multi_span_layer();
    let dir = tempfile::tempdir().unwrap();
    let source = layer.source();
    let reader = layer.reader(dir.path(), &source);
    source.fail(1);
    assert!(matches!(reader.read(0, 10), Err(Error::Fetch { .. })));
    assert_eq!(reader.state(), LayerState::Lazy);
    assert_eq!(reader.read(0, 10).unwrap(), layer.tar[..10]);
}

#[test]
fn concurrent_readers_of_one_span_share_one_fetch() {
    const READERS: u64 = 8;
    let layer = multi_span_layer();
    let dir = tempfile::tempdir().unwrap();
    let source = layer.source();
    let reader = Arc::new(layer.reader(dir.path(), &source));
    let span = layer.ztoc.span(5).unwrap();
    source.hold();
    let threads: Vec<_> = (0..READERS)
        .map(|i| {
            let reader = Arc::clone(&reader);
            let at = span.uncompressed.start + i * 1000;
            std::thread::spawn(move || (at, reader.read(at, 500).unwrap()))
        })
        .collect();
    wait_until("one fetch in flight and every other reader waiting", || {
        source.blocked() == 1 && reader.stats().waits == READERS - 1
    });
    source.release();
    for t in threads {
        let (at, got) = t.join().unwrap();
        assert!(got == layer.tar[at as usize..at as usize + 500]);
    }
    assert_eq!(source.requests(), 1, "requests: {:?}", source.log());
    assert_eq!(reader.stats().spans_fetched, 1);
}

#[test]
fn cached_spans_are_served_after_a_restart_without_the_source() {
    let layer = multi_span_layer();
    let dir = tempfile::tempdir().unwrap();
    {
        let source = layer.source();
        let reader = layer.reader(dir.path(), &source);
        reader.read(0, layer.tar.len() as u64).unwrap();
    }
    let source = layer.source();
    source.fail(u64::MAX);
    let reader = layer.reader(dir.path(), &source);
    assert!(reader.read(0, layer.tar.len() as u64).unwrap() == layer.tar);
    assert_eq!(source.requests(), 0);
}

#[test]
fn a_panicking_fetch_does_not_strand_its_waiters() {
    let layer = multi_span_layer();
    let dir = tempfile::tempdir().unwrap();
    let source = layer.source();
    let reader = Arc::new(layer.reader(dir.path(), &source));
    let at = layer.ztoc.span(1).unwrap().uncompressed.start;
    source.hold();
    let spawn = || {
        let reader = Arc::clone(&reader);
        std::thread::spawn(move || reader.read(at, 10).map_err(|e| e.to_string()))
    };
    let first = spawn();
    wait_until("the first fetch", || source.blocked() == 1);
    let second = spawn();
    wait_until("the second reader to wait", || reader.stats().waits == 1);
    source.panic(1);
    source.release();
    assert!(first.join().is_err(), "the first reader's fetch panicked");
    assert_eq!(
        second.join().unwrap().unwrap(),
        layer.tar[at as usize..at as usize + 10]
    );
    assert_eq!(source.requests(), 2);
}

#[test]
fn reads_are_traced_in_first_touch_order_within_the_window_and_timed() {
    let layer = multi_span_layer();
    let dir = tempfile::tempdir().unwrap();
    let source = layer.source();
    let reader = layer.reader(dir.path(), &source);
    let span = |i| layer.ztoc.span(i).unwrap().uncompressed.start;
    reader.read(span(0), 10).unwrap();
    assert_eq!(
        reader.trace(),
        (vec![], true),
        "no window: nothing recorded"
    );
    reader.start_trace(std::time::Duration::from_secs(60));
    for i in [3, 1, 3, 0, 2] {
        reader.read(span(i), 10).unwrap();
    }
    assert_eq!(reader.trace(), (vec![3, 1, 0, 2], false));
    let stats = reader.stats();
    assert_eq!(
        stats.read_latency.count(),
        stats.requests,
        "every read is timed"
    );
}

#[test]
fn traced_bytes_count_each_byte_read_once_and_its_share_of_the_span_compressed() {
    let layer = multi_span_layer();
    let dir = tempfile::tempdir().unwrap();
    let source = layer.source();
    let reader = layer.reader(dir.path(), &source);
    let span = layer.ztoc.span(2).unwrap();
    let (u, c) = (span.uncompressed.clone(), span.compressed.clone());
    reader.start_trace(std::time::Duration::from_secs(60));
    let half = (u.end - u.start) / 2;
    // The first half of span 2, read in overlapping and repeated pieces.
    for (at, len) in [(0, 100), (50, 100), (0, half), (10, 20)] {
        reader.read(u.start + at, len).unwrap();
    }
    let traced = reader.traced_bytes();
    assert_eq!(traced.uncompressed, half);
    let expected = (half as u128 * (c.end - c.start) as u128 / (u.end - u.start) as u128) as u64;
    assert_eq!(traced.compressed, expected);
    // A range across the end of span 2 into span 3 counts in both.
    reader.read(u.end - 10, 20).unwrap();
    let next = layer.ztoc.span(3).unwrap();
    let share = |s: &hermes_ztoc::Span, n: u64| {
        (n as u128 * (s.compressed.end - s.compressed.start) as u128
            / (s.uncompressed.end - s.uncompressed.start) as u128) as u64
    };
    let traced = reader.traced_bytes();
    assert_eq!(traced.uncompressed, half + 20);
    assert_eq!(
        traced.compressed,
        share(&span, half) + share(&span, 10) + share(&next, 10)
    );
}

#[test]
fn prefetch_fetches_listed_spans_in_runs_and_skips_cached_and_unknown_ones() {
    let layer = multi_span_layer();
    let dir = tempfile::tempdir().unwrap();
    let source = layer.source();
    let reader = layer.reader(dir.path(), &source);
    let (s1, s2, s4) = (
        layer.ztoc.span(1).unwrap(),
        layer.ztoc.span(2).unwrap(),
        layer.ztoc.span(4).unwrap(),
    );
    reader.read(s4.uncompressed.start, 1).unwrap();
    let logged = source.log().len();
    reader.prefetch(&[1, 2, 4, 9_999]).unwrap();
    let fetched = &source.log()[logged..];
    assert_eq!(fetched.len(), 1, "one coalesced read: {fetched:?}");
    assert_eq!(fetched[0], s1.compressed.start..s2.compressed.end);
    let before = source.requests();
    let got = reader.read(s1.uncompressed.start, 100).unwrap();
    assert!(got == layer.tar[s1.uncompressed.start as usize..][..100]);
    assert_eq!(source.requests(), before, "prefetched spans are cached");
}

#[test]
fn a_span_claiming_more_than_it_decodes_to_is_an_eio_not_an_abort() {
    // A zTOC's span lengths are not covered by its digests. Raising the tar size by 64 GiB
    // leaves a claim the last span's 4 MiB of zstd could hold (a zstd byte can decode to 32
    // KiB), so the zTOC parses; sizing the decode buffer from it aborted the node.
    let mut tar = tar::Builder::new(Vec::new());
    for (name, len, seed) in [("a", 256 << 10, 1), ("b", 4 << 20, 2)] {
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(len as u64);
        tar.append_data(&mut h, name, noise(len, seed).as_slice())
            .unwrap();
    }
    let tar = tar.into_inner().unwrap();
    // Two frames, so the layer is seekable and `b` sits in the second span.
    let split = 512 + (256 << 10) + 512;
    let mut blob = zstd::encode_all(&tar[..split], 1).unwrap();
    blob.extend(zstd::encode_all(&tar[split..], 1).unwrap());
    let options = BuildOptions {
        span_size: SPAN,
        ..BuildOptions::default()
    };
    let ztoc = hermes_ztoc::build(blob.as_slice(), &options).unwrap();
    assert_eq!(ztoc.span_count(), 2);
    let bytes = ztoc.to_bytes();
    let size = ztoc.uncompressed_archive_size().to_le_bytes();
    let at = bytes.windows(8).position(|w| w == size).unwrap();
    let mut claim = bytes.clone();
    claim[at..at + 8]
        .copy_from_slice(&(ztoc.uncompressed_archive_size() + (64 << 30)).to_le_bytes());
    let bad = Arc::new(Ztoc::from_bytes(&claim).expect("the claim fits the compressed bytes"));
    assert!(bad.span(1).unwrap().uncompressed.end > 64 << 30);

    let dir = tempfile::tempdir().unwrap();
    let cache = SpanCache::open(dir.path(), &bad).unwrap();
    let reader = LayerReader::new(bad.clone(), Source::new(blob), cache);
    let b = bad.entries().iter().find(|e| e.name == b"b").unwrap();
    let err = reader
        .read(b.offset, 4096)
        .expect_err("the span cannot decode");
    assert!(
        matches!(
            &err,
            Error::Broken(BrokenReason::SpanDecode { span: 1, .. })
        ),
        "{err}"
    );
    assert!(matches!(reader.state(), LayerState::Broken(_)));
}
