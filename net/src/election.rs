//! The `v3electionpb.Election` service (etcd's v3election): leader election on a name, each
//! candidate holding its candidacy with a lease.

use crate::node::Node;
use crate::recipes::{self, RecipeError};
use crate::watch::deletion::Deletions;
use ferrocd_api::v3electionpb::election_server::Election;
use ferrocd_api::v3electionpb::{
    CampaignRequest, CampaignResponse, LeaderKey, LeaderRequest, LeaderResponse, ProclaimRequest,
    ProclaimResponse, ResignRequest, ResignResponse,
};
use futures::channel::oneshot;
use futures::future::{select, Either};
use futures::{Stream, StreamExt};
use std::pin::{pin, Pin};
use tonic::{Request, Response, Status};

/// The stream type tonic's generated trait expects for a server-streaming method.
type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Leader changes buffered for one `Observe` stream before the observer waits for the client.
const OBSERVE_BUFFER_RESPONSES: usize = 16;

#[derive(Clone)]
pub struct ElectionService {
    node: Node,
    /// The core's watch hub, for waiting on older contenders.
    deletions: Deletions,
}

impl ElectionService {
    pub fn new(node: Node, deletions: Deletions) -> ElectionService {
        ElectionService { node, deletions }
    }
}

#[tonic::async_trait]
impl Election for ElectionService {
    /// Blocks until the caller's lease leads the election.
    async fn campaign(
        &self,
        request: Request<CampaignRequest>,
    ) -> Result<Response<CampaignResponse>, Status> {
        let node = recipes::for_client(&self.node, &request)?;
        let request = request.into_inner();
        let lease = recipes::session_lease(&node, request.lease).await?;
        let won =
            recipes::campaign(&node, &self.deletions, &request.name, lease, &request.value).await?;
        Ok(Response::new(CampaignResponse {
            header: Some(won.header),
            leader: Some(LeaderKey {
                name: request.name,
                key: won.key,
                rev: won.rev,
                lease,
            }),
        }))
    }

    async fn proclaim(
        &self,
        request: Request<ProclaimRequest>,
    ) -> Result<Response<ProclaimResponse>, Status> {
        let node = recipes::for_client(&self.node, &request)?;
        let request = request.into_inner();
        let leader = request.leader.ok_or(RecipeError::MissingLeaderKey)?;
        let header =
            recipes::proclaim(&node, &leader.key, leader.rev, leader.lease, &request.value).await?;
        Ok(Response::new(ProclaimResponse {
            header: Some(header),
        }))
    }

    async fn leader(
        &self,
        request: Request<LeaderRequest>,
    ) -> Result<Response<LeaderResponse>, Status> {
        let node = recipes::for_client(&self.node, &request)?;
        let (header, kv) = recipes::leader(&node, &request.into_inner().name).await?;
        Ok(Response::new(LeaderResponse {
            header: Some(header),
            kv: Some(kv),
        }))
    }

    /// Streams the leader, then every change of leader or of its value, until the client goes.
    async fn observe(
        &self,
        request: Request<LeaderRequest>,
    ) -> Result<Response<BoxStream<LeaderResponse>>, Status> {
        let node = recipes::for_client(&self.node, &request)?;
        let name = request.into_inner().name;
        let (tx, rx) = async_channel::bounded(OBSERVE_BUFFER_RESPONSES);
        // Dropped with the response stream: stops an observer that is waiting for a change.
        let (gone_tx, mut gone) = oneshot::channel::<()>();
        glommio::spawn_local(async move {
            let mut last = None;
            loop {
                let next = recipes::next_leader(&node, &name, last.as_ref());
                let next = match select(pin!(next), &mut gone).await {
                    Either::Left((next, _)) => next,
                    Either::Right(_) => return,
                };
                let response = next.map(|(header, kv)| {
                    last = Some(kv.clone());
                    LeaderResponse {
                        header: Some(header),
                        kv: Some(kv),
                    }
                });
                let failed = response.is_err();
                // The client went away, or the node stopped: the observer ends.
                if tx.send(response.map_err(Status::from)).await.is_err() || failed {
                    return;
                }
            }
        })
        .detach();
        let stream = rx.map(move |response| {
            let _ = &gone_tx;
            response
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn resign(
        &self,
        request: Request<ResignRequest>,
    ) -> Result<Response<ResignResponse>, Status> {
        let node = recipes::for_client(&self.node, &request)?;
        let leader = request
            .into_inner()
            .leader
            .ok_or(RecipeError::MissingLeaderKey)?;
        let header = recipes::resign(&node, &leader.key, leader.rev).await?;
        Ok(Response::new(ResignResponse {
            header: Some(header),
        }))
    }
}
