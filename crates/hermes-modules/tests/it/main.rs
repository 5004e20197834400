//! Integration tests of hermes-modules with real processes: loader scripts, init phases, the
//! supervisor, target processes that leak or saw-tooth, and C programs run under the LD_PRELOAD
//! interposer. The `hermes modules …` commands as processes are tested with the `hermes` binary
//! (`crates/hermes/tests/it/modules.rs`).

mod modules;
mod phases;
mod profiler;
mod resolve;
mod supervisor;
mod support;
