//! `compare`: starts etcd and ferrocd side by side, runs the same workloads against each in
//! alternation (so slow drifts of the machine hit both alike), and reports the ratios as
//! Markdown, JSON and an SVG chart.
//!
//! A server that answers UNIMPLEMENTED for a workload's service (Watch, Lease), or that exits
//! at start-up when asked to form a cluster, is marked "unsupported" for those rows instead of
//! failing the comparison.

use crate::load::{self, Consistency, KeySpec, LoadSpec, Op, RunResult, Stop};
use crate::server::{Cluster, ServerSpec, StartFailure};
use crate::stats::Summary;
use crate::{as_unsupported, BenchResult};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

/// Which set of workloads to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SuiteName {
    /// About a minute and a half: one round of 4 s per workload and server.
    Quick,
    /// About fifteen minutes: three rounds of 10 s per workload and server, more workloads.
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
    /// Members per server (1 = single node).
    pub cluster_size: usize,
    /// Overrides the suite's number of loaded keys.
    pub keys: Option<u64>,
    /// Overrides the suite's step duration.
    pub step_duration: Option<Duration>,
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
    fn new(name: SuiteName, keys: Option<u64>, step_duration: Option<Duration>) -> Suite {
        const VAL_SIZE_BYTES: usize = 256;
        let key_space = keys.unwrap_or(match name {
            SuiteName::Quick => 5_000,
            SuiteName::Full => 100_000,
        });
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
        let watch = |watchers| Op::Watch {
            watchers,
            watched_keys: key_space,
            slow_watchers: 0,
        };
        let mut steps = vec![
            step(Op::Put, 1, 1),
            step(Op::Put, 64, 8),
            step(Op::TxnPut, 64, 8),
            step(Op::Range(Consistency::Linearizable), 64, 8),
            step(Op::Range(Consistency::Serializable), 64, 8),
            step(mixed, 64, 8),
            step(Op::TxnMixed { read_ratio: 0.5 }, 64, 8),
            step(watch(16), 8, 4),
            step(Op::LeaseKeepalive { leases: 64 }, 64, 8),
        ];
        let (rounds, default_duration, load_clients, load_conns) = match name {
            SuiteName::Quick => (1, Duration::from_secs(4), 32, 4),
            SuiteName::Full => {
                steps.extend([
                    step(Op::Range(Consistency::Linearizable), 1, 1),
                    step(Op::Put, 256, 16),
                    Step {
                        val_size_bytes: 4096,
                        ..step(Op::Put, 64, 8)
                    },
                    step(watch(256), 16, 8),
                    step(Op::LeaseKeepalive { leases: 1_000 }, 64, 8),
                ]);
                (3, Duration::from_secs(10), 64, 8)
            }
        };
        Suite {
            key_space,
            key_size_bytes: 8,
            val_size_bytes: VAL_SIZE_BYTES,
            load_clients,
            load_conns,
            rounds,
            run_duration: step_duration.unwrap_or(default_duration),
            steps,
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
    fn load_spec(&self, endpoints: Vec<String>) -> LoadSpec {
        LoadSpec {
            op: Op::Put,
            endpoints,
            conns: self.load_conns,
            clients: self.load_clients,
            stop: Stop::Total(self.key_space),
            keys: self.keys(self.val_size_bytes, true),
        }
    }

    fn step_spec(&self, step: &Step, endpoints: Vec<String>) -> LoadSpec {
        LoadSpec {
            op: step.op,
            endpoints,
            conns: step.conns,
            clients: step.clients,
            stop: Stop::Duration(self.run_duration),
            keys: self.keys(step.val_size_bytes, false),
        }
    }
}

/// One server's result for one workload.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Measured(Summary),
    /// Not run on this server, and why.
    Unsupported(String),
}

impl Side {
    pub fn summary(&self) -> Option<&Summary> {
        match self {
            Side::Measured(summary) => Some(summary),
            Side::Unsupported(_) => None,
        }
    }
}

/// One workload measured on both servers.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub workload: String,
    pub etcd: Side,
    pub ferrocd: Side,
}

impl Row {
    /// `(server label, side)` in table order.
    pub fn sides(&self) -> [(&'static str, &Side); 2] {
        [("etcd", &self.etcd), ("ferrocd", &self.ferrocd)]
    }
}

/// Resource use of one server (summed over the members of a cluster).
#[derive(Clone, Debug, Serialize)]
pub struct Footprint {
    /// `VmHWM` at the end of the suite, read before the server is stopped.
    pub peak_rss_bytes: u64,
    /// Apparent size of the data dir right after the load phase.
    pub data_dir_bytes_after_load: u64,
}

/// The whole result, also written as compare.json.
#[derive(Clone, Debug, Serialize)]
pub struct CompareReport {
    pub suite: SuiteName,
    pub cores: usize,
    /// Members per server.
    pub cluster_size: usize,
    pub keys_loaded: u64,
    pub val_size_bytes: usize,
    pub rounds: usize,
    pub run_duration_ms: u64,
    pub ferrocd_args: Vec<String>,
    pub rows: Vec<Row>,
    /// `None` when the server did not run at all (see the rows' reasons).
    pub etcd: Option<Footprint>,
    pub ferrocd: Option<Footprint>,
}

impl CompareReport {
    /// Failed requests (and missed events) over every measured run.
    pub fn errors(&self) -> u64 {
        let sides = self.rows.iter().flat_map(Row::sides);
        sides
            .filter_map(|(_, side)| side.summary())
            .map(|s| s.errors)
            .sum()
    }
}

/// One server under test: running, or not startable in this configuration.
struct Contender {
    cluster: Result<Cluster, String>,
    /// Services the server answered UNIMPLEMENTED for, with the message; learnt on first use.
    unsupported_services: Vec<(&'static str, String)>,
}

impl Contender {
    /// Why `op` cannot run on this server, if it cannot.
    fn unsupported(&self, op: &Op) -> Option<String> {
        if let Err(reason) = &self.cluster {
            return Some(reason.clone());
        }
        let service = op.service()?;
        let known = self
            .unsupported_services
            .iter()
            .find(|(s, _)| *s == service);
        known.map(|(_, reason)| reason.clone())
    }

    fn footprint(&self, data_dir_bytes_after_load: Option<u64>) -> BenchResult<Option<Footprint>> {
        let (Ok(cluster), Some(data_dir_bytes_after_load)) =
            (&self.cluster, data_dir_bytes_after_load)
        else {
            return Ok(None);
        };
        Ok(Some(Footprint {
            peak_rss_bytes: cluster.peak_rss_bytes()?,
            data_dir_bytes_after_load,
        }))
    }
}

/// Runs the suite, prints the table, and writes compare.md, compare.json and compare.svg to
/// `out_dir`.
pub async fn run(args: CompareArgs) -> BenchResult<CompareReport> {
    let suite = Suite::new(args.suite, args.keys, args.step_duration);
    std::fs::create_dir_all(&args.out_dir)?;
    let mut contenders = start_contenders(&args).await?;
    let report = run_suite(&suite, &mut contenders, &args).await;
    // Kill every member by PID whatever happened, before writing anything.
    drop(contenders);
    let report = report?;
    let markdown = render_markdown(&report);
    println!("{markdown}");
    std::fs::write(args.out_dir.join("compare.md"), &markdown)?;
    std::fs::write(
        args.out_dir.join("compare.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(
        args.out_dir.join("compare.svg"),
        crate::chart::render_svg(&report),
    )?;
    eprintln!(
        "wrote compare.md, compare.json and compare.svg to {}",
        args.out_dir.display()
    );
    Ok(report)
}

/// etcd must start; ferrocd may refuse a cluster size it cannot form (it exits at start-up),
/// which marks all of its rows unsupported.
async fn start_contenders(args: &CompareArgs) -> BenchResult<[Contender; 2]> {
    let etcd_spec = ServerSpec {
        label: "etcd".into(),
        program: args.etcd.clone(),
        extra_args: Vec::new(),
    };
    let etcd = Cluster::start(etcd_spec, args.cluster_size).await?;
    let ferrocd_spec = ServerSpec {
        label: "ferrocd".into(),
        program: args.ferrocd.clone(),
        extra_args: args.ferrocd_args.clone(),
    };
    let ferrocd = match Cluster::start(ferrocd_spec, args.cluster_size).await {
        Ok(cluster) => Ok(cluster),
        Err(error) => Err(unstartable_reason(error.as_ref(), args.cluster_size).ok_or(error)?),
    };
    eprintln!("etcd pids {:?} at {:?}", etcd.pids(), etcd.endpoints());
    match &ferrocd {
        Ok(cluster) => eprintln!(
            "ferrocd pids {:?} at {:?}",
            cluster.pids(),
            cluster.endpoints()
        ),
        Err(reason) => eprintln!("ferrocd: unsupported: {reason}"),
    }
    let contender = |cluster| Contender {
        cluster,
        unsupported_services: Vec::new(),
    };
    Ok([contender(Ok(etcd)), contender(ferrocd)])
}

/// The reason to mark a server unsupported when it exited at start-up as a cluster member;
/// `None` when the failure is a real one (single node, a hang, a spawn error).
fn unstartable_reason(
    error: &(dyn std::error::Error + Send + Sync + 'static),
    cluster_size: usize,
) -> Option<String> {
    let failure = error.downcast_ref::<StartFailure>()?;
    (cluster_size > 1 && failure.exited).then(|| {
        format!(
            "clustering not built ({} exited when started as a {cluster_size}-member cluster: {})",
            failure.label, failure.last_log_line
        )
    })
}

async fn run_suite(
    suite: &Suite,
    contenders: &mut [Contender; 2],
    args: &CompareArgs,
) -> BenchResult<CompareReport> {
    let load_name = format!(
        "load {} keys (put c{})",
        suite.key_space, suite.load_clients
    );
    let load_op = Op::Put;
    let load_row = measure(&load_name, &load_op, 1, contenders, |endpoints| {
        suite.load_spec(endpoints)
    })
    .await?;
    let mut dir_bytes = Vec::with_capacity(contenders.len());
    for contender in contenders.iter() {
        dir_bytes.push(match &contender.cluster {
            Ok(cluster) => Some(cluster.data_dir_size_bytes()?),
            Err(_) => None,
        });
    }
    let mut rows = vec![load_row];
    for step in &suite.steps {
        let name = step.name(suite.val_size_bytes);
        let row = measure(&name, &step.op, suite.rounds, contenders, |endpoints| {
            suite.step_spec(step, endpoints)
        })
        .await?;
        rows.push(row);
    }
    Ok(CompareReport {
        suite: args.suite,
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cluster_size: args.cluster_size,
        keys_loaded: suite.key_space,
        val_size_bytes: suite.val_size_bytes,
        rounds: suite.rounds,
        run_duration_ms: u64::try_from(suite.run_duration.as_millis()).unwrap_or(u64::MAX),
        ferrocd_args: args.ferrocd_args.clone(),
        rows,
        etcd: contenders[0].footprint(dir_bytes[0])?,
        ferrocd: contenders[1].footprint(dir_bytes[1])?,
    })
}

/// Runs one workload `rounds` times on each server, etcd first, alternating. A server that
/// answers UNIMPLEMENTED for the workload's service is marked, and not asked again.
async fn measure(
    name: &str,
    op: &Op,
    rounds: usize,
    contenders: &mut [Contender; 2],
    spec_for: impl Fn(Vec<String>) -> LoadSpec,
) -> BenchResult<Row> {
    let mut results = [RunResult::default(), RunResult::default()];
    for round in 1..=rounds {
        for (contender, result) in contenders.iter_mut().zip(results.iter_mut()) {
            if contender.unsupported(op).is_some() {
                continue;
            }
            let cluster = contender.cluster.as_ref().expect("supported means running");
            let label = cluster.label().to_string();
            match load::run(&spec_for(cluster.endpoints()), false).await {
                Ok(run) => {
                    let summary = run.summary(name);
                    eprintln!(
                        "{name} round {round}/{rounds} {label}: {:.0} ops/s p99 {} µs, {} errors",
                        summary.ops_per_s, summary.p99_us, summary.errors
                    );
                    result.merge(&run);
                }
                Err(error) => {
                    let Some(unsupported) = as_unsupported(error.as_ref()).cloned() else {
                        return Err(error);
                    };
                    eprintln!("{name} {label}: unsupported: {unsupported}");
                    let service = unsupported.service;
                    let reason = unsupported.to_string();
                    contender.unsupported_services.push((service, reason));
                }
            }
        }
    }
    let side = |contender: &Contender, result: &RunResult| match contender.unsupported(op) {
        Some(reason) => Side::Unsupported(reason),
        None => Side::Measured(result.summary(name)),
    };
    Ok(Row {
        workload: name.to_string(),
        etcd: side(&contenders[0], &results[0]),
        ferrocd: side(&contenders[1], &results[1]),
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

/// The ratio of `value` on both sides, or `n/a` when a side is missing.
fn ratio_of<T>(etcd: Option<T>, ferrocd: Option<T>, value: impl Fn(T) -> f64) -> String {
    match (etcd, ferrocd) {
        (Some(etcd), Some(ferrocd)) => ratio(value(etcd), value(ferrocd)),
        _ => "n/a".to_string(),
    }
}

fn cell<T>(value: Option<T>, show: impl Fn(T) -> String) -> String {
    value.map_or_else(|| "unsupported".to_string(), show)
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1024.0 * 1024.0))
}

/// Reads one number of a footprint.
type FootprintField = fn(&Footprint) -> u64;

/// The side-by-side tables. Ratios are ferrocd / etcd: above 1 is better for throughput, below
/// 1 is better for latency and footprint.
pub fn render_markdown(report: &CompareReport) -> String {
    let mut md = String::new();
    let mut line = |text: String| {
        md.push_str(&text);
        md.push('\n');
    };
    let topology = match report.cluster_size {
        1 => "single node".to_string(),
        n => format!("{n}-member clusters"),
    };
    line(format!(
        "Suite `{:?}`: {} cores, {topology}, {} keys of {} B values loaded, {} round(s) of {} ms \
         per workload and server, ferrocd args {:?}. Ratios are ferrocd / etcd.",
        report.suite,
        report.cores,
        report.keys_loaded,
        report.val_size_bytes,
        report.rounds,
        report.run_duration_ms,
        report.ferrocd_args
    ));
    line(String::new());
    line(
        "| workload | etcd ops/s | ferrocd ops/s | ratio | etcd p99 µs | ferrocd p99 µs | ratio |"
            .into(),
    );
    line("|---|---:|---:|---:|---:|---:|---:|".into());
    for row in &report.rows {
        let (etcd, ferrocd) = (row.etcd.summary(), row.ferrocd.summary());
        line(format!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            row.workload,
            cell(etcd, |s| format!("{:.0}", s.ops_per_s)),
            cell(ferrocd, |s| format!("{:.0}", s.ops_per_s)),
            ratio_of(etcd, ferrocd, |s| s.ops_per_s),
            cell(etcd, |s| s.p99_us.to_string()),
            cell(ferrocd, |s| s.p99_us.to_string()),
            ratio_of(etcd, ferrocd, |s| s.p99_us as f64),
        ));
    }
    line(String::new());
    line("| footprint | etcd MiB | ferrocd MiB | ratio |".into());
    line("|---|---:|---:|---:|".into());
    let footprints: [(&str, FootprintField); 2] = [
        ("peak RSS (VmHWM)", |f| f.peak_rss_bytes),
        ("data dir after load", |f| f.data_dir_bytes_after_load),
    ];
    for (name, bytes) in footprints {
        let (etcd, ferrocd) = (report.etcd.as_ref(), report.ferrocd.as_ref());
        line(format!(
            "| {name} | {} | {} | {} |",
            cell(etcd, |f| mib(bytes(f))),
            cell(ferrocd, |f| mib(bytes(f))),
            ratio_of(etcd, ferrocd, |f| bytes(f) as f64)
        ));
    }
    for note in notes(report) {
        line(String::new());
        line(note);
    }
    md
}

/// Errors, unsupported reasons (each once per server), and watch event counts.
fn notes(report: &CompareReport) -> Vec<String> {
    let mut notes = Vec::new();
    let mut reasons_told: Vec<(&str, &str)> = Vec::new();
    for row in &report.rows {
        for (label, side) in row.sides() {
            match side {
                Side::Unsupported(reason) => {
                    if !reasons_told.contains(&(label, reason.as_str())) {
                        reasons_told.push((label, reason.as_str()));
                        notes.push(format!(
                            "*{label} unsupported* (`{}`): {reason}",
                            row.workload
                        ));
                    }
                }
                Side::Measured(summary) => {
                    if let Some(watch) = &summary.watch {
                        notes.push(format!(
                            "{label} `{}`: {} of {} events received, {} duplicated",
                            row.workload,
                            watch.events_received,
                            watch.events_expected,
                            watch.events_duplicated
                        ));
                    }
                    if summary.errors > 0 {
                        notes.push(format!(
                            "**{label}: {} errors in `{}`**, first: {}",
                            summary.errors,
                            row.workload,
                            summary.first_error.as_deref().unwrap_or("?")
                        ));
                    }
                }
            }
        }
    }
    notes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{Latencies, WatchCounts};

    fn summary(workload: &str, ops_per_s: u64, latency_us: u64, errors: u64) -> Summary {
        let mut latencies = Latencies::new();
        for _ in 0..ops_per_s {
            latencies.record(Duration::from_micros(latency_us));
        }
        Summary::new(workload, &latencies, errors, Duration::from_secs(1))
    }

    pub(crate) fn report() -> CompareReport {
        let mut watch = summary("watch w2 c1", 10, 300, 0);
        watch.watch = Some(WatchCounts {
            watchers: 2,
            slow_watchers: 0,
            puts: 5,
            events_expected: 10,
            events_received: 10,
            events_duplicated: 0,
        });
        let no_lease = "the server does not implement the Lease service".to_string();
        CompareReport {
            suite: SuiteName::Quick,
            cores: 2,
            cluster_size: 1,
            keys_loaded: 10,
            val_size_bytes: 256,
            rounds: 1,
            run_duration_ms: 4000,
            ferrocd_args: Vec::new(),
            rows: vec![
                Row {
                    workload: "put c64".into(),
                    etcd: Side::Measured(summary("put c64", 1000, 2000, 0)),
                    ferrocd: Side::Measured(summary("put c64", 2000, 1000, 3)),
                },
                Row {
                    workload: "watch w2 c1".into(),
                    etcd: Side::Measured(watch.clone()),
                    ferrocd: Side::Measured(watch),
                },
                Row {
                    workload: "lease-keepalive l4 c4".into(),
                    etcd: Side::Measured(summary("lease-keepalive l4 c4", 500, 100, 0)),
                    ferrocd: Side::Unsupported(no_lease.clone()),
                },
                Row {
                    workload: "lease-keepalive l8 c8".into(),
                    etcd: Side::Measured(summary("lease-keepalive l8 c8", 500, 100, 0)),
                    ferrocd: Side::Unsupported(no_lease),
                },
            ],
            etcd: Some(Footprint {
                peak_rss_bytes: 100 << 20,
                data_dir_bytes_after_load: 64 << 20,
            }),
            ferrocd: Some(Footprint {
                peak_rss_bytes: 50 << 20,
                data_dir_bytes_after_load: 0,
            }),
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
        assert!(
            md.contains("etcd `watch w2 c1`: 10 of 10 events received, 0 duplicated"),
            "{md}"
        );
    }

    #[test]
    fn unsupported_sides_are_marked_with_their_reason_once() {
        let md = render_markdown(&report());
        assert!(
            md.contains(
                "| lease-keepalive l4 c4 | 500 | unsupported | n/a | 100 | unsupported | n/a |"
            ),
            "{md}"
        );
        assert_eq!(
            md.matches("does not implement the Lease service").count(),
            1,
            "{md}"
        );
        let json = serde_json::to_value(report()).expect("json");
        let ferrocd = &json["rows"][2]["ferrocd"];
        assert!(ferrocd["unsupported"].is_string(), "{ferrocd}");
        assert_eq!(json["rows"][2]["etcd"]["measured"]["ops"], 500);
        assert_eq!(report().errors(), 3, "unsupported sides count no errors");
    }

    #[test]
    fn a_server_that_did_not_run_has_no_footprint() {
        let mut report = report();
        report.ferrocd = None;
        report.cluster_size = 3;
        let md = render_markdown(&report);
        assert!(md.contains("3-member clusters"), "{md}");
        assert!(
            md.contains("| peak RSS (VmHWM) | 100.0 | unsupported | n/a |"),
            "{md}"
        );
    }

    #[test]
    fn only_a_cluster_member_that_exited_counts_as_unsupported() {
        let exited = |exited| StartFailure {
            label: "ferrocd".into(),
            exited,
            last_log_line: "clustering is not supported yet".into(),
            message: "did not start".into(),
        };
        let reason = unstartable_reason(&exited(true), 3).expect("unsupported");
        assert!(reason.starts_with("clustering not built"), "{reason}");
        assert!(
            reason.contains("clustering is not supported yet"),
            "{reason}"
        );
        assert_eq!(
            unstartable_reason(&exited(true), 1),
            None,
            "single node must start"
        );
        assert_eq!(
            unstartable_reason(&exited(false), 3),
            None,
            "a hang is a failure"
        );
        let other: Box<dyn std::error::Error + Send + Sync> = "spawn failed".into();
        assert_eq!(unstartable_reason(other.as_ref(), 3), None);
    }

    #[test]
    fn ratio_of_zero_is_not_a_number() {
        assert_eq!(ratio(0.0, 5.0), "n/a");
        assert_eq!(ratio(4.0, 1.0), "0.25x");
    }

    #[test]
    fn suites_are_valid_and_quick_is_short() {
        for name in [SuiteName::Quick, SuiteName::Full] {
            let suite = Suite::new(name, None, None);
            suite
                .load_spec(vec!["http://x".into()])
                .validate()
                .expect("load spec");
            for step in &suite.steps {
                suite
                    .step_spec(step, vec!["http://x".into()])
                    .validate()
                    .expect("step spec");
            }
        }
        let quick = Suite::new(SuiteName::Quick, None, None);
        let measured_s =
            quick.steps.len() as u64 * 2 * quick.rounds as u64 * quick.run_duration.as_secs();
        assert!(measured_s <= 120, "quick suite measures {measured_s} s");
    }

    #[test]
    fn overrides_shrink_the_suite_and_watchers_follow_the_key_space() {
        let suite = Suite::new(
            SuiteName::Quick,
            Some(200),
            Some(Duration::from_millis(300)),
        );
        assert_eq!(suite.key_space, 200);
        assert_eq!(suite.run_duration, Duration::from_millis(300));
        let watched: Vec<u64> = suite
            .steps
            .iter()
            .filter_map(|step| match step.op {
                Op::Watch { watched_keys, .. } => Some(watched_keys),
                _ => None,
            })
            .collect();
        assert_eq!(watched, [200]);
        for step in &suite.steps {
            let spec = suite.step_spec(step, vec!["http://x".into()]);
            spec.validate().expect("step spec");
        }
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
