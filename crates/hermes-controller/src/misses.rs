//! Nodes' misses as the engine keeps them: each (image, node) a node reported counts as a
//! running container until its time to live passes.
//!
//! Bounded: at most `capacity` entries. When the table is full a new (image, node) is refused
//! while the ones already kept are still refreshed, so reports from hostile or broken nodes
//! cannot grow the controller's memory and cannot push out the misses it already counts.
//! Which misses are worth keeping at all (a policy covers the image) is the engine's decision,
//! not this table's.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use hermes_node_api::PodRef;
use hermes_oci::{Digest, Reference};

use crate::matcher::{RunningContainer, miss_container};

/// Default of [`EngineOptions::max_misses`](crate::engine::EngineOptions::max_misses): about
/// 2 KiB each at the API's length limits, so at most some 8 MiB.
pub const DEFAULT_MAX_MISSES: usize = 4096;

/// What [`MissTable::record`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// A new entry.
    Added,
    /// An entry already kept: its time to live starts again.
    Refreshed,
    /// The table is full: the miss was not kept.
    Full,
}

/// The misses counted as running containers.
#[derive(Debug, Clone)]
pub struct MissTable {
    capacity: usize,
    ttl: Duration,
    entries: BTreeMap<(String, String), (RunningContainer, SystemTime)>,
}

impl MissTable {
    /// A table of at most `capacity` misses, each kept for `ttl` after its last report.
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        Self {
            capacity,
            ttl,
            entries: BTreeMap::new(),
        }
    }

    /// Keep that `node` started `image` (resolved to `digest`) at `now`, for `pod` if the node
    /// named it (its namespace and labels then count for policies' selectors).
    pub fn record(
        &mut self,
        image: Reference,
        node: &str,
        digest: Digest,
        pod: Option<&PodRef>,
        now: SystemTime,
    ) -> Recorded {
        let key = (image.to_string(), node.to_owned());
        let until = now + self.ttl;
        let container = miss_container(&image, Some(&digest), pod, &format!("miss/{node}"));
        if let Some(kept) = self.entries.get_mut(&key) {
            *kept = (container, until);
            return Recorded::Refreshed;
        }
        if self.entries.len() >= self.capacity {
            return Recorded::Full;
        }
        self.entries.insert(key, (container, until));
        Recorded::Added
    }

    /// Forget the misses whose time to live has passed at `now`.
    pub fn expire(&mut self, now: SystemTime) {
        self.entries.retain(|_, (_, until)| *until > now);
    }

    /// The kept misses as running containers.
    pub fn containers(&self) -> impl Iterator<Item = &RunningContainer> {
        self.entries.values().map(|(c, _)| c)
    }

    /// How many misses are kept.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hermes_controller_core::testing::digest;

    fn image(name: &str) -> Reference {
        Reference::parse(name).unwrap()
    }

    #[test]
    fn a_full_table_refuses_new_misses_but_refreshes_kept_ones() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let mut table = MissTable::new(2, Duration::from_secs(60));
        assert_eq!(
            table.record(image("r.test/a:1"), "n1", digest(1), None, t0),
            Recorded::Added
        );
        assert_eq!(
            table.record(image("r.test/a:1"), "n2", digest(1), None, t0),
            Recorded::Added
        );
        for node in ["n3", "n4"] {
            assert_eq!(
                table.record(image("r.test/a:1"), node, digest(1), None, t0),
                Recorded::Full
            );
        }
        assert_eq!(table.len(), 2);
        // n1 reports again later: kept past the first time to live; n2 expires.
        let later = t0 + Duration::from_secs(50);
        assert_eq!(
            table.record(image("r.test/a:1"), "n1", digest(1), None, later),
            Recorded::Refreshed
        );
        table.expire(t0 + Duration::from_secs(70));
        let pods: Vec<&str> = table.containers().map(|c| c.pod.as_str()).collect();
        assert_eq!(pods, ["miss/n1"]);
        // Room again.
        assert_eq!(
            table.record(image("r.test/b:1"), "n3", digest(2), None, later),
            Recorded::Added
        );
    }
}
