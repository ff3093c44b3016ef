//! Who leads: the member's view of the meta group's leader and term, shared by every core.
//!
//! A single member leads always (term 1). In a cluster the meta group's Raft driver
//! (`replica.rs`) publishes every change it sees; request paths ask [`Role::remote_leader`]
//! whether to serve a write here or forward it to the leader.

use super::errors::KvError;
use event_listener::Event;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};

/// "No leader known" in the `leader` slot (etcd's raft uses 0 for none, too).
const NO_LEADER: u64 = 0;

pub struct Role {
    member_id: u64,
    clustered: bool,
    leader: AtomicU64,
    term: AtomicU64,
    /// This member leads and has finished taking over (fenced the revision counter), so it
    /// may evaluate writes.
    serving: AtomicBool,
    /// Clustered: the meta group's commit and applied indexes, for Maintenance.Status.
    commit_index: AtomicU64,
    applied_index: AtomicU64,
    /// Notified on every leadership change.
    changed: Event,
}

impl Role {
    /// A member that is the only voter: it leads at term 1 from the start.
    pub fn single(member_id: u64) -> Role {
        Role {
            member_id,
            clustered: false,
            leader: AtomicU64::new(member_id),
            term: AtomicU64::new(crate::node::shard::SINGLE_VOTER_TERM),
            serving: AtomicBool::new(true),
            commit_index: AtomicU64::new(0),
            applied_index: AtomicU64::new(0),
            changed: Event::new(),
        }
    }

    /// A member of a cluster: no leader known until the driver reports one.
    pub fn clustered(member_id: u64) -> Role {
        Role {
            member_id,
            clustered: true,
            leader: AtomicU64::new(NO_LEADER),
            term: AtomicU64::new(0),
            serving: AtomicBool::new(false),
            commit_index: AtomicU64::new(0),
            applied_index: AtomicU64::new(0),
            changed: Event::new(),
        }
    }

    pub fn is_clustered(&self) -> bool {
        self.clustered
    }

    pub fn member_id(&self) -> u64 {
        self.member_id
    }

    /// The leader as last seen, if any.
    pub fn leader(&self) -> Option<u64> {
        Some(self.leader.load(SeqCst)).filter(|&id| id != NO_LEADER)
    }

    pub fn term(&self) -> u64 {
        self.term.load(SeqCst)
    }

    /// Whether this member may evaluate writes now.
    pub fn is_serving(&self) -> bool {
        self.serving.load(SeqCst)
    }

    /// Where a write goes: `Ok(None)` to be served here (this member leads), `Ok(Some(id))`
    /// to be forwarded to member `id`, `NoLeader` while none is known.
    pub fn remote_leader(&self) -> Result<Option<u64>, KvError> {
        match self.leader() {
            None => Err(KvError::NoLeader),
            Some(id) if id == self.member_id => Ok(None),
            Some(id) => Ok(Some(id)),
        }
    }

    /// The driver saw `leader` (or none) at `term`.
    pub fn set_leader(&self, leader: Option<u64>, term: u64) {
        assert!(self.clustered, "a single member's leadership never changes");
        self.leader.store(leader.unwrap_or(NO_LEADER), SeqCst);
        self.term.store(term, SeqCst);
        if leader != Some(self.member_id) {
            self.serving.store(false, SeqCst);
        }
        self.changed.notify(usize::MAX);
    }

    /// Notified on every leadership change.
    pub fn changed(&self) -> &Event {
        &self.changed
    }

    /// The meta group's Raft indexes as last published: (commit, applied).
    pub fn indexes(&self) -> (u64, u64) {
        (
            self.commit_index.load(SeqCst),
            self.applied_index.load(SeqCst),
        )
    }

    pub fn set_indexes(&self, commit: u64, applied: u64) {
        self.commit_index.store(commit, SeqCst);
        self.applied_index.store(applied, SeqCst);
    }

    /// The driver finished taking over as leader: writes may be evaluated here.
    pub fn set_serving(&self) {
        assert_eq!(self.leader(), Some(self.member_id), "only a leader serves");
        self.serving.store(true, SeqCst);
    }
}
