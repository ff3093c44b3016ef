//! The `v3lockpb.Lock` service (etcd's v3lock): a distributed mutex on a name, held by a lease.

use crate::node::Node;
use crate::recipes::{self, RecipeError};
use crate::watch::deletion::Deletions;
use ferrocd_api::etcdserverpb::DeleteRangeRequest;
use ferrocd_api::v3lockpb::lock_server::Lock;
use ferrocd_api::v3lockpb::{LockRequest, LockResponse, UnlockRequest, UnlockResponse};
use tonic::{Request, Response, Status};

#[derive(Clone)]
pub struct LockService {
    node: Node,
    /// The core's watch hub, for waiting on older contenders.
    deletions: Deletions,
}

impl LockService {
    pub fn new(node: Node, deletions: Deletions) -> LockService {
        LockService { node, deletions }
    }
}

#[tonic::async_trait]
impl Lock for LockService {
    /// Blocks until the caller's lease holds the lock; answers with the key that proves it.
    async fn lock(&self, request: Request<LockRequest>) -> Result<Response<LockResponse>, Status> {
        let node = recipes::for_client(&self.node, &request)?;
        let request = request.into_inner();
        let lease = recipes::session_lease(&node, request.lease).await?;
        let (key, header) = recipes::lock(&node, &self.deletions, &request.name, lease).await?;
        Ok(Response::new(LockResponse {
            header: Some(header),
            key,
        }))
    }

    /// Deletes the lock's key, whoever holds it (as etcd).
    async fn unlock(
        &self,
        request: Request<UnlockRequest>,
    ) -> Result<Response<UnlockResponse>, Status> {
        let node = recipes::for_client(&self.node, &request)?;
        let deleted = node
            .delete_range(DeleteRangeRequest {
                key: request.into_inner().key,
                ..Default::default()
            })
            .await
            .map_err(RecipeError::Kv)?;
        Ok(Response::new(UnlockResponse {
            header: deleted.header,
        }))
    }
}
