//! The Hermes controller's engine and node API: the I/O around the pure core
//! (`hermes-controller-core`, whose modules [`policy`], [`selector`], [`modules`], [`pattern`],
//! [`matcher`], [`queue`], [`reconcile`], [`prefetch`] and [`starts`] are re-exported here).
//!
//! - [`misses`]: nodes' reports of images started without an index, kept (bounded) as running
//!   containers;
//! - [`api`]: the node HTTP API (axum) serving zTOCs, statuses and prefetch profiles and
//!   taking misses and traces;
//! - [`builder`]: the registry and store work (resolve, build a layer, finish an image);
//! - [`status`]: image reports (status plus build statistics), kept durably;
//! - [`engine`]: the controller loop both adapters drive;
//! - [`publish`]: what the engine publishes, as a trait the node API implements;
//! - [`mirror`]: the artifact store published to an OCI repository, for several replicas;
//! - [`server`]: the node API's socket, token and TLS, set up alike by both adapters;
//! - [`tls`]: TLS for the node API.
//!
//! The adapters live in their own crates on top of [`engine`]: `hermes-standalone` (policy
//! directory, local containerd) and `hermes-kube`.
#![warn(missing_docs)]

pub mod api;
pub mod builder;
pub mod engine;
mod error;
pub mod mirror;
pub mod misses;
pub mod publish;
pub mod server;
pub mod status;
pub mod tls;

pub use error::{Error, Result, chain};
pub use hermes_controller_core::Error as PolicyError;
pub use hermes_controller_core::{
    matcher, modules, pattern, policy, prefetch, queue, reconcile, selector, starts,
};
