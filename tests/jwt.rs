//! JWT auth tokens (`--auth-token jwt,...`): real etcd 3.4 and ferrocd run with the same key
//! pair (made by `openssl` at test time) and answer the same requests made with raw tokens:
//! a token works, a forged one does not, a deleted user's token is refused, an expired token is
//! refused; the payloads of both servers' tokens carry the same claims. A ferrocd JWT also
//! survives a restart (it is stateless), and etcdctl `--user` works against a JWT ferrocd.

mod common;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use common::Server;
use ferrocd_api::authpb::Permission;
use ferrocd_api::etcdserverpb::auth_client::AuthClient;
use ferrocd_api::etcdserverpb::kv_client::KvClient;
use ferrocd_api::etcdserverpb::{
    AuthEnableRequest, AuthRoleAddRequest, AuthRoleGrantPermissionRequest, AuthUserAddRequest,
    AuthUserDeleteRequest, AuthUserGrantRoleRequest, AuthenticateRequest, PutRequest, RangeRequest,
};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

const ROOT_PASSWORD: &str = "rootpw";
const USER_PASSWORD: &str = "bobpw";
/// JWT `ttl` of the servers: long enough for the steps before the expiry check.
const JWT_TTL_S: u64 = 4;
/// Longest wait for a token to expire (ttl plus a second of `exp` rounding, plus slack).
const EXPIRY_DEADLINE_MS: u64 = 15_000;

/// An RSA key for RS256 (PKCS#8), and a P-256 key for ES256 in the SEC1 form `openssl
/// ecparam` writes: the openssl commands that write them.
const RSA_KEY: &[&str] = &[
    "genpkey",
    "-algorithm",
    "RSA",
    "-pkeyopt",
    "rsa_keygen_bits:2048",
];
const P256_KEY: &[&str] = &["ecparam", "-name", "prime256v1", "-genkey", "-noout"];

/// Writes a key pair (private as `generate` makes it, SubjectPublicKeyInfo public) into `dir`.
fn key_pair(dir: &Path, generate: &[&str]) -> (String, String) {
    let private = dir.join("jwt-private.pem");
    let public = dir.join("jwt-public.pem");
    let run = |args: &[&str]| {
        let output = Command::new("openssl")
            .args(args)
            .output()
            .expect("run openssl");
        assert!(output.status.success(), "openssl {args:?}: {output:?}");
    };
    let (private, public) = (private.to_str().unwrap(), public.to_str().unwrap());
    run(&[generate, &["-out", private]].concat());
    run(&["pkey", "-in", private, "-pubout", "-out", public]);
    (private.to_string(), public.to_string())
}

fn jwt_flag((private, public): &(String, String), method: &str, ttl: &str) -> String {
    format!("jwt,pub-key={public},priv-key={private},sign-method={method},ttl={ttl}")
}

/// A gRPC answer as one comparable line.
fn outcome<T>(result: Result<tonic::Response<T>, tonic::Status>) -> String {
    match result {
        Ok(_) => "ok".to_string(),
        Err(status) => format!("error {:?} {}", status.code(), status.message()),
    }
}

fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("token", token.parse().expect("token is ASCII"));
    request
}

async fn channel(server: &Server) -> Channel {
    Channel::from_shared(server.endpoint())
        .unwrap()
        .connect()
        .await
        .expect("connect")
}

async fn authenticate(channel: &Channel, name: &str, password: &str) -> String {
    let request = AuthenticateRequest {
        name: name.into(),
        password: password.into(),
    };
    let response = AuthClient::new(channel.clone())
        .authenticate(request)
        .await
        .expect("authenticate");
    response.into_inner().token
}

async fn get_with(channel: &Channel, token: &str) -> String {
    let request = RangeRequest {
        key: b"k".to_vec(),
        ..Default::default()
    };
    outcome(
        KvClient::new(channel.clone())
            .range(with_token(request, token))
            .await,
    )
}

/// Root, and bob who may read and write `k`; auth enabled.
async fn set_up_users(channel: &Channel) {
    let mut auth = AuthClient::new(channel.clone());
    for (name, password) in [("root", ROOT_PASSWORD), ("bob", USER_PASSWORD)] {
        let user = AuthUserAddRequest {
            name: name.into(),
            password: password.into(),
            ..Default::default()
        };
        auth.user_add(user).await.expect("user add");
    }
    let root_role = AuthUserGrantRoleRequest {
        user: "root".into(),
        role: "root".into(),
    };
    auth.user_grant_role(root_role).await.expect("grant root");
    auth.role_add(AuthRoleAddRequest { name: "rw".into() })
        .await
        .expect("role add");
    let permission = Permission {
        perm_type: 2, // READWRITE
        key: b"k".to_vec(),
        range_end: Vec::new(),
    };
    let grant = AuthRoleGrantPermissionRequest {
        name: "rw".into(),
        perm: Some(permission),
    };
    auth.role_grant_permission(grant)
        .await
        .expect("grant permission");
    let bob_role = AuthUserGrantRoleRequest {
        user: "bob".into(),
        role: "rw".into(),
    };
    auth.user_grant_role(bob_role).await.expect("grant rw");
    auth.auth_enable(AuthEnableRequest {})
        .await
        .expect("auth enable");
}

/// The claim names of a JWT's payload, sorted.
fn claim_names(token: &str) -> Vec<String> {
    let payload = token.split('.').nth(1).expect("a JWT has three parts");
    let json: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("base64url")).unwrap();
    let mut names: Vec<String> = json
        .as_object()
        .expect("claims object")
        .keys()
        .cloned()
        .collect();
    names.sort();
    names
}

/// The scripted session: every answer, in order, as comparable lines.
async fn transcript(server: &Server) -> (Vec<String>, Vec<String>) {
    let channel = channel(server).await;
    set_up_users(&channel).await;
    let mut lines = Vec::new();
    let root = authenticate(&channel, "root", ROOT_PASSWORD).await;
    let put = PutRequest {
        key: b"k".to_vec(),
        value: b"v".to_vec(),
        ..Default::default()
    };
    let mut kv = KvClient::new(channel.clone());
    lines.push(format!(
        "root put: {}",
        outcome(kv.put(with_token(put, &root)).await)
    ));
    lines.push(format!("root get: {}", get_with(&channel, &root).await));
    let bob = authenticate(&channel, "bob", USER_PASSWORD).await;
    lines.push(format!("bob get: {}", get_with(&channel, &bob).await));
    // Another first signature character (the last one may only hold padding bits).
    let (signed, signature) = bob.rsplit_once('.').unwrap();
    let other = if signature.starts_with('A') { 'B' } else { 'A' };
    let forged = format!("{signed}.{other}{}", &signature[1..]);
    lines.push(format!(
        "forged signature: {}",
        get_with(&channel, &forged).await
    ));
    lines.push(format!(
        "not a JWT: {}",
        get_with(&channel, "abc.def").await
    ));

    let delete = AuthUserDeleteRequest { name: "bob".into() };
    let deleted = AuthClient::new(channel.clone())
        .user_delete(with_token(delete, &root))
        .await;
    lines.push(format!("delete bob: {}", outcome(deleted)));
    lines.push(format!(
        "deleted user's token: {}",
        get_with(&channel, &bob).await
    ));

    let fresh_root = authenticate(&channel, "root", ROOT_PASSWORD).await;
    lines.push(format!(
        "fresh root get: {}",
        get_with(&channel, &fresh_root).await
    ));
    let deadline = Instant::now() + Duration::from_millis(EXPIRY_DEADLINE_MS);
    let expired = loop {
        let answer = get_with(&channel, &fresh_root).await;
        if answer != "ok" || Instant::now() > deadline {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    lines.push(format!("expired token: {expired}"));
    (lines, claim_names(&fresh_root))
}

#[tokio::test]
async fn jwt_tokens_answer_as_etcd_with_the_same_keys() {
    let keys = tempfile::tempdir().unwrap();
    let flag = jwt_flag(
        &key_pair(keys.path(), RSA_KEY),
        "RS256",
        &format!("{JWT_TTL_S}s"),
    );
    let etcd = Server::etcd_with(&["--auth-token", &flag]).await;
    let ferrocd = Server::ferrocd(&["--auth-token", &flag]).await;
    let (etcd_run, ferrocd_run) = tokio::join!(transcript(&etcd), transcript(&ferrocd));
    assert_eq!(
        ferrocd_run, etcd_run,
        "ferrocd (left) differs from etcd (right)"
    );
    assert_eq!(etcd_run.1, ["exp", "revision", "username"]);
    let refused = |step: &str| {
        etcd_run
            .0
            .iter()
            .any(|l| l.starts_with(step) && l.contains("error"))
    };
    for step in [
        "forged",
        "not a JWT",
        "deleted user's token",
        "expired token",
    ] {
        assert!(
            refused(step),
            "etcd accepted the {step} step: {:#?}",
            etcd_run.0
        );
    }
}

/// A JWT is checked by signature and expiry only, so one issued before a restart still works;
/// etcdctl `--user` authenticates and uses JWTs against ferrocd. ES256 with a SEC1 key here
/// (RS256 with PKCS#8 above).
#[tokio::test]
async fn a_jwt_survives_a_restart_and_etcdctl_uses_jwt() {
    let keys = tempfile::tempdir().unwrap();
    let flag = jwt_flag(&key_pair(keys.path(), P256_KEY), "ES256", "10m");
    let mut server = Server::ferrocd(&["--auth-token", &flag]).await;
    set_up_users(&channel(&server).await).await;
    let token = authenticate(&channel(&server).await, "bob", USER_PASSWORD).await;
    server.restart().await;
    let after = get_with(&channel(&server).await, &token).await;
    assert_eq!(after, "ok", "the token of before the restart");

    let etcdctl = |args: &[&str]| {
        let output = Command::new("etcdctl")
            .args(["--endpoints", &server.endpoint(), "--user", "bob:bobpw"])
            .args(args)
            .env("ETCDCTL_API", "3")
            .output()
            .expect("run etcdctl");
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        (String::from_utf8_lossy(&output.stdout).into_owned(), stderr)
    };
    assert_eq!(etcdctl(&["put", "k", "jwt"]).0, "OK\n");
    assert_eq!(etcdctl(&["get", "k", "--print-value-only"]).0, "jwt\n");
    let denied = etcdctl(&["put", "other", "x"]);
    assert!(denied.1.contains("permission denied"), "{denied:?}");
}
