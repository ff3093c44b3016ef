//! `ferrocd-dump db check`: verifies every shard's checkpoint file (`db/shard-NNN.db`) page by
//! page (checksums, key order, page accounting: the engine's `Database::check`) and prints
//! its B+tree statistics and what its checkpoint covers; then the meta checkpoint
//! (`db/meta.ckpt`: checksum and records).

use std::io::Write;
use std::path::{Path, PathBuf};

use ferrocd_engine::btree::{self, Database};
use ferrocd_engine::checkpoint::{self, CheckpointMeta};
use ferrocd_engine::meta_checkpoint;

use crate::datadir::read_member_conf;

/// The verdict on one shard's file.
pub enum FileCheck {
    Missing,
    Clean {
        stats: btree::Stats,
        meta: CheckpointMeta,
    },
    Damaged(String),
}

/// The shards' checkpoint file paths of a data dir, in shard order.
fn shard_files(data_dir: &Path) -> Result<Vec<PathBuf>, String> {
    let conf = read_member_conf(data_dir)?
        .ok_or_else(|| format!("{} has no member.conf", data_dir.display()))?;
    Ok((0..conf.shards)
        .map(|shard| data_dir.join("db").join(format!("shard-{shard:03}.db")))
        .collect())
}

/// Checks one file: pages, then the checkpoint record on top of them.
pub fn check_file(path: &Path) -> FileCheck {
    if !path.exists() {
        return FileCheck::Missing;
    }
    let checked = Database::open_read_only(path).and_then(|db| {
        db.check()?;
        Ok((db.stats()?, db))
    });
    let (stats, db) = match checked {
        Ok(checked) => checked,
        Err(e) => return FileCheck::Damaged(e.to_string()),
    };
    match checkpoint::load(&db.snapshot()) {
        Ok(loaded) => FileCheck::Clean {
            stats,
            meta: loaded.meta,
        },
        Err(e) => FileCheck::Damaged(e.to_string()),
    }
}

/// Prints one line per shard; returns whether every file was clean (or absent).
pub fn check_data_dir(data_dir: &Path, out: &mut dyn Write) -> Result<bool, String> {
    let mut clean = true;
    for (shard, path) in shard_files(data_dir)?.iter().enumerate() {
        let line = match check_file(path) {
            FileCheck::Missing => format!("shard {shard}: no checkpoint file"),
            FileCheck::Clean { stats, meta } => format!(
                "shard {shard}: ok pages {} free {} depth {} entries {} size {} txid {} \
                 covered revision {} wal index {}",
                stats.page_count,
                stats.free_pages,
                stats.depth,
                stats.entries,
                stats.file_size_bytes,
                stats.txid,
                meta.covered_revision,
                meta.wal_index
            ),
            FileCheck::Damaged(reason) => {
                clean = false;
                format!("shard {shard}: DAMAGED {}: {reason}", path.display())
            }
        };
        writeln!(out, "{line}").map_err(|e| format!("writing output: {e}"))?;
    }
    let meta_path = meta_checkpoint::path_in(&data_dir.join("db"));
    let line = match meta_checkpoint::read(&meta_path) {
        Ok(None) => "meta: no checkpoint file".to_string(),
        Ok(Some(checkpoint)) => format!(
            "meta: ok records {} wal index {}",
            checkpoint.records.len(),
            checkpoint.wal_index
        ),
        Err(e) => {
            clean = false;
            format!("meta: DAMAGED {e}")
        }
    };
    writeln!(out, "{line}").map_err(|e| format!("writing output: {e}"))?;
    Ok(clean)
}
