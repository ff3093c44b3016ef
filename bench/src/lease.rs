//! The `lease-keepalive` workload: `leases` leases are granted (connections round-robin), each
//! gets its own keep-alive stream, and the clients share them out (client `c` owns leases `c`,
//! `c + clients`, ...). One request is one keep-alive round trip: send on a lease's stream,
//! wait for the response with a positive TTL. The leases are revoked at the end.

use crate::load::{bounded, join_workers, LoadSpec, RunResult, Shared};
use crate::stats::Latencies;
use crate::{setup_error, BenchResult};
use etcd_client::{Client, LeaseKeepAliveStream, LeaseKeeper};
use std::sync::Arc;
use std::time::Instant;

/// TTL of the granted leases: long enough that none expires between two keep-alives even on
/// a loaded machine, and short enough that leases left by a killed run go away soon.
const LEASE_TTL_S: i64 = 60;

/// A lease's keep-alive stream: the sending and the receiving half.
type KeepAlive = (LeaseKeeper, LeaseKeepAliveStream);

pub(crate) async fn run(
    spec: &LoadSpec,
    clients: &[Client],
    leases: usize,
    progress: bool,
) -> BenchResult<RunResult> {
    let ids = grant(clients, leases).await?;
    let result = keep_alive(spec, clients, &ids, progress).await;
    revoke(clients, &ids).await;
    result
}

async fn grant(clients: &[Client], leases: usize) -> BenchResult<Vec<i64>> {
    let mut ids = Vec::with_capacity(leases);
    for index in 0..leases {
        let mut lease = clients[index % clients.len()].lease_client();
        let response = bounded("grant lease", lease.grant(LEASE_TTL_S, None))
            .await
            .map_err(|e| setup_error("Lease", "grant lease", e))?;
        ids.push(response.id());
    }
    Ok(ids)
}

/// Opens the streams, then runs the clients' keep-alive loops to the end of the run.
async fn keep_alive(
    spec: &LoadSpec,
    clients: &[Client],
    ids: &[i64],
    progress: bool,
) -> BenchResult<RunResult> {
    let mut owned: Vec<Vec<KeepAlive>> = (0..spec.clients).map(|_| Vec::new()).collect();
    for (index, id) in ids.iter().enumerate() {
        let mut lease = clients[index % clients.len()].lease_client();
        // etcd-client sends the first keep-alive itself and waits for its answer.
        let stream = bounded("open keep-alive stream", lease.keep_alive(*id))
            .await
            .map_err(|e| setup_error("Lease", "open keep-alive stream", e))?;
        owned[index % spec.clients].push(stream);
    }
    let shared = Arc::new(Shared::new(spec.stop));
    let workers = owned
        .into_iter()
        .map(|streams| tokio::spawn(worker(streams, shared.clone())))
        .collect();
    let latencies = join_workers(workers, &shared, progress).await?;
    Ok(shared.result(latencies))
}

/// One client: keep-alives on its leases in turn, one in flight at a time. A stream that
/// failed is dropped (a late answer would pair with the next request); the client stops when
/// it has none left.
async fn worker(mut streams: Vec<KeepAlive>, shared: Arc<Shared>) -> Latencies {
    let mut latencies = Latencies::new();
    let mut turn = 0;
    while !streams.is_empty() {
        if shared.claim().is_none() {
            break;
        }
        let current = turn % streams.len();
        turn += 1;
        let started = Instant::now();
        match round_trip(&mut streams[current]).await {
            Ok(()) => latencies.record(started.elapsed()),
            Err(error) => {
                shared.record_errors(1, error);
                streams.swap_remove(current);
            }
        }
        shared.finish_one();
    }
    latencies
}

async fn round_trip((keeper, stream): &mut KeepAlive) -> Result<(), etcd_client::Error> {
    keeper.keep_alive().await?;
    match bounded("keep-alive response", stream.message()).await? {
        Some(response) if response.ttl() > 0 => Ok(()),
        Some(response) => Err(etcd_client::Error::LeaseKeepAliveError(format!(
            "lease {:x} not found (TTL {})",
            response.id(),
            response.ttl()
        ))),
        None => Err(etcd_client::Error::LeaseKeepAliveError(
            "keep-alive stream closed by the server".into(),
        )),
    }
}

/// Best effort: a lease left behind (server gone, timeout) expires after `LEASE_TTL_S` anyway.
async fn revoke(clients: &[Client], ids: &[i64]) {
    for (index, id) in ids.iter().enumerate() {
        let mut lease = clients[index % clients.len()].lease_client();
        let _ = bounded("revoke lease", lease.revoke(*id)).await;
    }
}
