//! Consensus-side pieces of ferrocd. Today every group has one voter, so a group's log is its
//! WAL and an entry is committed once it is durable; what lives here is the part that must
//! hold across groups: the revision sequencer and its visibility watermark.

pub mod notify;
pub mod sequencer;
