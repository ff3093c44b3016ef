//! A fixed-bucket latency histogram with the bucket bounds etcd uses for its disk metrics
//! (`etcd_disk_wal_fsync_duration_seconds`: 1 ms doubling up to about 8 s), so dashboards
//! built for etcd read ferrocd's numbers the same way.

use std::time::Duration;

/// Upper bounds of the buckets, in seconds: 0.001 * 2^i for i in 0..14 (etcd's
/// `prometheus.ExponentialBuckets(0.001, 2, 14)`). One more bucket counts everything above.
pub const BUCKET_BOUNDS_S: [f64; 14] = [
    0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048, 4.096,
    8.192,
];

/// Counts per bucket (not cumulative) plus the sum of all observations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LatencyHistogram {
    /// `counts[i]` observations fell in `(BUCKET_BOUNDS_S[i-1], BUCKET_BOUNDS_S[i]]`; the last
    /// slot holds those above the largest bound.
    pub counts: [u64; BUCKET_BOUNDS_S.len() + 1],
    pub sum_ns: u64,
}

impl LatencyHistogram {
    pub fn record(&mut self, latency: Duration) {
        let seconds = latency.as_secs_f64();
        let bucket = BUCKET_BOUNDS_S
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(BUCKET_BOUNDS_S.len());
        self.counts[bucket] += 1;
        self.sum_ns = self.sum_ns.saturating_add(latency.as_nanos() as u64);
    }

    /// Adds `other`'s observations (histograms of several logs make one metric).
    pub fn merge(&mut self, other: &LatencyHistogram) {
        for (mine, theirs) in self.counts.iter_mut().zip(other.counts) {
            *mine += theirs;
        }
        self.sum_ns = self.sum_ns.saturating_add(other.sum_ns);
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        let mut h = LatencyHistogram::default();
        h.record(Duration::from_micros(500));
        h.record(Duration::from_millis(1));
        h.record(Duration::from_millis(3));
        h.record(Duration::from_secs(60));
        assert_eq!(h.counts[0], 2, "0.5 ms and exactly 1 ms are <= 0.001 s");
        assert_eq!(h.counts[2], 1, "3 ms is in (0.002, 0.004]");
        assert_eq!(
            h.counts[BUCKET_BOUNDS_S.len()],
            1,
            "60 s is above every bound"
        );
        assert_eq!(h.count(), 4);
        assert_eq!(h.sum_ns, 60_004_500_000);
    }

    #[test]
    fn merge_adds_counts_and_sums() {
        let mut a = LatencyHistogram::default();
        a.record(Duration::from_millis(5));
        let mut b = LatencyHistogram::default();
        b.record(Duration::from_millis(5));
        b.record(Duration::from_millis(100));
        a.merge(&b);
        assert_eq!(a.count(), 3);
        assert_eq!(a.counts[3], 2, "5 ms is in (0.004, 0.008]");
        assert_eq!(a.sum_ns, 110_000_000);
    }
}
