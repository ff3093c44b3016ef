//! The `Cluster` and `Maintenance` services: `MemberList` (from the member table,
//! `crate::members`), `Status`, `HashKV`, `Hash`, `Defragment`, `Alarm` (with the space
//! quota), `Snapshot` (`node/snapshot.rs`) and `MoveLeader`; member changes (`MemberAdd`, `Remove`,
//! `Update`, `Promote`) in a cluster, served by the leader (`crate::members` plans them, the
//! meta log replicates them); a single member without Raft refuses them.

use crate::auth::AuthError;
use crate::http::SERVER_VERSION;
use crate::members::MemberRequest;
use crate::node::{space, Node};
use ferrocd_api::etcdserverpb::alarm_request::AlarmAction;
use ferrocd_api::etcdserverpb::cluster_server::Cluster;
use ferrocd_api::etcdserverpb::maintenance_server::Maintenance;
use ferrocd_api::etcdserverpb::{
    AlarmRequest, AlarmResponse, DefragmentRequest, DefragmentResponse, HashKvRequest,
    HashKvResponse, HashRequest, HashResponse, MemberAddRequest, MemberAddResponse,
    MemberListRequest, MemberListResponse, MemberPromoteRequest, MemberPromoteResponse,
    MemberRemoveRequest, MemberRemoveResponse, MemberUpdateRequest, MemberUpdateResponse,
    MoveLeaderRequest, MoveLeaderResponse, SnapshotRequest, SnapshotResponse, StatusRequest,
    StatusResponse,
};
use futures::{Stream, StreamExt};
use std::pin::Pin;

/// The stream type tonic's generated trait expects for `Snapshot`.
type SnapshotStream = Pin<Box<dyn Stream<Item = Result<SnapshotResponse, Status>> + Send>>;
use ferrocd_engine::mvcc::codec::Alarm;
use tonic::{Request, Response, Status};

/// The answer to ACTIVATE or DEACTIVATE of a negative alarm type (etcd 3.4 has no check
/// and no message of its own: it crashes on some such requests).
pub const NEGATIVE_ALARM_TYPE: &str = "etcdserver: alarm type must not be negative";

#[derive(Clone)]
pub struct ClusterService {
    node: Node,
}

impl ClusterService {
    pub fn new(node: Node) -> ClusterService {
        ClusterService { node }
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_list(
        &self,
        _request: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        let shared = self.node.shared();
        // By id, as etcd lists them; a member that has not published yet shows no client URLs.
        let members = shared.members.list();
        Ok(Response::new(MemberListResponse {
            // etcd's cluster service fills no revision in its headers.
            header: Some(shared.header(0)),
            members: members.iter().map(crate::members::to_api).collect(),
        }))
    }

    async fn member_add(
        &self,
        request: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        let request = request.into_inner();
        let request = MemberRequest::Add {
            peer_urls: request.peer_ur_ls,
            is_learner: request.is_learner,
        };
        Ok(Response::new(self.node.change_members(request).await?))
    }

    async fn member_remove(
        &self,
        request: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        let id = request.into_inner().id;
        let done = self
            .node
            .change_members(MemberRequest::Remove { id })
            .await?;
        Ok(Response::new(MemberRemoveResponse {
            header: done.header,
            members: done.members,
        }))
    }

    async fn member_update(
        &self,
        request: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        let request = request.into_inner();
        let request = MemberRequest::Update {
            id: request.id,
            peer_urls: request.peer_ur_ls,
        };
        let done = self.node.change_members(request).await?;
        Ok(Response::new(MemberUpdateResponse {
            header: done.header,
            members: done.members,
        }))
    }

    async fn member_promote(
        &self,
        request: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        let id = request.into_inner().id;
        let done = self
            .node
            .change_members(MemberRequest::Promote { id })
            .await?;
        Ok(Response::new(MemberPromoteResponse {
            header: done.header,
            members: done.members,
        }))
    }
}

#[tonic::async_trait]
impl Maintenance for ClusterService {
    /// Leader and term of the meta group; a single member reports its visible revision as the
    /// Raft index (one voter: every entry is committed once durable).
    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let shared = self.node.shared();
        let revision = shared.seq.visible();
        // etcd's db size is its backend file's: ours are the shards' checkpoint files.
        let files = self.node.db_files(false).await?;
        let role = &shared.role;
        // A single member's log indexes are its revisions (one voter: durable is committed).
        let (raft_index, raft_applied_index) = match role.is_clustered() {
            true => role.indexes(),
            false => (revision as u64, revision as u64),
        };
        Ok(Response::new(StatusResponse {
            header: Some(shared.header(revision)),
            version: SERVER_VERSION.to_string(),
            db_size: files.size_bytes as i64,
            db_size_in_use: files.in_use_bytes as i64,
            leader: role.leader().unwrap_or(0),
            raft_index,
            raft_applied_index,
            raft_term: role.term(),
            ..Default::default()
        }))
    }

    async fn hash_kv(
        &self,
        request: Request<HashKvRequest>,
    ) -> Result<Response<HashKvResponse>, Status> {
        self.admin(&request)?;
        let hash = self.node.hash_kv(request.into_inner().revision).await?;
        Ok(Response::new(HashKvResponse {
            header: Some(self.node.shared().header(hash.current)),
            hash: hash.hash,
            compact_revision: hash.compact_revision,
            hash_revision: hash.revision,
        }))
    }

    /// etcd hashes its whole backend file; without one, the whole MVCC history stands in.
    async fn hash(&self, request: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        self.admin(&request)?;
        let hash = self.node.hash_kv(0).await?;
        Ok(Response::new(HashResponse {
            header: Some(self.node.shared().header(hash.current)),
            hash: hash.hash,
        }))
    }

    /// Packs every shard's checkpoint file to its live pages. etcd answers without a header.
    async fn defragment(
        &self,
        request: Request<DefragmentRequest>,
    ) -> Result<Response<DefragmentResponse>, Status> {
        self.admin(&request)?;
        self.node.db_files(true).await?;
        Ok(Response::new(DefragmentResponse::default()))
    }

    /// The raised alarms (NOSPACE once the space quota is exhausted, `node/space.rs`);
    /// ACTIVATE and DEACTIVATE as etcd's.
    async fn alarm(
        &self,
        request: Request<AlarmRequest>,
    ) -> Result<Response<AlarmResponse>, Status> {
        // Any caller with a valid token (or none): etcd checks only the token here.
        self.node.shared().auth.caller(request.metadata())?;
        let request = request.into_inner();
        // The alarm log record holds 0..=i32::MAX (engine/src/mvcc/codec.rs); a negative type
        // from a garbage request must not reach it.
        if request.alarm < 0 && request.action() != AlarmAction::Get {
            return Err(Status::invalid_argument(NEGATIVE_ALARM_TYPE));
        }
        let alarm = Alarm {
            member_id: request.member_id,
            alarm: request.alarm,
        };
        let alarms = space::alarm(self.node.shared(), request.action(), alarm).await?;
        Ok(Response::new(AlarmResponse {
            header: Some(self.node.shared().current_header()),
            alarms,
        }))
    }

    /// The node's state at one revision, in 32 KiB blobs (root only, as etcd).
    async fn snapshot(
        &self,
        request: Request<SnapshotRequest>,
    ) -> Result<Response<SnapshotStream>, Status> {
        self.admin(&request)?;
        let messages = self.node.snapshot().await?;
        Ok(Response::new(Box::pin(
            messages.map(|message| message.map_err(Status::from)),
        )))
    }

    /// A single member has nobody to hand leadership to.
    /// etcd's MoveLeader: root only; served by the leader, to a voting member; answers once
    /// the target leads (or the transfer timed out).
    async fn move_leader(
        &self,
        request: Request<MoveLeaderRequest>,
    ) -> Result<Response<MoveLeaderResponse>, Status> {
        self.admin(&request)?;
        let shared = self.node.shared();
        let target = request.into_inner().target_id;
        let bad_transferee = || Status::failed_precondition("etcdserver: bad leader transferee");
        let Some(barrier) = &shared.read_barrier else {
            return Err(bad_transferee());
        };
        if shared.role.leader() != Some(shared.identity.member_id) {
            return Err(Status::failed_precondition("etcdserver: not leader"));
        }
        let is_voter = |m: &crate::members::MemberEntry| m.id == target && !m.is_learner;
        if !shared.members.list().iter().any(is_voter) {
            return Err(bad_transferee());
        }
        barrier.transfer_leader(target).await?;
        let moved = ferrocd_raft::notify::wait_until(shared.role.changed(), || {
            shared.role.leader() == Some(target)
        });
        let timer = send_wrapper::SendWrapper::new(glommio::timer::sleep(barrier.timeout()));
        if !futures_lite::future::or(
            async {
                moved.await;
                true
            },
            async {
                timer.await;
                false
            },
        )
        .await
        {
            return Err(Status::unavailable(
                "etcdserver: request timed out, leader transfer took too long",
            ));
        }
        Ok(Response::new(MoveLeaderResponse {
            header: Some(shared.current_header()),
        }))
    }
}

impl ClusterService {
    /// etcd's `authMaintenanceServer.isAuthenticated`: root only, with the auth package's
    /// error as is (gRPC UNKNOWN, `auth: ...`).
    fn admin<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let auth = &self.node.shared().auth;
        auth.admin(request.metadata())
            .map(|_| ())
            .map_err(AuthError::raw_status)
    }
}
