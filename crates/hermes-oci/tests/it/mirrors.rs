//! Blob reads through mirrors from a `hosts.toml`: order, hand-over on every kind of failure,
//! one attempt per mirror, its deadline, and the per-blob deny list after wrong bytes.

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hermes_oci::{Client, ClientOptions, Deadline, Error, RegistryHosts, RetryPolicy};
use hermes_testkit::{Fault, FaultProxy, FaultRule, LayerInfo, Registry, TestImage};

use crate::support::{digest, reference};

/// A registry with one image, reached through `origin` (a counting proxy).
struct Setup {
    registry: Registry,
    origin: FaultProxy,
    layer: LayerInfo,
    image: String,
    dir: tempfile::TempDir,
}

impl Setup {
    fn start() -> Setup {
        let registry = Registry::start().expect("registry");
        let pushed = TestImage::new()
            .file("a.bin", noise(300 << 10))
            .push(&registry.host(), "mirrored/img:v1")
            .expect("push");
        let origin = FaultProxy::start(registry.addr()).expect("origin proxy");
        let image = format!("{}/mirrored/img:v1", origin.host());
        Setup {
            layer: pushed.layers[0].clone(),
            registry,
            origin,
            image,
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// A client whose hosts.toml for the origin names `mirrors` in order.
    fn client(&self, mirrors: &[String], extra: &str) -> Client {
        let host_dir = self
            .dir
            .path()
            .join(self.origin.host().replace(':', "_") + "_");
        std::fs::create_dir_all(&host_dir).expect("mkdir");
        let mut toml = format!("server = \"http://{}\"\n", self.origin.host());
        for m in mirrors {
            toml.push_str(&format!("[host.\"http://{m}\"]\n{extra}\n"));
        }
        std::fs::write(host_dir.join("hosts.toml"), toml).expect("hosts.toml");
        client_with(self.dir.path())
    }

    fn blob(&self) -> (hermes_oci::Reference, hermes_oci::Digest) {
        (reference(&self.image), digest(&self.layer.digest))
    }

    fn origin_blob_gets(&self) -> usize {
        blob_gets(&self.origin)
    }
}

/// Incompressible bytes, so the blob is about as long as the file.
fn noise(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn client_with(hosts: &Path) -> Client {
    Client::new(ClientOptions {
        plain_http: true,
        registry_hosts: RegistryHosts::from_dir(hosts),
        retry: RetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(100),
            max_retry_after: Duration::from_secs(1),
        },
        mirror_deadline: Deadline {
            floor: Duration::from_secs(1),
            min_bytes_per_sec: 1 << 20,
        },
        ..ClientOptions::default()
    })
    .expect("client")
}

fn blob_gets(proxy: &FaultProxy) -> usize {
    proxy
        .log()
        .iter()
        .filter(|r| r.method == "GET" && r.path.contains("/blobs/"))
        .count()
}

async fn whole(c: &Client, s: &Setup) -> hermes_oci::Result<Bytes> {
    let (r, d) = s.blob();
    c.get_blob(&r, &d, s.layer.size).await
}

#[tokio::test]
async fn mirrors_are_tried_in_order_each_once_and_the_registry_last() {
    let s = Setup::start();
    let down = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").to_string()
    };
    let failing = FaultProxy::start(s.registry.addr()).expect("5xx mirror");
    failing.push(FaultRule::new("/blobs/", Fault::Status(503)).times(u32::MAX));
    let empty = Registry::start().expect("empty mirror");
    let c = s.client(&[down.clone(), failing.host(), empty.host()], "");

    let (r, d) = s.blob();
    let got = c.blob_range(&r, &d, 100, 1000).await.expect("range");
    let pushed = std::fs::read(s.registry.blob_path(&s.layer.digest)).expect("the blob as stored");
    assert_eq!(&got[..], &pushed[100..1100]);
    assert_eq!(
        blob_gets(&failing),
        1,
        "a 5xx mirror gets one attempt, no retries"
    );
    assert_eq!(s.origin_blob_gets(), 1, "then the registry");
    let stats = c.host_stats();
    let of = |h: &str| {
        stats
            .iter()
            .find(|x| x.host == h)
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(of(&down).failures, 1, "{stats:?}");
    assert_eq!(of(&failing.host()).failures, 1, "{stats:?}");
    assert_eq!(of(&empty.host()).failures, 1, "404: {stats:?}");
    assert_eq!(of(&s.origin.host()).bytes, 1000, "{stats:?}");

    // Whole-blob streams hand over the same way, and are verified.
    let blob = whole(&c, &s).await.expect("stream");
    assert_eq!(&blob[..], &pushed[..]);
}

#[tokio::test]
async fn a_stalling_mirror_hands_over_at_its_deadline() {
    let s = Setup::start();
    let slow = FaultProxy::start(s.registry.addr()).expect("slow mirror");
    slow.push(FaultRule::new("/blobs/", Fault::Stall(Duration::from_secs(60))).times(u32::MAX));
    let c = s.client(&[slow.host()], "");
    let (r, d) = s.blob();
    let started = Instant::now();
    let got = c.blob_range(&r, &d, 0, 4096).await.expect("range");
    assert_eq!(got.len(), 4096);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "handed over after the mirror's 1 s deadline, took {:?}",
        started.elapsed()
    );
    assert_eq!(s.origin_blob_gets(), 1);
}

#[tokio::test]
async fn a_stream_a_mirror_corrupted_fails_its_digest_and_the_next_read_skips_that_mirror() {
    let s = Setup::start();
    let liar = FaultProxy::start(s.registry.addr()).expect("lying mirror");
    liar.push(FaultRule::new("/blobs/", Fault::Corrupt { at: 5 }).times(u32::MAX));
    let c = s.client(&[liar.host()], "");
    match whole(&c, &s).await {
        Err(Error::DigestMismatch { .. }) => {}
        other => panic!(
            "expected a digest mismatch, got {:?}",
            other.map(|b| b.len())
        ),
    }
    let blob = whole(&c, &s).await.expect("second read, from the registry");
    assert_eq!(blob.len() as u64, s.layer.size);
    assert_eq!(blob_gets(&liar), 1, "the lying mirror is not asked again");

    // Range reads: a caller's check refusing a mirror's bytes sends the read on.
    let liar2 = FaultProxy::start(s.registry.addr()).expect("second lying mirror");
    let c = s.client(&[liar2.host()], "");
    let (r, d) = s.blob();
    let refuse_mirrored = |_: &[u8]| false;
    let got = c
        .blob_range_verified(&r, &d, 0, 512, &refuse_mirrored)
        .await
        .expect("from the registry");
    assert_eq!(got.len(), 512);
    c.blob_range_verified(&r, &d, 512, 512, &refuse_mirrored)
        .await
        .expect("again");
    assert_eq!(
        blob_gets(&liar2),
        1,
        "refused once, then skipped for this blob"
    );
}

#[tokio::test]
async fn a_mirror_without_the_pull_capability_serves_no_blobs() {
    let s = Setup::start();
    let resolver = FaultProxy::start(s.registry.addr()).expect("resolve-only mirror");
    let puller = FaultProxy::start(s.registry.addr()).expect("pull mirror");
    let c = s.client(&[resolver.host()], "capabilities = [\"resolve\"]");
    let (r, d) = s.blob();
    c.blob_range(&r, &d, 0, 10).await.expect("range");
    assert_eq!(blob_gets(&resolver), 0, "resolve only: not asked for blobs");
    assert_eq!(s.origin_blob_gets(), 1);

    let c = s.client(&[puller.host()], "capabilities = [\"pull\"]");
    c.blob_range(&r, &d, 0, 10).await.expect("range");
    assert_eq!(blob_gets(&puller), 1, "served by the pull mirror");
    assert_eq!(s.origin_blob_gets(), 1, "and not by the registry");
}

#[tokio::test]
async fn a_mirror_answering_a_range_with_the_whole_blob_is_left_alone_while_it_fills() {
    let s = Setup::start();
    // What a pull-through cache does on a miss: the whole blob, 200, whatever the Range.
    let filling = FaultProxy::start(s.registry.addr()).expect("filling mirror");
    filling.push(FaultRule::new("/blobs/", Fault::IgnoreRange).times(u32::MAX));
    let c = s.client(&[filling.host()], "");
    let (r, d) = s.blob();
    for offset in [200_000, 100_000, 0] {
        let got = c.blob_range(&r, &d, offset, 4096).await.expect("range");
        assert_eq!(got.len(), 4096);
    }
    assert_eq!(
        blob_gets(&filling),
        1,
        "asked once, then left alone while it stores the blob"
    );
    assert_eq!(s.origin_blob_gets(), 3, "the registry served the ranges");
    let stats = c.host_stats();
    let mirror = stats
        .iter()
        .find(|h| h.host == filling.host())
        .expect("counted");
    assert_eq!(
        mirror.bytes, 0,
        "nothing of the whole blob was used: {mirror:?}"
    );
}

#[tokio::test]
async fn a_mirror_whose_tls_files_cannot_be_used_is_skipped() {
    let s = Setup::start();
    let mirror = FaultProxy::start(s.registry.addr()).expect("mirror");
    for ca in [
        "ca = \"/nonexistent/ca.pem\"",
        "ca = \"/dev/zero\"",
        "client = \"/etc/hostname\"",
    ] {
        let c = s.client(&[mirror.host()], ca);
        let (r, d) = s.blob();
        c.blob_range(&r, &d, 0, 10)
            .await
            .expect("range from the registry");
    }
    assert_eq!(blob_gets(&mirror), 0, "never asked");
    assert_eq!(s.origin_blob_gets(), 3);
}
