//! ferrocd's per-shard storage: the write-ahead log, the copy-on-write B+tree file, and the
//! multi-version key-value store.

pub mod btree;
pub mod mvcc;
pub mod wal;
