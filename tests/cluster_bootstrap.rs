//! Cluster bootstrap against real etcd: the same `--initial-cluster` flags give the same member
//! and cluster ids and the same member list, and a bad list is refused with etcd's message.
//! Each process runs on its own 127.0.0.1 ports and temporary data dir, and is killed when
//! the test ends.

use etcd_client::{Client, ConnectOptions, MemberListResponse};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long a member (or a whole etcd cluster) may take to answer MemberList.
const READY_TIMEOUT_MS: u64 = 30_000;
const READY_POLL_INTERVAL_MS: u64 = 50;
const REQUEST_TIMEOUT_MS: u64 = 2_000;
/// How long a process refusing its flags may take to exit.
const REFUSAL_TIMEOUT_S: &str = "20";

const ETCD: &str = "etcd";
const FERROCD: &str = env!("CARGO_BIN_EXE_ferrocd");

/// `count` distinct free ports (held together while picked, then released).
fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port"))
        .collect();
    let port = |l: &TcpListener| l.local_addr().expect("local addr").port();
    listeners.iter().map(port).collect()
}

/// One member's name and ports.
#[derive(Clone)]
struct MemberFlags {
    name: String,
    client_port: u16,
    peer_port: u16,
}

impl MemberFlags {
    fn client_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }
}

fn members(count: usize) -> Vec<MemberFlags> {
    let ports = free_ports(2 * count);
    (0..count)
        .map(|i| MemberFlags {
            name: format!("m{}", i + 1),
            client_port: ports[2 * i],
            peer_port: ports[2 * i + 1],
        })
        .collect()
}

fn initial_cluster(members: &[MemberFlags]) -> String {
    let entries: Vec<String> = members
        .iter()
        .map(|m| format!("{}={}", m.name, m.peer_url()))
        .collect();
    entries.join(",")
}

/// etcd's flags for `member` of `cluster` (both servers take them).
fn member_args(member: &MemberFlags, cluster: &str, data_dir: &Path) -> Vec<String> {
    let flags = [
        ("--name", member.name.clone()),
        (
            "--data-dir",
            data_dir.to_str().expect("UTF-8 path").to_string(),
        ),
        ("--listen-client-urls", member.client_url()),
        ("--advertise-client-urls", member.client_url()),
        ("--listen-peer-urls", member.peer_url()),
        ("--initial-advertise-peer-urls", member.peer_url()),
        ("--initial-cluster", cluster.to_string()),
    ];
    flags
        .into_iter()
        .flat_map(|(flag, value)| [flag.to_string(), value])
        .collect()
}

/// A running server process; killed (and reaped) when dropped.
struct Process(Child);

impl Process {
    fn spawn(program: &str, args: &[String], log: &Path) -> Process {
        let log = std::fs::File::create(log).expect("create log");
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
        Process(child)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// MemberList from `client_url`, polled until it answers (a cluster answers once formed).
async fn member_list(client_url: &str) -> MemberListResponse {
    let deadline = Instant::now() + Duration::from_millis(READY_TIMEOUT_MS);
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_millis(REQUEST_TIMEOUT_MS))
        .with_timeout(Duration::from_millis(REQUEST_TIMEOUT_MS));
    loop {
        let attempt = async {
            let mut client = Client::connect([client_url], Some(options.clone())).await?;
            client.member_list().await
        };
        match attempt.await {
            Ok(list) => return list,
            Err(e) if Instant::now() > deadline => panic!("MemberList on {client_url}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(READY_POLL_INTERVAL_MS)).await,
        }
    }
}

/// (id, name, peer URLs, client URLs) of every member, in the order listed.
type Row = (u64, String, Vec<String>, Vec<String>);

fn rows(list: &MemberListResponse) -> Vec<Row> {
    let rows = list.members().iter().map(|m| {
        let urls = |urls: &[String]| urls.to_vec();
        let client_urls = urls(m.client_urls());
        (
            m.id(),
            m.name().to_string(),
            urls(m.peer_urls()),
            client_urls,
        )
    });
    rows.collect()
}

/// The header's (cluster id, member id).
fn ids(list: &MemberListResponse) -> (u64, u64) {
    let header = list.header().expect("a header");
    (header.cluster_id(), header.member_id())
}

/// Runs `program` with `members[0]`'s flags for `members` and returns its member list.
async fn start_and_list(
    program: &str,
    members: &[MemberFlags],
    dir: &Path,
) -> (Process, MemberListResponse) {
    let cluster = initial_cluster(members);
    let data_dir = dir.join(format!("{}-{}", members[0].name, program.len()));
    let args = member_args(&members[0], &cluster, &data_dir);
    let process = Process::spawn(program, &args, &dir.join("first.log"));
    let list = member_list(&members[0].client_url()).await;
    (process, list)
}

#[tokio::test]
async fn one_member_lists_as_etcd_and_keeps_it_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let one = members(1);
    let (etcd, expected) = start_and_list(ETCD, &one, dir.path()).await;
    drop(etcd);
    let (ferrocd, listed) = start_and_list(FERROCD, &one, dir.path()).await;
    assert_eq!(ids(&listed), ids(&expected));
    assert_eq!(rows(&listed), rows(&expected));
    drop(ferrocd);
    let (_ferrocd, after_restart) = start_and_list(FERROCD, &one, dir.path()).await;
    assert_eq!(ids(&after_restart), ids(&expected));
    assert_eq!(rows(&after_restart), rows(&expected));
}

/// A real 3-member etcd cluster, then a ferrocd one with the same flags: the same ids and
/// members, each with the client URLs it published.
#[tokio::test]
async fn three_members_get_etcds_ids() {
    let dir = tempfile::tempdir().unwrap();
    let three = members(3);
    let etcds = spawn_all(ETCD, &three, dir.path());
    let expected = published_member_list(&three[0].client_url()).await;
    drop(etcds);
    assert_eq!(expected.members().len(), 3);
    let _ferrocds = spawn_all(FERROCD, &three, dir.path());
    let listed = published_member_list(&three[0].client_url()).await;
    assert_eq!(ids(&listed), ids(&expected));
    assert_eq!(rows(&listed), rows(&expected));
}

/// Every member of `members` started by `program`, each on its own data dir.
fn spawn_all(program: &str, members: &[MemberFlags], dir: &Path) -> Vec<Process> {
    let cluster = initial_cluster(members);
    let spawn = |m: &MemberFlags| {
        let data_dir = dir.join(format!("{program}-{}", m.name).replace('/', "_"));
        let args = member_args(m, &cluster, &data_dir);
        let log = dir.join(format!("{program}-{}.log", m.name).replace('/', "_"));
        Process::spawn(program, &args, &log)
    };
    members.iter().map(spawn).collect()
}

/// MemberList once every member has published its client URLs (each does once the cluster has
/// a leader; polled, bounded by the ready timeout).
async fn published_member_list(client_url: &str) -> MemberListResponse {
    let deadline = Instant::now() + Duration::from_millis(READY_TIMEOUT_MS);
    loop {
        let list = member_list(client_url).await;
        if list.members().iter().all(|m| !m.client_urls().is_empty()) {
            return list;
        }
        assert!(
            Instant::now() < deadline,
            "members never published: {list:?}"
        );
        tokio::time::sleep(Duration::from_millis(READY_POLL_INTERVAL_MS)).await;
    }
}

/// What a server that refused its flags said: etcd's fatal line, ferrocd's
/// `error` field.
fn refusal(program: &str, extra: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let ports = free_ports(2);
    let client_url = format!("http://127.0.0.1:{}", ports[0]);
    let peer_url = format!("http://127.0.0.1:{}", ports[1]);
    let output: Output = Command::new("timeout")
        .args([REFUSAL_TIMEOUT_S, program, "--data-dir"])
        .arg(dir.path().join("d"))
        .args(["--listen-client-urls", &client_url])
        .args(["--advertise-client-urls", &client_url])
        .args(["--listen-peer-urls", &peer_url])
        .args(extra)
        .output()
        .expect("run the server");
    assert!(!output.status.success(), "{program} {extra:?} started");
    let text = String::from_utf8_lossy(&output.stderr).into_owned();
    if program == ETCD {
        // capnslog's critical (fatal) line: `... C | etcdmain: <message>`.
        let line = text.lines().find_map(|l| l.split_once(" C | etcdmain: "));
        return line.map_or(text.clone(), |(_, message)| message.to_string());
    }
    let line = text.lines().rev().find_map(|line| {
        let json: serde_json::Value = serde_json::from_str(line).ok()?;
        Some(json["error"].as_str()?.to_string())
    });
    line.unwrap_or(text)
}

#[test]
fn bad_initial_clusters_are_refused_with_etcds_messages() {
    let (one, other) = ("http://127.0.0.1:42380", "http://127.0.0.1:42381");
    // (--name, --initial-advertise-peer-urls, --initial-cluster)
    let cases = [
        ("x", one, "a=http://127.0.0.1:42380".to_string()),
        ("a", other, format!("a={one}")),
        ("a", one, format!("a={one},b={one}")),
        ("a", one, format!("a={one},b")),
        ("a", one, "a=foo".to_string()),
        ("a", one, format!("a={one},b=http://127.0.0.1")),
        ("a", one, format!("a={one},b=http://127.0.0.1:9/p")),
        ("a", one, format!("a={one},a={one}")),
    ];
    for (name, advertised, cluster) in &cases {
        let args = [
            "--name",
            name,
            "--initial-advertise-peer-urls",
            advertised,
            "--initial-cluster",
            cluster,
        ];
        let etcd = refusal(ETCD, &args);
        assert_eq!(refusal(FERROCD, &args), etcd, "{args:?}");
    }
}

/// A new data dir with `existing` joins by asking the other listed members for the membership:
/// with nobody else listed, it is refused with etcd's message.
#[test]
fn joining_an_existing_cluster_is_refused() {
    let args = [
        "--initial-advertise-peer-urls",
        "http://127.0.0.1:42380",
        "--initial-cluster",
        "default=http://127.0.0.1:42380",
        "--initial-cluster-state",
        "existing",
    ];
    // Nobody else is listed to ask for the membership: etcd 3.4's message.
    let message = refusal(FERROCD, &args);
    assert!(
        message.contains(
            "cannot fetch cluster info from peer urls: could not retrieve cluster information \
             from the given URLs"
        ),
        "{message}"
    );
}
