//! The etcd KV model: the whole key space with its revision, as one object.
//!
//! Every response carries `header.revision`, which the model checks exactly: a write that
//! changes something takes the next revision, a read or a write that changes nothing reports
//! the current one. etcd's own rules that matter here: `version` is 1 on create and +1 per
//! put, `create_revision` is kept across puts, a delete resets the key; a compare of the value
//! of a missing key is false, a compare of its mod revision sees 0.
//!
//! A write with an unknown outcome may have taken effect (one revision) or not (none). With
//! `revision_gaps`, it may also have consumed a revision without effect: ferrocd takes a
//! write's revision before the write is durable, so a kill -9 can lose a write whose revision
//! is below a later one that survived (docs/ARCHITECTURE.md, "Revisions, visibility and
//! acknowledgement"). That write was never acknowledged, so its client saw an unknown outcome;
//! modelling the gap on it is exact. Real etcd never leaves gaps on a single node.

use std::collections::BTreeMap;
use std::fmt;

use super::{Model, Outcome};

/// A key's state as a Range reports it (leases are not modelled yet).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyValue {
    pub value: String,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub version: i64,
}

/// The store: its current revision and every live key.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct State {
    pub revision: i64,
    pub kvs: BTreeMap<String, KeyValue>,
}

impl fmt::Debug for State {
    /// Compact: `rev 7 {a=v1 (c3 m5 v2), b=...}`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rev {} {{", self.revision)?;
        for (index, (key, kv)) in self.kvs.iter().enumerate() {
            let separator = if index == 0 { "" } else { ", " };
            write!(
                f,
                "{separator}{key}={} (c{} m{} v{})",
                kv.value, kv.create_revision, kv.mod_revision, kv.version
            )?;
        }
        write!(f, "}}")
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// A linearizable Range of one key.
    Get {
        key: String,
    },
    /// A linearizable Range of every key under a prefix.
    Range {
        prefix: String,
    },
    Put {
        key: String,
        value: String,
    },
    Delete {
        key: String,
    },
    /// `Txn { compare } then put(key, value) else get(key)`.
    CompareAndSet {
        key: String,
        compare: Compare,
        value: String,
    },
}

impl Request {
    pub fn is_write(&self) -> bool {
        !matches!(self, Request::Get { .. } | Request::Range { .. })
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
}

impl Response {
    /// The revision of the state the request saw: the header's, less one for a response
    /// that changed something.
    fn evaluated_at(&self) -> i64 {
        let changed = match self {
            Response::Get { .. } | Response::Range { .. } => false,
            Response::Put { .. } => true,
            Response::Delete { deleted, .. } => *deleted > 0,
            Response::CompareAndSet { succeeded, .. } => *succeeded,
        };
        self.revision() - i64::from(changed)
    }

    pub fn revision(&self) -> i64 {
        match self {
            Response::Get { revision, .. }
            | Response::Range { revision, .. }
            | Response::Put { revision }
            | Response::Delete { revision, .. }
            | Response::CompareAndSet { revision, .. } => *revision,
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
            Request::Range { prefix } => {
                let kvs = state
                    .kvs
                    .range(prefix.clone()..)
                    .take_while(|(key, _)| key.starts_with(prefix.as_str()))
                    .map(|(key, kv)| (key.clone(), kv.clone()))
                    .collect();
                (None, Response::Range { revision, kvs })
            }
            Request::Put { key, value } => {
                let next = put(state, key, value);
                let revision = next.revision;
                (Some(next), Response::Put { revision })
            }
            Request::Delete { key } => {
                if !state.kvs.contains_key(key) {
                    let response = Response::Delete {
                        revision,
                        deleted: 0,
                    };
                    return (None, response);
                }
                let mut next = state.clone();
                next.revision += 1;
                next.kvs.remove(key);
                let revision = next.revision;
                (
                    Some(next),
                    Response::Delete {
                        revision,
                        deleted: 1,
                    },
                )
            }
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
                let next = put(state, key, value);
                let response = Response::CompareAndSet {
                    revision: next.revision,
                    succeeded: true,
                    kv: None,
                };
                (Some(next), response)
            }
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
            Outcome::Ok(actual) if *actual == expected => {
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
        state.revision <= response.evaluated_at()
    }
}

impl EtcdModel {
    /// What an unknown write may have done beyond nothing: its effect, and with
    /// `revision_gaps` a revision consumed without effect. A write that would change nothing
    /// takes no revision, so it cannot leave a gap either.
    fn unknown_effects(&self, state: &State, next: Option<State>) -> Vec<State> {
        let Some(next) = next else {
            return Vec::new();
        };
        let mut effects = vec![next];
        if self.revision_gaps {
            let mut gap = state.clone();
            gap.revision += 1;
            effects.push(gap);
        }
        effects
    }
}

fn put(state: &State, key: &str, value: &str) -> State {
    let mut next = state.clone();
    next.revision += 1;
    let revision = next.revision;
    let kv = match state.kvs.get(key) {
        Some(old) => KeyValue {
            value: value.to_string(),
            create_revision: old.create_revision,
            mod_revision: revision,
            version: old.version + 1,
        },
        None => KeyValue {
            value: value.to_string(),
            create_revision: revision,
            mod_revision: revision,
            version: 1,
        },
    };
    next.kvs.insert(key.to_string(), kv);
    next
}

fn compare_holds(compare: &Compare, current: Option<&KeyValue>) -> bool {
    match (compare, current) {
        (Compare::ModRevision(expected), Some(kv)) => kv.mod_revision == *expected,
        (Compare::ModRevision(expected), None) => *expected == 0,
        (Compare::Value(expected), Some(kv)) => kv.value == *expected,
        (Compare::Value(_), None) => false,
    }
}
