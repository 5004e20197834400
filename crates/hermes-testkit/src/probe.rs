//! Small process and socket helpers shared by the parts: locating programs, picking a free port,
//! probing an HTTP endpoint with a raw request.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use crate::{Error, Result};

/// Finds `program` on `PATH` (or in the Debian location), or says how to install it.
pub(crate) fn find_program(program: &'static str, install: &'static str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
        .ok_or(Error::MissingProgram { program, install })
}

/// A loopback port that was free a moment ago (bind port 0, read it, release it). The caller must
/// cope with losing a race for it.
pub(crate) fn free_port() -> Result<u16> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(Error::os("bind a loopback port"))?;
    let port = listener
        .local_addr()
        .map_err(Error::os("read the bound port"))?
        .port();
    Ok(port)
}

/// Sends `GET path` to `addr` and returns the response status, or `None` when nothing (valid)
/// answers.
pub(crate) fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut head = [0u8; 64];
    let mut filled = 0;
    while filled < 12 {
        let n = stream.read(&mut head[filled..]).ok()?;
        if n == 0 {
            return None;
        }
        filled += n;
    }
    let line = std::str::from_utf8(&head[..filled]).ok()?;
    line.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_program_fails_with_what_to_install() {
        let error = find_program(
            "hermes-testkit-no-such-tool",
            "apt-get install no-such-tool",
        )
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            "hermes-testkit-no-such-tool not found: apt-get install no-such-tool"
        );
    }
}
