//! Waiting for a key's deletion through the core's watch hub (what etcd's concurrency recipes do
//! with a client watch): the Lock and Election services' waiters cost nothing until the key
//! they wait on changes, instead of a read per new revision.

use super::hub::{Hub, Sink, WatchSpec};
use futures::channel::oneshot;
use futures::future::{select, Either};
use send_wrapper::SendWrapper;
use std::pin::pin;
use std::rc::Rc;

/// Responses queued for one waiter: it only ever needs the first delete.
const WAITER_QUEUE_RESPONSES: usize = 4;

/// How a wait ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Waited {
    /// The key was deleted.
    Deleted,
    /// The watch was cancelled (its start revision was compacted): look again.
    Interrupted,
    /// The node is stopping.
    Stopped,
}

/// A handle on the hub of the core serving the request; usable from `Send` futures (it is
/// only touched on that core).
#[derive(Clone)]
pub struct Deletions {
    hub: SendWrapper<Rc<Hub>>,
}

impl Deletions {
    pub fn new(hub: Rc<Hub>) -> Deletions {
        Deletions {
            hub: SendWrapper::new(hub),
        }
    }

    /// Waits until `key` is deleted at `from_rev` or later.
    pub async fn wait(&self, key: &[u8], from_rev: i64) -> Waited {
        let answer = self.start(key.to_vec(), from_rev);
        answer.await.unwrap_or(Waited::Stopped)
    }

    /// Starts the watching task (synchronously: no `Rc` is held across an await).
    fn start(&self, key: Vec<u8>, from_rev: i64) -> oneshot::Receiver<Waited> {
        let hub = Rc::clone(&self.hub);
        let (done, answer) = oneshot::channel();
        glommio::spawn_local(watch_for_delete(hub, key, from_rev, done)).detach();
        answer
    }
}

/// Registers a delete-only watcher on `key` and reports the first delete; stops early when the
/// waiting request goes away.
async fn watch_for_delete(
    hub: Rc<Hub>,
    key: Vec<u8>,
    from_rev: i64,
    mut done: oneshot::Sender<Waited>,
) {
    let (tx, rx) = async_channel::bounded(WAITER_QUEUE_RESPONSES);
    let spec = WatchSpec {
        key,
        end: Vec::new(),
        prev_kv: false,
        fragment: false,
        progress_notify: false,
        no_put: true,
        no_delete: false,
    };
    let sink = Sink {
        tx,
        fragment_bytes: usize::MAX,
    };
    let watcher = hub.register(0, spec, sink, from_rev);
    let outcome = loop {
        let next = {
            let received = pin!(rx.recv());
            let abandoned = pin!(done.cancellation());
            match select(received, abandoned).await {
                Either::Left((received, _)) => received.ok(),
                Either::Right(_) => None, // nobody waits any more
            }
        };
        let Some(batch) = next else {
            break Waited::Stopped;
        };
        // Puts are filtered out: any event is the delete.
        if batch.iter().any(|response| !response.events.is_empty()) {
            break Waited::Deleted;
        }
        if batch.iter().any(|response| response.canceled) {
            break Waited::Interrupted;
        }
    };
    hub.cancel(&watcher);
    let _ = done.send(outcome);
}
