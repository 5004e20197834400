//! Hermes' containerd remote snapshotter: containerd's snapshots gRPC API on a unix socket with
//! the semantics of containerd's overlay snapshotter (active, view and committed snapshots,
//! overlayfs mounts), metadata in an embedded transactional store (redb), and the
//! remote-prepare decision behind the [`RemoteLayers`] trait.
//!
//! - [`Snapshots`] is the core: plain methods over the store and a root dir, no gRPC types.
//! - [`serve`] is the thin tonic edge.
//! - [`RemoteLayers`] decides whether a layer containerd is about to unpack can be provided as a
//!   mounted directory instead; anything but a usable directory falls back to a normal
//!   snapshot, and the reason is logged and counted ([`FallbackReason`]).
//!
//! - The node daemon ([`Daemon`], `hermes node`): [`NodeConfig`], zTOCs from [`IndexSources`]
//!   (local store, controller, SOCI in the registry), [`NodeLayers`] serving each lazy layer
//!   from a process of its own ([`layer_server`]) so mounts survive a daemon restart, and
//!   Prometheus metrics.
//! - [`pulls`]: per-pull reports (lazy / normal / fallback per layer, bytes fetched) that the
//!   daemon sends the controller.
//! - [`LazyLayers`] is the in-process variant of lazy layers (one process, for tests and tools).

#![warn(missing_docs)]

pub mod config;
pub mod cri_proxy;
mod daemon;
mod error;
mod filter;
pub mod layer_server;
mod lazy;
mod metrics;
mod node_layers;
pub mod private;
pub mod pulls;
mod remote;
mod server;
mod snapshots;
pub mod sources;
mod store;

/// containerd's API as generated code (the `hermes-containerd-api` crate, whose snapshots server
/// this crate implements), for clients such as tests and tools that drive the snapshotter.
pub use hermes_containerd_api as api;

pub use config::NodeConfig;
pub use daemon::Daemon;
pub use error::{Error, Result};
pub use layer_server::{LayerStats, SERVER_ENV, ServeOptions, serve_layer};
pub use lazy::LazyLayers;
pub use node_layers::{Miss, NodeLayers, NodeLayersOptions, Recovery, ServerCommand};
pub use remote::{FallbackReason, NoRemoteLayers, RemoteError, RemoteLayer, RemoteLayers};
pub use server::{ServerHandle, connect, serve};
pub use snapshots::{Info, Kind, Labels, Mount, Snapshots, Usage};
pub use sources::IndexSources;
