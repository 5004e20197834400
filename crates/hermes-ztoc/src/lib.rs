//! SOCI-compatible zTOCs for unmodified image layers.
//!
//! A zTOC is a table of contents of a tar layer plus checkpoints into its compressed stream, so
//! that any file can be read by fetching and decoding only a few compressed byte ranges. This
//! crate:
//! - builds a zTOC from a layer stream in one pass ([`build`], or [`build_to`], which streams it
//!   out with memory independent of the layer's size): gzip (checkpoints with 32 KiB
//!   windows at deflate block boundaries), plain tar, and multi-frame zstd (a Hermes extension);
//!   a layer whose table of contents would pass the [`Limits`] (entries, name bytes, depth) is
//!   [`Error::NotIndexable`] and is pulled normally;
//!   tar headers are read as Go reads them, so entries are what containerd unpacks (a leading PAX
//!   global header skipped, GNU sparse files with their map: [`SparseMap`]);
//! - serializes and parses zTOCs byte-for-byte as soci-snapshotter does ([`Ztoc::to_bytes`],
//!   [`Ztoc::from_bytes`]); parsing untrusted bytes never panics and takes at most four times
//!   their size in memory;
//! - plans and performs random reads through a [`RangeReader`], verifying every span against the
//!   zTOC's digest before decoding it ([`Ztoc::plan`], [`Ztoc::read_planned`], [`Ztoc::extract`]);
//!   decoded spans grow with the bytes actually decoded, never to a length the zTOC claims.
//!
//! It is pure: `std::io` traits only, no async, no network, no files except through the caller
//! (a streamed build, [`build_to`], spills to unnamed files in a directory the caller names).

mod build;
mod entry;
mod error;
mod extract;
mod fbread;
mod gotar;
mod inflate;
mod limits;
mod sparse;
mod stream;
mod zinfo;
mod ztoc;

pub use build::{BuildOptions, Built, build, build_to, detect};
pub use entry::{Entry, EntryKind, XATTR_PAX_PREFIX, clean_path};
pub use error::{Error, Result};
pub use extract::{CountingReader, RangeReader, ReadPlan};
pub use limits::{DEFAULT_MAX_DEPTH, DEFAULT_MAX_ENTRIES, DEFAULT_MAX_NAME_BYTES, Limit, Limits};
pub use sparse::{Fragment, Piece, SparseMap};
pub use zinfo::{Compression, WINDOW_SIZE};
pub use ztoc::{DEFAULT_SPAN_SIZE, SOCI_BUILD_TOOL_IDENTIFIER, Span, SpanId, ZTOC_VERSION, Ztoc};
