//! ferrocd's per-shard storage: the write-ahead log, the copy-on-write B+tree file, the
//! multi-version key-value store, checkpoints of that store into the tree file, and the replay
//! that rebuilds a shard's store at start-up.

pub mod btree;
pub mod checkpoint;
pub mod meta_checkpoint;
pub mod mvcc;
pub mod replay;
pub mod wal;
