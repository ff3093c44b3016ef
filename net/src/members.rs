//! The cluster's membership: the `--initial-cluster` flag as etcd reads and checks it, and the
//! member table every core reads (`Shared.members`).
//!
//! The table starts from the initial membership recorded in the data dir (`member.conf`,
//! `node/recovery.rs`): ids, names and peer URLs. Client URLs are not known then: each member
//! publishes its name and client URLs through the meta log (`LogPayload::MemberPublish`, as
//! etcd's publish request goes through Raft), and the meta group applies them here.
//!
//! Membership changes (MemberAdd, Remove, Promote, Update) are planned by the leader against
//! this table (`plan`, with etcd's checks and errors), replicated as one Raft conf-change entry
//! whose context is the member's record (`encode_record`), and applied here by every member in
//! log order (`Members::apply`). The table as of the last applied change is kept in the data
//! dir (`save_current`), because the entries that made it are compacted away from the log,
//! with the ids removed so far: as etcd, a removed id is never a member again, and peers
//! refuse a removed member's connections (`crate::peer`), which then stops.

use ferrocd_api::etcdserverpb::{Member, MemberListResponse, ResponseHeader};
use ferrocd_engine::mvcc::codec::MemberAttributes;
use ferrocd_raft::group::{MembershipChange, PeerProgress};
use prost::Message;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Mutex, RwLock};
use std::time::Duration;
use tonic::Code;

/// One member of `--initial-cluster`: a name and its peer URLs (sorted, as etcd sorts them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InitialMember {
    pub name: String,
    pub peer_urls: Vec<String>,
}

/// `--initial-cluster-state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterState {
    New,
    Existing,
}

/// etcd's URL checks (`types.NewURLs`): scheme, `host:port`, no path.
fn check_url(url: &str) -> Result<(), String> {
    let rest = ["http://", "https://", "unix://", "unixs://"]
        .iter()
        .find_map(|scheme| url.strip_prefix(scheme))
        .ok_or_else(|| format!("URL scheme must be http, https, unix, or unixs: {url}"))?;
    let (host_port, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    // Go's `net.SplitHostPort` wants a port separator outside IPv6 brackets.
    let has_port = host_port
        .rsplit_once(':')
        .is_some_and(|(_, port)| !port.contains(']'));
    if !has_port {
        return Err(format!(
            "URL address does not have the form \"host:port\": {url}"
        ));
    }
    if !path.is_empty() {
        return Err(format!("URL must not contain a path: {url}"));
    }
    Ok(())
}

/// Reads `name=url[,name=url...]` as etcd's `types.NewURLsMap`: a name may appear several
/// times (one entry per peer URL); members come sorted by name, their URLs sorted.
pub fn parse_initial_cluster(text: &str) -> Result<Vec<InitialMember>, String> {
    let mut members: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for entry in text.split(',').filter(|entry| !entry.is_empty()) {
        let (name, url) = entry.split_once('=').unwrap_or((entry, ""));
        check_url(url).map_err(|e| format!("error setting up initial cluster: {e}"))?;
        members
            .entry(name.to_string())
            .or_default()
            .push(url.to_string());
    }
    Ok(members
        .into_iter()
        .map(|(name, mut peer_urls)| {
            peer_urls.sort();
            InitialMember { name, peer_urls }
        })
        .collect())
}

/// The list as etcd prints a `URLsMap`: `name=url` pairs, by name then URL.
fn urls_map_string(members: &[InitialMember]) -> String {
    let pairs = members.iter().flat_map(|m| {
        m.peer_urls
            .iter()
            .map(move |url| format!("{}={url}", m.name))
    });
    pairs.collect::<Vec<_>>().join(",")
}

/// Go's `%q` of a string slice: `["a" "b"]`.
fn go_quoted(urls: &[String]) -> String {
    let quoted: Vec<String> = urls.iter().map(|u| format!("{u:?}")).collect();
    format!("[{}]", quoted.join(" "))
}

/// etcd's `VerifyBootstrap` for a new member (no data dir yet), with its messages: this
/// member is in the list, under exactly its advertised peer URLs, and no URL appears twice.
/// URLs are compared as written (etcd also resolves host names; we do not).
pub fn verify_bootstrap(
    name: &str,
    advertise_peer_urls: &[String],
    initial: &[InitialMember],
) -> Result<(), String> {
    let Some(local) = initial.iter().find(|m| m.name == name) else {
        return Err(format!(
            "couldn't find local name {name:?} in the initial cluster configuration"
        ));
    };
    let mut advertised = advertise_peer_urls.to_vec();
    advertised.sort();
    if advertised != local.peer_urls {
        return Err(advertise_mismatch(name, &advertised, &local.peer_urls));
    }
    let mut all: Vec<&String> = initial.iter().flat_map(|m| &m.peer_urls).collect();
    all.sort();
    if all.windows(2).any(|pair| pair[0] == pair[1]) {
        return Err(format!(
            "initial cluster {} has duplicate url",
            urls_map_string(initial)
        ));
    }
    Ok(())
}

/// etcd's `advertiseMatchesCluster` message for sorted `advertised` != sorted `listed`.
fn advertise_mismatch(name: &str, advertised: &[String], listed: &[String]) -> String {
    let reason = match advertised.iter().zip(listed).find(|(a, l)| a != l) {
        _ if advertised.len() != listed.len() => format!(
            "len({}) != len({})",
            go_quoted(advertised),
            go_quoted(listed)
        ),
        Some((a, l)) => format!("resolved urls: {a:?} != {l:?}"),
        None => unreachable!("equal lists do not mismatch"),
    };
    let joined = advertised.join(",");
    let missing: Vec<String> = listed
        .iter()
        .filter(|url| !advertised.contains(url))
        .map(|url| format!("{name}={url}"))
        .collect();
    if !missing.is_empty() {
        return format!(
            "--initial-cluster has {} but missing from --initial-advertise-peer-urls={joined} ({reason})",
            missing.join(",")
        );
    }
    let ours = InitialMember {
        name: name.to_string(),
        peer_urls: advertised.to_vec(),
    };
    let ours = urls_map_string(std::slice::from_ref(&ours));
    let extra: Vec<&String> = advertised.iter().filter(|u| !listed.contains(u)).collect();
    if !extra.is_empty() {
        let extra: Vec<&str> = extra.iter().map(|u| u.as_str()).collect();
        return format!(
            "--initial-advertise-peer-urls has {} but missing from --initial-cluster={ours}",
            extra.join(",")
        );
    }
    format!("failed to resolve {joined} to match --initial-cluster={ours} ({reason})")
}

/// One row of the member table (etcd's `membership.Member`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberEntry {
    pub id: u64,
    pub name: String,
    pub peer_urls: Vec<String>,
    /// Empty until the member has published them.
    pub client_urls: Vec<String>,
    pub is_learner: bool,
}

/// The member table, readable from any core. Written only by the meta group (publish, member
/// changes) and at start-up, so a lock is no contention.
#[derive(Debug, Default)]
pub struct Members {
    table: RwLock<Table>,
    /// Bumped (and `changed` notified) by every applied membership change: each core's peer
    /// transport follows the table (`server.rs`, `follow_members`).
    version: AtomicU64,
    changed: event_listener::Event,
}

#[derive(Debug, Default)]
struct Table {
    by_id: BTreeMap<u64, MemberEntry>,
    /// Every id removed so far, as etcd's `RaftCluster.removed`: never a member again (a
    /// MemberAdd that would make one is refused), and peers refuse its connections.
    removed: BTreeSet<u64>,
}

impl Members {
    pub fn new(entries: impl IntoIterator<Item = MemberEntry>) -> Members {
        Members::with_removed(entries, BTreeSet::new())
    }

    /// A table whose `removed` ids were removed before (`members.current`).
    pub fn with_removed(
        entries: impl IntoIterator<Item = MemberEntry>,
        removed: BTreeSet<u64>,
    ) -> Members {
        let by_id: BTreeMap<u64, MemberEntry> = entries.into_iter().map(|m| (m.id, m)).collect();
        assert!(
            by_id.keys().all(|id| !removed.contains(id)),
            "a removed id is never a member"
        );
        Members {
            table: RwLock::new(Table { by_id, removed }),
            ..Members::default()
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        self.table.read().expect("members lock")
    }

    pub fn get(&self, id: u64) -> Option<MemberEntry> {
        self.read().by_id.get(&id).cloned()
    }

    /// Applies a committed membership change: `record` is the member as the change leaves it
    /// (a removed member's last record). A known member keeps its published name and client
    /// URLs; a removed one is remembered.
    pub fn apply(&self, change: MembershipChange, record: &MemberEntry) {
        {
            let mut table = self.table.write().expect("members lock");
            match change {
                MembershipChange::Remove(id) => {
                    table.by_id.remove(&id);
                    table.removed.insert(id);
                }
                MembershipChange::AddLearner(_) | MembershipChange::Promote(_) => {
                    let member = table
                        .by_id
                        .entry(record.id)
                        .or_insert_with(|| record.clone());
                    member.peer_urls = record.peer_urls.clone();
                    member.is_learner = record.is_learner;
                }
            }
        }
        self.version.fetch_add(1, SeqCst);
        self.changed.notify(usize::MAX);
    }

    /// Counts applied changes (starts at 0); see `changed`.
    pub fn version(&self) -> u64 {
        self.version.load(SeqCst)
    }

    /// Notified after every applied change.
    pub fn changed(&self) -> &event_listener::Event {
        &self.changed
    }

    /// Every member, by id (etcd's `MembersByID` order).
    pub fn list(&self) -> Vec<MemberEntry> {
        self.read().by_id.values().cloned().collect()
    }

    /// Every id removed so far.
    pub fn removed(&self) -> BTreeSet<u64> {
        self.read().removed.clone()
    }

    pub fn is_removed(&self, id: u64) -> bool {
        self.read().removed.contains(&id)
    }

    pub fn len(&self) -> usize {
        self.read().by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes the table as of the change at log index `index` (`save_current`).
    pub fn save(&self, data_dir: &Path, index: u64) -> std::io::Result<()> {
        let table = self.read();
        let members: Vec<MemberEntry> = table.by_id.values().cloned().collect();
        save_current(data_dir, index, &members, &table.removed)
    }

    /// Applies a member's published name and client URLs; a record for a member not in the
    /// table (removed since) is ignored, as etcd ignores attributes of a removed member.
    pub fn publish(&self, attributes: &MemberAttributes) {
        let mut table = self.table.write().expect("members lock");
        if let Some(member) = table.by_id.get_mut(&attributes.member_id) {
            member.name = attributes.name.clone();
            member.client_urls = attributes.client_urls.clone();
        }
    }
}

/// What a client asks of the membership (the Cluster service's requests).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemberRequest {
    Add {
        peer_urls: Vec<String>,
        is_learner: bool,
    },
    Remove {
        id: u64,
    },
    Update {
        id: u64,
        peer_urls: Vec<String>,
    },
    Promote {
        id: u64,
    },
}

/// A membership change refused, with etcd 3.4.23's answers (read from the real server).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberError {
    NotFound,
    IdExists,
    PeerUrlExists,
    BadUrls,
    NotLearner,
    LearnerNotReady,
    TooManyLearners,
    NotEnoughStarted,
    Unhealthy,
    /// Another change is proposed and not applied yet (etcd's changes are one at a time
    /// too: its raft drops the second proposal, and the request times out).
    InProgress,
    /// This member runs alone, without Raft (no `--initial-cluster` peers).
    NotClustered,
}

impl MemberError {
    pub const ALL: [MemberError; 11] = [
        MemberError::NotFound,
        MemberError::IdExists,
        MemberError::PeerUrlExists,
        MemberError::BadUrls,
        MemberError::NotLearner,
        MemberError::LearnerNotReady,
        MemberError::TooManyLearners,
        MemberError::NotEnoughStarted,
        MemberError::Unhealthy,
        MemberError::InProgress,
        MemberError::NotClustered,
    ];

    pub fn code_and_message(self) -> (Code, &'static str) {
        use MemberError::*;
        let pre = Code::FailedPrecondition;
        match self {
            NotFound => (Code::NotFound, "etcdserver: member not found"),
            IdExists => (pre, "etcdserver: member ID already exist"),
            PeerUrlExists => (pre, "etcdserver: Peer URLs already exists"),
            BadUrls => (
                Code::InvalidArgument,
                "etcdserver: given member URLs are invalid",
            ),
            NotLearner => (pre, "etcdserver: can only promote a learner member"),
            LearnerNotReady => (
                pre,
                "etcdserver: can only promote a learner member which is in sync with leader",
            ),
            TooManyLearners => (pre, "etcdserver: too many learner members in cluster"),
            NotEnoughStarted => (
                pre,
                "etcdserver: re-configuration failed due to not enough started members",
            ),
            Unhealthy => (Code::Unavailable, "etcdserver: unhealthy cluster"),
            InProgress => (
                Code::Unavailable,
                "etcdserver: another membership change is in progress",
            ),
            NotClustered => (
                Code::FailedPrecondition,
                "etcdserver: membership changes need a member started in a cluster \
                 (--initial-cluster with several members); a single member runs without Raft",
            ),
        }
    }
}

/// etcd 3.4's `maxLearners`.
const MAX_LEARNERS: usize = 1;
/// etcd's `readyPercent`: a learner is promoted once its log is within 10% of the leader's.
const LEARNER_READY_PERCENT: u64 = 90;

/// What the leader plans a change against: the table, its view of the other members' logs,
/// its own last index and id.
pub struct LeaderView<'a> {
    pub members: &'a [MemberEntry],
    /// Ids removed so far (`Members::removed`): never members again.
    pub removed: &'a BTreeSet<u64>,
    pub progress: &'a [PeerProgress],
    pub last_index: u64,
    pub me: u64,
}

impl LeaderView<'_> {
    fn member(&self, id: u64) -> Result<&MemberEntry, MemberError> {
        self.members
            .iter()
            .find(|m| m.id == id)
            .ok_or(MemberError::NotFound)
    }

    fn voters(&self) -> impl Iterator<Item = &MemberEntry> {
        self.members.iter().filter(|m| !m.is_learner)
    }

    /// etcd's "started": the member published its name.
    fn started_voters(&self, except: Option<u64>) -> usize {
        let started = |m: &&MemberEntry| !m.name.is_empty() && Some(m.id) != except;
        self.voters().filter(started).count()
    }

    /// This member, or one the leader heard from within an election timeout.
    fn is_active(&self, id: u64) -> bool {
        id == self.me || self.progress.iter().any(|p| p.member == id && p.active)
    }

    fn active_voters(&self) -> usize {
        self.voters().filter(|m| self.is_active(m.id)).count()
    }

    /// etcd's `isConnectedFullySince` over the voters.
    fn all_voters_active(&self) -> bool {
        self.active_voters() == self.voters().count()
    }

    fn url_taken(&self, urls: &[String], except: u64) -> bool {
        let others = self.members.iter().filter(|m| m.id != except);
        others
            .flat_map(|m| &m.peer_urls)
            .any(|url| urls.contains(url))
    }
}

/// Plans `request` as etcd's leader checks it (`mayAddMember`, `mayRemoveMember`,
/// `mayPromoteMember`, `ValidateConfigurationChange`): the Raft change and the member's record
/// after it. A new member's id is etcd's: SHA-1 over its sorted peer URLs and `now_unix_s`.
pub fn plan(
    request: &MemberRequest,
    view: &LeaderView,
    now_unix_s: u64,
) -> Result<(MembershipChange, MemberEntry), MemberError> {
    match request {
        MemberRequest::Add {
            peer_urls,
            is_learner,
        } => plan_add(peer_urls, *is_learner, view, now_unix_s),
        MemberRequest::Remove { id } => {
            let member = view.member(*id)?;
            if !member.is_learner {
                check_remove_voter(*id, view)?;
            }
            Ok((MembershipChange::Remove(*id), member.clone()))
        }
        MemberRequest::Promote { id } => {
            let member = view.member(*id)?;
            if !member.is_learner {
                return Err(MemberError::NotLearner);
            }
            let matched = view.progress.iter().find(|p| p.member == *id);
            let matched = matched.map_or(0, |p| p.matched);
            if matched * 100 < view.last_index * LEARNER_READY_PERCENT {
                return Err(MemberError::LearnerNotReady);
            }
            let started = view.started_voters(None) + usize::from(!member.name.is_empty());
            if started < quorum(view.voters().count() + 1) {
                return Err(MemberError::NotEnoughStarted);
            }
            let promoted = MemberEntry {
                is_learner: false,
                ..member.clone()
            };
            Ok((MembershipChange::Promote(*id), promoted))
        }
        MemberRequest::Update { id, peer_urls } => {
            let member = view.member(*id)?;
            let peer_urls = checked_urls(peer_urls)?;
            if view.url_taken(&peer_urls, *id) {
                return Err(MemberError::PeerUrlExists);
            }
            // raft-rs has no "update": re-adding the member as what it is changes nothing there.
            let change = match member.is_learner {
                true => MembershipChange::AddLearner(*id),
                false => MembershipChange::Promote(*id),
            };
            let updated = MemberEntry {
                peer_urls,
                ..member.clone()
            };
            Ok((change, updated))
        }
    }
}

fn plan_add(
    peer_urls: &[String],
    is_learner: bool,
    view: &LeaderView,
    now_unix_s: u64,
) -> Result<(MembershipChange, MemberEntry), MemberError> {
    let peer_urls = checked_urls(peer_urls)?;
    if !is_learner && view.started_voters(None) < quorum(view.voters().count() + 1) {
        return Err(MemberError::NotEnoughStarted);
    }
    if !view.all_voters_active() {
        return Err(MemberError::Unhealthy);
    }
    let id = crate::node::recovery::member_id(&peer_urls, &now_unix_s.to_string());
    // etcd refuses a removed id with `membership: ID removed`, which its gRPC layer answers
    // as `member not found` (`toGRPCErrorMap`). A removed id is no member, so Remove, Update
    // and Promote of one answer `member not found` already.
    if view.removed.contains(&id) {
        return Err(MemberError::NotFound);
    }
    if view.members.iter().any(|m| m.id == id) {
        return Err(MemberError::IdExists);
    }
    if view.url_taken(&peer_urls, id) {
        return Err(MemberError::PeerUrlExists);
    }
    let learners = view.members.iter().filter(|m| m.is_learner).count();
    if is_learner && learners >= MAX_LEARNERS {
        return Err(MemberError::TooManyLearners);
    }
    let change = match is_learner {
        true => MembershipChange::AddLearner(id),
        // One step, as etcd's ConfChangeAddNode: the new voter counts in the quorum at once.
        false => MembershipChange::Promote(id),
    };
    let member = MemberEntry {
        id,
        name: String::new(),
        peer_urls,
        client_urls: Vec::new(),
        is_learner,
    };
    Ok((change, member))
}

/// A majority of `voters` (etcd's `nquorum`).
fn quorum(voters: usize) -> usize {
    voters / 2 + 1
}

/// etcd's `isReadyToRemoveVotingMember` and the active-quorum check of `mayRemoveMember`.
fn check_remove_voter(id: u64, view: &LeaderView) -> Result<(), MemberError> {
    let voters = view.voters().count();
    if view.started_voters(Some(id)) < quorum(voters - 1) {
        return Err(MemberError::NotEnoughStarted);
    }
    // A member that is down is not part of the active quorum: removing it is safe.
    if id != view.me && !view.is_active(id) {
        return Ok(());
    }
    if view.active_voters() - 1 < quorum(voters - 1) {
        return Err(MemberError::Unhealthy);
    }
    Ok(())
}

/// Peer URLs as etcd's `types.NewURLs` takes them: valid, sorted.
fn checked_urls(urls: &[String]) -> Result<Vec<String>, MemberError> {
    if urls.is_empty() || urls.iter().any(|url| check_url(url).is_err()) {
        return Err(MemberError::BadUrls);
    }
    let mut urls = urls.to_vec();
    urls.sort();
    Ok(urls)
}

/// A table row as the Cluster service answers it.
pub fn to_api(m: &MemberEntry) -> Member {
    Member {
        id: m.id,
        name: m.name.clone(),
        peer_ur_ls: m.peer_urls.clone(),
        client_ur_ls: m.client_urls.clone(),
        is_learner: m.is_learner,
    }
}

/// A member's record as a conf-change context: the API's `Member` message (id, peer URLs,
/// learner; names and client URLs travel in publish entries).
pub fn encode_record(member: &MemberEntry) -> Vec<u8> {
    let record = Member {
        id: member.id,
        peer_ur_ls: member.peer_urls.clone(),
        is_learner: member.is_learner,
        ..Member::default()
    };
    record.encode_to_vec()
}

pub fn decode_record(bytes: &[u8]) -> Result<MemberEntry, String> {
    let record = Member::decode(bytes).map_err(|e| format!("member record: {e}"))?;
    Ok(MemberEntry {
        id: record.id,
        name: String::new(),
        peer_urls: record.peer_ur_ls,
        client_urls: Vec::new(),
        is_learner: record.is_learner,
    })
}

/// The membership at start-up: the initial one, or the one saved with the last applied change
/// (names from the initial list; published names come later), with the committed changes the
/// log still holds after it applied (and saved, so the log may drop them), and the ids removed
/// so far. A member no longer in it was removed: it refuses to start, with etcd's message.
pub fn recover_current(
    data_dir: &Path,
    me: u64,
    initial: Vec<MemberEntry>,
    changes: &[ferrocd_raft::storage::Entry],
) -> Result<Members, String> {
    let saved = load_current(data_dir)?.unwrap_or_else(|| SavedTable {
        index: 0,
        members: initial.clone(),
        removed: BTreeSet::new(),
    });
    let name_of = |id: u64| initial.iter().find(|m| m.id == id).map(|m| m.name.clone());
    let named = saved.members.into_iter().map(|m| MemberEntry {
        name: name_of(m.id).unwrap_or_default(),
        ..m
    });
    let table = Members::with_removed(named, saved.removed);
    let mut last_applied = None;
    for entry in changes.iter().filter(|e| e.index > saved.index) {
        let (change, context) = ferrocd_raft::group::decode_membership(entry)
            .ok_or_else(|| format!("meta log entry {} is no membership change", entry.index))?;
        table.apply(change, &decode_record(&context)?);
        last_applied = Some(entry.index);
    }
    if let Some(index) = last_applied {
        table
            .save(data_dir, index)
            .map_err(|e| format!("cannot save the membership: {e}"))?;
    }
    // Either mark of a removal: applied (no longer a member), or told by a peer (a removed
    // id; the log may still hold the change that added this member, applied again above).
    if table.get(me).is_none() || table.is_removed(me) {
        return Err(crate::node::meta::REMOVED.to_string());
    }
    Ok(table)
}

/// What a running member tells a member about to join (`crate::peer::join`): the cluster id,
/// the initial membership (the Raft log's bootstrap point) and the members now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinAnswer {
    pub cluster_id: u64,
    pub initial: Vec<MemberEntry>,
    pub current: Vec<MemberEntry>,
}

impl JoinAnswer {
    /// Two `MemberListResponse`s (initial, with the cluster id in its header; current), each
    /// behind its length (u32 LE).
    pub fn encode(&self) -> Vec<u8> {
        let list = |members: &[MemberEntry], cluster_id| MemberListResponse {
            header: Some(ResponseHeader {
                cluster_id,
                ..ResponseHeader::default()
            }),
            members: members.iter().map(to_api).collect(),
        };
        let mut out = Vec::new();
        for part in [list(&self.initial, self.cluster_id), list(&self.current, 0)] {
            let bytes = part.encode_to_vec();
            out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            out.extend_from_slice(&bytes);
        }
        out
    }

    pub fn decode(mut bytes: &[u8]) -> Option<JoinAnswer> {
        let mut parts = Vec::new();
        for _ in 0..2 {
            let (len, rest) = bytes.split_first_chunk::<4>()?;
            let len = u32::from_le_bytes(*len) as usize;
            let part = rest.get(..len)?;
            parts.push(MemberListResponse::decode(part).ok()?);
            bytes = &rest[len..];
        }
        let entries = |list: &MemberListResponse| list.members.iter().map(from_api).collect();
        Some(JoinAnswer {
            cluster_id: parts[0].header.as_ref()?.cluster_id,
            initial: entries(&parts[0]),
            current: entries(&parts[1]),
        })
    }
}

fn from_api(m: &Member) -> MemberEntry {
    MemberEntry {
        id: m.id,
        name: m.name.clone(),
        peer_urls: m.peer_ur_ls.clone(),
        client_urls: m.client_ur_ls.clone(),
        is_learner: m.is_learner,
    }
}

/// How long a joining member waits for one running member's answer.
const JOIN_ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// etcd's join (`--initial-cluster-state existing` on a new data dir): asks the other members
/// of `--initial-cluster` over their peer URLs for the membership (the first that answers),
/// and finds this member in it by its advertised peer URLs (it was added with MemberAdd). The
/// data dir is then made from the answer: the cluster id, this member's id, the initial
/// membership, and the members now as the membership saved at index 0 (the log's changes
/// from the start are applied again over it as they arrive).
pub fn join(
    data_dir: &Path,
    shards: usize,
    name: &str,
    advertise_peer_urls: &[String],
    initial_cluster: &[InitialMember],
    peer_tls: Option<&crate::tls::PeerTls>,
) -> Result<(), String> {
    verify_bootstrap(name, advertise_peer_urls, initial_cluster)?;
    let mut advertised = advertise_peer_urls.to_vec();
    advertised.sort();
    let others = initial_cluster.iter().filter(|m| m.name != name);
    let answer = others
        .flat_map(|m| &m.peer_urls)
        .find_map(|url| {
            // Over TLS to an https:// peer, with this member's peer certificate.
            let addr = crate::peer::parse_peer_url(url).ok()?;
            let bytes =
                crate::peer::join::ask(&addr, peer_tls, JOIN_ASK_TIMEOUT, JOIN_ANSWER_MAX_BYTES);
            JoinAnswer::decode(&bytes.ok()?)
        })
        .ok_or(
            "cannot fetch cluster info from peer urls: could not retrieve cluster \
                information from the given URLs",
        )?;
    let me = answer.current.iter().find(|m| {
        let mut urls = m.peer_urls.clone();
        urls.sort();
        urls == advertised
    });
    let Some(me) = me else {
        return Err(format!(
            "error validating peerURLs {}: member count is unequal",
            urls_map_string(initial_cluster)
        ));
    };
    let identity = crate::node::recovery::Identity {
        shards,
        cluster_id: answer.cluster_id,
        member_id: me.id,
    };
    crate::node::recovery::create_joined(data_dir, &identity, &answer.initial)?;
    // No removed ids: the joining member applies the whole log over this table, and learns
    // every removal from it.
    save_current(data_dir, 0, &answer.current, &BTreeSet::new())
        .map_err(|e| format!("cannot save the membership: {e}"))
}

/// Bound on an answer's size (a membership of hundreds of members fits).
const JOIN_ANSWER_MAX_BYTES: usize = 1 << 20;

/// The file holding the membership as of the last applied change (absent until one).
const CURRENT_FILE: &str = "members.current";

/// Writes the table as of the change at log index `index` and the ids removed so far: to a
/// temporary file, synced, renamed into place, the dir synced, so a crash leaves the old file
/// or the new one.
///
/// Why a file of its own rather than the meta checkpoint: a change is rare, the file is tiny,
/// and written before the change counts as applied it is never behind the log's compaction
/// point (the meta checkpoint is written later, in the background); `member.conf` keeps the
/// initial membership, which is the Raft log's bootstrap point and must not change.
///
/// Format: `index=<n>`, then one `member=<id hex> <learner 0|1> <peer URLs>` line per member,
/// then one `removed=<id hex>` line per removed id (files written before removed ids were kept
/// have none, and still open).
pub fn save_current(
    data_dir: &Path,
    index: u64,
    members: &[MemberEntry],
    removed: &BTreeSet<u64>,
) -> std::io::Result<()> {
    let mut text = format!("index={index}\n");
    for m in members {
        let learner = u8::from(m.is_learner);
        text += &format!("member={:016x} {learner} {}\n", m.id, m.peer_urls.join(","));
    }
    for id in removed {
        text += &format!("removed={id:016x}\n");
    }
    // The meta group (applied changes) and a peer core (`stop_as_told_removed`) both write
    // the file: one at a time, so they never share the temporary file.
    static WRITES: Mutex<()> = Mutex::new(());
    let _one_at_a_time = WRITES
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    crate::node::recovery::replace_file(data_dir, CURRENT_FILE, &text)
}

/// What `save_current` wrote last.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SavedTable {
    /// The log index of the last change it holds (0: made by a join, before any).
    pub index: u64,
    /// Without names and client URLs (publish entries carry them).
    pub members: Vec<MemberEntry>,
    pub removed: BTreeSet<u64>,
}

/// The table `save_current` wrote last, if any change was applied (or the member joined).
pub fn load_current(data_dir: &Path) -> Result<Option<SavedTable>, String> {
    let path = data_dir.join(CURRENT_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let bad = || format!("{}: malformed", path.display());
    let mut lines = text.lines();
    let index = lines.next().and_then(|l| l.strip_prefix("index="));
    let index = index.and_then(|i| i.parse().ok()).ok_or_else(bad)?;
    let mut saved = SavedTable {
        index,
        members: Vec::new(),
        removed: BTreeSet::new(),
    };
    for line in lines {
        if let Some(id) = line.strip_prefix("removed=") {
            let id = u64::from_str_radix(id, 16).map_err(|_| bad())?;
            saved.removed.insert(id);
        } else {
            saved
                .members
                .push(parse_current_line(line).ok_or_else(bad)?);
        }
    }
    Ok(Some(saved))
}

fn parse_current_line(line: &str) -> Option<MemberEntry> {
    let mut parts = line.strip_prefix("member=")?.splitn(3, ' ');
    let id = u64::from_str_radix(parts.next()?, 16).ok()?;
    let is_learner = match parts.next()? {
        "0" => false,
        "1" => true,
        _ => return None,
    };
    let peer_urls = parts.next()?.split(',').map(str::to_string).collect();
    Some(MemberEntry {
        id,
        name: String::new(),
        peer_urls,
        client_urls: Vec::new(),
        is_learner,
    })
}

/// A peer told this member it was removed (it was down when its removal was applied, so it
/// never applied it): the same durable marker as applying it (`mark_removed`), then etcd's
/// end (`stop_removed`: exit status 0, after `grace`, as when applying it: a leader that
/// removed itself may hear it from a follower before its answer to the client left). Without
/// the marker (a failed write, logged) a restart is refused by the peers again.
pub fn stop_as_told_removed(data_dir: &Path, me: u64, table: &Members, grace: Duration) {
    if table.is_removed(me) {
        return; // applied already: the meta group marked it and stops the process
    }
    if let Err(e) = mark_removed(data_dir, me, table) {
        crate::error!("cannot mark this member removed in its data dir", error = e);
    }
    crate::node::meta::stop_removed(grace);
}

/// Saves `members.current` without member `me`, its id among the removed, so start-up refuses
/// the data dir (`recover_current`). The saved index stays: the changes the log holds after
/// it are applied again over the file at start-up, and none of them adds a removed id back.
fn mark_removed(data_dir: &Path, me: u64, table: &Members) -> Result<(), String> {
    let saved = load_current(data_dir)?.unwrap_or_else(|| SavedTable {
        // No change applied yet: the table is the initial one.
        index: 0,
        members: table.list(),
        removed: table.removed(),
    });
    let SavedTable {
        index,
        mut members,
        mut removed,
    } = saved;
    members.retain(|m| m.id != me);
    removed.insert(me);
    save_current(data_dir, index, &members, &removed).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(list: &[&str]) -> Vec<String> {
        list.iter().map(|u| u.to_string()).collect()
    }

    #[test]
    fn initial_cluster_parses_as_etcd() {
        let members =
            parse_initial_cluster("b=http://h:2,a=http://h:9,a=http://h:1").expect("valid");
        assert_eq!(
            members,
            vec![
                InitialMember {
                    name: "a".into(),
                    peer_urls: urls(&["http://h:1", "http://h:9"])
                },
                InitialMember {
                    name: "b".into(),
                    peer_urls: urls(&["http://h:2"])
                },
            ]
        );
        let prefix = "error setting up initial cluster: ";
        let scheme = "URL scheme must be http, https, unix, or unixs: ";
        assert_eq!(
            parse_initial_cluster("a=foo"),
            Err(format!("{prefix}{scheme}foo"))
        );
        assert_eq!(
            parse_initial_cluster("a=http://h:1,b"),
            Err(format!("{prefix}{scheme}"))
        );
        assert!(parse_initial_cluster("a=http://h")
            .unwrap_err()
            .contains("host:port"));
        assert!(parse_initial_cluster("a=http://h:1/x")
            .unwrap_err()
            .contains("must not contain a path"));
    }

    /// The messages are etcd 3.4.23's, read from the real binary.
    #[test]
    fn bootstrap_checks_give_etcds_messages() {
        let one = parse_initial_cluster("a=http://127.0.0.1:42380").unwrap();
        assert_eq!(
            verify_bootstrap("x", &urls(&["http://127.0.0.1:42380"]), &one),
            Err("couldn't find local name \"x\" in the initial cluster configuration".into())
        );
        assert_eq!(
            verify_bootstrap("a", &urls(&["http://127.0.0.1:42381"]), &one),
            Err(
                "--initial-cluster has a=http://127.0.0.1:42380 but missing from \
                 --initial-advertise-peer-urls=http://127.0.0.1:42381 (resolved urls: \
                 \"http://127.0.0.1:42381\" != \"http://127.0.0.1:42380\")"
                    .into()
            )
        );
        let dup = parse_initial_cluster("a=http://127.0.0.1:42380,b=http://127.0.0.1:42380");
        assert_eq!(
            verify_bootstrap("a", &urls(&["http://127.0.0.1:42380"]), &dup.unwrap()),
            Err(
                "initial cluster a=http://127.0.0.1:42380,b=http://127.0.0.1:42380 has \
                 duplicate url"
                    .into()
            )
        );
        let twice = parse_initial_cluster("a=http://127.0.0.1:42380,a=http://127.0.0.1:42380");
        assert_eq!(
            verify_bootstrap("a", &urls(&["http://127.0.0.1:42380"]), &twice.unwrap()),
            Err("failed to resolve http://127.0.0.1:42380 to match \
                 --initial-cluster=a=http://127.0.0.1:42380 (len([\"http://127.0.0.1:42380\"]) \
                 != len([\"http://127.0.0.1:42380\" \"http://127.0.0.1:42380\"]))"
                .into())
        );
        assert_eq!(
            verify_bootstrap("a", &urls(&["http://127.0.0.1:42380"]), &one),
            Ok(())
        );
    }

    #[test]
    fn publish_fills_a_known_member_only() {
        let entry = |id| MemberEntry {
            id,
            name: format!("m{id}"),
            peer_urls: urls(&["http://h:1"]),
            client_urls: Vec::new(),
            is_learner: false,
        };
        let members = Members::new([entry(9), entry(3)]);
        members.publish(&MemberAttributes {
            member_id: 9,
            name: "nine".into(),
            client_urls: urls(&["http://h:2379"]),
        });
        members.publish(&MemberAttributes {
            member_id: 7,
            name: "gone".into(),
            client_urls: Vec::new(),
        });
        let list = members.list();
        assert_eq!(list.iter().map(|m| m.id).collect::<Vec<_>>(), vec![3, 9]);
        assert_eq!(list[1].name, "nine");
        assert_eq!(list[1].client_urls, urls(&["http://h:2379"]));
        assert!(list[0].client_urls.is_empty());
    }
}

#[cfg(test)]
mod change_tests {
    use super::*;

    fn member(id: u64, name: &str, url: &str, is_learner: bool) -> MemberEntry {
        MemberEntry {
            id,
            name: name.into(),
            peer_urls: vec![url.into()],
            client_urls: Vec::new(),
            is_learner,
        }
    }

    fn active(members: &[u64], matched: u64) -> Vec<PeerProgress> {
        let progress = |&member| PeerProgress {
            member,
            matched,
            active: true,
        };
        members.iter().map(progress).collect()
    }

    fn trio() -> Vec<MemberEntry> {
        vec![
            member(1, "a", "http://h:1", false),
            member(2, "b", "http://h:2", false),
            member(3, "c", "http://h:3", false),
        ]
    }

    const NONE_REMOVED: &BTreeSet<u64> = &BTreeSet::new();

    fn view<'a>(members: &'a [MemberEntry], progress: &'a [PeerProgress]) -> LeaderView<'a> {
        LeaderView {
            members,
            removed: NONE_REMOVED,
            progress,
            last_index: 100,
            me: 1,
        }
    }

    fn add(url: &str, is_learner: bool) -> MemberRequest {
        MemberRequest::Add {
            peer_urls: vec![url.into()],
            is_learner,
        }
    }

    #[test]
    fn add_checks_as_etcd() {
        let members = trio();
        let progress = active(&[2, 3], 100);
        let (change, learner) =
            plan(&add("http://h:4", true), &view(&members, &progress), 7).expect("a learner joins");
        // etcd's id: SHA-1 over the sorted peer URLs and the time in seconds.
        assert_eq!(
            learner.id,
            crate::node::recovery::member_id(&learner.peer_urls, "7")
        );
        assert_eq!(change, MembershipChange::AddLearner(learner.id));
        let taken = plan(&add("http://h:2", false), &view(&members, &progress), 7);
        assert_eq!(taken.unwrap_err(), MemberError::PeerUrlExists);
        let bad = plan(&add("h:2", false), &view(&members, &progress), 7);
        assert_eq!(bad.unwrap_err(), MemberError::BadUrls);

        let mut with_learner = members.clone();
        with_learner.push(learner.clone());
        let again = plan(&add("http://h:4", true), &view(&with_learner, &progress), 7);
        assert_eq!(again.unwrap_err(), MemberError::IdExists);
        let second = plan(&add("http://h:5", true), &view(&with_learner, &progress), 7);
        assert_eq!(second.unwrap_err(), MemberError::TooManyLearners);

        let silent = active(&[2], 100);
        let unhealthy = plan(&add("http://h:5", false), &view(&members, &silent), 7);
        assert_eq!(unhealthy.unwrap_err(), MemberError::Unhealthy);
    }

    #[test]
    fn promote_remove_update_check_as_etcd() {
        let mut members = trio();
        members.push(member(4, "", "http://h:4", true));
        let behind = [
            active(&[2, 3], 100),
            vec![PeerProgress {
                member: 4,
                matched: 50,
                active: true,
            }],
        ]
        .concat();
        let promote = |id| MemberRequest::Promote { id };
        let v = view(&members, &behind);
        assert_eq!(plan(&promote(9), &v, 0).unwrap_err(), MemberError::NotFound);
        assert_eq!(
            plan(&promote(2), &v, 0).unwrap_err(),
            MemberError::NotLearner
        );
        assert_eq!(
            plan(&promote(4), &v, 0).unwrap_err(),
            MemberError::LearnerNotReady
        );
        let caught_up = active(&[2, 3, 4], 95);
        let (change, promoted) = plan(&promote(4), &view(&members, &caught_up), 0).unwrap();
        assert_eq!(change, MembershipChange::Promote(4));
        assert!(!promoted.is_learner);

        let remove = |id| MemberRequest::Remove { id };
        let (change, _) = plan(&remove(4), &v, 0).unwrap();
        assert_eq!(change, MembershipChange::Remove(4));
        // Member 3 is down: removing 2 would leave one active voter of two.
        let one_down = active(&[2], 100);
        let v = view(&members, &one_down);
        assert_eq!(plan(&remove(2), &v, 0).unwrap_err(), MemberError::Unhealthy);
        assert!(
            plan(&remove(3), &v, 0).is_ok(),
            "a member that is down goes"
        );

        let update = |id, url: &str| MemberRequest::Update {
            id,
            peer_urls: vec![url.into()],
        };
        let v = view(&members, &caught_up);
        let (change, moved) = plan(&update(4, "http://h:9"), &v, 0).unwrap();
        assert_eq!(
            change,
            MembershipChange::AddLearner(4),
            "a learner stays one"
        );
        assert_eq!(moved.peer_urls, vec!["http://h:9".to_string()]);
        assert_eq!(
            plan(&update(4, "http://h:1"), &v, 0).unwrap_err(),
            MemberError::PeerUrlExists
        );
    }

    /// Removing a member makes its id a removed one; an id that MemberAdd would make again
    /// is refused as etcd answers it (`membership: ID removed` reaches the client as
    /// `member not found`), and so are Remove, Update and Promote of a removed id.
    #[test]
    fn a_removed_id_is_never_a_member_again() {
        let table = Members::new(trio());
        let learner = member(4, "", "http://h:4", true);
        table.apply(MembershipChange::AddLearner(4), &learner);
        table.apply(MembershipChange::Remove(4), &learner);
        assert!(table.is_removed(4) && table.get(4).is_none());
        assert_eq!(table.removed(), BTreeSet::from([4]));

        let progress = active(&[2, 3], 100);
        let members = table.list();
        let (_, fresh) = plan(&add("http://h:4", true), &view(&members, &progress), 7).unwrap();
        let removed = BTreeSet::from([fresh.id]);
        let v = LeaderView {
            removed: &removed,
            ..view(&members, &progress)
        };
        let again = plan(&add("http://h:4", true), &v, 7);
        assert_eq!(again.unwrap_err(), MemberError::NotFound);
        let (code, message) = MemberError::NotFound.code_and_message();
        assert_eq!(
            (code, message),
            (Code::NotFound, "etcdserver: member not found")
        );
        assert!(
            plan(&add("http://h:4", true), &v, 8).is_ok(),
            "another second, another id"
        );

        let removed = BTreeSet::from([4]);
        let v = LeaderView {
            removed: &removed,
            ..view(&members, &progress)
        };
        for request in [
            MemberRequest::Remove { id: 4 },
            MemberRequest::Promote { id: 4 },
            MemberRequest::Update {
                id: 4,
                peer_urls: vec!["http://h:9".into()],
            },
        ] {
            assert_eq!(plan(&request, &v, 7).unwrap_err(), MemberError::NotFound);
        }
    }

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("ferrocd-members-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn unnamed(members: Vec<MemberEntry>) -> Vec<MemberEntry> {
        let unnamed = |m| MemberEntry {
            name: String::new(),
            ..m
        };
        members.into_iter().map(unnamed).collect()
    }

    #[test]
    fn records_and_the_saved_table_round_trip() {
        let learner = member(4, "", "http://h:4", true);
        assert_eq!(decode_record(&encode_record(&learner)).unwrap(), learner);
        let dir = temp_dir("round-trip");
        assert_eq!(load_current(&dir).unwrap(), None);
        let table = Members::with_removed(trio(), BTreeSet::from([9, 7]));
        table.apply(MembershipChange::AddLearner(4), &learner);
        table.save(&dir, 42).unwrap();
        let saved = load_current(&dir).unwrap().unwrap();
        let mut members = trio();
        members.push(learner);
        let expected = SavedTable {
            index: 42,
            members: unnamed(members),
            removed: BTreeSet::from([7, 9]),
        };
        assert_eq!(saved, expected);
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A file written before removed ids were kept (no `removed=` lines) still opens.
    #[test]
    fn a_saved_table_without_removed_ids_opens() {
        let dir = temp_dir("old-format");
        let text = "index=7\nmember=0000000000000001 0 http://h:1\n\
                    member=0000000000000002 1 http://h:2,http://h:3\n";
        fs::write(dir.join(CURRENT_FILE), text).unwrap();
        let saved = load_current(&dir).unwrap().unwrap();
        assert_eq!(saved.index, 7);
        assert_eq!(saved.removed, BTreeSet::new());
        let ids: Vec<(u64, bool)> = saved.members.iter().map(|m| (m.id, m.is_learner)).collect();
        assert_eq!(ids, vec![(1, false), (2, true)]);
        assert_eq!(
            saved.members[1].peer_urls,
            urls(&["http://h:2", "http://h:3"])
        );
        fs::write(dir.join(CURRENT_FILE), "index=7\nremoved=zz\n").unwrap();
        assert!(load_current(&dir).unwrap_err().contains("malformed"));
        fs::remove_dir_all(&dir).unwrap();
    }

    fn urls(list: &[&str]) -> Vec<String> {
        list.iter().map(|u| u.to_string()).collect()
    }

    /// Told by a peer, a member leaves the same mark as applying its removal: start-up
    /// refuses its data dir with etcd's message, with or without a saved table before.
    #[test]
    fn a_member_told_removed_cannot_start_again() {
        let removed = crate::node::meta::REMOVED.to_string();
        for saved_before in [false, true] {
            let dir = temp_dir(&format!("told-{saved_before}"));
            let table = Members::new(trio());
            if saved_before {
                table.save(&dir, 5).unwrap();
            }
            assert!(recover_current(&dir, 2, trio(), &[]).is_ok());
            mark_removed(&dir, 2, &table).unwrap();
            let saved = load_current(&dir).unwrap().unwrap();
            assert_eq!(saved.index, if saved_before { 5 } else { 0 });
            assert_eq!(saved.removed, BTreeSet::from([2]));
            assert_eq!(recover_current(&dir, 2, trio(), &[]).unwrap_err(), removed);
            let other = recover_current(&dir, 1, trio(), &[]).expect("member 1 is still one");
            assert!(other.is_removed(2) && other.get(2).is_none());
            fs::remove_dir_all(&dir).unwrap();
        }
    }
}
