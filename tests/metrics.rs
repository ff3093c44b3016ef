//! `/metrics` on the client port: the Prometheus text etcd operators scrape, with counts that
//! follow what clients did.

mod common;

use std::collections::BTreeMap;

use common::Server;
use etcd_client::GetOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Puts of the test, on this many distinct keys.
const PUTS: usize = 12;
const KEYS: usize = 4;

/// GET /metrics with a bare HTTP/1.1 request; the body.
async fn scrape(server: &Server) -> String {
    let address = server.endpoint().trim_start_matches("http://").to_string();
    let mut stream = TcpStream::connect(&address).await.expect("connect");
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    let (head, body) = response.split_once("\r\n\r\n").expect("a header block");
    assert!(head.starts_with("HTTP/1.1 200"), "status: {head}");
    assert!(
        head.contains("text/plain; version=0.0.4"),
        "content type: {head}"
    );
    body.to_string()
}

/// Samples by their full name with labels, e.g. `grpc_server_started_total{...}`.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let (name, value) = line.rsplit_once(' ').expect("sample line");
            (name.to_string(), value.parse().expect("numeric value"))
        })
        .collect()
}

fn sample(samples: &BTreeMap<String, f64>, name: &str) -> f64 {
    *samples
        .get(name)
        .unwrap_or_else(|| panic!("no sample {name} in {samples:#?}"))
}

#[tokio::test]
async fn metrics_count_what_clients_did() {
    let server = Server::ferrocd(&["--shards", "2"]).await;
    let mut client = server.client().await;
    for i in 0..PUTS {
        client
            .put(format!("key{}", i % KEYS), "v", None)
            .await
            .expect("put");
    }
    let future = client
        .get("key0", Some(GetOptions::new().with_revision(1_000)))
        .await;
    assert!(future.is_err(), "a read of a future revision fails");

    // Defragment checkpoints what waits on every shard first: each shard with keys commits.
    let mut maintenance = client.maintenance_client();
    maintenance.defragment().await.expect("defragment");
    let db_size = maintenance.status().await.expect("status").db_size();

    let metrics = samples(&scrape(&server).await);
    assert!(
        sample(&metrics, "etcd_disk_backend_commit_duration_seconds_count") >= 2.0,
        "a checkpoint commit on each of the 2 shards"
    );
    assert_eq!(
        sample(&metrics, "etcd_mvcc_db_total_size_in_bytes"),
        db_size as f64,
        "the checkpoint files Status reports"
    );
    let put = "grpc_method=\"Put\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"";
    let range = "grpc_method=\"Range\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"";
    assert_eq!(
        sample(&metrics, &format!("grpc_server_started_total{{{put}}}")),
        PUTS as f64
    );
    assert_eq!(
        sample(
            &metrics,
            &format!("grpc_server_handled_total{{grpc_code=\"OK\",{put}}}")
        ),
        PUTS as f64
    );
    assert_eq!(
        sample(
            &metrics,
            &format!("grpc_server_handled_total{{grpc_code=\"OutOfRange\",{range}}}")
        ),
        1.0
    );
    assert_eq!(
        sample(&metrics, "etcd_debugging_mvcc_current_revision"),
        (PUTS + 1) as f64
    );
    assert_eq!(
        sample(&metrics, "etcd_debugging_mvcc_keys_total"),
        KEYS as f64
    );
    assert_eq!(sample(&metrics, "etcd_server_has_leader"), 1.0);
    let per_shard_records: f64 = (0..2)
        .map(|s| {
            sample(
                &metrics,
                &format!("ferrocd_shard_wal_records_total{{shard=\"{s}\"}}"),
            )
        })
        .sum();
    assert_eq!(per_shard_records, PUTS as f64, "one WAL record per put");

    // Every acknowledged put waited for a synced batch: at least one, at most one per put, plus
    // the member's publish of its attributes at start-up (one meta entry, as etcd's).
    let syncs = sample(&metrics, "etcd_disk_wal_fsync_duration_seconds_count");
    assert!(
        (1.0..=(PUTS + 1) as f64).contains(&syncs),
        "{syncs} synced batches"
    );
    let buckets: Vec<f64> = metrics
        .iter()
        .filter(|(name, _)| name.starts_with("etcd_disk_wal_fsync_duration_seconds_bucket"))
        .map(|(_, value)| *value)
        .collect();
    assert_eq!(buckets.len(), 15, "etcd's 14 bounds and +Inf");
    let inf = sample(
        &metrics,
        "etcd_disk_wal_fsync_duration_seconds_bucket{le=\"+Inf\"}",
    );
    assert_eq!(inf, syncs, "+Inf counts every observation");
    assert!(
        buckets.iter().all(|count| *count <= inf),
        "buckets are cumulative"
    );
    assert!(sample(&metrics, "process_resident_memory_bytes") > 0.0);
}
