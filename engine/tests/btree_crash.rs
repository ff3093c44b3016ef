//! Crash safety and corruption detection: torn meta writes fall back to the
//! previous commit; corrupted pages are reported, never panicked on.

use std::fs;
use std::path::Path;

use ferrocd_engine::btree::{Database, Error, PAGE_SIZE};

fn key(i: u32) -> Vec<u8> {
    format!("k{i:05}").into_bytes()
}

fn commit_range(db: &Database, keys: std::ops::Range<u32>, tag: &str) {
    let mut txn = db.begin_write().unwrap();
    for i in keys {
        let mut v = format!("{tag}-{i}").into_bytes();
        if i.is_multiple_of(50) {
            v.resize(9000, b'o'); // an overflow run
        }
        txn.insert(&key(i), &v).unwrap();
    }
    txn.commit().unwrap();
}

fn all(db: &Database) -> Vec<(Vec<u8>, Vec<u8>)> {
    db.snapshot()
        .iter()
        .map(|e| e.map(|(k, v)| (k.to_vec(), v.to_vec())).unwrap())
        .collect()
}

fn page(id: u64) -> std::ops::Range<usize> {
    id as usize * PAGE_SIZE..(id as usize + 1) * PAGE_SIZE
}

#[test]
fn torn_meta_falls_back_to_previous_commit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let db = Database::open(&path).unwrap();
    commit_range(&db, 0..500, "a");
    let before = all(&db);
    let before_txid = db.snapshot().txid();
    commit_range(&db, 250..1000, "b");
    let newer_txid = db.snapshot().txid();
    drop(db);

    // Tear the newest meta page: half of it zeroed, as if the write stopped.
    let mut bytes = fs::read(&path).unwrap();
    let slot = page(newer_txid % 2);
    bytes[slot.start + 20..slot.start + PAGE_SIZE / 2].fill(0);
    fs::write(&path, &bytes).unwrap();

    let db = Database::open(&path).unwrap();
    assert_eq!(db.snapshot().txid(), before_txid);
    assert_eq!(all(&db), before);
    db.check().unwrap();
    // The file keeps working: commits after the fallback are durable.
    commit_range(&db, 2000..2100, "c");
    let after = all(&db);
    drop(db);
    let db = Database::open(&path).unwrap();
    assert_eq!(all(&db), after);
    db.check().unwrap();
}

#[test]
fn crash_before_meta_write_keeps_previous_commit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let db = Database::open(&path).unwrap();
    commit_range(&db, 0..800, "a");
    commit_range(&db, 0..400, "b");
    let before = all(&db);
    let txid = db.snapshot().txid();
    let old_meta = fs::read(&path).unwrap()[page((txid + 1) % 2)].to_vec();
    // This commit's data pages reach the file, but pretend its meta did not.
    let mut txn = db.begin_write().unwrap();
    for i in 0..800 {
        txn.remove(&key(i)).unwrap();
    }
    txn.insert(b"only", b"this").unwrap();
    txn.commit().unwrap();
    drop(db);
    let mut bytes = fs::read(&path).unwrap();
    bytes[page((txid + 1) % 2)].copy_from_slice(&old_meta);
    fs::write(&path, &bytes).unwrap();

    let db = Database::open(&path).unwrap();
    assert_eq!(db.snapshot().txid(), txid);
    assert_eq!(all(&db), before);
    db.check().unwrap();
}

#[test]
fn both_metas_invalid_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    commit_range(&Database::open(&path).unwrap(), 0..10, "a");
    let mut bytes = fs::read(&path).unwrap();
    bytes[..2 * PAGE_SIZE].fill(0xAB);
    fs::write(&path, &bytes).unwrap();
    assert!(matches!(
        Database::open(&path),
        Err(Error::Corrupt { page: 0, .. })
    ));
}

/// Reads everything through every read path; errors are fine, panics are not.
fn read_everything(db: &Database) -> bool {
    let snap = db.snapshot();
    let mut ok = snap.iter().all(|e| e.is_ok()) && snap.iter().rev().all(|e| e.is_ok());
    for i in (0..1200).step_by(7) {
        ok &= snap.get(&key(i)).is_ok();
    }
    ok
}

fn flip_byte(path: &Path, original: &[u8], offset: usize) {
    let mut bytes = original.to_vec();
    bytes[offset] ^= 0x5A;
    fs::write(path, &bytes).unwrap();
}

#[test]
fn check_detects_every_corrupted_live_page() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let db = Database::open(&path).unwrap();
    commit_range(&db, 0..1200, "a");
    let mut txn = db.begin_write().unwrap();
    for i in (0..1200).step_by(3) {
        txn.remove(&key(i)).unwrap(); // leaves free pages too
    }
    txn.commit().unwrap();
    let stats = db.stats().unwrap();
    assert!(stats.depth >= 2 && stats.free_pages > 0, "{stats:?}");
    drop(db);
    let original = fs::read(&path).unwrap();

    let mut undetected = 0;
    for id in 2..stats.page_count {
        // A byte in the middle of the page (past any header field).
        flip_byte(&path, &original, id as usize * PAGE_SIZE + 1000);
        let detected = match Database::open(&path) {
            Err(Error::Corrupt { .. }) => true, // a free-list page
            Err(e) => panic!("unexpected error {e}"),
            Ok(db) => {
                let readable = read_everything(&db);
                let found = db.check().is_err();
                assert!(
                    found || readable,
                    "reads failed on page {id} but check() passed"
                );
                found
            }
        };
        undetected += u64::from(!detected);
    }
    // Only the content of free pages is irrelevant.
    assert_eq!(undetected, stats.free_pages);
}

#[test]
fn garbage_pages_give_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let db = Database::open(&path).unwrap();
    commit_range(&db, 0..1200, "a");
    let page_count = db.stats().unwrap().page_count;
    drop(db);
    let original = fs::read(&path).unwrap();
    let mut seed = 0x1234_5678_u64;
    for id in 2..page_count {
        let mut bytes = original.clone();
        // Overwrite the whole page, header and slots included, with noise.
        for b in &mut bytes[id as usize * PAGE_SIZE..(id as usize + 1) * PAGE_SIZE] {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            *b = (seed >> 56) as u8;
        }
        fs::write(&path, &bytes).unwrap();
        if let Ok(db) = Database::open(&path) {
            read_everything(&db);
            assert!(db.check().is_err(), "garbage page {id} passed check()");
        }
    }
}
