//! The crate's one error type.

use std::io;
use std::path::PathBuf;

use hermes_ztoc::SpanId;

/// Why a layer was marked broken. Once broken, a layer serves no more reads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BrokenReason {
    /// A span's compressed bytes failed verification on every fetch (`VERIFY_ATTEMPTS` in a row).
    #[error(
        "span {span} failed verification on {attempts} fetches in a row (expected {expected}, got {actual})",
        attempts = crate::reader::VERIFY_ATTEMPTS
    )]
    SpanDigest {
        /// The span.
        span: SpanId,
        /// Digest in the zTOC.
        expected: String,
        /// Digest of the bytes read the last time.
        actual: String,
    },
    /// A span's verified bytes did not decode: the zTOC does not describe this layer.
    #[error("span {span} verified but did not decode: {message}")]
    SpanDecode {
        /// The span.
        span: SpanId,
        /// What the decoder said.
        message: String,
    },
    /// The whole blob, read back in order, does not have the layer's digest or size.
    #[error(
        "layer blob has digest {actual} and {actual_size} bytes, expected {expected} and {expected_size} bytes"
    )]
    LayerDigest {
        /// The layer digest asked for.
        expected: String,
        /// Digest of what was read.
        actual: String,
        /// The layer size asked for.
        expected_size: u64,
        /// Bytes read.
        actual_size: u64,
    },
}

/// Everything that can go wrong in a lazy layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The layer's file bytes were moved out of the span cache's data file into per-file
    /// copies (for FUSE passthrough): read the files through the mount instead.
    #[error("the file bytes of {path} were moved to per-file copies; read them through the mount")]
    MovedToCopies {
        /// The data file.
        path: PathBuf,
    },

    /// A file or directory of the span cache could not be created, read or written.
    #[error("span cache {path}: {what} failed")]
    Cache {
        /// The cache file or directory.
        path: PathBuf,
        /// The operation.
        what: &'static str,
        /// The system's error.
        #[source]
        source: io::Error,
    },

    /// Reading compressed bytes from the layer's source failed (the layer is not broken: a
    /// later read tries again).
    #[error("fetching compressed bytes {offset}..{end} of the layer failed", end = offset + len)]
    Fetch {
        /// First byte.
        offset: u64,
        /// Length.
        len: u64,
        /// The range reader's error.
        #[source]
        source: io::Error,
    },

    /// The layer was marked broken earlier; it serves no reads until it is set up again.
    #[error("layer is broken")]
    Broken(#[source] BrokenReason),

    /// The zTOC could not plan or decode a read.
    #[error("the zTOC cannot serve this read")]
    Ztoc(#[from] hermes_ztoc::Error),

    /// The layer's digest is not `sha256:<64 hex digits>`.
    #[error("invalid layer digest {0:?}: expected sha256:<64 lowercase hex digits>")]
    InvalidDigest(String),

    /// The tar describes a tree that cannot be presented (e.g. a hardlink to nothing).
    #[error("tar entry {name:?}: {what}")]
    BadEntry {
        /// The entry's name.
        name: String,
        /// What is wrong with it.
        what: &'static str,
    },

    /// Mounting the FUSE filesystem failed.
    #[error("mounting the lazy layer at {path} failed (needs root and /dev/fuse)")]
    Mount {
        /// The mountpoint.
        path: PathBuf,
        /// The system's error.
        #[source]
        source: io::Error,
    },

    /// Unmounting the FUSE filesystem failed.
    #[error("unmounting the lazy layer at {path} failed")]
    Unmount {
        /// The mountpoint.
        path: PathBuf,
        /// The system's error.
        #[source]
        source: io::Error,
    },

    /// A background thread could not be started.
    #[error("starting the {what} thread failed")]
    Thread {
        /// Which thread.
        what: &'static str,
        /// The system's error.
        #[source]
        source: io::Error,
    },
}

/// Shorthand for this crate's results.
pub type Result<T, E = Error> = std::result::Result<T, E>;
