//! What the engine asks its caller to do: frames to send and checkpoints to take.

use std::fmt;

use crate::flow::FlowKey;

/// Why the proxy asks for a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CheckpointReason {
    /// The TCP byte streams differ at this offset from the connection's first compared
    /// byte, or a UDP/ICMP/other packet differs (offset 0).
    PayloadDiffers {
        /// Offset of the first differing byte.
        offset: u64,
    },
    /// SYN, FIN or RST do not mean the same on both sides.
    ControlDiffers(&'static str),
    /// A primary packet found no secondary counterpart within `compare_timeout` (it was
    /// released).
    CompareTimeout,
    /// Secondary output found no primary counterpart within `compare_timeout`.
    SecondaryTimeout,
    /// A connection's queue went past `max_queue_size`.
    QueueOverflow,
    /// The connection table is full, so a new flow could not be compared.
    ConnectionTableFull,
}

impl fmt::Display for CheckpointReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PayloadDiffers { offset } => write!(f, "payload differs at byte {offset}"),
            Self::ControlDiffers(what) => write!(f, "{what}"),
            Self::CompareTimeout => f.write_str("primary packet without secondary counterpart"),
            Self::SecondaryTimeout => f.write_str("secondary output without primary counterpart"),
            Self::QueueOverflow => f.write_str("queue overflow"),
            Self::ConnectionTableFull => f.write_str("connection table full"),
        }
    }
}

/// A request for a checkpoint, for the COLO controller.
///
/// Only one is outstanding at a time: until the controller reports a commit, further
/// reasons are counted (`checkpoint_triggers`) but not sent again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointRequest {
    /// Why.
    pub reason: CheckpointReason,
    /// The connection that caused it, if one did.
    pub flow: Option<FlowKey>,
}

impl fmt::Display for CheckpointRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.flow {
            Some(k) => write!(f, "{} ({k})", self.reason),
            None => write!(f, "{}", self.reason),
        }
    }
}

/// Frames to send and checkpoint requests, filled by the engine's calls. The caller sends
/// the frames in order and then [`clear`](Self::clear)s it (or keeps appending).
#[derive(Debug, Default)]
pub struct Output {
    /// Frames for the client, in release order.
    pub to_client: Vec<Vec<u8>>,
    /// Frames for the primary VM.
    pub to_primary: Vec<Vec<u8>>,
    /// Frames for the secondary VM.
    pub to_secondary: Vec<Vec<u8>>,
    /// Checkpoint requests for the controller.
    pub checkpoint_requests: Vec<CheckpointRequest>,
}

impl Output {
    /// Empties every list.
    pub fn clear(&mut self) {
        self.to_client.clear();
        self.to_primary.clear();
        self.to_secondary.clear();
        self.checkpoint_requests.clear();
    }

    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.to_client.is_empty()
            && self.to_primary.is_empty()
            && self.to_secondary.is_empty()
            && self.checkpoint_requests.is_empty()
    }
}
