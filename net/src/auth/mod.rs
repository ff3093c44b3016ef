//! etcd's auth (v3 `auth` package): users, roles and key permissions, simple tokens, and the
//! checks every request goes through when auth is enabled.
//!
//! *Where the state lives.* One [`AuthStore`] per node (in `Shared`): the [`AuthState`] behind
//! a read-write lock, read by every core for each check, changed only by the meta group after
//! the change's record is durable in the meta log (`ops.rs`); the enabled flag is mirrored in
//! an atomic so that requests pay nothing while auth is off. Tokens live in memory only, as
//! etcd's simple tokens do: a restart invalidates them and clients authenticate again.

pub mod ops;
pub mod service;
pub mod state;

use rand::Rng;
use state::{Access, AuthState};
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};
use tonic::metadata::MetadataMap;
use tonic::{Code, Status};

/// etcd's default `--auth-token-ttl` for simple tokens (a token's TTL restarts at each use).
pub const DEFAULT_TOKEN_TTL_S: u64 = 300;
/// etcd's `bcrypt.DefaultCost`.
pub const BCRYPT_COST: u32 = 10;
/// Letters of etcd's simple tokens, and their length before the `.index` suffix.
const TOKEN_LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
const TOKEN_LETTERS_LEN: usize = 16;
/// The gRPC metadata keys etcd reads a token from (the second is the gateway's header).
const TOKEN_METADATA_KEYS: [&str; 2] = ["token", "authorization"];
/// Where the transport puts the Common Name of a gRPC client's verified TLS certificate when
/// `--client-cert-auth` is on (etcd's `AuthInfoFromTLS`). The transport removes this header
/// from every request first, so a client cannot send it.
pub const TLS_COMMON_NAME_METADATA_KEY: &str = "ferrocd-internal-tls-common-name";
/// Tokens held before expired ones are swept out on the next insert (doubles as needed).
const TOKEN_SWEEP_MIN: usize = 1024;

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
    User(String),
}

struct Token {
    user: String,
    expires: Instant,
}

struct Tokens {
    by_token: HashMap<String, Token>,
    sweep_at_len: usize,
}

pub struct AuthStore {
    /// Mirrors `state.enabled`, so requests skip the lock while auth is off.
    enabled: AtomicBool,
    state: RwLock<AuthState>,
    tokens: Mutex<Tokens>,
    token_ttl: Duration,
    /// Makes tokens unique (etcd appends the raft index).
    issued: AtomicU64,
}

impl AuthStore {
    pub fn new(state: AuthState, token_ttl: Duration) -> AuthStore {
        AuthStore {
            enabled: AtomicBool::new(state.enabled),
            state: RwLock::new(state),
            tokens: Mutex::new(Tokens {
                by_token: HashMap::new(),
                sweep_at_len: TOKEN_SWEEP_MIN,
            }),
            token_ttl,
            issued: AtomicU64::new(0),
        }
    }

    pub fn default_token_ttl() -> Duration {
        Duration::from_secs(DEFAULT_TOKEN_TTL_S)
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
        let mut state = self.state.write().expect("auth state lock poisoned");
        assert!(state.apply(payload), "not an auth record: {payload:?}");
        self.enabled.store(state.enabled, Ordering::SeqCst);
        drop(state);
        let mut tokens = self.tokens.lock().expect("token lock poisoned");
        match payload {
            LogPayload::AuthEnable { enabled: false } => tokens.by_token.clear(),
            LogPayload::AuthUserDelete { name } => tokens.by_token.retain(|_, t| &t.user != name),
            _ => {}
        }
    }

    /// Ends every token of `user` (after a password change).
    pub fn end_tokens_of(&self, user: &str) {
        let mut tokens = self.tokens.lock().expect("token lock poisoned");
        tokens.by_token.retain(|_, t| t.user != user);
    }

    /// A new simple token for `user`: 16 random letters, a dot and a counter, as etcd's.
    pub fn issue_token(&self, user: &str) -> String {
        let mut rng = rand::thread_rng();
        let mut token: String = (0..TOKEN_LETTERS_LEN)
            .map(|_| TOKEN_LETTERS[rng.gen_range(0..TOKEN_LETTERS.len())] as char)
            .collect();
        token.push_str(&format!(
            ".{}",
            self.issued.fetch_add(1, Ordering::Relaxed) + 1
        ));
        let now = Instant::now();
        let mut tokens = self.tokens.lock().expect("token lock poisoned");
        if tokens.by_token.len() >= tokens.sweep_at_len {
            tokens.by_token.retain(|_, t| t.expires > now);
            tokens.sweep_at_len = (tokens.by_token.len() * 2).max(TOKEN_SWEEP_MIN);
        }
        let entry = Token {
            user: user.to_string(),
            expires: now + self.token_ttl,
        };
        tokens.by_token.insert(token.clone(), entry);
        token
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
        Ok(common_name.map_or(Caller::Anonymous, |name| Caller::User(name.to_string())))
    }

    pub fn caller_of_token(&self, token: &str) -> Result<Caller, AuthError> {
        let now = Instant::now();
        let mut tokens = self.tokens.lock().expect("token lock poisoned");
        match tokens.by_token.get_mut(token) {
            Some(t) if t.expires > now => {
                t.expires = now + self.token_ttl;
                Ok(Caller::User(t.user.clone()))
            }
            Some(_) => {
                tokens.by_token.remove(token);
                Err(AuthError::InvalidAuthToken)
            }
            None => Err(AuthError::InvalidAuthToken),
        }
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
            Caller::User(user) => self.state().is_permitted(user, key, range_end, access),
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
            Caller::User(user) => {
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
