//! Differential test of the KV API: the same seeded random sequence of requests goes to a
//! real etcd (the reference) and to the server under test (ferrocd, or etcd again with
//! `FERROCD_TEST_SERVER=etcd`), one request at a time, and every field of every response must
//! match, cluster and member ids and raft term aside. Errors must match by gRPC code and
//! message.
//!
//! Reproduce or explore: `FERROCD_DIFF_SEED=<seed> FERROCD_DIFF_OPS=<n> cargo test --test
//! differential -- --ignored explore`. `FERROCD_DIFF_OPS` also sets the length of the fixed-seed
//! runs.

mod common;

use std::collections::{BTreeMap, VecDeque};
use std::fmt;

use common::Server;
use etcd_client::proto::{
    PbCompactionResponse, PbDeleteResponse, PbKeyValue, PbPutResponse, PbRangeResponse,
    PbResponseHeader, PbResponseOp, PbTxnOpResponse, PbTxnResponse,
};
use etcd_client::{
    CompactionOptions, Compare, CompareOp, DeleteOptions, GetOptions, KvClient, PutOptions,
    SortOrder, SortTarget, Txn, TxnOp,
};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, RngCore, SeedableRng};

/// A small key space so that requests collide: shared prefixes, binary bytes, `\0` and `\xff`
/// edges (the prefix of `\xff\xff` is "from key").
const KEYS: [&[u8]; 20] = [
    b"a",
    b"a/",
    b"a/1",
    b"a/10",
    b"a/2",
    b"a/b",
    b"a/b/c",
    b"ab",
    b"abc",
    b"b",
    b"b/x",
    b"b/y",
    b"c",
    b"c\x00",
    b"c\x00\x01",
    b"c\xff",
    b"d",
    b"\x00",
    b"\xff",
    b"\xff\xff",
];

const DEFAULT_OPS: usize = 800;
const OPS_ENV: &str = "FERROCD_DIFF_OPS";
const SEED_ENV: &str = "FERROCD_DIFF_SEED";
/// Values about this large show up occasionally (etcd's request limit is 1.5 MiB).
const LARGE_VALUE_BYTES: usize = 100 * 1024;
/// Just over etcd's default `--max-request-bytes` (1.5 MiB) but under its gRPC receive limit
/// (that plus 512 KiB), so the request reaches etcd's own size check.
const TOO_LARGE_VALUE_BYTES: usize = 1536 * 1024 + 64 * 1024;
/// etcd's default `--max-txn-ops`.
const MAX_TXN_OPS: usize = 128;
/// Values remembered for VALUE compares, so some of them match.
const VALUE_POOL_LEN: usize = 8;
/// Nesting depth of generated txns (a txn inside a txn inside a txn at most).
const MAX_TXN_DEPTH: usize = 2;
/// Bytes of a value shown when a mismatch is printed; the rest is summarised by a hash.
const SHOWN_BYTES: usize = 48;

// ---------------------------------------------------------------------------------------------
// Requests: our own description, printable, turned into etcd-client calls for each server.

/// Byte strings that print as escaped text, long ones shortened to a length and a hash.
#[derive(Clone, PartialEq, Eq)]
struct Bytes(Vec<u8>);

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = &self.0[..self.0.len().min(SHOWN_BYTES)];
        write!(f, "b\"{}\"", shown.escape_ascii())?;
        if self.0.len() > SHOWN_BYTES {
            write!(f, "..(len {}, fnv {:016x})", self.0.len(), fnv64(&self.0))?;
        }
        Ok(())
    }
}

fn fnv64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[derive(Debug, Clone)]
enum Request {
    Put(PutSpec),
    Range(RangeSpec),
    Delete(DeleteSpec),
    Txn(TxnSpec),
    Compact { revision: i64, physical: bool },
}

#[derive(Debug, Clone)]
struct PutSpec {
    key: Bytes,
    value: Bytes,
    lease: i64,
    prev_kv: bool,
    ignore_value: bool,
    ignore_lease: bool,
}

/// The `range_end` forms of etcd's API.
#[derive(Debug, Clone)]
enum KeyRange {
    Single,
    Prefix,
    FromKey,
    AllKeys,
    UpTo(Bytes),
}

#[derive(Debug, Clone)]
struct RangeSpec {
    key: Bytes,
    range: KeyRange,
    limit: i64,
    revision: i64,
    sort: Option<(SortTarget, SortOrder)>,
    serializable: bool,
    keys_only: bool,
    count_only: bool,
    min_mod_revision: i64,
    max_mod_revision: i64,
    min_create_revision: i64,
    max_create_revision: i64,
}

#[derive(Debug, Clone)]
struct DeleteSpec {
    key: Bytes,
    range: KeyRange,
    prev_kv: bool,
}

#[derive(Debug, Clone)]
struct TxnSpec {
    compares: Vec<CompareSpec>,
    success: Vec<TxnOpSpec>,
    failure: Vec<TxnOpSpec>,
}

#[derive(Debug, Clone)]
struct CompareSpec {
    key: Bytes,
    /// `None` compares one key; `Prefix` and `UpTo` compare every key of a range.
    range: Option<KeyRange>,
    op: CompareOp,
    target: CompareTarget,
}

#[derive(Debug, Clone)]
enum CompareTarget {
    Version(i64),
    Create(i64),
    Mod(i64),
    Value(Bytes),
    Lease(i64),
}

#[derive(Debug, Clone)]
enum TxnOpSpec {
    Put(PutSpec),
    Range(RangeSpec),
    Delete(DeleteSpec),
    Txn(TxnSpec),
}

impl PutSpec {
    fn options(&self) -> PutOptions {
        let mut options = PutOptions::new().with_lease(self.lease);
        if self.prev_kv {
            options = options.with_prev_key();
        }
        if self.ignore_value {
            options = options.with_ignore_value();
        }
        if self.ignore_lease {
            options = options.with_ignore_lease();
        }
        options
    }
}

impl RangeSpec {
    fn options(&self) -> GetOptions {
        let mut options = match &self.range {
            KeyRange::Single => GetOptions::new(),
            KeyRange::Prefix => GetOptions::new().with_prefix(),
            KeyRange::FromKey => GetOptions::new().with_from_key(),
            KeyRange::AllKeys => GetOptions::new().with_all_keys(),
            KeyRange::UpTo(end) => GetOptions::new().with_range(end.0.clone()),
        }
        .with_limit(self.limit)
        .with_revision(self.revision)
        .with_min_mod_revision(self.min_mod_revision)
        .with_max_mod_revision(self.max_mod_revision)
        .with_min_create_revision(self.min_create_revision)
        .with_max_create_revision(self.max_create_revision);
        if let Some((target, order)) = self.sort {
            options = options.with_sort(target, order);
        }
        if self.serializable {
            options = options.with_serializable();
        }
        if self.keys_only {
            options = options.with_keys_only();
        }
        if self.count_only {
            options = options.with_count_only();
        }
        options
    }
}

impl DeleteSpec {
    fn options(&self) -> DeleteOptions {
        let options = match &self.range {
            KeyRange::Single => DeleteOptions::new(),
            KeyRange::Prefix => DeleteOptions::new().with_prefix(),
            KeyRange::FromKey => DeleteOptions::new().with_from_key(),
            KeyRange::AllKeys => DeleteOptions::new().with_all_keys(),
            KeyRange::UpTo(end) => DeleteOptions::new().with_range(end.0.clone()),
        };
        if self.prev_kv {
            options.with_prev_key()
        } else {
            options
        }
    }
}

impl CompareSpec {
    fn build(&self) -> Compare {
        let key = self.key.0.clone();
        let compare = match &self.target {
            CompareTarget::Version(v) => Compare::version(key, self.op, *v),
            CompareTarget::Create(r) => Compare::create_revision(key, self.op, *r),
            CompareTarget::Mod(r) => Compare::mod_revision(key, self.op, *r),
            CompareTarget::Value(v) => Compare::value(key, self.op, v.0.clone()),
            CompareTarget::Lease(l) => Compare::lease(key, self.op, *l),
        };
        match &self.range {
            None | Some(KeyRange::Single) => compare,
            Some(KeyRange::Prefix) => compare.with_prefix(),
            Some(KeyRange::FromKey | KeyRange::AllKeys) => compare.with_range(b"\0".to_vec()),
            Some(KeyRange::UpTo(end)) => compare.with_range(end.0.clone()),
        }
    }
}

impl TxnSpec {
    fn build(&self) -> Txn {
        let ops = |specs: &[TxnOpSpec]| specs.iter().map(TxnOpSpec::build).collect::<Vec<_>>();
        Txn::new()
            .when(
                self.compares
                    .iter()
                    .map(CompareSpec::build)
                    .collect::<Vec<_>>(),
            )
            .and_then(ops(&self.success))
            .or_else(ops(&self.failure))
    }
}

impl TxnOpSpec {
    fn build(&self) -> TxnOp {
        match self {
            TxnOpSpec::Put(p) => TxnOp::put(p.key.0.clone(), p.value.0.clone(), Some(p.options())),
            TxnOpSpec::Range(r) => TxnOp::get(r.key.0.clone(), Some(r.options())),
            TxnOpSpec::Delete(d) => TxnOp::delete(d.key.0.clone(), Some(d.options())),
            TxnOpSpec::Txn(t) => TxnOp::txn(t.build()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Responses: a mirror of the protobuf responses without the fields that legitimately differ.
// The conversions destructure every protobuf struct exhaustively, so a field added to the
// protocol fails to compile here instead of silently escaping the comparison.

#[derive(Debug, PartialEq)]
struct Kv {
    key: Bytes,
    create_revision: i64,
    mod_revision: i64,
    version: i64,
    value: Bytes,
    lease: i64,
}

#[derive(Debug, PartialEq)]
enum Response {
    Put {
        revision: Option<i64>,
        prev_kv: Option<Kv>,
    },
    Range {
        revision: Option<i64>,
        kvs: Vec<Kv>,
        more: bool,
        count: i64,
    },
    Delete {
        revision: Option<i64>,
        deleted: i64,
        prev_kvs: Vec<Kv>,
    },
    Txn {
        revision: Option<i64>,
        succeeded: bool,
        responses: Vec<Option<Response>>,
    },
    Compact {
        revision: Option<i64>,
    },
}

#[derive(Debug, PartialEq)]
enum Outcome {
    Ok(Response),
    /// A gRPC status from the server: the code (as its name) and the message.
    Status {
        code: String,
        message: String,
    },
    /// A failure that is not a gRPC status (transport, client-side).
    Client(String),
}

impl Response {
    fn revision(&self) -> Option<i64> {
        match self {
            Response::Put { revision, .. }
            | Response::Range { revision, .. }
            | Response::Delete { revision, .. }
            | Response::Txn { revision, .. }
            | Response::Compact { revision } => *revision,
        }
    }
}

/// The header's revision; cluster_id, member_id and raft_term differ between servers.
fn header_revision(header: Option<PbResponseHeader>) -> Option<i64> {
    header.map(|header| {
        let PbResponseHeader {
            cluster_id: _,
            member_id: _,
            revision,
            raft_term: _,
        } = header;
        revision
    })
}

fn kv(pb: PbKeyValue) -> Kv {
    let PbKeyValue {
        key,
        create_revision,
        mod_revision,
        version,
        value,
        lease,
    } = pb;
    Kv {
        key: Bytes(key),
        create_revision,
        mod_revision,
        version,
        value: Bytes(value),
        lease,
    }
}

fn put_response(pb: PbPutResponse) -> Response {
    let PbPutResponse { header, prev_kv } = pb;
    Response::Put {
        revision: header_revision(header),
        prev_kv: prev_kv.map(kv),
    }
}

fn range_response(pb: PbRangeResponse) -> Response {
    let PbRangeResponse {
        header,
        kvs,
        more,
        count,
    } = pb;
    Response::Range {
        revision: header_revision(header),
        kvs: kvs.into_iter().map(kv).collect(),
        more,
        count,
    }
}

fn delete_response(pb: PbDeleteResponse) -> Response {
    let PbDeleteResponse {
        header,
        deleted,
        prev_kvs,
    } = pb;
    Response::Delete {
        revision: header_revision(header),
        deleted,
        prev_kvs: prev_kvs.into_iter().map(kv).collect(),
    }
}

fn txn_response(pb: PbTxnResponse) -> Response {
    let PbTxnResponse {
        header,
        succeeded,
        responses,
    } = pb;
    Response::Txn {
        revision: header_revision(header),
        succeeded,
        responses: responses.into_iter().map(txn_op_response).collect(),
    }
}

fn txn_op_response(pb: PbResponseOp) -> Option<Response> {
    let PbResponseOp { response } = pb;
    Some(match response? {
        PbTxnOpResponse::ResponsePut(r) => put_response(r),
        PbTxnOpResponse::ResponseRange(r) => range_response(r),
        PbTxnOpResponse::ResponseDeleteRange(r) => delete_response(r),
        PbTxnOpResponse::ResponseTxn(r) => txn_response(r),
    })
}

fn compact_response(pb: PbCompactionResponse) -> Response {
    let PbCompactionResponse { header } = pb;
    Response::Compact {
        revision: header_revision(header),
    }
}

fn outcome<T>(
    result: Result<T, etcd_client::Error>,
    convert: impl FnOnce(T) -> Response,
) -> Outcome {
    match result {
        Ok(response) => Outcome::Ok(convert(response)),
        Err(etcd_client::Error::GRpcStatus(status)) => Outcome::Status {
            code: format!("{:?}", status.code()),
            message: status.message().to_string(),
        },
        Err(other) => Outcome::Client(other.to_string()),
    }
}

// ---------------------------------------------------------------------------------------------
// Sort ties. etcd sorts with Go's `sort.Sort`, which is not stable: for up to 12 results it is
// an insertion sort (ties stay in key order), beyond that the order of ties depends on Go's
// sort implementation (it changed between Go releases, hence between etcd builds), and with a
// `limit` so does which of the tied kvs make the cut. Clients cannot rely on either, so
// within a run of equal sort values the kvs are put in key order, and a run cut by the limit
// is compared by its sort values only.

/// The value a sorted Range orders by.
fn sort_value(target: SortTarget, kv: &Kv) -> (i64, &[u8]) {
    match target {
        SortTarget::Key => (0, &kv.key.0),
        SortTarget::Version => (kv.version, &[]),
        SortTarget::Create => (kv.create_revision, &[]),
        SortTarget::Mod => (kv.mod_revision, &[]),
        SortTarget::Value => (0, &kv.value.0),
    }
}

/// Keeps only what a tie cut by the limit determines: the sort value.
fn tie_placeholder(target: SortTarget, kv: &Kv) -> Kv {
    let keep = |field_target, value| if target == field_target { value } else { 0 };
    Kv {
        key: Bytes(b"(tie cut by the limit)".to_vec()),
        create_revision: keep(SortTarget::Create, kv.create_revision),
        mod_revision: keep(SortTarget::Mod, kv.mod_revision),
        version: keep(SortTarget::Version, kv.version),
        value: Bytes(if target == SortTarget::Value {
            kv.value.0.clone()
        } else {
            Vec::new()
        }),
        lease: 0,
    }
}

fn canonical_ties(spec: &RangeSpec, response: &mut Response) {
    // Keys are unique, so a sort by key has no ties.
    let Some((target, _)) = spec.sort.filter(|(target, _)| *target != SortTarget::Key) else {
        return;
    };
    let Response::Range { kvs, more, .. } = response else {
        return;
    };
    let mut start = 0;
    while start < kvs.len() {
        let value = sort_value(target, &kvs[start]);
        let run = kvs[start..]
            .iter()
            .take_while(|kv| sort_value(target, kv) == value)
            .count();
        let end = start + run;
        if *more && end == kvs.len() {
            let placeholders: Vec<Kv> = kvs[start..]
                .iter()
                .map(|kv| tie_placeholder(target, kv))
                .collect();
            kvs.splice(start.., placeholders);
        } else {
            kvs[start..end].sort_by(|a, b| a.key.0.cmp(&b.key.0));
        }
        start = end;
    }
}

fn canonical_txn_ties(spec: &TxnSpec, response: &mut Response) {
    let Response::Txn {
        succeeded,
        responses,
        ..
    } = response
    else {
        return;
    };
    let ops = if *succeeded {
        &spec.success
    } else {
        &spec.failure
    };
    for (op, response) in ops.iter().zip(responses.iter_mut()) {
        match (op, response) {
            (TxnOpSpec::Range(spec), Some(response)) => canonical_ties(spec, response),
            (TxnOpSpec::Txn(spec), Some(response)) => canonical_txn_ties(spec, response),
            _ => {}
        }
    }
}

fn canonical_outcome(request: &Request, outcome: &mut Outcome) {
    let Outcome::Ok(response) = outcome else {
        return;
    };
    match request {
        Request::Range(spec) => canonical_ties(spec, response),
        Request::Txn(spec) => canonical_txn_ties(spec, response),
        _ => {}
    }
}

/// Sends one request and returns its normalised outcome.
async fn execute(kv: &mut KvClient, request: &Request) -> Outcome {
    let mut outcome = send(kv, request).await;
    canonical_outcome(request, &mut outcome);
    outcome
}

async fn send(kv: &mut KvClient, request: &Request) -> Outcome {
    match request {
        Request::Put(p) => outcome(
            kv.put(p.key.0.clone(), p.value.0.clone(), Some(p.options()))
                .await,
            |r| put_response(r.0),
        ),
        Request::Range(r) => outcome(kv.get(r.key.0.clone(), Some(r.options())).await, |r| {
            range_response(r.0)
        }),
        Request::Delete(d) => outcome(kv.delete(d.key.0.clone(), Some(d.options())).await, |r| {
            delete_response(r.0)
        }),
        Request::Txn(t) => outcome(kv.txn(t.build()).await, |r| txn_response(r.0)),
        Request::Compact { revision, physical } => {
            let options = if *physical {
                CompactionOptions::new().with_physical()
            } else {
                CompactionOptions::new()
            };
            outcome(kv.compact(*revision, Some(options)).await, |r| {
                compact_response(r.0)
            })
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The generator: seeded, driven by what the reference answered so far (its revision and
// compaction point), so revisions can be picked current, historical, compacted or future.

struct Generator {
    rng: StdRng,
    /// Highest header revision the reference reported.
    revision: i64,
    /// Revision of the last successful compaction (0: none).
    compacted: i64,
    /// Recently written small values, for VALUE compares that can match.
    values: VecDeque<Bytes>,
}

impl Generator {
    fn new(seed: u64) -> Generator {
        Generator {
            rng: StdRng::seed_from_u64(seed),
            revision: 1,
            compacted: 0,
            values: VecDeque::new(),
        }
    }

    /// Learns the revision and compaction point from the reference's answer.
    fn observe(&mut self, request: &Request, reference: &Outcome) {
        let Outcome::Ok(response) = reference else {
            return;
        };
        if let Some(revision) = response.revision() {
            self.revision = self.revision.max(revision);
        }
        if let Request::Compact { revision, .. } = request {
            self.compacted = *revision;
        }
    }

    fn request(&mut self) -> Request {
        match self.rng.gen_range(0..100) {
            0..=34 => Request::Put(self.put()),
            35..=64 => Request::Range(self.range()),
            65..=76 => Request::Delete(self.delete()),
            77..=96 => Request::Txn(self.txn(0)),
            _ => self.compact(),
        }
    }

    fn key(&mut self) -> Bytes {
        Bytes(KEYS.choose(&mut self.rng).expect("keys").to_vec())
    }

    /// Mostly a key of the key space; rarely the empty key, which etcd rejects.
    fn key_or_empty(&mut self) -> Bytes {
        if self.rng.gen_bool(0.02) {
            Bytes(Vec::new())
        } else {
            self.key()
        }
    }

    fn value(&mut self) -> Bytes {
        let len = match self.rng.gen_range(0..100) {
            0..=9 => 0,
            10..=11 => self
                .rng
                .gen_range(LARGE_VALUE_BYTES * 9 / 10..LARGE_VALUE_BYTES * 11 / 10),
            _ => self.rng.gen_range(1..=16),
        };
        let mut value = vec![0u8; len];
        self.rng.fill_bytes(&mut value);
        let value = Bytes(value);
        if len <= SHOWN_BYTES {
            if self.values.len() == VALUE_POOL_LEN {
                self.values.pop_front();
            }
            self.values.push_back(value.clone());
        }
        value
    }

    /// A value for a compare: usually one that was written, so EQUAL can succeed.
    fn compare_value(&mut self) -> Bytes {
        match self.values.iter().collect::<Vec<_>>().choose(&mut self.rng) {
            Some(value) if self.rng.gen_bool(0.8) => (*value).clone(),
            _ => Bytes(b"no-such-value".to_vec()),
        }
    }

    fn put(&mut self) -> PutSpec {
        let key = self.key_or_empty();
        let ignore_value = self.rng.gen_bool(0.05);
        // With ignore_value etcd requires an empty value; rarely break that rule on purpose.
        let value = if ignore_value && self.rng.gen_bool(0.8) {
            Bytes(Vec::new())
        } else {
            self.value()
        };
        PutSpec {
            key,
            value,
            // Leases are not granted by these tests, so any lease id is "not found".
            lease: if self.rng.gen_bool(0.03) {
                self.rng.gen_range(1..1000)
            } else {
                0
            },
            prev_kv: self.rng.gen_bool(0.5),
            ignore_value,
            ignore_lease: self.rng.gen_bool(0.05),
        }
    }

    fn key_range(&mut self) -> KeyRange {
        match self.rng.gen_range(0..100) {
            0..=29 => KeyRange::Single,
            30..=49 => KeyRange::Prefix,
            50..=64 => KeyRange::FromKey,
            65..=74 => KeyRange::AllKeys,
            _ => KeyRange::UpTo(self.key()),
        }
    }

    /// A read revision: mostly current (0), else historical (maybe compacted), future, or
    /// negative (which etcd treats as current).
    fn read_revision(&mut self) -> i64 {
        match self.rng.gen_range(0..100) {
            0..=59 => 0,
            60..=89 => self
                .rng
                .gen_range((self.compacted - 2).max(1)..=self.revision),
            90..=96 => self.revision + self.rng.gen_range(1..=3),
            _ => -1,
        }
    }

    /// A read revision for a range inside a txn: current or still readable. etcd 3.4 answers
    /// a writing txn whose range names a future or compacted revision with an error, yet
    /// persists the txn's writes (they appear after a restart); ferrocd rejects such a txn
    /// whole, so the two cannot be compared there. Top-level ranges cover those errors.
    fn txn_read_revision(&mut self) -> i64 {
        match self.rng.gen_range(0..100) {
            0..=69 => 0,
            _ => self.rng.gen_range(self.compacted.max(1)..=self.revision),
        }
    }

    /// A revision bound for min/max filters: usually unset (0).
    fn revision_filter(&mut self) -> i64 {
        if self.rng.gen_bool(0.1) {
            self.rng.gen_range(0..=self.revision + 1)
        } else {
            0
        }
    }

    fn sort(&mut self) -> Option<(SortTarget, SortOrder)> {
        if !self.rng.gen_bool(0.3) {
            return None;
        }
        let targets = [
            SortTarget::Key,
            SortTarget::Version,
            SortTarget::Create,
            SortTarget::Mod,
            SortTarget::Value,
        ];
        let orders = [SortOrder::None, SortOrder::Ascend, SortOrder::Descend];
        Some((
            *targets.choose(&mut self.rng).expect("targets"),
            *orders.choose(&mut self.rng).expect("orders"),
        ))
    }

    fn range(&mut self) -> RangeSpec {
        RangeSpec {
            key: self.key_or_empty(),
            range: self.key_range(),
            limit: match self.rng.gen_range(0..100) {
                0..=59 => 0,
                60..=97 => self.rng.gen_range(1..=5),
                _ => -1,
            },
            revision: self.read_revision(),
            sort: self.sort(),
            serializable: self.rng.gen_bool(0.2),
            keys_only: self.rng.gen_bool(0.15),
            count_only: self.rng.gen_bool(0.1),
            min_mod_revision: self.revision_filter(),
            max_mod_revision: self.revision_filter(),
            min_create_revision: self.revision_filter(),
            max_create_revision: self.revision_filter(),
        }
    }

    fn delete(&mut self) -> DeleteSpec {
        let range = match self.rng.gen_range(0..100) {
            0..=49 => KeyRange::Single,
            50..=69 => KeyRange::Prefix,
            70..=74 => KeyRange::FromKey,
            75..=77 => KeyRange::AllKeys,
            _ => KeyRange::UpTo(self.key()),
        };
        DeleteSpec {
            key: self.key_or_empty(),
            range,
            prev_kv: self.rng.gen_bool(0.5),
        }
    }

    fn compare(&mut self) -> CompareSpec {
        let ops = [
            CompareOp::Equal,
            CompareOp::Greater,
            CompareOp::Less,
            CompareOp::NotEqual,
        ];
        let op = *ops.choose(&mut self.rng).expect("ops");
        let target = match self.rng.gen_range(0..5) {
            0 => CompareTarget::Version(self.rng.gen_range(0..=3)),
            1 => CompareTarget::Create(self.rng.gen_range(0..=self.revision + 1)),
            2 => CompareTarget::Mod(self.rng.gen_range(0..=self.revision + 1)),
            3 => CompareTarget::Value(self.compare_value()),
            _ => CompareTarget::Lease(self.rng.gen_range(0..=1)),
        };
        let range = match self.rng.gen_range(0..100) {
            0..=69 => None,
            70..=84 => Some(KeyRange::Prefix),
            85..=89 => Some(KeyRange::FromKey),
            _ => Some(KeyRange::UpTo(self.key())),
        };
        CompareSpec {
            key: self.key(),
            range,
            op,
            target,
        }
    }

    fn txn(&mut self, depth: usize) -> TxnSpec {
        if depth == 0 && self.rng.gen_bool(0.01) {
            return self.oversized_txn();
        }
        let compares = (0..self.rng.gen_range(0..=3))
            .map(|_| self.compare())
            .collect();
        let success = (0..self.rng.gen_range(0..=4))
            .map(|_| self.txn_op(depth))
            .collect();
        let failure = (0..self.rng.gen_range(0..=3))
            .map(|_| self.txn_op(depth))
            .collect();
        TxnSpec {
            compares,
            success,
            failure,
        }
    }

    /// More operations than etcd's `--max-txn-ops` allows.
    fn oversized_txn(&mut self) -> TxnSpec {
        let success = (0..=MAX_TXN_OPS)
            .map(|_| {
                TxnOpSpec::Range(RangeSpec {
                    range: KeyRange::Single,
                    ..self.range()
                })
            })
            .collect();
        TxnSpec {
            compares: Vec::new(),
            success,
            failure: Vec::new(),
        }
    }

    fn txn_op(&mut self, depth: usize) -> TxnOpSpec {
        match self.rng.gen_range(0..100) {
            0..=39 => TxnOpSpec::Put(self.put()),
            40..=69 => TxnOpSpec::Range(RangeSpec {
                revision: self.txn_read_revision(),
                ..self.range()
            }),
            // Wide deletes would collide with most puts of the same txn, so keep them narrow.
            70..=89 => TxnOpSpec::Delete(DeleteSpec {
                range: KeyRange::Single,
                ..self.delete()
            }),
            _ if depth < MAX_TXN_DEPTH => TxnOpSpec::Txn(self.txn(depth + 1)),
            _ => TxnOpSpec::Range(self.range()),
        }
    }

    /// Sometimes below the compaction point or beyond the head, both errors in etcd.
    fn compact(&mut self) -> Request {
        Request::Compact {
            revision: self
                .rng
                .gen_range(self.compacted.max(1)..=self.revision + 1),
            physical: self.rng.gen_bool(0.5),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The runner.

/// The reference etcd and the server under test, with a KV client for each.
struct Pair {
    reference: Server,
    subject: Server,
    reference_kv: KvClient,
    subject_kv: KvClient,
}

impl Pair {
    async fn start() -> Pair {
        let (reference, subject) = tokio::join!(Server::etcd(), Server::subject(&[]));
        let reference_kv = reference.kv_client().await;
        let subject_kv = subject.kv_client().await;
        Pair {
            reference,
            subject,
            reference_kv,
            subject_kv,
        }
    }

    /// Sends the request to the reference, then to the subject, and fails on any difference.
    async fn check(&mut self, context: &str, request: &Request) -> Outcome {
        let expected = execute(&mut self.reference_kv, request).await;
        if let Outcome::Client(error) = &expected {
            panic!(
                "{context}: the reference etcd failed outside gRPC: {error}\nrequest: {request:#?}"
            );
        }
        let actual = execute(&mut self.subject_kv, request).await;
        assert!(
            expected == actual,
            "{context}: responses differ\nrequest: {request:#?}\nreference etcd: {expected:#?}\n{:?}: {actual:#?}",
            self.subject.flavor()
        );
        expected
    }

    /// Restarts both servers on their data dirs, gracefully or by SIGKILL.
    async fn restart(&mut self, crash: bool) {
        if crash {
            tokio::join!(self.reference.crash_restart(), self.subject.crash_restart());
        } else {
            tokio::join!(self.reference.restart(), self.subject.restart());
        }
        self.reference_kv = self.reference.kv_client().await;
        self.subject_kv = self.subject.kv_client().await;
    }
}

/// Counts outcomes by kind (errors by message), to show that a run exercised what it claims.
#[derive(Default, Debug)]
struct Coverage(BTreeMap<String, usize>);

impl Coverage {
    fn record(&mut self, outcome: &Outcome) {
        let kind = match outcome {
            Outcome::Ok(Response::Put { .. }) => "put",
            Outcome::Ok(Response::Range { kvs, .. }) if kvs.is_empty() => "range-empty",
            Outcome::Ok(Response::Range { .. }) => "range-kvs",
            Outcome::Ok(Response::Delete { deleted: 0, .. }) => "delete-none",
            Outcome::Ok(Response::Delete { .. }) => "delete-some",
            Outcome::Ok(Response::Txn {
                succeeded: true, ..
            }) => "txn-success",
            Outcome::Ok(Response::Txn { .. }) => "txn-failure",
            Outcome::Ok(Response::Compact { .. }) => "compact",
            Outcome::Status { message, .. } => message,
            Outcome::Client(_) => "client-error",
        };
        *self.0.entry(kind.to_string()).or_default() += 1;
    }

    /// Each kind is an outcome name of `record` or an error message.
    fn assert_covers(&self, kinds: &[&str]) {
        for kind in kinds {
            assert!(
                self.0.contains_key(*kind),
                "run never produced {kind}: {self:#?}"
            );
        }
    }
}

fn ops_from_env() -> usize {
    std::env::var(OPS_ENV).map_or(DEFAULT_OPS, |ops| {
        ops.parse()
            .unwrap_or_else(|_| panic!("{OPS_ENV} must be a number, got {ops:?}"))
    })
}

/// Runs `ops` generated requests against both servers, comparing every response.
async fn run_ops(pair: &mut Pair, generator: &mut Generator, seed: u64, ops: usize) -> Coverage {
    let mut coverage = Coverage::default();
    for index in 0..ops {
        let request = generator.request();
        let context = format!("seed {seed} (rerun with {SEED_ENV}={seed}), op {index}");
        let outcome = pair.check(&context, &request).await;
        generator.observe(&request, &outcome);
        coverage.record(&outcome);
    }
    coverage
}

async fn run_seed(seed: u64) {
    let mut pair = Pair::start().await;
    let mut generator = Generator::new(seed);
    let coverage = run_ops(&mut pair, &mut generator, seed, ops_from_env()).await;
    println!("seed {seed}: {coverage:?}");
    coverage.assert_covers(&[
        "put",
        "range-kvs",
        "range-empty",
        "delete-some",
        "txn-success",
        "txn-failure",
        "compact",
        "etcdserver: mvcc: required revision has been compacted",
        "etcdserver: mvcc: required revision is a future revision",
        "etcdserver: duplicate key given in txn request",
    ]);
}

#[tokio::test]
async fn seed_1() {
    run_seed(1).await;
}

#[tokio::test]
async fn seed_2() {
    run_seed(2).await;
}

#[tokio::test]
async fn seed_3() {
    run_seed(3).await;
}

#[tokio::test]
async fn seed_4() {
    run_seed(4).await;
}

/// The comparison itself must catch a difference: here the subject holds one extra key.
#[tokio::test]
#[should_panic(expected = "responses differ")]
async fn a_divergence_is_detected() {
    let mut pair = Pair::start().await;
    let extra = put(b"only-on-the-subject", b"v");
    let subject_put = send(&mut pair.subject_kv, &Request::Put(extra)).await;
    assert!(matches!(subject_put, Outcome::Ok(_)), "{subject_put:?}");
    pair.check(
        "divergence",
        &Request::Range(get(b"only-on-the-subject", 0)),
    )
    .await;
}

/// `FERROCD_DIFF_SEED` (default: from the clock, printed) for exploring new sequences.
#[tokio::test]
#[ignore = "explores a new seed each run; set FERROCD_DIFF_SEED to reproduce one"]
async fn explore() {
    let seed = std::env::var(SEED_ENV).map_or_else(
        |_| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock after 1970")
                .as_nanos() as u64
        },
        |seed| {
            seed.parse()
                .unwrap_or_else(|_| panic!("{SEED_ENV} must be a u64, got {seed:?}"))
        },
    );
    println!("exploring seed {seed}");
    run_seed(seed).await;
}

// ---------------------------------------------------------------------------------------------
// Fixed cases: every error etcd defines for the KV API, whatever the random runs hit.

fn put(key: &[u8], value: &[u8]) -> PutSpec {
    PutSpec {
        key: Bytes(key.to_vec()),
        value: Bytes(value.to_vec()),
        lease: 0,
        prev_kv: false,
        ignore_value: false,
        ignore_lease: false,
    }
}

fn get(key: &[u8], revision: i64) -> RangeSpec {
    RangeSpec {
        key: Bytes(key.to_vec()),
        range: KeyRange::Single,
        limit: 0,
        revision,
        sort: None,
        serializable: false,
        keys_only: false,
        count_only: false,
        min_mod_revision: 0,
        max_mod_revision: 0,
        min_create_revision: 0,
        max_create_revision: 0,
    }
}

fn txn_of(success: Vec<TxnOpSpec>) -> Request {
    Request::Txn(TxnSpec {
        compares: Vec::new(),
        success,
        failure: Vec::new(),
    })
}

/// Each request with the error etcd answers; the subject must answer the same.
fn error_cases() -> Vec<(Request, &'static str)> {
    let write_pair = |first: TxnOpSpec, second: TxnOpSpec| txn_of(vec![first, second]);
    vec![
        (
            Request::Put(put(b"", b"v")),
            "etcdserver: key is not provided",
        ),
        (
            Request::Range(get(b"", 0)),
            "etcdserver: key is not provided",
        ),
        (
            Request::Put(PutSpec {
                lease: 42,
                ..put(b"a", b"v")
            }),
            "etcdserver: requested lease not found",
        ),
        (
            Request::Put(PutSpec {
                ignore_value: true,
                ..put(b"missing", b"")
            }),
            "etcdserver: key not found",
        ),
        (
            Request::Put(PutSpec {
                ignore_value: true,
                ..put(b"a", b"v")
            }),
            "etcdserver: value is provided",
        ),
        (
            Request::Put(PutSpec {
                ignore_lease: true,
                lease: 7,
                ..put(b"a", b"v")
            }),
            "etcdserver: lease is provided",
        ),
        (
            Request::Put(put(b"big", &vec![b'x'; TOO_LARGE_VALUE_BYTES])),
            "etcdserver: request is too large",
        ),
        (
            txn_of(
                (0..=MAX_TXN_OPS)
                    .map(|_| TxnOpSpec::Range(get(b"a", 0)))
                    .collect(),
            ),
            "etcdserver: too many operations in txn request",
        ),
        (
            write_pair(
                TxnOpSpec::Put(put(b"a", b"1")),
                TxnOpSpec::Put(put(b"a", b"2")),
            ),
            "etcdserver: duplicate key given in txn request",
        ),
        (
            write_pair(
                TxnOpSpec::Put(put(b"a/1", b"1")),
                TxnOpSpec::Delete(DeleteSpec {
                    key: Bytes(b"a/".to_vec()),
                    range: KeyRange::Prefix,
                    prev_kv: false,
                }),
            ),
            "etcdserver: duplicate key given in txn request",
        ),
        (
            Request::Range(get(b"a", 1_000)),
            "etcdserver: mvcc: required revision is a future revision",
        ),
        (
            Request::Range(get(b"a", 2)),
            "etcdserver: mvcc: required revision has been compacted",
        ),
        (
            Request::Compact {
                revision: 1_000,
                physical: false,
            },
            "etcdserver: mvcc: required revision is a future revision",
        ),
        (
            Request::Compact {
                revision: 2,
                physical: true,
            },
            "etcdserver: mvcc: required revision has been compacted",
        ),
    ]
}

#[tokio::test]
async fn error_cases_match() {
    let mut pair = Pair::start().await;
    // Revisions 2..=5, then compact at 4 so that revision 2 is compacted.
    let setup = [
        Request::Put(put(b"a", b"1")),
        Request::Put(put(b"a", b"2")),
        Request::Put(put(b"b", b"1")),
        Request::Put(put(b"a", b"3")),
        Request::Compact {
            revision: 4,
            physical: true,
        },
    ];
    for (index, request) in setup.iter().enumerate() {
        let outcome = pair.check(&format!("setup {index}"), request).await;
        assert!(
            matches!(outcome, Outcome::Ok(_)),
            "setup {index}: {outcome:?}"
        );
    }
    for (index, (request, message)) in error_cases().iter().enumerate() {
        let outcome = pair.check(&format!("error case {index}"), request).await;
        // The reference must really produce the error, or this case tests nothing.
        assert!(
            matches!(&outcome, Outcome::Status { message: m, .. } if m == message),
            "error case {index}: etcd answered {outcome:?}, expected {message:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Restarts: the state after a restart (graceful or kill -9) must match, history included,
// and the servers must carry on from the same revision.

/// Every revision from the compaction point to the head: what each revision changed
/// (min = max mod revision) and which keys existed, plus a full read at the head.
async fn compare_full_history(pair: &mut Pair, generator: &Generator, context: &str) {
    let all_keys = |revision| RangeSpec {
        key: Bytes(b"\0".to_vec()),
        range: KeyRange::AllKeys,
        ..get(b"", revision)
    };
    let head = pair
        .check(
            &format!("{context}: full read"),
            &Request::Range(all_keys(0)),
        )
        .await;
    assert!(
        matches!(head, Outcome::Ok(_)),
        "{context}: full read failed: {head:?}"
    );
    for revision in generator.compacted.max(1)..=generator.revision {
        let changed = RangeSpec {
            min_mod_revision: revision,
            max_mod_revision: revision,
            ..all_keys(revision)
        };
        let existing = RangeSpec {
            keys_only: true,
            ..all_keys(revision)
        };
        for spec in [changed, existing] {
            pair.check(
                &format!("{context}: history at {revision}"),
                &Request::Range(spec),
            )
            .await;
        }
    }
}

async fn run_restart(seed: u64, crash: bool) {
    let mut pair = Pair::start().await;
    let mut generator = Generator::new(seed);
    let ops = ops_from_env() / 2;
    run_ops(&mut pair, &mut generator, seed, ops).await;
    pair.restart(crash).await;
    compare_full_history(&mut pair, &generator, &format!("seed {seed} after restart")).await;
    // The revision counter and compaction point must carry on identically.
    let coverage = run_ops(&mut pair, &mut generator, seed, ops).await;
    coverage.assert_covers(&["put"]);
    compare_full_history(&mut pair, &generator, &format!("seed {seed} at the end")).await;
}

#[tokio::test]
async fn graceful_restart_keeps_state() {
    run_restart(11, false).await;
}

#[tokio::test]
async fn kill9_restart_keeps_acknowledged_state() {
    run_restart(12, true).await;
}

// ---------------------------------------------------------------------------------------------
// The tie relaxation itself: it may reorder ties and hide a cut run, nothing else.

fn kv_with_version(key: &[u8], version: i64) -> Kv {
    Kv {
        key: Bytes(key.to_vec()),
        create_revision: 2,
        mod_revision: 3,
        version,
        value: Bytes(b"v".to_vec()),
        lease: 0,
    }
}

fn sorted_by_version(kvs: Vec<Kv>, more: bool) -> Response {
    let spec = RangeSpec {
        sort: Some((SortTarget::Version, SortOrder::Descend)),
        ..get(b"a", 0)
    };
    let mut response = Response::Range {
        revision: Some(9),
        count: 4,
        kvs,
        more,
    };
    canonical_ties(&spec, &mut response);
    response
}

#[test]
fn ties_are_compared_in_key_order() {
    let etcd_order = vec![
        kv_with_version(b"c", 2),
        kv_with_version(b"b", 2),
        kv_with_version(b"a", 1),
    ];
    let stable_order = vec![
        kv_with_version(b"b", 2),
        kv_with_version(b"c", 2),
        kv_with_version(b"a", 1),
    ];
    assert_eq!(
        sorted_by_version(etcd_order, false),
        sorted_by_version(stable_order, false)
    );
    // A different version is a real difference.
    assert_ne!(
        sorted_by_version(
            vec![kv_with_version(b"b", 2), kv_with_version(b"c", 1)],
            false
        ),
        sorted_by_version(
            vec![kv_with_version(b"b", 1), kv_with_version(b"c", 2)],
            false
        )
    );
}

#[test]
fn a_tie_cut_by_the_limit_is_compared_by_sort_value() {
    let one_cut = vec![kv_with_version(b"a", 3), kv_with_version(b"b", 2)];
    let other_cut = vec![kv_with_version(b"a", 3), kv_with_version(b"c", 2)];
    assert_eq!(
        sorted_by_version(one_cut, true),
        sorted_by_version(other_cut, true)
    );
    // Runs before the last one keep their identity.
    let first_differs = vec![kv_with_version(b"z", 3), kv_with_version(b"c", 2)];
    assert_ne!(
        sorted_by_version(first_differs, true),
        sorted_by_version(
            vec![kv_with_version(b"a", 3), kv_with_version(b"c", 2)],
            true
        )
    );
}
