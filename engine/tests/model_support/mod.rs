//! What the checkpoint and reader model tests share: their keys, their random operations and a
//! model shard (in-memory store, checkpoint file and the log of every request) that runs them.

use ferrocd_engine::checkpoint::Checkpointer;
use ferrocd_engine::mvcc::{Change, Effect, Store};
use proptest::prelude::*;
use tempfile::TempDir;

/// Short keys with zero bytes (escaping), keys just around the B+tree key limit, long keys.
pub fn keys() -> Vec<Vec<u8>> {
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
pub enum Op {
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

/// Random operations with put values of up to `max_value_bytes`.
pub fn op(max_value_bytes: usize) -> impl Strategy<Value = Op> {
    let write = (
        0..keys().len(),
        prop::option::weighted(0.7, 0usize..max_value_bytes),
    );
    prop_oneof![
        6 => (1i64..3, prop::collection::vec(write, 1..4))
            .prop_map(|(gap, writes)| Op::Request { gap, writes }),
        1 => (0i64..6).prop_map(|offset| Op::Compact { offset }),
        2 => (0i64..3).prop_map(|lag| Op::Checkpoint { lag }),
        1 => Just(Op::Reopen),
    ]
}

/// A model test's harness: what each operation does to it.
pub trait Model {
    fn request(&mut self, gap: i64, writes: &[(usize, Option<usize>)]);
    fn compact(&mut self, offset: i64);
    fn checkpoint(&mut self, lag: i64);
    fn reopen(&mut self);

    fn run(&mut self, op: &Op) {
        match op {
            Op::Request { gap, writes } => self.request(*gap, writes),
            Op::Compact { offset } => self.compact(*offset),
            Op::Checkpoint { lag } => self.checkpoint(*lag),
            Op::Reopen => self.reopen(),
        }
    }
}

/// A shard's store with its checkpoint file, and every request applied, for replay.
pub struct ModelShard {
    dir: TempDir,
    pub checkpointer: Option<Checkpointer>,
    pub store: Store,
    log: Vec<(i64, Vec<Change>)>,
    compacted: i64,
}

impl ModelShard {
    pub fn new() -> ModelShard {
        let dir = tempfile::tempdir().expect("temp dir");
        let (checkpointer, store) = Checkpointer::open(&dir.path().join("shard.db")).expect("open");
        ModelShard {
            dir,
            checkpointer: Some(checkpointer),
            store,
            log: Vec::new(),
            compacted: 0,
        }
    }

    /// The changes of a request `gap` revisions after the latest, at the revision returned;
    /// not applied yet (the caller applies them, then `logged`).
    pub fn request(&self, gap: i64, writes: &[(usize, Option<usize>)]) -> (i64, Vec<Change>) {
        let main = self.store.latest_revision().max(self.compacted) + gap;
        let keys = keys();
        let mut changes: Vec<Change> = Vec::new();
        for (sub, (key, value_len)) in writes.iter().enumerate() {
            let key = keys[*key].clone();
            let earlier = changes.iter().rev().find(|c| c.effect.key() == key);
            let live = match earlier {
                Some(c) => matches!(c.effect, Effect::Put { .. }),
                None => self.store.get(&key, Store::LATEST).is_some(),
            };
            let effect = match value_len {
                None if live => Effect::Delete { key },
                _ => Effect::Put {
                    value: vec![sub as u8 + 1; value_len.unwrap_or(1)],
                    lease: main % 3,
                    key,
                },
            };
            changes.push(Change {
                sub: sub as i64,
                effect,
            });
        }
        (main, changes)
    }

    /// Records an applied request for replay after a reopen.
    pub fn logged(&mut self, main: i64, changes: Vec<Change>) {
        self.log.push((main, changes));
    }

    /// Compacts `offset` revisions above the last compaction; the revision if it moved.
    pub fn compact(&mut self, offset: i64) -> Option<i64> {
        let rev = self.compacted + offset;
        if rev <= self.compacted {
            return None;
        }
        self.compacted = rev;
        self.store.compact(rev);
        Some(rev)
    }

    /// A checkpoint of all but the newest `lag` revisions (never below the last one or the
    /// compaction); returns the revision it covers.
    pub fn checkpoint(&mut self, lag: i64) -> i64 {
        let checkpointer = self.checkpointer.as_mut().expect("open");
        let covered = (self.store.latest_revision() - lag)
            .max(self.compacted)
            .max(checkpointer.meta().covered_revision);
        let unsaved = self.store.take_unsaved(covered);
        checkpointer
            .write(&unsaved, covered, covered as u64)
            .expect("checkpoint");
        covered
    }

    /// Reopens the file and replays what it does not cover, as recovery does from the WAL:
    /// returns the restored store; the shard keeps the old one until `replace_store`.
    pub fn reopen(&mut self) -> Store {
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
        self.checkpointer = Some(checkpointer);
        restored
    }
}
