//! Start-up errors are clear and leave nothing half-started: a bad flag, a busy port, a data
//! dir created with another shard count. Also `/health` and `/version` on the client port.

mod common;

use common::Server;
use std::net::TcpListener;
use std::process::{Command, Output};

fn ferrocd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferrocd"))
        .args(args)
        .output()
        .expect("run ferrocd")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Runs ferrocd on a fresh data dir, listening on `client_url` (plus `args`), and returns its
/// exit status and standard error.
fn start_on(client_url: &str, args: &[&str]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("d");
    let mut all = vec![
        "--data-dir",
        data_dir.to_str().unwrap(),
        "--listen-client-urls",
        client_url,
    ];
    all.extend_from_slice(args);
    let output = ferrocd(&all);
    (output.status.code(), stderr(&output))
}

#[test]
fn an_unknown_flag_is_refused_with_usage() {
    let output = ferrocd(&["--no-such-flag"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("--no-such-flag"),
        "{}",
        stderr(&output)
    );
}

/// etcd 3.4's logging flags parse; `--log-outputs stdout` moves the log lines to stdout.
#[test]
fn log_outputs_stdout_moves_the_log_lines() {
    let output = ferrocd(&[
        "--logger",
        "zap",
        "--log-outputs",
        "stdout",
        "--listen-client-urls",
        "127.0.0.1:1",
    ]);
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(stderr(&output), "");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line: serde_json::Value = serde_json::from_str(stdout.trim_end()).expect("one JSON line");
    assert_eq!(line["level"], "error");
    assert!(line["error"]
        .as_str()
        .unwrap()
        .contains("expected a URL like"));
}

#[test]
fn a_malformed_url_is_refused() {
    let (code, message) = start_on("127.0.0.1:1", &[]);
    assert_eq!(code, Some(2));
    assert!(message.contains("expected a URL like http://"), "{message}");
}

#[test]
fn a_busy_client_port_is_reported() {
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", busy.local_addr().unwrap());
    let (code, message) = start_on(&url, &[]);
    assert_eq!(code, Some(1));
    assert!(
        message.contains("cannot listen on") && message.contains("in use"),
        "{message}"
    );
}

/// etcd binds its peer port even as a single member, and stops when it is taken.
#[test]
fn a_busy_peer_port_is_reported() {
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let peer_url = format!("http://{}", busy.local_addr().unwrap());
    let (code, message) = start_on("http://127.0.0.1:0", &["--listen-peer-urls", &peer_url]);
    assert_eq!(code, Some(1));
    assert!(
        message.contains(&format!("cannot listen on {peer_url}")) && message.contains("in use"),
        "{message}"
    );
}

#[tokio::test]
async fn a_data_dir_keeps_its_shard_count() {
    let mut server = Server::ferrocd(&["--shards", "3"]).await;
    server.client().await.put("k", "v", None).await.unwrap();
    server.stop();
    let data_dir = server.data_dir();
    let output = ferrocd(&["--data-dir", data_dir.to_str().unwrap(), "--shards", "2"]);
    assert_eq!(output.status.code(), Some(1));
    let message = stderr(&output);
    assert!(
        message.contains("created with --shards 3") && message.contains("--shards 2"),
        "{message}"
    );
}

#[tokio::test]
async fn health_and_version_answer_on_the_client_port() {
    let server = Server::ferrocd(&[]).await;
    let addr = server.endpoint().trim_start_matches("http://").to_string();
    let get = |path: &str| {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(&addr).unwrap();
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    };
    let health = get("/health");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(
        health.ends_with(r#"{"health":"true","reason":""}"#),
        "{health}"
    );
    let version = get("/version");
    assert!(version.contains(r#""etcdserver":"3.5.0""#), "{version}");
}

/// Longest wait for an auto compaction to happen (its interval is 100 ms here).
const AUTO_COMPACTION_DEADLINE_MS: u64 = 20_000;

/// Whether revision `rev` is compacted: a read at it fails with etcd's compacted error.
async fn compacted_at_least(client: &mut etcd_client::Client, rev: i64) -> bool {
    let options = etcd_client::GetOptions::new().with_revision(rev);
    match client.get("k", Some(options)).await {
        Ok(_) => false,
        Err(e) => {
            assert!(e.to_string().contains("compacted"), "unexpected error {e}");
            true
        }
    }
}

/// Polls (a real read, every 50 ms) until revision `rev` is compacted, or fails at the deadline.
async fn wait_until_compacted(client: &mut etcd_client::Client, rev: i64) {
    let deadline =
        std::time::Instant::now() + std::time::Duration::from_millis(AUTO_COMPACTION_DEADLINE_MS);
    while !compacted_at_least(client, rev).await {
        assert!(std::time::Instant::now() < deadline, "no auto compaction");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// `--auto-compaction-mode revision --auto-compaction-retention N` compacts at `current - N`
/// (etcd checks every 5 minutes; a hidden flag shortens it here): history older than that
/// goes, the last N revisions stay readable.
#[tokio::test]
async fn revision_mode_auto_compaction_keeps_the_last_n_revisions() {
    let server = Server::ferrocd(&[
        "--auto-compaction-mode",
        "revision",
        "--auto-compaction-retention",
        "5",
        "--experimental-auto-compaction-interval-ms",
        "100",
    ])
    .await;
    let mut client = server.client().await;
    for i in 0..20 {
        client.put("k", format!("v{i}"), None).await.expect("put");
    }
    // Revision 21 is the last put; the compactor targets 21 - 5 = 16.
    wait_until_compacted(&mut client, 15).await;
    let kept = client
        .get("k", Some(etcd_client::GetOptions::new().with_revision(16)))
        .await
        .expect("revision 16 is kept");
    assert_eq!(kept.kvs()[0].value(), b"v14");
    assert!(
        server.logged("auto compaction", &[("revision", 16.into())]),
        "{}",
        server.log()
    );
}

/// `--auto-compaction-retention 1s` (periodic mode, etcd's default mode) compacts at the
/// revision the store had a retention ago: writes made before are compacted away in time,
/// and the compacted revision is one the store really had (no newer than the last write).
#[tokio::test]
async fn periodic_auto_compaction_compacts_what_is_older_than_the_retention() {
    let server = Server::ferrocd(&["--auto-compaction-retention", "1s"]).await;
    let mut client = server.client().await;
    for i in 0..5 {
        client.put("k", format!("v{i}"), None).await.expect("put");
    }
    // Revision 6 is the last put: once a retention passed, compaction reaches it.
    wait_until_compacted(&mut client, 5).await;
    let latest = client.get("k", None).await.expect("get");
    assert_eq!(latest.kvs()[0].value(), b"v4");
    assert!(
        server.logged("auto compaction", &[("revision", 6.into())]),
        "{}",
        server.log()
    );
}
