//! `ferrocd-dump` end to end: data dirs written with the engine's WAL, then the binary run on
//! them and its output and exit status checked.

use std::future::Future;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use ferrocd_engine::mvcc::codec::{encode, LogPayload};
use ferrocd_engine::mvcc::{Change, Effect};
use ferrocd_engine::wal::{HardState, ReadItem, Record, Wal, WalOptions, WalReader};

const MEMBER_ID: &str = "00000000000000cd";
const CLUSTER_ID: &str = "00000000000000ab";

fn run<F: Future>(make: impl FnOnce() -> F) -> F::Output {
    glommio::LocalExecutorBuilder::default()
        .make()
        .expect("executor")
        .run(make())
}

/// Appends `records` to a new WAL in `dir` and closes it.
fn write_wal(dir: &Path, records: Vec<Record>) {
    let dir = dir.to_path_buf();
    run(|| async move {
        let options = WalOptions {
            segment_size_bytes: 64 * 1024,
            ..WalOptions::default()
        };
        let (wal, _) = Wal::open(&dir, options).await.expect("open");
        wal.append(&records).await.expect("append");
        wal.close().await.expect("close");
    })
}

fn put(sub: i64, key: &[u8], value: &[u8], lease: i64) -> Change {
    Change {
        sub,
        effect: Effect::Put {
            key: key.to_vec(),
            value: value.to_vec(),
            lease,
        },
    }
}

fn delete(sub: i64, key: &[u8]) -> Change {
    Change {
        sub,
        effect: Effect::Delete { key: key.to_vec() },
    }
}

fn changes(main: i64, changes: Vec<Change>) -> LogPayload {
    LogPayload::Changes { main, changes }
}

/// Entries with indexes 1, 2, … holding `payloads`, as the server writes them (term 1).
fn entries(payloads: &[LogPayload]) -> Vec<Record> {
    (1..)
        .zip(payloads)
        .map(|(index, payload)| Record::entry(1, index, encode(payload)))
        .collect()
}

fn hard_state(commit: u64) -> Record {
    HardState {
        term: 1,
        vote: 1,
        commit,
    }
    .to_record()
}

/// A temporary data dir holding only a `member.conf` for `shards` shards.
fn empty_data_dir(shards: usize) -> tempfile::TempDir {
    let temp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let conf =
        format!("format=1\nshards={shards}\ncluster_id={CLUSTER_ID}\nmember_id={MEMBER_ID}\n");
    std::fs::write(temp.path().join("member.conf"), conf).expect("member.conf");
    temp
}

/// Writes shard 0's checkpoint file: `a` put at revision 2, `b` at 3, covering revision 3 and
/// WAL index 2. Returns its path.
fn checkpoint_shard_0(data_dir: &Path) -> PathBuf {
    use ferrocd_engine::checkpoint::Checkpointer;
    std::fs::create_dir(data_dir.join("db")).expect("db dir");
    let file = data_dir.join("db/shard-000.db");
    let (mut checkpointer, mut store) = Checkpointer::open(&file).expect("checkpoint file");
    store.apply(2, &[put(0, b"a", b"1", 0)]);
    store.apply(3, &[put(0, b"b", b"2", 0)]);
    checkpointer
        .write(&store.take_unsaved(3), 3, 2)
        .expect("checkpoint");
    file
}

/// A two-shard data dir:
///
/// * shard 0: `a=1`@2, `a=22`@5, then a hard state committing index 2;
/// * shard 1: `b=x`@3, delete `b`@7;
/// * meta: `c=ccc`, `d=dddd`@4 (one entry), compaction at 5, delete `d` and `e=""` with lease
///   9 @6 (one entry), a put of the binary key `k\0\xff`@8.
struct DataDir {
    _temp: tempfile::TempDir,
    path: PathBuf,
}

impl DataDir {
    fn new() -> DataDir {
        let temp = empty_data_dir(2);
        let path = temp.path().to_path_buf();
        let mut shard0 = entries(&[
            changes(2, vec![put(0, b"a", b"1", 0)]),
            changes(5, vec![put(0, b"a", b"22", 0)]),
        ]);
        shard0.push(hard_state(2));
        write_wal(&path.join("wal/shard-000"), shard0);
        write_wal(
            &path.join("wal/shard-001"),
            entries(&[
                changes(3, vec![put(0, b"b", b"x", 0)]),
                changes(7, vec![delete(0, b"b")]),
            ]),
        );
        write_wal(
            &path.join("wal/meta"),
            entries(&[
                changes(4, vec![put(0, b"c", b"ccc", 0), put(1, b"d", b"dddd", 0)]),
                LogPayload::Compact { rev: 5 },
                changes(6, vec![delete(0, b"d"), put(1, b"e", b"", 9)]),
                changes(8, vec![put(0, b"k\0\xff", b"v", 0)]),
            ]),
        );
        DataDir { _temp: temp, path }
    }

    fn wal(&self, group: &str) -> PathBuf {
        self.path.join("wal").join(group)
    }
}

/// The only segment file of a WAL dir.
fn segment(wal_dir: &Path) -> PathBuf {
    let mut files: Vec<PathBuf> = std::fs::read_dir(wal_dir)
        .expect("list")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    files.pop().expect("one file")
}

/// Byte offset of the record with entry index `index` in the WAL dir.
fn record_offset(wal_dir: &Path, index: u64) -> u64 {
    WalReader::open(wal_dir)
        .expect("reader")
        .find_map(|item| match item.expect("read") {
            ReadItem::Record { pos, record, .. } if record.index == index => Some(pos.offset),
            _ => None,
        })
        .expect("record present")
}

/// Header bytes of a record: its data starts after them.
const RECORD_HEADER_BYTES: u64 = 32;

fn flip_byte(file: &Path, offset: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .expect("open");
    let mut byte = [0u8];
    f.read_exact_at(&mut byte, offset).expect("read");
    f.write_all_at(&[byte[0] ^ 0x40], offset).expect("write");
}

struct Output {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Output {
    /// Lines that are rows (not `#` headers or damage reports).
    fn rows(&self) -> Vec<&str> {
        self.stdout
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect()
    }

    fn has_line(&self, wanted: &str) -> bool {
        self.stdout.lines().any(|line| line == wanted)
    }
}

fn dump(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_ferrocd-dump"))
        .args(args)
        .output()
        .expect("run ferrocd-dump");
    Output {
        code: out.status.code().expect("exit code"),
        stdout: String::from_utf8(out.stdout).expect("utf-8 stdout"),
        stderr: String::from_utf8(out.stderr).expect("utf-8 stderr"),
    }
}

fn dump_wal(path: &Path, extra: &[&str]) -> Output {
    let path = path.to_str().expect("utf-8 path");
    dump(&[&["wal", path], extra].concat())
}

const ALL_ROWS: [&str; 11] = [
    r#"0 1 1 put rev=2/0 key="a" value="1" lease=0"#,
    r#"0 1 2 put rev=5/0 key="a" value="22" lease=0"#,
    "0 1 2 hardstate term=1 vote=1 commit=2",
    r#"1 1 1 put rev=3/0 key="b" value="x" lease=0"#,
    r#"1 1 2 delete rev=7/0 key="b""#,
    r#"meta 1 1 put rev=4/0 key="c" value="ccc" lease=0"#,
    r#"meta 1 1 put rev=4/1 key="d" value="dddd" lease=0"#,
    "meta 1 2 compact rev=5",
    r#"meta 1 3 delete rev=6/0 key="d""#,
    r#"meta 1 3 put rev=6/1 key="e" value="" lease=0000000000000009"#,
    r#"meta 1 4 put rev=8/0 key="k\x00\xff" value="v" lease=0"#,
];

fn all_rows() -> Vec<&'static str> {
    ALL_ROWS.to_vec()
}

#[test]
fn clean_data_dir_prints_a_header_per_wal_and_every_change() {
    let dir = DataDir::new();
    let out = dump_wal(&dir.path, &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.rows(), all_rows());
    let headers: Vec<&str> = out.stdout.lines().filter(|l| l.starts_with('#')).collect();
    assert_eq!(headers.len(), 3, "{headers:?}");
    let ids = format!("member_id={MEMBER_ID} cluster_id={CLUSTER_ID}");
    assert!(
        headers[0].starts_with("# wal shard 0 dir="),
        "{}",
        headers[0]
    );
    assert!(
        headers[0].ends_with(&format!("{ids} hardstate term=1 vote=1 commit=2")),
        "{}",
        headers[0]
    );
    assert!(headers[1].ends_with(&format!("{ids} hardstate none")));
    assert!(headers[2].starts_with("# wal meta dir="), "{}", headers[2]);
}

#[test]
fn a_wal_dir_or_a_segment_file_is_dumped_alone_with_the_data_dirs_identity() {
    let dir = DataDir::new();
    let by_dir = dump_wal(&dir.wal("shard-001"), &[]);
    let by_file = dump_wal(&segment(&dir.wal("shard-001")), &[]);
    for out in [&by_dir, &by_file] {
        assert_eq!(out.code, 0, "{}", out.stderr);
        assert_eq!(out.rows(), all_rows()[3..5].to_vec());
        assert!(
            out.stdout.starts_with("# wal shard 1 dir="),
            "{}",
            out.stdout
        );
        assert!(out.stdout.contains(&format!("member_id={MEMBER_ID}")));
    }
}

#[test]
fn filters_select_wals_indexes_types_and_keys() {
    let dir = DataDir::new();
    let rows = all_rows();
    let cases: [(&[&str], Vec<&str>); 6] = [
        (&["--shard", "meta"], rows[5..].to_vec()),
        (&["--shard", "1"], rows[3..5].to_vec()),
        (
            &["--start-index", "2", "--end-index", "3"],
            vec![rows[1], rows[2], rows[4], rows[7], rows[8], rows[9]],
        ),
        (
            &["--entry-type", "delete", "--entry-type", "compact"],
            vec![rows[4], rows[7], rows[8]],
        ),
        (&["--entry-type", "hardstate"], vec![rows[2]]),
        (
            &["--key-prefix", "d", "--shard", "meta"],
            vec![rows[6], rows[8]],
        ),
    ];
    for (args, expected) in cases {
        let out = dump_wal(&dir.path, args);
        assert_eq!(out.code, 0, "{args:?}: {}", out.stderr);
        assert_eq!(out.rows(), expected, "{args:?}");
    }
}

#[test]
fn usage_errors_exit_2() {
    let dir = DataDir::new();
    for args in [
        &["--entry-type", "bogus"][..],
        &["--shard", "x"][..],
        &["--output", "yaml"][..],
    ] {
        assert_eq!(dump_wal(&dir.path, args).code, 2, "{args:?}");
    }
    let missing = dir.path.join("absent");
    let out = dump_wal(&missing, &[]);
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("absent"), "{}", out.stderr);
}

#[test]
fn json_output_is_one_object_per_line_with_hex_bytes() {
    let dir = DataDir::new();
    let out = dump_wal(&dir.path, &["-o", "json", "--shard", "meta"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(lines.iter().all(|l| l.starts_with('{') && l.ends_with('}')));
    assert!(
        lines[0].starts_with(r#"{"type":"wal","shard":"meta","dir":"#),
        "{}",
        lines[0]
    );
    assert!(lines[0].ends_with(&format!(
        r#""member_id":"{MEMBER_ID}","cluster_id":"{CLUSTER_ID}","hardstate":null}}"#
    )));
    assert_eq!(
        lines[1..],
        [
            r#"{"type":"put","shard":"meta","term":1,"index":1,"rev":4,"sub":0,"key_hex":"63","value_hex":"636363","lease":0}"#,
            r#"{"type":"put","shard":"meta","term":1,"index":1,"rev":4,"sub":1,"key_hex":"64","value_hex":"64646464","lease":0}"#,
            r#"{"type":"compact","shard":"meta","term":1,"index":2,"rev":5}"#,
            r#"{"type":"delete","shard":"meta","term":1,"index":3,"rev":6,"sub":0,"key_hex":"64"}"#,
            r#"{"type":"put","shard":"meta","term":1,"index":3,"rev":6,"sub":1,"key_hex":"65","value_hex":"","lease":9}"#,
            r#"{"type":"put","shard":"meta","term":1,"index":4,"rev":8,"sub":0,"key_hex":"6b00ff","value_hex":"76","lease":0}"#,
        ]
    );
}

#[test]
fn raw_prints_each_matching_record_once_undecoded() {
    let dir = DataDir::new();
    let out = dump_wal(
        &dir.path,
        &["--raw", "--shard", "meta", "--key-prefix", "d"],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let hex = |payload: &LogPayload| -> String {
        encode(payload).iter().map(|b| format!("{b:02x}")).collect()
    };
    let first = changes(4, vec![put(0, b"c", b"ccc", 0), put(1, b"d", b"dddd", 0)]);
    let third = changes(6, vec![delete(0, b"d"), put(1, b"e", b"", 9)]);
    assert_eq!(
        out.rows(),
        [
            format!("meta 1 1 entry data=0x{}", hex(&first)),
            format!("meta 1 3 entry data=0x{}", hex(&third)),
        ]
    );
}

#[test]
fn a_corrupt_record_is_reported_with_file_and_offset_and_the_dump_goes_on() {
    let dir = DataDir::new();
    let file = segment(&dir.wal("shard-001"));
    let offset = record_offset(&dir.wal("shard-001"), 1);
    flip_byte(&file, offset + RECORD_HEADER_BYTES);
    let out = dump_wal(&dir.path, &[]);
    assert_eq!(out.code, 1, "{}", out.stdout);
    let report = format!("# corrupt file={} offset={offset} ", file.display());
    assert!(
        out.stdout.lines().any(|l| l.starts_with(&report)),
        "{}",
        out.stdout
    );
    let mut expected = all_rows();
    expected.remove(3);
    assert_eq!(out.rows(), expected, "only the damaged record is missing");
    assert!(out.stderr.contains("1 corrupt"), "{}", out.stderr);
}

#[test]
fn stop_on_error_stops_at_the_first_corruption() {
    let dir = DataDir::new();
    let file = segment(&dir.wal("shard-001"));
    flip_byte(
        &file,
        record_offset(&dir.wal("shard-001"), 1) + RECORD_HEADER_BYTES,
    );
    let out = dump_wal(&dir.path, &["--stop-on-error"]);
    assert_eq!(out.code, 1);
    assert_eq!(out.rows(), all_rows()[..3].to_vec());
    let last = out.stdout.lines().last().expect("output");
    assert!(last.starts_with("# corrupt file="), "{last}");
}

#[test]
fn a_torn_tail_is_reported_as_such_and_is_not_an_error() {
    let dir = DataDir::new();
    let file = segment(&dir.wal("meta"));
    let offset = record_offset(&dir.wal("meta"), 4);
    let cut = std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .expect("open");
    cut.set_len(offset + RECORD_HEADER_BYTES + 1)
        .expect("truncate");
    let out = dump_wal(&dir.path, &["--stop-on-error"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.rows(), all_rows()[..10].to_vec());
    let report = format!("# torn tail file={} offset={offset} ", file.display());
    assert!(
        out.stdout.lines().last().unwrap().starts_with(&report),
        "{}",
        out.stdout
    );
}

#[test]
fn an_undecodable_entry_is_an_error() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let wal = dir.path().join("shard-000");
    let good = changes(2, vec![put(0, b"a", b"1", 0)]);
    write_wal(
        &wal,
        vec![
            Record::entry(1, 1, vec![9, 9]),
            Record::entry(1, 2, encode(&good)),
        ],
    );
    let out = dump_wal(&wal, &["--entry-type", "put"]);
    assert_eq!(out.code, 1);
    assert!(
        out.has_line(r#"0 1 1 undecodable error="unsupported mvcc payload format 9" data=0x0909"#),
        "{}",
        out.stdout
    );
    assert!(out.has_line(r#"0 1 2 put rev=2/0 key="a" value="1" lease=0"#));
}

#[test]
fn db_replays_every_log_in_revision_order_and_compacts() {
    let dir = DataDir::new();
    let path = dir.path.to_str().unwrap();
    let stats = dump(&["db", path]);
    assert_eq!(stats.code, 0, "{}", stats.stderr);
    // a: @5 kept (compacted at 5); b: @3, tombstone @7; c: @4; d: @4, tombstone @6; e: @6;
    // k\0\xff: @8.
    for line in [
        "current revision 8",
        "compacted revision 5",
        "keys 6 (live 4)",
        "versions 8",
        "wal shard 0: entries 2 puts 2 deletes 0 compactions 0 last index 2 last revision 5",
        "wal shard 1: entries 2 puts 1 deletes 1 compactions 0 last index 2 last revision 7",
        "wal meta: entries 4 puts 4 deletes 1 compactions 1 last index 4 last revision 8",
    ] {
        assert!(stats.has_line(line), "{line:?} in\n{}", stats.stdout);
    }
    let keys = dump(&["db", "keys", path]);
    assert_eq!(keys.code, 0, "{}", keys.stderr);
    assert_eq!(
        keys.rows(),
        [
            r#""a" 2 5 2 2"#,
            r#""c" 4 4 1 3"#,
            r#""e" 6 6 1 0"#,
            r#""k\x00\xff" 8 8 1 1"#
        ]
    );
}

#[test]
fn db_reports_damage_and_entries_that_cannot_apply() {
    let dir = DataDir::new();
    let file = segment(&dir.wal("shard-001"));
    let offset = record_offset(&dir.wal("shard-001"), 1);
    flip_byte(&file, offset + RECORD_HEADER_BYTES);
    let out = dump(&["db", "keys", dir.path.to_str().unwrap()]);
    assert_eq!(out.code, 1);
    let corrupt = format!("{} at byte offset {offset}", file.display());
    assert!(out.stderr.contains(&corrupt), "{}", out.stderr);
    // Without the put of `b`, its delete cannot apply: reported and skipped.
    assert!(
        out.stderr.contains(r#"deletes key "b" which is not live"#),
        "{}",
        out.stderr
    );
    assert_eq!(out.rows().len(), 4, "{}", out.stdout);
}

/// Lease entries of the meta WAL render as `lease <op> …` rows (a revoke's deletes follow it),
/// filter as `--entry-type lease`, and a revoke's deletes replay in `db keys`.
#[test]
fn lease_entries_render_and_replay() {
    use ferrocd_engine::mvcc::codec::LeaseCheckpoint;
    let temp = empty_data_dir(1);
    let path = temp.path();
    write_wal(
        &path.join("wal/shard-000"),
        entries(&[changes(
            2,
            vec![put(0, b"a", b"1", 7), put(1, b"b", b"2", 7)],
        )]),
    );
    let checkpoint = LeaseCheckpoint {
        id: 7,
        remaining_ms: 4200,
    };
    write_wal(
        &path.join("wal/meta"),
        entries(&[
            LogPayload::LeaseGrant { id: 7, ttl_s: 10 },
            LogPayload::LeaseCheckpoint {
                checkpoints: vec![checkpoint],
            },
            LogPayload::LeaseRevoke {
                id: 7,
                main: 3,
                changes: vec![delete(0, b"a"), delete(1, b"b")],
            },
            LogPayload::LeaseRevoke {
                id: -1,
                main: 0,
                changes: Vec::new(),
            },
        ]),
    );
    let out = dump_wal(&path.join("wal/meta"), &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        out.rows(),
        [
            "meta 1 1 lease grant id=0000000000000007 ttl=10",
            "meta 1 2 lease checkpoint id=0000000000000007 remaining_ms=4200",
            "meta 1 3 lease revoke id=0000000000000007 rev=3",
            r#"meta 1 3 delete rev=3/0 key="a""#,
            r#"meta 1 3 delete rev=3/1 key="b""#,
            "meta 1 4 lease revoke id=ffffffffffffffff rev=0",
        ]
    );
    let only_leases = dump_wal(&path.join("wal/meta"), &["--entry-type", "lease"]);
    assert_eq!(only_leases.rows().len(), 4);
    let json = dump_wal(
        &path.join("wal/meta"),
        &["-o", "json", "--start-index", "1", "--end-index", "1"],
    );
    assert!(
        json.has_line(r#"{"type":"lease","shard":"meta","term":1,"index":1,"op":"grant","id":"0000000000000007","ttl":10}"#),
        "{}",
        json.stdout
    );
    let keys = dump(&["db", "keys", path.to_str().expect("utf-8 path")]);
    assert_eq!(keys.code, 0, "{}", keys.stderr);
    let stats = dump(&["db", path.to_str().expect("utf-8 path")]);
    assert_eq!(stats.code, 0, "{}", stats.stderr);
    assert!(
        keys.rows().is_empty(),
        "the revoke deleted every key: {}",
        keys.stdout
    );
}

/// `db` starts from each shard's checkpoint and replays only the WAL entries above it, as the
/// server's recovery does (an entry the checkpoint covers would otherwise apply twice).
#[test]
fn db_starts_from_the_checkpoint() {
    let temp = empty_data_dir(1);
    let path = temp.path();
    checkpoint_shard_0(path);
    // Entry 1 (revision 2) was released; entry 2 is covered; entry 3 is not.
    let records = entries(&[
        changes(3, vec![put(0, b"b", b"2", 0)]),
        changes(4, vec![delete(0, b"a")]),
    ])
    .into_iter()
    .zip(2..)
    .map(|(record, index)| Record { index, ..record })
    .collect();
    write_wal(&path.join("wal/shard-000"), records);
    write_wal(&path.join("wal/meta"), Vec::new());
    let stats = dump(&["db", path.to_str().expect("utf-8 path")]);
    assert_eq!(stats.code, 0, "{}", stats.stderr);
    for line in [
        "current revision 4",
        "keys 2 (live 1)",
        "checkpoint shard 0: covered revision 3 latest revision 3 compacted revision 0 wal index 2",
    ] {
        assert!(stats.has_line(line), "{line:?} in\n{}", stats.stdout);
    }
    let keys = dump(&["db", "keys", path.to_str().expect("utf-8 path")]);
    assert_eq!(keys.rows(), [r#""b" 3 3 1 1"#]);
}

/// `db check` verifies each shard's checkpoint file page by page: a clean file prints its
/// B+tree statistics and what it covers, a missing one is noted, and a flipped byte in a page
/// makes the check fail with exit status 1, naming the file.
#[test]
fn db_check_verifies_every_checkpoint_file() {
    let temp = empty_data_dir(2);
    let path = temp.path();
    let file = checkpoint_shard_0(path);

    let check = dump(&["db", "check", path.to_str().expect("utf-8 path")]);
    assert_eq!(check.code, 0, "{}\n{}", check.stdout, check.stderr);
    let lines: Vec<&str> = check.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", check.stdout);
    assert!(lines[0].starts_with("shard 0: ok pages "), "{}", lines[0]);
    assert!(
        lines[0].ends_with("covered revision 3 wal index 2"),
        "{}",
        lines[0]
    );
    assert_eq!(lines[1], "shard 1: no checkpoint file");
    assert_eq!(lines[2], "meta: no checkpoint file");

    // Page 2 is the first page after the two meta pages: the tree's root leaf here.
    flip_byte(&file, 2 * 4096 + 64);
    let damaged = dump(&["db", "check", path.to_str().expect("utf-8 path")]);
    assert_eq!(damaged.code, 1, "{}\n{}", damaged.stdout, damaged.stderr);
    assert!(
        damaged.stdout.starts_with("shard 0: DAMAGED ") && damaged.stdout.contains("shard-000.db"),
        "{}",
        damaged.stdout
    );
}

/// Auth records of the meta WAL render as `auth <op> …` rows that never show a password
/// hash, filter as `--entry-type auth`, and change no key in `db`.
#[test]
fn auth_entries_render_without_hashes() {
    use ferrocd_engine::mvcc::codec::{AuthPermission, AuthRole, AuthUser};
    let temp = empty_data_dir(1);
    let path = temp.path();
    write_wal(&path.join("wal/shard-000"), Vec::new());
    let hash = "$2a$10$secrethashsecrethashse";
    write_wal(
        &path.join("wal/meta"),
        entries(&[
            LogPayload::AuthUserPut(AuthUser {
                name: "root".into(),
                password_hash: Some(hash.into()),
                roles: vec!["r".into(), "root".into()],
            }),
            LogPayload::AuthRolePut(AuthRole {
                name: "r".into(),
                perms: vec![AuthPermission {
                    perm_type: 2,
                    key: b"a/".to_vec(),
                    range_end: b"a0".to_vec(),
                }],
            }),
            LogPayload::AuthEnable { enabled: true },
            LogPayload::AuthRoleDelete { name: "r".into() },
            LogPayload::AuthUserDelete {
                name: "root".into(),
            },
        ]),
    );
    let out = dump_wal(&path.join("wal/meta"), &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        out.rows(),
        [
            r#"meta 1 1 auth user-put name="root" password="true" roles="r,root""#,
            r#"meta 1 2 auth role-put name="r" perms="readwrite:612f:6130""#,
            r#"meta 1 3 auth enable enabled="true""#,
            r#"meta 1 4 auth role-delete name="r""#,
            r#"meta 1 5 auth user-delete name="root""#,
        ]
    );
    let json = dump_wal(
        &path.join("wal/meta"),
        &["-o", "json", "--entry-type", "auth"],
    );
    let auth_rows = json
        .rows()
        .into_iter()
        .filter(|r| r.contains(r#""type":"auth""#));
    assert_eq!(auth_rows.count(), 5, "{}", json.stdout);
    assert!(!json.stdout.contains(hash) && !out.stdout.contains(hash));
    let stats = dump(&["db", path.to_str().expect("utf-8 path")]);
    assert_eq!(stats.code, 0, "{}", stats.stderr);
}

/// Alarm records render as `alarm activate|deactivate` rows; `db` shows the meta checkpoint
/// (`db/meta.ckpt`) with its alarms and takes its compaction, and `db check` verifies its
/// checksum.
#[test]
fn alarm_rows_and_the_meta_checkpoint() {
    use ferrocd_engine::meta_checkpoint::{self, MetaCheckpoint};
    use ferrocd_engine::mvcc::codec::Alarm;
    let temp = empty_data_dir(1);
    let path = temp.path();
    write_wal(&path.join("wal/shard-000"), Vec::new());
    let nospace = Alarm {
        member_id: 0xaa,
        alarm: 1,
    };
    write_wal(
        &path.join("wal/meta"),
        entries(&[
            LogPayload::AlarmActivate(nospace),
            LogPayload::AlarmDeactivate(nospace),
        ]),
    );
    let out = dump_wal(&path.join("wal/meta"), &["--entry-type", "alarm"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        out.rows(),
        [
            r#"meta 1 1 alarm activate member_id="00000000000000aa" alarm="NOSPACE""#,
            r#"meta 1 2 alarm deactivate member_id="00000000000000aa" alarm="NOSPACE""#,
        ]
    );
    let checkpoint = MetaCheckpoint {
        wal_index: 2,
        auth_revision: 1,
        records: vec![
            LogPayload::LeaseGrant { id: 7, ttl_s: 60 },
            LogPayload::Compact { rev: 1 },
            LogPayload::AlarmActivate(nospace),
        ],
    };
    std::fs::create_dir(path.join("db")).expect("db dir");
    let file = meta_checkpoint::path_in(&path.join("db"));
    meta_checkpoint::write(&file, &checkpoint).expect("write the meta checkpoint");
    let db = path.to_str().expect("utf-8 path");
    let stats = dump(&["db", db]);
    assert_eq!(stats.code, 0, "{}", stats.stderr);
    assert!(
        stats.has_line(
            "checkpoint meta: wal index 2 leases 1 users 0 roles 0 auth enabled false \
             auth revision 1 compacted revision 1"
        ),
        "{}",
        stats.stdout
    );
    assert!(stats.has_line("alarm member 00000000000000aa type 1"));
    assert!(stats.has_line("compacted revision 1"), "{}", stats.stdout);
    let check = dump(&["db", "check", db]);
    assert!(check.stdout.contains("meta: ok records 3 wal index 2"));
    flip_byte(&file, 20);
    let damaged = dump(&["db", "check", db]);
    assert_eq!(damaged.code, 1, "{}", damaged.stdout);
    assert!(
        damaged.stdout.contains("meta: DAMAGED"),
        "{}",
        damaged.stdout
    );
}
