//! Checkpoints: a shard's multi-version history in its B+tree file, written incrementally,
//! so that the WAL entries it covers can be released and start-up replays only what follows.
//!
//! # Format (version 1)
//!
//! One B+tree file per shard ([`crate::btree`]). Integers inside B+tree *keys* are big-endian
//! so that the tree orders them numerically; integers inside *values* are little-endian.
//!
//! | B+tree key                                   | value                                   |
//! |----------------------------------------------|-----------------------------------------|
//! | `00 "checkpoint"`                            | the checkpoint record (below)           |
//! | `01 esc(key) 00 00 main:u64 sub:u64`         | one change of a short key               |
//! | `02 id:u64 main:u64 sub:u64`                 | one change of a long key                |
//! | `03 id:u64`                                  | the bytes of long key `id`              |
//!
//! * `esc` doubles every zero byte as `00 FF`; `00 00` then ends the key. The encoding is
//!   unambiguous (a zero byte is always followed by `FF` inside the key and by `00` at its end)
//!   and preserves order: all changes of a key are adjacent, in revision order, and short keys
//!   come in user-key order (what reads from the tree will need).
//! * A key is *short* when its B+tree key fits the tree's limit (`MAX_KEY_BYTES`, 1000 bytes);
//!   etcd keys may be up to ~1.5 MiB, so a longer key gets a number `id` (never reused while
//!   the key has changes in the file, numbered from a counter in the checkpoint record) and its
//!   bytes are stored once under `03 id`. No hash is involved: two keys can never share an id.
//! * A change's value: `00` for a tombstone; `01 create_revision:i64 version:i64 lease:i64`
//!   then the value bytes for a put. `create_revision` and `version` are stored rather than
//!   derived because compaction leaves only a suffix of a key's history.
//! * The checkpoint record: `format:u32 covered_revision:i64 latest_revision:i64
//!   compacted_revision:i64 next_long_id:u64` (36 bytes, see [`CheckpointMeta`]).
//! * The B+tree meta page's `applied_index` is the shard WAL index the checkpoint covers.
//!
//! # Incremental writes
//!
//! [`Store::take_unsaved`] hands over the changes applied since the previous checkpoint (only
//! up to a revision the caller knows durable) and the changes compaction dropped since then;
//! [`Checkpointer::write`] inserts the former, removes the latter and updates the record and
//! the applied index, all in one B+tree commit.
//!
//! # Crash safety
//!
//! A B+tree commit is atomic (pages written and fdatasync'd, then the meta page, then
//! fdatasync again; a crash leaves the previous commit). The data of a checkpoint, its record
//! (covered revision, compaction) and its WAL index are in the same commit, so after a crash
//! the file is exactly some checkpoint `k`: every change to the shard with revision at most
//! `covered_revision(k)` and nothing above it, compacted at `compacted_revision(k)`. The
//! caller releases WAL segments only after the commit returned, and only those whose entries
//! all have an index at most `wal_index(k)`; those entries have revisions at most
//! `covered_revision(k)` (a shard numbers its entries in revision order), so everything
//! released is in the file, and replaying the remaining entries above `covered_revision(k)`
//! restores the rest. Writing the same change twice cannot happen: a change above the covered
//! revision is not in the file.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;

use crate::btree::{self, Database, Snapshot, WriteTxn, MAX_KEY_BYTES, PAGE_SIZE};
use crate::mvcc::{Revision, SavedState, SavedVersion, Store, Unsaved};

/// Version of the layout above, stored in the checkpoint record.
pub const FORMAT_VERSION: u32 = 1;

pub(crate) const TAG_SHORT: u8 = 1;
pub(crate) const TAG_LONG: u8 = 2;
const TAG_LONG_NAME: u8 = 3;
const RECORD_KEY: &[u8] = b"\x00checkpoint";
const RECORD_BYTES: usize = 36;
/// `main` and `sub`, as two u64.
const REVISION_BYTES: usize = 16;
const LONG_VERSION_KEY_BYTES: usize = 1 + 8 + REVISION_BYTES;
const STATE_TOMBSTONE: u8 = 0;
pub(crate) const STATE_PUT: u8 = 1;
/// Kind byte and three i64 before a put's value.
const PUT_HEADER_BYTES: usize = 25;

/// What a checkpoint covers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckpointMeta {
    /// Every change to the shard with `main <= covered_revision` is in the checkpoint, and
    /// none above: replay starts above it.
    pub covered_revision: i64,
    /// The store's latest revision as of `covered_revision` (a revision that changed the
    /// shard; `covered_revision` may be a cluster revision that did not).
    pub latest_revision: i64,
    pub compacted_revision: i64,
    /// Every entry of the shard's WAL with an index up to this one is covered.
    pub wal_index: u64,
}

/// Errors of a checkpoint file.
#[derive(Debug)]
pub enum Error {
    Tree(btree::Error),
    /// The tree holds something no checkpoint writes.
    Corrupt(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Tree(e) => write!(f, "checkpoint: {e}"),
            Error::Corrupt(detail) => write!(f, "checkpoint corrupt: {detail}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Tree(e) => Some(e),
            Error::Corrupt(_) => None,
        }
    }
}

impl From<btree::Error> for Error {
    fn from(e: btree::Error) -> Self {
        Error::Tree(e)
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// A long key's number and how many of its changes the file holds (its name is removed with
/// the last one).
struct LongKey {
    id: u64,
    versions: u64,
}

/// The long keys the file holds, and the next number to give one.
#[derive(Default)]
struct LongKeys {
    by_key: HashMap<Vec<u8>, LongKey>,
    next_id: u64,
    /// Whether a long key was named or its name removed since [`LongKeys::index`] was built.
    changed: bool,
}

/// Long key names in key order with their numbers: what a reader of the tree needs to find the
/// long keys of a range (their changes are filed by number, not in key order).
pub type LongKeyIndex = BTreeMap<Vec<u8>, u64>;

/// A committed checkpoint as readers see it (`crate::reader`): the tree at that commit, what it
/// covers, and its long keys in key order.
#[derive(Clone)]
pub struct Published {
    pub snapshot: Snapshot,
    pub meta: CheckpointMeta,
    pub long_keys: Arc<LongKeyIndex>,
}

/// A checkpoint file read back.
pub struct Loaded {
    pub store: Store,
    pub meta: CheckpointMeta,
    long_keys: LongKeys,
}

/// Size of a checkpoint file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileStats {
    pub size_bytes: u64,
    pub in_use_bytes: u64,
}

/// The writer of one shard's checkpoint file. Synchronous (fdatasync included): run it off
/// the shard's executor.
pub struct Checkpointer {
    db: Database,
    long_keys: LongKeys,
    /// `long_keys` in key order as of the last commit, rebuilt only when a long key came or
    /// went (long keys are rare: over ~980 bytes).
    long_index: Arc<LongKeyIndex>,
    meta: CheckpointMeta,
}

impl Checkpointer {
    /// Opens the file at `path` (created empty if missing) and reads the store back from it.
    pub fn open(path: &Path) -> Result<(Checkpointer, Store)> {
        let db = Database::open(path)?;
        let loaded = load(&db.snapshot())?;
        let long_index = Arc::new(loaded.long_keys.index());
        let checkpointer = Checkpointer {
            db,
            long_keys: loaded.long_keys,
            long_index,
            meta: loaded.meta,
        };
        Ok((checkpointer, loaded.store))
    }

    /// The last committed checkpoint, for readers.
    pub fn published(&self) -> Published {
        Published {
            snapshot: self.db.snapshot(),
            meta: self.meta,
            long_keys: self.long_index.clone(),
        }
    }

    /// What the last committed checkpoint covers.
    pub fn meta(&self) -> CheckpointMeta {
        self.meta
    }

    /// The file's current length (cheap: no page is read).
    pub fn file_size_bytes(&self) -> u64 {
        self.db.file_size_bytes()
    }

    /// The file's size and the part of it holding live pages (etcd's `dbSize` and
    /// `dbSizeInUse`).
    pub fn file_stats(&self) -> Result<FileStats> {
        let stats = self.db.stats()?;
        let free_bytes = stats.free_pages * PAGE_SIZE as u64;
        Ok(FileStats {
            size_bytes: stats.file_size_bytes,
            in_use_bytes: stats.file_size_bytes.saturating_sub(free_bytes),
        })
    }

    /// Rewrites the file with only its live pages, densely packed (etcd's Defragment). The
    /// checkpoint it holds is unchanged.
    pub fn defragment(&mut self) -> Result<FileStats> {
        self.db.compact_file()?;
        self.file_stats()
    }

    /// Writes `unsaved` (taken from the store with `take_unsaved(covered_revision)`) as one
    /// commit covering `covered_revision` and WAL entries up to `wal_index`. Returns once the
    /// commit is durable. Any error leaves the file at the previous checkpoint, but this
    /// writer must not be used again (its long-key table may be ahead of the file).
    pub fn write(
        &mut self,
        unsaved: &Unsaved,
        covered_revision: i64,
        wal_index: u64,
    ) -> Result<()> {
        let previous = self.meta;
        assert!(
            covered_revision >= previous.covered_revision && wal_index >= previous.wal_index,
            "checkpoint at revision {covered_revision} index {wal_index} after {previous:?}"
        );
        assert!(
            unsaved.latest_revision <= covered_revision
                && unsaved.compacted_revision <= covered_revision,
            "checkpoint covering {covered_revision} of {} compacted at {}",
            unsaved.latest_revision,
            unsaved.compacted_revision
        );
        let mut txn = self.db.begin_write()?;
        for saved in &unsaved.versions {
            assert!(
                saved.rev.main > previous.covered_revision && saved.rev.main <= covered_revision,
                "change at {:?} outside ({}, {covered_revision}]",
                saved.rev,
                previous.covered_revision
            );
            let key = self
                .long_keys
                .version_key_for_insert(&mut txn, &saved.key, saved.rev)?;
            txn.insert(&key, &encode_state(&saved.state))?;
        }
        for (key, rev) in &unsaved.dropped {
            self.long_keys.remove_version(&mut txn, key, *rev)?;
        }
        let meta = CheckpointMeta {
            covered_revision,
            latest_revision: unsaved.latest_revision.max(previous.latest_revision),
            compacted_revision: unsaved.compacted_revision.max(previous.compacted_revision),
            wal_index,
        };
        txn.insert(RECORD_KEY, &encode_record(&meta, self.long_keys.next_id))?;
        txn.set_applied_index(wal_index);
        txn.commit()?;
        self.meta = meta;
        if std::mem::take(&mut self.long_keys.changed) {
            self.long_index = Arc::new(self.long_keys.index());
        }
        Ok(())
    }
}

impl LongKeys {
    fn index(&self) -> LongKeyIndex {
        self.by_key
            .iter()
            .map(|(key, long)| (key.clone(), long.id))
            .collect()
    }

    /// The tree key of a change to be inserted; numbers a new long key.
    fn version_key_for_insert(
        &mut self,
        txn: &mut WriteTxn<'_>,
        key: &[u8],
        rev: Revision,
    ) -> Result<Vec<u8>> {
        if let Some(short) = short_version_key(key, rev) {
            return Ok(short);
        }
        let long = match self.by_key.get_mut(key) {
            Some(long) => long,
            None => {
                let id = self.next_id;
                self.next_id += 1;
                txn.insert(&long_name_key(id), key)?;
                self.changed = true;
                self.by_key
                    .entry(key.to_vec())
                    .or_insert(LongKey { id, versions: 0 })
            }
        };
        long.versions += 1;
        Ok(long_version_key(long.id, rev))
    }

    /// Removes a change compaction dropped, if the file holds it (it may have been dropped
    /// before any checkpoint took it).
    fn remove_version(&mut self, txn: &mut WriteTxn<'_>, key: &[u8], rev: Revision) -> Result<()> {
        if let Some(short) = short_version_key(key, rev) {
            txn.remove(&short)?;
            return Ok(());
        }
        let Some(long) = self.by_key.get_mut(key) else {
            return Ok(());
        };
        if txn.remove(&long_version_key(long.id, rev))? {
            long.versions -= 1;
            if long.versions == 0 {
                txn.remove(&long_name_key(long.id))?;
                self.by_key.remove(key);
                self.changed = true;
            }
        }
        Ok(())
    }
}

/// Reads a checkpoint back: the store (with nothing unsaved) and what it covers. An empty file
/// gives an empty store covering nothing.
pub fn load(snap: &Snapshot) -> Result<Loaded> {
    let Some(record) = snap.get(RECORD_KEY)? else {
        if !snap.is_empty() {
            return Err(Error::Corrupt("entries without a checkpoint record".into()));
        }
        return Ok(Loaded {
            store: Store::new(),
            meta: CheckpointMeta::default(),
            long_keys: LongKeys::default(),
        });
    };
    let (mut meta, next_long_id) = decode_record(record)?;
    meta.wal_index = snap.applied_index();
    let mut store = Store::restoring(meta.latest_revision, meta.compacted_revision);
    let names = long_names(snap, next_long_id)?;
    let mut by_key: HashMap<Vec<u8>, LongKey> = HashMap::new();
    for entry in snap.iter() {
        let (key, value) = entry?;
        let (user_key, rev) = match key.first() {
            Some(&TAG_SHORT) => decode_short_version_key(key)?,
            Some(&TAG_LONG) => {
                let (id, rev) = decode_long_version_key(key)?;
                let name = names
                    .get(&id)
                    .ok_or_else(|| Error::Corrupt(format!("long key {id} has no name")))?;
                by_key
                    .entry(name.clone())
                    .or_insert(LongKey { id, versions: 0 })
                    .versions += 1;
                (name.clone(), rev)
            }
            Some(&TAG_LONG_NAME) => continue,
            _ if key == RECORD_KEY => continue,
            _ => return Err(Error::Corrupt(format!("unknown tree key {key:02x?}"))),
        };
        let state = decode_state(value)?;
        store
            .restore_version(SavedVersion {
                key: user_key,
                rev,
                state,
            })
            .map_err(Error::Corrupt)?;
    }
    if by_key.len() != names.len() {
        return Err(Error::Corrupt("a long key name without changes".into()));
    }
    Ok(Loaded {
        store,
        meta,
        long_keys: LongKeys {
            by_key,
            next_id: next_long_id,
            changed: false,
        },
    })
}

fn long_names(snap: &Snapshot, next_long_id: u64) -> Result<HashMap<u64, Vec<u8>>> {
    let mut names = HashMap::new();
    let range = snap.range(
        Bound::Included(&[TAG_LONG_NAME][..]),
        Bound::Excluded(&[TAG_LONG_NAME + 1][..]),
    );
    for entry in range {
        let (key, name) = entry?;
        let id = key
            .get(1..)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_be_bytes)
            .filter(|id| *id < next_long_id)
            .ok_or_else(|| Error::Corrupt(format!("bad long key name entry {key:02x?}")))?;
        if short_version_key(name, Revision::default()).is_some() {
            return Err(Error::Corrupt(format!("long key {id} is short")));
        }
        names.insert(id, name.to_vec());
    }
    Ok(names)
}

/// `01 esc(key) 00 00 main sub`, or `None` when that exceeds the tree's key limit.
fn short_version_key(key: &[u8], rev: Revision) -> Option<Vec<u8>> {
    let zeros = key.iter().filter(|b| **b == 0).count();
    let len = 1 + key.len() + zeros + 2 + REVISION_BYTES;
    if len > MAX_KEY_BYTES {
        return None;
    }
    let mut out = short_key_prefix(key, len);
    put_revision(&mut out, rev);
    Some(out)
}

/// `01 esc(key) 00 00`, whatever its length: every short tree key of `key` starts with it, and
/// it sorts after the tree keys of every smaller key and before those of every larger one, so
/// it bounds ranges of the tree by user key.
pub(crate) fn short_key_prefix(key: &[u8], capacity: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(capacity);
    out.push(TAG_SHORT);
    for &b in key {
        out.push(b);
        if b == 0 {
            out.push(0xff);
        }
    }
    out.extend_from_slice(&[0, 0]);
    out
}

pub(crate) fn decode_short_version_key(tree_key: &[u8]) -> Result<(Vec<u8>, Revision)> {
    let bad = || Error::Corrupt(format!("bad short key entry {tree_key:02x?}"));
    let body_end = tree_key
        .len()
        .checked_sub(REVISION_BYTES)
        .filter(|end| *end >= 3)
        .ok_or_else(bad)?;
    let rev = get_revision(&tree_key[body_end..]).ok_or_else(bad)?;
    // A valid escaped key never holds `00 00` and never ends in a lone `00`.
    let escaped = tree_key[1..body_end]
        .strip_suffix(&[0, 0])
        .ok_or_else(bad)?;
    let mut key = Vec::with_capacity(escaped.len());
    let mut i = 0;
    while i < escaped.len() {
        match escaped[i] {
            0 if escaped.get(i + 1) == Some(&0xff) => {
                key.push(0);
                i += 2;
            }
            0 => return Err(bad()),
            b => {
                key.push(b);
                i += 1;
            }
        }
    }
    Ok((key, rev))
}

pub(crate) fn long_version_key(id: u64, rev: Revision) -> Vec<u8> {
    let mut out = Vec::with_capacity(LONG_VERSION_KEY_BYTES);
    out.push(TAG_LONG);
    out.extend_from_slice(&id.to_be_bytes());
    put_revision(&mut out, rev);
    out
}

pub(crate) fn decode_long_version_key(tree_key: &[u8]) -> Result<(u64, Revision)> {
    let bad = || Error::Corrupt(format!("bad long key entry {tree_key:02x?}"));
    if tree_key.len() != LONG_VERSION_KEY_BYTES {
        return Err(bad());
    }
    let id = u64::from_be_bytes(tree_key[1..9].try_into().expect("8 bytes"));
    let rev = get_revision(&tree_key[9..]).ok_or_else(bad)?;
    Ok((id, rev))
}

fn long_name_key(id: u64) -> [u8; 9] {
    let mut out = [0; 9];
    out[0] = TAG_LONG_NAME;
    out[1..].copy_from_slice(&id.to_be_bytes());
    out
}

fn put_revision(out: &mut Vec<u8>, rev: Revision) {
    assert!(rev.main > 0 && rev.sub >= 0, "saving revision {rev:?}");
    out.extend_from_slice(&(rev.main as u64).to_be_bytes());
    out.extend_from_slice(&(rev.sub as u64).to_be_bytes());
}

/// Both halves must be valid non-negative i64 (main positive).
fn get_revision(bytes: &[u8]) -> Option<Revision> {
    let main = i64::try_from(u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?)).ok()?;
    let sub = i64::try_from(u64::from_be_bytes(bytes.get(8..16)?.try_into().ok()?)).ok()?;
    (main > 0 && bytes.len() == REVISION_BYTES).then_some(Revision { main, sub })
}

pub(crate) fn encode_state(state: &SavedState) -> Vec<u8> {
    match state {
        SavedState::Tombstone => vec![STATE_TOMBSTONE],
        SavedState::Put {
            create_revision,
            version,
            lease,
            value,
        } => {
            let mut out = Vec::with_capacity(PUT_HEADER_BYTES + value.len());
            out.push(STATE_PUT);
            for field in [create_revision, version, lease] {
                out.extend_from_slice(&field.to_le_bytes());
            }
            out.extend_from_slice(value);
            out
        }
    }
}

pub(crate) fn decode_state(bytes: &[u8]) -> Result<SavedState> {
    let field =
        |i: usize| i64::from_le_bytes(bytes[1 + 8 * i..9 + 8 * i].try_into().expect("8 bytes"));
    match bytes.first() {
        Some(&STATE_TOMBSTONE) if bytes.len() == 1 => Ok(SavedState::Tombstone),
        Some(&STATE_PUT) if bytes.len() >= PUT_HEADER_BYTES => Ok(SavedState::Put {
            create_revision: field(0),
            version: field(1),
            lease: field(2),
            value: bytes[PUT_HEADER_BYTES..].to_vec(),
        }),
        _ => Err(Error::Corrupt(format!(
            "bad change value of {} bytes",
            bytes.len()
        ))),
    }
}

fn encode_record(meta: &CheckpointMeta, next_long_id: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(RECORD_BYTES);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    for field in [
        meta.covered_revision,
        meta.latest_revision,
        meta.compacted_revision,
    ] {
        out.extend_from_slice(&field.to_le_bytes());
    }
    out.extend_from_slice(&next_long_id.to_le_bytes());
    out
}

/// The record without the WAL index (that is in the tree's meta page).
fn decode_record(bytes: &[u8]) -> Result<(CheckpointMeta, u64)> {
    if bytes.len() != RECORD_BYTES {
        return Err(Error::Corrupt(format!(
            "checkpoint record of {} bytes",
            bytes.len()
        )));
    }
    let format = u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes"));
    if format != FORMAT_VERSION {
        return Err(Error::Corrupt(format!("unsupported format {format}")));
    }
    let word = |i: usize| bytes[4 + 8 * i..12 + 8 * i].try_into().expect("8 bytes");
    let meta = CheckpointMeta {
        covered_revision: i64::from_le_bytes(word(0)),
        latest_revision: i64::from_le_bytes(word(1)),
        compacted_revision: i64::from_le_bytes(word(2)),
        wal_index: 0,
    };
    let ordered = 0 <= meta.latest_revision
        && meta.latest_revision <= meta.covered_revision
        && 0 <= meta.compacted_revision
        && meta.compacted_revision <= meta.covered_revision;
    if !ordered {
        return Err(Error::Corrupt(format!("revisions out of order: {meta:?}")));
    }
    Ok((meta, u64::from_le_bytes(word(3))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rev(main: i64, sub: i64) -> Revision {
        Revision { main, sub }
    }

    #[test]
    fn short_keys_round_trip_and_keep_key_then_revision_order() {
        let keys: [&[u8]; 6] = [b"", b"\0", b"\0\0", b"\0\xff", b"a", b"a\0"];
        let mut tree_keys = Vec::new();
        for key in keys {
            for r in [rev(1, 0), rev(1, 3), rev(300, 0)] {
                let tree_key = short_version_key(key, r).expect("short");
                assert_eq!(
                    decode_short_version_key(&tree_key).expect("decodes"),
                    (key.to_vec(), r)
                );
                tree_keys.push(tree_key);
            }
        }
        let mut sorted = tree_keys.clone();
        sorted.sort();
        assert_eq!(sorted, tree_keys, "tree order is key order, then revision");
    }

    #[test]
    fn malformed_short_keys_are_refused() {
        let good = short_version_key(b"a\0b", rev(2, 0)).expect("short");
        for bad in [
            &good[..good.len() - 1],
            &[TAG_SHORT, 0, 0][..],
            &[&[TAG_SHORT, b'a', 0, 7, 0, 0][..], &good[good.len() - 16..]].concat(),
        ] {
            assert!(decode_short_version_key(bad).is_err(), "{bad:02x?}");
        }
    }

    #[test]
    fn keys_past_the_tree_limit_are_long() {
        let limit_key = vec![b'k'; MAX_KEY_BYTES - 1 - 2 - REVISION_BYTES];
        assert!(short_version_key(&limit_key, rev(1, 0)).is_some());
        assert!(short_version_key(&[limit_key, vec![b'k']].concat(), rev(1, 0)).is_none());
        let zeros = vec![0; (MAX_KEY_BYTES - 1 - 2 - REVISION_BYTES) / 2 + 1];
        assert!(short_version_key(&zeros, rev(1, 0)).is_none());
    }
}
