//! Scheduling hints: a short EEVDF time slice for the threads on the checkpoint path.
//!
//! A checkpoint's pause is a chain of wakeups across threads and processes (the primary's
//! control thread, the secondary's link reader, push and disk receivers, the supervisor's
//! event thread). On a machine whose cores the vCPU threads keep busy, each wakeup waited
//! for a running vCPU's slice to end (up to milliseconds at the tail). Linux 6.12+ lets a
//! thread ask for a shorter slice (`sched_setattr` with `sched_runtime` on a normal
//! thread; no privilege needed); a woken thread with a short slice has an early deadline
//! and preempts at once. Every colo process asks for one at start, so every thread it
//! spawns inherits it, and the vCPU threads go back to the default slice
//! (`colo_machine::sched`). On an older kernel the call fails or is ignored, and nothing
//! changes.
//!
//! The trade (measured in `colo pair --dirty-rate 25600 --pipeline 2048`, 2 cores): in COLO
//! mode, where both VMs compete for the cores, pause p99 about half lower (3.6-4.2 against
//! 6.1-8.0 ms) at the same or a slightly lower guest rate. In periodic mode, where only the
//! PVM runs, it made the guest slower (1113-1365 against 1364-1744 req/s, three
//! alternated pairs) and the pause no shorter, so there the default is off.
//! `COLO_SLICE_US` sets the slice for either mode (`0`: the kernel's default, i.e. off);
//! children of `colo pair` inherit it.

use std::time::Duration;

use colo_machine::sched::set_slice;

/// The slice of colo's own threads unless `COLO_SLICE_US` says otherwise: they run
/// briefly and often.
pub const SHORT_SLICE: Duration = Duration::from_micros(100);

/// Gives the calling thread (and every thread it spawns later) colo's slice: `COLO_SLICE_US`,
/// else [`SHORT_SLICE`] unless `mode` is periodic. Call it before any thread starts.
pub fn init(mode: Option<crate::colo::Mode>) {
    let slice = match std::env::var("COLO_SLICE_US") {
        Err(_) if mode == Some(crate::colo::Mode::Periodic) => return,
        Err(_) => Some(SHORT_SLICE),
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(0) => return,
            Ok(us) => Some(Duration::from_micros(us)),
            Err(_) => {
                tracing::warn!(value = %v, "COLO_SLICE_US is not a number of microseconds; using {} us", SHORT_SLICE.as_micros());
                Some(SHORT_SLICE)
            }
        },
    };
    set_slice(slice);
}
