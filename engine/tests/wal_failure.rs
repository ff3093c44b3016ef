//! A failed write poisons the WAL. Runs in its own test binary: it lowers the process-wide
//! file size limit (RLIMIT_FSIZE) so writes past 32 KiB fail with EFBIG.

mod wal_support;

use std::rc::Rc;

use ferrocd_engine::wal::{Wal, WalError};
use wal_support::*;

const FILE_SIZE_LIMIT_BYTES: u64 = 32 * 1024;

fn limit_file_size(limit_bytes: u64) {
    let limit = libc::rlimit {
        rlim_cur: limit_bytes,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: ignoring SIGXFSZ and setting a resource limit touch no memory of ours; without
    // the first, exceeding the limit would kill the test process instead of failing the write.
    unsafe {
        assert_ne!(libc::signal(libc::SIGXFSZ, libc::SIG_IGN), libc::SIG_ERR);
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0);
    }
}

#[test]
fn a_failed_write_fails_its_batch_and_every_later_append() {
    let dir = test_dir();
    let outcomes = run(|| async {
        let (wal, _) = Wal::open(dir.path(), small_options()).await.unwrap();
        limit_file_size(FILE_SIZE_LIMIT_BYTES);
        let wal = Rc::new(wal);
        // 400 records of ~200 bytes cross the 32 KiB limit inside the 64 KiB segment.
        let tasks: Vec<_> = (1..=400)
            .map(|index| {
                let wal = wal.clone();
                glommio::spawn_local(async move { wal.append(&[entry(index)]).await })
            })
            .collect();
        let mut outcomes = Vec::new();
        for task in tasks {
            outcomes.push(task.await);
        }
        outcomes.push(wal.append(&entries([401])).await);
        outcomes
    });
    limit_file_size(libc::RLIM_INFINITY);

    let first_error = outcomes
        .iter()
        .position(Result::is_err)
        .expect("writes past the limit fail");
    assert!(
        outcomes[first_error..].iter().all(Result::is_err),
        "nothing succeeds after a failure"
    );
    for outcome in &outcomes[first_error..] {
        assert!(
            matches!(outcome, Err(WalError::Failed { detail }) if detail.contains("writing")),
            "{outcome:?}"
        );
    }
    // What was acknowledged is on disk.
    let acknowledged = entry_indexes(&recover(dir.path()));
    assert!(
        acknowledged.len() >= first_error,
        "{} < {first_error}",
        acknowledged.len()
    );
    assert_eq!(
        acknowledged[..first_error],
        (1..=first_error as u64).collect::<Vec<_>>()
    );
}
