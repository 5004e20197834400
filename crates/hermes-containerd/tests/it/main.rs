//! Integration tests for hermes-containerd against a real containerd (hermes-testkit), one binary.

mod cri;
mod running;
