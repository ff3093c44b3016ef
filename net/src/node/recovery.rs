//! The data directory and start-up recovery.
//!
//! Layout of `--data-dir`:
//! ```text
//! member.conf          format, shard count, cluster id, member id (written once, atomically)
//! db/shard-000.db ...  one checkpoint file (B+tree) per shard: its MVCC history up to the
//!                      checkpoint's covered revision, and the WAL index it covers
//! wal/shard-000/ ...   one WAL per shard: entries for writes confined to that shard; segments
//!                      a checkpoint covers are released
//! db/meta.ckpt         the meta group's checkpoint: leases, auth, compaction, alarms as of a
//!                      meta WAL index (`engine::meta_checkpoint`; absent until the first)
//! wal/meta/            the meta group's WAL: cross-shard writes, compactions, leases, auth,
//!                      alarms; segments released under `meta_checkpoint.rs`'s rule
//! ```
//! Recovery loads each shard's checkpoint, then replays (`engine::replay`) the shard's own WAL
//! entries merged by revision with the meta entries that touch it, each only above that
//! shard's covered revision, then applies the newest compaction where a store is behind it.
//! The meta state (lease table, auth, compaction, alarms) is the meta checkpoint's plus the
//! non-KV effects of the meta entries above its index; without a checkpoint file (an old data
//! dir, or one a restore wrote as meta log records) the whole meta log. A torn tail is cut by
//! the WAL reader; any other corruption stops start-up with the file and offset.

use super::meta_checkpoint::{kv_changes, note_touched, LoggedLease, MetaState};
use crate::lease::{ttl, LeaseConfig, Leases};
use ferrocd_engine::checkpoint::Checkpointer;
use ferrocd_engine::meta_checkpoint;
use ferrocd_engine::mvcc::codec::{decode, LogPayload};
use ferrocd_engine::mvcc::Store;
use ferrocd_engine::replay::{Origin, Replay};
use ferrocd_engine::wal::{read_dir, RecordKind, Recovered as WalRecovered};
use ferrocd_raft::storage::{EntryKind, SnapshotMeta};
use ferrocd_raft::wal_store::committed_entries;
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

const CONF_FILE: &str = "member.conf";
const DB_DIR: &str = "db";
const FORMAT_VERSION: u32 = 1;

/// Identity recorded in the data dir when it is created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    pub shards: usize,
    pub cluster_id: u64,
    pub member_id: u64,
}

pub fn shard_wal_dir(data_dir: &Path, shard: usize) -> PathBuf {
    data_dir.join("wal").join(format!("shard-{shard:03}"))
}

/// The meta group's checkpoint file (`engine::meta_checkpoint`).
pub fn meta_checkpoint_path(data_dir: &Path) -> PathBuf {
    meta_checkpoint::path_in(&data_dir.join(DB_DIR))
}

/// Shard `shard`'s checkpoint file (`engine::checkpoint`).
pub fn shard_db_path(data_dir: &Path, shard: usize) -> PathBuf {
    data_dir.join(DB_DIR).join(format!("shard-{shard:03}.db"))
}

pub fn meta_wal_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("wal").join("meta")
}

/// Opens the identity of an existing data dir, or creates one for `shards` shards.
/// A data dir created with another shard count is refused: keys are placed by shard.
pub fn open_identity(data_dir: &Path, shards: usize, name: &str) -> Result<Identity, String> {
    let conf = data_dir.join(CONF_FILE);
    if conf.exists() {
        let identity = read_identity(&conf)?;
        if identity.shards != shards {
            return Err(format!(
                "data dir {} was created with --shards {}; it cannot be opened with --shards {shards}",
                data_dir.display(),
                identity.shards
            ));
        }
        return Ok(identity);
    }
    fs::create_dir_all(data_dir)
        .map_err(|e| format!("cannot create data dir {}: {e}", data_dir.display()))?;
    let identity = Identity {
        shards,
        cluster_id: fresh_id(name, 1),
        member_id: fresh_id(name, 2),
    };
    write_identity(data_dir, &identity)
        .map_err(|e| format!("cannot write {}: {e}", conf.display()))?;
    Ok(identity)
}

fn read_identity(conf: &Path) -> Result<Identity, String> {
    let text =
        fs::read_to_string(conf).map_err(|e| format!("cannot read {}: {e}", conf.display()))?;
    let field = |name: &str| -> Result<&str, String> {
        text.lines()
            .find_map(|line| {
                line.strip_prefix(name)
                    .and_then(|rest| rest.strip_prefix('='))
            })
            .ok_or_else(|| format!("{}: missing `{name}`", conf.display()))
    };
    let bad = |name: &str| format!("{}: malformed `{name}`", conf.display());
    let format: u32 = field("format")?.parse().map_err(|_| bad("format"))?;
    if format != FORMAT_VERSION {
        return Err(format!("{}: unsupported format {format}", conf.display()));
    }
    Ok(Identity {
        shards: field("shards")?.parse().map_err(|_| bad("shards"))?,
        cluster_id: u64::from_str_radix(field("cluster_id")?, 16).map_err(|_| bad("cluster_id"))?,
        member_id: u64::from_str_radix(field("member_id")?, 16).map_err(|_| bad("member_id"))?,
    })
}

/// Writes the identity to a temporary file, syncs it, renames it into place, syncs the dir.
fn write_identity(data_dir: &Path, id: &Identity) -> std::io::Result<()> {
    let tmp = data_dir.join(format!("{CONF_FILE}.tmp"));
    let mut file = fs::File::create(&tmp)?;
    writeln!(file, "format={FORMAT_VERSION}")?;
    writeln!(file, "shards={}", id.shards)?;
    writeln!(file, "cluster_id={:016x}", id.cluster_id)?;
    writeln!(file, "member_id={:016x}", id.member_id)?;
    file.sync_all()?;
    fs::rename(&tmp, data_dir.join(CONF_FILE))?;
    fs::File::open(data_dir)?.sync_all()
}

/// A non-zero id that differs between data dirs (time, process and name mixed by FNV-1a).
fn fresh_id(name: &str, salt: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let seed = format!("{name}/{nanos}/{}/{salt}", std::process::id());
    super::fnv1a(seed.as_bytes()).max(1)
}

/// The state rebuilt from the checkpoints and the logs.
pub struct Recovered {
    pub stores: Vec<Store>,
    /// Each shard's checkpoint writer, positioned after what it loaded.
    pub checkpointers: Vec<Checkpointer>,
    /// The highest revision in any checkpoint or log (1 for an empty store, as etcd).
    pub current_rev: i64,
    pub compacted_rev: i64,
    /// The next entry index of each shard's WAL, then the meta WAL's.
    pub next_index: Vec<u64>,
    /// What was read from each shard's WAL, then the meta WAL's: the writers open with it
    /// instead of reading the logs again.
    pub wals: Vec<WalRecovered>,
    /// Live leases with their attached keys.
    pub leases: Leases,
    /// The meta log's non-KV state: leases as logged, auth, compaction, alarms.
    pub meta_state: MetaState,
    /// Per shard: the highest revision of a meta entry still in the meta log touching it.
    pub meta_touched: Vec<i64>,
    /// The meta WAL index the meta checkpoint covers (0: no checkpoint).
    pub meta_checkpoint_index: u64,
}

/// One log's entries with their indexes.
struct LogContents {
    payloads: Vec<(u64, LogPayload)>,
    next_index: u64,
    wal: WalRecovered,
}

/// Reads a log's records, cutting a torn tail (logged).
fn read_records(dir: &Path) -> Result<WalRecovered, String> {
    fs::create_dir_all(dir).map_err(|e| format!("cannot create WAL dir {}: {e}", dir.display()))?;
    let recovered = read_dir(dir).map_err(|e| format!("recovering WAL {}: {e}", dir.display()))?;
    if let Some(torn) = &recovered.torn_tail {
        crate::warn!(
            "cut a torn WAL tail",
            file = torn.file.display().to_string(),
            offset = torn.offset,
            detail = torn.detail.as_str(),
        );
    }
    Ok(recovered)
}

/// A log written by a single member: every entry is committed.
fn read_log(dir: &Path) -> Result<LogContents, String> {
    let wal = read_records(dir)?;
    let entries = wal.records.iter().filter(|r| r.kind == RecordKind::Entry);
    let payloads = decode_entries(dir, entries.map(|r| (r.index, r.data.as_slice())))?;
    let next_index = payloads.last().map_or(1, |(index, _)| index + 1);
    Ok(LogContents {
        payloads,
        next_index,
        wal,
    })
}

/// A Raft log (a member of a cluster): the entries committed as of its last hard state, as
/// `WalLogStore` resolves them (a later leader's entry replaces an earlier one at its index).
/// `initial` is the group's bootstrap point (see `ferrocd_raft::wal_store`).
fn read_raft_log(dir: &Path, initial: SnapshotMeta) -> Result<LogContents, String> {
    let wal = read_records(dir)?;
    let (base, entries) = committed_entries(&wal.records, initial)
        .map_err(|e| format!("recovering WAL {}: {e}", dir.display()))?;
    let next_index = entries.last().map_or(base.index, |e| e.index) + 1;
    // A new leader's empty entry and membership changes carry no payload of ours.
    let ours = entries
        .iter()
        .filter(|e| e.kind == EntryKind::Normal && !e.data.is_empty());
    let payloads = decode_entries(dir, ours.map(|e| (e.index, e.data.as_slice())))?;
    Ok(LogContents {
        payloads,
        next_index,
        wal,
    })
}

fn decode_entries<'a>(
    dir: &Path,
    entries: impl Iterator<Item = (u64, &'a [u8])>,
) -> Result<Vec<(u64, LogPayload)>, String> {
    entries
        .map(|(index, data)| {
            let payload = decode(data).map_err(|e| {
                format!("WAL {}: entry {index} does not decode: {e}", dir.display())
            })?;
            Ok((index, payload))
        })
        .collect()
}

/// Opens (creating when missing) every shard's checkpoint file and loads its store.
fn open_checkpoints(data_dir: &Path, shards: usize) -> Result<Vec<(Checkpointer, Store)>, String> {
    let db_dir = data_dir.join(DB_DIR);
    if !db_dir.exists() {
        fs::create_dir_all(&db_dir)
            .and_then(|()| fs::File::open(data_dir)?.sync_all())
            .map_err(|e| format!("cannot create {}: {e}", db_dir.display()))?;
    }
    (0..shards)
        .map(|shard| {
            let path = shard_db_path(data_dir, shard);
            Checkpointer::open(&path)
                .map_err(|e| format!("cannot load checkpoint {}: {e}", path.display()))
        })
        .collect()
}

/// Recovers a data dir. `raft_initial` is `Some` for a member of a cluster: the meta log is
/// then a Raft log starting at that bootstrap point, of which only committed entries apply.
pub fn recover(
    data_dir: &Path,
    shards: usize,
    lease_config: LeaseConfig,
    raft_initial: Option<SnapshotMeta>,
) -> Result<Recovered, String> {
    let (checkpointers, stores): (Vec<Checkpointer>, Vec<Store>) =
        open_checkpoints(data_dir, shards)?.into_iter().unzip();
    let metas = checkpointers.iter().map(Checkpointer::meta);
    let mut replay = Replay::new(stores.into_iter().zip(metas).collect());
    let meta = match raft_initial {
        None => read_log(&meta_wal_dir(data_dir))?,
        Some(initial) => read_raft_log(&meta_wal_dir(data_dir), initial)?,
    };
    let mut next_index = Vec::with_capacity(shards + 1);
    let mut wals = Vec::with_capacity(shards + 1);
    for (shard, checkpointer) in checkpointers.iter().enumerate() {
        let log = read_log(&shard_wal_dir(data_dir, shard))?;
        wals.push(log.wal);
        for (index, payload) in log.payloads {
            match payload {
                LogPayload::Changes { main, changes } => {
                    replay.shard_entry(shard, main, changes, Origin::Shard { shard, index })
                }
                other => {
                    return Err(format!(
                        "shard {shard} WAL holds a meta entry: {}",
                        payload_kind(&other)
                    ))
                }
            }
        }
        // Released segments may have taken every entry: the checkpoint knows the last index.
        next_index.push(log.next_index.max(checkpointer.meta().wal_index + 1));
    }
    let checkpoint_path = meta_checkpoint_path(data_dir);
    let (mut meta_state, checkpoint_index) = match meta_checkpoint::read(&checkpoint_path) {
        Ok(Some(checkpoint)) => (
            MetaState::from_checkpoint(&checkpoint)
                .map_err(|e| format!("{}: {e}", checkpoint_path.display()))?,
            checkpoint.wal_index,
        ),
        Ok(None) => (MetaState::default(), 0),
        Err(e) => return Err(format!("cannot load meta checkpoint: {e}")),
    };
    replay.compaction(meta_state.compacted_rev);
    // Released segments may have taken every entry: the checkpoint knows the last index.
    next_index.push(meta.next_index.max(checkpoint_index + 1));
    wals.push(meta.wal);
    let mut meta_touched = vec![0; shards];
    for (index, payload) in meta.payloads {
        // Non-KV effects from above the checkpoint only: it holds those of the others.
        if index > checkpoint_index {
            meta_state
                .apply(&payload)
                .map_err(|e| format!("meta WAL entry {index}: {e}"))?;
        }
        // KV changes from every entry still in the log: the replay keeps those above each
        // shard's covered revision (the segment was not released, so a shard may lack them).
        if let Some((main, changes)) = kv_changes(&payload) {
            note_touched(&mut meta_touched, main, changes);
        }
        match payload {
            LogPayload::Changes { main, changes }
            | LogPayload::LeaseRevoke { main, changes, .. }
                if main > 0 =>
            {
                replay.meta_entry(main, changes, Origin::Meta { index })
            }
            LogPayload::Compact { rev } => replay.compaction(rev),
            _ => {}
        }
    }
    let replayed = replay.finish(|problem| Err(format!("cannot replay {problem}")))?;
    let leases = rebuild_leases(&meta_state.leases, &replayed.stores, lease_config);
    Ok(Recovered {
        stores: replayed.stores,
        checkpointers,
        current_rev: replayed.current_revision,
        compacted_rev: replayed.compacted_revision,
        next_index,
        wals,
        leases,
        meta_state,
        meta_touched,
        meta_checkpoint_index: checkpoint_index,
    })
}

fn payload_kind(payload: &LogPayload) -> &'static str {
    match payload {
        LogPayload::Changes { .. } => "changes",
        LogPayload::Compact { .. } => "compaction",
        LogPayload::LeaseGrant { .. } => "lease grant",
        LogPayload::LeaseRevoke { .. } => "lease revoke",
        LogPayload::LeaseCheckpoint { .. } => "lease checkpoint",
        LogPayload::AuthEnable { .. }
        | LogPayload::AuthUserPut(_)
        | LogPayload::AuthUserDelete { .. }
        | LogPayload::AuthRolePut(_)
        | LogPayload::AuthRoleDelete { .. } => "auth change",
        LogPayload::AlarmActivate(_) | LogPayload::AlarmDeactivate(_) => "alarm",
    }
}

/// The lease table after a restart: each lease gets its checkpointed remaining TTL, or its
/// full TTL, from now (so a restart never shortens a lease), and the live keys naming it.
fn rebuild_leases(
    logged: &BTreeMap<i64, LoggedLease>,
    stores: &[Store],
    config: LeaseConfig,
) -> Leases {
    let leases = Leases::new(config);
    let now = std::time::Instant::now();
    for (&id, lease) in logged {
        let (remaining, checkpointed) = match lease.remaining_ms {
            0 => (ttl(lease.ttl_s), false),
            ms => (std::time::Duration::from_millis(ms as u64), true),
        };
        leases.insert(id, lease.ttl_s, remaining, checkpointed, now);
    }
    for store in stores {
        for kv in store
            .range_iter(b"", b"\0", Store::LATEST)
            .filter(|kv| kv.lease != 0)
        {
            // Cannot happen with logs this server wrote (a revoke deletes its keys in the
            // same entry); keep the key rather than refuse to start.
            if !leases.attach(kv.key, kv.lease) {
                crate::warn!(
                    "a key names a lease which does not exist",
                    key = String::from_utf8_lossy(kv.key),
                    lease_id = format!("{:x}", kv.lease),
                );
            }
        }
    }
    leases
}
