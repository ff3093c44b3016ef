//! The data directory and start-up recovery.
//!
//! Layout of `--data-dir`:
//! ```text
//! member.conf          format, shard count, cluster id, member id, and the initial members
//!                      (id, peer URLs, name; etcd's ids) (written once, atomically)
//! db/shard-000.db ...  one checkpoint file (B+tree) per shard: its MVCC history up to the
//!                      checkpoint's covered revision, and the WAL index it covers
//! wal/shard-000/ ...   one WAL per shard: entries for writes confined to that shard; segments
//!                      a checkpoint covers are released
//! db/meta.ckpt         the meta group's checkpoint: leases, auth, compaction, alarms as of a
//!                      meta WAL index (`engine::meta_checkpoint`; absent until the first)
//! wal/meta/            the meta group's WAL: cross-shard writes, compactions, leases, auth,
//!                      alarms; segments released under `meta_checkpoint.rs`'s rule
//! ```
//! Recovery loads each shard's checkpoint, then replays (`engine::replay`) the shard's own WAL
//! entries merged by revision with the meta entries that touch it, each only above that
//! shard's covered revision, then applies the newest compaction where a store is behind it.
//! The meta state (lease table, auth, compaction, alarms) is the meta checkpoint's plus the
//! non-KV effects of the meta entries above its index; without a checkpoint file (an old data
//! dir, or one a restore wrote as meta log records) the whole meta log. A torn tail is cut by
//! the WAL reader; any other corruption stops start-up with the file and offset.

use super::meta_checkpoint::{kv_changes, note_touched, LoggedLease, MetaState};
use crate::lease::{ttl, LeaseConfig, Leases};
use crate::members::{self, ClusterState, InitialMember, MemberEntry};
use ferrocd_engine::checkpoint::Checkpointer;
use ferrocd_engine::meta_checkpoint;
use ferrocd_engine::mvcc::codec::{decode, LogPayload};
use ferrocd_engine::mvcc::Store;
use ferrocd_engine::replay::{Origin, Replay};
use ferrocd_engine::wal::{read_dir, RecordKind, Recovered as WalRecovered};
use ferrocd_raft::storage::{Entry, EntryKind, SnapshotMeta};
use ferrocd_raft::wal_store::committed_entries;
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

const CONF_FILE: &str = "member.conf";
const DB_DIR: &str = "db";
/// member.conf with the initial membership (`member=` lines).
const FORMAT_VERSION: u32 = 2;
/// member.conf before the membership was recorded: identity only.
const FORMAT_WITHOUT_MEMBERS: u32 = 1;

/// Identity recorded in the data dir when it is created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    pub shards: usize,
    pub cluster_id: u64,
    pub member_id: u64,
}

/// The identity and membership file.
pub fn conf_path(data_dir: &Path) -> PathBuf {
    data_dir.join(CONF_FILE)
}

pub fn shard_wal_dir(data_dir: &Path, shard: usize) -> PathBuf {
    data_dir.join("wal").join(format!("shard-{shard:03}"))
}

/// The meta group's checkpoint file (`engine::meta_checkpoint`).
pub fn meta_checkpoint_path(data_dir: &Path) -> PathBuf {
    meta_checkpoint::path_in(&data_dir.join(DB_DIR))
}

/// Shard `shard`'s checkpoint file (`engine::checkpoint`).
pub fn shard_db_path(data_dir: &Path, shard: usize) -> PathBuf {
    data_dir.join(DB_DIR).join(format!("shard-{shard:03}.db"))
}

pub fn meta_wal_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("wal").join("meta")
}

/// How a new data dir is bootstrapped: etcd's `--name`, `--initial-cluster`,
/// `--initial-cluster-state`, `--initial-cluster-token` and `--initial-advertise-peer-urls`.
/// An existing data dir ignores them, as etcd does.
#[derive(Clone, Debug)]
pub struct Bootstrap {
    pub name: String,
    pub initial_cluster: Vec<InitialMember>,
    pub state: ClusterState,
    pub token: String,
    pub advertise_peer_urls: Vec<String>,
}

impl Bootstrap {
    /// etcd's checks of the flags for a new member.
    pub fn verify(&self) -> Result<(), String> {
        // A joining member's data dir is made by the join, which asks the running members
        // first (`members::join`, before this is reached); it never bootstraps a cluster.
        if self.state == ClusterState::Existing {
            return Err("--initial-cluster-state existing: no data dir was made by joining".into());
        }
        members::verify_bootstrap(&self.name, &self.advertise_peer_urls, &self.initial_cluster)
    }

    /// The initial members with etcd's ids, by id.
    fn members(&self) -> Vec<MemberEntry> {
        let mut members: Vec<MemberEntry> = self
            .initial_cluster
            .iter()
            .map(|m| MemberEntry {
                id: member_id(&m.peer_urls, &self.token),
                name: m.name.clone(),
                peer_urls: m.peer_urls.clone(),
                client_urls: Vec::new(),
                is_learner: false,
            })
            .collect();
        members.sort_by_key(|m| m.id);
        members
    }
}

/// etcd's `computeMemberId` (`membership.NewMember` without a time): the first 8 bytes, big
/// endian, of SHA-1 over the sorted peer URLs concatenated, then the cluster token.
pub fn member_id(peer_urls: &[String], token: &str) -> u64 {
    let mut urls: Vec<&str> = peer_urls.iter().map(String::as_str).collect();
    urls.sort_unstable();
    let mut context = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    for url in urls {
        context.update(url.as_bytes());
    }
    context.update(token.as_bytes());
    first_u64(context.finish().as_ref())
}

/// etcd's `RaftCluster.genID`: SHA-1 over the sorted member ids, 8 bytes big endian each.
pub fn cluster_id(member_ids: &[u64]) -> u64 {
    let mut ids = member_ids.to_vec();
    ids.sort_unstable();
    let bytes: Vec<u8> = ids.iter().flat_map(|id| id.to_be_bytes()).collect();
    first_u64(ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &bytes).as_ref())
}

fn first_u64(digest: &[u8]) -> u64 {
    u64::from_be_bytes(digest[..8].try_into().expect("SHA-1 has 20 bytes"))
}

/// Opens the identity and initial membership of an existing data dir, or creates them for
/// `shards` shards from `bootstrap` (checked first). A data dir created with another shard
/// count is refused: keys are placed by shard. A data dir written before the membership was
/// recorded (format 1) gets it from `bootstrap`'s name and advertised peer URLs, once.
pub fn open_identity(
    data_dir: &Path,
    shards: usize,
    bootstrap: &Bootstrap,
) -> Result<(Identity, Vec<MemberEntry>), String> {
    let conf = data_dir.join(CONF_FILE);
    if conf.exists() {
        let (identity, members) = read_conf(&conf)?;
        if identity.shards != shards {
            return Err(format!(
                "data dir {} was created with --shards {}; it cannot be opened with --shards {shards}",
                data_dir.display(),
                identity.shards
            ));
        }
        if let Some(members) = members {
            return Ok((identity, members));
        }
        let members = vec![MemberEntry {
            id: identity.member_id,
            name: bootstrap.name.clone(),
            peer_urls: bootstrap.advertise_peer_urls.clone(),
            client_urls: Vec::new(),
            is_learner: false,
        }];
        write_conf(data_dir, &identity, &members, false)
            .map_err(|e| format!("cannot write {}: {e}", conf.display()))?;
        return Ok((identity, members));
    }
    bootstrap.verify()?;
    fs::create_dir_all(data_dir)
        .map_err(|e| format!("cannot create data dir {}: {e}", data_dir.display()))?;
    let members = bootstrap.members();
    let ids: Vec<u64> = members.iter().map(|m| m.id).collect();
    let local = members
        .iter()
        .find(|m| m.name == bootstrap.name)
        .expect("verify found the local member");
    let identity = Identity {
        shards,
        cluster_id: cluster_id(&ids),
        member_id: local.id,
    };
    write_conf(data_dir, &identity, &members, false)
        .map_err(|e| format!("cannot write {}: {e}", conf.display()))?;
    Ok((identity, members))
}

/// Creates the data dir of a member joining a running cluster (`--initial-cluster-state
/// existing`, `crate::members::join`): its identity, and the cluster's initial membership as
/// a running member told it (the Raft log's bootstrap point, the same on every member).
pub fn create_joined(
    data_dir: &Path,
    identity: &Identity,
    initial: &[MemberEntry],
) -> Result<(), String> {
    fs::create_dir_all(data_dir)
        .map_err(|e| format!("cannot create data dir {}: {e}", data_dir.display()))?;
    write_conf(data_dir, identity, initial, true)
        .map_err(|e| format!("cannot write {}: {e}", data_dir.join(CONF_FILE).display()))
}

/// Whether `data_dir` holds a member already (its identity file).
pub fn has_identity(data_dir: &Path) -> bool {
    data_dir.join(CONF_FILE).exists()
}

/// The identity, and the initial membership when the file records it (format 2).
fn read_conf(conf: &Path) -> Result<(Identity, Option<Vec<MemberEntry>>), String> {
    let text =
        fs::read_to_string(conf).map_err(|e| format!("cannot read {}: {e}", conf.display()))?;
    let values = |name: &'static str| {
        text.lines().filter_map(move |line| {
            line.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix('='))
        })
    };
    let field = |name: &'static str| -> Result<&str, String> {
        values(name)
            .next()
            .ok_or_else(|| format!("{}: missing `{name}`", conf.display()))
    };
    let bad = |name: &str| format!("{}: malformed `{name}`", conf.display());
    let hex = |name: &'static str| -> Result<u64, String> {
        u64::from_str_radix(field(name)?, 16).map_err(|_| bad(name))
    };
    let format: u32 = field("format")?.parse().map_err(|_| bad("format"))?;
    if format != FORMAT_VERSION && format != FORMAT_WITHOUT_MEMBERS {
        return Err(format!("{}: unsupported format {format}", conf.display()));
    }
    let identity = Identity {
        shards: field("shards")?.parse().map_err(|_| bad("shards"))?,
        cluster_id: hex("cluster_id")?,
        member_id: hex("member_id")?,
    };
    if format == FORMAT_WITHOUT_MEMBERS {
        return Ok((identity, None));
    }
    let members = values("member")
        .map(|line| parse_member_line(line).ok_or_else(|| bad("member")))
        .collect::<Result<Vec<_>, _>>()?;
    // A member that joined later is not among the initial members (the log's bootstrap point).
    let joined = values("joined").next() == Some("1");
    if !joined && !members.iter().any(|m| m.id == identity.member_id) {
        return Err(format!(
            "{}: member {:016x} is not among its members",
            conf.display(),
            identity.member_id
        ));
    }
    Ok((identity, Some(members)))
}

/// `<id hex> <peer url>,<peer url>... <name>` (the name last: it may hold spaces).
fn parse_member_line(line: &str) -> Option<MemberEntry> {
    let mut parts = line.splitn(3, ' ');
    let id = u64::from_str_radix(parts.next()?, 16).ok()?;
    let peer_urls = parts.next()?.split(',').map(str::to_string).collect();
    Some(MemberEntry {
        id,
        peer_urls,
        name: parts.next()?.to_string(),
        client_urls: Vec::new(),
        is_learner: false,
    })
}

/// Writes the identity and membership to a temporary file, syncs it, renames it into place,
/// syncs the dir.
fn write_conf(
    data_dir: &Path,
    id: &Identity,
    members: &[MemberEntry],
    joined: bool,
) -> std::io::Result<()> {
    let mut text = format!(
        "format={FORMAT_VERSION}\nshards={}\ncluster_id={:016x}\nmember_id={:016x}\n",
        id.shards, id.cluster_id, id.member_id
    );
    if joined {
        text += "joined=1\n";
    }
    for member in members {
        // One line per member: a URL holds no space or comma, a name no line break.
        if member.name.contains('\n') {
            return Err(std::io::Error::other("a member name holds a line break"));
        }
        let urls = member.peer_urls.join(",");
        text += &format!("member={:016x} {urls} {}\n", member.id, member.name);
    }
    replace_file(data_dir, CONF_FILE, &text)
}

/// Replaces `data_dir/name` by `text` durably: a temporary file, synced, renamed into place,
/// the dir synced, so a crash leaves the old file or the new one.
pub fn replace_file(data_dir: &Path, name: &str, text: &str) -> std::io::Result<()> {
    let tmp = data_dir.join(format!("{name}.tmp"));
    let mut file = fs::File::create(&tmp)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    fs::rename(&tmp, data_dir.join(name))?;
    sync_dir(data_dir)
}

/// Makes a directory's entries (files created, renamed or removed in it) durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// The state rebuilt from the checkpoints and the logs.
pub struct Recovered {
    pub stores: Vec<Store>,
    /// Each shard's checkpoint writer, positioned after what it loaded.
    pub checkpointers: Vec<Checkpointer>,
    /// The highest revision in any checkpoint or log (1 for an empty store, as etcd).
    pub current_rev: i64,
    pub compacted_rev: i64,
    /// The next entry index of each shard's WAL, then the meta WAL's.
    pub next_index: Vec<u64>,
    /// What was read from each shard's WAL, then the meta WAL's: the writers open with it
    /// instead of reading the logs again.
    pub wals: Vec<WalRecovered>,
    /// Live leases with their attached keys.
    pub leases: Leases,
    /// The meta log's non-KV state: leases as logged, auth, compaction, alarms.
    pub meta_state: MetaState,
    /// Per shard: the highest revision of a meta entry still in the meta log touching it.
    pub meta_touched: Vec<i64>,
    /// The meta WAL index the meta checkpoint covers (0: no checkpoint).
    pub meta_checkpoint_index: u64,
    /// The committed membership changes still in the meta log, in order (a cluster member).
    pub membership_changes: Vec<Entry>,
}

/// One log's entries with their indexes.
struct LogContents {
    payloads: Vec<(u64, LogPayload)>,
    /// A Raft log's committed membership changes, in order.
    membership: Vec<Entry>,
    next_index: u64,
    wal: WalRecovered,
}

/// Reads a log's records, cutting a torn tail (logged).
fn read_records(dir: &Path) -> Result<WalRecovered, String> {
    fs::create_dir_all(dir).map_err(|e| format!("cannot create WAL dir {}: {e}", dir.display()))?;
    let recovered = read_dir(dir).map_err(|e| format!("recovering WAL {}: {e}", dir.display()))?;
    if let Some(torn) = &recovered.torn_tail {
        crate::warn!(
            "cut a torn WAL tail",
            file = torn.file.display().to_string(),
            offset = torn.offset,
            detail = torn.detail.as_str(),
        );
    }
    Ok(recovered)
}

/// A log written by a single member: every entry is committed.
fn read_log(dir: &Path) -> Result<LogContents, String> {
    let wal = read_records(dir)?;
    let entries = wal.records.iter().filter(|r| r.kind == RecordKind::Entry);
    let payloads = decode_entries(dir, entries.map(|r| (r.index, r.data.as_slice())))?;
    let next_index = payloads.last().map_or(1, |(index, _)| index + 1);
    Ok(LogContents {
        payloads,
        membership: Vec::new(),
        next_index,
        wal,
    })
}

/// A Raft log (a member of a cluster): the entries committed as of its last hard state, as
/// `WalLogStore` resolves them (a later leader's entry replaces an earlier one at its index).
/// `initial` is the group's bootstrap point (see `ferrocd_raft::wal_store`).
fn read_raft_log(dir: &Path, initial: SnapshotMeta) -> Result<LogContents, String> {
    let wal = read_records(dir)?;
    let (base, entries) = committed_entries(&wal.records, initial)
        .map_err(|e| format!("recovering WAL {}: {e}", dir.display()))?;
    let next_index = entries.last().map_or(base.index, |e| e.index) + 1;
    // A new leader's empty entry and membership changes carry no payload of ours.
    let ours = entries
        .iter()
        .filter(|e| e.kind == EntryKind::Normal && !e.data.is_empty());
    let payloads = decode_entries(dir, ours.map(|e| (e.index, e.data.as_slice())))?;
    let membership = entries.iter().filter(|e| e.kind == EntryKind::ConfChange);
    Ok(LogContents {
        payloads,
        membership: membership.cloned().collect(),
        next_index,
        wal,
    })
}

fn decode_entries<'a>(
    dir: &Path,
    entries: impl Iterator<Item = (u64, &'a [u8])>,
) -> Result<Vec<(u64, LogPayload)>, String> {
    entries
        .map(|(index, data)| {
            let payload = decode(data).map_err(|e| {
                format!("WAL {}: entry {index} does not decode: {e}", dir.display())
            })?;
            Ok((index, payload))
        })
        .collect()
}

/// Opens (creating when missing) every shard's checkpoint file and loads its store.
fn open_checkpoints(data_dir: &Path, shards: usize) -> Result<Vec<(Checkpointer, Store)>, String> {
    let db_dir = data_dir.join(DB_DIR);
    if !db_dir.exists() {
        fs::create_dir_all(&db_dir)
            .and_then(|()| sync_dir(data_dir))
            .map_err(|e| format!("cannot create {}: {e}", db_dir.display()))?;
    }
    (0..shards)
        .map(|shard| {
            let path = shard_db_path(data_dir, shard);
            Checkpointer::open(&path)
                .map_err(|e| format!("cannot load checkpoint {}: {e}", path.display()))
        })
        .collect()
}

/// Recovers a data dir. `raft_initial` is `Some` for a member of a cluster: the meta log is
/// then a Raft log starting at that bootstrap point, of which only committed entries apply.
pub fn recover(
    data_dir: &Path,
    shards: usize,
    lease_config: LeaseConfig,
    raft_initial: Option<SnapshotMeta>,
) -> Result<Recovered, String> {
    let (checkpointers, stores): (Vec<Checkpointer>, Vec<Store>) =
        open_checkpoints(data_dir, shards)?.into_iter().unzip();
    let metas = checkpointers.iter().map(Checkpointer::meta);
    let mut replay = Replay::new(stores.into_iter().zip(metas).collect());
    let clustered = raft_initial.is_some();
    let meta = match raft_initial {
        None => read_log(&meta_wal_dir(data_dir))?,
        Some(initial) => read_raft_log(&meta_wal_dir(data_dir), initial)?,
    };
    let mut next_index = Vec::with_capacity(shards + 1);
    let mut wals = Vec::with_capacity(shards + 1);
    for (shard, checkpointer) in checkpointers.iter().enumerate() {
        let log = read_log(&shard_wal_dir(data_dir, shard))?;
        wals.push(log.wal);
        for (index, payload) in log.payloads {
            match payload {
                LogPayload::Changes { main, changes } => {
                    replay.shard_entry(shard, main, changes, Origin::Shard { shard, index })
                }
                other => {
                    return Err(format!(
                        "shard {shard} WAL holds a meta entry: {}",
                        payload_kind(&other)
                    ))
                }
            }
        }
        // Released segments may have taken every entry: the checkpoint knows the last index.
        next_index.push(log.next_index.max(checkpointer.meta().wal_index + 1));
    }
    let checkpoint_path = meta_checkpoint_path(data_dir);
    let (mut meta_state, checkpoint_index) = match meta_checkpoint::read(&checkpoint_path) {
        Ok(Some(checkpoint)) => (
            MetaState::from_checkpoint(&checkpoint)
                .map_err(|e| format!("{}: {e}", checkpoint_path.display()))?,
            checkpoint.wal_index,
        ),
        Ok(None) => (MetaState::default(), 0),
        Err(e) => return Err(format!("cannot load meta checkpoint: {e}")),
    };
    replay.compaction(meta_state.compacted_rev);
    // Released segments may have taken every entry: the checkpoint knows the last index.
    next_index.push(meta.next_index.max(checkpoint_index + 1));
    wals.push(meta.wal);
    let mut meta_touched = vec![0; shards];
    // Every shard holds every change up to its checkpoint's covered revision.
    let covered_everywhere = checkpointers
        .iter()
        .map(|c| c.meta().covered_revision)
        .min();
    let mut last_logged_rev = 0;
    let membership_changes = meta.membership;
    for (index, payload) in meta.payloads {
        // Non-KV effects from above the checkpoint only: it holds those of the others.
        if index > checkpoint_index {
            meta_state
                .apply(&payload)
                .map_err(|e| format!("meta WAL entry {index}: {e}"))?;
        }
        // KV changes from every entry still in the log: the replay keeps those above each
        // shard's covered revision (the segment was not released, so a shard may lack them).
        if let Some((main, changes)) = kv_changes(&payload) {
            note_touched(&mut meta_touched, main, changes);
            last_logged_rev = last_logged_rev.max(main);
        }
        match payload {
            LogPayload::Changes { main, changes }
            | LogPayload::LeaseRevoke { main, changes, .. }
                if main > 0 =>
            {
                replay.meta_entry(main, changes, Origin::Meta { index })
            }
            LogPayload::Compact { rev } => replay.compaction(rev),
            _ => {}
        }
    }
    let replayed = replay.finish(|problem| Err(format!("cannot replay {problem}")))?;
    let leases = rebuild_leases(&meta_state.leases, &replayed.stores, lease_config);
    // A member of a cluster starts visible at a revision every shard is complete to: the last
    // committed entry replayed, or what every checkpoint covers. A shard's checkpoint may hold
    // later revisions (it can be ahead of the durable commit index); those entries come out
    // committed again and are followed, and only then become visible.
    let current_rev = match clustered {
        false => replayed.current_revision,
        true => last_logged_rev.max(covered_everywhere.unwrap_or(0)).max(1),
    };
    Ok(Recovered {
        stores: replayed.stores,
        checkpointers,
        current_rev,
        compacted_rev: replayed.compacted_revision,
        next_index,
        wals,
        leases,
        meta_state,
        meta_touched,
        meta_checkpoint_index: checkpoint_index,
        membership_changes,
    })
}

fn payload_kind(payload: &LogPayload) -> &'static str {
    match payload {
        LogPayload::Changes { .. } => "changes",
        LogPayload::Compact { .. } => "compaction",
        LogPayload::LeaseGrant { .. } => "lease grant",
        LogPayload::LeaseRevoke { .. } => "lease revoke",
        LogPayload::LeaseCheckpoint { .. } => "lease checkpoint",
        LogPayload::AuthEnable { .. }
        | LogPayload::AuthUserPut(_)
        | LogPayload::AuthUserDelete { .. }
        | LogPayload::AuthRolePut(_)
        | LogPayload::AuthRoleDelete { .. } => "auth change",
        LogPayload::AlarmActivate(_) | LogPayload::AlarmDeactivate(_) => "alarm",
        LogPayload::MemberPublish(_) => "member publish",
        LogPayload::AuthToken { .. } => "auth token",
    }
}

/// The lease table after a restart: each lease gets its checkpointed remaining TTL, or its
/// full TTL, from now (so a restart never shortens a lease), and the live keys naming it.
fn rebuild_leases(
    logged: &BTreeMap<i64, LoggedLease>,
    stores: &[Store],
    config: LeaseConfig,
) -> Leases {
    let leases = Leases::new(config);
    let now = std::time::Instant::now();
    for (&id, lease) in logged {
        let (remaining, checkpointed) = match lease.remaining_ms {
            0 => (ttl(lease.ttl_s), false),
            ms => (std::time::Duration::from_millis(ms as u64), true),
        };
        leases.insert(id, lease.ttl_s, remaining, checkpointed, now);
    }
    for store in stores {
        for kv in store
            .range_iter(b"", b"\0", Store::LATEST)
            .filter(|kv| kv.lease != 0)
        {
            // Cannot happen with logs this server wrote (a revoke deletes its keys in the
            // same entry); keep the key rather than refuse to start.
            if !leases.attach(kv.key, kv.lease) {
                crate::warn!(
                    "a key names a lease which does not exist",
                    key = String::from_utf8_lossy(kv.key),
                    lease_id = format!("{:x}", kv.lease),
                );
            }
        }
    }
    leases
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::members::parse_initial_cluster;

    fn bootstrap(name: &str, initial_cluster: &str, peer_url: &str) -> Bootstrap {
        Bootstrap {
            name: name.into(),
            initial_cluster: parse_initial_cluster(initial_cluster).unwrap(),
            state: ClusterState::New,
            token: "etcd-cluster".into(),
            advertise_peer_urls: vec![peer_url.into()],
        }
    }

    /// The ids real etcd 3.4.23 gave for the same flags (`etcdctl member list -w json`).
    #[test]
    fn ids_are_etcds() {
        let default = bootstrap(
            "default",
            "default=http://localhost:2380",
            "http://localhost:2380",
        );
        let dir = tempfile::tempdir().unwrap();
        let (identity, members) = open_identity(dir.path(), 1, &default).unwrap();
        assert_eq!(identity.member_id, 0x8e9e05c52164694d);
        assert_eq!(identity.cluster_id, 14841639068965178418);
        assert_eq!(members.len(), 1);
        let three = "m1=http://127.0.0.1:42380,m2=http://127.0.0.1:42382,m3=http://127.0.0.1:42384";
        let m2 = bootstrap("m2", three, "http://127.0.0.1:42382");
        let dir = tempfile::tempdir().unwrap();
        let (identity, members) = open_identity(dir.path(), 1, &m2).unwrap();
        assert_eq!(identity.member_id, 38712720341031407);
        assert_eq!(identity.cluster_id, 11726722738389020898);
        let listed: Vec<(u64, &str)> = members.iter().map(|m| (m.id, m.name.as_str())).collect();
        let etcd = [
            (38712720341031407, "m2"),
            (7383792418829112008, "m1"),
            (17610005522018733673, "m3"),
        ];
        assert_eq!(listed, etcd, "etcd lists members by id");
    }

    #[test]
    fn member_conf_keeps_the_membership_and_ignores_later_flags() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = "a=http://h:1,a=http://h:2,b=http://h:3";
        let mut first = bootstrap("a", cluster, "http://h:2");
        first.advertise_peer_urls.push("http://h:1".into());
        let created = open_identity(dir.path(), 2, &first).unwrap();
        assert_eq!(created.1[0].client_urls, Vec::<String>::new());
        let other = bootstrap("z", "z=http://other:9", "http://other:9");
        let reopened = open_identity(dir.path(), 2, &other).unwrap();
        assert_eq!(reopened, created);
        let a = created.1.iter().find(|m| m.name == "a").unwrap();
        assert_eq!(a.peer_urls, ["http://h:1", "http://h:2"]);
        assert_eq!(a.id, created.0.member_id);
        assert!(open_identity(dir.path(), 3, &first)
            .unwrap_err()
            .contains("--shards 2"));
    }

    /// A data dir written before the membership was recorded opens with its ids, takes its
    /// membership from the flags once, and keeps it.
    #[test]
    fn old_member_conf_opens() {
        let dir = tempfile::tempdir().unwrap();
        let old = "format=1\nshards=1\ncluster_id=00000000000000aa\nmember_id=00000000000000bb\n";
        fs::write(dir.path().join(CONF_FILE), old).unwrap();
        let flags = bootstrap("n", "n=http://h:1", "http://h:1");
        let (identity, members) = open_identity(dir.path(), 1, &flags).unwrap();
        assert_eq!((identity.cluster_id, identity.member_id), (0xaa, 0xbb));
        assert_eq!(members.len(), 1);
        assert_eq!((members[0].id, members[0].name.as_str()), (0xbb, "n"));
        let later = bootstrap("x", "x=http://h:7", "http://h:7");
        assert_eq!(open_identity(dir.path(), 1, &later).unwrap().1, members);
    }

    #[test]
    fn a_new_data_dir_checks_the_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d");
        let missing = bootstrap("x", "a=http://h:1", "http://h:1");
        let error = open_identity(&path, 1, &missing).unwrap_err();
        assert!(error.contains("couldn't find local name"), "{error}");
        let mut existing = bootstrap("a", "a=http://h:1", "http://h:1");
        existing.state = ClusterState::Existing;
        let error = open_identity(&path, 1, &existing).unwrap_err();
        assert!(error.contains("made by joining"), "{error}");
        assert!(!path.join(CONF_FILE).exists(), "nothing written");
    }
}
