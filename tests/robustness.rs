//! Robustness harness: concurrent clients, each on its own connection, run a random mix of
//! gets, prefix ranges, puts, deletes and compare-and-set txns against a real single-node
//! server while a fault task crashes it (kill -9 and restart), freezes it (SIGSTOP/SIGCONT)
//! or leaves it alone. Each round's history goes through the linearizability checker
//! (tests/linearizability) with the etcd model, every acknowledged write is read back at its
//! revision, and revisions may never go backwards across a restart.
//!
//! Short mode (default): `SHORT_ROUNDS` rounds of `ROUND_MS` per fault kind. Soak mode:
//! `FERROCD_ROBUST_DURATION_S=3600` runs rounds for that long per fault kind, each round
//! checked on its own from the quiescent state read before it. `FERROCD_ROBUST_SEED` fixes the
//! seeds (printed with every failure). `FERROCD_TEST_SERVER=etcd` runs it all against real
//! etcd, which validates the harness and the model. Figures are printed per round and per
//! fault kind (`cargo test --test robustness -- --nocapture`).

mod common;
mod linearizability;

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::{Flavor, Server};
use etcd_client::{
    Client, Compare as EtcdCompare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp,
    TxnOpResponse,
};
use linearizability::etcd::{Compare, EtcdModel, KeyValue, Request, Response, State};
use linearizability::{check, Budget, Operation, Outcome, Report, Verdict};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

type Op = Operation<Request, Response>;

const SERVER_ARGS: [&str; 2] = ["--shards", "4"];
/// The workload's keys are `robust/<n>`; few, so that clients collide on them.
const KEY_PREFIX: &str = "robust/";
const KEYS: usize = 8;
const CLIENTS: usize = 4;

/// One round: clients run this long (or `MAX_OPS_PER_CLIENT` requests), then it is checked.
const ROUND_MS: u64 = 4_000;
/// The checker's self-test on a real history needs only a short one.
const SELF_TEST_ROUND_MS: u64 = 1_000;
const MAX_OPS_PER_CLIENT: usize = 20_000;
/// Rounds per fault kind without `FERROCD_ROBUST_DURATION_S`.
const SHORT_ROUNDS: u64 = 3;
const SEED_ENV: &str = "FERROCD_ROBUST_SEED";
const DURATION_ENV: &str = "FERROCD_ROBUST_DURATION_S";

/// Client limits: a request outlives any pause (`PAUSE_LENGTH_MS`), so a pause alone never
/// turns an outcome unknown; a hung server still fails the round instead of hanging it.
const REQUEST_TIMEOUT_MS: u64 = 5_000;
const CONNECT_TIMEOUT_MS: u64 = 1_000;
/// After a lost connection a client polls a real request until the server answers again.
const RECONNECT_DEADLINE_MS: u64 = 30_000;
const RECONNECT_POLL_MS: u64 = 20;
/// Bound on collecting the clients after the round's end.
const CLIENT_JOIN_TIMEOUT_MS: u64 = RECONNECT_DEADLINE_MS + 2 * REQUEST_TIMEOUT_MS;

/// Fault schedule: time between faults, and how long a SIGSTOP lasts.
const KILL_INTERVAL_MS: Range<u64> = 200..800;
const PAUSE_INTERVAL_MS: Range<u64> = 200..600;
const PAUSE_LENGTH_MS: Range<u64> = 100..500;

/// The checker gives up (and the round fails) past these.
const CHECK_BUDGET: Budget = Budget {
    max_steps: 50_000_000,
    max_time: Duration::from_secs(60),
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    Kill,
    Pause,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::None => "none",
            Fault::Kill => "kill9",
            Fault::Pause => "sigstop",
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linearizable_without_faults() {
    run_fault_kind(Fault::None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linearizable_across_kill9_and_restart() {
    run_fault_kind(Fault::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linearizable_across_sigstop_pauses() {
    run_fault_kind(Fault::Pause).await;
}

/// The pipeline can fail: a real history, recorded from the server under test, is accepted
/// as recorded and rejected once one read's value is changed, or once the final read reports
/// an older revision than the last write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_real_history_is_rejected() {
    let seed = base_seed();
    let context = format!("self-test seed {seed} (reproduce: {SEED_ENV}={seed})");
    let mut server = Server::subject(&SERVER_ARGS).await;
    let recorded = record_round(
        &mut server,
        Fault::None,
        seed,
        0,
        SELF_TEST_ROUND_MS,
        &context,
    )
    .await;
    let (init, history) = (&recorded.init, &recorded.history);
    check_history(&server, Fault::None, init, history, &context);

    let mut changed_value = history.clone();
    let read = changed_value
        .iter_mut()
        .find_map(|op| match &mut op.outcome {
            Outcome::Ok(Response::Range { kvs, .. }) => kvs.first_mut().map(|(_, kv)| kv),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{context}: no range read returned a key"));
    read.value = "never-written".to_string();
    assert_rejected(init, &changed_value, &context);

    let mut older_final_read = history.clone();
    let Some(Outcome::Ok(Response::Range { revision, .. })) =
        older_final_read.last_mut().map(|op| &mut op.outcome)
    else {
        panic!("{context}: the history ends with the final range read");
    };
    *revision -= 1;
    assert_rejected(init, &older_final_read, &context);
}

fn assert_rejected(init: &State, history: &[Op], context: &str) {
    let report = check(&EtcdModel::default(), init, history, CHECK_BUDGET);
    assert!(
        matches!(report.verdict, Verdict::Illegal(_)),
        "{context}: a corrupted history was not rejected: {:?}",
        report.verdict
    );
}

/// Runs every round of one fault kind on one server and prints the totals.
async fn run_fault_kind(fault: Fault) {
    let base_seed = base_seed();
    let mut server = Server::subject(&SERVER_ARGS).await;
    let server_name = match server.flavor() {
        Flavor::Etcd => "etcd",
        Flavor::Ferrocd(_) => "ferrocd",
    };
    let mut totals = Figures::default();
    for round in 0..rounds() {
        let seed = base_seed.wrapping_add(round);
        let context = format!(
            "fault {} round {round} seed {seed} (reproduce: {SEED_ENV}={base_seed})",
            fault.name()
        );
        let figures = run_round(&mut server, fault, seed, round, &context).await;
        println!("robustness {server_name} {context}: {figures}");
        totals.add(&figures);
    }
    println!(
        "robustness {server_name} fault {} TOTAL: {totals}",
        fault.name()
    );
}

fn base_seed() -> u64 {
    match std::env::var(SEED_ENV) {
        Ok(seed) => seed
            .parse()
            .unwrap_or_else(|e| panic!("{SEED_ENV}={seed}: {e}")),
        Err(_) => {
            let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH);
            now.expect("clock after 1970").as_nanos() as u64
        }
    }
}

fn rounds() -> u64 {
    match std::env::var(DURATION_ENV) {
        Ok(seconds) => {
            let seconds: u64 = seconds
                .parse()
                .unwrap_or_else(|e| panic!("{DURATION_ENV}={seconds}: {e}"));
            (seconds * 1_000).div_ceil(ROUND_MS).max(1)
        }
        Err(_) => SHORT_ROUNDS,
    }
}

// ---------------------------------------------------------------------------------------------
// Figures
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct Figures {
    histories: u64,
    ops_checked: u64,
    unknown_ops: u64,
    definite_failures: u64,
    faults: u64,
    acked_writes_verified: u64,
    /// Histories that were linearizable only with revisions consumed by lost writes.
    needed_revision_gaps: u64,
    max_check_ms: u128,
    max_steps: u64,
}

impl Figures {
    fn add(&mut self, other: &Figures) {
        self.histories += other.histories;
        self.ops_checked += other.ops_checked;
        self.unknown_ops += other.unknown_ops;
        self.definite_failures += other.definite_failures;
        self.faults += other.faults;
        self.acked_writes_verified += other.acked_writes_verified;
        self.needed_revision_gaps += other.needed_revision_gaps;
        self.max_check_ms = self.max_check_ms.max(other.max_check_ms);
        self.max_steps = self.max_steps.max(other.max_steps);
    }
}

impl std::fmt::Display for Figures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "histories {} (rejected 0), ops checked {} (unknown outcome {}, definite errors {}), \
             faults {}, acknowledged writes verified {} (lost 0), needed revision gaps {}, \
             max check {} ms, max steps {}",
            self.histories,
            self.ops_checked,
            self.unknown_ops,
            self.definite_failures,
            self.faults,
            self.acked_writes_verified,
            self.needed_revision_gaps,
            self.max_check_ms,
            self.max_steps
        )
    }
}

// ---------------------------------------------------------------------------------------------
// A round
// ---------------------------------------------------------------------------------------------

/// What clients and the fault task share.
struct Shared {
    /// The server's client URL; a restart may move it (the harness retries taken ports).
    endpoint: Mutex<String>,
    /// The highest revision any response has reported so far.
    max_revision: AtomicI64,
}

impl Shared {
    fn endpoint(&self) -> String {
        self.endpoint.lock().expect("endpoint lock").clone()
    }
}

async fn run_round(
    server: &mut Server,
    fault: Fault,
    seed: u64,
    round: u64,
    context: &str,
) -> Figures {
    let recorded = record_round(server, fault, seed, round, ROUND_MS, context).await;
    let history = &recorded.history;
    let (report, needed_gaps) = check_history(server, fault, &recorded.init, history, context);
    let mut client = server.client().await;
    let acked_writes_verified = verify_acknowledged_writes(&mut client, history, context).await;
    if needed_gaps {
        let gaps = revisions_without_change(&mut client, &recorded.init, history).await;
        println!("{context}: revisions that changed nothing: {gaps:?}");
    }
    Figures {
        histories: 1,
        ops_checked: report.ops_checked as u64,
        unknown_ops: report.unknown_ops as u64,
        definite_failures: recorded.definite_failures,
        faults: recorded.faults,
        acked_writes_verified,
        needed_revision_gaps: u64::from(needed_gaps),
        max_check_ms: report.elapsed.as_millis(),
        max_steps: report.steps,
    }
}

/// A round's history and what it started from.
struct Recorded {
    init: State,
    history: Vec<Op>,
    faults: u64,
    definite_failures: u64,
}

/// Reads the quiescent state, runs the clients for `duration_ms` while injecting `fault`,
/// then appends a final read of the whole key space to the history.
async fn record_round(
    server: &mut Server,
    fault: Fault,
    seed: u64,
    round: u64,
    duration_ms: u64,
    context: &str,
) -> Recorded {
    let init = read_state(&server.client().await).await;
    let shared = Arc::new(Shared {
        endpoint: Mutex::new(server.endpoint()),
        max_revision: AtomicI64::new(init.revision),
    });
    let origin = Instant::now();
    let deadline = origin + Duration::from_millis(duration_ms);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|id| {
            let worker = Worker {
                id,
                round,
                rng: StdRng::seed_from_u64(seed ^ (id as u64 + 1).wrapping_mul(0x9E37_79B9)),
                shared: Arc::clone(&shared),
                origin,
                deadline,
            };
            tokio::spawn(worker.run())
        })
        .collect();
    let faults = inject_faults(server, fault, seed, origin, deadline, &shared, context).await;

    let mut history = Vec::new();
    let mut definite_failures = 0;
    for client in clients {
        let join = tokio::time::timeout(Duration::from_millis(CLIENT_JOIN_TIMEOUT_MS), client);
        let log = join
            .await
            .unwrap_or_else(|_| panic!("{context}: a client hung"))
            .expect("client task");
        history.extend(log.ops);
        definite_failures += log.definite_failures;
    }
    bound_unknown_outcomes(&mut history, &faults.kills_ns);
    history.push(final_read(server, origin).await);
    Recorded {
        init,
        history,
        faults: faults.count,
        definite_failures,
    }
}

/// An operation with an unknown outcome can only have taken effect in the server process its
/// request reached, which was alive when the client gave up on it: it took effect before the
/// first kill after that instant, or never. Without a kill after it, it stays unbounded.
fn bound_unknown_outcomes(history: &mut [Op], kills_ns: &[u64]) {
    for op in history
        .iter_mut()
        .filter(|op| op.outcome == Outcome::Unknown)
    {
        let gave_up_ns = op.return_ns;
        let first_kill = kills_ns
            .iter()
            .copied()
            .find(|&kill_ns| kill_ns >= gave_up_ns);
        op.return_ns = first_kill.unwrap_or(u64::MAX);
    }
}

/// Checks the history with the strict model, then, where ferrocd may leave revision gaps
/// (kill -9), with gaps allowed on unknown writes. Panics unless one of them accepts it.
fn check_history(
    server: &Server,
    fault: Fault,
    init: &State,
    history: &[Op],
    context: &str,
) -> (Report, bool) {
    let strict = check(&EtcdModel::default(), init, history, CHECK_BUDGET);
    let gaps_possible = fault == Fault::Kill && matches!(server.flavor(), Flavor::Ferrocd(_));
    let (report, needed_gaps) = match &strict.verdict {
        Verdict::Illegal(explanation) if gaps_possible => {
            let model = EtcdModel {
                revision_gaps: true,
            };
            let report = check(&model, init, history, CHECK_BUDGET);
            if report.verdict == Verdict::Linearizable {
                println!(
                    "{context}: linearizable only with revision gaps; strict model: {explanation}"
                );
            }
            (report, true)
        }
        _ => (strict, false),
    };
    match &report.verdict {
        Verdict::Linearizable => (report, needed_gaps),
        Verdict::Illegal(explanation) => panic!(
            "{context}: history of {} operations is not linearizable (revision gaps allowed: \
             {needed_gaps})\n{explanation}",
            report.ops_checked
        ),
        Verdict::Unknown(why) => panic!(
            "{context}: the checker gave up on {} operations: {why}",
            report.ops_checked
        ),
    }
}

/// What the fault task did.
#[derive(Default)]
struct FaultLog {
    count: u64,
    /// When each killed process was dead (reaped), in ns since the round's origin, ascending.
    kills_ns: Vec<u64>,
}

/// The fault task: injects `fault` at random intervals until `deadline`, leaving the server
/// running.
async fn inject_faults(
    server: &mut Server,
    fault: Fault,
    seed: u64,
    origin: Instant,
    deadline: Instant,
    shared: &Shared,
    context: &str,
) -> FaultLog {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xFA17);
    let mut log = FaultLog::default();
    let interval_ms = match fault {
        Fault::None => return log,
        Fault::Kill => KILL_INTERVAL_MS,
        Fault::Pause => PAUSE_INTERVAL_MS,
    };
    loop {
        let next = Instant::now() + Duration::from_millis(rng.gen_range(interval_ms.clone()));
        if next >= deadline {
            return log;
        }
        tokio::time::sleep_until(next.into()).await;
        match fault {
            Fault::Kill => {
                let kill_ns = crash_and_restart(server, shared, origin, context).await;
                log.kills_ns.push(kill_ns);
            }
            Fault::Pause => {
                server.pause();
                let length_ms = rng.gen_range(PAUSE_LENGTH_MS);
                tokio::time::sleep(Duration::from_millis(length_ms)).await;
                server.resume();
            }
            Fault::None => unreachable!("no faults to inject"),
        }
        log.count += 1;
    }
}

/// kill -9 and restart (the harness's `crash_restart`, in two steps to time the death); the
/// first answer after it may not report an older revision than any answer before it.
/// Returns when the killed process was dead, in ns since `origin`.
async fn crash_and_restart(
    server: &mut Server,
    shared: &Shared,
    origin: Instant,
    context: &str,
) -> u64 {
    let max_before = shared.max_revision.load(Ordering::SeqCst);
    server.kill9();
    let killed_ns = nanos_since(origin);
    server.start().await;
    *shared.endpoint.lock().expect("endpoint lock") = server.endpoint();
    let after = server.client().await.get(KEY_PREFIX, None).await;
    let revision = after
        .unwrap_or_else(|e| panic!("{context}: first request after restart: {e}"))
        .header()
        .expect("header")
        .revision();
    assert!(
        revision >= max_before,
        "{context}: revision went back from {max_before} to {revision} across a restart"
    );
    killed_ns
}

/// The whole key space at one revision, read when no client runs.
async fn read_state(client: &Client) -> State {
    let mut client = client.clone();
    let response = client
        .get(KEY_PREFIX, Some(GetOptions::new().with_prefix()))
        .await
        .expect("read the key space");
    State {
        revision: response.header().expect("header").revision(),
        kvs: response
            .kvs()
            .iter()
            .map(|kv| (utf8(kv.key()), key_value(kv)))
            .collect(),
    }
}

/// A Range of the whole key space after every client stopped, as the history's last
/// operation: the final state must be the replay of a linearization.
async fn final_read(server: &Server, origin: Instant) -> Op {
    let mut client = server.client().await;
    let request = Request::Range {
        prefix: KEY_PREFIX.to_string(),
    };
    let call_ns = nanos_since(origin);
    let response = execute(&mut client, &request)
        .await
        .unwrap_or_else(|e| panic!("final read: {e}"));
    Operation {
        client: CLIENTS,
        call_ns,
        return_ns: nanos_since(origin),
        input: request,
        outcome: Outcome::Ok(response),
    }
}

/// Reads every acknowledged write back at its own revision: a put's value with that mod
/// revision, a delete's absence. Returns how many it verified; panics listing any lost.
async fn verify_acknowledged_writes(client: &mut Client, history: &[Op], context: &str) -> u64 {
    let mut verified = 0;
    let mut lost = Vec::new();
    for op in history {
        let Outcome::Ok(response) = &op.outcome else {
            continue;
        };
        let (key, expected) = match (&op.input, response) {
            (Request::Put { key, value }, Response::Put { revision })
            | (
                Request::CompareAndSet { key, value, .. },
                Response::CompareAndSet {
                    revision,
                    succeeded: true,
                    ..
                },
            ) => (key, Some((value.as_str(), *revision))),
            (Request::Delete { key }, Response::Delete { deleted: 1, .. }) => (key, None),
            _ => continue,
        };
        let revision = response.revision();
        let options = GetOptions::new().with_revision(revision);
        let read = client
            .get(key.as_str(), Some(options))
            .await
            .unwrap_or_else(|e| panic!("{context}: read {key} at {revision}: {e}"));
        let found = read
            .kvs()
            .first()
            .map(|kv| (utf8(kv.value()), kv.mod_revision()));
        let matches = match (expected, &found) {
            (Some((value, revision)), Some((found_value, found_revision))) => {
                value == found_value && revision == *found_revision
            }
            (None, None) => true,
            _ => false,
        };
        if matches {
            verified += 1;
        } else {
            lost.push(format!("{op:?}: at revision {revision} found {found:?}"));
        }
    }
    assert!(
        lost.is_empty(),
        "{context}: {} acknowledged writes lost:\n{}",
        lost.len(),
        lost.join("\n")
    );
    verified
}

/// Revisions of the round at which the key space is the same as one revision before: the
/// evidence for revision gaps, listed when a history needed the gap model.
async fn revisions_without_change(client: &mut Client, init: &State, history: &[Op]) -> Vec<i64> {
    let last = history.last().expect("the final read");
    let Outcome::Ok(Response::Range {
        revision: final_revision,
        ..
    }) = &last.outcome
    else {
        panic!("the history ends with the final range read");
    };
    let mut gaps = Vec::new();
    let mut before = init.kvs.clone();
    for revision in init.revision + 1..=*final_revision {
        let options = GetOptions::new().with_prefix().with_revision(revision);
        let read = client
            .get(KEY_PREFIX, Some(options))
            .await
            .unwrap_or_else(|e| panic!("read the key space at {revision}: {e}"));
        let at: BTreeMap<String, KeyValue> = read
            .kvs()
            .iter()
            .map(|kv| (utf8(kv.key()), key_value(kv)))
            .collect();
        if at == before {
            gaps.push(revision);
        }
        before = at;
    }
    gaps
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct ClientLog {
    ops: Vec<Op>,
    definite_failures: u64,
}

/// One client on its own connection.
struct Worker {
    id: usize,
    round: u64,
    rng: StdRng,
    shared: Arc<Shared>,
    origin: Instant,
    deadline: Instant,
}

impl Worker {
    async fn run(mut self) -> ClientLog {
        let mut client = connect(&self.shared).await;
        // The last value and mod revision this client saw per key (None: absent), which its
        // compare-and-sets compare against.
        let mut seen: HashMap<String, Option<(String, i64)>> = HashMap::new();
        let mut log = ClientLog::default();
        for seq in 0..MAX_OPS_PER_CLIENT {
            if Instant::now() >= self.deadline {
                break;
            }
            let request = self.next_request(seq, &seen);
            let call_ns = nanos_since(self.origin);
            let result = execute(&mut client, &request).await;
            let return_ns = nanos_since(self.origin);
            let outcome = match result {
                Ok(response) => {
                    observe(&mut seen, &request, &response);
                    let revision = response.revision();
                    self.shared
                        .max_revision
                        .fetch_max(revision, Ordering::SeqCst);
                    Outcome::Ok(response)
                }
                Err(error) if is_definite(&error) => {
                    log.definite_failures += 1;
                    Outcome::Failed
                }
                Err(_) => Outcome::Unknown,
            };
            let lost_connection = outcome == Outcome::Unknown;
            log.ops.push(Operation {
                client: self.id,
                call_ns,
                return_ns,
                input: request,
                outcome,
            });
            if lost_connection {
                client = connect(&self.shared).await;
            }
        }
        log
    }

    fn next_request(
        &mut self,
        seq: usize,
        seen: &HashMap<String, Option<(String, i64)>>,
    ) -> Request {
        let key = format!("{KEY_PREFIX}{}", self.rng.gen_range(0..KEYS));
        let value = format!("r{}c{}n{seq}", self.round, self.id);
        match self.rng.gen_range(0..100) {
            0..25 => Request::Get { key },
            25..35 => Request::Range {
                prefix: KEY_PREFIX.to_string(),
            },
            35..60 => Request::Put { key, value },
            60..70 => Request::Delete { key },
            _ => {
                let compare = match seen.get(&key) {
                    Some(Some((value, _))) if self.rng.gen_bool(0.5) => {
                        Compare::Value(value.clone())
                    }
                    Some(Some((_, mod_revision))) => Compare::ModRevision(*mod_revision),
                    Some(None) | None => Compare::ModRevision(0),
                };
                Request::CompareAndSet {
                    key,
                    compare,
                    value,
                }
            }
        }
    }
}

/// Remembers what a response said about keys, for later compares.
fn observe(
    seen: &mut HashMap<String, Option<(String, i64)>>,
    request: &Request,
    response: &Response,
) {
    let snapshot = |kv: &KeyValue| (kv.value.clone(), kv.mod_revision);
    match (request, response) {
        (Request::Get { key }, Response::Get { kv, .. }) => {
            seen.insert(key.clone(), kv.as_ref().map(snapshot));
        }
        (Request::Range { .. }, Response::Range { kvs, .. }) => {
            for key in (0..KEYS).map(|n| format!("{KEY_PREFIX}{n}")) {
                let kv = kvs
                    .iter()
                    .find(|(k, _)| *k == key)
                    .map(|(_, kv)| snapshot(kv));
                seen.insert(key, kv);
            }
        }
        (Request::Put { key, value }, Response::Put { revision })
        | (
            Request::CompareAndSet { key, value, .. },
            Response::CompareAndSet {
                revision,
                succeeded: true,
                ..
            },
        ) => {
            seen.insert(key.clone(), Some((value.clone(), *revision)));
        }
        (Request::CompareAndSet { key, .. }, Response::CompareAndSet { kv, .. }) => {
            seen.insert(key.clone(), kv.as_ref().map(snapshot));
        }
        (Request::Delete { key }, Response::Delete { .. }) => {
            seen.insert(key.clone(), None);
        }
        (request, response) => panic!("response {response:?} does not answer {request:?}"),
    }
}

/// A gRPC error that proves the request was refused before it did anything. Everything else
/// (lost connection, timeout, unavailable, internal) leaves the outcome unknown.
fn is_definite(error: &etcd_client::Error) -> bool {
    use tonic::Code;
    match error {
        etcd_client::Error::GRpcStatus(status) => matches!(
            status.code(),
            Code::InvalidArgument
                | Code::NotFound
                | Code::AlreadyExists
                | Code::PermissionDenied
                | Code::FailedPrecondition
                | Code::OutOfRange
                | Code::ResourceExhausted
                | Code::Unauthenticated
                | Code::Unimplemented
        ),
        _ => false,
    }
}

/// Connects to the current endpoint and polls a real request until the server answers.
async fn connect(shared: &Shared) -> Client {
    let deadline = Instant::now() + Duration::from_millis(RECONNECT_DEADLINE_MS);
    loop {
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_millis(CONNECT_TIMEOUT_MS))
            .with_timeout(Duration::from_millis(REQUEST_TIMEOUT_MS));
        if let Ok(mut client) = Client::connect([shared.endpoint()], Some(options)).await {
            if client.get("robustness-connect-probe", None).await.is_ok() {
                return client;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no answer from {} for {RECONNECT_DEADLINE_MS} ms",
            shared.endpoint()
        );
        tokio::time::sleep(Duration::from_millis(RECONNECT_POLL_MS)).await;
    }
}

async fn execute(client: &mut Client, request: &Request) -> Result<Response, etcd_client::Error> {
    let response = match request {
        Request::Get { key } => {
            let read = client.get(key.as_str(), None).await?;
            Response::Get {
                revision: read.header().expect("header").revision(),
                kv: read.kvs().first().map(key_value),
            }
        }
        Request::Range { prefix } => {
            let options = GetOptions::new().with_prefix();
            let read = client.get(prefix.as_str(), Some(options)).await?;
            Response::Range {
                revision: read.header().expect("header").revision(),
                kvs: read
                    .kvs()
                    .iter()
                    .map(|kv| (utf8(kv.key()), key_value(kv)))
                    .collect(),
            }
        }
        Request::Put { key, value } => {
            let put = client.put(key.as_str(), value.as_str(), None).await?;
            Response::Put {
                revision: put.header().expect("header").revision(),
            }
        }
        Request::Delete { key } => {
            let delete = client.delete(key.as_str(), None).await?;
            Response::Delete {
                revision: delete.header().expect("header").revision(),
                deleted: delete.deleted(),
            }
        }
        Request::CompareAndSet {
            key,
            compare,
            value,
        } => compare_and_set(client, key, compare, value).await?,
    };
    Ok(response)
}

/// `Txn { compare } then put(key, value) else get(key)`.
async fn compare_and_set(
    client: &mut Client,
    key: &str,
    compare: &Compare,
    value: &str,
) -> Result<Response, etcd_client::Error> {
    let guard = match compare {
        Compare::ModRevision(revision) => {
            EtcdCompare::mod_revision(key, CompareOp::Equal, *revision)
        }
        Compare::Value(expected) => EtcdCompare::value(key, CompareOp::Equal, expected.as_str()),
    };
    let txn = Txn::new()
        .when(vec![guard])
        .and_then(vec![TxnOp::put(key, value, None)])
        .or_else(vec![TxnOp::get(key, None)]);
    let response = client.txn(txn).await?;
    let revision = response.header().expect("header").revision();
    let succeeded = response.succeeded();
    let kv = if succeeded {
        None
    } else {
        match response.op_responses().as_slice() {
            [TxnOpResponse::Get(get)] => get.kvs().first().map(key_value),
            other => panic!("the else branch of a compare-and-set answered {other:?}"),
        }
    };
    Ok(Response::CompareAndSet {
        revision,
        succeeded,
        kv,
    })
}

fn key_value(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        value: utf8(kv.value()),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        version: kv.version(),
    }
}

/// Every key and value here is UTF-8, which keeps failure explanations readable.
fn utf8(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).expect("keys and values are UTF-8")
}

fn nanos_since(origin: Instant) -> u64 {
    u64::try_from(origin.elapsed().as_nanos()).expect("a round lasts less than 584 years")
}
