//! The peer transport: byte frames between the same core of two members.
//!
//! Core-to-core: core `c` of member A talks to core `c` of member B over its own TCP
//! connection, so a raft envelope of a shard on core `c` reaches the core owning that shard on
//! B without a cross-core hop. Every core listens on the peer port (`SO_REUSEPORT`, like the
//! client port); the dialer's first frame is a hello naming the member it comes from, the
//! member it means to reach and the core. The core that accepted reads just that frame and,
//! when the hello names another core, hands the socket (an fd) to that core: one hop per
//! connection, none per message.
//!
//! Outbound, per peer and core: a bounded queue (`peer_queue_limit_frames`; when full the
//! frame is dropped and counted, raft retransmits) drained by one task that writes everything
//! queued as one batch, pings for the round trip time, and reconnects after an error with
//! exponential backoff. [`PeerCore::send`] never waits, so a peer that is down blocks neither
//! the core nor the other peers. Inbound frames go to the core's bounded inbox, which the
//! shard loop drains; a full inbox stops reading the connections (TCP flow control).
//!
//! A frame popped from a queue is written to one connection only: nothing is sent twice,
//! order is kept per connection, and frames in a connection that breaks are lost (raft
//! retransmits).
//!
//! TLS (`https://` peer URLs, `--peer-*` flags: `crate::tls::PeerTls`): the hello goes in
//! plain text, then both ends run the TLS handshake and every later frame is encrypted. The
//! hello only names the core to hand the socket to (a TLS session cannot move between
//! threads, a socket before its handshake can); the handshake runs on the core that serves
//! the connection, and what the hello claims is trusted no more than before (`read_hello`'s
//! checks, and the certificate checks of `--peer-trusted-ca-file`).
//!
//! Calls ([`PeerCore::call`], `call.rs`): a request goes out on the outbound connection like
//! a raft frame and its response comes back on that same connection; incoming calls reach
//! the core on a bounded channel ([`PeerCore::calls`]).
//!
//! Removed members ([`PeerMesh::watch_removals`]): a connection from a member removed from the
//! cluster is answered with a `Removed` frame, at its start and at each ping, and a member
//! that gets one stops (etcd's "removed member" answer to a removed member's streams).

pub mod call;
pub mod frame;
pub mod join;
pub mod stats;

use std::cell::{Cell, RefCell};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_channel::{Receiver, Sender, TrySendError};
use futures_lite::future::or;
use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::net::TcpStream;
use glommio::timer::sleep;
use glommio::{spawn_local, Task};
use hashbrown::HashMap;

use call::CallTable;
pub use call::{CallError, CallReply, IncomingCall};
use frame::{Frame, PROTOCOL_VERSION};
pub use frame::{FrameError, Kind, HEADER_BYTES};
use stats::PeerStats;

use crate::tls::{ListenUrl, PeerTls};
use crate::transport::{bind_socket, Flag, Listener};

#[derive(Clone, Debug)]
pub struct PeerConfig {
    pub member_id: u64,
    pub cores: usize,
    /// `--listen-peer-urls` (see [`parse_peer_url`]); port 0 picks one for all cores.
    pub listen_addr: SocketAddr,
    /// Frames queued for one peer on one core; more are dropped and counted.
    pub peer_queue_limit_frames: usize,
    /// Frames a core's inbox holds before its connections stop being read.
    pub inbox_limit_frames: usize,
    /// Largest payload sent or accepted (snapshot chunks will be the largest frames).
    pub max_frame_bytes: usize,
    /// A batch stops taking queued frames once it holds this many bytes.
    pub batch_limit_bytes: usize,
    /// Reconnect delay after an error: starts here, doubles per failed try...
    pub backoff_min_ms: u64,
    /// ...up to this.
    pub backoff_max_ms: u64,
    pub connect_timeout_ms: u64,
    /// A ping goes out at least this often on every outbound connection.
    pub ping_interval_ms: u64,
    /// An outbound connection with nothing read for this long is closed (a dead peer that
    /// sent no reset).
    pub silence_timeout_ms: u64,
    /// How long an accepted connection may take to send its hello.
    pub hello_timeout_ms: u64,
    /// Calls of one core waiting for their answers; more fail with `TooManyCalls`. Also
    /// bounds the answers queued on one inbound connection.
    pub max_inflight_calls: usize,
    /// Incoming calls a core's queue holds; more are refused (`Busy`) so that a slow
    /// server of calls never stops the raft frames sharing the connection.
    pub calls_limit: usize,
    /// Set when this member's peer URL is `https://`: accepted connections run the TLS
    /// server handshake, connections to `https://` peers the client one.
    pub tls: Option<PeerTls>,
}

impl PeerConfig {
    pub fn new(member_id: u64, cores: usize, listen_addr: SocketAddr) -> PeerConfig {
        PeerConfig {
            member_id,
            cores,
            listen_addr,
            peer_queue_limit_frames: 4096,
            inbox_limit_frames: 4096,
            max_frame_bytes: 64 * 1024 * 1024,
            batch_limit_bytes: 1024 * 1024,
            backoff_min_ms: 50,
            backoff_max_ms: 1000,
            connect_timeout_ms: 1000,
            ping_interval_ms: 1000,
            silence_timeout_ms: 5000,
            hello_timeout_ms: 5000,
            max_inflight_calls: 1024,
            calls_limit: 1024,
            tls: None,
        }
    }
}

/// Where a peer listens: its address, and for an `https://` peer URL the host its certificate
/// names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerAddr {
    pub addr: SocketAddr,
    pub tls_host: Option<String>,
}

impl From<SocketAddr> for PeerAddr {
    /// A plain-text peer.
    fn from(addr: SocketAddr) -> PeerAddr {
        PeerAddr {
            addr,
            tls_host: None,
        }
    }
}

/// The address of a peer URL (`http://` or `https://`).
pub fn parse_peer_url(url: &str) -> Result<PeerAddr, String> {
    let parsed = ListenUrl::parse(url).map_err(|e| format!("peer URL {e}"))?;
    Ok(PeerAddr {
        addr: parsed.addr,
        tls_host: parsed.tls.then_some(parsed.host),
    })
}

/// A raft payload received from a peer, on the core it was sent from.
#[derive(Debug, PartialEq, Eq)]
pub struct Delivery {
    pub from: u64,
    pub payload: Vec<u8>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum SendError {
    UnknownPeer(u64),
    TooLarge {
        payload_bytes: usize,
        max_bytes: usize,
    },
    /// The peer's queue was full; the frame is dropped (and counted).
    QueueFull,
}

/// An accepted connection on its way to the core its hello named.
struct Handoff {
    fd: OwnedFd,
    from: u64,
}

/// What all cores of a member share. Built before the executors start.
pub struct PeerMesh {
    config: PeerConfig,
    local_addr: SocketAddr,
    /// Each core's listening socket until that core starts.
    sockets: Vec<Mutex<Option<socket2::Socket>>>,
    handoffs: Vec<(Sender<Handoff>, Receiver<Handoff>)>,
    stats: Arc<PeerStats>,
    /// What a member about to join is told (`join.rs`); set once the member table exists.
    join_answer: std::sync::OnceLock<JoinAnswer>,
    /// Which members were removed, and what this member does when told it is one.
    removals: std::sync::OnceLock<Removals>,
    /// Set by the first peer that says this member was removed: it acts on that once.
    told_removed: std::sync::atomic::AtomicBool,
}

type JoinAnswer = Box<dyn Fn() -> Vec<u8> + Send + Sync>;

/// See [`PeerMesh::watch_removals`].
struct Removals {
    is_removed: Box<dyn Fn(u64) -> bool + Send + Sync>,
    on_told: Box<dyn Fn() + Send + Sync>,
}

/// Accepted connections waiting to reach their core; more are closed (the dialer retries).
const HANDOFF_LIMIT: usize = 64;

impl PeerMesh {
    /// Binds the peer port for every core.
    pub fn new(config: PeerConfig) -> io::Result<Arc<PeerMesh>> {
        assert!(config.cores > 0 && config.cores <= u16::MAX as usize);
        assert!(config.peer_queue_limit_frames > 0 && config.inbox_limit_frames > 0);
        assert!(config.backoff_min_ms > 0 && config.backoff_min_ms <= config.backoff_max_ms);
        assert!(config.max_inflight_calls > 0 && config.calls_limit > 0);
        assert!(config.max_frame_bytes > call::RESPONSE_PREFIX_BYTES);
        let first = bind_socket(config.listen_addr)?;
        let local_addr = first
            .local_addr()?
            .as_socket()
            .expect("a TCP socket has an IP address");
        let mut sockets = vec![Mutex::new(Some(first))];
        for _ in 1..config.cores {
            sockets.push(Mutex::new(Some(bind_socket(local_addr)?)));
        }
        Ok(Arc::new(PeerMesh {
            handoffs: (0..config.cores)
                .map(|_| async_channel::bounded(HANDOFF_LIMIT))
                .collect(),
            stats: PeerStats::new(config.cores),
            config,
            local_addr,
            sockets,
            join_answer: std::sync::OnceLock::new(),
            removals: std::sync::OnceLock::new(),
            told_removed: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// What a membership question (`join::ask`) is answered with, from now on.
    pub fn answer_joins(&self, answer: impl Fn() -> Vec<u8> + Send + Sync + 'static) {
        let set = self.join_answer.set(Box::new(answer));
        assert!(set.is_ok(), "join answer set twice");
    }

    /// From now on, a connection from a member `is_removed` names is answered with
    /// `Kind::Removed` (at its start and at every ping, so one open before the removal hears
    /// it too; etcd answers a removed member's streams with "removed member"), and the first
    /// such answer this member gets runs `on_told` (on the core that got it).
    pub fn watch_removals(
        &self,
        is_removed: impl Fn(u64) -> bool + Send + Sync + 'static,
        on_told: impl Fn() + Send + Sync + 'static,
    ) {
        let removals = Removals {
            is_removed: Box::new(is_removed),
            on_told: Box::new(on_told),
        };
        let set = self.removals.set(removals);
        assert!(set.is_ok(), "removals watched twice");
    }

    fn is_removed(&self, member: u64) -> bool {
        let removals = self.removals.get();
        removals.is_some_and(|removals| (removals.is_removed)(member))
    }

    /// Peer `by` answered this member's connection with `Kind::Removed`.
    fn told_removed(&self, by: u64) {
        let first = !self
            .told_removed
            .swap(true, std::sync::atomic::Ordering::SeqCst);
        if let (true, Some(removals)) = (first, self.removals.get()) {
            crate::warn!(
                "a peer says this member was removed from the cluster",
                peer = format!("{by:x}")
            );
            (removals.on_told)();
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn stats(&self) -> &Arc<PeerStats> {
        &self.stats
    }

    /// Starts `core`'s side of the transport; call on that core's glommio executor, once.
    pub fn start_core(self: &Arc<Self>, core: usize) -> io::Result<PeerCore> {
        let socket = self.sockets[core]
            .lock()
            .expect("peer socket slot poisoned")
            .take()
            .expect("peer core started twice");
        let listener = Rc::new(Listener::register(socket)?);
        let (inbox_tx, inbox) = async_channel::bounded(self.config.inbox_limit_frames);
        let (calls_tx, calls) = async_channel::bounded(self.config.calls_limit);
        let ctx = Rc::new(CoreCtx {
            mesh: self.clone(),
            core,
            inbox_tx,
            calls_tx,
            waiting: RefCell::new(CallTable::new(self.config.max_inflight_calls)),
            connections: Cell::new(0),
            stop: Flag::default(),
        });
        let accept_task = spawn_local(accept_loop(ctx.clone(), listener.clone()));
        let handoff_task = spawn_local(receive_handoffs(ctx.clone()));
        Ok(PeerCore {
            inner: Rc::new(CoreInner {
                ctx,
                inbox,
                calls,
                listener,
                peers: RefCell::new(HashMap::new()),
                _tasks: [accept_task, handoff_task],
            }),
        })
    }
}

struct CoreCtx {
    mesh: Arc<PeerMesh>,
    core: usize,
    inbox_tx: Sender<Delivery>,
    calls_tx: Sender<IncomingCall>,
    /// This core's calls waiting for answers.
    waiting: RefCell<CallTable>,
    /// Serial numbers of this core's outbound connections (calls remember theirs).
    connections: Cell<u64>,
    /// Set once when the core's transport is dropped; wakes every connection task.
    stop: Flag,
}

impl CoreCtx {
    fn config(&self) -> &PeerConfig {
        &self.mesh.config
    }

    fn count(&self, peer: u64, change: impl FnOnce(&mut stats::PeerCounters)) {
        self.mesh.stats.update(self.core, peer, change);
    }
}

/// One core's end of the peer transport; clones share it (the shard loop and the forwarding
/// layer each hold one). Dropping the last clone closes the listener and every connection of
/// this core.
#[derive(Clone)]
pub struct PeerCore {
    inner: Rc<CoreInner>,
}

struct CoreInner {
    ctx: Rc<CoreCtx>,
    inbox: Receiver<Delivery>,
    calls: Receiver<IncomingCall>,
    listener: Rc<Listener>,
    peers: RefCell<HashMap<u64, Outbound>>,
    _tasks: [Task<()>; 2],
}

/// A frame waiting in a peer's queue: its kind (raft or request) and payload.
type Outgoing = (Kind, Vec<u8>);

struct Outbound {
    queue: Sender<Outgoing>,
    /// Owns the connection; dropping it cancels it.
    _task: Task<()>,
}

impl PeerCore {
    fn ctx(&self) -> &Rc<CoreCtx> {
        &self.inner.ctx
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.ctx().mesh.local_addr
    }

    /// Raft payloads from peers for this core. The shard loop drains it.
    pub fn inbox(&self) -> &Receiver<Delivery> {
        &self.inner.inbox
    }

    /// Calls from peers for this core, each answered through its `reply`.
    pub fn calls(&self) -> &Receiver<IncomingCall> {
        &self.inner.calls
    }

    /// Starts (or restarts, at a new address) the connection to `member` from this core.
    pub fn add_peer(&self, member: u64, addr: impl Into<PeerAddr>) {
        let addr = addr.into();
        let ctx = self.ctx();
        assert_ne!(
            member,
            ctx.config().member_id,
            "a member is not its own peer"
        );
        // A connection that is replaced mid-write is gone with its task: so is its flag.
        self.remove_peer(member);
        let (queue, pending) = async_channel::bounded(ctx.config().peer_queue_limit_frames);
        let task = spawn_local(run_outbound(ctx.clone(), member, addr, pending));
        let outbound = Outbound { queue, _task: task };
        self.inner.peers.borrow_mut().insert(member, outbound);
    }

    /// Closes the connection to `member`, drops what was queued for it and fails its calls.
    pub fn remove_peer(&self, member: u64) {
        self.inner.peers.borrow_mut().remove(&member);
        self.ctx().waiting.borrow_mut().fail_peer(member);
        self.ctx().count(member, |c| c.connected_cores = 0);
    }

    /// Queues `payload` for `to`'s same core. Never waits.
    pub fn send(&self, to: u64, payload: Vec<u8>) -> Result<(), SendError> {
        let max_bytes = self.ctx().config().max_frame_bytes;
        if payload.len() > max_bytes {
            return Err(SendError::TooLarge {
                payload_bytes: payload.len(),
                max_bytes,
            });
        }
        self.enqueue(to, (Kind::Raft, payload))
            .map_err(|full| full.unwrap_or(SendError::UnknownPeer(to)))
    }

    /// Puts a frame on `to`'s queue: `Err(None)` if `to` is unknown.
    fn enqueue(&self, to: u64, frame: Outgoing) -> Result<(), Option<SendError>> {
        let peers = self.inner.peers.borrow();
        let peer = peers.get(&to).ok_or(None)?;
        match peer.queue.try_send(frame) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => {
                self.ctx().count(to, |c| c.dropped_frames += 1);
                Err(Some(SendError::QueueFull))
            }
            Err(TrySendError::Closed(_)) => unreachable!("the outbound task holds the receiver"),
        }
    }

    /// Sends `payload` to `to`'s same core as a call and waits for the answer, at most
    /// `timeout_ms`. Fails at once when the connection it went out on breaks.
    pub async fn call(
        &self,
        to: u64,
        payload: Vec<u8>,
        timeout_ms: u64,
    ) -> Result<Vec<u8>, CallError> {
        let max_bytes = self.ctx().config().max_frame_bytes - call::CALL_ID_BYTES;
        if payload.len() > max_bytes {
            return Err(CallError::TooLarge {
                payload_bytes: payload.len(),
                max_bytes,
            });
        }
        let (id, answer) = self.ctx().waiting.borrow_mut().register(to)?;
        // Removes the call from the table however this future ends (timeout, drop).
        let _forget = Forget {
            ctx: self.ctx(),
            id,
        };
        let mut request = Vec::with_capacity(call::CALL_ID_BYTES + payload.len());
        request.extend_from_slice(&id.to_le_bytes());
        request.extend_from_slice(&payload);
        match self.enqueue(to, (Kind::Request, request)) {
            Ok(()) => {}
            Err(None) => return Err(CallError::UnknownPeer(to)),
            Err(Some(_)) => return Err(CallError::QueueFull),
        }
        or(
            async { answer.await.unwrap_or(Err(CallError::ConnectionLost)) },
            async {
                sleep(Duration::from_millis(timeout_ms)).await;
                Err(CallError::Timeout)
            },
        )
        .await
    }
}

struct Forget<'a> {
    ctx: &'a CoreCtx,
    id: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.ctx.waiting.borrow_mut().forget(self.id);
    }
}

impl Drop for CoreInner {
    fn drop(&mut self) {
        self.ctx.stop.set();
        self.listener.close();
    }
}

/// Runs `work` until it ends or the core's transport stops.
async fn until_stopped<T>(ctx: &CoreCtx, work: impl std::future::Future<Output = T>) -> Option<T> {
    or(async { Some(work.await) }, async {
        ctx.stop.wait().await;
        None
    })
    .await
}

async fn with_timeout<T>(
    timeout_ms: u64,
    what: &str,
    work: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    or(work, async {
        sleep(Duration::from_millis(timeout_ms)).await;
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{what}: no progress in {timeout_ms} ms"),
        ))
    })
    .await
}

// ---- outbound ----

/// Connects to `peer` again and again (exponential backoff between failed tries) and
/// writes its queue; ends when the `PeerCore` drops its task.
async fn run_outbound(ctx: Rc<CoreCtx>, peer: u64, addr: PeerAddr, queue: Receiver<Outgoing>) {
    let config = ctx.config().clone();
    let mut backoff_ms = config.backoff_min_ms;
    loop {
        let confirmed = match connect(&ctx, peer, &addr).await {
            Ok(stream) => {
                ctx.count(peer, |c| c.connected_cores = 1);
                let serial = ctx.connections.get() + 1;
                ctx.connections.set(serial);
                let confirmed = Cell::new(false);
                let link = Link { peer, serial };
                let _ = match stream {
                    Stream::Plain(stream) => {
                        run_connection(&ctx, link, stream, &queue, &confirmed).await
                    }
                    Stream::Tls(stream) => {
                        run_connection(&ctx, link, *stream, &queue, &confirmed).await
                    }
                };
                // Whatever was written to this connection will not be answered on it.
                ctx.waiting.borrow_mut().fail_connection(peer, serial);
                ctx.count(peer, |c| c.connected_cores = 0);
                confirmed.get()
            }
            Err(error) => {
                crate::debug!(
                    "peer connection failed",
                    peer = format!("{peer:x}"),
                    error = error.to_string()
                );
                false
            }
        };
        ctx.count(peer, |c| c.connection_failures += 1);
        if confirmed {
            backoff_ms = config.backoff_min_ms;
        }
        sleep(Duration::from_millis(backoff_ms)).await;
        if !confirmed {
            backoff_ms = (backoff_ms * 2).min(config.backoff_max_ms);
        }
    }
}

/// An outbound connection after its hello: plain, or TLS for an `https://` peer.
enum Stream {
    Plain(TcpStream),
    Tls(Box<futures_rustls::client::TlsStream<TcpStream>>),
}

/// Opens a connection to `peer` and says hello (in plain text: the accepting member hands the
/// socket to the core it names, see the module doc), then runs the TLS handshake if the
/// peer's URL is `https://`.
async fn connect(ctx: &CoreCtx, peer: u64, addr: &PeerAddr) -> io::Result<Stream> {
    let config = ctx.config();
    let timeout = Duration::from_millis(config.connect_timeout_ms);
    let mut stream = TcpStream::connect_timeout(addr.addr, timeout).await?;
    stream.set_nodelay(true)?;
    let mut hello = Vec::new();
    let (core, me) = (ctx.core as u16, config.member_id);
    let version = PROTOCOL_VERSION.to_le_bytes();
    frame::encode(&mut hello, Kind::Hello, core, me, peer, &version);
    stream.write_all(&hello).await?;
    let Some(host) = &addr.tls_host else {
        return Ok(Stream::Plain(stream));
    };
    let tls = config.tls.as_ref().ok_or_else(|| {
        io::Error::other("an https:// peer needs this member's peer TLS (--peer-cert-file)")
    })?;
    let handshake = tls.connect(host, stream);
    let stream = with_timeout(config.connect_timeout_ms, "TLS handshake", handshake).await?;
    Ok(Stream::Tls(Box::new(stream)))
}

/// One outbound connection: the peer and the connection's serial number on this core.
#[derive(Clone, Copy)]
struct Link {
    peer: u64,
    serial: u64,
}

/// Says hello, then writes batches and reads pongs and call answers until either side
/// fails. `confirmed` turns true at the first pong: the peer accepted the hello.
async fn run_connection(
    ctx: &CoreCtx,
    link: Link,
    stream: impl AsyncRead + AsyncWrite + Unpin,
    queue: &Receiver<Outgoing>,
    confirmed: &Cell<bool>,
) -> io::Result<()> {
    let started = Instant::now();
    let (reader, writer) = futures_lite::io::split(stream);
    or(
        write_batches(ctx, link, writer, queue, started),
        read_answers(ctx, link.peer, reader, started, confirmed),
    )
    .await
}

/// Appends one queued frame to `batch`; a call's request is marked as written to `link`.
fn encode_outgoing(ctx: &CoreCtx, link: Link, batch: &mut Vec<u8>, (kind, payload): Outgoing) {
    if kind == Kind::Request {
        let (id, _) = call::split_request(&payload).expect("a request starts with its call id");
        ctx.waiting.borrow_mut().mark_sent(id, link.serial);
    }
    let (core, me) = (ctx.core as u16, ctx.config().member_id);
    frame::encode(batch, kind, core, me, link.peer, &payload);
}

async fn write_batches(
    ctx: &CoreCtx,
    link: Link,
    mut writer: impl AsyncWrite + Unpin,
    queue: &Receiver<Outgoing>,
    started: Instant,
) -> io::Result<()> {
    let peer = link.peer;
    let config = ctx.config();
    let (core, me) = (ctx.core as u16, config.member_id);
    let ping_interval = Duration::from_millis(config.ping_interval_ms);
    let mut batch = Vec::new();
    let mut next_ping = Instant::now();
    let mut frames = 0u64;
    loop {
        while batch.len() < config.batch_limit_bytes {
            let Ok(outgoing) = queue.try_recv() else {
                break;
            };
            encode_outgoing(ctx, link, &mut batch, outgoing);
            frames += 1;
        }
        // Checked on every batch: under steady traffic the queue never looks empty.
        if Instant::now() >= next_ping {
            let nanos = started.elapsed().as_nanos() as u64;
            frame::encode(&mut batch, Kind::Ping, core, me, peer, &nanos.to_le_bytes());
            next_ping = Instant::now() + ping_interval;
        }
        if !batch.is_empty() {
            writer.write_all(&batch).await?;
            writer.flush().await?;
            let bytes = batch.len() as u64;
            ctx.count(peer, |c| {
                c.sent_bytes += bytes;
                c.sent_frames += frames;
            });
            batch.clear();
            frames = 0;
        }
        let wait = next_ping.saturating_duration_since(Instant::now());
        // `recv` fails only when the peer is removed, which cancels this task too.
        let woken_by = or(async { queue.recv().await.ok() }, async {
            sleep(wait).await;
            None
        })
        .await;
        if let Some(outgoing) = woken_by {
            encode_outgoing(ctx, link, &mut batch, outgoing);
            frames += 1;
        }
    }
}

async fn read_answers(
    ctx: &CoreCtx,
    peer: u64,
    mut reader: impl AsyncRead + Unpin,
    started: Instant,
    confirmed: &Cell<bool>,
) -> io::Result<()> {
    let config = ctx.config();
    let mut frames = FrameReader::new(config.max_frame_bytes);
    loop {
        let frame =
            with_timeout(config.silence_timeout_ms, "peer", frames.next(&mut reader)).await?;
        ctx.count(peer, |c| c.received_bytes += frames.take_read_bytes());
        if frame.kind == Kind::Removed && frame.from == peer {
            ctx.mesh.told_removed(peer);
            return Err(io::Error::other("the peer says this member was removed"));
        }
        if frame.kind == Kind::Response && frame.from == peer {
            let (id, result) = call::split_response(&frame.payload)
                .ok_or_else(|| FrameError::Unexpected("short or unknown call response".into()))?;
            ctx.waiting.borrow_mut().answer(peer, id, result);
            continue;
        }
        let echoed = match (frame.kind, <[u8; 8]>::try_from(frame.payload.as_slice())) {
            (Kind::Pong, Ok(nanos)) => u64::from_le_bytes(nanos),
            _ => {
                return Err(FrameError::Unexpected(format!(
                    "{:?} on an outbound connection",
                    frame.kind
                ))
                .into())
            }
        };
        let rtt = started
            .elapsed()
            .saturating_sub(Duration::from_nanos(echoed));
        ctx.count(peer, |c| c.observe_rtt(rtt));
        confirmed.set(true);
    }
}

// ---- inbound ----

async fn accept_loop(ctx: Rc<CoreCtx>, listener: Rc<Listener>) {
    loop {
        match listener.accept().await {
            Ok(stream) => {
                spawn_local(handshake(ctx.clone(), stream)).detach();
            }
            Err(_) if ctx.stop.is_set() => return,
            // Out of fds or the like: do not spin.
            Err(_) => sleep(Duration::from_millis(ctx.config().backoff_min_ms)).await,
        }
    }
}

/// Reads the hello of an accepted connection and serves it here or hands it to its core.
async fn handshake(ctx: Rc<CoreCtx>, mut stream: TcpStream) {
    let hello_timeout_ms = ctx.config().hello_timeout_ms;
    let hello = until_stopped(
        &ctx,
        with_timeout(hello_timeout_ms, "hello", read_hello(&ctx, &mut stream)),
    )
    .await;
    let Some(Ok((from, core))) = hello else {
        return;
    };
    if from == join::ASKER {
        return join::answer(&ctx, stream).await;
    }
    if core == ctx.core {
        return serve_inbound(ctx, stream, from).await;
    }
    // The hello was read with exact-size reads, so nothing of the next frames is buffered
    // here: the socket alone carries the connection to its core.
    // SAFETY: the fd is open for as long as `stream`, which outlives this borrow.
    let fd = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) }.try_clone_to_owned();
    drop(stream);
    if let Ok(fd) = fd {
        // Full or closed: the connection closes and the dialer retries.
        let _ = ctx.mesh.handoffs[core].0.try_send(Handoff { fd, from });
    }
}

/// Reads exactly one hello frame: (from member, core).
async fn read_hello(ctx: &CoreCtx, stream: &mut TcpStream) -> io::Result<(u64, usize)> {
    let config = ctx.config();
    let mut header_bytes = [0; HEADER_BYTES];
    stream.read_exact(&mut header_bytes).await?;
    let header = frame::parse_header(&header_bytes, config.max_frame_bytes)?;
    let unexpected = |what: String| io::Error::from(FrameError::Unexpected(what));
    if header.kind != Kind::Hello || header.payload_bytes != 4 {
        return Err(unexpected(format!(
            "{:?} of {} bytes before hello",
            header.kind, header.payload_bytes
        )));
    }
    let mut payload = vec![0; 4];
    stream.read_exact(&mut payload).await?;
    let hello = frame::finish(&header, &header_bytes, payload)?;
    let version = u32::from_le_bytes(hello.payload[..4].try_into().expect("4 bytes"));
    if version != PROTOCOL_VERSION {
        return Err(unexpected(format!("protocol version {version}")));
    }
    let asks_membership = hello.from == join::ASKER && hello.to == join::ASKER;
    if !asks_membership && (hello.to != config.member_id || hello.from == config.member_id) {
        return Err(unexpected(format!(
            "hello from {:x} to {:x}",
            hello.from, hello.to
        )));
    }
    if hello.core as usize >= config.cores {
        return Err(unexpected(format!(
            "hello for core {} of {}",
            hello.core, config.cores
        )));
    }
    ctx.count(hello.from, |c| {
        c.received_bytes += (HEADER_BYTES + 4) as u64
    });
    Ok((hello.from, hello.core as usize))
}

async fn receive_handoffs(ctx: Rc<CoreCtx>) {
    let handoffs = ctx.mesh.handoffs[ctx.core].1.clone();
    while let Ok(Handoff { fd, from }) = handoffs.recv().await {
        // SAFETY: `into_raw_fd` hands over sole ownership of a connected TCP socket.
        let stream = unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) };
        spawn_local(serve_inbound(ctx.clone(), stream, from)).detach();
    }
}

/// Delivers the raft frames of one inbound connection and answers its pings, until it
/// fails, sends something invalid, or the core's transport stops.
async fn serve_inbound(ctx: Rc<CoreCtx>, stream: TcpStream, from: u64) {
    let Some(tls) = ctx.config().tls.clone() else {
        let _ = until_stopped(&ctx, serve_frames(&ctx, stream, from)).await;
        return;
    };
    let timeout_ms = ctx.config().hello_timeout_ms;
    let handshake = with_timeout(timeout_ms, "TLS handshake", tls.accept(stream));
    if let Some(Ok(stream)) = until_stopped(&ctx, handshake).await {
        let _ = until_stopped(&ctx, serve_frames(&ctx, stream, from)).await;
    }
}

/// Reads the connection's frames and writes what goes back on it (pongs, call answers)
/// from one queue, so that answers given from any task never interleave.
async fn serve_frames(
    ctx: &CoreCtx,
    stream: impl AsyncRead + AsyncWrite + Unpin,
    from: u64,
) -> io::Result<()> {
    if ctx.mesh.is_removed(from) {
        return refuse_removed(ctx, stream, from).await;
    }
    let (reader, writer) = futures_lite::io::split(stream);
    let (back_tx, back) = async_channel::bounded(ctx.config().max_inflight_calls);
    or(
        read_inbound(ctx, reader, from, back_tx),
        write_back(writer, back),
    )
    .await
}

async fn write_back(
    mut writer: impl AsyncWrite + Unpin,
    back: Receiver<Vec<u8>>,
) -> io::Result<()> {
    let mut batch = Vec::new();
    // `read_inbound` holds a sender for as long as this runs.
    while let Ok(first) = back.recv().await {
        batch.extend_from_slice(&first);
        while let Ok(more) = back.try_recv() {
            batch.extend_from_slice(&more);
        }
        writer.write_all(&batch).await?;
        writer.flush().await?;
        batch.clear();
    }
    Ok(())
}

async fn read_inbound(
    ctx: &CoreCtx,
    mut reader: impl AsyncRead + Unpin,
    from: u64,
    back: Sender<Vec<u8>>,
) -> io::Result<()> {
    let config = ctx.config();
    let mut frames = FrameReader::new(config.max_frame_bytes);
    loop {
        let frame = frames.next(&mut reader).await?;
        let read_bytes = frames.take_read_bytes();
        ctx.count(from, |c| {
            c.received_bytes += read_bytes;
            c.received_frames += 1;
        });
        if frame.from != from || frame.to != config.member_id || frame.core as usize != ctx.core {
            return Err(FrameError::Unexpected(format!(
                "frame from {:x} to {:x} core {} on a connection from {from:x} to core {}",
                frame.from, frame.to, frame.core, ctx.core
            ))
            .into());
        }
        match frame.kind {
            Kind::Raft => {
                let delivery = Delivery {
                    from,
                    payload: frame.payload,
                };
                if ctx.inbox_tx.send(delivery).await.is_err() {
                    return Ok(());
                }
            }
            Kind::Request => {
                let (id, body) = call::split_request(&frame.payload)
                    .ok_or_else(|| FrameError::Unexpected("call request without an id".into()))?;
                let reply = CallReply::new(
                    id,
                    frame.core,
                    config.member_id,
                    from,
                    config.max_frame_bytes,
                    back.clone(),
                );
                let incoming = IncomingCall {
                    from,
                    payload: body.to_vec(),
                    reply,
                };
                // Never waits: raft frames behind this one must not stall on slow calls.
                if let Err(refused) = ctx.calls_tx.try_send(incoming) {
                    refused.into_inner().reply.refuse();
                }
            }
            Kind::Ping => {
                // Removed since the connection opened: the dialer closes it on this answer.
                let answer = match ctx.mesh.is_removed(from) {
                    true => removed_frame(ctx, frame.core, from),
                    false => {
                        let mut pong = Vec::new();
                        let me = config.member_id;
                        frame::encode(&mut pong, Kind::Pong, frame.core, me, from, &frame.payload);
                        pong
                    }
                };
                if back.send(answer).await.is_err() {
                    return Ok(());
                }
            }
            Kind::Hello | Kind::Pong | Kind::Response | Kind::Removed => {
                return Err(FrameError::Unexpected(format!(
                    "{:?} on an inbound connection",
                    frame.kind
                ))
                .into())
            }
        }
    }
}

/// Tells a removed member so, then reads (and drops) what it sent until it closes, at most
/// `hello_timeout_ms`: closing first, with its frames unread, would send it a reset, which
/// may discard the answer before it is read.
async fn refuse_removed(
    ctx: &CoreCtx,
    mut stream: impl AsyncRead + AsyncWrite + Unpin,
    from: u64,
) -> io::Result<()> {
    crate::warn!(
        "refused the connection of a removed member",
        peer = format!("{from:x}")
    );
    stream
        .write_all(&removed_frame(ctx, ctx.core as u16, from))
        .await?;
    stream.flush().await?;
    let drain = async {
        let mut sink = [0; 4096];
        while stream.read(&mut sink).await? > 0 {}
        Ok(())
    };
    with_timeout(ctx.config().hello_timeout_ms, "removed member", drain).await
}

/// The answer to a removed member's connection (`Kind::Removed`).
fn removed_frame(ctx: &CoreCtx, core: u16, to: u64) -> Vec<u8> {
    let mut out = Vec::new();
    frame::encode(
        &mut out,
        Kind::Removed,
        core,
        ctx.config().member_id,
        to,
        &[],
    );
    out
}

/// Reads frames from a stream in large reads, decoding every frame they hold.
struct FrameReader {
    max_frame_bytes: usize,
    /// Read bytes are `buf[start..end]`; `buf` only grows (no zeroing per read), back to
    /// `READ_CHUNK_BYTES` once a large frame has been consumed.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Bytes read since the last `take_read_bytes`.
    read_bytes: u64,
}

/// Bytes asked for per read.
const READ_CHUNK_BYTES: usize = 64 * 1024;

impl FrameReader {
    fn new(max_frame_bytes: usize) -> FrameReader {
        FrameReader {
            max_frame_bytes,
            buf: Vec::new(),
            start: 0,
            end: 0,
            read_bytes: 0,
        }
    }

    fn take_read_bytes(&mut self) -> u64 {
        std::mem::take(&mut self.read_bytes)
    }

    /// The next frame; an error on end of stream, I/O failure or an invalid frame.
    async fn next(&mut self, stream: &mut (impl AsyncRead + Unpin)) -> io::Result<Frame> {
        loop {
            let unread = &self.buf[self.start..self.end];
            if let Some((frame, used)) = frame::decode(unread, self.max_frame_bytes)? {
                self.start += used;
                return Ok(frame);
            }
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.end == 0 && self.buf.len() > READ_CHUNK_BYTES {
                self.buf = Vec::new();
            }
            if self.buf.len() < self.end + READ_CHUNK_BYTES {
                self.buf.resize(self.end + READ_CHUNK_BYTES, 0);
            }
            match stream.read(&mut self.buf[self.end..]).await? {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                read => {
                    self.end += read;
                    self.read_bytes += read as u64;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// Hands out its bytes at most `step` at a time, then end of stream.
    struct Trickle {
        bytes: Vec<u8>,
        at: usize,
        step: usize,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            let n = self.step.min(buf.len()).min(self.bytes.len() - self.at);
            let at = self.at;
            buf[..n].copy_from_slice(&self.bytes[at..at + n]);
            self.at += n;
            Poll::Ready(Ok(n))
        }
    }

    #[test]
    fn frame_reader_reassembles_frames_from_any_read_sizes() {
        let payloads: Vec<Vec<u8>> = vec![b"a".to_vec(), vec![9; 3 * READ_CHUNK_BYTES], vec![]];
        let mut bytes = Vec::new();
        for p in &payloads {
            frame::encode(&mut bytes, Kind::Raft, 1, 2, 3, p);
        }
        for step in [1, 7, READ_CHUNK_BYTES, usize::MAX] {
            let mut stream = Trickle {
                bytes: bytes.clone(),
                at: 0,
                step,
            };
            let mut reader = FrameReader::new(4 * READ_CHUNK_BYTES);
            futures_lite::future::block_on(async {
                for p in &payloads {
                    assert_eq!(&reader.next(&mut stream).await.unwrap().payload, p);
                }
                let end = reader.next(&mut stream).await.unwrap_err();
                assert_eq!(end.kind(), io::ErrorKind::UnexpectedEof);
            });
            assert_eq!(reader.take_read_bytes(), bytes.len() as u64, "step {step}");
        }
    }
}
