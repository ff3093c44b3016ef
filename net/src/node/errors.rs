//! The errors a KV request can end with, as etcd reports them (gRPC code and message).

use crate::auth::AuthError;
use crate::members::MemberError;
use std::fmt;
use tonic::{Code, Status};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvError {
    EmptyKey,
    KeyNotFound,
    ValueProvided,
    LeaseProvided,
    TooManyOps,
    DuplicateKey,
    RequestTooLarge,
    LeaseNotFound,
    LeaseExists,
    LeaseTtlTooLarge,
    Compacted,
    FutureRev,
    /// The space quota is exhausted (the NOSPACE alarm is raised).
    NoSpace,
    /// The node is shutting down or a shard stopped: the request may be retried elsewhere.
    Stopped,
    /// Clustered: no leader is known (an election is under way or a quorum is lost).
    NoLeader,
    /// Clustered: the leader changed while the request was in flight; it may or may not have
    /// been applied (etcd's `ErrLeaderChanged`).
    LeaderChanged,
    /// Clustered: the leader did not answer a forwarded request in time.
    Timeout,
    /// Refused by auth (invalid token, permission denied, ...) or an auth management error.
    Auth(AuthError),
    /// A membership change refused.
    Member(MemberError),
}

impl KvError {
    /// etcd's gRPC code and message for this error (api/v3rpc/rpctypes).
    pub fn code_and_message(self) -> (Code, &'static str) {
        use KvError::*;
        match self {
            EmptyKey => (Code::InvalidArgument, "etcdserver: key is not provided"),
            KeyNotFound => (Code::InvalidArgument, "etcdserver: key not found"),
            ValueProvided => (Code::InvalidArgument, "etcdserver: value is provided"),
            LeaseProvided => (Code::InvalidArgument, "etcdserver: lease is provided"),
            TooManyOps => (
                Code::InvalidArgument,
                "etcdserver: too many operations in txn request",
            ),
            DuplicateKey => (
                Code::InvalidArgument,
                "etcdserver: duplicate key given in txn request",
            ),
            RequestTooLarge => (Code::InvalidArgument, "etcdserver: request is too large"),
            LeaseNotFound => (Code::NotFound, "etcdserver: requested lease not found"),
            LeaseExists => (Code::FailedPrecondition, "etcdserver: lease already exists"),
            LeaseTtlTooLarge => (Code::OutOfRange, "etcdserver: too large lease TTL"),
            Compacted => (
                Code::OutOfRange,
                "etcdserver: mvcc: required revision has been compacted",
            ),
            FutureRev => (
                Code::OutOfRange,
                "etcdserver: mvcc: required revision is a future revision",
            ),
            NoSpace => (
                Code::ResourceExhausted,
                "etcdserver: mvcc: database space exceeded",
            ),
            Stopped => (Code::Unavailable, "etcdserver: server stopped"),
            NoLeader => (Code::Unavailable, "etcdserver: no leader"),
            LeaderChanged => (Code::Unavailable, "etcdserver: leader changed"),
            Timeout => (Code::Unavailable, "etcdserver: request timed out"),
            Auth(e) => e.code_and_message(),
            Member(e) => e.code_and_message(),
        }
    }
}

impl fmt::Display for KvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code_and_message().1)
    }
}

impl std::error::Error for KvError {}

impl From<AuthError> for KvError {
    fn from(e: AuthError) -> KvError {
        KvError::Auth(e)
    }
}

impl From<MemberError> for KvError {
    fn from(e: MemberError) -> KvError {
        KvError::Member(e)
    }
}

impl From<KvError> for Status {
    fn from(e: KvError) -> Status {
        let (code, message) = e.code_and_message();
        Status::new(code, message)
    }
}
