//! Through the fault-injecting proxy: drops resume byte-identically, 5xx/429 are retried within a
//! budget, corrupt blobs are refused and nothing is stored.

use hermes_oci::manifest::Platform;
use hermes_oci::{Credentials, Error, LayerOutcome, Store};
use hermes_testkit::{Fault, FaultProxy, FaultRule, Registry, TestImage};

use crate::support::{client, options, reference};

struct Setup {
    _registry: Registry,
    proxy: FaultProxy,
    layer: String,
    blob: Vec<u8>,
    store_dir: tempfile::TempDir,
}

fn setup(repo: &str) -> Setup {
    let registry = Registry::start().expect("registry");
    let pushed = TestImage::new()
        .big_layer(4)
        .push(&registry.host(), &format!("{repo}:v1"))
        .expect("push");
    let proxy = FaultProxy::start(registry.addr()).expect("proxy");
    let layer = pushed
        .layers
        .iter()
        .max_by_key(|l| l.size)
        .expect("a layer")
        .digest
        .clone();
    let blob = std::fs::read(registry_blob_path(&registry, &layer)).expect("registry blob on disk");
    Setup {
        _registry: registry,
        proxy,
        layer,
        blob,
        store_dir: tempfile::tempdir().expect("tempdir"),
    }
}

fn registry_blob_path(registry: &Registry, digest: &str) -> std::path::PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    registry.root().join(format!(
        "data/docker/registry/v2/blobs/sha256/{}/{hex}/data",
        &hex[..2]
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drop_mid_blob_resumes_and_the_ztoc_is_identical() {
    let s = setup("drop/app");
    s.proxy.push(
        FaultRule::new(format!("/blobs/{}", s.layer), Fault::DropAfter(1_000_000)).method("GET"),
    );
    s.proxy.push(
        FaultRule::new(format!("/blobs/{}", s.layer), Fault::Truncate(500_000)).method("GET"),
    );
    let c = client(Credentials::none());
    let r = reference(&format!("{}/drop/app:v1", s.proxy.host()));
    let store = Store::open(s.store_dir.path()).expect("store");
    let result = hermes_oci::build_index(&c, &store, &r, &options(0, 1 << 20), &|_| {})
        .await
        .expect("index despite drops");
    let record = result
        .record
        .layers
        .iter()
        .find(|l| l.digest.as_str() == s.layer)
        .expect("layer record");
    let LayerOutcome::Indexed { ztoc, .. } = &record.outcome else {
        panic!("not indexed: {record:?}")
    };
    let ours = store.get_blob(ztoc).expect("get").expect("stored");
    let direct = hermes_ztoc::build(
        s.blob.as_slice(),
        &hermes_ztoc::BuildOptions {
            span_size: 1 << 20,
            ..Default::default()
        },
    )
    .expect("direct");
    assert!(
        ours == direct.to_bytes(),
        "zTOC built over a resumed stream differs from one built from the file"
    );
    let resumes: Vec<_> = s
        .proxy
        .log()
        .into_iter()
        .filter(|l| l.path.contains(&s.layer) && l.range.is_some())
        .collect();
    assert_eq!(resumes.len(), 2, "two resumed requests: {resumes:?}");
    assert!(resumes.iter().all(|l| {
        l.range
            .as_deref()
            .is_some_and(|r| r.starts_with("bytes=") && r.ends_with('-'))
    }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_and_429_are_retried_within_a_budget() {
    let s = setup("retry/app");
    let c = client(Credentials::none());
    let r = reference(&format!("{}/retry/app:v1", s.proxy.host()));
    s.proxy
        .push(FaultRule::new("/manifests/", Fault::Status(503)).times(2));
    s.proxy.push(FaultRule::new(
        "/manifests/",
        Fault::TooManyRequests {
            retry_after_secs: 1,
        },
    ));
    s.proxy.push(FaultRule::new("/blobs/", Fault::Status(502)));
    s.proxy.push(FaultRule::new("/blobs/", Fault::Reset));
    let started = std::time::Instant::now();
    let image = c
        .resolve(&r, &Platform::host())
        .await
        .expect("resolve after retries");
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(1),
        "Retry-After was honoured"
    );
    let big = image
        .manifest
        .layers
        .iter()
        .find(|l| l.digest.as_str() == s.layer)
        .expect("big layer");
    let blob = c
        .get_blob(&r, &big.digest, big.size as u64)
        .await
        .expect("blob after retries");
    assert!(blob.as_ref() == s.blob.as_slice());

    // A registry that keeps failing: bounded attempts, then a clear error.
    s.proxy.clear_log();
    s.proxy
        .push(FaultRule::new("/manifests/", Fault::Status(500)).times(100));
    let err = c.get_manifest(&r).await.expect_err("must give up");
    assert!(
        matches!(err, Error::RetriesExhausted { attempts: 6, .. }),
        "{err}"
    );
    assert_eq!(s.proxy.log().len(), 6, "exactly the retry budget was spent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_blob_is_an_error_and_nothing_is_stored() {
    let s = setup("corrupt/app");
    s.proxy.push(
        FaultRule::new(
            format!("/blobs/{}", s.layer),
            Fault::Corrupt { at: 2_000_000 },
        )
        .method("GET"),
    );
    let c = client(Credentials::none());
    let r = reference(&format!("{}/corrupt/app:v1", s.proxy.host()));
    let store = Store::open(s.store_dir.path()).expect("store");
    // Only the big (corrupted) layer is eligible, so nothing at all may be stored.
    let err = hermes_oci::build_index(&c, &store, &r, &options(1 << 20, 1 << 20), &|_| {})
        .await
        .expect_err("corrupt");
    assert!(
        matches!(&err, Error::DigestMismatch { expected, .. } if expected.as_str() == s.layer),
        "{err}"
    );
    assert!(
        store.images().expect("images").is_empty(),
        "no image record"
    );
    let blobs = s.store_dir.path().join("blobs/sha256");
    assert!(
        !blobs.exists() || std::fs::read_dir(&blobs).expect("dir").next().is_none(),
        "no zTOC stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_response_times_out_and_is_retried() {
    let s = setup("stall/app");
    s.proxy.push(FaultRule::new(
        "/manifests/",
        Fault::Stall(std::time::Duration::from_secs(4)),
    ));
    let c = client(Credentials::none());
    let r = reference(&format!("{}/stall/app:v1", s.proxy.host()));
    c.get_manifest(&r)
        .await
        .expect("a stall is survived by a retry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_ignoring_range_and_redirects_are_handled() {
    let s = setup("odd/app");
    let c = client(Credentials::none());
    let r = reference(&format!("{}/odd/app:v1", s.proxy.host()));
    let digest = hermes_oci::Digest::parse(&s.layer).expect("digest");
    s.proxy.push(FaultRule::new(
        format!("/blobs/{}", s.layer),
        Fault::IgnoreRange,
    ));
    let piece = c
        .blob_range(&r, &digest, 1000, 100)
        .await
        .expect("range from a whole-blob answer");
    assert!(
        piece.as_ref() == &s.blob[1000..1100],
        "the right slice is cut from the whole blob"
    );
    s.proxy.push(FaultRule::new(
        format!("/blobs/{}", s.layer),
        Fault::Redirect,
    ));
    let blob = c
        .get_blob(&r, &digest, s.blob.len() as u64)
        .await
        .expect("blob through a redirect");
    assert!(blob.as_ref() == s.blob.as_slice());
}
