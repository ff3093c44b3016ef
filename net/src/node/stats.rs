//! Figures for `/metrics`, asked from each shard and the meta group by message (their state
//! is owned by their cores and never shared).

use super::errors::KvError;
use super::meta::MetaMsg;
use super::shard::ShardMsg;
use super::Node;
use ferrocd_engine::checkpoint::FileStats;
use ferrocd_engine::mvcc::StoreStats;
use ferrocd_engine::wal::latency::LatencyHistogram;
use ferrocd_engine::wal::WalStats;
use futures::channel::oneshot;

/// One shard's store sizes and log counters.
#[derive(Clone, Copy, Debug)]
pub struct ShardStats {
    pub store: StoreStats,
    pub wal: WalStats,
    /// Checkpoint commits (page writes and fdatasyncs of the shard's B+tree file).
    pub checkpoint_commit: LatencyHistogram,
}

/// Every shard's figures in shard order, and the meta group's log counters.
#[derive(Clone, Debug)]
pub struct NodeStats {
    pub shards: Vec<ShardStats>,
    pub meta_wal: WalStats,
}

impl Node {
    /// The checkpoint files' sizes summed over shards, after packing them when `defragment`
    /// (etcd's Defragment).
    pub async fn db_files(&self, defragment: bool) -> Result<FileStats, KvError> {
        let files = self
            .shared()
            .ask_every_shard(|reply| ShardMsg::File { defragment, reply })
            .await?;
        Ok(files
            .iter()
            .fold(FileStats::default(), |total, file| FileStats {
                size_bytes: total.size_bytes + file.size_bytes,
                in_use_bytes: total.in_use_bytes + file.in_use_bytes,
            }))
    }

    pub async fn stats(&self) -> Result<NodeStats, KvError> {
        let shared = self.shared();
        let shards = shared
            .ask_every_shard(|reply| ShardMsg::Stats { reply })
            .await?;
        let (reply, meta_answer) = oneshot::channel();
        shared
            .meta
            .send(MetaMsg::Stats { reply })
            .await
            .map_err(|_| KvError::Stopped)?;
        let meta_wal = meta_answer.await.map_err(|_| KvError::Stopped)?;
        Ok(NodeStats { shards, meta_wal })
    }
}
