//! `HashKV`: one checksum of the node's MVCC history up to a revision, for comparing members.
//!
//! Each shard hashes its own keys (engine `Store::hash`: every change that survives compaction,
//! in key then revision order); the node hashes the shard hashes in shard order. Two nodes with
//! the same shard count and the same history give the same value, whatever the progress of a
//! compaction. The value is not etcd's (etcd hashes its bbolt pages' records in revision
//! order); clients only ever compare hashes of members of one cluster.

use super::apply::{self, Revs};
use super::errors::KvError;
use super::shard::ShardMsg;
use super::Node;

/// What `HashKV` answers.
pub struct KvHash {
    pub hash: u32,
    /// The revision the hash covers.
    pub revision: i64,
    /// The compacted revision, -1 when nothing was ever compacted (as etcd).
    pub compact_revision: i64,
    /// The node's current revision when the hash was taken.
    pub current: i64,
}

impl Node {
    /// Hashes the history up to `rev` (0 = the current revision), refusing compacted and future
    /// revisions with etcd's errors.
    pub async fn hash_kv(&self, rev: i64) -> Result<KvHash, KvError> {
        let shared = self.shared();
        let revs = Revs {
            current: shared.seq.visible(),
            compacted: shared.compacted(),
        };
        apply::check_read_rev(rev, revs)?;
        let revision = if rev > 0 { rev } else { revs.current };
        let shard_hashes = shared
            .ask_every_shard(|reply| ShardMsg::Hash {
                rev: revision,
                reply,
            })
            .await?;
        let mut hasher = crc32fast::Hasher::new();
        for shard_hash in shard_hashes {
            hasher.update(&shard_hash.to_be_bytes());
        }
        Ok(KvHash {
            hash: hasher.finalize(),
            revision,
            compact_revision: if revs.compacted > 0 {
                revs.compacted
            } else {
                -1
            },
            current: revs.current,
        })
    }
}
