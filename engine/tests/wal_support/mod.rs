//! Helpers shared by the WAL integration tests.
#![allow(dead_code)] // each test crate uses a different subset

use std::future::Future;
use std::path::{Path, PathBuf};

use ferrocd_engine::wal::{
    read_dir, HardState, ReadItem, Record, RecordKind, Recovered, Wal, WalOptions, WalReader,
};

/// Small segments so a few hundred records rotate several times.
pub const SMALL_SEGMENT_BYTES: u64 = 64 * 1024;

pub fn small_options() -> WalOptions {
    WalOptions {
        segment_size_bytes: SMALL_SEGMENT_BYTES,
        max_batch_bytes: 16 * 1024,
        force_buffered: false,
    }
}

/// Runs `make()` to completion on a fresh glommio executor on this thread.
pub fn run<F: Future>(make: impl FnOnce() -> F) -> F::Output {
    glommio::LocalExecutorBuilder::default()
        .make()
        .expect("executor")
        .run(make())
}

/// A test directory on the same file system as the build (supports O_DIRECT on most setups,
/// unlike a tmpfs `/tmp`).
pub fn test_dir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir")
}

/// Entry `index` with a payload whose length varies so records end at odd offsets.
pub fn entry(index: u64) -> Record {
    let len = (index as usize * 37) % 300;
    Record::entry(
        index / 100 + 1,
        index,
        (0..len).map(|i| (i as u64 ^ index) as u8).collect(),
    )
}

pub fn entries(indexes: impl IntoIterator<Item = u64>) -> Vec<Record> {
    indexes.into_iter().map(entry).collect()
}

pub fn entry_indexes(recovered: &Recovered) -> Vec<u64> {
    recovered
        .records
        .iter()
        .filter(|r| r.kind == RecordKind::Entry)
        .map(|r| r.index)
        .collect()
}

/// Appends entries `1..=count` ten per call, with a HardState after every 50 entries, then
/// closes the WAL.
pub fn write_entries(dir: &Path, options: WalOptions, count: u64) {
    run(|| async move {
        let (wal, _) = Wal::open(dir, options).await.expect("open");
        for first in (1..=count).step_by(10) {
            let last = (first + 9).min(count);
            wal.append(&entries(first..=last)).await.expect("append");
            if last.is_multiple_of(50) {
                wal.append(&[hard_state(last)])
                    .await
                    .expect("append hard state");
            }
        }
        wal.close().await.expect("close");
    })
}

pub fn hard_state(commit: u64) -> Record {
    HardState {
        term: 1,
        vote: 1,
        commit,
    }
    .to_record()
}

pub fn recover(dir: &Path) -> Recovered {
    read_dir(dir).expect("recovery")
}

/// Every valid record with its file and offset, in order.
pub fn positions(dir: &Path) -> Vec<(PathBuf, u64, u64, Record)> {
    WalReader::open(dir)
        .expect("reader")
        .filter_map(|item| match item.expect("read") {
            ReadItem::Record {
                pos,
                size_bytes,
                record,
            } => Some((pos.file.to_path_buf(), pos.offset, size_bytes, record)),
            _ => None,
        })
        .collect()
}

pub fn overwrite(path: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open for damage");
    file.write_all_at(bytes, offset).expect("damage");
    file.sync_all().expect("sync");
}
