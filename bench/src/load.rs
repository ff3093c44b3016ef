//! The load generator: `clients` concurrent tasks spread over `conns` gRPC connections, each
//! issuing one request at a time until the run's request budget or deadline is used up.
//! KV workloads live here; `watch` and `lease-keepalive` add their own set-up around the same
//! request loop (see `crate::watch`, `crate::lease`).

use crate::stats::{Latencies, Percentiles, Summary, WatchCounts};
use crate::BenchResult;
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, KvClient, Txn, TxnOp};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long one connection attempt may take before the run fails.
const CONNECT_TIMEOUT_MS: u64 = 5_000;
/// Per-request limit: a hung server turns into counted errors instead of a hung benchmark.
/// Streams (watch, keep-alive) apply it to every awaited message themselves.
pub(crate) const REQUEST_TIMEOUT_MS: u64 = 10_000;
/// How often the progress line is refreshed.
const PROGRESS_INTERVAL_MS: u64 = 1_000;

/// Which read path a range request takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum Consistency {
    /// Linearizable: the default in etcd (goes through the leader's read index).
    #[value(name = "l")]
    Linearizable,
    /// Serializable: served from the member's local state, may be stale.
    #[value(name = "s")]
    Serializable,
}

/// The request mix of a run.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub enum Op {
    /// One Put per request.
    Put,
    /// One single-key Range per request.
    Range(Consistency),
    /// One Txn with no compares and a single Put in its success branch.
    TxnPut,
    /// A single-key Range with probability `read_ratio`, else a Put.
    Mixed {
        read_ratio: f64,
        consistency: Consistency,
    },
    /// One Txn comparing the key's mod revision, whose branches both hold a Range of the key
    /// with probability `read_ratio`, else a Put of it.
    TxnMixed { read_ratio: f64 },
    /// `watchers` watch streams on keys `0..watched_keys` while the clients put; measures the
    /// delivery latency of every event, and the puts' own latency with `slow_watchers` streams
    /// on every key that are never read (see `crate::watch`).
    Watch {
        watchers: usize,
        watched_keys: u64,
        slow_watchers: usize,
    },
    /// `leases` leases, each with its own keep-alive stream; one request is one keep-alive
    /// round trip (see `crate::lease`).
    LeaseKeepalive { leases: usize },
}

impl Op {
    /// A short label for summaries and tables, e.g. `range-s` or `mixed-0.9`.
    pub fn label(&self) -> String {
        let consistency_suffix = |c: &Consistency| match c {
            Consistency::Linearizable => "l",
            Consistency::Serializable => "s",
        };
        match self {
            Op::Put => "put".to_string(),
            Op::Range(c) => format!("range-{}", consistency_suffix(c)),
            Op::TxnPut => "txn-put".to_string(),
            Op::Mixed {
                read_ratio,
                consistency,
            } => format!("mixed-{read_ratio}-{}", consistency_suffix(consistency)),
            Op::TxnMixed { read_ratio } => format!("txn-mixed-{read_ratio}"),
            Op::Watch {
                watchers,
                slow_watchers: 0,
                ..
            } => format!("watch w{watchers}"),
            Op::Watch {
                watchers,
                slow_watchers,
                ..
            } => format!("watch w{watchers} slow{slow_watchers}"),
            Op::LeaseKeepalive { leases } => format!("lease-keepalive l{leases}"),
        }
    }

    /// The gRPC service beyond KV that the workload needs, if any.
    pub fn service(&self) -> Option<&'static str> {
        match self {
            Op::Watch { .. } => Some("Watch"),
            Op::LeaseKeepalive { .. } => Some("Lease"),
            _ => None,
        }
    }
}

/// When a run ends. Both variants bound every worker loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// After this many requests in all (successful or not).
    Total(u64),
    /// When this much time has passed since the start; requests in flight then still finish.
    Duration(Duration),
}

/// Which keys requests touch and how large the values are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeySpec {
    /// Every key is exactly this long: its index as zero-padded decimal.
    pub key_size_bytes: usize,
    pub val_size_bytes: usize,
    /// Keys are indices `0..key_space`.
    pub key_space: u64,
    /// Request `n` touches key `n % key_space` instead of a uniformly random key.
    pub sequential: bool,
}

impl KeySpec {
    /// Checks that `key_space` distinct keys fit in `key_size_bytes` decimal digits.
    pub fn validate(&self) -> Result<(), String> {
        if self.key_space == 0 {
            return Err("--key-space must be at least 1".into());
        }
        let digits_needed = (self.key_space - 1).to_string().len();
        if digits_needed > self.key_size_bytes {
            return Err(format!(
                "--key-space {} needs keys of at least {digits_needed} bytes, --key-size is {}",
                self.key_space, self.key_size_bytes
            ));
        }
        Ok(())
    }

    /// The key with index `index`: zero-padded decimal, `key_size_bytes` long.
    pub fn key(&self, index: u64) -> Vec<u8> {
        assert!(
            index < self.key_space,
            "key index {index} outside the key space"
        );
        format!("{index:0width$}", width = self.key_size_bytes).into_bytes()
    }

    fn pick_index(&self, request_seq: u64, rng: &mut StdRng) -> u64 {
        if self.sequential {
            request_seq % self.key_space
        } else {
            rng.gen_range(0..self.key_space)
        }
    }
}

/// Everything one run needs.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadSpec {
    pub op: Op,
    pub endpoints: Vec<String>,
    /// gRPC connections (one etcd-client `Client` each).
    pub conns: usize,
    /// Concurrent request loops, assigned to connections round-robin.
    pub clients: usize,
    pub stop: Stop,
    pub keys: KeySpec,
}

impl LoadSpec {
    pub fn validate(&self) -> Result<(), String> {
        if self.endpoints.is_empty() {
            return Err("at least one endpoint is needed".into());
        }
        if self.conns == 0 || self.clients == 0 {
            return Err("--conns and --clients must be at least 1".into());
        }
        if self.conns > self.clients {
            return Err(format!(
                "--conns {} exceeds --clients {}: the extra connections would carry nothing",
                self.conns, self.clients
            ));
        }
        match self.op {
            Op::Mixed { read_ratio, .. } | Op::TxnMixed { read_ratio } => {
                if !(0.0..=1.0).contains(&read_ratio) {
                    return Err(format!("--read-ratio {read_ratio} is not within 0..=1"));
                }
            }
            Op::Watch {
                watchers,
                watched_keys,
                ..
            } => crate::watch::validate(watchers, watched_keys, &self.keys)?,
            Op::LeaseKeepalive { leases } => {
                if leases < self.clients {
                    return Err(format!(
                        "--leases {leases} is below --clients {}: every client needs a lease",
                        self.clients
                    ));
                }
            }
            Op::Put | Op::Range(_) | Op::TxnPut => {}
        }
        self.keys.validate()
    }
}

/// The raw result of a run, mergeable across rounds.
#[derive(Clone, Debug, Default)]
pub struct RunResult {
    pub latencies: Latencies,
    pub errors: u64,
    pub elapsed: Duration,
    pub first_error: Option<String>,
    /// Event counts of a watch run.
    pub watch: Option<WatchCounts>,
    /// A watch run's puts (its `latencies` are event deliveries).
    pub put_latencies: Option<Latencies>,
}

impl RunResult {
    /// Adds another run of the same workload (rounds of a comparison).
    pub fn merge(&mut self, other: &RunResult) {
        self.latencies.merge(&other.latencies);
        self.errors += other.errors;
        self.elapsed += other.elapsed;
        if self.first_error.is_none() {
            self.first_error.clone_from(&other.first_error);
        }
        self.watch = match (self.watch, other.watch) {
            (Some(mine), Some(theirs)) => Some(mine.add(&theirs)),
            (mine, theirs) => mine.or(theirs),
        };
        match (&mut self.put_latencies, &other.put_latencies) {
            (Some(mine), Some(theirs)) => mine.merge(theirs),
            (mine, theirs) => {
                if mine.is_none() {
                    mine.clone_from(theirs)
                }
            }
        }
    }

    pub fn summary(&self, workload: &str) -> Summary {
        let mut summary = Summary::new(workload, &self.latencies, self.errors, self.elapsed);
        summary.first_error.clone_from(&self.first_error);
        summary.watch = self.watch;
        let put_latency = self.put_latencies.as_ref().map(Percentiles::of);
        summary.put_latency = put_latency.map(Box::new);
        summary
    }
}

/// Counters shared by the workers of one run.
pub(crate) struct Shared {
    stop: Stop,
    /// Also the zero of the send timestamps that watch puts carry in their values.
    pub(crate) started: Instant,
    /// Requests handed out so far; also the sequence number of the next one.
    issued: AtomicU64,
    /// Requests finished (either way), for the progress line.
    finished: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
    /// Successful puts to watched keys (watch runs only): the events each watcher must see.
    pub(crate) watched_puts: AtomicU64,
}

impl Shared {
    /// Starts the clock of the run.
    pub(crate) fn new(stop: Stop) -> Shared {
        Shared {
            stop,
            started: Instant::now(),
            issued: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            first_error: Mutex::new(None),
            watched_puts: AtomicU64::new(0),
        }
    }

    /// The sequence number of the next request, or `None` once the run is over.
    pub(crate) fn claim(&self) -> Option<u64> {
        match self.stop {
            Stop::Total(total) => {
                let seq = self.issued.fetch_add(1, Ordering::Relaxed);
                (seq < total).then_some(seq)
            }
            Stop::Duration(limit) => (self.started.elapsed() < limit)
                .then(|| self.issued.fetch_add(1, Ordering::Relaxed)),
        }
    }

    /// Counts `count` failures (requests, or events a watcher missed) described by `error`.
    pub(crate) fn record_errors(&self, count: u64, error: impl ToString) {
        self.errors.fetch_add(count, Ordering::Relaxed);
        let mut first = self.first_error.lock().expect("first_error lock");
        first.get_or_insert_with(|| error.to_string());
    }

    /// One request done, for the progress line.
    pub(crate) fn finish_one(&self) {
        self.finished.fetch_add(1, Ordering::Relaxed);
    }

    /// The error count and first error so far, with the time since the start.
    pub(crate) fn result(&self, latencies: Latencies) -> RunResult {
        RunResult {
            latencies,
            errors: self.errors.load(Ordering::Relaxed),
            elapsed: self.started.elapsed(),
            first_error: self.first_error.lock().expect("first_error lock").clone(),
            watch: None,
            put_latencies: None,
        }
    }
}

/// Runs `spec` and returns its latencies and error count.
///
/// `progress` prints a line with the running totals to stderr every second.
pub async fn run(spec: &LoadSpec, progress: bool) -> BenchResult<RunResult> {
    spec.validate()?;
    let clients = connect(spec).await?;
    match spec.op {
        Op::Watch {
            watchers,
            watched_keys,
            slow_watchers,
        } => {
            let counts = crate::watch::Watchers {
                watchers,
                watched_keys,
                slow_watchers,
            };
            crate::watch::run(spec, &clients, counts, progress).await
        }
        Op::LeaseKeepalive { leases } => crate::lease::run(spec, &clients, leases, progress).await,
        _ => {
            let shared = Arc::new(Shared::new(spec.stop));
            let latencies = run_kv_workers(spec, &clients, &shared, progress).await?;
            Ok(shared.result(latencies))
        }
    }
}

/// Runs the KV request loops of `spec` (the puts of a watch run too) to the end of the run.
pub(crate) async fn run_kv_workers(
    spec: &LoadSpec,
    clients: &[Client],
    shared: &Arc<Shared>,
    progress: bool,
) -> BenchResult<Latencies> {
    let workers = (0..spec.clients).map(|task| {
        let kv = clients[task % clients.len()].kv_client();
        let rng = StdRng::seed_from_u64(task as u64);
        tokio::spawn(worker(spec.op, spec.keys, kv, rng, shared.clone()))
    });
    join_workers(workers.collect(), shared, progress).await
}

/// Awaits every worker, showing progress meanwhile, and merges their latencies.
pub(crate) async fn join_workers(
    workers: Vec<tokio::task::JoinHandle<Latencies>>,
    shared: &Arc<Shared>,
    progress: bool,
) -> BenchResult<Latencies> {
    let reporter = progress.then(|| tokio::spawn(report_progress(shared.clone())));
    let mut latencies = Latencies::new();
    for worker in workers {
        latencies.merge(&worker.await?);
    }
    if let Some(reporter) = reporter {
        reporter.abort();
        if std::io::stderr().is_terminal() {
            eprintln!(); // Ends the line that was redrawn in place.
        }
    }
    Ok(latencies)
}

/// One `Client` per connection. Each is balanced over all endpoints, as etcd's own benchmark does.
pub(crate) async fn connect(spec: &LoadSpec) -> BenchResult<Vec<Client>> {
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_millis(CONNECT_TIMEOUT_MS))
        .with_timeout(Duration::from_millis(REQUEST_TIMEOUT_MS));
    let mut clients = Vec::with_capacity(spec.conns);
    for _ in 0..spec.conns {
        clients.push(Client::connect(&spec.endpoints, Some(options.clone())).await?);
    }
    Ok(clients)
}

/// Awaits `future` for at most `REQUEST_TIMEOUT_MS`. Stream messages need this: the client's
/// own timeout covers only the start of a call.
pub(crate) async fn bounded<T>(
    what: &str,
    future: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, etcd_client::Error> {
    let limit = Duration::from_millis(REQUEST_TIMEOUT_MS);
    tokio::time::timeout(limit, future)
        .await
        .unwrap_or_else(|_| {
            let message = format!("{what}: no answer within {REQUEST_TIMEOUT_MS} ms");
            Err(etcd_client::Error::IoError(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                message,
            )))
        })
}

/// One request loop: claims a sequence number, sends one request, waits for the answer.
async fn worker(
    op: Op,
    keys: KeySpec,
    mut kv: KvClient,
    mut rng: StdRng,
    shared: Arc<Shared>,
) -> Latencies {
    let mut value = vec![b'v'; keys.val_size_bytes];
    let mut latencies = Latencies::new();
    while let Some(seq) = shared.claim() {
        let index = keys.pick_index(seq, &mut rng);
        let key = keys.key(index);
        if let Op::Watch { .. } = op {
            crate::watch::stamp(&mut value, shared.started.elapsed());
        }
        let started = Instant::now();
        match send(op, &mut kv, key, &value, &mut rng).await {
            Ok(()) => {
                latencies.record(started.elapsed());
                if let Op::Watch { watched_keys, .. } = op {
                    if index < watched_keys {
                        shared.watched_puts.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Err(error) => shared.record_errors(1, error),
        }
        shared.finish_one();
    }
    latencies
}

async fn send(
    op: Op,
    kv: &mut KvClient,
    key: Vec<u8>,
    value: &[u8],
    rng: &mut StdRng,
) -> Result<(), etcd_client::Error> {
    match op {
        Op::Put | Op::Watch { .. } => kv.put(key, value, None).await.map(drop),
        Op::Range(consistency) => range(kv, key, consistency).await,
        Op::TxnPut => {
            let txn = Txn::new().and_then([TxnOp::put(key, value, None)]);
            kv.txn(txn).await.map(drop)
        }
        Op::Mixed {
            read_ratio,
            consistency,
        } => {
            if rng.gen_bool(read_ratio) {
                range(kv, key, consistency).await
            } else {
                kv.put(key, value, None).await.map(drop)
            }
        }
        Op::TxnMixed { read_ratio } => {
            let branch = if rng.gen_bool(read_ratio) {
                TxnOp::get(key.clone(), None)
            } else {
                TxnOp::put(key.clone(), value, None)
            };
            // Always true (a missing key compares as mod revision 0), and both branches are
            // the same, so the result never depends on the data; the server still reads the
            // key to evaluate the compare, which is the cost this workload measures.
            let txn = Txn::new()
                .when([Compare::mod_revision(key, CompareOp::Less, i64::MAX)])
                .and_then([branch.clone()])
                .or_else([branch]);
            kv.txn(txn).await.map(drop)
        }
        Op::LeaseKeepalive { .. } => unreachable!("keep-alives are sent by crate::lease"),
    }
}

async fn range(
    kv: &mut KvClient,
    key: Vec<u8>,
    consistency: Consistency,
) -> Result<(), etcd_client::Error> {
    let options = match consistency {
        Consistency::Linearizable => GetOptions::new(),
        Consistency::Serializable => GetOptions::new().with_serializable(),
    };
    kv.get(key, Some(options)).await.map(drop)
}

/// Prints running totals every `PROGRESS_INTERVAL_MS` until aborted by `run`.
async fn report_progress(shared: Arc<Shared>) {
    // On a terminal the line is redrawn in place; in a log every update is its own line.
    let end = if std::io::stderr().is_terminal() {
        "\r"
    } else {
        "\n"
    };
    let mut ticker = tokio::time::interval(Duration::from_millis(PROGRESS_INTERVAL_MS));
    ticker.tick().await; // The first tick fires at once.
    loop {
        ticker.tick().await;
        let finished = shared.finished.load(Ordering::Relaxed);
        let elapsed_s = shared.started.elapsed().as_secs_f64();
        eprint!(
            "{:>8.1} s  {finished:>10} requests  {:>6} errors  {:>10.0} req/s{end}",
            elapsed_s,
            shared.errors.load(Ordering::Relaxed),
            finished as f64 / elapsed_s,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(key_size_bytes: usize, key_space: u64) -> KeySpec {
        KeySpec {
            key_size_bytes,
            val_size_bytes: 8,
            key_space,
            sequential: true,
        }
    }

    #[test]
    fn keys_are_fixed_width_decimal() {
        assert_eq!(keys(8, 1000).key(42), b"00000042");
        assert_eq!(keys(3, 1000).key(999), b"999");
    }

    #[test]
    fn key_space_must_fit_the_key_size() {
        assert!(keys(3, 1000).validate().is_ok());
        assert!(keys(3, 1001).validate().is_err());
        assert!(keys(3, 0).validate().is_err());
    }

    #[test]
    fn sequential_keys_wrap_around_the_key_space() {
        let mut rng = StdRng::seed_from_u64(0);
        let spec = keys(4, 10);
        let picked: Vec<u64> = (8..13).map(|seq| spec.pick_index(seq, &mut rng)).collect();
        assert_eq!(picked, [8, 9, 0, 1, 2]);
    }

    #[test]
    fn random_keys_stay_inside_the_key_space() {
        let mut rng = StdRng::seed_from_u64(0);
        let spec = KeySpec {
            sequential: false,
            ..keys(4, 10)
        };
        assert!((0..1000).all(|seq| spec.pick_index(seq, &mut rng) < 10));
    }

    #[test]
    fn a_total_budget_hands_out_exactly_that_many_requests() {
        let shared = Shared::new(Stop::Total(3));
        let claimed: Vec<_> = std::iter::from_fn(|| shared.claim()).take(10).collect();
        assert_eq!(claimed, [0, 1, 2]);
    }

    #[test]
    fn a_deadline_stops_handing_out_requests() {
        assert_eq!(Shared::new(Stop::Duration(Duration::ZERO)).claim(), None);
        let shared = Shared::new(Stop::Duration(Duration::from_secs(3600)));
        assert_eq!((shared.claim(), shared.claim()), (Some(0), Some(1)));
    }

    #[test]
    fn labels_name_the_mix() {
        assert_eq!(Op::Range(Consistency::Serializable).label(), "range-s");
        let mixed = Op::Mixed {
            read_ratio: 0.9,
            consistency: Consistency::Linearizable,
        };
        assert_eq!(mixed.label(), "mixed-0.9-l");
    }
}
