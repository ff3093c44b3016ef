//! Starting and stopping a node: one glommio executor per core, each owning its shards (and
//! core 0 the meta group), each accepting client connections on every listen address
//! (SO_REUSEPORT), until shutdown.

use crate::auth::jwt::{JwtOptions, JwtTokens};
use crate::auth::service::AuthService;
use crate::auth::token::{SimpleTokens, TokenProvider};
use crate::auth::AuthStore;
use crate::cluster::ClusterService;
use crate::election::ElectionService;
use crate::gateway::{self, Gateway};
use crate::http::{health_handler, version_handler, Health, PATH_HEALTH, PATH_VERSION};
use crate::kv::KvService;
use crate::lease::service::LeaseService;
use crate::lease::{lessor, LeaseConfig};
use crate::lock::LockService;
use crate::members::{ClusterState, InitialMember, MemberEntry};
use crate::metrics::{metrics_handler, GrpcMetrics, PATH_METRICS};
use crate::node::checkpoint::CheckpointConfig;
use crate::node::compactor::{self, AutoCompaction};
use crate::node::errors::KvError;
use crate::node::meta::{Meta, MetaLog, MetaMsg, MetaStart};
use crate::node::meta_checkpoint::MetaCheckpointConfig;
use crate::node::recovery::{self, Bootstrap, Recovered};
use crate::node::replica::{DriverRequest, RaftTiming, ReadBarrier, Replica, ReplicaStart};
use crate::node::shard::{Shard, ShardMsg};
use crate::node::{Limits, Node, Shared, INBOX_CAPACITY};
use crate::peer::{parse_peer_url, PeerAddr, PeerConfig, PeerCore, PeerMesh};
use crate::tls::{self, ListenUrl, PeerTls, ServerTls, TlsFiles};
use crate::transport::{self, max_grpc_message_bytes, Routes, ServerConfig};
use crate::watch::deletion::Deletions;
use crate::watch::hub::Hub;
use crate::watch::service::WatchService;
use event_listener::Event;
use ferrocd_api::etcdserverpb::auth_server::AuthServer;
use ferrocd_api::etcdserverpb::cluster_server::ClusterServer;
use ferrocd_api::etcdserverpb::kv_server::KvServer;
use ferrocd_api::etcdserverpb::lease_server::LeaseServer;
use ferrocd_api::etcdserverpb::maintenance_server::MaintenanceServer;
use ferrocd_api::etcdserverpb::watch_server::WatchServer;
use ferrocd_api::v3electionpb::election_server::ElectionServer;
use ferrocd_api::v3lockpb::lock_server::LockServer;
use ferrocd_engine::checkpoint::Checkpointer;
use ferrocd_engine::mvcc::Store;
use ferrocd_engine::reader::ShardReader;
use ferrocd_engine::wal::{Recovered as WalRecovered, Wal, WalOptions};
use ferrocd_raft::notify::wait_until;
use ferrocd_raft::sequencer::Sequencer;
use ferrocd_raft::storage::{ConfState, SnapshotMeta};
use ferrocd_raft::wal_store::WalLogStore;
use glommio::{LocalExecutorBuilder, Placement};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub name: String,
    pub data_dir: PathBuf,
    pub shards: usize,
    /// Executors (threads); each owns the shards `s` with `s % cores == core`.
    pub cores: usize,
    pub listen_client: Vec<ListenUrl>,
    /// Not served yet (a single member has no peers); validated and kept for the peer
    /// transport, as are the peer TLS flags.
    pub listen_peer: Vec<ListenUrl>,
    /// `--cert-file`, `--key-file`, `--trusted-ca-file`, `--client-cert-auth`, `--auto-tls`.
    pub client_tls: TlsFiles,
    /// The `--peer-*` TLS flags (see `listen_peer`).
    pub peer_tls: TlsFiles,
    pub advertise_client_urls: Vec<String>,
    pub advertise_peer_urls: Vec<String>,
    /// `--initial-cluster`, `--initial-cluster-state`, `--initial-cluster-token`: used only
    /// when the data dir is new (`recovery::Bootstrap`).
    pub initial_cluster: Vec<InitialMember>,
    pub initial_cluster_state: ClusterState,
    pub initial_cluster_token: String,
    /// `--heartbeat-interval` / `--election-timeout` as Raft ticks.
    pub raft_timing: RaftTiming,
    /// Meta log entries kept below each compaction point in a cluster (etcd's
    /// `--experimental-snapshot-catchup-entries`).
    pub snapshot_catchup_entries: u64,
    pub limits: Limits,
    pub lease: LeaseConfig,
    /// Interval of watch progress notifications (etcd's hidden
    /// `--experimental-watch-progress-notify-interval`).
    pub watch_progress_notify_interval_ms: u64,
    /// Size every WAL segment is preallocated to.
    pub wal_segment_size_bytes: u64,
    /// Write WAL segments with O_DIRECT instead of buffered writes (both fdatasync each batch).
    /// Off by default: O_DIRECT had tail latencies of 0.4-0.75 s under `etcdctl check perf`
    /// where buffered writes stay near etcd's 0.1-0.2 s (cause not found; not the unwritten
    /// extents of fallocate, see docs/ARCHITECTURE.md "I/O mode").
    pub wal_direct_io: bool,
    pub checkpoint: CheckpointConfig,
    /// Seconds a simple auth token lives after its last use (etcd's `--auth-token-ttl`).
    pub auth_token_ttl_s: u64,
    /// `--auth-token jwt,...`; `None` for simple tokens.
    pub jwt: Option<JwtOptions>,
    /// `--auto-compaction-mode` / `--auto-compaction-retention`; `None` when off.
    pub auto_compaction: Option<AutoCompaction>,
}

/// Tells a running node to stop; cloneable, usable from any thread.
#[derive(Clone)]
pub struct Shutdown {
    signal: Arc<Event>,
    requested: Arc<std::sync::atomic::AtomicBool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown {
            signal: Arc::new(Event::new()),
            requested: Arc::default(),
        }
    }
}

impl Shutdown {
    pub fn request(&self) {
        self.requested.store(true, Ordering::SeqCst);
        self.signal.notify(usize::MAX);
    }

    async fn wait(&self) {
        wait_until(&self.signal, || self.requested.load(Ordering::SeqCst)).await
    }
}

/// The facts etcd logs as it starts ("starting an etcd server"), before anything can fail.
fn log_start(config: &NodeConfig) {
    let urls =
        |listen: &[ListenUrl]| -> Vec<String> { listen.iter().map(|u| u.url.clone()).collect() };
    crate::info!(
        "starting ferrocd",
        ferrocd_version = env!("CARGO_PKG_VERSION"),
        name = config.name.as_str(),
        data_dir = config.data_dir.display().to_string(),
        listen_client_urls = urls(&config.listen_client),
        advertise_client_urls = config.advertise_client_urls.clone(),
        initial_advertise_peer_urls = config.advertise_peer_urls.clone(),
        shards = config.shards,
        cores = config.cores,
    );
}

/// The `--auth-token` provider; JWT keys are loaded here, so a bad key stops start-up.
fn token_provider(config: &NodeConfig) -> Result<Box<dyn TokenProvider>, String> {
    Ok(match &config.jwt {
        Some(options) => Box::new(JwtTokens::load(options)?),
        None => Box::new(SimpleTokens::new(Duration::from_secs(
            config.auth_token_ttl_s,
        ))),
    })
}

/// Recovers the data dir, starts the cores and blocks until `shutdown` is requested and every
/// core has drained. Errors are start-up errors, worded for the operator.
pub fn run(mut config: NodeConfig, shutdown: Shutdown) -> Result<(), String> {
    assert!(
        config.shards > 0 && config.cores > 0,
        "at least one shard and one core"
    );
    std::fs::create_dir_all(&config.data_dir)
        .and_then(|()| config.data_dir.canonicalize())
        .map(|dir| config.data_dir = dir)
        .map_err(|e| format!("cannot use data dir {}: {e}", config.data_dir.display()))?;
    // A snapshot install left a new data dir beside this one (before anything opens it).
    crate::node::install::finish_pending(&config.data_dir)?;
    log_start(&config);
    let tokens = token_provider(&config)?;
    // TLS files are read now, so a bad one stops the start before anything else (as etcd).
    let fixtures = config.data_dir.join("fixtures").join("client");
    let client_tls = ServerTls::for_client(&config.client_tls, &config.listen_client, &fixtures)?;
    let peer_fixtures = config.data_dir.join("fixtures").join("peer");
    let peer_tls = PeerTls::for_peers(&config.peer_tls, &config.listen_peer, &peer_fixtures)?;
    let bootstrap = Bootstrap {
        name: config.name.clone(),
        initial_cluster: config.initial_cluster.clone(),
        state: config.initial_cluster_state,
        token: config.initial_cluster_token.clone(),
        advertise_peer_urls: config.advertise_peer_urls.clone(),
    };
    if config.initial_cluster_state == ClusterState::Existing
        && !recovery::has_identity(&config.data_dir)
    {
        crate::members::join(
            &config.data_dir,
            config.shards,
            &config.name,
            &config.advertise_peer_urls,
            &config.initial_cluster,
            peer_tls.as_ref(),
        )?;
    }
    let (identity, initial) = recovery::open_identity(&config.data_dir, config.shards, &bootstrap)?;
    // Several members: the meta log is a Raft log whose first membership is all of them.
    let raft_initial = (initial.len() > 1).then(|| bootstrap_point(&initial));
    let Recovered {
        stores,
        checkpointers,
        current_rev,
        compacted_rev,
        next_index,
        wals,
        leases,
        meta_state,
        meta_touched,
        meta_checkpoint_index,
        membership_changes,
    } = recovery::recover(
        &config.data_dir,
        config.shards,
        config.lease,
        raft_initial.clone(),
    )?;
    // What a joining member is told is the log's bootstrap point.
    let bootstrap_members = initial.clone();
    let members = crate::members::recover_current(
        &config.data_dir,
        identity.member_id,
        initial,
        &membership_changes,
    )?;
    // Bind every address once here so a busy port is reported before anything starts.
    for url in &config.listen_client {
        std::net::TcpListener::bind(url.addr)
            .map_err(|e| format!("cannot listen on {}: {e}", url.addr))?;
    }
    let peers = bind_peers(&config, identity.member_id, peer_tls)?;
    if raft_initial.is_some() && peers.is_none() {
        return Err("a member of a cluster needs a --listen-peer-urls".to_string());
    }
    let (read_barrier, read_requests) = match raft_initial {
        Some(_) => {
            let (barrier, requests) = ReadBarrier::new(&config.raft_timing);
            (Some(barrier), Some(requests))
        }
        None => (None, None),
    };

    let (shard_txs, shard_rxs): (Vec<_>, Vec<_>) = (0..config.shards)
        .map(|_| async_channel::bounded(INBOX_CAPACITY))
        .unzip();
    let (meta_tx, meta_rx) = async_channel::bounded(INBOX_CAPACITY);
    let shared = Arc::new(
        Shared::new(
            Sequencer::new(config.shards + 1, current_rev),
            shard_txs,
            meta_tx,
            compacted_rev,
            identity,
            config.limits.clone(),
            leases,
        )
        .with_auth(AuthStore::new(meta_state.auth.clone(), tokens))
        .with_readers(seed_readers(&stores, &checkpointers))
        .with_members(members)
        .clustered_with(read_barrier),
    );
    if let Some(mesh) = &peers {
        let (table, cluster_id) = (shared.clone(), identity.cluster_id);
        mesh.answer_joins(move || {
            let answer = crate::members::JoinAnswer {
                cluster_id,
                initial: bootstrap_members.clone(),
                current: table.members.list(),
            };
            answer.encode()
        });
        let (table, told, me) = (shared.clone(), shared.clone(), identity.member_id);
        let (data_dir, timing) = (config.data_dir.clone(), &config.raft_timing);
        let grace = Duration::from_millis(timing.tick_ms * timing.election_ticks as u64);
        mesh.watch_removals(
            move |member| table.members.is_removed(member),
            move || crate::members::stop_as_told_removed(&data_dir, me, &told.members, grace),
        );
    }
    shared.space.restore(meta_state.alarms.iter().copied());
    meta_state
        .published
        .values()
        .for_each(|attributes| shared.members.publish(attributes));
    crate::info!(
        "starting local member",
        local_member_id = format!("{:016x}", identity.member_id),
        cluster_id = format!("{:016x}", identity.cluster_id),
        revision = current_rev,
        compact_revision = compacted_rev,
    );

    let mut wals = wals.into_iter();
    let mut owned: Vec<Vec<OwnedShard>> = (0..config.cores).map(|_| Vec::new()).collect();
    let recovered_shards = stores.into_iter().zip(checkpointers).zip(shard_rxs);
    for (id, ((store, checkpointer), rx)) in recovered_shards.enumerate() {
        let wal = wals.next().expect("one recovered WAL per shard");
        let next_index = next_index[id];
        owned[id % config.cores].push(OwnedShard {
            id,
            store,
            checkpointer,
            rx,
            wal,
            next_index,
        });
    }
    let meta_wal = wals.next().expect("a recovered meta WAL");
    let meta_start = MetaStart {
        next_index: next_index[config.shards],
        state: meta_state,
        touched: meta_touched,
        checkpoint_index: meta_checkpoint_index,
        checkpoint: MetaCheckpointConfig {
            path: recovery::meta_checkpoint_path(&config.data_dir),
            bounds: config.checkpoint,
        },
        data_dir: config.data_dir.clone(),
    };
    let raft = raft_initial.map(|initial| RaftMeta {
        initial,
        requests: read_requests.expect("a clustered member has a read barrier"),
    });
    let mut meta = Some(OwnedMeta {
        rx: meta_rx,
        wal: meta_wal,
        start: meta_start,
        raft,
    });
    let serving = Arc::new((AtomicUsize::new(config.cores), Event::new()));
    let grpc_metrics = GrpcMetrics::new(config.cores);
    let published = Shutdown::default();
    let mut handles = Vec::new();
    for (core, shards) in owned.into_iter().enumerate() {
        let core_setup = CoreSetup {
            core,
            shards,
            meta: if core == 0 { meta.take() } else { None },
            shared: shared.clone(),
            config: config.clone(),
            shutdown: shutdown.clone(),
            serving: serving.clone(),
            grpc_metrics: grpc_metrics.clone(),
            client_tls: client_tls.clone(),
            peers: peers.clone(),
            published: published.clone(),
        };
        let handle = LocalExecutorBuilder::new(Placement::Unbound)
            .name(&format!("ferrocd-core-{core}"))
            .spawn(move || core_setup.run())
            .map_err(|e| format!("cannot start executor for core {core}: {e}"))?;
        handles.push(handle);
    }
    drop(shared);
    let mut failure = None;
    for handle in handles {
        match handle.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failure = Some(e),
            Err(e) => failure = Some(format!("executor failed: {e}")),
        }
    }
    failure.map_or(Ok(()), Err)
}

/// A shard handed to its core: its recovered store and checkpoint file, inbox and log.
struct OwnedShard {
    id: usize,
    store: Store,
    checkpointer: Checkpointer,
    rx: async_channel::Receiver<ShardMsg>,
    wal: WalRecovered,
    next_index: u64,
}

/// The meta group handed to core 0.
struct OwnedMeta {
    rx: async_channel::Receiver<MetaMsg>,
    wal: WalRecovered,
    start: MetaStart,
    /// Clustered: the meta log is a Raft log (`node/replica.rs`).
    raft: Option<RaftMeta>,
}

struct RaftMeta {
    /// The log's bootstrap point (where the WAL has no Snapshot record yet).
    initial: SnapshotMeta,
    requests: async_channel::Receiver<DriverRequest>,
}

/// A new cluster's Raft log starts after a snapshot at index 1, term 1, holding every initial
/// member as a voter (as raft-rs bootstraps), identically on every member.
fn bootstrap_point(members: &[MemberEntry]) -> SnapshotMeta {
    let mut voters: Vec<u64> = members.iter().map(|m| m.id).collect();
    voters.sort_unstable();
    SnapshotMeta {
        index: 1,
        term: 1,
        conf: ConfState {
            voters,
            learners: Vec::new(),
        },
    }
}

/// Opens a WAL for appending after what recovery read from it.
async fn open_wal(
    dir: &Path,
    recovered: &WalRecovered,
    config: &NodeConfig,
) -> Result<Wal, String> {
    Wal::open_recovered(dir, wal_options(config), recovered)
        .await
        .map_err(|e| format!("cannot open WAL {}: {e}", dir.display()))
}

fn wal_options(config: &NodeConfig) -> WalOptions {
    WalOptions {
        segment_size_bytes: config.wal_segment_size_bytes,
        // Through the page cache, then fdatasync (as etcd does), unless asked otherwise. glommio
        // sends O_DIRECT writes to its IOPOLL ring whenever the kernel accepts polled I/O on the
        // device, even one without poll queues (virtio: `queue/io_poll` 0); while such a write
        // is in flight the executor cannot sleep and spins its reactor loop, each turn
        // cancelling and re-arming its timers. See docs/ARCHITECTURE.md "Known performance
        // problem: the write path" and "I/O mode".
        force_buffered: !config.wal_direct_io,
        ..WalOptions::default()
    }
}

struct CoreSetup {
    core: usize,
    shards: Vec<OwnedShard>,
    meta: Option<OwnedMeta>,
    shared: Arc<Shared>,
    config: NodeConfig,
    shutdown: Shutdown,
    serving: Arc<(AtomicUsize, Event)>,
    grpc_metrics: Arc<GrpcMetrics>,
    /// For the `https://` listen URLs.
    client_tls: Option<ServerTls>,
    /// The peer port, bound for every core (none when no plain peer URL is given).
    peers: Option<Arc<PeerMesh>>,
    /// Set (a one-way flag, as `Shutdown`) once core 0 has published this member's
    /// attributes: cores serve clients only then.
    published: Shutdown,
}

/// Binds the peer port, as etcd does even for a single member: the first URL of
/// `--listen-peer-urls` (`https://` ones with `tls`); further URLs are logged and not served.
fn bind_peers(
    config: &NodeConfig,
    member_id: u64,
    tls: Option<PeerTls>,
) -> Result<Option<Arc<PeerMesh>>, String> {
    let Some(url) = config.listen_peer.first() else {
        return Ok(None);
    };
    for other in &config.listen_peer[1..] {
        crate::warn!(
            "only the first peer URL is served",
            peer_url = other.url.clone()
        );
    }
    let mut peer_config = PeerConfig::new(member_id, config.cores, url.addr);
    // The served URL's scheme decides what accepted connections speak (and `tls` is only
    // built when some peer URL is https).
    peer_config.tls = tls.filter(|_| url.tls);
    PeerMesh::new(peer_config)
        .map(Some)
        .map_err(|e| format!("cannot listen on {}: {e}", url.url))
}

/// Each shard's reader: its checkpoint, plus the replayed tail above it in the read buffer.
fn seed_readers(stores: &[Store], checkpointers: &[Checkpointer]) -> Vec<Arc<ShardReader>> {
    let seed = |(store, checkpointer): (&Store, &Checkpointer)| {
        let reader = ShardReader::new(checkpointer.published(), store.compacted_revision());
        for version in store.unsaved_versions() {
            reader.insert(version);
        }
        Arc::new(reader)
    };
    stores.iter().zip(checkpointers).map(seed).collect()
}

/// A single member publishes its name and client URLs itself, as etcd does at start-up (a
/// member of a cluster through the leader, `publish_in_cluster`).
async fn publish_single_member(shared: &Arc<Shared>, config: &NodeConfig) -> Result<(), String> {
    let node = Node::new(shared.clone());
    let (name, client_urls) = (&config.name, &config.advertise_client_urls);
    node.publish(name.clone(), client_urls.clone())
        .await
        .map_err(|e| format!("cannot publish this member's attributes: {e}"))
}

/// Retries until the cluster has taken this member's attributes (or the node stops).
async fn publish_in_cluster(shared: &Arc<Shared>, config: &NodeConfig) {
    let node = Node::new(shared.clone());
    let retry = Duration::from_millis(config.raft_timing.tick_ms);
    loop {
        let (name, client_urls) = (config.name.clone(), config.advertise_client_urls.clone());
        match node.publish(name, client_urls).await {
            Ok(()) => return,
            Err(KvError::Stopped) => return,
            Err(e) => crate::debug!("publish not taken yet", error = e.to_string()),
        }
        glommio::timer::sleep(retry).await;
    }
}

/// Every other member's peer address (its first peer URL), by id.
fn peer_addrs(shared: &Shared) -> Result<BTreeMap<u64, PeerAddr>, String> {
    let me = shared.identity.member_id;
    let others = shared.members.list().into_iter().filter(|m| m.id != me);
    others
        .map(|member| {
            let url = member.peer_urls.first().ok_or_else(|| {
                format!("member {:x} ({}) has no peer URL", member.id, member.name)
            })?;
            Ok((member.id, parse_peer_url(url)?))
        })
        .collect()
}

/// Keeps this core's peer connections to the members in the table: a member added is dialed,
/// a member removed is dropped, one whose peer URL changed is dialed again there.
async fn follow_members(shared: Arc<Shared>, peer: PeerCore, mut dialed: BTreeMap<u64, PeerAddr>) {
    let table = &shared.members;
    let mut seen = table.version();
    loop {
        wait_until(table.changed(), || table.version() != seen).await;
        seen = table.version();
        let wanted = match peer_addrs(&shared) {
            Ok(wanted) => wanted,
            Err(e) => {
                crate::warn!("a member's peer URL is not usable", error = e);
                continue;
            }
        };
        for gone in dialed.keys().filter(|id| !wanted.contains_key(id)) {
            peer.remove_peer(*gone);
        }
        for (&member, addr) in &wanted {
            if dialed.get(&member) != Some(addr) {
                peer.add_peer(member, addr.clone());
            }
        }
        dialed = wanted;
    }
}

impl CoreSetup {
    /// Clustered: this core connects to the same core of every other member.
    /// Dials every member now, then follows the member table (membership changes) until
    /// shutdown.
    fn dial_members(&self, peer_core: &PeerCore) -> Result<(), String> {
        let dialed = peer_addrs(&self.shared)?;
        for (&member, addr) in &dialed {
            peer_core.add_peer(member, addr.clone());
        }
        let follow = follow_members(self.shared.clone(), peer_core.clone(), dialed);
        let shutdown = self.shutdown.clone();
        glommio::spawn_local(
            async move { futures_lite::future::or(follow, shutdown.wait()).await },
        )
        .detach();
        Ok(())
    }

    /// Serves until shutdown. A core that cannot start stops the whole node.
    async fn run(self) -> Result<(), String> {
        let (shutdown, serving) = (self.shutdown.clone(), self.serving.clone());
        let result = self.start_and_serve().await;
        if result.is_err() {
            shutdown.request();
            let (count, event) = &*serving;
            count.fetch_sub(1, Ordering::SeqCst);
            event.notify(usize::MAX);
        }
        result
    }

    async fn start_and_serve(self) -> Result<(), String> {
        let data_dir = &self.config.data_dir;
        let mut tasks = Vec::new();
        // Held while the core serves: dropping it closes this core's peer listener.
        let peer_core = match &self.peers {
            Some(mesh) => Some(
                mesh.start_core(self.core)
                    .map_err(|e| format!("core {}: cannot serve peers: {e}", self.core))?,
            ),
            None => None,
        };
        if let (Some(peer_core), true) = (&peer_core, self.shared.role.is_clustered()) {
            self.dial_members(peer_core)?;
            let timeout = self.config.raft_timing.request_timeout();
            crate::forward::install(peer_core.clone(), timeout.as_millis() as u64);
            let (node, calls) = (Node::new(self.shared.clone()), peer_core.calls().clone());
            let transfers = crate::node::install::Transfers::new(data_dir);
            glommio::spawn_local(crate::forward::serve_calls(node, calls, transfers)).detach();
        }
        for owned in self.shards {
            let wal_dir = recovery::shard_wal_dir(data_dir, owned.id);
            let wal = open_wal(&wal_dir, &owned.wal, &self.config).await?;
            let shard = Shard::new(
                owned.id,
                self.shared.clone(),
                owned.store,
                wal,
                owned.next_index,
                owned.checkpointer,
                self.config.checkpoint,
            )?;
            tasks.push(glommio::spawn_local(shard.run(owned.rx)).detach());
        }
        if let Some(owned) = self.meta {
            let meta_dir = recovery::meta_wal_dir(data_dir);
            let log = match owned.raft {
                None => MetaLog::Single(Rc::new(
                    open_wal(&meta_dir, &owned.wal, &self.config).await?,
                )),
                Some(raft) => {
                    let options = wal_options(&self.config);
                    let store = WalLogStore::open(&meta_dir, options, raft.initial)
                        .await
                        .map_err(|e| format!("cannot open WAL {}: {e}", meta_dir.display()))?;
                    let start = ReplicaStart {
                        store,
                        applied_index: owned.start.next_index - 1,
                        timing: self.config.raft_timing.clone(),
                        requests: raft.requests,
                        catchup_entries: self.config.snapshot_catchup_entries,
                        data_dir: data_dir.clone(),
                    };
                    let peer_core = peer_core.clone().expect("a cluster member serves peers");
                    MetaLog::Replicated(Replica::start(self.shared.clone(), peer_core, start))
                }
            };
            let meta = Meta::new(self.shared.clone(), log, owned.start);
            tasks.push(glommio::spawn_local(meta.run(owned.rx)).detach());
            // Ends by itself once the meta group's inbox is closed at shutdown.
            glommio::spawn_local(lessor::run(self.shared.clone())).detach();
            if let Some(mode) = self.config.auto_compaction {
                let node = Node::new(self.shared.clone());
                glommio::spawn_local(compactor::run(node, mode)).detach();
            }
            // As etcd, clients are served once this member's attributes are in the log (in a
            // cluster that needs a leader: until then, or a shutdown, nobody is served).
            if self.shared.role.is_clustered() {
                let publish = publish_in_cluster(&self.shared, &self.config);
                futures_lite::future::or(publish, self.shutdown.wait()).await;
            } else {
                publish_single_member(&self.shared, &self.config).await?;
            }
            self.published.request();
        }
        // Clients see this member's client URLs in MemberList from the first request on.
        futures_lite::future::or(self.published.wait(), self.shutdown.wait()).await;
        let node = Node::new(self.shared.clone());
        let kv_service = KvService::new(node.clone());
        let kv = KvServer::new(kv_service.clone()).max_decoding_message_size(
            max_grpc_message_bytes(self.config.limits.max_request_bytes),
        );
        let cluster = ClusterService::new(node.clone());
        let hub = Hub::new(self.shared.clone());
        glommio::spawn_local(hub.clone().run()).detach();
        let (closer, shutdown) = (hub.clone(), self.shutdown.clone());
        glommio::spawn_local(async move {
            shutdown.wait().await;
            closer.close(); // Ends the watch streams, so connections can drain.
        })
        .detach();
        let watch = WatchServer::new(WatchService::new(
            hub.clone(),
            self.config.watch_progress_notify_interval_ms,
        ))
        .max_decoding_message_size(max_grpc_message_bytes(self.config.limits.max_request_bytes));
        let gateway = Gateway::new(
            gateway::Services {
                kv: kv_service,
                cluster: cluster.clone(),
                lease: LeaseService::new(node.clone()),
                watch: WatchService::new(
                    hub.clone(),
                    self.config.watch_progress_notify_interval_ms,
                ),
                lock: LockService::new(node.clone(), Deletions::new(hub.clone())),
                election: ElectionService::new(node.clone(), Deletions::new(hub.clone())),
                auth: AuthService::new(node.clone()),
            },
            self.config.limits.max_request_bytes,
        );
        let routes = Routes::new()
            .add_grpc(kv)
            .add_grpc(watch)
            .add_grpc(LeaseServer::new(LeaseService::new(node.clone())))
            .add_grpc(ClusterServer::new(cluster.clone()))
            .add_grpc(MaintenanceServer::new(cluster))
            .add_grpc(LockServer::new(LockService::new(
                node.clone(),
                Deletions::new(hub.clone()),
            )))
            .add_grpc(ElectionServer::new(ElectionService::new(
                node.clone(),
                Deletions::new(hub.clone()),
            )))
            .add_grpc(AuthServer::new(AuthService::new(node.clone())))
            .add_http(PATH_HEALTH, health_handler(|_query| async { Health::ok() }))
            .add_http(PATH_VERSION, version_handler())
            .add_http(
                PATH_METRICS,
                metrics_handler(
                    node.clone(),
                    self.grpc_metrics.clone(),
                    self.peers.as_ref().map(|mesh| mesh.stats().clone()),
                ),
            )
            .add_http(
                gateway::PATH_PREFIX,
                tls::refuse_named_certificates_on_gateway(
                    self.shared.clone(),
                    gateway.into_handler(),
                ),
            )
            .count_grpc(self.grpc_metrics.clone(), self.core);
        let mut servers = Vec::new();
        for url in &self.config.listen_client {
            let listener = transport::bind(url.addr)
                .map_err(|e| format!("core {}: cannot listen on {}: {e}", self.core, url.url))?;
            let config = ServerConfig {
                tls: self.client_tls.clone().filter(|_| url.tls),
                ..ServerConfig::default()
            };
            assert!(!url.tls || config.tls.is_some(), "https URL without TLS");
            crate::debug!(
                "core serving clients",
                core = self.core,
                address = url.url.clone()
            );
            let (routes, shutdown) = (routes.clone(), self.shutdown.clone());
            servers.push(glommio::spawn_local(async move {
                transport::serve(listener, routes, &config, shutdown.wait()).await;
            }));
        }
        if self.core == 0 {
            crate::info!("ready to serve client requests");
        }
        for server in servers {
            server.await;
        }
        // Other cores may still route requests to this core's shards until they stop serving.
        let (count, event) = &*self.serving;
        count.fetch_sub(1, Ordering::SeqCst);
        event.notify(usize::MAX);
        wait_until(event, || count.load(Ordering::SeqCst) == 0).await;
        if self.core == 0 {
            // Nothing sends any more: let every inbox drain and close.
            self.shared.meta.close();
            self.shared.shards.iter().for_each(|tx| {
                tx.close();
            });
        }
        for task in tasks {
            task.await;
        }
        Ok(())
    }
}
