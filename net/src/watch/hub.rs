//! The watch hub of one core: delivers the events of every visible revision to the synced
//! watchers of the streams this core serves, and runs the catch-up of its unsynced ones.
//!
//! * One task per core waits for the visibility watermark to pass its cursor, reads the new
//!   window `(cursor, visible]` from every shard's journal once, and for each revision sends
//!   one response per matching synced watcher (header revision = that revision) with a
//!   non-blocking `try_send` into the watcher's stream queue. A watcher whose queue is full
//!   becomes *unsynced* at the first revision it did not get; nothing waits for it.
//! * An unsynced watcher has its own task that reads its range's events from `next_rev` on,
//!   from the journals while they still hold that window, else from the shards' MVCC
//!   history, sends them in batches (waiting for queue space: only this watcher waits), and
//!   rejoins the synced set once it reaches the hub's cursor. Hub and catch-up run on the same
//!   core, so the switch back happens between two dispatches: no revision is missed or
//!   repeated. A watcher whose next revision was compacted is cancelled with
//!   `compact_revision` set, as etcd.
//!
//! Matching uses an exact-key map plus a list of range watchers, so a revision costs one map
//! lookup per event plus one comparison per range watcher of the core. An interval tree
//! would make the range part logarithmic, which matters once a core holds many thousands of
//! range watchers on disjoint ranges.

use crate::node::errors::KvError;
use crate::node::shard::ShardMsg;
use crate::node::{apply, Shared};
use crate::watch::journal::{read_window, to_pb, MergedRevision};
use event_listener::Event;
use ferrocd_api::etcdserverpb::{ResponseHeader, WatchResponse};
use ferrocd_api::mvccpb::{self, event::EventType};
use ferrocd_engine::mvcc::Changes;
use futures::channel::oneshot;
use prost::Message;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

/// Revisions one catch-up step reads (etcd's `watchBatchMaxRevs`): a response carries the
/// events of at most this many revisions.
pub const CATCH_UP_MAX_REVS: usize = 1000;

/// Where a stream's responses go: its bounded queue (each item is one response, or the
/// fragments of one, which must stay together) and the fragment size limit.
#[derive(Clone)]
pub struct Sink {
    pub tx: async_channel::Sender<Vec<WatchResponse>>,
    /// Responses of this size or more are split when the watcher asked for fragments.
    pub fragment_bytes: usize,
}

/// What a watcher watches and how (a create request, normalised).
#[derive(Clone, Debug)]
pub struct WatchSpec {
    pub key: Vec<u8>,
    /// etcd form: empty = only `key`, `"\0"` = every key `>= key`.
    pub end: Vec<u8>,
    pub prev_kv: bool,
    pub fragment: bool,
    pub progress_notify: bool,
    pub no_put: bool,
    pub no_delete: bool,
}

impl WatchSpec {
    fn is_range(&self) -> bool {
        apply::is_range(&self.end)
    }

    fn matches(&self, key: &[u8]) -> bool {
        apply::in_range(key, &self.key, &self.end)
    }

    fn passes(&self, event: &mvccpb::Event) -> bool {
        let is_put = event.r#type == EventType::Put as i32;
        !(is_put && self.no_put || !is_put && self.no_delete)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Served by the hub; revisions below `min_rev` (a future start revision) are skipped.
    Synced { min_rev: i64 },
    /// Served by its catch-up task, which sends `next_rev` next.
    Unsynced { next_rev: i64 },
    /// Cancelled (by the client, by compaction, or because its stream ended).
    Done,
}

pub struct Watcher {
    /// The watch id on its stream.
    pub id: i64,
    /// Unique among the hub's watchers.
    uid: u64,
    pub spec: WatchSpec,
    sink: Sink,
    state: Cell<State>,
    /// etcd's progress elision: a periodic progress notification is skipped once after the
    /// watcher got events.
    progress_due: Cell<bool>,
}

/// The synced watchers, indexed for matching.
#[derive(Default)]
struct SyncedIndex {
    exact: HashMap<Vec<u8>, HashMap<u64, Rc<Watcher>>>,
    ranges: HashMap<u64, Rc<Watcher>>,
}

impl SyncedIndex {
    fn insert(&mut self, w: &Rc<Watcher>) {
        let slot = match w.spec.is_range() {
            true => &mut self.ranges,
            false => self.exact.entry(w.spec.key.clone()).or_default(),
        };
        assert!(
            slot.insert(w.uid, w.clone()).is_none(),
            "watcher synced twice"
        );
    }

    fn remove(&mut self, w: &Watcher) {
        let removed = if w.spec.is_range() {
            self.ranges.remove(&w.uid)
        } else {
            let watchers = self.exact.get_mut(&w.spec.key).expect("synced key watcher");
            let removed = watchers.remove(&w.uid);
            if watchers.is_empty() {
                self.exact.remove(&w.spec.key);
            }
            removed
        };
        assert!(removed.is_some(), "removing a watcher that is not synced");
    }

    fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.ranges.is_empty()
    }

    fn all(&self) -> Vec<Rc<Watcher>> {
        let exact = self.exact.values().flat_map(|m| m.values());
        exact.chain(self.ranges.values()).cloned().collect()
    }

    fn matching<'a>(&'a self, key: &[u8]) -> impl Iterator<Item = &'a Rc<Watcher>> + 'a {
        let exact = self.exact.get(key).into_iter().flat_map(|m| m.values());
        let key = key.to_vec();
        exact.chain(self.ranges.values().filter(move |w| w.spec.matches(&key)))
    }
}

pub struct Hub {
    shared: Arc<Shared>,
    /// The hub has taken on every revision up to here: synced watchers get each of them
    /// from the hub (or fall out and catch up to it), watchers joining start above it.
    cursor: Cell<i64>,
    synced: RefCell<SyncedIndex>,
    /// Watchers moved to catch-up whose task has not started yet.
    desynced: RefCell<Vec<Rc<Watcher>>>,
    next_uid: Cell<u64>,
    closing: Cell<bool>,
    closed: Event,
    /// Announced when the cursor moves and when a watcher stops catching up (it rejoined the
    /// synced set or ended), for sessions that defer a progress response until then.
    progressed: Event,
}

impl Hub {
    pub fn new(shared: Arc<Shared>) -> Rc<Hub> {
        let cursor = shared.seq.visible();
        Rc::new(Hub {
            shared,
            cursor: Cell::new(cursor),
            synced: RefCell::default(),
            desynced: RefCell::default(),
            next_uid: Cell::new(0),
            closing: Cell::new(false),
            closed: Event::new(),
            progressed: Event::new(),
        })
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The revision up to which synced watchers have been served.
    pub fn cursor(&self) -> i64 {
        self.cursor.get()
    }

    /// Ends the hub's task and every stream of this core (node shutdown).
    pub fn close(&self) {
        self.closing.set(true);
        self.closed.notify(usize::MAX);
    }

    pub async fn wait_closed(&self) {
        ferrocd_raft::notify::wait_until(&self.closed, || self.closing.get()).await
    }

    /// Dispatches every visible revision to the synced watchers until the hub is closed.
    pub async fn run(self: Rc<Self>) {
        loop {
            let cursor = self.cursor.get();
            let advanced = futures_lite::future::or(
                async {
                    self.shared.seq.wait_visible(cursor + 1).await;
                    true
                },
                async {
                    self.wait_closed().await;
                    false
                },
            )
            .await;
            if !advanced {
                return;
            }
            let upto = self.shared.seq.visible();
            // The cursor moves first: a watcher that rejoins the synced set while this window
            // is dispatched starts above it, one that falls out catches up to it.
            self.cursor.set(upto);
            if !self.synced.borrow().is_empty() {
                match read_window(&self.shared.journals, cursor, upto) {
                    Some(window) => window.iter().for_each(|r| self.dispatch(r)),
                    // This core fell behind the journals: everyone reads from storage.
                    None => self.desync_all(cursor + 1),
                }
            }
            self.start_catch_ups();
            self.progressed.notify(usize::MAX);
        }
    }

    /// Adds a watcher whose first revision is `start_rev`.
    pub fn register(
        self: &Rc<Self>,
        id: i64,
        spec: WatchSpec,
        sink: Sink,
        start_rev: i64,
    ) -> Rc<Watcher> {
        let uid = self.next_uid.get();
        self.next_uid.set(uid + 1);
        let w = Rc::new(Watcher {
            id,
            uid,
            spec,
            sink,
            state: Cell::new(State::Done),
            progress_due: Cell::new(true),
        });
        if start_rev > self.cursor.get() {
            self.join_synced(&w, start_rev);
        } else {
            self.desync(&w, start_rev);
            self.start_catch_ups();
        }
        w
    }

    /// Stops a watcher; nothing is sent for it afterwards by the hub or its catch-up.
    pub fn cancel(&self, w: &Watcher) {
        if let State::Synced { .. } = w.state.get() {
            self.synced.borrow_mut().remove(w);
        }
        self.end(w);
    }

    fn end(&self, w: &Watcher) {
        w.state.set(State::Done);
        self.progressed.notify(usize::MAX);
    }

    /// Whether `w` is still being caught up: it may lack events up to the hub's cursor. A
    /// synced watcher has been sent (queued) every event up to the cursor.
    pub fn is_catching_up(&self, w: &Watcher) -> bool {
        matches!(w.state.get(), State::Unsynced { .. })
    }

    /// Resolves once `ready()` holds, re-checked whenever the cursor moves or a watcher
    /// stops catching up.
    pub async fn wait_progress(&self, ready: impl Fn() -> bool) {
        ferrocd_raft::notify::wait_until(&self.progressed, ready).await
    }

    /// A periodic progress notification (etcd's `progress_notify`): an empty response at the
    /// hub's cursor, only to a synced watcher that got no events since the last one. Dropped
    /// when the queue is full (the watcher is busy receiving events anyway).
    pub fn notify_progress(&self, w: &Watcher) {
        if w.progress_due.replace(true) && matches!(w.state.get(), State::Synced { .. }) {
            let response = WatchResponse {
                header: Some(self.shared.header(self.cursor.get())),
                watch_id: w.id,
                ..Default::default()
            };
            let _ = w.sink.tx.try_send(vec![response]);
        }
    }

    fn join_synced(&self, w: &Rc<Watcher>, min_rev: i64) {
        w.state.set(State::Synced { min_rev });
        self.synced.borrow_mut().insert(w);
    }

    /// Moves `w` to catch-up from `next_rev` on; its task starts with `start_catch_ups`.
    fn desync(&self, w: &Rc<Watcher>, next_rev: i64) {
        if let State::Synced { .. } = w.state.get() {
            self.synced.borrow_mut().remove(w);
        }
        w.state.set(State::Unsynced { next_rev });
        self.desynced.borrow_mut().push(w.clone());
    }

    /// Spawns the catch-up tasks of watchers desynced since the last call. Never called in
    /// the middle of a window, so no catch-up observes a half-dispatched one.
    fn start_catch_ups(self: &Rc<Self>) {
        for w in self.desynced.take() {
            glommio::spawn_local(self.clone().catch_up(w)).detach();
        }
    }

    fn desync_all(&self, next_rev: i64) {
        let all = self.synced.borrow().all();
        for w in all {
            let State::Synced { min_rev } = w.state.get() else {
                unreachable!("indexed watchers are synced")
            };
            self.desync(&w, next_rev.max(min_rev));
        }
    }

    /// Sends one revision's events to every synced watcher they match.
    fn dispatch(&self, revision: &MergedRevision) {
        let events = revision.events();
        let mut matched: Vec<(Rc<Watcher>, Vec<&mvccpb::Event>)> = Vec::new();
        let mut slot_of: HashMap<u64, usize> = HashMap::new();
        {
            let synced = self.synced.borrow();
            for &event in &events {
                let key = &event.kv.as_ref().expect("events carry a kv").key;
                for w in synced.matching(key) {
                    let State::Synced { min_rev } = w.state.get() else {
                        unreachable!("indexed watchers are synced")
                    };
                    if revision.rev < min_rev {
                        continue;
                    }
                    let slot = *slot_of.entry(w.uid).or_insert_with(|| {
                        matched.push((w.clone(), Vec::new()));
                        matched.len() - 1
                    });
                    matched[slot].1.push(event);
                }
            }
        }
        for (w, events) in matched {
            let header = self.shared.header(revision.rev);
            let Some(parts) = self.responses(&w, header, events) else {
                continue;
            };
            // Fragments go as one queue item, so they stay together and all-or-nothing.
            match w.sink.tx.try_send(parts) {
                Ok(()) => w.progress_due.set(false),
                Err(async_channel::TrySendError::Full(_)) => self.desync(&w, revision.rev),
                // The stream is gone; its session cancels its watchers.
                Err(async_channel::TrySendError::Closed(_)) => {}
            }
        }
    }

    /// The response(s) carrying `events` for `w` after its filters, `None` if none pass.
    /// `prev_kv` follows etcd, which reads it at `mod_revision - 1` when sending: absent when
    /// that revision is compacted.
    fn responses<'a>(
        &self,
        w: &Watcher,
        header: ResponseHeader,
        events: impl IntoIterator<Item = &'a mvccpb::Event>,
    ) -> Option<Vec<WatchResponse>> {
        let compacted = self.shared.compacted();
        let events: Vec<mvccpb::Event> = events
            .into_iter()
            .filter(|e| w.spec.passes(e))
            .map(|e| {
                let mod_revision = e.kv.as_ref().map_or(0, |kv| kv.mod_revision);
                // The previous kv is read at `mod_revision - 1`, which must not be compacted.
                let keep_prev = w.spec.prev_kv && mod_revision > compacted;
                mvccpb::Event {
                    r#type: e.r#type,
                    kv: e.kv.clone(),
                    prev_kv: if keep_prev { e.prev_kv.clone() } else { None },
                }
            })
            .collect();
        if events.is_empty() {
            return None;
        }
        let response = WatchResponse {
            header: Some(header),
            watch_id: w.id,
            events,
            ..Default::default()
        };
        Some(match w.spec.fragment {
            true => fragments(response, w.sink.fragment_bytes),
            false => vec![response],
        })
    }

    /// Catch-up of one unsynced watcher (see the module documentation).
    async fn catch_up(self: Rc<Self>, w: Rc<Watcher>) {
        loop {
            let State::Unsynced { next_rev } = w.state.get() else {
                return;
            };
            let target = self.cursor.get();
            if next_rev > target {
                self.join_synced(&w, next_rev);
                self.progressed.notify(usize::MAX);
                return;
            }
            let fetched = match next_rev < self.shared.compacted() {
                true => Err(KvError::Compacted),
                false => self.fetch(&w.spec, next_rev, target).await,
            };
            let (upto, events) = match fetched {
                Ok(fetched) => fetched,
                Err(KvError::Compacted) => return self.cancel_compacted(&w).await,
                Err(_) => return, // The node is stopping.
            };
            // The batch holds everything of this watcher up to `upto`, so that is the
            // revision its header may report (etcd reports its current revision).
            let header = self.shared.header(upto);
            if let Some(parts) = self.responses(&w, header, &events) {
                if w.state.get() == State::Done || w.sink.tx.send(parts).await.is_err() {
                    return;
                }
                w.progress_due.set(false);
            }
            if let State::Unsynced { .. } = w.state.get() {
                w.state.set(State::Unsynced { next_rev: upto + 1 });
            }
        }
    }

    async fn cancel_compacted(&self, w: &Watcher) {
        if w.state.get() == State::Done {
            return;
        }
        self.end(w);
        // etcd's compaction response carries no header revision.
        let response = WatchResponse {
            header: Some(self.shared.header(0)),
            watch_id: w.id,
            canceled: true,
            compact_revision: self.shared.compacted(),
            ..Default::default()
        };
        let _ = w.sink.tx.send(vec![response]).await;
    }

    /// The events of `spec`'s range from `from` on, complete up to the returned revision
    /// (`<= to`, at most `CATCH_UP_MAX_REVS` revisions): from the journals if they still hold
    /// that window, else from the shards' history.
    async fn fetch(
        &self,
        spec: &WatchSpec,
        from: i64,
        to: i64,
    ) -> Result<(i64, Vec<mvccpb::Event>), KvError> {
        let upto = to.min(from - 1 + CATCH_UP_MAX_REVS as i64);
        if let Some(window) = read_window(&self.shared.journals, from - 1, upto) {
            let events = window
                .iter()
                .flat_map(|r| r.events())
                .filter(|e| spec.matches(&e.kv.as_ref().expect("events carry a kv").key))
                .cloned()
                .collect();
            return Ok((upto, events));
        }
        self.fetch_history(spec, from, to).await
    }

    async fn fetch_history(
        &self,
        spec: &WatchSpec,
        from: i64,
        to: i64,
    ) -> Result<(i64, Vec<mvccpb::Event>), KvError> {
        let shards = self
            .shared
            .shards_for(&[(spec.key.clone(), spec.end.clone())]);
        let mut answers = Vec::with_capacity(shards.len());
        for shard in shards {
            let (reply, answer) = oneshot::channel();
            let msg = ShardMsg::History {
                key: spec.key.clone(),
                end: spec.end.clone(),
                from,
                to,
                max_revs: CATCH_UP_MAX_REVS,
                reply,
            };
            self.shared.send_shard(shard, msg).await?;
            answers.push(answer);
        }
        let mut upto = to;
        let mut changes = Vec::new();
        for answer in answers {
            let Changes {
                changes: part,
                complete_upto,
            } = answer.await.map_err(|_| KvError::Stopped)??;
            upto = upto.min(complete_upto);
            changes.extend(part);
        }
        changes.retain(|c| c.rev.main <= upto);
        changes.sort_by_key(|c| c.rev);
        let events = changes
            .into_iter()
            .map(|c| mvccpb::Event {
                r#type: match c.is_delete {
                    true => EventType::Delete as i32,
                    false => EventType::Put as i32,
                },
                kv: Some(to_pb(c.kv)),
                prev_kv: c.prev.map(to_pb),
            })
            .collect();
        Ok((upto, events))
    }
}

/// Protobuf field number of `WatchResponse.events`.
const EVENTS_FIELD: u32 = 11;

/// etcd's `sendFragments`: a response of at least `max_bytes` with two or more events is
/// split into parts below `max_bytes` (a part holds at least one event), `fragment` set on
/// all but the last.
fn fragments(response: WatchResponse, max_bytes: usize) -> Vec<WatchResponse> {
    if response.encoded_len() < max_bytes || response.events.len() < 2 {
        return vec![response];
    }
    let template = WatchResponse {
        events: Vec::new(),
        fragment: true,
        ..response.clone()
    };
    let base_bytes = template.encoded_len();
    let mut parts = Vec::new();
    let mut current = template.clone();
    let mut size_bytes = base_bytes;
    for event in response.events {
        let event_bytes = prost::encoding::message::encoded_len(EVENTS_FIELD, &event);
        if !current.events.is_empty() && size_bytes + event_bytes >= max_bytes {
            parts.push(std::mem::replace(&mut current, template.clone()));
            size_bytes = base_bytes;
        }
        size_bytes += event_bytes;
        current.events.push(event);
    }
    current.fragment = false;
    parts.push(current);
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put_event(key: &str, value_bytes: usize) -> mvccpb::Event {
        mvccpb::Event {
            r#type: EventType::Put as i32,
            kv: Some(mvccpb::KeyValue {
                key: key.into(),
                value: vec![b'x'; value_bytes],
                ..Default::default()
            }),
            prev_kv: None,
        }
    }

    #[test]
    fn fragments_split_below_the_limit_and_mark_all_but_the_last() {
        let response = WatchResponse {
            watch_id: 7,
            events: (0..10).map(|i| put_event(&format!("k{i}"), 100)).collect(),
            ..Default::default()
        };
        let parts = fragments(response.clone(), 350);
        assert!(parts.len() > 1);
        for (i, part) in parts.iter().enumerate() {
            assert_eq!(part.fragment, i + 1 < parts.len());
            assert_eq!(part.watch_id, 7);
            assert!(part.encoded_len() < 350 || part.events.len() == 1);
        }
        let rejoined: Vec<_> = parts.into_iter().flat_map(|p| p.events).collect();
        assert_eq!(rejoined, response.events);
        // Small responses and single events are never split.
        assert_eq!(fragments(response.clone(), 1 << 20).len(), 1);
        let single = WatchResponse {
            events: vec![put_event("big", 1000)],
            ..Default::default()
        };
        assert_eq!(fragments(single, 10).len(), 1);
    }

    #[test]
    fn specs_match_keys_ranges_and_filters() {
        let spec = |key: &str, end: &str| WatchSpec {
            key: key.into(),
            end: end.into(),
            prev_kv: false,
            fragment: false,
            progress_notify: false,
            no_put: true,
            no_delete: false,
        };
        assert!(spec("a", "").matches(b"a") && !spec("a", "").matches(b"ab"));
        assert!(spec("a", "b").matches(b"ab") && !spec("a", "b").matches(b"b"));
        assert!(spec("a", "\0").matches(b"zzz") && !spec("b", "\0").matches(b"a"));
        assert!(!spec("a", "").passes(&put_event("a", 0)));
        let delete = mvccpb::Event {
            r#type: EventType::Delete as i32,
            ..put_event("a", 0)
        };
        assert!(spec("a", "").passes(&delete));
    }
}
