//! Integration tests for hermes-ztoc (one binary, modules per concern).

mod golden;
mod roundtrip;
mod support;
