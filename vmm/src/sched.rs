//! Scheduling hints: a short EEVDF time slice for the threads on the checkpoint path.
//!
//! A checkpoint's pause is a chain of wakeups across threads and processes (the primary's
//! control thread, the secondary's link reader, push and disk receivers, the supervisor's
//! event thread). On a machine whose cores the vCPU threads keep busy, each wakeup waited
//! for a running vCPU's slice to end (up to milliseconds at the tail). Linux 6.12+ lets a
//! thread ask for a shorter slice (`sched_setattr` with `sched_runtime` on a normal
//! thread; no privilege needed); a woken thread with a short slice has an early deadline
//! and preempts at once. Every colo process asks for one at start, so every thread it
//! spawns inherits it, and the vCPU threads go back to the default slice. On an older
//! kernel the call fails or is ignored, and nothing changes.
//!
//! The trade (measured in `colo pair --dirty-rate 25600 --pipeline 2048`, 2 cores): in COLO
//! mode, where both VMs compete for the cores, pause p99 about half lower (3.6-4.2 against
//! 6.1-8.0 ms) at the same or a slightly lower guest rate. In periodic mode, where only the
//! PVM runs, it made the guest slower (1113-1365 against 1364-1744 req/s, three
//! alternated pairs) and the pause no shorter, so there the default is off.
//! `COLO_SLICE_US` sets the slice for either mode (`0`: the kernel's default, i.e. off);
//! children of `colo pair` inherit it.

use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

/// The nice value vCPU threads take when they start (see [`set_vcpu_nice`]).
static VCPU_NICE: AtomicI32 = AtomicI32::new(0);

/// Makes vCPU threads started from now on run at `nice` (0-19).
pub fn set_vcpu_nice(nice: i32) {
    VCPU_NICE.store(nice.clamp(0, 19), Ordering::SeqCst);
}

/// Called by a vCPU thread when it starts: the kernel's default slice, and the configured
/// nice value.
pub fn enter_vcpu_thread() {
    let nice = VCPU_NICE.load(Ordering::SeqCst);
    if nice != 0 {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        if let Err(e) = set_nice(tid, nice) {
            tracing::warn!(error = %e, nice, "cannot lower the vCPU thread's priority");
        }
    }
    set_slice(None);
}

/// Sets thread `tid`'s nice value.
///
/// # Errors
/// The `setpriority` error (raising a priority needs CAP_SYS_NICE or RLIMIT_NICE).
pub fn set_nice(tid: i32, nice: i32) -> std::io::Result<()> {
    // SAFETY: setpriority has no memory effects; on Linux PRIO_PROCESS with a thread id
    // applies to that thread.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

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

/// `struct sched_attr` (SCHED_ATTR_SIZE_VER1).
#[repr(C)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
    util_min: u32,
    util_max: u32,
}

/// Sets the calling thread's time slice (`None`: the kernel's default), keeping its nice
/// value and its normal policy. Returns whether the kernel took it.
pub fn set_slice(slice: Option<Duration>) -> bool {
    // SAFETY: getpriority has no memory effects; on Linux, PRIO_PROCESS with 0 means the
    // calling thread.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        policy: libc::SCHED_OTHER as u32,
        flags: 0,
        nice,
        priority: 0,
        runtime: slice.map_or(0, |s| s.as_nanos() as u64),
        deadline: 0,
        period: 0,
        util_min: 0,
        util_max: 0,
    };
    // SAFETY: `attr` is a valid sched_attr of the size it declares and outlives the call;
    // pid 0 is the calling thread.
    let r = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &raw const attr, 0) };
    if r != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "sched_setattr: no custom time slice on this kernel"
        );
    }
    r == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice_of_this_thread() -> Option<u64> {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/sched")).ok()?;
        s.lines()
            .find(|l| l.starts_with("se.slice"))
            .and_then(|l| l.rsplit(':').next())
            .and_then(|v| v.trim().parse().ok())
    }

    #[test]
    fn a_vcpu_thread_takes_the_configured_nice() {
        // A fresh thread, so the test's own thread keeps its priority.
        let got = std::thread::spawn(|| {
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            set_nice(tid, 3).unwrap();
            // SAFETY: as above; 0 is the calling thread.
            unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
        })
        .join()
        .unwrap();
        assert_eq!(got, 3);
        assert!(set_nice(-1, 0).is_err(), "a bad thread id is an error");
    }

    #[test]
    fn a_thread_gets_and_gives_back_a_short_slice() {
        std::thread::spawn(|| {
            if !set_slice(Some(SHORT_SLICE)) {
                eprintln!("skipped: the kernel refused a custom slice");
                return;
            }
            // Kernels that accept the call but do not report slices say nothing more.
            let Some(short) = slice_of_this_thread() else {
                return;
            };
            assert_eq!(short, 100_000);
            // Inherited by a new thread.
            let child = std::thread::spawn(slice_of_this_thread).join().unwrap();
            assert_eq!(child, Some(100_000));
            assert!(set_slice(None));
            assert!(slice_of_this_thread().unwrap() > 100_000);
        })
        .join()
        .unwrap();
    }
}
