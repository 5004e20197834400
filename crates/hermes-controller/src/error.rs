//! The controller core's errors.

/// What went wrong in the controller core.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A policy document is not valid YAML or does not have the `HermesPolicy` shape (unknown
    /// key, wrong type, unknown `mode`); the message names the key and line.
    #[error("cannot parse HermesPolicy documents from {source_name}")]
    Parse {
        /// Where the text came from (a file path, or `<inline>`).
        source_name: String,
        /// The YAML error, with its location.
        #[source]
        source: Box<serde_saphyr::Error>,
    },
    /// A document is not a `hermes.dev/v1alpha1` `HermesPolicy`.
    #[error(
        "{source_name}: document {document} is {api_version}/{kind}, expected hermes.dev/v1alpha1/HermesPolicy"
    )]
    WrongKind {
        /// Where the text came from.
        source_name: String,
        /// The document's index (0-based) in the text.
        document: usize,
        /// Its `apiVersion`.
        api_version: String,
        /// Its `kind`.
        kind: String,
    },
    /// A policy parsed but one of its fields has a value the controller cannot use.
    #[error("HermesPolicy {policy:?}: {field}: {reason}")]
    InvalidPolicy {
        /// `metadata.name` of the policy.
        policy: String,
        /// The field's path, e.g. `spec.images[2]`.
        field: String,
        /// What is wrong with it and what is expected.
        reason: String,
    },
    /// Two policies have the same name.
    #[error("HermesPolicy {policy:?} is defined twice (names must be unique)")]
    DuplicatePolicy {
        /// The repeated name.
        policy: String,
    },
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
pub use hermes_node_api::error_chain as chain;
