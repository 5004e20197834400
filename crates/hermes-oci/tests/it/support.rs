//! Shared helpers.

use std::time::Duration;

use hermes_oci::{
    Client, ClientOptions, Credentials, Digest, IndexOptions, Reference, RetryPolicy,
};

/// A client for plain-HTTP loopback registries with quick retries.
pub fn client(credentials: Credentials) -> Client {
    Client::new(ClientOptions {
        plain_http: true,
        credentials,
        retry: RetryPolicy {
            max_attempts: 6,
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(200),
            max_retry_after: Duration::from_secs(5),
        },
        read_timeout: Duration::from_secs(2),
        upload_chunk_size: 1 << 20,
        ..ClientOptions::default()
    })
    .expect("client")
}

pub fn options(min_layer_size: u64, span_size: u64) -> IndexOptions {
    IndexOptions {
        min_layer_size,
        span_size,
        ..IndexOptions::default()
    }
}

pub fn reference(s: &str) -> Reference {
    Reference::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
}

pub fn digest(s: &str) -> Digest {
    Digest::parse(s).expect("digest")
}
