//! Reads of one shard from any thread, without a message to the shard: the last checkpoint's
//! B+tree snapshot plus a lock-free *read buffer* of every change applied above it.
//!
//! # Parts
//!
//! * The *generation*: the B+tree [`Snapshot`] of the last checkpoint, the revision it covers
//!   (every change with `main <= covered` is in it, none above) and its long keys in key order.
//!   Published through an epoch-reclaimed atomic pointer (`crossbeam-epoch`): a reader pins,
//!   loads the pointer and reads through it; a replaced generation is freed only once every
//!   reader that could have loaded it has unpinned.
//! * The *buffer*: a lock-free ordered map (`crossbeam-skiplist`, epoch-reclaimed too) keyed by
//!   `(key, main, sub)`, holding each applied change as a checkpoint stores it (a tombstone, or a
//!   put with its create revision, version, lease and value). Same order as the tree, so a range
//!   is a merge of two ordered streams.
//! * The *trim watermark*: the covered revision of the newest generation whose changes the
//!   writer has started removing from the buffer.
//! * The *compacted revision*: reads below it are refused.
//!
//! # One writer
//!
//! The shard is the only writer: [`ShardReader::insert`] on every applied change (before the
//! change's revision can become visible), [`ShardReader::publish`] after a checkpoint commit
//! (store the generation, then raise the watermark to its covered revision, then remove the
//! buffered changes at or below it), [`ShardReader::set_compacted`] when a compaction starts.
//!
//! # Why a reader never misses a change
//!
//! A read at revision `R` (a visible revision: every change with `main <= R` was inserted before
//! `R` became visible, and the reader learnt `R` after that) loads a generation `G` (covered
//! `c`), scans the buffer, then loads the watermark `W`. It answers only if `W <= c`, else it
//! starts over. Take a change `x` with `main <= R`:
//!
//! * `main(x) <= c`: `x` is in `G`'s snapshot (a checkpoint covering `c` holds every change up
//!   to `c` except those compaction dropped, which no read at or above the compacted revision
//!   needs).
//! * `main(x) > c`: `x` was inserted before the read started, so the scan finds it unless it was
//!   removed first. The writer removes `x` only after storing a watermark `>= main(x) > c`
//!   (SeqCst), and the scan saw the removal (the skiplist's unlinking is a release the scan's
//!   traversal acquires), so the reader's later SeqCst load of `W` sees a value `> c`: it
//!   retries rather than answer without `x`.
//!
//! A change may appear twice (in the snapshot and in the buffer, before its trim): both copies
//! are the same change, and the merge keeps one. Changes above `R` (applied but not yet
//! visible, possibly never durable) are in the buffer but never chosen. A compaction that
//! starts during a read may remove versions the read relied on (the next checkpoint drops
//! them): the compacted revision is checked again after the read, and a read now below it
//! answers [`ReadError::Compacted`]; the checkpoint with the drops is published only after
//! the compaction started, so a reader that saw that generation sees the new compacted
//! revision.
//!
//! Retries are rare: they need a checkpoint publication (every 100 ms at most) during a read.
//!
//! # Cost
//!
//! A read takes no lock and writes no shared memory except the epoch pin (a thread-local
//! counter). The buffer holds what the next checkpoint writes (bounded by the checkpoint
//! interval and its change limit), once more than the in-memory store does while that store
//! still serves the writer.

use std::collections::VecDeque;
use std::iter::Peekable;
use std::ops::Bound;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Mutex;

use crossbeam_epoch::{self as epoch, Atomic, Owned};
use crossbeam_skiplist::map::Entry;
use crossbeam_skiplist::SkipMap;

use crate::btree::Snapshot;
use crate::checkpoint::{self, Published, TAG_LONG, TAG_SHORT};
use crate::mvcc::{KeyValue, RangeResult, Revision, SavedState, SavedVersion};

/// Why a read has no answer.
#[derive(Debug)]
pub enum ReadError {
    /// The read revision is below the compacted revision.
    Compacted,
    /// The checkpoint file holds something no checkpoint writes.
    Corrupt(checkpoint::Error),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Compacted => write!(f, "read below the compacted revision"),
            ReadError::Corrupt(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ReadError {}

impl From<checkpoint::Error> for ReadError {
    fn from(e: checkpoint::Error) -> Self {
        ReadError::Corrupt(e)
    }
}

impl From<crate::btree::Error> for ReadError {
    fn from(e: crate::btree::Error) -> Self {
        ReadError::Corrupt(checkpoint::Error::Tree(e))
    }
}

/// A buffered change's place: the tree's order (key, then revision).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct BufferKey {
    key: Box<[u8]>,
    rev: Revision,
}

/// The lowest revision: below every real change (`main > 0`).
const REV_MIN: Revision = Revision { main: 0, sub: 0 };

/// A shard's state as any thread may read it. See the module documentation.
pub struct ShardReader {
    published: Atomic<Published>,
    buffer: SkipMap<BufferKey, SavedState>,
    /// Buffered changes at or below this revision may be gone: see the module docs.
    trimmed_upto: AtomicI64,
    compacted: AtomicI64,
    /// The writer's list of buffered changes in revision order, to trim without a scan. Only
    /// the writer takes this lock (uncontended).
    order: Mutex<VecDeque<BufferKey>>,
}

impl ShardReader {
    /// A reader of the checkpoint `published`, compacted at `compacted_revision`, with an
    /// empty buffer: insert what was applied above the checkpoint (after a restart, the
    /// replayed tail: `Store::unsaved_versions`).
    pub fn new(published: Published, compacted_revision: i64) -> ShardReader {
        ShardReader {
            trimmed_upto: AtomicI64::new(published.meta.covered_revision),
            published: Atomic::new(published),
            buffer: SkipMap::new(),
            compacted: AtomicI64::new(compacted_revision),
            order: Mutex::new(VecDeque::new()),
        }
    }

    /// Writer: buffers one applied change. Changes come in revision order, above the covered
    /// revision of the published checkpoint.
    pub fn insert(&self, change: SavedVersion) {
        let key = BufferKey {
            key: change.key.into(),
            rev: change.rev,
        };
        let mut order = lock(&self.order);
        assert!(
            order.back().is_none_or(|last| last.rev < key.rev),
            "buffered change at {:?} after {:?}",
            key.rev,
            order.back().map(|last| last.rev)
        );
        assert!(
            key.rev.main > self.trimmed_upto.load(Ordering::Relaxed),
            "buffered change at {:?} at or below the checkpoint",
            key.rev
        );
        self.buffer.insert(key.clone(), change.state);
        order.push_back(key);
    }

    /// Writer: makes a newer checkpoint the base of reads and drops the buffered changes it
    /// covers (in this order: see the module docs).
    pub fn publish(&self, published: Published) {
        let covered = published.meta.covered_revision;
        let guard = epoch::pin();
        let old = self
            .published
            .swap(Owned::new(published), Ordering::AcqRel, &guard);
        // SAFETY: non-null (see `range`); the guard keeps it alive until the end of scope.
        let previous = unsafe { old.deref() }.meta.covered_revision;
        // SAFETY: `old` is no longer reachable from `self.published`; readers that loaded it
        // are pinned, and the destruction waits until they all unpinned.
        unsafe { guard.defer_destroy(old) };
        // The old snapshot pins B+tree pages against reuse: hand it to the collector now
        // rather than when this thread's local bag fills.
        guard.flush();
        assert!(
            covered >= previous,
            "checkpoint at {covered} after {previous}"
        );
        self.trimmed_upto.store(covered, Ordering::SeqCst);
        let mut order = lock(&self.order);
        while order.front().is_some_and(|k| k.rev.main <= covered) {
            let key = order.pop_front().expect("front exists");
            self.buffer.remove(&key);
        }
    }

    /// Writer: a compaction at `rev` started; reads below it are refused from now on.
    pub fn set_compacted(&self, rev: i64) {
        self.compacted.fetch_max(rev, Ordering::SeqCst);
    }

    pub fn compacted_revision(&self) -> i64 {
        self.compacted.load(Ordering::SeqCst)
    }

    /// Number of buffered changes (not yet in the published checkpoint).
    pub fn buffered_changes(&self) -> usize {
        self.buffer.len()
    }

    /// The keys visible at `rev` in the range given etcd's way (as `Store::range`: `end`
    /// empty is the key alone, `b"\0"` every key from `key`, else `[key, end)`), in key
    /// order, at most `limit` of them when `limit > 0`, and the number of all of them.
    /// `count_only` returns no kvs. Any thread, no lock.
    pub fn range(
        &self,
        key: &[u8],
        end: &[u8],
        rev: i64,
        limit: usize,
        count_only: bool,
    ) -> Result<RangeResult, ReadError> {
        if rev < self.compacted_revision() {
            return Err(ReadError::Compacted);
        }
        let Some(bounds) = KeyRange::new(key, end) else {
            return Ok(RangeResult::default());
        };
        loop {
            let guard = epoch::pin();
            // SAFETY: never null (set in `new`, swapped only for non-null), and the guard
            // keeps it alive while `generation` is used.
            let generation = unsafe { self.published.load(Ordering::Acquire, &guard).deref() };
            let result = self.read_once(generation, &bounds, rev, limit, count_only)?;
            if self.trimmed_upto.load(Ordering::SeqCst) > generation.meta.covered_revision {
                continue; // The buffer may have lost changes this generation lacks.
            }
            if rev < self.compacted_revision() {
                return Err(ReadError::Compacted);
            }
            return Ok(result);
        }
    }

    fn read_once(
        &self,
        generation: &Published,
        bounds: &KeyRange,
        rev: i64,
        limit: usize,
        count_only: bool,
    ) -> Result<RangeResult, ReadError> {
        let snap = &generation.snapshot;
        let short = short_versions(snap, bounds);
        let long = long_versions(generation, bounds)?;
        let buffered = self
            .buffer
            .range((bounds.buffer_lower(), bounds.buffer_upper()))
            .map(|entry| {
                Ok((
                    entry.key().key.to_vec(),
                    entry.key().rev,
                    Change::Buffered(entry),
                ))
            });
        let merged = Merge::new(Merge::new(short, long.into_iter()), buffered);
        let mut result = RangeResult::default();
        for newest in NewestAt::new(merged, rev) {
            let (key, rev, change) = newest?;
            if !change.is_put()? {
                continue;
            }
            result.count += 1;
            if !count_only && (limit == 0 || result.kvs.len() < limit) {
                result.kvs.push(change.key_value(key, rev)?);
            }
        }
        Ok(result)
    }
}

impl Drop for ShardReader {
    fn drop(&mut self) {
        // SAFETY: `&mut self`: no reader can hold the pointer, so no guard is needed, and it
        // is non-null and owned by this reader alone.
        unsafe {
            let guard = epoch::unprotected();
            drop(self.published.load(Ordering::Relaxed, guard).into_owned());
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A user-key range `[lower, upper)` (`upper` `None`: unbounded); never empty.
struct KeyRange {
    lower: Vec<u8>,
    upper: Option<Vec<u8>>,
}

impl KeyRange {
    fn new(key: &[u8], end: &[u8]) -> Option<KeyRange> {
        let upper = match end {
            // The key alone: `[key, key\0)`.
            [] => Some([key, &[0]].concat()),
            [0] => None,
            end if end > key => Some(end.to_vec()),
            _ => return None,
        };
        Some(KeyRange {
            lower: key.to_vec(),
            upper,
        })
    }

    fn contains(&self, key: &[u8]) -> bool {
        key >= self.lower.as_slice() && self.upper.as_deref().is_none_or(|upper| key < upper)
    }

    fn buffer_lower(&self) -> Bound<BufferKey> {
        Bound::Included(BufferKey {
            key: self.lower.as_slice().into(),
            rev: REV_MIN,
        })
    }

    fn buffer_upper(&self) -> Bound<BufferKey> {
        match &self.upper {
            Some(upper) => Bound::Excluded(BufferKey {
                key: upper.as_slice().into(),
                rev: REV_MIN,
            }),
            None => Bound::Unbounded,
        }
    }
}

/// One change from either source: its stored bytes in the tree, or its buffer entry.
enum Change<'s> {
    Tree(&'s [u8]),
    Buffered(Entry<'s, BufferKey, SavedState>),
}

impl Change<'_> {
    fn is_put(&self) -> Result<bool, ReadError> {
        Ok(match self {
            Change::Tree(bytes) => match bytes.first() {
                Some(&checkpoint::STATE_PUT) => true,
                _ => matches!(checkpoint::decode_state(bytes)?, SavedState::Put { .. }),
            },
            Change::Buffered(entry) => matches!(entry.value(), SavedState::Put { .. }),
        })
    }

    /// The put as a kv; only for a put.
    fn key_value(&self, key: Vec<u8>, rev: Revision) -> Result<KeyValue, ReadError> {
        let decoded;
        let state = match self {
            Change::Tree(bytes) => {
                decoded = checkpoint::decode_state(bytes)?;
                &decoded
            }
            Change::Buffered(entry) => entry.value(),
        };
        let SavedState::Put {
            create_revision,
            version,
            lease,
            value,
        } = state
        else {
            unreachable!("key_value of a tombstone")
        };
        Ok(KeyValue {
            key,
            create_revision: *create_revision,
            mod_revision: rev.main,
            version: *version,
            value: value.clone(),
            lease: *lease,
        })
    }
}

/// A change with its user key and revision; streams of them come in (key, revision) order.
type Item<'s> = Result<(Vec<u8>, Revision, Change<'s>), ReadError>;

/// The short keys' changes in the range, from the tree.
fn short_versions<'s>(snap: &'s Snapshot, bounds: &KeyRange) -> impl Iterator<Item = Item<'s>> {
    let lower = checkpoint::short_key_prefix(&bounds.lower, 0);
    let upper = match &bounds.upper {
        Some(upper) => checkpoint::short_key_prefix(upper, 0),
        None => vec![TAG_SHORT + 1],
    };
    snap.range(Bound::Included(&lower), Bound::Excluded(&upper))
        .map(|entry| {
            let (tree_key, value) = entry?;
            let (key, rev) = checkpoint::decode_short_version_key(tree_key)?;
            Ok((key, rev, Change::Tree(value)))
        })
}

/// The long keys' changes in the range, from the tree, in key order (long keys are rare).
fn long_versions<'s>(
    generation: &'s Published,
    bounds: &KeyRange,
) -> Result<Vec<Item<'s>>, ReadError> {
    let snap = &generation.snapshot;
    let mut items = Vec::new();
    for (key, id) in generation.long_keys.range(bounds.lower.clone()..) {
        if !bounds.contains(key) {
            break;
        }
        let lower = [&[TAG_LONG][..], &id.to_be_bytes()].concat();
        let upper = [&[TAG_LONG][..], &(id + 1).to_be_bytes()].concat();
        for entry in snap.range(Bound::Included(&lower), Bound::Excluded(&upper)) {
            let (tree_key, value) = entry?;
            let (_, rev) = checkpoint::decode_long_version_key(tree_key)?;
            items.push(Ok((key.clone(), rev, Change::Tree(value))));
        }
    }
    Ok(items)
}

/// Two (key, revision)-ordered streams merged into one.
struct Merge<'s, A: Iterator<Item = Item<'s>>, B: Iterator<Item = Item<'s>>> {
    a: Peekable<A>,
    b: Peekable<B>,
}

impl<'s, A: Iterator<Item = Item<'s>>, B: Iterator<Item = Item<'s>>> Merge<'s, A, B> {
    fn new(a: A, b: B) -> Self {
        Merge {
            a: a.peekable(),
            b: b.peekable(),
        }
    }
}

impl<'s, A: Iterator<Item = Item<'s>>, B: Iterator<Item = Item<'s>>> Iterator for Merge<'s, A, B> {
    type Item = Item<'s>;

    fn next(&mut self) -> Option<Item<'s>> {
        let take_a = match (self.a.peek(), self.b.peek()) {
            (None, _) => false,
            (_, None) => true,
            // An error goes first, so that it ends the read.
            (Some(Err(_)), _) => true,
            (_, Some(Err(_))) => false,
            (Some(Ok((ka, ra, _))), Some(Ok((kb, rb, _)))) => (ka, ra) <= (kb, rb),
        };
        if take_a {
            self.a.next()
        } else {
            self.b.next()
        }
    }
}

/// Per key, its newest change with `main <= rev`; keys without one are skipped.
struct NewestAt<'s, I: Iterator<Item = Item<'s>>> {
    items: Peekable<I>,
    rev: i64,
}

impl<'s, I: Iterator<Item = Item<'s>>> NewestAt<'s, I> {
    fn new(items: I, rev: i64) -> Self {
        NewestAt {
            items: items.peekable(),
            rev,
        }
    }
}

impl<'s, I: Iterator<Item = Item<'s>>> Iterator for NewestAt<'s, I> {
    type Item = Item<'s>;

    fn next(&mut self) -> Option<Item<'s>> {
        loop {
            let (key, rev, change) = match self.items.next()? {
                Ok(item) => item,
                Err(e) => return Some(Err(e)),
            };
            let mut newest = (rev.main <= self.rev).then_some((rev, change));
            while let Some(Ok((next_key, _, _))) = self.items.peek() {
                if *next_key != key {
                    break;
                }
                let Some(Ok((_, rev, change))) = self.items.next() else {
                    unreachable!("peeked")
                };
                if rev.main <= self.rev {
                    newest = Some((rev, change));
                }
            }
            if let Some((rev, change)) = newest {
                return Some(Ok((key, rev, change)));
            }
        }
    }
}
