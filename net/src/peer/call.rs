//! Request/response calls over the peer transport.
//!
//! A call travels as a `Request` frame on the caller core's outbound connection to the peer
//! and comes back as a `Response` frame on that same connection, so a call lives and dies
//! with one connection: when the connection it was written to breaks, the call fails at once
//! (`ConnectionLost`) instead of waiting out its timeout. The caller's table of waiting calls
//! is bounded (`max_inflight_calls`); an answer for a call no longer waiting (timed out,
//! cancelled) is dropped. A call is at most once: after `Timeout` or `ConnectionLost` the
//! callee may or may not have served it.

use std::fmt;

use async_channel::Sender;
use futures::channel::oneshot;
use hashbrown::HashMap;

use super::frame::{self, Kind};

/// The call id in front of a `Request` or `Response` payload.
pub const CALL_ID_BYTES: usize = 8;
/// Bytes of a `Response` payload before the reply: the call id and the status byte.
pub const RESPONSE_PREFIX_BYTES: usize = CALL_ID_BYTES + 1;

/// How a callee answered, the byte after the call id in a `Response`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallStatus {
    Ok = 0,
    /// The callee's queue of incoming calls was full: not served.
    Busy = 1,
    /// The callee took the call but gave no reply (it dropped it, or the reply was over
    /// the frame limit).
    NotAnswered = 2,
}

impl CallStatus {
    fn from_byte(byte: u8) -> Option<CallStatus> {
        match byte {
            0 => Some(CallStatus::Ok),
            1 => Some(CallStatus::Busy),
            2 => Some(CallStatus::NotAnswered),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallError {
    UnknownPeer(u64),
    TooLarge {
        payload_bytes: usize,
        max_bytes: usize,
    },
    /// The peer's outbound queue was full; the call was not sent.
    QueueFull,
    /// `max_inflight_calls` calls of this core are already waiting.
    TooManyCalls,
    /// No answer within the call's timeout.
    Timeout,
    /// The connection the call was written to broke, or the peer was removed.
    ConnectionLost,
    /// The peer refused the call: its incoming queue was full.
    Busy,
    /// The peer took the call but answered nothing.
    NotAnswered,
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallError::UnknownPeer(id) => write!(f, "unknown peer {id:x}"),
            CallError::TooLarge {
                payload_bytes,
                max_bytes,
            } => write!(f, "call of {payload_bytes} bytes over {max_bytes}"),
            CallError::QueueFull => f.write_str("peer queue full"),
            CallError::TooManyCalls => f.write_str("too many calls waiting"),
            CallError::Timeout => f.write_str("call timed out"),
            CallError::ConnectionLost => f.write_str("connection lost"),
            CallError::Busy => f.write_str("peer busy"),
            CallError::NotAnswered => f.write_str("peer did not answer"),
        }
    }
}

impl std::error::Error for CallError {}

type CallResult = Result<Vec<u8>, CallError>;
type Answer = oneshot::Sender<CallResult>;

struct Waiting {
    peer: u64,
    /// The outbound connection (serial) the request was written to; `None` while queued.
    connection: Option<u64>,
    answer: Answer,
}

/// One core's calls waiting for an answer.
pub(super) struct CallTable {
    next_id: u64,
    max_inflight_calls: usize,
    waiting: HashMap<u64, Waiting>,
}

impl CallTable {
    pub(super) fn new(max_inflight_calls: usize) -> CallTable {
        assert!(max_inflight_calls > 0);
        CallTable {
            next_id: 1,
            max_inflight_calls,
            waiting: HashMap::new(),
        }
    }

    /// A new call to `peer`: its id and where its answer comes.
    pub(super) fn register(
        &mut self,
        peer: u64,
    ) -> Result<(u64, oneshot::Receiver<CallResult>), CallError> {
        if self.waiting.len() >= self.max_inflight_calls {
            return Err(CallError::TooManyCalls);
        }
        let id = self.next_id;
        self.next_id += 1;
        let (answer, receiver) = oneshot::channel();
        let waiting = Waiting {
            peer,
            connection: None,
            answer,
        };
        self.waiting.insert(id, waiting);
        Ok((id, receiver))
    }

    /// The call is no longer waited for (answered elsewhere, timed out or cancelled).
    pub(super) fn forget(&mut self, id: u64) {
        self.waiting.remove(&id);
    }

    /// The request of call `id` was written to connection `connection`.
    pub(super) fn mark_sent(&mut self, id: u64, connection: u64) {
        if let Some(waiting) = self.waiting.get_mut(&id) {
            waiting.connection = Some(connection);
        }
    }

    /// Hands `peer`'s answer to call `id`; an answer nobody waits for is dropped.
    pub(super) fn answer(&mut self, peer: u64, id: u64, result: Result<Vec<u8>, CallError>) {
        if self.waiting.get(&id).is_some_and(|w| w.peer == peer) {
            let waiting = self.waiting.remove(&id).expect("just found");
            let _ = waiting.answer.send(result);
        }
    }

    /// Fails every call written to `connection` of `peer` (it broke).
    pub(super) fn fail_connection(&mut self, peer: u64, connection: u64) {
        self.fail_where(|w| w.peer == peer && w.connection == Some(connection));
    }

    /// Fails every call to `peer`, sent or queued (the peer was removed).
    pub(super) fn fail_peer(&mut self, peer: u64) {
        self.fail_where(|w| w.peer == peer);
    }

    fn fail_where(&mut self, lost: impl Fn(&Waiting) -> bool) {
        let ids: Vec<u64> = self
            .waiting
            .iter()
            .filter(|(_, w)| lost(w))
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            let waiting = self.waiting.remove(&id).expect("just listed");
            let _ = waiting.answer.send(Err(CallError::ConnectionLost));
        }
    }
}

/// The call id of a `Request` payload and the request bytes; `None` if too short.
pub(super) fn split_request(payload: &[u8]) -> Option<(u64, &[u8])> {
    let (id, body) = payload.split_first_chunk::<CALL_ID_BYTES>()?;
    Some((u64::from_le_bytes(*id), body))
}

/// The call id of a `Response` payload and what it says; `None` if it does not parse.
pub(super) fn split_response(payload: &[u8]) -> Option<(u64, Result<Vec<u8>, CallError>)> {
    let (id, rest) = payload.split_first_chunk::<CALL_ID_BYTES>()?;
    let (status, body) = rest.split_first()?;
    let result = match CallStatus::from_byte(*status)? {
        CallStatus::Ok => Ok(body.to_vec()),
        CallStatus::Busy => Err(CallError::Busy),
        CallStatus::NotAnswered => Err(CallError::NotAnswered),
    };
    Some((u64::from_le_bytes(*id), result))
}

/// A call from a peer, taken from [`super::PeerCore::calls`]. Answer it with `reply`.
#[derive(Debug)]
pub struct IncomingCall {
    pub from: u64,
    pub payload: Vec<u8>,
    pub reply: CallReply,
}

/// Where the answer to one incoming call goes: the connection it came on. Dropping it
/// unanswered tells the caller `NotAnswered` (it need not wait out its timeout).
#[derive(Debug)]
pub struct CallReply {
    id: u64,
    core: u16,
    me: u64,
    caller: u64,
    max_frame_bytes: usize,
    /// The connection's writer; `None` once answered.
    frames: Option<Sender<Vec<u8>>>,
}

impl CallReply {
    pub(super) fn new(
        id: u64,
        core: u16,
        me: u64,
        caller: u64,
        max_frame_bytes: usize,
        frames: Sender<Vec<u8>>,
    ) -> CallReply {
        CallReply {
            id,
            core,
            me,
            caller,
            max_frame_bytes,
            frames: Some(frames),
        }
    }

    /// Answers the call. Never waits: if the connection is gone or its reply queue is full,
    /// the answer is dropped and the caller times out.
    pub fn send(mut self, payload: &[u8]) {
        match payload.len() + RESPONSE_PREFIX_BYTES <= self.max_frame_bytes {
            true => self.finish(CallStatus::Ok, payload),
            false => self.finish(CallStatus::NotAnswered, &[]),
        }
    }

    /// Refuses the call unserved.
    pub(super) fn refuse(mut self) {
        self.finish(CallStatus::Busy, &[]);
    }

    fn finish(&mut self, status: CallStatus, body: &[u8]) {
        let Some(frames) = self.frames.take() else {
            return;
        };
        let mut payload = Vec::with_capacity(RESPONSE_PREFIX_BYTES + body.len());
        payload.extend_from_slice(&self.id.to_le_bytes());
        payload.push(status as u8);
        payload.extend_from_slice(body);
        let mut bytes = Vec::new();
        frame::encode(
            &mut bytes,
            Kind::Response,
            self.core,
            self.me,
            self.caller,
            &payload,
        );
        let _ = frames.try_send(bytes);
    }
}

impl Drop for CallReply {
    fn drop(&mut self) {
        self.finish(CallStatus::NotAnswered, &[]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_reach_their_call_and_late_ones_are_dropped() {
        let mut table = CallTable::new(2);
        let (a, mut a_rx) = table.register(7).unwrap();
        let (b, mut b_rx) = table.register(7).unwrap();
        assert_eq!(table.register(7).unwrap_err(), CallError::TooManyCalls);
        // From the wrong peer: ignored.
        table.answer(8, b, Ok(b"x".to_vec()));
        table.answer(7, b, Ok(b"b".to_vec()));
        assert_eq!(b_rx.try_recv().unwrap(), Some(Ok(b"b".to_vec())));
        table.forget(a);
        table.answer(7, a, Ok(b"late".to_vec()));
        assert!(a_rx.try_recv().is_err(), "a forgotten call hears nothing");
        assert!(table.waiting.is_empty());
    }

    #[test]
    fn a_broken_connection_fails_only_the_calls_written_to_it() {
        let mut table = CallTable::new(8);
        let (sent, mut sent_rx) = table.register(7).unwrap();
        let (_queued, mut queued_rx) = table.register(7).unwrap();
        table.mark_sent(sent, 1);
        table.fail_connection(7, 1);
        assert_eq!(
            sent_rx.try_recv().unwrap(),
            Some(Err(CallError::ConnectionLost))
        );
        assert_eq!(queued_rx.try_recv().unwrap(), None);
        table.fail_peer(7);
        assert_eq!(
            queued_rx.try_recv().unwrap(),
            Some(Err(CallError::ConnectionLost))
        );
    }

    #[test]
    fn responses_parse_and_short_ones_are_refused() {
        let (tx, rx) = async_channel::bounded(4);
        CallReply::new(5, 0, 1, 2, 1024, tx.clone()).send(b"hi");
        CallReply::new(6, 0, 1, 2, 1024, tx.clone()).refuse();
        drop(CallReply::new(7, 0, 1, 2, 1024, tx.clone()));
        CallReply::new(8, 0, 1, 2, 10, tx).send(b"too long");
        let mut got = Vec::new();
        while let Ok(bytes) = rx.try_recv() {
            let (frame, _) = frame::decode(&bytes, 1024).unwrap().unwrap();
            assert_eq!((frame.kind, frame.from, frame.to), (Kind::Response, 1, 2));
            got.push(split_response(&frame.payload).unwrap());
        }
        assert_eq!(
            got,
            vec![
                (5, Ok(b"hi".to_vec())),
                (6, Err(CallError::Busy)),
                (7, Err(CallError::NotAnswered)),
                (8, Err(CallError::NotAnswered)),
            ]
        );
        assert_eq!(split_response(&[0; CALL_ID_BYTES]), None);
        assert_eq!(split_response(&[0; 9].map(|_| 9)), None, "unknown status");
        assert_eq!(split_request(&[1, 2]), None);
    }
}
