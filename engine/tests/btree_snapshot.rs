//! Snapshot isolation: snapshots are pinned to their commit, also when read
//! from other threads while the writer keeps committing and reusing pages.

use std::sync::mpsc;
use std::sync::{Arc, Barrier};
use std::thread;

use ferrocd_engine::btree::{Database, Snapshot};

const KEYS: u32 = 300;

fn key(i: u32) -> Vec<u8> {
    format!("key-{i:06}").into_bytes()
}

/// Value of key `i` at version `version`; every tenth value overflows a page.
fn value(i: u32, version: u32) -> Vec<u8> {
    let len = if i.is_multiple_of(10) { 6000 } else { 40 };
    let mut v = format!("v{version}-k{i}-").into_bytes();
    v.resize(len, b'x');
    v
}

/// Rewrites every key at `version`, one commit.
fn write_version(db: &Database, version: u32) {
    let mut txn = db.begin_write().unwrap();
    for i in 0..KEYS {
        txn.insert(&key(i), &value(i, version)).unwrap();
    }
    txn.commit().unwrap();
}

/// Asserts the snapshot shows exactly `version` for every key.
fn assert_version(snap: &Snapshot, version: u32) {
    assert_eq!(snap.len(), u64::from(KEYS));
    let mut count = 0;
    for (n, entry) in snap.iter().enumerate() {
        let (k, v) = entry.unwrap();
        assert_eq!(k, key(n as u32).as_slice());
        assert_eq!(v, value(n as u32, version).as_slice());
        count += 1;
    }
    assert_eq!(count, KEYS);
    assert_eq!(
        snap.get(&key(KEYS / 2)).unwrap(),
        Some(value(KEYS / 2, version).as_slice())
    );
}

/// Reads the version a snapshot shows from its first value.
fn version_of(snap: &Snapshot) -> u32 {
    let v = snap.get(&key(1)).unwrap().unwrap();
    let text = std::str::from_utf8(&v[1..v.iter().position(|&b| b == b'-').unwrap()]).unwrap();
    text.parse().unwrap()
}

#[test]
fn old_snapshot_survives_many_commits_on_another_thread() {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::open(dir.path().join("t.db")).unwrap();
    write_version(&db, 0);
    let old = db.snapshot();
    let (done_tx, done_rx) = mpsc::channel();
    let reader = thread::spawn(move || {
        // Wait until the writer has committed (and churned pages) many times.
        done_rx.recv().unwrap();
        assert_version(&old, 0);
        old.txid()
    });
    for version in 1..=40 {
        write_version(&db, version);
    }
    assert_version(&db.snapshot(), 40);
    done_tx.send(()).unwrap();
    let old_txid = reader.join().unwrap();
    assert!(old_txid < db.snapshot().txid());
    db.check().unwrap();
}

#[test]
fn concurrent_readers_always_see_one_whole_commit() {
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(Database::open(dir.path().join("t.db")).unwrap());
    write_version(&db, 0);
    const READERS: usize = 2;
    const VERSIONS: u32 = 30;
    // Readers start together with the writer and read until the last commit.
    let start = Arc::new(Barrier::new(READERS + 1));
    let handles: Vec<_> = (0..READERS)
        .map(|_| {
            let (db, start) = (db.clone(), start.clone());
            thread::spawn(move || {
                start.wait();
                let mut seen = Vec::new();
                loop {
                    let snap = db.snapshot();
                    let version = version_of(&snap);
                    assert_version(&snap, version);
                    seen.push(version);
                    if version == VERSIONS {
                        return seen;
                    }
                }
            })
        })
        .collect();
    start.wait();
    for version in 1..=VERSIONS {
        write_version(&db, version);
    }
    for h in handles {
        let seen = h.join().unwrap();
        assert!(
            seen.windows(2).all(|w| w[0] <= w[1]),
            "a reader went back in time: {seen:?}"
        );
    }
    db.check().unwrap();
}

#[test]
fn snapshot_is_send_sync_clone() {
    fn assert_traits<T: Send + Sync + Clone + 'static>() {}
    assert_traits::<Snapshot>();
    fn assert_db<T: Send + Sync>() {}
    assert_db::<Database>();
}

#[test]
fn uncommitted_changes_are_invisible() {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::open(dir.path().join("t.db")).unwrap();
    write_version(&db, 0);
    let before = db.snapshot();
    let mut txn = db.begin_write().unwrap();
    txn.insert(&key(1), b"new").unwrap();
    txn.remove(&key(2)).unwrap();
    assert_eq!(txn.get(&key(1)).unwrap().as_deref(), Some(&b"new"[..]));
    assert_version(&db.snapshot(), 0);
    txn.abort();
    assert_version(&db.snapshot(), 0);
    assert_eq!(db.snapshot().txid(), before.txid());
}
