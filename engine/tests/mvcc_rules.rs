//! etcd's MVCC rules, one test each, through the store's public API
//! (mirrors etcd's kvstore_test.go / key_index_test.go cases).

use ferrocd_engine::mvcc::{Change, Effect, KeyValue, Store, StoreStats};

fn put(sub: i64, key: &str, value: &str) -> Change {
    put_leased(sub, key, value, 0)
}

fn put_leased(sub: i64, key: &str, value: &str, lease: i64) -> Change {
    Change {
        sub,
        effect: Effect::Put {
            key: key.into(),
            value: value.into(),
            lease,
        },
    }
}

fn delete(sub: i64, key: &str) -> Change {
    Change {
        sub,
        effect: Effect::Delete { key: key.into() },
    }
}

fn kv(key: &str, create: i64, modified: i64, version: i64, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        create_revision: create,
        mod_revision: modified,
        version,
        value: value.into(),
        lease: 0,
    }
}

fn keys_of(kvs: &[KeyValue]) -> Vec<&str> {
    kvs.iter()
        .map(|kv| std::str::from_utf8(&kv.key).unwrap())
        .collect()
}

/// foo: put@2 "a", put@3 "b", delete@4, put@5 "c".
fn foo_history() -> Store {
    let mut store = Store::new();
    store.apply(2, &[put(0, "foo", "a")]);
    store.apply(3, &[put(0, "foo", "b")]);
    store.apply(4, &[delete(0, "foo")]);
    store.apply(5, &[put(0, "foo", "c")]);
    store
}

#[test]
fn put_creates_then_increments_version() {
    let store = foo_history();
    assert_eq!(store.get(b"foo", 2), Some(kv("foo", 2, 2, 1, "a")));
    assert_eq!(store.get(b"foo", 3), Some(kv("foo", 2, 3, 2, "b")));
    assert_eq!(store.latest_revision(), 5);
}

#[test]
fn delete_ends_generation_and_put_starts_new_one() {
    let store = foo_history();
    assert_eq!(store.get(b"foo", 4), None);
    assert_eq!(store.get(b"foo", 5), Some(kv("foo", 5, 5, 1, "c")));
    assert_eq!(
        store.get(b"foo", Store::LATEST),
        Some(kv("foo", 5, 5, 1, "c"))
    );
}

#[test]
fn reads_before_first_change_see_nothing() {
    let store = foo_history();
    assert_eq!(store.get(b"foo", 1), None);
    assert_eq!(store.get(b"bar", Store::LATEST), None);
}

#[test]
fn apply_returns_previous_key_values() {
    let mut store = Store::new();
    assert_eq!(store.apply(2, &[put_leased(0, "k", "v1", 9)]), vec![None]);
    let prev = store.apply(3, &[put(0, "k", "v2"), put(1, "j", "x")]);
    let mut expected = kv("k", 2, 2, 1, "v1");
    expected.lease = 9;
    assert_eq!(prev, vec![Some(expected), None]);
    assert_eq!(
        store.apply(4, &[delete(0, "k")]),
        vec![Some(kv("k", 2, 3, 2, "v2"))]
    );
    assert_eq!(store.apply(5, &[put(0, "k", "v3")]), vec![None]);
}

#[test]
fn changes_of_one_request_share_main_revision() {
    let mut store = Store::new();
    store.apply(7, &[put(0, "a", "1"), put(1, "b", "2"), put(5, "c", "3")]);
    let all = store.range(b"a", b"\0", 7, 0);
    assert!(all
        .kvs
        .iter()
        .all(|kv| kv.mod_revision == 7 && kv.create_revision == 7));
    assert_eq!(all.count, 3);
    assert_eq!(store.range(b"a", b"\0", 6, 0).count, 0);
}

#[test]
fn lease_is_per_version() {
    let mut store = Store::new();
    store.apply(2, &[put_leased(0, "k", "v", 100)]);
    store.apply(3, &[put(0, "k", "v")]);
    assert_eq!(store.get(b"k", 2).unwrap().lease, 100);
    assert_eq!(store.get(b"k", 3).unwrap().lease, 0);
}

fn abc_store() -> Store {
    let mut store = Store::new();
    store.apply(
        2,
        &[
            put(0, "a", "1"),
            put(1, "b", "2"),
            put(2, "c", "3"),
            put(3, "d", "4"),
        ],
    );
    store.apply(3, &[delete(0, "b")]);
    store
}

#[test]
fn range_end_forms_follow_etcd() {
    let store = abc_store();
    let at =
        |key: &[u8], end: &[u8]| keys_of(&store.range(key, end, Store::LATEST, 0).kvs).join(",");
    assert_eq!(at(b"c", b""), "c");
    assert_eq!(at(b"b", b""), "");
    assert_eq!(at(b"b", b"\0"), "c,d");
    assert_eq!(at(b"\0", b"\0"), "a,c,d");
    assert_eq!(at(b"a", b"d"), "a,c");
    assert_eq!(at(b"a", b"a"), "");
    assert_eq!(at(b"d", b"a"), "");
    assert_eq!(at(b"a", b"b"), "a");
}

#[test]
fn limit_truncates_kvs_but_not_count() {
    let store = abc_store();
    let limited = store.range(b"\0", b"\0", Store::LATEST, 2);
    assert_eq!(keys_of(&limited.kvs), ["a", "c"]);
    assert_eq!(limited.count, 3);
    let old = store.range(b"\0", b"\0", 2, 1);
    assert_eq!(keys_of(&old.kvs), ["a"]);
    assert_eq!(old.count, 4);
}

#[test]
fn range_iter_runs_both_ways_without_copies() {
    let store = abc_store();
    let descending: Vec<&[u8]> = store
        .range_iter(b"a", b"\0", 2)
        .rev()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(descending, [b"d", b"c", b"b", b"a"]);
}

#[test]
fn compaction_keeps_newest_put_at_revision() {
    let mut store = foo_history();
    store.apply(6, &[put(0, "bar", "x")]);
    store.compact(3);
    assert_eq!(store.compacted_revision(), 3);
    assert_eq!(store.get(b"foo", 3), Some(kv("foo", 2, 3, 2, "b")));
    assert_eq!(store.get(b"foo", 5), Some(kv("foo", 5, 5, 1, "c")));
    // put@3, delete@4, put@5 of foo and put@6 of bar remain.
    assert_eq!(store.stats().versions, 4);
}

#[test]
fn compaction_at_or_after_tombstone_drops_that_generation() {
    for rev in [4, 5] {
        let mut store = foo_history();
        store.compact(rev);
        assert_eq!(
            store.get(b"foo", rev),
            (rev == 5).then(|| kv("foo", 5, 5, 1, "c"))
        );
        assert_eq!(store.stats().versions, 1, "compacted at {rev}");
    }
}

#[test]
fn compaction_of_deleted_key_removes_it() {
    let mut store = abc_store();
    store.compact(3);
    assert_eq!(
        store.stats(),
        StoreStats {
            keys: 3,
            versions: 3,
            payload_bytes: 6
        }
    );
    assert_eq!(store.range(b"\0", b"\0", 3, 0).count, 3);
}

#[test]
fn compaction_beyond_shard_latest_revision_is_allowed() {
    let mut store = abc_store();
    store.compact(10);
    assert_eq!(store.compacted_revision(), 10);
    assert_eq!(store.range(b"\0", b"\0", Store::LATEST, 0).count, 3);
    store.apply(11, &[put(0, "b", "again")]);
    assert_eq!(store.get(b"b", 11), Some(kv("b", 11, 11, 1, "again")));
}

/// k0..k9 put at 2, the even ones deleted at 3.
fn ten_keys() -> Store {
    let mut store = Store::new();
    let puts: Vec<Change> = (0..10).map(|i| put(i, &format!("k{i}"), "v")).collect();
    store.apply(2, &puts);
    let deletes: Vec<Change> = (0..5).map(|i| delete(i, &format!("k{}", 2 * i))).collect();
    store.apply(3, &deletes);
    store
}

#[test]
fn compaction_in_steps_interleaves_with_writes() {
    let mut reference = ten_keys();
    reference.compact(3);
    let hash = reference.hash(3);
    assert_ne!(hash, ten_keys().hash(3), "compaction changes the hash");

    let mut store = ten_keys();
    assert!(!store.compact_step(3, 4));
    assert!(store.is_compacting());
    assert_eq!(store.stats().keys, 8);
    assert_eq!(store.hash(3), hash);
    // A write between steps, to a key the compaction has already passed and
    // to one it has not.
    store.apply(4, &[put(0, "k0", "new"), put(1, "k9", "new")]);
    assert!(!store.compact_step(3, 4));
    assert_eq!(store.hash(3), hash);
    assert!(store.compact_step(3, 4));
    assert!(!store.is_compacting());
    assert_eq!(store.hash(3), hash);
    assert_eq!(store.stats().keys, 6);
    let live = store.range(b"\0", b"\0", 4, 0);
    assert_eq!(keys_of(&live.kvs), ["k0", "k1", "k3", "k5", "k7", "k9"]);
    // Repeating a finished compaction is a no-op.
    assert!(store.compact_step(3, 1));
}

#[test]
fn newer_compaction_supersedes_pending_one() {
    let mut store = foo_history();
    store.apply(6, &[put(0, "a", "1"), put(1, "z", "1")]);
    store.apply(7, &[delete(0, "z")]);
    assert!(!store.compact_step(3, 1));
    assert!(!store.compact_step(7, 2));
    assert!(store.compact_step(7, 2));
    assert_eq!(store.compacted_revision(), 7);
    // foo's put@5 and a's put@6; z's generation ended at 7.
    assert_eq!(store.stats().versions, 2);
}

#[test]
fn hash_covers_history_up_to_revision() {
    let store = foo_history();
    let mut other = foo_history();
    assert_eq!(store.hash(5), other.hash(5));
    other.apply(6, &[put(0, "foo", "d")]);
    assert_eq!(store.hash(5), other.hash(5));
    assert_ne!(store.hash(6), other.hash(6));
    assert_ne!(store.hash(2), store.hash(3));

    let mut changed_value = Store::new();
    changed_value.apply(2, &[put(0, "foo", "A")]);
    assert_ne!(changed_value.hash(2), foo_history().hash(2));
}

#[test]
fn empty_request_only_advances_latest_revision() {
    let mut store = foo_history();
    let hash = store.hash(Store::LATEST);
    assert!(store.apply(9, &[]).is_empty());
    assert_eq!(store.latest_revision(), 9);
    assert_eq!(store.hash(Store::LATEST), hash);
}

#[test]
#[should_panic(expected = "below compacted revision")]
fn read_below_compaction_panics() {
    let mut store = foo_history();
    store.compact(4);
    store.get(b"foo", 3);
}

#[test]
#[should_panic(expected = "latest revision 5")]
fn apply_out_of_order_panics() {
    foo_history().apply(5, &[put(0, "x", "y")]);
}

#[test]
#[should_panic(expected = "sub 1 after sub 1")]
fn repeated_sub_panics() {
    Store::new().apply(2, &[put(1, "a", "1"), put(1, "b", "2")]);
}

#[test]
#[should_panic(expected = "absent key")]
fn delete_of_absent_key_panics() {
    foo_history().apply(6, &[delete(0, "bar")]);
}

#[test]
#[should_panic(expected = "not live")]
fn delete_of_deleted_key_panics() {
    let mut store = foo_history();
    store.apply(6, &[delete(0, "foo")]);
    store.apply(7, &[delete(0, "foo")]);
}

/// (main, sub, key, is_delete, prev mod_revision) of each change.
fn change_summary(changes: &ferrocd_engine::mvcc::Changes) -> Vec<(i64, i64, String, bool, i64)> {
    changes
        .changes
        .iter()
        .map(|c| {
            (
                c.rev.main,
                c.rev.sub,
                String::from_utf8(c.kv.key.clone()).unwrap(),
                c.is_delete,
                c.prev.as_ref().map_or(0, |p| p.mod_revision),
            )
        })
        .collect()
}

#[test]
fn changes_are_in_revision_then_sub_order_with_previous_state() {
    let mut store = Store::new();
    store.apply(2, &[put(0, "b", "1"), put(1, "a", "1")]);
    store.apply(3, &[put(0, "x", "1")]);
    store.apply(4, &[delete(0, "b"), put(1, "a", "2")]);
    store.apply(5, &[put(0, "b", "2")]);
    let all = store.changes(b"a", b"c", 1, 10, 100);
    assert_eq!(all.complete_upto, 10);
    assert_eq!(
        change_summary(&all),
        vec![
            (2, 0, "b".into(), false, 0),
            (2, 1, "a".into(), false, 0),
            (4, 0, "b".into(), true, 2),
            (4, 1, "a".into(), false, 2),
            (5, 0, "b".into(), false, 0),
        ]
    );
    let delete = &all.changes[2];
    assert_eq!(
        delete.kv,
        KeyValue {
            key: b"b".to_vec(),
            mod_revision: 4,
            ..KeyValue::default()
        }
    );
    assert_eq!(all.changes[3].kv, kv("a", 2, 4, 2, "2"));
    // A single key, a window of revisions.
    let a = store.changes(b"a", b"", 3, 4, 100);
    assert_eq!(change_summary(&a), vec![(4, 1, "a".into(), false, 2)]);
}

#[test]
fn changes_stop_at_a_revision_boundary_after_max_revs() {
    let mut store = Store::new();
    for main in 2..12 {
        // Two keys per revision, so a cut that split a revision would show.
        store.apply(main, &[put(0, "p/a", "v"), put(1, "p/b", "v")]);
    }
    let first = store.changes(b"p/", b"p0", 3, 11, 4);
    assert_eq!(first.complete_upto, 6);
    let revs: Vec<i64> = first.changes.iter().map(|c| c.rev.main).collect();
    assert_eq!(revs, vec![3, 3, 4, 4, 5, 5, 6, 6]);
    let rest = store.changes(b"p/", b"p0", 7, 11, 100);
    assert_eq!(rest.complete_upto, 11);
    assert_eq!(rest.changes.len(), 10);
    // Compaction keeps reads from the compacted revision on.
    store.compact(8);
    let after = store.changes(b"p/", b"p0", 8, 9, 100);
    assert_eq!(after.changes.len(), 4);
}

#[test]
#[should_panic(expected = "below compacted revision")]
fn changes_below_the_compacted_revision_panic() {
    let mut store = foo_history();
    store.compact(4);
    store.changes(b"foo", b"", 3, 5, 10);
}
