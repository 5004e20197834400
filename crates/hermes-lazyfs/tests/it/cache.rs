//! The span cache: persistence across reopen, and refusal of another zTOC's cache.

use hermes_lazyfs::SpanCache;
use hermes_ztoc::BuildOptions;

use crate::layer::{SPAN, multi_span_layer};

fn store(cache: &SpanCache, layer: &crate::layer::Built, id: u32) {
    let span = layer.ztoc.span(id).unwrap();
    let compressed = &layer.blob[span.compressed.start as usize..span.compressed.end as usize];
    let decoded = layer.ztoc.decode_span(id, compressed).unwrap();
    cache.store(&[(span, decoded)]).unwrap();
}

#[test]
fn cache_remembers_spans_across_reopen() {
    let layer = multi_span_layer();
    assert!(
        layer.ztoc.span_count() >= 8,
        "{} spans",
        layer.ztoc.span_count()
    );
    let dir = tempfile::tempdir().unwrap();
    {
        let cache = SpanCache::open(dir.path(), &layer.ztoc).unwrap();
        assert_eq!(cache.present_count(), 0);
        store(&cache, &layer, 1);
        store(&cache, &layer, 4);
    }
    let cache = SpanCache::open(dir.path(), &layer.ztoc).unwrap();
    let present: Vec<u32> = (0..layer.ztoc.span_count())
        .filter(|&i| cache.contains(i))
        .collect();
    assert_eq!(present, vec![1, 4]);
    let span = layer.ztoc.span(4).unwrap();
    let (a, b) = (
        span.uncompressed.start as usize,
        span.uncompressed.end as usize,
    );
    assert_eq!(cache.read_at(a as u64, b - a).unwrap(), layer.tar[a..b]);
    // Only the data file, the bitmap and nothing half-written.
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["data", "spans"]);
}

#[test]
fn cache_of_another_ztoc_starts_empty() {
    let layer = multi_span_layer();
    let dir = tempfile::tempdir().unwrap();
    {
        let cache = SpanCache::open(dir.path(), &layer.ztoc).unwrap();
        store(&cache, &layer, 0);
        cache.mark_verified(layer.digest.as_str()).unwrap();
        assert_eq!(
            cache.verified_digest().as_deref(),
            Some(layer.digest.as_str())
        );
    }
    let other = hermes_ztoc::build(
        &layer.blob[..],
        &BuildOptions {
            span_size: SPAN * 2,
            ..BuildOptions::default()
        },
    )
    .unwrap();
    let cache = SpanCache::open(dir.path(), &other).unwrap();
    assert_eq!(cache.present_count(), 0);
    assert_eq!(cache.verified_digest(), None);
}

#[test]
fn corrupt_bitmap_file_starts_empty() {
    let layer = multi_span_layer();
    let dir = tempfile::tempdir().unwrap();
    {
        let cache = SpanCache::open(dir.path(), &layer.ztoc).unwrap();
        store(&cache, &layer, 2);
    }
    std::fs::write(dir.path().join("spans"), b"garbage").unwrap();
    let cache = SpanCache::open(dir.path(), &layer.ztoc).unwrap();
    assert_eq!(cache.present_count(), 0);
}

#[test]
fn stored_spans_reach_the_bitmap_on_disk_only_through_a_flush_and_a_crash_loses_only_those() {
    let layer = multi_span_layer();
    let dir = tempfile::tempdir().unwrap();
    // The flusher waits an hour: only explicit flushes persist during the test.
    let hour = std::time::Duration::from_secs(3600);
    let cache = SpanCache::open_with_flush_interval(dir.path(), &layer.ztoc, hour).unwrap();
    store(&cache, &layer, 1);
    cache.flush().unwrap();
    store(&cache, &layer, 4);
    assert!(
        cache.contains(4),
        "a stored span is readable at once, before it is durable"
    );
    let span = layer.ztoc.span(4).unwrap();
    let (a, b) = (span.uncompressed.start, span.uncompressed.end);
    assert_eq!(
        cache.read_at(a, (b - a) as usize).unwrap(),
        layer.tar[a as usize..b as usize]
    );
    // A crash: the process is gone without its final flush.
    std::mem::forget(cache);
    let reopened = SpanCache::open_with_flush_interval(dir.path(), &layer.ztoc, hour).unwrap();
    let present: Vec<u32> = (0..layer.ztoc.span_count())
        .filter(|&i| reopened.contains(i))
        .collect();
    assert_eq!(
        present,
        vec![1],
        "only the flushed span may be recorded after a crash"
    );
    let span = layer.ztoc.span(1).unwrap();
    let (a, b) = (span.uncompressed.start, span.uncompressed.end);
    assert_eq!(
        reopened.read_at(a, (b - a) as usize).unwrap(),
        layer.tar[a as usize..b as usize]
    );
}

#[test]
fn the_flusher_persists_stored_spans_without_an_explicit_flush() {
    let layer = multi_span_layer();
    let dir = tempfile::tempdir().unwrap();
    let cache = SpanCache::open_with_flush_interval(
        dir.path(),
        &layer.ztoc,
        std::time::Duration::from_millis(10),
    )
    .unwrap();
    store(&cache, &layer, 2);
    // The bitmap file: a 44-byte header, then one bit per span.
    let bitmap = || std::fs::read(dir.path().join("spans")).ok();
    crate::layer::wait_until("the flusher to record span 2 on disk", || {
        bitmap().is_some_and(|b| b.get(44) == Some(&0b100))
    });
    drop(cache);
}
