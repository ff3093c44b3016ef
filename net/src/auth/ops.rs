//! Auth management run by the meta group, one operation at a time: plan against the current
//! state, make the record durable in the meta log, then apply it. Nothing changes in memory
//! before its record is on disk, so a restart never forgets a change a client was told of.

use super::state::AdminOp;
use crate::node::errors::KvError;
use crate::node::meta::{Meta, MetaMsg};
use crate::node::Shared;
use futures::channel::oneshot;

pub async fn apply(meta: &mut Meta, op: AdminOp) -> Result<(), KvError> {
    meta.lead().await?;
    // The guard is dropped before the append: only this (serialized) code changes the state.
    let planned = meta.shared().auth.state().plan(op.clone());
    let Some(payload) = planned.map_err(KvError::Auth)? else {
        return Ok(());
    };
    meta.append(&payload).await?;
    // A password change also ends the user's tokens (`AuthStore::apply`).
    meta.shared().auth.apply(&payload);
    Ok(())
}

/// Sends `op` to the meta group and waits until it is durable and applied (on a follower:
/// has the leader do so).
pub async fn request(shared: &Shared, op: AdminOp) -> Result<(), KvError> {
    if let Some(leader) = shared.role.remote_leader()? {
        return crate::forward::auth_admin(leader, op).await;
    }
    let (reply, answer) = oneshot::channel();
    shared
        .meta
        .send(MetaMsg::Auth { op, reply })
        .await
        .map_err(|_| KvError::Stopped)?;
    answer.await.map_err(|_| KvError::Stopped)?
}
