//! HDR histograms (µs) merged from the workers, and their summaries.

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::fleet::protocol::Buckets;
pub use crate::fleet::worker::histogram;

/// Adds the workers' buckets into one histogram.
pub fn merge<'a>(parts: impl IntoIterator<Item = &'a Buckets>) -> Histogram<u64> {
    let mut h = histogram();
    for buckets in parts {
        for &(value, count) in buckets {
            h.saturating_record_n(value.max(1), count);
        }
    }
    h
}

/// A distribution in milliseconds.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct Percentiles {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Percentiles {
            count: h.len(),
            mean_ms: h.mean() / 1000.0,
            p50_ms: ms(h.value_at_quantile(0.5)),
            p90_ms: ms(h.value_at_quantile(0.9)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }

    /// A Markdown table row: `| label | count | p50 | p90 | p99 | p99.9 | max |`.
    pub fn row(&self, label: &str) -> String {
        format!(
            "| {label} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            thousands(self.count),
            self.p50_ms,
            self.p90_ms,
            self.p99_ms,
            self.p999_ms,
            self.max_ms
        )
    }

    pub const HEADER: &'static str =
        "| | samples | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms |\n|---|---|---|---|---|---|---|";
}

/// The percentile curve: (quantile, ms) at quantiles 0, 0.5, 0.75, … up to the max.
pub fn percentile_curve(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    let mut points = Vec::new();
    let mut q = 0.0;
    // Halve the distance to 1 each step: 0, .5, .75, .875, … (ticks like HdrHistogram's plots).
    for _ in 0..24 {
        points.push((q, h.value_at_quantile(q) as f64 / 1000.0));
        q = 1.0 - (1.0 - q) / 2.0;
        if (1.0 - q) * (h.len() as f64) < 0.5 {
            break;
        }
    }
    points.push((1.0 - 0.5 / h.len() as f64, h.max() as f64 / 1000.0));
    points
}

/// The cumulative distribution: (ms, fraction ≤ it), one point per recorded value.
pub fn cdf(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    let total = h.len() as f64;
    if total == 0.0 {
        return Vec::new();
    }
    let mut seen = 0;
    h.iter_recorded()
        .map(|v| {
            seen += v.count_at_value();
            (v.value_iterated_to() as f64 / 1000.0, seen as f64 / total)
        })
        .collect()
}

/// `1234567` → `1,234,567`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string().into_bytes();
    let groups: Vec<&str> = digits.rchunks(3).rev().map(|g| std::str::from_utf8(g).expect("digits")).collect();
    groups.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_and_summarizes() {
        let a = vec![(1000, 98), (2000, 1)];
        let b = vec![(50_000, 1)];
        let h = merge([&a, &b]);
        let p = Percentiles::of(&h);
        assert_eq!(p.count, 100);
        assert!((p.p50_ms - 1.0).abs() < 0.01);
        assert!((p.max_ms - 50.0).abs() < 0.1);
        let curve = percentile_curve(&h);
        assert_eq!(curve.first().unwrap().0, 0.0);
        assert!((curve.last().unwrap().1 - 50.0).abs() < 0.1);
        let cdf = cdf(&h);
        assert_eq!(cdf.last().unwrap().1, 1.0);
        assert_eq!(thousands(1234567), "1,234,567");
        assert_eq!(thousands(999), "999");
    }
}
