//! Startup prefetch profiles: nodes report which spans of each layer a container read during
//! startup (a trace, in read order); the controller merges recent traces per layer into one
//! profile that nodes prefetch on the next start.
//!
//! Merging: a span read by more traces comes first; among equals, the one read earlier on
//! average (mean position); then the lower span index. Only the most recent
//! [`ProfileLimits::traces_per_layer`] traces of a layer count, so a changed workload takes
//! over. The book is pure; the node API keeps each layer's recent traces on disk next to the
//! artifact store ([`ProfileBook::traces`], [`ProfileBook::restore`]) so a restart loses none.
//!
//! Bounded ([`ProfileLimits`]): spans per trace, traces per layer, layers, spans in all and
//! spans per reporting node. A node over its quota loses its own oldest traces; a full book
//! drops the oldest traces (and least recently traced layers) of all. The saved files hold
//! exactly what the book keeps, so the same limits bound them on disk.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

// The wire types of traces and profiles are the node-API contract's.
pub use hermes_node_api::{PrefetchProfile, TraceReport};
use hermes_oci_types::Digest;
use serde::{Deserialize, Serialize};

/// Default of [`ProfileLimits::traces_per_layer`].
pub const MAX_TRACES_PER_LAYER: usize = 16;
/// Default of [`ProfileLimits::spans_per_trace`] (longer traces are cut).
pub const MAX_SPANS_PER_TRACE: usize = 65_536;
/// Default of [`ProfileLimits::layers`].
pub const MAX_PROFILED_LAYERS: usize = 4096;
/// Default of [`ProfileLimits::spans`]: 8 MiB of span indices in memory; saved as JSON at most
/// 11 bytes each (about 23 MB), plus each trace's node name.
pub const MAX_KEPT_SPANS: usize = 2 << 20;
/// Default of [`ProfileLimits::spans_per_node`]: four traces of the longest kind, or hundreds of
/// ordinary ones.
pub const MAX_SPANS_PER_NODE: usize = 256 << 10;

/// What the [`ProfileBook`] keeps at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProfileLimits {
    /// Recent traces kept per layer; an older one gives way to a new one.
    pub traces_per_layer: usize,
    /// Spans kept of one trace; the rest of a longer trace is cut.
    pub spans_per_trace: usize,
    /// Layers with traces; a new layer pushes out the least recently traced one.
    pub layers: usize,
    /// Spans kept in all; a new trace pushes out the oldest ones of any node.
    pub spans: usize,
    /// Spans kept from one node (nodes that do not name themselves share one quota); a new
    /// trace pushes out the node's own oldest ones.
    pub spans_per_node: usize,
}

impl Default for ProfileLimits {
    fn default() -> Self {
        Self {
            traces_per_layer: MAX_TRACES_PER_LAYER,
            spans_per_trace: MAX_SPANS_PER_TRACE,
            layers: MAX_PROFILED_LAYERS,
            spans: MAX_KEPT_SPANS,
            spans_per_node: MAX_SPANS_PER_NODE,
        }
    }
}

/// One kept trace, as saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeptTrace {
    /// Order of arrival (greater is more recent), also across restarts.
    pub seq: u64,
    /// The node that reported it (empty if it did not say).
    #[serde(default)]
    pub node: String,
    /// Span indices in first-read order.
    pub spans: Vec<u32>,
}

/// What adding traces changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Added {
    /// Layers whose kept traces changed (added to, or pushed out of).
    pub changed: BTreeSet<Digest>,
    /// Traces pushed out by a quota or a full book (not the normal turnover of a layer's
    /// [`ProfileLimits::traces_per_layer`]).
    pub evicted: usize,
}

/// Recent traces per layer, within [`ProfileLimits`].
#[derive(Debug, Clone, Default)]
pub struct ProfileBook {
    limits: ProfileLimits,
    layers: BTreeMap<Digest, VecDeque<KeptTrace>>,
    /// Every kept trace by `seq`, oldest first: where to find it.
    by_age: BTreeMap<u64, Digest>,
    /// Per node: spans kept and the `seq` of each trace.
    nodes: BTreeMap<String, (usize, BTreeSet<u64>)>,
    spans: usize,
    next_seq: u64,
}

impl ProfileBook {
    /// An empty book keeping at most `limits`.
    pub fn new(limits: ProfileLimits) -> Self {
        Self {
            limits,
            ..Self::default()
        }
    }

    /// Add a report's traces (duplicates within a trace keep their first position).
    pub fn add(&mut self, report: TraceReport) -> Added {
        let node = report.node.unwrap_or_default();
        let mut added = Added::default();
        for (layer, spans) in report.layers {
            let mut seen = BTreeSet::new();
            let spans: Vec<u32> = spans
                .into_iter()
                .filter(|s| seen.insert(*s))
                .take(self.limits.spans_per_trace)
                .collect();
            let seq = self.next_seq;
            self.insert(
                layer,
                KeptTrace {
                    seq,
                    node: node.clone(),
                    spans,
                },
                &mut added,
            );
        }
        added
    }

    /// The recent traces of a layer, oldest first.
    pub fn traces(&self, layer: &Digest) -> Vec<KeptTrace> {
        self.layers
            .get(layer)
            .map(|t| t.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Put back traces saved earlier, within the limits as if they arrived again in their
    /// order (so a smaller limit after a restart keeps the most recent).
    pub fn restore(&mut self, mut saved: Vec<(Digest, KeptTrace)>) -> Added {
        saved.sort_by_key(|(_, t)| t.seq);
        let mut added = Added::default();
        for (layer, mut trace) in saved {
            // Numbered again in their order: files may repeat or skip numbers.
            trace.seq = self.next_seq;
            trace.spans.truncate(self.limits.spans_per_trace);
            self.insert(layer, trace, &mut added);
        }
        added
    }

    /// How many spans the book keeps in all.
    pub fn span_count(&self) -> usize {
        self.spans
    }

    /// How many layers have traces.
    pub fn layer_count(&self) -> usize {
        self.layers.len()
    }

    fn insert(&mut self, layer: Digest, trace: KeptTrace, added: &mut Added) {
        let len = trace.spans.len();
        // A trace no quota can hold is not kept (only with limits smaller than a trace).
        if len == 0 || len > self.limits.spans_per_node.min(self.limits.spans) {
            return;
        }
        self.next_seq = self.next_seq.max(trace.seq + 1);
        // The layer's own turnover first: its oldest trace gives way.
        if let Some(oldest) = self
            .layers
            .get(&layer)
            .filter(|kept| kept.len() >= self.limits.traces_per_layer)
            .and_then(|kept| kept.front().map(|t| t.seq))
        {
            self.remove(oldest, added);
        }
        while self
            .nodes
            .get(&trace.node)
            .is_some_and(|(n, _)| n + len > self.limits.spans_per_node)
        {
            let Some(oldest) = self
                .nodes
                .get(&trace.node)
                .and_then(|(_, seqs)| seqs.first().copied())
            else {
                break;
            };
            self.remove(oldest, added);
            added.evicted += 1;
        }
        if !self.layers.contains_key(&layer) && self.layers.len() >= self.limits.layers {
            // The layer traced least recently goes, with all its traces.
            let stale = self
                .layers
                .iter()
                .min_by_key(|(_, kept)| kept.back().map_or(0, |t| t.seq))
                .map(|(l, kept)| (l.clone(), kept.iter().map(|t| t.seq).collect::<Vec<_>>()));
            if let Some((_, seqs)) = stale {
                for seq in seqs {
                    self.remove(seq, added);
                    added.evicted += 1;
                }
            }
        }
        while self.spans + len > self.limits.spans {
            let Some(oldest) = self.by_age.keys().next().copied() else {
                break;
            };
            self.remove(oldest, added);
            added.evicted += 1;
        }
        self.spans += len;
        let usage = self.nodes.entry(trace.node.clone()).or_default();
        usage.0 += len;
        usage.1.insert(trace.seq);
        self.by_age.insert(trace.seq, layer.clone());
        let kept = self.layers.entry(layer.clone()).or_default();
        // Restored traces may come in any order within a layer: keep it sorted by seq.
        let at = kept.partition_point(|t| t.seq < trace.seq);
        kept.insert(at, trace);
        added.changed.insert(layer);
    }

    /// Forget the trace `seq`.
    fn remove(&mut self, seq: u64, added: &mut Added) {
        let Some(layer) = self.by_age.remove(&seq) else {
            return;
        };
        let Some(kept) = self.layers.get_mut(&layer) else {
            return;
        };
        if let Some(at) = kept.iter().position(|t| t.seq == seq)
            && let Some(trace) = kept.remove(at)
        {
            self.spans -= trace.spans.len();
            if let Some(usage) = self.nodes.get_mut(&trace.node) {
                usage.0 -= trace.spans.len();
                usage.1.remove(&seq);
                if usage.1.is_empty() {
                    self.nodes.remove(&trace.node);
                }
            }
        }
        if kept.is_empty() {
            self.layers.remove(&layer);
        }
        added.changed.insert(layer);
    }

    /// The merged profile of a layer, if any trace covers it.
    pub fn profile(&self, layer: &Digest) -> Option<PrefetchProfile> {
        let traces = self.layers.get(layer)?;
        // span → (traces containing it, sum of positions)
        let mut stats: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
        for trace in traces {
            for (pos, span) in trace.spans.iter().enumerate() {
                let e = stats.entry(*span).or_default();
                e.0 += 1;
                e.1 += pos as u64;
            }
        }
        let mut spans: Vec<(u32, u64, u64)> =
            stats.into_iter().map(|(s, (n, sum))| (s, n, sum)).collect();
        // More traces first; then lower mean position (sum/n compared without division).
        spans.sort_by(|a, b| {
            b.1.cmp(&a.1)
                .then_with(|| {
                    (u128::from(a.2) * u128::from(b.1)).cmp(&(u128::from(b.2) * u128::from(a.1)))
                })
                .then_with(|| a.0.cmp(&b.0))
        });
        Some(PrefetchProfile {
            layer: layer.clone(),
            spans: spans.into_iter().map(|(s, _, _)| s).collect(),
            traces: traces.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::tests::digest;

    fn report(layer: u8, spans: &[u32]) -> TraceReport {
        TraceReport {
            node: None,
            layers: [(digest(layer), spans.to_vec())].into(),
        }
    }

    #[test]
    fn common_spans_first_then_earlier_reads() {
        let mut book = ProfileBook::default();
        book.add(report(1, &[5, 1, 9, 5]));
        book.add(report(1, &[1, 5, 7]));
        book.add(report(1, &[1, 2]));
        let p = book.profile(&digest(1)).unwrap();
        // 1: 3 traces; 5: 2 traces (mean pos 0.5); 9 (pos 2), 7 (pos 2), 2 (pos 1): 1 trace each.
        assert_eq!(p.spans, vec![1, 5, 2, 7, 9]);
        assert_eq!(p.traces, 3);
        assert_eq!(book.profile(&digest(2)), None);
    }

    #[test]
    fn only_recent_traces_count() {
        let mut book = ProfileBook::default();
        book.add(report(1, &[100]));
        for _ in 0..MAX_TRACES_PER_LAYER {
            book.add(report(1, &[7]));
        }
        let p = book.profile(&digest(1)).unwrap();
        assert_eq!((p.spans, p.traces), (vec![7], MAX_TRACES_PER_LAYER));
    }

    fn node_report(node: &str, layer: u8, spans: &[u32]) -> TraceReport {
        TraceReport {
            node: Some(node.to_owned()),
            ..report(layer, spans)
        }
    }

    fn limits(spans: usize, spans_per_node: usize, layers: usize) -> ProfileLimits {
        ProfileLimits {
            traces_per_layer: 4,
            spans_per_trace: 4,
            layers,
            spans,
            spans_per_node,
        }
    }

    #[test]
    fn a_node_over_its_quota_loses_its_own_oldest_traces() {
        let mut book = ProfileBook::new(limits(100, 8, 100));
        book.add(node_report("quiet", 1, &[1]));
        for layer in 2..10 {
            book.add(node_report("loud", layer, &[1, 2, 3, 4, 5, 6]));
        }
        // Cut to 4 spans each: the two most recent traces of "loud" fill its quota of 8.
        let added = book.add(node_report("loud", 10, &[7, 8, 9]));
        assert_eq!(added.evicted, 1);
        assert_eq!(
            added.changed,
            [digest(8), digest(10)].into(),
            "the evicted trace's layer changed too"
        );
        assert!(book.profile(&digest(8)).is_none());
        assert_eq!(book.profile(&digest(9)).unwrap().spans, vec![1, 2, 3, 4]);
        assert_eq!(book.profile(&digest(10)).unwrap().spans, vec![7, 8, 9]);
        assert_eq!(book.profile(&digest(1)).unwrap().spans, vec![1]);
        assert_eq!(book.span_count(), 8);
    }

    #[test]
    fn a_full_book_drops_the_oldest_traces_and_the_least_recently_traced_layers() {
        let mut book = ProfileBook::new(limits(10, 100, 3));
        for (node, layer) in [("a", 1), ("b", 2), ("c", 3)] {
            book.add(node_report(node, layer, &[1, 2, 3]));
        }
        book.add(node_report("a", 1, &[4]));
        // A fourth layer: layer 2 was traced least recently and goes.
        let added = book.add(node_report("d", 4, &[5]));
        assert_eq!((added.evicted, book.layer_count()), (1, 3));
        assert!(book.profile(&digest(2)).is_none());
        // 3 + 1 + 3 + 1 spans kept; 4 more push out the oldest trace (layer 1's first) to fit
        // in 10.
        let added = book.add(node_report("e", 4, &[6, 7, 8, 9]));
        assert_eq!(added.evicted, 1);
        assert_eq!(added.changed, [digest(1), digest(4)].into());
        assert_eq!(book.span_count(), 9);
        assert_eq!(book.profile(&digest(1)).unwrap().spans, vec![4]);
        assert_eq!(book.profile(&digest(3)).unwrap().spans, vec![1, 2, 3]);
    }

    #[test]
    fn restored_traces_keep_their_order_within_smaller_limits() {
        let mut book = ProfileBook::new(limits(100, 100, 100));
        for layer in 1..=3 {
            book.add(node_report("n", layer, &[u32::from(layer)]));
        }
        let mut saved: Vec<(Digest, KeptTrace)> = (1..=3)
            .flat_map(|l| {
                book.traces(&digest(l))
                    .into_iter()
                    .map(move |t| (digest(l), t))
            })
            .collect();
        saved.reverse();
        let mut smaller = ProfileBook::new(limits(100, 100, 2));
        smaller.restore(saved);
        assert_eq!(smaller.layer_count(), 2);
        assert!(
            smaller.profile(&digest(1)).is_none(),
            "the oldest layer goes"
        );
        // New traces come after the restored ones.
        smaller.add(node_report("n", 4, &[4]));
        assert!(smaller.profile(&digest(2)).is_none());
        assert!(smaller.profile(&digest(3)).is_some());
    }

    #[test]
    fn reports_parse_with_digest_keys_and_reject_unknown_fields() {
        let ok = format!(r#"{{"node":"n1","layers":{{"{}":[3,1]}}}}"#, digest(1));
        let r: TraceReport = serde_json::from_str(&ok).unwrap();
        assert_eq!(r.layers[&digest(1)], vec![3, 1]);
        assert!(serde_json::from_str::<TraceReport>(r#"{"layers":{"sha256:x":[1]}}"#).is_err());
        assert!(serde_json::from_str::<TraceReport>(r#"{"layers":{},"x":1}"#).is_err());
    }
}
