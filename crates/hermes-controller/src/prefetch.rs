//! Startup prefetch profiles: nodes report which spans of each layer a container read during
//! startup (a trace, in read order); the controller merges recent traces per layer into one
//! profile that nodes prefetch on the next start.
//!
//! Merging: a span read by more traces comes first; among equals, the one read earlier on
//! average (mean position); then the lower span index. Only the most recent
//! [`MAX_TRACES_PER_LAYER`] traces of a layer count, so a changed workload takes over.
//! The book is pure; the node API keeps each layer's recent traces on disk next to the
//! artifact store ([`ProfileBook::traces`], [`ProfileBook::restore`]) so a restart loses none.

use std::collections::{BTreeMap, VecDeque};

use hermes_oci::Digest;
use serde::{Deserialize, Serialize};

/// Traces kept per layer.
pub const MAX_TRACES_PER_LAYER: usize = 16;
/// Spans accepted per trace (larger traces are cut).
pub const MAX_SPANS_PER_TRACE: usize = 65_536;

/// One node's report: per layer, span indices in the order they were first read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TraceReport {
    /// Reporting node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Layer digest → span indices in read order.
    pub layers: BTreeMap<Digest, Vec<u32>>,
}

/// The merged profile of a layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PrefetchProfile {
    /// The layer.
    pub layer: Digest,
    /// Spans to prefetch, most important first.
    pub spans: Vec<u32>,
    /// How many traces were merged.
    pub traces: usize,
}

/// Recent traces per layer.
#[derive(Debug, Clone, Default)]
pub struct ProfileBook {
    traces: BTreeMap<Digest, VecDeque<Vec<u32>>>,
}

impl ProfileBook {
    /// Add a report's traces (duplicates within a trace keep their first position).
    pub fn add(&mut self, report: TraceReport) {
        for (layer, spans) in report.layers {
            let mut seen = std::collections::BTreeSet::new();
            let trace: Vec<u32> = spans
                .into_iter()
                .filter(|s| seen.insert(*s))
                .take(MAX_SPANS_PER_TRACE)
                .collect();
            if trace.is_empty() {
                continue;
            }
            let kept = self.traces.entry(layer).or_default();
            if kept.len() == MAX_TRACES_PER_LAYER {
                kept.pop_front();
            }
            kept.push_back(trace);
        }
    }

    /// The recent traces of a layer, oldest first.
    pub fn traces(&self, layer: &Digest) -> Vec<Vec<u32>> {
        self.traces
            .get(layer)
            .map(|t| t.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Put back a layer's traces saved earlier (the most recent [`MAX_TRACES_PER_LAYER`],
    /// each cut to [`MAX_SPANS_PER_TRACE`]), replacing what the book holds for it.
    pub fn restore(&mut self, layer: Digest, traces: Vec<Vec<u32>>) {
        let skip = traces.len().saturating_sub(MAX_TRACES_PER_LAYER);
        let kept: VecDeque<Vec<u32>> = traces
            .into_iter()
            .skip(skip)
            .map(|mut t| {
                t.truncate(MAX_SPANS_PER_TRACE);
                t
            })
            .filter(|t| !t.is_empty())
            .collect();
        if kept.is_empty() {
            self.traces.remove(&layer);
        } else {
            self.traces.insert(layer, kept);
        }
    }

    /// The merged profile of a layer, if any trace covers it.
    pub fn profile(&self, layer: &Digest) -> Option<PrefetchProfile> {
        let traces = self.traces.get(layer)?;
        // span → (traces containing it, sum of positions)
        let mut stats: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
        for trace in traces {
            for (pos, span) in trace.iter().enumerate() {
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

    #[test]
    fn reports_parse_with_digest_keys_and_reject_unknown_fields() {
        let ok = format!(r#"{{"node":"n1","layers":{{"{}":[3,1]}}}}"#, digest(1));
        let r: TraceReport = serde_json::from_str(&ok).unwrap();
        assert_eq!(r.layers[&digest(1)], vec![3, 1]);
        assert!(serde_json::from_str::<TraceReport>(r#"{"layers":{"sha256:x":[1]}}"#).is_err());
        assert!(serde_json::from_str::<TraceReport>(r#"{"layers":{},"x":1}"#).is_err());
    }
}
