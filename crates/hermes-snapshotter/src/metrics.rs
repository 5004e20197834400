//! The node daemon's Prometheus metrics, gathered at scrape time from the snapshotter's
//! fallback counters, the index lookups and every layer server's stats file. Labels are
//! bounded: reasons, sources, states, and layer digests (one per layer on the node).

use std::collections::HashMap;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::node_layers::{Miss, NodeLayers};
use crate::sources::{Lookup, Source};
use crate::{FallbackReason, Snapshots};

/// A histogram whose buckets were counted elsewhere (the layer servers).
#[derive(Debug)]
struct Buckets {
    sum: f64,
    count: u64,
    /// (upper bound, count in this bucket alone): the encoder makes them cumulative, so
    /// cumulative counts here would be summed twice.
    buckets: Vec<(f64, u64)>,
}

impl EncodeMetric for Buckets {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<NoLabelSet>(self.sum, self.count, &self.buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

type Labels = Vec<(&'static str, String)>;

fn counter_family(registry: &mut Registry, name: &str, help: &str, values: Vec<(Labels, u64)>) {
    let family = Family::<Labels, Counter>::default();
    for (labels, v) in values {
        family.get_or_create(&labels).inc_by(v);
    }
    registry.register(name, help, family);
}

/// Counts labelled `reason`.
fn by_reason<const N: usize>(counts: [(&str, u64); N]) -> Vec<(Labels, u64)> {
    counts
        .into_iter()
        .map(|(reason, n)| (vec![("reason", reason.to_owned())], n))
        .collect()
}

/// All layer servers' read latencies as one histogram: their per-bucket counts added up.
fn read_latency(stats: &[crate::LayerStats]) -> Buckets {
    let bounds = hermes_lazyfs::READ_LATENCY_BOUNDS;
    let mut counts = vec![0u64; bounds.len() + 1];
    let mut sum_micros = 0u64;
    for s in stats {
        for (c, v) in counts.iter_mut().zip(&s.read_latency_buckets) {
            *c = c.saturating_add(*v);
        }
        sum_micros = sum_micros.saturating_add(s.read_latency_sum_micros);
    }
    Buckets {
        sum: sum_micros as f64 / 1e6,
        count: counts.iter().fold(0u64, |a, &c| a.saturating_add(c)),
        buckets: bounds
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(counts)
            .collect(),
    }
}

/// The metrics in the OpenMetrics text format.
pub fn render(snapshots: &Snapshots, layers: &NodeLayers) -> String {
    let mut registry = Registry::with_prefix("hermes_node");

    counter_family(
        &mut registry,
        "fallbacks",
        "Layer prepares with CRI labels that became a normal pull, by reason",
        by_reason(FallbackReason::ALL.map(|r| (r.as_str(), snapshots.fallback_count(r)))),
    );
    counter_family(
        &mut registry,
        "lazy_misses",
        "Layers the lazy source did not mount, by reason",
        by_reason(Miss::ALL.map(|m| (m.as_str(), layers.miss_count(m)))),
    );
    let counters = layers.sources().counters();
    let mut lookups = Vec::new();
    for s in Source::ALL {
        for l in Lookup::ALL {
            lookups.push((
                vec![
                    ("source", s.as_str().to_owned()),
                    ("result", l.as_str().to_owned()),
                ],
                counters.get(s, l),
            ));
        }
    }
    counter_family(
        &mut registry,
        "index_lookups",
        "zTOC lookups by source and result",
        lookups,
    );
    let mounts = Counter::<u64>::default();
    mounts.inc_by(layers.mount_count());
    registry.register(
        "lazy_mounts",
        "Lazy layer mounts made (restart re-mounts included)",
        mounts,
    );

    let stats = layers.stats();
    let sum = |f: fn(&crate::LayerStats) -> u64| stats.iter().map(f).sum::<u64>();
    counter_family(
        &mut registry,
        "fetched_bytes",
        "Compressed bytes fetched from registries by lazy layers",
        vec![
            (
                vec![("mode", "on_demand".into())],
                sum(|s| s.bytes_on_demand),
            ),
            (
                vec![("mode", "background".into())],
                sum(|s| s.bytes_background),
            ),
        ],
    );
    counter_family(
        &mut registry,
        "range_requests",
        "Range requests sent to registries",
        vec![(vec![], sum(|s| s.range_requests))],
    );
    counter_family(
        &mut registry,
        "verify_failures",
        "Spans whose bytes did not match their digest",
        vec![(vec![], sum(|s| s.verify_failures))],
    );

    // By host name from containerd's hosts.toml (or the registry's own): bounded by the
    // configuration, and never a URL, so no credentials.
    let mut hosts: std::collections::BTreeMap<&str, [u64; 3]> = Default::default();
    for h in stats.iter().flat_map(|s| &s.registry_hosts) {
        let e = hosts.entry(h.host.as_str()).or_default();
        e[0] += h.requests;
        e[1] += h.bytes;
        e[2] += h.failures;
    }
    for (i, (name, help)) in [
        (
            "registry_host_requests",
            "HTTP requests lazy layers sent, by registry host (mirror or registry)",
        ),
        (
            "registry_host_bytes",
            "Blob bytes lazy layers received, by registry host",
        ),
        (
            "registry_host_failures",
            "Reads that failed at a registry host (and went to the next one), by host",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let values = hosts
            .iter()
            .map(|(host, v)| (vec![("host", (*host).to_owned())], v[i]))
            .collect();
        counter_family(&mut registry, name, help, values);
    }

    let states = Family::<Labels, Gauge>::default();
    let mut by_state: HashMap<&str, i64> = HashMap::new();
    for s in ["lazy", "fully_local", "broken"] {
        by_state.insert(s, 0);
    }
    for s in &stats {
        *by_state.entry(s.state.as_str()).or_default() += 1;
    }
    for (state, n) in by_state {
        states
            .get_or_create(&vec![("state", state.to_owned())])
            .set(n);
    }
    registry.register("layers", "Lazy layers served, by state", states);

    // By the policy's mode (a layer served before modes existed counts as Lazy), and how many
    // of them missed their fullyLocalWithin deadline.
    let modes = Family::<Labels, Gauge>::default();
    for mode in ["Lazy", "Prefetch", "Eager"] {
        let n = stats
            .iter()
            .filter(|s| s.mode == mode || (mode == "Lazy" && s.mode.is_empty()))
            .count();
        modes
            .get_or_create(&vec![("mode", mode.to_owned())])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    registry.register("layer_modes", "Lazy layers served, by policy mode", modes);
    let missed = stats
        .iter()
        .filter(|s| s.fully_local_deadline_missed)
        .count();
    let deadline = Gauge::<i64>::default();
    deadline.set(i64::try_from(missed).unwrap_or(i64::MAX));
    registry.register(
        "layers_fully_local_deadline_missed",
        "Lazy layers served that were not fully local within their policy's fullyLocalWithin",
        deadline,
    );

    let fully_local = Family::<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    for s in &stats {
        if let Some(secs) = s.fully_local_seconds {
            fully_local
                .get_or_create(&vec![("layer", s.layer.clone())])
                .set(secs);
        }
    }
    registry.register(
        "layer_fully_local_seconds",
        "Seconds from mount until the layer was fully local and verified",
        fully_local,
    );

    registry.register(
        "read_latency_seconds",
        "Latency of reads of lazy layers (fetches included)",
        read_latency(&stats),
    );

    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
        out.clear();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LayerStats;

    fn layer(buckets: &[(usize, u64)]) -> LayerStats {
        let mut counts = vec![0; hermes_lazyfs::READ_LATENCY_BOUNDS.len() + 1];
        for &(i, n) in buckets {
            counts[i] = n;
        }
        LayerStats {
            read_latency_buckets: counts,
            read_latency_sum_micros: 1_000,
            ..LayerStats::default()
        }
    }

    #[test]
    fn read_latency_of_several_servers_is_not_cumulated_twice() {
        // Two servers' per-bucket counts, spread over fast, slow and unbounded buckets.
        let stats = [layer(&[(0, 5), (3, 2), (10, 1)]), layer(&[(0, 1), (7, 4)])];
        let mut registry = Registry::with_prefix("hermes_node");
        registry.register("read_latency_seconds", "test", read_latency(&stats));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert_eq!(
            hermes_testkit::prometheus::check_histograms(&text),
            Ok(1),
            "{text}"
        );
        assert!(
            text.contains("hermes_node_read_latency_seconds_count 13\n")
                && text.contains("hermes_node_read_latency_seconds_bucket{le=\"0.0001\"} 6\n")
                && text.contains("hermes_node_read_latency_seconds_bucket{le=\"0.005\"} 8\n"),
            "{text}"
        );
    }
}
