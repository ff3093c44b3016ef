//! The HTTP/JSON gateway of a running server under bad input (issue 8): a bounded, seeded
//! random run against a real server process, one burst per input class over every gateway
//! path at once, each burst followed by a put/get round trip that must still work.
//!
//! Input classes: random bytes; random JSON values; objects with etcd's field names holding
//! values of the wrong type; huge and out-of-range numbers; invalid base64 in bytes fields;
//! deep nesting (arrays, objects, txns); wrong methods and unknown paths; broken HTTP/1.1
//! (content-length too large, too small, not a number, twice; bad chunked coding; bodies cut
//! short by a half-close; garbage request lines and headers).
//!
//! Each request goes on its own TCP connection (`Connection: close`). Except for broken
//! HTTP, it must get an HTTP response within `CALL_TIMEOUT_MS`, shaped as etcd's gateway
//! shapes it (`check_response`): 200 with a JSON object (a stream's first line `{"result":..}`
//! or `{"error":{..}}`), grpc-gateway's plain-text 404/405 for a wrong path or method, or an
//! error status with the JSON body `{"error":m,"message":m,"code":c}` whose HTTP status is
//! grpc-gateway's mapping of `c`. Broken HTTP may instead end with the connection closed, but
//! within the same bound. `gateway_errors_have_etcds_shape` compares the error shape with a
//! real etcd for fixed inputs.
//!
//! `FERROCD_GATEWAY_FUZZ_SEED` replays a run (the seed is printed on failure);
//! `FERROCD_GATEWAY_FUZZ_CALLS` sets the requests per path and class (soak runs).
//! `FERROCD_TEST_SERVER=etcd` runs the same checks against a real etcd.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::Server;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SEED_ENV: &str = "FERROCD_GATEWAY_FUZZ_SEED";
const CALLS_ENV: &str = "FERROCD_GATEWAY_FUZZ_CALLS";
/// Requests per path and input class in a default (CI) run.
const DEFAULT_CALLS_PER_CLASS: usize = 12;
/// A request that has not been answered (or its connection closed) by then is a hang.
const CALL_TIMEOUT_MS: u64 = 5_000;
/// Endpoints that may legitimately wait on a well-formed request (a held lock, an election
/// without a leader, a watch) get this long before the request counts as pending.
const BLOCKING_CALL_WAIT_MS: u64 = 200;
/// Deepest generated nesting; serde_json stops at 128 levels, Go's decoder at 10,000.
const MAX_NESTING: usize = 20_000;
/// Largest body that is sent whole (etcd's gateway takes up to its gRPC limit, about 2 MiB).
const BIG_BODY_BYTES: usize = 3 * 1024 * 1024;

/// One gateway path and how its answers may look.
struct Endpoint {
    path: &'static str,
    /// The answer is a stream of JSON lines.
    streaming: bool,
    /// A well-formed request may wait indefinitely, as on etcd.
    may_block: bool,
}

const fn unary(path: &'static str) -> Endpoint {
    Endpoint {
        path,
        streaming: false,
        may_block: false,
    }
}

const fn blocking(path: &'static str, streaming: bool) -> Endpoint {
    Endpoint {
        path,
        streaming,
        may_block: true,
    }
}

/// Every path of net/src/gateway.rs.
static ENDPOINTS: &[Endpoint] = &[
    unary("/v3/kv/range"),
    unary("/v3/kv/put"),
    unary("/v3/kv/deleterange"),
    unary("/v3/kv/txn"),
    unary("/v3/kv/compaction"),
    blocking("/v3/watch", true),
    unary("/v3/lease/grant"),
    unary("/v3/lease/revoke"),
    unary("/v3/kv/lease/revoke"),
    Endpoint {
        path: "/v3/lease/keepalive",
        streaming: true,
        may_block: false,
    },
    unary("/v3/lease/timetolive"),
    unary("/v3/kv/lease/timetolive"),
    unary("/v3/lease/leases"),
    unary("/v3/kv/lease/leases"),
    unary("/v3/cluster/member/add"),
    unary("/v3/cluster/member/remove"),
    unary("/v3/cluster/member/update"),
    unary("/v3/cluster/member/list"),
    unary("/v3/cluster/member/promote"),
    unary("/v3/maintenance/alarm"),
    unary("/v3/maintenance/status"),
    unary("/v3/maintenance/defragment"),
    unary("/v3/maintenance/hash"),
    Endpoint {
        path: "/v3/maintenance/snapshot",
        streaming: true,
        may_block: false,
    },
    unary("/v3/maintenance/transfer-leadership"),
    blocking("/v3/lock/lock", false),
    unary("/v3/lock/unlock"),
    blocking("/v3/election/campaign", false),
    unary("/v3/election/proclaim"),
    unary("/v3/election/leader"),
    blocking("/v3/election/observe", true),
    unary("/v3/election/resign"),
    unary("/v3/auth/enable"),
    unary("/v3/auth/disable"),
    unary("/v3/auth/status"),
    unary("/v3/auth/authenticate"),
    unary("/v3/auth/user/add"),
    unary("/v3/auth/user/get"),
    unary("/v3/auth/user/getall"),
    unary("/v3/auth/user/delete"),
    unary("/v3/auth/user/changepw"),
    unary("/v3/auth/user/grant"),
    unary("/v3/auth/user/revoke"),
    unary("/v3/auth/role/add"),
    unary("/v3/auth/role/get"),
    unary("/v3/auth/role/getall"),
    unary("/v3/auth/role/delete"),
    unary("/v3/auth/role/grant"),
    unary("/v3/auth/role/revoke"),
];

/// Field names of etcd's request messages (both spellings where they differ), so that
/// generated objects reach the fields the decoders type-check.
const FIELDS: &[&str] = &[
    "key",
    "range_end",
    "rangeEnd",
    "value",
    "lease",
    "limit",
    "revision",
    "sort_order",
    "sort_target",
    "serializable",
    "keys_only",
    "count_only",
    "min_mod_revision",
    "max_create_revision",
    "prev_kv",
    "ignore_value",
    "ignore_lease",
    "compare",
    "success",
    "failure",
    "result",
    "target",
    "version",
    "create_revision",
    "mod_revision",
    "request_range",
    "request_put",
    "request_delete_range",
    "request_txn",
    "physical",
    "TTL",
    "ID",
    "keys",
    "peerURLs",
    "isLearner",
    "linearizable",
    "action",
    "memberID",
    "alarm",
    "targetID",
    "name",
    "password",
    "options",
    "no_password",
    "role",
    "perm",
    "permType",
    "create_request",
    "cancel_request",
    "progress_request",
    "start_revision",
    "progress_notify",
    "filters",
    "watch_id",
    "fragment",
    "leader",
];

/// The input classes of the brief.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    RandomBytes,
    RandomJson,
    WrongTypes,
    HugeNumbers,
    InvalidBase64,
    DeepNesting,
    WrongMethod,
    BrokenHttp,
}

const CLASSES: [Class; 8] = [
    Class::RandomBytes,
    Class::RandomJson,
    Class::WrongTypes,
    Class::HugeNumbers,
    Class::InvalidBase64,
    Class::DeepNesting,
    Class::WrongMethod,
    Class::BrokenHttp,
];

/// One request as raw bytes, and what is wrong with it (for failure messages).
struct RawRequest {
    bytes: Vec<u8>,
    shape: String,
    /// Close the write half after sending: the body is cut short, the server sees EOF.
    half_close: bool,
    /// The body is a JSON value (a blocking endpoint may wait on it).
    json_body: bool,
}

struct Generator {
    rng: StdRng,
}

impl Generator {
    fn request(&mut self, path: &str, class: Class) -> RawRequest {
        match class {
            Class::RandomBytes => {
                let len = self.rng.gen_range(0..=64);
                let body: Vec<u8> = (0..len).map(|_| self.rng.gen()).collect();
                post(path, &body, "random bytes")
            }
            Class::RandomJson => {
                let value = self.json_value(4);
                post_json(path, &value, "random JSON")
            }
            Class::WrongTypes => {
                let value = self.wrong_types(3);
                post_json(path, &value, "wrong field types")
            }
            Class::HugeNumbers => {
                let body = self.huge_numbers();
                post_text(path, body, "huge numbers")
            }
            Class::InvalidBase64 => {
                let value = self.invalid_base64();
                post_json(path, &value, "invalid base64")
            }
            Class::DeepNesting => self.deep_nesting(path),
            Class::WrongMethod => self.wrong_method(path),
            Class::BrokenHttp => self.broken_http(path),
        }
    }

    fn field_name(&mut self) -> String {
        if self.rng.gen_bool(0.9) {
            FIELDS[self.rng.gen_range(0..FIELDS.len())].to_string()
        } else {
            self.text()
        }
    }

    /// Short ASCII text, now and then empty, invalid-looking or unicode; never `root`, so
    /// that auth stays off (a random user/add of root then auth/enable would lock the
    /// final round trip out).
    fn text(&mut self) -> String {
        match self.rng.gen_range(0..12) {
            0 => String::new(),
            1 => "\u{0}\u{ffff}é😀".to_string(),
            2 => "http://127.0.0.1:1".to_string(),
            _ => {
                let len = self.rng.gen_range(1..12);
                let text: String = (0..len)
                    .map(|_| char::from(self.rng.gen_range(b'a'..=b'z')))
                    .collect();
                if text == "root" {
                    "rooq".to_string()
                } else {
                    text
                }
            }
        }
    }

    fn number(&mut self) -> Value {
        match self.rng.gen_range(0..6) {
            0 => json!(self.rng.gen::<i64>()),
            1 => json!(self.rng.gen::<u64>()),
            2 => json!(self.rng.gen::<f64>() * 1e20),
            3 => json!(self.rng.gen_range(-3..100)),
            4 => json!(self.rng.gen::<i64>().to_string()),
            _ => json!(-1.5),
        }
    }

    fn json_value(&mut self, depth: usize) -> Value {
        let pick = if depth == 0 {
            self.rng.gen_range(0..5)
        } else {
            self.rng.gen_range(0..7)
        };
        match pick {
            0 => Value::Null,
            1 => json!(self.rng.gen_bool(0.5)),
            2 => self.number(),
            3 => json!(self.text()),
            4 => json!(base64_of(self.text().as_bytes())),
            5 => Value::Array(
                (0..self.rng.gen_range(0..4))
                    .map(|_| self.json_value(depth - 1))
                    .collect(),
            ),
            _ => {
                let mut object = Map::new();
                for _ in 0..self.rng.gen_range(0..5) {
                    let name = self.field_name();
                    object.insert(name, self.json_value(depth - 1));
                }
                Value::Object(object)
            }
        }
    }

    /// A value of a type the field never has (or sometimes has: the decoder then takes it).
    fn wrong_typed_value(&mut self, depth: usize) -> Value {
        match self.rng.gen_range(0..9) {
            0 => json!(true),
            1 => json!([1, "a", null]),
            2 => json!({"a": 1}),
            3 => json!(1.25),
            4 => json!(-7),
            5 => json!("not base64 nor a number"),
            6 => json!("NOT_AN_ENUM"),
            7 if depth > 0 => self.wrong_types(depth - 1),
            _ => Value::Null,
        }
    }

    fn wrong_types(&mut self, depth: usize) -> Value {
        let mut object = Map::new();
        for _ in 0..self.rng.gen_range(1..5) {
            let name = self.field_name();
            object.insert(name, self.wrong_typed_value(depth));
        }
        Value::Object(object)
    }

    /// Numbers JSON can spell but int64, uint64 and enums cannot hold; written as text, as
    /// serde_json would round some of them.
    fn huge_numbers(&mut self) -> String {
        const NUMBERS: &[&str] = &[
            "9223372036854775807",
            "9223372036854775808",
            "-9223372036854775809",
            "18446744073709551616",
            "\"99999999999999999999999999\"",
            "\"-9223372036854775809\"",
            "1e400",
            "-1e400",
            "1e-400",
            "0.5",
            "\"0x10\"",
            "\" 1\"",
            "\"1e3\"",
            "-0",
            "\"\"",
            "2147483648",
            "-2147483649",
            "123456789012345678901234567890123456789012345678901234567890",
        ];
        let fields: Vec<String> = (0..self.rng.gen_range(1..4))
            .map(|_| {
                let name = self.field_name();
                let number = NUMBERS[self.rng.gen_range(0..NUMBERS.len())];
                format!("{}:{number}", json!(name))
            })
            .collect();
        format!("{{{}}}", fields.join(","))
    }

    fn invalid_base64(&mut self) -> Value {
        const BAD: &[&str] = &[
            "!!!",
            "Zm9",
            "Zm9v=",
            "====",
            "Z",
            "Zm9v\n",
            "-_-_",
            "Zm 9v",
            "Zm9v==Zm9v",
            "é",
            "\u{0}",
        ];
        const BYTES_FIELDS: &[&str] = &[
            "key",
            "range_end",
            "value",
            "name",
            "leader",
            "prev_kv",
            "permKey",
        ];
        let mut object = Map::new();
        for _ in 0..self.rng.gen_range(1..3) {
            let field = BYTES_FIELDS[self.rng.gen_range(0..BYTES_FIELDS.len())];
            let bad = BAD[self.rng.gen_range(0..BAD.len())];
            object.insert(field.to_string(), json!(bad));
        }
        if self.rng.gen_bool(0.3) {
            // Inside a txn, where the bytes sit two objects deep.
            json!({"success": [{"request_put": Value::Object(object)}]})
        } else {
            Value::Object(object)
        }
    }

    fn deep_nesting(&mut self, path: &str) -> RawRequest {
        let depth = match self.rng.gen_range(0..3) {
            0 => self.rng.gen_range(100..200),
            1 => self.rng.gen_range(1_000..MAX_NESTING),
            _ => self.rng.gen_range(2..40),
        };
        let body = match self.rng.gen_range(0..4) {
            0 => format!("{}{}", "[".repeat(depth), "]".repeat(depth)),
            1 => format!("{}1{}", "{\"key\":".repeat(depth), "}".repeat(depth)),
            // Unbalanced: the decoder must stop at the end, not recurse past it.
            2 => "[{\"a\":".repeat(depth),
            _ => {
                // Txns nested as deep as the request size allows.
                let mut txn = json!({"compare": [], "success": []});
                for _ in 0..depth.min(100) {
                    txn = json!({"success": [{"request_txn": txn}]});
                }
                txn.to_string()
            }
        };
        post_text(path, body, "deep nesting")
    }

    fn wrong_method(&mut self, path: &str) -> RawRequest {
        const METHODS: &[&str] = &["GET", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "BREW"];
        let method = METHODS[self.rng.gen_range(0..METHODS.len())];
        let suffix = match self.rng.gen_range(0..6) {
            0 => "/extra",
            1 => "x",
            2 => "/../range",
            3 => "?key=Zm9v",
            _ => "",
        };
        let method = if suffix.is_empty() { method } else { "POST" };
        let target = format!("{path}{suffix}");
        RawRequest {
            bytes: http_request(method, &target, &[], b"{}"),
            shape: format!("{method} {target}"),
            half_close: false,
            // A routed POST (a query string or a `..` segment still matches) takes the `{}`.
            json_body: true,
        }
    }

    fn broken_http(&mut self, path: &str) -> RawRequest {
        let body = br#"{"key":"Zm9v","value":"YmFy"}"#;
        let head = |extra: &str| {
            format!("POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{extra}\r\n")
        };
        let (shape, bytes, half_close) = match self.rng.gen_range(0..11) {
            0 => (
                "content-length beyond the body, then EOF",
                [head("Content-Length: 1000\r\n").as_bytes(), body].concat(),
                true,
            ),
            1 => (
                "content-length short of the body",
                [head("Content-Length: 5\r\n").as_bytes(), body].concat(),
                false,
            ),
            2 => (
                "content-length not a number",
                [head("Content-Length: ten\r\n").as_bytes(), body].concat(),
                false,
            ),
            3 => (
                "negative content-length",
                [head("Content-Length: -1\r\n").as_bytes(), body].concat(),
                false,
            ),
            4 => (
                "two different content-lengths",
                [
                    head("Content-Length: 2\r\nContent-Length: 29\r\n").as_bytes(),
                    body,
                ]
                .concat(),
                false,
            ),
            5 => (
                "huge content-length, small body",
                [head("Content-Length: 99999999999999\r\n").as_bytes(), body].concat(),
                true,
            ),
            6 => (
                "bad chunk size",
                [
                    head("Transfer-Encoding: chunked\r\n").as_bytes(),
                    b"zz\r\n{}\r\n0\r\n\r\n",
                ]
                .concat(),
                false,
            ),
            7 => (
                "chunked body cut short, then EOF",
                [
                    head("Transfer-Encoding: chunked\r\n").as_bytes(),
                    b"100\r\n{\"key\":",
                ]
                .concat(),
                true,
            ),
            8 => (
                "garbage request line",
                b"\x16\x03\x01\x02\x00 garbage\r\n\r\n".to_vec(),
                false,
            ),
            9 => (
                "header without a colon",
                format!("POST {path} HTTP/1.1\r\nHost 127.0.0.1\r\n\r\n").into_bytes(),
                false,
            ),
            _ => (
                "head cut short, then EOF",
                format!("POST {path} HTTP/1.1\r\nContent-Le").into_bytes(),
                true,
            ),
        };
        RawRequest {
            bytes,
            shape: shape.to_string(),
            half_close,
            json_body: false,
        }
    }
}

fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn http_request(method: &str, target: &str, extra_headers: &[&str], body: &[u8]) -> Vec<u8> {
    let mut head = format!(
        "{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for header in extra_headers {
        head.push_str(header);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    [head.as_bytes(), body].concat()
}

fn post(path: &str, body: &[u8], shape: &str) -> RawRequest {
    RawRequest {
        bytes: http_request("POST", path, &[], body),
        shape: shape.to_string(),
        half_close: false,
        json_body: starts_with_json_value(body),
    }
}

/// Whether the gateway may take `body` for a request: whitespace is the default message, and
/// only the first JSON value counts (unknown fields may hold any number, even `1e400`).
fn starts_with_json_value(body: &[u8]) -> bool {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    body.trim_ascii().is_empty()
        || serde::Deserialize::deserialize(&mut deserializer)
            .map(|_: serde::de::IgnoredAny| ())
            .is_ok()
}

fn post_json(path: &str, value: &Value, shape: &str) -> RawRequest {
    post(path, value.to_string().as_bytes(), shape)
}

fn post_text(path: &str, body: String, shape: &str) -> RawRequest {
    assert!(body.len() <= BIG_BODY_BYTES, "generated body too large");
    post(path, body.as_bytes(), shape)
}

/// An HTTP response as far as it was read: the body is de-chunked as far as complete chunks
/// go.
#[derive(Debug)]
struct Answer {
    status: u16,
    /// Lower-case names.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// The whole response was read (the connection closed, or a length was reached).
    complete: bool,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// How one request ended.
#[derive(Debug)]
enum Outcome {
    Answer(Answer),
    /// The server closed the connection without a response (broken HTTP only).
    Closed,
}

/// Parses what was read so far; `None` while the head is incomplete.
fn parse_answer(raw: &[u8], eof: bool) -> Result<Option<Answer>, String> {
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if eof && !raw.is_empty() {
            Err(format!("response head cut short: {:?}", lossy(raw)))
        } else {
            Ok(None)
        };
    };
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| "head not UTF-8".to_string())?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3)?.parse().ok())
        .ok_or_else(|| format!("status line {status_line:?}"))?;
    let headers = lines
        .map(|line| {
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| format!("header line {line:?}"))?;
            Ok((name.trim().to_ascii_lowercase(), value.trim().to_string()))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let rest = &raw[split + 4..];
    let mut answer = Answer {
        status,
        headers,
        body: Vec::new(),
        complete: eof,
    };
    if answer.header("transfer-encoding") == Some("chunked") {
        let (body, last_chunk_seen) = dechunk(rest)?;
        answer.body = body;
        answer.complete |= last_chunk_seen;
    } else {
        answer.body = rest.to_vec();
        if let Some(length) = answer.header("content-length") {
            let length: usize = length.parse().map_err(|_| "content-length".to_string())?;
            answer.complete |= rest.len() >= length;
            answer.body.truncate(length);
        }
    }
    Ok(Some(answer))
}

/// The complete chunks of a chunked body, and whether the last (empty) chunk was seen.
fn dechunk(mut rest: &[u8]) -> Result<(Vec<u8>, bool), String> {
    let mut body = Vec::new();
    while let Some(line_end) = rest.windows(2).position(|w| w == b"\r\n") {
        let size_text = std::str::from_utf8(&rest[..line_end]).map_err(|e| e.to_string())?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| format!("chunk size {size_text:?}"))?;
        if size == 0 {
            return Ok((body, true));
        }
        let data_start = line_end + 2;
        if rest.len() < data_start + size + 2 {
            break;
        }
        body.extend_from_slice(&rest[data_start..data_start + size]);
        rest = &rest[data_start + size + 2..];
    }
    Ok((body, false))
}

fn lossy(bytes: &[u8]) -> String {
    let shown = &bytes[..bytes.len().min(300)];
    String::from_utf8_lossy(shown).into_owned()
}

/// Whether enough of a streaming answer has come: a 200's first line, or all of an error.
fn enough(answer: &Answer, streaming: bool) -> bool {
    answer.complete || (streaming && answer.status == 200 && answer.body.contains(&b'\n'))
}

/// Sends `request` on a fresh connection and reads until the answer is complete (or, for a
/// streaming endpoint, its first line), the connection closes, or `limit_ms` passes (`None`).
async fn exchange(
    addr: &str,
    request: &RawRequest,
    streaming: bool,
    limit_ms: u64,
) -> Result<Option<Outcome>, String> {
    let run = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        // The server may answer and close before all of a bad request is written.
        let _ = stream.write_all(&request.bytes).await;
        if request.half_close {
            let _ = stream.shutdown().await;
        }
        let mut raw = Vec::new();
        let mut buffer = [0u8; 16 * 1024];
        loop {
            let read = match stream.read(&mut buffer).await {
                Ok(read) => read,
                // A reset after an early answer: what was read is the answer.
                Err(_) if !raw.is_empty() => 0,
                Err(_) => return Ok::<_, String>(Outcome::Closed),
            };
            raw.extend_from_slice(&buffer[..read]);
            let eof = read == 0;
            if let Some(answer) = parse_answer(&raw, eof)? {
                if eof || enough(&answer, streaming) {
                    return Ok(Outcome::Answer(answer));
                }
            } else if eof {
                return Ok(Outcome::Closed);
            }
        }
    };
    tokio::time::timeout(Duration::from_millis(limit_ms), run)
        .await
        .ok()
        .transpose()
}

/// grpc-gateway v1's `HTTPStatusFromCode` (net/src/gateway.rs has the same table; this one
/// is the test's own statement of the spec).
fn gateway_http_status(code: i64) -> Option<u16> {
    Some(match code {
        1 => 408,
        2 | 13 | 15 => 500,
        3 | 11 => 400,
        4 => 504,
        5 => 404,
        6 | 10 => 409,
        7 => 403,
        8 => 429,
        9 => 412,
        12 => 501,
        14 => 503,
        16 => 401,
        _ => return None,
    })
}

/// gRPC codes a server may answer to bad input: Cancelled only when the body itself broke,
/// Unknown only with a message (Go's JSON decoder errors on streams), Internal never (a JSON
/// decode error is InvalidArgument), and nothing that reads as a server fault.
fn acceptable_code(class: Class, code: i64, message: &str) -> bool {
    match code {
        3 | 5 | 6 | 7 | 8 | 9 | 11 | 12 | 16 => true,
        1 => class == Class::BrokenHttp,
        2 => !message.is_empty() && !message.contains("panic"),
        _ => false,
    }
}

/// The checks of the module doc on one answer; returns a histogram label.
fn check_answer(
    endpoint: &Endpoint,
    class: Class,
    shape: &str,
    answer: &Answer,
) -> Result<String, String> {
    let body = || lossy(&answer.body);
    if class == Class::BrokenHttp && (answer.status == 400 || answer.status == 431) {
        // hyper's own answer to a request it cannot parse (etcd's net/http: the same codes).
        return Ok(format!("HTTP {}", answer.status));
    }
    match answer.status {
        200 if class == Class::WrongMethod => Ok("200".to_string()),
        // A stream whose request body holds no message ends at once with nothing in it (etcd
        // 3.4's gateway answers an empty /v3/lease/keepalive or /v3/watch body the same way).
        200 if endpoint.streaming && answer.complete && answer.body.is_empty() => {
            Ok("200 empty stream".to_string())
        }
        200 => {
            let first_line = answer.body.split(|&b| b == b'\n').next().unwrap_or(&[]);
            let value: Value = serde_json::from_slice(first_line)
                .map_err(|e| format!("200 without a JSON object ({e}): {}", body()))?;
            let label = if !endpoint.streaming {
                "200"
            } else if value.get("result").is_some() {
                "200 stream result"
            } else if let Some(error) = value.get("error") {
                let code = error["grpc_code"].as_i64().unwrap_or(-1);
                let message = error["message"].as_str().unwrap_or_default();
                if !acceptable_code(class, code, message) {
                    return Err(format!("stream error chunk {value}"));
                }
                "200 stream error"
            } else {
                return Err(format!("stream line is neither result nor error: {value}"));
            };
            if !value.is_object() {
                return Err(format!("200 with a non-object: {}", body()));
            }
            Ok(label.to_string())
        }
        // grpc-gateway's plain-text answer to a path or method it does not route.
        404 | 405
            if class == Class::WrongMethod
                && answer
                    .header("content-type")
                    .is_some_and(|t| t.starts_with("text/plain")) =>
        {
            let expected = if answer.status == 404 {
                "Not Found\n"
            } else {
                "Method Not Allowed\n"
            };
            // A HEAD response has no body.
            let head = shape.starts_with("HEAD ");
            if answer.body != expected.as_bytes() && !(head && answer.body.is_empty()) {
                return Err(format!("{} with body {:?}", answer.status, body()));
            }
            Ok(format!("{} text", answer.status))
        }
        status => {
            let value: Value = serde_json::from_slice(&answer.body)
                .map_err(|e| format!("HTTP {status} without a JSON error ({e}): {}", body()))?;
            let code = value["code"].as_i64().unwrap_or(-1);
            let message = value["message"].as_str();
            let shaped = value.as_object().map(Map::len) == Some(3)
                && message.is_some()
                && value["error"].as_str() == message
                && gateway_http_status(code) == Some(status);
            if !shaped {
                return Err(format!("HTTP {status}: not etcd's error shape: {value}"));
            }
            if !acceptable_code(class, code, message.unwrap_or_default()) {
                return Err(format!("HTTP {status}: unexpected code: {value}"));
            }
            Ok(format!("{status} code {code}"))
        }
    }
}

/// Sends `calls` requests of `class` to one endpoint; returns a histogram of outcomes.
async fn fuzz_endpoint(
    addr: String,
    endpoint: &'static Endpoint,
    class: Class,
    seed: u64,
    calls: usize,
) -> Result<BTreeMap<String, usize>, String> {
    let mut generator = Generator {
        rng: StdRng::seed_from_u64(seed),
    };
    let mut histogram = BTreeMap::new();
    for call in 0..calls {
        let request = generator.request(endpoint.path, class);
        let may_wait = endpoint.may_block && request.json_body;
        let limit_ms = if may_wait {
            BLOCKING_CALL_WAIT_MS
        } else {
            CALL_TIMEOUT_MS
        };
        let context = |e: String| {
            format!(
                "{} {class:?} call {call} ({}): {e}\nrequest: {:?}",
                endpoint.path,
                request.shape,
                lossy(&request.bytes)
            )
        };
        let outcome = exchange(&addr, &request, endpoint.streaming, limit_ms)
            .await
            .map_err(context)?;
        let label = match outcome {
            Some(Outcome::Answer(answer)) => check_answer(endpoint, class, &request.shape, &answer)
                .map_err(|e| context(format!("{e}\nanswer: {answer:?}")))?,
            Some(Outcome::Closed) if class == Class::BrokenHttp => "closed".to_string(),
            Some(Outcome::Closed) => return Err(context("closed without an answer".into())),
            // A blocking endpoint still waiting after `BLOCKING_CALL_WAIT_MS`.
            None if may_wait => "pending".to_string(),
            None => return Err(context(format!("no answer within {limit_ms} ms"))),
        };
        *histogram.entry(format!("{class:?} {label}")).or_insert(0) += 1;
    }
    Ok(histogram)
}

fn seed() -> u64 {
    std::env::var(SEED_ENV)
        .map(|seed| seed.parse().expect("FERROCD_GATEWAY_FUZZ_SEED is a u64"))
        .unwrap_or_else(|_| rand::random())
}

fn calls_per_class() -> usize {
    std::env::var(CALLS_ENV)
        .map(|calls| {
            calls
                .parse()
                .expect("FERROCD_GATEWAY_FUZZ_CALLS is a count")
        })
        .unwrap_or(DEFAULT_CALLS_PER_CLASS)
}

fn addr(server: &Server) -> String {
    let endpoint = server.endpoint();
    endpoint
        .strip_prefix("http://")
        .expect("http endpoint")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_gateway_path_survives_garbage() {
    let seed = seed();
    let calls = calls_per_class();
    let mut server = Server::subject(&[]).await;
    let mut histogram = BTreeMap::new();
    for (class_index, class) in CLASSES.into_iter().enumerate() {
        // One burst: every path at once, each on its own connections.
        let mut tasks = tokio::task::JoinSet::new();
        for (index, endpoint) in ENDPOINTS.iter().enumerate() {
            let task_seed = seed
                .wrapping_add((class_index * ENDPOINTS.len() + index) as u64)
                .wrapping_mul(0x9e37_79b9_7f4a_7c15);
            tasks.spawn(fuzz_endpoint(
                addr(&server),
                endpoint,
                class,
                task_seed,
                calls,
            ));
        }
        while let Some(result) = tasks.join_next().await {
            let endpoint_histogram = result
                .expect("fuzz task")
                .unwrap_or_else(|e| panic!("seed {seed} ({SEED_ENV}): {e}\n{}", server.log()));
            for (label, count) in endpoint_histogram {
                *histogram.entry(label).or_insert(0) += count;
            }
        }
        common::assert_serves_after_fuzz(&mut server, None, seed).await;
    }
    println!("seed {seed}, {calls} requests per path and class: {histogram:#?}");
}

/// The answer's status class and, for a JSON error, its `code` (0 for none).
async fn status_and_code(server: &Server, request: &RawRequest) -> (u16, i64) {
    let outcome = exchange(&addr(server), request, false, CALL_TIMEOUT_MS)
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", request.shape))
        .unwrap_or_else(|| panic!("{}: no answer in time", request.shape));
    let Outcome::Answer(answer) = outcome else {
        panic!("{}: no answer: {outcome:?}", request.shape);
    };
    let code = serde_json::from_slice::<Value>(&answer.body)
        .ok()
        .and_then(|value| value["code"].as_i64())
        .unwrap_or(0);
    (answer.status / 100, code)
}

/// Fixed bad inputs: ferrocd's answers have the status class and gRPC `code` of etcd's.
#[tokio::test]
async fn gateway_errors_have_etcds_shape() {
    let etcd = Server::etcd().await;
    let subject = Server::subject(&[]).await;
    let cases: Vec<RawRequest> = vec![
        post("/v3/kv/range", b"{bad", "invalid JSON"),
        post("/v3/kv/range", b"[]", "an array"),
        post("/v3/kv/range", br#"{"key":5}"#, "a number for bytes"),
        post("/v3/kv/range", br#"{"key":"!!!"}"#, "invalid base64"),
        post("/v3/kv/range", br#"{"limit":"x"}"#, "a string for int64"),
        post(
            "/v3/kv/range",
            br#"{"key":"Zm9v","limit":99999999999999999999}"#,
            "int64 overflow",
        ),
        post("/v3/kv/range", br#"{"sort_order":"UP"}"#, "unknown enum"),
        post(
            "/v3/kv/put",
            br#"{"key":"Zm9v","lease":"1"}"#,
            "unknown lease",
        ),
        post("/v3/kv/put", b"{}", "no key"),
        post_text(
            "/v3/kv/txn",
            format!("{}{}", "[".repeat(200), "]".repeat(200)),
            "deep nesting",
        ),
        post(
            "/v3/lease/revoke",
            br#"{"ID":"7"}"#,
            "revoke of an unknown lease",
        ),
        RawRequest {
            // One value, then the client half-closes short of its length: the call ends (etcd:
            // 408, code Cancelled) instead of waiting for more.
            bytes: b"POST /v3/watch HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
                     Content-Length: 99999999999999\r\n\r\n{\"key\":\"Zm9v\"}"
                .to_vec(),
            shape: "a watch whose body breaks".to_string(),
            half_close: true,
            json_body: true,
        },
        RawRequest {
            bytes: http_request("GET", "/v3/kv/range", &[], b""),
            shape: "GET".to_string(),
            half_close: false,
            json_body: false,
        },
        RawRequest {
            bytes: http_request("POST", "/v3/kv/nothing", &[], b"{}"),
            shape: "unknown path".to_string(),
            half_close: false,
            json_body: false,
        },
    ];
    for case in &cases {
        let expected = status_and_code(&etcd, case).await;
        let got = status_and_code(&subject, case).await;
        assert_eq!(got, expected, "{}: (status class, code)", case.shape);
    }
}
