//! The crate's one error type.

use std::io;

use crate::Limit;

/// Everything that can go wrong building, parsing or reading through a zTOC.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading the layer stream failed.
    #[error("reading the layer failed")]
    Io(#[source] io::Error),

    /// The layer ended before its compressed stream did.
    #[error("layer is truncated: the compressed stream ends early at compressed offset {offset}")]
    Truncated {
        /// Compressed bytes read when the input ran out.
        offset: u64,
    },

    /// zlib rejected the gzip stream.
    #[error("gzip stream is corrupt near compressed offset {offset}: {message}")]
    Gzip {
        /// Compressed offset where decoding failed.
        offset: u64,
        /// zlib's description.
        message: String,
    },

    /// The zstd decoder rejected the stream.
    #[error("zstd stream is corrupt near compressed offset {offset}")]
    Zstd {
        /// Compressed offset where decoding failed.
        offset: u64,
        /// The decoder's error.
        #[source]
        source: io::Error,
    },

    /// A zstd layer with a single frame can only be decoded from its start.
    #[error(
        "zstd layer is a single frame and is not seekable: it cannot be loaded lazily and must be pulled normally"
    )]
    ZstdNotSeekable,

    /// A tar header failed to parse.
    #[error("invalid tar header at uncompressed offset {offset}: {what}")]
    TarHeader {
        /// Offset of the 512-byte header block.
        offset: u64,
        /// What was wrong with it.
        what: &'static str,
    },

    /// The tar stream ended inside an entry.
    #[error("tar stream is truncated at uncompressed offset {offset}")]
    TarTruncated {
        /// Uncompressed bytes read when the stream ended.
        offset: u64,
    },

    /// A tar entry of a type SOCI cannot describe (e.g. PAX global header, GNU sparse file).
    #[error("tar entry {name:?} at uncompressed offset {offset} has unsupported type {kind}")]
    UnsupportedEntry {
        /// The entry's name.
        name: String,
        /// The type flag or format feature.
        kind: String,
        /// Offset of its data.
        offset: u64,
    },

    /// A tar entry (or hardlink target) that is absolute or escapes the layer root through `..`.
    #[error(
        "tar entry {name:?} at uncompressed offset {offset} escapes the layer root; refusing the layer"
    )]
    UnsafePath {
        /// The offending name or link target.
        name: String,
        /// Offset of the entry's data.
        offset: u64,
    },

    /// The layer is well-formed but its table of contents passes one of the build [`Limits`]
    /// (a hostile or absurd layer): it is not indexed, and the image falls back to a normal pull.
    #[error("not indexable: {}", limit.describe(*max, *offset))]
    NotIndexable {
        /// Which limit.
        limit: Limit,
        /// Its value.
        max: u64,
        /// Uncompressed offset of the entry that passed it.
        offset: u64,
    },

    /// The build options are unusable.
    #[error("invalid span size {0}: it must be at least 1 byte")]
    InvalidSpanSize(u64),

    /// A spill file of a streamed build (`build_to`) could not be created, written or read.
    #[error("spill file in {dir} failed (the directory must be writable and have room)")]
    Spill {
        /// The spill directory.
        dir: std::path::PathBuf,
        /// What failed.
        #[source]
        source: io::Error,
    },

    /// Writing a streamed zTOC to its destination failed.
    #[error("writing the zTOC failed")]
    Output(#[source] io::Error),

    /// A zTOC part is larger than a flatbuffer can address (2 GiB).
    #[error("{what} of {size} bytes is larger than a zTOC can hold (2 GiB)")]
    TooLarge {
        /// Which part.
        what: &'static str,
        /// Its size.
        size: u64,
    },

    /// The layer has no bytes at all.
    #[error("layer is empty")]
    EmptyLayer,

    /// A zTOC (or checkpoint blob) is not a well-formed buffer.
    #[error("zTOC is malformed at byte {at}: bad {what}")]
    Malformed {
        /// Byte position of the bad structure.
        at: usize,
        /// Which structure.
        what: &'static str,
    },

    /// A zTOC whose entries would take far more memory than its bytes: entries share tables
    /// or strings, which no builder writes.
    #[error(
        "zTOC is invalid: its {size} bytes would decode to more than {limit} bytes (entries share tables or strings)"
    )]
    DecodeTooLarge {
        /// Size of the zTOC.
        size: u64,
        /// The most its decoded form may take.
        limit: u64,
    },

    /// A well-formed zTOC whose fields contradict each other.
    #[error("zTOC is invalid: {what} (item {index})")]
    Invalid {
        /// What is inconsistent.
        what: &'static str,
        /// Entry, span or checkpoint number concerned.
        index: u64,
    },

    /// The zTOC's compression algorithm is one Hermes cannot decode.
    #[error("zTOC uses unknown compression algorithm {0}")]
    UnknownCompression(i8),

    /// A span's compressed bytes do not match the zTOC's digest.
    #[error("span {span} failed verification: expected {expected}, got {actual}")]
    SpanDigestMismatch {
        /// The span.
        span: u32,
        /// Digest in the zTOC.
        expected: String,
        /// Digest of the bytes read.
        actual: String,
    },

    /// Reading a compressed byte range from the layer failed.
    #[error("reading compressed bytes {offset}..{end} of the layer failed", end = offset + len)]
    RangeRead {
        /// First byte.
        offset: u64,
        /// Length.
        len: u64,
        /// The reader's error.
        #[source]
        source: io::Error,
    },

    /// A span decoded to fewer bytes than the zTOC says it holds.
    #[error("span {span} is corrupt: {message}")]
    SpanDecode {
        /// The span.
        span: u32,
        /// The decoder's description.
        message: String,
    },

    /// A requested uncompressed range lies outside the layer or file.
    #[error("range {start}..{end} is outside the {what} ({size} bytes)")]
    OutOfRange {
        /// Start of the request.
        start: u64,
        /// End of the request.
        end: u64,
        /// Size of what was addressed.
        size: u64,
        /// What was addressed.
        what: &'static str,
    },

    /// No entry with that path.
    #[error("no entry {0:?} in the layer")]
    NotFound(String),

    /// The path is not something with file contents.
    #[error("{path:?} is a {kind}, not a regular file")]
    NotAFile {
        /// The path asked for.
        path: String,
        /// What it is.
        kind: &'static str,
    },

    /// A sparse file's map cannot be used: it does not parse, contradicts the entry, or (format
    /// 1.0 in a zTOC built by soci) is not in the zTOC at all.
    #[error("sparse file {name:?} at uncompressed offset {offset}: {what}")]
    SparseMap {
        /// The entry's name.
        name: String,
        /// Offset of its data.
        offset: u64,
        /// What is wrong.
        what: &'static str,
    },
}

/// Shorthand for this crate's results.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<io::Error> for Error {
    /// Decoders report through `io::Read`; unwrap our own errors that travelled that way.
    fn from(err: io::Error) -> Self {
        if !err.get_ref().is_some_and(|inner| inner.is::<Error>()) {
            return Error::Io(err);
        }
        let kind = err.kind();
        match err.into_inner().map(|b| b.downcast::<Error>()) {
            Some(Ok(inner)) => *inner,
            Some(Err(other)) => Error::Io(io::Error::new(kind, other)),
            None => Error::Io(io::Error::from(kind)),
        }
    }
}
