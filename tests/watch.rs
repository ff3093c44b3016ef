//! The Watch service: a scripted differential test against real etcd (same requests, same
//! responses per watch id), exactness under concurrent writers and watchers (I3), a slow
//! consumer that must catch up without holding others back, and history after kill -9.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Server;
use etcd_client::proto::PbWatchResponse;
use etcd_client::{
    Client, DeleteOptions, EventType, Txn, TxnOp, WatchFilterType, WatchOptions, WatchRequestSender,
};

/// How long a test waits for responses it expects before failing.
const WAIT_TIMEOUT_MS: u64 = 20_000;
/// Watch responses may carry many large events.
const CLIENT_MAX_DECODING_BYTES: usize = 64 * 1024 * 1024;
/// Values whose delete events (with prev kv) add up beyond the 2 MiB at which etcd fragments
/// (its gRPC limit: `--max-request-bytes` plus 512 KiB), so a fragmenting watcher gets fragments.
const BIG_VALUE_BYTES: usize = 600 * 1024;

// ---------------------------------------------------------------------------------------------
// A watch stream whose responses a background task collects.

struct Stream {
    requests: WatchRequestSender,
    log: Arc<Mutex<Vec<PbWatchResponse>>>,
    received: tokio::sync::watch::Receiver<usize>,
    reader: tokio::task::JoinHandle<()>,
}

impl Stream {
    /// Opens a stream whose first request creates a watcher on `key` with `options`.
    async fn open(client: &Client, key: &str, options: WatchOptions) -> Stream {
        let stream = client
            .watch_client()
            .max_decoding_message_size(CLIENT_MAX_DECODING_BYTES)
            .watch(key, Some(options))
            .await
            .expect("open watch stream");
        let (requests, mut responses) = stream.split();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (count, received) = tokio::sync::watch::channel(0);
        let reader = {
            let log = log.clone();
            tokio::spawn(async move {
                while let Ok(Some(response)) = responses.message().await {
                    let len = {
                        let mut log = log.lock().unwrap();
                        log.push(response.0);
                        log.len()
                    };
                    count.send_replace(len);
                }
            })
        };
        Stream {
            requests,
            log,
            received,
            reader,
        }
    }

    async fn create(&mut self, key: &str, options: WatchOptions) {
        let sent = self.requests.watch(key, Some(options)).await;
        sent.expect("send create request");
    }

    async fn cancel(&mut self, watch_id: i64) {
        self.requests
            .cancel(watch_id)
            .await
            .expect("send cancel request");
    }

    async fn request_progress(&mut self) {
        let sent = self.requests.request_progress().await;
        sent.expect("send progress request");
    }

    /// Waits until `done` holds for the responses received so far.
    async fn wait_until(&self, what: &str, done: impl Fn(&[PbWatchResponse]) -> bool) {
        let mut received = self.received.clone();
        let log = self.log.clone();
        let wait = received.wait_for(|_| done(&log.lock().unwrap()));
        let timeout = Duration::from_millis(WAIT_TIMEOUT_MS);
        if tokio::time::timeout(timeout, wait).await.is_err() {
            panic!(
                "timed out waiting for {what}; received:\n{:#?}",
                summary(&self.log.lock().unwrap())
            );
        }
    }

    fn responses(&self) -> Vec<PbWatchResponse> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Responses without the bulk of large values, for failure messages.
fn summary(responses: &[PbWatchResponse]) -> Vec<String> {
    responses
        .iter()
        .map(|r| {
            let events: Vec<String> = r
                .events
                .iter()
                .map(|e| {
                    let kv = e.kv.clone().unwrap_or_default();
                    format!(
                        "{}{}@{}",
                        if e.r#type == 0 { "put " } else { "del " },
                        String::from_utf8_lossy(&kv.key),
                        kv.mod_revision
                    )
                })
                .collect();
            format!(
                "id {} rev {} created {} canceled {} compact {} frag {} {:?} {}",
                r.watch_id,
                r.header.as_ref().map_or(-1, |h| h.revision),
                r.created,
                r.canceled,
                r.compact_revision,
                r.fragment,
                r.cancel_reason,
                events.join(", ")
            )
        })
        .collect()
}

/// The responses of one watch id in order, with headers reduced to their revision (cluster
/// and member ids differ between servers).
fn by_watch_id(responses: &[PbWatchResponse]) -> BTreeMap<i64, Vec<PbWatchResponse>> {
    let mut grouped: BTreeMap<i64, Vec<PbWatchResponse>> = BTreeMap::new();
    for response in responses {
        let mut response = response.clone();
        response.header = response
            .header
            .map(|h| etcd_client::proto::PbResponseHeader {
                revision: h.revision,
                ..Default::default()
            });
        grouped.entry(response.watch_id).or_default().push(response);
    }
    grouped
}

// ---------------------------------------------------------------------------------------------
// A model of the keyspace: which events each write produced, so a test knows when a watcher
// has received everything it should.

#[derive(Clone, Debug)]
struct ModelEvent {
    rev: i64,
    key: Vec<u8>,
    is_delete: bool,
}

#[derive(Default)]
struct Model {
    live: BTreeSet<Vec<u8>>,
    events: Vec<ModelEvent>,
}

impl Model {
    fn put(&mut self, rev: i64, key: &[u8]) {
        self.live.insert(key.to_vec());
        self.events.push(ModelEvent {
            rev,
            key: key.to_vec(),
            is_delete: false,
        });
    }

    fn delete(&mut self, rev: i64, key: &[u8], end: &[u8]) {
        let deleted: Vec<Vec<u8>> = self
            .live
            .iter()
            .filter(|k| in_range(k, key, end))
            .cloned()
            .collect();
        for k in deleted {
            self.live.remove(&k);
            self.events.push(ModelEvent {
                rev,
                key: k,
                is_delete: true,
            });
        }
    }
}

fn in_range(key: &[u8], start: &[u8], end: &[u8]) -> bool {
    match end {
        [] => key == start,
        [0] => key >= start,
        _ => key >= start && key < end,
    }
}

fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    *end.last_mut().unwrap() += 1;
    end
}

/// What a watcher watches, for the model.
#[derive(Clone, Debug)]
struct Spec {
    key: Vec<u8>,
    end: Vec<u8>,
    from: i64,
    no_put: bool,
    no_delete: bool,
}

impl Spec {
    fn new(key: &str, end: &[u8], from: i64) -> Spec {
        Spec {
            key: key.as_bytes().to_vec(),
            end: end.to_vec(),
            from,
            no_put: false,
            no_delete: false,
        }
    }

    fn matches(&self, e: &ModelEvent) -> bool {
        e.rev >= self.from
            && in_range(&e.key, &self.key, &self.end)
            && !(e.is_delete && self.no_delete || !e.is_delete && self.no_put)
    }

    /// The revision of the last event this watcher must receive from `model`.
    fn last_rev(&self, model: &Model) -> Option<i64> {
        model
            .events
            .iter()
            .filter(|e| self.matches(e))
            .map(|e| e.rev)
            .max()
    }
}

/// Whether watcher `id` received the (final fragment of the) response carrying `rev`.
fn has_rev(responses: &[PbWatchResponse], id: i64, rev: i64) -> bool {
    responses.iter().any(|r| {
        r.watch_id == id
            && !r.fragment
            && r.events
                .iter()
                .any(|e| e.kv.as_ref().is_some_and(|kv| kv.mod_revision >= rev))
    })
}

fn count_where(responses: &[PbWatchResponse], f: impl Fn(&PbWatchResponse) -> bool) -> usize {
    responses.iter().filter(|r| f(r)).count()
}

// ---------------------------------------------------------------------------------------------
// The scripted differential test.

async fn put(client: &mut Client, model: &mut Model, key: &str, value: &[u8]) -> i64 {
    let response = client.put(key, value, None).await.expect("put");
    let rev = response.header().unwrap().revision();
    model.put(rev, key.as_bytes());
    rev
}

async fn delete_prefix(client: &mut Client, model: &mut Model, prefix: &str) -> i64 {
    let options = DeleteOptions::new().with_prefix();
    let response = client.delete(prefix, Some(options)).await.expect("delete");
    let rev = response.header().unwrap().revision();
    model.delete(rev, prefix.as_bytes(), &prefix_end(prefix));
    rev
}

/// Everything one server sent on the two streams of the script, by watch id.
struct Transcript {
    first: BTreeMap<i64, Vec<PbWatchResponse>>,
    second: BTreeMap<i64, Vec<PbWatchResponse>>,
}

fn is_created(r: &PbWatchResponse) -> bool {
    r.created
}

fn is_progress(r: &PbWatchResponse) -> bool {
    r.watch_id == -1 && !r.created
}

async fn wait_all(stream: &Stream, specs: &[(i64, Spec)], model: &Model, what: &str) {
    for (id, spec) in specs {
        if let Some(rev) = spec.last_rev(model) {
            let id = *id;
            stream
                .wait_until(&format!("{what}: watcher {id} up to {rev}"), |r| {
                    has_rev(r, id, rev)
                })
                .await;
        }
    }
}

async fn run_script(server: &Server) -> Transcript {
    let mut client = server.client().await;
    let mut model = Model::default();
    let start = client
        .get("k1", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();

    // Stream 1: watchers created before the writes.
    let mut first = Stream::open(&client, "k1", WatchOptions::new().with_prev_key()).await;
    first.create("p/", WatchOptions::new().with_prefix()).await;
    let no_put = WatchOptions::new()
        .with_all_keys()
        .with_filters([WatchFilterType::NoPut]);
    first.create("", no_put).await;
    let from_m = WatchOptions::new()
        .with_from_key()
        .with_filters([WatchFilterType::NoDelete]);
    first.create("m", from_m).await;
    let chosen = WatchOptions::new()
        .with_prefix()
        .with_prev_key()
        .with_watch_id(10)
        .with_filters([WatchFilterType::NoDelete]);
    first.create("p/", chosen.clone()).await;
    first.create("p/", chosen).await; // duplicate id
    first.create("z", WatchOptions::new().with_range("a")).await; // empty range
    let future = WatchOptions::new().with_start_revision(start + 9);
    first.create("k1", future).await;
    let big = WatchOptions::new()
        .with_prefix()
        .with_prev_key()
        .with_fragment();
    first.create("big/", big).await;
    first
        .wait_until("created responses", |r| count_where(r, is_created) == 9)
        .await;

    let mut first_specs = vec![
        (0, Spec::new("k1", b"", 0)),
        (1, Spec::new("p/", &prefix_end("p/"), 0)),
        (
            2,
            Spec {
                no_put: true,
                ..Spec::new("\0", b"\0", 0)
            },
        ),
        (
            3,
            Spec {
                no_delete: true,
                ..Spec::new("m", b"\0", 0)
            },
        ),
        (
            10,
            Spec {
                no_delete: true,
                ..Spec::new("p/", &prefix_end("p/"), 0)
            },
        ),
        (4, Spec::new("k1", b"", start + 9)),
        (5, Spec::new("big/", &prefix_end("big/"), 0)),
    ];

    put(&mut client, &mut model, "k1", b"v1").await;
    put(&mut client, &mut model, "p/a", b"a1").await;
    put(&mut client, &mut model, "p/b", b"b1").await;
    let compact_at = put(&mut client, &mut model, "m1", b"m").await;
    // One revision over several shards: put, put, delete.
    let txn = Txn::new().and_then([
        TxnOp::put("p/c", "c1", None),
        TxnOp::put("k1", "v2", None),
        TxnOp::delete("p/a", None),
    ]);
    let rev = client.txn(txn).await.unwrap().header().unwrap().revision();
    model.put(rev, b"p/c");
    model.put(rev, b"k1");
    model.delete(rev, b"p/a", b"");
    delete_prefix(&mut client, &mut model, "p/").await;
    put(&mut client, &mut model, "n/x", b"x").await;
    put(&mut client, &mut model, "k1", b"v3").await;
    for key in ["big/1", "big/2", "big/3", "big/4"] {
        put(&mut client, &mut model, key, &vec![b'b'; BIG_VALUE_BYTES]).await;
    }
    delete_prefix(&mut client, &mut model, "big/").await;
    let rev = client
        .delete("k1", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    model.delete(rev, b"k1", b"");
    put(&mut client, &mut model, "p/d", b"d1").await;
    wait_all(&first, &first_specs, &model, "before compaction").await;

    client.compact(compact_at, None).await.expect("compact");
    put(&mut client, &mut model, "p/e", b"e1").await;
    put(&mut client, &mut model, "k1", b"v4").await;
    first_specs.retain(|(id, _)| *id != 5);
    wait_all(&first, &first_specs, &model, "after compaction").await;

    // Stream 2: watchers from the past (compacted, at the compaction, after it) and future.
    // No writes while they catch up: etcd reports its current revision on catch-up batches,
    // which would otherwise depend on when its 100 ms sync loop runs.
    let last = put(&mut client, &mut model, "q", b"q").await;
    let mut second = Stream::open(
        &client,
        "",
        WatchOptions::new().with_all_keys().with_start_revision(2),
    )
    .await;
    let from_compaction = WatchOptions::new()
        .with_prefix()
        .with_prev_key()
        .with_start_revision(compact_at);
    second.create("p/", from_compaction).await;
    let k1_after = WatchOptions::new()
        .with_prev_key()
        .with_start_revision(compact_at + 1)
        .with_filters([WatchFilterType::NoDelete]);
    second.create("k1", k1_after).await;
    let all_from = WatchOptions::new()
        .with_all_keys()
        .with_start_revision(compact_at);
    second.create("", all_from).await;
    second
        .create("k1", WatchOptions::new().with_start_revision(last + 5))
        .await;
    let second_specs = [
        (1, Spec::new("p/", &prefix_end("p/"), compact_at)),
        (
            2,
            Spec {
                no_delete: true,
                ..Spec::new("k1", b"", compact_at + 1)
            },
        ),
        (3, Spec::new("\0", b"\0", compact_at)),
    ];
    second
        .wait_until("created responses", |r| count_where(r, is_created) == 5)
        .await;
    wait_all(&second, &second_specs, &model, "catch-up").await;
    second
        .wait_until("compaction cancel", |r| {
            r.iter().any(|r| r.watch_id == 0 && r.canceled)
        })
        .await;
    second.request_progress().await;
    second
        .wait_until("progress", |r| count_where(r, is_progress) == 1)
        .await;
    second.cancel(1).await;
    second.cancel(99).await; // Unknown: no response.
    second.request_progress().await;
    second
        .wait_until("second progress", |r| count_where(r, is_progress) == 2)
        .await;
    Transcript {
        first: by_watch_id(&first.responses()),
        second: by_watch_id(&second.responses()),
    }
}

fn assert_same(
    name: &str,
    etcd: &BTreeMap<i64, Vec<PbWatchResponse>>,
    ours: &BTreeMap<i64, Vec<PbWatchResponse>>,
) {
    let ids: BTreeSet<i64> = etcd.keys().chain(ours.keys()).copied().collect();
    for id in ids {
        let (e, o) = (&etcd.get(&id), &ours.get(&id));
        assert!(
            e == o,
            "{name}, watch id {id}:\netcd:    {:#?}\nferrocd: {:#?}",
            e.map(|r| summary(r)),
            o.map(|r| summary(r))
        );
    }
}

#[tokio::test]
async fn scripted_watches_match_etcd() {
    let etcd = Server::etcd().await;
    let reference = run_script(&etcd).await;
    drop(etcd);
    let subject = Server::subject(&["--shards", "4"]).await;
    let ours = run_script(&subject).await;
    assert_same("stream 1", &reference.first, &ours.first);
    assert_same("stream 2", &reference.second, &ours.second);
    // The script covers what it claims to.
    let fragments = reference.first[&5].iter().filter(|r| r.fragment).count();
    assert!(fragments >= 1, "the big delete was fragmented");
    assert!(reference.second[&0].iter().any(|r| r.compact_revision > 0));
    assert_eq!(reference.first[&-1].len(), 2, "two failed creates");
}

// ---------------------------------------------------------------------------------------------
// Exactness under concurrency (I3) and slow consumers.

/// Events as (revision, key, is_delete), in delivery order.
type History = Vec<(i64, Vec<u8>, bool)>;

fn flatten(responses: &[PbWatchResponse], id: i64) -> History {
    responses
        .iter()
        .filter(|r| r.watch_id == id)
        .flat_map(|r| &r.events)
        .map(|e| {
            let kv = e.kv.as_ref().unwrap();
            (
                kv.mod_revision,
                kv.key.clone(),
                e.r#type == EventType::Delete as i32,
            )
        })
        .collect()
}

/// Every revision's events arrive in one response: no revision is split across responses
/// of one watcher.
fn assert_revisions_whole(responses: &[PbWatchResponse], id: i64) {
    let mut seen: BTreeMap<i64, usize> = BTreeMap::new();
    for (index, r) in responses
        .iter()
        .enumerate()
        .filter(|(_, r)| r.watch_id == id)
    {
        for e in &r.events {
            let rev = e.kv.as_ref().unwrap().mod_revision;
            let first = *seen.entry(rev).or_insert(index);
            assert_eq!(
                first, index,
                "watcher {id}: revision {rev} split across responses"
            );
        }
    }
}

const WRITERS: usize = 4;
const WRITES_PER_WRITER: usize = 150;

/// One writer's acknowledged history. Each writer owns the keys `w/<writer>/*` and
/// `x/<writer>/*`, so it knows exactly which keys its prefix deletes remove.
async fn write_own_keys(mut client: Client, writer: usize) -> History {
    let mut model = Model::default();
    for i in 0..WRITES_PER_WRITER {
        let key = format!("w/{}/{}", writer, i % 7);
        match i % 10 {
            9 => {
                let prefix = format!("w/{writer}/");
                delete_prefix(&mut client, &mut model, &prefix).await;
            }
            5 => {
                // One revision over two shards (most likely).
                let other = format!("x/{writer}/{i}");
                let txn = Txn::new().and_then([
                    TxnOp::put(key.clone(), format!("t{i}"), None),
                    TxnOp::put(other.clone(), "t", None),
                ]);
                let rev = client.txn(txn).await.unwrap().header().unwrap().revision();
                model.put(rev, key.as_bytes());
                model.put(rev, other.as_bytes());
            }
            _ => {
                put(&mut client, &mut model, &key, format!("v{i}").as_bytes()).await;
            }
        }
    }
    let events = model.events.into_iter();
    events.map(|e| (e.rev, e.key, e.is_delete)).collect()
}

#[tokio::test]
async fn concurrent_watchers_get_exactly_their_history() {
    let server = Server::subject(&["--shards", "4"]).await;
    let client = server.client().await;
    let start = client.kv_client().get("w", None).await.unwrap();
    let start_rev = start.header().unwrap().revision();
    // Watchers on overlapping ranges, each on its own stream, created before the writes.
    let ranges: [(&str, Vec<u8>); 4] = [
        ("w/", prefix_end("w/")),
        ("w/1/", prefix_end("w/1/")),
        ("\0", vec![0]),
        ("x/", prefix_end("x/")),
    ];
    let mut streams = Vec::new();
    for (key, end) in &ranges {
        let options = WatchOptions::new().with_range(end.clone());
        streams.push((*key, end, Stream::open(&client, key, options).await));
    }
    for (_, _, stream) in &streams {
        stream
            .wait_until("created", |r| count_where(r, is_created) == 1)
            .await;
    }

    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let client = server.client().await;
        writers.push(tokio::spawn(write_own_keys(client, writer)));
    }
    // A watcher from a past revision, started while the writers run (once some writes are
    // through): it catches up and joins the synced ones.
    let some_events = |r: &[PbWatchResponse]| flatten(r, 0).len() >= 50;
    streams[0].2.wait_until("some writes", some_events).await;
    let past = WatchOptions::new()
        .with_all_keys()
        .with_start_revision(start_rev + 1);
    let past = Stream::open(&client, "", past).await;
    let mut history = History::new();
    for writer in writers {
        history.extend(writer.await.unwrap());
    }
    // Revisions are unique to one writer, so a stable sort keeps each revision's order.
    history.sort_by_key(|e| e.0);

    let all_end = vec![0u8];
    streams.push(("\0", &all_end, past));
    for (key, end, stream) in &streams {
        let expected: History = history
            .iter()
            .filter(|(_, k, _)| in_range(k, key.as_bytes(), end))
            .cloned()
            .collect();
        let last = expected.last().unwrap().0;
        stream
            .wait_until(&format!("watcher on {key:?}"), done_at(last))
            .await;
        let responses = stream.responses();
        assert_eq!(flatten(&responses, 0), expected, "watcher on {key:?}");
        assert_revisions_whole(&responses, 0);
    }
}

fn done_at(rev: i64) -> impl Fn(&[PbWatchResponse]) -> bool {
    move |r| has_rev(r, 0, rev)
}

#[tokio::test]
async fn a_watcher_that_stops_reading_catches_up_and_others_are_not_held_back() {
    let server = Server::subject(&["--shards", "4"]).await;
    let mut client = server.client().await;
    let start_rev = client
        .get("s", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    // A stream that is read only after the writes: a separate connection so that only its
    // own HTTP/2 window fills.
    let slow_client = server.client().await;
    let slow = slow_client
        .watch_client()
        .max_decoding_message_size(CLIENT_MAX_DECODING_BYTES)
        .watch("s/", Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    let (_slow_requests, mut slow_responses) = slow.split();
    let created = slow_responses.message().await.unwrap().unwrap();
    assert!(created.created());
    let fast = Stream::open(&client, "s/", WatchOptions::new().with_prefix()).await;

    // Enough data to overflow the slow stream's queue and HTTP/2 windows many times over.
    const WRITES: usize = 400;
    const VALUE_BYTES: usize = 64 * 1024;
    let value = vec![b'v'; VALUE_BYTES];
    let mut last_rev = 0;
    for i in 0..WRITES {
        let key = format!("s/{}", i % 13);
        last_rev = client
            .put(key, value.clone(), None)
            .await
            .unwrap()
            .header()
            .unwrap()
            .revision();
    }
    // The fast watcher has everything while the slow one has read nothing past its creation.
    fast.wait_until("fast watcher", done_at(last_rev)).await;
    assert_eq!(flatten(&fast.responses(), 0).len(), WRITES);

    let mut got: Vec<i64> = Vec::new();
    let deadline = Instant::now() + Duration::from_millis(WAIT_TIMEOUT_MS);
    while got.last() != Some(&last_rev) {
        assert!(
            Instant::now() < deadline,
            "slow watcher stuck at {:?}",
            got.last()
        );
        let remaining = deadline.saturating_duration_since(Instant::now());
        let response = tokio::time::timeout(remaining, slow_responses.message())
            .await
            .expect("slow watcher response in time")
            .unwrap()
            .expect("stream open");
        got.extend(
            response
                .events()
                .iter()
                .map(|e| e.kv().unwrap().mod_revision()),
        );
    }
    let expected: Vec<i64> = (start_rev + 1..=last_rev).collect();
    assert_eq!(got, expected, "every revision once, in order");
}

/// A progress request made while a watcher of the stream is catching up is answered once it
/// has caught up: after all its events, at a revision no older than the request. ferrocd
/// follows etcd 3.5+ here (which defers the response until the stream's watchers are synced);
/// etcd 3.4 answers at once with its current revision, ahead of the events still to come, so
/// this test runs against ferrocd only.
#[tokio::test]
async fn a_progress_request_waits_for_a_watcher_that_is_catching_up() {
    let server = Server::ferrocd(&["--shards", "2"]).await;
    let mut client = server.client().await;
    // Not read until the writes are done, on its own connection: its queue overflows and its
    // watcher falls back to catch-up.
    let slow_client = server.client().await;
    let slow = slow_client
        .watch_client()
        .max_decoding_message_size(CLIENT_MAX_DECODING_BYTES)
        .watch("pg/", Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    let (mut requests, mut responses) = slow.split();
    let created = responses.message().await.unwrap().unwrap();
    assert!(created.created());
    let created_rev = created.header().unwrap().revision();

    const WRITES: usize = 300;
    const VALUE_BYTES: usize = 64 * 1024;
    let value = vec![b'v'; VALUE_BYTES];
    let mut last_rev = 0;
    for i in 0..WRITES {
        let put = client.put(format!("pg/{}", i % 11), value.clone(), None);
        last_rev = put.await.unwrap().header().unwrap().revision();
    }
    requests.request_progress().await.unwrap();

    let mut got: Vec<i64> = Vec::new();
    let deadline = Instant::now() + Duration::from_millis(WAIT_TIMEOUT_MS);
    let progress_rev = loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let response = tokio::time::timeout(remaining, responses.message())
            .await
            .expect("responses in time")
            .unwrap()
            .expect("stream open");
        if response.watch_id() == -1 {
            break response.header().unwrap().revision();
        }
        let events = response.events().iter();
        got.extend(events.map(|e| e.kv().unwrap().mod_revision()));
    };
    let expected: Vec<i64> = (created_rev + 1..=last_rev).collect();
    assert_eq!(got, expected, "every event before the progress response");
    assert!(
        progress_rev >= last_rev,
        "progress at {progress_rev} after writes up to {last_rev}"
    );
}

#[tokio::test]
async fn watch_from_before_a_crash_reads_history_from_storage() {
    let mut server = Server::subject(&["--shards", "4"]).await;
    let mut client = server.client().await;
    let start = client
        .get("r", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    let mut expected = Vec::new();
    for i in 0..20 {
        let key = format!("r/{}", i % 5);
        let rev = client.put(key.clone(), format!("{i}"), None).await.unwrap();
        expected.push((rev.header().unwrap().revision(), key.into_bytes(), false));
    }
    let del = client
        .delete("r/", Some(DeleteOptions::new().with_prefix()))
        .await
        .unwrap();
    let del_rev = del.header().unwrap().revision();
    for i in 0..5 {
        expected.push((del_rev, format!("r/{i}").into_bytes(), true));
    }
    server.crash_restart().await;
    let client = server.client().await;
    let stream = Stream::open(
        &client,
        "r/",
        WatchOptions::new()
            .with_prefix()
            .with_start_revision(start + 1)
            .with_prev_key(),
    )
    .await;
    stream
        .wait_until("history after restart", done_at(del_rev))
        .await;
    let responses = stream.responses();
    assert_eq!(flatten(&responses, 0), expected);
    // Deletes carry the value they removed.
    let deletes: Vec<_> = responses
        .iter()
        .flat_map(|r| &r.events)
        .filter(|e| e.r#type == 1)
        .collect();
    assert!(deletes.iter().all(|e| e.prev_kv.is_some()));
}

#[tokio::test]
async fn progress_notifications_reach_idle_synced_watchers_only() {
    let server = Server::ferrocd(&[
        "--shards",
        "2",
        "--experimental-watch-progress-notify-interval",
        "100ms",
    ])
    .await;
    let mut client = server.client().await;
    let rev = client
        .put("pn/a", "1", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    let mut stream = Stream::open(
        &client,
        "pn/",
        WatchOptions::new().with_prefix().with_progress_notify(),
    )
    .await;
    stream
        .create("pn/", WatchOptions::new().with_prefix())
        .await;
    let is_notification =
        |r: &PbWatchResponse| !r.created && r.events.is_empty() && r.watch_id >= 0;
    stream
        .wait_until("two progress notifications", |r| {
            count_where(r, is_notification) >= 2
        })
        .await;
    for response in stream.responses().iter().filter(|r| is_notification(r)) {
        assert_eq!(
            response.watch_id, 0,
            "only the watcher that asked is notified"
        );
        assert_eq!(response.header.as_ref().unwrap().revision, rev);
    }
}
