//! The contract between the Hermes node daemon and the controller, in one small crate both
//! sides (and `hermes status`) build on, so neither spells a path, a header or a body shape by
//! hand:
//!
//! - [`paths`]: every node-API route, as the server's route pattern and as the client's path;
//! - the wire types: [`Miss`], [`PullReport`], [`TraceReport`], [`PrefetchProfile`], [`ZtocQuery`] and the
//!   bounds both sides hold them to ([`MAX_IMAGE_LEN`], [`MAX_TRACE_BODY`], …);
//! - the header rules: [`DISABLED_HEADER`] (a refused lazy start), [`etag`] and
//!   [`not_modified`] (the `If-None-Match` check a node's kept zTOC gets);
//! - [`client`]: the typed async client, with a deadline on every request and a cap on every
//!   body it reads;
//! - [`labels`]: the containerd label names the pull, the snapshotter and the containerd
//!   client share;
//! - [`error_chain`]: an error and its causes on one line, for logs and statuses.
//!
//! It holds no server and no policy: what the controller answers is decided in
//! `hermes-controller`, what the node does with the answer in `hermes-snapshotter`. Without the
//! default `http` feature only [`labels`] and [`error_chain`] are built, with no dependency;
//! the `wire` feature adds the wire types and header rules (no HTTP stack, no registry client).
#![warn(missing_docs)]

pub mod labels;

#[cfg(feature = "http")]
pub mod client;
#[cfg(feature = "http")]
pub mod paths;
#[cfg(feature = "wire")]
mod wire;

#[cfg(feature = "http")]
pub use client::{Client, ClientOptions, ZtocAnswer};
#[cfg(feature = "wire")]
pub use wire::*;

/// An error and its causes, `: `-separated, on one line (for logs, statuses and plans).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|l| l as _)
        }
    }

    #[test]
    fn error_chain_prints_every_cause_in_order() {
        let e = Layer(
            "cannot read config",
            Some(Box::new(Layer(
                "line 3",
                Some(Box::new(Layer("unknown key", None))),
            ))),
        );
        assert_eq!(error_chain(&e), "cannot read config: line 3: unknown key");
        assert_eq!(error_chain(&Layer("alone", None)), "alone");
    }
}
