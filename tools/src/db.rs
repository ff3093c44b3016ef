//! `ferrocd-dump db`: the stores the server would rebuild from the data dir, and their keys.
//!
//! This rebuilds them exactly as the server's recovery does, with the same code
//! (`ferrocd_engine::replay`): each shard's checkpoint (`db/shard-NNN.db`), then the entries of
//! its WAL and the meta WAL above the checkpoint's covered revision, in revision order, then
//! the newest compaction (the meta checkpoint's, `db/meta.ckpt`, counts too). Unlike the server, this goes on past damage: corrupt spots are
//! skipped, a checkpoint that cannot be read counts as empty, and entries that cannot apply (a
//! revision seen twice, a delete of an absent key) are reported and skipped, so a damaged data
//! dir can still be inspected.

use std::io::Write;
use std::path::Path;

use ferrocd_engine::btree::Database;
use ferrocd_engine::checkpoint::{self, CheckpointMeta};
use ferrocd_engine::meta_checkpoint::{self, MetaCheckpoint};
use ferrocd_engine::mvcc::codec::{decode, LogPayload};
use ferrocd_engine::mvcc::{Change, Effect, KvRef, Store, StoreStats};
use ferrocd_engine::replay::{Origin, Replay};
use ferrocd_engine::wal::{RecordKind, WalError};

use crate::datadir::{data_dir_wals, read_member_conf, Group, MemberConf, WalSource};
use crate::render::quoted;
use crate::scan::{Event, Scanner};

/// Counts of one WAL.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogCounts {
    pub group: Option<Group>,
    pub entries: u64,
    pub puts: u64,
    pub deletes: u64,
    pub compactions: u64,
    /// Index of the last valid entry, 0 when there is none.
    pub last_index: u64,
    /// Highest revision of a change entry, 0 when there is none.
    pub last_revision: i64,
}

/// The stores rebuilt from a data dir, and what was found on the way.
pub struct Replayed {
    pub conf: Option<MemberConf>,
    /// One per shard.
    pub stores: Vec<Store>,
    /// What each shard's checkpoint covers (all zero without one).
    pub checkpoints: Vec<CheckpointMeta>,
    /// The meta group's checkpoint, if the data dir has one.
    pub meta_checkpoint: Option<MetaCheckpoint>,
    /// The highest revision in any checkpoint or log (1 for an empty store, as the server).
    pub current_revision: i64,
    pub compacted_revision: i64,
    pub logs: Vec<LogCounts>,
    /// Corruption, undecodable entries, entries that cannot apply: one line each.
    pub problems: Vec<String>,
    /// Torn tails (not problems: the server cuts them).
    pub torn_tails: Vec<String>,
}

/// Replays the checkpoints and every WAL of `data_dir`. `Err` on an I/O error.
pub fn replay(data_dir: &Path) -> Result<Replayed, String> {
    let conf = read_member_conf(data_dir)?;
    let wals = data_dir_wals(data_dir)?;
    let shards = conf
        .map_or_else(|| shards_of_wals(&wals), |c| c.shards)
        .max(1);
    let mut problems = Vec::new();
    let loaded: Vec<(Store, CheckpointMeta)> = (0..shards)
        .map(|shard| load_checkpoint(data_dir, shard, &mut problems))
        .collect();
    let checkpoints = loaded.iter().map(|(_, meta)| *meta).collect();
    let mut replay = Replay::new(loaded);
    let meta_checkpoint = load_meta_checkpoint(data_dir, &mut problems);
    let records = meta_checkpoint.iter().flat_map(|c| &c.records);
    for record in records {
        if let LogPayload::Compact { rev } = record {
            replay.compaction(*rev);
        }
    }
    let mut logs = Vec::new();
    let mut torn_tails = Vec::new();
    for wal in &wals {
        let mut found = Found {
            replay: &mut replay,
            problems: &mut problems,
            torn_tails: &mut torn_tails,
        };
        logs.push(read_log(wal, &mut found).map_err(|e| e.to_string())?);
    }
    let replayed = replay
        .finish(|problem| {
            problems.push(problem.to_string());
            Ok::<(), std::convert::Infallible>(())
        })
        .unwrap_or_else(|never| match never {});
    Ok(Replayed {
        conf,
        stores: replayed.stores,
        checkpoints,
        meta_checkpoint,
        current_revision: replayed.current_revision,
        compacted_revision: replayed.compacted_revision,
        logs,
        problems,
        torn_tails,
    })
}

/// Without `member.conf`: one shard per shard WAL directory (the highest number counts).
fn shards_of_wals(wals: &[WalSource]) -> usize {
    wals.iter()
        .filter_map(|w| match w.group {
            Some(Group::Shard(n)) => Some(n + 1),
            _ => None,
        })
        .max()
        .unwrap_or(1)
}

/// Shard `shard`'s checkpoint, or an empty store (a missing file is normal, an unreadable
/// one is a problem).
fn load_checkpoint(
    data_dir: &Path,
    shard: usize,
    problems: &mut Vec<String>,
) -> (Store, CheckpointMeta) {
    let path = data_dir.join("db").join(format!("shard-{shard:03}.db"));
    if !path.exists() {
        return (Store::new(), CheckpointMeta::default());
    }
    let loaded = Database::open_read_only(&path)
        .map_err(checkpoint::Error::from)
        .and_then(|db| checkpoint::load(&db.snapshot()));
    match loaded {
        Ok(loaded) => (loaded.store, loaded.meta),
        Err(e) => {
            problems.push(format!("{}: {e}", path.display()));
            (Store::new(), CheckpointMeta::default())
        }
    }
}

/// The meta checkpoint, or `None` (missing: an older or fresh data dir; unreadable: a problem).
fn load_meta_checkpoint(data_dir: &Path, problems: &mut Vec<String>) -> Option<MetaCheckpoint> {
    let path = meta_checkpoint::path_in(&data_dir.join("db"));
    meta_checkpoint::read(&path).unwrap_or_else(|e| {
        problems.push(e.to_string());
        None
    })
}

/// Writes the meta checkpoint's summary line, and one line per raised alarm.
fn print_meta_checkpoint(checkpoint: &MetaCheckpoint, out: &mut dyn Write) -> std::io::Result<()> {
    let count = |pick: fn(&LogPayload) -> usize| checkpoint.records.iter().map(pick).sum::<usize>();
    let leases = count(|r| usize::from(matches!(r, LogPayload::LeaseGrant { .. })));
    let users = count(|r| usize::from(matches!(r, LogPayload::AuthUserPut(_))));
    let roles = count(|r| usize::from(matches!(r, LogPayload::AuthRolePut(_))));
    let enabled = checkpoint
        .records
        .iter()
        .any(|r| matches!(r, LogPayload::AuthEnable { enabled: true }));
    let compacted = checkpoint.records.iter().find_map(|r| match r {
        LogPayload::Compact { rev } => Some(*rev),
        _ => None,
    });
    writeln!(
        out,
        "checkpoint meta: wal index {} leases {leases} users {users} roles {roles} auth enabled {enabled} auth revision {} compacted revision {}",
        checkpoint.wal_index,
        checkpoint.auth_revision,
        compacted.unwrap_or(0)
    )?;
    for record in &checkpoint.records {
        if let LogPayload::AlarmActivate(alarm) = record {
            writeln!(
                out,
                "alarm member {:016x} type {}",
                alarm.member_id, alarm.alarm
            )?;
        }
    }
    Ok(())
}

/// Where [`read_log`] puts what it finds.
struct Found<'a> {
    replay: &'a mut Replay,
    problems: &'a mut Vec<String>,
    torn_tails: &'a mut Vec<String>,
}

fn read_log(wal: &WalSource, found: &mut Found<'_>) -> Result<LogCounts, WalError> {
    let mut counts = LogCounts {
        group: wal.group,
        ..LogCounts::default()
    };
    for event in Scanner::open(&wal.dir, None)? {
        let record = match event? {
            Event::Damage(damage) => {
                let line = format!(
                    "{} at byte offset {}: {}",
                    damage.file.display(),
                    damage.offset,
                    damage.detail
                );
                if damage.torn {
                    found.torn_tails.push(line);
                } else {
                    found.problems.push(format!("corrupt record in {line}"));
                }
                continue;
            }
            Event::Record { record, .. } if record.kind == RecordKind::Entry => record,
            Event::Record { .. } => continue,
        };
        let label = format!("{} entry {}", wal.dir.display(), record.index);
        counts.entries += 1;
        counts.last_index = record.index;
        let payload = match decode(&record.data) {
            Ok(payload) => payload,
            Err(e) => {
                found.problems.push(format!("{label} does not decode: {e}"));
                continue;
            }
        };
        let index = record.index;
        match (wal.group, payload) {
            (Some(Group::Shard(shard)), _) if shard >= found.replay.shards() => found
                .problems
                .push(format!("{label}: shard {shard} is not in the data dir")),
            (Some(Group::Shard(shard)), LogPayload::Changes { main, changes }) => {
                count_changes(&mut counts, main, &changes);
                let origin = Origin::Shard { shard, index };
                found.replay.shard_entry(shard, main, changes, origin);
            }
            (Some(Group::Meta), LogPayload::Changes { main, changes })
            // A revoke's deletes replay like any change; grants and checkpoints change no key.
            | (Some(Group::Meta), LogPayload::LeaseRevoke { main, changes, .. })
                if main > 0 =>
            {
                count_changes(&mut counts, main, &changes);
                found
                    .replay
                    .meta_entry(main, changes, Origin::Meta { index });
            }
            (Some(Group::Meta), LogPayload::Compact { rev }) => {
                counts.compactions += 1;
                found.replay.compaction(rev);
            }
            (Some(Group::Meta), _) => {}
            (Some(Group::Shard(_)), _) => found
                .problems
                .push(format!("{label}: a meta entry outside the meta WAL")),
            (None, _) => found
                .problems
                .push(format!("{label}: a WAL outside a data dir's layout")),
        }
    }
    Ok(counts)
}

fn count_changes(counts: &mut LogCounts, main: i64, changes: &[Change]) {
    counts.last_revision = counts.last_revision.max(main);
    for change in changes {
        match change.effect {
            Effect::Put { .. } => counts.puts += 1,
            Effect::Delete { .. } => counts.deletes += 1,
        }
    }
}

/// Every live key of every shard at the latest revision, in key order.
fn live_keys(replayed: &Replayed) -> Vec<KvRef<'_>> {
    let mut kvs: Vec<KvRef<'_>> = replayed
        .stores
        .iter()
        .flat_map(|store| store.range_iter(b"", b"\0", Store::LATEST))
        .collect();
    kvs.sort_by(|a, b| a.key.cmp(b.key));
    kvs
}

/// Writes the statistics of `replayed`.
pub fn print_stats(replayed: &Replayed, out: &mut dyn Write) -> std::io::Result<()> {
    if let Some(conf) = replayed.conf {
        writeln!(
            out,
            "member_id {:016x} cluster_id {:016x} shards {}",
            conf.member_id, conf.cluster_id, conf.shards
        )?;
    }
    let StoreStats {
        keys,
        versions,
        payload_bytes,
    } = replayed
        .stores
        .iter()
        .map(Store::stats)
        .fold(StoreStats::default(), |sum, s| StoreStats {
            keys: sum.keys + s.keys,
            versions: sum.versions + s.versions,
            payload_bytes: sum.payload_bytes + s.payload_bytes,
        });
    let live_keys = live_keys(replayed).len();
    writeln!(out, "current revision {}", replayed.current_revision)?;
    writeln!(out, "compacted revision {}", replayed.compacted_revision)?;
    writeln!(out, "keys {keys} (live {live_keys})")?;
    writeln!(out, "versions {versions}")?;
    writeln!(out, "payload bytes {payload_bytes}")?;
    for (shard, checkpoint) in replayed.checkpoints.iter().enumerate() {
        writeln!(
            out,
            "checkpoint shard {shard}: covered revision {} latest revision {} compacted revision {} wal index {}",
            checkpoint.covered_revision,
            checkpoint.latest_revision,
            checkpoint.compacted_revision,
            checkpoint.wal_index
        )?;
    }
    if let Some(checkpoint) = &replayed.meta_checkpoint {
        print_meta_checkpoint(checkpoint, out)?;
    }
    for log in &replayed.logs {
        let group = match log.group {
            Some(Group::Shard(n)) => format!("shard {n}"),
            Some(Group::Meta) => "meta".to_string(),
            None => "unknown".to_string(),
        };
        writeln!(
            out,
            "wal {group}: entries {} puts {} deletes {} compactions {} last index {} last revision {}",
            log.entries, log.puts, log.deletes, log.compactions, log.last_index, log.last_revision
        )?;
    }
    Ok(())
}

/// Writes one line per live key at the latest revision, in key order:
/// `key create_revision mod_revision version value_size_bytes` (key quoted as in
/// [`crate::render`]), after a `#` header line naming the columns.
pub fn print_keys(replayed: &Replayed, out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(out, "# key create mod version value_size")?;
    for kv in live_keys(replayed) {
        writeln!(
            out,
            "{} {} {} {} {}",
            quoted(kv.key),
            kv.create_revision,
            kv.mod_revision,
            kv.version,
            kv.value.len()
        )?;
    }
    Ok(())
}
