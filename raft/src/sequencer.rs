//! The revision sequencer and the visibility watermark (design brief §4; invariants I1 and I3).
//!
//! Every change in the store takes its revision from one counter shared by all cores. Writers
//! (one per shard, plus the meta group that commits cross-shard writes) take revisions, make the
//! change durable, and then *settle*. The watermark `visible` is the highest revision `R` such
//! that every revision `<= R` that was ever handed out is durable and applied. Reads and response
//! headers use it, and a write is acknowledged only once `visible` has reached its revision, so:
//!
//! * I1: a request sent after another was acknowledged takes a larger revision, because the
//!   counter only grows and the first request's revision was taken before its acknowledgement.
//! * I3: once a response reported `R`, nothing `<= R` can appear later: every revision `<= R`
//!   was already settled when `R` became visible, and new revisions are always above the counter.
//!
//! ## Why the watermark computation is race-free
//!
//! Each writer owns a *floor* slot: the lowest revision it has taken but not yet settled, or
//! `NONE_PENDING`. Before a writer with nothing pending takes a revision, it stores
//! `counter + 1` into its floor (a lower bound on what it is about to take), then takes the
//! revision with `fetch_add`. The watermark is computed as `min(counter, min(floors) - 1)`,
//! loading the counter *before* the floors. All accesses are `SeqCst`, so if the computation's
//! counter load observed a writer's `fetch_add`, its floor load observes the earlier floor
//! store too, and the unsettled revision is excluded. A computed value is valid forever
//! (revisions handed out later are above the counter it read), so `visible` only ever takes
//! the maximum of computed values.

use event_listener::{Event, Listener};
use std::sync::atomic::{AtomicI64, Ordering::SeqCst};

/// A floor value meaning "this writer has nothing pending".
const NONE_PENDING: i64 = i64::MAX;

/// Identifies one writer slot: a shard or the meta group. A slot must be used by one thread.
pub type WriterId = usize;

pub struct Sequencer {
    /// The highest revision handed out.
    counter: AtomicI64,
    /// Per writer: the lowest revision taken but not settled, or `NONE_PENDING`.
    floors: Box<[AtomicI64]>,
    /// The visibility watermark (see the module documentation).
    visible: AtomicI64,
    /// Notified whenever `visible` may have advanced.
    advanced: Event,
}

impl Sequencer {
    /// A sequencer for `writers` writer slots whose durable state ends at revision `current`.
    pub fn new(writers: usize, current: i64) -> Self {
        assert!(writers > 0, "a sequencer needs at least one writer");
        assert!(current >= 1, "etcd revisions start at 1");
        Sequencer {
            counter: AtomicI64::new(current),
            floors: (0..writers).map(|_| AtomicI64::new(NONE_PENDING)).collect(),
            visible: AtomicI64::new(current),
            advanced: Event::new(),
        }
    }

    /// Takes the next revision for `writer`. `has_pending` tells whether the writer already
    /// holds an unsettled revision (then its floor is already at or below the new one).
    pub fn take(&self, writer: WriterId, has_pending: bool) -> i64 {
        let floor = &self.floors[writer];
        if has_pending {
            assert!(
                floor.load(SeqCst) != NONE_PENDING,
                "writer {writer} has no pending revision"
            );
        } else {
            assert_eq!(
                floor.load(SeqCst),
                NONE_PENDING,
                "writer {writer} has a pending revision"
            );
            floor.store(self.counter.load(SeqCst) + 1, SeqCst);
        }
        self.counter.fetch_add(1, SeqCst) + 1
    }

    /// Records that `writer` has made durable and applied all it took, except revisions from
    /// `next_pending` on (`None`: nothing left). Wakes acknowledgements waiting on the watermark.
    pub fn settle(&self, writer: WriterId, next_pending: Option<i64>) {
        self.floors[writer].store(next_pending.unwrap_or(NONE_PENDING), SeqCst);
        let counter = self.counter.load(SeqCst);
        let lowest_floor = self
            .floors
            .iter()
            .map(|f| f.load(SeqCst))
            .min()
            .unwrap_or(NONE_PENDING);
        let watermark = counter.min(lowest_floor.saturating_sub(1));
        if self.visible.fetch_max(watermark, SeqCst) < watermark {
            self.advanced.notify(usize::MAX);
        }
    }

    /// A follower applied every committed change up to `rev`: it takes no revisions itself, so
    /// the watermark is simply what it applied (replicated changes arrive in revision order).
    pub fn follow(&self, rev: i64) {
        assert!(
            self.floors.iter().all(|f| f.load(SeqCst) == NONE_PENDING),
            "a follower has no revision of its own pending"
        );
        self.counter.fetch_max(rev, SeqCst);
        if self.visible.fetch_max(rev, SeqCst) < rev {
            self.advanced.notify(usize::MAX);
        }
    }

    /// Leadership was lost: the revisions taken and not settled will never be settled here
    /// (each write either commits under the next leader and is applied by `follow`, or never).
    /// The watermark stays where it is; the counter keeps its height, so a revision abandoned
    /// here is never reused by this member (a gap, which clients tolerate).
    pub fn abandon(&self) {
        for floor in self.floors.iter() {
            floor.store(NONE_PENDING, SeqCst);
        }
    }

    /// The highest revision whose changes, and all changes before it, are durable and applied.
    pub fn visible(&self) -> i64 {
        self.visible.load(SeqCst)
    }

    /// The highest revision handed out (possibly not yet durable).
    pub fn latest_taken(&self) -> i64 {
        self.counter.load(SeqCst)
    }

    /// Resolves once `visible() >= rev`. Safe to await from any core.
    pub async fn wait_visible(&self, rev: i64) {
        crate::notify::wait_until(&self.advanced, || self.visible() >= rev).await
    }

    /// Blocking variant of `wait_visible` for threads outside any executor (tests, shutdown).
    pub fn wait_visible_blocking(&self, rev: i64) {
        while self.visible() < rev {
            let listener = self.advanced.listen();
            if self.visible() >= rev {
                return;
            }
            listener.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn single_writer_becomes_visible_on_settle() {
        let seq = Sequencer::new(1, 1);
        let rev = seq.take(0, false);
        assert_eq!(rev, 2);
        assert_eq!(seq.visible(), 1, "an unsettled revision is not visible");
        seq.settle(0, None);
        assert_eq!(seq.visible(), 2);
    }

    #[test]
    fn a_slow_writer_holds_back_later_revisions_of_others() {
        let seq = Sequencer::new(2, 1);
        let a = seq.take(0, false); // 2, stays pending
        let b = seq.take(1, false); // 3
        seq.settle(1, None);
        assert_eq!(
            seq.visible(),
            1,
            "rev {b} settled but rev {a} is still pending"
        );
        seq.settle(0, None);
        assert_eq!(seq.visible(), 3);
    }

    #[test]
    fn pipelined_revisions_settle_in_prefixes() {
        let seq = Sequencer::new(1, 10);
        let r1 = seq.take(0, false);
        let r2 = seq.take(0, true);
        let r3 = seq.take(0, true);
        assert_eq!((r1, r2, r3), (11, 12, 13));
        seq.settle(0, Some(r2));
        assert_eq!(seq.visible(), 11);
        seq.settle(0, Some(r3));
        assert_eq!(seq.visible(), 12);
        seq.settle(0, None);
        assert_eq!(seq.visible(), 13);
    }

    #[test]
    fn concurrent_writers_never_expose_an_unsettled_revision() {
        const WRITERS: usize = 4;
        const ROUNDS: usize = 2_000;
        let seq = Arc::new(Sequencer::new(WRITERS, 1));
        // Each writer records, for each revision, that it is settled; a checker thread asserts
        // that everything at or below the watermark is settled.
        let settled: Arc<Vec<AtomicI64>> = Arc::new(
            (0..=(WRITERS * ROUNDS + 1))
                .map(|_| AtomicI64::new(0))
                .collect(),
        );
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (seq, settled) = (seq.clone(), settled.clone());
                std::thread::spawn(move || {
                    for _ in 0..ROUNDS {
                        let rev = seq.take(w, false);
                        settled[rev as usize].store(1, SeqCst);
                        seq.settle(w, None);
                    }
                })
            })
            .collect();
        let checker = {
            let (seq, settled) = (seq.clone(), settled.clone());
            std::thread::spawn(move || {
                let last = (WRITERS * ROUNDS + 1) as i64;
                while seq.visible() < last {
                    let visible = seq.visible();
                    for rev in 2..=visible {
                        assert_eq!(
                            settled[rev as usize].load(SeqCst),
                            1,
                            "rev {rev} visible early"
                        );
                    }
                }
            })
        };
        for w in writers {
            w.join().unwrap();
        }
        checker.join().unwrap();
        assert_eq!(seq.visible(), (WRITERS * ROUNDS + 1) as i64);
    }

    #[test]
    fn waiters_wake_when_the_watermark_passes_their_revision() {
        let seq = Arc::new(Sequencer::new(1, 1));
        let rev = seq.take(0, false);
        let waiter = {
            let seq = seq.clone();
            std::thread::spawn(move || seq.wait_visible_blocking(rev))
        };
        seq.settle(0, None);
        waiter.join().unwrap();
        assert!(seq.visible() >= rev);
    }
}
