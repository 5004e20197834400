//! The Hermes controller's core: which running images a `HermesPolicy` wants indexed, the
//! build queue that indexes their layers once each, and the reconciler that turns the world
//! (policies, running containers, store contents, queue) into actions and statuses.
//!
//! - [`policy`]: the `HermesPolicy` model, parsed from YAML and validated;
//! - [`selector`]: Kubernetes label selectors;
//! - [`pattern`]: image globs over `registry/repo[:tag]` and digest pins;
//! - [`matcher`]: the policy that applies to a running container (most specific wins, `Off`
//!   is a kill switch);
//! - [`queue`]: the [`BuildQueue`](queue::BuildQueue), deduplicated by manifest and layer digest;
//! - [`reconcile`]: the reconciler, a function of its inputs;
//! - [`misses`]: nodes' reports of images started without an index, kept (bounded) as running
//!   containers;
//! - [`prefetch`]: startup read traces merged into per-layer prefetch profiles;
//! - [`api`]: the node HTTP API (axum) serving zTOCs, statuses and prefetch profiles and
//!   taking misses and traces;
//! - [`builder`]: the registry and store work (resolve, build a layer, finish an image);
//! - [`status`]: image reports (status plus build statistics), kept durably;
//! - [`engine`]: the controller loop both adapters drive;
//! - [`mirror`]: the artifact store published to an OCI repository, for several replicas;
//! - [`standalone`]: the standalone adapter (policy directory, local containerd);
//! - [`tls`]: TLS for the node API.
//!
//! The modules up to [`prefetch`] are pure: no I/O, no clock (time is passed in). The
//! Kubernetes adapter lives in its own crate (`hermes-kube`) on top of [`engine`].
#![warn(missing_docs)]

pub mod api;
pub mod builder;
pub mod engine;
mod error;
pub mod matcher;
pub mod mirror;
pub mod misses;
pub mod pattern;
pub mod policy;
pub mod prefetch;
pub mod queue;
pub mod reconcile;
pub mod selector;
pub mod standalone;
pub mod status;
pub mod tls;

pub use error::{Error, Result, chain};
