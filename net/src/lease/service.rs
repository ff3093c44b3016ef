//! The `etcdserverpb.Lease` gRPC service (etcd's v3rpc `LeaseServer`). Grant and Revoke go
//! through the meta group; KeepAlive, TimeToLive and Leases are answered from the table on
//! the core that received them. On a follower every one of them goes to the leader
//! (`crate::forward`), whose table renews and expires leases.

use super::lessor::request;
use super::ops::{LeaseDone, LeaseOp};
use crate::auth::state::Access;
use crate::auth::Caller;
use crate::forward;
use crate::node::errors::KvError;
use crate::node::space::LEASE_GRANT_COST_BYTES;
use crate::node::{Node, Shared};
use ferrocd_api::etcdserverpb::lease_server::Lease;
use ferrocd_api::etcdserverpb::{
    LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse,
    LeaseLeasesRequest, LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse, LeaseStatus,
    LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
};
use futures::stream::{self, Stream, StreamExt};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;
use tonic::{Request, Response, Status, Streaming};

type KeepAliveStream =
    Pin<Box<dyn Stream<Item = Result<LeaseKeepAliveResponse, Status>> + Send + 'static>>;

#[derive(Clone)]
pub struct LeaseService {
    node: Node,
}

impl LeaseService {
    pub fn new(node: Node) -> LeaseService {
        LeaseService { node }
    }

    fn shared(&self) -> &Arc<Shared> {
        self.node.shared()
    }
}

/// Grants a lease (the space quota first, as etcd); on a follower, the leader does.
pub(crate) async fn grant(
    shared: &Shared,
    r: LeaseGrantRequest,
) -> Result<LeaseGrantResponse, KvError> {
    if let Some(leader) = shared.role.remote_leader()? {
        return forward::lease_grant(shared, leader, r).await;
    }
    crate::node::space::admit(shared, LEASE_GRANT_COST_BYTES).await?;
    let op = LeaseOp::Grant {
        id: r.id,
        ttl_s: r.ttl,
    };
    let LeaseDone::Granted { id, ttl_s } = request(shared, op).await? else {
        unreachable!("a grant answers granted")
    };
    Ok(LeaseGrantResponse {
        header: Some(shared.current_header()),
        id,
        ttl: ttl_s,
        error: String::new(),
    })
}

/// Revokes a lease if `caller` may write every attached key. A follower checks that against
/// its (replicated) table before forwarding; the leader then revokes as the server.
pub(crate) async fn revoke(
    shared: &Shared,
    id: i64,
    caller: Caller,
) -> Result<LeaseRevokeResponse, KvError> {
    if let Some(leader) = shared.role.remote_leader()? {
        for key in shared.leases.attached_keys(id).unwrap_or_default() {
            shared.auth.check(&caller, &key, &[], Access::Write)?;
        }
        return forward::lease_revoke(shared, leader, id).await;
    }
    let op = LeaseOp::Revoke {
        id,
        only_if_expired: false,
        caller,
    };
    let LeaseDone::Revoked { revision } = request(shared, op).await? else {
        unreachable!("a client revoke answers revoked")
    };
    Ok(LeaseRevokeResponse {
        header: Some(shared.header(revision)),
    })
}

/// Renews one lease: etcd answers TTL 0 for a lease that is unknown or already expired.
/// Only the leader's table renews (it decides expiry).
pub(crate) async fn keep_alive(
    shared: &Shared,
    id: i64,
) -> Result<LeaseKeepAliveResponse, KvError> {
    if let Some(leader) = shared.role.remote_leader()? {
        return forward::lease_keep_alive(shared, leader, id).await;
    }
    let ttl = match shared.leases.renew(id, Instant::now()) {
        None => 0,
        Some(renewed) => {
            if renewed.clear_checkpoint {
                match request(shared, LeaseOp::ClearCheckpoint { id }).await {
                    Ok(_) | Err(KvError::LeaseNotFound) => {}
                    Err(e) => return Err(e),
                }
            }
            renewed.ttl_s
        }
    };
    Ok(LeaseKeepAliveResponse {
        header: Some(shared.current_header()),
        id,
        ttl,
    })
}

/// The remaining TTL as the leader's table says (renewals happen there).
pub(crate) async fn time_to_live(
    shared: &Shared,
    r: LeaseTimeToLiveRequest,
) -> Result<LeaseTimeToLiveResponse, KvError> {
    if let Some(leader) = shared.role.remote_leader()? {
        return forward::lease_time_to_live(shared, leader, r).await;
    }
    let header = Some(shared.current_header());
    // etcd 3.4 answers an unknown lease with TTL -1, not with an error.
    Ok(
        match shared.leases.time_to_live(r.id, r.keys, Instant::now()) {
            None => LeaseTimeToLiveResponse {
                header,
                id: r.id,
                ttl: -1,
                ..LeaseTimeToLiveResponse::default()
            },
            Some(ttl) => LeaseTimeToLiveResponse {
                header,
                id: r.id,
                ttl: ttl.remaining_s,
                granted_ttl: ttl.granted_ttl_s,
                keys: ttl.keys,
            },
        },
    )
}

pub(crate) async fn leases(shared: &Shared) -> Result<LeaseLeasesResponse, KvError> {
    if let Some(leader) = shared.role.remote_leader()? {
        return forward::lease_leases(shared, leader).await;
    }
    let leases = shared
        .leases
        .list()
        .into_iter()
        .map(|id| LeaseStatus { id })
        .collect();
    Ok(LeaseLeasesResponse {
        header: Some(shared.current_header()),
        leases,
    })
}

#[tonic::async_trait]
impl Lease for LeaseService {
    async fn lease_grant(
        &self,
        request: Request<LeaseGrantRequest>,
    ) -> Result<Response<LeaseGrantResponse>, Status> {
        // etcd checks only the token of a grant, and the space quota.
        self.shared().auth.caller(request.metadata())?;
        let response = grant(self.shared(), request.into_inner()).await?;
        Ok(Response::new(response))
    }

    async fn lease_revoke(
        &self,
        request: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        let caller = self.shared().auth.caller(request.metadata())?;
        let response = revoke(self.shared(), request.into_inner().id, caller).await?;
        Ok(Response::new(response))
    }

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<KeepAliveStream>, Status> {
        let inbound = request.into_inner();
        let responses =
            stream::unfold(Some((self.shared().clone(), inbound)), |state| async move {
                let (shared, mut inbound) = state?;
                let answer = match inbound.message().await {
                    Ok(None) => return None,
                    Ok(Some(r)) => keep_alive(&shared, r.id).await.map_err(Status::from),
                    Err(status) => Err(status),
                };
                // After an error the stream ends, as etcd's does.
                let next = answer.is_ok().then_some((shared, inbound));
                Some((answer, next))
            });
        Ok(Response::new(responses.boxed()))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let response = time_to_live(self.shared(), request.into_inner()).await?;
        Ok(Response::new(response))
    }

    async fn lease_leases(
        &self,
        _request: Request<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        Ok(Response::new(leases(self.shared()).await?))
    }
}
