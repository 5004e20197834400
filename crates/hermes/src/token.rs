//! The bearer token files of the node API, read the same way by every command that takes one
//! (`hermes controller`, `hermes kube controller`, `hermes status`): whole, trimmed, never empty,
//! and at most [`MAX_TOKEN_FILE_SIZE`] bytes, so a wrong path (`/dev/zero`, a log) costs nothing.

use std::io::Read;
use std::path::Path;

use anyhow::{Context, bail};

/// The largest token file read; a real token is well under a KiB.
pub const MAX_TOKEN_FILE_SIZE: u64 = 64 << 10;

/// Reads the token in `path`: its text without surrounding white space.
pub fn read_token_file(path: &Path) -> anyhow::Result<String> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot read the token file {}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(MAX_TOKEN_FILE_SIZE + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read the token file {}", path.display()))?;
    if bytes.len() as u64 > MAX_TOKEN_FILE_SIZE {
        bail!(
            "the token file {} is larger than {MAX_TOKEN_FILE_SIZE} bytes: is it the right file?",
            path.display()
        );
    }
    let text = String::from_utf8(bytes)
        .with_context(|| format!("the token file {} is not UTF-8 text", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        bail!("the token file {} is empty", path.display());
    }
    Ok(token.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_trimmed_and_an_empty_or_endless_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "  s3cret\n").unwrap();
        assert_eq!(read_token_file(&path).unwrap(), "s3cret");

        std::fs::write(&path, " \n").unwrap();
        let err = format!("{:#}", read_token_file(&path).unwrap_err());
        assert!(err.contains("is empty"), "{err}");

        let err = format!("{:#}", read_token_file(Path::new("/dev/zero")).unwrap_err());
        assert!(err.contains("larger than"), "{err}");
    }
}
