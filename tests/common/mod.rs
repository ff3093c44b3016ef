//! Shared harness for the integration tests: spawns a real server process (etcd from PATH, or
//! the `ferrocd` binary built with these tests) on 127.0.0.1 with its own temporary data dir,
//! waits until it answers a real request, and kills it when dropped.
//!
//! Each test binary compiles this module separately and uses a different subset of it.
#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions, KvClient, TlsOptions};
use tempfile::TempDir;

pub mod cluster;
pub mod proxy;

/// Environment variable that picks the server under test: `etcd` or `ferrocd` (the default).
/// `FERROCD_TEST_SERVER=etcd` runs every comparison etcd against etcd, which validates the
/// harness and the tests themselves.
pub const SERVER_ENV: &str = "FERROCD_TEST_SERVER";

/// How long a server may take from spawn to answering its first request.
const READY_TIMEOUT_MS: u64 = 20_000;
/// Pause between two readiness probes (polling a real request, not a fixed sleep).
const READY_POLL_INTERVAL_MS: u64 = 50;
/// Per-probe limits, so one hung probe cannot eat the whole readiness deadline.
const PROBE_CONNECT_TIMEOUT_MS: u64 = 500;
const PROBE_REQUEST_TIMEOUT_MS: u64 = 1_000;
/// Start attempts when the picked ports were taken by someone else in the meantime.
const MAX_START_ATTEMPTS: usize = 5;
/// How long a SIGTERM'd server may take to exit before it gets SIGKILL.
const GRACEFUL_STOP_TIMEOUT_MS: u64 = 10_000;
/// Pause between two `try_wait` polls while waiting for a child to exit.
const EXIT_POLL_INTERVAL_MS: u64 = 10;
/// Timeout of a request made by a test client: large enough for a fsync'd write of a big
/// value on a slow disk, small enough that a hung server fails the test instead of hanging it.
const CLIENT_REQUEST_TIMEOUT_MS: u64 = 30_000;
/// Responses of a Txn with several full-range reads of ~100 KiB values exceed tonic's
/// default 4 MiB decoding limit.
const CLIENT_MAX_DECODING_BYTES: usize = 64 * 1024 * 1024;
/// How much of the server log is printed when a test fails.
const LOG_TAIL_BYTES: usize = 8 * 1024;

/// Which server binary to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Flavor {
    /// The reference: real etcd found on PATH.
    Etcd,
    /// The `ferrocd` binary of this package, with extra command-line arguments.
    Ferrocd(Vec<String>),
}

impl Flavor {
    /// The server under test, chosen by `FERROCD_TEST_SERVER` (`etcd` or `ferrocd`, default
    /// `ferrocd`); `ferrocd_args` only apply to ferrocd.
    pub fn subject(ferrocd_args: &[&str]) -> Flavor {
        match std::env::var(SERVER_ENV).as_deref() {
            Ok("etcd") => Flavor::Etcd,
            Ok("ferrocd") | Err(std::env::VarError::NotPresent) => {
                Flavor::Ferrocd(ferrocd_args.iter().map(|arg| arg.to_string()).collect())
            }
            other => panic!("{SERVER_ENV} must be `etcd` or `ferrocd`, got {other:?}"),
        }
    }

    fn program(&self) -> &str {
        match self {
            Flavor::Etcd => "etcd",
            Flavor::Ferrocd(_) => env!("CARGO_BIN_EXE_ferrocd"),
        }
    }

    fn extra_args(&self) -> &[String] {
        match self {
            Flavor::Etcd => &[],
            Flavor::Ferrocd(args) => args,
        }
    }
}

/// TLS on the client URL (tests/tls.rs): the server's TLS flags (etcd's names, which both
/// flavours take) and how the harness's own clients connect.
#[derive(Debug, Clone)]
pub struct ClientTls {
    pub server_args: Vec<String>,
    /// `None` when no client can verify the server (`--auto-tls`): readiness is then probed
    /// with `curl --insecure` on `/health`, and `client()` is not available.
    pub client: Option<TlsOptions>,
}

/// A running server process with its own data dir and log file.
pub struct Server {
    flavor: Flavor,
    tls: Option<ClientTls>,
    /// Holds the data dir and the log; removed when the server is dropped.
    root: TempDir,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
    /// Extra flags for a real etcd (ferrocd's are in its flavor).
    etcd_args: Vec<String>,
    /// Set for a member of a multi-member cluster (cluster.rs); `None`: a cluster of one.
    membership: Option<Membership>,
    /// Set: the peer URL is `https://`, with these peer TLS flags (either flavour).
    pub peer_tls_args: Option<Vec<String>>,
}

/// A cluster member's identity and the cluster it starts with. Its ports are in the other
/// members' `--initial-cluster`, so they can never change (no retry on a taken port).
#[derive(Debug, Clone)]
struct Membership {
    name: String,
    /// `n1=http://127.0.0.1:P1,n2=...`: every member's name and advertised peer URL.
    initial_cluster: String,
    token: String,
    /// The peer URL the others reach it at: its own, or its proxy's (cluster.rs).
    advertise_peer_url: String,
    /// Set once it was added to a running cluster (MemberAdd): it starts with
    /// `--initial-cluster-state existing`.
    existing: bool,
}

impl Server {
    /// A real etcd from PATH.
    pub async fn etcd() -> Server {
        Server::spawn(Flavor::Etcd).await
    }

    /// A real etcd with extra flags (e.g. `--auth-token jwt,...`).
    pub async fn etcd_with(args: &[&str]) -> Server {
        let mut server = Server::unstarted(Flavor::Etcd, None);
        server.etcd_args = args.iter().map(|arg| arg.to_string()).collect();
        server.start().await;
        server
    }

    /// The `ferrocd` binary built with these tests, with extra arguments (e.g. `--shards 4`).
    pub async fn ferrocd(extra_args: &[&str]) -> Server {
        let args = extra_args.iter().map(|arg| arg.to_string()).collect();
        Server::spawn(Flavor::Ferrocd(args)).await
    }

    /// The server under test, chosen by `FERROCD_TEST_SERVER` (`etcd` or `ferrocd`, default
    /// `ferrocd`); `ferrocd_args` only apply to ferrocd.
    pub async fn subject(ferrocd_args: &[&str]) -> Server {
        Server::spawn(Flavor::subject(ferrocd_args)).await
    }

    /// A server of the given flavour (e.g. `Flavor::subject` with arguments built at run time).
    pub async fn subject_flavor(flavor: Flavor) -> Server {
        Server::spawn(flavor).await
    }

    /// A server whose client URL is `https://`.
    pub async fn with_tls(flavor: Flavor, tls: ClientTls) -> Server {
        Server::spawn_with(flavor, Some(tls)).await
    }

    async fn spawn(flavor: Flavor) -> Server {
        Server::spawn_with(flavor, None).await
    }

    async fn spawn_with(flavor: Flavor, tls: Option<ClientTls>) -> Server {
        let mut server = Server::unstarted(flavor, tls);
        server.start().await;
        server
    }

    fn unstarted(flavor: Flavor, tls: Option<ClientTls>) -> Server {
        let root = tempfile::Builder::new()
            .prefix("ferrocd-test-")
            .tempdir()
            .expect("create temp dir");
        let (client_port, peer_port) = pick_two_free_ports();
        Server {
            flavor,
            tls,
            root,
            client_port,
            peer_port,
            child: None,
            etcd_args: Vec::new(),
            membership: None,
            peer_tls_args: None,
        }
    }

    /// `http://127.0.0.1:PORT` (`https://` with peer TLS), the URL other members reach this
    /// one at.
    pub fn peer_url(&self) -> String {
        let scheme = match self.peer_tls_args {
            Some(_) => "https",
            None => "http",
        };
        format!("{scheme}://127.0.0.1:{}", self.peer_port)
    }

    /// Whether the server process is running (started and not killed or stopped since).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// `http://127.0.0.1:PORT` (`https://` with TLS), the client URL.
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    pub fn flavor(&self) -> &Flavor {
        &self.flavor
    }

    pub fn data_dir(&self) -> PathBuf {
        self.root.path().join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.root.path().join("server.log")
    }

    /// Everything the server printed so far, across restarts.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The server's log lines, each parsed as JSON (ferrocd's default `--log-format json`);
    /// the harness's own `===` markers are skipped. Panics on a line that is not JSON.
    pub fn log_lines(&self) -> Vec<serde_json::Value> {
        self.log()
            .lines()
            .filter(|line| !line.starts_with("=== harness"))
            .map(|line| {
                serde_json::from_str(line).unwrap_or_else(|e| panic!("log line {line:?}: {e}"))
            })
            .collect()
    }

    /// Whether the log has a line with message `msg` whose fields include `fields`.
    pub fn logged(&self, msg: &str, fields: &[(&str, serde_json::Value)]) -> bool {
        self.log_lines().iter().any(|line| {
            line["msg"] == msg && fields.iter().all(|(key, value)| &line[*key] == value)
        })
    }

    /// A client connected to this server, with generous request timeouts and message limits.
    pub async fn client(&self) -> Client {
        self.client_as(None).await
    }

    /// A client that authenticates as `user` (name, password) when one is given.
    pub async fn client_as(&self, user: Option<(&str, &str)>) -> Client {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_millis(READY_TIMEOUT_MS))
            .with_timeout(Duration::from_millis(CLIENT_REQUEST_TIMEOUT_MS));
        if let Some((name, password)) = user {
            options = options.with_user(name, password);
        }
        let options = self.with_client_tls(options);
        Client::connect([self.endpoint()], Some(options))
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.endpoint()))
    }

    /// A KV client that accepts responses up to `CLIENT_MAX_DECODING_BYTES`.
    pub async fn kv_client(&self) -> KvClient {
        self.client()
            .await
            .kv_client()
            .max_decoding_message_size(CLIENT_MAX_DECODING_BYTES)
    }

    /// Starts the server again on its existing data dir (after `kill9` or `stop`).
    ///
    /// Ports are picked by binding port 0 and releasing it, so another process can take one
    /// between the release and the server's own bind. That race is tiny; when it happens the
    /// server exits complaining about an address in use, and we retry with fresh ports.
    pub async fn start(&mut self) {
        assert!(self.child.is_none(), "start() while the server is running");
        for attempt in 1..=MAX_START_ATTEMPTS {
            self.spawn_child();
            match self.wait_ready().await {
                Ok(()) => return,
                Err(StartError::AddressInUse)
                    if attempt < MAX_START_ATTEMPTS && self.membership.is_none() =>
                {
                    (self.client_port, self.peer_port) = pick_two_free_ports();
                }
                Err(error) => panic!(
                    "{:?} did not start: {error:?}\n{}",
                    self.flavor,
                    self.log_tail()
                ),
            }
        }
        unreachable!("the last attempt either returns or panics");
    }

    /// SIGKILL, then reap the child: a crash at an arbitrary instant.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Killing an already exited child fails harmlessly; `wait` still reaps it.
            let _ = child.kill();
            child.wait().expect("wait for killed server");
        }
    }

    /// SIGTERM, then wait up to `GRACEFUL_STOP_TIMEOUT_MS` for a clean exit (SIGKILL after).
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) with a pid we spawned and have not reaped yet, so it cannot name
        // another process; no memory is involved.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(rc, 0, "SIGTERM to server pid {pid}");
        let deadline = Instant::now() + Duration::from_millis(GRACEFUL_STOP_TIMEOUT_MS);
        while Instant::now() < deadline {
            if child.try_wait().expect("poll server exit").is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(EXIT_POLL_INTERVAL_MS));
        }
        let _ = child.kill();
        child.wait().expect("wait for killed server");
        panic!(
            "server pid {pid} ignored SIGTERM for {GRACEFUL_STOP_TIMEOUT_MS} ms\n{}",
            self.log_tail()
        );
    }

    /// SIGSTOP: the server freezes, its connections stay open, until `resume`.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT: a paused server carries on.
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    /// The running server's process id.
    pub fn pid(&self) -> libc::pid_t {
        let child = self.child.as_ref().expect("a running server");
        libc::pid_t::try_from(child.id()).expect("pid fits pid_t")
    }

    /// The exit status once the server exited by itself (a fatal error), reaping it; `None`
    /// while it runs. Callers poll it with their own deadline.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.reap_if_exited()
    }

    /// Sends `signal` to the running server.
    pub fn signal(&self, signal: libc::c_int) {
        let pid = self.pid();
        // SAFETY: kill(2) with a pid we spawned and have not reaped yet, so it cannot name
        // another process; no memory is involved.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "signal {signal} to server pid {pid}");
    }

    /// Starts the stopped server on its data dir without waiting for it to serve: for a
    /// server expected to exit by itself (poll `exited`).
    pub fn launch(&mut self) {
        assert!(!self.is_running(), "launch of a running server");
        self.spawn_child();
    }

    /// Graceful stop, then start on the same data dir.
    pub async fn restart(&mut self) {
        self.stop();
        self.start().await;
    }

    /// Crash (SIGKILL), then start on the same data dir.
    pub async fn crash_restart(&mut self) {
        self.kill9();
        self.start().await;
    }

    fn spawn_child(&mut self) {
        let log = self.open_log();
        let stderr = log.try_clone().expect("clone log handle");
        let child = Command::new(self.flavor.program())
            .args(self.args())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.flavor.program()));
        self.child = Some(child);
    }

    /// Opens the log for appending and writes a marker, so restarts are told apart.
    fn open_log(&self) -> File {
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open server log");
        writeln!(
            log,
            "=== harness: starting {:?} client port {} peer port {}",
            self.flavor, self.client_port, self.peer_port
        )
        .expect("write server log");
        log
    }

    /// etcd's own flags; ferrocd accepts the same ones (design brief, section 1).
    fn args(&self) -> Vec<String> {
        let client_url = self.endpoint();
        let peer_url = self.peer_url();
        let (name, initial_cluster, advertise_peer_url) = match &self.membership {
            Some(member) => (
                member.name.clone(),
                member.initial_cluster.clone(),
                member.advertise_peer_url.clone(),
            ),
            None => (
                "node1".to_string(),
                format!("node1={peer_url}"),
                peer_url.clone(),
            ),
        };
        let mut args: Vec<String> = vec![
            "--name".into(),
            name,
            "--data-dir".into(),
            path_arg(&self.data_dir()),
            "--listen-client-urls".into(),
            client_url.clone(),
            "--advertise-client-urls".into(),
            client_url,
            "--listen-peer-urls".into(),
            peer_url,
            "--initial-advertise-peer-urls".into(),
            advertise_peer_url,
            "--initial-cluster".into(),
            initial_cluster,
        ];
        if let Some(member) = &self.membership {
            let state = if member.existing { "existing" } else { "new" };
            args.extend([
                "--initial-cluster-state".into(),
                state.into(),
                "--initial-cluster-token".into(),
                member.token.clone(),
            ]);
        }
        args.extend(self.flavor.extra_args().iter().cloned());
        args.extend(
            self.tls
                .iter()
                .flat_map(|tls| tls.server_args.iter().cloned()),
        );
        args.extend(self.etcd_args.iter().cloned());
        args.extend(self.peer_tls_args.iter().flatten().cloned());
        args
    }

    /// Adds the client TLS settings, if the server has TLS.
    fn with_client_tls(&self, options: ConnectOptions) -> ConnectOptions {
        match &self.tls {
            None => options,
            Some(ClientTls {
                client: Some(tls), ..
            }) => options.with_tls(tls.clone()),
            Some(ClientTls { client: None, .. }) => {
                panic!("no client can verify this server's certificate")
            }
        }
    }

    /// `/health` over TLS without verifying the certificate, for servers no client can verify.
    async fn probe_insecure(&self) -> bool {
        let output = tokio::process::Command::new("curl")
            .args(["--silent", "--insecure", "--max-time"])
            .arg((PROBE_REQUEST_TIMEOUT_MS / 1000).max(1).to_string())
            .arg(format!("{}/health", self.endpoint()))
            .output()
            .await
            .expect("run curl");
        String::from_utf8_lossy(&output.stdout).contains(r#""health":"true""#)
    }

    /// Polls a real request until it succeeds, the child exits, or the deadline passes.
    async fn wait_ready(&mut self) -> Result<(), StartError> {
        let deadline = Instant::now() + Duration::from_millis(READY_TIMEOUT_MS);
        loop {
            if let Some(status) = self.reap_if_exited() {
                return Err(self.classify_exit(status));
            }
            // A probe can reach another process that took our port while our server is
            // dying from the bind failure, so the child must still be alive after it.
            if self.probe().await {
                return match self.reap_if_exited() {
                    Some(status) => Err(self.classify_exit(status)),
                    None => Ok(()),
                };
            }
            if Instant::now() >= deadline {
                self.kill9();
                return Err(StartError::NotReady);
            }
            tokio::time::sleep(Duration::from_millis(READY_POLL_INTERVAL_MS)).await;
        }
    }

    fn reap_if_exited(&mut self) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut().expect("server child");
        let status = child.try_wait().expect("poll server child")?;
        self.child = None;
        Some(status)
    }

    fn classify_exit(&self, status: std::process::ExitStatus) -> StartError {
        if self.log().to_lowercase().contains("address already in use") {
            StartError::AddressInUse
        } else {
            StartError::Exited(status)
        }
    }

    /// One Range request with short timeouts: it proves the gRPC KV path answers.
    async fn probe(&self) -> bool {
        if self.tls.as_ref().is_some_and(|tls| tls.client.is_none()) {
            return self.probe_insecure().await;
        }
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_millis(PROBE_CONNECT_TIMEOUT_MS))
            .with_timeout(Duration::from_millis(PROBE_REQUEST_TIMEOUT_MS));
        let options = self.with_client_tls(options);
        let Ok(mut client) = Client::connect([self.endpoint()], Some(options)).await else {
            return false;
        };
        // With auth enabled an anonymous read is refused, by a server that is serving.
        match client.get("harness-readiness-probe", None).await {
            Ok(_) => true,
            Err(etcd_client::Error::GRpcStatus(status)) => {
                status.message() == "etcdserver: user name is empty"
            }
            Err(_) => false,
        }
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        let start = log.len().saturating_sub(LOG_TAIL_BYTES);
        let start = (start..=log.len())
            .find(|&i| log.is_char_boundary(i))
            .unwrap_or(log.len());
        format!(
            "--- last {} bytes of {} ---\n{}\n--- end of log ---",
            log.len() - start,
            self.log_path().display(),
            &log[start..]
        )
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "{:?} at {}:\n{}",
                self.flavor,
                self.endpoint(),
                self.log_tail()
            );
        }
        self.kill9();
    }
}

#[derive(Debug)]
enum StartError {
    AddressInUse,
    Exited(std::process::ExitStatus),
    NotReady,
}

/// Two distinct free ports.
fn pick_two_free_ports() -> (u16, u16) {
    let ports = pick_free_ports(2);
    (ports[0], ports[1])
}

/// `count` distinct free ports on 127.0.0.1: every listener is held until every port is known.
pub fn pick_free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

fn path_arg(path: &Path) -> String {
    path.to_str().expect("temp paths are UTF-8").to_string()
}

/// Bound on one run of an etcdctl script that takes seconds.
pub const SCRIPT_TIMEOUT_S: u32 = 300;

/// Runs `bash script ENDPOINT` under `timeout` (a hang fails the test): it must exit 0 and
/// print its `checks passed against` line.
pub fn run_etcdctl_script(server: &Server, script: &str, timeout_s: u32) {
    run_script(script, &[server.endpoint()], server.flavor(), timeout_s);
}

/// Runs `bash script ARGS...` under `timeout` against servers of `flavor`: it must exit 0 and
/// print its `checks passed against` line.
pub fn run_script(script: &str, args: &[String], flavor: &Flavor, timeout_s: u32) {
    let output = Command::new("timeout")
        .args(["--kill-after=10", &timeout_s.to_string(), "bash", script])
        .args(args)
        .output()
        .expect("run bash");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "{script} against {flavor:?} failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    assert!(stdout.contains("checks passed against"), "{stdout}");
}

/// After a fuzz run (tests/rpc_fuzz.rs, tests/gateway_fuzz.rs): the server must still run;
/// alarms raised by random Alarm calls are disarmed (as an operator would), then it must serve
/// a put/get round trip, as `user` when auth is on.
pub async fn assert_serves_after_fuzz(server: &mut Server, user: Option<(&str, &str)>, seed: u64) {
    assert!(
        server.exited().is_none(),
        "seed {seed}: the server exited: {:?}\n{}",
        server.exited(),
        server.log()
    );
    let mut client = server.client_as(user).await;
    let alarms = client.alarm(
        etcd_client::AlarmAction::Get,
        etcd_client::AlarmType::None,
        None,
    );
    let alarms = alarms.await.expect("alarm list after the run");
    for alarm in alarms.alarms() {
        let mut options = etcd_client::AlarmOptions::new();
        options.with_member(alarm.member_id());
        let deactivate = client.alarm(
            etcd_client::AlarmAction::Deactivate,
            alarm.alarm(),
            Some(options),
        );
        deactivate.await.expect("disarm after the run");
    }
    let value = format!("alive {seed}");
    client
        .put("fuzz-check", value.as_str(), None)
        .await
        .expect("put after the run");
    let got = client
        .get("fuzz-check", None)
        .await
        .expect("get after the run");
    assert_eq!(got.kvs().len(), 1, "seed {seed}");
    assert_eq!(got.kvs()[0].value(), value.as_bytes(), "seed {seed}");
}
