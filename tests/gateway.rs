//! The HTTP/JSON gateway, differentially: the same HTTP/1.1 requests go to a real etcd and to
//! the server under test (ferrocd with two shards, or etcd again with `FERROCD_TEST_SERVER=etcd`),
//! and the responses must match: HTTP status, content type, CORS headers, and the JSON body
//! once ids that differ between two clusters are dropped (cluster and member ids, raft term,
//! URLs with their ports). Errors must match by status, gRPC code and message, except where
//! the message comes from a JSON parser (Go's and serde's word their errors differently).
//!
//! The client is a plain HTTP/1.1 writer on a TCP socket, as curl would send.

mod common;

use std::time::Duration;

use common::Server;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Upper bound for one HTTP exchange, so a hung server fails the test instead of hanging it.
const HTTP_TIMEOUT_MS: u64 = 30_000;
/// etcd's default `--max-request-bytes` (1.5 MiB) and its gRPC receive limit (+ 512 KiB).
const MAX_REQUEST_BYTES: usize = 3 * 512 * 1024;
const MAX_GRPC_MESSAGE_BYTES: usize = MAX_REQUEST_BYTES + 512 * 1024;

/// One HTTP response as read off the socket (chunked bodies decoded, trailers dropped).
#[derive(Debug)]
struct HttpResponse {
    status: u16,
    /// Lower-case names.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl HttpResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// Sends one request on a fresh connection (`Connection: close`) and reads the whole reply.
async fn http(server: &Server, method: &str, path: &str, body: &[u8]) -> HttpResponse {
    let endpoint = server.endpoint();
    let addr = endpoint.strip_prefix("http://").expect("http endpoint");
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await.expect("write head");
        stream.write_all(body).await.expect("write body");
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.expect("read response");
        raw
    };
    let raw = tokio::time::timeout(Duration::from_millis(HTTP_TIMEOUT_MS), exchange)
        .await
        .unwrap_or_else(|_| panic!("{method} {path} to {endpoint} timed out"));
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> HttpResponse {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of response head");
    let head = std::str::from_utf8(&raw[..split]).expect("ASCII head");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("status line");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .map(|line| {
            let (name, value) = line.split_once(':').expect("header line");
            (name.trim().to_ascii_lowercase(), value.trim().to_string())
        })
        .collect();
    let rest = &raw[split + 4..];
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        decode_chunked(rest)
    } else {
        rest.to_vec()
    };
    HttpResponse {
        status,
        headers,
        body,
    }
}

/// HTTP/1.1 chunked transfer coding: `<hex size>\r\n<data>\r\n` ... `0\r\n<trailers>\r\n`.
fn decode_chunked(mut rest: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk size line");
        let size_text = std::str::from_utf8(&rest[..line_end]).expect("chunk size");
        let size_text = size_text.split(';').next().unwrap_or_default();
        let size = usize::from_str_radix(size_text.trim(), 16).expect("hex chunk size");
        rest = &rest[line_end + 2..];
        if size == 0 {
            return body;
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

/// Standard base64 with padding, as the gateway's `bytes` fields want.
fn b64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | (b as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Drops what differs between two clusters answering the same requests.
fn normalize(mut value: Value) -> Value {
    strip_ids(&mut value);
    value
}

fn strip_ids(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for id in ["cluster_id", "member_id", "raft_term"] {
                map.remove(id);
            }
            map.values_mut().for_each(strip_ids);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_ids),
        _ => {}
    }
}

/// The two servers, fed the same requests.
struct Pair {
    etcd: Server,
    subject: Server,
}

impl Pair {
    async fn start() -> Pair {
        Pair {
            etcd: Server::etcd().await,
            subject: Server::subject(&["--shards", "2"]).await,
        }
    }

    /// Sends the same request to both; asserts equal status, content type and CORS headers,
    /// and returns (etcd, subject).
    async fn both(&self, method: &str, path: &str, body: &[u8]) -> (HttpResponse, HttpResponse) {
        let expected = http(&self.etcd, method, path, body).await;
        let actual = http(&self.subject, method, path, body).await;
        let what = format!("{method} {path} {}", String::from_utf8_lossy(body));
        assert_eq!(actual.status, expected.status, "status of {what}");
        for header in [
            "content-type",
            "access-control-allow-origin",
            "access-control-allow-methods",
            "access-control-allow-headers",
        ] {
            assert_eq!(
                actual.header(header),
                expected.header(header),
                "{header} of {what}"
            );
        }
        (expected, actual)
    }

    /// POSTs `body` to both; the normalized JSON responses must be equal. Returns etcd's.
    async fn same(&self, path: &str, body: Value) -> Value {
        let (expected, actual) = self.both("POST", path, body.to_string().as_bytes()).await;
        let (expected, actual) = (normalize(expected.json()), normalize(actual.json()));
        assert_eq!(actual, expected, "POST {path} {body}");
        expected
    }

    /// Sends raw bytes to both; both must answer with the same status and an error body of
    /// the same gRPC code (the messages come from different JSON parsers).
    async fn same_decode_error(&self, path: &str, body: &[u8]) {
        let (expected, actual) = self.both("POST", path, body).await;
        let (expected, actual) = (expected.json(), actual.json());
        assert_eq!(actual["code"], expected["code"], "code for {body:?}");
        assert_eq!(actual["code"], json!(3), "InvalidArgument for {body:?}");
        assert_eq!(actual["error"], actual["message"]);
        assert!(actual["error"].as_str().is_some_and(|m| !m.is_empty()));
    }
}

#[tokio::test]
async fn kv_requests_match_etcd() {
    let pair = Pair::start().await;
    let put = |key: &[u8], value: &[u8]| json!({"key": b64(key), "value": b64(value)});

    pair.same("/v3/kv/put", put(b"foo", b"bar")).await;
    pair.same(
        "/v3/kv/put",
        json!({"key": b64(b"foo"), "value": b64(b"bar2"), "prev_kv": true}),
    )
    .await;
    for key in ["a/1", "a/2", "a/3", "b", "c"] {
        pair.same("/v3/kv/put", put(key.as_bytes(), key.as_bytes()))
            .await;
    }
    pair.same("/v3/kv/put", put(b"a/2", b"again")).await;
    // A value of every byte, and an empty value (omitted on output).
    let all_bytes: Vec<u8> = (0..=255).collect();
    pair.same("/v3/kv/put", put(b"\x00bin\xff", &all_bytes))
        .await;
    pair.same("/v3/kv/put", put(b"empty", b"")).await;

    let a = b64(b"a/");
    let a_end = b64(b"a0");
    let ranges = [
        json!({"key": b64(b"foo")}),
        json!({"key": b64(b"\x00bin\xff")}),
        json!({"key": b64(b"empty")}),
        json!({"key": b64(b"missing")}),
        json!({"key": a, "range_end": a_end}),
        json!({"key": a, "range_end": a_end, "limit": 2}),
        json!({"key": a, "range_end": a_end, "limit": "1", "sort_order": "DESCEND", "sort_target": "MOD"}),
        json!({"key": a, "range_end": a_end, "revision": 4}),
        json!({"key": a, "range_end": a_end, "count_only": true}),
        json!({"key": a, "range_end": a_end, "keys_only": true}),
        json!({"key": b64(b"\x00"), "range_end": b64(b"\x00")}),
        json!({"key": b64(b"\x00"), "range_end": b64(b"\x00"), "count_only": true, "min_mod_revision": "5"}),
        // lowerCamelCase names are accepted too, enums also by number, unknown fields skipped.
        json!({"key": a, "rangeEnd": a_end, "keysOnly": true, "sortOrder": 2, "futureField": 1}),
        json!({"key": a, "rangeEnd": a_end, "countOnly": true, "maxCreateRevision": 4}),
    ];
    for range in ranges {
        pair.same("/v3/kv/range", range).await;
    }

    // A txn with compares on every target, a nested txn and every op kind.
    let compare = |target: &str, result: &str, field: &str, value: Value| json!({"key": b64(b"foo"), "target": target, "result": result, field: value});
    let mut over_range = compare("LEASE", "EQUAL", "lease", json!(0));
    over_range["range_end"] = json!(b64(b"fop"));
    let txn = json!({
        "compare": [
            compare("VALUE", "EQUAL", "value", json!(b64(b"bar2"))),
            compare("VERSION", "GREATER", "version", json!("1")),
            compare("MOD", "LESS", "mod_revision", json!(100)),
            compare("CREATE", "NOT_EQUAL", "create_revision", json!(0)),
            over_range,
        ],
        "success": [
            {"request_put": {"key": b64(b"foo"), "value": b64(b"txn"), "prev_kv": true}},
            {"requestRange": {"key": a, "range_end": a_end}},
            {"request_delete_range": {"key": b64(b"c"), "prev_kv": true}},
            {"request_txn": {
                "compare": [{"key": b64(b"b"), "target": "VALUE", "result": "EQUAL", "value": b64(b"nope")}],
                "success": [{"request_put": {"key": b64(b"never"), "value": b64(b"x")}}],
                "failure": [{"request_range": {"key": b64(b"b")}}],
            }},
        ],
        "failure": [{"request_range": {"key": b64(b"foo")}}],
    });
    let answer = pair.same("/v3/kv/txn", txn.clone()).await;
    assert_eq!(answer["succeeded"], json!(true));
    // The same txn again: the value compare now fails.
    let answer = pair.same("/v3/kv/txn", txn).await;
    assert!(answer.get("succeeded").is_none(), "false is omitted");

    pair.same(
        "/v3/kv/deleterange",
        json!({"key": a, "range_end": a_end, "prev_kv": true}),
    )
    .await;
    pair.same("/v3/kv/deleterange", json!({"key": b64(b"missing")}))
        .await;
    let answer = pair
        .same(
            "/v3/kv/compaction",
            json!({"revision": "6", "physical": true}),
        )
        .await;
    let current_revision = answer["header"]["revision"].clone();

    // etcd's errors: status from the gRPC code, same code and message.
    let errors = [
        ("/v3/kv/range", json!({"key": a, "revision": 3})), // compacted
        ("/v3/kv/range", json!({"key": a, "revision": 1000})), // future
        ("/v3/kv/range", json!({})),                        // key not provided
        ("/v3/kv/compaction", json!({"revision": 2})),      // compacted
        (
            "/v3/kv/put",
            json!({"key": b64(b"k"), "value": b64(b"v"), "lease": "12345"}),
        ), // lease not found: 404
        (
            "/v3/kv/txn",
            json!({"success": [
                {"request_put": {"key": b64(b"k"), "value": b64(b"1")}},
                {"request_put": {"key": b64(b"k"), "value": b64(b"2")}},
            ]}),
        ), // duplicate key
    ];
    for (path, body) in errors {
        let answer = pair.same(path, body).await;
        assert!(answer["error"].is_string(), "{path}: {answer}");
        assert_eq!(answer["error"], answer["message"]);
    }
    // Nothing above changed anything.
    let answer = pair.same("/v3/kv/range", json!({"key": b64(b"foo")})).await;
    assert_eq!(answer["header"]["revision"], current_revision);

    // Empty body: the default request.
    let (expected, actual) = pair.both("POST", "/v3/kv/range", b"").await;
    assert_eq!(actual.json(), expected.json());
}

#[tokio::test]
async fn malformed_requests_match_etcd() {
    let pair = Pair::start().await;
    for body in [
        &b"{bad"[..],
        b"[]",
        b"\"text\"",
        br#"{"key":"!!!"}"#,
        br#"{"key":"Zm9v","limit":1.5}"#,
        br#"{"key":"Zm9v","count_only":"true"}"#,
        br#"{"key":"Zm9v","sort_order":"BOGUS"}"#,
    ] {
        pair.same_decode_error("/v3/kv/range", body).await;
    }

    // Paths and methods: grpc-gateway's plain-text 404 and 405, Go's 404 outside /v3/.
    for (method, path) in [
        ("POST", "/v3/kv/nothing"),
        ("POST", "/v3/watchers"),
        ("GET", "/v3/kv/range"),
        ("PUT", "/v3/kv/put"),
        ("GET", "/v3/nothing"),
        ("POST", "/v4/kv/range"),
        ("OPTIONS", "/v3/kv/range"),
    ] {
        let (expected, actual) = pair.both(method, path, b"").await;
        assert_eq!(
            String::from_utf8_lossy(&actual.body),
            String::from_utf8_lossy(&expected.body),
            "{method} {path}"
        );
    }

    // Size limits: a put over --max-request-bytes reaches etcd's check (400); one whose
    // message is over the gRPC receive limit is refused before (429).
    let put =
        |value_bytes: usize| json!({"key": b64(b"big"), "value": b64(&vec![b'x'; value_bytes])});
    for value_bytes in [
        MAX_REQUEST_BYTES - 1024,
        MAX_REQUEST_BYTES + 1,
        MAX_GRPC_MESSAGE_BYTES + 1,
    ] {
        pair.same("/v3/kv/put", put(value_bytes)).await;
    }
}

#[tokio::test]
async fn cluster_and_maintenance_match_etcd() {
    let pair = Pair::start().await;

    // Member list: one member, its name and URLs (ports differ: each server's own).
    let (expected, actual) = pair.both("POST", "/v3/cluster/member/list", b"{}").await;
    for (server, answer) in [
        (&pair.etcd, expected.json()),
        (&pair.subject, actual.json()),
    ] {
        let header = &answer["header"];
        assert!(header.get("revision").is_none(), "{answer}");
        assert!(header["cluster_id"].is_string() && header["member_id"].is_string());
        let members = answer["members"].as_array().expect("members");
        assert_eq!(members.len(), 1, "{answer}");
        let member = &members[0];
        assert_eq!(member["ID"], header["member_id"]);
        assert_eq!(member["name"], json!("node1"));
        assert_eq!(member["clientURLs"], json!([server.endpoint()]));
        assert_eq!(member["peerURLs"].as_array().map(Vec::len), Some(1));
        let keys: Vec<&String> = member.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["ID", "clientURLs", "name", "peerURLs"]);
    }

    // Status: the same fields (values are each server's own).
    pair.same("/v3/kv/put", json!({"key": b64(b"k"), "value": b64(b"v")}))
        .await;
    let (expected, actual) = pair.both("POST", "/v3/maintenance/status", b"").await;
    let (expected, actual) = (expected.json(), actual.json());
    let keys =
        |answer: &Value| -> Vec<String> { answer.as_object().unwrap().keys().cloned().collect() };
    assert_eq!(keys(&actual), keys(&expected), "{actual} vs {expected}");
    assert_eq!(actual["header"]["revision"], expected["header"]["revision"]);
    assert_eq!(actual["leader"], actual["header"]["member_id"]);
    for field in [
        "dbSize",
        "dbSizeInUse",
        "raftIndex",
        "raftAppliedIndex",
        "raftTerm",
    ] {
        let number: u64 = actual[field]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{field} is an integer string: {actual}"));
        assert!(number > 0, "{field}: {actual}");
    }
}
