//! TCP compared as a byte stream.
//!
//! The VMs may cut the same bytes into different segments, retransmit, and acknowledge at
//! different times; their initial sequence numbers differ. So each side's payload is
//! reassembled in sequence order (the secondary's mapped into the primary's sequence space
//! by the ISN offset) and the two streams are compared as far as both reach. A primary
//! segment is released once
//! - every byte it carries (and its FIN) has matched the secondary's,
//! - its SYN has a secondary SYN of the same kind (SYN or SYN-ACK),
//! - its RST has a secondary RST,
//! - its acknowledgment number does not exceed the highest one the secondary sent (so
//!   the client never learns that data arrived which the secondary has not also acked),
//!
//! in the order the primary sent them.

use std::collections::VecDeque;
use std::time::Instant;

use super::ctx::{Ctx, Handling};
use super::output::CheckpointReason;
use super::seq;
use super::stream::{Placed, StreamBuf};
use crate::metrics::Metrics;
use crate::wire::{TcpFlags, TcpSegment};

/// One side's view of its own stream.
#[derive(Debug, Default)]
struct Half {
    /// Its ISN (from its SYN), or the first sequence number seen if the connection was
    /// picked up mid-stream; in its own sequence space.
    start: Option<u32>,
    /// `Some(ack flag)` once it sent a SYN.
    syn: Option<bool>,
    /// Sequence number of its FIN, in the primary's space.
    fin: Option<u32>,
    /// It sent a RST.
    rst: bool,
    /// Its bytes from the compare point on.
    buf: StreamBuf,
}

/// Which VM's stream.
#[derive(Debug, Clone, Copy)]
enum Who {
    Primary,
    Secondary,
}

/// A primary segment waiting for release.
#[derive(Debug)]
struct HeldSeg {
    frame: Vec<u8>,
    /// Sequence number after its data and FIN.
    end: u32,
    ack: Option<u32>,
    syn: bool,
    rst: bool,
    arrived: Instant,
}

/// A secondary segment that came before the offset was known.
#[derive(Debug)]
struct Early {
    seq: u32,
    flags: TcpFlags,
    ack: u32,
    /// Where the payload lies in `frame`.
    payload: std::ops::Range<usize>,
    frame: Vec<u8>,
    arrived: Instant,
}

/// The compare state of one TCP connection.
#[derive(Debug, Default)]
pub(crate) struct TcpState {
    p: Half,
    s: Half,
    /// Primary minus secondary sequence number, once both starts are known.
    offset: Option<u32>,
    /// Sequence number (primary space) up to which both streams matched.
    cmp: Option<u32>,
    /// Both FINs matched and were passed.
    fin_done: bool,
    /// Stream bytes compared so far (to report where a difference is).
    compared: u64,
    /// The highest sequence number the primary has used.
    p_high: Option<u32>,
    /// Each side's TSval in its SYN, where timestamps are on.
    p_ts: Option<u32>,
    s_ts: Option<u32>,
    /// The highest acknowledgment numbers each side sent.
    p_ack: Option<u32>,
    s_ack: Option<u32>,
    held: VecDeque<HeldSeg>,
    /// Ends and arrival times of secondary segments whose bytes are not compared yet.
    s_pending: VecDeque<(u32, Instant)>,
    /// The secondary's frames whose bytes are not compared yet, with their ends (primary
    /// space): if the secondary takes over they go to the client at once, so that neither
    /// the guest nor the client waits a retransmission timeout for bytes the secondary
    /// already sent.
    s_frames: VecDeque<(u32, Vec<u8>)>,
    early: Vec<Early>,
    client_fin: bool,
    client_rst: bool,
}

impl TcpState {
    /// How to move the secondary's numbers into the primary's space, once the sequence
    /// offset is known: (sequence offset, timestamp offset). Both are primary minus
    /// secondary; the timestamp offset is zero where either side has no timestamps.
    pub(crate) fn translation(&self) -> Option<(u32, u32)> {
        let ts = match (self.p_ts, self.s_ts) {
            (Some(p), Some(s)) => p.wrapping_sub(s),
            _ => 0,
        };
        self.offset.map(|o| (o, ts))
    }

    /// Nothing is queued.
    pub(crate) fn is_idle(&self) -> bool {
        self.held.is_empty() && self.s_pending.is_empty() && self.early.is_empty()
    }

    /// The connection is over (a RST, or FINs both ways).
    pub(crate) fn is_closed(&self) -> bool {
        self.client_rst || self.p.rst || (self.client_fin && self.p.fin.is_some())
    }

    /// When the oldest secondary output not yet compared arrived.
    pub(crate) fn oldest_secondary(&self) -> Option<std::time::Instant> {
        self.s_pending.front().map(|(_, t)| *t)
    }

    /// Primary frames held.
    pub(crate) fn held_len(&self) -> usize {
        self.held.len()
    }

    /// Notes a client segment of this connection.
    pub(crate) fn client_segment(&mut self, flags: TcpFlags) {
        self.client_fin |= flags.fin;
        self.client_rst |= flags.rst;
    }

    /// Takes a primary segment.
    pub(crate) fn primary(
        &mut self,
        seg: &TcpSegment,
        frame: Vec<u8>,
        how: Handling,
        ctx: &mut Ctx<'_>,
    ) -> Option<CheckpointReason> {
        let f = seg.flags;
        if f.syn && self.p.syn.is_none() {
            self.p.syn = Some(f.ack);
            self.p.start = Some(seg.seq);
            self.p_ts = seg.syn_tsval;
        }
        let start = *self.p.start.get_or_insert(seg.seq);
        let cmp = *self
            .cmp
            .get_or_insert(start.wrapping_add(u32::from(self.p.syn.is_some())));
        let data_seq = seg.seq.wrapping_add(u32::from(f.syn));
        let len = seg.len() as u32;
        let end = data_seq.wrapping_add(len).wrapping_add(u32::from(f.fin));
        self.p.rst |= f.rst;
        if f.ack {
            self.p_ack = Some(seq::max(self.p_ack, seg.ack));
        }
        self.p_high = Some(seq::max(self.p_high, end));
        if f.fin {
            self.p.fin = Some(data_seq.wrapping_add(len));
        }
        if how == Handling::Pass {
            Metrics::inc(&ctx.m.passthrough_frames);
            ctx.release(frame);
            return None;
        }
        if how == Handling::Compare {
            let data = frame.get(seg.payload.clone()).unwrap_or_default();
            // `compare` always runs below (the handling is Compare).
            let m = self.match_direct(Who::Primary, data_seq, data, ctx);
            let placed = if m > 0 && m == data.len() {
                Placed::New
            } else {
                let rest = data.get(m..).unwrap_or_default();
                let at = data_seq.wrapping_add(m as u32);
                self.p
                    .buf
                    .insert(self.cmp.unwrap_or(cmp), at, rest, ctx.byte_cap())
            };
            if placed == Placed::Old && !data.is_empty() {
                Metrics::inc(&ctx.m.primary_retransmits);
            }
        }
        let overflow = self.hold(seg, frame, end, ctx);
        self.learn_offset(ctx);
        if how == Handling::Hold {
            return overflow;
        }
        self.compare(ctx).or(overflow)
    }

    /// Queues a primary frame; reports an overflow when the queue first goes past the
    /// limit, and drops the frame past the hard cap.
    fn hold(
        &mut self,
        seg: &TcpSegment,
        frame: Vec<u8>,
        end: u32,
        ctx: &mut Ctx<'_>,
    ) -> Option<CheckpointReason> {
        if self.held.len() >= ctx.hard_cap() {
            Metrics::inc(&ctx.m.overflow_drops);
            return None;
        }
        self.held.push_back(HeldSeg {
            frame,
            end,
            ack: seg.flags.ack.then_some(seg.ack),
            syn: seg.flags.syn,
            rst: seg.flags.rst,
            arrived: ctx.now,
        });
        (self.held.len() == ctx.max_queue + 1).then(|| {
            Metrics::inc(&ctx.m.queue_overflows);
            CheckpointReason::QueueOverflow
        })
    }

    /// Takes a secondary segment (its payload is `data`).
    pub(crate) fn secondary(
        &mut self,
        seg: &TcpSegment,
        frame: Vec<u8>,
        how: Handling,
        ctx: &mut Ctx<'_>,
    ) -> Option<CheckpointReason> {
        let f = seg.flags;
        if f.syn && self.s.syn.is_none() {
            self.s.syn = Some(f.ack);
            self.s.start = Some(seg.seq);
            self.s_ts = seg.syn_tsval;
        }
        self.s.start.get_or_insert(seg.seq);
        if how != Handling::Compare {
            self.learn_offset(ctx);
            return None;
        }
        if self.offset.is_none() && self.p.start.is_none() {
            if self.early.len() >= ctx.hard_cap() {
                Metrics::inc(&ctx.m.overflow_drops);
                return None;
            }
            self.early.push(Early {
                seq: seg.seq,
                flags: f,
                ack: seg.ack,
                payload: seg.payload.clone(),
                frame,
                arrived: ctx.now,
            });
            return (self.early.len() == ctx.max_queue + 1).then(|| {
                Metrics::inc(&ctx.m.queue_overflows);
                CheckpointReason::QueueOverflow
            });
        }
        let overflow = self.learn_offset(ctx);
        // `compare` runs right after the segment is placed unless something overflowed.
        let direct = overflow.is_none();
        let data = frame.get(seg.payload.clone()).unwrap_or_default();
        let (r, keep) = self.ingest_secondary(seg.seq, f, seg.ack, data, ctx.now, direct, ctx);
        self.keep_frame(keep, frame);
        r.or(overflow).or_else(|| self.compare(ctx))
    }

    /// Keeps a secondary frame whose bytes (up to `end`, primary space) are not compared
    /// yet, for a failover (see `s_frames`); the frame itself, not a copy.
    fn keep_frame(&mut self, end: Option<u32>, frame: Vec<u8>) {
        if let Some(end) = end {
            self.s_frames.push_back((end, frame));
        }
    }

    /// Learns the offset once both starts are known, and replays the secondary segments
    /// that came before it.
    fn learn_offset(&mut self, ctx: &mut Ctx<'_>) -> Option<CheckpointReason> {
        if self.offset.is_some() {
            return None;
        }
        let (Some(p), Some(s)) = (self.p.start, self.s.start) else {
            return None;
        };
        self.offset = Some(p.wrapping_sub(s));
        let mut r = None;
        for e in std::mem::take(&mut self.early) {
            let (seq, flags, ack, at) = (e.seq, e.flags, e.ack, e.arrived);
            let data = e.frame.get(e.payload.clone()).unwrap_or_default();
            let (reason, keep) = self.ingest_secondary(seq, flags, ack, data, at, false, ctx);
            r = r.or(reason);
            self.keep_frame(keep, e.frame);
        }
        r
    }

    /// Places a secondary segment's bytes and notes its flags, in the primary's space;
    /// returns a reason to checkpoint, if any, and the segment's end when its frame is to
    /// be kept (see [`keep_frame`](Self::keep_frame)).
    /// `direct`: the caller runs [`compare`](Self::compare) right after this returns
    /// `None`, so matching bytes may be compared at once (see
    /// [`match_direct`](Self::match_direct)).
    #[allow(clippy::too_many_arguments)]
    fn ingest_secondary(
        &mut self,
        own_seq: u32,
        f: TcpFlags,
        ack: u32,
        data: &[u8],
        arrived: Instant,
        direct: bool,
        ctx: &mut Ctx<'_>,
    ) -> (Option<CheckpointReason>, Option<u32>) {
        let (Some(off), Some(cmp)) = (self.offset, self.cmp) else {
            return (None, None);
        };
        let data_seq = own_seq.wrapping_add(off).wrapping_add(u32::from(f.syn));
        let len = data.len() as u32;
        if f.ack {
            self.s_ack = Some(seq::max(self.s_ack, ack));
        }
        let mut fresh = false;
        if f.rst && !self.s.rst {
            self.s.rst = true;
            fresh = true;
        }
        if f.fin && self.s.fin.is_none() {
            self.s.fin = Some(data_seq.wrapping_add(len));
            fresh = true;
        }
        if self.s_pending.len() + self.s.buf.ooo_len() >= ctx.hard_cap() {
            Metrics::inc(&ctx.m.overflow_drops);
            return (None, None);
        }
        // Only when this segment cannot overflow the pending queue below: then this
        // returns `None` and `compare` runs at once, as `match_direct` requires.
        let m = if direct && self.s_pending.len() + self.s.buf.ooo_len() != ctx.max_queue {
            self.match_direct(Who::Secondary, data_seq, data, ctx)
        } else {
            0
        };
        let placed = if m > 0 && m == data.len() {
            Placed::New
        } else {
            let rest = data.get(m..).unwrap_or_default();
            let at = data_seq.wrapping_add(m as u32);
            self.s
                .buf
                .insert(self.cmp.unwrap_or(cmp), at, rest, ctx.byte_cap())
        };
        match placed {
            Placed::New | Placed::OutOfOrder => fresh = true,
            Placed::Old if !data.is_empty() => Metrics::inc(&ctx.m.secondary_retransmits),
            Placed::Old | Placed::TooFar => {}
        }
        let mut keep = None;
        if fresh {
            let end = data_seq.wrapping_add(len).wrapping_add(u32::from(f.fin));
            self.s_pending.push_back((end, arrived));
            if !data.is_empty() || f.fin {
                keep = Some(end);
            }
            if self.s_pending.len() + self.s.buf.ooo_len() == ctx.max_queue + 1 {
                Metrics::inc(&ctx.m.queue_overflows);
                return (Some(CheckpointReason::QueueOverflow), keep);
            }
        }
        (None, keep)
    }

    /// The in-order fast path, to copy each stream byte at most once: `data`, one side's
    /// bytes from sequence number `at` (primary space), about to be placed in that side's
    /// buffer. When they start exactly at the compare point, nothing of that side is
    /// buffered, SYNs agree, and the other side's buffered bytes equal them as far as both
    /// go, those bytes are compared and consumed here (what [`compare`](Self::compare) would
    /// do with them once placed) and their count returned; the caller places only the
    /// rest. Otherwise nothing happens and 0 is returned (a difference is left for
    /// `compare` to find and report).
    ///
    /// The caller must run `compare` right after placing the rest, with no other change to
    /// the state, so that the outcome is the one placing all of `data` would have had: the
    /// bytes this consumes are exactly those `compare` would have consumed first.
    fn match_direct(&mut self, who: Who, at: u32, data: &[u8], ctx: &mut Ctx<'_>) -> usize {
        let (Some(cmp), Some(_)) = (self.cmp, self.offset) else {
            return 0;
        };
        let syn_agree = match (self.p.syn, self.s.syn) {
            (Some(a), Some(b)) => a == b,
            (a, b) => a.is_none() && b.is_none(),
        };
        let (own, other) = match who {
            Who::Primary => (&self.p.buf, &mut self.s.buf),
            Who::Secondary => (&self.s.buf, &mut self.p.buf),
        };
        if at != cmp
            || !syn_agree
            || data.is_empty()
            || data.len() > ctx.byte_cap()
            || own.avail() != 0
            || own.ooo_len() != 0
        {
            return 0;
        }
        let m = data.len().min(other.avail());
        if m == 0 || data.get(..m) != other.bytes().get(..m) {
            return 0;
        }
        other.consume(m);
        self.cmp = Some(cmp.wrapping_add(m as u32));
        self.compared += m as u64;
        Metrics::add(&ctx.m.matched_tcp_bytes, m as u64);
        m
    }

    /// Compares what both streams have, then releases what may go.
    fn compare(&mut self, ctx: &mut Ctx<'_>) -> Option<CheckpointReason> {
        let (Some(mut cmp), Some(_)) = (self.cmp, self.offset) else {
            return None;
        };
        match (self.p.syn, self.s.syn) {
            (Some(a), Some(b)) if a != b => {
                return Some(CheckpointReason::ControlDiffers(
                    "one side sent SYN, the other SYN-ACK",
                ));
            }
            (Some(_), None) | (None, Some(_)) => {
                return Some(CheckpointReason::ControlDiffers("only one side sent a SYN"));
            }
            _ => {}
        }
        let n = self.p.buf.avail().min(self.s.buf.avail());
        if n > 0 {
            let (a, b) = (&self.p.buf.bytes()[..n], &self.s.buf.bytes()[..n]);
            // memcmp first (vectorised); look for the first differing byte only on a miss.
            if a != b
                && let Some(i) = a.iter().zip(b).position(|(x, y)| x != y)
            {
                // Whatever matched before the difference may still go.
                self.advance(i, ctx);
                self.release(ctx);
                return Some(CheckpointReason::PayloadDiffers {
                    offset: self.compared,
                });
            }
            self.p.buf.consume(n);
            self.s.buf.consume(n);
            cmp = cmp.wrapping_add(n as u32);
            self.compared += n as u64;
            Metrics::add(&ctx.m.matched_tcp_bytes, n as u64);
        }
        if !self.fin_done {
            match (self.p.fin, self.s.fin) {
                (Some(a), Some(b)) if a != b => {
                    return Some(CheckpointReason::ControlDiffers(
                        "FIN at different stream positions",
                    ));
                }
                (Some(a), Some(_)) if a == cmp => {
                    cmp = cmp.wrapping_add(1);
                    self.fin_done = true;
                }
                _ => {}
            }
            if !self.fin_done
                && (beyond(self.p.fin, cmp, self.s.buf.avail())
                    || beyond(self.s.fin, cmp, self.p.buf.avail()))
            {
                return Some(CheckpointReason::ControlDiffers(
                    "bytes sent after the other side's FIN",
                ));
            }
        }
        self.cmp = Some(cmp);
        while self
            .s_pending
            .front()
            .is_some_and(|(e, _)| seq::le(*e, cmp))
        {
            self.s_pending.pop_front();
        }
        while self.s_frames.front().is_some_and(|(e, _)| seq::le(*e, cmp)) {
            self.s_frames.pop_front();
        }
        self.release(ctx);
        None
    }

    /// Moves the compare point over `n` bytes that matched.
    fn advance(&mut self, n: usize, ctx: &mut Ctx<'_>) {
        if let Some(cmp) = self.cmp.as_mut() {
            self.p.buf.consume(n);
            self.s.buf.consume(n);
            *cmp = cmp.wrapping_add(n as u32);
            self.compared += n as u64;
            Metrics::add(&ctx.m.matched_tcp_bytes, n as u64);
        }
    }

    /// Releases held segments from the front while they may go.
    fn release(&mut self, ctx: &mut Ctx<'_>) {
        let Some(cmp) = self.cmp else { return };
        while let Some(h) = self.held.front() {
            let ok = if h.rst {
                self.s.rst
            } else {
                seq::le(h.end, cmp)
                    && (!h.syn || self.s.syn.is_some())
                    && h.ack
                        .is_none_or(|a| self.s_ack.is_some_and(|m| seq::le(a, m)))
            };
            if !ok {
                break;
            }
            if let Some(h) = self.held.pop_front() {
                ctx.release(h.frame);
            }
        }
    }

    /// Releases primary segments that arrived at or before `deadline` and forgets
    /// secondary output that waited as long.
    pub(crate) fn expire(
        &mut self,
        deadline: Instant,
        ctx: &mut Ctx<'_>,
    ) -> Option<CheckpointReason> {
        let mut r = None;
        if let Some(h) = self.held.front().filter(|h| h.arrived <= deadline) {
            tracing::debug!(
                end = h.end, ack = ?h.ack, syn = h.syn, rst = h.rst, cmp = ?self.cmp,
                offset = ?self.offset, s_ack = ?self.s_ack, p_start = ?self.p.start,
                s_start = ?self.s.start, p_avail = self.p.buf.avail(),
                s_avail = self.s.buf.avail(), "TCP compare timeout"
            );
        }
        while self.held.front().is_some_and(|h| h.arrived <= deadline) {
            if let Some(h) = self.held.pop_front() {
                Metrics::inc(&ctx.m.compare_timeouts);
                ctx.release(h.frame);
                r = Some(CheckpointReason::CompareTimeout);
            }
        }
        let before = self.s_pending.len() + self.early.len();
        while self.s_pending.front().is_some_and(|(_, t)| *t <= deadline) {
            self.s_pending.pop_front();
        }
        self.early.retain(|e| e.arrived > deadline);
        while self.s_frames.len() > self.s_pending.len() {
            self.s_frames.pop_front();
        }
        let gone = before - self.s_pending.len() - self.early.len();
        if gone > 0 {
            Metrics::add(&ctx.m.secondary_timeouts, gone as u64);
            r = r.or(Some(CheckpointReason::SecondaryTimeout));
        }
        r
    }

    /// A checkpoint committed: releases everything held and makes the secondary's state
    /// the primary's, as it now is in the VMs (the offset becomes zero, the streams
    /// restart at the primary's highest sequence number).
    pub(crate) fn commit(&mut self, ctx: &mut Ctx<'_>) {
        self.release_all(ctx);
        Metrics::add(
            &ctx.m.secondary_discarded_bytes,
            self.s.buf.held_bytes() as u64,
        );
        Metrics::add(
            &ctx.m.secondary_skipped_bytes,
            self.p.buf.held_bytes() as u64,
        );
        let (p, p_ack, p_high) = (std::mem::take(&mut self.p), self.p_ack, self.p_high);
        let (client_fin, client_rst) = (self.client_fin, self.client_rst);
        let mut p_buf = p.buf;
        let mut s_buf = std::mem::take(&mut self.s.buf);
        p_buf.clear();
        s_buf.clear();
        *self = Self {
            client_fin,
            client_rst,
            ..Self::default()
        };
        if let Some(start) = p.start {
            let cmp = p_high.unwrap_or(start.wrapping_add(u32::from(p.syn.is_some())));
            self.p = Half {
                start: Some(start),
                syn: p.syn,
                fin: p.fin,
                rst: p.rst,
                buf: p_buf,
            };
            self.s = Half {
                start: Some(start),
                syn: p.syn,
                fin: p.fin,
                rst: p.rst,
                buf: s_buf,
            };
            self.offset = Some(0);
            self.p_ts = None;
            self.s_ts = None;
            self.cmp = Some(cmp);
            self.fin_done = p.fin.is_some();
            self.p_ack = p_ack;
            self.s_ack = p_ack;
            self.p_high = p_high;
        }
    }

    /// Releases every held segment (a commit, or leaving compare mode).
    pub(crate) fn release_all(&mut self, ctx: &mut Ctx<'_>) {
        for h in self.held.drain(..) {
            Metrics::inc(&ctx.m.released_on_commit);
            ctx.release(h.frame);
        }
    }

    /// Leaves compare mode: releases every held segment and drops the compare buffers
    /// (the sequence offset stays, for translation).
    pub(crate) fn stop_comparing(&mut self, ctx: &mut Ctx<'_>) {
        self.release_all(ctx);
        self.p.buf.clear();
        self.s.buf.clear();
        self.s_pending.clear();
        self.s_frames.clear();
        self.early.clear();
    }

    /// Drops every held segment and the compare buffers (failover: the primary's output
    /// is void). Returns how many segments, and the secondary's frames whose bytes the
    /// client has not had (for the caller to send on, translated, as the secondary now
    /// serves).
    pub(crate) fn drop_held(&mut self) -> (usize, Vec<Vec<u8>>) {
        let n = self.held.len();
        self.held.clear();
        self.p.buf.clear();
        self.s.buf.clear();
        self.s_pending.clear();
        self.early.clear();
        (n, self.s_frames.drain(..).map(|(_, f)| f).collect())
    }
}

/// Whether a side that sent FIN at `fin` is contradicted by the other side having `avail`
/// contiguous bytes from `cmp`, some of them at or after the FIN.
fn beyond(fin: Option<u32>, cmp: u32, avail: usize) -> bool {
    avail > 0 && fin.is_some_and(|f| seq::dist(cmp, f) < avail as i64)
}
