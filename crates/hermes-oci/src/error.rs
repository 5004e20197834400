//! The crate's one error type.

use std::time::Duration;

use crate::Digest;

/// Everything that can go wrong talking to a registry, building an index or using the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A digest or image reference that does not parse.
    #[error(transparent)]
    Invalid(#[from] hermes_oci_types::Error),

    /// The registry could not be reached (after retries).
    #[error(
        "cannot reach registry {registry}: is it running and is the address right? (use --plain-http for a registry without TLS)"
    )]
    Unreachable {
        /// Registry host.
        registry: String,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },

    /// The registry wants credentials we do not have, or rejected them.
    #[error(
        "registry {registry} refused access to {repository} ({status}): check the credentials (docker config.json `auths` entry or pull secret) and that they may {action}"
    )]
    Unauthorized {
        /// Registry host.
        registry: String,
        /// Repository.
        repository: String,
        /// HTTP status.
        status: u16,
        /// `pull` or `push`.
        action: &'static str,
    },

    /// Manifest or blob not found.
    #[error("{what} {name} not found in {registry}/{repository}: check the name, tag and digest")]
    NotFound {
        /// "manifest" or "blob".
        what: &'static str,
        /// Tag or digest.
        name: String,
        /// Registry host.
        registry: String,
        /// Repository.
        repository: String,
    },

    /// A mirror served bytes of a blob range that failed the caller's verification, and no
    /// other host served it.
    #[error("mirror {host} served wrong bytes of {digest} at offset {offset}")]
    MirrorMismatch {
        /// The mirror, `host[:port]`.
        host: String,
        /// The blob.
        digest: Digest,
        /// Start of the range.
        offset: u64,
    },

    /// A mirror answered a range read with the whole blob (a pull-through cache that does not
    /// have it yet): the read goes to the next host.
    #[error("mirror {host} answered a range read of {digest} with the whole blob")]
    MirrorSentWholeBlob {
        /// The mirror, `host[:port]`.
        host: String,
        /// The blob.
        digest: Digest,
    },

    /// A registry host configuration (`hosts.toml`) that cannot be read or is invalid.
    #[error("registry host configuration {path}: {message}")]
    HostsConfig {
        /// The file or host directory.
        path: std::path::PathBuf,
        /// What is wrong, naming the key.
        message: String,
    },

    /// A mirror's TLS settings (`ca`, `client`) could not be loaded.
    #[error("registry host {host}: cannot use {path}: {message}")]
    HostTls {
        /// The host, `host[:port]`.
        host: String,
        /// The certificate or key file.
        path: std::path::PathBuf,
        /// Why.
        message: String,
    },

    /// Any other unexpected HTTP answer.
    #[error("registry {registry} answered {status} to {method} {path}: {body}")]
    Status {
        /// Registry host.
        registry: String,
        /// Request method.
        method: String,
        /// Request path.
        path: String,
        /// HTTP status.
        status: u16,
        /// Start of the response body (registry error JSON).
        body: String,
    },

    /// Retries ran out on 5xx, 429 or dropped connections.
    #[error("giving up on {registry} after {attempts} attempts ({last})")]
    RetriesExhausted {
        /// Registry host.
        registry: String,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last: String,
    },

    /// A blob's bytes do not hash to its digest.
    #[error(
        "blob {expected} from {registry} is corrupt: its bytes hash to {actual}; nothing was stored"
    )]
    DigestMismatch {
        /// Registry host.
        registry: String,
        /// The digest asked for.
        expected: Digest,
        /// The digest of what arrived.
        actual: Digest,
    },

    /// A blob that goes on past the size its descriptor declares.
    #[error(
        "blob {expected} from {registry} is longer than the {size} bytes its descriptor declares; stopped reading, nothing was stored"
    )]
    BlobTooLong {
        /// Registry host.
        registry: String,
        /// The digest asked for.
        expected: Digest,
        /// The size the descriptor declares.
        size: u64,
    },

    /// A response body longer than Hermes reads for its kind: a broken or hostile server.
    #[error(
        "the {what} from {url} is larger than {limit} bytes; stopped reading (the server is broken or hostile)"
    )]
    TooLarge {
        /// What the body was to be ("manifest", "token response", …).
        what: &'static str,
        /// The URL it came from.
        url: String,
        /// The most bytes read for it.
        limit: u64,
    },

    /// A request (retries included) that did not finish within its deadline.
    #[error(
        "the {what} from {url} did not arrive within {after:?}, retries included; the server is too slow or stalls"
    )]
    DeadlineExceeded {
        /// What was asked for.
        what: &'static str,
        /// The URL.
        url: String,
        /// The deadline.
        after: Duration,
    },

    /// A response body that broke off (after the request itself had succeeded).
    #[error("reading the {what} from {url} failed")]
    Body {
        /// What the body was to be.
        what: &'static str,
        /// The URL it came from.
        url: String,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },

    /// A manifest of a kind Hermes does not handle.
    #[error(
        "unsupported manifest media type {media_type:?} for {reference}: Hermes indexes OCI and Docker v2 images (manifests, indexes and manifest lists)"
    )]
    UnsupportedManifest {
        /// The reference resolved.
        reference: String,
        /// Its media type.
        media_type: String,
    },

    /// A manifest body that is not valid JSON of the expected shape.
    #[error("manifest {digest} is malformed")]
    MalformedManifest {
        /// Its digest.
        digest: Digest,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },

    /// An image index with no manifest for the requested platform.
    #[error("{reference} has no image for platform {platform}; it has: {available}")]
    PlatformNotFound {
        /// The reference.
        reference: String,
        /// Platform asked for.
        platform: String,
        /// Platforms present.
        available: String,
    },

    /// A docker `config.json` or pull secret that does not parse.
    #[error("cannot read registry credentials from {source_name}: {what}")]
    Credentials {
        /// File or secret.
        source_name: String,
        /// What is wrong.
        what: String,
    },

    /// Building a layer's zTOC failed.
    #[error("cannot index layer {layer}")]
    Ztoc {
        /// The layer.
        layer: Digest,
        /// The cause.
        #[source]
        source: hermes_ztoc::Error,
    },

    /// A local store operation failed.
    #[error("store {path}: cannot {action}")]
    Store {
        /// File or directory.
        path: String,
        /// What was attempted.
        action: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },

    /// The HTTP client could not be set up.
    #[error("cannot set up the HTTP client")]
    Client(#[source] reqwest::Error),
}

/// Shorthand for this crate's results.
pub type Result<T, E = Error> = std::result::Result<T, E>;
