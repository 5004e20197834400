//! A deliberately dumb HTTP/1.1 client over `std::net::TcpStream`, so that what the tests observe
//! is what went over the wire (no retries, no decoding, no connection reuse).

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

/// How a response body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// All `Content-Length` bytes arrived (or EOF without a length).
    Complete,
    /// The connection closed early.
    Eof,
    /// Reading failed.
    Error(ErrorKind),
}

#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub end: End,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn content_length(&self) -> Option<usize> {
        self.header("content-length").and_then(|v| v.parse().ok())
    }
}

/// Sends one request with `Connection: close` and reads the response. An error before the response
/// head is complete is returned as `Err`.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<RawResponse> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;

    let mut buf = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::new(
                ErrorKind::UnexpectedEof,
                "closed before the response head",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let text = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = text.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut response = RawResponse {
        status,
        headers,
        body: buf[head_end..].to_vec(),
        end: End::Complete,
    };
    if method == "HEAD" {
        return Ok(response);
    }
    let wanted = response.content_length();
    loop {
        if wanted.is_some_and(|len| response.body.len() >= len) {
            break;
        }
        match stream.read(&mut chunk) {
            Ok(0) => {
                if wanted.is_some() {
                    response.end = End::Eof;
                }
                break;
            }
            Ok(n) => response.body.extend_from_slice(&chunk[..n]),
            Err(error) => {
                response.end = End::Error(error.kind());
                break;
            }
        }
    }
    Ok(response)
}

pub fn get(addr: SocketAddr, path: &str) -> RawResponse {
    request(addr, "GET", path, &[]).unwrap_or_else(|e| panic!("GET {path} via {addr}: {e}"))
}

pub fn sha256(data: &[u8]) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(data);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// `skopeo inspect --raw` of a plain-HTTP reference; panics with skopeo's stderr on failure.
pub fn skopeo_inspect_raw(reference: &str, creds: Option<&str>) -> Vec<u8> {
    let mut command = Command::new("skopeo");
    command.args(["inspect", "--raw", "--tls-verify=false"]);
    if let Some(creds) = creds {
        command.arg(format!("--creds={creds}"));
    }
    let output = command
        .arg(format!("docker://{reference}"))
        .output()
        .expect("skopeo not found: apt-get install skopeo");
    assert!(
        output.status.success(),
        "skopeo inspect --raw docker://{reference} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
