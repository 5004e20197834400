//! The memory module installer: decides at start-up which memory sidecar modules a workload
//! gets, keeps that decision stable across init phases, and runs the modules.
//!
//! - [`directive`]: the loader script's output language (`module=NAME[,config=PROFILE][,K=V…]`);
//! - [`catalog`]: the module catalog (built-in modules and tuning profiles), directive validation;
//! - [`static_config`]: `modules.yaml`, `HERMES_MODULES`, `onScriptError`;
//! - [`script`]: running the loader script (shell, timeout, process group, bounded output);
//! - [`resolve`] and [`plan`]: resolution and the phase-idempotent state file;
//! - [`supervisor`], [`modules`], [`procfs`], [`trend`], [`metrics`]: running the built-in
//!   modules on real processes, `/metrics` and JSON reports.
//!
//! Dependencies between the modules point one way, down from the entry points `resolve` and
//! `supervisor` to `error`; nothing points back up:
//!
//! ```text
//! resolve ──> plan, script, static_config, catalog, directive
//! supervisor ──> modules, plan, procfs, metrics, resolve (for error text)
//! modules ──> catalog, procfs, trend, metrics
//! static_config ──> catalog, directive, yaml
//! plan ──> catalog
//! catalog ──> directive, yaml
//! directive, yaml, script, procfs, metrics ──> error (which holds `Origin`); trend: none
//! ```
//!
//! What is deliberately not here: the admission webhook that injects the installer into pods is
//! cluster-side and lives in `hermes-kube` (`hermes_kube::webhook`); the LD_PRELOAD interposer is
//! `hermes-memprof`.
//!
//! The command line (`hermes modules …`, clap) is the `hermes` binary's: it fills the plain
//! option structs here ([`resolve::ResolveOptions`], [`supervisor::RunOptions`]).
#![warn(missing_docs)]

pub mod catalog;
pub mod directive;
mod error;
pub mod metrics;
pub mod modules;
pub mod plan;
pub mod procfs;
pub mod resolve;
pub mod script;
pub mod static_config;
pub mod supervisor;
pub mod trend;
mod yaml;

pub use error::{At, Error, Result, SyntaxProblem};
