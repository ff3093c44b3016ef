//! Property test: the tree behaves like `BTreeMap` under random inserts,
//! removes, commits, aborts and reopens, and stays structurally valid.

use std::collections::BTreeMap;
use std::ops::Bound;

use ferrocd_engine::btree::{Database, Snapshot};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Insert {
        key: Vec<u8>,
        value_len: usize,
        fill: u8,
    },
    Remove {
        key: Vec<u8>,
    },
}

#[derive(Clone, Debug)]
struct Txn {
    ops: Vec<Op>,
    commit: bool,
    reopen_after: bool,
}

/// Keys from a small space (so removes and overwrites hit), of varied
/// lengths up to a few hundred bytes (so branches split on size too).
fn key() -> impl Strategy<Value = Vec<u8>> {
    (0u16..400, prop_oneof![4 => Just(2usize), 1 => 2usize..300]).prop_map(|(id, len)| {
        let mut k = id.to_be_bytes().to_vec();
        k.resize(len, b'k');
        k
    })
}

fn value_len() -> impl Strategy<Value = usize> {
    prop_oneof![
        6 => 0usize..64,
        2 => 900usize..1100, // around the inline/overflow boundary
        1 => 4000usize..20_000, // overflow runs of several pages
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (key(), value_len(), any::<u8>()).prop_map(|(key, value_len, fill)| Op::Insert { key, value_len, fill }),
        1 => key().prop_map(|key| Op::Remove { key }),
    ]
}

fn txn() -> impl Strategy<Value = Txn> {
    (
        prop::collection::vec(op(), 0..150),
        prop::bool::weighted(0.8),
        prop::bool::weighted(0.15),
    )
        .prop_map(|(ops, commit, reopen_after)| Txn {
            ops,
            commit,
            reopen_after,
        })
}

fn value(len: usize, fill: u8) -> Vec<u8> {
    (0..len).map(|i| fill.wrapping_add(i as u8)).collect()
}

type Model = BTreeMap<Vec<u8>, Vec<u8>>;

fn assert_same(snap: &Snapshot, model: &Model) {
    let forward: Vec<(Vec<u8>, Vec<u8>)> = snap
        .iter()
        .map(|e| e.map(|(k, v)| (k.to_vec(), v.to_vec())).expect("read"))
        .collect();
    let expected: Vec<(Vec<u8>, Vec<u8>)> =
        model.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    assert_eq!(forward, expected);
    let backward: Vec<Vec<u8>> = snap
        .iter()
        .rev()
        .map(|e| e.expect("read").0.to_vec())
        .collect();
    let expected_back: Vec<Vec<u8>> = model.keys().rev().cloned().collect();
    assert_eq!(backward, expected_back);
    assert_eq!(snap.len(), model.len() as u64);
}

fn bound(b: &Bound<Vec<u8>>) -> Bound<&[u8]> {
    b.as_ref().map(Vec::as_slice)
}

/// Compares a bounded range walked from both ends alternately.
fn assert_range(
    snap: &Snapshot,
    model: &Model,
    lower: Bound<Vec<u8>>,
    upper: Bound<Vec<u8>>,
    pattern: &[bool],
) {
    let valid = match (&lower, &upper) {
        (Bound::Included(l) | Bound::Excluded(l), Bound::Included(u) | Bound::Excluded(u)) => {
            l <= u
        }
        _ => true,
    };
    let excluded_same =
        matches!((&lower, &upper), (Bound::Excluded(l), Bound::Excluded(u)) if l == u);
    if !valid || excluded_same {
        return; // BTreeMap::range panics on these; the tree just yields nothing.
    }
    let mut expected = model
        .range::<Vec<u8>, _>((lower.clone(), upper.clone()))
        .map(|(k, _)| k.clone());
    let mut actual = snap.range(bound(&lower), bound(&upper));
    for &from_back in pattern.iter().cycle().take(model.len() + 2) {
        let (a, e) = if from_back {
            (actual.next_back(), expected.next_back())
        } else {
            (actual.next(), expected.next())
        };
        assert_eq!(a.map(|r| r.expect("read").0.to_vec()), e);
    }
}

fn any_bound() -> impl Strategy<Value = Bound<Vec<u8>>> {
    prop_oneof![
        Just(Bound::Unbounded),
        key().prop_map(Bound::Included),
        key().prop_map(Bound::Excluded),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn matches_btreemap(
        txns in prop::collection::vec(txn(), 1..25),
        ranges in prop::collection::vec((any_bound(), any_bound(), prop::collection::vec(any::<bool>(), 1..4)), 4),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tree.db");
        let mut db = Database::open(&path).unwrap();
        let mut committed = Model::new();
        for t in txns {
            let mut pending = committed.clone();
            let mut txn = db.begin_write().unwrap();
            for op in &t.ops {
                match op {
                    Op::Insert { key, value_len, fill } => {
                        let v = value(*value_len, *fill);
                        txn.insert(key, &v).unwrap();
                        pending.insert(key.clone(), v);
                    }
                    Op::Remove { key } => {
                        prop_assert_eq!(txn.remove(key).unwrap(), pending.remove(key).is_some());
                    }
                }
                let (Op::Insert { key, .. } | Op::Remove { key }) = op;
                let seen = txn.get(key).unwrap();
                prop_assert_eq!(seen.as_ref(), pending.get(key));
            }
            if t.commit {
                txn.commit().unwrap();
                committed = pending;
            } else {
                txn.abort();
            }
            if t.reopen_after {
                drop(db);
                db = Database::open(&path).unwrap();
            }
            db.check().unwrap();
            let snap = db.snapshot();
            assert_same(&snap, &committed);
            for (k, v) in committed.iter().take(20) {
                prop_assert_eq!(snap.get(k).unwrap(), Some(v.as_slice()));
            }
        }
        let snap = db.snapshot();
        for (lower, upper, pattern) in ranges {
            assert_range(&snap, &committed, lower, upper, &pattern);
        }
    }
}
