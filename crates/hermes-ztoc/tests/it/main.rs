//! Integration tests for hermes-ztoc (one binary, modules per concern).

mod compat;
mod errors;
mod golden;
mod real_layers;
mod robustness;
mod roundtrip;
mod support;
