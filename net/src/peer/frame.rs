//! Peer wire frames: a fixed 28-byte header, then the payload.
//!
//! ```text
//! offset size field
//!  0     4    payload length in bytes (u32 LE), at most the receiver's max_frame_bytes
//!  4     4    CRC-32 (IEEE, crc32fast) of bytes 8..28 of the header and the payload
//!  8     1    kind (Kind)
//!  9     1    reserved, 0
//! 10     2    core of the sender, which is also the receiving core (u16 LE)
//! 12     8    from member id (u64 LE)
//! 20     8    to member id (u64 LE)
//! ```
//!
//! Anything that does not parse (unknown kind, non-zero reserved byte, length over the
//! limit, CRC mismatch) is an error: the connection it came from is closed. Nothing here
//! panics on input bytes (`tests::random_bytes_never_panic`).

use std::fmt;

pub const HEADER_BYTES: usize = 28;
/// Version sent in the hello payload; a receiver refuses any other.
pub const PROTOCOL_VERSION: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// First frame of a connection, dialer to listener: names the dialing member, the member
    /// it means to reach and the core; payload = `PROTOCOL_VERSION` (u32 LE).
    Hello = 1,
    /// One raft envelope (`raft::multi::Envelope::bytes`).
    Raft = 2,
    /// Dialer to listener, payload = 8 opaque bytes echoed in the `Pong`.
    Ping = 3,
    Pong = 4,
    /// A call, caller to callee on the caller's outbound connection: payload = call id (u64
    /// LE, unique per calling core) then the request bytes.
    Request = 5,
    /// The answer to a `Request`, callee to caller on the same connection: payload = call id,
    /// a status byte (`CallStatus`), then the reply bytes.
    Response = 6,
    /// Listener to dialer, instead of a pong (or as the first frame of a connection): the
    /// dialing member was removed from the cluster (etcd's `410 Gone` "removed member"). The
    /// dialer stops (`PeerMesh::watch_removals`). Empty payload.
    Removed = 7,
}

impl Kind {
    fn from_byte(byte: u8) -> Option<Kind> {
        match byte {
            1 => Some(Kind::Hello),
            2 => Some(Kind::Raft),
            3 => Some(Kind::Ping),
            4 => Some(Kind::Pong),
            5 => Some(Kind::Request),
            6 => Some(Kind::Response),
            7 => Some(Kind::Removed),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub payload_bytes: u32,
    pub crc: u32,
    pub kind: Kind,
    pub core: u16,
    pub from: u64,
    pub to: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub core: u16,
    pub from: u64,
    pub to: u64,
    pub payload: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameError {
    UnknownKind(u8),
    Reserved(u8),
    TooLarge {
        payload_bytes: u64,
        max_bytes: usize,
    },
    Crc {
        expected: u32,
        actual: u32,
    },
    /// A well-formed frame that is wrong where it arrived (bad hello, wrong member or core,
    /// a kind the connection's direction does not carry).
    Unexpected(String),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::UnknownKind(k) => write!(f, "unknown frame kind {k}"),
            FrameError::Reserved(b) => write!(f, "reserved header byte is {b}, not 0"),
            FrameError::TooLarge {
                payload_bytes,
                max_bytes,
            } => write!(
                f,
                "frame of {payload_bytes} bytes over the {max_bytes}-byte limit"
            ),
            FrameError::Crc { expected, actual } => {
                write!(f, "frame CRC {actual:#010x}, header says {expected:#010x}")
            }
            FrameError::Unexpected(what) => write!(f, "unexpected frame: {what}"),
        }
    }
}

impl std::error::Error for FrameError {}

impl From<FrameError> for std::io::Error {
    fn from(e: FrameError) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    }
}

/// The CRC of a frame: header bytes after the CRC field, then the payload.
fn frame_crc(header_tail: &[u8], payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(header_tail);
    hasher.update(payload);
    hasher.finalize()
}

/// Appends one frame to `out`. The caller checks the payload against the limit
/// (`PeerCore::send` refuses larger ones); a payload over `u32::MAX` is a bug.
pub fn encode(out: &mut Vec<u8>, kind: Kind, core: u16, from: u64, to: u64, payload: &[u8]) {
    let payload_bytes = u32::try_from(payload.len()).expect("peer frame payload over 4 GiB");
    let start = out.len();
    out.extend_from_slice(&payload_bytes.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.push(kind as u8);
    out.push(0);
    out.extend_from_slice(&core.to_le_bytes());
    out.extend_from_slice(&from.to_le_bytes());
    out.extend_from_slice(&to.to_le_bytes());
    let crc = frame_crc(&out[start + 8..start + HEADER_BYTES], payload);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(payload);
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

/// Parses a header; the length is checked against `max_frame_bytes` before anything is
/// allocated for the payload.
pub fn parse_header(
    bytes: &[u8; HEADER_BYTES],
    max_frame_bytes: usize,
) -> Result<Header, FrameError> {
    let payload_bytes = u32_at(bytes, 0);
    if payload_bytes as u64 > max_frame_bytes as u64 {
        return Err(FrameError::TooLarge {
            payload_bytes: payload_bytes.into(),
            max_bytes: max_frame_bytes,
        });
    }
    let kind = Kind::from_byte(bytes[8]).ok_or(FrameError::UnknownKind(bytes[8]))?;
    if bytes[9] != 0 {
        return Err(FrameError::Reserved(bytes[9]));
    }
    Ok(Header {
        payload_bytes,
        crc: u32_at(bytes, 4),
        kind,
        core: u16_at(bytes, 10),
        from: u64_at(bytes, 12),
        to: u64_at(bytes, 20),
    })
}

/// Checks the payload against the header's CRC and builds the frame.
pub fn finish(
    header: &Header,
    header_bytes: &[u8; HEADER_BYTES],
    payload: Vec<u8>,
) -> Result<Frame, FrameError> {
    assert_eq!(payload.len(), header.payload_bytes as usize);
    let actual = frame_crc(&header_bytes[8..], &payload);
    if actual != header.crc {
        return Err(FrameError::Crc {
            expected: header.crc,
            actual,
        });
    }
    Ok(Frame {
        kind: header.kind,
        core: header.core,
        from: header.from,
        to: header.to,
        payload,
    })
}

/// Decodes the first frame in `bytes`: `Ok(None)` if more bytes are needed, else the frame
/// and how many bytes it used.
pub fn decode(bytes: &[u8], max_frame_bytes: usize) -> Result<Option<(Frame, usize)>, FrameError> {
    let Some(header_bytes) = bytes.first_chunk::<HEADER_BYTES>() else {
        return Ok(None);
    };
    let header = parse_header(header_bytes, max_frame_bytes)?;
    let end = HEADER_BYTES + header.payload_bytes as usize;
    let Some(payload) = bytes.get(HEADER_BYTES..end) else {
        return Ok(None);
    };
    let frame = finish(&header, header_bytes, payload.to_vec())?;
    Ok(Some((frame, end)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    const MAX: usize = 1024;

    fn frame(kind: Kind, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode(&mut out, kind, 3, 0xA, 0xB, payload);
        out
    }

    #[test]
    fn round_trip_and_partial_input() {
        let mut bytes = frame(Kind::Raft, b"hello");
        bytes.extend(frame(Kind::Ping, &7u64.to_le_bytes()));
        for cut in 0..HEADER_BYTES + 5 {
            assert_eq!(decode(&bytes[..cut], MAX), Ok(None), "cut at {cut}");
        }
        let (first, used) = decode(&bytes, MAX).unwrap().unwrap();
        assert_eq!(
            first,
            Frame {
                kind: Kind::Raft,
                core: 3,
                from: 0xA,
                to: 0xB,
                payload: b"hello".to_vec()
            }
        );
        let (second, rest) = decode(&bytes[used..], MAX).unwrap().unwrap();
        assert_eq!(second.kind, Kind::Ping);
        assert_eq!(used + rest, bytes.len());
    }

    #[test]
    fn every_flipped_bit_is_refused_or_not_yet_complete() {
        let bytes = frame(Kind::Raft, b"payload bytes");
        for bit in 0..bytes.len() * 8 {
            let mut bad = bytes.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            match decode(&bad, MAX) {
                Err(_) => {}
                // A flipped length bit that asks for more bytes than there are.
                Ok(None) => assert!(bit < 32, "bit {bit}"),
                Ok(Some((f, _))) => panic!("bit {bit} flipped, still decoded {f:?}"),
            }
        }
    }

    #[test]
    fn over_the_limit_is_refused_from_the_header_alone() {
        let bytes = frame(Kind::Raft, &[0; MAX + 1]);
        assert_eq!(
            decode(&bytes[..HEADER_BYTES], MAX),
            Err(FrameError::TooLarge {
                payload_bytes: MAX as u64 + 1,
                max_bytes: MAX
            })
        );
        assert!(decode(&frame(Kind::Raft, &[0; MAX]), MAX)
            .unwrap()
            .is_some());
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        let mut decoded = 0;
        for round in 0..20_000 {
            let len = rng.gen_range(0..200);
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            // Half the rounds start from a valid header so the later checks are reached.
            if round % 2 == 0 && len >= HEADER_BYTES {
                let valid = frame(Kind::Raft, &bytes[HEADER_BYTES..]);
                // Never the whole header: its last bytes stay random, so the CRC fails.
                let keep = rng.gen_range(0..HEADER_BYTES - 4);
                bytes[..keep].copy_from_slice(&valid[..keep]);
            }
            if let Ok(Some((_, used))) = decode(&bytes, MAX) {
                assert!(used <= bytes.len());
                decoded += 1;
            }
        }
        // Random bytes essentially never carry a valid CRC.
        assert!(decoded < 5, "{decoded} random inputs decoded");
    }
}
