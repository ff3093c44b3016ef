//! The meta group's checkpoint file (`db/meta.ckpt`): its non-KV state — lease table, auth
//! state, newest compaction, alarms — as of one meta WAL index, so that recovery starts from
//! it and replays only the meta entries above that index (for their non-KV effects), and the
//! meta WAL segments it covers can be released.
//!
//! The state is written as a list of meta log payloads (`mvcc::codec`) that rebuild it when
//! applied in order to an empty state: lease grants and one lease checkpoint, the auth records,
//! a compaction, alarm activations. So the file needs no codec of its own for the state, and
//! the dump tool prints it with the rows it prints for the log. The auth revision is stored
//! apart: replaying the records would count one revision per record, not the real history.
//!
//! Layout (version 1, little endian):
//! ```text
//! magic "ferromck" format:u32 (= 1) reserved:u32 (= 0) wal_index:u64 auth_revision:u64
//! count:u64 (len:u32 payload)*count crc:u32
//! ```
//! `crc` is CRC-32 (IEEE) of every byte before it.
//!
//! Crash safety: the file is written whole to `meta.ckpt.tmp`, fsync'd, renamed over
//! `meta.ckpt`, and the directory is fsync'd. rename(2) replaces the name atomically, so after
//! a crash the name refers to the previous complete file or the new complete file, never to a
//! mix; the new one's bytes were durable before the rename was issued, and the rename itself is
//! durable once the directory fsync returned — only then may the caller act on it (release WAL
//! segments). A leftover `.tmp` from a crash is simply overwritten by the next write. A file
//! that fails its checksum was damaged after it was written: [`read`] reports it and the
//! server refuses to start, as for a corrupt WAL record.

use crate::mvcc::codec::{self, LogPayload};
use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"ferromck";
const FORMAT_VERSION: u32 = 1;
/// Magic, format, reserved, WAL index, auth revision, count.
const HEADER_BYTES: usize = 40;
const CRC_BYTES: usize = 4;

/// The meta group's non-KV state as of meta WAL index `wal_index`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MetaCheckpoint {
    /// Every meta WAL entry with an index at most this one is reflected in `records`.
    pub wal_index: u64,
    /// The auth revision the records leave (auth changes counted since the data dir began).
    pub auth_revision: u64,
    /// Payloads that rebuild the state when applied in order to an empty state.
    pub records: Vec<LogPayload>,
}

/// Why a checkpoint file cannot be used.
#[derive(Debug)]
pub enum Error {
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    Corrupt {
        path: PathBuf,
        detail: String,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { path, error } => write!(f, "{}: {error}", path.display()),
            Error::Corrupt { path, detail } => {
                write!(f, "corrupt meta checkpoint {}: {detail}", path.display())
            }
        }
    }
}

impl std::error::Error for Error {}

/// The checkpoint file of the data dir whose `db` directory is `db_dir`.
pub fn path_in(db_dir: &Path) -> PathBuf {
    db_dir.join("meta.ckpt")
}

pub fn encode(checkpoint: &MetaCheckpoint) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES + CRC_BYTES);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&checkpoint.wal_index.to_le_bytes());
    out.extend_from_slice(&checkpoint.auth_revision.to_le_bytes());
    out.extend_from_slice(&(checkpoint.records.len() as u64).to_le_bytes());
    let mut payload = Vec::new();
    for record in &checkpoint.records {
        payload.clear();
        codec::encode_into(record, &mut payload);
        let len = u32::try_from(payload.len()).expect("a meta checkpoint record under 4 GiB");
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&payload);
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Decodes a whole file; the error says what is wrong.
pub fn decode(bytes: &[u8]) -> Result<MetaCheckpoint, String> {
    if bytes.len() < HEADER_BYTES + CRC_BYTES {
        return Err(format!("{} bytes: shorter than a header", bytes.len()));
    }
    let (body, crc) = bytes.split_at(bytes.len() - CRC_BYTES);
    let stored = u32::from_le_bytes(crc.try_into().expect("4 bytes"));
    if crc32fast::hash(body) != stored {
        return Err("checksum mismatch".to_string());
    }
    if &body[..8] != MAGIC {
        return Err("not a meta checkpoint (bad magic)".to_string());
    }
    let u32_at = |at: usize| u32::from_le_bytes(body[at..at + 4].try_into().expect("4 bytes"));
    let u64_at = |at: usize| u64::from_le_bytes(body[at..at + 8].try_into().expect("8 bytes"));
    if u32_at(8) != FORMAT_VERSION || u32_at(12) != 0 {
        return Err(format!("unsupported format {}", u32_at(8)));
    }
    let (wal_index, auth_revision, count) = (u64_at(16), u64_at(24), u64_at(32));
    let mut rest = &body[HEADER_BYTES..];
    // Each record takes at least its length word: bounds what a damaged count can reserve.
    let mut records = Vec::with_capacity((count as usize).min(rest.len() / 4));
    for n in 0..count {
        let truncated = || format!("record {n} of {count} truncated");
        let len_bytes = rest.get(..4).ok_or_else(truncated)?;
        let len = u32::from_le_bytes(len_bytes.try_into().expect("4 bytes")) as usize;
        let payload = rest.get(4..4 + len).ok_or_else(truncated)?;
        records.push(codec::decode(payload).map_err(|e| format!("record {n}: {e}"))?);
        rest = &rest[4 + len..];
    }
    if !rest.is_empty() {
        return Err(format!("{} bytes after the last record", rest.len()));
    }
    Ok(MetaCheckpoint {
        wal_index,
        auth_revision,
        records,
    })
}

/// Reads the checkpoint at `path`; `None` when there is none (a data dir that never wrote
/// one: its meta WAL holds everything).
pub fn read(path: &Path) -> Result<Option<MetaCheckpoint>, Error> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => {
            return Err(Error::Io {
                path: path.to_path_buf(),
                error,
            })
        }
    };
    decode(&bytes).map(Some).map_err(|detail| Error::Corrupt {
        path: path.to_path_buf(),
        detail,
    })
}

/// Replaces the file at `path` with `checkpoint`, atomically and durably (see the module
/// documentation); returns the file's size. Blocking: call it off the executors.
pub fn write(path: &Path, checkpoint: &MetaCheckpoint) -> Result<u64, Error> {
    let io = |error| Error::Io {
        path: path.to_path_buf(),
        error,
    };
    let bytes = encode(checkpoint);
    let tmp = path.with_extension("ckpt.tmp");
    let mut file = fs::File::create(&tmp).map_err(io)?;
    file.write_all(&bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    drop(file);
    fs::rename(&tmp, path).map_err(io)?;
    let dir = path
        .parent()
        .expect("a checkpoint path names its directory");
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    Ok(bytes.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mvcc::codec::{Alarm, AuthUser, LeaseCheckpoint};

    fn sample() -> MetaCheckpoint {
        MetaCheckpoint {
            wal_index: 42,
            auth_revision: 9,
            records: vec![
                LogPayload::LeaseGrant { id: 5, ttl_s: 60 },
                LogPayload::LeaseCheckpoint {
                    checkpoints: vec![LeaseCheckpoint {
                        id: 5,
                        remaining_ms: 1234,
                    }],
                },
                LogPayload::AuthUserPut(AuthUser {
                    name: "root".into(),
                    password_hash: Some("$2b$hash".into()),
                    roles: vec!["root".into()],
                }),
                LogPayload::AuthEnable { enabled: true },
                LogPayload::Compact { rev: 17 },
                LogPayload::AlarmActivate(Alarm {
                    member_id: 3,
                    alarm: 1,
                }),
            ],
        }
    }

    #[test]
    fn round_trips_and_rejects_every_single_byte_change() {
        let checkpoint = sample();
        let bytes = encode(&checkpoint);
        assert_eq!(decode(&bytes), Ok(checkpoint));
        for at in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x40;
            assert!(decode(&damaged).is_err(), "flipped byte {at} accepted");
        }
        for len in 0..bytes.len() {
            assert!(
                decode(&bytes[..len]).is_err(),
                "truncated to {len} accepted"
            );
        }
        let empty = MetaCheckpoint::default();
        assert_eq!(decode(&encode(&empty)), Ok(empty));
    }

    #[test]
    fn write_replaces_the_file_and_read_finds_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = path_in(dir.path());
        assert!(read(&path).unwrap().is_none(), "no file: no checkpoint");
        let mut checkpoint = sample();
        write(&path, &checkpoint).unwrap();
        assert_eq!(read(&path).unwrap(), Some(checkpoint.clone()));
        checkpoint.wal_index = 43;
        checkpoint.records.truncate(1);
        let size_bytes = write(&path, &checkpoint).unwrap();
        assert_eq!(size_bytes, fs::metadata(&path).unwrap().len());
        assert_eq!(read(&path).unwrap(), Some(checkpoint));
        assert!(!path.with_extension("ckpt.tmp").exists());
        let mut bytes = fs::read(&path).unwrap();
        bytes[20] ^= 1;
        fs::write(&path, bytes).unwrap();
        assert!(matches!(read(&path), Err(Error::Corrupt { .. })));
    }
}
