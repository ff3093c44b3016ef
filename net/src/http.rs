//! Plain HTTP endpoints served next to gRPC on the client port, as etcd does:
//! `/health` and `/version` (later `/metrics`; the `/v3/...` JSON gateway is `gateway.rs`).
//!
//! Responses copy etcd 3.5's bytes (status codes, content types, JSON field order), because
//! load balancers and scripts match on them. Errors use the shape of Go's `http.Error`.

use std::future::{ready, Future};
use std::pin::Pin;
use std::sync::Arc;

use ::http::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use ::http::{Method, Request, Response, StatusCode};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use tonic::body::Body;

/// The etcd server version we report on `/version`. We implement etcd's 3.5 API.
pub const SERVER_VERSION: &str = "3.5.0";
/// The cluster version we report on `/version` (etcd reports `major.minor.0`).
pub const CLUSTER_VERSION: &str = "3.5.0";

/// Path of etcd's health endpoint.
pub const PATH_HEALTH: &str = "/health";
/// Path of etcd's version endpoint.
pub const PATH_VERSION: &str = "/version";

/// The future an HTTP or gRPC handler returns. It need not be `Send`: connections are
/// served on the glommio executor that accepted them and never move.
pub type ResponseFuture = Pin<Box<dyn Future<Output = Response<Body>>>>;

/// A plain HTTP endpoint. Shared by every connection of a core (and across cores), hence
/// `Send + Sync`.
pub type HttpHandler = Arc<dyn Fn(Request<Incoming>) -> ResponseFuture + Send + Sync>;

/// What a `/health` request asks for, parsed from its query string as etcd does.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HealthQuery {
    /// `?serializable=true`: answer from local state, without a linearizable read.
    pub serializable: bool,
    /// `?exclude=NOSPACE` (repeatable): alarm names that must not make the member unhealthy.
    pub excluded_alarms: Vec<String>,
}

/// The outcome of a health check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    pub healthy: bool,
    /// Why the member is unhealthy (etcd: e.g. "RAFT NO LEADER", "ALARM NOSPACE"); empty when healthy.
    pub reason: String,
}

impl Health {
    pub fn ok() -> Self {
        Health {
            healthy: true,
            reason: String::new(),
        }
    }

    pub fn failed(reason: impl Into<String>) -> Self {
        Health {
            healthy: false,
            reason: reason.into(),
        }
    }

    /// etcd 3.5's JSON: `{"health":"true","reason":""}`.
    pub fn to_json(&self) -> String {
        format!(
            r#"{{"health":"{}","reason":"{}"}}"#,
            self.healthy,
            json_escape(&self.reason)
        )
    }
}

/// `/health`: GET only; runs `check` and answers 200 with the JSON when healthy, 503 with
/// the JSON (as a Go `http.Error` body) when not.
pub fn health_handler<F, Fut>(check: F) -> HttpHandler
where
    F: Fn(HealthQuery) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Health> + 'static,
{
    let check = Arc::new(check);
    Arc::new(move |req: Request<Incoming>| -> ResponseFuture {
        if req.method() != Method::GET {
            return Box::pin(ready(method_not_allowed(Method::GET)));
        }
        let query = parse_health_query(req.uri().query().unwrap_or(""));
        let check = Arc::clone(&check);
        Box::pin(async move { health_response(&check(query).await) })
    })
}

/// `/version`: GET only; `{"etcdserver":"3.5.0","etcdcluster":"3.5.0"}`.
pub fn version_handler() -> HttpHandler {
    Arc::new(|req: Request<Incoming>| -> ResponseFuture {
        let response = if req.method() == Method::GET {
            respond(StatusCode::OK, "application/json", version_json())
        } else {
            method_not_allowed(Method::GET)
        };
        Box::pin(ready(response))
    })
}

/// The `/version` body, with field order as etcd's `version.Versions`.
pub fn version_json() -> String {
    format!(r#"{{"etcdserver":"{SERVER_VERSION}","etcdcluster":"{CLUSTER_VERSION}"}}"#)
}

/// Serves a plain HTTP request as etcd's access controller does with its default `--cors`
/// (`*`): every response carries CORS headers and a preflight (`OPTIONS`) is answered 200 at
/// once, whatever the path. `handler` is the route for the path; none answers 404.
pub fn with_access_control(req: Request<Incoming>, handler: Option<HttpHandler>) -> ResponseFuture {
    let response: ResponseFuture = match handler {
        _ if req.method() == Method::OPTIONS => Box::pin(ready(Response::new(Body::empty()))),
        Some(handler) => handler(req),
        None => Box::pin(ready(not_found())),
    };
    Box::pin(async move { with_cors_headers(response.await) })
}

fn with_cors_headers(mut response: Response<Body>) -> Response<Body> {
    let headers = response.headers_mut();
    headers.insert("access-control-allow-origin", HeaderValue::from_static("*"));
    headers.insert(
        "access-control-allow-methods",
        HeaderValue::from_static("POST, GET, OPTIONS, PUT, DELETE"),
    );
    headers.insert(
        "access-control-allow-headers",
        HeaderValue::from_static("accept, content-type, authorization"),
    );
    response
}

/// Go's `http.NotFound`, which etcd's mux answers for unknown paths.
pub fn not_found() -> Response<Body> {
    go_error(StatusCode::NOT_FOUND, "404 page not found")
}

fn health_response(health: &Health) -> Response<Body> {
    if health.healthy {
        // etcd writes no Content-Type here; Go sniffs JSON text as plain text.
        respond(StatusCode::OK, TEXT_PLAIN, health.to_json())
    } else {
        go_error(StatusCode::SERVICE_UNAVAILABLE, &health.to_json())
    }
}

pub(crate) fn method_not_allowed(allowed: Method) -> Response<Body> {
    let mut response = go_error(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed");
    let allow =
        HeaderValue::from_str(allowed.as_str()).expect("method names are valid header values");
    response.headers_mut().insert(ALLOW, allow);
    response
}

const TEXT_PLAIN: &str = "text/plain; charset=utf-8";

/// Go's `http.Error`: plain text, newline-terminated, with `nosniff`.
pub(crate) fn go_error(status: StatusCode, message: &str) -> Response<Body> {
    let mut response = respond(status, TEXT_PLAIN, format!("{message}\n"));
    response.headers_mut().insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    response
}

pub(crate) fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: String,
) -> Response<Body> {
    let mut response = Response::new(Body::new(Full::new(Bytes::from(body))));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn parse_health_query(query: &str) -> HealthQuery {
    let mut serializable = None;
    let mut excluded_alarms = Vec::new();
    for (key, value) in query_pairs(query) {
        match key.as_str() {
            // Go's `Query().Get` takes the first value.
            "serializable" => {
                serializable.get_or_insert(value == "true");
            }
            "exclude" if !value.is_empty() && !excluded_alarms.contains(&value) => {
                excluded_alarms.push(value);
            }
            _ => {}
        }
    }
    HealthQuery {
        serializable: serializable.unwrap_or(false),
        excluded_alarms,
    }
}

/// `application/x-www-form-urlencoded` pairs, decoded (`+` is a space, `%XX` a byte).
fn query_pairs(query: &str) -> impl Iterator<Item = (String, String)> + '_ {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(key), percent_decode(value))
        })
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match hex_pair(bytes[i + 1], bytes[i + 2]) {
                Some(byte) => {
                    out.push(byte);
                    i += 2;
                }
                None => out.push(b'%'),
            },
            other => out.push(other),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_pair(high: u8, low: u8) -> Option<u8> {
    let digit = |c: u8| (c as char).to_digit(16);
    Some((digit(high)? * 16 + digit(low)?) as u8)
}

/// JSON string escaping as Go's `encoding/json` does it (including `<`, `>`, `&`).
fn json_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || matches!(c, '<' | '>' | '&') => {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_json_matches_etcd() {
        assert_eq!(Health::ok().to_json(), r#"{"health":"true","reason":""}"#);
        assert_eq!(
            Health::failed("RAFT NO LEADER").to_json(),
            r#"{"health":"false","reason":"RAFT NO LEADER"}"#
        );
    }

    #[test]
    fn json_escape_follows_go() {
        assert_eq!(
            json_escape("a\"b\\c\n<&>\u{1}"),
            r#"a\"b\\c\n\u003c\u0026\u003e\u0001"#
        );
    }

    #[test]
    fn version_json_matches_etcd_shape() {
        assert_eq!(
            version_json(),
            r#"{"etcdserver":"3.5.0","etcdcluster":"3.5.0"}"#
        );
    }

    #[test]
    fn health_query_parses_etcd_parameters() {
        let query = parse_health_query(
            "exclude=NOSPACE&serializable=true&exclude=CORRUPT&exclude=NOSPACE&exclude=",
        );
        assert_eq!(
            query,
            HealthQuery {
                serializable: true,
                excluded_alarms: vec!["NOSPACE".to_string(), "CORRUPT".to_string()],
            }
        );
        assert_eq!(parse_health_query(""), HealthQuery::default());
        assert!(!parse_health_query("serializable=1").serializable);
        assert!(parse_health_query("serializable=true&serializable=false").serializable);
        assert!(!parse_health_query("serializable=false&serializable=true").serializable);
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b+c%2"), "a b c%2");
        assert_eq!(percent_decode("%zz%41"), "%zzA");
    }
}
