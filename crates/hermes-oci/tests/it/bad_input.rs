//! Bad input: each failure is one clear error that says what to do, and leaves nothing behind.

use std::io::{Read, Write};
use std::net::TcpListener;

use hermes_oci::manifest::Platform;
use hermes_oci::{Credentials, Error, Store};
use hermes_testkit::{Registry, TestImage};

use crate::support::{client, options, reference};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nonexistent_images_wrong_platforms_and_dead_registries() {
    let mut registry = Registry::start().expect("registry");
    TestImage::new()
        .file("a", b"a".to_vec())
        .platform("linux", "amd64")
        .push(&registry.host(), "there/app:v1")
        .expect("push");
    let c = client(Credentials::none());
    let store_dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(store_dir.path().join("store")).expect("store");

    let err = hermes_oci::build_index(
        &c,
        &store,
        &reference(&format!("{}/missing/app:v1", registry.host())),
        &options(0, 1 << 20),
        &|_| {},
    )
    .await
    .expect_err("missing");
    assert!(
        matches!(
            err,
            Error::NotFound {
                what: "manifest",
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("check the name, tag and digest"),
        "{err}"
    );

    let mut arm = options(0, 1 << 20);
    arm.platform = Platform::parse("linux/arm64").expect("platform");
    let err = hermes_oci::build_index(
        &c,
        &store,
        &reference(&format!("{}/there/app:v1", registry.host())),
        &arm,
        &|_| {},
    )
    .await
    .expect_err("wrong platform");
    assert!(
        matches!(err, Error::PlatformNotFound { .. }) && err.to_string().contains("linux/amd64"),
        "{err}"
    );

    let host = registry.host();
    registry.stop();
    let started = std::time::Instant::now();
    let err = c
        .resolve(
            &reference(&format!("{host}/there/app:v1")),
            &Platform::host(),
        )
        .await
        .expect_err("down");
    assert!(
        matches!(err, Error::Unreachable { .. }) && err.to_string().contains("is it running"),
        "{err}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "a dead registry fails fast"
    );

    assert!(
        !store_dir.path().join("store").exists(),
        "failed runs leave no store behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_manifest_media_type_is_refused() {
    // A registry answering with a manifest kind Hermes does not know (e.g. an artifact).
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let host = listener.local_addr().expect("addr").to_string();
    std::thread::spawn(move || {
        if let Ok((mut conn, _)) = listener.accept() {
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let body = r#"{"schemaVersion":2,"mediaType":"application/vnd.example.model.v1+json"}"#;
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.example.model.v1+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let err = client(Credentials::none())
        .resolve(
            &reference(&format!("{host}/odd/thing:v1")),
            &Platform::host(),
        )
        .await
        .expect_err("unknown");
    assert!(
        matches!(&err, Error::UnsupportedManifest { media_type, .. } if media_type == "application/vnd.example.model.v1+json"),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("Hermes indexes OCI and Docker v2 images"),
        "{err}"
    );
}
