//! An HTTP/2 front before the proxy's gRPC server that makes unix-socket clients' `:authority`
//! acceptable. grpc-go before Kubernetes 1.26 (kubernetes/kubernetes#112597) sends the socket
//! path (`/run/hermes/cri.sock`) as `:authority`; the h2 server behind tonic rejects a value
//! that is not a URI authority and resets the stream (hyperium/h2#487), so the v1.20 kubelet
//! could not pull through the proxy.
//!
//! The front copies the client's preface and every frame through unchanged, except header
//! blocks (HEADERS and its CONTINUATION frames): it decodes each one with an HPACK decoder that
//! follows the client's dynamic table, replaces an `:authority` that is not a URI authority
//! with `localhost`, and re-encodes the block with literals only, so the server's decoder
//! never depends on state the front would have to mirror. Server→client bytes are copied
//! unchanged. Memory is bounded on hostile input: a header block (encoded or decoded) over
//! [`MAX_HEADER_BLOCK`] closes the connection, other frames stream through without buffering.

use std::borrow::Cow;

use hermes_node_api::error_chain;
use loona_hpack::Decoder;
use loona_hpack::encoder::encode_integer_into;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tonic::codegen::http::uri::Authority;
use tracing::{debug, warn};

use crate::{Error, Result};

/// The client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The largest header block the front accepts, encoded and decoded (HPACK sizes: name, value
/// and 32 per field). CRI requests carry a few small headers; gRPC's own default is 16 KiB.
pub(crate) const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// Frames the front writes stay within HTTP/2's initial SETTINGS_MAX_FRAME_SIZE, which every
/// server accepts whatever it advertises.
const MAX_OUT_FRAME: usize = 16_384;
/// The dynamic table the client's encoder may use: the h2 server behind us advertises none, so
/// the protocol default applies.
const HPACK_TABLE_SIZE: usize = 4096;
/// What replaces an `:authority` that is not a URI authority.
const LOCALHOST: &[u8] = b"localhost";

const HEADERS: u8 = 0x1;
const PUSH_PROMISE: u8 = 0x5;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// The 9-byte head of an HTTP/2 frame. Its 24-bit length caps any frame below 16 MiB.
#[derive(Debug, Clone, Copy)]
struct FrameHead {
    len: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl FrameHead {
    fn parse(b: &[u8; 9]) -> Self {
        FrameHead {
            len: usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }

    fn encode(&self) -> [u8; 9] {
        let len = u32::try_from(self.len).unwrap_or(u32::MAX).to_be_bytes();
        let s = self.stream.to_be_bytes();
        [
            len[1], len[2], len[3], self.kind, self.flags, s[0], s[1], s[2], s[3],
        ]
    }
}

fn refused(reason: impl Into<String>) -> Error {
    Error::CriConnection {
        reason: reason.into(),
    }
}

fn io_error(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::CriConnectionIo { what, source }
}

/// Serves one client connection: `client` ↔ `server` (the gRPC server's end), until either side
/// closes. A client that breaks the protocol or sends an oversized header block is
/// disconnected with a log line saying why.
pub(crate) async fn front<C, S>(client: C, server: S)
where
    C: AsyncRead + AsyncWrite + Send,
    S: AsyncRead + AsyncWrite + Send,
{
    let (client_read, mut client_write) = tokio::io::split(client);
    let (mut server_read, mut server_write) = tokio::io::split(server);
    let mut client_read = BufReader::new(client_read);
    let up = client_to_server(&mut client_read, &mut server_write);
    let down = tokio::io::copy(&mut server_read, &mut client_write);
    tokio::pin!(up, down);
    tokio::select! {
        result = &mut up => match result {
            // The client finished sending (the server saw the end): send it the rest.
            Ok(()) => {
                let _ = down.await;
            }
            // A peer going away (a kubelet restart) is routine; a client breaking the protocol
            // is worth a warning.
            Err(e @ Error::CriConnectionIo { .. }) => {
                debug!(error = %error_chain(&e), "CRI proxy connection ended");
            }
            Err(e) => warn!(error = %e, "CRI proxy closed a client connection"),
        },
        _ = &mut down => {}
    }
}

/// The client→server direction: preface and frames through, header blocks rewritten. `Ok` when
/// the client closed its side cleanly between frames; the server's side is then shut down too.
async fn client_to_server<R, W>(r: &mut R, w: &mut W) -> Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut preface = [0u8; 24];
    if !read_or_eof(r, &mut preface).await? {
        return w.shutdown().await.map_err(io_error("close towards server"));
    }
    if &preface != PREFACE {
        return Err(refused("not an HTTP/2 client (bad connection preface)"));
    }
    w.write_all(&preface)
        .await
        .map_err(io_error("write to server"))?;
    let mut decoder = Decoder::new();
    decoder.set_max_allowed_table_size(HPACK_TABLE_SIZE);
    let mut head = [0u8; 9];
    while read_or_eof(r, &mut head).await? {
        let frame = FrameHead::parse(&head);
        match frame.kind {
            HEADERS => {
                let block = read_header_block(r, frame).await?;
                let mut fields = decode_block(&mut decoder, &block.fragment)?;
                if fix_authority(&mut fields) {
                    debug!(stream = frame.stream, "replaced a non-URI :authority");
                }
                w.write_all(&encode_frames(&block, &fields))
                    .await
                    .map_err(io_error("write to server"))?;
            }
            // A header block the front did not see start cannot be decoded; clients never
            // send PUSH_PROMISE (RFC 9113 §8.4).
            CONTINUATION => return Err(refused("CONTINUATION without HEADERS")),
            PUSH_PROMISE => return Err(refused("PUSH_PROMISE from a client")),
            _ => {
                w.write_all(&head)
                    .await
                    .map_err(io_error("write to server"))?;
                let copied = tokio::io::copy(&mut (&mut *r).take(frame.len as u64), w)
                    .await
                    .map_err(io_error("copy frame"))?;
                if copied != frame.len as u64 {
                    return Err(refused("connection closed inside a frame"));
                }
            }
        }
        w.flush().await.map_err(io_error("write to server"))?;
    }
    w.shutdown().await.map_err(io_error("close towards server"))
}

/// Fills `buf`; `false` if the stream ended before its first byte, an error if inside it.
async fn read_or_eof<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = r
            .read(&mut buf[filled..])
            .await
            .map_err(io_error("read from client"))?;
        if n == 0 {
            return if filled == 0 {
                Ok(false)
            } else {
                Err(refused("connection closed inside a frame"))
            };
        }
        filled += n;
    }
    Ok(true)
}

/// One request's header block, its padding stripped.
#[derive(Debug)]
struct HeaderBlock {
    first: FrameHead,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

/// Reads the payload of `first` (a HEADERS frame) and its CONTINUATION frames.
async fn read_header_block<R: AsyncRead + Unpin>(
    r: &mut R,
    first: FrameHead,
) -> Result<HeaderBlock> {
    let payload = read_payload(r, first.len, 0).await?;
    let (priority, fragment) = split_headers_payload(first.flags, &payload)?;
    let mut block = HeaderBlock {
        first,
        priority,
        fragment: fragment.to_vec(),
    };
    let mut end = first.flags & END_HEADERS != 0;
    let mut head = [0u8; 9];
    while !end {
        if !read_or_eof(r, &mut head).await? {
            return Err(refused("connection closed inside a header block"));
        }
        let next = FrameHead::parse(&head);
        if next.kind != CONTINUATION || next.stream != first.stream {
            return Err(refused("header block interrupted by another frame"));
        }
        let more = read_payload(r, next.len, block.fragment.len()).await?;
        block.fragment.extend_from_slice(&more);
        end = next.flags & END_HEADERS != 0;
    }
    Ok(block)
}

/// Reads `len` bytes of a header block of which `have` arrived already; refuses before
/// allocating if the block would exceed [`MAX_HEADER_BLOCK`].
async fn read_payload<R: AsyncRead + Unpin>(r: &mut R, len: usize, have: usize) -> Result<Vec<u8>> {
    if have + len > MAX_HEADER_BLOCK {
        return Err(refused(format!(
            "header block over {MAX_HEADER_BLOCK} bytes ({} announced)",
            have + len
        )));
    }
    let mut payload = vec![0u8; len];
    if !read_or_eof(r, &mut payload).await? && len > 0 {
        return Err(refused("connection closed inside a header block"));
    }
    Ok(payload)
}

/// The priority fields and the header block fragment of a HEADERS payload (RFC 9113 §6.2).
fn split_headers_payload(flags: u8, payload: &[u8]) -> Result<(Option<[u8; 5]>, &[u8])> {
    let mut rest = payload;
    let mut pad = 0;
    if flags & PADDED != 0 {
        let (&n, tail) = rest
            .split_first()
            .ok_or_else(|| refused("PADDED HEADERS without a pad length"))?;
        pad = usize::from(n);
        rest = tail;
    }
    let mut priority = None;
    if flags & PRIORITY != 0 {
        let (fields, tail) = rest
            .split_first_chunk::<5>()
            .ok_or_else(|| refused("HEADERS too short for its priority"))?;
        priority = Some(*fields);
        rest = tail;
    }
    let end = rest
        .len()
        .checked_sub(pad)
        .ok_or_else(|| refused("HEADERS padding longer than the frame"))?;
    Ok((priority, &rest[..end]))
}

/// Decodes one header block, keeping the decoder's dynamic table in step with the client.
fn decode_block(decoder: &mut Decoder<'_>, fragment: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut fields = Vec::new();
    let mut size = 0usize;
    decoder
        .decode_with_cb(fragment, |name: Cow<'_, [u8]>, value: Cow<'_, [u8]>| {
            // Indexed fields expand: count what they decode to, keep nothing past the cap.
            size = size.saturating_add(name.len() + value.len() + 32);
            if size <= MAX_HEADER_BLOCK {
                fields.push((name.into_owned(), value.into_owned()));
            }
        })
        .map_err(|e| refused(format!("HPACK: {e}")))?;
    if size > MAX_HEADER_BLOCK {
        return Err(refused(format!(
            "decoded header list over {MAX_HEADER_BLOCK} bytes"
        )));
    }
    Ok(fields)
}

/// Replaces an `:authority` the h2 server would reject (not a URI authority, e.g. a socket
/// path) with `localhost`. `true` if it did.
fn fix_authority(fields: &mut [(Vec<u8>, Vec<u8>)]) -> bool {
    let mut fixed = false;
    for (name, value) in fields {
        if name == b":authority" && Authority::try_from(value.as_slice()).is_err() {
            *value = LOCALHOST.to_vec();
            fixed = true;
        }
    }
    fixed
}

/// `fields` as literals without indexing (no Huffman, no dynamic table), in a HEADERS frame
/// with `block`'s stream, END_STREAM and priority, then CONTINUATION frames, each payload at
/// most [`MAX_OUT_FRAME`].
fn encode_frames(block: &HeaderBlock, fields: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut encoded = Vec::new();
    for (name, value) in fields {
        encoded.push(0x00);
        for s in [name, value] {
            // Writing into a Vec cannot fail.
            let _ = encode_integer_into(s.len(), 7, 0, &mut encoded);
            encoded.extend_from_slice(s);
        }
    }
    let mut first_payload = Vec::new();
    if let Some(priority) = block.priority {
        first_payload.extend_from_slice(&priority);
    }
    let room = MAX_OUT_FRAME - first_payload.len();
    let (head_part, mut rest) = encoded.split_at(room.min(encoded.len()));
    first_payload.extend_from_slice(head_part);
    let mut out = Vec::with_capacity(encoded.len() + 9 * (2 + encoded.len() / MAX_OUT_FRAME));
    let keep = block.first.flags & !(PADDED | END_HEADERS);
    let end = if rest.is_empty() { END_HEADERS } else { 0 };
    push_frame(
        &mut out,
        HEADERS,
        keep | end,
        block.first.stream,
        &first_payload,
    );
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(MAX_OUT_FRAME.min(rest.len()));
        rest = tail;
        let end = if rest.is_empty() { END_HEADERS } else { 0 };
        push_frame(&mut out, CONTINUATION, end, block.first.stream, chunk);
    }
    out
}

fn push_frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let head = FrameHead {
        len: payload.len(),
        kind,
        flags,
        stream,
    };
    out.extend_from_slice(&head.encode());
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests;
