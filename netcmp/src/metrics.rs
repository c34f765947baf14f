//! Counters of everything the proxy does, shared between its thread and its handle.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[doc = $doc:literal])+ $name:ident,)+) => {
        /// Live counters. The proxy updates them with relaxed atomics; read them with
        /// [`Metrics::snapshot`].
        #[derive(Debug, Default)]
        pub struct Metrics {
            $($(#[doc = $doc])+ pub(crate) $name: AtomicU64,)+
        }

        /// A copy of the counters at one moment.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        #[non_exhaustive]
        pub struct MetricsSnapshot {
            $($(#[doc = $doc])+ pub $name: u64,)+
        }

        impl Metrics {
            /// Reads every counter.
            pub fn snapshot(&self) -> MetricsSnapshot {
                MetricsSnapshot { $($name: self.$name.load(Ordering::Relaxed),)+ }
            }
        }

        impl MetricsSnapshot {
            /// Every counter with its name, in declaration order.
            pub fn fields(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name),)+]
            }
        }
    };
}

counters! {
    /// Frames read from the client.
    client_frames,
    /// Frames read from the primary.
    primary_frames,
    /// Frames read from the secondary.
    secondary_frames,
    /// Client frames sent on to both VMs.
    mirrored_frames,
    /// Frames released to the client.
    released_frames,
    /// Bytes released to the client.
    released_bytes,
    /// Frames that did not parse (all sides).
    malformed_frames,
    /// Malformed frames dropped by policy.
    malformed_dropped,
    /// UDP/ICMP/other packets whose primary and secondary copies matched.
    matched_packets,
    /// TCP stream bytes that matched.
    matched_tcp_bytes,
    /// Primary and secondary output that differed (payload, or SYN/FIN/RST meaning).
    mismatches,
    /// Primary packets released after `compare_timeout` without a secondary counterpart.
    compare_timeouts,
    /// Secondary output that found no primary counterpart within `compare_timeout`.
    secondary_timeouts,
    /// Scans for expired packets (one per `expired_scan_cycle`).
    expired_scans,
    /// Times a connection's queue went past `max_queue_size` (each forces a checkpoint).
    queue_overflows,
    /// Packets dropped because a queue reached four times `max_queue_size` while a
    /// checkpoint was already pending.
    overflow_drops,
    /// Events that call for a checkpoint (mismatch, timeout, overflow, full table).
    checkpoint_triggers,
    /// Checkpoint requests sent (at most one outstanding at a time).
    checkpoint_requests,
    /// Times the secondary was asked to hold: it ran further ahead of the primary than
    /// `secondary_lead`.
    secondary_holds,
    /// Checkpoints the controller reported committed.
    checkpoints_committed,
    /// Secondary TCP stream bytes not yet compared when a checkpoint committed: output the
    /// secondary produced ahead of the primary, work the checkpoint threw away (the
    /// secondary, now a copy of the primary, produces those bytes again).
    secondary_discarded_bytes,
    /// Primary TCP stream bytes not yet compared when a checkpoint committed: output the
    /// secondary had not produced yet, work it skips (the checkpoint brings it there).
    secondary_skipped_bytes,
    /// Held primary frames released by a committed checkpoint.
    released_on_commit,
    /// Primary frames released without compare by a passthrough rule.
    passthrough_frames,
    /// Primary frames released without compare in primary-only mode.
    unprotected_frames,
    /// Primary TCP segments that only repeated bytes already compared.
    primary_retransmits,
    /// Secondary TCP segments that only repeated bytes already compared.
    secondary_retransmits,
    /// Secondary frames whose TCP sequence numbers were rewritten (failover mode).
    seq_rewrites,
    /// Client frames whose TCP acknowledgment numbers were translated for the secondary.
    ack_translations,
    /// Client TCP frames sent to the secondary untranslated: the offset was not known.
    untranslated_acks,
    /// Translated frames whose SACK blocks or timestamps could not be translated.
    options_untranslated,
    /// Frames dropped in failover or primary-only mode (the other VM's output).
    discarded_frames,
    /// Connections tracked now.
    connections,
    /// Connections created.
    connections_created,
    /// Connections forgotten after being idle or closed.
    connections_expired,
    /// Frames that found the connection table full (each forces a checkpoint).
    connection_table_full,
    /// Frames that could not be written to a port.
    port_write_errors,
    /// Frames dropped because a port had no peer or its queue was full.
    port_drops,
}

/// Updating counters.
///
/// Every counter has a single writer at a time: whoever holds the engine (`&mut Engine`),
/// which in the threaded proxy is the engine thread (its port writer counts from that same
/// thread); other threads only read snapshots. With one writer, a relaxed load followed by
/// a relaxed store is an exact increment, and unlike a locked read-modify-write
/// (`fetch_add`) it is no full memory barrier, which would stall the engine on every
/// outstanding cache miss several times per frame. A counter written from another thread
/// as well would need `fetch_add`.
impl Metrics {
    /// Adds `n` to a counter (single writer: see above).
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
    }

    /// Adds one to a counter (single writer: see above).
    pub(crate) fn inc(c: &AtomicU64) {
        Self::add(c, 1);
    }

    /// Sets a gauge.
    pub(crate) fn set(c: &AtomicU64, n: u64) {
        c.store(n, Ordering::Relaxed);
    }
}

impl std::fmt::Display for MetricsSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut first = true;
        for (name, v) in self.fields() {
            if v == 0 {
                continue;
            }
            if !first {
                f.write_str(" ")?;
            }
            first = false;
            write!(f, "{name}={v}")?;
        }
        if first {
            f.write_str("(all counters zero)")?;
        }
        Ok(())
    }
}
