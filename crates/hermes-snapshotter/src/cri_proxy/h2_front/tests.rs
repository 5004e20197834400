//! A raw-frame HTTP/2 client against the proxy's real gRPC server, with and without the front.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::*;
use crate::cri_proxy::{ImageProxy, ImageService, PullLog, V1};

const DATA: u8 = 0x0;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const PROTOCOL_ERROR: u32 = 1;
const SOCKET_PATH: &[u8] = b"/run/x.sock";

/// The proxy's gRPC server (forwarding to a containerd that is not there, so every call is
/// answered with a gRPC error: an answer all the same), reached through the front or not.
/// Returns the client's end of the connection.
fn serve(through_front: bool) -> DuplexStream {
    let (client, accepted) = tokio::io::duplex(1 << 20);
    let server_end = if through_front {
        let (front_end, server_end) = tokio::io::duplex(1 << 20);
        tokio::spawn(front(accepted, front_end));
        server_end
    } else {
        accepted
    };
    let proxy = ImageProxy::new(
        Path::new("/nonexistent/containerd.sock"),
        Default::default(),
        PullLog::default(),
    );
    tokio::spawn(
        tonic::transport::Server::builder()
            // Large enough for the test that makes the front split its output.
            .http2_max_header_list_size(u32::try_from(MAX_HEADER_BLOCK * 2).unwrap())
            .add_service(ImageService::<V1>::new(proxy))
            .serve_with_incoming(tokio_stream::once(Ok::<_, std::io::Error>(server_end))),
    );
    client
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    push_frame(&mut out, kind, flags, stream, payload);
    out
}

fn hpack_string(out: &mut Vec<u8>, s: &[u8]) {
    encode_integer_into(s.len(), 7, 0, out).unwrap();
    out.extend_from_slice(s);
}

/// A literal with a new name: `first` is 0x00 (without indexing) or 0x40 (incremental
/// indexing, entering the client's dynamic table).
fn literal(out: &mut Vec<u8>, first: u8, name: &[u8], value: &[u8]) {
    out.push(first);
    hpack_string(out, name);
    hpack_string(out, value);
}

/// A CRI v1 `ListImages` request's pseudo-headers but `:authority`, which comes next.
fn list_images_pseudo(out: &mut Vec<u8>) {
    out.push(0x83); // :method POST (static 3)
    out.push(0x86); // :scheme http (static 6)
    literal(out, 0x00, b":path", b"/runtime.v1.ImageService/ListImages");
}

/// The gRPC headers, after every pseudo-header.
fn grpc_fields(out: &mut Vec<u8>) {
    literal(out, 0x00, b"content-type", b"application/grpc");
    literal(out, 0x00, b"te", b"trailers");
}

/// The client preface and an empty SETTINGS frame.
fn preface() -> Vec<u8> {
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    out
}

/// An empty gRPC message ending the request on `stream`.
fn empty_message(stream: u32) -> Vec<u8> {
    frame(DATA, END_STREAM, stream, &[0, 0, 0, 0, 0])
}

#[derive(Debug, PartialEq)]
enum Outcome {
    /// Response headers with this `:status`.
    Answered(String),
    /// RST_STREAM with this error code.
    Reset(u32),
    /// GOAWAY or the connection closed.
    Closed,
}

/// Reads server frames until each of `streams` is answered or reset, or the connection ends.
async fn outcomes(conn: &mut DuplexStream, streams: &[u32]) -> Vec<Outcome> {
    // The server's own blocks go through its dynamic table: decode every one.
    let mut decoder = Decoder::new();
    let mut found: Vec<Option<Outcome>> = streams.iter().map(|_| None).collect();
    while found.iter().any(Option::is_none) {
        let mut head = [0u8; 9];
        if conn.read_exact(&mut head).await.is_err() {
            break;
        }
        let h = FrameHead::parse(&head);
        let mut payload = vec![0u8; h.len];
        if conn.read_exact(&mut payload).await.is_err() {
            break;
        }
        let slot = streams.iter().position(|&s| s == h.stream);
        match h.kind {
            HEADERS => {
                let (_, fragment) = split_headers_payload(h.flags, &payload).unwrap();
                assert!(
                    h.flags & END_HEADERS != 0,
                    "test expects one-frame responses"
                );
                let fields = decoder.decode(fragment).unwrap();
                if let Some(i) = slot.filter(|&i| found[i].is_none()) {
                    let status = fields
                        .iter()
                        .find(|(n, _)| n == b":status")
                        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
                        .unwrap_or_default();
                    found[i] = Some(Outcome::Answered(status));
                }
            }
            RST_STREAM => {
                if let Some(i) = slot.filter(|&i| found[i].is_none()) {
                    let code = u32::from_be_bytes(payload[..4].try_into().unwrap());
                    found[i] = Some(Outcome::Reset(code));
                }
            }
            GOAWAY => break,
            _ => {}
        }
    }
    found
        .into_iter()
        .map(|o| o.unwrap_or(Outcome::Closed))
        .collect()
}

async fn outcome(conn: &mut DuplexStream, stream: u32) -> Outcome {
    outcomes(conn, &[stream]).await.remove(0)
}

async fn send(conn: &mut DuplexStream, bytes: &[u8]) {
    conn.write_all(bytes).await.unwrap();
}

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("no answer within 10 s")
}

/// One `ListImages` with `:authority: /run/x.sock` (what grpc-go sends for a unix socket).
async fn socket_path_request(through_front: bool) -> Outcome {
    let mut conn = serve(through_front);
    let mut block = Vec::new();
    list_images_pseudo(&mut block);
    literal(&mut block, 0x00, b":authority", SOCKET_PATH);
    grpc_fields(&mut block);
    let mut bytes = preface();
    bytes.extend(frame(HEADERS, END_HEADERS, 1, &block));
    bytes.extend(empty_message(1));
    send(&mut conn, &bytes).await;
    within(outcome(&mut conn, 1)).await
}

#[tokio::test]
async fn socket_path_authority_is_answered_through_the_front() {
    assert_eq!(
        socket_path_request(true).await,
        Outcome::Answered("200".into())
    );
}

/// The premise of the front, so the test above can fail: h2 alone refuses the request.
#[tokio::test]
async fn socket_path_authority_is_reset_without_the_front() {
    assert_eq!(
        socket_path_request(false).await,
        Outcome::Reset(PROTOCOL_ERROR)
    );
}

#[tokio::test]
async fn a_padded_prioritised_block_split_over_continuation_frames_is_answered() {
    let mut conn = serve(true);
    let mut block = Vec::new();
    list_images_pseudo(&mut block);
    literal(&mut block, 0x00, b":authority", SOCKET_PATH);
    grpc_fields(&mut block);
    // Large enough that the front's re-encoded block needs CONTINUATION frames of its own.
    literal(&mut block, 0x00, b"x-filler", &vec![b'f'; 40_000]);
    let mut first = vec![7u8]; // pad length
    first.extend_from_slice(&[0, 0, 0, 0, 15]); // priority: stream 0, weight 16
    first.extend_from_slice(&block[..100]);
    first.extend_from_slice(&[0; 7]);
    let mut bytes = preface();
    bytes.extend(frame(HEADERS, PADDED | PRIORITY, 1, &first));
    bytes.extend(frame(CONTINUATION, 0, 1, &block[100..20_000]));
    bytes.extend(frame(CONTINUATION, END_HEADERS, 1, &block[20_000..]));
    bytes.extend(empty_message(1));
    send(&mut conn, &bytes).await;
    assert_eq!(
        within(outcome(&mut conn, 1)).await,
        Outcome::Answered("200".into())
    );
}

#[tokio::test]
async fn dynamic_table_references_across_two_requests_are_followed() {
    let mut conn = serve(true);
    let mut first = Vec::new();
    list_images_pseudo(&mut first);
    // Both enter the client's dynamic table: :authority is index 63, x-trace 62.
    literal(&mut first, 0x40, b":authority", SOCKET_PATH);
    grpc_fields(&mut first);
    literal(&mut first, 0x40, b"x-trace", b"one");
    let mut second = Vec::new();
    list_images_pseudo(&mut second);
    second.push(0x80 | 63); // :authority: /run/x.sock, from the table only
    grpc_fields(&mut second);
    second.push(0x80 | 62);
    let mut bytes = preface();
    bytes.extend(frame(HEADERS, END_HEADERS, 1, &first));
    bytes.extend(empty_message(1));
    bytes.extend(frame(HEADERS, END_HEADERS, 3, &second));
    bytes.extend(empty_message(3));
    send(&mut conn, &bytes).await;
    assert_eq!(
        within(outcomes(&mut conn, &[1, 3])).await,
        [
            Outcome::Answered("200".into()),
            Outcome::Answered("200".into())
        ]
    );
}

/// Runs the client→server direction over `input`; the error's text if it refused.
async fn refusal(input: &[u8]) -> Option<String> {
    let mut reader = input;
    let mut sink = Vec::new();
    client_to_server(&mut reader, &mut sink)
        .await
        .err()
        .map(|e| e.to_string())
}

#[tokio::test]
async fn an_oversized_header_block_is_refused_before_it_arrives() {
    // A HEADERS frame announcing 16 MiB - 1 with nothing behind it: refused from the head alone.
    let mut input = preface();
    input.extend_from_slice(&[0xff, 0xff, 0xff, HEADERS, END_HEADERS, 0, 0, 0, 1]);
    let error = refusal(&input).await.expect("refused");
    assert!(error.contains("header block over"), "{error}");

    // Many CONTINUATION frames, each small, adding up past the cap.
    let mut input = preface();
    input.extend(frame(HEADERS, 0, 1, &[0x83]));
    for _ in 0..=(MAX_HEADER_BLOCK / 16_000) {
        input.extend(frame(CONTINUATION, 0, 1, &[0x83; 16_000]));
    }
    let error = refusal(&input).await.expect("refused");
    assert!(error.contains("header block over"), "{error}");
}

#[tokio::test]
async fn a_block_that_decodes_past_the_cap_is_refused() {
    // One 4000-byte table entry, then 1-byte references to it: a small block, a huge list.
    let mut block = Vec::new();
    literal(&mut block, 0x40, b"x-big", &[b'b'; 4000]);
    block.extend(std::iter::repeat_n(0x80 | 62, 100));
    let mut input = preface();
    input.extend(frame(HEADERS, END_HEADERS, 1, &block));
    let error = refusal(&input).await.expect("refused");
    assert!(error.contains("decoded header list over"), "{error}");
}

#[tokio::test]
async fn garbage_closes_the_connection_without_panicking() {
    let error = refusal(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(error.expect("refused").contains("preface"));

    // Pseudo-random frames after a valid preface: each run ends (refused or at the end of
    // input) and the task does not panic.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..200 {
        let mut input = preface();
        for _ in 0..64 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            input.extend_from_slice(&state.to_le_bytes());
        }
        // Small frame lengths, so that headers and CONTINUATION frames turn up.
        input[24] = 0;
        input[25] = 0;
        input[27] = [HEADERS, CONTINUATION, DATA, PUSH_PROMISE][(state % 4) as usize];
        let _ = refusal(&input).await;
    }

    // Through the whole front: the client sees the connection close.
    let mut conn = serve(true);
    send(&mut conn, b"\x00\x01garbage that is no preface at all").await;
    let mut rest = Vec::new();
    within(conn.read_to_end(&mut rest)).await.unwrap();
}

#[test]
fn a_rewritten_block_is_split_into_frames_the_server_accepts_and_decodes_back() {
    let fields = vec![
        (b":authority".to_vec(), b"localhost".to_vec()),
        (b"x-filler".to_vec(), vec![b'f'; 40_000]),
    ];
    let block = HeaderBlock {
        first: FrameHead {
            len: 0,
            kind: HEADERS,
            flags: END_STREAM | PADDED | PRIORITY,
            stream: 5,
        },
        priority: Some([0, 0, 0, 0, 15]),
        fragment: Vec::new(),
    };
    let out = encode_frames(&block, &fields);
    let mut rest = out.as_slice();
    let mut heads = Vec::new();
    let mut fragment = Vec::new();
    while let Some((head, tail)) = rest.split_first_chunk::<9>() {
        let h = FrameHead::parse(head);
        assert!(h.len <= MAX_OUT_FRAME, "frame of {} bytes", h.len);
        let (payload, tail) = tail.split_at(h.len);
        let (_, part) =
            split_headers_payload(if heads.is_empty() { h.flags } else { 0 }, payload).unwrap();
        fragment.extend_from_slice(part);
        heads.push((h.kind, h.flags, h.stream));
        rest = tail;
    }
    assert_eq!(
        heads,
        [
            (HEADERS, END_STREAM | PRIORITY, 5),
            (CONTINUATION, 0, 5),
            (CONTINUATION, END_HEADERS, 5),
        ]
    );
    // Literals without indexing only: a fresh decoder reads them, and its table stays empty.
    let mut decoder = Decoder::new();
    assert_eq!(decoder.decode(&fragment).unwrap(), fields);
    assert!(
        decoder.decode(&[0x80 | 62]).is_err(),
        "an entry was indexed"
    );
}
