//! Point get, range scan and bulk insert on the B+tree, next to redb in the
//! same run. N = 1M keys; 10k under `cargo bench -- --test` (or `--test`).

use std::hint::black_box;
use std::ops::Bound;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use ferrocd_engine::btree::Database;
use redb::TableDefinition;

const TABLE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("bench");
const VALUE_BYTES: usize = 100;
const SCAN_LEN: usize = 100;

fn key_count() -> u32 {
    if std::env::args().any(|a| a == "--test") {
        10_000
    } else {
        1_000_000
    }
}

/// Keys as 8-byte big-endian revisions scattered by a multiplicative hash,
/// so inserts arrive in random order.
fn key(i: u32) -> [u8; 8] {
    (u64::from(i).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 16).to_be_bytes()
}

fn ours(dir: &std::path::Path, n: u32) -> Database {
    let db = Database::open(dir.join("ferrocd.db")).unwrap();
    let mut txn = db.begin_write().unwrap();
    for i in 0..n {
        txn.insert(&key(i), &[i as u8; VALUE_BYTES]).unwrap();
    }
    txn.commit().unwrap();
    db
}

fn theirs(dir: &std::path::Path, n: u32) -> redb::Database {
    let db = redb::Database::create(dir.join("redb.db")).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let mut table = txn.open_table(TABLE).unwrap();
        for i in 0..n {
            table
                .insert(key(i).as_slice(), [i as u8; VALUE_BYTES].as_slice())
                .unwrap();
        }
    }
    txn.commit().unwrap();
    db
}

fn bench_reads(c: &mut Criterion) {
    let n = key_count();
    let dir = tempfile::tempdir().unwrap();
    let ferro = ours(dir.path(), n);
    let red = theirs(dir.path(), n);
    let mut probe = 0u32;
    let mut next_key = move || {
        probe = probe.wrapping_add(7919) % n;
        key(probe)
    };

    let mut group = c.benchmark_group(format!("point_get_{n}"));
    group.throughput(Throughput::Elements(1));
    let snap = ferro.snapshot();
    group.bench_function("ferrocd", |b| {
        b.iter(|| black_box(snap.get(&next_key()).unwrap().unwrap().len()))
    });
    let read = red.begin_read().unwrap();
    let table = read.open_table(TABLE).unwrap();
    group.bench_function("redb", |b| {
        b.iter(|| {
            black_box(
                table
                    .get(next_key().as_slice())
                    .unwrap()
                    .unwrap()
                    .value()
                    .len(),
            )
        })
    });
    group.finish();

    let mut group = c.benchmark_group(format!("range_scan_{SCAN_LEN}_of_{n}"));
    group.throughput(Throughput::Elements(SCAN_LEN as u64));
    group.bench_function("ferrocd", |b| {
        b.iter(|| {
            let start = next_key();
            let sum: usize = snap
                .range(Bound::Included(&start), Bound::Unbounded)
                .take(SCAN_LEN)
                .map(|e| e.unwrap().1.len())
                .sum();
            black_box(sum)
        })
    });
    group.bench_function("redb", |b| {
        b.iter(|| {
            let start = next_key();
            let sum: usize = table
                .range(start.as_slice()..)
                .unwrap()
                .take(SCAN_LEN)
                .map(|e| e.unwrap().1.value().len())
                .sum();
            black_box(sum)
        })
    });
    group.finish();
}

fn bench_bulk_insert(c: &mut Criterion) {
    let n = key_count();
    let mut group = c.benchmark_group(format!("bulk_insert_{n}"));
    group.throughput(Throughput::Elements(u64::from(n)));
    group.sample_size(10);
    group.bench_function("ferrocd", |b| {
        b.iter_batched(
            || tempfile::tempdir().unwrap(),
            |dir| ours(dir.path(), n),
            BatchSize::PerIteration,
        )
    });
    group.bench_function("redb", |b| {
        b.iter_batched(
            || tempfile::tempdir().unwrap(),
            |dir| theirs(dir.path(), n),
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, bench_reads, bench_bulk_insert);
criterion_main!(benches);
