//! The HTTP/JSON gateway, differentially: the same HTTP/1.1 requests go to a real etcd and to
//! the server under test (ferrocd with two shards, or etcd again with `FERROCD_TEST_SERVER=etcd`),
//! and the responses must match: HTTP status, content type, CORS headers, and the JSON body
//! once ids that differ between two clusters are dropped (cluster and member ids, raft term,
//! URLs with their ports). Errors must match by status, gRPC code and message, except where
//! the message comes from a JSON parser (Go's and serde's word their errors differently).
//!
//! Streaming endpoints (`/v3/watch`, `/v3/lease/keepalive`, `/v3/election/observe`) are read
//! line by line as the servers flush them, with a deadline per read; writes that the streams
//! report go over gRPC. Lease ids are chosen by the test, so both servers answer the same ids
//! and the lock and election keys (`name/<lease in hex>`) agree.
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
    let (status, headers) = parse_head(&raw[..split]);
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

/// The status and the headers (lower-case names) of a response head without its blank line.
fn parse_head(head: &[u8]) -> (u16, Vec<(String, String)>) {
    let head = std::str::from_utf8(head).expect("ASCII head");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("status line");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("status line {status_line:?}"));
    let headers = lines
        .map(|line| {
            let (name, value) = line.split_once(':').expect("header line");
            (name.trim().to_ascii_lowercase(), value.trim().to_string())
        })
        .collect();
    (status, headers)
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

/// Upper bound for one streamed response to arrive.
const STREAM_READ_TIMEOUT_MS: u64 = 10_000;

/// One streaming exchange on its own connection: the responses are read as they come.
struct HttpStream {
    stream: TcpStream,
    what: String,
    status: u16,
    headers: Vec<(String, String)>,
    chunked: bool,
    /// Read off the socket, not yet decoded.
    raw: Vec<u8>,
    /// Decoded body bytes not yet returned.
    body: Vec<u8>,
    /// The whole body has been decoded into `body`.
    ended: bool,
}

impl HttpStream {
    /// Sends the request with `body` and reads the response head.
    async fn open(server: &Server, path: &str, body: &[u8]) -> HttpStream {
        let endpoint = server.endpoint();
        let addr = endpoint.strip_prefix("http://").expect("http endpoint");
        let stream = TcpStream::connect(addr).await.expect("connect");
        let mut exchange = HttpStream {
            stream,
            what: format!("POST {path} to {endpoint}"),
            status: 0,
            headers: Vec::new(),
            chunked: false,
            raw: Vec::new(),
            body: Vec::new(),
            ended: false,
        };
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        );
        let request = [head.as_bytes(), body].concat();
        let sent = exchange.stream.write_all(&request).await;
        sent.expect("write request");
        exchange.read_head().await;
        exchange
    }

    /// Reads more bytes off the socket; false at its end.
    async fn read_more(&mut self) -> bool {
        let mut buffer = [0u8; 16 * 1024];
        let read = tokio::time::timeout(
            Duration::from_millis(STREAM_READ_TIMEOUT_MS),
            self.stream.read(&mut buffer),
        )
        .await
        .unwrap_or_else(|_| panic!("{}: no response within the deadline", self.what))
        .expect("read response");
        self.raw.extend_from_slice(&buffer[..read]);
        read > 0
    }

    async fn read_head(&mut self) {
        let split = loop {
            if let Some(split) = self.raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break split;
            }
            assert!(self.read_more().await, "{}: no response head", self.what);
        };
        let (status, headers) = parse_head(&self.raw[..split]);
        self.raw.drain(..split + 4);
        self.status = status;
        self.chunked = headers
            .iter()
            .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
        self.headers = headers;
    }

    /// Moves the complete chunks of `raw` into `body`.
    fn decode(&mut self) {
        if !self.chunked {
            self.body.append(&mut self.raw);
            return;
        }
        while let Some(line_end) = self.raw.windows(2).position(|w| w == b"\r\n") {
            let size_text = std::str::from_utf8(&self.raw[..line_end]).expect("chunk size");
            let size = usize::from_str_radix(size_text.trim(), 16).expect("hex chunk size");
            if size == 0 {
                self.ended = true;
                return;
            }
            let start = line_end + 2;
            if self.raw.len() < start + size + 2 {
                return;
            }
            self.body.extend_from_slice(&self.raw[start..start + size]);
            self.raw.drain(..start + size + 2);
        }
    }

    /// The next newline-terminated JSON object of the body, or what is left at its end
    /// (grpc-gateway writes no newline after an error); `None` once the body has ended.
    async fn next_json(&mut self) -> Option<Value> {
        loop {
            self.decode();
            if let Some(end) = self.body.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.body.drain(..=end).collect();
                return Some(serde_json::from_slice(&line).expect("a JSON line"));
            }
            if self.ended {
                let rest = std::mem::take(&mut self.body);
                return (!rest.is_empty())
                    .then(|| serde_json::from_slice(&rest).expect("a JSON object"));
            }
            if !self.read_more().await {
                // Not chunked: the body ends with the connection.
                assert!(!self.chunked, "{}: connection closed mid-body", self.what);
                self.ended = true;
            }
        }
    }

    /// The next `count` objects, normalized.
    async fn next_results(&mut self, count: usize) -> Vec<Value> {
        let mut results = Vec::with_capacity(count);
        for _ in 0..count {
            let next = self.next_json().await;
            let next = next.unwrap_or_else(|| panic!("{}: stream ended early", self.what));
            results.push(normalize(next));
        }
        results
    }
}

/// The same streaming request to both servers.
struct StreamPair {
    etcd: HttpStream,
    subject: HttpStream,
}

impl StreamPair {
    /// Opens both; the heads must agree on status and content type.
    async fn open(pair: &Pair, path: &str, body: &str) -> StreamPair {
        let etcd = HttpStream::open(&pair.etcd, path, body.as_bytes()).await;
        let subject = HttpStream::open(&pair.subject, path, body.as_bytes()).await;
        assert_eq!(subject.status, etcd.status, "status of {path} {body}");
        assert_eq!(subject.chunked, etcd.chunked, "chunked {path} {body}");
        let content_type = |s: &HttpStream| {
            s.headers
                .iter()
                .find(|(n, _)| n == "content-type")
                .map(|(_, v)| v.clone())
        };
        assert_eq!(content_type(&subject), content_type(&etcd), "{path} {body}");
        StreamPair { etcd, subject }
    }

    /// Reads `count` objects from both; they must be equal once normalized and put in
    /// revision order (responses of different watchers may interleave differently).
    async fn same(&mut self, count: usize) -> Vec<Value> {
        let mut expected = self.etcd.next_results(count).await;
        let mut actual = self.subject.next_results(count).await;
        let order = |v: &Value| {
            let result = &v["result"];
            let revision = result["header"]["revision"].as_str().unwrap_or("0");
            let watch_id = result["watch_id"].as_str().unwrap_or("0");
            (revision.parse::<i64>().ok(), watch_id.parse::<i64>().ok())
        };
        expected.sort_by_key(order);
        actual.sort_by_key(order);
        assert_eq!(actual, expected, "{}", self.subject.what);
        expected
    }

    /// Both bodies end here.
    async fn ended(&mut self) {
        assert_eq!(self.etcd.next_json().await, None, "{}", self.etcd.what);
        assert_eq!(
            self.subject.next_json().await,
            None,
            "{}",
            self.subject.what
        );
    }
}

/// Puts over gRPC, as another client of the same cluster would.
async fn put_both(pair: &Pair, key: &str, value: &str) {
    for server in [&pair.etcd, &pair.subject] {
        let mut client = server.client().await;
        client.put(key, value, None).await.expect("put");
    }
}

/// Watch requests as one body: etcd 3.4's gateway answers nothing before the request body
/// has ended, so a client sends all its requests at once.
fn watch_body(requests: &[Value]) -> String {
    let requests: Vec<String> = requests.iter().map(Value::to_string).collect();
    requests.join("\n")
}

#[tokio::test]
async fn watch_streams_match_etcd() {
    let pair = Pair::start().await;
    put_both(&pair, "a/0", "before").await;

    // Two watchers on one stream: a key, and a prefix with previous values.
    let body = watch_body(&[
        json!({"create_request": {"key": b64(b"foo")}}),
        json!({"create_request": {"key": b64(b"a/"), "range_end": b64(b"a0"), "prev_kv": true}}),
    ]);
    let mut watch = StreamPair::open(&pair, "/v3/watch", &body).await;
    let created = watch.same(2).await;
    assert!(created
        .iter()
        .all(|r| r["result"]["created"] == json!(true)));

    // Writes over gRPC are streamed as they happen.
    put_both(&pair, "foo", "1").await;
    put_both(&pair, "a/0", "after").await;
    put_both(&pair, "b", "unwatched").await;
    for server in [&pair.etcd, &pair.subject] {
        let mut client = server.client().await;
        client.delete("foo", None).await.expect("delete");
    }
    let events = watch.same(3).await;
    let prev_value = &events[1]["result"]["events"][0]["prev_kv"]["value"];
    assert_eq!(prev_value, &json!(b64(b"before")));
    assert_eq!(events[2]["result"]["events"][0]["type"], json!("DELETE"));
    // The client goes away; the server drops the watchers with the connection.
    drop(watch);

    for server in [&pair.etcd, &pair.subject] {
        let mut client = server.client().await;
        client.compact(4, None).await.expect("compact");
    }
    // In order: a watch from a compacted revision (cancelled with the compaction revision),
    // an empty range (refused), a watch with a chosen id and its cancellation, a live watch,
    // and a bad value, which ends the requests but not the stream.
    let body = watch_body(&[
        json!({"create_request": {"key": b64(b"a/"), "range_end": b64(b"a0"), "start_revision": 2}}),
        json!({"create_request": {"key": b64(b"b"), "range_end": b64(b"a")}}),
        json!({"create_request": {"key": b64(b"foo"), "watch_id": "7"}}),
        json!({"cancel_request": {"watch_id": "7"}}),
        json!({"create_request": {"key": b64(b"z"), "watch_id": "8"}}),
        json!("not a request"),
    ]);
    let mut watch = StreamPair::open(&pair, "/v3/watch", &body).await;
    let answers = watch.same(6).await;
    let canceled = answers
        .iter()
        .filter(|r| r["result"]["canceled"] == json!(true));
    assert_eq!(canceled.count(), 3, "{answers:?}");
    // Only the live watch streams: foo's watcher is gone.
    put_both(&pair, "foo", "2").await;
    put_both(&pair, "z", "3").await;
    let events = watch.same(1).await;
    assert_eq!(
        events[0]["result"]["events"][0]["kv"]["key"],
        json!(b64(b"z"))
    );
    drop(watch);

    // A bad first request is refused with an ordinary error, as Go's decoder error: Unknown.
    for body in [&b"{bad"[..], b"[]"] {
        let (expected, actual) = pair.both("POST", "/v3/watch", body).await;
        let (expected, actual) = (expected.json(), actual.json());
        assert_eq!(actual["code"], expected["code"]);
        assert_eq!(actual["code"], json!(2), "{actual}");
    }
}

#[tokio::test]
async fn lease_requests_match_etcd() {
    let pair = Pair::start().await;
    // Explicit lease ids, so both servers answer the same ids.
    pair.same("/v3/lease/grant", json!({"ID": "1000", "TTL": "60"}))
        .await;
    pair.same("/v3/lease/grant", json!({"ID": 1001, "TTL": 30}))
        .await;
    pair.same("/v3/lease/grant", json!({"ID": "1000", "TTL": "60"}))
        .await; // already exists
    pair.same(
        "/v3/kv/put",
        json!({"key": b64(b"held"), "value": b64(b"v"), "lease": "1000"}),
    )
    .await;

    // Time to live: the remaining TTL may differ by the second ticking between the two.
    for path in ["/v3/lease/timetolive", "/v3/kv/lease/timetolive"] {
        let body = json!({"ID": "1000", "keys": true}).to_string();
        let (expected, actual) = pair.both("POST", path, body.as_bytes()).await;
        let (mut expected, mut actual) = (normalize(expected.json()), normalize(actual.json()));
        for answer in [&mut expected, &mut actual] {
            let ttl: i64 = answer["TTL"].as_str().unwrap().parse().unwrap();
            assert!((58..=60).contains(&ttl), "{answer}");
            answer.as_object_mut().unwrap().remove("TTL");
        }
        assert_eq!(actual, expected, "{path}");
        assert_eq!(actual["grantedTTL"], json!("60"));
        assert_eq!(actual["keys"], json!([b64(b"held")]));
    }
    pair.same("/v3/lease/timetolive", json!({"ID": "999"}))
        .await;
    for path in ["/v3/lease/leases", "/v3/kv/lease/leases"] {
        let (expected, actual) = pair.both("POST", path, b"{}").await;
        let sorted = |answer: Value| {
            let mut answer = normalize(answer);
            let leases = answer["leases"].as_array_mut().expect("leases");
            leases.sort_by_key(|l| l["ID"].as_str().unwrap().to_string());
            answer
        };
        assert_eq!(sorted(actual.json()), sorted(expected.json()), "{path}");
    }

    // Keep-alive: one result per request, the stream ends with the body; an unknown lease
    // answers TTL 0 (omitted).
    let requests = json!({"ID": "1000"}).to_string() + r#" {"ID":"1001"}"# + r#" {"ID":"999"}"#;
    let mut keep_alive = StreamPair::open(&pair, "/v3/lease/keepalive", &requests).await;
    let answers = keep_alive.same(3).await;
    assert_eq!(answers[0]["result"]["TTL"], json!("60"));
    assert!(answers[2]["result"].get("TTL").is_none());
    keep_alive.ended().await;

    // An empty body: 200 and an empty stream. A bad first request: Unknown, 500.
    let (expected, actual) = pair.both("POST", "/v3/lease/keepalive", b"").await;
    assert_eq!((actual.status, actual.body.len()), (200, 0));
    assert_eq!(expected.body.len(), 0);
    let (expected, actual) = pair
        .both("POST", "/v3/lease/keepalive", br#"{"ID":"x"}"#)
        .await;
    assert_eq!(actual.json()["code"], expected.json()["code"]);

    // Revoke, under both paths; the key goes with the lease.
    pair.same("/v3/lease/revoke", json!({"ID": "1000"})).await;
    pair.same("/v3/kv/lease/revoke", json!({"ID": "1001"}))
        .await;
    pair.same("/v3/kv/lease/revoke", json!({"ID": "1001"}))
        .await; // not found
    let answer = pair
        .same("/v3/kv/range", json!({"key": b64(b"held")}))
        .await;
    assert!(answer.get("kvs").is_none(), "{answer}");
}

#[tokio::test]
async fn lock_and_election_match_etcd() {
    let pair = Pair::start().await;
    // Sessions with explicit lease ids: the recipes' keys (name/<lease in hex>) agree.
    for id in ["2000", "2001"] {
        pair.same("/v3/lease/grant", json!({"ID": id, "TTL": "60"}))
            .await;
    }

    let lock = pair
        .same(
            "/v3/lock/lock",
            json!({"name": b64(b"lk"), "lease": "2000"}),
        )
        .await;
    assert_eq!(lock["key"], json!(b64(b"lk/7d0")));
    pair.same("/v3/lock/unlock", json!({"key": b64(b"lk/7d0")}))
        .await;
    pair.same("/v3/lock/lock", json!({"name": b64(b"lk"), "lease": "5"}))
        .await; // lease not found

    let name = b64(b"el");
    pair.same("/v3/election/leader", json!({"name": name}))
        .await; // no leader
    let campaign = pair
        .same(
            "/v3/election/campaign",
            json!({"name": name, "lease": "2000", "value": b64(b"v1")}),
        )
        .await;
    let leader = campaign["leader"].clone();
    assert_eq!(leader["key"], json!(b64(b"el/7d0")));

    // Observe streams the leader now, then each change.
    let mut observe = StreamPair::open(
        &pair,
        "/v3/election/observe",
        &json!({"name": name}).to_string(),
    )
    .await;
    let first = observe.same(1).await;
    assert_eq!(first[0]["result"]["kv"]["value"], json!(b64(b"v1")));
    pair.same(
        "/v3/election/proclaim",
        json!({"leader": leader, "value": b64(b"v2")}),
    )
    .await;
    let proclaimed = observe.same(1).await;
    assert_eq!(proclaimed[0]["result"]["kv"]["value"], json!(b64(b"v2")));
    pair.same("/v3/election/leader", json!({"name": name}))
        .await;

    let errors = [
        ("/v3/election/proclaim", json!({"value": b64(b"x")})),
        (
            "/v3/election/proclaim",
            json!({"leader": {"name": name, "key": b64(b"el/1"), "rev": "1", "lease": "1"}}),
        ),
        ("/v3/election/resign", json!({})),
    ];
    for (path, body) in errors {
        let answer = pair.same(path, body).await;
        assert_eq!(answer["code"], json!(2), "{path}: {answer}");
    }

    // The leader resigns; the next candidate leads and observers see it.
    pair.same("/v3/election/resign", json!({"leader": leader}))
        .await;
    pair.same(
        "/v3/election/campaign",
        json!({"name": name, "lease": "2001", "value": b64(b"v3")}),
    )
    .await;
    let next = observe.same(1).await;
    assert_eq!(next[0]["result"]["kv"]["key"], json!(b64(b"el/7d1")));
    drop(observe);

    // Observe's one request decodes like a unary request: InvalidArgument.
    pair.same_decode_error("/v3/election/observe", b"{bad")
        .await;
}

#[tokio::test]
async fn maintenance_endpoints_match_etcd() {
    let pair = Pair::start().await;
    // etcd 3.4 serves Hash at /v3/maintenance/hash (HashKV's annotation is shadowed by it).
    // The hash values differ: etcd hashes its bolt file.
    let (expected, actual) = pair.both("POST", "/v3/maintenance/hash", b"{}").await;
    let (expected, actual) = (expected.json(), actual.json());
    assert!(
        expected["hash"].is_u64() && actual["hash"].is_u64(),
        "{actual}"
    );
    assert_eq!(actual["header"]["revision"], expected["header"]["revision"]);
    let (expected, actual) = pair.both("POST", "/v3/maintenance/hashkv", b"{}").await;
    assert_eq!(actual.body, expected.body);

    pair.same(
        "/v3/maintenance/transfer-leadership",
        json!({"targetID": "1"}),
    )
    .await;
    // Alarm and Defragment: etcd 3.4 answers them without a header (3.5 fills the alarm's).
    for (path, body) in [
        ("/v3/maintenance/alarm", json!({"action": "GET"})),
        (
            "/v3/maintenance/alarm",
            json!({"action": "DEACTIVATE", "alarm": "NOSPACE"}),
        ),
        ("/v3/maintenance/defragment", json!({})),
    ] {
        let (expected, actual) = pair.both("POST", path, body.to_string().as_bytes()).await;
        let without_header = |answer: Value| {
            let mut answer = answer;
            answer.as_object_mut().unwrap().remove("header");
            answer
        };
        assert_eq!(
            without_header(actual.json()),
            without_header(expected.json()),
            "{path}"
        );
    }
}
