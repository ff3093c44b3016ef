//! The lessor task on core 0: decides expiry (the leader's job in etcd) and checkpoints.
//!
//! Every [`EXPIRY_CHECK_INTERVAL_MS`] (etcd's 500 ms) it revokes up to
//! [`MAX_REVOKES_PER_TICK`] expired leases through the meta group, the same path as a client's
//! revoke, so expiry is in the log. Every checkpoint interval it asks the meta group to write
//! the remaining TTLs. It stops when the meta group stops.

use super::ops::{LeaseDone, LeaseOp};
use crate::auth::Caller;
use crate::node::errors::KvError;
use crate::node::meta::MetaMsg;
use crate::node::Shared;
use futures::channel::oneshot;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often expiry is checked (etcd's lessor loop: 500 ms).
pub const EXPIRY_CHECK_INTERVAL_MS: u64 = 500;
/// Expiry revokes per tick, so a mass expiry does not monopolise the meta group (etcd limits
/// revokes to 1000 per second).
pub const MAX_REVOKES_PER_TICK: usize = 500;

/// Sends one lease operation to the meta group and waits for its answer.
pub async fn request(shared: &Shared, op: LeaseOp) -> Result<LeaseDone, KvError> {
    let (reply, answer) = oneshot::channel();
    shared
        .meta
        .send(MetaMsg::Lease { op, reply })
        .await
        .map_err(|_| KvError::Stopped)?;
    answer.await.map_err(|_| KvError::Stopped)?
}

pub async fn run(shared: Arc<Shared>) {
    let checkpoint_interval = Duration::from_millis(shared.leases.config().checkpoint_interval_ms);
    let mut last_checkpoint = Instant::now();
    loop {
        glommio::timer::sleep(Duration::from_millis(EXPIRY_CHECK_INTERVAL_MS)).await;
        if shared.meta.is_closed() {
            return;
        }
        // Expiry is the leader's decision (design brief §2); followers apply its revokes.
        if !shared.role.is_serving() {
            continue;
        }
        for id in shared.leases.expired(Instant::now(), MAX_REVOKES_PER_TICK) {
            let op = LeaseOp::Revoke {
                id,
                only_if_expired: true,
                caller: Caller::Server,
            };
            // Any other answer (a client revoked it already, it was renewed): nothing to do.
            if let Err(KvError::Stopped) = request(&shared, op).await {
                return;
            }
        }
        if last_checkpoint.elapsed() >= checkpoint_interval {
            last_checkpoint = Instant::now();
            if let Err(KvError::Stopped) = request(&shared, LeaseOp::Checkpoint).await {
                return;
            }
        }
    }
}
