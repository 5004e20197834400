//! The node's index sources against real servers: the controller's node API (hermes-controller's
//! own server, with a token), SOCI v2 and v1 indexes pushed to a real registry, and misses.

use std::collections::BTreeMap;

use hermes_oci::soci::SociVersion;
use hermes_oci::{Client, ClientOptions, Digest, IndexOptions, Reference, Store};
use hermes_snapshotter::config::ControllerConfig;
use hermes_snapshotter::sources::{Answer, IndexSources, Lookup, Source};
use hermes_snapshotter::{
    LABEL_IMAGE_REF, LABEL_LAYER_DIGEST, LABEL_MANIFEST_DIGEST, LABEL_TARGET_REF, RemoteLayer,
};
use hermes_testkit::{Registry, TestImage};

fn client() -> Client {
    Client::new(ClientOptions {
        plain_http: true,
        ..ClientOptions::default()
    })
    .expect("client")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn layer(image: &str, manifest: &str, digest: &str) -> RemoteLayer {
    let labels = BTreeMap::from([
        (LABEL_TARGET_REF.to_owned(), "sha256:chain".to_owned()),
        (LABEL_LAYER_DIGEST.to_owned(), digest.to_owned()),
        (LABEL_IMAGE_REF.to_owned(), image.to_owned()),
        (LABEL_MANIFEST_DIGEST.to_owned(), manifest.to_owned()),
    ]);
    RemoteLayer {
        target: "sha256:chain".into(),
        layer_digest: digest.into(),
        image_ref: Some(image.into()),
        manifest_digest: Some(manifest.into()),
        parent: None,
        labels,
    }
}

/// An image pushed to a real registry and indexed into `store`.
fn indexed(
    rt: &tokio::runtime::Runtime,
    registry: &Registry,
    repo: &str,
    store: &Store,
) -> (hermes_testkit::PushedImage, hermes_oci::IndexResult) {
    let pushed = TestImage::new()
        .file("srv/app.py", b"print('hi')\n".to_vec())
        .big_file("srv/model.bin", 2)
        .push(&registry.host(), repo)
        .expect("push");
    let reference = Reference::parse(&pushed.reference).expect("reference");
    let options = IndexOptions {
        min_layer_size: 0,
        span_size: 256 << 10,
        ..IndexOptions::default()
    };
    let result = rt
        .block_on(hermes_oci::build_index(
            &client(),
            store,
            &reference,
            &options,
            &|_| {},
        ))
        .expect("index");
    (pushed, result)
}

#[test]
fn a_ztoc_comes_from_the_controller_once_then_from_the_local_store() {
    let rt = runtime();
    let registry = Registry::start().expect("registry");
    let dir = tempfile::tempdir().expect("tempdir");
    let ctrl_store = Store::open(dir.path().join("controller")).expect("store");
    let (pushed, _) = indexed(&rt, &registry, "src/ctrl:v1", &ctrl_store);
    let (misses, mut missed) = tokio::sync::mpsc::channel(8);
    let api = hermes_controller::api::NodeApi::new(
        ctrl_store.clone(),
        Some("s3cret".into()),
        vec![256 << 10],
        misses,
    );
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    rt.spawn(hermes_controller::api::serve(
        listener,
        api.clone(),
        std::future::pending(),
    ));
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").expect("token");
    let mut controller = ControllerConfig::new(url);
    controller.token_file = Some(token);
    let node_store = Store::open(dir.path().join("node")).expect("store");
    let sources = IndexSources::new(node_store, Some(&controller), None, rt.handle().clone())
        .expect("sources");

    let l = &pushed.layers[0];
    let want = ctrl_store
        .any_ztoc_for_layer(&Digest::parse(&l.digest).unwrap())
        .unwrap()
        .expect("controller has the zTOC");
    let found = sources
        .find(&layer(
            &pushed.reference,
            &pushed.manifest_digest,
            &l.digest,
        ))
        .expect("lookup")
        .into_ztoc()
        .expect("found");
    assert_eq!((found.source, &found.digest), (Source::Controller, &want));
    let again = sources
        .find(&layer(
            &pushed.reference,
            &pushed.manifest_digest,
            &l.digest,
        ))
        .expect("lookup")
        .into_ztoc()
        .expect("found");
    assert_eq!((again.source, &again.digest), (Source::Local, &want));
    assert_eq!(sources.counters().get(Source::Controller, Lookup::Found), 1);

    // The controller is the authority: once an Off policy covers the image, the copy the node
    // keeps is not used either.
    let host = registry.host();
    let off = hermes_controller::policy::parse_policies(
        &format!(
            "apiVersion: hermes.dev/v1alpha1\nkind: HermesPolicy\nmetadata: {{name: stop}}\n\
             spec:\n  images: [\"{host}/src/**\"]\n  mode: Off\n"
        ),
        "test",
    )
    .expect("policy");
    api.set_active_policies(off);
    let refused = sources
        .find(&layer(
            &pushed.reference,
            &pushed.manifest_digest,
            &l.digest,
        ))
        .expect("lookup");
    match refused {
        Answer::Disabled(reason) => assert_eq!(reason, "policy stop has mode Off"),
        other => panic!("an Off policy must refuse the image: {other:?}"),
    }
    assert_eq!(
        sources.counters().get(Source::Controller, Lookup::Refused),
        1
    );
    api.set_active_policies(Vec::new());

    // A layer the controller does not know: not found, and the image is reported once.
    let unknown = layer(
        &pushed.reference,
        &pushed.manifest_digest,
        &Digest::of(b"x").to_string(),
    );
    assert!(matches!(
        sources.find(&unknown).expect("lookup"),
        Answer::NotIndexed
    ));
    sources.report_miss(&unknown);
    sources.report_miss(&unknown);
    let miss = rt
        .block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(10), missed.recv()).await
        })
        .expect("a miss arrives")
        .expect("miss");
    assert_eq!(miss.image, pushed.reference);
    assert!(
        rt.block_on(async {
            tokio::time::timeout(std::time::Duration::from_millis(300), missed.recv()).await
        })
        .is_err(),
        "a second miss for the same image was reported"
    );
}

#[test]
fn a_wrong_token_is_a_failed_lookup_not_a_missing_ztoc() {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let (misses, _missed) = tokio::sync::mpsc::channel(8);
    let api = hermes_controller::api::NodeApi::new(
        Store::open(dir.path().join("c")).unwrap(),
        Some("right".into()),
        vec![4 << 20],
        misses,
    );
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    rt.spawn(hermes_controller::api::serve(
        listener,
        api,
        std::future::pending(),
    ));
    let token = dir.path().join("token");
    std::fs::write(&token, "wrong").unwrap();
    let mut controller = ControllerConfig::new(url);
    controller.token_file = Some(token);
    let sources = IndexSources::new(
        Store::open(dir.path().join("n")).unwrap(),
        Some(&controller),
        None,
        rt.handle().clone(),
    )
    .unwrap();
    let d = Digest::of(b"layer").to_string();
    let err = sources
        .find(&layer("127.0.0.1:1/x:y", &Digest::of(b"m").to_string(), &d))
        .expect_err("unauthorised");
    assert!(err.to_string().contains("401"), "{err}");
}

#[test]
fn ztocs_are_found_in_soci_v2_and_v1_indexes_in_the_registry() {
    let rt = runtime();
    let registry = Registry::start().expect("registry");
    let dir = tempfile::tempdir().expect("tempdir");
    let build_store = Store::open(dir.path().join("build")).expect("store");
    for (version, repo) in [
        (SociVersion::V2, "src/v2:v1"),
        (SociVersion::V1, "src/v1:v1"),
    ] {
        let (pushed, result) = indexed(&rt, &registry, repo, &build_store);
        let target = Reference::parse(&match version {
            SociVersion::V2 => pushed.reference.replace(":v1", ":v1-soci"),
            SociVersion::V1 => pushed.reference.clone(),
        })
        .unwrap();
        rt.block_on(hermes_oci::push_soci(
            &client(),
            &build_store,
            &result,
            version,
            &target,
            hermes_ztoc::SOCI_BUILD_TOOL_IDENTIFIER,
        ))
        .expect("push soci");
        // What containerd pulls: for v2 the converted image (its manifest carries the index
        // digest), for v1 the original one.
        let (image, manifest) = match version {
            SociVersion::V2 => {
                let resolved = rt
                    .block_on(client().resolve(&target, &hermes_oci::manifest::Platform::host()))
                    .expect("resolve converted image");
                (target.to_string(), resolved.fetched.digest.to_string())
            }
            SociVersion::V1 => (pushed.reference.clone(), pushed.manifest_digest.clone()),
        };
        let sources = IndexSources::new(
            Store::open(
                dir.path()
                    .join(format!("node-{repo}").replace([':', '/'], "-")),
            )
            .unwrap(),
            None,
            Some(client()),
            rt.handle().clone(),
        )
        .unwrap();
        let l = &pushed.layers[0];
        let found = sources
            .find(&layer(&image, &manifest, &l.digest))
            .expect("lookup")
            .into_ztoc()
            .unwrap_or_else(|| panic!("{version:?}: no zTOC found"));
        let want = build_store
            .any_ztoc_for_layer(&Digest::parse(&l.digest).unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(
            (found.source, found.digest),
            (Source::Registry, want),
            "{version:?}"
        );
        // An image without SOCI artifacts: nothing, no error.
        let plain = TestImage::new()
            .file("a", b"a".to_vec())
            .push(
                &registry.host(),
                &format!("{}-plain:v1", repo.replace(":v1", "")),
            )
            .expect("push");
        assert!(
            sources
                .find(&layer(
                    &plain.reference,
                    &plain.manifest_digest,
                    &plain.layers[0].digest
                ))
                .expect("lookup")
                .into_ztoc()
                .is_none()
        );
    }
}

/// A one-connection server that answers any request with `head` and `body`, then holds the
/// connection open without sending more until the client closes it.
fn serve_once_then_hold(head: String, body: Vec<u8>) -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    std::thread::spawn(move || {
        let Ok((mut conn, _)) = listener.accept() else {
            return;
        };
        let mut request = Vec::new();
        let mut buf = [0u8; 4096];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => request.extend_from_slice(&buf[..n]),
            }
        }
        let _ = conn.write_all(head.as_bytes());
        let _ = conn.write_all(&body);
        // Hold until the client gives up on the connection.
        while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
    });
    url
}

#[test]
fn a_controller_announcing_a_ztoc_beyond_the_cap_is_not_read() {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        1u64 << 40
    );
    let url = serve_once_then_hold(head, vec![0; 64 << 10]);
    let mut controller = ControllerConfig::new(url.clone());
    // Long enough that only the cap, not the timeout, can end the read.
    controller.timeout_ms = 60_000;
    let sources = IndexSources::new(
        Store::open(dir.path().join("n")).unwrap(),
        Some(&controller),
        None,
        rt.handle().clone(),
    )
    .unwrap();
    let d = Digest::of(b"layer").to_string();
    let err = sources
        .find(&layer("127.0.0.1:1/x:y", &Digest::of(b"m").to_string(), &d))
        .expect_err("too large");
    let message = err.to_string();
    assert!(
        message.contains(&url)
            && message.contains(&format!(
                "larger than {} bytes",
                hermes_snapshotter::sources::MAX_ZTOC_SIZE
            )),
        "{message}"
    );
    assert_eq!(
        sources.counters().get(Source::Controller, Lookup::Failed),
        1
    );
}

#[test]
fn a_token_file_beyond_the_cap_is_refused() {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("token");
    std::fs::write(&token, vec![b'a'; 1 << 20]).unwrap();
    let mut controller = ControllerConfig::new("http://127.0.0.1:1");
    controller.token_file = Some(token.clone());
    let Err(err) = IndexSources::new(
        Store::open(dir.path().join("n")).unwrap(),
        Some(&controller),
        None,
        rt.handle().clone(),
    ) else {
        panic!("a 1 MiB token file was accepted")
    };
    let hermes_snapshotter::Error::Io { op, path, source } = &err else {
        panic!("expected an I/O error, got {err:?}")
    };
    assert_eq!((*op, path), ("read token file", &token));
    assert_eq!(source.kind(), std::io::ErrorKind::FileTooLarge, "{source}");
}
