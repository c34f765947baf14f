//! What a connection's compare state needs from the engine while it works.

use std::time::Instant;

use super::output::Output;
use crate::metrics::Metrics;

/// How a connection is handled right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Handling {
    /// Compare primary with secondary output.
    Compare,
    /// The outputs differed: hold the primary's output until a checkpoint commits.
    Hold,
    /// A passthrough rule matched: release the primary's output at once.
    Pass,
}

/// The engine's counters, output and limits, lent to a connection.
pub(crate) struct Ctx<'a> {
    /// Counters.
    pub(crate) m: &'a Metrics,
    /// Where released frames go.
    pub(crate) out: &'a mut Output,
    /// `max_queue_size`.
    pub(crate) max_queue: usize,
    /// The time of the event being handled.
    pub(crate) now: Instant,
}

impl Ctx<'_> {
    /// Sends a primary frame to the client.
    pub(crate) fn release(&mut self, frame: Vec<u8>) {
        Metrics::inc(&self.m.released_frames);
        Metrics::add(&self.m.released_bytes, frame.len() as u64);
        self.out.to_client.push(frame);
    }

    /// Most stream bytes buffered per connection and side: `max_queue_size` full-size
    /// (64 KiB) segments.
    pub(crate) fn byte_cap(&self) -> usize {
        self.max_queue.saturating_mul(64 * 1024)
    }

    /// The hard cap of a queue while a checkpoint is pending: past it, packets are dropped
    /// (and counted) rather than held without bound.
    pub(crate) fn hard_cap(&self) -> usize {
        self.max_queue.saturating_mul(4)
    }
}
