//! Integration tests for hermes-testkit: every part proven with real traffic (one binary, modules
//! per part).

mod cleanup;
mod containerd;
mod image;
mod proxy;
mod registry;
mod support;
