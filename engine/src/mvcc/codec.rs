//! Binary encoding of the MVCC payloads that the WAL carries.
//!
//! Layout (version 1). Fixed-width integers are little-endian; `uvar` is an
//! unsigned LEB128 varint in its shortest form (low 7-bit group first).
//!
//! ```text
//! payload  = format:u8 (= 1) tag:u8 body
//! tag 1    = Changes: main:i64 count:uvar change*count
//! change   = sub:uvar kind:u8 key_len:uvar key
//!            kind 0: delete
//!            kind 1: put without lease:  value_len:uvar value
//!            kind 2: put with a lease:   value_len:uvar value lease:i64 (non-zero)
//! tag 2    = Compact: rev:i64
//! tag 3    = LeaseGrant: id:i64 (non-zero) ttl_s:i64 (positive)
//! tag 4    = LeaseRevoke: id:i64 (non-zero) main:i64
//!            main 0: no key was attached, nothing else follows
//!            main > 0: count:uvar (non-zero) change*count, every change a delete
//! tag 5    = LeaseCheckpoint: count:uvar (id:i64 remaining_ms:i64)*count
//!            (remaining_ms >= 0; 0 clears the lease's checkpoint)
//! tag 6    = AuthEnable: enabled:u8 (0 or 1)
//! tag 7    = AuthUserPut: name:str password_hash:bytes (empty: a no-password user)
//!            role_count:uvar role:str*role_count (sorted, distinct)
//! tag 8    = AuthUserDelete: name:str
//! tag 9    = AuthRolePut: name:str perm_count:uvar perm*perm_count
//! perm     = type:u8 (0 READ, 1 WRITE, 2 READWRITE) key:bytes range_end:bytes
//! tag 10   = AuthRoleDelete: name:str (also takes the role from every user)
//! tag 11   = AlarmActivate: member_id:u64 alarm:i64 (an `etcdserverpb.AlarmType`, 0..=i32::MAX)
//! tag 12   = AlarmDeactivate: member_id:u64 alarm:i64 (same domain)
//! tag 13   = MemberPublish: member_id:u64 name:bytes count:uvar client_url:bytes*count
//!            (a member's name and client URLs, etcd's publish)
//! tag 14   = AuthToken: user:str token:str (a simple auth token issued in a cluster, so that
//!            every member accepts it; not part of the auth state)
//! str      = len:uvar utf-8 bytes (non-empty); bytes = len:uvar bytes
//! ```
//!
//! Auth payloads carry whole records (a user with its password hash and roles, a role with
//! its permissions), so replay is a plain overwrite; each one is one auth revision.
//!
//! A typical small put costs 4 bytes of framing besides key and value (sub,
//! kind, two lengths). Decoding accepts exactly what encoding produces: every
//! length is bounds-checked, varints must be minimal, revisions must be
//! positive, subs strictly increasing, and no bytes may follow the payload. It
//! returns an error on any other input and never panics.

use std::fmt;

use super::{Change, Effect};

const FORMAT_VERSION: u8 = 1;
const TAG_CHANGES: u8 = 1;
const TAG_COMPACT: u8 = 2;
const TAG_LEASE_GRANT: u8 = 3;
const TAG_LEASE_REVOKE: u8 = 4;
const TAG_LEASE_CHECKPOINT: u8 = 5;
const TAG_AUTH_ENABLE: u8 = 6;
const TAG_AUTH_USER_PUT: u8 = 7;
const TAG_AUTH_USER_DELETE: u8 = 8;
const TAG_AUTH_ROLE_PUT: u8 = 9;
const TAG_AUTH_ROLE_DELETE: u8 = 10;
const TAG_ALARM_ACTIVATE: u8 = 11;
const TAG_ALARM_DEACTIVATE: u8 = 12;
const TAG_MEMBER_PUBLISH: u8 = 13;
const TAG_AUTH_TOKEN: u8 = 14;
/// The highest `authpb.Permission.Type` (READWRITE).
const MAX_PERM_TYPE: u8 = 2;
const KIND_DELETE: u8 = 0;
const KIND_PUT: u8 = 1;
const KIND_PUT_WITH_LEASE: u8 = 2;
/// Smallest encoded change (sub, kind and key length of one byte each, empty
/// key): bounds the capacity reserved for a claimed change count.
const MIN_CHANGE_BYTES: usize = 3;
/// A u64 needs at most ten 7-bit groups.
const MAX_VARINT_BYTES: usize = 10;

/// What one WAL record of a shard's MVCC state says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogPayload {
    /// The changes of one request, to be passed to `Store::apply(main, &changes)`.
    Changes {
        main: i64,
        changes: Vec<Change>,
    },
    /// A compaction, to be passed to `Store::compact(rev)`.
    Compact {
        rev: i64,
    },
    /// A lease granted with its (already raised to the minimum) TTL in seconds.
    LeaseGrant {
        id: i64,
        ttl_s: i64,
    },
    /// A lease revoked (by a client or by expiry) together with the deletes of every key
    /// attached to it, all at revision `main`; `main` is 0 and `changes` empty when no key
    /// was attached (a revoke then takes no revision, as in etcd).
    LeaseRevoke {
        id: i64,
        main: i64,
        changes: Vec<Change>,
    },
    /// Remaining TTLs of leases at checkpoint time, so a restart does not extend them to
    /// their full TTL. A remaining of 0 clears the lease's checkpoint (it was renewed).
    LeaseCheckpoint {
        checkpoints: Vec<LeaseCheckpoint>,
    },
    /// Auth turned on or off.
    AuthEnable {
        enabled: bool,
    },
    /// A user created or changed: the whole record.
    AuthUserPut(AuthUser),
    AuthUserDelete {
        name: String,
    },
    /// A role created or changed: the whole record.
    AuthRolePut(AuthRole),
    /// A role deleted; replay also takes it from every user that has it (as etcd does).
    AuthRoleDelete {
        name: String,
    },
    /// An alarm raised for a member (etcd's `AlarmRequest` ACTIVATE; NOSPACE when the space
    /// quota is exceeded): it stays raised across restarts until deactivated.
    AlarmActivate(Alarm),
    /// An alarm cleared (`etcdctl alarm disarm`).
    AlarmDeactivate(Alarm),
    /// A member's name and client URLs as it publishes them once started (etcd's publish):
    /// the member table of every member then shows them.
    MemberPublish(MemberAttributes),
    /// A simple auth token issued by the leader of a cluster: every member accepts it from
    /// then on, as etcd replicates its simple tokens through Raft. Tokens live in memory only:
    /// replay after a restart skips it, and it changes no auth revision.
    AuthToken {
        user: String,
        token: String,
    },
}

/// What a member publishes about itself (etcd's `membership.Attributes`, with its id).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberAttributes {
    pub member_id: u64,
    pub name: String,
    pub client_urls: Vec<String>,
}

/// One alarm: the member it is raised for and its `etcdserverpb.AlarmType` number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Alarm {
    pub member_id: u64,
    pub alarm: i32,
}

/// A user as the meta log stores it. The password is only ever stored as a bcrypt hash;
/// `None` is a user added with `no_password` (it cannot authenticate).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthUser {
    pub name: String,
    pub password_hash: Option<String>,
    /// Sorted, without duplicates (etcd keeps them sorted).
    pub roles: Vec<String>,
}

/// A role and its key permissions, in the order they were granted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthRole {
    pub name: String,
    pub perms: Vec<AuthPermission>,
}

/// One `authpb.Permission`: `perm_type` 0 READ, 1 WRITE, 2 READWRITE; `range_end` as in a
/// range request (empty: the key alone, `"\0"`: every key from `key`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthPermission {
    pub perm_type: u8,
    pub key: Vec<u8>,
    pub range_end: Vec<u8>,
}

/// One lease's remaining TTL in a [`LogPayload::LeaseCheckpoint`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseCheckpoint {
    pub id: i64,
    pub remaining_ms: i64,
}

/// Why bytes are not a valid [`LogPayload`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The input ends inside a field.
    Truncated,
    /// The format byte names a version this build does not know.
    UnsupportedFormat(u8),
    UnknownTag(u8),
    UnknownChangeKind(u8),
    /// A varint is longer than its shortest form or exceeds 64 bits.
    BadVarint,
    /// A field holds a value outside its domain.
    Invalid(&'static str),
    /// This many bytes follow a complete payload.
    TrailingBytes(usize),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated => write!(f, "truncated mvcc payload"),
            DecodeError::UnsupportedFormat(v) => write!(f, "unsupported mvcc payload format {v}"),
            DecodeError::UnknownTag(t) => write!(f, "unknown mvcc payload tag {t}"),
            DecodeError::UnknownChangeKind(k) => write!(f, "unknown mvcc change kind {k}"),
            DecodeError::BadVarint => write!(f, "malformed varint in mvcc payload"),
            DecodeError::Invalid(what) => write!(f, "invalid mvcc payload: {what}"),
            DecodeError::TrailingBytes(n) => write!(f, "{n} trailing bytes after mvcc payload"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Encodes `payload` into a new buffer.
pub fn encode(payload: &LogPayload) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(payload, &mut out);
    out
}

/// Appends the encoding of `payload` to `out`. Panics if the payload breaks
/// the invariants that [`decode`] checks (a caller bug, not a data error).
pub fn encode_into(payload: &LogPayload, out: &mut Vec<u8>) {
    out.push(FORMAT_VERSION);
    match payload {
        LogPayload::Changes { main, changes } => {
            assert!(*main > 0, "encoding changes at revision {main}");
            out.push(TAG_CHANGES);
            out.extend_from_slice(&main.to_le_bytes());
            encode_change_list(changes, out);
        }
        LogPayload::Compact { rev } => {
            assert!(*rev > 0, "encoding compaction at revision {rev}");
            out.push(TAG_COMPACT);
            out.extend_from_slice(&rev.to_le_bytes());
        }
        LogPayload::LeaseGrant { id, ttl_s } => {
            assert!(
                *id != 0 && *ttl_s > 0,
                "encoding grant of {id} with TTL {ttl_s}"
            );
            out.push(TAG_LEASE_GRANT);
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&ttl_s.to_le_bytes());
        }
        LogPayload::LeaseRevoke { id, main, changes } => {
            assert!(*id != 0, "encoding revoke of lease 0");
            assert!(
                (*main == 0) == changes.is_empty() && *main >= 0,
                "encoding revoke at revision {main} with {} changes",
                changes.len()
            );
            assert!(
                changes
                    .iter()
                    .all(|c| matches!(c.effect, Effect::Delete { .. })),
                "a revoke only deletes"
            );
            out.push(TAG_LEASE_REVOKE);
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&main.to_le_bytes());
            if *main > 0 {
                encode_change_list(changes, out);
            }
        }
        LogPayload::LeaseCheckpoint { checkpoints } => {
            out.push(TAG_LEASE_CHECKPOINT);
            put_uvar(out, checkpoints.len() as u64);
            for cp in checkpoints {
                assert!(cp.remaining_ms >= 0, "negative remaining TTL");
                out.extend_from_slice(&cp.id.to_le_bytes());
                out.extend_from_slice(&cp.remaining_ms.to_le_bytes());
            }
        }
        LogPayload::AuthEnable { enabled } => {
            out.push(TAG_AUTH_ENABLE);
            out.push(u8::from(*enabled));
        }
        LogPayload::AuthUserPut(user) => {
            out.push(TAG_AUTH_USER_PUT);
            put_str(out, &user.name);
            let hash = user.password_hash.as_deref().unwrap_or_default();
            assert!(
                user.password_hash.is_none() || !hash.is_empty(),
                "an empty password hash"
            );
            put_bytes(out, hash.as_bytes());
            assert!(
                user.roles.windows(2).all(|w| w[0] < w[1]),
                "roles not sorted and distinct"
            );
            put_uvar(out, user.roles.len() as u64);
            user.roles.iter().for_each(|role| put_str(out, role));
        }
        LogPayload::AuthUserDelete { name } => {
            out.push(TAG_AUTH_USER_DELETE);
            put_str(out, name);
        }
        LogPayload::AuthRolePut(role) => {
            out.push(TAG_AUTH_ROLE_PUT);
            put_str(out, &role.name);
            put_uvar(out, role.perms.len() as u64);
            for perm in &role.perms {
                assert!(perm.perm_type <= MAX_PERM_TYPE, "permission type");
                out.push(perm.perm_type);
                put_bytes(out, &perm.key);
                put_bytes(out, &perm.range_end);
            }
        }
        LogPayload::AuthRoleDelete { name } => {
            out.push(TAG_AUTH_ROLE_DELETE);
            put_str(out, name);
        }
        LogPayload::AlarmActivate(alarm) => encode_alarm(TAG_ALARM_ACTIVATE, alarm, out),
        LogPayload::AlarmDeactivate(alarm) => encode_alarm(TAG_ALARM_DEACTIVATE, alarm, out),
        LogPayload::MemberPublish(attributes) => {
            out.push(TAG_MEMBER_PUBLISH);
            out.extend_from_slice(&attributes.member_id.to_le_bytes());
            put_bytes(out, attributes.name.as_bytes());
            put_uvar(out, attributes.client_urls.len() as u64);
            for url in &attributes.client_urls {
                put_bytes(out, url.as_bytes());
            }
        }
        LogPayload::AuthToken { user, token } => {
            out.push(TAG_AUTH_TOKEN);
            put_str(out, user);
            put_str(out, token);
        }
    }
}

fn encode_alarm(tag: u8, alarm: &Alarm, out: &mut Vec<u8>) {
    assert!(alarm.alarm >= 0, "a negative alarm type");
    out.push(tag);
    out.extend_from_slice(&alarm.member_id.to_le_bytes());
    out.extend_from_slice(&i64::from(alarm.alarm).to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, name: &str) {
    assert!(!name.is_empty(), "an empty auth name");
    put_bytes(out, name.as_bytes());
}

fn encode_change_list(changes: &[Change], out: &mut Vec<u8>) {
    put_uvar(out, changes.len() as u64);
    let mut previous_sub = -1;
    for change in changes {
        assert!(
            change.sub > previous_sub,
            "encoding sub {} after {previous_sub}",
            change.sub
        );
        previous_sub = change.sub;
        encode_change(change, out);
    }
}

fn encode_change(change: &Change, out: &mut Vec<u8>) {
    // `sub` is non-negative: the caller asserted it is above the previous one (>= -1).
    put_uvar(out, change.sub as u64);
    match &change.effect {
        Effect::Delete { key } => {
            out.push(KIND_DELETE);
            put_bytes(out, key);
        }
        Effect::Put { key, value, lease } => {
            out.push(if *lease == 0 {
                KIND_PUT
            } else {
                KIND_PUT_WITH_LEASE
            });
            put_bytes(out, key);
            put_bytes(out, value);
            if *lease != 0 {
                out.extend_from_slice(&lease.to_le_bytes());
            }
        }
    }
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_uvar(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn put_uvar(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Decodes one payload that must span all of `bytes`.
pub fn decode(bytes: &[u8]) -> Result<LogPayload, DecodeError> {
    let mut reader = Reader { rest: bytes };
    let format = reader.u8()?;
    if format != FORMAT_VERSION {
        return Err(DecodeError::UnsupportedFormat(format));
    }
    let payload = match reader.u8()? {
        TAG_CHANGES => decode_changes(&mut reader)?,
        TAG_COMPACT => LogPayload::Compact {
            rev: reader.revision()?,
        },
        TAG_LEASE_GRANT => decode_lease_grant(&mut reader)?,
        TAG_LEASE_REVOKE => decode_lease_revoke(&mut reader)?,
        TAG_LEASE_CHECKPOINT => decode_lease_checkpoint(&mut reader)?,
        TAG_AUTH_ENABLE => match reader.u8()? {
            0 => LogPayload::AuthEnable { enabled: false },
            1 => LogPayload::AuthEnable { enabled: true },
            _ => return Err(DecodeError::Invalid("auth enable flag not 0 or 1")),
        },
        TAG_AUTH_USER_PUT => decode_auth_user(&mut reader)?,
        TAG_AUTH_USER_DELETE => LogPayload::AuthUserDelete {
            name: reader.name()?,
        },
        TAG_AUTH_ROLE_PUT => decode_auth_role(&mut reader)?,
        TAG_AUTH_ROLE_DELETE => LogPayload::AuthRoleDelete {
            name: reader.name()?,
        },
        TAG_ALARM_ACTIVATE => LogPayload::AlarmActivate(decode_alarm(&mut reader)?),
        TAG_ALARM_DEACTIVATE => LogPayload::AlarmDeactivate(decode_alarm(&mut reader)?),
        TAG_MEMBER_PUBLISH => LogPayload::MemberPublish(decode_member_publish(&mut reader)?),
        TAG_AUTH_TOKEN => LogPayload::AuthToken {
            user: reader.name()?,
            token: reader.name()?,
        },
        tag => return Err(DecodeError::UnknownTag(tag)),
    };
    match reader.rest.len() {
        0 => Ok(payload),
        n => Err(DecodeError::TrailingBytes(n)),
    }
}

fn decode_changes(reader: &mut Reader<'_>) -> Result<LogPayload, DecodeError> {
    let main = reader.revision()?;
    let changes = decode_change_list(reader)?;
    Ok(LogPayload::Changes { main, changes })
}

fn decode_change_list(reader: &mut Reader<'_>) -> Result<Vec<Change>, DecodeError> {
    let count = reader.uvar()?;
    // A garbage count must not reserve more than the input could hold.
    let capacity = usize::try_from(count)
        .unwrap_or(usize::MAX)
        .min(reader.rest.len() / MIN_CHANGE_BYTES);
    let mut changes = Vec::with_capacity(capacity);
    let mut previous_sub = -1;
    for _ in 0..count {
        let change = decode_change(reader)?;
        if change.sub <= previous_sub {
            return Err(DecodeError::Invalid("subs not strictly increasing"));
        }
        previous_sub = change.sub;
        changes.push(change);
    }
    Ok(changes)
}

fn lease_id(reader: &mut Reader<'_>) -> Result<i64, DecodeError> {
    match reader.i64()? {
        0 => Err(DecodeError::Invalid("lease id 0")),
        id => Ok(id),
    }
}

fn decode_lease_grant(reader: &mut Reader<'_>) -> Result<LogPayload, DecodeError> {
    let id = lease_id(reader)?;
    match reader.i64()? {
        ttl_s if ttl_s > 0 => Ok(LogPayload::LeaseGrant { id, ttl_s }),
        _ => Err(DecodeError::Invalid("lease TTL not positive")),
    }
}

fn decode_lease_revoke(reader: &mut Reader<'_>) -> Result<LogPayload, DecodeError> {
    let id = lease_id(reader)?;
    let main = reader.i64()?;
    let changes = match main {
        0 => Vec::new(),
        main if main > 0 => decode_change_list(reader)?,
        _ => return Err(DecodeError::Invalid("revision negative")),
    };
    if main > 0 && changes.is_empty() {
        return Err(DecodeError::Invalid("revoke at a revision without deletes"));
    }
    if !changes
        .iter()
        .all(|c| matches!(c.effect, Effect::Delete { .. }))
    {
        return Err(DecodeError::Invalid("revoke with a put"));
    }
    Ok(LogPayload::LeaseRevoke { id, main, changes })
}

/// Bytes of one encoded checkpoint: bounds the capacity reserved for a claimed count.
const CHECKPOINT_BYTES: usize = 16;

fn decode_lease_checkpoint(reader: &mut Reader<'_>) -> Result<LogPayload, DecodeError> {
    let count = reader.uvar()?;
    let capacity = usize::try_from(count)
        .unwrap_or(usize::MAX)
        .min(reader.rest.len() / CHECKPOINT_BYTES);
    let mut checkpoints = Vec::with_capacity(capacity);
    for _ in 0..count {
        let id = lease_id(reader)?;
        let remaining_ms = reader.i64()?;
        if remaining_ms < 0 {
            return Err(DecodeError::Invalid("negative remaining TTL"));
        }
        checkpoints.push(LeaseCheckpoint { id, remaining_ms });
    }
    Ok(LogPayload::LeaseCheckpoint { checkpoints })
}

/// Smallest encoded role name or permission: bounds the capacity reserved for a claimed count.
const MIN_AUTH_ITEM_BYTES: usize = 2;

fn auth_capacity(count: u64, reader: &Reader<'_>) -> usize {
    usize::try_from(count)
        .unwrap_or(usize::MAX)
        .min(reader.rest.len() / MIN_AUTH_ITEM_BYTES)
}

fn decode_auth_user(reader: &mut Reader<'_>) -> Result<LogPayload, DecodeError> {
    let name = reader.name()?;
    let hash = reader.bytes()?;
    let password_hash = match hash.is_empty() {
        true => None,
        false => Some(
            String::from_utf8(hash.to_vec())
                .map_err(|_| DecodeError::Invalid("password hash not utf-8"))?,
        ),
    };
    let count = reader.uvar()?;
    let mut roles = Vec::with_capacity(auth_capacity(count, reader));
    for _ in 0..count {
        roles.push(reader.name()?);
    }
    if !roles.windows(2).all(|w| w[0] < w[1]) {
        return Err(DecodeError::Invalid("roles not sorted and distinct"));
    }
    Ok(LogPayload::AuthUserPut(AuthUser {
        name,
        password_hash,
        roles,
    }))
}

fn decode_auth_role(reader: &mut Reader<'_>) -> Result<LogPayload, DecodeError> {
    let name = reader.name()?;
    let count = reader.uvar()?;
    let mut perms = Vec::with_capacity(auth_capacity(count, reader));
    for _ in 0..count {
        let perm_type = reader.u8()?;
        if perm_type > MAX_PERM_TYPE {
            return Err(DecodeError::Invalid("unknown permission type"));
        }
        perms.push(AuthPermission {
            perm_type,
            key: reader.bytes()?.to_vec(),
            range_end: reader.bytes()?.to_vec(),
        });
    }
    Ok(LogPayload::AuthRolePut(AuthRole { name, perms }))
}

fn decode_member_publish(reader: &mut Reader<'_>) -> Result<MemberAttributes, DecodeError> {
    let member_id = reader.i64()? as u64;
    let text = |bytes: &[u8]| {
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::Invalid("member text not utf-8"))
    };
    let name = text(reader.bytes()?)?;
    let count = reader.uvar()?;
    let mut client_urls = Vec::new();
    for _ in 0..count {
        client_urls.push(text(reader.bytes()?)?);
    }
    Ok(MemberAttributes {
        member_id,
        name,
        client_urls,
    })
}

fn decode_alarm(reader: &mut Reader<'_>) -> Result<Alarm, DecodeError> {
    let member_id = reader.i64()? as u64;
    let alarm = i32::try_from(reader.i64()?)
        .ok()
        .filter(|alarm| *alarm >= 0)
        .ok_or(DecodeError::Invalid("alarm type outside 0..=i32::MAX"))?;
    Ok(Alarm { member_id, alarm })
}

fn decode_change(reader: &mut Reader<'_>) -> Result<Change, DecodeError> {
    let sub =
        i64::try_from(reader.uvar()?).map_err(|_| DecodeError::Invalid("sub above i64::MAX"))?;
    let kind = reader.u8()?;
    let key = reader.bytes()?.to_vec();
    let effect = match kind {
        KIND_DELETE => Effect::Delete { key },
        KIND_PUT => Effect::Put {
            key,
            value: reader.bytes()?.to_vec(),
            lease: 0,
        },
        KIND_PUT_WITH_LEASE => {
            let value = reader.bytes()?.to_vec();
            let lease = reader.i64()?;
            if lease == 0 {
                return Err(DecodeError::Invalid("explicit zero lease"));
            }
            Effect::Put { key, value, lease }
        }
        kind => return Err(DecodeError::UnknownChangeKind(kind)),
    };
    Ok(Change { sub, effect })
}

/// A bounds-checked cursor over the input.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], DecodeError> {
        if len > self.rest.len() {
            return Err(DecodeError::Truncated);
        }
        let (taken, rest) = self.rest.split_at(len);
        self.rest = rest;
        Ok(taken)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn i64(&mut self) -> Result<i64, DecodeError> {
        let bytes = self.take(8)?;
        Ok(i64::from_le_bytes(bytes.try_into().expect("took 8 bytes")))
    }

    fn revision(&mut self) -> Result<i64, DecodeError> {
        match self.i64()? {
            rev if rev > 0 => Ok(rev),
            _ => Err(DecodeError::Invalid("revision not positive")),
        }
    }

    fn uvar(&mut self) -> Result<u64, DecodeError> {
        let mut value = 0u64;
        for index in 0..MAX_VARINT_BYTES {
            let byte = self.u8()?;
            let group = u64::from(byte & 0x7f);
            let shift = 7 * index as u32;
            // The tenth group may only hold the single top bit of a u64.
            if shift == 63 && group > 1 {
                return Err(DecodeError::BadVarint);
            }
            value |= group << shift;
            if byte & 0x80 == 0 {
                // A zero final group after the first byte is an overlong form.
                return if index > 0 && group == 0 {
                    Err(DecodeError::BadVarint)
                } else {
                    Ok(value)
                };
            }
        }
        Err(DecodeError::BadVarint)
    }

    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = usize::try_from(self.uvar()?).map_err(|_| DecodeError::Truncated)?;
        self.take(len)
    }

    /// A user or role name: non-empty utf-8.
    fn name(&mut self) -> Result<String, DecodeError> {
        match std::str::from_utf8(self.bytes()?) {
            Ok("") => Err(DecodeError::Invalid("empty auth name")),
            Ok(name) => Ok(name.to_string()),
            Err(_) => Err(DecodeError::Invalid("auth name not utf-8")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(sub: i64, key: &[u8], value: &[u8], lease: i64) -> Change {
        Change {
            sub,
            effect: Effect::Put {
                key: key.to_vec(),
                value: value.to_vec(),
                lease,
            },
        }
    }

    #[test]
    fn small_put_has_documented_layout() {
        let payload = LogPayload::Changes {
            main: 5,
            changes: vec![put(0, b"k", b"vv", 0)],
        };
        let bytes = encode(&payload);
        assert_eq!(
            bytes,
            [1, 1, 5, 0, 0, 0, 0, 0, 0, 0, 1, 0, KIND_PUT, 1, b'k', 2, b'v', b'v']
        );
        assert_eq!(decode(&bytes), Ok(payload));
    }

    #[test]
    fn lease_and_delete_round_trip() {
        let payload = LogPayload::Changes {
            main: i64::MAX,
            changes: vec![
                put(3, b"a", b"", -9),
                Change {
                    sub: 300,
                    effect: Effect::Delete { key: b"b".to_vec() },
                },
            ],
        };
        assert_eq!(decode(&encode(&payload)), Ok(payload));
        let compact = LogPayload::Compact { rev: 42 };
        assert_eq!(decode(&encode(&compact)), Ok(compact));
    }

    #[test]
    fn varint_edges() {
        for value in [0, 1, 127, 128, 16_383, 16_384, u64::MAX >> 1, u64::MAX] {
            let mut out = Vec::new();
            put_uvar(&mut out, value);
            let mut reader = Reader { rest: &out };
            assert_eq!(reader.uvar(), Ok(value));
            assert!(reader.rest.is_empty());
        }
        let overlong: &[u8] = &[0x80, 0x00];
        assert_eq!(
            Reader { rest: overlong }.uvar(),
            Err(DecodeError::BadVarint)
        );
        let overflow: &[u8] = &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02];
        assert_eq!(
            Reader { rest: overflow }.uvar(),
            Err(DecodeError::BadVarint)
        );
        let unterminated: &[u8] = &[0x80; 11];
        assert_eq!(
            Reader { rest: unterminated }.uvar(),
            Err(DecodeError::BadVarint)
        );
    }

    #[test]
    fn rejects_malformed_payloads() {
        let compact = encode(&LogPayload::Compact { rev: 1 });
        let mut trailing = compact.clone();
        trailing.push(0);
        assert_eq!(decode(&trailing), Err(DecodeError::TrailingBytes(1)));
        assert_eq!(decode(&compact[..5]), Err(DecodeError::Truncated));
        assert_eq!(decode(&[]), Err(DecodeError::Truncated));
        assert_eq!(decode(&[2, 2]), Err(DecodeError::UnsupportedFormat(2)));
        assert_eq!(decode(&[1, 99]), Err(DecodeError::UnknownTag(99)));
        let zero_rev = [1, TAG_COMPACT, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(
            decode(&zero_rev),
            Err(DecodeError::Invalid("revision not positive"))
        );
        // Two changes with sub 0: not strictly increasing.
        let mut dup = vec![1, TAG_CHANGES, 1, 0, 0, 0, 0, 0, 0, 0, 2];
        dup.extend_from_slice(&[0, KIND_DELETE, 1, b'a', 0, KIND_DELETE, 1, b'b']);
        assert_eq!(
            decode(&dup),
            Err(DecodeError::Invalid("subs not strictly increasing"))
        );
        let zero_lease = [
            1,
            TAG_CHANGES,
            1,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            1,
            0,
            KIND_PUT_WITH_LEASE,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
        ];
        assert_eq!(
            decode(&zero_lease),
            Err(DecodeError::Invalid("explicit zero lease"))
        );
        let bad_kind = [1, TAG_CHANGES, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 7, 0];
        assert_eq!(decode(&bad_kind), Err(DecodeError::UnknownChangeKind(7)));
    }

    #[test]
    fn alarm_payloads_round_trip() {
        let alarm = Alarm {
            member_id: u64::MAX,
            alarm: 1,
        };
        for payload in [
            LogPayload::AlarmActivate(alarm),
            LogPayload::AlarmDeactivate(Alarm {
                member_id: 7,
                alarm: i32::MAX,
            }),
        ] {
            assert_eq!(decode(&encode(&payload)), Ok(payload));
        }
        let bytes = encode(&LogPayload::AlarmActivate(alarm));
        assert_eq!(bytes.len(), 18, "format, tag, member id, alarm");
        let mut negative = bytes.clone();
        negative[10..18].copy_from_slice(&(-1i64).to_le_bytes());
        assert!(matches!(decode(&negative), Err(DecodeError::Invalid(_))));
        let mut too_big = bytes.clone();
        too_big[10..18].copy_from_slice(&(1i64 << 40).to_le_bytes());
        assert!(matches!(decode(&too_big), Err(DecodeError::Invalid(_))));
        assert_eq!(decode(&bytes[..17]), Err(DecodeError::Truncated));
    }

    #[test]
    fn auth_token_round_trips() {
        let payload = LogPayload::AuthToken {
            user: "alice".to_string(),
            token: "AbCdEfGhIjKlMnOp.7".to_string(),
        };
        let bytes = encode(&payload);
        assert_eq!(decode(&bytes), Ok(payload));
        assert_eq!(
            decode(&bytes[..bytes.len() - 1]),
            Err(DecodeError::Truncated)
        );
        // The one-letter token's length and letter, replaced by an empty token.
        let mut empty_token = encode(&LogPayload::AuthToken {
            user: "alice".to_string(),
            token: "x".to_string(),
        });
        empty_token.truncate(empty_token.len() - 2);
        empty_token.push(0);
        assert!(matches!(decode(&empty_token), Err(DecodeError::Invalid(_))));
    }

    #[test]
    fn member_publish_round_trips() {
        let publish = |name: &str, client_urls: &[&str]| {
            LogPayload::MemberPublish(MemberAttributes {
                member_id: u64::MAX - 5,
                name: name.to_string(),
                client_urls: client_urls.iter().map(|u| u.to_string()).collect(),
            })
        };
        let full = publish("m1", &["http://127.0.0.1:2379", "https://h:1"]);
        for payload in [full.clone(), publish("", &[])] {
            assert_eq!(decode(&encode(&payload)), Ok(payload));
        }
        let bytes = encode(&full);
        assert_eq!(
            decode(&bytes[..bytes.len() - 1]),
            Err(DecodeError::Truncated)
        );
        let mut not_utf8 = bytes.clone();
        not_utf8[11] = 0xff;
        assert!(matches!(decode(&not_utf8), Err(DecodeError::Invalid(_))));
    }

    #[test]
    fn lease_payloads_round_trip() {
        let delete = |sub: i64, key: &[u8]| Change {
            sub,
            effect: Effect::Delete { key: key.to_vec() },
        };
        let payloads = [
            LogPayload::LeaseGrant { id: -5, ttl_s: 2 },
            LogPayload::LeaseGrant {
                id: i64::MAX,
                ttl_s: 9_000_000_000,
            },
            LogPayload::LeaseRevoke {
                id: 7,
                main: 0,
                changes: Vec::new(),
            },
            LogPayload::LeaseRevoke {
                id: 7,
                main: 12,
                changes: vec![delete(0, b"a"), delete(1, b"b")],
            },
            LogPayload::LeaseCheckpoint {
                checkpoints: vec![
                    LeaseCheckpoint {
                        id: 1,
                        remaining_ms: 0,
                    },
                    LeaseCheckpoint {
                        id: -3,
                        remaining_ms: 299_999,
                    },
                ],
            },
            LogPayload::LeaseCheckpoint {
                checkpoints: Vec::new(),
            },
        ];
        for payload in payloads {
            assert_eq!(decode(&encode(&payload)), Ok(payload));
        }
        let grant = encode(&LogPayload::LeaseGrant { id: 1, ttl_s: 1 });
        assert_eq!(grant.len(), 18, "format, tag, id, ttl");
    }

    #[test]
    fn rejects_malformed_lease_payloads() {
        let mut zero_id = vec![1, TAG_LEASE_GRANT];
        zero_id.extend_from_slice(&0i64.to_le_bytes());
        zero_id.extend_from_slice(&5i64.to_le_bytes());
        assert_eq!(decode(&zero_id), Err(DecodeError::Invalid("lease id 0")));
        let mut zero_ttl = vec![1, TAG_LEASE_GRANT];
        zero_ttl.extend_from_slice(&1i64.to_le_bytes());
        zero_ttl.extend_from_slice(&0i64.to_le_bytes());
        assert_eq!(
            decode(&zero_ttl),
            Err(DecodeError::Invalid("lease TTL not positive"))
        );
        // A revoke at revision 3 that puts instead of deleting.
        let mut revoke_put = vec![1, TAG_LEASE_REVOKE];
        revoke_put.extend_from_slice(&1i64.to_le_bytes());
        revoke_put.extend_from_slice(&3i64.to_le_bytes());
        revoke_put.extend_from_slice(&[1, 0, KIND_PUT, 1, b'k', 0]);
        assert_eq!(
            decode(&revoke_put),
            Err(DecodeError::Invalid("revoke with a put"))
        );
        let mut revoke_empty = vec![1, TAG_LEASE_REVOKE];
        revoke_empty.extend_from_slice(&1i64.to_le_bytes());
        revoke_empty.extend_from_slice(&3i64.to_le_bytes());
        revoke_empty.push(0);
        assert_eq!(
            decode(&revoke_empty),
            Err(DecodeError::Invalid("revoke at a revision without deletes"))
        );
        let mut negative = vec![1, TAG_LEASE_CHECKPOINT, 1];
        negative.extend_from_slice(&1i64.to_le_bytes());
        negative.extend_from_slice(&(-1i64).to_le_bytes());
        assert_eq!(
            decode(&negative),
            Err(DecodeError::Invalid("negative remaining TTL"))
        );
        let mut huge = vec![1, TAG_LEASE_CHECKPOINT];
        put_uvar(&mut huge, u64::MAX);
        assert_eq!(decode(&huge), Err(DecodeError::Truncated));
    }

    fn auth_payloads() -> Vec<LogPayload> {
        vec![
            LogPayload::AuthEnable { enabled: true },
            LogPayload::AuthEnable { enabled: false },
            LogPayload::AuthUserPut(AuthUser {
                name: "root".into(),
                password_hash: Some("$2a$10$abcdefghijklmnopqrstuv".into()),
                roles: vec!["a".into(), "root".into()],
            }),
            LogPayload::AuthUserPut(AuthUser {
                name: "nopass".into(),
                password_hash: None,
                roles: Vec::new(),
            }),
            LogPayload::AuthUserDelete { name: "u".into() },
            LogPayload::AuthRolePut(AuthRole {
                name: "r".into(),
                perms: vec![
                    AuthPermission {
                        perm_type: 2,
                        key: b"foo".to_vec(),
                        range_end: b"fop".to_vec(),
                    },
                    AuthPermission {
                        perm_type: 0,
                        key: vec![0],
                        range_end: vec![0],
                    },
                ],
            }),
            LogPayload::AuthRoleDelete { name: "r".into() },
        ]
    }

    #[test]
    fn auth_payloads_round_trip() {
        for payload in auth_payloads() {
            assert_eq!(decode(&encode(&payload)), Ok(payload));
        }
        let delete = encode(&LogPayload::AuthUserDelete { name: "u".into() });
        assert_eq!(delete, [1, TAG_AUTH_USER_DELETE, 1, b'u']);
    }

    #[test]
    fn rejects_malformed_auth_payloads() {
        assert_eq!(
            decode(&[1, TAG_AUTH_ENABLE, 2]),
            Err(DecodeError::Invalid("auth enable flag not 0 or 1"))
        );
        assert_eq!(
            decode(&[1, TAG_AUTH_ROLE_DELETE, 0]),
            Err(DecodeError::Invalid("empty auth name"))
        );
        assert_eq!(
            decode(&[1, TAG_AUTH_USER_DELETE, 1, 0xff]),
            Err(DecodeError::Invalid("auth name not utf-8"))
        );
        // User "u", no password, roles "b" then "a".
        let unsorted = [1, TAG_AUTH_USER_PUT, 1, b'u', 0, 2, 1, b'b', 1, b'a'];
        assert_eq!(
            decode(&unsorted),
            Err(DecodeError::Invalid("roles not sorted and distinct"))
        );
        // Role "r" with one permission of type 3.
        let bad_type = [1, TAG_AUTH_ROLE_PUT, 1, b'r', 1, 3, 0, 0];
        assert_eq!(
            decode(&bad_type),
            Err(DecodeError::Invalid("unknown permission type"))
        );
        let mut huge = vec![1, TAG_AUTH_ROLE_PUT, 1, b'r'];
        put_uvar(&mut huge, u64::MAX);
        assert_eq!(decode(&huge), Err(DecodeError::Truncated));
        for payload in auth_payloads() {
            let bytes = encode(&payload);
            for cut in 0..bytes.len() {
                assert!(decode(&bytes[..cut]).is_err(), "{payload:?} cut at {cut}");
            }
        }
    }

    #[test]
    fn huge_claimed_count_is_rejected_without_allocating_it() {
        let mut bytes = vec![1, TAG_CHANGES, 1, 0, 0, 0, 0, 0, 0, 0];
        put_uvar(&mut bytes, u64::MAX);
        assert_eq!(decode(&bytes), Err(DecodeError::Truncated));
    }
}
