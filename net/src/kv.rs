//! The `etcdserverpb.KV` gRPC service (etcd's v3rpc `kvServer`): validates nothing itself
//! beyond decoding, delegates to [`Node`], and maps errors to etcd's status codes.

use crate::node::Node;
use ferrocd_api::etcdserverpb::kv_server::Kv;
use ferrocd_api::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, TxnRequest, TxnResponse,
};
use tonic::{Request, Response, Status};

#[derive(Clone)]
pub struct KvService {
    node: Node,
}

impl KvService {
    pub fn new(node: Node) -> KvService {
        KvService { node }
    }
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn range(
        &self,
        request: Request<RangeRequest>,
    ) -> Result<Response<RangeResponse>, Status> {
        let node = self.node.for_client(request.metadata())?;
        Ok(Response::new(node.range(request.into_inner()).await?))
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let node = self.node.for_client(request.metadata())?;
        Ok(Response::new(node.put(request.into_inner()).await?))
    }

    async fn delete_range(
        &self,
        request: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let node = self.node.for_client(request.metadata())?;
        Ok(Response::new(
            node.delete_range(request.into_inner()).await?,
        ))
    }

    async fn txn(&self, request: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let node = self.node.for_client(request.metadata())?;
        Ok(Response::new(node.txn(request.into_inner()).await?))
    }

    async fn compact(
        &self,
        request: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        let node = self.node.for_client(request.metadata())?;
        Ok(Response::new(node.compact(request.into_inner()).await?))
    }
}
