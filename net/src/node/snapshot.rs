//! `Maintenance.Snapshot`: streams the node's state at one revision in the snapshot file
//! format (`ferrocd_engine::snapshot`), which `ferrocd snapshot restore` turns into a data dir.
//!
//! # Consistency
//!
//! The snapshot starts with a message to the meta group, which answers, between two of its
//! operations, the visible revision `R` and the meta state: the leases (granted TTLs) and the
//! auth state (roles, users, enabled). Leases are granted and revoked only by the meta group,
//! and it answers a revoke only once the revoke's deletes are visible, so every key live at
//! `R` that names a lease names one of the leases captured, and a lease captured has its keys
//! at `R` (a put naming a lease granted later takes a revision above `R`).
//!
//! Then each shard is read at `R`, a batch of keys at a time (`ShardMsg::Export`), while
//! writes go on: the stores are multi-version, every change at or below `R` is applied on
//! every shard (it is visible), and later changes are above `R`, so every batch sees the
//! history up to `R` as it will stay. Only compaction removes history. A compaction at `C`
//! drops, of each key, the changes below its newest change at or below `C`, which no read at
//! or above `C` needs; a batch exports what survives the compaction its shard has reached. So
//! with `C <= R` (a compaction is at most the visible revision when it runs, and batches are
//! taken one by one, so different batches may reflect different compactions), the snapshot
//! holds every change of the history at `R` that survives compaction at the highest `C` seen,
//! plus some that compaction would drop: the file records that highest `C` at its end and
//! restore compacts every key at it, which yields the source's history at `R` compacted at
//! `C`. A compaction above `R` during the stream may drop a change the rest of the snapshot
//! needs (the newest one at or below `R` of a key not yet exported): the shard then refuses
//! the batch (`required revision has been compacted`) and the stream ends with that error,
//! so the client never gets an inconsistent file; it can take a new snapshot.
//!
//! # Memory
//!
//! Per stream: one shard batch (`EXPORT_BATCH_BYTES` of keys and values, plus the last key's
//! history), its encoding, and `STREAM_BUFFER_MESSAGES` messages of `BLOB_BYTES` waiting for
//! the client. A slow client stalls only its own stream.
//!
//! # Messages
//!
//! As etcd: blobs of 32 KiB, each message with the header (at revision `R`) and
//! `remaining_bytes`. etcd knows its file size in advance; we do not, so `remaining_bytes` is
//! the number of encoded bytes waiting behind the message (a lower bound) until the last
//! shard batch is encoded, and exact from there on (it counts down to 0 on the last message).

use super::errors::KvError;
use super::meta::MetaMsg;
use super::shard::ShardMsg;
use super::{Node, Shared};
use ferrocd_api::etcdserverpb::SnapshotResponse;
use ferrocd_engine::mvcc::codec::LogPayload;
use ferrocd_engine::snapshot::{Encoder, Header};
use futures::channel::oneshot;
use std::sync::Arc;
use std::time::Instant;

/// etcd's snapshot blob size.
pub const BLOB_BYTES: usize = 32 * 1024;
/// Keys and values a shard copies out per export batch.
pub const EXPORT_BATCH_BYTES: usize = 1 << 20;
/// Messages encoded ahead of the client.
const STREAM_BUFFER_MESSAGES: usize = 4;

/// What the meta group captures when a snapshot starts.
pub struct SnapshotStart {
    pub revision: i64,
    /// At most `revision`: compactions run in the meta group too, at most at the visible
    /// revision.
    pub compacted: i64,
    /// Lease grants, then auth roles, users and the enabled flag, as meta log records.
    pub meta_records: Vec<LogPayload>,
}

/// Captures the start of a snapshot; runs inside the meta group, between its operations.
pub fn capture(shared: &Shared) -> SnapshotStart {
    let now = Instant::now();
    let mut meta_records: Vec<LogPayload> = shared
        .leases
        .list()
        .into_iter()
        .filter_map(|id| {
            let lease = shared.leases.time_to_live(id, false, now)?;
            Some(LogPayload::LeaseGrant {
                id,
                ttl_s: lease.granted_ttl_s,
            })
        })
        .collect();
    let auth = shared.auth.state();
    for name in auth.role_names() {
        let role = auth.role(&name).expect("listed role exists").clone();
        meta_records.push(LogPayload::AuthRolePut(role));
    }
    for name in auth.user_names() {
        let user = auth.user(&name).expect("listed user exists").clone();
        meta_records.push(LogPayload::AuthUserPut(user));
    }
    if auth.enabled {
        meta_records.push(LogPayload::AuthEnable { enabled: true });
    }
    SnapshotStart {
        revision: shared.seq.visible(),
        compacted: shared.compacted(),
        meta_records,
    }
}

pub type SnapshotItem = Result<SnapshotResponse, KvError>;

impl Node {
    /// Starts streaming a snapshot: the receiver yields its messages, then ends (after an
    /// error, if one ended the snapshot). Dropping the receiver stops the producer.
    pub async fn snapshot(&self) -> Result<async_channel::Receiver<SnapshotItem>, KvError> {
        let shared = self.shared().clone();
        let (reply, start) = oneshot::channel();
        shared
            .meta
            .send(MetaMsg::Snapshot { reply })
            .await
            .map_err(|_| KvError::Stopped)?;
        let start = start.await.map_err(|_| KvError::Stopped)?;
        Ok(stream(shared, start))
    }
}

/// Streams the snapshot `start` begins (captured by the meta group): the receiver yields its
/// messages, then ends (after an error, if one ended it). Dropping it stops the producer.
pub fn stream(shared: Arc<Shared>, start: SnapshotStart) -> async_channel::Receiver<SnapshotItem> {
    let (tx, rx) = async_channel::bounded(STREAM_BUFFER_MESSAGES);
    glommio::spawn_local(async move {
        let mut stream = Chunker {
            shared: shared.clone(),
            revision: start.revision,
            tx,
            pending: Vec::new(),
        };
        if let Err(e) = stream.produce(&start).await {
            // The client may be gone already; then nobody is left to tell.
            let _ = stream.tx.send(Err(e)).await;
        }
    })
    .detach();
    rx
}

/// Encodes the snapshot and cuts it into messages.
struct Chunker {
    shared: Arc<Shared>,
    revision: i64,
    tx: async_channel::Sender<SnapshotItem>,
    /// Encoded bytes not yet sent.
    pending: Vec<u8>,
}

impl Chunker {
    async fn produce(&mut self, start: &SnapshotStart) -> Result<(), KvError> {
        let header = Header {
            revision: self.revision,
            source_shards: self.shared.shards.len() as u32,
        };
        let mut encoder = Encoder::new(header, &mut self.pending);
        // Each batch's compaction is at most the revision, or its shard refused it.
        let mut compacted = start.compacted;
        for shard in 0..self.shared.shards.len() {
            let mut after = None;
            loop {
                let batch = self.export(shard, after.take()).await?;
                compacted = compacted.max(batch.compacted_revision);
                for change in &batch.versions {
                    encoder.change(change, &mut self.pending);
                }
                self.send_full_blobs().await?;
                match batch.next {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
        }
        for record in &start.meta_records {
            encoder.meta(record, &mut self.pending);
        }
        assert!(
            compacted <= self.revision,
            "a snapshot at {} holds a compaction at {compacted}",
            self.revision
        );
        encoder.finish(compacted, &mut self.pending);
        while !self.pending.is_empty() {
            self.send_blob().await?;
        }
        Ok(())
    }

    async fn export(
        &self,
        shard: usize,
        after: Option<Vec<u8>>,
    ) -> Result<ferrocd_engine::mvcc::Exported, KvError> {
        let (reply, answer) = oneshot::channel();
        let msg = ShardMsg::Export {
            after,
            rev: self.revision,
            max_bytes: EXPORT_BATCH_BYTES,
            reply,
        };
        self.shared.send_shard(shard, msg).await?;
        answer.await.map_err(|_| KvError::Stopped)?
    }

    async fn send_full_blobs(&mut self) -> Result<(), KvError> {
        while self.pending.len() >= BLOB_BYTES {
            self.send_blob().await?;
        }
        Ok(())
    }

    /// Sends the first blob of the pending bytes; fails (`Stopped`) when the client is gone.
    async fn send_blob(&mut self) -> Result<(), KvError> {
        let n = self.pending.len().min(BLOB_BYTES);
        let blob: Vec<u8> = self.pending.drain(..n).collect();
        let response = SnapshotResponse {
            header: Some(self.shared.header(self.revision)),
            remaining_bytes: self.pending.len() as u64,
            blob,
            // etcd 3.4 sends no storage version (the field is 3.5's).
            ..Default::default()
        };
        self.tx
            .send(Ok(response))
            .await
            .map_err(|_| KvError::Stopped)
    }
}
