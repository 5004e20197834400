//! Hermes' side of the OCI world: a distribution client built for lazy loading (range reads,
//! resumable verified streams, bearer/basic auth, retries), SOCI index artifacts encoded exactly as
//! soci does, a content-addressed store, and the image indexer that streams each layer once into
//! `hermes-ztoc`.
//!
//! Not here: containerd, FUSE, Kubernetes. Registry credential helpers are not run; credentials
//! come from docker `config.json` `auths` or Kubernetes pull secrets.

#![warn(missing_docs)]

mod auth;
mod client;
mod error;
pub mod hosts;
mod indexer;
pub mod manifest;
mod pull_credentials;
mod range;
pub mod soci;
mod store;

pub use auth::{Challenge, Credential, Credentials};
pub use client::{
    BlobStream, Client, ClientOptions, DEFAULT_MAX_METADATA_SIZE, Deadline, FetchedManifest,
    HostStats, ResolvedImage, RetryPolicy, encode_query, fallback_tag, read_body,
};
pub use error::{Error, Result};
pub use hermes_oci_types::DEFAULT_INDEX_SPAN_SIZE;
pub use hermes_oci_types::{DOCKER_HUB, Digest, Error as ParseError, Hasher, Reference};
pub use hosts::RegistryHosts;
pub use indexer::{
    DEFAULT_MIN_LAYER_SIZE, IndexOptions, IndexResult, PushSummary, assemble_index, build_index,
    index_layer, push_soci, span_size_for_layer,
};
pub use pull_credentials::{
    MAX_HANDOFF_SIZE, PullCredentials, credential_from_auth_fields, decode_handoff, encode_handoff,
};
pub use range::RegistryRangeReader;
pub use store::{
    BlobWriter, ImageRecord, LayerArtifact, LayerOutcome, LayerRecord, Store, StoredLayer,
    SweepSummary,
};
