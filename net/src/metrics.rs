//! `/metrics` in the Prometheus text format, with the names etcd operators already graph
//! (`etcd_server_*`, `etcd_disk_wal_fsync_duration_seconds`, `etcd_mvcc_*`, `grpc_server_*`)
//! plus per-shard `ferrocd_shard_*` series.
//!
//! Nothing here is on a shared hot path: request counters live in one slot per core (a mutex
//! only its own core takes per request, uncontended), shard and log figures are asked from
//! their owners by message when `/metrics` is scraped.

use crate::http::{method_not_allowed, respond, HttpHandler, ResponseFuture};
use crate::node::Node;
use crate::peer::stats::PeerStats;
use ::http::{Method, Request, StatusCode};
use bytes::Bytes;
use ferrocd_engine::wal::latency::{LatencyHistogram, BUCKET_BOUNDS_S};
use hashbrown::HashMap;
use http_body::{Body as HttpBody, Frame};
use hyper::body::Incoming;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tonic::body::Body;
use tonic::Code;

/// Path of the metrics endpoint, as etcd's.
pub const PATH_METRICS: &str = "/metrics";

/// gRPC methods that stream, and how (grpc-prometheus' `grpc_type` label); all others are
/// unary.
const STREAMING_METHODS: [(&str, &str); 4] = [
    ("/etcdserverpb.Watch/Watch", "bidi_stream"),
    ("/etcdserverpb.Lease/LeaseKeepAlive", "bidi_stream"),
    ("/etcdserverpb.Maintenance/Snapshot", "server_stream"),
    ("/v3electionpb.Election/Observe", "server_stream"),
];

/// Requests started and handled (by status code) per gRPC method path.
#[derive(Default)]
struct CoreCounts {
    started: HashMap<String, u64>,
    handled: HashMap<(String, Code), u64>,
}

/// gRPC request counters of every core.
pub struct GrpcMetrics {
    cores: Vec<Mutex<CoreCounts>>,
}

impl GrpcMetrics {
    pub fn new(cores: usize) -> Arc<GrpcMetrics> {
        Arc::new(GrpcMetrics {
            cores: (0..cores).map(|_| Mutex::default()).collect(),
        })
    }

    fn slot(&self, core: usize) -> std::sync::MutexGuard<'_, CoreCounts> {
        self.cores[core].lock().expect("metrics slot poisoned")
    }

    /// Counts a request to `path` started on `core`.
    pub fn started(&self, core: usize, path: &str) {
        let mut slot = self.slot(core);
        match slot.started.get_mut(path) {
            Some(count) => *count += 1,
            None => {
                slot.started.insert(path.to_string(), 1);
            }
        }
    }

    /// Counts a request to `path` on `core` that ended with `code`.
    pub fn handled(&self, core: usize, path: &str, code: Code) {
        *self
            .slot(core)
            .handled
            .entry((path.to_string(), code))
            .or_default() += 1;
    }

    /// Sums of every core's counters, sorted for stable output.
    fn totals(&self) -> Totals {
        let mut started: BTreeMap<String, u64> = BTreeMap::new();
        let mut handled: BTreeMap<(String, i32), u64> = BTreeMap::new();
        for core in 0..self.cores.len() {
            let slot = self.slot(core);
            for (path, count) in &slot.started {
                *started.entry(path.clone()).or_default() += count;
            }
            for ((path, code), count) in &slot.handled {
                *handled.entry((path.clone(), *code as i32)).or_default() += count;
            }
        }
        Totals {
            started: started.into_iter().collect(),
            handled: handled
                .into_iter()
                .map(|((path, code), count)| (path, Code::from_i32(code), count))
                .collect(),
        }
    }
}

/// Request counts summed over cores: per method path, and per path and status code.
struct Totals {
    started: Vec<(String, u64)>,
    handled: Vec<(String, Code, u64)>,
}

/// A gRPC response body that reports the call's status once its trailers go out (or once it
/// ends without any, which gRPC clients read as UNKNOWN).
pub struct CountedBody {
    inner: Body,
    report: Option<Box<dyn FnOnce(Code) + Send>>,
}

impl CountedBody {
    pub fn new(inner: Body, report: Box<dyn FnOnce(Code) + Send>) -> CountedBody {
        CountedBody {
            inner,
            report: Some(report),
        }
    }

    fn report(&mut self, code: Code) {
        if let Some(report) = self.report.take() {
            report(code);
        }
    }
}

impl HttpBody for CountedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    let code = grpc_status(trailers).unwrap_or(Code::Unknown);
                    self.report(code);
                }
            }
            Poll::Ready(Some(Err(_))) | Poll::Ready(None) => self.report(Code::Unknown),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for CountedBody {
    /// A stream the client cancelled never sends trailers (grpc-go counts it CANCELED).
    fn drop(&mut self) {
        self.report(Code::Cancelled);
    }
}

/// The `grpc-status` of trailers or of a trailers-only response's headers.
pub fn grpc_status(headers: &::http::HeaderMap) -> Option<Code> {
    let value = headers.get("grpc-status")?.to_str().ok()?;
    Some(Code::from_i32(value.parse().ok()?))
}

fn grpc_labels(path: &str) -> (&str, &str, &'static str) {
    let (service, method) = path
        .strip_prefix('/')
        .and_then(|p| p.split_once('/'))
        .unwrap_or(("unknown", path));
    let kind = STREAMING_METHODS
        .iter()
        .find(|(p, _)| *p == path)
        .map_or("unary", |(_, kind)| kind);
    (service, method, kind)
}

/// `/metrics`: GET only.
pub fn metrics_handler(
    node: Node,
    grpc: Arc<GrpcMetrics>,
    peers: Option<Arc<PeerStats>>,
) -> HttpHandler {
    Arc::new(move |req: Request<Incoming>| -> ResponseFuture {
        if req.method() != Method::GET {
            return Box::pin(std::future::ready(method_not_allowed(Method::GET)));
        }
        let (node, grpc, peers) = (node.clone(), grpc.clone(), peers.clone());
        Box::pin(async move {
            let mut text = render(&node, &grpc).await;
            if let Some(peers) = peers {
                peers.render(&mut text);
            }
            respond(StatusCode::OK, "text/plain; version=0.0.4", text)
        })
    })
}

/// Writes one metric family: its HELP and TYPE lines and samples (label set or name suffix
/// plus label set, then value).
pub(crate) fn family(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    samples: &[(String, String)],
) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{labels} {value}");
    }
}

fn gauge(out: &mut String, name: &str, help: &str, value: impl ToString) {
    family(
        out,
        name,
        "gauge",
        help,
        &[(String::new(), value.to_string())],
    );
}

fn histogram(out: &mut String, name: &str, help: &str, h: &LatencyHistogram) {
    let mut samples = Vec::with_capacity(BUCKET_BOUNDS_S.len() + 3);
    let mut cumulative = 0;
    for (bound, count) in BUCKET_BOUNDS_S.iter().zip(h.counts) {
        cumulative += count;
        samples.push((format!("_bucket{{le=\"{bound}\"}}"), cumulative.to_string()));
    }
    samples.push(("_bucket{le=\"+Inf\"}".to_string(), h.count().to_string()));
    samples.push(("_sum".to_string(), (h.sum_ns as f64 / 1e9).to_string()));
    samples.push(("_count".to_string(), h.count().to_string()));
    family(out, name, "histogram", help, &samples);
}

async fn render(node: &Node, grpc: &GrpcMetrics) -> String {
    let mut out = String::new();
    let shared = node.shared();
    gauge(
        &mut out,
        "etcd_server_has_leader",
        "Whether or not a leader exists. 1 is existence, 0 is not.",
        1,
    );
    gauge(
        &mut out,
        "etcd_server_is_leader",
        "Whether or not this member is a leader. 1 if is, 0 otherwise.",
        1,
    );
    family(
        &mut out,
        "etcd_server_leader_changes_seen_total",
        "counter",
        "The number of leader changes seen.",
        &[(String::new(), "1".to_string())],
    );
    gauge(
        &mut out,
        "etcd_debugging_mvcc_current_revision",
        "The current revision of store.",
        shared.seq.visible(),
    );
    gauge(
        &mut out,
        "etcd_mvcc_db_total_size_in_bytes",
        "Total size of the underlying database physically allocated in bytes (every shard's checkpoint file).",
        shared.space.used_bytes(),
    );
    gauge(
        &mut out,
        "etcd_debugging_mvcc_compact_revision",
        "The revision of the last compaction in store.",
        shared.compacted(),
    );
    match node.stats().await {
        Ok(stats) => shard_metrics(&mut out, &stats),
        Err(e) => {
            let _ = writeln!(out, "# shard figures unavailable: {e}");
        }
    }
    grpc_metrics(&mut out, grpc);
    process_metrics(&mut out);
    out
}

fn shard_metrics(out: &mut String, stats: &crate::node::NodeStats) {
    let mut fsync = LatencyHistogram::default();
    for wal in stats.shards.iter().map(|s| &s.wal).chain([&stats.meta_wal]) {
        fsync.merge(&wal.sync_latency);
    }
    histogram(
        out,
        "etcd_disk_wal_fsync_duration_seconds",
        "The latency distributions of fsync called by WAL (every shard's and the meta group's).",
        &fsync,
    );
    let mut commits = LatencyHistogram::default();
    for shard in &stats.shards {
        commits.merge(&shard.checkpoint_commit);
    }
    histogram(
        out,
        "etcd_disk_backend_commit_duration_seconds",
        "The latency distributions of commit called by backend (every shard's checkpoint).",
        &commits,
    );
    let keys: usize = stats.shards.iter().map(|s| s.store.keys).sum();
    gauge(
        out,
        "etcd_debugging_mvcc_keys_total",
        "Total number of keys (with retained history).",
        keys,
    );
    let per_shard = |value: &dyn Fn(&crate::node::ShardStats) -> u64| -> Vec<(String, String)> {
        stats
            .shards
            .iter()
            .enumerate()
            .map(|(id, s)| (format!("{{shard=\"{id}\"}}"), value(s).to_string()))
            .collect()
    };
    family(
        out,
        "ferrocd_shard_keys",
        "gauge",
        "Keys with retained history on the shard.",
        &per_shard(&|s| s.store.keys as u64),
    );
    family(
        out,
        "ferrocd_shard_versions",
        "gauge",
        "Retained versions (tombstones included) on the shard.",
        &per_shard(&|s| s.store.versions as u64),
    );
    family(
        out,
        "ferrocd_shard_payload_bytes",
        "gauge",
        "Key and value bytes the shard holds in memory.",
        &per_shard(&|s| s.store.payload_bytes),
    );
    family(
        out,
        "ferrocd_shard_wal_records_total",
        "counter",
        "Records the shard's WAL made durable since start.",
        &per_shard(&|s| s.wal.records_appended),
    );
    family(
        out,
        "ferrocd_shard_wal_fsyncs_total",
        "counter",
        "fdatasync calls of the shard's WAL since start.",
        &per_shard(&|s| s.wal.fsyncs),
    );
    family(
        out,
        "ferrocd_shard_wal_bytes_total",
        "counter",
        "Framed bytes the shard's WAL made durable since start.",
        &per_shard(&|s| s.wal.bytes_appended),
    );
}

fn grpc_metrics(out: &mut String, grpc: &GrpcMetrics) {
    let Totals { started, handled } = grpc.totals();
    let started: Vec<_> = started
        .iter()
        .map(|(path, count)| {
            let (service, method, kind) = grpc_labels(path);
            (
                format!(
                    "{{grpc_method=\"{method}\",grpc_service=\"{service}\",grpc_type=\"{kind}\"}}"
                ),
                count.to_string(),
            )
        })
        .collect();
    family(
        out,
        "grpc_server_started_total",
        "counter",
        "Total number of RPCs started on the server.",
        &started,
    );
    let handled: Vec<_> = handled
        .iter()
        .map(|(path, code, count)| {
            let (service, method, kind) = grpc_labels(path);
            (
                format!("{{grpc_code=\"{}\",grpc_method=\"{method}\",grpc_service=\"{service}\",grpc_type=\"{kind}\"}}", go_code_name(*code)),
                count.to_string(),
            )
        })
        .collect();
    family(
        out,
        "grpc_server_handled_total",
        "counter",
        "Total number of RPCs completed on the server, regardless of success or failure.",
        &handled,
    );
}

/// grpc-go's names of status codes (`codes.Code.String()`), which grpc-prometheus puts in
/// the `grpc_code` label.
fn go_code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// The standard process collector's figures, from /proc.
fn process_metrics(out: &mut String) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    gauge(
        out,
        "process_resident_memory_bytes",
        "Resident memory size in bytes.",
        rss_kib * 1024,
    );
    let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
    gauge(
        out,
        "process_open_fds",
        "Number of open file descriptors.",
        fds,
    );
}
