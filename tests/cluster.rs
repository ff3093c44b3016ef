//! A 3-member cluster (etcd's flags: `--name`, `--initial-cluster`, ...) of the server under
//! test (`FERROCD_TEST_SERVER`, default ferrocd; `etcd` proves the tests on a real etcd
//! cluster): reads and writes through every member, a watch on a follower, leases moved
//! between members, the leader killed under load and restarted, the same requests compared
//! with a real etcd cluster, etcdctl's cluster commands and a linearizability check of
//! clients on every member while the leader dies.
//!
//! `cargo test --test cluster -- --nocapture` prints the measured election times.

mod common;
mod linearizability;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::{member_name, Cluster};
use common::{run_script, Flavor};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, LeaseGrantOptions,
    LeaseTimeToLiveOptions, PutOptions, Txn, TxnOp, WatchOptions,
};
use linearizability::client::{execute, header_revision, is_definite, key_value, utf8};
use linearizability::etcd::{self, EtcdModel, Request, Response, State};
use linearizability::{check, Budget, Operation, Outcome, Verdict};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const MEMBERS: usize = 3;
/// etcd's default election timeout, which both servers run with here.
const ELECTION_TIMEOUT_MS: u64 = 1_000;
/// A new leader must be agreed on within this many election timeouts of the old one's death
/// (a follower waits one to two timeouts, randomized, before it campaigns).
const MAX_ELECTION_TIMEOUTS: u64 = 5;
/// Bound on waiting for something a follower applies asynchronously (serializable reads,
/// watch events, convergence after a restart).
const CATCH_UP_TIMEOUT_MS: u64 = 10_000;
const CATCH_UP_POLL_MS: u64 = 20;
/// Request timeout of the load and history clients: longer than an election, so that most
/// requests in flight at a kill get an answer.
const LOAD_REQUEST_TIMEOUT_MS: u64 = 5_000;
const LOAD_CONNECT_TIMEOUT_MS: u64 = 1_000;
/// The load of the kill test: at most this many puts per member, or this long in all.
const LOAD_MAX_PUTS_PER_CLIENT: usize = 2_000;
const LOAD_MAX_DURATION_MS: u64 = 20_000;
/// Acknowledged puts before the kill, and after it (proof the new leader serves).
const LOAD_PUTS_BEFORE_KILL: usize = 30;
const LOAD_PUTS_AFTER_KILL: usize = 30;
const WATCH_PUTS: usize = 20;
const LEASE_TTL_S: i64 = 60;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_any_member_are_read_on_every_member() {
    let cluster = Cluster::start(MEMBERS).await;
    let mut clients = clients(&cluster).await;
    let mut written = Vec::new();
    for (index, client) in clients.iter_mut().enumerate() {
        let (key, value) = (format!("each/{index}"), format!("value {index}"));
        let put = client
            .put(key.as_str(), value.as_str(), None)
            .await
            .unwrap();
        let header = put.header().expect("a put header");
        assert_eq!(
            header.member_id(),
            cluster.member_id(index),
            "put on {index}"
        );
        written.push((key, value, header.revision()));
    }
    let last_revision = written.last().expect("three puts").2;
    for (key, value, revision) in &written {
        for (index, client) in clients.iter_mut().enumerate() {
            let get = client.get(key.as_str(), None).await.unwrap();
            let header = get.header().expect("a range header");
            assert_eq!(
                header.member_id(),
                cluster.member_id(index),
                "get on {index}"
            );
            // Linearizable: it sees every write that was acknowledged before it was sent.
            assert!(
                header.revision() >= last_revision,
                "{key} on {index}: {header:?}"
            );
            assert_eq!(
                found(&get),
                Some((value.clone(), *revision)),
                "{key} on {index}"
            );

            let serializable = || async {
                let options = GetOptions::new().with_serializable();
                let mut client = cluster.client(index).await;
                let get = client.get(key.as_str(), Some(options)).await.unwrap();
                (found(&get) == Some((value.clone(), *revision))).then_some(())
            };
            eventually(&format!("serializable {key} on {index}"), serializable).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_on_a_follower_sees_writes_through_other_members_in_order() {
    let cluster = Cluster::start(MEMBERS).await;
    let leader = cluster.leader().await;
    let follower = (leader + 1) % MEMBERS;
    let other = (leader + 2) % MEMBERS;
    let mut watch_client = cluster.client(follower).await;
    let options = WatchOptions::new().with_prefix();
    let mut stream = watch_client.watch("watched/", Some(options)).await.unwrap();
    let created = within_catch_up(stream.message()).await.unwrap().unwrap();
    assert!(created.created(), "{created:?}");
    let header = created.header().expect("a watch header");
    assert_eq!(header.member_id(), cluster.member_id(follower));

    let mut writers = [cluster.client(leader).await, cluster.client(other).await];
    let mut expected = Vec::new();
    for n in 0..WATCH_PUTS {
        let (key, value) = (format!("watched/{}", n % 4), format!("put {n}"));
        let put = writers[n % 2].put(key.as_str(), value.as_str(), None);
        let revision = header_revision(put.await.unwrap().header());
        expected.push((key, value, revision));
    }
    let mut seen = Vec::new();
    while seen.len() < expected.len() {
        let response = within_catch_up(stream.message()).await.unwrap();
        let response = response.expect("the watch stream stays open");
        for event in response.events() {
            assert_eq!(event.event_type(), EventType::Put, "{event:?}");
            let kv = event.kv().expect("a put event has its key");
            seen.push((utf8(kv.key()), utf8(kv.value()), kv.mod_revision()));
        }
    }
    assert_eq!(seen, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_under_load_loses_no_acknowledged_write() {
    let mut cluster = Cluster::start(MEMBERS).await;
    let old_leader = cluster.leader().await;
    let acked = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let killed: Arc<Vec<AtomicBool>> = Arc::new((0..MEMBERS).map(|_| false.into()).collect());
    let writers: Vec<_> = (0..MEMBERS)
        .map(|index| {
            let writer = LoadWriter {
                index,
                endpoint: cluster.member(index).endpoint(),
                acked: Arc::clone(&acked),
                stop: Arc::clone(&stop),
                killed: Arc::clone(&killed),
            };
            tokio::spawn(writer.run())
        })
        .collect();

    wait_for_count(&acked, LOAD_PUTS_BEFORE_KILL, "puts before the kill").await;
    killed[old_leader].store(true, Ordering::SeqCst);
    cluster.kill9(old_leader);
    let killed_at = Instant::now();
    let new_leader = cluster.leader().await;
    let election_ms = killed_at.elapsed().as_millis();
    println!(
        "{:?}: member {old_leader} (leader) killed, member {new_leader} leads after {election_ms} ms",
        cluster.flavor()
    );
    assert_ne!(new_leader, old_leader);
    assert!(
        election_ms <= u128::from(MAX_ELECTION_TIMEOUTS * ELECTION_TIMEOUT_MS),
        "a new leader took {election_ms} ms"
    );
    let after_kill = acked.load(Ordering::SeqCst) + LOAD_PUTS_AFTER_KILL;
    wait_for_count(&acked, after_kill, "puts after the kill").await;
    stop.store(true, Ordering::SeqCst);
    let mut load = Load::default();
    for writer in writers {
        let written = writer.await.expect("writer task");
        load.acked.extend(written.acked);
        load.unknown.extend(written.unknown);
    }

    for index in (0..MEMBERS).filter(|&index| index != old_leader) {
        let mut client = cluster.client(index).await;
        load.assert_read(&read_prefix(&mut client, "load/").await, index);
    }
    cluster.restart(old_leader).await;
    cluster.assert_converged(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_moves_between_members_and_its_revoke_deletes_everywhere() {
    let cluster = Cluster::start(MEMBERS).await;
    let leader = cluster.leader().await;
    let (granter, keeper) = ((leader + 1) % MEMBERS, (leader + 2) % MEMBERS);
    let mut clients = clients(&cluster).await;
    let grant = clients[granter]
        .lease_grant(LEASE_TTL_S, None)
        .await
        .unwrap();
    let id = grant.id();
    assert_eq!(grant.ttl(), LEASE_TTL_S);
    let header = grant.header().expect("a grant header");
    assert_eq!(header.member_id(), cluster.member_id(granter));

    let (mut sender, mut responses) = clients[keeper].lease_keep_alive(id).await.unwrap();
    sender.keep_alive().await.unwrap();
    let kept = within_catch_up(responses.message()).await.unwrap();
    let kept = kept.expect("a keep-alive answer");
    assert_eq!((kept.id(), kept.ttl()), (id, LEASE_TTL_S));

    let options = PutOptions::new().with_lease(id);
    let put = clients[leader]
        .put("leased", "v", Some(options))
        .await
        .unwrap();
    let revision = header_revision(put.header());
    let options = LeaseTimeToLiveOptions::new().with_keys();
    let ttl = clients[keeper].lease_time_to_live(id, Some(options)).await;
    assert_eq!(ttl.unwrap().keys(), [b"leased".to_vec()]);
    for (index, client) in clients.iter_mut().enumerate() {
        let get = client.get("leased", None).await.unwrap();
        let kv = get.kvs().first().expect("the leased key");
        assert_eq!(
            (kv.lease(), kv.mod_revision()),
            (id, revision),
            "on {index}"
        );
    }

    clients[keeper].lease_revoke(id).await.unwrap();
    for (index, client) in clients.iter_mut().enumerate() {
        let get = client.get("leased", None).await.unwrap();
        assert!(get.kvs().is_empty(), "leased key still on {index}");
        let ttl = client.lease_time_to_live(id, None).await.unwrap();
        assert_eq!(ttl.ttl(), -1, "lease still alive on {index}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_answers_match_a_real_etcd_cluster() {
    let expected = {
        let reference = Cluster::start_flavor(Flavor::Etcd, MEMBERS).await;
        differential_sequence(&reference).await
    };
    let subject = Cluster::start(MEMBERS).await;
    let actual = differential_sequence(&subject).await;
    println!("etcd's answers:\n{}", expected.join("\n"));
    for (step, (want, got)) in expected.iter().zip(&actual).enumerate() {
        assert_eq!(want, got, "step {step} differs from etcd");
    }
    assert_eq!(expected.len(), actual.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_cluster_commands() {
    const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/etcdctl_cluster.sh");
    const SCRIPT_TIMEOUT_S: u32 = 120;
    let cluster = Cluster::start(MEMBERS).await;
    let args: Vec<String> = cluster
        .endpoints()
        .into_iter()
        .enumerate()
        .map(|(index, endpoint)| format!("{}={endpoint}", member_name(index)))
        .collect();
    run_script(SCRIPT, &args, cluster.flavor(), SCRIPT_TIMEOUT_S);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linearizable_on_every_member_across_a_leader_kill_and_restart() {
    let seed = rand::random::<u64>();
    let context = format!("seed {seed}");
    let mut cluster = Cluster::start(MEMBERS).await;
    let init = read_history_keys(&mut cluster.client(0).await).await;
    let origin = Instant::now();
    let deadline = origin + Duration::from_millis(HISTORY_DURATION_MS);
    let clients: Vec<_> = (0..HISTORY_CLIENTS)
        .map(|id| {
            let client = HistoryClient {
                id,
                endpoint: cluster.member(id % MEMBERS).endpoint(),
                rng: StdRng::seed_from_u64(seed ^ (id as u64 + 1)),
                origin,
                deadline,
                mod_revisions: HashMap::new(),
            };
            tokio::spawn(client.run())
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(HISTORY_KILL_AFTER_MS)).await;
    let leader = cluster.leader().await;
    cluster.kill9(leader);
    let new_leader = cluster.leader().await;
    println!("{context}: killed leader {leader}, member {new_leader} leads");
    cluster.restart(leader).await;

    let mut history = Vec::new();
    for client in clients {
        let join = tokio::time::timeout(Duration::from_millis(HISTORY_JOIN_TIMEOUT_MS), client);
        history.extend(join.await.expect("a history client hung").expect("client"));
    }
    history.push(final_read(&mut cluster.client(new_leader).await, origin).await);
    let report = check(&EtcdModel::default(), &init, &history, HISTORY_CHECK_BUDGET);
    println!(
        "{context}: {} operations ({} unknown) checked in {:?}",
        report.ops_checked, report.unknown_ops, report.elapsed
    );
    match report.verdict {
        Verdict::Linearizable => {}
        Verdict::Illegal(explanation) => panic!("{context}: not linearizable\n{explanation}"),
        Verdict::Unknown(why) => panic!("{context}: the checker gave up: {why}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

async fn clients(cluster: &Cluster) -> Vec<Client> {
    let mut clients = Vec::new();
    for index in 0..cluster.size() {
        clients.push(cluster.client(index).await);
    }
    clients
}

/// The first key's value and mod revision.
fn found(get: &etcd_client::GetResponse) -> Option<(String, i64)> {
    let kv = get.kvs().first()?;
    Some((utf8(kv.value()), kv.mod_revision()))
}

/// `future`'s output; panics after `CATCH_UP_TIMEOUT_MS`.
async fn within_catch_up<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_millis(CATCH_UP_TIMEOUT_MS), future)
        .await
        .unwrap_or_else(|_| panic!("no answer within {CATCH_UP_TIMEOUT_MS} ms"))
}

async fn wait_for_count(count: &AtomicUsize, at_least: usize, what: &str) {
    let reached = || async { (count.load(Ordering::SeqCst) >= at_least).then_some(()) };
    eventually(&format!("{at_least} {what}"), reached).await;
}

/// A client with the load's timeouts, for one member only.
async fn load_client(endpoint: &str) -> Option<Client> {
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_millis(LOAD_CONNECT_TIMEOUT_MS))
        .with_timeout(Duration::from_millis(LOAD_REQUEST_TIMEOUT_MS));
    Client::connect([endpoint], Some(options)).await.ok()
}

/// Every key under `prefix` with its value and mod revision.
async fn read_prefix(client: &mut Client, prefix: &str) -> BTreeMap<String, (String, i64)> {
    let options = GetOptions::new().with_prefix();
    let get = client.get(prefix, Some(options)).await.unwrap();
    get.kvs()
        .iter()
        .map(|kv| (utf8(kv.key()), (utf8(kv.value()), kv.mod_revision())))
        .collect()
}

/// One writer per member puts to its own member until `stop` (or its limits); errors while a
/// member is down or the leader changes are expected (their keys are recorded).
struct LoadWriter {
    index: usize,
    endpoint: String,
    acked: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    /// Set just before a member is killed: its writer stops.
    killed: Arc<Vec<AtomicBool>>,
}

/// What the load wrote.
#[derive(Default)]
struct Load {
    /// Acknowledged puts: key -> (value, revision).
    acked: BTreeMap<String, (String, i64)>,
    /// Puts that failed: they may have taken effect or not (a put in flight when its member
    /// died can still commit).
    unknown: BTreeSet<String>,
}

impl Load {
    /// Every acknowledged put is in `read` with its revision; every other key is a failed put.
    fn assert_read(&self, read: &BTreeMap<String, (String, i64)>, member: usize) {
        for (key, written) in &self.acked {
            assert_eq!(
                read.get(key),
                Some(written),
                "acknowledged {key} on member {member}"
            );
        }
        for key in read.keys().filter(|key| !self.acked.contains_key(*key)) {
            assert!(
                self.unknown.contains(key),
                "{key} was never written, on {member}"
            );
        }
    }
}

impl LoadWriter {
    async fn run(self) -> Load {
        let deadline = Instant::now() + Duration::from_millis(LOAD_MAX_DURATION_MS);
        let mut client = load_client(&self.endpoint).await.expect("connect");
        let mut written = Load::default();
        for n in 0..LOAD_MAX_PUTS_PER_CLIENT {
            if self.stop.load(Ordering::SeqCst)
                || self.killed[self.index].load(Ordering::SeqCst)
                || Instant::now() >= deadline
            {
                break;
            }
            let (key, value) = (format!("load/{}/{n:05}", self.index), format!("v{n}"));
            match client.put(key.as_str(), value.as_str(), None).await {
                Ok(put) => {
                    written
                        .acked
                        .insert(key, (value, header_revision(put.header())));
                    self.acked.fetch_add(1, Ordering::SeqCst);
                }
                Err(_) => {
                    written.unknown.insert(key);
                }
            }
        }
        written
    }
}

// ---------------------------------------------------------------------------------------------
// The differential sequence
// ---------------------------------------------------------------------------------------------

/// A short fixed sequence of requests spread over the members; each answer with what is
/// deterministic in it (revisions, versions, prev_kv, errors), not ids or raft terms.
async fn differential_sequence(cluster: &Cluster) -> Vec<String> {
    let mut c = clients(cluster).await;
    let prev = || PutOptions::new().with_prev_key();
    let at = |revision| GetOptions::new().with_revision(revision);
    let mut out = Vec::new();
    out.push(show_put(c[0].put("a", "1", Some(prev())).await));
    out.push(show_put(c[1].put("a", "2", Some(prev())).await));
    out.push(show_get(c[2].get("a", None).await));
    out.push(show_put(c[0].put("b", "1", None).await));
    let delete = etcd_client::DeleteOptions::new().with_prev_key();
    out.push(show(c[2].delete("a", Some(delete)).await, |d| {
        format!("deleted {} prev {:?}", d.deleted(), d.prev_kvs())
    }));
    let cas = |key: &str, version: i64, value: &str| {
        Txn::new()
            .when([Compare::version(key, CompareOp::Equal, version)])
            .and_then([TxnOp::put(key, value, None)])
            .or_else([TxnOp::get(key, None)])
    };
    out.push(show_txn(c[0].txn(cas("b", 1, "2")).await));
    out.push(show_txn(c[1].txn(cas("b", 1, "3")).await));
    out.push(show_get(c[2].get("a", Some(at(3))).await));
    out.push(show(c[0].compact(3, None).await, |_| {
        "compacted".to_string()
    }));
    out.push(show_get(c[1].get("a", Some(at(2))).await));
    out.push(show_get(c[2].get("a", Some(at(1_000))).await));
    let lease = || LeaseGrantOptions::new().with_id(1_000);
    out.push(show(
        c[0].lease_grant(LEASE_TTL_S, Some(lease())).await,
        |g| format!("lease {} ttl {}", g.id(), g.ttl()),
    ));
    out.push(show(
        c[1].lease_grant(LEASE_TTL_S, Some(lease())).await,
        |g| format!("lease {}", g.id()),
    ));
    let leased = |id| PutOptions::new().with_lease(id);
    out.push(show_put(c[2].put("c", "leased", Some(leased(1_000))).await));
    out.push(show_put(c[0].put("d", "leased", Some(leased(999))).await));
    out.push(show(c[1].lease_revoke(1_000).await, |_| {
        "revoked".to_string()
    }));
    out.push(show_get(
        c[2].get("", Some(GetOptions::new().with_all_keys())).await,
    ));
    let duplicate = Txn::new().and_then([TxnOp::put("e", "1", None), TxnOp::put("e", "2", None)]);
    out.push(show_txn(c[0].txn(duplicate).await));
    out
}

/// The answer's header revision and `describe(answer)`, or the error's code and message.
fn show<T: HasHeader>(
    answer: Result<T, etcd_client::Error>,
    describe: impl Fn(&T) -> String,
) -> String {
    match answer {
        Ok(answer) => format!("rev {:?}: {}", answer.revision(), describe(&answer)),
        Err(etcd_client::Error::GRpcStatus(status)) => {
            format!("error {:?}: {}", status.code(), status.message())
        }
        Err(error) => panic!("not a gRPC status: {error}"),
    }
}

fn show_put(answer: Result<etcd_client::PutResponse, etcd_client::Error>) -> String {
    show(answer, |put| format!("prev {:?}", put.prev_key()))
}

fn show_get(answer: Result<etcd_client::GetResponse, etcd_client::Error>) -> String {
    show(answer, |get| {
        format!(
            "count {} more {} kvs {:?}",
            get.count(),
            get.more(),
            get.kvs()
        )
    })
}

fn show_txn(answer: Result<etcd_client::TxnResponse, etcd_client::Error>) -> String {
    show(answer, |txn| {
        format!(
            "succeeded {} responses {:?}",
            txn.succeeded(),
            txn.op_responses()
        )
    })
}

/// The header revision of a response (`None` where the server sent no header).
trait HasHeader {
    fn revision(&self) -> Option<i64>;
}

macro_rules! has_header {
    ($($response:ty),*) => {
        $(impl HasHeader for $response {
            fn revision(&self) -> Option<i64> {
                self.header().map(|header| header.revision())
            }
        })*
    };
}

has_header!(
    etcd_client::PutResponse,
    etcd_client::GetResponse,
    etcd_client::DeleteResponse,
    etcd_client::TxnResponse,
    etcd_client::CompactionResponse,
    etcd_client::LeaseGrantResponse,
    etcd_client::LeaseRevokeResponse
);

// ---------------------------------------------------------------------------------------------
// The linearizability run
// ---------------------------------------------------------------------------------------------

/// Clients of the history, spread over the members (`id % MEMBERS`).
const HISTORY_CLIENTS: usize = 3;
const HISTORY_KEY_PREFIX: &str = "lin/";
const HISTORY_KEYS: usize = 4;
const HISTORY_DURATION_MS: u64 = 6_000;
/// When the leader dies, from the start of the history.
const HISTORY_KILL_AFTER_MS: u64 = 1_500;
const HISTORY_MAX_OPS_PER_CLIENT: usize = 5_000;
/// A client whose member is down waits this long for it to come back.
const HISTORY_RECONNECT_DEADLINE_MS: u64 = 30_000;
const HISTORY_JOIN_TIMEOUT_MS: u64 = HISTORY_RECONNECT_DEADLINE_MS + 2 * LOAD_REQUEST_TIMEOUT_MS;
const HISTORY_CHECK_BUDGET: Budget = Budget {
    max_steps: 20_000_000,
    max_time: Duration::from_secs(30),
};

type Op = Operation<Request, Response>;

/// One client of the history, on one member, with its own connection.
struct HistoryClient {
    id: usize,
    endpoint: String,
    rng: StdRng,
    origin: Instant,
    deadline: Instant,
    /// The last mod revision this client saw of each key (0: absent), for its compares.
    mod_revisions: HashMap<String, i64>,
}

impl HistoryClient {
    async fn run(mut self) -> Vec<Op> {
        let mut client = self.reconnect().await;
        let mut ops = Vec::new();
        for seq in 0..HISTORY_MAX_OPS_PER_CLIENT {
            if Instant::now() >= self.deadline {
                break;
            }
            let request = self.next_request(seq);
            let call_ns = nanos_since(self.origin);
            let result = execute(&mut client, &request).await;
            let return_ns = nanos_since(self.origin);
            let outcome = match result {
                Ok(response) => {
                    self.observe(&request, &response);
                    Outcome::Ok(response)
                }
                Err(error) if is_definite(&error) => Outcome::Failed,
                Err(_) => Outcome::Unknown,
            };
            let unknown = outcome == Outcome::Unknown;
            ops.push(Operation {
                client: self.id,
                call_ns,
                // In a cluster an unknown write may still commit later (it may sit in the
                // new leader's log): no bound on when it takes effect.
                return_ns: if unknown { u64::MAX } else { return_ns },
                input: request,
                outcome,
            });
            if unknown {
                client = self.reconnect().await;
            }
        }
        ops
    }

    fn next_request(&mut self, seq: usize) -> Request {
        let key = format!(
            "{HISTORY_KEY_PREFIX}{}",
            self.rng.gen_range(0..HISTORY_KEYS)
        );
        let value = format!("c{}n{seq}", self.id);
        match self.rng.gen_range(0..100) {
            0..35 => Request::Get { key },
            35..65 => Request::Put {
                key,
                value,
                lease: 0,
            },
            65..90 => {
                let seen = self.mod_revisions.get(&key).copied().unwrap_or(0);
                Request::CompareAndSet {
                    key,
                    compare: etcd::Compare::ModRevision(seen),
                    value,
                }
            }
            _ => Request::Delete { key },
        }
    }

    fn observe(&mut self, request: &Request, response: &Response) {
        let seen = match (request, response) {
            (Request::Get { key }, Response::Get { kv, .. })
            | (Request::CompareAndSet { key, .. }, Response::CompareAndSet { kv, .. }) => {
                (key, kv.as_ref().map_or(0, |kv| kv.mod_revision))
            }
            (Request::Put { key, .. }, Response::Put { revision }) => (key, *revision),
            (Request::Delete { key }, Response::Delete { .. }) => (key, 0),
            _ => return,
        };
        let (key, mod_revision) = seen;
        // A successful compare-and-set answers with no kv: the key now has its revision.
        let mod_revision = match response {
            Response::CompareAndSet {
                succeeded: true,
                revision,
                ..
            } => *revision,
            _ => mod_revision,
        };
        self.mod_revisions.insert(key.clone(), mod_revision);
    }

    /// Connects to this client's member and polls a read until it answers (the member may
    /// be down until it is restarted).
    async fn reconnect(&self) -> Client {
        let deadline = Instant::now() + Duration::from_millis(HISTORY_RECONNECT_DEADLINE_MS);
        loop {
            if let Some(mut client) = load_client(&self.endpoint).await {
                if client.get("history-connect-probe", None).await.is_ok() {
                    return client;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{} did not answer for {HISTORY_RECONNECT_DEADLINE_MS} ms",
                self.endpoint
            );
            tokio::time::sleep(Duration::from_millis(CATCH_UP_POLL_MS)).await;
        }
    }
}

/// The history's keys before it starts (nothing written there yet).
async fn read_history_keys(client: &mut Client) -> State {
    let options = GetOptions::new().with_prefix();
    let get = client.get(HISTORY_KEY_PREFIX, Some(options)).await.unwrap();
    State {
        revision: header_revision(get.header()),
        kvs: get
            .kvs()
            .iter()
            .map(|kv| (utf8(kv.key()), key_value(kv)))
            .collect(),
        ..State::default()
    }
}

/// A read of every history key once the clients stopped: the final state must be the replay
/// of a linearization (it pins the unknown writes).
async fn final_read(client: &mut Client, origin: Instant) -> Op {
    let request = Request::Range {
        prefix: HISTORY_KEY_PREFIX.to_string(),
    };
    let call_ns = nanos_since(origin);
    let response = execute(client, &request).await.expect("final read");
    Operation {
        client: HISTORY_CLIENTS,
        call_ns,
        return_ns: nanos_since(origin),
        input: request,
        outcome: Outcome::Ok(response),
    }
}

fn nanos_since(origin: Instant) -> u64 {
    u64::try_from(origin.elapsed().as_nanos()).expect("a run lasts less than 584 years")
}

/// Polls `attempt` until it gives a value; panics after `CATCH_UP_TIMEOUT_MS`.
async fn eventually<T, F, Fut>(what: &str, attempt: F) -> T
where
    F: Fn() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    common::cluster::eventually(what, CATCH_UP_TIMEOUT_MS, CATCH_UP_POLL_MS, attempt).await
}

/// Simple auth tokens (the default `--auth-token`) work on every member, as etcd replicates
/// them: clientv3 spreads one client's requests over all its endpoints with the one token it
/// got. A member applies the token's entry asynchronously, as any entry: the first request
/// elsewhere may have to wait for it (bounded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simple_token_from_any_member_works_on_every_member() {
    use ferrocd_api::etcdserverpb::auth_client::AuthClient;
    use ferrocd_api::etcdserverpb::kv_client::KvClient;
    use ferrocd_api::etcdserverpb::{AuthenticateRequest, PutRequest};

    const PASSWORD: &str = "token-test";
    let cluster = Cluster::start(MEMBERS).await;
    let mut admin = cluster.client(0).await;
    admin
        .user_add("root", PASSWORD, None)
        .await
        .expect("user add");
    admin.user_grant_role("root", "root").await.expect("grant");
    admin.auth_enable().await.expect("auth enable");
    let endpoints = cluster.endpoints();
    let channel = |member: usize| {
        let endpoint = endpoints[member].clone();
        tonic::transport::Channel::from_shared(endpoint)
            .expect("endpoint URL")
            .connect_lazy()
    };
    for issuer in 0..MEMBERS {
        let request = AuthenticateRequest {
            name: "root".into(),
            password: PASSWORD.into(),
        };
        let answer = AuthClient::new(channel(issuer)).authenticate(request).await;
        let token = answer.expect("authenticate").into_inner().token;
        for member in 0..MEMBERS {
            let key = format!("token-{issuer}-{member}");
            let put_with_token = || async {
                let mut request = tonic::Request::new(PutRequest {
                    key: key.clone().into_bytes(),
                    value: b"v".to_vec(),
                    ..Default::default()
                });
                let token = token.parse().expect("a token is ASCII");
                request.metadata_mut().insert("token", token);
                match KvClient::new(channel(member)).put(request).await {
                    Ok(_) => Some(()),
                    Err(status) if status.message().contains("invalid auth token") => None,
                    Err(status) => panic!("put {key} on member {member}: {status}"),
                }
            };
            let what = format!("member {member} accepts member {issuer}'s token");
            within_catch_up_eventually(&what, put_with_token).await;
        }
    }
}

async fn within_catch_up_eventually<F, Fut>(what: &str, attempt: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Option<()>>,
{
    common::cluster::eventually(what, CATCH_UP_TIMEOUT_MS, CATCH_UP_POLL_MS, attempt).await
}
