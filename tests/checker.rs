//! Unit tests of the linearizability checker (tests/linearizability) with the etcd model:
//! hand-written histories that are linearizable and ones that are not, and randomized ones
//! generated from a sequential run of the model (always accepted) and then mutated (rejected).

mod linearizability;

use std::time::Duration;

use std::collections::BTreeMap;
use std::sync::Arc;

use linearizability::etcd::{Compare, EtcdModel, KeyValue, Past, Request, Response, State, Write};
use linearizability::{check, Budget, Operation, Outcome, Verdict};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

type Op = Operation<Request, Response>;

/// Randomized histories per test and operations per history.
const RANDOM_HISTORIES: u64 = 300;
const RANDOM_OPS_PER_HISTORY: usize = 120;
/// Keys of the randomized histories: few, so that operations interfere.
const RANDOM_KEYS: usize = 3;

fn op(client: usize, call_ns: u64, return_ns: u64, input: Request, output: Response) -> Op {
    Operation {
        client,
        call_ns,
        return_ns,
        input,
        outcome: Outcome::Ok(output),
    }
}

fn unknown(client: usize, call_ns: u64, input: Request) -> Op {
    Operation {
        client,
        call_ns,
        return_ns: u64::MAX,
        input,
        outcome: Outcome::Unknown,
    }
}

fn put(key: &str, value: &str) -> Request {
    Request::Put {
        key: key.into(),
        value: value.into(),
        lease: 0,
    }
}

fn get(key: &str) -> Request {
    Request::Get { key: key.into() }
}

fn cas(key: &str, mod_revision: i64, value: &str) -> Request {
    Request::CompareAndSet {
        key: key.into(),
        compare: Compare::ModRevision(mod_revision),
        value: value.into(),
    }
}

fn kv(value: &str, create_revision: i64, mod_revision: i64, version: i64) -> KeyValue {
    KeyValue {
        value: value.into(),
        create_revision,
        mod_revision,
        version,
        lease: 0,
    }
}

fn put_ok(revision: i64) -> Response {
    Response::Put { revision }
}

fn got(revision: i64, kv: Option<KeyValue>) -> Response {
    Response::Get { revision, kv }
}

/// An empty store at revision 1, as a fresh etcd reports it (with its key space at 1 as the
/// past that reads at a revision may reach).
fn fresh() -> State {
    let past = Past {
        snapshots: BTreeMap::from([(1, BTreeMap::new())]),
    };
    State {
        revision: 1,
        past: Arc::new(past),
        ..State::default()
    }
}

fn verdict_of(model: EtcdModel, history: &[Op]) -> Verdict {
    check(&model, &fresh(), history, Budget::default()).verdict
}

fn assert_linearizable(history: &[Op]) {
    let verdict = verdict_of(EtcdModel::default(), history);
    assert_eq!(verdict, Verdict::Linearizable, "{history:#?}");
}

/// Asserts a rejection and returns its explanation.
fn assert_illegal(model: EtcdModel, history: &[Op]) -> String {
    match verdict_of(model, history) {
        Verdict::Illegal(explanation) => explanation,
        other => panic!("expected a rejection, got {other:?} for {history:#?}"),
    }
}

#[test]
fn a_read_concurrent_with_a_write_may_see_either_value() {
    let history = [
        op(0, 0, 10, put("a", "1"), put_ok(2)),
        op(0, 20, 50, put("a", "2"), put_ok(3)),
        // Overlaps the second put: the old value is fine...
        op(1, 30, 40, get("a"), got(2, Some(kv("1", 2, 2, 1)))),
        // ...and so is the new one, from a read that started before the put returned.
        op(2, 45, 60, get("a"), got(3, Some(kv("2", 2, 3, 2)))),
    ];
    assert_linearizable(&history);
}

#[test]
fn a_stale_read_after_a_completed_write_is_rejected() {
    let history = [
        op(0, 0, 10, put("a", "1"), put_ok(2)),
        op(0, 20, 30, put("a", "2"), put_ok(3)),
        op(1, 40, 50, get("a"), got(2, Some(kv("1", 2, 2, 1)))),
    ];
    let explanation = assert_illegal(EtcdModel::default(), &history);
    assert!(
        explanation.contains("operation that could not be linearized: #2"),
        "{explanation}"
    );
    assert!(
        explanation.contains("model state there: rev 3"),
        "{explanation}"
    );
}

#[test]
fn a_lost_update_in_compare_and_set_is_rejected() {
    let history = [
        op(0, 0, 10, put("counter", "0"), put_ok(2)),
        // Both increments compare against the same mod revision and both claim success.
        op(1, 20, 40, cas("counter", 2, "1"), cas_ok(3)),
        op(2, 21, 41, cas("counter", 2, "1"), cas_ok(4)),
    ];
    assert_illegal(EtcdModel::default(), &history);
}

fn cas_ok(revision: i64) -> Response {
    Response::CompareAndSet {
        revision,
        succeeded: true,
        kv: None,
    }
}

#[test]
fn concurrent_compare_and_sets_may_fail_each_other() {
    let history = [
        op(0, 0, 10, put("counter", "0"), put_ok(2)),
        op(1, 20, 40, cas("counter", 2, "1"), cas_ok(3)),
        op(
            2,
            21,
            41,
            cas("counter", 2, "1"),
            Response::CompareAndSet {
                revision: 3,
                succeeded: false,
                kv: Some(kv("1", 2, 3, 2)),
            },
        ),
    ];
    assert_linearizable(&history);
}

#[test]
fn a_revision_that_goes_backwards_is_rejected() {
    let history = [
        op(0, 0, 10, put("a", "1"), put_ok(2)),
        op(0, 20, 30, put("b", "1"), put_ok(3)),
        // The right value of `a`, but at a revision older than an acknowledged write.
        op(1, 40, 50, get("a"), got(2, Some(kv("1", 2, 2, 1)))),
    ];
    assert_illegal(EtcdModel::default(), &history);
}

#[test]
fn two_writes_with_the_same_revision_are_rejected() {
    let history = [
        op(0, 0, 10, put("a", "1"), put_ok(2)),
        op(1, 0, 10, put("b", "1"), put_ok(2)),
    ];
    assert_illegal(EtcdModel::default(), &history);
}

#[test]
fn an_unknown_write_may_or_may_not_have_happened() {
    let seen = [
        unknown(0, 0, put("a", "1")),
        op(1, 100, 110, get("a"), got(2, Some(kv("1", 2, 2, 1)))),
    ];
    assert_linearizable(&seen);
    let not_seen = [
        unknown(0, 0, put("a", "1")),
        op(1, 100, 110, get("a"), got(1, None)),
    ];
    assert_linearizable(&not_seen);
    // Seen, then gone without a delete: impossible.
    let flicker = [
        unknown(0, 0, put("a", "1")),
        op(1, 100, 110, get("a"), got(2, Some(kv("1", 2, 2, 1)))),
        op(1, 120, 130, get("a"), got(2, None)),
    ];
    assert_illegal(EtcdModel::default(), &flicker);
    // An unknown write cannot take effect before it was sent.
    let too_early = [
        op(1, 0, 10, get("a"), got(2, Some(kv("1", 2, 2, 1)))),
        unknown(0, 20, put("a", "1")),
    ];
    assert_illegal(EtcdModel::default(), &too_early);
}

#[test]
fn an_unknown_write_takes_effect_before_its_deadline_or_never() {
    let deadline_ns = 50;
    let lost_in_crash = |call_ns| Operation {
        return_ns: deadline_ns,
        ..unknown(0, call_ns, put("a", "1"))
    };
    let seen_later = [
        lost_in_crash(0),
        op(1, 100, 110, get("a"), got(2, Some(kv("1", 2, 2, 1)))),
    ];
    assert_linearizable(&seen_later);
    // Not seen after the deadline, then seen: it would have taken effect too late.
    let too_late = [
        lost_in_crash(0),
        op(1, 60, 70, get("a"), got(1, None)),
        op(1, 100, 110, get("a"), got(2, Some(kv("1", 2, 2, 1)))),
    ];
    assert_illegal(EtcdModel::default(), &too_late);
    let unbounded = [
        unknown(0, 0, put("a", "1")),
        too_late[1].clone(),
        too_late[2].clone(),
    ];
    assert_linearizable(&unbounded);
    // Never seen at all is fine either way.
    assert_linearizable(&[lost_in_crash(0), too_late[1].clone()]);
}

#[test]
fn a_revision_gap_needs_an_unknown_write_and_the_gap_model() {
    let history = [
        op(0, 0, 10, put("a", "1"), put_ok(2)),
        unknown(1, 20, put("b", "lost")),
        // Revision 3 went to the lost write.
        op(0, 100, 110, put("a", "2"), put_ok(4)),
        op(0, 120, 130, get("b"), got(4, None)),
    ];
    assert_illegal(EtcdModel::default(), &history);
    let gaps = EtcdModel {
        revision_gaps: true,
    };
    assert_eq!(verdict_of(gaps, &history), Verdict::Linearizable);
    // Without any unknown write, a gap is a bug even with the gap model.
    let unexplained = [
        op(0, 0, 10, put("a", "1"), put_ok(2)),
        op(0, 100, 110, put("a", "2"), put_ok(4)),
    ];
    assert_illegal(gaps, &unexplained);
}

fn leased_put(key: &str, value: &str, lease: i64) -> Request {
    Request::Put {
        key: key.into(),
        value: value.into(),
        lease,
    }
}

fn leased(kv: KeyValue, lease: i64) -> KeyValue {
    KeyValue { lease, ..kv }
}

#[test]
fn a_lease_revoke_deletes_every_attached_key_at_one_revision() {
    let setup = [
        op(
            0,
            0,
            1,
            Request::LeaseGrant { id: 7 },
            Response::LeaseGrant { revision: 1 },
        ),
        op(0, 2, 3, leased_put("a", "1", 7), put_ok(2)),
        op(0, 4, 5, leased_put("b", "1", 7), put_ok(3)),
        op(0, 6, 7, put("c", "1"), put_ok(4)),
        op(
            0,
            8,
            9,
            Request::LeaseRevoke { id: 7 },
            Response::LeaseRevoke { revision: 5 },
        ),
    ];
    let range_all = |kvs: Vec<(String, KeyValue)>| {
        op(
            1,
            10,
            11,
            Request::Range { prefix: "".into() },
            Response::Range { revision: 5, kvs },
        )
    };
    let mut gone = setup.to_vec();
    gone.push(range_all(vec![("c".into(), kv("1", 4, 4, 1))]));
    assert_linearizable(&gone);
    // One attached key left behind by the revoke.
    let mut half = setup.to_vec();
    half.push(range_all(vec![
        ("b".into(), leased(kv("1", 3, 3, 1), 7)),
        ("c".into(), kv("1", 4, 4, 1)),
    ]));
    assert_illegal(EtcdModel::default(), &half);
    // A put on the revoked lease must fail, and the lease's keys report it while it lives.
    let after = [
        op(1, 10, 11, leased_put("d", "1", 7), Response::LeaseNotFound),
        op(1, 12, 13, get("a"), got(5, None)),
    ];
    assert_linearizable(&[setup.as_slice(), &after].concat());
    let accepted_on_revoked = [op(1, 10, 11, leased_put("d", "1", 7), put_ok(6))];
    assert_illegal(
        EtcdModel::default(),
        &[setup.as_slice(), &accepted_on_revoked].concat(),
    );
}

#[test]
fn reads_below_a_compaction_fail_and_reads_above_see_the_past() {
    let get_at = |key: &str, revision| Request::GetAt {
        key: key.into(),
        revision,
    };
    let setup = [
        op(0, 0, 1, put("a", "1"), put_ok(2)),
        op(0, 2, 3, put("a", "2"), put_ok(3)),
        op(0, 4, 5, put("a", "3"), put_ok(4)),
        op(
            0,
            6,
            7,
            Request::Compact { revision: 3 },
            Response::Compact { revision: 4 },
        ),
    ];
    let reads = [
        op(1, 10, 11, get_at("a", 2), Response::Compacted),
        op(1, 12, 13, get_at("a", 3), got(4, Some(kv("2", 2, 3, 2)))),
        op(1, 14, 15, get_at("a", 9), Response::FutureRevision),
        op(
            1,
            16,
            17,
            Request::Compact { revision: 3 },
            Response::Compacted,
        ),
    ];
    assert_linearizable(&[setup.as_slice(), &reads].concat());
    // A read below the compaction that still answers, after the compaction was acknowledged.
    let survived = [op(
        1,
        10,
        11,
        get_at("a", 2),
        got(4, Some(kv("1", 2, 2, 1))),
    )];
    assert_illegal(
        EtcdModel::default(),
        &[setup.as_slice(), &survived].concat(),
    );
    // The same read concurrent with the compaction may go either way.
    let concurrent = [op(1, 5, 11, get_at("a", 2), got(4, Some(kv("1", 2, 2, 1))))];
    assert_linearizable(&[setup.as_slice(), &concurrent].concat());
    // A past read with the wrong value.
    let wrong = [op(
        1,
        12,
        13,
        get_at("a", 3),
        got(4, Some(kv("3", 2, 4, 3))),
    )];
    assert_illegal(EtcdModel::default(), &[setup.as_slice(), &wrong].concat());
}

#[test]
fn a_multi_key_txn_and_a_prefix_delete_are_atomic() {
    let txn = Request::Txn {
        guards: vec![
            ("a".into(), Compare::ModRevision(0)),
            ("b".into(), Compare::ModRevision(0)),
        ],
        writes: vec![
            Write::Put {
                key: "a".into(),
                value: "1".into(),
            },
            Write::Put {
                key: "b".into(),
                value: "1".into(),
            },
        ],
    };
    let txn_ok = Response::Txn {
        revision: 2,
        succeeded: true,
        kvs: Vec::new(),
    };
    let both = vec![
        ("a".into(), kv("1", 2, 2, 1)),
        ("b".into(), kv("1", 2, 2, 1)),
    ];
    let range = |revision, kvs| {
        op(
            1,
            5,
            15,
            Request::Range { prefix: "".into() },
            Response::Range { revision, kvs },
        )
    };
    assert_linearizable(&[
        op(0, 0, 10, txn.clone(), txn_ok.clone()),
        range(2, both.clone()),
    ]);
    // Half of the txn visible.
    let half = vec![("a".into(), kv("1", 2, 2, 1))];
    assert_illegal(
        EtcdModel::default(),
        &[op(0, 0, 10, txn.clone(), txn_ok.clone()), range(2, half)],
    );
    // A prefix delete removes both at one revision; seeing one of them after it is a bug.
    let delete = Request::DeletePrefix { prefix: "".into() };
    let deleted = Response::Delete {
        revision: 3,
        deleted: 2,
    };
    let history = [
        op(0, 0, 1, txn.clone(), txn_ok.clone()),
        op(0, 2, 3, delete.clone(), deleted.clone()),
        op(1, 4, 5, get("b"), got(3, None)),
    ];
    assert_linearizable(&history);
    let lingering = [
        op(0, 0, 1, txn, txn_ok),
        op(0, 2, 3, delete, deleted),
        op(1, 4, 5, get("b"), got(3, Some(kv("1", 2, 2, 1)))),
    ];
    assert_illegal(EtcdModel::default(), &lingering);
}

#[test]
fn definite_failures_are_ignored() {
    let history = [
        op(0, 0, 10, put("a", "1"), put_ok(2)),
        Operation {
            client: 1,
            call_ns: 5,
            return_ns: 6,
            input: put("a", "never"),
            outcome: Outcome::Failed,
        },
        op(0, 20, 30, get("a"), got(2, Some(kv("1", 2, 2, 1)))),
    ];
    let report = check(&EtcdModel::default(), &fresh(), &history, Budget::default());
    assert_eq!(report.verdict, Verdict::Linearizable);
    assert_eq!(report.ops_checked, 2);
}

#[test]
fn an_exhausted_budget_gives_unknown() {
    let (history, _) = random_history(7);
    let budget = Budget {
        max_steps: 5,
        max_time: Duration::from_secs(10),
    };
    let report = check(&EtcdModel::default(), &fresh(), &history, budget);
    assert!(
        matches!(report.verdict, Verdict::Unknown(_)),
        "{:?}",
        report.verdict
    );
    assert_eq!(report.steps, 5);
}

#[test]
fn pending_unknown_writes_do_not_blow_up_the_search() {
    // Writes lost in a crash stay pending forever; each could be linearized at any later
    // point, so without pruning the search would try every subset of them everywhere.
    let mut history: Vec<Op> = (0..PENDING_UNKNOWN_WRITES)
        .map(|i| unknown(i, i as u64, put(&format!("lost{i}"), "x")))
        .collect();
    let base_ns = 1_000;
    for i in 0..PENDING_FOLLOWING_OPS {
        let call_ns = base_ns + i as u64 * 10;
        let revision = 2 + i as i64;
        history.push(op(
            0,
            call_ns,
            call_ns + 5,
            put("a", &format!("v{i}")),
            put_ok(revision),
        ));
    }
    let report = check(&EtcdModel::default(), &fresh(), &history, Budget::default());
    assert_eq!(report.verdict, Verdict::Linearizable);
    let max_steps = (PENDING_UNKNOWN_WRITES + 1) * (PENDING_UNKNOWN_WRITES + PENDING_FOLLOWING_OPS);
    assert!(report.steps <= max_steps as u64, "{} steps", report.steps);
}

/// Unknown writes left pending, and definite operations after them.
const PENDING_UNKNOWN_WRITES: usize = 24;
const PENDING_FOLLOWING_OPS: usize = 400;

#[test]
fn histories_from_a_sequential_run_are_accepted() {
    for seed in 0..RANDOM_HISTORIES {
        let (history, _) = random_history(seed);
        let report = check(&EtcdModel::default(), &fresh(), &history, Budget::default());
        assert_eq!(
            report.verdict,
            Verdict::Linearizable,
            "seed {seed}: {history:#?}"
        );
    }
}

#[test]
fn histories_with_a_changed_response_value_are_rejected() {
    let mut mutated = 0;
    for seed in 0..RANDOM_HISTORIES {
        let (mut history, _) = random_history(seed);
        if !mutate_a_read_value(&mut history, seed) {
            continue;
        }
        mutated += 1;
        let report = check(&EtcdModel::default(), &fresh(), &history, Budget::default());
        assert!(
            matches!(report.verdict, Verdict::Illegal(_)),
            "seed {seed}: a mutated history was not rejected: {:?}",
            report.verdict
        );
    }
    assert!(
        mutated > RANDOM_HISTORIES / 2,
        "only {mutated} histories had a read to mutate"
    );
}

/// A history from running random requests one after another on the model, each operation's
/// interval drawn around its instant so that neighbours overlap. One write in ten has an
/// unknown outcome (half of those with a deadline after their instant), and half of those
/// did not happen. Returns it with the final state.
fn random_history(seed: u64) -> (Vec<Op>, State) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut state = fresh();
    let mut history = Vec::with_capacity(RANDOM_OPS_PER_HISTORY);
    for index in 0..RANDOM_OPS_PER_HISTORY {
        let instant_ns = 1_000 + index as u64 * 100;
        let call_ns = instant_ns - rng.gen_range(1..=250);
        let return_ns = instant_ns + rng.gen_range(1..=250);
        let request = random_request(&mut rng, &state, index);
        let client = rng.gen_range(0..4);
        let (next, response) = EtcdModel::apply(&state, &request);
        if request.is_write() && rng.gen_bool(0.1) {
            if rng.gen_bool(0.5) {
                state = next.unwrap_or(state);
            }
            // Half of them have a deadline (the crash that ended their server process).
            let deadline_ns = if rng.gen_bool(0.5) {
                return_ns
            } else {
                u64::MAX
            };
            history.push(Operation {
                return_ns: deadline_ns,
                ..unknown(client, call_ns, request)
            });
            continue;
        }
        state = next.unwrap_or(state);
        history.push(op(client, call_ns, return_ns, request, response));
    }
    (history, state)
}

fn random_request(rng: &mut StdRng, state: &State, index: usize) -> Request {
    let key = format!("k{}", rng.gen_range(0..RANDOM_KEYS));
    let value = format!("v{index}");
    match rng.gen_range(0..20) {
        0..=3 => Request::Get { key },
        4 => Request::Range { prefix: "k".into() },
        5..=7 => Request::Put {
            key,
            value,
            lease: state.leases.iter().next().copied().unwrap_or(0),
        },
        8 => Request::Delete { key },
        9 => Request::DeletePrefix { prefix: "k".into() },
        10 => Request::GetAt {
            key,
            revision: rng.gen_range(1..=state.revision),
        },
        11 => Request::LeaseGrant {
            id: index as i64 + 1,
        },
        12 => Request::LeaseRevoke {
            id: state.leases.iter().next_back().copied().unwrap_or(1),
        },
        13 => Request::Compact {
            revision: rng.gen_range(1..=state.revision),
        },
        14..=15 => {
            let other = format!("k{}", rng.gen_range(0..RANDOM_KEYS));
            let compare =
                |kv: Option<&KeyValue>| Compare::ModRevision(kv.map_or(0, |kv| kv.mod_revision));
            let mut guards = vec![(key.clone(), compare(state.kvs.get(&key)))];
            let mut writes = vec![Write::Put {
                key: key.clone(),
                value,
            }];
            if other != key {
                guards.push((
                    other.clone(),
                    Compare::ModRevision(rng.gen_range(0..=state.revision)),
                ));
                writes.push(Write::Delete { key: other });
            }
            Request::Txn { guards, writes }
        }
        _ => {
            // Mostly a compare that may hold now, sometimes a stale one.
            let current = state.kvs.get(&key);
            let compare = match (rng.gen_range(0..3), current) {
                (0, Some(kv)) => Compare::Value(kv.value.clone()),
                (1, _) => Compare::ModRevision(rng.gen_range(0..=state.revision)),
                (_, kv) => Compare::ModRevision(kv.map_or(0, |kv| kv.mod_revision)),
            };
            Request::CompareAndSet {
                key,
                compare,
                value,
            }
        }
    }
}

/// Changes the value one successful Get returned to one no write ever wrote.
fn mutate_a_read_value(history: &mut [Op], seed: u64) -> bool {
    let reads: Vec<usize> = (0..history.len())
        .filter(|&i| {
            matches!(
                &history[i].outcome,
                Outcome::Ok(Response::Get { kv: Some(_), .. })
            )
        })
        .collect();
    if reads.is_empty() {
        return false;
    }
    let target = reads[StdRng::seed_from_u64(seed).gen_range(0..reads.len())];
    if let Outcome::Ok(Response::Get { kv: Some(kv), .. }) = &mut history[target].outcome {
        kv.value = "never-written".into();
    }
    true
}

// ---------------------------------------------------------------------------------------------
// Watch checks (tests/linearizability/watch.rs)
// ---------------------------------------------------------------------------------------------

mod watch_checks {
    use std::collections::BTreeMap;

    use super::kv;
    use crate::linearizability::watch::{
        check_reference, check_watcher, Batch, Event, EventKind, WatchSpec,
    };

    fn put_event(revision: i64, key: &str, value: &str, create: i64, version: i64) -> Event {
        let prev = (version > 1).then(|| kv("old", create, revision - 1, version - 1));
        Event {
            revision,
            key: key.into(),
            kind: EventKind::Put(kv(value, create, revision, version)),
            prev,
        }
    }

    fn delete_event(revision: i64, key: &str, prev: Option<crate::KeyValue>) -> Event {
        Event {
            revision,
            key: key.into(),
            kind: EventKind::Delete,
            prev,
        }
    }

    /// `a` created at 2, `b` created at 2 too (one txn), `a` deleted at 3, `c` at 4.
    fn reference() -> Vec<Event> {
        vec![
            put_event(2, "p/a", "1", 2, 1),
            put_event(2, "p/b", "1", 2, 1),
            delete_event(3, "p/a", Some(kv("1", 2, 2, 1))),
            put_event(4, "q/c", "1", 4, 1),
        ]
    }

    fn all(prev_kv: bool) -> WatchSpec {
        WatchSpec {
            key: "".into(),
            prefix: true,
            no_put: false,
            no_delete: false,
            prev_kv,
        }
    }

    fn batch(header_revision: i64, events: &[Event]) -> Batch {
        Batch {
            header_revision,
            events: events.to_vec(),
        }
    }

    fn last_state() -> BTreeMap<String, crate::KeyValue> {
        BTreeMap::from([
            ("p/b".to_string(), kv("1", 2, 2, 1)),
            ("q/c".to_string(), kv("1", 4, 4, 1)),
        ])
    }

    #[test]
    fn a_reference_must_replay_to_the_final_key_space() {
        let reference = reference();
        check_reference(&BTreeMap::new(), &reference, &last_state()).unwrap();
        let mut wrong_version = reference.clone();
        wrong_version[3] = put_event(4, "q/c", "1", 4, 2);
        assert!(check_reference(&BTreeMap::new(), &wrong_version, &last_state()).is_err());
        let lost_event = &reference[..3];
        assert!(check_reference(&BTreeMap::new(), lost_event, &last_state()).is_err());
        let mut wrong_prev = reference.clone();
        wrong_prev[2].prev = None;
        assert!(check_reference(&BTreeMap::new(), &wrong_prev, &last_state()).is_err());
    }

    #[test]
    fn a_watch_resumed_exactly_passes_and_gaps_repeats_and_splits_fail() {
        let r = reference();
        let spec = all(true);
        let resumed = [
            vec![batch(2, &r[0..2])],
            vec![batch(4, &r[2..3]), batch(4, &r[3..4])],
        ];
        let figures = check_watcher(&spec, &resumed, &r, 4).unwrap();
        assert_eq!((figures.events, figures.resumptions), (4, 1));

        let gap = [vec![batch(2, &r[0..2])], vec![batch(4, &r[3..4])]];
        let error = check_watcher(&spec, &gap, &r, 4).unwrap_err();
        assert!(error.contains("not reliable"), "{error}");

        let repeat = [vec![batch(3, &r[0..3])], vec![batch(4, &r[2..4])]];
        let error = check_watcher(&spec, &repeat, &r, 4).unwrap_err();
        assert!(error.contains("not unique"), "{error}");

        let split = [vec![batch(2, &r[0..1]), batch(4, &r[1..4])]];
        let error = check_watcher(&spec, &split, &r, 4).unwrap_err();
        assert!(error.contains("not atomic"), "{error}");

        let unordered = [vec![batch(4, &[r[2].clone(), r[0].clone()])]];
        let error = check_watcher(&spec, &unordered, &r, 4).unwrap_err();
        assert!(error.contains("not ordered"), "{error}");
    }

    #[test]
    fn filters_and_prev_kv_are_checked() {
        let r = reference();
        let deletes_under_p = WatchSpec {
            key: "p/".into(),
            no_put: true,
            ..all(false)
        };
        let mut delete_without_prev = r[2].clone();
        delete_without_prev.prev = None;
        let only_deletes = [vec![batch(3, &[delete_without_prev])]];
        check_watcher(&deletes_under_p, &only_deletes, &r, 4).unwrap();
        // A put slipped through NOPUT.
        let with_put = [vec![batch(2, &r[0..2])]];
        let error = check_watcher(&deletes_under_p, &with_put, &r, 4).unwrap_err();
        assert!(error.contains("filter not respected"), "{error}");
        // prev_kv asked for but wrong.
        let mut wrong_prev = r.clone();
        wrong_prev[2].prev = Some(kv("other", 2, 2, 1));
        let error = check_watcher(&all(true), &[vec![batch(4, &wrong_prev)]], &r, 4).unwrap_err();
        assert!(error.contains("prev_kv"), "{error}");
        // Events after the round's last revision are not checked.
        let mut later = r.clone();
        later.push(put_event(9, "p/z", "1", 9, 1));
        check_watcher(&all(true), &[vec![batch(9, &later)]], &r, 4).unwrap();
    }
}
