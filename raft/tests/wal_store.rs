//! `WalLogStore` on real WAL directories: the `LogStore` contract against `MemLogStore` as a
//! model under random writes, syncs, crashes (unsynced writes dropped) and torn tails, old
//! single-voter directories, and a `Group` committing on top of it across reopens.

use std::future::Future;
use std::path::Path;

use ferrocd_engine::wal::{read_dir, Record, Wal, WalOptions};
use ferrocd_raft::group::{Group, GroupConfig};
use ferrocd_raft::storage::{
    ConfState, Entry, EntryKind, HardState, LogStore, MemLogStore, Snapshot, SnapshotMeta,
};
use ferrocd_raft::wal_store::WalLogStore;
use proptest::prelude::*;

/// Small segments so a few dozen entries rotate and releases happen.
fn options() -> WalOptions {
    WalOptions {
        segment_size_bytes: 16 * 1024,
        max_batch_bytes: 64 * 1024,
        force_buffered: false,
    }
}

fn run<F: Future>(make: impl FnOnce() -> F) -> F::Output {
    glommio::LocalExecutorBuilder::default()
        .make()
        .expect("executor")
        .run(make())
}

/// On the build's file system (O_DIRECT works there, unlike a tmpfs `/tmp`).
fn test_dir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir")
}

fn voters(ids: &[u64]) -> ConfState {
    ConfState {
        voters: ids.to_vec(),
        learners: Vec::new(),
    }
}

/// What `MemLogStore::bootstrap(vec![1], _)` starts from.
fn bootstrap_meta() -> SnapshotMeta {
    SnapshotMeta {
        index: 1,
        term: 1,
        conf: voters(&[1]),
    }
}

async fn open(dir: &Path, initial: SnapshotMeta) -> WalLogStore {
    WalLogStore::open(dir, options(), initial)
        .await
        .expect("open")
}

fn term_of(store: &impl LogStore, index: u64) -> Option<u64> {
    let snap = &store.snapshot().meta;
    if index == snap.index {
        return Some(snap.term);
    }
    if index < snap.index || index > store.last_index() {
        return None;
    }
    Some(store.entries(index, index + 1, u64::MAX)[0].term)
}

/// Everything a reader of the store can see (snapshot data aside: the WAL store keeps none).
#[derive(Debug, PartialEq, Eq)]
struct View {
    hard_state: HardState,
    snapshot: SnapshotMeta,
    entries: Vec<Entry>,
}

fn view(store: &impl LogStore) -> View {
    let first = store.snapshot().meta.index + 1;
    View {
        hard_state: store.hard_state(),
        snapshot: store.snapshot().meta.clone(),
        entries: store.entries(first, store.last_index() + 1, u64::MAX),
    }
}

#[derive(Clone, Debug)]
enum Op {
    /// Appends `count` entries at a point chosen by `at` in (max(commit, base), last + 1].
    Append {
        at: u8,
        count: u8,
        new_term: bool,
    },
    Commit(u8),
    Compact(u8),
    /// A leader's snapshot at commit + `ahead`, in a term the log does not hold.
    Install {
        ahead: u8,
    },
    Sync,
    /// Waits for the oldest outstanding sync.
    AwaitSync,
    Release,
    /// Closes after every sync completed, or drops the store with syncs outstanding.
    Reopen {
        crash: bool,
    },
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (any::<u8>(), 1u8..5, any::<bool>())
            .prop_map(|(at, count, new_term)| Op::Append { at, count, new_term }),
        3 => any::<u8>().prop_map(Op::Commit),
        1 => any::<u8>().prop_map(Op::Compact),
        1 => (0u8..4).prop_map(|ahead| Op::Install { ahead }),
        4 => Just(Op::Sync),
        3 => Just(Op::AwaitSync),
        1 => Just(Op::Release),
        1 => any::<bool>().prop_map(|crash| Op::Reopen { crash }),
    ]
}

type SyncFuture =
    std::pin::Pin<Box<dyn Future<Output = Result<(), ferrocd_engine::wal::WalError>>>>;

/// Drives a `WalLogStore` and a `MemLogStore` model with the same writes.
struct Pair {
    wal: WalLogStore,
    model: MemLogStore,
    /// Outstanding syncs, oldest first, with the model's mark.
    syncs: std::collections::VecDeque<(u64, SyncFuture)>,
    term: u64,
    data_seq: u8,
}

impl Pair {
    fn write_both(&mut self, write: impl Fn(&mut dyn LogStoreMut)) {
        write(&mut self.wal);
        write(&mut self.model);
    }

    fn apply_write(&mut self, op: &Op) {
        let hs = self.model.hard_state();
        let base = self.model.snapshot().meta.index;
        let last = self.model.last_index();
        let floor = hs.commit.max(base);
        match *op {
            Op::Append {
                at,
                count,
                new_term,
            } => {
                let first = floor + 1 + u64::from(at) % (last + 1 - floor);
                self.term += u64::from(new_term);
                for index in first..first + u64::from(count) {
                    self.data_seq = self.data_seq.wrapping_add(1);
                    let entry = Entry {
                        index,
                        term: self.term,
                        kind: if index % 5 == 0 {
                            EntryKind::ConfChange
                        } else {
                            EntryKind::Normal
                        },
                        data: vec![self.data_seq; usize::from(self.data_seq) % 40],
                    };
                    // One entry per model write: a torn WAL keeps a prefix of records.
                    self.write_both(|s| s.append(std::slice::from_ref(&entry)));
                }
            }
            Op::Commit(step) => {
                let commit = hs.commit + u64::from(step) % (last - hs.commit + 1);
                let hs = HardState {
                    term: self.term,
                    vote: 1,
                    commit,
                };
                self.write_both(|s| s.set_hard_state(hs));
            }
            Op::Compact(step) => {
                let index = base + u64::from(step) % (hs.commit - base + 1);
                let conf = self.model.snapshot().meta.conf.clone();
                let term = term_of(&self.model, index).expect("in the log");
                self.wal.compact(index, conf.clone());
                self.model.compact(Snapshot {
                    meta: SnapshotMeta { index, term, conf },
                    data: Vec::new(),
                });
            }
            Op::Install { ahead } => {
                self.term += 1;
                let meta = SnapshotMeta {
                    index: hs.commit + u64::from(ahead),
                    term: self.term,
                    conf: voters(&[1, 2 + u64::from(ahead)]),
                };
                let snapshot = Snapshot {
                    meta: meta.clone(),
                    data: Vec::new(),
                };
                self.write_both(|s| s.install_snapshot(snapshot.clone()));
                let hs = HardState {
                    term: self.term,
                    vote: 0,
                    commit: meta.index,
                };
                self.write_both(|s| s.set_hard_state(hs));
            }
            _ => unreachable!("not a write"),
        }
    }
}

/// `LogStore`'s writes, object safe, so one closure drives both stores.
trait LogStoreMut {
    fn append(&mut self, entries: &[Entry]);
    fn set_hard_state(&mut self, hs: HardState);
    fn install_snapshot(&mut self, snapshot: Snapshot);
}

impl<S: LogStore> LogStoreMut for S {
    fn append(&mut self, entries: &[Entry]) {
        LogStore::append(self, entries)
    }
    fn set_hard_state(&mut self, hs: HardState) {
        LogStore::set_hard_state(self, hs)
    }
    fn install_snapshot(&mut self, snapshot: Snapshot) {
        LogStore::install_snapshot(self, snapshot)
    }
}

/// The crash survivors the model allows that equal what `recovered` shows, if any.
fn matching_crash(model: &MemLogStore, recovered: &WalLogStore) -> Option<MemLogStore> {
    let seen = view(recovered);
    (0..=model.unsynced_writes())
        .map(|k| model.crash(k))
        .find(|candidate| view(candidate) == seen)
}

/// Closes `store` (`clean`) or drops it (a crash: what was not durable may be lost), then
/// opens the directory again.
async fn reopen(store: WalLogStore, dir: &Path, clean: bool) -> WalLogStore {
    if clean {
        store.close().await.expect("close");
    } else {
        drop(store);
    }
    open(dir, bootstrap_meta()).await
}

async fn run_ops(ops: Vec<Op>) {
    let dir = test_dir();
    let mut pair = Pair {
        wal: open(dir.path(), bootstrap_meta()).await,
        model: MemLogStore::bootstrap(vec![1], Vec::new()),
        syncs: Default::default(),
        term: 1,
        data_seq: 0,
    };
    for op in &ops {
        match op {
            Op::Sync => {
                let mark = pair.model.begin_sync();
                let sync = pair.wal.sync().expect("sync");
                pair.syncs.push_back((mark, Box::pin(sync)));
            }
            Op::AwaitSync => {
                if let Some((mark, sync)) = pair.syncs.pop_front() {
                    sync.await.expect("durable");
                    pair.model.finish_sync(mark);
                }
            }
            Op::Release => {
                pair.wal.release_compacted().await.expect("release");
            }
            Op::Reopen { crash: false } => {
                let mark = pair.model.begin_sync();
                pair.wal.sync().expect("sync").await.expect("durable");
                pair.model.finish_sync(mark);
                pair.syncs.clear();
                pair.wal = reopen(pair.wal, dir.path(), true).await;
            }
            Op::Reopen { crash: true } => {
                pair.syncs.clear();
                pair.wal = reopen(pair.wal, dir.path(), false).await;
                pair.model = matching_crash(&pair.model, &pair.wal).unwrap_or_else(|| {
                    panic!(
                        "recovered {:?} is no prefix of the writes after {ops:?}",
                        view(&pair.wal)
                    )
                });
            }
            write => pair.apply_write(write),
        }
        assert_eq!(
            view(&pair.wal),
            view(&pair.model),
            "after {op:?} in {ops:?}"
        );
    }
}

/// Writes `ops` (syncs and writes only), syncs everything, closes, then zeroes the last
/// segment from a point `cut` chooses to the end of its data, as a write torn by a crash
/// would leave it: the store must reopen to the state after some prefix of the writes.
async fn run_torn(ops: Vec<Op>, cut: prop::sample::Index) {
    let dir = test_dir();
    let mut pair = Pair {
        wal: open(dir.path(), bootstrap_meta()).await,
        model: MemLogStore::bootstrap(vec![1], Vec::new()),
        syncs: Default::default(),
        term: 1,
        data_seq: 0,
    };
    for op in &ops {
        match op {
            Op::Sync => drop(pair.wal.sync().expect("sync")),
            write => pair.apply_write(write),
        }
    }
    pair.wal.sync().expect("sync").await.expect("durable");
    pair.wal.close().await.expect("close");
    let tail = read_dir(dir.path()).expect("read").tail.expect("a segment");
    let segment = read_dir(dir.path())
        .expect("read")
        .segments
        .pop()
        .expect("a segment");
    if tail.offset > 0 {
        let from = cut.index(tail.offset as usize) as u64;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&segment.path)
            .expect("open");
        std::os::unix::fs::FileExt::write_all_at(
            &file,
            &vec![0; (tail.offset - from) as usize],
            from,
        )
        .expect("zero");
        file.sync_all().expect("sync");
    }
    // Nothing was marked synced in the model: any prefix of its writes may be what is left.
    let recovered = open(dir.path(), bootstrap_meta()).await;
    assert!(
        matching_crash(&pair.model, &recovered).is_some(),
        "recovered {:?} is no prefix of the writes {ops:?}",
        view(&recovered)
    );
}

fn write_op_strategy() -> impl Strategy<Value = Op> {
    op_strategy().prop_filter("writes and syncs only", |op| {
        matches!(
            op,
            Op::Append { .. } | Op::Commit(_) | Op::Install { .. } | Op::Sync
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn a_torn_tail_leaves_a_prefix_of_the_writes(
        ops in proptest::collection::vec(write_op_strategy(), 1..60),
        cut in any::<prop::sample::Index>(),
    ) {
        run(|| run_torn(ops, cut));
    }

    /// Every read matches the model after every step; a clean reopen gives the model's state
    /// and a crash a state the model allows (synced writes plus a prefix of the rest).
    #[test]
    fn matches_the_model_across_reopens_and_crashes(ops in proptest::collection::vec(op_strategy(), 1..60)) {
        run(|| run_ops(ops));
    }
}

fn group_config(applied_index: u64) -> GroupConfig {
    GroupConfig {
        member_id: 1,
        election_ticks: 5,
        max_election_ticks: 6,
        heartbeat_ticks: 1,
        max_size_per_msg_bytes: 1 << 20,
        max_inflight_msgs: 64,
        applied_index,
    }
}

/// Handles every ready: makes the writes durable through the WAL, then reports them; returns
/// the non-empty data of the entries committed.
async fn drive(group: &mut Group<WalLogStore>) -> Vec<Vec<u8>> {
    let mut applied = Vec::new();
    for _ in 0..100 {
        let Some(ready) = group.ready() else {
            return applied;
        };
        if let Some(number) = ready.persist {
            group
                .store_mut()
                .sync()
                .expect("sync")
                .await
                .expect("durable");
            group.on_persisted(number);
        }
        if let Some(last) = ready.committed.last() {
            let last = last.index;
            applied.extend(
                ready
                    .committed
                    .into_iter()
                    .filter(|e| !e.data.is_empty())
                    .map(|e| e.data),
            );
            group.on_applied(last);
        }
    }
    panic!("the group kept producing work for 100 readies");
}

/// Ticks a single voter until it leads (bounded), then commits `values`; returns what was
/// applied.
async fn elect_and_commit(group: &mut Group<WalLogStore>, values: &[&[u8]]) -> Vec<Vec<u8>> {
    let mut applied = Vec::new();
    for _ in 0..50 {
        if group.is_leader() {
            break;
        }
        group.tick();
        applied.extend(drive(group).await);
    }
    assert!(
        group.is_leader(),
        "a single voter elects itself within 50 ticks"
    );
    for value in values {
        group
            .propose(value.to_vec())
            .expect("leader takes proposals");
    }
    applied.extend(drive(group).await);
    applied
}

#[test]
fn a_group_commits_on_the_wal_and_survives_reopen() {
    run(|| async {
        let dir = test_dir();
        let store = open(dir.path(), bootstrap_meta()).await;
        let mut group = Group::new(&group_config(1), store);
        let applied = elect_and_commit(&mut group, &[b"a", b"b", b"c"]).await;
        assert_eq!(applied, vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
        let (term, commit) = (group.term(), group.commit_index());
        // Checkpointed up to the second value: the log keeps only what follows.
        let conf = group.store().snapshot().meta.conf.clone();
        group.store_mut().compact(commit - 1, conf);
        group
            .store_mut()
            .sync()
            .expect("sync")
            .await
            .expect("durable");
        assert_eq!(group.store().entries_in_memory(), 1);

        let store = reopen_group(group, dir.path()).await;
        assert_eq!(store.hard_state().commit, commit);
        assert_eq!(store.snapshot().meta.index, commit - 1);
        let last = store.entries(commit, commit + 1, u64::MAX);
        assert_eq!((last[0].term, last[0].data.as_slice()), (term, &b"c"[..]));

        let mut group = Group::new(&group_config(commit), store);
        let applied = elect_and_commit(&mut group, &[b"d"]).await;
        assert_eq!(
            applied,
            vec![b"d".to_vec()],
            "nothing applied twice, the new value once"
        );
        assert!(group.term() > term, "a new term after the restart");
    });
}

async fn reopen_group(group: Group<WalLogStore>, dir: &Path) -> WalLogStore {
    // `Group` does not give its store back: a crash after everything was synced.
    drop(group);
    open(dir, bootstrap_meta()).await
}

/// A WAL as the single-voter server writes it: entries 1..=`last`, term 1, no HardState.
async fn write_old_format_wal(dir: &Path, last: u64) {
    let (wal, _) = Wal::open(dir, options()).await.expect("open");
    let records: Vec<Record> = (1..=last)
        .map(|i| Record::entry(1, i, format!("v{i}").into_bytes()))
        .collect();
    wal.append(&records).await.expect("append");
    wal.close().await.expect("close");
}

#[test]
fn an_old_single_voter_wal_opens_as_a_committed_log() {
    run(|| async {
        let dir = test_dir();
        write_old_format_wal(dir.path(), 5).await;
        // The checkpoint covered index 3: the log starts after it.
        let initial = SnapshotMeta {
            index: 3,
            term: 1,
            conf: voters(&[1]),
        };
        let store = open(dir.path(), initial.clone()).await;
        let hs = HardState {
            term: 1,
            vote: 0,
            commit: 5,
        };
        assert_eq!(store.hard_state(), hs);
        assert_eq!(store.snapshot().meta, initial);
        let entries = store.entries(4, 6, u64::MAX);
        assert_eq!(
            entries
                .iter()
                .map(|e| (e.index, e.term, e.data.clone()))
                .collect::<Vec<_>>(),
            vec![(4, 1, b"v4".to_vec()), (5, 1, b"v5".to_vec())]
        );

        let mut group = Group::new(&group_config(5), store);
        let applied = elect_and_commit(&mut group, &[b"new"]).await;
        assert_eq!(applied, vec![b"new".to_vec()]);
        let last = group.store().entries(6, 8, u64::MAX);
        assert_eq!(
            last.iter()
                .map(|e| (e.term, e.data.clone()))
                .collect::<Vec<_>>(),
            vec![(2, Vec::new()), (2, b"new".to_vec())],
            "the new leader's empty entry, then the value"
        );
        assert_eq!(group.store().hard_state().commit, 7);

        // Once written by raft the WAL describes itself: a later checkpoint's `initial` no
        // longer moves the log's start.
        drop(group);
        let later = SnapshotMeta {
            index: 5,
            ..initial.clone()
        };
        let store = open(dir.path(), later).await;
        assert_eq!(store.snapshot().meta, initial);
        assert_eq!(
            store.entries(4, 8, u64::MAX).len(),
            4,
            "synced entries survive"
        );
        // raft-rs does not ask for a commit-only hard state change to be synced, and the
        // store was dropped without a sync: the commit may be behind, never ahead.
        assert!((6..=7).contains(&store.hard_state().commit));
    });
}
