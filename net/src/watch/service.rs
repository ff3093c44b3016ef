//! The `etcdserverpb.Watch` gRPC service (etcd's v3rpc `watchServer`): one session per
//! bidirectional stream, on the core that accepted the connection.
//!
//! A session reads create / cancel / progress requests in order and owns the stream's
//! watchers; the core's [`Hub`] sends their events. All responses of a stream go through
//! one bounded queue, so a created response always precedes the watcher's events and a
//! canceled response follows its last ones. Like etcd, the stream stays open after the client
//! half-closes its side; it ends when the client goes away or the node shuts down, and then
//! every watcher of the stream is cancelled.

use super::hub::{Hub, Sink, WatchSpec, Watcher};
use crate::auth::state::Access;
use crate::transport::max_grpc_message_bytes;
use ferrocd_api::etcdserverpb::watch_create_request::FilterType;
use ferrocd_api::etcdserverpb::watch_request::RequestUnion;
use ferrocd_api::etcdserverpb::watch_server::Watch;
use ferrocd_api::etcdserverpb::{WatchCreateRequest, WatchRequest, WatchResponse};
use futures::channel::oneshot;
use futures::StreamExt;
use send_wrapper::SendWrapper;
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};
use tonic::codegen::BoxStream;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};

/// Responses a stream may have queued before its watchers fall back to catch-up (etcd's
/// `chanBufLen`).
pub const STREAM_QUEUE_RESPONSES: usize = 128;

/// etcd's default `--experimental-watch-progress-notify-interval`.
pub const PROGRESS_NOTIFY_INTERVAL_DEFAULT_MS: u64 = 10 * 60 * 1000;

/// etcd's error strings (mvcc `ErrEmptyWatcherRange`, `ErrWatcherDuplicateID`).
const EMPTY_RANGE: &str = "mvcc: watcher range is empty";
const DUPLICATE_ID: &str = "mvcc: duplicate watch ID provided on the WatchStream";
/// The cancel reason of a watch the caller may not read: etcd puts the whole text of its
/// gRPC error there (`rpctypes.ErrGRPCPermissionDenied.Error()`).
const PERMISSION_DENIED_REASON: &str =
    "rpc error: code = PermissionDenied desc = etcdserver: permission denied";
/// The watch id etcd reports for a create that failed and for progress responses.
const INVALID_WATCH_ID: i64 = -1;
/// A create request's `watch_id` asking the server to choose one.
const AUTO_WATCH_ID: i64 = 0;

pub struct WatchService {
    /// Services are built per core and only called on it (see `transport`).
    hub: SendWrapper<Rc<Hub>>,
    progress_interval: Duration,
}

impl WatchService {
    pub fn new(hub: Rc<Hub>, progress_interval_ms: u64) -> WatchService {
        assert!(progress_interval_ms > 0, "progress notify interval of zero");
        WatchService {
            hub: SendWrapper::new(hub),
            progress_interval: Duration::from_millis(progress_interval_ms),
        }
    }
}

#[tonic::async_trait]
impl Watch for WatchService {
    async fn watch(
        &self,
        request: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<BoxStream<WatchResponse>>, Status> {
        let hub: Rc<Hub> = Rc::clone(&self.hub);
        let metadata = request.metadata().clone();
        let (tx, rx) = async_channel::bounded(STREAM_QUEUE_RESPONSES);
        let sink = Sink {
            tx,
            // etcd's watch server fragments at its gRPC limit, not the request limit.
            fragment_bytes: max_grpc_message_bytes(hub.shared().limits.max_request_bytes),
        };
        // Dropped with the response stream: tells the session that the client is gone.
        let (alive, gone) = oneshot::channel::<()>();
        // A request the server cannot decode ends the stream with its status, as etcd's
        // recvLoop error does; dropped unsent when the stream ends otherwise.
        let (fail, failed) = oneshot::channel::<Status>();
        let session = Session {
            hub,
            sink,
            watchers: RefCell::default(),
            next_auto_id: Cell::new(0),
            progress_interval: self.progress_interval,
            metadata,
            progress_due: Cell::new(None),
        };
        glommio::spawn_local(session.run(request.into_inner(), gone, fail)).detach();
        let responses = rx
            .flat_map(|batch| futures::stream::iter(batch.into_iter().map(Ok)))
            .chain(
                futures::stream::once(failed).filter_map(|failed| async { failed.ok().map(Err) }),
            )
            .map(move |response| {
                let _ = &alive;
                response
            });
        Ok(Response::new(Box::pin(responses)))
    }
}

/// One watch stream.
struct Session {
    hub: Rc<Hub>,
    sink: Sink,
    /// Every watch id in use on the stream, including watchers cancelled by compaction
    /// (etcd keeps those ids until the client cancels them).
    watchers: RefCell<BTreeMap<i64, Rc<Watcher>>>,
    next_auto_id: Cell<i64>,
    progress_interval: Duration,
    /// The stream's metadata: its token is looked up at each create, as etcd does.
    metadata: MetadataMap,
    /// A requested progress response not sent yet: the revision it must reach at least (the
    /// visible revision when it was requested). See [`Session::progress_ready`].
    progress_due: Cell<Option<i64>>,
}

enum Input {
    Request(WatchRequest),
    RequestsEnded,
    /// The request stream broke (undecodable message, bad frame): the stream ends with it.
    RequestsBroken(Status),
    ProgressTick,
    ProgressReady,
    Stop,
}

impl Session {
    async fn run(
        self,
        requests: Streaming<WatchRequest>,
        mut gone: oneshot::Receiver<()>,
        fail: oneshot::Sender<Status>,
    ) {
        let mut fail = Some(fail);
        let mut requests = Some(requests);
        let mut next_tick = Instant::now() + self.progress_interval;
        loop {
            let input = self.next_input(&mut requests, &mut gone, next_tick).await;
            let open = match input {
                Input::Request(request) => self.handle(request).await,
                Input::RequestsEnded => {
                    requests = None;
                    true
                }
                Input::RequestsBroken(status) => {
                    let fail = fail
                        .take()
                        .expect("the loop ends at the first broken request");
                    // The client may be gone already; then nobody reads the status.
                    let _ = fail.send(status);
                    false
                }
                Input::ProgressTick => {
                    next_tick += self.progress_interval;
                    self.notify_progress();
                    true
                }
                Input::ProgressReady => {
                    self.progress_due.set(None);
                    self.send(self.progress()).await
                }
                Input::Stop => false,
            };
            if !open {
                break;
            }
        }
        for w in self.watchers.borrow().values() {
            self.hub.cancel(w);
        }
        // Ends the response stream after what is queued; wakes catch-ups waiting for room.
        self.sink.tx.close();
    }

    async fn next_input(
        &self,
        requests: &mut Option<Streaming<WatchRequest>>,
        gone: &mut oneshot::Receiver<()>,
        next_tick: Instant,
    ) -> Input {
        let stop = async {
            futures_lite::future::or(
                async {
                    let _ = gone.await;
                },
                self.hub.wait_closed(),
            )
            .await;
            Input::Stop
        };
        let request = async {
            match requests {
                Some(stream) => match stream.message().await {
                    Ok(Some(request)) => Input::Request(request),
                    // A half-close: keep sending, as etcd does.
                    Ok(None) => Input::RequestsEnded,
                    Err(status) => Input::RequestsBroken(status),
                },
                None => std::future::pending().await,
            }
        };
        let tick = async {
            let wait = next_tick.saturating_duration_since(Instant::now());
            glommio::timer::Timer::new(wait).await;
            Input::ProgressTick
        };
        // Before the next request: a progress request answerable at once is answered before
        // the requests that follow it (a create from the past would delay it).
        let progress = async {
            match self.progress_due.get() {
                Some(at_least) => {
                    let ready = || self.progress_ready(at_least);
                    self.hub.wait_progress(ready).await;
                    Input::ProgressReady
                }
                None => std::future::pending().await,
            }
        };
        let requests_or_tick = futures_lite::future::or(request, tick);
        let work = futures_lite::future::or(progress, requests_or_tick);
        futures_lite::future::or(stop, work).await
    }

    /// Serves one request; `false` when the stream is gone.
    async fn handle(&self, request: WatchRequest) -> bool {
        let response = match request.request_union {
            Some(RequestUnion::CreateRequest(create)) => return self.create(create).await,
            Some(RequestUnion::CancelRequest(cancel)) => self.cancel(cancel.watch_id),
            Some(RequestUnion::ProgressRequest(_)) => {
                self.request_progress();
                None
            }
            None => None,
        };
        match response {
            Some(response) => self.send(response).await,
            None => true,
        }
    }

    async fn send(&self, response: WatchResponse) -> bool {
        self.sink.tx.send(vec![response]).await.is_ok()
    }

    fn header_now(&self) -> Option<ferrocd_api::etcdserverpb::ResponseHeader> {
        Some(self.hub.shared().current_header())
    }

    /// With auth enabled the caller needs read permission on the whole watched range
    /// (etcd 3.4 checks only the key of a `"\0"` range end; we check the range).
    fn permitted(&self, spec: &WatchSpec) -> bool {
        let auth = &self.hub.shared().auth;
        auth.caller(&self.metadata)
            .and_then(|caller| auth.check(&caller, &spec.key, &spec.end, Access::Read))
            .is_ok()
    }

    async fn create(&self, create: WatchCreateRequest) -> bool {
        let current = self.hub.shared().seq.visible();
        let spec = watch_spec(&create);
        if !self.permitted(&spec) {
            // etcd's answer: the requested id, created and canceled at once.
            return self
                .send(WatchResponse {
                    header: Some(self.hub.shared().header(current)),
                    watch_id: create.watch_id,
                    created: true,
                    canceled: true,
                    cancel_reason: PERMISSION_DENIED_REASON.to_string(),
                    ..Default::default()
                })
                .await;
        }
        let id = self.assign_id(&spec, create.watch_id);
        let response = WatchResponse {
            header: Some(self.hub.shared().header(current)),
            watch_id: id.unwrap_or(INVALID_WATCH_ID),
            created: true,
            canceled: id.is_err(),
            cancel_reason: id.err().unwrap_or_default().to_string(),
            ..Default::default()
        };
        // The created response goes first; the watcher starts afterwards.
        if !self.send(response).await {
            return false;
        }
        if let Ok(id) = id {
            let start_rev = match create.start_revision {
                0 => current + 1,
                rev => rev,
            };
            let w = self.hub.register(id, spec, self.sink.clone(), start_rev);
            self.watchers.borrow_mut().insert(id, w);
        }
        true
    }

    /// etcd's `watchStream.Watch` checks: a non-empty range, then a free id (chosen ids must
    /// not be in use; automatic ones count up from 0, skipping ids in use).
    fn assign_id(&self, spec: &WatchSpec, requested: i64) -> Result<i64, &'static str> {
        let open_ended = spec.end == [0];
        if !spec.end.is_empty() && !open_ended && spec.key >= spec.end {
            return Err(EMPTY_RANGE);
        }
        let watchers = self.watchers.borrow();
        if requested != AUTO_WATCH_ID {
            return match watchers.contains_key(&requested) {
                true => Err(DUPLICATE_ID),
                false => Ok(requested),
            };
        }
        let mut id = self.next_auto_id.get();
        while watchers.contains_key(&id) {
            id += 1;
        }
        self.next_auto_id.set(id + 1);
        Ok(id)
    }

    /// Cancelling an unknown id answers nothing, as etcd.
    fn cancel(&self, watch_id: i64) -> Option<WatchResponse> {
        let w = self.watchers.borrow_mut().remove(&watch_id)?;
        self.hub.cancel(&w);
        Some(WatchResponse {
            header: self.header_now(),
            watch_id,
            canceled: true,
            ..Default::default()
        })
    }

    /// A progress request is answered once no watcher of the stream is catching up and the
    /// hub has dispatched the revision that was current when it was asked (etcd 3.5+ defers
    /// it the same way, and folds requests made meanwhile into one response). Then every
    /// watcher has been sent all its events up to the hub's cursor, so the response can carry
    /// the cursor without announcing a revision whose events are still to come (I3), and it
    /// is never older than the request.
    fn request_progress(&self) {
        let visible = self.hub.shared().seq.visible();
        let at_least = self
            .progress_due
            .get()
            .map_or(visible, |due| due.max(visible));
        self.progress_due.set(Some(at_least));
    }

    fn progress_ready(&self, at_least: i64) -> bool {
        let watchers = self.watchers.borrow();
        self.hub.cursor() >= at_least && !watchers.values().any(|w| self.hub.is_catching_up(w))
    }

    /// The progress response (watch id -1) at the hub's cursor; see `request_progress`.
    fn progress(&self) -> WatchResponse {
        WatchResponse {
            header: Some(self.hub.shared().header(self.hub.cursor())),
            watch_id: INVALID_WATCH_ID,
            ..Default::default()
        }
    }

    fn notify_progress(&self) {
        let watchers = self.watchers.borrow();
        for w in watchers.values().filter(|w| w.spec.progress_notify) {
            self.hub.notify_progress(w);
        }
    }
}

/// The create request in etcd's normal form: an empty key is `"\0"` (the smallest key).
fn watch_spec(create: &WatchCreateRequest) -> WatchSpec {
    let has_filter = |f: FilterType| create.filters.contains(&(f as i32));
    WatchSpec {
        key: match create.key.is_empty() {
            true => vec![0],
            false => create.key.clone(),
        },
        end: create.range_end.clone(),
        prev_kv: create.prev_kv,
        fragment: create.fragment,
        progress_notify: create.progress_notify,
        no_put: has_filter(FilterType::Noput),
        no_delete: has_filter(FilterType::Nodelete),
    }
}
