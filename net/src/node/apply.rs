//! etcd's KV request semantics, as pure functions over a [`View`] of the latest state.
//!
//! This is ferrocd's equivalent of etcd's `applierV3backend`: given a consistent view of the
//! keys a request touches, it decides the outcome (compares, ranges, puts, deletes, nested
//! txns) and produces the changes to commit at one revision plus the response. It does no
//! I/O, so the same code serves a shard's fast path (view = the shard's store) and the meta
//! group's cross-shard path (view = a snapshot gathered from locked shards). Evaluation is
//! leader-side: followers and recovery replay the produced changes, never the request.

use super::errors::KvError;
use ferrocd_api::etcdserverpb::{
    compare::{CompareResult, CompareTarget, TargetUnion},
    range_request::{SortOrder, SortTarget},
    request_op::Request,
    response_op::Response,
    Compare, DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse, RangeRequest,
    RangeResponse, RequestOp, ResponseHeader, ResponseOp, TxnRequest, TxnResponse,
};
use ferrocd_api::mvccpb;
use ferrocd_engine::mvcc::{Change, Effect, KeyValue};
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};

/// Read access to the state a request is evaluated against.
pub trait View {
    /// Every live key in `[key, end)` (etcd's range_end forms) at the latest revision, by key.
    fn latest(&self, key: &[u8], end: &[u8]) -> Vec<KeyValue>;
    /// Live keys in `[key, end)` at a past revision `rev` (already checked against compaction).
    fn at(&self, key: &[u8], end: &[u8], rev: i64) -> Vec<KeyValue>;
}

/// A historical range read inside a txn: `(key, range_end, revision)`.
pub type HistoricalRead = (Vec<u8>, Vec<u8>, i64);

/// A view assembled from the state of the key ranges a request names (gathered from shards).
#[derive(Default)]
pub struct GatheredView {
    pub latest: BTreeMap<Vec<u8>, KeyValue>,
    pub historical: Vec<(HistoricalRead, Vec<KeyValue>)>,
}

impl GatheredView {
    /// The latest state after `changes` at `rev`, as the store would have it: the next write
    /// of a batch is evaluated against it (`meta.rs`).
    pub fn apply(&mut self, rev: i64, changes: &[Change]) {
        for change in changes {
            match &change.effect {
                Effect::Put { key, value, lease } => {
                    let previous = self.latest.get(key);
                    let kv = KeyValue {
                        key: key.clone(),
                        create_revision: previous.map_or(rev, |p| p.create_revision),
                        mod_revision: rev,
                        version: previous.map_or(1, |p| p.version + 1),
                        value: value.clone(),
                        lease: *lease,
                    };
                    self.latest.insert(key.clone(), kv);
                }
                Effect::Delete { key } => {
                    self.latest.remove(key);
                }
            }
        }
    }
}

impl View for GatheredView {
    fn latest(&self, key: &[u8], end: &[u8]) -> Vec<KeyValue> {
        let from = self.latest.range(key.to_vec()..).map(|(_, kv)| kv);
        from.take_while(|kv| in_range(&kv.key, key, end))
            .cloned()
            .collect()
    }

    /// A read that was not gathered (its revision was out of range) finds nothing; evaluation
    /// reports the bad revision before any op could use it.
    fn at(&self, key: &[u8], end: &[u8], rev: i64) -> Vec<KeyValue> {
        let wanted = (key.to_vec(), end.to_vec(), rev);
        let found = self.historical.iter().find(|(read, _)| *read == wanted);
        found.map(|(_, kvs)| kvs.clone()).unwrap_or_default()
    }
}

/// The revisions a request is evaluated at.
#[derive(Clone, Copy, Debug)]
pub struct Revs {
    /// The store's revision before the request (etcd's `beginRev`).
    pub current: i64,
    /// The oldest readable revision.
    pub compacted: i64,
}

/// What evaluating a write produced.
pub struct Outcome {
    pub response: TxnResponse,
    /// The revision the changes commit at; `None` when nothing changed.
    pub rev: Option<i64>,
    pub changes: Vec<Change>,
}

/// Whether `end` (etcd form) selects more than the single key `key`.
pub fn is_range(end: &[u8]) -> bool {
    !end.is_empty()
}

/// Whether `key` falls in etcd's range `[start, end)`: empty end = only `start`, `"\0"` = open.
pub fn in_range(key: &[u8], start: &[u8], end: &[u8]) -> bool {
    match end {
        [] => key == start,
        [0] => key >= start,
        _ => key >= start && key < end,
    }
}

// ---------------------------------------------------------------------------------------------
// Validation done before evaluation (etcd's v3rpc `check*Request` and `checkIntervals`).
// ---------------------------------------------------------------------------------------------

pub fn check_range(r: &RangeRequest) -> Result<(), KvError> {
    if r.key.is_empty() {
        return Err(KvError::EmptyKey);
    }
    Ok(())
}

pub fn check_put(r: &PutRequest) -> Result<(), KvError> {
    if r.key.is_empty() {
        return Err(KvError::EmptyKey);
    }
    if r.ignore_value && !r.value.is_empty() {
        return Err(KvError::ValueProvided);
    }
    if r.ignore_lease && r.lease != 0 {
        return Err(KvError::LeaseProvided);
    }
    Ok(())
}

pub fn check_delete(r: &DeleteRangeRequest) -> Result<(), KvError> {
    if r.key.is_empty() {
        return Err(KvError::EmptyKey);
    }
    Ok(())
}

/// etcd's `checkTxnRequest` followed by the put/delete overlap check of both branches.
pub fn check_txn(r: &TxnRequest, max_txn_ops: usize) -> Result<(), KvError> {
    check_txn_ops(r, max_txn_ops)?;
    check_intervals(&r.success)?;
    check_intervals(&r.failure)?;
    Ok(())
}

fn check_txn_ops(r: &TxnRequest, max_txn_ops: usize) -> Result<(), KvError> {
    let ops = r.compare.len().max(r.success.len()).max(r.failure.len());
    if ops > max_txn_ops {
        return Err(KvError::TooManyOps);
    }
    if r.compare.iter().any(|c| c.key.is_empty()) {
        return Err(KvError::EmptyKey);
    }
    for op in r.success.iter().chain(&r.failure) {
        match &op.request {
            Some(Request::RequestRange(q)) => check_range(q)?,
            Some(Request::RequestPut(q)) => check_put(q)?,
            Some(Request::RequestDeleteRange(q)) => check_delete(q)?,
            Some(Request::RequestTxn(q)) => check_txn_ops(q, max_txn_ops - ops)?,
            None => return Err(KvError::KeyNotFound),
        }
    }
    Ok(())
}

/// An interval of deleted keys, in etcd's range form.
type DelSpan = (Vec<u8>, Vec<u8>);

fn deleted(dels: &[DelSpan], key: &[u8]) -> bool {
    dels.iter().any(|(start, end)| in_range(key, start, end))
}

/// No key may be put twice, or put and deleted, along one path through a txn.
fn check_intervals(ops: &[RequestOp]) -> Result<(BTreeSet<Vec<u8>>, Vec<DelSpan>), KvError> {
    let mut dels: Vec<DelSpan> = ops
        .iter()
        .filter_map(|op| match &op.request {
            Some(Request::RequestDeleteRange(d)) => Some((d.key.clone(), d.range_end.clone())),
            _ => None,
        })
        .collect();
    let mut puts = BTreeSet::new();
    for op in ops {
        let Some(Request::RequestTxn(t)) = &op.request else {
            continue;
        };
        let (puts_then, dels_then) = check_intervals(&t.success)?;
        let (puts_else, dels_else) = check_intervals(&t.failure)?;
        for k in &puts_then {
            if puts.contains(k) || deleted(&dels, k) {
                return Err(KvError::DuplicateKey);
            }
            puts.insert(k.clone());
        }
        for k in puts_else {
            // A key put in both branches of one txn is fine: only one branch runs.
            if (puts.contains(&k) && !puts_then.contains(&k)) || deleted(&dels, &k) {
                return Err(KvError::DuplicateKey);
            }
            puts.insert(k);
        }
        dels.extend(dels_then);
        dels.extend(dels_else);
    }
    for op in ops {
        let Some(Request::RequestPut(p)) = &op.request else {
            continue;
        };
        if puts.contains(&p.key) || deleted(&dels, &p.key) {
            return Err(KvError::DuplicateKey);
        }
        puts.insert(p.key.clone());
    }
    Ok((puts, dels))
}

/// Every `(key, range_end)` a txn may read or write, in both branches, nested txns included.
pub fn txn_spans(r: &TxnRequest, out: &mut Vec<DelSpan>) {
    out.extend(
        r.compare
            .iter()
            .map(|c| (c.key.clone(), c.range_end.clone())),
    );
    for op in r.success.iter().chain(&r.failure) {
        match &op.request {
            Some(Request::RequestRange(q)) => out.push((q.key.clone(), q.range_end.clone())),
            Some(Request::RequestPut(q)) => out.push((q.key.clone(), Vec::new())),
            Some(Request::RequestDeleteRange(q)) => out.push((q.key.clone(), q.range_end.clone())),
            Some(Request::RequestTxn(q)) => txn_spans(q, out),
            None => {}
        }
    }
}

/// Whether a txn can change anything (etcd's `!isTxnReadonly`).
pub fn txn_may_write(r: &TxnRequest) -> bool {
    r.success
        .iter()
        .chain(&r.failure)
        .any(|op| match &op.request {
            Some(Request::RequestPut(_)) | Some(Request::RequestDeleteRange(_)) => true,
            Some(Request::RequestTxn(t)) => txn_may_write(t),
            _ => false,
        })
}

/// Historical range reads `(key, range_end, revision)` a txn contains.
pub fn txn_historical_ranges(r: &TxnRequest, out: &mut Vec<HistoricalRead>) {
    for op in r.success.iter().chain(&r.failure) {
        match &op.request {
            Some(Request::RequestRange(q)) if q.revision > 0 => {
                out.push((q.key.clone(), q.range_end.clone(), q.revision))
            }
            Some(Request::RequestTxn(t)) => txn_historical_ranges(t, out),
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Range: etcd's `applierV3backend.Range` on top of a raw, key-ordered result.
// ---------------------------------------------------------------------------------------------

/// How many key-ordered results a shard must return for `r` (0 = all): with sorting or
/// revision filters everything is fetched, else one more than the limit (for `more`).
pub fn fetch_limit(r: &RangeRequest) -> usize {
    let filtered = r.min_mod_revision != 0
        || r.max_mod_revision != 0
        || r.min_create_revision != 0
        || r.max_create_revision != 0;
    if r.sort_order != SortOrder::None as i32 || filtered || r.limit <= 0 {
        0
    } else {
        r.limit as usize + 1
    }
}

/// Checks a read revision like etcd's mvcc: future and compacted revisions are errors.
pub fn check_read_rev(rev: i64, revs: Revs) -> Result<(), KvError> {
    if rev > revs.current {
        return Err(KvError::FutureRev);
    }
    if rev > 0 && rev < revs.compacted {
        return Err(KvError::Compacted);
    }
    Ok(())
}

/// etcd's `checkRequestRange` for ranges inside a txn: any revision below the first readable
/// one (-1 before the first compaction), negative ones included, counts as compacted.
fn check_txn_read_rev(rev: i64, revs: Revs) -> Result<(), KvError> {
    let first_rev = if revs.compacted == 0 {
        -1
    } else {
        revs.compacted
    };
    if rev > revs.current {
        return Err(KvError::FutureRev);
    }
    if rev < first_rev {
        return Err(KvError::Compacted);
    }
    Ok(())
}

/// Turns the key-ordered result of a range (`total` = live keys in range) into etcd's response.
/// `kvs` may hold more than [`fetch_limit`]; like etcd, only that many (in key order) are
/// filtered and sorted, even when the sort target is not the key.
pub fn finish_range(
    r: &RangeRequest,
    mut kvs: Vec<KeyValue>,
    total: i64,
    header_rev: i64,
) -> RangeResponse {
    if r.count_only {
        kvs.clear();
    }
    let fetch = fetch_limit(r);
    if fetch > 0 {
        kvs.truncate(fetch);
    }
    kvs.retain(|kv| {
        !(r.max_mod_revision != 0 && kv.mod_revision > r.max_mod_revision
            || r.min_mod_revision != 0 && kv.mod_revision < r.min_mod_revision
            || r.max_create_revision != 0 && kv.create_revision > r.max_create_revision
            || r.min_create_revision != 0 && kv.create_revision < r.min_create_revision)
    });
    sort_kvs(r, &mut kvs);
    let mut more = false;
    if r.limit > 0 && kvs.len() > r.limit as usize {
        kvs.truncate(r.limit as usize);
        more = true;
    }
    RangeResponse {
        header: Some(revision_header(header_rev)),
        kvs: kvs.into_iter().map(|kv| to_pb(kv, r.keys_only)).collect(),
        more,
        count: total,
    }
}

fn sort_kvs(r: &RangeRequest, kvs: &mut [KeyValue]) {
    let target = SortTarget::try_from(r.sort_target).unwrap_or(SortTarget::Key);
    let mut order = SortOrder::try_from(r.sort_order).unwrap_or(SortOrder::None);
    if target != SortTarget::Key && order == SortOrder::None {
        order = SortOrder::Ascend;
    }
    let by = |a: &KeyValue, b: &KeyValue| -> Ordering {
        match target {
            SortTarget::Key => a.key.cmp(&b.key),
            SortTarget::Version => a.version.cmp(&b.version),
            SortTarget::Create => a.create_revision.cmp(&b.create_revision),
            SortTarget::Mod => a.mod_revision.cmp(&b.mod_revision),
            SortTarget::Value => a.value.cmp(&b.value),
        }
    };
    // Stable sorts keep ties in key order, as etcd's insertion sort does for small results.
    match order {
        SortOrder::None => {}
        SortOrder::Ascend => kvs.sort_by(by),
        SortOrder::Descend => kvs.sort_by(|a, b| by(b, a)),
    }
}

pub fn to_pb(kv: KeyValue, keys_only: bool) -> mvccpb::KeyValue {
    mvccpb::KeyValue {
        key: kv.key,
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
        value: if keys_only { Vec::new() } else { kv.value },
        lease: kv.lease,
    }
}

/// A header carrying only a revision, as etcd sets on responses nested in a txn.
pub fn revision_header(rev: i64) -> ResponseHeader {
    ResponseHeader {
        revision: rev,
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Txn evaluation (Put and DeleteRange are evaluated as one-op txns).
// ---------------------------------------------------------------------------------------------

/// Evaluates `r` against `view`. `take_rev` is called once, only if the chosen path changes
/// something, and returns the revision the changes commit at. `lease_exists` answers lease
/// lookups. With `put_first_checks_lease`, a plain Put reports a missing lease before a missing
/// key, as etcd's Put does (inside a txn etcd checks the key first).
pub fn evaluate_txn(
    view: &dyn View,
    r: &TxnRequest,
    revs: Revs,
    lease_exists: &dyn Fn(i64) -> bool,
    put_first_checks_lease: bool,
    take_rev: &mut dyn FnMut() -> i64,
) -> Result<Outcome, KvError> {
    let mut path = Vec::new();
    choose_path(view, r, &mut path);
    check_path(view, r, &path, revs, lease_exists, put_first_checks_lease)?;
    let changes_something = path_changes(view, r, &path);
    let rev = changes_something.then(take_rev);
    let mut exec = Exec {
        view,
        revs,
        rev,
        writes: BTreeMap::new(),
        changes: Vec::new(),
    };
    let mut cursor = 0;
    let mut response = exec.txn(r, &path, &mut cursor);
    assert_eq!(cursor, path.len(), "every compare decision is consumed");
    assert_eq!(
        exec.changes.is_empty(),
        rev.is_none(),
        "a revision is taken iff something changes"
    );
    response.header = Some(revision_header(rev.unwrap_or(revs.current)));
    Ok(Outcome {
        response,
        rev,
        changes: exec.changes,
    })
}

/// etcd's `compareToPath`: every compare on the chosen path, evaluated before any op runs.
fn choose_path(view: &dyn View, r: &TxnRequest, path: &mut Vec<bool>) {
    let ok = r.compare.iter().all(|c| compare_holds(view, c));
    path.push(ok);
    for op in branch(r, ok) {
        if let Some(Request::RequestTxn(t)) = &op.request {
            choose_path(view, t, path);
        }
    }
}

fn branch(r: &TxnRequest, succeeded: bool) -> &[RequestOp] {
    if succeeded {
        &r.success
    } else {
        &r.failure
    }
}

/// Visits the ops on the chosen path in execution order.
fn walk_path<'a>(
    r: &'a TxnRequest,
    path: &[bool],
    cursor: &mut usize,
    f: &mut dyn FnMut(&'a RequestOp),
) {
    let ok = path[*cursor];
    *cursor += 1;
    for op in branch(r, ok) {
        match &op.request {
            Some(Request::RequestTxn(t)) => walk_path(t, path, cursor, f),
            _ => f(op),
        }
    }
}

fn compare_holds(view: &dyn View, c: &Compare) -> bool {
    let kvs = view.latest(&c.key, &c.range_end);
    let target = CompareTarget::try_from(c.target).unwrap_or(CompareTarget::Version);
    if kvs.is_empty() {
        // A missing key has no value to compare, so a value compare always fails.
        return target != CompareTarget::Value && compare_kv(c, target, &KeyValue::default());
    }
    kvs.iter().all(|kv| compare_kv(c, target, kv))
}

fn compare_kv(c: &Compare, target: CompareTarget, kv: &KeyValue) -> bool {
    let ord = match (target, &c.target_union) {
        (CompareTarget::Value, Some(TargetUnion::Value(v))) => {
            kv.value.as_slice().cmp(v.as_slice())
        }
        (CompareTarget::Value, _) => kv.value.as_slice().cmp(&[][..]),
        (CompareTarget::Create, u) => kv
            .create_revision
            .cmp(&int_target(u, CompareTarget::Create)),
        (CompareTarget::Mod, u) => kv.mod_revision.cmp(&int_target(u, CompareTarget::Mod)),
        (CompareTarget::Version, u) => kv.version.cmp(&int_target(u, CompareTarget::Version)),
        (CompareTarget::Lease, u) => kv.lease.cmp(&int_target(u, CompareTarget::Lease)),
    };
    match CompareResult::try_from(c.result).unwrap_or(CompareResult::Equal) {
        CompareResult::Equal => ord == Ordering::Equal,
        CompareResult::NotEqual => ord != Ordering::Equal,
        CompareResult::Greater => ord == Ordering::Greater,
        CompareResult::Less => ord == Ordering::Less,
    }
}

/// The integer a compare is against; 0 when the union holds another target's field.
fn int_target(u: &Option<TargetUnion>, target: CompareTarget) -> i64 {
    match (target, u) {
        (CompareTarget::Create, Some(TargetUnion::CreateRevision(v)))
        | (CompareTarget::Mod, Some(TargetUnion::ModRevision(v)))
        | (CompareTarget::Version, Some(TargetUnion::Version(v)))
        | (CompareTarget::Lease, Some(TargetUnion::Lease(v))) => *v,
        _ => 0,
    }
}

/// etcd's `checkRequests`: puts needing a previous key or a lease, and range revisions, are
/// checked on the chosen path against the state before the txn.
fn check_path(
    view: &dyn View,
    r: &TxnRequest,
    path: &[bool],
    revs: Revs,
    lease_exists: &dyn Fn(i64) -> bool,
    put_first_checks_lease: bool,
) -> Result<(), KvError> {
    let mut result = Ok(());
    walk_path(r, path, &mut 0, &mut |op| {
        if result.is_err() {
            return;
        }
        result = match &op.request {
            Some(Request::RequestPut(p)) => {
                check_put_state(view, p, lease_exists, put_first_checks_lease)
            }
            Some(Request::RequestRange(q)) if q.revision != 0 => {
                check_txn_read_rev(q.revision, revs)
            }
            _ => Ok(()),
        };
    });
    result
}

fn check_put_state(
    view: &dyn View,
    p: &PutRequest,
    lease_exists: &dyn Fn(i64) -> bool,
    lease_first: bool,
) -> Result<(), KvError> {
    let lease_ok = p.lease == 0 || lease_exists(p.lease);
    if lease_first && !lease_ok {
        return Err(KvError::LeaseNotFound);
    }
    if (p.ignore_value || p.ignore_lease) && view.latest(&p.key, &[]).is_empty() {
        return Err(KvError::KeyNotFound);
    }
    if !lease_ok {
        return Err(KvError::LeaseNotFound);
    }
    Ok(())
}

/// Whether the chosen path changes anything: a put always does; a delete does if its range
/// holds a key (deletes run before any put could add one only if no put precedes them, so a
/// path without puts can be judged on the state before the txn).
fn path_changes(view: &dyn View, r: &TxnRequest, path: &[bool]) -> bool {
    let mut puts = false;
    let mut dels = Vec::new();
    walk_path(r, path, &mut 0, &mut |op| match &op.request {
        Some(Request::RequestPut(_)) => puts = true,
        Some(Request::RequestDeleteRange(d)) => dels.push(d),
        _ => {}
    });
    puts || dels
        .iter()
        .any(|d| !view.latest(&d.key, &d.range_end).is_empty())
}

/// Executes the ops of a chosen path, reading its own writes.
struct Exec<'a> {
    view: &'a dyn View,
    revs: Revs,
    rev: Option<i64>,
    /// This txn's writes so far: `None` = deleted.
    writes: BTreeMap<Vec<u8>, Option<KeyValue>>,
    changes: Vec<Change>,
}

impl Exec<'_> {
    /// The revision reads report: etcd's `beginRev`, plus one once this txn changed something.
    fn read_rev(&self) -> i64 {
        match self.rev {
            Some(rev) if !self.changes.is_empty() => rev,
            Some(rev) => rev - 1,
            None => self.revs.current,
        }
    }

    fn txn(&mut self, r: &TxnRequest, path: &[bool], cursor: &mut usize) -> TxnResponse {
        let ok = path[*cursor];
        *cursor += 1;
        let responses = branch(r, ok)
            .iter()
            .map(|op| ResponseOp {
                response: op.request.as_ref().map(|req| match req {
                    Request::RequestRange(q) => Response::ResponseRange(self.range(q)),
                    Request::RequestPut(q) => Response::ResponsePut(self.put(q)),
                    Request::RequestDeleteRange(q) => Response::ResponseDeleteRange(self.delete(q)),
                    Request::RequestTxn(t) => Response::ResponseTxn(self.nested(t, path, cursor)),
                }),
            })
            .collect();
        TxnResponse {
            header: None,
            succeeded: ok,
            responses,
        }
    }

    /// etcd gives a nested txn an empty header (revision 0).
    fn nested(&mut self, t: &TxnRequest, path: &[bool], cursor: &mut usize) -> TxnResponse {
        let mut response = self.txn(t, path, cursor);
        response.header = Some(ResponseHeader::default());
        response
    }

    /// The latest state of `[key, end)` including this txn's writes, by key.
    fn latest(&self, key: &[u8], end: &[u8]) -> Vec<KeyValue> {
        let mut merged: BTreeMap<Vec<u8>, KeyValue> = self
            .view
            .latest(key, end)
            .into_iter()
            .map(|kv| (kv.key.clone(), kv))
            .collect();
        for (k, w) in self.writes.iter().filter(|(k, _)| in_range(k, key, end)) {
            match w {
                Some(kv) => merged.insert(k.clone(), kv.clone()),
                None => merged.remove(k),
            };
        }
        merged.into_values().collect()
    }

    fn range(&mut self, q: &RangeRequest) -> RangeResponse {
        let kvs = if q.revision > 0 {
            self.view.at(&q.key, &q.range_end, q.revision)
        } else {
            self.latest(&q.key, &q.range_end)
        };
        let total = kvs.len() as i64;
        finish_range(q, kvs, total, self.read_rev())
    }

    fn put(&mut self, p: &PutRequest) -> PutResponse {
        let rev = self.rev.expect("a put always takes a revision");
        let prev = self.latest(&p.key, &[]).pop();
        let value = match (&prev, p.ignore_value) {
            (Some(prev), true) => prev.value.clone(),
            _ => p.value.clone(),
        };
        let lease = match (&prev, p.ignore_lease) {
            (Some(prev), true) => prev.lease,
            _ => p.lease,
        };
        let (create_revision, version) = match &prev {
            Some(prev) => (prev.create_revision, prev.version + 1),
            None => (rev, 1),
        };
        let kv = KeyValue {
            key: p.key.clone(),
            create_revision,
            mod_revision: rev,
            version,
            value,
            lease,
        };
        self.record(Effect::Put {
            key: p.key.clone(),
            value: kv.value.clone(),
            lease,
        });
        self.writes.insert(p.key.clone(), Some(kv));
        PutResponse {
            header: Some(revision_header(rev)),
            prev_kv: if p.prev_kv {
                prev.map(|kv| to_pb(kv, false))
            } else {
                None
            },
        }
    }

    fn delete(&mut self, d: &DeleteRangeRequest) -> DeleteRangeResponse {
        let victims = self.latest(&d.key, &d.range_end);
        for kv in &victims {
            self.record(Effect::Delete {
                key: kv.key.clone(),
            });
            self.writes.insert(kv.key.clone(), None);
        }
        DeleteRangeResponse {
            header: Some(revision_header(self.read_rev())),
            deleted: victims.len() as i64,
            prev_kvs: if d.prev_kv {
                victims.into_iter().map(|kv| to_pb(kv, false)).collect()
            } else {
                Vec::new()
            },
        }
    }

    fn record(&mut self, effect: Effect) {
        let sub = self.changes.len() as i64;
        self.changes.push(Change { sub, effect });
    }
}

/// Wraps a Put as a one-op txn, so it shares the txn path.
pub fn put_as_txn(p: PutRequest) -> TxnRequest {
    one_op_txn(Request::RequestPut(p))
}

/// Wraps a DeleteRange as a one-op txn.
pub fn delete_as_txn(d: DeleteRangeRequest) -> TxnRequest {
    one_op_txn(Request::RequestDeleteRange(d))
}

fn one_op_txn(request: Request) -> TxnRequest {
    TxnRequest {
        compare: Vec::new(),
        success: vec![RequestOp {
            request: Some(request),
        }],
        failure: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrocd_engine::mvcc::Store;

    struct StoreView<'a>(&'a Store);
    impl View for StoreView<'_> {
        fn latest(&self, key: &[u8], end: &[u8]) -> Vec<KeyValue> {
            self.0.range(key, end, Store::LATEST, 0).kvs
        }
        fn at(&self, key: &[u8], end: &[u8], rev: i64) -> Vec<KeyValue> {
            self.0.range(key, end, rev, 0).kvs
        }
    }

    /// A batch's view after changes equals the store's latest state after the same changes
    /// (puts, overwrites, deletes, re-creation after a delete, leases).
    #[test]
    fn a_gathered_view_follows_changes_as_the_store_does() {
        let mut store = Store::new();
        let mut view = GatheredView::default();
        let put = |key: &str, value: &str, lease: i64| Effect::Put {
            key: key.into(),
            value: value.into(),
            lease,
        };
        let delete = |key: &str| Effect::Delete { key: key.into() };
        let steps = [
            vec![put("a", "1", 0), put("b", "1", 7)],
            vec![put("a", "2", 0)],
            vec![delete("a"), put("c", "1", 0)],
            vec![put("a", "3", 9), delete("b")],
            vec![put("a", "4", 0), put("c", "2", 0)],
        ];
        for (rev, effects) in (2..).zip(steps) {
            let changes: Vec<Change> = effects
                .into_iter()
                .enumerate()
                .map(|(sub, effect)| Change {
                    sub: sub as i64,
                    effect,
                })
                .collect();
            store.apply(rev, &changes);
            view.apply(rev, &changes);
            let expected = store.range(b"", b"\0", Store::LATEST, 0).kvs;
            assert_eq!(view.latest(b"", b"\0"), expected, "after revision {rev}");
        }
    }

    fn put(k: &str, v: &str) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestPut(PutRequest {
                key: k.into(),
                value: v.into(),
                ..Default::default()
            })),
        }
    }

    fn run(store: &mut Store, r: &TxnRequest, current: &mut i64) -> TxnResponse {
        let revs = Revs {
            current: *current,
            compacted: 0,
        };
        let next = *current + 1;
        let out =
            evaluate_txn(&StoreView(store), r, revs, &|_| false, false, &mut || next).unwrap();
        if let Some(rev) = out.rev {
            store.apply(rev, &out.changes);
            *current = rev;
        }
        out.response
    }

    #[test]
    fn txn_reads_its_own_writes_and_reports_etcd_revisions() {
        let mut store = Store::new();
        let mut current = 1;
        let txn = TxnRequest {
            success: vec![
                RequestOp {
                    request: Some(Request::RequestRange(RangeRequest {
                        key: "a".into(),
                        ..Default::default()
                    })),
                },
                put("a", "1"),
                RequestOp {
                    request: Some(Request::RequestRange(RangeRequest {
                        key: "a".into(),
                        ..Default::default()
                    })),
                },
            ],
            ..Default::default()
        };
        let resp = run(&mut store, &txn, &mut current);
        assert_eq!(current, 2);
        assert_eq!(resp.header.unwrap().revision, 2);
        let Some(Response::ResponseRange(before)) = &resp.responses[0].response else {
            panic!()
        };
        assert_eq!(
            (before.count, before.header.as_ref().unwrap().revision),
            (0, 1)
        );
        let Some(Response::ResponseRange(after)) = &resp.responses[2].response else {
            panic!()
        };
        assert_eq!(
            (after.count, after.header.as_ref().unwrap().revision),
            (1, 2)
        );
        assert_eq!(after.kvs[0].mod_revision, 2);
    }

    #[test]
    fn a_delete_of_nothing_takes_no_revision() {
        let mut store = Store::new();
        let mut current = 1;
        let resp = run(
            &mut store,
            &delete_as_txn(DeleteRangeRequest {
                key: "x".into(),
                ..Default::default()
            }),
            &mut current,
        );
        assert_eq!(current, 1);
        assert_eq!(resp.header.unwrap().revision, 1);
    }

    #[test]
    fn overlapping_put_and_delete_is_a_duplicate_key() {
        let del = RequestOp {
            request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
                key: "a".into(),
                range_end: "b".into(),
                ..Default::default()
            })),
        };
        let txn = TxnRequest {
            success: vec![del, put("a1", "v")],
            ..Default::default()
        };
        assert_eq!(check_txn(&txn, 128), Err(KvError::DuplicateKey));
        let both_branches = TxnRequest {
            success: vec![put("k", "1")],
            failure: vec![put("k", "2")],
            ..Default::default()
        };
        assert_eq!(check_txn(&both_branches, 128), Ok(()));
    }

    #[test]
    fn value_compare_on_a_missing_key_fails() {
        let store = Store::new();
        let c = Compare {
            key: "nope".into(),
            target: CompareTarget::Value as i32,
            result: CompareResult::NotEqual as i32,
            target_union: Some(TargetUnion::Value(b"x".to_vec())),
            ..Default::default()
        };
        assert!(!compare_holds(&StoreView(&store), &c));
    }
}
