//! What a Raft group keeps on disk, in ferrocd's own types (raft-rs's prost 0.11 types stay
//! inside this crate), the `LogStore` trait the server backs with each shard's WAL, and
//! `MemLogStore`, an in-memory store that models durability for the simulation.
//!
//! Durability contract: writes (`append`, `set_hard_state`, `install_snapshot`) are visible to
//! reads at once (raft-rs reads back what it just handed out before it is durable), but only
//! survive a crash once the owner has made them durable (WAL fsync) and told the group with
//! `Group::on_persisted`. Writes reach the disk in the order they were made, so whatever
//! survives a crash is a prefix of them.

use std::collections::VecDeque;

use raft::eraftpb;
use raft::{GetEntriesContext, RaftState, StorageError};

use crate::group::MembershipChange;

/// One log entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub index: u64,
    pub term: u64,
    pub kind: EntryKind,
    pub data: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// Application data (empty for the entry a new leader appends in its term).
    Normal,
    /// A membership change, applied by the group itself; `data` is opaque to the caller.
    ConfChange,
}

/// Term, vote and commit index: must be durable before votes and acknowledgements leave.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HardState {
    pub term: u64,
    pub vote: u64,
    pub commit: u64,
}

/// The members of a group. Changes are one member at a time (no joint consensus).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfState {
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
}

/// The point a snapshot (or the log's compaction) covers: everything up to `index` is in the
/// snapshot's data, and `conf` is the membership as of `index`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotMeta {
    pub index: u64,
    pub term: u64,
    pub conf: ConfState,
}

/// Applied state up to `meta.index`, in the application's own encoding.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub meta: SnapshotMeta,
    pub data: Vec<u8>,
}

/// A group's durable state: what the server backs with a shard's WAL. Reads see every write
/// made so far; durability is the owner's business (see the module doc).
pub trait LogStore {
    fn hard_state(&self) -> HardState;
    /// The latest snapshot; the log starts right after `snapshot().meta.index`.
    fn snapshot(&self) -> &Snapshot;
    /// Index of the last entry (the snapshot's index when the log is empty).
    fn last_index(&self) -> u64;
    /// Entries `[low, high)`, `snapshot().meta.index < low <= high <= last_index() + 1`, at
    /// least one if the range is non-empty, then no more than `max_bytes` of data in all.
    fn entries(&self, low: u64, high: u64, max_bytes: u64) -> Vec<Entry>;
    /// Appends `entries` (consecutive), first cutting any entries at or after the first's index.
    fn append(&mut self, entries: &[Entry]);
    fn set_hard_state(&mut self, hard_state: HardState);
    /// Replaces the whole log by `snapshot` (a leader sent it: this member was too far behind).
    fn install_snapshot(&mut self, snapshot: Snapshot);
}

/// One write, as it travels to the simulated disk.
#[derive(Clone, Debug)]
enum Write {
    Append(Vec<Entry>),
    HardState(HardState),
    Snapshot(Snapshot),
    Compact(Snapshot),
}

/// The contents of one simulated disk.
#[derive(Clone, Debug, Default)]
struct Contents {
    hard_state: HardState,
    snapshot: Snapshot,
    /// Entries after `snapshot.meta.index`, consecutive.
    log: Vec<Entry>,
}

impl Contents {
    fn last_index(&self) -> u64 {
        self.log
            .last()
            .map_or(self.snapshot.meta.index, |e| e.index)
    }

    fn apply(&mut self, write: &Write) {
        match write {
            Write::Append(entries) => self.append(entries),
            Write::HardState(hs) => self.hard_state = *hs,
            Write::Snapshot(snapshot) => {
                self.log.clear();
                self.snapshot = snapshot.clone();
            }
            Write::Compact(snapshot) => {
                let keep_from = snapshot.meta.index.saturating_sub(self.snapshot.meta.index);
                self.log.drain(..(keep_from as usize).min(self.log.len()));
                self.snapshot = snapshot.clone();
            }
        }
    }

    fn append(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first() else { return };
        assert!(
            first.index > self.snapshot.meta.index && first.index <= self.last_index() + 1,
            "append at {} to a log covering ({}, {}]",
            first.index,
            self.snapshot.meta.index,
            self.last_index()
        );
        let keep = (first.index - self.snapshot.meta.index - 1) as usize;
        self.log.truncate(keep);
        self.log.extend_from_slice(entries);
    }
}

/// In-memory `LogStore` for tests and the simulation. Every write is queued for the disk;
/// `begin_sync` marks the queue's end, `finish_sync` makes everything up to a mark durable
/// (an fsync returning), and `crash` keeps only the durable state plus, like a real disk
/// that wrote some of its queue before power went, a chosen prefix of the rest.
#[derive(Clone, Debug, Default)]
pub struct MemLogStore {
    current: Contents,
    durable: Contents,
    /// Writes not yet durable, each with its sequence number.
    unsynced: VecDeque<(u64, Write)>,
    next_write_seq: u64,
}

impl MemLogStore {
    /// A member's store at cluster creation: the log starts after a snapshot at index 1, term 1
    /// holding `voters` and `data`, so a member added later learns the first membership from
    /// the snapshot it is sent.
    pub fn bootstrap(voters: Vec<u64>, data: Vec<u8>) -> MemLogStore {
        let snapshot = Snapshot {
            meta: SnapshotMeta {
                index: 1,
                term: 1,
                conf: ConfState {
                    voters,
                    learners: Vec::new(),
                },
            },
            data,
        };
        let contents = Contents {
            hard_state: HardState {
                term: 1,
                vote: 0,
                commit: 1,
            },
            snapshot,
            log: Vec::new(),
        };
        MemLogStore {
            current: contents.clone(),
            durable: contents,
            ..MemLogStore::default()
        }
    }

    /// Marks the end of the writes made so far; pass the mark to `finish_sync` once the
    /// simulated fsync completes.
    pub fn begin_sync(&self) -> u64 {
        self.next_write_seq
    }

    /// Every write before `mark` is durable.
    pub fn finish_sync(&mut self, mark: u64) {
        while let Some((seq, _)) = self.unsynced.front() {
            if *seq >= mark {
                break;
            }
            let (_, write) = self.unsynced.pop_front().expect("front exists");
            self.durable.apply(&write);
        }
    }

    /// Number of writes not yet durable.
    pub fn unsynced_writes(&self) -> usize {
        self.unsynced.len()
    }

    /// The store after a crash: the durable state plus the first `survivors` unsynced writes.
    pub fn crash(&self, survivors: usize) -> MemLogStore {
        let mut contents = self.durable.clone();
        for (_, write) in self.unsynced.iter().take(survivors) {
            contents.apply(write);
        }
        MemLogStore {
            current: contents.clone(),
            durable: contents,
            ..MemLogStore::default()
        }
    }

    /// Drops the log up to `snapshot.meta.index` (which must be applied), keeping `snapshot`
    /// in its place: what a checkpoint does to the WAL.
    pub fn compact(&mut self, snapshot: Snapshot) {
        assert!(snapshot.meta.index <= self.current.hard_state.commit);
        assert!(snapshot.meta.index >= self.current.snapshot.meta.index);
        self.write(Write::Compact(snapshot));
    }

    /// Whether the entry `(index, term)` is on disk: in the durable log, or covered by the
    /// durable snapshot (compacted after it was applied).
    pub fn holds_durably(&self, index: u64, term: u64) -> bool {
        index <= self.durable.snapshot.meta.index || term_in(&self.durable, index) == Some(term)
    }

    fn write(&mut self, write: Write) {
        self.current.apply(&write);
        self.unsynced.push_back((self.next_write_seq, write));
        self.next_write_seq += 1;
    }
}

fn term_in(contents: &Contents, index: u64) -> Option<u64> {
    let snap = &contents.snapshot.meta;
    if index == snap.index {
        return Some(snap.term);
    }
    if index < snap.index || index > contents.last_index() {
        return None;
    }
    Some(contents.log[(index - snap.index - 1) as usize].term)
}

/// The first of `entries`, then as many more as keep the data within `max_bytes` (the
/// `LogStore::entries` rule).
pub(crate) fn limit_size<'a>(
    entries: impl IntoIterator<Item = &'a Entry>,
    max_bytes: u64,
) -> Vec<Entry> {
    let mut size_bytes = 0u64;
    let mut out = Vec::new();
    for entry in entries {
        size_bytes += entry.data.len() as u64;
        if !out.is_empty() && size_bytes > max_bytes {
            break;
        }
        out.push(entry.clone());
    }
    out
}

impl LogStore for MemLogStore {
    fn hard_state(&self) -> HardState {
        self.current.hard_state
    }

    fn snapshot(&self) -> &Snapshot {
        &self.current.snapshot
    }

    fn last_index(&self) -> u64 {
        self.current.last_index()
    }

    fn entries(&self, low: u64, high: u64, max_bytes: u64) -> Vec<Entry> {
        let base = self.current.snapshot.meta.index;
        assert!(low > base && high <= self.last_index() + 1 && low <= high);
        let slice = &self.current.log[(low - base - 1) as usize..(high - base - 1) as usize];
        limit_size(slice, max_bytes)
    }

    fn append(&mut self, entries: &[Entry]) {
        if !entries.is_empty() {
            self.write(Write::Append(entries.to_vec()));
        }
    }

    fn set_hard_state(&mut self, hard_state: HardState) {
        self.write(Write::HardState(hard_state));
    }

    fn install_snapshot(&mut self, snapshot: Snapshot) {
        self.write(Write::Snapshot(snapshot));
    }
}

/// The membership after applying `change` to `conf` (single-step changes, as raft-rs applies
/// them: promoting a voter or adding a learner that is one already changes nothing).
pub fn apply_membership(conf: &mut ConfState, change: MembershipChange) {
    let remove = |ids: &mut Vec<u64>, id: u64| ids.retain(|other| *other != id);
    let insert = |ids: &mut Vec<u64>, id: u64| {
        if !ids.contains(&id) {
            ids.push(id);
            ids.sort_unstable();
        }
    };
    match change {
        MembershipChange::AddLearner(id) if !conf.voters.contains(&id) => {
            insert(&mut conf.learners, id)
        }
        // raft-rs keeps a voter a voter when it is "added as a learner" in one step.
        MembershipChange::AddLearner(_) => {}
        MembershipChange::Promote(id) => {
            remove(&mut conf.learners, id);
            insert(&mut conf.voters, id);
        }
        MembershipChange::Remove(id) => {
            remove(&mut conf.learners, id);
            remove(&mut conf.voters, id);
        }
    }
}

/// The membership as of `index` (`store.snapshot()`'s index up to its last entry): the
/// snapshot's, with every membership change in the log up to `index` applied. A compaction
/// point records it, and a group restarted with entries up to `index` applied starts from it
/// (raft-rs does not hand those entries out again, so it would never see their changes).
pub fn conf_at<S: LogStore>(store: &S, index: u64) -> ConfState {
    let base = &store.snapshot().meta;
    assert!(
        index >= base.index && index <= store.last_index(),
        "membership asked at {index}, outside the log [{}, {}]",
        base.index,
        store.last_index()
    );
    let mut conf = base.conf.clone();
    for entry in store.entries(base.index + 1, index + 1, u64::MAX) {
        if let Some((change, _)) = crate::group::decode_membership(&entry) {
            apply_membership(&mut conf, change);
        }
    }
    conf
}

/// raft-rs's view of a `LogStore`: converts at the edge.
pub(crate) struct RaftStore<S> {
    pub(crate) store: S,
    /// The membership raft-rs starts from: the one as of the applied index it is given.
    pub(crate) initial_conf: ConfState,
    /// Set when a leader needed a snapshot the store does not have: the owner should
    /// checkpoint (compact the log into a fresh snapshot); raft retries on its own.
    pub(crate) snapshot_wanted: std::cell::Cell<bool>,
}

impl<S: LogStore> RaftStore<S> {
    fn term_of(&self, index: u64) -> raft::Result<u64> {
        let snap = &self.store.snapshot().meta;
        if index == snap.index {
            return Ok(snap.term);
        }
        if index < snap.index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if index > self.store.last_index() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(self.store.entries(index, index + 1, u64::MAX)[0].term)
    }
}

impl<S: LogStore> raft::Storage for RaftStore<S> {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            hard_state_to_raft(self.store.hard_state()),
            conf_to_raft(&self.initial_conf),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<eraftpb::Entry>> {
        if low <= self.store.snapshot().meta.index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        let max_bytes = max_size.into().unwrap_or(u64::MAX);
        Ok(self
            .store
            .entries(low, high, max_bytes)
            .into_iter()
            .map(entry_to_raft)
            .collect())
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.term_of(idx)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.store.snapshot().meta.index + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.store.last_index())
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<eraftpb::Snapshot> {
        let snapshot = self.store.snapshot();
        let conf = &snapshot.meta.conf;
        // A member restores only a snapshot whose membership includes it (one added since
        // the last checkpoint needs a newer one).
        let knows_peer = conf.voters.contains(&to) || conf.learners.contains(&to);
        if snapshot.meta.index < request_index || !knows_peer {
            self.snapshot_wanted.set(true);
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(snapshot_to_raft(snapshot))
    }
}

pub(crate) fn entry_to_raft(entry: Entry) -> eraftpb::Entry {
    let entry_type = match entry.kind {
        EntryKind::Normal => eraftpb::EntryType::EntryNormal,
        EntryKind::ConfChange => eraftpb::EntryType::EntryConfChangeV2,
    };
    eraftpb::Entry {
        entry_type: entry_type as i32,
        term: entry.term,
        index: entry.index,
        data: entry.data,
        ..Default::default()
    }
}

pub(crate) fn entry_from_raft(entry: eraftpb::Entry) -> Entry {
    let kind = match entry.entry_type() {
        eraftpb::EntryType::EntryNormal => EntryKind::Normal,
        eraftpb::EntryType::EntryConfChangeV2 => EntryKind::ConfChange,
        // Every proposal here is a ConfChangeV2; raft-rs itself never makes v1 entries.
        eraftpb::EntryType::EntryConfChange => panic!("v1 conf change at {}", entry.index),
    };
    assert!(entry.context.is_empty(), "entry context is not stored");
    Entry {
        index: entry.index,
        term: entry.term,
        kind,
        data: entry.data,
    }
}

pub(crate) fn hard_state_to_raft(hs: HardState) -> eraftpb::HardState {
    eraftpb::HardState {
        term: hs.term,
        vote: hs.vote,
        commit: hs.commit,
    }
}

pub(crate) fn hard_state_from_raft(hs: &eraftpb::HardState) -> HardState {
    HardState {
        term: hs.term,
        vote: hs.vote,
        commit: hs.commit,
    }
}

pub(crate) fn conf_to_raft(conf: &ConfState) -> eraftpb::ConfState {
    eraftpb::ConfState {
        voters: conf.voters.clone(),
        learners: conf.learners.clone(),
        ..Default::default()
    }
}

pub(crate) fn conf_from_raft(conf: &eraftpb::ConfState) -> ConfState {
    assert!(
        conf.voters_outgoing.is_empty() && conf.learners_next.is_empty(),
        "joint consensus is not used"
    );
    ConfState {
        voters: conf.voters.clone(),
        learners: conf.learners.clone(),
    }
}

pub(crate) fn snapshot_to_raft(snapshot: &Snapshot) -> eraftpb::Snapshot {
    eraftpb::Snapshot {
        data: snapshot.data.clone(),
        metadata: Some(eraftpb::SnapshotMetadata {
            conf_state: Some(conf_to_raft(&snapshot.meta.conf)),
            index: snapshot.meta.index,
            term: snapshot.meta.term,
        }),
    }
}

pub(crate) fn snapshot_from_raft(snapshot: eraftpb::Snapshot) -> Snapshot {
    let meta = snapshot.metadata.unwrap_or_default();
    Snapshot {
        meta: SnapshotMeta {
            index: meta.index,
            term: meta.term,
            conf: conf_from_raft(&meta.conf_state.unwrap_or_default()),
        },
        data: snapshot.data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            kind: EntryKind::Normal,
            data: vec![index as u8],
        }
    }

    #[test]
    fn crash_keeps_synced_writes_and_a_prefix_of_the_rest() {
        let mut store = MemLogStore::bootstrap(vec![1], Vec::new());
        store.append(&[entry(2, 1), entry(3, 1)]);
        let mark = store.begin_sync();
        store.append(&[entry(4, 2)]);
        store.append(&[entry(3, 3)]);
        store.finish_sync(mark);
        assert_eq!(store.last_index(), 3);
        assert_eq!(store.crash(0).last_index(), 3);
        assert!(store.crash(0).holds_durably(3, 1));
        assert_eq!(store.crash(1).last_index(), 4);
        let after = store.crash(2);
        assert_eq!(after.last_index(), 3);
        assert!(after.holds_durably(3, 3) && !after.holds_durably(3, 1));
    }

    #[test]
    fn entries_respect_the_byte_limit_but_return_at_least_one() {
        let mut store = MemLogStore::bootstrap(vec![1], Vec::new());
        store.append(&[entry(2, 1), entry(3, 1), entry(4, 1)]);
        assert_eq!(store.entries(2, 5, 0).len(), 1);
        assert_eq!(store.entries(2, 5, 2).len(), 2);
        store.set_hard_state(HardState {
            term: 1,
            vote: 1,
            commit: 4,
        });
        store.compact(Snapshot {
            meta: SnapshotMeta {
                index: 3,
                term: 1,
                conf: store.snapshot().meta.conf.clone(),
            },
            data: Vec::new(),
        });
        assert_eq!(store.entries(4, 5, u64::MAX), vec![entry(4, 1)]);
        let raft = RaftStore {
            initial_conf: store.snapshot().meta.conf.clone(),
            store,
            snapshot_wanted: Default::default(),
        };
        assert_eq!(raft.term_of(3).unwrap(), 1);
        assert!(raft.term_of(2).is_err());
    }
}
