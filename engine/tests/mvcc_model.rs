//! The store against a naive model: a list of every change ever applied, read
//! by brute force. Random requests, reads at random revisions, and compactions
//! done in random-sized steps interleaved with writes.

use std::collections::{BTreeMap, BTreeSet};

use ferrocd_engine::mvcc::{Change, Effect, KeyValue, Store, StoreStats};
use proptest::prelude::*;

/// Every change ever applied, in revision order; compaction is only a bound on
/// the revisions one may read at.
#[derive(Default)]
struct Model {
    log: Vec<(i64, Effect)>,
    latest: i64,
    compacted: i64,
}

impl Model {
    fn get(&self, key: &[u8], rev: i64) -> Option<KeyValue> {
        let mut visible: Option<KeyValue> = None;
        for (main, effect) in self
            .log
            .iter()
            .filter(|(main, e)| *main <= rev && e.key() == key)
        {
            visible = match effect {
                Effect::Delete { .. } => None,
                Effect::Put { value, lease, .. } => Some(KeyValue {
                    key: key.to_vec(),
                    create_revision: visible.as_ref().map_or(*main, |kv| kv.create_revision),
                    mod_revision: *main,
                    version: visible.as_ref().map_or(1, |kv| kv.version + 1),
                    value: value.clone(),
                    lease: *lease,
                }),
            };
        }
        visible
    }

    fn keys(&self) -> BTreeSet<Vec<u8>> {
        self.log.iter().map(|(_, e)| e.key().to_vec()).collect()
    }

    fn range(&self, key: &[u8], end: &[u8], rev: i64) -> Vec<KeyValue> {
        let in_range = |k: &[u8]| match end {
            [] => k == key,
            [0] => k >= key,
            _ => key <= k && k < end,
        };
        self.keys()
            .iter()
            .filter(|k| in_range(k))
            .filter_map(|k| self.get(k, rev))
            .collect()
    }

    /// What a finished compaction leaves: per key, every change above the
    /// compacted revision, plus the newest one at or below it if it is a put.
    fn expected_stats(&self) -> StoreStats {
        let mut per_key: BTreeMap<&[u8], Vec<&(i64, Effect)>> = BTreeMap::new();
        for change in &self.log {
            per_key.entry(change.1.key()).or_default().push(change);
        }
        let mut stats = StoreStats::default();
        for (key, changes) in per_key {
            let newest_old = changes
                .iter()
                .rposition(|(main, _)| *main <= self.compacted);
            let first_kept = match newest_old {
                Some(i) if matches!(changes[i].1, Effect::Put { .. }) => i,
                Some(i) => i + 1,
                None => 0,
            };
            let kept = &changes[first_kept..];
            if kept.is_empty() {
                continue;
            }
            stats.keys += 1;
            stats.versions += kept.len();
            stats.payload_bytes += key.len() as u64;
            for (_, effect) in kept {
                if let Effect::Put { value, .. } = effect {
                    stats.payload_bytes += value.len() as u64;
                }
            }
        }
        stats
    }
}

/// One write of a generated request: a put of `(value, lease)`, or a delete
/// when `put` is `None`.
#[derive(Clone, Debug)]
struct Write {
    key: Vec<u8>,
    put: Option<(Vec<u8>, i64)>,
}

#[derive(Clone, Debug)]
enum Op {
    /// A request `gap` revisions after the latest; a delete of a key that is
    /// not live is turned into a put.
    Request { gap: i64, writes: Vec<Write> },
    /// A read of `[key, end)` (etcd forms) at `compacted + offset`.
    Read {
        offset: i64,
        key: Vec<u8>,
        end: Vec<u8>,
        limit: usize,
    },
    /// Starts a compaction at `compacted + offset` (if that is newer) and
    /// runs one step of it.
    CompactStep { offset: i64, max_keys: usize },
}

fn key() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(prop::sample::select(vec![0u8, b'a', b'b', b'c']), 1..=2)
}

fn range_end() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![Just(vec![]), Just(vec![0]), key()]
}

fn op() -> impl Strategy<Value = Op> {
    let write = (
        key(),
        prop::option::weighted(0.7, (prop::collection::vec(any::<u8>(), 0..4), 0i64..3)),
    )
        .prop_map(|(key, put)| Write { key, put });
    prop_oneof![
        5 => (1i64..3, prop::collection::vec(write, 0..4))
            .prop_map(|(gap, writes)| Op::Request { gap, writes }),
        3 => (0i64..12, key(), range_end(), 0usize..4)
            .prop_map(|(offset, key, end, limit)| Op::Read { offset, key, end, limit }),
        1 => (0i64..8, 1usize..4).prop_map(|(offset, max_keys)| Op::CompactStep { offset, max_keys }),
    ]
}

struct Harness {
    store: Store,
    model: Model,
    /// Hashes taken under the current compacted revision, by revision: they
    /// must not change with compaction progress or later writes.
    hashes: BTreeMap<i64, u32>,
}

impl Harness {
    fn request(&mut self, gap: i64, writes: &[Write]) {
        // A cluster-wide compaction may be ahead of this shard's latest change.
        let main = self.model.latest.max(self.model.compacted) + gap;
        let mut changes = Vec::new();
        let mut expected_prev = Vec::new();
        for (sub, Write { key, put }) in writes.iter().enumerate() {
            // Earlier changes of the same request count: the model log holds them.
            let prev = self.model.get(key, i64::MAX);
            let effect = match (put, &prev) {
                (None, Some(_)) => Effect::Delete { key: key.clone() },
                (Some((value, lease)), _) => Effect::Put {
                    key: key.clone(),
                    value: value.clone(),
                    lease: *lease,
                },
                (None, None) => Effect::Put {
                    key: key.clone(),
                    value: b"revived".to_vec(),
                    lease: 0,
                },
            };
            self.model.log.push((main, effect.clone()));
            expected_prev.push(prev);
            changes.push(Change {
                sub: sub as i64 * 2,
                effect,
            });
        }
        self.model.latest = main;
        assert_eq!(self.store.apply(main, &changes), expected_prev);
        assert_eq!(self.store.latest_revision(), main);
    }

    fn read(&self, rev: i64, key: &[u8], end: &[u8], limit: usize) {
        let expected = self.model.range(key, end, rev);
        let result = self.store.range(key, end, rev, limit);
        assert_eq!(result.count, expected.len() as i64, "count at {rev}");
        let shown = if limit == 0 {
            expected.len()
        } else {
            limit.min(expected.len())
        };
        assert_eq!(result.kvs, expected[..shown], "range at {rev}");
        let descending: Vec<KeyValue> = self
            .store
            .range_iter(key, end, rev)
            .rev()
            .map(|kv| kv.to_key_value())
            .collect();
        assert!(
            descending.iter().eq(expected.iter().rev()),
            "descending at {rev}"
        );
    }

    fn compact_step(&mut self, rev: i64, max_keys: usize) {
        if rev > self.model.compacted {
            self.model.compacted = rev;
            self.hashes.clear();
        }
        self.store.compact_step(rev, max_keys);
        assert_eq!(self.store.compacted_revision(), rev);
    }

    /// Checks everything that must hold between operations.
    fn check_invariants(&mut self) {
        let model = &self.model;
        // Full reads at the edges; `Op::Read` covers the revisions between.
        let lowest = model.compacted.max(1);
        for rev in [lowest, (lowest + model.latest) / 2, model.latest + 1] {
            self.read(rev.max(lowest), &[0], &[0], 0);
        }
        if !self.store.is_compacting() {
            assert_eq!(self.store.stats(), model.expected_stats());
        }
        for (rev, hash) in &self.hashes {
            assert_eq!(self.store.hash(*rev), *hash, "hash at {rev} changed");
        }
        let rev = model.latest.max(model.compacted);
        self.hashes.insert(rev, self.store.hash(rev));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn store_matches_model(ops in prop::collection::vec(op(), 1..50)) {
        let mut harness = Harness { store: Store::new(), model: Model::default(), hashes: BTreeMap::new() };
        for op in &ops {
            match op {
                Op::Request { gap, writes } => harness.request(*gap, writes),
                Op::Read { offset, key, end, limit } => {
                    let rev = harness.model.compacted.max(1) + offset;
                    harness.read(rev, key, end, *limit);
                }
                Op::CompactStep { offset, max_keys } => {
                    let rev = harness.model.compacted + offset;
                    harness.compact_step(rev, *max_keys);
                }
            }
            harness.check_invariants();
        }
        let rev = harness.model.compacted;
        harness.store.compact(rev);
        harness.check_invariants();
        prop_assert!(!harness.store.is_compacting());
    }
}
