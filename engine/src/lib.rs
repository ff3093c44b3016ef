//! ferrocd's per-shard storage: the write-ahead log, the copy-on-write B+tree file, the
//! multi-version key-value store, checkpoints of that store into the tree file, the lock-free
//! reader of a shard (checkpoint plus read buffer), and the replay that rebuilds a shard's
//! store at start-up.

pub mod btree;
pub mod checkpoint;
pub mod fault;
pub mod meta_checkpoint;
pub mod mvcc;
pub mod notice;
pub mod reader;
pub mod replay;
pub mod snapshot;
pub mod wal;
