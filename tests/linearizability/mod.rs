//! A linearizability checker in the Wing–Gong / Lowe family, with Porcupine's optimisations:
//! call and return entries sorted by time in one doubly linked list, lifted out when an
//! operation is linearized and put back on backtrack (dancing links, so undo is O(1)), and a
//! memo of (set of linearized operations, model state) pairs already explored.
//!
//! An operation's outcome is either a response, a definite failure (it did not happen: it is
//! dropped before the search), or unknown (timeout, lost connection: it may or may not have
//! happened). An unknown operation's return time is the latest instant it can take effect:
//! infinity as in Porcupine, or earlier when the caller knows better (the server process that
//! could have run it was killed then). "It never happened" needs no search while its return
//! is ahead: the search ends as soon as every operation with a known outcome is linearized.
//! When the scan reaches the return of an unknown operation not yet linearized, the search
//! takes it out as a no-op (and undoes that on backtrack like any other step).
//!
//! P-compositionality (checking each key apart) does not apply to etcd: every response carries
//! the store-wide revision, so the whole key space is one object. Revisions make the search
//! nearly linear in practice because every response pins the exact state it saw.
//!
//! A search budget (model steps, wall time) bounds the work: past it the verdict is
//! `Unknown`, never a hang. A rejected history comes with an explanation: the deepest partial
//! linearization found, the operation that could not be placed after it, the model state
//! there and why each candidate operation was rejected in that state.
//!
//! Each test binary that includes this module uses a different part of it.
#![allow(dead_code)]

pub mod client;
pub mod etcd;
pub mod watch;

use std::collections::HashSet;
use std::fmt::{Debug, Display, Write};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::{Duration, Instant};

/// A sequential specification: which states an operation may lead to from a given state.
pub trait Model {
    type State: Clone + Eq + Hash + Debug;
    type Input: Debug;
    type Output: Debug;
    /// Why an operation cannot take effect in a state; built on the hot path, so cheap.
    type Rejection: Display;

    /// The states `input` with `outcome` may lead to from `state`; `Err` when the observed
    /// response is impossible there. For `Outcome::Unknown` return only states that differ
    /// from `state`: "did not happen" is covered by the checker (see the module comment).
    /// `outcome` is never `Outcome::Failed` (those operations are dropped before the search).
    fn step(
        &self,
        state: &Self::State,
        input: &Self::Input,
        outcome: &Outcome<Self::Output>,
    ) -> Result<Vec<Self::State>, Self::Rejection>;

    /// A cheap necessary condition: whether the operation, which returned `output`, may still
    /// be linearized from `state` or from a state that more operations lead to. The checker
    /// uses it to cut chains of unknown operations that no pending response can follow
    /// (without it, k pending unknown writes cost up to 2^k states at every point). The
    /// default never cuts.
    fn may_follow(
        &self,
        _state: &Self::State,
        _input: &Self::Input,
        _output: &Self::Output,
    ) -> bool {
        true
    }
}

/// What the client learned about an operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<O> {
    /// The server answered: the operation took effect with this response.
    Ok(O),
    /// A definite error: the operation did not take effect.
    Failed,
    /// Timeout or lost connection: it may or may not have taken effect.
    Unknown,
}

/// One operation of a history; times are monotonic nanoseconds from a common origin.
#[derive(Debug, Clone)]
pub struct Operation<I, O> {
    pub client: usize,
    pub call_ns: u64,
    /// For `Outcome::Unknown`: the latest instant it can take effect, `u64::MAX` if none.
    pub return_ns: u64,
    pub input: I,
    pub outcome: Outcome<O>,
}

impl<I, O> Operation<I, O> {
    fn is_unknown(&self) -> bool {
        matches!(self.outcome, Outcome::Unknown)
    }
}

/// Bounds on one check; past either, the verdict is `Unknown`.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Calls of `Model::step`.
    pub max_steps: u64,
    pub max_time: Duration,
}

impl Default for Budget {
    fn default() -> Budget {
        Budget {
            max_steps: 20_000_000,
            max_time: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// Not linearizable; the explanation says where the search got stuck.
    Illegal(String),
    /// The budget ran out before a verdict.
    Unknown(String),
}

/// The verdict and what it cost.
#[derive(Debug, Clone)]
pub struct Report {
    pub verdict: Verdict,
    /// Operations searched (definite failures excluded), unknown outcomes included.
    pub ops_checked: usize,
    pub unknown_ops: usize,
    pub steps: u64,
    pub elapsed: Duration,
}

/// Checks that `history` is linearizable with respect to `model` starting from `init`.
pub fn check<M: Model>(
    model: &M,
    init: &M::State,
    history: &[Operation<M::Input, M::Output>],
    budget: Budget,
) -> Report {
    let started = Instant::now();
    let ops: Vec<&Operation<M::Input, M::Output>> = history
        .iter()
        .filter(|op| !matches!(op.outcome, Outcome::Failed))
        .collect();
    let mut search = Search::new(model, init.clone(), &ops, budget, started);
    let verdict = search.run();
    Report {
        verdict,
        ops_checked: ops.len(),
        unknown_ops: ops.iter().filter(|op| op.is_unknown()).count(),
        steps: search.steps,
        elapsed: started.elapsed(),
    }
}

/// Index of the list's head sentinel; `NIL` ends the list.
const HEAD: usize = 0;
const NIL: usize = usize::MAX;
/// How many steps pass between two looks at the clock.
const CLOCK_CHECK_INTERVAL_STEPS: u64 = 1024;
/// Operations listed in an explanation, at most, per section.
const EXPLAIN_MAX_OPS: usize = 16;

/// A call or return event in the doubly linked list (index 0 is the head sentinel).
#[derive(Debug, Clone, Copy)]
struct Entry {
    op: usize,
    is_call: bool,
    /// A call's return entry, a return's call entry.
    partner: usize,
    prev: usize,
    next: usize,
}

/// An operation linearized on the current path, and how to undo or vary it.
struct Frame<S> {
    call: usize,
    /// An unknown operation taken out as a no-op at its return: no alternative at its depth.
    discarded: bool,
    before: S,
    successors: Vec<S>,
    next_successor: usize,
}

/// The deepest partial linearization seen, for the explanation.
struct Deepest<S> {
    depth: usize,
    state: S,
    linearized: Vec<bool>,
    blocking_op: usize,
    recent: Vec<usize>,
}

struct Search<'a, M: Model> {
    model: &'a M,
    ops: &'a [&'a Operation<M::Input, M::Output>],
    entries: Vec<Entry>,
    state: M::State,
    linearized: Vec<bool>,
    /// Zobrist hash of the linearized set: XOR of one random word per linearized op.
    set_hash: u64,
    zobrist: Vec<u64>,
    /// Fingerprints (128-bit hashes) of (linearized set, state) pairs already explored. A
    /// collision could only prune a branch, i.e. wrongly reject, with odds around 2^-100.
    explored: HashSet<u128>,
    stack: Vec<Frame<M::State>>,
    definite_ops: usize,
    definite_linearized: usize,
    deepest: Option<Deepest<M::State>>,
    budget: Budget,
    started: Instant,
    steps: u64,
}

impl<'a, M: Model> Search<'a, M> {
    fn new(
        model: &'a M,
        init: M::State,
        ops: &'a [&'a Operation<M::Input, M::Output>],
        budget: Budget,
        started: Instant,
    ) -> Self {
        Search {
            model,
            ops,
            entries: build_entries(ops),
            state: init,
            linearized: vec![false; ops.len()],
            set_hash: 0,
            zobrist: (0..ops.len() as u64).map(splitmix64).collect(),
            explored: HashSet::new(),
            stack: Vec::new(),
            definite_ops: ops.iter().filter(|op| !op.is_unknown()).count(),
            definite_linearized: 0,
            deepest: None,
            budget,
            started,
            steps: 0,
        }
    }

    fn run(&mut self) -> Verdict {
        let mut cursor = self.entries[HEAD].next;
        loop {
            if self.definite_linearized == self.definite_ops {
                return Verdict::Linearizable;
            }
            // While a definite operation is left, the scan meets its return before the end.
            assert_ne!(cursor, NIL, "ran past the last definite return");
            let entry = self.entries[cursor];
            if entry.is_call {
                if let Some(exhausted) = self.over_budget() {
                    return Verdict::Unknown(exhausted);
                }
                cursor = self.try_call(cursor);
                continue;
            }
            if self.ops[entry.op].is_unknown() {
                if let Some(next) = self.discard(entry.partner) {
                    cursor = next;
                    continue;
                }
            } else {
                self.note_depth(entry.op);
            }
            match self.backtrack() {
                Some(next) => cursor = next,
                None => return Verdict::Illegal(self.explain()),
            }
        }
    }

    /// Tries to linearize the call at `call` next; returns where the scan goes on.
    fn try_call(&mut self, call: usize) -> usize {
        self.steps += 1;
        let op = self.entries[call].op;
        let successors =
            match self
                .model
                .step(&self.state, &self.ops[op].input, &self.ops[op].outcome)
            {
                Ok(successors) => successors,
                Err(_) => return self.entries[call].next,
            };
        let mut frame = Frame {
            call,
            discarded: false,
            before: self.state.clone(),
            successors,
            next_successor: 0,
        };
        if self.enter(&mut frame) {
            self.stack.push(frame);
            self.entries[HEAD].next
        } else {
            self.entries[call].next
        }
    }

    /// The scan reached the return of the unknown operation called at `call`: past it the
    /// operation can only have had no effect, so take it out as a no-op. `None` when that
    /// (set, state) pair was explored already.
    fn discard(&mut self, call: usize) -> Option<usize> {
        let mut frame = Frame {
            call,
            discarded: true,
            before: self.state.clone(),
            successors: vec![self.state.clone()],
            next_successor: 0,
        };
        if !self.enter(&mut frame) {
            return None;
        }
        self.stack.push(frame);
        Some(self.entries[HEAD].next)
    }

    /// Linearizes the frame's operation into its next unexplored successor state, if any.
    fn enter(&mut self, frame: &mut Frame<M::State>) -> bool {
        let op = self.entries[frame.call].op;
        let set_hash = self.set_hash ^ self.zobrist[op];
        while frame.next_successor < frame.successors.len() {
            let candidate = &frame.successors[frame.next_successor];
            frame.next_successor += 1;
            if !self.explored.insert(fingerprint(set_hash, candidate)) {
                continue;
            }
            self.state = candidate.clone();
            self.set_hash = set_hash;
            self.mark(op, true);
            self.lift(frame.call);
            if !self.ops[op].is_unknown() || self.some_definite_op_may_follow() {
                return true;
            }
            self.unlift(frame.call);
            self.mark(op, false);
            self.set_hash ^= self.zobrist[op];
            self.state = frame.before.clone();
        }
        false
    }

    /// Whether one of the definite operations that could be linearized next (their calls
    /// come before the first definite return left in the list; unknown operations returning
    /// earlier may be placed or dropped first) may follow the current state. The next
    /// definite operation linearized is always one of those, so when none may follow, the
    /// path is dead however many unknown operations come first.
    fn some_definite_op_may_follow(&self) -> bool {
        if self.definite_linearized == self.definite_ops {
            return true;
        }
        let mut cursor = self.entries[HEAD].next;
        while cursor != NIL {
            let entry = self.entries[cursor];
            let op = self.ops[entry.op];
            match (&op.outcome, entry.is_call) {
                (Outcome::Ok(output), true)
                    if self.model.may_follow(&self.state, &op.input, output) =>
                {
                    return true;
                }
                (Outcome::Ok(_), false) => return false,
                _ => {}
            }
            cursor = entry.next;
        }
        false
    }

    /// Undoes the latest linearization and tries its next alternative; `None` when the stack
    /// is empty (nothing left to try: the history is not linearizable).
    fn backtrack(&mut self) -> Option<usize> {
        loop {
            let mut frame = self.stack.pop()?;
            let op = self.entries[frame.call].op;
            self.unlift(frame.call);
            self.mark(op, false);
            self.set_hash ^= self.zobrist[op];
            self.state = frame.before.clone();
            // A discard happened where the scan had tried every call before that return:
            // nothing else is left at its depth.
            if frame.discarded {
                continue;
            }
            if self.enter(&mut frame) {
                self.stack.push(frame);
                return Some(self.entries[HEAD].next);
            }
            return Some(self.entries[frame.call].next);
        }
    }

    fn mark(&mut self, op: usize, linearized: bool) {
        assert_ne!(self.linearized[op], linearized, "op {op} marked twice");
        self.linearized[op] = linearized;
        if !self.ops[op].is_unknown() {
            if linearized {
                self.definite_linearized += 1;
            } else {
                self.definite_linearized -= 1;
            }
        }
    }

    /// Removes a call and its return from the list (their own links are kept for `unlift`).
    fn lift(&mut self, call: usize) {
        let ret = self.entries[call].partner;
        self.unlink(call);
        self.unlink(ret);
    }

    /// Puts back what `lift` removed, in reverse order.
    fn unlift(&mut self, call: usize) {
        let ret = self.entries[call].partner;
        self.relink(ret);
        self.relink(call);
    }

    fn unlink(&mut self, at: usize) {
        let Entry { prev, next, .. } = self.entries[at];
        self.entries[prev].next = next;
        if next != NIL {
            self.entries[next].prev = prev;
        }
    }

    fn relink(&mut self, at: usize) {
        let Entry { prev, next, .. } = self.entries[at];
        self.entries[prev].next = at;
        if next != NIL {
            self.entries[next].prev = at;
        }
    }

    fn over_budget(&self) -> Option<String> {
        if self.steps >= self.budget.max_steps {
            return Some(format!(
                "step budget of {} exhausted",
                self.budget.max_steps
            ));
        }
        let clock_due = self.steps.is_multiple_of(CLOCK_CHECK_INTERVAL_STEPS);
        if clock_due && self.started.elapsed() >= self.budget.max_time {
            return Some(format!(
                "time budget of {:?} exhausted after {} steps",
                self.budget.max_time, self.steps
            ));
        }
        None
    }

    /// Remembers the deepest point where the search found `blocking_op` not linearizable.
    fn note_depth(&mut self, blocking_op: usize) {
        let depth = self.stack.len();
        if self.deepest.as_ref().is_some_and(|d| d.depth >= depth) {
            return;
        }
        let recent = self.stack[depth.saturating_sub(EXPLAIN_MAX_OPS)..]
            .iter()
            .map(|frame| self.entries[frame.call].op)
            .collect();
        self.deepest = Some(Deepest {
            depth,
            state: self.state.clone(),
            linearized: self.linearized.clone(),
            blocking_op,
            recent,
        });
    }

    /// Explains a rejection: the deepest prefix, the op that could not follow it, the state
    /// there and why each operation that could have come next was rejected.
    fn explain(&self) -> String {
        let deepest = self
            .deepest
            .as_ref()
            .expect("a rejection met a return entry");
        let blocking = self.ops[deepest.blocking_op];
        let mut text = String::new();
        let _ = writeln!(
            text,
            "not linearizable: at best {} of {} operations linearized ({} steps)",
            deepest.depth,
            self.ops.len(),
            self.steps
        );
        let _ = writeln!(
            text,
            "operation that could not be linearized: {}",
            describe(deepest.blocking_op, blocking)
        );
        let _ = writeln!(text, "model state there: {:?}", deepest.state);
        let _ = writeln!(text, "last operations linearized before it:");
        for &op in &deepest.recent {
            let _ = writeln!(text, "  {}", describe(op, self.ops[op]));
        }
        let _ = writeln!(
            text,
            "operations that could come next, tried in that state:"
        );
        let candidates = (0..self.ops.len())
            .filter(|&op| !deepest.linearized[op] && self.ops[op].call_ns <= blocking.return_ns);
        for op in candidates.take(EXPLAIN_MAX_OPS) {
            let verdict =
                match self
                    .model
                    .step(&deepest.state, &self.ops[op].input, &self.ops[op].outcome)
                {
                    Err(rejection) => format!("rejected: {rejection}"),
                    Ok(next) if next.is_empty() => "no effect possible here".to_string(),
                    Ok(_) => "accepted, but every path on from there failed".to_string(),
                };
            let _ = writeln!(text, "  {} -> {verdict}", describe(op, self.ops[op]));
        }
        text
    }
}

fn describe<I: Debug, O: Debug>(index: usize, op: &Operation<I, O>) -> String {
    let returned = if op.return_ns == u64::MAX {
        "inf".to_string()
    } else {
        op.return_ns.to_string()
    };
    format!(
        "#{index} client {} [{} ns .. {returned} ns] {:?} => {:?}",
        op.client, op.call_ns, op.input, op.outcome
    )
}

/// The head sentinel, then one call and one return entry per operation sorted by time (a
/// call before a return at the same instant: they count as concurrent), linked in order.
fn build_entries<I, O>(ops: &[&Operation<I, O>]) -> Vec<Entry> {
    let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(ops.len() * 2);
    for (index, op) in ops.iter().enumerate() {
        assert!(
            op.call_ns <= op.return_ns,
            "operation {index} returns before its call"
        );
        // `false` sorts first: calls (false = "not a return") before returns.
        events.push((op.call_ns, false, index));
        events.push((op.return_ns, true, index));
    }
    events.sort_unstable();
    let mut entries = Vec::with_capacity(events.len() + 1);
    entries.push(Entry {
        op: NIL,
        is_call: false,
        partner: NIL,
        prev: NIL,
        next: if events.is_empty() { NIL } else { 1 },
    });
    let mut call_entry = vec![NIL; ops.len()];
    for (position, &(_, is_return, op)) in events.iter().enumerate() {
        let at = position + 1;
        entries.push(Entry {
            op,
            is_call: !is_return,
            partner: NIL,
            prev: at - 1,
            next: if at == events.len() { NIL } else { at + 1 },
        });
        if is_return {
            entries[call_entry[op]].partner = at;
            entries[at].partner = call_entry[op];
        } else {
            call_entry[op] = at;
        }
    }
    entries
}

/// A 128-bit hash of (linearized set, state) from two differently salted SipHashes.
fn fingerprint<S: Hash>(set_hash: u64, state: &S) -> u128 {
    let half = |salt: u64| {
        let mut hasher = DefaultHasher::new();
        salt.hash(&mut hasher);
        set_hash.hash(&mut hasher);
        state.hash(&mut hasher);
        hasher.finish()
    };
    (u128::from(half(0x5eed_0001)) << 64) | u128::from(half(0x5eed_0002))
}

/// A well-mixed 64-bit word per index (SplitMix64), for the Zobrist set hash.
fn splitmix64(index: u64) -> u64 {
    let mut z = index.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
