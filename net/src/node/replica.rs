//! The meta group's log replicated with Raft (issue 5, first step): in a cluster, every write
//! is one meta log entry, and that log is a raft-rs group over the peer transport.
//!
//! The driver runs on core 0 beside the meta group (`meta.rs`) and owns the group's Raft state
//! (`ferrocd_raft::multi::Node` holding group 0, its log a `WalLogStore` on the meta WAL):
//!
//! - ticks every `tick_ms`, steps peers' envelopes in, makes each ready durable (the WAL's group
//!   commit; a leader's appends leave before its own fdatasync) and sends the envelopes out;
//! - a leader's proposal waits for its index to come out committed *with the term it was
//!   proposed in* (else another leader's entry took the index: `LeaderChanged`); the meta group
//!   then applies the entry's effects itself (it evaluated the request, see `meta.rs`);
//! - every other committed entry is *followed*: queued for the meta group, which applies its
//!   effects without evaluating anything (invariant I6: replicas apply the same effects);
//! - linearizable reads on any member ask for a read point (`ReadBarrier`, ReadIndex with
//!   raft-rs's `Safe` option: the leader confirms it still leads with a heartbeat round),
//!   then wait until this member applied up to it.
//!
//! Taking over (the fencing rule of the design brief): a new leader evaluates nothing until
//! it has committed an entry of its own term and applied every entry before it. Then every
//! revision in its log is applied, the sequencer's counter is above all of them (`follow`
//! raised it), and no revision a client has seen can be handed out again. Stepping down
//! fails the proposals in flight (`LeaderChanged`; each may still commit under the next
//! leader and is then followed) and abandons the revisions they took.

use super::errors::KvError;
use super::Shared;
use crate::members::{self, LeaderView, MemberEntry, MemberError, MemberRequest};
use crate::peer::PeerCore;
use event_listener::Event;
use ferrocd_raft::group::{GroupConfig, MembershipChange, PeerProgress, ProposeError};
use ferrocd_raft::multi::{Envelope, Node as RaftNode, NodeConfig as RaftNodeConfig, META_GROUP};
use ferrocd_raft::notify::wait_until;
use ferrocd_raft::storage::{conf_at, Entry, LogStore};
use ferrocd_raft::wal_store::WalLogStore;
use futures::channel::oneshot;
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Upper bound on the entry bytes in one append message to a follower.
const MAX_APPEND_BYTES: u64 = 1 << 20;
/// Appends in flight to one follower before the leader waits for acknowledgements.
const MAX_INFLIGHT_APPENDS: usize = 256;
/// Raft messages queued for one peer between two sends; more are dropped (raft retransmits).
const PEER_QUEUE_LIMIT_MSGS: usize = 4096;
/// Read requests waiting for a read point, across all cores; more wait to be queued.
const READ_QUEUE_LIMIT: usize = 4096;
/// Entries kept below a compaction point, so a briefly slow member still catches up from the
/// log (etcd's `SnapshotCatchUpEntries`); `--experimental-snapshot-catchup-entries`.
pub const DEFAULT_SNAPSHOT_CATCHUP_ENTRIES: u64 = 5000;
/// A lagging member holds the log back by at most this many catch-up margins; past that the
/// leader compacts past it (it then needs a snapshot) so the log stays bounded.
const MAX_RETAINED_CATCHUP_MARGINS: u64 = 20;
/// raft-rs forgets every peer's matched index at an election (0 until the peer answers the
/// new leader). For this many election timeouts a new leader does not compact while a peer
/// has not answered: its 0 is unknown, not lagging, and compacting past it would cost that
/// member a snapshot for nothing. Past it, a silent peer is down or cut off, and counts as 0.
const UNANSWERED_GRACE_ELECTIONS: u64 = 3;

/// Raft timing, in etcd's terms (`--heartbeat-interval`, `--election-timeout`).
#[derive(Clone, Debug)]
pub struct RaftTiming {
    pub tick_ms: u64,
    pub election_ticks: usize,
}

impl RaftTiming {
    pub fn from_etcd_flags(heartbeat_ms: u64, election_timeout_ms: u64) -> RaftTiming {
        assert!(heartbeat_ms > 0, "heartbeat interval must be positive");
        RaftTiming {
            tick_ms: heartbeat_ms,
            election_ticks: (election_timeout_ms / heartbeat_ms).max(2) as usize,
        }
    }

    /// How long a request may wait for a leader or a read point: a few election timeouts.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.tick_ms * self.election_ticks as u64 * 5)
    }
}

pub type ReadReply = oneshot::Sender<Result<u64, KvError>>;

/// What other cores ask of the driver on core 0.
pub enum DriverRequest {
    /// A read point (the commit index a quorum confirmed).
    Read(ReadReply),
    /// Hand leadership to this member (Maintenance.MoveLeader).
    TransferLeader(u64),
}

/// The way from any core to the driver: linearizable reads (a read point confirmed by a quorum,
/// then local apply) and leadership transfers.
pub struct ReadBarrier {
    requests: async_channel::Sender<DriverRequest>,
    applied_index: AtomicU64,
    applied: Event,
    timeout: Duration,
}

impl ReadBarrier {
    /// The barrier and the receiving end of its requests (for the driver on core 0).
    pub fn new(timing: &RaftTiming) -> (ReadBarrier, async_channel::Receiver<DriverRequest>) {
        let (requests, rx) = async_channel::bounded(READ_QUEUE_LIMIT);
        let barrier = ReadBarrier {
            requests,
            applied_index: AtomicU64::new(0),
            applied: Event::new(),
            timeout: timing.request_timeout(),
        };
        (barrier, rx)
    }

    /// Resolves once this member has applied every entry committed before the call: a read at
    /// the visible revision after it reflects every write acknowledged before it (I4).
    pub async fn wait(&self) -> Result<(), KvError> {
        let (reply, point) = oneshot::channel();
        self.requests
            .send(DriverRequest::Read(reply))
            .await
            .map_err(|_| KvError::Stopped)?;
        let index = within(self.timeout, point)
            .await
            .ok_or(KvError::Timeout)?
            .map_err(|_| KvError::LeaderChanged)??;
        let applied = wait_until(&self.applied, || self.applied_index.load(SeqCst) >= index);
        within(self.timeout, applied).await.ok_or(KvError::Timeout)
    }

    /// Asks the meta group's leader (this member) to hand leadership to `member`.
    pub async fn transfer_leader(&self, member: u64) -> Result<(), KvError> {
        let request = DriverRequest::TransferLeader(member);
        self.requests
            .send(request)
            .await
            .map_err(|_| KvError::Stopped)
    }

    /// How long a request waits for a leader or a read point.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn set_applied(&self, index: u64) {
        if self.applied_index.fetch_max(index, SeqCst) < index {
            self.applied.notify(usize::MAX);
        }
    }
}

/// `future`'s output, or `None` once `limit` has passed. `Send` (request handlers are): the
/// glommio timer is polled only on the core that created it, which `SendWrapper` checks.
async fn within<T>(limit: Duration, future: impl Future<Output = T>) -> Option<T> {
    let timer = send_wrapper::SendWrapper::new(glommio::timer::sleep(limit));
    futures_lite::future::or(async { Some(future.await) }, async {
        timer.await;
        None
    })
    .await
}

/// What the driver starts from.
pub struct ReplicaStart {
    pub store: WalLogStore,
    /// The highest index the meta checkpoint and recovery applied; raft is told the lower of it
    /// and the durable commit index (`start`), and hands out the committed entries after that.
    pub applied_index: u64,
    pub timing: RaftTiming,
    pub requests: async_channel::Receiver<DriverRequest>,
    /// Entries kept below each compaction point (`DEFAULT_SNAPSHOT_CATCHUP_ENTRIES`).
    pub catchup_entries: u64,
    /// The data dir a snapshot install replaces (`install.rs`).
    pub data_dir: PathBuf,
}

/// What a refused proposal tells the client: no leader known, a membership change still
/// pending, or leadership moving (dropped, or another member leads).
fn propose_error(error: ProposeError) -> KvError {
    match error {
        ProposeError::NotLeader { leader: 0 } => KvError::NoLeader,
        ProposeError::MembershipPending => MemberError::InProgress.into(),
        _ => KvError::LeaderChanged,
    }
}

/// Where to compact the log, and the members whose matched index that passes.
#[derive(Debug, PartialEq, Eq)]
pub struct CompactionPoint {
    pub index: u64,
    pub left_behind: Vec<PeerProgress>,
}

/// The compaction point for a log whose entries up to `safe` are applied and checkpointed
/// (and so not needed by this member): `safe` less `catchup_entries`, and not past any
/// member's matched index (`progress`: the leader's view; `None` on a follower, which keeps
/// the margin only) unless that member lags `safe` by more than the retention bound, which
/// keeps the log bounded.
pub fn compaction_point(
    safe: u64,
    progress: Option<&[PeerProgress]>,
    catchup_entries: u64,
) -> CompactionPoint {
    assert!(
        catchup_entries > 0,
        "a catch-up margin of at least one entry"
    );
    // Every index kept (the margin or a matched index within the bound) is at least
    // `safe - max_retained`, so a member left behind stays below the point.
    let max_retained = catchup_entries.saturating_mul(MAX_RETAINED_CATCHUP_MARGINS);
    let mut index = safe.saturating_sub(catchup_entries);
    let mut left_behind = Vec::new();
    for peer in progress.into_iter().flatten() {
        if peer.matched >= index {
            continue;
        }
        if safe - peer.matched <= max_retained {
            index = peer.matched;
        } else {
            left_behind.push(*peer);
        }
    }
    CompactionPoint { index, left_behind }
}

type Proposed = oneshot::Sender<Result<(), KvError>>;
/// Resolves once a proposal is committed (or failed, see `Replica::await_commit`).
pub type Committed = oneshot::Receiver<Result<(), KvError>>;

pub struct Replica {
    shared: Arc<Shared>,
    raft: RefCell<RaftNode<WalLogStore>>,
    peer: PeerCore,
    timing: RaftTiming,
    /// Set (and `wake` notified) when the driver has work: a tick, a message, a proposal, a
    /// durable ready, a read request, an apply.
    dirty: Cell<bool>,
    wake: Event,
    /// Notified when followed entries are queued or leadership changes (the meta group waits).
    progress: Event,
    /// This leader's proposals by index, with the term they were proposed in.
    proposed: RefCell<BTreeMap<u64, (u64, Proposed)>>,
    /// Committed entries for the meta group to follow, in order.
    followed: RefCell<VecDeque<Entry>>,
    /// The meta group applied every entry up to here.
    applied: Cell<u64>,
    /// Applied index last reported to raft.
    reported_applied: Cell<u64>,
    /// Highest ready number made durable and reported.
    persisted: Cell<u64>,
    /// Read requests not yet asked for, and those asked for under a context.
    reads_waiting: RefCell<Vec<ReadReply>>,
    reads_asked: RefCell<HashMap<u64, Vec<ReadReply>>>,
    next_read_context: Cell<u64>,
    /// Leader and term as last published to `Shared::role`.
    seen: Cell<(Option<u64>, u64)>,
    /// Ticks since leadership last changed (see `UNANSWERED_GRACE_ELECTIONS`).
    ticks_since_election: Cell<u64>,
    catchup_entries: u64,
    data_dir: PathBuf,
    /// A snapshot install is under way: the driver is silent and writes nothing to its log
    /// (`install.rs`).
    installing: Cell<bool>,
}

impl Replica {
    /// Builds the driver and starts its tasks on the current (glommio) executor.
    pub fn start(shared: Arc<Shared>, peer: PeerCore, start: ReplicaStart) -> Rc<Replica> {
        let member_id = shared.identity.member_id;
        // The meta checkpoint may have applied entries that the hard state on disk does not yet
        // call committed (it is written with a later ready); raft must not be told more than it
        // knows. The entries in between come out committed again and are followed: their KV
        // changes may be missing from a shard's checkpoint (`Meta::follow_committed`).
        let raft_applied = start
            .applied_index
            .min(start.store.hard_state().commit)
            .max(start.store.snapshot().meta.index);
        let config = RaftNodeConfig {
            group: GroupConfig {
                member_id,
                election_ticks: start.timing.election_ticks,
                max_election_ticks: start.timing.election_ticks * 2,
                heartbeat_ticks: 1,
                max_size_per_msg_bytes: MAX_APPEND_BYTES,
                max_inflight_msgs: MAX_INFLIGHT_APPENDS,
                applied_index: raft_applied,
            },
            peer_queue_limit_msgs: PEER_QUEUE_LIMIT_MSGS,
            affinity_retry_ticks: start.timing.election_ticks as u64,
        };
        let mut raft = RaftNode::new(config);
        raft.add_group(META_GROUP, start.store, raft_applied);
        let replica = Rc::new(Replica {
            shared,
            raft: RefCell::new(raft),
            peer,
            timing: start.timing,
            dirty: Cell::new(true),
            wake: Event::new(),
            progress: Event::new(),
            proposed: RefCell::new(BTreeMap::new()),
            followed: RefCell::new(VecDeque::new()),
            applied: Cell::new(raft_applied),
            reported_applied: Cell::new(raft_applied),
            persisted: Cell::new(0),
            reads_waiting: RefCell::new(Vec::new()),
            reads_asked: RefCell::new(HashMap::new()),
            next_read_context: Cell::new(1),
            seen: Cell::new((None, 0)),
            ticks_since_election: Cell::new(0),
            catchup_entries: start.catchup_entries,
            data_dir: start.data_dir,
            installing: Cell::new(false),
        });
        if let Some(reads) = &replica.shared.read_barrier {
            reads.set_applied(raft_applied);
        }
        glommio::spawn_local(replica.clone().ticks()).detach();
        glommio::spawn_local(replica.clone().inbound()).detach();
        glommio::spawn_local(replica.clone().requests(start.requests)).detach();
        glommio::spawn_local(replica.clone().drive()).detach();
        replica
    }

    fn member_id(&self) -> u64 {
        self.shared.identity.member_id
    }

    fn poke(&self) {
        self.dirty.set(true);
        self.wake.notify(1);
    }

    async fn ticks(self: Rc<Self>) {
        let tick = Duration::from_millis(self.timing.tick_ms);
        loop {
            glommio::timer::sleep(tick).await;
            if self.installing.get() {
                return;
            }
            self.raft.borrow_mut().tick();
            let ticks = self.ticks_since_election.get();
            self.ticks_since_election.set(ticks.saturating_add(1));
            self.poke();
        }
    }

    async fn inbound(self: Rc<Self>) {
        let me = self.member_id();
        while let Ok(delivery) = self.peer.inbox().recv().await {
            if self.installing.get() {
                continue; // silent until the restart
            }
            let envelope = Envelope {
                from: delivery.from,
                to: me,
                bytes: delivery.payload,
            };
            if let Err(e) = self.raft.borrow_mut().receive(&envelope) {
                crate::warn!(
                    "dropped an undecodable raft envelope",
                    from = format!("{:x}", envelope.from),
                    error = e.0
                );
            }
            self.poke();
        }
    }

    async fn requests(self: Rc<Self>, requests: async_channel::Receiver<DriverRequest>) {
        while let Ok(request) = requests.recv().await {
            match request {
                DriverRequest::Read(reply) => self.reads_waiting.borrow_mut().push(reply),
                DriverRequest::TransferLeader(member) => {
                    let mut raft = self.raft.borrow_mut();
                    let group = raft.group_mut(META_GROUP).expect("meta group");
                    group.transfer_leader(member);
                }
            }
            self.poke();
        }
    }

    async fn drive(self: Rc<Self>) {
        loop {
            wait_until(&self.wake, || self.dirty.get()).await;
            self.dirty.set(false);
            self.step();
        }
    }

    /// One round: read requests, readies, envelopes, leadership.
    fn step(self: &Rc<Self>) {
        if self.installing.get() {
            return;
        }
        self.ask_read_point();
        let readies = self.raft.borrow_mut().ready();
        for (group, ready) in readies {
            assert_eq!(group, META_GROUP, "the replica holds the meta group only");
            if let Some(snapshot) = ready.snapshot {
                // The leader compacted its log past this member's (it logged naming it). Raft
                // replaced the in-memory log by the snapshot point; nothing of this ready may
                // reach the WAL without the state behind it, so it is not persisted.
                self.install(snapshot.meta);
                return;
            }
            if let Some(number) = ready.persist {
                self.persist(number);
            }
            for entry in ready.committed {
                self.committed(entry);
            }
            for point in ready.reads {
                self.read_point(&point.context, point.index);
            }
        }
        for envelope in self.raft.borrow_mut().take_envelopes() {
            // A full queue or an unknown peer drops the batch; raft retransmits.
            let _ = self.peer.send(envelope.to, envelope.bytes);
        }
        self.observe_leadership();
        self.try_take_over();
        let commit = self.report_applied();
        self.shared.role.set_indexes(commit, self.applied.get());
    }

    /// Tells raft what the meta group applied, never ahead of what raft knows is committed
    /// (see `start`); returns the commit index.
    fn report_applied(&self) -> u64 {
        let mut raft = self.raft.borrow_mut();
        let group = raft.group_mut(META_GROUP).expect("meta group");
        let commit = group.commit_index();
        let report = self.applied.get().min(commit);
        if report > self.reported_applied.get() {
            self.reported_applied.set(report);
            group.on_applied(report);
        }
        commit
    }

    /// Goes silent and fetches the leader's state at or above `point` (`install.rs`), which
    /// restarts the process into it; a member that cannot get it stops, naming the cause.
    fn install(&self, point: ferrocd_raft::storage::SnapshotMeta) {
        self.installing.set(true);
        crate::warn!(
            "this member fell behind the meta log's compaction: installing a snapshot",
            index = point.index,
            term = point.term
        );
        let hard_state = {
            let raft = self.raft.borrow();
            raft.group(META_GROUP)
                .expect("meta group")
                .store()
                .hard_state()
        };
        let installer = super::install::Installer {
            peer: self.peer.clone(),
            data_dir: self.data_dir.clone(),
            shards: self.shared.shards.len(),
            member_id: self.member_id(),
            term: hard_state.term,
            vote: hard_state.vote,
        };
        glommio::spawn_local(async move {
            let error = installer.run(point).await;
            super::shard::fatal(&format!("snapshot install failed: {error}"));
        })
        .detach();
    }

    /// The term of `index` (applied, so in the log or its snapshot point) and the membership:
    /// the point a snapshot at `index` stands for.
    pub fn log_point(&self, index: u64) -> (u64, ferrocd_raft::storage::ConfState) {
        let raft = self.raft.borrow();
        let store = raft.group(META_GROUP).expect("meta group").store();
        let term = store
            .term_at(index)
            .unwrap_or_else(|| panic!("applied index {index} outside the meta log"));
        (term, conf_at(store, index))
    }

    fn persist(self: &Rc<Self>, number: u64) {
        let durable = {
            let mut raft = self.raft.borrow_mut();
            let group = raft.group_mut(META_GROUP).expect("meta group");
            group.store_mut().sync()
        };
        let durable =
            durable.unwrap_or_else(|e| super::shard::fatal(&format!("meta raft log: {e}")));
        let replica = self.clone();
        glommio::spawn_local(async move {
            if let Err(e) = durable.await {
                super::shard::fatal(&format!("meta raft log fdatasync failed: {e}"));
            }
            // Batches become durable in order; a later one reported first covers this one.
            if number > replica.persisted.get() {
                replica.persisted.set(number);
                replica.raft.borrow_mut().on_persisted(META_GROUP, number);
            }
            replica.poke();
        })
        .detach();
    }

    fn committed(&self, entry: Entry) {
        if entry.index <= self.applied.get() {
            return; // applied by recovery
        }
        if let Some((term, proposed)) = self.proposed.borrow_mut().remove(&entry.index) {
            if term == entry.term {
                let _ = proposed.send(Ok(()));
                return; // the meta group applies its own proposal
            }
            let _ = proposed.send(Err(KvError::LeaderChanged));
        }
        self.followed.borrow_mut().push_back(entry);
        self.progress.notify(usize::MAX);
    }

    /// Appends `data` to the log (leader only); the receiver resolves once it is committed.
    pub fn propose(&self, data: Vec<u8>) -> Result<(u64, Committed), KvError> {
        let mut raft = self.raft.borrow_mut();
        let group = raft.group_mut(META_GROUP).expect("meta group");
        let term = group.term();
        let index = group.propose(data).map_err(propose_error)?;
        drop(raft);
        Ok((index, self.await_commit(index, term)))
    }

    /// Plans `request` against the member table and this leader's view of the other members
    /// (`members::plan`) and proposes it; returns the change, the member's record after it, its
    /// index, and a receiver that resolves once it is committed (as `propose`). A change whose
    /// predecessor is not applied yet is refused (`InProgress`).
    pub fn propose_membership(
        &self,
        request: &MemberRequest,
    ) -> Result<(MembershipChange, MemberEntry, u64, Committed), KvError> {
        // raft-rs counts an earlier change as pending until it hears it applied.
        self.report_applied();
        let mut raft = self.raft.borrow_mut();
        let group = raft.group_mut(META_GROUP).expect("meta group");
        let progress = group.peer_progress().ok_or(KvError::LeaderChanged)?;
        let members = self.shared.members.list();
        let removed = self.shared.members.removed();
        let view = LeaderView {
            members: &members,
            removed: &removed,
            progress: &progress,
            last_index: group.store().last_index(),
            me: self.member_id(),
        };
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        let now_unix_s = now.map_or(0, |d| d.as_secs());
        let (change, record) = members::plan(request, &view, now_unix_s)?;
        let term = group.term();
        let index = group
            .propose_membership(change, members::encode_record(&record))
            .map_err(propose_error)?;
        drop(raft);
        let committed = self.await_commit(index, term);
        Ok((change, record, index, committed))
    }

    /// Registers a proposal at `index` in `term`: the receiver resolves when that index
    /// commits, with an error if another leader's entry took it.
    fn await_commit(&self, index: u64, term: u64) -> Committed {
        let (done, committed) = oneshot::channel();
        let previous = self.proposed.borrow_mut().insert(index, (term, done));
        assert!(previous.is_none(), "two proposals at index {index}");
        self.poke();
        committed
    }

    /// The next committed entry the meta group must follow.
    pub fn take_followed(&self) -> Option<Entry> {
        self.followed.borrow_mut().pop_front()
    }

    pub fn has_followed(&self) -> bool {
        !self.followed.borrow().is_empty()
    }

    /// Notified when entries are queued for following or leadership changed.
    pub fn progress(&self) -> &Event {
        &self.progress
    }

    /// The meta group applied every entry up to `index`.
    pub fn set_applied(&self, index: u64) {
        assert!(index >= self.applied.get(), "applied index went back");
        self.applied.set(index);
        if let Some(reads) = &self.shared.read_barrier {
            reads.set_applied(index);
        }
        self.poke();
    }

    /// The counters of the meta log's WAL (metrics).
    pub fn wal_stats(&self) -> ferrocd_engine::wal::WalStats {
        let raft = self.raft.borrow();
        raft.group(META_GROUP)
            .expect("meta group")
            .store()
            .wal()
            .stats()
    }

    /// Compacts the meta log up to at most `safe_index` (every entry up to it is in a durable
    /// meta checkpoint and the shards' checkpoints: `meta_checkpoint.rs`), less the catch-up
    /// margin and bounded by lagging members (`compaction_point`); once the compaction is
    /// durable, releases the WAL segments it covers.
    pub async fn compact_log(&self, safe_index: u64) {
        let Some(durable) = self.compact_in_memory(safe_index) else {
            return;
        };
        if let Err(e) = durable.await {
            super::shard::fatal(&format!("meta raft log fdatasync failed: {e}"));
        }
        let release = {
            let raft = self.raft.borrow();
            let group = raft.group(META_GROUP).expect("meta group");
            group.store().release_compacted()
        };
        if let Err(e) = release.await {
            super::shard::fatal(&format!("meta WAL release failed: {e}"));
        }
    }

    /// Writes the compaction (if the point moved) and returns its fsync.
    fn compact_in_memory(
        &self,
        safe_index: u64,
    ) -> Option<impl Future<Output = Result<(), ferrocd_engine::wal::WalError>> + 'static> {
        if self.installing.get() {
            return None; // the log is not written while a snapshot is installed
        }
        let mut raft = self.raft.borrow_mut();
        let group = raft.group_mut(META_GROUP).expect("meta group");
        let base = group.store().snapshot().meta.clone();
        // Only what raft counts as applied: it has handed those entries out and never reads
        // them again (the meta group's applied index may be ahead of it after a restart,
        // see `start`).
        let safe = safe_index.min(self.reported_applied.get());
        let progress = group.peer_progress();
        let grace_ticks = UNANSWERED_GRACE_ELECTIONS * self.timing.election_ticks as u64;
        let unanswered = progress.iter().flatten().any(|peer| peer.matched == 0);
        if unanswered && self.ticks_since_election.get() < grace_ticks {
            return None;
        }
        let point = compaction_point(safe, progress.as_deref(), self.catchup_entries);
        if point.index <= base.index {
            return None;
        }
        for peer in point.left_behind.iter().filter(|p| p.matched >= base.index) {
            crate::error!(
                "compacting the meta log past a lagging member: it needs a snapshot",
                member = format!("{:x}", peer.member),
                matched_index = peer.matched,
                compact_index = point.index,
            );
        }
        // The membership at the point, changes since the previous point included.
        let conf = conf_at(group.store(), point.index);
        group.store_mut().compact(point.index, conf);
        let durable = group.store_mut().sync();
        Some(durable.unwrap_or_else(|e| super::shard::fatal(&format!("meta raft log: {e}"))))
    }

    pub fn timing(&self) -> &RaftTiming {
        &self.timing
    }

    /// Asks one read point for every read waiting now (one heartbeat round serves them all).
    fn ask_read_point(&self) {
        let waiting = std::mem::take(&mut *self.reads_waiting.borrow_mut());
        if waiting.is_empty() {
            return;
        }
        if self.shared.role.leader().is_none() {
            for reply in waiting {
                let _ = reply.send(Err(KvError::NoLeader));
            }
            return;
        }
        let number = self.next_read_context.get();
        self.next_read_context.set(number + 1);
        self.reads_asked.borrow_mut().insert(number, waiting);
        // The leader keeps one pending read per context and drops a second with the same bytes,
        // so the context names this member as well as the request.
        let mut context = self.member_id().to_le_bytes().to_vec();
        context.extend_from_slice(&number.to_le_bytes());
        self.raft.borrow_mut().read_index(META_GROUP, context);
    }

    fn read_point(&self, context: &[u8], index: u64) {
        let Ok(bytes) = <[u8; 16]>::try_from(context) else {
            return;
        };
        let (member, number) = bytes.split_at(8);
        let member = u64::from_le_bytes(member.try_into().expect("8 bytes"));
        if member != self.member_id() {
            return;
        }
        let number = u64::from_le_bytes(number.try_into().expect("8 bytes"));
        let asked = self.reads_asked.borrow_mut().remove(&number);
        for reply in asked.into_iter().flatten() {
            let _ = reply.send(Ok(index));
        }
    }

    /// Publishes leadership changes; a leader that lost its place steps down.
    fn observe_leadership(&self) {
        let now = {
            let raft = self.raft.borrow();
            let group = raft.group(META_GROUP).expect("meta group");
            (group.leader(), group.term())
        };
        let before = self.seen.replace(now);
        if before == now {
            return;
        }
        self.ticks_since_election.set(0);
        let me = Some(self.member_id());
        crate::info!(
            "meta group leadership",
            leader = format!("{:x}", now.0.unwrap_or(0)),
            term = now.1
        );
        if before.0 == me {
            self.step_down();
        }
        // Read points asked of the previous leader may never come (it may be cut off or
        // gone): their readers fail now with `LeaderChanged`, as etcd's, instead of waiting for
        // the request timeout, and may retry at once.
        self.reads_asked.borrow_mut().clear();
        self.shared.role.set_leader(now.0, now.1);
        self.progress.notify(usize::MAX);
    }

    fn step_down(&self) {
        for (_, (_, proposed)) in std::mem::take(&mut *self.proposed.borrow_mut()) {
            let _ = proposed.send(Err(KvError::LeaderChanged));
        }
        self.shared.seq.abandon();
    }

    /// A leader serves once it committed an entry of its term and applied all before it.
    fn try_take_over(&self) {
        let role = &self.shared.role;
        if role.leader() != Some(self.member_id()) || role.is_serving() {
            return;
        }
        let ready = {
            let raft = self.raft.borrow();
            let group = raft.group(META_GROUP).expect("meta group");
            group.leads_committed_term() && self.applied.get() >= group.commit_index()
        };
        if !ready || self.has_followed() {
            return;
        }
        self.shared.leases.promote(Instant::now());
        role.set_serving();
        crate::info!("serving as leader", term = role.term());
        self.progress.notify(usize::MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers(matched: &[(u64, u64)]) -> Vec<PeerProgress> {
        let peer = |&(member, matched)| PeerProgress {
            member,
            matched,
            active: true,
        };
        matched.iter().map(peer).collect()
    }

    #[test]
    fn compaction_keeps_the_margin_and_what_lagging_members_need() {
        let follower = compaction_point(10_000, None, 100);
        assert_eq!(follower.index, 9_900, "a follower keeps the margin only");
        let current = peers(&[(2, 10_000), (3, 9_990)]);
        let point = compaction_point(10_000, Some(&current), 100);
        assert_eq!((point.index, point.left_behind), (9_900, vec![]));
        let slow = peers(&[(2, 10_000), (3, 9_000)]);
        let point = compaction_point(10_000, Some(&slow), 100);
        assert_eq!(point.index, 9_000, "member 3 still catches up from the log");
        assert!(point.left_behind.is_empty());
        assert_eq!(compaction_point(50, None, 100).index, 0, "nothing yet");
    }

    #[test]
    fn a_member_past_the_retention_bound_is_left_behind() {
        let max_retained = 100 * MAX_RETAINED_CATCHUP_MARGINS;
        let at_bound = peers(&[(2, 10_000), (3, 10_000 - max_retained)]);
        let point = compaction_point(10_000, Some(&at_bound), 100);
        assert_eq!(point.index, 10_000 - max_retained);
        let gone = peers(&[(2, 10_000 - max_retained - 1), (3, 9_500)]);
        let point = compaction_point(10_000, Some(&gone), 100);
        assert_eq!(
            point.index, 9_500,
            "the member within the bound still counts"
        );
        assert_eq!(point.left_behind, peers(&[(2, 10_000 - max_retained - 1)]));
    }
}
