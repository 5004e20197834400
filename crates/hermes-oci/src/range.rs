//! A blocking [`RangeReader`] over a registry blob, for the synchronous readers (the lazy
//! filesystem's span fetches, `hermes ztoc`-style extraction): each `read_at` is one HTTP range
//! GET through the async client, with its authentication and retries.

use hermes_ztoc::RangeReader;

use crate::{Client, Digest, Reference};

/// Range reads of one blob. Call `read_at` from threads that are not tokio workers (FUSE
/// threads, `spawn_blocking`): it blocks on the given runtime.
#[derive(Debug, Clone)]
pub struct RegistryRangeReader {
    client: Client,
    reference: Reference,
    digest: Digest,
    runtime: tokio::runtime::Handle,
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
        }
    }
}

impl RangeReader for RegistryRangeReader {
    fn read_at(&self, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
        self.runtime
            .block_on(
                self.client
                    .blob_range(&self.reference, &self.digest, offset, len),
            )
            .map(|b| b.to_vec())
            .map_err(std::io::Error::other)
    }
}
