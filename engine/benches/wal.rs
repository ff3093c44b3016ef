//! WAL append throughput with 1, 16 and 256 concurrent writers on one glommio executor.
//!
//! Each writer appends one 128-byte entry at a time and waits for it to be durable, like a
//! request handler would. Criterion reports records/s; each run also prints how many fsyncs
//! the records needed, which shows group commit at work.

use std::rc::Rc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ferrocd_engine::wal::{Record, Wal, WalOptions};
use glommio::{LocalExecutor, LocalExecutorBuilder};

const PAYLOAD_BYTES: usize = 128;
const WRITER_COUNTS: [u64; 3] = [1, 16, 256];

/// `writers` tasks each append `rounds` records one at a time; returns the elapsed time.
fn run_round(executor: &LocalExecutor, writers: u64, rounds: u64) -> Duration {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    executor.run(async {
        let (wal, _) = Wal::open(dir.path(), WalOptions::default()).await.expect("open");
        let wal = Rc::new(wal);
        let start = Instant::now();
        let tasks: Vec<_> = (0..writers)
            .map(|writer| {
                let wal = wal.clone();
                glommio::spawn_local(async move {
                    for round in 0..rounds {
                        let record = Record::entry(1, round * writers + writer, vec![7; PAYLOAD_BYTES]);
                        wal.append(&[record]).await.expect("append");
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await;
        }
        let elapsed = start.elapsed();
        let stats = wal.stats();
        println!(
            "writers={writers} records={} fsyncs={} batches={} records/fsync={:.1} ({:.0} records/s)",
            stats.records_appended,
            stats.fsyncs,
            stats.batches,
            stats.records_appended as f64 / stats.fsyncs as f64,
            stats.records_appended as f64 / elapsed.as_secs_f64(),
        );
        Rc::into_inner(wal).expect("writers are done").close().await.expect("close");
        elapsed
    })
}

fn append_throughput(c: &mut Criterion) {
    let executor = LocalExecutorBuilder::default().make().expect("executor");
    let mut group = c.benchmark_group("wal_append");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5));
    for writers in WRITER_COUNTS {
        group.throughput(Throughput::Elements(writers));
        group.bench_with_input(
            BenchmarkId::new("writers", writers),
            &writers,
            |b, &writers| {
                b.iter_custom(|rounds| run_round(&executor, writers, rounds));
            },
        );
    }
    group.finish();
}

criterion_group!(benches, append_throughput);
criterion_main!(benches);
