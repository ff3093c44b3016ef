//! One Raft group: raft-rs's `RawNode` (pre-vote, check-quorum, ReadIndex safe) with its
//! `Ready` turned into plain outputs. No I/O here: the owner ticks, steps messages in, writes
//! nothing itself (the group writes to its `LogStore`, whose durability the owner drives),
//! and reports back what became durable and what it applied.
//!
//! Async ready: a leader's messages (appends to followers) leave at once, in parallel with its
//! own fsync; a follower's messages (votes, append acknowledgements) are held here until the
//! ready that produced them is durable (`on_persisted`), because they promise durability.

use std::collections::VecDeque;

use prost011::Message as _;
use raft::eraftpb::{self, ConfChangeSingle, ConfChangeType, ConfChangeV2, Message};
use raft::{RawNode, ReadOnlyOption, StateRole};

use crate::storage::{
    conf_at, conf_from_raft, entry_from_raft, hard_state_from_raft, snapshot_from_raft, ConfState,
    Entry, EntryKind, LogStore, RaftStore, Snapshot,
};

/// Timing and flow-control settings of a group; one tick is the owner's clock period.
#[derive(Clone, Debug)]
pub struct GroupConfig {
    /// This member's id (non-zero, unique in the cluster).
    pub member_id: u64,
    /// A follower that hears no leader for a number of ticks drawn from
    /// `[election_ticks, max_election_ticks)` campaigns.
    pub election_ticks: usize,
    /// Upper bound (exclusive) of the election timeout; `election_ticks + 1` makes it fixed,
    /// which a deterministic simulation needs (raft-rs draws from a thread-local RNG).
    pub max_election_ticks: usize,
    /// A leader sends heartbeats every this many ticks.
    pub heartbeat_ticks: usize,
    /// Upper bound on the entry data in one append message.
    pub max_size_per_msg_bytes: u64,
    /// Appends in flight to one follower before the leader waits for acknowledgements.
    pub max_inflight_msgs: usize,
    /// Highest index the owner's state machine has applied (durably): entries after it are
    /// handed out again after a restart.
    pub applied_index: u64,
}

/// One membership change, applied to a group through its log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MembershipChange {
    /// A non-voting member that receives the log (catching up before promotion).
    AddLearner(u64),
    /// Makes a member (usually a caught-up learner) a voter.
    Promote(u64),
    Remove(u64),
}

/// A linearizable-read point: once the owner has applied up to `index`, a read with request
/// context `context` may be served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadPoint {
    pub index: u64,
    pub context: Vec<u8>,
}

/// Work the owner must do, from one `Group::ready` call.
#[derive(Debug, Default)]
pub struct GroupReady {
    /// Writes were made to the store: make them durable, then call `on_persisted(number)`.
    pub persist: Option<u64>,
    /// A snapshot from the leader was installed in the store: replace the state machine by it.
    pub snapshot: Option<Snapshot>,
    /// Committed entries to apply, in order; report progress with `on_applied`.
    pub committed: Vec<Entry>,
    /// Read points for earlier `read_index` calls.
    pub reads: Vec<ReadPoint>,
    /// The membership after a committed change was applied (last one in `committed`).
    pub conf: Option<ConfState>,
}

/// What a leader knows of one other member's log: the highest index it is known to hold
/// (0 until the member answered this leader: raft-rs resets progress on election).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerProgress {
    pub member: u64,
    pub matched: u64,
    /// Heard from within the last election timeout (raft-rs's check-quorum activity) and
    /// answered an append of this leader: raft-rs counts a member it just added as active
    /// before it ever answered.
    pub active: bool,
}

#[derive(Debug)]
pub enum ProposeError {
    /// Only the leader takes proposals; `leader` is the current one if known (0 otherwise).
    NotLeader { leader: u64 },
    /// raft-rs refused it (a leader transfer or another membership change is in progress).
    Dropped,
    /// A membership change is proposed and not applied yet: one at a time.
    MembershipPending,
}

pub struct Group<S: LogStore> {
    raw: RawNode<RaftStore<S>>,
    /// Messages of readies not yet durable, with the ready's number, oldest first.
    held: VecDeque<(u64, Vec<Message>)>,
    /// Messages ready to send.
    outbox: Vec<Message>,
    /// An installed snapshot not yet durable: (ready number, snapshot index). raft-rs may
    /// count it as applied only once it is persisted, so the group does that itself then.
    snapshot_pending: Option<(u64, u64)>,
}

impl<S: LogStore> Group<S> {
    pub fn new(config: &GroupConfig, store: S) -> Group<S> {
        let raft_config = raft::Config {
            id: config.member_id,
            election_tick: config.election_ticks,
            min_election_tick: config.election_ticks,
            max_election_tick: config.max_election_ticks,
            heartbeat_tick: config.heartbeat_ticks,
            applied: config.applied_index,
            max_size_per_msg: config.max_size_per_msg_bytes,
            max_inflight_msgs: config.max_inflight_msgs,
            check_quorum: true,
            pre_vote: true,
            read_only_option: ReadOnlyOption::Safe,
            ..raft::Config::default()
        };
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let raw = RawNode::new(
            &raft_config,
            RaftStore {
                initial_conf: conf_at(&store, initial_applied(config, &store)),
                store,
                snapshot_wanted: Default::default(),
            },
            &logger,
        )
        .unwrap_or_else(|e| panic!("raft group config rejected: {e}"));
        Group {
            raw,
            held: VecDeque::new(),
            outbox: Vec::new(),
            snapshot_pending: None,
        }
    }

    pub fn store(&self) -> &S {
        &self.raw.store().store
    }

    /// For the owner's own writes (checkpoint compaction, syncing).
    pub fn store_mut(&mut self) -> &mut S {
        &mut self.raw.mut_store().store
    }

    pub fn member_id(&self) -> u64 {
        self.raw.raft.id
    }

    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }

    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    /// The leader this member knows of, if any.
    pub fn leader(&self) -> Option<u64> {
        Some(self.raw.raft.leader_id).filter(|id| *id != 0)
    }

    pub fn commit_index(&self) -> u64 {
        self.raw.raft.raft_log.committed
    }

    /// Whether `member` is a voter in the membership this member has applied.
    pub fn is_voter(&self, member: u64) -> bool {
        self.raw.raft.prs().conf().voters().contains(member)
    }

    /// The leader's view of every other member (voters and learners) of the group, by member
    /// id; `None` on a follower, whose raft-rs progress is stale.
    pub fn peer_progress(&self) -> Option<Vec<PeerProgress>> {
        if !self.is_leader() {
            return None;
        }
        let me = self.member_id();
        let peers = self.raw.raft.prs().iter().filter(|(id, _)| **id != me);
        let mut progress: Vec<PeerProgress> = peers
            .map(|(&member, pr)| PeerProgress {
                member,
                matched: pr.matched,
                active: pr.recent_active && pr.matched > 0,
            })
            .collect();
        progress.sort_by_key(|p| p.member);
        Some(progress)
    }

    /// Whether this member leads and has committed an entry of its own term (so it knows
    /// everything committed before it).
    pub fn leads_committed_term(&self) -> bool {
        let log = &self.raw.raft.raft_log;
        self.is_leader() && log.term(log.committed).ok() == Some(self.term())
    }

    /// Whether a leader needed a snapshot newer than the store's since the last call: the
    /// owner should checkpoint (`MemLogStore::compact` / the WAL's release at a checkpoint).
    pub fn take_snapshot_wanted(&self) -> bool {
        self.raw.store().snapshot_wanted.take()
    }

    /// Advances the group's logical clock by one tick.
    pub fn tick(&mut self) {
        self.raw.tick();
    }

    /// Appends `data` to the leader's log; returns the entry's index (it is committed with
    /// the leader's current term at that index, or never).
    pub fn propose(&mut self, data: Vec<u8>) -> Result<u64, ProposeError> {
        self.check_leader()?;
        self.raw
            .propose(Vec::new(), data)
            .map_err(|_| ProposeError::Dropped)?;
        Ok(self.raw.raft.raft_log.last_index())
    }

    /// Proposes one membership change carrying `context` (the owner's record of the member,
    /// handed back with the committed entry: `decode_membership`); returns its index. Refused
    /// while an earlier change is not applied: raft-rs would turn this one into an empty entry
    /// silently, and the owner would take that entry for its change.
    pub fn propose_membership(
        &mut self,
        change: MembershipChange,
        context: Vec<u8>,
    ) -> Result<u64, ProposeError> {
        self.check_leader()?;
        if self.raw.raft.has_pending_conf() {
            return Err(ProposeError::MembershipPending);
        }
        let (member, change_type) = match change {
            MembershipChange::AddLearner(id) => (id, ConfChangeType::AddLearnerNode),
            MembershipChange::Promote(id) => (id, ConfChangeType::AddNode),
            MembershipChange::Remove(id) => (id, ConfChangeType::RemoveNode),
        };
        let mut single = ConfChangeSingle {
            node_id: member,
            ..Default::default()
        };
        single.set_change_type(change_type);
        let cc = ConfChangeV2 {
            changes: vec![single],
            context,
            ..Default::default()
        };
        self.raw
            .propose_conf_change(Vec::new(), cc)
            .map_err(|_| ProposeError::Dropped)?;
        Ok(self.raw.raft.raft_log.last_index())
    }

    /// Asks for a read point; it arrives in a later `GroupReady::reads` with `context`
    /// (lost, like any message, if leadership changes: the owner retries on a timeout).
    pub fn read_index(&mut self, context: Vec<u8>) {
        self.raw.read_index(context);
    }

    /// Asks the leader to hand leadership to `member` (forwarded if this member follows).
    pub fn transfer_leader(&mut self, member: u64) {
        self.raw.transfer_leader(member);
    }

    /// The member a leadership transfer in progress hands this group to: raft drops every
    /// proposal until it ends (the target took over, or an election timeout passed).
    pub fn transferring_to(&self) -> Option<u64> {
        self.raw.raft.lead_transferee
    }

    /// Gives up a leadership transfer in progress; proposals are taken again.
    pub fn abort_transfer(&mut self) {
        self.raw.raft.abort_leader_transfer();
    }

    /// A message from a peer. Messages from members outside the group are ignored by raft.
    pub(crate) fn step(&mut self, message: Message) {
        // raft-rs rejects only local message types and messages for unknown peers; neither
        // needs more than dropping (raft tolerates message loss).
        let _ = self.raw.step(message);
    }

    /// Tells raft whether a snapshot sent to `member` left (true) or was dropped (false); a
    /// leader sends no more appends to a member until it hears this.
    pub(crate) fn report_snapshot(&mut self, member: u64, sent: bool) {
        let status = if sent {
            raft::SnapshotStatus::Finish
        } else {
            raft::SnapshotStatus::Failure
        };
        self.raw.report_snapshot(member, status);
    }

    /// Messages to send now.
    pub(crate) fn take_messages(&mut self) -> Vec<Message> {
        std::mem::take(&mut self.outbox)
    }

    /// Everything up to the ready numbered `number` is durable.
    pub fn on_persisted(&mut self, number: u64) {
        self.raw.on_persist_ready(number);
        while self.held.front().is_some_and(|(n, _)| *n <= number) {
            let (_, messages) = self.held.pop_front().expect("front exists");
            self.outbox.extend(messages);
        }
        if let Some((_, index)) = self.snapshot_pending.filter(|(n, _)| *n <= number) {
            self.snapshot_pending = None;
            self.raw.advance_apply_to(index);
        }
    }

    /// The owner's state machine applied everything up to `index` (entries it was handed;
    /// a snapshot counts as applied once durable, without this call).
    pub fn on_applied(&mut self, index: u64) {
        if self.snapshot_pending.is_some_and(|(_, snap)| index <= snap) {
            return;
        }
        if index > self.raw.raft.raft_log.applied {
            self.raw.advance_apply_to(index);
        }
    }

    /// Collects the group's pending work, writing entries, hard state and snapshots to the store.
    pub fn ready(&mut self) -> Option<GroupReady> {
        if !self.raw.has_ready() {
            return None;
        }
        let mut rd = self.raw.ready();
        let mut out = GroupReady::default();
        self.outbox.extend(rd.take_messages());
        if !rd.snapshot().is_empty() {
            let snapshot = snapshot_from_raft(rd.snapshot().clone());
            self.store_mut().install_snapshot(snapshot.clone());
            out.snapshot = Some(snapshot);
        }
        let committed = rd.take_committed_entries();
        self.apply_committed(committed, &mut out);
        let entries: Vec<Entry> = rd.take_entries().into_iter().map(entry_from_raft).collect();
        self.store_mut().append(&entries);
        if let Some(hs) = rd.hs() {
            let hs = hard_state_from_raft(hs);
            self.store_mut().set_hard_state(hs);
        }
        out.reads = rd
            .take_read_states()
            .into_iter()
            .map(|r| ReadPoint {
                index: r.index,
                context: r.request_ctx,
            })
            .collect();
        let number = rd.number();
        if let Some(snapshot) = &out.snapshot {
            self.snapshot_pending = Some((number, snapshot.meta.index));
        }
        let must_sync = rd.must_sync();
        let after_persist = rd.take_persisted_messages();
        self.raw.advance_append_async(rd);
        if must_sync {
            out.persist = Some(number);
            self.held.push_back((number, after_persist));
        } else if let Some((_, last)) = self.held.back_mut() {
            // Behind a ready still being synced: keep their order.
            last.extend(after_persist);
        } else {
            self.outbox.extend(after_persist);
        }
        Some(out)
    }

    /// Hands committed entries out, applying membership changes to raft as they pass (raft-rs
    /// wants them applied when committed; the owner only records them).
    fn apply_committed(&mut self, committed: Vec<eraftpb::Entry>, out: &mut GroupReady) {
        for entry in committed {
            let entry = entry_from_raft(entry);
            if entry.kind == EntryKind::ConfChange {
                let cc = ConfChangeV2::decode(entry.data.as_slice())
                    .unwrap_or_else(|e| panic!("conf change at {} undecodable: {e}", entry.index));
                let conf = self
                    .raw
                    .apply_conf_change(&cc)
                    .unwrap_or_else(|e| panic!("conf change at {} rejected: {e}", entry.index));
                out.conf = Some(conf_from_raft(&conf));
            }
            out.committed.push(entry);
        }
    }

    fn check_leader(&self) -> Result<(), ProposeError> {
        if self.is_leader() {
            Ok(())
        } else {
            Err(ProposeError::NotLeader {
                leader: self.raw.raft.leader_id,
            })
        }
    }
}

/// Where raft-rs starts applying: the configured applied index, within the store's log.
fn initial_applied<S: LogStore>(config: &GroupConfig, store: &S) -> u64 {
    let snapshot = store.snapshot().meta.index;
    config
        .applied_index
        .clamp(snapshot, store.last_index().max(snapshot))
}

/// The change and context of a membership-change entry (`None` for a normal entry). Panics on
/// an undecodable one: the group itself has applied it, so it is no corruption of the log.
pub fn decode_membership(entry: &Entry) -> Option<(MembershipChange, Vec<u8>)> {
    if entry.kind != EntryKind::ConfChange {
        return None;
    }
    let cc = ConfChangeV2::decode(entry.data.as_slice())
        .unwrap_or_else(|e| panic!("conf change at {} undecodable: {e}", entry.index));
    let [single] = cc.changes.as_slice() else {
        panic!("conf change at {} is not a single change", entry.index);
    };
    let change = match single.change_type() {
        ConfChangeType::AddLearnerNode => MembershipChange::AddLearner(single.node_id),
        ConfChangeType::AddNode => MembershipChange::Promote(single.node_id),
        ConfChangeType::RemoveNode => MembershipChange::Remove(single.node_id),
    };
    Some((change, cc.context))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemLogStore;
    use std::collections::BTreeMap;

    /// Rounds of message passing a test step may take before it must have settled.
    const MAX_ROUNDS: usize = 1000;

    /// Three groups with instant disks and a network that drops what goes to `down`.
    struct Trio {
        groups: BTreeMap<u64, Group<MemLogStore>>,
        down: Option<u64>,
    }

    impl Trio {
        fn new() -> Trio {
            let groups = (1..=3)
                .map(|id| {
                    let config = GroupConfig {
                        member_id: id,
                        // Member 1 times out first and leads.
                        election_ticks: 10 * id as usize,
                        max_election_ticks: 10 * id as usize + 1,
                        heartbeat_ticks: 1,
                        max_size_per_msg_bytes: 1 << 20,
                        max_inflight_msgs: 16,
                        applied_index: 0,
                    };
                    let store = MemLogStore::bootstrap(vec![1, 2, 3], Vec::new());
                    (id, Group::new(&config, store))
                })
                .collect();
            Trio { groups, down: None }
        }

        /// Readies made durable and applied at once, messages delivered, until quiet.
        fn settle(&mut self) {
            for _ in 0..MAX_ROUNDS {
                let mut messages = Vec::new();
                for group in self.groups.values_mut() {
                    while let Some(ready) = group.ready() {
                        if let Some(number) = ready.persist {
                            group.on_persisted(number);
                        }
                        if let Some(last) = ready.committed.last() {
                            group.on_applied(last.index);
                        }
                    }
                    messages.extend(group.take_messages());
                }
                if messages.is_empty() {
                    return;
                }
                // A member added by a test but not running hears nothing, like `down`.
                for message in messages.into_iter().filter(|m| Some(m.to) != self.down) {
                    if let Some(group) = self.groups.get_mut(&message.to) {
                        group.step(message);
                    }
                }
            }
            panic!("the trio did not settle in {MAX_ROUNDS} rounds");
        }

        fn tick(&mut self, ticks: usize) {
            for _ in 0..ticks {
                self.groups.values_mut().for_each(Group::tick);
                self.settle();
            }
        }

        fn leader(&mut self) -> &mut Group<MemLogStore> {
            self.groups.get_mut(&1).unwrap()
        }
    }

    fn matched(progress: &[PeerProgress]) -> Vec<(u64, u64)> {
        progress.iter().map(|p| (p.member, p.matched)).collect()
    }

    /// A change carries its context through the log, a second waits for the first to apply, and
    /// a group restarted past the change starts from the membership the change made (raft-rs
    /// does not hand applied entries out again).
    #[test]
    fn membership_changes_survive_a_restart_past_them() {
        let mut trio = Trio::new();
        trio.tick(12);
        let index = trio
            .leader()
            .propose_membership(MembershipChange::AddLearner(4), b"four".to_vec())
            .unwrap();
        assert!(matches!(
            trio.leader()
                .propose_membership(MembershipChange::Remove(3), Vec::new()),
            Err(ProposeError::MembershipPending)
        ));
        trio.settle();
        let entry = trio.groups[&2].store().entries(index, index + 1, u64::MAX)[0].clone();
        assert_eq!(
            decode_membership(&entry),
            Some((MembershipChange::AddLearner(4), b"four".to_vec()))
        );
        let store = trio.groups[&2].store().clone();
        let conf = conf_at(&store, index);
        assert_eq!((conf.voters, conf.learners), (vec![1, 2, 3], vec![4]));
        assert_eq!(conf_at(&store, index - 1).learners, Vec::<u64>::new());
        let config = GroupConfig {
            member_id: 2,
            election_ticks: 20,
            max_election_ticks: 21,
            heartbeat_ticks: 1,
            max_size_per_msg_bytes: 1 << 20,
            max_inflight_msgs: 16,
            applied_index: store.hard_state().commit,
        };
        let restarted = Group::new(&config, store);
        assert!(restarted.raw.raft.prs().conf().learners().contains(&4));
        assert!(restarted.is_voter(3));
    }

    #[test]
    fn leader_reports_each_peers_matched_index() {
        let mut trio = Trio::new();
        trio.tick(12);
        assert!(trio.leader().is_leader(), "member 1 times out first");
        for i in 0..5u8 {
            trio.leader().propose(vec![i]).unwrap();
        }
        trio.settle();
        let last = trio.leader().store().last_index();
        let progress = trio.leader().peer_progress().unwrap();
        assert_eq!(matched(&progress), [(2, last), (3, last)]);
        for follower in [2, 3] {
            assert_eq!(trio.groups[&follower].peer_progress(), None);
        }

        // Member 3 hears nothing: the leader keeps committing with member 2 alone.
        trio.down = Some(3);
        for i in 0..7u8 {
            trio.leader().propose(vec![i]).unwrap();
        }
        trio.tick(1);
        let now = trio.leader().store().last_index();
        assert_eq!(now, last + 7);
        assert_eq!(trio.leader().commit_index(), now);
        let progress = trio.leader().peer_progress().unwrap();
        assert_eq!(matched(&progress), [(2, now), (3, last)]);

        // Back: it catches up from the log and its progress says so.
        trio.down = None;
        trio.tick(2);
        let progress = trio.leader().peer_progress().unwrap();
        assert_eq!(matched(&progress), [(2, now), (3, now)]);
    }
}
