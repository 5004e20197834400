//! The Hermes controller's pure core: which running images a `HermesPolicy` wants indexed, the
//! build queue that indexes their layers once each, and the reconciler that turns the world
//! (policies, running containers, store contents, queue) into actions and statuses.
//!
//! - [`policy`]: the `HermesPolicy` model, parsed from YAML and validated;
//! - [`selector`]: Kubernetes label selectors;
//! - [`modules`]: a policy's `memoryModules` (which pods get memory modules);
//! - [`pattern`]: image globs over `registry/repo[:tag]` and digest pins;
//! - [`matcher`]: the policy that applies to a running container (most specific wins, `Off`
//!   is a kill switch);
//! - [`queue`]: the [`BuildQueue`](queue::BuildQueue), deduplicated by manifest and layer digest;
//! - [`reconcile`]: the reconciler, a function of its inputs;
//! - [`prefetch`]: startup read traces merged into per-layer prefetch profiles;
//! - [`starts`]: nodes' pull reports as pod starts: attribution, counters, the last pods.
//!
//! Everything here is a plain function over values: no I/O, no clock (time is passed in), no
//! async runtime, no registry client. The engine that carries out the reconciler's actions, the
//! node API and the adapters are `hermes-controller`, `hermes-standalone` and `hermes-kube`.
#![warn(missing_docs)]

mod error;
pub mod matcher;
pub mod modules;
pub mod pattern;
pub mod policy;
pub mod prefetch;
pub mod queue;
pub mod reconcile;
pub mod selector;
pub mod starts;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use error::{Error, Result, chain};
