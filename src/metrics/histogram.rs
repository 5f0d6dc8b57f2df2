//! A histogram of durations kept in relaxed atomics: one bucket increment and one sum
//! increment per observation, no lock (prometheus-client's own `Histogram` takes a
//! mutex per observation, too much for the per-command path).

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Upper bounds (nanoseconds) of the SCSI command time buckets: 50 µs to 10 s.
pub const COMMAND_BOUNDS_NS: &[u64] = &[
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// Upper bounds (nanoseconds) of the agent's claim and failover buckets: 100 ms to 5 min.
pub const FAILOVER_BOUNDS_NS: &[u64] = &[
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_000_000_000,
    5_000_000_000,
    10_000_000_000,
    20_000_000_000,
    30_000_000_000,
    60_000_000_000,
    120_000_000_000,
    300_000_000_000,
];

#[derive(Debug)]
struct Inner {
    bounds: &'static [u64],
    /// One more than `bounds`: the last counts what is above every bound (+Inf).
    buckets: Box<[AtomicU64]>,
    sum_ns: AtomicU64,
}

/// A duration histogram exposed in seconds; clones share the counts.
#[derive(Debug, Clone)]
pub struct DurationHistogram(Arc<Inner>);

impl DurationHistogram {
    /// `bounds`: bucket upper bounds in nanoseconds, ascending.
    pub fn new(bounds: &'static [u64]) -> DurationHistogram {
        DurationHistogram(Arc::new(Inner {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
        }))
    }

    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = self.0.bounds.partition_point(|b| *b < ns);
        self.0.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.0.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.0
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .sum()
    }
}

impl TypedMetric for DurationHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for DurationHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let inner = &self.0;
        let counts: Vec<u64> = inner
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let bounds = inner.bounds.iter().map(|ns| *ns as f64 / 1e9);
        let buckets: Vec<(f64, u64)> = bounds
            .chain(std::iter::once(f64::INFINITY))
            .zip(counts.iter().copied())
            .collect();
        // The count is the buckets' sum, so a scrape racing an observation stays
        // consistent (count == the +Inf bucket).
        let count = counts.iter().sum();
        let sum = inner.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_their_buckets() {
        let h = DurationHistogram::new(COMMAND_BOUNDS_NS);
        h.observe(Duration::from_micros(50)); // on the first bound: first bucket
        h.observe(Duration::from_micros(51));
        h.observe(Duration::from_secs(60)); // above every bound: +Inf
        let c: Vec<u64> =
            h.0.buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect();
        assert_eq!((c[0], c[1], c[c.len() - 1]), (1, 1, 1));
        assert_eq!(h.count(), 3);
        assert_eq!(h.0.sum_ns.load(Ordering::Relaxed), 60_000_101_000);
    }
}
