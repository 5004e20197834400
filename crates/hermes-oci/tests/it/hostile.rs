//! Against an in-process registry that misbehaves on purpose: endless or oversized bodies,
//! ignored ranges, trickles, blobs longer than declared. Each must cost bounded memory and time
//! and end in one clear, typed error (or the right bytes), proven by what the client does: it
//! stops reading at the cap, which a server that never ends its body makes visible.
//!
//! The server sends at most a few MiB and then holds the connection open, so that a client
//! without the caps would stall on it (and fail on its read timeout) rather than eat memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hermes_oci::{Client, ClientOptions, Credentials, Deadline, Digest, Error};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::{client, reference};

/// Byte `i` of every body the server makes up, so slices can be checked.
fn pattern(offset: u64, len: u64) -> Vec<u8> {
    (offset..offset + len).map(|i| (i % 251) as u8).collect()
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
struct Request {
    /// Its number, from 0.
    n: u64,
    path: String,
    range: Option<String>,
    /// The server's own `host:port`.
    host: String,
}

/// How a response body is sent.
enum Body {
    /// These bytes, with their `Content-Length`.
    Exact(Vec<u8>),
    /// `send` bytes of the pattern, announcing `content_length` (none: until the connection
    /// closes), then nothing more while the connection stays open: a body that never ends.
    Endless {
        content_length: Option<u64>,
        send: u64,
    },
    /// These bytes, with their `Content-Length`, one every `every`.
    Trickle(Vec<u8>, Duration),
}

struct Answer {
    status: &'static str,
    headers: Vec<String>,
    body: Body,
}

impl Answer {
    fn new(status: &'static str, body: Body) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body,
        }
    }

    fn header(mut self, header: impl Into<String>) -> Self {
        self.headers.push(header.into());
        self
    }
}

type Script = dyn Fn(&Request) -> Answer + Send + Sync;

/// A registry that answers every request by `script`, one request per connection. Stops on drop.
struct Hostile {
    host: String,
    requests: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Hostile {
    async fn start(script: impl Fn(&Request) -> Answer + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let host = listener.local_addr().expect("addr").to_string();
        let requests = Arc::new(AtomicU64::new(0));
        let script: Arc<Script> = Arc::new(script);
        let (counter, own_host) = (requests.clone(), host.clone());
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let (script, counter, host) = (script.clone(), counter.clone(), own_host.clone());
                tokio::spawn(async move {
                    let _ = serve(conn, &*script, &counter, host).await;
                });
            }
        });
        Self {
            host,
            requests,
            task,
        }
    }

    fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for Hostile {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    mut conn: TcpStream,
    script: &Script,
    counter: &AtomicU64,
    host: String,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
    let range = head
        .lines()
        .find_map(|l| {
            l.strip_prefix("range: ")
                .or_else(|| l.strip_prefix("Range: "))
        })
        .map(str::to_owned);
    let n = counter.fetch_add(1, Ordering::SeqCst);
    let answer = script(&Request {
        n,
        path,
        range,
        host,
    });
    let mut out = format!("HTTP/1.1 {}\r\nConnection: close\r\n", answer.status);
    for h in &answer.headers {
        out.push_str(&format!("{h}\r\n"));
    }
    match &answer.body {
        Body::Exact(bytes) | Body::Trickle(bytes, _) => {
            out.push_str(&format!("Content-Length: {}\r\n", bytes.len()));
        }
        Body::Endless {
            content_length: Some(n),
            ..
        } => out.push_str(&format!("Content-Length: {n}\r\n")),
        Body::Endless { .. } => {}
    }
    out.push_str("\r\n");
    conn.write_all(out.as_bytes()).await?;
    match answer.body {
        Body::Exact(bytes) => conn.write_all(&bytes).await?,
        Body::Trickle(bytes, every) => {
            for b in bytes {
                conn.write_all(&[b]).await?;
                tokio::time::sleep(every).await;
            }
        }
        Body::Endless { send, .. } => {
            let mut sent = 0;
            while sent < send {
                let n = (send - sent).min(64 << 10);
                conn.write_all(&pattern(sent, n)).await?;
                sent += n;
            }
            // Hold the connection until the client gives up on it.
            while conn.read(&mut buf).await? > 0 {}
        }
    }
    Ok(())
}

/// The test client with a small metadata cap.
fn small_client(max_metadata_size: u64) -> Client {
    Client::new(ClientOptions {
        max_metadata_size,
        ..client(Credentials::none()).options().clone()
    })
    .expect("client")
}

const MANIFEST_CAP: u64 = 64 << 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_manifest_is_cut_off_at_the_cap() {
    for content_length in [None, Some(1u64 << 30)] {
        let server = Hostile::start(move |_| {
            Answer::new(
                "200 OK",
                Body::Endless {
                    content_length,
                    send: 4 << 20,
                },
            )
            .header("Content-Type: application/vnd.oci.image.manifest.v1+json")
        })
        .await;
        let err = small_client(MANIFEST_CAP)
            .get_manifest(&reference(&format!("{}/big/app:v1", server.host)))
            .await
            .expect_err("too large");
        assert!(
            matches!(&err, Error::TooLarge { what: "manifest", url, limit: MANIFEST_CAP }
                if url.ends_with("/v2/big/app/manifests/v1")),
            "Content-Length {content_length:?}: {err:?}"
        );
        assert!(err.to_string().contains("larger than 65536 bytes"), "{err}");
        assert_eq!(server.requests(), 1, "a body too large is not retried");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_token_response_is_cut_off_at_the_cap() {
    let server = Hostile::start(|r| {
        if r.path.starts_with("/token") {
            return Answer::new(
                "200 OK",
                Body::Endless {
                    content_length: None,
                    send: 4 << 20,
                },
            );
        }
        Answer::new("401 Unauthorized", Body::Exact(Vec::new())).header(format!(
            "WWW-Authenticate: Bearer realm=\"http://{}/token\",service=\"hostile\"",
            r.host
        ))
    })
    .await;
    let err = small_client(MANIFEST_CAP)
        .get_manifest(&reference(&format!("{}/auth/app:v1", server.host)))
        .await
        .expect_err("too large");
    assert!(
        matches!(&err, Error::TooLarge { what: "token response", url, limit: MANIFEST_CAP }
            if url.contains("/token?scope=")),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_ignoring_range_is_read_only_up_to_the_slice() {
    // The whole "blob" is announced as 1 TiB; only the first 4 MiB ever come.
    let server = Hostile::start(|_| {
        Answer::new(
            "200 OK",
            Body::Endless {
                content_length: Some(1 << 40),
                send: 4 << 20,
            },
        )
    })
    .await;
    let (offset, len) = ((1 << 20) + 3, 1000);
    let piece = client(Credentials::none())
        .blob_range(
            &reference(&format!("{}/norange/app:v1", server.host)),
            &Digest::of(b"blob"),
            offset,
            len,
        )
        .await
        .expect("the slice is cut from the whole-blob answer without reading it all");
    assert!(piece.as_ref() == pattern(offset, len).as_slice());
    assert_eq!(server.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_partial_response_is_cut_off_at_the_range() {
    let server = Hostile::start(|_| {
        Answer::new(
            "206 Partial Content",
            Body::Endless {
                content_length: None,
                send: 4 << 20,
            },
        )
        .header("Content-Range: bytes 0-4095/8192")
    })
    .await;
    let err = client(Credentials::none())
        .blob_range(
            &reference(&format!("{}/endless/app:v1", server.host)),
            &Digest::of(b"blob"),
            0,
            4096,
        )
        .await
        .expect_err("more than asked");
    assert!(
        matches!(&err, Error::TooLarge { what: "blob range", url, limit: 4096 }
            if url.contains("/v2/endless/app/blobs/sha256:")),
        "{err:?}"
    );
    assert_eq!(server.requests(), 1, "a body too large is not retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_read_spends_one_retry_budget_not_one_per_answer() {
    // 503 and a short 206, over and over: each answer is a failed attempt of the same read.
    let server = Hostile::start(|r| {
        if r.n % 2 == 0 || r.range.as_deref() != Some("bytes=0-99") {
            Answer::new("503 Service Unavailable", Body::Exact(Vec::new()))
        } else {
            Answer::new("206 Partial Content", Body::Exact(pattern(0, 10)))
        }
    })
    .await;
    let err = client(Credentials::none())
        .blob_range(
            &reference(&format!("{}/flaky/app:v1", server.host)),
            &Digest::of(b"blob"),
            0,
            100,
        )
        .await
        .expect_err("never a whole range");
    assert!(
        matches!(err, Error::RetriesExhausted { attempts: 6, .. }),
        "{err:?}"
    );
    assert_eq!(server.requests(), 6, "max_attempts requests in all");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_server_hits_the_deadline() {
    // One byte every 50 ms never trips the 2 s read timeout; only a deadline ends it.
    let server = Hostile::start(|_| {
        Answer::new(
            "200 OK",
            Body::Trickle(vec![b' '; 1000], Duration::from_millis(50)),
        )
        .header("Content-Type: application/vnd.oci.image.manifest.v1+json")
    })
    .await;
    let deadline = Deadline {
        floor: Duration::from_millis(500),
        min_bytes_per_sec: u64::MAX,
    };
    let c = Client::new(ClientOptions {
        deadline,
        ..client(Credentials::none()).options().clone()
    })
    .expect("client");
    let err = c
        .get_manifest(&reference(&format!("{}/slow/app:v1", server.host)))
        .await
        .expect_err("too slow");
    assert!(
        matches!(&err, Error::DeadlineExceeded { what: "manifest", url, after }
            if url.ends_with("/v2/slow/app/manifests/v1") && *after == deadline.floor),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_longer_than_its_descriptor_says_so() {
    let blob = pattern(0, 1000);
    let digest = Digest::of(&blob);
    let server = Hostile::start(|_| Answer::new("200 OK", Body::Exact(pattern(0, 2000)))).await;
    let err = client(Credentials::none())
        .get_blob(
            &reference(&format!("{}/long/app:v1", server.host)),
            &digest,
            1000,
        )
        .await
        .expect_err("longer than declared");
    assert!(
        matches!(&err, Error::BlobTooLong { expected, size: 1000, .. } if *expected == digest),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains(digest.as_str()) && message.contains("longer than the 1000 bytes"),
        "{message}"
    );
}

#[test]
fn deadlines_grow_with_the_bytes_asked() {
    let d = Deadline::default();
    assert_eq!(d.for_bytes(0), d.floor);
    assert_eq!(
        d.for_bytes(d.min_bytes_per_sec * 10),
        d.floor + Duration::from_secs(10)
    );
    assert!(
        d.for_bytes(u64::MAX) > d.floor,
        "no overflow on absurd sizes"
    );
}
