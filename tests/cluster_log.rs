//! The meta Raft log of a 3-member ferrocd cluster stays bounded (issue 5): with small WAL
//! segments and a small catch-up margin, enough writes fill many meta segments, and every
//! member compacts its log and deletes the segments; a follower stopped (SIGSTOP) for a few
//! hundred writes still catches up from the leader's log after SIGCONT (the leader does not
//! compact past it); a member killed after compactions recovers from its compacted log.
//! Every check ends with HashKV equal on all members. A follower stopped while the leader
//! compacts past it installs a snapshot (`net/src/node/install.rs`) when it resumes.
//!
//! ferrocd only: the flags are ferrocd's hidden test flags.

mod common;

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use common::cluster::Cluster;
use common::Flavor;
use etcd_client::{
    Client, ConnectOptions, GetOptions, LeaseTimeToLiveOptions as TimeToLiveOptions, PutOptions,
};

const ARGS: &[&str] = &[
    "--shards",
    "1",
    "--max-request-bytes",
    "32768",
    "--experimental-wal-segment-size-bytes",
    "131072",
    "--experimental-checkpoint-interval-ms",
    "20",
    "--experimental-snapshot-catchup-entries",
    "100",
];
/// With ~1 KiB values a 128 KiB segment holds about a hundred entries.
const VALUE_BYTES: usize = 1000;
/// Writes that fill well over `MIN_SEGMENTS_CREATED` segments.
const FILL_WRITES: usize = 1500;
const MIN_SEGMENTS_CREATED: u64 = 8;
/// Segments left once compaction caught up: the margin's (about one), the one being written,
/// and one a checkpoint does not cover yet.
const MAX_SEGMENTS_LEFT: usize = 4;
/// Writes while a follower is stopped: more than the margin, far fewer than the bound.
const STALLED_WRITES: usize = 300;
const WRITERS: usize = 8;
const TIMEOUT_MS: u64 = 20_000;
const POLL_MS: u64 = 20;
const REQUEST_TIMEOUT_MS: u64 = 5_000;
/// The leader's error when it compacts past a member (`replica.rs`).
const LEFT_BEHIND: &str = "compacting the meta log past a lagging member: it needs a snapshot";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meta_log_is_compacted_on_every_member_and_lagging_members_catch_up() {
    if Flavor::subject(&[]) == Flavor::Etcd {
        return; // ferrocd's hidden flags
    }
    let mut cluster = Cluster::start_flavor(Flavor::subject(ARGS), 3).await;
    let leader = cluster.leader().await;
    put_many(&cluster, leader, "fill", FILL_WRITES).await;
    for index in 0..cluster.size() {
        let dir = meta_wal_dir(&cluster, index);
        eventually(
            &format!("member {index} releases its meta segments"),
            || {
                let (left, created) = segments(&dir);
                async move { (left <= MAX_SEGMENTS_LEFT).then_some(created) }
            },
        )
        .await;
        let (left, created) = segments(&dir);
        assert!(
            created >= MIN_SEGMENTS_CREATED,
            "member {index}: the writes filled only {created} segments ({left} left)"
        );
    }
    hashes_agree(&cluster).await;

    // A follower that misses more than the margin catches up from the log.
    let follower = (leader + 1) % cluster.size();
    cluster.member(follower).pause();
    put_many(&cluster, leader, "stalled", STALLED_WRITES).await;
    cluster.member(follower).resume();
    hashes_agree(&cluster).await;
    for index in 0..cluster.size() {
        let member = cluster.member(index);
        assert!(
            !member.logged(LEFT_BEHIND, &[]),
            "member {index} compacted past a member:\n{}",
            member.log()
        );
    }

    // A member killed after compactions starts from its compacted log.
    cluster.kill9(follower);
    put_many(&cluster, leader, "down", STALLED_WRITES).await;
    cluster.restart(follower).await;
    put_many(&cluster, leader, "after", WRITERS).await;
    hashes_agree(&cluster).await;
}

/// Writes while a follower is stopped that take the leader's log past the retention bound
/// (20 catch-up margins of 100 entries: `replica.rs`), so it compacts past the follower.
const LEFT_BEHIND_WRITES: usize = 2_600;
/// The installing member's log lines (`replica.rs`, `install.rs`).
const INSTALLING: &str = "this member fell behind the meta log's compaction: installing a snapshot";
const SWITCHED: &str = "switched to an installed snapshot";

/// A follower stopped while the leader compacts past it gets a snapshot when it resumes: it
/// installs the leader's state (download, new data dir, restart into it), catches up, answers
/// the same HashKV as every member, and takes later writes; the compaction and the lease it
/// missed are in its state (it refuses compacted reads, and leads with the lease).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_left_behind_installs_a_snapshot() {
    if Flavor::subject(&[]) == Flavor::Etcd {
        return; // ferrocd's hidden flags
    }
    let mut cluster = Cluster::start_flavor(Flavor::subject(ARGS), 3).await;
    let leader = cluster.leader().await;
    put_many(&cluster, leader, "before", WRITERS).await;
    let follower = (leader + 1) % cluster.size();
    let follower_pid = cluster.member(follower).pid();
    cluster.member(follower).pause();
    put_many(&cluster, leader, "behind", LEFT_BEHIND_WRITES).await;
    // Meta state the follower learns from the snapshot only: a compaction and a lease.
    let mut on_leader = cluster.client(leader).await;
    let compacted = on_leader.put("compact-mark", "v", None).await.expect("put");
    let compacted = compacted.header().unwrap().revision();
    on_leader.compact(compacted, None).await.expect("compact");
    let lease = on_leader.lease_grant(600, None).await.expect("grant").id();
    let with_lease = PutOptions::new().with_lease(lease);
    on_leader
        .put("leased", "v", Some(with_lease))
        .await
        .expect("put");
    eventually("the leader compacts past the stopped member", || {
        let compacted = cluster.member(leader).logged(LEFT_BEHIND, &[]);
        async move { compacted.then_some(()) }
    })
    .await;
    cluster.member(follower).resume();
    hashes_agree(&cluster).await;
    let member = cluster.member(follower);
    assert!(
        member.logged(INSTALLING, &[]) && member.logged(SWITCHED, &[]),
        "the follower caught up without installing a snapshot:\n{}",
        member.log()
    );
    assert_eq!(member.pid(), follower_pid, "restarted in place (exec)");
    assert!(
        !member.data_dir().with_extension("install").exists(),
        "the old data dir is gone"
    );
    put_many(&cluster, leader, "after", WRITERS).await;
    hashes_agree(&cluster).await;
    let mut on_follower = cluster.client(follower).await;
    let old = GetOptions::new()
        .with_revision(compacted - 1)
        .with_serializable();
    let error = on_follower.get("before/0", Some(old)).await.unwrap_err();
    assert!(error.to_string().contains("compacted"), "{error}");
    // The follower leads with the lease table it installed: the lease and its key.
    let target = cluster.member_id(follower);
    on_leader.move_leader(target).await.expect("move leader");
    let endpoint = cluster.member(follower).endpoint();
    eventually("the follower leads", || {
        let endpoint = endpoint.clone();
        async move {
            let status = client(&endpoint).await?.status().await.ok()?;
            (status.header()?.member_id() == target && status.leader() == target).then_some(())
        }
    })
    .await;
    let keys = TimeToLiveOptions::new().with_keys();
    let ttl = on_follower.lease_time_to_live(lease, Some(keys)).await;
    let ttl = ttl.expect("the lease lives on the new leader");
    assert_eq!(ttl.keys(), [b"leased".to_vec()]);
    on_follower.lease_revoke(lease).await.expect("revoke");
    hashes_agree(&cluster).await;
    cluster.kill9(follower);
    cluster.restart(follower).await;
    hashes_agree(&cluster).await;
}

/// `count` puts of `prefix/<n>` through member `index`, from `WRITERS` clients at once; each
/// must succeed.
async fn put_many(cluster: &Cluster, index: usize, prefix: &str, count: usize) {
    let endpoint = cluster.member(index).endpoint();
    let value = "v".repeat(VALUE_BYTES);
    let writers = (0..WRITERS).map(|writer| {
        let (endpoint, value, prefix) = (endpoint.clone(), value.clone(), prefix.to_string());
        tokio::spawn(async move {
            let mut client = client(&endpoint).await.expect("connect");
            for n in (writer..count).step_by(WRITERS) {
                let key = format!("{prefix}/{n}");
                client.put(key, value.clone(), None).await.expect("put");
            }
        })
    });
    for writer in writers.collect::<Vec<_>>() {
        writer.await.expect("writer");
    }
}

/// HashKV at the leader's current revision is the same on every member, once each applied it.
async fn hashes_agree(cluster: &Cluster) {
    let leader = cluster.leader().await;
    let mut client = cluster.client(leader).await;
    let revision = client
        .status()
        .await
        .expect("status")
        .header()
        .unwrap()
        .revision();
    let mut hashes = Vec::new();
    for index in 0..cluster.size() {
        let endpoint = cluster.member(index).endpoint();
        let what = format!("member {index} applies revision {revision}");
        // A member that has not applied `revision` yet refuses it as a future revision.
        let hash = eventually(&what, || hash_kv(&endpoint, revision)).await;
        hashes.push(hash);
    }
    assert!(
        hashes.iter().all(|&hash| hash == hashes[0]),
        "HashKV at revision {revision} differs: {hashes:?}"
    );
}

async fn hash_kv(endpoint: &str, revision: i64) -> Option<u32> {
    let answer = client(endpoint).await?.hash_kv(revision).await.ok()?;
    Some(answer.hash())
}

async fn client(endpoint: &str) -> Option<Client> {
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_millis(REQUEST_TIMEOUT_MS))
        .with_timeout(Duration::from_millis(REQUEST_TIMEOUT_MS));
    Client::connect([endpoint], Some(options)).await.ok()
}

fn meta_wal_dir(cluster: &Cluster, index: usize) -> std::path::PathBuf {
    cluster.member(index).data_dir().join("wal").join("meta")
}

/// Segment files of a WAL directory: (present, created), `created` from the highest sequence
/// number in the names (`<seq:016x>-<first_index:016x>.wal`).
fn segments(wal_dir: &Path) -> (usize, u64) {
    let names: Vec<String> = std::fs::read_dir(wal_dir)
        .expect("list WAL dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".wal"))
        .collect();
    let highest_seq = names
        .iter()
        .map(|n| u64::from_str_radix(&n[..16], 16).expect("hex seq"))
        .max()
        .expect("a live segment");
    (names.len(), highest_seq + 1)
}

/// Polls `attempt` until it gives a value; panics after `TIMEOUT_MS`.
async fn eventually<T, F, Fut>(what: &str, attempt: F) -> T
where
    F: Fn() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    common::cluster::eventually(what, TIMEOUT_MS, POLL_MS, attempt).await
}
