//! The controller core's errors: policies that do not parse or validate.

/// Why a `HermesPolicy` cannot be used.
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
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error and its causes, `: `-separated, for statuses and logs (a YAML error's key and line
/// are in its cause): the workspace's one formatter.
pub use hermes_node_api::error_chain as chain;
