//! The crate's one error type.

use std::path::PathBuf;

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong talking to containerd.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The unix socket could not be connected to.
    #[error(
        "cannot connect to containerd at {socket}; is it running, and is this the right --address?"
    )]
    Connect {
        /// The socket path.
        socket: PathBuf,
        /// The cause.
        #[source]
        source: tonic::transport::Error,
    },
    /// A namespace or lease name cannot be sent as gRPC metadata.
    #[error("invalid {what} {value:?}: must be printable ASCII")]
    InvalidMetadata {
        /// `namespace` or `lease`.
        what: &'static str,
        /// The value given.
        value: String,
    },
    /// A call failed (containerd answered with an error status, or the transport broke).
    #[error("containerd {call} failed")]
    Rpc {
        /// The service and method, e.g. `images.Get`.
        call: &'static str,
        /// The status containerd (or tonic) returned.
        #[source]
        source: Box<tonic::Status>,
    },
    /// containerd answered with something this client cannot use.
    #[error("unexpected answer to containerd {call}: {reason}")]
    Unexpected {
        /// The service and method.
        call: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A blob in containerd's content store is larger than the caller allows.
    #[error("content {digest} is larger than {limit} bytes")]
    TooLarge {
        /// The blob's digest.
        digest: String,
        /// The limit in bytes.
        limit: u64,
    },
    /// The [`Chunks`](crate::Chunks) a content write reads from failed (a download, say); the
    /// write was aborted. Shown as the source's own error, which says what it was reading.
    #[error(transparent)]
    Source(Box<dyn std::error::Error + Send + Sync>),
    /// An image index or manifest could not be parsed.
    #[error("cannot parse {what} {digest}")]
    Json {
        /// What was parsed (`image index`, `manifest`, …).
        what: &'static str,
        /// Its digest.
        digest: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
}

impl Error {
    /// The gRPC status code, if the error is a failed call.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Error::Rpc { source, .. } => Some(source.code()),
            _ => None,
        }
    }

    /// Whether containerd answered `NotFound`.
    pub fn is_not_found(&self) -> bool {
        self.code() == Some(tonic::Code::NotFound)
    }

    /// Whether containerd answered `AlreadyExists`.
    pub fn is_already_exists(&self) -> bool {
        self.code() == Some(tonic::Code::AlreadyExists)
    }

    /// Maps a failed call to [`Error::Rpc`]: `.map_err(Error::rpc("images.Get"))`.
    pub fn rpc(call: &'static str) -> impl FnOnce(tonic::Status) -> Error {
        move |status| Error::Rpc {
            call,
            source: Box::new(status),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chunk source's error, with its own context and cause.
    #[derive(Debug, thiserror::Error)]
    #[error("cannot fetch layer sha256:aa")]
    struct Fetch(#[source] std::io::Error);

    #[test]
    fn a_failed_chunk_source_reads_as_its_own_error_and_keeps_its_cause() {
        let e = Error::Source(Box::new(Fetch(std::io::Error::other("connection reset"))));
        assert_eq!(e.to_string(), "cannot fetch layer sha256:aa");
        let cause = std::error::Error::source(&e).map(ToString::to_string);
        assert_eq!(cause.as_deref(), Some("connection reset"));
    }
}
