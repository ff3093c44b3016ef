//! Command-line arguments of `ferrocd-bench`, and their translation into run specifications.

use crate::compare::{CompareArgs, SuiteName};
use crate::load::{Consistency, KeySpec, LoadSpec, Op, Stop};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

/// Largest `compare --cluster`: every member is a process on this machine.
const MAX_CLUSTER_SIZE: u64 = 9;
/// Requests per run when neither `--total` nor `--duration-s` is given.
const DEFAULT_TOTAL: u64 = 10_000;

#[derive(Parser, Debug)]
#[command(
    name = "ferrocd-bench",
    about = "Load generator for etcd v3 endpoints, and a side-by-side comparison of etcd and ferrocd"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Put requests.
    Put(LoadArgs),
    /// Single-key range requests.
    Range {
        #[command(flatten)]
        load: LoadArgs,
        /// l = linearizable (etcd's default), s = serializable.
        #[arg(long, value_enum, default_value = "l")]
        consistency: Consistency,
    },
    /// Txns with one put in the success branch and no compares.
    TxnPut(LoadArgs),
    /// Ranges with probability --read-ratio, puts otherwise.
    Mixed {
        #[command(flatten)]
        load: LoadArgs,
        /// Fraction of requests that are ranges, within 0..=1.
        #[arg(long, default_value_t = 0.9)]
        read_ratio: f64,
        /// Consistency of the ranges: l = linearizable, s = serializable.
        #[arg(long, value_enum, default_value = "l")]
        consistency: Consistency,
    },
    /// Txns that compare the key's mod revision, then range it (probability --read-ratio) or
    /// put it.
    TxnMixed {
        #[command(flatten)]
        load: LoadArgs,
        /// Fraction of txns whose branch is a range, within 0..=1.
        #[arg(long, default_value_t = 0.5)]
        read_ratio: f64,
    },
    /// Watchers on the key space while the clients put; reports event delivery latency and
    /// events received against expected.
    Watch {
        #[command(flatten)]
        load: LoadArgs,
        /// Watch streams, spread over the connections.
        #[arg(long, default_value_t = 10)]
        watchers: usize,
        /// Each watcher watches keys 0..N (default: the whole key space).
        #[arg(long)]
        watched_keys: Option<u64>,
        /// Extra watch streams on every key that are never read, on a connection of their
        /// own: the put latency line shows whether they slow the writers down.
        #[arg(long, default_value_t = 0)]
        slow_watchers: usize,
    },
    /// Keep-alive round trips on lease keep-alive streams.
    LeaseKeepalive {
        #[command(flatten)]
        load: LoadArgs,
        /// Leases granted, each with its own stream (default: one per client).
        #[arg(long)]
        leases: Option<usize>,
    },
    /// Start etcd and ferrocd, run the same workloads against each in alternation, and print a
    /// side-by-side table.
    Compare(CompareCliArgs),
}

/// Options shared by every workload.
#[derive(Args, Debug, Clone)]
pub struct LoadArgs {
    /// Comma-separated client URLs.
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:2379")]
    pub endpoints: Vec<String>,
    /// gRPC connections.
    #[arg(long, default_value_t = 1)]
    pub conns: usize,
    /// Concurrent request loops, spread over the connections.
    #[arg(long, default_value_t = 1)]
    pub clients: usize,
    /// Requests in all (default 10000 unless --duration-s is given).
    #[arg(long, conflicts_with = "duration_s")]
    pub total: Option<u64>,
    /// Run for this many seconds instead of a fixed number of requests.
    #[arg(long)]
    pub duration_s: Option<u64>,
    /// Key length in bytes (keys are zero-padded decimal indices).
    #[arg(long, default_value_t = 8)]
    pub key_size: usize,
    /// Value length in bytes.
    #[arg(long, default_value_t = 8)]
    pub val_size: usize,
    /// Number of distinct keys.
    #[arg(long, default_value_t = 10_000)]
    pub key_space: u64,
    /// Touch keys in order (request n uses key n mod key-space) instead of at random.
    #[arg(long)]
    pub sequential_keys: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// No progress line on stderr.
    #[arg(long)]
    pub quiet: bool,
}

/// What a command line asks for.
pub enum Workload {
    Load { args: LoadArgs, op: Op },
    Compare(CompareCliArgs),
}

impl Command {
    /// Resolves per-workload options (defaults that depend on other options included).
    pub fn into_workload(self) -> Workload {
        let (args, op) = match self {
            Command::Put(args) => (args, Op::Put),
            Command::Range { load, consistency } => (load, Op::Range(consistency)),
            Command::TxnPut(args) => (args, Op::TxnPut),
            Command::Mixed {
                load,
                read_ratio,
                consistency,
            } => {
                let op = Op::Mixed {
                    read_ratio,
                    consistency,
                };
                (load, op)
            }
            Command::TxnMixed { load, read_ratio } => (load, Op::TxnMixed { read_ratio }),
            Command::Watch {
                load,
                watchers,
                watched_keys,
                slow_watchers,
            } => {
                let watched_keys = watched_keys.unwrap_or(load.key_space);
                let op = Op::Watch {
                    watchers,
                    watched_keys,
                    slow_watchers,
                };
                (load, op)
            }
            Command::LeaseKeepalive { load, leases } => {
                let leases = leases.unwrap_or(load.clients);
                (load, Op::LeaseKeepalive { leases })
            }
            Command::Compare(args) => return Workload::Compare(args),
        };
        Workload::Load { args, op }
    }
}

impl LoadArgs {
    pub fn spec(&self, op: Op) -> Result<LoadSpec, String> {
        let stop = match (self.total, self.duration_s) {
            (Some(total), _) => Stop::Total(total),
            (None, Some(seconds)) => Stop::Duration(Duration::from_secs(seconds)),
            (None, None) => Stop::Total(DEFAULT_TOTAL),
        };
        let spec = LoadSpec {
            op,
            endpoints: self.endpoints.clone(),
            conns: self.conns,
            clients: self.clients,
            stop,
            keys: KeySpec {
                key_size_bytes: self.key_size,
                val_size_bytes: self.val_size,
                key_space: self.key_space,
                sequential: self.sequential_keys,
            },
        };
        spec.validate()?;
        Ok(spec)
    }
}

#[derive(Args, Debug, Clone)]
pub struct CompareCliArgs {
    /// Path of the ferrocd binary.
    #[arg(long, default_value = "target/release/ferrocd")]
    pub ferrocd: PathBuf,
    /// Path (or name on PATH) of the etcd binary.
    #[arg(long, default_value = "etcd")]
    pub etcd: PathBuf,
    /// quick: about a minute, for routine runs; full: several rounds of longer runs.
    #[arg(long, value_enum, default_value = "quick")]
    pub suite: SuiteName,
    /// Where compare.md and compare.json are written.
    #[arg(long, default_value = "bench-results")]
    pub out_dir: PathBuf,
    /// Extra argument for ferrocd (repeat for several), e.g. --ferrocd-arg=--shards=2.
    #[arg(long, allow_hyphen_values = true)]
    pub ferrocd_arg: Vec<String>,
    /// Members per server: 1, or more for a static cluster on 127.0.0.1 ports (e.g. 3).
    #[arg(long, default_value_t = 1, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=MAX_CLUSTER_SIZE))]
    pub cluster: usize,
    /// Keys loaded before the measured steps, instead of the suite's number.
    #[arg(long)]
    pub keys: Option<u64>,
    /// Length of every measured step in milliseconds, instead of the suite's.
    #[arg(long)]
    pub step_ms: Option<u64>,
}

impl From<CompareCliArgs> for CompareArgs {
    fn from(args: CompareCliArgs) -> CompareArgs {
        CompareArgs {
            ferrocd: args.ferrocd,
            etcd: args.etcd,
            suite: args.suite,
            out_dir: args.out_dir,
            ferrocd_args: args.ferrocd_arg,
            cluster_size: args.cluster,
            keys: args.keys,
            step_duration: args.step_ms.map(Duration::from_millis),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("ferrocd-bench").chain(args.iter().copied()))
    }

    fn load_spec(args: &[&str]) -> Result<LoadSpec, String> {
        match parse(args).expect("parses").command.into_workload() {
            Workload::Load { args, op } => args.spec(op),
            Workload::Compare(_) => panic!("not a load command"),
        }
    }

    #[test]
    fn put_defaults() {
        let spec = load_spec(&["put"]).expect("valid");
        assert_eq!(spec.op, Op::Put);
        assert_eq!(spec.endpoints, ["http://127.0.0.1:2379"]);
        assert_eq!((spec.conns, spec.clients), (1, 1));
        assert_eq!(spec.stop, Stop::Total(DEFAULT_TOTAL));
        assert!(!spec.keys.sequential);
    }

    #[test]
    fn every_option_reaches_the_spec() {
        let spec = load_spec(&[
            "range",
            "--consistency",
            "s",
            "--endpoints",
            "http://a:1,http://b:2",
            "--conns",
            "2",
            "--clients",
            "10",
            "--duration-s",
            "3",
            "--key-size",
            "16",
            "--val-size",
            "256",
            "--key-space",
            "500",
            "--sequential-keys",
        ])
        .expect("valid");
        assert_eq!(spec.op, Op::Range(Consistency::Serializable));
        assert_eq!(spec.endpoints, ["http://a:1", "http://b:2"]);
        assert_eq!((spec.conns, spec.clients), (2, 10));
        assert_eq!(spec.stop, Stop::Duration(Duration::from_secs(3)));
        let expected_keys = KeySpec {
            key_size_bytes: 16,
            val_size_bytes: 256,
            key_space: 500,
            sequential: true,
        };
        assert_eq!(spec.keys, expected_keys);
    }

    #[test]
    fn mixed_takes_a_read_ratio() {
        let spec = load_spec(&["mixed", "--read-ratio", "0.5", "--total", "7"]).expect("valid");
        let expected = Op::Mixed {
            read_ratio: 0.5,
            consistency: Consistency::Linearizable,
        };
        assert_eq!(spec.op, expected);
        assert_eq!(spec.stop, Stop::Total(7));
    }

    #[test]
    fn new_workloads_resolve_their_defaults() {
        let spec = load_spec(&["txn-mixed", "--read-ratio", "0.25"]).expect("valid");
        assert_eq!(spec.op, Op::TxnMixed { read_ratio: 0.25 });
        let spec = load_spec(&["watch", "--key-space", "50", "--watchers", "3"]).expect("valid");
        let expected = Op::Watch {
            watchers: 3,
            watched_keys: 50,
            slow_watchers: 0,
        };
        assert_eq!(spec.op, expected);
        let spec = load_spec(&["watch", "--watched-keys", "5", "--slow-watchers", "2"]);
        let expected = Op::Watch {
            watchers: 10,
            watched_keys: 5,
            slow_watchers: 2,
        };
        assert_eq!(spec.expect("valid").op, expected);
        let spec = load_spec(&["lease-keepalive", "--clients", "4"]).expect("valid");
        assert_eq!(spec.op, Op::LeaseKeepalive { leases: 4 });
        let spec = load_spec(&["lease-keepalive", "--leases", "9"]).expect("valid");
        assert_eq!(spec.op, Op::LeaseKeepalive { leases: 9 });
    }

    #[test]
    fn invalid_combinations_are_refused() {
        assert!(load_spec(&["txn-mixed", "--read-ratio", "1.1"]).is_err());
        assert!(load_spec(&["watch", "--watchers", "0"]).is_err());
        assert!(load_spec(&["watch", "--val-size", "4"]).is_err());
        assert!(load_spec(&["watch", "--key-space", "5", "--watched-keys", "6"]).is_err());
        assert!(load_spec(&["lease-keepalive", "--clients", "4", "--leases", "3"]).is_err());
        assert!(parse(&["put", "--total", "1", "--duration-s", "1"]).is_err());
        assert!(parse(&["compare", "--cluster", "0"]).is_err());
        assert!(parse(&["compare", "--cluster", "10"]).is_err());
        assert!(parse(&["range", "--consistency", "x"]).is_err());
        assert!(load_spec(&["mixed", "--read-ratio", "1.5"]).is_err());
        assert!(load_spec(&["put", "--conns", "4", "--clients", "2"]).is_err());
        assert!(load_spec(&["put", "--clients", "0"]).is_err());
        assert!(load_spec(&["put", "--key-size", "2", "--key-space", "1000"]).is_err());
    }

    #[test]
    fn compare_arguments() {
        let cli = parse(&[
            "compare",
            "--ferrocd",
            "/bin/f",
            "--suite",
            "full",
            "--ferrocd-arg=--shards=2",
            "--cluster",
            "3",
            "--keys",
            "100",
            "--step-ms",
            "250",
        ])
        .expect("parses");
        let Command::Compare(args) = cli.command else {
            panic!("compare expected");
        };
        let args = CompareArgs::from(args);
        assert_eq!(args.ferrocd, PathBuf::from("/bin/f"));
        assert_eq!(args.etcd, PathBuf::from("etcd"));
        assert_eq!(args.suite, SuiteName::Full);
        assert_eq!(args.ferrocd_args, ["--shards=2"]);
        assert_eq!(args.cluster_size, 3);
        assert_eq!(args.keys, Some(100));
        assert_eq!(args.step_duration, Some(Duration::from_millis(250)));
    }
}
