//! One shard on its core: its MVCC store, its WAL (the shard group's log), and the loop that
//! serves the messages routed to it.
//!
//! Writes whose keys all live on this shard are evaluated here, synchronously, against the
//! latest state (including writes still on their way to disk); the resulting changes are
//! applied to the store at once, then appended to the WAL, and acknowledged once the revision
//! is visible (durable here and everywhere below it). Every applied change also goes into the
//! shard's `ShardReader` (`ferrocd_engine::reader`), from which any core reads the shard without
//! a message; reads at a visible revision never see the not-yet-durable changes because both
//! the store and the reader are multi-version.
//!
//! Applied changes are checkpointed into the shard's B+tree file in batches, off the executor
//! (`checkpoint.rs`); once a checkpoint is durable, it becomes the readers' base (the read
//! buffer drops what it covers) and the WAL segments it covers are released.
//!
//! The meta group (cross-shard writes) *holds* a shard: the shard makes its pending writes
//! durable, parks new writes, lets the meta group read its latest state, and resumes when the
//! meta group releases it with the changes it committed for this shard.

use super::apply::{self, HistoricalRead, Revs, View};
use super::checkpoint::{CheckpointConfig, CheckpointWriter};
use super::errors::KvError;
use super::stats::ShardStats;
use super::Shared;
use crate::watch::journal::RevisionEvents;
use ferrocd_api::etcdserverpb::{TxnRequest, TxnResponse};
use ferrocd_engine::checkpoint::{Checkpointer, FileStats};
use ferrocd_engine::mvcc::codec::{encode, LogPayload};
use ferrocd_engine::mvcc::{Change, Changes, Exported, KeyValue, Revision, Store};
use ferrocd_engine::reader::ShardReader;
use ferrocd_engine::wal::latency::LatencyHistogram;
use ferrocd_engine::wal::{Record, Wal};
use ferrocd_raft::notify::wait_until;
use futures::channel::oneshot;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Keys one compaction step visits before the shard serves other work (etcd compacts its
/// backend in batches of 1,000 keys).
const COMPACT_STEP_KEYS: usize = 1000;

/// The Raft term of every entry while groups have one voter.
pub const SINGLE_VOTER_TERM: u64 = 1;

pub type Reply<T> = oneshot::Sender<Result<T, KvError>>;

/// A range read: `(key, range_end)` and, for historical reads, a revision.
pub type Span = (Vec<u8>, Vec<u8>);

pub enum ShardMsg {
    /// A write whose keys all live on this shard.
    Write {
        txn: TxnRequest,
        put_first_checks_lease: bool,
        reply: Reply<TxnResponse>,
    },
    /// Meta group: make pending writes durable, then park writes until `Release`.
    Hold { reply: oneshot::Sender<()> },
    /// Meta group, while held: the latest state of `spans`, and `historical` reads.
    Gather {
        spans: Vec<Span>,
        historical: Vec<HistoricalRead>,
        reply: oneshot::Sender<Gathered>,
    },
    /// Meta group: apply the changes it committed for this shard (each revision's, in
    /// revision order), then resume writes.
    Release {
        committed: Vec<(i64, Vec<Change>)>,
        reply: oneshot::Sender<()>,
    },
    /// Clustered, a follower: apply the changes the leader committed for this shard at `rev`,
    /// unless the shard's checkpoint already held them when the member started (the checkpoint
    /// can be ahead of the log's durable commit index, so recovery and raft hand them out again).
    Follow {
        rev: i64,
        changes: Vec<Change>,
        reply: oneshot::Sender<()>,
    },
    /// Watch catch-up: the changes of `[key, end)` with revision in `[from, to]` (at most
    /// `max_revs` revisions), with previous kvs. `Compacted` if `from` is compacted.
    History {
        key: Vec<u8>,
        end: Vec<u8>,
        from: i64,
        to: i64,
        max_revs: usize,
        reply: Reply<Changes>,
    },
    /// Meta group: drop history below `rev` (already durable in the meta log).
    Compact {
        rev: i64,
        reply: oneshot::Sender<()>,
    },
    /// Snapshot: a batch of the shard's history at `rev`, keys after `after`
    /// (`Store::export`); `Compacted` once a compaction passed `rev` (see `snapshot.rs`).
    Export {
        after: Option<Vec<u8>>,
        rev: i64,
        max_bytes: usize,
        reply: Reply<Exported>,
    },
    /// Maintenance: the hash of the shard's history up to `rev`.
    Hash { rev: i64, reply: Reply<u32> },
    /// Metrics: the sizes of the store and the counters of the log.
    Stats { reply: Reply<ShardStats> },
    /// Maintenance: the checkpoint file's size, after packing it when `defragment`.
    File {
        defragment: bool,
        reply: Reply<FileStats>,
    },
}

/// What a held shard reports for `Gather`.
pub struct Gathered {
    pub latest: Vec<KeyValue>,
    /// One result per historical read requested, in order.
    pub historical: Vec<Vec<KeyValue>>,
}

/// A view of a shard's store at its latest state.
pub struct StoreView<'a>(pub &'a Store);

impl View for StoreView<'_> {
    fn latest(&self, key: &[u8], end: &[u8]) -> Vec<KeyValue> {
        self.0.range(key, end, Store::LATEST, 0).kvs
    }
    fn at(&self, key: &[u8], end: &[u8], rev: i64) -> Vec<KeyValue> {
        self.0.range(key, end, rev, 0).kvs
    }
}

pub struct Shard {
    id: usize,
    shared: Arc<Shared>,
    store: RefCell<Store>,
    wal: Wal,
    /// The next WAL entry index.
    next_index: Cell<u64>,
    /// Writes applied to the store but not yet durable, oldest first: revision, WAL index and a
    /// done flag.
    pending: RefCell<VecDeque<(i64, u64, bool)>>,
    /// Every WAL entry up to this index is durable and applied.
    durable_index: Cell<u64>,
    /// Notified when `pending` empties.
    drained: event_listener::Event,
    checkpoints: CheckpointWriter,
    checkpoint_config: CheckpointConfig,
    /// Notified when enough changes wait for a checkpoint, a file request waits, and at stop.
    checkpoint_due: event_listener::Event,
    /// Notified after each checkpoint: writes held back by the backlog limit re-check it.
    checkpointed: event_listener::Event,
    /// File requests (size, defragment) for the checkpoint loop, which owns the file.
    file_requests: RefCell<Vec<(bool, Reply<FileStats>)>>,
    /// How long checkpoint commits took, from hand-over to durable (etcd's backend commit).
    commit_latency: RefCell<LatencyHistogram>,
    stopping: Cell<bool>,
}

impl Shard {
    pub fn new(
        id: usize,
        shared: Arc<Shared>,
        store: Store,
        wal: Wal,
        next_index: u64,
        checkpointer: Checkpointer,
        checkpoint_config: CheckpointConfig,
    ) -> Result<Rc<Shard>, String> {
        shared
            .space
            .set_file_bytes(id, checkpointer.file_size_bytes());
        shared.set_shard_covered(id, checkpointer.meta().covered_revision);
        let checkpoints = CheckpointWriter::spawn(id, checkpointer)?;
        Ok(Rc::new(Shard {
            id,
            shared,
            store: RefCell::new(store),
            wal,
            next_index: Cell::new(next_index),
            pending: RefCell::new(VecDeque::new()),
            durable_index: Cell::new(next_index - 1),
            drained: event_listener::Event::new(),
            checkpoints,
            checkpoint_config,
            checkpoint_due: event_listener::Event::new(),
            checkpointed: event_listener::Event::new(),
            file_requests: RefCell::new(Vec::new()),
            commit_latency: RefCell::new(LatencyHistogram::default()),
            stopping: Cell::new(false),
        }))
    }

    /// Serves messages until every sender is gone, then waits for pending writes and writes a
    /// last checkpoint.
    pub async fn run(self: Rc<Self>, rx: async_channel::Receiver<ShardMsg>) {
        let checkpoints = glommio::spawn_local(self.clone().checkpoint_loop());
        self.serve(rx).await;
        self.stopping.set(true);
        self.checkpoint_due.notify(usize::MAX);
        checkpoints.await;
    }

    async fn serve(self: &Rc<Self>, rx: async_channel::Receiver<ShardMsg>) {
        let mut parked: VecDeque<ShardMsg> = VecDeque::new();
        let mut held = false;
        loop {
            // Parked writes resume only once the meta group released the shard.
            let resumed = if held { None } else { parked.pop_front() };
            let msg = match resumed {
                Some(msg) => msg,
                None => match rx.recv().await {
                    Ok(msg) => msg,
                    Err(_) => break,
                },
            };
            match msg {
                msg @ ShardMsg::Write { .. } if held => parked.push_back(msg),
                ShardMsg::Write {
                    txn,
                    put_first_checks_lease,
                    reply,
                } => {
                    self.wait_for_checkpoint_backlog().await;
                    self.write(&txn, put_first_checks_lease, reply)
                }
                ShardMsg::Hold { reply } => {
                    self.wait_drained().await;
                    held = true;
                    let _ = reply.send(());
                }
                ShardMsg::Gather {
                    spans,
                    historical,
                    reply,
                } => {
                    assert!(held, "gather on shard {} that is not held", self.id);
                    let _ = reply.send(self.gather(&spans, &historical));
                }
                ShardMsg::Release { committed, reply } => {
                    assert!(held, "release of shard {} that is not held", self.id);
                    for (rev, changes) in committed {
                        assert!(!changes.is_empty(), "a release names no change at {rev}");
                        self.apply(rev, &changes);
                    }
                    held = false;
                    let _ = reply.send(());
                }
                ShardMsg::Follow {
                    rev,
                    changes,
                    reply,
                } => {
                    assert!(
                        self.pending.borrow().is_empty(),
                        "a follower's shard {} has writes of its own",
                        self.id
                    );
                    if rev > self.store.borrow().latest_revision() {
                        self.apply(rev, &changes);
                    }
                    let _ = reply.send(());
                }
                ShardMsg::History {
                    key,
                    end,
                    from,
                    to,
                    max_revs,
                    reply,
                } => {
                    let store = self.store.borrow();
                    let _ = reply.send(match from < store.compacted_revision() {
                        true => Err(KvError::Compacted),
                        false => Ok(store.changes(&key, &end, from, to, max_revs)),
                    });
                }
                ShardMsg::Compact { rev, reply } => self.compact(rev, reply),
                ShardMsg::Export {
                    after,
                    rev,
                    max_bytes,
                    reply,
                } => {
                    let store = self.store.borrow();
                    let _ = reply.send(match rev < store.compacted_revision() {
                        true => Err(KvError::Compacted),
                        false => Ok(store.export(after.as_deref(), rev, max_bytes)),
                    });
                }
                ShardMsg::Hash { rev, reply } => {
                    let _ = reply.send(self.hash(rev));
                }
                ShardMsg::Stats { reply } => {
                    let _ = reply.send(Ok(ShardStats {
                        store: self.store.borrow().stats(),
                        wal: self.wal.stats(),
                        checkpoint_commit: *self.commit_latency.borrow(),
                    }));
                }
                ShardMsg::File { defragment, reply } => {
                    self.file_requests.borrow_mut().push((defragment, reply));
                    self.checkpoint_due.notify(1);
                }
            }
        }
        assert!(
            parked.is_empty() || held,
            "parked writes are only left behind by a held shard"
        );
        self.wait_drained().await;
    }

    /// Compacts at `rev` in steps of `COMPACT_STEP_KEYS` keys, letting this shard's reads and
    /// writes run between steps (they are above `rev`, so unaffected); answers once done. The
    /// first step runs at once, so reads below `rev` are refused from here on. A newer
    /// compaction started meanwhile takes the rest over (it removes all this one would).
    fn compact(self: &Rc<Self>, rev: i64, reply: oneshot::Sender<()>) {
        self.reader().set_compacted(rev);
        if self.compact_step(rev) {
            let _ = reply.send(());
            return;
        }
        let shard = self.clone();
        glommio::spawn_local(async move {
            loop {
                futures_lite::future::yield_now().await;
                if shard.compact_step(rev) {
                    break;
                }
            }
            let _ = reply.send(());
        })
        .detach();
    }

    /// One step of the compaction at `rev`; true once it is complete or superseded.
    fn compact_step(&self, rev: i64) -> bool {
        let mut store = self.store.borrow_mut();
        store.compacted_revision() > rev || store.compact_step(rev, COMPACT_STEP_KEYS)
    }

    /// A compaction may have passed `rev` since the request was checked.
    fn hash(&self, rev: i64) -> Result<u32, KvError> {
        let store = self.store.borrow();
        if rev < store.compacted_revision() {
            return Err(KvError::Compacted);
        }
        Ok(store.hash(rev))
    }

    fn gather(&self, spans: &[Span], historical: &[HistoricalRead]) -> Gathered {
        let store = self.store.borrow();
        let view = StoreView(&store);
        let latest = spans
            .iter()
            .flat_map(|(key, end)| view.latest(key, end))
            .collect();
        let historical = historical
            .iter()
            .map(|(key, end, rev)| {
                // A compacted revision fails the txn later (only if that op is on its path).
                if *rev < store.compacted_revision() {
                    Vec::new()
                } else {
                    view.at(key, end, *rev)
                }
            })
            .collect();
        Gathered { latest, historical }
    }

    fn write(
        self: &Rc<Self>,
        txn: &TxnRequest,
        put_first_checks_lease: bool,
        reply: Reply<TxnResponse>,
    ) {
        let seq = &self.shared.seq;
        let revs = Revs {
            current: seq.latest_taken(),
            compacted: self.shared.compacted(),
        };
        let has_pending = !self.pending.borrow().is_empty();
        let outcome = {
            let store = self.store.borrow();
            apply::evaluate_txn(
                &StoreView(&store),
                txn,
                revs,
                &|lease| self.shared.leases.exists(lease),
                put_first_checks_lease,
                &mut || seq.take(self.id, has_pending),
            )
        };
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(e) => {
                // The verdict may rest on writes not yet durable: answer once they are.
                self.answer_when_visible(revs.current, Err(e), reply);
                return;
            }
        };
        let Some(rev) = outcome.rev else {
            self.answer_when_visible(revs.current, Ok(outcome.response), reply);
            return;
        };
        self.apply(rev, &outcome.changes);
        let index = self.next_index.get();
        self.next_index.set(index + 1);
        self.pending.borrow_mut().push_back((rev, index, false));
        let payload = encode(&LogPayload::Changes {
            main: rev,
            changes: outcome.changes,
        });
        let record = Record::entry(SINGLE_VOTER_TERM, index, payload);
        let shard = self.clone();
        let response = outcome.response;
        glommio::spawn_local(async move {
            if let Err(e) = shard.wal.append(&[record]).await {
                fatal(&format!("shard {} WAL append failed: {e}", shard.id));
            }
            shard.settle(rev);
            shard.shared.seq.wait_visible(rev).await;
            let _ = reply.send(Ok(response));
        })
        .detach();
    }

    /// Applies changes to the store, keeps the lease table's attached keys current and
    /// records the changes' watch events in the shard's journal.
    fn apply(&self, rev: i64, changes: &[Change]) {
        let prevs = self.store.borrow_mut().apply(rev, changes);
        let store = self.store.borrow();
        for change in changes {
            let sub = change.sub;
            let saved = store.saved_version(change.effect.key(), Revision { main: rev, sub });
            self.reader()
                .insert(saved.expect("a change just applied is retained"));
        }
        drop(store);
        if self.store.borrow().unsaved_changes() >= self.checkpoint_config.max_changes {
            self.checkpoint_due.notify(1);
        }
        self.shared.leases.on_apply(changes, &prevs);
        self.shared.journals[self.id].append(RevisionEvents::from_changes(rev, changes, prevs));
    }

    fn answer_when_visible<T: 'static>(
        &self,
        rev: i64,
        answer: Result<T, KvError>,
        reply: Reply<T>,
    ) {
        let shared = self.shared.clone();
        glommio::spawn_local(async move {
            shared.seq.wait_visible(rev).await;
            let _ = reply.send(answer);
        })
        .detach();
    }

    /// Marks `rev` durable and publishes the lowest revision still pending.
    fn settle(&self, rev: i64) {
        let mut pending = self.pending.borrow_mut();
        let slot = pending
            .iter_mut()
            .find(|(r, _, _)| *r == rev)
            .expect("settled revision is pending");
        slot.2 = true;
        while pending.front().is_some_and(|(_, _, done)| *done) {
            let (_, index, _) = pending.pop_front().expect("front exists");
            self.durable_index.set(index);
        }
        self.shared
            .seq
            .settle(self.id, pending.front().map(|(r, _, _)| *r));
        if pending.is_empty() {
            self.drained.notify(usize::MAX);
        }
    }

    fn reader(&self) -> &ShardReader {
        &self.shared.readers[self.id]
    }

    /// Back-pressure: while the checkpoints are more than the backlog limit behind, wait for
    /// them. Cannot deadlock: a checkpoint covers every durable change of this shard, and the
    /// writes in flight become durable without this loop.
    async fn wait_for_checkpoint_backlog(&self) {
        let limit = self.checkpoint_config.backlog_limit_changes();
        wait_until(&self.checkpointed, || {
            self.store.borrow().unsaved_changes() < limit || self.stopping.get()
        })
        .await
    }

    async fn wait_drained(&self) {
        wait_until(&self.drained, || self.pending.borrow().is_empty()).await
    }

    /// Checkpoints whenever one is due, until the shard stops; then once more.
    async fn checkpoint_loop(self: Rc<Self>) {
        loop {
            let interval =
                glommio::timer::sleep(Duration::from_millis(self.checkpoint_config.interval_ms));
            let due = wait_until(&self.checkpoint_due, || {
                self.stopping.get()
                    || !self.file_requests.borrow().is_empty()
                    || self.store.borrow().unsaved_changes() >= self.checkpoint_config.max_changes
            });
            futures_lite::future::or(interval, due).await;
            self.checkpoint().await;
            self.serve_file_requests().await;
            if self.stopping.get() {
                break;
            }
        }
    }

    /// Writes what is durable and not yet checkpointed, then releases the WAL segments the
    /// checkpoint covers. Failures are fatal, as for the WAL: the file is at its previous
    /// checkpoint and recovery starts from there.
    async fn checkpoint(&self) {
        if self.store.borrow().unsaved_changes() == 0 {
            return;
        }
        let (covered, wal_index) = self.durable_bound();
        let unsaved = self.store.borrow_mut().take_unsaved(covered);
        if unsaved.versions.is_empty() && unsaved.dropped.is_empty() {
            return; // Everything waiting is above the bound: not durable yet.
        }
        let started = Instant::now();
        match self.checkpoints.write(unsaved, covered, wal_index).await {
            Ok((size_bytes, published)) => {
                self.commit_latency.borrow_mut().record(started.elapsed());
                self.shared.space.set_file_bytes(self.id, size_bytes);
                self.reader().publish(published);
                self.shared.set_shard_covered(self.id, covered);
            }
            Err(e) => fatal(&format!("shard {} checkpoint failed: {e}", self.id)),
        }
        self.checkpointed.notify(usize::MAX);
        if let Err(e) = self.wal.release_before(wal_index + 1).await {
            fatal(&format!("shard {} WAL release failed: {e}", self.id));
        }
    }

    /// Answers the waiting file requests, one job at a time on the checkpoint thread.
    async fn serve_file_requests(&self) {
        let requests = std::mem::take(&mut *self.file_requests.borrow_mut());
        if requests.is_empty() {
            return;
        }
        // A checkpoint that was already running when a request came may predate a compaction
        // the caller finished before asking (etcd: defragment after compact): put what waits
        // now, the compaction's drops included, into the file before measuring or packing it.
        self.checkpoint().await;
        for (defragment, reply) in requests {
            let result = self.checkpoints.file(defragment).await;
            let result = result.map(|(file, published)| {
                self.shared.space.set_file_bytes(self.id, file.size_bytes);
                // After packing: the same checkpoint in the new file, so the old one goes.
                self.reader().publish(published);
                file
            });
            let _ = reply.send(result.map_err(|e| {
                crate::error!(
                    "checkpoint file request failed",
                    shard = self.id,
                    error = e.to_string()
                );
                KvError::Stopped
            }));
        }
    }

    /// The revision and WAL index a checkpoint may cover now: every change to this shard at
    /// or below the revision is applied and durable (and no later one can fall below it), and
    /// so is every WAL entry up to the index. With writes in flight that is just below the
    /// oldest; with none, the visible revision (every shard has applied what lies below it)
    /// or the shard's own latest, whichever is higher. A compaction is never above it: it is
    /// at most the visible revision at the time.
    fn durable_bound(&self) -> (i64, u64) {
        let covered = match self.pending.borrow().front() {
            Some((oldest, _, _)) => oldest - 1,
            None => self
                .store
                .borrow()
                .latest_revision()
                .max(self.shared.seq.visible()),
        };
        (covered, self.durable_index.get())
    }
}

/// A failed WAL write or fsync leaves the log in an unknown state: like etcd, stop the process
/// rather than acknowledge anything more.
///
/// The log line may not reach the disk (a full disk under the log file): the log ignores a
/// failed write rather than panic, so the abort always follows.
pub fn fatal(message: &str) -> ! {
    crate::fatal!("stopping the process", error = message);
    std::process::abort()
}
