//! The auth state machine: users, roles, the enabled flag and the auth revision, with etcd
//! 3.4's rules for every management operation and its permission checks. Pure: no I/O, no
//! locks. The meta group plans an operation against the current state ([`AuthState::plan`]),
//! makes the resulting record durable, then applies it ([`AuthState::apply`]); recovery
//! applies the same records in log order, so both arrive at the same state.

use super::AuthError;
use ferrocd_engine::mvcc::codec::{AuthPermission, AuthRole, AuthUser, LogPayload};
use std::collections::BTreeMap;

/// etcd's names for the superuser and its role.
pub const ROOT_USER: &str = "root";
pub const ROOT_ROLE: &str = "root";

/// `authpb.Permission.Type` values.
pub const PERM_READ: u8 = 0;
pub const PERM_WRITE: u8 = 1;
pub const PERM_READWRITE: u8 = 2;

/// What a request needs on a key range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// A management operation of the Auth service, with passwords already hashed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminOp {
    Enable,
    Disable,
    /// `password_hash` `None`: a user added with `no_password`.
    UserAdd {
        name: String,
        password_hash: Option<String>,
    },
    UserDelete {
        name: String,
    },
    UserChangePassword {
        name: String,
        password_hash: String,
    },
    UserGrantRole {
        user: String,
        role: String,
    },
    UserRevokeRole {
        name: String,
        role: String,
    },
    RoleAdd {
        name: String,
    },
    RoleDelete {
        name: String,
    },
    RoleGrantPermission {
        name: String,
        perm: AuthPermission,
    },
    RoleRevokePermission {
        role: String,
        key: Vec<u8>,
        range_end: Vec<u8>,
    },
    /// A simple token the leader issued to `user`, for every member to accept.
    IssueToken {
        user: String,
        token: String,
    },
}

#[derive(Clone, Debug)]
pub struct AuthState {
    pub enabled: bool,
    /// Counts committed auth changes; starts at 1 like etcd's.
    pub revision: u64,
    users: BTreeMap<String, AuthUser>,
    roles: BTreeMap<String, AuthRole>,
}

impl Default for AuthState {
    fn default() -> Self {
        AuthState {
            enabled: false,
            revision: 1,
            users: BTreeMap::new(),
            roles: BTreeMap::new(),
        }
    }
}

impl AuthState {
    /// The record that carries out `op`, or `None` when `op` changes nothing but succeeds
    /// (enabling twice, granting a role the user has), or etcd's error for it.
    pub fn plan(&self, op: AdminOp) -> Result<Option<LogPayload>, AuthError> {
        use AdminOp::*;
        let user_put = |user: AuthUser| Ok(Some(LogPayload::AuthUserPut(user)));
        let role_put = |role: AuthRole| Ok(Some(LogPayload::AuthRolePut(role)));
        match op {
            Enable if self.enabled => Ok(None),
            Enable => {
                let root = self
                    .users
                    .get(ROOT_USER)
                    .ok_or(AuthError::RootUserNotExist)?;
                if !has_root_role(root) {
                    return Err(AuthError::RootRoleNotExist);
                }
                Ok(Some(LogPayload::AuthEnable { enabled: true }))
            }
            Disable if !self.enabled => Ok(None),
            Disable => Ok(Some(LogPayload::AuthEnable { enabled: false })),
            UserAdd {
                name,
                password_hash,
            } => {
                if name.is_empty() {
                    return Err(AuthError::UserEmpty);
                }
                if self.users.contains_key(&name) {
                    return Err(AuthError::UserAlreadyExist);
                }
                user_put(AuthUser {
                    name,
                    password_hash,
                    roles: Vec::new(),
                })
            }
            UserDelete { name } => {
                if self.enabled && name == ROOT_USER {
                    return Err(AuthError::InvalidAuthMgmt);
                }
                self.user(&name)?;
                Ok(Some(LogPayload::AuthUserDelete { name }))
            }
            UserChangePassword {
                name,
                password_hash,
            } => {
                let mut user = self.user(&name)?.clone();
                // A no-password user stays one (etcd keeps the user's options).
                if user.password_hash.is_some() {
                    user.password_hash = Some(password_hash);
                }
                user_put(user)
            }
            UserGrantRole { user, role } => {
                let mut record = self.user(&user)?.clone();
                if role != ROOT_ROLE && !self.roles.contains_key(&role) {
                    return Err(AuthError::RoleNotFound);
                }
                match record.roles.binary_search(&role) {
                    Ok(_) => Ok(None),
                    Err(at) => {
                        record.roles.insert(at, role);
                        user_put(record)
                    }
                }
            }
            UserRevokeRole { name, role } => {
                if self.enabled && name == ROOT_USER && role == ROOT_ROLE {
                    return Err(AuthError::InvalidAuthMgmt);
                }
                let mut record = self.user(&name)?.clone();
                let at = record
                    .roles
                    .binary_search(&role)
                    .map_err(|_| AuthError::RoleNotGranted)?;
                record.roles.remove(at);
                user_put(record)
            }
            RoleAdd { name } => {
                if name.is_empty() {
                    return Err(AuthError::RoleEmpty);
                }
                if self.roles.contains_key(&name) {
                    return Err(AuthError::RoleAlreadyExist);
                }
                role_put(AuthRole {
                    name,
                    perms: Vec::new(),
                })
            }
            RoleDelete { name } => {
                if self.enabled && name == ROOT_ROLE {
                    return Err(AuthError::InvalidAuthMgmt);
                }
                self.role(&name)?;
                Ok(Some(LogPayload::AuthRoleDelete { name }))
            }
            RoleGrantPermission { name, perm } => {
                let mut role = self.role(&name)?.clone();
                let same =
                    |p: &&mut AuthPermission| p.key == perm.key && p.range_end == perm.range_end;
                match role.perms.iter_mut().find(same) {
                    Some(existing) => existing.perm_type = perm.perm_type,
                    None => {
                        role.perms.push(perm);
                        // etcd keeps a role's permissions sorted by key.
                        role.perms.sort_by(|a, b| a.key.cmp(&b.key));
                    }
                }
                role_put(role)
            }
            RoleRevokePermission {
                role,
                key,
                range_end,
            } => {
                let mut record = self.role(&role)?.clone();
                let before = record.perms.len();
                record
                    .perms
                    .retain(|p| p.key != key || p.range_end != range_end);
                if record.perms.len() == before {
                    return Err(AuthError::PermissionNotGranted);
                }
                role_put(record)
            }
            // The user may have gone since its password was checked.
            IssueToken { user, token } => {
                self.users.get(&user).ok_or(AuthError::AuthFailed)?;
                Ok(Some(LogPayload::AuthToken { user, token }))
            }
        }
    }

    /// Applies a record made by [`AuthState::plan`] (or read back from the log); `false` for
    /// payloads that are not auth records.
    pub fn apply(&mut self, payload: &LogPayload) -> bool {
        match payload {
            LogPayload::AuthEnable { enabled } => self.enabled = *enabled,
            LogPayload::AuthUserPut(user) => {
                self.users.insert(user.name.clone(), user.clone());
            }
            LogPayload::AuthUserDelete { name } => {
                self.users.remove(name);
            }
            LogPayload::AuthRolePut(role) => {
                self.roles.insert(role.name.clone(), role.clone());
            }
            LogPayload::AuthRoleDelete { name } => {
                self.roles.remove(name);
                for user in self.users.values_mut() {
                    user.roles.retain(|r| r != name);
                }
            }
            _ => return false,
        }
        self.revision += 1;
        true
    }

    pub fn user(&self, name: &str) -> Result<&AuthUser, AuthError> {
        self.users.get(name).ok_or(AuthError::UserNotFound)
    }

    pub fn role(&self, name: &str) -> Result<&AuthRole, AuthError> {
        self.roles.get(name).ok_or(AuthError::RoleNotFound)
    }

    /// User names in order (etcd lists its bucket in key order).
    pub fn user_names(&self) -> Vec<String> {
        self.users.keys().cloned().collect()
    }

    pub fn role_names(&self) -> Vec<String> {
        self.roles.keys().cloned().collect()
    }

    /// Whether `user` exists and has the root role.
    pub fn is_root(&self, user: &str) -> bool {
        self.users.get(user).is_some_and(has_root_role)
    }

    pub fn has_role(&self, user: &str, role: &str) -> bool {
        self.users
            .get(user)
            .is_some_and(|u| u.roles.iter().any(|r| r == role))
    }

    /// etcd's `isOpPermitted` for a known caller: an unknown user is denied, the root role
    /// may do anything, anyone else needs `access` on all of `[key, range_end)` (a single
    /// key when `range_end` is empty) from the union of their roles' permissions.
    pub fn is_permitted(
        &self,
        user: &str,
        key: &[u8],
        range_end: &[u8],
        access: Access,
    ) -> Result<(), AuthError> {
        let record = self.users.get(user).ok_or(AuthError::PermissionDenied)?;
        if has_root_role(record) {
            return Ok(());
        }
        let granted = record
            .roles
            .iter()
            .filter_map(|name| self.roles.get(name))
            .flat_map(|role| role.perms.iter())
            .filter(|p| grants(p.perm_type, access))
            .map(|p| Interval::of_perm(&p.key, &p.range_end));
        let union = merge(granted.collect());
        let covered = match range_end.is_empty() {
            true => union.iter().any(|ivl| ivl.contains_point(key)),
            false => {
                let wanted = Interval::of_range(key, range_end);
                union.iter().any(|ivl| ivl.covers(&wanted))
            }
        };
        match covered {
            true => Ok(()),
            false => Err(AuthError::PermissionDenied),
        }
    }
}

fn has_root_role(user: &AuthUser) -> bool {
    user.roles.iter().any(|r| r == ROOT_ROLE)
}

fn grants(perm_type: u8, access: Access) -> bool {
    match access {
        Access::Read => perm_type == PERM_READ || perm_type == PERM_READWRITE,
        Access::Write => perm_type == PERM_WRITE || perm_type == PERM_READWRITE,
    }
}

/// `[start, end)` over keys; `end` `None` is unbounded.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Interval {
    start: Vec<u8>,
    end: Option<Vec<u8>>,
}

impl Interval {
    /// A permission's keys: a single key (empty `range_end`: `[key, key + "\0")`), every key
    /// from `key` (`"\0"`), or `[key, range_end)`.
    fn of_perm(key: &[u8], range_end: &[u8]) -> Interval {
        if range_end.is_empty() {
            let mut end = key.to_vec();
            end.push(0);
            return Interval {
                start: key.to_vec(),
                end: Some(end),
            };
        }
        Interval::of_range(key, range_end)
    }

    /// A request's non-empty range (`"\0"` = every key from `key`).
    fn of_range(key: &[u8], range_end: &[u8]) -> Interval {
        Interval {
            start: key.to_vec(),
            end: (range_end != [0]).then(|| range_end.to_vec()),
        }
    }

    fn contains_point(&self, key: &[u8]) -> bool {
        self.start.as_slice() <= key && self.end.as_ref().is_none_or(|end| key < end.as_slice())
    }

    fn covers(&self, other: &Interval) -> bool {
        let end_ok = match (&self.end, &other.end) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(mine), Some(theirs)) => theirs <= mine,
        };
        self.start <= other.start && end_ok
    }
}

/// Sorts and unites overlapping or touching intervals, so coverage by the union is
/// coverage by one of them (etcd's `unifyPerms`).
fn merge(mut intervals: Vec<Interval>) -> Vec<Interval> {
    intervals.sort_by(|a, b| a.start.cmp(&b.start));
    let mut merged: Vec<Interval> = Vec::with_capacity(intervals.len());
    for ivl in intervals {
        match merged.last_mut() {
            Some(last) if last.end.as_ref().is_none_or(|end| ivl.start <= *end) => {
                last.end = match (&last.end, ivl.end) {
                    (None, _) | (_, None) => None,
                    (Some(a), Some(b)) => Some(b.max(a.clone())),
                };
            }
            _ => merged.push(ivl),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    fn perm(perm_type: u8, key: &[u8], range_end: &[u8]) -> AuthPermission {
        AuthPermission {
            perm_type,
            key: key.to_vec(),
            range_end: range_end.to_vec(),
        }
    }

    /// A state with user `u` holding role `r` with `perms`, and user `root` with the root role.
    fn state_with(perms: Vec<AuthPermission>) -> AuthState {
        let mut state = AuthState::default();
        let ops = [
            AdminOp::UserAdd {
                name: "root".into(),
                password_hash: None,
            },
            AdminOp::UserGrantRole {
                user: "root".into(),
                role: "root".into(),
            },
            AdminOp::UserAdd {
                name: "u".into(),
                password_hash: None,
            },
            AdminOp::RoleAdd { name: "r".into() },
            AdminOp::UserGrantRole {
                user: "u".into(),
                role: "r".into(),
            },
        ];
        let grants = perms.into_iter().map(|perm| AdminOp::RoleGrantPermission {
            name: "r".into(),
            perm,
        });
        for op in ops.into_iter().chain(grants) {
            let payload = state.plan(op).unwrap().expect("a change");
            assert!(state.apply(&payload));
        }
        state
    }

    #[test]
    fn ranges_are_covered_by_the_union_of_grants() {
        let state = state_with(vec![
            perm(PERM_READ, b"a", b"c"),
            perm(PERM_READWRITE, b"c", b"e"),
            perm(PERM_WRITE, b"x", &[0]),
            perm(PERM_READ, b"k", b""),
        ]);
        let ok = |key: &[u8], end: &[u8], access| state.is_permitted("u", key, end, access).is_ok();
        assert!(ok(b"a", b"e", Access::Read), "two touching grants unite");
        assert!(!ok(b"a", b"e", Access::Write));
        assert!(ok(b"c", b"d", Access::Write));
        assert!(ok(b"b", b"", Access::Read));
        assert!(!ok(b"e", b"", Access::Read));
        assert!(ok(b"k", b"", Access::Read));
        assert!(
            !ok(b"k", b"l", Access::Read),
            "a key grant does not cover a range"
        );
        assert!(ok(b"k", b"k\0", Access::Read));
        assert!(
            ok(b"zzz", &[0], Access::Write),
            "from-key grant covers from-key ranges"
        );
        assert!(!ok(b"w", &[0], Access::Write));
        assert!(state
            .is_permitted("root", b"a", &[0], Access::Write)
            .is_ok());
        assert_eq!(
            state.is_permitted("nobody", b"a", b"", Access::Read),
            Err(AuthError::PermissionDenied)
        );
    }

    #[test]
    fn management_rules_follow_etcd() {
        let mut state = state_with(Vec::new());
        assert_eq!(state.revision, 6);
        let enable = state.plan(AdminOp::Enable).unwrap().unwrap();
        state.apply(&enable);
        assert!(state.enabled);
        assert!(state.plan(AdminOp::Enable).unwrap().is_none());
        let root_delete = AdminOp::UserDelete {
            name: "root".into(),
        };
        assert_eq!(state.plan(root_delete), Err(AuthError::InvalidAuthMgmt));
        let revoke_root = AdminOp::UserRevokeRole {
            name: "root".into(),
            role: "root".into(),
        };
        assert_eq!(state.plan(revoke_root), Err(AuthError::InvalidAuthMgmt));
        let grant_again = AdminOp::UserGrantRole {
            user: "u".into(),
            role: "r".into(),
        };
        assert!(state.plan(grant_again).unwrap().is_none());
        let delete_r = state
            .plan(AdminOp::RoleDelete { name: "r".into() })
            .unwrap()
            .unwrap();
        state.apply(&delete_r);
        assert!(!state.has_role("u", "r"), "a deleted role leaves its users");
        let revoke = AdminOp::RoleRevokePermission {
            role: "nope".into(),
            key: b"a".to_vec(),
            range_end: Vec::new(),
        };
        assert_eq!(state.plan(revoke), Err(AuthError::RoleNotFound));
        let fresh = AuthState::default();
        assert_eq!(
            fresh.plan(AdminOp::Enable),
            Err(AuthError::RootUserNotExist)
        );
    }
}
