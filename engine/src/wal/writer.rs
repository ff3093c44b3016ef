//! The appending side: group commit on a glommio executor.
//!
//! Appends are framed into the pending batch synchronously (so log order is call order) and
//! wait. One flusher task takes the whole pending batch, writes it, fdatasyncs, and wakes the
//! batch's appenders; appends arriving meanwhile gather into the next batch. With O_DIRECT the
//! last partially filled block is kept in memory and rewritten (extended) by the next write.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Instant;

use glommio::io::{BufferedFile, Directory, DmaFile, OpenOptions};
use glommio::{GlommioError, Task};

use super::codec::{encode_into, encoded_len, MAX_RECORD_DATA_BYTES, RECORD_ALIGN_BYTES};
use super::latency::LatencyHistogram;
use super::reader::{read_dir, Recovered};
use super::segment::{list_temp_files, segment_file_name, DEFAULT_SEGMENT_SIZE_BYTES, TEMP_SUFFIX};
use super::waiters::{Gate, WakerList};
use super::MAX_SNAPSHOT_DATA_BYTES;
use super::{HardState, Record, RecordKind, WalError};
use crate::notice::{notify, Severity};

/// How segment files are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoMode {
    /// O_DIRECT through io_uring (glommio `DmaFile`).
    Direct,
    /// Through the page cache (glommio `BufferedFile`): the file system refused O_DIRECT, or
    /// it was asked for.
    Buffered,
}

#[derive(Debug, Clone)]
pub struct WalOptions {
    /// Size every segment is preallocated to.
    pub segment_size_bytes: u64,
    /// Appends wait (in call order) while the batch being gathered would exceed this. A single
    /// append larger than this still goes through, alone.
    pub max_batch_bytes: usize,
    /// Skip O_DIRECT even where the file system supports it.
    pub force_buffered: bool,
}

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions {
            segment_size_bytes: DEFAULT_SEGMENT_SIZE_BYTES,
            max_batch_bytes: 4 * 1024 * 1024,
            force_buffered: false,
        }
    }
}

/// Counters since open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WalStats {
    /// Records acknowledged as durable.
    pub records_appended: u64,
    /// Write batches made durable (group commits).
    pub batches: u64,
    /// fdatasync calls on segments and on the directory.
    pub fsyncs: u64,
    /// Bytes of framed records acknowledged.
    pub bytes_appended: u64,
    /// Framed bytes of the largest batch (bounded by `max_batch_bytes` unless one append is
    /// larger on its own).
    pub largest_batch_bytes: u64,
    pub segments_created: u64,
    pub segments_released: u64,
    /// Time of each batch's write and fdatasync: what a writer waits for durability. The
    /// write is part of it because with O_DIRECT it is device I/O too.
    pub sync_latency: LatencyHistogram,
}

/// A per-shard write-ahead log. Lives on one glommio executor (not `Send`). Dropping it without
/// [`Wal::close`] cancels the flusher task: appends never acknowledged may or may not be on disk.
pub struct Wal {
    shared: Rc<RefCell<Shared>>,
    flusher: Option<Task<()>>,
    directory: Rc<Directory>,
    dir: PathBuf,
    io_mode: IoMode,
    /// A record must fit in an empty segment after the repeated HardState and Snapshot.
    max_record_bytes: usize,
}

/// State shared by appenders and the flusher task.
struct Shared {
    max_batch_bytes: usize,
    pending: Batch,
    /// Id of the batch gathering in `pending`; batches are numbered from 1.
    pending_id: u64,
    /// Every batch with an id up to this one is durable.
    durable_id: u64,
    failure: Option<String>,
    closing: bool,
    gate: Gate,
    durable_waiters: WakerList,
    flusher_waiter: WakerList,
    /// Oldest first; the last one is being written.
    segments: VecDeque<SegmentMeta>,
    stats: WalStats,
}

#[derive(Default)]
struct Batch {
    bytes: Vec<u8>,
    records: Vec<RecordMeta>,
}

struct RecordMeta {
    size_bytes: usize,
    kind: RecordKind,
    index: u64,
}

struct SegmentMeta {
    seq: u64,
    path: PathBuf,
    max_entry_index: Option<u64>,
}

impl Shared {
    fn new(max_batch_bytes: usize, segments: VecDeque<SegmentMeta>, stats: WalStats) -> Shared {
        Shared {
            max_batch_bytes,
            pending: Batch::default(),
            pending_id: 1,
            durable_id: 0,
            failure: None,
            closing: false,
            gate: Gate::default(),
            durable_waiters: WakerList::default(),
            flusher_waiter: WakerList::default(),
            segments,
            stats,
        }
    }

    fn fail_if_poisoned(&self) -> Result<(), WalError> {
        match &self.failure {
            Some(detail) => Err(WalError::Failed {
                detail: detail.clone(),
            }),
            None => Ok(()),
        }
    }

    fn batch_has_room(&self, size_bytes: usize) -> bool {
        self.pending.bytes.is_empty()
            || self.pending.bytes.len() + size_bytes <= self.max_batch_bytes
    }

    fn poison(&mut self, error: &WalError) {
        self.failure = Some(error.to_string());
        self.durable_waiters.wake_all();
        self.gate.wake_all();
    }
}

impl Wal {
    /// Recovers `dir` (created if missing) and opens it for appending after the last valid
    /// record. Must run on a glommio executor; spawns the flusher task there.
    pub async fn open(
        dir: impl AsRef<Path>,
        options: WalOptions,
    ) -> Result<(Wal, Recovered), WalError> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| WalError::io("creating", dir, e))?;
        let recovered = read_dir(dir)?;
        let wal = Wal::open_recovered(dir, options, &recovered).await?;
        Ok((wal, recovered))
    }

    /// Opens `dir` for appending, given what [`read_dir`] recovered from it, so a caller that
    /// replays the records itself reads the log once. `dir` must not have changed since.
    pub async fn open_recovered(
        dir: impl AsRef<Path>,
        options: WalOptions,
        recovered: &Recovered,
    ) -> Result<Wal, WalError> {
        let dir = dir.as_ref().to_path_buf();
        let sticky_bytes = encoded_len(HardState::default().to_record().data.len())
            + encoded_len(MAX_SNAPSHOT_DATA_BYTES);
        assert!(
            options.segment_size_bytes >= 2 * sticky_bytes as u64,
            "segment_size_bytes {} too small",
            options.segment_size_bytes
        );
        assert!(
            options.max_batch_bytes > 0,
            "max_batch_bytes must be positive"
        );
        let directory = Rc::new(
            Directory::open(&dir)
                .await
                .map_err(|e| WalError::io("opening", &dir, e))?,
        );
        remove_leftovers(&dir, recovered).await?;
        let requested = if options.force_buffered {
            IoMode::Buffered
        } else {
            IoMode::Direct
        };
        let mut stats = WalStats::default();
        let tail = Tail::open(&dir, &directory, &options, recovered, requested, &mut stats).await?;
        directory
            .sync()
            .await
            .map_err(|e| WalError::io("syncing", &dir, e))?;
        stats.fsyncs += 1;
        let io_mode = tail.file.mode();
        let segments = live_segments(recovered, &tail);
        let shared = Rc::new(RefCell::new(Shared::new(
            options.max_batch_bytes,
            segments,
            stats,
        )));
        let flusher = glommio::spawn_local(run_flusher(shared.clone(), tail));
        let max_record_bytes = (options.segment_size_bytes as usize - sticky_bytes)
            .min(encoded_len(MAX_RECORD_DATA_BYTES));
        let wal = Wal {
            shared,
            flusher: Some(flusher),
            directory,
            dir,
            io_mode,
            max_record_bytes,
        };
        Ok(wal)
    }

    /// Appends `records` in order and resolves once an fdatasync covering all of them returned.
    /// Records of concurrent calls are ordered by call order. Any error is fatal for this WAL.
    pub async fn append(&self, records: &[Record]) -> Result<(), WalError> {
        if records.is_empty() {
            return Ok(());
        }
        let size_bytes = self.check_sizes(records)?;
        self.admit(size_bytes).await?;
        // No await between admission and framing: nothing can slip in between.
        let batch_id = self.frame(records);
        wait_durable(self.shared.clone(), batch_id).await
    }

    /// Like [`Wal::append`] but frames `records` before returning, so their place in the log is
    /// fixed by this call even if the returned future is polled late or dropped (dropped: they
    /// may or may not become durable). It skips the admission queue and the batch size limit:
    /// for a single owner that bounds what it writes itself (Raft's in-flight limits), not to
    /// be mixed with concurrent `append` calls.
    pub fn submit(
        &self,
        records: &[Record],
    ) -> Result<impl std::future::Future<Output = Result<(), WalError>> + 'static, WalError> {
        self.check_sizes(records)?;
        self.shared.borrow().fail_if_poisoned()?;
        let batch_id = match records.is_empty() {
            false => self.frame(records),
            // Nothing to write: durable once everything framed so far is.
            true => {
                let shared = self.shared.borrow();
                shared.pending_id - u64::from(shared.pending.bytes.is_empty())
            }
        };
        Ok(wait_durable(self.shared.clone(), batch_id))
    }

    /// Total framed size of `records`, or the error for the first one that can never fit.
    fn check_sizes(&self, records: &[Record]) -> Result<usize, WalError> {
        for record in records {
            let size_bytes = encoded_len(record.data.len());
            let limit_bytes = match record.kind {
                RecordKind::Snapshot => encoded_len(MAX_SNAPSHOT_DATA_BYTES),
                _ => self.max_record_bytes,
            };
            if size_bytes > limit_bytes {
                return Err(WalError::RecordTooLarge {
                    size_bytes,
                    limit_bytes,
                });
            }
        }
        Ok(records.iter().map(|r| encoded_len(r.data.len())).sum())
    }

    /// Waits until the pending batch has room for `size_bytes`, behind earlier waiters.
    async fn admit(&self, size_bytes: usize) -> Result<(), WalError> {
        let mut ticket = TicketGuard {
            shared: &self.shared,
            ticket: None,
        };
        poll_fn(|cx| {
            let mut shared = self.shared.borrow_mut();
            shared.fail_if_poisoned()?;
            let my_turn = match ticket.ticket {
                None => shared.gate.is_empty(),
                Some(t) => shared.gate.is_front(t),
            };
            if my_turn && shared.batch_has_room(size_bytes) {
                return Poll::Ready(Ok(()));
            }
            match ticket.ticket {
                None => ticket.ticket = Some(shared.gate.enqueue(cx.waker())),
                Some(t) => shared.gate.update_waker(t, cx.waker()),
            }
            Poll::Pending
        })
        .await
    }

    fn frame(&self, records: &[Record]) -> u64 {
        let mut shared = self.shared.borrow_mut();
        for record in records {
            let size_bytes = encode_into(
                &mut shared.pending.bytes,
                record.kind,
                record.term,
                record.index,
                &record.data,
            );
            shared.pending.records.push(RecordMeta {
                size_bytes,
                kind: record.kind,
                index: record.index,
            });
        }
        shared.flusher_waiter.wake_all();
        shared.pending_id
    }

    /// Deletes the oldest segments whose entries all have an index below `index` (a checkpoint
    /// covers them). Never deletes the segment being written. Returns how many were deleted.
    pub async fn release_before(&self, index: u64) -> Result<usize, WalError> {
        let released: Vec<PathBuf> = {
            let mut shared = self.shared.borrow_mut();
            let count = shared
                .segments
                .iter()
                .take(shared.segments.len() - 1)
                .take_while(|s| s.max_entry_index.is_none_or(|max| max < index))
                .count();
            shared.segments.drain(..count).map(|s| s.path).collect()
        };
        // Oldest first: a crash part way leaves a consecutive run of segments.
        for path in &released {
            glommio::io::remove(path)
                .await
                .map_err(|e| WalError::io("removing", path, e))?;
        }
        if !released.is_empty() {
            self.directory
                .sync()
                .await
                .map_err(|e| WalError::io("syncing", &self.dir, e))?;
            let mut shared = self.shared.borrow_mut();
            shared.stats.fsyncs += 1;
            shared.stats.segments_released += released.len() as u64;
        }
        Ok(released.len())
    }

    pub fn stats(&self) -> WalStats {
        self.shared.borrow().stats
    }

    pub fn io_mode(&self) -> IoMode {
        self.io_mode
    }

    /// Sequence numbers of the live segments, oldest first.
    pub fn segment_seqs(&self) -> Vec<u64> {
        self.shared
            .borrow()
            .segments
            .iter()
            .map(|s| s.seq)
            .collect()
    }

    /// Lets the flusher write what is pending, then stops it and closes the files.
    pub async fn close(mut self) -> Result<(), WalError> {
        {
            let mut shared = self.shared.borrow_mut();
            shared.closing = true;
            shared.flusher_waiter.wake_all();
        }
        if let Some(flusher) = self.flusher.take() {
            flusher.await;
        }
        self.shared.borrow().fail_if_poisoned()
    }
}

/// Resolves once every batch up to `batch_id` is durable.
async fn wait_durable(shared: Rc<RefCell<Shared>>, batch_id: u64) -> Result<(), WalError> {
    poll_fn(|cx| {
        let mut shared = shared.borrow_mut();
        if shared.durable_id >= batch_id {
            return Poll::Ready(Ok(()));
        }
        shared.fail_if_poisoned()?;
        shared.durable_waiters.register(cx.waker());
        Poll::Pending
    })
    .await
}

/// Leaves the admission queue when an `admit` future is dropped (admitted or cancelled).
struct TicketGuard<'a> {
    shared: &'a Rc<RefCell<Shared>>,
    ticket: Option<u64>,
}

impl Drop for TicketGuard<'_> {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket {
            self.shared.borrow_mut().gate.remove(ticket);
        }
    }
}

/// The recovered segments, or the one just created in an empty directory.
fn live_segments(recovered: &Recovered, tail: &Tail) -> VecDeque<SegmentMeta> {
    let mut segments: VecDeque<SegmentMeta> = recovered
        .segments
        .iter()
        .map(|s| SegmentMeta {
            seq: s.seq,
            path: s.path.clone(),
            max_entry_index: s.max_entry_index,
        })
        .collect();
    if segments.is_empty() {
        segments.push_back(SegmentMeta {
            seq: tail.seq,
            path: tail.path.clone(),
            max_entry_index: None,
        });
    }
    assert_eq!(
        segments.back().map(|s| s.seq),
        Some(tail.seq),
        "appends go to the newest segment"
    );
    segments
}

async fn remove_leftovers(dir: &Path, recovered: &Recovered) -> Result<(), WalError> {
    let temps = list_temp_files(dir)?;
    for path in temps.iter().chain(&recovered.discarded_segments) {
        notify(
            Severity::Info,
            "removing a WAL file with nothing recoverable in it",
            &[("path", path.display().to_string())],
        );
        glommio::io::remove(path)
            .await
            .map_err(|e| WalError::io("removing", path, e))?;
    }
    Ok(())
}

/// Takes batches and makes them durable, one write + fdatasync in flight at a time.
async fn run_flusher(shared: Rc<RefCell<Shared>>, mut tail: Tail) {
    while let Some((batch, batch_id)) = next_batch(&shared).await {
        shared.borrow().gate.wake_front();
        let written = tail.write_batch(&shared, &batch).await;
        let mut state = shared.borrow_mut();
        match written {
            Ok(()) => {
                state.durable_id = batch_id;
                state.stats.records_appended += batch.records.len() as u64;
                state.stats.bytes_appended += batch.bytes.len() as u64;
                state.stats.batches += 1;
                state.stats.largest_batch_bytes = state
                    .stats
                    .largest_batch_bytes
                    .max(batch.bytes.len() as u64);
                state.durable_waiters.wake_all();
            }
            Err(error) => {
                notify(
                    Severity::Error,
                    "WAL write failed; the WAL accepts no more appends",
                    &[("error", error.to_string())],
                );
                state.poison(&error);
                return;
            }
        }
    }
    if let Err(error) = tail.file.close().await {
        shared
            .borrow_mut()
            .poison(&WalError::io("closing", &tail.path, error));
    }
}

/// The pending batch and its id once there is one; `None` when closing with nothing pending.
async fn next_batch(shared: &Rc<RefCell<Shared>>) -> Option<(Batch, u64)> {
    poll_fn(|cx: &mut Context<'_>| {
        let mut state = shared.borrow_mut();
        if !state.pending.records.is_empty() {
            let batch = std::mem::take(&mut state.pending);
            let id = state.pending_id;
            state.pending_id += 1;
            return Poll::Ready(Some((batch, id)));
        }
        if state.closing {
            return Poll::Ready(None);
        }
        state.flusher_waiter.register(cx.waker());
        Poll::Pending
    })
    .await
}

/// The segment being written, owned by the flusher task.
struct Tail {
    dir: PathBuf,
    directory: Rc<Directory>,
    segment_size_bytes: u64,
    file: SegmentFile,
    path: PathBuf,
    seq: u64,
    /// Aligned file offset where `block` starts.
    block_start: u64,
    /// Bytes from `block_start` to the end of data: the partially filled last block (already
    /// on disk) plus anything staged to go with the next write.
    block: Vec<u8>,
    /// Framed copies of the latest HardState and Snapshot records (in that order), repeated at
    /// the head of each new segment.
    sticky: [Option<Vec<u8>>; 2],
    /// Index the next entry is expected at; names new segments.
    next_entry_index: u64,
}

impl Tail {
    async fn open(
        dir: &Path,
        directory: &Rc<Directory>,
        options: &WalOptions,
        recovered: &Recovered,
        requested: IoMode,
        stats: &mut WalStats,
    ) -> Result<Tail, WalError> {
        let mut sticky = [None, None];
        for record in recovered.records.iter().filter(|r| r.kind.is_sticky()) {
            sticky[sticky_slot(record.kind)] = Some(frame_record(record));
        }
        let next_entry_index = recovered
            .records
            .iter()
            .rev()
            .find(|r| r.kind.is_entry())
            .map_or(0, |r| r.index + 1);
        let (seq, offset, zero_until, path, file) =
            match (&recovered.tail, recovered.segments.last()) {
                (Some(tail), Some(segment)) => {
                    let file = SegmentFile::open(&segment.path, requested, false).await?;
                    (
                        tail.seq,
                        tail.offset,
                        tail.zero_until,
                        segment.path.clone(),
                        file,
                    )
                }
                _ => {
                    let (file, path) = create_segment(
                        dir,
                        directory,
                        0,
                        next_entry_index,
                        options.segment_size_bytes,
                        requested,
                    )
                    .await?;
                    stats.fsyncs += 2;
                    stats.segments_created += 1;
                    (0, 0, 0, path, file)
                }
            };
        let block_start = align_down(offset, file.alignment_bytes());
        let block = read_block(&path, block_start, offset)?;
        let mut tail = Tail {
            dir: dir.to_path_buf(),
            directory: directory.clone(),
            segment_size_bytes: options.segment_size_bytes,
            file,
            path,
            seq,
            block_start,
            block,
            sticky,
            next_entry_index,
        };
        if zero_until > offset {
            tail.zero_torn_tail(zero_until).await?;
            stats.fsyncs += 1;
        }
        if offset == 0 {
            tail.stage_sticky();
        }
        Ok(tail)
    }

    fn end_offset(&self) -> u64 {
        self.block_start + self.block.len() as u64
    }

    /// Overwrites the cut torn tail `[end, zero_until)` with zeros, so no stale bytes remain
    /// after the records appended from here. The end of data stays where it is.
    async fn zero_torn_tail(&self, zero_until: u64) -> Result<(), WalError> {
        let zeros = vec![0u8; (zero_until - self.end_offset()) as usize];
        self.write_block_and(&zeros).await.map(|_end| ())
    }

    /// A new segment starts with the latest HardState and Snapshot (written along with the
    /// next chunk).
    fn stage_sticky(&mut self) {
        assert!(
            self.block.is_empty() && self.block_start == 0,
            "repeated records go at the head of a segment"
        );
        for record in self.sticky.iter().flatten() {
            self.block.extend_from_slice(record);
        }
    }

    async fn write_batch(
        &mut self,
        shared: &Rc<RefCell<Shared>>,
        batch: &Batch,
    ) -> Result<(), WalError> {
        let mut first = 0;
        let mut byte_start = 0;
        while first < batch.records.len() {
            let room = (self.segment_size_bytes - self.end_offset()) as usize;
            let fitting = batch.records[first..].iter().scan(0usize, |used, r| {
                *used += r.size_bytes;
                (*used <= room).then_some(r.size_bytes)
            });
            let (count, chunk_bytes) =
                fitting.fold((0, 0), |(n, bytes), size| (n + 1, bytes + size));
            if count == 0 {
                self.rotate(shared, &batch.records[first]).await?;
                continue;
            }
            let records = &batch.records[first..first + count];
            let chunk = &batch.bytes[byte_start..byte_start + chunk_bytes];
            self.note_records(shared, records, chunk);
            let started = Instant::now();
            self.write_and_sync(chunk).await?;
            let mut shared = shared.borrow_mut();
            shared.stats.fsyncs += 1;
            shared.stats.sync_latency.record(started.elapsed());
            first += count;
            byte_start += chunk_bytes;
        }
        Ok(())
    }

    /// Tracks the latest HardState and Snapshot and the segment's highest entry index.
    fn note_records(&mut self, shared: &Rc<RefCell<Shared>>, records: &[RecordMeta], chunk: &[u8]) {
        let mut state = shared.borrow_mut();
        let segment = state
            .segments
            .back_mut()
            .expect("the segment being written is listed");
        assert_eq!(
            segment.seq, self.seq,
            "the listed tail segment is the one being written"
        );
        let mut offset = 0;
        for record in records {
            if record.kind.is_sticky() {
                self.sticky[sticky_slot(record.kind)] =
                    Some(chunk[offset..offset + record.size_bytes].to_vec());
            } else {
                assert!(record.kind.is_entry(), "a record is sticky or an entry");
                segment.max_entry_index = Some(
                    segment
                        .max_entry_index
                        .map_or(record.index, |m| m.max(record.index)),
                );
                self.next_entry_index = record.index + 1;
            }
            offset += record.size_bytes;
        }
    }

    /// Writes `block + chunk` (padded to the I/O alignment) at `block_start`, then fdatasyncs.
    /// Returns the end offset of the data written.
    async fn write_block_and(&self, chunk: &[u8]) -> Result<u64, WalError> {
        let end = self.end_offset() + chunk.len() as u64;
        assert!(
            end <= self.segment_size_bytes,
            "write past the preallocated segment"
        );
        let padded_len = (align_up(end, self.file.alignment_bytes()) - self.block_start) as usize;
        self.file
            .write_all_at(&[&self.block, chunk], padded_len, self.block_start)
            .await
            .map_err(|e| WalError::io("writing", &self.path, e))?;
        self.file
            .fdatasync()
            .await
            .map_err(|e| WalError::io("fdatasync", &self.path, e))?;
        Ok(end)
    }

    /// Appends `chunk` durably and keeps its partially filled last block for the next write.
    async fn write_and_sync(&mut self, chunk: &[u8]) -> Result<(), WalError> {
        let end = self.write_block_and(chunk).await?;
        let new_block_start = align_down(end, self.file.alignment_bytes());
        let mut skip = (new_block_start - self.block_start) as usize;
        let mut block = Vec::with_capacity((end - new_block_start) as usize);
        for part in [&self.block[..], chunk] {
            let from = skip.min(part.len());
            block.extend_from_slice(&part[from..]);
            skip -= from;
        }
        self.block_start = new_block_start;
        self.block = block;
        Ok(())
    }

    /// Starts the next segment. Everything in the current one is already durable (every write
    /// is followed by fdatasync), so no record in the new segment can be durable before an
    /// older one.
    async fn rotate(
        &mut self,
        shared: &Rc<RefCell<Shared>>,
        next: &RecordMeta,
    ) -> Result<(), WalError> {
        let seq = self.seq + 1;
        let first_index = if next.kind.is_entry() {
            next.index
        } else {
            self.next_entry_index
        };
        let mode = self.file.mode();
        let (file, path) = create_segment(
            &self.dir,
            &self.directory,
            seq,
            first_index,
            self.segment_size_bytes,
            mode,
        )
        .await?;
        let old = std::mem::replace(&mut self.file, file);
        let old_path = std::mem::replace(&mut self.path, path.clone());
        old.close()
            .await
            .map_err(|e| WalError::io("closing", &old_path, e))?;
        self.seq = seq;
        self.block_start = 0;
        self.block.clear();
        self.stage_sticky();
        let mut state = shared.borrow_mut();
        state.segments.push_back(SegmentMeta {
            seq,
            path,
            max_entry_index: None,
        });
        state.stats.fsyncs += 2;
        state.stats.segments_created += 1;
        Ok(())
    }
}

/// Where `Tail::sticky` keeps the latest record of a sticky kind.
fn sticky_slot(kind: RecordKind) -> usize {
    match kind {
        RecordKind::HardState => 0,
        RecordKind::Snapshot => 1,
        other => panic!("{} records are not repeated", other.name()),
    }
}

fn frame_record(record: &Record) -> Vec<u8> {
    let mut bytes = Vec::new();
    encode_into(
        &mut bytes,
        record.kind,
        record.term,
        record.index,
        &record.data,
    );
    bytes
}

fn align_down(value: u64, alignment: u64) -> u64 {
    assert!(
        alignment.is_power_of_two(),
        "alignment {alignment} must be a power of two"
    );
    value & !(alignment - 1)
}

fn align_up(value: u64, alignment: u64) -> u64 {
    align_down(value + alignment - 1, alignment)
}

/// Bytes `[from, to)` of a segment (the partial last block), read at open.
fn read_block(path: &Path, from: u64, to: u64) -> Result<Vec<u8>, WalError> {
    use std::os::unix::fs::FileExt;
    let mut block = vec![0u8; (to - from) as usize];
    let file = std::fs::File::open(path).map_err(|e| WalError::io("opening", path, e))?;
    file.read_exact_at(&mut block, from)
        .map_err(|e| WalError::io("reading", path, e))?;
    Ok(block)
}

/// Creates segment `seq` preallocated to `size_bytes`: prepared under a temporary name,
/// fsync'd, renamed, directory fsync'd. Returns the open file and its final path.
async fn create_segment(
    dir: &Path,
    directory: &Directory,
    seq: u64,
    first_index: u64,
    size_bytes: u64,
    mode: IoMode,
) -> Result<(SegmentFile, PathBuf), WalError> {
    let name = segment_file_name(seq, first_index);
    let path = dir.join(&name);
    let temp_path = dir.join(format!("{}{TEMP_SUFFIX}", name.trim_end_matches(".wal")));
    let file = SegmentFile::open(&temp_path, mode, true).await?;
    file.preallocate(size_bytes)
        .await
        .map_err(|e| WalError::io("preallocating", &temp_path, e))?;
    file.fdatasync()
        .await
        .map_err(|e| WalError::io("fdatasync", &temp_path, e))?;
    glommio::io::rename(&temp_path, &path)
        .await
        .map_err(|e| WalError::io("renaming", &temp_path, e))?;
    directory
        .sync()
        .await
        .map_err(|e| WalError::io("syncing", dir, e))?;
    Ok((file, path))
}

/// A segment opened for writing, with or without O_DIRECT.
enum SegmentFile {
    Direct(DmaFile),
    Buffered(BufferedFile),
}

impl SegmentFile {
    /// Opens read-write (`create`: create and truncate). When O_DIRECT is requested but the file
    /// system refuses it, logs that and falls back to buffered I/O.
    async fn open(path: &Path, requested: IoMode, create: bool) -> Result<SegmentFile, WalError> {
        let mut options = OpenOptions::new();
        options
            .read(true)
            .write(true)
            .create(create)
            .truncate(create);
        if requested == IoMode::Direct {
            match options.dma_open(path).await {
                Ok(file) if o_direct_enabled(&file) => return Ok(SegmentFile::Direct(file)),
                Ok(file) => {
                    notify(
                        Severity::Warn,
                        "O_DIRECT not available; the WAL uses buffered I/O",
                        &[("path", path.display().to_string())],
                    );
                    file.close()
                        .await
                        .map_err(|e| WalError::io("closing", path, e))?;
                }
                Err(GlommioError::EnhancedIoError { source, .. })
                    if source.raw_os_error() == Some(libc::EINVAL) =>
                {
                    notify(
                        Severity::Warn,
                        "file system refused O_DIRECT; the WAL uses buffered I/O",
                        &[("path", path.display().to_string())],
                    );
                }
                Err(e) => return Err(WalError::io("opening", path, e)),
            }
        }
        let file = options
            .buffered_open(path)
            .await
            .map_err(|e| WalError::io("opening", path, e))?;
        Ok(SegmentFile::Buffered(file))
    }

    fn mode(&self) -> IoMode {
        match self {
            SegmentFile::Direct(_) => IoMode::Direct,
            SegmentFile::Buffered(_) => IoMode::Buffered,
        }
    }

    /// Offsets and lengths of writes must be multiples of this.
    fn alignment_bytes(&self) -> u64 {
        match self {
            SegmentFile::Direct(file) => file.alignment().max(RECORD_ALIGN_BYTES as u64),
            SegmentFile::Buffered(_) => RECORD_ALIGN_BYTES as u64,
        }
    }

    /// Writes the concatenation of `parts`, zero-padded to `padded_len`, at `offset`. A short
    /// write is an error (the space was preallocated, so it means the device is failing).
    async fn write_all_at(
        &self,
        parts: &[&[u8]],
        padded_len: usize,
        offset: u64,
    ) -> std::io::Result<()> {
        let written = match self {
            SegmentFile::Direct(file) => {
                let mut buffer = file.alloc_dma_buffer(padded_len);
                fill_padded(buffer.as_bytes_mut(), parts);
                file.write_at(buffer, offset).await?
            }
            SegmentFile::Buffered(file) => {
                let mut buffer = vec![0u8; padded_len];
                fill_padded(&mut buffer, parts);
                file.write_at(buffer, offset).await?
            }
        };
        match written == padded_len {
            true => Ok(()),
            false => Err(std::io::Error::new(
                std::io::ErrorKind::WriteZero,
                format!("short write: {written} of {padded_len} bytes"),
            )),
        }
    }

    async fn fdatasync(&self) -> std::io::Result<()> {
        match self {
            SegmentFile::Direct(file) => file.fdatasync().await?,
            SegmentFile::Buffered(file) => file.fdatasync().await?,
        }
        crate::fault::injected_fsync_error()
    }

    async fn preallocate(&self, size_bytes: u64) -> std::io::Result<()> {
        match self {
            SegmentFile::Direct(file) => file.pre_allocate(size_bytes, false).await?,
            SegmentFile::Buffered(file) => file.pre_allocate(size_bytes, false).await?,
        }
        Ok(())
    }

    async fn close(self) -> std::io::Result<()> {
        match self {
            SegmentFile::Direct(file) => file.close().await?,
            SegmentFile::Buffered(file) => file.close().await?,
        }
        Ok(())
    }
}

/// Copies `parts` to the start of `buffer` and zeroes the rest (DMA buffers are not zeroed).
fn fill_padded(buffer: &mut [u8], parts: &[&[u8]]) {
    let mut at = 0;
    for part in parts {
        buffer[at..at + part.len()].copy_from_slice(part);
        at += part.len();
    }
    buffer[at..].fill(0);
}

/// glommio opens files on tmpfs without O_DIRECT and without telling; ask the kernel.
fn o_direct_enabled(file: &DmaFile) -> bool {
    // SAFETY: F_GETFL only reads the status flags of a descriptor `file` keeps open.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    flags >= 0 && flags & libc::O_DIRECT != 0
}
