//! Write transactions: copy-on-write edits in memory, written at commit.

use std::sync::{Arc, MutexGuard};

use super::node::{Branch, Child, Leaf, Node, Value};
use super::page::{
    self, BranchView, LeafView, PageBuilder, PageId, StoredValue, KIND_BRANCH, KIND_LEAF,
    MAX_KEY_BYTES, MAX_VALUE_BYTES,
};
use super::snapshot::SnapInner;
use super::{lock, Database, Error, Result, Writer};

/// The single write transaction of a database. Changes are visible to its
/// own `get` and to nobody else until `commit`; dropping it aborts.
pub struct WriteTxn<'db> {
    db: &'db Database,
    writer: MutexGuard<'db, Writer>,
    /// The commit this transaction builds on; clean pages are read from it.
    base: Arc<SnapInner>,
    root: Option<Child>,
    /// Committed pages this transaction made unreachable.
    freed: Vec<PageId>,
    entry_count: u64,
    applied_index: u64,
    /// An edit failed half-way (corrupt page): the in-memory tree may be
    /// inconsistent, so the transaction can only be aborted.
    failed: bool,
}

/// Read access to the committed tree and the list of replaced pages.
struct Edit<'t> {
    base: &'t SnapInner,
    freed: &'t mut Vec<PageId>,
}

impl Edit<'_> {
    /// The node behind `child`, copied out of its page on first access
    /// (that page becomes free at commit).
    fn dirty<'c>(&mut self, child: &'c mut Child) -> Result<&'c mut Node> {
        if let Child::Clean(id) = *child {
            let node = load_node(self.base, id)?;
            self.freed.push(id);
            *child = Child::Dirty(Box::new(node));
        }
        match child {
            Child::Dirty(node) => Ok(node),
            Child::Clean(_) => unreachable!("made dirty above"),
        }
    }

    /// Takes the node out of a child being unlinked from the tree.
    fn take(&mut self, child: Child) -> Result<Node> {
        match child {
            Child::Clean(id) => {
                let node = load_node(self.base, id)?;
                self.freed.push(id);
                Ok(node)
            }
            Child::Dirty(node) => Ok(*node),
        }
    }

    fn free_value(&mut self, value: Value) {
        if let Value::Overflow { first, len } = value {
            self.freed.extend(first..first + page::overflow_pages(len));
        }
    }

    /// Inserts into the subtree; returns (replaced?, appended at its end?).
    fn insert(&mut self, child: &mut Child, key: &[u8], value: Vec<u8>) -> Result<(bool, bool)> {
        match self.dirty(child)? {
            Node::Leaf(leaf) => {
                let old = leaf.upsert(key, Value::Bytes(value));
                let appended = leaf
                    .entries
                    .last()
                    .is_some_and(|(k, _)| k.as_slice() == key);
                let replaced = old.is_some();
                if let Some(old) = old {
                    self.free_value(old);
                }
                Ok((replaced, appended))
            }
            Node::Branch(branch) => {
                let i = branch.route(key);
                let (replaced, appended) = self.insert(&mut branch.children[i], key, value)?;
                let appended = appended && i + 1 == branch.children.len();
                split_child(branch, i, appended);
                Ok((replaced, appended))
            }
        }
    }

    /// Removes `key` (known to exist) from the subtree.
    fn remove(&mut self, child: &mut Child, key: &[u8]) -> Result<()> {
        match self.dirty(child)? {
            Node::Leaf(leaf) => {
                let old = leaf.remove(key).expect("caller checked the key exists");
                self.free_value(old);
            }
            Node::Branch(branch) => {
                let i = branch.route(key);
                self.remove(&mut branch.children[i], key)?;
                self.rebalance(branch, i)?;
            }
        }
        Ok(())
    }

    /// Merges child `i` into a sibling when a delete left it underfull.
    fn rebalance(&mut self, branch: &mut Branch, i: usize) -> Result<()> {
        let Child::Dirty(node) = &branch.children[i] else {
            return Ok(());
        };
        if !node.underfull() || branch.children.len() < 2 {
            return Ok(());
        }
        let left = if i + 1 < branch.children.len() {
            i
        } else {
            i - 1
        };
        let (sep, right) = branch.remove_pair(left);
        let right = self.take(right)?;
        let merged = self.dirty(&mut branch.children[left])?;
        merged.merge(sep, right);
        split_child(branch, left, false);
        Ok(())
    }
}

/// Splits child `i` of `branch` if it outgrew its page.
fn split_child(branch: &mut Branch, i: usize, packed: bool) {
    let Child::Dirty(node) = &mut branch.children[i] else {
        return;
    };
    if node.overfull() {
        let node = std::mem::replace(node.as_mut(), Node::Leaf(Leaf::new(Vec::new())));
        branch.replace_child(i, node.split(packed));
    }
}

pub(crate) fn load_node(base: &SnapInner, id: PageId) -> Result<Node> {
    let bytes = base.page(id)?;
    match page::header(id, bytes)?.kind {
        KIND_LEAF => Ok(Node::Leaf(Leaf::load(LeafView::new(id, bytes)?)?)),
        KIND_BRANCH => Ok(Node::Branch(Branch::load(BranchView::new(id, bytes)?)?)),
        _ => Err(Error::corrupt(id, "expected a tree page")),
    }
}

impl<'db> WriteTxn<'db> {
    pub(crate) fn new(
        db: &'db Database,
        writer: MutexGuard<'db, Writer>,
        base: Arc<SnapInner>,
    ) -> Self {
        let meta = base.meta;
        WriteTxn {
            db,
            writer,
            base,
            root: (meta.root != 0).then_some(Child::Clean(meta.root)),
            freed: Vec::new(),
            entry_count: meta.entry_count,
            applied_index: meta.applied_index,
            failed: false,
        }
    }

    /// The value of `key` as this transaction sees it (copied).
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let mut child = match &self.root {
            None => return Ok(None),
            Some(child) => child,
        };
        loop {
            match child {
                Child::Clean(id) => return Ok(self.base.get_from(*id, key)?.map(<[u8]>::to_vec)),
                Child::Dirty(node) => match node.as_ref() {
                    Node::Branch(b) => child = &b.children[b.route(key)],
                    Node::Leaf(l) => return self.leaf_value(l, key),
                },
            }
        }
    }

    fn leaf_value(&self, leaf: &Leaf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let Ok(i) = leaf
            .entries
            .binary_search_by(|(k, _)| k.as_slice().cmp(key))
        else {
            return Ok(None);
        };
        match &leaf.entries[i].1 {
            Value::Bytes(b) => Ok(Some(b.clone())),
            Value::Overflow { first, len } => {
                let stored = StoredValue::Overflow {
                    first: *first,
                    len: *len,
                };
                Ok(Some(self.base.value(stored)?.to_vec()))
            }
        }
    }

    /// Inserts or replaces `key`.
    pub fn insert(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        if key.len() > MAX_KEY_BYTES {
            return Err(Error::KeyTooLarge { len: key.len() });
        }
        if value.len() > MAX_VALUE_BYTES {
            return Err(Error::ValueTooLarge { len: value.len() });
        }
        let mut root = self
            .root
            .take()
            .unwrap_or_else(|| Child::Dirty(Box::new(Node::Leaf(Leaf::new(Vec::new())))));
        let mut edit = Edit {
            base: &self.base,
            freed: &mut self.freed,
        };
        let result = edit.insert(&mut root, key, value.to_vec());
        if let Ok((replaced, appended)) = result {
            self.entry_count += u64::from(!replaced);
            root = grow_root(root, appended);
        }
        self.root = Some(root);
        self.failed |= result.is_err();
        result.map(|_| ())
    }

    /// Removes `key`; returns whether it existed.
    pub fn remove(&mut self, key: &[u8]) -> Result<bool> {
        if self.get(key)?.is_none() {
            return Ok(false);
        }
        let mut root = self
            .root
            .take()
            .expect("a key exists, so the tree has a root");
        let mut edit = Edit {
            base: &self.base,
            freed: &mut self.freed,
        };
        let result = edit.remove(&mut root, key);
        if result.is_ok() {
            self.entry_count -= 1;
        }
        self.root = shrink_root(root);
        self.failed |= result.is_err();
        result.map(|_| true)
    }

    /// Stores the caller's checkpoint (e.g. the applied Raft index) with this commit.
    pub fn set_applied_index(&mut self, index: u64) {
        self.applied_index = index;
    }

    /// Makes the changes durable and visible to new snapshots.
    pub fn commit(mut self) -> Result<()> {
        if self.failed {
            return Err(Error::TxnFailed);
        }
        let unchanged = self.freed.is_empty()
            && matches!(self.root, None | Some(Child::Clean(_)))
            && self.applied_index == self.base.meta.applied_index;
        if unchanged {
            return Ok(());
        }
        let root = self.root.take();
        let freed = std::mem::take(&mut self.freed);
        let snap = self.writer.commit(
            &self.base,
            root,
            freed,
            self.entry_count,
            self.applied_index,
        )?;
        *lock(&self.db.current) = Arc::new(snap);
        Ok(())
    }

    /// Discards the changes (same as dropping the transaction).
    pub fn abort(self) {}
}

/// Adds a level when the root outgrew its page.
fn grow_root(root: Child, packed: bool) -> Child {
    let Child::Dirty(node) = root else {
        return root;
    };
    if !node.overfull() {
        return Child::Dirty(node);
    }
    let mut branch = Branch::new(Vec::new(), vec![Child::Dirty(node)]);
    split_child(&mut branch, 0, packed);
    Child::Dirty(Box::new(Node::Branch(branch)))
}

/// Drops levels with a single child and an empty root leaf.
fn shrink_root(mut root: Child) -> Option<Child> {
    loop {
        let Child::Dirty(node) = root else {
            return Some(root);
        };
        match *node {
            Node::Leaf(leaf) if leaf.entries.is_empty() => return None,
            Node::Branch(mut b) if b.keys.is_empty() => root = b.children.pop().expect("one child"),
            node => return Some(Child::Dirty(Box::new(node))),
        }
    }
}

/// Writes a dirty subtree to fresh pages (children first); returns its page.
pub(crate) fn write_node(
    node: Node,
    alloc: &mut impl FnMut(u64) -> PageId,
    writes: &mut Vec<(PageId, Vec<u8>)>,
) -> PageId {
    let (id, bytes) = match node {
        Node::Leaf(leaf) => {
            let mut stored = Vec::with_capacity(leaf.entries.len());
            for (key, value) in &leaf.entries {
                stored.push(store_value(key, value, alloc, writes));
            }
            let id = alloc(1);
            let mut b = PageBuilder::new(KIND_LEAF, leaf.entries.len(), 0);
            for ((key, _), value) in leaf.entries.iter().zip(&stored) {
                b.push_leaf(key, value.as_stored());
            }
            (id, b.finish(id))
        }
        Node::Branch(branch) => {
            let children: Vec<PageId> = branch
                .children
                .into_iter()
                .map(|c| match c {
                    Child::Clean(id) => id,
                    Child::Dirty(n) => write_node(*n, alloc, writes),
                })
                .collect();
            let id = alloc(1);
            let mut b = PageBuilder::new(KIND_BRANCH, branch.keys.len(), children[0]);
            for (key, child) in branch.keys.iter().zip(&children[1..]) {
                b.push_branch(key, *child);
            }
            (id, b.finish(id))
        }
    };
    writes.push((id, bytes));
    id
}

/// How a value will be stored; big new values get an overflow run here.
enum Placed<'v> {
    Inline(&'v [u8]),
    Overflow { first: PageId, len: usize },
}

impl Placed<'_> {
    fn as_stored(&self) -> StoredValue<'_> {
        match self {
            Placed::Inline(v) => StoredValue::Inline(v),
            Placed::Overflow { first, len } => StoredValue::Overflow {
                first: *first,
                len: *len,
            },
        }
    }
}

fn store_value<'v>(
    key: &[u8],
    value: &'v Value,
    alloc: &mut impl FnMut(u64) -> PageId,
    writes: &mut Vec<(PageId, Vec<u8>)>,
) -> Placed<'v> {
    match value {
        Value::Overflow { first, len } => Placed::Overflow {
            first: *first,
            len: *len,
        },
        Value::Bytes(v) if page::value_is_inline(key.len(), v.len()) => Placed::Inline(v),
        Value::Bytes(v) => {
            let first = alloc(page::overflow_pages(v.len()));
            writes.push((first, page::encode_overflow(first, v)));
            Placed::Overflow {
                first,
                len: v.len(),
            }
        }
    }
}
