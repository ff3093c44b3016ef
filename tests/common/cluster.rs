//! A cluster of real server processes (etcd or ferrocd, as `Server` picks them) on 127.0.0.1:
//! every member gets its own ports and data dir, all start together with one
//! `--initial-cluster`, and the cluster counts as up once every running member reports the
//! same leader (Maintenance Status on each). Members are `Server`s, so they are killed when
//! the cluster is dropped, and their logs are printed when a test fails.
//!
//! `start_proxied` puts every member behind a fault-injecting proxy (proxy.rs): it listens on
//! its real peer port and advertises its proxy's, so that every peer connection to it passes
//! the proxy, and `isolate`, `partition`, `fault_member` and `heal` cut or slow the links
//! between members (the same flags for etcd and ferrocd, so the same faults run on both).

use std::process::ExitStatus;
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions, Member, MemberRemoveResponse, StatusResponse};

use super::proxy::{Mode, PeerProxy};
use super::{pick_free_ports, Flavor, Membership, Server, StartError, MAX_START_ATTEMPTS};

/// How long the members may take to agree on a leader (start-up, or after a kill: several
/// election timeouts of etcd's default 1000 ms, on a loaded 2-core machine).
const LEADER_TIMEOUT_MS: u64 = 20_000;
/// Pause between two rounds of Status requests while waiting for a leader.
const LEADER_POLL_INTERVAL_MS: u64 = 20;
/// Per-request limits of a Status probe, so a dead member cannot stall the wait.
const STATUS_CONNECT_TIMEOUT_MS: u64 = 500;
const STATUS_REQUEST_TIMEOUT_MS: u64 = 1_000;
const CLUSTER_TOKEN: &str = "ferrocd-test-cluster";
/// How long a member may take to apply a revision the others have (`assert_converged`).
const CONVERGE_TIMEOUT_MS: u64 = 10_000;
/// Written by `assert_converged`: the revision every member's HashKV is compared at.
pub const CONVERGED_KEY: &str = "converged";
/// Bound on a membership change being accepted (etcd refuses one until every voter has been
/// connected for 5 s) and on a removed member exiting by itself.
const RECONFIG_TIMEOUT_MS: u64 = 15_000;
const RECONFIG_POLL_MS: u64 = 50;
/// Per-request limit of a MemberAdd: etcd never answers one it forwarded to a leader that was
/// just removed (the proposal is dropped), so it is retried after this.
const RECONFIG_REQUEST_TIMEOUT_MS: u64 = 3_000;

pub struct Cluster {
    members: Vec<Server>,
    /// Each member's id, as its Status header reports it (stable across restarts).
    ids: Vec<u64>,
    /// Each member's peer proxy, in member order; empty unless `start_proxied`.
    proxies: Vec<PeerProxy>,
}

impl Cluster {
    /// `size` members of the server under test (`FERROCD_TEST_SERVER`, default ferrocd).
    pub async fn start(size: usize) -> Cluster {
        Cluster::start_flavor(Flavor::subject(&[]), size).await
    }

    /// `size` members of `flavor`, started together; returns once they agree on a leader.
    pub async fn start_flavor(flavor: Flavor, size: usize) -> Cluster {
        Cluster::start_members(flavor, size, None, |_| {}).await
    }

    /// `size` members of `flavor`, each behind its own peer proxy (in `Pass` mode; `seed`
    /// seeds their random draws); returns once they agree on a leader.
    pub async fn start_proxied(flavor: Flavor, size: usize, seed: u64) -> Cluster {
        Cluster::start_members(flavor, size, Some(seed), |_| {}).await
    }

    /// As `start_flavor`, with peer TLS: `https://` peer URLs and `peer_tls_args` (the
    /// `--peer-*` flags) on every member.
    pub async fn start_with_peer_tls(
        flavor: Flavor,
        size: usize,
        peer_tls_args: &[String],
    ) -> Cluster {
        let configure = |member: &mut Server| member.peer_tls_args = Some(peer_tls_args.to_vec());
        Cluster::start_members(flavor, size, None, configure).await
    }

    /// Starts the members (behind proxies with `proxy_seed`), `configure` applied to each
    /// before any starts. Ports are picked free and bound later by the members, so another
    /// process may take one meanwhile: then the whole cluster starts again on fresh ports (a
    /// member's peer URL is in every member's `--initial-cluster`).
    async fn start_members(
        flavor: Flavor,
        size: usize,
        proxy_seed: Option<u64>,
        configure: impl Fn(&mut Server),
    ) -> Cluster {
        for _attempt in 1..MAX_START_ATTEMPTS {
            let started = Cluster::try_start_members(&flavor, size, proxy_seed, &configure);
            if let Some(cluster) = started.await {
                return cluster;
            }
        }
        let last = Cluster::try_start_members(&flavor, size, proxy_seed, &configure).await;
        last.expect("the cluster's ports were taken on every attempt")
    }

    /// One attempt of `start_members`: `None` when a member found its port taken (every member
    /// of the attempt is stopped).
    async fn try_start_members(
        flavor: &Flavor,
        size: usize,
        proxy_seed: Option<u64>,
        configure: &impl Fn(&mut Server),
    ) -> Option<Cluster> {
        assert!(size >= 1, "a cluster has at least one member");
        let ports = pick_free_ports(2 * size);
        let mut members: Vec<Server> = (0..size)
            .map(|index| {
                let mut member = Server::unstarted(flavor.clone(), None);
                member.client_port = ports[2 * index];
                member.peer_port = ports[2 * index + 1];
                configure(&mut member);
                member
            })
            .collect();
        let proxies: Vec<PeerProxy> = match proxy_seed {
            Some(seed) => (0..size)
                .map(|index| PeerProxy::start(members[index].peer_port, seed ^ index as u64))
                .collect(),
            None => Vec::new(),
        };
        let advertised: Vec<String> = (0..size)
            .map(|index| match proxies.get(index) {
                Some(proxy) => proxy.url(),
                None => members[index].peer_url(),
            })
            .collect();
        let initial_cluster = advertised
            .iter()
            .enumerate()
            .map(|(index, url)| format!("{}={url}", member_name(index)))
            .collect::<Vec<_>>()
            .join(",");
        for (index, member) in members.iter_mut().enumerate() {
            member.membership = Some(Membership {
                name: member_name(index),
                initial_cluster: initial_cluster.clone(),
                token: CLUSTER_TOKEN.to_string(),
                advertise_peer_url: advertised[index].clone(),
                existing: false,
            });
            member.spawn_child();
        }
        // A member answers a linearizable read only once a quorum runs: all are spawned
        // before the first wait.
        for index in 0..members.len() {
            let ready = members[index].wait_ready().await;
            if let Err(StartError::AddressInUse) = ready {
                members.iter_mut().for_each(Server::kill9);
                return None;
            }
            if let Err(error) = ready {
                let member = &members[index];
                panic!(
                    "cluster member {} did not start: {error:?}\n{}",
                    member.endpoint(),
                    member.log_tail()
                );
            }
        }
        let mut cluster = Cluster {
            members,
            ids: Vec::new(),
            proxies,
        };
        for index in 0..size {
            let status = cluster.status(index).await;
            let id = status.header().expect("a status header").member_id();
            cluster.ids.push(id);
        }
        cluster.leader().await;
        Some(cluster)
    }

    pub fn size(&self) -> usize {
        self.members.len()
    }

    /// The member's process: `client()`, `endpoint()`, `log()`, ...
    pub fn member(&self, index: usize) -> &Server {
        &self.members[index]
    }

    /// The member's process, to launch, signal or reap it.
    pub fn member_mut(&mut self, index: usize) -> &mut Server {
        &mut self.members[index]
    }

    /// The member's id (the `member_id` of its response headers).
    pub fn member_id(&self, index: usize) -> u64 {
        self.ids[index]
    }

    /// The member whose id is `id`.
    pub fn index_of(&self, id: u64) -> Option<usize> {
        self.ids.iter().position(|&member_id| member_id == id)
    }

    /// Every member's client URL, in member order.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Server::endpoint).collect()
    }

    pub fn flavor(&self) -> &Flavor {
        self.members[0].flavor()
    }

    pub async fn client(&self, index: usize) -> Client {
        self.members[index].client().await
    }

    /// The leader every running member reports, once they agree on a running one; panics
    /// after `LEADER_TIMEOUT_MS`.
    pub async fn leader(&self) -> usize {
        let deadline = Instant::now() + Duration::from_millis(LEADER_TIMEOUT_MS);
        loop {
            let leaders = self.reported_leaders().await;
            if let Some(leader) = self.agreed_leader(&leaders) {
                return leader;
            }
            assert!(
                Instant::now() < deadline,
                "no agreed leader after {LEADER_TIMEOUT_MS} ms: member ids {:?}, reported \
                 leaders (running members) {leaders:?}",
                self.ids
            );
            tokio::time::sleep(Duration::from_millis(LEADER_POLL_INTERVAL_MS)).await;
        }
    }

    /// Maintenance Status of one member (which must be running).
    pub async fn status(&self, index: usize) -> StatusResponse {
        probe_status(&self.members[index])
            .await
            .unwrap_or_else(|| panic!("no status from member {index}"))
    }

    /// SIGKILL to one member.
    pub fn kill9(&mut self, index: usize) {
        self.members[index].kill9();
    }

    /// Starts a killed or stopped member again on its data dir (a running one is stopped
    /// first); returns once it answers a linearizable read.
    pub async fn restart(&mut self, index: usize) {
        let member = &mut self.members[index];
        if member.is_running() {
            member.stop();
        }
        member.start().await;
    }

    /// Removes member `index` (MemberRemove through member `through`) and waits until its
    /// process exits by itself, as both servers do once they learn they were removed.
    /// Returns its exit status; `None` where a real etcd kept running past
    /// `RECONFIG_TIMEOUT_MS` and was stopped here (ferrocd must exit by itself).
    pub async fn remove(&mut self, index: usize, through: usize) -> Option<ExitStatus> {
        assert_ne!(index, through, "a member is removed through another one");
        let mut client = self.client(through).await;
        remove_when_healthy(&mut client, self.ids[index]).await;
        let deadline = Instant::now() + Duration::from_millis(RECONFIG_TIMEOUT_MS);
        let member = &mut self.members[index];
        loop {
            if let Some(status) = member.exited() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                assert_eq!(
                    member.flavor(),
                    &Flavor::Etcd,
                    "removed member {index} still runs after {RECONFIG_TIMEOUT_MS} ms\n{}",
                    member.log_tail()
                );
                member.stop();
                return None;
            }
            tokio::time::sleep(Duration::from_millis(RECONFIG_POLL_MS)).await;
        }
    }

    /// Adds removed member `index` back as a new member (MemberAdd through member `through`:
    /// same name and peer URL, a new id) on a wiped data dir, and starts it with
    /// `--initial-cluster-state existing`; returns once it answers a linearizable read.
    pub async fn rejoin(&mut self, index: usize, through: usize) {
        let member = &mut self.members[index];
        assert!(!member.is_running(), "member {index} rejoins once stopped");
        let data_dir = member.data_dir();
        if data_dir.exists() {
            std::fs::remove_dir_all(&data_dir).expect("wipe the removed member's data dir");
        }
        let membership = member.membership.as_mut().expect("a cluster member");
        membership.existing = true;
        let peer_url = membership.advertise_peer_url.clone();
        let id = add_member(&self.members[through], &peer_url, self.ids[index]).await;
        self.ids[index] = id;
        self.members[index].start().await;
        let status = self.status(index).await;
        assert_eq!(status.header().expect("a status header").member_id(), id);
    }

    /// SIGSTOP to one member: it freezes, its connections stay open, until `resume`.
    pub fn pause(&self, index: usize) {
        self.members[index].pause();
    }

    /// SIGCONT to a paused member.
    pub fn resume(&self, index: usize) {
        self.members[index].resume();
    }

    /// Every member reports the same HashKV at the same revision (that of a write made for
    /// it, through `through`); a member that has not applied it yet is polled until
    /// `CONVERGE_TIMEOUT_MS`. Every member must be running.
    pub async fn assert_converged(&self, through: usize) {
        let mut client = self.client(through).await;
        let put = client.put(CONVERGED_KEY, "mark", None).await;
        let put = put.unwrap_or_else(|e| panic!("put {CONVERGED_KEY} through {through}: {e}"));
        let revision = put.header().expect("a put header").revision();
        let mut hashes = Vec::new();
        for member in &self.members {
            hashes.push(converged_hash(member, revision).await);
        }
        assert!(
            hashes.iter().all(|&hash| hash == hashes[0]),
            "HashKV at revision {revision} differs between members: {hashes:?}"
        );
    }

    /// The peer proxy in front of one member (`start_proxied` only).
    pub fn proxy(&self, index: usize) -> &PeerProxy {
        assert!(
            !self.proxies.is_empty(),
            "a network fault on a cluster started without peer proxies"
        );
        &self.proxies[index]
    }

    /// Every link between members `a` and `b` gets `mode`, both ways: on each one's proxy,
    /// for the connections the other dialed.
    pub fn fault_link(&self, a: usize, b: usize, mode: Mode) {
        assert_ne!(a, b, "a link joins two members");
        self.proxy(a).set_sender_mode(self.ids[b], mode);
        self.proxy(b).set_sender_mode(self.ids[a], mode);
    }

    /// Every link of member `index` gets `mode`, both ways (its proxy's own connections
    /// included, those whose sender it could not tell).
    pub fn fault_member(&self, index: usize, mode: Mode) {
        self.proxy(index).set_mode(mode);
        for other in (0..self.size()).filter(|&other| other != index) {
            self.fault_link(index, other, mode);
        }
    }

    /// Cuts member `index` off from the others (its client port still answers).
    pub fn isolate(&self, index: usize) {
        self.fault_member(index, Mode::Blackhole);
    }

    /// Cuts the link between members `a` and `b` only.
    pub fn partition(&self, a: usize, b: usize) {
        self.fault_link(a, b, Mode::Blackhole);
    }

    /// Connections the proxies reset so far (`Mode::Drop`).
    pub fn peer_resets(&self) -> u64 {
        self.proxies.iter().map(PeerProxy::resets).sum()
    }

    /// Every proxy back to `Pass`.
    pub fn heal(&self) {
        for proxy in &self.proxies {
            proxy.heal();
        }
    }

    /// Graceful stop of every member.
    pub fn stop(&mut self) {
        for member in &mut self.members {
            member.stop();
        }
    }

    /// Each running member's view of the leader (0: none, `None`: no answer).
    async fn reported_leaders(&self) -> Vec<Option<u64>> {
        let mut leaders = Vec::new();
        for member in self.members.iter().filter(|member| member.is_running()) {
            leaders.push(probe_status(member).await.map(|status| status.leader()));
        }
        leaders
    }

    /// The running member all of `leaders` name, if they all name the same one.
    fn agreed_leader(&self, leaders: &[Option<u64>]) -> Option<usize> {
        let first = (*leaders.first()?)?;
        if leaders.iter().any(|&leader| leader != Some(first)) {
            return None;
        }
        let index = self.index_of(first)?;
        self.members[index].is_running().then_some(index)
    }
}

/// `n1`, `n2`, ...: etcd's conventional member names.
pub fn member_name(index: usize) -> String {
    format!("n{}", index + 1)
}

/// The member's HashKV at `revision`, polled while it refuses the revision as a future one
/// (not applied yet); panics after `CONVERGE_TIMEOUT_MS`.
async fn converged_hash(member: &Server, revision: i64) -> u32 {
    let deadline = Instant::now() + Duration::from_millis(CONVERGE_TIMEOUT_MS);
    loop {
        if let Some(mut client) = probe_client(member).await {
            if let Ok(answer) = client.hash_kv(revision).await {
                return answer.hash();
            }
        }
        assert!(
            Instant::now() < deadline,
            "member {} did not apply revision {revision} within {CONVERGE_TIMEOUT_MS} ms",
            member.endpoint()
        );
        tokio::time::sleep(Duration::from_millis(LEADER_POLL_INTERVAL_MS)).await;
    }
}

/// A client with the probes' short timeouts; `None` when the member does not answer.
async fn probe_client(member: &Server) -> Option<Client> {
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_millis(STATUS_CONNECT_TIMEOUT_MS))
        .with_timeout(Duration::from_millis(STATUS_REQUEST_TIMEOUT_MS));
    Client::connect([member.endpoint()], Some(options))
        .await
        .ok()
}

/// One Status request with short timeouts; `None` when the member does not answer.
async fn probe_status(member: &Server) -> Option<StatusResponse> {
    probe_client(member).await?.status().await.ok()
}

/// MemberRemove, retried while the leader calls the cluster unhealthy (etcd wants every voter
/// connected for 5 s first).
pub async fn remove_when_healthy(client: &mut Client, id: u64) -> MemberRemoveResponse {
    let deadline = Instant::now() + Duration::from_millis(RECONFIG_TIMEOUT_MS);
    loop {
        match client.member_remove(id).await {
            Ok(answer) => return answer,
            Err(e) if e.to_string().contains("unhealthy cluster") && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(RECONFIG_POLL_MS)).await
            }
            Err(e) => panic!("member remove: {e}"),
        }
    }
}

/// MemberAdd of `peer_url` through `through`, retried (bounded by `RECONFIG_TIMEOUT_MS`) while
/// it fails or gets no answer; an attempt whose answer was lost may have been applied, so the
/// member list is read before each retry (`removed_id`, the member that had the URL before,
/// does not count). Returns the new member's id.
async fn add_member(through: &Server, peer_url: &str, removed_id: u64) -> u64 {
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_millis(STATUS_CONNECT_TIMEOUT_MS))
        .with_timeout(Duration::from_millis(RECONFIG_REQUEST_TIMEOUT_MS));
    let deadline = Instant::now() + Duration::from_millis(RECONFIG_TIMEOUT_MS);
    let mut last_error = String::new();
    while Instant::now() < deadline {
        if let Ok(mut client) = Client::connect([through.endpoint()], Some(options.clone())).await {
            if let Ok(list) = client.member_list().await {
                let added = |m: &&Member| m.peer_urls() == [peer_url] && m.id() != removed_id;
                let listed = list.members().iter().find(added);
                if let Some(member) = listed {
                    return member.id();
                }
                match client.member_add([peer_url], None).await {
                    Ok(added) => return added.member().expect("the added member").id(),
                    Err(e) => last_error = e.to_string(),
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(RECONFIG_POLL_MS)).await;
    }
    panic!(
        "member add of {peer_url}: not within {RECONFIG_TIMEOUT_MS} ms (last error: {last_error})"
    );
}

/// Polls `attempt` every `poll_ms` until it gives a value; panics after `timeout_ms`.
pub async fn eventually<T, F, Fut>(what: &str, timeout_ms: u64, poll_ms: u64, attempt: F) -> T
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_millis(timeout_ms);
    loop {
        if let Some(value) = attempt().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {timeout_ms} ms"
        );
        tokio::time::sleep(Duration::from_millis(poll_ms)).await;
    }
}
