//! Robustness harness: concurrent clients, each on its own connection, run a random mix of
//! gets, reads at a past revision, prefix ranges, puts (some with a lease), deletes, prefix
//! deletes, compare-and-set txns, multi-key txns across shards, lease grants and revokes and
//! compactions against a real single-node server, while watchers follow the key space and a
//! fault task crashes the server (kill -9 and restart), freezes it (SIGSTOP/SIGCONT), makes
//! its fsyncs fail (a test-only flag) or its disk full (RLIMIT_FSIZE), kills it and tears the
//! tail of one of its WALs past the last valid record (as a crash mid-write leaves it), or
//! leaves it alone;
//! after a disk fault the server must stop by itself, having acknowledged no write sent after
//! the fault, and is restarted. Each round's history goes through the linearizability checker
//! (tests/linearizability) with the etcd model, every acknowledged write is read back at its
//! revision, revisions may never go backwards across a restart, and every watcher's events
//! (its watch re-created from its last revision + 1 after each crash) are checked against a
//! reference watch of the round (tests/linearizability/watch.rs).
//!
//! Short mode (default): `SHORT_ROUNDS` rounds of `ROUND_MS` per fault kind. Soak mode:
//! `FERROCD_ROBUST_DURATION_S=3600` runs rounds for that long per fault kind, each round
//! checked on its own from the quiescent state read before it. `FERROCD_ROBUST_SEED` fixes the
//! seeds (printed with every failure). `FERROCD_TEST_SERVER=etcd` runs it all against real
//! etcd, which validates the harness and the model. Figures are printed per round and per
//! fault kind (`cargo test --test robustness -- --nocapture`).
//!
//! The same traffic, recording and checks run on a 3-member cluster (`cluster_*` tests), with
//! the clients and watchers spread over the members and one of these faults per test: kill -9
//! of the leader or of a follower (restarted after a while), SIGSTOP of the leader for
//! longer than an election timeout, a member replaced (MemberRemove, it exits, MemberAdd on a
//! wiped data dir: etcd's robustness `MemberReplace`), or a disk fault on one member (it must
//! stop by itself, acknowledging nothing sent to it after the fault, and restarts on its data
//! dir); the last two strike the leader or a follower by turns, and the struck member's
//! clients move to the others meanwhile. After each cluster round every member must report the
//! same HashKV at the same revision, and after each leader kill a write must be acknowledged
//! again: the time from the kill to the first one is the recovery time it prints.
//!
//! Network faults run on a cluster whose members sit behind peer proxies
//! (tests/common/proxy.rs, `Cluster::start_proxied`): the leader or a follower cut off from
//! the others, or only the link between the leader and a follower cut, for longer than an
//! election timeout, then healed (a leader's recovery time is measured from the cut); latency
//! added to every peer link of one member; connections of every member reset at random for a
//! while.

mod common;
mod linearizability;

use std::collections::{BTreeSet, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::cluster::Cluster;
use common::proxy::Mode;
use common::{Flavor, Server};
use etcd_client::{Client, ConnectOptions, EventType, GetOptions, WatchFilterType, WatchOptions};
use ferrocd_engine::fault::ARMED_LOG_LINE;
use ferrocd_engine::wal::{encode, read_dir, Record, RECORD_HEADER_BYTES};
use linearizability::client::{
    execute, header_revision, is_definite, key_value, known_error, utf8,
};
use linearizability::etcd::{Compare, EtcdModel, KeyValue, Past, Request, Response, State, Write};
use linearizability::watch::{
    check_reference, check_watcher, Batch, Event, EventKind, WatchFigures, WatchSpec,
};
use linearizability::{check, Budget, Operation, Outcome, Report, Verdict};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

type Op = Operation<Request, Response>;

const SERVER_ARGS: [&str; 2] = ["--shards", "4"];
/// The workload's keys are `robust/<n>`; few, so that clients collide on them, and spread
/// over the shards, so that multi-key txns and prefix operations cross them.
const KEY_PREFIX: &str = "robust/";
const KEYS: usize = 12;
/// Prefix ranges and deletes also use `robust/1`: the keys 1, 10 and 11.
const SUB_PREFIX: &str = "robust/1";
/// Put and deleted after a round's final read: the end mark of its reference watch.
const SENTINEL_KEY: &str = "robust/~sentinel";
/// Revisions before a round that reads at a revision reach and compactions compact.
const PAST_WINDOW_REVISIONS: i64 = 32;
/// etcd's compaction bookkeeping starts below 1; compacting at 1 is ambiguous to the probe.
const MIN_COMPACT_REVISION: i64 = 2;
/// How long a watcher may take, after the round, to deliver its last event.
const WATCH_CATCH_UP_TIMEOUT_MS: u64 = 10_000;
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
/// When in its round a disk fault (one per round) strikes; the rest of the round runs on the
/// restarted server.
const DISK_FAULT_AT_MS: Range<u64> = 500..2_500;
/// How long the server may keep running after a disk fault before the round fails: it must
/// stop (etcd's behaviour on a failed fsync), not serve on.
const DISK_FAULT_EXIT_TIMEOUT_MS: u64 = 10_000;
/// How long the armed fault's log line may take to appear after SIGUSR2.
const FAULT_ARMED_TIMEOUT_MS: u64 = 5_000;
const EXIT_POLL_MS: u64 = 10;
/// The test-only server flag that makes fsyncs fail once the server gets SIGUSR2.
const FSYNC_ERROR_ARGS: [&str; 2] = ["--experimental-fault-injection", "fsync-error"];

const CLUSTER_MEMBERS: usize = 3;
/// A cluster round is longer: `CLUSTER_FAULT_ROOM_MS` of traffic follow its last fault.
const CLUSTER_ROUND_MS: u64 = 6_000;
/// A cluster fault starts no later than this before the round's end, so that the traffic
/// after it shows the cluster serving again (a new leader takes one to a few election
/// timeouts).
const CLUSTER_FAULT_ROOM_MS: u64 = 4_000;
/// Time between two cluster faults (from the end of one to the start of the next).
const CLUSTER_FAULT_INTERVAL_MS: Range<u64> = 300..1_000;
/// How long a killed member stays down before it is restarted.
const MEMBER_DOWN_MS: Range<u64> = 200..1_000;
/// etcd's default election timeout, which both servers run with.
const ELECTION_TIMEOUT_MS: u64 = 1_000;
/// A paused or cut off member stays so for longer than an election timeout (the others
/// elect a new leader) but shorter than `REQUEST_TIMEOUT_MS` (its clients' requests wait it
/// out).
const PAST_ELECTION_MS: Range<u64> = ELECTION_TIMEOUT_MS + 500..2_500;
/// How long latency or connection resets last.
const NETWORK_FAULT_MS: Range<u64> = 1_000..2_500;
/// Latency added to each chunk of a delayed member's peer links, each way, and its jitter:
/// from below etcd's 100 ms heartbeat interval to a few of them.
const PEER_LATENCY_MS: Range<u64> = 20..300;
const PEER_JITTER_MS: u64 = 50;
/// While connections are reset, each chunk a proxy forwards cuts its connection with this
/// chance (1 in N).
const RESET_ONE_IN_CHUNKS: u32 = 32;

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
    /// Every fsync fails from a moment in the round (test-only flag, armed by SIGUSR2).
    FsyncError,
    /// Every file write fails from a moment in the round (RLIMIT_FSIZE lowered to 0).
    DiskFull,
    /// kill -9, then garbage or a cut-short record written past the last valid record of the
    /// newest segment of one WAL (a shard's or the meta group's), then restart.
    TornTail,
    /// A cluster's leader is killed, and restarted after `MEMBER_DOWN_MS`.
    KillLeader,
    /// A cluster's follower is killed, and restarted after `MEMBER_DOWN_MS`.
    KillFollower,
    /// A cluster's leader is frozen for `PAST_ELECTION_MS`.
    PauseLeader,
    /// A cluster's leader is cut off from the others for `PAST_ELECTION_MS`, then healed.
    PartitionLeader,
    /// The same for a random follower.
    PartitionFollower,
    /// Only the link between the leader and a random follower is cut for
    /// `PAST_ELECTION_MS`: each still reaches the third member.
    PartitionLink,
    /// Every peer link of a random member gets `PEER_LATENCY_MS` each way for
    /// `NETWORK_FAULT_MS`.
    PeerDelay,
    /// Every peer connection may be reset (`RESET_ONE_IN_CHUNKS`) for `NETWORK_FAULT_MS`.
    PeerReset,
    /// One member per round (the leader or a follower, by turns) is removed
    /// (MemberRemove through another member), exits, and is added back on a wiped data dir
    /// (MemberAdd, a new id), as etcd's robustness `MemberReplace`.
    MemberReplace,
    /// `FsyncError` on one member of a cluster (the leader or a follower, by turns),
    /// restarted on its data dir once it stopped.
    ClusterFsyncError,
    /// `DiskFull` the same way.
    ClusterDiskFull,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::None => "none",
            Fault::Kill => "kill9",
            Fault::Pause => "sigstop",
            Fault::FsyncError => "fsync_error",
            Fault::DiskFull => "disk_full",
            Fault::TornTail => "torn_tail",
            Fault::KillLeader => "leader_kill9",
            Fault::KillFollower => "follower_kill9",
            Fault::PauseLeader => "leader_sigstop",
            Fault::PartitionLeader => "leader_partition",
            Fault::PartitionFollower => "follower_partition",
            Fault::PartitionLink => "link_partition",
            Fault::PeerDelay => "peer_delay",
            Fault::PeerReset => "peer_reset",
            Fault::MemberReplace => "member_replace",
            Fault::ClusterFsyncError => "cluster_fsync_error",
            Fault::ClusterDiskFull => "cluster_disk_full",
        }
    }

    fn round_ms(self) -> u64 {
        if self.clustered() {
            CLUSTER_ROUND_MS
        } else {
            ROUND_MS
        }
    }

    /// Faults of a 3-member cluster (the others run on a single server).
    fn clustered(self) -> bool {
        self.network()
            || self.once_per_round_on_a_member()
            || matches!(
                self,
                Fault::KillLeader | Fault::KillFollower | Fault::PauseLeader
            )
    }

    /// Cluster faults struck once per round, on the leader or a follower by turns.
    fn once_per_round_on_a_member(self) -> bool {
        matches!(
            self,
            Fault::MemberReplace | Fault::ClusterFsyncError | Fault::ClusterDiskFull
        )
    }

    /// Faults armed with ferrocd's `--experimental-fault-injection` (etcd has no such flag).
    fn fsync_error(self) -> bool {
        matches!(self, Fault::FsyncError | Fault::ClusterFsyncError)
    }

    /// Faults of the network between a cluster's members (members behind peer proxies).
    fn network(self) -> bool {
        matches!(
            self,
            Fault::PartitionLeader
                | Fault::PartitionFollower
                | Fault::PartitionLink
                | Fault::PeerDelay
                | Fault::PeerReset
        )
    }

    /// Faults after which the server process dies (and is started again).
    fn crashes(self) -> bool {
        matches!(
            self,
            Fault::Kill
                | Fault::FsyncError
                | Fault::DiskFull
                | Fault::TornTail
                | Fault::KillLeader
                | Fault::KillFollower
                | Fault::MemberReplace
                | Fault::ClusterFsyncError
                | Fault::ClusterDiskFull
        )
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

/// ferrocd only: etcd has no fault injection flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linearizable_across_fsync_errors() {
    run_fault_kind(Fault::FsyncError).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linearizable_across_a_full_disk() {
    run_fault_kind(Fault::DiskFull).await;
}

/// ferrocd only: the tear is written in ferrocd's WAL format.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linearizable_across_torn_wal_tails() {
    run_fault_kind(Fault::TornTail).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_linearizable_across_leader_kill9_and_restart() {
    run_fault_kind(Fault::KillLeader).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_linearizable_across_follower_kill9_and_restart() {
    run_fault_kind(Fault::KillFollower).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_linearizable_across_a_leader_paused_past_an_election() {
    run_fault_kind(Fault::PauseLeader).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_partition_linearizable_across_an_isolated_leader() {
    run_fault_kind(Fault::PartitionLeader).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_partition_linearizable_across_an_isolated_follower() {
    run_fault_kind(Fault::PartitionFollower).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_partition_linearizable_across_a_cut_link() {
    run_fault_kind(Fault::PartitionLink).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_delay_linearizable_across_peer_latency() {
    run_fault_kind(Fault::PeerDelay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_drop_linearizable_across_peer_connection_resets() {
    run_fault_kind(Fault::PeerReset).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_linearizable_across_member_replacement() {
    run_fault_kind(Fault::MemberReplace).await;
}

/// ferrocd only: etcd has no fault injection flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_linearizable_across_fsync_errors_on_one_member() {
    run_fault_kind(Fault::ClusterFsyncError).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_linearizable_across_a_full_disk_on_one_member() {
    run_fault_kind(Fault::ClusterDiskFull).await;
}

/// The pipeline can fail: a real history, recorded from the server under test, is accepted
/// as recorded and rejected once one read's value is changed, or once the final read reports
/// an older revision than the last write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_real_history_is_rejected() {
    let seed = base_seed();
    let context = format!("self-test seed {seed} (reproduce: {SEED_ENV}={seed})");
    let mut subject = Subject::Single(Box::new(Server::subject(&SERVER_ARGS).await));
    let recorded = record_round(
        &mut subject,
        Fault::None,
        seed,
        0,
        SELF_TEST_ROUND_MS,
        &context,
    )
    .await;
    let (init, history) = (&recorded.init, &recorded.history);
    check_history(subject.flavor(), Fault::None, init, history, &context);

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

    assert_watch_corruptions_rejected(&recorded, &context);
}

/// The watch checks can fail on real data: the recorded watches pass as recorded, and fail
/// once the reference or a watcher loses an event, or a watcher gets one twice.
fn assert_watch_corruptions_rejected(recorded: &Recorded, context: &str) {
    check_watches(recorded, context);
    let last = final_state(&recorded.history);
    let reference = &recorded.reference;
    assert!(reference.len() > 2, "{context}: a round without events");
    let mut lost = reference.clone();
    lost.remove(reference.len() / 2);
    assert!(
        check_reference(&recorded.init.kvs, &lost, &last.kvs).is_err(),
        "{context}: a reference without one event was accepted"
    );
    let (spec, sessions) = &recorded.watches[0];
    let mut without = sessions.clone();
    let batch = without
        .iter_mut()
        .flatten()
        .find(|batch| !batch.events.is_empty())
        .expect("a batch with events");
    let removed = batch.events.remove(0);
    let check = |sessions| check_watcher(spec, sessions, reference, last.revision);
    assert!(
        check(&without).is_err(),
        "{context}: a watch without {removed:?} was accepted"
    );
    let mut repeated = sessions.clone();
    repeated.push(vec![Batch {
        header_revision: last.revision,
        events: vec![removed],
    }]);
    assert!(
        check(&repeated).is_err(),
        "{context}: a watch with an event twice was accepted"
    );
}

fn assert_rejected(init: &State, history: &[Op], context: &str) {
    let report = check(&EtcdModel::default(), init, history, CHECK_BUDGET);
    assert!(
        matches!(report.verdict, Verdict::Illegal(_)),
        "{context}: a corrupted history was not rejected: {:?}",
        report.verdict
    );
}

/// Runs every round of one fault kind on one server (or cluster) and prints the totals.
async fn run_fault_kind(fault: Fault) {
    let base_seed = base_seed();
    let flavor = match fault.fsync_error() {
        true => Flavor::subject(&[&SERVER_ARGS[..], &FSYNC_ERROR_ARGS[..]].concat()),
        false => Flavor::subject(&SERVER_ARGS),
    };
    if (fault.fsync_error() || fault == Fault::TornTail) && flavor == Flavor::Etcd {
        println!(
            "robustness etcd fault {}: skipped (ferrocd's fault injection or WAL format)",
            fault.name()
        );
        return;
    }
    let mut subject = if fault.network() {
        Subject::Cluster(Cluster::start_proxied(flavor, CLUSTER_MEMBERS, base_seed).await)
    } else if fault.clustered() {
        Subject::Cluster(Cluster::start_flavor(flavor, CLUSTER_MEMBERS).await)
    } else {
        Subject::Single(Box::new(Server::subject_flavor(flavor).await))
    };
    let server_name = match (subject.flavor(), &subject) {
        (Flavor::Etcd, Subject::Single(_)) => "etcd",
        (Flavor::Ferrocd(_), Subject::Single(_)) => "ferrocd",
        (Flavor::Etcd, Subject::Cluster(_)) => "etcd cluster",
        (Flavor::Ferrocd(_), Subject::Cluster(_)) => "ferrocd cluster",
    };
    let mut totals = Figures::default();
    for round in 0..rounds(fault.round_ms()) {
        let seed = base_seed.wrapping_add(round);
        let context = format!(
            "fault {} round {round} seed {seed} (reproduce: {SEED_ENV}={base_seed})",
            fault.name()
        );
        let figures = run_round(&mut subject, fault, seed, round, &context).await;
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

fn rounds(round_ms: u64) -> u64 {
    match std::env::var(DURATION_ENV) {
        Ok(seconds) => {
            let seconds: u64 = seconds
                .parse()
                .unwrap_or_else(|e| panic!("{DURATION_ENV}={seconds}: {e}"));
            (seconds * 1_000).div_ceil(round_ms).max(1)
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
    /// Events of the reference watches, checked against the key space before and after.
    reference_events: u64,
    /// Events the round's watchers received, each checked against the reference.
    watch_events: u64,
    watch_resumptions: u64,
    /// Watches from a compacted revision that ended with `compact_revision` set.
    compacted_watches: u64,
    /// Leader kills or partitions, and the time from each to the first write acknowledged
    /// after it.
    leader_faults: u64,
    max_recovery_ms: u64,
    sum_recovery_ms: u64,
    /// Peer connections reset by the proxies.
    peer_resets: u64,
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
        self.reference_events += other.reference_events;
        self.watch_events += other.watch_events;
        self.watch_resumptions += other.watch_resumptions;
        self.compacted_watches += other.compacted_watches;
        self.leader_faults += other.leader_faults;
        self.max_recovery_ms = self.max_recovery_ms.max(other.max_recovery_ms);
        self.sum_recovery_ms += other.sum_recovery_ms;
        self.peer_resets += other.peer_resets;
    }
}

impl std::fmt::Display for Figures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "histories {} (rejected 0), ops checked {} (unknown outcome {}, definite errors {}), \
             faults {}, acknowledged writes verified {} (lost 0), needed revision gaps {}, \
             max check {} ms, max steps {}, reference events {}, watch events checked {} \
             (resumptions {}), compacted watches {}",
            self.histories,
            self.ops_checked,
            self.unknown_ops,
            self.definite_failures,
            self.faults,
            self.acked_writes_verified,
            self.needed_revision_gaps,
            self.max_check_ms,
            self.max_steps,
            self.reference_events,
            self.watch_events,
            self.watch_resumptions,
            self.compacted_watches
        )?;
        if self.leader_faults > 0 {
            write!(
                f,
                ", leader faults {} (recovery max {} ms, mean {} ms)",
                self.leader_faults,
                self.max_recovery_ms,
                self.sum_recovery_ms / self.leader_faults
            )?;
        }
        if self.peer_resets > 0 {
            write!(f, ", peer connections reset {}", self.peer_resets)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// A round
// ---------------------------------------------------------------------------------------------

/// What the harness runs against.
enum Subject {
    Single(Box<Server>),
    /// Clients and watchers spread over the members.
    Cluster(Cluster),
}

impl Subject {
    fn flavor(&self) -> &Flavor {
        match self {
            Subject::Single(server) => server.flavor(),
            Subject::Cluster(cluster) => cluster.flavor(),
        }
    }

    fn endpoints(&self) -> Vec<String> {
        match self {
            Subject::Single(server) => vec![server.endpoint()],
            Subject::Cluster(cluster) => cluster.endpoints(),
        }
    }

    /// A client of the server, or of the cluster's leader; for the quiescent reads and
    /// checks between rounds, when every member runs.
    async fn client(&self) -> Client {
        match self {
            Subject::Single(server) => server.client().await,
            Subject::Cluster(cluster) => cluster.client(cluster.leader().await).await,
        }
    }

    /// The single server of a single-server fault.
    fn server(&mut self) -> &mut Server {
        match self {
            Subject::Single(server) => server,
            Subject::Cluster(_) => panic!("a single-server fault on a cluster"),
        }
    }

    fn cluster(&mut self) -> &mut Cluster {
        match self {
            Subject::Cluster(cluster) => cluster,
            Subject::Single(_) => panic!("a cluster fault on a single server"),
        }
    }
}

/// What clients and the fault task share.
struct Shared {
    /// Every member's client URL (one for a single server, where a restart may move it: the
    /// harness retries taken ports). Client and watcher `n` use member `n % members`.
    endpoints: Mutex<Vec<String>>,
    /// The highest revision any response has reported so far.
    max_revision: AtomicI64,
    /// The oldest revision reads at a revision and compactions use: the past window's start.
    past_from: i64,
    /// The revision before the round: compactions stay at or below it.
    init_revision: i64,
}

impl Shared {
    fn endpoint(&self, member: usize) -> String {
        let endpoints = self.endpoints.lock().expect("endpoints lock");
        endpoints[member % endpoints.len()].clone()
    }

    fn set_endpoints(&self, endpoints: Vec<String>) {
        *self.endpoints.lock().expect("endpoints lock") = endpoints;
    }
}

async fn run_round(
    subject: &mut Subject,
    fault: Fault,
    seed: u64,
    round: u64,
    context: &str,
) -> Figures {
    let recorded = record_round(subject, fault, seed, round, fault.round_ms(), context).await;
    let history = &recorded.history;
    let flavor = subject.flavor();
    let (report, needed_gaps) = check_history(flavor, fault, &recorded.init, history, context);
    let mut client = subject.client().await;
    let acked_writes_verified = verify_acknowledged_writes(&mut client, history, context).await;
    if needed_gaps {
        let gaps = revisions_without_change(&mut client, &recorded.init, history).await;
        println!("{context}: revisions that changed nothing: {gaps:?}");
    }
    let watches = check_watches(&recorded, context);
    let compacted_watches = u64::from(check_compacted_watch(&mut client, context).await);
    if let Subject::Cluster(cluster) = subject {
        cluster.assert_converged(cluster.leader().await).await;
    }
    let recoveries_ms: Vec<u64> = recorded
        .leader_faults_ns
        .iter()
        .map(|&fault_ns| recovery_ms(history, fault_ns, context))
        .collect();
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
        reference_events: recorded.reference.len() as u64,
        watch_events: watches.events,
        watch_resumptions: watches.resumptions,
        compacted_watches,
        leader_faults: recoveries_ms.len() as u64,
        max_recovery_ms: recoveries_ms.iter().copied().max().unwrap_or(0),
        sum_recovery_ms: recoveries_ms.iter().sum(),
        peer_resets: recorded.peer_resets,
    }
}

/// The time from a leader kill or partition to the first write acknowledged after it (sent
/// after it: one in flight at the fault may have been committed before). Panics if none
/// was: the round leaves `CLUSTER_FAULT_ROOM_MS` of traffic after its last fault.
fn recovery_ms(history: &[Op], fault_ns: u64, context: &str) -> u64 {
    let first_ack_ns = history
        .iter()
        .filter(|op| op.call_ns >= fault_ns && !acknowledged_writes(op).is_empty())
        .map(|op| op.return_ns)
        .min()
        .unwrap_or_else(|| {
            panic!(
                "{context}: no write acknowledged after the leader fault at {} ms",
                fault_ns / 1_000_000
            )
        });
    (first_ack_ns - fault_ns) / 1_000_000
}

/// Checks the reference events against the key space before and after the round, then every
/// watcher against the reference; panics naming the first violation.
fn check_watches(recorded: &Recorded, context: &str) -> WatchFigures {
    let last = final_state(&recorded.history);
    if let Err(violation) = check_reference(&recorded.init.kvs, &recorded.reference, &last.kvs) {
        panic!("{context}: the reference watch: {violation}");
    }
    let mut totals = WatchFigures::default();
    for (spec, sessions) in &recorded.watches {
        let figures = check_watcher(spec, sessions, &recorded.reference, last.revision)
            .unwrap_or_else(|violation| panic!("{context}: watch {spec:?}: {violation}"));
        totals.events += figures.events;
        totals.batches += figures.batches;
        totals.resumptions += figures.resumptions;
    }
    totals
}

/// The key space the final read reported.
fn final_state(history: &[Op]) -> State {
    let Some(Outcome::Ok(Response::Range { revision, kvs })) = history.last().map(|op| &op.outcome)
    else {
        panic!("the history ends with the final range read");
    };
    State {
        revision: *revision,
        kvs: kvs.iter().cloned().collect(),
        ..State::default()
    }
}

/// A round's history and what it started from.
struct Recorded {
    init: State,
    history: Vec<Op>,
    faults: u64,
    /// When each leader kill or partition struck, in ns since the round's origin.
    leader_faults_ns: Vec<u64>,
    peer_resets: u64,
    definite_failures: u64,
    /// The reference watch's events, from the round's first revision to the final read's.
    reference: Vec<Event>,
    /// Every watcher's sessions (the first, then one per re-creation).
    watches: Vec<(WatchSpec, Vec<Vec<Batch>>)>,
}

/// Reads the quiescent state, runs the clients and the watchers for `duration_ms` while
/// injecting `fault`, appends a final read of the whole key space to the history, and reads
/// the reference watch.
async fn record_round(
    subject: &mut Subject,
    fault: Fault,
    seed: u64,
    round: u64,
    duration_ms: u64,
    context: &str,
) -> Recorded {
    let init = prepare_round(&mut subject.client().await).await;
    let past_from = *init.past.snapshots.keys().next().expect("a past snapshot");
    let shared = Arc::new(Shared {
        endpoints: Mutex::new(subject.endpoints()),
        max_revision: AtomicI64::new(init.revision),
        past_from,
        init_revision: init.revision,
    });
    let (target_sender, target) = tokio::sync::watch::channel(None);
    let watchers: Vec<_> = watch_specs()
        .into_iter()
        .enumerate()
        .map(|(member, spec)| {
            let watcher = Watcher {
                member,
                spec: spec.clone(),
                shared: Arc::clone(&shared),
                start_revision: init.revision + 1,
                target: target.clone(),
            };
            (spec, tokio::spawn(watcher.run(context.to_string())))
        })
        .collect();
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
                leases: Vec::new(),
                revoked: Vec::new(),
                max_seen: init.revision,
            };
            tokio::spawn(worker.run())
        })
        .collect();
    let faults = inject_faults(subject, fault, seed, origin, deadline, &shared, context).await;

    let mut history = Vec::new();
    let mut endpoints = Vec::new();
    let mut definite_failures = 0;
    for client in clients {
        let join = tokio::time::timeout(Duration::from_millis(CLIENT_JOIN_TIMEOUT_MS), client);
        let log = join
            .await
            .unwrap_or_else(|_| panic!("{context}: a client hung"))
            .expect("client task");
        history.extend(log.ops);
        endpoints.extend(log.endpoints);
        definite_failures += log.definite_failures;
    }
    // In a cluster an unknown write may still commit after its member died (it may sit in
    // the new leader's log): no kill bounds it.
    let bounding_kills = match subject {
        Subject::Single(_) => faults.kills_ns.as_slice(),
        Subject::Cluster(_) => &[],
    };
    bound_unknown_outcomes(&mut history, bounding_kills);
    for struck in &faults.disk_faults {
        let sent = check_nothing_acknowledged_after_fault(&history, &endpoints, struck, context);
        println!(
            "{context}: {sent} requests sent to {} between the disk fault and its death, none \
             acknowledged",
            struck.endpoint
        );
    }
    history.push(final_read(subject, origin).await);
    let last_revision = final_state(&history).revision;
    let reference = reference_events(subject, init.revision + 1, last_revision, context).await;

    let mut watches = Vec::new();
    for (spec, watcher) in watchers {
        let target = spec.expected(&reference).last().map_or(0, |e| e.revision);
        target_sender.send_replace(Some(target));
        let join = tokio::time::timeout(
            Duration::from_millis(CLIENT_JOIN_TIMEOUT_MS + WATCH_CATCH_UP_TIMEOUT_MS),
            watcher,
        );
        let sessions = join
            .await
            .unwrap_or_else(|_| panic!("{context}: a watcher hung"))
            .expect("watcher task");
        watches.push((spec, sessions));
    }
    Recorded {
        init,
        history,
        faults: faults.count,
        leader_faults_ns: faults.leader_faults_ns,
        peer_resets: faults.peer_resets,
        definite_failures,
        reference,
        watches,
    }
}

/// Before a round, with no client running: revokes the leases left by the last one (their
/// IDs are unique per round), then reads the key space, the compaction and the key spaces of
/// the past window (down to `PAST_WINDOW_REVISIONS` back, not below the compaction).
async fn prepare_round(client: &mut Client) -> State {
    let leases = client.leases().await.expect("list leases");
    for lease in leases.leases() {
        match client.lease_revoke(lease.id()).await {
            Ok(_) => {}
            Err(error) if known_error(&error) == Some(Response::LeaseNotFound) => {}
            Err(error) => panic!("revoke lease {}: {error}", lease.id()),
        }
    }
    let mut init = read_state(client, None).await;
    let lowest_readable = lowest_readable_revision(client, init.revision).await;
    init.compacted = if lowest_readable >= MIN_COMPACT_REVISION {
        lowest_readable
    } else {
        0
    };
    let past_from = lowest_readable.max(init.revision - PAST_WINDOW_REVISIONS);
    let mut past = Past::default();
    for revision in past_from..=init.revision {
        let at = read_state(client, Some(revision)).await;
        past.snapshots.insert(revision, at.kvs);
    }
    init.past = Arc::new(past);
    init
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
    flavor: &Flavor,
    fault: Fault,
    init: &State,
    history: &[Op],
    context: &str,
) -> (Report, bool) {
    let strict = check(&EtcdModel::default(), init, history, CHECK_BUDGET);
    let gaps_possible = fault.crashes() && matches!(flavor, Flavor::Ferrocd(_));
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

/// A disk fault: when it was in effect and when the struck server was dead, in ns since the
/// round's origin, and the client URL it served on.
struct DiskFault {
    fault_ns: u64,
    death_ns: u64,
    endpoint: String,
}

/// What the fault task did.
#[derive(Default)]
struct FaultLog {
    count: u64,
    /// When each killed process was dead (reaped), in ns since the round's origin, ascending.
    kills_ns: Vec<u64>,
    disk_faults: Vec<DiskFault>,
    /// When each leader kill or partition struck, in ns since the round's origin.
    leader_faults_ns: Vec<u64>,
    /// Peer connections the proxies reset.
    peer_resets: u64,
}

/// The fault task: injects `fault` at random intervals until `deadline` (a cluster fault
/// until `CLUSTER_FAULT_ROOM_MS` before it), leaving every server running.
async fn inject_faults(
    subject: &mut Subject,
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
        Fault::Kill | Fault::TornTail => KILL_INTERVAL_MS,
        Fault::Pause => PAUSE_INTERVAL_MS,
        Fault::FsyncError | Fault::DiskFull => {
            let at = origin + Duration::from_millis(rng.gen_range(DISK_FAULT_AT_MS));
            tokio::time::sleep_until(at.into()).await;
            let server = subject.server();
            let struck = disk_fault_and_restart(server, fault, shared, origin, context).await;
            log.kills_ns.push(struck.death_ns);
            log.disk_faults.push(struck);
            log.count += 1;
            return log;
        }
        Fault::MemberReplace | Fault::ClusterFsyncError | Fault::ClusterDiskFull => {
            let at = origin + Duration::from_millis(rng.gen_range(DISK_FAULT_AT_MS));
            tokio::time::sleep_until(at.into()).await;
            let cluster = subject.cluster();
            let leader = cluster.leader().await;
            // A round's seed is the base seed plus its number: its parity alternates.
            let victim = match seed % 2 {
                0 => leader,
                _ => (leader + rng.gen_range(1..cluster.size())) % cluster.size(),
            };
            let struck_ns = match fault {
                Fault::MemberReplace => {
                    replace_member(cluster, victim, shared, origin, context).await
                }
                _ => {
                    let struck = member_disk_fault_and_restart(
                        cluster, victim, fault, shared, origin, context,
                    )
                    .await;
                    let fault_ns = struck.fault_ns;
                    log.kills_ns.push(struck.death_ns);
                    log.disk_faults.push(struck);
                    fault_ns
                }
            };
            if victim == leader {
                log.leader_faults_ns.push(struck_ns);
            }
            log.count += 1;
            return log;
        }
        Fault::KillLeader
        | Fault::KillFollower
        | Fault::PauseLeader
        | Fault::PartitionLeader
        | Fault::PartitionFollower
        | Fault::PartitionLink
        | Fault::PeerDelay
        | Fault::PeerReset => CLUSTER_FAULT_INTERVAL_MS,
    };
    let last_start = if fault.clustered() {
        deadline - Duration::from_millis(CLUSTER_FAULT_ROOM_MS)
    } else {
        deadline
    };
    loop {
        let next = Instant::now() + Duration::from_millis(rng.gen_range(interval_ms.clone()));
        if next >= last_start {
            return log;
        }
        tokio::time::sleep_until(next.into()).await;
        match fault {
            Fault::Kill => {
                let server = subject.server();
                let kill_ns = crash_and_restart(server, shared, origin, None, context).await;
                log.kills_ns.push(kill_ns);
            }
            Fault::TornTail => {
                let tear = Some(&mut rng);
                let server = subject.server();
                let kill_ns = crash_and_restart(server, shared, origin, tear, context).await;
                log.kills_ns.push(kill_ns);
            }
            Fault::Pause => {
                let server = subject.server();
                server.pause();
                let length_ms = rng.gen_range(PAUSE_LENGTH_MS);
                tokio::time::sleep(Duration::from_millis(length_ms)).await;
                server.resume();
            }
            Fault::KillLeader | Fault::KillFollower => {
                let cluster = subject.cluster();
                let leader = cluster.leader().await;
                let victim = match fault {
                    Fault::KillLeader => leader,
                    _ => (leader + rng.gen_range(1..cluster.size())) % cluster.size(),
                };
                let down_ms = rng.gen_range(MEMBER_DOWN_MS);
                let kill = kill_member_and_restart(cluster, victim, down_ms, shared, origin);
                let kill_ns = kill.await;
                log.kills_ns.push(kill_ns);
                if victim == leader {
                    log.leader_faults_ns.push(kill_ns);
                }
            }
            Fault::PauseLeader => {
                let cluster = subject.cluster();
                let leader = cluster.leader().await;
                cluster.pause(leader);
                let length_ms = rng.gen_range(PAST_ELECTION_MS);
                tokio::time::sleep(Duration::from_millis(length_ms)).await;
                cluster.resume(leader);
            }
            Fault::PartitionLeader | Fault::PartitionFollower | Fault::PartitionLink => {
                let cluster = subject.cluster();
                let leader = cluster.leader().await;
                let follower = (leader + rng.gen_range(1..cluster.size())) % cluster.size();
                match fault {
                    Fault::PartitionLeader => {
                        cluster.isolate(leader);
                        log.leader_faults_ns.push(nanos_since(origin));
                    }
                    Fault::PartitionFollower => cluster.isolate(follower),
                    _ => cluster.partition(leader, follower),
                }
                let length_ms = rng.gen_range(PAST_ELECTION_MS);
                tokio::time::sleep(Duration::from_millis(length_ms)).await;
                cluster.heal();
            }
            Fault::PeerDelay | Fault::PeerReset => {
                let cluster = subject.cluster();
                match fault {
                    Fault::PeerDelay => {
                        let mode = Mode::Delay {
                            latency_ms: rng.gen_range(PEER_LATENCY_MS),
                            jitter_ms: PEER_JITTER_MS,
                        };
                        cluster.fault_member(rng.gen_range(0..cluster.size()), mode);
                    }
                    _ => {
                        let mode = Mode::Drop {
                            one_in_chunks: RESET_ONE_IN_CHUNKS,
                        };
                        for member in 0..cluster.size() {
                            cluster.fault_member(member, mode);
                        }
                    }
                }
                let resets_before = cluster.peer_resets();
                let length_ms = rng.gen_range(NETWORK_FAULT_MS);
                tokio::time::sleep(Duration::from_millis(length_ms)).await;
                cluster.heal();
                log.peer_resets += cluster.peer_resets() - resets_before;
            }
            Fault::None
            | Fault::FsyncError
            | Fault::DiskFull
            | Fault::MemberReplace
            | Fault::ClusterFsyncError
            | Fault::ClusterDiskFull => unreachable!("no repeated faults to inject"),
        }
        log.count += 1;
    }
}

/// kill -9 of one member, restarted after `down_ms` on its data dir; its first answer may
/// not report an older revision than any answer before the kill. Returns when the killed
/// process was dead, in ns since `origin`.
async fn kill_member_and_restart(
    cluster: &mut Cluster,
    victim: usize,
    down_ms: u64,
    shared: &Shared,
    origin: Instant,
) -> u64 {
    let max_before = shared.max_revision.load(Ordering::SeqCst);
    cluster.kill9(victim);
    let killed_ns = nanos_since(origin);
    tokio::time::sleep(Duration::from_millis(down_ms)).await;
    cluster.restart(victim).await;
    let context = format!("member {victim} restarted");
    check_revision_not_back(&mut cluster.client(victim).await, max_before, &context).await;
    killed_ns
}

/// kill -9 and restart (the harness's `crash_restart`, in two steps to time the death); the
/// first answer after it may not report an older revision than any answer before it. With
/// `tear_rng`, a WAL's tail is torn while the server is dead, and recovery must log the cut.
/// Returns when the killed process was dead, in ns since `origin`.
async fn crash_and_restart(
    server: &mut Server,
    shared: &Shared,
    origin: Instant,
    tear_rng: Option<&mut StdRng>,
    context: &str,
) -> u64 {
    let max_before = shared.max_revision.load(Ordering::SeqCst);
    server.kill9();
    let killed_ns = nanos_since(origin);
    let tear = tear_rng.map(|rng| tear_wal_tail(&server.data_dir(), rng, context));
    let log_before = server.log().len();
    restart_and_check_revision(server, shared, max_before, context).await;
    if let Some(tear) = tear {
        check_cut_logged(server, log_before, &tear, context);
    }
    killed_ns
}

/// Starts the server again on its data dir (the fault is gone: a fresh process has neither
/// the armed fault nor the lowered limit); the first answer may not report an older revision
/// than `max_before`, the highest any answer reported before.
async fn restart_and_check_revision(
    server: &mut Server,
    shared: &Shared,
    max_before: i64,
    context: &str,
) {
    server.start().await;
    shared.set_endpoints(vec![server.endpoint()]);
    check_revision_not_back(&mut server.client().await, max_before, context).await;
}

/// The first answer of a restarted server may not report an older revision than
/// `max_before`, the highest any answer reported before.
async fn check_revision_not_back(client: &mut Client, max_before: i64, context: &str) {
    let after = client.get(KEY_PREFIX, None).await;
    let revision = after
        .unwrap_or_else(|e| panic!("{context}: first request after restart: {e}"))
        .header()
        .expect("header")
        .revision();
    assert!(
        revision >= max_before,
        "{context}: revision went back from {max_before} to {revision} across a restart"
    );
}

/// Injects a disk fault into the running server, checks that it stops by itself, and starts
/// it again.
async fn disk_fault_and_restart(
    server: &mut Server,
    fault: Fault,
    shared: &Shared,
    origin: Instant,
    context: &str,
) -> DiskFault {
    let max_before = shared.max_revision.load(Ordering::SeqCst);
    let struck = disk_fault_until_exit(server, fault, origin, context).await;
    restart_and_check_revision(server, shared, max_before, context).await;
    struck
}

/// A disk fault on one member of a cluster: its clients move to the others, which serve on
/// (electing a new leader if it led); once it stopped by itself it restarts on its data dir,
/// catches up, and may not answer with an older revision than any answer before.
async fn member_disk_fault_and_restart(
    cluster: &mut Cluster,
    victim: usize,
    fault: Fault,
    shared: &Shared,
    origin: Instant,
    context: &str,
) -> DiskFault {
    let context = format!("{context}: {} on member {victim}", fault.name());
    let max_before = shared.max_revision.load(Ordering::SeqCst);
    shared.set_endpoints(endpoints_but(cluster, victim));
    let member = cluster.member_mut(victim);
    let struck = disk_fault_until_exit(member, fault, origin, &context).await;
    cluster.restart(victim).await;
    check_revision_not_back(&mut cluster.client(victim).await, max_before, &context).await;
    shared.set_endpoints(cluster.endpoints());
    struck
}

/// Every member's client URL but `excluded`'s: where clients go while it is down.
fn endpoints_but(cluster: &Cluster, excluded: usize) -> Vec<String> {
    let mut endpoints = cluster.endpoints();
    endpoints.remove(excluded);
    endpoints
}

/// Injects a disk fault into the running server, waits for it to stop by itself (it may not
/// serve on with a disk that failed) and checks how it stopped.
async fn disk_fault_until_exit(
    server: &mut Server,
    fault: Fault,
    origin: Instant,
    context: &str,
) -> DiskFault {
    let log_before = server.log().len();
    if fault.fsync_error() {
        server.signal(libc::SIGUSR2);
        wait_for_log(server, log_before, ARMED_LOG_LINE.trim_end(), context).await;
    } else {
        assert!(matches!(fault, Fault::DiskFull | Fault::ClusterDiskFull));
        limit_file_size(server.pid(), 0);
    }
    let fault_ns = nanos_since(origin);
    let status = wait_exit(server, context).await;
    let death_ns = nanos_since(origin);
    let new_log = server.log().split_off(log_before);
    check_fault_exit(server.flavor(), fault, status, &new_log, context);
    DiskFault {
        fault_ns,
        death_ns,
        endpoint: server.endpoint(),
    }
}

/// etcd's robustness `MemberReplace`: the victim's clients move to the others, which serve
/// on; it is removed through another member, exits, and is added back on a wiped data dir;
/// its first answer may not report an older revision than any answer before. Returns when
/// the removal was sent, in ns since `origin`.
async fn replace_member(
    cluster: &mut Cluster,
    victim: usize,
    shared: &Shared,
    origin: Instant,
    context: &str,
) -> u64 {
    let through = (victim + 1) % cluster.size();
    let max_before = shared.max_revision.load(Ordering::SeqCst);
    shared.set_endpoints(endpoints_but(cluster, victim));
    let removed_ns = nanos_since(origin);
    let context = format!("{context}: member {victim} replaced");
    let ms = |ns: u64| (ns - removed_ns) / 1_000_000;
    let exit = cluster.remove(victim, through).await;
    println!(
        "{context}: removed, exit {exit:?} after {} ms",
        ms(nanos_since(origin))
    );
    if let (Flavor::Ferrocd(_), Some(status)) = (cluster.flavor(), exit) {
        assert!(
            status.success(),
            "{context}: the removed member exited with {status}"
        );
    }
    cluster.rejoin(victim, through).await;
    check_revision_not_back(&mut cluster.client(victim).await, max_before, &context).await;
    shared.set_endpoints(cluster.endpoints());
    println!(
        "{context}: serving again after {} ms",
        ms(nanos_since(origin))
    );
    removed_ns
}

/// Lowers the file size limit of process `pid` (prlimit(2)): every write past
/// `limit_bytes` fails with EFBIG, as on a full disk (or kills with SIGXFSZ a process that does
/// not ignore it).
fn limit_file_size(pid: libc::pid_t, limit_bytes: u64) {
    let limit = libc::rlimit {
        rlim_cur: limit_bytes,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: prlimit(2) on a child we spawned and have not reaped, reading one local struct.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_FSIZE, &limit, std::ptr::null_mut()) };
    assert_eq!(
        rc,
        0,
        "prlimit on pid {pid}: {}",
        std::io::Error::last_os_error()
    );
}

/// Polls the server log (from byte `from`) until it holds `line`.
async fn wait_for_log(server: &Server, from: usize, line: &str, context: &str) {
    let deadline = Instant::now() + Duration::from_millis(FAULT_ARMED_TIMEOUT_MS);
    while !server.log()[from..].contains(line) {
        assert!(
            Instant::now() < deadline,
            "{context}: no `{line}` in the log after {FAULT_ARMED_TIMEOUT_MS} ms"
        );
        tokio::time::sleep(Duration::from_millis(EXIT_POLL_MS)).await;
    }
}

/// Polls until the server exited by itself; fails the round if it keeps running.
async fn wait_exit(server: &mut Server, context: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_millis(DISK_FAULT_EXIT_TIMEOUT_MS);
    loop {
        if let Some(status) = server.exited() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "{context}: the server kept running {DISK_FAULT_EXIT_TIMEOUT_MS} ms after the fault"
        );
        tokio::time::sleep(Duration::from_millis(EXIT_POLL_MS)).await;
    }
}

/// How the server stopped: ferrocd aborts (SIGABRT) after logging its fatal error where the
/// log can still be written; etcd (disk full) must not exit successfully (it exits with 1, or
/// dies from SIGXFSZ, its log unwritable).
fn check_fault_exit(
    flavor: &Flavor,
    fault: Fault,
    status: std::process::ExitStatus,
    log: &str,
    context: &str,
) {
    use std::os::unix::process::ExitStatusExt;
    let fatal_line = log.lines().find(|line| line.contains("fatal"));
    println!("{context}: the server stopped: {status}; log: {fatal_line:?}");
    match flavor {
        Flavor::Ferrocd(_) => assert_eq!(
            status.signal(),
            Some(libc::SIGABRT),
            "{context}: the server stopped with {status}\n{log}"
        ),
        Flavor::Etcd => assert!(
            !status.success(),
            "{context}: the server stopped with {status}\n{log}"
        ),
    }
    if matches!(flavor, Flavor::Ferrocd(_)) && fault.fsync_error() {
        assert!(
            fatal_line.is_some_and(|line| line.contains("Input/output error")),
            "{context}: no fatal EIO line in the log:\n{log}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Torn WAL tails
// ---------------------------------------------------------------------------------------------

/// How far past the end of the last valid record garbage may start: the tail a crash
/// mid-write leaves is the write in progress, just past the end.
const TEAR_REACH_BYTES: u64 = 64 * 1024;
/// Longest run of garbage written (a few blocks of a write in progress).
const TEAR_MAX_GARBAGE_BYTES: usize = 16 * 1024;
/// Data length of the record whose write is cut short.
const TEAR_RECORD_DATA_BYTES: Range<usize> = 1..2_048;

/// A tail torn while the server was dead: the segment, and where its valid records end,
/// which is where recovery must report the cut.
struct Tear {
    segment: PathBuf,
    valid_end: u64,
}

/// Tears the tail of the newest segment of one WAL of `data_dir` (a random shard's or the
/// meta group's), past its last valid record: either the prefix of a next record whose write
/// was cut short (header and part of its data, at the end of the valid records) or garbage
/// from a random offset up to `TEAR_REACH_BYTES` past it, inside the preallocated zero tail.
/// Nothing valid is touched, so nothing fdatasynced (acknowledged) is; the engine's own reader
/// must then still find exactly the same records and report a torn tail at their end.
fn tear_wal_tail(data_dir: &Path, rng: &mut StdRng, context: &str) -> Tear {
    let mut dirs = wal_dirs(data_dir);
    dirs.shuffle(rng);
    let (dir, before) = dirs
        .iter()
        .find_map(|dir| {
            let recovered = read_dir(dir).unwrap_or_else(|e| panic!("{context}: {dir:?}: {e}"));
            recovered.tail.is_some().then_some((dir, recovered))
        })
        .unwrap_or_else(|| panic!("{context}: no WAL segment in {data_dir:?}"));
    let segment = before.segments.last().expect("a segment").path.clone();
    let valid_end = before.tail.as_ref().expect("a tail").offset;
    let file_len = std::fs::metadata(&segment).expect("segment metadata").len();
    assert!(
        valid_end < file_len,
        "{context}: {segment:?} has no room past its last record at {valid_end}"
    );
    let (offset, mut bytes, what) = if rng.gen_bool(0.5) {
        (
            valid_end,
            cut_short_record(&before.records, rng),
            "record cut short",
        )
    } else {
        let reach_end = file_len.min(valid_end + TEAR_REACH_BYTES);
        (rng.gen_range(valid_end..reach_end), garbage(rng), "garbage")
    };
    let room = usize::try_from(file_len - offset).unwrap_or(usize::MAX);
    bytes.truncate(room);
    write_and_sync(&segment, offset, &bytes);
    println!(
        "{context}: tore {segment:?}: {what}, {} bytes at {offset} (valid records end at \
         {valid_end})",
        bytes.len()
    );
    let after = read_dir(dir).unwrap_or_else(|e| panic!("{context}: read torn {dir:?}: {e}"));
    assert!(
        after.records == before.records,
        "{context}: tearing {segment:?} at {offset} changed its valid records"
    );
    let torn = after.torn_tail.map(|torn| (torn.file, torn.offset));
    assert_eq!(
        torn,
        Some((segment.clone(), valid_end)),
        "{context}: the torn {segment:?} does not read as torn at {valid_end}"
    );
    Tear { segment, valid_end }
}

/// The WAL directories of a data dir (`wal/meta`, `wal/shard-NNN`), sorted.
fn wal_dirs(data_dir: &Path) -> Vec<PathBuf> {
    let entries = std::fs::read_dir(data_dir.join("wal")).expect("the data dir's wal/");
    let mut dirs: Vec<PathBuf> = entries
        .map(|entry| entry.expect("a wal/ entry").path())
        .filter(|path| path.is_dir())
        .collect();
    dirs.sort();
    assert!(!dirs.is_empty(), "no WAL in {data_dir:?}");
    dirs
}

/// The next record after `records` (an entry at the next index), as a write cut short
/// leaves it: a strict prefix of its header and data. Its data bytes are all non-zero, so a
/// prefix never reads as the whole record (the missing bytes read as zeros).
fn cut_short_record(records: &[Record], rng: &mut StdRng) -> Vec<u8> {
    let (term, index) = records
        .last()
        .map_or((1, 1), |last| (last.term, last.index + 1));
    let data_len = rng.gen_range(TEAR_RECORD_DATA_BYTES);
    let data: Vec<u8> = (0..data_len).map(|_| rng.gen_range(1..=u8::MAX)).collect();
    let mut bytes = encode(&Record::entry(term, index, data));
    bytes.truncate(rng.gen_range(1..RECORD_HEADER_BYTES + data_len));
    bytes
}

/// Random bytes, none zero (zeros in the preallocated tail would change nothing).
fn garbage(rng: &mut StdRng) -> Vec<u8> {
    let len = rng.gen_range(1..=TEAR_MAX_GARBAGE_BYTES);
    (0..len).map(|_| rng.gen_range(1..=u8::MAX)).collect()
}

fn write_and_sync(path: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {path:?}: {e}"));
    file.write_all_at(bytes, offset)
        .unwrap_or_else(|e| panic!("write {path:?} at {offset}: {e}"));
    file.sync_data().expect("fdatasync the torn segment");
}

/// The restarted server's recovery logged the cut: `cut a torn WAL tail` with the torn
/// segment and the end of its valid records (in the log from byte `log_before`).
fn check_cut_logged(server: &Server, log_before: usize, tear: &Tear, context: &str) {
    let log = server.log().split_off(log_before);
    let file = tear.segment.display().to_string();
    let logged = log
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .any(|line| {
            line["msg"] == "cut a torn WAL tail"
                && line["file"] == file.as_str()
                && line["offset"] == tear.valid_end
        });
    assert!(
        logged,
        "{context}: no `cut a torn WAL tail` of {file} at {} in the log:\n{log}",
        tear.valid_end
    );
}

/// No write sent to the struck server after the fault was in effect, and before it died, may
/// be acknowledged: it could not have been made durable there. (`endpoints[i]` is where
/// `history[i]` was sent.) Returns how many were sent.
fn check_nothing_acknowledged_after_fault(
    history: &[Op],
    endpoints: &[String],
    struck: &DiskFault,
    context: &str,
) -> usize {
    assert_eq!(history.len(), endpoints.len(), "an endpoint per operation");
    let sent: Vec<&Op> = history
        .iter()
        .zip(endpoints)
        .filter(|(_, endpoint)| **endpoint == struck.endpoint)
        .map(|(op, _)| op)
        .filter(|op| op.call_ns > struck.fault_ns && op.call_ns < struck.death_ns)
        .collect();
    let acknowledged: Vec<_> = sent
        .iter()
        .filter(|op| {
            let lease_op = matches!(
                (&op.input, &op.outcome),
                (
                    Request::LeaseGrant { .. } | Request::LeaseRevoke { .. },
                    Outcome::Ok(_)
                )
            );
            lease_op || !acknowledged_writes(op).is_empty()
        })
        .collect();
    assert!(
        acknowledged.is_empty(),
        "{context}: writes acknowledged after the disk fault: {acknowledged:?}"
    );
    sent.len()
}

/// The whole key space at one revision, or now with the leases, read when no client runs.
async fn read_state(client: &mut Client, revision: Option<i64>) -> State {
    let mut options = GetOptions::new().with_prefix();
    let mut leases = BTreeSet::new();
    match revision {
        Some(revision) => options = options.with_revision(revision),
        None => {
            let listed = client.leases().await.expect("list leases");
            leases = listed.leases().iter().map(|lease| lease.id()).collect();
        }
    }
    let response = client
        .get(KEY_PREFIX, Some(options))
        .await
        .expect("read the key space");
    State {
        revision: header_revision(response.header()),
        kvs: response
            .kvs()
            .iter()
            .map(|kv| (utf8(kv.key()), key_value(kv)))
            .filter(|(key, _)| key != SENTINEL_KEY)
            .collect(),
        leases,
        ..State::default()
    }
}

/// A Range of the whole key space after every client stopped, as the history's last
/// operation: the final state must be the replay of a linearization.
async fn final_read(subject: &Subject, origin: Instant) -> Op {
    let mut client = subject.client().await;
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

/// The writes an acknowledged response proves, as (key, Some((value, revision)) for a put or
/// None for a delete, revision).
fn acknowledged_writes(op: &Op) -> Vec<(&str, Option<&str>, i64)> {
    let Outcome::Ok(response) = &op.outcome else {
        return Vec::new();
    };
    match (&op.input, response) {
        (Request::Put { key, value, .. }, Response::Put { revision })
        | (
            Request::CompareAndSet { key, value, .. },
            Response::CompareAndSet {
                revision,
                succeeded: true,
                ..
            },
        ) => vec![(key.as_str(), Some(value.as_str()), *revision)],
        (
            Request::Delete { key },
            Response::Delete {
                revision,
                deleted: 1,
            },
        ) => {
            vec![(key.as_str(), None, *revision)]
        }
        (
            Request::Txn { writes, .. },
            Response::Txn {
                revision,
                succeeded: true,
                ..
            },
        ) => writes
            .iter()
            .map(|write| match write {
                Write::Put { key, value } => (key.as_str(), Some(value.as_str()), *revision),
                Write::Delete { key } => (key.as_str(), None, *revision),
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Reads every acknowledged write back at its own revision: a put's value with that mod
/// revision, a delete's absence. Returns how many it verified; panics listing any lost.
async fn verify_acknowledged_writes(client: &mut Client, history: &[Op], context: &str) -> u64 {
    let mut verified = 0;
    let mut lost = Vec::new();
    for op in history {
        for (key, expected, revision) in acknowledged_writes(op) {
            let options = GetOptions::new().with_revision(revision);
            let read = client
                .get(key, Some(options))
                .await
                .unwrap_or_else(|e| panic!("{context}: read {key} at {revision}: {e}"));
            let found = read
                .kvs()
                .first()
                .map(|kv| (utf8(kv.value()), kv.mod_revision()));
            let matches = match (expected, &found) {
                (Some(value), Some((found_value, found_revision))) => {
                    value == found_value && revision == *found_revision
                }
                (None, None) => true,
                _ => false,
            };
            if matches {
                verified += 1;
            } else {
                lost.push(format!(
                    "{op:?}: {key} at revision {revision} found {found:?}"
                ));
            }
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
    let final_revision = final_state(history).revision;
    let mut gaps = Vec::new();
    let mut before = init.kvs.clone();
    for revision in init.revision + 1..=final_revision {
        let at = read_state(client, Some(revision)).await.kvs;
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
    /// The client URL each of `ops` was sent to.
    endpoints: Vec<String>,
    definite_failures: u64,
}

/// What a client last saw of each key (None: absent), which its compares use.
type Seen = HashMap<String, Option<(String, i64)>>;

/// One client on its own connection.
struct Worker {
    id: usize,
    round: u64,
    rng: StdRng,
    shared: Arc<Shared>,
    origin: Instant,
    deadline: Instant,
    /// Leases this client granted (or may have: unknown outcomes included), newest last.
    leases: Vec<i64>,
    /// Leases it revoked, for puts that must fail with "lease not found".
    revoked: Vec<i64>,
    /// The highest revision this client has seen, the top of its reads at a revision.
    max_seen: i64,
}

impl Worker {
    async fn run(mut self) -> ClientLog {
        let (mut client, mut endpoint) =
            connect(&self.shared, self.id, Some(REQUEST_TIMEOUT_MS)).await;
        let mut seen = Seen::new();
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
                    if let Some(revision) = response.revision() {
                        self.max_seen = self.max_seen.max(revision);
                        self.shared
                            .max_revision
                            .fetch_max(revision, Ordering::SeqCst);
                    }
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
            log.endpoints.push(endpoint.clone());
            if lost_connection {
                (client, endpoint) = connect(&self.shared, self.id, Some(REQUEST_TIMEOUT_MS)).await;
            }
        }
        log
    }

    fn next_request(&mut self, seq: usize, seen: &Seen) -> Request {
        let key = self.random_key();
        let value = format!("r{}c{}n{seq}", self.round, self.id);
        match self.rng.gen_range(0..100) {
            0..14 => Request::Get { key },
            14..20 => Request::Range {
                prefix: self.random_prefix(),
            },
            20..27 => Request::GetAt {
                key,
                revision: self.rng.gen_range(self.shared.past_from..=self.max_seen),
            },
            27..42 => Request::Put {
                key,
                value,
                lease: 0,
            },
            42..47 => self.leased_put(key, value),
            47..52 => Request::Delete { key },
            52..55 => Request::DeletePrefix {
                prefix: SUB_PREFIX.to_string(),
            },
            55..70 => Request::CompareAndSet {
                compare: self.compare_with_seen(&key, seen),
                key,
                value,
            },
            70..85 => self.multi_key_txn(&value, seen),
            85..90 => {
                let id = lease_id(self.round, self.id, seq);
                self.leases.push(id);
                Request::LeaseGrant { id }
            }
            90..96 => match self.leases.pop() {
                Some(id) => {
                    self.revoked.push(id);
                    Request::LeaseRevoke { id }
                }
                None => Request::Get { key },
            },
            96 => Request::Defragment,
            _ => {
                // Compact the past window only: the round's own revisions stay readable, so
                // the reference watch and the read-back of acknowledged writes reach them.
                let lowest = self.shared.past_from.max(MIN_COMPACT_REVISION);
                let highest = self.shared.init_revision.max(lowest);
                Request::Compact {
                    revision: self.rng.gen_range(lowest..=highest),
                }
            }
        }
    }

    fn random_key(&mut self) -> String {
        format!("{KEY_PREFIX}{}", self.rng.gen_range(0..KEYS))
    }

    /// The whole workload, or the keys `robust/1`, `robust/10`, `robust/11`.
    fn random_prefix(&mut self) -> String {
        let prefix = if self.rng.gen_bool(0.5) {
            KEY_PREFIX
        } else {
            SUB_PREFIX
        };
        prefix.to_string()
    }

    /// A put on one of this client's leases, now and then on a revoked one (which must fail
    /// with "lease not found").
    fn leased_put(&mut self, key: String, value: String) -> Request {
        let revoked = self
            .rng
            .gen_bool(0.1)
            .then(|| self.revoked.last())
            .flatten();
        let lease = match (revoked, self.leases.last()) {
            (Some(&id), _) | (None, Some(&id)) => id,
            (None, None) => 0,
        };
        Request::Put { key, value, lease }
    }

    /// Compares against what the client last saw: half the time the value, else the mod
    /// revision (0 for a key it saw absent or never saw).
    fn compare_with_seen(&mut self, key: &str, seen: &Seen) -> Compare {
        match seen.get(key) {
            Some(Some((value, _))) if self.rng.gen_bool(0.5) => Compare::Value(value.clone()),
            Some(Some((_, mod_revision))) => Compare::ModRevision(*mod_revision),
            Some(None) | None => Compare::ModRevision(0),
        }
    }

    /// A txn over 2 or 3 distinct keys (usually on different shards): each guarded by what
    /// the client saw, then a put on each, or a delete of the last one.
    fn multi_key_txn(&mut self, value: &str, seen: &Seen) -> Request {
        let count = self.rng.gen_range(2..=3);
        let mut keys: Vec<String> = Vec::with_capacity(count);
        while keys.len() < count {
            let key = self.random_key();
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
        let guards = keys
            .iter()
            .map(|key| (key.clone(), self.compare_with_seen(key, seen)))
            .collect();
        let delete_last = self.rng.gen_bool(0.3);
        let writes = keys
            .iter()
            .enumerate()
            .map(|(index, key)| {
                if delete_last && index == count - 1 {
                    Write::Delete { key: key.clone() }
                } else {
                    Write::Put {
                        key: key.clone(),
                        value: value.to_string(),
                    }
                }
            })
            .collect();
        Request::Txn { guards, writes }
    }
}

/// Unique per round, client and request, and positive.
fn lease_id(round: u64, client: usize, seq: usize) -> i64 {
    let id = ((round + 1) << 24) | ((client as u64) << 16) | seq as u64;
    i64::try_from(id).expect("lease ids fit in i64")
}

/// Remembers what a response said about keys, for later compares.
fn observe(seen: &mut Seen, request: &Request, response: &Response) {
    let snapshot = |kv: &KeyValue| (kv.value.clone(), kv.mod_revision);
    match (request, response) {
        (Request::Get { key }, Response::Get { kv, .. }) => {
            seen.insert(key.clone(), kv.as_ref().map(snapshot));
        }
        (Request::Range { prefix }, Response::Range { kvs, .. }) => {
            let keys = (0..KEYS).map(|n| format!("{KEY_PREFIX}{n}"));
            for key in keys.filter(|key| key.starts_with(prefix.as_str())) {
                let kv = kvs
                    .iter()
                    .find(|(k, _)| *k == key)
                    .map(|(_, kv)| snapshot(kv));
                seen.insert(key, kv);
            }
        }
        (Request::Put { key, value, .. }, Response::Put { revision })
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
        (Request::DeletePrefix { prefix }, Response::Delete { .. }) => {
            for (key, kv) in seen.iter_mut() {
                if key.starts_with(prefix.as_str()) {
                    *kv = None;
                }
            }
        }
        (
            Request::Txn { writes, .. },
            Response::Txn {
                revision,
                succeeded: true,
                ..
            },
        ) => {
            for write in writes {
                match write {
                    Write::Put { key, value } => {
                        seen.insert(key.clone(), Some((value.clone(), *revision)))
                    }
                    Write::Delete { key } => seen.insert(key.clone(), None),
                };
            }
        }
        (Request::Txn { guards, .. }, Response::Txn { kvs, .. }) => {
            for ((key, _), kv) in guards.iter().zip(kvs) {
                seen.insert(key.clone(), kv.as_ref().map(snapshot));
            }
        }
        // Reads of the past, leases and compaction say nothing about the present keys.
        (
            Request::GetAt { .. }
            | Request::LeaseGrant { .. }
            | Request::LeaseRevoke { .. }
            | Request::Compact { .. }
            | Request::Defragment
            | Request::Put { .. },
            _,
        ) => {}
        (request, response) => panic!("response {response:?} does not answer {request:?}"),
    }
}

/// Connects to the member's current endpoint and polls a real request until it answers;
/// returns the client and the endpoint. Watch streams get no request timeout (it would bound
/// the whole stream).
async fn connect(
    shared: &Shared,
    member: usize,
    request_timeout_ms: Option<u64>,
) -> (Client, String) {
    let deadline = Instant::now() + Duration::from_millis(RECONNECT_DEADLINE_MS);
    loop {
        let endpoint = shared.endpoint(member);
        let mut options =
            ConnectOptions::new().with_connect_timeout(Duration::from_millis(CONNECT_TIMEOUT_MS));
        if let Some(timeout_ms) = request_timeout_ms {
            options = options.with_timeout(Duration::from_millis(timeout_ms));
        }
        if let Ok(mut client) = Client::connect([endpoint.as_str()], Some(options)).await {
            let probe = client.get("robustness-connect-probe", None);
            let answered = tokio::time::timeout(Duration::from_millis(REQUEST_TIMEOUT_MS), probe);
            if matches!(answered.await, Ok(Ok(_))) {
                return (client, endpoint);
            }
        }
        assert!(
            Instant::now() < deadline,
            "no answer from {endpoint} for {RECONNECT_DEADLINE_MS} ms"
        );
        tokio::time::sleep(Duration::from_millis(RECONNECT_POLL_MS)).await;
    }
}

fn nanos_since(origin: Instant) -> u64 {
    u64::try_from(origin.elapsed().as_nanos()).expect("a round lasts less than 584 years")
}

// ---------------------------------------------------------------------------------------------
// Watchers
// ---------------------------------------------------------------------------------------------

/// The watchers of every round: the whole workload with `prev_kv`; deletes only (NOPUT)
/// under a sub-prefix with `prev_kv`; puts only (NODELETE) of one key.
fn watch_specs() -> Vec<WatchSpec> {
    vec![
        WatchSpec {
            key: KEY_PREFIX.to_string(),
            prefix: true,
            no_put: false,
            no_delete: false,
            prev_kv: true,
        },
        WatchSpec {
            key: SUB_PREFIX.to_string(),
            prefix: true,
            no_put: true,
            no_delete: false,
            prev_kv: true,
        },
        WatchSpec {
            key: format!("{KEY_PREFIX}2"),
            prefix: false,
            no_put: false,
            no_delete: true,
            prev_kv: false,
        },
    ]
}

fn watch_options(spec: &WatchSpec, start_revision: i64) -> WatchOptions {
    let mut options = WatchOptions::new().with_start_revision(start_revision);
    if spec.prefix {
        options = options.with_prefix();
    }
    if spec.prev_kv {
        options = options.with_prev_key();
    }
    let mut filters = Vec::new();
    if spec.no_put {
        filters.push(WatchFilterType::NoPut);
    }
    if spec.no_delete {
        filters.push(WatchFilterType::NoDelete);
    }
    options.with_filters(filters)
}

/// One watcher through the round: re-created from its last revision + 1 whenever its stream
/// breaks, until told the last revision it must reach (or `WATCH_CATCH_UP_TIMEOUT_MS` after
/// that, leaving the check to report what is missing).
struct Watcher {
    /// The member it watches on (modulo the members).
    member: usize,
    spec: WatchSpec,
    shared: Arc<Shared>,
    start_revision: i64,
    /// `Some(revision)` once the round is over: stop after an event at or above it.
    target: tokio::sync::watch::Receiver<Option<i64>>,
}

impl Watcher {
    async fn run(mut self, context: String) -> Vec<Vec<Batch>> {
        let mut sessions: Vec<Vec<Batch>> = Vec::new();
        let mut last_seen = self.start_revision - 1;
        let mut catch_up_deadline = None;
        loop {
            if self.done(last_seen, &mut catch_up_deadline) {
                return sessions;
            }
            let (mut client, _) = connect(&self.shared, self.member, None).await;
            let options = watch_options(&self.spec, last_seen + 1);
            let Ok(mut stream) = client.watch(self.spec.key.as_str(), Some(options)).await else {
                continue;
            };
            sessions.push(Vec::new());
            let session = sessions.last_mut().expect("a session");
            loop {
                let deadline = catch_up_deadline.unwrap_or_else(far_future);
                let message = tokio::select! {
                    message = stream.message() => message,
                    _ = self.target.changed() => {
                        if self.done(last_seen, &mut catch_up_deadline) {
                            return sessions;
                        }
                        continue;
                    }
                    () = tokio::time::sleep_until(deadline.into()) => return sessions,
                };
                let Ok(Some(response)) = message else {
                    break; // The server went away: re-create the watch.
                };
                assert!(
                    !response.canceled(),
                    "{context}: watch {:?} cancelled (compact revision {}): {}",
                    self.spec,
                    response.compact_revision(),
                    response.cancel_reason()
                );
                if response.events().is_empty() {
                    continue;
                }
                let batch = to_batch(&response);
                last_seen = batch.events.last().expect("events").revision;
                session.push(batch);
                if self.done(last_seen, &mut catch_up_deadline) {
                    return sessions;
                }
            }
        }
    }

    /// Whether the watcher has reached its target; starts the catch-up clock when the
    /// target is first known.
    fn done(&self, last_seen: i64, catch_up_deadline: &mut Option<Instant>) -> bool {
        let Some(target) = *self.target.borrow() else {
            return false;
        };
        let deadline = *catch_up_deadline.get_or_insert_with(|| {
            Instant::now() + Duration::from_millis(WATCH_CATCH_UP_TIMEOUT_MS)
        });
        last_seen >= target || Instant::now() >= deadline
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(24 * 3600)
}

fn to_batch(response: &etcd_client::WatchResponse) -> Batch {
    let events = response
        .events()
        .iter()
        .map(|event| {
            let kv = event.kv().expect("an event has a kv");
            let kind = match event.event_type() {
                EventType::Put => EventKind::Put(key_value(kv)),
                EventType::Delete => EventKind::Delete,
            };
            Event {
                revision: kv.mod_revision(),
                key: utf8(kv.key()),
                kind,
                prev: event.prev_kv().map(key_value),
            }
        })
        .collect();
    Batch {
        header_revision: header_revision(response.header()),
        events,
    }
}

/// The reference events of the round: one watch of the whole workload with `prev_kv` from
/// the round's first revision, after the round. A sentinel key put and deleted after the
/// final read marks the end; events above `last_revision` (the sentinel's) are dropped.
async fn reference_events(
    subject: &Subject,
    from_revision: i64,
    last_revision: i64,
    context: &str,
) -> Vec<Event> {
    let mut client = subject.client().await;
    client
        .put(SENTINEL_KEY, "end", None)
        .await
        .unwrap_or_else(|e| panic!("{context}: put the sentinel: {e}"));
    let end = client
        .delete(SENTINEL_KEY, None)
        .await
        .unwrap_or_else(|e| panic!("{context}: delete the sentinel: {e}"));
    let end_revision = header_revision(end.header());
    let options = WatchOptions::new()
        .with_prefix()
        .with_prev_key()
        .with_start_revision(from_revision);
    let mut stream = client
        .watch(KEY_PREFIX, Some(options))
        .await
        .unwrap_or_else(|e| panic!("{context}: the reference watch: {e}"));
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_millis(WATCH_CATCH_UP_TIMEOUT_MS);
    loop {
        let message = tokio::time::timeout_at(deadline.into(), stream.message())
            .await
            .unwrap_or_else(|_| {
                panic!("{context}: the reference watch did not reach revision {end_revision}")
            })
            .unwrap_or_else(|e| panic!("{context}: the reference watch: {e}"))
            .unwrap_or_else(|| panic!("{context}: the reference watch ended"));
        assert!(
            !message.canceled(),
            "{context}: the reference watch from {from_revision} was cancelled (compact \
             revision {})",
            message.compact_revision()
        );
        let batch = to_batch(&message);
        let reached_end = batch.events.iter().any(|e| e.revision >= end_revision);
        events.extend(
            batch
                .events
                .into_iter()
                .filter(|e| e.revision <= last_revision),
        );
        if reached_end {
            return events;
        }
    }
}

/// A watch from below the compacted revision must be cancelled with `compact_revision` set
/// to it. Returns whether there was a compaction to probe.
async fn check_compacted_watch(client: &mut Client, context: &str) -> bool {
    let current = header_revision(client.get(KEY_PREFIX, None).await.expect("get").header());
    let compacted = lowest_readable_revision(client, current).await;
    if compacted <= MIN_COMPACT_REVISION {
        return false;
    }
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(compacted - 1);
    let mut stream = client
        .watch(KEY_PREFIX, Some(options))
        .await
        .unwrap_or_else(|e| panic!("{context}: watch from a compacted revision: {e}"));
    let deadline = Instant::now() + Duration::from_millis(WATCH_CATCH_UP_TIMEOUT_MS);
    loop {
        let message = tokio::time::timeout_at(deadline.into(), stream.message())
            .await
            .unwrap_or_else(|_| panic!("{context}: a compacted watch was never cancelled"))
            .expect("watch stream")
            .expect("a response");
        assert!(
            message.events().is_empty(),
            "{context}: a watch from compacted revision {} got events",
            compacted - 1
        );
        if message.canceled() || message.compact_revision() != 0 {
            assert_eq!(
                (message.canceled(), message.compact_revision()),
                (true, compacted),
                "{context}: a watch from below the compaction at {compacted}"
            );
            return true;
        }
    }
}

/// The lowest revision a read at a revision still answers (1 with nothing compacted): the
/// compaction, by bisection between 1 and `current`.
async fn lowest_readable_revision(client: &mut Client, current: i64) -> i64 {
    let (mut low, mut high) = (1, current.max(1));
    while low < high {
        let middle = low + (high - low) / 2;
        let options = GetOptions::new().with_revision(middle).with_count_only();
        match client.get(KEY_PREFIX, Some(options)).await {
            Ok(_) => high = middle,
            Err(error) if known_error(&error) == Some(Response::Compacted) => low = middle + 1,
            Err(error) => panic!("read at revision {middle}: {error}"),
        }
    }
    low
}
