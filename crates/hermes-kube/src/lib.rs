//! The Hermes controller's Kubernetes adapter (kube-rs): the `HermesPolicy` and `HermesImage`
//! custom resources, and the edge that feeds the controller core from the cluster and writes
//! its decisions back.
//!
//! - [`crd`]: the resource types; `deploy/crds/` is generated from them ([`crd::crds_yaml`]);
//! - [`view`]: cluster objects → the core's inputs (running containers, policies, pull secrets);
//! - [`status`]: the core's statuses → `HermesImage`/`HermesPolicy` status and pod Events;
//! - [`controller`]: leader election, watches feeding the core's engine
//!   (`hermes_controller::engine`), writing statuses and Events;
//! - [`run()`]: the whole Kubernetes mode (store, node API, controller) as the binary starts it;
//! - [`webhook`]: the memory modules' mutating admission webhook: the injection patch, which
//!   pods a HermesPolicy's `memoryModules` selects ([`webhook::selector`]) and its HTTPS server
//!   ([`webhook::server`]). The installer it injects is `hermes-modules`.
//!
//! Everything but [`controller`] and [`webhook::server`] is plain functions over values, tested
//! without a server; the loop is tested against a real kube-apiserver, the webhook's server with
//! real TLS clients (`tests/it`).
#![warn(missing_docs)]

pub mod controller;
pub mod crd;
mod error;
mod run;
pub mod status;
pub mod view;
pub mod webhook;

pub use error::{Error, Result};
pub use run::{Config, run};
