//! On-disk page layouts and their bounds-checked decoders.
//!
//! Every decoder here works on untrusted bytes: a garbage page yields
//! `Error::Corrupt`, never a panic or an out-of-bounds read.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::{Error, Result};

/// Size of every page, and the unit of file growth.
pub const PAGE_SIZE: usize = 4096;
/// Page number inside the file; byte offset is `id * PAGE_SIZE`.
pub type PageId = u64;

/// Common header at the start of every non-meta page.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(crate) struct PageHeader {
    /// crc32 of the page id and every page byte after this field.
    pub checksum: U32,
    pub kind: u8,
    pub reserved: u8,
    /// Leaf: entries. Branch: keys (children = keys + 1). Free list: ids.
    pub count: U16,
    /// Branch: leftmost child. Free list: next free-list page (0 = end).
    /// Overflow: value length in bytes.
    pub link: U64,
}

pub(crate) const HEADER_BYTES: usize = size_of::<PageHeader>();
/// Bytes usable for slots and entries in a branch or leaf page.
pub(crate) const BODY_BYTES: usize = PAGE_SIZE - HEADER_BYTES;
const SLOT_BYTES: usize = 2;

pub(crate) const KIND_META: u8 = 1;
pub(crate) const KIND_BRANCH: u8 = 2;
pub(crate) const KIND_LEAF: u8 = 3;
pub(crate) const KIND_OVERFLOW: u8 = 4;
pub(crate) const KIND_FREELIST: u8 = 5;

/// Leaf entry: header, key, then the inline value or an overflow page id.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct LeafEntryHeader {
    key_len: U16,
    flags: u8,
    value_len: U32,
}
const LEAF_ENTRY_BYTES: usize = size_of::<LeafEntryHeader>();
const FLAG_OVERFLOW: u8 = 1;
const OVERFLOW_REF_BYTES: usize = 8;

/// Branch entry: header then key; the child holds keys >= this key.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct BranchEntryHeader {
    key_len: U16,
    child: U64,
}
const BRANCH_ENTRY_BYTES: usize = size_of::<BranchEntryHeader>();

/// Largest encoded entry (slot included). Bounding entries to a quarter of
/// the body guarantees that halving an overfull node (at most two pages of
/// entries) yields halves that fit, and that two entries always fit.
pub(crate) const MAX_ENTRY_BYTES: usize = BODY_BYTES / 4;
/// Largest key accepted: a key plus an overflow reference is one entry.
pub const MAX_KEY_BYTES: usize = 1000;
const _: () =
    assert!(SLOT_BYTES + LEAF_ENTRY_BYTES + MAX_KEY_BYTES + OVERFLOW_REF_BYTES <= MAX_ENTRY_BYTES);
const _: () = assert!(SLOT_BYTES + BRANCH_ENTRY_BYTES + MAX_KEY_BYTES <= MAX_ENTRY_BYTES);
/// Largest value accepted (stored in an overflow run when it does not fit inline).
pub const MAX_VALUE_BYTES: usize = 32 << 20;
/// Free-list ids per free-list page.
pub(crate) const FREELIST_IDS_PER_PAGE: usize = BODY_BYTES / 8;

/// Checksum binding the content to its page id, so a page written to the
/// wrong place is detected as well as a torn or flipped one.
pub(crate) fn checksum(id: PageId, bytes: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&id.to_le_bytes());
    hasher.update(&bytes[4..]);
    hasher.finalize()
}

/// Writes the checksum of `bytes` (a page or an overflow run) into its first 4 bytes.
pub(crate) fn seal(id: PageId, bytes: &mut [u8]) {
    let sum = checksum(id, bytes);
    bytes[..4].copy_from_slice(&sum.to_le_bytes());
}

/// Verifies the checksum stored in the first 4 bytes.
pub(crate) fn verify(id: PageId, bytes: &[u8]) -> Result<()> {
    let stored = u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes"));
    if stored == checksum(id, bytes) {
        Ok(())
    } else {
        Err(Error::corrupt(id, "checksum mismatch"))
    }
}

pub(crate) fn header(id: PageId, bytes: &[u8]) -> Result<&PageHeader> {
    PageHeader::ref_from_prefix(bytes)
        .map(|(h, _)| h)
        .map_err(|_| Error::corrupt(id, "page shorter than header"))
}

/// Pages needed to hold an overflow value of `len` bytes behind its header.
pub(crate) fn overflow_pages(len: usize) -> u64 {
    (HEADER_BYTES + len).div_ceil(PAGE_SIZE) as u64
}

/// Whether a leaf entry keeps its value inline (else in an overflow run).
pub(crate) fn value_is_inline(key_len: usize, value_len: usize) -> bool {
    SLOT_BYTES + LEAF_ENTRY_BYTES + key_len + value_len <= MAX_ENTRY_BYTES
}

/// Encoded size of a leaf entry, slot included.
pub(crate) fn leaf_entry_bytes(key_len: usize, value_len: usize) -> usize {
    let value = if value_is_inline(key_len, value_len) {
        value_len
    } else {
        OVERFLOW_REF_BYTES
    };
    SLOT_BYTES + LEAF_ENTRY_BYTES + key_len + value
}

/// Encoded size of a branch entry, slot included.
pub(crate) fn branch_entry_bytes(key_len: usize) -> usize {
    SLOT_BYTES + BRANCH_ENTRY_BYTES + key_len
}

/// A leaf value as stored: inline bytes or a reference to an overflow run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StoredValue<'a> {
    Inline(&'a [u8]),
    Overflow { first: PageId, len: usize },
}

/// Slot directory shared by leaf and branch pages.
#[derive(Clone, Copy)]
struct Slotted<'a> {
    id: PageId,
    bytes: &'a [u8],
    count: usize,
}

impl<'a> Slotted<'a> {
    fn new(id: PageId, bytes: &'a [u8], kind: u8) -> Result<(Self, &'a PageHeader)> {
        if bytes.len() != PAGE_SIZE {
            return Err(Error::corrupt(id, "page has wrong length"));
        }
        let h = header(id, bytes)?;
        if h.kind != kind {
            return Err(Error::corrupt(id, "unexpected page kind"));
        }
        let count = usize::from(h.count.get());
        if HEADER_BYTES + count * SLOT_BYTES > PAGE_SIZE {
            return Err(Error::corrupt(id, "slot count exceeds page"));
        }
        Ok((Slotted { id, bytes, count }, h))
    }

    /// The bytes of entry `i`, from its offset to the end of the page.
    fn entry(&self, i: usize) -> Result<&'a [u8]> {
        assert!(i < self.count, "slot index out of range");
        let at = HEADER_BYTES + i * SLOT_BYTES;
        let offset = usize::from(u16::from_le_bytes([self.bytes[at], self.bytes[at + 1]]));
        if offset < HEADER_BYTES + self.count * SLOT_BYTES || offset >= PAGE_SIZE {
            return Err(Error::corrupt(self.id, "slot offset out of range"));
        }
        Ok(&self.bytes[offset..])
    }

    /// A stored key length, which no valid page exceeds: splitting relies on every entry
    /// being at most a quarter page, so a longer key from a damaged page must not reach a
    /// write (found by fuzzing, fuzz/regressions/btree_file/crash-ba6aae41-*).
    fn key_len(&self, stored: u16) -> Result<usize> {
        let len = usize::from(stored);
        if len > MAX_KEY_BYTES {
            return Err(Error::corrupt(self.id, "key longer than the maximum"));
        }
        Ok(len)
    }

    /// Splits `len` bytes off the front of `rest`, or reports corruption.
    fn take(&self, rest: &'a [u8], len: usize) -> Result<(&'a [u8], &'a [u8])> {
        if len > rest.len() {
            return Err(Error::corrupt(self.id, "entry runs past page end"));
        }
        Ok(rest.split_at(len))
    }
}

/// Read-only view of a leaf page.
#[derive(Clone, Copy)]
pub(crate) struct LeafView<'a> {
    slots: Slotted<'a>,
}

impl<'a> LeafView<'a> {
    pub(crate) fn new(id: PageId, bytes: &'a [u8]) -> Result<Self> {
        Ok(LeafView {
            slots: Slotted::new(id, bytes, KIND_LEAF)?.0,
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.slots.count
    }

    pub(crate) fn entry(&self, i: usize) -> Result<(&'a [u8], StoredValue<'a>)> {
        let s = &self.slots;
        let bytes = s.entry(i)?;
        let (h, rest) = LeafEntryHeader::ref_from_prefix(bytes)
            .map_err(|_| Error::corrupt(s.id, "leaf entry header past page end"))?;
        let (key, rest) = s.take(rest, s.key_len(h.key_len.get())?)?;
        let len = h.value_len.get() as usize;
        let value = match h.flags {
            0 => StoredValue::Inline(s.take(rest, len)?.0),
            FLAG_OVERFLOW => {
                let (first, _) = s.take(rest, OVERFLOW_REF_BYTES)?;
                let first = u64::from_le_bytes(first.try_into().expect("8 bytes"));
                StoredValue::Overflow { first, len }
            }
            _ => return Err(Error::corrupt(s.id, "unknown leaf entry flags")),
        };
        Ok((key, value))
    }

    pub(crate) fn key(&self, i: usize) -> Result<&'a [u8]> {
        Ok(self.entry(i)?.0)
    }

    /// Binary search: `Ok(i)` if found at `i`, `Err(i)` for the insert position.
    pub(crate) fn search(&self, key: &[u8]) -> Result<std::result::Result<usize, usize>> {
        let (mut lo, mut hi) = (0, self.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.key(mid)?.cmp(key) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Ok(Ok(mid)),
            }
        }
        Ok(Err(lo))
    }
}

/// Read-only view of a branch page: `len()` keys and `len() + 1` children.
#[derive(Clone, Copy)]
pub(crate) struct BranchView<'a> {
    slots: Slotted<'a>,
    leftmost: PageId,
}

impl<'a> BranchView<'a> {
    pub(crate) fn new(id: PageId, bytes: &'a [u8]) -> Result<Self> {
        let (slots, h) = Slotted::new(id, bytes, KIND_BRANCH)?;
        if slots.count == 0 {
            return Err(Error::corrupt(id, "branch without keys"));
        }
        Ok(BranchView {
            slots,
            leftmost: h.link.get(),
        })
    }

    /// Number of keys; there is one more child.
    pub(crate) fn len(&self) -> usize {
        self.slots.count
    }

    fn entry(&self, i: usize) -> Result<(&'a [u8], PageId)> {
        let s = &self.slots;
        let (h, rest) = BranchEntryHeader::ref_from_prefix(s.entry(i)?)
            .map_err(|_| Error::corrupt(s.id, "branch entry header past page end"))?;
        let (key, _) = s.take(rest, s.key_len(h.key_len.get())?)?;
        Ok((key, h.child.get()))
    }

    pub(crate) fn key(&self, i: usize) -> Result<&'a [u8]> {
        Ok(self.entry(i)?.0)
    }

    pub(crate) fn child(&self, i: usize) -> Result<PageId> {
        if i == 0 {
            Ok(self.leftmost)
        } else {
            Ok(self.entry(i - 1)?.1)
        }
    }

    /// Index of the child whose subtree may hold `key`: the number of keys <= `key`.
    pub(crate) fn route(&self, key: &[u8]) -> Result<usize> {
        let (mut lo, mut hi) = (0, self.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.key(mid)? <= key {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        Ok(lo)
    }
}

/// Builds one slotted page; entries are appended in key order.
pub(crate) struct PageBuilder {
    buf: Vec<u8>,
    count: usize,
    next_entry: usize,
}

impl PageBuilder {
    pub(crate) fn new(kind: u8, count: usize, link: u64) -> Self {
        assert!(
            HEADER_BYTES + count * SLOT_BYTES <= PAGE_SIZE,
            "too many slots"
        );
        let mut buf = vec![0u8; PAGE_SIZE];
        let h = PageHeader {
            checksum: U32::new(0),
            kind,
            reserved: 0,
            count: U16::new(u16::try_from(count).expect("slot count fits u16")),
            link: U64::new(link),
        };
        buf[..HEADER_BYTES].copy_from_slice(h.as_bytes());
        PageBuilder {
            buf,
            count: 0,
            next_entry: HEADER_BYTES + count * SLOT_BYTES,
        }
    }

    fn push(&mut self, parts: &[&[u8]]) {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        assert!(
            self.next_entry + len <= PAGE_SIZE,
            "entries overflow the page"
        );
        let slot = HEADER_BYTES + self.count * SLOT_BYTES;
        let offset = u16::try_from(self.next_entry).expect("offset fits u16");
        self.buf[slot..slot + SLOT_BYTES].copy_from_slice(&offset.to_le_bytes());
        for part in parts {
            self.buf[self.next_entry..self.next_entry + part.len()].copy_from_slice(part);
            self.next_entry += part.len();
        }
        self.count += 1;
    }

    pub(crate) fn push_leaf(&mut self, key: &[u8], value: StoredValue<'_>) {
        let key_len = U16::new(u16::try_from(key.len()).expect("key length fits u16"));
        match value {
            StoredValue::Inline(v) => {
                let h = LeafEntryHeader {
                    key_len,
                    flags: 0,
                    value_len: U32::new(v.len() as u32),
                };
                self.push(&[h.as_bytes(), key, v]);
            }
            StoredValue::Overflow { first, len } => {
                let h = LeafEntryHeader {
                    key_len,
                    flags: FLAG_OVERFLOW,
                    value_len: U32::new(len as u32),
                };
                self.push(&[h.as_bytes(), key, &first.to_le_bytes()]);
            }
        }
    }

    pub(crate) fn push_branch(&mut self, key: &[u8], child: PageId) {
        let key_len = U16::new(u16::try_from(key.len()).expect("key length fits u16"));
        let h = BranchEntryHeader {
            key_len,
            child: U64::new(child),
        };
        self.push(&[h.as_bytes(), key]);
    }

    /// Finishes the page: checks every announced slot was filled, seals it.
    pub(crate) fn finish(mut self, id: PageId) -> Vec<u8> {
        let announced = usize::from(u16::from_le_bytes([self.buf[6], self.buf[7]]));
        assert_eq!(self.count, announced, "slot count mismatch");
        seal(id, &mut self.buf);
        self.buf
    }
}

/// Encodes an overflow run (header + value, padded to whole pages), sealed.
pub(crate) fn encode_overflow(first: PageId, value: &[u8]) -> Vec<u8> {
    let pages = overflow_pages(value.len()) as usize;
    let mut buf = vec![0u8; pages * PAGE_SIZE];
    let h = PageHeader {
        checksum: U32::new(0),
        kind: KIND_OVERFLOW,
        reserved: 0,
        count: U16::new(0),
        link: U64::new(value.len() as u64),
    };
    buf[..HEADER_BYTES].copy_from_slice(h.as_bytes());
    buf[HEADER_BYTES..HEADER_BYTES + value.len()].copy_from_slice(value);
    seal(first, &mut buf);
    buf
}

/// The value bytes of an overflow run whose pages are `run` (header page first).
pub(crate) fn decode_overflow(first: PageId, run: &[u8], len: usize) -> Result<&[u8]> {
    let h = header(first, run)?;
    if h.kind != KIND_OVERFLOW || h.link.get() != len as u64 {
        return Err(Error::corrupt(
            first,
            "overflow header does not match its reference",
        ));
    }
    run.get(HEADER_BYTES..HEADER_BYTES + len)
        .ok_or_else(|| Error::corrupt(first, "overflow run shorter than its value"))
}

/// Encodes one free-list page holding `ids`, linked to `next`.
pub(crate) fn encode_freelist(id: PageId, ids: &[PageId], next: PageId) -> Vec<u8> {
    assert!(
        ids.len() <= FREELIST_IDS_PER_PAGE,
        "too many ids for one page"
    );
    let mut buf = vec![0u8; PAGE_SIZE];
    let h = PageHeader {
        checksum: U32::new(0),
        kind: KIND_FREELIST,
        reserved: 0,
        count: U16::new(ids.len() as u16),
        link: U64::new(next),
    };
    buf[..HEADER_BYTES].copy_from_slice(h.as_bytes());
    for (i, free) in ids.iter().enumerate() {
        let at = HEADER_BYTES + i * 8;
        buf[at..at + 8].copy_from_slice(&free.to_le_bytes());
    }
    seal(id, &mut buf);
    buf
}

/// Decodes a free-list page into its ids and the next page (0 = end).
pub(crate) fn decode_freelist(id: PageId, bytes: &[u8]) -> Result<(Vec<PageId>, PageId)> {
    verify(id, bytes)?;
    let h = header(id, bytes)?;
    let count = usize::from(h.count.get());
    if h.kind != KIND_FREELIST || count > FREELIST_IDS_PER_PAGE {
        return Err(Error::corrupt(id, "bad free-list page"));
    }
    let ids = bytes[HEADER_BYTES..HEADER_BYTES + count * 8]
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    Ok((ids, h.link.get()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Walks every decoder entry point over a page.
    fn decode_all(bytes: &[u8]) {
        if let Ok(leaf) = LeafView::new(7, bytes) {
            for i in 0..leaf.len() {
                let _ = leaf.entry(i);
            }
            let _ = leaf.search(b"probe");
        }
        if let Ok(branch) = BranchView::new(7, bytes) {
            for i in 0..=branch.len() {
                let _ = branch.child(i);
            }
            let _ = branch.route(b"probe");
        }
        let _ = decode_freelist(7, bytes);
        let _ = decode_overflow(7, bytes, 100);
        let _ = verify(7, bytes);
    }

    proptest! {
        #[test]
        fn garbage_never_panics(noise in prop::collection::vec(any::<u8>(), PAGE_SIZE), kind in 1u8..6, count in 0u16..600) {
            // Random bodies behind plausible headers reach the slot and entry decoders.
            let mut bytes = noise;
            bytes[4] = kind;
            bytes[6..8].copy_from_slice(&count.to_le_bytes());
            decode_all(&bytes);
        }
    }

    #[test]
    fn encoded_pages_round_trip() {
        let mut b = PageBuilder::new(KIND_LEAF, 2, 0);
        b.push_leaf(b"a", StoredValue::Inline(b"1"));
        b.push_leaf(
            b"b",
            StoredValue::Overflow {
                first: 9,
                len: 5000,
            },
        );
        let page = b.finish(3);
        verify(3, &page).unwrap();
        assert!(verify(4, &page).is_err(), "checksum binds the page id");
        let leaf = LeafView::new(3, &page).unwrap();
        assert_eq!(
            leaf.entry(0).unwrap(),
            (&b"a"[..], StoredValue::Inline(b"1"))
        );
        assert_eq!(
            leaf.entry(1).unwrap(),
            (
                &b"b"[..],
                StoredValue::Overflow {
                    first: 9,
                    len: 5000
                }
            )
        );
        assert_eq!(leaf.search(b"b").unwrap(), Ok(1));
        assert_eq!(leaf.search(b"c").unwrap(), Err(2));

        let mut b = PageBuilder::new(KIND_BRANCH, 1, 10);
        b.push_branch(b"m", 11);
        let page = b.finish(5);
        let branch = BranchView::new(5, &page).unwrap();
        assert_eq!(
            (branch.child(0).unwrap(), branch.child(1).unwrap()),
            (10, 11)
        );
        assert_eq!(
            (branch.route(b"a").unwrap(), branch.route(b"m").unwrap()),
            (0, 1)
        );
    }
}
