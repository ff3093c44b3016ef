//! `ferrocd-bench`: a load generator for any etcd v3 endpoint (put, range, txn-put, mixed) with
//! HDR latency histograms, and `compare`, which runs the same workloads against etcd and ferrocd
//! started side by side and reports the ratios. See docs/BENCHMARKS.md.

pub mod cli;
pub mod compare;
pub mod load;
pub mod server;
pub mod stats;

/// Errors of the tool are reported to the user, never matched on.
pub type BenchResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;
