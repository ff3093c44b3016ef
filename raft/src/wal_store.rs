//! `WalLogStore`: one group's durable log on a real WAL directory (engine's `wal`).
//!
//! # On-disk mapping
//!
//! - An entry is an `Entry` record (`ConfEntry` for a membership change) with the entry's
//!   term and index; `data` is the entry's data unchanged (so the server's single-voter
//!   entries are entries of this log as they are).
//! - The hard state is a `HardState` record; the latest wins.
//! - The snapshot meta (compaction point: index, term, membership) is a `Snapshot` record:
//!   header term and index, `data` = `voters:u64 learners:u64` counts then the ids (u64 LE).
//!   The snapshot's *data* is the owner's checkpoint, not the WAL's business.
//! - The writer repeats the latest HardState and Snapshot at the head of every segment, so
//!   releasing segments never loses them.
//!
//! # Replay (recovery)
//!
//! Records are applied in log order to (hard state, snapshot meta, entries after it):
//! - Entry at `i`: ignored when `i <= snapshot.index` (a checkpoint covers it; its segment was
//!   not released yet); otherwise every entry `>= i` seen before is discarded and the entry
//!   appended (a new leader overwrote a suffix: the later record wins). An entry beyond
//!   `last + 1` is a gap: the directory is not a log this store wrote.
//! - Snapshot `(s, t)`: if the log holds `(s, t)` (or it is the current snapshot point, e.g. a
//!   repeated record) it is a compaction: entries `<= s` are dropped, later ones kept.
//!   Otherwise it is an installed snapshot: the whole log is dropped. raft-rs installs a
//!   snapshot only when its log does not hold `(s, t)`, and `install_snapshot` asserts it, so
//!   the in-memory effect (discard the log) and the replayed one agree.
//! - HardState: replaces the hard state.
//!
//! Replay starts from the first Snapshot record's point (the records before it, if any, are
//! the log after that point), or from the owner's `initial` point when there is none.
//! Releasing segments can leave a gap after that first record: segments go once a compaction
//! covers their entries, but the compaction's record may sit in the oldest segment kept, whose
//! head repeats an older snapshot. An entry after a gap restarts the log there, and the first
//! later Snapshot record at or above it must cover the gap (else replay fails with `Gap`).
//!
//! Writes reach the WAL in the order they were made (`sync` frames them in order), and a crash
//! keeps a prefix of the records (the WAL cuts a torn tail), so replay yields the state after
//! a prefix of the writes: every write `sync` acknowledged, plus perhaps some later ones.
//!
//! # Old data dirs
//!
//! A WAL with no Snapshot record was written by the single-voter server (every entry term 1,
//! acknowledged only once durable, so committed by a quorum of one), or is new: its base is
//! the `initial` snapshot meta the owner passes (the checkpoint's WAL index, term 1, the member as
//! the only voter) and, without a HardState record, its hard state is `term` = the highest
//! term seen, no vote, `commit` = the last index. The first `sync` writes that base and hard
//! state as records before anything else, so from then on the WAL describes itself (and an
//! entry written by raft before its first HardState is never taken for committed).

use std::cell::Cell;
use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::path::Path;
use std::rc::Rc;

use ferrocd_engine::wal::{self, Record, RecordKind, Wal, WalError, WalOptions};

use crate::storage::{
    limit_size, ConfState, Entry, EntryKind, HardState, LogStore, Snapshot, SnapshotMeta,
};

/// Why a WAL directory cannot be opened as a log.
#[derive(Debug)]
pub enum StoreError {
    Wal(WalError),
    /// An entry does not follow the log before it (a hole in the indexes).
    Gap {
        expected_at_most: u64,
        found: u64,
    },
    /// A Snapshot record whose data is not a membership.
    BadSnapshot {
        index: u64,
    },
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Wal(e) => write!(f, "{e}"),
            StoreError::Gap {
                expected_at_most,
                found,
            } => write!(
                f,
                "raft log: entry {found} after a log ending before {expected_at_most}"
            ),
            StoreError::BadSnapshot { index } => {
                write!(f, "raft log: undecodable snapshot record at index {index}")
            }
        }
    }
}

impl std::error::Error for StoreError {}

impl From<WalError> for StoreError {
    fn from(e: WalError) -> StoreError {
        StoreError::Wal(e)
    }
}

/// The log as reads see it: hard state, snapshot point (data always empty) and the entries
/// after it, consecutive.
#[derive(Clone, Debug, Default)]
struct LogState {
    hard_state: HardState,
    snapshot: Snapshot,
    log: VecDeque<Entry>,
}

impl LogState {
    fn base(&self) -> &SnapshotMeta {
        &self.snapshot.meta
    }

    fn last_index(&self) -> u64 {
        self.log.back().map_or(self.base().index, |e| e.index)
    }

    fn term_at(&self, index: u64) -> Option<u64> {
        let base = self.base();
        if index == base.index {
            return Some(base.term);
        }
        if index < base.index || index > self.last_index() {
            return None;
        }
        Some(self.log[(index - base.index - 1) as usize].term)
    }

    /// Cuts entries `>= entry.index`, then appends it. `Err` on a gap.
    fn append(&mut self, entry: Entry) -> Result<(), StoreError> {
        let base = self.base().index;
        if entry.index <= base {
            return Ok(());
        }
        if entry.index > self.last_index() + 1 {
            return Err(StoreError::Gap {
                expected_at_most: self.last_index() + 1,
                found: entry.index,
            });
        }
        self.log.truncate((entry.index - base - 1) as usize);
        self.log.push_back(entry);
        Ok(())
    }

    /// A Snapshot record's effect: compaction when the log holds `(index, term)`, else the
    /// whole log is replaced.
    fn set_snapshot(&mut self, meta: SnapshotMeta) {
        if self.term_at(meta.index) == Some(meta.term) {
            let drop = meta.index - self.base().index;
            self.log.drain(..drop as usize);
        } else {
            self.log.clear();
        }
        self.snapshot = Snapshot {
            meta,
            data: Vec::new(),
        };
    }
}

impl LogState {
    /// Replay met an entry after a gap: the segments holding the entries before it were
    /// released under a compaction whose record is further on (the oldest segment left starts
    /// with the snapshot record current when it was created, older than the one written into
    /// it later). The log restarts at the entry; the base's term is unknown until that
    /// compaction record (`compact_over_gap`) replaces it, and replay fails without one.
    fn skip_released(&mut self, index: u64) {
        self.log.clear();
        self.snapshot.meta.index = index;
    }

    /// The compaction record covering a gap: its point is at or above the restarted base.
    fn compact_over_gap(&mut self, meta: SnapshotMeta) {
        let drop = (meta.index - self.base().index).min(self.log.len() as u64);
        self.log.drain(..drop as usize);
        self.snapshot = Snapshot {
            meta,
            data: Vec::new(),
        };
    }
}

/// A group's log on a WAL directory. Lives on one glommio executor. Writes (`LogStore`
/// methods, `compact`) are visible at once and queued; `sync` hands the queue to the WAL's
/// group commit and returns the fsync future; the owner awaits it, then calls
/// `Group::on_persisted`. Dropping the store drops what was not synced (a crash).
pub struct WalLogStore {
    /// Shared only with a `release_compacted` future in flight.
    wal: Rc<Wal>,
    state: LogState,
    /// Writes made since the last `sync`, in order.
    queued: Vec<Record>,
    /// For a WAL without a Snapshot record (new or old format): the snapshot meta and hard
    /// state replay derived, written first by the first `sync` that writes anything.
    header: Option<[Record; 2]>,
    /// Snapshot index of the newest compaction queued, and of the newest known durable: only
    /// segments below a durable compaction may be released.
    compacted_index: u64,
    durable_compacted_index: Rc<Cell<u64>>,
}

impl WalLogStore {
    /// Recovers `dir` (created if missing). `initial` is the snapshot meta to assume where the
    /// WAL has no Snapshot record (see the module doc): for a new group its bootstrap point,
    /// for an old single-voter directory the checkpoint's WAL index, term 1 (0 at index 0), the
    /// member as the only voter.
    pub async fn open(
        dir: impl AsRef<Path>,
        options: WalOptions,
        initial: SnapshotMeta,
    ) -> Result<WalLogStore, StoreError> {
        let (wal, recovered) = Wal::open(dir.as_ref(), options).await?;
        let (state, described) = replay(&recovered.records, initial)?;
        let header = (!described).then(|| {
            [
                snapshot_record(state.base()),
                hard_state_record(state.hard_state),
            ]
        });
        Ok(WalLogStore {
            wal: Rc::new(wal),
            compacted_index: state.base().index,
            durable_compacted_index: Rc::new(Cell::new(state.base().index)),
            state,
            queued: Vec::new(),
            header,
        })
    }

    /// Frames every write made since the last call into the WAL, in order, and returns the
    /// future of their fdatasync. Futures of successive calls may be awaited in any order: the
    /// WAL makes batches durable in order. An error is fatal (the WAL accepts nothing more).
    pub fn sync(
        &mut self,
    ) -> Result<impl Future<Output = Result<(), WalError>> + 'static, WalError> {
        if !self.queued.is_empty() {
            if let Some(header) = self.header.take() {
                self.queued.splice(0..0, header);
            }
        }
        let durable = self.wal.submit(&self.queued)?;
        self.queued.clear();
        let compacted = self.compacted_index;
        let durable_compacted = self.durable_compacted_index.clone();
        Ok(async move {
            durable.await?;
            durable_compacted.set(durable_compacted.get().max(compacted));
            Ok(())
        })
    }

    /// Drops the log up to `index` (applied, and saved by the owner's checkpoint), keeping
    /// `(index, its term, conf)` as the snapshot point: bounds the entries held in memory.
    /// The segments go once this is synced, with `release_compacted`.
    pub fn compact(&mut self, index: u64, conf: ConfState) {
        assert!(
            index >= self.state.base().index && index <= self.state.hard_state.commit,
            "compaction at {index} outside [{}, commit {}]",
            self.state.base().index,
            self.state.hard_state.commit
        );
        let term = self.state.term_at(index).expect("index is in the log");
        self.write_snapshot(SnapshotMeta { index, term, conf });
        self.compacted_index = index;
    }

    /// Deletes the WAL segments whose entries a durable compaction covers; returns how many.
    /// The future does not borrow the store, so its owner may keep using it meanwhile.
    pub fn release_compacted(&self) -> impl Future<Output = Result<usize, WalError>> + 'static {
        let wal = self.wal.clone();
        let before = self.durable_compacted_index.get() + 1;
        async move { wal.release_before(before).await }
    }

    /// The term of the entry at `index` (the snapshot point's at its index); `None` outside
    /// the log.
    pub fn term_at(&self, index: u64) -> Option<u64> {
        self.state.term_at(index)
    }

    /// Number of entries held in memory (those after the snapshot point).
    pub fn entries_in_memory(&self) -> usize {
        self.state.log.len()
    }

    pub fn wal(&self) -> &Wal {
        &self.wal
    }

    /// Lets the WAL finish what was synced and closes it; unsynced writes are dropped.
    pub async fn close(self) -> Result<(), WalError> {
        let wal = Rc::try_unwrap(self.wal)
            .unwrap_or_else(|_| panic!("closing a raft log while a release is in flight"));
        wal.close().await
    }

    fn write_snapshot(&mut self, meta: SnapshotMeta) {
        self.queued.push(snapshot_record(&meta));
        self.state.set_snapshot(meta);
    }
}

impl LogStore for WalLogStore {
    fn hard_state(&self) -> HardState {
        self.state.hard_state
    }

    /// The snapshot point; its `data` is always empty (the owner's checkpoint holds it).
    fn snapshot(&self) -> &Snapshot {
        &self.state.snapshot
    }

    fn last_index(&self) -> u64 {
        self.state.last_index()
    }

    fn entries(&self, low: u64, high: u64, max_bytes: u64) -> Vec<Entry> {
        let base = self.state.base().index;
        assert!(
            low > base && high <= self.last_index() + 1 && low <= high,
            "entries [{low}, {high}) outside ({base}, {}]",
            self.last_index()
        );
        let range = (low - base - 1) as usize..(high - base - 1) as usize;
        limit_size(self.state.log.range(range), max_bytes)
    }

    fn append(&mut self, entries: &[Entry]) {
        for entry in entries {
            self.queued.push(entry_record(entry));
            self.state
                .append(entry.clone())
                .unwrap_or_else(|e| panic!("append: {e}"));
        }
    }

    fn set_hard_state(&mut self, hard_state: HardState) {
        self.queued.push(hard_state_record(hard_state));
        self.state.hard_state = hard_state;
    }

    fn install_snapshot(&mut self, snapshot: Snapshot) {
        let meta = snapshot.meta;
        // Replay tells an installed snapshot from a compaction by this (module doc).
        assert_ne!(
            self.state.term_at(meta.index),
            Some(meta.term),
            "installing a snapshot at ({}, {}) the log already holds",
            meta.index,
            meta.term
        );
        self.write_snapshot(meta);
    }
}

/// Replays `records` (module doc), from the first Snapshot record's point if there is one, else
/// from `initial`. The first Snapshot record in a WAL is never an installed snapshot: it is the
/// header the first sync wrote or a copy at the head of the oldest segment left, both the
/// snapshot point of the log around them. Also says whether they hold a Snapshot record (a WAL that
/// describes itself) or are from an old single-voter directory.
/// What a log's recovered records say was committed: the snapshot point and the entries
/// after it up to the hard state's commit index, as `WalLogStore::open` would see them (later
/// records at an index replace earlier ones). Start-up applies exactly these; entries after
/// the commit index are handed out by the group once it learns they are committed.
pub fn committed_entries(
    records: &[Record],
    initial: SnapshotMeta,
) -> Result<(SnapshotMeta, Vec<Entry>), StoreError> {
    let (state, _) = replay(records, initial)?;
    let commit = state.hard_state.commit;
    let entries = state.log.into_iter().filter(|e| e.index <= commit);
    Ok((state.snapshot.meta, entries.collect()))
}

fn replay(records: &[Record], initial: SnapshotMeta) -> Result<(LogState, bool), StoreError> {
    let first_snapshot = records.iter().find(|r| r.kind == RecordKind::Snapshot);
    let described = first_snapshot.is_some();
    let base = match first_snapshot {
        Some(record) => snapshot_meta_from_record(record)?,
        None => initial,
    };
    let mut state = LogState {
        snapshot: Snapshot {
            meta: base,
            data: Vec::new(),
        },
        ..LogState::default()
    };
    let mut hard_state = None;
    // A gap that a later compaction record must cover (see `LogState::skip_released`).
    let mut gap = None;
    for record in records {
        match record.kind {
            RecordKind::Entry | RecordKind::ConfEntry => {
                let entry = entry_from_record(record);
                if entry.index > state.last_index() + 1 {
                    gap = gap.or(Some(StoreError::Gap {
                        expected_at_most: state.last_index() + 1,
                        found: entry.index,
                    }));
                    state.skip_released(entry.index - 1);
                }
                state.append(entry)?
            }
            RecordKind::Snapshot if gap.is_some() => {
                let meta = snapshot_meta_from_record(record)?;
                if meta.index >= state.base().index {
                    gap = None;
                    state.compact_over_gap(meta);
                }
            }
            RecordKind::HardState => {
                let hs = wal::HardState::from_record(record).expect("HardState record");
                hard_state = Some(HardState {
                    term: hs.term,
                    vote: hs.vote,
                    commit: hs.commit,
                });
            }
            RecordKind::Snapshot => state.set_snapshot(snapshot_meta_from_record(record)?),
        }
    }
    if let Some(gap) = gap {
        return Err(gap);
    }
    state.hard_state = hard_state.unwrap_or_else(|| single_voter_hard_state(&state));
    Ok((state, described))
}

/// The hard state of a log without HardState records: the server's single voter acknowledged
/// each entry once durable, so every entry is committed.
fn single_voter_hard_state(state: &LogState) -> HardState {
    let last_term = state.log.back().map_or(0, |e| e.term);
    HardState {
        term: last_term.max(state.base().term),
        vote: 0,
        commit: state.last_index(),
    }
}

/// The records of a log that starts after `base` with no entries and `hard_state` (an
/// installed snapshot's new log: `base` is its point, the hard state commits it). Replay takes
/// the first Snapshot record as the log's base, so this WAL describes itself.
pub fn fresh_log_records(base: &SnapshotMeta, hard_state: HardState) -> [Record; 2] {
    assert!(
        hard_state.commit == base.index && hard_state.term >= base.term,
        "a fresh log commits exactly its base, in a term at least the base's"
    );
    [snapshot_record(base), hard_state_record(hard_state)]
}

fn entry_record(entry: &Entry) -> Record {
    let kind = match entry.kind {
        EntryKind::Normal => RecordKind::Entry,
        EntryKind::ConfChange => RecordKind::ConfEntry,
    };
    Record {
        kind,
        term: entry.term,
        index: entry.index,
        data: entry.data.clone(),
    }
}

fn entry_from_record(record: &Record) -> Entry {
    let kind = match record.kind {
        RecordKind::ConfEntry => EntryKind::ConfChange,
        _ => EntryKind::Normal,
    };
    Entry {
        index: record.index,
        term: record.term,
        kind,
        data: record.data.clone(),
    }
}

fn hard_state_record(hs: HardState) -> Record {
    wal::HardState {
        term: hs.term,
        vote: hs.vote,
        commit: hs.commit,
    }
    .to_record()
}

fn snapshot_record(meta: &SnapshotMeta) -> Record {
    let conf = &meta.conf;
    let words = [conf.voters.len() as u64, conf.learners.len() as u64]
        .into_iter()
        .chain(conf.voters.iter().copied())
        .chain(conf.learners.iter().copied());
    let data: Vec<u8> = words.flat_map(u64::to_le_bytes).collect();
    assert!(
        data.len() <= wal::MAX_SNAPSHOT_DATA_BYTES,
        "membership of {} members is too large for a snapshot record",
        conf.voters.len() + conf.learners.len()
    );
    Record {
        kind: RecordKind::Snapshot,
        term: meta.term,
        index: meta.index,
        data,
    }
}

fn snapshot_meta_from_record(record: &Record) -> Result<SnapshotMeta, StoreError> {
    let bad = || StoreError::BadSnapshot {
        index: record.index,
    };
    if !record.data.len().is_multiple_of(8) {
        return Err(bad());
    }
    let words: Vec<u64> = record
        .data
        .chunks_exact(8)
        .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
        .collect();
    let [voters, learners, ids @ ..] = words.as_slice() else {
        return Err(bad());
    };
    if (*voters as u128 + *learners as u128) != ids.len() as u128 {
        return Err(bad());
    }
    let (voters, learners) = ids.split_at(*voters as usize);
    Ok(SnapshotMeta {
        index: record.index,
        term: record.term,
        conf: ConfState {
            voters: voters.to_vec(),
            learners: learners.to_vec(),
        },
    })
}
