//! Per-peer health and traffic figures, with etcd's metric names
//! (`etcd_network_peer_*`, labels `To`/`From` = member id in hex as etcd's `types.ID`).
//!
//! One slot per core: a core only locks its own (uncontended, once per written batch or
//! read buffer); a `/metrics` scrape or a test sums the slots.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hashbrown::HashMap;

use crate::metrics::family;

/// etcd's RTT buckets: upper bounds 0.1 ms doubling to 3.2768 s (16 buckets).
pub const RTT_BUCKETS: usize = 16;
const RTT_FIRST_BOUND_S: f64 = 0.0001;

fn rtt_bound_s(bucket: usize) -> f64 {
    RTT_FIRST_BOUND_S * (1u64 << bucket) as f64
}

/// One peer's figures as seen by one core (or summed over all).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PeerCounters {
    /// Cores whose outbound connection to the peer is up (0 or 1 in a core's slot).
    pub connected_cores: usize,
    pub sent_bytes: u64,
    pub sent_frames: u64,
    pub received_bytes: u64,
    pub received_frames: u64,
    /// Frames dropped because the peer's queue was full (raft retransmits).
    pub dropped_frames: u64,
    /// Connections that ended with an error or failed to open.
    pub connection_failures: u64,
    /// Round trips measured (ping to pong) and their sum.
    pub rtt_count: u64,
    pub rtt_sum_s: f64,
    /// Non-cumulative counts per bucket; a round trip over the last bound counts only in
    /// `rtt_count` (Prometheus' `+Inf`).
    pub rtt_buckets: [u64; RTT_BUCKETS],
}

impl PeerCounters {
    pub fn observe_rtt(&mut self, rtt: Duration) {
        let seconds = rtt.as_secs_f64();
        self.rtt_count += 1;
        self.rtt_sum_s += seconds;
        if let Some(bucket) = (0..RTT_BUCKETS).find(|&b| seconds <= rtt_bound_s(b)) {
            self.rtt_buckets[bucket] += 1;
        }
    }

    fn add(&mut self, other: &PeerCounters) {
        self.connected_cores += other.connected_cores;
        self.sent_bytes += other.sent_bytes;
        self.sent_frames += other.sent_frames;
        self.received_bytes += other.received_bytes;
        self.received_frames += other.received_frames;
        self.dropped_frames += other.dropped_frames;
        self.connection_failures += other.connection_failures;
        self.rtt_count += other.rtt_count;
        self.rtt_sum_s += other.rtt_sum_s;
        for (sum, count) in self.rtt_buckets.iter_mut().zip(other.rtt_buckets) {
            *sum += count;
        }
    }
}

/// A per-peer metric family other than the round trip histogram.
struct PeerFamily {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    /// `To` for what we send, `From` for what we receive (etcd's labels).
    label: &'static str,
    value: fn(&PeerCounters) -> u64,
}

const PEER_FAMILIES: [PeerFamily; 5] = [
    PeerFamily {
        name: "etcd_network_peer_sent_bytes_total",
        kind: "counter",
        help: "The total number of bytes sent to peers.",
        label: "To",
        value: |c| c.sent_bytes,
    },
    PeerFamily {
        name: "etcd_network_peer_received_bytes_total",
        kind: "counter",
        help: "The total number of bytes received from peers.",
        label: "From",
        value: |c| c.received_bytes,
    },
    PeerFamily {
        name: "etcd_network_peer_sent_failures_total",
        kind: "counter",
        help: "The total number of send failures from peers.",
        label: "To",
        value: |c| c.connection_failures,
    },
    PeerFamily {
        name: "ferrocd_network_peer_dropped_frames_total",
        kind: "counter",
        help: "Frames dropped because a peer's queue was full.",
        label: "To",
        value: |c| c.dropped_frames,
    },
    PeerFamily {
        name: "ferrocd_network_peer_connected_cores",
        kind: "gauge",
        help: "Cores with an open connection to the peer.",
        label: "To",
        value: |c| c.connected_cores as u64,
    },
];

pub struct PeerStats {
    cores: Vec<Mutex<HashMap<u64, PeerCounters>>>,
}

impl PeerStats {
    pub fn new(cores: usize) -> Arc<PeerStats> {
        Arc::new(PeerStats {
            cores: (0..cores).map(|_| Mutex::default()).collect(),
        })
    }

    fn slot(&self, core: usize) -> MutexGuard<'_, HashMap<u64, PeerCounters>> {
        self.cores[core].lock().expect("peer stats slot poisoned")
    }

    /// Updates the figures of `peer` in `core`'s slot.
    pub fn update(&self, core: usize, peer: u64, change: impl FnOnce(&mut PeerCounters)) {
        change(self.slot(core).entry(peer).or_default());
    }

    /// `peer`'s figures summed over all cores.
    pub fn peer(&self, peer: u64) -> PeerCounters {
        let mut total = PeerCounters::default();
        for core in 0..self.cores.len() {
            if let Some(counters) = self.slot(core).get(&peer) {
                total.add(counters);
            }
        }
        total
    }

    fn peers(&self) -> Vec<u64> {
        let mut peers: Vec<u64> = (0..self.cores.len())
            .flat_map(|core| self.slot(core).keys().copied().collect::<Vec<_>>())
            .collect();
        peers.sort_unstable();
        peers.dedup();
        peers
    }

    /// Appends the Prometheus text of every peer's figures to `out`; nothing without peers
    /// (Prometheus clients, etcd's included, leave out families that have no samples).
    pub fn render(&self, out: &mut String) {
        let peers: Vec<(u64, PeerCounters)> = self
            .peers()
            .into_iter()
            .map(|p| (p, self.peer(p)))
            .collect();
        if peers.is_empty() {
            return;
        }
        for f in &PEER_FAMILIES {
            let samples: Vec<(String, String)> = peers
                .iter()
                .map(|(peer, c)| {
                    (
                        format!("{{{}=\"{peer:x}\"}}", f.label),
                        (f.value)(c).to_string(),
                    )
                })
                .collect();
            family(out, f.name, f.kind, f.help, &samples);
        }
        let mut rtt = Vec::new();
        for (peer, c) in &peers {
            let mut cumulative = 0;
            for (bucket, count) in c.rtt_buckets.iter().enumerate() {
                cumulative += count;
                let le = rtt_bound_s(bucket);
                rtt.push((
                    format!("_bucket{{To=\"{peer:x}\",le=\"{le}\"}}"),
                    cumulative.to_string(),
                ));
            }
            rtt.push((
                format!("_bucket{{To=\"{peer:x}\",le=\"+Inf\"}}"),
                c.rtt_count.to_string(),
            ));
            rtt.push((format!("_sum{{To=\"{peer:x}\"}}"), c.rtt_sum_s.to_string()));
            rtt.push((
                format!("_count{{To=\"{peer:x}\"}}"),
                c.rtt_count.to_string(),
            ));
        }
        let help = "Round-Trip-Time histogram between peers";
        family(
            out,
            "etcd_network_peer_round_trip_time_seconds",
            "histogram",
            help,
            &rtt,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_cores_and_renders_histogram() {
        let stats = PeerStats::new(2);
        stats.update(0, 0x1f, |c| {
            c.sent_bytes += 10;
            c.observe_rtt(Duration::from_micros(50));
        });
        stats.update(1, 0x1f, |c| {
            c.sent_bytes += 5;
            c.observe_rtt(Duration::from_secs(10));
        });
        let total = stats.peer(0x1f);
        assert_eq!(total.sent_bytes, 15);
        assert_eq!(total.rtt_count, 2);
        assert_eq!(total.rtt_buckets[0], 1);
        let mut text = String::new();
        stats.render(&mut text);
        assert!(
            text.contains("etcd_network_peer_sent_bytes_total{To=\"1f\"} 15\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "etcd_network_peer_round_trip_time_seconds_bucket{To=\"1f\",le=\"0.0001\"} 1\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "etcd_network_peer_round_trip_time_seconds_bucket{To=\"1f\",le=\"+Inf\"} 2\n"
            ),
            "{text}"
        );
    }
}
