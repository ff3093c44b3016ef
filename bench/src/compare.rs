//! `compare`: starts etcd and ferrocd side by side, runs the same workloads against each in
//! alternation (so slow drifts of the machine hit both alike), and reports the ratios.

use crate::load::{self, Consistency, KeySpec, LoadSpec, Op, RunResult, Stop};
use crate::server::{ServerProcess, ServerSpec};
use crate::stats::Summary;
use crate::BenchResult;
use serde::Serialize;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

/// Which set of workloads to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SuiteName {
    /// About a minute: one round of 4 s per workload and server.
    Quick,
    /// About ten minutes: three rounds of 10 s per workload and server, more workloads.
    Full,
}

/// What `compare` needs to know.
#[derive(Clone, Debug)]
pub struct CompareArgs {
    pub ferrocd: PathBuf,
    pub etcd: PathBuf,
    pub suite: SuiteName,
    pub out_dir: PathBuf,
    pub ferrocd_args: Vec<String>,
}

/// One measured workload of a suite.
#[derive(Clone, Copy, Debug)]
struct Step {
    op: Op,
    clients: usize,
    conns: usize,
    val_size_bytes: usize,
}

impl Step {
    /// e.g. `put c64` or `put c64 v4096`.
    fn name(&self, suite_val_size_bytes: usize) -> String {
        let mut name = format!("{} c{}", self.op.label(), self.clients);
        if self.val_size_bytes != suite_val_size_bytes {
            write!(name, " v{}", self.val_size_bytes).expect("writing to a String");
        }
        name
    }
}

struct Suite {
    /// Keys loaded before the measured steps, which then read and overwrite them.
    key_space: u64,
    key_size_bytes: usize,
    val_size_bytes: usize,
    /// Concurrency of the load phase.
    load_clients: usize,
    load_conns: usize,
    /// Each step runs this many times per server, alternating servers.
    rounds: usize,
    run_duration: Duration,
    steps: Vec<Step>,
}

impl Suite {
    fn new(name: SuiteName) -> Suite {
        const VAL_SIZE_BYTES: usize = 256;
        let step = |op, clients, conns| Step {
            op,
            clients,
            conns,
            val_size_bytes: VAL_SIZE_BYTES,
        };
        let mixed = Op::Mixed {
            read_ratio: 0.9,
            consistency: Consistency::Linearizable,
        };
        let mut steps = vec![
            step(Op::Put, 1, 1),
            step(Op::Put, 64, 8),
            step(Op::TxnPut, 64, 8),
            step(Op::Range(Consistency::Linearizable), 64, 8),
            step(Op::Range(Consistency::Serializable), 64, 8),
            step(mixed, 64, 8),
        ];
        match name {
            SuiteName::Quick => Suite {
                key_space: 5_000,
                key_size_bytes: 8,
                val_size_bytes: VAL_SIZE_BYTES,
                load_clients: 32,
                load_conns: 4,
                rounds: 1,
                run_duration: Duration::from_secs(4),
                steps,
            },
            SuiteName::Full => {
                steps.extend([
                    step(Op::Range(Consistency::Linearizable), 1, 1),
                    step(Op::Put, 256, 16),
                    Step {
                        val_size_bytes: 4096,
                        ..step(Op::Put, 64, 8)
                    },
                ]);
                Suite {
                    key_space: 100_000,
                    key_size_bytes: 8,
                    val_size_bytes: VAL_SIZE_BYTES,
                    load_clients: 64,
                    load_conns: 8,
                    rounds: 3,
                    run_duration: Duration::from_secs(10),
                    steps,
                }
            }
        }
    }

    fn keys(&self, val_size_bytes: usize, sequential: bool) -> KeySpec {
        KeySpec {
            key_size_bytes: self.key_size_bytes,
            val_size_bytes,
            key_space: self.key_space,
            sequential,
        }
    }

    /// Writes every key of the key space once, in order.
    fn load_spec(&self, endpoint: String) -> LoadSpec {
        LoadSpec {
            op: Op::Put,
            endpoints: vec![endpoint],
            conns: self.load_conns,
            clients: self.load_clients,
            stop: Stop::Total(self.key_space),
            keys: self.keys(self.val_size_bytes, true),
        }
    }

    fn step_spec(&self, step: &Step, endpoint: String) -> LoadSpec {
        LoadSpec {
            op: step.op,
            endpoints: vec![endpoint],
            conns: step.conns,
            clients: step.clients,
            stop: Stop::Duration(self.run_duration),
            keys: self.keys(step.val_size_bytes, false),
        }
    }
}

/// One workload measured on both servers.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub workload: String,
    pub etcd: Summary,
    pub ferrocd: Summary,
}

/// Resource use of one server.
#[derive(Clone, Debug, Serialize)]
pub struct Footprint {
    /// `VmHWM` at the end of the suite.
    pub peak_rss_bytes: u64,
    /// Apparent size of the data dir right after the load phase.
    pub data_dir_bytes_after_load: u64,
}

/// The whole result, also written as compare.json.
#[derive(Clone, Debug, Serialize)]
pub struct CompareReport {
    pub suite: SuiteName,
    pub cores: usize,
    pub keys_loaded: u64,
    pub val_size_bytes: usize,
    pub rounds: usize,
    pub run_duration_s: u64,
    pub ferrocd_args: Vec<String>,
    pub rows: Vec<Row>,
    pub etcd: Footprint,
    pub ferrocd: Footprint,
}

/// The two servers, in the order every step runs them.
struct Pair {
    etcd: ServerProcess,
    ferrocd: ServerProcess,
}

/// Runs the suite, prints the table, and writes compare.md and compare.json to `out_dir`.
pub async fn run(args: CompareArgs) -> BenchResult<CompareReport> {
    let suite = Suite::new(args.suite);
    std::fs::create_dir_all(&args.out_dir)?;
    let pair = start_pair(&args).await?;
    let report = run_suite(&suite, &pair, &args).await;
    // Kill both by PID whatever happened, before writing anything.
    drop(pair);
    let report = report?;
    let markdown = render_markdown(&report);
    println!("{markdown}");
    std::fs::write(args.out_dir.join("compare.md"), &markdown)?;
    std::fs::write(
        args.out_dir.join("compare.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    eprintln!(
        "wrote compare.md and compare.json to {}",
        args.out_dir.display()
    );
    Ok(report)
}

async fn start_pair(args: &CompareArgs) -> BenchResult<Pair> {
    let etcd = ServerProcess::start(ServerSpec {
        label: "etcd".into(),
        program: args.etcd.clone(),
        extra_args: Vec::new(),
    })
    .await?;
    let ferrocd = ServerProcess::start(ServerSpec {
        label: "ferrocd".into(),
        program: args.ferrocd.clone(),
        extra_args: args.ferrocd_args.clone(),
    })
    .await?;
    eprintln!(
        "etcd pid {} at {}, ferrocd pid {} at {}",
        etcd.pid(),
        etcd.endpoint(),
        ferrocd.pid(),
        ferrocd.endpoint()
    );
    Ok(Pair { etcd, ferrocd })
}

async fn run_suite(suite: &Suite, pair: &Pair, args: &CompareArgs) -> BenchResult<CompareReport> {
    let load_name = format!(
        "load {} keys (put c{})",
        suite.key_space, suite.load_clients
    );
    let mut rows = vec![
        measure(&load_name, 1, pair, |server| {
            suite.load_spec(server.endpoint())
        })
        .await?,
    ];
    let etcd_dir_bytes = pair.etcd.data_dir_size_bytes()?;
    let ferrocd_dir_bytes = pair.ferrocd.data_dir_size_bytes()?;
    for step in &suite.steps {
        let name = step.name(suite.val_size_bytes);
        let row = measure(&name, suite.rounds, pair, |server| {
            suite.step_spec(step, server.endpoint())
        })
        .await?;
        rows.push(row);
    }
    Ok(CompareReport {
        suite: args.suite,
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        keys_loaded: suite.key_space,
        val_size_bytes: suite.val_size_bytes,
        rounds: suite.rounds,
        run_duration_s: suite.run_duration.as_secs(),
        ferrocd_args: args.ferrocd_args.clone(),
        rows,
        etcd: Footprint {
            peak_rss_bytes: pair.etcd.peak_rss_bytes()?,
            data_dir_bytes_after_load: etcd_dir_bytes,
        },
        ferrocd: Footprint {
            peak_rss_bytes: pair.ferrocd.peak_rss_bytes()?,
            data_dir_bytes_after_load: ferrocd_dir_bytes,
        },
    })
}

/// Runs one workload `rounds` times on each server, etcd first, alternating.
async fn measure(
    name: &str,
    rounds: usize,
    pair: &Pair,
    spec_for: impl Fn(&ServerProcess) -> LoadSpec,
) -> BenchResult<Row> {
    let mut etcd = RunResult::default();
    let mut ferrocd = RunResult::default();
    for round in 1..=rounds {
        for (server, result) in [(&pair.etcd, &mut etcd), (&pair.ferrocd, &mut ferrocd)] {
            let run = load::run(&spec_for(server), false).await?;
            let summary = run.summary(name);
            eprintln!(
                "{name} round {round}/{rounds} {}: {:.0} ops/s p99 {} µs, {} errors",
                server.label(),
                summary.ops_per_s,
                summary.p99_us,
                summary.errors
            );
            result.merge(&run);
        }
    }
    Ok(Row {
        workload: name.to_string(),
        etcd: etcd.summary(name),
        ferrocd: ferrocd.summary(name),
    })
}

/// `ferrocd / etcd`, or `n/a` when etcd's value is zero.
fn ratio(etcd: f64, ferrocd: f64) -> String {
    if etcd > 0.0 {
        format!("{:.2}x", ferrocd / etcd)
    } else {
        "n/a".to_string()
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// The side-by-side tables. Ratios are ferrocd / etcd: above 1 is better for throughput, below
/// 1 is better for latency and footprint.
pub fn render_markdown(report: &CompareReport) -> String {
    let mut md = String::new();
    let mut line = |text: String| {
        md.push_str(&text);
        md.push('\n');
    };
    line(format!(
        "Suite `{:?}`: {} cores, {} keys of {} B values loaded, {} round(s) of {} s per workload \
         and server, ferrocd args {:?}. Ratios are ferrocd / etcd.",
        report.suite,
        report.cores,
        report.keys_loaded,
        report.val_size_bytes,
        report.rounds,
        report.run_duration_s,
        report.ferrocd_args
    ));
    line(String::new());
    line(
        "| workload | etcd ops/s | ferrocd ops/s | ratio | etcd p99 µs | ferrocd p99 µs | ratio |"
            .into(),
    );
    line("|---|---:|---:|---:|---:|---:|---:|".into());
    for row in &report.rows {
        line(format!(
            "| {} | {:.0} | {:.0} | {} | {} | {} | {} |",
            row.workload,
            row.etcd.ops_per_s,
            row.ferrocd.ops_per_s,
            ratio(row.etcd.ops_per_s, row.ferrocd.ops_per_s),
            row.etcd.p99_us,
            row.ferrocd.p99_us,
            ratio(row.etcd.p99_us as f64, row.ferrocd.p99_us as f64),
        ));
    }
    line(String::new());
    line("| footprint | etcd MiB | ferrocd MiB | ratio |".into());
    line("|---|---:|---:|---:|".into());
    let footprints = [
        (
            "peak RSS (VmHWM)",
            report.etcd.peak_rss_bytes,
            report.ferrocd.peak_rss_bytes,
        ),
        (
            "data dir after load",
            report.etcd.data_dir_bytes_after_load,
            report.ferrocd.data_dir_bytes_after_load,
        ),
    ];
    for (name, etcd, ferrocd) in footprints {
        line(format!(
            "| {name} | {:.1} | {:.1} | {} |",
            mib(etcd),
            mib(ferrocd),
            ratio(etcd as f64, ferrocd as f64)
        ));
    }
    for row in &report.rows {
        for (label, summary) in [("etcd", &row.etcd), ("ferrocd", &row.ferrocd)] {
            if summary.errors > 0 {
                line(format!(
                    "\n**{label}: {} errors in `{}`**, first: {}",
                    summary.errors,
                    row.workload,
                    summary.first_error.as_deref().unwrap_or("?")
                ));
            }
        }
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Latencies;

    fn summary(workload: &str, ops_per_s: u64, latency_us: u64, errors: u64) -> Summary {
        let mut latencies = Latencies::new();
        for _ in 0..ops_per_s {
            latencies.record(Duration::from_micros(latency_us));
        }
        Summary::new(workload, &latencies, errors, Duration::from_secs(1))
    }

    fn report() -> CompareReport {
        CompareReport {
            suite: SuiteName::Quick,
            cores: 2,
            keys_loaded: 10,
            val_size_bytes: 256,
            rounds: 1,
            run_duration_s: 4,
            ferrocd_args: Vec::new(),
            rows: vec![Row {
                workload: "put c64".into(),
                etcd: summary("put c64", 1000, 2000, 0),
                ferrocd: summary("put c64", 2000, 1000, 3),
            }],
            etcd: Footprint {
                peak_rss_bytes: 100 << 20,
                data_dir_bytes_after_load: 64 << 20,
            },
            ferrocd: Footprint {
                peak_rss_bytes: 50 << 20,
                data_dir_bytes_after_load: 0,
            },
        }
    }

    #[test]
    fn markdown_has_one_row_per_workload_with_ratios() {
        let md = render_markdown(&report());
        assert!(
            md.contains("| put c64 | 1000 | 2000 | 2.00x | 2000 | 1000 | 0.50x |"),
            "{md}"
        );
        assert!(
            md.contains("| peak RSS (VmHWM) | 100.0 | 50.0 | 0.50x |"),
            "{md}"
        );
        assert!(
            md.contains("| data dir after load | 64.0 | 0.0 | 0.00x |"),
            "{md}"
        );
        assert!(md.contains("**ferrocd: 3 errors in `put c64`**"), "{md}");
        assert!(!md.contains("etcd: 0 errors"), "{md}");
    }

    #[test]
    fn ratio_of_zero_is_not_a_number() {
        assert_eq!(ratio(0.0, 5.0), "n/a");
        assert_eq!(ratio(4.0, 1.0), "0.25x");
    }

    #[test]
    fn suites_are_valid_and_quick_is_short() {
        for name in [SuiteName::Quick, SuiteName::Full] {
            let suite = Suite::new(name);
            suite
                .load_spec("http://x".into())
                .validate()
                .expect("load spec");
            for step in &suite.steps {
                suite
                    .step_spec(step, "http://x".into())
                    .validate()
                    .expect("step spec");
            }
        }
        let quick = Suite::new(SuiteName::Quick);
        let measured_s =
            quick.steps.len() as u64 * 2 * quick.rounds as u64 * quick.run_duration.as_secs();
        assert!(measured_s <= 120, "quick suite measures {measured_s} s");
    }

    #[test]
    fn step_names_show_non_default_value_sizes() {
        let step = Step {
            op: Op::Put,
            clients: 64,
            conns: 8,
            val_size_bytes: 4096,
        };
        assert_eq!(step.name(256), "put c64 v4096");
        assert_eq!(step.name(4096), "put c64");
    }
}
