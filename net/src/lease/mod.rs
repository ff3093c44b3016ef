//! Leases (etcd's `lessor`): the node-wide lease table, the meta-group operations that grant,
//! revoke and checkpoint leases through the meta log, the expiry task, and the gRPC service.
//!
//! State: one [`Leases`] table shared by every core (a mutex around a map; lookups from shard
//! cores are short and only happen for requests or changes that name a lease). It holds, per
//! lease, the granted TTL, the expiry instant, whether a checkpoint of its remaining TTL is in
//! the meta log, and the keys attached to it. Shards keep the attached keys current as they
//! apply changes ([`Leases::on_apply`]); revoke reads them to know what to delete.
//!
//! Durable state lives in the meta log only: grants, revokes (with their deletes) and
//! checkpoints. Recovery rebuilds the table from it and attaches the live keys that name a
//! lease. Expiry instants are not persisted: after a restart a lease gets its checkpointed
//! remaining TTL, or its full TTL, counted from the restart (never shorter than before it).

pub mod lessor;
pub mod ops;
pub mod service;

use ferrocd_engine::mvcc::codec::LeaseCheckpoint;
use ferrocd_engine::mvcc::{Change, Effect, KeyValue};
use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// etcd's `MaxLeaseTTL`: a grant asking for more fails with "too large lease TTL".
pub const MAX_LEASE_TTL_S: i64 = 9_000_000_000;

/// Lease settings of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseConfig {
    /// Grants below this TTL are raised to it (etcd: ceil(1.5 * election timeout)).
    pub min_ttl_s: i64,
    /// How often remaining TTLs are checkpointed into the meta log (etcd: 5 minutes).
    pub checkpoint_interval_ms: u64,
}

impl LeaseConfig {
    /// etcd's rule: `minTTL = (3 * electionTicks / 2) * heartbeat`, rounded up to seconds,
    /// where `electionTicks = election timeout / heartbeat`.
    pub fn min_ttl_s(heartbeat_ms: u64, election_timeout_ms: u64) -> i64 {
        let heartbeat_ms = heartbeat_ms.max(1);
        let election_ticks = election_timeout_ms / heartbeat_ms;
        let min_ttl_ms = (3 * election_ticks / 2) * heartbeat_ms;
        min_ttl_ms.div_ceil(1000) as i64
    }
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            min_ttl_s: LeaseConfig::min_ttl_s(100, 1000),
            checkpoint_interval_ms: 5 * 60 * 1000,
        }
    }
}

struct Lease {
    /// The granted TTL (after raising to the minimum).
    ttl_s: i64,
    expiry: Instant,
    /// Whether the meta log holds a checkpoint of this lease's remaining TTL that a renewal
    /// must clear (else a restart would shorten the renewed lease: etcd issue #13468).
    checkpointed: bool,
    keys: HashSet<Vec<u8>>,
}

/// What [`Leases::time_to_live`] reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimeToLive {
    /// Whole seconds left, truncated as etcd does (0 once expired).
    pub remaining_s: i64,
    pub granted_ttl_s: i64,
    /// Attached keys, sorted (only when asked for).
    pub keys: Vec<Vec<u8>>,
}

/// What [`Leases::renew`] did to a live lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Renewed {
    pub ttl_s: i64,
    /// The lease had a checkpoint in the meta log: the caller must clear it durably
    /// before acknowledging the renewal.
    pub clear_checkpoint: bool,
}

/// The node-wide lease table. See the module documentation.
pub struct Leases {
    config: LeaseConfig,
    table: Mutex<HashMap<i64, Lease>>,
}

impl Leases {
    pub fn new(config: LeaseConfig) -> Leases {
        Leases {
            config,
            table: Mutex::new(HashMap::new()),
        }
    }

    pub fn config(&self) -> LeaseConfig {
        self.config
    }

    fn table(&self) -> MutexGuard<'_, HashMap<i64, Lease>> {
        // A panic while holding the lock is a bug that already aborts the request; the map
        // itself is never left half-updated by one of the short sections below.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn exists(&self, id: i64) -> bool {
        self.table().contains_key(&id)
    }

    pub fn len(&self) -> usize {
        self.table().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds a lease expiring `remaining` after `now` (a grant: its TTL; recovery: its
    /// checkpointed remaining TTL). `checkpointed` says whether the log holds a checkpoint.
    pub fn insert(
        &self,
        id: i64,
        ttl_s: i64,
        remaining: Duration,
        checkpointed: bool,
        now: Instant,
    ) {
        assert!(id != 0 && ttl_s > 0, "lease {id} with TTL {ttl_s}");
        let lease = Lease {
            ttl_s,
            expiry: now + remaining,
            checkpointed,
            keys: HashSet::new(),
        };
        let previous = self.table().insert(id, lease);
        assert!(previous.is_none(), "lease {id} granted twice");
    }

    /// Removes a lease; its keys must have been deleted at the same time (revoke).
    pub fn remove(&self, id: i64) {
        self.table().remove(&id);
    }

    /// The keys attached to `id`, sorted; `None` if there is no such lease.
    pub fn attached_keys(&self, id: i64) -> Option<Vec<Vec<u8>>> {
        let table = self.table();
        let mut keys: Vec<Vec<u8>> = table.get(&id)?.keys.iter().cloned().collect();
        keys.sort_unstable();
        Some(keys)
    }

    /// Attaches `key` to `id` (recovery). `false` if there is no such lease.
    pub fn attach(&self, key: &[u8], id: i64) -> bool {
        match self.table().get_mut(&id) {
            Some(lease) => {
                lease.keys.insert(key.to_vec());
                true
            }
            None => false,
        }
    }

    /// Keeps attached keys current after a shard applied `changes`; `prevs` is what
    /// `Store::apply` returned (each key just before its change). A put attaches its key to
    /// its lease and detaches it from the previous one; a delete detaches it. A lease that is
    /// gone (revoked in the same step) is skipped. Takes the lock only if a lease is involved.
    pub fn on_apply(&self, changes: &[Change], prevs: &[Option<KeyValue>]) {
        assert_eq!(changes.len(), prevs.len(), "one previous state per change");
        let prev_lease = |prev: &Option<KeyValue>| prev.as_ref().map_or(0, |kv| kv.lease);
        let involved = changes.iter().zip(prevs).any(|(change, prev)| {
            prev_lease(prev) != 0
                || matches!(change.effect, Effect::Put { lease, .. } if lease != 0)
        });
        if !involved {
            return;
        }
        let mut table = self.table();
        for (change, prev) in changes.iter().zip(prevs) {
            let key = change.effect.key();
            let new_lease = match change.effect {
                Effect::Put { lease, .. } => lease,
                Effect::Delete { .. } => 0,
            };
            let old_lease = prev_lease(prev);
            if old_lease == new_lease {
                continue;
            }
            if let Some(lease) = table.get_mut(&old_lease) {
                lease.keys.remove(key);
            }
            if let Some(lease) = table.get_mut(&new_lease) {
                lease.keys.insert(key.to_vec());
            }
        }
    }

    /// A member became leader: its followers' copy of every expiry is stale (keep-alives went to
    /// the old leader), so every lease gets its full TTL from `now`, as etcd's lessor `Promote`
    /// does. A lease may outlive its last keep-alive by up to one TTL plus the election.
    pub fn promote(&self, now: Instant) {
        for lease in self.table().values_mut() {
            lease.expiry = now + ttl(lease.ttl_s);
        }
    }

    /// Renews a live lease (expiry = now + granted TTL). `None` if it does not exist or has
    /// already expired (it is about to be revoked; etcd answers the same).
    pub fn renew(&self, id: i64, now: Instant) -> Option<Renewed> {
        let mut table = self.table();
        let lease = table.get_mut(&id)?;
        if lease.expiry <= now {
            return None;
        }
        lease.expiry = now + ttl(lease.ttl_s);
        let clear_checkpoint = std::mem::take(&mut lease.checkpointed);
        Some(Renewed {
            ttl_s: lease.ttl_s,
            clear_checkpoint,
        })
    }

    pub fn time_to_live(&self, id: i64, with_keys: bool, now: Instant) -> Option<TimeToLive> {
        let table = self.table();
        let lease = table.get(&id)?;
        let mut keys: Vec<Vec<u8>> = match with_keys {
            true => lease.keys.iter().cloned().collect(),
            false => Vec::new(),
        };
        keys.sort_unstable();
        Some(TimeToLive {
            remaining_s: lease.expiry.saturating_duration_since(now).as_secs() as i64,
            granted_ttl_s: lease.ttl_s,
            keys,
        })
    }

    /// Every lease id, soonest expiry first (etcd's order).
    pub fn list(&self) -> Vec<i64> {
        let table = self.table();
        let mut leases: Vec<(Instant, i64)> = table.iter().map(|(id, l)| (l.expiry, *id)).collect();
        leases.sort_unstable();
        leases.into_iter().map(|(_, id)| id).collect()
    }

    pub fn is_expired(&self, id: i64, now: Instant) -> bool {
        self.table().get(&id).is_some_and(|l| l.expiry <= now)
    }

    /// Up to `max` expired leases, soonest expiry first.
    pub fn expired(&self, now: Instant, max: usize) -> Vec<i64> {
        let table = self.table();
        let mut expired: Vec<(Instant, i64)> = table
            .iter()
            .filter(|(_, l)| l.expiry <= now)
            .map(|(id, l)| (l.expiry, *id))
            .collect();
        expired.sort_unstable();
        expired.into_iter().take(max).map(|(_, id)| id).collect()
    }

    /// The remaining TTLs to checkpoint: leases with more than `min_remaining` left (shorter
    /// ones expire before a checkpoint would matter, as etcd's rule). Marks them checkpointed
    /// *before* the caller writes them, so a renewal racing the write clears them after it.
    pub fn take_checkpoints(&self, now: Instant, min_remaining: Duration) -> Vec<LeaseCheckpoint> {
        let mut table = self.table();
        let mut checkpoints: Vec<LeaseCheckpoint> = table
            .iter_mut()
            .filter_map(|(id, lease)| {
                let remaining = lease.expiry.saturating_duration_since(now);
                if remaining <= min_remaining {
                    return None;
                }
                lease.checkpointed = true;
                // Rounded up: a checkpoint never makes a lease shorter than it is.
                let remaining_ms = remaining.as_nanos().div_ceil(1_000_000) as i64;
                Some(LeaseCheckpoint {
                    id: *id,
                    remaining_ms,
                })
            })
            .collect();
        checkpoints.sort_unstable_by_key(|cp| cp.id);
        checkpoints
    }
}

/// A TTL in seconds as a duration (TTLs are bounded by [`MAX_LEASE_TTL_S`]).
pub fn ttl(ttl_s: i64) -> Duration {
    Duration::from_secs(ttl_s.clamp(0, MAX_LEASE_TTL_S) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(sub: i64, key: &[u8], lease: i64) -> Change {
        Change {
            sub,
            effect: Effect::Put {
                key: key.to_vec(),
                value: Vec::new(),
                lease,
            },
        }
    }

    fn live(key: &[u8], lease: i64) -> Option<KeyValue> {
        Some(KeyValue {
            key: key.to_vec(),
            lease,
            ..KeyValue::default()
        })
    }

    fn table_with(ids: &[i64], now: Instant) -> Leases {
        let leases = Leases::new(LeaseConfig::default());
        for &id in ids {
            leases.insert(id, 10, ttl(10), false, now);
        }
        leases
    }

    #[test]
    fn min_ttl_follows_etcd() {
        assert_eq!(LeaseConfig::min_ttl_s(100, 1000), 2);
        assert_eq!(LeaseConfig::min_ttl_s(100, 5000), 8);
        assert_eq!(LeaseConfig::min_ttl_s(50, 500), 1);
    }

    #[test]
    fn puts_and_deletes_move_keys_between_leases() {
        let now = Instant::now();
        let leases = table_with(&[1, 2], now);
        leases.on_apply(&[put(0, b"a", 1), put(1, b"b", 1)], &[None, None]);
        assert_eq!(
            leases.attached_keys(1).unwrap(),
            [b"a".to_vec(), b"b".to_vec()]
        );
        // Re-put of `a` under lease 2, of `b` without a lease, then delete `a`.
        leases.on_apply(&[put(0, b"a", 2)], &[live(b"a", 1)]);
        leases.on_apply(&[put(0, b"b", 0)], &[live(b"b", 1)]);
        assert_eq!(leases.attached_keys(1).unwrap(), Vec::<Vec<u8>>::new());
        assert_eq!(leases.attached_keys(2).unwrap(), [b"a".to_vec()]);
        let delete = Change {
            sub: 0,
            effect: Effect::Delete { key: b"a".to_vec() },
        };
        leases.on_apply(&[delete], &[live(b"a", 2)]);
        assert_eq!(leases.attached_keys(2).unwrap(), Vec::<Vec<u8>>::new());
        assert_eq!(leases.attached_keys(3), None);
    }

    #[test]
    fn changes_naming_a_removed_lease_are_ignored() {
        let now = Instant::now();
        let leases = table_with(&[1], now);
        leases.on_apply(&[put(0, b"a", 1)], &[None]);
        leases.remove(1);
        let delete = Change {
            sub: 0,
            effect: Effect::Delete { key: b"a".to_vec() },
        };
        leases.on_apply(&[delete], &[live(b"a", 1)]);
        assert!(leases.is_empty());
    }

    #[test]
    fn renew_extends_and_clears_a_checkpoint_once() {
        let t0 = Instant::now();
        let leases = Leases::new(LeaseConfig::default());
        leases.insert(7, 10, Duration::from_secs(4), true, t0);
        let t1 = t0 + Duration::from_secs(3);
        assert_eq!(leases.time_to_live(7, false, t1).unwrap().remaining_s, 1);
        assert_eq!(
            leases.renew(7, t1),
            Some(Renewed {
                ttl_s: 10,
                clear_checkpoint: true
            })
        );
        assert_eq!(leases.renew(7, t1).map(|r| r.clear_checkpoint), Some(false));
        let ttl = leases
            .time_to_live(7, true, t1 + Duration::from_millis(1))
            .unwrap();
        assert_eq!(
            (ttl.remaining_s, ttl.granted_ttl_s),
            (9, 10),
            "truncated seconds"
        );
        // Expired: not renewable, reported with 0 seconds left until revoked.
        let late = t1 + Duration::from_secs(10);
        assert!(leases.is_expired(7, late));
        assert_eq!(leases.renew(7, late), None);
        assert_eq!(leases.time_to_live(7, false, late).unwrap().remaining_s, 0);
        assert_eq!(leases.renew(8, t1), None);
    }

    #[test]
    fn expired_and_list_are_in_expiry_order_and_bounded() {
        let t0 = Instant::now();
        let leases = Leases::new(LeaseConfig::default());
        leases.insert(3, 5, Duration::from_secs(3), false, t0);
        leases.insert(1, 5, Duration::from_secs(1), false, t0);
        leases.insert(2, 5, Duration::from_secs(2), false, t0);
        assert_eq!(leases.list(), [1, 2, 3]);
        let t = t0 + Duration::from_secs(2);
        assert_eq!(leases.expired(t, 10), [1, 2]);
        assert_eq!(leases.expired(t, 1), [1]);
    }

    #[test]
    fn checkpoints_skip_short_leases_and_round_up() {
        let t0 = Instant::now();
        let leases = Leases::new(LeaseConfig::default());
        leases.insert(1, 100, Duration::from_secs(100), false, t0);
        leases.insert(2, 2, Duration::from_secs(2), false, t0);
        let t = t0 + Duration::from_micros(10_500);
        let checkpoints = leases.take_checkpoints(t, Duration::from_secs(5));
        assert_eq!(
            checkpoints,
            [LeaseCheckpoint {
                id: 1,
                remaining_ms: 99_990
            }]
        );
        assert!(leases.renew(1, t).unwrap().clear_checkpoint);
        assert!(!leases.renew(2, t).unwrap().clear_checkpoint);
    }
}
