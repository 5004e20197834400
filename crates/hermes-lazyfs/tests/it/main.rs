//! Integration tests of hermes-lazyfs: the span cache, the reader, the background fetcher and
//! real FUSE mounts. The FUSE tests need root and /dev/fuse and fail (never skip) without them.

mod background;
mod cache;
mod fs;
mod layer;
mod passthrough;
mod prefetch;
mod reader;
