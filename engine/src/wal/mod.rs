//! Per-shard write-ahead log: the Raft log of one group, durable before anything is acknowledged.
//!
//! # Files
//!
//! A WAL is a directory of segment files named `<seq:016x>-<first_index:016x>.wal`. `seq` counts
//! segments (consecutive; releasing removes a prefix), `first_index` is the index of the first
//! entry expected in the segment (informational). Each segment is preallocated (fallocate) to
//! `segment_size_bytes`, so unwritten space reads as zeros. A segment is created as `*.wal.tmp`,
//! preallocated, fsync'd, renamed and the directory fsync'd before any record goes into it.
//!
//! # Record framing
//!
//! Records are laid end to end from offset 0, each starting on an 8-byte boundary. Integers are
//! little endian.
//!
//! | bytes          | field        | meaning                                                        |
//! |----------------|--------------|----------------------------------------------------------------|
//! | 0..4           | `record_len` | u32: header + data bytes, padding excluded. 0 = end of data    |
//! | 4              | `kind`       | u8: 1 = Entry, 2 = HardState, 3 = Snapshot, 4 = ConfEntry      |
//! | 5..8           | reserved     | zero                                                           |
//! | 8..12          | `crc`        | u32: CRC-32 (IEEE, crc32fast) over kind, term, index, data     |
//! | 12..16         | reserved     | zero                                                           |
//! | 16..24         | `term`       | u64                                                            |
//! | 24..32         | `index`      | u64                                                            |
//! | 32..record_len | `data`       | opaque payload                                                 |
//! | ..align8       | padding      | zero, up to the next multiple of 8                             |
//!
//! `record_len` is never 0 for a record (the header alone is 32 bytes), so a zero length word
//! marks the end of written data. Reserved and padding bytes must be zero. An Entry carries an
//! opaque Raft entry (`term`, `index` are the entry's). A HardState carries
//! `term, vote, commit` as three u64 in `data` ([`HardState`]); its header `term` is the
//! hard state's term and `index` its commit index. A ConfEntry is an Entry whose data is a
//! membership change (same framing; the WAL treats both as entries). A Snapshot carries the
//! Raft log's compaction point: header `term`, `index` are the snapshot's, `data` (at most
//! [`MAX_SNAPSHOT_DATA_BYTES`]) is opaque to the WAL (the raft crate's `WalLogStore` puts the
//! membership there). The writer repeats the latest HardState and the latest Snapshot, in that
//! order, as the first records of every new segment, so releasing old segments never loses them.
//!
//! # Durability and failure
//!
//! [`Wal::append`] resolves only after an fdatasync covering its records returned. Appends
//! gather into one batch while the previous batch is being written (group commit). A failed
//! write or fsync poisons the WAL: like etcd, a failed fsync is not retried (the page cache
//! state after a failed fsync is unknown), every later append fails, and the caller must treat
//! the error as fatal (crash and recover from disk).
//!
//! # Recovery
//!
//! [`read_dir`] (synchronous, no executor needed) returns every valid record in order. Anything
//! invalid (bad header, CRC mismatch, stray bytes after a zero gap) with no valid record after
//! it, in this or a later segment, is a torn tail from a crash mid-write: it is cut and logged.
//! An invalid spot followed by a valid record is corruption of acknowledged data:
//! [`WalError::Corrupt`] names the file and byte offset. [`WalReader`] streams records with
//! their positions and reports invalid spots instead of stopping (for the dump tool).
//!
//! Every write is followed by its fdatasync before the next write starts, and a new segment
//! receives records only after the previous one is durable, so a crash (kill -9) leaves at
//! most the last unacknowledged write damaged. Known limit, shared with etcd: a power loss that
//! persists a later block of that last multi-block write but not an earlier one looks like
//! corruption (a valid record after an invalid spot) and stops start-up rather than losing
//! data silently.
//!
//! # I/O mode
//!
//! Segments are written with O_DIRECT through io_uring (glommio `DmaFile`); writes cover whole
//! blocks, so the partially filled last block is kept in memory and rewritten by the next
//! write. Where the file system does not do O_DIRECT (tmpfs, some FUSE file systems) the
//! writer logs it and uses glommio's buffered file instead ([`WalOptions::force_buffered`]
//! selects that too); [`Wal::io_mode`] tells which is in use.

mod codec;
pub mod latency;
mod reader;
mod segment;
mod waiters;
mod writer;

use std::fmt;
use std::path::PathBuf;

pub use codec::{
    encode, encoded_len, MAX_RECORD_DATA_BYTES, RECORD_ALIGN_BYTES, RECORD_HEADER_BYTES,
};
pub use reader::{
    read_dir, ReadItem, RecordPos, Recovered, SegmentInfo, TailPosition, TornTail, WalReader,
};
pub use segment::{segment_file_name, DEFAULT_SEGMENT_SIZE_BYTES};
pub use writer::{IoMode, Wal, WalOptions, WalStats};

/// What a record holds; the numeric value is the on-disk `kind` byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RecordKind {
    /// A Raft log entry; `data` is opaque to the WAL.
    Entry = 1,
    /// Raft hard state (`term`, `vote`, `commit`), see [`HardState`].
    HardState = 2,
    /// The Raft log's compaction point (a snapshot's `term`, `index`; `data` opaque).
    Snapshot = 3,
    /// A Raft log entry holding a membership change; `data` is opaque to the WAL.
    ConfEntry = 4,
}

impl RecordKind {
    pub fn from_u8(value: u8) -> Option<RecordKind> {
        match value {
            1 => Some(RecordKind::Entry),
            2 => Some(RecordKind::HardState),
            3 => Some(RecordKind::Snapshot),
            4 => Some(RecordKind::ConfEntry),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            RecordKind::Entry => "Entry",
            RecordKind::HardState => "HardState",
            RecordKind::Snapshot => "Snapshot",
            RecordKind::ConfEntry => "ConfEntry",
        }
    }

    /// Whether the record is a log entry (counts for segment naming and release).
    pub fn is_entry(self) -> bool {
        matches!(self, RecordKind::Entry | RecordKind::ConfEntry)
    }

    /// Whether the writer repeats the latest record of this kind at the head of each segment.
    pub(crate) fn is_sticky(self) -> bool {
        matches!(self, RecordKind::HardState | RecordKind::Snapshot)
    }
}

/// Largest `data` of a [`RecordKind::Snapshot`] record: it is repeated in every segment, so a
/// segment reserves room for it.
pub const MAX_SNAPSHOT_DATA_BYTES: usize = 1024;

/// One WAL record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub kind: RecordKind,
    pub term: u64,
    pub index: u64,
    pub data: Vec<u8>,
}

impl Record {
    pub fn entry(term: u64, index: u64, data: Vec<u8>) -> Record {
        Record {
            kind: RecordKind::Entry,
            term,
            index,
            data,
        }
    }
}

/// Raft hard state as stored in a [`RecordKind::HardState`] record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HardState {
    pub term: u64,
    pub vote: u64,
    pub commit: u64,
}

const HARD_STATE_DATA_BYTES: usize = 24;

impl HardState {
    pub fn to_record(self) -> Record {
        let mut data = Vec::with_capacity(HARD_STATE_DATA_BYTES);
        for word in [self.term, self.vote, self.commit] {
            data.extend_from_slice(&word.to_le_bytes());
        }
        Record {
            kind: RecordKind::HardState,
            term: self.term,
            index: self.commit,
            data,
        }
    }

    /// `None` when `record` is not a well-formed HardState record.
    pub fn from_record(record: &Record) -> Option<HardState> {
        if record.kind != RecordKind::HardState || record.data.len() != HARD_STATE_DATA_BYTES {
            return None;
        }
        let word = |i: usize| {
            u64::from_le_bytes(record.data[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
        };
        Some(HardState {
            term: word(0),
            vote: word(1),
            commit: word(2),
        })
    }
}

/// Errors of the WAL. Any error from [`Wal::append`] is fatal for the WAL instance.
#[derive(Debug)]
pub enum WalError {
    /// An I/O operation failed.
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// A record that is not the torn tail is invalid: acknowledged data is damaged.
    Corrupt {
        file: PathBuf,
        offset: u64,
        detail: String,
    },
    /// A record is too large to ever fit in a segment.
    RecordTooLarge {
        size_bytes: usize,
        limit_bytes: usize,
    },
    /// An earlier write or fsync failed; the WAL accepts nothing more.
    Failed { detail: String },
}

impl fmt::Display for WalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WalError::Io { op, path, source } => {
                write!(f, "wal: {op} {}: {source}", path.display())
            }
            WalError::Corrupt {
                file,
                offset,
                detail,
            } => {
                write!(
                    f,
                    "wal: corrupt record in {} at byte offset {offset}: {detail}",
                    file.display()
                )
            }
            WalError::RecordTooLarge {
                size_bytes,
                limit_bytes,
            } => {
                write!(
                    f,
                    "wal: record of {size_bytes} bytes exceeds the limit of {limit_bytes} bytes"
                )
            }
            WalError::Failed { detail } => {
                write!(f, "wal: unusable after an earlier failure: {detail}")
            }
        }
    }
}

impl std::error::Error for WalError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            WalError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl WalError {
    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
        source: impl Into<std::io::Error>,
    ) -> WalError {
        WalError::Io {
            op,
            path: path.into(),
            source: source.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hard_state_round_trips_through_a_record() {
        let hs = HardState {
            term: 7,
            vote: 3,
            commit: 42,
        };
        let record = hs.to_record();
        assert_eq!((record.term, record.index), (7, 42));
        assert_eq!(HardState::from_record(&record), Some(hs));
        assert_eq!(
            HardState::from_record(&Record::entry(7, 42, record.data.clone())),
            None
        );
    }

    #[test]
    fn corrupt_error_names_file_and_offset() {
        let err = WalError::Corrupt {
            file: PathBuf::from("/d/0-0.wal"),
            offset: 4096,
            detail: "crc".into(),
        };
        let text = err.to_string();
        assert!(
            text.contains("/d/0-0.wal") && text.contains("4096"),
            "{text}"
        );
    }
}
