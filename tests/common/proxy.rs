//! A fault-injecting TCP proxy in front of one cluster member's peer port.
//!
//! The member listens on its real peer port but advertises the proxy's address, so every peer
//! connection TO it passes the proxy (cluster.rs `Cluster::start_proxied`). What the proxy does
//! with a connection's bytes is its `Mode`, switchable at run time:
//!
//! - `Pass`: forwarded as read.
//! - `Blackhole`: held, both ways; the connections stay open. The proxy stops reading once
//!   `CHUNKS_IN_FLIGHT` chunks wait, so the sender's socket buffers fill (TCP flow control) as
//!   behind a firewall that drops packets; after `heal` the held bytes go on, in order, as
//!   TCP's retransmissions would deliver them.
//! - `Delay`: each chunk is delivered a latency (plus a random jitter) after it was read, in
//!   order; chunks read meanwhile queue up (pipelined, as on a slow link).
//! - `Drop`: each chunk resets its connection with a given probability (both sockets shut
//!   down and closed with `SO_LINGER` 0: the member sees its connection cut).
//!
//! The proxy learns which member each connection comes from from its first bytes: ferrocd's
//! hello frame names the dialing member (net/src/peer/frame.rs), etcd's HTTP requests carry
//! `X-Server-From` (rafthttp). A connection from member S to member T carries traffic both
//! ways (ferrocd: S's raft frames and calls, T's answers; etcd: S's pipeline posts, and T's
//! messages streamed back to S), so a mode set for sender S on T's proxy acts on the link
//! S-T in both directions, and `Cluster` partitions two members by setting it on both
//! proxies. A connection whose sender is unknown (etcd's `/version` probes) gets the proxy's
//! own mode.

use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferrocd_net::peer::frame::{decode, Kind};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Bytes read from a socket at once: one chunk.
const CHUNK_BYTES: usize = 16 * 1024;
/// Chunks read but not yet delivered, per direction of a connection: the proxy's buffer
/// bound (16 × 16 KiB); past it, it stops reading.
const CHUNKS_IN_FLIGHT: usize = 16;
/// The most bytes read from a connection to learn its sender (a hello frame is 32, etcd's
/// request headers a few hundred); past it the sender stays unknown.
const MAX_SENDER_PREFIX_BYTES: usize = 8 * 1024;
/// Frame size limit while decoding a hello (its payload is 4 bytes).
const MAX_HELLO_FRAME_BYTES: usize = 1024;
/// How long dialing the member may take (it may be down: the connection is then closed).
const UPSTREAM_CONNECT_TIMEOUT_MS: u64 = 1_000;
/// Proxy threads only copy bytes.
const THREAD_STACK_BYTES: usize = 128 * 1024;
/// etcd's rafthttp header naming the sending member, in hex.
const ETCD_SENDER_HEADER: &str = "x-server-from:";

/// What happens to the bytes of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Pass,
    /// Held, both ways, until the mode changes; the connections stay open.
    Blackhole,
    /// Each chunk delivered `latency_ms` + 0..=`jitter_ms` after it was read, order kept.
    Delay {
        latency_ms: u64,
        jitter_ms: u64,
    },
    /// Each chunk resets its connection with probability 1 / `one_in_chunks`.
    Drop {
        one_in_chunks: u32,
    },
}

/// One proxy: a listening port, forwarding to `upstream`. Stops (every connection closed)
/// when dropped.
pub struct PeerProxy {
    port: u16,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

/// What the acceptor, every connection's threads and the owner share.
struct Shared {
    upstream: SocketAddr,
    rules: Mutex<Rules>,
    /// Notified on every rule change and on stop: held chunks look again.
    changed: Condvar,
    stopped: AtomicBool,
    /// Connections, to close those still open at stop (a connection's threads hold it; it
    /// is gone once they all ended).
    connections: Mutex<Vec<Weak<Connection>>>,
    accepted: AtomicU64,
    resets: AtomicU64,
    /// Every sender learnt from a connection's first bytes.
    senders: Mutex<BTreeSet<u64>>,
}

struct Rules {
    /// For connections whose sender has no mode of its own in `by_sender`.
    mode: Mode,
    by_sender: HashMap<u64, Mode>,
    /// Jitter and reset draws.
    rng: StdRng,
}

impl Rules {
    fn mode_for(&self, sender: Option<u64>) -> Mode {
        sender
            .and_then(|id| self.by_sender.get(&id).copied())
            .unwrap_or(self.mode)
    }
}

/// Two sockets: the member that dialed (`client`) and the member behind the proxy.
struct Connection {
    client: TcpStream,
    upstream: TcpStream,
    /// Set once its first bytes were read; `None` inside: not recognised.
    sender: OnceLock<Option<u64>>,
    closed: AtomicBool,
}

impl Connection {
    fn sender(&self) -> Option<u64> {
        self.sender.get().copied().flatten()
    }

    /// Shuts both sockets down, which wakes every thread blocked on them.
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        // Either socket may already be shut down by the other side: nothing to do then.
        let _ = self.client.shutdown(Shutdown::Both);
        let _ = self.upstream.shutdown(Shutdown::Both);
    }

    /// Closes the connection so that the final close sends a RST (SO_LINGER on, 0 s).
    fn reset(&self) {
        for socket in [&self.client, &self.upstream] {
            set_linger_zero(socket);
        }
        self.close();
    }
}

/// One chunk on its way, with the instant it was read.
struct Chunk {
    bytes: Vec<u8>,
    read_at: Instant,
}

/// What to do with the next chunk of a connection.
enum Verdict {
    /// Deliver it this long after it was read.
    Deliver(Duration),
    Reset,
    Closed,
}

impl PeerProxy {
    /// A proxy on a free port of 127.0.0.1 forwarding to `127.0.0.1:upstream_port`, in `Pass`
    /// mode; `seed` seeds its jitter and reset draws.
    pub fn start(upstream_port: u16, seed: u64) -> PeerProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy port");
        let port = listener.local_addr().expect("proxy address").port();
        let shared = Arc::new(Shared {
            upstream: SocketAddr::from(([127, 0, 0, 1], upstream_port)),
            rules: Mutex::new(Rules {
                mode: Mode::Pass,
                by_sender: HashMap::new(),
                rng: StdRng::seed_from_u64(seed),
            }),
            changed: Condvar::new(),
            stopped: AtomicBool::new(false),
            connections: Mutex::new(Vec::new()),
            accepted: AtomicU64::new(0),
            resets: AtomicU64::new(0),
            senders: Mutex::new(BTreeSet::new()),
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            spawn_named("peer-proxy-accept", move || accept_loop(&listener, &shared))
        };
        PeerProxy {
            port,
            shared,
            acceptor: Some(acceptor),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`: the peer URL a member behind this proxy advertises.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The mode of every connection whose sender has none of its own.
    pub fn set_mode(&self, mode: Mode) {
        self.update(|rules| rules.mode = mode);
    }

    /// The mode of the connections from member `sender` (both directions of the link).
    pub fn set_sender_mode(&self, sender: u64, mode: Mode) {
        self.update(|rules| {
            rules.by_sender.insert(sender, mode);
        });
    }

    /// Back to `Pass` for every connection; held bytes go on.
    pub fn heal(&self) {
        self.update(|rules| {
            rules.mode = Mode::Pass;
            rules.by_sender.clear();
        });
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// The members that dialed it so far, as their connections named them.
    pub fn senders(&self) -> BTreeSet<u64> {
        self.shared
            .senders
            .lock()
            .expect("proxy senders lock")
            .clone()
    }

    /// Connections reset by `Drop` so far.
    pub fn resets(&self) -> u64 {
        self.shared.resets.load(Ordering::SeqCst)
    }

    fn update(&self, change: impl FnOnce(&mut Rules)) {
        change(&mut self.shared.lock_rules());
        self.shared.changed.notify_all();
    }
}

impl Drop for PeerProxy {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        // Wakes the acceptor, blocked in accept(2); it sees `stopped` and returns.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(acceptor) = self.acceptor.take() {
            acceptor.join().expect("proxy acceptor");
        }
        let connections = std::mem::take(&mut *self.shared.lock_connections());
        for connection in connections.iter().filter_map(Weak::upgrade) {
            connection.close();
        }
        self.shared.changed.notify_all();
    }
}

impl Shared {
    fn lock_rules(&self) -> MutexGuard<'_, Rules> {
        self.rules.lock().expect("proxy rules lock")
    }

    /// Registers a new connection, forgetting those whose threads all ended.
    fn register(&self, connection: &Arc<Connection>) {
        let mut connections = self.lock_connections();
        connections.retain(|known| known.strong_count() > 0);
        connections.push(Arc::downgrade(connection));
    }

    fn lock_connections(&self) -> MutexGuard<'_, Vec<Weak<Connection>>> {
        self.connections.lock().expect("proxy connections lock")
    }

    /// Waits while the connection's mode holds its bytes; then says what to do with the next
    /// chunk.
    fn verdict(&self, connection: &Connection) -> Verdict {
        let mut rules = self.lock_rules();
        loop {
            if self.stopped.load(Ordering::SeqCst) || connection.closed.load(Ordering::SeqCst) {
                return Verdict::Closed;
            }
            match rules.mode_for(connection.sender()) {
                Mode::Pass => return Verdict::Deliver(Duration::ZERO),
                Mode::Blackhole => {
                    rules = self.changed.wait(rules).expect("proxy rules lock");
                }
                Mode::Delay {
                    latency_ms,
                    jitter_ms,
                } => {
                    let delay_ms = latency_ms + rules.rng.gen_range(0..=jitter_ms);
                    return Verdict::Deliver(Duration::from_millis(delay_ms));
                }
                Mode::Drop { one_in_chunks } => {
                    assert!(one_in_chunks > 0, "Drop needs one_in_chunks >= 1");
                    if rules.rng.gen_ratio(1, one_in_chunks) {
                        return Verdict::Reset;
                    }
                    return Verdict::Deliver(Duration::ZERO);
                }
            }
        }
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    for client in listener.incoming() {
        if shared.stopped.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else { continue };
        let timeout = Duration::from_millis(UPSTREAM_CONNECT_TIMEOUT_MS);
        // The member may be down (killed by the test): the dialer sees its connection closed,
        // as it would see it refused.
        let Ok(upstream) = TcpStream::connect_timeout(&shared.upstream, timeout) else {
            continue;
        };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        let connection = Arc::new(Connection {
            client,
            upstream,
            sender: OnceLock::new(),
            closed: AtomicBool::new(false),
        });
        shared.register(&connection);
        start_pumps(shared, &connection);
    }
}

/// Four threads per connection: for each direction one reads chunks into a bounded queue and
/// one delivers them, so a delay holds back no read (the link is pipelined) and a held
/// direction stops reading once the queue is full.
fn start_pumps(shared: &Arc<Shared>, connection: &Arc<Connection>) {
    let directions = [
        (&connection.client, &connection.upstream, true),
        (&connection.upstream, &connection.client, false),
    ];
    for (from, to, learns_sender) in directions {
        let from = from.try_clone().expect("clone a proxied socket");
        let to = to.try_clone().expect("clone a proxied socket");
        let (sender, receiver) = sync_channel(CHUNKS_IN_FLIGHT);
        let learner = learns_sender.then(|| Arc::clone(shared));
        let reader_connection = Arc::clone(connection);
        spawn_named("peer-proxy-read", move || {
            read_chunks(from, &sender, &reader_connection, learner.as_deref());
        });
        let (shared, connection) = (Arc::clone(shared), Arc::clone(connection));
        spawn_named("peer-proxy-write", move || {
            deliver_chunks(&receiver, to, &shared, &connection);
        });
    }
}

/// Reads until EOF or an error. The dialer's direction (`learner`: the proxy that records
/// it) first reads until its sender is known and sends that prefix as its first chunk, so no
/// byte of it is delivered before the mode that applies to it is known.
fn read_chunks(
    mut from: TcpStream,
    queue: &SyncSender<Chunk>,
    connection: &Connection,
    learner: Option<&Shared>,
) {
    let mut pending = Vec::new();
    let mut buffer = vec![0; CHUNK_BYTES];
    loop {
        let read = match from.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        pending.extend_from_slice(&buffer[..read]);
        if let Some(shared) = learner.filter(|_| connection.sender.get().is_none()) {
            let Some(sender) = sender_of(&pending) else {
                continue;
            };
            connection.sender.set(sender).expect("sender set once");
            let mut senders = shared.senders.lock().expect("proxy senders lock");
            senders.extend(sender);
        }
        let chunk = Chunk {
            bytes: std::mem::take(&mut pending),
            read_at: Instant::now(),
        };
        if queue.send(chunk).is_err() {
            return; // The delivering side gave up on the connection.
        }
    }
    if !pending.is_empty() {
        let _ = queue.send(Chunk {
            bytes: pending,
            read_at: Instant::now(),
        });
    }
}

/// Delivers chunks as the mode says until the reader is done (then half-closes `to`, as the
/// dialer did) or the connection breaks (then closes it all).
fn deliver_chunks(
    queue: &Receiver<Chunk>,
    mut to: TcpStream,
    shared: &Shared,
    connection: &Connection,
) {
    let mut last_delivery = Instant::now();
    let complete = loop {
        let Ok(chunk) = queue.recv() else {
            break true;
        };
        let delay = match shared.verdict(connection) {
            Verdict::Deliver(delay) => delay,
            Verdict::Reset => {
                shared.resets.fetch_add(1, Ordering::SeqCst);
                connection.reset();
                break false;
            }
            Verdict::Closed => break false,
        };
        // Order is kept: a chunk never overtakes the one before it.
        let at = last_delivery.max(chunk.read_at + delay);
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
        last_delivery = at;
        if to.write_all(&chunk.bytes).is_err() {
            break false;
        }
    };
    if complete {
        let _ = to.shutdown(Shutdown::Write);
    } else {
        connection.close();
    }
}

/// The member a connection comes from, from its first bytes: `None` while more bytes are
/// needed, `Some(None)` when they name none.
fn sender_of(prefix: &[u8]) -> Option<Option<u64>> {
    match decode(prefix, MAX_HELLO_FRAME_BYTES) {
        Ok(Some((frame, _))) if frame.kind == Kind::Hello => return Some(Some(frame.from)),
        Ok(None) if !looks_like_http(prefix) => return None,
        _ => {}
    }
    if let Some(end) = find(prefix, b"\r\n\r\n") {
        return Some(etcd_sender(&prefix[..end]));
    }
    if prefix.len() >= MAX_SENDER_PREFIX_BYTES {
        return Some(None);
    }
    None
}

/// An HTTP request starts with its method in capitals; a ferrocd frame with its length
/// (small, so byte 3 is 0).
fn looks_like_http(prefix: &[u8]) -> bool {
    prefix.first().is_some_and(u8::is_ascii_uppercase)
}

/// The `X-Server-From` header of an etcd peer request's head, in hex.
fn etcd_sender(head: &[u8]) -> Option<u64> {
    let head = String::from_utf8_lossy(head);
    head.lines().find_map(|line| {
        let lower = line.to_ascii_lowercase();
        let value = lower.strip_prefix(ETCD_SENDER_HEADER)?;
        u64::from_str_radix(value.trim(), 16).ok()
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

fn set_linger_zero(socket: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let size = libc::socklen_t::try_from(std::mem::size_of::<libc::linger>()).expect("small");
    // SAFETY: setsockopt(2) on a socket this proxy owns, with a pointer to a live `linger`
    // and its size; the kernel only reads it. A socket the other side already closed may
    // refuse it: its close then is no reset, which changes nothing for the test.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::from_ref(&linger).cast(),
            size,
        )
    };
}

fn spawn_named(name: &str, body: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name(name.to_string())
        .stack_size(THREAD_STACK_BYTES)
        .spawn(body)
        .expect("spawn a proxy thread")
}
