//! The background fetcher: fully local with a matching digest, broken otherwise.

use std::sync::Arc;

use hermes_lazyfs::{
    BackgroundFetcher, BrokenReason, Error, LayerDigest, LayerReader, LayerState, Outcome, Pace,
};

use crate::layer::{Built, Source, multi_span_layer, sha256, wait_until};

#[test]
fn background_fetch_makes_the_layer_fully_local() {
    let layer = multi_span_layer();
    let dir = tempfile::tempdir().unwrap();
    let source = layer.source();
    let reader = Arc::new(layer.reader(dir.path(), &source));
    // A span fetched on demand first is neither stored nor downloaded again: the background
    // digest hashes the compressed bytes the read kept.
    reader.keep_for_background();
    reader
        .read(layer.ztoc.span(2).unwrap().uncompressed.start, 10)
        .unwrap();
    assert!(dir.path().join("compressed.partial").exists());
    let on_demand = reader.stats().bytes_fetched;
    assert!(on_demand > 0);
    let size = layer.blob.len() as u64;
    let fetcher =
        BackgroundFetcher::start(Arc::clone(&reader), layer.digest.clone(), size).unwrap();
    let outcome = fetcher.wait();
    assert!(matches!(outcome, Outcome::FullyLocal), "{outcome:?}");
    assert_eq!(reader.state(), LayerState::FullyLocal);
    assert!(reader.cache().is_complete());
    let stats = reader.stats();
    assert_eq!(
        stats.background_spans_fetched,
        u64::from(layer.ztoc.span_count()) - 1
    );
    // Every compressed byte came from the registry once (neighbouring gzip spans may share
    // one byte, fetched by both).
    let total = on_demand + stats.background_bytes_fetched;
    let spans = u64::from(layer.ztoc.span_count());
    assert!(
        (size..=size + spans).contains(&total),
        "{total} bytes fetched for a {size}-byte blob: {stats:?}"
    );
    assert!(
        !dir.path().join("compressed.partial").exists(),
        "kept compressed bytes are dropped once the layer is verified"
    );

    // Everything is local now: no more fetches, even across a restart.
    source.fail(u64::MAX);
    let requests = source.requests();
    assert!(reader.read(0, layer.tar.len() as u64).unwrap() == layer.tar);
    drop(reader);
    let reader = Arc::new(layer.reader(dir.path(), &source));
    let outcome = BackgroundFetcher::start(Arc::clone(&reader), layer.digest.clone(), size)
        .unwrap()
        .wait();
    assert!(matches!(outcome, Outcome::FullyLocal), "{outcome:?}");
    assert_eq!(reader.state(), LayerState::FullyLocal);
    assert_eq!(source.requests(), requests);
}

#[test]
fn background_fetch_with_a_wrong_layer_digest_breaks_the_layer() {
    let layer = multi_span_layer();
    let dir = tempfile::tempdir().unwrap();
    let source = layer.source();
    let reader = Arc::new(layer.reader(dir.path(), &source));
    let wrong = LayerDigest::parse(&sha256(b"another layer")).unwrap();
    let outcome =
        BackgroundFetcher::start(Arc::clone(&reader), wrong.clone(), layer.blob.len() as u64)
            .unwrap()
            .wait();
    let Outcome::Broken(BrokenReason::LayerDigest {
        expected, actual, ..
    }) = outcome
    else {
        panic!("expected a layer digest mismatch, got {outcome:?}");
    };
    assert_eq!(expected, wrong.as_str());
    assert_eq!(actual, layer.digest.as_str());
    assert!(matches!(reader.state(), LayerState::Broken(_)));
    assert!(matches!(reader.read(0, 10), Err(Error::Broken(_))));
    assert_eq!(reader.cache().verified_digest(), None);
}

#[test]
fn background_fetch_with_a_wrong_size_breaks_the_layer() {
    let layer = multi_span_layer();
    let dir = tempfile::tempdir().unwrap();
    let reader = Arc::new(layer.reader(dir.path(), &layer.source()));
    let outcome = BackgroundFetcher::start(
        Arc::clone(&reader),
        layer.digest.clone(),
        layer.blob.len() as u64 + 1,
    )
    .unwrap()
    .wait();
    assert!(
        matches!(outcome, Outcome::Broken(BrokenReason::LayerDigest { .. })),
        "{outcome:?}"
    );
}

#[test]
fn background_fetch_of_a_span_corrupted_in_transit_three_times_running_completes() {
    // Seen in a chaos soak: the second corrupted answer for one span broke the layer.
    let layer = multi_span_layer();
    let dir = tempfile::tempdir().unwrap();
    let source = layer.source();
    let reader = Arc::new(layer.reader(dir.path(), &source));
    let span = layer.ztoc.span(4).unwrap();
    source.corrupt(span.compressed.start + 50, 3);
    let outcome = BackgroundFetcher::start(
        Arc::clone(&reader),
        layer.digest.clone(),
        layer.blob.len() as u64,
    )
    .unwrap()
    .wait();
    assert!(matches!(outcome, Outcome::FullyLocal), "{outcome:?}");
    assert_eq!(reader.stats().verify_failures, 3);
    assert!(reader.read(0, layer.tar.len() as u64).unwrap() == layer.tar);
}

#[test]
fn a_gzip_header_corrupted_in_transit_is_fetched_again_not_a_broken_layer() {
    // Seen in a chaos soak: a flipped byte of the gzip header, which no span digest covers,
    // made the whole-blob digest differ and broke a layer whose every span had verified.
    let layer = multi_span_layer();
    let first = layer.ztoc.span(0).unwrap();
    assert!(
        first.compressed.start > 0,
        "the gzip header precedes span 0"
    );
    let dir = tempfile::tempdir().unwrap();
    let source = layer.source();
    let reader = Arc::new(layer.reader(dir.path(), &source));
    source.corrupt(3, 1);
    let outcome = BackgroundFetcher::start(
        Arc::clone(&reader),
        layer.digest.clone(),
        layer.blob.len() as u64,
    )
    .unwrap()
    .wait();
    assert!(matches!(outcome, Outcome::FullyLocal), "{outcome:?}");
    assert_eq!(reader.state(), LayerState::FullyLocal);
    assert_eq!(
        reader.cache().verified_digest().as_deref(),
        Some(layer.digest.as_str())
    );
}

#[test]
fn background_fetch_of_a_tampered_span_breaks_the_layer() {
    let layer = multi_span_layer();
    let dir = tempfile::tempdir().unwrap();
    let source = layer.source();
    let reader = Arc::new(layer.reader(dir.path(), &source));
    let span = layer.ztoc.span(4).unwrap();
    source.corrupt(span.compressed.start + 50, u64::MAX);
    let outcome = BackgroundFetcher::start(
        Arc::clone(&reader),
        layer.digest.clone(),
        layer.blob.len() as u64,
    )
    .unwrap()
    .wait();
    assert!(
        matches!(
            outcome,
            Outcome::Broken(BrokenReason::SpanDigest { span: 4, .. })
        ),
        "{outcome:?}"
    );
    assert!(
        !reader.cache().contains(4),
        "a tampered span must never be stored"
    );
    assert!(matches!(reader.read(0, 10), Err(Error::Broken(_))));
}

/// A background fetcher at `pace`, paused behind a read of span 5 whose fetch `source` holds:
/// the read's thread and the fetcher.
fn paused_behind_a_held_read(
    layer: &Built,
    source: &Source,
    reader: &Arc<LayerReader>,
    pace: Pace,
) -> (std::thread::JoinHandle<Vec<u8>>, BackgroundFetcher) {
    let span = layer.ztoc.span(5).unwrap();
    source.hold();
    let read = std::thread::spawn({
        let reader = Arc::clone(reader);
        move || reader.read(span.uncompressed.start, 10).unwrap()
    });
    wait_until("the read's fetch", || source.blocked() == 1);
    let fetcher = BackgroundFetcher::start_paced(
        Arc::clone(reader),
        layer.digest.clone(),
        layer.blob.len() as u64,
        pace,
    )
    .unwrap();
    wait_until("the background fetcher to pause", || {
        reader.stats().background_pauses == 1
    });
    (read, fetcher)
}

#[test]
fn background_fetch_waits_while_a_read_is_fetching() {
    let layer = multi_span_layer();
    let dir = tempfile::tempdir().unwrap();
    let source = layer.source();
    let reader = Arc::new(layer.reader(dir.path(), &source));
    let (read, fetcher) = paused_behind_a_held_read(&layer, &source, &reader, Pace::gentle());
    assert_eq!(
        source.blocked(),
        1,
        "the background fetcher read while a read was fetching"
    );
    source.release();
    read.join().unwrap();
    let outcome = fetcher.wait();
    assert!(matches!(outcome, Outcome::FullyLocal), "{outcome:?}");
    assert_eq!(
        source.log()[0],
        layer.ztoc.span(5).unwrap().compressed,
        "the read's fetch goes first"
    );
}

#[test]
fn a_gentle_background_fetch_waits_for_quiet_after_the_mount_before_any_read() {
    let layer = multi_span_layer();
    let dir = tempfile::tempdir().unwrap();
    let source = layer.source();
    let made = std::time::Instant::now();
    let reader = Arc::new(layer.reader(dir.path(), &source));
    let fetcher = BackgroundFetcher::start(
        Arc::clone(&reader),
        layer.digest.clone(),
        layer.blob.len() as u64,
    )
    .unwrap();
    // The container's first reads come just after the mount: the bandwidth is theirs.
    std::thread::sleep(hermes_lazyfs::QUIET / 2);
    assert_eq!(
        source.requests(),
        0,
        "the background fetch started at mount"
    );
    assert!(reader.stats().background_pauses >= 1);
    let outcome = fetcher.wait();
    assert!(matches!(outcome, Outcome::FullyLocal), "{outcome:?}");
    assert!(
        made.elapsed() >= hermes_lazyfs::QUIET,
        "fully local {:?} after the mount, before the quiet time",
        made.elapsed()
    );
}

#[test]
fn a_fast_background_fetch_starts_at_mount() {
    let layer = multi_span_layer();
    let dir = tempfile::tempdir().unwrap();
    let source = layer.source();
    let reader = Arc::new(layer.reader(dir.path(), &source));
    let made = std::time::Instant::now();
    let outcome = BackgroundFetcher::start_paced(
        Arc::clone(&reader),
        layer.digest.clone(),
        layer.blob.len() as u64,
        Pace::fast(2),
    )
    .unwrap()
    .wait();
    assert!(matches!(outcome, Outcome::FullyLocal), "{outcome:?}");
    assert!(
        made.elapsed() < hermes_lazyfs::QUIET,
        "an Eager layer waited {:?} for reads that never came",
        made.elapsed()
    );
}

#[test]
fn stopping_a_paused_background_fetch_ends_it() {
    let layer = multi_span_layer();
    let dir = tempfile::tempdir().unwrap();
    let source = layer.source();
    let reader = Arc::new(layer.reader(dir.path(), &source));
    source.hold();
    let read = std::thread::spawn({
        let reader = Arc::clone(&reader);
        move || reader.read(0, 10).unwrap()
    });
    wait_until("the read's fetch", || source.blocked() == 1);
    let fetcher = BackgroundFetcher::start(
        Arc::clone(&reader),
        layer.digest.clone(),
        layer.blob.len() as u64,
    )
    .unwrap();
    wait_until("the background fetcher to pause", || {
        reader.stats().background_pauses == 1
    });
    let outcome = fetcher.stop();
    assert!(matches!(outcome, Outcome::Stopped), "{outcome:?}");
    assert_eq!(reader.state(), LayerState::Lazy);
    source.release();
    read.join().unwrap();
    assert_eq!(source.requests(), 1);
}

#[test]
fn a_fast_background_fetch_keeps_several_spans_in_flight_and_checks_the_same_digest() {
    let layer = multi_span_layer();
    let dir = tempfile::tempdir().unwrap();
    let source = layer.source();
    let reader = Arc::new(layer.reader(dir.path(), &source));
    source.hold();
    let fetcher = BackgroundFetcher::start_paced(
        Arc::clone(&reader),
        layer.digest.clone(),
        layer.blob.len() as u64,
        Pace::fast(3),
    )
    .unwrap();
    wait_until("three background fetches at once", || source.blocked() == 3);
    source.release();
    let outcome = fetcher.wait();
    assert!(matches!(outcome, Outcome::FullyLocal), "{outcome:?}");
    assert_eq!(reader.state(), LayerState::FullyLocal);
    assert!(reader.read(0, layer.tar.len() as u64).unwrap() == layer.tar);
    assert_eq!(reader.stats().background_pauses, 0);
}

#[test]
fn a_fast_background_fetch_of_a_wrong_digest_still_breaks_the_layer() {
    let layer = multi_span_layer();
    let dir = tempfile::tempdir().unwrap();
    let source = layer.source();
    let reader = Arc::new(layer.reader(dir.path(), &source));
    let wrong = LayerDigest::parse(&sha256(b"another blob")).unwrap();
    let outcome = BackgroundFetcher::start_paced(
        Arc::clone(&reader),
        wrong,
        layer.blob.len() as u64,
        Pace::fast(4),
    )
    .unwrap()
    .wait();
    // Hashed in blob order whatever order the spans arrived in: the digest is the blob's.
    let Outcome::Broken(BrokenReason::LayerDigest { actual, .. }) = outcome else {
        panic!("expected a layer digest mismatch, got {outcome:?}");
    };
    assert_eq!(actual, layer.digest.as_str());
}

#[test]
fn a_paused_background_fetch_told_to_hurry_goes_on_beside_the_read() {
    let layer = multi_span_layer();
    let dir = tempfile::tempdir().unwrap();
    let source = layer.source();
    let reader = Arc::new(layer.reader(dir.path(), &source));
    let pace = Pace::gentle();
    let (read, fetcher) = paused_behind_a_held_read(&layer, &source, &reader, pace.clone());
    assert_eq!(source.blocked(), 1);
    pace.speed_up(2);
    wait_until("two background fetches beside the read", || {
        source.blocked() == 3
    });
    source.release();
    read.join().unwrap();
    let outcome = fetcher.wait();
    assert!(matches!(outcome, Outcome::FullyLocal), "{outcome:?}");
}
