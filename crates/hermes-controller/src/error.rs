//! The controller's errors.

/// What went wrong in the controller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A `HermesPolicy` does not parse or validate.
    #[error(transparent)]
    Policy(#[from] hermes_controller_core::Error),
    /// A registry or artifact store operation failed.
    #[error("cannot {action} {subject}")]
    Oci {
        /// What was attempted (`resolve`, `index layer`, `push the SOCI index of`, …).
        action: &'static str,
        /// The image or layer it was attempted for.
        subject: String,
        /// The registry or store error.
        #[source]
        source: Box<hermes_oci::Error>,
    },
    /// A file or directory of the controller (policy directory, status directory) could not
    /// be read or written.
    #[error("cannot {action} {path}")]
    Io {
        /// What was attempted.
        action: &'static str,
        /// The file or directory.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The store names a zTOC for a layer but does not hold its blob.
    #[error(
        "the store names a zTOC for layer {layer} but does not hold its blob (deleted meanwhile?)"
    )]
    ZtocMissing {
        /// The layer.
        layer: hermes_oci::Digest,
    },
    /// A zTOC in the store does not parse.
    #[error("the stored zTOC of layer {layer} is unreadable")]
    Ztoc {
        /// The layer it indexes.
        layer: hermes_oci::Digest,
        /// Why it does not parse.
        #[source]
        source: hermes_ztoc::Error,
    },
    /// A background task (a resolve, a layer build, finishing an image) panicked or was
    /// aborted.
    #[error("the task to {action} {subject} did not complete")]
    Task {
        /// What the task did.
        action: &'static str,
        /// The image or layer it did it for.
        subject: String,
        /// How it ended.
        #[source]
        source: tokio::task::JoinError,
    },
    /// The node API cannot listen on its address.
    #[error("cannot listen on {address}")]
    Listen {
        /// The address asked for.
        address: String,
        /// The bind error.
        #[source]
        source: std::io::Error,
    },
    /// The node API's TLS certificate or key cannot be used.
    #[error("cannot use {path} for TLS: {reason}")]
    Tls {
        /// The certificate or key file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A layer build was stopped because no image wants the layer any more.
    #[error("cancelled: no image wants the layer any more")]
    Cancelled,
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error and its causes, `: `-separated, for statuses and logs (a YAML error's key and line
/// are in its cause): the workspace's one formatter.
pub use hermes_controller_core::chain;
