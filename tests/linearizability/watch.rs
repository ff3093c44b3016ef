//! Watch checks in the manner of etcd's robustness suite (tests/robustness/validate): every
//! watcher's events are compared with the reference history of the round, which is itself
//! checked against the key space before and after it.
//!
//! - **reference**: the events of one watch over the whole workload prefix, with `prev_kv`,
//!   opened after the round from its first revision. `check_reference` replays them on the
//!   key space read before the round: each event must follow from the state before it (a put
//!   has the next version and keeps `create_revision`, a delete removes a live key, `prev_kv`
//!   is the state before), revisions only increase, no key changes twice in one revision, and
//!   the replay ends in the key space read after the round.
//! - for each watcher, `check_watcher`: **ordered** (revisions never decrease), **unique** (no
//!   event twice), **atomic** (all the watcher's events of one revision in one response),
//!   **filters respected** (only keys in its range, no put under NOPUT, no delete under
//!   NODELETE), **prev_kv correct** (equal to the reference's, absent without `prev_kv`), and
//!   **reliable** and **resumable** (the events of every session, the first one and those
//!   re-created from the last seen revision + 1 after a crash, concatenate to exactly the
//!   reference's events for its range and filters: no gap, no repeat).

use std::collections::{BTreeMap, HashSet};

use super::etcd::KeyValue;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// The key after the put.
    Put(KeyValue),
    Delete,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub revision: i64,
    pub key: String,
    pub kind: EventKind,
    /// The key before the event, when the watch asked for it.
    pub prev: Option<KeyValue>,
}

/// One WatchResponse with events, as the client received it.
#[derive(Debug, Clone)]
pub struct Batch {
    pub header_revision: i64,
    pub events: Vec<Event>,
}

/// What a watcher asked for.
#[derive(Debug, Clone)]
pub struct WatchSpec {
    /// A key, or every key under it with `prefix`.
    pub key: String,
    pub prefix: bool,
    pub no_put: bool,
    pub no_delete: bool,
    pub prev_kv: bool,
}

impl WatchSpec {
    fn covers(&self, key: &str) -> bool {
        if self.prefix {
            key.starts_with(self.key.as_str())
        } else {
            key == self.key
        }
    }

    fn passes(&self, event: &Event) -> bool {
        match event.kind {
            EventKind::Put(_) => !self.no_put,
            EventKind::Delete => !self.no_delete,
        }
    }

    /// The reference events this watcher must see, as it must see them.
    pub fn expected(&self, reference: &[Event]) -> Vec<Event> {
        reference
            .iter()
            .filter(|event| self.covers(&event.key) && self.passes(event))
            .map(|event| Event {
                prev: if self.prev_kv {
                    event.prev.clone()
                } else {
                    None
                },
                ..event.clone()
            })
            .collect()
    }
}

/// Replays the reference events on `init` (the key space before the round): `Err` names the
/// first event that does not follow from the state before it, or the difference with
/// `last` (the key space after the round).
pub fn check_reference(
    init: &BTreeMap<String, KeyValue>,
    reference: &[Event],
    last: &BTreeMap<String, KeyValue>,
) -> Result<(), String> {
    let mut state = init.clone();
    let mut keys_in_revision: HashSet<&str> = HashSet::new();
    let mut previous_revision = 0;
    for (index, event) in reference.iter().enumerate() {
        let fail = |why: &str| Err(format!("reference event #{index} {event:?}: {why}"));
        if event.revision < previous_revision {
            return fail("revision goes backwards");
        }
        if event.revision > previous_revision {
            keys_in_revision.clear();
            previous_revision = event.revision;
        }
        if !keys_in_revision.insert(&event.key) {
            return fail("the key changes twice in one revision");
        }
        let before = state.get(&event.key);
        if event.prev.as_ref() != before {
            return fail(&format!(
                "prev_kv differs from the state before: {before:?}"
            ));
        }
        match &event.kind {
            EventKind::Put(kv) => {
                let (create_revision, version) =
                    before.map_or((event.revision, 1), |b| (b.create_revision, b.version + 1));
                let consistent = kv.mod_revision == event.revision
                    && kv.create_revision == create_revision
                    && kv.version == version;
                if !consistent {
                    return fail(&format!(
                        "expected create {create_revision}, mod {}, version {version}",
                        event.revision
                    ));
                }
                state.insert(event.key.clone(), kv.clone());
            }
            EventKind::Delete => {
                if state.remove(&event.key).is_none() {
                    return fail("deletes a key that does not exist");
                }
            }
        }
    }
    if state != *last {
        return Err(format!(
            "replaying {} reference events gives {state:?}, the key space after the round is \
             {last:?}",
            reference.len()
        ));
    }
    Ok(())
}

/// What a watcher's check counted.
#[derive(Debug, Default, Clone, Copy)]
pub struct WatchFigures {
    pub events: u64,
    pub batches: u64,
    /// Sessions beyond the first: watches re-created from the last revision + 1.
    pub resumptions: u64,
}

/// Checks one watcher's sessions (each a list of batches, in the order received) against
/// the reference events. Events above `last_revision` (after the round) are not checked.
pub fn check_watcher(
    spec: &WatchSpec,
    sessions: &[Vec<Batch>],
    reference: &[Event],
    last_revision: i64,
) -> Result<WatchFigures, String> {
    let mut figures = WatchFigures {
        resumptions: sessions.len().saturating_sub(1) as u64,
        ..WatchFigures::default()
    };
    let expected = spec.expected(reference);
    let mut per_revision: BTreeMap<i64, usize> = BTreeMap::new();
    for event in &expected {
        *per_revision.entry(event.revision).or_default() += 1;
    }
    let mut observed: Vec<&Event> = Vec::new();
    let mut seen: HashSet<(i64, &str)> = HashSet::new();
    for (session, batches) in sessions.iter().enumerate() {
        for batch in batches {
            figures.batches += 1;
            let mut in_batch: BTreeMap<i64, usize> = BTreeMap::new();
            for event in batch.events.iter().filter(|e| e.revision <= last_revision) {
                let at = format!("session {session}, event {event:?}");
                if observed
                    .last()
                    .is_some_and(|last| last.revision > event.revision)
                {
                    return Err(format!(
                        "not ordered: {at} after revision {}",
                        observed[observed.len() - 1].revision
                    ));
                }
                if !seen.insert((event.revision, event.key.as_str())) {
                    return Err(format!("not unique: {at} seen twice"));
                }
                if !spec.covers(&event.key) || !spec.passes(event) {
                    return Err(format!("filter not respected: {at} is outside {spec:?}"));
                }
                if event.revision > batch.header_revision {
                    return Err(format!(
                        "{at} is above its response's header revision {}",
                        batch.header_revision
                    ));
                }
                *in_batch.entry(event.revision).or_default() += 1;
                observed.push(event);
            }
            for (revision, count) in in_batch {
                let all = per_revision.get(&revision).copied().unwrap_or(0);
                if count != all {
                    return Err(format!(
                        "not atomic: session {session} got {count} of the {all} events of \
                         revision {revision} in one response"
                    ));
                }
            }
        }
    }
    figures.events = observed.len() as u64;
    for (index, want) in expected.iter().enumerate() {
        match observed.get(index) {
            Some(got) if *got == want => {}
            Some(got) if got.revision == want.revision && got.key == want.key => {
                return Err(format!(
                    "prev_kv or value not correct at revision {}: got {got:?}, the reference \
                     has {want:?}",
                    want.revision
                ));
            }
            Some(got) => {
                return Err(format!(
                    "not reliable: event #{index} should be {want:?}, got {got:?} (a gap, or a \
                     resumption that did not continue exactly)"
                ));
            }
            None => {
                return Err(format!(
                    "not reliable: {} of {} events received; the first missing is {want:?}",
                    observed.len(),
                    expected.len()
                ));
            }
        }
    }
    if let Some(extra) = observed.get(expected.len()) {
        return Err(format!("an event the reference does not have: {extra:?}"));
    }
    Ok(figures)
}
