//! Starts an etcd-compatible server (etcd or ferrocd) on 127.0.0.1 with temporary data dirs,
//! as one member or a static cluster, waits until it answers a real request, and kills it by
//! PID when done.

use crate::BenchResult;
use etcd_client::{Client, ConnectOptions};
use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// How long a server may take from spawn to answering its first request.
const READY_TIMEOUT_MS: u64 = 30_000;
/// Pause between two readiness probes.
const READY_POLL_INTERVAL_MS: u64 = 50;
/// Per-probe limits, so one hung probe cannot eat the whole readiness deadline.
const PROBE_CONNECT_TIMEOUT_MS: u64 = 500;
const PROBE_REQUEST_TIMEOUT_MS: u64 = 1_000;
/// Spawn attempts when a picked port was taken by another process in the meantime.
const MAX_START_ATTEMPTS: usize = 3;
/// How much of the server log an error message quotes.
const LOG_TAIL_BYTES: usize = 4 * 1024;

/// What to run: a binary that takes etcd's flags, plus extra arguments.
#[derive(Clone, Debug)]
pub struct ServerSpec {
    /// Name for tables and messages, e.g. `etcd`.
    pub label: String,
    pub program: PathBuf,
    pub extra_args: Vec<String>,
}

/// A running member; killed (SIGKILL) when dropped.
pub struct ServerProcess {
    spec: ServerSpec,
    /// Holds the data dir and the log.
    root: TempDir,
    client_port: u16,
    child: Child,
}

/// A server that did not come up; `exited` tells "the binary refused to run" (e.g. a flag or
/// a cluster size it does not support) from "it hung" or "it could not be spawned".
#[derive(Debug)]
pub struct StartFailure {
    pub label: String,
    pub exited: bool,
    /// The last non-empty line of the member's log: usually the reason it gave.
    pub last_log_line: String,
    pub message: String,
}

impl std::fmt::Display for StartFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for StartFailure {}

/// Every member of one server: a single member, or a static cluster on 127.0.0.1 ports.
pub struct Cluster {
    members: Vec<ServerProcess>,
}

impl Cluster {
    /// Spawns `size` members with a static `--initial-cluster` naming all of them, and returns
    /// once every member has answered a Range request (so the cluster has a leader).
    pub async fn start(spec: ServerSpec, size: usize) -> BenchResult<Cluster> {
        assert!(size >= 1, "a cluster has at least one member");
        let roots = (0..size)
            .map(|member| {
                tempfile::Builder::new()
                    .prefix(&format!("ferrocd-bench-{}-{member}-", spec.label))
                    .tempdir()
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        let (children, client_ports) = spawn_until_ready(&spec, &roots).await?;
        let members = roots
            .into_iter()
            .zip(children)
            .zip(client_ports)
            .map(|((root, child), client_port)| ServerProcess {
                spec: spec.clone(),
                root,
                client_port,
                child,
            })
            .collect();
        Ok(Cluster { members })
    }

    pub fn label(&self) -> &str {
        self.members[0].label()
    }

    pub fn size(&self) -> usize {
        self.members.len()
    }

    /// The client URLs of all members.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(ServerProcess::endpoint).collect()
    }

    pub fn pids(&self) -> Vec<u32> {
        self.members.iter().map(ServerProcess::pid).collect()
    }

    /// Sum over the members of their peak RSS.
    pub fn peak_rss_bytes(&self) -> BenchResult<u64> {
        self.members.iter().map(ServerProcess::peak_rss_bytes).sum()
    }

    /// Sum over the members of their data dir sizes.
    pub fn data_dir_size_bytes(&self) -> BenchResult<u64> {
        self.members
            .iter()
            .map(ServerProcess::data_dir_size_bytes)
            .sum()
    }
}

impl ServerProcess {
    /// Spawns a single-member server and returns once it has answered a Range request.
    pub async fn start(spec: ServerSpec) -> BenchResult<ServerProcess> {
        let mut cluster = Cluster::start(spec, 1).await?;
        Ok(cluster.members.pop().expect("one member"))
    }

    pub fn label(&self) -> &str {
        &self.spec.label
    }

    /// `http://127.0.0.1:PORT`, the client URL.
    pub fn endpoint(&self) -> String {
        endpoint(self.client_port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn data_dir(&self) -> PathBuf {
        data_dir(self.root.path())
    }

    /// Peak resident set size so far (`VmHWM` in /proc/PID/status).
    pub fn peak_rss_bytes(&self) -> BenchResult<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        parse_vm_hwm_bytes(&status).ok_or_else(|| "no VmHWM line in /proc/PID/status".into())
    }

    /// Apparent size of every file under the data dir (preallocated WAL segments included).
    pub fn data_dir_size_bytes(&self) -> BenchResult<u64> {
        Ok(dir_size_bytes(&self.data_dir())?)
    }
}

/// Children that are killed and reaped when dropped, unless taken out.
struct Spawned(Vec<Child>);

impl Drop for Spawned {
    fn drop(&mut self) {
        self.0.iter_mut().for_each(kill_and_reap);
    }
}

/// Spawns every member on fresh ports and waits for all; retries when a picked port was taken
/// by another process in the meantime. Returns the children and their client ports.
async fn spawn_until_ready(
    spec: &ServerSpec,
    roots: &[TempDir],
) -> BenchResult<(Vec<Child>, Vec<u16>)> {
    for attempt in 1..=MAX_START_ATTEMPTS {
        let ports = pick_free_ports(2 * roots.len())?;
        let (client_ports, peer_ports) = ports.split_at(roots.len());
        let initial_cluster = peer_ports
            .iter()
            .enumerate()
            .map(|(member, port)| format!("{}={}", member_name(member), endpoint(*port)))
            .collect::<Vec<_>>()
            .join(",");
        let mut spawned = Spawned(Vec::with_capacity(roots.len()));
        for (member, root) in roots.iter().enumerate() {
            // A failed attempt may have initialised the data dir for other ports.
            remove_if_present(&data_dir(root.path()))?;
            let addresses = Addresses {
                name: member_name(member),
                client_port: client_ports[member],
                peer_port: peer_ports[member],
                initial_cluster: &initial_cluster,
            };
            spawned.0.push(spawn(spec, root.path(), &addresses)?);
        }
        match wait_all_ready(&mut spawned.0, roots, client_ports).await {
            Ok(()) => return Ok((std::mem::take(&mut spawned.0), client_ports.to_vec())),
            Err((_, StartError::AddressInUse)) if attempt < MAX_START_ATTEMPTS => {}
            Err((member, error)) => {
                drop(spawned);
                let root = roots[member].path();
                return Err(Box::new(StartFailure {
                    label: spec.label.clone(),
                    exited: matches!(error, StartError::Exited(_)),
                    last_log_line: last_log_line(root),
                    message: format!(
                        "{} (member {member} of {}) did not start: {error}; log tail:\n{}",
                        spec.label,
                        roots.len(),
                        log_tail(root)
                    ),
                }));
            }
        }
    }
    unreachable!("the last attempt either returns or fails");
}

/// Waits for each member in turn; all were spawned first, so a cluster can elect meanwhile.
async fn wait_all_ready(
    children: &mut [Child],
    roots: &[TempDir],
    client_ports: &[u16],
) -> Result<(), (usize, StartError)> {
    for (member, child) in children.iter_mut().enumerate() {
        wait_ready(child, roots[member].path(), client_ports[member])
            .await
            .map_err(|error| (member, error))?;
    }
    Ok(())
}

fn member_name(member: usize) -> String {
    format!("m{member}")
}

fn remove_if_present(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(error),
        _ => Ok(()),
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

/// SIGKILL by PID, then reap. Killing an already exited child fails harmlessly.
fn kill_and_reap(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Polls a real request until it succeeds, the child exits, or the deadline passes.
async fn wait_ready(child: &mut Child, root: &Path, client_port: u16) -> Result<(), StartError> {
    let deadline = Instant::now() + Duration::from_millis(READY_TIMEOUT_MS);
    loop {
        check_alive(child, root)?;
        if probe(&endpoint(client_port)).await {
            // A probe can reach another process that took our port while our server dies
            // from the bind failure, so the child must still be alive after it.
            return check_alive(child, root);
        }
        if Instant::now() >= deadline {
            return Err(StartError::NotReady);
        }
        tokio::time::sleep(Duration::from_millis(READY_POLL_INTERVAL_MS)).await;
    }
}

fn check_alive(child: &mut Child, root: &Path) -> Result<(), StartError> {
    match child.try_wait() {
        Ok(None) => Ok(()),
        Ok(Some(_)) if read_log(root).contains("address already in use") => {
            Err(StartError::AddressInUse)
        }
        Ok(Some(status)) => Err(StartError::Exited(status.to_string())),
        Err(error) => Err(StartError::Exited(error.to_string())),
    }
}

fn read_log(root: &Path) -> String {
    std::fs::read_to_string(log_path(root)).unwrap_or_default()
}

fn last_log_line(root: &Path) -> String {
    let log = read_log(root);
    let line = log.lines().rev().find(|l| !l.trim().is_empty());
    line.unwrap_or("").trim().to_string()
}

fn log_tail(root: &Path) -> String {
    let log = read_log(root);
    let start = (log.len().saturating_sub(LOG_TAIL_BYTES)..=log.len())
        .find(|&i| log.is_char_boundary(i))
        .unwrap_or(log.len());
    log[start..].to_string()
}

enum StartError {
    AddressInUse,
    Exited(String),
    NotReady,
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::AddressInUse => write!(f, "its port was taken"),
            StartError::Exited(status) => write!(f, "it exited ({status})"),
            StartError::NotReady => write!(f, "no answer within {READY_TIMEOUT_MS} ms"),
        }
    }
}

fn endpoint(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

fn log_path(root: &Path) -> PathBuf {
    root.join("server.log")
}

fn data_dir(root: &Path) -> PathBuf {
    root.join("data")
}

/// Where one member listens, and the whole cluster's peer list.
struct Addresses<'a> {
    name: String,
    client_port: u16,
    peer_port: u16,
    initial_cluster: &'a str,
}

/// Spawns the binary with etcd's member flags; stdout and stderr go to the log.
fn spawn(spec: &ServerSpec, root: &Path, addresses: &Addresses) -> BenchResult<Child> {
    let log = File::options()
        .create(true)
        .append(true)
        .open(log_path(root))?;
    let client_url = endpoint(addresses.client_port);
    let peer_url = endpoint(addresses.peer_port);
    let child = Command::new(&spec.program)
        .arg("--name")
        .arg(&addresses.name)
        .arg("--data-dir")
        .arg(data_dir(root))
        .args(["--listen-client-urls", &client_url])
        .args(["--advertise-client-urls", &client_url])
        .args(["--listen-peer-urls", &peer_url])
        .args(["--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", addresses.initial_cluster])
        .args(&spec.extra_args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", spec.program.display()))?;
    Ok(child)
}

/// One Range request with short timeouts: it proves the gRPC KV path answers.
async fn probe(endpoint: &str) -> bool {
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_millis(PROBE_CONNECT_TIMEOUT_MS))
        .with_timeout(Duration::from_millis(PROBE_REQUEST_TIMEOUT_MS));
    let Ok(mut client) = Client::connect([endpoint], Some(options)).await else {
        return false;
    };
    client
        .get("ferrocd-bench-readiness-probe", None)
        .await
        .is_ok()
}

/// `count` distinct free ports: every listener is held until all ports are known.
fn pick_free_ports(count: usize) -> std::io::Result<Vec<u16>> {
    let listeners = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect()
}

/// `VmHWM:     1234 kB` -> 1234 * 1024.
fn parse_vm_hwm_bytes(proc_status: &str) -> Option<u64> {
    let line = proc_status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let mut fields = line["VmHWM:".len()..].split_whitespace();
    let kib: u64 = fields.next()?.parse().ok()?;
    (fields.next()? == "kB").then_some(kib * 1024)
}

/// Sum of the apparent sizes of the regular files under `dir`, recursively.
fn dir_size_bytes(dir: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let file_type = entry.file_type()?;
        if file_type.is_dir() {
            total += dir_size_bytes(&entry.path())?;
        } else if file_type.is_file() {
            total += entry.metadata()?.len();
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_hwm_is_read_in_bytes() {
        let status = "Name:\tetcd\nVmPeak:\t  99 kB\nVmHWM:\t   2048 kB\nVmRSS:\t 1 kB\n";
        assert_eq!(parse_vm_hwm_bytes(status), Some(2048 * 1024));
        assert_eq!(parse_vm_hwm_bytes("VmRSS:\t1 kB\n"), None);
        assert_eq!(parse_vm_hwm_bytes("VmHWM:\t1 MB\n"), None);
    }

    #[test]
    fn our_own_peak_rss_is_plausible() {
        let status = std::fs::read_to_string("/proc/self/status").expect("procfs");
        let bytes = parse_vm_hwm_bytes(&status).expect("VmHWM");
        assert!(
            bytes > 1024 * 1024,
            "a test binary uses more than 1 MiB: {bytes}"
        );
    }

    #[test]
    fn dir_size_sums_nested_files() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("a"), [0u8; 100]).expect("write a");
        std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
        std::fs::write(dir.path().join("sub/b"), [0u8; 23]).expect("write b");
        assert_eq!(dir_size_bytes(dir.path()).expect("size"), 123);
    }
}
