//! The space quota and alarms (etcd's `--quota-backend-bytes` and the NOSPACE alarm).
//!
//! etcd measures its backend file; ours are the shards' checkpoint files, whose sizes each
//! shard publishes after every checkpoint and defragment. A request that adds data (a put, a
//! txn that may put, a lease grant) is refused with `etcdserver: mvcc: database space
//! exceeded` while NOSPACE is raised, and raises it when the files plus the request would pass
//! the quota. Deletes, compactions and reads still work, so an operator frees space by deleting
//! and compacting, defragments, then disarms (`etcdctl alarm disarm`), as with etcd. Sizes lag
//! the writes by at most one checkpoint interval (100 ms): the quota is a bound on what
//! checkpoints found, like etcd's on what its backend commits found.
//!
//! Alarms are durable, as etcd's (its backend keeps them): raising or clearing one is a meta
//! log record (`AlarmActivate`, `AlarmDeactivate`) applied through the meta group, kept in the
//! meta checkpoint, and restored at start, so a server restarted under NOSPACE still refuses
//! writes that add data until the alarm is disarmed. The set here is what requests check.

use super::errors::KvError;
use super::meta::MetaMsg;
use super::Shared;
use ferrocd_api::etcdserverpb::alarm_request::AlarmAction;
use ferrocd_api::etcdserverpb::request_op::Request as Op;
use ferrocd_api::etcdserverpb::{AlarmMember, AlarmType, TxnRequest};
use ferrocd_engine::mvcc::codec::Alarm;
use futures::channel::oneshot;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// etcd's default quota when `--quota-backend-bytes` is 0: 2 GiB.
pub const DEFAULT_QUOTA_BYTES: u64 = 2 << 30;
/// What etcd's quota counts per put on top of its key and value.
const PUT_OVERHEAD_BYTES: u64 = 256;
/// What etcd's quota counts per lease grant.
pub const LEASE_GRANT_COST_BYTES: u64 = 64;

pub struct Space {
    /// `None`: no quota (a negative `--quota-backend-bytes`).
    quota_bytes: Option<u64>,
    /// Each shard's checkpoint file size after its last checkpoint or defragment.
    file_bytes: Vec<AtomicU64>,
    /// Raised alarms: (member id, alarm type).
    alarms: Mutex<BTreeSet<(u64, i32)>>,
}

impl Space {
    pub fn new(shards: usize, quota_bytes: Option<u64>) -> Space {
        Space {
            quota_bytes,
            file_bytes: (0..shards).map(|_| AtomicU64::new(0)).collect(),
            alarms: Mutex::new(BTreeSet::new()),
        }
    }

    pub fn set_file_bytes(&self, shard: usize, bytes: u64) {
        self.file_bytes[shard].store(bytes, Ordering::Relaxed);
    }

    /// The checkpoint files' total size as last published.
    pub fn used_bytes(&self) -> u64 {
        self.file_bytes
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .sum()
    }

    fn alarms(&self) -> std::sync::MutexGuard<'_, BTreeSet<(u64, i32)>> {
        self.alarms.lock().expect("alarm set poisoned")
    }

    /// Alarms recovered from the meta log and checkpoint.
    pub fn restore(&self, alarms: impl IntoIterator<Item = Alarm>) {
        let mut set = self.alarms();
        set.extend(alarms.into_iter().map(|a| (a.member_id, a.alarm)));
    }

    /// etcd's quota check before a request adding `cost_bytes` (0: nothing to check).
    pub fn admit(&self, member_id: u64, cost_bytes: u64) -> Admission {
        if cost_bytes == 0 {
            return Admission::Admitted;
        }
        let nospace = (member_id, AlarmType::Nospace as i32);
        if self.alarms().contains(&nospace) {
            return Admission::Refused;
        }
        let Some(quota_bytes) = self.quota_bytes else {
            return Admission::Admitted;
        };
        let used_bytes = self.used_bytes();
        if used_bytes + cost_bytes > quota_bytes {
            crate::warn!(
                "space quota exceeded: raising alarm NOSPACE",
                quota_size_bytes = quota_bytes,
                used_size_bytes = used_bytes,
            );
            return Admission::OverQuota;
        }
        Admission::Admitted
    }

    /// etcd's `Alarm`: GET lists the raised alarms; ACTIVATE raises one; DEACTIVATE clears it
    /// and answers the alarms it cleared.
    pub fn alarm(&self, action: AlarmAction, member_id: u64, alarm: i32) -> Vec<AlarmMember> {
        let mut alarms = self.alarms();
        let member = |(member_id, alarm): (u64, i32)| AlarmMember { member_id, alarm };
        match action {
            AlarmAction::Get => alarms.iter().copied().map(member).collect(),
            AlarmAction::Activate => {
                alarms.insert((member_id, alarm));
                vec![member((member_id, alarm))]
            }
            AlarmAction::Deactivate => match alarms.remove(&(member_id, alarm)) {
                true => vec![member((member_id, alarm))],
                false => Vec::new(),
            },
        }
    }
}

/// The quota's answer to a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    Admitted,
    /// NOSPACE is raised.
    Refused,
    /// The request would pass the quota: NOSPACE must be raised, the request refused.
    OverQuota,
}

/// The quota check of a request adding `cost_bytes` on this member: raises NOSPACE (durably,
/// through the meta group, as etcd's quota check proposes the alarm) when it is exceeded.
pub async fn admit(shared: &Shared, cost_bytes: u64) -> Result<(), KvError> {
    let member_id = shared.identity.member_id;
    match shared.space.admit(member_id, cost_bytes) {
        Admission::Admitted => Ok(()),
        Admission::Refused => Err(KvError::NoSpace),
        Admission::OverQuota => {
            let nospace = Alarm {
                member_id,
                alarm: AlarmType::Nospace as i32,
            };
            alarm(shared, AlarmAction::Activate, nospace).await?;
            Err(KvError::NoSpace)
        }
    }
}

/// etcd's `Alarm`: GET lists the raised alarms; ACTIVATE and DEACTIVATE go through the meta
/// group, which makes them durable first.
pub async fn alarm(
    shared: &Shared,
    action: AlarmAction,
    alarm: Alarm,
) -> Result<Vec<AlarmMember>, KvError> {
    if action == AlarmAction::Get {
        return Ok(shared.space.alarm(action, 0, 0));
    }
    if let Some(leader) = shared.role.remote_leader()? {
        return crate::forward::alarm(leader, action, alarm).await;
    }
    let (reply, answer) = oneshot::channel();
    let msg = MetaMsg::Alarm {
        action,
        alarm,
        reply,
    };
    shared.meta.send(msg).await.map_err(|_| KvError::Stopped)?;
    answer.await.map_err(|_| KvError::Stopped)
}

/// What etcd's quota counts for a txn: the costlier branch's puts, nested txns included.
pub fn txn_cost_bytes(txn: &TxnRequest) -> u64 {
    let branch = |ops: &[ferrocd_api::etcdserverpb::RequestOp]| -> u64 {
        ops.iter()
            .map(|op| match &op.request {
                Some(Op::RequestPut(put)) => {
                    PUT_OVERHEAD_BYTES + (put.key.len() + put.value.len()) as u64
                }
                Some(Op::RequestTxn(nested)) => txn_cost_bytes(nested),
                _ => 0,
            })
            .sum()
    };
    branch(&txn.success).max(branch(&txn.failure))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrocd_api::etcdserverpb::{PutRequest, RequestOp};

    fn put(value_len: usize) -> RequestOp {
        RequestOp {
            request: Some(Op::RequestPut(PutRequest {
                key: b"k".to_vec(),
                value: vec![0; value_len],
                ..Default::default()
            })),
        }
    }

    #[test]
    fn a_txn_costs_its_costlier_branch() {
        let txn = TxnRequest {
            success: vec![put(10), put(20)],
            failure: vec![put(100)],
            ..Default::default()
        };
        assert_eq!(txn_cost_bytes(&txn), 2 * 256 + 2 + 30);
        let deletes_only = TxnRequest::default();
        assert_eq!(txn_cost_bytes(&deletes_only), 0);
    }

    #[test]
    fn nospace_is_raised_past_the_quota_and_holds_until_disarmed() {
        let space = Space::new(2, Some(1000));
        space.set_file_bytes(0, 400);
        space.set_file_bytes(1, 400);
        assert_eq!(space.admit(7, 100), Admission::Admitted);
        assert_eq!(
            space.admit(7, 0),
            Admission::Admitted,
            "deletes cost nothing"
        );
        assert_eq!(space.admit(7, 300), Admission::OverQuota);
        space.alarm(AlarmAction::Activate, 7, AlarmType::Nospace as i32);
        assert_eq!(
            space.admit(7, 1),
            Admission::Refused,
            "raised until disarmed"
        );
        let listed = space.alarm(AlarmAction::Get, 0, 0);
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].alarm, AlarmType::Nospace as i32);
        space.set_file_bytes(0, 100);
        let cleared = space.alarm(AlarmAction::Deactivate, 7, AlarmType::Nospace as i32);
        assert_eq!(cleared.len(), 1);
        assert_eq!(space.admit(7, 100), Admission::Admitted);
        assert_eq!(
            Space::new(1, None).admit(7, u64::MAX / 2),
            Admission::Admitted,
            "no quota"
        );
        let restarted = Space::new(1, Some(1000));
        restarted.restore([Alarm {
            member_id: 7,
            alarm: AlarmType::Nospace as i32,
        }]);
        assert_eq!(restarted.admit(7, 1), Admission::Refused, "restored alarm");
    }
}
