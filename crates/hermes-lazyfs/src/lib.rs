//! A lazy, read-only view of one image layer, backed by a span cache on local disk.
//!
//! Given a layer's zTOC and a [`RangeReader`](hermes_ztoc::RangeReader) over its blob:
//! - [`SpanCache`] keeps decoded spans in a sparse file plus a persisted bitmap of present spans;
//! - [`LayerReader`] serves tar byte ranges from the cache and fetches missing spans on demand
//!   (coalesced range reads, verification before use, single flight per span, broken on a
//!   repeated mismatch);
//! - [`BackgroundFetcher`] fetches the rest in the background, yielding to reads, and checks the
//!   whole blob's digest before declaring the layer [`LayerState::FullyLocal`];
//! - [`mount`] presents the layer as a read-only FUSE filesystem, whiteouts as overlayfs
//!   expects of a lower directory, and prefetches an opened file's spans ahead of its reads
//!   ([`OpenPrefetch`]), with concurrent range requests bounded by a [`FetchLimit`].
//!   Once the layer is fully local it can hand files to the kernel by FUSE passthrough
//!   ([`MountOptions::passthrough`]: per-file copies that replace the files' bytes in the
//!   span cache).
//!
//! It deliberately does not talk to registries, containerd or the controller: callers pass the
//! range reader and decide where caches live and when layers are mounted.

#![warn(missing_docs)]

mod background;
mod cache;
mod error;
mod fuse;
mod local;
mod prefetch;
mod reader;
mod tree;

pub use background::{BackgroundFetcher, DEFAULT_FAST_PARALLEL, LayerDigest, Outcome, Pace, QUIET};
pub use cache::{FLUSH_INTERVAL, SpanCache};
pub use error::{BrokenReason, Error, Result};
pub use fuse::{MountHandle, MountOptions, PassthroughStats, mount, mount_entries, mount_with};
pub use prefetch::OpenPrefetch;
pub use reader::{
    DEFAULT_FETCH_LIMIT, FetchLimit, LatencyHistogram, LayerReader, LayerState,
    READ_LATENCY_BOUNDS, ReaderStats, TracedBytes,
};
