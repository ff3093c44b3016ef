//! The `watch` workload: `watchers` watch streams, spread over the connections, each on the key
//! range `0..watched_keys`, while the clients put over the whole key space.
//!
//! Every put carries the time it was sent (nanoseconds since the start of the run) in the first
//! bytes of its value; a watcher receiving the event records `now - sent` as the event's
//! delivery latency. Once the puts are done, every watcher must have received one event per
//! acknowledged put to a watched key, in increasing revision order: an event missed, repeated
//! or out of order counts as an error.
//!
//! `slow_watchers` more streams watch every key and are never read, on a connection of their
//! own (an unread stream holds HTTP/2 connection window, which would stall other streams of
//! its connection in the client). The server must neither wait for them nor let them slow the
//! puts: the run reports the puts' own latency next to the events' delivery latency, so runs
//! with and without slow watchers compare writer latency.

use crate::load::{bounded, connect, run_kv_workers, KeySpec, LoadSpec, RunResult, Shared};
use crate::stats::{Latencies, WatchCounts};
use crate::{setup_error, BenchResult};
use etcd_client::{Client, WatchOptions, WatchResponse, WatchStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch as signal;
use tokio::time::Instant;

/// Bytes of the value that hold the send timestamp.
pub const STAMP_BYTES: usize = 8;
/// How long watchers may take, after the last put was acknowledged, to receive their events.
const DRAIN_TIMEOUT_MS: u64 = 10_000;

/// Checks the watch options against the key space.
pub(crate) fn validate(watchers: usize, watched_keys: u64, keys: &KeySpec) -> Result<(), String> {
    if watchers == 0 {
        return Err("--watchers must be at least 1".into());
    }
    if watched_keys == 0 || watched_keys > keys.key_space {
        return Err(format!(
            "--watched-keys {watched_keys} is not within 1..=--key-space ({})",
            keys.key_space
        ));
    }
    if keys.val_size_bytes < STAMP_BYTES {
        return Err(format!(
            "watch puts carry an {STAMP_BYTES}-byte send timestamp: --val-size must be at least {STAMP_BYTES}"
        ));
    }
    Ok(())
}

/// Writes `since_start` into the first [`STAMP_BYTES`] of `value`.
pub(crate) fn stamp(value: &mut [u8], since_start: Duration) {
    let nanos = u64::try_from(since_start.as_nanos()).unwrap_or(u64::MAX);
    value[..STAMP_BYTES].copy_from_slice(&nanos.to_le_bytes());
}

/// The send time that [`stamp`] wrote, if `value` is long enough to hold one.
fn read_stamp(value: &[u8]) -> Option<Duration> {
    let bytes: [u8; STAMP_BYTES] = value.get(..STAMP_BYTES)?.try_into().ok()?;
    Some(Duration::from_nanos(u64::from_le_bytes(bytes)))
}

/// Told to every watcher once the puts are done.
#[derive(Clone, Copy, Debug)]
struct Drain {
    /// Events each watcher must have received.
    expected: u64,
    deadline: Instant,
}

/// What one watcher saw.
#[derive(Default)]
struct Tally {
    latencies: Latencies,
    received: u64,
    duplicated: u64,
    last_revision: i64,
}

/// The watch streams of a run.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Watchers {
    pub watchers: usize,
    pub watched_keys: u64,
    pub slow_watchers: usize,
}

/// Creates the watchers, runs the puts, waits for the events and reports their latencies.
pub(crate) async fn run(
    spec: &LoadSpec,
    clients: &[Client],
    Watchers {
        watchers,
        watched_keys,
        slow_watchers,
    }: Watchers,
    progress: bool,
) -> BenchResult<RunResult> {
    let streams =
        create_watchers(clients, watchers, watched_range(&spec.keys, watched_keys)).await?;
    // Held, never read, until the run is over.
    let _slow = match slow_watchers {
        0 => Vec::new(),
        n => {
            let own = connect(&LoadSpec {
                conns: 1,
                ..spec.clone()
            })
            .await?;
            create_watchers(&own, n, (vec![0], vec![0])).await?
        }
    };
    let shared = Arc::new(Shared::new(spec.stop));
    let (drain_sender, drain_receiver) = signal::channel(None);
    let tasks: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(index, stream)| {
            let receiver = drain_receiver.clone();
            tokio::spawn(receive_events(index, stream, shared.clone(), receiver))
        })
        .collect();
    let put_latencies = run_kv_workers(spec, clients, &shared, progress).await?;
    let puts = shared.watched_puts.load(Ordering::Relaxed);
    drain_sender.send_replace(Some(Drain {
        expected: puts,
        deadline: Instant::now() + Duration::from_millis(DRAIN_TIMEOUT_MS),
    }));
    let mut latencies = Latencies::new();
    let mut counts = WatchCounts {
        watchers: watchers as u64,
        slow_watchers: slow_watchers as u64,
        puts,
        events_expected: puts * watchers as u64,
        ..WatchCounts::default()
    };
    for task in tasks {
        let tally = task.await?;
        latencies.merge(&tally.latencies);
        counts.events_received += tally.received;
        counts.events_duplicated += tally.duplicated;
    }
    let mut result = shared.result(latencies);
    result.watch = Some(counts);
    result.put_latencies = Some(put_latencies);
    Ok(result)
}

/// `[first key, last watched key + "\0")`: exactly the keys with index below `watched_keys`,
/// since every key has the same width.
fn watched_range(keys: &KeySpec, watched_keys: u64) -> (Vec<u8>, Vec<u8>) {
    let mut end = keys.key(watched_keys - 1);
    end.push(0);
    (keys.key(0), end)
}

/// Opens one watch stream per watcher, connections round-robin, and waits until the server
/// confirms each: from then on every put to the range must reach it.
async fn create_watchers(
    clients: &[Client],
    watchers: usize,
    (start, end): (Vec<u8>, Vec<u8>),
) -> BenchResult<Vec<WatchStream>> {
    let mut streams = Vec::with_capacity(watchers);
    for index in 0..watchers {
        let mut client = clients[index % clients.len()].watch_client();
        let options = WatchOptions::new().with_range(end.clone());
        let mut stream = bounded("create watcher", client.watch(start.clone(), Some(options)))
            .await
            .map_err(|e| setup_error("Watch", "create watcher", e))?;
        let first = bounded("watch created response", stream.message())
            .await
            .map_err(|e| setup_error("Watch", "create watcher", e))?;
        match first {
            Some(response) if response.created() && !response.canceled() => streams.push(stream),
            Some(response) => {
                let reason = response.cancel_reason();
                return Err(format!("watcher {index} was not created: {reason:?}").into());
            }
            None => return Err(format!("watcher {index}: stream closed before created").into()),
        }
    }
    Ok(streams)
}

/// One watcher: takes events until it has all it must have or the drain deadline passes.
async fn receive_events(
    index: usize,
    mut stream: WatchStream,
    shared: Arc<Shared>,
    mut drain: signal::Receiver<Option<Drain>>,
) -> Tally {
    let mut tally = Tally::default();
    loop {
        let target = *drain.borrow_and_update();
        if target.is_some_and(|d| tally.received >= d.expected) {
            break;
        }
        // Before the drain is known the loop ends with the puts, which are bounded themselves.
        let deadline = target.map_or_else(far_future, |d| d.deadline);
        tokio::select! {
            message = stream.message() => match message {
                Ok(Some(response)) => tally.absorb(index, &response, &shared),
                Ok(None) => {
                    shared.record_errors(1, format!("watcher {index}: stream closed by the server"));
                    break;
                }
                Err(error) => {
                    shared.record_errors(1, format!("watcher {index}: {error}"));
                    break;
                }
            },
            // The sender lives until every watcher is joined, unless the run failed early.
            changed = drain.changed() => if changed.is_err() { break },
            _ = tokio::time::sleep_until(deadline), if target.is_some() => break,
        }
    }
    // A watcher that broke off early still has to learn how many events it missed.
    let expected = drain
        .wait_for(Option::is_some)
        .await
        .map_or(0, |d| d.map_or(0, |d| d.expected));
    if tally.received != expected {
        let gap = tally.received.abs_diff(expected);
        let message = format!(
            "watcher {index} received {} events for {expected} acknowledged puts",
            tally.received
        );
        shared.record_errors(gap, message);
    }
    tally
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(24 * 3600)
}

impl Tally {
    fn absorb(&mut self, index: usize, response: &WatchResponse, shared: &Shared) {
        if response.canceled() {
            let reason = response.cancel_reason();
            shared.record_errors(1, format!("watcher {index} canceled: {reason:?}"));
            return;
        }
        let now = shared.started.elapsed();
        for event in response.events() {
            let Some(kv) = event.kv() else {
                shared.record_errors(1, format!("watcher {index}: event without a key-value"));
                continue;
            };
            if kv.mod_revision() <= self.last_revision {
                self.duplicated += 1;
                let message = format!(
                    "watcher {index}: event at revision {} after revision {}",
                    kv.mod_revision(),
                    self.last_revision
                );
                shared.record_errors(1, message);
                continue;
            }
            self.last_revision = kv.mod_revision();
            self.received += 1;
            match read_stamp(kv.value()) {
                Some(sent) => self.latencies.record(now.saturating_sub(sent)),
                None => shared.record_errors(1, format!("watcher {index}: value without a stamp")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(key_space: u64, val_size_bytes: usize) -> KeySpec {
        KeySpec {
            key_size_bytes: 4,
            val_size_bytes,
            key_space,
            sequential: false,
        }
    }

    #[test]
    fn stamps_round_trip_through_values() {
        let mut value = vec![b'v'; 16];
        stamp(&mut value, Duration::from_micros(1234));
        assert_eq!(read_stamp(&value), Some(Duration::from_micros(1234)));
        assert_eq!(
            &value[STAMP_BYTES..],
            b"vvvvvvvv",
            "the padding is left alone"
        );
        assert_eq!(read_stamp(b"short"), None);
    }

    #[test]
    fn the_range_holds_exactly_the_watched_keys() {
        let spec = keys(1000, 8);
        let (start, end) = watched_range(&spec, 10);
        let inside = |k: &[u8]| start.as_slice() <= k && k < end.as_slice();
        assert!((0..10).all(|i| inside(&spec.key(i))));
        assert!((10..1000).all(|i| !inside(&spec.key(i))));
    }

    #[test]
    fn options_are_checked() {
        assert!(validate(1, 10, &keys(10, 8)).is_ok());
        assert!(validate(0, 10, &keys(10, 8)).is_err());
        assert!(validate(1, 11, &keys(10, 8)).is_err());
        assert!(validate(1, 0, &keys(10, 8)).is_err());
        assert!(
            validate(1, 10, &keys(10, 7)).is_err(),
            "no room for the stamp"
        );
    }
}
