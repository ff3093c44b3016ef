//! The two meta pages (page 0 and page 1): the commit record of the file.

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::page::{self, PageId, KIND_META, PAGE_SIZE};

const MAGIC: u64 = u64::from_le_bytes(*b"ferrobt\0");
const FORMAT_VERSION: u32 = 1;

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct MetaPage {
    checksum: U32,
    kind: u8,
    reserved: [u8; 3],
    magic: U64,
    version: U32,
    page_size: U32,
    txid: U64,
    root: U64,
    freelist_head: U64,
    freelist_len: U64,
    page_count: U64,
    entry_count: U64,
    applied_index: U64,
}

/// The decoded content of a meta page: one committed state of the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Meta {
    /// Commit number; the meta is stored in slot `txid % 2`.
    pub txid: u64,
    /// Root page of the tree, 0 when the tree is empty.
    pub root: PageId,
    /// First free-list page, 0 when there is none.
    pub freelist_head: PageId,
    /// Free page ids listed in the free-list pages.
    pub freelist_len: u64,
    /// Pages in use or free; pages at or past this id hold nothing.
    pub page_count: u64,
    pub entry_count: u64,
    /// Opaque to the tree: the caller's checkpoint (the applied Raft index).
    pub applied_index: u64,
}

/// Pages 0 and 1 hold the metas; the first data page follows.
pub(crate) const META_PAGES: u64 = 2;

impl Meta {
    pub(crate) fn empty(txid: u64) -> Self {
        Meta {
            txid,
            root: 0,
            freelist_head: 0,
            freelist_len: 0,
            page_count: META_PAGES,
            entry_count: 0,
            applied_index: 0,
        }
    }

    pub(crate) fn slot(&self) -> PageId {
        self.txid % 2
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let m = MetaPage {
            checksum: U32::new(0),
            kind: KIND_META,
            reserved: [0; 3],
            magic: U64::new(MAGIC),
            version: U32::new(FORMAT_VERSION),
            page_size: U32::new(PAGE_SIZE as u32),
            txid: U64::new(self.txid),
            root: U64::new(self.root),
            freelist_head: U64::new(self.freelist_head),
            freelist_len: U64::new(self.freelist_len),
            page_count: U64::new(self.page_count),
            entry_count: U64::new(self.entry_count),
            applied_index: U64::new(self.applied_index),
        };
        let mut buf = vec![0u8; PAGE_SIZE];
        buf[..size_of::<MetaPage>()].copy_from_slice(m.as_bytes());
        page::seal(self.slot(), &mut buf);
        buf
    }

    /// Decodes the meta in `slot`; `None` when it is torn, foreign or from
    /// another format (the caller then relies on the other slot).
    pub(crate) fn decode(slot: PageId, bytes: &[u8]) -> Option<Meta> {
        if bytes.len() != PAGE_SIZE || page::verify(slot, bytes).is_err() {
            return None;
        }
        let (m, _) = MetaPage::ref_from_prefix(bytes).ok()?;
        let valid = m.kind == KIND_META
            && m.magic.get() == MAGIC
            && m.version.get() == FORMAT_VERSION
            && m.page_size.get() == PAGE_SIZE as u32
            && m.txid.get() % 2 == slot
            && m.page_count.get() >= META_PAGES;
        valid.then(|| Meta {
            txid: m.txid.get(),
            root: m.root.get(),
            freelist_head: m.freelist_head.get(),
            freelist_len: m.freelist_len.get(),
            page_count: m.page_count.get(),
            entry_count: m.entry_count.get(),
            applied_index: m.applied_index.get(),
        })
    }

    /// The newer of two decoded slots.
    pub(crate) fn newest(a: Option<Meta>, b: Option<Meta>) -> Option<Meta> {
        match (a, b) {
            (Some(a), Some(b)) => Some(if a.txid >= b.txid { a } else { b }),
            (a, b) => a.or(b),
        }
    }
}
