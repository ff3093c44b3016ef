//! The peer transport between real sockets on 127.0.0.1: members are sets of glommio
//! executors (one per core) in threads, driven from the test through command channels.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_channel::Receiver;
use ferrocd_net::peer::frame::{encode, Kind, PROTOCOL_VERSION};
use ferrocd_net::peer::{
    join, CallError, Delivery, IncomingCall, PeerAddr, PeerConfig, PeerCore, PeerMesh, SendError,
};
use ferrocd_net::tls::{ListenUrl, PeerTls, TlsFiles};
use glommio::{ExecutorJoinHandle, LocalExecutorBuilder, Placement};

/// Bounds every wait so a broken transport fails the test instead of hanging it.
const WAIT: Duration = Duration::from_secs(10);

type Command = Box<dyn FnOnce(&mut PeerCore) + Send>;

struct Member {
    id: u64,
    mesh: Arc<PeerMesh>,
    commands: Vec<async_channel::Sender<Command>>,
    inboxes: Vec<Receiver<Delivery>>,
    calls: Vec<Receiver<IncomingCall>>,
    executors: Vec<ExecutorJoinHandle<()>>,
}

fn config(id: u64, cores: usize, addr: SocketAddr) -> PeerConfig {
    let mut config = PeerConfig::new(id, cores, addr);
    config.ping_interval_ms = 50;
    config.max_frame_bytes = 64 * 1024;
    config
}

impl Member {
    fn start(config: PeerConfig) -> Member {
        let id = config.member_id;
        let cores = config.cores;
        let mesh = PeerMesh::new(config).expect("bind peer port");
        let mut member = Member {
            id,
            mesh: mesh.clone(),
            commands: Vec::new(),
            inboxes: Vec::new(),
            calls: Vec::new(),
            executors: Vec::new(),
        };
        for core in 0..cores {
            let (command_tx, commands) = async_channel::unbounded::<Command>();
            let (inbox_tx, inbox_rx) = std::sync::mpsc::channel();
            let mesh = mesh.clone();
            let executor = LocalExecutorBuilder::new(Placement::Unbound)
                .name(&format!("peer-{id}-{core}"))
                .spawn(move || async move {
                    let mut peer = mesh.start_core(core).expect("start peer core");
                    let queues = (peer.inbox().clone(), peer.calls().clone());
                    inbox_tx.send(queues).unwrap();
                    while let Ok(command) = commands.recv().await {
                        command(&mut peer);
                    }
                })
                .expect("start executor");
            let (inbox, calls) = inbox_rx.recv_timeout(WAIT).expect("core started");
            member.inboxes.push(inbox);
            member.calls.push(calls);
            member.commands.push(command_tx);
            member.executors.push(executor);
        }
        member
    }

    fn addr(&self) -> SocketAddr {
        self.mesh.local_addr()
    }

    /// Runs `f` on `core`'s executor and returns its result.
    async fn on_core<T: Send + 'static>(
        &self,
        core: usize,
        f: impl FnOnce(&mut PeerCore) -> T + Send + 'static,
    ) -> T {
        let (tx, rx) = async_channel::bounded(1);
        let command: Command = Box::new(move |peer| {
            let _ = tx.try_send(f(peer));
        });
        self.commands[core]
            .send(command)
            .await
            .expect("core running");
        within("core command", rx.recv())
            .await
            .expect("core answered")
    }

    /// Starts a call from `core` to `to` on that core's executor; the answer arrives on the
    /// returned channel.
    async fn start_call(
        &self,
        core: usize,
        to: u64,
        payload: Vec<u8>,
        timeout_ms: u64,
    ) -> Receiver<Result<Vec<u8>, CallError>> {
        let (tx, rx) = async_channel::bounded(1);
        self.on_core(core, move |p| {
            let p = p.clone();
            glommio::spawn_local(async move {
                let _ = tx.send(p.call(to, payload, timeout_ms).await).await;
            })
            .detach();
        })
        .await;
        rx
    }

    async fn call(
        &self,
        core: usize,
        to: u64,
        payload: &[u8],
        timeout_ms: u64,
    ) -> Result<Vec<u8>, CallError> {
        let answer = self
            .start_call(core, to, payload.to_vec(), timeout_ms)
            .await;
        within("call", answer.recv()).await.expect("call finished")
    }

    async fn add_peer(&self, other: &Member) {
        self.add_peer_at(other.id, other.addr().into()).await;
    }

    /// `other` at its `https://` URL.
    async fn add_tls_peer(&self, other: &Member) {
        let addr = PeerAddr {
            addr: other.addr(),
            tls_host: Some("127.0.0.1".to_string()),
        };
        self.add_peer_at(other.id, addr).await;
    }

    async fn add_peer_at(&self, id: u64, addr: PeerAddr) {
        for core in 0..self.commands.len() {
            let addr = addr.clone();
            self.on_core(core, move |p| p.add_peer(id, addr)).await;
        }
    }

    /// Stops every core (closing its listener and connections) and waits for them.
    fn stop(self) {
        drop(self.commands);
        for executor in self.executors {
            executor.join().expect("executor ended cleanly");
        }
    }
}

async fn within<T>(what: &str, work: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, work)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {WAIT:?}"))
}

async fn receive(inbox: &Receiver<Delivery>) -> Delivery {
    within("delivery", inbox.recv()).await.expect("inbox open")
}

/// Polls `condition` (figures other threads update) until it holds, at most `WAIT`.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !condition() {
        assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn every_core_pair_exchanges_envelopes() {
    const CORES: usize = 2;
    let members: Vec<Member> = (1..=3)
        .map(|id| Member::start(config(id, CORES, localhost())))
        .collect();
    for a in &members {
        for b in members.iter().filter(|b| b.id != a.id) {
            a.add_peer(b).await;
        }
    }
    for a in &members {
        for core in 0..CORES {
            for b in members.iter().filter(|b| b.id != a.id) {
                let payload = format!("{}/{core}/{}", a.id, b.id).into_bytes();
                let to = b.id;
                a.on_core(core, move |p| p.send(to, payload)).await.unwrap();
            }
        }
    }
    for b in &members {
        for core in 0..CORES {
            let mut got: Vec<(u64, String)> = Vec::new();
            for _ in 0..members.len() - 1 {
                let d = receive(&b.inboxes[core]).await;
                got.push((d.from, String::from_utf8(d.payload).unwrap()));
            }
            got.sort();
            let want: Vec<(u64, String)> = members
                .iter()
                .filter(|a| a.id != b.id)
                .map(|a| (a.id, format!("{}/{core}/{}", a.id, b.id)))
                .collect();
            // Core c's inbox holds exactly what the peers' core c sent: no hop, no mixing.
            assert_eq!(got, want, "member {} core {core}", b.id);
            assert!(b.inboxes[core].is_empty());
        }
    }
    for a in &members {
        for b in members.iter().filter(|b| b.id != a.id) {
            let stats = a.mesh.stats().clone();
            let id = b.id;
            // A frame may arrive before its writer has counted it.
            eventually("frames counted and round trips measured", || {
                let c = stats.peer(id);
                c.sent_frames == CORES as u64 && c.rtt_count >= CORES as u64
            })
            .await;
            let counters = stats.peer(id);
            assert_eq!(counters.connected_cores, CORES);
            assert!(counters.sent_bytes > 0 && counters.received_bytes > 0);
            assert_eq!(counters.dropped_frames + counters.connection_failures, 0);
        }
    }
    for member in members {
        member.stop();
    }
}

async fn send_range(a: &Member, to: u64, seqs: std::ops::Range<u64>) {
    a.on_core(0, move |p| {
        for seq in seqs {
            p.send(to, seq.to_le_bytes().to_vec()).unwrap();
        }
    })
    .await;
}

async fn receive_seqs(inbox: &Receiver<Delivery>, count: usize) -> Vec<u64> {
    let mut seqs = Vec::new();
    for _ in 0..count {
        let d = receive(inbox).await;
        seqs.push(u64::from_le_bytes(d.payload.try_into().unwrap()));
    }
    seqs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn sends_resume_in_order_after_the_peer_restarts() {
    let a = Member::start(config(1, 1, localhost()));
    let b = Member::start(config(2, 1, localhost()));
    let b_addr = b.addr();
    a.add_peer(&b).await;
    send_range(&a, 2, 0..100).await;
    assert_eq!(
        receive_seqs(&b.inboxes[0], 100).await,
        (0..100).collect::<Vec<_>>()
    );
    let stats = a.mesh.stats().clone();
    eventually("connected", || stats.peer(2).connected_cores == 1).await;

    b.stop();
    eventually("disconnect noticed", || stats.peer(2).connected_cores == 0).await;
    // Queued while the peer is down: `send` does not wait for it.
    send_range(&a, 2, 100..200).await;
    let b = Member::start(config(2, 1, b_addr));
    let seqs = receive_seqs(&b.inboxes[0], 100).await;
    assert_eq!(seqs, (100..200).collect::<Vec<_>>());
    eventually("reconnected", || stats.peer(2).connected_cores == 1).await;
    assert!(stats.peer(2).connection_failures >= 1);
    assert_eq!(stats.peer(2).dropped_frames, 0);
    send_range(&a, 2, 200..201).await;
    assert_eq!(receive_seqs(&b.inboxes[0], 1).await, vec![200]);
    assert!(b.inboxes[0].is_empty(), "nothing delivered twice");
    a.stop();
    b.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_full_queue_drops_and_counts_without_blocking_other_peers() {
    let dead = {
        let listener = std::net::TcpListener::bind(localhost()).unwrap();
        listener.local_addr().unwrap()
    };
    let mut a_config = config(1, 1, localhost());
    a_config.peer_queue_limit_frames = 8;
    let a = Member::start(a_config);
    let c = Member::start(config(3, 1, localhost()));
    a.add_peer(&c).await;
    let outcomes = a
        .on_core(0, move |p| {
            p.add_peer(2, dead);
            let down: Vec<_> = (0..20).map(|_| p.send(2, vec![1; 16])).collect();
            let up = p.send(3, b"still flowing".to_vec());
            (down, up)
        })
        .await;
    let (down, up) = outcomes;
    assert!(down[..8].iter().all(|r| r.is_ok()), "{down:?}");
    assert!(
        down[8..].iter().all(|r| *r == Err(SendError::QueueFull)),
        "{down:?}"
    );
    assert_eq!(up, Ok(()));
    assert_eq!(receive(&c.inboxes[0]).await.payload, b"still flowing");
    assert_eq!(a.mesh.stats().peer(2).dropped_frames, 12);
    assert_eq!(a.mesh.stats().peer(2).connected_cores, 0);
    a.stop();
    c.stop();
}

/// Writes `bytes` to the peer port and waits for the server to close the connection.
fn assert_closed_after(addr: SocketAddr, bytes: &[u8]) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.write_all(bytes).unwrap();
    let mut buf = [0; 64];
    match stream.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("connection not closed: {other:?}"),
    }
}

fn hello(from: u64, to: u64) -> Vec<u8> {
    let mut bytes = Vec::new();
    encode(
        &mut bytes,
        Kind::Hello,
        0,
        from,
        to,
        &PROTOCOL_VERSION.to_le_bytes(),
    );
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn garbage_and_oversized_frames_close_only_their_connection() {
    let a = Member::start(config(1, 2, localhost()));
    let b = Member::start(config(2, 2, localhost()));
    a.add_peer(&b).await;
    a.on_core(1, |p| p.send(2, b"before".to_vec()))
        .await
        .unwrap();
    assert_eq!(receive(&b.inboxes[1]).await.payload, b"before");

    assert_closed_after(
        b.addr(),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n garbage garbage garbage",
    );
    assert_closed_after(b.addr(), &hello(9, 7)); // addressed to another member
    let max = 64 * 1024;
    let mut oversized = hello(9, 2);
    let mut frame = Vec::new();
    encode(&mut frame, Kind::Raft, 0, 9, 2, &vec![0; max + 1]);
    oversized.extend_from_slice(&frame[..64]);
    assert_closed_after(b.addr(), &oversized);

    let too_large = a.on_core(1, move |p| p.send(2, vec![0; max + 1])).await;
    assert_eq!(
        too_large,
        Err(SendError::TooLarge {
            payload_bytes: max + 1,
            max_bytes: max
        })
    );
    // The peers' own connection is untouched, and a frame of exactly the limit passes.
    a.on_core(1, move |p| p.send(2, vec![7; max]))
        .await
        .unwrap();
    assert_eq!(receive(&b.inboxes[1]).await.payload, vec![7; max]);
    assert_eq!(a.mesh.stats().peer(2).connection_failures, 0);
    a.stop();
    b.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn order_holds_and_nothing_repeats_when_a_small_queue_overflows() {
    const ROUNDS: u64 = 50;
    const PER_ROUND: u64 = 100;
    let mut a_config = config(1, 2, localhost());
    a_config.peer_queue_limit_frames = 64;
    let a = Member::start(a_config);
    let b = Member::start(config(2, 2, localhost()));
    a.add_peer(&b).await;
    for round in 0..ROUNDS {
        for core in 0..2 {
            a.on_core(core, move |p| {
                for seq in round * PER_ROUND..(round + 1) * PER_ROUND {
                    // Dropped when full: counted below.
                    let _ = p.send(2, seq.to_le_bytes().to_vec());
                }
            })
            .await;
        }
    }
    let stats = a.mesh.stats().clone();
    let total = 2 * ROUNDS * PER_ROUND;
    eventually("every frame written or dropped", || {
        let c = stats.peer(2);
        c.sent_frames + c.dropped_frames == total
    })
    .await;
    let counters = stats.peer(2);
    assert!(counters.dropped_frames > 0, "the small queue overflowed");
    // Every written frame arrives, each core's in the order sent (so none twice).
    let mut last: [Option<u64>; 2] = [None, None];
    for _ in 0..counters.sent_frames {
        let (core, d) = within(
            "delivery",
            futures_lite::future::or(async { (0, b.inboxes[0].recv().await.unwrap()) }, async {
                (1, b.inboxes[1].recv().await.unwrap())
            }),
        )
        .await;
        let seq = u64::from_le_bytes(d.payload.try_into().unwrap());
        assert!(
            last[core] < Some(seq),
            "core {core}: {seq} after {:?}",
            last[core]
        );
        last[core] = Some(seq);
    }
    assert!(b.inboxes.iter().all(|inbox| inbox.is_empty()));
    a.stop();
    b.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_silent_peer_is_dropped_and_redialled_after_a_backoff() {
    // A "peer" that accepts and reads but never answers a ping.
    let silent = std::net::TcpListener::bind(localhost()).unwrap();
    let mut a_config = config(1, 1, localhost());
    a_config.silence_timeout_ms = 200;
    a_config.backoff_min_ms = 500;
    let a = Member::start(a_config);
    let silent_addr = silent.local_addr().unwrap();
    a.on_core(0, move |p| p.add_peer(2, silent_addr)).await;
    let redial = tokio::task::spawn_blocking(move || {
        let (mut first, _) = silent.accept().unwrap();
        first.set_read_timeout(Some(WAIT)).unwrap();
        let mut hello = [0; 32];
        first.read_exact(&mut hello).unwrap();
        let mut rest = Vec::new();
        // Ends when the dialer gives up on the silence (pings arrive until then).
        first.read_to_end(&mut rest).unwrap();
        let closed = Instant::now();
        let (mut second, _) = silent.accept().unwrap();
        let redialled_after = closed.elapsed();
        second.set_read_timeout(Some(WAIT)).unwrap();
        second.read_exact(&mut hello).unwrap();
        (redialled_after, hello)
    });
    let (redialled_after, hello) = within("redial", redial).await.unwrap();
    assert_eq!(hello[8], Kind::Hello as u8);
    // Not before the first backoff step (500 ms). A lower bound with slack for how late this
    // side saw the close, so scheduling delays cannot fail it.
    assert!(
        redialled_after >= Duration::from_millis(250),
        "{redialled_after:?}"
    );
    assert!(a.mesh.stats().peer(2).connection_failures >= 1);
    a.stop();
}

async fn incoming(calls: &Receiver<IncomingCall>) -> IncomingCall {
    within("incoming call", calls.recv())
        .await
        .expect("calls open")
}

/// A long call timeout: the tests that expect an answer or a lost connection must not get
/// `Timeout` instead.
const LONG_MS: u64 = 60_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_call_is_answered_on_the_same_core() {
    let a = Member::start(config(1, 2, localhost()));
    let b = Member::start(config(2, 2, localhost()));
    a.add_peer(&b).await;
    for core in 0..2 {
        let answer = a.start_call(core, 2, format!("ping {core}").into_bytes(), LONG_MS);
        let (answer, call) = tokio::join!(answer, incoming(&b.calls[core]));
        assert_eq!(
            (call.from, call.payload.as_slice()),
            (1, format!("ping {core}").as_bytes())
        );
        call.reply.send(format!("pong {core}").as_bytes());
        let got = within("answer", answer.recv()).await.unwrap();
        assert_eq!(got, Ok(format!("pong {core}").into_bytes()));
    }
    assert!(b.calls.iter().all(|c| c.is_empty()));
    // A call the callee drops unanswered fails at once, not at its timeout.
    let answer = a.start_call(0, 2, b"drop me".to_vec(), LONG_MS);
    let (answer, call) = tokio::join!(answer, incoming(&b.calls[0]));
    drop(call);
    let got = within("answer", answer.recv()).await.unwrap();
    assert_eq!(got, Err(CallError::NotAnswered));
    assert_eq!(
        a.call(0, 9, b"x", LONG_MS).await,
        Err(CallError::UnknownPeer(9))
    );
    a.stop();
    b.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn an_unanswered_call_times_out_and_its_late_answer_is_dropped() {
    let a = Member::start(config(1, 1, localhost()));
    let b = Member::start(config(2, 1, localhost()));
    a.add_peer(&b).await;
    let started = Instant::now();
    let answer = a.start_call(0, 2, b"first".to_vec(), 300);
    let (answer, first) = tokio::join!(answer, incoming(&b.calls[0]));
    let got = within("answer", answer.recv()).await.unwrap();
    assert_eq!(got, Err(CallError::Timeout));
    assert!(started.elapsed() >= Duration::from_millis(300));
    // Answered too late: the next call must get its own answer, not this one.
    first.reply.send(b"late");
    let answer = a.start_call(0, 2, b"second".to_vec(), LONG_MS);
    let (answer, second) = tokio::join!(answer, incoming(&b.calls[0]));
    assert_eq!(second.payload, b"second");
    second.reply.send(b"on time");
    let got = within("answer", answer.recv()).await.unwrap();
    assert_eq!(got, Ok(b"on time".to_vec()));
    a.stop();
    b.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn concurrent_calls_get_their_own_answers() {
    const CALLS: u64 = 300;
    let a = Member::start(config(1, 1, localhost()));
    let b = Member::start(config(2, 1, localhost()));
    a.add_peer(&b).await;
    let mut answers = Vec::new();
    for n in 0..CALLS {
        answers.push((
            n,
            a.start_call(0, 2, n.to_le_bytes().to_vec(), LONG_MS).await,
        ));
    }
    let mut calls = Vec::new();
    for _ in 0..CALLS {
        calls.push(incoming(&b.calls[0]).await);
    }
    // Answered in an order unlike the one they were made in.
    calls.reverse();
    calls.sort_by_key(|c| c.payload[0] % 7);
    for call in calls {
        let n = u64::from_le_bytes(call.payload.as_slice().try_into().unwrap());
        call.reply.send(&(n * 3).to_le_bytes());
    }
    for (n, answer) in answers {
        let got = within("answer", answer.recv()).await.unwrap().unwrap();
        assert_eq!(u64::from_le_bytes(got.try_into().unwrap()), n * 3);
    }
    a.stop();
    b.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_call_on_a_connection_that_breaks_fails_without_waiting_for_its_timeout() {
    let a = Member::start(config(1, 1, localhost()));
    let b = Member::start(config(2, 1, localhost()));
    a.add_peer(&b).await;
    let started = Instant::now();
    let answer = a.start_call(0, 2, b"doomed".to_vec(), LONG_MS);
    let (answer, call) = tokio::join!(answer, incoming(&b.calls[0]));
    b.stop();
    let got = within("answer", answer.recv()).await.unwrap();
    assert_eq!(got, Err(CallError::ConnectionLost));
    assert!(started.elapsed() < Duration::from_millis(LONG_MS));
    // The callee's answer has nowhere to go; giving it must not panic.
    call.reply.send(b"too late");
    // A call to a peer that is down times out (it waits in the queue for a connection).
    assert_eq!(a.call(0, 2, b"x", 200).await, Err(CallError::Timeout));
    a.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_full_call_queue_refuses_instead_of_stalling_raft_frames() {
    let a = Member::start(config(1, 1, localhost()));
    let mut b_config = config(2, 1, localhost());
    b_config.calls_limit = 1;
    let b = Member::start(b_config);
    a.add_peer(&b).await;
    let held = a.start_call(0, 2, b"held".to_vec(), LONG_MS).await;
    let refused = a.call(0, 2, b"refused", LONG_MS).await;
    assert_eq!(refused, Err(CallError::Busy));
    a.on_core(0, |p| p.send(2, b"raft".to_vec())).await.unwrap();
    assert_eq!(receive(&b.inboxes[0]).await.payload, b"raft");
    incoming(&b.calls[0]).await.reply.send(b"done");
    assert_eq!(
        within("answer", held.recv()).await.unwrap(),
        Ok(b"done".to_vec())
    );
    a.stop();
    b.stop();
}

/// A certificate authority for the peer TLS test: signs one certificate for 127.0.0.1 per
/// member, written as PEM files.
struct TestCa {
    key: rcgen::KeyPair,
    cert: rcgen::Certificate,
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        TestCa { key, cert }
    }

    /// A member's peer TLS flags in `dir`: its certificate signed by this CA, trusting `trusted`.
    fn peer_files(&self, dir: &std::path::Path, name: &str, trusted: &TestCa) -> TlsFiles {
        let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        let write = |file: String, pem: String| {
            let path = dir.join(file);
            std::fs::write(&path, pem).unwrap();
            Some(path)
        };
        TlsFiles {
            cert_file: write(format!("{name}.pem"), cert.pem()),
            key_file: write(format!("{name}.key"), key.serialize_pem()),
            trusted_ca_file: write(format!("{name}-ca.pem"), trusted.cert.pem()),
            client_cert_auth: true,
            auto_tls: false,
        }
    }
}

/// A member's peer TLS (an `https://` peer URL) from `files`.
fn peer_tls(files: &TlsFiles, dir: &std::path::Path) -> PeerTls {
    let url = ListenUrl::parse("https://127.0.0.1:0").unwrap();
    let tls = PeerTls::for_peers(files, &[url], dir).expect("peer TLS from the files");
    tls.expect("an https URL has TLS")
}

fn tls_config(id: u64, files: &TlsFiles, dir: &std::path::Path) -> PeerConfig {
    let mut config = config(id, 1, localhost());
    config.tls = Some(peer_tls(files, dir));
    config
}

/// Peer TLS: members whose certificates the trusted CA signed exchange frames over TLS; a
/// member with a certificate of another CA gets no frame through in either direction (each
/// side refuses the other's certificate; the failed connections are counted).
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn peer_tls_admits_only_certificates_of_the_trusted_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, rogue_ca) = (TestCa::new("cluster ca"), TestCa::new("rogue ca"));
    let a = Member::start(tls_config(
        1,
        &ca.peer_files(dir.path(), "a", &ca),
        dir.path(),
    ));
    let b = Member::start(tls_config(
        2,
        &ca.peer_files(dir.path(), "b", &ca),
        dir.path(),
    ));
    let rogue_files = rogue_ca.peer_files(dir.path(), "m", &rogue_ca);
    let m = Member::start(tls_config(3, &rogue_files, dir.path()));
    for (from, to) in [(&a, &b), (&b, &a), (&a, &m), (&m, &a)] {
        from.add_tls_peer(to).await;
    }
    for (from, to) in [(&a, &b), (&b, &a), (&a, &m), (&m, &a)] {
        let (payload, to_id) = (format!("{}->{}", from.id, to.id).into_bytes(), to.id);
        from.on_core(0, move |p| p.send(to_id, payload))
            .await
            .unwrap();
    }
    assert_eq!(receive(&b.inboxes[0]).await.payload, b"1->2");
    assert_eq!(receive(&a.inboxes[0]).await.payload, b"2->1");
    // Several refused connections each way (the dialer retries with backoff).
    let (a_stats, m_stats) = (a.mesh.stats().clone(), m.mesh.stats().clone());
    eventually("refused TLS connections counted", || {
        a_stats.peer(3).connection_failures >= 2 && m_stats.peer(1).connection_failures >= 2
    })
    .await;
    assert!(m.inboxes[0].is_empty(), "nothing reached the rogue member");
    assert!(a.inboxes[0].is_empty(), "nothing from the rogue member");
    assert_eq!(
        a_stats.peer(3).connected_cores,
        0,
        "no TLS link to the rogue member"
    );
    assert_eq!(
        a_stats.peer(2).connection_failures,
        0,
        "the trusted link held"
    );
    for member in [a, b, m] {
        member.stop();
    }
}

/// A member removed while its connection is open hears it at its next ping, and each new
/// connection of a removed member is refused before any of its frames is delivered; the
/// member acts on it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_removed_member_is_told_at_its_next_ping_and_on_every_new_connection() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
    let a = Member::start(config(1, 1, localhost()));
    let b = Member::start(config(2, 1, localhost()));
    let (removed, told) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
    );
    let b_removed = removed.clone();
    a.mesh
        .watch_removals(move |id| id == 2 && b_removed.load(SeqCst), || {});
    let b_told = told.clone();
    b.mesh.watch_removals(
        |_| false,
        move || {
            b_told.fetch_add(1, SeqCst);
        },
    );
    b.add_peer(&a).await;
    send_range(&b, 1, 0..10).await;
    assert_eq!(
        receive_seqs(&a.inboxes[0], 10).await,
        (0..10).collect::<Vec<_>>()
    );
    assert_eq!(told.load(SeqCst), 0);

    removed.store(true, SeqCst);
    eventually("told at the next ping", || told.load(SeqCst) == 1).await;
    let stats = b.mesh.stats().clone();
    send_range(&b, 1, 10..20).await;
    // Two more connections: the frames went out on one of them, refused at its start.
    let failures = stats.peer(1).connection_failures;
    eventually("dialled again and refused", || {
        stats.peer(1).connection_failures >= failures + 2
    })
    .await;
    assert!(
        a.inboxes[0].is_empty(),
        "nothing of a removed member delivered"
    );
    assert_eq!(told.load(SeqCst), 1, "acted on once");
    a.stop();
    b.stop();
}

/// A joining member's membership question to a TLS peer port goes over TLS with its peer
/// certificate: answered to a holder of a certificate of the trusted CA; a certificate of
/// another CA, or the question in plain text, gets no answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_membership_question_to_a_tls_peer_port_goes_over_tls() {
    const ASK_TIMEOUT: Duration = Duration::from_millis(1_000);
    const ANSWER_MAX_BYTES: usize = 1024;
    let dir = tempfile::tempdir().unwrap();
    let (ca, rogue_ca) = (TestCa::new("cluster ca"), TestCa::new("rogue ca"));
    let a = Member::start(tls_config(
        1,
        &ca.peer_files(dir.path(), "a", &ca),
        dir.path(),
    ));
    a.mesh.answer_joins(|| b"the members".to_vec());
    let tls_addr = PeerAddr {
        addr: a.addr(),
        tls_host: Some("127.0.0.1".to_string()),
    };
    let plain_addr = PeerAddr::from(a.addr());
    let trusted = peer_tls(&ca.peer_files(dir.path(), "j", &ca), dir.path());
    let rogue = peer_tls(&rogue_ca.peer_files(dir.path(), "m", &rogue_ca), dir.path());
    let answers = tokio::task::spawn_blocking(move || {
        let ask = |addr: &PeerAddr, tls| join::ask(addr, tls, ASK_TIMEOUT, ANSWER_MAX_BYTES);
        [
            ask(&tls_addr, Some(&trusted)),
            ask(&tls_addr, Some(&rogue)),
            ask(&plain_addr, None),
        ]
    });
    let [trusted, rogue, plain] = within("the questions", answers).await.unwrap();
    assert_eq!(trusted.expect("answered over TLS"), b"the members");
    assert!(rogue.is_err(), "another CA's certificate: {rogue:?}");
    assert!(plain.is_err(), "plain text to a TLS port: {plain:?}");
    a.stop();
}
