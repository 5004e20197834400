//! Integration tests of hermes-modules with real processes: loader scripts, init phases as
//! separate processes, the supervisor binary, target processes that leak or saw-tooth, and C
//! programs run under the LD_PRELOAD interposer.

mod modules;
mod phases;
mod profiler;
mod resolve;
mod supervisor;
mod support;
mod webhook;
