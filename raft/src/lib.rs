//! Consensus-side pieces of ferrocd: the revision sequencer and its visibility watermark
//! (shared by all groups), and replication: one raft-rs group per shard plus the meta group
//! (`group`), all groups of a member driven together (`multi`), over a log store (`storage`)
//! backed by a shard's WAL (`wal_store`). See "Replication (raft/)" in docs/ARCHITECTURE.md.

pub mod group;
pub mod multi;
pub mod notify;
pub mod sequencer;
pub mod storage;
pub mod wal_store;
