//! A thin client for containerd's gRPC API (v1.6) and the Kubernetes CRI v1 API, over a unix socket.
//!
//! - [`api`] is the code generated from containerd's and Kubernetes' `.proto` files (the
//!   `hermes-containerd-api` crate, re-exported).
//! - [`connect_unix`] opens a gRPC channel to a unix socket; [`Containerd`] wraps it with the
//!   namespace (and optionally lease) metadata containerd expects on every call and hands out
//!   typed service clients.
//! - A small typed layer on top keeps gRPC types out of callers where that reads better:
//!   [`Containerd::list_running_containers`] (what the controller's standalone mode watches),
//!   the content, snapshot, diff, lease and image calls an image pull is made of
//!   ([`Containerd::write_content`], [`Containerd::prepare_snapshot`], …), and [`Cri`], a
//!   kubelet's container start through the CRI.
//!
//! It deliberately holds no Hermes policy and talks to no registry: deciding what to pull, index
//! or mount, and fetching blobs, live elsewhere (`hermes pull` combines this crate with
//! `hermes-oci`).
#![warn(missing_docs)]

mod client;
mod cri;
mod error;
mod ops;
mod platform;

/// The code generated from containerd's and Kubernetes' `.proto` files (the
/// `hermes-containerd-api` crate): the clients this crate hands out, for calls it has no typed
/// method for.
pub use hermes_containerd_api as api;

pub use client::{
    Containerd, LEASE_HEADER, Metadata, NAMESPACE_HEADER, RunningContainer, Service, Version,
    connect_unix,
};
pub use cri::{ContainerState, ContainerStatus, Cri, Pod, log_lines};
pub use error::{Error, Result};
pub use hermes_oci::manifest::Platform;
pub use ops::{BlobRef, Chunks, Written};
pub use platform::manifest_for_platform;
