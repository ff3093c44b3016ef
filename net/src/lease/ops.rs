//! Lease operations run by the meta group, one at a time, each one meta log entry made durable
//! before the table changes (so nothing depends on a grant or revoke that a crash could lose).
//!
//! Revoke atomicity (I2): the meta group holds every shard, deletes every key attached to the
//! lease at one revision in one meta entry, removes the lease, then releases the shards with
//! their deletes.
//!
//! A put racing a revoke: a shard evaluates a put (lease check, apply, attach) synchronously
//! while handling one message, and a held shard evaluates no writes (they are parked; meta
//! writes are serialized with this code). The revoke reads the attached keys only once every
//! shard is held, and removes the lease before releasing them. So a put evaluated before its
//! shard was held has already attached its key and is deleted by the revoke (at a higher
//! revision than the put, since hold first made the put durable), and a put evaluated after
//! the release finds no lease and fails with "requested lease not found".

use super::{ttl, MAX_LEASE_TTL_S};
use crate::auth::state::Access;
use crate::auth::Caller;
use crate::node::errors::KvError;
use crate::node::fnv1a;
use crate::node::meta::Meta;
use ferrocd_engine::mvcc::codec::{LeaseCheckpoint, LogPayload};
use ferrocd_engine::mvcc::{Change, Effect};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Checkpoints per meta log entry (etcd: `maxLeaseCheckpointBatchSize`).
const MAX_CHECKPOINTS_PER_ENTRY: usize = 1000;

pub enum LeaseOp {
    /// `id` 0 asks for a generated id.
    Grant { id: i64, ttl_s: i64 },
    /// `only_if_expired`: an expiry revoke, skipped if the lease was renewed meanwhile.
    /// `caller` needs write permission on every attached key (etcd's `checkLeasePuts`).
    Revoke {
        id: i64,
        only_if_expired: bool,
        caller: Caller,
    },
    /// Write the remaining TTLs of long leases into the meta log.
    Checkpoint,
    /// A renewed lease: drop its checkpoint so a restart gives it its full TTL again.
    ClearCheckpoint { id: i64 },
}

#[derive(Debug, PartialEq, Eq)]
pub enum LeaseDone {
    Granted {
        id: i64,
        ttl_s: i64,
    },
    /// The revision after the revoke (the deletes' revision if any key was attached).
    Revoked {
        revision: i64,
    },
    /// An expiry revoke found the lease renewed.
    Kept,
    Checkpointed,
}

pub async fn apply(meta: &mut Meta, op: LeaseOp) -> Result<LeaseDone, KvError> {
    meta.lead().await?;
    match op {
        LeaseOp::Grant { id, ttl_s } => grant(meta, id, ttl_s).await,
        LeaseOp::Revoke {
            id,
            only_if_expired,
            caller,
        } => revoke(meta, id, only_if_expired, &caller).await,
        LeaseOp::Checkpoint => {
            checkpoint(meta).await?;
            Ok(LeaseDone::Checkpointed)
        }
        LeaseOp::ClearCheckpoint { id } => {
            if meta.shared().leases.exists(id) {
                let checkpoints = vec![LeaseCheckpoint {
                    id,
                    remaining_ms: 0,
                }];
                meta.append(&LogPayload::LeaseCheckpoint { checkpoints })
                    .await?;
            }
            Ok(LeaseDone::Checkpointed)
        }
    }
}

/// etcd's checks, in its order: TTL bound, then an existing id; a short TTL is raised.
async fn grant(meta: &mut Meta, id: i64, ttl_s: i64) -> Result<LeaseDone, KvError> {
    if ttl_s > MAX_LEASE_TTL_S {
        return Err(KvError::LeaseTtlTooLarge);
    }
    let leases = &meta.shared().leases;
    let id = match id {
        0 => generate_id(meta),
        id if leases.exists(id) => return Err(KvError::LeaseExists),
        id => id,
    };
    let ttl_s = ttl_s.max(leases.config().min_ttl_s);
    meta.append(&LogPayload::LeaseGrant { id, ttl_s }).await?;
    // Only now can a put name the lease: its grant is durable.
    meta.shared()
        .leases
        .insert(id, ttl_s, ttl(ttl_s), false, Instant::now());
    Ok(LeaseDone::Granted { id, ttl_s })
}

/// A positive id not in use, different across restarts (member id, time and a counter mixed).
fn generate_id(meta: &Meta) -> i64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let shared = meta.shared();
    loop {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let count = COUNTER.fetch_add(1, Ordering::Relaxed);
        let seed = format!("{}/{nanos}/{count}", shared.identity.member_id);
        let id = (fnv1a(seed.as_bytes()) & i64::MAX as u64) as i64;
        if id != 0 && !shared.leases.exists(id) {
            return id;
        }
    }
}

async fn revoke(
    meta: &mut Meta,
    id: i64,
    only_if_expired: bool,
    caller: &Caller,
) -> Result<LeaseDone, KvError> {
    let shared = meta.shared().clone();
    let leases = &shared.leases;
    // Only this (serialized) code removes leases, so existence cannot change before the hold.
    if !leases.exists(id) {
        return Err(KvError::LeaseNotFound);
    }
    let all: Vec<usize> = (0..shared.shards.len()).collect();
    meta.hold(&all).await?;
    if only_if_expired && !leases.is_expired(id, Instant::now()) {
        meta.release(&all, Vec::new()).await?;
        return Ok(LeaseDone::Kept);
    }
    let keys = leases
        .attached_keys(id)
        .expect("only the meta group removes leases");
    // Checked under the hold, so no key can be attached after the check.
    let denied = keys
        .iter()
        .find_map(|key| shared.auth.check(caller, key, &[], Access::Write).err());
    if let Some(e) = denied {
        meta.release(&all, Vec::new()).await?;
        return Err(KvError::Auth(e));
    }
    let seq = &shared.seq;
    let writer = Meta::writer_id(&shared);
    let main = match keys.is_empty() {
        true => 0,
        false => seq.take(writer, false),
    };
    let changes: Vec<Change> = keys
        .into_iter()
        .enumerate()
        .map(|(sub, key)| Change {
            sub: sub as i64,
            effect: Effect::Delete { key },
        })
        .collect();
    // Without deletes the revoke reports the revision it saw (every shard is held, drained).
    let revision = match main {
        0 => seq.latest_taken(),
        main => main,
    };
    let payload = LogPayload::LeaseRevoke { id, main, changes };
    if let Err(e) = meta.append(&payload).await {
        // Not committed here (leadership moved): a revision taken is abandoned.
        if main != 0 {
            seq.abandon();
        }
        meta.release(&all, Vec::new()).await?;
        return Err(e);
    }
    leases.remove(id);
    let LogPayload::LeaseRevoke { changes, .. } = payload else {
        unreachable!("the payload was built as a revoke")
    };
    let committed = match main {
        0 => Vec::new(),
        main => vec![(main, changes)],
    };
    meta.release(&all, committed).await?;
    if main != 0 {
        seq.settle(writer, None);
    }
    seq.wait_visible(revision).await;
    Ok(LeaseDone::Revoked { revision })
}

async fn checkpoint(meta: &mut Meta) -> Result<(), KvError> {
    let leases = &meta.shared().leases;
    let interval = Duration::from_millis(leases.config().checkpoint_interval_ms);
    let checkpoints = leases.take_checkpoints(Instant::now(), interval);
    for batch in checkpoints.chunks(MAX_CHECKPOINTS_PER_ENTRY) {
        let payload = LogPayload::LeaseCheckpoint {
            checkpoints: batch.to_vec(),
        };
        meta.append(&payload).await?;
    }
    Ok(())
}
