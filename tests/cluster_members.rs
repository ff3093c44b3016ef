//! Membership changes of a 3-member cluster of the server under test (`FERROCD_TEST_SERVER`,
//! default ferrocd; `etcd` runs the same checks on a real etcd cluster): etcdctl's member
//! commands and etcd's errors (`etcdctl_members.sh`), a member removed under load (it stops,
//! the others keep serving), the membership kept across log compaction and a restart of every
//! member, a member removed while down that is told so by its peers when it comes back, and a
//! fourth member that joins as a learner under load, is promoted once in sync and converges.

mod common;
mod joiner;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::{eventually, member_name, remove_when_healthy, Cluster};
use common::{run_script, Flavor};
use etcd_client::{Client, ConnectOptions, MemberAddOptions};
use joiner::Joiner;

const MEMBERS: usize = 3;
const SCRIPT_TIMEOUT_S: u32 = 90;
/// The light load while a member is removed or joins: a put every `LOAD_PAUSE_MS`, at most
/// this many, or this long.
const LOAD_MAX_PUTS: usize = 5_000;
const LOAD_MAX_DURATION_MS: u64 = 20_000;
const LOAD_PAUSE_MS: u64 = 5;
/// Acknowledged puts before the removal, and after it (the rest keep serving).
const PUTS_BEFORE_REMOVAL: usize = 20;
const PUTS_AFTER_REMOVAL: usize = 20;
/// Bound on anything the cluster does by itself (a removed member stopping, load progress).
const SETTLE_TIMEOUT_MS: u64 = 15_000;
const POLL_MS: u64 = 50;
/// etcd's message for a member that learns it was removed.
const REMOVED: &str = "the member has been permanently removed from the cluster";

/// ferrocd's hidden test flags that make the meta log compact soon (as tests/cluster_log.rs):
/// small WAL segments, frequent checkpoints, a small catch-up margin.
const COMPACTING: &[&str] = &[
    "--max-request-bytes",
    "32768",
    "--experimental-wal-segment-size-bytes",
    "131072",
    "--experimental-checkpoint-interval-ms",
    "20",
    "--experimental-snapshot-catchup-entries",
    "10",
];
/// Puts of `FILL_VALUE_BYTES` that fill several 128 KiB segments, so the first is released.
const FILL_PUTS: usize = 400;
const FILL_VALUE_BYTES: usize = 1000;

/// Bound on a joining learner catching up (its promotion is refused until then).
const CATCH_UP_TIMEOUT_MS: u64 = 20_000;

/// `count` peer URLs on ports nothing listens on: members that are added but never started.
fn spare_peer_urls(count: usize) -> Vec<String> {
    let urls = common::pick_free_ports(count).into_iter();
    urls.map(|port| format!("http://127.0.0.1:{port}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_member_commands() {
    const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/etcdctl_members.sh");
    let cluster = Cluster::start(MEMBERS).await;
    let members = cluster.endpoints().into_iter().enumerate();
    let mut args = vec![spare_peer_urls(3).join(",")];
    args.extend(members.map(|(index, endpoint)| format!("{}={endpoint}", member_name(index))));
    run_script(SCRIPT, &args, cluster.flavor(), SCRIPT_TIMEOUT_S);
}

/// Each member as (id, peer URLs, learner), by id.
async fn membership(client: &mut Client) -> Vec<(u64, Vec<String>, bool)> {
    let list = client.member_list().await.expect("member list");
    let mut members: Vec<_> = list
        .members()
        .iter()
        .map(|m| (m.id(), m.peer_urls().to_vec(), m.is_learner()))
        .collect();
    members.sort();
    members
}

/// Whether the WAL dir still holds its first segment (`<seq:016x>-<first index:016x>.wal`).
fn first_segment_present(wal_dir: &std::path::Path) -> bool {
    let names = std::fs::read_dir(wal_dir).expect("list the WAL dir");
    let first = format!("{:016x}-", 0);
    names
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .any(|name| name.starts_with(&first) && name.ends_with(".wal"))
}

/// Puts through `endpoint` until `stop` (bounded in count and time), counting acknowledgements.
async fn load(endpoint: String, stop: Arc<AtomicBool>, acked: Arc<AtomicUsize>) {
    let options = ConnectOptions::new().with_timeout(Duration::from_millis(5_000));
    let mut client = Client::connect([endpoint], Some(options))
        .await
        .expect("load client");
    let started = Instant::now();
    for i in 0..LOAD_MAX_PUTS {
        let elapsed = started.elapsed() > Duration::from_millis(LOAD_MAX_DURATION_MS);
        if stop.load(Ordering::SeqCst) || elapsed {
            return;
        }
        if client.put(format!("load/{i}"), "v", None).await.is_ok() {
            acked.fetch_add(1, Ordering::SeqCst);
        }
        tokio::time::sleep(Duration::from_millis(LOAD_PAUSE_MS)).await;
    }
}

async fn wait_acked(acked: &AtomicUsize, at_least: usize) {
    let deadline = Instant::now() + Duration::from_millis(SETTLE_TIMEOUT_MS);
    while acked.load(Ordering::SeqCst) < at_least {
        let now = acked.load(Ordering::SeqCst);
        assert!(
            Instant::now() < deadline,
            "{now} puts acknowledged, not {at_least}, within {SETTLE_TIMEOUT_MS} ms"
        );
        tokio::time::sleep(Duration::from_millis(POLL_MS)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_removed_under_load_stops_and_the_membership_survives_restarts() {
    let mut cluster = Cluster::start_flavor(Flavor::subject(COMPACTING), MEMBERS).await;
    let leader = cluster.leader().await;
    let removed = (leader + 1) % MEMBERS;
    let writer = (leader + 2) % MEMBERS;
    let (stop, acked) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
    );
    let endpoint = cluster.member(writer).endpoint();
    let load = tokio::spawn(load(endpoint, stop.clone(), acked.clone()));
    wait_acked(&acked, PUTS_BEFORE_REMOVAL).await;

    // Through a follower, which forwards it to the leader.
    let mut through_follower = cluster.client(writer).await;
    let removed_id = cluster.member_id(removed);
    let answer = remove_when_healthy(&mut through_follower, removed_id).await;
    let mut left: Vec<u64> = answer.members().iter().map(|m| m.id()).collect();
    left.sort();
    let mut expected = vec![cluster.member_id(leader), cluster.member_id(writer)];
    expected.sort();
    assert_eq!(left, expected, "the answer lists the members left");

    // The removed member learns it from the log and stops serving.
    let removed_endpoint = cluster.member(removed).endpoint();
    eventually(
        "the removed member stops",
        SETTLE_TIMEOUT_MS,
        POLL_MS,
        || {
            let endpoint = removed_endpoint.clone();
            async move {
                let options = ConnectOptions::new()
                    .with_connect_timeout(Duration::from_millis(500))
                    .with_timeout(Duration::from_millis(500));
                let client = Client::connect([endpoint], Some(options)).await;
                let serving = match client {
                    Ok(mut client) => client.status().await.is_ok(),
                    Err(_) => false,
                };
                (!serving).then_some(())
            }
        },
    )
    .await;
    if matches!(cluster.flavor(), Flavor::Ferrocd(_)) {
        let log = cluster.member(removed).log();
        assert!(log.contains(REMOVED), "the removed member's log:\n{log}");
    }
    cluster.kill9(removed); // reaps the exited process
    let before = acked.load(Ordering::SeqCst);
    wait_acked(&acked, before + PUTS_AFTER_REMOVAL).await;
    stop.store(true, Ordering::SeqCst);
    load.await.expect("load task");

    // A learner added, then moved: then every member left restarts.
    let mut client = cluster.client(leader).await;
    let spare = spare_peer_urls(2);
    let learner = MemberAddOptions::new().with_is_learner();
    let added = client.member_add([spare[0].as_str()], Some(learner)).await;
    let added = added.expect("member add --learner");
    let learner_id = added.member().expect("the added member").id();
    client
        .member_update(learner_id, vec![spare[1].clone()])
        .await
        .expect("member update");
    // Every change is then behind the log's compaction point: the first meta WAL segment,
    // which held them, is released on both members (ferrocd; etcd has no such flags).
    for i in 0..FILL_PUTS {
        let value = "x".repeat(FILL_VALUE_BYTES);
        client
            .put(format!("fill/{i}"), value, None)
            .await
            .expect("fill put");
    }
    if matches!(cluster.flavor(), Flavor::Ferrocd(_)) {
        for index in [leader, writer] {
            let dir = cluster.member(index).data_dir().join("wal").join("meta");
            eventually(
                "the first meta segment released",
                SETTLE_TIMEOUT_MS,
                POLL_MS,
                || {
                    let dir = dir.clone();
                    async move { (!first_segment_present(&dir)).then_some(()) }
                },
            )
            .await;
        }
    }
    let before_restart = membership(&mut client).await;
    assert_eq!(before_restart.len(), 3);
    let moved = before_restart.iter().find(|(id, _, _)| *id == learner_id);
    assert_eq!(moved.map(|m| &m.1), Some(&vec![spare[1].clone()]));
    drop(client);
    for index in [leader, writer] {
        cluster.restart(index).await;
    }
    cluster.leader().await;
    for index in [leader, writer] {
        let mut client = cluster.client(index).await;
        assert_eq!(
            membership(&mut client).await,
            before_restart,
            "member {index} after the restarts"
        );
        let put = client.put("after/restart", "v", None).await;
        put.unwrap_or_else(|e| panic!("put through member {index} after the restarts: {e}"));
    }
}

/// etcd's election timeout (the harness's default, on both servers).
const ELECTION_TIMEOUT_MS: u64 = 1_000;
/// A removed member started again must stop within a few election timeouts.
const TOLD_REMOVED_TIMEOUT_MS: u64 = 5 * ELECTION_TIMEOUT_MS;

/// The status and message of a refused request.
fn refusal<T: std::fmt::Debug>(answer: Result<T, etcd_client::Error>) -> (tonic::Code, String) {
    match answer {
        Err(etcd_client::Error::GRpcStatus(status)) => (status.code(), status.message().into()),
        other => panic!("not a gRPC refusal: {other:?}"),
    }
}

/// Starts a removed member again on its data dir: it must stop by itself, with exit status 0
/// and etcd's message, within `TOLD_REMOVED_TIMEOUT_MS`. Returns what it logged.
async fn assert_stops_as_removed(cluster: &mut Cluster, index: usize) -> String {
    let member = cluster.member_mut(index);
    member.launch();
    let log_before = member.log().len();
    let deadline = Instant::now() + Duration::from_millis(TOLD_REMOVED_TIMEOUT_MS);
    let status = loop {
        if let Some(status) = member.exited() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the removed member still runs after {TOLD_REMOVED_TIMEOUT_MS} ms:\n{}",
            member.log()
        );
        tokio::time::sleep(Duration::from_millis(POLL_MS)).await;
    };
    let log = member.log();
    assert!(status.success(), "exit status {status}:\n{log}");
    assert!(log[log_before..].contains(REMOVED), "its log:\n{log}");
    log[log_before..].to_string()
}

/// etcd remembers removed members: a member removed while it was down is told so by its
/// peers when it comes back, and stops (exit status 0, etcd's message); so it does each time
/// it is started again. Requests naming its id answer `member not found`; the others serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_removed_while_down_is_told_when_it_comes_back() {
    let mut cluster = Cluster::start(MEMBERS).await;
    let leader = cluster.leader().await;
    let (removed, other) = ((leader + 1) % MEMBERS, (leader + 2) % MEMBERS);
    let removed_id = cluster.member_id(removed);
    cluster.kill9(removed);
    let mut client = cluster.client(other).await;
    let answer = remove_when_healthy(&mut client, removed_id).await;
    assert_eq!(answer.members().len(), MEMBERS - 1);

    let not_found = (
        tonic::Code::NotFound,
        "etcdserver: member not found".to_string(),
    );
    assert_eq!(refusal(client.member_remove(removed_id).await), not_found);
    let urls = spare_peer_urls(1);
    let update = client.member_update(removed_id, urls).await;
    assert_eq!(refusal(update), not_found);
    // etcd 3.4 times out on this one (`request timed out`): a follower forwards a promotion
    // to the leader again and again until one answers "not found", and the leader's answer
    // for a removed id is "ID removed". ferrocd answers as for Remove and Update.
    if matches!(cluster.flavor(), Flavor::Ferrocd(_)) {
        assert_eq!(refusal(client.member_promote(removed_id).await), not_found);
    }

    let first = assert_stops_as_removed(&mut cluster, removed).await;
    if matches!(cluster.flavor(), Flavor::Ferrocd(_)) {
        let told = "a peer says this member was removed";
        assert!(first.contains(told), "it was told, by a peer:\n{first}");
    }
    // Then its data dir says so (ferrocd refuses it at start-up; etcd is told again).
    assert_stops_as_removed(&mut cluster, removed).await;

    let mut through_leader = cluster.client(leader).await;
    let put = through_leader.put("after/removal", "v", None).await;
    put.expect("the members left serve");
    let left: Vec<u64> = membership(&mut client).await.iter().map(|m| m.0).collect();
    let mut expected = vec![cluster.member_id(leader), cluster.member_id(other)];
    expected.sort();
    assert_eq!(left, expected);
}

/// Every endpoint's HashKV at `revision`, each polled until it has applied it.
async fn hashes_at(endpoints: &[String], revision: i64) -> Vec<u32> {
    let mut hashes = Vec::new();
    for endpoint in endpoints {
        let hash = eventually(
            "HashKV at the revision",
            CATCH_UP_TIMEOUT_MS,
            POLL_MS,
            || {
                let endpoint = endpoint.clone();
                async move {
                    let mut client = Client::connect([endpoint], None).await.ok()?;
                    Some(client.hash_kv(revision).await.ok()?.hash())
                }
            },
        )
        .await;
        hashes.push(hash);
    }
    hashes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fourth_member_joins_as_a_learner_under_load_and_is_promoted() {
    let cluster = Cluster::start(MEMBERS).await;
    let leader = cluster.leader().await;
    let (stop, acked) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
    );
    let endpoint = cluster.member((leader + 1) % MEMBERS).endpoint();
    let load = tokio::spawn(load(endpoint, stop.clone(), acked.clone()));
    wait_acked(&acked, PUTS_BEFORE_REMOVAL).await;

    let mut client = cluster.client(leader).await;
    let (joiner, id) =
        Joiner::add_learner(&cluster, &client, &[], SETTLE_TIMEOUT_MS, POLL_MS).await;
    // Refused while the learner is behind; accepted once it caught up from the log.
    let promoted = eventually(
        "promotion of the learner",
        CATCH_UP_TIMEOUT_MS,
        POLL_MS,
        || {
            let mut client = client.clone();
            async move { client.member_promote(id).await.ok() }
        },
    )
    .await;
    assert!(promoted.members().iter().all(|m| !m.is_learner()));
    let before = acked.load(Ordering::SeqCst);
    wait_acked(&acked, before + PUTS_AFTER_REMOVAL).await;
    stop.store(true, Ordering::SeqCst);
    load.await.expect("load task");

    let put = client
        .put("joined", "4", None)
        .await
        .expect("put after the join");
    let revision = put.header().expect("a header").revision();
    let mut endpoints = cluster.endpoints();
    endpoints.push(joiner.endpoint.clone());
    let hashes = hashes_at(&endpoints, revision).await;
    assert!(
        hashes.iter().all(|&hash| hash == hashes[0]),
        "HashKV at {revision} differs: {hashes:?}\njoiner log:\n{}",
        joiner.log()
    );
    let mut through_joiner = Client::connect([joiner.endpoint.clone()], None)
        .await
        .expect("client of the joined member");
    assert_eq!(membership(&mut through_joiner).await.len(), MEMBERS + 1);
}

/// A single member runs without Raft: membership changes are refused, saying so (etcd, always
/// Raft, would take them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_member_refuses_membership_changes() {
    let server = common::Server::ferrocd(&[]).await;
    let mut client = server.client().await;
    let refused = client
        .member_add(["http://127.0.0.1:1"], None)
        .await
        .expect_err("a single member refuses MemberAdd");
    let etcd_client::Error::GRpcStatus(status) = refused else {
        panic!("not a gRPC status: {refused}");
    };
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(
        status.message().contains("single member runs without Raft"),
        "{status:?}"
    );
    let list = client.member_list().await.expect("member list");
    assert_eq!(list.members().len(), 1);
}
