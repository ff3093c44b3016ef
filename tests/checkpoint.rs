//! Checkpoints and WAL release across kill -9 (I5, I2): writers load the server until many
//! checkpoints were taken and WAL segments released, the process is killed at a random point
//! (a random count of acknowledged writes, with writes in flight), and after restart every
//! acknowledged write is present at its revision, the history is the same (ranges and HashKV
//! at revisions read before the kill, across a compaction), and the WAL directories hold fewer
//! segments than were written.

mod common;

use common::Server;
use etcd_client::{Client, GetOptions, Txn, TxnOp};
use rand::Rng;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// Small segments and a short checkpoint interval, so that a few thousand writes rotate and
/// release segments many times. The segment must be at least twice the request limit.
const ARGS: &[&str] = &[
    "--shards",
    "2",
    "--max-request-bytes",
    "32768",
    "--experimental-wal-segment-size-bytes",
    "131072",
    "--experimental-checkpoint-interval-ms",
    "20",
];
const ROUNDS: usize = 4;
const WRITERS: usize = 6;
/// Upper bound on each writer's requests per round; the kill comes before most are sent.
const MAX_WRITES_PER_WRITER: usize = 400;
const VALUE_BYTES: usize = 1000;
/// Keys every writer overwrites, so keys have many versions.
const HOT_KEYS: usize = 5;
/// Longest wait for the next acknowledgement before the test gives up.
const STALL_TIMEOUT_MS: u64 = 30_000;

/// An acknowledged put: the key held `value` at `rev`.
#[derive(Clone, Debug)]
struct Acked {
    key: String,
    value: String,
    rev: i64,
}

#[derive(Default)]
struct Progress {
    acked: Mutex<Vec<Acked>>,
    notify: Notify,
}

impl Progress {
    fn record(&self, mut acked: Vec<Acked>) {
        self.acked.lock().unwrap().append(&mut acked);
        self.notify.notify_one();
    }

    fn count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }
}

/// Puts (every tenth a txn over two keys, which likely spans both shards: the meta group)
/// until the server dies or the bound is reached.
async fn writer(mut client: Client, round: usize, id: usize, progress: Arc<Progress>) {
    for n in 0..MAX_WRITES_PER_WRITER {
        let value = format!("{round}/{id}/{n}/{}", "v".repeat(VALUE_BYTES));
        let key = match n % 3 {
            0 => format!("hot/{}", n % HOT_KEYS),
            _ => format!("key/{round}/{id}/{n:04}"),
        };
        let acked = if n % 10 == 9 {
            let pair = format!("pair/{round}/{id}/{n:04}");
            let txn = Txn::new().and_then(vec![
                TxnOp::put(key.clone(), value.clone(), None),
                TxnOp::put(pair.clone(), value.clone(), None),
            ]);
            match client.txn(txn).await {
                Ok(resp) => {
                    let rev = resp.header().expect("header").revision();
                    vec![
                        Acked {
                            key,
                            value: value.clone(),
                            rev,
                        },
                        Acked {
                            key: pair,
                            value,
                            rev,
                        },
                    ]
                }
                Err(_) => return, // The server was killed.
            }
        } else {
            match client.put(key.clone(), value.clone(), None).await {
                Ok(resp) => vec![Acked {
                    key,
                    value,
                    rev: resp.header().expect("header").revision(),
                }],
                Err(_) => return,
            }
        };
        progress.record(acked);
    }
}

/// What was read before the kill, to compare after the restart.
struct Seen {
    rev: i64,
    hash: u32,
    kvs: Vec<Row>,
}

/// One key of a range response, every field the history determines.
#[derive(Debug, PartialEq, Eq)]
struct Row {
    key: Vec<u8>,
    value: Vec<u8>,
    create_revision: i64,
    mod_revision: i64,
    version: i64,
}

async fn read_at(client: &mut Client, rev: i64) -> Seen {
    let hash = client.hash_kv(rev).await.expect("hash_kv").hash();
    let resp = client
        .get(
            "",
            Some(GetOptions::new().with_all_keys().with_revision(rev)),
        )
        .await
        .expect("range");
    let kvs = resp
        .kvs()
        .iter()
        .map(|kv| Row {
            key: kv.key().to_vec(),
            value: kv.value().to_vec(),
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
            version: kv.version(),
        })
        .collect();
    Seen { rev, hash, kvs }
}

/// Segment files in each WAL directory: (present, created), `created` from the highest
/// sequence number in the names (`<seq:016x>-<first_index:016x>.wal`).
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

#[tokio::test]
async fn kill9_during_checkpoints_keeps_every_acknowledged_write_and_the_history() {
    let mut server = Server::ferrocd(ARGS).await;
    let mut acked_all: Vec<Acked> = Vec::new();
    let mut seen: Vec<Seen> = Vec::new();
    let mut compacted = 0;
    let mut rng = rand::thread_rng();
    for round in 0..ROUNDS {
        let progress = Arc::new(Progress::default());
        let mut tasks = Vec::new();
        for id in 0..WRITERS {
            let client = server.client().await;
            tasks.push(tokio::spawn(writer(client, round, id, progress.clone())));
        }
        // Kill after a random number of acknowledged writes, while writes are in flight.
        let kill_after = rng.gen_range(300..WRITERS * MAX_WRITES_PER_WRITER / 2);
        let mut reader = server.client().await;
        let mut read_once = false;
        while progress.count() < kill_after {
            if !read_once && progress.count() >= kill_after / 2 {
                // History as of now, to compare after the restart.
                let rev = reader
                    .get("hot/0", None)
                    .await
                    .expect("get")
                    .header()
                    .unwrap()
                    .revision();
                if round == 1 {
                    compacted = rev / 2;
                    reader.compact(compacted, None).await.expect("compact");
                    // Hashes below or across the compaction change with it.
                    seen.clear();
                }
                seen.push(read_at(&mut reader, rev).await);
                read_once = true;
            }
            let next = progress.notify.notified();
            tokio::time::timeout(Duration::from_millis(STALL_TIMEOUT_MS), next)
                .await
                .expect("writers stalled");
        }
        server.kill9();
        for task in tasks {
            task.await.expect("writer task");
        }
        acked_all.append(&mut progress.acked.lock().unwrap());
        server.start().await;
        check(&server, &acked_all, &seen, compacted).await;
    }
    let data_dir = server.data_dir();
    for shard in 0..2 {
        let (present, created) = segments(&data_dir.join(format!("wal/shard-{shard:03}")));
        assert!(
            created >= 4 && present < created as usize,
            "shard {shard}: {present} segments left of {created} written"
        );
        assert!(data_dir.join(format!("db/shard-{shard:03}.db")).exists());
    }
    // A graceful restart (with its last checkpoint) changes nothing either.
    server.restart().await;
    check(&server, &acked_all, &seen, compacted).await;
}

/// Every acknowledged put reads back at its revision (or is superseded by a newer one when the
/// read revision is compacted), and the history read earlier is the same.
async fn check(server: &Server, acked: &[Acked], seen: &[Seen], compacted: i64) {
    let mut client = server.client().await;
    for write in acked {
        let options = GetOptions::new().with_revision(write.rev.max(compacted + 1));
        let resp = client
            .get(write.key.clone(), Some(options))
            .await
            .expect("get");
        let kv = resp
            .kvs()
            .first()
            .unwrap_or_else(|| panic!("acknowledged {write:?} is missing"));
        if write.rev > compacted {
            assert_eq!(kv.mod_revision(), write.rev, "{write:?}");
            assert_eq!(kv.value_str().unwrap(), write.value, "{write:?}");
        }
    }
    for before in seen {
        let after = read_at(&mut client, before.rev).await;
        assert_eq!(after.hash, before.hash, "HashKV at {}", before.rev);
        assert!(after.kvs == before.kvs, "range at {} changed", before.rev);
    }
}

/// Keys and value size of the defragment test: enough pages that freeing most of them shows.
const DEFRAG_KEYS: usize = 400;
const DEFRAG_VALUE_BYTES: usize = 2000;

/// Status' db size and the part of it in use.
async fn db_size(client: &mut Client) -> (i64, i64) {
    let status = client.status().await.expect("status");
    (status.db_size(), status.raft_used_db_size())
}

/// Defragment packs the checkpoint files: after most keys are deleted and their history
/// compacted away (and checkpointed, which a graceful stop guarantees), the files shrink, and
/// the data reads back the same, also after a restart.
#[tokio::test]
async fn defragment_shrinks_the_checkpoint_files() {
    let mut server = Server::ferrocd(&["--shards", "2"]).await;
    let mut client = server.client().await;
    let value = "v".repeat(DEFRAG_VALUE_BYTES);
    for i in 0..DEFRAG_KEYS {
        client
            .put(format!("k{i:04}"), value.clone(), None)
            .await
            .expect("put");
    }
    let kept: Vec<String> = (0..DEFRAG_KEYS)
        .step_by(10)
        .map(|i| format!("k{i:04}"))
        .collect();
    for i in (0..DEFRAG_KEYS).filter(|i| i % 10 != 0) {
        client
            .delete(format!("k{i:04}"), None)
            .await
            .expect("delete");
    }
    let rev = client
        .get("k", None)
        .await
        .expect("get")
        .header()
        .unwrap()
        .revision();
    client.compact(rev, None).await.expect("compact");
    server.restart().await; // a graceful stop writes the last checkpoint
    let mut client = server.client().await;
    let (before, _) = db_size(&mut client).await;
    let mut maintenance = client.maintenance_client();
    maintenance.defragment().await.expect("defragment");
    let (after, in_use) = db_size(&mut client).await;
    assert!(
        after < before / 2,
        "defragment left {after} bytes of {before} (in use {in_use})"
    );
    server.restart().await;
    let mut client = server.client().await;
    let all = client
        .get("k", Some(GetOptions::new().with_prefix()))
        .await
        .expect("get");
    let keys: Vec<String> = all
        .kvs()
        .iter()
        .map(|kv| kv.key_str().unwrap().to_string())
        .collect();
    assert_eq!(keys, kept);
    assert!(all.kvs().iter().all(|kv| kv.value() == value.as_bytes()));
}

/// The space quota: 2 MiB for this test, 100 KB values.
const QUOTA_BYTES: &str = "2097152";
const QUOTA_VALUE_BYTES: usize = 100_000;
/// Enough puts to pass the quota several times over; the loop stops at the first refusal.
const MAX_QUOTA_PUTS: usize = 100;
const NO_SPACE: &str = "etcdserver: mvcc: database space exceeded";

/// `--quota-backend-bytes` as etcd's: writes pass until the checkpoint files reach the quota,
/// then puts and lease grants are refused with etcd's error and NOSPACE is raised; reads and
/// deletes still work; after deleting, compacting and defragmenting, writes stay refused
/// until the alarm is disarmed, and then pass again.
#[tokio::test]
async fn the_space_quota_raises_nospace_until_space_is_freed_and_the_alarm_disarmed() {
    use etcd_client::{AlarmAction, AlarmOptions, AlarmType};
    let server = Server::ferrocd(&[
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
    let refusal = loop {
        assert!(accepted < MAX_QUOTA_PUTS, "the quota never refused a put");
        match client
            .put(format!("big{accepted:03}"), value.clone(), None)
            .await
        {
            Ok(_) => accepted += 1,
            Err(e) => break e.to_string(),
        }
    };
    assert!(accepted > 0, "the first put already failed: {refusal}");
    assert!(refusal.contains(NO_SPACE), "{refusal}");

    let mut maintenance = client.maintenance_client();
    let alarms = maintenance
        .alarm(AlarmAction::Get, AlarmType::None, None)
        .await
        .expect("alarm list");
    assert_eq!(alarms.alarms().len(), 1);
    assert_eq!(alarms.alarms()[0].alarm(), AlarmType::Nospace);
    let member_id = alarms.alarms()[0].member_id();

    let read = client.get("big000", None).await.expect("reads still work");
    assert_eq!(read.kvs()[0].value().len(), QUOTA_VALUE_BYTES);
    let grant = client
        .lease_grant(60, None)
        .await
        .expect_err("grant refused");
    assert!(grant.to_string().contains(NO_SPACE), "{grant}");

    let deleted = client
        .delete("big", Some(etcd_client::DeleteOptions::new().with_prefix()))
        .await
        .expect("deletes still work");
    assert_eq!(deleted.deleted(), accepted as i64);
    let rev = deleted.header().unwrap().revision();
    client.compact(rev, None).await.expect("compact");
    maintenance.defragment().await.expect("defragment");
    let still = client
        .put("small", "v", None)
        .await
        .expect_err("alarm still raised");
    assert!(still.to_string().contains(NO_SPACE), "{still}");

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
        .expect("a put after disarming");
}
