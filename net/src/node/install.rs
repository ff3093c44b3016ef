//! Snapshot install for a lagging member (issue 5): a member whose next meta log entries the
//! leader compacted away gets the leader's whole state instead of the entries.
//!
//! # What is sent
//!
//! raft-rs's snapshot message carries only a point (index `S`, term, membership). The state
//! behind it travels over the peer port as request/response calls (`PeerCore::call`):
//!
//! 1. The follower calls a member "prepare" (every voter in turn until the serving leader
//!    answers). The leader's meta group captures, between two of its operations, its last
//!    applied meta index `I >= S` (the leader compacts only below what it applied), the term of
//!    `I` and the membership, the meta checkpoint at `I` (leases with their checkpointed TTLs,
//!    auth, compaction, alarms, published member attributes: `MetaState::checkpoint`) and the
//!    visible revision `R`. Every entry up to `I` is applied and visible between two of its
//!    operations (a write is answered once its revision is visible), and no entry above `I` is
//!    applied, so the KV history at `R` is exactly the one entries up to `I` make. The leader
//!    writes the `Maintenance.Snapshot` stream at `R` (`snapshot.rs`, file format
//!    `ferrocd_engine::snapshot`, which carries its own checksum) with the meta checkpoint's
//!    records as its meta records to `<data-dir>/snap/<id>.snap`, and answers the file's id,
//!    size and SHA-256 with `I`, its term, the membership (Raft's and the member table at
//!    `I`) and the auth revision.
//! 2. The follower pulls the file by offset, `CHUNK_BYTES` per call (one chunk held at a time),
//!    into a staging directory and refuses it unless size and SHA-256 match the offer.
//! 3. It builds a complete data dir in the staging directory `<data-dir>.install` (a sibling:
//!    same file system, so the swap below is a rename): its own `member.conf` (cluster id,
//!    member id and the initial membership stay), the member table at `I` as
//!    `members.current`, each shard's checkpoint at `R` (`restore::write_shards`,
//!    the code `ferrocd snapshot restore` uses), the meta checkpoint at `I`, and a meta WAL
//!    that starts after `(I, term, membership)` with the hard state `{term, vote, commit: I}`
//!    (term and vote as this member last knew them, at least `I`'s term: a member never votes
//!    twice in a term). Everything is fsynced, then the marker file `install-complete` is
//!    written and fsynced with its directory.
//! 4. It restarts: re-executes its own binary with the same arguments (`exec`: same process
//!    id, every thread gone). This first version restarts the whole process rather than
//!    swapping the state of a running node. At start-up (`finish_pending`, before anything
//!    opens the data dir) a staging directory with the marker is swapped with the data dir in
//!    one `renameat2(RENAME_EXCHANGE)`, the parent directory fsynced, and the old state (now
//!    under the staging name) deleted. Recovery then runs as after any restart: the meta log
//!    starts at `I`, the leader sends the entries after it.
//!
//! While it installs, the member is silent: its driver neither steps, ticks nor writes its
//! Raft log (raft-rs has already replaced the in-memory log by the snapshot point, which must
//! never reach the WAL without the state behind it), so the old data dir stays as it was.
//!
//! # Crash safety
//!
//! The data dir is only ever replaced whole, by one atomic exchange of two directory entries,
//! and only with a staging directory whose marker is durable, which is written after every
//! file under it is durable. A crash before the marker leaves the old data dir, and start-up
//! deletes the incomplete staging directory (the member catches up or asks for a snapshot
//! again). A crash after the marker and before the exchange: start-up performs the exchange.
//! After the exchange the new data dir holds the marker and the staging name holds the old
//! data dir without it: start-up deletes the staging directory, then the marker. So every
//! start-up sees either the old data dir or the complete new one, and converges.
//!
//! # Leader files
//!
//! A transfer file is deleted once its last chunk is served, and each prepare deletes files
//! beyond the `MAX_KEPT_TRANSFERS` newest and those older than `MAX_TRANSFER_AGE` (a follower
//! that went away mid-transfer).

use super::meta::MetaMsg;
use super::snapshot::{stream, SnapshotStart};
use super::{recovery, restore, Shared};
use crate::members::{self, MemberEntry};
use crate::peer::PeerCore;
use ferrocd_engine::meta_checkpoint::{self, MetaCheckpoint};
use ferrocd_raft::storage::{ConfState, HardState, SnapshotMeta};
use ferrocd_raft::wal_store::fresh_log_records;
use futures::channel::oneshot;
use ring::digest::{Context, SHA256};
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Snapshot bytes in one chunk answer: well under the peer frame limit, and what a follower
/// buffers of the transfer at any time.
pub const CHUNK_BYTES: usize = 1 << 20;
/// Transfer files a leader keeps when a new one is prepared.
const MAX_KEPT_TRANSFERS: usize = 2;
/// A transfer file older than this is deleted when a new one is prepared.
const MAX_TRANSFER_AGE: Duration = Duration::from_secs(600);
/// How long a prepare may take: the leader writes its whole state to a file.
const PREPARE_TIMEOUT_MS: u64 = 120_000;
const CHUNK_TIMEOUT_MS: u64 = 10_000;
/// Whole transfers tried before the member gives up (and stops, naming the cause).
const MAX_ATTEMPTS: u32 = 20;
const RETRY_DELAY_MS: u64 = 500;

const TRANSFER_DIR: &str = "snap";
const STAGING_SUFFIX: &str = ".install";
const COMPLETE_MARKER: &str = "install-complete";
const DOWNLOAD_FILE: &str = "transfer.snap";

/// Call tags (the first payload byte), apart from `forward.rs`'s.
const TAG_PREPARE: u8 = 0xC0;
const TAG_CHUNK: u8 = 0xC1;
const ANSWER_OK: u8 = 0;
const ANSWER_ERR: u8 = 1;

/// The meta log point a snapshot stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogPoint {
    pub index: u64,
    pub term: u64,
    pub conf: ConfState,
    /// The meta checkpoint's auth revision.
    pub auth_revision: u64,
    /// The member table at `index` (ids, peer URLs, learner flags; names and client URLs are
    /// in the meta records): the installed data dir's `members.current`, since the changes up
    /// to `index` are not in its log.
    pub members: Vec<MemberEntry>,
}

/// What the leader's meta group captures (see the module doc).
pub struct Captured {
    pub start: SnapshotStart,
    pub point: LogPoint,
}

/// Runs in the meta group between two operations: `checkpoint` is its state at its last
/// applied index, of term `term` under membership `conf`.
pub fn capture(
    shared: &Shared,
    checkpoint: MetaCheckpoint,
    term: u64,
    conf: ConfState,
) -> Captured {
    let point = LogPoint {
        index: checkpoint.wal_index,
        term,
        conf,
        auth_revision: checkpoint.auth_revision,
        // The meta group applies membership changes in log order: between two of its
        // operations the table is the one at its last applied index.
        members: shared.members.list(),
    };
    let start = SnapshotStart {
        revision: shared.seq.visible(),
        compacted: shared.compacted(),
        meta_records: checkpoint.records,
    };
    Captured { start, point }
}

/// A prepared transfer, as the leader offers it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Offer {
    pub id: u64,
    pub size_bytes: u64,
    pub sha256: [u8; 32],
    pub point: LogPoint,
}

impl Offer {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for n in [self.id, self.size_bytes] {
            out.extend_from_slice(&n.to_le_bytes());
        }
        out.extend_from_slice(&self.sha256);
        let p = &self.point;
        for n in [p.index, p.term, p.auth_revision] {
            out.extend_from_slice(&n.to_le_bytes());
        }
        for ids in [&p.conf.voters, &p.conf.learners] {
            out.extend_from_slice(&(ids.len() as u64).to_le_bytes());
            ids.iter()
                .for_each(|id| out.extend_from_slice(&id.to_le_bytes()));
        }
        out.extend_from_slice(&(p.members.len() as u64).to_le_bytes());
        for member in &p.members {
            let record = members::encode_record(member);
            out.extend_from_slice(&(record.len() as u64).to_le_bytes());
            out.extend_from_slice(&record);
        }
        out
    }

    /// `None` for bytes that are not an offer of this version.
    fn decode(bytes: &[u8]) -> Option<Offer> {
        let mut r = OfferReader(bytes);
        let (id, size_bytes) = (r.u64()?, r.u64()?);
        let mut sha256 = [0; 32];
        sha256.copy_from_slice(r.take(32)?);
        let (index, term, auth_revision) = (r.u64()?, r.u64()?, r.u64()?);
        let conf = ConfState {
            voters: r.ids()?,
            learners: r.ids()?,
        };
        let mut members = Vec::new();
        for _ in 0..r.u64()? {
            let size_bytes = usize::try_from(r.u64()?).ok()?;
            members.push(members::decode_record(r.take(size_bytes)?).ok()?);
        }
        let bytes = r.0;
        bytes.is_empty().then_some(Offer {
            id,
            size_bytes,
            sha256,
            point: LogPoint {
                index,
                term,
                conf,
                auth_revision,
                members,
            },
        })
    }
}

// ---- leader side ----

/// The leader's transfer files, in `<data-dir>/snap`.
#[derive(Clone, Debug)]
pub struct Transfers {
    dir: PathBuf,
}

impl Transfers {
    pub fn new(data_dir: &Path) -> Transfers {
        Transfers {
            dir: data_dir.join(TRANSFER_DIR),
        }
    }

    fn file(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:016x}.snap"))
    }

    /// Deletes files beyond the newest `MAX_KEPT_TRANSFERS - 1` (a new one comes) and those
    /// older than `MAX_TRANSFER_AGE`.
    fn collect_garbage(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        let mut files: Vec<(SystemTime, PathBuf)> = entries
            .filter_map(|e| {
                let e = e.ok()?;
                Some((e.metadata().ok()?.modified().ok()?, e.path()))
            })
            .collect();
        files.sort_by_key(|(modified, _)| std::cmp::Reverse(*modified));
        let now = SystemTime::now();
        for (n, (modified, path)) in files.into_iter().enumerate() {
            let old = now.duration_since(modified).unwrap_or_default() > MAX_TRANSFER_AGE;
            if old || n + 1 >= MAX_KEPT_TRANSFERS {
                let _ = fs::remove_file(path);
            }
        }
    }
}

/// Whether a peer call is one of this module's (else `forward.rs`'s).
pub fn is_install_call(payload: &[u8]) -> bool {
    matches!(payload.first(), Some(&TAG_PREPARE) | Some(&TAG_CHUNK))
}

/// Serves a prepare or chunk call; the answer bytes.
pub async fn serve(shared: &Arc<Shared>, transfers: &Transfers, payload: &[u8]) -> Vec<u8> {
    let result = match payload.split_first() {
        Some((&TAG_PREPARE, [])) => prepare(shared, transfers).await.map(|o| o.encode()),
        Some((&TAG_CHUNK, body)) => chunk(transfers, body),
        _ => Err("malformed snapshot transfer call".to_string()),
    };
    encode_answer(result)
}

/// `ANSWER_OK` and the body, or `ANSWER_ERR` and the error's text.
fn encode_answer(result: Result<Vec<u8>, String>) -> Vec<u8> {
    match result {
        Ok(mut body) => {
            body.insert(0, ANSWER_OK);
            body
        }
        Err(e) => {
            let mut out = vec![ANSWER_ERR];
            out.extend_from_slice(e.as_bytes());
            out
        }
    }
}

async fn prepare(shared: &Arc<Shared>, transfers: &Transfers) -> Result<Offer, String> {
    transfers.collect_garbage();
    let (reply, captured) = oneshot::channel();
    let msg = MetaMsg::InstallSnapshot { reply };
    let stopped = |_| "the meta group stopped".to_string();
    shared
        .meta
        .send(msg)
        .await
        .map_err(|_| "the meta group stopped")?;
    let captured = captured
        .await
        .map_err(stopped)?
        .ok_or("not the serving leader of the meta group")?;
    fs::create_dir_all(&transfers.dir).map_err(|e| format!("{}: {e}", transfers.dir.display()))?;
    let id = rand::random::<u64>();
    let path = transfers.file(id);
    let fail = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let tmp = path.with_extension("tmp");
    // Blocking writes on the executor: a first version; the stream bounds what is buffered.
    let mut file = std::io::BufWriter::new(File::create(&tmp).map_err(|e| fail(&e))?);
    let mut hash = Context::new(&SHA256);
    let mut size_bytes = 0;
    let messages = stream(shared.clone(), captured.start);
    while let Ok(message) = messages.recv().await {
        let message = message.map_err(|e| format!("snapshot: {e}"))?;
        hash.update(&message.blob);
        file.write_all(&message.blob).map_err(|e| fail(&e))?;
        size_bytes += message.blob.len() as u64;
    }
    file.flush().map_err(|e| fail(&e))?;
    drop(file);
    fs::rename(&tmp, &path).map_err(|e| fail(&e))?;
    let sha256 = hash.finish().as_ref().try_into().expect("32 bytes");
    crate::info!(
        "prepared a snapshot for a lagging member",
        file = path.display().to_string(),
        size_bytes = size_bytes,
        index = captured.point.index
    );
    Ok(Offer {
        id,
        size_bytes,
        sha256,
        point: captured.point,
    })
}

/// At most `CHUNK_BYTES` of transfer `id` from `offset`; the file goes once its end is served.
fn chunk(transfers: &Transfers, body: &[u8]) -> Result<Vec<u8>, String> {
    let (id, offset) = parse_chunk_request(body).ok_or("malformed chunk request")?;
    let path = transfers.file(id);
    let fail = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let mut file = File::open(&path).map_err(|e| fail(&e))?;
    let size = file.metadata().map_err(|e| fail(&e))?.len();
    if offset > size {
        return Err(format!("offset {offset} past the end {size}"));
    }
    file.seek(SeekFrom::Start(offset)).map_err(|e| fail(&e))?;
    let mut out = Vec::with_capacity(CHUNK_BYTES.min((size - offset) as usize));
    file.take(CHUNK_BYTES as u64)
        .read_to_end(&mut out)
        .map_err(|e| fail(&e))?;
    if offset + out.len() as u64 == size {
        let _ = fs::remove_file(&path);
    }
    Ok(out)
}

fn chunk_request(id: u64, offset: u64) -> Vec<u8> {
    let mut out = vec![TAG_CHUNK];
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
    out
}

fn parse_chunk_request(body: &[u8]) -> Option<(u64, u64)> {
    let body: [u8; 16] = body.try_into().ok()?;
    let (id, offset) = body.split_at(8);
    Some((
        u64::from_le_bytes(id.try_into().ok()?),
        u64::from_le_bytes(offset.try_into().ok()?),
    ))
}

// ---- follower side ----

/// What a member needs to install a snapshot.
pub struct Installer {
    pub peer: PeerCore,
    pub data_dir: PathBuf,
    pub shards: usize,
    pub member_id: u64,
    /// The Raft term and vote this member holds (carried into the new log).
    pub term: u64,
    pub vote: u64,
}

impl Installer {
    /// Fetches a snapshot at or above `point` from the serving leader (asking each voter of
    /// `point`'s membership in turn), builds the new data dir and restarts into it. Returns
    /// only if every attempt failed, with the last error.
    pub async fn run(self, point: SnapshotMeta) -> String {
        let others: Vec<u64> = point
            .conf
            .voters
            .iter()
            .copied()
            .filter(|&id| id != self.member_id)
            .collect();
        assert!(!others.is_empty(), "a snapshot comes from another member");
        let mut last_error = String::new();
        for attempt in 0..MAX_ATTEMPTS {
            let from = others[attempt as usize % others.len()];
            match self.fetch_and_build(from, point.index).await {
                Ok(()) => restart(),
                Err(e) => {
                    crate::warn!(
                        "snapshot install attempt failed",
                        from = format!("{from:x}"),
                        error = e.as_str()
                    );
                    last_error = e;
                }
            }
            glommio::timer::sleep(Duration::from_millis(RETRY_DELAY_MS)).await;
        }
        last_error
    }

    async fn fetch_and_build(&self, from: u64, at_least: u64) -> Result<(), String> {
        let answer = self
            .call(from, vec![TAG_PREPARE], PREPARE_TIMEOUT_MS)
            .await?;
        let offer = Offer::decode(&answer).ok_or("undecodable offer")?;
        if offer.point.index < at_least {
            return Err(format!(
                "offered index {} below the snapshot's {at_least}",
                offer.point.index
            ));
        }
        let staging = staging_dir(&self.data_dir);
        remove_dir_if_present(&staging)?;
        fs::create_dir_all(&staging).map_err(|e| format!("{}: {e}", staging.display()))?;
        let download = staging.join(DOWNLOAD_FILE);
        let file = File::create(&download).map_err(|e| format!("{}: {e}", download.display()))?;
        self.download(from, &offer, file).await?;
        let hard_state = HardState {
            term: self.term.max(offer.point.term),
            vote: if self.term >= offer.point.term {
                self.vote
            } else {
                0
            },
            commit: offer.point.index,
        };
        let build = Build {
            snapshot: download,
            staging,
            data_dir: self.data_dir.clone(),
            shards: self.shards,
            point: offer.point.clone(),
            hard_state,
        };
        // Blocking file work off the executor.
        let (done, built) = oneshot::channel();
        std::thread::spawn(move || {
            let _ = done.send(build.run());
        });
        built
            .await
            .map_err(|_| "the build thread died".to_string())??;
        crate::info!(
            "installed a snapshot; restarting into it",
            index = offer.point.index,
            term = offer.point.term
        );
        Ok(())
    }

    /// Pulls the offer's file into `file`, one chunk at a time, and checks size and SHA-256.
    async fn download(&self, from: u64, offer: &Offer, mut file: File) -> Result<(), String> {
        let mut hash = Context::new(&SHA256);
        let mut offset = 0;
        while offset < offer.size_bytes {
            let request = chunk_request(offer.id, offset);
            let bytes = self.call(from, request, CHUNK_TIMEOUT_MS).await?;
            check_chunk(bytes.len(), offset, offer.size_bytes)?;
            hash.update(&bytes);
            file.write_all(&bytes)
                .map_err(|e| format!("download: {e}"))?;
            offset += bytes.len() as u64;
        }
        verify_download(offer, hash.finish().as_ref())?;
        file.sync_all().map_err(|e| format!("download: {e}"))
    }

    /// One call; the answer's body, or the error it carries.
    async fn call(&self, to: u64, payload: Vec<u8>, timeout_ms: u64) -> Result<Vec<u8>, String> {
        let answer = self
            .peer
            .call(to, payload, timeout_ms)
            .await
            .map_err(|e| e.to_string())?;
        match answer.split_first() {
            Some((&ANSWER_OK, body)) => Ok(body.to_vec()),
            Some((&ANSWER_ERR, message)) => Err(String::from_utf8_lossy(message).into_owned()),
            _ => Err("undecodable answer".to_string()),
        }
    }
}

/// A chunk is never empty before the end, never over `CHUNK_BYTES`, never past the size.
fn check_chunk(len: usize, offset: u64, size_bytes: u64) -> Result<(), String> {
    if len == 0 || len > CHUNK_BYTES || offset + len as u64 > size_bytes {
        return Err(format!(
            "a chunk of {len} bytes at {offset} of a {size_bytes}-byte snapshot"
        ));
    }
    Ok(())
}

fn verify_download(offer: &Offer, sha256: &[u8]) -> Result<(), String> {
    if sha256 != offer.sha256 {
        return Err("snapshot checksum mismatch: the download is refused".to_string());
    }
    Ok(())
}

/// Builds a complete data dir in the staging directory (see the module doc, step 3).
struct Build {
    snapshot: PathBuf,
    staging: PathBuf,
    data_dir: PathBuf,
    shards: usize,
    point: LogPoint,
    hard_state: HardState,
}

impl Build {
    fn run(self) -> Result<(), String> {
        let (status, per_shard, meta_records) =
            restore::read_snapshot(&self.snapshot, self.shards)?;
        let staging = &self.staging;
        restore::write_shards(staging, status, per_shard)?;
        let checkpoint = MetaCheckpoint {
            wal_index: self.point.index,
            auth_revision: self.point.auth_revision,
            records: meta_records,
        };
        let checkpoint_path = recovery::meta_checkpoint_path(staging);
        meta_checkpoint::write(&checkpoint_path, &checkpoint)
            .map_err(|e| format!("{}: {e}", checkpoint_path.display()))?;
        let base = SnapshotMeta {
            index: self.point.index,
            term: self.point.term,
            conf: self.point.conf.clone(),
        };
        let wal_dir = recovery::meta_wal_dir(staging);
        fs::create_dir_all(&wal_dir).map_err(|e| format!("{}: {e}", wal_dir.display()))?;
        restore::write_wal(&wal_dir, fresh_log_records(&base, self.hard_state).to_vec())?;
        copy_synced(
            &recovery::conf_path(&self.data_dir),
            &recovery::conf_path(staging),
        )?;
        // Written synced (temporary file, rename, directory fsync).
        // A snapshot does not carry the removed ids: keep those this member knows (a member
        // removed between its last applied change and the snapshot is forgotten).
        let saved = members::load_current(&self.data_dir)?;
        let removed = saved.map(|saved| saved.removed).unwrap_or_default();
        members::save_current(staging, self.point.index, &self.point.members, &removed)
            .map_err(|e| format!("{}: members: {e}", staging.display()))?;
        fs::remove_file(&self.snapshot).map_err(|e| format!("{}: {e}", self.snapshot.display()))?;
        for dir in [
            wal_dir.as_path(),
            wal_dir.parent().expect("wal/"),
            staging.as_path(),
        ] {
            sync_dir(dir)?;
        }
        let marker = staging.join(COMPLETE_MARKER);
        File::create(&marker)
            .and_then(|f| f.sync_all())
            .map_err(|e| format!("{}: {e}", marker.display()))?;
        sync_dir(staging)
    }
}

fn copy_synced(from: &Path, to: &Path) -> Result<(), String> {
    let fail = |e: std::io::Error| format!("copying {} to {}: {e}", from.display(), to.display());
    fs::copy(from, to).map_err(fail)?;
    File::open(to).and_then(|f| f.sync_all()).map_err(fail)
}

fn sync_dir(dir: &Path) -> Result<(), String> {
    recovery::sync_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))
}

fn remove_dir_if_present(dir: &Path) -> Result<(), String> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(format!("{}: {e}", dir.display()))
        }
        _ => Ok(()),
    }
}

fn staging_dir(data_dir: &Path) -> PathBuf {
    let mut name = data_dir.as_os_str().to_owned();
    name.push(STAGING_SUFFIX);
    PathBuf::from(name)
}

/// Re-executes this binary with its arguments (same process id); never returns.
fn restart() -> ! {
    use std::os::unix::process::CommandExt;
    // Nothing open here may outlive the exec (listening sockets, io_uring rings, files).
    if let Ok(fds) = fs::read_dir("/proc/self/fd") {
        let fds: Vec<i32> = fds
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        for fd in fds.into_iter().filter(|&fd| fd > 2) {
            // SAFETY: setting a descriptor flag; an fd closed meanwhile just fails.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
    }
    let error = match std::env::current_exe() {
        Ok(exe) => std::process::Command::new(exe)
            .args(std::env::args_os().skip(1))
            .exec(),
        Err(e) => e,
    };
    super::shard::fatal(&format!(
        "cannot restart after installing a snapshot: {error}"
    ))
}

/// At start-up, before the data dir is opened: completes or discards an install (see the
/// module doc, crash safety). `data_dir` is absolute and exists.
pub fn finish_pending(data_dir: &Path) -> Result<(), String> {
    let staging = staging_dir(data_dir);
    if staging.join(COMPLETE_MARKER).exists() {
        exchange(data_dir, &staging)?;
        let parent = data_dir.parent().ok_or("the data dir has no parent")?;
        sync_dir(parent)?;
        crate::info!(
            "switched to an installed snapshot",
            data_dir = data_dir.display().to_string()
        );
    }
    // The old data dir after an exchange, or an incomplete install.
    remove_dir_if_present(&staging)?;
    let marker = data_dir.join(COMPLETE_MARKER);
    if marker.exists() {
        fs::remove_file(&marker).map_err(|e| format!("{}: {e}", marker.display()))?;
        sync_dir(data_dir)?;
    }
    Ok(())
}

/// Swaps two directory entries atomically.
fn exchange(a: &Path, b: &Path) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).expect("no NUL in a path");
    let (ca, cb) = (c(a), c(b));
    // SAFETY: two valid NUL-terminated paths, relative to the working directory.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        return Err(format!(
            "exchanging {} and {}: {e}",
            a.display(),
            b.display()
        ));
    }
    Ok(())
}

/// The fields of an encoded offer, front to back; `None` past the end.
struct OfferReader<'a>(&'a [u8]);

impl<'a> OfferReader<'a> {
    fn take(&mut self, size_bytes: usize) -> Option<&'a [u8]> {
        let (taken, rest) = self.0.split_at_checked(size_bytes)?;
        self.0 = rest;
        Some(taken)
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    /// A count and that many ids (a count beyond what is left is malformed).
    fn ids(&mut self) -> Option<Vec<u64>> {
        (0..self.u64()?).map(|_| self.u64()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer() -> Offer {
        Offer {
            id: 7,
            size_bytes: 3 * CHUNK_BYTES as u64 + 5,
            sha256: [9; 32],
            point: LogPoint {
                index: 1234,
                term: 3,
                conf: ConfState {
                    voters: vec![1, 2, 3],
                    learners: vec![],
                },
                auth_revision: 4,
                members: (1..=3).map(test_member).collect(),
            },
        }
    }

    fn test_member(id: u64) -> MemberEntry {
        MemberEntry {
            id,
            name: String::new(),
            peer_urls: vec![format!("http://127.0.0.1:{}", 2380 + id)],
            client_urls: Vec::new(),
            is_learner: id == 3,
        }
    }

    #[test]
    fn offers_round_trip_and_malformed_ones_are_refused() {
        let bytes = offer().encode();
        assert_eq!(Offer::decode(&bytes), Some(offer()));
        assert_eq!(Offer::decode(&bytes[..bytes.len() - 1]), None);
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(Offer::decode(&longer), None);
        let mut huge_count = offer().encode();
        let members_at = huge_count.len()
            - offer()
                .point
                .members
                .iter()
                .map(|m| 8 + members::encode_record(m).len())
                .sum::<usize>()
            - 8;
        huge_count.truncate(members_at);
        huge_count.extend_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(Offer::decode(&huge_count), None, "a count past the bytes");
    }

    #[test]
    fn chunks_are_bounded() {
        let size = offer().size_bytes;
        assert!(check_chunk(CHUNK_BYTES, 0, size).is_ok());
        assert!(
            check_chunk(CHUNK_BYTES + 1, 0, size).is_err(),
            "over the bound"
        );
        assert!(check_chunk(0, 0, size).is_err(), "no progress");
        assert!(check_chunk(6, size - 5, size).is_err(), "past the end");
        assert!(check_chunk(5, size - 5, size).is_ok());
    }

    #[test]
    fn leader_chunks_cover_the_file_then_it_goes() {
        let dir = tempfile::tempdir().unwrap();
        let transfers = Transfers::new(dir.path());
        fs::create_dir_all(&transfers.dir).unwrap();
        let content: Vec<u8> = (0..2 * CHUNK_BYTES + 10).map(|n| n as u8).collect();
        fs::write(transfers.file(5), &content).unwrap();
        let mut got = Vec::new();
        while got.len() < content.len() {
            let body = &chunk_request(5, got.len() as u64)[1..];
            let bytes = chunk(&transfers, body).unwrap();
            assert!(!bytes.is_empty() && bytes.len() <= CHUNK_BYTES);
            got.extend_from_slice(&bytes);
        }
        assert_eq!(got, content);
        assert!(
            !transfers.file(5).exists(),
            "deleted once its end was served"
        );
        assert!(chunk(&transfers, &[0; 15]).is_err(), "malformed request");
        assert!(
            chunk(&transfers, &chunk_request(5, 0)[1..]).is_err(),
            "gone"
        );
    }

    #[test]
    fn transfer_files_are_bounded_in_count() {
        let dir = tempfile::tempdir().unwrap();
        let transfers = Transfers::new(dir.path());
        fs::create_dir_all(&transfers.dir).unwrap();
        for id in 0..5 {
            fs::write(transfers.file(id), b"x").unwrap();
        }
        transfers.collect_garbage();
        let left = fs::read_dir(&transfers.dir).unwrap().count();
        assert!(
            left < MAX_KEPT_TRANSFERS,
            "room for the new one: {left} left"
        );
    }

    /// The data dir an install builds is one recovery opens at the snapshot's point: the meta
    /// log starts after `I` with its term and membership, the meta checkpoint is at `I`, the
    /// shards are at the snapshot's revision, and the member keeps its identity.
    #[test]
    fn a_built_data_dir_recovers_at_the_snapshot_point() {
        use crate::lease::LeaseConfig;
        use crate::members::{parse_initial_cluster, ClusterState};
        use ferrocd_engine::mvcc::codec::LogPayload;
        use ferrocd_engine::mvcc::{Revision, SavedState, SavedVersion};
        use ferrocd_engine::snapshot::{Encoder, Header};

        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("data");
        let cluster = "a=http://h:1,b=http://h:2,c=http://h:3";
        let bootstrap = recovery::Bootstrap {
            name: "b".into(),
            initial_cluster: parse_initial_cluster(cluster).unwrap(),
            state: ClusterState::New,
            token: "t".into(),
            advertise_peer_urls: vec!["http://h:2".into()],
        };
        let (identity, members) = recovery::open_identity(&data, 2, &bootstrap).unwrap();
        let voters: Vec<u64> = members.iter().map(|m| m.id).collect();
        let conf = ConfState {
            voters,
            learners: vec![],
        };
        let (revision, compacted, lease) = (5, 2, 7);
        let mut file = Vec::new();
        let header = Header {
            revision,
            source_shards: 1,
        };
        let mut encoder = Encoder::new(header, &mut file);
        for main in 1..=revision {
            let change = SavedVersion {
                key: format!("k{main}").into_bytes(),
                rev: Revision { main, sub: 0 },
                state: SavedState::Put {
                    create_revision: main,
                    version: 1,
                    lease: if main == revision { lease } else { 0 },
                    value: b"v".to_vec(),
                },
            };
            encoder.change(&change, &mut file);
        }
        encoder.meta(
            &LogPayload::LeaseGrant {
                id: lease,
                ttl_s: 100,
            },
            &mut file,
        );
        encoder.meta(&LogPayload::Compact { rev: compacted }, &mut file);
        encoder.finish(compacted, &mut file);
        let staging = staging_dir(&data);
        fs::create_dir_all(&staging).unwrap();
        let snapshot = staging.join(DOWNLOAD_FILE);
        fs::write(&snapshot, &file).unwrap();
        let point = LogPoint {
            index: 40,
            term: 3,
            conf: conf.clone(),
            auth_revision: 0,
            members: conf.voters.iter().map(|&id| test_member(id)).collect(),
        };
        let hard_state = HardState {
            term: 4,
            vote: identity.member_id,
            commit: 40,
        };
        let build = Build {
            snapshot: snapshot.clone(),
            staging: staging.clone(),
            data_dir: data.clone(),
            shards: 2,
            point,
            hard_state,
        };
        build.run().unwrap();
        assert!(staging.join(COMPLETE_MARKER).exists() && !snapshot.exists());

        finish_pending(&data).unwrap();
        let reopened = recovery::open_identity(&data, 2, &bootstrap).unwrap();
        assert_eq!(reopened.0, identity, "the member keeps its identity");
        let bootstrap_point = SnapshotMeta {
            index: 1,
            term: 1,
            conf: conf.clone(),
        };
        let lease_config = LeaseConfig::default();
        let recovered = recovery::recover(&data, 2, lease_config, Some(bootstrap_point.clone()));
        let recovered = recovered.unwrap();
        assert_eq!(recovered.meta_checkpoint_index, 40);
        let table = members::load_current(&data).unwrap();
        let table = table.map(|saved| (saved.index, saved.members));
        let expected_table = conf.voters.iter().map(|&id| test_member(id)).collect();
        assert_eq!(table, Some((40, expected_table)), "the member table at I");
        assert_eq!(recovered.next_index[2], 41, "the meta log goes on after I");
        assert_eq!(recovered.current_rev, revision);
        assert_eq!(recovered.compacted_rev, compacted);
        assert!(recovered.meta_state.leases.contains_key(&lease));
        assert_eq!(recovered.leases.list(), vec![lease]);
        let records = ferrocd_engine::wal::read_dir(&recovery::meta_wal_dir(&data))
            .unwrap()
            .records;
        let (base, entries) =
            ferrocd_raft::wal_store::committed_entries(&records, bootstrap_point).unwrap();
        let expected = SnapshotMeta {
            index: 40,
            term: 3,
            conf,
        };
        assert_eq!((base, entries.len()), (expected, 0));
    }

    /// The follower's download against a leader's chunk answers over real peer connections:
    /// the file arrives whole; a wrong checksum, an answer over the chunk bound and a missing
    /// file are refused.
    #[test]
    fn chunks_travel_over_the_peer_port_and_bad_transfers_are_refused() {
        use crate::peer::{PeerConfig, PeerMesh};
        let dir = tempfile::tempdir().unwrap();
        let transfers = Transfers::new(dir.path());
        fs::create_dir_all(&transfers.dir).unwrap();
        let content: Vec<u8> = (0..2 * CHUNK_BYTES + 10).map(|n| (n % 251) as u8).collect();
        fs::write(transfers.file(5), &content).unwrap();
        fs::write(transfers.file(6), &content).unwrap();
        let sha256: [u8; 32] = ring::digest::digest(&SHA256, &content)
            .as_ref()
            .try_into()
            .unwrap();
        let offer = |id| Offer {
            id,
            size_bytes: content.len() as u64,
            sha256,
            point: offer().point,
        };
        let download = dir.path().join("download");
        let (good, bad, oversize, missing) = (offer(5), offer(6), offer(7), offer(8));
        let bad = Offer {
            sha256: [0; 32],
            ..bad
        };
        let path = download.clone();
        let outcomes = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .spawn(move || async move {
                let any = "127.0.0.1:0".parse().unwrap();
                let leader_mesh = PeerMesh::new(PeerConfig::new(1, 1, any)).unwrap();
                let member_mesh = PeerMesh::new(PeerConfig::new(2, 1, any)).unwrap();
                let leader = leader_mesh.start_core(0).unwrap();
                let member = member_mesh.start_core(0).unwrap();
                leader.add_peer(2, member_mesh.local_addr());
                member.add_peer(1, leader_mesh.local_addr());
                let calls = leader.calls().clone();
                glommio::spawn_local(async move {
                    while let Ok(call) = calls.recv().await {
                        let body = &call.payload[1..];
                        let answer = match parse_chunk_request(body) {
                            // A leader that breaks the bound.
                            Some((7, _)) => Ok(vec![0; CHUNK_BYTES + 1]),
                            _ => chunk(&transfers, body),
                        };
                        call.reply.send(&encode_answer(answer));
                    }
                })
                .detach();
                let installer = Installer {
                    peer: member,
                    data_dir: PathBuf::new(),
                    shards: 1,
                    member_id: 2,
                    term: 0,
                    vote: 0,
                };
                let mut outcomes = Vec::new();
                for (n, offer) in [good, bad, oversize, missing].into_iter().enumerate() {
                    let file = File::create(path.with_extension(n.to_string())).unwrap();
                    outcomes.push(installer.download(1, &offer, file).await);
                }
                outcomes
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(outcomes[0], Ok(()));
        let downloaded = fs::read(download.with_extension("0")).unwrap();
        assert!(downloaded == content, "the download differs");
        let error = |n: usize| outcomes[n].clone().unwrap_err();
        assert!(error(1).contains("checksum mismatch"), "{}", error(1));
        assert!(error(2).contains("a chunk of"), "{}", error(2));
        assert!(error(3).contains("No such file"), "{}", error(3));
    }

    /// Every crash point of a swap converges on one complete data dir.
    #[test]
    fn start_up_completes_or_discards_an_install() {
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("data");
        let staging = staging_dir(&data);
        let setup = |old: &str, new: Option<&str>, marker: bool| {
            let _ = fs::remove_dir_all(&data);
            let _ = fs::remove_dir_all(&staging);
            fs::create_dir_all(&data).unwrap();
            fs::write(data.join("which"), old).unwrap();
            if let Some(new) = new {
                fs::create_dir_all(&staging).unwrap();
                fs::write(staging.join("which"), new).unwrap();
                if marker {
                    fs::write(staging.join(COMPLETE_MARKER), b"").unwrap();
                }
            }
        };
        let which = || fs::read_to_string(data.join("which")).unwrap();
        // Incomplete: the old dir stays.
        setup("old", Some("new"), false);
        finish_pending(&data).unwrap();
        assert_eq!(which(), "old");
        assert!(!staging.exists());
        // Complete, not swapped: swapped now.
        setup("old", Some("new"), true);
        finish_pending(&data).unwrap();
        assert_eq!(which(), "new");
        assert!(!staging.exists() && !data.join(COMPLETE_MARKER).exists());
        // Swapped, old not yet deleted (the marker is in the data dir now).
        setup("old", Some("new"), true);
        exchange(&data, &staging).unwrap();
        finish_pending(&data).unwrap();
        assert_eq!(which(), "new");
        assert!(!staging.exists() && !data.join(COMPLETE_MARKER).exists());
        // Nothing pending.
        setup("old", None, false);
        finish_pending(&data).unwrap();
        assert_eq!(which(), "old");
    }
}
