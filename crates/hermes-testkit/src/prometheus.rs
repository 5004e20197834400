//! Checks on a Prometheus / OpenMetrics text exposition as a scraper would see it.

use std::collections::BTreeMap;

/// One histogram series: its buckets (upper bound, cumulative count) and `_count`.
#[derive(Default)]
struct Series {
    buckets: Vec<(f64, f64)>,
    count: Option<f64>,
}

/// Checks every histogram (`# TYPE … histogram`) in `text`: buckets never decrease, none is
/// above `_count`, and `+Inf` equals `_count`. Returns how many series were checked, or what
/// is inconsistent (expected and actual).
pub fn check_histograms(text: &str) -> std::result::Result<usize, String> {
    let names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" histogram"))
        .collect();
    let mut series: BTreeMap<(String, String), Series> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((key, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (metric, labels) = match key.split_once('{') {
            Some((m, rest)) => (m, rest.trim_end_matches('}')),
            None => (key, ""),
        };
        let Some((name, suffix)) = names.iter().find_map(|n| {
            let s = metric.strip_prefix(n)?.strip_prefix('_')?;
            Some((*n, s))
        }) else {
            continue;
        };
        let value: f64 = value
            .parse()
            .map_err(|_| format!("{line:?}: value is not a number"))?;
        let mut le = None;
        let others: Vec<&str> = labels
            .split(',')
            .filter(|p| !p.is_empty())
            .filter(|p| match p.strip_prefix("le=") {
                Some(v) => {
                    le = Some(v.trim_matches('"'));
                    false
                }
                None => true,
            })
            .collect();
        let entry = series
            .entry((name.to_owned(), others.join(",")))
            .or_default();
        match (suffix, le) {
            ("bucket", Some(le)) => {
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse()
                        .map_err(|_| format!("{line:?}: le is not a number"))?
                };
                entry.buckets.push((bound, value));
            }
            ("count", None) => entry.count = Some(value),
            _ => {}
        }
    }
    for ((name, labels), s) in &series {
        let at = format!("{name}{{{labels}}}");
        let count = s.count.ok_or_else(|| format!("{at}: no _count"))?;
        let mut buckets = s.buckets.clone();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        let inf = buckets
            .last()
            .filter(|(b, _)| b.is_infinite())
            .ok_or_else(|| format!("{at}: no +Inf bucket"))?
            .1;
        if inf != count {
            return Err(format!("{at}: +Inf bucket is {inf}, _count is {count}"));
        }
        for pair in buckets.windows(2) {
            let ((lo, a), (hi, b)) = (pair[0], pair[1]);
            if a > b {
                return Err(format!(
                    "{at}: bucket le={lo} holds {a}, more than bucket le={hi} ({b})"
                ));
            }
        }
        if let Some((le, v)) = buckets.iter().find(|(_, v)| *v > count) {
            return Err(format!("{at}: bucket le={le} holds {v}, _count is {count}"));
        }
    }
    Ok(series.len())
}

#[cfg(test)]
mod tests {
    use super::check_histograms;

    const GOOD: &str = "# TYPE lat histogram\nlat_sum 1.5\nlat_count 3\n\
        lat_bucket{le=\"0.1\"} 1\nlat_bucket{le=\"1.0\"} 3\nlat_bucket{le=\"+Inf\"} 3\n\
        # TYPE hits counter\nhits_total 9\n";

    #[test]
    fn a_consistent_histogram_passes() {
        assert_eq!(check_histograms(GOOD), Ok(1));
    }

    #[test]
    fn cumulative_of_cumulative_buckets_fail() {
        let bad = GOOD
            .replace("le=\"1.0\"} 3", "le=\"1.0\"} 4")
            .replace("le=\"+Inf\"} 3", "le=\"+Inf\"} 7");
        let err = check_histograms(&bad).expect_err("inconsistent");
        assert!(err.contains("+Inf bucket is 7, _count is 3"), "{err}");
    }

    #[test]
    fn a_decreasing_bucket_fails() {
        let bad = GOOD.replace("le=\"0.1\"} 1", "le=\"0.1\"} 5");
        let err = check_histograms(&bad).expect_err("inconsistent");
        assert!(err.contains("le=0.1 holds 5"), "{err}");
    }
}
