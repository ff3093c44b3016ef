//! The `etcdserverpb.Lease` gRPC service (etcd's v3rpc `LeaseServer`). Grant and Revoke go
//! through the meta group; KeepAlive, TimeToLive and Leases are answered from the table on
//! the core that received them.

use super::lessor::request;
use super::ops::{LeaseDone, LeaseOp};
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

/// Renews one lease: etcd answers TTL 0 for a lease that is unknown or already expired.
async fn keep_alive(shared: &Shared, id: i64) -> Result<LeaseKeepAliveResponse, KvError> {
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

#[tonic::async_trait]
impl Lease for LeaseService {
    async fn lease_grant(
        &self,
        request: Request<LeaseGrantRequest>,
    ) -> Result<Response<LeaseGrantResponse>, Status> {
        // etcd checks only the token of a grant, and the space quota.
        self.shared().auth.caller(request.metadata())?;
        crate::node::space::admit(self.shared(), LEASE_GRANT_COST_BYTES).await?;
        let r = request.into_inner();
        let op = LeaseOp::Grant {
            id: r.id,
            ttl_s: r.ttl,
        };
        let LeaseDone::Granted { id, ttl_s } = self::request(self.shared(), op).await? else {
            unreachable!("a grant answers granted")
        };
        Ok(Response::new(LeaseGrantResponse {
            header: Some(self.shared().current_header()),
            id,
            ttl: ttl_s,
            error: String::new(),
        }))
    }

    async fn lease_revoke(
        &self,
        request: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        let caller = self.shared().auth.caller(request.metadata())?;
        let op = LeaseOp::Revoke {
            id: request.into_inner().id,
            only_if_expired: false,
            caller,
        };
        let LeaseDone::Revoked { revision } = self::request(self.shared(), op).await? else {
            unreachable!("a client revoke answers revoked")
        };
        Ok(Response::new(LeaseRevokeResponse {
            header: Some(self.shared().header(revision)),
        }))
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
        let r = request.into_inner();
        let shared = self.shared();
        let header = Some(shared.current_header());
        // etcd 3.4 answers an unknown lease with TTL -1, not with an error.
        let response = match shared.leases.time_to_live(r.id, r.keys, Instant::now()) {
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
        };
        Ok(Response::new(response))
    }

    async fn lease_leases(
        &self,
        _request: Request<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        let shared = self.shared();
        let leases = shared
            .leases
            .list()
            .into_iter()
            .map(|id| LeaseStatus { id })
            .collect();
        Ok(Response::new(LeaseLeasesResponse {
            header: Some(shared.current_header()),
            leases,
        }))
    }
}
