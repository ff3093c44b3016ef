//! `Store::export` in batches, and the file round trip of `engine::snapshot`, rebuild a store
//! whose history at the snapshot's revision equals the source's: the same ranges at every
//! revision from the compacted one to the snapshot's, and the same hash. Also when the store
//! compacts (at or below the snapshot's revision) between two batches.

use ferrocd_engine::mvcc::{Change, Effect, SavedVersion, Store};
use ferrocd_engine::snapshot::{retained, verify_checksum, Encoder, Header, Item, Reader};

const KEYS: usize = 30;
const REVISIONS: i64 = 200;

/// A history with overwrites, deletes and re-creations, one change per revision (2..).
fn history() -> Store {
    let mut store = Store::new();
    let mut live = [false; KEYS];
    for main in 2..=REVISIONS {
        let k = (main as usize * 7) % KEYS;
        let key = format!("key-{k:02}").into_bytes();
        let effect = if live[k] && main % 4 == 0 {
            live[k] = false;
            Effect::Delete { key }
        } else {
            live[k] = true;
            Effect::Put {
                key,
                value: format!("value@{main}").into_bytes(),
                lease: 0,
            }
        };
        store.apply(main, &[Change { sub: 0, effect }]);
    }
    store
}

/// Exports `store` at `rev` in small batches through the file format, compacting `store` at
/// `compact_between` after the first batch; returns the file.
fn snapshot(store: &mut Store, rev: i64, compact_between: Option<i64>) -> Vec<u8> {
    let mut out = Vec::new();
    let header = Header {
        revision: rev,
        source_shards: 1,
    };
    let mut encoder = Encoder::new(header, &mut out);
    let mut after: Option<Vec<u8>> = None;
    let mut compacted = store.compacted_revision();
    let mut batches = 0;
    loop {
        let batch = store.export(after.as_deref(), rev, 100);
        compacted = compacted.max(batch.compacted_revision);
        for change in &batch.versions {
            encoder.change(change, &mut out);
        }
        batches += 1;
        if let (1, Some(at)) = (batches, compact_between) {
            store.compact(at);
        }
        match batch.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert!(batches > 3, "small batches: {batches}");
    encoder.finish(compacted, &mut out);
    out
}

/// Reads the file back into a store, compacting each key at the recorded revision.
fn restore(bytes: &[u8]) -> Store {
    verify_checksum(bytes, bytes.len() as u64).unwrap();
    let mut reader = Reader::new(bytes).unwrap();
    let rev = reader.header().revision;
    let mut changes: Vec<SavedVersion> = Vec::new();
    let end = loop {
        match reader.next_item().unwrap().unwrap() {
            Item::Change(c) => changes.push(c),
            Item::Meta(_) => unreachable!("no meta records"),
            Item::End(end) => break end,
        }
    };
    let mut store = Store::restoring(rev, end.compacted_revision);
    let mut start = 0;
    while start < changes.len() {
        let key = changes[start].key.clone();
        let len = changes[start..].partition_point(|c| c.key == key);
        for c in retained(&changes[start..start + len], end.compacted_revision) {
            store.restore_version(c.clone()).unwrap();
        }
        start += len;
    }
    store
}

fn assert_same_history(source: &Store, restored: &Store, from: i64, to: i64) {
    for rev in from..=to {
        assert_eq!(
            source.range(b"", b"\0", rev, 0),
            restored.range(b"", b"\0", rev, 0),
            "range at {rev}"
        );
    }
    assert_eq!(source.hash(to), restored.hash(to));
    // No change that the compaction drops is left behind (reads and hashes skip those).
    let retained = source.export(None, to, usize::MAX).versions.len();
    assert_eq!(restored.stats().versions, retained);
}

#[test]
fn export_round_trips_the_history_at_a_revision() {
    let mut source = history();
    source.compact(60);
    let rev = 150;
    let restored = restore(&snapshot(&mut source, rev, None));
    assert_eq!(restored.compacted_revision(), 60);
    assert_same_history(&source, &restored, 60, rev);
}

#[test]
fn a_compaction_between_batches_is_applied_to_every_key() {
    let mut source = history();
    source.compact(40);
    let rev = 150;
    let restored = restore(&snapshot(&mut source, rev, Some(90)));
    assert_eq!(restored.compacted_revision(), 90);
    assert_same_history(&source, &restored, 90, rev);
}
