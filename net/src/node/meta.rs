//! The meta group: commits writes that touch several shards, and compactions, as one entry in
//! its own log (invariant I2: one revision, all or nothing, also across a crash).
//!
//! A cross-shard write runs one at a time:
//! 1. hold every involved shard, in shard order (each makes its pending writes durable and
//!    parks new ones), so the state the write is evaluated against is durable and frozen;
//! 2. gather the latest state of every key range the request names;
//! 3. evaluate the request on that snapshot (the same code as a shard's fast path);
//! 4. append the changes to the meta log and wait for its fdatasync;
//! 5. release each shard with the changes for its keys.
//!
//! Recovery replays the meta log's changes into the shards they belong to, merged with each
//! shard's own log by revision; a meta entry is on disk whole or not at all.
//!
//! The meta group also keeps the log's non-KV state (`MetaState`: leases, auth, compaction,
//! alarms) and hands it to its checkpoint task (`meta_checkpoint.rs`) every interval, which
//! writes it and releases the meta WAL segments covered.

use super::apply::{self, GatheredView, HistoricalRead, Revs};
use super::errors::KvError;
use super::meta_checkpoint::{
    self, Job, MetaCheckpointConfig, MetaRelease, MetaState, ReleasePoint, Schedule,
};
use super::replica::Replica;
use super::shard::{fatal, Gathered, ShardMsg, Span, SINGLE_VOTER_TERM};
use super::Shared;
use crate::auth::state::AdminOp;
use crate::lease::ops::{LeaseDone, LeaseOp};
use crate::members::{self, MemberEntry, MemberRequest};
use ferrocd_api::etcdserverpb::alarm_request::AlarmAction;
use ferrocd_api::etcdserverpb::AlarmMember;
use ferrocd_api::etcdserverpb::{TxnRequest, TxnResponse};
use ferrocd_engine::mvcc::codec::{decode, encode, Alarm, LogPayload, MemberAttributes};
use ferrocd_engine::mvcc::Change;
use ferrocd_engine::wal::{Record, Wal, WalStats};
use futures::channel::oneshot;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Writes handled together, at most: one hold of their shards, one gather, one log append (a
/// single fdatasync, or one Raft round in a cluster) for all of them.
const MAX_BATCH_WRITES: usize = 64;

/// A write routed to the meta group.
pub struct WriteRequest {
    pub txn: TxnRequest,
    /// The key ranges the txn names, and the shards holding them (as routed).
    pub spans: Vec<Span>,
    pub involved: Vec<usize>,
    pub put_first_checks_lease: bool,
    pub reply: oneshot::Sender<Result<TxnResponse, KvError>>,
}

impl WriteRequest {
    /// Reads at past revisions the txn makes (a batch gathers them only for a lone write).
    fn historical(&self) -> Vec<HistoricalRead> {
        let mut historical = Vec::new();
        apply::txn_historical_ranges(&self.txn, &mut historical);
        historical
    }
}

pub enum MetaMsg {
    Write(WriteRequest),
    Compact {
        rev: i64,
        reply: oneshot::Sender<Result<(), KvError>>,
    },
    /// Metrics: the counters of the meta log.
    Stats {
        reply: oneshot::Sender<WalStats>,
    },
    /// Grant, revoke or checkpoint leases (`crate::lease::ops`).
    Lease {
        op: LeaseOp,
        reply: oneshot::Sender<Result<LeaseDone, KvError>>,
    },
    /// Snapshot: the revision and meta state it starts from (`super::snapshot`).
    Snapshot {
        reply: oneshot::Sender<super::snapshot::SnapshotStart>,
    },
    /// A snapshot for a lagging member (`super::install`): the state at the last applied
    /// index; `None` when this member does not lead the meta group.
    InstallSnapshot {
        reply: oneshot::Sender<Option<super::install::Captured>>,
    },
    /// Change users, roles or the enabled flag (`crate::auth::ops`).
    Auth {
        op: AdminOp,
        reply: oneshot::Sender<Result<(), KvError>>,
    },
    /// Raise or clear an alarm (`AlarmAction::Get` is answered by `Space` directly).
    Alarm {
        action: AlarmAction,
        alarm: Alarm,
        reply: oneshot::Sender<Vec<AlarmMember>>,
    },
    /// A member publishes its name and client URLs (etcd's publish at start-up): logged,
    /// then in every member's table. Nothing is logged when they are already published.
    Publish {
        member_id: u64,
        name: String,
        client_urls: Vec<String>,
        reply: oneshot::Sender<Result<(), KvError>>,
    },
    /// A membership change (this member leads): answered with the member's record after it,
    /// once the change is committed and applied here.
    Member {
        request: MemberRequest,
        reply: oneshot::Sender<Result<MemberEntry, KvError>>,
    },
}

/// What recovery hands the meta group besides its WAL.
pub struct MetaStart {
    pub next_index: u64,
    /// The meta log's non-KV state after recovery.
    pub state: MetaState,
    /// Per shard: the highest revision of a meta entry in the log touching it.
    pub touched: Vec<i64>,
    /// The meta WAL index the checkpoint file covers (0: none).
    pub checkpoint_index: u64,
    pub checkpoint: MetaCheckpointConfig,
    /// Where the membership as of the last applied change is kept (`members::save_current`).
    pub data_dir: std::path::PathBuf,
}

/// Where the meta log goes: the member's own WAL (a single member: durable is committed), or a
/// Raft group replicated to the other members (`replica.rs`).
pub enum MetaLog {
    Single(Rc<Wal>),
    Replicated(Rc<Replica>),
}

pub struct Meta {
    shared: Arc<Shared>,
    log: MetaLog,
    next_index: u64,
    state: MetaState,
    touched: Vec<i64>,
    schedule: Schedule,
    checkpoint: MetaCheckpointConfig,
    /// The meta WAL index the checkpoint file found at start covers (0: none).
    recovered_index: u64,
    data_dir: std::path::PathBuf,
}

impl Meta {
    pub fn new(shared: Arc<Shared>, log: MetaLog, start: MetaStart) -> Meta {
        assert_eq!(start.touched.len(), shared.shards.len(), "one per shard");
        Meta {
            shared,
            log,
            next_index: start.next_index,
            state: start.state,
            touched: start.touched,
            schedule: Schedule::new(
                start.checkpoint.bounds,
                start.checkpoint_index,
                Instant::now(),
            ),
            checkpoint: start.checkpoint,
            recovered_index: start.checkpoint_index,
            data_dir: start.data_dir,
        }
    }

    /// The meta group's writer slot in the sequencer (after the shards').
    pub fn writer_id(shared: &Shared) -> usize {
        shared.shards.len()
    }

    /// Serves until the inbox is closed, then writes a last checkpoint and stops its task.
    pub async fn run(mut self, rx: async_channel::Receiver<MetaMsg>) {
        // One slot: a checkpoint due while one is being written waits for the next interval.
        let (jobs, queue) = async_channel::bounded(1);
        // The checkpoint found at start: `touched` counts every entry still in the log, at
        // least what the entries it covers touch.
        let recovered = (self.recovered_index > 0).then(|| ReleasePoint {
            wal_index: self.recovered_index,
            needed: self.touched.clone(),
        });
        let release = match &self.log {
            MetaLog::Single(wal) => MetaRelease::Wal(wal.clone()),
            MetaLog::Replicated(replica) => MetaRelease::Raft(replica.clone()),
        };
        let task = meta_checkpoint::run(
            self.shared.clone(),
            release,
            self.checkpoint.clone(),
            recovered,
            queue,
        );
        let task = glommio::spawn_local(task).detach();
        let interval = std::time::Duration::from_millis(self.checkpoint.bounds.interval_ms);
        // A message taken from the inbox while collecting a batch, served next.
        let mut taken: Option<MetaMsg> = None;
        loop {
            let next = match taken.take() {
                Some(msg) => Some(Ok(msg)),
                None => {
                    futures_lite::future::or(async { Some(rx.recv().await) }, async {
                        let idle = glommio::timer::sleep(interval);
                        futures_lite::future::or(idle, self.followed()).await;
                        None
                    })
                    .await
                }
            };
            match next {
                Some(Ok(MetaMsg::Write(first))) => {
                    let (batch, rest) = collect_batch(first, &rx);
                    taken = rest;
                    self.write_batch(batch).await;
                }
                Some(Ok(msg)) => self.handle(msg).await,
                Some(Err(_closed)) => break,
                None => {}
            }
            self.follow_committed().await;
            // The state is cloned only when the task can take it at once.
            let due = self
                .schedule
                .is_due(self.last_index(), Instant::now(), false);
            if due && !jobs.is_full() {
                let sent = jobs.try_send(self.checkpoint_job(None));
                assert!(sent.is_ok(), "only this loop sends, and the slot was free");
                self.schedule.handed_over(self.last_index(), Instant::now());
            }
        }
        if self
            .schedule
            .is_due(self.last_index(), Instant::now(), true)
        {
            let (done, written) = oneshot::channel();
            let sent = jobs.send(self.checkpoint_job(Some(done))).await;
            assert!(
                sent.is_ok(),
                "the checkpoint task ends only when jobs closes"
            );
            let _ = written.await;
        }
        jobs.close();
        task.await;
    }

    fn last_index(&self) -> u64 {
        self.next_index - 1
    }

    fn checkpoint_job(&self, done: Option<oneshot::Sender<()>>) -> Job {
        Job {
            checkpoint: self.state.checkpoint(self.last_index()),
            needed: self.touched.clone(),
            done,
        }
    }

    async fn handle(&mut self, msg: MetaMsg) {
        match msg {
            MetaMsg::Write(_) => unreachable!("`run` serves writes in batches"),
            MetaMsg::Compact { rev, reply } => {
                let _ = reply.send(self.compact(rev).await);
            }
            MetaMsg::Stats { reply } => {
                let _ = reply.send(match &self.log {
                    MetaLog::Single(wal) => wal.stats(),
                    MetaLog::Replicated(replica) => replica.wal_stats(),
                });
            }
            MetaMsg::Lease { op, reply } => {
                let _ = reply.send(crate::lease::ops::apply(self, op).await);
            }
            MetaMsg::Auth { op, reply } => {
                let _ = reply.send(crate::auth::ops::apply(self, op).await);
            }
            MetaMsg::Snapshot { reply } => {
                let _ = reply.send(super::snapshot::capture(&self.shared));
            }
            MetaMsg::InstallSnapshot { reply } => {
                let captured = match &self.log {
                    MetaLog::Replicated(replica) if self.shared.role.is_serving() => {
                        let index = self.last_index();
                        let (term, conf) = replica.log_point(index);
                        let checkpoint = self.state.checkpoint(index);
                        Some(super::install::capture(
                            &self.shared,
                            checkpoint,
                            term,
                            conf,
                        ))
                    }
                    _ => None,
                };
                let _ = reply.send(captured);
            }
            MetaMsg::Alarm {
                action,
                alarm,
                reply,
            } => {
                let _ = reply.send(self.alarm(action, alarm).await);
            }
            MetaMsg::Publish {
                member_id,
                name,
                client_urls,
                reply,
            } => {
                let attributes = MemberAttributes {
                    member_id,
                    name,
                    client_urls,
                };
                let _ = reply.send(self.publish(attributes).await);
            }
            MetaMsg::Member { request, reply } => {
                let _ = reply.send(self.change_members(request).await);
            }
        }
    }

    /// Plans, proposes and waits for one membership change (this member leads), then applies
    /// it here as followers do when they reach it in the log. The meta group serves one
    /// message at a time, so no other change of this leader is in flight meanwhile.
    async fn change_members(&mut self, request: MemberRequest) -> Result<MemberEntry, KvError> {
        let MetaLog::Replicated(replica) = &self.log else {
            return Err(members::MemberError::NotClustered.into());
        };
        let replica = replica.clone();
        self.lead().await?;
        let (change, record, index, committed) = replica.propose_membership(&request)?;
        committed.await.map_err(|_| KvError::LeaderChanged)??;
        self.apply_member_change(index, change, &record);
        self.next_index = index + 1;
        replica.set_applied(index);
        Ok(record)
    }

    /// A committed membership change, on every member in log order: the table (which every
    /// core's peer transport follows), its durable copy (written before the change counts as
    /// applied, so the log is never compacted past a change the copy lacks), and, for the
    /// member removed, the end of serving.
    fn apply_member_change(
        &mut self,
        index: u64,
        change: ferrocd_raft::group::MembershipChange,
        record: &MemberEntry,
    ) {
        let table = &self.shared.members;
        table.apply(change, record);
        if let Err(e) = table.save(&self.data_dir, index) {
            fatal(&format!(
                "cannot save the membership after entry {index}: {e}"
            ));
        }
        crate::info!(
            "membership changed",
            change = format!("{change:?}"),
            member = format!("{:x}", record.id),
            peer_urls = record.peer_urls.join(","),
            index = index
        );
        let removed = ferrocd_raft::group::MembershipChange::Remove(self.shared.identity.member_id);
        if change == removed {
            if let MetaLog::Replicated(replica) = &self.log {
                let timing = replica.timing();
                stop_removed(Duration::from_millis(
                    timing.tick_ms * timing.election_ticks as u64,
                ));
            }
        }
    }

    /// etcd's ACTIVATE and DEACTIVATE: the change is durable in the meta log before `Space`
    /// (which refuses writes under NOSPACE) sees it, so a restart keeps every raised alarm.
    async fn alarm(&mut self, action: AlarmAction, alarm: Alarm) -> Vec<AlarmMember> {
        let raised = self.state.alarms.contains(&alarm);
        let payload = match action {
            AlarmAction::Activate if !raised => Some(LogPayload::AlarmActivate(alarm)),
            AlarmAction::Deactivate if raised => Some(LogPayload::AlarmDeactivate(alarm)),
            _ => None,
        };
        if let Some(payload) = payload {
            // In a cluster the change may fail (no leader): the alarm stays as it was.
            let logged = match self.lead().await {
                Ok(()) => self.append(&payload).await,
                Err(e) => Err(e),
            };
            if let Err(e) = logged {
                crate::warn!("alarm change not logged", error = e.to_string());
                return space_alarms(&self.shared);
            }
        }
        let space = &self.shared.space;
        space.alarm(action, alarm.member_id, alarm.alarm)
    }

    /// Logs a member's attributes unless they are published already.
    async fn publish(&mut self, attributes: MemberAttributes) -> Result<(), KvError> {
        if self.state.published.get(&attributes.member_id) == Some(&attributes) {
            return Ok(());
        }
        self.lead().await?;
        self.append(&LogPayload::MemberPublish(attributes)).await
    }

    /// Clustered: waits until this member serves as leader (`replica.rs`: taken over), applying
    /// committed entries meanwhile; a member that does not lead refuses (the request was routed
    /// here before leadership moved, or no leader is known). A single member always leads.
    /// Every operation that evaluates or logs something calls it first (writes, compaction,
    /// lease and auth operations, alarms, publish).
    pub async fn lead(&mut self) -> Result<(), KvError> {
        let MetaLog::Replicated(replica) = &self.log else {
            return Ok(());
        };
        let replica = replica.clone();
        let shared = self.shared.clone();
        let role = &shared.role;
        let limit = replica.timing().request_timeout();
        let started = Instant::now();
        loop {
            self.follow_committed().await;
            if role.is_serving() {
                return Ok(());
            }
            match role.leader() {
                Some(leader) if leader != role.member_id() => return Err(KvError::LeaderChanged),
                _ if started.elapsed() >= limit => return Err(KvError::NoLeader),
                _ => {}
            }
            let changed = ferrocd_raft::notify::wait_until(replica.progress(), || {
                role.is_serving() || replica.has_followed()
            });
            let left = limit.saturating_sub(started.elapsed());
            futures_lite::future::or(changed, glommio::timer::sleep(left)).await;
        }
    }

    /// Resolves when committed entries wait to be followed (never for a single member).
    async fn followed(&self) {
        match &self.log {
            MetaLog::Single(_) => futures::future::pending().await,
            MetaLog::Replicated(replica) => {
                ferrocd_raft::notify::wait_until(replica.progress(), || replica.has_followed())
                    .await
            }
        }
    }

    /// Applies every committed entry queued for following.
    async fn follow_committed(&mut self) {
        let MetaLog::Replicated(replica) = &self.log else {
            return;
        };
        let replica = replica.clone();
        while let Some(entry) = replica.take_followed() {
            if let Some((change, context)) = ferrocd_raft::group::decode_membership(&entry) {
                let record = members::decode_record(&context).unwrap_or_else(|e| {
                    fatal(&format!("committed meta entry {}: {e}", entry.index))
                });
                self.apply_member_change(entry.index, change, &record);
            } else if !entry.data.is_empty() {
                let payload = decode(&entry.data).unwrap_or_else(|e| {
                    fatal(&format!(
                        "committed meta entry {} undecodable: {e}",
                        entry.index
                    ))
                });
                // The meta checkpoint found at start holds the non-KV effects of the entries it
                // covers; their KV changes may still be missing from a shard's checkpoint (each
                // shard skips what it has, `ShardMsg::Follow`).
                if entry.index <= self.recovered_index {
                    self.follow_kv(payload).await;
                } else {
                    self.record(&payload);
                    self.follow(payload).await;
                }
            }
            // Empty entries (a new leader's first) have no effect here.
            self.next_index = self.next_index.max(entry.index + 1);
            replica.set_applied(entry.index);
        }
    }

    /// The effects of a committed entry another member evaluated: the same as its leader's
    /// after `append` (compare `write_many`, `compact`, `lease::ops`, `auth::ops`, `alarm`),
    /// without evaluating anything: the lease, alarm and auth tables first (a revoke removes
    /// its lease before its deletes are applied, as on the leader), then the KV changes.
    async fn follow(&mut self, payload: LogPayload) {
        let shared = &self.shared;
        match &payload {
            LogPayload::LeaseRevoke { id, .. } => shared.leases.remove(*id),
            LogPayload::LeaseGrant { id, ttl_s } => {
                let remaining = crate::lease::ttl(*ttl_s);
                let leases = &shared.leases;
                leases.insert(*id, *ttl_s, remaining, false, Instant::now());
            }
            LogPayload::AlarmActivate(alarm) => {
                shared
                    .space
                    .alarm(AlarmAction::Activate, alarm.member_id, alarm.alarm);
            }
            LogPayload::AlarmDeactivate(alarm) => {
                shared
                    .space
                    .alarm(AlarmAction::Deactivate, alarm.member_id, alarm.alarm);
            }
            LogPayload::AuthEnable { .. }
            | LogPayload::AuthUserPut(_)
            | LogPayload::AuthUserDelete { .. }
            | LogPayload::AuthRolePut(_)
            | LogPayload::AuthRoleDelete { .. }
            | LogPayload::AuthToken { .. } => shared.auth.apply(&payload),
            // Remaining TTLs matter to a leader only (a new leader renews every lease);
            // `record` published a member's attributes; the rest is KV.
            LogPayload::LeaseCheckpoint { .. }
            | LogPayload::MemberPublish(_)
            | LogPayload::Changes { .. }
            | LogPayload::Compact { .. } => {}
        }
        self.follow_kv(payload).await;
    }

    /// Only the KV part of a committed entry (all of it for entries the meta checkpoint found
    /// at start covers, see `follow_committed`).
    async fn follow_kv(&mut self, payload: LogPayload) {
        let stopped = match payload {
            LogPayload::Changes { main, changes }
            | LogPayload::LeaseRevoke { main, changes, .. } => {
                self.follow_changes(main, changes).await
            }
            LogPayload::Compact { rev } => self.compact_shards(rev).await,
            _ => Ok(()),
        };
        if stopped.is_err() {
            fatal("a shard stopped while following the meta log");
        }
    }

    /// Applies replicated changes at `main` to the shards holding their keys (a follower's
    /// shards have no writes of their own, so nothing is held), then makes the revision visible
    /// (the leader committed every revision below it first).
    async fn follow_changes(&mut self, main: i64, changes: Vec<Change>) -> Result<(), KvError> {
        if main == 0 {
            return Ok(());
        }
        for (shard, changes) in self.split_by_shard(changes) {
            let (reply, done) = oneshot::channel();
            let msg = ShardMsg::Follow {
                rev: main,
                changes,
                reply,
            };
            self.shared.send_shard(shard, msg).await?;
            done.await.map_err(|_| KvError::Stopped)?;
        }
        self.shared.seq.follow(main);
        Ok(())
    }

    /// Serves writes together (see `MAX_BATCH_WRITES`), answering each.
    async fn write_batch(&mut self, batch: Vec<WriteRequest>) {
        let answers = match self.lead().await {
            Ok(()) => self.write_many(&batch).await,
            Err(e) => Err(e),
        };
        match answers {
            Ok(answers) => {
                for (request, answer) in batch.into_iter().zip(answers) {
                    let _ = request.reply.send(answer);
                }
            }
            Err(e) => batch.into_iter().for_each(|r| {
                let _ = r.reply.send(Err(e));
            }),
        }
    }

    /// Holds the shards of every write, gathers what they name, evaluates them in order (each
    /// sees the changes of those before it), appends their changes in one go and releases the
    /// shards with the committed ones. A write's answer stands only if every change before it
    /// in the batch committed (a cluster may commit a prefix, then lose leadership).
    async fn write_many(
        &mut self,
        batch: &[WriteRequest],
    ) -> Result<Vec<Result<TxnResponse, KvError>>, KvError> {
        let mut involved: Vec<usize> = batch.iter().flat_map(|w| w.involved.clone()).collect();
        involved.sort_unstable();
        involved.dedup();
        let spans: Vec<Span> = batch.iter().flat_map(|w| w.spans.clone()).collect();
        let historical = match batch {
            [only] => only.historical(),
            _ => Vec::new(),
        };
        self.hold(&involved).await?;
        let mut view = self.gather(&involved, &spans, &historical).await?;
        let shared = self.shared.clone();
        let seq = &shared.seq;
        let writer = Meta::writer_id(&shared);
        let before = seq.latest_taken();
        // Per write: its answer and the number of payloads that must commit for it to stand.
        let mut answers = Vec::with_capacity(batch.len());
        let mut payloads = Vec::new();
        for write in batch {
            let revs = Revs {
                current: seq.latest_taken(),
                compacted: shared.compacted(),
            };
            let has_pending = !payloads.is_empty();
            let outcome = apply::evaluate_txn(
                &view,
                &write.txn,
                revs,
                &|lease| shared.leases.exists(lease),
                write.put_first_checks_lease,
                &mut || seq.take(writer, has_pending),
            );
            let answer = match outcome {
                Ok(outcome) => {
                    if let Some(rev) = outcome.rev {
                        view.apply(rev, &outcome.changes);
                        let changes = outcome.changes;
                        payloads.push(LogPayload::Changes { main: rev, changes });
                    }
                    Ok(outcome.response)
                }
                Err(e) => Err(e),
            };
            answers.push((answer, payloads.len()));
        }
        let (committed, failure) = self.append_all(&payloads).await;
        let released: Vec<(i64, Vec<Change>)> = payloads
            .into_iter()
            .take(committed)
            .map(|payload| match payload {
                LogPayload::Changes { main, changes } => (main, changes),
                _ => unreachable!("the batch appends changes only"),
            })
            .collect();
        let last_committed = released.last().map(|(rev, _)| *rev);
        self.release(&involved, released).await?;
        match (failure, last_committed) {
            (None, Some(_)) => seq.settle(writer, None),
            (None, None) => {}
            (Some(_), last) => {
                // Leadership moved: the revisions not committed here are abandoned; those that
                // were are applied, so they become visible.
                seq.abandon();
                last.into_iter().for_each(|rev| seq.follow(rev));
            }
        }
        seq.wait_visible(last_committed.unwrap_or(before)).await;
        let stands = |needed: usize| needed <= committed;
        Ok(answers
            .into_iter()
            .map(|(answer, needed)| match (stands(needed), failure) {
                (true, _) => answer,
                (false, failure) => Err(failure.unwrap_or(KvError::LeaderChanged)),
            })
            .collect())
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Holds `shards` in order: each makes its pending writes durable and parks new ones.
    pub async fn hold(&self, shards: &[usize]) -> Result<(), KvError> {
        for &shard in shards {
            let (reply, done) = oneshot::channel();
            self.shared
                .send_shard(shard, ShardMsg::Hold { reply })
                .await?;
            done.await.map_err(|_| KvError::Stopped)?;
        }
        Ok(())
    }

    async fn gather(
        &self,
        involved: &[usize],
        spans: &[Span],
        historical: &[HistoricalRead],
    ) -> Result<GatheredView, KvError> {
        let historical_slots = historical.iter().map(|h| (h.clone(), Vec::new())).collect();
        let mut view = GatheredView {
            latest: BTreeMap::new(),
            historical: historical_slots,
        };
        for &shard in involved {
            let (reply, done) = oneshot::channel();
            let msg = ShardMsg::Gather {
                spans: spans.to_vec(),
                historical: historical.to_vec(),
                reply,
            };
            self.shared.send_shard(shard, msg).await?;
            let Gathered { latest, historical } = done.await.map_err(|_| KvError::Stopped)?;
            view.latest
                .extend(latest.into_iter().map(|kv| (kv.key.clone(), kv)));
            for (slot, kvs) in view.historical.iter_mut().zip(historical) {
                slot.1.extend(kvs);
            }
        }
        for (_, kvs) in &mut view.historical {
            kvs.sort_by(|a, b| a.key.cmp(&b.key));
        }
        Ok(view)
    }

    /// Releases held `involved` shards, handing each the changes for its keys at each
    /// revision of `committed` (in revision order).
    pub async fn release(
        &self,
        involved: &[usize],
        committed: Vec<(i64, Vec<Change>)>,
    ) -> Result<(), KvError> {
        let mut per_shard: BTreeMap<usize, Vec<(i64, Vec<Change>)>> = BTreeMap::new();
        for (rev, changes) in committed {
            for (shard, changes) in self.split_by_shard(changes) {
                per_shard.entry(shard).or_default().push((rev, changes));
            }
        }
        for &shard in involved {
            let committed = per_shard.remove(&shard).unwrap_or_default();
            let (reply, done) = oneshot::channel();
            let msg = ShardMsg::Release { committed, reply };
            self.shared.send_shard(shard, msg).await?;
            done.await.map_err(|_| KvError::Stopped)?;
        }
        assert!(
            per_shard.is_empty(),
            "a change for a shard that was not held"
        );
        Ok(())
    }

    /// `changes` grouped by the shard holding their keys.
    fn split_by_shard(&self, changes: Vec<Change>) -> BTreeMap<usize, Vec<Change>> {
        let mut per_shard: BTreeMap<usize, Vec<Change>> = BTreeMap::new();
        for change in changes {
            let shard = self.shared.shard_of(change.effect.key());
            per_shard.entry(shard).or_default().push(change);
        }
        per_shard
    }

    async fn compact(&mut self, rev: i64) -> Result<(), KvError> {
        self.lead().await?;
        if rev <= self.shared.compacted() {
            return Err(KvError::Compacted);
        }
        if rev > self.shared.seq.visible() {
            return Err(KvError::FutureRev);
        }
        self.append(&LogPayload::Compact { rev }).await?;
        self.compact_shards(rev).await
    }

    /// Every shard drops its history below `rev` (the compaction is committed).
    async fn compact_shards(&self, rev: i64) -> Result<(), KvError> {
        self.shared.set_compacted(rev);
        for shard in 0..self.shared.shards.len() {
            let (reply, done) = oneshot::channel();
            self.shared
                .send_shard(shard, ShardMsg::Compact { rev, reply })
                .await?;
            done.await.map_err(|_| KvError::Stopped)?;
        }
        Ok(())
    }

    /// Appends one entry to the meta log and returns once it is committed (a single member:
    /// durable; a cluster: durable on a quorum); the entry's non-KV effect is then in the state
    /// the next checkpoint writes. In a cluster it fails when leadership moves (the entry may
    /// still commit under the next leader: this member then follows it).
    pub async fn append(&mut self, payload: &LogPayload) -> Result<(), KvError> {
        match self.append_all(std::slice::from_ref(payload)).await {
            (_, Some(e)) => Err(e),
            (_, None) => Ok(()),
        }
    }

    /// Appends `payloads` as consecutive entries (one WAL write and fdatasync, or proposals a
    /// Raft round carries together) and waits for them: returns how many committed, a prefix,
    /// and why the rest did not (leadership moved; those may still commit under the next
    /// leader, and are then followed).
    async fn append_all(&mut self, payloads: &[LogPayload]) -> (usize, Option<KvError>) {
        match &self.log {
            MetaLog::Single(wal) => {
                let wal = wal.clone();
                self.append_to_wal(&wal, payloads).await;
                (payloads.len(), None)
            }
            MetaLog::Replicated(replica) => {
                let replica = replica.clone();
                self.propose_all(&replica, payloads).await
            }
        }
    }

    /// A single member: one WAL write and fdatasync; durable is committed.
    async fn append_to_wal(&mut self, wal: &Wal, payloads: &[LogPayload]) {
        let records: Vec<Record> = payloads
            .iter()
            .map(|payload| {
                self.next_index += 1;
                Record::entry(SINGLE_VOTER_TERM, self.next_index - 1, encode(payload))
            })
            .collect();
        if let Err(e) = wal.append(&records).await {
            fatal(&format!("meta WAL append failed: {e}"));
        }
        payloads.iter().for_each(|payload| self.record(payload));
    }

    /// A cluster: proposes every payload at once (one Raft round carries them), then waits for
    /// each in order; see `append_all` for what is returned.
    async fn propose_all(
        &mut self,
        replica: &Replica,
        payloads: &[LogPayload],
    ) -> (usize, Option<KvError>) {
        let mut proposed = Vec::with_capacity(payloads.len());
        let mut failure = None;
        for payload in payloads {
            match replica.propose(encode(payload)) {
                Ok(waiting) => proposed.push(waiting),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let mut committed = 0;
        for (index, waiting) in proposed {
            match waiting.await {
                Ok(Ok(())) => {
                    self.next_index = index + 1;
                    replica.set_applied(index);
                    self.record(&payloads[committed]);
                    committed += 1;
                }
                Ok(Err(e)) => {
                    failure = Some(e);
                    break;
                }
                Err(_dropped) => {
                    failure = Some(KvError::LeaderChanged);
                    break;
                }
            }
        }
        (committed, failure)
    }

    /// Notes a committed entry in the meta state and the per-shard touched revisions.
    fn record(&mut self, payload: &LogPayload) {
        if let Err(e) = self.state.apply(payload) {
            panic!("the meta group logged an entry its state refuses: {e}");
        }
        if let Some((main, changes)) = meta_checkpoint::kv_changes(payload) {
            meta_checkpoint::note_touched(&mut self.touched, main, changes);
        }
        if let LogPayload::MemberPublish(attributes) = payload {
            self.shared.members.publish(attributes);
        }
    }
}

/// etcd's message for a member that learns it was removed.
pub const REMOVED: &str = "the member has been permanently removed from the cluster";

/// etcd's end for a removed member: the process stops, with status 0 as etcd's (its data dir
/// cannot serve again: start-up refuses it). It waits `grace` first, so that a leader's answer
/// to its own removal leaves.
pub(crate) fn stop_removed(grace: Duration) {
    glommio::spawn_local(async move {
        glommio::timer::sleep(grace).await;
        crate::error!("stopping the process", error = REMOVED);
        std::process::exit(0);
    })
    .detach();
}

/// The alarms as `Space` reports them, unchanged.
fn space_alarms(shared: &Shared) -> Vec<AlarmMember> {
    shared.space.alarm(AlarmAction::Get, 0, 0)
}

/// `first` and the writes queued right behind it, up to `MAX_BATCH_WRITES`; the first other
/// message taken from the inbox (or a write with reads at past revisions, which goes alone)
/// is returned to be served next.
fn collect_batch(
    first: WriteRequest,
    rx: &async_channel::Receiver<MetaMsg>,
) -> (Vec<WriteRequest>, Option<MetaMsg>) {
    let alone = !first.historical().is_empty();
    let mut batch = vec![first];
    while !alone && batch.len() < MAX_BATCH_WRITES {
        match rx.try_recv() {
            Ok(MetaMsg::Write(next)) if next.historical().is_empty() => batch.push(next),
            Ok(other) => return (batch, Some(other)),
            Err(_) => break,
        }
    }
    (batch, None)
}
