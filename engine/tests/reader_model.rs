//! The lock-free shard reader (checkpoint snapshot + read buffer) against the in-memory store it
//! mirrors: random requests, compactions, checkpoints (some covering only part of what was
//! applied) and reopens (the reader seeded from the checkpoint and the replayed tail); every
//! read at every revision, over several ranges, with and without limit and count_only, must
//! equal the store's. Then a reader thread reading while a writer applies and checkpoints must
//! never see an inconsistent answer.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod model_support;

use ferrocd_engine::checkpoint::Checkpointer;
use ferrocd_engine::mvcc::{Change, Effect, RangeResult, Revision, Store};
use ferrocd_engine::reader::{ReadError, ShardReader};
use model_support::{keys, op, Model, ModelShard};
use proptest::prelude::*;

/// Ranges read at every revision: everything, from a key on, half-open ranges that start or
/// end at long keys, single keys, an empty range.
fn ranges() -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut ranges = vec![
        (b"".to_vec(), b"\0".to_vec()),
        (b"a\0".to_vec(), b"\0".to_vec()),
        (b"a".to_vec(), b"b".to_vec()),
        (vec![b'L'; 1500], b"m".to_vec()),
        (vec![0; 2], vec![b'L'; 1501]),
        (b"b".to_vec(), b"a".to_vec()),
    ];
    ranges.extend(keys().into_iter().map(|key| (key, Vec::new())));
    ranges
}

/// The model shard plus the reader it feeds, as a shard does.
struct Harness {
    shard: ModelShard,
    reader: ShardReader,
}

impl Harness {
    fn new() -> Harness {
        let shard = ModelShard::new();
        let checkpointer = shard.checkpointer.as_ref().expect("open");
        let reader = ShardReader::new(checkpointer.published(), 0);
        Harness { shard, reader }
    }
}

impl Model for Harness {
    fn request(&mut self, gap: i64, writes: &[(usize, Option<usize>)]) {
        let (main, changes) = self.shard.request(gap, writes);
        apply(&mut self.shard.store, &self.reader, main, &changes);
        self.shard.logged(main, changes);
    }

    fn compact(&mut self, offset: i64) {
        // From now on the reader refuses reads below the compaction, as a shard's does.
        if let Some(rev) = self.shard.compact(offset) {
            self.reader.set_compacted(rev);
        }
    }

    fn checkpoint(&mut self, lag: i64) {
        self.shard.checkpoint(lag);
        let checkpointer = self.shard.checkpointer.as_ref().expect("open");
        self.reader.publish(checkpointer.published());
    }

    /// Reopens the file, replays what it does not cover and seeds a new reader as recovery
    /// does.
    fn reopen(&mut self) {
        let restored = self.shard.reopen();
        let checkpointer = self.shard.checkpointer.as_ref().expect("reopened");
        let reader = ShardReader::new(checkpointer.published(), restored.compacted_revision());
        for version in restored.unsaved_versions() {
            reader.insert(version);
        }
        self.shard.store = restored;
        self.reader = reader;
    }
}

impl Harness {
    /// Every range at every revision, as the store answers it.
    fn check_reads(&self) {
        for rev in 1..=self.shard.store.latest_revision() + 1 {
            for (key, end) in ranges() {
                let read =
                    |limit, count_only| self.reader.range(&key, &end, rev, limit, count_only);
                if rev < self.shard.store.compacted_revision() {
                    assert!(matches!(read(0, false), Err(ReadError::Compacted)));
                    continue;
                }
                for limit in [0, 1, 2] {
                    assert_eq!(
                        read(limit, false).expect("read"),
                        self.shard.store.range(&key, &end, rev, limit),
                        "range {key:?}..{end:?} at {rev} limit {limit}"
                    );
                }
                let expected = RangeResult {
                    kvs: Vec::new(),
                    count: self.shard.store.range(&key, &end, rev, 0).count,
                };
                assert_eq!(read(1, true).expect("read"), expected, "count at {rev}");
            }
        }
    }
}

/// Applies to the store and buffers the result in the reader, as a shard does.
fn apply(store: &mut Store, reader: &ShardReader, main: i64, changes: &[Change]) {
    store.apply(main, changes);
    for change in changes {
        let rev = Revision {
            main,
            sub: change.sub,
        };
        let saved = store
            .saved_version(change.effect.key(), rev)
            .expect("just applied");
        reader.insert(saved);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn reader_answers_as_the_store(ops in prop::collection::vec(op(3000), 1..40)) {
        let mut harness = Harness::new();
        for op in &ops {
            harness.run(op);
            harness.check_reads();
        }
    }
}

#[test]
fn trimmed_buffer_holds_only_what_the_checkpoint_lacks() {
    let mut harness = Harness::new();
    harness.request(1, &[(0, Some(1)), (7, Some(2))]);
    harness.request(1, &[(3, Some(1))]);
    harness.request(1, &[(0, None)]);
    assert_eq!(harness.reader.buffered_changes(), 4);
    harness.checkpoint(1);
    assert_eq!(harness.reader.buffered_changes(), 1);
    harness.checkpoint(0);
    assert_eq!(harness.reader.buffered_changes(), 0);
    harness.check_reads();
}

/// Writer thread: at revision `r` it puts key `r % KEYS` (one of them long) with value `r`,
/// and checkpoints every few revisions, some lagging; only then does `r` become visible. Reader
/// threads read everything at the visible revision: key `i` must hold the newest `r <= R` with
/// `r % KEYS == i`, and nothing else.
#[test]
fn readers_never_see_an_inconsistent_answer_while_the_writer_checkpoints() {
    const KEYS: i64 = 8;
    const REVISIONS: i64 = 4000;
    let key_of = |i: i64| -> Vec<u8> {
        match i {
            3 => vec![b'3'; 1200],
            _ => format!("{i}").into_bytes(),
        }
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut checkpointer, mut store) =
        Checkpointer::open(&dir.path().join("shard.db")).expect("open");
    let reader = Arc::new(ShardReader::new(checkpointer.published(), 0));
    let visible = Arc::new(AtomicI64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + Duration::from_secs(20);
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (reader, visible, done) = (reader.clone(), visible.clone(), done.clone());
            std::thread::spawn(move || {
                let mut reads = 0u64;
                while !done.load(Ordering::SeqCst) && Instant::now() < deadline {
                    let rev = visible.load(Ordering::SeqCst);
                    let got = reader.range(b"", b"\0", rev, 0, false).expect("read");
                    let mut expected: Vec<(Vec<u8>, i64)> = (1.max(rev - KEYS + 1)..=rev)
                        .map(|r| (key_of(r % KEYS), r))
                        .collect();
                    expected.sort();
                    let actual: Vec<(Vec<u8>, i64)> = got
                        .kvs
                        .iter()
                        .map(|kv| {
                            assert_eq!(kv.value, kv.mod_revision.to_string().into_bytes());
                            (kv.key.clone(), kv.mod_revision)
                        })
                        .collect();
                    assert_eq!(actual, expected, "read at {rev}");
                    assert_eq!(got.count, expected.len() as i64);
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    for r in 1..=REVISIONS {
        if Instant::now() > deadline {
            break;
        }
        let change = Change {
            sub: 0,
            effect: Effect::Put {
                key: key_of(r % KEYS),
                value: r.to_string().into_bytes(),
                lease: 0,
            },
        };
        apply(&mut store, &reader, r, &[change]);
        if r % 7 == 0 {
            let covered = r - (r / 7) % 3;
            let covered = covered.max(checkpointer.meta().covered_revision);
            let unsaved = store.take_unsaved(covered);
            checkpointer
                .write(&unsaved, covered, covered as u64)
                .expect("checkpoint");
            reader.publish(checkpointer.published());
        }
        visible.store(r, Ordering::SeqCst);
    }
    done.store(true, Ordering::SeqCst);
    for handle in readers {
        assert!(handle.join().expect("reader thread") > 0);
    }
}
