//! The etcd v3 Watch service on the shard-per-core node.
//!
//! * [`journal`]: per shard, the events of recently applied revisions.
//! * [`hub`]: per core, delivery to synced watchers and catch-up of unsynced ones.
//! * [`service`]: the gRPC stream handling (create / cancel / progress).
//!
//! docs/ARCHITECTURE.md ("Watch") explains the data flow and why it preserves I3.

pub mod deletion;
pub mod hub;
pub mod journal;
pub mod service;
