//! Runs `tests/etcdctl_interop.sh` (etcdctl through the KV, maintenance, watch, lease, lock and
//! elect command families, exact outputs) and `tests/etcdctl_auth.sh` (user, role, permission
//! and auth commands, `--user` requests allowed and denied)
//! against a fresh server: once against real etcd, which keeps the script's expectations
//! honest, and once against the server under test (`FERROCD_TEST_SERVER`, default ferrocd).

mod common;

use common::{run_etcdctl_script, Server, SCRIPT_TIMEOUT_S};

const INTEROP_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/etcdctl_interop.sh");
const AUTH_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/etcdctl_auth.sh");

fn run_script(server: &Server, script: &str) {
    run_etcdctl_script(server, script, SCRIPT_TIMEOUT_S);
}

#[tokio::test]
async fn etcdctl_script_matches_real_etcd() {
    run_script(&Server::etcd().await, INTEROP_SCRIPT);
}

#[tokio::test]
async fn etcdctl_script_against_subject() {
    run_script(&Server::subject(&[]).await, INTEROP_SCRIPT);
}

#[tokio::test]
async fn etcdctl_auth_script_matches_real_etcd() {
    run_script(&Server::etcd().await, AUTH_SCRIPT);
}

#[tokio::test]
async fn etcdctl_auth_script_against_subject() {
    run_script(&Server::subject(&[]).await, AUTH_SCRIPT);
}
