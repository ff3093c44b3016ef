//! The bodies of the fuzz targets: each takes arbitrary bytes, must never panic, hang or
//! allocate without bound on them, and turns bad input into errors. `fuzz_targets/*.rs` hand
//! them to libFuzzer; `tests/fuzz_regressions.rs` (main workspace) replays the committed
//! inputs under `fuzz/regressions/<target>/` through them with a plain `cargo test`.

use std::fs;
use std::ops::Bound;
use std::path::Path;
use std::sync::OnceLock;

use ferrocd_api::etcdserverpb::{DeleteRangeRequest, PutRequest, RangeRequest, TxnRequest};
use ferrocd_engine::btree::{Database, PAGE_SIZE};
use ferrocd_engine::mvcc::codec;
use ferrocd_engine::wal::{self, Record, RecordKind, WalReader};
use ferrocd_net::node::apply;

/// Segments a WAL input is split into, at most.
const MAX_WAL_SEGMENTS: usize = 3;
/// Items read from a WalReader, at most (each consumes input, so this is only a backstop).
const MAX_WAL_ITEMS: usize = 100_000;
/// B+tree entries scanned, at most.
const MAX_BTREE_ENTRIES: usize = 100_000;
/// Bytes one patch of the B+tree base file writes, at most.
const MAX_PATCH_BYTES: usize = 32;
/// etcd's default `--max-txn-ops`.
const MAX_TXN_OPS: usize = 128;

/// WAL recovery and the streaming reader on a directory of segments made from `data`.
///
/// The first byte chooses the layout: bit 0 set builds segments from records encoded from
/// the input (so that valid records are common) and then corrupts one byte and cuts the
/// tail where the input says; clear, the rest of the input is raw segment bytes. Bits 1-2
/// give the number of segments (1-3) and bit 3 leaves a gap in their sequence numbers.
pub fn wal_reader(data: &[u8]) {
    let Some((&layout, rest)) = data.split_first() else {
        return;
    };
    let bytes = if layout & 1 == 1 {
        encoded_wal(rest)
    } else {
        rest.to_vec()
    };
    let segments = (usize::from(layout >> 1) & 3).clamp(1, MAX_WAL_SEGMENTS);
    let gap = u64::from(layout >> 3 & 1);
    let dir = scratch_dir();
    let chunk = bytes.len().div_ceil(segments).max(1);
    for (seq, part) in bytes.chunks(chunk).enumerate() {
        let seq = seq as u64 + if seq > 0 { gap } else { 0 };
        let name = wal::segment_file_name(seq, seq * 10);
        fs::write(dir.path().join(name), part).expect("write segment");
    }
    read_wal(dir.path());
}

/// A temp dir in memory where the machine has one: file I/O dominates these targets.
fn scratch_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(dir) = tempfile::tempdir_in(shm) {
            return dir;
        }
    }
    tempfile::tempdir().expect("temp dir")
}

fn read_wal(dir: &Path) {
    let recovered = wal::read_dir(dir);
    if let Ok(recovered) = &recovered {
        for record in &recovered.records {
            // Every record handed to recovery was framed as it is now.
            let framed = wal::encode(record);
            assert_eq!(framed.len(), wal::encoded_len(record.data.len()));
        }
    }
    let reader = WalReader::open(dir).expect("list segments");
    for item in reader.take(MAX_WAL_ITEMS) {
        if item.is_err() {
            break;
        }
    }
}

/// Records from `input` (kind, term, index and data length of one byte each, then the
/// data), framed, then the byte at the position named by the last two bytes xored with the
/// third last, and the tail cut at the position named by the fourth and fifth last.
fn encoded_wal(input: &[u8]) -> Vec<u8> {
    let (body, tail) = input.split_at(input.len().saturating_sub(5));
    let mut out = Vec::new();
    let mut rest = body;
    while let [kind, term, index, len, more @ ..] = rest {
        let len = usize::from(*len).min(more.len());
        let kind = if kind & 1 == 0 {
            RecordKind::Entry
        } else {
            RecordKind::HardState
        };
        let record = Record {
            kind,
            term: u64::from(*term),
            index: u64::from(*index),
            data: more[..len].to_vec(),
        };
        out.extend_from_slice(&wal::encode(&record));
        rest = &more[len..];
    }
    if let [cut_hi, cut_lo, flip, at_hi, at_lo] = *tail {
        if !out.is_empty() {
            let at = usize::from(u16::from_be_bytes([at_hi, at_lo])) % out.len();
            out[at] ^= flip;
            let cut = usize::from(u16::from_be_bytes([cut_hi, cut_lo]));
            if cut < out.len() {
                out.truncate(out.len() - cut);
            }
        }
    }
    out
}

/// The MVCC log payload decoder: errors, never panics; whatever it accepts encodes back to
/// bytes that decode to the same payload.
pub fn mvcc_payload(data: &[u8]) {
    if let Ok(payload) = codec::decode(data) {
        let encoded = codec::encode(&payload);
        assert_eq!(
            codec::decode(&encoded).as_ref(),
            Ok(&payload),
            "re-encoded payload decodes differently"
        );
    }
}

/// The B+tree file on open, check, stats and reads, from a valid base file with patches.
///
/// The first byte: bit 0 reseals every patched page (recomputes its checksum, so that the
/// decoders behind the checksum are reached), bit 1 cuts the file to a whole number of pages
/// given by the second byte. Then patches: page (modulo the file's pages), offset (two
/// bytes, modulo the page size), length (at most 32), bytes. When the result passes
/// `check`, a write transaction must work on it too.
pub fn btree_file(data: &[u8]) {
    let Some((&flags, mut rest)) = data.split_first() else {
        return;
    };
    let mut file = base_btree_file().to_vec();
    let pages = file.len() / PAGE_SIZE;
    if flags & 2 != 0 {
        let Some((&keep, more)) = rest.split_first() else {
            return;
        };
        file.truncate(usize::from(keep) % (pages + 1) * PAGE_SIZE);
        rest = more;
    }
    let mut patched_pages = Vec::new();
    while let [page, off_hi, off_lo, len, more @ ..] = rest {
        let len = usize::from(*len).min(MAX_PATCH_BYTES).min(more.len());
        let page = usize::from(*page) % pages.max(1);
        let offset = usize::from(u16::from_be_bytes([*off_hi, *off_lo])) % PAGE_SIZE;
        let start = page * PAGE_SIZE + offset;
        let end = (start + len).min((page + 1) * PAGE_SIZE).min(file.len());
        if start < end {
            file[start..end].copy_from_slice(&more[..end - start]);
            patched_pages.push(page);
        }
        rest = &more[len..];
    }
    if flags & 1 != 0 {
        for &page in &patched_pages {
            reseal(&mut file, page);
        }
    }
    let dir = scratch_dir();
    let path = dir.path().join("tree");
    fs::write(&path, &file).expect("write tree file");
    exercise_btree(&path);
}

fn exercise_btree(path: &Path) {
    let Ok(db) = Database::open(path) else {
        return;
    };
    let checked = db.check();
    let _ = db.stats();
    let snapshot = db.snapshot();
    for entry in snapshot.iter().take(MAX_BTREE_ENTRIES) {
        if entry.is_err() {
            break;
        }
    }
    for entry in snapshot.iter().rev().take(MAX_BTREE_ENTRIES) {
        if entry.is_err() {
            break;
        }
    }
    let lower = Bound::Included(b"key-0100".as_slice());
    for entry in snapshot.range(lower, Bound::Unbounded).take(16) {
        if entry.is_err() {
            break;
        }
    }
    let _ = snapshot.get(b"key-0042");
    drop(snapshot);
    if checked.is_err() {
        return;
    }
    // A file that passes the check is a valid tree: writing to it must work.
    let mut txn = db.begin_write().expect("begin a write on a checked tree");
    txn.insert(b"key-fuzz", b"value")
        .expect("insert into a checked tree");
    txn.remove(b"key-0001").expect("remove from a checked tree");
    txn.commit().expect("commit to a checked tree");
    db.check()
        .expect("a checked tree stays valid after a write");
}

/// A small valid tree: a few hundred entries over several levels, an overflow value, and a
/// free list from a second commit that deletes some of them. Built once per process.
fn base_btree_file() -> &'static [u8] {
    static BASE: OnceLock<Vec<u8>> = OnceLock::new();
    BASE.get_or_init(|| {
        let dir = scratch_dir();
        let path = dir.path().join("tree");
        let db = Database::open(&path).expect("create tree");
        let mut txn = db.begin_write().expect("begin");
        for n in 0..300u32 {
            let key = format!("key-{n:04}");
            let value = vec![b'v'; (n as usize * 7) % 200];
            txn.insert(key.as_bytes(), &value).expect("insert");
        }
        txn.insert(b"key-large", &vec![b'L'; 3 * PAGE_SIZE])
            .expect("insert large");
        txn.commit().expect("commit");
        let mut txn = db.begin_write().expect("begin");
        for n in (0..300u32).step_by(3) {
            txn.remove(format!("key-{n:04}").as_bytes())
                .expect("remove");
        }
        txn.commit().expect("commit");
        drop(db);
        fs::read(&path).expect("read tree file")
    })
}

/// Recomputes a page's checksum as the B+tree does: crc32 of the page id (u64, little
/// endian) and every byte after the checksum field.
fn reseal(file: &mut [u8], page: usize) {
    let start = page * PAGE_SIZE;
    let Some(bytes) = file.get_mut(start..start + PAGE_SIZE) else {
        return;
    };
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&(page as u64).to_le_bytes());
    hasher.update(&bytes[4..]);
    let sum = hasher.finalize();
    bytes[..4].copy_from_slice(&sum.to_le_bytes());
}

/// Client requests as the server receives them, through the checks done before evaluation
/// (net/src/node/apply.rs). The first byte picks the type (Range, Put, DeleteRange, Txn) and
/// the decoding: protobuf as on the gRPC port, or JSON as on the HTTP gateway.
pub fn kv_requests(data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let json = selector & 4 != 0;
    match selector & 3 {
        0 => {
            if let Some(range) = decode::<RangeRequest>(body, json) {
                let _ = apply::check_range(&range);
                let _ = apply::fetch_limit(&range);
                let _ = apply::is_range(&range.range_end);
                let _ = apply::in_range(&range.key, &range.key, &range.range_end);
            }
        }
        1 => {
            if let Some(put) = decode::<PutRequest>(body, json) {
                if apply::check_put(&put).is_ok() {
                    check_txn(&apply::put_as_txn(put));
                }
            }
        }
        2 => {
            if let Some(delete) = decode::<DeleteRangeRequest>(body, json) {
                if apply::check_delete(&delete).is_ok() {
                    check_txn(&apply::delete_as_txn(delete));
                }
            }
        }
        _ => {
            if let Some(txn) = decode::<TxnRequest>(body, json) {
                check_txn(&txn);
            }
        }
    }
}

fn check_txn(txn: &TxnRequest) {
    let _ = apply::check_txn(txn, MAX_TXN_OPS);
    let mut spans = Vec::new();
    apply::txn_spans(txn, &mut spans);
    let _ = apply::txn_may_write(txn);
    let mut reads = Vec::new();
    apply::txn_historical_ranges(txn, &mut reads);
}

fn decode<M: prost::Message + Default + serde::de::DeserializeOwned>(
    body: &[u8],
    json: bool,
) -> Option<M> {
    if json {
        serde_json::from_slice(body).ok()
    } else {
        M::decode(body).ok()
    }
}
