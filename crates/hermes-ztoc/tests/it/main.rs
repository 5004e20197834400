//! Integration tests for hermes-ztoc (one binary, modules per concern).

mod alloc;
mod compat;
mod errors;
mod golden;
mod hostile;
mod real_layers;
mod robustness;
mod roundtrip;
mod support;
