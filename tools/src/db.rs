//! `ferrocd-dump db`: the store the server would rebuild from the data dir, and its keys.
//!
//! There is no store file yet: the server keeps its state in memory and replays the WALs at
//! start-up. This replays them the same way (`net/src/node/recovery.rs`): every entry of every
//! shard's WAL and of the meta WAL, applied in revision order, then the newest compaction.
//! Keys of different shards are disjoint and revisions are cluster-wide, so one
//! [`Store`] holding every shard's keys has the same contents as the server's per-shard
//! stores. Unlike the server, this goes on past damage: corrupt spots are skipped and entries
//! that cannot apply (a revision seen twice, a delete of an absent key) are reported and
//! skipped, so a damaged data dir can still be inspected.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use ferrocd_engine::mvcc::codec::{decode, LogPayload};
use ferrocd_engine::mvcc::{Change, Effect, Store, StoreStats};
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

/// The store rebuilt from a data dir, and what was found on the way.
pub struct Replayed {
    pub conf: Option<MemberConf>,
    pub store: Store,
    /// The highest revision in any log (1 for an empty store, as etcd and the server).
    pub current_revision: i64,
    pub compacted_revision: i64,
    pub logs: Vec<LogCounts>,
    /// Corruption, undecodable entries, entries that cannot apply: one line each.
    pub problems: Vec<String>,
    /// Torn tails (not problems: the server cuts them).
    pub torn_tails: Vec<String>,
}

/// One change entry waiting to be applied in revision order.
struct Pending {
    main: i64,
    changes: Vec<Change>,
    origin: String,
}

/// Replays every WAL of `data_dir`. `Err` on an I/O error.
pub fn replay(data_dir: &Path) -> Result<Replayed, String> {
    let conf = read_member_conf(data_dir)?;
    let mut replayed = Replayed {
        conf,
        store: Store::new(),
        current_revision: 1,
        compacted_revision: 0,
        logs: Vec::new(),
        problems: Vec::new(),
        torn_tails: Vec::new(),
    };
    let mut pending = Vec::new();
    for wal in data_dir_wals(data_dir)? {
        let counts = read_log(&wal, &mut pending, &mut replayed).map_err(|e| e.to_string())?;
        replayed.logs.push(counts);
    }
    // Stable: should two entries share a revision, the first read is applied.
    pending.sort_by_key(|p| p.main);
    for entry in pending {
        apply(&mut replayed, entry);
    }
    if replayed.compacted_revision > 0 {
        replayed.store.compact(replayed.compacted_revision);
    }
    Ok(replayed)
}

fn read_log(
    wal: &WalSource,
    pending: &mut Vec<Pending>,
    replayed: &mut Replayed,
) -> Result<LogCounts, WalError> {
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
                    replayed.torn_tails.push(line);
                } else {
                    replayed.problems.push(format!("corrupt record in {line}"));
                }
                continue;
            }
            Event::Record { record, .. } if record.kind == RecordKind::Entry => record,
            Event::Record { .. } => continue,
        };
        let origin = format!("{} entry {}", wal.dir.display(), record.index);
        counts.entries += 1;
        counts.last_index = record.index;
        match decode(&record.data) {
            Err(e) => replayed
                .problems
                .push(format!("{origin} does not decode: {e}")),
            Ok(LogPayload::Changes { main, changes }) => {
                count_changes(&mut counts, main, &changes);
                pending.push(Pending {
                    main,
                    changes,
                    origin,
                });
            }
            Ok(_) if wal.group != Some(Group::Meta) => replayed
                .problems
                .push(format!("{origin}: a meta entry outside the meta WAL")),
            Ok(LogPayload::Compact { rev }) => {
                counts.compactions += 1;
                replayed.compacted_revision = replayed.compacted_revision.max(rev);
            }
            // A revoke's deletes replay like any change; grants and checkpoints change no key.
            Ok(LogPayload::LeaseRevoke { main, changes, .. }) if main > 0 => {
                count_changes(&mut counts, main, &changes);
                pending.push(Pending {
                    main,
                    changes,
                    origin,
                });
            }
            Ok(
                LogPayload::LeaseGrant { .. }
                | LogPayload::LeaseRevoke { .. }
                | LogPayload::LeaseCheckpoint { .. },
            ) => {}
            // Auth records change no key.
            Ok(
                LogPayload::AuthEnable { .. }
                | LogPayload::AuthUserPut(_)
                | LogPayload::AuthUserDelete { .. }
                | LogPayload::AuthRolePut(_)
                | LogPayload::AuthRoleDelete { .. },
            ) => {}
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

/// Applies one entry, or records why it cannot be (instead of letting the store panic).
fn apply(replayed: &mut Replayed, entry: Pending) {
    let store = &mut replayed.store;
    if entry.main <= store.latest_revision() {
        replayed.problems.push(format!(
            "{}: revision {} is not above the revision already applied ({})",
            entry.origin,
            entry.main,
            store.latest_revision()
        ));
        return;
    }
    if let Some(key) = delete_of_absent_key(store, &entry.changes) {
        replayed.problems.push(format!(
            "{}: deletes key {} which is not live",
            entry.origin,
            quoted(key)
        ));
        return;
    }
    store.apply(entry.main, &entry.changes);
    replayed.current_revision = replayed.current_revision.max(entry.main);
}

/// The first key that `changes` deletes while it is not live (in the store or after the
/// entry's earlier changes).
fn delete_of_absent_key<'c>(store: &Store, changes: &'c [Change]) -> Option<&'c [u8]> {
    let mut live_after: HashMap<&[u8], bool> = HashMap::new();
    for change in changes {
        let key = change.effect.key();
        let live = live_after
            .get(key)
            .copied()
            .unwrap_or_else(|| store.get(key, Store::LATEST).is_some());
        match change.effect {
            Effect::Delete { .. } if !live => return Some(key),
            Effect::Delete { .. } => live_after.insert(key, false),
            Effect::Put { .. } => live_after.insert(key, true),
        };
    }
    None
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
    } = replayed.store.stats();
    let live_keys = replayed.store.range_iter(b"", b"\0", Store::LATEST).count();
    writeln!(out, "current revision {}", replayed.current_revision)?;
    writeln!(out, "compacted revision {}", replayed.compacted_revision)?;
    writeln!(out, "keys {keys} (live {live_keys})")?;
    writeln!(out, "versions {versions}")?;
    writeln!(out, "payload bytes {payload_bytes}")?;
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
    for kv in replayed.store.range_iter(b"", b"\0", Store::LATEST) {
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
