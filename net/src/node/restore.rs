//! `ferrocd snapshot restore` and `ferrocd snapshot status`: a snapshot file
//! (`ferrocd_engine::snapshot`, written by `Maintenance.Snapshot`) into a new data dir.
//!
//! The data dir is built from what start-up already reads, so recovery needs no new path:
//! each shard's history goes into its checkpoint file (one checkpoint covering the snapshot's
//! revision, compacted at its compacted revision), and the meta state goes into the meta WAL
//! as the records the live server writes (lease grants, auth roles, users, enable). The node
//! gets new cluster and member ids, as etcd's restore makes a new cluster.
//!
//! Keys are placed by hash for the restored dir's own `--shards` (default: the number of
//! CPUs, as the server's), which may differ from the source's: a snapshot holds whole key
//! histories, and a key's history lives on exactly one shard whatever the count. HashKV
//! combines shard hashes in shard order, so it matches the source only for the same count.
//!
//! Memory: the whole history is held while the checkpoint files are written (one B+tree
//! commit per shard); restore is an offline tool.

use super::recovery::{self, meta_wal_dir, open_identity, shard_db_path, Bootstrap};
use super::shard::SINGLE_VOTER_TERM;
use ferrocd_engine::checkpoint::Checkpointer;
use ferrocd_engine::mvcc::codec::{encode, LogPayload};
use ferrocd_engine::mvcc::{SavedVersion, Unsaved};
use ferrocd_engine::replay::shard_of;
use ferrocd_engine::snapshot::{retained, verify_checksum, End, Header, Item, Reader};
use ferrocd_engine::wal::{Record, Wal, WalOptions};
use glommio::{LocalExecutorBuilder, Placement};
use std::fs::{self, File};
use std::io::BufReader;
use std::path::{Path, PathBuf};

/// etcdctl's `snapshot restore` flags (with its defaults) plus the shard count.
#[derive(Clone, Debug)]
pub struct RestoreConfig {
    pub snapshot: PathBuf,
    pub data_dir: PathBuf,
    pub shards: usize,
    /// The new cluster's members, this member's name and peer URLs, and the token.
    pub bootstrap: Bootstrap,
}

/// What a snapshot file holds, as `snapshot status` shows it.
#[derive(Clone, Copy, Debug)]
pub struct SnapshotStatus {
    /// The first 4 bytes of the file's sha256 (etcdctl shows a 32-bit hash).
    pub hash: u32,
    pub revision: i64,
    pub compacted_revision: i64,
    /// Retained changes of keys (etcd counts the keys of its backend, one per revision).
    pub total_keys: u64,
    pub total_size_bytes: u64,
}

/// Verifies the file's checksum, then opens it for reading.
fn open_verified(path: &Path) -> Result<(Reader<BufReader<File>>, SnapshotStatus), String> {
    let fail = |e: &dyn std::fmt::Display| format!("snapshot {}: {e}", path.display());
    let open = || File::open(path).map_err(|e| fail(&e));
    let size_bytes = open()?.metadata().map_err(|e| fail(&e))?.len();
    let sha256 = verify_checksum(BufReader::new(open()?), size_bytes).map_err(|e| fail(&e))?;
    let hash = u32::from_be_bytes(sha256[..4].try_into().expect("4 bytes"));
    let reader = Reader::new(BufReader::new(open()?)).map_err(|e| fail(&e))?;
    let Header { revision, .. } = reader.header();
    let status = SnapshotStatus {
        hash,
        revision,
        compacted_revision: 0,
        total_keys: 0,
        total_size_bytes: size_bytes,
    };
    Ok((reader, status))
}

/// Reads the whole file (refusing a truncated or corrupt one) and tells what it holds.
pub fn status(path: &Path) -> Result<SnapshotStatus, String> {
    let (mut reader, mut status) = open_verified(path)?;
    let end = read_all(&mut reader, path, |_| {}, |_| {})?;
    status.compacted_revision = end.compacted_revision;
    status.total_keys = end.changes;
    Ok(status)
}

/// Feeds every record to `change` and `meta`; returns the end record.
fn read_all(
    reader: &mut Reader<BufReader<File>>,
    path: &Path,
    mut change: impl FnMut(SavedVersion),
    mut meta: impl FnMut(LogPayload),
) -> Result<End, String> {
    loop {
        let item = reader
            .next_item()
            .map_err(|e| format!("snapshot {}: {e}", path.display()))?;
        match item {
            Some(Item::Change(c)) => change(c),
            Some(Item::Meta(m)) => meta(m),
            Some(Item::End(end)) => return Ok(end),
            None => unreachable!("the reader stops after the end record"),
        }
    }
}

/// Builds `config.data_dir` from the snapshot; returns the snapshot's status.
pub fn restore(config: &RestoreConfig) -> Result<SnapshotStatus, String> {
    check_cluster_flags(config)?;
    let dir = &config.data_dir;
    if fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some()) {
        return Err(format!(
            "data-dir {:?} not empty or could not be read",
            dir.display().to_string()
        ));
    }
    let (status, per_shard, meta_records) = read_snapshot(&config.snapshot, config.shards)?;
    write_data_dir(config, status, per_shard, meta_records)
        .map_err(|e| format!("restoring into {}: {e}", dir.display()))?;
    Ok(status)
}

/// A key's changes placed on `shards` shards, as checkpoints take them.
pub type PerShard = Vec<Vec<SavedVersion>>;

/// Reads a snapshot file whole (checksum first, then every record): its status, the retained
/// changes placed on `shards` shards (compacted at its compacted revision) and its meta records.
pub fn read_snapshot(
    path: &Path,
    shards: usize,
) -> Result<(SnapshotStatus, PerShard, Vec<LogPayload>), String> {
    let (mut reader, mut status) = open_verified(path)?;
    // A key's changes are adjacent in the file (each source shard lists its keys in order).
    let mut per_shard: PerShard = vec![Vec::new(); shards];
    let mut meta_records = Vec::new();
    let end = read_all(
        &mut reader,
        path,
        |c| per_shard[shard_of(&c.key, shards)].push(c),
        |m| meta_records.push(m),
    )?;
    status.compacted_revision = end.compacted_revision;
    status.total_keys = end.changes;
    check_revisions(&per_shard, status).map_err(|e| format!("snapshot {}: {e}", path.display()))?;
    for versions in &mut per_shard {
        *versions = compact(std::mem::take(versions), end.compacted_revision);
    }
    Ok((status, per_shard, meta_records))
}

/// The checkpoint writer asserts what a store can hold; a file that passed its checksum but
/// breaks it (not written by ferrocd) is refused here instead.
fn check_revisions(per_shard: &[Vec<SavedVersion>], status: SnapshotStatus) -> Result<(), String> {
    let revision = status.revision;
    if revision < 1 || !(0..=revision).contains(&status.compacted_revision) {
        return Err(format!(
            "revision {revision} compacted at {} is not a valid state",
            status.compacted_revision
        ));
    }
    let outside = per_shard
        .iter()
        .flatten()
        .find(|c| c.rev.main < 1 || c.rev.main > revision || c.rev.sub < 0);
    match outside {
        Some(c) => Err(format!(
            "a change at {:?} lies outside the snapshot's revisions 1..={revision}",
            c.rev
        )),
        None => Ok(()),
    }
}

/// etcd's checks of the member flags, and a non-empty token.
fn check_cluster_flags(config: &RestoreConfig) -> Result<(), String> {
    if config.bootstrap.token.is_empty() {
        return Err("--initial-cluster-token must not be empty".into());
    }
    config.bootstrap.verify()
}

/// Drops, key by key, the changes compaction at `compacted` removes (a compaction may have
/// advanced while the snapshot was taken: `node/snapshot.rs`).
fn compact(versions: Vec<SavedVersion>, compacted: i64) -> Vec<SavedVersion> {
    let mut kept = Vec::with_capacity(versions.len());
    let mut start = 0;
    while start < versions.len() {
        let key = &versions[start].key;
        let len = versions[start..].partition_point(|v| &v.key == key);
        kept.extend_from_slice(retained(&versions[start..start + len], compacted));
        start += len;
    }
    kept
}

fn write_data_dir(
    config: &RestoreConfig,
    status: SnapshotStatus,
    per_shard: Vec<Vec<SavedVersion>>,
    meta_records: Vec<LogPayload>,
) -> Result<(), String> {
    open_identity(&config.data_dir, config.shards, &config.bootstrap)?;
    // glommio opens directories by absolute path only.
    let dir = &config
        .data_dir
        .canonicalize()
        .map_err(|e| format!("{}: {e}", config.data_dir.display()))?;
    write_shards(dir, status, per_shard)?;
    write_meta_log(&meta_wal_dir(dir), meta_records)?;
    recovery::sync_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))
}

/// Writes each shard's checkpoint file in `dir` (a data dir): the shard's changes, covering the
/// snapshot's revision, compacted at its compacted revision; files are synced by the writer.
pub fn write_shards(dir: &Path, status: SnapshotStatus, per_shard: PerShard) -> Result<(), String> {
    let db_dir = shard_db_path(dir, 0);
    let db_dir = db_dir.parent().expect("a shard file is in the db dir");
    fs::create_dir_all(db_dir).map_err(|e| format!("cannot create {}: {e}", db_dir.display()))?;
    for (shard, versions) in per_shard.into_iter().enumerate() {
        let path = shard_db_path(dir, shard);
        let (mut checkpointer, _) =
            Checkpointer::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        // Every shard is at the snapshot's revision, so the counter resumes there.
        let unsaved = Unsaved {
            versions,
            dropped: Vec::new(),
            latest_revision: status.revision,
            compacted_revision: status.compacted_revision,
        };
        checkpointer
            .write(&unsaved, status.revision, 0)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    recovery::sync_dir(db_dir).map_err(|e| format!("{}: {e}", db_dir.display()))
}

/// Appends the meta records to a new meta WAL, as a single member's entries.
fn write_meta_log(wal_dir: &Path, records: Vec<LogPayload>) -> Result<(), String> {
    let records: Vec<Record> = records
        .iter()
        .zip(1..)
        .map(|(payload, index)| Record::entry(SINGLE_VOTER_TERM, index, encode(payload)))
        .collect();
    write_wal(wal_dir, records)
}

/// Writes `records` to a new WAL in `wal_dir`, durably (the WAL writer runs on a glommio
/// executor, started here for the call).
pub fn write_wal(wal_dir: &Path, records: Vec<Record>) -> Result<(), String> {
    let wal_dir = wal_dir.to_path_buf();
    LocalExecutorBuilder::new(Placement::Unbound)
        .name("ferrocd-restore")
        .spawn(move || async move {
            let fail = |e: &dyn std::fmt::Display| format!("{}: {e}", wal_dir.display());
            let (wal, _) = Wal::open(&wal_dir, WalOptions::default())
                .await
                .map_err(|e| fail(&e))?;
            wal.append(&records).await.map_err(|e| fail(&e))?;
            wal.close().await.map_err(|e| fail(&e))
        })
        .map_err(|e| format!("cannot start an executor: {e}"))?
        .join()
        .map_err(|e| format!("executor failed: {e}"))?
}
