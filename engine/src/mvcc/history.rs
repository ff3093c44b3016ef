//! The retained changes of one key (etcd's `keyIndex`, with the values inline).

use super::{KvRef, Revision, SavedState};

/// One change to a key.
struct Version {
    rev: Revision,
    state: State,
}

enum State {
    /// The key as written by a put. `create_revision` and `version` are derived
    /// from the previous version when the put is applied and stored, so reads at
    /// old revisions need no walk over the generation.
    Put {
        create_revision: i64,
        version: i64,
        lease: i64,
        value: Box<[u8]>,
    },
    /// A delete: ends the key's current generation.
    Tombstone,
}

/// One retained change, as [`KeyHistory::changes_between`] reports it.
pub(super) struct HistoryChange<'a> {
    pub rev: Revision,
    /// The key as written; `None` for a delete.
    pub kv: Option<KvRef<'a>>,
    /// The key just before the change, if it was live and is still retained.
    pub prev: Option<KvRef<'a>>,
}

// The per-version cost stated in the module documentation.
#[cfg(target_pointer_width = "64")]
const _: () = assert!(std::mem::size_of::<Version>() == 56);

/// What a compaction removed from one history, for the store's accounting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Removed {
    pub versions: usize,
    pub value_bytes: u64,
}

/// Every retained change to one key, in strictly increasing revision order.
/// The store never keeps an empty history.
#[derive(Default)]
pub(super) struct KeyHistory {
    versions: Vec<Version>,
}

impl KeyHistory {
    pub(super) fn is_empty(&self) -> bool {
        self.versions.is_empty()
    }

    pub(super) fn len(&self) -> usize {
        self.versions.len()
    }

    /// The key as visible at `rev`: its newest change with `main <= rev`, if that
    /// change is a put.
    pub(super) fn visible_at<'a>(&'a self, key: &'a [u8], rev: i64) -> Option<KvRef<'a>> {
        let newest = self.newest_index_at(rev)?;
        kv_ref(key, &self.versions[newest])
    }

    /// The key as visible after every applied change.
    pub(super) fn latest<'a>(&'a self, key: &'a [u8]) -> Option<KvRef<'a>> {
        kv_ref(key, self.versions.last()?)
    }

    /// Appends a put at `rev`: a new generation if the key is not live, otherwise
    /// the next version of the current one.
    pub(super) fn put(&mut self, rev: Revision, value: &[u8], lease: i64) {
        let (create_revision, version) = match self.versions.last().map(|v| &v.state) {
            Some(State::Put {
                create_revision,
                version,
                ..
            }) => (*create_revision, version + 1),
            Some(State::Tombstone) | None => (rev.main, 1),
        };
        self.push(Version {
            rev,
            state: State::Put {
                create_revision,
                version,
                lease,
                value: value.into(),
            },
        });
    }

    /// Appends a tombstone at `rev`. The key must be live.
    pub(super) fn delete(&mut self, rev: Revision) {
        assert!(
            matches!(
                self.versions.last(),
                Some(Version {
                    state: State::Put { .. },
                    ..
                })
            ),
            "delete at {rev:?} of a key that is not live"
        );
        self.push(Version {
            rev,
            state: State::Tombstone,
        });
    }

    /// The changes with `main` in `[from, to]`, oldest first, each with the key as
    /// it was just before it (`None` when the key was absent or the earlier change
    /// is no longer retained). A change to a deleted key is a tombstone: `kv` is
    /// `None`.
    pub(super) fn changes_between<'a>(
        &'a self,
        key: &'a [u8],
        from: i64,
        to: i64,
    ) -> impl Iterator<Item = HistoryChange<'a>> + 'a {
        let first = self.versions.partition_point(|v| v.rev.main < from);
        let end = self.versions.partition_point(|v| v.rev.main <= to);
        (first..end.max(first)).map(move |i| HistoryChange {
            rev: self.versions[i].rev,
            kv: kv_ref(key, &self.versions[i]),
            prev: i
                .checked_sub(1)
                .and_then(|p| kv_ref(key, &self.versions[p])),
        })
    }

    /// Drops every change that compaction at `rev` makes unreachable: all but the
    /// newest change with `main <= rev`, and that one too if it is a tombstone.
    /// The revisions of the dropped changes are appended to `dropped`.
    pub(super) fn compact(&mut self, rev: i64, dropped: &mut Vec<Revision>) -> Removed {
        let first_kept = self.first_kept_at(rev);
        let mut removed = Removed::default();
        for version in self.versions.drain(..first_kept) {
            removed.versions += 1;
            dropped.push(version.rev);
            if let State::Put { value, .. } = version.state {
                removed.value_bytes += value.len() as u64;
            }
        }
        removed
    }

    /// Feeds the changes with `main <= upto` that survive compaction at
    /// `compacted` into `hasher`. Changes that a pending compaction has not
    /// removed yet are skipped, so the hash does not depend on its progress.
    pub(super) fn hash_into(
        &self,
        hasher: &mut crc32fast::Hasher,
        key: &[u8],
        compacted: i64,
        upto: i64,
    ) {
        let first_kept = self.first_kept_at(compacted);
        for version in &self.versions[first_kept..] {
            if version.rev.main > upto {
                break;
            }
            hash_version(hasher, key, version);
        }
    }

    /// The change at exactly `rev`, copied out for a checkpoint.
    pub(super) fn saved(&self, rev: Revision) -> Option<SavedState> {
        let i = self.versions.binary_search_by_key(&rev, |v| v.rev).ok()?;
        Some(saved_state(&self.versions[i].state))
    }

    /// The changes with `main <= upto` that survive compaction at `compacted`, copied out
    /// for a snapshot: what a store compacted at `compacted` holds up to `upto`, whatever the
    /// progress of a pending compaction (as [`KeyHistory::hash_into`]).
    pub(super) fn exported(
        &self,
        compacted: i64,
        upto: i64,
    ) -> impl Iterator<Item = (Revision, SavedState)> + '_ {
        self.versions[self.first_kept_at(compacted)..]
            .iter()
            .take_while(move |v| v.rev.main <= upto)
            .map(|v| (v.rev, saved_state(&v.state)))
    }

    /// Appends a change read back from a checkpoint. Refuses what no history can
    /// hold (a change not after the previous one, a tombstone of a key that is not
    /// live) instead of panicking, since the bytes come from a file.
    pub(super) fn restore(&mut self, rev: Revision, state: SavedState) -> Result<(), String> {
        if let Some(last) = self.versions.last() {
            if rev <= last.rev {
                return Err(format!("change at {rev:?} is not after {:?}", last.rev));
            }
        }
        let state = match state {
            SavedState::Put {
                create_revision,
                version,
                lease,
                value,
            } => State::Put {
                create_revision,
                version,
                lease,
                value: value.into(),
            },
            SavedState::Tombstone if self.latest(b"").is_none() => {
                return Err(format!("tombstone at {rev:?} of a key that is not live"));
            }
            SavedState::Tombstone => State::Tombstone,
        };
        self.versions.push(Version { rev, state });
        Ok(())
    }

    fn push(&mut self, version: Version) {
        if let Some(last) = self.versions.last() {
            assert!(
                version.rev > last.rev,
                "change at {:?} is not after {:?}",
                version.rev,
                last.rev
            );
        }
        self.versions.push(version);
    }

    /// Index of the newest change with `main <= rev`.
    fn newest_index_at(&self, rev: i64) -> Option<usize> {
        self.versions
            .partition_point(|v| v.rev.main <= rev)
            .checked_sub(1)
    }

    /// Index of the first change that compaction at `rev` keeps.
    fn first_kept_at(&self, rev: i64) -> usize {
        match self.newest_index_at(rev) {
            None => 0,
            Some(newest) => match self.versions[newest].state {
                State::Put { .. } => newest,
                State::Tombstone => newest + 1,
            },
        }
    }
}

fn saved_state(state: &State) -> SavedState {
    match state {
        State::Put {
            create_revision,
            version,
            lease,
            value,
        } => SavedState::Put {
            create_revision: *create_revision,
            version: *version,
            lease: *lease,
            value: value.to_vec(),
        },
        State::Tombstone => SavedState::Tombstone,
    }
}

fn kv_ref<'a>(key: &'a [u8], version: &'a Version) -> Option<KvRef<'a>> {
    match &version.state {
        State::Put {
            create_revision,
            version: key_version,
            lease,
            value,
        } => Some(KvRef {
            key,
            create_revision: *create_revision,
            mod_revision: version.rev.main,
            version: *key_version,
            value,
            lease: *lease,
        }),
        State::Tombstone => None,
    }
}

/// Hashes one version unambiguously: lengths precede variable-size fields.
fn hash_version(hasher: &mut crc32fast::Hasher, key: &[u8], version: &Version) {
    hasher.update(&(key.len() as u64).to_le_bytes());
    hasher.update(key);
    hasher.update(&version.rev.main.to_le_bytes());
    hasher.update(&version.rev.sub.to_le_bytes());
    match &version.state {
        State::Put {
            create_revision,
            version: key_version,
            lease,
            value,
        } => {
            hasher.update(&[1]);
            hasher.update(&create_revision.to_le_bytes());
            hasher.update(&key_version.to_le_bytes());
            hasher.update(&lease.to_le_bytes());
            hasher.update(&(value.len() as u64).to_le_bytes());
            hasher.update(value);
        }
        State::Tombstone => hasher.update(&[0]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rev(main: i64) -> Revision {
        Revision { main, sub: 0 }
    }

    /// put@2, put@3, delete@4, put@6: two generations.
    fn two_generations() -> KeyHistory {
        let mut h = KeyHistory::default();
        h.put(rev(2), b"a", 0);
        h.put(rev(3), b"bb", 7);
        h.delete(rev(4));
        h.put(rev(6), b"ccc", 0);
        h
    }

    #[test]
    fn versions_and_generations_follow_etcd() {
        let h = two_generations();
        let at = |r| {
            h.visible_at(b"k", r)
                .map(|kv| (kv.create_revision, kv.mod_revision, kv.version))
        };
        assert_eq!(at(1), None);
        assert_eq!(at(2), Some((2, 2, 1)));
        assert_eq!(at(3), Some((2, 3, 2)));
        assert_eq!(at(4), None);
        assert_eq!(at(5), None);
        assert_eq!(at(6), Some((6, 6, 1)));
        assert_eq!(h.visible_at(b"k", 3).unwrap().lease, 7);
        assert_eq!(h.latest(b"k").unwrap().value, b"ccc");
    }

    #[test]
    fn compaction_keeps_newest_put_at_rev() {
        let mut h = two_generations();
        assert_eq!(
            h.compact(3, &mut Vec::new()),
            Removed {
                versions: 1,
                value_bytes: 1
            }
        );
        assert_eq!(h.visible_at(b"k", 3).unwrap().version, 2);
        assert_eq!(h.versions.len(), 3);
    }

    #[test]
    fn compaction_drops_generation_ended_by_tombstone() {
        for at in [4, 5] {
            let mut h = two_generations();
            assert_eq!(h.compact(at, &mut Vec::new()).versions, 3);
            assert_eq!(h.versions.len(), 1);
            assert_eq!(h.visible_at(b"k", 6).unwrap().create_revision, 6);
        }
        let mut h = two_generations();
        h.compact(6, &mut Vec::new());
        assert_eq!(h.versions.len(), 1);
    }

    #[test]
    fn compaction_before_first_change_keeps_everything() {
        let mut h = two_generations();
        assert_eq!(h.compact(1, &mut Vec::new()), Removed::default());
        assert_eq!(h.versions.len(), 4);
    }

    #[test]
    fn changes_between_reports_changes_with_their_previous_state() {
        let h = two_generations();
        let summary = |from, to| {
            h.changes_between(b"k", from, to)
                .map(|c| {
                    (
                        c.rev.main,
                        c.kv.map(|kv| kv.version),
                        c.prev.map(|kv| kv.mod_revision),
                    )
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(
            summary(1, 10),
            vec![
                (2, Some(1), None),
                (3, Some(2), Some(2)),
                (4, None, Some(3)),
                (6, Some(1), None)
            ]
        );
        assert_eq!(
            summary(3, 4),
            vec![(3, Some(2), Some(2)), (4, None, Some(3))]
        );
        assert_eq!(summary(5, 5), vec![]);
        assert_eq!(summary(7, 3), vec![]);
    }

    #[test]
    #[should_panic(expected = "not live")]
    fn delete_of_deleted_key_panics() {
        let mut h = two_generations();
        h.delete(rev(7));
        h.delete(rev(8));
    }

    #[test]
    #[should_panic(expected = "is not after")]
    fn change_out_of_order_panics() {
        let mut h = two_generations();
        h.put(rev(6), b"x", 0);
    }
}
