//! The real docker-registry: anonymous and htpasswd variants.

use hermes_testkit::{Error, Registry, TestImage};

use crate::support::{OCI_MANIFEST, get, request, sha256, skopeo_inspect_raw};

#[test]
fn registry_answers_v2_and_stores_a_pushed_image() {
    let registry = Registry::start().unwrap();
    assert_eq!(registry.url(), format!("http://{}", registry.host()));
    assert_eq!(registry.host(), registry.addr().to_string());
    assert!(
        registry.host().starts_with("127.0.0.1:"),
        "host {}",
        registry.host()
    );
    assert_eq!(get(registry.addr(), "/v2/").status, 200);

    let pushed = TestImage::new()
        .file("etc/hello", "hello\n")
        .push(&registry.host(), "demo/hello:v1")
        .unwrap();
    assert_eq!(
        pushed.reference,
        format!("{}/demo/hello:v1", registry.host())
    );

    let raw = skopeo_inspect_raw(&pushed.reference, None);
    assert_eq!(
        sha256(&raw),
        pushed.manifest_digest,
        "skopeo shows the manifest we pushed"
    );
    let manifest: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(
        manifest["layers"][0]["digest"],
        pushed.layers[0].digest.as_str()
    );

    // The registry stores it on disk under its root.
    assert!(
        registry
            .root()
            .join("data/docker/registry/v2/repositories/demo/hello")
            .is_dir()
    );
}

#[test]
fn htpasswd_registry_rejects_anonymous_and_accepts_the_credentials() {
    let registry = Registry::start_with_htpasswd("alice", "s3cret").unwrap();
    let anonymous = get(registry.addr(), "/v2/");
    assert_eq!(anonymous.status, 401);
    assert_eq!(
        anonymous.header("www-authenticate"),
        Some("Basic realm=\"basic\"")
    );

    // base64("alice:s3cret") and base64("alice:wrong")
    let good = request(
        registry.addr(),
        "GET",
        "/v2/",
        &[("Authorization", "Basic YWxpY2U6czNjcmV0")],
    )
    .unwrap();
    assert_eq!(good.status, 200);
    let bad = request(
        registry.addr(),
        "GET",
        "/v2/",
        &[("Authorization", "Basic YWxpY2U6d3Jvbmc=")],
    )
    .unwrap();
    assert_eq!(bad.status, 401);

    let image = TestImage::new().file("a", "a");
    match image.push(&registry.host(), "private:v1") {
        Err(Error::Command { stderr, .. }) => assert!(
            stderr.contains("unauthorized") || stderr.contains("401"),
            "{stderr}"
        ),
        other => panic!("anonymous push must fail, got {other:?}"),
    }
    let pushed = image
        .push_with_creds(&registry.host(), "private:v1", "alice", "s3cret")
        .unwrap();
    let raw = skopeo_inspect_raw(&pushed.reference, Some("alice:s3cret"));
    assert_eq!(sha256(&raw), pushed.manifest_digest);
    let manifest = request(
        registry.addr(),
        "GET",
        "/v2/private/manifests/v1",
        &[
            ("Authorization", "Basic YWxpY2U6czNjcmV0"),
            ("Accept", OCI_MANIFEST),
        ],
    )
    .unwrap();
    assert_eq!(manifest.status, 200);
}

#[test]
fn stop_makes_the_registry_unreachable_until_drop() {
    let mut registry = Registry::start().unwrap();
    let addr = registry.addr();
    registry.stop();
    registry.stop();
    assert!(registry.pid().is_none());
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "nothing listens on {addr} after stop()"
    );
    assert!(registry.root().is_dir(), "the temp dir stays until drop");
}
