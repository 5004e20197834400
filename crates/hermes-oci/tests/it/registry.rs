//! Against a real registry: pull back, index, lazy reads, auth, SOCI artifacts, platforms.

use std::process::Command;
use std::time::Duration;

use hermes_oci::manifest::{Index, Manifest, Platform, media};
use hermes_oci::soci::{SociVersion, annotation};
use hermes_oci::{Credential, Credentials, Error, LayerOutcome, Store};
use hermes_testkit::{FaultProxy, Registry, TestImage};

use crate::support::{client, digest, options, reference};

fn sample_image() -> TestImage {
    TestImage::new()
        .file("etc/hello.txt", b"hello from hermes\n".to_vec())
        .dir("usr/bin")
        .symlink("bin", "usr/bin")
        .layer()
        .big_file("opt/model/weights.bin", 12)
        .file("opt/model/config.json", br#"{"layers": 12}"#.to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_image_pulls_back_indexes_and_reads_lazily() {
    let registry = Registry::start().expect("registry");
    let pushed = sample_image()
        .push(&registry.host(), "app/model:v1")
        .expect("push");
    let c = client(Credentials::none());
    let r = reference(&pushed.reference);

    let image = c.resolve(&r, &Platform::host()).await.expect("resolve");
    assert_eq!(image.fetched.digest.as_str(), pushed.manifest_digest);
    assert_eq!(image.manifest.layers.len(), pushed.layers.len());
    for (layer, want) in image.manifest.layers.iter().zip(&pushed.layers) {
        let blob = c
            .get_blob(&r, &layer.digest, layer.size as u64)
            .await
            .expect("blob");
        assert_eq!(
            hermes_oci::Digest::of(&blob).as_str(),
            want.digest,
            "pulled blob is what was pushed"
        );
    }

    let store_dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(store_dir.path()).expect("store");
    let result = hermes_oci::build_index(&c, &store, &r, &options(1 << 20, 1 << 20), &|_| {})
        .await
        .expect("index");
    let record = &result.record;
    assert_eq!(record.layers.len(), 2);
    assert!(
        matches!(&record.layers[0].outcome, LayerOutcome::Skipped { reason } if reason.contains("minimum layer size"))
    );
    let LayerOutcome::Indexed {
        ztoc,
        spans,
        reused: false,
        soci_compatible: true,
        ..
    } = &record.layers[1].outcome
    else {
        panic!("big layer not indexed: {:?}", record.layers[1]);
    };
    assert!(*spans >= 2, "{spans} spans");
    assert_eq!(
        store.images().expect("images"),
        vec![record.clone()],
        "index info sees the record"
    );

    // Read every file of the indexed layer through the zTOC with HTTP range requests.
    let z = hermes_ztoc::Ztoc::from_bytes(&store.get_blob(ztoc).expect("get").expect("stored"))
        .expect("ztoc");
    let layer = &pushed.layers[1];
    let ranges = hermes_oci::RegistryRangeReader::new(
        c.clone(),
        r.clone(),
        digest(&layer.digest),
        tokio::runtime::Handle::current(),
    );
    let files = layer.files.clone();
    tokio::task::spawn_blocking(move || {
        for (path, want) in &files {
            let mut got = Vec::new();
            z.extract(&ranges, path, &mut got)
                .unwrap_or_else(|e| panic!("{path}: {e}"));
            assert!(got == *want, "{path}: lazily read bytes differ");
        }
    })
    .await
    .expect("lazy reads");

    // A second build reads no layer again.
    let again = hermes_oci::build_index(&c, &store, &r, &options(1 << 20, 1 << 20), &|_| {})
        .await
        .expect("reindex");
    assert!(matches!(
        again.record.layers[1].outcome,
        LayerOutcome::Indexed { reused: true, .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reindex_does_not_read_the_layer_again() {
    let registry = Registry::start().expect("registry");
    let proxy = FaultProxy::start(registry.addr()).expect("proxy");
    let pushed = TestImage::new()
        .big_layer(3)
        .push(&registry.host(), "reuse/app:v1")
        .expect("push");
    let c = client(Credentials::none());
    let r = reference(&format!("{}/reuse/app:v1", proxy.host()));
    let store_dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(store_dir.path()).expect("store");
    hermes_oci::build_index(&c, &store, &r, &options(0, 1 << 20), &|_| {})
        .await
        .expect("first");
    let big = pushed
        .layers
        .iter()
        .max_by_key(|l| l.size)
        .expect("a layer");
    let layer_path = format!("/blobs/{}", big.digest);
    assert!(
        proxy.log().iter().any(|l| l.path.ends_with(&layer_path)),
        "first build reads the layer"
    );
    proxy.clear_log();
    hermes_oci::build_index(&c, &store, &r, &options(0, 1 << 20), &|_| {})
        .await
        .expect("second");
    assert!(
        !proxy.log().iter().any(|l| l.path.ends_with(&layer_path)),
        "second build must not read the layer: {:?}",
        proxy.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_required_provided_and_wrong() {
    let registry = Registry::start_with_htpasswd("hermes", "s3cret").expect("registry");
    let pushed = sample_image()
        .push_with_creds(&registry.host(), "private/app:v1", "hermes", "s3cret")
        .expect("push");
    let r = reference(&pushed.reference);

    let err = client(Credentials::none())
        .resolve(&r, &Platform::host())
        .await
        .expect_err("anonymous must fail");
    assert!(
        matches!(err, Error::Unauthorized { status: 401, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("check the credentials"), "{err}");

    let mut wrong = Credentials::none();
    wrong.insert(
        &registry.host(),
        Credential::Basic {
            username: "hermes".into(),
            password: "nope".into(),
        },
    );
    let err = client(wrong)
        .resolve(&r, &Platform::host())
        .await
        .expect_err("wrong password must fail");
    assert!(matches!(err, Error::Unauthorized { .. }), "{err}");

    let config = format!(
        r#"{{"auths":{{"{}":{{"username":"hermes","password":"s3cret"}}}}}}"#,
        registry.host()
    );
    let right = Credentials::from_docker_config(config.as_bytes(), "test").expect("config");
    let image = client(right)
        .resolve(&r, &Platform::host())
        .await
        .expect("with credentials");
    assert_eq!(image.fetched.digest.as_str(), pushed.manifest_digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tokens_are_fetched_cached_and_refreshed() {
    let registry = Registry::start().expect("registry");
    let pushed = TestImage::new()
        .big_layer(2)
        .push(&registry.host(), "tok/app:v1")
        .expect("push");
    let proxy =
        FaultProxy::start_with_bearer_auth(registry.addr(), "robot", "pw", Duration::from_secs(2))
            .expect("proxy");
    let r = reference(&format!("{}/tok/app:v1", proxy.host()));

    let err = client(Credentials::none())
        .resolve(&r, &Platform::host())
        .await
        .expect_err("no credentials");
    assert!(matches!(err, Error::Unauthorized { .. }), "{err}");

    let mut creds = Credentials::none();
    creds.insert(
        &proxy.host(),
        Credential::Basic {
            username: "robot".into(),
            password: "pw".into(),
        },
    );
    let c = client(creds);
    let before = proxy.tokens_issued();
    let image = c
        .resolve(&r, &Platform::host())
        .await
        .expect("resolve with a token");
    let layer = image
        .manifest
        .layers
        .iter()
        .max_by_key(|l| l.size)
        .expect("a layer");
    c.blob_range(&r, &layer.digest, 0, 100)
        .await
        .expect("range with the cached token");
    assert_eq!(
        proxy.tokens_issued() - before,
        1,
        "one token for the whole pull scope"
    );
    assert_eq!(image.fetched.digest.as_str(), pushed.manifest_digest);

    // After the token's lifetime a new one is fetched transparently.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    c.blob_range(&r, &layer.digest, 100, 100)
        .await
        .expect("range after expiry");
    assert_eq!(
        proxy.tokens_issued() - before,
        2,
        "token refreshed after expiry"
    );
}

/// The sample image pushed to a fresh registry and indexed (1 MiB minimum layer, 1 MiB spans).
struct Indexed {
    registry: Registry,
    pushed: hermes_testkit::PushedImage,
    c: hermes_oci::Client,
    r: hermes_oci::Reference,
    store: Store,
    result: hermes_oci::IndexResult,
    _dir: tempfile::TempDir,
}

async fn indexed_sample(repo: &str) -> Indexed {
    let registry = Registry::start().expect("registry");
    let pushed = sample_image().push(&registry.host(), repo).expect("push");
    let c = client(Credentials::none());
    let r = reference(&pushed.reference);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let result = hermes_oci::build_index(&c, &store, &r, &options(1 << 20, 1 << 20), &|_| {})
        .await
        .expect("index");
    Indexed {
        registry,
        pushed,
        c,
        r,
        store,
        result,
        _dir: dir,
    }
}

fn skopeo_raw(reference: &str) -> Vec<u8> {
    let out = Command::new("skopeo")
        .args([
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{reference}"),
        ])
        .output()
        .expect("skopeo is required: apt-get install skopeo");
    assert!(
        out.status.success(),
        "skopeo inspect {reference}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soci_v2_push_is_visible_to_skopeo_with_the_spec_shapes() {
    let Indexed {
        registry: _registry,
        pushed,
        c,
        r,
        store,
        result,
        _dir,
    } = indexed_sample("soci/app:v1").await;
    let target = r.with_tag("v1-soci");
    let summary = hermes_oci::push_soci(
        &c,
        &store,
        &result,
        SociVersion::V2,
        &target,
        "AWS SOCI CLI v0.2",
    )
    .await
    .expect("push");
    assert_eq!(summary.ztocs, 1);

    let index: Index =
        serde_json::from_slice(&skopeo_raw(&target.to_string())).expect("index json");
    assert_eq!(index.media_type.as_deref(), Some(media::OCI_INDEX));
    let image_desc = index
        .manifests
        .iter()
        .find(|d| d.artifact_type.is_none())
        .expect("image entry");
    let soci_desc = index
        .manifests
        .iter()
        .find(|d| d.artifact_type.as_deref() == Some(media::SOCI_INDEX_V2))
        .expect("soci entry");
    assert_eq!(soci_desc.digest, summary.soci_index);
    assert_eq!(
        soci_desc.annotation(annotation::IMAGE_MANIFEST_DIGEST),
        Some(image_desc.digest.as_str())
    );
    assert_eq!(
        image_desc.annotation(annotation::INDEX_DIGEST),
        Some(summary.soci_index.as_str())
    );
    assert!(
        soci_desc.platform.is_some(),
        "SOCI descriptor carries the platform"
    );

    let soci_bytes = skopeo_raw(&format!(
        "{}/{}@{}",
        r.registry, r.repository, summary.soci_index
    ));
    let soci: Manifest = serde_json::from_slice(&soci_bytes).expect("soci index json");
    assert_eq!(soci.config.media_type, media::SOCI_INDEX_V2);
    assert_eq!(
        soci.config.digest.as_str(),
        "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
    );
    assert_eq!(
        soci.annotations
            .as_ref()
            .and_then(|a| a.get(annotation::BUILD_TOOL_IDENTIFIER))
            .map(String::as_str),
        Some("AWS SOCI CLI v0.2")
    );
    let z = &soci.layers[0];
    assert_eq!(z.media_type, media::OCTET_STREAM);
    assert_eq!(
        z.annotation(annotation::LAYER_DIGEST),
        Some(pushed.layers[1].digest.as_str())
    );
    assert_eq!(
        z.annotation(annotation::LAYER_MEDIA_TYPE),
        Some(media::OCI_LAYER_GZIP)
    );
    assert_eq!(z.annotation(annotation::SPAN_SIZE), Some("1048576"));
    assert_eq!(
        hermes_oci::manifest::to_go_json(&soci),
        soci_bytes,
        "the registry holds Go-canonical JSON"
    );

    let converted: Manifest = serde_json::from_slice(&skopeo_raw(&format!(
        "{}/{}@{}",
        r.registry, r.repository, image_desc.digest
    )))
    .expect("image");
    assert_eq!(
        converted.layers, result.image.manifest.layers,
        "the converted image keeps its layers"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soci_v1_push_is_found_through_referrers() {
    let Indexed {
        registry: _registry,
        pushed: _,
        c,
        r,
        store,
        result,
        _dir,
    } = indexed_sample("soci1/app:v1").await;
    let summary = hermes_oci::push_soci(
        &c,
        &store,
        &result,
        SociVersion::V1,
        &r,
        "AWS SOCI CLI v0.2",
    )
    .await
    .expect("push");
    let found = c
        .referrers(&r, &result.image.fetched.digest, media::SOCI_INDEX_V1)
        .await
        .expect("referrers");
    assert_eq!(
        found.iter().map(|d| d.digest.clone()).collect::<Vec<_>>(),
        vec![summary.soci_index.clone()]
    );
    let soci: Manifest = serde_json::from_slice(&skopeo_raw(&format!(
        "{}/{}@{}",
        r.registry, r.repository, summary.soci_index
    )))
    .expect("v1");
    assert_eq!(
        soci.subject.map(|s| s.digest),
        Some(result.image.fetched.digest.clone())
    );
    // Pushing again does not duplicate the referrer.
    hermes_oci::push_soci(
        &c,
        &store,
        &result,
        SociVersion::V1,
        &r,
        "AWS SOCI CLI v0.2",
    )
    .await
    .expect("push again");
    assert_eq!(
        c.referrers(&r, &result.image.fetched.digest, media::SOCI_INDEX_V1)
            .await
            .expect("referrers")
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn platforms_are_chosen_from_an_index() {
    let registry = Registry::start().expect("registry");
    let amd = TestImage::new()
        .file("arch", b"amd64".to_vec())
        .platform("linux", "amd64");
    let arm = TestImage::new()
        .file("arch", b"arm64".to_vec())
        .platform("linux", "arm64");
    let pushed =
        TestImage::push_multi_platform(&[amd, arm], &registry.host(), "multi/app:v1", None)
            .expect("push");
    let c = client(Credentials::none());
    let r = reference(&pushed.reference);
    let arm_image = c
        .resolve(&r, &Platform::parse("linux/arm64").expect("platform"))
        .await
        .expect("arm64");
    assert_eq!(
        arm_image.fetched.digest.as_str(),
        pushed.manifests[1].manifest_digest
    );
    assert_eq!(
        arm_image
            .platform
            .as_ref()
            .map(ToString::to_string)
            .as_deref(),
        Some("linux/arm64")
    );
    let err = c
        .resolve(&r, &Platform::parse("linux/s390x").expect("platform"))
        .await
        .expect_err("no s390x");
    assert!(
        err.to_string().contains("linux/amd64, linux/arm64"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_upload_in_chunks_and_mount_across_repositories() {
    let registry = Registry::start().expect("registry");
    let proxy = FaultProxy::start(registry.addr()).expect("proxy");
    let c = client(Credentials::none()); // uploads in 1 MiB chunks
    let a = reference(&format!("{}/up/a:v1", proxy.host()));
    let b = reference(&format!("{}/up/b:v1", proxy.host()));
    let blob: Vec<u8> = (0..2_600_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let digest = c
        .push_blob(&a, bytes::Bytes::from(blob.clone()), None)
        .await
        .expect("chunked upload");
    assert_eq!(digest, hermes_oci::Digest::of(&blob));
    let patches = proxy.log().iter().filter(|l| l.method == "PATCH").count();
    assert_eq!(patches, 3, "2.6 MB in 1 MiB chunks: {:?}", proxy.log());
    let size = blob.len() as u64;
    assert!(
        c.get_blob(&a, &digest, size)
            .await
            .expect("read back")
            .as_ref()
            == blob.as_slice()
    );

    proxy.clear_log();
    c.push_blob(&b, bytes::Bytes::from(blob.clone()), Some("up/a"))
        .await
        .expect("mount");
    let log = proxy.log();
    assert!(
        log.iter().any(|l| l.method == "POST" && l.status == 201),
        "mounted: {log:?}"
    );
    assert!(
        !log.iter().any(|l| l.method == "PATCH" || l.method == "PUT"),
        "no upload when mounted: {log:?}"
    );
    assert!(
        c.get_blob(&b, &digest, size)
            .await
            .expect("read back from b")
            .as_ref()
            == blob.as_slice()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soci_v2_push_to_another_repository_brings_the_image_along() {
    let Indexed {
        registry,
        pushed: _,
        c,
        r: _,
        store,
        result,
        _dir,
    } = indexed_sample("src/app:v1").await;
    let target = reference(&format!("{}/mirror/app:v1-soci", registry.host()));
    hermes_oci::push_soci(
        &c,
        &store,
        &result,
        SociVersion::V2,
        &target,
        "AWS SOCI CLI v0.2",
    )
    .await
    .expect("push to another repository");
    // The SOCI-enabled image in the other repository is complete: config and every layer are
    // there (mounted from the source repository), and skopeo can read its index.
    let index: Index = serde_json::from_slice(&skopeo_raw(&target.to_string())).expect("index");
    assert_eq!(index.manifests.len(), 2);
    for d in std::iter::once(&result.image.manifest.config).chain(&result.image.manifest.layers) {
        assert!(
            c.blob_exists(&target, &d.digest).await.expect("head"),
            "{} missing in the target",
            d.digest
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_directories_past_the_depth_limit_are_not_indexable_and_the_image_still_indexes() {
    // Each name repeats all its parents: 10,000 levels in 335 KiB made a 193 MiB zTOC. The
    // build limits refuse such a layer; the rest of the image is indexed as usual.
    let registry = Registry::start().expect("registry");
    let mut image = TestImage::new().big_file("opt/data.bin", 2).layer();
    let mut path = String::from("d");
    for _ in 0..1100 {
        image = image.dir(&path);
        path.push_str("/d");
    }
    let pushed = image.push(&registry.host(), "deep/app:v1").expect("push");
    let c = client(Credentials::none());
    let store_dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(store_dir.path()).expect("store");
    let result = hermes_oci::build_index(
        &c,
        &store,
        &reference(&pushed.reference),
        &options(0, 1 << 20),
        &|_| {},
    )
    .await
    .expect("the image indexes");
    let layers = &result.record.layers;
    assert!(
        matches!(layers[0].outcome, LayerOutcome::Indexed { .. }),
        "{:?}",
        layers[0]
    );
    assert!(
        matches!(&layers[1].outcome, LayerOutcome::Skipped { reason }
            if reason.starts_with("not indexable: ") && reason.ends_with("is more than 1024 directories deep")),
        "{:?}",
        layers[1]
    );
    let deep = digest(&pushed.layers[1].digest);
    assert_eq!(
        store.ztoc_for_layer(&deep, 1 << 20).expect("store"),
        None,
        "no zTOC stored for it"
    );
    assert_eq!(
        result.soci_ztocs.len(),
        1,
        "the SOCI index has the other layer"
    );
}
