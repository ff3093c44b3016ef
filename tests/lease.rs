//! The Lease service: differential against a real etcd (grant, put with leases, time-to-live,
//! list, revoke, keep-alive and their errors), expiry timing, and leases across kill -9.

mod common;

use common::Server;
use etcd_client::{
    Client, Error, GetOptions, LeaseGrantOptions, LeaseTimeToLiveOptions, PutOptions, Txn, TxnOp,
};
use std::time::{Duration, Instant};

/// Keys spread over the shards of `--shards 4` (placement is by hash).
const KEYS: [&str; 6] = ["k/a", "k/b", "k/c", "k/d", "k/e", "k/f"];
const UNKNOWN_LEASE: i64 = 4242;
/// Pause between two polls of a server's state while waiting for time to pass.
const POLL_INTERVAL_MS: u64 = 100;

fn outcome<T>(result: Result<T, Error>, ok: impl FnOnce(T) -> String) -> String {
    match result {
        Ok(value) => ok(value),
        Err(Error::GRpcStatus(status)) => format!("error {:?} {}", status.code(), status.message()),
        Err(e) => panic!("transport error: {e}"),
    }
}

/// Remaining TTLs depend on timing: report whether one is plausible for a fresh lease.
fn remaining(ttl: i64, granted: i64) -> String {
    match ttl {
        -1 => "absent".into(),
        ttl if ttl <= granted && ttl >= granted - 3 => "fresh".into(),
        ttl => format!("unexpected remaining {ttl} of {granted}"),
    }
}

async fn time_to_live(client: &mut Client, id: i64) -> String {
    let options = LeaseTimeToLiveOptions::new().with_keys();
    outcome(client.lease_time_to_live(id, Some(options)).await, |r| {
        let mut keys: Vec<String> = r
            .keys()
            .iter()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect();
        // etcd lists a lease's keys in map order.
        keys.sort();
        format!(
            "ttl id={} remaining={} granted={} keys={keys:?} rev={}",
            r.id(),
            remaining(r.ttl(), r.granted_ttl()),
            r.granted_ttl(),
            r.header().unwrap().revision()
        )
    })
}

async fn keep_alive_once(client: &mut Client, id: i64) -> String {
    // The client sends a first keep-alive itself and turns an answer with TTL 0 (unknown or
    // expired lease) into this error.
    let (mut keeper, mut stream) = match client.lease_keep_alive(id).await {
        Ok(pair) => pair,
        Err(Error::LeaseKeepAliveError(message)) => return format!("keepalive ttl=0 {message}"),
        Err(e) => panic!("keep-alive of {id}: {e}"),
    };
    keeper.keep_alive().await.unwrap();
    let response = stream
        .message()
        .await
        .unwrap()
        .expect("one keep-alive answer");
    format!(
        "keepalive id={} ttl={} rev={}",
        response.id(),
        response.ttl(),
        response.header().unwrap().revision()
    )
}

async fn dump(client: &mut Client, key: &str, revision: i64) -> String {
    let options = GetOptions::new().with_prefix().with_revision(revision);
    outcome(client.get(key, Some(options)).await, |r| {
        let kvs: Vec<String> = r
            .kvs()
            .iter()
            .map(|kv| {
                format!(
                    "{}={} lease={} create={} mod={} ver={}",
                    kv.key_str().unwrap(),
                    kv.value_str().unwrap(),
                    kv.lease(),
                    kv.create_revision(),
                    kv.mod_revision(),
                    kv.version()
                )
            })
            .collect();
        format!(
            "range@{revision} {kvs:?} rev={}",
            r.header().unwrap().revision()
        )
    })
}

async fn put(client: &mut Client, key: &str, value: &str, options: PutOptions) -> String {
    outcome(client.put(key, value, Some(options)).await, |r| {
        format!("put {key} rev={}", r.header().unwrap().revision())
    })
}

/// The lease operations of the differential test, as lines (ids of generated leases and
/// cluster/member ids left out).
async fn lease_transcript(client: &mut Client) -> Vec<String> {
    let mut log = Vec::new();
    let grant = |ttl: i64, id: i64| (ttl, Some(LeaseGrantOptions::new().with_id(id)));
    for (ttl, options) in [
        grant(60, 1000),
        grant(60, 1000),
        grant(9_000_000_001, 1001),
        grant(1, 1002),
        grant(0, 1004),
        grant(9_000_000_000, 1003),
        grant(30, -5),
        (30, None),
    ] {
        let generated = options.is_none();
        log.push(outcome(client.lease_grant(ttl, options).await, |r| {
            assert!(!generated || r.id() > 0, "a generated id is positive");
            let id = if generated {
                "generated".into()
            } else {
                r.id().to_string()
            };
            format!(
                "grant id={id} ttl={} rev={}",
                r.ttl(),
                r.header().unwrap().revision()
            )
        }));
    }
    let revoke = |r: etcd_client::LeaseRevokeResponse| {
        format!("revoke rev={}", r.header().unwrap().revision())
    };
    // The leases raised to the 2 s minimum go before they could expire.
    for id in [1002, 1004] {
        log.push(outcome(client.lease_revoke(id).await, revoke));
    }
    for key in KEYS {
        log.push(put(client, key, "v1", PutOptions::new().with_lease(1000)).await);
    }
    log.push(
        put(
            client,
            "k/x",
            "v",
            PutOptions::new().with_lease(UNKNOWN_LEASE),
        )
        .await,
    );
    log.push(put(client, "k/a", "v2", PutOptions::new().with_ignore_lease()).await);
    log.push(put(client, "k/b", "v2", PutOptions::new().with_lease(1003)).await);
    log.push(put(client, "k/c", "v2", PutOptions::new()).await);
    // A txn over keys of several shards (the meta group's path) putting with a lease.
    let txn = Txn::new().and_then(vec![
        TxnOp::put("k/g", "t", Some(PutOptions::new().with_lease(1000))),
        TxnOp::put("k/h", "t", Some(PutOptions::new().with_lease(1000))),
    ]);
    log.push(outcome(client.txn(txn).await, |r| {
        format!("txn rev={}", r.header().unwrap().revision())
    }));
    let bad_txn = Txn::new().and_then(vec![
        TxnOp::put(
            "k/g",
            "t",
            Some(PutOptions::new().with_lease(UNKNOWN_LEASE)),
        ),
        TxnOp::put("k/i", "t", None),
    ]);
    log.push(outcome(client.txn(bad_txn).await, |_| "txn ok".into()));
    for id in [1000, 1003, UNKNOWN_LEASE] {
        log.push(time_to_live(client, id).await);
    }
    log.push(outcome(client.leases().await, |r| {
        let mut ids: Vec<i64> = r
            .leases()
            .iter()
            .map(|l| l.id())
            .filter(|id| *id < 1 << 20)
            .collect();
        ids.sort();
        format!(
            "leases {ids:?} total={} rev={}",
            r.leases().len(),
            r.header().unwrap().revision()
        )
    }));
    log.push(keep_alive_once(client, 1003).await);
    log.push(keep_alive_once(client, UNKNOWN_LEASE).await);

    let revoked = client.lease_revoke(1000).await.unwrap();
    let revoke_rev = revoked.header().unwrap().revision();
    log.push(revoke(revoked));
    log.push(dump(client, "k/", revoke_rev).await);
    log.push(dump(client, "k/", revoke_rev - 1).await);
    log.push(outcome(client.lease_revoke(1000).await, revoke));
    log.push(outcome(client.lease_revoke(-5).await, revoke));
    log.push(time_to_live(client, 1000).await);
    log.push(put(client, "k/a", "v3", PutOptions::new().with_lease(1000)).await);
    log.push(keep_alive_once(client, 1000).await);
    log
}

#[tokio::test]
async fn lease_operations_match_etcd() {
    let etcd = Server::etcd().await;
    let ferrocd = Server::ferrocd(&["--shards", "4"]).await;
    let expected = lease_transcript(&mut etcd.client().await).await;
    let actual = lease_transcript(&mut ferrocd.client().await).await;
    for (i, (e, a)) in expected.iter().zip(&actual).enumerate() {
        assert_eq!(a, e, "step {i} differs (etcd: {e}, ferrocd: {a})");
    }
    assert_eq!(actual.len(), expected.len());
}

/// Polls until `key` is gone; returns when it was first seen gone.
async fn wait_gone(client: &mut Client, key: &str, deadline: Instant) -> Instant {
    loop {
        let now = Instant::now();
        if client.get(key, None).await.unwrap().kvs().is_empty() {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "{key} still exists at the deadline"
        );
        tokio::time::sleep(Duration::from_millis(POLL_INTERVAL_MS)).await;
    }
}

/// Keys of a 2 s lease vanish after the TTL, not before, and within TTL + election timeout
/// (+ polling slack) of the grant or of the last keep-alive.
#[tokio::test]
async fn keys_expire_with_their_lease_never_before_the_ttl() {
    const TTL_S: u64 = 2;
    const SLACK_MS: u64 = 1000 + 1500;
    let server = Server::subject(&["--shards", "4"]).await;
    let mut client = server.client().await;

    let sent = Instant::now();
    let lease = client.lease_grant(TTL_S as i64, None).await.unwrap();
    let acked = Instant::now();
    for key in KEYS {
        client
            .put(key, "v", Some(PutOptions::new().with_lease(lease.id())))
            .await
            .unwrap();
    }
    let deadline = acked + Duration::from_millis(TTL_S * 1000 + SLACK_MS);
    let gone = wait_gone(&mut client, KEYS[0], deadline).await;
    assert!(
        gone >= sent + Duration::from_secs(TTL_S),
        "keys vanished {:?} after the grant was sent, before its TTL",
        gone - sent
    );
    let all = client
        .get("k/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(all.count(), 0, "every key of the lease is gone");
    let ttl = client.lease_time_to_live(lease.id(), None).await.unwrap();
    assert_eq!(ttl.ttl(), -1, "the expired lease is gone");

    // Keep-alives hold a lease past its TTL; it expires TTL after the last one.
    let lease = client.lease_grant(TTL_S as i64, None).await.unwrap();
    client
        .put(
            "k/kept",
            "v",
            Some(PutOptions::new().with_lease(lease.id())),
        )
        .await
        .unwrap();
    let (mut keeper, mut stream) = client.lease_keep_alive(lease.id()).await.unwrap();
    let mut last_sent = Instant::now();
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(TTL_S * 1000 / 2)).await;
        last_sent = Instant::now();
        keeper.keep_alive().await.unwrap();
        let answer = stream.message().await.unwrap().unwrap();
        assert_eq!(answer.ttl(), TTL_S as i64);
        assert_eq!(client.get("k/kept", None).await.unwrap().count(), 1);
    }
    let deadline = Instant::now() + Duration::from_millis(TTL_S * 1000 + SLACK_MS);
    let gone = wait_gone(&mut client, "k/kept", deadline).await;
    assert!(gone >= last_sent + Duration::from_secs(TTL_S));
}

/// TTL left on a lease, with the time it was measured.
/// The ids of every lease, ascending.
async fn lease_ids(client: &mut Client) -> Vec<i64> {
    let mut ids: Vec<i64> = client
        .leases()
        .await
        .unwrap()
        .leases()
        .iter()
        .map(|l| l.id())
        .collect();
    ids.sort();
    ids
}

async fn measured_ttl(client: &mut Client, id: i64) -> (Instant, i64) {
    let ttl = client.lease_time_to_live(id, None).await.unwrap().ttl();
    (Instant::now(), ttl)
}

#[tokio::test]
async fn leases_survive_kill9_with_their_keys_and_are_never_shortened() {
    const LONG_TTL_S: i64 = 60;
    const RENEWED_TTL_S: i64 = 30;
    let mut server =
        Server::ferrocd(&["--shards", "4", "--lease-checkpoint-interval-ms", "200"]).await;
    let mut client = server.client().await;
    let with_id = |id| Some(LeaseGrantOptions::new().with_id(id));
    client.lease_grant(LONG_TTL_S, with_id(1)).await.unwrap();
    client.lease_grant(RENEWED_TTL_S, with_id(2)).await.unwrap();
    client.lease_grant(LONG_TTL_S, with_id(3)).await.unwrap();
    for key in ["k/a", "k/b", "k/c", "k/d"] {
        client
            .put(key, "v", Some(PutOptions::new().with_lease(1)))
            .await
            .unwrap();
    }
    client
        .put("k/r", "v", Some(PutOptions::new().with_lease(2)))
        .await
        .unwrap();

    // Let lease 1 run down a few seconds, so a checkpoint records less than its full TTL.
    let deadline = Instant::now() + Duration::from_secs(10);
    let before = loop {
        let (at, ttl) = measured_ttl(&mut client, 1).await;
        if ttl <= LONG_TTL_S - 4 {
            break (at, ttl);
        }
        assert!(Instant::now() < deadline, "lease 1 does not run down");
        tokio::time::sleep(Duration::from_millis(POLL_INTERVAL_MS)).await;
    };
    // Lease 2 was checkpointed too; renewing it must clear that checkpoint.
    assert!(keep_alive_once(&mut client, 2)
        .await
        .contains(&format!("ttl={RENEWED_TTL_S}")));
    let rev = client
        .get("k/", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    drop(client);
    server.crash_restart().await;

    let mut client = server.client().await;
    let ids = lease_ids(&mut client).await;
    assert_eq!(ids, [1, 2, 3]);
    let after = measured_ttl(&mut client, 1).await;
    // Deadlines: before >= measured + ttl (truncated); after <= measured + ttl + 1.
    assert!(
        after.0 + Duration::from_secs(after.1 as u64 + 1)
            >= before.0 + Duration::from_secs(before.1 as u64),
        "restart shortened lease 1: {before:?} then {after:?}"
    );
    assert!(
        after.1 < LONG_TTL_S - 1,
        "the checkpoint was ignored: {} left",
        after.1
    );
    let renewed = measured_ttl(&mut client, 2).await.1;
    assert!(
        renewed >= RENEWED_TTL_S - 2,
        "renewed lease came back with {renewed}"
    );
    let keys = client
        .lease_time_to_live(1, Some(LeaseTimeToLiveOptions::new().with_keys()))
        .await
        .unwrap();
    assert_eq!(
        keys.keys(),
        [b"k/a", b"k/b", b"k/c", b"k/d"].map(|k| k.to_vec())
    );

    let revoked = client
        .lease_revoke(1)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    assert_eq!(revoked, rev + 1, "one revision for all four deletes");
    let left = client
        .get("k/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(left.kvs().len(), 1, "only k/r (lease 2) is left");
    let old = client
        .get(
            "k/",
            Some(GetOptions::new().with_prefix().with_revision(revoked - 1)),
        )
        .await
        .unwrap();
    assert_eq!(old.count(), 5);
    let empty = client
        .lease_revoke(3)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    assert_eq!(empty, revoked, "a revoke without keys takes no revision");

    // The revoke itself survives a crash.
    drop(client);
    server.crash_restart().await;
    let mut client = server.client().await;
    let ids = lease_ids(&mut client).await;
    assert_eq!(ids, [2]);
    let all = client
        .get("k/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(all.header().unwrap().revision(), revoked);
    assert_eq!(all.kvs().len(), 1);
}
