//! The single-node server (etcd's `etcdserver`): shards on cores, routing, the meta group.
//!
//! Data flow of a request: a gRPC handler on whichever core accepted the connection calls
//! [`Node`]; reads go to the owning shards' lock-free readers (`ferrocd_engine::reader`) at the
//! visible revision, on the calling core, and merge; a write whose keys live on one shard goes
//! to that shard's core; any other write goes to the meta group. Cores talk only by messages
//! (bounded channels); no lock is taken on the read or write path.

pub mod apply;
pub mod checkpoint;
pub mod compactor;
pub mod errors;
mod hash;
pub mod install;
pub mod meta;
pub mod meta_checkpoint;
pub mod recovery;
pub mod replica;
pub mod restore;
pub mod role;
pub mod shard;
pub mod snapshot;
pub mod space;
mod stats;

pub use stats::{NodeStats, ShardStats};

use space::Space;

use crate::auth::state::{Access, AuthState};
use crate::auth::{AuthStore, Caller};
use crate::lease::Leases;
use crate::members::Members;
use crate::watch::journal::{Journal, JournalLimits};
use apply::{GatheredView, Revs};
use errors::KvError;
use ferrocd_api::etcdserverpb::{
    response_op::Response, CompactionRequest, CompactionResponse, DeleteRangeRequest,
    DeleteRangeResponse, PutRequest, PutResponse, RangeRequest, RangeResponse, ResponseHeader,
    TxnRequest, TxnResponse,
};
use ferrocd_engine::mvcc::RangeResult;
use ferrocd_engine::reader::{ReadError, ShardReader};
use ferrocd_raft::sequencer::Sequencer;
use futures::channel::oneshot;
use meta::MetaMsg;
use prost::Message;
use shard::{ShardMsg, Span};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

/// Bound on each shard's and the meta group's inbox: senders wait when it is full.
pub const INBOX_CAPACITY: usize = 4096;

/// FNV-1a, 64 bit: the stable hash that places keys on shards (it is part of the on-disk
/// format, so it lives with the replay that splits logs by shard).
pub use ferrocd_engine::replay::fnv1a;

/// Limits and identity the KV path needs.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_txn_ops: usize,
    pub max_request_bytes: usize,
    /// Bounds of each shard's watch event journal.
    pub watch_journal: JournalLimits,
    /// The space quota (`--quota-backend-bytes`); `None` for no quota.
    pub quota_bytes: Option<u64>,
}

/// State shared by every core.
pub struct Shared {
    pub seq: Sequencer,
    pub shards: Vec<async_channel::Sender<ShardMsg>>,
    /// Each shard's reader: written by the shard, read by every core (set by `with_readers`).
    pub readers: Vec<Arc<ShardReader>>,
    pub meta: async_channel::Sender<MetaMsg>,
    compacted: AtomicI64,
    pub identity: recovery::Identity,
    pub limits: Limits,
    /// The node-wide lease table (`crate::lease`).
    pub leases: Leases,
    /// One watch event journal per shard, written by the shard, read by every core's hub.
    pub journals: Vec<Journal>,
    /// Users, roles, tokens and the checks (`crate::auth`).
    pub auth: AuthStore,
    /// The space quota and the alarms.
    pub space: Space,
    /// Each shard's covered revision as of its last durable checkpoint (the meta WAL release
    /// rule reads them, `meta_checkpoint.rs`).
    shard_covered: Vec<AtomicI64>,
    /// Who leads (always this member when it is the only one).
    pub role: role::Role,
    /// Clustered: linearizable reads wait on it (a single member reads at once).
    pub read_barrier: Option<replica::ReadBarrier>,
    /// The member table (`crate::members`), for MemberList and the peer wiring.
    pub members: Members,
}

impl Shared {
    pub fn new(
        seq: Sequencer,
        shards: Vec<async_channel::Sender<ShardMsg>>,
        meta: async_channel::Sender<MetaMsg>,
        compacted: i64,
        identity: recovery::Identity,
        limits: Limits,
        leases: Leases,
    ) -> Shared {
        let journals = (0..shards.len())
            .map(|_| Journal::new(seq.visible(), limits.watch_journal))
            .collect();
        let space = Space::new(shards.len(), limits.quota_bytes);
        let shard_covered = shards.iter().map(|_| AtomicI64::new(0)).collect();
        Shared {
            role: role::Role::single(identity.member_id),
            read_barrier: None,
            members: Members::default(),
            shard_covered,
            journals,
            space,
            seq,
            shards,
            readers: Vec::new(),
            meta,
            compacted: AtomicI64::new(compacted),
            identity,
            limits,
            leases,
            auth: AuthStore::with_simple_tokens(AuthState::default()),
        }
    }

    /// The node's recovered auth state (a new node starts with auth disabled and no users).
    pub fn with_auth(mut self, auth: AuthStore) -> Shared {
        self.auth = auth;
        self
    }

    /// The member table as recovered (initial members, then what they published).
    pub fn with_members(mut self, members: Members) -> Shared {
        self.members = members;
        self
    }

    /// A member of a cluster: leadership comes from the meta group's Raft driver.
    /// A member of a cluster when it has a read barrier (`None`: a single member).
    pub fn clustered_with(mut self, read_barrier: Option<replica::ReadBarrier>) -> Shared {
        if read_barrier.is_some() {
            self.role = role::Role::clustered(self.identity.member_id);
        }
        self.read_barrier = read_barrier;
        self
    }

    /// Every shard's reader, seeded by recovery; one per shard.
    pub fn with_readers(mut self, readers: Vec<Arc<ShardReader>>) -> Shared {
        assert_eq!(readers.len(), self.shards.len(), "one reader per shard");
        self.readers = readers;
        self
    }

    pub fn shard_of(&self, key: &[u8]) -> usize {
        (fnv1a(key) % self.shards.len() as u64) as usize
    }

    pub fn compacted(&self) -> i64 {
        self.compacted.load(Ordering::SeqCst)
    }

    pub fn set_compacted(&self, rev: i64) {
        self.compacted.fetch_max(rev, Ordering::SeqCst);
    }

    /// Shard `shard`'s checkpoint file is durable up to `rev`.
    pub fn set_shard_covered(&self, shard: usize, rev: i64) {
        self.shard_covered[shard].fetch_max(rev, Ordering::SeqCst);
    }

    /// Each shard's covered revision as last published.
    pub fn shards_covered(&self) -> Vec<i64> {
        let covered = self.shard_covered.iter();
        covered.map(|c| c.load(Ordering::SeqCst)).collect()
    }

    /// The shards holding keys of `spans`, ascending: all of them if any span is a range
    /// (keys are placed by hash, so a range may hold keys of every shard).
    pub fn shards_for(&self, spans: &[Span]) -> Vec<usize> {
        if spans.iter().any(|(_, end)| apply::is_range(end)) {
            return (0..self.shards.len()).collect();
        }
        let mut shards: Vec<usize> = spans.iter().map(|(key, _)| self.shard_of(key)).collect();
        shards.sort_unstable();
        shards.dedup();
        shards
    }

    pub async fn send_shard(&self, shard: usize, msg: ShardMsg) -> Result<(), KvError> {
        self.shards[shard]
            .send(msg)
            .await
            .map_err(|_| KvError::Stopped)
    }

    /// Sends the message `make` builds to every shard at once, then collects their answers in
    /// shard order.
    pub async fn ask_every_shard<T>(
        &self,
        make: impl Fn(shard::Reply<T>) -> ShardMsg,
    ) -> Result<Vec<T>, KvError> {
        let mut answers = Vec::with_capacity(self.shards.len());
        for shard in 0..self.shards.len() {
            let (reply, answer) = oneshot::channel();
            self.send_shard(shard, make(reply)).await?;
            answers.push(answer);
        }
        let mut results = Vec::with_capacity(answers.len());
        for answer in answers {
            results.push(answer.await.map_err(|_| KvError::Stopped)??);
        }
        Ok(results)
    }

    /// A response header at the visible revision.
    pub fn current_header(&self) -> ResponseHeader {
        self.header(self.seq.visible())
    }

    pub fn header(&self, revision: i64) -> ResponseHeader {
        ResponseHeader {
            cluster_id: self.identity.cluster_id,
            member_id: self.identity.member_id,
            revision,
            raft_term: self.role.term(),
        }
    }
}

/// The handle request handlers use; cheap to clone, usable from any core. KV calls are
/// checked against the permissions of its caller ([`Caller::Server`] unless set with
/// [`Node::with_caller`]), so recipes running on a client's behalf are checked too.
#[derive(Clone)]
pub struct Node {
    shared: Arc<Shared>,
    caller: Caller,
}

impl Node {
    pub fn new(shared: Arc<Shared>) -> Node {
        Node {
            shared,
            caller: Caller::Server,
        }
    }

    /// This node acting for the client whose request carries `metadata` (etcd's
    /// `AuthInfoFromCtx`: an invalid token fails every request).
    pub fn for_client(&self, metadata: &tonic::metadata::MetadataMap) -> Result<Node, KvError> {
        let caller = self.shared.auth.caller(metadata)?;
        Ok(self.with_caller(caller))
    }

    pub fn with_caller(&self, caller: Caller) -> Node {
        Node {
            shared: self.shared.clone(),
            caller,
        }
    }

    pub fn caller(&self) -> &Caller {
        &self.caller
    }

    fn check(&self, key: &[u8], end: &[u8], access: Access) -> Result<(), KvError> {
        Ok(self.shared.auth.check(&self.caller, key, end, access)?)
    }

    /// etcd's put check: write on the key, read on it for `prev_kv`, and write on every key
    /// already attached to the put's lease (else the caller could not revoke the lease).
    fn check_put(&self, r: &PutRequest) -> Result<(), KvError> {
        if !self.shared.auth.is_enabled() {
            return Ok(());
        }
        self.check(&r.key, &[], Access::Write)?;
        if r.lease != 0 {
            for key in self
                .shared
                .leases
                .attached_keys(r.lease)
                .unwrap_or_default()
            {
                self.check(&key, &[], Access::Write)?;
            }
        }
        if r.prev_kv {
            self.check(&r.key, &[], Access::Read)?;
        }
        Ok(())
    }

    fn check_delete(&self, r: &DeleteRangeRequest) -> Result<(), KvError> {
        self.check(&r.key, &r.range_end, Access::Write)?;
        if r.prev_kv {
            self.check(&r.key, &r.range_end, Access::Read)?;
        }
        Ok(())
    }

    /// etcd's `checkTxnAuth`: read on every compare's range, then every op of both branches
    /// (nested txns included: etcd 3.4 does not look into them, we do).
    fn check_txn(&self, r: &TxnRequest) -> Result<(), KvError> {
        use ferrocd_api::etcdserverpb::request_op::Request;
        if !self.shared.auth.is_enabled() {
            return Ok(());
        }
        for compare in &r.compare {
            self.check(&compare.key, &compare.range_end, Access::Read)?;
        }
        for op in r.success.iter().chain(&r.failure) {
            match &op.request {
                Some(Request::RequestRange(range)) => {
                    self.check(&range.key, &range.range_end, Access::Read)?
                }
                Some(Request::RequestPut(put)) => self.check_put(put)?,
                Some(Request::RequestDeleteRange(delete)) => self.check_delete(delete)?,
                Some(Request::RequestTxn(txn)) => self.check_txn(txn)?,
                None => {}
            }
        }
        Ok(())
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    fn revs(&self) -> Revs {
        Revs {
            current: self.shared.seq.visible(),
            compacted: self.shared.compacted(),
        }
    }

    /// Before a linearizable read: in a cluster, wait until this member has applied everything
    /// committed when the read arrived (`replica::ReadBarrier`). A single member's visible
    /// revision already covers every acknowledged write.
    pub async fn linearize(&self) -> Result<(), KvError> {
        match &self.shared.read_barrier {
            Some(barrier) => barrier.wait().await,
            None => Ok(()),
        }
    }

    fn check_size(&self, request: &impl Message) -> Result<(), KvError> {
        if request.encoded_len() > self.shared.limits.max_request_bytes {
            return Err(KvError::RequestTooLarge);
        }
        Ok(())
    }

    pub async fn range(&self, r: RangeRequest) -> Result<RangeResponse, KvError> {
        apply::check_range(&r)?;
        self.check(&r.key, &r.range_end, Access::Read)?;
        if !r.serializable {
            self.linearize().await?;
        }
        let revs = self.revs();
        apply::check_read_rev(r.revision, revs)?;
        let rev = if r.revision > 0 {
            r.revision
        } else {
            revs.current
        };
        let limit = apply::fetch_limit(&r);
        let raw = self
            .read(&r.key, &r.range_end, rev, limit, r.count_only)
            .await?;
        let mut response = apply::finish_range(&r, raw.kvs, raw.count, revs.current);
        response.header = Some(self.shared.header(revs.current));
        Ok(response)
    }

    /// Reads `[key, end)` at `rev` from every shard that may hold it and merges by key. Runs
    /// on the calling core: each shard's reader is lock-free and holds every change up to the
    /// visible revision (a shard applies a change before its revision can become visible).
    async fn read(
        &self,
        key: &[u8],
        end: &[u8],
        rev: i64,
        limit: usize,
        count_only: bool,
    ) -> Result<RangeResult, KvError> {
        let shards = self.shared.shards_for(&[(key.to_vec(), end.to_vec())]);
        let mut merged = RangeResult::default();
        for shard in shards {
            let part = match self.shared.readers[shard].range(key, end, rev, limit, count_only) {
                Ok(part) => part,
                Err(ReadError::Compacted) => return Err(KvError::Compacted),
                Err(ReadError::Corrupt(e)) => {
                    // Acknowledged data is unreadable: stop, as for a failed WAL write.
                    shard::fatal(&format!("shard {shard} checkpoint read failed: {e}"))
                }
            };
            merged.count += part.count;
            merged.kvs.extend(part.kvs);
        }
        // More than `limit` may remain; `finish_range` cuts to the fetch limit.
        merged.kvs.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        Ok(merged)
    }

    pub async fn put(&self, r: PutRequest) -> Result<PutResponse, KvError> {
        apply::check_put(&r)?;
        self.check_size(&r)?;
        self.check_put(&r)?;
        match self.write_one(apply::put_as_txn(r), true).await? {
            (header, Response::ResponsePut(put)) => Ok(PutResponse { header, ..put }),
            _ => unreachable!("a one-put txn answers with a put response"),
        }
    }

    pub async fn delete_range(
        &self,
        r: DeleteRangeRequest,
    ) -> Result<DeleteRangeResponse, KvError> {
        apply::check_delete(&r)?;
        self.check_size(&r)?;
        self.check_delete(&r)?;
        match self.write_one(apply::delete_as_txn(r), false).await? {
            (header, Response::ResponseDeleteRange(del)) => {
                Ok(DeleteRangeResponse { header, ..del })
            }
            _ => unreachable!("a one-delete txn answers with a delete response"),
        }
    }

    /// Runs a one-op txn; returns the txn's header with the op's response.
    async fn write_one(
        &self,
        txn: TxnRequest,
        put_first_checks_lease: bool,
    ) -> Result<(Option<ResponseHeader>, Response), KvError> {
        let response = self.write(txn, put_first_checks_lease).await?;
        let op = response
            .responses
            .into_iter()
            .next()
            .and_then(|op| op.response);
        Ok((
            response.header,
            op.expect("a one-op txn answers with its op's response"),
        ))
    }

    pub async fn txn(&self, r: TxnRequest) -> Result<TxnResponse, KvError> {
        apply::check_txn(&r, self.shared.limits.max_txn_ops)?;
        self.check_size(&r)?;
        self.check_txn(&r)?;
        if !apply::txn_may_write(&r) {
            return self.read_only_txn(&r).await;
        }
        self.write(r, false).await
    }

    /// Routes a write to its shard when all its keys live on one, else to the meta group (in a
    /// cluster, always to the meta group); on a follower, to the leader.
    pub(crate) async fn write(
        &self,
        txn: TxnRequest,
        put_first_checks_lease: bool,
    ) -> Result<TxnResponse, KvError> {
        if let Some(leader) = self.shared.role.remote_leader()? {
            return crate::forward::write(&self.shared, leader, txn, put_first_checks_lease).await;
        }
        space::admit(&self.shared, space::txn_cost_bytes(&txn)).await?;
        let mut spans = Vec::new();
        apply::txn_spans(&txn, &mut spans);
        let shards = self.shared.shards_for(&spans);
        let (reply, answer) = oneshot::channel();
        // In a cluster only the meta group's log is replicated (yet): every write goes there.
        let fast_path = !self.shared.role.is_clustered();
        if let ([shard], true) = (&shards[..], fast_path) {
            let shard = *shard;
            self.shared
                .send_shard(
                    shard,
                    ShardMsg::Write {
                        txn,
                        put_first_checks_lease,
                        reply,
                    },
                )
                .await?;
        } else {
            let msg = MetaMsg::Write(meta::WriteRequest {
                txn,
                spans,
                involved: shards,
                put_first_checks_lease,
                reply,
            });
            self.shared
                .meta
                .send(msg)
                .await
                .map_err(|_| KvError::Stopped)?;
        }
        let mut response = answer.await.map_err(|_| KvError::Stopped)??;
        let revision = response.header.map_or(0, |h| h.revision);
        response.header = Some(self.shared.header(revision));
        Ok(response)
    }

    /// A txn without writes reads committed state at the visible revision, like a Range.
    async fn read_only_txn(&self, r: &TxnRequest) -> Result<TxnResponse, KvError> {
        self.linearize().await?;
        let revs = self.revs();
        let mut spans = Vec::new();
        apply::txn_spans(r, &mut spans);
        let mut reads = Vec::new();
        apply::txn_historical_ranges(r, &mut reads);
        let mut view = GatheredView::default();
        for (key, end) in spans {
            let part = self.read(&key, &end, revs.current, 0, false).await?;
            view.latest
                .extend(part.kvs.into_iter().map(|kv| (kv.key.clone(), kv)));
        }
        for (key, end, rev) in reads {
            // Bad revisions are reported by evaluation, only if the read is on the chosen path.
            let kvs = match apply::check_read_rev(rev, revs) {
                Ok(()) => self.read(&key, &end, rev, 0, false).await?.kvs,
                Err(_) => Vec::new(),
            };
            view.historical.push(((key, end, rev), kvs));
        }
        let outcome = apply::evaluate_txn(
            &view,
            r,
            revs,
            &|lease| self.shared.leases.exists(lease),
            false,
            &mut || unreachable!("a read-only txn takes no revision"),
        )?;
        let mut response = outcome.response;
        response.header = Some(self.shared.header(revs.current));
        Ok(response)
    }

    pub async fn compact(&self, r: CompactionRequest) -> Result<CompactionResponse, KvError> {
        if let Some(leader) = self.shared.role.remote_leader()? {
            return crate::forward::compact(&self.shared, leader, r).await;
        }
        let (reply, answer) = oneshot::channel();
        self.shared
            .meta
            .send(MetaMsg::Compact {
                rev: r.revision,
                reply,
            })
            .await
            .map_err(|_| KvError::Stopped)?;
        answer.await.map_err(|_| KvError::Stopped)??;
        Ok(CompactionResponse {
            header: Some(self.shared.current_header()),
        })
    }
    /// Publishes this member's name and client URLs through the meta group (etcd's publish).
    pub async fn publish(&self, name: String, client_urls: Vec<String>) -> Result<(), KvError> {
        let member_id = self.shared.identity.member_id;
        if let Some(leader) = self.shared.role.remote_leader()? {
            let member = ferrocd_api::etcdserverpb::Member {
                id: member_id,
                name,
                client_ur_ls: client_urls,
                ..Default::default()
            };
            return crate::forward::publish(leader, member).await;
        }
        self.publish_member(member_id, name, client_urls).await
    }

    /// A membership change, served by the leader (a follower forwards it): the member it made
    /// or changed, and the members after it.
    pub async fn change_members(
        &self,
        request: crate::members::MemberRequest,
    ) -> Result<ferrocd_api::etcdserverpb::MemberAddResponse, KvError> {
        if !self.shared.role.is_clustered() {
            return Err(crate::members::MemberError::NotClustered.into());
        }
        if let Some(leader) = self.shared.role.remote_leader()? {
            return crate::forward::change_members(&self.shared, leader, &request).await;
        }
        let (reply, answer) = oneshot::channel();
        let sent = self
            .shared
            .meta
            .send(MetaMsg::Member { request, reply })
            .await;
        sent.map_err(|_| KvError::Stopped)?;
        let member = answer.await.map_err(|_| KvError::Stopped)??;
        Ok(ferrocd_api::etcdserverpb::MemberAddResponse {
            header: Some(self.shared.header(0)),
            member: Some(crate::members::to_api(&member)),
            members: self
                .shared
                .members
                .list()
                .iter()
                .map(crate::members::to_api)
                .collect(),
        })
    }

    /// Logs `member_id`'s attributes (this member leads: its own, or a follower's forwarded).
    pub async fn publish_member(
        &self,
        member_id: u64,
        name: String,
        client_urls: Vec<String>,
    ) -> Result<(), KvError> {
        let (reply, answer) = oneshot::channel();
        let msg = MetaMsg::Publish {
            member_id,
            name,
            client_urls,
            reply,
        };
        let sent = self.shared.meta.send(msg).await;
        sent.map_err(|_| KvError::Stopped)?;
        answer.await.map_err(|_| KvError::Stopped)?
    }
}
