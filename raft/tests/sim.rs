//! Deterministic simulation of a ferrocd cluster's consensus layer: 3 or 5 members, each a
//! `Node` with the meta group and several data groups over `MemLogStore`s, driven by one
//! seeded RNG: a network that loses, duplicates, delays and reorders envelopes and partitions
//! and heals; disks whose fsyncs take time and whose crashes keep only synced writes (plus a
//! random prefix of the rest); crashes and restarts; clients proposing writes and ReadIndex
//! reads; log compaction (so lagging members get snapshots). Invariants are checked after
//! every tick; after the chaos the cluster is healed and must elect one leader for every group
//! on the meta leader's member and commit within a bound; then a learner is added, promoted
//! and another member removed in every group, and the cluster must be live again.
//!
//! `SIM_SEED=<n>` replays one seed; `SIM_SEEDS=<n>` runs that many (soak); default 100.

use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};

use ferrocd_raft::group::{GroupConfig, GroupReady, MembershipChange};
use ferrocd_raft::multi::{Envelope, GroupId, Node, NodeConfig, META_GROUP};
use ferrocd_raft::storage::{ConfState, EntryKind, LogStore, MemLogStore, Snapshot, SnapshotMeta};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const DATA_GROUPS: u64 = 3;
const ELECTION_TICKS: usize = 10;
const CHAOS_TICKS: u64 = 300;
/// Ticks a healed cluster gets to elect aligned leaders and commit in every group.
const LIVENESS_BOUND_TICKS: u64 = 200;
const MAX_NET_DELAY_TICKS: u64 = 3;
const MAX_FSYNC_TICKS: u64 = 2;
/// Message passes within one tick (delay-0 deliveries, fsync completions, readies).
const ROUNDS_PER_TICK: usize = 8;

/// Election timeouts are fixed per member and distinct (raft-rs would draw them from a
/// thread-local RNG, breaking replay); members differ, so split votes resolve.
fn node_config(member_id: u64) -> NodeConfig {
    let election_ticks = ELECTION_TICKS + 2 * member_id as usize;
    NodeConfig {
        group: GroupConfig {
            member_id,
            election_ticks,
            max_election_ticks: election_ticks + 1,
            heartbeat_ticks: 2,
            max_size_per_msg_bytes: 1024,
            max_inflight_msgs: 16,
            applied_index: 0,
        },
        peer_queue_limit_msgs: 1024,
        affinity_retry_ticks: 2 * ELECTION_TICKS as u64,
    }
}

/// A member's applied state for one group: the client values in log order.
#[derive(Clone, Default)]
struct StateMachine {
    applied: u64,
    values: Vec<u64>,
    conf: ConfState,
}

impl StateMachine {
    fn from_snapshot(snapshot: &Snapshot) -> StateMachine {
        let values = snapshot
            .data
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8-byte values")))
            .collect();
        StateMachine {
            applied: snapshot.meta.index,
            values,
            conf: snapshot.meta.conf.clone(),
        }
    }

    fn encode(&self) -> Vec<u8> {
        self.values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }
}

/// An fsync in flight: when it returns, writes before `mark` are durable and the group hears
/// that ready `number` is persisted.
struct Fsync {
    done_tick: u64,
    mark: u64,
    number: u64,
}

struct Member {
    id: u64,
    /// None while crashed; then `down_stores` holds what the disks kept.
    node: Option<Node<MemLogStore>>,
    down_stores: BTreeMap<GroupId, MemLogStore>,
    machines: BTreeMap<GroupId, StateMachine>,
    fsyncs: BTreeMap<GroupId, VecDeque<Fsync>>,
}

impl Member {
    fn start(id: u64, stores: BTreeMap<GroupId, MemLogStore>) -> Member {
        let mut node = Node::new(node_config(id));
        let mut machines = BTreeMap::new();
        for (group, store) in stores {
            let machine = StateMachine::from_snapshot(LogStore::snapshot(&store));
            node.add_group(group, store, machine.applied);
            machines.insert(group, machine);
        }
        Member {
            id,
            node: Some(node),
            down_stores: BTreeMap::new(),
            machines,
            fsyncs: BTreeMap::new(),
        }
    }
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct InFlight {
    deliver_tick: std::cmp::Reverse<u64>,
    seq: std::cmp::Reverse<u64>,
    from: u64,
    to: u64,
    bytes: Vec<u8>,
}

struct Sim {
    rng: StdRng,
    tick: u64,
    members: BTreeMap<u64, Member>,
    network: BinaryHeap<InFlight>,
    send_seq: u64,
    /// Members on one side of a partition (the rest are on the other), if partitioned.
    partition: Option<BTreeSet<u64>>,
    loss_percent: u32,
    dup_percent: u32,
    /// Per group, per index: (term, value) of every entry anyone applied (committed).
    committed: BTreeMap<GroupId, Vec<(u64, Option<u64>)>>,
    leaders: BTreeMap<(GroupId, u64), u64>,
    next_value: u64,
    /// Outstanding reads: context -> (group, highest committed index when asked).
    reads: BTreeMap<u64, (GroupId, u64)>,
    reads_served: u64,
    /// Members removed from every group: a removed member need not learn it (the leader
    /// stops replicating to it), so liveness does not wait for it.
    removed: BTreeSet<u64>,
    /// Smallest voter count any configuration had (durability is checked against it).
    min_voters: usize,
}

fn groups() -> impl Iterator<Item = GroupId> {
    std::iter::once(META_GROUP).chain(1..=DATA_GROUPS)
}

/// Right after a tick, a data group transfers its leadership only toward the member this one
/// sees leading the meta group (raft refuses every proposal while a transfer is on; one toward
/// a member that lost the meta group, or never got there, must not keep the group refusing).
fn check_transfers(node: &Node<MemLogStore>) {
    let meta_leader = node.meta_leader();
    for id in node.group_ids().filter(|&id| id != META_GROUP) {
        let target = node.group(id).unwrap().transferring_to();
        assert!(
            target.is_none() || target == meta_leader,
            "member {} group {id} transfers to {target:?} while the meta leader is {meta_leader:?}",
            node.member_id()
        );
    }
}

impl Sim {
    fn new(seed: u64, member_count: u64) -> Sim {
        let voters: Vec<u64> = (1..=member_count).collect();
        let members = voters
            .iter()
            .map(|&id| {
                let stores = groups()
                    .map(|g| (g, MemLogStore::bootstrap(voters.clone(), Vec::new())))
                    .collect();
                (id, Member::start(id, stores))
            })
            .collect();
        Sim {
            rng: StdRng::seed_from_u64(seed),
            tick: 0,
            members,
            network: BinaryHeap::new(),
            send_seq: 0,
            partition: None,
            loss_percent: 5,
            dup_percent: 5,
            committed: groups().map(|g| (g, vec![(0, None), (1, None)])).collect(),
            leaders: BTreeMap::new(),
            next_value: 1,
            reads: BTreeMap::new(),
            reads_served: 0,
            removed: BTreeSet::new(),
            min_voters: member_count as usize,
        }
    }

    fn connected(&self, a: u64, b: u64) -> bool {
        self.partition
            .as_ref()
            .is_none_or(|side| side.contains(&a) == side.contains(&b))
    }

    fn live_ids(&self) -> Vec<u64> {
        self.members
            .values()
            .filter(|m| m.node.is_some())
            .map(|m| m.id)
            .collect()
    }

    /// One tick: faults (when `chaos`), clients, clocks, then message passes, then checks.
    fn step(&mut self, chaos: bool) {
        self.tick += 1;
        if chaos {
            self.inject_faults();
        }
        self.clients();
        for member in self.members.values_mut() {
            if let Some(node) = member.node.as_mut() {
                node.tick();
                check_transfers(node);
            }
        }
        for _ in 0..ROUNDS_PER_TICK {
            if !self.pump() {
                break;
            }
        }
        self.checkpoint_where_wanted();
        self.check_leaders();
        if self.tick.is_multiple_of(25) {
            self.check_durability();
        }
    }

    fn inject_faults(&mut self) {
        let ids: Vec<u64> = self.members.keys().copied().collect();
        let pick = ids[self.rng.gen_range(0..ids.len())];
        let roll = self.rng.gen_range(0..1000);
        match roll {
            0..=9 => self.crash(pick),
            10..=59 => self.restart(pick),
            60..=69 => {
                let side: BTreeSet<u64> = ids.iter().copied().filter(|_| self.rng.gen()).collect();
                self.partition = Some(side);
            }
            70..=89 => self.partition = None,
            90..=99 => self.compact(pick),
            _ => {}
        }
    }

    fn crash(&mut self, id: u64) {
        let member = self.members.get_mut(&id).expect("member exists");
        let Some(node) = member.node.take() else {
            return;
        };
        for group in node.group_ids().collect::<Vec<_>>() {
            let store = node.group(group).expect("group exists").store();
            let survivors = self.rng.gen_range(0..=store.unsynced_writes());
            member.down_stores.insert(group, store.crash(survivors));
        }
        member.fsyncs.clear();
    }

    fn restart(&mut self, id: u64) {
        let member = self.members.get_mut(&id).expect("member exists");
        if member.node.is_some() {
            return;
        }
        let stores = std::mem::take(&mut member.down_stores);
        *member = Member::start(id, stores);
    }

    /// Leaders that had no snapshot to send a lagging or new member checkpoint now.
    fn checkpoint_where_wanted(&mut self) {
        for id in self.live_ids() {
            let node = self.members[&id].node.as_ref().unwrap();
            let wanted = node
                .group_ids()
                .any(|g| node.group(g).unwrap().take_snapshot_wanted());
            if wanted {
                self.compact(id);
            }
        }
    }

    /// A checkpoint: the log up to what this member applied is replaced by a snapshot.
    fn compact(&mut self, id: u64) {
        let member = self.members.get_mut(&id).expect("member exists");
        let Some(node) = member.node.as_mut() else {
            return;
        };
        for (&group, machine) in &member.machines {
            let store = node.group_mut(group).expect("group exists").store_mut();
            let base = LogStore::snapshot(store).meta.index;
            if machine.applied <= base {
                continue;
            }
            let term = store.entries(machine.applied, machine.applied + 1, u64::MAX)[0].term;
            store.compact(Snapshot {
                meta: SnapshotMeta {
                    index: machine.applied,
                    term,
                    conf: machine.conf.clone(),
                },
                data: machine.encode(),
            });
        }
    }

    /// Clients write through whichever member leads a group and read through any member.
    fn clients(&mut self) {
        let live = self.live_ids();
        if live.is_empty() {
            return;
        }
        let group = self.rng.gen_range(0..=DATA_GROUPS);
        let via = live[self.rng.gen_range(0..live.len())];
        let value = self.next_value;
        let node = self.members.get_mut(&via).unwrap().node.as_mut().unwrap();
        if node.propose(group, value.to_le_bytes().to_vec()).is_ok() {
            self.next_value += 1;
        }
        if self.rng.gen_range(0..4) == 0 {
            let context = self.next_value;
            self.next_value += 1;
            let known = self.committed[&group].len() as u64 - 1;
            self.reads.insert(context, (group, known));
            node.read_index(group, context.to_le_bytes().to_vec());
        }
    }

    /// Delivers due envelopes, completes due fsyncs, handles readies, sends. Returns whether
    /// anything happened.
    fn pump(&mut self) -> bool {
        let mut busy = self.deliver();
        let ids: Vec<u64> = self.members.keys().copied().collect();
        for id in ids {
            busy |= self.complete_fsyncs(id);
            busy |= self.handle_readies(id);
            self.send(id);
        }
        busy
    }

    fn deliver(&mut self) -> bool {
        let mut delivered = false;
        while self
            .network
            .peek()
            .is_some_and(|m| m.deliver_tick.0 <= self.tick)
        {
            let m = self.network.pop().expect("peeked");
            if !self.connected(m.from, m.to) {
                continue;
            }
            if let Some(node) = self.members.get_mut(&m.to).and_then(|t| t.node.as_mut()) {
                let envelope = Envelope {
                    from: m.from,
                    to: m.to,
                    bytes: m.bytes,
                };
                node.receive(&envelope).expect("envelopes decode");
                delivered = true;
            }
        }
        delivered
    }

    fn send(&mut self, id: u64) {
        let Some(node) = self.members.get_mut(&id).and_then(|m| m.node.as_mut()) else {
            return;
        };
        for envelope in node.take_envelopes() {
            if !self.connected(envelope.from, envelope.to) {
                continue;
            }
            let copies = if self.rng.gen_range(0..100) < self.dup_percent {
                2
            } else {
                1
            };
            for _ in 0..copies {
                if self.rng.gen_range(0..100) < self.loss_percent {
                    continue;
                }
                self.send_seq += 1;
                let delay = self.rng.gen_range(0..=MAX_NET_DELAY_TICKS);
                self.network.push(InFlight {
                    deliver_tick: std::cmp::Reverse(self.tick + delay),
                    seq: std::cmp::Reverse(self.send_seq),
                    from: envelope.from,
                    to: envelope.to,
                    bytes: envelope.bytes.clone(),
                });
            }
        }
    }

    fn complete_fsyncs(&mut self, id: u64) -> bool {
        let member = self.members.get_mut(&id).unwrap();
        let Some(node) = member.node.as_mut() else {
            return false;
        };
        let mut done = false;
        for (&group, queue) in member.fsyncs.iter_mut() {
            while queue.front().is_some_and(|f| f.done_tick <= self.tick) {
                let fsync = queue.pop_front().unwrap();
                let g = node.group_mut(group).unwrap();
                g.store_mut().finish_sync(fsync.mark);
                g.on_persisted(fsync.number);
                done = true;
            }
        }
        done
    }

    fn handle_readies(&mut self, id: u64) -> bool {
        let Some(node) = self.members.get_mut(&id).unwrap().node.as_mut() else {
            return false;
        };
        let readies = node.ready();
        let busy = !readies.is_empty();
        for (group, ready) in readies {
            self.handle_ready(id, group, ready);
        }
        busy
    }

    fn handle_ready(&mut self, id: u64, group: GroupId, ready: GroupReady) {
        let fsync_delay = self.rng.gen_range(0..=MAX_FSYNC_TICKS);
        let member = self.members.get_mut(&id).unwrap();
        let node = member.node.as_mut().unwrap();
        if let Some(number) = ready.persist {
            let mark = node.group(group).unwrap().store().begin_sync();
            let queue = member.fsyncs.entry(group).or_default();
            // One disk per group: fsyncs return in the order they were issued.
            let done_tick = queue
                .back()
                .map_or(0, |f| f.done_tick)
                .max(self.tick + fsync_delay);
            queue.push_back(Fsync {
                done_tick,
                mark,
                number,
            });
        }
        let machine = member.machines.get_mut(&group).unwrap();
        let canon = self.committed.get_mut(&group).unwrap();
        if let Some(snapshot) = ready.snapshot {
            assert!(ready.committed.is_empty(), "snapshot with entries");
            let index = snapshot.meta.index as usize;
            assert!(index < canon.len(), "snapshot beyond anything committed");
            let expected: Vec<u64> = canon[..=index].iter().filter_map(|e| e.1).collect();
            *machine = StateMachine::from_snapshot(&snapshot);
            assert_eq!(machine.values, expected, "snapshot differs from the log");
        }
        for entry in &ready.committed {
            assert_eq!(
                entry.index,
                machine.applied + 1,
                "member {id} applies out of order"
            );
            machine.applied = entry.index;
            let value = (entry.kind == EntryKind::Normal && !entry.data.is_empty())
                .then(|| u64::from_le_bytes(entry.data.as_slice().try_into().unwrap()));
            let index = entry.index as usize;
            if index < canon.len() {
                assert_eq!(
                    canon[index],
                    (entry.term, value),
                    "group {group} member {id}: committed entry {index} differs"
                );
            } else {
                assert_eq!(index, canon.len(), "applied past the committed prefix");
                canon.push((entry.term, value));
            }
            machine.values.extend(value);
        }
        if let Some(conf) = ready.conf {
            machine.conf = conf;
            self.min_voters = self.min_voters.min(machine.conf.voters.len());
        }
        for read in ready.reads {
            let context = u64::from_le_bytes(read.context.as_slice().try_into().unwrap());
            if let Some((read_group, known)) = self.reads.remove(&context) {
                assert_eq!(read_group, group);
                assert!(
                    read.index >= known,
                    "group {group}: read point {} behind commit {known} seen before the read",
                    read.index
                );
                self.reads_served += 1;
            }
        }
        node.on_applied(group, machine.applied);
    }

    /// At most one leader per term per group.
    fn check_leaders(&mut self) {
        for member in self.members.values() {
            let Some(node) = member.node.as_ref() else {
                continue;
            };
            for group in node.group_ids() {
                let g = node.group(group).unwrap();
                if g.is_leader() {
                    let leader = *self.leaders.entry((group, g.term())).or_insert(member.id);
                    assert_eq!(
                        leader,
                        member.id,
                        "group {group} term {}: two leaders",
                        g.term()
                    );
                }
            }
        }
    }

    /// Every committed entry is on the disks of a majority of the smallest configuration.
    fn check_durability(&self) {
        let quorum = self.min_voters / 2 + 1;
        for (&group, canon) in &self.committed {
            for (index, &(term, _)) in canon.iter().enumerate().skip(2) {
                let copies = self
                    .members
                    .values()
                    .filter(|m| {
                        let store = match m.node.as_ref() {
                            Some(node) => node.group(group).map(|g| g.store()),
                            None => m.down_stores.get(&group),
                        };
                        store.is_some_and(|s| s.holds_durably(index as u64, term))
                    })
                    .count();
                assert!(
                    copies >= quorum,
                    "group {group}: committed entry {index} on {copies} disks, quorum {quorum}"
                );
            }
        }
    }

    fn heal(&mut self) {
        self.partition = None;
        self.loss_percent = 0;
        self.dup_percent = 0;
        for id in self.members.keys().copied().collect::<Vec<_>>() {
            self.restart(id);
        }
    }

    fn views(&self) -> Vec<(u64, GroupId, bool, Option<u64>, u64, u64)> {
        let mut out = Vec::new();
        for m in self.members.values() {
            let Some(node) = m.node.as_ref() else {
                continue;
            };
            for group in node.group_ids() {
                let g = node.group(group).unwrap();
                out.push((
                    m.id,
                    group,
                    g.is_voter(m.id),
                    g.leader(),
                    g.term(),
                    g.commit_index(),
                ));
            }
        }
        out
    }

    /// The member every live member sees leading every group, if there is one.
    fn aligned_leader(&self) -> Option<u64> {
        let mut leader = None;
        for member in self.members.values() {
            if self.removed.contains(&member.id) {
                continue;
            }
            let node = member.node.as_ref()?;
            for group in node.group_ids() {
                let g = node.group(group).unwrap();
                if !g.is_voter(member.id) {
                    continue; // removed or not yet promoted: it need not know
                }
                let seen = g.leader()?;
                if *leader.get_or_insert(seen) != seen {
                    return None;
                }
            }
        }
        leader
    }

    /// Within the bound, every group gets its leader on one member and commits a new value
    /// that every voter applies.
    fn assert_live(&mut self, seed: u64, what: &str) {
        let start = self.tick;
        let deadline = start + LIVENESS_BOUND_TICKS;
        let mut markers: BTreeMap<GroupId, (u64, u64)> = BTreeMap::new();
        while self.tick < deadline {
            self.step(false);
            let Some(leader) = self.aligned_leader() else {
                continue;
            };
            for group in groups() {
                let node = self
                    .members
                    .get_mut(&leader)
                    .unwrap()
                    .node
                    .as_mut()
                    .unwrap();
                if markers.contains_key(&group) {
                    continue;
                }
                let value = self.next_value;
                if node.propose(group, value.to_le_bytes().to_vec()).is_ok() {
                    self.next_value += 1;
                    markers.insert(group, (value, self.tick));
                }
            }
            let applied_everywhere = markers.len() == groups().count()
                && markers.iter().all(|(&group, &(value, _))| {
                    self.members.values().all(|m| {
                        if self.removed.contains(&m.id) {
                            return true;
                        }
                        let voter = m
                            .node
                            .as_ref()
                            .unwrap()
                            .group(group)
                            .unwrap()
                            .is_voter(m.id);
                        !voter || m.machines[&group].values.contains(&value)
                    })
                });
            if applied_everywhere {
                return;
            }
            // A proposal lost to a leader change is proposed again.
            let stale = self.tick - LIVENESS_BOUND_TICKS / 4;
            markers.retain(|_, &mut (_, proposed)| proposed > stale);
        }
        panic!(
            "seed {seed}: not live {} ticks after {what}; (member, group, voter, leader, term, \
             commit): {:?}",
            LIVENESS_BOUND_TICKS,
            self.views()
        );
    }

    /// Applies `change` to every group through the aligned leader, waiting until every voter
    /// has applied it.
    fn change_membership(&mut self, seed: u64, change: MembershipChange) {
        for _ in 0..LIVENESS_BOUND_TICKS {
            self.step(false);
            let Some(leader) = self.aligned_leader() else {
                continue;
            };
            let pending: Vec<GroupId> = groups()
                .filter(|&g| !self.members[&leader].machines[&g].conf_has(change))
                .collect();
            if pending.is_empty() {
                return;
            }
            if self.tick.is_multiple_of(10) {
                let node = self
                    .members
                    .get_mut(&leader)
                    .unwrap()
                    .node
                    .as_mut()
                    .unwrap();
                for group in pending {
                    let _ = node.propose_membership(group, change, Vec::new());
                }
            }
        }
        panic!("seed {seed}: {change:?} not applied in {LIVENESS_BOUND_TICKS} ticks");
    }
}

impl StateMachine {
    fn conf_has(&self, change: MembershipChange) -> bool {
        match change {
            MembershipChange::AddLearner(id) => self.conf.learners.contains(&id),
            MembershipChange::Promote(id) => self.conf.voters.contains(&id),
            MembershipChange::Remove(id) => {
                !self.conf.voters.contains(&id) && !self.conf.learners.contains(&id)
            }
        }
    }
}

fn run_seed(seed: u64) {
    let member_count = if seed.is_multiple_of(2) { 3 } else { 5 };
    let mut sim = Sim::new(seed, member_count);
    for _ in 0..CHAOS_TICKS {
        sim.step(true);
    }
    sim.heal();
    sim.assert_live(seed, "healing");
    let leader = sim.aligned_leader().expect("live cluster has a leader");
    assert_eq!(
        Some(leader),
        sim.members[&leader].node.as_ref().unwrap().meta_leader(),
        "groups follow the meta group's leader"
    );

    let new_member = member_count + 1;
    let empty = groups().map(|g| (g, MemLogStore::default())).collect();
    sim.members
        .insert(new_member, Member::start(new_member, empty));
    let removed = (1..=member_count).find(|&id| id != leader).unwrap();
    for change in [
        MembershipChange::AddLearner(new_member),
        MembershipChange::Promote(new_member),
        MembershipChange::Remove(removed),
    ] {
        sim.change_membership(seed, change);
    }
    sim.removed.insert(removed);
    sim.assert_live(seed, "membership changes");
    let expected: Vec<u64> = (1..=new_member).filter(|&id| id != removed).collect();
    for member in sim.members.values().filter(|m| m.id != removed) {
        for group in groups() {
            let mut voters = member.machines[&group].conf.voters.clone();
            voters.sort_unstable();
            let g = member.node.as_ref().unwrap().group(group).unwrap();
            assert_eq!(
                voters,
                expected,
                "member {} group {group}: applied {} commit {} leader {:?} snapshot {:?}",
                member.id,
                member.machines[&group].applied,
                g.commit_index(),
                g.leader(),
                LogStore::snapshot(g.store()).meta
            );
        }
    }
    sim.check_durability();
    assert!(sim.reads_served > 0, "seed {seed}: no read was served");
}

#[test]
fn simulated_clusters_keep_raft_invariants() {
    let seeds: Vec<u64> = match std::env::var("SIM_SEED") {
        Ok(seed) => vec![seed.parse().expect("SIM_SEED is a number")],
        Err(_) => {
            let count = std::env::var("SIM_SEEDS").map_or(100, |n| n.parse().expect("a number"));
            (0..count).collect()
        }
    };
    for seed in seeds {
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| run_seed(seed))) {
            eprintln!(
                "simulation failed; replay: SIM_SEED={seed} cargo test -p ferrocd-raft --test sim"
            );
            std::panic::resume_unwind(panic);
        }
    }
}
