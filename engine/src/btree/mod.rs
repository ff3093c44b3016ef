//! Copy-on-write B+tree in one file: the per-shard backend (ordered byte
//! keys to byte values), in the family of LMDB and redb.
//!
//! # File format
//!
//! The file is an array of 4096-byte pages; page `n` starts at byte
//! `n * 4096`. All integers are little-endian. Every page but the metas
//! starts with a 16-byte header: `checksum: u32` (crc32 of the page id
//! followed by every page byte after this field), `kind: u8`, `reserved: u8`,
//! `count: u16`, `link: u64`.
//!
//! * **Meta pages** (pages 0 and 1): checksum, kind = 1, magic `ferrobt\0`,
//!   format version, page size, `txid`, root page (0 = empty tree), first
//!   free-list page, number of free ids, page count, entry count and the
//!   caller's `applied_index`. Commit `txid` is written to page `txid % 2`,
//!   so a commit overwrites the older meta and never the newer one. On open
//!   both are decoded and the valid one with the larger txid wins: a torn
//!   meta write fails its checksum and the previous commit is used.
//! * **Branch** (kind 2): `count` keys, `count + 1` children; `link` is the
//!   leftmost child. After the header come `count` u16 slot offsets, then
//!   entries `key_len: u16, child: u64, key`. Child `i + 1` holds the keys
//!   `>= key i`.
//! * **Leaf** (kind 3): `count` slots, then entries
//!   `key_len: u16, flags: u8, value_len: u32, key, value` where the value is
//!   inline (flags 0) or, for flags 1, an 8-byte id of an overflow run.
//! * **Overflow run** (kind 4): consecutive pages holding one large value:
//!   header (`link` = value length; checksum over the whole run) then bytes.
//! * **Free list** (kind 5): a chain (`link` = next page, 0 = end) of pages
//!   listing `count` free page ids each.
//!
//! Pages `0..page_count` are partitioned exactly into the two metas, the
//! pages reachable from the root, the free-list pages and the listed free
//! pages; [`Database::check`] verifies this, every checksum, key order and
//! separator bounds. Readers decode pages with bounds checks (garbage gives
//! [`Error::Corrupt`], never a panic) but do not verify checksums on the hot
//! path.
//!
//! Limits: keys up to [`MAX_KEY_BYTES`] (1000) bytes, values up to
//! [`MAX_VALUE_BYTES`] (32 MiB). An entry is at most a quarter of a page, so
//! halving an overfull node always yields nodes that fit; longer values go to
//! overflow runs.
//!
//! # Commit protocol
//!
//! A write transaction copies each page it changes into memory and frees the
//! original; at commit the changed nodes are written to pages allocated from
//! the free list (or the end of the file), the free list is written to fresh
//! pages, then `fdatasync`, then the meta page for the new txid, then
//! `fdatasync` again, then the new root is published to new snapshots. A
//! crash before the meta write is durable leaves the previous meta, whose
//! pages were not touched: the writer only writes pages free in the previous
//! commit, and pages freed by the commit being written stay untouched until a
//! later commit (they are still reachable from the fallback meta).
//!
//! # Why lock-free mmap reads are sound
//!
//! A [`Snapshot`] holds an `Arc` of the mapping that covered the file when
//! its commit was published, and the commit's meta (root, page count).
//!
//! 1. *A reader never sees a page change under it.* A reader only follows
//!    pages reachable from its root. Such a page was fully written and
//!    fdatasync'd before the root was published (the publication goes through
//!    a mutex, which orders the writes before the reader's loads). The writer
//!    writes only pages taken from the free set; a page freed by commit `T`
//!    is reachable only from snapshots older than `T`, and enters the free set
//!    only once the registry of live snapshot txids has no txid below `T`.
//!    Snapshots register before they are published and unregister when the
//!    last clone drops, so no live snapshot can reach a page being written.
//! 2. *Remapping is safe.* When a commit grows the file past the mapping, a
//!    new, larger mapping is created for later snapshots; older snapshots
//!    keep their own mapping alive through the `Arc`. Each mapping stays
//!    valid because the file is never shrunk while mapped: only
//!    [`Database::compact_file`] shrinks the data, by writing a new file and
//!    renaming it over the old one. Snapshots of the old file keep reading
//!    it: the rename unlinks its name, not its inode, which lives (with its
//!    pages) while a mapping of it does, and nothing writes to it any more
//!    (the writer moves to the new file). Its disk space returns when the
//!    last such snapshot drops.
//! 3. *Reads cannot run past the mapping.* Every page id is checked against
//!    the snapshot's page count, and the mapping covers at least that many
//!    pages (asserted when the snapshot is created).
//!
//! The writer is single (a mutex); snapshots are `Send + Sync + Clone` and
//! take no lock to read. The free list is rewritten in full at each commit
//! (cost proportional to the free pages; `compact_file` bounds it).

mod check;
mod freelist;
mod io;
mod meta;
mod node;
mod page;
mod snapshot;
mod txn;

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use memmap2::Mmap;

pub use check::Stats;
pub use page::{MAX_KEY_BYTES, MAX_VALUE_BYTES, PAGE_SIZE};
pub use snapshot::{Range, Snapshot};
pub use txn::WriteTxn;

use freelist::FreeList;
use io::FileWriter;
use meta::Meta;
use node::Child;
use page::PageId;
use snapshot::{Registry, SnapInner};

/// Errors of the tree file.
#[derive(Debug)]
pub enum Error {
    Io(std::io::Error),
    /// The file holds something no valid commit could have written.
    Corrupt {
        page: PageId,
        reason: &'static str,
    },
    KeyTooLarge {
        len: usize,
    },
    ValueTooLarge {
        len: usize,
    },
    /// An earlier commit failed part-way; reopen the database.
    Poisoned,
    /// An edit of this transaction failed; it can only be aborted.
    TxnFailed,
}

impl Error {
    pub(crate) fn corrupt(page: PageId, reason: &'static str) -> Self {
        Error::Corrupt { page, reason }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Io(e) => write!(f, "btree I/O error: {e}"),
            Error::Corrupt { page, reason } => {
                write!(f, "btree file corrupt at page {page}: {reason}")
            }
            Error::KeyTooLarge { len } => write!(f, "key of {len} bytes exceeds {MAX_KEY_BYTES}"),
            Error::ValueTooLarge { len } => {
                write!(f, "value of {len} bytes exceeds {MAX_VALUE_BYTES}")
            }
            Error::Poisoned => write!(f, "an earlier commit failed; reopen the database"),
            Error::TxnFailed => write!(f, "an edit of this transaction failed; abort it"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e)
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Size of a new file.
const INITIAL_FILE_BYTES: u64 = 64 * PAGE_SIZE as u64;
/// Growth step cap: the file doubles until steps reach this size.
const MAX_GROWTH_BYTES: u64 = 64 << 20;
/// `compact_file` commits the copy in batches of about this many bytes.
const COMPACT_BATCH_BYTES: usize = 64 << 20;

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One tree file: a single writer and any number of concurrent snapshots.
pub struct Database {
    path: PathBuf,
    /// The latest commit, handed to new snapshots.
    current: Mutex<Arc<SnapInner>>,
    writer: Mutex<Writer>,
}

pub(crate) struct Writer {
    io: FileWriter,
    free: FreeList,
    /// Mapping of the whole file, replaced when the file grows past it.
    map: Arc<Mmap>,
    file_len_bytes: u64,
    registry: Arc<Registry>,
    poisoned: bool,
}

fn map_file(file: &File) -> Result<Arc<Mmap>> {
    // SAFETY: the mapping is read-only and only pages reachable from
    // published commits are read through it; those are never written while
    // reachable and the file is never truncated while mapped (module docs).
    let map = unsafe { Mmap::map(file)? };
    Ok(Arc::new(map))
}

/// Makes a file creation or rename durable.
fn sync_parent_dir(path: &Path) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()?;
    Ok(())
}

impl Database {
    /// Opens the file at `path`, creating an empty tree if it does not exist.
    pub fn open(path: impl AsRef<Path>) -> Result<Database> {
        Self::open_with_txid(path.as_ref(), 0)
    }

    /// Opens an existing file without ever writing to it, for inspection (also of the file of
    /// a running node, whose published commits it reads like any snapshot). An empty or
    /// missing file is an error, not a new tree; a commit through this handle fails.
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<Database> {
        let path = path.as_ref();
        let file = OpenOptions::new().read(true).open(path)?;
        Self::load(path, FileWriter::new(file)?)
    }

    /// Opens `path`; a new file starts at commit `first_txid`.
    fn open_with_txid(path: &Path, first_txid: u64) -> Result<Database> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let mut io = FileWriter::new(file)?;
        if io.file().metadata()?.len() == 0 {
            io.file().set_len(INITIAL_FILE_BYTES)?;
            let meta = Meta::empty(first_txid);
            io.write_all_at(&[(meta.slot() * PAGE_SIZE as u64, &meta.encode())])?;
            io.sync_data()?;
            sync_parent_dir(path)?;
        }
        Self::load(path, io)
    }

    fn load(path: &Path, io: FileWriter) -> Result<Database> {
        let file_len_bytes = io.file().metadata()?.len();
        if file_len_bytes < 2 * PAGE_SIZE as u64 {
            return Err(Error::corrupt(0, "file shorter than its meta pages"));
        }
        let map = map_file(io.file())?;
        let meta = Meta::newest(
            Meta::decode(0, &map[..PAGE_SIZE]),
            Meta::decode(1, &map[PAGE_SIZE..2 * PAGE_SIZE]),
        )
        .ok_or(Error::corrupt(0, "no valid meta page"))?;
        if meta
            .page_count
            .checked_mul(PAGE_SIZE as u64)
            .is_none_or(|end| end > file_len_bytes)
        {
            return Err(Error::corrupt(
                meta.page_count,
                "file shorter than its page count",
            ));
        }
        let registry = Arc::new(Registry::default());
        let snap = SnapInner::new(meta, map.clone(), registry.clone());
        let free = FreeList::load(&snap)?;
        let writer = Writer {
            io,
            free,
            map,
            file_len_bytes,
            registry,
            poisoned: false,
        };
        Ok(Database {
            path: path.to_path_buf(),
            current: Mutex::new(Arc::new(snap)),
            writer: Mutex::new(writer),
        })
    }

    /// The file's current length, free pages and growth slack included (etcd's `dbSize`).
    pub fn file_size_bytes(&self) -> u64 {
        lock(&self.writer).file_len_bytes
    }

    /// A snapshot of the latest commit.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            inner: lock(&self.current).clone(),
        }
    }

    /// Starts the write transaction; waits while another one is open.
    pub fn begin_write(&self) -> Result<WriteTxn<'_>> {
        let writer = lock(&self.writer);
        if writer.poisoned {
            return Err(Error::Poisoned);
        }
        let base = lock(&self.current).clone();
        Ok(WriteTxn::new(self, writer, base))
    }

    /// Rewrites the live data into a new, densely packed file and replaces
    /// the old one with it (rename, then directory fsync), shrinking the
    /// file to the live data. Takes the write lock and blocks new snapshots
    /// while it runs. Live snapshots keep reading the old file, unlinked but
    /// mapped (module docs, point 2), until they drop.
    pub fn compact_file(&self) -> Result<()> {
        let mut writer = lock(&self.writer);
        let mut current = lock(&self.current);
        let tmp = self.path.with_extension("compact");
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        copy_into(
            &Snapshot {
                inner: current.clone(),
            },
            &tmp,
        )?;
        std::fs::rename(&tmp, &self.path)?;
        sync_parent_dir(&self.path)?;
        let fresh = Database::open(&self.path)?;
        *writer = fresh
            .writer
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner);
        *current = fresh
            .current
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner);
        Ok(())
    }
}

/// Writes every entry of `snap` into a new file at `path`, in key order, so
/// that pages are filled completely.
fn copy_into(snap: &Snapshot, path: &Path) -> Result<()> {
    let copy = Database::open_with_txid(path, snap.txid() + 1)?;
    let mut entries = snap.iter().peekable();
    while entries.peek().is_some() {
        let mut txn = copy.begin_write()?;
        let mut batch_bytes = 0;
        for entry in entries.by_ref() {
            let (key, value) = entry?;
            txn.insert(key, value)?;
            batch_bytes += key.len() + value.len();
            if batch_bytes >= COMPACT_BATCH_BYTES {
                break;
            }
        }
        txn.commit()?;
    }
    let mut txn = copy.begin_write()?;
    txn.set_applied_index(snap.applied_index());
    txn.commit()
}

impl Writer {
    /// Writes and publishes a commit on top of `base`; a failure poisons
    /// the writer, since the free list may be half-updated.
    pub(crate) fn commit(
        &mut self,
        base: &SnapInner,
        root: Option<Child>,
        freed: Vec<PageId>,
        entry_count: u64,
        applied_index: u64,
    ) -> Result<SnapInner> {
        if self.poisoned {
            return Err(Error::Poisoned);
        }
        let result = self.write_commit(base, root, freed, entry_count, applied_index);
        self.poisoned = result.is_err();
        result
    }

    fn write_commit(
        &mut self,
        base: &SnapInner,
        root: Option<Child>,
        freed: Vec<PageId>,
        entry_count: u64,
        applied_index: u64,
    ) -> Result<SnapInner> {
        let txid = base.meta.txid + 1;
        self.free
            .release(self.registry.oldest().expect("the base snapshot is live"));
        let mut writes = Vec::new();
        let root = match root {
            None => 0,
            Some(Child::Clean(id)) => id,
            Some(Child::Dirty(node)) => {
                let free = &mut self.free;
                txn::write_node(*node, &mut |count| free.alloc(count), &mut writes)
            }
        };
        self.free.free_later(txid, freed);
        let list = self.free.persist(txid, &mut writes);
        let meta = Meta {
            txid,
            root,
            freelist_head: list.head,
            freelist_len: list.len,
            page_count: self.free.page_count,
            entry_count,
            applied_index,
        };
        self.grow_file(meta.page_count)?;
        let data: Vec<(u64, &[u8])> = writes
            .iter()
            .map(|(id, bytes)| {
                assert!(
                    *id >= meta::META_PAGES && *id < meta.page_count,
                    "write outside the data pages"
                );
                (id * PAGE_SIZE as u64, bytes.as_slice())
            })
            .collect();
        self.io.write_all_at(&data)?;
        self.io.sync_data()?;
        self.io
            .write_all_at(&[(meta.slot() * PAGE_SIZE as u64, &meta.encode())])?;
        self.io.sync_data()?;
        if (self.map.len() as u64) < meta.page_count * PAGE_SIZE as u64 {
            self.map = map_file(self.io.file())?;
        }
        Ok(SnapInner::new(
            meta,
            self.map.clone(),
            self.registry.clone(),
        ))
    }

    /// Extends the file to hold `page_count` pages, in growing steps so that
    /// appends do not resize (and remap) at every commit.
    fn grow_file(&mut self, page_count: u64) -> Result<()> {
        let needed = page_count * PAGE_SIZE as u64;
        if needed <= self.file_len_bytes {
            return Ok(());
        }
        let step = self.file_len_bytes.min(MAX_GROWTH_BYTES);
        let len = needed
            .max(self.file_len_bytes + step)
            .next_multiple_of(PAGE_SIZE as u64);
        self.io.file().set_len(len)?;
        self.file_len_bytes = len;
        Ok(())
    }
}
