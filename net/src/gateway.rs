//! etcd's HTTP/JSON gateway (grpc-gateway in etcd 3.4) on the client port: `POST /v3/kv/range`
//! with a JSON body answers what the gRPC `KV.Range` answers, as JSON.
//!
//! Each endpoint decodes the body into the gRPC request message, calls the same service
//! implementation the gRPC route serves, and writes the response in proto3 JSON as etcd's
//! gateway does (`jsonpb` with original field names; the serde impls come from pbjson in the
//! `api` crate): snake_case proto names on output, 64-bit integers as strings, bytes as
//! base64, enums by name, default values omitted. Errors are grpc-gateway v1's:
//! `{"error":"<message>","message":"<message>","code":<grpc code>}` with the HTTP status
//! grpc-gateway maps the gRPC code to.
//!
//! The table of endpoints is [`Gateway::new`]: one line per endpoint, exactly the paths of
//! etcd 3.4's `google.api.http` annotations. Streaming endpoints (`/v3/watch`,
//! `/v3/lease/keepalive`, `/v3/election/observe`, `/v3/maintenance/snapshot`) read a
//! sequence of JSON request objects from the body and write newline-delimited
//! `{"result":{...}}` objects as a chunked response (see [`streams`]).

use std::collections::HashMap;
use std::future::{ready, Future};
use std::pin::Pin;
use std::sync::Arc;

use ::http::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use ::http::{Method, Request, Response, StatusCode};
use bytes::Bytes;
use ferrocd_api::etcdserverpb::auth_server::Auth;
use ferrocd_api::etcdserverpb::cluster_server::Cluster;
use ferrocd_api::etcdserverpb::kv_server::Kv;
use ferrocd_api::etcdserverpb::lease_server::Lease;
use ferrocd_api::etcdserverpb::maintenance_server::Maintenance;
use ferrocd_api::etcdserverpb::watch_server::Watch;
use ferrocd_api::v3electionpb::election_server::Election;
use ferrocd_api::v3lockpb::lock_server::Lock;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::body::Body;
use tonic::{Code, Status};

use crate::auth::service::AuthService;
use crate::cluster::ClusterService;
use crate::election::ElectionService;
use crate::http::{go_error, HttpHandler, ResponseFuture};
use crate::kv::KvService;
use crate::lease::service::LeaseService;
use crate::lock::LockService;
use crate::transport::max_grpc_message_bytes;
use crate::watch::service::WatchService;
use streams::{JsonValues, StreamCall};

mod streams;

/// Every gateway path starts with this (etcd 3.5 serves only `/v3/`; 3.4 also `/v3beta/`).
pub const PATH_PREFIX: &str = "/v3/";

/// How much larger than the largest gRPC message a JSON body may be: base64 takes 4 bytes
/// for 3, and JSON adds names, quotes and whitespace. The decoded message is then held to
/// etcd's limit exactly, so this only bounds what we buffer.
const JSON_BODY_FACTOR: usize = 2;

/// The services the gateway calls: the same implementations the gRPC routes serve.
pub struct Services {
    pub kv: KvService,
    /// Cluster and Maintenance.
    pub cluster: ClusterService,
    pub lease: LeaseService,
    pub watch: WatchService,
    pub lock: LockService,
    pub election: ElectionService,
    pub auth: AuthService,
}

/// A service method as the generated traits declare it (`async_trait` boxes the future).
type BoxCall<'a, Resp> =
    Pin<Box<dyn Future<Output = Result<tonic::Response<Resp>, Status>> + Send + 'a>>;

/// Serves one gateway path; gets the whole request (a streaming endpoint reads the body as
/// it arrives).
pub type Endpoint = HttpHandler;

/// An endpoint that decodes one request message from the JSON body (an error answers at once)
/// and hands it, with the request's headers, to `respond`.
fn decoding_endpoint<Req, R, Fut>(max_message_bytes: usize, respond: R) -> Endpoint
where
    Req: prost::Message + DeserializeOwned + Default + 'static,
    R: Fn(HeaderMap, Req) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + 'static,
{
    let respond = Arc::new(respond);
    Arc::new(move |req: Request<Incoming>| -> ResponseFuture {
        let respond = Arc::clone(&respond);
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            match decode::<Req>(&parts.headers, body, max_message_bytes).await {
                Ok(message) => respond(parts.headers, message).await,
                Err(status) => error_response(&status),
            }
        })
    })
}

/// The gateway's endpoints by path.
pub struct Gateway {
    endpoints: HashMap<&'static str, Endpoint>,
    /// etcd's gRPC receive limit: larger decoded requests are refused as gRPC refuses them.
    max_message_bytes: usize,
}

impl Gateway {
    /// etcd 3.4's gateway endpoints. `max_request_bytes` is etcd's `--max-request-bytes`.
    /// Methods a service does not implement yet answer its UNIMPLEMENTED error.
    pub fn new(services: Services, max_request_bytes: usize) -> Gateway {
        let Services {
            kv,
            cluster,
            lease,
            watch,
            lock,
            election,
            auth,
        } = services;
        Gateway {
            endpoints: HashMap::new(),
            max_message_bytes: max_grpc_message_bytes(max_request_bytes),
        }
        .unary("/v3/kv/range", kv.clone(), |s, r| s.range(r))
        .unary("/v3/kv/put", kv.clone(), |s, r| s.put(r))
        .unary("/v3/kv/deleterange", kv.clone(), |s, r| s.delete_range(r))
        .unary("/v3/kv/txn", kv.clone(), |s, r| s.txn(r))
        .unary("/v3/kv/compaction", kv, |s, r| s.compact(r))
        .client_streaming("/v3/watch", watch, |s, r| s.watch(r))
        .unary("/v3/lease/grant", lease.clone(), |s, r| s.lease_grant(r))
        // etcd 3.4 also serves three lease endpoints under their old /v3/kv/lease/ paths.
        .unary_at(
            &["/v3/lease/revoke", "/v3/kv/lease/revoke"],
            lease.clone(),
            |s, r| s.lease_revoke(r),
        )
        .client_streaming("/v3/lease/keepalive", lease.clone(), |s, r| {
            s.lease_keep_alive(r)
        })
        .unary_at(
            &["/v3/lease/timetolive", "/v3/kv/lease/timetolive"],
            lease.clone(),
            |s, r| s.lease_time_to_live(r),
        )
        .unary_at(
            &["/v3/lease/leases", "/v3/kv/lease/leases"],
            lease,
            |s, r| s.lease_leases(r),
        )
        .unary("/v3/cluster/member/add", cluster.clone(), |s, r| {
            s.member_add(r)
        })
        .unary("/v3/cluster/member/remove", cluster.clone(), |s, r| {
            s.member_remove(r)
        })
        .unary("/v3/cluster/member/update", cluster.clone(), |s, r| {
            s.member_update(r)
        })
        .unary("/v3/cluster/member/list", cluster.clone(), |s, r| {
            s.member_list(r)
        })
        .unary("/v3/cluster/member/promote", cluster.clone(), |s, r| {
            s.member_promote(r)
        })
        .unary("/v3/maintenance/alarm", cluster.clone(), |s, r| s.alarm(r))
        .unary("/v3/maintenance/status", cluster.clone(), |s, r| {
            s.status(r)
        })
        .unary("/v3/maintenance/defragment", cluster.clone(), |s, r| {
            s.defragment(r)
        })
        // etcd 3.4 annotates Hash and HashKV with the same path; grpc-gateway's mux takes the
        // first registered, Hash, so HashKV has no gateway endpoint there.
        .unary("/v3/maintenance/hash", cluster.clone(), |s, r| s.hash(r))
        .server_streaming("/v3/maintenance/snapshot", cluster.clone(), |s, r| {
            s.snapshot(r)
        })
        .unary("/v3/maintenance/transfer-leadership", cluster, |s, r| {
            s.move_leader(r)
        })
        .unary("/v3/lock/lock", lock.clone(), |s, r| s.lock(r))
        .unary("/v3/lock/unlock", lock, |s, r| s.unlock(r))
        .unary("/v3/election/campaign", election.clone(), |s, r| {
            s.campaign(r)
        })
        .unary("/v3/election/proclaim", election.clone(), |s, r| {
            s.proclaim(r)
        })
        .unary("/v3/election/leader", election.clone(), |s, r| s.leader(r))
        .server_streaming("/v3/election/observe", election.clone(), |s, r| {
            s.observe(r)
        })
        .unary("/v3/election/resign", election, |s, r| s.resign(r))
        .auth_endpoints(auth)
    }

    /// etcd 3.4's `/v3/auth/*` paths (and 3.5's `/v3/auth/status`).
    fn auth_endpoints(self, auth: AuthService) -> Gateway {
        self.unary("/v3/auth/enable", auth.clone(), |s, r| s.auth_enable(r))
            .unary("/v3/auth/disable", auth.clone(), |s, r| s.auth_disable(r))
            .unary("/v3/auth/status", auth.clone(), |s, r| s.auth_status(r))
            .unary("/v3/auth/authenticate", auth.clone(), |s, r| {
                s.authenticate(r)
            })
            .unary("/v3/auth/user/add", auth.clone(), |s, r| s.user_add(r))
            .unary("/v3/auth/user/get", auth.clone(), |s, r| s.user_get(r))
            .unary("/v3/auth/user/getall", auth.clone(), |s, r| s.user_list(r))
            .unary("/v3/auth/user/delete", auth.clone(), |s, r| {
                s.user_delete(r)
            })
            .unary("/v3/auth/user/changepw", auth.clone(), |s, r| {
                s.user_change_password(r)
            })
            .unary("/v3/auth/user/grant", auth.clone(), |s, r| {
                s.user_grant_role(r)
            })
            .unary("/v3/auth/user/revoke", auth.clone(), |s, r| {
                s.user_revoke_role(r)
            })
            .unary("/v3/auth/role/add", auth.clone(), |s, r| s.role_add(r))
            .unary("/v3/auth/role/get", auth.clone(), |s, r| s.role_get(r))
            .unary("/v3/auth/role/getall", auth.clone(), |s, r| s.role_list(r))
            .unary("/v3/auth/role/delete", auth.clone(), |s, r| {
                s.role_delete(r)
            })
            .unary("/v3/auth/role/grant", auth.clone(), |s, r| {
                s.role_grant_permission(r)
            })
            .unary("/v3/auth/role/revoke", auth, |s, r| {
                s.role_revoke_permission(r)
            })
    }

    /// Adds a unary endpoint: the JSON body is decoded into `Req` (an empty body is the
    /// default message, as in etcd), `call` gets it as a gRPC request, its response or
    /// error is written back as JSON.
    fn unary<S, Req, Resp, F>(self, path: &'static str, service: S, call: F) -> Gateway
    where
        S: Send + Sync + 'static,
        Req: prost::Message + DeserializeOwned + Default + 'static,
        Resp: Serialize + 'static,
        F: for<'a> Fn(&'a S, tonic::Request<Req>) -> BoxCall<'a, Resp> + Send + Sync + 'static,
    {
        self.unary_at(&[path], service, call)
    }

    /// A unary endpoint served at each of `paths`.
    fn unary_at<S, Req, Resp, F>(self, paths: &[&'static str], service: S, call: F) -> Gateway
    where
        S: Send + Sync + 'static,
        Req: prost::Message + DeserializeOwned + Default + 'static,
        Resp: Serialize + 'static,
        F: for<'a> Fn(&'a S, tonic::Request<Req>) -> BoxCall<'a, Resp> + Send + Sync + 'static,
    {
        let unary = Arc::new((service, call));
        let endpoint = decoding_endpoint(self.max_message_bytes, move |headers, message: Req| {
            let unary = Arc::clone(&unary);
            async move {
                let (service, call) = &*unary;
                match call(service, grpc_request(&headers, message)).await {
                    Ok(response) => json_response(response.get_ref()),
                    Err(status) => error_response(&status),
                }
            }
        });
        paths.iter().fold(self, |gateway, path| {
            gateway.endpoint(path, endpoint.clone())
        })
    }

    /// Adds a server-streaming endpoint: one request decoded as for a unary endpoint, the
    /// responses streamed.
    fn server_streaming<S, Req, Resp, F>(self, path: &'static str, service: S, call: F) -> Gateway
    where
        S: Send + Sync + 'static,
        Req: prost::Message + DeserializeOwned + Default + 'static,
        Resp: Serialize + Send + 'static,
        F: for<'a> Fn(&'a S, tonic::Request<Req>) -> StreamCall<'a, Resp> + Send + Sync + 'static,
    {
        let streaming = Arc::new((service, call));
        let endpoint = decoding_endpoint(self.max_message_bytes, move |headers, message: Req| {
            let streaming = Arc::clone(&streaming);
            async move {
                let (service, call) = &*streaming;
                let broken = streams::body_read_whole();
                streams::call_streaming(service, call, &headers, message, broken).await
            }
        });
        self.endpoint(path, endpoint)
    }

    /// Adds a client-streaming (bidirectional) endpoint: the body's JSON values are the
    /// request stream, read while the responses stream.
    fn client_streaming<S, Req, Resp, F>(self, path: &'static str, service: S, call: F) -> Gateway
    where
        S: Send + Sync + 'static,
        Req: prost::Message + DeserializeOwned + Default + Send + 'static,
        Resp: Serialize + Send + 'static,
        F: for<'a> Fn(&'a S, tonic::Request<tonic::Streaming<Req>>) -> StreamCall<'a, Resp>
            + Send
            + Sync
            + 'static,
    {
        let max_message_bytes = self.max_message_bytes;
        let streaming = Arc::new((service, call));
        let endpoint: Endpoint = Arc::new(move |req: Request<Incoming>| -> ResponseFuture {
            let streaming = Arc::clone(&streaming);
            Box::pin(async move {
                let (parts, body) = req.into_parts();
                let mut values = JsonValues::new(body, max_message_bytes * JSON_BODY_FACTOR);
                let first = match streams::first_request::<Req>(&mut values).await {
                    Ok(first) => first,
                    Err(response) => return response,
                };
                let (requests, broken) = streams::request_stream(first, values, max_message_bytes);
                let (service, call) = &*streaming;
                streams::call_streaming(service, call, &parts.headers, requests, broken).await
            })
        });
        self.endpoint(path, endpoint)
    }

    /// Adds any endpoint; unary ones go through [`Gateway::unary`], streaming ones will have
    /// their own adapter.
    fn endpoint(mut self, path: &'static str, endpoint: Endpoint) -> Gateway {
        assert!(
            path.starts_with(PATH_PREFIX),
            "gateway path {path} outside {PATH_PREFIX}"
        );
        let previous = self.endpoints.insert(path, endpoint);
        assert!(previous.is_none(), "gateway path {path} registered twice");
        self
    }

    /// The handler to register at [`PATH_PREFIX`]: routes by exact path and refuses other
    /// methods than POST, with grpc-gateway's plain-text errors.
    pub fn into_handler(self) -> HttpHandler {
        let gateway = Arc::new(self);
        Arc::new(move |req: Request<Incoming>| -> ResponseFuture {
            match gateway.endpoints.get(req.uri().path()) {
                Some(endpoint) if req.method() == Method::POST => endpoint(req),
                Some(_) => Box::pin(ready(go_error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "Method Not Allowed",
                ))),
                None => Box::pin(ready(go_error(StatusCode::NOT_FOUND, "Not Found"))),
            }
        })
    }
}

/// Reads and decodes a JSON request body. Like grpc-gateway, an empty body or `null` is the
/// default message and anything after the first JSON value is ignored.
async fn decode<Req>(
    headers: &HeaderMap,
    body: Incoming,
    max_message_bytes: usize,
) -> Result<Req, Status>
where
    Req: prost::Message + DeserializeOwned + Default,
{
    let max_body_bytes = max_message_bytes * JSON_BODY_FACTOR;
    let too_large = |size: String| {
        Status::resource_exhausted(format!(
            "grpc: received message larger than max ({size} vs. {max_message_bytes})"
        ))
    };
    let declared_bytes = headers
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok()?.parse::<usize>().ok());
    if let Some(declared) = declared_bytes.filter(|&n| n > max_body_bytes) {
        return Err(too_large(format!("{declared} JSON bytes")));
    }
    let body = match Limited::new(body, max_body_bytes).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => {
            return Err(too_large(format!("over {max_body_bytes} JSON bytes")));
        }
        Err(error) => return Err(Status::cancelled(error.to_string())),
    };
    let message = parse_json::<Req>(&body)?;
    let size_bytes = message.encoded_len();
    if size_bytes > max_message_bytes {
        return Err(too_large(size_bytes.to_string()));
    }
    Ok(message)
}

/// Parses the first JSON value of `body` as a `Req`; whitespace only or `null` is the
/// default message.
fn parse_json<Req: DeserializeOwned + Default>(body: &[u8]) -> Result<Req, Status> {
    if body.trim_ascii().is_empty() {
        return Ok(Req::default());
    }
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let message: Option<Req> = serde::Deserialize::deserialize(&mut deserializer)
        .map_err(|error| Status::invalid_argument(error.to_string()))?;
    Ok(message.unwrap_or_default())
}

/// The gRPC request a service sees. grpc-gateway passes the `Authorization` header on as the
/// `authorization` metadata, which etcd's auth reads next to `token`.
fn grpc_request<Req>(headers: &HeaderMap, message: Req) -> tonic::Request<Req> {
    let mut request = tonic::Request::new(message);
    let token = headers
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok()?.parse().ok());
    if let Some(token) = token {
        request.metadata_mut().insert("authorization", token);
    }
    request
}

fn json_response<Resp: Serialize>(message: &Resp) -> Response<Body> {
    match serde_json::to_vec(message) {
        Ok(json) => respond_json(StatusCode::OK, json),
        // Only an enum field holding a number outside the enum fails; our services never
        // produce one, but a bug there must not take the connection down.
        Err(error) => error_response(&Status::internal(format!(
            "failed to marshal response: {error}"
        ))),
    }
}

/// grpc-gateway v1's error body and status.
fn error_response(status: &Status) -> Response<Body> {
    let message = serde_json::to_string(status.message()).expect("a string always serializes");
    let body = format!(
        r#"{{"error":{message},"message":{message},"code":{}}}"#,
        status.code() as i32
    );
    respond_json(http_status(status.code()), body.into_bytes())
}

fn respond_json(status: StatusCode, json: Vec<u8>) -> Response<Body> {
    let mut response = Response::new(Body::new(Full::new(Bytes::from(json))));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// grpc-gateway v1's `HTTPStatusFromCode` (the version etcd 3.4 vendors).
fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::REQUEST_TIMEOUT,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::FailedPrecondition => StatusCode::PRECONDITION_FAILED,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrocd_api::etcdserverpb::{range_request::SortOrder, RangeRequest};

    #[test]
    fn json_bodies_decode_like_grpc_gateway() {
        for empty in ["", "  \n", "null", "null trailing"] {
            let request: RangeRequest = parse_json(empty.as_bytes()).unwrap();
            assert_eq!(request, RangeRequest::default(), "body {empty:?}");
        }
        // Both spellings, int64 as string or number, enums by name, trailing text ignored.
        let request: RangeRequest = parse_json(
            br#"{"key":"Zm9v","rangeEnd":"Zm9w","limit":"2","revision":3,"sort_order":"DESCEND"} x"#,
        )
        .unwrap();
        assert_eq!(request.key, b"foo");
        assert_eq!(request.range_end, b"fop");
        assert_eq!((request.limit, request.revision), (2, 3));
        assert_eq!(request.sort_order, SortOrder::Descend as i32);
        // Unknown fields are skipped, as grpc-gateway does.
        let request: RangeRequest = parse_json(br#"{"key":"Zm9v","future_field":1}"#).unwrap();
        assert_eq!(request.key, b"foo");

        for bad in [
            &b"{bad"[..],
            b"[]",
            br#"{"limit":1.5}"#,
            br#"{"key":"!!!"}"#,
        ] {
            let status = parse_json::<RangeRequest>(bad).unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "body {bad:?}");
        }
    }

    #[test]
    fn status_codes_follow_grpc_gateway_v1() {
        assert_eq!(http_status(Code::OutOfRange), StatusCode::BAD_REQUEST);
        assert_eq!(
            http_status(Code::ResourceExhausted),
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(
            http_status(Code::FailedPrecondition),
            StatusCode::PRECONDITION_FAILED
        );
        assert_eq!(http_status(Code::Unauthenticated), StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn authorization_header_becomes_metadata() {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, HeaderValue::from_static("tok.123"));
        let request = grpc_request(&headers, ());
        assert_eq!(request.metadata().get("authorization").unwrap(), "tok.123");
        assert!(grpc_request(&HeaderMap::new(), ())
            .metadata()
            .get("authorization")
            .is_none());
    }
}
