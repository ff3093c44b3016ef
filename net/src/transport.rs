//! Serves gRPC (tonic-generated services) and plain HTTP on one port with hyper 1 on a
//! glommio executor, one listener per core.
//!
//! Every core calls [`serve`] with its own [`Listener`] bound to the same address
//! (`SO_REUSEPORT`, so the kernel spreads connections over the cores). A
//! connection stays on the core that accepted it: hyper's connection future, the HTTP/2
//! stream tasks it spawns and its timers all run on that executor, which is why the
//! executor and timer below may use core-local (`!Send`) glommio primitives.
//!
//! Like etcd, HTTP/1.1 and HTTP/2 share the port (hyper-util's auto builder reads the
//! connection preface). Requests with a gRPC content type go to the service named in the
//! path (`/etcdserverpb.KV/Range` -> `etcdserverpb.KV`); others go to the HTTP handlers.
//!
//! A listener configured with TLS ([`ServerConfig::tls`]) runs the handshake first, in the
//! connection's own task, then serves the same way on the encrypted stream (see `tls.rs`).

use ferrocd_raft::notify::wait_until;
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::{poll_fn, ready, Future};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use ::http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use ::http::{Request, Response};
use futures::future::Map;
use futures::FutureExt;
use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::{TcpListener, TcpStream};
use hyper::body::Incoming;
use hyper::rt::{ReadBufCursor, Sleep};
use hyper_util::server::conn::auto;
use send_wrapper::SendWrapper;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::Status;
use tower_service::Service;

use crate::auth::TLS_COMMON_NAME_METADATA_KEY;
use crate::http::{with_access_control, HttpHandler, ResponseFuture};
use crate::metrics::{grpc_status, CountedBody, GrpcMetrics};
use crate::tls::ServerTls;

/// etcd's `--max-request-bytes` default: the largest request a client may send.
pub const MAX_REQUEST_BYTES_DEFAULT: usize = 3 * 512 * 1024;
/// What etcd adds to `--max-request-bytes` for its gRPC receive limit (`grpcOverheadBytes`).
pub const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

/// The gRPC message size limit etcd derives from `--max-request-bytes`. Set it on every
/// tonic server with `max_decoding_message_size` (tonic's own default is 4 MiB).
pub const fn max_grpc_message_bytes(max_request_bytes: usize) -> usize {
    max_request_bytes + GRPC_OVERHEAD_BYTES
}

/// Connection settings. The defaults follow etcd's server defaults where etcd has one.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// HTTP/2 streams one connection may have open. etcd's default is `u32::MAX`; we bound
    /// it because each stream costs a task and buffers. etcd clients multiplex all watches
    /// (and all keep-alives) of a client on one stream each, and benchmark tools open one
    /// stream per concurrent request, so this is far above what they use.
    pub max_concurrent_streams: u32,
    /// HTTP/2 PING interval on an idle connection (etcd `--grpc-keepalive-interval`, 2 h).
    pub keepalive_interval_ms: u64,
    /// Close the connection when a PING is not answered within this (etcd
    /// `--grpc-keepalive-timeout`, 20 s).
    pub keepalive_timeout_ms: u64,
    /// Largest HTTP/2 frame we accept. A gRPC message spans frames, so this is not a message
    /// limit; 64 KiB cuts framing work for large values against the 16 KiB minimum.
    pub max_frame_size_bytes: u32,
    /// Initial HTTP/2 flow-control window per stream. Above the largest gRPC message
    /// ([`max_grpc_message_bytes`] of the default, 2 MiB) so a maximal request never waits
    /// for a WINDOW_UPDATE round trip.
    pub stream_window_bytes: u32,
    /// Initial HTTP/2 flow-control window per connection (what a peer may have in flight).
    pub connection_window_bytes: u32,
    /// After shutdown, how long open connections get to finish their requests before
    /// they are closed.
    pub drain_timeout_ms: u64,
    /// Serve TLS (an `https://` listen URL); `None` serves plain text.
    pub tls: Option<ServerTls>,
    /// Longest a TLS handshake may take: a client that connects and stalls is dropped then.
    pub tls_handshake_timeout_ms: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_concurrent_streams: 4096,
            keepalive_interval_ms: 2 * 60 * 60 * 1000,
            keepalive_timeout_ms: 20 * 1000,
            max_frame_size_bytes: 64 * 1024,
            stream_window_bytes: 4 * 1024 * 1024,
            connection_window_bytes: 16 * 1024 * 1024,
            drain_timeout_ms: 5 * 1000,
            tls: None,
            tls_handshake_timeout_ms: 10 * 1000,
        }
    }
}

/// How a [`serve`] call ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServeOutcome {
    /// Connections still open when the drain timeout expired, closed without finishing.
    pub forced_connections: usize,
}

/// Maps requests to services: gRPC by service name, HTTP by path.
///
/// HTTP patterns follow Go's `ServeMux` (which etcd uses): a pattern ending in `/` matches
/// every path below it, the longest such pattern wins, and an exact pattern beats both.
#[derive(Clone, Default)]
pub struct Routes {
    grpc: HashMap<&'static str, Arc<dyn GrpcEndpoint>>,
    http_exact: HashMap<String, HttpHandler>,
    /// Kept longest first so the first match is the most specific.
    http_prefix: Vec<(String, HttpHandler)>,
    /// Where gRPC calls are counted, and as which core.
    grpc_metrics: Option<(Arc<GrpcMetrics>, usize)>,
}

impl Routes {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a tonic-generated server (`KvServer::new(kv)`, ...), also wrapped in
    /// tonic's `InterceptedService`. Its methods are served at `/<package.Service>/<Method>`.
    pub fn add_grpc<S>(mut self, service: S) -> Self
    where
        S: NamedService
            + Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: 'static,
    {
        let previous = self.grpc.insert(S::NAME, Arc::new(service));
        assert!(
            previous.is_none(),
            "gRPC service {} registered twice",
            S::NAME
        );
        self
    }

    /// Counts every gRPC call in `metrics`, in the slot of `core` (the core serving these
    /// routes).
    pub fn count_grpc(mut self, metrics: Arc<GrpcMetrics>, core: usize) -> Self {
        self.grpc_metrics = Some((metrics, core));
        self
    }

    /// Registers an HTTP handler for `pattern` (see the type's docs for matching).
    pub fn add_http(mut self, pattern: &str, handler: HttpHandler) -> Self {
        assert!(
            pattern.starts_with('/'),
            "HTTP pattern {pattern:?} must start with '/'"
        );
        if pattern.ends_with('/') {
            assert!(
                self.http_prefix.iter().all(|(p, _)| p != pattern),
                "HTTP pattern {pattern} registered twice"
            );
            self.http_prefix.push((pattern.to_string(), handler));
            self.http_prefix
                .sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        } else {
            let previous = self.http_exact.insert(pattern.to_string(), handler);
            assert!(
                previous.is_none(),
                "HTTP pattern {pattern} registered twice"
            );
        }
        self
    }

    /// Routes one request. Unknown gRPC services answer gRPC UNIMPLEMENTED (as tonic's
    /// router does), unknown HTTP paths 404; HTTP responses carry etcd's CORS headers.
    pub fn dispatch(&self, req: Request<Incoming>) -> ResponseFuture {
        let path = req.uri().path().to_string();
        if !is_grpc(&req) {
            let handler = self.http_handler(req.uri().path()).cloned();
            return with_access_control(req, handler);
        }
        let response = match grpc_service_name(req.uri().path()).and_then(|n| self.grpc.get(n)) {
            Some(service) => service.call(req),
            None => {
                let status = Status::unimplemented(format!("unknown service {}", req.uri().path()));
                Box::pin(ready(status.into_http()))
            }
        };
        match &self.grpc_metrics {
            Some((metrics, core)) => counted(response, metrics.clone(), *core, path),
            None => response,
        }
    }

    fn http_handler(&self, path: &str) -> Option<&HttpHandler> {
        self.http_exact.get(path).or_else(|| {
            self.http_prefix
                .iter()
                .find(|(prefix, _)| path.starts_with(prefix.as_str()))
                .map(|(_, handler)| handler)
        })
    }
}

/// Counts a gRPC call as started now and as handled with the status its response ends with
/// (in the headers of a trailers-only response, else in the trailers).
fn counted(
    response: ResponseFuture,
    metrics: Arc<GrpcMetrics>,
    core: usize,
    path: String,
) -> ResponseFuture {
    metrics.started(core, &path);
    Box::pin(async move {
        let response = response.await;
        if let Some(code) = grpc_status(response.headers()) {
            metrics.handled(core, &path, code);
            return response;
        }
        let report = Box::new(move |code| metrics.handled(core, &path, code));
        response.map(|body| Body::new(CountedBody::new(body, report)))
    })
}

/// gRPC requests carry `application/grpc` or `application/grpc+<codec>`. (grpc-web is
/// not supported and falls through to HTTP.)
fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|ct| ct == "application/grpc" || ct.starts_with("application/grpc+"))
}

/// `/etcdserverpb.KV/Range` -> `etcdserverpb.KV`.
fn grpc_service_name(path: &str) -> Option<&str> {
    let (service, _method) = path.strip_prefix('/')?.split_once('/')?;
    Some(service)
}

/// A type-erased tonic server. Generated servers are cheap to clone (an `Arc` and a few
/// settings) and always ready, so each request gets its own clone.
trait GrpcEndpoint: Send + Sync {
    fn call(&self, req: Request<Incoming>) -> ResponseFuture;
}

impl<S> GrpcEndpoint for S
where
    S: Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: 'static,
{
    fn call(&self, req: Request<Incoming>) -> ResponseFuture {
        let mut service = self.clone();
        Box::pin(async move {
            // Honour the tower contract even though tonic's servers are always ready.
            let ready: Result<(), Infallible> =
                poll_fn(|cx| Service::poll_ready(&mut service, cx)).await;
            let Ok(()) = ready;
            let Ok(response) = Service::call(&mut service, req).await;
            response
        })
    }
}

/// Pending connections a listening socket queues before it accepts them (as glommio's
/// own `TcpListener::bind`).
const LISTEN_BACKLOG: i32 = 1024;

/// One core's listening socket. Every core binds the same address: `SO_REUSEPORT` makes the
/// kernel spread incoming connections over the cores' sockets.
pub struct Listener {
    accept: TcpListener,
    /// The same socket (a duplicate fd), kept to shut it down: see [`Listener::close`].
    control: socket2::Socket,
}

/// Binds a listener for the calling glommio executor (it registers with its reactor).
pub fn bind(addr: SocketAddr) -> io::Result<Listener> {
    bind_socket(addr).and_then(Listener::register)
}

/// Binds and listens on `addr` with the options of [`bind`], on any thread; the calling
/// core turns it into its [`Listener`] with [`Listener::register`]. Binding every core's
/// socket up front lets port 0 resolve once for all cores.
pub fn bind_socket(addr: SocketAddr) -> io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    // SO_REUSEADDR as Go (and so etcd) sets it: a restart binds even while connections of a
    // killed predecessor linger on the port.
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket)
}

impl Listener {
    /// Registers a socket from [`bind_socket`] with the calling glommio executor.
    pub fn register(socket: socket2::Socket) -> io::Result<Listener> {
        let control = socket.try_clone()?;
        // SAFETY: `into_raw_fd` hands over sole ownership of a valid listening socket fd.
        let accept = unsafe { TcpListener::from_raw_fd(socket.into_raw_fd()) };
        Ok(Listener { accept, control })
    }

    /// Accepts one connection on the calling executor.
    pub(crate) async fn accept(&self) -> io::Result<TcpStream> {
        self.accept.accept().await.map_err(io::Error::from)
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.accept.local_addr().map_err(io::Error::from)
    }

    /// Stops listening at once. Closing the fd is not enough: glommio's abandoned io_uring
    /// accept still references the socket, which then stays in the `SO_REUSEPORT` group
    /// and is handed new connections that nobody accepts (they get reset). A read shutdown
    /// takes a listening socket out of the group and fails that accept.
    pub(crate) fn close(&self) {
        // Only fails if the socket is no longer listening, which is what we want anyway.
        let _ = self.control.shutdown(std::net::Shutdown::Read);
    }
}

/// Accepts connections on `listener` and serves them with `routes` until `shutdown`
/// resolves; then stops accepting, asks open connections to finish (HTTP/2 GOAWAY, HTTP/1
/// close after the current response) and waits up to `config.drain_timeout_ms` for them
/// before closing the rest. Must run on a glommio executor.
pub async fn serve(
    listener: Listener,
    routes: Routes,
    config: &ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> ServeOutcome {
    let routes = Rc::new(routes);
    let builder = Rc::new(connection_builder(config));
    let state = Rc::new(ShutdownState::default());
    let mut shutdown = pin!(shutdown);
    loop {
        let accepted =
            futures_lite::future::or(async { Some(listener.accept.accept().await) }, async {
                shutdown.as_mut().await;
                None
            })
            .await;
        match accepted {
            None => break,
            Some(Ok(stream)) => {
                let connection = serve_connection(
                    stream,
                    Rc::clone(&routes),
                    Rc::clone(&builder),
                    Rc::clone(&state),
                    config
                        .tls
                        .clone()
                        .map(|tls| (tls, config.tls_handshake_timeout_ms)),
                );
                glommio::spawn_local(connection).detach();
            }
            Some(Err(error)) => accept_failed(error).await,
        }
    }
    listener.close();
    drain(&state, Duration::from_millis(config.drain_timeout_ms)).await
}

/// Wait after a failed accept before the next. The errors that matter here (out of file
/// descriptors or memory) do not clear at once; retrying in a tight loop would starve the
/// core's other tasks.
const ACCEPT_ERROR_BACKOFF_MS: u64 = 10;

async fn accept_failed(error: glommio::GlommioError<()>) {
    crate::warn!(
        "accepting a client connection failed",
        error = error.to_string()
    );
    glommio::timer::Timer::new(Duration::from_millis(ACCEPT_ERROR_BACKOFF_MS)).await;
}

fn connection_builder(config: &ServerConfig) -> auto::Builder<LocalExecutor> {
    let mut builder = auto::Builder::new(LocalExecutor);
    // hyper's defaults: HTTP/1 keep-alive on, header read timeout 30 s (needs the timer).
    builder.http1().timer(GlommioTimer);
    builder
        .http2()
        .timer(GlommioTimer)
        .max_concurrent_streams(config.max_concurrent_streams)
        .keep_alive_interval(Duration::from_millis(config.keepalive_interval_ms))
        .keep_alive_timeout(Duration::from_millis(config.keepalive_timeout_ms))
        .max_frame_size(config.max_frame_size_bytes)
        .initial_stream_window_size(config.stream_window_bytes)
        .initial_connection_window_size(config.connection_window_bytes);
    builder
}

async fn serve_connection(
    stream: TcpStream,
    routes: Rc<Routes>,
    builder: Rc<auto::Builder<LocalExecutor>>,
    state: Rc<ShutdownState>,
    tls: Option<(ServerTls, u64)>,
) {
    let _open = OpenConnection::new(Rc::clone(&state));
    // Small request/response pairs dominate etcd traffic: do not let Nagle hold them back.
    if stream.set_nodelay(true).is_err() {
        return; // The peer is already gone.
    }
    let Some((tls, timeout_ms)) = tls else {
        let service = ConnectionService {
            routes,
            common_name: None,
        };
        return serve_http(stream, service, &builder, &state).await;
    };
    let Some(accepted) = handshake(&tls, stream, timeout_ms, &state).await else {
        return;
    };
    let service = ConnectionService {
        routes,
        // A name that cannot be a header value (control characters) authenticates nobody.
        common_name: accepted
            .common_name
            .and_then(|name| HeaderValue::from_str(&name).ok()),
    };
    serve_http(accepted.stream, service, &builder, &state).await;
}

/// Runs the TLS handshake; `None` when it failed, timed out or shutdown began first. A
/// failure is logged as etcd logs it ("rejected connection"); the client sees the TLS alert or
/// the closed connection (a plain-text client on a TLS port gets an immediate close).
async fn handshake(
    tls: &ServerTls,
    stream: TcpStream,
    timeout_ms: u64,
    state: &ShutdownState,
) -> Option<crate::tls::Accepted<TcpStream>> {
    let peer = stream.peer_addr().ok();
    let accept = async {
        match tls.accept(stream).await {
            Ok(accepted) => Some(accepted),
            Err(error) => {
                let peer = peer.map_or("?".to_string(), |p| p.to_string());
                crate::warn!(
                    "rejected connection",
                    remote_addr = peer,
                    error = error.to_string()
                );
                None
            }
        }
    };
    let give_up = async {
        let timeout = async {
            glommio::timer::Timer::new(Duration::from_millis(timeout_ms)).await;
        };
        futures_lite::future::or(timeout, state.draining.wait()).await;
        None
    };
    futures_lite::future::or(accept, give_up).await
}

/// Serves HTTP/1.1 and HTTP/2 on an open (plain or TLS) stream until it closes or the drain
/// ends it.
async fn serve_http<S>(
    stream: S,
    service: ConnectionService,
    builder: &auto::Builder<LocalExecutor>,
    state: &ShutdownState,
) where
    S: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let mut connection = pin!(builder.serve_connection(GlommioIo(stream), service));
    let finished = futures_lite::future::or(async { Some(connection.as_mut().await) }, async {
        state.draining.wait().await;
        None
    })
    .await;
    if finished.is_some() {
        return; // Errors here are the peer's (reset, malformed request): nothing to do.
    }
    connection.as_mut().graceful_shutdown();
    futures_lite::future::or(
        async {
            let _ = connection.as_mut().await;
        },
        state.forced.wait(),
    )
    .await;
}

/// Waits for open connections to close, at most `timeout`, then forces the rest.
async fn drain(state: &ShutdownState, timeout: Duration) -> ServeOutcome {
    state.draining.set();
    let drained = futures_lite::future::or(
        async {
            state.wait_all_closed().await;
            true
        },
        async {
            glommio::timer::Timer::new(timeout).await;
            false
        },
    )
    .await;
    let forced_connections = if drained { 0 } else { state.open.get() };
    state.forced.set();
    // Forced connections drop their hyper connection on their next poll: they close now.
    state.wait_all_closed().await;
    ServeOutcome { forced_connections }
}

/// Core-local shutdown signals and the count of open connections.
#[derive(Default)]
struct ShutdownState {
    open: std::cell::Cell<usize>,
    closed: event_listener::Event,
    /// Set when shutdown starts: connections begin a graceful close.
    draining: Flag,
    /// Set when the drain timeout expires: connections close at once.
    forced: Flag,
}

impl ShutdownState {
    async fn wait_all_closed(&self) {
        wait_until(&self.closed, || self.open.get() == 0).await
    }
}

/// Counts a connection as open for as long as its task lives (also when it is cancelled).
struct OpenConnection(Rc<ShutdownState>);

impl OpenConnection {
    fn new(state: Rc<ShutdownState>) -> Self {
        state.open.set(state.open.get() + 1);
        OpenConnection(state)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        let open = self.0.open.get();
        assert!(open > 0, "open connection count underflow");
        self.0.open.set(open - 1);
        self.0.closed.notify(usize::MAX);
    }
}

/// A one-way, core-local flag that tasks can wait for (shutdown of client and peer
/// connections).
#[derive(Default)]
pub(crate) struct Flag {
    set: std::cell::Cell<bool>,
    changed: event_listener::Event,
}

impl Flag {
    pub(crate) fn set(&self) {
        self.set.set(true);
        self.changed.notify(usize::MAX);
    }

    pub(crate) fn is_set(&self) -> bool {
        self.set.get()
    }

    pub(crate) async fn wait(&self) {
        wait_until(&self.changed, || self.set.get()).await
    }
}

/// The per-connection hyper service: hands every request to the shared [`Routes`].
struct ConnectionService {
    routes: Rc<Routes>,
    /// The Common Name of the client's verified certificate (certificate authentication).
    common_name: Option<HeaderValue>,
}

type ConnectionFuture =
    Map<ResponseFuture, fn(Response<Body>) -> Result<Response<Body>, Infallible>>;

impl hyper::service::Service<Request<Incoming>> for ConnectionService {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ConnectionFuture;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        // The auth layer trusts this header: only the connection may set it, never the client.
        // (The gateway does not pass it on: etcd never takes a gateway caller from it.)
        let key = HeaderName::from_static(TLS_COMMON_NAME_METADATA_KEY);
        req.headers_mut().remove(&key);
        if let Some(name) = &self.common_name {
            req.headers_mut().insert(key, name.clone());
        }
        self.routes.dispatch(req).map(Ok)
    }
}

/// Runs hyper's background tasks (HTTP/2 streams) on the current glommio executor, next to
/// their connection. hyper's `Executor` has no `Send` bound, so `!Send` futures are fine.
#[derive(Clone, Copy, Debug)]
struct LocalExecutor;

impl<F> hyper::rt::Executor<F> for LocalExecutor
where
    F: Future + 'static,
    F::Output: 'static,
{
    fn execute(&self, future: F) {
        glommio::spawn_local(future).detach();
    }
}

/// hyper's timer on glommio timers. hyper requires `Send + Sync` sleeps although it only
/// polls them from the connection's task: the `SendWrapper` makes that sound (it panics
/// instead of racing if a sleep is ever touched from another thread).
#[derive(Clone, Copy, Debug)]
struct GlommioTimer;

struct GlommioSleep(SendWrapper<glommio::timer::Timer>);

impl Future for GlommioSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        Pin::new(&mut *self.0).poll(cx).map(|_| ())
    }
}

impl Sleep for GlommioSleep {}

impl hyper::rt::Timer for GlommioTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Sleep>> {
        Box::pin(GlommioSleep(SendWrapper::new(glommio::timer::Timer::new(
            duration,
        ))))
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn Sleep>> {
        self.sleep(deadline.saturating_duration_since(Instant::now()))
    }

    // Re-arms the existing timer instead of allocating a new one (HTTP/2 keep-alive and
    // HTTP/1 header timeouts reset often).
    fn reset(&self, sleep: &mut Pin<Box<dyn Sleep>>, new_deadline: Instant) {
        match sleep.as_mut().downcast_mut_pin::<GlommioSleep>() {
            Some(mut current) => current
                .0
                .reset(new_deadline.saturating_duration_since(Instant::now())),
            None => *sleep = self.sleep_until(new_deadline),
        }
    }
}

/// Adapts a futures-io stream (glommio's `TcpStream`, or TLS over it) to hyper's IO traits.
struct GlommioIo<S>(S);

/// Upper bound on one read. hyper hands us uninitialised buffer space, which must be zeroed
/// before a `&mut [u8]` can point at it; the bound caps that cost per read.
const READ_CHUNK_BYTES: usize = 64 * 1024;

impl<S: AsyncRead + Unpin> hyper::rt::Read for GlommioIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let len = buf.remaining().min(READ_CHUNK_BYTES);
        let read = ready!(Pin::new(&mut self.0).poll_read(cx, buf.initialize_unfilled_to(len)))?;
        assert!(read <= len, "read more bytes than the buffer holds");
        // SAFETY: `initialize_unfilled_to` initialised the first `len` unfilled bytes and the
        // read filled `read <= len` of them.
        unsafe { buf.advance(read) };
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> hyper::rt::Write for GlommioIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::not_found;

    #[test]
    fn grpc_service_name_is_the_first_path_segment() {
        assert_eq!(
            grpc_service_name("/etcdserverpb.KV/Range"),
            Some("etcdserverpb.KV")
        );
        assert_eq!(
            grpc_service_name("/v3lockpb.Lock/Lock"),
            Some("v3lockpb.Lock")
        );
        assert_eq!(grpc_service_name("/health"), None);
        assert_eq!(grpc_service_name("etcdserverpb.KV/Range"), None);
    }

    #[test]
    fn grpc_is_detected_by_content_type() {
        let request = |ct: &str| {
            Request::builder()
                .header(CONTENT_TYPE, ct)
                .body(())
                .unwrap()
        };
        assert!(is_grpc(&request("application/grpc")));
        assert!(is_grpc(&request("application/grpc+proto")));
        assert!(!is_grpc(&request("application/grpc-web")));
        assert!(!is_grpc(&request("application/json")));
        assert!(!is_grpc(&Request::new(())));
    }

    fn handler() -> HttpHandler {
        Arc::new(|_| -> ResponseFuture { Box::pin(ready(not_found())) })
    }

    #[test]
    fn http_patterns_match_like_go_servemux() {
        let (v3, kv, range, health) = (handler(), handler(), handler(), handler());
        let routes = Routes::new()
            .add_http("/v3/", v3.clone())
            .add_http("/v3/kv/", kv.clone())
            .add_http("/v3/kv/range", range.clone())
            .add_http("/health", health.clone());
        let routed_to = |path: &str, expected: &HttpHandler| {
            routes
                .http_handler(path)
                .is_some_and(|h| Arc::ptr_eq(h, expected))
        };
        assert!(routed_to("/v3/kv/range", &range));
        assert!(routed_to("/v3/kv/put", &kv));
        assert!(routed_to("/v3/watch", &v3));
        assert!(routed_to("/health", &health));
        assert!(routes.http_handler("/health/x").is_none());
        assert!(routes.http_handler("/v3").is_none());
    }

    #[test]
    #[should_panic(expected = "registered twice")]
    fn duplicate_http_pattern_panics() {
        let _ = Routes::new()
            .add_http("/health", handler())
            .add_http("/health", handler());
    }
}
