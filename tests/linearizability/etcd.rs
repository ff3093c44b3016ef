//! The etcd KV model: the whole key space with its revision, leases and compaction, as one
//! object.
//!
//! Every response carries `header.revision`, which the model checks exactly (a compaction's
//! only from below, see `answers`): a write that
//! changes something takes the next revision, a read or a write that changes nothing reports
//! the current one. etcd's own rules that matter here: `version` is 1 on create and +1 per
//! put, `create_revision` is kept across puts, a delete resets the key; a compare of the value
//! of a missing key is false, a compare of its mod revision sees 0; a put without a lease
//! detaches the key from its lease; revoking a lease deletes every key attached to it at one
//! revision (none when no key is attached); a compaction takes no revision, reads below the
//! compacted revision and compactions at or below it fail with `ErrCompacted`, and anything
//! above the current revision fails with `ErrFutureRev`.
//!
//! Reads at a past revision are answered from the changes the model has made since the
//! check's first state (kept in the state as a shared list, newest first) and, below that
//! state, from snapshots the harness read before the round (`Past`).
//!
//! A write with an unknown outcome may have taken effect or not. With `revision_gaps`, it may
//! also have consumed a revision without effect: ferrocd takes a write's revision before the
//! write is durable, so a kill -9 can lose a write whose revision is below a later one that
//! survived (docs/ARCHITECTURE.md, "Revisions, visibility and acknowledgement"). That write
//! was never acknowledged, so its client saw an unknown outcome; modelling the gap on it is
//! exact. Real etcd never leaves gaps on a single node.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use super::{Model, Outcome};

/// A key's state as a Range reports it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyValue {
    pub value: String,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub version: i64,
    /// The lease the key is attached to, 0 for none.
    pub lease: i64,
}

/// Key spaces at revisions before the check's first state, read by the harness; constant
/// during a check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Past {
    pub snapshots: BTreeMap<i64, BTreeMap<String, KeyValue>>,
}

/// The store: its current revision, compaction, leases and every live key.
#[derive(Clone, Default)]
pub struct State {
    pub revision: i64,
    /// etcd's `compactMainRev`: reads below it fail, compacting at or below it fails.
    pub compacted: i64,
    pub kvs: BTreeMap<String, KeyValue>,
    pub leases: BTreeSet<i64>,
    /// Every change since the check's first state, newest first.
    pub changes: Changes,
    pub past: Arc<Past>,
}

impl PartialEq for State {
    /// `past` is the same for every state of a check; `changes` compares by its hash.
    fn eq(&self, other: &State) -> bool {
        self.revision == other.revision
            && self.compacted == other.compacted
            && self.kvs == other.kvs
            && self.leases == other.leases
            && self.changes.digest() == other.changes.digest()
    }
}

impl Eq for State {}

impl Hash for State {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.revision.hash(state);
        self.compacted.hash(state);
        self.kvs.hash(state);
        self.leases.hash(state);
        self.changes.digest().hash(state);
    }
}

impl fmt::Debug for State {
    /// Compact: `rev 7 compacted 3 leases [5] {a=v1 (c3 m5 v2 l5), b=...}`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rev {} compacted {} leases {:?} {{",
            self.revision, self.compacted, self.leases
        )?;
        for (index, (key, kv)) in self.kvs.iter().enumerate() {
            let separator = if index == 0 { "" } else { ", " };
            write!(
                f,
                "{separator}{key}={} (c{} m{} v{} l{})",
                kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease
            )?;
        }
        write!(f, "}}")
    }
}

impl State {
    /// The key's state at `revision` (at most the current one): from the changes since the
    /// check's first state, else from the newest snapshot at or below it (the harness
    /// includes the first state's), else, for a key that never changed, its current state.
    /// `None` when the model has no record of that revision.
    pub fn key_at(&self, key: &str, revision: i64) -> Option<Option<KeyValue>> {
        if let Some(found) = self.changes.find(key, revision) {
            return Some(found.cloned());
        }
        if let Some((_, snapshot)) = self.past.snapshots.range(..=revision).next_back() {
            return Some(snapshot.get(key).cloned());
        }
        let never_changed = self.changes.iter().all(|change| change.key != key);
        let since_first_state = revision >= self.changes.base_revision(self.revision);
        (never_changed && since_first_state).then(|| self.kvs.get(key).cloned())
    }
}

/// A persistent list of changes, newest first, with a running hash of the whole list.
#[derive(Clone, Default)]
pub struct Changes(Option<Arc<Change>>);

pub struct Change {
    revision: i64,
    key: String,
    /// The key after the change; `None` for a delete.
    kv: Option<KeyValue>,
    digest: u64,
    older: Changes,
}

impl Changes {
    fn push(&self, revision: i64, key: &str, kv: Option<KeyValue>) -> Changes {
        let mut hasher = DefaultHasher::new();
        (self.digest(), revision, key, &kv).hash(&mut hasher);
        Changes(Some(Arc::new(Change {
            revision,
            key: key.to_string(),
            kv,
            digest: hasher.finish(),
            older: self.clone(),
        })))
    }

    fn digest(&self) -> u64 {
        self.0.as_ref().map_or(0, |change| change.digest)
    }

    fn iter(&self) -> impl Iterator<Item = &Change> {
        std::iter::successors(self.0.as_deref(), |change| change.older.0.as_deref())
    }

    /// The key after the newest change to it at or below `revision`, if the list has one.
    fn find(&self, key: &str, revision: i64) -> Option<Option<&KeyValue>> {
        self.iter()
            .skip_while(|change| change.revision > revision)
            .find(|change| change.key == key)
            .map(|change| change.kv.as_ref())
    }

    /// The revision of the check's first state: below the oldest change, else `current`.
    fn base_revision(&self, current: i64) -> i64 {
        self.iter()
            .last()
            .map_or(current, |change| change.revision - 1)
    }
}

impl Drop for Change {
    /// Unlinks the list iteratively: a recursive drop of a long history overflows the stack.
    fn drop(&mut self) {
        let mut older = self.older.0.take();
        while let Some(change) = older {
            match Arc::try_unwrap(change) {
                Ok(mut owned) => older = owned.older.0.take(),
                Err(_) => break,
            }
        }
    }
}

/// The guard of a compare-and-set txn (always `EQUAL`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// `mod_revision == n`; 0 matches a missing key.
    ModRevision(i64),
    /// `value == v`; never matches a missing key.
    Value(String),
}

/// One write of a multi-key txn's success branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    Put { key: String, value: String },
    Delete { key: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// A linearizable Range of one key.
    Get {
        key: String,
    },
    /// A Range of one key at a past revision.
    GetAt {
        key: String,
        revision: i64,
    },
    /// A linearizable Range of every key under a prefix.
    Range {
        prefix: String,
    },
    /// A put, attached to `lease` unless it is 0.
    Put {
        key: String,
        value: String,
        lease: i64,
    },
    Delete {
        key: String,
    },
    /// A DeleteRange of every key under a prefix.
    DeletePrefix {
        prefix: String,
    },
    /// `Txn { compare } then put(key, value) else get(key)`.
    CompareAndSet {
        key: String,
        compare: Compare,
        value: String,
    },
    /// `Txn { every guard } then writes (distinct keys) else get(each guard's key)`.
    Txn {
        guards: Vec<(String, Compare)>,
        writes: Vec<Write>,
    },
    /// A LeaseGrant with a client-chosen ID (and a TTL longer than any test).
    LeaseGrant {
        id: i64,
    },
    LeaseRevoke {
        id: i64,
    },
    Compact {
        revision: i64,
    },
    /// Maintenance: rewrites the backend; changes nothing a client can see.
    Defragment,
}

impl Request {
    /// Whether it may change the state (an unknown outcome then matters).
    pub fn is_write(&self) -> bool {
        !matches!(
            self,
            Request::Get { .. }
                | Request::GetAt { .. }
                | Request::Range { .. }
                | Request::Defragment
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Get {
        revision: i64,
        kv: Option<KeyValue>,
    },
    /// Keys in key order.
    Range {
        revision: i64,
        kvs: Vec<(String, KeyValue)>,
    },
    Put {
        revision: i64,
    },
    /// A Delete's or a DeletePrefix's.
    Delete {
        revision: i64,
        deleted: i64,
    },
    /// `kv` is the else branch's get (none when the txn succeeded).
    CompareAndSet {
        revision: i64,
        succeeded: bool,
        kv: Option<KeyValue>,
    },
    /// `kvs` are the else branch's gets, one per guard (empty when the txn succeeded).
    Txn {
        revision: i64,
        succeeded: bool,
        kvs: Vec<Option<KeyValue>>,
    },
    LeaseGrant {
        revision: i64,
    },
    LeaseRevoke {
        revision: i64,
    },
    Compact {
        revision: i64,
    },
    /// A Defragment's success; its header revision is not compared (etcd 3.4 sends none).
    Defragmented,
    /// `etcdserver: mvcc: required revision has been compacted`.
    Compacted,
    /// `etcdserver: mvcc: required revision is a future revision`.
    FutureRevision,
    /// `etcdserver: requested lease not found`.
    LeaseNotFound,
}

impl Response {
    /// The revision of the state the request saw (the header's, less one for a response
    /// that changed something); `None` for errors, which carry no header.
    fn evaluated_at(&self) -> Option<i64> {
        let changed = match self {
            Response::Put { .. } => true,
            Response::Delete { deleted, .. } => *deleted > 0,
            Response::CompareAndSet { succeeded, .. } | Response::Txn { succeeded, .. } => {
                *succeeded
            }
            // A revoke takes a revision only when keys were attached: the header's revision
            // is the latest it can have seen (an earlier bound could cut a valid path).
            Response::LeaseRevoke { .. } => false,
            _ => false,
        };
        Some(self.revision()? - i64::from(changed))
    }

    /// The header's revision; `None` for errors.
    pub fn revision(&self) -> Option<i64> {
        match self {
            Response::Get { revision, .. }
            | Response::Range { revision, .. }
            | Response::Put { revision }
            | Response::Delete { revision, .. }
            | Response::CompareAndSet { revision, .. }
            | Response::Txn { revision, .. }
            | Response::LeaseGrant { revision }
            | Response::LeaseRevoke { revision }
            | Response::Compact { revision } => Some(*revision),
            Response::Defragmented
            | Response::Compacted
            | Response::FutureRevision
            | Response::LeaseNotFound => None,
        }
    }
}

/// The observed response differs from the one the model gives in that state.
pub struct Mismatch {
    pub expected: Response,
    pub actual: Response,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "expected {:?}, got {:?}", self.expected, self.actual)
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct EtcdModel {
    /// An unknown write may consume a revision without effect (ferrocd after kill -9).
    pub revision_gaps: bool,
}

impl EtcdModel {
    /// Runs `request` on `state`: the new state when it changed something, and the response.
    pub fn apply(state: &State, request: &Request) -> (Option<State>, Response) {
        let revision = state.revision;
        match request {
            Request::Get { key } => {
                let kv = state.kvs.get(key).cloned();
                (None, Response::Get { revision, kv })
            }
            Request::GetAt { key, revision: at } => (None, get_at(state, key, *at)),
            Request::Range { prefix } => {
                let kvs = state
                    .kvs
                    .range(prefix.clone()..)
                    .take_while(|(key, _)| key.starts_with(prefix.as_str()))
                    .map(|(key, kv)| (key.clone(), kv.clone()))
                    .collect();
                (None, Response::Range { revision, kvs })
            }
            Request::Put { key, value, lease } => {
                if *lease != 0 && !state.leases.contains(lease) {
                    return (None, Response::LeaseNotFound);
                }
                let next = Change::begin(state).put(key, value, *lease).finish();
                let revision = next.revision;
                (Some(next), Response::Put { revision })
            }
            Request::Delete { key } => delete_where(state, |k| k == key),
            Request::DeletePrefix { prefix } => delete_where(state, |k| k.starts_with(prefix)),
            Request::CompareAndSet {
                key,
                compare,
                value,
            } => {
                let current = state.kvs.get(key);
                if !compare_holds(compare, current) {
                    let response = Response::CompareAndSet {
                        revision,
                        succeeded: false,
                        kv: current.cloned(),
                    };
                    return (None, response);
                }
                let next = Change::begin(state).put(key, value, 0).finish();
                let response = Response::CompareAndSet {
                    revision: next.revision,
                    succeeded: true,
                    kv: None,
                };
                (Some(next), response)
            }
            Request::Txn { guards, writes } => txn(state, guards, writes),
            Request::LeaseGrant { id } => {
                let mut next = state.clone();
                next.leases.insert(*id);
                (Some(next), Response::LeaseGrant { revision })
            }
            Request::LeaseRevoke { id } => revoke(state, *id),
            Request::Compact { revision: at } => {
                if *at <= state.compacted {
                    return (None, Response::Compacted);
                }
                if *at > state.revision {
                    return (None, Response::FutureRevision);
                }
                let mut next = state.clone();
                next.compacted = *at;
                (Some(next), Response::Compact { revision })
            }
            Request::Defragment => (None, Response::Defragmented),
        }
    }
}

impl Model for EtcdModel {
    type State = State;
    type Input = Request;
    type Output = Response;
    type Rejection = Mismatch;

    fn step(
        &self,
        state: &State,
        request: &Request,
        outcome: &Outcome<Response>,
    ) -> Result<Vec<State>, Mismatch> {
        let (next, expected) = EtcdModel::apply(state, request);
        match outcome {
            Outcome::Ok(actual) if answers(&expected, actual) => {
                Ok(vec![next.unwrap_or_else(|| state.clone())])
            }
            Outcome::Ok(actual) => Err(Mismatch {
                expected,
                actual: actual.clone(),
            }),
            Outcome::Unknown => Ok(self.unknown_effects(state, next)),
            Outcome::Failed => unreachable!("definite failures are dropped before the search"),
        }
    }

    /// Revisions never decrease along a linearization, so a response can only follow states
    /// whose revision is at most the one it was evaluated at.
    fn may_follow(&self, state: &State, _request: &Request, response: &Response) -> bool {
        response
            .evaluated_at()
            .is_none_or(|evaluated_at| state.revision <= evaluated_at)
    }
}

/// Whether `actual` is the model's `expected` answer. A compaction's header revision is read
/// when etcd answers it (`resp.Header.Revision = s.kv.Rev()` in `EtcdServer::Compact`, after
/// the apply), so writes applied in between show in it: it may be above the model's. Seen on
/// a 3-member etcd cluster, where answers take a round trip longer.
fn answers(expected: &Response, actual: &Response) -> bool {
    match (expected, actual) {
        (
            Response::Compact {
                revision: applied_at,
            },
            Response::Compact { revision },
        ) => revision >= applied_at,
        _ => expected == actual,
    }
}

impl EtcdModel {
    /// What an unknown write may have done beyond nothing: its effect, and with
    /// `revision_gaps` a revision consumed without effect where the write took a revision.
    fn unknown_effects(&self, state: &State, next: Option<State>) -> Vec<State> {
        let Some(next) = next else {
            return Vec::new();
        };
        let took_revision = next.revision > state.revision;
        let mut effects = vec![next];
        if self.revision_gaps && took_revision {
            let mut gap = state.clone();
            gap.revision += 1;
            effects.push(gap);
        }
        effects
    }
}

/// The changes of one request, all at the next revision.
struct ChangeSet {
    next: State,
    changed: bool,
}

impl Change {
    fn begin(state: &State) -> ChangeSet {
        let mut next = state.clone();
        next.revision += 1;
        ChangeSet {
            next,
            changed: false,
        }
    }
}

impl ChangeSet {
    fn put(mut self, key: &str, value: &str, lease: i64) -> ChangeSet {
        let revision = self.next.revision;
        let kv = match self.next.kvs.get(key) {
            Some(old) => KeyValue {
                value: value.to_string(),
                create_revision: old.create_revision,
                mod_revision: revision,
                version: old.version + 1,
                lease,
            },
            None => KeyValue {
                value: value.to_string(),
                create_revision: revision,
                mod_revision: revision,
                version: 1,
                lease,
            },
        };
        self.next.changes = self.next.changes.push(revision, key, Some(kv.clone()));
        self.next.kvs.insert(key.to_string(), kv);
        self.changed = true;
        self
    }

    fn delete(mut self, key: &str) -> ChangeSet {
        if self.next.kvs.remove(key).is_some() {
            let revision = self.next.revision;
            self.next.changes = self.next.changes.push(revision, key, None);
            self.changed = true;
        }
        self
    }

    /// The new state; one that changed nothing takes no revision, so it is `state` again
    /// but for what the caller changed outside the key space.
    fn finish(mut self) -> State {
        if !self.changed {
            self.next.revision -= 1;
        }
        self.next
    }
}

fn get_at(state: &State, key: &str, at: i64) -> Response {
    if at < state.compacted {
        return Response::Compacted;
    }
    if at > state.revision {
        return Response::FutureRevision;
    }
    let revision = state.revision;
    match state.key_at(key, at) {
        Some(kv) => Response::Get { revision, kv },
        // The harness reads the past it lets clients read: a gap in it is a harness bug.
        None => panic!("the model has no record of revision {at}"),
    }
}

fn delete_where(state: &State, matches: impl Fn(&str) -> bool) -> (Option<State>, Response) {
    let doomed: Vec<&String> = state.kvs.keys().filter(|key| matches(key)).collect();
    if doomed.is_empty() {
        let response = Response::Delete {
            revision: state.revision,
            deleted: 0,
        };
        return (None, response);
    }
    let deleted = doomed.len() as i64;
    let next = doomed
        .into_iter()
        .fold(Change::begin(state), |set, key| set.delete(key))
        .finish();
    let revision = next.revision;
    (Some(next), Response::Delete { revision, deleted })
}

fn txn(state: &State, guards: &[(String, Compare)], writes: &[Write]) -> (Option<State>, Response) {
    let holds = guards
        .iter()
        .all(|(key, compare)| compare_holds(compare, state.kvs.get(key)));
    if !holds {
        let kvs = guards
            .iter()
            .map(|(key, _)| state.kvs.get(key).cloned())
            .collect();
        let response = Response::Txn {
            revision: state.revision,
            succeeded: false,
            kvs,
        };
        return (None, response);
    }
    let set = writes
        .iter()
        .fold(Change::begin(state), |set, write| match write {
            Write::Put { key, value } => set.put(key, value, 0),
            Write::Delete { key } => set.delete(key),
        });
    let changed = set.changed;
    let next = set.finish();
    let response = Response::Txn {
        revision: next.revision,
        succeeded: true,
        kvs: Vec::new(),
    };
    (changed.then_some(next), response)
}

fn revoke(state: &State, id: i64) -> (Option<State>, Response) {
    if !state.leases.contains(&id) {
        return (None, Response::LeaseNotFound);
    }
    let attached: Vec<&String> = state
        .kvs
        .iter()
        .filter(|(_, kv)| kv.lease == id)
        .map(|(key, _)| key)
        .collect();
    let mut next = attached
        .into_iter()
        .fold(Change::begin(state), |set, key| set.delete(key))
        .finish();
    next.leases.remove(&id);
    let revision = next.revision;
    (Some(next), Response::LeaseRevoke { revision })
}

fn compare_holds(compare: &Compare, current: Option<&KeyValue>) -> bool {
    match (compare, current) {
        (Compare::ModRevision(expected), Some(kv)) => kv.mod_revision == *expected,
        (Compare::ModRevision(expected), None) => *expected == 0,
        (Compare::Value(expected), Some(kv)) => kv.value == *expected,
        (Compare::Value(_), None) => false,
    }
}
