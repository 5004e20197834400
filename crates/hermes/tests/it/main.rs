//! The `hermes` binary end to end: real processes, real files.

mod controller;
mod index;
mod layer;
mod modules;
mod node;
mod ztoc;
