//! When a shard checkpoints, and the thread that writes its checkpoints.
//!
//! A shard checkpoints every `interval_ms` (etcd's backend commits every 100 ms) or as soon as
//! `max_changes` changes (etcd: 10,000) wait, whichever comes first, and only while it has
//! something to write. The B+tree commit (page writes and two fdatasyncs) runs on a dedicated
//! thread per shard, never on the shard's executor: the executor only copies the changes out
//! of the store (`Store::take_unsaved`) and hands them over, then keeps serving writes while
//! the commit runs. One checkpoint is in flight per shard at a time; changes applied meanwhile
//! wait for the next one. After a commit returns, the shard releases the WAL segments it
//! covers (`Shard::checkpoint` in `shard.rs`). File requests (size for Status, packing for
//! Defragment) are queued by the shard and run by the same loop between checkpoints, so the
//! thread has one job at a time.

use ferrocd_engine::checkpoint::{Checkpointer, FileStats, Published};
use ferrocd_engine::mvcc::Unsaved;
use futures::channel::oneshot;
use std::sync::mpsc;

/// etcd's backend batch interval.
pub const DEFAULT_CHECKPOINT_INTERVAL_MS: u64 = 100;
/// etcd's backend batch limit.
pub const DEFAULT_CHECKPOINT_MAX_CHANGES: usize = 10_000;

/// When a shard checkpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckpointConfig {
    /// Longest time changes wait for a checkpoint.
    pub interval_ms: u64,
    /// A checkpoint starts at once when this many changes wait.
    pub max_changes: usize,
}

/// Writes to a shard wait while this many times `max_changes` changes wait for a checkpoint:
/// the changes a checkpoint has not taken yet live in memory twice (store and read buffer), so
/// a disk that cannot keep up with the write rate slows writers instead of filling memory.
pub const BACKLOG_FACTOR: usize = 8;

impl CheckpointConfig {
    /// Changes waiting for a checkpoint above which the shard takes no new write.
    pub fn backlog_limit_changes(&self) -> usize {
        self.max_changes.saturating_mul(BACKLOG_FACTOR)
    }
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            interval_ms: DEFAULT_CHECKPOINT_INTERVAL_MS,
            max_changes: DEFAULT_CHECKPOINT_MAX_CHANGES,
        }
    }
}

/// Work for a shard's checkpoint thread.
enum Job {
    /// One checkpoint to write.
    Write {
        unsaved: Unsaved,
        covered_revision: i64,
        wal_index: u64,
        done: oneshot::Sender<Result<(u64, Published), String>>,
    },
    /// The file's size (`defragment`: after packing it).
    File {
        defragment: bool,
        done: oneshot::Sender<Result<(FileStats, Published), String>>,
    },
}

impl Job {
    fn run(self, checkpointer: &mut Checkpointer) {
        match self {
            Job::Write {
                unsaved,
                covered_revision,
                wal_index,
                done,
            } => {
                let result = checkpointer
                    .write(&unsaved, covered_revision, wal_index)
                    .map(|()| (checkpointer.file_size_bytes(), checkpointer.published()))
                    .map_err(|e| e.to_string());
                let _ = done.send(result);
            }
            Job::File { defragment, done } => {
                let result = if defragment {
                    checkpointer.defragment()
                } else {
                    checkpointer.file_stats()
                };
                let result = result.map(|stats| (stats, checkpointer.published()));
                let _ = done.send(result.map_err(|e| e.to_string()));
            }
        }
    }
}

/// The handle of a shard's checkpoint thread. The thread ends when the handle is dropped
/// (after the job it is running, if any).
pub struct CheckpointWriter {
    jobs: mpsc::SyncSender<Job>,
}

impl CheckpointWriter {
    /// Starts the thread that owns `checkpointer`.
    pub fn spawn(shard: usize, mut checkpointer: Checkpointer) -> Result<CheckpointWriter, String> {
        // The shard's checkpoint loop is the only sender and waits for each job: one slot
        // suffices.
        let (jobs, queue) = mpsc::sync_channel::<Job>(1);
        std::thread::Builder::new()
            .name(format!("ferrocd-ckpt-{shard:03}"))
            .spawn(move || {
                for job in queue {
                    job.run(&mut checkpointer);
                }
            })
            .map_err(|e| format!("cannot start the checkpoint thread of shard {shard}: {e}"))?;
        Ok(CheckpointWriter { jobs })
    }

    /// Writes `unsaved` as a checkpoint covering `covered_revision` and the shard's WAL up to
    /// `wal_index`; resolves once it is durable, with the file's size then and the checkpoint
    /// for readers. Must not be called again before it resolved.
    pub async fn write(
        &self,
        unsaved: Unsaved,
        covered_revision: i64,
        wal_index: u64,
    ) -> Result<(u64, Published), String> {
        let (done, result) = oneshot::channel();
        self.submit(Job::Write {
            unsaved,
            covered_revision,
            wal_index,
            done,
        })?;
        result
            .await
            .map_err(|_| "the checkpoint thread stopped".to_string())?
    }

    /// The checkpoint file's size, after packing it when `defragment` (and the checkpoint for
    /// readers: after packing, in the new file). Same rule as `write`: one job at a time.
    pub async fn file(&self, defragment: bool) -> Result<(FileStats, Published), String> {
        let (done, result) = oneshot::channel();
        self.submit(Job::File { defragment, done })?;
        result
            .await
            .map_err(|_| "the checkpoint thread stopped".to_string())?
    }

    fn submit(&self, job: Job) -> Result<(), String> {
        self.jobs
            .try_send(job)
            .map_err(|_| "the checkpoint thread is gone or busy".to_string())
    }
}
