//! The `hermes` binary end to end: real processes, real files.

mod controller;
mod cri;
mod index;
mod kube;
mod kube_node;
mod layer;
mod modules;
mod node;
mod pull;
mod ztoc;
