//! The `hermes` binary end to end: real processes, real files.

mod controller;
mod cri;
mod index;
mod kube;
mod layer;
mod modules;
mod node;
mod node_api;
mod pull;
mod ztoc;
