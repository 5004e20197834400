//! OCI values shared by Hermes' pure code and its registry client: validated digests, image
//! references with Docker Hub defaults, and the records the store keeps of built indexes.
//!
//! Not here: any I/O. The registry client and the store are `hermes-oci`, which re-exports
//! these types; the controller's core uses them without depending on a network stack.

#![warn(missing_docs)]

mod digest;
mod record;
mod reference;

pub use digest::{Digest, Hasher};
pub use record::{ImageRecord, LayerOutcome, LayerRecord};
pub use reference::{DOCKER_HUB, Reference};

/// soci's default minimum layer size (10 MiB): smaller layers are pulled whole.
pub const DEFAULT_MIN_LAYER_SIZE: u64 = 10 << 20;

/// A digest or reference that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An image reference that does not parse.
    #[error("invalid image reference {reference:?}: {what}")]
    InvalidReference {
        /// The text given.
        reference: String,
        /// What is wrong with it.
        what: &'static str,
    },

    /// A digest that is not `sha256:<64 hex>`.
    #[error("invalid digest {0:?}: expected sha256:<64 lower-case hex digits>")]
    InvalidDigest(String),
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
