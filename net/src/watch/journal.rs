//! The event journal of one shard: the watch events of the revisions it applied recently.
//!
//! A shard appends one entry per revision it applies (its own fast-path writes and the
//! meta group's cross-shard writes), in increasing revision order, so each journal is sorted.
//! Readers (the watch hubs of every core, and catch-up of slow watchers) take the entries of
//! a revision window `(after, upto]` with `upto <= visible`: every revision at or below the
//! visibility watermark is applied on every shard, so the union of all journals' windows holds
//! each of those revisions whole (invariant I3).
//!
//! The journal is bounded by entries and bytes; it drops its oldest entries beyond that and
//! remembers the newest revision it dropped, so a reader learns when a window is no longer
//! complete and must read the shard's MVCC history instead.

use ferrocd_api::mvccpb::{self, event::EventType};
use ferrocd_engine::mvcc::{Change, Effect, KeyValue};
use prost::Message;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// Bounds of one shard's journal.
#[derive(Clone, Copy, Debug)]
pub struct JournalLimits {
    pub max_revisions: usize,
    /// Encoded size of the events held (kvs and prev kvs).
    pub max_bytes: usize,
}

impl Default for JournalLimits {
    /// About ten seconds of a busy shard's writes: enough for hubs and briefly slow watchers
    /// to read everything from memory; older windows come from the MVCC history.
    fn default() -> Self {
        JournalLimits {
            max_revisions: 10_000,
            max_bytes: 32 * 1024 * 1024,
        }
    }
}

/// One event of a revision, with its `sub` so that the parts of a cross-shard revision
/// merge into request order.
#[derive(Clone, Debug, PartialEq)]
pub struct JournalEvent {
    pub sub: i64,
    /// Always carries `prev_kv` when the key existed; watchers that did not ask drop it.
    pub event: mvccpb::Event,
}

/// The events one shard applied at one revision, in `sub` order.
#[derive(Debug, PartialEq)]
pub struct RevisionEvents {
    pub rev: i64,
    pub events: Vec<JournalEvent>,
}

impl RevisionEvents {
    /// The events of changes applied at `rev`, given the previous kv of each (as
    /// `Store::apply` returns them).
    pub fn from_changes(rev: i64, changes: &[Change], prevs: Vec<Option<KeyValue>>) -> Self {
        assert_eq!(changes.len(), prevs.len(), "one previous kv per change");
        let events = changes
            .iter()
            .zip(prevs)
            .map(|(change, prev)| JournalEvent {
                sub: change.sub,
                event: event_of(rev, &change.effect, prev),
            })
            .collect();
        RevisionEvents { rev, events }
    }

    fn size_bytes(&self) -> usize {
        self.events.iter().map(|e| e.event.encoded_len()).sum()
    }
}

/// etcd's event for an effect: a put's kv follows the key's previous state (version + 1 in
/// the same generation, else a new generation); a delete's kv has only key and revision.
fn event_of(rev: i64, effect: &Effect, prev: Option<KeyValue>) -> mvccpb::Event {
    let kv = match effect {
        Effect::Put { key, value, lease } => mvccpb::KeyValue {
            key: key.clone(),
            create_revision: prev.as_ref().map_or(rev, |p| p.create_revision),
            mod_revision: rev,
            version: prev.as_ref().map_or(1, |p| p.version + 1),
            value: value.clone(),
            lease: *lease,
        },
        Effect::Delete { key } => mvccpb::KeyValue {
            key: key.clone(),
            mod_revision: rev,
            ..Default::default()
        },
    };
    let kind = match effect {
        Effect::Put { .. } => EventType::Put,
        Effect::Delete { .. } => EventType::Delete,
    };
    mvccpb::Event {
        r#type: kind as i32,
        kv: Some(kv),
        prev_kv: prev.map(to_pb),
    }
}

pub fn to_pb(kv: KeyValue) -> mvccpb::KeyValue {
    crate::node::apply::to_pb(kv, false)
}

pub struct Journal {
    inner: Mutex<Inner>,
    limits: JournalLimits,
}

struct Inner {
    entries: VecDeque<Arc<RevisionEvents>>,
    size_bytes: usize,
    /// Every revision at or below this one may be missing from `entries`.
    dropped_upto: i64,
}

impl Journal {
    /// An empty journal for a shard whose history up to `current_rev` is only in its store.
    pub fn new(current_rev: i64, limits: JournalLimits) -> Journal {
        assert!(
            limits.max_revisions > 0,
            "a journal holds at least one revision"
        );
        Journal {
            inner: Mutex::new(Inner {
                entries: VecDeque::new(),
                size_bytes: 0,
                dropped_upto: current_rev,
            }),
            limits,
        }
    }

    /// Appends the events of one revision, dropping the oldest entries beyond the limits.
    /// Revisions must increase.
    pub fn append(&self, entry: RevisionEvents) {
        let size_bytes = entry.size_bytes();
        let mut inner = self.lock();
        let last = inner.entries.back().map_or(inner.dropped_upto, |e| e.rev);
        assert!(
            entry.rev > last,
            "journal append at {} after {last}",
            entry.rev
        );
        inner.entries.push_back(Arc::new(entry));
        inner.size_bytes += size_bytes;
        while inner.entries.len() > self.limits.max_revisions
            || inner.size_bytes > self.limits.max_bytes
        {
            let dropped = inner
                .entries
                .pop_front()
                .expect("over the limits, so not empty");
            inner.size_bytes -= dropped.size_bytes();
            inner.dropped_upto = dropped.rev;
        }
    }

    /// Appends the entries with revision in `(after, upto]` to `out`; `false` (and nothing
    /// appended) when some of that window was already dropped.
    pub fn window(&self, after: i64, upto: i64, out: &mut Vec<Arc<RevisionEvents>>) -> bool {
        let inner = self.lock();
        if inner.dropped_upto > after {
            return false;
        }
        let start = inner.entries.partition_point(|e| e.rev <= after);
        let end = inner.entries.partition_point(|e| e.rev <= upto);
        out.extend(inner.entries.range(start..end.max(start)).cloned());
        true
    }

    /// Whether every revision above `after` that this shard applied is still held.
    pub fn holds_after(&self, after: i64) -> bool {
        self.lock().dropped_upto <= after
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock is a bug that already aborts the node's core.
        self.inner.lock().expect("journal lock poisoned")
    }
}

/// All events of one revision across shards, in request (`sub`) order.
pub struct MergedRevision {
    pub rev: i64,
    parts: Vec<Arc<RevisionEvents>>,
}

impl MergedRevision {
    pub fn events(&self) -> Vec<&mvccpb::Event> {
        let mut events: Vec<&JournalEvent> = self.parts.iter().flat_map(|p| &p.events).collect();
        if self.parts.len() > 1 {
            events.sort_by_key(|e| e.sub);
        }
        events.into_iter().map(|e| &e.event).collect()
    }
}

/// The revisions in `(after, upto]` from every journal, merged by revision; `None` when any
/// journal no longer holds the whole window. `upto` must be visible (see the module docs).
pub fn read_window(journals: &[Journal], after: i64, upto: i64) -> Option<Vec<MergedRevision>> {
    let mut parts = Vec::new();
    for journal in journals {
        if !journal.window(after, upto, &mut parts) {
            return None;
        }
    }
    // Stable: the parts of one revision keep shard order; their events are merged by sub.
    parts.sort_by_key(|p| p.rev);
    let mut merged: Vec<MergedRevision> = Vec::new();
    for part in parts {
        match merged.last_mut() {
            Some(last) if last.rev == part.rev => last.parts.push(part),
            _ => merged.push(MergedRevision {
                rev: part.rev,
                parts: vec![part],
            }),
        }
    }
    Some(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(sub: i64, key: &str, value: &str) -> Change {
        Change {
            sub,
            effect: Effect::Put {
                key: key.into(),
                value: value.into(),
                lease: 0,
            },
        }
    }

    fn entry(rev: i64, changes: &[Change]) -> RevisionEvents {
        RevisionEvents::from_changes(rev, changes, vec![None; changes.len()])
    }

    fn keys(revision: &MergedRevision) -> Vec<String> {
        revision
            .events()
            .iter()
            .map(|e| String::from_utf8(e.kv.as_ref().unwrap().key.clone()).unwrap())
            .collect()
    }

    #[test]
    fn events_follow_etcd_for_puts_and_deletes() {
        let prev = KeyValue {
            key: b"k".to_vec(),
            create_revision: 3,
            mod_revision: 4,
            version: 2,
            value: b"old".to_vec(),
            lease: 0,
        };
        let changes = [
            put(0, "k", "new"),
            Change {
                sub: 1,
                effect: Effect::Delete { key: b"d".to_vec() },
            },
            put(2, "fresh", "v"),
        ];
        let e = RevisionEvents::from_changes(9, &changes, vec![Some(prev.clone()), None, None]);
        let put_kv = e.events[0].event.kv.as_ref().unwrap();
        assert_eq!((put_kv.create_revision, put_kv.version), (3, 3));
        assert_eq!(e.events[0].event.prev_kv, Some(to_pb(prev)));
        let del = &e.events[1].event;
        assert_eq!(del.r#type, EventType::Delete as i32);
        assert_eq!(
            del.kv,
            Some(mvccpb::KeyValue {
                key: b"d".to_vec(),
                mod_revision: 9,
                ..Default::default()
            })
        );
        let fresh = e.events[2].event.kv.as_ref().unwrap();
        assert_eq!((fresh.create_revision, fresh.version), (9, 1));
    }

    #[test]
    fn windows_merge_shards_by_revision_and_sub() {
        let journals = [
            Journal::new(1, JournalLimits::default()),
            Journal::new(1, JournalLimits::default()),
        ];
        journals[0].append(entry(2, &[put(0, "a", "")]));
        journals[1].append(entry(3, &[put(0, "b", "")]));
        // A cross-shard revision: subs 0 and 2 on shard 1, sub 1 on shard 0.
        journals[0].append(entry(4, &[put(1, "c", "")]));
        journals[1].append(entry(4, &[put(0, "d", ""), put(2, "e", "")]));
        let all = read_window(&journals, 1, 4).unwrap();
        assert_eq!(all.iter().map(|r| r.rev).collect::<Vec<_>>(), vec![2, 3, 4]);
        assert_eq!(keys(&all[2]), vec!["d", "c", "e"]);
        let tail = read_window(&journals, 2, 3).unwrap();
        assert_eq!(tail.iter().map(|r| r.rev).collect::<Vec<_>>(), vec![3]);
        assert!(read_window(&journals, 4, 9).unwrap().is_empty());
        // Before the journals' start the window is not known to be complete.
        assert!(read_window(&journals, 0, 4).is_none());
    }

    #[test]
    fn bounds_drop_the_oldest_and_make_older_windows_incomplete() {
        let journal = Journal::new(
            0,
            JournalLimits {
                max_revisions: 3,
                max_bytes: usize::MAX,
            },
        );
        for rev in 1..=5 {
            journal.append(entry(rev, &[put(0, "k", "v")]));
        }
        let mut out = Vec::new();
        assert!(!journal.window(1, 5, &mut out), "revision 2 was dropped");
        assert!(out.is_empty());
        assert!(journal.window(2, 5, &mut out));
        assert_eq!(out.iter().map(|e| e.rev).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert!(journal.holds_after(2) && !journal.holds_after(1));

        let one_event = entry(1, &[put(0, "k", "0123456789")]).size_bytes();
        let by_size = Journal::new(
            0,
            JournalLimits {
                max_revisions: 100,
                max_bytes: 2 * one_event,
            },
        );
        for rev in 1..=4 {
            by_size.append(entry(rev, &[put(0, "k", "0123456789")]));
        }
        let mut out = Vec::new();
        assert!(by_size.window(2, 4, &mut out));
        assert_eq!(out.len(), 2);
        assert!(!by_size.holds_after(1));
    }

    #[test]
    #[should_panic(expected = "journal append at 3 after 3")]
    fn revisions_must_increase() {
        let journal = Journal::new(0, JournalLimits::default());
        journal.append(entry(3, &[put(0, "k", "")]));
        journal.append(entry(3, &[put(0, "k", "")]));
    }
}
