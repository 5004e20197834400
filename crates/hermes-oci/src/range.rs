//! A blocking [`RangeReader`] over a registry blob, for the synchronous readers (the lazy
//! filesystem's span fetches, `hermes ztoc`-style extraction): each `read_at` is one HTTP range
//! GET through the async client, with its authentication, retries and mirrors.

use std::fmt;
use std::sync::Arc;

use hermes_ztoc::{RangeReader, Ztoc};

use crate::{Client, Digest, Reference};

/// Judges the bytes a mirror served for a range starting at the given offset.
type MirrorCheck = Arc<dyn Fn(u64, &[u8]) -> bool + Send + Sync>;

/// Range reads of one blob. Call `read_at` from threads that are not tokio workers (FUSE
/// threads, `spawn_blocking`): it blocks on the given runtime.
#[derive(Clone)]
pub struct RegistryRangeReader {
    client: Client,
    reference: Reference,
    digest: Digest,
    runtime: tokio::runtime::Handle,
    mirror_check: Option<MirrorCheck>,
}

impl fmt::Debug for RegistryRangeReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryRangeReader")
            .field("reference", &self.reference)
            .field("digest", &self.digest)
            .field("mirror_check", &self.mirror_check.is_some())
            .finish_non_exhaustive()
    }
}

impl RegistryRangeReader {
    /// A reader of `digest` in `reference`'s repository.
    pub fn new(
        client: Client,
        reference: Reference,
        digest: Digest,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        Self {
            client,
            reference,
            digest,
            runtime,
            mirror_check: None,
        }
    }

    /// Checks what mirrors serve with `check(offset, bytes)` before returning it (see
    /// [`Client::blob_range_verified`]): bytes it refuses send the read to the next host.
    pub fn with_mirror_check(
        mut self,
        check: impl Fn(u64, &[u8]) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.mirror_check = Some(Arc::new(check));
        self
    }

    /// Checks what mirrors serve against the blob's zTOC: every span wholly inside a read must
    /// match its digest. (Bytes outside spans, the gzip header, have only the layer digest,
    /// which the background fetch checks.) This costs one more SHA-256 of mirrored bytes and
    /// is what makes a wrong mirror a retry at the next host instead of a broken layer.
    pub fn with_span_check(self, ztoc: Arc<Ztoc>) -> Self {
        self.with_mirror_check(move |offset, bytes| spans_verify(&ztoc, offset, bytes))
    }
}

/// Whether every span of `ztoc` wholly inside `bytes` (read at `offset`) matches its digest.
fn spans_verify(ztoc: &Ztoc, offset: u64, bytes: &[u8]) -> bool {
    let end = offset.saturating_add(bytes.len() as u64);
    // The first span that ends after `offset` (compressed ranges ascend with the id).
    let (mut lo, mut hi) = (0, ztoc.span_count());
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match ztoc.span(mid) {
            Some(span) if span.compressed.end <= offset => lo = mid + 1,
            _ => hi = mid,
        }
    }
    let mut id = lo;
    while let Some(span) = ztoc.span(id) {
        if span.compressed.start >= end {
            break;
        }
        if span.compressed.start >= offset && span.compressed.end <= end {
            let at = (span.compressed.start - offset) as usize;
            let to = (span.compressed.end - offset) as usize;
            if ztoc.verify_span(&span, &bytes[at..to]).is_err() {
                return false;
            }
        }
        id += 1;
    }
    true
}

impl RangeReader for RegistryRangeReader {
    fn read_at(&self, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
        let check = |bytes: &[u8]| self.mirror_check.as_ref().is_none_or(|c| c(offset, bytes));
        self.runtime
            .block_on(self.client.blob_range_verified(
                &self.reference,
                &self.digest,
                offset,
                len,
                &check,
            ))
            .map(|b| b.to_vec())
            .map_err(std::io::Error::other)
    }
}
