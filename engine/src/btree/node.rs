//! In-memory nodes of a write transaction: pages copied out of the committed
//! tree on first modification, written to fresh pages at commit.

use super::page::{
    branch_entry_bytes, leaf_entry_bytes, BranchView, LeafView, PageId, StoredValue, BODY_BYTES,
};
use super::Result;

/// A leaf value in a dirty leaf.
pub(crate) enum Value {
    /// New or inline bytes; stored inline or in a new overflow run at commit.
    Bytes(Vec<u8>),
    /// An existing, committed overflow run, kept as is.
    Overflow { first: PageId, len: usize },
}

impl Value {
    fn len(&self) -> usize {
        match self {
            Value::Bytes(b) => b.len(),
            Value::Overflow { len, .. } => *len,
        }
    }
}

pub(crate) enum Child {
    Clean(PageId),
    Dirty(Box<Node>),
}

pub(crate) struct Leaf {
    pub entries: Vec<(Vec<u8>, Value)>,
    /// Encoded size of the entries (slots included), header excluded.
    size_bytes: usize,
}

/// `children.len() == keys.len() + 1`; child `i + 1` holds keys >= `keys[i]`.
pub(crate) struct Branch {
    pub keys: Vec<Vec<u8>>,
    pub children: Vec<Child>,
    size_bytes: usize,
}

pub(crate) enum Node {
    Leaf(Leaf),
    Branch(Branch),
}

/// A node smaller than this after a delete is merged with a sibling.
const MIN_FILL_BYTES: usize = BODY_BYTES / 4;

fn leaf_entry_size(key: &[u8], value: &Value) -> usize {
    leaf_entry_bytes(key.len(), value.len())
}

impl Leaf {
    pub(crate) fn new(entries: Vec<(Vec<u8>, Value)>) -> Self {
        let size_bytes = entries.iter().map(|(k, v)| leaf_entry_size(k, v)).sum();
        Leaf {
            entries,
            size_bytes,
        }
    }

    pub(crate) fn load(view: LeafView<'_>) -> Result<Self> {
        let mut entries = Vec::with_capacity(view.len());
        for i in 0..view.len() {
            let (key, value) = view.entry(i)?;
            let value = match value {
                StoredValue::Inline(v) => Value::Bytes(v.to_vec()),
                StoredValue::Overflow { first, len } => Value::Overflow { first, len },
            };
            entries.push((key.to_vec(), value));
        }
        Ok(Leaf::new(entries))
    }

    /// Inserts or replaces; returns the replaced value.
    pub(crate) fn upsert(&mut self, key: &[u8], value: Value) -> Option<Value> {
        self.size_bytes += leaf_entry_size(key, &value);
        match self
            .entries
            .binary_search_by(|(k, _)| k.as_slice().cmp(key))
        {
            Ok(i) => {
                let old = std::mem::replace(&mut self.entries[i].1, value);
                self.size_bytes -= leaf_entry_size(key, &old);
                Some(old)
            }
            Err(i) => {
                self.entries.insert(i, (key.to_vec(), value));
                None
            }
        }
    }

    pub(crate) fn remove(&mut self, key: &[u8]) -> Option<Value> {
        let i = self
            .entries
            .binary_search_by(|(k, _)| k.as_slice().cmp(key))
            .ok()?;
        let (k, v) = self.entries.remove(i);
        self.size_bytes -= leaf_entry_size(&k, &v);
        Some(v)
    }

    /// Splits off the entries from `at` on.
    fn split_off(&mut self, at: usize) -> Leaf {
        let right = Leaf::new(self.entries.split_off(at));
        self.size_bytes -= right.size_bytes;
        right
    }

    fn entry_sizes(&self) -> Vec<usize> {
        self.entries
            .iter()
            .map(|(k, v)| leaf_entry_size(k, v))
            .collect()
    }
}

impl Branch {
    pub(crate) fn new(keys: Vec<Vec<u8>>, children: Vec<Child>) -> Self {
        assert_eq!(
            children.len(),
            keys.len() + 1,
            "branch needs one more child than keys"
        );
        let size_bytes = keys.iter().map(|k| branch_entry_bytes(k.len())).sum();
        Branch {
            keys,
            children,
            size_bytes,
        }
    }

    pub(crate) fn load(view: BranchView<'_>) -> Result<Self> {
        let mut keys = Vec::with_capacity(view.len());
        let mut children = Vec::with_capacity(view.len() + 1);
        children.push(Child::Clean(view.child(0)?));
        for i in 0..view.len() {
            keys.push(view.key(i)?.to_vec());
            children.push(Child::Clean(view.child(i + 1)?));
        }
        Ok(Branch::new(keys, children))
    }

    /// Index of the child whose subtree may hold `key`.
    pub(crate) fn route(&self, key: &[u8]) -> usize {
        self.keys.partition_point(|k| k.as_slice() <= key)
    }

    /// Replaces child `i` by `pieces` (the result of splitting it).
    pub(crate) fn replace_child(&mut self, i: usize, pieces: Vec<(Vec<u8>, Node)>) {
        let mut pieces = pieces.into_iter();
        let (_, first) = pieces.next().expect("at least one piece");
        self.children[i] = Child::Dirty(Box::new(first));
        for (offset, (sep, node)) in pieces.enumerate() {
            self.size_bytes += branch_entry_bytes(sep.len());
            self.keys.insert(i + offset, sep);
            self.children
                .insert(i + offset + 1, Child::Dirty(Box::new(node)));
        }
    }

    /// Removes `keys[i]` and `children[i + 1]`, returning them.
    pub(crate) fn remove_pair(&mut self, i: usize) -> (Vec<u8>, Child) {
        let key = self.keys.remove(i);
        self.size_bytes -= branch_entry_bytes(key.len());
        (key, self.children.remove(i + 1))
    }

    /// Splits at key `at`: that key moves up, the keys after it go right.
    fn split_off(&mut self, at: usize) -> (Vec<u8>, Branch) {
        let right = Branch::new(self.keys.split_off(at + 1), self.children.split_off(at + 1));
        let sep = self.keys.pop().expect("split key");
        self.size_bytes -= right.size_bytes + branch_entry_bytes(sep.len());
        (sep, right)
    }

    fn entry_sizes(&self) -> Vec<usize> {
        self.keys
            .iter()
            .map(|k| branch_entry_bytes(k.len()))
            .collect()
    }
}

impl Node {
    /// Encoded body size (slots and entries, header excluded).
    pub(crate) fn size_bytes(&self) -> usize {
        match self {
            Node::Leaf(l) => l.size_bytes,
            Node::Branch(b) => b.size_bytes,
        }
    }

    pub(crate) fn overfull(&self) -> bool {
        self.size_bytes() > BODY_BYTES
    }

    pub(crate) fn underfull(&self) -> bool {
        self.size_bytes() < MIN_FILL_BYTES
    }

    /// Splits an overfull node into pieces that each fit a page. The first
    /// piece keeps the node's place (its separator is empty); every other
    /// piece comes with the separator key its parent must hold.
    ///
    /// `packed` fills the left piece completely, as for ascending appends,
    /// so bulk loads in key order produce full pages rather than half ones.
    pub(crate) fn split(self, packed: bool) -> Vec<(Vec<u8>, Node)> {
        let mut out = Vec::new();
        self.split_into(Vec::new(), packed, &mut out);
        out
    }

    fn split_into(mut self, sep: Vec<u8>, packed: bool, out: &mut Vec<(Vec<u8>, Node)>) {
        if !self.overfull() {
            out.push((sep, self));
            return;
        }
        let (right_sep, right) = match &mut self {
            Node::Leaf(l) => {
                let at = split_index(&l.entry_sizes(), packed, 1);
                let right = l.split_off(at);
                (right.entries[0].0.clone(), Node::Leaf(right))
            }
            Node::Branch(b) => {
                let at = split_index(&b.entry_sizes(), packed, 2);
                let (sep, right) = b.split_off(at);
                (sep, Node::Branch(right))
            }
        };
        self.split_into(sep, packed, out);
        right.split_into(right_sep, packed, out);
    }

    /// Merges `right` (the next sibling, separated by `sep`) into `self`.
    pub(crate) fn merge(&mut self, sep: Vec<u8>, right: Node) {
        match (self, right) {
            (Node::Leaf(l), Node::Leaf(r)) => {
                l.size_bytes += r.size_bytes;
                l.entries.extend(r.entries);
            }
            (Node::Branch(l), Node::Branch(r)) => {
                l.size_bytes += r.size_bytes + branch_entry_bytes(sep.len());
                l.keys.push(sep);
                l.keys.extend(r.keys);
                l.children.extend(r.children);
            }
            _ => panic!("merging a leaf with a branch: tree depth is not uniform"),
        }
    }
}

/// Where to split entries of the given sizes: the left part ends before the
/// returned index. `min_right` entries stay right of it (a branch split moves
/// the entry at the index up, so it needs two).
fn split_index(sizes: &[usize], packed: bool, min_right: usize) -> usize {
    assert!(sizes.len() > min_right, "overfull node has too few entries");
    let total: usize = sizes.iter().sum();
    let target = if packed { BODY_BYTES } else { total / 2 };
    let mut left = 0;
    let mut at = 0;
    while at < sizes.len() && left + sizes[at] <= target {
        left += sizes[at];
        at += 1;
    }
    at.clamp(1, sizes.len() - min_right)
}
