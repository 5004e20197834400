//! What the [`Engine`](crate::engine::Engine) tells the outside world, as a trait: the node
//! API ([`NodeApi`]) in production, a recorder in tests. The engine takes nodes' misses from a
//! channel (`mpsc::Receiver<Miss>`) and never sees HTTP.

use std::fmt;

use crate::api::{BuildOutcome, MissRefusal, NodeApi};
use crate::policy::Policy;
use crate::status::{ImageReport, PolicyReport};

/// Where the engine publishes statuses, the policies nodes must obey and its metrics.
pub trait Publisher: fmt::Debug + Send + Sync {
    /// The image reports, all of them, after every reconcile pass.
    fn images(&self, reports: Vec<ImageReport>);
    /// The policy statuses (valid and invalid), by name.
    fn policies(&self, reports: Vec<PolicyReport>);
    /// The valid policies: nodes are refused images an `Off` policy matches.
    fn active_policies(&self, policies: Vec<Policy>);
    /// The span sizes zTOCs are built with (those of the current policies).
    fn span_sizes(&self, span_sizes: Vec<u64>);
    /// A layer build ended: how, how long it took, bytes read from the registry.
    fn build_finished(&self, outcome: BuildOutcome, seconds: f64, bytes_read: u64);
    /// A node's miss was not counted as a running container, and why.
    fn miss_refused(&self, reason: MissRefusal);
    /// How many images the build queue holds.
    fn queue_depth(&self, images: usize);
}

impl Publisher for NodeApi {
    fn images(&self, reports: Vec<ImageReport>) {
        self.set_images(reports);
    }

    fn policies(&self, reports: Vec<PolicyReport>) {
        self.set_policies(reports);
    }

    fn active_policies(&self, policies: Vec<Policy>) {
        self.set_active_policies(policies);
    }

    fn span_sizes(&self, span_sizes: Vec<u64>) {
        self.set_span_sizes(span_sizes);
    }

    fn build_finished(&self, outcome: BuildOutcome, seconds: f64, bytes_read: u64) {
        self.metrics().record_build(outcome, seconds, bytes_read);
    }

    fn miss_refused(&self, reason: MissRefusal) {
        self.metrics().refuse_miss(reason);
    }

    fn queue_depth(&self, images: usize) {
        self.metrics()
            .queue_depth
            .set(i64::try_from(images).unwrap_or(i64::MAX));
    }
}
