//! Auth: the same scripted requests against a real etcd and ferrocd, every answer compared
//! (user and role lifecycle, grants on keys, prefixes, ranges and from-key, allowed and denied
//! requests of every service, wrong passwords, stale tokens), and ferrocd's auth state across
//! kill -9.

mod common;

use common::Server;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, Error, GetOptions, LockOptions,
    Permission, PutOptions, Txn, TxnOp, UserAddOptions, WatchOptions,
};
use std::time::Duration;

const ROOT_PASSWORD: &str = "rootpw";
const USER_PASSWORD: &str = "upw";
/// `--auth-token-ttl 1` of the token expiry test.
const TOKEN_TTL_MS: u64 = 1000;

/// An answer as one comparable line: `ok ...` or the gRPC code and message.
fn outcome<T>(result: Result<T, Error>, ok: impl FnOnce(T) -> String) -> String {
    match result {
        Ok(value) => format!("ok {}", ok(value)),
        Err(Error::GRpcStatus(status)) => format!("error {:?} {}", status.code(), status.message()),
        Err(e) => format!("client error {e}"),
    }
}

fn done<T>(_: T) -> String {
    String::new()
}

async fn connect(server: &Server, user: Option<(&str, &str)>) -> Result<Client, Error> {
    let mut options = ConnectOptions::new().with_timeout(Duration::from_secs(10));
    if let Some((name, password)) = user {
        options = options.with_user(name, password);
    }
    Client::connect([server.endpoint()], Some(options)).await
}

async fn get(client: &mut Client, key: &str, options: Option<GetOptions>) -> String {
    outcome(client.get(key, options).await, |r| {
        let keys: Vec<String> = r
            .kvs()
            .iter()
            .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
            .collect();
        format!("rev={} keys={keys:?}", r.header().unwrap().revision())
    })
}

async fn put(client: &mut Client, key: &str, options: Option<PutOptions>) -> String {
    outcome(client.put(key, "v", options).await, |r| {
        format!("rev={}", r.header().unwrap().revision())
    })
}

async fn txn(client: &mut Client, txn: Txn) -> String {
    outcome(client.txn(txn).await, |r| {
        format!(
            "rev={} succeeded={}",
            r.header().unwrap().revision(),
            r.succeeded()
        )
    })
}

/// The first response of a watch on `key` with `options`.
async fn watch_created(client: &mut Client, key: &str, options: Option<WatchOptions>) -> String {
    let mut stream = match client.watch(key, options).await {
        Ok(stream) => stream,
        Err(e) => return outcome::<()>(Err(e), done),
    };
    outcome(stream.message().await, |r| {
        let r = r.expect("a created response");
        format!(
            "created={} canceled={} reason={:?}",
            r.created(),
            r.canceled(),
            r.cancel_reason()
        )
    })
}

/// Users, roles and data set up by root while auth is still off.
async fn setup(log: &mut Vec<String>, admin: &mut Client) -> (i64, i64) {
    log.push(outcome(admin.auth_enable().await, done));
    log.push(outcome(
        admin.user_add("root", ROOT_PASSWORD, None).await,
        done,
    ));
    log.push(outcome(admin.auth_enable().await, done));
    log.push(outcome(admin.role_add("root").await, done));
    log.push(outcome(admin.user_grant_role("root", "root").await, done));
    log.push(outcome(admin.role_add("r").await, done));
    log.push(outcome(admin.role_add("r").await, done));
    log.push(outcome(admin.role_add("").await, done));
    let grants = [
        Permission::read_write("pre/").with_prefix(),
        Permission::read("k"),
        Permission::write("w1").with_range_end("w5"),
        Permission::read("z").with_from_key(),
        Permission::read("k"),
    ];
    for perm in grants {
        log.push(outcome(admin.role_grant_permission("r", perm).await, done));
    }
    log.push(outcome(
        admin
            .role_grant_permission("nope", Permission::read("k"))
            .await,
        done,
    ));
    log.push(outcome(
        admin.user_add("u", USER_PASSWORD, None).await,
        done,
    ));
    log.push(outcome(admin.user_add("u", "x", None).await, done));
    log.push(outcome(admin.user_add("", "x", None).await, done));
    let no_password = UserAddOptions::new().with_no_pwd();
    log.push(outcome(
        admin.user_add("np", "", Some(no_password)).await,
        done,
    ));
    log.push(outcome(admin.user_grant_role("u", "r").await, done));
    log.push(outcome(admin.user_grant_role("u", "nope").await, done));
    log.push(outcome(admin.user_grant_role("nobody", "r").await, done));
    log.push(outcome(admin.user_get("u").await, |r| {
        format!("{:?}", r.roles())
    }));
    log.push(outcome(admin.user_list().await, |r| {
        format!("{:?}", r.users())
    }));
    log.push(outcome(admin.role_list().await, |r| {
        format!("{:?}", r.roles())
    }));
    log.push(outcome(admin.role_get("r").await, |r| {
        let perms: Vec<String> = r
            .permissions()
            .iter()
            .map(|p| format!("{:?} {:?} {:?}", p.get_type(), p.key(), p.range_end()))
            .collect();
        format!("{perms:?}")
    }));
    for key in ["pre/a", "k", "w2", "w3", "z1", "other", "secret"] {
        log.push(put(admin, key, None).await);
    }
    let lease_ok = admin.lease_grant(60, None).await.unwrap().id();
    let lease_denied = admin.lease_grant(60, None).await.unwrap().id();
    let with = |id| Some(PutOptions::new().with_lease(id));
    log.push(put(admin, "pre/l", with(lease_ok)).await);
    log.push(put(admin, "secret", with(lease_denied)).await);
    (lease_ok, lease_denied)
}

/// What user `u` (role `r`) may and may not do.
async fn as_user(log: &mut Vec<String>, u: &mut Client, leases: (i64, i64)) {
    log.push(get(u, "k", None).await);
    log.push(get(u, "pre/", Some(GetOptions::new().with_prefix())).await);
    log.push(get(u, "z", Some(GetOptions::new().with_from_key())).await);
    log.push(get(u, "y", Some(GetOptions::new().with_from_key())).await);
    log.push(get(u, "other", None).await);
    log.push(get(u, "w2", None).await);
    log.push(put(u, "pre/b", None).await);
    log.push(put(u, "w3", None).await);
    log.push(put(u, "w3", Some(PutOptions::new().with_prev_key())).await);
    log.push(put(u, "k", None).await);
    log.push(put(u, "pre/c", Some(PutOptions::new().with_lease(leases.1))).await);
    let deleted = u
        .delete("w2", Some(DeleteOptions::new().with_prev_key()))
        .await;
    log.push(outcome(deleted, done));
    log.push(outcome(u.delete("w2", None).await, |r| {
        r.deleted().to_string()
    }));
    let range = DeleteOptions::new().with_range("w9");
    log.push(outcome(u.delete("w1", Some(range)).await, done));
    let compare_k = Compare::version("k", CompareOp::Greater, 0);
    let allowed = Txn::new()
        .when([compare_k.clone()])
        .and_then([TxnOp::put("pre/t", "v", None)])
        .or_else([TxnOp::get("k", None)]);
    log.push(txn(u, allowed).await);
    let denied_compare = Txn::new()
        .when([Compare::value("other", CompareOp::Equal, "v")])
        .and_then([TxnOp::put("pre/t", "v", None)]);
    log.push(txn(u, denied_compare).await);
    let denied_branch = Txn::new()
        .when([compare_k])
        .and_then([TxnOp::put("pre/t", "v", None)])
        .or_else([TxnOp::delete("other", None)]);
    log.push(txn(u, denied_branch).await);
    log.push(watch_created(u, "pre/", Some(WatchOptions::new().with_prefix())).await);
    log.push(watch_created(u, "other", None).await);
    log.push(watch_created(u, "a", Some(WatchOptions::new().with_range("pre/zz"))).await);
    log.push(outcome(u.lease_revoke(leases.1).await, done));
    log.push(outcome(u.lease_revoke(leases.0).await, |r| {
        format!("rev={}", r.header().unwrap().revision())
    }));
    let lease = u.lease_grant(60, None).await.unwrap().id();
    let lock = Some(LockOptions::new().with_lease(lease));
    log.push(outcome(u.lock("pre/lock", lock.clone()).await, |r| {
        let key = String::from_utf8_lossy(r.key()).into_owned();
        format!("prefixed={}", key.starts_with("pre/lock/"))
    }));
    log.push(outcome(u.lock("nolock", lock).await, done));
    log.push(outcome(u.hash_kv(0).await, done));
    log.push(outcome(u.status().await, done));
    log.push(outcome(u.user_list().await, done));
    log.push(outcome(u.user_get("u").await, |r| {
        format!("{:?}", r.roles())
    }));
    log.push(outcome(u.user_get("root").await, done));
    log.push(outcome(u.role_get("r").await, |r| {
        r.permissions().len().to_string()
    }));
    log.push(outcome(u.role_get("root").await, done));
    log.push(outcome(u.auth_disable().await, done));
}

/// The whole script against one server; the transcript is compared across servers.
async fn script(server: &Server) -> Vec<String> {
    let mut log = Vec::new();
    let mut admin = connect(server, None).await.unwrap();
    let leases = setup(&mut log, &mut admin).await;
    log.push(outcome(
        connect(server, Some(("u", USER_PASSWORD))).await,
        done,
    ));
    log.push(outcome(admin.auth_enable().await, done));
    log.push(get(&mut admin, "k", None).await);
    log.push(outcome(admin.user_list().await, done));
    log.push(outcome(admin.auth_enable().await, done));
    for (name, password) in [("u", "bad"), ("np", ""), ("nobody", "x")] {
        log.push(outcome(connect(server, Some((name, password))).await, done));
    }
    let mut u = connect(server, Some(("u", USER_PASSWORD))).await.unwrap();
    as_user(&mut log, &mut u, leases).await;
    let mut root = connect(server, Some(("root", ROOT_PASSWORD)))
        .await
        .unwrap();
    log.push(get(&mut root, "other", None).await);
    log.push(outcome(root.hash_kv(0).await, done));
    log.push(outcome(root.user_delete("root").await, done));
    log.push(outcome(root.user_revoke_role("root", "root").await, done));
    log.push(outcome(root.role_delete("root").await, done));
    log.push(outcome(root.user_revoke_role("u", "nope").await, done));
    let revoke = root.role_revoke_permission("r", "k", None).await;
    log.push(outcome(revoke, done));
    log.push(outcome(
        root.role_revoke_permission("r", "k", None).await,
        done,
    ));
    log.push(get(&mut u, "k", None).await);
    log.push(outcome(root.user_change_password("u", "new").await, done));
    log.push(get(&mut u, "pre/a", None).await);
    let mut u = connect(server, Some(("u", "new"))).await.unwrap();
    log.push(get(&mut u, "pre/a", None).await);
    log.push(outcome(root.role_delete("r").await, done));
    log.push(outcome(root.user_get("u").await, |r| {
        format!("{:?}", r.roles())
    }));
    log.push(get(&mut u, "pre/a", None).await);
    log.push(outcome(root.auth_disable().await, done));
    log.push(get(&mut root, "k", None).await);
    log.push(get(&mut u, "k", None).await);
    log.push(get(&mut admin, "k", None).await);
    log.push(outcome(admin.auth_disable().await, done));
    log.push(outcome(connect(server, Some(("u", "new"))).await, done));
    log
}

#[tokio::test]
async fn auth_matches_etcd() {
    let etcd = Server::etcd().await;
    let ferrocd = Server::ferrocd(&["--shards", "4"]).await;
    let expected = script(&etcd).await;
    let actual = script(&ferrocd).await;
    for (i, (e, a)) in expected.iter().zip(&actual).enumerate() {
        assert_eq!(
            a,
            e,
            "step {i} differs from etcd; etcd's so far: {:#?}",
            &expected[..i]
        );
    }
    assert_eq!(actual.len(), expected.len());
}

/// Users, roles, grants and the enabled flag survive kill -9; tokens do not (as etcd's).
#[tokio::test]
async fn auth_state_survives_kill9() {
    let mut server = Server::ferrocd(&["--shards", "2"]).await;
    let mut admin = connect(&server, None).await.unwrap();
    admin.user_add("root", ROOT_PASSWORD, None).await.unwrap();
    admin.user_grant_role("root", "root").await.unwrap();
    admin.role_add("r").await.unwrap();
    let perm = Permission::read_write("pre/").with_prefix();
    admin.role_grant_permission("r", perm).await.unwrap();
    admin.user_add("u", USER_PASSWORD, None).await.unwrap();
    admin.user_grant_role("u", "r").await.unwrap();
    admin.auth_enable().await.unwrap();
    let mut u = connect(&server, Some(("u", USER_PASSWORD))).await.unwrap();
    u.put("pre/a", "1", None).await.unwrap();
    server.crash_restart().await;
    let mut anonymous = connect(&server, None).await.unwrap();
    let refused = get(&mut anonymous, "pre/a", None).await;
    assert_eq!(
        refused,
        "error InvalidArgument etcdserver: user name is empty"
    );
    let stale = get(&mut u, "pre/a", None).await;
    assert_eq!(
        stale,
        "error Unauthenticated etcdserver: invalid auth token"
    );
    let mut u = connect(&server, Some(("u", USER_PASSWORD))).await.unwrap();
    assert!(get(&mut u, "pre/a", None).await.starts_with("ok "));
    assert_eq!(
        get(&mut u, "other", None).await,
        "error PermissionDenied etcdserver: permission denied"
    );
    let wrong = connect(&server, Some(("u", "bad"))).await;
    assert!(outcome(wrong, done).contains("authentication failed"));
    let mut root = connect(&server, Some(("root", ROOT_PASSWORD)))
        .await
        .unwrap();
    let users = root.user_list().await.unwrap();
    assert_eq!(users.users(), ["root", "u"]);
    let log = std::fs::read_to_string(server.log_path()).unwrap_or_default();
    assert!(!log.contains(USER_PASSWORD), "a password reached the log");
}

/// A token unused for `--auth-token-ttl` seconds is refused; a used one lives on, and
/// authenticating again works.
#[tokio::test]
async fn unused_token_expires() {
    let server = Server::ferrocd(&["--auth-token-ttl", "1"]).await;
    let mut admin = connect(&server, None).await.unwrap();
    admin.user_add("root", ROOT_PASSWORD, None).await.unwrap();
    admin.user_grant_role("root", "root").await.unwrap();
    admin.auth_enable().await.unwrap();
    let mut root = connect(&server, Some(("root", ROOT_PASSWORD)))
        .await
        .unwrap();
    // Used every half TTL, the token stays valid past its TTL.
    let half_ttl = Duration::from_millis(TOKEN_TTL_MS / 2);
    for _ in 0..4 {
        assert!(get(&mut root, "k", None).await.starts_with("ok "));
        tokio::time::sleep(half_ttl).await;
    }
    // Idle for longer than its TTL (the passing of time is what is tested), it is refused.
    tokio::time::sleep(Duration::from_millis(TOKEN_TTL_MS + TOKEN_TTL_MS / 2)).await;
    let answer = get(&mut root, "k", None).await;
    assert_eq!(
        answer,
        "error Unauthenticated etcdserver: invalid auth token"
    );
    let mut again = connect(&server, Some(("root", ROOT_PASSWORD)))
        .await
        .unwrap();
    assert!(get(&mut again, "k", None).await.starts_with("ok "));
}
