//! Test-only helpers that start **real** parts on loopback, each in its own temp dir, and tear them
//! down on `Drop`:
//!
//! - [`Registry`]: Debian's `docker-registry` (anonymous or htpasswd-protected).
//! - [`FaultProxy`]: an HTTP/1.1 reverse proxy in front of a registry that injects drops, resets,
//!   stalls, error statuses, 429s, truncated and corrupted bodies (queued, or at random from a
//!   seed), caps bandwidth and can play a bearer-token auth server. The `fault-proxy` binary runs
//!   one as a process for scripts (`bench/chaos.py`).
//! - [`Containerd`]: containerd 1.6 (the system's) or 2.x (see [`Flavour`]) with the system's
//!   runc, its own root, state and socket, optionally with a proxy snapshotter and the CRI plugin
//!   pulling from a local registry.
//! - [`TestImage`]: builds OCI images from generated file trees and pushes them with `skopeo`.
//! - [`prometheus::check_histograms`]: the invariants every histogram of a scrape must hold.
//!
//! It deliberately contains no Hermes logic: tests compare what Hermes reads back against what
//! these helpers wrote. A missing tool is an error whose message says what to install; tests must
//! fail on it, never skip.
#![warn(missing_docs)]

mod containerd;
mod error;
mod image;
mod probe;
pub mod prometheus;
mod proxy;
mod registry;

pub use containerd::{
    CONTAINERD2_BIN_ENV, Containerd, ContainerdBuilder, CriPull, Flavour, HERMES_RUNTIME_HANDLER,
    PROXY_SNAPSHOTTER, busybox, busybox_image, sandbox_image,
};
pub use error::{Error, Result};
pub use image::{LayerInfo, PushedImage, PushedIndex, SparseFormat, TestImage};
pub use proxy::{Fault, FaultProxy, FaultRule, LoggedRequest, RandomFaults};
pub use registry::Registry;
