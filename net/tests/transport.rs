//! End-to-end tests of the glommio/hyper transport with real clients: the `etcd-client`
//! crate (tonic over tokio) for gRPC and raw HTTP/1.1 over `std::net::TcpStream`.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use ferrocd_api::etcdserverpb::kv_server::{Kv, KvServer};
use ferrocd_api::etcdserverpb::{RangeRequest, RangeResponse, ResponseHeader};
use ferrocd_api::mvccpb::KeyValue;
use ferrocd_net::http::{
    health_handler, version_handler, version_json, Health, PATH_HEALTH, PATH_VERSION,
};
use ferrocd_net::transport::{bind, serve, Routes, ServeOutcome, ServerConfig};
use glommio::{ExecutorJoinHandle, LocalExecutorBuilder};
use tonic::{Code, Request, Response, Status};

/// Bounds every client call so a broken server fails the test instead of hanging it.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The key whose Range blocks until the test releases it (to hold a request in flight).
const BLOCKING_KEY: &[u8] = b"wait";

/// A KV service that answers every Range with one fixed key-value and a header naming the
/// member (so tests can tell which core served them). Other KV methods are the generated
/// UNIMPLEMENTED stubs.
struct FixedKv {
    member_id: u64,
    /// Told when a Range on [`BLOCKING_KEY`] has arrived.
    arrived: async_channel::Sender<()>,
    /// A Range on [`BLOCKING_KEY`] answers once this yields (or is closed).
    release: async_channel::Receiver<()>,
}

#[tonic::async_trait]
impl Kv for FixedKv {
    async fn range(
        &self,
        request: Request<RangeRequest>,
    ) -> Result<Response<RangeResponse>, Status> {
        let key = request.into_inner().key;
        if key == BLOCKING_KEY {
            self.arrived
                .send(())
                .await
                .expect("test listens for arrivals");
            let _ = self.release.recv().await;
        }
        Ok(Response::new(RangeResponse {
            header: Some(ResponseHeader {
                cluster_id: 1,
                member_id: self.member_id,
                revision: 42,
                raft_term: 3,
            }),
            kvs: vec![KeyValue {
                key,
                create_revision: 5,
                mod_revision: 42,
                version: 2,
                value: b"bar".to_vec(),
                lease: 0,
            }],
            more: false,
            count: 1,
        }))
    }
}

/// One glommio executor thread serving [`FixedKv`], `/health` and `/version`.
struct TestServer {
    port: u16,
    shutdown: async_channel::Sender<()>,
    arrived: async_channel::Receiver<()>,
    release: async_channel::Sender<()>,
    executor: ExecutorJoinHandle<ServeOutcome>,
}

impl TestServer {
    /// Serves on 127.0.0.1:`port` (0: any free port). When shutdown begins the server
    /// releases blocked Ranges if `release_on_shutdown`, so they finish *during* the drain.
    fn start(
        port: u16,
        member_id: u64,
        config: ServerConfig,
        release_on_shutdown: bool,
    ) -> TestServer {
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        let (shutdown, shutdown_rx) = async_channel::bounded::<()>(1);
        let (arrived_tx, arrived) = async_channel::unbounded();
        let (release, release_rx) = async_channel::unbounded();
        let release_at_shutdown = release.clone();
        let executor = LocalExecutorBuilder::default()
            .name(&format!("serve-{member_id}"))
            .spawn(move || async move {
                let listener = bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).expect("bind");
                port_tx
                    .send(listener.local_addr().expect("local addr").port())
                    .expect("test waits for the port");
                let kv = FixedKv {
                    member_id,
                    arrived: arrived_tx,
                    release: release_rx,
                };
                let routes = Routes::new()
                    .add_grpc(KvServer::new(kv))
                    .add_http(PATH_HEALTH, health_handler(|_query| async { Health::ok() }))
                    .add_http(PATH_VERSION, version_handler());
                let shutdown = async move {
                    let _ = shutdown_rx.recv().await;
                    if release_on_shutdown {
                        release_at_shutdown.close();
                    }
                };
                serve(listener, routes, &config, shutdown).await
            })
            .expect("start executor");
        let port = port_rx.recv().expect("server reports its port");
        TestServer {
            port,
            shutdown,
            arrived,
            release,
            executor,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts shutdown and waits for `serve` to return.
    fn stop(self) -> ServeOutcome {
        self.shutdown.send_blocking(()).expect("server is running");
        self.executor.join().expect("executor thread")
    }
}

/// Clients run on a worker thread so they keep answering the server (HTTP/2 PINGs, GOAWAY)
/// while the test thread blocks on the server.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

async fn connect(endpoint: &str) -> etcd_client::Client {
    tokio::time::timeout(CALL_TIMEOUT, etcd_client::Client::connect([endpoint], None))
        .await
        .expect("connect in time")
        .expect("connect")
}

async fn get(
    client: &mut etcd_client::Client,
    key: &[u8],
) -> Result<etcd_client::GetResponse, etcd_client::Error> {
    tokio::time::timeout(CALL_TIMEOUT, client.get(key, None))
        .await
        .expect("get in time")
}

fn grpc_code<T: std::fmt::Debug>(result: Result<T, etcd_client::Error>) -> Code {
    match result {
        Err(etcd_client::Error::GRpcStatus(status)) => status.code(),
        other => panic!("expected a gRPC status, got {other:?}"),
    }
}

/// A raw HTTP/1.1 exchange: returns the status line, the lower-cased headers and the body.
fn http1(port: u16, method: &str, target: &str) -> (String, String, String) {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(CALL_TIMEOUT))
        .expect("read timeout");
    let request =
        format!("{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).expect("send request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .expect("header/body separator");
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_string(), headers.to_lowercase(), body.to_string())
}

#[test]
fn etcd_client_get_is_served() {
    let server = TestServer::start(0, 7, ServerConfig::default(), false);
    runtime().block_on(async {
        let mut client = connect(&server.endpoint()).await;
        let response = get(&mut client, b"foo").await.expect("get");
        let header = response.header().expect("header");
        assert_eq!(
            (
                header.cluster_id(),
                header.member_id(),
                header.revision(),
                header.raft_term()
            ),
            (1, 7, 42, 3)
        );
        let kvs = response.kvs();
        assert_eq!(kvs.len(), 1);
        assert_eq!(
            (kvs[0].key(), kvs[0].value(), kvs[0].mod_revision()),
            (&b"foo"[..], &b"bar"[..], 42)
        );
    });
    assert_eq!(
        server.stop(),
        ServeOutcome {
            forced_connections: 0
        }
    );
}

#[test]
fn unregistered_service_and_unwritten_method_are_unimplemented() {
    let server = TestServer::start(0, 7, ServerConfig::default(), false);
    runtime().block_on(async {
        let mut client = connect(&server.endpoint()).await;
        // Lease is not registered: the dispatcher answers.
        let lease = tokio::time::timeout(CALL_TIMEOUT, client.lease_grant(10, None))
            .await
            .expect("in time");
        assert_eq!(grpc_code(lease), Code::Unimplemented);
        // KV is registered but FixedKv does not write Compact: the generated stub answers.
        let compact = tokio::time::timeout(CALL_TIMEOUT, client.compact(1, None))
            .await
            .expect("in time");
        assert_eq!(grpc_code(compact), Code::Unimplemented);
        // The connection is still good afterwards.
        assert!(get(&mut client, b"foo").await.is_ok());
    });
    server.stop();
}

#[test]
fn health_version_and_unknown_paths_over_http1() {
    let server = TestServer::start(0, 7, ServerConfig::default(), false);

    let (status, headers, body) = http1(server.port, "GET", "/health");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        headers.contains("content-type: text/plain; charset=utf-8"),
        "{headers}"
    );
    assert_eq!(body, r#"{"health":"true","reason":""}"#);

    let (status, headers, body) = http1(server.port, "GET", "/version");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        headers.contains("content-type: application/json"),
        "{headers}"
    );
    assert_eq!(body, version_json());
    assert_eq!(body, r#"{"etcdserver":"3.5.0","etcdcluster":"3.5.0"}"#);

    let (status, headers, body) = http1(server.port, "POST", "/health");
    assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
    assert!(headers.contains("allow: get"), "{headers}");
    assert_eq!(body, "Method Not Allowed\n");

    let (status, _, body) = http1(server.port, "GET", "/no/such/path");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    assert_eq!(body, "404 page not found\n");

    server.stop();
}

#[test]
fn two_executors_share_one_port() {
    let first = TestServer::start(0, 1, ServerConfig::default(), false);
    let second = TestServer::start(first.port, 2, ServerConfig::default(), false);
    assert_eq!(first.port, second.port);
    let endpoint = first.endpoint();
    let runtime = runtime();

    // The kernel spreads new connections over both sockets by a hash of the 4-tuple: with
    // fresh client ports, 64 connections all landing on one core has probability 2^-63.
    let mut members_seen = std::collections::BTreeSet::new();
    runtime.block_on(async {
        for _ in 0..64 {
            let mut client = connect(&endpoint).await;
            let response = get(&mut client, b"k").await.expect("get");
            members_seen.insert(response.header().expect("header").member_id());
            if members_seen.len() == 2 {
                break;
            }
        }
    });
    assert_eq!(members_seen.into_iter().collect::<Vec<_>>(), vec![1, 2]);

    // Once one core has stopped, the other takes every new connection.
    first.stop();
    runtime.block_on(async {
        for _ in 0..8 {
            let mut client = connect(&endpoint).await;
            let response = get(&mut client, b"k")
                .await
                .expect("get after one core stopped");
            assert_eq!(response.header().expect("header").member_id(), 2);
        }
    });
    second.stop();
}

#[test]
fn shutdown_stops_accepting_and_lets_requests_finish() {
    let server = TestServer::start(0, 7, ServerConfig::default(), true);
    let endpoint = server.endpoint();
    let port = server.port;
    let arrived = server.arrived.clone();
    let runtime = runtime();
    let in_flight = runtime.spawn(async move {
        let mut client = connect(&endpoint).await;
        get(&mut client, BLOCKING_KEY).await
    });
    runtime
        .block_on(arrived.recv())
        .expect("request reached the server");

    // The blocked Range is released only once shutdown has begun, so it completes during
    // the drain, and the server waits for it.
    assert_eq!(
        server.stop(),
        ServeOutcome {
            forced_connections: 0
        }
    );
    let response = runtime
        .block_on(in_flight)
        .expect("client task")
        .expect("in-flight get succeeds");
    assert_eq!(response.kvs()[0].value(), b"bar");

    let refused =
        std::net::TcpStream::connect(("127.0.0.1", port)).expect_err("listener is closed");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
}

#[test]
fn drain_timeout_closes_stuck_connections() {
    let config = ServerConfig {
        drain_timeout_ms: 100,
        ..ServerConfig::default()
    };
    let server = TestServer::start(0, 7, config, false);
    let endpoint = server.endpoint();
    let arrived = server.arrived.clone();
    let _release = server.release.clone(); // Kept open: the request never finishes by itself.
    let runtime = runtime();
    let stuck = runtime.spawn(async move {
        let mut client = connect(&endpoint).await;
        get(&mut client, BLOCKING_KEY).await
    });
    runtime
        .block_on(arrived.recv())
        .expect("request reached the server");

    assert_eq!(
        server.stop(),
        ServeOutcome {
            forced_connections: 1
        }
    );
    assert!(runtime.block_on(stuck).expect("client task").is_err());
}
