//! Waiting for a condition that another task or thread makes true and then announces.

use event_listener::Event;

/// Resolves once `ready()` holds. Whoever makes it true must call `event.notify(..)` after.
/// The listener is registered before the re-check, so an announcement between the first
/// check and the wait is never missed.
pub async fn wait_until(event: &Event, ready: impl Fn() -> bool) {
    while !ready() {
        let listener = event.listen();
        if ready() {
            return;
        }
        listener.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn wakes_when_another_thread_makes_the_condition_true() {
        let event = Arc::new(Event::new());
        let flag = Arc::new(AtomicBool::new(false));
        let setter = {
            let (event, flag) = (event.clone(), flag.clone());
            std::thread::spawn(move || {
                flag.store(true, Ordering::SeqCst);
                event.notify(usize::MAX);
            })
        };
        futures_lite::future::block_on(wait_until(&event, || flag.load(Ordering::SeqCst)));
        setter.join().unwrap();
        assert!(flag.load(Ordering::SeqCst));
    }
}
