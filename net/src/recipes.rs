//! etcd's client-side concurrency recipes (clientv3/concurrency: `Mutex`, `Election`), run
//! inside the server for the Lock and Election services, as etcd's v3lock and v3election do,
//! on the same [`Node`] calls a client's requests take.
//!
//! A contender owns the key `<name>/<lease id in hex>`, written with its lease, so it vanishes
//! when the lease ends. Contenders are ordered by the revision that created their key; the
//! owner (lock holder, election leader) is the oldest. A contender waits until every older key
//! is deleted, newest first, as etcd's `waitDeletes` does.

use crate::lease::lessor;
use crate::lease::ops::{LeaseDone, LeaseOp};
use crate::node::errors::KvError;
use crate::node::Node;
use crate::watch::deletion::{Deletions, Waited};
use ferrocd_api::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use ferrocd_api::etcdserverpb::range_request::{SortOrder, SortTarget};
use ferrocd_api::etcdserverpb::request_op::Request as Op;
use ferrocd_api::etcdserverpb::response_op::Response as OpResponse;
use ferrocd_api::etcdserverpb::{
    Compare, DeleteRangeRequest, PutRequest, RangeRequest, RangeResponse, RequestOp,
    ResponseHeader, TxnRequest, TxnResponse,
};
use ferrocd_api::mvccpb::KeyValue;
use tonic::Status;

/// Failures of a recipe. Every one reaches the client as gRPC UNKNOWN with etcd's message:
/// etcd runs the recipes through its Go client, which turns a failed request's status into a
/// plain Go error, and grpc-go sends a plain error as UNKNOWN (so an unknown lease is
/// `Unknown: etcdserver: requested lease not found` here, not NOT_FOUND as from KV).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecipeError {
    Kv(KvError),
    NotLeader,
    NoLeader,
    SessionExpired,
    MissingLeaderKey,
}

impl From<KvError> for RecipeError {
    fn from(e: KvError) -> Self {
        RecipeError::Kv(e)
    }
}

impl From<RecipeError> for Status {
    fn from(e: RecipeError) -> Status {
        match e {
            RecipeError::Kv(e) => Status::unknown(e.to_string()),
            RecipeError::NotLeader => Status::unknown("election: not leader"),
            RecipeError::NoLeader => Status::unknown("election: no leader"),
            RecipeError::SessionExpired => Status::unknown("mutex: session is expired"),
            RecipeError::MissingLeaderKey => Status::unknown("\"leader\" field must be provided"),
        }
    }
}

/// `prefix/` as the recipes use it: the name plus a slash.
pub fn contender_prefix(name: &[u8]) -> Vec<u8> {
    let mut prefix = name.to_vec();
    prefix.push(b'/');
    prefix
}

/// The key a session with `lease` holds under `prefix` (Go's `%x` of the lease id).
pub fn contender_key(prefix: &[u8], lease: i64) -> Vec<u8> {
    let mut key = prefix.to_vec();
    key.extend_from_slice(format!("{lease:x}").as_bytes());
    key
}

/// The end of the range of every key starting with `prefix` (etcd's `GetPrefixRangeEnd`).
pub fn prefix_range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// The node acting for the caller of `request` (its auth token), as the recipes' requests
/// are checked like the client's own.
pub fn for_client<T>(node: &Node, request: &tonic::Request<T>) -> Result<Node, RecipeError> {
    node.for_client(request.metadata()).map_err(RecipeError::Kv)
}

/// TTL of the lease etcd's `concurrency.NewSession` grants when given none.
const SESSION_TTL_S: i64 = 60;

/// etcd's `NewSession(WithLease(lease))` on the server: the given lease, or for 0 a new
/// 60 s lease (orphaned: nobody keeps it alive, so a lock taken with it lasts 60 s).
pub async fn session_lease(node: &Node, lease: i64) -> Result<i64, RecipeError> {
    if lease != 0 {
        return Ok(lease);
    }
    let grant = LeaseOp::Grant {
        id: 0,
        ttl_s: SESSION_TTL_S,
    };
    match lessor::request(node.shared(), grant).await? {
        LeaseDone::Granted { id, .. } => Ok(id),
        other => unreachable!("a grant answers granted, not {other:?}"),
    }
}

/// Where a contender stands after entering: its key's create revision and the txn's answer.
pub struct Entry {
    pub key: Vec<u8>,
    pub create_revision: i64,
    pub response: TxnResponse,
}

impl Entry {
    /// The answer to the `then`/`else` op at `index`.
    fn op(&self, index: usize) -> Option<&OpResponse> {
        self.response.responses.get(index)?.response.as_ref()
    }

    fn header(&self) -> ResponseHeader {
        self.response.header.unwrap_or_default()
    }

    /// The range answer at `index` (`get` of the own key or of the owner).
    fn range(&self, index: usize) -> &[KeyValue] {
        match self.op(index) {
            Some(OpResponse::ResponseRange(range)) => &range.kvs,
            _ => &[],
        }
    }
}

/// The recipes' shared first step: create `key` with `value` and `lease` unless it exists,
/// else read it; `also` ops run after either branch (the mutex reads the owner there).
async fn enter(
    node: &Node,
    key: Vec<u8>,
    value: &[u8],
    lease: i64,
    also: Vec<RequestOp>,
) -> Result<Entry, RecipeError> {
    let put = op(Op::RequestPut(PutRequest {
        key: key.clone(),
        value: value.to_vec(),
        lease,
        ..Default::default()
    }));
    let get = op(Op::RequestRange(RangeRequest {
        key: key.clone(),
        ..Default::default()
    }));
    let txn = TxnRequest {
        compare: vec![create_revision_is(&key, 0)],
        success: std::iter::once(put).chain(also.clone()).collect(),
        failure: std::iter::once(get).chain(also).collect(),
    };
    let response = node.txn(txn).await?;
    let mut entry = Entry {
        key,
        create_revision: response.header.map_or(0, |h| h.revision),
        response,
    };
    if !entry.response.succeeded {
        let own = entry
            .range(0)
            .first()
            .expect("the else branch read the existing key");
        entry.create_revision = own.create_revision;
    }
    Ok(entry)
}

fn op(request: Op) -> RequestOp {
    RequestOp {
        request: Some(request),
    }
}

fn create_revision_is(key: &[u8], rev: i64) -> Compare {
    Compare {
        result: CompareResult::Equal as i32,
        target: CompareTarget::Create as i32,
        key: key.to_vec(),
        target_union: Some(TargetUnion::CreateRevision(rev)),
        ..Default::default()
    }
}

/// A range over every contender of `prefix`, oldest (or newest) first, one key.
fn contenders(prefix: &[u8], order: SortOrder, max_create_revision: i64) -> RangeRequest {
    RangeRequest {
        key: prefix.to_vec(),
        range_end: prefix_range_end(prefix),
        limit: 1,
        sort_order: order as i32,
        sort_target: SortTarget::Create as i32,
        max_create_revision,
        ..Default::default()
    }
}

/// The owner of `prefix`: its oldest contender, with the read's header.
pub async fn owner(node: &Node, prefix: &[u8]) -> Result<RangeResponse, RecipeError> {
    Ok(node.range(contenders(prefix, SortOrder::Ascend, 0)).await?)
}

/// Waits until no contender of `prefix` created at or before `max_create_revision` is left.
pub async fn wait_older_deleted(
    node: &Node,
    deletions: &Deletions,
    prefix: &[u8],
    max_create_revision: i64,
) -> Result<(), RecipeError> {
    loop {
        let newest_older = node
            .range(contenders(prefix, SortOrder::Descend, max_create_revision))
            .await?;
        let Some(kv) = newest_older.kvs.first() else {
            return Ok(());
        };
        let seen_at = newest_older.header.map_or(0, |h| h.revision);
        // Deleted, or interrupted by a compaction: either way, look again.
        if deletions.wait(&kv.key, seen_at + 1).await == Waited::Stopped {
            return Err(RecipeError::Kv(KvError::Stopped));
        }
    }
}

/// etcd's `Mutex.Lock` with an existing lease: the key of the lock held and the header of the
/// read that proved it held.
pub async fn lock(
    node: &Node,
    deletions: &Deletions,
    name: &[u8],
    lease: i64,
) -> Result<(Vec<u8>, ResponseHeader), RecipeError> {
    let prefix = contender_prefix(name);
    let owner_read = op(Op::RequestRange(contenders(&prefix, SortOrder::Ascend, 0)));
    let entry = enter(
        node,
        contender_key(&prefix, lease),
        &[],
        lease,
        vec![owner_read],
    )
    .await?;
    let owner = entry.range(1).first().map(|kv| kv.create_revision);
    if owner.is_none_or(|rev| rev == entry.create_revision) {
        return Ok((entry.key.clone(), entry.header()));
    }
    let mut attempt = Abandoned::new(node, &entry.key);
    wait_older_deleted(node, deletions, &prefix, entry.create_revision - 1).await?;
    let own = node
        .range(RangeRequest {
            key: entry.key.clone(),
            ..Default::default()
        })
        .await?;
    attempt.disarm();
    if own.kvs.is_empty() {
        return Err(RecipeError::SessionExpired);
    }
    Ok((entry.key, own.header.unwrap_or_default()))
}

/// Deletes a contender's key if the request that created it goes away before it is answered
/// (the client cancelled), as etcd's recipes unlock or resign on a cancelled context.
struct Abandoned {
    node: Option<Node>,
    key: Vec<u8>,
}

impl Abandoned {
    fn new(node: &Node, key: &[u8]) -> Abandoned {
        Abandoned {
            node: Some(node.clone()),
            key: key.to_vec(),
        }
    }

    fn disarm(&mut self) {
        self.node = None;
    }
}

impl Drop for Abandoned {
    fn drop(&mut self) {
        let Some(node) = self.node.take() else {
            return;
        };
        let key = std::mem::take(&mut self.key);
        glommio::spawn_local(async move {
            let _ = node
                .delete_range(DeleteRangeRequest {
                    key,
                    ..Default::default()
                })
                .await;
        })
        .detach();
    }
}

/// A campaign's win: the leader key, its create revision and the campaign txn's header.
pub struct Leadership {
    pub key: Vec<u8>,
    pub rev: i64,
    pub header: ResponseHeader,
}

/// etcd's `Election.Campaign`: enter with `value`, proclaim it if re-entering with another
/// value, then wait until every older candidate is gone.
pub async fn campaign(
    node: &Node,
    deletions: &Deletions,
    name: &[u8],
    lease: i64,
    value: &[u8],
) -> Result<Leadership, RecipeError> {
    let prefix = contender_prefix(name);
    let entry = enter(
        node,
        contender_key(&prefix, lease),
        value,
        lease,
        Vec::new(),
    )
    .await?;
    let mut attempt = Abandoned::new(node, &entry.key);
    let stale_value = entry.range(0).first().is_some_and(|kv| kv.value != value);
    if stale_value {
        proclaim(node, &entry.key, entry.create_revision, lease, value).await?;
    }
    wait_older_deleted(node, deletions, &prefix, entry.create_revision - 1).await?;
    attempt.disarm();
    Ok(Leadership {
        header: entry.header(),
        key: entry.key,
        rev: entry.create_revision,
    })
}

/// etcd's `Election.Proclaim`: a new value, if `key` still holds the leadership it won at
/// `rev`.
pub async fn proclaim(
    node: &Node,
    key: &[u8],
    rev: i64,
    lease: i64,
    value: &[u8],
) -> Result<ResponseHeader, RecipeError> {
    let put = Op::RequestPut(PutRequest {
        key: key.to_vec(),
        value: value.to_vec(),
        lease,
        ..Default::default()
    });
    let response = if_still_leading(node, key, rev, put).await?;
    if !response.succeeded {
        return Err(RecipeError::NotLeader);
    }
    Ok(response.header.unwrap_or_default())
}

/// etcd's `Election.Resign`: deletes `key` if it still holds the leadership won at `rev`.
pub async fn resign(node: &Node, key: &[u8], rev: i64) -> Result<ResponseHeader, RecipeError> {
    let delete = Op::RequestDeleteRange(DeleteRangeRequest {
        key: key.to_vec(),
        ..Default::default()
    });
    let response = if_still_leading(node, key, rev, delete).await?;
    Ok(response.header.unwrap_or_default())
}

/// Runs `then` only if `key` is still the candidacy created at `rev`.
async fn if_still_leading(
    node: &Node,
    key: &[u8],
    rev: i64,
    then: Op,
) -> Result<TxnResponse, RecipeError> {
    let txn = TxnRequest {
        compare: vec![create_revision_is(key, rev)],
        success: vec![op(then)],
        failure: Vec::new(),
    };
    Ok(node.txn(txn).await?)
}

/// etcd's `Election.Leader`: the oldest candidate, or `NoLeader`.
pub async fn leader(node: &Node, name: &[u8]) -> Result<(ResponseHeader, KeyValue), RecipeError> {
    let read = owner(node, &contender_prefix(name)).await?;
    let header = read.header.unwrap_or_default();
    let kv = read.kvs.into_iter().next().ok_or(RecipeError::NoLeader)?;
    Ok((header, kv))
}

/// The leader of `name` once it is not `last` (a different key, or a new value of the same
/// key): etcd's `Election.Observe` step. Wakes once per newly visible revision; a leader that
/// changes twice between two wake-ups is reported once, with its newest value.
pub async fn next_leader(
    node: &Node,
    name: &[u8],
    last: Option<&KeyValue>,
) -> Result<(ResponseHeader, KeyValue), RecipeError> {
    let prefix = contender_prefix(name);
    loop {
        let read = owner(node, &prefix).await?;
        let header = read.header.unwrap_or_default();
        if let Some(kv) = read.kvs.into_iter().next() {
            let same = last.is_some_and(|l| l.key == kv.key && l.mod_revision == kv.mod_revision);
            if !same {
                return Ok((header, kv));
            }
        }
        node.shared().seq.wait_visible(header.revision + 1).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_range_end_follows_etcd() {
        assert_eq!(prefix_range_end(b"a/"), b"a0".to_vec());
        assert_eq!(prefix_range_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_range_end(b"\xff\xff"), vec![0]);
    }

    #[test]
    fn contender_keys_use_lowercase_hex_lease_ids() {
        let prefix = contender_prefix(b"job");
        assert_eq!(
            contender_key(&prefix, 0x694d_77aa_9e38_2b19),
            b"job/694d77aa9e382b19"
        );
        assert_eq!(contender_key(&prefix, 10), b"job/a");
    }
}
