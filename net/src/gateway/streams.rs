//! The gateway's streaming endpoints, as grpc-gateway v1.9 (etcd 3.4) serves them.
//!
//! Requests: a client-streaming method (`/v3/watch`, `/v3/lease/keepalive`) reads JSON
//! values one after another from the request body, as Go's `json.Decoder` does, and feeds
//! them to the service as its request stream while the response streams. A bad first value
//! is refused with an ordinary error response (gRPC code Unknown, HTTP 500: Go's decoder
//! error is no gRPC status); a bad later value ends the request stream, as etcd's gateway
//! then closes its send side. A body that breaks (an I/O error: the client went away or
//! half-closed short of its `Content-Length`) ends the whole call instead: Go's HTTP server
//! cancels the request's context then, which ends etcd's gateway call, whereas a clean end of
//! the body only closes the send side and a watch goes on streaming. A server-streaming
//! method (`/v3/election/observe`, `/v3/maintenance/snapshot`) decodes its one request like a
//! unary endpoint.
//!
//! Responses: the head is written with the first response message (a gRPC server sends its
//! headers with it, and etcd's gateway waits for them), so an error before any message is an
//! ordinary error response. Then each message is one `{"result":{...}}` line, flushed as it
//! comes; an error after the first message is written as grpc-gateway's stream error chunk
//! `{"error":{"grpc_code":..,"http_code":..,"message":..,"http_status":..}}` and ends the
//! response. The response ends when the service's stream ends; dropping it (the client went
//! away) drops the service's stream and with it the request stream.

use std::convert::Infallible;

use ::http::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use ::http::Response;
use bytes::{BufMut, Bytes, BytesMut};
use futures::channel::oneshot;
use futures::future::{self, BoxFuture, Either, FutureExt};
use futures::stream::{self, StreamExt};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Incoming;
use serde::de::{DeserializeOwned, IgnoredAny};
use serde::Serialize;
use tonic::body::Body;
use tonic::codegen::BoxStream;
use tonic::{Status, Streaming};
use tonic_prost::ProstDecoder;

use super::{error_response, grpc_request, http_status, parse_json, BoxCall};

/// What a streaming service method returns.
pub(super) type StreamCall<'a, Resp> = BoxCall<'a, BoxStream<Resp>>;

/// gRPC's message framing: a compression flag byte and a big-endian u32 length.
const GRPC_FRAME_HEADER_BYTES: usize = 5;

/// JSON values read one at a time off a request body.
pub(super) struct JsonValues {
    body: Incoming,
    /// Received bytes not yet decoded. Rescanned from its start after each read while no
    /// value is complete: quadratic in a value's size, which `max_value_bytes` bounds, and
    /// requests are small (a watch create, a lease id).
    buffer: Vec<u8>,
    ended: bool,
    /// One JSON value longer than this is refused (it would decode to an oversized message).
    max_value_bytes: usize,
}

impl JsonValues {
    pub(super) fn new(body: Incoming, max_value_bytes: usize) -> JsonValues {
        JsonValues {
            body,
            buffer: Vec::new(),
            ended: false,
            max_value_bytes,
        }
    }

    /// The next value decoded as a `Req`; `None` at the end of the body.
    pub(super) async fn next<Req: DeserializeOwned + Default>(
        &mut self,
    ) -> Option<Result<Req, Status>> {
        loop {
            match first_value_bytes(&self.buffer) {
                Ok(Some(size_bytes)) => {
                    let value = parse_json::<Req>(&self.buffer[..size_bytes]);
                    self.buffer.drain(..size_bytes);
                    return Some(value);
                }
                Ok(None) => {}
                Err(error) => return Some(Err(Status::invalid_argument(error.to_string()))),
            }
            if self.ended {
                return match self.buffer.trim_ascii().is_empty() {
                    true => None,
                    false => Some(Err(Status::invalid_argument("unexpected EOF"))),
                };
            }
            if self.buffer.len() > self.max_value_bytes {
                return Some(Err(Status::resource_exhausted(format!(
                    "grpc: received message larger than max (over {} JSON bytes)",
                    self.max_value_bytes
                ))));
            }
            match self.body.frame().await {
                None => self.ended = true,
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buffer.extend_from_slice(&data);
                    }
                }
                // The one source of `Cancelled` here (`request_stream` tells it apart by it), as the
                // unary endpoints answer it (408).
                Some(Err(error)) => return Some(Err(Status::cancelled(error.to_string()))),
            }
        }
    }
}

/// Resolves when the request body broke; never when it ended cleanly or is still open.
pub(super) type BodyBroken = BoxFuture<'static, Status>;

/// A `BodyBroken` for a call whose body was read whole before the call.
pub(super) fn body_read_whole() -> BodyBroken {
    future::pending().boxed()
}

/// The length of the first complete JSON value in `buffer` (with the whitespace before
/// it); `None` while no value is complete yet.
fn first_value_bytes(buffer: &[u8]) -> Result<Option<usize>, serde_json::Error> {
    let mut values = serde_json::Deserializer::from_slice(buffer).into_iter::<IgnoredAny>();
    match values.next() {
        None => Ok(None),
        Some(Ok(IgnoredAny)) => Ok(Some(values.byte_offset())),
        Some(Err(error)) if error.is_eof() => Ok(None),
        Some(Err(error)) => Err(error),
    }
}

/// The request stream a client-streaming service method reads: `first`, then every later
/// value of `values` up to the end of the body or the first one that does not decode.
/// tonic's `Streaming` decodes gRPC frames, so each message is framed as on the wire; it
/// also holds each message to the gRPC receive limit. The second half resolves if the body
/// breaks, which must end the call (see the module doc).
pub(super) fn request_stream<Req>(
    first: Option<Req>,
    values: JsonValues,
    max_message_bytes: usize,
) -> (Streaming<Req>, BodyBroken)
where
    Req: prost::Message + DeserializeOwned + Default + Send + 'static,
{
    let (broke, broken) = oneshot::channel::<Status>();
    let rest = stream::unfold((values, broke), |(mut values, broke)| async move {
        match values.next::<Req>().await {
            Some(Ok(request)) => Some((request, (values, broke))),
            Some(Err(status)) if status.code() == tonic::Code::Cancelled => {
                let _ = broke.send(status);
                None
            }
            // etcd's gateway stops sending at a bad value and closes its side.
            Some(Err(_)) | None => None,
        }
    });
    let frames = stream::iter(first)
        .chain(rest)
        .map(|request| Ok::<_, Infallible>(Frame::data(grpc_frame(&request))));
    let requests = Streaming::new_request(
        ProstDecoder::<Req>::default(),
        StreamBody::new(frames),
        None,
        Some(max_message_bytes),
    );
    // A sender dropped without a word is a body that ended cleanly: never resolves.
    let broken = broken.then(|broke| match broke {
        Ok(status) => future::ready(status).boxed(),
        Err(oneshot::Canceled) => future::pending().boxed(),
    });
    (requests, broken.boxed())
}

fn grpc_frame<M: prost::Message>(message: &M) -> Bytes {
    let size_bytes = message.encoded_len();
    let mut frame = BytesMut::with_capacity(GRPC_FRAME_HEADER_BYTES + size_bytes);
    frame.put_u8(0); // Not compressed.
    frame.put_u32(u32::try_from(size_bytes).expect("a message under 4 GiB"));
    message
        .encode(&mut frame)
        .expect("the buffer has room for the message");
    frame.freeze()
}

/// Reads the first request of a client-streaming call: a decode error there is refused as
/// etcd's gateway refuses it (code Unknown: Go's decoder error carries no gRPC code).
pub(super) async fn first_request<Req: DeserializeOwned + Default>(
    values: &mut JsonValues,
) -> Result<Option<Req>, Response<Body>> {
    match values.next::<Req>().await {
        None => Ok(None),
        Some(Ok(request)) => Ok(Some(request)),
        Some(Err(status)) => Err(error_response(&Status::unknown(status.message()))),
    }
}

/// Calls a streaming method with `message` (a request or a request stream) and writes its
/// responses as grpc-gateway does, until the service's stream ends or the body breaks.
pub(super) async fn call_streaming<S, M, Resp, F>(
    service: &S,
    call: &F,
    headers: &HeaderMap,
    message: M,
    broken: BodyBroken,
) -> Response<Body>
where
    Resp: Serialize + Send + 'static,
    F: for<'a> Fn(&'a S, tonic::Request<M>) -> StreamCall<'a, Resp>,
{
    let responses = match call(service, grpc_request(headers, message)).await {
        Ok(response) => until_broken(response.into_inner(), broken),
        Err(status) => return error_response(&status),
    };
    // Fused: a service's stream need not support being polled after its end.
    let mut responses = responses.fuse();
    let first = match responses.next().await {
        None => None,
        Some(Err(status)) => return error_response(&status),
        Some(Ok(first)) => Some(first),
    };
    let rest = stream::unfold(Some(responses), |responses| async move {
        let mut responses = responses?;
        match responses.next().await? {
            Ok(response) => Some((result_chunk(&response), Some(responses))),
            // The error is the last chunk.
            Err(status) => Some((error_chunk(&status), None)),
        }
    });
    let chunks = stream::iter(first.map(|first| result_chunk(&first)))
        .chain(rest)
        .map(|chunk| Ok::<_, Infallible>(Frame::data(chunk)));
    // No length: hyper sends the body chunked, each chunk as the stream yields it.
    let mut response = Response::new(Body::new(StreamBody::new(chunks)));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// The service's responses, ended by an error if the body breaks first (before the first
/// message that is an error response, after it the stream's last chunk).
fn until_broken<Resp: Send + 'static>(
    responses: BoxStream<Resp>,
    broken: BodyBroken,
) -> BoxStream<Resp> {
    let responses = stream::unfold(Some((responses, broken)), |state| async move {
        let (mut responses, mut broken) = state?;
        // The body first: etcd answers a body broken before the first message with the
        // error even when the service had something to say.
        let next = match future::select(&mut broken, responses.next()).await {
            Either::Left((status, _)) => Err(status),
            Either::Right((response, _)) => Ok(response),
        };
        match next {
            Ok(Some(response)) => Some((response, Some((responses, broken)))),
            Ok(None) => None,
            Err(status) => Some((Err(status), None)),
        }
    });
    responses.boxed()
}

/// One response message of a stream: `{"result":<message>}` and a newline.
fn result_chunk<Resp: Serialize>(response: &Resp) -> Bytes {
    let mut chunk = br#"{"result":"#.to_vec();
    match serde_json::to_writer(&mut chunk, response) {
        Ok(()) => {
            chunk.extend_from_slice(b"}\n");
            Bytes::from(chunk)
        }
        // grpc-gateway ends the stream with an error chunk when a message fails to marshal.
        Err(error) => error_chunk(&Status::internal(format!(
            "failed to marshal response chunk: {error}"
        ))),
    }
}

/// grpc-gateway v1's stream error: `internal.StreamError` in jsonpb, fields in proto order,
/// no delimiter after it.
fn error_chunk(status: &Status) -> Bytes {
    let http_code = http_status(status.code());
    let quoted = |text: &str| serde_json::to_string(text).expect("a string always serializes");
    let chunk = format!(
        r#"{{"error":{{"grpc_code":{},"http_code":{},"message":{},"http_status":{}}}}}"#,
        status.code() as i32,
        http_code.as_u16(),
        quoted(status.message()),
        quoted(http_code.canonical_reason().unwrap_or_default()),
    );
    Bytes::from(chunk)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_values_are_found_in_a_growing_buffer() {
        assert_eq!(first_value_bytes(b"").unwrap(), None);
        assert_eq!(first_value_bytes(b"  \n ").unwrap(), None);
        assert_eq!(first_value_bytes(br#" {"a":"#).unwrap(), None);
        assert_eq!(first_value_bytes(b"nul").unwrap(), None);
        assert_eq!(first_value_bytes(br#" {"a":1} {"b""#).unwrap(), Some(8));
        assert_eq!(first_value_bytes(b"null{}").unwrap(), Some(4));
        assert!(first_value_bytes(b"{bad").is_err());
        assert!(first_value_bytes(b"}").is_err());
    }

    #[test]
    fn chunks_are_grpc_gateway_v1_lines() {
        let response = ferrocd_api::etcdserverpb::LeaseKeepAliveResponse {
            id: 7,
            ttl: 0,
            header: None,
        };
        assert_eq!(
            &result_chunk(&response)[..],
            b"{\"result\":{\"ID\":\"7\"}}\n"
        );
        assert_eq!(
            &error_chunk(&Status::not_found("etcdserver: requested lease not found"))[..],
            br#"{"error":{"grpc_code":5,"http_code":404,"message":"etcdserver: requested lease not found","http_status":"Not Found"}}"#
        );
    }

    #[test]
    fn requests_are_framed_as_grpc_messages() {
        let request = ferrocd_api::etcdserverpb::LeaseKeepAliveRequest { id: 300 };
        let frame = grpc_frame(&request);
        assert_eq!(&frame[..5], &[0, 0, 0, 0, 3]);
        assert_eq!(
            <ferrocd_api::etcdserverpb::LeaseKeepAliveRequest as prost::Message>::decode(
                &frame[5..]
            )
            .unwrap(),
            request
        );
    }
}
