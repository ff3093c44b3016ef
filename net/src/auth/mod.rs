//! etcd's auth (v3 `auth` package): users, roles and key permissions, simple tokens, and the
//! checks every request goes through when auth is enabled.
//!
//! *Where the state lives.* One [`AuthStore`] per node (in `Shared`): the [`AuthState`] behind
//! a read-write lock, read by every core for each check, changed only by the meta group after
//! the change's record is durable in the meta log (`ops.rs`); the enabled flag is mirrored in
//! an atomic so that requests pay nothing while auth is off. Tokens come from a
//! [`TokenProvider`] (`--auth-token`): simple tokens live in memory only, as etcd's (a restart
//! invalidates them and clients authenticate again); JWTs are signed and stateless.

pub mod jwt;
pub mod ops;
pub mod service;
pub mod state;
pub mod token;

use state::{Access, AuthState};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{RwLock, RwLockReadGuard};
use std::time::Duration;
use token::{SimpleTokens, TokenInfo, TokenProvider};
use tonic::metadata::MetadataMap;
use tonic::{Code, Status};

/// etcd's default `--auth-token-ttl` for simple tokens (a token's TTL restarts at each use).
pub const DEFAULT_TOKEN_TTL_S: u64 = 300;
/// etcd's `bcrypt.DefaultCost`.
pub const BCRYPT_COST: u32 = 10;
/// The gRPC metadata keys etcd reads a token from (the second is the gateway's header).
const TOKEN_METADATA_KEYS: [&str; 2] = ["token", "authorization"];
/// Where the transport puts the Common Name of a gRPC client's verified TLS certificate when
/// `--client-cert-auth` is on (etcd's `AuthInfoFromTLS`). The transport removes this header
/// from every request first, so a client cannot send it.
pub const TLS_COMMON_NAME_METADATA_KEY: &str = "ferrocd-internal-tls-common-name";

/// etcd's auth errors (api/v3rpc/rpctypes), with their gRPC codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    RootUserNotExist,
    RootRoleNotExist,
    UserAlreadyExist,
    UserEmpty,
    UserNotFound,
    RoleAlreadyExist,
    RoleNotFound,
    RoleEmpty,
    AuthFailed,
    /// etcd 3.4 answers a login of a no-password user with an error rpctypes does not know,
    /// hence gRPC UNKNOWN and the `auth:` prefix.
    NoPasswordUser,
    PermissionDenied,
    RoleNotGranted,
    PermissionNotGranted,
    AuthNotEnabled,
    InvalidAuthToken,
    InvalidAuthMgmt,
    /// A JWT issued before the latest auth change.
    AuthOldRevision,
    /// Authenticate on a JWT provider that has a public key only.
    JwtVerifyOnly,
}

impl AuthError {
    pub fn code_and_message(self) -> (Code, &'static str) {
        use AuthError::*;
        let precondition = Code::FailedPrecondition;
        match self {
            RootUserNotExist => (precondition, "etcdserver: root user does not exist"),
            RootRoleNotExist => (
                precondition,
                "etcdserver: root user does not have root role",
            ),
            UserAlreadyExist => (precondition, "etcdserver: user name already exists"),
            UserEmpty => (Code::InvalidArgument, "etcdserver: user name is empty"),
            UserNotFound => (precondition, "etcdserver: user name not found"),
            RoleAlreadyExist => (precondition, "etcdserver: role name already exists"),
            RoleNotFound => (precondition, "etcdserver: role name not found"),
            RoleEmpty => (Code::InvalidArgument, "etcdserver: role name is empty"),
            AuthFailed => (
                Code::InvalidArgument,
                "etcdserver: authentication failed, invalid user ID or password",
            ),
            NoPasswordUser => (
                Code::Unknown,
                "auth: authentication failed, password was given for no password user",
            ),
            PermissionDenied => (Code::PermissionDenied, "etcdserver: permission denied"),
            RoleNotGranted => (precondition, "etcdserver: role is not granted to the user"),
            PermissionNotGranted => (
                precondition,
                "etcdserver: permission is not granted to the role",
            ),
            AuthNotEnabled => (precondition, "etcdserver: authentication is not enabled"),
            InvalidAuthToken => (Code::Unauthenticated, "etcdserver: invalid auth token"),
            InvalidAuthMgmt => (Code::InvalidArgument, "etcdserver: invalid auth management"),
            AuthOldRevision => (
                Code::InvalidArgument,
                "etcdserver: revision of auth store is old",
            ),
            // Not an rpctypes error: etcd answers it as UNKNOWN with the auth package's text.
            JwtVerifyOnly => (Code::Unknown, self.raw_message()),
        }
    }
}

impl AuthError {
    /// The message of etcd's auth package error, which reaches clients unconverted (as gRPC
    /// UNKNOWN) where etcd returns it as is: Maintenance's admin check.
    pub fn raw_message(self) -> &'static str {
        use AuthError::*;
        match self {
            RootUserNotExist => "auth: root user does not exist",
            RootRoleNotExist => "auth: root user does not have root role",
            UserAlreadyExist => "auth: user already exists",
            UserEmpty => "auth: user name is empty",
            UserNotFound => "auth: user not found",
            RoleAlreadyExist => "auth: role already exists",
            RoleNotFound => "auth: role not found",
            RoleEmpty => "auth: role name is empty",
            AuthFailed => "auth: authentication failed, invalid user ID or password",
            NoPasswordUser => self.code_and_message().1,
            PermissionDenied => "auth: permission denied",
            RoleNotGranted => "auth: role is not granted to the user",
            PermissionNotGranted => "auth: permission is not granted to the role",
            AuthNotEnabled => "auth: authentication is not enabled",
            InvalidAuthToken => "auth: invalid auth token",
            InvalidAuthMgmt => "auth: invalid auth management",
            AuthOldRevision => "auth: revision in header is old",
            JwtVerifyOnly => "auth: token signing attempted with verify-only key",
        }
    }

    /// The status of [`AuthError::raw_message`].
    pub fn raw_status(self) -> Status {
        Status::unknown(self.raw_message())
    }
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code_and_message().1)
    }
}

impl std::error::Error for AuthError {}

impl From<AuthError> for Status {
    fn from(e: AuthError) -> Status {
        let (code, message) = e.code_and_message();
        Status::new(code, message)
    }
}

/// Who sends a request, as far as permission checks go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// The server itself (lease expiry, internal reads): never checked.
    Server,
    /// A client request without a token.
    Anonymous,
    /// A client request with a valid token of this user.
    User(TokenInfo),
}

pub struct AuthStore {
    /// Mirrors `state.enabled`, so requests skip the lock while auth is off.
    enabled: AtomicBool,
    state: RwLock<AuthState>,
    tokens: Box<dyn TokenProvider>,
}

impl AuthStore {
    pub fn new(state: AuthState, tokens: Box<dyn TokenProvider>) -> AuthStore {
        AuthStore {
            enabled: AtomicBool::new(state.enabled),
            state: RwLock::new(state),
            tokens,
        }
    }

    /// With etcd's default simple tokens.
    pub fn with_simple_tokens(state: AuthState) -> AuthStore {
        let ttl = Duration::from_secs(DEFAULT_TOKEN_TTL_S);
        AuthStore::new(state, Box::new(SimpleTokens::new(ttl)))
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::SeqCst)
    }

    /// Reads the state (answers of the Auth service, checks).
    pub fn state(&self) -> RwLockReadGuard<'_, AuthState> {
        self.state.read().expect("auth state lock poisoned")
    }

    /// Applies a durable auth record (the meta group only). Disabling auth or deleting a user
    /// ends the tokens concerned, as etcd does.
    pub fn apply(&self, payload: &ferrocd_engine::mvcc::codec::LogPayload) {
        use ferrocd_engine::mvcc::codec::LogPayload;
        if let LogPayload::AuthToken { user, token } = payload {
            // Not auth state: no revision, nothing on disk.
            return self.tokens.adopt(token, user);
        }
        let mut state = self.state.write().expect("auth state lock poisoned");
        let password_changed = match payload {
            LogPayload::AuthUserPut(user) => state
                .user(&user.name)
                .is_ok_and(|old| old.password_hash != user.password_hash),
            _ => false,
        };
        assert!(state.apply(payload), "not an auth record: {payload:?}");
        self.enabled.store(state.enabled, Ordering::SeqCst);
        drop(state);
        // On every member, as etcd's apply of these requests.
        match payload {
            LogPayload::AuthEnable { enabled: false } => self.tokens.invalidate_all(),
            LogPayload::AuthUserDelete { name } => self.tokens.invalidate_user(name),
            LogPayload::AuthUserPut(user) if password_changed => {
                self.tokens.invalidate_user(&user.name)
            }
            _ => {}
        }
    }

    /// Whether a token this member issues must be replicated for other members to accept it
    /// (simple tokens; a JWT verifies anywhere).
    pub fn tokens_are_local(&self) -> bool {
        self.tokens.is_local()
    }

    /// Accepts a token the leader issued for `user` (after a forwarded Authenticate).
    pub fn adopt_token(&self, token: &str, user: &str) {
        self.tokens.adopt(token, user);
    }

    /// A new token for `user`, at the current auth revision.
    pub fn issue_token(&self, user: &str) -> Result<String, AuthError> {
        let auth_revision = self.state().revision;
        self.tokens.assign(user, auth_revision)
    }

    /// The caller a request's metadata names: an unknown or expired token is etcd's "invalid
    /// auth token", whether or not auth is enabled (etcd looks every given token up); a valid
    /// token's TTL restarts, as etcd's simple tokens do. Without a token, the Common Name of a
    /// verified client certificate is the user (etcd's `AuthInfoFromTLS`, a token wins), else
    /// the caller is [`Caller::Anonymous`].
    pub fn caller(&self, metadata: &MetadataMap) -> Result<Caller, AuthError> {
        let token = TOKEN_METADATA_KEYS
            .iter()
            .find_map(|key| metadata.get(*key))
            .map(|value| value.to_str().map_err(|_| AuthError::InvalidAuthToken));
        if let Some(token) = token {
            return self.caller_of_token(token?);
        }
        let common_name = metadata
            .get(TLS_COMMON_NAME_METADATA_KEY)
            .and_then(|name| std::str::from_utf8(name.as_encoded_bytes()).ok());
        // A certificate's user is checked against the current auth state (etcd's
        // AuthInfoFromTLS stamps the current revision), like a simple token's.
        Ok(common_name.map_or(Caller::Anonymous, |name| {
            Caller::User(TokenInfo {
                user: name.to_string(),
                auth_revision: None,
            })
        }))
    }

    pub fn caller_of_token(&self, token: &str) -> Result<Caller, AuthError> {
        self.tokens
            .info(token)
            .map(Caller::User)
            .ok_or(AuthError::InvalidAuthToken)
    }

    /// etcd's `isOpPermitted`: `access` on `[key, range_end)` (one key if `range_end` is
    /// empty, every key from `key` if it is `"\0"`).
    pub fn check(
        &self,
        caller: &Caller,
        key: &[u8],
        range_end: &[u8],
        access: Access,
    ) -> Result<(), AuthError> {
        if !self.is_enabled() {
            return Ok(());
        }
        match caller {
            Caller::Server => Ok(()),
            Caller::Anonymous => Err(AuthError::UserEmpty),
            Caller::User(info) => {
                let state = self.state();
                // etcd's isOpPermitted: a token from before the latest auth change is refused.
                if info.auth_revision.is_some_and(|rev| rev < state.revision) {
                    return Err(AuthError::AuthOldRevision);
                }
                state.is_permitted(&info.user, key, range_end, access)
            }
        }
    }

    /// etcd's `IsAdminPermitted`: the caller must have the root role.
    pub fn check_admin(&self, caller: &Caller) -> Result<(), AuthError> {
        if !self.is_enabled() {
            return Ok(());
        }
        match caller {
            Caller::Server => Ok(()),
            Caller::Anonymous => Err(AuthError::UserEmpty),
            Caller::User(TokenInfo { user, .. }) => {
                let state = self.state();
                state.user(user)?;
                match state.is_root(user) {
                    true => Ok(()),
                    false => Err(AuthError::PermissionDenied),
                }
            }
        }
    }

    /// The caller of a request that needs root (Maintenance's Defragment, Hash, HashKV,
    /// Snapshot; auth management).
    pub fn admin(&self, metadata: &MetadataMap) -> Result<Caller, AuthError> {
        let caller = self.caller(metadata)?;
        self.check_admin(&caller)?;
        Ok(caller)
    }
}

/// Hashes a password with bcrypt at etcd's cost, off the executor (it takes tens of ms).
pub async fn hash_password(password: String) -> String {
    blocking(move || bcrypt::hash(password, BCRYPT_COST).expect("bcrypt hashes any password")).await
}

/// Compares a password with a bcrypt hash, off the executor.
pub async fn verify_password(password: String, hash: String) -> bool {
    blocking(move || bcrypt::verify(password, &hash).unwrap_or(false)).await
}

/// Runs CPU-heavy work on the core's blocking thread pool. The future is `Send` for tonic's
/// handlers: it is created and polled on one glommio executor, whose tasks never change threads.
async fn blocking<R: Send + 'static>(work: impl FnOnce() -> R + Send + 'static) -> R {
    send_wrapper::SendWrapper::new(glommio::executor().spawn_blocking(work)).await
}
