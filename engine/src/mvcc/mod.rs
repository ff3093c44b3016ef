//! Multi-version state of one shard's keys, with etcd v3's MVCC semantics.
//!
//! This module is pure and synchronous: no I/O, no async. The server evaluates a
//! request on the shard's core and hands the resulting effects to [`Store::apply`];
//! the WAL makes them durable and replay calls `apply` again, in revision order,
//! with the payloads of [`codec`].
//!
//! # Semantics (etcd `server/storage/mvcc`)
//!
//! * A [`Revision`] is `{main, sub}`. All changes of one request share `main`;
//!   `sub` numbers them within the request.
//! * A put creates a *generation* when the key is absent (version 1,
//!   `create_revision = main`) and otherwise adds to it (version + 1, same
//!   `create_revision`). A delete writes a tombstone that ends the generation.
//! * A read at revision `rev` sees a key iff its newest change with `main <= rev`
//!   is a put, and sees it as of that put.
//! * Compaction at `rev` keeps, for every key, the newest change with
//!   `main <= rev` unless it is a tombstone, plus every newer change. Reads at
//!   revisions `>= rev` are unaffected; reads below it are refused (the caller
//!   checks [`Store::compacted_revision`]). It runs in bounded steps
//!   ([`Store::compact_step`]) so a shard never stalls on it.
//!
//! # Representation and cost
//!
//! An ordered map from key to that key's history, a `Vec` of versions in
//! revision order. Each key is stored once, each value once (in the version that
//! wrote it). Costs on a 64-bit target:
//!
//! * per key: the key bytes on the heap, plus about 40 bytes of map entry
//!   (`Box<[u8]>` 16 + `Vec` header 24) and the B-tree node overhead
//!   (nodes hold up to 11 entries; roughly 10 bytes amortised per entry);
//! * per version: 56 bytes (revision 16, create revision 8, version 8, lease 8,
//!   value pointer and length 16; a tombstone uses the same slot) plus the value
//!   bytes on the heap (none for an empty value or a tombstone), plus `Vec`
//!   growth slack (at most 2x the versions of that key).
//!
//! Storing `create_revision` and `version` in each version costs 16 bytes but
//! makes a read at any revision one binary search instead of a walk over the
//! generation. The public API uses only owned or borrowed key/value views, so a
//! B+tree keyed by `(key, revision)` can replace the map without changing it.
//!
//! # What is not yet checkpointed
//!
//! The store remembers which of its changes a checkpoint (`crate::checkpoint`)
//! has not yet written: the revision and key of every applied change, and the
//! key and revision of every change compaction dropped. [`Store::take_unsaved`]
//! hands them over, up to a revision the caller knows to be durable. That costs
//! one copy of the key per change until the next checkpoint takes it.

pub mod codec;
mod history;
mod store;

pub use store::{Changes, Exported, RangeResult, Store, StoreStats, Unsaved};

/// A point in the shard's history: `main` is the cluster-wide revision of a
/// request, `sub` the index of a change within that request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Revision {
    pub main: i64,
    pub sub: i64,
}

/// A key as visible at some revision (etcd's `mvccpb.KeyValue`).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct KeyValue {
    pub key: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub version: i64,
    pub value: Vec<u8>,
    pub lease: i64,
}

/// A borrowed view of a visible key, so that ranges (and `count_only` or
/// `keys_only` requests) need not copy values they do not return.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvRef<'a> {
    pub key: &'a [u8],
    pub create_revision: i64,
    pub mod_revision: i64,
    pub version: i64,
    pub value: &'a [u8],
    pub lease: i64,
}

impl KvRef<'_> {
    /// Copies the view into an owned [`KeyValue`].
    pub fn to_key_value(&self) -> KeyValue {
        KeyValue {
            key: self.key.to_vec(),
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            version: self.version,
            value: self.value.to_vec(),
            lease: self.lease,
        }
    }
}

/// What one change does to one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
        lease: i64,
    },
    /// Only for a key that is live at the latest revision.
    Delete { key: Vec<u8> },
}

impl Effect {
    /// The key this effect changes.
    pub fn key(&self) -> &[u8] {
        match self {
            Effect::Put { key, .. } | Effect::Delete { key } => key,
        }
    }
}

/// One change of a request: its `sub` revision and its effect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub sub: i64,
    pub effect: Effect,
}

/// One change to one key as a watcher sees it (etcd's `mvccpb.Event`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyChange {
    pub rev: Revision,
    pub is_delete: bool,
    /// The key as written by a put. For a delete only `key` and `mod_revision` (the
    /// revision of the delete) are set, as in etcd's delete events.
    pub kv: KeyValue,
    /// The key just before the change, if it was live.
    pub prev: Option<KeyValue>,
}

/// One retained change of a key as a checkpoint stores it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SavedVersion {
    pub key: Vec<u8>,
    pub rev: Revision,
    pub state: SavedState,
}

/// What a retained change wrote. `create_revision` and `version` are stored,
/// not derived, so a history can be restored from any suffix that compaction
/// left.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SavedState {
    Put {
        create_revision: i64,
        version: i64,
        lease: i64,
        value: Vec<u8>,
    },
    Tombstone,
}
