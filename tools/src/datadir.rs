//! The data directory layout written by the server (see `net/src/node/recovery.rs`; the
//! checkpoint files `db/shard-NNN.db` are read by `db.rs`):
//!
//! ```text
//! member.conf          format=1, shards=N, cluster_id=<hex>, member_id=<hex>
//! wal/shard-000/ ...   one WAL per shard (single-shard writes)
//! wal/meta/            the meta group's WAL (cross-shard writes and compactions)
//! ```

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

const CONF_FILE: &str = "member.conf";
const WAL_DIR: &str = "wal";
const META_DIR: &str = "meta";
const SHARD_DIR_PREFIX: &str = "shard-";
const SUPPORTED_FORMAT: u32 = 1;

/// The Raft group a WAL belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Group {
    Shard(usize),
    Meta,
}

impl fmt::Display for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Group::Shard(n) => write!(f, "{n}"),
            Group::Meta => f.write_str(META_DIR),
        }
    }
}

impl FromStr for Group {
    type Err = String;

    /// `meta` or a shard number.
    fn from_str(text: &str) -> Result<Group, String> {
        if text == META_DIR {
            return Ok(Group::Meta);
        }
        text.parse()
            .map(Group::Shard)
            .map_err(|_| format!("`{text}` is neither a shard number nor `meta`"))
    }
}

impl Group {
    /// The group whose WAL lives in a directory of this name (`shard-007`, `meta`).
    pub fn from_dir_name(name: &str) -> Option<Group> {
        if name == META_DIR {
            return Some(Group::Meta);
        }
        let digits = name.strip_prefix(SHARD_DIR_PREFIX)?;
        let all_digits = !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit());
        all_digits.then(|| digits.parse().ok().map(Group::Shard))?
    }
}

/// The contents of `member.conf`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemberConf {
    pub shards: usize,
    pub cluster_id: u64,
    pub member_id: u64,
}

/// Reads `<data_dir>/member.conf`; `Ok(None)` when there is none.
pub fn read_member_conf(data_dir: &Path) -> Result<Option<MemberConf>, String> {
    let path = data_dir.join(CONF_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse_member_conf(&text)
        .map(Some)
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn parse_member_conf(text: &str) -> Result<MemberConf, String> {
    let field = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix('='))
            .ok_or_else(|| format!("missing `{name}`"))
    };
    let bad = |name: &str| format!("malformed `{name}`");
    let format: u32 = field("format")?.parse().map_err(|_| bad("format"))?;
    if format != SUPPORTED_FORMAT {
        return Err(format!("unsupported format {format}"));
    }
    let hex_id = |name: &str| u64::from_str_radix(field(name)?, 16).map_err(|_| bad(name));
    Ok(MemberConf {
        shards: field("shards")?.parse().map_err(|_| bad("shards"))?,
        cluster_id: hex_id("cluster_id")?,
        member_id: hex_id("member_id")?,
    })
}

/// One WAL to read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalSource {
    /// `None` when the directory name says nothing (a WAL dir copied elsewhere).
    pub group: Option<Group>,
    pub dir: PathBuf,
    /// Only this segment file of `dir` is shown (the tool was given a segment file).
    pub only_file: Option<PathBuf>,
}

impl WalSource {
    /// The group as printed: its number, `meta`, or `?` when unknown.
    pub fn label(&self) -> String {
        self.group
            .map_or_else(|| "?".to_string(), |g| g.to_string())
    }
}

/// What a path given on the command line designates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub conf: Option<MemberConf>,
    pub wals: Vec<WalSource>,
}

/// Resolves a data dir, a WAL dir or a segment file. A directory is a data dir when it holds
/// `member.conf` or a `wal/` directory, otherwise a WAL dir; a WAL dir's data dir (two levels
/// up) supplies `member.conf` when it has one.
pub fn resolve(path: &Path) -> Result<Target, String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    if meta.is_file() {
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut target = wal_dir_target(dir)?;
        target.wals[0].only_file = Some(path.to_path_buf());
        return Ok(target);
    }
    if path.join(CONF_FILE).exists() || path.join(WAL_DIR).is_dir() {
        return Ok(Target {
            conf: read_member_conf(path)?,
            wals: data_dir_wals(path)?,
        });
    }
    wal_dir_target(path)
}

fn wal_dir_target(dir: &Path) -> Result<Target, String> {
    let name = dir.file_name().and_then(|n| n.to_str());
    let data_dir = dir.parent().and_then(Path::parent);
    Ok(Target {
        conf: data_dir.map(read_member_conf).transpose()?.flatten(),
        wals: vec![WalSource {
            group: name.and_then(Group::from_dir_name),
            dir: dir.to_path_buf(),
            only_file: None,
        }],
    })
}

/// The WALs of a data dir: every `wal/shard-N` in shard order, then `wal/meta`. A group that
/// has not written yet may have no directory; it is simply absent.
pub fn data_dir_wals(data_dir: &Path) -> Result<Vec<WalSource>, String> {
    let wal_dir = data_dir.join(WAL_DIR);
    if !wal_dir.is_dir() {
        return Ok(Vec::new());
    }
    let listing = |e: std::io::Error| format!("cannot list {}: {e}", wal_dir.display());
    let mut wals = Vec::new();
    for entry in std::fs::read_dir(&wal_dir).map_err(listing)? {
        let entry = entry.map_err(listing)?;
        let group = entry.file_name().to_str().and_then(Group::from_dir_name);
        if let (Some(group), true) = (group, entry.path().is_dir()) {
            wals.push(WalSource {
                group: Some(group),
                dir: entry.path(),
                only_file: None,
            });
        }
    }
    wals.sort_by_key(|w| w.group);
    Ok(wals)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_parse_from_arguments_and_dir_names() {
        assert_eq!("meta".parse(), Ok(Group::Meta));
        assert_eq!("3".parse(), Ok(Group::Shard(3)));
        assert!("shard".parse::<Group>().is_err());
        assert_eq!(Group::from_dir_name("shard-012"), Some(Group::Shard(12)));
        assert_eq!(Group::from_dir_name("meta"), Some(Group::Meta));
        assert_eq!(Group::from_dir_name("shard-"), None);
        assert_eq!(Group::from_dir_name("shard-1x"), None);
        assert!(Group::Shard(9) < Group::Meta, "shards list before meta");
    }

    #[test]
    fn member_conf_parses_the_servers_format() {
        let text = "format=1\nshards=4\ncluster_id=00000000000000ab\nmember_id=00000000000000cd\n";
        assert_eq!(
            parse_member_conf(text),
            Ok(MemberConf {
                shards: 4,
                cluster_id: 0xab,
                member_id: 0xcd
            })
        );
        assert!(parse_member_conf("format=2\nshards=1\n").is_err());
        assert!(parse_member_conf("format=1\nshards=x\ncluster_id=1\nmember_id=1\n").is_err());
    }
}
