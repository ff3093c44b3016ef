//! The meta group's checkpoint and the release of its WAL.
//!
//! [`MetaState`] is the meta log's non-KV state — leases as the log left them (granted TTL,
//! last checkpointed remaining TTL), auth, newest compaction, alarms — kept by applying every
//! meta entry once it is durable (at run time in `Meta::append`, at start-up in recovery), so
//! it is exactly what replaying the log up to its last index gives. Published member
//! attributes (names, client URLs) are part of it, so they outlive the WAL segments. A checkpoint is that state
//! with the index (`engine::meta_checkpoint`, written off the executor, atomically).
//!
//! Release rule. A meta WAL segment may be deleted once nothing in it is needed at start-up:
//! (a) its entries' non-KV effects (grants, revokes, lease checkpoints, auth, compactions,
//! alarms) are in a durable meta checkpoint: every entry index <= the checkpoint's index;
//! (b) its KV changes (cross-shard writes, revoke deletes) are in every touched shard's
//! durable checkpoint. Recovery replays a meta entry into shard `s` only above `s`'s covered
//! revision, so (b) holds for shard `s` when its covered revision is at least the highest
//! revision of a meta entry in the segment touching `s`. A checkpoint at index `I` records,
//! per shard, the highest revision of an entry at or below `I` touching that shard
//! (`ReleasePoint::needed`); segments whose entries are all at or below `I` are released once
//! every shard's published covered revision reaches its `needed`. Shards publish their covered
//! revision only after their checkpoint commit returned, so both conditions rest on durable
//! files. Shards a segment does not touch do not hold it back (an idle shard checkpoints
//! nothing and its covered revision stays where it was). Compactions are condition (a): the
//! compacted revision is in `MetaState`.

use crate::auth::state::AuthState;
use crate::node::checkpoint::CheckpointConfig;
use crate::node::replica::Replica;
use crate::node::shard::fatal;
use crate::node::Shared;
use ferrocd_engine::meta_checkpoint::{self, MetaCheckpoint};
use ferrocd_engine::mvcc::codec::{Alarm, LeaseCheckpoint, LogPayload, MemberAttributes};
use ferrocd_engine::mvcc::Change;
use ferrocd_engine::replay::shard_of;
use ferrocd_engine::wal::Wal;
use futures::channel::oneshot;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A lease as the meta log leaves it: granted TTL and last checkpoint (0 = none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoggedLease {
    pub ttl_s: i64,
    pub remaining_ms: i64,
}

/// The meta log's non-KV state (see the module documentation).
#[derive(Clone, Debug, Default)]
pub struct MetaState {
    pub leases: BTreeMap<i64, LoggedLease>,
    pub auth: AuthState,
    pub compacted_rev: i64,
    pub alarms: BTreeSet<Alarm>,
    /// The newest attributes each member published, by member id.
    pub published: BTreeMap<u64, MemberAttributes>,
}

impl MetaState {
    /// Applies the non-KV effect of one meta entry (changes have none). `Err` for a log no
    /// server writes (a lease granted twice).
    pub fn apply(&mut self, payload: &LogPayload) -> Result<(), String> {
        match payload {
            LogPayload::Changes { .. } => {}
            LogPayload::Compact { rev } => self.compacted_rev = self.compacted_rev.max(*rev),
            LogPayload::LeaseGrant { id, ttl_s } => {
                let lease = LoggedLease {
                    ttl_s: *ttl_s,
                    remaining_ms: 0,
                };
                if self.leases.insert(*id, lease).is_some() {
                    return Err(format!("lease {id:x} granted twice"));
                }
            }
            LogPayload::LeaseRevoke { id, .. } => {
                self.leases.remove(id);
            }
            LogPayload::LeaseCheckpoint { checkpoints } => {
                for cp in checkpoints {
                    if let Some(lease) = self.leases.get_mut(&cp.id) {
                        lease.remaining_ms = cp.remaining_ms;
                    }
                }
            }
            LogPayload::AlarmActivate(alarm) => {
                self.alarms.insert(*alarm);
            }
            LogPayload::AlarmDeactivate(alarm) => {
                self.alarms.remove(alarm);
            }
            LogPayload::MemberPublish(attributes) => {
                self.published
                    .insert(attributes.member_id, attributes.clone());
            }
            // Tokens live in memory only (the auth store adopts them as they commit).
            LogPayload::AuthToken { .. } => {}
            auth => assert!(
                self.auth.apply(auth),
                "every other payload is an auth record"
            ),
        }
        Ok(())
    }

    /// The state as checkpoint records, covering the meta log up to `wal_index`.
    pub fn checkpoint(&self, wal_index: u64) -> MetaCheckpoint {
        let auth = &self.auth;
        let mut records: Vec<LogPayload> = Vec::new();
        let roles = auth.role_names().into_iter();
        records.extend(
            roles.map(|name| {
                LogPayload::AuthRolePut(auth.role(&name).expect("a listed role").clone())
            }),
        );
        let users = auth.user_names().into_iter();
        records.extend(
            users.map(|name| {
                LogPayload::AuthUserPut(auth.user(&name).expect("a listed user").clone())
            }),
        );
        if auth.enabled {
            records.push(LogPayload::AuthEnable { enabled: true });
        }
        records.extend(
            self.leases
                .iter()
                .map(|(&id, lease)| LogPayload::LeaseGrant {
                    id,
                    ttl_s: lease.ttl_s,
                }),
        );
        let checkpoints: Vec<LeaseCheckpoint> = self
            .leases
            .iter()
            .filter(|(_, lease)| lease.remaining_ms > 0)
            .map(|(&id, lease)| LeaseCheckpoint {
                id,
                remaining_ms: lease.remaining_ms,
            })
            .collect();
        if !checkpoints.is_empty() {
            records.push(LogPayload::LeaseCheckpoint { checkpoints });
        }
        if self.compacted_rev > 0 {
            records.push(LogPayload::Compact {
                rev: self.compacted_rev,
            });
        }
        records.extend(self.alarms.iter().copied().map(LogPayload::AlarmActivate));
        records.extend(
            self.published
                .values()
                .cloned()
                .map(LogPayload::MemberPublish),
        );
        MetaCheckpoint {
            wal_index,
            auth_revision: self.auth.revision,
            records,
        }
    }

    /// The state a checkpoint holds. `Err` when its records do not rebuild a state (a KV
    /// change, a lease twice).
    pub fn from_checkpoint(checkpoint: &MetaCheckpoint) -> Result<MetaState, String> {
        let mut state = MetaState::default();
        for record in &checkpoint.records {
            if matches!(record, LogPayload::Changes { .. }) {
                return Err("a meta checkpoint holds key changes".to_string());
            }
            state.apply(record)?;
        }
        state.auth.revision = checkpoint.auth_revision;
        Ok(state)
    }
}

/// Raises `touched[s]` to `main` for every shard `s` whose keys `changes` name.
pub fn note_touched(touched: &mut [i64], main: i64, changes: &[Change]) {
    for change in changes {
        let shard = shard_of(change.effect.key(), touched.len());
        touched[shard] = touched[shard].max(main);
    }
}

/// The KV changes of a meta entry and their revision, if it has any.
pub fn kv_changes(payload: &LogPayload) -> Option<(i64, &[Change])> {
    match payload {
        LogPayload::Changes { main, changes } | LogPayload::LeaseRevoke { main, changes, .. }
            if *main > 0 =>
        {
            Some((*main, changes))
        }
        _ => None,
    }
}

/// A durable meta checkpoint, and what the shards must cover before the meta WAL entries up
/// to its index may be released.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReleasePoint {
    pub wal_index: u64,
    /// Per shard: the highest revision of a meta entry at or below `wal_index` touching it.
    pub needed: Vec<i64>,
}

/// Written checkpoints whose entries are not released yet, oldest first.
#[derive(Debug, Default)]
pub struct Releaser {
    points: VecDeque<ReleasePoint>,
}

/// Points kept waiting for the shards; past this the newest is replaced (a later point needs
/// at least as much, so this only delays a release).
const MAX_RELEASE_POINTS: usize = 16;

impl Releaser {
    pub fn push(&mut self, point: ReleasePoint) {
        if let Some(last) = self.points.back() {
            assert!(
                point.wal_index > last.wal_index,
                "checkpoints in index order"
            );
        }
        if self.points.len() == MAX_RELEASE_POINTS {
            self.points.pop_back();
        }
        self.points.push_back(point);
    }

    /// The highest meta WAL index whose entries may all be released now that each shard covers
    /// `covered[s]`; the points up to it are done.
    pub fn releasable(&mut self, covered: &[i64]) -> Option<u64> {
        let satisfied = |p: &ReleasePoint| p.needed.iter().zip(covered).all(|(n, c)| n <= c);
        // `needed` only grows with the index, so the satisfied points are a prefix.
        let count = self.points.iter().take_while(|p| satisfied(p)).count();
        self.points.drain(..count).next_back().map(|p| p.wal_index)
    }
}

/// One checkpoint for the checkpoint task.
pub struct Job {
    pub checkpoint: MetaCheckpoint,
    pub needed: Vec<i64>,
    /// Answered once the file is durable (the last checkpoint at a graceful stop).
    pub done: Option<oneshot::Sender<()>>,
}

/// Where the meta log's releasable entries go.
pub enum MetaRelease {
    /// A single member: the WAL segments are deleted (its log is nobody else's).
    Wal(Rc<Wal>),
    /// A cluster: the Raft log is compacted, keeping what lagging members need
    /// (`Replica::compact_log`), then its segments are deleted.
    Raft(Rc<Replica>),
}

/// Where and how often the meta group checkpoints.
#[derive(Clone, Debug)]
pub struct MetaCheckpointConfig {
    pub path: PathBuf,
    /// Same bounds as the shards': time, and entries waiting (`max_changes`).
    pub bounds: CheckpointConfig,
}

/// Writes checkpoints handed over by the meta group (each on a thread of its own, off the
/// executor) and releases the meta log entries they and the shards' checkpoints cover, also
/// between checkpoints, as the shards catch up. Ends when the job channel is closed and empty.
/// `recovered` is the checkpoint file found at start, if any: what it covers may be released
/// as soon as the shards cover it too. In a cluster the Raft log may hold back what is
/// releasable (a lagging member), so the releasable index is offered again every interval.
pub async fn run(
    shared: Arc<Shared>,
    release: MetaRelease,
    config: MetaCheckpointConfig,
    recovered: Option<ReleasePoint>,
    jobs: async_channel::Receiver<Job>,
) {
    let interval = Duration::from_millis(config.bounds.interval_ms);
    let mut releaser = Releaser::default();
    recovered.into_iter().for_each(|point| releaser.push(point));
    // The highest index whose entries this member no longer needs.
    let mut releasable = 0;
    loop {
        let next = futures_lite::future::or(async { Some(jobs.recv().await) }, async {
            glommio::timer::sleep(interval).await;
            None
        });
        match next.await {
            Some(Ok(job)) => {
                let wal_index = job.checkpoint.wal_index;
                write(&config.path, job.checkpoint).await;
                releaser.push(ReleasePoint {
                    wal_index,
                    needed: job.needed,
                });
                if let Some(done) = job.done {
                    let _ = done.send(());
                }
            }
            Some(Err(_closed)) => break,
            None => {}
        }
        if let Some(index) = releaser.releasable(&shared.shards_covered()) {
            releasable = index;
            if let MetaRelease::Wal(wal) = &release {
                if let Err(e) = wal.release_before(index + 1).await {
                    fatal(&format!("meta WAL release failed: {e}"));
                }
            }
        }
        if let MetaRelease::Raft(replica) = &release {
            replica.compact_log(releasable).await;
        }
    }
}

/// Writes the file on a thread of its own; a failure is fatal, as for the WAL (the previous
/// file is intact and recovery starts from it).
async fn write(path: &std::path::Path, checkpoint: MetaCheckpoint) {
    let (done, written) = oneshot::channel();
    let path = path.to_path_buf();
    let spawned = std::thread::Builder::new()
        .name("ferrocd-meta-ckpt".into())
        .spawn(move || {
            let _ = done.send(meta_checkpoint::write(&path, &checkpoint));
        });
    if let Err(e) = spawned {
        fatal(&format!("cannot start the meta checkpoint thread: {e}"));
    }
    match written.await {
        Ok(Ok(_size_bytes)) => {}
        Ok(Err(e)) => fatal(&format!("meta checkpoint failed: {e}")),
        Err(_) => fatal("the meta checkpoint thread stopped"),
    }
}

/// When the meta group hands a checkpoint over: something new since the last one, and the
/// interval passed or `max_changes` entries wait (or `force`, at a graceful stop).
#[derive(Debug)]
pub struct Schedule {
    bounds: CheckpointConfig,
    /// The highest index handed over so far.
    last_index: u64,
    last_at: Instant,
}

impl Schedule {
    pub fn new(bounds: CheckpointConfig, covered_index: u64, now: Instant) -> Schedule {
        Schedule {
            bounds,
            last_index: covered_index,
            last_at: now,
        }
    }

    pub fn is_due(&self, last_index: u64, now: Instant, force: bool) -> bool {
        let waiting = last_index.saturating_sub(self.last_index);
        let interval = Duration::from_millis(self.bounds.interval_ms);
        waiting > 0
            && (force
                || now.duration_since(self.last_at) >= interval
                || waiting >= self.bounds.max_changes as u64)
    }

    pub fn handed_over(&mut self, index: u64, now: Instant) {
        self.last_index = index;
        self.last_at = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrocd_engine::mvcc::codec::AuthUser;
    use ferrocd_engine::mvcc::Effect;

    fn point(wal_index: u64, needed: &[i64]) -> ReleasePoint {
        ReleasePoint {
            wal_index,
            needed: needed.to_vec(),
        }
    }

    #[test]
    fn release_waits_for_every_touched_shard() {
        let mut releaser = Releaser::default();
        assert_eq!(releaser.releasable(&[0, 0]), None);
        releaser.push(point(10, &[5, 0]));
        releaser.push(point(20, &[5, 8]));
        releaser.push(point(30, &[12, 8]));
        assert_eq!(releaser.releasable(&[4, 100]), None, "shard 0 behind");
        assert_eq!(releaser.releasable(&[5, 7]), Some(10));
        assert_eq!(releaser.releasable(&[5, 7]), None, "point 10 is done");
        assert_eq!(releaser.releasable(&[100, 100]), Some(30));
        assert_eq!(releaser.releasable(&[100, 100]), None);
    }

    #[test]
    fn release_points_stay_bounded() {
        let mut releaser = Releaser::default();
        for index in 1..=100 {
            releaser.push(point(index, &[index as i64]));
        }
        assert_eq!(releaser.points.len(), MAX_RELEASE_POINTS);
        assert_eq!(releaser.releasable(&[15]), Some(15));
        assert_eq!(
            releaser.releasable(&[1000]),
            Some(100),
            "the newest is kept"
        );
    }

    #[test]
    fn touched_shards_follow_key_placement() {
        let put = |key: &[u8]| Change {
            sub: 0,
            effect: Effect::Put {
                key: key.to_vec(),
                value: Vec::new(),
                lease: 0,
            },
        };
        let mut touched = vec![0; 4];
        note_touched(&mut touched, 9, &[put(b"a")]);
        let shard = shard_of(b"a", 4);
        assert_eq!(touched[shard], 9);
        assert_eq!(touched.iter().sum::<i64>(), 9, "only the key's shard");
        let revoke = LogPayload::LeaseRevoke {
            id: 1,
            main: 0,
            changes: Vec::new(),
        };
        assert_eq!(kv_changes(&revoke), None, "a revoke without keys");
    }

    fn publish(name: &str, client_url: &str) -> LogPayload {
        LogPayload::MemberPublish(MemberAttributes {
            member_id: 0x8e9e05c52164694d,
            name: name.into(),
            client_urls: vec![client_url.into()],
        })
    }

    #[test]
    fn state_survives_its_checkpoint() {
        let mut state = MetaState::default();
        let log = [
            LogPayload::LeaseGrant { id: 1, ttl_s: 10 },
            LogPayload::LeaseGrant { id: 2, ttl_s: 20 },
            LogPayload::LeaseCheckpoint {
                checkpoints: vec![LeaseCheckpoint {
                    id: 2,
                    remaining_ms: 700,
                }],
            },
            LogPayload::LeaseRevoke {
                id: 1,
                main: 0,
                changes: Vec::new(),
            },
            LogPayload::AuthUserPut(AuthUser {
                name: "root".into(),
                password_hash: Some("h".into()),
                roles: vec!["root".into()],
            }),
            LogPayload::AuthEnable { enabled: true },
            LogPayload::Compact { rev: 7 },
            LogPayload::AlarmActivate(Alarm {
                member_id: 1,
                alarm: 1,
            }),
            LogPayload::AlarmActivate(Alarm {
                member_id: 1,
                alarm: 2,
            }),
            LogPayload::AlarmDeactivate(Alarm {
                member_id: 1,
                alarm: 2,
            }),
            publish("m1", "http://a:1"),
            publish("m1-renamed", "http://a:2"),
        ];
        for payload in &log {
            state.apply(payload).unwrap();
        }
        let checkpoint = state.checkpoint(99);
        let decoded = ferrocd_engine::meta_checkpoint::decode(
            &ferrocd_engine::meta_checkpoint::encode(&checkpoint),
        )
        .unwrap();
        let restored = MetaState::from_checkpoint(&decoded).unwrap();
        assert_eq!(restored.leases, state.leases);
        let lease_2 = LoggedLease {
            ttl_s: 20,
            remaining_ms: 700,
        };
        assert_eq!(
            restored.leases.into_iter().collect::<Vec<_>>(),
            [(2, lease_2)]
        );
        assert_eq!(restored.compacted_rev, 7);
        assert_eq!(restored.alarms, state.alarms);
        assert_eq!(restored.alarms.len(), 1);
        assert_eq!(restored.published, state.published);
        let LogPayload::MemberPublish(newest) = publish("m1-renamed", "http://a:2") else {
            unreachable!("built as a publish")
        };
        assert_eq!(
            restored.published.into_values().collect::<Vec<_>>(),
            [newest]
        );
        assert_eq!(restored.auth.revision, state.auth.revision);
        assert_eq!(restored.auth.revision, 3, "two auth changes after 1");
        assert!(restored.auth.enabled);
        assert_eq!(restored.auth.user_names(), ["root"]);
        assert!(state
            .apply(&LogPayload::LeaseGrant { id: 2, ttl_s: 1 })
            .is_err());
    }

    #[test]
    fn schedule_bounds_time_and_entries() {
        let bounds = CheckpointConfig {
            interval_ms: 1000,
            max_changes: 3,
        };
        let start = Instant::now();
        let mut schedule = Schedule::new(bounds, 5, start);
        assert!(!schedule.is_due(5, start, true), "nothing new");
        assert!(!schedule.is_due(6, start, false));
        assert!(schedule.is_due(6, start, true));
        assert!(schedule.is_due(8, start, false), "three entries wait");
        assert!(schedule.is_due(6, start + Duration::from_secs(1), false));
        schedule.handed_over(8, start);
        assert!(!schedule.is_due(8, start + Duration::from_secs(5), false));
    }
}
