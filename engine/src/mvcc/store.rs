//! The per-shard multi-version key-value store.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;

use super::history::{HistoryChange, KeyHistory};
use super::{Change, Effect, KeyChange, KeyValue, KvRef, Revision, SavedState, SavedVersion};

/// The answer to [`Store::range`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeResult {
    /// Visible keys in ascending key order, at most `limit` of them when
    /// `limit > 0`.
    pub kvs: Vec<KeyValue>,
    /// Number of visible keys in the range, ignoring `limit`.
    pub count: i64,
}

/// The answer to [`Store::changes`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Changes in revision order, and in `sub` order within a revision.
    pub changes: Vec<KeyChange>,
    /// Every change of the range with `main` in `[from, complete_upto]` is in
    /// `changes`, none above it.
    pub complete_upto: i64,
}

/// Size of what the store holds, for quota checks and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Keys with at least one retained change (live or not).
    pub keys: usize,
    /// Retained changes, tombstones included.
    pub versions: usize,
    /// Key bytes (once per key) plus value bytes (once per version).
    pub payload_bytes: u64,
}

/// What [`Store::take_unsaved`] hands to a checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Unsaved {
    /// Changes applied since the previous take, up to its bound, that are still
    /// retained, in revision order.
    pub versions: Vec<SavedVersion>,
    /// Key and revision of every change compaction dropped since the previous
    /// take (some may never have been saved).
    pub dropped: Vec<(Vec<u8>, Revision)>,
    /// The store's latest revision as of the bound: the highest revision applied
    /// at or below it.
    pub latest_revision: i64,
    pub compacted_revision: i64,
}

/// What [`Store::export`] hands to a snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Exported {
    pub versions: Vec<SavedVersion>,
    /// The last key visited when the batch stopped early: the next batch starts after it.
    pub next: Option<Vec<u8>>,
    /// The compaction the batch reflects.
    pub compacted_revision: i64,
}

/// Changes no checkpoint has taken yet.
#[derive(Default)]
struct UnsavedLog {
    /// Every applied change, in revision order.
    applied: VecDeque<(Revision, Box<[u8]>)>,
    /// Changes compaction dropped.
    dropped: Vec<(Box<[u8]>, Revision)>,
    /// The highest revision applied at or below the previous take's bound.
    saved_latest: i64,
}

/// The multi-version state of one shard. See the module documentation.
#[derive(Default)]
pub struct Store {
    keys: BTreeMap<Box<[u8]>, KeyHistory>,
    latest_revision: i64,
    compacted_revision: i64,
    /// Where the pending compaction (at `compacted_revision`) resumes: the
    /// first key `>=` this one. `None` when no compaction is pending.
    compact_cursor: Option<Box<[u8]>>,
    stats: StoreStats,
    unsaved: UnsavedLog,
}

impl Store {
    /// Pass as the read revision to read the newest state. A shard's
    /// `latest_revision` may lag the cluster's revision (it only counts changes
    /// to this shard) and may even be below a cluster-wide compaction.
    pub const LATEST: i64 = i64::MAX;

    pub fn new() -> Self {
        Self::default()
    }

    /// The highest `main` revision applied (0 when nothing was).
    pub fn latest_revision(&self) -> i64 {
        self.latest_revision
    }

    /// Reads below this revision are no longer possible (0 when never compacted).
    pub fn compacted_revision(&self) -> i64 {
        self.compacted_revision
    }

    /// Whether a compaction has been started and not finished.
    pub fn is_compacting(&self) -> bool {
        self.compact_cursor.is_some()
    }

    pub fn stats(&self) -> StoreStats {
        self.stats
    }

    /// Applies the changes of one request at revision `main`, in order, and
    /// returns for each change the key as it was just before it (etcd's
    /// `prev_kv`): `None` for a put that creates the key.
    ///
    /// Panics unless `main` is above every revision applied or compacted, the
    /// subs are non-negative and strictly increasing, and every deleted key is
    /// live. An empty `changes` only advances `latest_revision`.
    pub fn apply(&mut self, main: i64, changes: &[Change]) -> Vec<Option<KeyValue>> {
        assert!(
            main > self.latest_revision && main > self.compacted_revision,
            "apply at {main}: latest revision {}, compacted revision {}",
            self.latest_revision,
            self.compacted_revision
        );
        let mut prev_kvs = Vec::with_capacity(changes.len());
        let mut previous_sub = -1;
        for change in changes {
            assert!(
                change.sub > previous_sub,
                "apply at {main}: sub {} after sub {previous_sub}",
                change.sub
            );
            previous_sub = change.sub;
            let rev = Revision {
                main,
                sub: change.sub,
            };
            prev_kvs.push(self.apply_effect(rev, &change.effect));
            self.unsaved
                .applied
                .push_back((rev, change.effect.key().into()));
        }
        self.latest_revision = main;
        prev_kvs
    }

    fn apply_effect(&mut self, rev: Revision, effect: &Effect) -> Option<KeyValue> {
        match effect {
            Effect::Put { key, value, lease } => {
                let history = self.history_for_put(key);
                let prev = history.latest(key).map(|kv| kv.to_key_value());
                history.put(rev, value, *lease);
                self.stats.payload_bytes += value.len() as u64;
                self.stats.versions += 1;
                prev
            }
            Effect::Delete { key } => {
                let history = self
                    .keys
                    .get_mut(key.as_slice())
                    .unwrap_or_else(|| panic!("delete at {rev:?} of an absent key"));
                let prev = history.latest(key).map(|kv| kv.to_key_value());
                // Asserts that the key is live.
                history.delete(rev);
                self.stats.versions += 1;
                prev
            }
        }
    }

    /// The history of `key`, created (and accounted) when the key is new.
    fn history_for_put(&mut self, key: &[u8]) -> &mut KeyHistory {
        // Look up before inserting so that a put to an existing key does not
        // allocate an owned copy of the key.
        if !self.keys.contains_key(key) {
            self.stats.keys += 1;
            self.stats.payload_bytes += key.len() as u64;
            self.keys.insert(key.into(), KeyHistory::default());
        }
        self.keys.get_mut(key).expect("inserted above")
    }

    /// The key as visible at `rev`.
    pub fn get(&self, key: &[u8], rev: i64) -> Option<KeyValue> {
        self.range_iter(key, &[], rev)
            .next()
            .map(|kv| kv.to_key_value())
    }

    /// The keys visible at `rev` in the range given etcd's way: `range_end`
    /// empty is the single key `key`, `b"\0"` is every key `>= key`, otherwise
    /// `[key, range_end)`. `limit == 0` means no limit.
    pub fn range(&self, key: &[u8], range_end: &[u8], rev: i64, limit: usize) -> RangeResult {
        let mut result = RangeResult::default();
        for kv in self.range_iter(key, range_end, rev) {
            result.count += 1;
            if limit == 0 || result.kvs.len() < limit {
                result.kvs.push(kv.to_key_value());
            }
        }
        result
    }

    /// Borrowed views of the keys visible at `rev` in the range (as in
    /// [`Store::range`]), ascending; `.rev()` gives descending order. Panics if
    /// `rev` is below the compacted revision.
    pub fn range_iter<'a>(
        &'a self,
        key: &[u8],
        range_end: &[u8],
        rev: i64,
    ) -> impl DoubleEndedIterator<Item = KvRef<'a>> + 'a {
        assert!(
            rev >= self.compacted_revision,
            "read at {rev} below compacted revision {}",
            self.compacted_revision
        );
        // The map's range iterator does not borrow the bounds, so the result
        // outlives `key` and `range_end`.
        let keys = key_bounds(key, range_end).map(|bounds| self.keys.range::<[u8], _>(bounds));
        keys.into_iter()
            .flatten()
            .filter_map(move |(key, history)| history.visible_at(key, rev))
    }

    /// The changes to keys in the range (given as in [`Store::range`]) with
    /// `main` in `[from, to]`, limited to the oldest `max_revs` revisions that
    /// have any: a revision is never split, and `complete_upto` says how far the
    /// answer goes. Each change carries the key's previous state (etcd's
    /// `prev_kv`). Cost: one pass over the range's keys, memory for at most
    /// `max_revs` revisions of changes. Panics if `from` is below the compacted
    /// revision (its changes may be gone) or `max_revs` is 0.
    pub fn changes(
        &self,
        key: &[u8],
        range_end: &[u8],
        from: i64,
        to: i64,
        max_revs: usize,
    ) -> Changes {
        assert!(max_revs > 0, "changes of zero revisions");
        assert!(
            from >= self.compacted_revision,
            "changes from {from} below compacted revision {}",
            self.compacted_revision
        );
        let mut by_rev: BTreeMap<i64, Vec<KeyChange>> = BTreeMap::new();
        // The smallest revision left out: everything below it is collected.
        let mut cut = to.saturating_add(1);
        let keys = key_bounds(key, range_end).map(|bounds| self.keys.range::<[u8], _>(bounds));
        for (key, history) in keys.into_iter().flatten() {
            for change in history.changes_between(key, from, to) {
                let main = change.rev.main;
                if main >= cut {
                    break; // This key's later changes are beyond the cut too.
                }
                by_rev
                    .entry(main)
                    .or_default()
                    .push(key_change(key, change));
                if by_rev.len() > max_revs {
                    let (dropped, _) = by_rev.pop_last().expect("more than max_revs entries");
                    cut = dropped;
                }
            }
        }
        let mut changes: Vec<KeyChange> = by_rev.into_values().flatten().collect();
        // Keys were visited in key order; within a revision, etcd orders by sub.
        changes.sort_by_key(|c| c.rev);
        Changes {
            changes,
            complete_upto: cut - 1,
        }
    }

    /// Compacts at `rev` to completion. See [`Store::compact_step`].
    pub fn compact(&mut self, rev: i64) {
        const KEYS_PER_STEP: usize = 1024;
        while !self.compact_step(rev, KEYS_PER_STEP) {}
    }

    /// Advances compaction at `rev` by at most `max_keys` keys; returns whether
    /// it is complete. The first call with a `rev` above the compacted revision
    /// starts it (reads below `rev` are refused from then on); later calls with
    /// the same `rev` continue it. A newer compaction supersedes a pending one,
    /// since compacting at the higher revision removes everything the lower
    /// would. Changes applied between steps are above `rev` and not affected.
    ///
    /// Panics if `rev` is below the compacted revision or `max_keys` is 0.
    pub fn compact_step(&mut self, rev: i64, max_keys: usize) -> bool {
        assert!(max_keys > 0, "compaction step of zero keys");
        assert!(
            rev >= self.compacted_revision,
            "compaction at {rev} below compacted revision {}",
            self.compacted_revision
        );
        if rev > self.compacted_revision {
            self.compacted_revision = rev;
            self.compact_cursor = Some(Box::default());
        }
        if let Some(start) = self.compact_cursor.take() {
            self.compact_cursor = self.compact_keys(&start, max_keys);
        }
        self.compact_cursor.is_none()
    }

    /// Compacts up to `max_keys` keys from `start` on; returns the key to resume
    /// at, if any are left.
    fn compact_keys(&mut self, start: &[u8], max_keys: usize) -> Option<Box<[u8]>> {
        let rev = self.compacted_revision;
        let mut emptied = Vec::new();
        let mut resume = None;
        let mut dropped = Vec::new();
        let bounds = (Bound::Included(start), Bound::Unbounded);
        for (done, (key, history)) in self.keys.range_mut::<[u8], _>(bounds).enumerate() {
            if done == max_keys {
                resume = Some(key.clone());
                break;
            }
            let removed = history.compact(rev, &mut dropped);
            self.unsaved
                .dropped
                .extend(dropped.drain(..).map(|r| (key.clone(), r)));
            self.stats.versions -= removed.versions;
            self.stats.payload_bytes -= removed.value_bytes;
            if history.is_empty() {
                emptied.push(key.clone());
            }
        }
        for key in emptied {
            self.keys.remove(&key);
            self.stats.keys -= 1;
            self.stats.payload_bytes -= key.len() as u64;
        }
        resume
    }

    /// The change at exactly `rev` to `key` as a checkpoint (or a read buffer) keeps it;
    /// `None` if compaction dropped it.
    pub fn saved_version(&self, key: &[u8], rev: Revision) -> Option<SavedVersion> {
        saved_in(&self.keys, key, rev)
    }

    /// The changes no checkpoint has taken yet, in revision order (after a restart: the
    /// replayed tail above the checkpoint), without taking them, for a read buffer over that
    /// checkpoint. A change compaction dropped comes as a tombstone: for reads at or above the
    /// compacted revision it hides exactly what the drop hid (older versions of the key, some
    /// possibly still in the checkpoint), and every retained version of the key at or below
    /// such a read is newer than it.
    pub fn unsaved_versions(&self) -> impl Iterator<Item = SavedVersion> + '_ {
        self.unsaved.applied.iter().map(|(rev, key)| {
            self.saved_version(key, *rev)
                .unwrap_or_else(|| SavedVersion {
                    key: key.to_vec(),
                    rev: *rev,
                    state: SavedState::Tombstone,
                })
        })
    }

    /// Number of changes (applied or dropped by compaction) that no checkpoint has
    /// taken yet.
    pub fn unsaved_changes(&self) -> usize {
        self.unsaved.applied.len() + self.unsaved.dropped.len()
    }

    /// Hands over what a checkpoint must write: the changes applied with
    /// `main <= upto` since the previous take (the caller knows them durable),
    /// every change compaction dropped since then, and the revisions to record.
    /// Changes above `upto` stay for a later take. A change applied and then
    /// dropped before it was taken is in `dropped` only.
    ///
    /// Panics while a compaction is in progress: a checkpoint must record a
    /// compacted revision together with every drop it implies.
    pub fn take_unsaved(&mut self, upto: i64) -> Unsaved {
        assert!(!self.is_compacting(), "checkpoint during a compaction");
        let log = &mut self.unsaved;
        let mut versions = Vec::new();
        while log.applied.front().is_some_and(|(rev, _)| rev.main <= upto) {
            let (rev, key) = log.applied.pop_front().expect("front exists");
            log.saved_latest = log.saved_latest.max(rev.main);
            versions.extend(saved_in(&self.keys, &key, rev));
        }
        if self.latest_revision <= upto {
            log.saved_latest = self.latest_revision;
        }
        let dropped = std::mem::take(&mut log.dropped)
            .into_iter()
            .map(|(key, rev)| (key.into_vec(), rev))
            .collect();
        Unsaved {
            versions,
            dropped,
            latest_revision: log.saved_latest,
            compacted_revision: self.compacted_revision,
        }
    }

    /// An empty store whose history is being read back from a checkpoint taken
    /// at `latest_revision`, compacted at `compacted_revision`: add its changes
    /// with [`Store::restore_version`]. Nothing restored counts as unsaved.
    pub fn restoring(latest_revision: i64, compacted_revision: i64) -> Store {
        let mut store = Store {
            latest_revision,
            compacted_revision,
            ..Store::default()
        };
        store.unsaved.saved_latest = latest_revision;
        store
    }

    /// Adds one change read back from a checkpoint; each key's changes must come
    /// in revision order. Refuses (rather than panics on) anything no store could
    /// have saved, since the bytes come from a file; after an error the store is
    /// incomplete and must be dropped.
    pub fn restore_version(&mut self, saved: SavedVersion) -> Result<(), String> {
        if saved.rev.main <= 0 || saved.rev.main > self.latest_revision || saved.rev.sub < 0 {
            return Err(format!(
                "change at {:?} outside the checkpoint's revisions (latest {})",
                saved.rev, self.latest_revision
            ));
        }
        if let SavedState::Put { value, .. } = &saved.state {
            self.stats.payload_bytes += value.len() as u64;
        }
        let key_bytes = saved.key.len() as u64;
        let history = self.keys.entry(saved.key.into()).or_default();
        history.restore(saved.rev, saved.state)?;
        self.stats.versions += 1;
        if history.len() == 1 {
            self.stats.keys += 1;
            self.stats.payload_bytes += key_bytes;
        }
        Ok(())
    }

    /// One batch of a snapshot of the store at `rev`: the retained changes (those surviving
    /// the current compaction) with `main <= rev` of the keys after `after` (from the first
    /// key when `None`), in key then revision order, whole keys until at least `max_bytes` of
    /// keys and values are taken. `next` is the key to resume after, `None` once every key
    /// was visited. Panics if `rev` is below the compacted revision.
    pub fn export(&self, after: Option<&[u8]>, rev: i64, max_bytes: usize) -> Exported {
        assert!(
            rev >= self.compacted_revision,
            "export at {rev} below compacted revision {}",
            self.compacted_revision
        );
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut exported = Exported {
            versions: Vec::new(),
            next: None,
            compacted_revision: self.compacted_revision,
        };
        let mut bytes = 0;
        for (key, history) in self.keys.range::<[u8], _>((start, Bound::Unbounded)) {
            if bytes >= max_bytes {
                exported.next = exported.versions.last().map(|v| v.key.clone());
                break;
            }
            for (rev, state) in history.exported(self.compacted_revision, rev) {
                if let SavedState::Put { value, .. } = &state {
                    bytes += value.len();
                }
                bytes += key.len();
                let key = key.to_vec();
                exported.versions.push(SavedVersion { key, rev, state });
            }
        }
        exported
    }

    /// A CRC-32 of every change with `main <= rev` that survives the current
    /// compaction, in key order, then revision order. Equal histories give
    /// equal hashes whatever the progress of a pending compaction (etcd's
    /// `HashKV` contract). Panics if `rev` is below the compacted revision.
    pub fn hash(&self, rev: i64) -> u32 {
        assert!(
            rev >= self.compacted_revision,
            "hash at {rev} below compacted revision {}",
            self.compacted_revision
        );
        let mut hasher = crc32fast::Hasher::new();
        for (key, history) in &self.keys {
            history.hash_into(&mut hasher, key, self.compacted_revision, rev);
        }
        hasher.finalize()
    }
}

fn saved_in(
    keys: &BTreeMap<Box<[u8]>, KeyHistory>,
    key: &[u8],
    rev: Revision,
) -> Option<SavedVersion> {
    let state = keys.get(key)?.saved(rev)?;
    Some(SavedVersion {
        key: key.to_vec(),
        rev,
        state,
    })
}

fn key_change(key: &[u8], change: HistoryChange<'_>) -> KeyChange {
    let kv = match change.kv {
        Some(kv) => kv.to_key_value(),
        None => KeyValue {
            key: key.to_vec(),
            mod_revision: change.rev.main,
            ..KeyValue::default()
        },
    };
    KeyChange {
        rev: change.rev,
        is_delete: change.kv.is_none(),
        kv,
        prev: change.prev.map(|kv| kv.to_key_value()),
    }
}

/// Lower and upper bound of a key range, as `BTreeMap::range` takes them.
type KeyBounds<'k> = (Bound<&'k [u8]>, Bound<&'k [u8]>);

/// The map bounds for an etcd key range; `None` when it is empty.
fn key_bounds<'k>(key: &'k [u8], range_end: &'k [u8]) -> Option<KeyBounds<'k>> {
    match range_end {
        [] => Some((Bound::Included(key), Bound::Included(key))),
        [0] => Some((Bound::Included(key), Bound::Unbounded)),
        end if end > key => Some((Bound::Included(key), Bound::Excluded(end))),
        _ => None,
    }
}
