//! Read-only snapshots: a committed root read through the shared mapping.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, Mutex, PoisonError};

use memmap2::Mmap;

use super::meta::{Meta, META_PAGES};
use super::page::{
    self, BranchView, LeafView, PageId, StoredValue, KIND_BRANCH, KIND_LEAF, PAGE_SIZE,
};
use super::{Error, Result};

/// Transaction ids of live snapshots, so the writer knows which freed pages
/// a reader may still reach.
#[derive(Default)]
pub(crate) struct Registry {
    live: Mutex<BTreeMap<u64, usize>>,
}

impl Registry {
    fn register(&self, txid: u64) {
        *self
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(txid)
            .or_default() += 1;
    }

    fn unregister(&self, txid: u64) {
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        let count = live
            .get_mut(&txid)
            .expect("unregistering an unknown snapshot");
        *count -= 1;
        if *count == 0 {
            live.remove(&txid);
        }
    }

    /// The oldest txid any live snapshot is pinned to.
    pub(crate) fn oldest(&self) -> Option<u64> {
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .next()
            .copied()
    }
}

/// One committed state: its meta and a mapping covering all its pages.
pub(crate) struct SnapInner {
    pub(crate) meta: Meta,
    map: Arc<Mmap>,
    registry: Arc<Registry>,
}

impl SnapInner {
    pub(crate) fn new(meta: Meta, map: Arc<Mmap>, registry: Arc<Registry>) -> Self {
        assert!(
            map.len() as u64 >= meta.page_count * PAGE_SIZE as u64,
            "mapping must cover every page of the snapshot"
        );
        registry.register(meta.txid);
        SnapInner {
            meta,
            map,
            registry,
        }
    }

    /// The bytes of `pages` pages from `first`, checked against the snapshot's extent.
    pub(crate) fn pages(&self, first: PageId, pages: u64) -> Result<&[u8]> {
        let end = first
            .checked_add(pages)
            .ok_or_else(|| Error::corrupt(first, "page run overflows"))?;
        if first < META_PAGES || end > self.meta.page_count {
            return Err(Error::corrupt(first, "page id outside the file"));
        }
        let start = first as usize * PAGE_SIZE;
        Ok(&self.map[start..end as usize * PAGE_SIZE])
    }

    pub(crate) fn page(&self, id: PageId) -> Result<&[u8]> {
        self.pages(id, 1)
    }

    /// Resolves a stored value to its bytes (overflow runs are contiguous in the map).
    pub(crate) fn value<'a>(&'a self, value: StoredValue<'a>) -> Result<&'a [u8]> {
        match value {
            StoredValue::Inline(v) => Ok(v),
            StoredValue::Overflow { first, len } => {
                let run = self.pages(first, page::overflow_pages(len))?;
                page::decode_overflow(first, run, len)
            }
        }
    }

    pub(crate) fn kind(&self, id: PageId) -> Result<u8> {
        Ok(page::header(id, self.page(id)?)?.kind)
    }

    /// Looks `key` up in the subtree rooted at page `id` (0 = empty tree).
    pub(crate) fn get_from(&self, mut id: PageId, key: &[u8]) -> Result<Option<&[u8]>> {
        if id == 0 {
            return Ok(None);
        }
        for _ in 0..MAX_DEPTH {
            match self.kind(id)? {
                KIND_BRANCH => {
                    let branch = BranchView::new(id, self.page(id)?)?;
                    id = branch.child(branch.route(key)?)?;
                }
                KIND_LEAF => {
                    let leaf = LeafView::new(id, self.page(id)?)?;
                    return match leaf.search(key)? {
                        Ok(i) => Ok(Some(self.value(leaf.entry(i)?.1)?)),
                        Err(_) => Ok(None),
                    };
                }
                _ => return Err(Error::corrupt(id, "expected a tree page")),
            }
        }
        Err(Error::corrupt(id, "tree deeper than any valid tree"))
    }
}

impl Drop for SnapInner {
    fn drop(&mut self) {
        self.registry.unregister(self.meta.txid);
    }
}

/// Bound on tree depth; a deeper path means a cycle in a corrupt file.
pub(crate) const MAX_DEPTH: usize = 64;

/// A consistent, read-only view of one commit. Cheap to clone, usable from
/// any thread; reads take no lock. While it lives, the pages it can reach
/// are never reused (see the module docs).
#[derive(Clone)]
pub struct Snapshot {
    pub(crate) inner: Arc<SnapInner>,
}

impl Snapshot {
    /// The commit this snapshot shows.
    pub fn txid(&self) -> u64 {
        self.inner.meta.txid
    }

    /// The caller's checkpoint stored with this commit.
    pub fn applied_index(&self) -> u64 {
        self.inner.meta.applied_index
    }

    /// Number of keys.
    pub fn len(&self) -> u64 {
        self.inner.meta.entry_count
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The value of `key`, borrowed from the mapping without copying.
    pub fn get(&self, key: &[u8]) -> Result<Option<&[u8]>> {
        self.inner.get_from(self.inner.meta.root, key)
    }

    /// Entries with keys within the bounds, in key order; also iterates backwards.
    pub fn range(&self, lower: Bound<&[u8]>, upper: Bound<&[u8]>) -> Range<'_> {
        Range {
            snap: &self.inner,
            lower: lower.map(<[u8]>::to_vec),
            upper: upper.map(<[u8]>::to_vec),
            front: None,
            back: None,
            last_front: None,
            last_back: None,
            done: false,
        }
    }

    /// Every entry in key order.
    pub fn iter(&self) -> Range<'_> {
        self.range(Bound::Unbounded, Bound::Unbounded)
    }
}

/// Which end of a subtree a cursor descends to.
#[derive(Clone, Copy)]
enum Edge {
    First,
    Last,
}

/// A position in the tree: `(branch page, child index)` per level, then
/// `(leaf page, entry index)`. `path` is empty once the cursor ran off the tree.
struct Cursor {
    path: Vec<(PageId, usize)>,
}

impl Cursor {
    /// Positions at the first entry >= `key` (`Edge::First`) or the last
    /// entry <= `key` (`Edge::Last`), or at the tree's end for an unbounded key.
    fn seek(snap: &SnapInner, key: Bound<&[u8]>, edge: Edge) -> Result<Cursor> {
        let mut cursor = Cursor { path: Vec::new() };
        let root = snap.meta.root;
        let key = match key {
            Bound::Unbounded => {
                if root != 0 {
                    cursor.descend(snap, root, edge)?;
                }
                return Ok(cursor);
            }
            Bound::Included(k) | Bound::Excluded(k) => k,
        };
        if root == 0 {
            return Ok(cursor);
        }
        let mut id = root;
        while snap.kind(id)? == KIND_BRANCH {
            let branch = BranchView::new(id, snap.page(id)?)?;
            let i = branch.route(key)?;
            cursor.push(id, i)?;
            id = branch.child(i)?;
        }
        let leaf = LeafView::new(id, snap.page(id)?)?;
        let (found, at) = match leaf.search(key)? {
            Ok(i) => (true, i),
            Err(i) => (false, i),
        };
        cursor.push(id, at)?;
        match edge {
            Edge::First if at == leaf.len() => cursor.step(snap, Edge::First)?,
            Edge::Last if !found => cursor.step(snap, Edge::Last)?,
            _ => {}
        }
        Ok(cursor)
    }

    fn push(&mut self, id: PageId, index: usize) -> Result<()> {
        if self.path.len() >= MAX_DEPTH {
            return Err(Error::corrupt(id, "tree deeper than any valid tree"));
        }
        self.path.push((id, index));
        Ok(())
    }

    /// Descends from `id` to the first or last entry of its subtree.
    fn descend(&mut self, snap: &SnapInner, mut id: PageId, edge: Edge) -> Result<()> {
        loop {
            match snap.kind(id)? {
                KIND_BRANCH => {
                    let branch = BranchView::new(id, snap.page(id)?)?;
                    let i = match edge {
                        Edge::First => 0,
                        Edge::Last => branch.len(),
                    };
                    self.push(id, i)?;
                    id = branch.child(i)?;
                }
                KIND_LEAF => {
                    let leaf = LeafView::new(id, snap.page(id)?)?;
                    if leaf.len() == 0 {
                        return Err(Error::corrupt(id, "empty leaf"));
                    }
                    let i = match edge {
                        Edge::First => 0,
                        Edge::Last => leaf.len() - 1,
                    };
                    return self.push(id, i);
                }
                _ => return Err(Error::corrupt(id, "expected a tree page")),
            }
        }
    }

    /// Moves to the next (`Edge::First` direction) or previous entry.
    fn step(&mut self, snap: &SnapInner, direction: Edge) -> Result<()> {
        let Some((leaf_id, i)) = self.path.pop() else {
            return Ok(());
        };
        let leaf = LeafView::new(leaf_id, snap.page(leaf_id)?)?;
        match direction {
            Edge::First if i + 1 < leaf.len() => return self.push(leaf_id, i + 1),
            Edge::Last if i > 0 && i <= leaf.len() => return self.push(leaf_id, i - 1),
            _ => {}
        }
        while let Some((id, i)) = self.path.pop() {
            let branch = BranchView::new(id, snap.page(id)?)?;
            let next = match direction {
                Edge::First => (i < branch.len()).then(|| i + 1),
                Edge::Last => i.checked_sub(1),
            };
            if let Some(next) = next {
                self.push(id, next)?;
                return self.descend(snap, branch.child(next)?, direction);
            }
        }
        Ok(())
    }

    fn current<'s>(&self, snap: &'s SnapInner) -> Result<Option<(&'s [u8], StoredValue<'s>)>> {
        let Some(&(id, i)) = self.path.last() else {
            return Ok(None);
        };
        let leaf = LeafView::new(id, snap.page(id)?)?;
        if i >= leaf.len() {
            return Err(Error::corrupt(id, "cursor past leaf end"));
        }
        leaf.entry(i).map(Some)
    }
}

/// Iterator over a key range of a snapshot; see [`Snapshot::range`].
pub struct Range<'s> {
    snap: &'s SnapInner,
    lower: Bound<Vec<u8>>,
    upper: Bound<Vec<u8>>,
    front: Option<Cursor>,
    back: Option<Cursor>,
    /// Keys last yielded from each end; the ends stop before crossing.
    last_front: Option<&'s [u8]>,
    last_back: Option<&'s [u8]>,
    done: bool,
}

fn below_upper(key: &[u8], upper: &Bound<Vec<u8>>) -> bool {
    match upper {
        Bound::Included(u) => key <= u.as_slice(),
        Bound::Excluded(u) => key < u.as_slice(),
        Bound::Unbounded => true,
    }
}

fn above_lower(key: &[u8], lower: &Bound<Vec<u8>>) -> bool {
    match lower {
        Bound::Included(l) => key >= l.as_slice(),
        Bound::Excluded(l) => key > l.as_slice(),
        Bound::Unbounded => true,
    }
}

impl<'s> Range<'s> {
    fn advance(&mut self, direction: Edge) -> Result<Option<(&'s [u8], &'s [u8])>> {
        let snap = self.snap;
        let slot = match direction {
            Edge::First => &mut self.front,
            Edge::Last => &mut self.back,
        };
        let cursor = match slot {
            Some(cursor) => {
                cursor.step(snap, direction)?;
                cursor
            }
            None => {
                let bound = match direction {
                    Edge::First => self.lower.as_ref().map(Vec::as_slice),
                    Edge::Last => self.upper.as_ref().map(Vec::as_slice),
                };
                let mut cursor = Cursor::seek(snap, bound, direction)?;
                // An excluded bound that exists in the tree is skipped once.
                if let (Bound::Excluded(b), Some((key, _))) = (bound, cursor.current(snap)?) {
                    if key == b {
                        cursor.step(snap, direction)?;
                    }
                }
                slot.insert(cursor)
            }
        };
        let Some((key, value)) = cursor.current(snap)? else {
            return Ok(None);
        };
        let in_range = match direction {
            Edge::First => below_upper(key, &self.upper) && self.last_back.is_none_or(|b| key < b),
            Edge::Last => above_lower(key, &self.lower) && self.last_front.is_none_or(|f| key > f),
        };
        if !in_range {
            return Ok(None);
        }
        match direction {
            Edge::First => self.last_front = Some(key),
            Edge::Last => self.last_back = Some(key),
        }
        Ok(Some((key, snap.value(value)?)))
    }

    fn next_from(&mut self, direction: Edge) -> Option<Result<(&'s [u8], &'s [u8])>> {
        if self.done {
            return None;
        }
        let item = self.advance(direction).transpose();
        if !matches!(item, Some(Ok(_))) {
            self.done = true;
        }
        item
    }
}

impl<'s> Iterator for Range<'s> {
    type Item = Result<(&'s [u8], &'s [u8])>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_from(Edge::First)
    }
}

impl DoubleEndedIterator for Range<'_> {
    fn next_back(&mut self) -> Option<Self::Item> {
        self.next_from(Edge::Last)
    }
}
