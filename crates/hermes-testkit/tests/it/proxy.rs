//! The fault proxy in front of a real registry: every fault observably happens, the bandwidth cap
//! holds, and the bearer-auth front issues tokens only for the right credentials.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use hermes_testkit::{
    Fault, FaultProxy, FaultRule, PushedImage, RandomFaults, Registry, TestImage,
};

use crate::support::{End, OCI_MANIFEST, get, request, sha256, skopeo_inspect_raw};

/// A registry holding one image whose only layer is an uncompressed ~1 MiB blob.
struct Fixture {
    registry: Registry,
    blob_path: String,
    blob: Vec<u8>,
    pushed: PushedImage,
}

fn fixture() -> Fixture {
    let registry = Registry::start().unwrap();
    let pushed = TestImage::new()
        .uncompressed()
        .big_file("data.bin", 1)
        .push(&registry.host(), "faults:v1")
        .unwrap();
    let blob_path = format!("/v2/faults/blobs/{}", pushed.layers[0].digest);
    let blob = get(registry.addr(), &blob_path).body;
    assert_eq!(
        sha256(&blob),
        pushed.layers[0].digest,
        "the fixture blob reads back directly"
    );
    Fixture {
        registry,
        blob_path,
        blob,
        pushed,
    }
}

#[test]
fn forwards_requests_streams_ranges_and_logs_them() {
    let f = fixture();
    let proxy = FaultProxy::start(f.registry.addr()).unwrap();
    assert_eq!(proxy.url(), format!("http://{}", proxy.host()));

    let whole = get(proxy.addr(), &f.blob_path);
    assert_eq!((whole.status, whole.end), (200, End::Complete));
    assert!(
        whole.body == f.blob,
        "the proxied blob equals the direct one"
    );

    let part = request(
        proxy.addr(),
        "GET",
        &f.blob_path,
        &[("Range", "bytes=100-199")],
    )
    .unwrap();
    assert_eq!(part.status, 206);
    assert_eq!(part.body, f.blob[100..200]);

    let log = proxy.log();
    assert_eq!(log.len(), 2, "{log:?}");
    assert_eq!(
        (log[0].method.as_str(), log[0].path.as_str(), log[0].status),
        ("GET", f.blob_path.as_str(), 200)
    );
    assert_eq!(log[0].range, None);
    assert_eq!(log[1].range.as_deref(), Some("bytes=100-199"));
    assert_eq!(log[1].status, 206);
    proxy.clear_log();
    assert!(proxy.log().is_empty());
}

#[test]
fn pushes_through_the_proxy_stream_request_bodies_upstream() {
    let registry = Registry::start().unwrap();
    let proxy = FaultProxy::start(registry.addr()).unwrap();
    let pushed = TestImage::new()
        .big_file("big", 2)
        .push(&proxy.host(), "via/proxy:v1")
        .unwrap();
    let direct = skopeo_inspect_raw(&format!("{}/via/proxy:v1", registry.host()), None);
    assert_eq!(sha256(&direct), pushed.manifest_digest);
    let methods: Vec<String> = proxy.log().into_iter().map(|r| r.method).collect();
    assert!(
        methods.iter().any(|m| m == "PUT" || m == "PATCH"),
        "uploads went through the proxy: {methods:?}"
    );
}

#[test]
fn drop_after_sends_the_head_and_n_bytes_then_closes() {
    let f = fixture();
    let proxy = FaultProxy::start(f.registry.addr()).unwrap();
    proxy.push(FaultRule::new("/blobs/", Fault::DropAfter(1000)));

    let cut = get(proxy.addr(), &f.blob_path);
    assert_eq!(cut.status, 200);
    assert_eq!(cut.content_length(), Some(f.blob.len()));
    assert_eq!(
        cut.body.len(),
        1000,
        "exactly N body bytes before the close"
    );
    assert_eq!(cut.body, f.blob[..1000]);
    assert_ne!(cut.end, End::Complete);

    let next = get(proxy.addr(), &f.blob_path);
    assert_eq!(
        (next.end, next.body.len()),
        (End::Complete, f.blob.len()),
        "the rule applied once"
    );
}

#[test]
fn truncate_keeps_content_length_but_sends_only_n_bytes() {
    let f = fixture();
    let proxy = FaultProxy::start(f.registry.addr()).unwrap();
    proxy.push(
        FaultRule::new(f.pushed.layers[0].digest.clone(), Fault::Truncate(300_000)).method("GET"),
    );

    let cut = request(
        proxy.addr(),
        "GET",
        &f.blob_path,
        &[("Range", "bytes=1000-")],
    )
    .unwrap();
    assert_eq!(cut.status, 206);
    assert_eq!(
        cut.content_length(),
        Some(f.blob.len() - 1000),
        "the original Content-Length"
    );
    assert_eq!(cut.body, f.blob[1000..301_000]);
    assert_ne!(cut.end, End::Complete);
}

#[test]
fn reset_closes_the_connection_before_any_response() {
    let f = fixture();
    let proxy = FaultProxy::start(f.registry.addr()).unwrap();
    proxy.push(FaultRule::new("/v2/", Fault::Reset));
    let error = request(proxy.addr(), "GET", &f.blob_path, &[]).expect_err("no response at all");
    assert!(
        matches!(
            error.kind(),
            ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof
        ),
        "got {error:?}"
    );
    assert_eq!(
        error.kind(),
        ErrorKind::ConnectionReset,
        "a TCP RST, not a FIN"
    );
    assert_eq!(proxy.log()[0].status, 0);
    assert_eq!(
        get(proxy.addr(), "/v2/").status,
        200,
        "the next request goes through"
    );
}

#[test]
fn stall_delays_the_response() {
    let f = fixture();
    let proxy = FaultProxy::start(f.registry.addr()).unwrap();
    proxy.push(FaultRule::new(
        "/v2/",
        Fault::Stall(Duration::from_millis(800)),
    ));
    let started = Instant::now();
    let stalled = get(proxy.addr(), "/v2/");
    let elapsed = started.elapsed();
    assert_eq!(stalled.status, 200);
    assert!(
        elapsed >= Duration::from_millis(800),
        "answered after {elapsed:?}, expected >= 800ms"
    );
}

#[test]
fn status_and_429_answer_without_forwarding() {
    let f = fixture();
    let proxy = FaultProxy::start(f.registry.addr()).unwrap();
    proxy.push(FaultRule::new("/blobs/", Fault::Status(503)).method("GET"));
    proxy.push(FaultRule::new(
        "/blobs/",
        Fault::TooManyRequests {
            retry_after_secs: 7,
        },
    ));

    let head = request(proxy.addr(), "HEAD", &f.blob_path, &[]).unwrap();
    assert_eq!(
        head.status, 429,
        "HEAD skips the GET-only rule and gets the next one"
    );
    assert_eq!(head.header("retry-after"), Some("7"));

    let unavailable = get(proxy.addr(), &f.blob_path);
    assert_eq!(unavailable.status, 503);
    assert!(unavailable.body.is_empty());

    assert_eq!(get(proxy.addr(), &f.blob_path).status, 200);
    let statuses: Vec<u16> = proxy.log().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [429, 503, 200]);
}

#[test]
fn rules_apply_in_fifo_order_for_their_count() {
    let f = fixture();
    let proxy = FaultProxy::start(f.registry.addr()).unwrap();
    proxy.push(FaultRule::new("", Fault::Status(500)).times(2));
    proxy.push(FaultRule::new("", Fault::Status(502)));
    let statuses: Vec<u16> = (0..4).map(|_| get(proxy.addr(), "/v2/").status).collect();
    assert_eq!(statuses, [500, 500, 502, 200]);

    proxy.push(FaultRule::new("", Fault::Status(500)));
    proxy.clear_faults();
    assert_eq!(get(proxy.addr(), "/v2/").status, 200);
}

#[test]
fn corrupt_flips_exactly_one_byte() {
    let f = fixture();
    let proxy = FaultProxy::start(f.registry.addr()).unwrap();
    let at = 700_000;
    proxy.push(FaultRule::new("/blobs/", Fault::Corrupt { at }));
    let corrupted = get(proxy.addr(), &f.blob_path);
    assert_eq!((corrupted.status, corrupted.end), (200, End::Complete));
    assert_eq!(corrupted.body.len(), f.blob.len());
    let differing: Vec<usize> = (0..f.blob.len())
        .filter(|&i| corrupted.body[i] != f.blob[i])
        .collect();
    assert_eq!(differing, [at as usize]);
    assert_eq!(corrupted.body[at as usize], !f.blob[at as usize]);
}

#[test]
fn bandwidth_cap_limits_throughput() {
    let f = fixture();
    let proxy = FaultProxy::start(f.registry.addr()).unwrap();
    let rate = 512 * 1024;
    proxy.set_bandwidth(Some(rate));
    let started = Instant::now();
    let slow = get(proxy.addr(), &f.blob_path);
    let elapsed = started.elapsed();
    assert_eq!(slow.body.len(), f.blob.len());
    // ~1 MiB at 512 KiB/s takes ~2 s; allow for the burst and timer slack.
    let floor = Duration::from_secs_f64(0.8 * f.blob.len() as f64 / rate as f64);
    assert!(
        elapsed >= floor,
        "{} bytes took {elapsed:?}, expected >= {floor:?}",
        f.blob.len()
    );

    proxy.set_bandwidth(None);
    let started = Instant::now();
    assert_eq!(get(proxy.addr(), &f.blob_path).body.len(), f.blob.len());
    assert!(
        started.elapsed() < elapsed,
        "uncapped is faster than capped"
    );
}

/// base64 of `user:pass` and `user:nope`.
const GOOD_BASIC: &str = "Basic dXNlcjpwYXNz";
const BAD_BASIC: &str = "Basic dXNlcjpub3Bl";

fn token(proxy: &FaultProxy, basic: &str) -> (u16, serde_json::Value) {
    let path = "/token?service=hermes-testkit&scope=repository:faults:pull";
    let response = request(proxy.addr(), "GET", path, &[("Authorization", basic)]).unwrap();
    let json = serde_json::from_slice(&response.body).unwrap_or(serde_json::Value::Null);
    (response.status, json)
}

#[test]
fn bearer_mode_issues_tokens_only_for_correct_credentials_and_forwards() {
    let f = fixture();
    let proxy = FaultProxy::start_with_bearer_auth(
        f.registry.addr(),
        "user",
        "pass",
        Duration::from_secs(60),
    )
    .unwrap();
    let manifest_path = "/v2/faults/manifests/v1";

    let challenge = get(proxy.addr(), manifest_path);
    assert_eq!(challenge.status, 401);
    let expected = format!(
        "Bearer realm=\"http://{}/token\",service=\"hermes-testkit\",scope=\"repository:faults:pull\"",
        proxy.host()
    );
    assert_eq!(
        challenge.header("www-authenticate"),
        Some(expected.as_str())
    );
    let push = request(proxy.addr(), "POST", "/v2/faults/blobs/uploads/", &[]).unwrap();
    assert!(
        push.header("www-authenticate")
            .unwrap()
            .ends_with("scope=\"repository:faults:pull,push\"")
    );

    assert_eq!(token(&proxy, BAD_BASIC).0, 401);
    let anonymous = get(proxy.addr(), "/token?service=hermes-testkit");
    assert_eq!(anonymous.status, 401);
    assert_eq!(
        proxy.tokens_issued(),
        0,
        "no token for wrong or missing credentials"
    );

    let (status, json) = token(&proxy, GOOD_BASIC);
    assert_eq!(status, 200, "{json}");
    assert_eq!(proxy.tokens_issued(), 1);
    let token = json["token"].as_str().unwrap().to_owned();
    assert_eq!(json["access_token"], token.as_str());
    assert_eq!(json["expires_in"], 60);

    let bearer = format!("Bearer {token}");
    let manifest = request(
        proxy.addr(),
        "GET",
        manifest_path,
        &[("Authorization", &bearer), ("Accept", OCI_MANIFEST)],
    )
    .unwrap();
    assert_eq!(manifest.status, 200);
    assert_eq!(sha256(&manifest.body), f.pushed.manifest_digest);
    let wrong = request(
        proxy.addr(),
        "GET",
        manifest_path,
        &[("Authorization", "Bearer not-a-token")],
    )
    .unwrap();
    assert_eq!(wrong.status, 401);
}

#[test]
fn bearer_tokens_expire_after_their_ttl() {
    let f = fixture();
    let ttl = Duration::from_millis(400);
    let proxy = FaultProxy::start_with_bearer_auth(f.registry.addr(), "user", "pass", ttl).unwrap();
    let (_, json) = token(&proxy, GOOD_BASIC);
    assert_eq!(
        json["expires_in"], 1,
        "sub-second TTLs round up to one second"
    );
    let bearer = format!("Bearer {}", json["token"].as_str().unwrap());
    assert_eq!(
        request(proxy.addr(), "GET", "/v2/", &[("Authorization", &bearer)])
            .unwrap()
            .status,
        200
    );
    // Waiting out the TTL is the point of this test, not a readiness wait.
    std::thread::sleep(ttl + Duration::from_millis(100));
    assert_eq!(
        request(proxy.addr(), "GET", "/v2/", &[("Authorization", &bearer)])
            .unwrap()
            .status,
        401
    );
    token(&proxy, GOOD_BASIC);
    assert_eq!(proxy.tokens_issued(), 2);
}

#[test]
fn bearer_mode_strips_authorization_before_forwarding() {
    // A one-shot upstream that records the request head it gets.
    let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    let recorder = std::thread::spawn(move || {
        let (mut stream, _) = upstream.accept().unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap() == 1 {
            head.push(byte[0]);
        }
        stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
            .unwrap();
        String::from_utf8(head).unwrap()
    });
    let proxy =
        FaultProxy::start_with_bearer_auth(upstream_addr, "user", "pass", Duration::from_secs(60))
            .unwrap();
    let (_, json) = token(&proxy, GOOD_BASIC);
    let bearer = format!("Bearer {}", json["token"].as_str().unwrap());
    let response = request(
        proxy.addr(),
        "GET",
        "/v2/x/tags/list",
        &[("Authorization", &bearer)],
    )
    .unwrap();
    assert_eq!(
        (response.status, response.body.as_slice()),
        (200, b"{}".as_slice())
    );
    let head = recorder.join().unwrap();
    assert!(
        head.starts_with("GET /v2/x/tags/list HTTP/1.1\r\n"),
        "{head}"
    );
    assert!(
        !head.to_ascii_lowercase().contains("authorization"),
        "forwarded head: {head}"
    );
}

#[test]
fn skopeo_pushes_through_the_bearer_front_with_credentials() {
    let registry = Registry::start().unwrap();
    let proxy = FaultProxy::start_with_bearer_auth(
        registry.addr(),
        "user",
        "pass",
        Duration::from_secs(60),
    )
    .unwrap();
    let image = TestImage::new().file("f", "via bearer");
    assert!(
        image.push(&proxy.host(), "secure:v1").is_err(),
        "anonymous push is refused"
    );
    let pushed = image
        .push_with_creds(&proxy.host(), "secure:v1", "user", "pass")
        .unwrap();
    assert!(proxy.tokens_issued() >= 1);
    let direct = skopeo_inspect_raw(&format!("{}/secure:v1", registry.host()), None);
    assert_eq!(sha256(&direct), pushed.manifest_digest);
}

#[tokio::test]
async fn the_proxy_serves_async_tests_and_drops_inside_a_runtime() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let registry = Registry::start().unwrap();
    let proxy = FaultProxy::start(registry.addr()).unwrap();
    proxy.push(FaultRule::new("/v2/", Fault::Status(418)));
    let mut stream = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    stream
        .write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 418 "), "{response}");
    drop(proxy);
}

#[test]
fn ignore_range_answers_with_the_whole_blob() {
    let f = fixture();
    let proxy = FaultProxy::start(f.registry.addr()).unwrap();
    proxy.push(FaultRule::new("/blobs/", Fault::IgnoreRange));
    let whole = request(proxy.addr(), "GET", &f.blob_path, &[("Range", "bytes=0-9")]).unwrap();
    assert_eq!(whole.status, 200, "the range was not forwarded");
    assert!(whole.body == f.blob);
    assert_eq!(
        proxy.log()[0].range.as_deref(),
        Some("bytes=0-9"),
        "the log shows what the client asked"
    );
    let part = request(proxy.addr(), "GET", &f.blob_path, &[("Range", "bytes=0-9")]).unwrap();
    assert_eq!((part.status, part.body.len()), (206, 10));
}

#[test]
fn redirect_sends_the_client_to_the_upstream() {
    let f = fixture();
    let proxy = FaultProxy::start(f.registry.addr()).unwrap();
    proxy.push(FaultRule::new("/blobs/", Fault::Redirect));
    let redirect = get(proxy.addr(), &format!("{}?x=1", f.blob_path));
    assert_eq!(redirect.status, 307);
    let expected = format!("http://{}{}?x=1", f.registry.host(), f.blob_path);
    assert_eq!(redirect.header("location"), Some(expected.as_str()));
    let followed = get(f.registry.addr(), &format!("{}?x=1", f.blob_path));
    assert!(followed.status == 200 && followed.body == f.blob);
}

#[test]
fn random_faults_hit_matching_requests_and_stop_when_cleared() {
    let f = fixture();
    let proxy = FaultProxy::start(f.registry.addr()).unwrap();
    proxy.set_random_faults(Some(
        RandomFaults::new(42, 1.0)
            .path_contains("/blobs/")
            .max_stall(Duration::from_millis(20)),
    ));
    let mut intact = 0;
    for _ in 0..40 {
        let answer = request(
            proxy.addr(),
            "GET",
            &f.blob_path,
            &[("Range", "bytes=0-999")],
        );
        if answer
            .is_ok_and(|r| r.status == 206 && r.end == End::Complete && r.body == f.blob[..1000])
        {
            intact += 1;
        }
    }
    let log = proxy.log();
    assert_eq!(log.len(), 40, "{log:?}");
    assert!(
        log.iter().all(|r| r.fault.is_some()),
        "rate 1 faults every request: {log:?}"
    );
    // Only stalls leave the answer intact.
    let stalls = log
        .iter()
        .filter(|r| matches!(r.fault, Some(Fault::Stall(_))))
        .count();
    assert_eq!(intact, stalls, "{log:?}");
    assert!(stalls < 40, "{log:?}");

    let manifest = format!("/v2/faults/manifests/{}", f.pushed.manifest_digest);
    let clean = request(proxy.addr(), "GET", &manifest, &[("Accept", OCI_MANIFEST)]).unwrap();
    assert_eq!(clean.status, 200, "other paths are not faulted");

    proxy.set_random_faults(None);
    proxy.clear_log();
    let whole = get(proxy.addr(), &f.blob_path);
    assert!(whole.status == 200 && whole.body == f.blob);
    assert_eq!(proxy.log()[0].fault, None);
}

#[test]
fn the_fault_proxy_binary_turns_seeded_faults_on_and_off_on_stdin_and_counts_them() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};

    let f = fixture();
    let mut child = Command::new(env!("CARGO_BIN_EXE_fault-proxy"))
        .args([
            "--upstream",
            &f.registry.host(),
            "--rate",
            "1",
            "--max-stall-ms",
            "10",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut answer = |command: &str| -> serde_json::Value {
        if !command.is_empty() {
            writeln!(stdin, "{command}").unwrap();
        }
        serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap()
    };
    let host = answer("")["listening"].as_str().unwrap().to_owned();
    let addr: std::net::SocketAddr = host.parse().unwrap();

    assert_eq!(get(addr, &f.blob_path).body, f.blob, "no faults until told");
    assert_eq!(answer("on 7")["faults"], "on");
    for _ in 0..5 {
        let _ = request(addr, "GET", &f.blob_path, &[("Range", "bytes=0-99")]);
    }
    let stats = answer("stats");
    assert_eq!(stats["requests"], 6, "{stats}");
    assert_eq!(stats["range_requests"], 5, "{stats}");
    let faults: u64 = stats["faults"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert_eq!(faults, 5, "rate 1 faults every request once on: {stats}");
    assert_eq!(answer("off")["faults"], "off");
    assert_eq!(get(addr, &f.blob_path).body, f.blob);
    assert_eq!(
        answer("stats")["requests"],
        1,
        "stats count since the last call"
    );
    assert!(answer("bogus").get("error").is_some());

    drop(stdin);
    assert!(child.wait().unwrap().success(), "exits when stdin closes");
}
