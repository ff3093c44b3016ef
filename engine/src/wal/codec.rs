//! Record framing: encoding and validating one record (layout in the module doc of `wal`).

use super::{Record, RecordKind};

/// Size of the fixed record header.
pub const RECORD_HEADER_BYTES: usize = 32;
/// Every record starts and ends on a multiple of this.
pub const RECORD_ALIGN_BYTES: usize = 8;
/// Largest `data` a record can carry: `record_len` is a u32 that includes the header.
pub const MAX_RECORD_DATA_BYTES: usize = u32::MAX as usize - RECORD_HEADER_BYTES;

const LEN_RANGE: std::ops::Range<usize> = 0..4;
const KIND_OFFSET: usize = 4;
const RESERVED_A_RANGE: std::ops::Range<usize> = 5..8;
const CRC_RANGE: std::ops::Range<usize> = 8..12;
const RESERVED_B_RANGE: std::ops::Range<usize> = 12..16;
const TERM_RANGE: std::ops::Range<usize> = 16..24;
const INDEX_RANGE: std::ops::Range<usize> = 24..32;

/// Bytes a record with `data_len` bytes of data occupies on disk, padding included.
pub fn encoded_len(data_len: usize) -> usize {
    align_up(RECORD_HEADER_BYTES + data_len, RECORD_ALIGN_BYTES)
}

pub(crate) fn align_up(value: usize, align: usize) -> usize {
    assert!(
        align.is_power_of_two(),
        "alignment {align} must be a power of two"
    );
    (value + align - 1) & !(align - 1)
}

fn checksum(kind: u8, term: u64, index: u64, data: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&[kind]);
    hasher.update(&term.to_le_bytes());
    hasher.update(&index.to_le_bytes());
    hasher.update(data);
    hasher.finalize()
}

/// Appends the framed record to `out`; returns the number of bytes appended.
pub(crate) fn encode_into(
    out: &mut Vec<u8>,
    kind: RecordKind,
    term: u64,
    index: u64,
    data: &[u8],
) -> usize {
    assert!(
        data.len() <= MAX_RECORD_DATA_BYTES,
        "record data of {} bytes exceeds the frame limit",
        data.len()
    );
    let start = out.len();
    let total = encoded_len(data.len());
    out.resize(start + total, 0);
    let frame = &mut out[start..];
    let record_len = (RECORD_HEADER_BYTES + data.len()) as u32;
    frame[LEN_RANGE].copy_from_slice(&record_len.to_le_bytes());
    frame[KIND_OFFSET] = kind as u8;
    frame[CRC_RANGE].copy_from_slice(&checksum(kind as u8, term, index, data).to_le_bytes());
    frame[TERM_RANGE].copy_from_slice(&term.to_le_bytes());
    frame[INDEX_RANGE].copy_from_slice(&index.to_le_bytes());
    frame[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + data.len()].copy_from_slice(data);
    total
}

/// Encodes one record into a fresh buffer (convenience for tests and tools).
pub fn encode(record: &Record) -> Vec<u8> {
    let mut out = Vec::with_capacity(encoded_len(record.data.len()));
    encode_into(
        &mut out,
        record.kind,
        record.term,
        record.index,
        &record.data,
    );
    out
}

/// A record decoded in place, borrowing its data from the segment buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RecordView<'a> {
    pub kind: RecordKind,
    pub term: u64,
    pub index: u64,
    pub data: &'a [u8],
}

impl RecordView<'_> {
    pub fn to_record(self) -> Record {
        Record {
            kind: self.kind,
            term: self.term,
            index: self.index,
            data: self.data.to_vec(),
        }
    }
}

/// What is found at one 8-byte aligned offset of a segment.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Frame<'a> {
    /// The length word is zero: nothing was written here (preallocated space reads as zero).
    Unwritten,
    /// A well-formed record occupying `size_bytes` (padding included).
    Valid {
        record: RecordView<'a>,
        size_bytes: usize,
    },
    /// Something non-zero that is not a valid record.
    Invalid { detail: String },
}

fn u32_at(buf: &[u8], range: std::ops::Range<usize>) -> u32 {
    u32::from_le_bytes(buf[range].try_into().expect("4-byte range"))
}

fn u64_at(buf: &[u8], range: std::ops::Range<usize>) -> u64 {
    u64::from_le_bytes(buf[range].try_into().expect("8-byte range"))
}

/// Validates the frame starting at `buf[0]`. `buf` extends to the end of the segment.
pub(crate) fn decode(buf: &[u8]) -> Frame<'_> {
    if buf.len() < LEN_RANGE.end {
        return match buf.iter().all(|&b| b == 0) {
            true => Frame::Unwritten,
            false => invalid(format!(
                "{} stray bytes at the end of the segment",
                buf.len()
            )),
        };
    }
    let record_len = u32_at(buf, LEN_RANGE) as usize;
    if record_len == 0 {
        return Frame::Unwritten;
    }
    if record_len < RECORD_HEADER_BYTES {
        return invalid(format!(
            "record length {record_len} is shorter than the {RECORD_HEADER_BYTES}-byte header"
        ));
    }
    let size_bytes = align_up(record_len, RECORD_ALIGN_BYTES);
    if size_bytes > buf.len() {
        return invalid(format!(
            "record length {record_len} runs past the end of the segment ({} bytes left)",
            buf.len()
        ));
    }
    let Some(kind) = RecordKind::from_u8(buf[KIND_OFFSET]) else {
        return invalid(format!("unknown record type {}", buf[KIND_OFFSET]));
    };
    let padding = &buf[record_len..size_bytes];
    if buf[RESERVED_A_RANGE]
        .iter()
        .chain(&buf[RESERVED_B_RANGE])
        .chain(padding)
        .any(|&b| b != 0)
    {
        return invalid("non-zero reserved or padding bytes".to_string());
    }
    let term = u64_at(buf, TERM_RANGE);
    let index = u64_at(buf, INDEX_RANGE);
    let data = &buf[RECORD_HEADER_BYTES..record_len];
    let stored_crc = u32_at(buf, CRC_RANGE);
    let computed_crc = checksum(kind as u8, term, index, data);
    if stored_crc != computed_crc {
        return invalid(format!(
            "crc mismatch: stored {stored_crc:#010x}, computed {computed_crc:#010x}"
        ));
    }
    Frame::Valid {
        record: RecordView {
            kind,
            term,
            index,
            data,
        },
        size_bytes,
    }
}

fn invalid(detail: String) -> Frame<'static> {
    Frame::Invalid { detail }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kind_strategy() -> impl Strategy<Value = RecordKind> {
        prop_oneof![Just(RecordKind::Entry), Just(RecordKind::HardState)]
    }

    fn record_strategy() -> impl Strategy<Value = Record> {
        (
            kind_strategy(),
            any::<u64>(),
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..300),
        )
            .prop_map(|(kind, term, index, data)| Record {
                kind,
                term,
                index,
                data,
            })
    }

    proptest! {
        #[test]
        fn round_trip(record in record_strategy(), trailing_zeros in 0usize..64) {
            let mut buf = encode(&record);
            prop_assert_eq!(buf.len(), encoded_len(record.data.len()));
            prop_assert_eq!(buf.len() % RECORD_ALIGN_BYTES, 0);
            let size = buf.len();
            buf.resize(size + trailing_zeros, 0);
            match decode(&buf) {
                Frame::Valid { record: view, size_bytes } => {
                    prop_assert_eq!(size_bytes, size);
                    prop_assert_eq!(view.to_record(), record);
                }
                other => prop_assert!(false, "expected a valid frame, got {:?}", other),
            }
            prop_assert_eq!(decode(&buf[size..]), Frame::Unwritten);
        }

        #[test]
        fn any_single_bit_flip_is_rejected(record in record_strategy(), bit in any::<prop::sample::Index>()) {
            let mut buf = encode(&record);
            let bit = bit.index(buf.len() * 8);
            buf[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(!matches!(decode(&buf), Frame::Valid { .. }), "flipped bit {} accepted", bit);
        }

        #[test]
        fn truncated_record_is_rejected(record in record_strategy(), cut in any::<prop::sample::Index>()) {
            let buf = encode(&record);
            let keep = cut.index(buf.len() - 1) + 1;
            let frame = decode(&buf[..keep]);
            prop_assert!(!matches!(frame, Frame::Valid { .. }), "truncated to {} accepted", keep);
        }
    }

    #[test]
    fn empty_data_record_has_nonzero_length_word() {
        let record = Record {
            kind: RecordKind::Entry,
            term: 0,
            index: 0,
            data: Vec::new(),
        };
        let buf = encode(&record);
        assert_eq!(buf.len(), RECORD_HEADER_BYTES);
        assert!(matches!(
            decode(&buf),
            Frame::Valid {
                size_bytes: RECORD_HEADER_BYTES,
                ..
            }
        ));
    }

    #[test]
    fn unknown_kind_and_short_length_are_invalid() {
        let mut buf = encode(&Record {
            kind: RecordKind::Entry,
            term: 1,
            index: 2,
            data: vec![7; 5],
        });
        buf[KIND_OFFSET] = 99;
        assert!(
            matches!(decode(&buf), Frame::Invalid { detail } if detail.contains("unknown record type 99"))
        );
        let mut short = vec![0u8; 64];
        short[0] = 8;
        assert!(matches!(decode(&short), Frame::Invalid { detail } if detail.contains("shorter")));
    }
}
