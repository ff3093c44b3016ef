//! All writes to the tree file: positioned writes and fdatasync through one
//! io_uring, submitted and waited for synchronously by the committing writer.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use crate::notice::{notify, Severity};
use io_uring::{opcode, types, IoUring};

/// Submission queue depth: writes in flight per submit.
const RING_ENTRIES: u32 = 64;

pub(crate) struct FileWriter {
    file: File,
    ring: IoUring,
}

impl FileWriter {
    pub(crate) fn new(file: File) -> io::Result<Self> {
        Ok(FileWriter {
            file,
            ring: IoUring::new(RING_ENTRIES)?,
        })
    }

    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// Writes every `(offset_bytes, bytes)` fully; short writes are resubmitted
    /// for their remainder. Not durable until `sync_data`.
    pub(crate) fn write_all_at(&mut self, writes: &[(u64, &[u8])]) -> io::Result<()> {
        let mut queue: Vec<(u64, &[u8])> = writes
            .iter()
            .copied()
            .filter(|(_, b)| !b.is_empty())
            .collect();
        while !queue.is_empty() {
            let split = queue.len().saturating_sub(RING_ENTRIES as usize);
            let batch = queue.split_off(split);
            for (offset, rest) in self.submit_writes(&batch)? {
                queue.push((offset, rest));
            }
        }
        Ok(())
    }

    /// Submits one batch and waits for it; returns the unwritten remainders.
    fn submit_writes<'b>(&mut self, batch: &[(u64, &'b [u8])]) -> io::Result<Vec<(u64, &'b [u8])>> {
        let fd = types::Fd(self.file.as_raw_fd());
        for (i, (offset, bytes)) in batch.iter().enumerate() {
            let len = u32::try_from(bytes.len()).expect("single write under 4 GiB");
            let entry = opcode::Write::new(fd, bytes.as_ptr(), len)
                .offset(*offset)
                .build()
                .user_data(i as u64);
            // SAFETY: the buffer outlives the operation: this function waits
            // for every completion of the batch before returning.
            unsafe { self.ring.submission().push(&entry) }
                .expect("batch fits the submission queue");
        }
        let results = self.wait(batch.len());
        let mut rest = Vec::new();
        for (user_data, res) in results {
            let (offset, bytes) = batch[user_data as usize];
            let written = check_result(res)?;
            if written == 0 {
                return Err(io::Error::new(io::ErrorKind::WriteZero, "write returned 0"));
            }
            if written < bytes.len() {
                rest.push((offset + written as u64, &bytes[written..]));
            }
        }
        Ok(rest)
    }

    /// fdatasync: data and the metadata needed to read it back (file size).
    pub(crate) fn sync_data(&mut self) -> io::Result<()> {
        let fd = types::Fd(self.file.as_raw_fd());
        let entry = opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build();
        // SAFETY: fsync references no buffer; the fd stays open (owned by self).
        unsafe { self.ring.submission().push(&entry) }.expect("empty submission queue");
        let results = self.wait(1);
        check_result(results[0].1)?;
        crate::fault::injected_fsync_error()
    }

    /// Submits queued entries and collects exactly `count` completions.
    ///
    /// Returning early would free buffers the kernel may still read, so an
    /// unexpected ring failure aborts the process instead of unwinding.
    fn wait(&mut self, count: usize) -> Vec<(u64, i32)> {
        let mut results = Vec::with_capacity(count);
        while results.len() < count {
            if let Err(e) = self.ring.submit_and_wait(count - results.len()) {
                let transient = matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                );
                if !transient {
                    notify(
                        Severity::Error,
                        "B+tree io_uring_enter failed with writes in flight; aborting",
                        &[("error", e.to_string())],
                    );
                    std::process::abort();
                }
            }
            results.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        }
        assert_eq!(results.len(), count, "completions from another submitter");
        results
    }
}

fn check_result(res: i32) -> io::Result<usize> {
    if res < 0 {
        Err(io::Error::from_raw_os_error(-res))
    } else {
        Ok(res as usize)
    }
}
