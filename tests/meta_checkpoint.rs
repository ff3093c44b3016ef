//! The meta group's checkpoint and the release of its WAL across kill -9: cross-shard txns,
//! lease grants, keep-alives and revokes, auth changes and compactions load the meta group
//! (small segments, short checkpoint intervals), the process is killed at a random point, and
//! after every restart the leases (ids, TTLs never shortened), users and roles, compacted
//! revision, HashKV and keys are as before, and the meta WAL directory holds a bounded number
//! of segments. Also: a NOSPACE alarm survives a restart until it is disarmed.

mod common;

use common::Server;
use etcd_client::{
    AlarmAction, AlarmOptions, AlarmType, Client, ConnectOptions, GetOptions, Permission,
    PutOptions, Txn, TxnOp,
};
use rand::Rng;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

const ARGS: &[&str] = &[
    "--shards",
    "2",
    "--max-request-bytes",
    "32768",
    "--experimental-wal-segment-size-bytes",
    "131072",
    "--experimental-checkpoint-interval-ms",
    "20",
    "--lease-checkpoint-interval-ms",
    "300",
];
const ROUNDS: usize = 3;
/// Upper bound on each load task's operations per round; the kill comes before most are sent.
const MAX_OPS_PER_TASK: usize = 300;
const TXN_WRITERS: usize = 3;
/// Values large enough that a few hundred txns fill several 128 KiB meta segments.
const VALUE_BYTES: usize = 1500;
const LEASE_TTL_S: i64 = 3000;
/// Seconds a checked TTL may fall short of the computed bound (truncation, round trips).
const TTL_SLACK_S: i64 = 2;
/// Pause between looks at the meta WAL directory while waiting for releases.
const RELEASE_POLL_MS: u64 = 20;
const STALL_TIMEOUT_MS: u64 = 30_000;
/// Longest wait for released segments to be deleted once everything is checkpointed.
const RELEASE_TIMEOUT_MS: u64 = 10_000;
/// Meta WAL segments left once releases caught up: the one being written and one or two whose
/// entries a checkpoint does not cover yet.
const MAX_META_SEGMENTS: usize = 3;
const ROOT_PASSWORD: &str = "rootpw";

/// What the load tasks had acknowledged, and what they had sent but not seen answered.
#[derive(Default)]
struct Acked {
    /// Keys and values of acknowledged txns, with their revision.
    kvs: Vec<(String, String, i64)>,
    /// Granted leases not sent a revoke: id -> (granted TTL, last grant or renewal ack).
    leases: BTreeMap<i64, (i64, Instant)>,
    /// Leases whose revoke was acknowledged.
    revoked: BTreeSet<i64>,
    /// Leases whose revoke was sent (and maybe not applied).
    revoking: BTreeSet<i64>,
    users: BTreeSet<String>,
    roles: BTreeSet<String>,
}

#[derive(Default)]
struct Progress {
    acked: Mutex<Acked>,
    count: Mutex<usize>,
    notify: Notify,
}

impl Progress {
    fn record(&self, update: impl FnOnce(&mut Acked)) {
        update(&mut self.acked.lock().unwrap());
        *self.count.lock().unwrap() += 1;
        self.notify.notify_one();
    }

    fn count(&self) -> usize {
        *self.count.lock().unwrap()
    }
}

/// Cross-shard txns (two keys, most likely on both shards: the meta group).
async fn txn_writer(mut client: Client, round: usize, id: usize, progress: Arc<Progress>) {
    for n in 0..MAX_OPS_PER_TASK {
        let value = format!("{round}/{id}/{n}/{}", "v".repeat(VALUE_BYTES));
        let keys = [format!("a/{round}/{id}/{n}"), format!("b/{round}/{id}/{n}")];
        let ops: Vec<TxnOp> = keys
            .iter()
            .map(|k| TxnOp::put(k.clone(), value.clone(), None))
            .collect();
        let Ok(resp) = client.txn(Txn::new().and_then(ops)).await else {
            return; // The server was killed.
        };
        let rev = resp.header().expect("header").revision();
        progress.record(|acked| {
            for key in keys {
                acked.kvs.push((key, value.clone(), rev));
            }
        });
    }
}

/// Grants leases with a key each, renews some and revokes every third.
async fn lease_worker(mut client: Client, progress: Arc<Progress>) {
    for n in 0..MAX_OPS_PER_TASK / 3 {
        let Ok(grant) = client.lease_grant(LEASE_TTL_S, None).await else {
            return;
        };
        let id = grant.id();
        progress.record(|acked| {
            acked.leases.insert(id, (LEASE_TTL_S, Instant::now()));
        });
        let attached = PutOptions::new().with_lease(id);
        let put = client
            .put(format!("leased/{id:x}"), "v", Some(attached))
            .await;
        if put.is_err() {
            return;
        }
        if n % 3 == 1 {
            let Ok((mut keeper, mut stream)) = client.lease_keep_alive(id).await else {
                return;
            };
            if keeper.keep_alive().await.is_err() || !matches!(stream.message().await, Ok(Some(_)))
            {
                return;
            }
            progress.record(|acked| {
                acked.leases.insert(id, (LEASE_TTL_S, Instant::now()));
            });
        }
        if n % 3 == 2 {
            progress.record(|acked| {
                acked.leases.remove(&id);
                acked.revoking.insert(id);
            });
            if client.lease_revoke(id).await.is_err() {
                return;
            }
            progress.record(|acked| {
                acked.revoked.insert(id);
            });
        }
    }
}

/// Adds users and roles and grants them (auth stays disabled: the load runs without tokens).
async fn auth_worker(mut client: Client, round: usize, progress: Arc<Progress>) {
    for n in 0..MAX_OPS_PER_TASK / 3 {
        let (user, role) = (format!("u{round}-{n}"), format!("r{round}-{n}"));
        if client.role_add(role.clone()).await.is_err() {
            return;
        }
        let perm = Permission::read_write(format!("a/{n}")).with_prefix();
        if client.role_grant_permission(&role, perm).await.is_err() {
            return;
        }
        progress.record(|acked| {
            acked.roles.insert(role.clone());
        });
        if client.user_add(user.clone(), "pw", None).await.is_err() {
            return;
        }
        if client.user_grant_role(&user, &role).await.is_err() {
            return;
        }
        progress.record(|acked| {
            acked.users.insert(user);
        });
    }
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

/// Everything a range of all keys and HashKV say at `rev`.
async fn history_at(client: &mut Client, rev: i64) -> (u32, Vec<(Vec<u8>, Vec<u8>, i64, i64)>) {
    let hash = client.hash_kv(rev).await.expect("hash_kv").hash();
    let options = GetOptions::new().with_all_keys().with_revision(rev);
    let resp = client.get("", Some(options)).await.expect("range");
    let kvs = resp
        .kvs()
        .iter()
        .map(|kv| {
            let key = kv.key().to_vec();
            (key, kv.value().to_vec(), kv.mod_revision(), kv.version())
        })
        .collect();
    (hash, kvs)
}

#[tokio::test]
async fn kill9_under_meta_load_keeps_leases_auth_compaction_and_bounds_the_meta_wal() {
    let mut server = Server::ferrocd(ARGS).await;
    let mut rng = rand::thread_rng();
    let mut all = Acked::default();
    let mut compacted = 0;
    for round in 0..ROUNDS {
        let progress = Arc::new(Progress::default());
        let mut tasks = Vec::new();
        for id in 0..TXN_WRITERS {
            let client = server.client().await;
            tasks.push(tokio::spawn(txn_writer(
                client,
                round,
                id,
                progress.clone(),
            )));
        }
        let client = server.client().await;
        tasks.push(tokio::spawn(lease_worker(client, progress.clone())));
        let client = server.client().await;
        tasks.push(tokio::spawn(auth_worker(client, round, progress.clone())));
        let kill_after = rng.gen_range(200..TXN_WRITERS * MAX_OPS_PER_TASK / 2);
        let mut reader = server.client().await;
        let mut seen = None;
        while progress.count() < kill_after {
            if seen.is_none() && progress.count() >= kill_after / 2 {
                let status = reader.get("a", None).await.expect("get");
                let rev = status.header().unwrap().revision();
                compacted = (rev / 2).max(compacted + 1);
                reader.compact(compacted, None).await.expect("compact");
                seen = Some((rev, history_at(&mut reader, rev).await));
            }
            let next = progress.notify.notified();
            tokio::time::timeout(Duration::from_millis(STALL_TIMEOUT_MS), next)
                .await
                .expect("load stalled");
        }
        let killed_at = Instant::now();
        server.kill9();
        for task in tasks {
            task.await.expect("load task");
        }
        let acked = std::mem::take(&mut *progress.acked.lock().unwrap());
        merge(&mut all, acked);
        server.start().await;
        let mut client = server.client().await;
        check_keys(&mut client, &all, compacted).await;
        check_leases(&mut client, &all, killed_at).await;
        check_auth(&mut client, &all).await;
        let (rev, before) = seen.expect("a history read before the kill");
        assert_eq!(
            history_at(&mut client, rev).await,
            before,
            "history at {rev}"
        );
    }
    check_meta_wal_bounded(&server).await;
    check_auth_with_tokens(&mut server).await;
}

fn merge(all: &mut Acked, round: Acked) {
    all.kvs.extend(round.kvs);
    for id in round.revoking.iter().chain(&round.revoked) {
        all.leases.remove(id);
    }
    all.leases.extend(round.leases);
    all.revoked.extend(round.revoked);
    all.revoking.extend(round.revoking);
    all.users.extend(round.users);
    all.roles.extend(round.roles);
}

/// Every acknowledged txn reads back at its revision (above the compaction), and a read below
/// the compaction is refused as compacted.
async fn check_keys(client: &mut Client, all: &Acked, compacted: i64) {
    for (key, value, rev) in all.kvs.iter().filter(|(_, _, rev)| *rev > compacted) {
        let options = GetOptions::new().with_revision(*rev);
        let resp = client.get(key.clone(), Some(options)).await.expect("get");
        let kv = resp
            .kvs()
            .first()
            .unwrap_or_else(|| panic!("acknowledged {key} at {rev} is missing"));
        assert_eq!(kv.value_str().unwrap(), value, "{key} at {rev}");
    }
    if compacted > 1 {
        let options = GetOptions::new().with_revision(compacted - 1);
        let error = client.get("a", Some(options)).await.expect_err("compacted");
        let message = error.to_string();
        assert!(
            message.contains("required revision has been compacted"),
            "{message}"
        );
    }
}

/// Acknowledged leases exist with a TTL no shorter than they had at the kill (counted from
/// the restart), revoked ones do not, and no lease exists that was never granted.
async fn check_leases(client: &mut Client, all: &Acked, killed_at: Instant) {
    let listed = client.leases().await.expect("leases");
    let live: BTreeSet<i64> = listed.leases().iter().map(|l| l.id()).collect();
    for (id, (ttl_s, renewed_at)) in &all.leases {
        assert!(live.contains(id), "lease {id:x} lost");
        let resp = client.lease_time_to_live(*id, None).await.expect("ttl");
        assert_eq!(resp.granted_ttl(), *ttl_s);
        // Remaining at the kill, minus what has passed since the restart, at the least; slack
        // for truncation to whole seconds and for the grant's round trip.
        let passed = killed_at.duration_since(*renewed_at) + killed_at.elapsed();
        let lower_bound = ttl_s - passed.as_secs() as i64 - TTL_SLACK_S;
        assert!(
            resp.ttl() >= lower_bound,
            "lease {id:x}: TTL {} below {lower_bound}",
            resp.ttl()
        );
    }
    for id in &all.revoked {
        assert!(!live.contains(id), "revoked lease {id:x} is back");
        let key = format!("leased/{id:x}");
        let resp = client.get(key.clone(), None).await.expect("get");
        assert!(resp.kvs().is_empty(), "{key} of a revoked lease is back");
    }
}

async fn check_auth(client: &mut Client, all: &Acked) {
    let users: BTreeSet<String> = client
        .user_list()
        .await
        .expect("users")
        .users()
        .to_vec()
        .into_iter()
        .collect();
    let roles: BTreeSet<String> = client
        .role_list()
        .await
        .expect("roles")
        .roles()
        .to_vec()
        .into_iter()
        .collect();
    assert!(all.users.is_subset(&users), "users lost");
    assert!(all.roles.is_subset(&roles), "roles lost");
    for user in &all.users {
        let role = user.replacen('u', "r", 1);
        let resp = client.user_get(user.clone()).await.expect("user get");
        assert_eq!(resp.roles(), [role], "roles of {user}");
    }
}

/// Once the load stops and everything is checkpointed, the meta WAL keeps only a few of the
/// segments it wrote.
async fn check_meta_wal_bounded(server: &Server) {
    let meta_dir = server.data_dir().join("wal/meta");
    let (_, created) = segments(&meta_dir);
    assert!(created >= 6, "only {created} meta segments written");
    // A cross-shard write or two so that a checkpoint after the restart covers the log.
    let mut client = server.client().await;
    let deadline = Instant::now() + Duration::from_millis(RELEASE_TIMEOUT_MS);
    loop {
        let txn = Txn::new().and_then(vec![
            TxnOp::put("a/x", "1", None),
            TxnOp::put("b/x", "1", None),
        ]);
        client.txn(txn).await.expect("txn");
        let (present, created) = segments(&meta_dir);
        if present <= MAX_META_SEGMENTS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "meta WAL: {present} segments left of {created}"
        );
        tokio::time::sleep(Duration::from_millis(RELEASE_POLL_MS)).await;
    }
}

/// With auth enabled, a restart keeps the root user: a fresh authentication gets a token that
/// works, and a wrong password is refused.
async fn check_auth_with_tokens(server: &mut Server) {
    let mut client = server.client().await;
    client
        .user_add("root", ROOT_PASSWORD, None)
        .await
        .expect("root");
    client
        .user_grant_role("root", "root")
        .await
        .expect("root role");
    client.auth_enable().await.expect("auth enable");
    server.crash_restart().await;
    let options = ConnectOptions::new()
        .with_user("root", ROOT_PASSWORD)
        .with_timeout(Duration::from_secs(10));
    let mut root = Client::connect([server.endpoint()], Some(options))
        .await
        .expect("authenticate as root after the restart");
    root.put("after-restart", "v", None)
        .await
        .expect("a put with the new token");
    let wrong = ConnectOptions::new().with_user("root", "wrong");
    assert!(Client::connect([server.endpoint()], Some(wrong))
        .await
        .is_err());
}

/// The space quota for the alarm test: 1 MiB, 100 KB values.
const QUOTA_BYTES: &str = "1048576";
const QUOTA_VALUE_BYTES: usize = 100_000;
const MAX_QUOTA_PUTS: usize = 100;
const NO_SPACE: &str = "etcdserver: mvcc: database space exceeded";

/// NOSPACE is durable, as etcd's: after a crash or a graceful restart the alarm is still
/// listed (also by etcdctl) and writes are refused; once space is freed and the alarm
/// disarmed, writes pass, also after the next restart.
#[tokio::test]
async fn nospace_survives_a_restart_until_disarmed() {
    let mut server = Server::ferrocd(&[
        "--shards",
        "2",
        "--quota-backend-bytes",
        QUOTA_BYTES,
        "--experimental-checkpoint-interval-ms",
        "20",
    ])
    .await;
    let mut client = server.client().await;
    let value = "q".repeat(QUOTA_VALUE_BYTES);
    let mut accepted = 0;
    loop {
        assert!(accepted < MAX_QUOTA_PUTS, "the quota never refused a put");
        match client
            .put(format!("big{accepted:03}"), value.clone(), None)
            .await
        {
            Ok(_) => accepted += 1,
            Err(e) => {
                assert!(e.to_string().contains(NO_SPACE), "{e}");
                break;
            }
        }
    }
    server.crash_restart().await;
    let mut client = server.client().await;
    let mut maintenance = client.maintenance_client();
    let alarms = maintenance
        .alarm(AlarmAction::Get, AlarmType::None, None)
        .await
        .expect("alarm list");
    assert_eq!(alarms.alarms().len(), 1, "NOSPACE after the restart");
    assert_eq!(alarms.alarms()[0].alarm(), AlarmType::Nospace);
    let member_id = alarms.alarms()[0].member_id();
    let listed = std::process::Command::new("etcdctl")
        .args(["--endpoints", &server.endpoint(), "alarm", "list"])
        .env("ETCDCTL_API", "3")
        .output()
        .expect("run etcdctl");
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert_eq!(listed.trim(), format!("memberID:{member_id} alarm:NOSPACE"));
    let refused = client
        .put("small", "v", None)
        .await
        .expect_err("still refused");
    assert!(refused.to_string().contains(NO_SPACE), "{refused}");

    let prefix = etcd_client::DeleteOptions::new().with_prefix();
    let deleted = client.delete("big", Some(prefix)).await.expect("delete");
    let rev = deleted.header().unwrap().revision();
    client.compact(rev, None).await.expect("compact");
    // A graceful stop checkpoints the deletes and the compaction, so defragment then frees
    // the space; the alarm survives this restart too.
    server.restart().await;
    let mut client = server.client().await;
    let mut maintenance = client.maintenance_client();
    let alarms = maintenance
        .alarm(AlarmAction::Get, AlarmType::None, None)
        .await
        .expect("alarm list");
    assert_eq!(alarms.alarms().len(), 1, "NOSPACE after a graceful restart");
    maintenance.defragment().await.expect("defragment");
    let mut disarm = AlarmOptions::new();
    disarm.with_member(member_id);
    let cleared = maintenance
        .alarm(AlarmAction::Deactivate, AlarmType::Nospace, Some(disarm))
        .await
        .expect("disarm");
    assert_eq!(cleared.alarms().len(), 1);
    client
        .put("small", "v", None)
        .await
        .expect("a put after disarm");

    server.crash_restart().await;
    let mut client = server.client().await;
    let mut maintenance = client.maintenance_client();
    let alarms = maintenance
        .alarm(AlarmAction::Get, AlarmType::None, None)
        .await
        .expect("alarm list");
    assert!(alarms.alarms().is_empty(), "the disarm is durable too");
    client
        .put("small", "w", None)
        .await
        .expect("a put after the restart");
}

/// A data dir without `db/meta.ckpt` (written before meta checkpoints existed, or by a
/// restore as meta log records) recovers its leases, auth and compaction from the meta log
/// alone.
#[tokio::test]
async fn without_a_meta_checkpoint_the_meta_log_alone_recovers_the_state() {
    let mut server = Server::ferrocd(&["--shards", "2"]).await;
    let mut client = server.client().await;
    let lease = client.lease_grant(LEASE_TTL_S, None).await.expect("grant");
    let attached = PutOptions::new().with_lease(lease.id());
    client.put("k", "v", Some(attached)).await.expect("put");
    let put = client.put("k2", "v", None).await.expect("put");
    let rev = put.header().unwrap().revision();
    client.compact(rev - 1, None).await.expect("compact");
    client.role_add("reader").await.expect("role");
    client.user_add("alice", "pw", None).await.expect("user");
    client
        .user_grant_role("alice", "reader")
        .await
        .expect("grant");
    server.stop();
    let checkpoint = server.data_dir().join("db/meta.ckpt");
    std::fs::remove_file(&checkpoint).expect("the graceful stop wrote a meta checkpoint");
    server.start().await;
    let mut client = server.client().await;
    let ttl = client
        .lease_time_to_live(lease.id(), None)
        .await
        .expect("ttl");
    assert_eq!(ttl.granted_ttl(), LEASE_TTL_S);
    let alice = client.user_get("alice").await.expect("alice");
    assert_eq!(alice.roles(), ["reader"]);
    let options = GetOptions::new().with_revision(rev - 2);
    let error = client.get("k", Some(options)).await.expect_err("compacted");
    assert!(
        error
            .to_string()
            .contains("required revision has been compacted"),
        "{error}"
    );
    client.lease_revoke(lease.id()).await.expect("revoke");
    assert!(client.get("k", None).await.expect("get").kvs().is_empty());
}
