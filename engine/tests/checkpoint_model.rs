//! Checkpoints against the in-memory store they are taken from: random requests and
//! compactions, checkpoints at random points (some covering only part of what was applied, as
//! when the newest changes are not durable yet), reopen, replay what the checkpoint does not
//! cover (as recovery does from the WAL); the result must read, count and hash like the
//! original at every revision. Keys include zero bytes and keys too long for a B+tree key.

mod model_support;

use ferrocd_engine::mvcc::Store;
use model_support::{op, Model, ModelShard};
use proptest::prelude::*;

/// The model shard, checking every reopen against the store it replaces (later checkpoints
/// come from a restored store).
struct Harness {
    shard: ModelShard,
}

impl Harness {
    fn new() -> Harness {
        Harness {
            shard: ModelShard::new(),
        }
    }
}

impl Model for Harness {
    fn request(&mut self, gap: i64, writes: &[(usize, Option<usize>)]) {
        let (main, changes) = self.shard.request(gap, writes);
        self.shard.store.apply(main, &changes);
        self.shard.logged(main, changes);
    }

    fn compact(&mut self, offset: i64) {
        self.shard.compact(offset);
    }

    fn checkpoint(&mut self, lag: i64) {
        let covered = self.shard.checkpoint(lag);
        let checkpointer = self.shard.checkpointer.as_ref().expect("open");
        assert_eq!(checkpointer.meta().covered_revision, covered);
    }

    fn reopen(&mut self) {
        let restored = self.shard.reopen();
        assert_same(&restored, &self.shard.store);
        self.shard.store = restored;
    }
}

fn assert_same(restored: &Store, original: &Store) {
    assert_eq!(restored.latest_revision(), original.latest_revision());
    assert_eq!(restored.compacted_revision(), original.compacted_revision());
    assert_eq!(restored.stats(), original.stats());
    let first = original.compacted_revision().max(1);
    for rev in first..=original.latest_revision() + 1 {
        assert_eq!(
            restored.range(b"", b"\0", rev, 0),
            original.range(b"", b"\0", rev, 0),
            "range at {rev}"
        );
        assert_eq!(restored.hash(rev), original.hash(rev), "hash at {rev}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn reopened_checkpoint_plus_replay_equals_the_store(ops in prop::collection::vec(op(6000), 1..60)) {
        let mut harness = Harness::new();
        for op in &ops {
            harness.run(op);
        }
        harness.checkpoint(0);
        harness.reopen();
    }
}

/// Compaction that empties a long key removes its name; the number is not reused.
#[test]
fn long_key_dropped_by_compaction_leaves_nothing_behind() {
    let mut harness = Harness::new();
    harness.request(1, &[(7, Some(10))]);
    harness.request(1, &[(7, None)]);
    harness.checkpoint(0);
    harness.compact(2);
    harness.request(1, &[(8, Some(3))]);
    harness.checkpoint(0);
    harness.reopen();
    assert_eq!(harness.shard.store.stats().keys, 1);
    harness.request(1, &[(7, Some(5))]);
    harness.checkpoint(0);
    harness.reopen();
    assert_eq!(harness.shard.store.stats().keys, 2);
}
