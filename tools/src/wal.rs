//! `ferrocd-dump wal`: the records of one or more WALs, decoded.
//!
//! # Text output
//!
//! Lines starting with `#` are not rows: a header per WAL
//! (`# wal shard 0 dir=… member_id=… cluster_id=… hardstate term=1 vote=1 commit=7`, with
//! `unknown`/`none` where there is nothing to show), and damage:
//! `# corrupt file=… offset=… skipped_bytes=…: detail` or `# torn tail file=… …`.
//! Every other line is a row `shard term index type data`, one per change of an entry (so an
//! entry with several changes gives several rows with the same index):
//!
//! ```text
//! 0 1 5 put rev=5/0 key="a" value="v\x00" lease=0
//! 0 1 6 delete rev=6/0 key="a"
//! meta 1 2 compact rev=4
//! meta 1 2 noop rev=9                  (an entry with no changes)
//! meta 1 3 lease grant id=0000000000000007 ttl=10
//! meta 1 4 lease revoke id=0000000000000007 rev=12   (then one delete row per key, or rev=0)
//! meta 1 5 lease checkpoint id=0000000000000007 remaining_ms=4200
//! meta 1 6 alarm activate member_id="00000000000000aa" alarm="NOSPACE"   (or deactivate)
//! 0 1 6 hardstate term=1 vote=1 commit=6
//! 0 1 7 undecodable error="…" data=0x…  (an entry whose payload does not decode)
//! ```
//!
//! `shard` is the shard number, `meta`, or `?` for a WAL dir whose name says nothing. Keys
//! and values are quoted and escaped as [`crate::render`] describes. `--raw` prints one row
//! per record instead, `entry data=0x…` or `hardstate data=0x…`, with the undecoded bytes.
//!
//! # JSON output (`-o json`)
//!
//! One object per line, with the same content; `type` tells which: `wal` (header), `put`,
//! `delete`, `compact`, `noop`, `lease` (with `op` grant, revoke or checkpoint), `auth`, `alarm`
//! (with `op` activate or deactivate), `hardstate`,
//! `undecodable`, `entry` (raw), `corrupt`, `torn_tail`. Lease ids are rendered as etcdctl
//! does, 16 hex digits. `shard` is always a string. Bytes are lowercase hex in `*_hex` fields; ids are
//! 16-digit hex strings, as in `member.conf`.
//!
//! # Filters
//!
//! `--shard` picks WALs; the index range (inclusive; a HardState's index is its commit index)
//! picks records; `--entry-type` and `--key-prefix` pick rows (compact, noop and hardstate rows
//! and lease rows have no key and never match a key prefix). A raw record is printed when any of its rows
//! passes. Undecodable entries and damage are errors and pass every filter but `--shard` and
//! the index range.

use std::io::Write;

use ferrocd_engine::mvcc::codec::{decode, Alarm, DecodeError, LogPayload};
use ferrocd_engine::mvcc::{Change, Effect, Revision};
use ferrocd_engine::wal::{HardState, Record, RecordKind};

use crate::datadir::{Group, MemberConf, Target, WalSource};
use crate::render::{hex, json_string, quoted};
use crate::scan::{Damage, Event, Scanner};
use crate::{EXIT_CLEAN, EXIT_DAMAGED};

/// Row types selectable with `--entry-type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RowType {
    Put,
    Delete,
    Compact,
    Lease,
    Auth,
    Alarm,
    Member,
    Hardstate,
}

#[derive(Clone, Debug, Default)]
pub struct Filters {
    pub group: Option<Group>,
    pub start_index: Option<u64>,
    pub end_index: Option<u64>,
    /// Empty: every type.
    pub types: Vec<RowType>,
    pub key_prefix: Option<Vec<u8>>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    #[default]
    Text,
    Json,
}

#[derive(Clone, Debug, Default)]
pub struct Options {
    pub filters: Filters,
    pub format: Format,
    pub raw: bool,
    pub stop_on_error: bool,
}

/// What a dump saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub rows: u64,
    pub corrupt: u64,
    pub torn_tails: u64,
    pub undecodable: u64,
}

impl Summary {
    /// A torn tail alone is clean: the server cuts it and starts.
    pub fn exit_code(&self) -> i32 {
        if self.corrupt + self.undecodable == 0 {
            EXIT_CLEAN
        } else {
            EXIT_DAMAGED
        }
    }

    fn errors(&self) -> u64 {
        self.corrupt + self.undecodable
    }
}

/// Dumps every WAL of `target` that the filters select to `out`. `Err` on an I/O error.
pub fn dump(target: &Target, options: &Options, out: &mut dyn Write) -> Result<Summary, String> {
    let mut summary = Summary::default();
    let selected = target.wals.iter().filter(|wal| {
        options
            .filters
            .group
            .is_none_or(|group| wal.group == Some(group))
    });
    for wal in selected {
        let mut printer = Printer {
            out: &mut *out,
            format: options.format,
            label: wal.label(),
        };
        let hard_state = last_hard_state(wal)?;
        printer.header(wal, target.conf, hard_state)?;
        dump_wal(wal, options, &mut printer, &mut summary)?;
        if options.stop_on_error && summary.errors() > 0 {
            break;
        }
    }
    Ok(summary)
}

/// The newest valid HardState of the WAL (a first pass, so the header can show it).
fn last_hard_state(wal: &WalSource) -> Result<Option<HardState>, String> {
    let mut last = None;
    for event in open_scanner(wal)? {
        if let Event::Record { record, .. } = event.map_err(|e| e.to_string())? {
            last = HardState::from_record(&record).or(last);
        }
    }
    Ok(last)
}

fn open_scanner(wal: &WalSource) -> Result<Scanner, String> {
    Scanner::open(&wal.dir, wal.only_file.as_deref()).map_err(|e| e.to_string())
}

fn dump_wal(
    wal: &WalSource,
    options: &Options,
    printer: &mut Printer<'_>,
    summary: &mut Summary,
) -> Result<(), String> {
    for event in open_scanner(wal)? {
        match event.map_err(|e| e.to_string())? {
            Event::Damage(damage) => {
                printer.damage(&damage)?;
                if damage.torn {
                    summary.torn_tails += 1;
                } else {
                    summary.corrupt += 1;
                }
            }
            Event::Record { record, .. } => dump_record(&record, options, printer, summary)?,
        }
        if options.stop_on_error && summary.errors() > 0 {
            break;
        }
    }
    Ok(())
}

fn dump_record(
    record: &Record,
    options: &Options,
    printer: &mut Printer<'_>,
    summary: &mut Summary,
) -> Result<(), String> {
    let filters = &options.filters;
    let in_range = filters
        .start_index
        .is_none_or(|start| record.index >= start)
        && filters.end_index.is_none_or(|end| record.index <= end);
    if !in_range {
        return Ok(());
    }
    let payload = match record.kind {
        RecordKind::Entry => Some(decode(&record.data)),
        RecordKind::HardState | RecordKind::Snapshot | RecordKind::ConfEntry => None,
    };
    let rows = rows_of(record, payload.as_ref());
    let passing: Vec<&Data<'_>> = rows.iter().filter(|row| passes(row, filters)).collect();
    if options.raw && !passing.is_empty() {
        printer.raw(record)?;
        summary.rows += 1;
    } else if !options.raw {
        for row in &passing {
            printer.row(record, row)?;
        }
        summary.rows += passing.len() as u64;
    }
    if rows
        .iter()
        .any(|row| matches!(row, Data::Undecodable { .. }))
    {
        summary.undecodable += 1;
    }
    Ok(())
}

/// What one row shows, borrowed from the decoded record.
enum Data<'a> {
    Put {
        rev: Revision,
        key: &'a [u8],
        value: &'a [u8],
        lease: i64,
    },
    Delete {
        rev: Revision,
        key: &'a [u8],
    },
    Compact {
        rev: i64,
    },
    Noop {
        rev: i64,
    },
    Lease(LeaseRow),
    /// An auth change: its op and `(name, text)` fields (never a password hash).
    Auth(&'static str, Vec<(&'static str, String)>),
    /// An alarm raised or cleared: its op and fields, as an auth row.
    Alarm(&'static str, Vec<(&'static str, String)>),
    /// A member's published attributes: its op and fields, as an auth row.
    Member(&'static str, Vec<(&'static str, String)>),
    HardState(HardState),
    Undecodable {
        detail: String,
        data: &'a [u8],
    },
}

impl Data<'_> {
    fn type_name(&self) -> &'static str {
        match self {
            Data::Put { .. } => "put",
            Data::Delete { .. } => "delete",
            Data::Compact { .. } => "compact",
            Data::Noop { .. } => "noop",
            Data::Lease(_) => "lease",
            Data::Auth(..) => "auth",
            Data::Alarm(..) => "alarm",
            Data::Member(..) => "member",
            Data::HardState(_) => "hardstate",
            Data::Undecodable { .. } => "undecodable",
        }
    }

    fn row_type(&self) -> Option<RowType> {
        match self {
            Data::Put { .. } => Some(RowType::Put),
            Data::Delete { .. } => Some(RowType::Delete),
            Data::Compact { .. } => Some(RowType::Compact),
            Data::Lease(_) => Some(RowType::Lease),
            Data::Auth(..) => Some(RowType::Auth),
            Data::Alarm(..) => Some(RowType::Alarm),
            Data::Member(..) => Some(RowType::Member),
            Data::HardState(_) => Some(RowType::Hardstate),
            Data::Noop { .. } | Data::Undecodable { .. } => None,
        }
    }

    fn key(&self) -> Option<&[u8]> {
        match self {
            Data::Put { key, .. } | Data::Delete { key, .. } => Some(key),
            _ => None,
        }
    }
}

/// What a lease row shows.
#[derive(Clone, Copy)]
enum LeaseRow {
    Grant { id: i64, ttl_s: i64 },
    Revoke { id: i64, rev: i64 },
    Checkpoint { id: i64, remaining_ms: i64 },
}

impl LeaseRow {
    fn op(&self) -> &'static str {
        match self {
            LeaseRow::Grant { .. } => "grant",
            LeaseRow::Revoke { .. } => "revoke",
            LeaseRow::Checkpoint { .. } => "checkpoint",
        }
    }

    /// `(name, value)` pairs after the op, shared by text and JSON.
    fn fields(&self) -> Vec<(&'static str, String)> {
        let id = |id: &i64| ("id", format!("{:016x}", *id as u64));
        match self {
            LeaseRow::Grant { id: i, ttl_s } => vec![id(i), ("ttl", ttl_s.to_string())],
            LeaseRow::Revoke { id: i, rev } => vec![id(i), ("rev", rev.to_string())],
            LeaseRow::Checkpoint {
                id: i,
                remaining_ms,
            } => vec![id(i), ("remaining_ms", remaining_ms.to_string())],
        }
    }
}

/// The row of an auth record, or `None` for other payloads. A user row says whether the user
/// has a password, never its hash.
fn auth_row(payload: &LogPayload) -> Option<Data<'static>> {
    let name = |name: &str| ("name", name.to_string());
    let (op, fields) = match payload {
        LogPayload::AuthEnable { enabled } => ("enable", vec![("enabled", enabled.to_string())]),
        LogPayload::AuthUserPut(user) => (
            "user-put",
            vec![
                name(&user.name),
                ("password", user.password_hash.is_some().to_string()),
                ("roles", user.roles.join(",")),
            ],
        ),
        LogPayload::AuthUserDelete { name: n } => ("user-delete", vec![name(n)]),
        LogPayload::AuthRolePut(role) => {
            let perms: Vec<String> = role
                .perms
                .iter()
                .map(|p| {
                    let kind = ["read", "write", "readwrite"][usize::from(p.perm_type)];
                    format!("{kind}:{}:{}", hex(&p.key), hex(&p.range_end))
                })
                .collect();
            (
                "role-put",
                vec![name(&role.name), ("perms", perms.join(","))],
            )
        }
        LogPayload::AuthRoleDelete { name: n } => ("role-delete", vec![name(n)]),
        // The token itself is a credential: not printed.
        LogPayload::AuthToken { user, .. } => ("token", vec![("user", user.clone())]),
        _ => return None,
    };
    Some(Data::Auth(op, fields))
}

/// An alarm row: the member id in hex (as `member.conf`), the alarm by etcd's name.
fn alarm_row(op: &'static str, alarm: &Alarm) -> Data<'static> {
    let name = match alarm.alarm {
        0 => "NONE".to_string(),
        1 => "NOSPACE".to_string(),
        2 => "CORRUPT".to_string(),
        other => other.to_string(),
    };
    let member_id = format!("{:016x}", alarm.member_id);
    Data::Alarm(op, vec![("member_id", member_id), ("alarm", name)])
}

/// One row per change, each at revision `main`.
fn change_rows(main: i64, changes: &[Change]) -> impl Iterator<Item = Data<'_>> {
    changes.iter().map(move |change| {
        let rev = Revision {
            main,
            sub: change.sub,
        };
        match &change.effect {
            Effect::Put { key, value, lease } => Data::Put {
                rev,
                key,
                value,
                lease: *lease,
            },
            Effect::Delete { key } => Data::Delete { rev, key },
        }
    })
}

/// `payload` is the decoded data of an Entry record, `None` for a HardState record.
fn rows_of<'a>(
    record: &'a Record,
    payload: Option<&'a Result<LogPayload, DecodeError>>,
) -> Vec<Data<'a>> {
    match payload {
        None => match HardState::from_record(record) {
            Some(hard_state) => vec![Data::HardState(hard_state)],
            None => vec![Data::Undecodable {
                detail: "hard state data is not three u64".into(),
                data: &record.data,
            }],
        },
        Some(Err(e)) => vec![Data::Undecodable {
            detail: e.to_string(),
            data: &record.data,
        }],
        Some(Ok(LogPayload::Compact { rev })) => vec![Data::Compact { rev: *rev }],
        Some(Ok(LogPayload::Changes { main, changes })) if changes.is_empty() => {
            vec![Data::Noop { rev: *main }]
        }
        Some(Ok(LogPayload::Changes { main, changes })) => change_rows(*main, changes).collect(),
        Some(Ok(LogPayload::LeaseGrant { id, ttl_s })) => vec![Data::Lease(LeaseRow::Grant {
            id: *id,
            ttl_s: *ttl_s,
        })],
        Some(Ok(LogPayload::LeaseRevoke { id, main, changes })) => {
            std::iter::once(Data::Lease(LeaseRow::Revoke {
                id: *id,
                rev: *main,
            }))
            .chain(change_rows(*main, changes))
            .collect()
        }
        Some(Ok(LogPayload::LeaseCheckpoint { checkpoints })) => checkpoints
            .iter()
            .map(|cp| {
                Data::Lease(LeaseRow::Checkpoint {
                    id: cp.id,
                    remaining_ms: cp.remaining_ms,
                })
            })
            .collect(),
        Some(Ok(LogPayload::AlarmActivate(alarm))) => vec![alarm_row("activate", alarm)],
        Some(Ok(LogPayload::AlarmDeactivate(alarm))) => vec![alarm_row("deactivate", alarm)],
        Some(Ok(LogPayload::MemberPublish(attributes))) => vec![Data::Member(
            "publish",
            vec![
                ("member_id", format!("{:016x}", attributes.member_id)),
                ("name", attributes.name.clone()),
                ("client_urls", attributes.client_urls.join(",")),
            ],
        )],
        Some(Ok(payload)) => {
            vec![auth_row(payload).expect("every other payload is an auth record")]
        }
    }
}

fn passes(row: &Data<'_>, filters: &Filters) -> bool {
    if matches!(row, Data::Undecodable { .. }) {
        return true;
    }
    let type_ok = filters.types.is_empty()
        || row
            .row_type()
            .is_some_and(|row_type| filters.types.contains(&row_type));
    let key_ok = filters
        .key_prefix
        .as_deref()
        .is_none_or(|prefix| row.key().is_some_and(|key| key.starts_with(prefix)));
    type_ok && key_ok
}

/// Writes lines for one WAL in the chosen format.
struct Printer<'w> {
    out: &'w mut dyn Write,
    format: Format,
    label: String,
}

impl Printer<'_> {
    fn line(&mut self, text: &str) -> Result<(), String> {
        writeln!(self.out, "{text}").map_err(|e| format!("writing output: {e}"))
    }

    fn json(&mut self, fields: &[(&str, String)]) -> Result<(), String> {
        let body: Vec<String> = fields
            .iter()
            .map(|(name, value)| format!("{}:{value}", json_string(name)))
            .collect();
        self.line(&format!("{{{}}}", body.join(",")))
    }

    fn header(
        &mut self,
        wal: &WalSource,
        conf: Option<MemberConf>,
        hard_state: Option<HardState>,
    ) -> Result<(), String> {
        let id = |pick: fn(&MemberConf) -> u64| conf.as_ref().map(|c| format!("{:016x}", pick(c)));
        let (member, cluster) = (id(|c| c.member_id), id(|c| c.cluster_id));
        let dir = wal.only_file.as_deref().unwrap_or(&wal.dir).display();
        match self.format {
            Format::Text => {
                let unknown = || "unknown".to_string();
                let hard_state = hard_state.map_or("none".to_string(), |hs| {
                    format!("term={} vote={} commit={}", hs.term, hs.vote, hs.commit)
                });
                let group = match wal.group {
                    Some(Group::Meta) => "meta".to_string(),
                    _ => format!("shard {}", self.label),
                };
                self.line(&format!(
                    "# wal {group} dir={dir} member_id={} cluster_id={} hardstate {hard_state}",
                    member.unwrap_or_else(unknown),
                    cluster.unwrap_or_else(unknown)
                ))
            }
            Format::Json => {
                let string_or_null =
                    |v: Option<String>| v.map_or("null".into(), |v| json_string(&v));
                let hard_state = hard_state.map_or("null".to_string(), |hs| {
                    format!(
                        r#"{{"term":{},"vote":{},"commit":{}}}"#,
                        hs.term, hs.vote, hs.commit
                    )
                });
                let fields = [
                    ("type", json_string("wal")),
                    ("shard", json_string(&self.label)),
                    ("dir", json_string(&dir.to_string())),
                    ("member_id", string_or_null(member)),
                    ("cluster_id", string_or_null(cluster)),
                    ("hardstate", hard_state),
                ];
                self.json(&fields)
            }
        }
    }

    fn damage(&mut self, damage: &Damage) -> Result<(), String> {
        let file = damage.file.display().to_string();
        match self.format {
            Format::Text => {
                let what = if damage.torn { "torn tail" } else { "corrupt" };
                self.line(&format!(
                    "# {what} file={file} offset={} skipped_bytes={}: {}",
                    damage.offset, damage.skipped_bytes, damage.detail
                ))
            }
            Format::Json => {
                let what = if damage.torn { "torn_tail" } else { "corrupt" };
                let fields = [
                    ("type", json_string(what)),
                    ("shard", json_string(&self.label)),
                    ("file", json_string(&file)),
                    ("offset", damage.offset.to_string()),
                    ("skipped_bytes", damage.skipped_bytes.to_string()),
                    ("detail", json_string(&damage.detail)),
                ];
                self.json(&fields)
            }
        }
    }

    fn raw(&mut self, record: &Record) -> Result<(), String> {
        let type_name = match record.kind {
            RecordKind::Entry => "entry",
            RecordKind::HardState => "hardstate",
            RecordKind::Snapshot => "snapshot",
            RecordKind::ConfEntry => "confentry",
        };
        match self.format {
            Format::Text => {
                let data = format!("data=0x{}", hex(&record.data));
                self.text_row(record, type_name, &data)
            }
            Format::Json => {
                let mut fields = self.json_prefix(record, type_name);
                fields.push(("data_hex", json_string(&hex(&record.data))));
                self.json(&fields)
            }
        }
    }

    fn row(&mut self, record: &Record, data: &Data<'_>) -> Result<(), String> {
        match self.format {
            Format::Text => self.text_row(record, data.type_name(), &text_data(data)),
            Format::Json => {
                let mut fields = self.json_prefix(record, data.type_name());
                fields.extend(json_data(data));
                self.json(&fields)
            }
        }
    }

    fn text_row(&mut self, record: &Record, type_name: &str, data: &str) -> Result<(), String> {
        let line = format!(
            "{} {} {} {type_name} {data}",
            self.label, record.term, record.index
        );
        self.line(&line)
    }

    fn json_prefix(&self, record: &Record, type_name: &str) -> Vec<(&'static str, String)> {
        vec![
            ("type", json_string(type_name)),
            ("shard", json_string(&self.label)),
            ("term", record.term.to_string()),
            ("index", record.index.to_string()),
        ]
    }
}

/// A lease id as the lease rows (and etcdctl) show it: 16 hex digits; 0 for no lease.
fn lease_id(lease: i64) -> String {
    match lease {
        0 => "0".to_string(),
        id => format!("{id:016x}"),
    }
}

fn text_data(data: &Data<'_>) -> String {
    match data {
        Data::Put {
            rev,
            key,
            value,
            lease,
        } => format!(
            "rev={}/{} key={} value={} lease={}",
            rev.main,
            rev.sub,
            quoted(key),
            quoted(value),
            lease_id(*lease)
        ),
        Data::Delete { rev, key } => format!("rev={}/{} key={}", rev.main, rev.sub, quoted(key)),
        Data::Compact { rev } | Data::Noop { rev } => format!("rev={rev}"),
        Data::Lease(row) => {
            let fields: Vec<String> = row
                .fields()
                .iter()
                .map(|(n, v)| format!("{n}={v}"))
                .collect();
            format!("{} {}", row.op(), fields.join(" "))
        }
        Data::Auth(op, fields) | Data::Alarm(op, fields) | Data::Member(op, fields) => {
            let fields: Vec<String> = fields
                .iter()
                .map(|(n, v)| format!("{n}={}", quoted(v.as_bytes())))
                .collect();
            format!("{op} {}", fields.join(" "))
        }
        Data::HardState(hs) => format!("term={} vote={} commit={}", hs.term, hs.vote, hs.commit),
        Data::Undecodable { detail, data } => {
            format!("error={} data=0x{}", quoted(detail.as_bytes()), hex(data))
        }
    }
}

fn json_data(data: &Data<'_>) -> Vec<(&'static str, String)> {
    match data {
        Data::Put {
            rev,
            key,
            value,
            lease,
        } => vec![
            ("rev", rev.main.to_string()),
            ("sub", rev.sub.to_string()),
            ("key_hex", json_string(&hex(key))),
            ("value_hex", json_string(&hex(value))),
            ("lease", lease.to_string()),
        ],
        Data::Delete { rev, key } => vec![
            ("rev", rev.main.to_string()),
            ("sub", rev.sub.to_string()),
            ("key_hex", json_string(&hex(key))),
        ],
        Data::Compact { rev } | Data::Noop { rev } => vec![("rev", rev.to_string())],
        Data::Lease(row) => {
            let mut fields = vec![("op", json_string(row.op()))];
            for (name, value) in row.fields() {
                // The id is a hex string; counts are numbers.
                let value = if name == "id" {
                    json_string(&value)
                } else {
                    value
                };
                fields.push((name, value));
            }
            fields
        }
        Data::Auth(op, fields) | Data::Alarm(op, fields) | Data::Member(op, fields) => {
            std::iter::once(("op", json_string(op)))
                .chain(fields.iter().map(|(n, v)| (*n, json_string(v))))
                .collect()
        }
        // The record's term (in every row) is the hard state's term.
        Data::HardState(hs) => vec![
            ("vote", hs.vote.to_string()),
            ("commit", hs.commit.to_string()),
        ],
        Data::Undecodable { detail, data } => vec![
            ("error", json_string(detail)),
            ("data_hex", json_string(&hex(data))),
        ],
    }
}
