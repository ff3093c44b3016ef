//! Space management: free pages are reused (bounded file under churn), not
//! while a snapshot may still read them, and compaction shrinks the file.

use ferrocd_engine::btree::{Database, Error, MAX_KEY_BYTES, MAX_VALUE_BYTES};

fn key(i: u32) -> Vec<u8> {
    format!("churn-{i:06}").into_bytes()
}

fn value(i: u32) -> Vec<u8> {
    vec![i as u8; if i.is_multiple_of(25) { 5000 } else { 100 }]
}

fn insert_all(db: &Database, n: u32) {
    let mut txn = db.begin_write().unwrap();
    for i in 0..n {
        txn.insert(&key(i), &value(i)).unwrap();
    }
    txn.commit().unwrap();
}

fn delete_all(db: &Database, n: u32) {
    let mut txn = db.begin_write().unwrap();
    for i in 0..n {
        assert!(txn.remove(&key(i)).unwrap());
    }
    txn.commit().unwrap();
}

const N: u32 = 2000;

#[test]
fn churn_does_not_grow_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::open(dir.path().join("t.db")).unwrap();
    let mut high_water = 0;
    for round in 0..60 {
        insert_all(&db, N);
        delete_all(&db, N);
        let stats = db.stats().unwrap();
        assert_eq!(stats.entries, 0);
        if round == 4 {
            high_water = stats.page_count;
        }
        if round > 4 {
            assert!(
                stats.page_count <= high_water,
                "round {round}: {} pages > {high_water}",
                stats.page_count
            );
        }
    }
    // Everything but the free-list pages is free again.
    let stats = db.stats().unwrap();
    assert!(stats.free_pages + 2 + 4 >= stats.page_count, "{stats:?}");
    db.check().unwrap();
}

#[test]
fn pages_stay_pinned_while_a_snapshot_lives() {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::open(dir.path().join("t.db")).unwrap();
    insert_all(&db, N);
    let pinned = db.snapshot();
    let pinned_pages = db.stats().unwrap().page_count;
    for _ in 0..3 {
        delete_all(&db, N);
        insert_all(&db, N);
    }
    // The pinned tree's pages could not be reused, so the file grew...
    let grown = db.stats().unwrap().page_count;
    assert!(grown >= 2 * pinned_pages - 2, "{grown} vs {pinned_pages}");
    assert_eq!(pinned.get(&key(7)).unwrap(), Some(value(7).as_slice()));
    assert_eq!(pinned.iter().count(), N as usize);
    drop(pinned);
    // ...and once it is gone, churn fits in the pages already there.
    for _ in 0..10 {
        delete_all(&db, N);
        insert_all(&db, N);
    }
    assert!(db.stats().unwrap().page_count <= grown);
    db.check().unwrap();
}

#[test]
fn compaction_shrinks_the_file_and_keeps_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let db = Database::open(&path).unwrap();
    insert_all(&db, 20_000);
    let mut txn = db.begin_write().unwrap();
    for i in 0..20_000u32 {
        if !i.is_multiple_of(10) {
            txn.remove(&key(i)).unwrap();
        }
    }
    txn.set_applied_index(42);
    txn.commit().unwrap();
    let before = db.stats().unwrap();
    let expected: Vec<(Vec<u8>, Vec<u8>)> = db
        .snapshot()
        .iter()
        .map(|e| e.map(|(k, v)| (k.to_vec(), v.to_vec())).unwrap())
        .collect();

    // A snapshot taken before keeps reading the old (unlinked) file.
    let snap = db.snapshot();
    db.compact_file().unwrap();
    let old: Vec<(Vec<u8>, Vec<u8>)> = snap
        .iter()
        .map(|e| e.map(|(k, v)| (k.to_vec(), v.to_vec())).unwrap())
        .collect();
    assert_eq!(old, expected);
    drop(snap);

    let after = db.stats().unwrap();
    assert!(
        after.file_size_bytes * 4 < before.file_size_bytes,
        "{before:?} -> {after:?}"
    );
    assert_eq!(after.free_pages, 0);
    assert_eq!(after.entries, 2000);
    assert_eq!(after.applied_index, 42);
    assert!(after.txid > before.txid);
    db.check().unwrap();
    let actual: Vec<(Vec<u8>, Vec<u8>)> = db
        .snapshot()
        .iter()
        .map(|e| e.map(|(k, v)| (k.to_vec(), v.to_vec())).unwrap())
        .collect();
    assert_eq!(actual, expected);
    // Still writable, and durable across reopen.
    insert_all(&db, 10);
    drop(db);
    let db = Database::open(&path).unwrap();
    assert_eq!(db.stats().unwrap().entries, 2000 + 9);
    db.check().unwrap();
}

#[test]
fn large_values_use_overflow_runs_and_free_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let db = Database::open(&path).unwrap();
    let big: Vec<u8> = (0..2 << 20).map(|i: u32| (i % 251) as u8).collect();
    let mut txn = db.begin_write().unwrap();
    txn.insert(b"big", &big).unwrap();
    txn.insert(b"small", b"s").unwrap();
    txn.commit().unwrap();
    assert!(db.stats().unwrap().page_count > 512);
    drop(db);
    let db = Database::open(&path).unwrap();
    assert_eq!(db.snapshot().get(b"big").unwrap(), Some(big.as_slice()));
    db.check().unwrap();
    let mut txn = db.begin_write().unwrap();
    assert!(txn.remove(b"big").unwrap());
    txn.commit().unwrap();
    // One more commit so no snapshot pins the run; its pages are free.
    let mut txn = db.begin_write().unwrap();
    txn.insert(b"x", b"y").unwrap();
    txn.commit().unwrap();
    assert!(db.stats().unwrap().free_pages >= 512);
    db.check().unwrap();
}

#[test]
fn size_limits_are_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::open(dir.path().join("t.db")).unwrap();
    let mut txn = db.begin_write().unwrap();
    txn.insert(&vec![b'k'; MAX_KEY_BYTES], &vec![1; 3000])
        .unwrap();
    let err = txn
        .insert(&vec![b'k'; MAX_KEY_BYTES + 1], b"v")
        .unwrap_err();
    assert!(matches!(err, Error::KeyTooLarge { .. }));
    let err = txn.insert(b"k", &vec![0; MAX_VALUE_BYTES + 1]).unwrap_err();
    assert!(matches!(err, Error::ValueTooLarge { .. }));
    txn.commit().unwrap();
    db.check().unwrap();
}

#[test]
fn many_keys_build_a_deep_valid_tree() {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::open(dir.path().join("t.db")).unwrap();
    // Long keys keep fan-out low, so three levels appear quickly.
    let long_key = |i: u32| {
        let mut k = format!("{:08}", (i.wrapping_mul(2_654_435_761)) % 1_000_000).into_bytes();
        k.resize(200, b'-');
        k
    };
    let mut txn = db.begin_write().unwrap();
    for i in 0..20_000u32 {
        txn.insert(&long_key(i), &i.to_le_bytes()).unwrap();
    }
    txn.commit().unwrap();
    let stats = db.stats().unwrap();
    assert!(stats.depth >= 3, "{stats:?}");
    db.check().unwrap();
    let mut txn = db.begin_write().unwrap();
    for i in (0..20_000u32).filter(|i| !i.is_multiple_of(4)) {
        assert!(txn.remove(&long_key(i)).unwrap());
    }
    txn.commit().unwrap();
    db.check().unwrap();
    let snap = db.snapshot();
    assert_eq!(snap.len(), 5000);
    assert_eq!(
        snap.get(&long_key(8)).unwrap(),
        Some(&8u32.to_le_bytes()[..])
    );
    assert_eq!(snap.get(&long_key(9)).unwrap(), None);
}
