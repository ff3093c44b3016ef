//! The appending side: group commit, backpressure, I/O modes, release.

mod wal_support;

use std::path::Path;
use std::rc::Rc;

use ferrocd_engine::wal::{
    encoded_len, HardState, IoMode, Record, Wal, WalError, WalOptions, WalStats,
    MAX_SNAPSHOT_DATA_BYTES,
};
use wal_support::*;

/// Appends `records[i]` from task `i`, all tasks spawned at once on one executor, then closes.
fn append_concurrently(
    dir: &Path,
    options: WalOptions,
    records: Vec<Record>,
) -> (WalStats, IoMode) {
    run(|| async move {
        let (wal, _) = Wal::open(dir, options).await.expect("open");
        let wal = Rc::new(wal);
        let tasks: Vec<_> = records
            .into_iter()
            .map(|record| {
                let wal = wal.clone();
                glommio::spawn_local(async move { wal.append(&[record]).await })
            })
            .collect();
        for task in tasks {
            task.await.expect("append");
        }
        let (stats, mode) = (wal.stats(), wal.io_mode());
        Rc::into_inner(wal)
            .expect("tasks are done")
            .close()
            .await
            .expect("close");
        (stats, mode)
    })
}

#[test]
fn concurrent_appenders_share_one_fsync_per_batch() {
    let dir = test_dir();
    let (stats, _) = append_concurrently(dir.path(), WalOptions::default(), entries(1..=256));
    assert_eq!(stats.records_appended, 256);
    assert!(
        stats.batches * 10 <= stats.records_appended,
        "no batching: {stats:?}"
    );
    assert!(
        stats.fsyncs * 10 <= stats.records_appended,
        "fsync per record: {stats:?}"
    );
    assert_eq!(
        entry_indexes(&recover(dir.path())),
        (1..=256).collect::<Vec<_>>(),
        "call order kept"
    );
}

#[test]
fn backpressure_bounds_batches_and_keeps_call_order() {
    let dir = test_dir();
    let options = WalOptions {
        max_batch_bytes: 1024,
        ..small_options()
    };
    // Alternate large and small records: a small one must not overtake a large one waiting.
    let records: Vec<Record> = (1..=120u64)
        .map(|i| {
            Record::entry(
                1,
                i,
                vec![i as u8; if i.is_multiple_of(2) { 900 } else { 10 }],
            )
        })
        .collect();
    let (stats, _) = append_concurrently(dir.path(), options, records.clone());
    assert_eq!(stats.records_appended, 120);
    assert!(stats.largest_batch_bytes <= 1024, "{stats:?}");
    assert!(
        stats.batches < 120,
        "small records still share batches: {stats:?}"
    );
    assert_eq!(recover(dir.path()).records, records);
}

#[test]
fn direct_io_where_the_file_system_supports_it() {
    let dir = test_dir();
    let expected = match o_direct_supported(dir.path()) {
        true => IoMode::Direct,
        false => IoMode::Buffered,
    };
    // One record per append, awaited in turn: every write rewrites the partial last block.
    run(|| async {
        let (wal, _) = Wal::open(dir.path(), small_options()).await.unwrap();
        assert_eq!(wal.io_mode(), expected);
        for index in 1..=200 {
            wal.append(&[entry(index)]).await.unwrap();
        }
        assert_eq!(wal.stats().batches, 200);
        wal.close().await.unwrap();
    });
    let recovered = recover(dir.path());
    assert_eq!(recovered.records, entries(1..=200));
}

fn o_direct_supported(dir: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .custom_flags(libc::O_DIRECT)
        .open(dir.join("probe"))
        .is_ok()
}

#[test]
fn forced_buffered_mode_round_trips() {
    let dir = test_dir();
    let options = WalOptions {
        force_buffered: true,
        ..small_options()
    };
    let (stats, mode) = append_concurrently(dir.path(), options, entries(1..=600));
    assert_eq!(mode, IoMode::Buffered);
    assert!(stats.segments_created >= 2, "{stats:?}");
    assert_eq!(
        entry_indexes(&recover(dir.path())),
        (1..=600).collect::<Vec<_>>()
    );
}

#[test]
fn tmpfs_falls_back_to_buffered_io() {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if !mounts
        .lines()
        .any(|line| line.split(' ').take(3).eq(["tmpfs", "/dev/shm", "tmpfs"]))
    {
        eprintln!("skipped: no tmpfs at /dev/shm");
        return;
    }
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let (_, mode) = append_concurrently(dir.path(), small_options(), entries(1..=50));
    assert_eq!(mode, IoMode::Buffered);
    assert_eq!(
        entry_indexes(&recover(dir.path())),
        (1..=50).collect::<Vec<_>>()
    );
}

#[test]
fn release_before_deletes_only_covered_segments_and_keeps_the_hard_state() {
    let dir = test_dir();
    let hard_state = HardState {
        term: 3,
        vote: 2,
        commit: 5,
    };
    run(|| async {
        let (wal, _) = Wal::open(dir.path(), small_options()).await.unwrap();
        wal.append(&[hard_state.to_record()]).await.unwrap();
        for first in (1..=900).step_by(30) {
            wal.append(&entries(first..first + 30)).await.unwrap();
        }
        let seqs = wal.segment_seqs();
        assert!(seqs.len() >= 3, "{seqs:?}");
        let recovered = ferrocd_engine::wal::read_dir(dir.path()).unwrap();
        let cover = recovered.segments[2].first_index;

        assert_eq!(wal.release_before(cover).await.unwrap(), 2);
        assert_eq!(wal.segment_seqs(), seqs[2..]);
        assert!(!recovered.segments[1].path.exists() && recovered.segments[2].path.exists());
        assert_eq!(
            wal.release_before(cover).await.unwrap(),
            0,
            "nothing more is covered"
        );

        assert_eq!(wal.release_before(u64::MAX).await.unwrap(), seqs.len() - 3);
        assert_eq!(
            wal.segment_seqs(),
            [*seqs.last().unwrap()],
            "the segment being written stays"
        );
        wal.append(&entries([901])).await.unwrap();
        assert_eq!(wal.stats().segments_released as usize, seqs.len() - 1);
        wal.close().await.unwrap();
    });
    let recovered = recover(dir.path());
    assert_eq!(
        recovered.last_hard_state(),
        Some(hard_state),
        "repeated at the head of each segment"
    );
    assert_eq!(*entry_indexes(&recovered).last().unwrap(), 901);
    assert!(entry_indexes(&recovered)
        .windows(2)
        .all(|w| w[1] == w[0] + 1));
}

#[test]
fn oversized_record_is_refused_and_the_wal_stays_usable() {
    let dir = test_dir();
    run(|| async {
        let (wal, _) = Wal::open(dir.path(), small_options()).await.unwrap();
        let too_big = Record::entry(1, 1, vec![0; SMALL_SEGMENT_BYTES as usize]);
        assert!(matches!(
            wal.append(&[too_big]).await,
            Err(WalError::RecordTooLarge { .. })
        ));
        // Room stays for the HardState and Snapshot records repeated at a segment's head.
        let sticky_bytes = 200 + encoded_len(MAX_SNAPSHOT_DATA_BYTES);
        let largest = Record::entry(1, 1, vec![1; SMALL_SEGMENT_BYTES as usize - sticky_bytes]);
        wal.append(&[largest.clone(), entry(2)]).await.unwrap();
        wal.close().await.unwrap();
        let recovered = recover(dir.path());
        assert_eq!(recovered.records, vec![largest, entry(2)]);
    });
}
