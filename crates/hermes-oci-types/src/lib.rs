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

/// Default smallest span of the zTOCs the controller and `hermes index build` make (512 KiB;
/// soci's is 4 MiB). Measured on 2026-12-07 (release build, registry at 32 MB/s, no profile):
/// a Python image's first lazy start took 2.2 s at 512 KiB, 2.5 s at 1 MiB and 3.4 s at 4 MiB,
/// a torch image's 8.8, 9.3 and 12.0 s; the zTOC costs 6.3 %, 3.1 % and 0.8 % of the layer's
/// uncompressed size, and large layers get larger spans (`span_size_for_layer` in hermes-oci).
pub const DEFAULT_INDEX_SPAN_SIZE: u64 = 512 << 10;

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
