//! Runs the `ferrocd-bench` binary against a real etcd (from PATH) started by the test.

use ferrocd_bench::server::{ServerProcess, ServerSpec};
use std::time::Duration;

/// The whole run (200 fsync'd puts) takes well under a second normally; this only stops a hang.
const BENCH_TIMEOUT_MS: u64 = 15_000;

#[tokio::test]
async fn put_200_against_etcd_reports_200_ops_and_no_errors() {
    let etcd = ServerProcess::start(ServerSpec {
        label: "etcd".into(),
        program: "etcd".into(),
        extra_args: Vec::new(),
    })
    .await
    .expect("start etcd");
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_ferrocd-bench"))
        .args(["put", "--total", "200", "--clients", "4", "--conns", "2"])
        .args(["--endpoints", &etcd.endpoint(), "--json", "--quiet"])
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_millis(BENCH_TIMEOUT_MS), run)
        .await
        .expect("bench finished in time")
        .expect("bench ran");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "bench failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).expect("JSON summary");
    assert_eq!(summary["ops"], 200, "{summary}");
    assert_eq!(summary["errors"], 0, "{summary}");
    assert_eq!(summary["workload"], "put", "{summary}");
    assert!(summary["p99_us"].as_u64().expect("p99") > 0, "{summary}");

    // The puts really landed: etcd's revision counts every one of them.
    let mut client = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .expect("connect");
    let response = client.get("any-key", None).await.expect("get");
    let revision = response.header().expect("header").revision();
    assert_eq!(
        revision,
        1 + 200,
        "etcd starts at revision 1; each put adds one"
    );
}
