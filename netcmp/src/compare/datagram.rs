//! UDP, ICMP and everything else compared packet by packet, in order: the n-th primary
//! packet of a flow against the n-th secondary packet of the same flow.

use std::collections::VecDeque;
use std::ops::Range;
use std::time::Instant;

use super::ctx::{Ctx, Handling};
use super::output::CheckpointReason;
use crate::metrics::Metrics;

/// A primary packet waiting for its counterpart.
#[derive(Debug)]
struct HeldPkt {
    frame: Vec<u8>,
    compare: Range<usize>,
    tag: u32,
    arrived: Instant,
}

impl HeldPkt {
    fn bytes(&self) -> &[u8] {
        self.frame.get(self.compare.clone()).unwrap_or_default()
    }
}

/// A secondary packet waiting for its counterpart. The frame is kept whole (it is the
/// secondary's own buffer, moved in), so queueing it copies nothing.
#[derive(Debug)]
struct SecPkt {
    frame: Vec<u8>,
    compare: Range<usize>,
    tag: u32,
    arrived: Instant,
}

impl SecPkt {
    fn bytes(&self) -> &[u8] {
        self.frame.get(self.compare.clone()).unwrap_or_default()
    }
}

/// The compare state of one packet flow.
#[derive(Debug, Default)]
pub(crate) struct DatagramState {
    held: VecDeque<HeldPkt>,
    /// The secondary's packets not yet paired, in arrival order.
    sec: VecDeque<SecPkt>,
}

impl DatagramState {
    /// Nothing is queued.
    pub(crate) fn is_idle(&self) -> bool {
        self.held.is_empty() && self.sec.is_empty()
    }

    /// Primary frames held.
    pub(crate) fn held_len(&self) -> usize {
        self.held.len()
    }

    /// Takes a primary packet; `compare` is the range of `frame` that is compared.
    pub(crate) fn primary(
        &mut self,
        frame: Vec<u8>,
        compare: Range<usize>,
        tag: u32,
        how: Handling,
        ctx: &mut Ctx<'_>,
    ) -> Option<CheckpointReason> {
        if how == Handling::Pass {
            Metrics::inc(&ctx.m.passthrough_frames);
            ctx.release(frame);
            return None;
        }
        if self.held.len() >= ctx.hard_cap() {
            Metrics::inc(&ctx.m.overflow_drops);
            return None;
        }
        self.held.push_back(HeldPkt {
            frame,
            compare,
            tag,
            arrived: ctx.now,
        });
        let overflow = Self::overflow_at(self.held.len(), ctx);
        if how == Handling::Hold {
            return overflow;
        }
        self.compare(ctx).or(overflow)
    }

    /// Takes a secondary packet; `compare` is the range of `frame` that is compared.
    pub(crate) fn secondary(
        &mut self,
        frame: Vec<u8>,
        compare: Range<usize>,
        tag: u32,
        how: Handling,
        ctx: &mut Ctx<'_>,
    ) -> Option<CheckpointReason> {
        if how != Handling::Compare {
            return None;
        }
        if self.sec.len() >= ctx.hard_cap() {
            Metrics::inc(&ctx.m.overflow_drops);
            return None;
        }
        let pkt = SecPkt {
            frame,
            compare,
            tag,
            arrived: ctx.now,
        };
        // The common case: the primary's counterpart waits and no other secondary packet
        // does. Pairing it off at once is what queueing it and running `compare` would do
        // (the queue would hold just this packet, and pairing would empty it again).
        if self.sec.is_empty()
            && self
                .held
                .front()
                .is_some_and(|p| p.tag == pkt.tag && p.bytes() == pkt.bytes())
        {
            let overflow = Self::overflow_at(1, ctx);
            self.pair_front(ctx);
            return overflow;
        }
        self.sec.push_back(pkt);
        let overflow = Self::overflow_at(self.sec.len(), ctx);
        self.compare(ctx).or(overflow)
    }

    /// A queue just grew to `len`: the overflow, the first time it goes past the limit.
    fn overflow_at(len: usize, ctx: &Ctx<'_>) -> Option<CheckpointReason> {
        (len == ctx.max_queue + 1).then(|| {
            Metrics::inc(&ctx.m.queue_overflows);
            CheckpointReason::QueueOverflow
        })
    }

    /// The primary packet at the front matched: releases it.
    fn pair_front(&mut self, ctx: &mut Ctx<'_>) {
        if let Some(p) = self.held.pop_front() {
            Metrics::inc(&ctx.m.matched_packets);
            ctx.release(p.frame);
        }
    }

    /// Pairs off the queues' heads while they match.
    fn compare(&mut self, ctx: &mut Ctx<'_>) -> Option<CheckpointReason> {
        while let (Some(p), Some(s)) = (self.held.front(), self.sec.front()) {
            let (pb, sb) = (p.bytes(), s.bytes());
            if pb != sb || p.tag != s.tag {
                let offset = pb
                    .iter()
                    .zip(sb)
                    .position(|(a, b)| a != b)
                    .unwrap_or(pb.len().min(sb.len()));
                return Some(CheckpointReason::PayloadDiffers {
                    offset: offset as u64,
                });
            }
            self.sec.pop_front();
            self.pair_front(ctx);
        }
        None
    }

    /// Releases primary packets that arrived at or before `deadline` and forgets secondary
    /// packets that waited as long.
    pub(crate) fn expire(
        &mut self,
        deadline: Instant,
        ctx: &mut Ctx<'_>,
    ) -> Option<CheckpointReason> {
        let mut r = None;
        while self.held.front().is_some_and(|h| h.arrived <= deadline) {
            if let Some(h) = self.held.pop_front() {
                Metrics::inc(&ctx.m.compare_timeouts);
                ctx.release(h.frame);
                r = Some(CheckpointReason::CompareTimeout);
            }
        }
        while self.sec.front().is_some_and(|s| s.arrived <= deadline) {
            self.sec.pop_front();
            Metrics::inc(&ctx.m.secondary_timeouts);
            r = r.or(Some(CheckpointReason::SecondaryTimeout));
        }
        r
    }

    /// A checkpoint committed: releases everything held and forgets the secondary's queue.
    pub(crate) fn commit(&mut self, ctx: &mut Ctx<'_>) {
        self.release_all(ctx);
        self.sec.clear();
    }

    /// Releases every held packet.
    pub(crate) fn release_all(&mut self, ctx: &mut Ctx<'_>) {
        for h in self.held.drain(..) {
            Metrics::inc(&ctx.m.released_on_commit);
            ctx.release(h.frame);
        }
    }

    /// Drops every held packet. Returns how many.
    pub(crate) fn drop_held(&mut self) -> usize {
        let n = self.held.len();
        self.held.clear();
        self.sec.clear();
        n
    }
}
