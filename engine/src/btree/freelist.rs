//! Page allocation and the persisted free list.
//!
//! In memory: `free` (reusable now) and `pending` (freed by a commit, keyed by
//! that commit's txid, reusable once no live snapshot is older than it). On
//! disk, a chain of free-list pages lists both: after a restart no reader
//! exists, so every listed page is reusable.

use std::collections::{BTreeMap, BTreeSet};

use super::meta::Meta;
use super::page::{self, PageId, FREELIST_IDS_PER_PAGE};
use super::snapshot::SnapInner;
use super::{Error, Result};

pub(crate) struct FreeList {
    free: BTreeSet<PageId>,
    pending: BTreeMap<u64, Vec<PageId>>,
    /// The pages holding the persisted list of the latest commit.
    list_pages: Vec<PageId>,
    /// Pages in use or listed; allocation past the free set extends this.
    pub(crate) page_count: u64,
}

/// The persisted list: where it starts and how many ids it holds.
pub(crate) struct Persisted {
    pub head: PageId,
    pub len: u64,
}

impl FreeList {
    /// Reads the free list of the committed state `snap`.
    pub(crate) fn load(snap: &SnapInner) -> Result<Self> {
        let meta: &Meta = &snap.meta;
        let mut free = BTreeSet::new();
        let mut list_pages = Vec::new();
        let mut next = meta.freelist_head;
        while next != 0 {
            if list_pages.len() as u64 > meta.page_count {
                return Err(Error::corrupt(next, "free-list chain has a cycle"));
            }
            list_pages.push(next);
            let (ids, following) = page::decode_freelist(next, snap.page(next)?)?;
            for id in ids {
                if id < super::meta::META_PAGES || id >= meta.page_count || !free.insert(id) {
                    return Err(Error::corrupt(next, "bad or duplicate free page id"));
                }
            }
            next = following;
        }
        if free.len() as u64 != meta.freelist_len {
            return Err(Error::corrupt(
                meta.freelist_head,
                "free-list length differs from meta",
            ));
        }
        Ok(FreeList {
            free,
            pending: BTreeMap::new(),
            list_pages,
            page_count: meta.page_count,
        })
    }

    /// Makes reusable the pages freed by commits no live snapshot predates:
    /// pages freed by commit T are reachable only from snapshots older than T.
    pub(crate) fn release(&mut self, oldest_live_txid: u64) {
        let still_pending = self.pending.split_off(&(oldest_live_txid + 1));
        for (_, pages) in std::mem::replace(&mut self.pending, still_pending) {
            self.free.extend(pages);
        }
    }

    /// Records pages that commit `txid` made unreachable.
    pub(crate) fn free_later(&mut self, txid: u64, pages: Vec<PageId>) {
        if !pages.is_empty() {
            self.pending.entry(txid).or_default().extend(pages);
        }
    }

    /// Allocates `count` contiguous pages: from the free set when a run that
    /// long exists there, else at the end of the file.
    pub(crate) fn alloc(&mut self, count: u64) -> PageId {
        assert!(count > 0, "allocating zero pages");
        let first = if count == 1 {
            self.free.pop_first()
        } else {
            self.take_run(count)
        };
        first.unwrap_or_else(|| {
            let first = self.page_count;
            self.page_count += count;
            first
        })
    }

    fn take_run(&mut self, count: u64) -> Option<PageId> {
        let mut run_start = 0;
        let mut run_len = 0;
        let mut found = None;
        for &id in &self.free {
            if run_len > 0 && id == run_start + run_len {
                run_len += 1;
            } else {
                run_start = id;
                run_len = 1;
            }
            if run_len == count {
                found = Some(run_start);
                break;
            }
        }
        let first = found?;
        for id in first..first + count {
            self.free.remove(&id);
        }
        Some(first)
    }

    /// Writes the list (free and pending ids) into fresh pages for commit
    /// `txid`; the previous list's pages become pending at `txid`.
    pub(crate) fn persist(&mut self, txid: u64, writes: &mut Vec<(PageId, Vec<u8>)>) -> Persisted {
        let old_pages = std::mem::take(&mut self.list_pages);
        self.free_later(txid, old_pages);
        // Taking list pages out of the free set shrinks the list, so allocate
        // until the pages taken can hold what remains.
        let mut pages = Vec::new();
        while (pages.len() * FREELIST_IDS_PER_PAGE) < self.listed_count() {
            pages.push(self.alloc(1));
        }
        let ids: Vec<PageId> = self
            .free
            .iter()
            .chain(self.pending.values().flatten())
            .copied()
            .collect();
        let mut chunks = ids.chunks(FREELIST_IDS_PER_PAGE);
        for (i, &id) in pages.iter().enumerate() {
            let next = pages.get(i + 1).copied().unwrap_or(0);
            writes.push((
                id,
                page::encode_freelist(id, chunks.next().unwrap_or(&[]), next),
            ));
        }
        assert!(chunks.next().is_none(), "free list pages too few");
        self.list_pages = pages;
        Persisted {
            head: self.list_pages.first().copied().unwrap_or(0),
            len: ids.len() as u64,
        }
    }

    fn listed_count(&self) -> usize {
        self.free.len() + self.pending.values().map(Vec::len).sum::<usize>()
    }
}
