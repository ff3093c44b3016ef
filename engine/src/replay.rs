//! Rebuilding every shard's store at start-up from its checkpoint and the logs: the one
//! implementation the server's recovery and the dump tool (`ferrocd-dump db`) share.
//!
//! Each shard starts from its checkpoint (an empty store when it has none), which covers every
//! change to the shard up to its `covered_revision`. On top of it go, merged in revision order,
//! the entries of the shard's own WAL and the parts of the meta WAL's cross-shard entries
//! (changes, lease revokes) that touch the shard's keys, but only those above the covered
//! revision: the checkpoint already holds the others (a log may still hold them when its
//! segments were not released yet). Last, the newest compaction (from a checkpoint or the
//! meta log) is applied where a store is behind it; a store already compacted there is left
//! as it is, so replaying a compaction that a checkpoint holds is harmless.
//!
//! An entry that cannot apply (a revision not above the shard's latest, a delete of a key that
//! is not live) is a [`Problem`]: the caller decides whether it stops start-up (the server) or
//! is reported and skipped (the dump tool, which must show damaged data dirs).

use std::collections::HashMap;
use std::fmt;

use crate::checkpoint::CheckpointMeta;
use crate::mvcc::{Change, Effect, Store};

/// FNV-1a 64 of a key: keys are placed on shard `fnv1a(key) % shards`. Part of the on-disk
/// format (a data dir's shard count is fixed when it is created).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The shard that holds `key` among `shards`.
pub fn shard_of(key: &[u8], shards: usize) -> usize {
    assert!(shards > 0, "no shards");
    (fnv1a(key) % shards as u64) as usize
}

/// Where a replayed entry comes from, for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Entry `index` of shard `shard`'s WAL.
    Shard { shard: usize, index: u64 },
    /// Entry `index` of the meta WAL.
    Meta { index: u64 },
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Shard { shard, index } => write!(f, "shard {shard} WAL entry {index}"),
            Origin::Meta { index } => write!(f, "meta WAL entry {index}"),
        }
    }
}

/// An entry that cannot apply to its shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub origin: Origin,
    pub detail: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.origin, self.detail)
    }
}

/// The stores after replay.
pub struct Replayed {
    pub stores: Vec<Store>,
    /// The highest revision in any checkpoint or log (1 when there is none, as etcd).
    pub current_revision: i64,
    pub compacted_revision: i64,
}

struct Entry {
    main: i64,
    changes: Vec<Change>,
    origin: Origin,
}

struct ShardReplay {
    store: Store,
    covered_revision: i64,
    entries: Vec<Entry>,
}

/// Replay in progress: feed it every log entry, in any order, then [`Replay::finish`].
pub struct Replay {
    shards: Vec<ShardReplay>,
    current_revision: i64,
    compacted_revision: i64,
}

impl Replay {
    /// Starts from each shard's checkpointed store and what its checkpoint covers.
    pub fn new(checkpoints: Vec<(Store, CheckpointMeta)>) -> Replay {
        assert!(!checkpoints.is_empty(), "no shards");
        let mut replay = Replay {
            shards: Vec::with_capacity(checkpoints.len()),
            current_revision: 1,
            compacted_revision: 0,
        };
        for (store, meta) in checkpoints {
            replay.current_revision = replay
                .current_revision
                .max(meta.latest_revision)
                .max(meta.covered_revision);
            replay.compacted_revision = replay.compacted_revision.max(meta.compacted_revision);
            replay.shards.push(ShardReplay {
                store,
                covered_revision: meta.covered_revision,
                entries: Vec::new(),
            });
        }
        replay
    }

    pub fn shards(&self) -> usize {
        self.shards.len()
    }

    /// An entry of shard `shard`'s own WAL: changes at revision `main`.
    pub fn shard_entry(&mut self, shard: usize, main: i64, changes: Vec<Change>, origin: Origin) {
        self.current_revision = self.current_revision.max(main);
        let target = &mut self.shards[shard];
        if main > target.covered_revision {
            target.entries.push(Entry {
                main,
                changes,
                origin,
            });
        }
    }

    /// A meta WAL entry with changes at `main` (a cross-shard write or a lease revoke): each
    /// shard gets the changes to its keys.
    pub fn meta_entry(&mut self, main: i64, changes: Vec<Change>, origin: Origin) {
        self.current_revision = self.current_revision.max(main);
        let shards = self.shards.len();
        let mut parts: Vec<Vec<Change>> = vec![Vec::new(); shards];
        for change in changes {
            parts[shard_of(change.effect.key(), shards)].push(change);
        }
        for (target, part) in self.shards.iter_mut().zip(parts) {
            if !part.is_empty() && main > target.covered_revision {
                target.entries.push(Entry {
                    main,
                    changes: part,
                    origin,
                });
            }
        }
    }

    /// A compaction in the meta WAL.
    pub fn compaction(&mut self, rev: i64) {
        self.compacted_revision = self.compacted_revision.max(rev);
    }

    /// Applies every entry above its shard's checkpoint in revision order, then the newest
    /// compaction. An entry that cannot apply goes to `on_problem`: an error stops the replay,
    /// `Ok` skips the entry.
    pub fn finish<E>(
        self,
        mut on_problem: impl FnMut(Problem) -> Result<(), E>,
    ) -> Result<Replayed, E> {
        let compacted_revision = self.compacted_revision;
        let mut stores = Vec::with_capacity(self.shards.len());
        for mut shard in self.shards {
            // Stable: should two entries share a revision, the first fed is applied first.
            shard.entries.sort_by_key(|e| e.main);
            for entry in shard.entries {
                match why_not_applicable(&shard.store, &entry) {
                    Some(detail) => on_problem(Problem {
                        origin: entry.origin,
                        detail,
                    })?,
                    None => {
                        shard.store.apply(entry.main, &entry.changes);
                    }
                }
            }
            if compacted_revision > shard.store.compacted_revision() {
                shard.store.compact(compacted_revision);
            }
            stores.push(shard.store);
        }
        Ok(Replayed {
            stores,
            current_revision: self.current_revision,
            compacted_revision,
        })
    }
}

/// Why `Store::apply` would refuse the entry (it panics on these), if it would.
fn why_not_applicable(store: &Store, entry: &Entry) -> Option<String> {
    let floor = store.latest_revision().max(store.compacted_revision());
    if entry.main <= floor {
        return Some(format!(
            "revision {} is not above the shard's revision {floor}",
            entry.main
        ));
    }
    if entry.changes.windows(2).any(|w| w[0].sub >= w[1].sub)
        || entry.changes.first().is_some_and(|c| c.sub < 0)
    {
        return Some("sub revisions out of order".into());
    }
    let mut live_after: HashMap<&[u8], bool> = HashMap::new();
    for change in &entry.changes {
        let key = change.effect.key();
        let live = live_after
            .get(key)
            .copied()
            .unwrap_or_else(|| store.get(key, Store::LATEST).is_some());
        let now_live = matches!(change.effect, Effect::Put { .. });
        if !live && !now_live {
            return Some(format!(
                "deletes key {:?} which is not live",
                String::from_utf8_lossy(key)
            ));
        }
        live_after.insert(key, now_live);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(sub: i64, key: &[u8]) -> Change {
        Change {
            sub,
            effect: Effect::Put {
                key: key.to_vec(),
                value: b"v".to_vec(),
                lease: 0,
            },
        }
    }

    fn delete(sub: i64, key: &[u8]) -> Change {
        Change {
            sub,
            effect: Effect::Delete { key: key.to_vec() },
        }
    }

    fn empty(shards: usize) -> Vec<(Store, CheckpointMeta)> {
        (0..shards)
            .map(|_| (Store::new(), CheckpointMeta::default()))
            .collect()
    }

    #[test]
    fn entries_merge_by_revision_and_skip_what_the_checkpoint_covers() {
        let mut covered = Store::new();
        covered.apply(3, &[put(0, b"a")]);
        let meta = CheckpointMeta {
            covered_revision: 4,
            latest_revision: 3,
            ..CheckpointMeta::default()
        };
        let mut replay = Replay::new(vec![(covered, meta)]);
        let origin = Origin::Meta { index: 1 };
        replay.meta_entry(6, vec![put(0, b"b")], origin);
        replay.shard_entry(0, 3, vec![put(0, b"a")], origin); // covered: skipped
        replay.shard_entry(0, 5, vec![delete(0, b"a")], origin);
        replay.compaction(5);
        let replayed = replay.finish(Err::<(), _>).expect("every entry applies");
        let store = &replayed.stores[0];
        assert_eq!(replayed.current_revision, 6);
        assert_eq!(store.compacted_revision(), 5);
        assert!(store.get(b"a", 6).is_none());
        assert_eq!(store.get(b"b", 6).expect("b").create_revision, 6);
    }

    #[test]
    fn entries_that_cannot_apply_are_problems() {
        let mut replay = Replay::new(empty(1));
        let origin = |index| Origin::Shard { shard: 0, index };
        replay.shard_entry(0, 2, vec![put(0, b"a")], origin(1));
        replay.shard_entry(0, 2, vec![put(0, b"b")], origin(2));
        replay.shard_entry(0, 3, vec![delete(0, b"zz")], origin(3));
        let mut problems = Vec::new();
        let replayed = replay
            .finish(|p| {
                problems.push(p);
                Ok::<(), ()>(())
            })
            .expect("problems are skipped");
        assert_eq!(
            problems.iter().map(|p| p.origin).collect::<Vec<_>>(),
            vec![origin(2), origin(3)]
        );
        assert_eq!(replayed.stores[0].latest_revision(), 2);
    }

    #[test]
    fn meta_changes_split_by_placement() {
        let keys: Vec<Vec<u8>> = (0..16u8).map(|i| vec![b'k', i]).collect();
        let mut replay = Replay::new(empty(3));
        let changes = keys
            .iter()
            .enumerate()
            .map(|(i, k)| put(i as i64, k))
            .collect();
        replay.meta_entry(2, changes, Origin::Meta { index: 1 });
        let replayed = replay.finish(Err::<(), _>).expect("applies");
        for key in &keys {
            for (shard, store) in replayed.stores.iter().enumerate() {
                assert_eq!(store.get(key, 2).is_some(), shard == shard_of(key, 3));
            }
        }
    }
}
