//! Latency recording and the summary every workload prints: throughput plus HDR percentiles.

use hdrhistogram::Histogram;
use serde::Serialize;
use std::fmt;
use std::time::Duration;

/// Highest latency the histogram tells apart: one minute. Slower requests are recorded as one
/// minute (they are far beyond any request timeout we use anyway).
const MAX_TRACKED_LATENCY_US: u64 = 60_000_000;
/// Three significant digits: a 0.1% relative error on every percentile.
const SIGNIFICANT_DIGITS: u8 = 3;

/// The latencies of the successful requests of one run (or of several runs merged).
#[derive(Clone, Debug)]
pub struct Latencies {
    histogram: Histogram<u64>,
}

impl Default for Latencies {
    fn default() -> Self {
        Self::new()
    }
}

impl Latencies {
    pub fn new() -> Latencies {
        let histogram = Histogram::new_with_bounds(1, MAX_TRACKED_LATENCY_US, SIGNIFICANT_DIGITS)
            .expect("constant histogram bounds are valid");
        Latencies { histogram }
    }

    /// Records one request, rounded down to whole microseconds (sub-µs requests count as 1 µs).
    pub fn record(&mut self, latency: Duration) {
        let latency_us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.histogram.saturating_record(latency_us.max(1));
    }

    /// Adds every sample of `other`.
    pub fn merge(&mut self, other: &Latencies) {
        // Both sides were built with the same bounds, so adding cannot run out of range.
        self.histogram
            .add(&other.histogram)
            .expect("histograms with equal bounds merge");
    }

    /// Number of recorded requests.
    pub fn count(&self) -> u64 {
        self.histogram.len()
    }

    fn quantile_us(&self, quantile: f64) -> u64 {
        self.histogram.value_at_quantile(quantile)
    }
}

/// What a finished run reports; also the `--json` output.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    pub workload: String,
    /// Successful requests.
    pub ops: u64,
    /// Failed requests (not in the latency percentiles).
    pub errors: u64,
    pub elapsed_s: f64,
    /// Successful requests per second of wall-clock time.
    pub ops_per_s: f64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    /// The first error seen, to tell "server down" from "request too large" at a glance.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    /// Watch runs only: the events expected and received. `ops` and the percentiles are then
    /// about delivered events (send of the put to arrival at the watcher).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub watch: Option<WatchCounts>,
    /// Watch runs only: the latency of the puts themselves (send to acknowledgement).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub put_latency: Option<Box<Percentiles>>,
}

/// Latency percentiles of one kind of request.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

impl Percentiles {
    pub fn of(latencies: &Latencies) -> Percentiles {
        Percentiles {
            count: latencies.count(),
            mean_us: latencies.histogram.mean(),
            p50_us: latencies.quantile_us(0.50),
            p90_us: latencies.quantile_us(0.90),
            p99_us: latencies.quantile_us(0.99),
            max_us: latencies.histogram.max(),
        }
    }
}

/// What the watchers of a watch run saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct WatchCounts {
    pub watchers: u64,
    /// Streams on every key that were never read during the run.
    pub slow_watchers: u64,
    /// Acknowledged puts to watched keys.
    pub puts: u64,
    /// `puts` times `watchers`: every watcher must see every such put exactly once.
    pub events_expected: u64,
    /// Events delivered in revision order, each counted once.
    pub events_received: u64,
    /// Events delivered again or out of revision order (each also counts as an error).
    pub events_duplicated: u64,
}

impl WatchCounts {
    /// The counts of two runs together (rounds of a comparison).
    pub fn add(&self, other: &WatchCounts) -> WatchCounts {
        WatchCounts {
            watchers: self.watchers.max(other.watchers),
            slow_watchers: self.slow_watchers.max(other.slow_watchers),
            puts: self.puts + other.puts,
            events_expected: self.events_expected + other.events_expected,
            events_received: self.events_received + other.events_received,
            events_duplicated: self.events_duplicated + other.events_duplicated,
        }
    }
}

impl Summary {
    /// Summarises `latencies` of a run that took `elapsed` of wall-clock time.
    pub fn new(workload: &str, latencies: &Latencies, errors: u64, elapsed: Duration) -> Summary {
        let elapsed_s = elapsed.as_secs_f64();
        let ops = latencies.count();
        let ops_per_s = if elapsed_s > 0.0 {
            ops as f64 / elapsed_s
        } else {
            0.0
        };
        Summary {
            workload: workload.to_string(),
            ops,
            errors,
            elapsed_s,
            ops_per_s,
            mean_us: latencies.histogram.mean(),
            p50_us: latencies.quantile_us(0.50),
            p90_us: latencies.quantile_us(0.90),
            p99_us: latencies.quantile_us(0.99),
            p999_us: latencies.quantile_us(0.999),
            max_us: latencies.histogram.max(),
            first_error: None,
            watch: None,
            put_latency: None,
        }
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "workload:   {}", self.workload)?;
        writeln!(
            f,
            "ops:        {} ok, {} errors in {:.2} s",
            self.ops, self.errors, self.elapsed_s
        )?;
        writeln!(f, "throughput: {:.1} ops/s", self.ops_per_s)?;
        writeln!(
            f,
            "latency µs: mean {:.0}  p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
            self.mean_us, self.p50_us, self.p90_us, self.p99_us, self.p999_us, self.max_us
        )?;
        if let Some(watch) = &self.watch {
            writeln!(
                f,
                "events:     {} received of {} expected ({} watchers x {} puts), {} duplicated",
                watch.events_received,
                watch.events_expected,
                watch.watchers,
                watch.puts,
                watch.events_duplicated
            )?;
        }
        if let Some(put) = &self.put_latency {
            let slow = self.watch.map_or(0, |w| w.slow_watchers);
            writeln!(
                f,
                "puts µs:    mean {:.0}  p50 {}  p90 {}  p99 {}  max {}  ({} puts, {} slow watchers)",
                put.mean_us, put.p50_us, put.p90_us, put.p99_us, put.max_us, put.count, slow
            )?;
        }
        if let Some(error) = &self.first_error {
            writeln!(f, "first error: {error}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uniform_1_to_1000_us() -> Latencies {
        let mut latencies = Latencies::new();
        for us in 1..=1000 {
            latencies.record(Duration::from_micros(us));
        }
        latencies
    }

    /// Within the histogram's 0.1% precision.
    fn assert_close(actual: u64, expected: u64) {
        let tolerance = expected / 1000 + 1;
        assert!(
            actual.abs_diff(expected) <= tolerance,
            "{actual} is not within {tolerance} of {expected}"
        );
    }

    #[test]
    fn summary_reports_percentiles_and_throughput() {
        let summary = Summary::new("put", &uniform_1_to_1000_us(), 3, Duration::from_secs(2));
        assert_eq!(summary.ops, 1000);
        assert_eq!(summary.errors, 3);
        assert_eq!(summary.ops_per_s, 500.0);
        assert_close(summary.p50_us, 500);
        assert_close(summary.p90_us, 900);
        assert_close(summary.p99_us, 990);
        assert_close(summary.p999_us, 999);
        assert_close(summary.max_us, 1000);
        assert!((summary.mean_us - 500.5).abs() < 1.0, "{}", summary.mean_us);
    }

    #[test]
    fn merge_adds_samples_and_keeps_the_tail() {
        let mut merged = uniform_1_to_1000_us();
        let mut slow = Latencies::new();
        slow.record(Duration::from_millis(50));
        merged.merge(&slow);
        assert_eq!(merged.count(), 1001);
        let summary = Summary::new("put", &merged, 0, Duration::from_secs(1));
        assert_close(summary.max_us, 50_000);
        assert_close(summary.p50_us, 501);
    }

    #[test]
    fn extreme_latencies_are_clamped_not_lost() {
        let mut latencies = Latencies::new();
        latencies.record(Duration::ZERO);
        latencies.record(Duration::from_secs(3600));
        assert_eq!(latencies.count(), 2);
        let summary = Summary::new("put", &latencies, 0, Duration::ZERO);
        assert_eq!(summary.p50_us, 1);
        assert_close(summary.max_us, MAX_TRACKED_LATENCY_US);
        assert_eq!(summary.ops_per_s, 0.0, "no division by a zero elapsed time");
    }

    #[test]
    fn json_has_the_documented_fields() {
        let summary = Summary::new("put", &uniform_1_to_1000_us(), 0, Duration::from_secs(1));
        let json: serde_json::Value = serde_json::to_value(&summary).expect("serialize");
        for field in [
            "ops",
            "errors",
            "ops_per_s",
            "p50_us",
            "p99_us",
            "p999_us",
            "max_us",
        ] {
            assert!(json.get(field).is_some(), "missing {field} in {json}");
        }
        assert!(json.get("first_error").is_none(), "None is left out");
    }
}
