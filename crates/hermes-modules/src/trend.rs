//! Leak detection on memory samples: robust growth trends that ignore GC-like sawtooths.
//!
//! A process leaks when its memory grows steadily. Two robust estimates must both exceed the
//! threshold: the Theil–Sen slope over all samples of the window (the median of pairwise
//! slopes, insensitive to outliers), and the growth of the window's *floor*: the minimum of its
//! second half against the minimum of its first half. A sawtooth (allocate, then free back)
//! has a rising trend inside each tooth but a flat floor as long as each half of the window
//! holds a trough (choose a window of at least two GC periods); a leak raises the floor.

use serde::Serialize;

/// Median of a non-empty slice (sorts it).
fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Theil–Sen slope of `(t, y)` points: the median of slopes between all pairs with distinct
/// `t`. `None` with fewer than two distinct times.
pub fn theil_sen(points: &[(f64, f64)]) -> Option<f64> {
    let mut slopes = Vec::with_capacity(points.len() * points.len().saturating_sub(1) / 2);
    for (i, &(t0, y0)) in points.iter().enumerate() {
        for &(t1, y1) in &points[i + 1..] {
            if t1 != t0 {
                slopes.push((y1 - y0) / (t1 - t0));
            }
        }
    }
    median(&mut slopes)
}

/// The verdict on one window.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Trend {
    /// Theil–Sen slope of all samples, KiB per minute.
    pub slope_kib_per_min: f64,
    /// Growth of the floor (minimum of the second half over the first), KiB per minute.
    pub floor_slope_kib_per_min: f64,
    /// Both slopes exceed the threshold.
    pub leak_suspected: bool,
}

/// Analyzes a full window of `(seconds, bytes)` samples against a threshold in KiB/min.
/// `None` until the window has at least 8 samples.
pub fn analyze(samples: &[(f64, f64)], threshold_kib_per_min: f64) -> Option<Trend> {
    if samples.len() < 8 {
        return None;
    }
    let per_min = |bytes_per_s: f64| bytes_per_s * 60.0 / 1024.0;
    let slope = per_min(theil_sen(samples)?);
    let (first, second) = samples.split_at(samples.len() / 2);
    let floor = |half: &[(f64, f64)]| {
        let min = half.iter().map(|s| s.1).fold(f64::INFINITY, f64::min);
        let mid = half.iter().map(|s| s.0).sum::<f64>() / half.len() as f64;
        (mid, min)
    };
    let ((t0, f0), (t1, f1)) = (floor(first), floor(second));
    if t1 <= t0 {
        return None;
    }
    let floor_slope = per_min((f1 - f0) / (t1 - t0));
    Some(Trend {
        slope_kib_per_min: slope,
        floor_slope_kib_per_min: floor_slope,
        leak_suspected: slope > threshold_kib_per_min && floor_slope > threshold_kib_per_min,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: f64 = 1024.0 * 1024.0;

    #[test]
    fn theil_sen_ignores_outliers() {
        let mut pts: Vec<(f64, f64)> = (0..20).map(|i| (i as f64, 2.0 * i as f64 + 5.0)).collect();
        pts[3].1 = 1e9;
        pts[11].1 = -1e9;
        assert_eq!(theil_sen(&pts), Some(2.0));
        assert_eq!(theil_sen(&[(1.0, 1.0)]), None);
        assert_eq!(theil_sen(&[(1.0, 1.0), (1.0, 2.0)]), None);
    }

    #[test]
    fn steady_growth_is_a_leak() {
        // 1 MiB per second = 61440 KiB/min, with noise.
        let s: Vec<(f64, f64)> = (0..30)
            .map(|i| {
                (
                    i as f64,
                    100.0 * MIB + i as f64 * MIB + ((i * 7919) % 13) as f64 * 4096.0,
                )
            })
            .collect();
        let t = analyze(&s, 1024.0).unwrap();
        assert!(t.leak_suspected, "{t:?}");
        assert!((t.slope_kib_per_min - 61440.0).abs() < 2000.0, "{t:?}");
    }

    #[test]
    fn sawtooth_is_not_a_leak() {
        // Grows 2 MiB per sample for 5 samples, then drops back: a GC-like tooth.
        let s: Vec<(f64, f64)> = (0..30)
            .map(|i| (i as f64, 100.0 * MIB + (i % 6) as f64 * 2.0 * MIB))
            .collect();
        let t = analyze(&s, 1024.0).unwrap();
        assert!(!t.leak_suspected, "{t:?}");
        assert!(t.floor_slope_kib_per_min.abs() < 1.0, "{t:?}");
    }

    #[test]
    fn flat_and_short_windows() {
        let flat: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 5.0 * MIB)).collect();
        assert!(!analyze(&flat, 1.0).unwrap().leak_suspected);
        assert_eq!(analyze(&flat[..7], 1.0), None);
    }
}
