//! Auto compaction (etcd's `--auto-compaction-mode` / `--auto-compaction-retention`), run on
//! core 0 next to the meta group, compacting through the same path as a client's Compact.
//!
//! * `revision` mode keeps the last `retention` revisions: every `interval_ms` (etcd: 5 min)
//!   it compacts at `current - retention`, if that moved since the last time.
//! * `periodic` mode keeps `retention` of time: it samples the current revision every tenth
//!   of the retention (at most every 6 min, as etcd), and every retention (at most every hour)
//!   compacts at the newest sample at least one retention old.
//!
//! A compaction that a client's already passed is not an error: the next one moves on.

use super::errors::KvError;
use super::Node;
use ferrocd_api::etcdserverpb::CompactionRequest;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// etcd's revision-mode interval.
pub const REVISION_MODE_INTERVAL_MS: u64 = 5 * 60 * 1000;
/// etcd samples the revision `RETENTION_SAMPLES` times per retention in periodic mode.
const RETENTION_SAMPLES: u32 = 10;
/// etcd caps the periodic compaction interval at an hour (so samples at 6 minutes).
const MAX_PERIODIC_INTERVAL: Duration = Duration::from_secs(3600);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AutoCompaction {
    /// Keep this many revisions; check every `interval_ms`.
    Revisions { keep: i64, interval_ms: u64 },
    /// Keep this much history, in time.
    Period { retention: Duration },
}

/// Runs until the node stops (a compaction answers `Stopped`).
pub async fn run(node: Node, mode: AutoCompaction) {
    match mode {
        AutoCompaction::Revisions { keep, interval_ms } => {
            by_revisions(node, keep, Duration::from_millis(interval_ms)).await
        }
        AutoCompaction::Period { retention } => by_period(node, retention).await,
    }
}

async fn by_revisions(node: Node, keep: i64, interval: Duration) {
    assert!(keep > 0, "revision retention {keep} must be positive");
    loop {
        glommio::timer::sleep(interval).await;
        // The compacted revision moves with every compaction, ours or a client's.
        let target = node.shared().seq.visible() - keep;
        if target > node.shared().compacted() && !compact(&node, target).await {
            return;
        }
    }
}

async fn by_period(node: Node, retention: Duration) {
    assert!(!retention.is_zero(), "periodic retention must be positive");
    let compact_every = retention.min(MAX_PERIODIC_INTERVAL);
    let sample_every = compact_every / RETENTION_SAMPLES;
    let mut samples: VecDeque<(Instant, i64)> = VecDeque::new();
    let mut next_compaction = Instant::now() + compact_every;
    loop {
        let now = Instant::now();
        samples.push_back((now, node.shared().seq.visible()));
        if now >= next_compaction {
            next_compaction = now + compact_every;
            // Drop samples older than the newest one that is a full retention old.
            while samples
                .get(1)
                .is_some_and(|(at, _)| now.duration_since(*at) >= retention)
            {
                samples.pop_front();
            }
            let old_enough = samples
                .front()
                .filter(|(at, _)| now.duration_since(*at) >= retention)
                .map(|(_, rev)| *rev);
            if let Some(rev) = old_enough {
                if rev > node.shared().compacted() && !compact(&node, rev).await {
                    return;
                }
            }
        }
        glommio::timer::sleep(sample_every).await;
    }
}

/// Compacts at `rev`; false once the node is stopping. In a cluster only the leader compacts
/// (as etcd's compactor runs on the leader); every member follows the compaction.
async fn compact(node: &Node, rev: i64) -> bool {
    if !node.shared().role.is_serving() {
        return true;
    }
    let request = CompactionRequest {
        revision: rev,
        physical: false,
    };
    match node.compact(request).await {
        Ok(_) => {
            crate::info!("auto compaction", revision = rev);
            true
        }
        Err(KvError::Stopped) => false,
        // A client compacted past it meanwhile: the next round moves on.
        Err(_) => true,
    }
}
