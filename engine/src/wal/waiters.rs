//! Single-threaded wait queues for the writer (no atomics: a WAL lives on one core).

use std::collections::VecDeque;
use std::task::Waker;

/// Strict FIFO admission: a waiter passes only when it is at the front. glommio's Semaphore
/// lets a small request overtake a large one, which would reorder log records.
#[derive(Default)]
pub(crate) struct Gate {
    queue: VecDeque<(u64, Waker)>,
    next_ticket: u64,
}

impl Gate {
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Queues a waiter at the back; returns its ticket.
    pub fn enqueue(&mut self, waker: &Waker) -> u64 {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.queue.push_back((ticket, waker.clone()));
        ticket
    }

    pub fn is_front(&self, ticket: u64) -> bool {
        self.queue
            .front()
            .is_some_and(|&(front, _)| front == ticket)
    }

    pub fn update_waker(&mut self, ticket: u64, waker: &Waker) {
        if let Some((_, slot)) = self.queue.iter_mut().find(|(t, _)| *t == ticket) {
            slot.clone_from(waker);
        }
    }

    /// Removes `ticket` (admitted or abandoned) and wakes the new front, which may now pass.
    pub fn remove(&mut self, ticket: u64) {
        self.queue.retain(|&(t, _)| t != ticket);
        self.wake_front();
    }

    pub fn wake_front(&self) {
        if let Some((_, waker)) = self.queue.front() {
            waker.wake_by_ref();
        }
    }

    pub fn wake_all(&self) {
        self.queue.iter().for_each(|(_, waker)| waker.wake_by_ref());
    }
}

/// Tasks waiting for the same event; each re-checks its condition when woken.
#[derive(Default)]
pub(crate) struct WakerList {
    wakers: Vec<Waker>,
}

impl WakerList {
    pub fn register(&mut self, waker: &Waker) {
        if !self.wakers.iter().any(|w| w.will_wake(waker)) {
            self.wakers.push(waker.clone());
        }
    }

    pub fn wake_all(&mut self) {
        self.wakers.drain(..).for_each(Waker::wake);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;

    struct Counter(AtomicUsize);

    impl Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn counting_waker() -> (Arc<Counter>, Waker) {
        let counter = Arc::new(Counter(AtomicUsize::new(0)));
        (counter.clone(), Waker::from(counter))
    }

    #[test]
    fn gate_is_fifo_and_wakes_the_next_front() {
        let (first_count, first) = counting_waker();
        let (second_count, second) = counting_waker();
        let mut gate = Gate::default();
        let a = gate.enqueue(&first);
        let b = gate.enqueue(&second);
        assert!(gate.is_front(a) && !gate.is_front(b));
        gate.remove(a);
        assert!(gate.is_front(b));
        assert_eq!(second_count.0.load(Ordering::SeqCst), 1);
        assert_eq!(first_count.0.load(Ordering::SeqCst), 0);
        gate.remove(b);
        assert!(gate.is_empty());
    }

    #[test]
    fn waker_list_wakes_each_task_once() {
        let (count, waker) = counting_waker();
        let mut list = WakerList::default();
        list.register(&waker);
        list.register(&waker);
        list.wake_all();
        list.wake_all();
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
    }
}
