//! Snapshot and restore (issue 7): `etcdctl snapshot save` against ferrocd, `ferrocd snapshot
//! restore` into a new data dir, and the restored server compared with the source: HashKV at
//! the snapshot's revision, ranges at every revision from the compacted one on, the compacted
//! revision itself, leases with their TTLs and keys, auth users, roles and the enabled flag.
//! Damaged files are refused; a snapshot taken while cross-shard txns run holds each txn whole.

mod common;

use common::Server;
use etcd_client::{
    Client, ConnectOptions, GetOptions, LeaseTimeToLiveOptions, Permission, Txn, TxnOp,
};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SHARDS: &str = "3";
const ROOT_PASSWORD: &str = "rootpw";
const KEYS: usize = 40;
/// Upper bound on the txns the concurrent writer sends.
const MAX_TXNS: usize = 3000;
/// Upper bound on the concurrent writer's run.
const WRITER_TIMEOUT_MS: u64 = 20_000;
/// Keys one concurrent txn writes (hashed onto every shard).
const TXN_KEYS: usize = 8;

fn ferrocd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferrocd"))
        .args(args)
        .output()
        .expect("run ferrocd")
}

fn etcdctl(endpoint: &str, args: &[&str]) -> Output {
    Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .args(args)
        .output()
        .expect("run etcdctl")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn restore(file: &Path, data_dir: &Path, shards: &str) -> Output {
    let (file, dir) = (file.to_str().unwrap(), data_dir.to_str().unwrap());
    ferrocd(&[
        "snapshot",
        "restore",
        file,
        "--data-dir",
        dir,
        "--shards",
        shards,
    ])
}

/// Replaces `server`'s data dir with one restored from `file` and starts it on it.
async fn start_restored(server: &mut Server, file: &Path, shards: &str) {
    server.stop();
    std::fs::remove_dir_all(server.data_dir()).expect("remove data dir");
    let output = restore(file, &server.data_dir(), shards);
    assert!(output.status.success(), "restore: {}", stderr(&output));
    server.start().await;
}

async fn root_client(server: &Server) -> Client {
    let options = ConnectOptions::new().with_user("root", ROOT_PASSWORD);
    Client::connect([server.endpoint()], Some(options))
        .await
        .expect("connect as root")
}

/// Every kv of the keyspace at `rev`, with the header revision.
async fn all_at(
    client: &mut Client,
    rev: i64,
) -> Result<Vec<(Vec<u8>, i64, i64, i64, Vec<u8>, i64)>, String> {
    let options = GetOptions::new().with_all_keys().with_revision(rev);
    let response = client
        .get("", Some(options))
        .await
        .map_err(|e| e.to_string())?;
    Ok(response
        .kvs()
        .iter()
        .map(|kv| {
            let (key, value) = (kv.key().to_vec(), kv.value().to_vec());
            (
                key,
                kv.create_revision(),
                kv.mod_revision(),
                kv.version(),
                value,
                kv.lease(),
            )
        })
        .collect())
}

/// Puts, overwrites, deletes, a cross-shard txn, a lease with keys, a compaction, then auth.
/// Returns the lease id and the compacted revision.
async fn write_history(client: &mut Client) -> (i64, i64) {
    for i in 0..KEYS {
        client
            .put(format!("k{i}"), format!("v{i}"), None)
            .await
            .unwrap();
    }
    for i in (0..KEYS).step_by(3) {
        client
            .put(format!("k{i}"), format!("w{i}"), None)
            .await
            .unwrap();
    }
    let compacted = client
        .get("k0", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    for i in (0..KEYS).step_by(5) {
        client.delete(format!("k{i}"), None).await.unwrap();
    }
    let ops = (0..4)
        .map(|i| TxnOp::put(format!("t{i}"), "txn", None))
        .collect::<Vec<_>>();
    client.txn(Txn::new().and_then(ops)).await.unwrap();
    let lease = client.lease_grant(600, None).await.unwrap().id();
    for i in 0..3 {
        let options = etcd_client::PutOptions::new().with_lease(lease);
        client
            .put(format!("leased{i}"), "x", Some(options))
            .await
            .unwrap();
    }
    client.compact(compacted, None).await.unwrap();
    client.put("k1", "after-compaction", None).await.unwrap();
    client.user_add("root", ROOT_PASSWORD, None).await.unwrap();
    client.user_grant_role("root", "root").await.unwrap();
    client.role_add("reader").await.unwrap();
    let perm = Permission::read("k").with_prefix();
    client.role_grant_permission("reader", perm).await.unwrap();
    client.user_add("alice", "alicepw", None).await.unwrap();
    client.user_grant_role("alice", "reader").await.unwrap();
    client.auth_enable().await.unwrap();
    (lease, compacted)
}

/// What the test compares between source and restored server, read as root.
async fn compare(source: &mut Client, restored: &mut Client, lease: i64, compacted: i64) -> i64 {
    let rev = source
        .get("k1", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    let restored_rev = restored
        .get("k1", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    assert_eq!(
        restored_rev, rev,
        "the restored node resumes at the snapshot's revision"
    );
    for at in compacted..=rev {
        assert_eq!(
            all_at(source, at).await,
            all_at(restored, at).await,
            "range at {at}"
        );
    }
    let below = all_at(restored, compacted - 1).await.unwrap_err();
    assert!(
        below.contains("required revision has been compacted"),
        "{below}"
    );
    let ttl = |client: &mut Client| {
        let mut client = client.clone();
        async move {
            let options = LeaseTimeToLiveOptions::new().with_keys();
            let r = client
                .lease_time_to_live(lease, Some(options))
                .await
                .unwrap();
            let mut keys = r.keys().to_vec();
            keys.sort();
            (r.granted_ttl(), keys, r.ttl() > 0)
        }
    };
    assert_eq!(ttl(source).await, ttl(restored).await);
    assert_eq!(ttl(restored).await.1.len(), 3);
    let users = |r: etcd_client::UserListResponse| r.users().to_vec();
    assert_eq!(
        users(source.user_list().await.unwrap()),
        users(restored.user_list().await.unwrap())
    );
    let perms = |r: etcd_client::RoleGetResponse| format!("{:?}", r.permissions());
    assert_eq!(
        perms(source.role_get("reader").await.unwrap()),
        perms(restored.role_get("reader").await.unwrap())
    );
    rev
}

#[tokio::test]
async fn etcdctl_snapshot_restores_history_leases_and_auth() {
    let source = Server::ferrocd(&["--shards", SHARDS]).await;
    let (lease, compacted) = write_history(&mut source.client().await).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("snap.db");
    let anonymous = etcdctl(
        &source.endpoint(),
        &["snapshot", "save", file.to_str().unwrap()],
    );
    assert!(
        !anonymous.status.success(),
        "snapshot needs root once auth is on"
    );
    let alice = [
        "--user",
        "alice:alicepw",
        "snapshot",
        "save",
        file.to_str().unwrap(),
    ];
    let alice = etcdctl(&source.endpoint(), &alice);
    assert!(
        stderr(&alice).contains("permission denied"),
        "{}",
        stderr(&alice)
    );
    let user = format!("root:{ROOT_PASSWORD}");
    let saved = etcdctl(
        &source.endpoint(),
        &["--user", &user, "snapshot", "save", file.to_str().unwrap()],
    );
    assert!(
        saved.status.success(),
        "etcdctl snapshot save: {}",
        stderr(&saved)
    );
    let status = ferrocd(&["snapshot", "status", file.to_str().unwrap()]);
    assert!(status.status.success(), "{}", stderr(&status));

    let mut src = root_client(&source).await;
    let mut same = Server::ferrocd(&["--shards", SHARDS]).await;
    start_restored(&mut same, &file, SHARDS).await;
    let mut restored = root_client(&same).await;
    let rev = compare(&mut src, &mut restored, lease, compacted).await;
    let hash = |r: etcd_client::HashKvResponse| (r.hash(), r.compact_version());
    assert_eq!(
        hash(src.hash_kv(rev).await.unwrap()),
        hash(restored.hash_kv(rev).await.unwrap())
    );
    let stdout = String::from_utf8_lossy(&status.stdout);
    assert!(
        stdout.contains(&format!(" {rev} ")),
        "status shows revision {rev}: {stdout}"
    );

    // Auth is on in the restored node: anonymous reads are refused, alice reads her prefix.
    let mut anonymous = same.client().await;
    let refused = anonymous.get("k1", None).await.unwrap_err().to_string();
    assert!(refused.contains("user name is empty"), "{refused}");
    let options = ConnectOptions::new().with_user("alice", "alicepw");
    let mut alice = Client::connect([same.endpoint()], Some(options))
        .await
        .unwrap();
    let value = alice.get("k1", None).await.unwrap().kvs()[0]
        .value()
        .to_vec();
    assert_eq!(value, b"after-compaction");

    // Another shard count: keys are placed again, the history is the same.
    let mut resharded = Server::ferrocd(&["--shards", "2"]).await;
    start_restored(&mut resharded, &file, "2").await;
    compare(
        &mut src,
        &mut root_client(&resharded).await,
        lease,
        compacted,
    )
    .await;
}

#[tokio::test]
async fn damaged_snapshots_and_used_data_dirs_are_refused() {
    let source = Server::ferrocd(&["--shards", SHARDS]).await;
    let mut client = source.client().await;
    for i in 0..KEYS {
        client
            .put(format!("k{i}"), "v".repeat(i * 100), None)
            .await
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("snap.db");
    let saved = etcdctl(
        &source.endpoint(),
        &["snapshot", "save", file.to_str().unwrap()],
    );
    assert!(saved.status.success(), "{}", stderr(&saved));
    let bytes = std::fs::read(&file).unwrap();
    assert_eq!(gateway_snapshot_bytes(&source.endpoint()), bytes.len());

    let damaged = |name: &str, bytes: &[u8]| -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    };
    let truncated = damaged("truncated.db", &bytes[..bytes.len() - 700]);
    let mut flipped_bytes = bytes.clone();
    flipped_bytes[bytes.len() / 2] ^= 0x10;
    let flipped = damaged("flipped.db", &flipped_bytes);
    for (file, expected) in [
        (&truncated, "snapshot file is truncated"),
        (&flipped, "snapshot file integrity check failed"),
    ] {
        let target = dir.path().join("restored");
        let output = restore(file, &target, SHARDS);
        assert!(!output.status.success());
        assert!(stderr(&output).contains(expected), "{}", stderr(&output));
        assert!(!target.exists(), "nothing is written for a refused file");
        let status = ferrocd(&["snapshot", "status", file.to_str().unwrap()]);
        assert!(stderr(&status).contains(expected), "{}", stderr(&status));
    }
    let output = restore(&file, &source.data_dir(), SHARDS);
    assert!(stderr(&output).contains("not empty"), "{}", stderr(&output));
}

/// Streams a snapshot through the JSON gateway (newline-delimited `{"result":...}` lines, as
/// etcd's gateway) and returns the decoded length of its blobs, checking `remaining_bytes`.
fn gateway_snapshot_bytes(endpoint: &str) -> usize {
    let url = format!("{endpoint}/v3/maintenance/snapshot");
    let output = Command::new("curl")
        .args(["-sS", "-X", "POST", &url, "-d", "{}"])
        .output()
        .expect("run curl");
    assert!(output.status.success(), "{}", stderr(&output));
    let text = String::from_utf8(output.stdout).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let mut total = 0;
    for (i, line) in lines.iter().enumerate() {
        let result = &line["result"];
        let blob = result["blob"].as_str().unwrap();
        let padding = blob.bytes().rev().take_while(|&b| b == b'=').count();
        let len = blob.len() / 4 * 3 - padding;
        total += len;
        let last = i + 1 == lines.len();
        // proto3 JSON omits a zero `remaining_bytes`: only the last message has none.
        assert_eq!(result.get("remaining_bytes").is_none(), last, "{result}");
        assert!(last || len == 32 * 1024, "blobs are 32 KiB but the last");
    }
    total
}

/// A writer runs txns that each put every one of `TXN_KEYS` keys (on every shard) to the
/// txn's number; a snapshot taken meanwhile must hold exactly one txn's values everywhere,
/// at the snapshot's revision.
#[tokio::test]
async fn snapshot_during_cross_shard_txns_holds_whole_txns() {
    let source = Server::ferrocd(&["--shards", SHARDS]).await;
    let mut client = source.client().await;
    let stop = Arc::new(AtomicBool::new(false));
    let put_all = |n: usize| {
        let ops = (0..TXN_KEYS).map(|k| TxnOp::put(format!("txn/{k}"), n.to_string(), None));
        Txn::new().and_then(ops.collect::<Vec<_>>())
    };
    client.txn(put_all(0)).await.unwrap();
    let writer = {
        let (mut client, stop) = (client.clone(), stop.clone());
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_millis(WRITER_TIMEOUT_MS);
            for n in 1..MAX_TXNS {
                if stop.load(Ordering::SeqCst) || Instant::now() > deadline {
                    return n;
                }
                client.txn(put_all(n)).await.unwrap();
            }
            MAX_TXNS
        })
    };
    // Let some txns land first so the snapshot is taken in the middle of the load.
    while client.get("txn/0", None).await.unwrap().kvs()[0].value() == b"0" {
        tokio::task::yield_now().await;
    }
    let mut stream = client.snapshot().await.unwrap();
    let mut bytes = Vec::new();
    let mut last_remaining = None;
    while let Some(message) = stream.message().await.unwrap() {
        bytes.extend_from_slice(message.blob());
        last_remaining = Some(message.remaining_bytes());
    }
    stop.store(true, Ordering::SeqCst);
    let txns = writer.await.unwrap();
    assert_eq!(last_remaining, Some(0), "remaining_bytes ends at 0");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("snap.db");
    std::fs::write(&file, &bytes).unwrap();

    let mut restored = Server::ferrocd(&["--shards", SHARDS]).await;
    start_restored(&mut restored, &file, SHARDS).await;
    let mut client = restored.client().await;
    let options = GetOptions::new().with_prefix();
    let response = client.get("txn/", Some(options)).await.unwrap();
    let rev = response.header().unwrap().revision();
    let kvs = response.kvs();
    assert_eq!(kvs.len(), TXN_KEYS);
    let value = kvs[0].value().to_vec();
    assert!(
        value != b"0",
        "the snapshot was taken after the first txns ({txns} ran)"
    );
    for kv in kvs {
        assert_eq!(
            kv.value(),
            value.as_slice(),
            "one txn's values on every shard"
        );
        assert_eq!(
            kv.mod_revision(),
            rev,
            "the last txn is the snapshot's revision"
        );
    }
}
