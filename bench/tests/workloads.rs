//! The txn-mixed, watch and lease-keepalive workloads of the `ferrocd-bench` binary against a
//! real etcd (from PATH), and against a stand-in server that answers every call UNIMPLEMENTED.

use ferrocd_bench::server::{ServerProcess, ServerSpec};
use std::process::Output;
use std::time::Duration;

/// Each run takes well under a second normally; this only stops a hang.
const BENCH_TIMEOUT_MS: u64 = 30_000;
/// The exit status for failed requests and for a service the server lacks.
const EXIT_REQUESTS_FAILED: i32 = 2;

async fn start_etcd() -> ServerProcess {
    ServerProcess::start(ServerSpec {
        label: "etcd".into(),
        program: "etcd".into(),
        extra_args: Vec::new(),
    })
    .await
    .expect("start etcd")
}

async fn run_bench(args: &[&str]) -> Output {
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_ferrocd-bench"))
        .args(args)
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_millis(BENCH_TIMEOUT_MS), run)
        .await
        .expect("bench finished in time")
        .expect("bench ran")
}

/// Runs one workload with `--json`, asserts a clean exit, and returns the summary.
async fn summary_of(endpoint: &str, args: &[&str]) -> serde_json::Value {
    let mut all_args = args.to_vec();
    all_args.extend(["--endpoints", endpoint, "--json", "--quiet"]);
    let output = run_bench(&all_args).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{args:?} failed: {stderr}\n{stdout}"
    );
    assert!(stderr.is_empty(), "--quiet prints no progress: {stderr}");
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).expect("JSON summary");
    assert_sane(&summary);
    summary
}

/// Some successful operations, no errors, percentiles in order.
fn assert_sane(summary: &serde_json::Value) {
    assert!(summary["ops"].as_u64().expect("ops") > 0, "{summary}");
    assert_eq!(summary["errors"], 0, "{summary}");
    assert!(
        summary["ops_per_s"].as_f64().expect("ops/s") > 0.0,
        "{summary}"
    );
    let percentiles: Vec<u64> = ["p50_us", "p90_us", "p99_us", "p999_us", "max_us"]
        .iter()
        .map(|field| summary[field].as_u64().expect(field))
        .collect();
    assert!(percentiles[0] > 0, "{summary}");
    assert!(
        percentiles.windows(2).all(|pair| pair[0] <= pair[1]),
        "percentiles out of order: {summary}"
    );
}

#[tokio::test]
async fn txn_mixed_runs_every_txn_against_etcd() {
    let etcd = start_etcd().await;
    let args = [
        "txn-mixed",
        "--total",
        "200",
        "--clients",
        "4",
        "--conns",
        "2",
    ];
    let summary = summary_of(&etcd.endpoint(), &args).await;
    assert_eq!(summary["ops"], 200, "{summary}");
    assert_eq!(summary["workload"], "txn-mixed-0.5", "{summary}");

    // About half the txns put (each put takes one revision); the rest only read.
    let mut client = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .expect("connect");
    let response = client.get("any-key", None).await.expect("get");
    let puts = response.header().expect("header").revision() - 1;
    assert!((40..=160).contains(&puts), "{puts} of 200 txns wrote");
}

#[tokio::test]
async fn watch_delivers_every_put_to_every_watcher_of_etcd() {
    let etcd = start_etcd().await;
    let args = [
        "watch",
        "--total",
        "150",
        "--clients",
        "3",
        "--conns",
        "2",
        "--watchers",
        "4",
        "--key-space",
        "100",
        "--watched-keys",
        "50",
    ];
    let summary = summary_of(&etcd.endpoint(), &args).await;
    let watch = &summary["watch"];
    let puts = watch["puts"].as_u64().expect("puts");
    // Random keys: about half of the 150 puts hit the 50 watched keys of 100.
    assert!((30..=120).contains(&puts), "{summary}");
    assert_eq!(watch["watchers"], 4, "{summary}");
    assert_eq!(watch["events_expected"], puts * 4, "{summary}");
    assert_eq!(
        watch["events_received"], watch["events_expected"],
        "{summary}"
    );
    assert_eq!(watch["events_duplicated"], 0, "{summary}");
    assert_eq!(summary["ops"], puts * 4, "one latency per event");
}

#[tokio::test]
async fn lease_keepalive_counts_round_trips_and_revokes_its_leases() {
    let etcd = start_etcd().await;
    let args = [
        "lease-keepalive",
        "--total",
        "300",
        "--clients",
        "3",
        "--conns",
        "2",
        "--leases",
        "5",
    ];
    let summary = summary_of(&etcd.endpoint(), &args).await;
    assert_eq!(summary["ops"], 300, "{summary}");
    assert_eq!(summary["workload"], "lease-keepalive l5", "{summary}");

    let mut client = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .expect("connect");
    let leases = client.leases().await.expect("leases");
    assert!(leases.leases().is_empty(), "the run revoked its leases");
}

/// An HTTP/2 server on 127.0.0.1 that answers every gRPC call with status 12 (UNIMPLEMENTED)
/// in a trailers-only response, as a server lacking the service does.
async fn start_unimplemented_server() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("address"));
    let server = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve_unimplemented(stream));
        }
    });
    (endpoint, server)
}

async fn serve_unimplemented(stream: tokio::net::TcpStream) {
    let service = hyper::service::service_fn(|request: http::Request<hyper::body::Incoming>| {
        let message = format!("unknown service {}", request.uri().path());
        async move {
            http::Response::builder()
                .header("content-type", "application/grpc")
                .header("grpc-status", "12")
                .header("grpc-message", message)
                .body(http_body_util::Empty::<bytes::Bytes>::new())
        }
    });
    let executor = hyper_util::rt::TokioExecutor::new();
    // The client hangs up when the run ends; that ends this connection, nothing else to do.
    let _ = hyper::server::conn::http2::Builder::new(executor)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_service_is_reported_with_exit_status_2() {
    let (endpoint, server) = start_unimplemented_server().await;
    for (workload, service) in [("watch", "Watch"), ("lease-keepalive", "Lease")] {
        let output = run_bench(&[workload, "--total", "10", "--endpoints", &endpoint]).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(EXIT_REQUESTS_FAILED),
            "{workload}: {stderr}"
        );
        let expected = format!("does not implement the {service} service");
        assert!(stderr.contains(&expected), "{workload}: {stderr}");
        assert!(stderr.contains("UNIMPLEMENTED"), "{workload}: {stderr}");
        assert!(
            output.stdout.is_empty(),
            "no summary for a run that never started"
        );
    }
    server.abort();
}
