//! Watch under load (issue 4, "Watch stress"): thousands of watchers on overlapping ranges,
//! multiplexed over many connections, while writers run. Every watcher must receive exactly
//! the acknowledged events of its range from its start revision on: in revision order, none
//! missing, none repeated, all events of one revision in one response. Some watchers are
//! created from past revisions while the writers run; range watchers span every shard, and
//! the writers' transactions put keys on two shards at one revision.
//!
//! The same load, smaller, runs against a node whose watch journals hold two revisions per
//! shard, so the hubs fall behind the journals and serve their watchers from the shards'
//! MVCC history (the "hub falls behind" path of docs/ARCHITECTURE.md, "Watch").

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Server;
use etcd_client::proto::PbWatchResponse;
use etcd_client::{
    Client, DeleteOptions, EventType, Txn, TxnOp, WatchFilterType, WatchOptions, WatchRequestSender,
};

/// How long the test waits for all watchers to receive their events after the writes.
const WAIT_TIMEOUT_MS: u64 = 45_000;
/// Each writer owns `t/<writer>/<group>/<key>` and `u/<writer>/<key>`.
const GROUPS: usize = 4;
const KEYS_PER_GROUP: usize = 5;
const CROSS_KEYS: usize = 5;

/// (revision, key, is_delete) in delivery order.
type History = Vec<(i64, Vec<u8>, bool)>;

/// The size of one run.
struct Load {
    connections: usize,
    /// Created before the writes start.
    watchers_per_connection: usize,
    /// Created from past revisions while the writers run.
    past_watchers_per_connection: usize,
    writers: usize,
    writes_per_writer: usize,
}

#[tokio::test]
async fn two_thousand_watchers_get_exactly_their_history_while_writers_run() {
    let server = Server::subject(&["--shards", "4"]).await;
    let load = Load {
        connections: 16,
        watchers_per_connection: 125,
        past_watchers_per_connection: 8,
        writers: 4,
        writes_per_writer: 120,
    };
    run(&server, &load).await;
}

#[tokio::test]
async fn watchers_are_exact_when_the_hubs_fall_behind_tiny_journals() {
    // Only ferrocd has journals; two revisions per shard cannot hold a hub's window once a
    // group commit makes several revisions of one shard visible at once.
    let server = Server::ferrocd(&["--shards", "2", "--watch-journal-max-revisions", "2"]).await;
    let load = Load {
        connections: 4,
        watchers_per_connection: 40,
        past_watchers_per_connection: 4,
        writers: 4,
        writes_per_writer: 80,
    };
    run(&server, &load).await;
}

async fn run(server: &Server, load: &Load) {
    let client = server.client().await;
    let start_rev = client
        .kv_client()
        .get("t", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    let mut connections = Vec::new();
    for c in 0..load.connections {
        let specs = (0..load.watchers_per_connection)
            .map(|i| Spec::pick(c * load.watchers_per_connection + i, load.writers, 0))
            .collect();
        connections.push(Connection::open(server, specs).await);
    }
    for connection in &connections {
        connection.wait_created().await;
    }

    let mut writers = Vec::new();
    for writer in 0..load.writers {
        let client = server.client().await;
        let writes = load.writes_per_writer;
        writers.push(tokio::spawn(write(client, writer, writes)));
    }
    // Watchers from past revisions, created while the writers run: once a third of the writes
    // are through, each starting somewhere between the first write and now.
    let third = start_rev + (load.writers * load.writes_per_writer / 3) as i64;
    // The first watcher watches every `t/` key, and every revision writes one.
    let past_third = |r: &Received| r.upto.get(&1).is_some_and(|&rev| rev >= third);
    connections[0]
        .wait_until("a third of the writes", past_third)
        .await;
    let now = connections[0].received.lock().unwrap().upto[&1];
    for (c, connection) in connections.iter_mut().enumerate() {
        for i in 0..load.past_watchers_per_connection {
            let n = c * load.past_watchers_per_connection + i;
            let from = start_rev + 1 + (n as i64 * 37) % (now - start_rev);
            connection.add(Spec::pick(n, load.writers, from)).await;
        }
    }

    let mut history = History::new();
    for writer in writers {
        history.extend(writer.await.unwrap());
    }
    // Revisions belong to one writer each, so a stable sort keeps each revision's event order.
    history.sort_by_key(|e| e.0);
    let last_rev = history.last().unwrap().0;

    for connection in &connections {
        connection.check(&history, last_rev).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Writers.

fn key(writer: usize, group: usize, k: usize) -> String {
    format!("t/{writer}/{group}/{k}")
}

/// One writer's acknowledged history: puts, two-shard transactions and prefix deletes of its
/// own keys, so it knows exactly which keys each delete removes.
async fn write(mut client: Client, writer: usize, writes: usize) -> History {
    let mut live: BTreeSet<Vec<u8>> = BTreeSet::new();
    let mut history = History::new();
    for i in 0..writes {
        let group = (i / 3) % GROUPS;
        let own = key(writer, group, i % KEYS_PER_GROUP);
        match i % 10 {
            9 => {
                let prefix = format!("t/{writer}/{group}/");
                let options = DeleteOptions::new().with_prefix();
                let response = client.delete(prefix.clone(), Some(options)).await.unwrap();
                let rev = response.header().unwrap().revision();
                let gone: Vec<Vec<u8>> = live
                    .iter()
                    .filter(|k| k.starts_with(prefix.as_bytes()))
                    .cloned()
                    .collect();
                assert_eq!(
                    response.deleted(),
                    gone.len() as i64,
                    "writer {writer} model"
                );
                for k in gone {
                    live.remove(&k);
                    history.push((rev, k, true));
                }
            }
            4 => {
                let cross = format!("u/{writer}/{}", i % CROSS_KEYS);
                let txn = Txn::new().and_then([
                    TxnOp::put(own.clone(), format!("t{i}"), None),
                    TxnOp::put(cross.clone(), format!("t{i}"), None),
                ]);
                let rev = client.txn(txn).await.unwrap().header().unwrap().revision();
                for k in [own, cross] {
                    live.insert(k.clone().into_bytes());
                    history.push((rev, k.into_bytes(), false));
                }
            }
            _ => {
                let response = client.put(own.clone(), format!("v{i}"), None).await;
                let rev = response.unwrap().header().unwrap().revision();
                live.insert(own.clone().into_bytes());
                history.push((rev, own.into_bytes(), false));
            }
        }
    }
    history
}

// ---------------------------------------------------------------------------------------------
// Watchers.

/// What one watcher watches.
#[derive(Clone, Debug)]
struct Spec {
    key: Vec<u8>,
    /// etcd form: empty = one key, `"\0"` = every key `>= key`.
    end: Vec<u8>,
    /// Start revision; 0 = now.
    from: i64,
    filter: Option<WatchFilterType>,
}

fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    *end.last_mut().unwrap() += 1;
    end
}

impl Spec {
    /// The `n`th watcher of a run: overlapping prefixes at every level of the writers'
    /// keyspace, single keys, ranges across writers, open-ended ranges and filters.
    fn pick(n: usize, writers: usize, from: i64) -> Spec {
        let w = n % writers;
        let g = (n / writers) % GROUPS;
        let prefix = |p: String| (p.clone().into_bytes(), prefix_end(&p));
        let (key, end) = match n % 8 {
            0 => prefix("t/".into()),
            1 => prefix(format!("t/{w}/")),
            2 => prefix(format!("t/{w}/{g}/")),
            3 => (key(w, g, n % KEYS_PER_GROUP).into_bytes(), Vec::new()),
            4 => (format!("t/{w}/{g}/").into_bytes(), b"t/~".to_vec()),
            5 => (vec![0], vec![0]),
            6 => prefix("u/".into()),
            _ => (format!("t/{w}/").into_bytes(), vec![0]),
        };
        let filter = match n % 16 {
            7 => Some(WatchFilterType::NoDelete),
            15 => Some(WatchFilterType::NoPut),
            _ => None,
        };
        Spec {
            key,
            end,
            from,
            filter,
        }
    }

    fn options(&self, watch_id: i64) -> WatchOptions {
        let mut options = WatchOptions::new()
            .with_watch_id(watch_id)
            .with_range(self.end.clone())
            .with_start_revision(self.from);
        if let Some(filter) = self.filter {
            options = options.with_filters([filter]);
        }
        options
    }

    fn matches(&self, rev: i64, key: &[u8], is_delete: bool) -> bool {
        let in_range = match self.end.as_slice() {
            [] => key == self.key,
            [0] => key >= self.key.as_slice(),
            end => key >= self.key.as_slice() && key < end,
        };
        let filtered = match self.filter {
            Some(WatchFilterType::NoPut) => !is_delete,
            Some(WatchFilterType::NoDelete) => is_delete,
            None => false,
        };
        in_range && !filtered && rev >= self.from
    }

    /// The events this watcher must receive; `history` is sorted by revision.
    fn expected(&self, history: &History, created_at: i64) -> History {
        let from = match self.from {
            0 => created_at + 1,
            from => from,
        };
        let spec = Spec {
            from,
            ..self.clone()
        };
        let events = history.iter();
        events
            .filter(|(rev, k, del)| spec.matches(*rev, k, *del))
            .cloned()
            .collect()
    }
}

/// What a connection's stream received, by watch id.
#[derive(Default)]
struct Received {
    /// Per watch id: the header revision and events of each event response, in order.
    events: BTreeMap<i64, Vec<(i64, History)>>,
    /// Per watch id: the header revision of its created response.
    created: BTreeMap<i64, i64>,
    /// Per watch id: the highest event revision received.
    upto: BTreeMap<i64, i64>,
    /// Responses that are neither created nor events (cancels, progress): must not happen.
    other: Vec<String>,
}

impl Received {
    fn record(&mut self, response: PbWatchResponse) {
        let id = response.watch_id;
        let header_rev = response.header.as_ref().map_or(0, |h| h.revision);
        if response.created && !response.canceled {
            self.created.insert(id, header_rev);
            return;
        }
        if response.canceled || response.events.is_empty() || response.fragment {
            self.other.push(format!("{response:?}"));
            return;
        }
        let events: History = response
            .events
            .iter()
            .map(|e| {
                let kv = e.kv.as_ref().unwrap();
                let is_delete = e.r#type == EventType::Delete as i32;
                (kv.mod_revision, kv.key.clone(), is_delete)
            })
            .collect();
        let last = events.last().unwrap().0;
        let upto = self.upto.entry(id).or_default();
        *upto = (*upto).max(last);
        self.events
            .entry(id)
            .or_default()
            .push((header_rev, events));
    }
}

/// One client connection with one watch stream carrying many watchers.
struct Connection {
    requests: WatchRequestSender,
    specs: Vec<Spec>,
    received: Arc<Mutex<Received>>,
    changed: tokio::sync::watch::Receiver<u64>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Connection {
    /// Watch ids are `1..`, in the order of `specs`.
    async fn open(server: &Server, specs: Vec<Spec>) -> Connection {
        let client = server.client().await;
        let (first, rest) = specs.split_first().expect("at least one watcher");
        let stream = client
            .watch_client()
            .watch(first.key.clone(), Some(first.options(1)))
            .await
            .expect("open watch stream");
        let (requests, mut responses) = stream.split();
        let received = Arc::new(Mutex::new(Received::default()));
        let (tell, changed) = tokio::sync::watch::channel(0u64);
        let reader = {
            let received = received.clone();
            tokio::spawn(async move {
                while let Ok(Some(response)) = responses.message().await {
                    received.lock().unwrap().record(response.0);
                    tell.send_modify(|n| *n += 1);
                }
            })
        };
        let mut connection = Connection {
            requests,
            specs: vec![first.clone()],
            received,
            changed,
            reader,
        };
        for spec in rest {
            connection.add(spec.clone()).await;
        }
        connection
    }

    async fn add(&mut self, spec: Spec) {
        let id = self.specs.len() as i64 + 1;
        let sent = self
            .requests
            .watch(spec.key.clone(), Some(spec.options(id)));
        sent.await.expect("send create request");
        self.specs.push(spec);
    }

    async fn wait_until(&self, what: &str, done: impl Fn(&Received) -> bool) {
        let mut changed = self.changed.clone();
        let received = self.received.clone();
        let wait = changed.wait_for(|_| done(&received.lock().unwrap()));
        let timeout = Duration::from_millis(WAIT_TIMEOUT_MS);
        if tokio::time::timeout(timeout, wait).await.is_err() {
            let received = self.received.lock().unwrap();
            panic!(
                "timed out waiting for {what}: created {} of {}, other responses {:?}",
                received.created.len(),
                self.specs.len(),
                received.other
            );
        }
    }

    async fn wait_created(&self) {
        let n = self.specs.len();
        self.wait_until("created responses", |r| r.created.len() == n)
            .await;
    }

    /// Waits for every watcher's last expected event, then compares what each received.
    async fn check(&self, history: &History, last_rev: i64) {
        self.wait_created().await;
        let expected: Vec<History> = {
            let received = self.received.lock().unwrap();
            let ids = 1..=self.specs.len() as i64;
            let specs = ids.zip(&self.specs);
            specs
                .map(|(id, spec)| spec.expected(history, received.created[&id]))
                .collect()
        };
        let all_there = |r: &Received| {
            expected
                .iter()
                .enumerate()
                .all(|(i, events)| match events.last() {
                    Some(&(rev, _, _)) => r.upto.get(&(i as i64 + 1)) >= Some(&rev),
                    None => true,
                })
        };
        self.wait_until("every watcher's last event", all_there)
            .await;
        let received = self.received.lock().unwrap();
        assert!(
            received.other.is_empty(),
            "unexpected: {:?}",
            received.other
        );
        for (i, (spec, expected)) in self.specs.iter().zip(&expected).enumerate() {
            let id = i as i64 + 1;
            let responses = received.events.get(&id).map_or(&[][..], |r| r.as_slice());
            let got: History = responses.iter().flat_map(|(_, e)| e.clone()).collect();
            assert!(
                got == *expected,
                "watcher {id} {spec:?}: got {} events, expected {}; first difference at {:?}",
                got.len(),
                expected.len(),
                got.iter()
                    .zip(expected)
                    .position(|(a, b)| a != b)
                    .unwrap_or(got.len().min(expected.len()))
            );
            assert_revisions_whole(id, responses, last_rev);
        }
    }
}

/// Each revision's events arrive in one response, whose header revision is at least that
/// revision and at most the last write's.
fn assert_revisions_whole(id: i64, responses: &[(i64, History)], last_rev: i64) {
    let mut previous_rev = 0;
    for (header_rev, events) in responses {
        let first_rev = events.first().unwrap().0;
        assert!(
            first_rev > previous_rev,
            "watcher {id}: revision {first_rev} split across responses or out of order"
        );
        previous_rev = events.last().unwrap().0;
        assert!(
            (previous_rev..=last_rev).contains(header_rev),
            "watcher {id}: header revision {header_rev} for events up to {previous_rev}"
        );
    }
}
