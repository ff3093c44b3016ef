//! `WalLogStore` on real WAL directories: the `LogStore` contract against `MemLogStore` as a
//! model under random writes, syncs, crashes (unsynced writes dropped) and torn tails, old
//! single-voter directories, and a `Group` committing on top of it across reopens.

use std::future::Future;
use std::path::Path;

use ferrocd_engine::wal::{Record, Wal, WalOptions};
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

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Every read matches the model after every step; a clean reopen gives the model's state
    /// and a crash a state the model allows (synced writes plus a prefix of the rest).
    #[test]
    fn matches_the_model_across_reopens_and_crashes(ops in proptest::collection::vec(op_strategy(), 1..60)) {
        run(|| run_ops(ops));
    }
}
