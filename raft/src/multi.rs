//! All Raft groups one member runs on one executor: one clock ticks them, their messages go
//! out batched per peer (one envelope per destination per round, heartbeats coalesced), the
//! per-peer queues are bounded, and leadership follows the meta group.
//!
//! Leader affinity rule: writes are served by the member that leads the meta group (group 0),
//! so every group should elect its leader there. A member that leads some other group while
//! it knows a different meta leader `M`, and `M` is a voter of that group, asks raft to
//! transfer that group's leadership to `M`, at most once per `affinity_retry_ticks` per group
//! (raft-rs abandons a transfer that does not finish within an election timeout; `M` first
//! catches up). The meta leader comes from the meta group when this `Node` holds it, else
//! from `set_meta_leader` (the server runs groups on several cores; core 0 tells the rest).

use std::collections::BTreeMap;

use prost011::Message as _;
use raft::eraftpb::{Message, MessageType};

use crate::group::{Group, GroupConfig, GroupReady, MembershipChange, ProposeError};
use crate::storage::LogStore;

pub type GroupId = u64;

/// The group whose leader all others follow (membership, leases, cross-shard writes).
pub const META_GROUP: GroupId = 0;

#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Settings every group of this member starts with (`applied_index` is per group).
    pub group: GroupConfig,
    /// Messages queued for one peer between two `take_envelopes` calls; more are dropped
    /// (raft retransmits) and counted in `dropped_messages`.
    pub peer_queue_limit_msgs: usize,
    /// Ticks between two leadership transfer requests for one group.
    pub affinity_retry_ticks: u64,
}

/// One batch of messages for one peer, encoded for the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    pub from: u64,
    pub to: u64,
    pub bytes: Vec<u8>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct DecodeError(pub &'static str);

pub struct Node<S: LogStore> {
    config: NodeConfig,
    groups: BTreeMap<GroupId, Group<S>>,
    /// Per destination: (group, message), in the order produced.
    queues: BTreeMap<u64, Vec<(GroupId, Message)>>,
    dropped_messages: u64,
    meta_leader_hint: Option<u64>,
    ticks: u64,
    /// Per group: the tick of the last leadership transfer request.
    last_transfer_tick: BTreeMap<GroupId, u64>,
}

impl<S: LogStore> Node<S> {
    pub fn new(config: NodeConfig) -> Node<S> {
        assert!(config.peer_queue_limit_msgs > 0);
        Node {
            config,
            groups: BTreeMap::new(),
            queues: BTreeMap::new(),
            dropped_messages: 0,
            meta_leader_hint: None,
            ticks: 0,
            last_transfer_tick: BTreeMap::new(),
        }
    }

    pub fn member_id(&self) -> u64 {
        self.config.group.member_id
    }

    /// Starts a group from its store; `applied_index` as in `GroupConfig`.
    pub fn add_group(&mut self, id: GroupId, store: S, applied_index: u64) {
        let config = GroupConfig {
            applied_index,
            ..self.config.group.clone()
        };
        let previous = self.groups.insert(id, Group::new(&config, store));
        assert!(previous.is_none(), "group {id} added twice");
    }

    pub fn group(&self, id: GroupId) -> Option<&Group<S>> {
        self.groups.get(&id)
    }

    pub fn group_mut(&mut self, id: GroupId) -> Option<&mut Group<S>> {
        self.groups.get_mut(&id)
    }

    pub fn group_ids(&self) -> impl Iterator<Item = GroupId> + '_ {
        self.groups.keys().copied()
    }

    pub fn dropped_messages(&self) -> u64 {
        self.dropped_messages
    }

    /// The meta leader as another executor of this member sees it (ignored while this node
    /// holds the meta group itself).
    pub fn set_meta_leader(&mut self, leader: Option<u64>) {
        self.meta_leader_hint = leader;
    }

    pub fn meta_leader(&self) -> Option<u64> {
        match self.groups.get(&META_GROUP) {
            Some(meta) => meta.leader(),
            None => self.meta_leader_hint,
        }
    }

    /// One clock period for every group, then the leader affinity rule.
    pub fn tick(&mut self) {
        self.ticks += 1;
        for group in self.groups.values_mut() {
            group.tick();
        }
        self.follow_meta_leader();
    }

    pub fn propose(&mut self, group: GroupId, data: Vec<u8>) -> Result<u64, ProposeError> {
        self.group_or_panic(group).propose(data)
    }

    pub fn propose_membership(
        &mut self,
        group: GroupId,
        change: MembershipChange,
        context: Vec<u8>,
    ) -> Result<u64, ProposeError> {
        self.group_or_panic(group)
            .propose_membership(change, context)
    }

    pub fn read_index(&mut self, group: GroupId, context: Vec<u8>) {
        self.group_or_panic(group).read_index(context);
    }

    pub fn on_persisted(&mut self, group: GroupId, ready_number: u64) {
        self.group_or_panic(group).on_persisted(ready_number);
    }

    pub fn on_applied(&mut self, group: GroupId, index: u64) {
        self.group_or_panic(group).on_applied(index);
    }

    /// Steps every message of an envelope into its group; messages for groups this node does
    /// not hold are dropped (the group may not be created here yet).
    pub fn receive(&mut self, envelope: &Envelope) -> Result<(), DecodeError> {
        if envelope.to != self.member_id() {
            return Err(DecodeError("envelope for another member"));
        }
        for (group, message) in decode_envelope(envelope)? {
            if let Some(g) = self.groups.get_mut(&group) {
                g.step(message);
            }
        }
        Ok(())
    }

    /// Pending work of every group that has some; messages go to the per-peer queues.
    pub fn ready(&mut self) -> Vec<(GroupId, GroupReady)> {
        let mut out = Vec::new();
        for (&id, group) in self.groups.iter_mut() {
            if let Some(rd) = group.ready() {
                out.push((id, rd));
            }
        }
        self.collect_messages();
        out
    }

    /// One envelope per peer with everything queued for it.
    pub fn take_envelopes(&mut self) -> Vec<Envelope> {
        self.collect_messages();
        let from = self.member_id();
        std::mem::take(&mut self.queues)
            .into_iter()
            .filter(|(_, messages)| !messages.is_empty())
            .map(|(to, messages)| Envelope {
                from,
                to,
                bytes: encode_messages(from, &messages),
            })
            .collect()
    }

    fn collect_messages(&mut self) {
        for (&id, group) in self.groups.iter_mut() {
            for message in group.take_messages() {
                let queue = self.queues.entry(message.to).or_default();
                let fits = queue.len() < self.config.peer_queue_limit_msgs;
                if message.msg_type() == MessageType::MsgSnapshot {
                    // Reported as done once handed to the transport: if it is lost, the
                    // member's next append rejection asks for a snapshot again.
                    group.report_snapshot(message.to, fits);
                }
                if fits {
                    queue.push((id, message));
                } else {
                    self.dropped_messages += 1;
                }
            }
        }
    }

    fn follow_meta_leader(&mut self) {
        let me = self.member_id();
        let meta_leader = self.meta_leader();
        // A shard group's transfer toward a member that no longer leads the meta group (it was
        // paused or cut off when the transfer began) would refuse proposals until it times out.
        for (&id, group) in self.groups.iter_mut() {
            let stale = group
                .transferring_to()
                .is_some_and(|t| Some(t) != meta_leader);
            if id != META_GROUP && stale {
                group.abort_transfer();
            }
        }
        let Some(target) = meta_leader.filter(|l| *l != me) else {
            return;
        };
        for (&id, group) in self.groups.iter_mut() {
            if id == META_GROUP || !group.is_leader() || !group.is_voter(target) {
                continue;
            }
            let last = self.last_transfer_tick.entry(id).or_insert(0);
            if *last == 0 || self.ticks - *last >= self.config.affinity_retry_ticks {
                *last = self.ticks;
                group.transfer_leader(target);
            }
        }
    }

    fn group_or_panic(&mut self, id: GroupId) -> &mut Group<S> {
        self.groups
            .get_mut(&id)
            .unwrap_or_else(|| panic!("no group {id} on this member"))
    }
}

// Envelope layout, little-endian: from u64, to u64 are implied by the `Envelope`; the bytes
// are a sequence of items: tag u8, group u64, then
//   TAG_RAFT: len u32, a prost-encoded raft message;
//   TAG_HEARTBEAT / TAG_HEARTBEAT_RESPONSE: term u64, commit u64 (a heartbeat without
//   read-index context carries nothing else, so it costs 25 bytes, not a protobuf message).
const TAG_RAFT: u8 = 0;
const TAG_HEARTBEAT: u8 = 1;
const TAG_HEARTBEAT_RESPONSE: u8 = 2;

fn heartbeat_tag(from: u64, message: &Message) -> Option<u8> {
    let tag = match message.msg_type() {
        MessageType::MsgHeartbeat => TAG_HEARTBEAT,
        MessageType::MsgHeartbeatResponse => TAG_HEARTBEAT_RESPONSE,
        _ => return None,
    };
    // Coalesce only when the compact form rebuilds the message exactly.
    let rebuilt = heartbeat(tag, from, message.to, message.term, message.commit);
    (rebuilt == *message).then_some(tag)
}

fn heartbeat(tag: u8, from: u64, to: u64, term: u64, commit: u64) -> Message {
    let mut message = Message {
        from,
        to,
        term,
        commit,
        ..Default::default()
    };
    message.set_msg_type(if tag == TAG_HEARTBEAT {
        MessageType::MsgHeartbeat
    } else {
        MessageType::MsgHeartbeatResponse
    });
    message
}

fn encode_messages(from: u64, messages: &[(GroupId, Message)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (group, message) in messages {
        match heartbeat_tag(from, message) {
            Some(tag) => {
                out.push(tag);
                out.extend_from_slice(&group.to_le_bytes());
                out.extend_from_slice(&message.term.to_le_bytes());
                out.extend_from_slice(&message.commit.to_le_bytes());
            }
            None => {
                let body = message.encode_to_vec();
                let len = u32::try_from(body.len()).expect("raft message under 4 GiB");
                out.push(TAG_RAFT);
                out.extend_from_slice(&group.to_le_bytes());
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(&body);
            }
        }
    }
    out
}

fn decode_envelope(envelope: &Envelope) -> Result<Vec<(GroupId, Message)>, DecodeError> {
    let mut reader = Reader(&envelope.bytes);
    let mut out = Vec::new();
    while !reader.0.is_empty() {
        let tag = reader.take(1)?[0];
        let group = reader.u64()?;
        let message = match tag {
            TAG_RAFT => {
                let len = u32::from_le_bytes(reader.take(4)?.try_into().expect("4 bytes"));
                let message = Message::decode(reader.take(len as usize)?)
                    .map_err(|_| DecodeError("bad raft message"))?;
                // `from` may differ: a forwarded leader transfer names the transferee.
                if message.to != envelope.to {
                    return Err(DecodeError("message addressed apart from its envelope"));
                }
                message
            }
            TAG_HEARTBEAT | TAG_HEARTBEAT_RESPONSE => {
                let (term, commit) = (reader.u64()?, reader.u64()?);
                heartbeat(tag, envelope.from, envelope.to, term, commit)
            }
            _ => return Err(DecodeError("unknown item tag")),
        };
        out.push((group, message));
    }
    Ok(out)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < len {
            return Err(DecodeError("truncated envelope"));
        }
        let (head, tail) = self.0.split_at(len);
        self.0 = tail;
        Ok(head)
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_and_heartbeats_are_compact() {
        let mut append = Message {
            from: 1,
            to: 2,
            term: 3,
            index: 7,
            context: b"ctx".to_vec(),
            ..Default::default()
        };
        append.set_msg_type(MessageType::MsgAppend);
        let beat = heartbeat(TAG_HEARTBEAT, 1, 2, 3, 5);
        let mut beat_with_context = beat.clone();
        beat_with_context.context = b"read".to_vec();
        let messages = vec![(0, append), (4, beat.clone()), (5, beat_with_context)];
        let bytes = encode_messages(1, &messages);
        let envelope = Envelope {
            from: 1,
            to: 2,
            bytes,
        };
        assert_eq!(decode_envelope(&envelope).unwrap(), messages);
        assert_eq!(encode_messages(1, &[(4, beat)]).len(), 25);
        let truncated = Envelope {
            bytes: envelope.bytes[..envelope.bytes.len() - 1].to_vec(),
            ..envelope
        };
        assert!(decode_envelope(&truncated).is_err());
    }
}
