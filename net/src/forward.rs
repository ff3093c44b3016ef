//! Forwarding to the leader: what a follower cannot decide itself goes to the leader as a
//! peer call ([`crate::peer::PeerCore::call`]), and the follower answers its client with the
//! leader's answer.
//!
//! Forwarded: KV writes (the leader evaluates them, design 4), compaction, lease grant,
//! revoke, keep-alive, time-to-live and list (the leader's table is the one that renews and
//! expires), auth management and Authenticate (the leader issues the token), alarm
//! activate/deactivate. The follower has already checked its client's token and permissions
//! (auth state is replicated), so the leader serves as [`Caller::Server`].
//!
//! Wire format, a call's payload: one tag byte, then the body, which is the etcd API's prost
//! message where one exists (a write's `put_first_checks_lease` flag is a byte in front of
//! its `TxnRequest`; auth management ops have a small length-prefixed encoding). The answer:
//! `0`, a reply tag and the body, or `1` and the error's code (two bytes for an auth error):
//! errors map back to the same [`KvError`]. Nothing here panics on bytes from the wire.

use std::cell::RefCell;
use std::time::Duration;

use async_channel::Receiver;
use ferrocd_api::etcdserverpb::alarm_request::AlarmAction;
use ferrocd_api::etcdserverpb::{
    AlarmMember, AlarmRequest, AlarmResponse, AuthenticateRequest, AuthenticateResponse,
    CompactionRequest, CompactionResponse, LeaseGrantRequest, LeaseGrantResponse,
    LeaseKeepAliveRequest, LeaseKeepAliveResponse, LeaseLeasesRequest, LeaseLeasesResponse,
    LeaseRevokeRequest, LeaseRevokeResponse, LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
    Member, MemberAddRequest, MemberAddResponse, MemberPromoteRequest, MemberRemoveRequest,
    MemberUpdateRequest, ResponseHeader, TxnRequest, TxnResponse,
};
use ferrocd_engine::mvcc::codec::{Alarm, AuthPermission};
use futures::StreamExt;
use futures_lite::future::or;
use prost::Message;

use crate::auth::state::AdminOp;
use crate::auth::{AuthError, Caller};
use crate::members::{MemberError, MemberRequest};
use crate::node::errors::KvError;
use crate::node::install::{self, Transfers};
use crate::node::{Node, Shared};
use crate::peer::{CallError, IncomingCall, PeerCore};

/// A request a follower hands to the leader.
#[derive(Clone, Debug, PartialEq)]
pub enum Forward {
    /// What `Node::write` routes.
    Write {
        txn: TxnRequest,
        put_first_checks_lease: bool,
    },
    Compact(CompactionRequest),
    LeaseGrant(LeaseGrantRequest),
    LeaseRevoke(LeaseRevokeRequest),
    /// One renewal.
    LeaseKeepAlive(LeaseKeepAliveRequest),
    LeaseTimeToLive(LeaseTimeToLiveRequest),
    LeaseLeases(LeaseLeasesRequest),
    Auth(AdminOp),
    Authenticate(AuthenticateRequest),
    /// Activate or deactivate (Get is answered locally).
    Alarm(AlarmRequest),
    /// A member's name and client URLs, published through the log (`id`, `name`,
    /// `client_ur_ls` are used).
    Publish(Member),
    MemberAdd(MemberAddRequest),
    MemberRemove(MemberRemoveRequest),
    MemberUpdate(MemberUpdateRequest),
    MemberPromote(MemberPromoteRequest),
}

/// The leader's answer. Headers are the leader's; the follower stamps its own.
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    Txn(TxnResponse),
    /// Compaction and auth management.
    Done,
    LeaseGrant(LeaseGrantResponse),
    LeaseRevoke(LeaseRevokeResponse),
    LeaseKeepAlive(LeaseKeepAliveResponse),
    LeaseTimeToLive(LeaseTimeToLiveResponse),
    LeaseLeases(LeaseLeasesResponse),
    Authenticate(AuthenticateResponse),
    Alarm(AlarmResponse),
    Compact(CompactionResponse),
    /// A membership change: the member it made (MemberAdd) and the members after it.
    Members(MemberAddResponse),
}

// ---- encoding ----

/// A length-prefixed encoding for what has no prost message (auth management ops).
struct Writer(Vec<u8>);

impl Writer {
    fn bytes(&mut self, bytes: &[u8]) -> &mut Self {
        let len = u32::try_from(bytes.len()).expect("a forwarded field over 4 GiB");
        self.0.extend_from_slice(&len.to_le_bytes());
        self.0.extend_from_slice(bytes);
        self
    }

    fn byte(&mut self, byte: u8) -> &mut Self {
        self.0.push(byte);
        self
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (first, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*first)
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let (len, rest) = self.0.split_first_chunk::<4>()?;
        let len = u32::from_le_bytes(*len) as usize;
        if rest.len() < len {
            return None;
        }
        let (bytes, rest) = rest.split_at(len);
        self.0 = rest;
        Some(bytes)
    }

    fn string(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?.to_vec()).ok()
    }

    /// The rest, which must be empty: trailing bytes mean a foreign encoding.
    fn end(&self) -> Option<()> {
        self.0.is_empty().then_some(())
    }
}

fn encode_admin(op: &AdminOp, w: &mut Writer) {
    use AdminOp::*;
    match op {
        Enable => w.byte(1),
        Disable => w.byte(2),
        UserAdd {
            name,
            password_hash,
        } => {
            w.byte(3).bytes(name.as_bytes());
            match password_hash {
                None => w.byte(0),
                Some(hash) => w.byte(1).bytes(hash.as_bytes()),
            }
        }
        UserDelete { name } => w.byte(4).bytes(name.as_bytes()),
        UserChangePassword {
            name,
            password_hash,
        } => w
            .byte(5)
            .bytes(name.as_bytes())
            .bytes(password_hash.as_bytes()),
        UserGrantRole { user, role } => w.byte(6).bytes(user.as_bytes()).bytes(role.as_bytes()),
        UserRevokeRole { name, role } => w.byte(7).bytes(name.as_bytes()).bytes(role.as_bytes()),
        RoleAdd { name } => w.byte(8).bytes(name.as_bytes()),
        RoleDelete { name } => w.byte(9).bytes(name.as_bytes()),
        RoleGrantPermission { name, perm } => w
            .byte(10)
            .bytes(name.as_bytes())
            .byte(perm.perm_type)
            .bytes(&perm.key)
            .bytes(&perm.range_end),
        RoleRevokePermission {
            role,
            key,
            range_end,
        } => w
            .byte(11)
            .bytes(role.as_bytes())
            .bytes(key)
            .bytes(range_end),
        IssueToken { user, token } => w.byte(12).bytes(user.as_bytes()).bytes(token.as_bytes()),
    };
}

fn decode_admin(r: &mut Reader) -> Option<AdminOp> {
    use AdminOp::*;
    Some(match r.byte()? {
        1 => Enable,
        2 => Disable,
        3 => UserAdd {
            name: r.string()?,
            password_hash: match r.byte()? {
                0 => None,
                1 => Some(r.string()?),
                _ => return None,
            },
        },
        4 => UserDelete { name: r.string()? },
        5 => UserChangePassword {
            name: r.string()?,
            password_hash: r.string()?,
        },
        6 => UserGrantRole {
            user: r.string()?,
            role: r.string()?,
        },
        7 => UserRevokeRole {
            name: r.string()?,
            role: r.string()?,
        },
        8 => RoleAdd { name: r.string()? },
        9 => RoleDelete { name: r.string()? },
        10 => RoleGrantPermission {
            name: r.string()?,
            perm: AuthPermission {
                perm_type: r.byte()?,
                key: r.bytes()?.to_vec(),
                range_end: r.bytes()?.to_vec(),
            },
        },
        11 => RoleRevokePermission {
            role: r.string()?,
            key: r.bytes()?.to_vec(),
            range_end: r.bytes()?.to_vec(),
        },
        12 => IssueToken {
            user: r.string()?,
            token: r.string()?,
        },
        _ => return None,
    })
}

/// Appends a prost message after a tag.
fn tagged(tag: u8, message: &impl Message) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + message.encoded_len());
    out.push(tag);
    message.encode(&mut out).expect("a Vec grows as needed");
    out
}

impl Forward {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Forward::Write {
                txn,
                put_first_checks_lease,
            } => {
                let mut out = vec![1, u8::from(*put_first_checks_lease)];
                txn.encode(&mut out).expect("a Vec grows as needed");
                out
            }
            Forward::Compact(r) => tagged(2, r),
            Forward::LeaseGrant(r) => tagged(3, r),
            Forward::LeaseRevoke(r) => tagged(4, r),
            Forward::LeaseKeepAlive(r) => tagged(5, r),
            Forward::LeaseTimeToLive(r) => tagged(6, r),
            Forward::LeaseLeases(r) => tagged(7, r),
            Forward::Auth(op) => {
                let mut w = Writer(vec![8]);
                encode_admin(op, &mut w);
                w.0
            }
            Forward::Authenticate(r) => tagged(9, r),
            Forward::Alarm(r) => tagged(10, r),
            Forward::Publish(r) => tagged(11, r),
            Forward::MemberAdd(r) => tagged(12, r),
            Forward::MemberRemove(r) => tagged(13, r),
            Forward::MemberUpdate(r) => tagged(14, r),
            Forward::MemberPromote(r) => tagged(15, r),
        }
    }

    /// `None` for bytes that are not a request of this version.
    pub fn decode(bytes: &[u8]) -> Option<Forward> {
        let (tag, body) = bytes.split_first()?;
        Some(match tag {
            1 => {
                let (flag, txn) = body.split_first()?;
                Forward::Write {
                    put_first_checks_lease: match flag {
                        0 => false,
                        1 => true,
                        _ => return None,
                    },
                    txn: TxnRequest::decode(txn).ok()?,
                }
            }
            2 => Forward::Compact(Message::decode(body).ok()?),
            3 => Forward::LeaseGrant(Message::decode(body).ok()?),
            4 => Forward::LeaseRevoke(Message::decode(body).ok()?),
            5 => Forward::LeaseKeepAlive(Message::decode(body).ok()?),
            6 => Forward::LeaseTimeToLive(Message::decode(body).ok()?),
            7 => Forward::LeaseLeases(Message::decode(body).ok()?),
            8 => {
                let mut r = Reader(body);
                let op = decode_admin(&mut r)?;
                r.end()?;
                Forward::Auth(op)
            }
            9 => Forward::Authenticate(Message::decode(body).ok()?),
            10 => Forward::Alarm(Message::decode(body).ok()?),
            11 => Forward::Publish(Message::decode(body).ok()?),
            12 => Forward::MemberAdd(Message::decode(body).ok()?),
            13 => Forward::MemberRemove(Message::decode(body).ok()?),
            14 => Forward::MemberUpdate(Message::decode(body).ok()?),
            15 => Forward::MemberPromote(Message::decode(body).ok()?),
            _ => return None,
        })
    }
}

impl Reply {
    fn encode_into(&self, out: &mut Vec<u8>) {
        let (tag, body) = match self {
            Reply::Txn(r) => (1, r.encode_to_vec()),
            Reply::Done => (2, Vec::new()),
            Reply::LeaseGrant(r) => (3, r.encode_to_vec()),
            Reply::LeaseRevoke(r) => (4, r.encode_to_vec()),
            Reply::LeaseKeepAlive(r) => (5, r.encode_to_vec()),
            Reply::LeaseTimeToLive(r) => (6, r.encode_to_vec()),
            Reply::LeaseLeases(r) => (7, r.encode_to_vec()),
            Reply::Authenticate(r) => (8, r.encode_to_vec()),
            Reply::Alarm(r) => (9, r.encode_to_vec()),
            Reply::Compact(r) => (10, r.encode_to_vec()),
            Reply::Members(r) => (11, r.encode_to_vec()),
        };
        out.push(tag);
        out.extend_from_slice(&body);
    }

    fn decode(bytes: &[u8]) -> Option<Reply> {
        let (tag, body) = bytes.split_first()?;
        Some(match tag {
            1 => Reply::Txn(Message::decode(body).ok()?),
            2 if body.is_empty() => Reply::Done,
            3 => Reply::LeaseGrant(Message::decode(body).ok()?),
            4 => Reply::LeaseRevoke(Message::decode(body).ok()?),
            5 => Reply::LeaseKeepAlive(Message::decode(body).ok()?),
            6 => Reply::LeaseTimeToLive(Message::decode(body).ok()?),
            7 => Reply::LeaseLeases(Message::decode(body).ok()?),
            8 => Reply::Authenticate(Message::decode(body).ok()?),
            9 => Reply::Alarm(Message::decode(body).ok()?),
            10 => Reply::Compact(Message::decode(body).ok()?),
            11 => Reply::Members(Message::decode(body).ok()?),
            _ => return None,
        })
    }
}

/// The wire code of an auth error. Exhaustive, so a new variant must get a code.
fn auth_code(e: AuthError) -> u8 {
    use AuthError::*;
    match e {
        RootUserNotExist => 1,
        RootRoleNotExist => 2,
        UserAlreadyExist => 3,
        UserEmpty => 4,
        UserNotFound => 5,
        RoleAlreadyExist => 6,
        RoleNotFound => 7,
        RoleEmpty => 8,
        AuthFailed => 9,
        NoPasswordUser => 10,
        PermissionDenied => 11,
        RoleNotGranted => 12,
        PermissionNotGranted => 13,
        AuthNotEnabled => 14,
        InvalidAuthToken => 15,
        InvalidAuthMgmt => 16,
        AuthOldRevision => 17,
        JwtVerifyOnly => 18,
    }
}

fn auth_of_code(code: u8) -> Option<AuthError> {
    use AuthError::*;
    Some(match code {
        1 => RootUserNotExist,
        2 => RootRoleNotExist,
        3 => UserAlreadyExist,
        4 => UserEmpty,
        5 => UserNotFound,
        6 => RoleAlreadyExist,
        7 => RoleNotFound,
        8 => RoleEmpty,
        9 => AuthFailed,
        10 => NoPasswordUser,
        11 => PermissionDenied,
        12 => RoleNotGranted,
        13 => PermissionNotGranted,
        14 => AuthNotEnabled,
        15 => InvalidAuthToken,
        16 => InvalidAuthMgmt,
        17 => AuthOldRevision,
        18 => JwtVerifyOnly,
        _ => return None,
    })
}

/// The code of an error that is not an auth error; `AUTH_CODE` is followed by the auth code.
const AUTH_CODE: u8 = 100;
/// Followed by the membership error's place in `MemberError::ALL`.
const MEMBER_CODE: u8 = 101;

fn error_code(e: KvError) -> u8 {
    use KvError::*;
    match e {
        EmptyKey => 1,
        KeyNotFound => 2,
        ValueProvided => 3,
        LeaseProvided => 4,
        TooManyOps => 5,
        DuplicateKey => 6,
        RequestTooLarge => 7,
        LeaseNotFound => 8,
        LeaseExists => 9,
        LeaseTtlTooLarge => 10,
        Compacted => 11,
        FutureRev => 12,
        NoSpace => 13,
        Stopped => 14,
        NoLeader => 15,
        LeaderChanged => 16,
        Timeout => 17,
        Auth(_) => AUTH_CODE,
        Member(_) => MEMBER_CODE,
    }
}

fn error_of_code(code: u8) -> Option<KvError> {
    use KvError::*;
    Some(match code {
        1 => EmptyKey,
        2 => KeyNotFound,
        3 => ValueProvided,
        4 => LeaseProvided,
        5 => TooManyOps,
        6 => DuplicateKey,
        7 => RequestTooLarge,
        8 => LeaseNotFound,
        9 => LeaseExists,
        10 => LeaseTtlTooLarge,
        11 => Compacted,
        12 => FutureRev,
        13 => NoSpace,
        14 => Stopped,
        15 => NoLeader,
        16 => LeaderChanged,
        17 => Timeout,
        _ => return None,
    })
}

/// The leader's answer as call payload.
pub fn encode_outcome(outcome: &Result<Reply, KvError>) -> Vec<u8> {
    let mut out = Vec::new();
    match outcome {
        Ok(reply) => {
            out.push(0);
            reply.encode_into(&mut out);
        }
        Err(e) => {
            out.push(1);
            out.push(error_code(*e));
            if let KvError::Auth(auth) = e {
                out.push(auth_code(*auth));
            }
            if let KvError::Member(member) = e {
                let place = MemberError::ALL.iter().position(|m| m == member);
                out.push(place.expect("every member error is in ALL") as u8);
            }
        }
    }
    out
}

/// `None` for bytes that are not an answer of this version.
pub fn decode_outcome(bytes: &[u8]) -> Option<Result<Reply, KvError>> {
    let (status, body) = bytes.split_first()?;
    match (status, body) {
        (0, reply) => Some(Ok(Reply::decode(reply)?)),
        (1, [AUTH_CODE, auth]) => Some(Err(KvError::Auth(auth_of_code(*auth)?))),
        (1, [MEMBER_CODE, place]) => Some(Err(KvError::Member(
            *MemberError::ALL.get(*place as usize)?,
        ))),
        (1, [code]) => Some(Err(error_of_code(*code)?)),
        _ => None,
    }
}

// ---- leader side ----

/// Serves one forwarded request on the leader, as the server itself: the follower checked
/// its client already. A member that no longer leads refuses (`LeaderChanged`) rather than
/// forwarding again.
pub async fn serve(node: &Node, request: Forward) -> Result<Reply, KvError> {
    let node = node.with_caller(Caller::Server);
    let shared = node.shared();
    if shared.role.remote_leader()?.is_some() {
        return Err(KvError::LeaderChanged);
    }
    use crate::lease::service as lease;
    Ok(match request {
        Forward::Write {
            txn,
            put_first_checks_lease,
        } => Reply::Txn(node.write(txn, put_first_checks_lease).await?),
        Forward::Compact(r) => Reply::Compact(node.compact(r).await?),
        Forward::LeaseGrant(r) => Reply::LeaseGrant(lease::grant(shared, r).await?),
        Forward::LeaseRevoke(r) => {
            Reply::LeaseRevoke(lease::revoke(shared, r.id, Caller::Server).await?)
        }
        Forward::LeaseKeepAlive(r) => Reply::LeaseKeepAlive(lease::keep_alive(shared, r.id).await?),
        Forward::LeaseTimeToLive(r) => {
            Reply::LeaseTimeToLive(lease::time_to_live(shared, r).await?)
        }
        Forward::LeaseLeases(_) => Reply::LeaseLeases(lease::leases(shared).await?),
        Forward::Auth(op) => {
            crate::auth::ops::request(shared, op).await?;
            Reply::Done
        }
        Forward::Authenticate(r) => {
            Reply::Authenticate(crate::auth::service::authenticate(shared, r).await?)
        }
        Forward::Alarm(r) => {
            let alarm = Alarm {
                member_id: r.member_id,
                alarm: r.alarm,
            };
            let alarms = crate::node::space::alarm(shared, r.action(), alarm).await?;
            Reply::Alarm(AlarmResponse {
                header: None,
                alarms,
            })
        }
        Forward::Publish(m) => {
            node.publish_member(m.id, m.name, m.client_ur_ls).await?;
            Reply::Done
        }
        Forward::MemberAdd(r) => {
            let request = MemberRequest::Add {
                peer_urls: r.peer_ur_ls,
                is_learner: r.is_learner,
            };
            Reply::Members(node.change_members(request).await?)
        }
        Forward::MemberRemove(r) => Reply::Members(
            node.change_members(MemberRequest::Remove { id: r.id })
                .await?,
        ),
        Forward::MemberUpdate(r) => {
            let request = MemberRequest::Update {
                id: r.id,
                peer_urls: r.peer_ur_ls,
            };
            Reply::Members(node.change_members(request).await?)
        }
        Forward::MemberPromote(r) => Reply::Members(
            node.change_members(MemberRequest::Promote { id: r.id })
                .await?,
        ),
    })
}

/// Forwarded requests one core serves at once; more wait in the transport's bounded queue
/// (and beyond it are refused, `Busy`).
pub const MAX_SERVING_CALLS: usize = 256;

/// Serves the calls that reach this core, until the transport closes the queue: snapshot
/// transfers (`node::install`) and forwarded requests. A request that does not decode is
/// answered with `Stopped` (a member of another version).
pub async fn serve_calls(node: Node, calls: Receiver<IncomingCall>, transfers: Transfers) {
    calls
        .for_each_concurrent(MAX_SERVING_CALLS, |call| {
            let (node, transfers) = (node.clone(), transfers.clone());
            async move {
                if install::is_install_call(&call.payload) {
                    let answer = install::serve(node.shared(), &transfers, &call.payload).await;
                    call.reply.send(&answer);
                    return;
                }
                let outcome = match Forward::decode(&call.payload) {
                    Some(request) => serve(&node, request).await,
                    None => Err(KvError::Stopped),
                };
                call.reply.send(&encode_outcome(&outcome));
            }
        })
        .await;
}

// ---- follower side ----

thread_local! {
    /// This core's transport and the forwarding timeout (`install`).
    static PEER: RefCell<Option<(PeerCore, u64)>> = const { RefCell::new(None) };
}

/// Lets this core's requests reach the leader through `peer`; a forwarded request that gets
/// no answer within `timeout_ms` (a few election timeouts) fails with `Timeout`. Call once
/// on each core's executor at start-up.
pub fn install(peer: PeerCore, timeout_ms: u64) {
    assert!(timeout_ms > 0);
    PEER.with(|slot| *slot.borrow_mut() = Some((peer, timeout_ms)));
}

/// Drops this core's handle on the transport (shutdown), so the transport can close.
pub fn uninstall() {
    PEER.with(|slot| slot.borrow_mut().take());
}

/// What a failed call tells the client. A call that may have reached the leader is a
/// `Timeout` ("may or may not have been applied"); one that cannot leave is `NoLeader`.
fn call_error(e: CallError) -> KvError {
    match e {
        CallError::UnknownPeer(_) => KvError::NoLeader,
        CallError::TooLarge { .. } => KvError::RequestTooLarge,
        CallError::QueueFull
        | CallError::TooManyCalls
        | CallError::Busy
        | CallError::Timeout
        | CallError::ConnectionLost
        | CallError::NotAnswered => KvError::Timeout,
    }
}

/// Sends `request` to `leader` and waits for its answer.
pub async fn call(leader: u64, request: &Forward) -> Result<Reply, KvError> {
    let (peer, timeout_ms) = PEER
        .with(|slot| slot.borrow().clone())
        .ok_or(KvError::NoLeader)?;
    let bytes = request.encode();
    // `SendWrapper` makes the core-local future `Send` for tonic's handlers: glommio tasks
    // never move threads, so it is never polled elsewhere.
    let answer =
        send_wrapper::SendWrapper::new(async move { peer.call(leader, bytes, timeout_ms).await })
            .await
            .map_err(call_error)?;
    // An answer of another version: the leader is unusable from here.
    decode_outcome(&answer).unwrap_or(Err(KvError::Stopped))
}

/// Waits (at most the forwarding timeout) until this member shows `revision`, so that a
/// client reading here after its forwarded write sees it. Past the timeout the answer is
/// given anyway: the write is committed, this member is just behind.
/// This member's header for a leader's answer, at the leader's revision, once this member has
/// applied up to it (bounded by the forwarding timeout): the client's next request here sees what
/// the answer reported, and no answer reports a revision older than writes acknowledged before
/// it (etcd's member answers after applying the request's entry). Stamping this member's own
/// visible revision instead gave lease grants headers behind writes already acknowledged (found
/// by the cluster robustness run).
async fn local_header(shared: &Shared, leader: Option<ResponseHeader>) -> Option<ResponseHeader> {
    let revision = leader.map_or(0, |h| h.revision);
    catch_up(shared, revision).await;
    Some(shared.header(revision))
}

async fn catch_up(shared: &Shared, revision: i64) {
    within_call_timeout(shared.seq.wait_visible(revision)).await;
}

/// Waits for `done`, at most the forwarding timeout: whether it came.
async fn within_call_timeout(done: impl std::future::Future<Output = ()>) -> bool {
    let timeout_ms = PEER.with(|slot| slot.borrow().as_ref().map_or(0, |(_, t)| *t));
    // `SendWrapper`: the glommio timer is polled only on the core that made it.
    let timer =
        send_wrapper::SendWrapper::new(glommio::timer::sleep(Duration::from_millis(timeout_ms)));
    or(
        async {
            done.await;
            true
        },
        async {
            timer.await;
            false
        },
    )
    .await
}

/// A reply of the wrong kind for the request: a bug or another version; unavailable.
fn mismatch<T>(_: Reply) -> Result<T, KvError> {
    Err(KvError::Stopped)
}

pub async fn write(
    shared: &Shared,
    leader: u64,
    txn: TxnRequest,
    put_first_checks_lease: bool,
) -> Result<TxnResponse, KvError> {
    let request = Forward::Write {
        txn,
        put_first_checks_lease,
    };
    let mut response = match call(leader, &request).await? {
        Reply::Txn(response) => response,
        other => return mismatch(other),
    };
    response.header = local_header(shared, response.header).await;
    Ok(response)
}

/// A membership change at the leader. The answer is given once this member's table shows it
/// too (bounded by the forwarding timeout), so a MemberList here right after agrees with it.
pub async fn change_members(
    shared: &Shared,
    leader: u64,
    request: &MemberRequest,
) -> Result<MemberAddResponse, KvError> {
    let forward = match request.clone() {
        MemberRequest::Add {
            peer_urls,
            is_learner,
        } => Forward::MemberAdd(MemberAddRequest {
            peer_ur_ls: peer_urls,
            is_learner,
        }),
        MemberRequest::Remove { id } => Forward::MemberRemove(MemberRemoveRequest { id }),
        MemberRequest::Update { id, peer_urls } => Forward::MemberUpdate(MemberUpdateRequest {
            id,
            peer_ur_ls: peer_urls,
        }),
        MemberRequest::Promote { id } => Forward::MemberPromote(MemberPromoteRequest { id }),
    };
    let response = match call(leader, &forward).await {
        Ok(Reply::Members(response)) => response,
        Ok(other) => return mismatch(other),
        Err(KvError::Timeout) if *request == (MemberRequest::Remove { id: leader }) => {
            return leader_removed_here(shared, leader).await;
        }
        Err(e) => return Err(e),
    };
    let table = &shared.members;
    // What a change decides: ids, peer URLs, learner flags (names and client URLs are
    // published separately).
    let decided = |m: &Member| (m.id, m.peer_ur_ls.clone(), m.is_learner);
    let wanted: Vec<_> = response.members.iter().map(decided).collect();
    let applied = ferrocd_raft::notify::wait_until(table.changed(), || {
        let here = table.list();
        here.iter()
            .map(crate::members::to_api)
            .map(|m| decided(&m))
            .eq(wanted.iter().cloned())
    });
    within_call_timeout(applied).await;
    Ok(MemberAddResponse {
        header: Some(shared.header(0)),
        ..response
    })
}

/// The answer to removing the leader once the call to it failed: applying the removal here
/// drops the connection to the leader and fails the call, which races the leader's answer
/// (found by the robustness harness's member replacement: "request timed out" for a removal
/// that was committed). Once this member's table shows the removal it answers from it, as
/// etcd's member answers after applying the change; otherwise (bounded by the forwarding
/// timeout) the outcome stays unknown.
async fn leader_removed_here(shared: &Shared, leader: u64) -> Result<MemberAddResponse, KvError> {
    let table = &shared.members;
    let removed = ferrocd_raft::notify::wait_until(table.changed(), || table.get(leader).is_none());
    if !within_call_timeout(removed).await {
        return Err(KvError::Timeout);
    }
    Ok(MemberAddResponse {
        header: Some(shared.header(0)),
        members: table.list().iter().map(crate::members::to_api).collect(),
        ..MemberAddResponse::default()
    })
}

pub async fn publish(leader: u64, member: Member) -> Result<(), KvError> {
    match call(leader, &Forward::Publish(member)).await? {
        Reply::Done => Ok(()),
        other => mismatch(other),
    }
}

pub async fn compact(
    shared: &Shared,
    leader: u64,
    r: CompactionRequest,
) -> Result<CompactionResponse, KvError> {
    match call(leader, &Forward::Compact(r)).await? {
        Reply::Compact(response) => Ok(CompactionResponse {
            header: local_header(shared, response.header).await,
        }),
        other => mismatch(other),
    }
}

pub async fn lease_grant(
    shared: &Shared,
    leader: u64,
    r: LeaseGrantRequest,
) -> Result<LeaseGrantResponse, KvError> {
    match call(leader, &Forward::LeaseGrant(r)).await? {
        Reply::LeaseGrant(response) => Ok(LeaseGrantResponse {
            header: local_header(shared, response.header).await,
            ..response
        }),
        other => mismatch(other),
    }
}

pub async fn lease_revoke(
    shared: &Shared,
    leader: u64,
    id: i64,
) -> Result<LeaseRevokeResponse, KvError> {
    let request = Forward::LeaseRevoke(LeaseRevokeRequest { id });
    match call(leader, &request).await? {
        Reply::LeaseRevoke(response) => Ok(LeaseRevokeResponse {
            header: local_header(shared, response.header).await,
        }),
        other => mismatch(other),
    }
}

pub async fn lease_keep_alive(
    shared: &Shared,
    leader: u64,
    id: i64,
) -> Result<LeaseKeepAliveResponse, KvError> {
    let request = Forward::LeaseKeepAlive(LeaseKeepAliveRequest { id });
    match call(leader, &request).await? {
        Reply::LeaseKeepAlive(response) => Ok(LeaseKeepAliveResponse {
            header: local_header(shared, response.header).await,
            ..response
        }),
        other => mismatch(other),
    }
}

pub async fn lease_time_to_live(
    shared: &Shared,
    leader: u64,
    r: LeaseTimeToLiveRequest,
) -> Result<LeaseTimeToLiveResponse, KvError> {
    match call(leader, &Forward::LeaseTimeToLive(r)).await? {
        Reply::LeaseTimeToLive(response) => Ok(LeaseTimeToLiveResponse {
            header: local_header(shared, response.header).await,
            ..response
        }),
        other => mismatch(other),
    }
}

pub async fn lease_leases(shared: &Shared, leader: u64) -> Result<LeaseLeasesResponse, KvError> {
    match call(leader, &Forward::LeaseLeases(LeaseLeasesRequest {})).await? {
        Reply::LeaseLeases(response) => Ok(LeaseLeasesResponse {
            header: local_header(shared, response.header).await,
            ..response
        }),
        other => mismatch(other),
    }
}

pub async fn auth_admin(leader: u64, op: AdminOp) -> Result<(), KvError> {
    match call(leader, &Forward::Auth(op)).await? {
        Reply::Done => Ok(()),
        other => mismatch(other),
    }
}

/// The leader checks the password and issues the token; this member learns the token too,
/// so that the client's next requests here are accepted.
pub async fn authenticate(
    shared: &Shared,
    leader: u64,
    r: AuthenticateRequest,
) -> Result<AuthenticateResponse, KvError> {
    let name = r.name.clone();
    match call(leader, &Forward::Authenticate(r)).await? {
        Reply::Authenticate(response) => {
            shared.auth.adopt_token(&response.token, &name);
            Ok(AuthenticateResponse {
                header: Some(shared.current_header()),
                ..response
            })
        }
        other => mismatch(other),
    }
}

pub async fn alarm(
    leader: u64,
    action: AlarmAction,
    alarm: Alarm,
) -> Result<Vec<AlarmMember>, KvError> {
    let request = Forward::Alarm(AlarmRequest {
        action: action as i32,
        member_id: alarm.member_id,
        alarm: alarm.alarm,
    });
    match call(leader, &request).await? {
        Reply::Alarm(response) => Ok(response.alarms),
        other => mismatch(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrocd_api::etcdserverpb::ResponseHeader;
    use ferrocd_api::etcdserverpb::{
        compare, request_op, Compare, LeaseStatus, PutRequest, RequestOp,
    };
    use ferrocd_api::mvccpb::KeyValue;
    use rand::{Rng, SeedableRng};

    /// A header as the leader stamps it.
    fn leader_header(revision: i64) -> Option<ResponseHeader> {
        Some(ResponseHeader {
            cluster_id: 1,
            member_id: 2,
            revision,
            raft_term: 3,
        })
    }

    fn every_request() -> Vec<Forward> {
        let txn = TxnRequest {
            compare: vec![Compare {
                key: b"k".to_vec(),
                target: compare::CompareTarget::Value as i32,
                target_union: Some(compare::TargetUnion::Value(b"v".to_vec())),
                ..Default::default()
            }],
            success: vec![RequestOp {
                request: Some(request_op::Request::RequestPut(PutRequest {
                    key: b"k".to_vec(),
                    value: vec![0, 255, 7],
                    lease: 9,
                    ..Default::default()
                })),
            }],
            failure: Vec::new(),
        };
        let mut requests = vec![
            Forward::Write {
                txn: txn.clone(),
                put_first_checks_lease: true,
            },
            Forward::Write {
                txn,
                put_first_checks_lease: false,
            },
            Forward::Compact(CompactionRequest {
                revision: 42,
                physical: true,
            }),
            Forward::LeaseGrant(LeaseGrantRequest { ttl: 5, id: 77 }),
            Forward::LeaseRevoke(LeaseRevokeRequest { id: -3 }),
            Forward::LeaseKeepAlive(LeaseKeepAliveRequest { id: 12 }),
            Forward::LeaseTimeToLive(LeaseTimeToLiveRequest { id: 12, keys: true }),
            Forward::LeaseLeases(LeaseLeasesRequest {}),
            Forward::Authenticate(AuthenticateRequest {
                name: "root".into(),
                password: "pässword".into(),
            }),
            Forward::Alarm(AlarmRequest {
                action: AlarmAction::Deactivate as i32,
                member_id: u64::MAX,
                alarm: 1,
            }),
        ];
        requests.extend(every_admin_op().into_iter().map(Forward::Auth));
        requests
    }

    fn every_admin_op() -> Vec<AdminOp> {
        use AdminOp::*;
        let s = |v: &str| v.to_string();
        vec![
            Enable,
            Disable,
            UserAdd {
                name: s("u"),
                password_hash: None,
            },
            UserAdd {
                name: s("u"),
                password_hash: Some(s("$2a$10$hash")),
            },
            UserDelete { name: s("") },
            UserChangePassword {
                name: s("u"),
                password_hash: s("h"),
            },
            UserGrantRole {
                user: s("u"),
                role: s("r"),
            },
            UserRevokeRole {
                name: s("u"),
                role: s("r"),
            },
            RoleAdd { name: s("r") },
            RoleDelete { name: s("r") },
            RoleGrantPermission {
                name: s("r"),
                perm: AuthPermission {
                    perm_type: 2,
                    key: b"a".to_vec(),
                    range_end: vec![0],
                },
            },
            RoleRevokePermission {
                role: s("r"),
                key: Vec::new(),
                range_end: b"z".to_vec(),
            },
            IssueToken {
                user: s("u"),
                token: s("t.1"),
            },
        ]
    }

    fn every_reply() -> Vec<Reply> {
        vec![
            Reply::Txn(TxnResponse {
                header: leader_header(5),
                succeeded: true,
                responses: Vec::new(),
            }),
            Reply::Done,
            Reply::LeaseGrant(LeaseGrantResponse {
                header: leader_header(1),
                id: 7,
                ttl: 10,
                error: String::new(),
            }),
            Reply::LeaseRevoke(LeaseRevokeResponse {
                header: leader_header(9),
            }),
            Reply::LeaseKeepAlive(LeaseKeepAliveResponse {
                header: None,
                id: 7,
                ttl: 0,
            }),
            Reply::LeaseTimeToLive(LeaseTimeToLiveResponse {
                header: None,
                id: 7,
                ttl: -1,
                granted_ttl: 30,
                keys: vec![b"a".to_vec(), Vec::new()],
            }),
            Reply::LeaseLeases(LeaseLeasesResponse {
                header: None,
                leases: vec![LeaseStatus { id: 1 }, LeaseStatus { id: 2 }],
            }),
            Reply::Authenticate(AuthenticateResponse {
                header: None,
                token: "abc.1".into(),
            }),
            Reply::Alarm(AlarmResponse {
                header: None,
                alarms: vec![AlarmMember {
                    member_id: 3,
                    alarm: 1,
                }],
            }),
        ]
    }

    #[test]
    fn every_request_round_trips() {
        let requests = every_request();
        // Every kind: both write flags, eight other kinds, every auth op.
        assert_eq!(requests.len(), 2 + 8 + every_admin_op().len());
        for request in requests {
            assert_eq!(Forward::decode(&request.encode()), Some(request.clone()));
        }
    }

    #[test]
    fn every_reply_round_trips() {
        for reply in every_reply() {
            let outcome = Ok(reply);
            assert_eq!(decode_outcome(&encode_outcome(&outcome)), Some(outcome));
        }
        // A txn with a kv inside, for the nested messages.
        let kv = KeyValue {
            key: b"k".to_vec(),
            create_revision: 2,
            mod_revision: 3,
            version: 2,
            value: b"v".to_vec(),
            lease: 0,
        };
        let outcome = Ok(Reply::Txn(TxnResponse {
            header: leader_header(3),
            succeeded: false,
            responses: vec![ferrocd_api::etcdserverpb::ResponseOp {
                response: Some(
                    ferrocd_api::etcdserverpb::response_op::Response::ResponsePut(
                        ferrocd_api::etcdserverpb::PutResponse {
                            header: None,
                            prev_kv: Some(kv),
                        },
                    ),
                ),
            }],
        }));
        assert_eq!(decode_outcome(&encode_outcome(&outcome)), Some(outcome));
    }

    #[test]
    fn every_error_round_trips_to_the_same_error() {
        let mut seen = 0;
        for code in 0..=u8::MAX {
            if let Some(e) = error_of_code(code) {
                assert_eq!(error_code(e), code);
                let outcome = Err(e);
                assert_eq!(decode_outcome(&encode_outcome(&outcome)), Some(outcome));
                seen += 1;
            }
            if let Some(auth) = auth_of_code(code) {
                assert_eq!(auth_code(auth), code);
                let outcome = Err(KvError::Auth(auth));
                assert_eq!(decode_outcome(&encode_outcome(&outcome)), Some(outcome));
                seen += 1;
            }
        }
        // 17 KvErrors besides Auth, 18 AuthErrors: every one has a code.
        assert_eq!(seen, 17 + 18);
    }

    #[test]
    fn random_bytes_never_panic_the_decoders() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0xf0d);
        let valid: Vec<Vec<u8>> = every_request().iter().map(Forward::encode).collect();
        for round in 0..20_000 {
            let mut bytes: Vec<u8> = match round % 2 {
                // Random bytes, and valid encodings with a byte changed or cut short.
                0 => (0..rng.gen_range(0..64)).map(|_| rng.gen()).collect(),
                _ => valid[rng.gen_range(0..valid.len())].clone(),
            };
            if round % 2 == 1 && !bytes.is_empty() {
                let at = rng.gen_range(0..bytes.len());
                match rng.gen_bool(0.5) {
                    true => bytes[at] = rng.gen(),
                    false => bytes.truncate(at),
                }
            }
            let _ = Forward::decode(&bytes);
            let _ = decode_outcome(&bytes);
        }
        assert_eq!(Forward::decode(&[]), None);
        assert_eq!(decode_outcome(&[1]), None);
        assert_eq!(decode_outcome(&[1, AUTH_CODE]), None);
        assert_eq!(decode_outcome(&[1, 200]), None);
    }

    #[test]
    fn call_errors_say_whether_the_request_may_have_been_applied() {
        assert_eq!(call_error(CallError::UnknownPeer(3)), KvError::NoLeader);
        assert_eq!(call_error(CallError::ConnectionLost), KvError::Timeout);
        assert_eq!(call_error(CallError::Timeout), KvError::Timeout);
    }
}
