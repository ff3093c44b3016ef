//! Checkpoints against the in-memory store they are taken from: random requests and
//! compactions, checkpoints at random points (some covering only part of what was applied, as
//! when the newest changes are not durable yet), reopen, replay what the checkpoint does not
//! cover (as recovery does from the WAL); the result must read, count and hash like the
//! original at every revision. Keys include zero bytes and keys too long for a B+tree key.

use ferrocd_engine::checkpoint::Checkpointer;
use ferrocd_engine::mvcc::{Change, Effect, Store};
use proptest::prelude::*;
use tempfile::TempDir;

/// Short keys with zero bytes (escaping), keys just around the B+tree key limit, long keys.
fn keys() -> Vec<Vec<u8>> {
    let mut long_zero = vec![b'L'; 1500];
    long_zero.push(0);
    vec![
        b"a".to_vec(),
        b"a\0".to_vec(),
        b"a\0\xff".to_vec(),
        b"b".to_vec(),
        vec![0; 3],
        vec![b'm'; 980],
        vec![0; 495],
        vec![b'L'; 1500],
        long_zero,
    ]
}

#[derive(Clone, Debug)]
enum Op {
    /// A request `gap` revisions after the latest: `(key index, value length)` puts, or a
    /// delete (`None`) when the key is live.
    Request {
        gap: i64,
        writes: Vec<(usize, Option<usize>)>,
    },
    Compact {
        offset: i64,
    },
    /// A checkpoint covering all but the newest `lag` revisions.
    Checkpoint {
        lag: i64,
    },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let write = (0..keys().len(), prop::option::weighted(0.7, 0usize..6000));
    prop_oneof![
        6 => (1i64..3, prop::collection::vec(write, 1..4))
            .prop_map(|(gap, writes)| Op::Request { gap, writes }),
        1 => (0i64..6).prop_map(|offset| Op::Compact { offset }),
        2 => (0i64..3).prop_map(|lag| Op::Checkpoint { lag }),
        1 => Just(Op::Reopen),
    ]
}

struct Harness {
    dir: TempDir,
    checkpointer: Option<Checkpointer>,
    store: Store,
    /// Every request applied, for replay after a reopen.
    log: Vec<(i64, Vec<Change>)>,
    compacted: i64,
}

impl Harness {
    fn new() -> Harness {
        let dir = tempfile::tempdir().expect("temp dir");
        let (checkpointer, store) = Checkpointer::open(&dir.path().join("shard.db")).expect("open");
        Harness {
            dir,
            checkpointer: Some(checkpointer),
            store,
            log: Vec::new(),
            compacted: 0,
        }
    }

    fn request(&mut self, gap: i64, writes: &[(usize, Option<usize>)]) {
        let main = self.store.latest_revision().max(self.compacted) + gap;
        let keys = keys();
        let live = |key: &[u8], changes: &[Change]| {
            let earlier = changes.iter().rev().find(|c| c.effect.key() == key);
            match earlier {
                Some(c) => matches!(c.effect, Effect::Put { .. }),
                None => self.store.get(key, Store::LATEST).is_some(),
            }
        };
        let mut changes = Vec::new();
        for (sub, (key, value_len)) in writes.iter().enumerate() {
            let key = keys[*key].clone();
            let effect = match value_len {
                None if live(&key, &changes) => Effect::Delete { key },
                _ => Effect::Put {
                    value: vec![sub as u8; value_len.unwrap_or(1)],
                    lease: main % 3,
                    key,
                },
            };
            changes.push(Change {
                sub: sub as i64,
                effect,
            });
        }
        self.store.apply(main, &changes);
        self.log.push((main, changes));
    }

    fn compact(&mut self, offset: i64) {
        let rev = self.compacted + offset;
        if rev > self.compacted {
            self.compacted = rev;
            self.store.compact(rev);
        }
    }

    fn checkpoint(&mut self, lag: i64) {
        let checkpointer = self.checkpointer.as_mut().expect("open");
        let covered = (self.store.latest_revision() - lag)
            .max(self.compacted)
            .max(checkpointer.meta().covered_revision);
        let unsaved = self.store.take_unsaved(covered);
        checkpointer
            .write(&unsaved, covered, covered as u64)
            .expect("checkpoint");
        assert_eq!(checkpointer.meta().covered_revision, covered);
    }

    /// Reopens the file, replays what it does not cover and checks the result against the
    /// store, which it then replaces (later checkpoints come from a restored store).
    fn reopen(&mut self) {
        self.checkpointer = None;
        let (checkpointer, mut restored) =
            Checkpointer::open(&self.dir.path().join("shard.db")).expect("reopen");
        let meta = checkpointer.meta();
        assert_eq!(meta.wal_index, meta.covered_revision as u64);
        for (main, changes) in self
            .log
            .iter()
            .filter(|(main, _)| *main > meta.covered_revision)
        {
            restored.apply(*main, changes);
        }
        if self.compacted > restored.compacted_revision() {
            restored.compact(self.compacted);
        }
        assert_same(&restored, &self.store);
        self.store = restored;
        self.checkpointer = Some(checkpointer);
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
    fn reopened_checkpoint_plus_replay_equals_the_store(ops in prop::collection::vec(op(), 1..60)) {
        let mut harness = Harness::new();
        for op in &ops {
            match op {
                Op::Request { gap, writes } => harness.request(*gap, writes),
                Op::Compact { offset } => harness.compact(*offset),
                Op::Checkpoint { lag } => harness.checkpoint(*lag),
                Op::Reopen => harness.reopen(),
            }
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
    assert_eq!(harness.store.stats().keys, 1);
    harness.request(1, &[(7, Some(5))]);
    harness.checkpoint(0);
    harness.reopen();
    assert_eq!(harness.store.stats().keys, 2);
}
