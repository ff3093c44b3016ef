//! Unit tests of the linearizability checker (tests/linearizability) with the etcd model:
//! hand-written histories that are linearizable and ones that are not, and randomized ones
//! generated from a sequential run of the model (always accepted) and then mutated (rejected).

mod linearizability;

use std::time::Duration;

use linearizability::etcd::{Compare, EtcdModel, KeyValue, Request, Response, State};
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
    }
}

fn put_ok(revision: i64) -> Response {
    Response::Put { revision }
}

fn got(revision: i64, kv: Option<KeyValue>) -> Response {
    Response::Get { revision, kv }
}

/// An empty store at revision 1, as a fresh etcd reports it.
fn fresh() -> State {
    State {
        revision: 1,
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
    match rng.gen_range(0..10) {
        0..=2 => Request::Get { key },
        3 => Request::Range { prefix: "k".into() },
        4..=5 => Request::Put { key, value },
        6 => Request::Delete { key },
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
