//! The crate's one error type. It is turned into a `tonic::Status` in exactly one place
//! (`server::to_status`).

use std::io;
use std::path::PathBuf;

use crate::Kind;

/// What went wrong in a snapshot operation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A snapshot with this key or name exists already (containerd's `ErrAlreadyExists`).
    #[error("snapshot {key:?} already exists")]
    AlreadyExists {
        /// The key or name that is taken.
        key: String,
    },
    /// No snapshot has this key or name (containerd's `ErrNotFound`).
    #[error("snapshot {key:?} not found")]
    NotFound {
        /// The key or name that was looked up.
        key: String,
    },
    /// A snapshot was created on a parent that is not committed.
    #[error("parent {parent:?} is not a committed snapshot; commit it first")]
    ParentNotCommitted {
        /// The parent named in the request.
        parent: String,
    },
    /// The operation needs a snapshot of another kind (e.g. commit of a view).
    #[error("snapshot {key:?} is {actual:?}, the operation needs {expected}")]
    WrongKind {
        /// The snapshot's key.
        key: String,
        /// Its kind.
        actual: Kind,
        /// The kinds the operation accepts.
        expected: &'static str,
    },
    /// A snapshot with children cannot be removed.
    #[error("snapshot {key:?} has children; remove them first")]
    HasChildren {
        /// The snapshot that still has children.
        key: String,
    },
    /// A key, name or label is empty or malformed.
    #[error("invalid argument {what}: {value:?}")]
    InvalidArgument {
        /// Which argument.
        what: &'static str,
        /// Its value.
        value: String,
    },
    /// A `List` filter this snapshotter does not understand.
    #[error("unsupported filter {filter:?}: {reason}")]
    InvalidFilter {
        /// The whole filter string.
        filter: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An `Update` field path other than `labels` / `labels.KEY`.
    #[error("field {field:?} cannot be updated; only labels are mutable")]
    ImmutableField {
        /// The field path from the update mask.
        field: String,
    },
    /// The embedded metadata store failed.
    #[error("metadata store {path}")]
    Store {
        /// The database file.
        path: PathBuf,
        /// The store's error.
        #[source]
        source: Box<redb::Error>,
    },
    /// A stored record could not be decoded.
    #[error("corrupt metadata record for snapshot {key:?}")]
    Corrupt {
        /// The snapshot whose record is broken.
        key: String,
        /// The decoding error.
        #[source]
        source: serde_json::Error,
    },
    /// A filesystem operation failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The gRPC server failed.
    #[error("gRPC server")]
    Serve(#[source] tonic::transport::Error),
    /// The node daemon's configuration is invalid.
    #[error("config {}: {message}", path.display())]
    Config {
        /// The config file (empty when parsed from a string).
        path: PathBuf,
        /// What is wrong, naming the key (and line, where known).
        message: String,
    },
    /// A registry request failed.
    #[error("registry")]
    Registry(#[from] hermes_oci::Error),
    /// A zTOC could not be parsed.
    #[error("zTOC of layer {layer}")]
    Ztoc {
        /// The layer it claims to index.
        layer: String,
        /// The parse error.
        #[source]
        source: hermes_ztoc::Error,
    },
    /// The controller's node API failed or answered something unusable.
    #[error("controller")]
    Controller(#[from] hermes_node_api::client::Error),
    /// A lazy layer could not be mounted.
    #[error("lazy mount of layer {layer}: {message}")]
    Mount {
        /// The layer digest.
        layer: String,
        /// What went wrong.
        message: String,
    },
    /// The metrics endpoint could not be started.
    #[error("metrics endpoint {addr}")]
    Metrics {
        /// The listen address.
        addr: std::net::SocketAddr,
        /// The bind error.
        #[source]
        source: io::Error,
    },
    /// A blocking task running a snapshot operation panicked or was cancelled.
    #[error("snapshot operation did not complete")]
    Task(#[source] tokio::task::JoinError),
    /// The CRI proxy's HTTP/2 front closed a client connection that broke the protocol or
    /// sent an oversized header block.
    #[error("CRI proxy connection: {reason}")]
    CriConnection {
        /// What the client did.
        reason: String,
    },
    /// A connection through the CRI proxy's HTTP/2 front failed (closed or reset by a peer).
    #[error("CRI proxy connection: {what}")]
    CriConnectionIo {
        /// What the front was doing.
        what: &'static str,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| Error::Io { op, path, source }
    }
}

/// A digest or image reference that does not parse, reported as the registry error it was
/// before those types moved out of `hermes-oci`.
impl From<hermes_oci::ParseError> for Error {
    fn from(error: hermes_oci::ParseError) -> Self {
        Error::Registry(error.into())
    }
}
