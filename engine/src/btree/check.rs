//! Whole-file verification and statistics.

use super::meta::META_PAGES;
use super::page::{self, BranchView, LeafView, PageId, StoredValue, KIND_BRANCH, KIND_LEAF};
use super::snapshot::{SnapInner, MAX_DEPTH};
use super::{lock, Database, Error, Result};

/// Size and shape of the latest commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stats {
    pub txid: u64,
    /// Pages in use or free (the file may be longer, preallocated).
    pub page_count: u64,
    pub free_pages: u64,
    /// Levels from root to leaf; 0 for an empty tree.
    pub depth: u32,
    pub entries: u64,
    pub file_size_bytes: u64,
    pub applied_index: u64,
}

impl Database {
    /// Statistics of the latest commit.
    pub fn stats(&self) -> Result<Stats> {
        let snap = self.snapshot();
        let meta = snap.inner.meta;
        Ok(Stats {
            txid: meta.txid,
            page_count: meta.page_count,
            free_pages: meta.freelist_len,
            depth: depth(&snap.inner)?,
            entries: meta.entry_count,
            file_size_bytes: std::fs::metadata(&self.path)?.len(),
            applied_index: meta.applied_index,
        })
    }

    /// Verifies the latest commit: every checksum, page kinds, key order and
    /// separator bounds, uniform leaf depth, the entry count, and that every
    /// page is exactly one of meta, tree, free-list or free. Holds the write
    /// lock so that no commit reuses free pages meanwhile.
    pub fn check(&self) -> Result<()> {
        let _writer = lock(&self.writer);
        let snap = self.snapshot();
        Checker::new(&snap.inner).run()
    }
}

fn depth(snap: &SnapInner) -> Result<u32> {
    let mut id = snap.meta.root;
    let mut depth = 0;
    while id != 0 {
        depth += 1;
        if depth as usize > MAX_DEPTH {
            return Err(Error::corrupt(id, "tree deeper than any valid tree"));
        }
        id = match snap.kind(id)? {
            KIND_BRANCH => BranchView::new(id, snap.page(id)?)?.child(0)?,
            _ => 0,
        };
    }
    Ok(depth)
}

struct Checker<'s> {
    snap: &'s SnapInner,
    /// Which pages have been accounted for.
    seen: Vec<bool>,
    entries: u64,
    leaf_depth: Option<usize>,
}

impl<'s> Checker<'s> {
    fn new(snap: &'s SnapInner) -> Self {
        let mut seen = vec![false; snap.meta.page_count as usize];
        seen[..META_PAGES as usize].fill(true);
        Checker {
            snap,
            seen,
            entries: 0,
            leaf_depth: None,
        }
    }

    fn run(mut self) -> Result<()> {
        let meta = self.snap.meta;
        if meta.root != 0 {
            self.node(meta.root, None, None, 1)?;
        }
        if self.entries != meta.entry_count {
            return Err(Error::corrupt(meta.root, "entry count differs from meta"));
        }
        self.free_list()?;
        match self.seen.iter().position(|s| !s) {
            Some(leaked) => Err(Error::corrupt(
                leaked as PageId,
                "page neither used nor free",
            )),
            None => Ok(()),
        }
    }

    /// Accounts for `pages` pages from `first`; each may be claimed once.
    fn claim(&mut self, first: PageId, pages: u64) -> Result<()> {
        for id in first..first.saturating_add(pages) {
            match self.seen.get_mut(id as usize) {
                Some(seen) if !*seen => *seen = true,
                Some(_) => return Err(Error::corrupt(id, "page reachable twice")),
                None => return Err(Error::corrupt(id, "page id outside the file")),
            }
        }
        Ok(())
    }

    /// Checks the subtree at `id`, whose keys must lie in `[lower, upper)`.
    fn node(
        &mut self,
        id: PageId,
        lower: Option<&'s [u8]>,
        upper: Option<&'s [u8]>,
        depth: usize,
    ) -> Result<()> {
        if depth > MAX_DEPTH {
            return Err(Error::corrupt(id, "tree deeper than any valid tree"));
        }
        self.claim(id, 1)?;
        let bytes = self.snap.page(id)?;
        page::verify(id, bytes)?;
        match page::header(id, bytes)?.kind {
            KIND_LEAF => self.leaf(LeafView::new(id, bytes)?, id, lower, upper, depth),
            KIND_BRANCH => self.branch(BranchView::new(id, bytes)?, id, lower, upper, depth),
            _ => Err(Error::corrupt(id, "expected a tree page")),
        }
    }

    fn leaf(
        &mut self,
        leaf: LeafView<'s>,
        id: PageId,
        lower: Option<&[u8]>,
        upper: Option<&[u8]>,
        depth: usize,
    ) -> Result<()> {
        if *self.leaf_depth.get_or_insert(depth) != depth {
            return Err(Error::corrupt(id, "leaves at different depths"));
        }
        if leaf.len() == 0 {
            return Err(Error::corrupt(id, "empty leaf"));
        }
        let mut previous = lower;
        for i in 0..leaf.len() {
            let (key, value) = leaf.entry(i)?;
            check_order(id, previous, key, i == 0)?;
            previous = Some(key);
            if let StoredValue::Overflow { first, len } = value {
                let pages = page::overflow_pages(len);
                self.claim(first, pages)?;
                let run = self.snap.pages(first, pages)?;
                page::verify(first, run)?;
                page::decode_overflow(first, run, len)?;
            }
        }
        if let (Some(last), Some(upper)) = (previous, upper) {
            if last >= upper {
                return Err(Error::corrupt(id, "key beyond its separator"));
            }
        }
        self.entries += leaf.len() as u64;
        Ok(())
    }

    fn branch(
        &mut self,
        branch: BranchView<'s>,
        id: PageId,
        lower: Option<&'s [u8]>,
        upper: Option<&'s [u8]>,
        depth: usize,
    ) -> Result<()> {
        let mut previous = lower;
        for i in 0..branch.len() {
            let key = branch.key(i)?;
            check_order(id, previous, key, false)?;
            if upper.is_some_and(|u| key >= u) {
                return Err(Error::corrupt(id, "separator beyond its parent's"));
            }
            self.node(branch.child(i)?, previous, Some(key), depth + 1)?;
            previous = Some(key);
        }
        self.node(branch.child(branch.len())?, previous, upper, depth + 1)
    }

    fn free_list(&mut self) -> Result<()> {
        let mut next = self.snap.meta.freelist_head;
        let mut listed = 0;
        while next != 0 {
            self.claim(next, 1)?;
            let (ids, following) = page::decode_freelist(next, self.snap.page(next)?)?;
            for free in ids {
                self.claim(free, 1)?;
                listed += 1;
            }
            next = following;
        }
        if listed != self.snap.meta.freelist_len {
            return Err(Error::corrupt(
                self.snap.meta.freelist_head,
                "free-list length differs from meta",
            ));
        }
        Ok(())
    }
}

/// Keys ascend strictly; the first key of a subtree may equal its lower bound.
fn check_order(
    id: PageId,
    previous: Option<&[u8]>,
    key: &[u8],
    first_may_equal: bool,
) -> Result<()> {
    match previous {
        Some(p) if key < p || (key == p && !first_may_equal) => {
            Err(Error::corrupt(id, "keys out of order"))
        }
        _ => Ok(()),
    }
}
