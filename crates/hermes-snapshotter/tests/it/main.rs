//! Integration tests: the core over a real store and root dir, the gRPC server on a real unix
//! socket driven by the generated client, and overlay mounts checked by mounting them.

mod containerd;
mod core;
mod grpc;
mod lazy;
mod mirrors;
mod sources;
mod support;
