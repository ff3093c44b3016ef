//! Every RPC and every gateway path of a running server under garbage input (issue 8): a
//! bounded, seeded random run against a real server process.
//!
//! For each gRPC method of every service (unary and streaming) the test sends, over a raw
//! HTTP/2 connection (the `h2` crate, so that malformed bodies can be sent at all):
//! - random bytes as the message body;
//! - a random but well-formed protobuf message of the method's request type, built from a
//!   schema table of its fields (huge and negative numbers, empty and huge keys, invalid UTF-8
//!   in string fields, out-of-range enums, nested txns, unknown fields);
//! - a wrong gRPC frame: bad length prefix, compressed flag without or with an unsupported
//!   `grpc-encoding`, reserved flag bits, no message, two messages to a unary method.
//!
//! Every call must end with a gRPC status within `CALL_TIMEOUT_MS` (streaming methods may
//! instead answer a first message), the status must be a sensible one (see `check_status`),
//! and afterwards the server must still run and answer a put/get round trip.
//!
//! The HTTP/JSON gateway has its own run, tests/gateway_fuzz.rs.
//!
//! `FERROCD_RPC_FUZZ_SEED` replays a run (the seed is printed on failure);
//! `FERROCD_RPC_FUZZ_CALLS` sets the calls per method and class (soak runs).
//! `FERROCD_TEST_SERVER=etcd` runs the same checks against a real etcd, which validates them.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use common::Server;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::net::TcpStream;

const SEED_ENV: &str = "FERROCD_RPC_FUZZ_SEED";
const CALLS_ENV: &str = "FERROCD_RPC_FUZZ_CALLS";
/// Calls per method and input class in a default (CI) run.
const DEFAULT_CALLS_PER_CLASS: usize = 50;
/// A call that has not ended by then is a hang.
const CALL_TIMEOUT_MS: u64 = 5_000;
/// Methods that may legitimately wait (a held lock, an election with a leader, a watch that
/// was asked for nothing) get this long before a well-formed call counts as pending.
const BLOCKING_CALL_WAIT_MS: u64 = 100;
/// Nested txns stop here; etcd itself bounds nesting only by the request size.
const MAX_MESSAGE_DEPTH: usize = 3;
/// Ops in one txn list, now and then above `--max-txn-ops` (etcd's default 128).
const MAX_TXN_OPS: usize = 130;
/// Size of the largest generated key or value, above etcd's 1.5 MiB request limit.
const HUGE_BYTES: usize = 2 * 1024 * 1024;

/// Wire kinds of the request fields, as far as a generator needs to know them.
#[derive(Clone, Copy)]
enum Kind {
    Int,
    Bool,
    /// An enum with this many defined values.
    Enum(u64),
    Bytes,
    /// A proto3 `string`: must be UTF-8, so invalid UTF-8 is a decode error.
    Str,
    Msg(&'static [Field]),
}

struct Field {
    number: u32,
    kind: Kind,
    repeated: bool,
}

const fn one(number: u32, kind: Kind) -> Field {
    Field {
        number,
        kind,
        repeated: false,
    }
}

const fn many(number: u32, kind: Kind) -> Field {
    Field {
        number,
        kind,
        repeated: true,
    }
}

use Kind::{Bool, Bytes as Bin, Enum, Int, Msg, Str};

// The request messages of api/proto, field by field.
static EMPTY: [Field; 0] = [];
static RANGE: [Field; 13] = [
    one(1, Bin),
    one(2, Bin),
    one(3, Int),
    one(4, Int),
    one(5, Enum(3)),
    one(6, Enum(5)),
    one(7, Bool),
    one(8, Bool),
    one(9, Bool),
    one(10, Int),
    one(11, Int),
    one(12, Int),
    one(13, Int),
];
static PUT: [Field; 6] = [
    one(1, Bin),
    one(2, Bin),
    one(3, Int),
    one(4, Bool),
    one(5, Bool),
    one(6, Bool),
];
static DELETE_RANGE: [Field; 3] = [one(1, Bin), one(2, Bin), one(3, Bool)];
static COMPARE: [Field; 9] = [
    one(1, Enum(4)),
    one(2, Enum(5)),
    one(3, Bin),
    one(4, Int),
    one(5, Int),
    one(6, Int),
    one(7, Bin),
    one(8, Int),
    one(64, Bin),
];
static REQUEST_OP: [Field; 4] = [
    one(1, Msg(&RANGE)),
    one(2, Msg(&PUT)),
    one(3, Msg(&DELETE_RANGE)),
    one(4, Msg(&TXN)),
];
static TXN: [Field; 3] = [
    many(1, Msg(&COMPARE)),
    many(2, Msg(&REQUEST_OP)),
    many(3, Msg(&REQUEST_OP)),
];
static COMPACTION: [Field; 2] = [one(1, Int), one(2, Bool)];
static WATCH_CREATE: [Field; 8] = [
    one(1, Bin),
    one(2, Bin),
    one(3, Int),
    one(4, Bool),
    many(5, Enum(2)),
    one(6, Bool),
    one(7, Int),
    one(8, Bool),
];
static WATCH: [Field; 3] = [
    one(1, Msg(&WATCH_CREATE)),
    one(2, Msg(&ID)),
    one(3, Msg(&EMPTY)),
];
static ID: [Field; 1] = [one(1, Int)];
static ID_AND_BOOL: [Field; 2] = [one(1, Int), one(2, Bool)];
static LEASE_GRANT: [Field; 2] = [one(1, Int), one(2, Int)];
static MEMBER_ADD: [Field; 2] = [many(1, Str), one(2, Bool)];
static MEMBER_UPDATE: [Field; 2] = [one(1, Int), many(2, Str)];
static BOOL: [Field; 1] = [one(1, Bool)];
static ALARM: [Field; 3] = [one(1, Enum(3)), one(2, Int), one(3, Enum(3))];
static DOWNGRADE: [Field; 2] = [one(1, Enum(3)), one(2, Str)];
static NAME: [Field; 1] = [one(1, Str)];
static NAME_PASSWORD: [Field; 2] = [one(1, Str), one(2, Str)];
static USER_ADD: [Field; 4] = [one(1, Str), one(2, Str), one(3, Msg(&BOOL)), one(4, Str)];
static CHANGE_PASSWORD: [Field; 3] = [one(1, Str), one(2, Str), one(3, Str)];
static PERMISSION: [Field; 3] = [one(1, Enum(3)), one(2, Bin), one(3, Bin)];
static ROLE_GRANT: [Field; 2] = [one(1, Str), one(2, Msg(&PERMISSION))];
static ROLE_REVOKE: [Field; 3] = [one(1, Str), one(2, Bin), one(3, Bin)];
static NAME_LEASE: [Field; 2] = [one(1, Bin), one(2, Int)];
static KEY: [Field; 1] = [one(1, Bin)];
static CAMPAIGN: [Field; 3] = [one(1, Bin), one(2, Int), one(3, Bin)];
static LEADER_KEY: [Field; 4] = [one(1, Bin), one(2, Bin), one(3, Int), one(4, Int)];
static RESIGN: [Field; 1] = [one(1, Msg(&LEADER_KEY))];
static PROCLAIM: [Field; 2] = [one(1, Msg(&LEADER_KEY)), one(2, Bin)];

/// One gRPC method: its path, request schema, and how its answers may look.
struct Method {
    path: &'static str,
    request: &'static [Field],
    /// The response is a stream: a first message ends the call as well as a status.
    streaming: bool,
    /// A well-formed request may wait indefinitely, as it does on etcd.
    may_block: bool,
}

const fn unary(path: &'static str, request: &'static [Field]) -> Method {
    Method {
        path,
        request,
        streaming: false,
        may_block: false,
    }
}

const fn stream(path: &'static str, request: &'static [Field], may_block: bool) -> Method {
    Method {
        path,
        request,
        streaming: true,
        may_block,
    }
}

const fn blocking(path: &'static str, request: &'static [Field]) -> Method {
    Method {
        path,
        request,
        streaming: false,
        may_block: true,
    }
}

/// Every method of every service in api/proto.
static METHODS: &[Method] = &[
    unary("/etcdserverpb.KV/Range", &RANGE),
    unary("/etcdserverpb.KV/Put", &PUT),
    unary("/etcdserverpb.KV/DeleteRange", &DELETE_RANGE),
    unary("/etcdserverpb.KV/Txn", &TXN),
    unary("/etcdserverpb.KV/Compact", &COMPACTION),
    stream("/etcdserverpb.Watch/Watch", &WATCH, true),
    unary("/etcdserverpb.Lease/LeaseGrant", &LEASE_GRANT),
    unary("/etcdserverpb.Lease/LeaseRevoke", &ID),
    stream("/etcdserverpb.Lease/LeaseKeepAlive", &ID, false),
    unary("/etcdserverpb.Lease/LeaseTimeToLive", &ID_AND_BOOL),
    unary("/etcdserverpb.Lease/LeaseLeases", &EMPTY),
    unary("/etcdserverpb.Cluster/MemberAdd", &MEMBER_ADD),
    unary("/etcdserverpb.Cluster/MemberRemove", &ID),
    unary("/etcdserverpb.Cluster/MemberUpdate", &MEMBER_UPDATE),
    unary("/etcdserverpb.Cluster/MemberList", &BOOL),
    unary("/etcdserverpb.Cluster/MemberPromote", &ID),
    unary("/etcdserverpb.Maintenance/Alarm", &ALARM),
    unary("/etcdserverpb.Maintenance/Status", &EMPTY),
    unary("/etcdserverpb.Maintenance/Defragment", &EMPTY),
    unary("/etcdserverpb.Maintenance/Hash", &EMPTY),
    unary("/etcdserverpb.Maintenance/HashKV", &ID),
    stream("/etcdserverpb.Maintenance/Snapshot", &EMPTY, false),
    unary("/etcdserverpb.Maintenance/MoveLeader", &ID),
    unary("/etcdserverpb.Maintenance/Downgrade", &DOWNGRADE),
    unary("/etcdserverpb.Auth/AuthEnable", &EMPTY),
    unary("/etcdserverpb.Auth/AuthDisable", &EMPTY),
    unary("/etcdserverpb.Auth/AuthStatus", &EMPTY),
    unary("/etcdserverpb.Auth/Authenticate", &NAME_PASSWORD),
    unary("/etcdserverpb.Auth/UserAdd", &USER_ADD),
    unary("/etcdserverpb.Auth/UserGet", &NAME),
    unary("/etcdserverpb.Auth/UserList", &EMPTY),
    unary("/etcdserverpb.Auth/UserDelete", &NAME),
    unary("/etcdserverpb.Auth/UserChangePassword", &CHANGE_PASSWORD),
    unary("/etcdserverpb.Auth/UserGrantRole", &NAME_PASSWORD),
    unary("/etcdserverpb.Auth/UserRevokeRole", &NAME_PASSWORD),
    unary("/etcdserverpb.Auth/RoleAdd", &NAME),
    unary("/etcdserverpb.Auth/RoleGet", &NAME),
    unary("/etcdserverpb.Auth/RoleList", &EMPTY),
    unary("/etcdserverpb.Auth/RoleDelete", &NAME),
    unary("/etcdserverpb.Auth/RoleGrantPermission", &ROLE_GRANT),
    unary("/etcdserverpb.Auth/RoleRevokePermission", &ROLE_REVOKE),
    blocking("/v3lockpb.Lock/Lock", &NAME_LEASE),
    unary("/v3lockpb.Lock/Unlock", &KEY),
    blocking("/v3electionpb.Election/Campaign", &CAMPAIGN),
    unary("/v3electionpb.Election/Proclaim", &PROCLAIM),
    unary("/v3electionpb.Election/Leader", &KEY),
    stream("/v3electionpb.Election/Observe", &KEY, true),
    unary("/v3electionpb.Election/Resign", &RESIGN),
];

/// The three input classes of the brief.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    RandomBytes,
    WellFormed,
    BadFrame,
}

const CLASSES: [Class; 3] = [Class::RandomBytes, Class::WellFormed, Class::BadFrame];

/// Random protobuf encodings of a schema.
struct Generator {
    rng: StdRng,
}

impl Generator {
    fn message(&mut self, schema: &[Field], depth: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for field in schema {
            if !self.rng.gen_bool(0.6) {
                continue;
            }
            let count = if field.repeated {
                self.repeat_count(depth)
            } else {
                1
            };
            for _ in 0..count {
                self.field(&mut out, field, depth);
            }
        }
        if self.rng.gen_bool(0.05) {
            // An unknown field: valid protobuf that a decoder must skip.
            put_varint(&mut out, (1000 << 3) | 2);
            put_length_delimited(&mut out, b"unknown");
        }
        out
    }

    fn repeat_count(&mut self, depth: usize) -> usize {
        match self.rng.gen_range(0..20) {
            0 if depth == 0 => MAX_TXN_OPS,
            1..=4 => 0,
            _ => self.rng.gen_range(1..4),
        }
    }

    fn field(&mut self, out: &mut Vec<u8>, field: &Field, depth: usize) {
        let varint_key = u64::from(field.number) << 3;
        let bytes_key = varint_key | 2;
        match field.kind {
            Int => {
                put_varint(out, varint_key);
                put_varint(out, self.int());
            }
            Bool => {
                put_varint(out, varint_key);
                let value = if self.rng.gen_bool(0.9) {
                    self.rng.gen_range(0..2)
                } else {
                    self.int()
                };
                put_varint(out, value);
            }
            Enum(defined) => {
                put_varint(out, varint_key);
                let value = if self.rng.gen_bool(0.8) {
                    self.rng.gen_range(0..defined)
                } else {
                    self.int()
                };
                put_varint(out, value);
            }
            Bin => {
                put_varint(out, bytes_key);
                let bytes = self.bytes();
                put_length_delimited(out, &bytes);
            }
            Str => {
                put_varint(out, bytes_key);
                let text = self.text();
                put_length_delimited(out, &text);
            }
            Msg(schema) => {
                put_varint(out, bytes_key);
                let inner = if depth < MAX_MESSAGE_DEPTH {
                    self.message(schema, depth + 1)
                } else {
                    Vec::new()
                };
                put_length_delimited(out, &inner);
            }
        }
    }

    /// Revisions, ids, TTLs and limits: the edges first, then anything.
    fn int(&mut self) -> u64 {
        const EDGES: [i64; 10] = [
            0,
            1,
            -1,
            2,
            100,
            i64::MAX,
            i64::MIN,
            i32::MAX as i64,
            -100,
            1 << 40,
        ];
        match self.rng.gen_range(0..4) {
            0 | 1 => EDGES[self.rng.gen_range(0..EDGES.len())] as u64,
            2 => self.rng.gen_range(0..50),
            _ => self.rng.gen(),
        }
    }

    fn bytes(&mut self) -> Vec<u8> {
        const KEYS: [&[u8]; 6] = [b"", b"a", b"foo", b"\0", b"\xff", b"fuzz/"];
        match self.rng.gen_range(0..100) {
            0 => vec![b'h'; HUGE_BYTES],
            1..=3 => vec![b'k'; self.rng.gen_range(1..64 * 1024)],
            4..=40 => KEYS[self.rng.gen_range(0..KEYS.len())].to_vec(),
            _ => self.random_bytes(16),
        }
    }

    /// Names and passwords: mostly ASCII, sometimes invalid UTF-8, never `root` (auth stays
    /// off, so the final round trip needs no credentials).
    fn text(&mut self) -> Vec<u8> {
        match self.rng.gen_range(0..10) {
            0 => vec![0xff, 0xfe, b'x'],
            1 => Vec::new(),
            2 => b"http://127.0.0.1:1".to_vec(),
            _ => (0..self.rng.gen_range(1..12))
                .map(|_| self.rng.gen_range(b'a'..=b'z'))
                .collect(),
        }
    }

    fn random_bytes(&mut self, max_len: usize) -> Vec<u8> {
        let len = self.rng.gen_range(0..=max_len);
        (0..len).map(|_| self.rng.gen()).collect()
    }

    /// The gRPC body (and `grpc-encoding` header) of one call of `class`.
    fn body(&mut self, method: &Method, class: Class) -> Body {
        match class {
            // Random bytes often decode as a valid request.
            Class::RandomBytes => Body::valid("random bytes", frame(0, &self.random_bytes(64))),
            Class::WellFormed => {
                Body::valid("random message", frame(0, &self.message(method.request, 0)))
            }
            Class::BadFrame => self.bad_frame(method),
        }
    }

    fn bad_frame(&mut self, method: &Method) -> Body {
        let message = self.message(method.request, MAX_MESSAGE_DEPTH);
        let mut framed = frame(0, &message);
        let invalid = |shape, bytes| Body {
            bytes,
            shape,
            encoding: None,
            starts_valid: false,
        };
        match self.rng.gen_range(0..9) {
            // Length prefix larger than what follows.
            0 => {
                let claimed = message.len() as u32 + self.rng.gen_range(1..1000);
                framed[1..5].copy_from_slice(&claimed.to_be_bytes());
                Body {
                    // tonic takes a frame header with no body byte after it for the end of
                    // the stream (grpc-go says "unexpected EOF"): a watch then stays open.
                    starts_valid: message.is_empty(),
                    ..invalid("length prefix too large", framed)
                }
            }
            // A length no server accepts.
            1 => {
                framed[1..5].copy_from_slice(&u32::MAX.to_be_bytes());
                invalid("length prefix u32::MAX", framed)
            }
            // Compressed flag with no `grpc-encoding`.
            2 => invalid("compressed flag, no encoding", frame(1, &message)),
            // Compressed flag with an encoding the server does not speak.
            3 => Body {
                encoding: Some("gzip"),
                ..invalid("compressed flag, gzip", frame(1, &message))
            },
            // Reserved flag bits.
            4 => invalid(
                "reserved flag bits",
                frame(self.rng.gen_range(2..=255), &message),
            ),
            // Half a frame header.
            5 => invalid(
                "truncated frame header",
                framed[..self.rng.gen_range(1..5)].to_vec(),
            ),
            // No message at all: an empty request stream, which a watch may keep open.
            6 => Body::valid("no message", Vec::new()),
            // Trailing bytes that start a second, truncated message: the first one is valid
            // and a unary server may serve it before it reads on.
            7 => {
                framed.extend_from_slice(&[0, 0, 0]);
                Body::valid("trailing partial frame", framed)
            }
            // Two messages where the method takes one (the same holds).
            _ => {
                framed.extend_from_slice(&frame(0, &message));
                Body::valid("two messages", framed)
            }
        }
    }
}

/// One call's request body.
struct Body {
    bytes: Vec<u8>,
    /// What is wrong with it, for failure messages.
    shape: &'static str,
    encoding: Option<&'static str>,
    /// Starts with a frame that may decode as a valid request, which a blocking method may
    /// then wait on.
    starts_valid: bool,
}

impl Body {
    fn valid(shape: &'static str, bytes: Vec<u8>) -> Body {
        Body {
            bytes,
            shape,
            encoding: None,
            starts_valid: true,
        }
    }
}

fn frame(flags: u8, message: &[u8]) -> Vec<u8> {
    let len = u32::try_from(message.len()).expect("generated messages stay below 4 GiB");
    let mut out = Vec::with_capacity(5 + message.len());
    out.push(flags);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(message);
    out
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_length_delimited(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// How one call ended.
#[derive(Debug)]
enum Outcome {
    Status {
        code: i32,
        message: String,
    },
    /// A streaming method answered a first message; the stream was then reset.
    FirstMessage,
    /// A blocking method was still waiting after `BLOCKING_CALL_WAIT_MS`.
    Pending,
}

type H2Sender = h2::client::SendRequest<Bytes>;

async fn connect(endpoint: &str) -> H2Sender {
    let authority = endpoint.trim_start_matches("http://");
    let tcp = TcpStream::connect(&authority).await.expect("connect");
    let (sender, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(async move {
        // The connection's own error ends the calls on it, which report it themselves.
        let _ = connection.await;
    });
    sender
}

fn request(
    endpoint: &str,
    path: &str,
    content_type: &str,
    encoding: Option<&str>,
    token: Option<&str>,
) -> http::Request<()> {
    let mut builder = http::Request::post(format!("{endpoint}{path}"))
        .header("content-type", content_type)
        .header("te", "trailers");
    if let Some(encoding) = encoding {
        builder = builder.header("grpc-encoding", encoding);
    }
    if let Some(token) = token {
        // etcd reads the auth token from the `token` metadata.
        builder = builder.header("token", token);
    }
    builder.body(()).expect("valid request")
}

/// Sends one request on its own stream and returns the response head and body.
async fn send(
    sender: &H2Sender,
    request: http::Request<()>,
    body: Vec<u8>,
) -> Result<http::Response<h2::RecvStream>, h2::Error> {
    let mut sender = sender.clone().ready().await?;
    let (response, mut stream) = sender.send_request(request, false)?;
    stream.send_data(Bytes::from(body), true)?;
    response.await
}

fn header_status(headers: &http::HeaderMap) -> Option<Outcome> {
    let code = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    let message = headers
        .get("grpc-message")
        .map(|value| percent_decode(value.as_bytes()))
        .unwrap_or_default();
    Some(Outcome::Status { code, message })
}

async fn grpc_call(
    endpoint: &str,
    sender: &H2Sender,
    method: &Method,
    body: Vec<u8>,
    encoding: Option<&str>,
    token: Option<&str>,
) -> Result<Outcome, String> {
    let request = request(endpoint, method.path, "application/grpc", encoding, token);
    let response = send(sender, request, body)
        .await
        .map_err(|e| format!("h2: {e}"))?;
    if response.status() != http::StatusCode::OK {
        return Err(format!("HTTP status {}", response.status()));
    }
    if let Some(status) = header_status(response.headers()) {
        return Ok(status);
    }
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| format!("h2 body: {e}"))?;
        let _ = body.flow_control().release_capacity(chunk.len());
        if method.streaming && !chunk.is_empty() {
            return Ok(Outcome::FirstMessage);
        }
    }
    let trailers = body
        .trailers()
        .await
        .map_err(|e| format!("h2 trailers: {e}"))?;
    trailers
        .as_ref()
        .and_then(header_status)
        .ok_or_else(|| "stream ended without grpc-status".to_string())
}

/// `grpc-message` is percent-encoded (gRPC over HTTP/2 spec).
fn percent_decode(encoded: &[u8]) -> String {
    let mut decoded = Vec::with_capacity(encoded.len());
    let mut rest = encoded;
    while let Some((&byte, tail)) = rest.split_first() {
        let escaped = (byte == b'%' && tail.len() >= 2)
            .then(|| std::str::from_utf8(&tail[..2]).ok())
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(value) => {
                decoded.push(value);
                rest = &tail[2..];
            }
            None => {
                decoded.push(byte);
                rest = tail;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

/// Codes a server may answer to garbage; Internal only where grpc-go and tonic use it for an
/// undecodable message or frame, Unknown only with one of etcd's error messages.
fn check_status(class: Class, code: i32, message: &str) -> Result<(), String> {
    use tonic::Code;
    let code = Code::from_i32(code);
    let ok = match code {
        Code::Ok
        | Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::ResourceExhausted
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::Unimplemented
        | Code::Unauthenticated => true,
        Code::Internal => {
            is_decode_error(message) && (class != Class::WellFormed || !message.is_empty())
        }
        Code::Unknown => !message.is_empty() && !message.contains("panic"),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("status {code:?} {message:?}"))
    }
}

fn is_decode_error(message: &str) -> bool {
    let message = message.to_ascii_lowercase();
    [
        "decod",
        "unmarshal",
        "compress",
        "protocol error",
        "unexpected eof",
        "missing request",
        "message",
    ]
    .iter()
    .any(|word| message.contains(word))
}

/// Runs `calls` calls of every class against one method; returns a histogram of outcomes.
async fn fuzz_method(
    endpoint: String,
    method: &'static Method,
    seed: u64,
    calls: usize,
    token: Option<String>,
) -> Result<BTreeMap<String, usize>, String> {
    let sender = connect(&endpoint).await;
    let mut generator = Generator {
        rng: StdRng::seed_from_u64(seed),
    };
    let mut histogram = BTreeMap::new();
    for class in CLASSES {
        for call in 0..calls {
            let body = generator.body(method, class);
            let may_wait = method.may_block && body.starts_valid;
            let limit_ms = if may_wait {
                BLOCKING_CALL_WAIT_MS
            } else {
                CALL_TIMEOUT_MS
            };
            let outcome = tokio::time::timeout(
                Duration::from_millis(limit_ms),
                grpc_call(
                    &endpoint,
                    &sender,
                    method,
                    body.bytes,
                    body.encoding,
                    token.as_deref(),
                ),
            )
            .await
            .unwrap_or(if may_wait {
                Ok(Outcome::Pending)
            } else {
                Err(format!("no answer within {limit_ms} ms"))
            });
            let shape = body.shape;
            let context =
                |e: String| format!("{} {class:?} call {call} ({shape}): {e}", method.path);
            let outcome = outcome.map_err(context)?;
            let label = match &outcome {
                Outcome::Status { code, message } => {
                    check_status(class, *code, message).map_err(context)?;
                    format!("{:?}", tonic::Code::from_i32(*code))
                }
                other => format!("{other:?}"),
            };
            *histogram
                .entry(format!("{} {class:?} {label}", method.path))
                .or_insert(0) += 1;
        }
    }
    Ok(histogram)
}

fn seed() -> u64 {
    std::env::var(SEED_ENV)
        .map(|seed| seed.parse().expect("FERROCD_RPC_FUZZ_SEED is a u64"))
        .unwrap_or_else(|_| rand::random())
}

fn calls_per_class() -> usize {
    std::env::var(CALLS_ENV)
        .map(|calls| calls.parse().expect("FERROCD_RPC_FUZZ_CALLS is a count"))
        .unwrap_or(DEFAULT_CALLS_PER_CLASS)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_grpc_method_survives_garbage() {
    let seed = seed();
    let calls = calls_per_class();
    let mut server = Server::subject(&[]).await;
    let histogram = fuzz_all_methods(&server, seed, calls, None).await;
    println!("seed {seed}, {calls} calls per method and class: {histogram:#?}");
    common::assert_serves_after_fuzz(&mut server, None, seed).await;
}

/// Fuzzes every method at once, each on its own connection, with `token` on every call;
/// returns the histogram of outcomes.
async fn fuzz_all_methods(
    server: &Server,
    seed: u64,
    calls: usize,
    token: Option<&str>,
) -> BTreeMap<String, usize> {
    let mut tasks = tokio::task::JoinSet::new();
    for (index, method) in METHODS.iter().enumerate() {
        let method_seed = seed.wrapping_add(index as u64);
        let token = token.map(str::to_string);
        tasks.spawn(fuzz_method(
            server.endpoint(),
            method,
            method_seed,
            calls,
            token,
        ));
    }
    let mut histogram = BTreeMap::new();
    while let Some(result) = tasks.join_next().await {
        let method_histogram = result
            .expect("fuzz task")
            .unwrap_or_else(|e| panic!("seed {seed} ({SEED_ENV}): {e}\n{}", server.log()));
        for (label, count) in method_histogram {
            *histogram.entry(label).or_insert(0) += count;
        }
    }
    histogram
}

const ROOT: (&str, &str) = ("root", "fuzz-root-pw");
const USER: (&str, &str) = ("fuzzer", "fuzz-user-pw");
/// The normal user's role: read and write on `fuzz/` only.
const USER_ROLE: &str = "fuzz-rw";

/// Turns auth on: root, and a normal user with read-write on the prefix `fuzz/`.
async fn enable_auth(server: &Server) {
    let mut client = server.client().await;
    client
        .user_add(ROOT.0, ROOT.1, None)
        .await
        .expect("auth setup");
    client
        .user_grant_role(ROOT.0, "root")
        .await
        .expect("auth setup");
    client
        .user_add(USER.0, USER.1, None)
        .await
        .expect("auth setup");
    client.role_add(USER_ROLE).await.expect("auth setup");
    let permission = etcd_client::Permission::read_write("fuzz/").with_prefix();
    client
        .role_grant_permission(USER_ROLE, permission)
        .await
        .expect("auth setup");
    client
        .user_grant_role(USER.0, USER_ROLE)
        .await
        .expect("auth setup");
    client.auth_enable().await.expect("auth setup");
}

/// A Range of `key` with `token` (or none): the status it ends with.
async fn range_with_token(
    server: &Server,
    key: &[u8],
    token: Option<&str>,
) -> (tonic::Code, String) {
    let mut message = Vec::new();
    put_varint(&mut message, (1 << 3) | 2);
    put_length_delimited(&mut message, key);
    call_once(server, method("/etcdserverpb.KV/Range"), &message, token).await
}

/// With auth on, every method is fuzzed with a normal user's valid token, an invalid token
/// and none; the server stays up, keeps auth on, and answers etcd's auth errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_grpc_method_survives_garbage_with_auth() {
    let seed = seed();
    // A third of the calls per token kind: the three kinds together cost one plain run.
    let calls = calls_per_class().div_ceil(3);
    let mut server = Server::subject(&[]).await;
    enable_auth(&server).await;
    let client = server.client_as(Some(USER)).await;
    let token = client
        .auth_client()
        .authenticate(USER.0.to_string(), USER.1.to_string())
        .await
        .expect("authenticate the normal user")
        .token()
        .to_string();
    for token in [Some(token.as_str()), Some("not.a.valid.token"), None] {
        let histogram = fuzz_all_methods(&server, seed, calls, token).await;
        let valid = token.is_some_and(|t| t != "not.a.valid.token");
        println!("seed {seed}, token {token:?}: {histogram:#?}");
        // etcd's answers to a plain read, after the fuzzing.
        let (code, message) = range_with_token(&server, b"fuzz/x", token).await;
        match token {
            _ if valid => assert_eq!(code, tonic::Code::Ok, "seed {seed}: {message}"),
            Some(_) => {
                assert_eq!(code, tonic::Code::Unauthenticated, "seed {seed}");
                assert_eq!(message, "etcdserver: invalid auth token", "seed {seed}");
            }
            None => {
                assert_eq!(code, tonic::Code::InvalidArgument, "seed {seed}: {message}");
                assert_eq!(message, "etcdserver: user name is empty", "seed {seed}");
            }
        }
        if valid {
            let (code, message) = range_with_token(&server, b"other", token).await;
            assert_eq!(code, tonic::Code::PermissionDenied, "seed {seed}");
            assert_eq!(message, "etcdserver: permission denied", "seed {seed}");
        }
        common::assert_serves_after_fuzz(&mut server, Some(ROOT), seed).await;
    }
}

/// Calls `method` once with `message` (a protobuf encoding) and `token` (or none); returns
/// the status it ends with.
async fn call_once(
    server: &Server,
    method: &'static Method,
    message: &[u8],
    token: Option<&str>,
) -> (tonic::Code, String) {
    let endpoint = server.endpoint();
    let sender = connect(&endpoint).await;
    let call = grpc_call(&endpoint, &sender, method, frame(0, message), None, token);
    let outcome = tokio::time::timeout(Duration::from_millis(CALL_TIMEOUT_MS), call)
        .await
        .expect("an answer in time")
        .expect("a gRPC answer");
    match outcome {
        Outcome::Status { code, message } => (tonic::Code::from_i32(code), message),
        other => panic!("{}: expected a status, got {other:?}", method.path),
    }
}

fn method(path: &str) -> &'static Method {
    METHODS
        .iter()
        .find(|m| m.path == path)
        .expect("a known method")
}

/// Found by the fuzz run: ACTIVATE of a negative alarm type reached the alarm log record,
/// whose encoder asserts a type >= 0, and the panic stopped the server.
#[tokio::test]
async fn negative_alarm_type_is_refused() {
    let mut server = Server::ferrocd(&[]).await;
    let mut activate = Vec::new();
    put_varint(&mut activate, 1 << 3); // action
    put_varint(&mut activate, 1); // ACTIVATE
    put_varint(&mut activate, 3 << 3); // alarm
    put_varint(&mut activate, -1i64 as u64);
    let alarm = method("/etcdserverpb.Maintenance/Alarm");
    let (code, message) = call_once(&server, alarm, &activate, None).await;
    assert_eq!(code, tonic::Code::InvalidArgument, "{message}");
    assert_eq!(message, "etcdserver: alarm type must not be negative");
    common::assert_serves_after_fuzz(&mut server, None, 0).await;
}

/// Found by the fuzz run: an undecodable watch request (here a compressed flag without an
/// encoding) left the watch stream open with no answer; etcd ends it with the decode error.
#[tokio::test]
async fn undecodable_watch_request_ends_the_stream() {
    let server = Server::subject(&[]).await;
    let endpoint = server.endpoint();
    let sender = connect(&endpoint).await;
    let watch = method("/etcdserverpb.Watch/Watch");
    let call = grpc_call(&endpoint, &sender, watch, frame(1, b""), None, None);
    let outcome = tokio::time::timeout(Duration::from_millis(CALL_TIMEOUT_MS), call)
        .await
        .expect("the watch stream ends in time")
        .expect("a gRPC answer");
    match outcome {
        Outcome::Status { code, message } => {
            assert_eq!(
                tonic::Code::from_i32(code),
                tonic::Code::Internal,
                "{message}"
            );
            assert!(is_decode_error(&message), "{message}");
        }
        other => panic!("expected the stream to end with a status, got {other:?}"),
    }
}
