//! The controller loop with real parts: a real registry (behind the testkit's fault proxy), a
//! real store on disk and the node API over TCP. Running containers are given to the engine as
//! values (the adapters that watch containerd or Kubernetes are tested in their own crates).

mod engine;
mod mirror;
