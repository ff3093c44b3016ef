//! The Lock and Election services against real etcd: one scripted session (locks contended
//! by two leases, re-entry, unlock, a lease revoke that frees a lock, a campaign with a waiting
//! challenger, proclaim, observe, resign, the error cases) runs on both servers, and the
//! transcripts of what clients saw must be equal. Lease ids differ between servers, so they
//! are written as `L1`, `L2`... in the transcript, also inside keys.
//!
//! A waiting contender is proven to wait by the order of revisions: it may only be answered at
//! or after the revision that released what it waited for.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::Server;
use etcd_client::{Client, Error, LeaderKey, LockOptions, ProclaimOptions, ResignOptions};

/// How long a contender may take to appear on the server after its request was sent.
const CONTENDER_VISIBLE_TIMEOUT_MS: u64 = 10_000;
/// Pause between two reads looking for a contender's key.
const CONTENDER_POLL_INTERVAL_MS: u64 = 10;
/// TTL of the sessions' leases: long enough never to expire during the test.
const SESSION_TTL_S: i64 = 60;
/// A lease id no server granted.
const UNKNOWN_LEASE: i64 = 0x7a7a_7a7a;

/// What the clients saw, with lease ids replaced by stable names.
struct Transcript {
    lines: Vec<String>,
    leases: BTreeMap<i64, String>,
}

impl Transcript {
    fn new() -> Transcript {
        Transcript {
            lines: Vec::new(),
            leases: BTreeMap::new(),
        }
    }

    fn name_lease(&mut self, id: i64) {
        let name = format!("L{}", self.leases.len() + 1);
        self.leases.insert(id, name);
    }

    /// `text` with every granted lease id (decimal, or hex as in contender keys) named.
    fn normalize(&self, text: &str) -> String {
        self.leases
            .iter()
            .fold(text.to_string(), |text, (id, name)| {
                text.replace(&format!("{id:x}"), name)
                    .replace(&id.to_string(), name)
            })
    }

    fn record(&mut self, line: String) {
        let line = self.normalize(&line);
        println!("{line}");
        self.lines.push(line);
    }
}

fn describe_error(e: &Error) -> String {
    match e {
        Error::GRpcStatus(status) => format!("error {:?}: {}", status.code(), status.message()),
        other => format!("error (not a gRPC status): {other}"),
    }
}

fn utf8(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn lock_key(name: &str, lease: i64) -> String {
    format!("{name}/{lease:x}")
}

async fn grant(client: &mut Client, transcript: &mut Transcript) -> i64 {
    let lease = client
        .lease_grant(SESSION_TTL_S, None)
        .await
        .expect("grant")
        .id();
    transcript.name_lease(lease);
    lease
}

/// Waits until `key` exists: a contender sent from another task has entered and waits.
async fn wait_for_key(client: &mut Client, key: &str) {
    let deadline = Instant::now() + Duration::from_millis(CONTENDER_VISIBLE_TIMEOUT_MS);
    loop {
        let found = client.get(key, None).await.expect("get").kvs().len();
        if found == 1 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "contender key {key} never appeared"
        );
        tokio::time::sleep(Duration::from_millis(CONTENDER_POLL_INTERVAL_MS)).await;
    }
}

fn revision(header: Option<&etcd_client::ResponseHeader>) -> i64 {
    header.expect("a response header").revision()
}

async fn lock_script(server: &Server, t: &mut Transcript) {
    let mut client = server.client().await;
    let (a, b) = (grant(&mut client, t).await, grant(&mut client, t).await);

    let held = client
        .lock("m", Some(LockOptions::new().with_lease(a)))
        .await
        .expect("first lock");
    t.record(format!(
        "lock m by L1: key={} rev={}",
        utf8(held.key()),
        revision(held.header())
    ));
    let again = client
        .lock("m", Some(LockOptions::new().with_lease(a)))
        .await
        .expect("re-lock by the holder");
    t.record(format!(
        "lock m by L1 again: key={} rev={}",
        utf8(again.key()),
        revision(again.header())
    ));

    let mut contender = server.client().await;
    let waiting = tokio::spawn(async move {
        contender
            .lock("m", Some(LockOptions::new().with_lease(b)))
            .await
    });
    wait_for_key(&mut client, &lock_key("m", b)).await;
    let released = client.unlock(held.key()).await.expect("unlock");
    let released_at = revision(released.header());
    t.record(format!("unlock m by L1: rev={released_at}"));
    let acquired = waiting.await.expect("task").expect("second lock");
    let acquired_at = revision(acquired.header());
    assert!(
        acquired_at >= released_at,
        "L2 got the lock at {acquired_at}, before L1 released it at {released_at}"
    );
    t.record(format!(
        "lock m by L2 after the unlock: key={} rev={acquired_at}",
        utf8(acquired.key())
    ));
    client.unlock(acquired.key()).await.expect("unlock by L2");

    let unknown = client
        .lock("m", Some(LockOptions::new().with_lease(UNKNOWN_LEASE)))
        .await;
    t.record(format!(
        "lock with an unknown lease: {}",
        describe_error(&unknown.expect_err("unknown lease"))
    ));

    // Revoking the holder's lease deletes its key, which hands the lock on.
    let held = client
        .lock("n", Some(LockOptions::new().with_lease(a)))
        .await
        .expect("lock n");
    let mut contender = server.client().await;
    let waiting = tokio::spawn(async move {
        contender
            .lock("n", Some(LockOptions::new().with_lease(b)))
            .await
    });
    wait_for_key(&mut client, &lock_key("n", b)).await;
    let revoked = client.lease_revoke(a).await.expect("revoke L1");
    let revoked_at = revision(revoked.header());
    let acquired = waiting.await.expect("task").expect("lock n by L2");
    assert!(revision(acquired.header()) >= revoked_at);
    t.record(format!(
        "lock n: L1 held {}, revoke at {revoked_at}, then L2 holds {}",
        utf8(held.key()),
        utf8(acquired.key())
    ));
    let gone = client.get(held.key(), None).await.expect("get").count();
    t.record(format!("L1's lock key after the revoke: count={gone}"));
}

fn leader_line(what: &str, kv: Option<&etcd_client::KeyValue>) -> String {
    let kv = kv.expect("a leader kv");
    format!(
        "{what}: key={} value={} create={} mod={} lease={}",
        utf8(kv.key()),
        utf8(kv.value()),
        kv.create_revision(),
        kv.mod_revision(),
        kv.lease()
    )
}

async fn election_script(server: &Server, t: &mut Transcript) {
    let mut client = server.client().await;
    let (a, b) = (grant(&mut client, t).await, grant(&mut client, t).await);

    let won = client.campaign("e", "a", a).await.expect("campaign L1");
    let leader_a: LeaderKey = won.leader().expect("leader key").clone();
    t.record(format!(
        "campaign e by L1: key={} rev={} lease={} header={}",
        utf8(leader_a.key()),
        leader_a.rev(),
        leader_a.lease(),
        revision(won.header())
    ));
    let current = client.leader("e").await.expect("leader");
    t.record(leader_line("leader e", current.kv()));

    let mut observer = client.observe("e").await.expect("observe");
    let first = observer.message().await.expect("observe").expect("message");
    t.record(leader_line("observed", first.kv()));

    let mut challenger_client = server.client().await;
    let challenger = tokio::spawn(async move { challenger_client.campaign("e", "b", b).await });
    wait_for_key(&mut client, &lock_key("e", b)).await;

    let proclaimed = client
        .proclaim(
            "a2",
            Some(ProclaimOptions::new().with_leader(leader_a.clone())),
        )
        .await
        .expect("proclaim");
    t.record(format!(
        "proclaim a2: rev={}",
        revision(proclaimed.header())
    ));
    let next = observer.message().await.expect("observe").expect("message");
    t.record(leader_line("observed", next.kv()));

    let stale = leader_a.clone().with_rev(leader_a.rev() - 1);
    let refused = client
        .proclaim("x", Some(ProclaimOptions::new().with_leader(stale)))
        .await;
    t.record(format!(
        "proclaim with a stale leader key: {}",
        describe_error(&refused.expect_err("not leader"))
    ));

    let resigned = client
        .resign(Some(ResignOptions::new().with_leader(leader_a)))
        .await
        .expect("resign");
    let resigned_at = revision(resigned.header());
    t.record(format!("resign L1: rev={resigned_at}"));
    let won = challenger.await.expect("task").expect("campaign L2");
    let leader_b = won.leader().expect("leader key").clone();
    t.record(format!(
        "campaign e by L2 won: key={} rev={} header={}",
        utf8(leader_b.key()),
        leader_b.rev(),
        revision(won.header())
    ));
    let next = observer.message().await.expect("observe").expect("message");
    t.record(leader_line("observed", next.kv()));

    client
        .resign(Some(ResignOptions::new().with_leader(leader_b)))
        .await
        .expect("resign L2");
    let none = client.leader("e").await;
    t.record(format!(
        "leader after everyone resigned: {}",
        describe_error(&none.expect_err("no leader"))
    ));
}

async fn transcript_of(server: &Server) -> Vec<String> {
    let mut transcript = Transcript::new();
    lock_script(server, &mut transcript).await;
    election_script(server, &mut transcript).await;
    transcript.lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lock_and_election_match_etcd() {
    let etcd = Server::etcd().await;
    let expected = transcript_of(&etcd).await;
    let ferrocd = Server::ferrocd(&["--shards", "4"]).await;
    let actual = transcript_of(&ferrocd).await;
    assert_eq!(
        actual,
        expected,
        "ferrocd (left) differs from etcd (right); ferrocd log:\n{}",
        ferrocd.log()
    );
}
