//! Synchronous reading: the streaming [`WalReader`] and recovery ([`read_dir`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::codec::{align_up, decode, Frame, RecordView, RECORD_ALIGN_BYTES};
use super::segment::{list_segments, SegmentFile};
use super::{HardState, Record, WalError};

/// Where something was found: segment file, its sequence number and a byte offset in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordPos {
    pub file: Arc<Path>,
    pub seq: u64,
    pub offset: u64,
}

/// One step of [`WalReader`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadItem {
    /// A segment starts; its records follow.
    Segment {
        file: Arc<Path>,
        seq: u64,
        first_index: u64,
        len_bytes: u64,
    },
    /// The segment with sequence number `seq` is absent; `next_file` is the one found after it.
    MissingSegment { seq: u64, next_file: Arc<Path> },
    /// A valid record occupying `size_bytes` (padding included) from `pos`.
    Record {
        pos: RecordPos,
        size_bytes: u64,
        record: Record,
    },
    /// Bytes from `pos` that are not a valid record: a bad header, a CRC mismatch, a zero gap
    /// before a valid record, or stray bytes after a zero gap. `skipped_bytes` reach up to the
    /// next valid record, or to the last non-zero byte of the segment when none follows.
    Corrupt {
        pos: RecordPos,
        detail: String,
        skipped_bytes: u64,
    },
}

/// Streams every segment of a WAL directory in order, reporting invalid spots and resuming at
/// the next valid record instead of stopping. Reads one segment into memory at a time.
pub struct WalReader {
    segments: std::vec::IntoIter<SegmentFile>,
    next_seq: Option<u64>,
    current: Option<LoadedSegment>,
}

struct LoadedSegment {
    file: Arc<Path>,
    seq: u64,
    bytes: Vec<u8>,
    pos_bytes: usize,
}

impl WalReader {
    pub fn open(dir: &Path) -> Result<WalReader, WalError> {
        Ok(WalReader {
            segments: list_segments(dir)?.into_iter(),
            next_seq: None,
            current: None,
        })
    }

    /// The next segment's `Segment` item (or a `MissingSegment` before it).
    fn load_next_segment(&mut self) -> Option<Result<ReadItem, WalError>> {
        let upcoming = self.segments.as_slice().first()?;
        if let Some(missing) = self.next_seq.filter(|&seq| seq != upcoming.seq) {
            self.next_seq = Some(missing + 1);
            let next_file = Arc::from(upcoming.path.as_path());
            return Some(Ok(ReadItem::MissingSegment {
                seq: missing,
                next_file,
            }));
        }
        let segment = self.segments.next()?;
        let bytes = match std::fs::read(&segment.path) {
            Ok(bytes) => bytes,
            Err(e) => return Some(Err(WalError::io("reading", segment.path, e))),
        };
        let file: Arc<Path> = Arc::from(segment.path.as_path());
        let item = ReadItem::Segment {
            file: file.clone(),
            seq: segment.seq,
            first_index: segment.first_index,
            len_bytes: bytes.len() as u64,
        };
        self.next_seq = Some(segment.seq + 1);
        self.current = Some(LoadedSegment {
            file,
            seq: segment.seq,
            bytes,
            pos_bytes: 0,
        });
        Some(Ok(item))
    }
}

impl Iterator for WalReader {
    type Item = Result<ReadItem, WalError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(segment) = &mut self.current {
            match scan_next(&segment.bytes, &mut segment.pos_bytes) {
                Some(item) => return Some(Ok(item.into_read_item(&segment.file, segment.seq))),
                None => self.current = None,
            }
        }
        self.load_next_segment()
    }
}

/// What [`scan_next`] finds, borrowing from the segment buffer.
enum ScanItem<'a> {
    Valid {
        offset: usize,
        size_bytes: usize,
        record: RecordView<'a>,
    },
    Invalid {
        offset: usize,
        detail: String,
        skipped_bytes: usize,
    },
}

impl ScanItem<'_> {
    fn into_read_item(self, file: &Arc<Path>, seq: u64) -> ReadItem {
        let pos = |offset: usize| RecordPos {
            file: file.clone(),
            seq,
            offset: offset as u64,
        };
        match self {
            ScanItem::Valid {
                offset,
                size_bytes,
                record,
            } => ReadItem::Record {
                pos: pos(offset),
                size_bytes: size_bytes as u64,
                record: record.to_record(),
            },
            ScanItem::Invalid {
                offset,
                detail,
                skipped_bytes,
            } => ReadItem::Corrupt {
                pos: pos(offset),
                detail,
                skipped_bytes: skipped_bytes as u64,
            },
        }
    }
}

/// The next item at or after `*pos_bytes` of one segment's bytes, advancing `*pos_bytes`;
/// `None` once only zeros remain.
fn scan_next<'a>(buf: &'a [u8], pos_bytes: &mut usize) -> Option<ScanItem<'a>> {
    let offset = *pos_bytes;
    if offset >= buf.len() {
        return None;
    }
    let detail = match decode(&buf[offset..]) {
        Frame::Valid { record, size_bytes } => {
            *pos_bytes = offset + size_bytes;
            return Some(ScanItem::Valid {
                offset,
                size_bytes,
                record,
            });
        }
        Frame::Unwritten => None,
        Frame::Invalid { detail } => Some(detail),
    };
    let resume = find_valid(buf, offset + RECORD_ALIGN_BYTES);
    let skip_to = resume.unwrap_or_else(|| nonzero_end(buf, offset));
    *pos_bytes = resume.unwrap_or(buf.len());
    let skipped_bytes = skip_to - offset;
    let detail = match (detail, resume) {
        (Some(detail), _) => detail,
        (None, Some(_)) => format!("{skipped_bytes} unwritten (zero) bytes before a valid record"),
        (None, None) if skipped_bytes > 0 => {
            format!("{skipped_bytes} bytes of unreadable data after unwritten (zero) bytes")
        }
        (None, None) => return None,
    };
    Some(ScanItem::Invalid {
        offset,
        detail,
        skipped_bytes,
    })
}

/// First 8-byte aligned offset at or after `from` holding a valid record. A record's first
/// word holds its non-zero length, so all-zero words (the preallocated rest of a segment)
/// are skipped without decoding.
fn find_valid(buf: &[u8], from: usize) -> Option<usize> {
    (from..buf.len())
        .step_by(RECORD_ALIGN_BYTES)
        .find(|&offset| {
            let word = &buf[offset..(offset + RECORD_ALIGN_BYTES).min(buf.len())];
            word.iter().any(|&b| b != 0) && matches!(decode(&buf[offset..]), Frame::Valid { .. })
        })
}

/// End of the last non-zero byte at or after `from`, rounded up to the record alignment
/// (capped at the buffer length); `from` when everything from there is zero.
fn nonzero_end(buf: &[u8], from: usize) -> usize {
    match buf[from..].iter().rposition(|&b| b != 0) {
        Some(last) => align_up(from + last + 1, RECORD_ALIGN_BYTES).min(buf.len()),
        None => from,
    }
}

/// A segment kept by recovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    pub seq: u64,
    pub first_index: u64,
    pub path: PathBuf,
    /// Highest index of an Entry record in the segment, `None` when it holds no entry.
    pub max_entry_index: Option<u64>,
}

/// Where appends continue: in the last kept segment at `offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TailPosition {
    pub seq: u64,
    pub offset: u64,
    /// Bytes `[offset, zero_until)` hold a cut torn tail; the writer zeroes them before appending.
    pub zero_until: u64,
}

/// The invalid tail recovery cut off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    pub file: PathBuf,
    pub offset: u64,
    pub detail: String,
}

/// The result of [`read_dir`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Recovered {
    /// Every valid record, in log order. The writer repeats the latest HardState and Snapshot at
    /// the head of each segment, so those records can appear more than once; entries are as appended
    /// (a Raft layer applies its own overwrite rule to re-appended indexes).
    pub records: Vec<Record>,
    /// Segments holding them, oldest first; appends continue in the last one.
    pub segments: Vec<SegmentInfo>,
    /// `None` when the directory holds no segment.
    pub tail: Option<TailPosition>,
    pub torn_tail: Option<TornTail>,
    /// Segments after a cut tail: nothing valid in them. The writer removes them.
    pub discarded_segments: Vec<PathBuf>,
}

impl Recovered {
    pub fn last_hard_state(&self) -> Option<HardState> {
        self.records.iter().rev().find_map(HardState::from_record)
    }
}

/// Recovers a WAL directory: every valid record in order, and where to append. Cuts (and
/// reports, for the caller to log) a torn tail; returns [`WalError::Corrupt`] when an invalid spot or a missing segment is
/// followed by a valid record. Reads only; running it twice gives the same result.
pub fn read_dir(dir: &Path) -> Result<Recovered, WalError> {
    let mut recovery = Recovery::default();
    for item in WalReader::open(dir)? {
        recovery.apply(item?)?;
    }
    Ok(recovery.out)
}

#[derive(Default)]
struct Recovery {
    out: Recovered,
    /// The first invalid spot; any valid record after it makes it corruption.
    first_bad: Option<WalError>,
}

impl Recovery {
    fn apply(&mut self, item: ReadItem) -> Result<(), WalError> {
        match item {
            ReadItem::Segment {
                file,
                seq,
                first_index,
                ..
            } => self.start_segment(&file, seq, first_index),
            ReadItem::MissingSegment { seq, next_file } => {
                let detail = format!("the segment before this one (seq {seq:#x}) is missing");
                self.note_bad(WalError::Corrupt {
                    file: next_file.to_path_buf(),
                    offset: 0,
                    detail,
                });
            }
            ReadItem::Record {
                pos,
                size_bytes,
                record,
            } => {
                if let Some(bad) = self.first_bad.take() {
                    return Err(bad);
                }
                self.add_record(pos.offset + size_bytes, record);
            }
            ReadItem::Corrupt {
                pos,
                detail,
                skipped_bytes,
            } => {
                if self.first_bad.is_none() {
                    let tail = self
                        .out
                        .tail
                        .as_mut()
                        .expect("corruption is reported inside a segment");
                    tail.zero_until = pos.offset + skipped_bytes;
                }
                self.note_bad(WalError::Corrupt {
                    file: pos.file.to_path_buf(),
                    offset: pos.offset,
                    detail,
                });
            }
        }
        Ok(())
    }

    fn start_segment(&mut self, file: &Path, seq: u64, first_index: u64) {
        if self.first_bad.is_some() {
            self.out.discarded_segments.push(file.to_path_buf());
            return;
        }
        let path = file.to_path_buf();
        self.out.segments.push(SegmentInfo {
            seq,
            first_index,
            path,
            max_entry_index: None,
        });
        self.out.tail = Some(TailPosition {
            seq,
            offset: 0,
            zero_until: 0,
        });
    }

    fn add_record(&mut self, end_offset: u64, record: Record) {
        let segment = self
            .out
            .segments
            .last_mut()
            .expect("records are read inside a segment");
        if record.kind.is_entry() {
            segment.max_entry_index = Some(
                segment
                    .max_entry_index
                    .map_or(record.index, |max| max.max(record.index)),
            );
        }
        let tail = self
            .out
            .tail
            .as_mut()
            .expect("records are read inside a segment");
        tail.offset = end_offset;
        tail.zero_until = end_offset;
        self.out.records.push(record);
    }

    fn note_bad(&mut self, bad: WalError) {
        if self.first_bad.is_some() {
            return;
        }
        if let WalError::Corrupt {
            file,
            offset,
            detail,
        } = &bad
        {
            self.out.torn_tail = Some(TornTail {
                file: file.clone(),
                offset: *offset,
                detail: detail.clone(),
            });
        }
        self.first_bad = Some(bad);
    }
}

#[cfg(test)]
mod tests {
    use super::super::codec::encode;
    use super::*;

    fn segment_with(records: &[Record], len_bytes: usize) -> Vec<u8> {
        let mut buf: Vec<u8> = records.iter().flat_map(encode).collect();
        assert!(buf.len() <= len_bytes);
        buf.resize(len_bytes, 0);
        buf
    }

    fn scan_all(buf: &[u8]) -> Vec<ScanItem<'_>> {
        let mut pos = 0;
        std::iter::from_fn(|| scan_next(buf, &mut pos)).collect()
    }

    #[test]
    fn scan_stops_at_zeros() {
        let records = [
            Record::entry(1, 1, b"a".to_vec()),
            Record::entry(1, 2, b"bb".to_vec()),
        ];
        let buf = segment_with(&records, 4096);
        let items = scan_all(&buf);
        assert_eq!(items.len(), 2);
        assert!(matches!(
            items[1],
            ScanItem::Valid {
                offset: 40,
                size_bytes: 40,
                ..
            }
        ));
    }

    #[test]
    fn scan_resumes_after_garbage_and_reports_zero_gaps() {
        let one = encode(&Record::entry(1, 1, vec![1; 10]));
        let two = encode(&Record::entry(1, 2, vec![2; 10]));
        let mut buf = vec![0u8; 1024];
        buf[..one.len()].copy_from_slice(&one);
        buf[one.len()..one.len() + 8].copy_from_slice(&[0xff; 8]);
        buf[200..200 + two.len()].copy_from_slice(&two);
        buf[600] = 1;
        let items = scan_all(&buf);
        assert_eq!(items.len(), 4, "valid, garbage, valid, stray");
        assert!(matches!(
            &items[1],
            ScanItem::Invalid {
                offset: 48,
                skipped_bytes: 152,
                ..
            }
        ));
        assert!(matches!(&items[2], ScanItem::Valid { offset: 200, .. }));
        assert!(matches!(
            &items[3],
            ScanItem::Invalid {
                offset: 248,
                skipped_bytes: 360,
                ..
            }
        ));
    }

    #[test]
    fn zero_gap_before_valid_record_is_reported() {
        let two = encode(&Record::entry(1, 2, vec![2; 3]));
        let mut buf = vec![0u8; 512];
        buf[64..64 + two.len()].copy_from_slice(&two);
        let items = scan_all(&buf);
        assert!(
            matches!(&items[0], ScanItem::Invalid { offset: 0, skipped_bytes: 64, detail } if detail.contains("zero"))
        );
        assert!(matches!(&items[1], ScanItem::Valid { offset: 64, .. }));
    }
}
