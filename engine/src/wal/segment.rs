//! Segment file names and directory listing.

use std::path::{Path, PathBuf};

use super::WalError;

/// etcd's segment size: 64 MiB.
pub const DEFAULT_SEGMENT_SIZE_BYTES: u64 = 64 * 1024 * 1024;

const SEGMENT_SUFFIX: &str = ".wal";
/// Suffix of a segment being prepared; never read, removed when the writer opens.
pub(crate) const TEMP_SUFFIX: &str = ".wal.tmp";
const HEX_DIGITS: usize = 16;

/// `<seq:016x>-<first_index:016x>.wal`
pub fn segment_file_name(seq: u64, first_index: u64) -> String {
    format!("{seq:016x}-{first_index:016x}{SEGMENT_SUFFIX}")
}

/// A segment file found in the WAL directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SegmentFile {
    pub seq: u64,
    pub first_index: u64,
    pub path: PathBuf,
}

fn parse_hex(digits: &str) -> Option<u64> {
    let well_formed = digits.len() == HEX_DIGITS && digits.bytes().all(|b| b.is_ascii_hexdigit());
    well_formed
        .then(|| u64::from_str_radix(digits, 16).ok())
        .flatten()
}

/// `(seq, first_index)` of a segment file name; `None` for any other name.
pub(crate) fn parse_segment_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(SEGMENT_SUFFIX)?;
    let (seq, first_index) = stem.split_once('-')?;
    Some((parse_hex(seq)?, parse_hex(first_index)?))
}

/// Segment files of `dir` in `seq` order; other files are ignored.
pub(crate) fn list_segments(dir: &Path) -> Result<Vec<SegmentFile>, WalError> {
    let mut segments = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| WalError::io("listing", dir, e))? {
        let entry = entry.map_err(|e| WalError::io("listing", dir, e))?;
        let name = entry.file_name();
        if let Some((seq, first_index)) = name.to_str().and_then(parse_segment_name) {
            segments.push(SegmentFile {
                seq,
                first_index,
                path: entry.path(),
            });
        }
    }
    segments.sort_by_key(|segment| segment.seq);
    Ok(segments)
}

/// Leftover `*.wal.tmp` files of `dir` (a crash while a segment was being prepared).
pub(crate) fn list_temp_files(dir: &Path) -> Result<Vec<PathBuf>, WalError> {
    let mut temps = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| WalError::io("listing", dir, e))? {
        let entry = entry.map_err(|e| WalError::io("listing", dir, e))?;
        if entry
            .file_name()
            .to_str()
            .is_some_and(|name| name.ends_with(TEMP_SUFFIX))
        {
            temps.push(entry.path());
        }
    }
    Ok(temps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_sort_by_seq() {
        let name = segment_file_name(0x1a, 0x2b);
        assert_eq!(name, "000000000000001a-000000000000002b.wal");
        assert_eq!(parse_segment_name(&name), Some((0x1a, 0x2b)));
        for bad in [
            "1a-2b.wal",
            "000000000000001a-000000000000002b.wal.tmp",
            "x.wal",
            "000000000000001g-000000000000002b.wal",
        ] {
            assert_eq!(parse_segment_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn listing_skips_foreign_files() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            segment_file_name(2, 9),
            segment_file_name(1, 0),
            "notes.txt".into(),
            format!("{}.tmp", segment_file_name(3, 9)),
        ] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        let seqs: Vec<u64> = list_segments(dir.path())
            .unwrap()
            .iter()
            .map(|s| s.seq)
            .collect();
        assert_eq!(seqs, vec![1, 2]);
        assert_eq!(list_temp_files(dir.path()).unwrap().len(), 1);
    }
}
