//! Auth token providers, as etcd's `--auth-token`: `simple` (random strings held in memory,
//! each living `--auth-token-ttl` after its last use) and `jwt` (signed, stateless; see
//! [`super::jwt`]).

use super::AuthError;
use rand::Rng;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Letters of etcd's simple tokens, and their length before the `.index` suffix.
const TOKEN_LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
const TOKEN_LETTERS_LEN: usize = 16;
/// Tokens held before expired ones are swept out on the next insert (doubles as needed).
const TOKEN_SWEEP_MIN: usize = 1024;

/// Whom a valid token stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    pub user: String,
    /// The auth revision the token was issued at, for tokens that carry it (JWT): a request
    /// with a token older than the auth state is refused, as etcd's `ErrAuthOldRevision`.
    /// `None` for simple tokens, which etcd treats as current.
    pub auth_revision: Option<u64>,
}

/// etcd's `TokenProvider` (auth/store.go): issues and reads tokens.
pub trait TokenProvider: Send + Sync {
    /// A new token for `user`, at auth revision `auth_revision`.
    fn assign(&self, user: &str, auth_revision: u64) -> Result<String, AuthError>;
    /// Whom `token` stands for; `None` when it is unknown, expired or forged.
    fn info(&self, token: &str) -> Option<TokenInfo>;
    /// Ends the tokens of `user` (deleted, or a new password), where the provider can.
    fn invalidate_user(&self, user: &str);
    /// Ends every token (auth disabled), where the provider can.
    fn invalidate_all(&self);
    /// Accepts `token`, issued for `user` by the leader, on this member too. Stateless
    /// providers (JWT) verify any member's tokens already: nothing to do.
    fn adopt(&self, _token: &str, _user: &str) {}
    /// Whether a token lives only in the memory of the members that were told of it (simple
    /// tokens), so a cluster must replicate it.
    fn is_local(&self) -> bool {
        false
    }
}

struct SimpleToken {
    user: String,
    expires: Instant,
}

struct SimpleTable {
    by_token: HashMap<String, SimpleToken>,
    sweep_at_len: usize,
}

/// etcd's simple tokens: in memory only, so a restart invalidates them.
pub struct SimpleTokens {
    table: Mutex<SimpleTable>,
    ttl: Duration,
    /// Makes tokens unique (etcd appends the raft index).
    issued: AtomicU64,
}

impl SimpleTokens {
    pub fn new(ttl: Duration) -> SimpleTokens {
        SimpleTokens {
            table: Mutex::new(SimpleTable {
                by_token: HashMap::new(),
                sweep_at_len: TOKEN_SWEEP_MIN,
            }),
            ttl,
            issued: AtomicU64::new(0),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, SimpleTable> {
        self.table.lock().expect("token lock poisoned")
    }
}

impl TokenProvider for SimpleTokens {
    /// 16 random letters, a dot and a counter, as etcd's.
    fn assign(&self, user: &str, _auth_revision: u64) -> Result<String, AuthError> {
        let mut rng = rand::thread_rng();
        let mut token: String = (0..TOKEN_LETTERS_LEN)
            .map(|_| TOKEN_LETTERS[rng.gen_range(0..TOKEN_LETTERS.len())] as char)
            .collect();
        token.push_str(&format!(
            ".{}",
            self.issued.fetch_add(1, Ordering::Relaxed) + 1
        ));
        self.adopt(&token, user);
        Ok(token)
    }

    fn adopt(&self, token: &str, user: &str) {
        let now = Instant::now();
        let mut table = self.table();
        if table.by_token.len() >= table.sweep_at_len {
            table.by_token.retain(|_, t| t.expires > now);
            table.sweep_at_len = (table.by_token.len() * 2).max(TOKEN_SWEEP_MIN);
        }
        let entry = SimpleToken {
            user: user.to_string(),
            expires: now + self.ttl,
        };
        table.by_token.insert(token.to_string(), entry);
    }

    fn is_local(&self) -> bool {
        true
    }

    /// A valid token's TTL restarts, as etcd's simple tokens do.
    fn info(&self, token: &str) -> Option<TokenInfo> {
        let now = Instant::now();
        let mut table = self.table();
        let entry = table.by_token.get_mut(token)?;
        if entry.expires <= now {
            table.by_token.remove(token);
            return None;
        }
        entry.expires = now + self.ttl;
        Some(TokenInfo {
            user: entry.user.clone(),
            auth_revision: None,
        })
    }

    fn invalidate_user(&self, user: &str) {
        self.table().by_token.retain(|_, t| t.user != user);
    }

    fn invalidate_all(&self) {
        self.table().by_token.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_adopted_token_is_accepted_like_an_issued_one() {
        let tokens = SimpleTokens::new(Duration::from_secs(60));
        assert_eq!(tokens.info("leaderIssuedToken.7"), None);
        tokens.adopt("leaderIssuedToken.7", "alice");
        let info = tokens.info("leaderIssuedToken.7").expect("adopted");
        assert_eq!(info.user, "alice");
        tokens.invalidate_user("alice");
        assert_eq!(tokens.info("leaderIssuedToken.7"), None);
    }
}
