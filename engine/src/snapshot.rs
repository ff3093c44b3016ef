//! The snapshot file: a whole node's state at one revision (`Maintenance.Snapshot`,
//! `ferrocd snapshot restore`).
//!
//! # Format (version 1)
//!
//! Integers are little-endian.
//!
//! ```text
//! header   = magic "FERROSNP" format:u32 (= 1) revision:i64 source_shards:u32
//! record*  = tag:u8 len:u32 body (len bytes)
//!   tag 1  = a retained change: main:i64 sub:i64 kind:u8
//!            kind 0 (tombstone): key_len:u32 key
//!            kind 1 (put): create_revision:i64 version:i64 lease:i64 key_len:u32 key value
//!            (the value is the rest of the body)
//!   tag 2  = a meta record: a WAL payload of `mvcc::codec` (lease grants, auth records)
//!   tag 3  = end: compacted_revision:i64 changes:u64 meta_records:u64 (always the last)
//! padding  = zero bytes, so that the file's length is 32 more than a multiple of 512
//! checksum = sha256 of every byte before it (32 bytes)
//! ```
//!
//! Changes come in key order, each key's in revision order; they are every change with
//! `main <= revision` that survives compaction at `compacted_revision`, except that changes
//! which compaction at `compacted_revision` would drop may also be present (a compaction can
//! advance while a snapshot streams): a reader compacts them away ([`retained`]). The
//! compacted revision comes at the end for that reason. A file is accepted only whole: the
//! checksum is verified first, then the end record must be the last record. The padded
//! length and the trailing sha256 are etcd's convention for its snapshot files (its bolt
//! file's pages are 512-byte multiples; `etcdctl snapshot save` refuses a download whose
//! length is not 32 more than a multiple of 512), so etcdctl saves ours unchanged. Like
//! etcd's, the checksum catches truncation and corruption, not deliberate tampering.

use std::fmt;
use std::io::{self, Read};

use crate::checkpoint;
use crate::mvcc::codec::{self, LogPayload};
use crate::mvcc::{Revision, SavedState, SavedVersion};
use sha2::{Digest, Sha256};

pub const MAGIC: &[u8; 8] = b"FERROSNP";
pub const FORMAT_VERSION: u32 = 2;
const HEADER_BYTES: usize = 24;
const CHECKSUM_BYTES: usize = 32;
/// The file's length is `CHECKSUM_BYTES` more than a multiple of this (etcd's convention).
const ALIGN_BYTES: usize = 512;
const TAG_CHANGE: u8 = 1;
const TAG_META: u8 = 2;
const TAG_END: u8 = 3;
/// A record longer than this is corrupt: keys and values are bounded by the request size
/// (far below it), so the reader never allocates on a corrupt length.
pub const MAX_RECORD_BYTES: usize = 64 << 20;

/// What the header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Every shard's state is as of this revision.
    pub revision: i64,
    /// The shard count of the node the snapshot was taken from (informational: restore
    /// places keys by hash for its own shard count).
    pub source_shards: u32,
}

/// What the end record says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct End {
    pub compacted_revision: i64,
    pub changes: u64,
    pub meta_records: u64,
}

/// One record of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    Change(SavedVersion),
    Meta(LogPayload),
    End(End),
}

/// Why a file is not a valid snapshot.
#[derive(Debug)]
pub enum SnapshotError {
    Io(io::Error),
    NotASnapshot,
    UnsupportedFormat(u32),
    /// The file ends before its checksum or its end record.
    Truncated,
    ChecksumMismatch,
    /// A record does not decode (at this byte offset).
    Corrupt {
        offset: u64,
        what: String,
    },
}

impl fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SnapshotError::Io(e) => write!(f, "{e}"),
            SnapshotError::NotASnapshot => write!(f, "not a ferrocd snapshot file (bad magic)"),
            SnapshotError::UnsupportedFormat(v) => write!(f, "unsupported snapshot format {v}"),
            SnapshotError::Truncated => write!(f, "snapshot file is truncated"),
            SnapshotError::ChecksumMismatch => write!(
                f,
                "snapshot file integrity check failed: sha256 mismatch (the file is corrupt)"
            ),
            SnapshotError::Corrupt { offset, what } => {
                write!(f, "snapshot file is corrupt at byte {offset}: {what}")
            }
        }
    }
}

impl std::error::Error for SnapshotError {}

impl From<io::Error> for SnapshotError {
    fn from(e: io::Error) -> Self {
        SnapshotError::Io(e)
    }
}

/// Writes a snapshot piece by piece into caller-owned buffers (so the caller bounds memory
/// by how often it drains them), keeping the running checksum and counts.
pub struct Encoder {
    hasher: Sha256,
    /// Bytes fed to the hasher (the file's length so far).
    len_bytes: u64,
    end: End,
}

impl Encoder {
    /// Starts a snapshot: appends the header to `out`.
    pub fn new(header: Header, out: &mut Vec<u8>) -> Encoder {
        let mut encoder = Encoder {
            hasher: Sha256::new(),
            len_bytes: 0,
            end: End::default(),
        };
        let start = out.len();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&header.revision.to_le_bytes());
        out.extend_from_slice(&header.source_shards.to_le_bytes());
        encoder.hash(&out[start..]);
        encoder
    }

    /// A change record: revision, key, then the state as a checkpoint stores it.
    pub fn change(&mut self, change: &SavedVersion, out: &mut Vec<u8>) {
        let state = checkpoint::encode_state(&change.state);
        let mut body = Vec::with_capacity(20 + change.key.len() + state.len());
        body.extend_from_slice(&change.rev.main.to_le_bytes());
        body.extend_from_slice(&change.rev.sub.to_le_bytes());
        body.extend_from_slice(&(change.key.len() as u32).to_le_bytes());
        body.extend_from_slice(&change.key);
        body.extend_from_slice(&state);
        self.record(TAG_CHANGE, &body, out);
        self.end.changes += 1;
    }

    pub fn meta(&mut self, payload: &LogPayload, out: &mut Vec<u8>) {
        self.record(TAG_META, &codec::encode(payload), out);
        self.end.meta_records += 1;
    }

    /// Ends the snapshot: appends the end record, the padding and the checksum.
    pub fn finish(mut self, compacted_revision: i64, out: &mut Vec<u8>) {
        self.end.compacted_revision = compacted_revision;
        let mut body = Vec::with_capacity(24);
        body.extend_from_slice(&compacted_revision.to_le_bytes());
        body.extend_from_slice(&self.end.changes.to_le_bytes());
        body.extend_from_slice(&self.end.meta_records.to_le_bytes());
        self.record(TAG_END, &body, out);
        let padding = (ALIGN_BYTES - self.len_bytes as usize % ALIGN_BYTES) % ALIGN_BYTES;
        let start = out.len();
        out.resize(start + padding, 0);
        self.hash(&out[start..]);
        out.extend_from_slice(&self.hasher.finalize());
    }

    fn hash(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
        self.len_bytes += bytes.len() as u64;
    }

    fn record(&mut self, tag: u8, body: &[u8], out: &mut Vec<u8>) {
        assert!(body.len() <= MAX_RECORD_BYTES, "snapshot record too long");
        let start = out.len();
        out.push(tag);
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(body);
        self.hash(&out[start..]);
    }
}

/// Reads the whole of `input` (`len_bytes` long) and checks its checksum; returns it.
pub fn verify_checksum(
    mut input: impl Read,
    len_bytes: u64,
) -> Result<[u8; CHECKSUM_BYTES], SnapshotError> {
    if len_bytes < (HEADER_BYTES + CHECKSUM_BYTES) as u64
        || len_bytes % ALIGN_BYTES as u64 != CHECKSUM_BYTES as u64
    {
        return Err(SnapshotError::Truncated);
    }
    let mut hasher = Sha256::new();
    let mut left = len_bytes - CHECKSUM_BYTES as u64;
    let mut buf = vec![0u8; 64 << 10];
    while left > 0 {
        let n = buf.len().min(left as usize);
        input.read_exact(&mut buf[..n]).map_err(truncated)?;
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    let mut stored = [0u8; CHECKSUM_BYTES];
    input.read_exact(&mut stored).map_err(truncated)?;
    if hasher.finalize()[..] != stored {
        return Err(SnapshotError::ChecksumMismatch);
    }
    Ok(stored)
}

fn truncated(e: io::Error) -> SnapshotError {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => SnapshotError::Truncated,
        _ => SnapshotError::Io(e),
    }
}

/// Reads the records of a snapshot whose checksum was verified ([`verify_checksum`]).
pub struct Reader<R> {
    input: R,
    offset: u64,
    header: Header,
    ended: bool,
}

impl<R: Read> Reader<R> {
    pub fn new(mut input: R) -> Result<Reader<R>, SnapshotError> {
        let mut header = [0u8; HEADER_BYTES];
        input.read_exact(&mut header).map_err(truncated)?;
        if &header[..8] != MAGIC {
            return Err(SnapshotError::NotASnapshot);
        }
        let format = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
        if format != FORMAT_VERSION {
            return Err(SnapshotError::UnsupportedFormat(format));
        }
        Ok(Reader {
            input,
            offset: HEADER_BYTES as u64,
            header: Header {
                revision: i64::from_le_bytes(header[12..20].try_into().expect("8 bytes")),
                source_shards: u32::from_le_bytes(header[20..24].try_into().expect("4 bytes")),
            },
            ended: false,
        })
    }

    pub fn header(&self) -> Header {
        self.header
    }

    /// The next record; `None` after the end record, which must be followed only by the
    /// checksum.
    pub fn next_item(&mut self) -> Result<Option<Item>, SnapshotError> {
        if self.ended {
            return Ok(None);
        }
        let offset = self.offset;
        let corrupt = |what: &str| SnapshotError::Corrupt {
            offset,
            what: what.to_string(),
        };
        let mut frame = [0u8; 5];
        self.input.read_exact(&mut frame).map_err(truncated)?;
        let len = u32::from_le_bytes(frame[1..5].try_into().expect("4 bytes")) as usize;
        if len > MAX_RECORD_BYTES {
            return Err(corrupt("record length out of bounds"));
        }
        let mut body = vec![0u8; len];
        self.input.read_exact(&mut body).map_err(truncated)?;
        self.offset += (frame.len() + len) as u64;
        let item = match frame[0] {
            TAG_CHANGE => Item::Change(decode_change(&body).ok_or_else(|| corrupt("bad change"))?),
            TAG_META => Item::Meta(codec::decode(&body).map_err(|e| corrupt(&e.to_string()))?),
            TAG_END => {
                let end = decode_end(&body).ok_or_else(|| corrupt("bad end record"))?;
                let mut rest = Vec::new();
                self.input
                    .by_ref()
                    .take((ALIGN_BYTES + CHECKSUM_BYTES) as u64)
                    .read_to_end(&mut rest)?;
                let padding = rest.len().checked_sub(CHECKSUM_BYTES);
                if !padding.is_some_and(|p| p < ALIGN_BYTES && rest[..p].iter().all(|&b| b == 0)) {
                    return Err(corrupt("bytes after the end record"));
                }
                self.ended = true;
                Item::End(end)
            }
            tag => return Err(corrupt(&format!("unknown record tag {tag}"))),
        };
        Ok(Some(item))
    }
}

/// Splits fixed-width fields off the front of a record body.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn i64(&mut self) -> Option<i64> {
        Some(i64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
}

fn decode_change(body: &[u8]) -> Option<SavedVersion> {
    let mut fields = Fields(body);
    let rev = Revision {
        main: fields.i64()?,
        sub: fields.i64()?,
    };
    let key_len = fields.u32()? as usize;
    let key = fields.take(key_len)?.to_vec();
    let state = checkpoint::decode_state(fields.0).ok()?;
    Some(SavedVersion { key, rev, state })
}

fn decode_end(body: &[u8]) -> Option<End> {
    let mut fields = Fields(body);
    let end = End {
        compacted_revision: fields.i64()?,
        changes: fields.i64()? as u64,
        meta_records: fields.i64()? as u64,
    };
    fields.0.is_empty().then_some(end)
}

/// Of one key's changes (in revision order), those compaction at `compacted` keeps: from the
/// newest change at or below it (unless that is a tombstone) on.
pub fn retained(changes: &[SavedVersion], compacted: i64) -> &[SavedVersion] {
    let newest_at = changes.partition_point(|c| c.rev.main <= compacted);
    match newest_at.checked_sub(1) {
        None => changes,
        Some(i) => match changes[i].state {
            SavedState::Put { .. } => &changes[i..],
            SavedState::Tombstone => &changes[i + 1..],
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mvcc::codec::AuthUser;

    fn put(key: &[u8], main: i64, version: i64, value: &[u8]) -> SavedVersion {
        SavedVersion {
            key: key.to_vec(),
            rev: Revision { main, sub: 0 },
            state: SavedState::Put {
                create_revision: main - version + 1,
                version,
                lease: 7,
                value: value.to_vec(),
            },
        }
    }

    fn tombstone(key: &[u8], main: i64) -> SavedVersion {
        SavedVersion {
            key: key.to_vec(),
            rev: Revision { main, sub: 1 },
            state: SavedState::Tombstone,
        }
    }

    fn sample() -> (Vec<u8>, Vec<Item>) {
        let header = Header {
            revision: 9,
            source_shards: 3,
        };
        let items = vec![
            Item::Change(put(b"a", 2, 1, b"x")),
            Item::Change(tombstone(b"a", 3)),
            Item::Change(put(b"b\0", 4, 1, b"")),
            Item::Meta(LogPayload::LeaseGrant { id: 7, ttl_s: 60 }),
            Item::Meta(LogPayload::AuthUserPut(AuthUser {
                name: "root".into(),
                password_hash: None,
                roles: vec!["root".into()],
            })),
        ];
        let mut out = Vec::new();
        let mut encoder = Encoder::new(header, &mut out);
        for item in &items {
            match item {
                Item::Change(c) => encoder.change(c, &mut out),
                Item::Meta(m) => encoder.meta(m, &mut out),
                Item::End(_) => unreachable!(),
            }
        }
        encoder.finish(2, &mut out);
        (out, items)
    }

    fn read_all(bytes: &[u8]) -> Result<(Header, Vec<Item>), SnapshotError> {
        verify_checksum(bytes, bytes.len() as u64)?;
        let mut reader = Reader::new(bytes)?;
        let mut items = Vec::new();
        while let Some(item) = reader.next_item()? {
            items.push(item);
        }
        Ok((reader.header(), items))
    }

    #[test]
    fn round_trip() {
        let (bytes, mut items) = sample();
        let (header, read) = read_all(&bytes).unwrap();
        assert_eq!(header.revision, 9);
        assert_eq!(header.source_shards, 3);
        items.push(Item::End(End {
            compacted_revision: 2,
            changes: 3,
            meta_records: 2,
        }));
        assert_eq!(read, items);
    }

    #[test]
    fn every_truncation_and_bit_flip_is_refused() {
        let (bytes, _) = sample();
        assert_eq!(bytes.len() % ALIGN_BYTES, CHECKSUM_BYTES);
        for len in 0..bytes.len() {
            assert!(read_all(&bytes[..len]).is_err(), "truncated to {len}");
        }
        for bit in 0..bytes.len() * 8 {
            let mut flipped = bytes.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(read_all(&flipped).is_err(), "bit {bit} flipped");
        }
    }

    #[test]
    fn retained_applies_compaction() {
        let history = [
            put(b"k", 2, 1, b"1"),
            put(b"k", 4, 2, b"2"),
            tombstone(b"k", 6),
        ];
        assert_eq!(retained(&history, 1).len(), 3);
        assert_eq!(retained(&history, 3).len(), 3);
        assert_eq!(retained(&history, 4).len(), 2);
        assert_eq!(retained(&history, 6).len(), 0);
    }
}
