//! Test-only helpers that start **real** parts on loopback, each in its own temp dir, and tear them
//! down on `Drop`:
//!
//! - [`Registry`]: Debian's `docker-registry` (anonymous or htpasswd-protected).
//! - [`FaultProxy`]: an HTTP/1.1 reverse proxy in front of a registry that injects drops, resets,
//!   stalls, error statuses, 429s, truncated and corrupted bodies, caps bandwidth and can play a
//!   bearer-token auth server.
//! - [`TestImage`]: builds OCI images from generated file trees and pushes them with `skopeo`.
//!
//! It deliberately contains no Hermes logic: tests compare what Hermes reads back against what
//! these helpers wrote. A missing tool is an error whose message says what to install; tests must
//! fail on it, never skip.
#![warn(missing_docs)]

mod error;
mod image;
mod probe;
mod proxy;
mod registry;

pub use error::{Error, Result};
pub use image::{LayerInfo, PushedImage, PushedIndex, TestImage};
pub use proxy::{Fault, FaultProxy, FaultRule, LoggedRequest};
pub use registry::Registry;
