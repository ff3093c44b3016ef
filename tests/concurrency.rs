//! Concurrency: many clients, each on its own connection, write at once to the real server on
//! 127.0.0.1, and the history the server reports must be one that a sequential server could
//! have produced (design brief, invariants I1-I3 and I5):
//!
//! - every revision in `2..=final` belongs to exactly one acknowledged write (no gap, no reuse);
//! - a replay of the acknowledged writes in revision order (a tiny model) equals a historical
//!   Range of the whole key space at every revision: values, versions, create and mod
//!   revisions;
//! - every read, failed compare and no-op delete is explained by the model's state at the
//!   revision its response reported;
//! - the same holds after kill -9 and restart;
//! - compare-and-set loses no update, and a write acknowledged before another is sent gets the
//!   lower revision, whatever shards the two touch.
//!
//! `FERROCD_TEST_SERVER=etcd` runs the same checks against real etcd, which validates them.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::Server;
use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, GetOptions, KeyValue, ResponseHeader, Txn, TxnOp,
    TxnOpResponse,
};
use ferrocd_net::node::fnv1a;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// Shards of the server under test; keys are picked so that every shard holds some.
const SHARDS: usize = 4;
const SERVER_ARGS: [&str; 2] = ["--shards", "4"];
/// Keys of the shared workload per shard: few, so that clients collide on them.
const KEYS_PER_SHARD: usize = 2;
/// Keys of the workload are `k/<n>`; `k/` (all of them) and two narrower prefixes get deleted.
const KEY_PREFIX: &str = "k/";
const DELETE_PREFIXES: [&str; 3] = ["k/", "k/1", "k/2"];
/// The compare-and-set counter; outside `KEY_PREFIX` so prefix deletes never touch it.
const COUNTER: &str = "counter";

/// Shared workload: clients (each with its own connection) and requests per client.
const WORKLOAD_CLIENTS: usize = 16;
const WORKLOAD_OPS_PER_CLIENT: usize = 100;
/// Bound on the whole concurrent phase of a test; a hung server fails instead of hanging.
const CONCURRENT_PHASE_TIMEOUT_MS: u64 = 60_000;

/// Compare-and-set test: tasks and the successful increments each must make.
const CAS_TASKS: usize = 8;
const CAS_INCREMENTS_PER_TASK: usize = 10;
/// A task's compare fails only when another task's increment landed since it last read the
/// counter, so it can fail at most (all increments - its own) times: its attempts are bounded
/// by the total number of increments.
const CAS_MAX_ATTEMPTS_PER_TASK: usize = CAS_TASKS * CAS_INCREMENTS_PER_TASK;

/// One-order test: rounds of "A acknowledged, then B sent", and background writers that keep
/// every shard busy meanwhile (each bounded in requests, stopped when the rounds end).
const ORDER_ROUNDS: usize = 200;
const ORDER_BACKGROUND_WRITERS: usize = 4;
const ORDER_BACKGROUND_MAX_OPS: usize = 2_000;

// ---------------------------------------------------------------------------------------------
// Keys and shards
// ---------------------------------------------------------------------------------------------

/// The shard ferrocd places `key` on (the server's own placement function).
fn shard_of(key: &str) -> usize {
    (fnv1a(key.as_bytes()) % SHARDS as u64) as usize
}

/// `per_shard` keys `k/<n>` on each shard: the first ones, in `n` order, that hash there.
fn keys_on_every_shard(per_shard: usize) -> Vec<Vec<String>> {
    let mut by_shard = vec![Vec::new(); SHARDS];
    let candidates = (0..).map(|n| format!("{KEY_PREFIX}{n}"));
    for key in candidates {
        let shard = &mut by_shard[shard_of(&key)];
        if shard.len() < per_shard {
            shard.push(key);
        }
        if by_shard.iter().all(|keys| keys.len() == per_shard) {
            return by_shard;
        }
    }
    unreachable!("the candidate key sequence is infinite")
}

/// The workload's key set, grouped by shard so that multi-key txns can span shards.
struct KeySet {
    by_shard: Vec<Vec<String>>,
}

impl KeySet {
    fn new() -> KeySet {
        KeySet {
            by_shard: keys_on_every_shard(KEYS_PER_SHARD),
        }
    }

    fn any(&self, rng: &mut StdRng) -> String {
        let shard = rng.gen_range(0..SHARDS);
        self.by_shard[shard]
            .choose(rng)
            .expect("every shard has keys")
            .clone()
    }

    /// `count` keys on `count` distinct shards, in random order.
    fn on_distinct_shards(&self, rng: &mut StdRng, count: usize) -> Vec<String> {
        assert!(count <= SHARDS, "{count} keys cannot be on distinct shards");
        let mut shards: Vec<usize> = (0..SHARDS).collect();
        shards.shuffle(rng);
        shards[..count]
            .iter()
            .map(|&shard| self.by_shard[shard].choose(rng).expect("keys").clone())
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// What the clients observed
// ---------------------------------------------------------------------------------------------

/// A key's state as a Range reports it (lease is never used here).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Kv {
    value: String,
    create_revision: i64,
    mod_revision: i64,
    version: i64,
}

/// The whole key space at one revision, in key order.
type State = BTreeMap<String, Kv>;

/// Every key and value of these tests is UTF-8, which keeps failure messages readable.
fn utf8(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).expect("keys and values are UTF-8")
}

fn to_state(kvs: &[KeyValue]) -> State {
    kvs.iter()
        .map(|kv| {
            let state = Kv {
                value: utf8(kv.value()),
                create_revision: kv.create_revision(),
                mod_revision: kv.mod_revision(),
                version: kv.version(),
            };
            (utf8(kv.key()), state)
        })
        .collect()
}

/// A key, or every key under a prefix.
#[derive(Clone, Debug)]
struct Span {
    key: String,
    prefix: bool,
}

impl Span {
    fn key(key: &str) -> Span {
        Span {
            key: key.to_string(),
            prefix: false,
        }
    }

    fn prefix(prefix: &str) -> Span {
        Span {
            key: prefix.to_string(),
            prefix: true,
        }
    }

    fn contains(&self, key: &str) -> bool {
        if self.prefix {
            key.starts_with(&self.key)
        } else {
            key == self.key
        }
    }
}

/// One change inside an acknowledged write.
#[derive(Clone, Debug)]
enum Effect {
    Put {
        key: String,
        value: String,
    },
    /// `deleted` is what the server reported for this delete.
    Delete {
        span: Span,
        deleted: i64,
    },
}

/// "`key` had this mod revision", the compare a txn's success depended on.
#[derive(Clone, Debug)]
struct Guard {
    key: String,
    mod_revision: i64,
}

impl Guard {
    /// The compare "`key` is still as `read` found it" (etcd compares a missing key's mod
    /// revision as 0).
    fn unchanged_since(key: &str, read: Option<&KeyValue>) -> Guard {
        Guard {
            key: key.to_string(),
            mod_revision: read.map_or(0, KeyValue::mod_revision),
        }
    }
}

/// An acknowledged write that changed something, at the revision its response reported.
#[derive(Clone, Debug)]
struct Write {
    revision: i64,
    /// Which client request it was, for failure messages.
    origin: String,
    guard: Option<Guard>,
    effects: Vec<Effect>,
}

/// A response that changed nothing, and what it claims about the state at its revision.
#[derive(Clone, Debug)]
enum Claim {
    /// A Range (or a DeleteRange that deleted nothing: `found` empty) saw exactly `found`.
    Read { span: Span, found: State },
    /// A txn's `mod_revision == guard` compare failed.
    CompareFailed { guard: Guard },
}

#[derive(Clone, Debug)]
struct Observation {
    revision: i64,
    origin: String,
    claim: Claim,
}

/// Everything the clients saw: their acknowledged writes and their other responses.
#[derive(Default)]
struct History {
    writes: Vec<Write>,
    observations: Vec<Observation>,
}

impl History {
    fn merge(&mut self, other: History) {
        self.writes.extend(other.writes);
        self.observations.extend(other.observations);
    }
}

// ---------------------------------------------------------------------------------------------
// The model: a replay of acknowledged writes in revision order
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Model {
    state: State,
}

impl Model {
    fn apply(&mut self, write: &Write) {
        if let Some(guard) = &write.guard {
            assert_eq!(
                self.mod_revision(&guard.key),
                guard.mod_revision,
                "{} succeeded at revision {}, but its compare was false just before it",
                write.origin,
                write.revision
            );
        }
        for effect in &write.effects {
            match effect {
                Effect::Put { key, value } => self.put(key, value, write.revision),
                Effect::Delete { span, deleted } => {
                    let removed = self.delete(span);
                    assert_eq!(
                        removed, *deleted,
                        "{} at revision {} reported {deleted} deleted, the replay deletes {removed}",
                        write.origin, write.revision
                    );
                }
            }
        }
    }

    /// A put starts a generation at version 1 or adds exactly 1 to the version.
    fn put(&mut self, key: &str, value: &str, revision: i64) {
        let kv = self.state.entry(key.to_string()).or_insert(Kv {
            value: String::new(),
            create_revision: revision,
            mod_revision: revision,
            version: 0,
        });
        kv.value = value.to_string();
        kv.mod_revision = revision;
        kv.version += 1;
    }

    fn delete(&mut self, span: &Span) -> i64 {
        let before = self.state.len();
        self.state.retain(|key, _| !span.contains(key));
        i64::try_from(before - self.state.len()).expect("key count fits i64")
    }

    /// etcd compares a missing key's mod revision as 0.
    fn mod_revision(&self, key: &str) -> i64 {
        self.state.get(key).map_or(0, |kv| kv.mod_revision)
    }

    fn read(&self, span: &Span) -> State {
        self.state
            .iter()
            .filter(|(key, _)| span.contains(key))
            .map(|(key, kv)| (key.clone(), kv.clone()))
            .collect()
    }

    fn check(&self, observation: &Observation) {
        let Observation {
            revision,
            origin,
            claim,
        } = observation;
        match claim {
            Claim::Read { span, found } => assert_eq!(
                found,
                &self.read(span),
                "{origin} at revision {revision} disagrees with the replay"
            ),
            Claim::CompareFailed { guard } => assert_ne!(
                self.mod_revision(&guard.key),
                guard.mod_revision,
                "{origin}: compare failed at revision {revision}, but it was true there"
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Verification against historical ranges
// ---------------------------------------------------------------------------------------------

/// The writes by revision; every revision in `2..=final_revision` must have exactly one.
fn index_writes(writes: &[Write], final_revision: i64) -> BTreeMap<i64, &Write> {
    let mut by_revision = BTreeMap::new();
    for write in writes {
        if let Some(other) = by_revision.insert(write.revision, write) {
            panic!(
                "revision {} reused: {} and {}",
                write.revision, other.origin, write.origin
            );
        }
    }
    let used: Vec<i64> = by_revision.keys().copied().collect();
    let expected: Vec<i64> = (2..=final_revision).collect();
    if used != expected {
        let used_set: BTreeSet<i64> = used.iter().copied().collect();
        let gaps: Vec<i64> = expected
            .iter()
            .filter(|r| !used_set.contains(r))
            .copied()
            .collect();
        let beyond: Vec<i64> = used
            .iter()
            .filter(|&&r| r > final_revision)
            .copied()
            .collect();
        panic!(
            "revisions 2..={final_revision}: unused {gaps:?}, beyond the current one {beyond:?}"
        );
    }
    by_revision
}

fn index_observations(observations: &[Observation]) -> BTreeMap<i64, Vec<&Observation>> {
    let mut by_revision: BTreeMap<i64, Vec<&Observation>> = BTreeMap::new();
    for observation in observations {
        by_revision
            .entry(observation.revision)
            .or_default()
            .push(observation);
    }
    by_revision
}

async fn current_revision(client: &mut Client) -> i64 {
    let response = client
        .get(COUNTER, None)
        .await
        .expect("read current revision");
    header_revision(response.header())
}

/// The whole key space as of `revision`.
async fn state_at(client: &mut Client, revision: i64) -> State {
    let options = GetOptions::new().with_all_keys().with_revision(revision);
    let response = client
        .get("", Some(options))
        .await
        .unwrap_or_else(|e| panic!("historical range at revision {revision}: {e}"));
    to_state(response.kvs())
}

/// Replays `history` revision by revision and compares the model with a historical Range of the
/// whole key space at each revision. Returns the final revision.
async fn verify_history(client: &mut Client, history: &History) -> i64 {
    let final_revision = current_revision(client).await;
    let writes = index_writes(&history.writes, final_revision);
    let mut observations = index_observations(&history.observations);
    if let Some((&last, seen)) = observations.last_key_value() {
        assert!(
            last <= final_revision,
            "{} reported revision {last}, beyond the current {final_revision}",
            seen[0].origin
        );
    }
    let mut model = Model::default();
    for revision in 1..=final_revision {
        if let Some(write) = writes.get(&revision) {
            model.apply(write);
        }
        for observation in observations.remove(&revision).unwrap_or_default() {
            model.check(observation);
        }
        assert_eq!(
            state_at(client, revision).await,
            model.state,
            "historical range at revision {revision} disagrees with the replay"
        );
    }
    let latest = client
        .get("", Some(GetOptions::new().with_all_keys()))
        .await
        .expect("range of the latest state");
    assert_eq!(
        to_state(latest.kvs()),
        model.state,
        "latest state vs replay"
    );
    final_revision
}

// ---------------------------------------------------------------------------------------------
// The shared workload
// ---------------------------------------------------------------------------------------------

fn header_revision(header: Option<&ResponseHeader>) -> i64 {
    header.expect("response header").revision()
}

/// Integer value of the counter (absent = 0).
fn counter_value(kv: Option<&KeyValue>) -> u64 {
    kv.map_or(0, |kv| {
        let text = std::str::from_utf8(kv.value()).expect("counter is UTF-8");
        text.parse().expect("counter is an integer")
    })
}

/// One client of the workload: its own connection, seeded choices, and what it saw.
struct Worker {
    id: usize,
    client: Client,
    rng: StdRng,
    keys: Arc<KeySet>,
    history: History,
    /// Highest revision any response reported to this client: a later response must not
    /// report a lower one (a revision once reported is never taken back, I3).
    latest_revision: i64,
    /// Increments of the counter this client made.
    increments: u64,
}

impl Worker {
    async fn new(server: &Server, id: usize, keys: Arc<KeySet>) -> Worker {
        Worker {
            id,
            client: server.client().await,
            rng: StdRng::seed_from_u64(id as u64),
            keys,
            history: History::default(),
            latest_revision: 0,
            increments: 0,
        }
    }

    async fn run(mut self, ops: usize) -> Worker {
        for op in 0..ops {
            self.step(op).await;
        }
        self
    }

    async fn step(&mut self, op: usize) {
        match self.rng.gen_range(0..100) {
            0..=34 => self.put(op).await,
            35..=49 => self.increment_counter(op).await,
            50..=59 => self.cross_shard_txn(op).await,
            60..=69 => self.guarded_cross_shard_txn(op).await,
            70..=89 => {
                let key = self.keys.any(&mut self.rng);
                self.delete(op, Span::key(&key)).await
            }
            _ => {
                let prefix = DELETE_PREFIXES.choose(&mut self.rng).expect("prefixes");
                self.delete(op, Span::prefix(prefix)).await
            }
        }
    }

    fn origin(&self, op: usize, what: &str) -> String {
        format!("client {} op {op} ({what})", self.id)
    }

    /// Values are unique per request, so the replay can tell every write apart.
    fn value(&self, op: usize) -> String {
        format!("c{}-op{op}", self.id)
    }

    /// Records the revision of a response and checks it did not go backwards.
    fn saw(&mut self, header: Option<&ResponseHeader>, origin: &str) -> i64 {
        let revision = header_revision(header);
        assert!(
            revision >= self.latest_revision,
            "{origin}: revision {revision} after this client already saw {}",
            self.latest_revision
        );
        self.latest_revision = revision;
        revision
    }

    fn record_write(
        &mut self,
        revision: i64,
        origin: String,
        guard: Option<Guard>,
        effects: Vec<Effect>,
    ) {
        self.history.writes.push(Write {
            revision,
            origin,
            guard,
            effects,
        });
    }

    fn record_claim(&mut self, revision: i64, origin: String, claim: Claim) {
        self.history.observations.push(Observation {
            revision,
            origin,
            claim,
        });
    }

    async fn put(&mut self, op: usize) {
        let key = self.keys.any(&mut self.rng);
        let value = self.value(op);
        let origin = self.origin(op, &format!("put {key}"));
        let response = self
            .client
            .put(key.clone(), value.clone(), None)
            .await
            .unwrap_or_else(|e| panic!("{origin}: {e}"));
        let revision = self.saw(response.header(), &origin);
        let effect = Effect::Put { key, value };
        self.record_write(revision, origin, None, vec![effect]);
    }

    /// A linearizable Get of one key, recorded as a claim; returns what it found.
    async fn read(&mut self, op: usize, key: &str) -> Option<KeyValue> {
        let origin = self.origin(op, &format!("get {key}"));
        let mut response = self
            .client
            .get(key, None)
            .await
            .unwrap_or_else(|e| panic!("{origin}: {e}"));
        let revision = self.saw(response.header(), &origin);
        let kvs = response.take_kvs();
        let claim = Claim::Read {
            span: Span::key(key),
            found: to_state(&kvs),
        };
        self.record_claim(revision, origin, claim);
        kvs.into_iter().next()
    }

    /// Read the counter, then `Txn(mod_revision == seen) { put counter n+1 }`.
    async fn increment_counter(&mut self, op: usize) {
        let current = self.read(op, COUNTER).await;
        let guard = Guard::unchanged_since(COUNTER, current.as_ref());
        let next = (counter_value(current.as_ref()) + 1).to_string();
        let put = Effect::Put {
            key: guard.key.clone(),
            value: next,
        };
        if self.guarded_txn(op, "counter cas", guard, vec![put]).await {
            self.increments += 1;
        }
    }

    /// Puts on two shards and a delete on a third, in one unconditional txn.
    async fn cross_shard_txn(&mut self, op: usize) {
        let keys = self.keys.on_distinct_shards(&mut self.rng, 3);
        let origin = self.origin(
            op,
            &format!("txn put {} {} del {}", keys[0], keys[1], keys[2]),
        );
        let effects = self.put_put_delete(op, &keys);
        let response = self
            .client
            .txn(Txn::new().and_then(txn_ops(&effects)))
            .await
            .unwrap_or_else(|e| panic!("{origin}: {e}"));
        assert!(
            response.succeeded(),
            "{origin}: a txn without compares failed"
        );
        let revision = self.saw(response.header(), &origin);
        let effects = with_reported_deletes(effects, &response.op_responses());
        self.record_write(revision, origin, None, effects);
    }

    /// Like `cross_shard_txn`, but only if the first key is unchanged since it was read.
    async fn guarded_cross_shard_txn(&mut self, op: usize) {
        let keys = self.keys.on_distinct_shards(&mut self.rng, 3);
        let current = self.read(op, &keys[0]).await;
        let guard = Guard::unchanged_since(&keys[0], current.as_ref());
        let effects = self.put_put_delete(op, &keys);
        self.guarded_txn(op, "guarded cross-shard txn", guard, effects)
            .await;
    }

    fn put_put_delete(&self, op: usize, keys: &[String]) -> Vec<Effect> {
        let value = self.value(op);
        vec![
            Effect::Put {
                key: keys[0].clone(),
                value: value.clone(),
            },
            Effect::Put {
                key: keys[1].clone(),
                value,
            },
            Effect::Delete {
                span: Span::key(&keys[2]),
                deleted: 0,
            },
        ]
    }

    /// `Txn(mod_revision(guard.key) == guard.mod_revision) { effects }`, recorded as a write
    /// when it succeeds and as a failed compare otherwise. Returns whether it succeeded.
    async fn guarded_txn(
        &mut self,
        op: usize,
        what: &str,
        guard: Guard,
        effects: Vec<Effect>,
    ) -> bool {
        let origin = self.origin(op, what);
        let compare =
            Compare::mod_revision(guard.key.clone(), CompareOp::Equal, guard.mod_revision);
        let txn = Txn::new().when([compare]).and_then(txn_ops(&effects));
        let response = self
            .client
            .txn(txn)
            .await
            .unwrap_or_else(|e| panic!("{origin}: {e}"));
        let revision = self.saw(response.header(), &origin);
        if response.succeeded() {
            let effects = with_reported_deletes(effects, &response.op_responses());
            self.record_write(revision, origin, Some(guard), effects);
        } else {
            self.record_claim(revision, origin, Claim::CompareFailed { guard });
        }
        response.succeeded()
    }

    /// A DeleteRange: a write when it deleted something, else a claim that nothing was there.
    async fn delete(&mut self, op: usize, span: Span) {
        let what = format!("delete {}{}", span.key, if span.prefix { "*" } else { "" });
        let origin = self.origin(op, &what);
        let options = span.prefix.then(|| DeleteOptions::new().with_prefix());
        let response = self
            .client
            .delete(span.key.clone(), options)
            .await
            .unwrap_or_else(|e| panic!("{origin}: {e}"));
        let revision = self.saw(response.header(), &origin);
        if response.deleted() > 0 {
            let effect = Effect::Delete {
                span,
                deleted: response.deleted(),
            };
            self.record_write(revision, origin, None, vec![effect]);
        } else {
            let claim = Claim::Read {
                span,
                found: State::new(),
            };
            self.record_claim(revision, origin, claim);
        }
    }
}

fn txn_ops(effects: &[Effect]) -> Vec<TxnOp> {
    effects
        .iter()
        .map(|effect| match effect {
            Effect::Put { key, value } => TxnOp::put(key.clone(), value.clone(), None),
            Effect::Delete { span, .. } => {
                let options = span.prefix.then(|| DeleteOptions::new().with_prefix());
                TxnOp::delete(span.key.clone(), options)
            }
        })
        .collect()
}

/// The planned effects with each delete's count replaced by what the server reported.
fn with_reported_deletes(effects: Vec<Effect>, responses: &[TxnOpResponse]) -> Vec<Effect> {
    assert_eq!(effects.len(), responses.len(), "one response per txn op");
    effects
        .into_iter()
        .zip(responses)
        .map(|(effect, response)| match (effect, response) {
            (Effect::Delete { span, .. }, TxnOpResponse::Delete(deleted)) => Effect::Delete {
                span,
                deleted: deleted.deleted(),
            },
            (put @ Effect::Put { .. }, TxnOpResponse::Put(_)) => put,
            (effect, response) => panic!("txn op {effect:?} answered with {response:?}"),
        })
        .collect()
}

/// Runs the workload's clients at once; returns their merged history and the number of
/// counter increments they made.
async fn run_workload(server: &Server) -> (History, u64) {
    let keys = Arc::new(KeySet::new());
    let mut tasks = Vec::new();
    for id in 0..WORKLOAD_CLIENTS {
        let worker = Worker::new(server, id, keys.clone()).await;
        tasks.push(tokio::spawn(worker.run(WORKLOAD_OPS_PER_CLIENT)));
    }
    let workers = within_phase_timeout(join_all(tasks)).await;
    let mut history = History::default();
    let mut increments = 0;
    for worker in workers {
        increments += worker.increments;
        history.merge(worker.history);
    }
    (history, increments)
}

/// Waits for a spawned task, re-raising its panic as this test's failure.
async fn join<T>(task: tokio::task::JoinHandle<T>) -> T {
    task.await
        .unwrap_or_else(|error| std::panic::resume_unwind(error.into_panic()))
}

/// Joins spawned tasks in order.
async fn join_all<T>(tasks: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut results = Vec::with_capacity(tasks.len());
    for task in tasks {
        results.push(join(task).await);
    }
    results
}

async fn within_phase_timeout<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_millis(CONCURRENT_PHASE_TIMEOUT_MS), future)
        .await
        .unwrap_or_else(|_| panic!("concurrent phase ran over {CONCURRENT_PHASE_TIMEOUT_MS} ms"))
}

async fn counter_kv(client: &mut Client) -> Option<KeyValue> {
    let mut response = client.get(COUNTER, None).await.expect("read counter");
    response.take_kvs().into_iter().next()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_history_has_one_write_per_revision_and_replays_exactly_also_after_kill9() {
    let mut server = Server::subject(&SERVER_ARGS).await;
    let (history, increments) = run_workload(&server).await;
    assert!(
        history.writes.len() > WORKLOAD_CLIENTS * WORKLOAD_OPS_PER_CLIENT / 2,
        "the workload wrote too little to test anything: {} writes",
        history.writes.len()
    );

    let mut client = server.client().await;
    let final_revision = verify_history(&mut client, &history).await;
    let counter = counter_kv(&mut client).await;
    assert_eq!(
        counter_value(counter.as_ref()),
        increments,
        "lost counter update"
    );
    drop(client);

    server.crash_restart().await;
    let mut client = server.client().await;
    let after_crash = verify_history(&mut client, &history).await;
    assert_eq!(
        after_crash, final_revision,
        "kill -9 changed the current revision"
    );
}

// ---------------------------------------------------------------------------------------------
// Compare-and-set counter
// ---------------------------------------------------------------------------------------------

/// What one compare-and-set task achieved: the values it wrote, with their revisions.
struct Increments {
    task: usize,
    written: Vec<(u64, i64)>,
    attempts: usize,
}

/// The counter as a task last saw it.
#[derive(Clone, Copy, Debug)]
struct Seen {
    value: u64,
    mod_revision: i64,
}

impl Seen {
    fn of(kv: Option<&KeyValue>) -> Seen {
        Seen {
            value: counter_value(kv),
            mod_revision: kv.map_or(0, KeyValue::mod_revision),
        }
    }
}

/// Increments the counter `CAS_INCREMENTS_PER_TASK` times with
/// `Txn(mod_revision == seen) { put n+1 } else { get counter }`; a failed compare hands back
/// the current counter, so no separate read is needed.
async fn increment_until_done(mut client: Client, task: usize) -> Increments {
    let mut seen = Seen::of(counter_kv(&mut client).await.as_ref());
    let mut result = Increments {
        task,
        written: Vec::new(),
        attempts: 0,
    };
    while result.written.len() < CAS_INCREMENTS_PER_TASK
        && result.attempts < CAS_MAX_ATTEMPTS_PER_TASK
    {
        result.attempts += 1;
        let next = seen.value + 1;
        let txn = Txn::new()
            .when([Compare::mod_revision(
                COUNTER,
                CompareOp::Equal,
                seen.mod_revision,
            )])
            .and_then([TxnOp::put(COUNTER, next.to_string(), None)])
            .or_else([TxnOp::get(COUNTER, None)]);
        let response = client.txn(txn).await.expect("counter txn");
        let revision = header_revision(response.header());
        if response.succeeded() {
            assert!(
                revision > seen.mod_revision,
                "task {task}: put at {revision} <= {seen:?}"
            );
            result.written.push((next, revision));
            seen = Seen {
                value: next,
                mod_revision: revision,
            };
        } else {
            let current = Seen::of(counter_in_else_branch(&response.op_responses()).as_ref());
            assert_ne!(
                current.mod_revision, seen.mod_revision,
                "task {task}: compare failed at revision {revision}, yet the else branch read \
                 the compared mod revision"
            );
            seen = current;
        }
    }
    result
}

fn counter_in_else_branch(responses: &[TxnOpResponse]) -> Option<KeyValue> {
    match responses {
        [TxnOpResponse::Get(get)] => get.kvs().first().cloned(),
        other => panic!("else branch should answer one get, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_set_counter_loses_no_update() {
    let server = Server::subject(&SERVER_ARGS).await;
    let mut tasks = Vec::new();
    for task in 0..CAS_TASKS {
        let client = server.client().await;
        tasks.push(tokio::spawn(increment_until_done(client, task)));
    }
    let results = within_phase_timeout(join_all(tasks)).await;

    let mut written: Vec<(u64, i64)> = Vec::new();
    for result in &results {
        assert_eq!(
            result.written.len(),
            CAS_INCREMENTS_PER_TASK,
            "task {} made {} increments in {} attempts: more failed compares than other \
             tasks' increments",
            result.task,
            result.written.len(),
            result.attempts
        );
        written.extend(&result.written);
    }
    let total = (CAS_TASKS * CAS_INCREMENTS_PER_TASK) as u64;
    written.sort_unstable();
    let values: Vec<u64> = written.iter().map(|&(value, _)| value).collect();
    assert_eq!(
        values,
        (1..=total).collect::<Vec<_>>(),
        "each value written exactly once"
    );
    assert!(
        written.windows(2).all(|pair| pair[0].1 < pair[1].1),
        "higher counter values must have higher revisions: {written:?}"
    );

    let mut client = server.client().await;
    let counter = counter_kv(&mut client).await.expect("counter exists");
    assert_eq!(counter_value(Some(&counter)), total, "final counter");
    assert_eq!(
        counter.version(),
        total as i64,
        "one version per successful txn"
    );
    assert_eq!(counter.mod_revision(), written.last().expect("writes").1);
}

// ---------------------------------------------------------------------------------------------
// I1: one order across shards
// ---------------------------------------------------------------------------------------------

/// What writer A reports to writer B once its write was acknowledged.
struct Acknowledged {
    round: usize,
    key: String,
    revision: i64,
}

/// One key per shard.
fn one_key_per_shard() -> Vec<String> {
    keys_on_every_shard(1).into_iter().flatten().collect()
}

/// Writer A: in round `i`, writes the key of shard `i % SHARDS` (every other round in a txn
/// that also writes the next shard's key), then tells B.
async fn first_writer(
    mut client: Client,
    keys: Vec<String>,
    acks: tokio::sync::mpsc::Sender<Acknowledged>,
) {
    for round in 0..ORDER_ROUNDS {
        let key = keys[round % SHARDS].clone();
        let value = format!("a{round}");
        let header = if round % 2 == 0 {
            client
                .put(key.clone(), value, None)
                .await
                .expect("A put")
                .take_header()
        } else {
            let partner = keys[(round + 1) % SHARDS].clone();
            let ops = [
                TxnOp::put(key.clone(), value.clone(), None),
                TxnOp::put(partner, value, None),
            ];
            client
                .txn(Txn::new().and_then(ops))
                .await
                .expect("A txn")
                .take_header()
        };
        let revision = header_revision(header.as_ref());
        acks.send(Acknowledged {
            round,
            key,
            revision,
        })
        .await
        .expect("B is listening");
    }
}

/// Writer B: after each of A's acknowledgements, writes a key on a shard A did not touch and
/// checks it got a higher revision, and that a read sees A's write.
async fn second_writer(
    mut client: Client,
    keys: Vec<String>,
    mut acks: tokio::sync::mpsc::Receiver<Acknowledged>,
) -> usize {
    let mut rounds = 0;
    while let Some(ack) = acks.recv().await {
        let key = &keys[(ack.round + 2) % SHARDS];
        assert_ne!(
            shard_of(key),
            shard_of(&ack.key),
            "B must write another shard"
        );
        let response = client
            .put(key.clone(), format!("b{}", ack.round), None)
            .await
            .expect("B put");
        let revision = header_revision(response.header());
        assert!(
            revision > ack.revision,
            "round {}: {} acknowledged at revision {}, then {key} got revision {revision}",
            ack.round,
            ack.key,
            ack.revision
        );
        let read = client
            .get(ack.key.clone(), None)
            .await
            .expect("B reads A's key");
        let seen = read.kvs().first().map_or(0, KeyValue::mod_revision);
        assert!(
            seen >= ack.revision,
            "round {}: a read after {}'s ack at revision {} saw mod revision {seen}",
            ack.round,
            ack.key,
            ack.revision
        );
        rounds += 1;
    }
    rounds
}

/// Writes keys on every shard until `stop` is set or `ORDER_BACKGROUND_MAX_OPS` are done, so
/// that revisions are being handed out on every shard while A and B run.
async fn background_writer(mut client: Client, id: usize, stop: Arc<AtomicBool>) {
    let keys = keys_on_every_shard(KEYS_PER_SHARD);
    for op in 0..ORDER_BACKGROUND_MAX_OPS {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let key = keys[op % SHARDS][id % KEYS_PER_SHARD].clone();
        client
            .put(key, format!("bg{id}-{op}"), None)
            .await
            .expect("background put");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_acknowledged_before_another_is_sent_has_the_lower_revision_across_shards() {
    let server = Server::subject(&SERVER_ARGS).await;
    let keys = one_key_per_shard();
    let stop = Arc::new(AtomicBool::new(false));
    let mut background = Vec::new();
    for id in 0..ORDER_BACKGROUND_WRITERS {
        let client = server.client().await;
        background.push(tokio::spawn(background_writer(client, id, stop.clone())));
    }
    let (acks_tx, acks_rx) = tokio::sync::mpsc::channel(1);
    let a = tokio::spawn(first_writer(server.client().await, keys.clone(), acks_tx));
    let b = tokio::spawn(second_writer(server.client().await, keys, acks_rx));

    // B first: when B fails, its panic is the one worth reporting (A then fails to send).
    let rounds = within_phase_timeout(async {
        let rounds = join(b).await;
        join(a).await;
        rounds
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    within_phase_timeout(join_all(background)).await;
    assert_eq!(rounds, ORDER_ROUNDS, "B checked every round");
}
