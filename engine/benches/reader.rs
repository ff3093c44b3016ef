//! Point get and a 100-key range from a shard's lock-free reader (checkpoint + read buffer)
//! next to the in-memory `Store` that serves them today. 100k keys (10k under `--test`), 100-byte
//! values; 90% of the keys checkpointed, the newest 10% in the read buffer, as between two
//! checkpoints.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ferrocd_engine::checkpoint::Checkpointer;
use ferrocd_engine::mvcc::{Change, Effect, Revision, Store};
use ferrocd_engine::reader::ShardReader;

const VALUE_BYTES: usize = 100;
const SCAN_LEN: usize = 100;

fn key_count() -> i64 {
    if std::env::args().any(|a| a == "--test") {
        10_000
    } else {
        100_000
    }
}

fn key(i: i64) -> Vec<u8> {
    format!("key/{i:08}").into_bytes()
}

/// A store and a reader holding the same `n` keys, one revision each.
fn build(dir: &std::path::Path, n: i64) -> (Store, ShardReader) {
    let (mut checkpointer, mut store) = Checkpointer::open(&dir.join("shard.db")).unwrap();
    let reader = ShardReader::new(checkpointer.published(), 0);
    for main in 1..=n {
        let effect = Effect::Put {
            key: key(main),
            value: vec![main as u8; VALUE_BYTES],
            lease: 0,
        };
        store.apply(main, &[Change { sub: 0, effect }]);
        let saved = store.saved_version(&key(main), Revision { main, sub: 0 });
        reader.insert(saved.unwrap());
        if main == n * 9 / 10 {
            let unsaved = store.take_unsaved(main);
            checkpointer.write(&unsaved, main, main as u64).unwrap();
            reader.publish(checkpointer.published());
        }
    }
    (store, reader)
}

fn reads(c: &mut Criterion) {
    let n = key_count();
    let dir = tempfile::tempdir().unwrap();
    let (store, reader) = build(dir.path(), n);
    // Keys to start at, spread over the key space, each with SCAN_LEN keys after it.
    let mut i = 0;
    let mut next = move || {
        i = (i + 7919) % (n - SCAN_LEN as i64) + 1;
        (key(i), key(i + SCAN_LEN as i64))
    };
    let mut group = c.benchmark_group(format!("shard_read_{n}_keys"));
    group.throughput(Throughput::Elements(1));
    group.bench_function("get/reader", |b| {
        b.iter(|| black_box(reader.range(&next().0, b"", n, 0, false).unwrap()))
    });
    group.bench_function("get/store", |b| {
        b.iter(|| black_box(store.range(&next().0, b"", n, 0)))
    });
    group.throughput(Throughput::Elements(SCAN_LEN as u64));
    group.bench_function("range100/reader", |b| {
        b.iter(|| {
            let (start, end) = next();
            black_box(reader.range(&start, &end, n, 0, false).unwrap())
        })
    });
    group.bench_function("range100/store", |b| {
        b.iter(|| {
            let (start, end) = next();
            black_box(store.range(&start, &end, n, 0))
        })
    });
    group.finish();
}

criterion_group!(benches, reads);
criterion_main!(benches);
